//! Users and registration tokens: `hearth user ...`, `hearth token ...`.

use std::time::Duration;

use serde_json::json;

use super::Admin;
use crate::store::accounts::{self, now_ms, UserListing};
use crate::store::registration_tokens::{self, TokenRow};

fn err(e: crate::error::Error) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

impl Admin {
    /// Creates a local user; returns its id.
    pub fn create_user(&mut self, name: &str, password: &str, admin: bool) -> anyhow::Result<String> {
        let user_id = self.user_id(name)?;
        anyhow::ensure!(!password.is_empty(), "the password is empty");
        let hash = crate::client::account::hash_password(password).map_err(err)?;
        let uid = user_id.clone();
        let created = self.db.transaction(|db| accounts::insert_user(db, &uid, Some(&hash), admin)).map_err(err)?;
        anyhow::ensure!(created, "user {user_id} already exists");
        Ok(user_id)
    }

    pub fn list_users(&self) -> anyhow::Result<Vec<UserListing>> {
        accounts::list_users(self.db.db()).map_err(err)
    }

    /// Sets a new password and logs out every session of the user; returns its id.
    pub fn reset_password(&mut self, name: &str, password: &str) -> anyhow::Result<String> {
        let user_id = self.user_id(name)?;
        anyhow::ensure!(!password.is_empty(), "the password is empty");
        let hash = crate::client::account::hash_password(password).map_err(err)?;
        let uid = user_id.clone();
        let found = self
            .db
            .transaction(|db| {
                let found = accounts::get_user(db, &uid)?.is_some_and(|u| !u.deactivated);
                if found {
                    accounts::set_password(db, &uid, &hash)?;
                    accounts::delete_all_tokens(db, &uid)?;
                }
                Ok(found)
            })
            .map_err(err)?;
        anyhow::ensure!(found, "no active user {user_id}");
        Ok(user_id)
    }

    pub fn set_admin(&mut self, name: &str, admin: bool) -> anyhow::Result<String> {
        let user_id = self.user_id(name)?;
        let uid = user_id.clone();
        let found = self.db.transaction(|db| accounts::set_admin(db, &uid, admin)).map_err(err)?;
        anyhow::ensure!(found, "no user {user_id}");
        Ok(user_id)
    }

    /// Deactivates a user as `POST /account/deactivate` does. At once: the account can no longer log in and its
    /// access tokens stop working. The rest (devices, account data, leaving its rooms, telling other servers) is
    /// [`super::job`], run by the server's worker: with a server running this waits up to `wait` for it and
    /// returns whether it finished; without one it returns false (the server does it when it next starts).
    pub fn deactivate(&mut self, name: &str, erase: bool, wait: Duration) -> anyhow::Result<(String, bool)> {
        let user_id = self.user_id(name)?;
        let cursor = json!({"user_id": user_id, "erase": erase}).to_string();
        let uid = user_id.clone();
        let c = cursor.clone();
        let found = self
            .db
            .transaction(|db| {
                if !accounts::mark_deactivated(db, &uid)? {
                    return Ok(false);
                }
                crate::store::jobs::enqueue(db, super::job::DEACTIVATE, None, 50, &c)?;
                Ok(true)
            })
            .map_err(err)?;
        anyhow::ensure!(found, "no user {user_id}");
        if self.running_server().is_none() {
            return Ok((user_id, false));
        }
        let deadline = std::time::Instant::now() + wait;
        while std::time::Instant::now() < deadline {
            if !crate::store::jobs::is_queued(self.db.db(), super::job::DEACTIVATE, &cursor).map_err(err)? {
                return Ok((user_id, true));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok((user_id, false))
    }

    /// Makes a registration token (random unless given); returns it.
    pub fn create_token(
        &mut self,
        token: Option<String>,
        uses: Option<i64>,
        expires_in: Option<Duration>,
    ) -> anyhow::Result<TokenRow> {
        let token = token.unwrap_or_else(|| crate::util::random_string(16));
        anyhow::ensure!(
            !token.is_empty()
                && token.len() <= 64
                && token.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-')),
            "a registration token is 1-64 characters of A-Z, a-z, 0-9 and ._~-"
        );
        if let Some(n) = uses {
            anyhow::ensure!(n >= 1, "--uses must be at least 1");
        }
        let now = now_ms();
        let expiry = expires_in.map(|d| now.saturating_add(d.as_millis() as i64));
        let t = token.clone();
        let created = self.db.transaction(|db| registration_tokens::create(db, &t, uses, expiry, now)).map_err(err)?;
        anyhow::ensure!(created, "the token {token} exists already");
        Ok(TokenRow { token, uses_allowed: uses, completed: 0, expiry_ts: expiry, created_ts: now })
    }

    pub fn list_tokens(&self) -> anyhow::Result<Vec<TokenRow>> {
        registration_tokens::list(self.db.db()).map_err(err)
    }

    pub fn revoke_token(&mut self, token: &str) -> anyhow::Result<()> {
        let found = self.db.transaction(|db| registration_tokens::revoke(db, token)).map_err(err)?;
        anyhow::ensure!(found, "no registration token {token}");
        Ok(())
    }

    /// Whether registration asks for a token made by `hearth token create` (else a new token is of no use yet).
    pub fn registration_takes_tokens(&self) -> bool {
        let r = &self.config.registration;
        r.enabled && (r.requires_token || r.token.is_some())
    }
}
