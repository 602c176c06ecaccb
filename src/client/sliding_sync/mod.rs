//! Simplified sliding sync (MSC4186, as Synapse serves it and matrix-rust-sdk uses it):
//! `POST /_matrix/client/unstable/org.matrix.simplified_msc3575/sync`.
//!
//! A request names a connection (`conn_id`, per device) and the position (`pos`) it continues from. Each position
//! is kept in SQLite with what the connection has been sent (per room: the stream position and the room config),
//! so a room with nothing new is not sent again; a position the server no longer holds answers 400
//! `M_UNKNOWN_POS` and the client starts over. A request with nothing new waits (`timeout`) for the stream or
//! typing to move, as `/sync` does.

pub mod extensions;
pub mod lists;
pub mod request;
pub mod room;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use axum::extract::State;
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::http::{qs, AppState, Auth, Json, Query};
use crate::room::typing::TypingView;
use crate::store::ids::{RoomNid, StreamPos};
use crate::store::{accounts, members, sliding_sync, Db};
use extensions::{ExtCtx, Scope};
use lists::Candidate;
use request::{Effective, Request};

/// What a connection has been sent, kept with each of its positions.
#[derive(Serialize, Deserialize, Default, Clone, Debug)]
pub struct Sent {
    #[serde(default)]
    rooms: HashMap<String, SentRoom>,
    #[serde(default)]
    lists: BTreeMap<String, usize>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
struct SentRoom {
    /// The stream position the room was sent up to.
    s: i64,
    /// The config it was sent with.
    c: Effective,
    /// The user's membership then.
    m: String,
    /// Whether the room was still partial-state (lazily joined) then: it is sent afresh when its resync ends.
    p: bool,
}

#[derive(Deserialize)]
pub struct SyncQuery {
    pos: Option<String>,
    #[serde(default, deserialize_with = "qs::opt_u64")]
    timeout: Option<u64>,
    set_presence: Option<String>,
}

/// The position a request continues from.
struct From {
    pos: i64,
    conn_nid: i64,
    stream: i64,
    typing: u64,
    sent: Sent,
}

pub async fn sync(
    State(s): State<AppState>,
    auth: Auth,
    Query(q): Query<SyncQuery>,
    Json(req): Json<Request>,
) -> Result<impl IntoResponse> {
    req.validate()?;
    if q.set_presence.as_deref().is_some_and(|p| !["online", "offline", "unavailable"].contains(&p)) {
        return Err(Error::invalid_param("set_presence must be online, offline or unavailable"));
    }
    let conn_id = req.conn_id.clone().unwrap_or_default();
    let from = match q.pos.as_deref() {
        Some(p) => Some(load_position(&s, &auth, &conn_id, p).await?),
        None => None,
    };
    let _syncing =
        s.presence.syncing(&s.store, auth.user_id.as_str(), q.set_presence.as_deref().unwrap_or("online")).await?;
    // The client has every to-device message up to its `since`: those can go.
    // (Never past the stream's end: a `since` from the future must not drop messages not yet delivered.)
    if let Some(since) = req.extensions.to_device.as_ref().and_then(|t| t.since_stream()) {
        let since = since.min(s.store.current_stream());
        crate::client::sync::drop_delivered_to_device(&s.store, &auth.user_id, &auth.device_id, StreamPos(since))
            .await?;
    }
    let timeout = Duration::from_millis(q.timeout.unwrap_or(0).min(300_000));
    let deadline = tokio::time::Instant::now() + timeout;
    let (auth, req, from) = (std::sync::Arc::new(auth), std::sync::Arc::new(req), std::sync::Arc::new(from));
    let mut stream_rx = s.store.stream_watch();
    let mut typing_rx = s.typing.watch();
    let (body, sent, upto, typing_serial, news) = loop {
        let upto = *stream_rx.borrow_and_update();
        let _ = typing_rx.borrow_and_update();
        // The rooms' unread counts up to `upto` come from the push evaluator: let it catch up first.
        crate::client::push::caught_up(&s, upto).await;
        let typing_serial = s.typing.serial();
        let typing = s.typing.clone_view();
        let (a, r, f) = (auth.clone(), req.clone(), from.clone());
        let (body, sent, news) = s
            .store
            .read(move |c| {
                let pass = Pass { c, auth: &a, req: &r, from: f.as_ref().as_ref(), upto, typing: &typing };
                pass.build()
            })
            .await?;
        if news || from.is_none() || tokio::time::Instant::now() >= deadline {
            break (body, sent, upto, typing_serial, news);
        }
        // Nothing new: wait for the stream or typing to move (or the timeout), then look again.
        tokio::select! {
            _ = stream_rx.changed() => {}
            _ = typing_rx.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(5).min(deadline.saturating_duration_since(tokio::time::Instant::now()))) => {}
        }
    };
    let pos = save_position(&s, &auth, &conn_id, from.as_ref().as_ref(), &sent, upto, typing_serial, news).await?;
    let mut body = body;
    body["pos"] = json!(pos.to_string());
    if let Some(txn_id) = &req.txn_id {
        body["txn_id"] = json!(txn_id);
    }
    Ok(axum::Json(body))
}

/// Reads the position `p` of the request's connection; one the server no longer holds is `M_UNKNOWN_POS`.
async fn load_position(s: &AppState, auth: &Auth, conn_id: &str, p: &str) -> Result<From> {
    let Ok(pos) = p.parse::<i64>() else { return Err(Error::unknown_pos()) };
    let (u, d, cid) = (auth.user_id.to_string(), auth.device_id.clone(), conn_id.to_owned());
    let row = s
        .store
        .read(move |c| match sliding_sync::connection(c, &u, &d, &cid)? {
            Some(conn_nid) => sliding_sync::position(c, conn_nid, pos),
            None => Ok(None),
        })
        .await?
        .ok_or_else(Error::unknown_pos)?;
    let sent: Sent = serde_json::from_str(&row.sent).unwrap_or_default();
    Ok(From { pos: row.pos, conn_nid: row.conn_nid, stream: row.stream, typing: row.typing as u64, sent })
}

/// Records the answer's position: a new connection, a new position after `from`, or (an answer with nothing new)
/// `from` itself moved on.
#[allow(clippy::too_many_arguments)]
async fn save_position(
    s: &AppState,
    auth: &Auth,
    conn_id: &str,
    from: Option<&From>,
    sent: &Sent,
    upto: i64,
    typing: u64,
    news: bool,
) -> Result<i64> {
    let (u, d, cid) = (auth.user_id.to_string(), auth.device_id.clone(), conn_id.to_owned());
    let sent = serde_json::to_string(sent)?;
    let from = from.map(|f| (f.pos, f.conn_nid));
    let now = accounts::now_ms();
    s.store
        .write(move |w| {
            let c = w.db();
            match from {
                None => {
                    let conn_nid = sliding_sync::open_connection(c, &u, &d, &cid, now)?;
                    sliding_sync::add_position(c, conn_nid, None, upto, typing as i64, &sent, now)
                }
                // The connection was started over (or dropped) while this request ran.
                Some((pos, conn_nid)) if sliding_sync::position(c, conn_nid, pos)?.is_none() => {
                    Err(Error::unknown_pos())
                }
                Some((pos, _)) if !news => {
                    sliding_sync::advance_position(c, pos, upto, typing as i64, now)?;
                    Ok(pos)
                }
                Some((pos, conn_nid)) => {
                    sliding_sync::add_position(c, conn_nid, Some(pos), upto, typing as i64, &sent, now)
                }
            }
        })
        .await
}

/// One computation of an answer.
struct Pass<'a> {
    c: Db<'a>,
    auth: &'a Auth,
    req: &'a Request,
    from: Option<&'a From>,
    upto: i64,
    typing: &'a TypingView,
}

impl Pass<'_> {
    /// The answer (without `pos`), what the connection will have been sent, and whether anything is new.
    fn build(&self) -> Result<(Value, Sent, bool)> {
        let (c, user) = (self.c, self.auth.user_id.as_str());
        let mut changed: HashMap<RoomNid, String> = HashMap::new();
        if let Some(f) = self.from {
            for (room, m) in members::changes_of(c, user, StreamPos(f.stream), StreamPos(self.upto))? {
                changed.insert(room, m);
            }
        }
        let ignored = crate::client::notifications::ignored_users(c, user)?;
        let mut cands = lists::candidates(c, user, self.upto, &changed, &ignored)?;
        // Rooms the user peeks (MSC2753) come only through a subscription by id: they are in no list.
        for room_id in self.req.room_subscriptions.keys() {
            if !cands.iter().any(|cand| &cand.room.room_id == room_id) {
                cands.extend(lists::peeked(c, user, room_id, self.upto)?);
            }
        }
        let by_id: HashMap<&str, &Candidate> = cands.iter().map(|c| (c.room.room_id.as_str(), c)).collect();

        // Lists: each one's rooms in order, the rooms in its ranges with the list's config.
        let mut configs: BTreeMap<String, Effective> = BTreeMap::new();
        let mut lists_out = Map::new();
        let mut scope = Scope {
            lists: BTreeMap::new(),
            subscriptions: Vec::new(),
            initial: HashSet::new(),
            timeline_ids: BTreeMap::new(),
            joined: cands.iter().filter(|c| c.membership == "join").map(|c| c.room.room_id.clone()).collect(),
        };
        let mut counts = BTreeMap::new();
        let tags = if self.req.lists.values().any(|l| l.filters.as_ref().is_some_and(|f| f.uses_tags())) {
            lists::room_tags(c, user, &cands)?
        } else {
            HashMap::new()
        };
        for (name, list) in &self.req.lists {
            let children = match list.filters.as_ref().and_then(|f| f.spaces.as_ref()) {
                Some(spaces) => Some(lists::space_children(c, spaces)?),
                None => None,
            };
            let ordered = lists::sorted(&cands, |cand| {
                cand.membership != lists::PEEK
                    && list.filters.as_ref().is_none_or(|f| lists::passes(cand, f, children.as_ref(), &tags))
            });
            counts.insert(name.clone(), ordered.len());
            lists_out.insert(name.clone(), json!({"count": ordered.len()}));
            let mut in_range = Vec::new();
            for (lo, hi) in &list.ranges {
                let hi = (*hi).min(ordered.len().saturating_sub(1) as u64);
                for cand in ordered.iter().skip(*lo as usize).take((hi + 1).saturating_sub(*lo) as usize) {
                    configs
                        .entry(cand.room.room_id.clone())
                        .or_default()
                        .merge(list.timeline_limit, &list.required_state);
                    in_range.push((cand.room.room_nid, cand.room.room_id.clone()));
                }
            }
            scope.lists.insert(name.clone(), in_range);
        }
        for (room_id, sub) in &self.req.room_subscriptions {
            if let Some(cand) = by_id.get(room_id.as_str()) {
                configs.entry(room_id.clone()).or_default().merge(sub.timeline_limit, &sub.required_state);
                scope.subscriptions.push((cand.room.room_nid, room_id.clone()));
            }
        }

        let (rooms_out, sent) = self.rooms(&by_id, &configs, &ignored, &mut scope, counts.clone())?;
        let lists_moved = self.from.is_some_and(|f| f.sent.lists != counts);
        let x = ExtCtx {
            c,
            auth: self.auth,
            req: self.req,
            scope: &scope,
            since: self.from.map(|f| (f.stream, f.typing)),
            upto: self.upto,
            typing: self.typing,
        };
        let (ext_out, ext_news) = extensions::build(&x)?;
        let news = !rooms_out.is_empty() || lists_moved || ext_news;
        let body = json!({"lists": lists_out, "rooms": rooms_out, "extensions": ext_out});
        Ok((body, sent, news))
    }

    /// The rooms to send: those new to the connection (or whose membership changed, whose resync ended) afresh,
    /// the others when something happened in them since they were last sent or their config asks for more than
    /// the connection remembers sending them with (see [`room::joined`]).
    fn rooms(
        &self,
        by_id: &HashMap<&str, &Candidate>,
        configs: &BTreeMap<String, Effective>,
        ignored: &HashSet<String>,
        scope: &mut Scope,
        counts: BTreeMap<String, usize>,
    ) -> Result<(Map<String, Value>, Sent)> {
        let mut sent = self.from.map(|f| f.sent.clone()).unwrap_or_default();
        sent.lists = counts;
        let ctx = room::RoomCtx {
            c: self.c,
            auth: self.auth,
            ignored,
            upto: self.upto,
            conn_since: self.from.map(|f| f.stream),
        };
        let mut out = Map::new();
        for (room_id, config) in configs {
            let Some(cand) = by_id.get(room_id.as_str()) else { continue };
            let prev = sent.rooms.get(room_id);
            // A leave (or ban) continues the room's timeline up to it; any other change of membership (an invite
            // accepted, a rejoin) shows the room anew.
            let gone = cand.membership == "leave" || cand.membership == "ban";
            let fresh = prev.is_none_or(|p| (p.m != cand.membership && !gone) || p.p != cand.room.partial_state);
            let before = prev.filter(|_| !fresh).map(|p| room::Prev { s: p.s, config: &p.c });
            let (body, remembered) = match cand.membership.as_str() {
                "invite" | "knock" => (fresh.then(|| room::stripped(cand, true)), config.clone()),
                _ => match room::joined(&ctx, cand, config, before)? {
                    Some(b) => {
                        scope.timeline_ids.insert(room_id.clone(), b.timeline_ids);
                        (Some(b.body), b.remembered)
                    }
                    None => (None, config.clone()),
                },
            };
            let Some(body) = body else { continue };
            if fresh {
                scope.initial.insert(room_id.clone());
            }
            let s = SentRoom { s: self.upto, c: remembered, m: cand.membership.clone(), p: cand.room.partial_state };
            sent.rooms.insert(room_id.clone(), s);
            out.insert(room_id.clone(), body);
        }
        Ok((out, sent))
    }
}
