//! Outbound federation requests: server discovery, TLS, and `X-Matrix` request signing.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ruma::canonical_json::{CanonicalJsonObject, CanonicalJsonValue};
use serde_json::Value;

use crate::config::Federation as FedConfig;
use crate::error::{Error, RemoteFailure, Result};
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
/// How many destinations [`FedClient::answered_lately`] remembers (a few hundred KB at most).
const MAX_ANSWERED_REMEMBERED: usize = 10_000;

pub struct FedClient {
    /// Federation requests: no redirects, private addresses refused by the resolver.
    http: reqwest::Client,
    /// `.well-known` lookups: a few https redirects, each checked like the first hop.
    well_known_http: reqwest::Client,
    identity: Arc<Identity>,
    config: FedConfig,
    targets: Mutex<HashMap<String, Target>>,
    /// Destinations that answered our last request to them (any HTTP status), until one fails to connect: the
    /// sender gives them a lane of their own (see [`FedClient::answered_lately`]).
    answered: Mutex<HashSet<String>>,
    /// Destinations that answered a request of ours (other than a transaction) with success since the sender last
    /// looked: their backoff, if any, ends (see [`FedClient::take_succeeded`]).
    succeeded: Mutex<HashSet<String>>,
    /// Server names whose federation endpoint was found by SRV: name -> SRV target (read by the resolver).
    srv_hosts: Arc<Mutex<HashMap<String, String>>>,
    srv: SrvLookup,
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

impl FedError {
    /// The server the request went to.
    pub fn destination(&self) -> &str {
        match self {
            FedError::Status { destination, .. }
            | FedError::Unreachable { destination, .. }
            | FedError::TooLarge { destination, .. } => destination,
        }
    }

    /// For lookups where the remote's 404 means "no such thing" (a room alias): our 404 with `msg`; any other
    /// failure is the remote's (see the `From` conversion).
    pub fn or_not_found(self, msg: &str) -> Error {
        match self.status() {
            Some(404) => Error::not_found(msg),
            _ => self.into(),
        }
    }
}

/// A remote failure becomes our own error ([`crate::error::RemoteFailure`]): its status is never passed through.
impl From<FedError> for Error {
    fn from(e: FedError) -> Self {
        let message = match &e {
            FedError::Status { destination, status, body } => {
                let errcode = body.get("errcode").and_then(Value::as_str).unwrap_or("(no errcode)");
                let text = match body.get("error").and_then(Value::as_str) {
                    Some(t) => t.to_owned(),
                    None if body.is_null() || body.get("errcode").is_some() => String::new(),
                    None => body.to_string(),
                };
                format!("remote server {destination} answered {status} {errcode}: {text}")
                    .trim_end_matches(": ")
                    .to_owned()
            }
            FedError::Unreachable { destination, reason } => {
                format!("could not reach remote server {destination}: {reason}")
            }
            FedError::TooLarge { destination, limit } => {
                format!("remote server {destination} answered with more than {limit} bytes")
            }
        };
        Error::remote(RemoteFailure {
            server: e.destination().to_owned(),
            status: e.status(),
            errcode: e.errcode().map(str::to_owned),
            room_version: match &e {
                FedError::Status { body, .. } => body.get("room_version").and_then(Value::as_str).map(str::to_owned),
                _ => None,
            },
            message,
        })
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
///
/// Server names found through SRV are connected to by their own name (so TLS checks the certificate for it, as
/// the spec wants) with the SRV port in the URL; `srv_hosts` maps such a name to the SRV target whose addresses
/// are used. Only the federation client has entries there; `.well-known` lookups use the name's own addresses.
struct GuardedResolver {
    allow_private: bool,
    /// Fixed answers standing for public DNS (tests): not checked against `allow_private`.
    fixed: Arc<HashMap<String, SocketAddr>>,
    srv_hosts: Arc<Mutex<HashMap<String, String>>>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow = self.allow_private;
        let asked = name.as_str().to_owned();
        let host = self.srv_hosts.lock().unwrap_or_else(|e| e.into_inner()).get(&asked).cloned().unwrap_or(asked);
        let fixed = self.fixed.get(&host).copied();
        Box::pin(async move {
            if let Some(addr) = fixed {
                return Ok(Box::new(std::iter::once(addr)) as reqwest::dns::Addrs);
            }
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

/// A server's SRV record, as chosen for connecting.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SrvTarget {
    host: String,
    port: u16,
    ttl: Duration,
}

/// SRV lookups for server discovery (hickory), built on first use: the system's resolvers, or
/// `federation.dns_servers`.
struct SrvLookup {
    servers: Vec<SocketAddr>,
    resolver: tokio::sync::OnceCell<Option<hickory_resolver::TokioResolver>>,
}

impl SrvLookup {
    fn new(servers: Vec<SocketAddr>) -> SrvLookup {
        SrvLookup { servers, resolver: tokio::sync::OnceCell::new() }
    }

    fn build(&self) -> Option<hickory_resolver::TokioResolver> {
        use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
        use hickory_resolver::net::runtime::TokioRuntimeProvider;
        let mut builder = if self.servers.is_empty() {
            match hickory_resolver::Resolver::builder_tokio() {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "no system DNS configuration: SRV records are not looked up");
                    return None;
                }
            }
        } else {
            let name_servers = self
                .servers
                .iter()
                .map(|a| {
                    let conn = |mut c: ConnectionConfig| {
                        c.port = a.port();
                        c
                    };
                    NameServerConfig::new(
                        a.ip(),
                        true,
                        vec![conn(ConnectionConfig::udp()), conn(ConnectionConfig::tcp())],
                    )
                })
                .collect();
            let config = ResolverConfig::from_parts(None, vec![], name_servers);
            hickory_resolver::Resolver::builder_with_config(config, TokioRuntimeProvider::default())
        };
        let opts = builder.options_mut();
        opts.timeout = Duration::from_secs(5);
        opts.attempts = 2;
        match builder.build() {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(error = %e, "DNS resolver could not be built: SRV records are not looked up");
                None
            }
        }
    }

    /// The SRV target for `hostname`: `_matrix-fed._tcp` first, then the deprecated `_matrix._tcp`; `None` when
    /// neither has a usable record (or DNS fails: discovery then falls back to port 8448).
    async fn lookup(&self, hostname: &str) -> Option<SrvTarget> {
        let resolver = self.resolver.get_or_init(|| async { self.build() }).await.as_ref()?;
        for service in ["_matrix-fed._tcp", "_matrix._tcp"] {
            let name = format!("{service}.{}.", hostname.trim_end_matches('.'));
            match resolver.srv_lookup(name.as_str()).await {
                Ok(lookup) => {
                    let records: Vec<(u16, u16, u16, String, u32)> = lookup
                        .answers()
                        .iter()
                        .filter_map(|r| match &r.data {
                            hickory_resolver::proto::rr::RData::SRV(srv) => {
                                Some((srv.priority, srv.weight, srv.port, srv.target.to_utf8(), r.ttl))
                            }
                            _ => None,
                        })
                        .collect();
                    if let Some(t) = choose_srv(&records, rand::random::<u32>()) {
                        tracing::debug!(hostname, service, target = %t.host, port = t.port, "SRV record");
                        return Some(t);
                    }
                }
                Err(e) => tracing::debug!(hostname, service, error = %e, "no SRV record"),
            }
        }
        None
    }
}

/// Picks the record to connect to (RFC 2782): the lowest priority, and among those a weighted random choice
/// (`roll` is the random number). A target of "." means the service is decidedly not offered there.
fn choose_srv(records: &[(u16, u16, u16, String, u32)], roll: u32) -> Option<SrvTarget> {
    let usable: Vec<_> = records.iter().filter(|r| r.3 != "." && !r.3.is_empty() && r.2 != 0).collect();
    let best = usable.iter().map(|r| r.0).min()?;
    let mut group: Vec<_> = usable.into_iter().filter(|r| r.0 == best).collect();
    // Weight-0 records first, so that they are chosen only when the roll lands on 0.
    group.sort_by_key(|r| r.1);
    let total: u32 = group.iter().map(|r| u32::from(r.1)).sum();
    let pick = if total == 0 { 0 } else { roll % (total + 1) };
    let mut running = 0u32;
    let chosen = group
        .iter()
        .find(|r| {
            running += u32::from(r.1);
            running >= pick
        })
        .unwrap_or(&group[0]);
    Some(SrvTarget {
        host: chosen.3.trim_end_matches('.').to_owned(),
        port: chosen.2,
        ttl: Duration::from_secs(u64::from(chosen.4)),
    })
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
        let fixed: Arc<HashMap<String, SocketAddr>> = Arc::new(dns.iter().map(|(n, a)| (n.to_string(), *a)).collect());
        let srv_hosts: Arc<Mutex<HashMap<String, String>>> = Arc::default();
        let builder = |srv_hosts: Arc<Mutex<HashMap<String, String>>>| {
            let resolver = GuardedResolver { allow_private, fixed: fixed.clone(), srv_hosts };
            reqwest::Client::builder()
                .tls_danger_accept_invalid_certs(!config.verify_certificates)
                .dns_resolver(Arc::new(resolver))
                .connect_timeout(Duration::from_secs(10))
                .timeout(Duration::from_secs(120))
                .pool_idle_timeout(Duration::from_secs(60))
                .user_agent(concat!("Hearth/", env!("CARGO_PKG_VERSION")))
        };
        // Federation endpoints never redirect; following one would let a peer aim our requests anywhere.
        let http = builder(srv_hosts.clone()).redirect(reqwest::redirect::Policy::none()).build()?;
        let well_known_http = builder(Arc::default())
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
            targets: Mutex::new(HashMap::new()),
            answered: Mutex::default(),
            succeeded: Mutex::default(),
            srv_hosts,
            srv: SrvLookup::new(config.dns_servers.clone()),
            config,
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

    /// Whether `destination` answered our last request to it. A fan-out to a big room's servers, most of them
    /// never heard from and many gone, must not queue a message to a server that is talking to us right now
    /// (the resident we just joined through) behind thousands of connection attempts.
    pub fn answered_lately(&self, destination: &str) -> bool {
        self.answered.lock().unwrap_or_else(|e| e.into_inner()).contains(destination)
    }

    /// Notes that `destination` answered (any status: it is up), or called us.
    pub fn heard_from(&self, destination: &str) {
        let mut answered = self.answered.lock().unwrap_or_else(|e| e.into_inner());
        if !answered.contains(destination) {
            // Bounded: a server federating with more servers than this starts the set afresh.
            if answered.len() >= MAX_ANSWERED_REMEMBERED {
                answered.clear();
            }
            answered.insert(destination.to_owned());
        }
    }

    /// Notes an answer of `destination` to a request for `path`: it is up ([`FedClient::heard_from`]), and a success
    /// (other than to a transaction, whose outcome the sender books itself) ends its send backoff at the sender's
    /// next look, as Synapse resets a destination's retry timings on any successful request. A server that came back
    /// on the same address (or a new server given the old one's) and answered our join, say, would else wait out the
    /// backoff before hearing of our events.
    fn answered_with(&self, destination: &str, status: reqwest::StatusCode, path: &str) {
        self.heard_from(destination);
        if status.is_success() && !path.starts_with("/_matrix/federation/v1/send/") {
            let mut ok = self.succeeded.lock().unwrap_or_else(|e| e.into_inner());
            if ok.len() >= MAX_ANSWERED_REMEMBERED {
                ok.clear();
            }
            ok.insert(destination.to_owned());
        }
    }

    /// The destinations [`FedClient::answered_with`] noted since the last call.
    pub fn take_succeeded(&self) -> Vec<String> {
        std::mem::take(&mut *self.succeeded.lock().unwrap_or_else(|e| e.into_inner())).into_iter().collect()
    }

    /// Forgets what we knew of `destination` after a request to it could not be sent: its resolved address (it
    /// may have moved) and that it answers.
    fn lost(&self, destination: &str) {
        self.targets.lock().unwrap_or_else(|e| e.into_inner()).remove(destination);
        self.answered.lock().unwrap_or_else(|e| e.into_inner()).remove(destination);
    }

    /// Server discovery in the spec's order: static override, IP literal, explicit port, `.well-known` (then the
    /// delegated name: IP literal, explicit port, SRV, port 8448), SRV (`_matrix-fed._tcp`, then `_matrix._tcp`),
    /// port 8448.
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
                        if dh.parse::<IpAddr>().is_ok() || dp.is_some() {
                            Target {
                                base_url: format!("https://{}:{}", url_host(&dh), dp.unwrap_or(8448)),
                                host_header: delegated.clone(),
                                expires: hours(24),
                            }
                        } else {
                            self.srv_or_default(&dh, Duration::from_secs(24 * 3600)).await
                        }
                    }
                    None => self.srv_or_default(&host, Duration::from_secs(3600)).await,
                }
            }
        };
        self.check_address(&target).await.map_err(unreachable)?;
        self.targets.lock().unwrap_or_else(|e| e.into_inner()).insert(server_name.to_owned(), target.clone());
        Ok(target)
    }

    /// A host name without a port: its SRV record if it has one (connected to by `hostname`, with the record's
    /// port, at the record target's addresses), else `hostname:8448`. The `Host` header is `hostname` either way.
    async fn srv_or_default(&self, hostname: &str, default_ttl: Duration) -> Target {
        let srv_hosts = |target: Option<String>| {
            let mut map = self.srv_hosts.lock().unwrap_or_else(|e| e.into_inner());
            match target {
                Some(t) => map.insert(hostname.to_owned(), t),
                None => map.remove(hostname),
            };
        };
        match self.srv.lookup(hostname).await {
            Some(srv) => {
                srv_hosts(Some(srv.host.clone()));
                Target {
                    base_url: format!("https://{}:{}", url_host(hostname), srv.port),
                    host_header: hostname.to_owned(),
                    // The record's TTL, within a minute and a day.
                    expires: Instant::now() + srv.ttl.clamp(Duration::from_secs(60), Duration::from_secs(24 * 3600)),
                }
            }
            None => {
                srv_hosts(None);
                Target {
                    base_url: format!("https://{}:8448", url_host(hostname)),
                    host_header: hostname.to_owned(),
                    expires: Instant::now() + default_ttl,
                }
            }
        }
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
            self.lost(destination);
            unreachable(error_chain(&e))
        })?;
        let status = res.status();
        self.answered_with(destination, status, path_and_query);
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
        self.request_to_file(reqwest::Method::GET, destination, path_and_query, None, dest).await
    }

    /// A request whose answer may be huge (a full `send_join`, `/state`): the body goes to `dest` as it arrives, up
    /// to the file cap, and is never held in memory. Returns the bytes written.
    pub async fn request_to_file(
        &self,
        method: reqwest::Method,
        destination: &str,
        path_and_query: &str,
        body: Option<&Value>,
        dest: &std::path::Path,
    ) -> Result<u64, FedError> {
        use tokio::io::AsyncWriteExt;
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
            .timeout(Duration::from_secs(600));
        if let Some(b) = body {
            req = req.json(b);
        }
        let mut res = req.send().await.map_err(|e| {
            self.lost(destination);
            unreachable(error_chain(&e))
        })?;
        let status = res.status();
        self.answered_with(destination, status, path_and_query);
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
        let file = tokio::fs::File::create(dest).await.map_err(|e| unreachable(e.to_string()))?;
        // Written in 1 MiB pieces: each write of a tokio file is a trip to a blocking thread, and the body arrives
        // in pieces of a few KiB (a 100 MB `/state` answer was thousands of trips).
        let mut file = tokio::io::BufWriter::with_capacity(1 << 20, file);
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
        self.answered_with(destination, status, path_and_query);
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

    /// Whether `destination` answers HTTP at all: an unsigned `GET /_matrix/federation/v1/version` (any status
    /// counts as an answer). The sender asks this before building and signing a transaction for a server whose
    /// last ones failed: a big room has thousands of servers that are gone, and a refused connection is then all
    /// a retry costs, not a signed body of up to 50 PDUs.
    pub async fn answers(&self, destination: &str) -> bool {
        if destination == self.identity.server_name.as_str() {
            return false;
        }
        let Ok(target) = self.target(destination).await else { return false };
        let sent = self
            .http
            .get(format!("{}/_matrix/federation/v1/version", target.base_url))
            .header(reqwest::header::HOST, target.host_header.clone())
            .timeout(Duration::from_secs(20))
            .send()
            .await;
        match sent {
            Ok(_) => self.heard_from(destination),
            Err(_) => self.lost(destination),
        }
        sent.is_ok()
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
        self.answered_with(destination, status, path);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(priority: u16, weight: u16, port: u16, target: &str) -> (u16, u16, u16, String, u32) {
        (priority, weight, port, target.to_owned(), 300)
    }

    fn status(status: u16, body: Value) -> FedError {
        FedError::Status { destination: "b.example".into(), status, body }
    }

    #[test]
    fn remote_status_is_not_passed_through() {
        let e: Error = status(404, serde_json::json!({"errcode": "M_NOT_FOUND", "error": "unknown room"})).into();
        assert_eq!((e.status().as_u16(), e.errcode()), (502, "M_UNKNOWN"));
        assert_eq!(e.to_string(), "remote server b.example answered 404 M_NOT_FOUND: unknown room");
        let e: Error = status(500, Value::String("<html>oops</html>".into())).into();
        assert_eq!(
            (e.status().as_u16(), e.to_string().as_str()),
            (502, "remote server b.example answered 500 (no errcode): \"<html>oops</html>\"")
        );
        let e: Error =
            FedError::Unreachable { destination: "b.example".into(), reason: "connection refused".into() }.into();
        assert_eq!(
            (e.status().as_u16(), e.to_string().as_str()),
            (502, "could not reach remote server b.example: connection refused")
        );
        let e: Error = FedError::TooLarge { destination: "b.example".into(), limit: 10 }.into();
        assert_eq!(e.status().as_u16(), 502);
    }

    #[test]
    fn remote_refusals_keep_the_spec_code() {
        let e: Error = status(403, serde_json::json!({"errcode": "M_FORBIDDEN", "error": "banned"})).into();
        assert_eq!((e.status().as_u16(), e.errcode()), (403, "M_FORBIDDEN"));
        let body = serde_json::json!({"errcode": "M_INCOMPATIBLE_ROOM_VERSION", "error": "no", "room_version": "99"});
        let e: Error = status(400, body).into();
        assert_eq!((e.status().as_u16(), e.errcode()), (400, "M_INCOMPATIBLE_ROOM_VERSION"));
    }

    #[test]
    fn a_remote_404_can_mean_not_found() {
        let e = status(404, serde_json::json!({"errcode": "M_NOT_FOUND"})).or_not_found("room alias not found");
        assert_eq!(
            (e.status().as_u16(), e.errcode(), e.to_string().as_str()),
            (404, "M_NOT_FOUND", "M_NOT_FOUND: room alias not found")
        );
        let e = status(500, Value::Null).or_not_found("room alias not found");
        assert_eq!(e.status().as_u16(), 502);
    }

    #[test]
    fn srv_lowest_priority_wins() {
        let records = [rec(10, 0, 1, "b.example."), rec(5, 0, 2, "a.example."), rec(20, 0, 3, "c.example.")];
        for roll in [0, 1, 7, u32::MAX] {
            let t = choose_srv(&records, roll).unwrap();
            assert_eq!((t.host.as_str(), t.port), ("a.example", 2));
        }
    }

    #[test]
    fn srv_weights_share_one_priority() {
        let records = [rec(1, 1, 1, "light.example."), rec(1, 9, 2, "heavy.example."), rec(2, 100, 3, "later.")];
        let heavy = (0..1000u32).filter(|&roll| choose_srv(&records, roll).unwrap().port == 2).count();
        assert!((800..=950).contains(&heavy), "heavy chosen {heavy} times in 1000");
        assert!((0..1000u32).all(|roll| choose_srv(&records, roll).unwrap().port != 3));
    }

    #[test]
    fn srv_dot_target_means_no_service() {
        assert_eq!(choose_srv(&[rec(0, 0, 8448, ".")], 0), None);
        assert_eq!(choose_srv(&[], 0), None);
        assert_eq!(choose_srv(&[rec(0, 0, 8448, "."), rec(1, 0, 443, "ok.example.")], 0).unwrap().port, 443);
    }
}
