//! Incoming PDUs and EDUs (from `/send` transactions and from fetches we make): verify, fill gaps, store.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use ruma::canonical_json::CanonicalJsonObject;
use ruma::RoomId;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::federation::batches::Remote;
use crate::federation::client::enc;
use crate::federation::keys::needed_keys;
use crate::federation::FedContext;
use crate::federation::KeyStore;
use crate::room::remote::{
    handle_incoming, parse_remote_keeping_signed, persist_outlier, verify_remote, AuthCache, Incoming,
};
use crate::room::{version, Pdu};
use crate::store::Store;
use crate::store::{events, members, rooms};

/// How long one fetch made while handling a `/send` (missing events, auth events) may take.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(20);
/// Most events one `get_missing_events` asks for (and accepts).
const MISSING_EVENTS_LIMIT: usize = 20;
/// Implementation limits on a new PDU's edges (as Synapse): more make a gap fill or auth check explode.
const MAX_PREV_EVENTS: usize = 20;
const MAX_AUTH_EVENTS: usize = 10;

/// Parses and verifies PDUs of one room (keys fetched in one batch). Invalid ones come back as errors.
pub async fn verify_batch(
    s: &FedContext,
    room_version: &str,
    raw: Vec<Value>,
) -> Result<Vec<std::result::Result<Pdu, String>>> {
    Ok(verify_batch_ids(s, room_version, raw).await?.into_iter().map(|(_, r)| r).collect())
}

/// [`verify_batch`], each result with the event's id when it could be computed (for per-PDU answers).
pub async fn verify_batch_ids(
    s: &FedContext,
    room_version: &str,
    raw: Vec<Value>,
) -> Result<Vec<(Option<String>, std::result::Result<Pdu, String>)>> {
    let fed = s.federation.as_ref().ok_or_else(|| Error::forbidden("federation is disabled"))?;
    verify_values(&fed.keys, room_version, raw).await
}

/// [`verify_batch_ids`] with the key store at hand.
pub async fn verify_values(
    keys: &KeyStore,
    room_version: &str,
    raw: Vec<Value>,
) -> Result<Vec<(Option<String>, std::result::Result<Pdu, String>)>> {
    let rules = version::rules(room_version)?;
    let n = raw.len();
    // Parsing (canonical JSON, event id, content hash) and signature checks are CPU work: off the async threads,
    // and a big batch split over the cores.
    let parsed: Vec<Vec<Parsed>> = on_threads(split_in(raw, parts_for(n)), false, {
        let rules = rules.clone();
        move |part| part.into_iter().map(|v| parse_one(v, &rules)).collect()
    })
    .await?;
    check_signatures(keys, rules, parsed, false).await
}

/// [`verify_batch`] for PDUs still as JSON text (a streamed `/state` answer): parsed straight into canonical JSON,
/// with no `serde_json::Value` tree built first, and sized by their text.
///
/// `background` work (a resync) runs on the low-priority threads ([`crate::lowprio`]): a user's request running
/// beside it gets the CPU first. Each outcome is passed through `then` on the thread that verified it (a pipeline
/// makes its writer rows there, with no further trip to a thread and back per batch).
pub async fn verify_batch_raw_then<T, F>(
    keys: &KeyStore,
    room_version: &str,
    raw: Vec<Box<serde_json::value::RawValue>>,
    background: bool,
    then: F,
) -> Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(std::result::Result<Pdu, String>) -> T + Send + Sync + 'static,
{
    let rules = version::rules(room_version)?;
    let parts = parts_for(raw.len());
    let parsed: Vec<Vec<Parsed>> = on_threads(split_in(raw, parts), background, {
        let rules = rules.clone();
        move |part| part.into_iter().map(|v| parse_one_raw(&v, &rules)).collect()
    })
    .await?;
    check_signatures_then(keys, rules, parsed, background, move |(_, r)| then(r)).await
}

/// How many blocking threads a batch of `n` PDUs is split over.
fn parts_for(n: usize) -> usize {
    if n >= 64 {
        std::thread::available_parallelism().map_or(1, |n| n.get()).min(4)
    } else {
        1
    }
}

/// Signature checks of parsed PDUs (their servers' keys fetched in one batch), on blocking threads.
async fn check_signatures(
    keys: &KeyStore,
    rules: ruma::room_version_rules::RoomVersionRules,
    parsed: Vec<Vec<Parsed>>,
    background: bool,
) -> Result<Vec<Checked>> {
    check_signatures_then(keys, rules, parsed, background, |checked| checked).await
}

/// [`check_signatures`], each outcome passed through `then` on the thread that checked it.
async fn check_signatures_then<T, F>(
    keys: &KeyStore,
    rules: ruma::room_version_rules::RoomVersionRules,
    parsed: Vec<Vec<Parsed>>,
    background: bool,
    then: F,
) -> Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(Checked) -> T + Send + Sync + 'static,
{
    let need = needed_keys(parsed.iter().flatten().filter_map(|(_, p)| p.as_ref().ok()).map(|(p, _)| &p.json));
    let (keys, decoded) = (Arc::new(keys.keys_for(&need).await?), keys.decoded());
    let verified = on_threads(parsed, background, move |part| {
        part.into_iter()
            .map(|(id, p)| {
                let checked = p.and_then(|(p, signed)| verify_remote(p, signed.as_deref(), &rules, &keys, &decoded));
                then((id, checked))
            })
            .collect()
    })
    .await?;
    Ok(verified.into_iter().flatten().collect())
}

/// A PDU's event id (when it could be computed) and the outcome of checking it.
type Checked = (Option<String>, std::result::Result<Pdu, String>);

/// A PDU's event id and the outcome of parsing it, with the bytes the signature check needs when parsing made them.
type Parsed = crate::room::remote::ParsedRemote;

/// One PDU off the wire, parsed, with its event id when it could be computed.
fn parse_one(v: Value, rules: &ruma::room_version_rules::RoomVersionRules) -> Parsed {
    match serde_json::from_value::<CanonicalJsonObject>(v) {
        Ok(obj) => parse_remote_keeping_signed(obj, rules, None),
        Err(e) => (None, Err(format!("not canonical JSON: {e}"))),
    }
}

/// [`parse_one`] from the PDU's JSON text (whose length spares most PDUs the canonical size computation).
fn parse_one_raw(raw: &serde_json::value::RawValue, rules: &ruma::room_version_rules::RoomVersionRules) -> Parsed {
    match crate::room::canonical::object_from_str(raw.get()) {
        Ok(obj) => parse_remote_keeping_signed(obj, rules, Some(raw.get().len())),
        Err(e) => (None, Err(format!("not canonical JSON: {e}"))),
    }
}

/// `v` cut into at most `parts` pieces of about equal length, in order.
fn split_in<T>(v: Vec<T>, parts: usize) -> Vec<Vec<T>> {
    let size = v.len().div_ceil(parts.max(1)).max(1);
    let mut it = v.into_iter();
    let mut out = Vec::with_capacity(parts);
    loop {
        let chunk: Vec<T> = it.by_ref().take(size).collect();
        if chunk.is_empty() {
            return out;
        }
        out.push(chunk);
    }
}

/// Runs `f` on each piece on its own blocking thread; the results in the pieces' order.
pub(crate) async fn on_threads<T, R, F>(pieces: Vec<Vec<T>>, background: bool, f: F) -> Result<Vec<Vec<R>>>
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(Vec<T>) -> Vec<R> + Send + Sync + 'static,
{
    let f = Arc::new(f);
    let tasks = pieces.into_iter().map(|piece| {
        let f = f.clone();
        async move {
            if background {
                crate::lowprio::run(move || f(piece)).await.map_err(Error::internal)
            } else {
                tokio::task::spawn_blocking(move || f(piece)).await.map_err(|e| Error::internal(e.to_string()))
            }
        }
    });
    futures::future::join_all(tasks).await.into_iter().collect()
}

/// Limits on a new PDU that the room's rules do not set (prev and auth event counts).
fn check_edges(p: &Pdu) -> std::result::Result<(), String> {
    if p.prev_events.len() > MAX_PREV_EVENTS {
        return Err(format!("{} has {} prev_events (at most {MAX_PREV_EVENTS})", p.event_id, p.prev_events.len()));
    }
    if p.auth_events.len() > MAX_AUTH_EVENTS {
        return Err(format!("{} has {} auth_events (at most {MAX_AUTH_EVENTS})", p.event_id, p.auth_events.len()));
    }
    Ok(())
}

/// Fetches from `origin` the auth events of `pdus` we do not hold (and, transitively, theirs), verifies them and
/// stores them as outliers, each authorised against its own auth events (rejected ones are kept, marked).
/// Needed above all during partial state: the memberships of most senders were omitted from `send_join`, so
/// without this every event of such a member would be rejected for an unknown auth event.
pub async fn fetch_missing_auth(r: Remote<'_>, origin: &str, room_id: &RoomId, pdus: &[Pdu]) -> Result<usize> {
    let batch: HashSet<String> = pdus.iter().map(|p| p.event_id.to_string()).collect();
    let wanted: Vec<String> = pdus.iter().flat_map(|p| p.auth_events.iter().map(|a| a.to_string())).collect();
    fetch_outliers(r, origin, room_id, wanted, &batch).await
}

/// Those of `ids` that we do not hold, in order.
pub async fn unknown_events(store: &Store, ids: Vec<String>) -> Result<Vec<String>> {
    store
        .read(move |c| {
            let mut out = Vec::new();
            for id in ids {
                if events::event_nid(c, &id)?.is_none() {
                    out.push(id);
                }
            }
            Ok(out)
        })
        .await
}

/// Most events one [`fetch_outliers`] walk fetches.
pub const MAX_OUTLIER_FETCH: usize = 200;

/// Fetches from `origin` the events `wanted` that we do not hold (and, transitively, their auth events), except
/// those in `skip`; verifies them and stores them as outliers, each authorised against its own auth events
/// (rejected ones are kept, marked). Bounded in rounds, events ([`MAX_OUTLIER_FETCH`]) and time. Returns how many
/// were stored.
pub async fn fetch_outliers(
    r: Remote<'_>,
    origin: &str,
    room_id: &RoomId,
    wanted: Vec<String>,
    skip: &HashSet<String>,
) -> Result<usize> {
    fetch_outliers_up_to(r, origin, room_id, wanted, skip, MAX_OUTLIER_FETCH).await
}

/// [`fetch_outliers`] with another bound on the events fetched in all (a gap in a room whose full state we hold).
pub async fn fetch_outliers_up_to(
    r: Remote<'_>,
    origin: &str,
    room_id: &RoomId,
    mut wanted: Vec<String>,
    skip: &HashSet<String>,
    max_events: usize,
) -> Result<usize> {
    /// Bounds the walk (rounds of fetches, events in all).
    const MAX_ROUNDS: usize = 8;
    /// Concurrent `/event` requests.
    const PARALLEL: usize = 16;
    /// The whole walk, however many rounds.
    const DEADLINE: Duration = Duration::from_secs(60);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let rid = room_id.to_owned();
    let Some(room) = r.store.read(move |c| rooms::room_by_id(c, rid.as_str())).await? else { return Ok(0) };
    if room.current_sg.is_none() {
        // Without the room's state (not joined yet) its events cannot be judged; a rejection stored now would be
        // wrong and stay.
        return Ok(0);
    }
    let mut seen: HashSet<String> = HashSet::new();
    let mut fetched: Vec<Pdu> = Vec::new();
    for _ in 0..MAX_ROUNDS {
        let room_left = max_events.saturating_sub(fetched.len());
        let ids: Vec<String> =
            wanted.drain(..).filter(|id| !skip.contains(id) && seen.insert(id.clone())).take(room_left).collect();
        let unknown = unknown_events(r.store, ids).await?;
        if unknown.is_empty() || fetched.len() >= max_events {
            break;
        }
        let paths: Vec<String> = unknown.iter().map(|id| format!("/_matrix/federation/v1/event/{}", enc(id))).collect();
        let client = r.client.clone();
        let reqs = paths.into_iter().map(|path| {
            let client = client.clone();
            let origin = origin.to_owned();
            async move { client.request_timeout(reqwest::Method::GET, &origin, &path, None, FETCH_TIMEOUT).await }
        });
        let Ok(answers) = tokio::time::timeout_at(
            deadline,
            futures::stream::iter(reqs).buffer_unordered(PARALLEL).collect::<Vec<_>>(),
        )
        .await
        else {
            tracing::info!(origin, %room_id, "fetching missing auth events took too long; giving up");
            break;
        };
        let mut raw = Vec::new();
        for answer in answers {
            match answer {
                Ok(v) => raw.extend(v.get("pdus").and_then(Value::as_array).and_then(|a| a.first()).cloned()),
                Err(e) => tracing::info!(origin, %room_id, error = %e, "fetching a missing auth event failed"),
            }
        }
        for p in verify_values(r.keys, &room.version, raw).await?.into_iter().filter_map(|(_, v)| v.ok()) {
            if p.room_id.as_str() == room_id && unknown.iter().any(|u| u == p.event_id.as_str()) {
                wanted.extend(p.auth_events.iter().map(|a| a.to_string()));
                fetched.push(p);
            }
        }
    }
    if fetched.is_empty() {
        return Ok(0);
    }
    fetched.sort_by_key(|p| p.depth);
    let n = fetched.len();
    let rid = room_id.to_owned();
    r.store
        .write(move |w| {
            let room = rooms::room_by_id(w.db(), rid.as_str())?.ok_or_else(|| Error::not_found("unknown room"))?;
            let rules = version::rules(&room.version)?;
            for p in &fetched {
                if events::event_nid(w.db(), p.event_id.as_str())?.is_some() {
                    continue;
                }
                // An auth event the walk did not reach (its bounds) is unknown, not bad: storing this event as
                // rejected would stay wrong once the rest of its chain arrives (e.g. by /get_missing_events). As
                // Synapse, it is dropped for now; what depends on it is dropped in turn (depth order).
                if let Some(unknown) = first_unknown(w.db(), &p.auth_events)? {
                    tracing::info!(room_id = %rid, event_id = %p.event_id, %unknown, "fetched event dropped: auth event unknown");
                    continue;
                }
                let nid = persist_outlier(w.db(), &room, p)?;
                if let Err(reason) =
                    crate::room::remote::authorize_by_own_auth_events(w.db(), &rules, &room, p, &AuthCache::default())
                {
                    tracing::info!(room_id = %rid, event_id = %p.event_id, %reason, "fetched auth event rejected");
                    crate::store::resync::set_rejected_nid(w.db(), nid, &reason)?;
                }
            }
            Ok(())
        })
        .await?;
    tracing::debug!(origin, %room_id, fetched = n, "fetched missing auth events");
    Ok(n)
}

/// The first of `ids` we do not hold.
fn first_unknown(conn: crate::store::Db<'_>, ids: &[ruma::OwnedEventId]) -> Result<Option<String>> {
    for id in ids {
        if events::event_nid(conn, id.as_str())?.is_none() {
            return Ok(Some(id.to_string()));
        }
    }
    Ok(None)
}

/// What [`ingest`] does with an event whose prev events stay unknown after `get_missing_events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnUnknownState {
    /// An event pushed to us (`/send`): drop it, as Synapse does. Nothing is stored, the sender gets an error for
    /// it in the transaction answer, and the event can be accepted once its prev events are known (e.g. sent again
    /// after them). Events `get_missing_events` returned whose own prev events are unknown (pulled events) still
    /// get the state at the gap from the sender.
    Drop,
    /// Place it on the state at its prev events from the sender, else our current state (our own join sent
    /// through a resident: the join must land).
    UseCurrentState,
}

/// [`handle_incoming`], and an accepted event relayed to the servers peeking the room (MSC2444), in the same
/// transaction.
fn stored_and_relayed(
    w: &mut crate::store::Writer<'_>,
    identity: &crate::room::Identity,
    room_id: &RoomId,
    pdu: &Pdu,
    origin: &str,
) -> Result<Incoming> {
    let r = handle_incoming(w, identity, room_id, pdu, None)?;
    if let Incoming::Stored(_, crate::room::append::Outcome::Accepted) = &r {
        if let Some(room) = rooms::room_by_id(w.db(), room_id.as_str())? {
            crate::room::peek::relay_remote_event(w.db(), room.room_nid, pdu, origin, identity.server_name.as_str())?;
        }
    }
    Ok(r)
}

/// Handles one verified PDU that belongs in the timeline, fetching missing prev events from `origin` once.
pub async fn ingest(
    s: &FedContext,
    origin: &str,
    room_id: &RoomId,
    pdu: Pdu,
    on_unknown: OnUnknownState,
) -> Result<String> {
    if let Err(e) = fetch_missing_auth(Remote::of(s)?, origin, room_id, std::slice::from_ref(&pdu)).await {
        tracing::info!(%room_id, event_id = %pdu.event_id, error = %e, "could not fetch missing auth events");
    }
    let identity = s.identity.clone();
    let (rid, p) = (room_id.to_owned(), pdu.clone());
    let o = origin.to_owned();
    let r = s.store.write(move |w| stored_and_relayed(w, &identity, &rid, &p, &o)).await?;
    match r {
        Incoming::Stored(_, outcome) => return Ok(format!("{outcome:?}")),
        Incoming::AlreadyKnown => return Ok("known".into()),
        Incoming::MissingPrevs(_) => {}
    }
    // Missing prev events: ask the sender for them once, then try again.
    if let Err(e) = fill_gap(s, origin, room_id, &pdu).await {
        tracing::info!(%room_id, error = %e, "get_missing_events failed");
    }
    let identity = s.identity.clone();
    let (rid, p) = (room_id.to_owned(), pdu.clone());
    let o = origin.to_owned();
    let missing = match s.store.write(move |w| stored_and_relayed(w, &identity, &rid, &p, &o)).await? {
        Incoming::Stored(_, outcome) => return Ok(format!("{outcome:?}")),
        Incoming::AlreadyKnown => return Ok("known".into()),
        Incoming::MissingPrevs(m) => m,
    };
    if on_unknown == OnUnknownState::Drop {
        // As Synapse: a pushed event's sender has no excuse for not giving us its prev events, and state asked
        // for at them would be the sender's word alone (this event could become the room's only extremity).
        tracing::info!(%room_id, event_id = %pdu.event_id, ?missing, "prev events still unknown after get_missing_events; event dropped");
        return Err(Error::forbidden("your server did not give the prev events referenced in this event"));
    }
    let r = place_across_gap(s, origin, room_id, pdu, &missing).await?;
    Ok(format!("{r:?}"))
}

/// Stores `pdu` whose prev events `missing` stay unknown: on the state across the gap when `origin` can tell it
/// ([`gap::states_at_missing_prevs`]), else on our current state (a backward extremity remains;
/// backfill can fill it later). Auth against the chosen state and its own auth events applies either way.
async fn place_across_gap(
    s: &FedContext,
    origin: &str,
    room_id: &RoomId,
    pdu: Pdu,
    missing: &[String],
) -> Result<Incoming> {
    let branches = match !missing.is_empty() {
        true => crate::federation::gap::states_at_missing_prevs(Remote::of(s)?, origin, room_id, missing)
            .await
            .ok()
            .flatten(),
        false => None,
    };
    match &branches {
        Some(_) => {
            tracing::info!(%room_id, event_id = %pdu.event_id, ?missing, "prev events unavailable; using the state at them")
        }
        None => {
            tracing::info!(%room_id, event_id = %pdu.event_id, ?missing, "prev events unavailable; using current state")
        }
    }
    let identity = s.identity.clone();
    let rid = room_id.to_owned();
    s.store
        .write(move |w| {
            let room = rooms::room_by_id(w.db(), rid.as_str())?.ok_or_else(|| Error::not_found("unknown room"))?;
            let sg = match &branches {
                Some(b) => crate::room::remote::state_across_gap(w.db(), &room, &pdu, b)?,
                None => room.current_sg.ok_or_else(|| Error::not_found("room has no state"))?,
            };
            handle_incoming(w, &identity, &rid, &pdu, Some(sg))
        })
        .await
}

/// `get_missing_events` between our forward extremities and `pdu`, then ingests what came back (oldest first).
async fn fill_gap(s: &FedContext, origin: &str, room_id: &RoomId, pdu: &Pdu) -> Result<()> {
    let fed = s.federation.as_ref().ok_or_else(|| Error::forbidden("federation is disabled"))?;
    let rid = room_id.to_owned();
    let (earliest, version) = s
        .store
        .read(move |c| {
            let room = rooms::room_by_id(c, rid.as_str())?.ok_or_else(|| Error::not_found("unknown room"))?;
            let mut ids = Vec::new();
            for nid in events::forward_extremities(c, room.room_nid)? {
                if let Some(r) = events::event_by_nid(c, nid)? {
                    ids.push(r.event_id);
                }
            }
            Ok((ids, room.version))
        })
        .await?;
    let body = json!({"earliest_events": earliest, "latest_events": [pdu.event_id.as_str()], "limit": MISSING_EVENTS_LIMIT, "min_depth": 0});
    // Bounded: one request, a short timeout, the client's size cap, and no more events than asked for.
    let res = fed
        .client
        .request_timeout(
            reqwest::Method::POST,
            origin,
            &format!("/_matrix/federation/v1/get_missing_events/{}", enc(room_id.as_str())),
            Some(&body),
            FETCH_TIMEOUT,
        )
        .await?;
    let mut events = res.get("events").and_then(Value::as_array).cloned().unwrap_or_default();
    if events.len() > MISSING_EVENTS_LIMIT {
        tracing::info!(
            origin,
            %room_id,
            got = events.len(),
            "get_missing_events answered more than asked for; keeping the newest"
        );
        events.sort_by_key(|e| e.get("depth").and_then(Value::as_i64).unwrap_or(0));
        events.drain(..events.len() - MISSING_EVENTS_LIMIT);
    }
    let mut verified: Vec<Pdu> = verify_batch(s, &version, events).await?.into_iter().filter_map(|r| r.ok()).collect();
    verified.sort_by_key(|p| p.depth);
    verified.retain(|p| p.room_id.as_str() == room_id && check_edges(p).is_ok());
    fetch_missing_auth(Remote::of(s)?, origin, room_id, &verified).await?;
    for p in verified {
        if p.room_id.as_str() != room_id {
            continue;
        }
        let identity = s.identity.clone();
        let rid = room_id.to_owned();
        let r = s
            .store
            .write({
                let p = p.clone();
                move |w| handle_incoming(w, &identity, &rid, &p, None)
            })
            .await?;
        if let Incoming::MissingPrevs(m) = r {
            // The oldest events fetched may border a gap the answer did not close (half-missing grandparents).
            place_across_gap(s, origin, room_id, p, &m).await?;
        }
    }
    Ok(())
}

/// `PUT /send/{txnId}`: at most 50 PDUs and 100 EDUs; a bad PDU never fails the others.
pub async fn transaction(s: &FedContext, origin: &str, body: &Value) -> Result<Value> {
    let pdus = body.get("pdus").and_then(Value::as_array).cloned().unwrap_or_default();
    let edus = body.get("edus").and_then(Value::as_array).cloned().unwrap_or_default();
    if pdus.len() > 50 || edus.len() > 100 {
        return Err(Error::bad_json("too many PDUs or EDUs in one transaction (limits 50 and 100)"));
    }
    if body.get("origin").and_then(Value::as_str).is_some_and(|o| o != origin) {
        return Err(Error::forbidden("transaction origin does not match the signer"));
    }
    // Group by room, in depth order.
    let mut by_room: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let mut results = serde_json::Map::new();
    for p in pdus {
        match p.get("room_id").and_then(Value::as_str) {
            Some(r) => by_room.entry(r.to_owned()).or_default().push(p),
            None => tracing::info!(origin, "PDU without room_id dropped"),
        }
    }
    for (room_id, raw) in by_room {
        let rid = room_id.clone();
        let origin_s = origin.to_owned();
        let room = s
            .store
            .read(move |c| {
                let room = rooms::room_by_id(c, &rid)?;
                let allowed = match &room {
                    Some(r) => crate::federation::acl::room_allows(c, r.current_sg, &origin_s)?,
                    None => true,
                };
                Ok((room, allowed))
            })
            .await?;
        let (Some(room), allowed) = room else {
            // Nothing to check it against and no room version to compute its id with: ignored (as Synapse).
            tracing::info!(origin, %room_id, "PDUs for an unknown room ignored");
            continue;
        };
        let checked = verify_batch_ids(s, &room.version, raw).await?;
        if !allowed {
            tracing::info!(origin, %room_id, "PDUs from a server denied by the room's ACL dropped");
            for id in checked.into_iter().filter_map(|(id, _)| id) {
                results.insert(id, json!({"error": "server is denied by the room's ACL (m.room.server_acl)"}));
            }
            continue;
        }
        let mut verified = Vec::new();
        for (id, r) in checked {
            match r.and_then(|p| check_edges(&p).map(|()| p)) {
                Ok(p) => verified.push(p),
                Err(e) => {
                    tracing::info!(origin, %room_id, error = %e, "invalid PDU dropped");
                    if let Some(id) = id {
                        results.insert(id, json!({"error": e}));
                    }
                }
            }
        }
        verified.sort_by_key(|p| p.depth);
        if room.current_sg.is_none() {
            // A room we hold no state for (invited, knocking, or joining): see apply_out_of_room_membership.
            out_of_room(s, origin, &room, verified, &mut results).await?;
            continue;
        }
        for p in verified {
            let id = p.event_id.to_string();
            if p.sender.server_name().as_str() != origin {
                // Relayed (e.g. an invite or a join through a resident): its sender's server signed it, which
                // verify_batch checked; a forged sender fails there.
                tracing::debug!(origin, event_id = %id, sender = %p.sender, "PDU relayed by a server other than its sender's");
            }
            let rid = p.room_id.clone();
            match ingest(s, origin, &rid, p, OnUnknownState::Drop).await {
                Ok(outcome) => {
                    tracing::debug!(origin, event_id = %id, %outcome, "PDU processed");
                    results.insert(id, json!({}));
                }
                Err(e) => {
                    results.insert(id, json!({"error": e.to_string()}));
                }
            }
        }
    }
    for edu in edus {
        if let Err(e) = handle_edu(s, origin, &edu).await {
            tracing::debug!(origin, error = %e, "EDU ignored");
        }
    }
    Ok(json!({"pdus": results}))
}

/// PDUs for a room we know but hold no state for: an invite withdrawn by its server is applied; the rest are
/// ignored (answered without error, as Synapse does for rooms it is not in). Nothing is fetched for them: auth
/// events judged without the room's state would be stored as wrongly rejected and poison a later join.
async fn out_of_room(
    s: &FedContext,
    origin: &str,
    room: &crate::store::rooms::RoomRow,
    pdus: Vec<Pdu>,
    results: &mut serde_json::Map<String, Value>,
) -> Result<()> {
    for p in pdus {
        let id = p.event_id.to_string();
        let identity = s.identity.clone();
        let r = room.clone();
        let applied =
            s.store.write(move |w| crate::room::remote::apply_out_of_room_membership(w, &identity, &r, &p)).await?;
        match applied {
            true => tracing::info!(origin, room_id = %room.room_id, event_id = %id, "invite withdrawn by its server"),
            false => {
                tracing::info!(origin, room_id = %room.room_id, event_id = %id, "PDU for a room we are not in ignored")
            }
        }
        results.insert(id, json!({}));
    }
    Ok(())
}

async fn handle_edu(s: &FedContext, origin: &str, edu: &Value) -> Result<()> {
    let content = edu.get("content").cloned().unwrap_or(Value::Null);
    let from_origin = |user: &str| user.split_once(':').map(|x| x.1) == Some(origin);
    match edu.get("edu_type").and_then(Value::as_str) {
        Some("m.typing") => {
            let (Some(room), Some(user)) =
                (content.get("room_id").and_then(Value::as_str), content.get("user_id").and_then(Value::as_str))
            else {
                return Ok(());
            };
            if !from_origin(user) {
                return Ok(());
            }
            // Only for a room we share, whose ACL lets the origin in, from a member (unless our member list is
            // still partial).
            let (rid, uid, o) = (room.to_owned(), user.to_owned(), origin.to_owned());
            let allowed = s
                .store
                .read(move |c| {
                    let Some(r) = rooms::room_by_id(c, &rid)? else { return Ok(false) };
                    if !crate::federation::acl::room_allows(c, r.current_sg, &o)? {
                        return Ok(false);
                    }
                    Ok(r.partial_state
                        || members::membership_of(c, r.room_nid, &uid)?.is_some_and(|(m, _)| m == "join"))
                })
                .await?;
            if allowed {
                let typing = content.get("typing").and_then(Value::as_bool).unwrap_or(false);
                // Ids that do not parse name no room or user a client could be shown.
                if let (Ok(room), Ok(user)) = (ruma::RoomId::parse(room), ruma::UserId::parse(user)) {
                    s.typing.set(&room, &user, typing, std::time::Duration::from_secs(30));
                }
            }
        }
        Some("m.receipt") => {
            let Some(rooms) = content.as_object().cloned() else { return Ok(()) };
            let origin = origin.to_owned();
            s.store
                .write(move |w| {
                    for (room_id, types) in rooms {
                        let Some(room) = rooms::room_by_id(w.db(), &room_id)? else { continue };
                        if !crate::federation::acl::room_allows(w.db(), room.current_sg, &origin)? {
                            continue;
                        }
                        for (rtype, users) in types.as_object().cloned().unwrap_or_default() {
                            if rtype != "m.read" {
                                continue;
                            }
                            for (user, r) in users.as_object().cloned().unwrap_or_default() {
                                if user.split_once(':').map(|x| x.1) != Some(origin.as_str()) {
                                    continue;
                                }
                                let Some(ev) = r
                                    .get("event_ids")
                                    .and_then(Value::as_array)
                                    .and_then(|a| a.first())
                                    .and_then(Value::as_str)
                                else {
                                    continue;
                                };
                                let ts = r.pointer("/data/ts").and_then(Value::as_i64).unwrap_or(0);
                                let thread =
                                    r.pointer("/data/thread_id").and_then(Value::as_str).unwrap_or("").to_owned();
                                let receipt = crate::store::receipts::NewReceipt {
                                    room_nid: room.room_nid.0,
                                    receipt_type: "m.read",
                                    user_id: &user,
                                    thread_id: &thread,
                                    event_id: ev,
                                    ts,
                                };
                                crate::store::receipts::set(w, &receipt)?;
                            }
                        }
                    }
                    Ok(())
                })
                .await?;
        }
        Some("m.presence") => s.presence.receive(&s.store, origin, &content).await?,
        Some(t @ ("m.device_list_update" | "m.signing_key_update")) => {
            let Some(user) = content.get("user_id").and_then(Value::as_str).map(str::to_owned) else { return Ok(()) };
            if !from_origin(&user) {
                return Ok(());
            }
            if t == "m.device_list_update" {
                crate::federation::devices::on_device_list_update(s, user, &content).await?;
            } else {
                crate::federation::devices::on_signing_key_update(s, user, &content).await?;
            }
        }
        Some("m.direct_to_device") => {
            let sender = content.get("sender").and_then(Value::as_str).unwrap_or("").to_owned();
            if !from_origin(&sender) {
                return Ok(());
            }
            let t = content.get("type").and_then(Value::as_str).unwrap_or("").to_owned();
            let messages = content.get("messages").and_then(Value::as_object).cloned().unwrap_or_default();
            let identity = s.identity.clone();
            s.store
                .write(move |w| {
                    for (user, devices) in messages {
                        if !identity.is_local_user(&user) {
                            continue;
                        }
                        let targets: Vec<(String, Value)> =
                            devices.as_object().cloned().unwrap_or_default().into_iter().collect();
                        for (device, body) in targets {
                            let devs: Vec<String> = if device == "*" {
                                crate::store::accounts::list_devices(w.db(), &user)?
                                    .into_iter()
                                    .map(|d| d.device_id)
                                    .collect()
                            } else {
                                vec![device]
                            };
                            for d in devs {
                                crate::store::e2ee::queue_to_device(w, &user, &d, &sender, &t, &body)?;
                            }
                        }
                    }
                    Ok(())
                })
                .await?;
        }
        _ => {}
    }
    Ok(())
}
