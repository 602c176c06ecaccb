//! State: interned (type, state_key) pairs, state groups (roots and delta chains) and lookups in them.

use std::collections::HashMap;

use rusqlite::{params, OptionalExtension};

use crate::error::Result;
use crate::store::ids::{EventNid, RoomNid, StateGroup, StateKeyNid};
use crate::store::Db;

/// Interns `(type, state_key)`.
pub fn state_key_nid(conn: Db<'_>, event_type: &str, state_key: &str) -> Result<StateKeyNid> {
    if let Some(nid) = find_state_key_nid(conn, event_type, state_key)? {
        return Ok(nid);
    }
    conn.prepare_cached("INSERT INTO state_keys (event_type, state_key) VALUES (?1, ?2)")?
        .execute(params![event_type, state_key])?;
    Ok(StateKeyNid(conn.last_insert_rowid()))
}

/// Creates the state keys `keys` that do not exist yet, in the order given. Given in key order (as a big answer's
/// scan gives them), each write appends to the keys' unique index; created one by one as the events naming them
/// are stored, in the answer's order, they touched pages all over it (a tenth of a 100k-member resync's log).
pub fn ensure_state_keys<'k>(conn: Db<'_>, keys: impl IntoIterator<Item = &'k (String, String)>) -> Result<()> {
    let mut ins = conn.prepare_cached("INSERT OR IGNORE INTO state_keys (event_type, state_key) VALUES (?1, ?2)")?;
    for (event_type, state_key) in keys {
        ins.execute(params![event_type, state_key])?;
    }
    Ok(())
}

pub fn find_state_key_nid(conn: Db<'_>, event_type: &str, state_key: &str) -> Result<Option<StateKeyNid>> {
    Ok(conn
        .prepare_cached("SELECT state_key_nid FROM state_keys WHERE event_type = ?1 AND state_key = ?2")?
        .query_row(params![event_type, state_key], |r| r.get(0))
        .optional()?)
}

pub fn state_key_of(conn: Db<'_>, nid: StateKeyNid) -> Result<(String, String)> {
    Ok(conn
        .prepare_cached("SELECT event_type, state_key FROM state_keys WHERE state_key_nid = ?1")?
        .query_row([nid], |r| Ok((r.get(0)?, r.get(1)?)))?)
}

/// Longest delta chain before a group is written as a full snapshot.
pub const MAX_SG_DEPTH: i64 = 64;

pub fn sg_depth(conn: Db<'_>, sg: StateGroup) -> Result<i64> {
    Ok(conn.prepare_cached("SELECT depth FROM state_groups WHERE sg = ?1")?.query_row([sg], |r| r.get(0))?)
}

pub fn insert_sg(
    conn: Db<'_>,
    room_nid: RoomNid,
    delta_of: Option<StateGroup>,
    depth: i64,
    partial: bool,
) -> Result<StateGroup> {
    conn.prepare_cached("INSERT INTO state_groups (room_nid, delta_of, depth, partial) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![room_nid, delta_of, depth, partial])?;
    Ok(StateGroup(conn.last_insert_rowid()))
}

pub fn insert_sg_entries(conn: Db<'_>, sg: StateGroup, entries: &[(StateKeyNid, Option<EventNid>)]) -> Result<()> {
    let mut stmt = conn.prepare_cached(
        "INSERT OR REPLACE INTO state_group_entries (sg, state_key_nid, event_nid) VALUES (?1, ?2, ?3)",
    )?;
    for (key, ev) in entries {
        stmt.execute(params![sg, key, ev])?;
    }
    Ok(())
}

const CHAIN: &str = "WITH RECURSIVE chain(sg, d) AS (
        SELECT ?1, 0
        UNION ALL
        SELECT g.delta_of, c.d + 1 FROM state_groups g JOIN chain c ON g.sg = c.sg WHERE g.delta_of IS NOT NULL)";

/// The full state of a group: state_key_nid -> event_nid.
pub fn load_state(conn: Db<'_>, sg: StateGroup) -> Result<HashMap<StateKeyNid, EventNid>> {
    let mut stmt = conn.prepare_cached(&format!(
        "{CHAIN} SELECT e.state_key_nid, e.event_nid, c.d FROM state_group_entries e JOIN chain c ON e.sg = c.sg
         ORDER BY c.d DESC"
    ))?;
    let mut state = HashMap::new();
    // Deepest ancestor first, so nearer groups overwrite.
    let mut rows = stmt.query([sg])?;
    while let Some(r) = rows.next()? {
        let key: StateKeyNid = r.get(0)?;
        match r.get::<_, Option<EventNid>>(1)? {
            Some(ev) => state.insert(key, ev),
            None => state.remove(&key),
        };
    }
    Ok(state)
}

/// One entry of a group's state.
pub fn lookup_state(conn: Db<'_>, sg: StateGroup, state_key_nid: StateKeyNid) -> Result<Option<EventNid>> {
    let row: Option<Option<EventNid>> = conn
        .prepare_cached(&format!(
            "{CHAIN} SELECT e.event_nid FROM state_group_entries e JOIN chain c ON e.sg = c.sg
             WHERE e.state_key_nid = ?2 ORDER BY c.d LIMIT 1"
        ))?
        .query_row(params![sg, state_key_nid], |r| r.get(0))
        .optional()?;
    Ok(row.flatten())
}

/// State entries of a group whose type is `event_type` (e.g. all memberships at an event).
pub fn load_state_of_type(conn: Db<'_>, sg: StateGroup, event_type: &str) -> Result<HashMap<String, EventNid>> {
    let mut stmt = conn.prepare_cached(&format!(
        "{CHAIN} SELECT k.state_key, e.event_nid FROM state_group_entries e JOIN chain c ON e.sg = c.sg
         JOIN state_keys k ON k.state_key_nid = e.state_key_nid WHERE k.event_type = ?2 ORDER BY c.d DESC"
    ))?;
    let mut out = HashMap::new();
    let mut rows = stmt.query(params![sg, event_type])?;
    while let Some(r) = rows.next()? {
        let key: String = r.get(0)?;
        match r.get::<_, Option<EventNid>>(1)? {
            Some(ev) => out.insert(key, ev),
            None => out.remove(&key),
        };
    }
    Ok(out)
}

/// A group's state as (event_nid, event_id), optionally without one event type (e.g. members), in one query.
pub fn state_event_ids(conn: Db<'_>, sg: StateGroup, exclude_type: Option<&str>) -> Result<Vec<(EventNid, String)>> {
    // Without the members, a big room's state is a few dozen entries among 100k: when the other types have few
    // state keys (they are shared by all rooms), look each up in each group of the chain instead of scanning the
    // whole state (0.2 ms against 20 ms at 100k members).
    let seek = match exclude_type {
        Some(t) => {
            let others: i64 = conn
                .prepare_cached("SELECT count(*) FROM state_keys WHERE event_type < ?1 OR event_type > ?1")?
                .query_row([t], |r| r.get(0))?;
            others <= 2000
        }
        None => false,
    };
    let mut stmt = if seek {
        // CROSS JOIN fixes the order: groups, then the other types' keys, then one primary-key seek per pair.
        conn.prepare_cached(&format!(
            "{CHAIN} SELECT e.state_key_nid, e.event_nid, ev.event_id FROM chain c
             CROSS JOIN state_keys k CROSS JOIN state_group_entries e ON e.sg = c.sg AND e.state_key_nid = k.state_key_nid
             LEFT JOIN events ev ON ev.event_nid = e.event_nid
             WHERE (k.event_type < ?2 OR k.event_type > ?2) ORDER BY c.d DESC"
        ))?
    } else {
        conn.prepare_cached(&format!(
            "{CHAIN} SELECT e.state_key_nid, e.event_nid, ev.event_id FROM state_group_entries e JOIN chain c ON e.sg = c.sg
             JOIN state_keys k ON k.state_key_nid = e.state_key_nid LEFT JOIN events ev ON ev.event_nid = e.event_nid
             WHERE k.event_type != ?2 ORDER BY c.d DESC"
        ))?
    };
    let mut map: HashMap<StateKeyNid, Option<(EventNid, String)>> = HashMap::new();
    let mut rows = stmt.query(params![sg, exclude_type.unwrap_or("")])?;
    while let Some(r) = rows.next()? {
        let skn: StateKeyNid = r.get(0)?;
        let nid: Option<EventNid> = r.get(1)?;
        let id: Option<String> = r.get(2)?;
        map.insert(skn, nid.zip(id));
    }
    Ok(map.into_values().flatten().collect())
}

/// The groups of `sg`'s delta chain, `sg` first, its root last.
pub fn chain_of(conn: Db<'_>, sg: StateGroup) -> Result<Vec<StateGroup>> {
    let mut stmt = conn.prepare_cached(&format!("{CHAIN} SELECT sg FROM chain ORDER BY d"))?;
    let rows = stmt.query_map([sg], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The entries written in one group: its delta over its parent (`None`: the key was removed), or a root's state.
pub fn group_entries(conn: Db<'_>, sg: StateGroup) -> Result<Vec<(StateKeyNid, Option<EventNid>)>> {
    let mut stmt = conn.prepare_cached("SELECT state_key_nid, event_nid FROM state_group_entries WHERE sg = ?1")?;
    let rows = stmt.query_map([sg], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The entries in which the states of `groups` differ: key -> each group's event there (`None`: not in that
/// group's state), keys in order. When the groups' delta chains meet (the groups of a fork grow from the group at
/// the fork point), only the deltas above the nearest group they share are read, and the shared group's entry for
/// each key they touch; otherwise (a chain was cut by a full snapshot) the whole states.
pub fn differing_entries(
    conn: Db<'_>,
    groups: &[StateGroup],
) -> Result<std::collections::BTreeMap<StateKeyNid, Vec<Option<EventNid>>>> {
    let chains: Vec<Vec<StateGroup>> = groups.iter().map(|g| chain_of(conn, *g)).collect::<Result<_>>()?;
    let common =
        chains.first().and_then(|first| first.iter().find(|g| chains[1..].iter().all(|c| c.contains(g))).copied());
    let mut out = std::collections::BTreeMap::new();
    match common {
        Some(shared) => {
            // Each group's changes above the shared group, the nearest delta winning.
            let mut above: Vec<HashMap<StateKeyNid, Option<EventNid>>> = Vec::with_capacity(groups.len());
            for chain in &chains {
                let mut changes = HashMap::new();
                for g in chain.iter().take_while(|g| **g != shared) {
                    for (k, v) in group_entries(conn, *g)? {
                        changes.entry(k).or_insert(v);
                    }
                }
                above.push(changes);
            }
            let keys: std::collections::BTreeSet<StateKeyNid> = above.iter().flat_map(|m| m.keys().copied()).collect();
            for k in keys {
                let mut at_shared = None;
                let mut values = Vec::with_capacity(groups.len());
                for changes in &above {
                    values.push(match (changes.get(&k), at_shared) {
                        (Some(v), _) => *v,
                        (None, Some(v)) => v,
                        (None, None) => {
                            let v = lookup_state(conn, shared, k)?;
                            at_shared = Some(v);
                            v
                        }
                    });
                }
                if values.windows(2).any(|w| w[0] != w[1]) {
                    out.insert(k, values);
                }
            }
        }
        None => {
            let states: Vec<HashMap<StateKeyNid, EventNid>> =
                groups.iter().map(|g| load_state(conn, *g)).collect::<Result<_>>()?;
            let keys: std::collections::BTreeSet<StateKeyNid> = states.iter().flat_map(|m| m.keys().copied()).collect();
            for k in keys {
                let values: Vec<Option<EventNid>> = states.iter().map(|s| s.get(&k).copied()).collect();
                if values.windows(2).any(|w| w[0] != w[1]) {
                    out.insert(k, values);
                }
            }
        }
    }
    Ok(out)
}

/// The group a delta group is written over (`None` for a root group or an unknown group).
pub fn delta_of(conn: Db<'_>, sg: StateGroup) -> Result<Option<StateGroup>> {
    Ok(conn
        .prepare_cached("SELECT delta_of FROM state_groups WHERE sg = ?1")?
        .query_row([sg], |r| r.get(0))
        .optional()?
        .flatten())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::events::tests::insert_test_event;
    use crate::store::rooms;
    use crate::store::testing::memory_db;

    #[test]
    fn state_keys_are_interned_once() {
        let conn = memory_db();
        assert_eq!(find_state_key_nid(conn.db(), "m.room.member", "@a:x").unwrap(), None);
        let a = state_key_nid(conn.db(), "m.room.member", "@a:x").unwrap();
        assert_eq!(state_key_nid(conn.db(), "m.room.member", "@a:x").unwrap(), a);
        assert_eq!(find_state_key_nid(conn.db(), "m.room.member", "@a:x").unwrap(), Some(a));
        let b = state_key_nid(conn.db(), "m.room.member", "@b:x").unwrap();
        let c = state_key_nid(conn.db(), "m.room.name", "@a:x").unwrap();
        assert!(a != b && a != c && b != c);
        assert_eq!(state_key_of(conn.db(), c).unwrap(), ("m.room.name".to_owned(), "@a:x".to_owned()));
        assert!(state_key_of(conn.db(), StateKeyNid(c.0 + 100)).is_err());
    }

    /// A room with a root group {create, name, alice} and a delta over it that changes the name, adds bob and
    /// removes alice.
    struct Chain {
        room: RoomNid,
        root: StateGroup,
        delta: StateGroup,
        keys: [StateKeyNid; 4],
        events: [EventNid; 5],
    }

    fn chain(conn: Db<'_>) -> Chain {
        let room = rooms::insert_room(conn, "!r:x", "12").unwrap();
        let create = insert_test_event(conn, room, "$create", Some(1), Some(("m.room.create", "")));
        let name1 = insert_test_event(conn, room, "$name1", Some(2), Some(("m.room.name", "")));
        let alice = insert_test_event(conn, room, "$alice", Some(3), Some(("m.room.member", "@alice:x")));
        let name2 = insert_test_event(conn, room, "$name2", Some(4), Some(("m.room.name", "")));
        let bob = insert_test_event(conn, room, "$bob", Some(5), Some(("m.room.member", "@bob:y")));
        let k_create = state_key_nid(conn, "m.room.create", "").unwrap();
        let k_name = state_key_nid(conn, "m.room.name", "").unwrap();
        let k_alice = state_key_nid(conn, "m.room.member", "@alice:x").unwrap();
        let k_bob = state_key_nid(conn, "m.room.member", "@bob:y").unwrap();
        let root = insert_sg(conn, room, None, 0, false).unwrap();
        insert_sg_entries(conn, root, &[(k_create, Some(create)), (k_name, Some(name1)), (k_alice, Some(alice))])
            .unwrap();
        let delta = insert_sg(conn, room, Some(root), 1, false).unwrap();
        insert_sg_entries(conn, delta, &[(k_name, Some(name2)), (k_bob, Some(bob)), (k_alice, None)]).unwrap();
        Chain {
            room,
            root,
            delta,
            keys: [k_create, k_name, k_alice, k_bob],
            events: [create, name1, alice, name2, bob],
        }
    }

    #[test]
    fn a_delta_chain_loads_as_the_full_state() {
        let conn = memory_db();
        let c = chain(conn.db());
        let [k_create, k_name, k_alice, k_bob] = c.keys;
        let [create, name1, alice, name2, bob] = c.events;
        assert_eq!(sg_depth(conn.db(), c.root).unwrap(), 0);
        assert_eq!(sg_depth(conn.db(), c.delta).unwrap(), 1);
        assert_eq!(delta_of(conn.db(), c.root).unwrap(), None);
        assert_eq!(delta_of(conn.db(), c.delta).unwrap(), Some(c.root));
        assert_eq!(delta_of(conn.db(), StateGroup(c.delta.0 + 100)).unwrap(), None);
        assert_eq!(
            load_state(conn.db(), c.root).unwrap(),
            HashMap::from([(k_create, create), (k_name, name1), (k_alice, alice)])
        );
        assert_eq!(
            load_state(conn.db(), c.delta).unwrap(),
            HashMap::from([(k_create, create), (k_name, name2), (k_bob, bob)])
        );
        // A longer chain: the nearest group wins, a removed key can come back.
        let again = insert_test_event(conn.db(), c.room, "$alice2", Some(6), Some(("m.room.member", "@alice:x")));
        let third = insert_sg(conn.db(), c.room, Some(c.delta), 2, false).unwrap();
        insert_sg_entries(conn.db(), third, &[(k_alice, Some(again))]).unwrap();
        assert_eq!(
            load_state(conn.db(), third).unwrap(),
            HashMap::from([(k_create, create), (k_name, name2), (k_bob, bob), (k_alice, again)])
        );
        assert_eq!(lookup_state(conn.db(), third, k_alice).unwrap(), Some(again));
        assert_eq!(lookup_state(conn.db(), third, k_name).unwrap(), Some(name2));
        assert_eq!(lookup_state(conn.db(), third, k_create).unwrap(), Some(create));
    }

    #[test]
    fn one_entry_is_looked_up_along_the_chain() {
        let conn = memory_db();
        let c = chain(conn.db());
        let [k_create, k_name, k_alice, k_bob] = c.keys;
        let [create, name1, alice, name2, bob] = c.events;
        assert_eq!(lookup_state(conn.db(), c.root, k_name).unwrap(), Some(name1));
        assert_eq!(lookup_state(conn.db(), c.root, k_alice).unwrap(), Some(alice));
        assert_eq!(lookup_state(conn.db(), c.root, k_bob).unwrap(), None);
        assert_eq!(lookup_state(conn.db(), c.delta, k_name).unwrap(), Some(name2));
        assert_eq!(lookup_state(conn.db(), c.delta, k_create).unwrap(), Some(create));
        assert_eq!(lookup_state(conn.db(), c.delta, k_bob).unwrap(), Some(bob));
        // Removed in the delta although present in its parent.
        assert_eq!(lookup_state(conn.db(), c.delta, k_alice).unwrap(), None);
    }

    #[test]
    fn state_of_one_type() {
        let conn = memory_db();
        let c = chain(conn.db());
        let [_, _, alice, _, bob] = c.events;
        assert_eq!(
            load_state_of_type(conn.db(), c.root, "m.room.member").unwrap(),
            HashMap::from([("@alice:x".to_owned(), alice)])
        );
        assert_eq!(
            load_state_of_type(conn.db(), c.delta, "m.room.member").unwrap(),
            HashMap::from([("@bob:y".to_owned(), bob)])
        );
        assert!(load_state_of_type(conn.db(), c.delta, "m.room.topic").unwrap().is_empty());
    }

    #[test]
    fn state_event_ids_with_and_without_members() {
        let conn = memory_db();
        let c = chain(conn.db());
        let [create, _, _, name2, bob] = c.events;
        let sorted = |mut v: Vec<(EventNid, String)>| {
            v.sort();
            v
        };
        assert_eq!(
            sorted(state_event_ids(conn.db(), c.delta, None).unwrap()),
            [(create, "$create".to_owned()), (name2, "$name2".to_owned()), (bob, "$bob".to_owned())]
        );
        assert_eq!(
            sorted(state_event_ids(conn.db(), c.delta, Some("m.room.member")).unwrap()),
            [(create, "$create".to_owned()), (name2, "$name2".to_owned())]
        );
        assert_eq!(sorted(state_event_ids(conn.db(), c.root, Some("m.room.create")).unwrap()).len(), 2);
    }
}
