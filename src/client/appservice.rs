//! Application services (bridges) on the client API side: `m.login.application_service`, the ping, the
//! per-network room directory, `/thirdparty/*` answered from the registrations (lookups forwarded to the
//! services), user and alias queries for ids in a namespace, and the transaction sender.
//!
//! The sender follows the event stream with a position of its own per service (`appservice_state`, like push's
//! `push_cursor`): each step reads the events after it, keeps those the service is interested in, and writes them
//! as the next transaction (`appservice_txns`) in the same write that moves the position. Only then is the
//! transaction sent (`PUT /_matrix/app/v1/transactions/{txnId}` with the `hs_token`); it is deleted on a 2xx and
//! otherwise retried with the same id and body after an exponential backoff. One transaction in flight per
//! service keeps the order; each service has its own task, so a service that is down delays no one else.
//! What a transaction carries beside timeline events (MSC2409's ephemeral events and to-device messages, MSC3202's
//! device lists and key counts) is gathered for the same stream window by `appservice_extras.rs`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::appservice::AppService;
use crate::error::{Error, Result};
use crate::http::{AppState, Auth, Json};
use crate::store::ids::StreamPos;
use crate::store::pushers::NewEvent;
use crate::store::{accounts, appservice as store, events, pushers, rooms, Db};

/// Events read per step of the sender (a transaction holds at most this many).
const BATCH: i64 = 100;

/// Transactions that may wait for a service that is down before new events stop being selected for it (they are
/// selected later, when it is back: nothing is lost, only judged later).
const MAX_QUEUED: i64 = 1000;

/// 400 `M_EXCLUSIVE`: an id reserved by (or outside the namespace of) an application service.
pub fn exclusive(msg: &str) -> Error {
    Error::matrix(StatusCode::BAD_REQUEST, "M_EXCLUSIVE", msg)
}

/// `/login` with `m.login.application_service`: the user (`alice` or `@alice:server`) the service whose
/// `as_token` came with the request logs in as. Not the service's: 403 `M_EXCLUSIVE`; not registered: 403.
pub async fn login_user(s: &AppState, parts: &Parts, name: &str) -> Result<String> {
    let service = crate::http::appservice_of(parts, s)
        .ok_or_else(|| Error::forbidden("m.login.application_service needs an application service's as_token"))?;
    let user_id = crate::client::account::local_user_id(s, name)?;
    if !service.owns_user(&user_id) {
        return Err(Error::matrix(
            StatusCode::FORBIDDEN,
            "M_EXCLUSIVE",
            "the user is outside the application service's namespace",
        ));
    }
    let uid = user_id.clone();
    let known = s.store.read(move |c| accounts::get_user(c, &uid)).await?.is_some_and(|u| !u.deactivated);
    if !known {
        return Err(Error::forbidden("the application service has not registered this user"));
    }
    Ok(user_id)
}

/// An application service's timestamp massaging: `?ts=` (ms) becomes the event's `origin_server_ts`. Only for
/// requests with an `as_token`; anyone else's `ts` is ignored, as in Synapse.
pub fn massaged_ts(auth: &Auth, query: Option<&str>) -> Result<Option<i64>> {
    if auth.appservice.is_none() {
        return Ok(None);
    }
    let Some(v) = query.and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("ts="))) else { return Ok(None) };
    v.parse::<i64>().map(Some).map_err(|_| Error::invalid_param("ts must be a timestamp in milliseconds"))
}

// ---- calling an application service ----------------------------------------------------------------------------

/// Why a call to a service failed.
enum CallError {
    NoUrl,
    Refused(String),
    Timeout,
    Connection(String),
    Status(StatusCode, String),
}

/// May we connect to this URL? Private and loopback addresses only with `appservice.allow_private_urls`.
async fn url_allowed(s: &AppState, url: &reqwest::Url) -> bool {
    if s.config.appservice.allow_private_urls {
        return true;
    }
    let Some(host) = url.host_str() else { return false };
    let port = url.port_or_known_default().unwrap_or(80);
    match tokio::net::lookup_host((host.trim_start_matches('[').trim_end_matches(']'), port)).await {
        Ok(addrs) => {
            let addrs: Vec<_> = addrs.collect();
            !addrs.is_empty() && addrs.iter().all(|a| !crate::federation::client::is_private(a.ip()))
        }
        Err(_) => false,
    }
}

/// One request to a service (`path` starts with `/_matrix/app/v1/`), authenticated with its `hs_token`.
/// Returns the body of a 2xx answer.
async fn call(
    s: &AppState,
    svc: &AppService,
    method: reqwest::Method,
    path: &str,
    body: Option<&Value>,
) -> std::result::Result<Value, CallError> {
    let base = svc.base_url().ok_or(CallError::NoUrl)?;
    let url = reqwest::Url::parse(&format!("{base}{path}")).map_err(|e| CallError::Refused(e.to_string()))?;
    if !url_allowed(s, &url).await {
        return Err(CallError::Refused(format!("{url}: private address (appservice.allow_private_urls = false)")));
    }
    let mut req = s.appservices.http.request(method, url).bearer_auth(&svc.hs_token);
    if let Some(b) = body {
        req = req.json(b);
    }
    let res = req.send().await.map_err(|e| {
        if e.is_timeout() {
            CallError::Timeout
        } else {
            CallError::Connection(e.to_string())
        }
    })?;
    let status = res.status();
    let text = res.text().await.unwrap_or_default();
    if !status.is_success() {
        return Err(CallError::Status(status, text));
    }
    Ok(serde_json::from_str(&text).unwrap_or_else(|_| json!({})))
}

fn segment(s: &str) -> String {
    // A path segment: everything but unreserved characters percent-encoded.
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Asks the services owning `user_id` (a local user not registered yet) to create it; true when one answered 2xx.
pub async fn query_user(s: &AppState, user_id: &str) -> bool {
    for svc in s.appservices.all().iter().filter(|a| a.owns_user(user_id)) {
        let path = format!("/_matrix/app/v1/users/{}", segment(user_id));
        if call(s, svc, reqwest::Method::GET, &path, None).await.is_ok() {
            return true;
        }
    }
    false
}

/// Asks the services owning `alias` (a local alias that does not exist) to create it; true when one answered 2xx.
pub async fn query_alias(s: &AppState, alias: &str) -> bool {
    for svc in s.appservices.all().iter().filter(|a| a.owns_alias(alias)) {
        let path = format!("/_matrix/app/v1/rooms/{}", segment(alias));
        if call(s, svc, reqwest::Method::GET, &path, None).await.is_ok() {
            return true;
        }
    }
    false
}

// ---- handlers --------------------------------------------------------------------------------------------------

#[derive(Deserialize)]
pub struct PingBody {
    transaction_id: Option<String>,
}

/// `POST /_matrix/client/v1/appservice/{appserviceId}/ping`: the service asks us to call its `/ping`.
pub async fn ping(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    Json(body): Json<PingBody>,
) -> Result<impl IntoResponse> {
    let svc = auth
        .appservice
        .filter(|a| a.id == id)
        .ok_or_else(|| Error::forbidden("the access token does not belong to this application service"))?;
    let mut payload = json!({});
    if let Some(t) = body.transaction_id {
        payload["transaction_id"] = json!(t);
    }
    let started = Instant::now();
    match call(&s, &svc, reqwest::Method::POST, "/_matrix/app/v1/ping", Some(&payload)).await {
        Ok(_) => Ok(axum::Json(json!({"duration_ms": started.elapsed().as_millis() as u64}))),
        Err(CallError::NoUrl) => {
            Err(Error::matrix(StatusCode::BAD_REQUEST, "M_URL_NOT_SET", "the application service has no URL"))
        }
        Err(CallError::Timeout) => Err(Error::matrix(
            StatusCode::GATEWAY_TIMEOUT,
            "M_CONNECTION_TIMEOUT",
            "the application service did not answer in time",
        )),
        Err(CallError::Status(status, text)) => Err(Error::matrix(
            StatusCode::BAD_GATEWAY,
            "M_BAD_STATUS",
            format!("the application service answered {status}"),
        )
        .with("status", json!(status.as_u16()))
        .with("body", json!(text))),
        Err(CallError::Connection(e) | CallError::Refused(e)) => Err(Error::matrix(
            StatusCode::BAD_GATEWAY,
            "M_CONNECTION_FAILED",
            format!("cannot reach the application service: {e}"),
        )),
    }
}

#[derive(Deserialize)]
pub struct VisibilityBody {
    visibility: String,
}

/// `PUT /directory/list/appservice/{networkId}/{roomId}`: a service publishes a room in its network's directory.
pub async fn set_network_listing(
    State(s): State<AppState>,
    auth: Auth,
    Path((network, room_id)): Path<(String, String)>,
    Json(body): Json<VisibilityBody>,
) -> Result<impl IntoResponse> {
    let svc = auth.appservice.ok_or_else(|| Error::forbidden("only application services may do this"))?;
    let listed = match body.visibility.as_str() {
        "public" => true,
        "private" => false,
        _ => return Err(Error::invalid_param("visibility must be public or private")),
    };
    s.store
        .write(move |w| {
            rooms::room_by_id(w.db(), &room_id)?.ok_or_else(|| Error::not_found("unknown room"))?;
            store::set_listed(w.db(), &svc.id, &network, &room_id, listed)
        })
        .await?;
    Ok(axum::Json(json!({})))
}

/// A protocol's description from the first service that gives one (a minimal one if none answers).
async fn protocol_of(s: &AppState, protocol: &str) -> Option<Value> {
    let mut found = false;
    for svc in s.appservices.with_protocol(protocol) {
        found = true;
        let path = format!("/_matrix/app/v1/thirdparty/protocol/{}", segment(protocol));
        if let Ok(mut v) = call(s, svc, reqwest::Method::GET, &path, None).await {
            if v.is_object() && v.get("instances").is_some_and(Value::is_array) {
                // An instance with a network id gets the id `/publicRooms`' `third_party_instance_id` takes
                // (`<appservice id>|<network id>`, as Synapse), naming the network directory it reads.
                for inst in v["instances"].as_array_mut().into_iter().flatten() {
                    if let Some(net) = inst.get("network_id").and_then(Value::as_str) {
                        inst["instance_id"] = json!(format!("{}|{net}", svc.id));
                    }
                }
                return Some(v);
            }
        }
    }
    found.then(|| json!({"user_fields": [], "location_fields": [], "icon": "", "field_types": {}, "instances": []}))
}

/// `GET /thirdparty/protocols`: the protocols of the registered services.
pub async fn protocols(State(s): State<AppState>, _auth: Auth) -> Result<impl IntoResponse> {
    let mut names: Vec<String> = s.appservices.all().iter().flat_map(|a| a.protocols.clone()).collect();
    names.sort();
    names.dedup();
    let mut out = serde_json::Map::new();
    for p in names {
        if let Some(v) = protocol_of(&s, &p).await {
            out.insert(p, v);
        }
    }
    Ok(axum::Json(Value::Object(out)))
}

/// `GET /thirdparty/protocol/{protocol}`.
pub async fn protocol(State(s): State<AppState>, _auth: Auth, Path(p): Path<String>) -> Result<impl IntoResponse> {
    protocol_of(&s, &p).await.map(axum::Json).ok_or_else(|| Error::not_found("unknown protocol"))
}

/// The answers of every service with `protocol` (every service when None) to a third-party lookup, concatenated.
async fn lookup(s: &AppState, protocol: Option<&str>, path: &str, query: Option<&str>) -> Result<Value> {
    let services: Vec<Arc<AppService>> = match protocol {
        Some(p) => s.appservices.with_protocol(p).cloned().collect(),
        None => s.appservices.all().to_vec(),
    };
    if protocol.is_some() && services.is_empty() {
        return Err(Error::not_found("unknown protocol"));
    }
    let full = match query.filter(|q| !q.is_empty()) {
        Some(q) => format!("{path}?{}", strip_access_token(q)),
        None => path.to_owned(),
    };
    let mut out = Vec::new();
    for svc in services {
        if let Ok(Value::Array(items)) = call(s, &svc, reqwest::Method::GET, &full, None).await {
            out.extend(items.into_iter().filter(Value::is_object));
        }
    }
    Ok(Value::Array(out))
}

/// The query string without the requester's `access_token` (never passed on to a service).
fn strip_access_token(q: &str) -> String {
    q.split('&').filter(|kv| !kv.starts_with("access_token=")).collect::<Vec<_>>().join("&")
}

/// `GET /thirdparty/location/{protocol}` and `/thirdparty/user/{protocol}`.
pub async fn lookup_by_protocol(
    State(s): State<AppState>,
    _auth: Auth,
    Path((kind, p)): Path<(String, String)>,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> Result<impl IntoResponse> {
    if kind != "location" && kind != "user" {
        return Err(Error::unrecognized("unrecognized endpoint"));
    }
    let path = format!("/_matrix/app/v1/thirdparty/{kind}/{}", segment(&p));
    lookup(&s, Some(&p), &path, q.as_deref()).await.map(axum::Json)
}

/// `GET /thirdparty/location?alias=` and `/thirdparty/user?userid=`.
pub async fn reverse_lookup(
    State(s): State<AppState>,
    _auth: Auth,
    Path(kind): Path<String>,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> Result<impl IntoResponse> {
    let key = match kind.as_str() {
        "location" => "alias=",
        "user" => "userid=",
        _ => return Err(Error::unrecognized("unrecognized endpoint")),
    };
    if !q.as_deref().unwrap_or("").split('&').any(|kv| kv.starts_with(key)) {
        return Err(Error::missing_param(format!("`{}` is required", key.trim_end_matches('='))));
    }
    lookup(&s, None, &format!("/_matrix/app/v1/thirdparty/{kind}"), q.as_deref()).await.map(axum::Json)
}

// ---- the transaction sender ------------------------------------------------------------------------------------

/// Runs one sender per service with a URL, until shutdown.
pub async fn run(s: AppState, shutdown: watch::Receiver<bool>) {
    let services: Vec<Arc<AppService>> =
        s.appservices.all().iter().filter(|a| a.base_url().is_some()).cloned().collect();
    if services.is_empty() {
        return;
    }
    // A service seen for the first time starts at the latest event (history is not replayed).
    let start = StreamPos(s.store.current_stream());
    let ids: Vec<String> = services.iter().map(|a| a.id.clone()).collect();
    let ensured =
        s.store.write_background(move |w| ids.iter().try_for_each(|id| store::ensure(w.db(), id, start))).await;
    if let Err(e) = ensured {
        tracing::error!(error = %e, "application service senders not started");
        return;
    }
    let tasks: Vec<_> =
        services.into_iter().map(|svc| tokio::spawn(run_one(s.clone(), svc, shutdown.clone()))).collect();
    futures::future::join_all(tasks).await;
}

/// What a sender does next.
enum Next {
    /// More to do now.
    Now,
    /// Wait this long (backoff), or for shutdown.
    Wait(Duration),
    /// Nothing to send: wait for new events.
    Idle,
}

async fn run_one(s: AppState, svc: Arc<AppService>, mut shutdown: watch::Receiver<bool>) {
    let mut stream = s.store.stream_watch();
    let mut typing_watch = s.typing.watch();
    // Typing lives in memory: a service hears of changes from its sender's start on (MSC2409).
    let mut typing_seen = s.typing.serial();
    loop {
        let next = match step(&s, &svc, &mut typing_seen).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, appservice = %svc.id, "application service sender step failed");
                Next::Wait(Duration::from_secs(1))
            }
        };
        let pause = match next {
            Next::Now => {
                if *shutdown.borrow() {
                    return;
                }
                continue;
            }
            Next::Wait(d) => d,
            Next::Idle => Duration::from_millis(500),
        };
        let idle = matches!(next, Next::Idle);
        tokio::select! {
            _ = stream.changed(), if idle => {}
            _ = typing_watch.changed(), if idle && svc.receive_ephemeral => {}
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

/// Sends the waiting transaction (when its backoff allows), else makes the next one from the stream.
async fn step(s: &AppState, svc: &Arc<AppService>, typing_seen: &mut u64) -> Result<Next> {
    let id = svc.id.clone();
    let (state, pending, queued) = s
        .store
        .read_background(move |c| Ok((store::state(c, &id)?, store::next_txn(c, &id)?, store::queued_count(c, &id)?)))
        .await?;
    let Some(state) = state else { return Ok(Next::Idle) };
    // Everything up to `head` is committed (one writer), so a window ending there is complete.
    let head = s.store.current_stream();
    let typing_moved = svc.receive_ephemeral && s.typing.serial() > *typing_seen;
    let caught_up = head <= state.stream.0 && !typing_moved;
    if let Some((txn, body)) = pending {
        let now = accounts::now_ms();
        if state.retry_at <= now {
            return send(s, svc, txn, &body).await;
        }
        // In backoff: new events are still selected as they come (interest is judged near the time of each
        // event, not after the outage), up to a bound of waiting transactions.
        if caught_up || queued >= MAX_QUEUED {
            return Ok(Next::Wait(Duration::from_millis((state.retry_at - now) as u64)));
        }
    } else if caught_up {
        return Ok(Next::Idle);
    }
    let from = state.stream;
    let (serial, typing) =
        if svc.receive_ephemeral { s.typing.changes_since(*typing_seen) } else { (*typing_seen, Vec::new()) };
    let svc2 = svc.clone();
    let ours = s.identity.server_name.to_string();
    let (body, to) = s
        .store
        .read_background(move |c| {
            let evs = pushers::events_after(c, from, BATCH)?;
            // A full batch ends the window at its last event; otherwise the window reaches the head, so that
            // receipts, presence, to-device messages and device list changes after the last event are in it.
            let to = match evs.last() {
                Some(last) if evs.len() as i64 >= BATCH => last.stream,
                _ => StreamPos(head.max(from.0)),
            };
            let mut out = Vec::new();
            for ev in evs.iter().filter(|e| !e.sender.is_empty() && e.stream.0 <= to.0) {
                if let Some(v) = selected(c, &svc2, ev, &ours)? {
                    out.push(v);
                }
            }
            let mut body = serde_json::Map::new();
            body.insert("events".into(), json!(out));
            body.insert("ephemeral".into(), json!([]));
            let worth = crate::client::appservice_extras::add(c, &svc2, from, to, &typing, &ours, &mut body)?;
            Ok((worth.then(|| Value::Object(body).to_string()), to))
        })
        .await?;
    *typing_seen = serial;
    if to == from && body.is_none() {
        return Ok(Next::Idle);
    }
    let id = svc.id.clone();
    s.store.write_background(move |w| store::advance(w.db(), &id, from, to, body.as_deref())).await?;
    Ok(Next::Now)
}

/// The event in client format if the service is interested in it: sent by or about one of its users, in a room of
/// its room namespace or with an alias of its alias namespace, or in a room one of its users is joined to.
fn selected(c: Db<'_>, svc: &AppService, ev: &NewEvent, ours: &str) -> Result<Option<Value>> {
    let event: Value = serde_json::from_str(&ev.json)?;
    let Some(room) = rooms::room_by_nid(c, ev.room_nid)? else { return Ok(None) };
    let about_user = event["type"] == "m.room.member" && event["state_key"].as_str().is_some_and(|u| svc.owns_user(u));
    let interested = svc.owns_user(&ev.sender)
        || about_user
        || crate::client::appservice_extras::interested_in_room(c, svc, ev.room_nid, &room.room_id, ours)?;
    if !interested {
        return Ok(None);
    }
    let Some(row) = events::event_by_id(c, &ev.event_id)? else { return Ok(None) };
    crate::client::format::event(c, &row, &room.room_id, None, true).map(Some)
}

/// Sends one transaction; on a 2xx it is deleted, otherwise the backoff grows.
async fn send(s: &AppState, svc: &AppService, txn: i64, body: &str) -> Result<Next> {
    let value: Value = serde_json::from_str(body)?;
    let path = format!("/_matrix/app/v1/transactions/{txn}");
    let id = svc.id.clone();
    match call(s, svc, reqwest::Method::PUT, &path, Some(&value)).await {
        Ok(_) => {
            s.store.write_background(move |w| store::delivered(w.db(), &id, txn)).await?;
            Ok(Next::Now)
        }
        Err(e) => {
            let why = match e {
                CallError::NoUrl => "no url".to_owned(),
                CallError::Timeout => "timed out".to_owned(),
                CallError::Refused(e) | CallError::Connection(e) => e,
                CallError::Status(st, _) => format!("answered {st}"),
            };
            let cfg = &s.config.appservice;
            let (now, base, max) = (accounts::now_ms(), cfg.retry_base_ms as i64, cfg.retry_max_ms as i64);
            let wait = s.store.write_background(move |w| store::failed(w.db(), &id, now, base, max)).await?;
            tracing::info!(appservice = %svc.id, txn, error = %why, retry_in_ms = wait, "application service transaction failed");
            Ok(Next::Wait(Duration::from_millis(wait as u64)))
        }
    }
}
