//! Admin endpoints under `/_hearth/admin/v1` (admins only).

use axum::extract::State;
use axum::response::IntoResponse;
use serde_json::json;

use crate::error::{Error, Result};
use crate::http::{AppState, Auth};
use crate::store::rooms;

/// Background jobs with progress: room, done/total, rate, ETA (the lazy-join resyncs among them).
pub async fn jobs(State(s): State<AppState>, auth: Auth) -> Result<impl IntoResponse> {
    if !auth.admin {
        return Err(Error::forbidden("admins only"));
    }
    let jobs = s.store.read(crate::jobs::progress).await?;
    let partial = s
        .store
        .read(rooms::partial_state_rooms)
        .await?
        .into_iter()
        .map(|(room_id, joined)| json!({"room_id": room_id, "known_joined_members": joined, "syncing": true}))
        .collect::<Vec<_>>();
    Ok(axum::Json(json!({"jobs": jobs, "partial_state_rooms": partial})))
}

/// Counters: federation requests served by endpoint.
pub async fn stats(State(s): State<AppState>, auth: Auth) -> Result<impl IntoResponse> {
    if !auth.admin {
        return Err(Error::forbidden("admins only"));
    }
    let fed = s.fed_requests.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok(axum::Json(json!({"federation_requests": fed})))
}
