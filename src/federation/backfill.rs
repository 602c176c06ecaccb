//! Backfill: when `/messages` reaches a gap in a room's history (our join into a room that began elsewhere, a
//! backfill frontier, an event whose prev events we lack), or jump to date names an event we do not hold, fetch
//! the events there from a server in the room and store them in the timeline below stream position 0.

use ruma::RoomId;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::federation::client::enc;
use crate::federation::inbound::verify_batch;
use crate::federation::FedContext;
use crate::room::remote::persist_outlier;
use crate::store::ids::{StateGroup, StreamPos};
use crate::store::{events, members, rooms};

/// Most events a backfill starts from in one request (`v` parameters).
const MAX_FROM: usize = 5;

/// Fetches up to `limit` events at and before `from` (timeline events whose prev events we lack, or an event another
/// server named that we want in our timeline) from a server in the room, `prefer` first, and stores them in the
/// timeline below stream position 0 (so `/messages` shows them in their topological place and `/sync`'s live
/// timeline never does). Returns how many were stored.
pub async fn backfill_from(
    s: &FedContext,
    room_id: &RoomId,
    from: &[String],
    limit: usize,
    prefer: Option<&str>,
) -> Result<usize> {
    if s.federation.is_none() || from.is_empty() {
        return Ok(0);
    }
    let rid = room_id.to_owned();
    let me = s.identity.server_name.to_string();
    let found = s
        .store
        .read(move |c| {
            let Some(room) = rooms::room_by_id(c, rid.as_str())? else { return Ok(None) };
            let mut servers = members::joined_servers(c, room.room_nid)?;
            // While partial, the member list is incomplete: the servers send_join told us about count too.
            servers.extend(rooms::partial_state_servers(c, room.room_nid)?);
            servers.sort();
            servers.dedup();
            servers.retain(|x| *x != me);
            Ok(Some((room.version, servers)))
        })
        .await?;
    let Some((version, mut servers)) = found else { return Ok(0) };
    if let Some(p) = prefer.filter(|p| *p != s.identity.server_name.as_str()) {
        servers.retain(|x| x != p);
        servers.insert(0, p.to_owned());
    }
    let from: Vec<String> = from.iter().take(MAX_FROM).cloned().collect();
    fetch_and_store(s, room_id, &version, &servers, &from, limit).await
}

async fn fetch_and_store(
    s: &FedContext,
    room_id: &RoomId,
    version: &str,
    servers: &[String],
    from: &[String],
    limit: usize,
) -> Result<usize> {
    let Some(fed) = s.federation.as_ref() else { return Ok(0) };
    let vs: String = from.iter().map(|v| format!("v={}&", enc(v))).collect();
    for server in servers {
        let path =
            format!("/_matrix/federation/v1/backfill/{}?{vs}limit={}", enc(room_id.as_str()), limit.clamp(1, 100));
        let answer = match fed.client.get(server, &path).await {
            Ok(a) => a,
            Err(e) => {
                tracing::info!(%server, error = %e, "backfill failed");
                continue;
            }
        };
        let raw = answer.get("pdus").and_then(Value::as_array).cloned().unwrap_or_default();
        let mut pdus: Vec<crate::room::Pdu> = verify_batch(s, version, raw)
            .await?
            .into_iter()
            .filter_map(|r| r.ok())
            .filter(|p| p.room_id == room_id)
            .collect();
        // Newest first: each gets the next lower stream position.
        pdus.sort_by_key(|p| std::cmp::Reverse(p.depth));
        let rid = room_id.to_owned();
        let stored = s
            .store
            .write(move |w| {
                let room = rooms::room_by_id(w.db(), rid.as_str())?.ok_or_else(|| Error::not_found("unknown room"))?;
                let mut next = events::lowest_stream_ordering(w.db())?.0;
                let mut n = 0;
                let rules = crate::room::version::rules(&room.version)?;
                for p in &pdus {
                    if let Some(row) = events::event_by_id(w.db(), p.event_id.as_str())? {
                        if row.stream_ordering.is_some() {
                            continue;
                        }
                    }
                    let nid = persist_outlier(w.db(), &room, p)?;
                    // In the timeline now: its prev edges (outliers have none) tell the next backfill where the
                    // history continues.
                    let prevs: Vec<String> = p.prev_events.iter().map(|e| e.to_string()).collect();
                    events::insert_edges(w.db(), nid, &prevs)?;
                    next -= 1;
                    // Auth of history is checked against the events' own auth events (we lack the state there).
                    let rejected = crate::room::remote::authorize_partial(
                        w.db(),
                        &rules,
                        p,
                        room.current_sg.unwrap_or(StateGroup(0)),
                    )
                    .err();
                    events::set_backfilled(w.db(), nid, StreamPos(next), rejected.as_deref())?;
                    n += 1;
                }
                let ids: Vec<String> = pdus.iter().map(|p| p.event_id.to_string()).collect();
                crate::room::append::apply_backfilled_redactions(w.db(), &room, &rules, &ids)?;
                Ok(n)
            })
            .await?;
        tracing::info!(%room_id, %server, stored, "backfilled");
        return Ok(stored);
    }
    Ok(0)
}
