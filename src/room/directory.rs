//! The room directory: which rooms a `/publicRooms` request reads (the server's own directory, one application
//! service's network, or all of them) and each room's entry, for the client API and federation alike.

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::store::{rooms, Db};

/// Which room directory a `/publicRooms` request reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Directory {
    /// The server's own (`PUT /directory/list/room/{roomId}`).
    Main,
    /// One application service's network (`PUT /directory/list/appservice/{networkId}/{roomId}`), named by the
    /// instance id `/thirdparty/protocols` gives out: `<appservice id>|<network id>` (as Synapse).
    Network(String, String),
    /// The main directory and every network's (`include_all_networks`).
    All,
}

impl Directory {
    /// From the request's `third_party_instance_id` and `include_all_networks` (the spec allows the first only
    /// when the second is false).
    pub fn of(instance: Option<&str>, all: bool) -> Result<Directory> {
        match (instance, all) {
            (Some(_), true) => {
                Err(Error::invalid_param("third_party_instance_id cannot be used with include_all_networks"))
            }
            (Some(i), false) => {
                let (svc, net) = i
                    .split_once('|')
                    .ok_or_else(|| Error::invalid_param("third_party_instance_id is not an instance id of ours"))?;
                Ok(Directory::Network(svc.to_owned(), net.to_owned()))
            }
            (None, true) => Ok(Directory::All),
            (None, false) => Ok(Directory::Main),
        }
    }

    /// The rooms of this directory: (room nid, room id, joined members), most members first.
    pub fn rooms(&self, c: Db<'_>) -> Result<Vec<(i64, String, i64)>> {
        use crate::store::appservice::network_rooms;
        Ok(match self {
            Directory::Main => rooms::published_rooms(c)?,
            Directory::Network(svc, net) => network_rooms(c, Some((svc, net)))?,
            Directory::All => {
                let mut all = rooms::published_rooms(c)?;
                all.extend(network_rooms(c, None)?);
                all.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.1.cmp(&b.1)));
                all.dedup_by(|a, b| a.1 == b.1);
                all
            }
        })
    }
}

/// The directory's entries (most members first), those matching `term` (lower case) in name, topic, alias or id.
pub fn entries(c: Db<'_>, dir: &Directory, term: Option<&str>) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for (_, room_id, joined) in dir.rooms(c)? {
        let room = rooms::room_by_id(c, &room_id)?.ok_or_else(|| Error::internal("room vanished"))?;
        let Some(sg) = room.current_sg else { continue };
        let get = |t: &str, k: &str| -> Result<Option<Value>> { crate::room::state_content(c, sg, t, k) };
        let name = get("m.room.name", "")?.and_then(|v| v.get("name").cloned());
        let topic = get("m.room.topic", "")?.and_then(|v| v.get("topic").cloned());
        let alias = get("m.room.canonical_alias", "")?.and_then(|v| v.get("alias").cloned());
        let avatar = get("m.room.avatar", "")?.and_then(|v| v.get("url").cloned());
        let join_rule = get("m.room.join_rules", "")?.and_then(|v| v.get("join_rule").cloned());
        let hv = get("m.room.history_visibility", "")?.and_then(|v| v.get("history_visibility").cloned());
        let guest = get("m.room.guest_access", "")?.and_then(|v| v.get("guest_access").cloned());
        if let Some(term) = term {
            let hay = format!(
                "{} {} {} {}",
                name.clone().unwrap_or_default(),
                topic.clone().unwrap_or_default(),
                alias.clone().unwrap_or_default(),
                room_id
            )
            .to_lowercase();
            if !hay.contains(term) {
                continue;
            }
        }
        let mut entry = json!({
            "room_id": room_id, "num_joined_members": joined,
            "world_readable": hv.as_ref().and_then(Value::as_str) == Some("world_readable"),
            "guest_can_join": guest.as_ref().and_then(Value::as_str) == Some("can_join"),
            "join_rule": join_rule.unwrap_or(json!("public")),
        });
        for (k, v) in [("name", name), ("topic", topic), ("canonical_alias", alias), ("avatar_url", avatar)] {
            if let Some(v) = v {
                entry[k] = v;
            }
        }
        out.push(entry);
    }
    Ok(out)
}

/// One page of a directory's entries as `/publicRooms` answers (`since` is an `o<offset>` token of ours).
pub fn page(entries: Vec<Value>, limit: Option<u64>, since: Option<&str>) -> Value {
    let limit = limit.unwrap_or(100).clamp(1, 500) as usize;
    let offset: usize = since.and_then(|t| t.strip_prefix('o')).and_then(|n| n.parse().ok()).unwrap_or(0);
    let total = entries.len();
    let chunk: Vec<Value> = entries.into_iter().skip(offset).take(limit).collect();
    let mut body = json!({"chunk": chunk, "total_room_count_estimate": total});
    if offset + limit < total {
        body["next_batch"] = json!(format!("o{}", offset + limit));
    }
    if offset > 0 {
        body["prev_batch"] = json!(format!("o{}", offset.saturating_sub(limit)));
    }
    body
}
