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

/// Servers asked at most by one [`remote_timestamp_to_event`].
const MAX_TIMESTAMP_SERVERS: usize = 5;

/// Asks the servers of a room, in turn, for the event closest to `ts` (`/timestamp_to_event`); the first valid
/// answer wins: (event id, its `origin_server_ts`, the server). The event itself is then fetched from that server
/// and stored as an outlier (as Synapse does), so `/event` and `/context` can find it; that fetch is best effort.
pub async fn remote_timestamp_to_event(
    s: &FedContext,
    room_id: &ruma::RoomId,
    ts: i64,
    forward: bool,
    servers: &[String],
) -> Option<(String, i64, String)> {
    let fed = s.federation.as_ref()?;
    let dir = if forward { "f" } else { "b" };
    let path = format!("/_matrix/federation/v1/timestamp_to_event/{}?ts={ts}&dir={dir}", enc(room_id.as_str()));
    for server in servers.iter().take(MAX_TIMESTAMP_SERVERS) {
        let answer = fed
            .client
            .request_timeout(reqwest::Method::GET, server, &path, None, std::time::Duration::from_secs(10))
            .await;
        let v = match answer {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(%server, error = %Error::from(e), "timestamp_to_event: no answer");
                continue;
            }
        };
        let (Some(id), Some(at)) =
            (v.get("event_id").and_then(Value::as_str), v.get("origin_server_ts").and_then(Value::as_i64))
        else {
            continue;
        };
        if ruma::EventId::parse(id).is_err() {
            continue;
        }
        if let Ok(r) = crate::federation::batches::Remote::of(s) {
            let fetched = crate::federation::inbound::fetch_outliers(
                r,
                server,
                room_id,
                vec![id.to_owned()],
                &std::collections::HashSet::new(),
            )
            .await;
            if let Err(e) = fetched {
                tracing::debug!(%server, event = id, error = %e, "timestamp_to_event: fetching the event failed");
            }
        }
        return Some((id.to_owned(), at, server.clone()));
    }
    None
}
