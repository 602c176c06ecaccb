//! Queries other servers answer about their own users and aliases: profiles (`/query/profile`) and room aliases
//! (`/query/directory`).

use serde_json::Value;

use crate::error::{Error, Result};
use crate::federation::client::enc;
use crate::federation::FedContext;

/// The server part of a user id or alias (`@user:server`, `#alias:server`; the server may carry a port).
fn server_of(id: &str) -> Result<&str> {
    id.split_once(':').map(|x| x.1).filter(|s| !s.is_empty()).ok_or_else(|| Error::invalid_param("no server name"))
}

/// A remote user's profile, asked of their server: all of it, or only `field`. The remote's 404 is ours.
pub async fn remote_profile(s: &FedContext, user_id: &str, field: Option<&str>) -> Result<Value> {
    let fed = s.federation.as_ref().ok_or_else(|| Error::not_found("profile not found (federation is disabled)"))?;
    let mut path = format!("/_matrix/federation/v1/query/profile?user_id={}", enc(user_id));
    if let Some(f) = field {
        path.push_str(&format!("&field={}", enc(f)));
    }
    let answer = fed.client.get(server_of(user_id)?, &path).await.map_err(|e| e.or_not_found("profile not found"))?;
    if !answer.is_object() {
        return Err(Error::not_found("profile not found"));
    }
    Ok(answer)
}

/// The room a remote alias points to and the servers that can help joining it, asked of the alias's server.
pub async fn remote_alias(s: &FedContext, alias: &str) -> Result<(String, Vec<String>)> {
    let fed = s.federation.as_ref().ok_or_else(|| Error::not_found("room alias not found (federation is disabled)"))?;
    let path = format!("/_matrix/federation/v1/query/directory?room_alias={}", enc(alias));
    let v = fed.client.get(server_of(alias)?, &path).await.map_err(|e| e.or_not_found("room alias not found"))?;
    let room_id =
        v.get("room_id").and_then(Value::as_str).ok_or_else(|| Error::not_found("room alias not found"))?.to_owned();
    let servers = v
        .get("servers")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or_default();
    Ok((room_id, servers))
}
