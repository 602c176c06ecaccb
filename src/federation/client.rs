//! Outbound federation requests: server discovery, TLS, and `X-Matrix` request signing.

use std::collections::HashMap;
use std::net::IpAddr;
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

pub struct FedClient {
    http: reqwest::Client,
    identity: Arc<Identity>,
    config: FedConfig,
    targets: Mutex<HashMap<String, Target>>,
}

#[derive(Debug, thiserror::Error)]
pub enum FedError {
    #[error("{destination} answered {status}: {body}")]
    Status { destination: String, status: u16, body: Value },
    #[error("could not reach {destination}: {reason}")]
    Unreachable { destination: String, reason: String },
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

fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_private() || v4.is_link_local() || v4.is_unspecified() || v4.is_broadcast() || v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64,
        IpAddr::V6(v6) => v6.is_loopback() || v6.is_unspecified() || (v6.segments()[0] & 0xfe00) == 0xfc00 || (v6.segments()[0] & 0xffc0) == 0xfe80,
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
    if host.contains(':') { format!("[{host}]") } else { host.to_owned() }
}

impl FedClient {
    pub fn new(identity: Arc<Identity>, config: FedConfig) -> anyhow::Result<FedClient> {
        if !config.verify_certificates {
            tracing::warn!("federation.verify_certificates = false: peers' TLS certificates are NOT verified (test labs only)");
        }
        let http = reqwest::Client::builder()
            .tls_danger_accept_invalid_certs(!config.verify_certificates)
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120))
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("Hearth/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(FedClient { http, identity, config, targets: Mutex::new(HashMap::new()) })
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
                Target { base_url: format!("https://{}:{}", url_host(&host), port.unwrap_or(8448)), host_header: server_name.to_owned(), expires: hours(24) }
            } else {
                match self.well_known(&host).await {
                    Some(delegated) => {
                        let (dh, dp) = split_host_port(&delegated);
                        Target { base_url: format!("https://{}:{}", url_host(&dh), dp.unwrap_or(8448)), host_header: delegated.clone(), expires: hours(24) }
                    }
                    None => Target { base_url: format!("https://{host}:8448"), host_header: host.clone(), expires: hours(1) },
                }
            }
        };
        self.check_address(&target).await.map_err(unreachable)?;
        self.targets.lock().unwrap_or_else(|e| e.into_inner()).insert(server_name.to_owned(), target.clone());
        Ok(target)
    }

    async fn well_known(&self, host: &str) -> Option<String> {
        let url = format!("https://{host}/.well-known/matrix/server");
        let res = self.http.get(url).timeout(Duration::from_secs(10)).send().await.ok()?;
        if !res.status().is_success() {
            return None;
        }
        let v: Value = res.json().await.ok()?;
        v.get("m.server").and_then(Value::as_str).map(str::to_owned)
    }

    /// Refuses loopback and private addresses unless `federation.allow_private_ips`.
    async fn check_address(&self, target: &Target) -> Result<(), String> {
        if self.config.allow_private_ips {
            return Ok(());
        }
        let hostport = target.base_url.trim_start_matches("https://").to_owned();
        let addrs = tokio::net::lookup_host(hostport.clone()).await.map_err(|e| format!("cannot resolve {hostport}: {e}"))?;
        for a in addrs {
            if is_private(a.ip()) {
                return Err(format!("{} is a private address (federation.allow_private_ips = false)", a.ip()));
            }
        }
        Ok(())
    }

    /// The `Authorization: X-Matrix ...` header for a request.
    pub fn x_matrix(&self, method: &str, uri: &str, destination: &str, content: Option<&Value>) -> Result<String> {
        let mut obj = CanonicalJsonObject::new();
        obj.insert("method".into(), CanonicalJsonValue::String(method.to_owned()));
        obj.insert("uri".into(), CanonicalJsonValue::String(uri.to_owned()));
        obj.insert("origin".into(), CanonicalJsonValue::String(self.identity.server_name.to_string()));
        obj.insert("destination".into(), CanonicalJsonValue::String(destination.to_owned()));
        if let Some(c) = content {
            obj.insert("content".into(), CanonicalJsonValue::try_from(c.clone()).map_err(|e| Error::internal(e.to_string()))?);
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
    pub async fn request(&self, method: reqwest::Method, destination: &str, path_and_query: &str, body: Option<&Value>) -> Result<Value, FedError> {
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
        let unreachable = |reason: String| FedError::Unreachable { destination: destination.to_owned(), reason };
        if destination == self.identity.server_name.as_str() {
            return Err(unreachable("refusing to send a federation request to ourselves".into()));
        }
        let target = self.target(destination).await?;
        let auth = self.x_matrix(method.as_str(), path_and_query, destination, body).map_err(|e| unreachable(e.to_string()))?;
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
            unreachable(format!("{e:#}"))
        })?;
        let status = res.status();
        let bytes = res.bytes().await.map_err(|e| unreachable(e.to_string()))?;
        let value: Value = serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes[..bytes.len().min(500)]).into_owned()));
        if !status.is_success() {
            return Err(FedError::Status { destination: destination.to_owned(), status: status.as_u16(), body: value });
        }
        Ok(value)
    }

    /// A signed GET whose (possibly huge) answer is streamed to `dest` instead of held in memory.
    pub async fn get_to_file(&self, destination: &str, path_and_query: &str, dest: &std::path::Path) -> Result<u64, FedError> {
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
            .map_err(|e| unreachable(format!("{e:#}")))?;
        let status = res.status();
        if !status.is_success() {
            let body: Value = res.json().await.unwrap_or(Value::Null);
            return Err(FedError::Status { destination: destination.to_owned(), status: status.as_u16(), body });
        }
        let mut file = tokio::fs::File::create(dest).await.map_err(|e| unreachable(e.to_string()))?;
        let mut n = 0u64;
        while let Some(chunk) = res.chunk().await.map_err(|e| unreachable(e.to_string()))? {
            n += chunk.len() as u64;
            file.write_all(&chunk).await.map_err(|e| unreachable(e.to_string()))?;
        }
        file.flush().await.map_err(|e| unreachable(e.to_string()))?;
        Ok(n)
    }

    /// A signed GET answered with raw bytes (media): the response headers and at most `max_bytes` of body.
    /// A longer body is `FedError::Status` 413 `M_TOO_LARGE`.
    pub async fn get_raw(&self, destination: &str, path_and_query: &str, max_bytes: u64) -> Result<(reqwest::header::HeaderMap, bytes::Bytes), FedError> {
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
            .map_err(|e| unreachable(format!("{e:#}")))?;
        let status = res.status();
        if !status.is_success() {
            let body: Value = res.json().await.unwrap_or(Value::Null);
            return Err(FedError::Status { destination: destination.to_owned(), status: status.as_u16(), body });
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
        let res = self
            .http
            .get(format!("{}{}", target.base_url, path))
            .header(reqwest::header::HOST, target.host_header.clone())
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .map_err(|e| unreachable(format!("{e:#}")))?;
        let status = res.status();
        let value: Value = res.json().await.map_err(|e| unreachable(e.to_string()))?;
        if !status.is_success() {
            return Err(FedError::Status { destination: destination.to_owned(), status: status.as_u16(), body: value });
        }
        Ok(value)
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
