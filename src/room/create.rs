//! Creating a room (`POST /createRoom`): the initial events, in one transaction.

use ruma::room_version_rules::RoomVersionRules;
use ruma::{OwnedUserId, RoomId};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::room::append::{self, build_pdu, persist, LocalEvent, Outcome};
use crate::room::{version, Identity};
use crate::store::{rooms, Writer};

#[derive(Debug, Clone)]
pub struct CreateRoom {
    pub creator: OwnedUserId,
    pub room_version: Option<String>,
    pub preset: Option<String>,
    pub visibility_public: bool,
    pub name: Option<String>,
    pub topic: Option<String>,
    pub alias: Option<String>,
    pub invite: Vec<String>,
    pub is_direct: bool,
    pub creation_content: Option<Value>,
    pub initial_state: Vec<LocalEvent>,
    pub power_level_content_override: Option<Value>,
}

impl CreateRoom {
    /// A request with only the creator set: a private room with nothing else configured.
    pub fn new(creator: OwnedUserId) -> CreateRoom {
        CreateRoom {
            creator,
            room_version: None,
            preset: None,
            visibility_public: false,
            name: None,
            topic: None,
            alias: None,
            invite: Vec::new(),
            is_direct: false,
            creation_content: None,
            initial_state: Vec::new(),
            power_level_content_override: None,
        }
    }
}

/// Creates the room; returns its id and the built invites of remote users, which must go through their servers.
pub fn create_room(
    w: &mut Writer<'_>,
    identity: &Identity,
    req: CreateRoom,
) -> Result<(String, Vec<crate::room::Pdu>)> {
    let ver = req.room_version.clone().unwrap_or_else(|| version::DEFAULT_ROOM_VERSION.to_owned());
    if !version::CREATABLE.contains(&ver.as_str()) {
        return Err(Error::unsupported_room_version(format!("cannot create rooms of version {ver}")));
    }
    let rules = version::rules(&ver)?;
    if let Some(alias) = &req.alias {
        if crate::store::rooms::alias_target(w.db(), alias)?.is_some() {
            return Err(Error::room_in_use("room alias already taken"));
        }
    }

    // m.room.create
    let mut create_content = req.creation_content.clone().unwrap_or_else(|| json!({}));
    let obj = create_content.as_object_mut().ok_or_else(|| Error::bad_json("creation_content must be an object"))?;
    obj.insert("room_version".into(), json!(ver));
    if !rules.authorization.use_room_create_sender {
        obj.insert("creator".into(), json!(req.creator));
    }
    let preset =
        req.preset.clone().unwrap_or_else(|| if req.visibility_public { "public_chat" } else { "private_chat" }.into());
    if version::creators_privileged(&rules) && preset == "trusted_private_chat" && !req.invite.is_empty() {
        // Invitees of a trusted private chat share the creator's power: where creators are privileged (MSC4289)
        // that means being creators too, not a power level.
        let mut creators: Vec<Value> = match obj.get("additional_creators") {
            Some(Value::Array(a)) => a.clone(),
            _ => Vec::new(),
        };
        for u in &req.invite {
            if u != req.creator.as_str() && !creators.iter().any(|c| c == u) {
                creators.push(json!(u));
            }
        }
        obj.insert("additional_creators".into(), json!(creators));
    }
    let create_for_pl = create_content.clone();
    let create_ev = LocalEvent::state("m.room.create", "", create_content);
    let room_id = if rules.authorization.room_create_event_id_as_room_id {
        None
    } else {
        let local: String = {
            use rand::Rng;
            rand::thread_rng().sample_iter(rand::distributions::Alphanumeric).take(18).map(char::from).collect()
        };
        Some(RoomId::parse(format!("!{local}:{}", identity.server_name)).map_err(|e| Error::internal(e.to_string()))?)
    };
    let pdu = build_pdu(identity, &rules, room_id.as_deref(), &req.creator, &create_ev, &[], &[], 1)?;
    let room_id = pdu.room_id.to_string();
    let rid = pdu.room_id.clone();
    let room_nid = rooms::insert_room(w.db(), &room_id, &ver)?;
    let room = rooms::room_by_nid(w.db(), room_nid)?.ok_or_else(|| Error::internal("room vanished"))?;
    append::authorize(w.db(), &rules, &pdu, None).map_err(|e| Error::bad_json(format!("invalid create event: {e}")))?;
    persist(w, identity, &room, &rules, &pdu, None, Outcome::Accepted, None)?;
    let send = |w: &mut Writer<'_>, ev: LocalEvent| append::append_local(w, identity, &rid, &req.creator, ev, None);

    // The creator joins.
    let profile = crate::store::accounts::get_user(w.db(), req.creator.as_str())?;
    let mut member = json!({"membership": "join"});
    if let Some(p) = &profile {
        if let Some(d) = &p.displayname {
            member["displayname"] = json!(d);
        }
        if let Some(a) = &p.avatar_url {
            member["avatar_url"] = json!(a);
        }
    }
    send(w, LocalEvent::state("m.room.member", req.creator.as_str(), member))?;

    // Power levels.
    let pl = power_levels(&req, &create_for_pl, &rules, &preset)?;
    send(w, LocalEvent::state("m.room.power_levels", "", pl))?;

    if let Some(alias) = &req.alias {
        send(w, LocalEvent::state("m.room.canonical_alias", "", json!({"alias": alias})))?;
    }

    let (join_rule, history, guest) = match preset.as_str() {
        "public_chat" => ("public", "shared", "forbidden"),
        "private_chat" | "trusted_private_chat" => ("invite", "shared", "can_join"),
        other => return Err(Error::invalid_param(format!("unknown preset `{other}`"))),
    };
    let overridden = |t: &str| req.initial_state.iter().any(|e| e.kind == t && e.state_key.as_deref() == Some(""));
    if !overridden("m.room.join_rules") {
        send(w, LocalEvent::state("m.room.join_rules", "", json!({"join_rule": join_rule})))?;
    }
    if !overridden("m.room.history_visibility") {
        send(w, LocalEvent::state("m.room.history_visibility", "", json!({"history_visibility": history})))?;
    }
    // `forbidden` is what no event means: like Synapse, only the presets that let guests in send one (peers and
    // Complement expect a public room's state without it).
    if guest == "can_join" && !overridden("m.room.guest_access") {
        send(w, LocalEvent::state("m.room.guest_access", "", json!({"guest_access": guest})))?;
    }
    for ev in req.initial_state.iter().cloned() {
        if ev.kind == "m.room.create" || ev.kind == "m.room.member" {
            return Err(Error::bad_json(format!("initial_state may not contain {}", ev.kind)));
        }
        send(w, ev)?;
    }
    if let Some(name) = &req.name {
        send(w, LocalEvent::state("m.room.name", "", json!({"name": name})))?;
    }
    if let Some(topic) = &req.topic {
        // The plain-text topic is written in its rich form too (`m.topic`, spec v1.15), as Synapse does.
        let content = json!({"topic": topic, "m.topic": {"m.text": [{"body": topic, "mimetype": "text/plain"}]}});
        send(w, LocalEvent::state("m.room.topic", "", content))?;
    }
    let mut remote_invites = Vec::new();
    for invitee in &req.invite {
        let mut content = json!({"membership": "invite"});
        if req.is_direct {
            content["is_direct"] = json!(true);
        }
        let invite = LocalEvent::state("m.room.member", invitee, content);
        if let append::LocalOutcome::NeedsCountersign(pdu) =
            append::append_local_or_invite(w, identity, &rid, &req.creator, invite, None)?
        {
            remote_invites.push(*pdu);
        }
    }
    if let Some(alias) = &req.alias {
        crate::store::rooms::insert_alias(w.db(), alias, &room_id, req.creator.as_str())?;
    }
    if req.visibility_public {
        crate::store::rooms::set_published(w.db(), &room_id, true)?;
    }
    Ok((room_id, remote_invites))
}

/// The room's first power levels: Synapse's defaults for the preset, then the request's override. Where creators
/// are privileged (MSC4289) they are not listed, and an override listing one is refused.
fn power_levels(req: &CreateRoom, create: &Value, rules: &RoomVersionRules, preset: &str) -> Result<Value> {
    let mut users = serde_json::Map::new();
    if !version::creators_privileged(rules) {
        users.insert(req.creator.to_string(), json!(100));
    }
    if preset == "trusted_private_chat" && !version::creators_privileged(rules) {
        for u in &req.invite {
            if u != req.creator.as_str() {
                users.insert(u.clone(), json!(100));
            }
        }
    }
    // Where creators are privileged (MSC4289), upgrading the room (a tombstone) is theirs alone by default.
    let tombstone = if version::creators_privileged(rules) { 150 } else { 100 };
    let mut pl = json!({
        "users": users,
        "users_default": 0,
        "events": {
            "m.room.name": 50, "m.room.power_levels": 100, "m.room.history_visibility": 100,
            "m.room.canonical_alias": 50, "m.room.avatar": 50, "m.room.tombstone": tombstone,
            "m.room.server_acl": 100, "m.room.encryption": 100
        },
        "events_default": 0, "state_default": 50, "ban": 50, "kick": 50, "redact": 50,
        // Synapse's defaults: members of a private room may invite, those of a public one need power 50.
        "invite": if preset == "public_chat" { 50 } else { 0 },
        "historical": 100,
        "notifications": {"room": 50}
    });
    if let Some(Value::Object(over)) = &req.power_level_content_override {
        let target = pl.as_object_mut().expect("object literal");
        for (k, v) in over {
            target.insert(k.clone(), v.clone());
        }
    }
    if version::creators_privileged(rules) {
        let mut creators = vec![req.creator.to_string()];
        let extra = create.get("additional_creators").and_then(Value::as_array);
        creators.extend(extra.into_iter().flatten().filter_map(Value::as_str).map(str::to_owned));
        crate::room::append::check_no_creator_in_users(&pl, &creators)?;
    }
    Ok(pl)
}
