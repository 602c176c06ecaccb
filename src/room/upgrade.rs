//! Upgrading a room (`POST /rooms/{roomId}/upgrade`, spec "Room Upgrades"): a new room of the new version that
//! names the old one as its predecessor and carries its configuration over, a tombstone in the old room, the old
//! room's members held to read-only, aliases and the directory entry moved. One write transaction: either all of
//! it happens or none (a user without the power to send the tombstone gets 403 and no new room is left behind).
//!
//! Also the per-user side of an upgrade (as Synapse and Dendrite do, though the spec is silent): when a local user
//! joins a room whose create event names a predecessor, their push rules and tags for the predecessor are copied.

use ruma::{OwnedUserId, RoomId, UserId};
use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::room::append::{append_local, LocalEvent};
use crate::room::create::{create_room, CreateRoom};
use crate::room::power::PowerLevels;
use crate::room::{state_content, version, Identity};
use crate::store::ids::{RoomNid, StateGroup};
use crate::store::{account_data, members, rooms, Writer};

/// State carried into the new room as it is (the spec's list, plus space children and the canonical alias, as
/// Synapse copies them). Power levels are handled apart.
const COPIED_STATE: [&str; 9] = [
    "m.room.server_acl",
    "m.room.encryption",
    "m.room.name",
    "m.room.avatar",
    "m.room.topic",
    "m.room.guest_access",
    "m.room.history_visibility",
    "m.room.join_rules",
    "m.room.canonical_alias",
];

/// Upgrades `old` to `new_version` on behalf of `user`; returns the new room's id.
pub fn upgrade_room(
    w: &mut Writer<'_>,
    identity: &Identity,
    old: &RoomId,
    user: &UserId,
    new_version: &str,
    additional_creators: Vec<OwnedUserId>,
) -> Result<String> {
    if !version::CREATABLE.contains(&new_version) {
        return Err(Error::unsupported_room_version(format!("cannot create rooms of version {new_version}")));
    }
    let new_rules = version::rules(new_version)?;
    let privileged = version::creators_privileged(&new_rules);
    // A version without additional creators ignores them (spec).
    let additional_creators = if privileged { additional_creators } else { Vec::new() };
    let room = rooms::room_by_id(w.db(), old.as_str())?.ok_or_else(|| Error::forbidden("you are not in this room"))?;
    let sg = room.current_sg.ok_or_else(|| Error::forbidden("room has no state"))?;
    if members::membership_of(w.db(), room.room_nid, user.as_str())?.map(|m| m.0).as_deref() != Some("join") {
        return Err(Error::forbidden("you are not in this room"));
    }
    let old_pl = PowerLevels::load(w.db(), sg, &room.version)?;
    if old_pl.user(user) < old_pl.for_event("m.room.tombstone", true) {
        return Err(Error::forbidden("you may not upgrade this room (m.room.tombstone needs more power)"));
    }

    // The new room's power levels: the old ones, without the new room's creators where creators are privileged
    // (MSC4289 forbids listing them), with the old room's creators at 100 where they no longer are.
    let mut new_creators: Vec<String> = vec![user.to_string()];
    new_creators.extend(additional_creators.iter().map(|u| u.to_string()));
    let mut final_pl = state_content(w.db(), sg, "m.room.power_levels", "")?.unwrap_or_else(|| json!({}));
    let users = users_map(&mut final_pl)?;
    if privileged {
        users.retain(|u, _| !new_creators.contains(u));
    } else if version::creators_privileged(&version::rules(&room.version)?) {
        for c in old_pl.creators() {
            users.insert(c.clone(), json!(100));
        }
    }
    // While the state is copied the upgrader needs the power to send it (creators have it anyway); the exact
    // levels are restored at the end.
    let mut initial_pl = final_pl.clone();
    if !privileged {
        let users = users_map(&mut initial_pl)?;
        let had = users.get(user.as_str()).and_then(Value::as_i64).unwrap_or(0);
        users.insert(user.to_string(), json!(had.max(100)));
    }

    let old_create = state_content(w.db(), sg, "m.room.create", "")?.unwrap_or_else(|| json!({}));
    let mut creation = json!({"predecessor": {"room_id": old.as_str()}});
    for key in ["m.federate", "type"] {
        if let Some(v) = old_create.get(key) {
            creation[key] = v.clone();
        }
    }
    if !additional_creators.is_empty() {
        creation["additional_creators"] = json!(additional_creators);
    }
    let mut initial_state = Vec::new();
    for kind in COPIED_STATE {
        if let Some(content) = state_content(w.db(), sg, kind, "")? {
            initial_state.push(LocalEvent::state(kind, "", content));
        }
    }
    for (child, nid) in crate::store::state_groups::load_state_of_type(w.db(), sg, "m.space.child")? {
        if let Some(row) = crate::store::events::event_by_nid(w.db(), nid)? {
            let content = crate::room::pdu_from_row(w.db(), &row)?.content_value();
            if content.get("via").and_then(Value::as_array).is_some_and(|v| !v.is_empty()) {
                initial_state.push(LocalEvent::state("m.space.child", &child, content));
            }
        }
    }

    let mut req = CreateRoom::new(user.to_owned());
    req.room_version = Some(new_version.to_owned());
    // The join rules, history visibility and guest access are copied; the preset only fills what the old room
    // did not have (public_chat adds no guest access event).
    req.preset = Some("public_chat".into());
    req.creation_content = Some(creation);
    req.initial_state = initial_state;
    req.power_level_content_override = Some(initial_pl);
    let (new_room_id, _) = create_room(w, identity, req)?;
    let new_rid = crate::room::parse_room_id(&new_room_id)?;

    carry_over_bans(w, identity, room.room_nid, &new_rid, user)?;
    let new_sg = current_sg(w, &new_rid)?;
    if state_content(w.db(), new_sg, "m.room.power_levels", "")?.as_ref() != Some(&final_pl) {
        append_local(w, identity, &new_rid, user, LocalEvent::state("m.room.power_levels", "", final_pl), None)?;
    }

    let tombstone = json!({"body": "This room has been replaced", "replacement_room": new_room_id});
    append_local(w, identity, old, user, LocalEvent::state("m.room.tombstone", "", tombstone), None)?;
    restrict_old_room(w, identity, old, user)?;
    move_aliases(w, identity, old, &new_room_id, user)?;
    Ok(new_room_id)
}

fn users_map(pl: &mut Value) -> Result<&mut Map<String, Value>> {
    let obj = pl.as_object_mut().ok_or_else(|| Error::internal("power levels content is not an object"))?;
    obj.entry("users")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .ok_or_else(|| Error::bad_json("users is not an object"))
}

fn current_sg(w: &mut Writer<'_>, room: &RoomId) -> Result<StateGroup> {
    rooms::room_by_id(w.db(), room.as_str())?
        .and_then(|r| r.current_sg)
        .ok_or_else(|| Error::internal("new room without state"))
}

/// Users banned from the old room stay banned from the new one.
fn carry_over_bans(
    w: &mut Writer<'_>,
    identity: &Identity,
    old: RoomNid,
    new_room: &RoomId,
    user: &UserId,
) -> Result<()> {
    let banned: Vec<String> =
        members::members(w.db(), old)?.into_iter().filter(|(_, m, _)| m == "ban").map(|(u, _, _)| u).collect();
    for target in banned {
        let ev = LocalEvent::state("m.room.member", &target, json!({"membership": "ban"}));
        append_local(w, identity, new_room, user, ev, None)?;
    }
    Ok(())
}

/// The old room becomes read-only for ordinary members: sending and inviting need at least 50 (and more than the
/// default user level), as the spec recommends. Skipped when the upgrader may not change the power levels.
fn restrict_old_room(w: &mut Writer<'_>, identity: &Identity, old: &RoomId, user: &UserId) -> Result<()> {
    let room = rooms::room_by_id(w.db(), old.as_str())?.ok_or_else(|| Error::not_found("unknown room"))?;
    let sg = room.current_sg.ok_or_else(|| Error::internal("room has no state"))?;
    let pl = PowerLevels::load(w.db(), sg, &room.version)?;
    let Some(mut content) = state_content(w.db(), sg, "m.room.power_levels", "")? else { return Ok(()) };
    if pl.user(user) < pl.for_event("m.room.power_levels", true) {
        return Ok(());
    }
    let restricted = 50.max(pl.action("users_default", 0) + 1);
    let mut changed = false;
    for key in ["events_default", "invite"] {
        if pl.action(key, 0) < restricted {
            content[key] = json!(restricted);
            changed = true;
        }
    }
    if changed {
        append_local(w, identity, old, user, LocalEvent::state("m.room.power_levels", "", content), None)?;
    }
    Ok(())
}

/// Local aliases of the old room point at the new one, the old room stops advertising them, and a published old
/// room is replaced by the new one in the directory.
fn move_aliases(w: &mut Writer<'_>, identity: &Identity, old: &RoomId, new_room: &str, user: &UserId) -> Result<()> {
    for alias in rooms::aliases_of(w.db(), old.as_str())? {
        let creator = rooms::alias_creator(w.db(), &alias)?.map(|(_, c)| c).unwrap_or_else(|| user.to_string());
        rooms::delete_alias(w.db(), &alias)?;
        rooms::insert_alias(w.db(), &alias, new_room, &creator)?;
    }
    let room = rooms::room_by_id(w.db(), old.as_str())?.ok_or_else(|| Error::not_found("unknown room"))?;
    if let Some(sg) = room.current_sg {
        let had_alias = state_content(w.db(), sg, "m.room.canonical_alias", "")?
            .is_some_and(|c| c.get("alias").is_some() || c.get("alt_aliases").is_some());
        let pl = PowerLevels::load(w.db(), sg, &room.version)?;
        if had_alias && pl.user(user) >= pl.for_event("m.room.canonical_alias", true) {
            append_local(w, identity, old, user, LocalEvent::state("m.room.canonical_alias", "", json!({})), None)?;
        }
    }
    if rooms::is_published(w.db(), old.as_str())? {
        rooms::set_published(w.db(), old.as_str(), false)?;
        rooms::set_published(w.db(), new_room, true)?;
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------------------
// A local user joins an upgraded room

/// When local `user` joins `room` for the first time and the room's create event names a predecessor, the user's
/// push rules and tags for the predecessor are copied to it (rules they already have for it are kept).
pub fn carry_over_user_state(w: &mut Writer<'_>, user: &str, room: RoomNid) -> Result<()> {
    let Some(row) = rooms::room_by_nid(w.db(), room)? else { return Ok(()) };
    let Some(sg) = row.current_sg else { return Ok(()) };
    let Some(create) = state_content(w.db(), sg, "m.room.create", "")? else { return Ok(()) };
    let Some(old) = create.pointer("/predecessor/room_id").and_then(Value::as_str) else { return Ok(()) };
    let new = row.room_id.as_str();
    if let Some(mut rules) = account_data::get(w.db(), user, "", "m.push_rules")? {
        if copy_room_rules(&mut rules, old, new) {
            account_data::set(w, user, "", "m.push_rules", &rules)?;
        }
    }
    if account_data::get(w.db(), user, new, "m.tag")?.is_none() {
        if let Some(tags) = account_data::get(w.db(), user, old, "m.tag")? {
            account_data::set(w, user, new, "m.tag", &tags)?;
        }
    }
    Ok(())
}

/// Adds, next to each of the user's own rules about room `old`, the same rule about room `new`: a `room` rule
/// whose id is the room, or a rule of another kind matching `room_id` against `old` (its id gets the new room id
/// in place of the old one). Returns whether anything was added.
fn copy_room_rules(rules: &mut Value, old: &str, new: &str) -> bool {
    let mut added = false;
    let Some(global) = rules.get_mut("global").and_then(Value::as_object_mut) else { return false };
    for (kind, list) in global.iter_mut() {
        let Some(list) = list.as_array_mut() else { continue };
        let ids: Vec<String> = list.iter().filter_map(|r| r["rule_id"].as_str().map(str::to_owned)).collect();
        let mut copies = Vec::new();
        for rule in list.iter() {
            let Some(id) = rule["rule_id"].as_str() else { continue };
            if id.starts_with('.') {
                continue;
            }
            let mut copy = rule.clone();
            if kind == "room" {
                if id != old {
                    continue;
                }
                copy["rule_id"] = json!(new);
            } else {
                let matches_old =
                    |c: &Value| c["kind"] == "event_match" && c["key"] == "room_id" && c["pattern"] == old;
                if !id.contains(old) || !rule["conditions"].as_array().is_some_and(|cs| cs.iter().any(matches_old)) {
                    continue;
                }
                copy["rule_id"] = json!(id.replace(old, new));
                for c in copy["conditions"].as_array_mut().into_iter().flatten() {
                    if matches_old(c) {
                        c["pattern"] = json!(new);
                    }
                }
            }
            if !ids.iter().any(|i| Some(i.as_str()) == copy["rule_id"].as_str()) {
                copies.push(copy);
            }
        }
        added |= !copies.is_empty();
        list.extend(copies);
    }
    added
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_rules_are_copied_to_the_new_room_once() {
        let mut rules = json!({"global": {
            "room": [{"rule_id": "!old:x", "actions": ["dont_notify"], "enabled": true, "default": false}],
            "override": [
                {"rule_id": ".m.rule.master", "default": true, "conditions": [], "actions": []},
                {"rule_id": "mute-!old:x", "default": false, "actions": [],
                 "conditions": [{"kind": "event_match", "key": "room_id", "pattern": "!old:x"}]},
                {"rule_id": "other", "default": false, "actions": [],
                 "conditions": [{"kind": "event_match", "key": "room_id", "pattern": "!else:x"}]}
            ]
        }});
        assert!(copy_room_rules(&mut rules, "!old:x", "!new:x"));
        let room: Vec<&str> =
            rules["global"]["room"].as_array().unwrap().iter().map(|r| r["rule_id"].as_str().unwrap()).collect();
        assert_eq!(room, ["!old:x", "!new:x"]);
        assert_eq!(rules["global"]["room"][1]["actions"], json!(["dont_notify"]));
        let over = &rules["global"]["override"];
        assert_eq!(over.as_array().unwrap().len(), 4);
        assert_eq!(over[3]["rule_id"], "mute-!new:x");
        assert_eq!(over[3]["conditions"][0]["pattern"], "!new:x");
        // A second copy adds nothing.
        assert!(!copy_room_rules(&mut rules, "!old:x", "!new:x"));
    }
}
