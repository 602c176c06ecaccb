//! The per-destination transaction sender: drains the durable outbox, one transaction in flight per
//! destination, exponential backoff on failure, so one dead server never delays the others.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use crate::federation::FedContext;
use crate::store::accounts::now_ms;
use crate::store::outbox;

/// What became of a transaction: its rows to delete (and, catching up, the stream position it was read at), or
/// a failure to back off from.
enum Outcome {
    Sent { ids: Vec<i64>, catch_up_to: Option<i64> },
    Failed,
}

/// A transaction's outcome to record, for whom, and who waits for it to be written.
type Ack = (String, Outcome, oneshot::Sender<bool>);

/// Group commit of transaction outcomes: after a fan-out (one event to a room on a thousand servers) the
/// destinations finish at about the same time, and their rows are deleted in one write per round instead of one
/// write each, which had queued a thousand foreground writes ahead of everyone else's.
async fn ack_flusher(s: Arc<FedContext>, mut rx: mpsc::UnboundedReceiver<Ack>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < 2000 {
            match rx.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        let (items, waiters): (Vec<(String, Outcome)>, Vec<oneshot::Sender<bool>>) =
            batch.into_iter().map(|(d, o, done)| ((d, o), done)).unzip();
        let our_server = s.identity.server_name.to_string();
        let base_ms = s.config.federation.retry_base_ms;
        // Failures alone wait for nobody but the sender (the destination is backing off): they are written at
        // background priority, behind users' writes.
        let failed = items.iter().filter(|(_, o)| matches!(o, Outcome::Failed)).count();
        let only_failures = failed == items.len();
        let write = move |w: &mut crate::store::Writer<'_>| {
            let now = now_ms();
            for (d, outcome) in &items {
                match outcome {
                    Outcome::Sent { ids, catch_up_to } => {
                        outbox::delete(w.db(), ids)?;
                        match catch_up_to {
                            Some(to) => outbox::finish_catch_up(w.db(), d, &our_server, *to)?,
                            None => outbox::record_success(w.db(), d)?,
                        }
                    }
                    Outcome::Failed => {
                        let delay = outbox::record_failure(w.db(), d, now, base_ms)?;
                        tracing::debug!(destination = %d, retry_in_ms = delay, "backing off");
                    }
                }
            }
            Ok(())
        };
        let written = if only_failures { s.store.write_background(write).await } else { s.store.write(write).await };
        let ok = written.map_err(|e| tracing::error!(error = %e, "could not clear sent outbox rows")).is_ok();
        if ok && failed > 0 {
            tracing::info!(destinations = failed, "sending failed: backing off");
        }
        for done in waiters {
            let _ = done.send(ok);
        }
    }
}

/// A server just made an authenticated request to us, so it is up: if our sends to it are backing off after
/// failures, the backoff ends and its queue goes out at the sender's next look (at most 100 ms), as Synapse does
/// on any authenticated request. A server that was down (or restarted on a new address) is not left waiting for
/// its backoff, up to an hour, before hearing from us. One indexed read per request; a write only when it ends a
/// backoff. It also counts as having answered (the sender's lanes): its queue is not paced like a dead server's.
pub async fn server_is_up(s: &FedContext, origin: &str) {
    if let Some(f) = s.federation.as_ref() {
        f.client.heard_from(origin);
    }
    end_backoff(s, origin, "destination called us: its backoff ends").await;
}

/// Ends `destination`'s backoff, if it is backing off (one indexed read; a write only then).
async fn end_backoff(s: &FedContext, destination: &str, why: &'static str) {
    let store = &s.store;
    let d = destination.to_owned();
    let backing_off = store.read(move |c| outbox::backing_off(c, &d, now_ms())).await.unwrap_or(false);
    if !backing_off {
        return;
    }
    let d = destination.to_owned();
    match store.write(move |w| outbox::end_backoff(w.db(), &d, now_ms())).await {
        Ok(true) => tracing::info!(destination, "{why}"),
        Ok(false) => {}
        Err(e) => tracing::warn!(destination, error = %e, "could not end a destination's backoff"),
    }
}

/// Destinations whose transactions are being built and sent at once, per lane: each holds up to 50 PDUs in
/// memory, so a fan-out to thousands of servers goes out this many at a time rather than all at once.
pub const SENDING_AT_ONCE: usize = 128;

/// The sender's two lanes. Destinations that answered our last request (the federation client remembers) go in
/// one, the rest (never heard from, or failing) in the other, each with its own [`SENDING_AT_ONCE`]. The first
/// message in a big room we just joined goes to its thousands of servers, most never contacted and many gone; with
/// one queue, the next message waited for a turn behind every one of them still queued (a connect timeout per
/// round of 128) before reaching the resident that had just answered us (tests/federation_outbox.rs).
struct Lanes {
    answered: tokio::sync::Semaphore,
    others: tokio::sync::Semaphore,
}

/// The fastest pace at which destinations whose last sends failed are tried again: one per this interval (200 a
/// second). The servers of a big room that are gone all fail on our first event there and come due again together,
/// jitter or not; tried all at once, a wave of 2000 such retries held a user's `/sync` up by up to 2 s on one core
/// (bench/PROFILE.md, round 6). Paced, the same wave is spread over 10 s, and a destination that answers is not
/// in this queue at all.
pub const RETRY_INTERVAL: Duration = Duration::from_millis(5);

/// Hands out retry turns at most one per [`RETRY_INTERVAL`], in the order asked.
#[derive(Default)]
struct RetryPace {
    next: Mutex<Option<tokio::time::Instant>>,
}

impl RetryPace {
    async fn turn(&self) {
        let slot = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let now = tokio::time::Instant::now();
            let slot = next.map_or(now, |n| n.max(now));
            *next = Some(slot + RETRY_INTERVAL);
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

pub async fn run(s: Arc<FedContext>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let in_flight: Arc<Mutex<HashSet<String>>> = Arc::default();
    let pace = Arc::new(RetryPace::default());
    let lanes = Arc::new(Lanes {
        answered: tokio::sync::Semaphore::new(SENDING_AT_ONCE),
        others: tokio::sync::Semaphore::new(SENDING_AT_ONCE),
    });
    let (ack_tx, ack_rx) = mpsc::unbounded_channel::<Ack>();
    tokio::spawn(ack_flusher(s.clone(), ack_rx));
    // Woken by every commit that moved the stream (new events and EDUs are queued in such commits), and at least
    // every 100 ms for backoffs that ran out.
    let mut commits = s.store.stream_watch();
    loop {
        if *shutdown.borrow() {
            return;
        }
        // Destinations that answered one of our requests (a join, a fetch) are up: their backoff ends now.
        for d in s.federation.as_ref().map(|f| f.client.take_succeeded()).unwrap_or_default() {
            end_backoff(&s, &d, "destination answered our request: its backoff ends").await;
        }
        match s.store.read_background(|c| outbox::due_destinations(c, now_ms())).await {
            Ok(dests) => {
                for outbox::Due { destination: d, failures } in dests {
                    if !in_flight.lock().unwrap_or_else(|e| e.into_inner()).insert(d.clone()) {
                        continue;
                    }
                    let answered = s.federation.as_ref().is_some_and(|f| f.client.answered_lately(&d));
                    // Failing and not heard from since: paced, and asked whether it answers before a transaction.
                    let doubtful = failures > 0 && !answered;
                    let (s2, flight, acks, lanes, pace) =
                        (s.clone(), in_flight.clone(), ack_tx.clone(), lanes.clone(), pace.clone());
                    tokio::spawn(async move {
                        if doubtful {
                            pace.turn().await;
                        }
                        let lane = if answered { &lanes.answered } else { &lanes.others };
                        if let Ok(_turn) = lane.acquire().await {
                            drain(&s2, &d, doubtful, &acks).await;
                        }
                        flight.lock().unwrap_or_else(|e| e.into_inner()).remove(&d);
                    });
                }
            }
            Err(e) => tracing::error!(error = %e, "outbox unreadable"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = commits.changed() => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// Sends transactions to one destination until its queue is empty or it fails.
/// `probe_first`: the destination's last sends failed and it has not answered or called us since. It is first asked
/// whether it answers at all (unsigned, no body): most such servers are gone for good, and a refused connection is
/// all their retry then costs. A server known to be up gets its transaction at once.
async fn drain(s: &FedContext, destination: &str, probe_first: bool, acks: &mpsc::UnboundedSender<Ack>) {
    let Some(fed) = s.federation.as_ref() else { return };
    if probe_first && !fed.client.answers(destination).await {
        tracing::debug!(destination, "destination still unreachable");
        let _ = record(acks, destination, Outcome::Failed).await;
        return;
    }
    loop {
        let (d, ours) = (destination.to_owned(), s.identity.server_name.to_string());
        let batch = match s.store.read_background(move |c| outbox::next_batch(c, &d, &ours)).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "outbox batch unreadable");
                return;
            }
        };
        let catching_up = batch.catch_up_to.is_some();
        if batch.ids.is_empty() && batch.pdus.is_empty() {
            if catching_up {
                // Nothing owed after all: back to a normal queue.
                let _ =
                    record(acks, destination, Outcome::Sent { ids: Vec::new(), catch_up_to: batch.catch_up_to }).await;
            }
            return;
        }
        let pdus: Vec<Value> = batch.pdus.iter().filter_map(|p| serde_json::from_str(p).ok()).collect();
        let edus: Vec<Value> = batch.edus.iter().filter_map(|p| serde_json::from_str(p).ok()).collect();
        // Catch-up PDUs (one per room) may be more than one transaction holds: 50 PDUs each, EDUs with the first.
        let mut chunks: Vec<Vec<Value>> = pdus.chunks(50).map(<[Value]>::to_vec).collect();
        if chunks.is_empty() {
            chunks.push(Vec::new());
        }
        for (i, chunk) in chunks.into_iter().enumerate() {
            let txn_id = format!("{}_{}_{i}", now_ms(), batch.ids.first().copied().or(batch.catch_up_to).unwrap_or(0));
            let body = json!({
                "origin": s.identity.server_name.as_str(),
                "origin_server_ts": now_ms(),
                "pdus": chunk,
                "edus": if i == 0 { edus.clone() } else { Vec::new() },
            });
            let path = format!("/_matrix/federation/v1/send/{txn_id}");
            if let Err(e) = fed
                .client
                .request_timeout(reqwest::Method::PUT, destination, &path, Some(&body), Duration::from_secs(60))
                .await
            {
                tracing::info!(destination, error = %e, "transaction failed");
                let _ = record(acks, destination, Outcome::Failed).await;
                return;
            }
        }
        let n = batch.ids.len() + if catching_up { batch.pdus.len() } else { 0 };
        // Wait for the rows to be gone before reading the next batch (or they would be sent again).
        if !record(acks, destination, Outcome::Sent { ids: batch.ids, catch_up_to: batch.catch_up_to }).await {
            return;
        }
        tracing::debug!(destination, items = n, catching_up, "transaction sent");
    }
}

/// Hands an outcome to the group commit and waits until it is written; false if it could not be.
async fn record(acks: &mpsc::UnboundedSender<Ack>, destination: &str, outcome: Outcome) -> bool {
    let (done_tx, done_rx) = oneshot::channel();
    if acks.send((destination.to_owned(), outcome, done_tx)).is_err() {
        return false;
    }
    done_rx.await.unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn retries_asked_for_together_are_handed_out_one_interval_apart() {
        let pace = Arc::new(RetryPace::default());
        let start = tokio::time::Instant::now();
        let turns: Vec<_> = (0..20)
            .map(|_| {
                let pace = pace.clone();
                tokio::spawn(async move {
                    pace.turn().await;
                    tokio::time::Instant::now()
                })
            })
            .collect();
        let mut at = Vec::new();
        for t in turns {
            at.push(t.await.unwrap());
        }
        at.sort();
        // Timers never fire early: the 20th turn comes no sooner than 19 intervals after the first was asked.
        assert!(at[19] - start >= RETRY_INTERVAL * 19, "20 turns within {:?}", at[19] - start);
    }
}
