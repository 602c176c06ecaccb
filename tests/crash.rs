//! Crash safety: SIGKILL the real binary while clients are sending; every event acknowledged with 200 must be there
//! after a restart, and the database must pass `PRAGMA integrity_check`.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use reqwest::Method;

const SENDERS: usize = 4;
const ROUNDS: usize = 3;
/// Acknowledged events per round before the kill.
const PER_ROUND: usize = 300;

/// What a sender got a 200 for.
#[derive(Clone, Debug)]
struct Acked {
    room: String,
    event_id: String,
    event_type: String,
    body: String,
}

fn integrity_check(db: &Path, flags: rusqlite::OpenFlags) {
    let conn = rusqlite::Connection::open_with_flags(db, flags).expect("open database");
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    let result: Vec<String> = conn
        .prepare("PRAGMA integrity_check")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(result, ["ok"], "integrity_check");
    let fk: Vec<String> = conn
        .prepare("PRAGMA foreign_key_check")
        .unwrap()
        .query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(fk.is_empty(), "foreign key violations in tables {fk:?}");
}

/// One sender: messages (and every fifth request a state event) until the server dies.
async fn sender(c: Client, rooms: Vec<String>, acked: Arc<Mutex<Vec<Acked>>>, tag: String) {
    let deadline = Instant::now() + Duration::from_secs(120);
    for i in 0u64.. {
        assert!(Instant::now() < deadline, "the server was never killed");
        let room = &rooms[i as usize % rooms.len()];
        let body = format!("{tag}-{i}");
        let txn = c.next_txn();
        let (event_type, path, content) = if i % 5 == 4 {
            (
                "org.example.status",
                format!("/rooms/{}/state/org.example.status/{}", enc(room), enc(&c.user_id)),
                json!({"body": body}),
            )
        } else {
            (
                "m.room.message",
                format!("/rooms/{}/send/m.room.message/{}", enc(room), enc(&txn)),
                json!({"msgtype": "m.text", "body": body}),
            )
        };
        match c.try_request(Method::PUT, &path, Some(&content)).await {
            Ok(r) if r.status == 200 => {
                let event_id = r.body["event_id"].as_str().expect("event_id").to_owned();
                acked.lock().unwrap().push(Acked { room: room.clone(), event_id, event_type: event_type.into(), body });
            }
            Ok(r) => panic!("unexpected answer while sending: {} {}", r.status, r.text),
            Err(_) => break, // the server is gone
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_events_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("hearth.db");
    let env = [("HEARTH_REGISTRATION__ENABLED", "true"), ("HEARTH_LIMITS__MESSAGES_PER_SECOND", "100000")];

    let mut server = BinServer::start(&db, &env).await;
    let mut clients = Vec::new();
    for i in 0..SENDERS {
        let mut c = server.client();
        c.register(&format!("sender{i}"), PASSWORD).await.ok();
        clients.push(c);
    }
    // Two rooms of different versions, everyone in both and allowed to send state.
    let pl = json!({"state_default": 0});
    let rooms = vec![
        clients[0].create_room(json!({"preset": "public_chat", "power_level_content_override": pl})).await,
        clients[0]
            .create_room(json!({"preset": "public_chat", "room_version": "10", "power_level_content_override": pl}))
            .await,
    ];
    for c in &clients[1..] {
        for r in &rooms {
            c.join(r).await.ok();
        }
    }

    let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
    for round in 0..ROUNDS {
        let before = acked.lock().unwrap().len();
        let tasks: Vec<_> = clients
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let c = c.at(&server.base_url);
                tokio::spawn(sender(c, rooms.clone(), acked.clone(), format!("r{round}s{i}")))
            })
            .collect();
        // Let them get going, then kill the server in the middle of the stream.
        let t0 = Instant::now();
        while acked.lock().unwrap().len() < before + PER_ROUND && t0.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server.kill();
        for t in tasks {
            t.await.expect("sender task");
        }
        let now = acked.lock().unwrap().len();
        assert!(
            now >= before + PER_ROUND,
            "round {round}: only {} events were acknowledged before the kill",
            now - before
        );
        println!("round {round}: killed with {} events acknowledged in this round", now - before);

        // The killed server's files pass the integrity check (the WAL is recovered on open).
        integrity_check(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE);

        server = BinServer::start(&db, &env).await;
        let reader = clients[0].at(&server.base_url);
        let all = acked.lock().unwrap().clone();
        for a in &all {
            let r = reader.event(&a.room, &a.event_id).await;
            assert_eq!(r.status, 200, "acknowledged event {} ({}) lost after SIGKILL: {}", a.event_id, a.body, r.text);
            assert_eq!(r.body["type"], a.event_type.as_str());
            assert_eq!(r.body["content"]["body"], a.body.as_str());
        }
        // /messages sees them too, in a consistent order (no duplicates, nothing missing).
        for room in &rooms {
            let mut seen = std::collections::HashSet::new();
            let mut from: Option<String> = None;
            loop {
                let mut params = vec![("dir", "b"), ("limit", "500")];
                if let Some(f) = &from {
                    params.push(("from", f));
                }
                let page = reader.messages(room, &params).await.ok();
                for e in page["chunk"].as_array().unwrap() {
                    assert!(seen.insert(e["event_id"].as_str().unwrap().to_owned()), "duplicate event in /messages");
                }
                match page["end"].as_str() {
                    Some(e) => from = Some(e.to_owned()),
                    None => break,
                }
            }
            for a in all.iter().filter(|a| &a.room == room) {
                assert!(seen.contains(&a.event_id), "{} missing from /messages", a.event_id);
            }
        }
        // While the restarted server runs, a read-only look agrees.
        integrity_check(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY);
        // And the rooms still take new events on top of what survived.
        for r in &rooms {
            reader.send_text(r, &format!("after restart {round}")).await;
        }
    }
    server.kill();
    integrity_check(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE);
}
