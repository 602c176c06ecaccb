//! State groups (immutable snapshots stored as bounded delta chains) and state resolution at forks.

use std::collections::{HashMap, HashSet};

use ruma::events::StateEventType;
use ruma::state_res::utils::event_id_set::EventIdSet;
use ruma::state_res::StateMap;
use ruma::OwnedEventId;

use crate::error::{Error, Result};
use crate::room::{load_pdu, version, Pdu};
use crate::store::events;
use crate::store::ids::{EventNid, RoomNid, StateGroup, StateKeyNid};
use crate::store::state_groups::{self, MAX_SG_DEPTH};
use crate::store::Db;

/// A new group = `parent` with `changes` applied. Written as a delta unless the chain would grow past the bound.
pub fn new_group(
    conn: Db<'_>,
    room_nid: RoomNid,
    parent: Option<StateGroup>,
    changes: &[(StateKeyNid, Option<EventNid>)],
) -> Result<StateGroup> {
    match parent {
        Some(p) => {
            let depth = state_groups::sg_depth(conn, p)? + 1;
            if depth <= MAX_SG_DEPTH {
                let sg = state_groups::insert_sg(conn, room_nid, Some(p), depth, false)?;
                state_groups::insert_sg_entries(conn, sg, changes)?;
                return Ok(sg);
            }
            let mut full = state_groups::load_state(conn, p)?;
            for (k, v) in changes {
                match v {
                    Some(ev) => full.insert(*k, *ev),
                    None => full.remove(k),
                };
            }
            write_full(conn, room_nid, &full)
        }
        None => {
            let full: HashMap<StateKeyNid, EventNid> = changes.iter().filter_map(|(k, v)| v.map(|v| (*k, v))).collect();
            write_full(conn, room_nid, &full)
        }
    }
}

/// Writes a root group holding the whole state.
pub fn write_full(conn: Db<'_>, room_nid: RoomNid, state: &HashMap<StateKeyNid, EventNid>) -> Result<StateGroup> {
    let sg = state_groups::insert_sg(conn, room_nid, None, 0, false)?;
    let entries: Vec<(StateKeyNid, Option<EventNid>)> = state.iter().map(|(k, v)| (*k, Some(*v))).collect();
    state_groups::insert_sg_entries(conn, sg, &entries)?;
    Ok(sg)
}

/// A group holding exactly `state`, written as a delta over `base` (which should be close to it).
pub fn group_for_state(
    conn: Db<'_>,
    room_nid: RoomNid,
    base: StateGroup,
    state: &HashMap<StateKeyNid, EventNid>,
) -> Result<StateGroup> {
    let base_state = state_groups::load_state(conn, base)?;
    let mut changes: Vec<(StateKeyNid, Option<EventNid>)> =
        state.iter().filter(|(k, v)| base_state.get(k) != Some(v)).map(|(k, v)| (*k, Some(*v))).collect();
    changes.extend(base_state.keys().filter(|k| !state.contains_key(k)).map(|k| (*k, None)));
    if changes.is_empty() {
        return Ok(base);
    }
    new_group(conn, room_nid, Some(base), &changes)
}

fn to_state_map(conn: Db<'_>, state: &HashMap<StateKeyNid, EventNid>) -> Result<StateMap<OwnedEventId>> {
    let mut map = StateMap::new();
    for (skn, nid) in state {
        let (t, k) = state_groups::state_key_of(conn, *skn)?;
        let row = events::event_by_nid(conn, *nid)?.ok_or_else(|| Error::internal("state entry without event"))?;
        map.insert(
            (StateEventType::from(t), k),
            OwnedEventId::try_from(row.event_id).map_err(|e| Error::internal(e.to_string()))?,
        );
    }
    Ok(map)
}

/// The full auth chain (event ids) of `ids`.
pub fn auth_chain(conn: Db<'_>, ids: impl IntoIterator<Item = OwnedEventId>) -> Result<HashSet<OwnedEventId>> {
    let mut seen = HashSet::new();
    let mut todo: Vec<OwnedEventId> = ids.into_iter().collect();
    while let Some(id) = todo.pop() {
        for a in events::auth_event_ids(conn, id.as_str())? {
            let Ok(a) = OwnedEventId::try_from(a) else { continue };
            if seen.insert(a.clone()) {
                todo.push(a);
            }
        }
    }
    Ok(seen)
}

/// Resolves the states of several groups (a fork) into one group, with the room version's algorithm.
pub fn resolve_groups(
    conn: Db<'_>,
    room_nid: RoomNid,
    room_version: &str,
    groups: &[StateGroup],
) -> Result<StateGroup> {
    let unique: Vec<StateGroup> = {
        let mut g = groups.to_vec();
        g.sort_unstable();
        g.dedup();
        g
    };
    match unique.as_slice() {
        [] => return Err(Error::internal("no state groups to resolve")),
        [one] => return Ok(*one),
        _ => {}
    }
    let rules = version::rules(room_version)?;
    let states: Vec<HashMap<StateKeyNid, EventNid>> =
        unique.iter().map(|g| state_groups::load_state(conn, *g)).collect::<Result<_>>()?;
    if states.windows(2).all(|w| w[0] == w[1]) {
        return Ok(unique[0]);
    }
    let maps: Vec<StateMap<OwnedEventId>> = states.iter().map(|s| to_state_map(conn, s)).collect::<Result<_>>()?;
    let resolved = resolve_maps(conn, &rules, &maps)?;
    let mut state = HashMap::new();
    for ((t, k), id) in resolved {
        let skn = state_groups::state_key_nid(conn, &t.to_string(), &k)?;
        let nid = events::event_nid(conn, id.as_str())?.ok_or_else(|| Error::internal("resolved to unknown event"))?;
        state.insert(skn, nid);
    }
    group_for_state(conn, room_nid, unique[0], &state)
}

/// Resolves state maps (event ids by type and state key) with the room version's algorithm, the events read from
/// the store.
pub fn resolve_maps(
    conn: Db<'_>,
    rules: &ruma::room_version_rules::RoomVersionRules,
    maps: &[StateMap<OwnedEventId>],
) -> Result<StateMap<OwnedEventId>> {
    let mut chains = Vec::new();
    for m in maps {
        let chain = auth_chain(conn, m.values().cloned())?;
        chains.push(chain.into_iter().collect::<EventIdSet<OwnedEventId>>());
    }
    let fetch = |id: &ruma::EventId| -> Option<Pdu> { load_pdu(conn, id).ok().flatten() };
    let state_res_rules = match rules.state_res {
        ruma::room_version_rules::StateResolutionVersion::V2(r) => r,
        // v1 rooms: resolve with v2 rules (ruma implements only v2); documented limitation.
        _ => ruma::room_version_rules::StateResolutionV2Rules::V2_0,
    };
    let subgraph = |conflicted: &StateMap<Vec<OwnedEventId>>| -> Option<EventIdSet<OwnedEventId>> {
        conflicted_subgraph(conn, conflicted).ok()
    };
    ruma::state_res::resolve(&rules.authorization, &state_res_rules, maps.iter(), chains, fetch, subgraph)
        .map_err(|e| Error::internal(format!("state resolution failed: {e}")))
}

/// The conflicted state subgraph (v12 state resolution): events on auth paths between conflicted events.
fn conflicted_subgraph(conn: Db<'_>, conflicted: &StateMap<Vec<OwnedEventId>>) -> Result<EventIdSet<OwnedEventId>> {
    let starts: HashSet<OwnedEventId> = conflicted.values().flatten().cloned().collect();
    // Walk auth events from every conflicted event; keep events from which a conflicted event is reachable
    // and which reach a conflicted event.
    let mut parents: HashMap<OwnedEventId, Vec<OwnedEventId>> = HashMap::new();
    let mut todo: Vec<OwnedEventId> = starts.iter().cloned().collect();
    let mut seen: HashSet<OwnedEventId> = starts.clone();
    while let Some(id) = todo.pop() {
        if let Some(pdu) = load_pdu(conn, &id)? {
            for a in &pdu.auth_events {
                parents.entry(id.clone()).or_default().push(a.clone());
                if seen.insert(a.clone()) {
                    todo.push(a.clone());
                }
            }
        }
    }
    // Events that can reach a conflicted event via auth edges, reverse direction: compute "reaches conflicted".
    let mut reaches: HashSet<OwnedEventId> = HashSet::new();
    fn dfs(
        id: &OwnedEventId,
        parents: &HashMap<OwnedEventId, Vec<OwnedEventId>>,
        starts: &HashSet<OwnedEventId>,
        memo: &mut HashMap<OwnedEventId, bool>,
    ) -> bool {
        if let Some(v) = memo.get(id) {
            return *v;
        }
        memo.insert(id.clone(), false);
        let mut r = false;
        for p in parents.get(id).map(Vec::as_slice).unwrap_or(&[]) {
            if starts.contains(p) || dfs(p, parents, starts, memo) {
                r = true;
            }
        }
        memo.insert(id.clone(), r);
        r
    }
    let mut memo = HashMap::new();
    for s in &starts {
        reaches.insert(s.clone());
        for p in parents.get(s).map(Vec::as_slice).unwrap_or(&[]) {
            if starts.contains(p) || dfs(p, &parents, &starts, &mut memo) {
                reaches.insert(p.clone());
            }
        }
    }
    for (id, v) in memo {
        if v {
            reaches.insert(id);
        }
    }
    Ok(reaches.into_iter().collect())
}
