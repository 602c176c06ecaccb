//! `GET`/`PUT /presence/{userId}/status` (the domain is `room::presence`).

use axum::extract::{Path, State};
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::json;

use crate::error::{Error, Result};
use crate::http::{AppState, Auth, Json};
use crate::room::presence::{self, Change};
use crate::store::accounts::now_ms;

#[derive(Deserialize)]
pub struct PresenceBody {
    presence: String,
    status_msg: Option<String>,
}

/// A user's presence, for themselves or a user sharing a room with them (403 otherwise, as Synapse). With presence
/// off, everyone is `offline`.
pub async fn get_presence(
    State(s): State<AppState>,
    auth: Auth,
    Path(user_id): Path<String>,
) -> Result<impl IntoResponse> {
    crate::util::parse_user_id(&user_id)?;
    if !s.presence.enabled() {
        return Ok(axum::Json(json!({"presence": "offline"})));
    }
    if auth.user_id != user_id {
        let (viewer, u) = (auth.user_id.to_string(), user_id.clone());
        let visible = s.store.read(move |c| crate::store::presence::visible_to(c, &viewer, &u)).await?;
        if !visible {
            return Err(Error::forbidden("You are not allowed to see their presence"));
        }
    }
    let p = s.presence.get(&s.store, &user_id).await?;
    Ok(axum::Json(presence::client_content(&p, now_ms())))
}

/// Sets one's own presence and status message (a missing `status_msg` clears it).
pub async fn put_presence(
    State(s): State<AppState>,
    auth: Auth,
    Path(user_id): Path<String>,
    Json(body): Json<PresenceBody>,
) -> Result<impl IntoResponse> {
    if auth.user_id != user_id {
        return Err(Error::forbidden("cannot set another user's presence"));
    }
    presence::check_set(&body.presence, body.status_msg.as_deref())?;
    let change = Change::Set { state: body.presence, status_msg: body.status_msg };
    s.presence.update(&s.store, &user_id, change).await?;
    Ok(axum::Json(json!({})))
}
