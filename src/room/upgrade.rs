//! Upgrading a room (`POST /rooms/{roomId}/upgrade`), a basic version of what the spec describes: a new room of
//! the requested version whose create event names the old room as `predecessor`, the old room's configuration
//! (name, topic, avatar, join rules, history visibility, guest access, encryption, server ACL, power levels)
//! copied into it, a tombstone in the old room pointing at the new one, and the old room's `events_default` and
//! `invite` raised so that only moderators can talk or invite there any more. All in one write: a refusal at any
//! step (the user may not send the tombstone, say) leaves both rooms as they were.
//!
//! `additional_creators` become the new room's additional creators where the version privileges creators (v12).
//! When a local user joins a room that has a predecessor (whoever upgraded it, here or elsewhere), their push rules
//! for the old room are copied to the new one ([`carry_over_push_rules`]), as the spec suggests.
//! Not done yet: moving local aliases and the canonical alias, inviting the old room's members, copying tags.

use ruma::{RoomId, UserId};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::room::append::{append_local, LocalEvent};
use crate::room::create::{create_room, CreateRoom};
use crate::room::{state_content, version, Identity};
use crate::store::ids::RoomNid;
use crate::store::{account_data, members, rooms, Writer};

/// State copied from the old room, in this order (power levels are handled apart).
const COPIED: &[&str] = &[
    "m.room.join_rules",
    "m.room.history_visibility",
    "m.room.guest_access",
    "m.room.name",
    "m.room.topic",
    "m.room.avatar",
    "m.room.encryption",
    "m.room.server_acl",
];

fn level(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
}

/// Upgrades `old_room_id` to `new_version` on behalf of `user`; returns the new room's id.
pub fn upgrade_room(
    w: &mut Writer<'_>,
    identity: &Identity,
    old_room_id: &RoomId,
    user: &UserId,
    new_version: &str,
    additional_creators: &[String],
) -> Result<String> {
    if !version::CREATABLE.contains(&new_version) {
        return Err(Error::unsupported_room_version(format!("cannot create rooms of version {new_version}")));
    }
    let old = rooms::room_by_id(w.db(), old_room_id.as_str())?
        .ok_or_else(|| Error::forbidden("you are not joined to this room"))?;
    let joined = members::membership_of(w.db(), old.room_nid, user.as_str())?.is_some_and(|(m, _)| m == "join");
    let Some(sg) = old.current_sg.filter(|_| joined) else {
        return Err(Error::forbidden("you are not joined to this room"));
    };
    let mut initial_state = Vec::new();
    for t in COPIED {
        if let Some(content) = state_content(w.db(), sg, t, "")? {
            initial_state.push(LocalEvent::state(t, "", content));
        }
    }
    let old_pl = state_content(w.db(), sg, "m.room.power_levels", "")?;
    let new_rules = version::rules(new_version)?;
    let mut pl_override = old_pl.clone();
    let mut raised = false;
    if let Some(pl) = pl_override.as_mut().and_then(Value::as_object_mut) {
        if let Some(users) = pl.get_mut("users").and_then(Value::as_object_mut) {
            if version::creators_privileged(&new_rules) {
                users.remove(user.as_str()); // the upgrader creates the new room: unlimited power there
            } else if users.get(user.as_str()).and_then(level).unwrap_or(0) < 100 {
                raised = true;
                users.insert(user.to_string(), json!(100));
            }
        }
    }
    let public = state_content(w.db(), sg, "m.room.join_rules", "")?
        .is_some_and(|c| c.get("join_rule").and_then(Value::as_str) == Some("public"));
    let mut req = CreateRoom::new(user.to_owned());
    req.room_version = Some(new_version.to_owned());
    req.preset = Some(if public { "public_chat" } else { "private_chat" }.to_owned());
    let mut creation = json!({"predecessor": {"room_id": old_room_id}});
    if version::creators_privileged(&new_rules) && !additional_creators.is_empty() {
        creation["additional_creators"] = json!(additional_creators);
        // Creators have unlimited power in such rooms and may not be listed in the power levels.
        if let Some(users) = pl_override.as_mut().and_then(|pl| pl.get_mut("users")).and_then(Value::as_object_mut) {
            for c in additional_creators {
                users.remove(c);
            }
        }
    }
    req.creation_content = Some(creation);
    req.initial_state = initial_state;
    req.power_level_content_override = pl_override;
    let (new_room_id, _) = create_room(w, identity, req)?;
    if let (Some(original), true) = (&old_pl, raised) {
        // The upgrader held less than 100 in the old room: the new room's power levels become the old ones once
        // the state is copied.
        let new_id = RoomId::parse(&new_room_id).map_err(|e| Error::internal(e.to_string()))?;
        append_local(w, identity, &new_id, user, LocalEvent::state("m.room.power_levels", "", original.clone()), None)?;
    }

    let tombstone = json!({"body": "This room has been replaced", "replacement_room": new_room_id});
    append_local(w, identity, old_room_id, user, LocalEvent::state("m.room.tombstone", "", tombstone), None)?;
    if let Some(mut pl) = old_pl {
        let restricted = 50.max(pl.get("users_default").and_then(level).unwrap_or(0) + 1);
        let raise = |pl: &mut Value, k: &str| {
            if pl.get(k).and_then(level).unwrap_or(0) < restricted {
                pl[k] = json!(restricted);
            }
        };
        raise(&mut pl, "events_default");
        raise(&mut pl, "invite");
        // The user may not be allowed to change the power levels: the upgrade stands without the lock.
        let lock = append_local(w, identity, old_room_id, user, LocalEvent::state("m.room.power_levels", "", pl), None);
        if let Err(e) = lock {
            tracing::info!(room_id = %old_room_id, error = %e, "upgraded room left unlocked");
        }
    }
    Ok(new_room_id)
}

/// The user's push rules for a room's predecessor, copied for the room on their join: `room` rules named after the
/// old room, and `override`/`underride` rules whose conditions match the old room's id. Rules already present for
/// the new room are left alone, so joining again changes nothing.
pub fn carry_over_push_rules(w: &mut Writer<'_>, room_nid: RoomNid, user_id: &str) -> Result<()> {
    let Some(room) = rooms::room_by_nid(w.db(), room_nid)? else { return Ok(()) };
    let Some(sg) = room.current_sg else { return Ok(()) };
    let create = state_content(w.db(), sg, "m.room.create", "")?;
    let Some(old) = create.as_ref().and_then(|c| c.pointer("/predecessor/room_id")).and_then(Value::as_str) else {
        return Ok(());
    };
    let Some(mut rules) = account_data::get(w.db(), user_id, "", PUSH_RULES)? else { return Ok(()) };
    let new = room.room_id.as_str();
    let mut changed = false;
    for kind in ["override", "room", "underride"] {
        let Some(list) = rules.pointer_mut(&format!("/global/{kind}")).and_then(Value::as_array_mut) else { continue };
        let mut copies = Vec::new();
        for rule in list.iter() {
            let copy = if kind == "room" {
                (rule["rule_id"] == old).then(|| {
                    let mut r = rule.clone();
                    r["rule_id"] = json!(new);
                    r
                })
            } else {
                let conditions = rule["conditions"].as_array();
                let names_old = conditions.is_some_and(|c| {
                    c.iter().any(|x| x["kind"] == "event_match" && x["key"] == "room_id" && x["pattern"] == old)
                });
                names_old.then(|| {
                    let mut r = rule.clone();
                    r["rule_id"] = json!(format!("{}-{new}", r["rule_id"].as_str().unwrap_or("upgraded")));
                    for c in r["conditions"].as_array_mut().into_iter().flatten() {
                        if c["key"] == "room_id" && c["pattern"] == old {
                            c["pattern"] = json!(new);
                        }
                    }
                    r
                })
            };
            if let Some(c) = copy.filter(|c| !list.iter().any(|r| r["rule_id"] == c["rule_id"])) {
                copies.push(c);
            }
        }
        changed |= !copies.is_empty();
        list.extend(copies);
    }
    if changed {
        account_data::set(w, user_id, "", PUSH_RULES, &rules)?;
    }
    Ok(())
}

/// The account data type holding a user's push rules.
const PUSH_RULES: &str = "m.push_rules";
