//! Link previews: `GET /_matrix/client/v1/media/preview_url?url=&ts=` (and the legacy `/_matrix/media/{v3,r0,v1}`
//! path). The server fetches the page (HTML: at most [`MAX_HTML_BYTES`], in [`FETCH_TIMEOUT`]), reads its Open Graph
//! tags (falling back to `<title>`, the `description` meta tag and the first image, as Synapse does), downloads
//! the `og:image` into the media repository (answered as `mxc://`, with its size, type and dimensions) and caches
//! the answer per URL for [`CACHE_TTL_MS`].
//!
//! Outbound requests go through reqwest, the HTTP client the federation and push code use, with a resolver that
//! drops private, loopback, link-local (and other non-public) addresses after DNS resolution, unless
//! `media.preview_allow_private_ips` lists them; IP literals are checked the same way, and redirects are followed
//! by hand (at most [`MAX_REDIRECTS`]) so every hop is checked.
//!
//! HTML is parsed with `tl` (MIT, no dependencies of its own, widely used): it tolerates malformed markup without
//! failing, and Open Graph needs only the `<meta>`, `<title>` and `<img>` tags, not a browser-exact tree.
//! `scraper` (html5ever, the HTML5 parsing algorithm, maintained with Servo) was tried first: it brings some 25
//! crates (cssparser, selectors, string_cache, derive_more, ...) whose feature unification rebuilds most of the
//! dependency tree, a heavy price on the small machines Hearth targets for a few tags. `tl` does not decode
//! character references in attribute values; [`decode_entities`] does for the common ones.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::IntoResponse;
use reqwest::Url;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::config::Cidr;
use crate::error::{Error, Result};
use crate::http::{qs, AppState, Auth, Query};
use crate::store::accounts::now_ms;

/// HTML read at most (the `<head>` with its Open Graph tags comes first; the rest is ignored).
pub const MAX_HTML_BYTES: usize = 1 << 20;
/// An `og:image` downloaded at most.
pub const MAX_IMAGE_BYTES: usize = 10 << 20;
/// One request (connect, headers and body).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Redirects followed at most.
pub const MAX_REDIRECTS: usize = 5;
/// How long an answer is cached (Synapse: one hour).
pub const CACHE_TTL_MS: i64 = 3_600_000;
/// Longest `og:description` (and `<title>`) kept, in characters (Synapse summarises to 500).
const MAX_TEXT_CHARS: usize = 500;

#[derive(Deserialize)]
pub struct PreviewQuery {
    url: Option<String>,
    #[serde(default, deserialize_with = "qs::opt_u64")]
    #[allow(dead_code)] // accepted as the spec says; the cache answers with its newest preview
    ts: Option<u64>,
}

/// `GET .../preview_url`.
pub async fn preview_url(
    State(s): State<AppState>,
    _auth: Auth,
    Query(q): Query<PreviewQuery>,
) -> Result<impl IntoResponse> {
    if !s.config.media.url_preview_enabled {
        return Err(Error::forbidden("URL previews are disabled on this server"));
    }
    let raw = q.url.filter(|u| !u.is_empty()).ok_or_else(|| Error::missing_param("url is required"))?;
    let url = Url::parse(&raw).map_err(|e| Error::invalid_param(format!("invalid url: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(Error::invalid_param("only http and https URLs can be previewed"));
    }
    let key = url.to_string();
    let k = key.clone();
    if let Some(cached) = s.store.read(move |c| crate::store::previews::get(c, &k, now_ms())).await? {
        return Ok(axum::Json(serde_json::from_str::<Value>(&cached)?));
    }
    let og = tokio::time::timeout(FETCH_TIMEOUT * 3, preview(&s, url))
        .await
        .map_err(|_| Error::bad_gateway("fetching the page took too long"))??;
    let text = serde_json::to_string(&og)?;
    s.store
        .write(move |w| {
            let now = now_ms();
            crate::store::previews::put(w.db(), &key, &text, now + CACHE_TTL_MS, now)
        })
        .await?;
    Ok(axum::Json(og))
}

/// Fetches `url` and builds its preview: Open Graph tags of an HTML page, or the file itself when it is an image.
async fn preview(s: &AppState, url: Url) -> Result<Value> {
    let allow = allowed_blocks(&s.config.media.preview_allow_private_ips);
    let client = client(allow.clone())?;
    let page = fetch(&client, &allow, url, MAX_HTML_BYTES, true).await?;
    let mut og = Map::new();
    if page.content_type.starts_with("image/") {
        store_image(s, &page, &mut og).await?;
        return Ok(Value::Object(og));
    }
    if !page.content_type.starts_with("text/html") && !page.content_type.starts_with("application/xhtml") {
        return Ok(Value::Object(og));
    }
    let html = String::from_utf8_lossy(&page.body);
    let (tags, image) = open_graph(&html);
    og.extend(tags);
    if let Some(src) = image {
        match page.url.join(&src) {
            Ok(image_url) if matches!(image_url.scheme(), "http" | "https") => {
                match fetch(&client, &allow, image_url.clone(), MAX_IMAGE_BYTES, false).await {
                    Ok(img) if img.content_type.starts_with("image/") => store_image(s, &img, &mut og).await?,
                    Ok(_) => {}
                    Err(e) => tracing::debug!(url = %image_url, error = %e, "preview image not fetched"),
                }
            }
            _ => {}
        }
    }
    Ok(Value::Object(og))
}

/// The Open Graph tags of a page (`og:*` in `<meta property>` or `<meta name>`), with `og:title` from `<title>` and
/// `og:description` from `<meta name="description">` when the page has none; and the image to fetch (`og:image`,
/// else the first `<img src>`), which the caller replaces with an `mxc://` URI.
pub fn open_graph(html: &str) -> (Map<String, Value>, Option<String>) {
    let mut og = Map::new();
    let Ok(dom) = tl::parse(html, tl::ParserOptions::default()) else { return (og, None) };
    let parser = dom.parser();
    let mut description = None;
    for meta in tags(&dom, "meta") {
        let Some(content) = attr(meta, "content") else { continue };
        let key = attr(meta, "property").or_else(|| attr(meta, "name")).unwrap_or_default();
        let key = key.trim();
        if key.starts_with("og:") && key.len() > 3 && !og.contains_key(key) {
            og.insert(key.to_owned(), json!(shorten(content.trim())));
        } else if key.eq_ignore_ascii_case("description") && description.is_none() && !content.trim().is_empty() {
            description = Some(shorten(content.trim()));
        }
    }
    if !og.contains_key("og:title") {
        let title = tags(&dom, "title").first().map(|t| decode_entities(&t.inner_text(parser)));
        if let Some(title) = title.filter(|t| !t.trim().is_empty()) {
            og.insert("og:title".into(), json!(shorten(title.trim())));
        }
    }
    if let (false, Some(d)) = (og.contains_key("og:description"), description) {
        og.insert("og:description".into(), json!(d));
    }
    let image = match og.remove("og:image").and_then(|v| v.as_str().map(str::to_owned)) {
        Some(i) if !i.trim().is_empty() => Some(i.trim().to_owned()),
        _ => tags(&dom, "img").into_iter().find_map(|i| attr(i, "src")).map(|s| s.trim().to_owned()),
    };
    // What the page says about its image describes the file we do not serve; ours is measured instead.
    for k in ["og:image:width", "og:image:height", "og:image:type", "og:image:secure_url", "og:image:url"] {
        og.remove(k);
    }
    (og, image.filter(|i| !i.is_empty()))
}

/// The elements named `name`, in document order.
fn tags<'d, 'a>(dom: &'d tl::VDom<'a>, name: &str) -> Vec<&'d tl::HTMLTag<'a>> {
    let parser = dom.parser();
    dom.query_selector(name).map(|it| it.filter_map(|h| h.get(parser)?.as_tag()).collect()).unwrap_or_default()
}

/// An attribute's value, character references decoded.
fn attr(t: &tl::HTMLTag<'_>, k: &str) -> Option<String> {
    t.attributes().get(k).flatten().map(|b| decode_entities(&b.as_utf8_str()))
}

/// The common character references (`&amp;`, `&lt;`, `&gt;`, `&quot;`, `&apos;`, `&nbsp;`, numeric ones).
pub fn decode_entities(s: &str) -> String {
    if !s.contains('&') {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let end = rest.find(';').filter(|&e| e <= 10);
        let decoded = end.and_then(|e| {
            let name = &rest[1..e];
            let c = match name {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                "nbsp" => Some('\u{a0}'),
                _ => {
                    let n = match name.strip_prefix("#x").or_else(|| name.strip_prefix("#X")) {
                        Some(hex) => u32::from_str_radix(hex, 16).ok(),
                        None => name.strip_prefix('#').and_then(|d| d.parse().ok()),
                    };
                    n.and_then(char::from_u32)
                }
            };
            c.map(|c| (c, e))
        });
        match decoded {
            Some((c, e)) => {
                out.push(c);
                rest = &rest[e + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn shorten(s: &str) -> String {
    match s.char_indices().nth(MAX_TEXT_CHARS) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// Stores a fetched image in the media repository and describes it: `og:image` (`mxc://`), `og:image:type`,
/// `matrix:image:size` and, when its header tells, `og:image:width`/`og:image:height`.
async fn store_image(s: &AppState, file: &Fetched, og: &mut Map<String, Value>) -> Result<()> {
    let origin = s.identity.server_name.to_string();
    let media_id = crate::util::random_string(24);
    let row = super::MediaRow {
        origin: origin.clone(),
        media_id: media_id.clone(),
        uploader: None,
        content_type: Some(file.content_type.clone()),
        filename: None,
        size: None,
        created_ts: now_ms(),
        authenticated: s.config.media.freeze_legacy,
    };
    let body = axum::body::Body::from(file.body.clone());
    super::store_upload(s, row, &axum::http::HeaderMap::new(), body, false).await?;
    og.insert("og:image".into(), json!(format!("mxc://{origin}/{media_id}")));
    og.insert("og:image:type".into(), json!(file.content_type));
    og.insert("matrix:image:size".into(), json!(file.body.len()));
    let dims = image::ImageReader::new(std::io::Cursor::new(&file.body[..]))
        .with_guessed_format()
        .ok()
        .and_then(|r| r.into_dimensions().ok());
    if let Some((w, h)) = dims {
        og.insert("og:image:width".into(), json!(w));
        og.insert("og:image:height".into(), json!(h));
    }
    Ok(())
}

/// The address blocks `media.preview_allow_private_ips` lists (validated at start-up).
fn allowed_blocks(list: &[String]) -> Arc<Vec<Cidr>> {
    Arc::new(list.iter().filter_map(|c| Cidr::parse(c)).collect())
}

/// Whether previews may connect to `ip`: any public address, and private ones the operator allowed.
pub fn address_allowed(ip: IpAddr, allow: &[Cidr]) -> bool {
    !crate::federation::client::is_private(ip) || allow.iter().any(|c| c.contains(ip))
}

/// The marker of a refusal (found again in reqwest's error chain).
const REFUSED: &str = "refused: not a public address (media.preview_allow_private_ips)";

/// Resolves host names for previews, keeping only the addresses [`address_allowed`] accepts: every connection,
/// redirects' included, goes through it, so a name cannot be pointed at an internal service.
struct GuardedResolver {
    allow: Arc<Vec<Cidr>>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow = self.allow.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let ok: Vec<SocketAddr> = all.into_iter().filter(|a| address_allowed(a.ip(), &allow)).collect();
            if ok.is_empty() {
                return Err(format!("{host}: {REFUSED}").into());
            }
            Ok(Box::new(ok.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

fn client(allow: Arc<Vec<Cidr>>) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .dns_resolver(Arc::new(GuardedResolver { allow }))
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .timeout(FETCH_TIMEOUT)
        .user_agent(concat!("Hearth/", env!("CARGO_PKG_VERSION"), " (link preview)"))
        .build()
        .map_err(|e| Error::internal(format!("preview client: {e}")))
}

/// A fetched document.
struct Fetched {
    /// Where it was found (after redirects): relative links are resolved against it.
    url: Url,
    /// Lower case, without parameters (`text/html`).
    content_type: String,
    body: Vec<u8>,
}

/// GETs `url`, following redirects by hand (each hop's scheme and IP literal checked; names go through the
/// guarded resolver). At most `cap` bytes are read: beyond, a document is cut there when `truncate` (HTML: the
/// head comes first) and refused otherwise.
async fn fetch(client: &reqwest::Client, allow: &[Cidr], mut url: Url, cap: usize, truncate: bool) -> Result<Fetched> {
    for _ in 0..=MAX_REDIRECTS {
        check_target(&url, allow)?;
        let res = client.get(url.clone()).send().await.map_err(fetch_error)?;
        if res.status().is_redirection() {
            let location = res
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .ok_or_else(|| Error::bad_gateway("redirect without a location"))?;
            url = url.join(location).map_err(|_| Error::bad_gateway("redirect to an invalid URL"))?;
            continue;
        }
        if !res.status().is_success() {
            return Err(Error::bad_gateway(format!("the page answered {}", res.status())));
        }
        if !truncate && res.content_length().is_some_and(|n| n > cap as u64) {
            return Err(Error::too_large("the file is too large to preview"));
        }
        let content_type = res
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
            .unwrap_or_default();
        let mut body = Vec::new();
        let mut res = res;
        while let Some(chunk) = res.chunk().await.map_err(fetch_error)? {
            if body.len() + chunk.len() > cap {
                if !truncate {
                    return Err(Error::too_large("the file is too large to preview"));
                }
                body.extend_from_slice(&chunk[..cap - body.len()]);
                break;
            }
            body.extend_from_slice(&chunk);
        }
        return Ok(Fetched { url, content_type, body });
    }
    Err(Error::bad_gateway("too many redirects"))
}

/// An http(s) URL whose host, when an IP literal, is one previews may connect to.
fn check_target(url: &Url, allow: &[Cidr]) -> Result<()> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Error::forbidden("only http and https URLs can be previewed"));
    }
    let host = url.host_str().ok_or_else(|| Error::invalid_param("the URL has no host"))?;
    let ip = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().ok();
    if ip.is_some_and(|ip| !address_allowed(ip, allow)) {
        return Err(Error::forbidden(format!("{}: {REFUSED}", url.host_str().unwrap_or(""))));
    }
    Ok(())
}

/// A failed request: refused addresses are 403, the rest 502.
fn fetch_error(e: reqwest::Error) -> Error {
    let mut source: Option<&dyn std::error::Error> = Some(&e);
    while let Some(err) = source {
        if err.to_string().contains(REFUSED) {
            return Error::forbidden(err.to_string());
        }
        source = err.source();
    }
    if e.is_timeout() {
        return Error::bad_gateway("fetching the page timed out");
    }
    Error::bad_gateway(format!("could not fetch the page: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_graph_tags_with_fallbacks() {
        let html = r#"<html><head><title>Fallback</title>
            <meta property="og:title" content="The Rock"><meta property="og:type" content="video.movie">
            <meta name="og:url" content="http://example.com/rock"><meta property="og:image" content="rock.png">
            <meta property="og:image:width" content="9999"><meta name="description" content="About a rock">
            </head><body><img src="other.png"><p>unclosed<div></body></html>"#;
        let (og, image) = open_graph(html);
        assert_eq!(og.get("og:title"), Some(&json!("The Rock")));
        assert_eq!(og.get("og:type"), Some(&json!("video.movie")));
        assert_eq!(og.get("og:url"), Some(&json!("http://example.com/rock")));
        assert_eq!(og.get("og:description"), Some(&json!("About a rock")));
        assert_eq!(og.get("og:image:width"), None, "the page's claims about its image are not passed on");
        assert_eq!(image.as_deref(), Some("rock.png"));

        let (og, image) = open_graph("<title> Just a title </title><img src='/a.jpg'>");
        assert_eq!(og, serde_json::from_value::<Map<String, Value>>(json!({"og:title": "Just a title"})).unwrap());
        assert_eq!(image.as_deref(), Some("/a.jpg"));
        let long = format!("<meta property='og:description' content='{}'>", "x".repeat(2000));
        let (og, _) = open_graph(&long);
        assert_eq!(og["og:description"].as_str().unwrap().chars().count(), MAX_TEXT_CHARS + 1);
        let (og, _) = open_graph("<meta property='og:title' content='Tom &amp; Jerry &#39;&#x41;&lt;'>");
        assert_eq!(og["og:title"], "Tom & Jerry 'A<");
        assert_eq!(decode_entities("a & b &bogus; &#xZZ;"), "a & b &bogus; &#xZZ;");
    }

    #[test]
    fn private_addresses_are_refused_unless_allowed() {
        let allow = vec![Cidr::parse("127.0.0.0/8").unwrap()];
        for ip in ["10.0.0.1", "192.168.1.1", "169.254.169.254", "::1", "fe80::1", "127.0.0.1", "0.0.0.0"] {
            assert!(!address_allowed(ip.parse().unwrap(), &[]), "{ip}");
        }
        assert!(address_allowed("93.184.216.34".parse().unwrap(), &[]));
        assert!(address_allowed("127.0.0.1".parse().unwrap(), &allow));
        assert!(!address_allowed("10.0.0.1".parse().unwrap(), &allow));
        assert!(check_target(&Url::parse("http://169.254.169.254/latest").unwrap(), &allow).is_err());
        assert!(check_target(&Url::parse("http://[::1]:8080/").unwrap(), &allow).is_err());
        assert!(check_target(&Url::parse("http://127.0.0.1:8080/").unwrap(), &allow).is_ok());
        assert!(check_target(&Url::parse("ftp://example.com/").unwrap(), &allow).is_err());
    }
}
