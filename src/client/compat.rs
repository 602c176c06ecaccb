//! Endpoints clients call routinely (Element-family clients on start-up and in settings), answered honestly for a
//! server without the feature: no TURN server, no 3PIDs; and the user
//! directory, searching the people who share a room with the requester or sit in a public room (as Synapse's
//! default `search_all_users: false`).

use axum::extract::State;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::http::{AppState, Auth, Json};
use crate::store::members;
use crate::store::Db;

/// `GET /voip/turnServer`: no TURN server configured (Synapse answers `{}` too).
pub async fn turn_server(_auth: Auth) -> impl IntoResponse {
    axum::Json(json!({}))
}

/// `GET /account/3pid`: no email addresses or phone numbers are bound.
pub async fn threepids(_auth: Auth) -> impl IntoResponse {
    axum::Json(json!({"threepids": []}))
}

#[derive(Deserialize)]
pub struct DirectorySearch {
    search_term: String,
    limit: Option<u64>,
}

/// `POST /user_directory/search`: users sharing a joined room with the requester or joined to a published room,
/// matched case-insensitively on user id or display name; local users' profiles from their accounts.
pub async fn user_directory_search(
    State(s): State<AppState>,
    auth: Auth,
    Json(body): Json<DirectorySearch>,
) -> Result<impl IntoResponse> {
    let limit = body.limit.unwrap_or(10).clamp(1, 50) as usize;
    let term = body.search_term.trim().to_lowercase();
    if term.is_empty() {
        return Err(Error::invalid_param("search_term is empty"));
    }
    let me = auth.user_id.clone();
    let found = s
        .store
        .read(move |c| {
            let mut found = members::search_users(c, me.as_str(), &term, (limit + 1) as i64)?;
            if let Some(self_entry) = searcher_if_public(c, me.as_str(), &term)? {
                found.push(self_entry);
                found.sort_by(|a, b| a.user_id.cmp(&b.user_id));
                found.truncate(limit + 1);
            }
            Ok(found)
        })
        .await?;
    let limited = found.len() > limit;
    let results: Vec<Value> = found
        .into_iter()
        .take(limit)
        .map(|p| {
            let mut v = json!({"user_id": p.user_id});
            if let Some(n) = p.displayname {
                v["display_name"] = json!(n);
            }
            if let Some(a) = p.avatar_url {
                v["avatar_url"] = json!(a);
            }
            v
        })
        .collect();
    Ok(axum::Json(json!({"results": results, "limited": limited})))
}

/// The searcher themselves, when they match `term` and are joined to a publicly joinable room (Synapse lists the
/// members of such rooms, the searcher included, in its `users_in_public_rooms`; a partial-state room counts by
/// the join rule it already holds). Complement's "User directory is correctly updated once state re-sync completes"
/// searches for the searcher during a lazy join.
fn searcher_if_public(c: Db<'_>, me: &str, term: &str) -> Result<Option<members::MemberProfile>> {
    let user = crate::store::accounts::get_user(c, me)?;
    let name = user.as_ref().and_then(|u| u.displayname.clone());
    let matches = me.to_lowercase().contains(term) || name.as_deref().is_some_and(|n| n.to_lowercase().contains(term));
    if !matches {
        return Ok(None);
    }
    for (room_nid, _) in members::rooms_with_membership(c, me, "join")? {
        let Some(sg) = crate::store::rooms::room_by_nid(c, room_nid)?.and_then(|r| r.current_sg) else { continue };
        let rules = crate::room::state_content(c, sg, "m.room.join_rules", "")?;
        if rules.as_ref().and_then(|v| v.get("join_rule")).and_then(Value::as_str) == Some("public") {
            let avatar_url = user.and_then(|u| u.avatar_url);
            return Ok(Some(members::MemberProfile { user_id: me.to_owned(), displayname: name, avatar_url }));
        }
    }
    Ok(None)
}
