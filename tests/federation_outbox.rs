//! The outbound federation queue towards a server that stops answering: after a failure nothing more is
//! queued for it (a room shared with thousands of dead servers must not cost a row per server per event), and when
//! it answers again it gets our latest event in the room, then everything new as usual. And servers that do not
//! answer never hold up one that does.

mod common;

use std::time::Duration;

use common::fake_resident::*;
use common::*;

const LONG: Duration = Duration::from_secs(60);

/// PDU rows queued for `destination` in Hearth's outbox (read straight from the database file).
fn queued_pdus(hearth: &TestServer, destination: &str) -> i64 {
    let conn = rusqlite::Connection::open(&hearth.db_path).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.query_row("SELECT count(*) FROM outbox WHERE destination = ?1 AND kind = 'pdu'", [destination], |r| r.get(0))
        .unwrap()
}

fn catching_up(hearth: &TestServer, destination: &str) -> bool {
    let conn = rusqlite::Connection::open(&hearth.db_path).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.query_row(
        "SELECT count(*) FROM destinations WHERE destination = ?1 AND catch_up_from IS NOT NULL",
        [destination],
        |r| r.get::<_, i64>(0),
    )
    .unwrap()
        > 0
}

fn bodies_received(fake: &FakeResident) -> Vec<String> {
    fake.received().iter().filter_map(|(_, p)| p["content"]["body"].as_str().map(str::to_owned)).collect()
}

/// A Hearth whose backoff after a failed transaction starts at `retry_base_ms`, with Alice joined (resync done) to
/// the fake resident's room.
async fn joined_with_backoff(retry_base_ms: u64) -> (FakeResident, TestServer, Client, String) {
    let fake = FakeResident::start(RoomSpec::default()).await;
    let hearth = start_hearth_with_fakes(&[&fake], |c| c.federation.retry_base_ms = retry_base_ms).await;
    let alice = hearth.user("alice").await;
    let room = fake.room_id();
    join_via(&alice, &fake).await;
    within(LONG, alice.get(&format!("/rooms/{}/joined_members", enc(&room)))).await.expect("resynced").ok();
    (fake, hearth, alice, room)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_keeps_failing_catches_up_with_the_latest_event_when_it_returns() {
    let (fake, hearth, alice, room) = joined_with_backoff(50).await;

    // The resident stops accepting transactions.
    fake.script("send", Script::json(500, json!({"errcode": "M_UNKNOWN", "error": "down"})));
    let sends_before = fake.count("send");
    alice.send_text(&room, "one").await;
    // A failed attempt puts it into catch-up (as Synapse), which drops its queue.
    fake.wait_requests("send", sends_before + 1, LONG).await;
    wait_for("the destination goes into catch-up", LONG, || catching_up(&hearth, &fake.name)).await;
    assert_eq!(queued_pdus(&hearth, &fake.name), 0, "a failing server's queue is dropped");

    // While it is down nothing is queued for it.
    alice.send_text(&room, "two").await;
    let three = alice.send_text(&room, "three").await;
    assert_eq!(queued_pdus(&hearth, &fake.name), 0, "nothing queued for a server catching up");

    // Back up: the next retry (at most 800 ms later) sends the latest event in the room, not the backlog.
    fake.unscript("send");
    let pdu = fake.wait_received(&three, LONG).await;
    assert_eq!(pdu["content"]["body"], "three");
    let got = bodies_received(&fake);
    assert!(!got.contains(&"two".to_owned()), "only the latest event is sent on catch-up: {got:?}");
    wait_for("the destination leaves catch-up once it answered", LONG, || !catching_up(&hearth, &fake.name)).await;

    // And it is an ordinary destination again: new events reach it at once.
    let started = std::time::Instant::now();
    let four = alice.send_text(&room, "four").await;
    fake.wait_received(&four, Duration::from_secs(10)).await;
    eprintln!("after catch-up, a new message reached the server in {:?}", started.elapsed());
    wait_for("the delivered event leaves the queue", LONG, || queued_pdus(&hearth, &fake.name) == 0).await;
    hearth.stop().await;
}

/// The resident refuses transactions from now on (500); `body` is sent and its transaction refused. Its event id.
async fn send_while_refused(fake: &FakeResident, alice: &Client, room: &str, body: &str) -> String {
    fake.script("send", Script::json(500, json!({"errcode": "M_UNKNOWN", "error": "down"})));
    let sends_before = fake.count("send");
    let id = alice.send_text(room, body).await;
    fake.wait_requests("send", sends_before + 1, LONG).await;
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_calls_us_ends_its_backoff_and_gets_its_queue_at_once() {
    // One failure backs off for two minutes.
    let (fake, hearth, alice, room) = joined_with_backoff(60_000).await;

    let held = send_while_refused(&fake, &alice, &room, "held back").await;
    fake.unscript("send");

    // The server is back and sends us something (any signed request): our queue goes to it now, not in two minutes.
    let started = std::time::Instant::now();
    let news = fake.append(EventSpec::message(&fake.creator(), "I am back"));
    assert_eq!(fake.push(&[&news.id]).await[&news.id], json!({}));
    let pdu = fake.wait_received(&held, Duration::from_secs(20)).await;
    assert_eq!(pdu["content"]["body"], "held back");
    eprintln!("the held event reached the server {:?} after it called us", started.elapsed());
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_answers_our_request_ends_its_backoff() {
    // One failure backs off for two minutes.
    let (fake, hearth, alice, room) = joined_with_backoff(60_000).await;
    send_while_refused(&fake, &alice, &room, "held back").await;
    wait_for("the destination backs off", LONG, || catching_up(&hearth, &fake.name)).await;
    fake.unscript("send");

    // Alice leaves and joins again: the join goes through the resident (make_join, send_join), which answers. It
    // never calls us, yet it is up: what Alice sends next reaches it now, not when the two minutes are over (as
    // Synapse, which resets a destination's backoff on any successful request to it).
    alice.leave(&room).await.ok();
    join_via(&alice, &fake).await;
    let started = std::time::Instant::now();
    let after = alice.send_text(&room, "after the rejoin").await;
    let pdu = fake.wait_received(&after, Duration::from_secs(20)).await;
    assert_eq!(pdu["content"]["body"], "after the rejoin");
    eprintln!("the message reached the server {:?} after the rejoin", started.elapsed());
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_to_a_server_that_answers_does_not_wait_behind_hundreds_that_do_not() {
    // A room the resident says is shared with 300 other servers (as a big room is), none of which answers: each
    // accepts the connection and then says nothing, so every attempt to reach one hangs until our connect timeout.
    let blackhole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole = blackhole.local_addr().unwrap().to_string();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = blackhole.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(stream);
        }
    });
    let silent: Vec<String> = (0..300).map(|i| format!("silent{i}.example")).collect();
    let fake = FakeResident::start(RoomSpec::default()).await;
    let mut in_room = silent.clone();
    in_room.push(fake.name.clone());
    fake.set_servers_in_room(Some(in_room));
    let entries: Vec<(String, String)> = silent.iter().map(|s| (s.clone(), hole.clone())).collect();
    let hearth = start_hearth_with_fakes(&[&fake], |c| c.federation.resolve.extend(entries)).await;
    let alice = hearth.user("alice").await;
    let room = fake.room_id();

    // A first message goes out to all 301 servers; the 300 silent ones hold their connections (the sender tries
    // at most 128 destinations of a kind at once, the rest wait their turn).
    join_via(&alice, &fake).await;
    let first = alice.send_text(&room, "first").await;
    fake.wait_received(&first, LONG).await;
    wait_for("the fan-out reaching the silent servers", LONG, || {
        accepted.load(std::sync::atomic::Ordering::SeqCst) >= 100
    })
    .await;

    // A second message, sent while those attempts hang, reaches the resident (which answered us a moment ago) at
    // once: it does not wait for a turn behind the silent servers still queued.
    let second = alice.send_text(&room, "second, while others hang").await;
    let pdu = fake.wait_received(&second, Duration::from_secs(8)).await;
    assert_eq!(pdu["content"]["body"], "second, while others hang");
    hearth.stop().await;
}
