//! Application services (bridges): their registrations, read once at start from the YAML files named by
//! `[appservice] registration_files`, and the namespace rules every other part asks (who may assert which user,
//! which user ids and aliases are reserved for a bridge, which events a bridge is interested in).
//!
//! No network and no database here: the client API (`client::appservice`) answers the appservice endpoints and
//! runs the transaction sender; `http.rs` resolves an `as_token` with [`Registry::by_as_token`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

/// One namespace entry of a registration, as written in the file.
#[derive(Debug, Clone, Deserialize)]
struct RawNamespace {
    #[serde(default)]
    exclusive: bool,
    regex: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct RawNamespaces {
    #[serde(default)]
    users: Option<Vec<RawNamespace>>,
    #[serde(default)]
    aliases: Option<Vec<RawNamespace>>,
    #[serde(default)]
    rooms: Option<Vec<RawNamespace>>,
}

/// A registration file (the spec's "Registration" YAML). Unknown keys are allowed: bridges write their own.
#[derive(Debug, Clone, Deserialize)]
struct RawRegistration {
    id: String,
    #[serde(default)]
    url: Option<String>,
    as_token: String,
    hs_token: String,
    sender_localpart: String,
    #[serde(default)]
    namespaces: RawNamespaces,
    #[serde(default)]
    rate_limited: Option<bool>,
    #[serde(default)]
    protocols: Option<Vec<String>>,
    #[serde(default)]
    receive_ephemeral: Option<bool>,
    /// MSC2409's unstable name of `receive_ephemeral`.
    #[serde(default, rename = "de.sorunome.msc2409.push_ephemeral")]
    push_ephemeral: Option<bool>,
    /// MSC3202: device masquerading (and, for encrypted bridges, device lists and key counts).
    #[serde(default, rename = "org.matrix.msc3202")]
    msc3202: Option<bool>,
}

/// A compiled namespace: ids matching `regex` (anchored at the start, as Synapse's `re.match`).
#[derive(Debug, Clone)]
pub struct Namespace {
    pub exclusive: bool,
    pub regex: regex::Regex,
    /// The regex as written in the file.
    pub source: String,
}

impl Namespace {
    pub fn matches(&self, id: &str) -> bool {
        self.regex.is_match(id)
    }
}

/// A registered application service.
#[derive(Debug, Clone)]
pub struct AppService {
    pub id: String,
    /// Where transactions and queries go; None: the service receives no pushes (`url: null`).
    pub url: Option<String>,
    pub as_token: String,
    pub hs_token: String,
    /// `@{sender_localpart}:{server_name}`: the service's own user.
    pub sender: String,
    pub users: Vec<Namespace>,
    pub aliases: Vec<Namespace>,
    pub rooms: Vec<Namespace>,
    /// Requests made with its token are rate-limited (the default).
    pub rate_limited: bool,
    pub protocols: Vec<String>,
    /// MSC2409: also push typing, receipts and presence.
    pub receive_ephemeral: bool,
    /// MSC3202: the service may name a device of its users (`device_id` / `org.matrix.msc3202.device_id`).
    pub msc3202: bool,
    /// The registration file it came from.
    pub file: PathBuf,
}

impl AppService {
    /// Whether the service may act as `user_id`: its own sender or a user in its user namespaces.
    pub fn owns_user(&self, user_id: &str) -> bool {
        user_id == self.sender || self.users.iter().any(|n| n.matches(user_id))
    }

    /// Whether `user_id` is in one of its exclusive user namespaces (or is its sender).
    pub fn owns_user_exclusively(&self, user_id: &str) -> bool {
        user_id == self.sender || self.users.iter().any(|n| n.exclusive && n.matches(user_id))
    }

    pub fn owns_alias(&self, alias: &str) -> bool {
        self.aliases.iter().any(|n| n.matches(alias))
    }

    pub fn owns_alias_exclusively(&self, alias: &str) -> bool {
        self.aliases.iter().any(|n| n.exclusive && n.matches(alias))
    }

    pub fn owns_room(&self, room_id: &str) -> bool {
        self.rooms.iter().any(|n| n.matches(room_id))
    }

    /// Where to reach it: its URL without a trailing slash, or None when it takes no pushes.
    pub fn base_url(&self) -> Option<&str> {
        self.url.as_deref().map(|u| u.trim_end_matches('/')).filter(|u| !u.is_empty())
    }
}

/// Every registered application service, and the HTTP client that reaches them.
#[derive(Debug, Clone)]
pub struct Registry {
    services: Vec<Arc<AppService>>,
    pub http: reqwest::Client,
}

/// The client for transactions, queries and pings: no redirects, bounded waits.
fn http_client() -> anyhow::Result<reqwest::Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Ok(reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(std::time::Duration::from_secs(10))
        .timeout(std::time::Duration::from_secs(60))
        .user_agent(concat!("Hearth/", env!("CARGO_PKG_VERSION")))
        .build()?)
}

impl Registry {
    /// Reads and validates every registration file; an error names the file and the key.
    pub fn load(files: &[PathBuf], server_name: &str) -> anyhow::Result<Registry> {
        let mut services: Vec<Arc<AppService>> = Vec::new();
        for file in files {
            let a = load_file(file, server_name)?;
            for b in &services {
                let clash = |key: &str| {
                    anyhow::anyhow!(
                        "appservice registration {}: key `{key}`: the same as in {} (each application service needs its own)",
                        a.file.display(),
                        b.file.display()
                    )
                };
                if a.id == b.id {
                    return Err(clash("id"));
                }
                if a.as_token == b.as_token || a.as_token == b.hs_token {
                    return Err(clash("as_token"));
                }
                if a.hs_token == b.hs_token || a.hs_token == b.as_token {
                    return Err(clash("hs_token"));
                }
                if a.sender == b.sender {
                    return Err(clash("sender_localpart"));
                }
            }
            services.push(Arc::new(a));
        }
        Ok(Registry { services, http: http_client()? })
    }

    pub fn all(&self) -> &[Arc<AppService>] {
        &self.services
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    pub fn by_as_token(&self, token: &str) -> Option<&Arc<AppService>> {
        self.services.iter().find(|s| constant_time_eq(s.as_token.as_bytes(), token.as_bytes()))
    }

    pub fn by_id(&self, id: &str) -> Option<&Arc<AppService>> {
        self.services.iter().find(|s| s.id == id)
    }

    /// The service that reserves `user_id` exclusively, if one does.
    pub fn exclusive_user_owner(&self, user_id: &str) -> Option<&Arc<AppService>> {
        self.services.iter().find(|s| s.owns_user_exclusively(user_id))
    }

    /// The service that reserves `alias` exclusively, if one does.
    pub fn exclusive_alias_owner(&self, alias: &str) -> Option<&Arc<AppService>> {
        self.services.iter().find(|s| s.owns_alias_exclusively(alias))
    }

    /// The services with `protocol` among their third-party protocols.
    pub fn with_protocol<'a>(&'a self, protocol: &'a str) -> impl Iterator<Item = &'a Arc<AppService>> + 'a {
        self.services.iter().filter(move |s| s.protocols.iter().any(|p| p == protocol))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads one registration file.
pub fn load_file(file: &Path, server_name: &str) -> anyhow::Result<AppService> {
    let name = file.display();
    let text = std::fs::read_to_string(file)
        .map_err(|e| anyhow::anyhow!("appservice registration {name}: cannot read: {e}"))?;
    parse(&text, file, server_name)
}

/// Parses and validates a registration (`file` names it in messages).
pub fn parse(text: &str, file: &Path, server_name: &str) -> anyhow::Result<AppService> {
    let name = file.display();
    let raw: RawRegistration =
        serde_norway::from_str(text).map_err(|e| anyhow::anyhow!("appservice registration {name}: {e}"))?;
    let bad = |key: &str, why: String| anyhow::anyhow!("appservice registration {name}: key `{key}`: {why}");
    for (key, value) in [("id", &raw.id), ("as_token", &raw.as_token), ("hs_token", &raw.hs_token)] {
        if value.trim().is_empty() {
            return Err(bad(key, "must not be empty".into()));
        }
    }
    if raw.as_token == raw.hs_token {
        return Err(bad("hs_token", "must differ from as_token".into()));
    }
    let local = &raw.sender_localpart;
    if local.is_empty()
        || !local.bytes().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'=' | b'-' | b'/' | b'+'))
    {
        return Err(bad("sender_localpart", format!("`{local}` is not a valid user name (a-z, 0-9 and ._=-/+)")));
    }
    let url = raw.url.filter(|u| !u.trim().is_empty() && u != "null");
    if let Some(u) = &url {
        match reqwest::Url::parse(u) {
            Ok(parsed) if matches!(parsed.scheme(), "http" | "https") && parsed.host_str().is_some() => {}
            _ => return Err(bad("url", format!("`{u}` is not an http(s) URL (or null for no pushes)"))),
        }
    }
    let compile = |kind: &str, list: Option<Vec<RawNamespace>>| -> anyhow::Result<Vec<Namespace>> {
        let mut out = Vec::new();
        for (i, n) in list.unwrap_or_default().into_iter().enumerate() {
            let regex = regex::Regex::new(&format!("^(?:{})", n.regex))
                .map_err(|e| bad(&format!("namespaces.{kind}[{i}].regex"), format!("invalid regex: {e}")))?;
            out.push(Namespace { exclusive: n.exclusive, regex, source: n.regex });
        }
        Ok(out)
    };
    Ok(AppService {
        id: raw.id,
        url,
        as_token: raw.as_token,
        hs_token: raw.hs_token,
        sender: format!("@{local}:{server_name}"),
        users: compile("users", raw.namespaces.users)?,
        aliases: compile("aliases", raw.namespaces.aliases)?,
        rooms: compile("rooms", raw.namespaces.rooms)?,
        rate_limited: raw.rate_limited.unwrap_or(true),
        protocols: raw.protocols.unwrap_or_default(),
        receive_ephemeral: raw.receive_ephemeral.or(raw.push_ephemeral).unwrap_or(false),
        msc3202: raw.msc3202.unwrap_or(false),
        file: file.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "id: irc\nurl: http://127.0.0.1:9000\nas_token: a1\nhs_token: h1\nsender_localpart: ircbot\n\
        rate_limited: false\nprotocols: [irc]\nnamespaces:\n  users:\n    - exclusive: true\n      regex: '@irc_.*:hs'\n  \
        aliases:\n    - exclusive: true\n      regex: '#irc_.*'\n  rooms: []\nextra_key: ignored\n";

    #[test]
    fn parses_a_registration_and_its_namespaces() {
        let a = parse(GOOD, Path::new("irc.yaml"), "hs").unwrap();
        assert_eq!(a.sender, "@ircbot:hs");
        assert!(!a.rate_limited && a.protocols == ["irc"]);
        assert!(a.owns_user("@irc_bob:hs") && a.owns_user_exclusively("@ircbot:hs") && !a.owns_user("@bob:hs"));
        assert!(a.owns_alias_exclusively("#irc_x:hs") && !a.owns_alias("#x:hs"));
        assert_eq!(a.base_url(), Some("http://127.0.0.1:9000"));
        let null_url = GOOD.replace("url: http://127.0.0.1:9000", "url: null");
        assert_eq!(parse(&null_url, Path::new("x"), "hs").unwrap().base_url(), None);
    }

    #[test]
    fn broken_files_name_the_file_and_the_key() {
        let err = |text: &str| parse(text, Path::new("/etc/b.yaml"), "hs").unwrap_err().to_string();
        let e = err(&GOOD.replace("'@irc_.*:hs'", "'@irc_(:hs'"));
        assert!(e.contains("/etc/b.yaml") && e.contains("namespaces.users[0].regex"), "{e}");
        let e = err(&GOOD.replace("as_token: a1\n", ""));
        assert!(e.contains("/etc/b.yaml") && e.contains("as_token"), "{e}");
        let e = err("id: [");
        assert!(e.contains("/etc/b.yaml"), "{e}");
        let e = err(&GOOD.replace("sender_localpart: ircbot", "sender_localpart: 'Bad Name'"));
        assert!(e.contains("sender_localpart"), "{e}");
        let e = err(&GOOD.replace("http://127.0.0.1:9000", "ftp://x"));
        assert!(e.contains("`url`"), "{e}");
    }

    #[test]
    fn duplicates_are_refused_naming_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.yaml"), dir.path().join("b.yaml"));
        std::fs::write(&a, GOOD).unwrap();
        std::fs::write(
            &b,
            GOOD.replace("id: irc", "id: other").replace("sender_localpart: ircbot", "sender_localpart: o"),
        )
        .unwrap();
        let e = Registry::load(&[a.clone(), b.clone()], "hs").unwrap_err().to_string();
        assert!(e.contains("b.yaml") && e.contains("as_token") && e.contains("a.yaml"), "{e}");
        std::fs::write(&b, GOOD.replace("a1", "a2").replace("h1", "h2").replace("ircbot", "o")).unwrap();
        let e = Registry::load(&[a.clone(), b.clone()], "hs").unwrap_err().to_string();
        assert!(e.contains("key `id`"), "{e}");
        std::fs::write(
            &b,
            GOOD.replace("id: irc", "id: o").replace("a1", "a2").replace("h1", "h2").replace("ircbot", "o"),
        )
        .unwrap();
        let r = Registry::load(&[a, b], "hs").unwrap();
        assert_eq!(r.by_as_token("a2").unwrap().id, "o");
        assert_eq!(r.exclusive_user_owner("@irc_x:hs").unwrap().id, "irc");
    }
}
