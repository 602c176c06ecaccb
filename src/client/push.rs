//! Push delivery: every new timeline event (local or federated) is run through the push rules of each local member
//! of its room who has a pusher, and what the rules say to notify is queued per pusher (`push_outbox`, durable,
//! capped) and POSTed to the pusher's gateway (`/_matrix/push/v1/notify`) with exponential backoff.
//!
//! The evaluator follows the event stream with a cursor of its own (`push_cursor`), so events enter the same way
//! however they were stored, and nothing is missed across a restart. Only timeline events after the cursor count:
//! outliers (the membership backlog a lazy-join resync fills in), rejected and soft-failed events and backfilled
//! history (numbered below 0) are never pushed; nor is a user's own event, nor one from a user they ignore.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::watch;

use crate::client::notifications;
use crate::client::push_rules::{self, PUSH_RULES};
use crate::config::Push as PushConfig;
use crate::error::Result;
use crate::http::AppState;
use crate::room::visibility::ClientJudge;
use crate::store::ids::{RoomNid, StreamPos};
use crate::store::pushers::{self, NewEvent, Pusher, Queued};
use crate::store::{account_data, events, members, rooms, unread, Db};

/// Events evaluated per step.
const BATCH: i64 = 200;

/// What the evaluator decided for one user: a notification (and, if the user has pushers, a push), unread in
/// `thread` until read.
struct Decision {
    user_id: String,
    notification: pushers::Notification,
    sound: Option<String>,
    thread: String,
}

/// What one batch of events did: notifications, and what local users read by it (their own events read their
/// thread up to them; leaving a room reads all of it): `(user, room, thread or None for all, up to)`.
#[derive(Default)]
struct Evaluated {
    decisions: Vec<Decision>,
    reads: Vec<(String, RoomNid, Option<String>, StreamPos)>,
}

/// Runs the evaluator and the delivery until shutdown.
pub async fn run(s: AppState, mut shutdown: watch::Receiver<bool>) {
    let http = match client(&s.config.push) {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(error = %e, "push delivery disabled: cannot build its HTTP client");
            return;
        }
    };
    let mut stream = s.store.stream_watch();
    let in_flight: Arc<Mutex<HashSet<i64>>> = Arc::default();
    loop {
        loop {
            match evaluate_new(&s).await {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "push evaluation failed");
                    break;
                }
            }
        }
        if let Err(e) = deliver_due(&s, &http, &in_flight).await {
            tracing::warn!(error = %e, "push delivery round failed");
        }
        tokio::select! {
            _ = stream.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

/// The gateway client: no redirects, private addresses refused unless allowed (checked on every connection by
/// its resolver; IP literals are checked before each request in [`gateway_allowed`]).
fn client(cfg: &PushConfig) -> anyhow::Result<reqwest::Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let resolver =
        GatewayResolver { allow_private: cfg.allow_private_gateways, allowed: cfg.allowed_gateway_hosts.clone() };
    Ok(reqwest::Client::builder()
        .dns_resolver(Arc::new(resolver))
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        .user_agent(concat!("Hearth/", env!("CARGO_PKG_VERSION")))
        .build()?)
}

struct GatewayResolver {
    allow_private: bool,
    allowed: Vec<String>,
}

impl reqwest::dns::Resolve for GatewayResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        let allow = self.allow_private || self.allowed.iter().any(|h| h.eq_ignore_ascii_case(&host));
        Box::pin(async move {
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let ok: Vec<SocketAddr> =
                all.into_iter().filter(|a| allow || !crate::federation::client::is_private(a.ip())).collect();
            if ok.is_empty() {
                return Err(format!("{host}: no public address (push.allow_private_gateways = false)").into());
            }
            Ok(Box::new(ok.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// May a notification go to `url`? IP literals never reach the resolver, so they are judged here.
fn gateway_allowed(cfg: &PushConfig, url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else { return false };
    if cfg.allow_private_gateways || cfg.allowed_gateway_hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) {
        return true;
    }
    match host.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>() {
        Ok(ip) => !crate::federation::client::is_private(ip),
        Err(_) => true,
    }
}

// ---- evaluation ------------------------------------------------------------------------------------------------

/// Evaluates the next batch of events after the cursor and queues the notifications; true when there may be more.
async fn evaluate_new(s: &AppState) -> Result<bool> {
    let from = s.store.read_background(pushers::cursor).await?;
    if s.store.current_stream() <= from.0 {
        return Ok(false);
    }
    let ours = s.identity.server_name.to_string();
    let (decisions, to, more) = s
        .store
        .read_background(move |c| {
            let evs = pushers::events_after(c, from, BATCH)?;
            let more = evs.len() as i64 == BATCH;
            let to = evs.last().map(|e| e.stream).unwrap_or(from);
            let mut out = Evaluated::default();
            let mut cache = BatchCache { ours, members: HashMap::new(), judges: HashMap::new() };
            for ev in evs.iter().filter(|e| !e.sender.is_empty()) {
                decide(c, ev, &mut out, &mut cache)?;
            }
            Ok((out, to, more))
        })
        .await?;
    if to == from {
        return Ok(false);
    }
    let cap = i64::from(s.config.push.max_queued_per_pusher);
    s.store
        .write_background(move |w| {
            // Only this task moves the cursor: if it moved anyway (a second server?), drop this batch.
            if pushers::cursor(w.db())? != from {
                return Ok(());
            }
            for d in &decisions.decisions {
                let n = &d.notification;
                pushers::record_notification(w.db(), &d.user_id, n)?;
                pushers::enqueue(w.db(), &d.user_id, &n.event_id, n.highlight, d.sound.as_deref(), cap)?;
                unread::record(w.db(), &d.user_id, n.room_nid, n.stream, &d.thread, n.highlight)?;
            }
            for (user, room, thread, upto) in &decisions.reads {
                unread::read_up_to(w.db(), user, *room, thread.as_deref(), *upto)?;
            }
            pushers::set_cursor(w.db(), to)
        })
        .await?;
    Ok(more)
}

/// The notifications one event causes for the local members of its room who may see it (never for its sender),
/// and what it reads for local users.
/// What the events of one batch share: each room's local members and each user's visibility judge (with its
/// caches), read once per batch instead of once per event. Per event, the member list of a big room and the
/// judge's search for its oldest event with state (long when the history was imported without state) made the
/// evaluator quadratic: a 100k-event room kept a core busy for minutes after a restart.
struct BatchCache<'c> {
    /// This server's name (its users are the local members).
    ours: String,
    members: HashMap<RoomNid, Vec<String>>,
    judges: HashMap<String, ClientJudge<'c>>,
}

impl<'c> BatchCache<'c> {
    fn local_members(&mut self, c: Db<'c>, room: RoomNid) -> Result<Vec<String>> {
        if let Some(m) = self.members.get(&room) {
            return Ok(m.clone());
        }
        let m = pushers::local_members(c, room, &self.ours)?;
        self.members.insert(room, m.clone());
        Ok(m)
    }

    fn judge(&mut self, c: Db<'c>, user: &str) -> &mut ClientJudge<'c> {
        self.judges.entry(user.to_owned()).or_insert_with(|| ClientJudge::new(c, user))
    }
}

fn decide<'c>(c: Db<'c>, ev: &NewEvent, out: &mut Evaluated, cache: &mut BatchCache<'c>) -> Result<()> {
    let event: Value = serde_json::from_str(&ev.json)?;
    // An invite also goes to its (local) invitee, who is not a member yet (Synapse does the same); an invite over
    // federation to a room we hold no state for (an outlier) goes to its invitee only.
    let invitee = (event["type"] == "m.room.member" && event["content"]["membership"] == "invite")
        .then(|| event["state_key"].as_str())
        .flatten();
    let mut users = if ev.outlier { Vec::new() } else { cache.local_members(c, ev.room_nid)? };
    if let Some(invitee) = invitee {
        let local = crate::store::accounts::get_user(c, invitee)?.is_some_and(|u| !u.deactivated);
        if local && !users.iter().any(|u| u == invitee) {
            users.push(invitee.to_owned());
        }
    }
    let thread = notifications::thread_of(c, &event)?;
    if !ev.outlier {
        reads_of(c, ev, &event, &thread, &mut out.reads)?;
    }
    if users.iter().all(|u| *u == ev.sender) {
        return Ok(());
    }
    let Some(room) = rooms::room_by_nid(c, ev.room_nid)? else { return Ok(()) };
    let Some(row) = events::event_by_id(c, &ev.event_id)? else { return Ok(()) };
    // The room's facts are the same for every member: read once, with each member's display name added.
    let base = notifications::context(c, &room, &ev.sender)?;
    for user in users.into_iter().filter(|u| *u != ev.sender) {
        if notifications::ignored_users(c, &user)?.contains(&ev.sender) {
            continue;
        }
        // Only what the user may see (the one visibility judge); their own invite is always theirs to hear of.
        if invitee != Some(user.as_str()) && !cache.judge(c, &user).may_see(&row)? {
            continue;
        }
        let rules = push_rules::effective(&user, account_data::get(c, &user, "", PUSH_RULES)?.as_ref());
        let ctx = notifications::Context {
            display_name: members::displayname(c, ev.room_nid, &user)?,
            user_id: user.clone(),
            member_count: base.member_count,
            power_levels: base.power_levels.clone(),
            creator: base.creator.clone(),
        };
        let Some(actions) = notifications::matched_actions(&rules, &event, &room.room_id, &ctx) else { continue };
        let outcome = notifications::actions(actions);
        if outcome.notify {
            let notification = pushers::Notification {
                stream: ev.stream,
                event_id: ev.event_id.clone(),
                room_nid: ev.room_nid,
                highlight: outcome.highlight,
                actions: actions.to_string(),
                ts: event["origin_server_ts"].as_i64().unwrap_or(0),
            };
            let sound = notifications::sound(actions);
            out.decisions.push(Decision { user_id: user, notification, sound, thread: thread.clone() });
        }
    }
    Ok(())
}

/// What a timeline event reads for local users: a local sender's event reads its thread up to it (the spec: a
/// user updates their read receipt "by using the API or by sending an event"); a local user's leave or ban reads
/// the whole room (a room left holds no unread notifications).
fn reads_of(
    c: Db<'_>,
    ev: &NewEvent,
    event: &Value,
    thread: &str,
    reads: &mut Vec<(String, RoomNid, Option<String>, StreamPos)>,
) -> Result<()> {
    if crate::store::accounts::get_user(c, &ev.sender)?.is_some() {
        reads.push((ev.sender.clone(), ev.room_nid, Some(thread.to_owned()), ev.stream));
    }
    let gone =
        event["type"] == "m.room.member" && matches!(event["content"]["membership"].as_str(), Some("leave" | "ban"));
    if let Some(target) = event["state_key"].as_str().filter(|_| gone) {
        if crate::store::accounts::get_user(c, target)?.is_some() {
            reads.push((target.to_owned(), ev.room_nid, None, ev.stream));
        }
    }
    Ok(())
}

// ---- delivery --------------------------------------------------------------------------------------------------

/// Starts a delivery task for every due pusher not already being served.
async fn deliver_due(s: &AppState, http: &reqwest::Client, in_flight: &Arc<Mutex<HashSet<i64>>>) -> Result<()> {
    let now = crate::store::accounts::now_ms();
    let due = s.store.read_background(move |c| pushers::due(c, now)).await?;
    for nid in due {
        if !in_flight.lock().unwrap_or_else(|e| e.into_inner()).insert(nid) {
            continue;
        }
        let (s, http, in_flight) = (s.clone(), http.clone(), in_flight.clone());
        tokio::spawn(async move {
            if let Err(e) = drain(&s, &http, nid).await {
                tracing::warn!(error = %e, pusher = nid, "push delivery failed");
            }
            in_flight.lock().unwrap_or_else(|e| e.into_inner()).remove(&nid);
        });
    }
    Ok(())
}

/// Sends a pusher's queue, oldest first, until it is empty or the gateway fails (then the backoff starts).
async fn drain(s: &AppState, http: &reqwest::Client, nid: i64) -> Result<()> {
    loop {
        let found = s
            .store
            .read_background(move |c| {
                let Some(p) = pushers::get(c, nid)? else { return Ok(None) };
                let Some(q) = pushers::next_queued(c, nid)? else { return Ok(None) };
                let body = notification_body(c, &p, &q)?;
                Ok(Some((p, q, body)))
            })
            .await?;
        let Some((pusher, queued, body)) = found else { return Ok(()) };
        let Some(body) = body else {
            // The event is gone (purged): nothing to send.
            s.store.write_background(move |w| pushers::delivered(w.db(), nid, queued.id)).await?;
            continue;
        };
        match post(s, http, &pusher, &body).await {
            Ok(rejected) => {
                let gone = rejected.contains(&pusher.pushkey);
                s.store
                    .write_background(move |w| {
                        pushers::delivered(w.db(), nid, queued.id)?;
                        if gone {
                            pushers::delete_by_nid(w.db(), nid)?;
                        }
                        Ok(())
                    })
                    .await?;
                if gone {
                    tracing::info!(user = %pusher.user_id, app_id = %pusher.app_id, "gateway rejected the pushkey; pusher removed");
                    return Ok(());
                }
            }
            Err(e) => {
                let (now, base) = (crate::store::accounts::now_ms(), s.config.push.retry_base_ms as i64);
                let wait = s.store.write_background(move |w| pushers::failed(w.db(), nid, now, base)).await?;
                tracing::info!(error = %e, user = %pusher.user_id, retry_in_ms = wait, "push gateway unreachable");
                return Ok(());
            }
        }
    }
}

/// POSTs one notification; the gateway's `rejected` pushkeys on success.
async fn post(
    s: &AppState,
    http: &reqwest::Client,
    pusher: &Pusher,
    body: &Value,
) -> std::result::Result<Vec<String>, String> {
    let data: Value = serde_json::from_str(&pusher.data).map_err(|e| e.to_string())?;
    let url = data["url"].as_str().and_then(|u| reqwest::Url::parse(u).ok()).ok_or("pusher without a URL")?;
    if !gateway_allowed(&s.config.push, &url) {
        return Err(format!("{url}: private address (push.allow_private_gateways = false)"));
    }
    let res = http.post(url).json(body).send().await.map_err(|e| e.to_string())?;
    let status = res.status();
    if !status.is_success() {
        return Err(format!("gateway answered {status}"));
    }
    let answer: Value = res.json().await.unwrap_or_else(|_| json!({}));
    Ok(answer["rejected"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or_default())
}

/// The push gateway API's notification for `q` to pusher `p` (None when the event is gone).
fn notification_body(c: Db<'_>, p: &Pusher, q: &Queued) -> Result<Option<Value>> {
    let Some(row) = events::event_by_id(c, &q.event_id)? else { return Ok(None) };
    let Some(room) = rooms::room_by_nid(c, row.room_nid)? else { return Ok(None) };
    let event: Value = serde_json::from_str(&row.json)?;
    let data: Value = serde_json::from_str(&p.data).unwrap_or_else(|_| json!({}));
    let mut tweaks = json!({});
    if q.highlight {
        tweaks["highlight"] = json!(true);
    }
    if let Some(sound) = &q.sound {
        tweaks["sound"] = json!(sound);
    }
    let mut device_data = data.clone();
    if let Some(o) = device_data.as_object_mut() {
        o.remove("url");
    }
    let device = json!({
        "app_id": p.app_id, "pushkey": p.pushkey, "pushkey_ts": p.pushkey_ts / 1000, "data": device_data,
        "tweaks": tweaks,
    });
    let high = q.highlight || q.sound.is_some() || row.event_type == "m.room.encrypted";
    let mut n = json!({
        "event_id": q.event_id, "room_id": room.room_id, "prio": if high { "high" } else { "low" },
        "counts": {"unread": unread_rooms(c, &p.user_id)?}, "devices": [device],
    });
    if data["format"] != "event_id_only" {
        n["type"] = event["type"].clone();
        n["sender"] = event["sender"].clone();
        let sender = event["sender"].as_str().unwrap_or("");
        if let Some(name) = members::displayname(c, row.room_nid, sender)? {
            n["sender_display_name"] = json!(name);
        }
        if let Some(name) = room_name(c, &room)? {
            n["room_name"] = json!(name);
        }
        if let Some(content) = event.get("content") {
            n["content"] = content.clone();
        }
        if event["type"] == "m.room.member" {
            n["user_is_target"] = json!(event["state_key"] == json!(p.user_id));
            if let Some(m) = event["content"]["membership"].as_str() {
                n["membership"] = json!(m);
            }
        }
    }
    Ok(Some(json!({"notification": n})))
}

fn room_name(c: Db<'_>, room: &rooms::RoomRow) -> Result<Option<String>> {
    let Some(sg) = room.current_sg else { return Ok(None) };
    let name = crate::room::state_content(c, sg, "m.room.name", "")?;
    Ok(name.and_then(|v| v["name"].as_str().filter(|n| !n.is_empty()).map(str::to_owned)))
}

/// The badge: how many of the user's joined rooms hold unread notifications (as Synapse counts by default).
fn unread_rooms(c: Db<'_>, user_id: &str) -> Result<i64> {
    unread::rooms_with_unread(c, user_id)
}

/// Waits (briefly) until the evaluator has run every event up to `upto` through the push rules, so that a `/sync`
/// answer going up to `upto` carries the counts of its own events. Gives up after [`CATCH_UP_WAIT`] (the counts
/// then follow in a later answer).
pub async fn caught_up(s: &AppState, upto: i64) {
    let deadline = tokio::time::Instant::now() + CATCH_UP_WAIT;
    while tokio::time::Instant::now() < deadline {
        match s.store.read(move |c| pushers::unevaluated_up_to(c, StreamPos(upto))).await {
            Ok(true) => tokio::time::sleep(Duration::from_millis(5)).await,
            _ => return,
        }
    }
}

/// How long a sync waits for the evaluator at most.
const CATCH_UP_WAIT: Duration = Duration::from_secs(2);
