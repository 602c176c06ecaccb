//! Presence, as Synapse keeps it by default: a state (`online`, `unavailable`, `offline`), a status message, when the
//! user was last active and whether they are active right now; set by `PUT /presence`, by `/sync`'s `set_presence`
//! and by sending events; seen by users sharing a room; exchanged with the other servers in those rooms as
//! `m.presence` EDUs.
//!
//! The state lives in SQLite (`store::presence`, one row per user): a change worth telling anyone about is written at
//! once with a position of the global stream (which wakes `/sync` and queues the EDUs in the same transaction), so
//! it survives a crash. Activity that changes nothing visible (a user already online syncing again) only moves
//! timestamps: those are kept in memory and written every minute, so a busy user costs no write per request.
//!
//! Timeouts (Synapse's): an online local user inactive for 5 minutes becomes `unavailable`; one who neither synced
//! nor did anything for 30 seconds (and has no `/sync` in flight) becomes `offline`; `currently_active` drops after
//! a minute without activity; our online users' presence is sent again every 25 minutes, and a remote user not heard
//! of for 30 minutes becomes `offline`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::store::accounts::now_ms;
use crate::store::presence::{self, PresenceRow};
use crate::store::{outbox, Store, Writer};

/// An online user with no activity for this long becomes `unavailable`.
pub const IDLE_MS: i64 = 5 * 60_000;
/// A user who stopped syncing (and did nothing) this long ago becomes `offline`.
pub const SYNC_ONLINE_TIMEOUT_MS: i64 = 30_000;
/// A user counts as currently active this long after their last activity.
pub const LAST_ACTIVE_GRANULARITY_MS: i64 = 60_000;
/// A remote user not heard of for this long becomes `offline` (their server should ping before).
pub const FEDERATION_TIMEOUT_MS: i64 = 30 * 60_000;
/// Our online users' presence goes to other servers again after this long (so they do not time it out).
pub const FEDERATION_PING_MS: i64 = 25 * 60_000;
/// Offline remote users not heard of for this long are forgotten (offline is what no row says anyway).
const FORGET_REMOTE_MS: i64 = 7 * 24 * 3_600_000;
/// How often the timeouts are checked.
const TICK: Duration = Duration::from_secs(5);
/// How often activity timestamps kept in memory are written.
const FLUSH_EVERY: Duration = Duration::from_secs(60);
/// Longest status message accepted (bytes).
pub const MAX_STATUS_MSG: usize = 4096;

pub const STATES: [&str; 3] = ["online", "unavailable", "offline"];

/// A change of a local user's presence.
#[derive(Clone, Debug)]
pub enum Change {
    /// `PUT /presence/{userId}/status`: the state and the status message (none clears it).
    Set { state: String, status_msg: Option<String> },
    /// A `/sync` with `set_presence` (not `offline`): the state; the status message stays.
    Sync { state: String },
    /// The user did something (sent an event): active now, and back online if they were unavailable.
    Active,
}

/// Applies `change` to a local user's presence at `now`.
pub fn apply(prev: &PresenceRow, change: &Change, now: i64) -> PresenceRow {
    let mut new = prev.clone();
    match change {
        Change::Set { state, status_msg } => {
            new.state = state.clone();
            new.status_msg = status_msg.clone();
            if state == "online" {
                new.last_active_ts = now;
            }
        }
        Change::Sync { state } => {
            new.state = state.clone();
            new.last_sync_ts = now;
            if state == "online" {
                new.last_active_ts = now;
            }
        }
        Change::Active => {
            new.last_active_ts = now;
            if new.state == "unavailable" {
                new.state = "online".into();
            }
        }
    }
    refresh_active(&mut new, now);
    new
}

/// `currently_active` of a local user: online and active in the last minute.
fn refresh_active(p: &mut PresenceRow, now: i64) {
    p.currently_active = p.state == "online" && now - p.last_active_ts < LAST_ACTIVE_GRANULARITY_MS;
}

/// Whether going from `old` to `new` is something the users who see it should hear about (Synapse's
/// `should_notify`): a new state or status message, a change of `currently_active`, or a bump of the last
/// activity that clients could not infer (the user is not currently active, or not online).
pub fn should_notify(old: &PresenceRow, new: &PresenceRow) -> bool {
    if old.status_msg != new.status_msg || old.state != new.state {
        return true;
    }
    let bumped = new.last_active_ts - old.last_active_ts > LAST_ACTIVE_GRANULARITY_MS;
    if old.state == "online" {
        return new.currently_active != old.currently_active || (bumped && !new.currently_active);
    }
    bumped
}

/// What the timers do to `p` at `now` (Synapse's `handle_timeout`), if anything: `syncing` says whether the
/// (local) user has a `/sync` in flight.
pub fn timed_out(p: &PresenceRow, local: bool, syncing: bool, now: i64) -> Option<PresenceRow> {
    if p.state == "offline" {
        return None;
    }
    let mut new = p.clone();
    let mut changed = false;
    if local {
        if new.state == "online" && now - new.last_active_ts > IDLE_MS {
            new.state = "unavailable".into();
            changed = true;
        }
        if !syncing && now - new.last_sync_ts.max(new.last_active_ts) > SYNC_ONLINE_TIMEOUT_MS {
            new.state = "offline".into();
            changed = true;
        }
        // Stopped being currently active; or due for a ping to the other servers.
        changed |= now - new.last_active_ts > LAST_ACTIVE_GRANULARITY_MS;
        changed |= now - new.last_federation_ts > FEDERATION_PING_MS;
        refresh_active(&mut new, now);
    } else if now - new.last_federation_ts > FEDERATION_TIMEOUT_MS {
        new.state = "offline".into();
        changed = true;
    }
    changed.then_some(new)
}

/// The content clients see (`GET /presence`, `m.presence` in `/sync`), as Synapse shapes it.
pub fn client_content(p: &PresenceRow, now: i64) -> Value {
    let mut c = json!({"presence": p.state});
    if p.last_active_ts > 0 {
        c["last_active_ago"] = json!((now - p.last_active_ts).max(0));
    }
    if let Some(m) = &p.status_msg {
        c["status_msg"] = json!(m);
    }
    if p.state == "online" {
        c["currently_active"] = json!(p.currently_active);
    }
    c
}

/// An `m.presence` event of `/sync`.
pub fn sync_event(p: &PresenceRow, now: i64) -> Value {
    json!({"type": "m.presence", "sender": p.user_id, "content": client_content(p, now)})
}

/// One entry of an `m.presence` EDU's `push` list.
fn edu_push(p: &PresenceRow, now: i64) -> Value {
    let mut c = client_content(p, now);
    c["user_id"] = json!(p.user_id);
    c["last_active_ago"] = json!((now - p.last_active_ts).max(0));
    c["currently_active"] = json!(p.currently_active);
    c
}

/// Queues `p` (a local user's presence) as an `m.presence` EDU for every other server sharing a room with them.
fn send_to_servers(w: &mut Writer<'_>, p: &PresenceRow, our_server: &str, now: i64) -> Result<()> {
    let servers = presence::servers_sharing_rooms(w.db(), &p.user_id, our_server)?;
    if servers.is_empty() {
        return Ok(());
    }
    let edu = json!({"edu_type": "m.presence", "content": {"push": [edu_push(p, now)]}}).to_string();
    for server in servers {
        outbox::enqueue_edu(w.db(), &server, &edu)?;
    }
    Ok(())
}

/// Local users' activity newer than their stored rows.
#[derive(Default)]
struct Activity {
    /// user -> (last_active_ts, last_sync_ts) not yet written.
    pending: HashMap<String, (i64, i64)>,
    /// `/sync` requests in flight per user.
    syncing: HashMap<String, usize>,
}

/// The presence service (held by the client and federation handles).
pub struct Presence {
    enabled: bool,
    /// Whether presence goes to other servers (federation on).
    federating: bool,
    server_name: String,
    activity: Mutex<Activity>,
}

impl Presence {
    pub fn new(enabled: bool, federating: bool, server_name: &str) -> Presence {
        Presence { enabled, federating, server_name: server_name.to_owned(), activity: Mutex::default() }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Activity> {
        self.activity.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_local(&self, user_id: &str) -> bool {
        user_id.split_once(':').is_some_and(|(_, s)| s == self.server_name)
    }

    /// `p` with the activity kept in memory laid over it.
    fn overlay(&self, mut p: PresenceRow) -> PresenceRow {
        if let Some((active, sync)) = self.lock().pending.get(&p.user_id) {
            p.last_active_ts = p.last_active_ts.max(*active);
            p.last_sync_ts = p.last_sync_ts.max(*sync);
        }
        p
    }

    fn remember(&self, p: &PresenceRow) {
        let mut a = self.lock();
        let e = a.pending.entry(p.user_id.clone()).or_default();
        e.0 = e.0.max(p.last_active_ts);
        e.1 = e.1.max(p.last_sync_ts);
    }

    /// A user's current presence (offline when never seen).
    pub async fn get(&self, store: &Store, user_id: &str) -> Result<PresenceRow> {
        let u = user_id.to_owned();
        let row = store.read(move |c| presence::get(c, &u)).await?;
        Ok(self.overlay(row.unwrap_or_else(|| PresenceRow::offline(user_id))))
    }

    /// `last_active_ago` and `currently_active` of `/sync` presence events, from activity not yet written.
    pub fn refresh_events(&self, events: &mut [Value], now: i64) {
        let a = self.lock();
        for e in events {
            let Some((active, _)) = e["sender"].as_str().and_then(|u| a.pending.get(u)) else { continue };
            let ago = now - active;
            if e["content"]["last_active_ago"].as_i64().is_some_and(|old| ago < old) {
                e["content"]["last_active_ago"] = json!(ago.max(0));
            }
        }
    }

    /// Changes a local user's presence: written (and sent to other servers) when anyone should hear of it, else only
    /// remembered. A no-op with presence off.
    pub async fn update(&self, store: &Store, user_id: &str, change: Change) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        let now = now_ms();
        let prev = self.get(store, user_id).await?;
        let new = apply(&prev, &change, now);
        if !should_notify(&prev, &new) {
            self.remember(&new);
            return Ok(());
        }
        let pending = self.lock().pending.get(user_id).copied();
        let (user, our, federating) = (user_id.to_owned(), self.server_name.clone(), self.federating);
        let stored = store
            .write(move |w| {
                let mut prev = presence::get(w.db(), &user)?.unwrap_or_else(|| PresenceRow::offline(&user));
                if let Some((active, sync)) = pending {
                    prev.last_active_ts = prev.last_active_ts.max(active);
                    prev.last_sync_ts = prev.last_sync_ts.max(sync);
                }
                let mut new = apply(&prev, &change, now);
                let notify = should_notify(&prev, &new);
                if notify {
                    new.last_federation_ts = now;
                    if federating {
                        send_to_servers(w, &new, &our, now)?;
                    }
                }
                presence::put(w, &new, notify)?;
                Ok(new)
            })
            .await?;
        self.forget_pending_upto(&stored);
        Ok(())
    }

    /// Drops the remembered activity of `stored`'s user if the row now holds it.
    fn forget_pending_upto(&self, stored: &PresenceRow) {
        let mut a = self.lock();
        if a.pending
            .get(&stored.user_id)
            .is_some_and(|(active, sync)| *active <= stored.last_active_ts && *sync <= stored.last_sync_ts)
        {
            a.pending.remove(&stored.user_id);
        }
    }

    /// Marks a `/sync` of `user_id` as in flight with `set_presence` `state` (`offline` leaves presence alone, as
    /// Synapse's `set_presence=offline` does) until the guard drops.
    pub async fn syncing(self: &Arc<Self>, store: &Store, user_id: &str, state: &str) -> Result<Option<SyncGuard>> {
        if !self.enabled || state == "offline" {
            return Ok(None);
        }
        *self.lock().syncing.entry(user_id.to_owned()).or_default() += 1;
        let guard = SyncGuard { presence: self.clone(), user_id: user_id.to_owned() };
        self.update(store, user_id, Change::Sync { state: state.to_owned() }).await?;
        Ok(Some(guard))
    }

    /// Applies an incoming `m.presence` EDU from `origin`: entries about users of other servers, or about users who
    /// share no room with ours, are ignored.
    pub async fn receive(&self, store: &Store, origin: &str, content: &Value) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        let Some(push) = content.get("push").and_then(Value::as_array) else { return Ok(()) };
        let now = now_ms();
        let mut updates = Vec::new();
        for item in push.iter().take(100) {
            let Some(user) = item.get("user_id").and_then(Value::as_str) else { continue };
            let Ok(uid) = ruma::UserId::parse(user) else { continue };
            let Some(state) = item.get("presence").and_then(Value::as_str).filter(|s| STATES.contains(s)) else {
                continue;
            };
            if uid.server_name().as_str() != origin || self.is_local(user) {
                continue;
            }
            let status_msg =
                item.get("status_msg").and_then(Value::as_str).filter(|m| m.len() <= MAX_STATUS_MSG).map(str::to_owned);
            let ago = item.get("last_active_ago").and_then(Value::as_i64).filter(|a| *a >= 0);
            let active = item.get("currently_active").and_then(Value::as_bool).unwrap_or(false);
            updates.push((user.to_owned(), state.to_owned(), status_msg, ago, active));
        }
        if updates.is_empty() {
            return Ok(());
        }
        let our = self.server_name.clone();
        store
            .write(move |w| {
                for (user, state, status_msg, ago, active) in updates {
                    if !presence::shares_room_with_local(w.db(), &user, &our)? {
                        continue;
                    }
                    let prev = presence::get(w.db(), &user)?.unwrap_or_else(|| PresenceRow::offline(&user));
                    let new = PresenceRow {
                        state,
                        status_msg,
                        last_active_ts: ago.map_or(prev.last_active_ts, |a| now - a),
                        currently_active: active,
                        last_federation_ts: now,
                        ..prev.clone()
                    };
                    let notify = should_notify(&prev, &new);
                    presence::put(w, &new, notify)?;
                }
                Ok(())
            })
            .await
    }

    /// One pass of the timers over every user not offline; `flush` also writes the activity kept in memory.
    pub async fn tick(&self, store: &Store, flush: bool) -> Result<()> {
        let now = now_ms();
        let rows = store.read_background(presence::not_offline).await?;
        let (pending, syncing) = {
            let mut a = self.lock();
            let pending = if flush { std::mem::take(&mut a.pending) } else { a.pending.clone() };
            (pending, a.syncing.clone())
        };
        let mut writes = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for mut p in rows {
            let local = self.is_local(&p.user_id);
            if let Some((active, sync)) = pending.get(&p.user_id) {
                p.last_active_ts = p.last_active_ts.max(*active);
                p.last_sync_ts = p.last_sync_ts.max(*sync);
            }
            seen.insert(p.user_id.clone());
            let is_syncing = syncing.get(&p.user_id).is_some_and(|n| *n > 0);
            let timed = timed_out(&p, local, is_syncing, now);
            let notify = timed.as_ref().is_some_and(|new| should_notify(&p, new));
            let ping = local && timed.is_some() && now - p.last_federation_ts > FEDERATION_PING_MS;
            match timed {
                Some(mut new) if notify || ping => {
                    if local {
                        new.last_federation_ts = now;
                    }
                    writes.push(TimerWrite::Row { row: new, notify, send: local && self.federating });
                }
                _ if flush && pending.contains_key(&p.user_id) => writes.push(TimerWrite::Times(p)),
                _ => {}
            }
        }
        if flush {
            // Activity of users whose row is offline (say, they sent something while not syncing).
            for (user, (active, sync)) in pending.into_iter().filter(|(u, _)| !seen.contains(u)) {
                let p = PresenceRow { last_active_ts: active, last_sync_ts: sync, ..PresenceRow::offline(&user) };
                writes.push(TimerWrite::Times(p));
            }
        } else if writes.is_empty() {
            return Ok(());
        }
        let our = self.server_name.clone();
        store
            .write_background(move |w| {
                for write in writes {
                    apply_timer_write(w, write, &our, now)?;
                }
                if flush {
                    presence::prune_remote_offline(w.db(), &our, now - FORGET_REMOTE_MS)?;
                }
                Ok(())
            })
            .await
    }

    /// Runs the timers until shutdown.
    pub async fn run(self: Arc<Self>, store: Store, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        if !self.enabled {
            return;
        }
        let mut last_flush = tokio::time::Instant::now();
        loop {
            let stop = tokio::select! {
                _ = tokio::time::sleep(TICK) => false,
                r = shutdown.wait_for(|v| *v) => { drop(r); true }
            };
            if stop {
                let _ = self.tick(&store, true).await; // what is in memory survives the restart
                return;
            }
            let flush = last_flush.elapsed() >= FLUSH_EVERY;
            if flush {
                last_flush = tokio::time::Instant::now();
            }
            if let Err(e) = self.tick(&store, flush).await {
                tracing::warn!(error = %e, "presence timers failed");
            }
        }
    }
}

/// What one tick of the timers writes for one user.
enum TimerWrite {
    /// A timed-out state (or a ping of the other servers) for the row as read.
    Row { row: PresenceRow, notify: bool, send: bool },
    /// Activity timestamps kept in memory, merged into whatever is stored.
    Times(PresenceRow),
}

fn apply_timer_write(w: &mut Writer<'_>, write: TimerWrite, our_server: &str, now: i64) -> Result<()> {
    match write {
        TimerWrite::Row { row: mut p, notify, send } => {
            let Some(stored) = presence::get(w.db(), &p.user_id)? else { return Ok(()) };
            if stored.stream != p.stream {
                return Ok(()); // changed since the read: the timers look again next tick
            }
            p.last_active_ts = p.last_active_ts.max(stored.last_active_ts);
            p.last_sync_ts = p.last_sync_ts.max(stored.last_sync_ts);
            if send {
                send_to_servers(w, &p, our_server, now)?;
            }
            presence::put(w, &p, notify)?;
        }
        TimerWrite::Times(p) => {
            let Some(mut stored) = presence::get(w.db(), &p.user_id)? else { return Ok(()) };
            stored.last_active_ts = stored.last_active_ts.max(p.last_active_ts);
            stored.last_sync_ts = stored.last_sync_ts.max(p.last_sync_ts);
            presence::put(w, &stored, false)?;
        }
    }
    Ok(())
}

/// A `/sync` in flight: when it ends, the user's last sync is now.
pub struct SyncGuard {
    presence: Arc<Presence>,
    user_id: String,
}

impl Drop for SyncGuard {
    fn drop(&mut self) {
        let mut a = self.presence.lock();
        if let Some(n) = a.syncing.get_mut(&self.user_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                a.syncing.remove(&self.user_id);
            }
        }
        let e = a.pending.entry(self.user_id.clone()).or_default();
        e.1 = e.1.max(now_ms());
    }
}

/// Checks a `PUT /presence` body's values.
pub fn check_set(state: &str, status_msg: Option<&str>) -> Result<()> {
    if !STATES.contains(&state) {
        return Err(Error::invalid_param("presence must be online, offline or unavailable"));
    }
    if status_msg.is_some_and(|m| m.len() > MAX_STATUS_MSG) {
        return Err(Error::invalid_param(format!("status_msg is longer than {MAX_STATUS_MSG} bytes")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(state: &str, active: i64) -> PresenceRow {
        PresenceRow { state: state.into(), last_active_ts: active, ..PresenceRow::offline("@a:x") }
    }

    #[test]
    fn setting_online_marks_the_user_active_and_notifies_once() {
        let prev = PresenceRow::offline("@a:x");
        let new = apply(&prev, &Change::Set { state: "online".into(), status_msg: Some("hi".into()) }, 1000);
        assert_eq!((new.state.as_str(), new.last_active_ts, new.currently_active), ("online", 1000, true));
        assert!(should_notify(&prev, &new));
        // Syncing again while online moves timestamps only: nobody hears of it.
        let again = apply(&new, &Change::Sync { state: "online".into() }, 2000);
        assert_eq!(again.status_msg.as_deref(), Some("hi"), "a sync keeps the status message");
        assert!(!should_notify(&new, &again));
        // A PUT without status_msg clears it, which is news.
        let cleared = apply(&again, &Change::Set { state: "online".into(), status_msg: None }, 3000);
        assert!(should_notify(&again, &cleared));
    }

    #[test]
    fn activity_brings_an_unavailable_user_back_online() {
        let prev = row("unavailable", 0);
        let new = apply(&prev, &Change::Active, 10_000);
        assert_eq!(new.state, "online");
        assert!(should_notify(&prev, &new));
    }

    #[test]
    fn timers_idle_then_offline_local_users_and_time_out_silent_servers() {
        let now = 100 * 60_000;
        // Online, syncing, inactive for 6 minutes: unavailable, no longer currently active.
        let p = PresenceRow { currently_active: true, last_sync_ts: now, ..row("online", now - 6 * 60_000) };
        let idle = timed_out(&p, true, true, now).unwrap();
        assert_eq!((idle.state.as_str(), idle.currently_active), ("unavailable", false));
        // Not syncing for over 30 s: offline.
        let p = PresenceRow { last_sync_ts: now - 31_000, last_federation_ts: now, ..row("online", now - 31_000) };
        assert_eq!(timed_out(&p, true, false, now).unwrap().state, "offline");
        // Syncing now and active: nothing to do.
        let p =
            PresenceRow { last_sync_ts: now, last_federation_ts: now, currently_active: true, ..row("online", now) };
        assert_eq!(timed_out(&p, true, true, now), None);
        // Remote users: offline after 30 minutes without news, untouched before.
        let remote = PresenceRow { last_federation_ts: now - 31 * 60_000, ..row("online", now) };
        assert_eq!(timed_out(&remote, false, false, now).unwrap().state, "offline");
        let remote = PresenceRow { last_federation_ts: now - 60_000, ..row("online", now) };
        assert_eq!(timed_out(&remote, false, false, now), None);
    }

    #[test]
    fn clients_see_synapse_shaped_content() {
        let p = PresenceRow { status_msg: Some("busy".into()), currently_active: true, ..row("online", 900) };
        assert_eq!(
            client_content(&p, 1000),
            json!({"presence": "online", "last_active_ago": 100, "status_msg": "busy", "currently_active": true})
        );
        assert_eq!(client_content(&PresenceRow::offline("@a:x"), 1000), json!({"presence": "offline"}));
        let e = edu_push(&p, 1000);
        assert_eq!((e["user_id"].as_str(), e["last_active_ago"].as_i64()), (Some("@a:x"), Some(100)));
    }
}
