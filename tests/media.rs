//! The media repository over HTTP: uploads (size limit, quota, async create+PUT), downloads on the authenticated
//! (`/_matrix/client/v1/media`) and legacy (`/_matrix/media/{v3,r0}`) endpoints with safe headers, thumbnails of
//! PNG/JPEG/GIF/WebP, files on disk beside the database, and media over federation between two Hearths and with a
//! real Synapse.

mod common;

use std::io::Cursor;

use common::fake_resident::federated_pair;
use common::*;
use image::{DynamicImage, GenericImageView, ImageFormat, Rgba, RgbaImage};

/// A raw HTTP response (media bodies are not JSON).
struct Raw {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    #[track_caller]
    fn assert_err(&self, status: u16, errcode: &str) {
        assert_eq!(
            (self.status, self.json()["errcode"].as_str().unwrap_or("")),
            (status, errcode),
            "{}",
            String::from_utf8_lossy(&self.body)
        );
    }
}

async fn raw(
    c: &Client,
    method: reqwest::Method,
    path: &str,
    content_type: Option<&str>,
    body: Option<Vec<u8>>,
) -> Raw {
    let mut req = c.http.request(method, c.url(path));
    if let Some(t) = &c.token {
        req = req.bearer_auth(t);
    }
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    if let Some(b) = body {
        req = req.body(b);
    }
    let res = req.send().await.expect("HTTP request");
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let body = res.bytes().await.expect("body").to_vec();
    Raw { status, headers, body }
}

async fn get_raw(c: &Client, path: &str) -> Raw {
    raw(c, reqwest::Method::GET, path, None, None).await
}

/// Uploads `data` on the v3 endpoint; returns the `mxc://` URI's (server, id).
async fn upload(c: &Client, content_type: &str, filename: Option<&str>, data: &[u8]) -> (String, String) {
    let q = filename.map(|f| query(&[("filename", f)])).unwrap_or_default();
    let r =
        raw(c, reqwest::Method::POST, &format!("/_matrix/media/v3/upload{q}"), Some(content_type), Some(data.to_vec()))
            .await;
    assert_eq!(r.status, 200, "upload: {}", String::from_utf8_lossy(&r.body));
    split_mxc(r.json()["content_uri"].as_str().expect("content_uri"))
}

fn split_mxc(uri: &str) -> (String, String) {
    let rest = uri.strip_prefix("mxc://").expect("mxc uri");
    let (s, m) = rest.split_once('/').expect("server/id");
    (s.to_owned(), m.to_owned())
}

/// A 1000x500 test picture (a blue-ish gradient with a pure red square in the top left corner) encoded as `format`.
fn picture(format: ImageFormat) -> Vec<u8> {
    let img = RgbaImage::from_fn(1000, 500, |x, y| {
        if x < 100 && y < 100 {
            Rgba([255, 0, 0, 255])
        } else {
            Rgba([(x % 256) as u8, (y % 256) as u8, 255, 255])
        }
    });
    let img = match format {
        ImageFormat::Jpeg => DynamicImage::ImageRgb8(DynamicImage::ImageRgba8(img).to_rgb8()),
        _ => DynamicImage::ImageRgba8(img),
    };
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), format).expect("encode test image");
    out
}

fn decode(bytes: &[u8]) -> (ImageFormat, DynamicImage) {
    let format = image::guess_format(bytes).expect("thumbnail is an image");
    (format, image::load_from_memory(bytes).expect("thumbnail decodes"))
}

// ---- uploads and downloads ----------------------------------------------------------------------------------------

#[tokio::test]
async fn upload_download_authenticated_and_legacy_with_safe_headers() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let data = b"hello, media\n".to_vec();
    let (server, id) = upload(&alice, "text/plain", Some("hello.txt"), &data).await;
    assert_eq!(server, s.server_name);

    // Authenticated media: any local user's token works; no token is 401.
    let path = format!("/_matrix/client/v1/media/download/{server}/{id}");
    let r = get_raw(&bob, &path).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, data);
    assert_eq!(r.header("content-type"), "text/plain");
    assert_eq!(r.header("content-disposition"), "inline; filename=\"hello.txt\"");
    assert!(r.header("content-security-policy").starts_with("sandbox"), "{:?}", r.headers);
    assert_eq!(r.header("x-content-type-options"), "nosniff");
    get_raw(&s.client(), &path).await.assert_err(401, "M_MISSING_TOKEN");

    // A file name in the URL overrides the stored one (non-ASCII goes into filename*).
    let r = get_raw(&bob, &format!("{path}/{}", enc("résumé.txt"))).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-disposition"), "inline; filename*=utf-8''r%C3%A9sum%C3%A9.txt");

    // The legacy unauthenticated endpoints are frozen (spec v1.11): new media is not served there.
    for v in ["v3", "r0"] {
        get_raw(&s.client(), &format!("/_matrix/media/{v}/download/{server}/{id}"))
            .await
            .assert_err(404, "M_NOT_FOUND");
    }

    // Unsafe types are never inline: HTML, SVG, XML and unknown types are attachments, still sandboxed.
    for (ct, name) in [
        ("text/html", "x.html"),
        ("image/svg+xml", "x.svg"),
        ("application/xhtml+xml", "x.xhtml"),
        ("application/x-weird", "x.bin"),
    ] {
        let (srv, mid) = upload(&alice, ct, Some(name), b"<html><script>alert(1)</script></html>").await;
        let r = get_raw(&bob, &format!("/_matrix/client/v1/media/download/{srv}/{mid}")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-disposition"), format!("attachment; filename=\"{name}\""), "{ct}");
        assert!(r.header("content-security-policy").contains("sandbox"));
        assert_eq!(r.header("x-content-type-options"), "nosniff");
    }
    // No content type given: served as application/octet-stream, as an attachment.
    let r = raw(&alice, reqwest::Method::POST, "/_matrix/media/v3/upload", None, Some(b"raw".to_vec())).await;
    let (srv, mid) = split_mxc(r.json()["content_uri"].as_str().unwrap());
    let r = get_raw(&bob, &format!("/_matrix/client/v1/media/download/{srv}/{mid}")).await;
    assert_eq!((r.header("content-type"), r.header("content-disposition")), ("application/octet-stream", "attachment"));

    // Unknown and malformed ids are 404 (never a path outside the media folder).
    get_raw(&bob, &format!("/_matrix/client/v1/media/download/{server}/nosuchmedia"))
        .await
        .assert_err(404, "M_NOT_FOUND");
    get_raw(&bob, &format!("/_matrix/client/v1/media/download/{server}/{}", enc("../../hearth.db")))
        .await
        .assert_err(404, "M_NOT_FOUND");
    get_raw(&bob, &format!("/_matrix/client/v1/media/download/{}/{id}", enc("bad/server")))
        .await
        .assert_err(404, "M_NOT_FOUND");
    // Remote media without federation: not found (rather than an error).
    get_raw(&bob, &format!("/_matrix/client/v1/media/download/elsewhere.example/{id}"))
        .await
        .assert_err(404, "M_NOT_FOUND");
    // Uploading needs a token.
    raw(&s.client(), reqwest::Method::POST, "/_matrix/media/v3/upload", Some("text/plain"), Some(b"x".to_vec()))
        .await
        .assert_err(401, "M_MISSING_TOKEN");

    // Config on both APIs; URL previews are served (tests/moderation_tools.rs): a request without a URL is 400.
    assert_eq!(bob.get("/_matrix/client/v1/media/config").await.ok()["m.upload.size"], json!(50 << 20));
    assert_eq!(bob.get("/_matrix/media/v3/config").await.ok()["m.upload.size"], json!(50 << 20));
    bob.get("/_matrix/client/v1/media/preview_url").await.assert_err(400, "M_MISSING_PARAM");
    s.stop().await;
}

#[tokio::test]
async fn files_are_stored_beside_the_database_and_cors_allows_browsers() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    // 3 MB: larger than limits.max_request_bytes (1 MiB), which does not apply to media.
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let (server, id) = upload(&alice, "application/octet-stream", None, &data).await;
    let media_dir = s.db_path.parent().unwrap().join("media");
    let on_disk = std::fs::read(media_dir.join("files").join(&server).join(&id[..2]).join(&id))
        .expect("file under media/ beside the db");
    assert_eq!(on_disk, data);
    assert_eq!(std::fs::read_dir(media_dir.join("tmp")).unwrap().count(), 0, "no leftovers in tmp/");
    let conn = rusqlite::Connection::open(&s.db_path).unwrap();
    let (size, uploader, sha): (i64, String, String) = conn
        .query_row(
            "SELECT size, uploader, sha256 FROM media WHERE origin = ?1 AND media_id = ?2",
            [&server, &id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!((size, uploader.as_str()), (3_000_000, alice.user_id.as_str()));
    assert_eq!(sha.len(), 64);

    // A browser's preflight and the actual request get CORS headers (web clients load media cross-origin).
    let pre = alice
        .http
        .request(reqwest::Method::OPTIONS, alice.url("/_matrix/media/v3/upload"))
        .header("origin", "http://client.example")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "authorization,content-type")
        .send()
        .await
        .unwrap();
    assert!(pre.status().is_success());
    assert_eq!(pre.headers()["access-control-allow-origin"], "*");
    let r = alice
        .http
        .get(alice.url(&format!("/_matrix/client/v1/media/download/{server}/{id}")))
        .bearer_auth(alice.token.as_ref().unwrap())
        .header("origin", "http://client.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    assert_eq!(r.headers()["accept-ranges"], "bytes");
    assert_eq!(r.bytes().await.unwrap().len(), 3_000_000);

    // Byte ranges (video players seek with them).
    let url = alice.url(&format!("/_matrix/client/v1/media/download/{server}/{id}"));
    for (range, from, to) in [
        ("bytes=10-19", 10usize, 19usize),
        ("bytes=-5", 2_999_995, 2_999_999),
        ("bytes=2999990-", 2_999_990, 2_999_999),
        ("bytes=5-9999999", 5, 2_999_999),
    ] {
        let r = alice
            .http
            .get(&url)
            .bearer_auth(alice.token.as_ref().unwrap())
            .header("range", range)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 206, "{range}");
        assert_eq!(r.headers()["content-range"].to_str().unwrap(), format!("bytes {from}-{to}/3000000"), "{range}");
        assert_eq!(r.bytes().await.unwrap().as_ref(), &data[from..=to], "{range}");
    }
    let r = alice
        .http
        .get(&url)
        .bearer_auth(alice.token.as_ref().unwrap())
        .header("range", "bytes=3000000-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 416);
    assert_eq!(r.headers()["content-range"], "bytes */3000000");
    let r = alice
        .http
        .get(&url)
        .bearer_auth(alice.token.as_ref().unwrap())
        .header("range", "bytes=0-1,5-6")
        .send()
        .await
        .unwrap();
    assert_eq!(
        (r.status().as_u16(), r.bytes().await.unwrap().len()),
        (200, 3_000_000),
        "several ranges: the whole file"
    );
    s.stop().await;
}

/// Sends a chunked upload (no Content-Length) over a raw socket; returns the status line and body.
async fn chunked_upload(base_url: &str, token: &str, total: usize) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base_url.trim_start_matches("http://");
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b'x'; 500];
    let mut sent = 0;
    while sent < total {
        let n = chunk.len().min(total - sent);
        if sock.write_all(format!("{n:x}\r\n").as_bytes()).await.is_err() {
            break;
        }
        let _ = sock.write_all(&chunk[..n]).await;
        let _ = sock.write_all(b"\r\n").await;
        sent += n;
    }
    let _ = sock.write_all(b"0\r\n\r\n").await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(20), sock.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

#[tokio::test]
async fn size_limit_is_m_too_large_and_quota_is_enforced() {
    let s = TestServer::start_with(|c| {
        c.media.max_upload_bytes = 1000;
        c.media.user_quota_bytes = 2500;
    })
    .await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    assert_eq!(alice.get("/_matrix/client/v1/media/config").await.ok()["m.upload.size"], json!(1000));

    let r = raw(&alice, reqwest::Method::POST, "/_matrix/media/v3/upload", Some("text/plain"), Some(vec![b'a'; 1001]))
        .await;
    r.assert_err(413, "M_TOO_LARGE");
    // Without a Content-Length the limit applies while streaming.
    let (status, text) = chunked_upload(&s.base_url, alice.token.as_deref().unwrap(), 3000).await;
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("M_TOO_LARGE"), "{text}");
    let (status, text) = chunked_upload(&s.base_url, alice.token.as_deref().unwrap(), 900).await;
    assert_eq!(status, 200, "{text}");

    // Quota 2500: 900 (chunked, above) + 1000 fits, another 1000 does not.
    upload(&alice, "text/plain", None, &[b'b'; 1000]).await;
    let r = raw(&alice, reqwest::Method::POST, "/_matrix/media/v3/upload", Some("text/plain"), Some(vec![b'c'; 1000]))
        .await;
    r.assert_err(403, "M_RESOURCE_LIMIT_EXCEEDED");
    // A small one still fits; another user has their own quota.
    upload(&alice, "text/plain", None, &[b'd'; 500]).await;
    upload(&bob, "text/plain", None, &[b'e'; 1000]).await;
    // Nothing half-written is left behind by the refused uploads.
    let media_dir = s.db_path.parent().unwrap().join("media");
    assert_eq!(std::fs::read_dir(media_dir.join("tmp")).unwrap().count(), 0);
    let files: usize = walk(&media_dir.join("files"));
    assert_eq!(files, 4, "four stored uploads");
    s.stop().await;
}

fn walk(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| if e.path().is_dir() { walk(&e.path()) } else { 1 }).sum())
        .unwrap_or(0)
}

#[tokio::test]
async fn async_upload_create_then_put() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let created = alice.post("/_matrix/media/v1/create", json!({})).await.ok();
    let (server, id) = split_mxc(created["content_uri"].as_str().unwrap());
    assert!(created["unused_expires_at"].as_i64().unwrap() > 0);
    // Not uploaded yet: downloads wait up to timeout_ms, then 504 M_NOT_YET_UPLOADED.
    get_raw(&bob, &format!("/_matrix/client/v1/media/download/{server}/{id}?timeout_ms=200"))
        .await
        .assert_err(504, "M_NOT_YET_UPLOADED");
    let put_path = format!("/_matrix/media/v3/upload/{server}/{id}?filename=later.txt");
    raw(&bob, reqwest::Method::PUT, &put_path, Some("text/plain"), Some(b"bob's".to_vec()))
        .await
        .assert_err(403, "M_FORBIDDEN");
    // A download waiting while the content arrives gets it.
    let waiter = {
        let bob = bob.clone();
        let path = format!("/_matrix/client/v1/media/download/{server}/{id}?timeout_ms=10000");
        tokio::spawn(async move { get_raw(&bob, &path).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let r = raw(&alice, reqwest::Method::PUT, &put_path, Some("text/plain"), Some(b"arrived".to_vec())).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let got = waiter.await.unwrap();
    assert_eq!((got.status, got.body.as_slice()), (200, &b"arrived"[..]));
    assert_eq!(got.header("content-disposition"), "inline; filename=\"later.txt\"");
    raw(&alice, reqwest::Method::PUT, &put_path, Some("text/plain"), Some(b"again".to_vec()))
        .await
        .assert_err(409, "M_CANNOT_OVERWRITE_MEDIA");
    raw(
        &alice,
        reqwest::Method::PUT,
        &format!("/_matrix/media/v3/upload/{server}/nosuchid"),
        Some("text/plain"),
        Some(b"x".to_vec()),
    )
    .await
    .assert_err(404, "M_NOT_FOUND");
    s.stop().await;
}

/// The legacy unauthenticated endpoints (`/_matrix/media/{v3,r0}/download|thumbnail`) as the spec's v1.11 freeze
/// asks, switchable with `media.freeze_legacy` (Synapse's `enable_authenticated_media`): media stored while frozen
/// is 404 there and served by the authenticated endpoints; media stored before the freeze stays reachable.
#[tokio::test]
async fn legacy_media_endpoints_are_frozen_for_media_stored_since() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let png = picture(ImageFormat::Png);
    let (server, new) = upload(&alice, "image/png", None, &png).await;
    let (_, old) = upload(&alice, "image/png", None, &png).await;
    // `old` plays media stored before the freeze (a database from before migration 9).
    let conn = rusqlite::Connection::open(&s.db_path).unwrap();
    conn.execute("UPDATE media SET authenticated = 0 WHERE media_id = ?1", [&old]).unwrap();
    let anon = s.client();
    for v in ["v3", "r0", "v1"] {
        let dl = format!("/_matrix/media/{v}/download/{server}/{new}");
        get_raw(&anon, &dl).await.assert_err(404, "M_NOT_FOUND");
        get_raw(&anon, &format!("{dl}/pic.png")).await.assert_err(404, "M_NOT_FOUND");
        get_raw(&anon, &format!("/_matrix/media/{v}/thumbnail/{server}/{new}?width=32&height=32"))
            .await
            .assert_err(404, "M_NOT_FOUND");
        let r = get_raw(&anon, &format!("/_matrix/media/{v}/download/{server}/{old}")).await;
        assert_eq!((r.status, r.body == png), (200, true), "media from before the freeze ({v})");
        let r = get_raw(&anon, &format!("/_matrix/media/{v}/thumbnail/{server}/{old}?width=32&height=32")).await;
        assert_eq!(r.status, 200, "{v}");
    }
    // An async upload reserved while frozen is frozen too.
    let created = alice.post("/_matrix/media/v1/create", json!({})).await.ok();
    let (_, reserved) = split_mxc(created["content_uri"].as_str().unwrap());
    let r = raw(
        &alice,
        reqwest::Method::PUT,
        &format!("/_matrix/media/v3/upload/{server}/{reserved}"),
        Some("text/plain"),
        Some(b"later".to_vec()),
    )
    .await;
    assert_eq!(r.status, 200);
    get_raw(&anon, &format!("/_matrix/media/v3/download/{server}/{reserved}")).await.assert_err(404, "M_NOT_FOUND");
    // The authenticated endpoints serve them all.
    for id in [&new, &old, &reserved] {
        assert_eq!(get_raw(&alice, &format!("/_matrix/client/v1/media/download/{server}/{id}")).await.status, 200);
    }
    s.stop().await;

    // Switched off: everything is served on the legacy endpoints too (as before the freeze).
    let s = TestServer::start_with(|c| c.media.freeze_legacy = false).await;
    let alice = s.user("alice").await;
    let (server, id) = upload(&alice, "image/png", None, &png).await;
    let r = get_raw(&s.client(), &format!("/_matrix/media/v3/download/{server}/{id}")).await;
    assert_eq!((r.status, r.body == png), (200, true));
    let r = get_raw(&s.client(), &format!("/_matrix/media/v3/thumbnail/{server}/{id}?width=20&height=20&method=crop"))
        .await;
    assert_eq!((r.status, decode(&r.body).1.dimensions()), (200, (32, 32)));
    s.stop().await;
}

// ---- thumbnails ---------------------------------------------------------------------------------------------------

#[tokio::test]
async fn thumbnails_scale_and_crop_png_jpeg_gif_webp() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    for (format, ct, thumb_format) in [
        (ImageFormat::Png, "image/png", ImageFormat::Png),
        (ImageFormat::Jpeg, "image/jpeg", ImageFormat::Jpeg),
        (ImageFormat::Gif, "image/gif", ImageFormat::Png),
        (ImageFormat::WebP, "image/webp", ImageFormat::Png),
    ] {
        let (server, id) = upload(&alice, ct, Some("pic"), &picture(format)).await;
        let base = format!("/_matrix/client/v1/media/thumbnail/{server}/{id}");

        // Scale: fits the box, keeps the 2:1 aspect ratio.
        let r = get_raw(&alice, &format!("{base}?width=320&height=240&method=scale")).await;
        assert_eq!(r.status, 200, "{ct}: {}", String::from_utf8_lossy(&r.body));
        let (f, img) = decode(&r.body);
        assert_eq!(f, thumb_format, "{ct}");
        assert_eq!(
            r.header("content-type"),
            if thumb_format == ImageFormat::Jpeg { "image/jpeg" } else { "image/png" }
        );
        assert_eq!(img.dimensions(), (320, 160), "{ct} scale");

        // Crop: exactly the (normalised) box, cut from the middle; the red corner square is cut away.
        let r = get_raw(&alice, &format!("{base}?width=96&height=96&method=crop")).await;
        assert_eq!(r.status, 200, "{ct}");
        let (_, img) = decode(&r.body);
        assert_eq!(img.dimensions(), (96, 96), "{ct} crop");
        let px = img.get_pixel(0, 0);
        assert!(px[2] > 150, "{ct}: the crop kept the left edge (the red square): {px:?}");

        // A small request is served from the smallest size that covers it.
        let r = get_raw(&alice, &format!("{base}?width=20&height=20&method=crop")).await;
        assert_eq!(r.status, 200);
        assert_eq!(decode(&r.body).1.dimensions(), (32, 32));
        assert!(r.header("content-security-policy").contains("sandbox"));
    }
    // Thumbnails are cached (one row per normalised size) and the cached answer is identical.
    let (server, id) = upload(&alice, "image/png", None, &picture(ImageFormat::Png)).await;
    let p = format!("/_matrix/client/v1/media/thumbnail/{server}/{id}?width=600&height=400");
    let first = get_raw(&alice, &p).await;
    assert_eq!(decode(&first.body).1.dimensions(), (640, 320));
    let second = get_raw(&alice, &p).await;
    assert_eq!(first.body, second.body);
    let conn = rusqlite::Connection::open(&s.db_path).unwrap();
    let n: i64 =
        conn.query_row("SELECT count(*) FROM media_thumbnails WHERE media_id = ?1", [&id], |r| r.get(0)).unwrap();
    assert_eq!(n, 1);

    // Small images are never enlarged.
    let tiny = {
        let mut out = Vec::new();
        DynamicImage::ImageRgba8(RgbaImage::from_pixel(40, 20, Rgba([0, 0, 255, 255])))
            .write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .unwrap();
        out
    };
    let (server, tid) = upload(&alice, "image/png", None, &tiny).await;
    let r = get_raw(
        &alice,
        &format!("/_matrix/client/v1/media/thumbnail/{server}/{tid}?width=320&height=240&method=scale"),
    )
    .await;
    assert_eq!(decode(&r.body).1.dimensions(), (40, 20));

    // Errors: not an image, missing or bad sizes, bad method, no token.
    let (server, txt) = upload(&alice, "text/plain", None, b"not an image").await;
    get_raw(&alice, &format!("/_matrix/client/v1/media/thumbnail/{server}/{txt}?width=32&height=32"))
        .await
        .assert_err(400, "M_UNKNOWN");
    let (server, svg) = upload(&alice, "image/svg+xml", None, b"<svg xmlns='http://www.w3.org/2000/svg'/>").await;
    get_raw(&alice, &format!("/_matrix/client/v1/media/thumbnail/{server}/{svg}?width=32&height=32"))
        .await
        .assert_err(400, "M_UNKNOWN");
    get_raw(&alice, &format!("/_matrix/client/v1/media/thumbnail/{server}/{id}?width=32"))
        .await
        .assert_err(400, "M_MISSING_PARAM");
    get_raw(&alice, &format!("/_matrix/client/v1/media/thumbnail/{server}/{id}?width=0&height=32"))
        .await
        .assert_err(400, "M_INVALID_PARAM");
    get_raw(&alice, &format!("/_matrix/client/v1/media/thumbnail/{server}/{id}?width=x&height=32"))
        .await
        .assert_err(400, "M_INVALID_PARAM");
    get_raw(&alice, &format!("/_matrix/client/v1/media/thumbnail/{server}/{id}?width=32&height=32&method=zoom"))
        .await
        .assert_err(400, "M_INVALID_PARAM");
    get_raw(&s.client(), &format!("/_matrix/client/v1/media/thumbnail/{server}/{id}?width=32&height=32"))
        .await
        .assert_err(401, "M_MISSING_TOKEN");
    // A truncated image is refused, not a crash.
    let mut broken = picture(ImageFormat::Png);
    broken.truncate(200);
    let (server, bid) = upload(&alice, "image/png", None, &broken).await;
    get_raw(&alice, &format!("/_matrix/client/v1/media/thumbnail/{server}/{bid}?width=32&height=32"))
        .await
        .assert_err(400, "M_UNKNOWN");
    s.stop().await;
}

/// A 16384x16384 grey PNG (a few hundred KB; its pixels would take 256 MiB). Made from a zeroed buffer, which
/// costs the test process no memory until written.
fn huge_png() -> Vec<u8> {
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    use image::{ExtendedColorType, ImageEncoder};
    let side = 16_384u32;
    let pixels = vec![0u8; (side * side) as usize];
    let mut out = Vec::new();
    PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::NoFilter)
        .write_image(&pixels, side, side, ExtendedColorType::L8)
        .expect("encode the huge png");
    out
}

/// The peak resident memory (VmHWM) of a process, in MiB.
fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/<pid>/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    kib / 1024
}

/// Twelve parallel thumbnail requests of a 16384x16384 PNG keep the server (the `hearth` binary, measured by its
/// peak RSS) under 512 MB. With the defaults the pixel limit refuses the image from its header (413
/// `M_TOO_LARGE`, nothing decoded). With a pixel limit that lets it through, the decoding budget runs the decodes
/// one at a time and identical requests share one decode; without either, the twelve decodes took 4.8 GB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thumbnails_of_a_huge_png_stay_under_512_mb() {
    let png = huge_png();
    let open = ("HEARTH_REGISTRATION__ENABLED", "true");
    let let_through =
        [open, ("HEARTH_MEDIA__MAX_IMAGE_PIXELS", "300000000"), ("HEARTH_MEDIA__THUMBNAIL_MEMORY_MB", "400")];
    for (env, expected) in [(&[open][..], 413u16), (&let_through[..], 200)] {
        let dir = tempfile::tempdir().unwrap();
        let server = BinServer::start(&dir.path().join("hearth.db"), env).await;
        let mut alice = server.client();
        alice.register("alice", PASSWORD).await.ok();
        let (srv, id) = upload(&alice, "image/png", None, &png).await;
        // Twelve at once: three sizes, four identical requests each.
        let sizes = ["width=32&height=32&method=crop", "width=320&height=240&method=scale", "width=800&height=600"];
        let requests = (0..12).map(|i| {
            let (c, p) = (alice.clone(), format!("/_matrix/client/v1/media/thumbnail/{srv}/{id}?{}", sizes[i % 3]));
            async move { get_raw(&c, &p).await }
        });
        for r in futures::future::join_all(requests).await {
            if expected == 200 {
                assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
                assert!(decode(&r.body).1.width() <= 800);
            } else {
                r.assert_err(413, "M_TOO_LARGE");
                assert!(r.json()["error"].as_str().unwrap().contains("16384x16384"), "{}", r.json());
            }
        }
        let peak = peak_rss_mib(server.child.id());
        println!("peak RSS with {env:?}: {peak} MiB");
        assert!(peak < 512, "peak RSS {peak} MiB with {env:?}");
        server.kill();
    }
}

// ---- federation ---------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_over_federation_fetched_cached_and_served() {
    let (a, b) = federated_pair().await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let png = picture(ImageFormat::Png);
    let (server, id) = upload(&alice, "image/png", Some("cat.png"), &png).await;
    assert_eq!(server, "hearth-a.test");

    // Hearth A serves it to other servers as multipart/mixed (spec v1.11), only to signed requests.
    let fed_b = b.running.services.federation.as_ref().unwrap();
    let (headers, body) = fed_b
        .client
        .get_raw("hearth-a.test", &format!("/_matrix/federation/v1/media/download/{id}"), 10 << 20)
        .await
        .expect("federation media download");
    let ct = headers["content-type"].to_str().unwrap();
    assert!(ct.starts_with("multipart/mixed; boundary="), "{ct}");
    let parts = hearth::media::multipart::parse(&body, &hearth::media::multipart::boundary_of(ct).unwrap()).unwrap();
    assert_eq!(parts.len(), 2);
    assert_eq!(serde_json::from_slice::<Value>(&parts[0].body).unwrap(), json!({}));
    assert_eq!(parts[1].headers["content-type"], "image/png");
    assert_eq!(parts[1].body, png);
    let (headers, body) = fed_b
        .client
        .get_raw(
            "hearth-a.test",
            &format!("/_matrix/federation/v1/media/thumbnail/{id}?width=96&height=96&method=crop"),
            10 << 20,
        )
        .await
        .expect("federation thumbnail");
    let boundary = hearth::media::multipart::boundary_of(headers["content-type"].to_str().unwrap()).unwrap();
    let parts = hearth::media::multipart::parse(&body, &boundary).unwrap();
    assert_eq!(decode(&parts[1].body).1.dimensions(), (96, 96));
    let err = fed_b
        .client
        .get_raw("hearth-a.test", "/_matrix/federation/v1/media/download/nosuchmedia", 1 << 20)
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(404));
    let unsigned = reqwest::Client::builder().danger_accept_invalid_certs(true).build().unwrap();
    let r = unsigned
        .get(format!("https://{}/_matrix/federation/v1/media/download/{id}", a.running.federation_addr.unwrap()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401, "unsigned federation media request");

    // Bob on Hearth B asks his server for mxc://hearth-a.test/...: B fetches it over federation and caches it.
    let path = format!("/_matrix/client/v1/media/download/hearth-a.test/{id}");
    let r = get_raw(&bob, &path).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.body, png);
    assert_eq!(r.header("content-type"), "image/png");
    assert_eq!(r.header("content-disposition"), "inline; filename=\"cat.png\"");
    let thumb =
        get_raw(&bob, &format!("/_matrix/client/v1/media/thumbnail/hearth-a.test/{id}?width=320&height=240")).await;
    assert_eq!(thumb.status, 200);
    assert_eq!(decode(&thumb.body).1.dimensions(), (320, 160));
    let cached = b.db_path.parent().unwrap().join("media/files/hearth-a.test").join(&id[..2]).join(&id);
    assert_eq!(std::fs::read(&cached).expect("cached beside B's database"), png);
    // The frozen legacy endpoints serve nothing fetched since the freeze, and fetch nothing for anyone.
    get_raw(&b.client(), &format!("/_matrix/media/v3/download/hearth-a.test/{id}"))
        .await
        .assert_err(404, "M_NOT_FOUND");
    let (_, other) = upload(&alice, "text/plain", None, b"not fetched yet").await;
    get_raw(&b.client(), &format!("/_matrix/media/v3/download/hearth-a.test/{other}"))
        .await
        .assert_err(404, "M_NOT_FOUND");
    get_raw(&b.client(), &format!("/_matrix/media/v3/download/hearth-a.test/{other}?allow_remote=false"))
        .await
        .assert_err(404, "M_NOT_FOUND");
    // Unknown remote media is 404 for the client too.
    get_raw(&bob, "/_matrix/client/v1/media/download/hearth-a.test/nosuchmedia").await.assert_err(404, "M_NOT_FOUND");

    // With A gone, B still serves its cached copy (original and new thumbnail sizes).
    a.stop().await;
    let r = get_raw(&bob, &path).await;
    assert_eq!((r.status, r.body == png), (200, true));
    let thumb =
        get_raw(&bob, &format!("/_matrix/client/v1/media/thumbnail/hearth-a.test/{id}?width=32&height=32&method=crop"))
            .await;
    assert_eq!(decode(&thumb.body).1.dimensions(), (32, 32));
    // ... and media it never fetched is an error, not a hang.
    let r = get_raw(&bob, &format!("/_matrix/client/v1/media/download/hearth-a.test/{other}")).await;
    assert_eq!(r.status, 502, "{}", String::from_utf8_lossy(&r.body));
    b.stop().await;
}

/// Against a real Synapse (tests/interop/media.py): each server fetches the other's uploads over federation for its
/// own users, and thumbnails them. Set `HEARTHTEST_SKIP_SYNAPSE=1` to skip (it says so).
#[test]
#[ignore = "needs Synapse (target/synapse-venv); see tests/README.md"]
fn media_with_synapse_both_ways() {
    if std::env::var("HEARTHTEST_SKIP_SYNAPSE").as_deref() == Ok("1") {
        println!("SKIPPED media_with_synapse_both_ways: HEARTHTEST_SKIP_SYNAPSE=1 (Synapse interop not run)");
        return;
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let out = std::process::Command::new("python3")
        .arg(format!("{root}/tests/interop/media.py"))
        .env("HEARTHTEST_BIN", hearth_bin())
        .current_dir(root)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("python3 must be installed to run the Synapse interop tests");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{stdout}");
    assert!(out.status.success(), "media interop with Synapse failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}");
    assert!(stdout.contains("media with synapse: ok"), "{stdout}");
}
