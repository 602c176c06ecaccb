//! Sliding sync extensions: `to_device`, `e2ee`, `account_data`, `receipts`, `typing`, built from the same store
//! reads `/sync` uses, scoped to the rooms of the lists and subscriptions they name.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use serde_json::{json, Map, Value};

use crate::client::sliding_sync::request::{Request, Scoped};
use crate::client::sync::{account_data_since, receipts_since, EventFilter};
use crate::error::Result;
use crate::http::Auth;
use crate::room::typing::TypingView;
use crate::store::ids::{RoomNid, StreamPos};
use crate::store::{e2ee, Db};

/// The rooms of this answer an extension may speak of: per list, the rooms in its ranges; the subscriptions.
pub struct Scope {
    pub lists: BTreeMap<String, Vec<(RoomNid, String)>>,
    pub subscriptions: Vec<(RoomNid, String)>,
    /// Rooms sent afresh in this answer.
    pub initial: HashSet<String>,
    /// The timeline event ids of the rooms sent in this answer.
    pub timeline_ids: BTreeMap<String, HashSet<String>>,
    /// Joined rooms (receipts and typing are only theirs).
    pub joined: HashSet<String>,
}

impl Scope {
    /// The rooms an extension covers: those of the lists and subscriptions it names (`*` for all; absent = all).
    fn rooms(&self, ext: &Scoped) -> BTreeMap<String, RoomNid> {
        let mut out = BTreeMap::new();
        let wants = |names: &Option<Vec<String>>, name: &str| {
            names.as_ref().is_none_or(|n| n.iter().any(|x| x == "*" || x == name))
        };
        for (list, rooms) in &self.lists {
            if wants(&ext.lists, list) {
                out.extend(rooms.iter().map(|(nid, id)| (id.clone(), *nid)));
            }
        }
        for (nid, id) in &self.subscriptions {
            if wants(&ext.rooms, id) {
                out.insert(id.clone(), *nid);
            }
        }
        out
    }
}

pub struct ExtCtx<'a> {
    pub c: Db<'a>,
    pub auth: &'a Auth,
    pub req: &'a Request,
    pub scope: &'a Scope,
    /// The connection's previous position: (stream, typing serial).
    pub since: Option<(i64, u64)>,
    pub upto: i64,
    pub typing: &'a TypingView,
}

/// The extensions' answers, and whether any carries something new (a long poll waits while none does).
pub fn build(x: &ExtCtx<'_>) -> Result<(Value, bool)> {
    let mut out = Map::new();
    let mut news = false;
    let ext = &x.req.extensions;
    if let Some(td) = ext.to_device.as_ref().filter(|t| t.enabled == Some(true)) {
        // At most `limit` messages; when there were more, `next_batch` is the last one sent, so the next request
        // (whose `since` acknowledges these) gets the rest.
        let since = td.since_stream().unwrap_or(0);
        let (user, limit) = (x.auth.user_id.as_str(), td.limit());
        let page = e2ee::to_device_page(x.c, user, &x.auth.device_id, StreamPos(since), StreamPos(x.upto), limit)?;
        let next = if page.len() >= limit { page.last().map_or(x.upto, |(p, _)| p.0) } else { x.upto };
        let events: Vec<Value> = page
            .into_iter()
            .map(|(_, m)| json!({"sender": m.sender, "type": m.event_type, "content": m.content}))
            .collect();
        news |= !events.is_empty();
        out.insert("to_device".into(), json!({"next_batch": next.max(since).to_string(), "events": events}));
    }
    if Scoped::on(&ext.e2ee).is_some() {
        let (e, n) = e2ee_ext(x)?;
        news |= n;
        out.insert("e2ee".into(), e);
    }
    if let Some(s) = Scoped::on(&ext.account_data) {
        let (e, n) = account_data(x, s)?;
        news |= n;
        out.insert("account_data".into(), e);
    }
    if let Some(s) = Scoped::on(&ext.receipts) {
        let rooms = receipts(x, s)?;
        news |= !rooms.is_empty();
        out.insert("receipts".into(), json!({"rooms": rooms}));
    }
    if let Some(s) = Scoped::on(&ext.typing) {
        let rooms = typing(x, s);
        news |= !rooms.is_empty();
        out.insert("typing".into(), json!({"rooms": rooms}));
    }
    Ok((Value::Object(out), news))
}

/// One-time key counts and unused fallback key types (always), device list changes since the position.
fn e2ee_ext(x: &ExtCtx<'_>) -> Result<(Value, bool)> {
    let (user, device) = (x.auth.user_id.as_str(), x.auth.device_id.as_str());
    let mut otk = e2ee::one_time_key_counts(x.c, user, device)?;
    otk.entry("signed_curve25519").or_insert(json!(0));
    let fallback = e2ee::unused_fallback_key_types(x.c, user, device)?;
    let (changed, left): (BTreeSet<String>, BTreeSet<String>) = match x.since {
        Some((s, _)) => e2ee::device_list_changes(x.c, user, s, x.upto, true)?,
        None => Default::default(),
    };
    let news = !changed.is_empty() || !left.is_empty();
    Ok((
        json!({
            "device_one_time_keys_count": otk,
            "device_unused_fallback_key_types": fallback,
            "device_lists": {"changed": changed, "left": left},
        }),
        news,
    ))
}

/// Global account data (all of it on a new connection, with the default push rules when the user never changed
/// them; else what changed) and the account data of the rooms in scope (all of it for a room sent afresh).
fn account_data(x: &ExtCtx<'_>, s: &Scoped) -> Result<(Value, bool)> {
    use crate::client::push_rules::{default_ruleset, PUSH_RULES};
    let user = x.auth.user_id.as_str();
    let all = EventFilter::default();
    let lo = x.since.map_or(0, |s| s.0);
    let mut global = account_data_since(x.c, user, "", lo, x.upto, &all)?;
    if x.since.is_none() && !global.iter().any(|e| e["type"] == PUSH_RULES) {
        global.push(json!({"type": PUSH_RULES, "content": default_ruleset(user)}));
    }
    let mut rooms = Map::new();
    for room_id in x.scope.rooms(s).keys() {
        let from = if x.scope.initial.contains(room_id) { 0 } else { lo };
        let events = account_data_since(x.c, user, room_id, from, x.upto, &all)?;
        if !events.is_empty() {
            rooms.insert(room_id.clone(), json!(events));
        }
    }
    let news = !global.is_empty() || !rooms.is_empty();
    Ok((json!({"global": global, "rooms": rooms}), news))
}

/// Receipts of the joined rooms in scope: for a room sent afresh those on its timeline's events and the user's
/// own; else those that moved since the position.
fn receipts(x: &ExtCtx<'_>, s: &Scoped) -> Result<Map<String, Value>> {
    let user = x.auth.user_id.as_str();
    let lo = x.since.map_or(0, |s| s.0);
    let mut rooms = Map::new();
    for (room_id, nid) in x.scope.rooms(s) {
        if !x.scope.joined.contains(&room_id) {
            continue;
        }
        let initial = x.scope.initial.contains(&room_id);
        let Some(mut r) = receipts_since(x.c, nid, if initial { 0 } else { lo }, x.upto, user)? else { continue };
        if initial {
            let ids = x.scope.timeline_ids.get(&room_id);
            if let Some(content) = r["content"].as_object_mut() {
                content.retain(|event_id, by_type| {
                    ids.is_some_and(|ids| ids.contains(event_id))
                        || by_type.as_object().is_some_and(|t| t.values().any(|users| users.get(user).is_some()))
                });
                if content.is_empty() {
                    continue;
                }
            }
        }
        rooms.insert(room_id, r);
    }
    Ok(rooms)
}

/// Who is typing in the joined rooms in scope, where that changed since the position (on a new connection, where
/// anyone is).
fn typing(x: &ExtCtx<'_>, s: &Scoped) -> Map<String, Value> {
    let mut rooms = Map::new();
    for room_id in x.scope.rooms(s).keys() {
        if !x.scope.joined.contains(room_id) {
            continue;
        }
        let users = x.typing.rooms.get(room_id).cloned().unwrap_or_default();
        let moved = match x.since {
            Some((_, serial)) => x.typing.changed.get(room_id).is_some_and(|s| *s > serial),
            None => !users.is_empty(),
        };
        if moved {
            rooms.insert(room_id.clone(), json!({"type": "m.typing", "content": {"user_ids": users}}));
        }
    }
    rooms
}
