//! Rooms and the remote media cache: `hearth room ...`, `hearth media purge`.

use std::time::Duration;

use super::Admin;
use crate::store::accounts::now_ms;
use crate::store::{purge, rooms};

fn err(e: crate::error::Error) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

/// A room as `hearth room list` prints it.
pub struct RoomLine {
    pub room_id: String,
    pub name: Option<String>,
    pub members: i64,
    pub local_members: i64,
    pub partial: bool,
    pub blocked: bool,
    /// We hold the room's state (false: known only through an invite, or purged).
    pub held: bool,
}

/// What a purge removed.
pub struct Purged {
    pub room_id: String,
    pub events: usize,
    pub state_groups: usize,
}

/// Rows per purge transaction: a running server's writer waits behind one batch at most.
const PURGE_BATCH: i64 = 2000;

impl Admin {
    pub fn list_rooms(&self) -> anyhow::Result<Vec<RoomLine>> {
        let db = self.db.db();
        let mut out = Vec::new();
        for r in rooms::list_rooms(db, &self.server_name).map_err(err)? {
            let name = match r.room.current_sg {
                Some(sg) => crate::room::state_content(db, sg, "m.room.name", "")
                    .map_err(err)?
                    .and_then(|c| c.get("name").and_then(|n| n.as_str()).map(str::to_owned))
                    .filter(|n| !n.is_empty()),
                None => None,
            };
            out.push(RoomLine {
                room_id: r.room.room_id,
                name,
                members: r.joined,
                local_members: r.local_joined,
                partial: r.room.partial_state,
                blocked: r.blocked,
                held: r.room.current_sg.is_some(),
            });
        }
        for room_id in rooms::blocked_unknown_rooms(db).map_err(err)? {
            out.push(RoomLine {
                room_id,
                name: None,
                members: 0,
                local_members: 0,
                partial: false,
                blocked: true,
                held: false,
            });
        }
        Ok(out)
    }

    /// A room id from `!id:server` or a local alias `#alias:server`.
    fn room_id(&self, room: &str) -> anyhow::Result<String> {
        if room.starts_with('#') {
            return rooms::alias_target(self.db.db(), room)
                .map_err(err)?
                .ok_or_else(|| anyhow::anyhow!("no local alias {room}"));
        }
        ruma::RoomId::parse(room).map_err(|e| anyhow::anyhow!("`{room}` is not a room id (!id:server): {e}"))?;
        Ok(room.to_owned())
    }

    /// Removes the events, state and per-room rows of a room no local user is in any more (refused otherwise, and
    /// while events of it still wait to go to other servers).
    pub fn purge_room(&mut self, room: &str) -> anyhow::Result<Purged> {
        let room_id = self.room_id(room)?;
        let row = rooms::room_by_id(self.db.db(), &room_id)
            .map_err(err)?
            .ok_or_else(|| anyhow::anyhow!("this server does not know the room {room_id}"))?;
        let local = purge::local_members(self.db.db(), row.room_nid, &self.server_name).map_err(err)?;
        if !local.is_empty() {
            let names: Vec<String> = local.iter().take(5).map(|(u, m)| format!("{u} ({m})")).collect();
            anyhow::bail!(
                "refusing to purge {room_id}: {} local user(s) are still in it: {}{}. They must leave first \
                 (or be deactivated: `hearth user deactivate NAME`)",
                local.len(),
                names.join(", "),
                if local.len() > 5 { ", ..." } else { "" }
            );
        }
        let queued = purge::queued_pdus(self.db.db(), row.room_nid).map_err(err)?;
        anyhow::ensure!(
            queued == 0,
            "refusing to purge {room_id} yet: {queued} of its events still wait to be sent to other servers (the last \
             local user's leave among them); try again in a minute"
        );
        let (nid, rid) = (row.room_nid, room_id.clone());
        self.db.transaction(|db| purge::forget_room_state(db, nid, &rid)).map_err(err)?;
        let mut state_groups = 0;
        loop {
            let n = self.db.transaction(|db| purge::delete_state_groups(db, nid, PURGE_BATCH)).map_err(err)?;
            if n == 0 {
                break;
            }
            state_groups += n;
        }
        let mut events = 0;
        loop {
            let n = self.db.transaction(|db| purge::delete_events(db, nid, PURGE_BATCH)).map_err(err)?;
            if n == 0 {
                break;
            }
            events += n;
        }
        Ok(Purged { room_id, events, state_groups })
    }

    /// Blocks or unblocks a room; returns its id and whether that changed anything.
    pub fn block_room(&mut self, room: &str, blocked: bool) -> anyhow::Result<(String, bool)> {
        let room_id = self.room_id(room)?;
        let rid = room_id.clone();
        let changed = self.db.transaction(|db| rooms::set_blocked(db, &rid, blocked, now_ms())).map_err(err)?;
        Ok((room_id, changed))
    }

    /// Deletes cached remote media (never local uploads) cached more than `older_than` ago, files and thumbnails
    /// with it; returns (files, bytes). They are fetched again if someone asks for them.
    pub fn purge_remote_media(&mut self, older_than: Duration) -> anyhow::Result<(usize, i64)> {
        let cutoff = now_ms() - older_than.as_millis() as i64;
        let media = crate::media_repo::MediaRepo::new(self.config.media.dir(&self.path), &self.config.media)?;
        let (mut files, mut bytes) = (0, 0);
        loop {
            let batch = crate::store::media::remote_cached_before(self.db.db(), cutoff, 500).map_err(err)?;
            if batch.is_empty() {
                break;
            }
            let gone = self
                .db
                .transaction(|db| {
                    let mut gone = Vec::new();
                    for (origin, id, size) in &batch {
                        if crate::store::media::forget_remote(db, origin, id)? {
                            gone.push((origin.clone(), id.clone(), *size));
                        }
                    }
                    Ok(gone)
                })
                .map_err(err)?;
            for (origin, id, size) in gone {
                media.remove(&origin, &id);
                files += 1;
                bytes += size;
            }
        }
        Ok((files, bytes))
    }
}
