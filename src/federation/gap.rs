//! Gaps that `get_missing_events` could not close: an event whose prev events stay unknown. As Synapse does, the
//! sending server is asked for the state at each missing prev event (`/state_ids`), what we lack of it is fetched
//! (bounded), and the room core resolves the states after the known and the missing prev events together
//! ([`crate::room::remote::state_across_gap`]), instead of placing the event on our current state.

use std::collections::HashSet;

use ruma::RoomId;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::federation::batches::Remote;
use crate::federation::client::enc;
use crate::federation::inbound::{fetch_outliers_up_to, unknown_events, FETCH_TIMEOUT, MAX_OUTLIER_FETCH};
use crate::room::remote::GapBranch;

/// Missing prev events of one event whose state is asked for; an event with more is placed on current state.
const MAX_MISSING_PREVS: usize = 5;

/// Most events fetched to fill in the state at one missing prev event of a room whose full state we hold (as
/// Synapse, we fetch what we lack; in a partial-state room that is most members, left to the resync).
const MAX_GAP_FETCH: usize = 2000;

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or_default()
}

/// For each of `missing` (prev events of an event from `origin` that stay unknown): the state before it from
/// `origin`'s `/state_ids`, with the missing event itself and the state events we lack fetched and stored as
/// outliers (up to [`MAX_GAP_FETCH`]). When more are lacking than that (a partial-state room lacks most memberships:
/// there one fetch takes [`MAX_OUTLIER_FETCH`]),
/// only the missing event and its auth events are fetched and the branch is built from what we hold.
/// `None` when there are too many missing prevs; an error when `origin` cannot answer.
pub async fn states_at_missing_prevs(
    r: Remote<'_>,
    origin: &str,
    room_id: &RoomId,
    missing: &[String],
) -> Result<Option<Vec<GapBranch>>> {
    if missing.is_empty() || missing.len() > MAX_MISSING_PREVS {
        return Ok(None);
    }
    let rid = room_id.to_owned();
    let partial = r
        .store
        .read(move |c| Ok(crate::store::rooms::room_by_id(c, rid.as_str())?.is_some_and(|room| room.partial_state)))
        .await?;
    let bound = if partial { MAX_OUTLIER_FETCH } else { MAX_GAP_FETCH };
    let mut branches = Vec::new();
    for prev in missing {
        let path = format!("/_matrix/federation/v1/state_ids/{}?event_id={}", enc(room_id.as_str()), enc(prev));
        let answer = match r.client.request_timeout(reqwest::Method::GET, origin, &path, None, FETCH_TIMEOUT).await {
            Ok(a) => a,
            Err(e) => {
                tracing::info!(origin, %room_id, prev, error = %e, "state at a missing prev event unavailable");
                return Err(Error::bad_gateway(format!("the state at prev event {prev} is unavailable: {e}")));
            }
        };
        let state = strings(answer.get("pdu_ids"));
        let chain = strings(answer.get("auth_chain_ids"));
        let listed: Vec<String> = state.iter().chain(&chain).cloned().chain(std::iter::once(prev.clone())).collect();
        let unknown = unknown_events(r.store, listed).await?;
        let wanted = if unknown.len() <= bound {
            unknown
        } else {
            tracing::info!(
                origin,
                %room_id,
                prev,
                lacking = unknown.len(),
                "state at a missing prev event: too much to fetch now; using the events we hold"
            );
            unknown.into_iter().filter(|id| id == prev).collect()
        };
        if !wanted.is_empty() {
            fetch_outliers_up_to(r, origin, room_id, wanted, &HashSet::new(), bound).await?;
        }
        branches.push(GapBranch { prev: prev.clone(), state_before: state });
    }
    Ok(Some(branches))
}
