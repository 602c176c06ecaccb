//! The per-destination transaction sender: drains the durable outbox, one transaction in flight per
//! destination, exponential backoff on failure, so one dead server never delays the others.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::http::AppState;
use crate::store::accounts::now_ms;
use crate::store::outbox;

pub async fn run(s: AppState, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let in_flight: Arc<Mutex<HashSet<String>>> = Arc::default();
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
                    let (s2, flight) = (s.clone(), in_flight.clone());
                    tokio::spawn(async move {
                        drain(&s2, &d).await;
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
async fn drain(s: &AppState, destination: &str) {
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
                let d = destination.to_owned();
                let n = ids.len();
                if let Err(e) = s
                    .store
                    .write(move |w| {
                        outbox::delete(w.conn, &ids)?;
                        outbox::record_success(w.conn, &d)
                    })
                    .await
                {
                    tracing::error!(error = %e, "could not clear sent outbox rows");
                    return;
                }
                tracing::debug!(destination, items = n, "transaction sent");
            }
            Err(e) => {
                let d = destination.to_owned();
                let delay = s.store.write(move |w| outbox::record_failure(w.conn, &d, now_ms())).await.unwrap_or(0);
                tracing::info!(destination, error = %e, retry_in_ms = delay, "transaction failed; backing off");
                return;
            }
        }
    }
}
