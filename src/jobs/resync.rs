//! Resync of a partial-state room (MSC3902): learn the full state at our join from a resident, fetch the events
//! we lack in bounded chunks, then fill the member half of the partial base state group once and clear the flag.
//!
//! Phases (kept in the job cursor, so a restart resumes where it stopped):
//! `ids`    — `/state_ids` at our join event, from the server we joined via, else the others in the room;
//! `fetch`  — missing events, through `/state` when many are missing, else batched `/event`; verified and stored
//!            as outliers in short background writes;
//! `auth`   — each fetched state event checked against its own auth events (rejected ones stay out of the state);
//! `fill`   — the partial base group and `room_members` completed in chunks;
//! `finish` — one write: fill the base group, update `room_members`, clear `partial_state`.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rusqlite::params;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::federation::client::enc;
use crate::federation::inbound::verify_batch_raw;
use crate::http::AppState;
use crate::jobs::{JobRow, Step};
use crate::room::remote::persist_outlier_batch;
use crate::store::ids::{EventNid, RoomNid, StateGroup, StateKeyNid, StreamPos};
use crate::store::{events, members, rooms, state_groups};

/// The rows of `resync_state r` (room `?1`) whose event is still not stored: `missing` was set when the ids
/// arrived, and an event counts as fetched once it is in `events`.
const STILL_MISSING: &str =
    "r.room_nid = ?1 AND r.missing = 1 AND NOT EXISTS (SELECT 1 FROM events e WHERE e.event_id = r.event_id)";

/// Events stored per background write: small, so a user's write never waits long behind one.
const CHUNK: usize = 200;
/// Missing events fetched per step through `/event`: starts here, then adapts to the target step length.
const EVENT_BATCH: usize = 50;

fn servers(cursor: &Value) -> Vec<String> {
    let mut out: Vec<String> = cursor.get("via").and_then(Value::as_str).map(str::to_owned).into_iter().collect();
    for s in cursor.get("servers").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str) {
        if !out.iter().any(|x| x == s) {
            out.push(s.to_owned());
        }
    }
    out
}

/// Moves the cursor to `next`, logging how long the phase that ends took (wall time, across restarts).
fn enter_phase(cursor: &mut Value, room_id: &str, next: &str) {
    let now = crate::store::accounts::now_ms();
    let ended = cursor.get("phase").and_then(Value::as_str).unwrap_or("ids").to_owned();
    if let Some(since) = cursor.get("phase_at").and_then(Value::as_i64) {
        tracing::info!(room_id, phase = %ended, ms = now - since, next, "resync: phase done");
    }
    cursor["phase"] = json!(next);
    cursor["phase_at"] = json!(now);
}

async fn save_cursor(s: &AppState, job_id: i64, cursor: Value, done: i64, total: Option<i64>) -> Result<()> {
    s.store
        .write_background(move |w| {
            w.conn.execute(
                "UPDATE jobs SET cursor = ?2, done_units = ?3, total_units = coalesce(?4, total_units), attempts = 0, last_error = NULL WHERE job_id = ?1",
                params![job_id, cursor.to_string(), done, total],
            )?;
            Ok(())
        })
        .await
}

pub async fn step(s: &AppState, job: &JobRow) -> Result<Step> {
    let room_nid = job.room_nid.ok_or_else(|| Error::internal("resync job without room"))?;
    let room = s
        .store
        .read_background(move |c| rooms::room_by_nid(c, RoomNid(room_nid)))
        .await?
        .ok_or_else(|| Error::internal("resync of unknown room"))?;
    if !room.partial_state {
        return Ok(Step::Done);
    }
    let fed = s.federation.as_ref().ok_or_else(|| Error::forbidden("federation is disabled"))?;
    let mut cursor = job.cursor.clone();
    let join_event = cursor.get("join_event").and_then(Value::as_str).unwrap_or_default().to_owned();
    let phase = cursor.get("phase").and_then(Value::as_str).unwrap_or("ids").to_owned();
    let mut servers = servers(&cursor);
    // Servers whose /state_ids answer listed events nobody could supply are asked last-resort only.
    let distrusted: Vec<String> = cursor
        .get("distrust")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or_default();
    if servers.iter().any(|x| !distrusted.contains(x)) {
        servers.retain(|x| !distrusted.contains(x));
    }
    // Rotate through the servers on failures: attempt n asks server n mod len.
    let server = servers
        .get(job.attempts as usize % servers.len().max(1))
        .cloned()
        .ok_or_else(|| Error::internal("no server to resync from"))?;

    let step_started = std::time::Instant::now();
    let target = std::time::Duration::from_millis(s.config.jobs.step_ms.max(1));
    match phase.as_str() {
        "ids" => {
            let path = format!("/_matrix/federation/v1/state_ids/{}?event_id={}", enc(&room.room_id), enc(&join_event));
            let answer = fed.client.get(&server, &path).await?;
            let pdu_ids: Vec<String> = answer
                .get("pdu_ids")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
                .unwrap_or_default();
            if pdu_ids.is_empty() {
                return Err(Error::internal(format!("{server} returned no state ids")));
            }
            // A resident that disagrees with the state it sent us at join time is lying or broken: try another.
            let sg = cursor.get("sg").and_then(Value::as_i64).unwrap_or_default();
            let known: Vec<String> = s
                .store
                .read_background(move |c| {
                    let mut out = Vec::new();
                    for nid in state_groups::load_state(c, StateGroup(sg))?.values() {
                        if let Some(r) = events::event_by_nid(c, *nid)? {
                            if r.event_type != "m.room.member" {
                                out.push(r.event_id);
                            }
                        }
                    }
                    Ok(out)
                })
                .await?;
            let listed: HashSet<&str> = pdu_ids.iter().map(String::as_str).collect();
            if let Some(bad) = known.iter().find(|id| !listed.contains(id.as_str())) {
                return Err(Error::internal(format!(
                    "{server}: /state_ids answer lacks state event {bad} we hold; trying another server"
                )));
            }
            let total = pdu_ids.len() as i64;
            let missing = s
                .store
                .write_background(move |w| {
                    let mut missing = 0i64;
                    let mut ins = w.conn.prepare_cached(
                        "INSERT OR REPLACE INTO resync_state (room_nid, event_id, missing) VALUES (?1, ?2, ?3)",
                    )?;
                    for id in &pdu_ids {
                        let have = events::event_nid(w.conn, id)?.is_some();
                        ins.execute(params![room_nid, id, !have])?;
                        missing += i64::from(!have);
                    }
                    Ok(missing)
                })
                .await?;
            tracing::info!(room_id = %room.room_id, %server, state = total, missing, "resync: state ids received");
            enter_phase(&mut cursor, &room.room_id, "fetch");
            cursor["source"] = json!(server);
            // Many missing: one /state request beats thousands of /event requests.
            cursor["use_state"] = json!(missing > 50 && missing * 10 >= total);
            save_cursor(s, job.job_id, cursor, total - missing, Some(total)).await?;
            Ok(Step::More)
        }
        "fetch" => {
            let missing: Vec<String> = s
                .store
                .read_background(move |c| {
                    let mut stmt =
                        c.prepare_cached(&format!("SELECT r.event_id FROM resync_state r WHERE {STILL_MISSING}"))?;
                    let rows = stmt.query_map([room_nid], |r| r.get(0))?;
                    Ok(rows.collect::<rusqlite::Result<_>>()?)
                })
                .await?;
            if missing.is_empty() {
                enter_phase(&mut cursor, &room.room_id, "auth");
                save_cursor(s, job.job_id, cursor, 0, None).await?;
                return Ok(Step::More);
            }
            let use_state = cursor.get("use_state").and_then(Value::as_bool).unwrap_or(false);
            // Batches of PDUs flow through a small bounded channel: memory stays bounded by a few batches.
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Box<RawValue>>>(2);
            let producer = if use_state {
                let path = format!("/_matrix/federation/v1/state/{}?event_id={}", enc(&room.room_id), enc(&join_event));
                let file = std::env::temp_dir().join(format!(
                    "hearth-state-{}-{}.json",
                    std::process::id(),
                    crate::http::random_string(8)
                ));
                let client = fed.client.clone();
                let server = server.clone();
                let s2 = s.clone();
                tokio::spawn(async move {
                    let bytes = client.get_to_file(&server, &path, &file).await;
                    let result = match bytes {
                        Ok(n) => {
                            tracing::info!(bytes = n, "resync: /state answer downloaded");
                            // Every signing key the answer needs, fetched in one go (one notary request for
                            // thousands of servers) before verifying, not a fetch round per batch.
                            let f = file.clone();
                            let need = tokio::task::spawn_blocking(move || {
                                crate::federation::stream::keys_needed_by_file(&f, &["pdus", "auth_chain"])
                            })
                            .await;
                            if let (Ok(Ok(need)), Some(fed)) = (need, s2.federation.as_ref()) {
                                if let Err(e) = fed.keys.keys_for(&need).await {
                                    tracing::info!(error = %e, "resync: key prefetch failed");
                                }
                            }
                            let f = file.clone();
                            tokio::task::spawn_blocking(move || {
                                let reader =
                                    std::io::BufReader::new(std::fs::File::open(&f).map_err(|e| e.to_string())?);
                                crate::federation::stream::for_each_pdu_batch(
                                    reader,
                                    &["pdus", "auth_chain"],
                                    CHUNK,
                                    &mut |batch| tx.blocking_send(batch).is_ok(),
                                )
                            })
                            .await
                            .map_err(|e| e.to_string())
                            .and_then(|r| r)
                        }
                        Err(e) => Err(e.to_string()),
                    };
                    let _ = tokio::fs::remove_file(&file).await;
                    result
                })
            } else {
                let size = cursor.get("batch").and_then(Value::as_u64).map(|b| b as usize).unwrap_or(EVENT_BATCH);
                let batch: Vec<String> = missing.iter().take(size).cloned().collect();
                let client = fed.client.clone();
                let server = server.clone();
                tokio::spawn(async move {
                    let reqs = batch.iter().map(|id| {
                        let path = format!("/_matrix/federation/v1/event/{}", enc(id));
                        let (client, server) = (client.clone(), server.clone());
                        async move { client.get(&server, &path).await }
                    });
                    let mut out = Vec::new();
                    for r in futures::future::join_all(reqs).await {
                        match r {
                            Ok(v) => out.extend(
                                v.get("pdus")
                                    .and_then(Value::as_array)
                                    .into_iter()
                                    .flatten()
                                    .filter_map(|p| serde_json::value::to_raw_value(p).ok()),
                            ),
                            Err(e) => tracing::info!(error = %e, "resync: event fetch failed"),
                        }
                    }
                    let _ = tx.send(out).await;
                    Ok(())
                })
            };
            let mut total_fetched = 0usize;
            let mut stored = 0usize;
            // Verify batch k+1 while the writer stores batch k.
            let mut pending: Option<tokio::task::JoinHandle<Result<usize>>> = None;
            // Where the fetch spends its time (logged at the end): waiting for parsed batches, verifying them,
            // waiting for the previous batch's write.
            let (mut t_parse, mut t_verify, mut t_write) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
            loop {
                let t = Instant::now();
                let Some(chunk) = rx.recv().await else { break };
                t_parse += t.elapsed();
                total_fetched += chunk.len();
                let t = Instant::now();
                let verified: Vec<crate::room::Pdu> = verify_batch_raw(s, &room.version, chunk)
                    .await?
                    .into_iter()
                    .filter_map(|r| r.map_err(|e| tracing::info!(error = %e, "resync: invalid event")).ok())
                    .collect();
                if !use_state {
                    // Single events come without their auth chain (a `/state` answer has it): fetch what they
                    // cite that we lack (e.g. a rejoin's earlier leave), or the auth phase could not judge them.
                    if let Err(e) =
                        crate::federation::inbound::fetch_missing_auth(s, &server, &room.room_id, &verified).await
                    {
                        tracing::info!(%server, error = %e, "resync: fetching auth events of fetched state failed");
                    }
                }
                t_verify += t.elapsed();
                let t = Instant::now();
                if let Some(p) = pending.take() {
                    stored += p.await.map_err(|e| Error::internal(e.to_string()))??;
                }
                t_write += t.elapsed();
                let rid = room.room_id.clone();
                let store = s.store.clone();
                pending = Some(tokio::spawn(async move {
                    store
                        // Stored is no longer missing (STILL_MISSING): no per-event bookkeeping write.
                        .write_background(move |w| persist_outlier_batch(w.conn, &rid, verified))
                        .await
                }));
            }
            if let Some(p) = pending.take() {
                stored += p.await.map_err(|e| Error::internal(e.to_string()))??;
            }
            if let Ok(Err(e)) = producer.await {
                tracing::info!(%server, error = %e, "resync: fetch failed part-way");
            }
            let still: i64 = s
                .store
                .read_background(move |c| {
                    Ok(c.query_row(
                        &format!("SELECT count(*) FROM resync_state r WHERE {STILL_MISSING}"),
                        [room_nid],
                        |r| r.get(0),
                    )?)
                })
                .await?;
            let total: i64 = s
                .store
                .read_background(move |c| {
                    Ok(c.query_row("SELECT count(*) FROM resync_state WHERE room_nid = ?1", [room_nid], |r| r.get(0))?)
                })
                .await?;
            tracing::info!(
                room_id = %room.room_id, fetched = total_fetched, stored, missing = still,
                wait_parse_ms = t_parse.as_millis() as u64, verify_ms = t_verify.as_millis() as u64,
                wait_write_ms = t_write.as_millis() as u64, "resync: fetched events"
            );
            if stored == 0 {
                if use_state {
                    // The /state answer did not cover what /state_ids listed: fall back to single events.
                    cursor["use_state"] = json!(false);
                    save_cursor(s, job.job_id, cursor, total - still, Some(total)).await?;
                    return Ok(Step::More);
                }
                let source = cursor.get("source").and_then(Value::as_str).unwrap_or_default().to_owned();
                let untried = self::servers(&cursor).into_iter().any(|x| x != source && !distrusted.contains(&x));
                if job.attempts as usize + 1 >= servers.len() && untried {
                    // Every server failed to supply these: the /state_ids answer itself is suspect (it listed
                    // events that do not exist). Ask another server for the state ids, trusting its source less.
                    tracing::warn!(room_id = %room.room_id, %source, still, "resync: listed state events cannot be fetched from anyone; asking another server for /state_ids");
                    let mut distrust = distrusted.clone();
                    if !distrust.contains(&source) {
                        distrust.push(source);
                    }
                    cursor["distrust"] = json!(distrust);
                    cursor["phase"] = json!("ids");
                    if let Some(o) = cursor.as_object_mut() {
                        o.remove("use_state");
                        o.remove("source");
                    }
                    s.store
                        .write_background(move |w| {
                            Ok(w.conn.execute("DELETE FROM resync_state WHERE room_nid = ?1", [room_nid])?)
                        })
                        .await?;
                    save_cursor(s, job.job_id, cursor, 0, None).await?;
                    return Ok(Step::More);
                }
                return Err(Error::internal(format!("{server} returned none of the {still} missing events")));
            }
            cursor["use_state"] = json!(false);
            // Size the next step so it takes about `jobs.step_ms`.
            let size = cursor.get("batch").and_then(Value::as_u64).unwrap_or(EVENT_BATCH as u64);
            let took = step_started.elapsed();
            let next = if took < target / 2 {
                size * 2
            } else if took > target * 2 {
                size / 2
            } else {
                size
            };
            cursor["batch"] = json!(next.clamp(10, 1000));
            save_cursor(s, job.job_id, cursor, total - still, Some(total)).await?;
            Ok(Step::More)
        }
        "auth" => {
            // Each fetched state event against its own auth events (as Synapse checks the outliers it fetches):
            // a resident cannot slip in state its own auth events do not allow. Checked on readers, in parallel;
            // only the (rare) rejections are written.
            let after = cursor.get("auth_after").and_then(Value::as_str).unwrap_or("").to_owned();
            let ids: Vec<String> = s
                .store
                .read_background(move |c| {
                    let mut stmt = c.prepare_cached(
                        "SELECT event_id FROM resync_state WHERE room_nid = ?1 AND event_id > ?2 ORDER BY event_id LIMIT ?3",
                    )?;
                    let rows = stmt.query_map(params![room_nid, after, AUTH_CHUNK], |r| r.get(0))?;
                    Ok(rows.collect::<rusqlite::Result<_>>()?)
                })
                .await?;
            let Some(last) = ids.last().cloned() else {
                enter_phase(&mut cursor, &room.room_id, "fill");
                save_cursor(s, job.job_id, cursor, 0, None).await?;
                return Ok(Step::More);
            };
            let n = ids.len() as i64;
            let parts = std::thread::available_parallelism().map_or(1, |n| n.get()).min(4);
            let checks = ids.chunks(ids.len().div_ceil(parts)).map(|part| {
                let (part, room) = (part.to_vec(), room.clone());
                s.store.read_background(move |c| rejections(c, &room, &part))
            });
            let mut rejected = Vec::new();
            for r in futures::future::join_all(checks).await {
                rejected.extend(r?);
            }
            if !rejected.is_empty() {
                tracing::warn!(room_id = %room.room_id, rejected = rejected.len(), first = ?rejected.first(), "resync: state events the resident listed fail auth");
                s.store
                    .write_background(move |w| {
                        let mut upd = w.conn.prepare_cached("UPDATE events SET rejected = ?2 WHERE event_id = ?1")?;
                        for (id, reason) in &rejected {
                            upd.execute(params![id, reason])?;
                        }
                        Ok(())
                    })
                    .await?;
            }
            cursor["auth_after"] = json!(last);
            let done = cursor.get("authed").and_then(Value::as_i64).unwrap_or(0) + n;
            cursor["authed"] = json!(done);
            save_cursor(s, job.job_id, cursor, done, None).await?;
            Ok(Step::More)
        }
        "fill" => {
            // Fill the partial base group and room_members in chunks (short writes), resuming after `fill_after`.
            let sg = cursor
                .get("sg")
                .and_then(Value::as_i64)
                .ok_or_else(|| Error::internal("resync cursor without base group"))?;
            let after = cursor.get("fill_after").and_then(Value::as_str).unwrap_or("").to_owned();
            let identity = s.identity.clone();
            let (last, n) = s.store.write_background(move |w| fill_chunk(w, &identity, room_nid, sg, &after)).await?;
            match last {
                Some(last) => {
                    cursor["fill_after"] = json!(last);
                    let done = cursor.get("filled").and_then(Value::as_i64).unwrap_or(0) + n as i64;
                    cursor["filled"] = json!(done);
                    save_cursor(s, job.job_id, cursor, done, None).await?;
                }
                None => {
                    enter_phase(&mut cursor, &room.room_id, "finish");
                    save_cursor(s, job.job_id, cursor, 0, None).await?;
                }
            }
            Ok(Step::More)
        }
        "finish" => {
            let sg = cursor
                .get("sg")
                .and_then(Value::as_i64)
                .ok_or_else(|| Error::internal("resync cursor without base group"))?;
            let identity = s.identity.clone();
            let join = join_event.clone();
            let members = s.store.write_background(move |w| finish(w, &identity, room_nid, sg, &join)).await?;
            let phase_ms = cursor.get("phase_at").and_then(Value::as_i64).map(|t| crate::store::accounts::now_ms() - t);
            tracing::info!(room_id = %room.room_id, members, finish_phase_ms = ?phase_ms, "resync complete: room has full state");
            Ok(Step::Done)
        }
        other => Err(Error::internal(format!("unknown resync phase {other}"))),
    }
}

/// Fills the partial base group with the fetched state (descendant groups are deltas over it, so they see the
/// new entries too), rebuilds membership from the current state and clears the partial flag. One transaction.
fn finish(
    w: &mut crate::store::Writer<'_>,
    identity: &crate::room::Identity,
    room_nid: i64,
    sg: i64,
    join_event: &str,
) -> Result<i64> {
    let conn = w.conn;
    conn.execute("UPDATE state_groups SET partial = 0 WHERE sg = ?1", [sg])?;
    conn.execute("UPDATE rooms SET partial_state = 0 WHERE room_nid = ?1", [room_nid])?;
    let flipped = reauthorise_since_join(conn, room_nid, join_event)?;
    if flipped > 0 {
        tracing::info!(room_nid, flipped, "resync: events received while partial changed auth outcome");
    }
    // Memberships touched since the join may have changed with the re-authorisation: re-read them from the
    // current state (the rest were written by the fill phase).
    let room = rooms::room_by_nid(conn, RoomNid(room_nid))?.ok_or_else(|| Error::internal("room vanished"))?;
    let current = room.current_sg.ok_or_else(|| Error::internal("room without current state"))?;
    let since = events::event_by_id(conn, join_event)?.and_then(|r| r.stream_ordering).map_or(0, |p| p.0);
    let touched: Vec<(String, StateKeyNid)> = {
        let mut stmt = conn.prepare(
            "SELECT DISTINCT k.state_key, k.state_key_nid FROM events e JOIN state_keys k ON k.state_key_nid = e.state_key_nid
             WHERE e.room_nid = ?1 AND e.stream_ordering >= ?2 AND k.event_type = 'm.room.member'",
        )?;
        let rows = stmt.query_map(params![room_nid, since], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    for (user, skn) in touched {
        if let Some(nid) = state_groups::lookup_state(conn, current, skn)? {
            if members::membership_of(conn, RoomNid(room_nid), &user)?.map(|m| m.1) != Some(nid) {
                crate::room::append::apply_membership(w, identity, RoomNid(room_nid), &user, nid)?;
            }
        }
    }
    let told = announce_devices_to_new_servers(w.conn, identity, room_nid, since)?;
    if told > 0 {
        tracing::info!(room_nid, told, "resync: device list updates sent to servers learned from the full state");
    }
    let conn = w.conn;
    conn.execute("DELETE FROM partial_state_servers WHERE room_nid = ?1", [room_nid])?;
    conn.execute("DELETE FROM resync_state WHERE room_nid = ?1", [room_nid])?;
    let (joined, _) = members::member_counts(conn, RoomNid(room_nid))?;
    // Local members see the room (again) as newly joined, so eager /sync delivers it with full state now.
    let locals: Vec<(String, EventNid)> = {
        let mut stmt = conn.prepare_cached(
            "SELECT user_id, event_nid FROM room_members WHERE room_nid = ?1 AND membership = 'join'",
        )?;
        let rows = stmt.query_map([room_nid], |r| Ok((r.get::<_, String>(0)?, r.get::<_, EventNid>(1)?)))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()?.into_iter().filter(|(u, _)| identity.is_local_user(u)).collect()
    };
    for (user, nid) in locals {
        let pos = w.next_stream();
        members::record_local_membership(w.conn, StreamPos(pos), &user, RoomNid(room_nid), "join", nid)?;
    }
    Ok(joined)
}

/// While partial, local users' device list changes went to the servers in `servers_in_room` only. Servers that the
/// full state shows in the room but that were not on that list missed them (MSC3902): each gets an update for every
/// device of each local member whose device list changed since the join. Returns the EDUs queued. Runs before the
/// room's `partial_state_servers` rows are dropped.
fn announce_devices_to_new_servers(
    conn: &rusqlite::Connection,
    identity: &crate::room::Identity,
    room_nid: i64,
    since: i64,
) -> Result<usize> {
    let ours = identity.server_name.as_str();
    let new_servers: Vec<String> = {
        let mut stmt = conn.prepare(
            "SELECT DISTINCT server_name FROM room_members WHERE room_nid = ?1 AND membership = 'join'
             AND server_name != ?2
             AND server_name NOT IN (SELECT server_name FROM partial_state_servers WHERE room_nid = ?1)",
        )?;
        let rows = stmt.query_map(params![room_nid, ours], |r| r.get(0))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    if new_servers.is_empty() {
        return Ok(0);
    }
    let changed: Vec<(String, i64)> = {
        let mut stmt = conn.prepare(
            "SELECT m.user_id, max(d.stream_ordering) FROM room_members m
             JOIN device_list_stream d ON d.user_id = m.user_id AND d.stream_ordering > ?2
             WHERE m.room_nid = ?1 AND m.membership = 'join' AND m.server_name = ?3 GROUP BY m.user_id",
        )?;
        let rows = stmt.query_map(params![room_nid, since, ours], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    let mut queued = 0;
    for (user, pos) in changed {
        for device in crate::store::accounts::list_devices(conn, &user)? {
            let edu = crate::store::e2ee::device_update_edu(conn, &user, &device.device_id, pos)?.to_string();
            for server in &new_servers {
                crate::store::outbox::enqueue_edu(conn, server, &edu)?;
                queued += 1;
            }
        }
    }
    Ok(queued)
}

/// Fetched state events auth-checked per step.
const AUTH_CHUNK: i64 = 1000;

/// Those of `ids` (stored events) that their own auth events do not allow, with the reason. Already rejected ones
/// are skipped.
fn rejections(conn: &rusqlite::Connection, room: &rooms::RoomRow, ids: &[String]) -> Result<Vec<(String, String)>> {
    let rules = crate::room::version::rules(&room.version)?;
    let cache = crate::room::remote::AuthCache::default();
    let mut out = Vec::new();
    for id in ids {
        let Some(pdu) = crate::room::load_pdu_with(conn, id, &rules)? else { continue };
        if pdu.rejected {
            continue;
        }
        // An auth event we could not get is no ground to reject: the event stays unjudged (logged), as listed.
        if let Some(lacking) = pdu.auth_events.iter().find(|a| cache.load(conn, &rules, a.as_str()).is_none()) {
            tracing::info!(event_id = id, %lacking, "resync: state event not auth-checked: an auth event is unavailable");
            continue;
        }
        if let Err(reason) = crate::room::remote::authorize_by_own_auth_events(conn, &rules, room, &pdu, &cache) {
            out.push((id.clone(), reason));
        }
    }
    Ok(out)
}

/// Rows of the fetched state written per fill step.
const FILL_CHUNK: i64 = 2000;

/// One fill step: adds the next chunk of fetched state to the partial base group (descendant groups are deltas
/// over it, so they see it too) and brings `room_members` up to date for those keys. Returns the last event id
/// handled (None when done) and the rows handled.
fn fill_chunk(
    w: &mut crate::store::Writer<'_>,
    identity: &crate::room::Identity,
    room_nid: i64,
    sg: i64,
    after: &str,
) -> Result<(Option<String>, usize)> {
    let conn = w.conn;
    let rows: Vec<(String, StateKeyNid, EventNid, String, String)> = {
        let mut stmt = conn.prepare_cached(
            "SELECT r.event_id, e.state_key_nid, e.event_nid, k.event_type, k.state_key FROM resync_state r
             JOIN events e ON e.event_id = r.event_id JOIN state_keys k ON k.state_key_nid = e.state_key_nid
             WHERE r.room_nid = ?1 AND r.event_id > ?2 AND e.rejected IS NULL ORDER BY r.event_id LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![room_nid, after, FILL_CHUNK], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    let Some(last) = rows.last().map(|r| r.0.clone()) else { return Ok((None, 0)) };
    let current = rooms::room_by_nid(conn, RoomNid(room_nid))?.and_then(|r| r.current_sg);
    {
        // What the resident sent at join time stays authoritative for the keys we already hold.
        let mut ins = conn.prepare_cached(
            "INSERT OR IGNORE INTO state_group_entries (sg, state_key_nid, event_nid) VALUES (?1, ?2, ?3)",
        )?;
        for (_, skn, nid, _, _) in &rows {
            ins.execute(params![sg, skn, nid])?;
        }
    }
    let n = rows.len();
    for (_, skn, _, kind, user) in rows {
        if kind != "m.room.member" {
            continue;
        }
        let Some(current) = current else { continue };
        if let Some(nid) = state_groups::lookup_state(w.conn, current, skn)? {
            if members::membership_of(w.conn, RoomNid(room_nid), &user)?.map(|m| m.1) != Some(nid) {
                crate::room::append::apply_membership(w, identity, RoomNid(room_nid), &user, nid)?;
            }
        }
    }
    Ok((Some(last), n))
}

/// Keeps the forward extremities right when an event's auth outcome flipped: a newly accepted event without
/// accepted children becomes an extremity in place of its prev events (rejected events never became one, so its
/// state would otherwise never reach the current state); a newly rejected one stops being one, and its prev
/// events without other accepted children take its place.
fn fix_extremities(
    conn: &rusqlite::Connection,
    room_nid: i64,
    row: &events::EventRow,
    pdu: &crate::room::Pdu,
    accepted: bool,
) -> Result<()> {
    let has_accepted_child = |id: &str, except: EventNid| -> Result<bool> {
        Ok(conn
            .prepare_cached(
                "SELECT 1 FROM event_edges x JOIN events e ON e.event_nid = x.event_nid
                 WHERE x.prev_event_id = ?1 AND e.room_nid = ?2 AND e.event_nid != ?3 AND e.rejected IS NULL AND e.outlier = 0",
            )?
            .exists(params![id, room_nid, except])?)
    };
    let prev_nids: Vec<EventNid> =
        pdu.prev_events.iter().filter_map(|p| events::event_nid(conn, p.as_str()).ok().flatten()).collect();
    if accepted {
        if !has_accepted_child(&row.event_id, row.event_nid)? {
            events::replace_extremities(conn, RoomNid(room_nid), &prev_nids, row.event_nid)?;
        }
    } else {
        conn.execute(
            "DELETE FROM forward_extremities WHERE room_nid = ?1 AND event_nid = ?2",
            params![room_nid, row.event_nid],
        )?;
        for p in &pdu.prev_events {
            let Some(prev) = events::event_by_id(conn, p.as_str())? else { continue };
            if prev.rejected.is_none() && !prev.outlier && !has_accepted_child(p.as_str(), row.event_nid)? {
                conn.execute(
                    "INSERT OR IGNORE INTO forward_extremities (room_nid, event_nid) VALUES (?1, ?2)",
                    params![room_nid, prev.event_nid],
                )?;
            }
        }
    }
    Ok(())
}

/// Replays the events received while the room was partial, in stream order, against the now complete state:
/// re-authorises each (rejections may flip both ways), rebuilds their state groups and the current state.
/// Returns how many events changed outcome. Bounded by the events since the join (usually few).
fn reauthorise_since_join(conn: &rusqlite::Connection, room_nid: i64, join_event: &str) -> Result<usize> {
    use crate::room::append::authorize;
    use crate::room::{pdu_from_row, state, version};
    let room = rooms::room_by_nid(conn, RoomNid(room_nid))?.ok_or_else(|| Error::internal("room vanished"))?;
    let rules = version::rules(&room.version)?;
    let Some(join) = events::event_by_id(conn, join_event)? else { return Ok(0) };
    let since = join.stream_ordering.map_or(i64::MAX, |p| p.0);
    let rows: Vec<events::EventRow> = {
        let mut stmt = conn.prepare(&format!(
            "SELECT {} FROM events WHERE room_nid = ?1 AND stream_ordering > ?2 AND outlier = 0 ORDER BY stream_ordering",
            events::EVENT_COLS
        ))?;
        let rows = stmt.query_map(params![room_nid, since], events::event_row)?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    let mut flipped = 0;
    for row in rows {
        let pdu = pdu_from_row(conn, &row)?;
        let mut groups = Vec::new();
        for p in &pdu.prev_events {
            if let Some(prev) = events::event_by_id(conn, p.as_str())? {
                if let Some(g) = prev.sg_after {
                    groups.push(g);
                }
            }
        }
        let Some(sg_before) = (if groups.is_empty() {
            None
        } else {
            Some(state::resolve_groups(conn, RoomNid(room_nid), &room.version, &groups)?)
        }) else {
            continue;
        };
        let verdict = authorize(conn, &rules, &pdu, Some(sg_before)).err();
        if verdict.is_some() != row.rejected.is_some() {
            flipped += 1;
        }
        let sg_after = match (row.state_key_nid, &verdict) {
            (Some(skn), None) => {
                state::new_group(conn, RoomNid(room_nid), Some(sg_before), &[(skn, Some(row.event_nid))])?
            }
            _ => sg_before,
        };
        conn.execute(
            "UPDATE events SET rejected = ?2, sg_after = ?3 WHERE event_nid = ?1",
            params![row.event_nid, verdict, sg_after],
        )?;
        if verdict.is_some() != row.rejected.is_some() {
            fix_extremities(conn, room_nid, &row, &pdu, verdict.is_none())?;
        }
    }
    // Current state from the forward extremities' (possibly new) groups. An extremity rejected just now still
    // counts: its group is now the state before it, without it (skipping it would keep the stale current state).
    let mut groups = Vec::new();
    for nid in events::forward_extremities(conn, RoomNid(room_nid))? {
        if let Some(r) = events::event_by_nid(conn, nid)? {
            if let Some(g) = r.sg_after {
                groups.push(g);
            }
        }
    }
    if !groups.is_empty() {
        let current = state::resolve_groups(conn, RoomNid(room_nid), &room.version, &groups)?;
        rooms::set_current_sg(conn, RoomNid(room_nid), current)?;
    }
    Ok(flipped)
}
