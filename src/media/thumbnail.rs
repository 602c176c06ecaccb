//! Thumbnails of PNG, JPEG, GIF (first frame) and WebP images, scaled or cropped with the `image` crate, made once
//! per (media, size, method) and cached on disk.
//!
//! Requested sizes are mapped onto a fixed set (as Synapse's default `thumbnail_sizes`): the smallest of the
//! requested method that is at least as large as asked, else the largest of that method. This bounds the work and
//! the disk one file can cost. Nothing is upscaled.

use std::io::Cursor;
use std::path::Path;

use image::metadata::Orientation;
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

/// What decoding an image holds besides its pixels (decoder state, a GIF's index buffer, the small thumbnail):
/// a quarter of the pixel bytes plus 4 MiB, on top of the pixels themselves.
fn decode_cost_bytes(pixel_bytes: u64) -> u64 {
    pixel_bytes + pixel_bytes / 4 + (4 << 20)
}

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

/// The thumbnail's content type and bytes, made now if not cached. Identical requests arriving together make it
/// once (the others wait for the first and read its cached result); the decode waits for its share of the memory
/// budget; too large an image (pixels or memory, known from its header) is 413 `M_TOO_LARGE` before anything is
/// decoded.
pub async fn get_or_make(s: &AppState, row: &MediaRow, req: Request) -> Result<(String, Vec<u8>)> {
    let n = req.normalised();
    let path = s.media.thumb_path(&row.origin, &row.media_id, n.width, n.height, n.method());
    if let Some(hit) = cached(s, row, n, &path).await? {
        return Ok(hit);
    }
    let lock = s.media.thumbnail_lock(path.to_string_lossy().into_owned());
    let _making = lock.lock().await;
    if let Some(hit) = cached(s, row, n, &path).await? {
        return Ok(hit); // made by the request we waited for
    }
    if row.size.unwrap_or(0) > MAX_SOURCE_BYTES {
        return Err(too_large("the file is too large to thumbnail"));
    }
    let source = s.media.file_path(&row.origin, &row.media_id);
    let probe = {
        let source = source.clone();
        tokio::task::spawn_blocking(move || Probe::read(&source))
            .await
            .map_err(|e| Error::internal(format!("thumbnail task failed: {e}")))??
    };
    let pixels = u64::from(probe.width) * u64::from(probe.height);
    if pixels > s.media.max_image_pixels {
        return Err(too_large(&format!(
            "the image is {}x{} ({pixels} pixels); this server thumbnails images of at most {} pixels",
            probe.width, probe.height, s.media.max_image_pixels
        )));
    }
    let cost = decode_cost_bytes(probe.pixel_bytes);
    let cost_mb = cost.div_ceil(1 << 20);
    if cost_mb > u64::from(s.media.decode_budget_mb) {
        return Err(too_large(&format!(
            "decoding the {}x{} image needs {cost_mb} MiB; this server decodes with at most {} MiB",
            probe.width, probe.height, s.media.decode_budget_mb
        )));
    }
    let budget = s
        .media
        .decode_budget
        .acquire_many(cost_mb as u32)
        .await
        .map_err(|_| Error::internal("the decoding budget is closed"))?;
    let (ct, bytes) = tokio::task::spawn_blocking(move || make_from_file(&source, n, cost))
        .await
        .map_err(|e| Error::internal(format!("thumbnail task failed: {e}")))??;
    drop(budget);

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

/// The cached thumbnail of this size, if it was made before.
async fn cached(s: &AppState, row: &MediaRow, n: Request, path: &Path) -> Result<Option<(String, Vec<u8>)>> {
    let (o, m) = (row.origin.clone(), row.media_id.clone());
    let ct: Option<String> = s.store.read(move |c| media::thumbnail_content_type(c, &o, &m, n.size())).await?;
    let Some(ct) = ct else { return Ok(None) };
    Ok(tokio::fs::read(path).await.ok().map(|bytes| (ct, bytes)))
}

fn cannot(msg: &str) -> Error {
    Error::unknown(format!("cannot thumbnail this media: {msg}"))
}

/// Too large to thumbnail: 413 `M_TOO_LARGE`, the spec's answer ("The local content is too large for the server
/// to thumbnail"; Synapse answers 400 `M_UNKNOWN` "Failed to generate thumbnail").
fn too_large(msg: &str) -> Error {
    Error::too_large(format!("content is too large to thumbnail: {msg}"))
}

/// What an image's header says, read without decoding its pixels.
struct Probe {
    width: u32,
    height: u32,
    /// The decoded pixels' size in bytes.
    pixel_bytes: u64,
}

impl Probe {
    fn read(path: &Path) -> Result<Probe> {
        let decoder = open(path)?.1;
        let (width, height) = decoder.dimensions();
        Ok(Probe { width, height, pixel_bytes: decoder.total_bytes() })
    }
}

/// A decoder for the file at `path` (PNG, JPEG, GIF or WebP only), having read no more than its header.
fn open(path: &Path) -> Result<(ImageFormat, Box<dyn ImageDecoder>)> {
    let reader = ImageReader::open(path)
        .map_err(|_| Error::not_found("media file missing"))?
        .with_guessed_format()
        .map_err(|_| cannot("unreadable"))?;
    let format = reader.format();
    let Some(format @ (ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::Gif | ImageFormat::WebP)) = format else {
        return Err(cannot("not a PNG, JPEG, GIF or WebP image"));
    };
    let decoder = reader.into_decoder().map_err(|e| cannot(&e.to_string()))?;
    Ok((format, Box::new(decoder)))
}

/// Decodes the file at `path` within `max_alloc` bytes (the budget reserved for it) and thumbnails it ([`make`]).
fn make_from_file(path: &Path, req: Request, max_alloc: u64) -> Result<(String, Vec<u8>)> {
    let (format, decoder) = open(path)?;
    thumbnail_of(format, decoder, req, max_alloc)
}

/// Decodes `data` (PNG, JPEG, GIF or WebP, with decoding limits against decompression bombs), scales or crops,
/// applies the EXIF orientation, and encodes: JPEG for JPEG sources, PNG otherwise.
pub fn make(data: &[u8], req: Request) -> Result<(String, Vec<u8>)> {
    let reader = ImageReader::new(Cursor::new(data)).with_guessed_format().map_err(|_| cannot("unreadable"))?;
    let format = reader.format();
    let Some(format @ (ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::Gif | ImageFormat::WebP)) = format else {
        return Err(cannot("not a PNG, JPEG, GIF or WebP image"));
    };
    let decoder = reader.into_decoder().map_err(|e| cannot(&e.to_string()))?;
    thumbnail_of(format, decoder, req, 256 << 20)
}

fn thumbnail_of(
    format: ImageFormat,
    mut decoder: impl ImageDecoder,
    req: Request,
    max_alloc: u64,
) -> Result<(String, Vec<u8>)> {
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(65_535);
    limits.max_image_height = Some(65_535);
    limits.max_alloc = Some(max_alloc);
    decoder.set_limits(limits).map_err(|e| cannot(&e.to_string()))?;
    if decoder.total_bytes() > max_alloc {
        return Err(too_large("the image needs more memory than allowed"));
    }
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let img = DynamicImage::from_decoder(decoder).map_err(|e| cannot(&e.to_string()))?;
    // Oriented after scaling (on the small image, not a copy of the big one): a quarter turn swaps the box.
    let turned = matches!(
        orientation,
        Orientation::Rotate90 | Orientation::Rotate270 | Orientation::Rotate90FlipH | Orientation::Rotate270FlipH
    );
    let boxed = if turned { Request { width: req.height, height: req.width, crop: req.crop } } else { req };
    let mut thumb = resize(&img, boxed);
    drop(img);
    thumb.apply_orientation(orientation);
    let mut out = Vec::new();
    if format == ImageFormat::Jpeg {
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
    // `thumbnail` averages areas straight into the small image: no full-size intermediate (a filtered resize
    // holds a float copy of width x thumbnail height, 150 MB for a 16384-wide image).
    let (w, h) = (img.width().max(1), img.height().max(1));
    if req.crop {
        let f = (w as f64 / req.width as f64).min(h as f64 / req.height as f64).min(1.0);
        let cw = ((req.width as f64 * f).round() as u32).clamp(1, w);
        let ch = ((req.height as f64 * f).round() as u32).clamp(1, h);
        // Scale until the image covers the box, then cut the middle.
        let scale = (cw as f64 / w as f64).max(ch as f64 / h as f64);
        let sw = ((w as f64 * scale).round() as u32).clamp(cw, w);
        let sh = ((h as f64 * scale).round() as u32).clamp(ch, h);
        let scaled = if (sw, sh) == (w, h) { img.clone() } else { img.thumbnail_exact(sw, sh) };
        scaled.crop_imm((sw - cw) / 2, (sh - ch) / 2, cw, ch)
    } else if w <= req.width && h <= req.height {
        img.clone()
    } else {
        img.thumbnail(req.width, req.height)
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
