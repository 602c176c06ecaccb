//! HTTP plumbing shared by the APIs: router assembly, request extractors (access token, JSON body with limits),
//! rate limiting and user-interactive-auth sessions.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, Method};
use axum::response::IntoResponse;
use axum::Router;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::server::Services;
use crate::store::accounts;

pub type AppState = Arc<Services>;

pub fn client_router(services: AppState) -> Router {
    let cors = tower_http::cors::CorsLayer::new()
        .allow_origin(tower_http::cors::Any)
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE, Method::OPTIONS])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::ACCEPT,
            header::HeaderName::from_static("x-requested-with"),
        ]);
    let mut routes = crate::client::routes();
    if services.config.federation.serve_on_client_listener && services.federation.is_some() {
        routes = routes.merge(crate::federation::routes::routes());
    }
    routes = routes.route("/_hearth/health", axum::routing::get(crate::metrics::health));
    if services.config.metrics.enabled {
        routes = routes.route("/metrics", axum::routing::get(crate::metrics::metrics));
    }
    routes
        .fallback(|| async { Error::unrecognized("unrecognized endpoint") })
        .method_not_allowed_fallback(|| async { Error::method_not_allowed() })
        .layer(cors)
        .layer(axum::middleware::map_response(json_content_type))
        .layer(axum::middleware::from_fn_with_state(services.clone(), count_busy))
        .layer(axum::middleware::from_fn_with_state(services.clone(), crate::metrics::track))
        .with_state(services)
}

/// Counts in-flight client requests (not long-polling /sync) so background jobs can yield to users.
async fn count_busy(
    axum::extract::State(s): axum::extract::State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use std::sync::atomic::Ordering;
    if req.uri().path().ends_with("/sync") {
        // A long poll would hold up a graceful shutdown for its whole timeout: end it when shutdown begins
        // (the client retries against the restarted server).
        let mut shutdown = s.shutdown.subscribe();
        return tokio::select! {
            res = next.run(req) => res,
            _ = shutdown.wait_for(|stopping| *stopping) => {
                Error::unavailable("server is shutting down").into_response()
            }
        };
    }
    s.busy.fetch_add(1, Ordering::Relaxed);
    struct Done<'a>(&'a std::sync::atomic::AtomicUsize);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let _done = Done(&s.busy);
    next.run(req).await
}

/// The federation listener's router (TLS).
pub fn federation_router(services: AppState) -> Router {
    crate::federation::routes::routes()
        .route("/_matrix/client/versions", axum::routing::get(crate::client::account::versions))
        .route("/.well-known/matrix/server", axum::routing::get(crate::client::account::well_known_server))
        .route("/.well-known/matrix/client", axum::routing::get(crate::client::account::well_known))
        .fallback(|| async { Error::unrecognized("unrecognized endpoint") })
        .method_not_allowed_fallback(|| async { Error::method_not_allowed() })
        .layer(axum::middleware::map_response(json_content_type))
        .layer(axum::middleware::from_fn_with_state(services.clone(), count_federation))
        .layer(axum::middleware::from_fn_with_state(services.clone(), crate::metrics::track))
        .with_state(services)
}

/// Counts served federation requests per endpoint (path without its variable parts).
async fn count_federation(
    axum::extract::State(s): axum::extract::State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let key: String = req.uri().path().split('/').filter(|p| !p.is_empty()).take(4).collect::<Vec<_>>().join("/");
    *s.fed_requests.lock().unwrap_or_else(|e| e.into_inner()).entry(key).or_default() += 1;
    next.run(req).await
}

async fn json_content_type(mut res: axum::response::Response) -> axum::response::Response {
    if !res.headers().contains_key(header::CONTENT_TYPE) {
        res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    res
}

/// An authenticated local user (from `Authorization: Bearer` or `?access_token=`).
#[derive(Clone, Debug)]
pub struct Auth {
    pub user_id: String,
    pub device_id: String,
    pub admin: bool,
    pub token: String,
}

fn token_from(parts: &Parts) -> Option<String> {
    if let Some(h) = parts.headers.get(header::AUTHORIZATION).and_then(|h| h.to_str().ok()) {
        if let Some(t) = h.strip_prefix("Bearer ") {
            return Some(t.trim().to_owned());
        }
    }
    parts.uri.query().and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("access_token=").map(percent_decode)))
}

pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl FromRequestParts<AppState> for Auth {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self> {
        let token = token_from(parts).ok_or_else(Error::missing_token)?;
        let t = token.clone();
        let found = state.store.read(move |c| accounts::lookup_token(c, &t)).await?;
        let (user_id, device_id, admin) = found.ok_or_else(Error::unknown_token)?;
        Ok(Auth { user_id, device_id, admin, token })
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

/// The client's address (for rate limits keyed by address). Behind a reverse proxy on the same machine (the peer
/// is a loopback address) that is the last address of `X-Forwarded-For`, which the proxy appends: otherwise every
/// client would share the proxy's address and one client's failed logins would lock out everyone.
pub fn client_ip(parts: &Parts) -> String {
    let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    if peer.is_some_and(|ip| ip.is_loopback()) {
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
        match s {
            None => Ok(None),
            Some(s) if s.is_empty() => Ok(None),
            Some(s) => s.parse().map(Some).map_err(serde::de::Error::custom),
        }
    }

    pub fn opt_bool<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        match s.as_deref() {
            None | Some("") => Ok(None),
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
}

impl UiaSessions {
    pub fn new_session(&self) -> String {
        let id = random_string(24);
        let mut s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        s.retain(|_, (_, t)| t.elapsed() < Duration::from_secs(900));
        s.insert(id.clone(), (Vec::new(), Instant::now()));
        id
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
    }
}

pub fn random_string(n: usize) -> String {
    use rand::Rng;
    rand::thread_rng().sample_iter(rand::distributions::Alphanumeric).take(n).map(char::from).collect()
}
