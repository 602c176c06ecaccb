//! Typing notifications (in memory, like every server keeps them) with a serial that is part of the sync token.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ruma::{RoomId, UserId};
use tokio::sync::watch;

pub struct Typing {
    inner: Mutex<TypingState>,
    serial_tx: watch::Sender<u64>,
}

#[derive(Default)]
struct TypingState {
    serial: u64,
    /// room -> (user -> expiry)
    rooms: HashMap<String, HashMap<String, Instant>>,
    /// room -> serial of its last change
    changed: HashMap<String, u64>,
}

impl Default for Typing {
    fn default() -> Self {
        Typing { inner: Mutex::new(TypingState::default()), serial_tx: watch::channel(0).0 }
    }
}

impl Typing {
    fn lock(&self) -> std::sync::MutexGuard<'_, TypingState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Expires stale entries, bumping the serial for rooms that changed.
    fn expire(st: &mut TypingState) -> bool {
        let now = Instant::now();
        let mut any = false;
        let mut changed_rooms = Vec::new();
        for (room, users) in st.rooms.iter_mut() {
            let before = users.len();
            users.retain(|_, exp| *exp > now);
            if users.len() != before {
                changed_rooms.push(room.clone());
            }
        }
        for r in changed_rooms {
            st.serial += 1;
            let s = st.serial;
            st.changed.insert(r, s);
            any = true;
        }
        any
    }

    pub fn set(&self, room_id: &RoomId, user_id: &UserId, typing: bool, timeout: Duration) {
        let (room_id, user_id) = (room_id.as_str(), user_id.as_str());
        let serial = {
            let mut st = self.lock();
            Self::expire(&mut st);
            let users = st.rooms.entry(room_id.to_owned()).or_default();
            let was = users.contains_key(user_id);
            if typing {
                users.insert(user_id.to_owned(), Instant::now() + timeout.min(Duration::from_secs(120)));
            } else {
                users.remove(user_id);
            }
            if was == typing && typing {
                // Refreshing an existing typing state is not a change clients need to hear about.
                return;
            }
            st.serial += 1;
            let s = st.serial;
            st.changed.insert(room_id.to_owned(), s);
            s
        };
        self.serial_tx.send_replace(serial);
    }

    pub fn serial(&self) -> u64 {
        let mut st = self.lock();
        if Self::expire(&mut st) {
            let s = st.serial;
            drop(st);
            self.serial_tx.send_replace(s);
            return s;
        }
        st.serial
    }

    /// Users typing in a room, if it changed after `since` (None = always).
    pub fn changed_since(&self, room_id: &RoomId, since: Option<u64>) -> Option<Vec<String>> {
        let room_id = room_id.as_str();
        let st = self.lock();
        let changed = st.changed.get(room_id).copied().unwrap_or(0);
        if since.is_some_and(|s| changed <= s) {
            return None;
        }
        let now = Instant::now();
        let users: Vec<String> = st
            .rooms
            .get(room_id)
            .map(|u| u.iter().filter(|(_, e)| **e > now).map(|(u, _)| u.clone()).collect())
            .unwrap_or_default();
        if since.is_none() && users.is_empty() {
            return None;
        }
        Some(users)
    }

    pub fn watch(&self) -> watch::Receiver<u64> {
        self.serial_tx.subscribe()
    }

    /// The rooms whose typing changed after serial `since`, each with who types now (sorted), and the serial this
    /// answer is up to (for an application service's sender, which follows every room).
    pub fn changes_since(&self, since: u64) -> (u64, Vec<(String, Vec<String>)>) {
        let serial = self.serial();
        let st = self.lock();
        let now = Instant::now();
        let mut out: Vec<(String, Vec<String>)> = st
            .changed
            .iter()
            .filter(|(_, s)| **s > since && **s <= serial)
            .map(|(room, _)| {
                let mut users: Vec<String> = st
                    .rooms
                    .get(room)
                    .map(|u| u.iter().filter(|(_, e)| **e > now).map(|(u, _)| u.clone()).collect())
                    .unwrap_or_default();
                users.sort();
                (room.clone(), users)
            })
            .collect();
        out.sort();
        (serial, out)
    }
}

impl Typing {
    /// A snapshot for one sync computation.
    pub fn clone_view(&self) -> TypingView {
        let st = self.lock();
        let now = Instant::now();
        TypingView {
            rooms: st
                .rooms
                .iter()
                .map(|(r, u)| (r.clone(), u.iter().filter(|(_, e)| **e > now).map(|(u, _)| u.clone()).collect()))
                .collect(),
            changed: st.changed.clone(),
        }
    }
}

/// Typing state captured for one sync computation (the typing map lives on async threads).
pub struct TypingView {
    pub rooms: HashMap<String, Vec<String>>,
    pub changed: HashMap<String, u64>,
}
