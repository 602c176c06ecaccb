//! The pushers API: `GET /pushers` and `POST /pushers/set` (HTTP pushers; email pushers are refused); and
//! `GET /notifications`, the events the user's push rules said to notify about (recorded by `client::push`).

use axum::extract::State;
use axum::response::IntoResponse;
use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::http::{AppState, Auth, Json};
use crate::store::ids::StreamPos;
use crate::store::pushers::{self, Pusher};

/// The path every HTTP pusher's URL must end with (the push gateway API).
pub const NOTIFY_PATH: &str = "/_matrix/push/v1/notify";

fn to_json(p: &Pusher) -> Value {
    let data: Value = serde_json::from_str(&p.data).unwrap_or_else(|_| json!({}));
    let mut v = json!({
        "pushkey": p.pushkey, "kind": p.kind, "app_id": p.app_id, "app_display_name": p.app_display_name,
        "device_display_name": p.device_display_name, "lang": p.lang, "data": data,
    });
    if let Some(tag) = &p.profile_tag {
        v["profile_tag"] = json!(tag);
    }
    v
}

/// `GET /pushers`.
pub async fn list(State(s): State<AppState>, auth: Auth) -> Result<impl IntoResponse> {
    let uid = auth.user_id.to_string();
    let found = s.store.read(move |c| pushers::list(c, &uid)).await?;
    Ok(axum::Json(json!({"pushers": found.iter().map(to_json).collect::<Vec<_>>()})))
}

fn string_field<'a>(body: &'a Map<String, Value>, key: &str, max: usize) -> Result<&'a str> {
    match body.get(key) {
        None | Some(Value::Null) => Err(Error::missing_param(format!("{key} is required"))),
        Some(Value::String(v)) if v.len() > max => Err(Error::invalid_param(format!("{key} is too long"))),
        Some(Value::String(v)) => Ok(v),
        Some(_) => Err(Error::invalid_param(format!("{key} must be a string"))),
    }
}

/// Checks an HTTP pusher's `data`: an object whose `url` is an http(s) URL ending in [`NOTIFY_PATH`], and whose
/// `format`, when given, is `event_id_only`.
fn check_data(data: &Value) -> Result<()> {
    let Some(obj) = data.as_object() else { return Err(Error::invalid_param("data must be an object")) };
    let Some(url) = obj.get("url").and_then(Value::as_str) else {
        return Err(Error::invalid_param("data.url is required for http pushers"));
    };
    let parsed = reqwest::Url::parse(url).map_err(|_| Error::invalid_param("data.url is not a URL"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(Error::invalid_param("data.url must be an http(s) URL"));
    }
    if parsed.path() != NOTIFY_PATH || parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(Error::invalid_param(format!("data.url must end in {NOTIFY_PATH}")));
    }
    match obj.get("format") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(f)) if f == "event_id_only" => Ok(()),
        Some(_) => Err(Error::invalid_param("data.format: only event_id_only is supported")),
    }
}

/// `POST /pushers/set`: creates or replaces the pusher `(app_id, pushkey)` of the user (without `append`, other
/// users' pushers with the same pair go), or deletes it when `kind` is `null`.
pub async fn set(State(s): State<AppState>, auth: Auth, Json(body): Json<Value>) -> Result<impl IntoResponse> {
    let Some(body) = body.as_object() else { return Err(Error::bad_json("the body must be an object")) };
    let pushkey = string_field(body, "pushkey", 512)?.to_owned();
    let app_id = string_field(body, "app_id", 64)?.to_owned();
    let user_id = auth.user_id.to_string();
    let kind = match body.get("kind") {
        None => return Err(Error::missing_param("kind is required")),
        Some(Value::Null) => {
            s.store.write(move |w| pushers::delete(w.db(), &user_id, &app_id, &pushkey)).await?;
            return Ok(axum::Json(json!({})));
        }
        Some(Value::String(k)) if k == "http" => k.clone(),
        Some(Value::String(k)) if k == "email" => {
            return Err(Error::invalid_param("email pushers are not supported by this server"));
        }
        Some(_) => return Err(Error::invalid_param("kind must be \"http\" or null")),
    };
    let data = body.get("data").cloned().ok_or_else(|| Error::missing_param("data is required"))?;
    check_data(&data)?;
    let profile_tag = match body.get("profile_tag") {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) => Some(t.clone()),
        Some(_) => return Err(Error::invalid_param("profile_tag must be a string")),
    };
    let append = match body.get("append") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(Error::invalid_param("append must be a boolean")),
    };
    let pusher = Pusher {
        pusher_nid: 0,
        user_id,
        device_id: Some(auth.device_id.clone()),
        kind,
        app_id,
        pushkey,
        app_display_name: string_field(body, "app_display_name", 1024)?.to_owned(),
        device_display_name: string_field(body, "device_display_name", 1024)?.to_owned(),
        profile_tag,
        lang: string_field(body, "lang", 64)?.to_owned(),
        data: data.to_string(),
        pushkey_ts: crate::store::accounts::now_ms(),
    };
    s.store.write(move |w| pushers::set(w.db(), &pusher, append)).await?;
    Ok(axum::Json(json!({})))
}

#[derive(serde::Deserialize)]
pub struct NotificationsParams {
    from: Option<String>,
    #[serde(default, deserialize_with = "crate::http::qs::opt_u64")]
    limit: Option<u64>,
    only: Option<String>,
}

/// `GET /notifications`: newest first, `only=highlight` for highlights only; `next_token` is the stream position
/// of the last one returned (the next page lists older ones).
pub async fn notifications(
    State(s): State<AppState>,
    auth: Auth,
    crate::http::Query(q): crate::http::Query<NotificationsParams>,
) -> Result<impl IntoResponse> {
    let limit = q.limit.unwrap_or(20).clamp(1, 100) as i64;
    let before = match q.from.as_deref() {
        None | Some("") => i64::MAX,
        Some(t) => t.parse::<i64>().map_err(|_| Error::invalid_param("from is not a token from this endpoint"))?,
    };
    let only_highlight = q.only.as_deref().is_some_and(|o| o.contains("highlight"));
    let user_id = auth.user_id.to_string();
    let device = auth.device_id.clone();
    let (list, next) = s
        .store
        .read(move |c| {
            let found = pushers::notifications(c, &user_id, StreamPos(before), only_highlight, limit + 1)?;
            let more = found.len() as i64 > limit;
            // The one visibility rule applies here too (the user was a member when the event was recorded).
            let mut judge = crate::room::visibility::ClientJudge::new(c, &user_id);
            let mut out = Vec::new();
            let mut scanned = None;
            for n in found.into_iter().take(limit as usize) {
                scanned = Some(n.stream);
                let Some(row) = crate::store::events::event_by_id(c, &n.event_id)? else { continue };
                if !judge.may_see(&row)? {
                    continue;
                }
                let Some(room) = crate::store::rooms::room_by_nid(c, n.room_nid)? else { continue };
                let read = crate::store::receipts::read_positions(c, n.room_nid, &user_id)?
                    .get("")
                    .is_some_and(|r| *r >= n.stream);
                let event = crate::client::format::event(c, &row, &room.room_id, Some((&user_id, &device)), false)?;
                let actions: Value = serde_json::from_str(&n.actions).unwrap_or_else(|_| json!([]));
                out.push((
                    n.stream,
                    json!({
                        "actions": actions, "event": event, "read": read, "room_id": room.room_id, "ts": n.ts,
                    }),
                ));
            }
            Ok((out, more.then_some(scanned).flatten()))
        })
        .await?;
    let mut body = json!({"notifications": list.iter().map(|(_, n)| n.clone()).collect::<Vec<_>>()});
    // The next page starts below the last notification read, shown or not.
    if let Some(pos) = next {
        body["next_token"] = json!(pos.0.to_string());
    }
    Ok(axum::Json(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_checks() {
        assert!(check_data(&json!({"url": "https://push.example.org/_matrix/push/v1/notify"})).is_ok());
        assert!(check_data(&json!({"url": "http://127.0.0.1:5000/_matrix/push/v1/notify", "format": "event_id_only"}))
            .is_ok());
        assert!(check_data(&json!({"url": "https://push.example.org/notify"})).is_err());
        assert!(check_data(&json!({"url": "ftp://x/_matrix/push/v1/notify"})).is_err());
        assert!(check_data(&json!({"url": "https://x/_matrix/push/v1/notify", "format": "full"})).is_err());
        assert!(check_data(&json!({})).is_err());
        assert!(check_data(&json!("x")).is_err());
    }
}
