//! Server-side key backup (`/room_keys/*`): backup versions per user (algorithm + auth data, opaque to the server)
//! and the encrypted Megolm session keys stored under a version. Only the newest version takes new keys.

use axum::extract::{Path, State};
use axum::response::IntoResponse;
use rusqlite::{params, Connection, OptionalExtension};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::http::{AppState, Auth, Json, Query};
use crate::store::Writer;

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

fn latest(c: &Connection, user: &str) -> Result<Option<i64>> {
    Ok(c.query_row(
        "SELECT max(version) FROM room_key_backup_versions WHERE user_id = ?1 AND deleted = 0",
        [user],
        |r| r.get(0),
    )?)
}

fn version_info(c: &Connection, user: &str, version: i64) -> Result<Value> {
    let row: Option<(String, String, i64)> = c
        .query_row(
            "SELECT algorithm, auth_data, etag FROM room_key_backup_versions WHERE user_id = ?1 AND version = ?2 AND deleted = 0",
            params![user, version],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let (algorithm, auth_data, etag) = row.ok_or_else(|| Error::not_found("unknown backup version"))?;
    let count: i64 = c.query_row(
        "SELECT count(*) FROM room_key_backup WHERE user_id = ?1 AND version = ?2",
        params![user, version],
        |r| r.get(0),
    )?;
    Ok(json!({"algorithm": algorithm, "auth_data": serde_json::from_str::<Value>(&auth_data)?, "count": count,
              "etag": etag.to_string(), "version": version.to_string()}))
}

/// The one backup algorithm the spec defines (clients cannot use a backup of any other).
const BACKUP_ALGORITHM: &str = "m.megolm_backup.v1.curve25519-aes-sha2";

pub async fn create_version(
    State(s): State<AppState>,
    auth: Auth,
    Json(body): Json<VersionBody>,
) -> Result<impl IntoResponse> {
    if !body.auth_data.is_object() {
        return Err(Error::bad_json("auth_data must be an object"));
    }
    if body.algorithm != BACKUP_ALGORITHM {
        return Err(Error::invalid_param(format!("unsupported backup algorithm; use {BACKUP_ALGORITHM}")));
    }
    let user = auth.user_id;
    let version = s
        .store
        .write(move |w| {
            let next: i64 = w.conn.query_row(
                "SELECT coalesce(max(version), 0) + 1 FROM room_key_backup_versions WHERE user_id = ?1",
                [&user],
                |r| r.get(0),
            )?;
            w.conn.execute(
                "INSERT INTO room_key_backup_versions (user_id, version, algorithm, auth_data) VALUES (?1, ?2, ?3, ?4)",
                params![user, next, body.algorithm, body.auth_data.to_string()],
            )?;
            Ok(next)
        })
        .await?;
    Ok(axum::Json(json!({"version": version.to_string()})))
}

pub async fn get_latest_version(State(s): State<AppState>, auth: Auth) -> Result<impl IntoResponse> {
    let user = auth.user_id;
    let info = s
        .store
        .read(move |c| match latest(c, &user)? {
            Some(v) => version_info(c, &user, v),
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
    Ok(axum::Json(s.store.read(move |c| version_info(c, &user, v)).await?))
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
            let current = version_info(w.conn, &user, v)?;
            if current["algorithm"] != json!(body.algorithm) {
                return Err(Error::invalid_param("the algorithm of a backup version cannot change"));
            }
            w.conn.execute(
                "UPDATE room_key_backup_versions SET auth_data = ?3 WHERE user_id = ?1 AND version = ?2",
                params![user, v, body.auth_data.to_string()],
            )?;
            Ok(())
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
        .write(move |w| {
            let n = w.conn.execute(
                "UPDATE room_key_backup_versions SET deleted = 1 WHERE user_id = ?1 AND version = ?2 AND deleted = 0",
                params![user, v],
            )?;
            if n == 0 {
                return Err(Error::not_found("unknown backup version"));
            }
            w.conn.execute("DELETE FROM room_key_backup WHERE user_id = ?1 AND version = ?2", params![user, v])?;
            Ok(())
        })
        .await?;
    Ok(axum::Json(json!({})))
}

// ---- keys -----------------------------------------------------------------------------------------------------

/// One `KeyBackupData`.
#[derive(Deserialize)]
struct KeyData {
    first_message_index: i64,
    forwarded_count: i64,
    is_verified: bool,
    session_data: Value,
}

/// The version keys may be written to: the newest one, else 403 `M_WRONG_ROOM_KEYS_VERSION`.
fn writable_version(c: &Connection, user: &str, version: Option<&str>) -> Result<i64> {
    let v = parse_version(version.ok_or_else(|| Error::missing_param("the version query parameter is required"))?)?;
    version_info(c, user, v)?;
    match latest(c, user)? {
        Some(current) if current == v => Ok(v),
        current => Err(Error::wrong_room_keys_version(current.map(|c| c.to_string()).unwrap_or_default())),
    }
}

/// Stores one key unless the stored one is better (spec: verified beats unverified, then lower
/// first_message_index, then lower forwarded_count). Returns whether it changed anything.
fn put_key(w: &mut Writer<'_>, user: &str, version: i64, room_id: &str, session_id: &str, k: &KeyData) -> Result<bool> {
    let existing: Option<(bool, i64, i64)> = w
        .conn
        .query_row(
            "SELECT is_verified, first_message_index, forwarded_count FROM room_key_backup
             WHERE user_id = ?1 AND version = ?2 AND room_id = ?3 AND session_id = ?4",
            params![user, version, room_id, session_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    if let Some((verified, fmi, fc)) = existing {
        let better = (k.is_verified && !verified)
            || (k.is_verified == verified
                && (k.first_message_index < fmi || (k.first_message_index == fmi && k.forwarded_count < fc)));
        if !better {
            return Ok(false);
        }
    }
    w.conn.execute(
        "INSERT OR REPLACE INTO room_key_backup
           (user_id, version, room_id, session_id, first_message_index, forwarded_count, is_verified, session_data)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            user,
            version,
            room_id,
            session_id,
            k.first_message_index,
            k.forwarded_count,
            k.is_verified,
            k.session_data.to_string()
        ],
    )?;
    Ok(true)
}

fn bump_etag(w: &mut Writer<'_>, user: &str, version: i64) -> Result<()> {
    w.conn.execute(
        "UPDATE room_key_backup_versions SET etag = etag + 1 WHERE user_id = ?1 AND version = ?2",
        params![user, version],
    )?;
    Ok(())
}

fn count_and_etag(c: &Connection, user: &str, version: i64) -> Result<Value> {
    let info = version_info(c, user, version)?;
    Ok(json!({"count": info["count"], "etag": info["etag"]}))
}

/// `rooms -> sessions -> KeyBackupData` from a body shaped by how much of the path was given.
fn parse_keys(room: Option<&str>, session: Option<&str>, body: Value) -> Result<Vec<(String, String, KeyData)>> {
    let mut out = Vec::new();
    let sessions_of = |room_id: &str, sessions: &Value, out: &mut Vec<(String, String, KeyData)>| -> Result<()> {
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
            let v = writable_version(w.conn, &user, version.as_deref())?;
            let mut changed = false;
            for (r, sid, k) in &keys {
                changed |= put_key(w, &user, v, r, sid, k)?;
            }
            if changed {
                bump_etag(w, &user, v)?;
            }
            count_and_etag(w.conn, &user, v)
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
            let v = parse_version(version.as_deref().ok_or_else(|| Error::missing_param("the version query parameter is required"))?)?;
            version_info(c, &user, v)?;
            let mut stmt = c.prepare_cached(
                "SELECT room_id, session_id, first_message_index, forwarded_count, is_verified, session_data FROM room_key_backup
                 WHERE user_id = ?1 AND version = ?2 AND (?3 IS NULL OR room_id = ?3) AND (?4 IS NULL OR session_id = ?4)",
            )?;
            let rows = stmt.query_map(params![user, v, room, session], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?, r.get::<_, i64>(3)?, r.get::<_, bool>(4)?, r.get::<_, String>(5)?))
            })?;
            let mut rooms: Map<String, Value> = Map::new();
            for row in rows {
                let (r, sid, fmi, fc, verified, data) = row?;
                let key = json!({"first_message_index": fmi, "forwarded_count": fc, "is_verified": verified,
                                 "session_data": serde_json::from_str::<Value>(&data)?});
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
            let v = parse_version(version.as_deref().ok_or_else(|| Error::missing_param("the version query parameter is required"))?)?;
            version_info(w.conn, &user, v)?;
            let n = w.conn.execute(
                "DELETE FROM room_key_backup WHERE user_id = ?1 AND version = ?2 AND (?3 IS NULL OR room_id = ?3) AND (?4 IS NULL OR session_id = ?4)",
                params![user, v, room, session],
            )?;
            if n > 0 {
                bump_etag(w, &user, v)?;
            }
            count_and_etag(w.conn, &user, v)
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
