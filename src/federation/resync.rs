//! The network side of a partial-state room's resync (MSC3902): which server to ask, `/state_ids` at our join,
//! the missing events through `/state` or single `/event` requests (the [`Pipeline`]), each phase's domain work
//! handed to `crate::room::partial`. Run by the job queue one step at a time, with the batch size it chooses;
//! the position is a typed [`ResyncCursor`].
//!
//! ```text
//!  [Ids] ─► [Fetch] ─► [Auth] ─► [Fill] ─► [Finish]
//!    ▲         │
//!    └─────────┘ listed events nobody can supply: distrust that /state_ids, ask another server
//! ```

use std::sync::{Arc, Mutex};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::federation::batches::{Pipeline, Remote, Stored};
use crate::federation::client::enc;
use crate::federation::FedContext;
use crate::jobs::{JobKind, JobRow, Step, StepFuture};
use crate::room::partial::{self, Phase, ResyncCursor};
use crate::store::ids::{EventNid, JobId, RoomNid};
use crate::store::resync as rs;
use crate::store::rooms::{self, RoomRow};

/// Many events missing (more than this, and a tenth of the state): one `/state` request beats thousands of
/// `/event` requests.
const USE_STATE_ABOVE: i64 = 50;

/// Listed state ids recorded per write transaction.
const STATE_IDS_PER_WRITE: usize = 5000;

/// The resync as a job kind of the queue, run with the handles of a running server.
pub fn job_kind(s: Arc<FedContext>) -> Arc<dyn JobKind> {
    Arc::new(ResyncJobs { s, walks: Arc::default() })
}

struct ResyncJobs {
    s: Arc<FedContext>,
    walks: Arc<AllWalks>,
}

/// Walks kept across their jobs' steps, by job: the events each job still has to go through in a phase, in order,
/// and the cursor position they follow. Lost on a restart, and read again from the cursor. The fill walks its events
/// in state key order ([`rs::fill_order`]), the auth phase in event number order ([`rs::auth_order`]).
struct Walks<K>(Mutex<std::collections::HashMap<JobId, Walk<K>>>);

impl<K> Default for Walks<K> {
    fn default() -> Self {
        Walks(Mutex::default())
    }
}

struct Walk<K> {
    at: Option<K>,
    nids: std::collections::VecDeque<EventNid>,
}

/// Walks kept at once (resyncs in the same phase at the same time, their steps taking turns); one more drops
/// another, which is read again at its next step.
const WALKS_KEPT: usize = 4;

impl<K: PartialEq> Walks<K> {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<JobId, Walk<K>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next `n` events of `job`'s walk, if it is held and follows cursor position `at`.
    fn next(&self, job: JobId, at: &Option<K>, n: usize) -> Option<Vec<EventNid>> {
        self.lock().get(&job).filter(|w| &w.at == at).map(|w| w.nids.iter().take(n).copied().collect())
    }

    fn hold(&self, job: JobId, at: Option<K>, nids: Vec<EventNid>) {
        let mut walks = self.lock();
        if walks.len() >= WALKS_KEPT && !walks.contains_key(&job) {
            if let Some(other) = walks.keys().next().copied() {
                walks.remove(&other);
            }
        }
        walks.insert(job, Walk { at, nids: nids.into() });
    }

    /// `taken` events of `job`'s walk are done (committed), the cursor now at `at`; none taken: the walk is done.
    fn advance(&self, job: JobId, taken: usize, at: Option<K>) {
        let mut walks = self.lock();
        match walks.get_mut(&job) {
            Some(w) if taken > 0 => {
                w.nids.drain(..taken.min(w.nids.len()));
                w.at = at;
            }
            _ => {
                walks.remove(&job);
            }
        }
    }
}

/// The walks of the resyncs in progress.
#[derive(Default)]
struct AllWalks {
    fills: Walks<rs::FillKey>,
    auths: Walks<EventNid>,
}

/// A downloaded answer's file, removed when dropped (taken, abandoned or failed alike).
struct Downloaded {
    path: std::path::PathBuf,
    bytes: u64,
}

impl Drop for Downloaded {
    fn drop(&mut self) {
        let path = std::mem::take(&mut self.path);
        // Removing a 100 MB file can take a while on some file systems: off the async threads when on one.
        match tokio::runtime::Handle::try_current() {
            Ok(h) => drop(h.spawn_blocking(move || std::fs::remove_file(path))),
            Err(_) => drop(std::fs::remove_file(path)),
        }
    }
}

/// Downloads the `/state` answer of `room_id` at `at` from `server` to a new temporary file.
async fn download_state(
    client: Arc<crate::federation::FedClient>,
    server: String,
    room_id: String,
    at: String,
) -> std::result::Result<Downloaded, String> {
    let path = format!("/_matrix/federation/v1/state/{}?event_id={}", enc(&room_id), enc(&at));
    let file = std::env::temp_dir().join(format!(
        "hearth-state-{}-{}.json",
        std::process::id(),
        crate::util::random_string(8)
    ));
    // Owned from the start, so a failed or abandoned download leaves no file behind.
    let mut out = Downloaded { path: file, bytes: 0 };
    out.bytes = client.get_to_file(&server, &path, &out.path).await.map_err(|e| e.to_string())?;
    Ok(out)
}

impl JobKind for ResyncJobs {
    fn unit(&self, job: &JobRow) -> &'static str {
        ResyncCursor::parse(&job.cursor).map_or("ids", |c| c.phase.name())
    }

    /// The auth phase only reads, on low-priority threads, and writes the rare rejections.
    fn gives_way_by_itself(&self, job: &JobRow) -> bool {
        ResyncCursor::parse(&job.cursor).is_ok_and(|c| matches!(c.phase, Phase::Auth { .. }))
    }

    fn step(&self, job: JobRow, batch: usize) -> StepFuture {
        let (s, walks) = (self.s.clone(), self.walks.clone());
        Box::pin(async move { step(Remote::of(&s)?, &job, batch, &walks).await })
    }
}

/// One job step: the work of the cursor's phase, about `batch` items of it; saves the cursor.
async fn step(r: Remote<'_>, job: &JobRow, batch: usize, walks: &AllWalks) -> Result<Step> {
    let room_nid = job.room_nid.ok_or_else(|| Error::internal("resync job without room"))?;
    let room = r
        .store
        .read_background(move |c| rooms::room_by_nid(c, room_nid))
        .await?
        .ok_or_else(|| Error::internal("resync of unknown room"))?;
    if !room.partial_state {
        return Ok(Step::Done);
    }
    let cursor = ResyncCursor::parse(&job.cursor)?;
    let servers = cursor.servers();
    // Rotate through the servers on failures: attempt n asks server n mod len.
    let server = servers
        .get(job.attempts as usize % servers.len().max(1))
        .cloned()
        .ok_or_else(|| Error::internal("no server to resync from"))?;
    let ctx = Ctx { r, job, room_nid, room, server, servers: servers.len(), walks };
    match cursor.phase.clone() {
        Phase::Ids => ctx.ids(cursor).await,
        Phase::Fetch { source, use_state } => ctx.fetch(cursor, source, use_state, batch).await,
        Phase::Auth { at, done } => ctx.auth(cursor, at, done, batch).await,
        Phase::Fill { at, done } => ctx.fill(cursor, at, done, batch).await,
        Phase::Finish => ctx.finish(cursor).await,
    }
}

/// What every phase of one step knows.
struct Ctx<'a> {
    r: Remote<'a>,
    job: &'a JobRow,
    room_nid: RoomNid,
    room: RoomRow,
    /// The server this attempt asks.
    server: String,
    /// How many servers are in the rotation.
    servers: usize,
    walks: &'a AllWalks,
}

impl Ctx<'_> {
    async fn save(&self, cursor: &ResyncCursor, done: i64, total: Option<i64>) -> Result<()> {
        let (id, text): (JobId, String) = (self.job.job_id, cursor.to_json());
        self.r.store.write_background(move |w| crate::store::jobs::save_cursor(w.db(), id, &text, done, total)).await
    }

    /// `/state_ids` at our join's prev event (residents answer for events they know; Synapse gives the state
    /// before it, Complement's fake the state after): the full state's ids plus the prev event itself (the fill
    /// phase keeps it when it is state), recorded with which of them we lack (the fetch phase gets those).
    async fn ids(&self, mut cursor: ResyncCursor) -> Result<Step> {
        let (room_id, server) = (&self.room.room_id, &self.server);
        let join = cursor.join_event.clone();
        let prev = self.r.store.read_background(move |c| partial::join_prev_event(c, &join)).await?;
        let path = format!("/_matrix/federation/v1/state_ids/{}?event_id={}", enc(room_id), enc(&prev));
        let answer = self.r.client.get(server, &path).await?;
        let mut pdu_ids: Vec<String> = answer
            .get("pdu_ids")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
            .unwrap_or_default();
        if pdu_ids.is_empty() {
            return Err(Error::internal(format!("{server} returned no state ids")));
        }
        if !pdu_ids.contains(&prev) {
            pdu_ids.push(prev.clone());
        }
        // In key order: each write then appends to `resync_state`'s tree instead of touching pages all over it (a
        // 100k-id list in the answer's order wrote 236 MB to the log, sorted under 30 MB).
        pdu_ids.sort_unstable();
        pdu_ids.dedup();
        let sg = cursor.sg;
        let (pdu_ids, bad) = self
            .r
            .store
            .read_background(move |c| {
                let bad = partial::check_state_ids(c, sg, &pdu_ids)?;
                Ok((pdu_ids, bad))
            })
            .await?;
        if let Some(bad) = bad {
            return Err(Error::internal(format!(
                "{server}: /state_ids answer lacks state event {bad} we hold; trying another server"
            )));
        }
        let total = pdu_ids.len() as i64;
        let room = self.room_nid;
        // In short writes (a user's write waits behind one, and 100k ids in one took 600 ms); the first clears
        // what an earlier attempt of this phase left (the cursor moves on only after the last).
        let mut missing = 0;
        for (i, chunk) in pdu_ids.chunks(STATE_IDS_PER_WRITE).enumerate() {
            let chunk = chunk.to_vec();
            missing += self
                .r
                .store
                .write_background(move |w| {
                    if i == 0 {
                        rs::clear_state_ids(w.db(), room)?;
                    }
                    rs::record_state_ids(w.db(), room, &chunk)
                })
                .await?;
        }
        tracing::info!(%room_id, %server, state = total, missing, "resync: state ids received");
        let use_state = missing > USE_STATE_ABOVE && missing * 10 >= total;
        cursor.prev = Some(prev);
        cursor.enter(room_id, Phase::Fetch { source: server.clone(), use_state });
        self.save(&cursor, total - missing, Some(total)).await?;
        Ok(Step::More { items: 1 })
    }

    /// The listed events we lack: the whole `/state` answer, or the next `batch` of them one by one.
    async fn fetch(&self, mut cursor: ResyncCursor, source: String, use_state: bool, batch: usize) -> Result<Step> {
        let room = self.room_nid;
        let missing = self.r.store.read_background(move |c| rs::still_missing(c, room)).await?;
        if missing.is_empty() {
            cursor.enter(&self.room.room_id, Phase::Auth { at: None, done: 0 });
            self.save(&cursor, 0, None).await?;
            return Ok(Step::More { items: 0 });
        }
        let room_id = ruma::RoomId::parse(&self.room.room_id)
            .map_err(|e| Error::internal(format!("stored room id {} does not parse: {e}", self.room.room_id)))?;
        let pipeline = Pipeline {
            remote: self.r,
            room_id: &room_id,
            room_version: &self.room.version,
            background: true,
            keep_ids: false,
        };
        let got = if use_state {
            // The whole state in one load: the writer's page cache is sized for it while it runs.
            let events = Some(missing.len());
            self.r.store.write_background(move |w| w.size_cache_for(events)).await?;
            // The join's prev event is listed but is no part of the state before it (Synapse's answer): asked for
            // alongside the answer instead of in a step of its own after it.
            let also = cursor.prev.clone().filter(|p| missing.contains(p));
            let at = cursor.prev.as_deref().unwrap_or(&cursor.join_event);
            let got = self.fetch_state(&pipeline, at, also).await;
            self.r.store.write_background(|w| w.size_cache_for(None)).await?;
            got?
        } else {
            pipeline.from_ids(&self.server, missing.into_iter().take(batch.max(1)).collect()).await?
        };
        if let Some(e) = &got.source_error {
            tracing::info!(server = %self.server, error = %e, "resync: fetch failed part-way");
        }
        let (total, still) = self.r.store.read_background(move |c| rs::listed_and_missing(c, room)).await?;
        tracing::info!(
            room_id = %self.room.room_id, fetched = got.received, stored = got.stored, missing = still,
            wait_verified_ms = got.wait_source.as_millis() as u64, verify_ms = got.verify.as_millis() as u64,
            wait_write_ms = got.wait_write.as_millis() as u64, "resync: fetched events"
        );
        if got.stored == 0 {
            return self.fetched_nothing(cursor, source, use_state, total, still).await;
        }
        cursor.phase = Phase::Fetch { source, use_state: false };
        self.save(&cursor, total - still, Some(total)).await?;
        Ok(Step::More { items: got.received })
    }

    /// The `/state` answer at `at` (our join's prev event), downloaded to a file, then through the pipeline. Event
    /// `also` is asked for meanwhile and stored after it if it came by then; if not, it is left to the next step's
    /// single fetches (a slow answer for one event does not hold the step, or the cursor, back).
    async fn fetch_state(&self, pipeline: &Pipeline<'_>, at: &str, also: Option<String>) -> Result<Stored> {
        let (client, server) = (self.r.client.clone(), self.server.clone());
        let single = also.map(|id| {
            let (client, server) = (client.clone(), server.clone());
            tokio::spawn(
                async move { client.get(&server, &format!("/_matrix/federation/v1/event/{}", enc(&id))).await },
            )
        });
        const ARRAYS: &[&str] = &["pdus", "auth_chain"];
        let got = match download_state(client, server, self.room.room_id.clone(), at.to_owned()).await {
            Ok(file) => {
                tracing::info!(bytes = file.bytes, "resync: /state answer downloaded");
                pipeline.prefetch_keys(&file.path, ARRAYS).await;
                pipeline.from_file(&file.path, ARRAYS).await
            }
            Err(e) => Ok(Stored { source_error: Some(e), ..Stored::default() }),
        };
        let Some(single) = single else { return got };
        if !single.is_finished() {
            single.abort();
            return got;
        }
        let mut got = got?;
        if let Ok(Ok(answer)) = single.await {
            let more = pipeline.from_pdus(&self.server, crate::federation::batches::raw_pdus(&answer)).await?;
            (got.received, got.stored) = (got.received + more.received, got.stored + more.stored);
        }
        Ok(got)
    }

    /// A fetch that stored nothing: from `/state`, fall back to single events; from single events, when every
    /// server failed to supply them, the `/state_ids` answer itself is suspect (it listed events that do not
    /// exist): ask another server for the state ids, trusting its source less. Else fail (retried, rotating).
    async fn fetched_nothing(
        &self,
        mut cursor: ResyncCursor,
        source: String,
        use_state: bool,
        total: i64,
        still: i64,
    ) -> Result<Step> {
        if use_state {
            cursor.phase = Phase::Fetch { source, use_state: false };
            self.save(&cursor, total - still, Some(total)).await?;
            return Ok(Step::More { items: 0 });
        }
        if self.job.attempts as usize + 1 >= self.servers && cursor.untried_besides(&source) {
            tracing::warn!(room_id = %self.room.room_id, %source, still, "resync: listed state events cannot be fetched from anyone; asking another server for /state_ids");
            if !cursor.distrust.contains(&source) {
                cursor.distrust.push(source);
            }
            cursor.phase = Phase::Ids;
            let room = self.room_nid;
            self.r.store.write_background(move |w| rs::clear_state_ids(w.db(), room)).await?;
            self.save(&cursor, 0, None).await?;
            return Ok(Step::More { items: 0 });
        }
        Err(Error::internal(format!("{} returned none of the {still} missing events", self.server)))
    }

    /// The next `batch` listed state events against their own auth events (as Synapse checks the outliers it
    /// fetches): a resident cannot slip in state its own auth events do not allow. Checked on readers, in
    /// parallel; only the (rare) rejections are written. In event number order ([`rs::auth_order`]): the rows
    /// were just written in that order, so the reads go through the table's pages one after another; in id order
    /// each row was a random page, read from the file again (bench/PROFILE.md, round 11).
    async fn auth(&self, mut cursor: ResyncCursor, at: Option<EventNid>, done: i64, batch: usize) -> Result<Step> {
        let job = self.job.job_id;
        if self.walks.auths.next(job, &at, 0).is_none() {
            let room = self.room_nid;
            let nids = self.r.store.read_background(move |c| rs::auth_order(c, room, at)).await?;
            self.walks.auths.hold(job, at, nids);
        }
        let nids = self.walks.auths.next(job, &at, batch.max(1)).unwrap_or_default();
        let Some(&last) = nids.last() else {
            self.walks.auths.advance(job, 0, None);
            cursor.enter(&self.room.room_id, Phase::Fill { at: None, done: 0 });
            self.save(&cursor, 0, None).await?;
            return Ok(Step::More { items: 0 });
        };
        let n = nids.len();
        let parts = std::thread::available_parallelism().map_or(1, |n| n.get()).min(4);
        let checks = nids.chunks(n.div_ceil(parts)).map(|part| {
            let (part, room) = (part.to_vec(), self.room.clone());
            self.r.store.read_background(move |c| partial::judge(c, &room, &part))
        });
        let mut rejected = Vec::new();
        for r in futures::future::join_all(checks).await {
            rejected.extend(r?);
        }
        if !rejected.is_empty() {
            tracing::warn!(room_id = %self.room.room_id, rejected = rejected.len(), first = ?rejected.first(), "resync: state events the resident listed fail auth");
            self.r.store.write_background(move |w| partial::reject(w.db(), &rejected)).await?;
        }
        let done = done + n as i64;
        cursor.phase = Phase::Auth { at: Some(last), done };
        self.save(&cursor, done, None).await?;
        self.walks.auths.advance(job, n, Some(last));
        Ok(Step::More { items: n })
    }

    /// The next `batch` rows of the partial base group and `room_members`, in the fill's walk, and the cursor past
    /// them: one short write (the rows and the position that says they are done commit together).
    async fn fill(&self, cursor: ResyncCursor, at: Option<rs::FillKey>, done: i64, batch: usize) -> Result<Step> {
        let job = self.job.job_id;
        if self.walks.fills.next(job, &at, 0).is_none() {
            let (room, from) = (self.room_nid, at.clone());
            let nids = self.r.store.read_background(move |c| rs::fill_order(c, room, from.as_ref())).await?;
            self.walks.fills.hold(job, at.clone(), nids);
        }
        let next = self.walks.fills.next(job, &at, batch.max(1)).unwrap_or_default();
        let (identity, room, sg, prev) = (self.r.identity.clone(), self.room_nid, cursor.sg, cursor.prev.clone());
        let (room_id, mut cursor, taken) = (self.room.room_id.clone(), cursor, next.len());
        let (n, now_at) = self
            .r
            .store
            .write_background(move |w| {
                let (last, n) = partial::fill_chunk(w, &identity, room, sg, prev.as_deref(), &next)?;
                // Events of the walk gone since it was read are skipped, the position kept.
                let now_at = last.or(at);
                let done = done + n as i64;
                let shown = if taken == 0 {
                    cursor.enter(&room_id, Phase::Finish);
                    0
                } else {
                    cursor.phase = Phase::Fill { at: now_at.clone(), done };
                    done
                };
                crate::store::jobs::save_cursor(w.db(), job, &cursor.to_json(), shown, None)?;
                Ok((n, now_at))
            })
            .await?;
        // Committed: the walk moves on with the cursor.
        self.walks.fills.advance(job, taken, now_at);
        Ok(Step::More { items: n })
    }

    /// One write completes the room, once the list of state ids (done with) is gone, [`STATE_IDS_PER_WRITE`] per
    /// write: deleting a 100k-member room's list inside the completing write held the writer 70 ms more.
    async fn finish(&self, cursor: ResyncCursor) -> Result<Step> {
        let (identity, room, sg) = (self.r.identity.clone(), self.room_nid, cursor.sg);
        while self
            .r
            .store
            .write_background(move |w| rs::clear_some_state_ids(w.db(), room, STATE_IDS_PER_WRITE))
            .await?
            > 0
        {}
        let join = cursor.join_event.clone();
        let members = self.r.store.write_background(move |w| partial::complete(w, &identity, room, sg, &join)).await?;
        let phase_ms = cursor.phase_at.map(|t| crate::store::accounts::now_ms() - t);
        tracing::info!(room_id = %self.room.room_id, members, finish_phase_ms = ?phase_ms, "resync complete: room has full state");
        Ok(Step::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_follow_their_cursor_and_are_dropped_when_done() {
        let walks = Walks::<rs::FillKey>::default();
        let (job, key) = (JobId(1), |n: i64| Some(("m.room.member".to_owned(), format!("@u{n}:x"), n)));
        assert_eq!(walks.next(job, &None, 2), None, "nothing held yet");
        walks.hold(job, None, (1..=5).map(EventNid).collect());
        assert_eq!(walks.next(job, &None, 2), Some(vec![EventNid(1), EventNid(2)]));
        walks.advance(job, 2, key(2));
        assert_eq!(walks.next(job, &None, 2), None, "a cursor elsewhere (another run's) reads the walk again");
        assert_eq!(walks.next(job, &key(2), 9), Some(vec![EventNid(3), EventNid(4), EventNid(5)]));
        for other in 2..=WALKS_KEPT as i64 {
            walks.hold(JobId(other), None, vec![EventNid(other)]);
        }
        assert_eq!(walks.lock().len(), WALKS_KEPT);
        walks.hold(JobId(99), None, vec![]);
        assert_eq!(walks.lock().len(), WALKS_KEPT, "one more drops another");
        walks.advance(JobId(99), 0, None);
        assert!(!walks.lock().contains_key(&JobId(99)), "a walk with nothing left is dropped");
    }
}
