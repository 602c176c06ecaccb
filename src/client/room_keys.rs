//! Server-side key backup (`/room_keys/*`): backup versions per user (algorithm + auth data, opaque to the server)
//! and the encrypted Megolm session keys stored under a version. Only the newest version takes new keys.

use axum::extract::{Path, State};
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::http::{AppState, Auth, Json, Query};
use crate::store::room_keys::{self, BackupKey};
use crate::store::Db;

#[derive(Deserialize)]
pub struct VersionBody {
    algorithm: String,
    auth_data: Value,
    version: Option<String>,
}

#[derive(Deserialize)]
pub struct VersionQuery {
    version: Option<String>,
}

fn parse_version(v: &str) -> Result<i64> {
    v.parse::<i64>().ok().filter(|n| *n > 0).ok_or_else(|| Error::not_found("unknown backup version"))
}

fn version_info(c: Db<'_>, user: &str, version: i64) -> Result<Value> {
    let info = room_keys::version(c, user, version)?.ok_or_else(|| Error::not_found("unknown backup version"))?;
    let count = room_keys::key_count(c, user, version)?;
    Ok(json!({"algorithm": info.algorithm, "auth_data": info.auth_data, "count": count,
              "etag": info.etag.to_string(), "version": version.to_string()}))
}

/// The backup algorithms clients use: the spec's `m.megolm_backup.v1.curve25519-aes-sha2` and its relatives.
const BACKUP_FAMILY: &str = "m.megolm_backup.";

pub async fn create_version(
    State(s): State<AppState>,
    auth: Auth,
    Json(body): Json<VersionBody>,
) -> Result<impl IntoResponse> {
    if !body.auth_data.is_object() {
        return Err(Error::bad_json("auth_data must be an object"));
    }
    // The server never reads the keys, so any algorithm of the megolm backup family is stored (Synapse stores any
    // name; Complement uses `m.megolm_backup.v1`); names outside it (schemathesis' `AAA`) are refused.
    if !body.algorithm.starts_with(BACKUP_FAMILY) {
        return Err(Error::invalid_param(format!(
            "unsupported backup algorithm; use {BACKUP_FAMILY}v1.curve25519-aes-sha2"
        )));
    }
    let user = auth.user_id;
    let version = s
        .store
        .write(move |w| room_keys::create_version(w.db(), user.as_str(), &body.algorithm, &body.auth_data))
        .await?;
    Ok(axum::Json(json!({"version": version.to_string()})))
}

pub async fn get_latest_version(State(s): State<AppState>, auth: Auth) -> Result<impl IntoResponse> {
    let user = auth.user_id;
    let info = s
        .store
        .read(move |c| match room_keys::latest_version(c, user.as_str())? {
            Some(v) => version_info(c, user.as_str(), v),
            None => Err(Error::not_found("no current backup version")),
        })
        .await?;
    Ok(axum::Json(info))
}

pub async fn get_version(
    State(s): State<AppState>,
    auth: Auth,
    Path(version): Path<String>,
) -> Result<impl IntoResponse> {
    let v = parse_version(&version)?;
    let user = auth.user_id;
    Ok(axum::Json(s.store.read(move |c| version_info(c, user.as_str(), v)).await?))
}

pub async fn update_version(
    State(s): State<AppState>,
    auth: Auth,
    Path(version): Path<String>,
    Json(body): Json<VersionBody>,
) -> Result<impl IntoResponse> {
    let v = parse_version(&version)?;
    if body.version.as_deref().is_some_and(|b| b != version) {
        return Err(Error::invalid_param("the version in the body does not match the path"));
    }
    if !body.auth_data.is_object() {
        return Err(Error::bad_json("auth_data must be an object"));
    }
    let user = auth.user_id;
    s.store
        .write(move |w| {
            let current = room_keys::version(w.db(), user.as_str(), v)?
                .ok_or_else(|| Error::not_found("unknown backup version"))?;
            if current.algorithm != body.algorithm {
                return Err(Error::invalid_param("the algorithm of a backup version cannot change"));
            }
            room_keys::set_auth_data(w.db(), user.as_str(), v, &body.auth_data)
        })
        .await?;
    Ok(axum::Json(json!({})))
}

pub async fn delete_version(
    State(s): State<AppState>,
    auth: Auth,
    Path(version): Path<String>,
) -> Result<impl IntoResponse> {
    let v = parse_version(&version)?;
    let user = auth.user_id;
    s.store
        .write(move |w| match room_keys::delete_version(w.db(), user.as_str(), v)? {
            true => Ok(()),
            false => Err(Error::not_found("unknown backup version")),
        })
        .await?;
    Ok(axum::Json(json!({})))
}

// ---- keys -----------------------------------------------------------------------------------------------------

/// The version keys may be written to: the newest one, else 403 `M_WRONG_ROOM_KEYS_VERSION`.
fn writable_version(c: Db<'_>, user: &str, version: Option<&str>) -> Result<i64> {
    let v = parse_version(version.ok_or_else(|| Error::missing_param("the version query parameter is required"))?)?;
    version_info(c, user, v)?;
    match room_keys::latest_version(c, user)? {
        Some(current) if current == v => Ok(v),
        current => Err(Error::wrong_room_keys_version(current.map(|c| c.to_string()).unwrap_or_default())),
    }
}

/// An existing version named by the `version` query parameter.
fn readable_version(c: Db<'_>, user: &str, version: Option<&str>) -> Result<i64> {
    let v = parse_version(version.ok_or_else(|| Error::missing_param("the version query parameter is required"))?)?;
    version_info(c, user, v)?;
    Ok(v)
}

fn count_and_etag(c: Db<'_>, user: &str, version: i64) -> Result<Value> {
    let info = version_info(c, user, version)?;
    Ok(json!({"count": info["count"], "etag": info["etag"]}))
}

/// `rooms -> sessions -> KeyBackupData` from a body shaped by how much of the path was given.
fn parse_keys(room: Option<&str>, session: Option<&str>, body: Value) -> Result<Vec<(String, String, BackupKey)>> {
    let mut out = Vec::new();
    let sessions_of = |room_id: &str, sessions: &Value, out: &mut Vec<(String, String, BackupKey)>| -> Result<()> {
        let map =
            sessions.get("sessions").and_then(Value::as_object).ok_or_else(|| Error::bad_json("missing sessions"))?;
        for (sid, data) in map {
            out.push((
                room_id.to_owned(),
                sid.clone(),
                serde_json::from_value(data.clone()).map_err(|e| Error::bad_json(e.to_string()))?,
            ));
        }
        Ok(())
    };
    match (room, session) {
        (Some(r), Some(sid)) => out.push((
            r.to_owned(),
            sid.to_owned(),
            serde_json::from_value(body).map_err(|e| Error::bad_json(e.to_string()))?,
        )),
        (Some(r), None) => sessions_of(r, &body, &mut out)?,
        _ => {
            let rooms = body.get("rooms").and_then(Value::as_object).ok_or_else(|| Error::bad_json("missing rooms"))?;
            for (r, sessions) in rooms {
                sessions_of(r, sessions, &mut out)?;
            }
        }
    }
    for (r, _, _) in &out {
        ruma::RoomId::parse(r).map_err(|e| Error::invalid_param(format!("invalid room id: {e}")))?;
    }
    Ok(out)
}

async fn put_keys(
    s: &AppState,
    auth: Auth,
    version: Option<String>,
    room: Option<String>,
    session: Option<String>,
    body: Value,
) -> Result<Value> {
    let keys = parse_keys(room.as_deref(), session.as_deref(), body)?;
    let user = auth.user_id;
    s.store
        .write(move |w| {
            let v = writable_version(w.db(), user.as_str(), version.as_deref())?;
            let mut changed = false;
            for (r, sid, k) in &keys {
                changed |= room_keys::put_key(w.db(), user.as_str(), v, r, sid, k)?;
            }
            if changed {
                room_keys::bump_etag(w.db(), user.as_str(), v)?;
            }
            count_and_etag(w.db(), user.as_str(), v)
        })
        .await
}

async fn get_keys(
    s: &AppState,
    auth: Auth,
    version: Option<String>,
    room: Option<String>,
    session: Option<String>,
) -> Result<Value> {
    let user = auth.user_id;
    s.store
        .read(move |c| {
            let v = readable_version(c, user.as_str(), version.as_deref())?;
            let mut rooms: Map<String, Value> = Map::new();
            for (r, sid, k) in room_keys::keys(c, user.as_str(), v, room.as_deref(), session.as_deref())? {
                let key = json!({"first_message_index": k.first_message_index, "forwarded_count": k.forwarded_count,
                                 "is_verified": k.is_verified, "session_data": k.session_data});
                let entry = rooms.entry(r).or_insert_with(|| json!({"sessions": {}}));
                entry["sessions"][sid] = key;
            }
            Ok(match (&room, &session) {
                (Some(r), Some(sid)) => rooms
                    .get(r)
                    .and_then(|x| x["sessions"].get(sid))
                    .cloned()
                    .ok_or_else(|| Error::not_found("no such key in the backup"))?,
                (Some(r), None) => rooms.remove(r).unwrap_or_else(|| json!({"sessions": {}})),
                _ => json!({"rooms": rooms}),
            })
        })
        .await
}

async fn delete_keys(
    s: &AppState,
    auth: Auth,
    version: Option<String>,
    room: Option<String>,
    session: Option<String>,
) -> Result<Value> {
    let user = auth.user_id;
    s.store
        .write(move |w| {
            let v = readable_version(w.db(), user.as_str(), version.as_deref())?;
            if room_keys::delete_keys(w.db(), user.as_str(), v, room.as_deref(), session.as_deref())? > 0 {
                room_keys::bump_etag(w.db(), user.as_str(), v)?;
            }
            count_and_etag(w.db(), user.as_str(), v)
        })
        .await
}

pub async fn put_all(
    State(s): State<AppState>,
    auth: Auth,
    Query(q): Query<VersionQuery>,
    Json(body): Json<Value>,
) -> Result<impl IntoResponse> {
    Ok(axum::Json(put_keys(&s, auth, q.version, None, None, body).await?))
}
pub async fn put_room(
    State(s): State<AppState>,
    auth: Auth,
    Path(room_id): Path<String>,
    Query(q): Query<VersionQuery>,
    Json(body): Json<Value>,
) -> Result<impl IntoResponse> {
    Ok(axum::Json(put_keys(&s, auth, q.version, Some(room_id), None, body).await?))
}
pub async fn put_session(
    State(s): State<AppState>,
    auth: Auth,
    Path((room_id, session_id)): Path<(String, String)>,
    Query(q): Query<VersionQuery>,
    Json(body): Json<Value>,
) -> Result<impl IntoResponse> {
    Ok(axum::Json(put_keys(&s, auth, q.version, Some(room_id), Some(session_id), body).await?))
}
pub async fn get_all(
    State(s): State<AppState>,
    auth: Auth,
    Query(q): Query<VersionQuery>,
) -> Result<impl IntoResponse> {
    Ok(axum::Json(get_keys(&s, auth, q.version, None, None).await?))
}
pub async fn get_room(
    State(s): State<AppState>,
    auth: Auth,
    Path(room_id): Path<String>,
    Query(q): Query<VersionQuery>,
) -> Result<impl IntoResponse> {
    Ok(axum::Json(get_keys(&s, auth, q.version, Some(room_id), None).await?))
}
pub async fn get_session(
    State(s): State<AppState>,
    auth: Auth,
    Path((room_id, session_id)): Path<(String, String)>,
    Query(q): Query<VersionQuery>,
) -> Result<impl IntoResponse> {
    Ok(axum::Json(get_keys(&s, auth, q.version, Some(room_id), Some(session_id)).await?))
}
pub async fn delete_all(
    State(s): State<AppState>,
    auth: Auth,
    Query(q): Query<VersionQuery>,
) -> Result<impl IntoResponse> {
    Ok(axum::Json(delete_keys(&s, auth, q.version, None, None).await?))
}
pub async fn delete_room(
    State(s): State<AppState>,
    auth: Auth,
    Path(room_id): Path<String>,
    Query(q): Query<VersionQuery>,
) -> Result<impl IntoResponse> {
    Ok(axum::Json(delete_keys(&s, auth, q.version, Some(room_id), None).await?))
}
pub async fn delete_session(
    State(s): State<AppState>,
    auth: Auth,
    Path((room_id, session_id)): Path<(String, String)>,
    Query(q): Query<VersionQuery>,
) -> Result<impl IntoResponse> {
    Ok(axum::Json(delete_keys(&s, auth, q.version, Some(room_id), Some(session_id)).await?))
}
