//! Account data: per-user JSON blobs, global or per room, delivered to the user's clients through /sync.

use axum::extract::{Path, State};
use axum::response::IntoResponse;
use serde_json::{json, Value};

use crate::client::push_rules;
use crate::error::{Error, Result};
use crate::http::{AppState, Auth, Json};
use crate::store::account_data;

/// Types the server manages itself; clients change them through their own APIs (read markers, push rules).
const SERVER_MANAGED: [&str; 2] = ["m.fully_read", push_rules::PUSH_RULES];

fn check_owner(auth: &Auth, user_id: &str) -> Result<()> {
    if auth.user_id != user_id {
        return Err(Error::forbidden("cannot access another user's account data"));
    }
    Ok(())
}

fn check_room_id(room_id: &str) -> Result<()> {
    ruma::RoomId::parse(room_id).map(|_| ()).map_err(|e| Error::invalid_param(format!("invalid room id: {e}")))
}

async fn put(s: &AppState, auth: &Auth, user_id: &str, room_id: &str, data_type: &str, content: Value) -> Result<()> {
    check_owner(auth, user_id)?;
    if !content.is_object() {
        return Err(Error::bad_json("account data must be a JSON object"));
    }
    if SERVER_MANAGED.contains(&data_type) {
        return Err(Error::server_managed(format!("cannot set {data_type} through this API")));
    }
    let (u, r, t) = (user_id.to_owned(), room_id.to_owned(), data_type.to_owned());
    s.store.write(move |w| account_data::set(w, &u, &r, &t, &content).map(|_| ())).await
}

async fn get(s: &AppState, auth: &Auth, user_id: &str, room_id: &str, data_type: &str) -> Result<Value> {
    check_owner(auth, user_id)?;
    if room_id.is_empty() && data_type == push_rules::PUSH_RULES {
        // Push rules exist (as the defaults) even before the user changes any.
        return push_rules::load(s, user_id).await;
    }
    let (u, r, t) = (user_id.to_owned(), room_id.to_owned(), data_type.to_owned());
    s.store
        .read(move |c| account_data::get(c, &u, &r, &t))
        .await?
        .ok_or_else(|| Error::not_found("account data not found"))
}

pub async fn put_global(
    State(s): State<AppState>,
    auth: Auth,
    Path((user_id, data_type)): Path<(String, String)>,
    Json(content): Json<Value>,
) -> Result<impl IntoResponse> {
    put(&s, &auth, &user_id, "", &data_type, content).await?;
    Ok(axum::Json(json!({})))
}

pub async fn get_global(
    State(s): State<AppState>,
    auth: Auth,
    Path((user_id, data_type)): Path<(String, String)>,
) -> Result<impl IntoResponse> {
    Ok(axum::Json(get(&s, &auth, &user_id, "", &data_type).await?))
}

pub async fn put_room(
    State(s): State<AppState>,
    auth: Auth,
    Path((user_id, room_id, data_type)): Path<(String, String, String)>,
    Json(content): Json<Value>,
) -> Result<impl IntoResponse> {
    check_room_id(&room_id)?;
    put(&s, &auth, &user_id, &room_id, &data_type, content).await?;
    Ok(axum::Json(json!({})))
}

pub async fn get_room(
    State(s): State<AppState>,
    auth: Auth,
    Path((user_id, room_id, data_type)): Path<(String, String, String)>,
) -> Result<impl IntoResponse> {
    check_room_id(&room_id)?;
    Ok(axum::Json(get(&s, &auth, &user_id, &room_id, &data_type).await?))
}
