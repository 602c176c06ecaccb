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
///
/// Only the entries in which the groups differ are read ([`state_groups::differing_entries`]) and handed to ruma
/// with the little of the shared state the algorithm can read ([`resolve_conflicts`]); the result is written as a
/// delta over the first group. A 100k-member room's fork costs what its conflicted part costs, not two passes over
/// 100k members. When the shared state's auth chain cannot be settled cheaply, the whole states are resolved
/// ([`resolve_full`]), as before.
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
    let base = unique[0];
    let diff = state_groups::differing_entries(conn, &unique)?;
    if diff.is_empty() {
        return Ok(base);
    }
    let resolved = match resolve_conflicts(conn, &rules, base, &diff)? {
        Some(r) => r,
        None => {
            let states: Vec<HashMap<StateKeyNid, EventNid>> =
                unique.iter().map(|g| state_groups::load_state(conn, *g)).collect::<Result<_>>()?;
            let full = resolve_full(conn, &rules, &states)?;
            return group_for_state(conn, room_nid, base, &full);
        }
    };
    let changes: Vec<(StateKeyNid, Option<EventNid>)> =
        resolved.into_iter().filter(|(k, v)| diff.get(k).map_or(v.is_some(), |values| values[0] != *v)).collect();
    if changes.is_empty() {
        return Ok(base);
    }
    new_group(conn, room_nid, Some(base), &changes)
}

/// The whole states resolved (event nids by state key nid).
pub fn resolve_full(
    conn: Db<'_>,
    rules: &ruma::room_version_rules::RoomVersionRules,
    states: &[HashMap<StateKeyNid, EventNid>],
) -> Result<HashMap<StateKeyNid, EventNid>> {
    let maps: Vec<StateMap<OwnedEventId>> = states.iter().map(|s| to_state_map(conn, s)).collect::<Result<_>>()?;
    let resolved = resolve_maps(conn, rules, &maps)?;
    let mut state = HashMap::new();
    for ((t, k), id) in resolved {
        let skn = state_groups::state_key_nid(conn, &t.to_string(), &k)?;
        let nid = events::event_nid(conn, id.as_str())?.ok_or_else(|| Error::internal("resolved to unknown event"))?;
        state.insert(skn, nid);
    }
    Ok(state)
}

/// How many events [`resolve_conflicts`] may visit walking down from the auth difference's candidates before it
/// leaves the fork to [`resolve_full`].
const DOWNWARD_BUDGET: usize = 20_000;

/// State resolution of the conflicted part of a fork: `diff` holds the keys where the states differ (each state's
/// event there), `base` is one of the states. Gives the resolved event (or none) at each key whose resolution may
/// differ from `base`'s entry; every other key keeps `base`'s entry. `None`: the auth difference could not be
/// settled within [`DOWNWARD_BUDGET`] (resolve the whole states instead).
///
/// ruma's `resolve` is the algorithm; what it is given is smaller, and gives the same answer:
///
/// * State maps: each state's conflicted entries, plus the unconflicted entries at every (type, state key) the auth
///   rules read for any event that can be in the full conflicted set (the conflicted events and their auth
///   chains): the unconflicted map only seeds the iterative auth checks (before v12) at those keys, and is laid
///   over the result at the end, which leaves the unconflicted keys as they are in every state.
/// * Auth chains: with `U` the unconflicted events, `A` the auth chain of `U`, `B_i` the auth chain of state `i`'s
///   conflicted events and `X` the union of the `B_i`, the auth difference `∪(A ∪ B_i) − ∩(A ∪ B_i)` is
///   `X − ∩B_i − A`. So the chains given are `B_i ∪ (A ∩ X)`, whose difference is the same; and `A ∩ X` needs
///   only the candidates `X − ∩B_i` checked: whether an unconflicted event descends from each (walking down the
///   auth DAG: a few events of the fork, where `A` is the auth chain of the whole membership).
pub fn resolve_conflicts(
    conn: Db<'_>,
    rules: &ruma::room_version_rules::RoomVersionRules,
    base: StateGroup,
    diff: &Diff,
) -> Result<Option<Changes>> {
    let Some(inputs) = conflict_inputs(conn, rules, base, diff)? else { return Ok(None) };
    let resolved = resolve_with_chains(conn, rules, &inputs.maps, inputs.chains)?;
    // Back to nids: a conflicted key takes the resolved event (or none); a key in no state takes what the
    // resolution put there (an event of the auth difference); an unconflicted key keeps its entry.
    let mut out = Vec::new();
    let by_key: HashMap<&(StateEventType, String), &OwnedEventId> = resolved.iter().collect();
    for (skn, key) in &inputs.key_of {
        let nid = match by_key.get(key) {
            Some(id) => Some(nid_of(conn, id)?),
            None => None,
        };
        out.push((*skn, nid));
    }
    for (key, id) in &resolved {
        let skn = state_groups::state_key_nid(conn, &key.0.to_string(), &key.1)?;
        if diff.contains_key(&skn) || state_groups::lookup_state(conn, base, skn)?.is_some() {
            continue;
        }
        out.push((skn, Some(nid_of(conn, id)?)));
    }
    Ok(Some(out))
}

/// Entries to write over a group: key -> event (`None`: removed).
pub type Changes = Vec<(StateKeyNid, Option<EventNid>)>;

/// The entries in which the states of a fork differ: key -> each state's event there.
pub type Diff = std::collections::BTreeMap<StateKeyNid, Vec<Option<EventNid>>>;

/// What [`resolve_conflicts`] hands to ruma.
pub struct ConflictInputs {
    pub maps: Vec<StateMap<OwnedEventId>>,
    pub chains: Vec<EventIdSet<OwnedEventId>>,
    key_of: HashMap<StateKeyNid, (StateEventType, String)>,
}

/// The state maps and auth chains of [`resolve_conflicts`] (`None`: over [`DOWNWARD_BUDGET`]).
pub fn conflict_inputs(
    conn: Db<'_>,
    rules: &ruma::room_version_rules::RoomVersionRules,
    base: StateGroup,
    diff: &Diff,
) -> Result<Option<ConflictInputs>> {
    let sides = diff.values().next().map_or(0, Vec::len);
    let mut maps: Vec<StateMap<OwnedEventId>> = vec![StateMap::new(); sides];
    let mut conflicted_events: Vec<Vec<OwnedEventId>> = vec![Vec::new(); sides];
    let mut key_of: HashMap<StateKeyNid, (StateEventType, String)> = HashMap::new();
    for (skn, values) in diff {
        let (t, k) = state_groups::state_key_of(conn, *skn)?;
        let key = (StateEventType::from(t), k);
        for (i, v) in values.iter().enumerate() {
            if let Some(nid) = v {
                let id = event_id_of_nid(conn, *nid)?;
                maps[i].insert(key.clone(), id.clone());
                conflicted_events[i].push(id);
            }
        }
        key_of.insert(*skn, key);
    }
    let chains: Vec<HashSet<OwnedEventId>> =
        conflicted_events.iter().map(|ids| auth_chain(conn, ids.iter().cloned())).collect::<Result<_>>()?;
    let union: HashSet<&OwnedEventId> = chains.iter().flatten().collect();
    let candidates: Vec<&OwnedEventId> =
        union.iter().copied().filter(|id| chains.iter().any(|c| !c.contains(*id))).collect();
    // A ∩ X: the candidates some unconflicted event descends from.
    let mut budget = DOWNWARD_BUDGET;
    let mut under_shared: Vec<OwnedEventId> = Vec::new();
    for id in candidates {
        match descends_to_unconflicted(conn, base, diff, id, &mut budget)? {
            Some(true) => under_shared.push(id.clone()),
            Some(false) => {}
            None => return Ok(None),
        }
    }
    // The unconflicted entries the auth checks of the full conflicted set's events may read.
    let mut read_keys: HashSet<(StateEventType, String)> = HashSet::new();
    let involved = union.iter().map(|id| (*id).clone()).chain(conflicted_events.iter().flatten().cloned());
    for id in involved {
        let Some(pdu) = load_pdu(conn, &id)? else { continue };
        let Some(state_key) = pdu.state_key.as_deref() else { continue };
        let types = ruma::state_res::auth_types_for_event(
            &pdu.kind,
            &pdu.sender,
            Some(state_key),
            &pdu.content,
            &rules.authorization,
        );
        if let Ok(types) = types {
            read_keys.extend(types);
        }
    }
    for key in read_keys {
        let Some(skn) = state_groups::find_state_key_nid(conn, &key.0.to_string(), &key.1)? else { continue };
        if diff.contains_key(&skn) {
            continue;
        }
        if let Some(nid) = state_groups::lookup_state(conn, base, skn)? {
            let id = event_id_of_nid(conn, nid)?;
            for m in &mut maps {
                m.insert(key.clone(), id.clone());
            }
        }
    }
    let chains: Vec<EventIdSet<OwnedEventId>> = chains
        .into_iter()
        .map(|c| c.into_iter().chain(under_shared.iter().cloned()).collect::<EventIdSet<OwnedEventId>>())
        .collect();
    Ok(Some(ConflictInputs { maps, chains, key_of }))
}

fn event_id_of_nid(conn: Db<'_>, nid: EventNid) -> Result<OwnedEventId> {
    let id = events::event_id_of(conn, nid)?.ok_or_else(|| Error::internal("state entry without event"))?;
    OwnedEventId::try_from(id).map_err(|e| Error::internal(e.to_string()))
}

fn nid_of(conn: Db<'_>, id: &OwnedEventId) -> Result<EventNid> {
    events::event_nid(conn, id.as_str())?.ok_or_else(|| Error::internal("resolved to unknown event"))
}

/// Whether an unconflicted state event (in `base` at its key, and no key of `diff`) has `id` in its auth chain:
/// a walk down the auth DAG from `id` over state events (an event citing anything but a state event among its auth
/// events fails the auth rules, so no auth chain of the state runs through one). `None`: over budget.
fn descends_to_unconflicted(
    conn: Db<'_>,
    base: StateGroup,
    diff: &Diff,
    id: &OwnedEventId,
    budget: &mut usize,
) -> Result<Option<bool>> {
    let mut seen: HashSet<EventNid> = HashSet::new();
    let mut todo: Vec<String> = vec![id.to_string()];
    while let Some(parent) = todo.pop() {
        for (nid, child, skn) in events::auth_children(conn, &parent)? {
            if !seen.insert(nid) {
                continue;
            }
            if *budget == 0 {
                return Ok(None);
            }
            *budget -= 1;
            if !diff.contains_key(&skn) && state_groups::lookup_state(conn, base, skn)? == Some(nid) {
                return Ok(Some(true));
            }
            todo.push(child);
        }
    }
    Ok(Some(false))
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
    resolve_with_chains(conn, rules, maps, chains)
}

/// ruma's state resolution of `maps`, whose auth chains are `chains`.
fn resolve_with_chains(
    conn: Db<'_>,
    rules: &ruma::room_version_rules::RoomVersionRules,
    maps: &[StateMap<OwnedEventId>],
    chains: Vec<EventIdSet<OwnedEventId>>,
) -> Result<StateMap<OwnedEventId>> {
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
