//! Configuration: built-in defaults <- TOML file <- `HEARTH_*` environment (`__` nests).
//!
//! Loaded and validated once at start; unknown keys and bad values stop the start with a message naming the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The server name: the part after the `:` in user ids. Cannot change once users exist. No default: the server
    /// refuses to start without it (`--server-name` on the command line also sets it).
    pub server_name: String,
    pub listen: Listen,
    pub database: Database,
    pub registration: Registration,
    pub limits: Limits,
    pub federation: Federation,
    pub jobs: Jobs,
    pub media: Media,
    pub log: Log,
    pub metrics: Metrics,
    pub presence: Presence,
    pub well_known: WellKnown,
    pub rooms: Rooms,
    pub push: Push,
    pub appservice: Appservice,
}

/// Rooms created here.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Rooms {
    /// The room version of new rooms when the client names none (and the default `/capabilities` reports), as
    /// Synapse's `default_room_version`. The spec says servers should use 12; an older one only helps where other
    /// servers or tools cannot handle 12 yet. `"11"` or `11` (an environment variable's `11` reads as a number).
    #[serde(deserialize_with = "string_or_number")]
    pub default_version: String,
}

/// A string, or a number taken as its decimal text.
fn string_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Text {
        String(String),
        Number(u64),
    }
    Ok(match Text::deserialize(d)? {
        Text::String(s) => s,
        Text::Number(n) => n.to_string(),
    })
}

impl Default for Rooms {
    fn default() -> Self {
        Rooms { default_version: DEFAULT_ROOM_VERSION.into() }
    }
}

/// The room version new rooms get by default (the spec's recommendation).
pub const DEFAULT_ROOM_VERSION: &str = "12";

/// The room versions Hearth creates: "1" to this one (`room::version::CREATABLE` checks that it agrees).
pub const NEWEST_ROOM_VERSION: u32 = 12;

/// Push notifications to push gateways (HTTP pushers).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Push {
    /// Allow gateways on loopback and private addresses (off by default: SSRF protection; labs and tests).
    pub allow_private_gateways: bool,
    /// Gateway hosts allowed even when they resolve to private addresses (labs: e.g. `["sygnal.lab"]`).
    pub allowed_gateway_hosts: Vec<String>,
    /// At most this many notifications wait per pusher (a gateway down for long loses the oldest).
    pub max_queued_per_pusher: u32,
    /// Backoff after a failed delivery: this many milliseconds times 2^(failures-1), at most an hour.
    pub retry_base_ms: u64,
}

impl Default for Push {
    fn default() -> Self {
        Push {
            allow_private_gateways: false,
            allowed_gateway_hosts: Vec::new(),
            max_queued_per_pusher: 1000,
            retry_base_ms: 1000,
        }
    }
}

/// Application services (bridges).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Appservice {
    /// Registration files (the standard YAML a bridge generates), one per application service. Read at start: a
    /// broken file, a duplicate id or token or an invalid regex stops the start. Env:
    /// `HEARTH_APPSERVICE__REGISTRATION_FILES='["/etc/hearth/bridges/irc.yaml"]'`.
    pub registration_files: Vec<PathBuf>,
    /// Backoff after a failed transaction to an application service: this many milliseconds times 2^(failures-1),
    /// at most `retry_max_ms`.
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    /// Allow application services to be reached on loopback and private addresses (on by default: bridges
    /// usually run on the same machine; their URLs come from the operator's registration files).
    pub allow_private_urls: bool,
}

impl Default for Appservice {
    fn default() -> Self {
        Appservice {
            registration_files: Vec::new(),
            retry_base_ms: 1000,
            retry_max_ms: 300_000,
            allow_private_urls: true,
        }
    }
}

/// Presence (online / unavailable / offline and status messages), as Synapse's `use_presence`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Presence {
    /// Track presence, show it in `/sync` to users sharing a room and exchange it with other servers. Off: everyone
    /// reads as offline and presence updates are accepted and dropped.
    pub enabled: bool,
}

impl Default for Presence {
    fn default() -> Self {
        Presence { enabled: true }
    }
}

/// What `/.well-known/matrix/{client,server}` answer (delegation and client discovery).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct WellKnown {
    /// Public base URL of the client API, e.g. `https://matrix.example.org` (what clients should use: behind a
    /// reverse proxy, the proxy's URL). Unset: `/.well-known/matrix/client` answers 404 and login answers no
    /// `well_known` (clients keep the URL the user typed).
    pub client_base_url: Option<String>,
    /// `host[:port]` other servers should federate with (`m.server`). Unset: `/.well-known/matrix/server` is 404.
    pub server: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// Client-server API (plain HTTP; put a TLS proxy in front for the internet).
    pub client: SocketAddr,
    /// Server-server API over TLS. Unset: federation listener off.
    pub federation: Option<SocketAddr>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Database {
    pub path: PathBuf,
    /// Reader connections in the pool (the writer is separate).
    pub readers: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Registration {
    pub enabled: bool,
    /// When set, registration requires `m.login.registration_token` with this token (or one made with
    /// `hearth token create`).
    pub token: Option<String>,
    /// Registration requires a token made with `hearth token create` (`m.login.registration_token`).
    pub requires_token: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest accepted request body in bytes (media uploads excluded).
    pub max_request_bytes: usize,
    /// Failed password checks (login and user-interactive auth) allowed per user and per address per minute before
    /// 429 (Synapse's `rc_login.failed_attempts` counts them per user).
    pub login_failures_per_minute: u32,
    /// Password checks (login and user-interactive auth, successful or not) per address: average rate and burst
    /// (Synapse `rc_login.address`).
    pub logins_per_second: f64,
    pub logins_burst: u32,
    /// Accounts registered per address: average rate and burst (Synapse `rc_registration`).
    pub registrations_per_second: f64,
    pub registrations_burst: u32,
    /// Messages (`/send`) a user may send: average rate and burst (Synapse `rc_message`).
    pub messages_per_second: f64,
    pub messages_burst: u32,
    /// Room joins per user, local and remote: average rate and burst (Synapse `rc_joins.local`).
    pub joins_per_second: f64,
    pub joins_burst: u32,
    /// Reverse proxies (addresses or CIDRs, e.g. `10.0.0.0/8`) whose `X-Forwarded-For` names the client (rate
    /// limits by address); requests from other peers are taken by their own address.
    pub trusted_proxies: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Federation {
    pub enabled: bool,
    /// Notary servers used to fetch other servers' keys; empty = fetch only from origins.
    pub trusted_key_servers: Vec<String>,
    /// Verify peers' TLS certificates (turn off only for test labs with self-signed certs).
    pub verify_certificates: bool,
    /// PEM certificate chain and key for the federation listener; generated self-signed when absent.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Joins ask residents for partial state (MSC3706) by default.
    pub lazy_joins: bool,
    /// Allow connecting to loopback and private addresses (off by default: SSRF protection; tests turn it on).
    pub allow_private_ips: bool,
    /// Also serve the federation API on the plain client listener (for a TLS-terminating reverse proxy).
    pub serve_on_client_listener: bool,
    /// Static server discovery overrides: `"name" = "host:port"` (labs and tests).
    pub resolve: std::collections::BTreeMap<String, String>,
    /// DNS servers (`ip:port`) asked for the SRV records of server discovery; empty = the system's
    /// (`/etc/resolv.conf`). Host addresses are always looked up through the system resolver.
    pub dns_servers: Vec<SocketAddr>,
    /// Backoff after a failed transaction to a server: this many milliseconds times 2^failures, at most an hour.
    /// 5 s (the first retry after 10 s): a big room holds thousands of servers that are gone for good, and each
    /// attempt costs a signed request (a 100k-member join spent a tenth of its CPU retrying 2000 dead servers
    /// every few seconds with 1 s). Synapse waits 10 minutes; a server that calls us ends its backoff at once.
    pub retry_base_ms: u64,
    /// Peeks of our world-readable rooms by other servers (MSC2444, unstable): how long one lasts unless renewed
    /// (the `renewal_interval` we answer), and how many may run per peeking server and per room.
    pub peek_renewal_ms: u64,
    pub peek_max_per_server: u64,
    pub peek_max_per_room: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Jobs {
    /// Fraction of wall time the background worker may be busy while users' requests keep coming (0.05..=1.0); it
    /// works at full speed whenever none is in flight (`jobs::rest_while`).
    pub duty_cycle: f64,
    /// Target length of one job step in milliseconds. A user's write waits behind at most one step (reads never
    /// do: WAL readers), so this bounds what a resync adds to a send: at 100 ms (Synapse's background updates'
    /// target) the probe's send p90 during a 100k fill was 123-145 ms, at 50 ms 71 ms (bench/PROFILE.md, round 4).
    pub step_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Media {
    /// Folder for uploaded files, cached remote media and thumbnails. Unset: `media/` beside the database.
    pub path: Option<PathBuf>,
    /// Largest upload (and largest remote file fetched) in bytes; bigger ones get 413 `M_TOO_LARGE`.
    pub max_upload_bytes: u64,
    /// Total bytes one local user may have uploaded; 0 = no quota.
    pub user_quota_bytes: u64,
    /// Fetch (and cache) other servers' media when local clients ask for it.
    pub fetch_remote: bool,
    /// Images with more pixels than this (width x height, read from the file's header before anything is decoded)
    /// are not thumbnailed: 413 `M_TOO_LARGE`. Synapse's `max_image_pixels` default (32M).
    pub max_image_pixels: u64,
    /// Memory all thumbnail decodes together may hold, in MiB: each decode reserves what its image needs (from the
    /// header) and waits its turn; an image needing more than the whole budget is refused (413 `M_TOO_LARGE`).
    /// The default suits a 1 GB Raspberry Pi.
    pub thumbnail_memory_mb: u32,
    /// Freeze the legacy unauthenticated media endpoints (`/_matrix/media/{v3,r0,v1}/download|thumbnail`) as the
    /// spec's v1.11 "Authenticated media" asks: media uploaded or fetched from other servers while this is on is
    /// served only through `/_matrix/client/v1/media/*` (the legacy endpoints answer 404 `M_NOT_FOUND`); media
    /// stored before stays reachable through both. As Synapse's `enable_authenticated_media` (default on).
    pub freeze_legacy: bool,
    /// Answer `/preview_url` (link previews): the server fetches the pages users link to (1 MiB of HTML at most,
    /// 10 s) and their Open Graph image. On by default, unlike Synapse's `url_preview_enabled`: Synapse refuses to
    /// enable it without an operator-written IP blacklist, while Hearth always refuses private, loopback and
    /// link-local addresses (after DNS resolution, on every redirect) unless `preview_allow_private_ips` lists them.
    pub url_preview_enabled: bool,
    /// Address blocks (`10.1.0.0/16`, `127.0.0.1`) that link previews may fetch from although they are private,
    /// loopback or link-local. Empty by default.
    pub preview_allow_private_ips: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// tracing filter, e.g. `info` or `hearth=debug,info`.
    pub level: String,
    pub json: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Metrics {
    /// Serve Prometheus metrics at `/metrics` on the client listener (unauthenticated: keep it off the internet).
    pub enabled: bool,
}

impl Default for Listen {
    fn default() -> Self {
        Listen { client: "127.0.0.1:8008".parse().expect("valid literal"), federation: None }
    }
}

impl Default for Database {
    fn default() -> Self {
        Database { path: "hearth.db".into(), readers: 4 }
    }
}

impl Default for Limits {
    fn default() -> Self {
        // Synapse's defaults.
        Limits {
            max_request_bytes: 1 << 20,
            login_failures_per_minute: 5,
            logins_per_second: 0.003,
            logins_burst: 5,
            registrations_per_second: 0.17,
            registrations_burst: 3,
            messages_per_second: 0.2,
            messages_burst: 10,
            joins_per_second: 0.1,
            joins_burst: 10,
            trusted_proxies: vec!["127.0.0.0/8".into(), "::1/128".into()],
        }
    }
}

impl Default for Federation {
    fn default() -> Self {
        Federation {
            enabled: true,
            trusted_key_servers: vec!["matrix.org".into()],
            verify_certificates: true,
            tls_cert: None,
            tls_key: None,
            lazy_joins: true,
            allow_private_ips: false,
            serve_on_client_listener: false,
            resolve: Default::default(),
            dns_servers: Vec::new(),
            retry_base_ms: 5000,
            peek_renewal_ms: 3_600_000,
            peek_max_per_server: 100,
            peek_max_per_room: 1000,
        }
    }
}

impl Default for Jobs {
    fn default() -> Self {
        Jobs { duty_cycle: 0.5, step_ms: 50 }
    }
}

impl Default for Media {
    fn default() -> Self {
        Media {
            path: None,
            max_upload_bytes: 50 << 20,
            user_quota_bytes: 0,
            fetch_remote: true,
            max_image_pixels: 32_000_000,
            thumbnail_memory_mb: 192,
            freeze_legacy: true,
            url_preview_enabled: true,
            preview_allow_private_ips: Vec::new(),
        }
    }
}

impl Media {
    /// The media folder: `media.path`, else `media/` beside the database.
    pub fn dir(&self, database: &Path) -> PathBuf {
        match &self.path {
            Some(p) => p.clone(),
            None => database.parent().map(|d| d.join("media")).unwrap_or_else(|| PathBuf::from("media")),
        }
    }
}

impl Default for Log {
    fn default() -> Self {
        Log { level: "info,ruma_state_res=warn".into(), json: false }
    }
}

impl Config {
    /// Defaults <- `file` (or `./hearth.toml` if present) <- `HEARTH_*` env.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Config> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        match file {
            Some(path) => {
                anyhow::ensure!(path.exists(), "config file {} does not exist", path.display());
                fig = fig.merge(Toml::file(path));
            }
            None if Path::new("hearth.toml").exists() => fig = fig.merge(Toml::file("hearth.toml")),
            None => {}
        }
        fig = fig.merge(Env::prefixed("HEARTH_").split("__"));
        let config: Config = fig.extract().map_err(|e| {
            let msgs: Vec<String> = e.into_iter().map(|e| e.to_string()).collect();
            anyhow::anyhow!("invalid configuration: {}", msgs.join("; "))
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if !self.server_name.is_empty() {
            ruma::ServerName::parse(&self.server_name)
                .map_err(|e| anyhow::anyhow!("invalid configuration: key `server_name`: {e}"))?;
        }
        let level_error = |e: &dyn std::fmt::Display| {
            anyhow::anyhow!("invalid configuration: key `log.level`: {e} (e.g. `info`, `warn` or `info,hearth=debug`)")
        };
        tracing_subscriber::EnvFilter::try_new(&self.log.level).map_err(|e| level_error(&e))?;
        // A bare word is valid filter syntax (a target name at every level) but is almost always a misspelt level.
        const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
        for d in self.log.level.split(',').map(str::trim).filter(|d| !d.is_empty()) {
            if !d.contains(['=', '[', ':']) && !LEVELS.contains(&d.to_ascii_lowercase().as_str()) {
                return Err(level_error(&format!("`{d}` is not a level (trace, debug, info, warn, error, off)")));
            }
        }
        for p in &self.limits.trusted_proxies {
            Cidr::parse(p).ok_or_else(|| {
                anyhow::anyhow!("invalid configuration: key `limits.trusted_proxies`: `{p}` is not an address or CIDR")
            })?;
        }
        for p in &self.media.preview_allow_private_ips {
            Cidr::parse(p).ok_or_else(|| {
                anyhow::anyhow!(
                    "invalid configuration: key `media.preview_allow_private_ips`: `{p}` is not an address or CIDR"
                )
            })?;
        }
        if let Some(url) = &self.well_known.client_base_url {
            anyhow::ensure!(
                (url.starts_with("https://") || url.starts_with("http://")) && url.len() > "https://".len(),
                "invalid configuration: key `well_known.client_base_url`: `{url}` is not an http(s) URL"
            );
        }
        anyhow::ensure!(
            self.limits.max_request_bytes >= 65536,
            "invalid configuration: key `limits.max_request_bytes` must be at least 65536"
        );
        anyhow::ensure!(
            (0.05..=1.0).contains(&self.jobs.duty_cycle),
            "invalid configuration: key `jobs.duty_cycle` must be between 0.05 and 1.0"
        );
        anyhow::ensure!(
            matches!(self.rooms.default_version.parse::<u32>(), Ok(v) if (1..=NEWEST_ROOM_VERSION).contains(&v)),
            "invalid configuration: key `rooms.default_version`: {:?} is not a room version Hearth creates (1 to {NEWEST_ROOM_VERSION})",
            self.rooms.default_version
        );
        anyhow::ensure!(self.database.readers >= 1, "invalid configuration: key `database.readers` must be >= 1");
        for (key, rate, burst) in [
            ("logins", self.limits.logins_per_second, self.limits.logins_burst),
            ("registrations", self.limits.registrations_per_second, self.limits.registrations_burst),
            ("messages", self.limits.messages_per_second, self.limits.messages_burst),
            ("joins", self.limits.joins_per_second, self.limits.joins_burst),
        ] {
            anyhow::ensure!(
                rate > 0.0 && rate.is_finite(),
                "invalid configuration: key `limits.{key}_per_second` must be positive"
            );
            anyhow::ensure!(burst >= 1, "invalid configuration: key `limits.{key}_burst` must be at least 1");
        }
        anyhow::ensure!(
            self.media.max_upload_bytes >= 1,
            "invalid configuration: key `media.max_upload_bytes` must be at least 1"
        );
        anyhow::ensure!(
            self.media.max_image_pixels >= 1,
            "invalid configuration: key `media.max_image_pixels` must be at least 1"
        );
        anyhow::ensure!(
            self.media.thumbnail_memory_mb >= 1,
            "invalid configuration: key `media.thumbnail_memory_mb` must be at least 1"
        );
        if let Some(token) = &self.registration.token {
            anyhow::ensure!(!token.is_empty(), "invalid configuration: key `registration.token` is empty");
        }
        if self.federation.enabled && self.listen.federation.is_some() {
            anyhow::ensure!(
                self.federation.tls_cert.is_some(),
                "invalid configuration: key `federation.tls_cert` must be set when `listen.federation` is"
            );
            anyhow::ensure!(
                self.federation.tls_key.is_some(),
                "invalid configuration: key `federation.tls_key` must be set when `listen.federation` is"
            );
        }
        Ok(())
    }

    /// Checks that need the file system or are only advice, for `hearth config check` (the keys themselves were
    /// validated by [`Config::load`]). Returns (errors, warnings), each naming its key.
    pub fn check_environment(&self) -> (Vec<String>, Vec<String>) {
        let (mut errors, mut warnings) = (Vec::new(), Vec::new());
        if self.federation.enabled && self.listen.federation.is_some() {
            for (key, path) in
                [("federation.tls_cert", &self.federation.tls_cert), ("federation.tls_key", &self.federation.tls_key)]
            {
                if let Some(p) = path {
                    if let Err(e) = std::fs::File::open(p) {
                        errors.push(format!("key `{key}`: cannot read {}: {e}", p.display()));
                    }
                }
            }
        }
        let db_dir = match self.database.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        if !db_dir.is_dir() {
            warnings.push(format!("key `database.path`: folder {} does not exist (yet)", db_dir.display()));
        }
        if self.registration.enabled && self.registration.token.is_none() && !self.registration.requires_token {
            warnings
                .push("key `registration.enabled` is true without `registration.token`: anyone can register".into());
        }
        if self.metrics.enabled && !self.listen.client.ip().is_loopback() {
            warnings.push(format!(
                "key `metrics.enabled`: /metrics is unauthenticated and the client listener {} is not loopback-only; do not proxy /metrics",
                self.listen.client
            ));
        }
        (errors, warnings)
    }
}

impl Config {
    /// The server name is the one key without a default: the server refuses to start without it. `source` names
    /// where the configuration came from (the file to edit).
    pub fn require_server_name(&self, source: &str) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.server_name.is_empty(),
            "no server name: set `server_name = \"example.org\"` (your domain: the part after the `:` in user ids; it \
             cannot change later) in {source}, or pass `--server-name example.org`"
        );
        Ok(())
    }

    /// Whether `X-Forwarded-For` from this peer names the client (`limits.trusted_proxies`).
    pub fn is_trusted_proxy(&self, ip: std::net::IpAddr) -> bool {
        self.limits.trusted_proxies.iter().filter_map(|p| Cidr::parse(p)).any(|c| c.contains(ip))
    }
}

/// Where the configuration came from, for messages: the `-c` file, `./hearth.toml`, or the built-in defaults.
pub fn source_name(file: Option<&Path>) -> String {
    match file {
        Some(f) => f.display().to_string(),
        None if Path::new("hearth.toml").exists() => "./hearth.toml".into(),
        None => "./hearth.toml (not there yet: create it)".into(),
    }
}

/// An address block: `10.0.0.0/8`, `::1/128`, or a plain address (all its bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: std::net::IpAddr,
    bits: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Cidr> {
        let (addr, bits) = match s.trim().split_once('/') {
            Some((a, b)) => (a.parse::<std::net::IpAddr>().ok()?, Some(b.parse::<u8>().ok()?)),
            None => (s.trim().parse().ok()?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let bits = bits.unwrap_or(max);
        (bits <= max).then_some(Cidr { net: addr, bits })
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        // An IPv4 client seen on a dual-stack socket arrives as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        let (a, b, max) = match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(i)) => (u32::from(n) as u128, u32::from(i) as u128, 32),
            (IpAddr::V6(n), IpAddr::V6(i)) => (u128::from(n), u128::from(i), 128),
            _ => return false,
        };
        if self.bits == 0 {
            return true;
        }
        let shift = max - self.bits as u32;
        (a >> shift) == (b >> shift)
    }
}

/// A commented example with every key, printed by `hearth config example`.
pub const EXAMPLE: &str = include_str!("../packaging/hearth.example.toml");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_match_their_block() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.2.3".parse().unwrap()), "v4-mapped");
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        let one = Cidr::parse("192.168.1.5").unwrap();
        assert!(one.contains("192.168.1.5".parse().unwrap()) && !one.contains("192.168.1.6".parse().unwrap()));
        assert!(Cidr::parse("::1/128").unwrap().contains("::1".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains("8.8.8.8".parse().unwrap()));
        assert!(Cidr::parse("fd00::/8").unwrap().contains("fd12::1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "nope", "10.0.0.0/x", "::/129", ""] {
            assert_eq!(Cidr::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn bad_log_levels_proxies_and_urls_are_refused() {
        let mut c = Config { server_name: "example.org".into(), ..Config::default() };
        c.validate().unwrap();
        c.log.level = "info,hearth=loud".into();
        assert!(c.validate().unwrap_err().to_string().contains("log.level"));
        c.log.level = "warn".into();
        c.limits.trusted_proxies = vec!["10.0.0.0/99".into()];
        assert!(c.validate().unwrap_err().to_string().contains("limits.trusted_proxies"));
        c.limits.trusted_proxies = vec![];
        c.well_known.client_base_url = Some("matrix.example.org".into());
        assert!(c.validate().unwrap_err().to_string().contains("well_known.client_base_url"));
        c.server_name = String::new();
        c.well_known.client_base_url = None;
        c.validate().unwrap();
        assert!(c.require_server_name("x.toml").unwrap_err().to_string().contains("x.toml"));
    }
}
