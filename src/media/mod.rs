//! The media repository: uploads, downloads and thumbnails for clients (authenticated `/_matrix/client/v1/media/*`
//! and the legacy `/_matrix/media/{v3,r0}/*`), our media served to other servers
//! (`/_matrix/federation/v1/media/*`) and other servers' media fetched and cached for local clients.
//!
//! Files live on disk under the media folder (`media.path`, default `media/` beside the database):
//! `files/{origin}/{id[..2]}/{id}` and `thumbs/{origin}/{id[..2]}/{id}/{w}x{h}-{method}`; uploads are written to
//! `tmp/` first and renamed into place once complete. The `media` and `media_thumbnails` tables hold the metadata.

pub mod federation;
pub mod multipart;
pub mod preview;
pub mod thumbnail;

use std::path::Path as FsPath;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::error::{Error, Result};
use crate::http::{qs, AppState, Auth, Query};
use crate::store::accounts::now_ms;
use crate::store::media;

/// Pending async uploads (`/create`) expire after this long.
const PENDING_TTL_MS: i64 = 24 * 3600 * 1000;
/// Unused `/create` ids one user may hold at once.
const MAX_PENDING_PER_USER: i64 = 10;
/// The longest a download waits for an async upload's content.
const MAX_WAIT_MS: u64 = 20_000;

pub use crate::media_repo::MediaRepo;
pub use crate::store::media::MediaRow;

/// Media ids are `[A-Za-z0-9_-]+` (they become file names); anything else is unknown media.
pub fn check_media_id(media_id: &str) -> Result<()> {
    let ok = !media_id.is_empty()
        && media_id.len() <= 255
        && media_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::not_found("unknown media"))
    }
}

/// A valid server name that is safe as a folder name.
pub fn check_server_name(server_name: &str) -> Result<()> {
    match ruma::ServerName::parse(server_name) {
        Ok(_) if !server_name.contains('/') && !server_name.starts_with('.') => Ok(()),
        _ => Err(Error::not_found("unknown media (invalid server name)")),
    }
}

/// Content type as stored: a valid header value, at most 255 bytes, no parameters other than `charset`.
fn clean_content_type(v: Option<&HeaderValue>) -> Option<String> {
    let s = v?.to_str().ok()?.trim();
    if s.is_empty() || s.len() > 255 || !s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return None;
    }
    Some(s.to_owned())
}

fn clean_filename(name: Option<String>) -> Option<String> {
    let n = name?;
    let n: String = n.chars().filter(|c| !c.is_control() && *c != '/' && *c != '\\').take(255).collect();
    (!n.is_empty()).then_some(n)
}

// ---- routes ---------------------------------------------------------------------------------------------------

/// Client-facing routes (merged into the client listener's router).
pub fn client_routes() -> Router<AppState> {
    let mut r = Router::new()
        .route("/_matrix/client/v1/media/config", get(config))
        .route("/_matrix/client/v1/media/download/{server_name}/{media_id}", get(download_auth))
        .route("/_matrix/client/v1/media/download/{server_name}/{media_id}/{file_name}", get(download_auth_named))
        .route("/_matrix/client/v1/media/thumbnail/{server_name}/{media_id}", get(thumbnail_auth))
        .route("/_matrix/client/v1/media/preview_url", get(preview::preview_url))
        .route("/_matrix/media/v1/create", post(create));
    for v in ["v3", "r0", "v1"] {
        r = r
            .route(&format!("/_matrix/media/{v}/upload"), post(upload))
            .route(&format!("/_matrix/media/{v}/upload/{{server_name}}/{{media_id}}"), put(upload_to))
            .route(&format!("/_matrix/media/{v}/config"), get(config))
            .route(&format!("/_matrix/media/{v}/preview_url"), get(preview::preview_url))
            .route(&format!("/_matrix/media/{v}/download/{{server_name}}/{{media_id}}"), get(download_legacy))
            .route(
                &format!("/_matrix/media/{v}/download/{{server_name}}/{{media_id}}/{{file_name}}"),
                get(download_legacy_named),
            )
            .route(&format!("/_matrix/media/{v}/thumbnail/{{server_name}}/{{media_id}}"), get(thumbnail_legacy));
    }
    r
}

/// Routes other servers call (merged into the federation router).
pub fn federation_routes() -> Router<AppState> {
    Router::new()
        .route("/_matrix/federation/v1/media/download/{media_id}", get(federation::serve_download))
        .route("/_matrix/federation/v1/media/thumbnail/{media_id}", get(federation::serve_thumbnail))
}

async fn config(State(s): State<AppState>, _auth: Auth) -> impl IntoResponse {
    axum::Json(json!({"m.upload.size": s.config.media.max_upload_bytes}))
}

#[derive(Deserialize)]
struct UploadQuery {
    filename: Option<String>,
}

async fn upload(
    State(s): State<AppState>,
    auth: Auth,
    Query(q): Query<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<impl IntoResponse> {
    let media_id = crate::util::random_string(24);
    let origin = s.identity.server_name.to_string();
    let row = MediaRow {
        origin: origin.clone(),
        media_id: media_id.clone(),
        uploader: Some(auth.user_id.to_string()),
        content_type: clean_content_type(headers.get(header::CONTENT_TYPE)),
        filename: clean_filename(q.filename),
        size: None,
        created_ts: now_ms(),
        authenticated: s.config.media.freeze_legacy,
    };
    store_upload(&s, row, &headers, body, false).await?;
    Ok(axum::Json(json!({"content_uri": format!("mxc://{origin}/{media_id}")})))
}

/// `POST /_matrix/media/v1/create`: reserves an id whose content comes later with `PUT /upload/{server}/{id}`.
async fn create(State(s): State<AppState>, auth: Auth) -> Result<impl IntoResponse> {
    let media_id = crate::util::random_string(24);
    let origin = s.identity.server_name.to_string();
    let (o, m, u) = (origin.clone(), media_id.clone(), auth.user_id.clone());
    let now = now_ms();
    let authenticated = s.config.media.freeze_legacy;
    s.store
        .write(move |w| {
            // Ids reserved long ago and never filled are dropped first.
            media::drop_stale_reservations(w.db(), u.as_str(), now - PENDING_TTL_MS)?;
            if media::pending_reservations(w.db(), u.as_str(), now - PENDING_TTL_MS)? >= MAX_PENDING_PER_USER {
                return Err(Error::limit_exceeded(60_000));
            }
            media::reserve(w.db(), &o, &m, u.as_str(), now, authenticated)
        })
        .await?;
    Ok(axum::Json(
        json!({"content_uri": format!("mxc://{origin}/{media_id}"), "unused_expires_at": now + PENDING_TTL_MS}),
    ))
}

async fn upload_to(
    State(s): State<AppState>,
    auth: Auth,
    Path((server_name, media_id)): Path<(String, String)>,
    Query(q): Query<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<impl IntoResponse> {
    check_media_id(&media_id)?;
    if server_name != s.identity.server_name.as_str() {
        return Err(Error::not_found("unknown media"));
    }
    let (o, m) = (server_name.clone(), media_id.clone());
    let row = s.store.read(move |c| media::get(c, &o, &m)).await?.ok_or_else(|| Error::not_found("unknown media"))?;
    if row.uploader.as_deref() != Some(auth.user_id.as_str()) {
        return Err(Error::forbidden("this media id was created by someone else"));
    }
    if row.size.is_some() {
        return Err(Error::cannot_overwrite_media());
    }
    if row.created_ts + PENDING_TTL_MS < now_ms() {
        return Err(Error::not_found("the media id expired"));
    }
    let row = MediaRow {
        content_type: clean_content_type(headers.get(header::CONTENT_TYPE)),
        filename: clean_filename(q.filename),
        ..row
    };
    store_upload(&s, row, &headers, body, true).await?;
    Ok(axum::Json(json!({})))
}

/// Streams `body` to a temporary file (enforcing the size limit), moves it into place and records it (enforcing the
/// quota). `existing`: the row was created by `/create` and gets its content now.
async fn store_upload(s: &AppState, row: MediaRow, headers: &HeaderMap, body: Body, existing: bool) -> Result<()> {
    let max = s.config.media.max_upload_bytes;
    let quota = s.config.media.user_quota_bytes;
    let uploader = row.uploader.clone().unwrap_or_default();
    let too_large = || Error::too_large(format!("uploads are limited to {max} bytes"));
    let announced = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if announced.is_some_and(|n| n > max) {
        return Err(too_large());
    }
    if quota > 0 {
        let u = uploader.clone();
        let used = s.store.read(move |c| media::usage_of(c, &u)).await? as u64;
        if used + announced.unwrap_or(0) > quota {
            return Err(quota_error(quota));
        }
    }

    let tmp = s.media.tmp_path();
    let written = write_body(&tmp, body, max).await;
    let (size, sha256) = match written {
        Ok(x) => x,
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e.unwrap_or_else(too_large));
        }
    };
    let dest = s.media.file_path(&row.origin, &row.media_id);
    let moved = async {
        tokio::fs::create_dir_all(dest.parent().expect("media file has a folder")).await?;
        tokio::fs::rename(&tmp, &dest).await
    }
    .await;
    if let Err(e) = moved {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(Error::Internal(anyhow::Error::new(e).context("cannot store media file")));
    }
    let r = row.clone();
    let recorded = s
        .store
        .write(move |w| {
            if quota > 0 && media::usage_of(w.db(), &uploader)? as u64 + size > quota {
                return Err(quota_error(quota));
            }
            if existing {
                if !media::fill_reserved(w.db(), &r, size as i64, &sha256)? {
                    return Err(Error::cannot_overwrite_media());
                }
            } else {
                media::insert_upload(w.db(), &r, size as i64, &sha256)?;
            }
            Ok(())
        })
        .await;
    if recorded.is_err() {
        let _ = tokio::fs::remove_file(&dest).await;
    }
    recorded
}

fn quota_error(quota: u64) -> Error {
    Error::resource_limit(format!("media quota of {quota} bytes reached")).with("limit_type", json!("media_quota"))
}

/// Writes the body to `path`; returns (size, hex sha256). `Err(None)` means over `max` bytes.
async fn write_body(path: &FsPath, body: Body, max: u64) -> std::result::Result<(u64, String), Option<Error>> {
    // The io::Error stays in the chain: a full disk then answers 503 (error.rs).
    let io = |e: std::io::Error| Some(Error::Internal(anyhow::Error::new(e).context("cannot write media file")));
    let mut stream = body.into_data_stream();
    let mut file = match tokio::fs::File::create(path).await {
        Ok(file) => file,
        Err(e) => {
            drain(&mut stream, max).await;
            return Err(io(e));
        }
    };
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let mut size = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| Some(Error::bad_json(format!("upload interrupted: {e}"))))?;
        size += chunk.len() as u64;
        if size > max {
            return Err(None);
        }
        hash.update(&chunk);
        if let Err(e) = file.write_all(&chunk).await {
            drain(&mut stream, max - size).await;
            return Err(io(e));
        }
    }
    file.flush().await.map_err(io)?;
    file.sync_all().await.map_err(io)?;
    let hex: String = hash.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect();
    Ok((size, hex))
}

/// Reads and discards the rest of an upload (at most `budget` more bytes) after a write failed, so that the client,
/// still sending, reads our error answer instead of a connection closed under it (a full disk answers 503, and a
/// client must see it to retry later).
async fn drain(stream: &mut axum::body::BodyDataStream, mut budget: u64) {
    while let Some(Ok(chunk)) = stream.next().await {
        match budget.checked_sub(chunk.len() as u64) {
            Some(left) => budget = left,
            None => return,
        }
    }
}

// ---- downloads ------------------------------------------------------------------------------------------------

#[derive(Deserialize, Default)]
pub struct DownloadQuery {
    #[serde(default, deserialize_with = "qs::opt_bool")]
    allow_remote: Option<bool>,
    #[serde(default, deserialize_with = "qs::opt_u64")]
    timeout_ms: Option<u64>,
}

async fn download_auth(
    State(s): State<AppState>,
    _auth: Auth,
    Path((server_name, media_id)): Path<(String, String)>,
    Query(q): Query<DownloadQuery>,
    headers: HeaderMap,
) -> Result<Response> {
    let row = resolve(&s, &server_name, &media_id, &q).await?;
    download(&s, row, None, &headers).await
}

async fn download_auth_named(
    State(s): State<AppState>,
    _auth: Auth,
    Path((server_name, media_id, file_name)): Path<(String, String, String)>,
    Query(q): Query<DownloadQuery>,
    headers: HeaderMap,
) -> Result<Response> {
    let row = resolve(&s, &server_name, &media_id, &q).await?;
    download(&s, row, Some(file_name), &headers).await
}

async fn download_legacy(
    State(s): State<AppState>,
    Path((server_name, media_id)): Path<(String, String)>,
    Query(q): Query<DownloadQuery>,
    headers: HeaderMap,
) -> Result<Response> {
    let row = resolve_legacy(&s, &server_name, &media_id, q).await?;
    download(&s, row, None, &headers).await
}

async fn download_legacy_named(
    State(s): State<AppState>,
    Path((server_name, media_id, file_name)): Path<(String, String, String)>,
    Query(q): Query<DownloadQuery>,
    headers: HeaderMap,
) -> Result<Response> {
    let row = resolve_legacy(&s, &server_name, &media_id, q).await?;
    download(&s, row, Some(file_name), &headers).await
}

/// The media row as the legacy unauthenticated endpoints see it. While they are frozen (`media.freeze_legacy`, the
/// spec's v1.11 "Authenticated media"), media stored since is unknown there (404 `M_NOT_FOUND`, as Synapse's
/// `enable_authenticated_media`), and remote media not cached yet is not fetched for them: it would be stored
/// frozen.
async fn resolve_legacy(s: &AppState, server_name: &str, media_id: &str, mut q: DownloadQuery) -> Result<MediaRow> {
    let frozen = s.config.media.freeze_legacy;
    if frozen && server_name != s.identity.server_name.as_str() {
        let (o, m) = (server_name.to_owned(), media_id.to_owned());
        check_server_name(server_name)?;
        check_media_id(media_id)?;
        if s.store.read(move |c| media::get(c, &o, &m)).await?.is_none_or(|r| r.size.is_none()) {
            return Err(frozen_media());
        }
        q.allow_remote = Some(false);
    }
    let row = resolve(s, server_name, media_id, &q).await?;
    if row.authenticated {
        return Err(frozen_media());
    }
    Ok(row)
}

fn frozen_media() -> Error {
    Error::not_found("not found: media stored since the unauthenticated media endpoints were frozen is served only by /_matrix/client/v1/media")
}

async fn download(s: &AppState, row: MediaRow, file_name: Option<String>, headers: &HeaderMap) -> Result<Response> {
    let path = s.media.file_path(&row.origin, &row.media_id);
    let file = tokio::fs::File::open(&path).await.map_err(|_| Error::not_found("media file missing"))?;
    let name = clean_filename(file_name).or(row.filename.clone());
    let size = row.size.unwrap_or(0) as u64;
    let Ok(range) = byte_range(headers.get(header::RANGE), size) else {
        let mut res = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
        res.headers_mut()
            .insert(header::CONTENT_RANGE, HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii"));
        return Ok(res);
    };
    file_response(file, size, range, row.content_type.as_deref(), name.as_deref()).await
}

/// The one byte range asked for with `Range: bytes=...` (video players seek with it): `Ok(None)` for the whole
/// file (no header, a malformed one, or several ranges), `Err` when it cannot be satisfied.
fn byte_range(h: Option<&HeaderValue>, size: u64) -> std::result::Result<Option<(u64, u64)>, ()> {
    let Some(spec) = h.and_then(|v| v.to_str().ok()).and_then(|v| v.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    let Some((a, b)) = spec.split_once('-').filter(|_| !spec.contains(',')) else { return Ok(None) };
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = if a.is_empty() {
        let Ok(n) = b.parse::<u64>() else { return Ok(None) };
        if n == 0 {
            return Err(());
        }
        (size.saturating_sub(n), size.saturating_sub(1))
    } else {
        let Ok(start) = a.parse::<u64>() else { return Ok(None) };
        let end = if b.is_empty() {
            size.saturating_sub(1)
        } else {
            match b.parse::<u64>() {
                Ok(e) => e.min(size.saturating_sub(1)),
                Err(_) => return Ok(None),
            }
        };
        (start, end)
    };
    if size == 0 || start >= size || start > end {
        return Err(());
    }
    Ok(Some((start, end)))
}

/// The media row with its content available: local (waiting for an async upload) or remote (fetched and cached).
pub async fn resolve(s: &AppState, server_name: &str, media_id: &str, q: &DownloadQuery) -> Result<MediaRow> {
    check_server_name(server_name)?;
    check_media_id(media_id)?;
    let local = server_name == s.identity.server_name.as_str();
    let wait_ms = q.timeout_ms.unwrap_or(MAX_WAIT_MS).min(MAX_WAIT_MS);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
    loop {
        let (o, m) = (server_name.to_owned(), media_id.to_owned());
        let row = s.store.read(move |c| media::get(c, &o, &m)).await?;
        match row {
            Some(r) if r.size.is_some() => return Ok(r),
            Some(r) if local => {
                if r.created_ts + PENDING_TTL_MS < now_ms() {
                    return Err(Error::not_found("unknown media"));
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(Error::not_yet_uploaded());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            _ if local => return Err(Error::not_found("unknown media")),
            _ => {
                if q.allow_remote == Some(false) {
                    return Err(Error::not_found("remote media not cached here and allow_remote=false"));
                }
                return federation::fetch_remote(s, server_name, media_id).await;
            }
        }
    }
}

/// Types a browser may show inline from our origin (what Synapse allows); everything else is an attachment.
const INLINE_TYPES: &[&str] = &[
    "text/css",
    "text/plain",
    "text/csv",
    "application/json",
    "application/ld+json",
    "image/jpeg",
    "image/gif",
    "image/png",
    "image/apng",
    "image/webp",
    "image/avif",
    "video/mp4",
    "video/webm",
    "video/ogg",
    "video/quicktime",
    "audio/mp4",
    "audio/webm",
    "audio/aac",
    "audio/mpeg",
    "audio/ogg",
    "audio/wave",
    "audio/wav",
    "audio/x-wav",
    "audio/x-pn-wav",
    "audio/flac",
    "audio/x-flac",
];

/// Whether `content_type` may be shown inline (never HTML, SVG, XML or scripts).
pub fn inline_allowed(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    INLINE_TYPES.contains(&essence.as_str())
}

/// `inline` / `attachment` plus the file name (RFC 6266: `filename*` for anything beyond plain ASCII).
pub fn content_disposition(content_type: &str, file_name: Option<&str>) -> String {
    let kind = if inline_allowed(content_type) { "inline" } else { "attachment" };
    match file_name {
        None => kind.to_owned(),
        Some(n) if n.bytes().all(|b| b.is_ascii_alphanumeric() || b" ._-+()[],@".contains(&b)) => {
            format!("{kind}; filename=\"{n}\"")
        }
        Some(n) => format!("{kind}; filename*=utf-8''{}", crate::federation::client::enc(n)),
    }
}

/// Headers every media response carries.
pub fn media_headers(headers: &mut HeaderMap, content_type: &str, file_name: Option<&str>) {
    let ct = HeaderValue::from_str(content_type).unwrap_or(HeaderValue::from_static("application/octet-stream"));
    headers.insert(header::CONTENT_TYPE, ct);
    if let Ok(v) = HeaderValue::from_str(&content_disposition(content_type, file_name)) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox; default-src 'none'; script-src 'none'; plugin-types application/pdf; style-src 'unsafe-inline'; media-src 'self'; object-src 'self';"),
    );
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(
        header::HeaderName::from_static("cross-origin-resource-policy"),
        HeaderValue::from_static("cross-origin"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=86400"));
}

async fn file_response(
    mut file: tokio::fs::File,
    size: u64,
    range: Option<(u64, u64)>,
    content_type: Option<&str>,
    file_name: Option<&str>,
) -> Result<Response> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let (status, start, len) = match range {
        Some((start, end)) => (StatusCode::PARTIAL_CONTENT, start, end - start + 1),
        None => (StatusCode::OK, 0, size),
    };
    if start > 0 {
        file.seek(std::io::SeekFrom::Start(start))
            .await
            .map_err(|e| Error::internal(format!("media file seek: {e}")))?;
    }
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(file.take(len)));
    let mut res = (status, body).into_response();
    let h = res.headers_mut();
    media_headers(h, content_type.unwrap_or("application/octet-stream"), file_name);
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if range.is_some() {
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&format!("bytes {start}-{}/{size}", start + len - 1)).expect("ascii"),
        );
    }
    Ok(res)
}

// ---- thumbnails -----------------------------------------------------------------------------------------------

#[derive(Deserialize)]
pub struct ThumbnailQuery {
    #[serde(default, deserialize_with = "qs::opt_u64")]
    width: Option<u64>,
    #[serde(default, deserialize_with = "qs::opt_u64")]
    height: Option<u64>,
    method: Option<String>,
    #[serde(default, deserialize_with = "qs::opt_bool")]
    allow_remote: Option<bool>,
    #[serde(default, deserialize_with = "qs::opt_u64")]
    timeout_ms: Option<u64>,
    #[serde(default, deserialize_with = "qs::opt_bool")]
    #[allow(dead_code)]
    animated: Option<bool>,
}

impl ThumbnailQuery {
    /// The requested size and method, validated.
    pub fn spec(&self) -> Result<thumbnail::Request> {
        let (Some(w), Some(h)) = (self.width, self.height) else {
            return Err(Error::missing_param("width and height are required"));
        };
        if w == 0 || h == 0 || w > 10_000 || h > 10_000 {
            return Err(Error::invalid_param("width and height must be between 1 and 10000"));
        }
        let crop = match self.method.as_deref() {
            None | Some("scale") => false,
            Some("crop") => true,
            Some(_) => return Err(Error::invalid_param("method must be crop or scale")),
        };
        Ok(thumbnail::Request { width: w as u32, height: h as u32, crop })
    }
}

async fn thumbnail_auth(
    State(s): State<AppState>,
    _auth: Auth,
    Path((server_name, media_id)): Path<(String, String)>,
    Query(q): Query<ThumbnailQuery>,
) -> Result<Response> {
    thumbnail_response(&s, &server_name, &media_id, q).await
}

async fn thumbnail_legacy(
    State(s): State<AppState>,
    Path((server_name, media_id)): Path<(String, String)>,
    Query(q): Query<ThumbnailQuery>,
) -> Result<Response> {
    let req = q.spec()?;
    let dq = DownloadQuery { allow_remote: q.allow_remote, timeout_ms: q.timeout_ms };
    let row = resolve_legacy(&s, &server_name, &media_id, dq).await?;
    thumbnail_of_row(&s, row, req).await
}

async fn thumbnail_response(s: &AppState, server_name: &str, media_id: &str, q: ThumbnailQuery) -> Result<Response> {
    let req = q.spec()?;
    let dq = DownloadQuery { allow_remote: q.allow_remote, timeout_ms: q.timeout_ms };
    let row = resolve(s, server_name, media_id, &dq).await?;
    thumbnail_of_row(s, row, req).await
}

async fn thumbnail_of_row(s: &AppState, row: MediaRow, req: thumbnail::Request) -> Result<Response> {
    let (content_type, bytes) = thumbnail::get_or_make(s, &row, req).await?;
    let mut res = (StatusCode::OK, bytes).into_response();
    media_headers(res.headers_mut(), &content_type, None);
    Ok(res)
}
