//! Fault soak: the real binary is SIGKILLed at random moments while two clients send into a local room and into
//! rooms joined lazily from a scripted remote server (tests/common/fake_resident.rs), whose member lists are being
//! resynced by the job queue; every fifth kill a new lazy join starts another resync. After each kill:
//! `PRAGMA integrity_check` and `foreign_key_check` pass, the restarted server has every event acknowledged since the
//! last kill (and a sample of older ones), and every room still partial has its resync job queued. At the end every
//! resync completes with the remote room's full member list, the remote server has received every event we
//! acknowledged in its rooms (the outbound federation queue delivered what it owed), and all acknowledged events
//! are there.
//!
//! The normal test run does 6 kills. The soak (documented in README.md):
//!
//! ```sh
//! HEARTHTEST_SOAK_KILLS=50 cargo test --test fault_soak -- --nocapture
//! ```
//!
//! `HEARTHTEST_SOAK_SEED=N` repeats a run's kill timings (the seed is printed).

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::fake_resident::*;
use common::*;
use rand::{Rng, SeedableRng};
use reqwest::Method;

const LONG: Duration = Duration::from_secs(90);

#[derive(Clone, Debug)]
struct Acked {
    room: String,
    event_id: String,
    body: String,
    /// Index into the fakes when the room is a remote (lazily joined) one.
    remote: Option<usize>,
}

fn checks(db: &Path) {
    let conn = rusqlite::Connection::open(db).expect("open database");
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
    // The job queue still holds the resync of every room whose member list is incomplete.
    let orphans: i64 = conn
        .query_row(
            "SELECT count(*) FROM rooms r WHERE r.partial_state = 1
             AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.room_nid = r.room_nid)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(orphans, 0, "a partial-state room lost its resync job");
}

fn partial_rooms(db: &Path) -> i64 {
    let conn = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn.query_row("SELECT count(*) FROM rooms WHERE partial_state = 1", [], |r| r.get(0)).unwrap()
}

/// Sends until the server dies: messages into `rooms` in turn, every fourth one a state event in a local room.
async fn sender(c: Client, rooms: Vec<(String, Option<usize>)>, acked: Arc<Mutex<Vec<Acked>>>, tag: String) {
    let deadline = Instant::now() + Duration::from_secs(120);
    for i in 0u64.. {
        assert!(Instant::now() < deadline, "the server was never killed");
        let (room, remote) = rooms[i as usize % rooms.len()].clone();
        let body = format!("{tag}-{i}");
        // State events only where we may send them (the local room); messages everywhere.
        let path = if i % 4 == 3 && remote.is_none() {
            format!("/rooms/{}/state/org.example.soak/{}", enc(&room), enc(&c.user_id))
        } else {
            format!("/rooms/{}/send/m.room.message/{}", enc(&room), enc(&c.next_txn()))
        };
        match c.try_request(Method::PUT, &path, Some(&json!({"msgtype": "m.text", "body": body}))).await {
            Ok(r) if r.status == 200 => {
                let event_id = r.body["event_id"].as_str().expect("event_id").to_owned();
                acked.lock().unwrap().push(Acked { room, event_id, body, remote });
            }
            Ok(r) => panic!("unexpected answer while sending: {} {}", r.status, r.text),
            Err(_) => break, // killed
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_soak_with_lazy_joins() {
    let kills: usize = std::env::var("HEARTHTEST_SOAK_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(6);
    let seed: u64 =
        std::env::var("HEARTHTEST_SOAK_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(rand::random);
    println!("fault soak: {kills} kills, HEARTHTEST_SOAK_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("hearth.db");
    let (crt, key) = self_signed_cert(dir.path());
    let fed_port = free_port().to_string();
    let (crt, key) = (crt.display().to_string(), key.display().to_string());
    let env = [
        ("HEARTH_REGISTRATION__ENABLED", "true"),
        ("HEARTH_LIMITS__MESSAGES_PER_SECOND", "100000"),
        ("HEARTH_LIMITS__MESSAGES_BURST", "100000"),
        ("HEARTH_FEDERATION__ENABLED", "true"),
        ("HEARTH_LISTEN__FEDERATION", &format!("127.0.0.1:{fed_port}")),
        ("HEARTH_FEDERATION__TLS_CERT", &crt),
        ("HEARTH_FEDERATION__TLS_KEY", &key),
        ("HEARTH_FEDERATION__VERIFY_CERTIFICATES", "false"),
        ("HEARTH_FEDERATION__ALLOW_PRIVATE_IPS", "true"),
        ("HEARTH_FEDERATION__TRUSTED_KEY_SERVERS", "[]"),
    ];

    let mut server = BinServer::start(&db, &env).await;
    let mut alice = server.client();
    alice.register("alice", PASSWORD).await.ok();
    let mut bob = server.client();
    bob.register("bob", PASSWORD).await.ok();
    let local =
        alice.create_room(json!({"preset": "public_chat", "power_level_content_override": {"state_default": 0}})).await;
    bob.join(&local).await.ok();

    let mut fakes: Vec<FakeResident> = Vec::new();
    let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
    let mut checked = 0usize;
    let mut killed_while_partial = 0;
    let started = Instant::now();
    for k in 0..kills {
        let (a, b) = (alice.at(&server.base_url), bob.at(&server.base_url));
        if k % 5 == 0 {
            // A new lazy join: its resync waits for /state_ids during two kills, then runs (and is killed at random
            // points: fetching, filling, finishing) during the next ones.
            let fake = FakeResident::start(RoomSpec { members: 500, ..Default::default() }).await;
            fake.hold("state_ids");
            join_via(&a, &fake).await;
            fakes.push(fake);
        } else if k % 5 == 2 {
            fakes.last().unwrap().release("state_ids");
        }
        let remote = fakes.len() - 1;
        let remote_room = (fakes[remote].room_id(), Some(remote));
        let tasks = vec![
            tokio::spawn(sender(a.clone(), vec![(local.clone(), None), remote_room], acked.clone(), format!("k{k}a"))),
            tokio::spawn(sender(b.clone(), vec![(local.clone(), None)], acked.clone(), format!("k{k}b"))),
        ];
        tokio::time::sleep(Duration::from_millis(rng.gen_range(100..1500))).await;
        if partial_rooms(&db) > 0 {
            killed_while_partial += 1;
        }
        server.kill();
        for t in tasks {
            t.await.expect("sender task");
        }
        checks(&db);

        server = BinServer::start(&db, &env).await;
        let reader = alice.at(&server.base_url);
        let all = acked.lock().unwrap().clone();
        let mut sample: Vec<&Acked> = all[checked..].iter().collect();
        for _ in 0..20.min(checked) {
            sample.push(&all[rng.gen_range(0..checked)]);
        }
        for a in sample {
            let r = reader.event(&a.room, &a.event_id).await;
            assert_eq!(r.status, 200, "kill {k}: acknowledged event {} ({}) lost: {}", a.event_id, a.body, r.text);
            assert_eq!(r.body["content"]["body"], a.body.as_str());
        }
        println!("kill {k}: {} events acknowledged in this round, {} in all", all.len() - checked, all.len());
        checked = all.len();
    }

    // Every resync finishes with the full member list; every event acknowledged in a remote room reached it.
    for fake in &fakes {
        fake.release("state_ids");
    }
    let reader = alice.at(&server.base_url);
    for fake in &fakes {
        let room = fake.room_id();
        let joined = within(LONG, reader.get(&format!("/rooms/{}/joined_members", enc(&room))))
            .await
            .unwrap_or_else(|| panic!("the resync of {room} did not finish"))
            .ok();
        let mut expected = fake.joined_members();
        expected.sort();
        assert_eq!(joined_ids(&joined), expected, "member list of {room} after the kills");
    }
    assert_eq!(partial_rooms(&db), 0);
    let all = acked.lock().unwrap().clone();
    for a in all.iter().filter(|a| a.remote.is_some()) {
        fakes[a.remote.unwrap()].wait_received(&a.event_id, LONG).await;
    }
    for a in &all {
        reader.event(&a.room, &a.event_id).await.ok();
    }
    println!(
        "fault soak: {kills} kills survived in {:.0} s ({killed_while_partial} with a resync in progress), {} events acknowledged \
         and present, {} sent to remote rooms and delivered, {} lazy joins completed",
        started.elapsed().as_secs_f64(),
        all.len(),
        all.iter().filter(|a| a.remote.is_some()).count(),
        fakes.len()
    );
    server.kill();
    checks(&db);
}
