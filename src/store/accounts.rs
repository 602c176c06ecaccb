//! Users, devices, access tokens and filters.

use rusqlite::{params, OptionalExtension};

use crate::error::Result;
use crate::store::Db;

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

pub fn token_hash(token: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref().to_vec()
}

pub struct UserRow {
    pub user_id: String,
    pub password_hash: Option<String>,
    pub admin: bool,
    pub displayname: Option<String>,
    pub avatar_url: Option<String>,
    pub deactivated: bool,
}

pub fn user_exists(conn: Db<'_>, user_id: &str) -> Result<bool> {
    Ok(conn.prepare_cached("SELECT 1 FROM users WHERE user_id = ?1")?.exists([user_id])?)
}

pub fn get_user(conn: Db<'_>, user_id: &str) -> Result<Option<UserRow>> {
    Ok(conn
        .prepare_cached(
            "SELECT user_id, password_hash, admin, displayname, avatar_url, deactivated FROM users WHERE user_id = ?1",
        )?
        .query_row([user_id], |r| {
            Ok(UserRow {
                user_id: r.get(0)?,
                password_hash: r.get(1)?,
                admin: r.get(2)?,
                displayname: r.get(3)?,
                avatar_url: r.get(4)?,
                deactivated: r.get(5)?,
            })
        })
        .optional()?)
}

pub fn insert_user(conn: Db<'_>, user_id: &str, password_hash: Option<&str>, admin: bool) -> Result<bool> {
    let n = conn.execute(
        "INSERT OR IGNORE INTO users (user_id, password_hash, admin, created_ts, displayname) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![user_id, password_hash, admin, now_ms(), localpart(user_id)],
    )?;
    Ok(n == 1)
}

/// A user as `hearth user list` shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct UserListing {
    pub user_id: String,
    pub admin: bool,
    pub deactivated: bool,
    pub created_ts: i64,
    pub devices: i64,
}

/// Every local account, in id order.
pub fn list_users(conn: Db<'_>) -> Result<Vec<UserListing>> {
    let mut stmt = conn.prepare(
        "SELECT u.user_id, u.admin, u.deactivated, u.created_ts,
                (SELECT count(*) FROM devices d WHERE d.user_id = u.user_id)
         FROM users u ORDER BY u.user_id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(UserListing {
            user_id: r.get(0)?,
            admin: r.get(1)?,
            deactivated: r.get(2)?,
            created_ts: r.get(3)?,
            devices: r.get(4)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Makes a user an admin or not; false when there is no such user.
pub fn set_admin(conn: Db<'_>, user_id: &str, admin: bool) -> Result<bool> {
    Ok(conn.execute("UPDATE users SET admin = ?2 WHERE user_id = ?1", params![user_id, admin])? == 1)
}

/// Marks an account deactivated at once (its tokens stop working, it cannot log in); the rest of the
/// deactivation ([`deactivate`] and leaving its rooms) follows. False when there is no such user.
pub fn mark_deactivated(conn: Db<'_>, user_id: &str) -> Result<bool> {
    Ok(conn.execute("UPDATE users SET deactivated = 1, password_hash = NULL WHERE user_id = ?1", [user_id])? == 1)
}

pub fn localpart(user_id: &str) -> &str {
    user_id.trim_start_matches('@').split(':').next().unwrap_or("")
}

pub fn set_password(conn: Db<'_>, user_id: &str, hash: &str) -> Result<bool> {
    Ok(conn.execute("UPDATE users SET password_hash = ?2 WHERE user_id = ?1", params![user_id, hash])? == 1)
}

pub fn set_profile_field(conn: Db<'_>, user_id: &str, field: ProfileField, value: Option<&str>) -> Result<()> {
    let sql = match field {
        ProfileField::Displayname => "UPDATE users SET displayname = ?2 WHERE user_id = ?1",
        ProfileField::AvatarUrl => "UPDATE users SET avatar_url = ?2 WHERE user_id = ?1",
    };
    conn.execute(sql, params![user_id, value])?;
    Ok(())
}

#[derive(Clone, Copy, Debug)]
pub enum ProfileField {
    Displayname,
    AvatarUrl,
}

/// Creates (or re-uses) a device and issues a new access token for it.
pub fn create_session(
    conn: Db<'_>,
    user_id: &str,
    device_id: &str,
    display_name: Option<&str>,
    token: &str,
) -> Result<()> {
    conn.execute(
        "INSERT INTO devices (user_id, device_id, display_name, last_seen_ts) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (user_id, device_id) DO UPDATE SET display_name = coalesce(?3, display_name)",
        params![user_id, device_id, display_name, now_ms()],
    )?;
    conn.execute(
        "INSERT INTO access_tokens (token_sha256, user_id, device_id, created_ts) VALUES (?1, ?2, ?3, ?4)",
        params![token_hash(token), user_id, device_id, now_ms()],
    )?;
    Ok(())
}

/// (user_id, device_id, admin) for a token.
pub fn lookup_token(conn: Db<'_>, token: &str) -> Result<Option<(String, String, bool)>> {
    Ok(conn
        .prepare_cached(
            "SELECT t.user_id, t.device_id, u.admin FROM access_tokens t JOIN users u ON u.user_id = t.user_id
             WHERE t.token_sha256 = ?1 AND u.deactivated = 0",
        )?
        .query_row([token_hash(token)], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?)
}

/// Issues a refresh token for an access token (it is deleted with that access token).
pub fn add_refresh_token(conn: Db<'_>, access_token: &str, refresh_token: &str) -> Result<()> {
    conn.prepare_cached("INSERT INTO refresh_tokens (token_sha256, access_sha256, created_ts) VALUES (?1, ?2, ?3)")?
        .execute(params![token_hash(refresh_token), token_hash(access_token), now_ms()])?;
    Ok(())
}

/// Spends a refresh token: its access token is replaced by `new_access` (same user and device) and it by
/// `new_refresh`. Returns the (user_id, device_id), or None for an unknown (or already spent) refresh token.
pub fn use_refresh_token(
    conn: Db<'_>,
    refresh_token: &str,
    new_access: &str,
    new_refresh: &str,
) -> Result<Option<(String, String)>> {
    let found: Option<(Vec<u8>, String, String)> = conn
        .prepare_cached(
            "SELECT t.token_sha256, t.user_id, t.device_id FROM refresh_tokens r
             JOIN access_tokens t ON t.token_sha256 = r.access_sha256 JOIN users u ON u.user_id = t.user_id
             WHERE r.token_sha256 = ?1 AND u.deactivated = 0",
        )?
        .query_row([token_hash(refresh_token)], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let Some((old_access, user_id, device_id)) = found else { return Ok(None) };
    // The old access token goes, and its refresh token with it (cascade).
    conn.prepare_cached("DELETE FROM access_tokens WHERE token_sha256 = ?1")?.execute([old_access])?;
    conn.prepare_cached(
        "INSERT INTO access_tokens (token_sha256, user_id, device_id, created_ts) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![token_hash(new_access), user_id, device_id, now_ms()])?;
    add_refresh_token(conn, new_access, new_refresh)?;
    Ok(Some((user_id, device_id)))
}

pub fn delete_token(conn: Db<'_>, token: &str) -> Result<()> {
    conn.execute("DELETE FROM access_tokens WHERE token_sha256 = ?1", [token_hash(token)])?;
    Ok(())
}

pub fn delete_all_tokens(conn: Db<'_>, user_id: &str) -> Result<()> {
    conn.execute("DELETE FROM access_tokens WHERE user_id = ?1", [user_id])?;
    Ok(())
}

pub struct DeviceRow {
    pub device_id: String,
    pub display_name: Option<String>,
    pub last_seen_ts: Option<i64>,
    pub last_seen_ip: Option<String>,
}

pub fn list_devices(conn: Db<'_>, user_id: &str) -> Result<Vec<DeviceRow>> {
    let mut stmt = conn.prepare_cached(
        "SELECT device_id, display_name, last_seen_ts, last_seen_ip FROM devices WHERE user_id = ?1 ORDER BY device_id",
    )?;
    let rows = stmt.query_map([user_id], |r| {
        Ok(DeviceRow {
            device_id: r.get(0)?,
            display_name: r.get(1)?,
            last_seen_ts: r.get(2)?,
            last_seen_ip: r.get(3)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

pub fn update_device(conn: Db<'_>, user_id: &str, device_id: &str, display_name: Option<&str>) -> Result<bool> {
    Ok(conn.execute(
        "UPDATE devices SET display_name = ?3 WHERE user_id = ?1 AND device_id = ?2",
        params![user_id, device_id, display_name],
    )? == 1)
}

/// Deletes a device with its tokens, keys and pushers.
pub fn delete_device(conn: Db<'_>, user_id: &str, device_id: &str) -> Result<bool> {
    conn.execute("DELETE FROM access_tokens WHERE user_id = ?1 AND device_id = ?2", params![user_id, device_id])?;
    conn.execute("DELETE FROM device_keys WHERE user_id = ?1 AND device_id = ?2", params![user_id, device_id])?;
    conn.execute("DELETE FROM one_time_keys WHERE user_id = ?1 AND device_id = ?2", params![user_id, device_id])?;
    conn.execute("DELETE FROM to_device WHERE user_id = ?1 AND device_id = ?2", params![user_id, device_id])?;
    crate::store::pushers::delete_for_device(conn, user_id, device_id)?;
    Ok(conn.execute("DELETE FROM devices WHERE user_id = ?1 AND device_id = ?2", params![user_id, device_id])? == 1)
}

/// Deactivates a local account (it stays, so its id cannot be registered again): no password, every device with
/// its tokens and keys gone, and with `erase` its profile too. Returns the devices deleted.
pub fn deactivate(conn: Db<'_>, user_id: &str, erase: bool) -> Result<usize> {
    let devices = list_devices(conn, user_id)?;
    for d in &devices {
        delete_device(conn, user_id, &d.device_id)?;
    }
    delete_all_tokens(conn, user_id)?;
    crate::store::pushers::delete_all(conn, user_id)?;
    conn.execute("UPDATE users SET deactivated = 1, password_hash = NULL WHERE user_id = ?1", [user_id])?;
    if erase {
        conn.execute("UPDATE users SET displayname = NULL, avatar_url = NULL WHERE user_id = ?1", [user_id])?;
    }
    Ok(devices.len())
}

pub fn touch_device(conn: Db<'_>, user_id: &str, device_id: &str, ip: &str) -> Result<()> {
    conn.execute(
        "UPDATE devices SET last_seen_ts = ?3, last_seen_ip = ?4 WHERE user_id = ?1 AND device_id = ?2",
        params![user_id, device_id, now_ms(), ip],
    )?;
    Ok(())
}

pub fn create_filter(conn: Db<'_>, user_id: &str, json: &str) -> Result<i64> {
    let id: i64 =
        conn.query_row("SELECT coalesce(max(filter_id), -1) + 1 FROM filters WHERE user_id = ?1", [user_id], |r| {
            r.get(0)
        })?;
    conn.execute("INSERT INTO filters (user_id, filter_id, json) VALUES (?1, ?2, ?3)", params![user_id, id, json])?;
    Ok(id)
}

pub fn get_filter(conn: Db<'_>, user_id: &str, filter_id: i64) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached("SELECT json FROM filters WHERE user_id = ?1 AND filter_id = ?2")?
        .query_row(params![user_id, filter_id], |r| r.get(0))
        .optional()?)
}

/// Logs out every session of `user_id` except the one holding `keep_token` (a password change).
pub fn delete_other_tokens(conn: Db<'_>, user_id: &str, keep_token: &str) -> Result<()> {
    conn.prepare_cached("DELETE FROM access_tokens WHERE user_id = ?1 AND token_sha256 != ?2")?
        .execute(params![user_id, token_hash(keep_token)])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::memory_db;

    fn user_with_sessions(conn: Db<'_>, user_id: &str, sessions: &[(&str, &str)]) {
        assert!(insert_user(conn, user_id, Some("hash"), false).unwrap());
        for (device, token) in sessions {
            create_session(conn, user_id, device, None, token).unwrap();
        }
    }

    #[test]
    fn delete_other_tokens_keeps_only_the_given_session() {
        let conn = memory_db();
        user_with_sessions(conn.db(), "@a:x", &[("D1", "t1"), ("D2", "t2"), ("D2", "t2b")]);
        user_with_sessions(conn.db(), "@b:x", &[("D1", "tb")]);
        delete_other_tokens(conn.db(), "@a:x", "t2").unwrap();
        assert!(lookup_token(conn.db(), "t2").unwrap().is_some());
        assert!(lookup_token(conn.db(), "t1").unwrap().is_none());
        assert!(lookup_token(conn.db(), "t2b").unwrap().is_none(), "other tokens of the same device go too");
        assert!(lookup_token(conn.db(), "tb").unwrap().is_some(), "other users keep theirs");
        assert_eq!(list_devices(conn.db(), "@a:x").unwrap().len(), 2, "devices stay");
    }

    #[test]
    fn a_refresh_token_renews_its_access_token_once_and_goes_with_it() {
        let conn = memory_db();
        user_with_sessions(conn.db(), "@a:x", &[("D1", "t1"), ("D2", "t2")]);
        add_refresh_token(conn.db(), "t1", "r1").unwrap();
        let got = use_refresh_token(conn.db(), "r1", "t1b", "r1b").unwrap();
        assert_eq!(got, Some(("@a:x".to_owned(), "D1".to_owned())));
        assert!(lookup_token(conn.db(), "t1").unwrap().is_none(), "the old access token is replaced");
        assert_eq!(lookup_token(conn.db(), "t1b").unwrap().map(|t| t.1), Some("D1".to_owned()));
        assert_eq!(use_refresh_token(conn.db(), "r1", "x", "y").unwrap(), None, "spent");
        // Logging out everywhere takes the refresh tokens too.
        delete_all_tokens(conn.db(), "@a:x").unwrap();
        assert_eq!(use_refresh_token(conn.db(), "r1b", "x", "y").unwrap(), None);
    }

    #[test]
    fn deactivation_ends_sessions_and_keeps_the_id_taken() {
        let conn = memory_db();
        user_with_sessions(conn.db(), "@a:x", &[("D1", "t1"), ("D2", "t2")]);
        user_with_sessions(conn.db(), "@b:x", &[("DB", "tb")]);
        assert_eq!(deactivate(conn.db(), "@a:x", true).unwrap(), 2);
        let u = get_user(conn.db(), "@a:x").unwrap().unwrap();
        assert_eq!((u.deactivated, u.password_hash, u.displayname), (true, None, None));
        assert!(lookup_token(conn.db(), "t1").unwrap().is_none() && lookup_token(conn.db(), "t2").unwrap().is_none());
        assert!(list_devices(conn.db(), "@a:x").unwrap().is_empty());
        assert!(user_exists(conn.db(), "@a:x").unwrap(), "the id stays taken");
        assert!(lookup_token(conn.db(), "tb").unwrap().is_some(), "other users keep theirs");
        // Without erase the profile stays.
        deactivate(conn.db(), "@b:x", false).unwrap();
        assert_eq!(get_user(conn.db(), "@b:x").unwrap().unwrap().displayname.as_deref(), Some("b"));
    }

    #[test]
    fn sessions_users_and_filters_read_back() {
        let conn = memory_db();
        assert!(get_user(conn.db(), "@a:x").unwrap().is_none());
        user_with_sessions(conn.db(), "@a:x", &[("D1", "t1")]);
        assert!(!insert_user(conn.db(), "@a:x", None, true).unwrap(), "an existing user is kept");
        let u = get_user(conn.db(), "@a:x").unwrap().unwrap();
        assert_eq!((u.displayname.as_deref(), u.admin, u.deactivated), (Some("a"), false, false));
        assert_eq!(lookup_token(conn.db(), "t1").unwrap(), Some(("@a:x".into(), "D1".into(), false)));
        assert_eq!(create_filter(conn.db(), "@a:x", "{}").unwrap(), 0);
        assert_eq!(create_filter(conn.db(), "@a:x", "{\"a\":1}").unwrap(), 1, "filter ids count up per user");
        assert_eq!(create_filter(conn.db(), "@b:x", "{}").unwrap(), 0);
        assert_eq!(get_filter(conn.db(), "@a:x", 1).unwrap().as_deref(), Some("{\"a\":1}"));
        assert_eq!(get_filter(conn.db(), "@a:x", 7).unwrap(), None);
    }

    #[test]
    fn users_are_listed_made_admin_and_marked_deactivated() {
        let conn = memory_db();
        user_with_sessions(conn.db(), "@b:x", &[("D1", "t1"), ("D2", "t2")]);
        insert_user(conn.db(), "@a:x", None, true).unwrap();
        let got: Vec<_> = list_users(conn.db()).unwrap().into_iter().map(|u| (u.user_id, u.admin, u.devices)).collect();
        assert_eq!(got, [("@a:x".to_owned(), true, 0), ("@b:x".to_owned(), false, 2)]);
        assert!(set_admin(conn.db(), "@b:x", true).unwrap());
        assert!(get_user(conn.db(), "@b:x").unwrap().unwrap().admin);
        assert!(!set_admin(conn.db(), "@nobody:x", true).unwrap());
        assert!(mark_deactivated(conn.db(), "@b:x").unwrap());
        assert!(lookup_token(conn.db(), "t1").unwrap().is_none(), "a deactivated user's tokens stop working");
        assert_eq!(list_devices(conn.db(), "@b:x").unwrap().len(), 2, "devices go with the rest of the deactivation");
        assert!(!mark_deactivated(conn.db(), "@nobody:x").unwrap());
    }
}
