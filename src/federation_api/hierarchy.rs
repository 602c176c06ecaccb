//! `GET /_matrix/federation/v1/hierarchy/{roomId}`: a space and the summaries of its children we hold, for the
//! asking server to filter for its user (`room::hierarchy::federation_answer`). A room we are not in, or that the
//! server may not see, is 404 (as Synapse answers), and the room's ACL applies.

use axum::extract::{Path, State};
use axum::response::IntoResponse;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::http::{qs, AppState, Query, Signed};
use crate::room::hierarchy::federation_answer;

#[derive(Deserialize)]
pub struct HierarchyQuery {
    #[serde(default, deserialize_with = "qs::opt_bool")]
    suggested_only: Option<bool>,
}

pub async fn hierarchy(
    State(s): State<AppState>,
    Path(room_id): Path<String>,
    Query(q): Query<HierarchyQuery>,
    signed: Signed,
) -> Result<impl IntoResponse> {
    let me = s.identity.server_name.to_string();
    let suggested_only = q.suggested_only.unwrap_or(false);
    let answer = s
        .store
        .read(move |c| {
            if let Some(room) = crate::store::rooms::room_by_id(c, &room_id)? {
                if !crate::federation::acl::room_allows(c, room.current_sg, &signed.origin)? {
                    return Err(Error::forbidden("server denied by the room's ACL"));
                }
            }
            federation_answer(c, &room_id, &signed.origin, suggested_only, &me)
        })
        .await?
        .ok_or_else(|| Error::not_found("unknown room"))?;
    Ok(axum::Json(answer))
}
