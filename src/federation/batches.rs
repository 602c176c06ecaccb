//! Verified batches from a file or a list of ids: the one pipeline that brings many remote events in as outliers
//! (a `send_join` answer, a resync's `/state` answer, a resync's missing events fetched one by one). PDUs come in
//! batches of at most [`PARSE_BATCH`] through a small bounded channel (memory stays bounded by a few batches
//! whatever the room's size), each batch is verified (hashes, signatures, this room's) while the writer stores the
//! previous one.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::StreamExt;
use ruma::RoomId;
use serde_json::value::RawValue;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::federation::client::enc;
use crate::federation::inbound::{fetch_missing_auth, on_threads, verify_batch_raw_then};
use crate::federation::FedContext;
use crate::federation::{FedClient, KeyStore};
use crate::room::remote::{persist_outliers, OutlierRow};
use crate::room::{Identity, Pdu};
use crate::store::{state_groups, Store};

/// PDUs parsed, verified and stored per batch: a memory bound (a batch's JSON trees are in memory at once, and
/// two or three batches are in flight), and short writes a user's write never waits long behind.
pub const PARSE_BATCH: usize = 200;
/// Verified events a background pipeline writes per transaction (see [`Pipeline::write_batch`]).
pub const BACKGROUND_WRITE_BATCH: usize = 1000;
/// The longest one background write of outliers holds the writer: a batch that takes longer is committed in parts.
/// A user's write waits for the write in progress, and a 1000-event write took ~45 ms in a 100k-member resync (by
/// the profile; 75 ms on a loaded machine).
pub const BACKGROUND_WRITE_BUDGET: Duration = Duration::from_millis(20);
/// Most event text (as received) waiting for one write: with [`BACKGROUND_WRITE_BATCH`], what bounds the memory
/// of the verified events held between verifying and writing, whatever the events' size.
pub const WRITE_BYTES: usize = 8 << 20;
/// Parsed batches being verified at once: while one waits for a thread (or its last events), the next ones keep
/// the other cores busy; each is at most [`PARSE_BATCH`] events and [`stream::BATCH_BYTES`] of text.
///
/// [`stream::BATCH_BYTES`]: crate::federation::stream::BATCH_BYTES
pub const VERIFYING_AT_ONCE: usize = 2;
/// State keys created per write before a big answer's events are stored (about 10 ms of the writer each).
const STATE_KEYS_PER_WRITE: usize = 2000;
/// Concurrent `/event` requests when fetching a list of ids.
pub const EVENT_FETCHES_IN_FLIGHT: usize = 100;

/// The handles that fetching, verifying and storing remote events needs.
#[derive(Clone, Copy)]
pub struct Remote<'a> {
    pub store: &'a Store,
    pub client: &'a Arc<FedClient>,
    pub keys: &'a KeyStore,
    pub identity: &'a Arc<Identity>,
}

impl<'a> Remote<'a> {
    /// The handles of a running server (an error when federation is disabled).
    pub fn of(s: &'a FedContext) -> Result<Remote<'a>> {
        let fed = s.federation.as_ref().ok_or_else(|| Error::forbidden("federation is disabled"))?;
        Ok(Remote { store: &s.store, client: &fed.client, keys: &fed.keys, identity: &s.identity })
    }
}

/// The PDUs of an `/event` answer (its `pdus`), as the pipeline takes them.
pub fn raw_pdus(answer: &Value) -> Vec<Box<RawValue>> {
    let pdus = answer.get("pdus").and_then(Value::as_array).into_iter().flatten();
    pdus.filter_map(|p| serde_json::value::to_raw_value(p).ok()).collect()
}

/// What a pipeline run did.
#[derive(Debug, Default)]
pub struct Stored {
    /// PDUs received (before verification).
    pub received: usize,
    /// Of those, stored (new outliers of this room).
    pub stored: usize,
    /// The ids of the valid events of this room, in the order received (stored now or held before), when the
    /// pipeline keeps them ([`Pipeline::keep_ids`]).
    pub ids: Vec<String>,
    /// The source failed part-way (unreadable file, ...): what came before was still stored.
    pub source_error: Option<String>,
    /// Time spent waiting for the next verified batch; the batches' verification times added up (they overlap,
    /// so this can exceed the wall time); time spent waiting for the previous batch's write.
    pub wait_source: Duration,
    pub verify: Duration,
    pub wait_write: Duration,
}

/// A batch through verification.
struct Checked {
    received: usize,
    /// Its text as received.
    bytes: usize,
    verified: Vec<OutlierRow>,
    took: Duration,
}

/// One pipeline: events of one room, written in the foreground (a user waits) or as background work.
pub struct Pipeline<'a> {
    pub remote: Remote<'a>,
    pub room_id: &'a RoomId,
    pub room_version: &'a str,
    pub background: bool,
    /// Whether [`Stored::ids`] is gathered: a `send_join` answer's state needs its ids; a resync's 160k would be 14
    /// MB held for nothing.
    pub keep_ids: bool,
}

impl Pipeline<'_> {
    /// Fetches every signing key the PDUs under `keys` of `file` need in one go (one notary request for thousands
    /// of servers), so verifying its batches makes no fetch round per batch, and creates the state keys they name
    /// in key order ([`state_groups::ensure_state_keys`]). Failure is logged, not fatal.
    pub async fn prefetch_keys(&self, file: &Path, keys: &'static [&'static str]) {
        let f = file.to_owned();
        let scan = move || crate::federation::stream::scan_file(&f, keys);
        let scan = match read_file_off_async(self.background, scan).await.and_then(|r| r) {
            Ok(scan) => scan,
            Err(e) => {
                tracing::info!(room_id = %self.room_id, error = %e, "scanning a downloaded answer failed");
                return;
            }
        };
        if let Err(e) = self.remote.keys.keys_for(&scan.signing).await {
            tracing::info!(room_id = %self.room_id, error = %e, "key prefetch failed");
        }
        let state_keys: Vec<(String, String)> = scan.state_keys.into_iter().collect();
        for chunk in state_keys.chunks(STATE_KEYS_PER_WRITE) {
            let chunk = chunk.to_vec();
            let write = move |w: &mut crate::store::Writer<'_>| state_groups::ensure_state_keys(w.db(), &chunk);
            if let Err(e) = write_as(self.remote.store, self.background, write).await {
                tracing::info!(room_id = %self.room_id, error = %e, "creating the state keys of an answer failed");
                return;
            }
        }
    }

    /// The PDUs of the arrays under `keys` of the downloaded answer `file`.
    pub async fn from_file(&self, file: &Path, keys: &'static [&'static str]) -> Result<Stored> {
        let (tx, rx) = mpsc::channel::<Vec<Box<RawValue>>>(2);
        let f = file.to_owned();
        let read = move || {
            let reader = std::io::BufReader::new(std::fs::File::open(&f).map_err(|e| e.to_string())?);
            crate::federation::stream::for_each_pdu_batch(reader, keys, PARSE_BATCH, &mut |batch| {
                tx.blocking_send(batch).is_ok()
            })
        };
        // Reading and splitting the file is background work too (a second of CPU for a 100k-member room's 100 MB):
        // on a low-priority thread of its own, as it waits for the verifiers most of the time.
        let producer = tokio::spawn(read_file_off_async(self.background, read));
        let mut out = self.run(rx, None).await?;
        out.source_error = producer.await.map_err(|e| e.to_string()).and_then(|r| r).and_then(|r| r).err();
        Ok(out)
    }

    /// PDUs already at hand (a single event fetched on the side from `server`), stored as [`Pipeline::from_ids`]
    /// stores its events.
    pub async fn from_pdus(&self, server: &str, pdus: Vec<Box<RawValue>>) -> Result<Stored> {
        let (tx, rx) = mpsc::channel::<Vec<Box<RawValue>>>(1);
        if !pdus.is_empty() {
            let _ = tx.send(pdus).await;
        }
        drop(tx);
        self.run(rx, Some(server)).await
    }

    /// The events `ids`, fetched from `server` with `/event` (at most [`EVENT_FETCHES_IN_FLIGHT`] at once). Single
    /// events come without their auth chain: the auth events they cite that we lack are fetched too.
    pub async fn from_ids(&self, server: &str, ids: Vec<String>) -> Result<Stored> {
        let (tx, rx) = mpsc::channel::<Vec<Box<RawValue>>>(2);
        let (client, srv) = (self.remote.client.clone(), server.to_owned());
        let producer = tokio::spawn(async move {
            let reqs = ids.into_iter().map(|id| {
                let (client, srv) = (client.clone(), srv.clone());
                async move { client.get(&srv, &format!("/_matrix/federation/v1/event/{}", enc(&id))).await }
            });
            let mut answers = futures::stream::iter(reqs).buffer_unordered(EVENT_FETCHES_IN_FLIGHT);
            let mut batch = Vec::new();
            while let Some(r) = answers.next().await {
                match r {
                    Ok(v) => batch.extend(raw_pdus(&v)),
                    Err(e) => tracing::info!(server = %srv, error = %e, "event fetch failed"),
                }
                if batch.len() >= PARSE_BATCH && tx.send(std::mem::take(&mut batch)).await.is_err() {
                    return;
                }
            }
            if !batch.is_empty() {
                let _ = tx.send(batch).await;
            }
        });
        let out = self.run(rx, Some(server)).await?;
        let _ = producer.await;
        Ok(out)
    }

    /// Verifies the batches of `rx` ([`VERIFYING_AT_ONCE`] at a time, in order, and fetches the auth events they
    /// cite from `fetch_auth_from`) while the writer stores the verified ones.
    async fn run(&self, mut rx: mpsc::Receiver<Vec<Box<RawValue>>>, fetch_auth_from: Option<&str>) -> Result<Stored> {
        let mut out = Stored::default();
        let mut pending: Option<tokio::task::JoinHandle<Result<usize>>> = None;
        let write_batch = self.write_batch();
        let mut to_write: Vec<OutlierRow> = Vec::new();
        let mut to_write_bytes = 0usize;
        let batches = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let checked = batches
            .map(|batch| -> BoxFuture<'_, Result<Checked>> { Box::pin(self.check(batch, fetch_auth_from)) })
            .buffered(VERIFYING_AT_ONCE);
        let mut checked = std::pin::pin!(checked);
        loop {
            let t = Instant::now();
            let next = checked.next().await.transpose()?;
            out.wait_source += t.elapsed();
            let Some(batch) = next else { break };
            out.received += batch.received;
            out.verify += batch.took;
            if self.keep_ids {
                out.ids.extend(batch.verified.iter().map(|r| r.event_id.clone()));
            }
            to_write_bytes += batch.bytes;
            to_write.extend(batch.verified);
            if to_write.len() < write_batch && to_write_bytes < WRITE_BYTES {
                continue;
            }
            to_write_bytes = 0;
            out.stored += self.write_after(&mut pending, &mut out.wait_write, std::mem::take(&mut to_write)).await?;
        }
        if !to_write.is_empty() {
            out.stored += self.write_after(&mut pending, &mut out.wait_write, to_write).await?;
        }
        if let Some(p) = pending.take() {
            out.stored += p.await.map_err(|e| Error::internal(e.to_string()))??;
        }
        Ok(out)
    }

    /// Starts writing `verified` once the write before it (`pending`) is done, timing the wait; returns how many
    /// events that earlier write stored.
    async fn write_after(
        &self,
        pending: &mut Option<tokio::task::JoinHandle<Result<usize>>>,
        waited: &mut Duration,
        verified: Vec<OutlierRow>,
    ) -> Result<usize> {
        let t = Instant::now();
        let stored = match pending.take() {
            Some(p) => p.await.map_err(|e| Error::internal(e.to_string()))??,
            None => 0,
        };
        *waited += t.elapsed();
        *pending = Some(self.spawn_write(verified));
        Ok(stored)
    }

    /// One batch verified (and, with `fetch_auth_from`, the auth events it cites that we lack fetched: else the
    /// auth phase could not judge them, e.g. a rejoin's earlier leave is in no state).
    async fn check(&self, batch: Vec<Box<RawValue>>, fetch_auth_from: Option<&str>) -> Result<Checked> {
        let (received, bytes) = (batch.len(), batch.iter().map(|p| p.get().len()).sum());
        let t = Instant::now();
        let verified = match fetch_auth_from {
            Some(server) => {
                let verified = self.verify(batch).await?;
                if let Err(e) = fetch_missing_auth(self.remote, server, self.room_id, &verified).await {
                    tracing::info!(%server, error = %e, "fetching the auth events of fetched events failed");
                }
                // The rows for the writer, made (and the parsed events freed) on a thread, as verifying is.
                let rows =
                    on_threads(vec![verified], self.background, |part| part.iter().map(OutlierRow::of).collect());
                rows.await?.into_iter().flatten().collect()
            }
            // Without auth events to fetch, each event becomes its row right where it was verified.
            None => self.verify_into_rows(batch).await?,
        };
        Ok(Checked { received, bytes, verified, took: t.elapsed() })
    }

    /// Verified events written per transaction. A background pipeline (a resync) writes [`BACKGROUND_WRITE_BATCH`]
    /// at a time: each commit rewrites the index pages its rows touch (event ids and state keys are random keys),
    /// so in a big room fewer, larger commits write fewer pages per event. Such a write is what a user's write can
    /// wait behind: about 75 ms in a 100k-member resync on a loaded 2-core machine (12 s of writer CPU for 160
    /// writes), and the probe's send p99 stayed where it was with 200 (bench/PROFILE.md, round 3). A foreground
    /// pipeline (a join a user waits for) writes each parsed batch at once.
    fn write_batch(&self) -> usize {
        if self.background {
            BACKGROUND_WRITE_BATCH
        } else {
            PARSE_BATCH
        }
    }

    /// Stores `verified` as outliers on the writer: in one foreground write for a foreground pipeline; for a
    /// background one in writes of at most [`BACKGROUND_WRITE_BUDGET`] each, so a user's write queued meanwhile waits
    /// for no more.
    fn spawn_write(&self, mut verified: Vec<OutlierRow>) -> tokio::task::JoinHandle<Result<usize>> {
        let (store, rid, background) = (self.remote.store.clone(), self.room_id.to_owned(), self.background);
        OutlierRow::sort_for_writing(&mut verified);
        let rows = std::sync::Arc::new(verified);
        tokio::spawn(async move {
            let budget = background.then_some(BACKGROUND_WRITE_BUDGET);
            let (mut stored, mut from) = (0, 0);
            while from < rows.len() {
                let (rows, rid) = (rows.clone(), rid.clone());
                let write =
                    move |w: &mut crate::store::Writer<'_>| persist_outliers(w.db(), &rid, &rows[from..], budget);
                let (new, taken) = write_as(&store, background, write).await?;
                stored += new;
                from += taken;
            }
            Ok(stored)
        })
    }

    /// The valid events of this room in `batch`; the others are dropped (logged).
    async fn verify(&self, batch: Vec<Box<RawValue>>) -> Result<Vec<Pdu>> {
        let room_id = self.room_id.to_owned();
        let kept = verify_batch_raw_then(self.remote.keys, self.room_version, batch, self.background, move |r| {
            of_this_room(&room_id, r)
        });
        Ok(kept.await?.into_iter().flatten().collect())
    }

    /// [`Pipeline::verify`], each kept event made into its writer row on the thread that verified it.
    async fn verify_into_rows(&self, batch: Vec<Box<RawValue>>) -> Result<Vec<OutlierRow>> {
        let room_id = self.room_id.to_owned();
        let rows = verify_batch_raw_then(self.remote.keys, self.room_version, batch, self.background, move |r| {
            of_this_room(&room_id, r).map(|p| OutlierRow::of(&p))
        });
        Ok(rows.await?.into_iter().flatten().collect())
    }
}

/// `f` on the writer, as background work (behind users' writes) or not.
async fn write_as<R, F>(store: &Store, background: bool, f: F) -> Result<R>
where
    R: Send + 'static,
    F: FnOnce(&mut crate::store::Writer<'_>) -> Result<R> + Send + 'static,
{
    if background {
        store.write_background(f).await
    } else {
        store.write(f).await
    }
}

/// A verified event if it is of `room_id`; else nothing (logged).
fn of_this_room(room_id: &RoomId, checked: std::result::Result<Pdu, String>) -> Option<Pdu> {
    match checked {
        Ok(p) if p.room_id == room_id => Some(p),
        Ok(p) => {
            tracing::warn!(%room_id, event_id = %p.event_id, "dropping event of another room");
            None
        }
        Err(e) => {
            tracing::info!(%room_id, error = %e, "dropping invalid event");
            None
        }
    }
}

/// A pass over a downloaded answer, off the async threads: for background work on a low-priority thread of its own
/// (it mostly waits for the verifiers), else on a blocking thread.
async fn read_file_off_async<R, F>(background: bool, f: F) -> std::result::Result<R, String>
where
    R: Send + 'static,
    F: FnOnce() -> R + Send + 'static,
{
    if background {
        crate::lowprio::run_alone("hearth-read-state", f).await
    } else {
        tokio::task::spawn_blocking(f).await.map_err(|e| e.to_string())
    }
}
