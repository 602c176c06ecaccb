//! Profiles: display name and avatar, mirrored into the member events of every joined room.

use axum::extract::{Path, State};
use axum::response::IntoResponse;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::http::{AppState, Auth, Json};
use crate::room::append::{append_local, LocalEvent};
use crate::store::accounts::{self, ProfileField};
use crate::store::{members, rooms};

pub async fn get_profile(State(s): State<AppState>, Path(user_id): Path<String>) -> Result<impl IntoResponse> {
    crate::util::parse_user_id(&user_id)?;
    if is_remote_user(&s, &user_id) {
        let remote = crate::federation::query::remote_profile(&s.fed, &user_id, None).await?;
        let mut body = json!({});
        for k in ["displayname", "avatar_url"] {
            if let Some(v) = remote.get(k).filter(|v| v.is_string()) {
                body[k] = v.clone();
            }
        }
        return Ok(axum::Json(body));
    }
    let uid = user_id.clone();
    let mut user = s.store.read(move |c| accounts::get_user(c, &uid)).await?;
    // A user of a bridge's namespace that does not exist yet: the bridge may create it on demand.
    if user.is_none() && crate::client::appservice::query_user(&s, &user_id).await {
        user = s.store.read(move |c| accounts::get_user(c, &user_id)).await?;
    }
    let user = user.filter(|u| !u.deactivated).ok_or_else(|| Error::not_found("profile not found"))?;
    let mut body = json!({});
    if let Some(d) = user.displayname {
        body["displayname"] = json!(d);
    }
    if let Some(a) = user.avatar_url {
        body["avatar_url"] = json!(a);
    }
    Ok(axum::Json(body))
}

/// A well-formed user id of another server (whose profile that server answers for).
fn is_remote_user(s: &AppState, user_id: &str) -> bool {
    ruma::UserId::parse(user_id).is_ok() && !s.identity.is_local_user(user_id)
}

/// The profile fields kept here. Another key is no unknown endpoint (`M_UNRECOGNIZED`): reading it is 404
/// `M_NOT_FOUND` (as Synapse answers a key a profile does not have), setting it 400 `M_INVALID_PARAM`.
fn field(name: &str) -> Option<ProfileField> {
    match name {
        "displayname" => Some(ProfileField::Displayname),
        "avatar_url" => Some(ProfileField::AvatarUrl),
        _ => None,
    }
}

pub async fn get_field(
    State(s): State<AppState>,
    Path((user_id, name)): Path<(String, String)>,
) -> Result<impl IntoResponse> {
    let f = field(&name).ok_or_else(|| Error::not_found("the profile has no such field"))?;
    crate::util::parse_user_id(&user_id)?;
    if is_remote_user(&s, &user_id) {
        let remote = crate::federation::query::remote_profile(&s.fed, &user_id, Some(&name)).await?;
        return match remote.get(&name).and_then(Value::as_str).filter(|v| !v.is_empty()) {
            Some(v) => Ok(axum::Json(json!({ name: v }))),
            None => Err(Error::not_found("profile field not set")),
        };
    }
    let user = s
        .store
        .read(move |c| accounts::get_user(c, &user_id))
        .await?
        .filter(|u| !u.deactivated)
        .ok_or_else(|| Error::not_found("profile not found"))?;
    let v = match f {
        ProfileField::Displayname => user.displayname,
        ProfileField::AvatarUrl => user.avatar_url,
    };
    match v {
        Some(v) => Ok(axum::Json(json!({ name: v }))),
        None => Err(Error::not_found("profile field not set")),
    }
}

pub async fn set_field(
    State(s): State<AppState>,
    auth: Auth,
    Path((user_id, name)): Path<(String, String)>,
    Json(body): Json<Value>,
) -> Result<impl IntoResponse> {
    if user_id != auth.user_id {
        return Err(Error::forbidden("cannot change another user's profile"));
    }
    let f = field(&name).ok_or_else(|| Error::invalid_param("only displayname and avatar_url can be set"))?;
    let value = match body.get(&name) {
        Some(Value::String(v)) => Some(v.clone()),
        Some(Value::Null) => None,
        None => return Err(Error::bad_json(format!("missing `{name}` (null removes it)"))),
        Some(_) => return Err(Error::bad_json(format!("`{name}` must be a string"))),
    };
    if value.as_ref().is_some_and(|v| v.len() > 256 * 4) {
        return Err(Error::too_large("profile value too long"));
    }
    let (u, v) = (user_id.clone(), value.clone());
    let rooms = s
        .store
        .write(move |w| {
            accounts::set_profile_field(w.db(), &u, f, v.as_deref())?;
            members::rooms_with_membership(w.db(), &u, "join")
        })
        .await?;
    // Each room's member event in its own short write, so one big profile change never holds the writer long.
    for (_, room_id) in rooms {
        let (identity, uid, name, value) = (s.identity.clone(), user_id.clone(), name.clone(), value.clone());
        let result = s
            .store
            .write(move |w| {
                let room = rooms::room_by_id(w.db(), &room_id)?.ok_or_else(|| Error::not_found("room vanished"))?;
                let Some(sg) = room.current_sg else { return Ok(()) };
                let Some(mut content) = crate::room::state_content(w.db(), sg, "m.room.member", &uid)? else {
                    return Ok(());
                };
                if content.get("membership").and_then(Value::as_str) != Some("join") {
                    return Ok(());
                }
                match &value {
                    Some(v) => content[&name] = json!(v),
                    None => {
                        content.as_object_mut().map(|o| o.remove(&name));
                    }
                }
                append_local(
                    w,
                    &identity,
                    &crate::room::parse_room_id(&room.room_id)?,
                    &crate::room::parse_user_id(&uid)?,
                    LocalEvent::state("m.room.member", &uid, content),
                    None,
                )?;
                Ok(())
            })
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not update member event after profile change");
        }
    }
    Ok(axum::Json(json!({})))
}
