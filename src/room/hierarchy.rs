//! Spaces: what a room's summary shows (`/hierarchy`, `/room_summary`, the federation `/hierarchy`), who may see
//! it, and a space's `m.space.child` links. No network here: rooms only another server knows are fetched by
//! `federation::hierarchy`, which judges their summaries with [`remote_room_accessible`].
//!
//! Who may see a room follows the spec's list for `/hierarchy` (and Synapse's `_is_local_room_accessible`): a
//! room whose join rule is `public`, `knock` or `knock_restricted` (where the version has it), or whose history is
//! `world_readable`, is shown to anyone; otherwise to a user who is joined or invited, or who is joined to one of
//! the rooms a `restricted` rule allows; and to a server that has a joined or invited user in it, or a joined user
//! in one of the allowed rooms (that server then filters for its own users).

use ruma::RoomId;
use serde_json::{json, Map, Value};

use crate::error::Result;
use crate::room::{state_content, version};
use crate::store::rooms::{self, RoomRow};
use crate::store::{events, members, state_groups, Db};

/// The only encryption algorithm the spec's summary schema names (others are left out of the summary).
const MEGOLM: &str = "m.megolm.v1.aes-sha2";

/// Who asks to see a room.
#[derive(Clone, Copy, Debug)]
pub enum Viewer<'a> {
    /// A local user (client API).
    User(&'a str),
    /// Another server (federation API), answering for all its users.
    Server(&'a str),
    /// An unauthenticated client (`/room_summary` without a token).
    Anyone,
}

/// A room's summary and, for a space, its `m.space.child` links (stripped events with `origin_server_ts`).
#[derive(Clone, Debug)]
pub struct Entry {
    pub room: Value,
    pub children_state: Vec<Value>,
}

impl Entry {
    /// The shape of one `rooms` item of the client `/hierarchy` (and of the federation answer's `room`).
    pub fn to_json(&self) -> Value {
        let mut v = self.room.clone();
        v["children_state"] = Value::Array(self.children_state.clone());
        v
    }
}

/// The room if this server is in it (a local user is joined): only then is our copy of its state current.
pub fn resident_room(c: Db<'_>, room_id: &str, local_server: &str) -> Result<Option<RoomRow>> {
    let Some(room) = rooms::room_by_id(c, room_id)? else { return Ok(None) };
    if room.current_sg.is_none() || !members::server_has_membership(c, room.room_nid, local_server, "join")? {
        return Ok(None);
    }
    Ok(Some(room))
}

fn str_field(v: Option<Value>, key: &str) -> Option<String> {
    v.and_then(|c| c.get(key).and_then(Value::as_str).map(str::to_owned))
}

/// The room ids a `restricted` (or `knock_restricted`) join rule names, when the room's version has that rule.
fn allowed_rooms(join_rules: Option<&Value>, room_version: &str) -> Vec<String> {
    let Some(jr) = join_rules else { return vec![] };
    let Ok(rules) = version::rules(room_version) else { return vec![] };
    let restricted = match jr.get("join_rule").and_then(Value::as_str) {
        Some("restricted") => rules.authorization.restricted_join_rule,
        Some("knock_restricted") => rules.authorization.knock_restricted_join_rule,
        _ => false,
    };
    if !restricted {
        return vec![];
    }
    let mut out = Vec::new();
    for entry in jr.get("allow").and_then(Value::as_array).into_iter().flatten() {
        if entry.get("type").and_then(Value::as_str) != Some("m.room_membership") {
            continue;
        }
        if let Some(id) = entry.get("room_id").and_then(Value::as_str).filter(|id| RoomId::parse(*id).is_ok()) {
            if !out.iter().any(|x| x == id) {
                out.push(id.to_owned());
            }
        }
    }
    out
}

/// Anyone may see the room: a join rule that lets anyone join or knock, or world-readable history.
fn open_to_all(join_rule: Option<&str>, history_visibility: Option<&str>, room_version: &str) -> bool {
    let rules = version::rules(room_version).ok();
    let open = match join_rule {
        Some("public") => true,
        Some("knock") => rules.is_some_and(|r| r.authorization.knocking),
        Some("knock_restricted") => rules.is_some_and(|r| r.authorization.knock_restricted_join_rule),
        _ => false,
    };
    open || history_visibility == Some("world_readable")
}

/// Whether `user_id` is joined to one of `rooms` (as this server knows it).
fn user_in_any(c: Db<'_>, rooms_ids: &[String], user_id: &str) -> Result<bool> {
    for id in rooms_ids {
        if let Some(r) = rooms::room_by_id(c, id)? {
            if members::membership_of(c, r.room_nid, user_id)?.is_some_and(|m| m.0 == "join") {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Whether `viewer` may see the summary of a room we hold (see the module comment).
pub fn local_room_accessible(c: Db<'_>, room: &RoomRow, viewer: Viewer<'_>) -> Result<bool> {
    let Some(sg) = room.current_sg else {
        // A room we only know from an invite (or a knock): the invited user may see what it showed.
        return Ok(match viewer {
            Viewer::User(u) => {
                members::membership_of(c, room.room_nid, u)?.is_some_and(|m| m.0 == "invite" || m.0 == "knock")
            }
            _ => false,
        });
    };
    let join_rules = state_content(c, sg, "m.room.join_rules", "")?;
    let rule = join_rules.as_ref().and_then(|j| j.get("join_rule")).and_then(Value::as_str);
    let hv = str_field(state_content(c, sg, "m.room.history_visibility", "")?, "history_visibility");
    if open_to_all(rule, hv.as_deref(), &room.version) {
        return Ok(true);
    }
    let allowed = allowed_rooms(join_rules.as_ref(), &room.version);
    match viewer {
        Viewer::User(u) => {
            if members::membership_of(c, room.room_nid, u)?.is_some_and(|m| m.0 == "join" || m.0 == "invite") {
                return Ok(true);
            }
            user_in_any(c, &allowed, u)
        }
        Viewer::Server(s) => {
            if members::server_has_membership(c, room.room_nid, s, "join")?
                || members::server_has_membership(c, room.room_nid, s, "invite")?
            {
                return Ok(true);
            }
            for id in &allowed {
                if let Some(r) = rooms::room_by_id(c, id)? {
                    if members::server_has_membership(c, r.room_nid, s, "join")? {
                        return Ok(true);
                    }
                }
            }
            Ok(false)
        }
        Viewer::Anyone => Ok(false),
    }
}

/// The summary of a room we hold (its current state): the spec's `RoomSummary` fields that are set.
pub fn summary(c: Db<'_>, room: &RoomRow) -> Result<Value> {
    let mut out = Map::new();
    out.insert("room_id".into(), json!(room.room_id));
    out.insert("room_version".into(), json!(room.version));
    out.insert("num_joined_members".into(), json!(members::member_counts(c, room.room_nid)?.0));
    let Some(sg) = room.current_sg else {
        out.insert("world_readable".into(), json!(false));
        out.insert("guest_can_join".into(), json!(false));
        return Ok(Value::Object(out));
    };
    let get = |t: &str, k: &str| state_content(c, sg, t, k);
    let hv = str_field(get("m.room.history_visibility", "")?, "history_visibility");
    out.insert("world_readable".into(), json!(hv.as_deref() == Some("world_readable")));
    let guest = str_field(get("m.room.guest_access", "")?, "guest_access");
    out.insert("guest_can_join".into(), json!(guest.as_deref() == Some("can_join")));
    if let Some(name) = str_field(get("m.room.name", "")?, "name") {
        out.insert("name".into(), json!(name));
    }
    if let Some(topic) = str_field(get("m.room.topic", "")?, "topic") {
        out.insert("topic".into(), json!(topic));
    }
    if let Some(alias) = str_field(get("m.room.canonical_alias", "")?, "alias").filter(|a| a.starts_with('#')) {
        out.insert("canonical_alias".into(), json!(alias));
    }
    if let Some(url) = str_field(get("m.room.avatar", "")?, "url").filter(|u| u.starts_with("mxc://")) {
        out.insert("avatar_url".into(), json!(url));
    }
    if let Some(kind) = str_field(get("m.room.create", "")?, "type") {
        out.insert("room_type".into(), json!(kind));
    }
    if str_field(get("m.room.encryption", "")?, "algorithm").as_deref() == Some(MEGOLM) {
        out.insert("encryption".into(), json!(MEGOLM));
    }
    let join_rules = get("m.room.join_rules", "")?;
    if let Some(rule) = join_rules.as_ref().and_then(|j| j.get("join_rule")).and_then(Value::as_str) {
        out.insert("join_rule".into(), json!(rule));
    }
    let allowed = allowed_rooms(join_rules.as_ref(), &room.version);
    if !allowed.is_empty() {
        out.insert("allowed_room_ids".into(), json!(allowed));
    }
    Ok(Value::Object(out))
}

/// A `via` that names at least one server, all strings (a link without one is removed, e.g. redacted).
pub fn valid_via(content: &Value) -> bool {
    content.get("via").and_then(Value::as_array).is_some_and(|a| !a.is_empty() && a.iter().all(Value::is_string))
}

/// A child link marked `"suggested": true`.
pub fn is_suggested(child: &Value) -> bool {
    child.pointer("/content/suggested").and_then(Value::as_bool) == Some(true)
}

/// The spec's order of a space's children: by `order` (a string of at most 50 characters in `\x20`-`\x7E`; links
/// without a valid one come last), then by the link's `origin_server_ts`, then by the child's room id.
pub fn sort_children(children: &mut [Value]) {
    fn key(v: &Value) -> (bool, String, i64, String) {
        let order = v
            .pointer("/content/order")
            .and_then(Value::as_str)
            .filter(|o| o.len() <= 50 && o.bytes().all(|b| (0x20..=0x7e).contains(&b)));
        (
            order.is_none(),
            order.unwrap_or_default().to_owned(),
            v.get("origin_server_ts").and_then(Value::as_i64).unwrap_or(0),
            v.get("state_key").and_then(Value::as_str).unwrap_or_default().to_owned(),
        )
    }
    children.sort_by_cached_key(key);
}

/// The room's current `m.space.child` links to valid room ids with a valid `via`, as stripped events with
/// `origin_server_ts`, in the spec's order; only the suggested ones when `suggested_only`.
pub fn children_state(c: Db<'_>, room: &RoomRow, suggested_only: bool) -> Result<Vec<Value>> {
    let Some(sg) = room.current_sg else { return Ok(vec![]) };
    let mut out = Vec::new();
    for (state_key, nid) in state_groups::load_state_of_type(c, sg, "m.space.child")? {
        if RoomId::parse(&state_key).is_err() {
            continue;
        }
        let Some(row) = events::event_by_nid(c, nid)?.filter(|r| r.rejected.is_none()) else { continue };
        let ev: Value = serde_json::from_str(&row.json)?;
        let content = ev.get("content").cloned().unwrap_or_else(|| json!({}));
        if !valid_via(&content) {
            continue;
        }
        let child = json!({
            "type": "m.space.child", "state_key": state_key, "content": content,
            "sender": row.sender, "origin_server_ts": row.origin_server_ts,
        });
        if !suggested_only || is_suggested(&child) {
            out.push(child);
        }
    }
    sort_children(&mut out);
    Ok(out)
}

/// The entry of a room we hold if `viewer` may see it; with its children's links when it is a space and
/// `with_children`.
pub fn local_entry(
    c: Db<'_>,
    room: &RoomRow,
    viewer: Viewer<'_>,
    suggested_only: bool,
    with_children: bool,
) -> Result<Option<Entry>> {
    if !local_room_accessible(c, room, viewer)? {
        return Ok(None);
    }
    let summary = summary(c, room)?;
    let is_space = summary.get("room_type").and_then(Value::as_str) == Some("m.space");
    let children_state = if is_space && with_children { children_state(c, room, suggested_only)? } else { vec![] };
    Ok(Some(Entry { room: summary, children_state }))
}

/// Whether a room summary another server gave us may be shown to `user` (None: unauthenticated): open to all,
/// or the user is joined to one of its `allowed_room_ids`, or our own copy of the room lets them see it (an
/// invite, say). As Synapse's `_is_remote_room_accessible`; a missing `join_rule` counts as public, as the spec says.
pub fn remote_room_accessible(c: Db<'_>, user: Option<&str>, room: &Value) -> Result<bool> {
    let rule = room.get("join_rule").and_then(Value::as_str).unwrap_or("public");
    if matches!(rule, "public" | "knock" | "knock_restricted") || room.get("world_readable") == Some(&json!(true)) {
        return Ok(true);
    }
    let Some(user) = user else { return Ok(false) };
    let allowed: Vec<String> = room
        .get("allowed_room_ids")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or_default();
    if user_in_any(c, &allowed, user)? {
        return Ok(true);
    }
    let Some(room_id) = room.get("room_id").and_then(Value::as_str) else { return Ok(false) };
    match rooms::room_by_id(c, room_id)? {
        Some(local) => local_room_accessible(c, &local, Viewer::User(user)),
        None => Ok(false),
    }
}

/// A room summary from another server, kept to the fields and types the spec gives (None without a valid
/// `room_id`): what we pass on to our clients must match the spec's schema whatever the other server sent.
pub fn sanitize_summary(v: &Value) -> Option<Value> {
    let room_id = v.get("room_id").and_then(Value::as_str).filter(|id| RoomId::parse(*id).is_ok())?;
    let mut out = Map::new();
    out.insert("room_id".into(), json!(room_id));
    let members = v.get("num_joined_members").and_then(Value::as_u64).unwrap_or(0);
    out.insert("num_joined_members".into(), json!(members));
    for key in ["world_readable", "guest_can_join"] {
        out.insert(key.into(), json!(v.get(key).and_then(Value::as_bool).unwrap_or(false)));
    }
    for key in ["name", "topic", "join_rule", "room_type", "room_version"] {
        if let Some(s) = v.get(key).and_then(Value::as_str) {
            out.insert(key.into(), json!(s));
        }
    }
    for (key, prefix) in [("canonical_alias", "#"), ("avatar_url", "mxc://")] {
        if let Some(s) = v.get(key).and_then(Value::as_str).filter(|s| s.starts_with(prefix)) {
            out.insert(key.into(), json!(s));
        }
    }
    if v.get("encryption").and_then(Value::as_str) == Some(MEGOLM) {
        out.insert("encryption".into(), json!(MEGOLM));
    }
    let allowed: Vec<&str> = v
        .get("allowed_room_ids")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).filter(|id| RoomId::parse(*id).is_ok()).collect())
        .unwrap_or_default();
    if !allowed.is_empty() {
        out.insert("allowed_room_ids".into(), json!(allowed));
    }
    Some(Value::Object(out))
}

/// `m.space.child` links from another server, kept to valid ones (room-id state key, a `via`) in the stripped
/// shape, in the spec's order.
pub fn sanitize_children_state(v: Option<&Value>) -> Vec<Value> {
    let mut out: Vec<Value> = v
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|ev| ev.get("type").and_then(Value::as_str) == Some("m.space.child"))
        .filter_map(|ev| {
            let state_key = ev.get("state_key").and_then(Value::as_str).filter(|k| RoomId::parse(*k).is_ok())?;
            let content = ev.get("content").filter(|c| c.is_object() && valid_via(c))?;
            Some(json!({
                "type": "m.space.child", "state_key": state_key, "content": content,
                "sender": ev.get("sender").and_then(Value::as_str)?,
                "origin_server_ts": ev.get("origin_server_ts").and_then(Value::as_i64)?,
            }))
        })
        .collect();
    sort_children(&mut out);
    out
}

/// The federation `/hierarchy` answer for `origin` (None when the room is unknown to us or hidden from it): the
/// room with its links, the summaries of the children we hold that `origin` may see (without their own links),
/// and the ids of those it may not.
pub fn federation_answer(
    c: Db<'_>,
    room_id: &str,
    origin: &str,
    suggested_only: bool,
    local_server: &str,
) -> Result<Option<Value>> {
    /// At most this many children are looked at (Synapse's `MAX_ROOMS_PER_SPACE`).
    const MAX_CHILDREN: usize = 50;
    let Some(room) = resident_room(c, room_id, local_server)? else { return Ok(None) };
    let Some(entry) = local_entry(c, &room, Viewer::Server(origin), suggested_only, true)? else { return Ok(None) };
    let mut children = Vec::new();
    let mut inaccessible = Vec::new();
    for child in entry.children_state.iter().take(MAX_CHILDREN) {
        let Some(child_id) = child.get("state_key").and_then(Value::as_str) else { continue };
        let Some(child_room) = resident_room(c, child_id, local_server)? else { continue };
        match local_entry(c, &child_room, Viewer::Server(origin), suggested_only, false)? {
            Some(e) => children.push(e.room),
            None => inaccessible.push(child_id.to_owned()),
        }
    }
    Ok(Some(json!({"room": entry.to_json(), "children": children, "inaccessible_children": inaccessible})))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(child: &str, order: Option<Value>, ts: i64) -> Value {
        let mut content = json!({"via": ["x"]});
        if let Some(o) = order {
            content["order"] = o;
        }
        json!({"type": "m.space.child", "state_key": child, "content": content, "sender": "@a:x", "origin_server_ts": ts})
    }

    #[test]
    fn children_sort_by_valid_order_then_time_then_room_id() {
        let mut v = vec![
            link("!e:x", None, 1),
            link("!d:x", Some(json!("\u{7f}bad")), 0),
            link("!c:x", Some(json!(7)), 5),
            link("!b:x", Some(json!("b")), 9),
            link("!a:x", Some(json!("b")), 9),
            link("!z:x", Some(json!("a")), 10),
            link("!y:x", Some(json!("x".repeat(51))), 0),
        ];
        sort_children(&mut v);
        let ids: Vec<&str> = v.iter().map(|e| e["state_key"].as_str().unwrap()).collect();
        // Invalid orders (not a string, outside \x20-\x7E, longer than 50) count as none.
        assert_eq!(ids, vec!["!z:x", "!a:x", "!b:x", "!d:x", "!y:x", "!e:x", "!c:x"]);
    }

    #[test]
    fn a_link_needs_a_via_of_strings() {
        assert!(valid_via(&json!({"via": ["a"]})));
        assert!(!valid_via(&json!({"via": []})));
        assert!(!valid_via(&json!({"via": [1]})));
        assert!(!valid_via(&json!({})));
    }

    #[test]
    fn a_remote_room_is_open_to_all_by_its_join_rule_or_history() {
        let db = crate::store::testing::memory_db();
        let c = db.db();
        let public = json!({"room_id": "!a:x"});
        assert!(remote_room_accessible(c, None, &public).unwrap(), "no join_rule counts as public");
        let knock = json!({"room_id": "!a:x", "join_rule": "knock"});
        assert!(remote_room_accessible(c, None, &knock).unwrap());
        let readable = json!({"room_id": "!a:x", "join_rule": "invite", "world_readable": true});
        assert!(remote_room_accessible(c, None, &readable).unwrap());
        let private = json!({"room_id": "!a:x", "join_rule": "invite", "allowed_room_ids": ["!b:x"]});
        assert!(!remote_room_accessible(c, None, &private).unwrap());
        assert!(!remote_room_accessible(c, Some("@u:x"), &private).unwrap(), "not in the allowed room");
    }
}
