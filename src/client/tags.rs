//! Room tags (`/user/{userId}/rooms/{roomId}/tags`), stored as the room's `m.tag` account data (so they reach the
//! user's other clients through `/sync`).

use axum::extract::{Path, State};
use axum::response::IntoResponse;
use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::http::{AppState, Auth, Json};
use crate::store::account_data;

fn check(auth: &Auth, user_id: &str, room_id: &str) -> Result<()> {
    if auth.user_id != user_id {
        return Err(Error::forbidden("cannot access another user's tags"));
    }
    ruma::RoomId::parse(room_id).map_err(|e| Error::invalid_param(format!("invalid room id: {e}")))?;
    Ok(())
}

pub async fn get_tags(
    State(s): State<AppState>,
    auth: Auth,
    Path((user_id, room_id)): Path<(String, String)>,
) -> Result<impl IntoResponse> {
    check(&auth, &user_id, &room_id)?;
    let content = s.store.read(move |c| account_data::get(c, &user_id, &room_id, "m.tag")).await?;
    let tags = content.and_then(|c| c.get("tags").filter(|t| t.is_object()).cloned()).unwrap_or_else(|| json!({}));
    Ok(axum::Json(json!({"tags": tags})))
}

/// Changes one tag in `m.tag` (None removes it), atomically on the writer.
async fn change(s: &AppState, user_id: String, room_id: String, tag: String, value: Option<Value>) -> Result<()> {
    s.store
        .write(move |w| {
            let content = account_data::get(w.db(), &user_id, &room_id, "m.tag")?;
            let mut tags: Map<String, Value> =
                content.and_then(|c| c.get("tags").and_then(Value::as_object).cloned()).unwrap_or_default();
            match value {
                Some(v) => {
                    tags.insert(tag, v);
                }
                None => {
                    tags.remove(&tag);
                }
            }
            account_data::set(w, &user_id, &room_id, "m.tag", &json!({"tags": tags}))?;
            Ok(())
        })
        .await
}

pub async fn put_tag(
    State(s): State<AppState>,
    auth: Auth,
    Path((user_id, room_id, tag)): Path<(String, String, String)>,
    Json(body): Json<Value>,
) -> Result<impl IntoResponse> {
    check(&auth, &user_id, &room_id)?;
    let obj = body.as_object().ok_or_else(|| Error::bad_json("the tag body must be an object"))?;
    if obj.get("order").is_some_and(|o| !o.is_number()) {
        return Err(Error::bad_json("order must be a number"));
    }
    if tag.is_empty() || tag.len() > 255 {
        return Err(Error::invalid_param("tag names are 1 to 255 bytes"));
    }
    change(&s, user_id, room_id, tag, Some(body)).await?;
    Ok(axum::Json(json!({})))
}

pub async fn delete_tag(
    State(s): State<AppState>,
    auth: Auth,
    Path((user_id, room_id, tag)): Path<(String, String, String)>,
) -> Result<impl IntoResponse> {
    check(&auth, &user_id, &room_id)?;
    change(&s, user_id, room_id, tag, None).await?;
    Ok(axum::Json(json!({})))
}
