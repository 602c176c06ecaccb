//! The per-destination transaction sender: drains the durable outbox, one transaction in flight per
//! destination, exponential backoff on failure, so one dead server never delays the others.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use crate::http::AppState;
use crate::store::accounts::now_ms;
use crate::store::outbox;

/// A transaction's outcome to record: its rows to delete (sent) or none (failed: back off), and who waits.
type Ack = (String, Option<Vec<i64>>, oneshot::Sender<bool>);

/// Group commit of transaction outcomes: after a fan-out (one event to a room on a thousand servers) the
/// destinations finish at about the same time, and their rows are deleted in one write per round instead of one
/// write each, which had queued a thousand foreground writes ahead of everyone else's.
async fn ack_flusher(s: AppState, mut rx: mpsc::UnboundedReceiver<Ack>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < 2000 {
            match rx.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        let items: Vec<(String, Option<Vec<i64>>)> = batch.iter().map(|(d, ids, _)| (d.clone(), ids.clone())).collect();
        let ok = s
            .store
            .write(move |w| {
                let now = now_ms();
                for (d, ids) in &items {
                    match ids {
                        Some(ids) => {
                            outbox::delete(w.conn, ids)?;
                            outbox::record_success(w.conn, d)?;
                        }
                        None => {
                            let delay = outbox::record_failure(w.conn, d, now)?;
                            tracing::info!(destination = %d, retry_in_ms = delay, "backing off");
                        }
                    }
                }
                Ok(())
            })
            .await
            .map_err(|e| tracing::error!(error = %e, "could not clear sent outbox rows"))
            .is_ok();
        for (_, _, done) in batch {
            let _ = done.send(ok);
        }
    }
}

pub async fn run(s: AppState, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let in_flight: Arc<Mutex<HashSet<String>>> = Arc::default();
    let (ack_tx, ack_rx) = mpsc::unbounded_channel::<Ack>();
    tokio::spawn(ack_flusher(s.clone(), ack_rx));
    loop {
        if *shutdown.borrow() {
            return;
        }
        match s.store.read(|c| outbox::due_destinations(c, now_ms())).await {
            Ok(dests) => {
                for d in dests {
                    if !in_flight.lock().unwrap_or_else(|e| e.into_inner()).insert(d.clone()) {
                        continue;
                    }
                    let (s2, flight, acks) = (s.clone(), in_flight.clone(), ack_tx.clone());
                    tokio::spawn(async move {
                        drain(&s2, &d, &acks).await;
                        flight.lock().unwrap_or_else(|e| e.into_inner()).remove(&d);
                    });
                }
            }
            Err(e) => tracing::error!(error = %e, "outbox unreadable"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// Sends transactions to one destination until its queue is empty or it fails.
async fn drain(s: &AppState, destination: &str, acks: &mpsc::UnboundedSender<Ack>) {
    let Some(fed) = s.federation.as_ref() else { return };
    loop {
        let d = destination.to_owned();
        let batch = s.store.read(move |c| outbox::next_batch(c, &d)).await;
        let (ids, pdus, edus) = match batch {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "outbox batch unreadable");
                return;
            }
        };
        if ids.is_empty() {
            return;
        }
        let pdus: Vec<Value> = pdus.iter().filter_map(|p| serde_json::from_str(p).ok()).collect();
        let edus: Vec<Value> = edus.iter().filter_map(|p| serde_json::from_str(p).ok()).collect();
        let txn_id = format!("{}_{}", now_ms(), ids[0]);
        let body = json!({
            "origin": s.identity.server_name.as_str(),
            "origin_server_ts": now_ms(),
            "pdus": pdus,
            "edus": edus,
        });
        let path = format!("/_matrix/federation/v1/send/{txn_id}");
        match fed
            .client
            .request_timeout(reqwest::Method::PUT, destination, &path, Some(&body), Duration::from_secs(60))
            .await
        {
            Ok(_) => {
                let n = ids.len();
                // Wait for the rows to be gone before reading the next batch (or they would be sent again).
                let (done_tx, done_rx) = oneshot::channel();
                if acks.send((destination.to_owned(), Some(ids), done_tx)).is_err() || !done_rx.await.unwrap_or(false) {
                    return;
                }
                tracing::debug!(destination, items = n, "transaction sent");
            }
            Err(e) => {
                tracing::info!(destination, error = %e, "transaction failed");
                let (done_tx, done_rx) = oneshot::channel();
                if acks.send((destination.to_owned(), None, done_tx)).is_ok() {
                    let _ = done_rx.await;
                }
                return;
            }
        }
    }
}
