//! Media over federation: our files served to other servers (`/_matrix/federation/v1/media/{download,thumbnail}`,
//! `multipart/mixed`), and other servers' files fetched once for local clients and cached like uploads.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;

use crate::error::{Error, Result};
use crate::federation::client::{enc, FedError};
use crate::http::Signed;
use crate::http::{AppState, Query};
use crate::media::{check_media_id, content_disposition, multipart, thumbnail, MediaRow, ThumbnailQuery};
use crate::store::accounts::now_ms;
use crate::store::media;

/// Extra room allowed on top of the file for the multipart framing and metadata.
const FRAMING_BYTES: u64 = 64 << 10;

/// Our own media with content, or 404.
async fn local_row(s: &AppState, media_id: &str) -> Result<MediaRow> {
    check_media_id(media_id)?;
    let (o, m) = (s.identity.server_name.to_string(), media_id.to_owned());
    s.store
        .read(move |c| media::get(c, &o, &m))
        .await?
        .filter(|r| r.size.is_some() && r.uploader.is_some())
        .ok_or_else(|| Error::not_found("unknown media"))
}

fn multipart_response(boundary: &str, body: Body) -> Response {
    let mut res = (StatusCode::OK, body).into_response();
    let ct = HeaderValue::from_str(&format!("multipart/mixed; boundary={boundary}")).expect("boundary is alphanumeric");
    res.headers_mut().insert(header::CONTENT_TYPE, ct);
    res
}

/// `GET /_matrix/federation/v1/media/download/{mediaId}`
pub async fn serve_download(
    State(s): State<AppState>,
    Path(media_id): Path<String>,
    _signed: Signed,
) -> Result<Response> {
    let row = local_row(&s, &media_id).await?;
    let file = tokio::fs::File::open(s.media.file_path(&row.origin, &row.media_id))
        .await
        .map_err(|_| Error::not_found("media file missing"))?;
    let boundary = crate::util::random_string(32);
    let ct = row.content_type.clone().unwrap_or_else(|| "application/octet-stream".into());
    let head = multipart::head(&boundary, &ct, &content_disposition(&ct, row.filename.as_deref()));
    let tail = multipart::tail(&boundary);
    let stream = futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(head))])
        .chain(tokio_util::io::ReaderStream::new(file))
        .chain(futures::stream::iter([Ok(bytes::Bytes::from(tail))]));
    Ok(multipart_response(&boundary, Body::from_stream(stream)))
}

/// `GET /_matrix/federation/v1/media/thumbnail/{mediaId}?width=&height=&method=`
pub async fn serve_thumbnail(
    State(s): State<AppState>,
    Path(media_id): Path<String>,
    Query(q): Query<ThumbnailQuery>,
    _signed: Signed,
) -> Result<Response> {
    let req = q.spec()?;
    let row = local_row(&s, &media_id).await?;
    let (ct, bytes) = thumbnail::get_or_make(&s, &row, req).await?;
    let boundary = crate::util::random_string(32);
    let mut body = multipart::head(&boundary, &ct, &content_disposition(&ct, None));
    body.extend_from_slice(&bytes);
    body.extend_from_slice(&multipart::tail(&boundary));
    Ok(multipart_response(&boundary, Body::from(body)))
}

/// Fetches `mxc://{origin}/{media_id}` from its server (authenticated federation media, falling back to the legacy
/// `/_matrix/media/v3/download` for servers without it), stores it under the media folder and records it.
pub async fn fetch_remote(s: &AppState, origin: &str, media_id: &str) -> Result<MediaRow> {
    let Some(fed) = s.federation.as_ref().filter(|_| s.config.media.fetch_remote) else {
        return Err(Error::not_found("remote media is not fetched by this server"));
    };
    let lock = s.media.fetch_lock(origin, media_id);
    let _guard = lock.lock().await;
    let (o, m) = (origin.to_owned(), media_id.to_owned());
    if let Some(r) = s.store.read(move |c| media::get(c, &o, &m)).await?.filter(|r| r.size.is_some()) {
        return Ok(r); // fetched by a concurrent request meanwhile
    }
    let max = s.config.media.max_upload_bytes;
    let path = format!("/_matrix/federation/v1/media/download/{}?timeout_ms=20000", enc(media_id));
    let (content_type, filename, data) = match fed.client.get_raw(origin, &path, max + FRAMING_BYTES).await {
        Ok((headers, body)) => {
            let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
            let boundary =
                multipart::boundary_of(ct).ok_or_else(|| Error::bad_gateway("remote media answer is not multipart"))?;
            let mut parts = multipart::parse(&body, &boundary)
                .ok_or_else(|| Error::bad_gateway("malformed multipart media answer"))?;
            if parts.len() < 2 {
                return Err(Error::bad_gateway("remote media answer lacks the file part"));
            }
            let file = parts.swap_remove(1);
            if file.headers.contains_key("location") {
                return Err(Error::bad_gateway("remote media answered with a redirect (not followed)"));
            }
            let filename = file.headers.get("content-disposition").and_then(|d| multipart::disposition_filename(d));
            (file.headers.get("content-type").cloned(), filename, file.body)
        }
        Err(e) if legacy_fallback(&e) => {
            let path = format!(
                "/_matrix/media/v3/download/{}/{}?allow_remote=false&timeout_ms=20000",
                enc(origin),
                enc(media_id)
            );
            let (headers, body) = fed.client.get_raw(origin, &path, max).await.map_err(fetch_error)?;
            let header_str = |h| headers.get(h).and_then(|v: &HeaderValue| v.to_str().ok()).map(str::to_owned);
            let filename = header_str(header::CONTENT_DISPOSITION).and_then(|d| multipart::disposition_filename(&d));
            (header_str(header::CONTENT_TYPE), filename, body.to_vec())
        }
        Err(e) => return Err(fetch_error(e)),
    };
    if data.len() as u64 > max {
        return Err(Error::too_large(format!("remote media is over {max} bytes")));
    }
    let content_type =
        content_type.and_then(|c| HeaderValue::from_str(&c).ok()).and_then(|v| super::clean_content_type(Some(&v)));
    let filename = super::clean_filename(filename);
    let sha256: String =
        ring::digest::digest(&ring::digest::SHA256, &data).as_ref().iter().map(|b| format!("{b:02x}")).collect();

    let dest = s.media.file_path(origin, media_id);
    let tmp = s.media.tmp_path();
    let stored = async {
        tokio::fs::create_dir_all(dest.parent().expect("media file has a folder")).await?;
        tokio::fs::write(&tmp, &data).await?;
        tokio::fs::rename(&tmp, &dest).await
    }
    .await;
    if let Err(e) = stored {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(Error::internal(format!("cannot store remote media: {e}")));
    }
    let row = MediaRow {
        origin: origin.to_owned(),
        media_id: media_id.to_owned(),
        uploader: None,
        content_type,
        filename,
        size: Some(data.len() as i64),
        created_ts: now_ms(),
        authenticated: s.config.media.freeze_legacy,
    };
    let r = row.clone();
    s.store.write(move |w| media::cache_remote(w.db(), &r, &sha256)).await?;
    tracing::info!(origin, media_id, size = data.len(), "cached remote media");
    Ok(row)
}

/// The remote server does not know the federation media endpoint (older servers): try the legacy one.
fn legacy_fallback(e: &FedError) -> bool {
    match e.status() {
        Some(404) => e.errcode() != Some("M_NOT_FOUND"),
        Some(400 | 405 | 501) => true,
        _ => false,
    }
}

fn fetch_error(e: FedError) -> Error {
    match e.status() {
        Some(413) => Error::too_large("remote media is larger than this server accepts"),
        Some(404) => Error::not_found("remote media not found"),
        Some(504) if e.errcode() == Some("M_NOT_YET_UPLOADED") => Error::not_yet_uploaded(),
        _ => Error::bad_gateway(format!("could not fetch remote media: {e}")),
    }
}
