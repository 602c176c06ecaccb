//! Outbound federation requests: server discovery, TLS, and `X-Matrix` request signing.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ruma::canonical_json::{CanonicalJsonObject, CanonicalJsonValue};
use serde_json::Value;

use crate::config::Federation as FedConfig;
use crate::error::{Error, Result};
use crate::room::Identity;

/// Where a server name's federation API lives.
#[derive(Clone, Debug)]
struct Target {
    base_url: String,
    host_header: String,
    expires: Instant,
}

/// Largest answer to a federation request read into memory (a bigger one fails as [`FedError::TooLarge`]).
pub const MAX_RESPONSE_BYTES: u64 = 50 << 20;
/// Largest answer streamed to disk by [`FedClient::get_to_file`] (`/state` of a very large room).
pub const MAX_FILE_BYTES: u64 = 1 << 30;
/// Error bodies and `.well-known/matrix/server` answers are small; more than this is not read.
const MAX_SMALL_BYTES: u64 = 64 << 10;
/// Redirects followed when fetching `.well-known/matrix/server` (federation requests follow none).
const MAX_WELL_KNOWN_REDIRECTS: usize = 5;

pub struct FedClient {
    /// Federation requests: no redirects, private addresses refused by the resolver.
    http: reqwest::Client,
    /// `.well-known` lookups: a few https redirects, each checked like the first hop.
    well_known_http: reqwest::Client,
    identity: Arc<Identity>,
    config: FedConfig,
    targets: Mutex<HashMap<String, Target>>,
    max_response: AtomicU64,
    max_file: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum FedError {
    #[error("{destination} answered {status}: {body}")]
    Status { destination: String, status: u16, body: Value },
    #[error("could not reach {destination}: {reason}")]
    Unreachable { destination: String, reason: String },
    #[error("{destination} answered with more than {limit} bytes")]
    TooLarge { destination: String, limit: u64 },
}

impl FedError {
    pub fn errcode(&self) -> Option<&str> {
        match self {
            FedError::Status { body, .. } => body.get("errcode").and_then(Value::as_str),
            _ => None,
        }
    }
    pub fn status(&self) -> Option<u16> {
        match self {
            FedError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

impl From<FedError> for Error {
    fn from(e: FedError) -> Self {
        match &e {
            FedError::Status { status, body, .. } if (400..500).contains(status) => {
                let code = body.get("errcode").and_then(Value::as_str).unwrap_or("M_UNKNOWN");
                let code: &'static str = match code {
                    "M_FORBIDDEN" => "M_FORBIDDEN",
                    "M_NOT_FOUND" => "M_NOT_FOUND",
                    "M_INCOMPATIBLE_ROOM_VERSION" => "M_INCOMPATIBLE_ROOM_VERSION",
                    "M_UNABLE_DUE_TO_PARTIAL_STATE" => "M_UNABLE_DUE_TO_PARTIAL_STATE",
                    _ => "M_UNKNOWN",
                };
                let status = axum::http::StatusCode::from_u16(*status).unwrap_or(axum::http::StatusCode::BAD_GATEWAY);
                Error::matrix(status, code, format!("remote server: {e}"))
            }
            _ => Error::matrix(axum::http::StatusCode::BAD_GATEWAY, "M_UNKNOWN", e.to_string()),
        }
    }
}

/// Loopback, private, link-local, shared (CGNAT), unspecified, broadcast, multicast and reserved addresses: never
/// federation peers unless `federation.allow_private_ips` (SSRF protection).
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || o[0] == 0
                || o[0] >= 240
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || (o[0] == 198 && (o[1] & 0xfe) == 18)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_private(IpAddr::V4(v4));
            }
            let s0 = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s0 & 0xfe00) == 0xfc00
                || (s0 & 0xffc0) == 0xfe80
                // NAT64 (64:ff9b::/96) and IPv4-compatible addresses carry an IPv4 address: judge that one.
                || (v6.segments()[..6] == [0x64, 0xff9b, 0, 0, 0, 0] || v6.segments()[..6] == [0; 6])
                    && is_private(IpAddr::V4(std::net::Ipv4Addr::from((u32::from(v6.segments()[6]) << 16) | u32::from(v6.segments()[7]))))
        }
    }
}

/// The host of a URL as an IP address, if it is an IP literal.
fn ip_literal(host: &str) -> Option<IpAddr> {
    host.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

/// Resolves names for the federation clients, dropping private addresses unless they are allowed: every
/// connection (discovery, `.well-known` redirects, requests) goes through it, so a name cannot be pointed at
/// an internal service, even by a DNS answer that changes between a check and the connection. IP literals do
/// not reach a resolver: they are checked where they appear (targets, redirects).
struct GuardedResolver {
    allow_private: bool,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow = self.allow_private;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let n = all.len();
            let ok: Vec<SocketAddr> = all.into_iter().filter(|a| allow || !is_private(a.ip())).collect();
            if ok.is_empty() {
                let msg = if n == 0 {
                    format!("{host} has no addresses")
                } else {
                    format!("{host} resolves only to private addresses (federation.allow_private_ips = false)")
                };
                return Err(msg.into());
            }
            Ok(Box::new(ok.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// An error with its causes ("error sending request: client error (Connect): ... resolves only to private
/// addresses"): reqwest's own message leaves out why.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !out.contains(&m) {
            out.push_str(": ");
            out.push_str(&m);
        }
        cur = c.source();
    }
    out
}

/// Why reading an answer's body stopped.
enum ReadError {
    TooLarge,
    Failed(String),
}

/// Reads a whole answer, refusing (without reading further) one over `max` bytes.
async fn read_capped(res: &mut reqwest::Response, max: u64) -> Result<bytes::Bytes, ReadError> {
    if res.content_length().is_some_and(|n| n > max) {
        return Err(ReadError::TooLarge);
    }
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = res.chunk().await.map_err(|e| ReadError::Failed(error_chain(&e)))? {
        if (body.len() + chunk.len()) as u64 > max {
            return Err(ReadError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// The JSON of an error answer (at most [`MAX_SMALL_BYTES`] read; `Null` if it is not JSON).
async fn error_body(mut res: reqwest::Response) -> Value {
    match read_capped(&mut res, MAX_SMALL_BYTES).await {
        Ok(b) => serde_json::from_slice(&b)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&b[..b.len().min(500)]).into_owned())),
        Err(_) => Value::Null,
    }
}

/// Splits `host[:port]` (IPv6 literals in brackets).
fn split_host_port(name: &str) -> (String, Option<u16>) {
    if let Some(rest) = name.strip_prefix('[') {
        if let Some((host, after)) = rest.split_once(']') {
            return (host.to_owned(), after.strip_prefix(':').and_then(|p| p.parse().ok()));
        }
    }
    match name.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h.to_owned(), p.parse().ok()),
        _ => (name.to_owned(), None),
    }
}

fn url_host(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

impl FedClient {
    pub fn new(identity: Arc<Identity>, config: FedConfig) -> anyhow::Result<FedClient> {
        Self::with_static_dns(identity, config, &[])
    }

    /// Like [`FedClient::new`], with fixed DNS answers for some host names (`name -> address`; port 0 means the
    /// URL's port). These answers stand for public DNS and are not checked against `allow_private_ips`: tests
    /// use them to put a `.well-known` server on loopback while private addresses stay refused for the rest.
    pub fn with_static_dns(
        identity: Arc<Identity>,
        config: FedConfig,
        dns: &[(&str, SocketAddr)],
    ) -> anyhow::Result<FedClient> {
        if !config.verify_certificates {
            tracing::warn!(
                "federation.verify_certificates = false: peers' TLS certificates are NOT verified (test labs only)"
            );
        }
        let allow_private = config.allow_private_ips;
        let builder = || {
            let mut b = reqwest::Client::builder()
                .tls_danger_accept_invalid_certs(!config.verify_certificates)
                .dns_resolver(Arc::new(GuardedResolver { allow_private }))
                .connect_timeout(Duration::from_secs(10))
                .timeout(Duration::from_secs(120))
                .pool_idle_timeout(Duration::from_secs(60))
                .user_agent(concat!("Hearth/", env!("CARGO_PKG_VERSION")));
            for (name, addr) in dns {
                b = b.resolve(name, *addr);
            }
            b
        };
        // Federation endpoints never redirect; following one would let a peer aim our requests anywhere.
        let http = builder().redirect(reqwest::redirect::Policy::none()).build()?;
        let well_known_http = builder()
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= MAX_WELL_KNOWN_REDIRECTS {
                    return attempt.error("too many redirects");
                }
                if attempt.url().scheme() != "https" {
                    return attempt.error("redirect away from https");
                }
                match attempt.url().host_str().and_then(ip_literal) {
                    Some(ip) if !allow_private && is_private(ip) => {
                        let msg =
                            format!("redirect to the private address {ip} (federation.allow_private_ips = false)");
                        attempt.error(msg)
                    }
                    _ => attempt.follow(),
                }
            }))
            .build()?;
        Ok(FedClient {
            http,
            well_known_http,
            identity,
            config,
            targets: Mutex::new(HashMap::new()),
            max_response: AtomicU64::new(MAX_RESPONSE_BYTES),
            max_file: AtomicU64::new(MAX_FILE_BYTES),
        })
    }

    /// The cap for answers streamed to disk (also used for full `send_join` answers).
    pub fn file_cap(&self) -> u64 {
        self.max_file.load(Ordering::Relaxed)
    }

    /// Changes the answer size caps ([`MAX_RESPONSE_BYTES`], [`MAX_FILE_BYTES`]); tests lower them.
    pub fn set_size_caps(&self, response_bytes: u64, file_bytes: u64) {
        self.max_response.store(response_bytes, Ordering::Relaxed);
        self.max_file.store(file_bytes, Ordering::Relaxed);
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Server discovery (spec order): static override, IP literal, explicit port, `.well-known`, port 8448.
    /// SRV lookups are not done yet (no DNS resolver dependency); delegated names with ports work.
    async fn target(&self, server_name: &str) -> Result<Target, FedError> {
        if let Some(t) = self.targets.lock().unwrap_or_else(|e| e.into_inner()).get(server_name) {
            if t.expires > Instant::now() {
                return Ok(t.clone());
            }
        }
        let unreachable = |reason: String| FedError::Unreachable { destination: server_name.to_owned(), reason };
        let target = if let Some(addr) = self.config.resolve.get(server_name) {
            Target { base_url: format!("https://{addr}"), host_header: server_name.to_owned(), expires: far() }
        } else {
            let (host, port) = split_host_port(server_name);
            if host.parse::<IpAddr>().is_ok() || port.is_some() {
                Target {
                    base_url: format!("https://{}:{}", url_host(&host), port.unwrap_or(8448)),
                    host_header: server_name.to_owned(),
                    expires: hours(24),
                }
            } else {
                match self.well_known(&host).await {
                    Some(delegated) => {
                        let (dh, dp) = split_host_port(&delegated);
                        Target {
                            base_url: format!("https://{}:{}", url_host(&dh), dp.unwrap_or(8448)),
                            host_header: delegated.clone(),
                            expires: hours(24),
                        }
                    }
                    None => Target {
                        base_url: format!("https://{host}:8448"),
                        host_header: host.clone(),
                        expires: hours(1),
                    },
                }
            }
        };
        self.check_address(&target).await.map_err(unreachable)?;
        self.targets.lock().unwrap_or_else(|e| e.into_inner()).insert(server_name.to_owned(), target.clone());
        Ok(target)
    }

    async fn well_known(&self, host: &str) -> Option<String> {
        let url = format!("https://{host}/.well-known/matrix/server");
        let mut res = match self.well_known_http.get(url).timeout(Duration::from_secs(10)).send().await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(host, error = %error_chain(&e), "no .well-known/matrix/server");
                return None;
            }
        };
        if !res.status().is_success() {
            return None;
        }
        let bytes = read_capped(&mut res, MAX_SMALL_BYTES).await.ok()?;
        let v: Value = serde_json::from_slice(&bytes).ok()?;
        v.get("m.server").and_then(Value::as_str).map(str::to_owned)
    }

    /// Refuses loopback and private IP literals unless `federation.allow_private_ips`. Host names are checked
    /// when they are resolved, on every connection ([`GuardedResolver`]).
    async fn check_address(&self, target: &Target) -> Result<(), String> {
        if self.config.allow_private_ips {
            return Ok(());
        }
        let hostport = target.base_url.trim_start_matches("https://");
        let (host, _) = split_host_port(hostport);
        match ip_literal(&host) {
            Some(ip) if is_private(ip) => {
                Err(format!("{ip} is a private address (federation.allow_private_ips = false)"))
            }
            _ => Ok(()),
        }
    }

    /// The `Authorization: X-Matrix ...` header for a request.
    pub fn x_matrix(&self, method: &str, uri: &str, destination: &str, content: Option<&Value>) -> Result<String> {
        let mut obj = CanonicalJsonObject::new();
        obj.insert("method".into(), CanonicalJsonValue::String(method.to_owned()));
        obj.insert("uri".into(), CanonicalJsonValue::String(uri.to_owned()));
        obj.insert("origin".into(), CanonicalJsonValue::String(self.identity.server_name.to_string()));
        obj.insert("destination".into(), CanonicalJsonValue::String(destination.to_owned()));
        if let Some(c) = content {
            obj.insert(
                "content".into(),
                CanonicalJsonValue::try_from(c.clone()).map_err(|e| Error::internal(e.to_string()))?,
            );
        }
        ruma::signatures::sign_json(self.identity.server_name.as_str(), &self.identity.keypair, &mut obj)
            .map_err(|e| Error::internal(e.to_string()))?;
        let sig = match obj.get("signatures") {
            Some(CanonicalJsonValue::Object(s)) => match s.get(self.identity.server_name.as_str()) {
                Some(CanonicalJsonValue::Object(k)) => match k.get(&self.identity.key_id) {
                    Some(CanonicalJsonValue::String(sig)) => sig.clone(),
                    _ => return Err(Error::internal("no signature produced")),
                },
                _ => return Err(Error::internal("no signature produced")),
            },
            _ => return Err(Error::internal("no signature produced")),
        };
        Ok(format!(
            "X-Matrix origin=\"{}\",destination=\"{}\",key=\"{}\",sig=\"{}\"",
            self.identity.server_name, destination, self.identity.key_id, sig
        ))
    }

    /// A signed federation request; `path_and_query` starts with `/_matrix/`.
    pub async fn request(
        &self,
        method: reqwest::Method,
        destination: &str,
        path_and_query: &str,
        body: Option<&Value>,
    ) -> Result<Value, FedError> {
        self.request_timeout(method, destination, path_and_query, body, Duration::from_secs(120)).await
    }

    pub async fn request_timeout(
        &self,
        method: reqwest::Method,
        destination: &str,
        path_and_query: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<Value, FedError> {
        let limit = self.max_response.load(Ordering::Relaxed);
        self.request_capped(method, destination, path_and_query, body, timeout, limit).await
    }

    /// Like [`FedClient::request_timeout`] with an explicit answer size cap (a full `send_join` of a very large
    /// room is allowed up to the file cap).
    pub async fn request_capped(
        &self,
        method: reqwest::Method,
        destination: &str,
        path_and_query: &str,
        body: Option<&Value>,
        timeout: Duration,
        limit: u64,
    ) -> Result<Value, FedError> {
        let unreachable = |reason: String| FedError::Unreachable { destination: destination.to_owned(), reason };
        if destination == self.identity.server_name.as_str() {
            return Err(unreachable("refusing to send a federation request to ourselves".into()));
        }
        let target = self.target(destination).await?;
        let auth = self
            .x_matrix(method.as_str(), path_and_query, destination, body)
            .map_err(|e| unreachable(e.to_string()))?;
        let mut req = self
            .http
            .request(method, format!("{}{}", target.base_url, path_and_query))
            .header(reqwest::header::AUTHORIZATION, auth)
            .header(reqwest::header::HOST, target.host_header.clone())
            .timeout(timeout);
        if let Some(b) = body {
            req = req.json(b);
        }
        let res = req.send().await.map_err(|e| {
            self.targets.lock().unwrap_or_else(|e| e.into_inner()).remove(destination);
            unreachable(error_chain(&e))
        })?;
        let status = res.status();
        if !status.is_success() {
            return Err(FedError::Status {
                destination: destination.to_owned(),
                status: status.as_u16(),
                body: error_body(res).await,
            });
        }
        let mut res = res;
        let bytes = read_capped(&mut res, limit).await.map_err(|e| match e {
            ReadError::TooLarge => FedError::TooLarge { destination: destination.to_owned(), limit },
            ReadError::Failed(reason) => unreachable(reason),
        })?;
        let value: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes[..bytes.len().min(500)]).into_owned()));
        Ok(value)
    }

    /// A signed GET whose (possibly huge) answer is streamed to `dest` instead of held in memory, up to
    /// [`MAX_FILE_BYTES`] (a longer answer is [`FedError::TooLarge`] and the partial file is removed).
    pub async fn get_to_file(
        &self,
        destination: &str,
        path_and_query: &str,
        dest: &std::path::Path,
    ) -> Result<u64, FedError> {
        use tokio::io::AsyncWriteExt;
        let unreachable = |reason: String| FedError::Unreachable { destination: destination.to_owned(), reason };
        let target = self.target(destination).await?;
        let auth = self.x_matrix("GET", path_and_query, destination, None).map_err(|e| unreachable(e.to_string()))?;
        let mut res = self
            .http
            .get(format!("{}{}", target.base_url, path_and_query))
            .header(reqwest::header::AUTHORIZATION, auth)
            .header(reqwest::header::HOST, target.host_header.clone())
            .timeout(Duration::from_secs(600))
            .send()
            .await
            .map_err(|e| unreachable(error_chain(&e)))?;
        let status = res.status();
        if !status.is_success() {
            return Err(FedError::Status {
                destination: destination.to_owned(),
                status: status.as_u16(),
                body: error_body(res).await,
            });
        }
        let limit = self.max_file.load(Ordering::Relaxed);
        if res.content_length().is_some_and(|n| n > limit) {
            return Err(FedError::TooLarge { destination: destination.to_owned(), limit });
        }
        let mut file = tokio::fs::File::create(dest).await.map_err(|e| unreachable(e.to_string()))?;
        let mut n = 0u64;
        let result = async {
            while let Some(chunk) = res.chunk().await.map_err(|e| unreachable(e.to_string()))? {
                n += chunk.len() as u64;
                if n > limit {
                    return Err(FedError::TooLarge { destination: destination.to_owned(), limit });
                }
                file.write_all(&chunk).await.map_err(|e| unreachable(e.to_string()))?;
            }
            file.flush().await.map_err(|e| unreachable(e.to_string()))
        }
        .await;
        if let Err(e) = result {
            drop(file);
            let _ = tokio::fs::remove_file(dest).await;
            return Err(e);
        }
        Ok(n)
    }

    /// A signed GET answered with raw bytes (media): the response headers and at most `max_bytes` of body.
    /// A longer body is `FedError::Status` 413 `M_TOO_LARGE`.
    pub async fn get_raw(
        &self,
        destination: &str,
        path_and_query: &str,
        max_bytes: u64,
    ) -> Result<(reqwest::header::HeaderMap, bytes::Bytes), FedError> {
        let unreachable = |reason: String| FedError::Unreachable { destination: destination.to_owned(), reason };
        if destination == self.identity.server_name.as_str() {
            return Err(unreachable("refusing to send a federation request to ourselves".into()));
        }
        let target = self.target(destination).await?;
        let auth = self.x_matrix("GET", path_and_query, destination, None).map_err(|e| unreachable(e.to_string()))?;
        let mut res = self
            .http
            .get(format!("{}{}", target.base_url, path_and_query))
            .header(reqwest::header::AUTHORIZATION, auth)
            .header(reqwest::header::HOST, target.host_header.clone())
            .timeout(Duration::from_secs(120))
            .send()
            .await
            .map_err(|e| unreachable(error_chain(&e)))?;
        let status = res.status();
        if !status.is_success() {
            return Err(FedError::Status {
                destination: destination.to_owned(),
                status: status.as_u16(),
                body: error_body(res).await,
            });
        }
        let too_large = || FedError::Status {
            destination: destination.to_owned(),
            status: 413,
            body: serde_json::json!({"errcode": "M_TOO_LARGE", "error": format!("remote answer is over {max_bytes} bytes")}),
        };
        if res.content_length().is_some_and(|n| n > max_bytes) {
            return Err(too_large());
        }
        let headers = res.headers().clone();
        let mut body = bytes::BytesMut::new();
        while let Some(chunk) = res.chunk().await.map_err(|e| unreachable(e.to_string()))? {
            if (body.len() + chunk.len()) as u64 > max_bytes {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok((headers, body.freeze()))
    }

    pub async fn get(&self, destination: &str, path_and_query: &str) -> Result<Value, FedError> {
        self.request(reqwest::Method::GET, destination, path_and_query, None).await
    }

    /// Unsigned GET (key fetches).
    pub async fn get_unsigned(&self, destination: &str, path: &str) -> Result<Value, FedError> {
        let unreachable = |reason: String| FedError::Unreachable { destination: destination.to_owned(), reason };
        let target = self.target(destination).await?;
        let mut res = self
            .http
            .get(format!("{}{}", target.base_url, path))
            .header(reqwest::header::HOST, target.host_header.clone())
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .map_err(|e| unreachable(error_chain(&e)))?;
        let status = res.status();
        if !status.is_success() {
            return Err(FedError::Status {
                destination: destination.to_owned(),
                status: status.as_u16(),
                body: error_body(res).await,
            });
        }
        let limit = self.max_response.load(Ordering::Relaxed);
        let bytes = read_capped(&mut res, limit).await.map_err(|e| match e {
            ReadError::TooLarge => FedError::TooLarge { destination: destination.to_owned(), limit },
            ReadError::Failed(reason) => unreachable(reason),
        })?;
        serde_json::from_slice(&bytes).map_err(|e| unreachable(format!("answer is not JSON: {e}")))
    }
}

fn far() -> Instant {
    Instant::now() + Duration::from_secs(365 * 24 * 3600)
}

fn hours(h: u64) -> Instant {
    Instant::now() + Duration::from_secs(h * 3600)
}

/// Percent-encodes a path segment (room ids, event ids, user ids).
pub fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}
