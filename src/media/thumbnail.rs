//! Thumbnails of PNG, JPEG, GIF (first frame) and WebP images, scaled or cropped with the `image` crate, made once
//! per (media, size, method) and cached on disk.
//!
//! Requested sizes are mapped onto a fixed set (as Synapse's default `thumbnail_sizes`): the smallest of the
//! requested method that is at least as large as asked, else the largest of that method. This bounds the work and
//! the disk one file can cost. Nothing is upscaled.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};

use crate::error::{Error, Result};
use crate::http::AppState;
use crate::media::MediaRow;
use crate::store::media::{self, ThumbnailSize};

/// A requested thumbnail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub width: u32,
    pub height: u32,
    pub crop: bool,
}

/// The sizes thumbnails are made at.
pub const SIZES: [Request; 5] = [
    Request { width: 32, height: 32, crop: true },
    Request { width: 96, height: 96, crop: true },
    Request { width: 320, height: 240, crop: false },
    Request { width: 640, height: 480, crop: false },
    Request { width: 800, height: 600, crop: false },
];

/// Source files larger than this are not thumbnailed.
const MAX_SOURCE_BYTES: i64 = 64 << 20;

impl Request {
    /// The key of this size's cached thumbnail.
    fn size(&self) -> ThumbnailSize<'static> {
        ThumbnailSize { width: self.width, height: self.height, method: self.method() }
    }

    fn method(&self) -> &'static str {
        if self.crop {
            "crop"
        } else {
            "scale"
        }
    }

    /// The size from [`SIZES`] this request is served from.
    pub fn normalised(&self) -> Request {
        let same: Vec<Request> = SIZES.iter().copied().filter(|s| s.crop == self.crop).collect();
        same.iter()
            .copied()
            .filter(|s| s.width >= self.width && s.height >= self.height)
            .min_by_key(|s| s.width * s.height)
            .or_else(|| same.iter().copied().max_by_key(|s| s.width * s.height))
            .unwrap_or(*self)
    }
}

/// The thumbnail's content type and bytes, made now if not cached.
pub async fn get_or_make(s: &AppState, row: &MediaRow, req: Request) -> Result<(String, Vec<u8>)> {
    let n = req.normalised();
    let (o, m) = (row.origin.clone(), row.media_id.clone());
    let cached: Option<String> = s.store.read(move |c| media::thumbnail_content_type(c, &o, &m, n.size())).await?;
    let path = s.media.thumb_path(&row.origin, &row.media_id, n.width, n.height, n.method());
    if let Some(ct) = cached {
        if let Ok(bytes) = tokio::fs::read(&path).await {
            return Ok((ct, bytes));
        }
    }
    if row.size.unwrap_or(0) > MAX_SOURCE_BYTES {
        return Err(cannot("the file is too large to thumbnail"));
    }
    let source = s.media.file_path(&row.origin, &row.media_id);
    let data = tokio::fs::read(&source).await.map_err(|_| Error::not_found("media file missing"))?;
    let (ct, bytes) = tokio::task::spawn_blocking(move || make(&data, n))
        .await
        .map_err(|e| Error::internal(format!("thumbnail task failed: {e}")))??;

    let tmp = s.media.root.join("tmp").join(crate::util::random_string(24));
    let stored = async {
        tokio::fs::create_dir_all(path.parent().expect("thumbnail has a folder")).await?;
        tokio::fs::write(&tmp, &bytes).await?;
        tokio::fs::rename(&tmp, &path).await
    }
    .await;
    if stored.is_ok() {
        let (o, m, c, size) = (row.origin.clone(), row.media_id.clone(), ct.clone(), bytes.len() as i64);
        s.store.write(move |w| media::record_thumbnail(w.db(), &o, &m, n.size(), &c, size)).await?;
    } else {
        let _ = tokio::fs::remove_file(&tmp).await;
        tracing::warn!(path = %path.display(), "could not cache a thumbnail");
    }
    Ok((ct, bytes))
}

fn cannot(msg: &str) -> Error {
    Error::unknown(format!("cannot thumbnail this media: {msg}"))
}

/// Decodes `data` (PNG, JPEG, GIF or WebP, with decoding limits against decompression bombs), applies the EXIF
/// orientation, scales or crops, and encodes: JPEG for JPEG sources, PNG otherwise.
pub fn make(data: &[u8], req: Request) -> Result<(String, Vec<u8>)> {
    let reader = ImageReader::new(Cursor::new(data)).with_guessed_format().map_err(|_| cannot("unreadable"))?;
    let format = reader.format();
    if !matches!(format, Some(ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::Gif | ImageFormat::WebP)) {
        return Err(cannot("not a PNG, JPEG, GIF or WebP image"));
    }
    let mut decoder = reader.into_decoder().map_err(|e| cannot(&e.to_string()))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(16_384);
    limits.max_image_height = Some(16_384);
    limits.max_alloc = Some(256 << 20);
    decoder.set_limits(limits).map_err(|e| cannot(&e.to_string()))?;
    let orientation = decoder.orientation().ok();
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| cannot(&e.to_string()))?;
    if let Some(o) = orientation {
        img.apply_orientation(o);
    }
    let thumb = resize(&img, req);
    let mut out = Vec::new();
    if format == Some(ImageFormat::Jpeg) {
        let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 80);
        DynamicImage::ImageRgb8(thumb.to_rgb8())
            .write_with_encoder(enc)
            .map_err(|e| Error::internal(format!("jpeg encoding: {e}")))?;
        Ok(("image/jpeg".into(), out))
    } else {
        thumb
            .write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .map_err(|e| Error::internal(format!("png encoding: {e}")))?;
        Ok(("image/png".into(), out))
    }
}

/// Scale: fit inside the box keeping the aspect ratio. Crop: fill the box exactly and cut the overflow. Both never
/// enlarge: a crop box larger than the image shrinks (keeping its aspect ratio) until it fits.
pub fn resize(img: &DynamicImage, req: Request) -> DynamicImage {
    let (w, h) = (img.width().max(1), img.height().max(1));
    let filter = image::imageops::FilterType::Triangle;
    if req.crop {
        let f = (w as f64 / req.width as f64).min(h as f64 / req.height as f64).min(1.0);
        let cw = ((req.width as f64 * f).round() as u32).max(1);
        let ch = ((req.height as f64 * f).round() as u32).max(1);
        img.resize_to_fill(cw, ch, filter)
    } else if w <= req.width && h <= req.height {
        img.clone()
    } else {
        img.resize(req.width, req.height, filter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_normalised_up_never_beyond_the_largest() {
        let r = |width, height, crop| Request { width, height, crop };
        assert_eq!(r(10, 10, true).normalised(), r(32, 32, true));
        assert_eq!(r(64, 64, true).normalised(), r(96, 96, true));
        assert_eq!(r(500, 500, true).normalised(), r(96, 96, true));
        assert_eq!(r(100, 100, false).normalised(), r(320, 240, false));
        assert_eq!(r(641, 100, false).normalised(), r(800, 600, false));
        assert_eq!(r(4000, 4000, false).normalised(), r(800, 600, false));
    }

    #[test]
    fn scale_keeps_aspect_and_crop_fills() {
        let img = DynamicImage::new_rgba8(1000, 500);
        let s = resize(&img, Request { width: 320, height: 240, crop: false });
        assert_eq!((s.width(), s.height()), (320, 160));
        let c = resize(&img, Request { width: 96, height: 96, crop: true });
        assert_eq!((c.width(), c.height()), (96, 96));
        let small = DynamicImage::new_rgba8(20, 10);
        let s = resize(&small, Request { width: 320, height: 240, crop: false });
        assert_eq!((s.width(), s.height()), (20, 10));
        let c = resize(&small, Request { width: 32, height: 32, crop: true });
        assert_eq!((c.width(), c.height()), (10, 10));
    }
}
