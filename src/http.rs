//! HTTP plumbing shared by the APIs: the handlers' state ([`Services`]), request extractors (access token, JSON
//! body with limits), rate limiting, user-interactive-auth sessions and per-device lazy-loading memory.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::header;
use axum::http::request::Parts;
use base64::Engine;
use ruma::canonical_json::{CanonicalJsonObject, CanonicalJsonValue};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::watch;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::federation::{parse_x_matrix, tls, FedContext, Federation};
use crate::jobs::Jobs;
use crate::media_repo::MediaRepo;
use crate::metrics::Metrics;
use crate::room::presence::Presence;
use crate::room::typing::Typing;
use crate::room::Identity;
use crate::store::{accounts, Store};

/// Re-exported for the handlers (and the tests and binaries) that name them here.
pub use crate::util::{percent_decode, random_string};

pub type AppState = Arc<Services>;

/// What request handlers and background tasks need. Passed explicitly (axum state), never global.
pub struct Services {
    pub config: Arc<Config>,
    pub store: Store,
    pub identity: Arc<Identity>,
    pub typing: Arc<Typing>,
    pub presence: Arc<Presence>,
    /// Failed password checks (login and user-interactive auth), per user id and per address.
    pub login_limiter: RateLimiter,
    /// Every login attempt, per address.
    pub login_attempt_limiter: RateLimiter,
    /// Accounts created, per address.
    pub registration_limiter: RateLimiter,
    /// `/send`, per user.
    pub message_limiter: RateLimiter,
    /// Joins, per user.
    pub join_limiter: RateLimiter,
    /// Registration token validity checks, per address (against guessing).
    pub token_validity_limiter: RateLimiter,
    pub uia: UiaSessions,
    /// None when `federation.enabled = false`.
    pub federation: Option<Federation>,
    /// The same handles, for the federation layer (which does not know this type).
    pub fed: Arc<FedContext>,
    pub jobs: Jobs,
    /// Client requests being handled right now (long-polling /sync excluded): the job worker runs at full speed
    /// only when this is zero.
    pub busy: std::sync::atomic::AtomicUsize,
    /// Federation requests served, by endpoint (for `/_hearth/admin/v1/stats` and the benchmark).
    pub fed_requests: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    /// Request counts and latencies for `/metrics`.
    pub metrics: Metrics,
    /// Set to true once shutdown begins (listeners stop accepting, long polls end, the job worker stops).
    pub shutdown: watch::Sender<bool>,
    /// The media folder and in-flight remote media fetches.
    pub media: MediaRepo,
    /// The client listener's bound address (differs from the configured one when that used port 0).
    pub client_addr: std::sync::OnceLock<SocketAddr>,
    /// Lazy-loaded member events already sent per device (`include_redundant_members`).
    pub sent_members: SentMembers,
    /// `/hierarchy` walks paused between pages, by `next_batch` token.
    pub hierarchy_sessions: crate::federation::hierarchy::Sessions,
    /// The last `/state` and `/state_ids` answers' state and auth chain (a joiner asks for both).
    pub state_answers: crate::federation::state_answers::StateAnswers,
    /// The registered application services (`[appservice] registration_files`).
    pub appservices: Arc<crate::appservice::Registry>,
}

/// An authenticated local user (from `Authorization: Bearer` or `?access_token=`).
#[derive(Clone, Debug)]
pub struct Auth {
    pub user_id: ruma::OwnedUserId,
    pub device_id: String,
    pub admin: bool,
    pub token: String,
    /// The client's address ([`client_ip`]), for rate limits such as the password checks of user-interactive auth.
    pub ip: String,
    /// Set when the request came with an application service's `as_token` (`user_id` then is its sender or the
    /// user it asserted with `?user_id=`).
    pub appservice: Option<Arc<crate::appservice::AppService>>,
}

impl Auth {
    /// Whether rate limits apply to this requester (not to an application service registered with
    /// `rate_limited: false`).
    pub fn rate_limited(&self) -> bool {
        self.appservice.as_ref().is_none_or(|a| a.rate_limited)
    }
}

/// Whether the request carries an access token at all.
pub fn has_token(parts: &Parts) -> bool {
    token_from(parts).is_some()
}

/// The application service whose `as_token` the request carries, if it carries one.
pub fn appservice_of(parts: &Parts, state: &AppState) -> Option<Arc<crate::appservice::AppService>> {
    token_from(parts).and_then(|t| state.appservices.by_as_token(&t).cloned())
}

/// A query parameter's decoded value (the first one named `key`).
fn query_param(parts: &Parts, key: &str) -> Option<String> {
    parts.uri.query().and_then(|q| {
        q.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k) == key).then(|| percent_decode(v))
        })
    })
}

/// The user (and MSC3202 device) an application service acts as: its sender, or `?user_id=` inside its user
/// namespace, who must be registered (Synapse's rules and errors).
async fn appservice_auth(
    parts: &Parts,
    state: &AppState,
    service: Arc<crate::appservice::AppService>,
    token: String,
) -> Result<Auth> {
    let user_id = query_param(parts, "user_id").unwrap_or_else(|| service.sender.clone());
    if !service.owns_user(&user_id) {
        return Err(Error::matrix(
            axum::http::StatusCode::FORBIDDEN,
            "M_EXCLUSIVE",
            "the application service cannot masquerade as this user (not in its namespace)",
        ));
    }
    let device = if service.msc3202 {
        query_param(parts, "org.matrix.msc3202.device_id").or_else(|| query_param(parts, "device_id"))
    } else {
        None
    };
    let (uid, dev) = (user_id.clone(), device.clone());
    let (user, device_known) = state
        .store
        .read(move |c| {
            let user = accounts::get_user(c, &uid)?;
            let known = match &dev {
                Some(d) => accounts::list_devices(c, &uid)?.iter().any(|x| &x.device_id == d),
                None => true,
            };
            Ok((user, known))
        })
        .await?;
    let Some(user) = user.filter(|u| !u.deactivated) else {
        return Err(Error::forbidden("the application service has not registered this user"));
    };
    if !device_known {
        return Err(Error::matrix(
            axum::http::StatusCode::BAD_REQUEST,
            "M_UNKNOWN_DEVICE",
            "the application service named a device its user does not have",
        ));
    }
    let user_id = ruma::UserId::parse(&user_id).map_err(|_| Error::invalid_param("user_id is not a user id"))?;
    Ok(Auth {
        user_id,
        device_id: device.unwrap_or_default(),
        admin: user.admin,
        token,
        ip: client_ip(parts, &state.config),
        appservice: Some(service),
    })
}

fn token_from(parts: &Parts) -> Option<String> {
    if let Some(h) = parts.headers.get(header::AUTHORIZATION).and_then(|h| h.to_str().ok()) {
        if let Some(t) = h.strip_prefix("Bearer ") {
            return Some(t.trim().to_owned());
        }
    }
    parts.uri.query().and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("access_token=").map(percent_decode)))
}

impl FromRequestParts<AppState> for Auth {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self> {
        let token = token_from(parts).ok_or_else(Error::missing_token)?;
        if let Some(service) = state.appservices.by_as_token(&token) {
            return appservice_auth(parts, state, service.clone(), token).await;
        }
        let t = token.clone();
        let found = state.store.read(move |c| accounts::lookup_token(c, &t)).await?;
        let (user_id, device_id, admin) = found.ok_or_else(Error::unknown_token)?;
        let user_id = ruma::UserId::parse(&user_id).map_err(|e| {
            tracing::error!("stored user id {user_id:?} does not parse: {e}");
            Error::internal("stored user id does not parse")
        })?;
        Ok(Auth { user_id, device_id, admin, token, ip: client_ip(parts, &state.config), appservice: None })
    }
}

/// A verified inbound federation request: the origin server and the JSON body (if any).
pub struct Signed {
    pub origin: String,
    pub body: Option<Value>,
}

impl FromRequest<AppState> for Signed {
    type Rejection = Error;

    async fn from_request(req: Request, s: &AppState) -> Result<Self> {
        let uri = req.uri().path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_default();
        let method = req.method().as_str().to_owned();
        let header = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
            .ok_or_else(|| Error::unauthorized("missing X-Matrix authorization"))?;
        let (origin, destination, key_id, sig) =
            parse_x_matrix(&header).ok_or_else(|| Error::unauthorized("malformed X-Matrix header"))?;
        let ours = s.identity.server_name.as_str();
        if let Some(d) = &destination {
            if d != ours {
                return Err(Error::unauthorized("request is for another destination"));
            }
        }
        ruma::ServerName::parse(&origin).map_err(|_| Error::unauthorized("invalid origin"))?;
        let limit = s.config.limits.max_request_bytes.max(4 << 20);
        let bytes = axum::body::to_bytes(req.into_body(), limit).await.map_err(|e| {
            let e = e.into_inner();
            if tls::is_body_timeout(e.as_ref()) {
                Error::request_timeout("the request body did not arrive in time")
            } else {
                Error::too_large("request body too large")
            }
        })?;
        let body: Option<Value> = if bytes.is_empty() {
            None
        } else {
            Some(serde_json::from_slice(&bytes).map_err(|e| Error::not_json(format!("body is not JSON: {e}")))?)
        };
        let fed = s.federation.as_ref().ok_or_else(|| Error::forbidden("federation is disabled"))?;
        let public =
            fed.keys.server_key(&origin, &key_id).await?.ok_or_else(|| Error::unauthorized("unknown signing key"))?;

        let mut obj = CanonicalJsonObject::new();
        obj.insert("method".into(), CanonicalJsonValue::String(method));
        obj.insert("uri".into(), CanonicalJsonValue::String(uri));
        obj.insert("origin".into(), CanonicalJsonValue::String(origin.clone()));
        obj.insert("destination".into(), CanonicalJsonValue::String(ours.to_owned()));
        if let Some(b) = &body {
            obj.insert(
                "content".into(),
                CanonicalJsonValue::try_from(b.clone()).map_err(|e| Error::bad_json(e.to_string()))?,
            );
        }
        let json =
            ruma::signatures::to_canonical_json_string_for_signing(&obj).map_err(|e| Error::bad_json(e.to_string()))?;
        let sig_bytes = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(sig.trim_end_matches('='))
            .map_err(|_| Error::unauthorized("signature is not base64"))?;
        ruma::signatures::verify_canonical_json_bytes(
            &ruma::SigningKeyAlgorithm::Ed25519,
            &public,
            &sig_bytes,
            json.as_bytes(),
        )
        .map_err(|_| Error::unauthorized("invalid X-Matrix signature"))?;
        // It called us, so it is up: end any backoff of our sends to it (in the background, not on this request).
        let (fed, o) = (s.fed.clone(), origin.clone());
        tokio::spawn(async move { crate::federation::sender::server_is_up(&fed, &o).await });
        Ok(Signed { origin, body })
    }
}

/// Like [`Auth`] but absent tokens are fine (endpoints that work with and without a user).
pub struct MaybeAuth(pub Option<Auth>);

impl FromRequestParts<AppState> for MaybeAuth {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self> {
        if token_from(parts).is_none() {
            return Ok(MaybeAuth(None));
        }
        Auth::from_request_parts(parts, state).await.map(|a| MaybeAuth(Some(a)))
    }
}

/// The client's address (for rate limits keyed by address). Behind a reverse proxy (the peer is one of
/// `limits.trusted_proxies`, loopback by default) that is the last address of `X-Forwarded-For`, which the proxy
/// appends: otherwise every client would share the proxy's address and one client's failed logins would lock out
/// everyone. Other peers' `X-Forwarded-For` is ignored (anyone could send one).
pub fn client_ip(parts: &Parts, config: &Config) -> String {
    let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    if peer.is_some_and(|ip| config.is_trusted_proxy(ip)) {
        let forwarded = parts.headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()).next_back();
        if let Some(ip) =
            forwarded.and_then(|v| v.rsplit(',').next()).and_then(|ip| ip.trim().parse::<std::net::IpAddr>().ok())
        {
            return ip.to_string();
        }
    }
    peer.map(|ip| ip.to_string()).unwrap_or_default()
}

/// A JSON request body: size-limited, `M_NOT_JSON` when it is not JSON, `M_BAD_JSON` when the shape is wrong.
/// An empty body counts as `{}` (several clients send POSTs without a body); any other body must be an object.
pub struct Json<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for Json<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &AppState) -> Result<Self> {
        let limit = state.config.limits.max_request_bytes;
        if let Some(len) =
            req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        {
            if len > limit {
                return Err(Error::too_large(format!("request body is over {limit} bytes")));
            }
        }
        let bytes = axum::body::to_bytes(req.into_body(), limit)
            .await
            .map_err(|_| Error::too_large(format!("request body is over {limit} bytes")))?;
        let value: Value = if bytes.iter().all(u8::is_ascii_whitespace) {
            Value::Object(Default::default())
        } else {
            serde_json::from_slice(&bytes).map_err(|e| Error::not_json(format!("body is not valid JSON: {e}")))?
        };
        // Every JSON request body of the Matrix APIs is an object.
        if !value.is_object() {
            return Err(Error::bad_json("the request body must be a JSON object"));
        }
        serde_json::from_value(value).map(Json).map_err(|e| Error::bad_json(e.to_string()))
    }
}

/// Query string parsed leniently into `T`; bad values give `M_INVALID_PARAM`.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self> {
        let q = parts.uri.query().unwrap_or("");
        serde_urlencoded_lite(q).map(Query).map_err(|e| Error::invalid_param(format!("bad query parameter: {e}")))
    }
}

fn serde_urlencoded_lite<T: DeserializeOwned>(q: &str) -> std::result::Result<T, String> {
    // Repeated keys become arrays only for `not_membership`-style uses; the last value wins otherwise.
    let mut map = serde_json::Map::new();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (percent_decode(k), percent_decode(v));
        let v = Value::String(v);
        map.insert(k, v);
    }
    serde_json::from_value(Value::Object(map)).map_err(|e| e.to_string())
}

/// Deserialises numbers that arrive as query strings.
pub mod qs {
    use serde::{Deserialize, Deserializer};

    pub fn opt_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        // `limit=` is no number (Synapse answers 400 too; schemathesis sent it): absent is the parameter left out.
        match s {
            None => Ok(None),
            Some(s) => s.parse().map(Some).map_err(|e| serde::de::Error::custom(format!("not a number: {s:?} ({e})"))),
        }
    }

    pub fn opt_bool<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        // An empty value is no boolean (Synapse answers 400 too): absent is the parameter left out.
        match s.as_deref() {
            None => Ok(None),
            Some("true") | Some("1") => Ok(Some(true)),
            Some("false") | Some("0") => Ok(Some(false)),
            Some(o) => Err(serde::de::Error::custom(format!("not a boolean: {o}"))),
        }
    }
}

/// Token buckets keyed by a string (user id or address).
pub struct RateLimiter {
    rate_per_sec: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(rate_per_sec: f64, burst: f64) -> RateLimiter {
        RateLimiter { rate_per_sec, burst: burst.max(1.0), buckets: Mutex::new(HashMap::new()) }
    }

    fn refill(&self, key: &str) -> (f64, Instant) {
        let buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let (tokens, at) = buckets.get(key).copied().unwrap_or((self.burst, now));
        ((tokens + now.duration_since(at).as_secs_f64() * self.rate_per_sec).min(self.burst), now)
    }

    /// Err with the wait in ms when `key` has no tokens left; does not consume.
    pub fn check(&self, key: &str) -> std::result::Result<(), u64> {
        let (tokens, _) = self.refill(key);
        if tokens >= 1.0 {
            Ok(())
        } else {
            Err((((1.0 - tokens) / self.rate_per_sec) * 1000.0).ceil() as u64)
        }
    }

    /// Consumes one token (or fails like `check`).
    pub fn take(&self, key: &str) -> std::result::Result<(), u64> {
        let (tokens, now) = self.refill(key);
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() > 100_000 {
            buckets.clear(); // bounded memory under address-spraying
        }
        if tokens >= 1.0 {
            buckets.insert(key.to_owned(), (tokens - 1.0, now));
            Ok(())
        } else {
            buckets.insert(key.to_owned(), (tokens, now));
            Err((((1.0 - tokens) / self.rate_per_sec) * 1000.0).ceil() as u64)
        }
    }
}

/// User-interactive auth sessions: session id -> completed stages (kept in memory for 15 minutes).
#[derive(Default)]
pub struct UiaSessions {
    sessions: Mutex<HashMap<String, (Vec<String>, Instant)>>,
    /// The registration token a session's `m.login.registration_token` stage accepted (one use is counted when
    /// the account is created).
    tokens: Mutex<HashMap<String, String>>,
}

impl UiaSessions {
    pub fn new_session(&self) -> String {
        let id = random_string(24);
        let mut s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        s.retain(|_, (_, t)| t.elapsed() < Duration::from_secs(900));
        s.insert(id.clone(), (Vec::new(), Instant::now()));
        self.tokens.lock().unwrap_or_else(|e| e.into_inner()).retain(|k, _| s.contains_key(k));
        id
    }

    /// Remembers the registration token the session's token stage accepted.
    pub fn set_token(&self, session: &str, token: &str) {
        self.tokens.lock().unwrap_or_else(|e| e.into_inner()).insert(session.to_owned(), token.to_owned());
    }

    pub fn token(&self, session: &str) -> Option<String> {
        self.tokens.lock().unwrap_or_else(|e| e.into_inner()).get(session).cloned()
    }

    pub fn completed(&self, session: &str) -> Option<Vec<String>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner()).get(session).map(|(c, _)| c.clone())
    }

    pub fn complete(&self, session: &str, stage: &str) {
        let mut s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let entry = s.entry(session.to_owned()).or_insert_with(|| (Vec::new(), Instant::now()));
        if !entry.0.iter().any(|x| x == stage) {
            entry.0.push(stage.to_owned());
        }
    }

    pub fn finish(&self, session: &str) {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner()).remove(session);
        self.tokens.lock().unwrap_or_else(|e| e.into_inner()).remove(session);
    }
}

/// Member events already sent to each device by lazy-loading syncs, so `include_redundant_members = false` can
/// leave them out of later incremental syncs. In memory and bounded: after a restart (or an eviction) members are
/// sent again, which the spec allows.
#[derive(Default)]
pub struct SentMembers(std::sync::Mutex<HashMap<(String, String, String), std::collections::HashSet<String>>>);

impl SentMembers {
    /// Filters `state` for one room and device, and remembers the member events that remain.
    pub fn apply(&self, key: (String, String, String), fresh: bool, drop_redundant: bool, state: &mut Vec<Value>) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() > 10_000 {
            map.clear();
        }
        let seen = map.entry(key).or_default();
        if fresh {
            seen.clear();
        }
        state.retain(|e| {
            if e["type"] != "m.room.member" {
                return true;
            }
            let id = e["event_id"].as_str().unwrap_or_default().to_owned();
            let keep = !(drop_redundant && !fresh && seen.contains(&id));
            if keep && seen.len() < 50_000 {
                seen.insert(id);
            }
            keep
        });
    }
}
