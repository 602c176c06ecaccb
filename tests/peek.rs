//! Peeking into a remote room without joining it (issue #23: MSC2444 over federation, MSC2753 for clients),
//! between two in-process Hearths on loopback, and against a fake server without the peek API (the summary
//! fallback). Each test asserts what the peeking user, or the resident, observes.

mod common;

use std::time::Duration;

use common::fake_resident::*;
use common::*;

const WAIT: Duration = Duration::from_secs(30);
const PEEK: &str = "/_matrix/client/unstable/org.matrix.msc2753";

fn peek_path(room: &str, via: &str) -> String {
    format!("{PEEK}/peek/{}?server_name={}", enc(room), enc(via))
}

fn unpeek_path(room: &str) -> String {
    format!("{PEEK}/rooms/{}/unpeek", enc(room))
}

/// A room of alice's with world-readable history and a message in it.
async fn world_readable_room(alice: &Client) -> String {
    let room = alice
        .create_room(json!({
            "preset": "public_chat",
            "name": "Open house",
            "initial_state": [{"type": "m.room.history_visibility", "state_key": "", "content": {"history_visibility": "world_readable"}}],
        }))
        .await;
    alice.send_text(&room, "before the peek").await;
    room
}

fn bodies(events: &[Value]) -> Vec<String> {
    events.iter().filter_map(|e| e["content"]["body"].as_str().map(str::to_owned)).collect()
}

/// Rows of `sql` (a count) in a server's database.
fn count(server: &TestServer, sql: &str, room: &str) -> i64 {
    let conn =
        rusqlite::Connection::open_with_flags(&server.db_path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.query_row(sql, [room], |r| r.get(0)).unwrap()
}

const PEEKS_IN: &str = "SELECT count(*) FROM peeks_in p JOIN rooms r USING (room_nid) WHERE r.room_id = ?1";
const EVENTS: &str = "SELECT count(*) FROM events e JOIN rooms r USING (room_nid) WHERE r.room_id = ?1";

/// Waits for `text` in the peek section of bob's sync after `since`; returns the next token.
async fn peeked_message(bob: &Client, room: &str, since: &str, text: &str) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut since = since.to_owned();
    loop {
        let s = bob.sync(Some(&since), &[("timeout", "500")]).await.ok();
        since = s["next_batch"].as_str().unwrap().to_owned();
        if bodies(&events_of(&s["rooms"]["peek"][room]["timeline"])).iter().any(|b| b == text) {
            return since;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {text:?} in bob's rooms.peek");
    }
}

/// bob on B peeks alice's world-readable room on A: the room's state and latest message arrive in `rooms.peek`,
/// new messages follow, /messages, /event and /state work, sending is refused and the room is in none of bob's
/// joined rooms; after the unpeek the resident forgets the peek and nothing of the room stays on B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peek_shows_a_remote_room_and_follows_it_until_unpeek() {
    let (a, b) = federated_pair().await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let carol = a.user("carol").await;
    let room = world_readable_room(&alice).await;
    // A member who never speaks (her join is older than the 20 newest events): not part of the peek.
    carol.join(&room).await.ok();
    for i in 0..20 {
        alice.send_text(&room, &format!("filler {i}")).await;
    }
    alice.send_text(&room, "before the peek").await;

    let started = std::time::Instant::now();
    let r = bob.post(&peek_path(&room, &a.server_name), json!({})).await.ok();
    eprintln!("remote peek answered in {:?}", started.elapsed());
    assert_eq!(r["room_id"], room);
    assert!(r.get("summary_only").is_none(), "a real peek, not a summary: {r}");
    assert_eq!(count(&a, PEEKS_IN, &room), 1, "the resident records the peek");
    let carols = "SELECT count(*) FROM events e JOIN rooms r USING (room_nid)
                  WHERE r.room_id = ?1 AND e.event_type = 'm.room.member' AND e.sender LIKE '@carol:%'";
    assert_eq!(count(&b, carols, &room), 0, "members are omitted from the peek as from a lazy join");
    assert!(count(&b, EVENTS, &room) > 0);

    let s = bob.sync(None, &[]).await.ok();
    let peeked = &s["rooms"]["peek"][&room];
    assert_eq!(bodies(&events_of(&peeked["timeline"])), vec!["before the peek"], "{s}");
    let state = events_of(&peeked["state"]);
    assert!(state.iter().any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Open house"), "{peeked}");
    assert!(s["rooms"]["join"].get(&room).is_none(), "not a joined room: {s}");
    let since = s["next_batch"].as_str().unwrap().to_owned();

    alice.send_text(&room, "while peeking").await;
    let since = peeked_message(&bob, &room, &since, "while peeking").await;

    let msgs = bob.messages(&room, &[("dir", "b"), ("limit", "10")]).await.ok();
    assert!(bodies(&events_of(&json!({"events": msgs["chunk"]}))).contains(&"while peeking".to_owned()), "{msgs}");
    let id = msgs["chunk"][0]["event_id"].as_str().unwrap().to_owned();
    assert_eq!(bob.event(&room, &id).await.status, 200);
    assert_eq!(bob.state(&room, "m.room.name", "").await.ok()["name"], "Open house");
    let sent = bob.send(&room, "m.room.message", json!({"msgtype": "m.text", "body": "hi"})).await;
    assert_eq!(sent.status, 403, "a peeker cannot send: {}", sent.body);
    let joined = bob.get("/joined_rooms").await.ok();
    assert_eq!(joined["joined_rooms"], json!([]), "{joined}");

    bob.post(&unpeek_path(&room), json!({})).await.ok();
    wait_for("the resident to forget the peek", WAIT, || count(&a, PEEKS_IN, &room) == 0).await;
    assert_eq!(count(&b, EVENTS, &room), 0, "nothing of the room stays on B");
    let s = bob.sync(Some(&since), &[("timeout", "0")]).await.ok();
    assert!(s["rooms"].get("peek").is_none_or(|p| p.get(&room).is_none()), "{s}");
    alice.send_text(&room, "after the unpeek").await;
    wait_outbox_drained(&a, &[], WAIT).await;
    assert_eq!(count(&b, EVENTS, &room), 0, "no event reaches B after the unpeek");
    assert_eq!(bob.post(&unpeek_path(&room), json!({})).await.status, 404);
}

/// A room whose history is not world-readable cannot be peeked (403), and nothing is left of the attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_that_is_not_world_readable_cannot_be_peeked() {
    let (a, b) = federated_pair().await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    let r = bob.post(&peek_path(&room, &a.server_name), json!({})).await;
    r.assert_err(403, "M_FORBIDDEN");
    assert_eq!(count(&a, PEEKS_IN, &room), 0);
    assert_eq!(count(&b, EVENTS, &room), 0);
}

/// When the room's history stops being world-readable, the resident ends the peeks (after sending the change), and
/// the peeker can no longer read the room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_visibility_change_ends_the_peek() {
    let (a, b) = federated_pair().await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let room = world_readable_room(&alice).await;
    bob.post(&peek_path(&room, &a.server_name), json!({})).await.ok();
    assert_eq!(count(&a, PEEKS_IN, &room), 1);

    alice.put_state(&room, "m.room.history_visibility", "", json!({"history_visibility": "shared"})).await.ok();
    assert_eq!(count(&a, PEEKS_IN, &room), 0, "the resident ended the peek");
    wait_until("the change at B", WAIT, || async {
        (bob.messages(&room, &[("dir", "b")]).await.status == 403).then_some(())
    })
    .await;
    let s = bob.sync(None, &[]).await.ok();
    assert!(s["rooms"].get("peek").is_none_or(|p| p.get(&room).is_none()), "{s}");
}

/// With a short renewal interval, the peek outlives it while bob keeps peeking: the peeking server renews it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peek_is_renewed_while_someone_peeks() {
    let (a, b) = federated_pair_with(|c| c.federation.peek_renewal_ms = 2000).await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let room = world_readable_room(&alice).await;
    bob.post(&peek_path(&room, &a.server_name), json!({})).await.ok();
    let since = bob.sync(None, &[]).await.ok()["next_batch"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(5000)).await;
    let live = "SELECT count(*) FROM peeks_in p JOIN rooms r USING (room_nid)
                WHERE r.room_id = ?1 AND p.expires_ts > CAST(strftime('%s','now') AS INTEGER) * 1000";
    assert_eq!(count(&a, live, &room), 1, "the peek is still alive 2.5 intervals later");
    alice.send_text(&room, "much later").await;
    peeked_message(&bob, &room, &since, "much later").await;
}

/// bob joins a room he peeks: the join goes through the resident and works as any join, the peek ends, and the
/// room stays (with bob in it) rather than being purged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_after_a_peek_keeps_the_room() {
    let (a, b) = federated_pair().await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let room = world_readable_room(&alice).await;
    bob.post(&peek_path(&room, &a.server_name), json!({})).await.ok();
    let r = bob.post(&format!("/join/{}?server_name={}", enc(&room), enc(&a.server_name)), json!({})).await.ok();
    assert_eq!(r["room_id"], room);
    let s = bob.sync(None, &[("filter", r#"{"room":{"state":{"lazy_load_members":true}}}"#)]).await.ok();
    assert!(s["rooms"]["join"].get(&room).is_some(), "joined: {s}");
    assert!(s["rooms"].get("peek").is_none_or(|p| p.get(&room).is_none()), "no longer peeked: {s}");
    wait_for("the resident to forget the peek", WAIT, || count(&a, PEEKS_IN, &room) == 0).await;
    let text = bob.send_text(&room, "hello from b").await;
    wait_until("bob's message at alice", WAIT, || async {
        (alice.event(&room, &text).await.status == 200).then_some(())
    })
    .await;
}

/// Limits: with one peek allowed per server, B's second room is refused (429, passed on to the client) and the
/// resident holds one peek.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peeks_per_server_are_limited() {
    let (a, b) = federated_pair_with(|c| c.federation.peek_max_per_server = 1).await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let first = world_readable_room(&alice).await;
    let second = world_readable_room(&alice).await;
    bob.post(&peek_path(&first, &a.server_name), json!({})).await.ok();
    let r = bob.post(&peek_path(&second, &a.server_name), json!({})).await;
    r.assert_err(429, "M_LIMIT_EXCEEDED");
    assert_eq!(count(&a, PEEKS_IN, &first), 1);
    assert_eq!(count(&a, PEEKS_IN, &second), 0);
}

/// Against a server without the peek API (it answers 404 M_UNRECOGNIZED), the peek answers the room's summary
/// from federation /hierarchy, marked as such, and records no peek.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_peek_api_a_summary_is_answered() {
    let hearth = start_hearth().await;
    let fake = FakeResident::start(RoomSpec::default()).await;
    fake.connect_to(&hearth);
    let room = fake.room_id();
    fake.script(
        "hierarchy",
        Script::json(
            200,
            json!({"room": {"room_id": room, "world_readable": true, "guest_can_join": false,
                "num_joined_members": 7, "name": "Elsewhere", "join_rule": "public", "children_state": []},
                "children": [], "inaccessible_children": []}),
        ),
    );
    let bob = hearth.user("bob").await;
    let r = bob.post(&peek_path(&room, &fake.name), json!({})).await.ok();
    assert_eq!(r["summary_only"], true, "{r}");
    assert_eq!(r["summary"]["name"], "Elsewhere");
    assert_eq!(r["summary"]["num_joined_members"], 7);
    let s = bob.sync(None, &[]).await.ok();
    assert!(s["rooms"].get("peek").is_none(), "{s}");
}

/// A local user peeks a room of their own server: no federation involved, the room shows under `rooms.peek` and
/// follows new messages; the unpeek leaves the room (which has members here) untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_room_is_peeked_without_federation() {
    let (a, _b) = federated_pair().await;
    let alice = a.user("alice").await;
    let dave = a.user("dave").await;
    let room = world_readable_room(&alice).await;
    let r = dave.post(&peek_path(&room, &a.server_name), json!({})).await.ok();
    assert_eq!(r["room_id"], room);
    assert_eq!(count(&a, PEEKS_IN, &room), 0, "no federation peek for a local room");
    let s = dave.sync(None, &[]).await.ok();
    assert_eq!(bodies(&events_of(&s["rooms"]["peek"][&room]["timeline"])), vec!["before the peek"], "{s}");
    let since = s["next_batch"].as_str().unwrap().to_owned();
    alice.send_text(&room, "for dave").await;
    peeked_message(&dave, &room, &since, "for dave").await;
    dave.post(&unpeek_path(&room), json!({})).await.ok();
    let s = dave.sync(None, &[]).await.ok();
    assert!(s["rooms"].get("peek").is_none(), "{s}");
    assert!(count(&a, EVENTS, &room) > 0, "the room stays");
    assert_eq!(alice.messages(&room, &[("dir", "b")]).await.status, 200);
}

/// Sliding sync (what Element X uses) shows a peeked room when the client subscribes to it by id, marked as peeked
/// and in none of its lists, with its timeline live; after the unpeek the subscription shows nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sliding_sync_shows_a_peeked_room_through_a_subscription() {
    const SS: &str = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync";
    let (a, b) = federated_pair().await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let room = world_readable_room(&alice).await;
    let body = json!({
        "lists": {"all": {"ranges": [[0, 10]], "timeline_limit": 1}},
        "room_subscriptions": {room.clone(): {"timeline_limit": 5, "required_state": [["m.room.name", ""]]}},
    });

    // Not peeked yet: a subscription to a room the user has nothing to do with shows nothing.
    let r = bob.post(&format!("{SS}?timeout=0"), body.clone()).await.ok();
    assert!(r["rooms"].get(&room).is_none(), "{r}");

    bob.post(&peek_path(&room, &a.server_name), json!({})).await.ok();
    let r = bob.post(&format!("{SS}?timeout=0"), body.clone()).await.ok();
    let shown = &r["rooms"][&room];
    assert_eq!(shown["org.matrix.msc2753.peeking"], true, "{r}");
    assert_eq!(bodies(shown["timeline"].as_array().unwrap()), vec!["before the peek"], "{shown}");
    let state = shown["required_state"].as_array().unwrap();
    assert!(state.iter().any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Open house"), "{shown}");
    assert_eq!(r["lists"]["all"]["count"], 0, "a peeked room is in no list: {r}");
    let pos = r["pos"].as_str().unwrap().to_owned();

    alice.send_text(&room, "while peeking").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut pos = pos;
    loop {
        let r = bob.post(&format!("{SS}?timeout=500&pos={}", enc(&pos)), body.clone()).await.ok();
        pos = r["pos"].as_str().unwrap().to_owned();
        let timeline = r["rooms"][&room]["timeline"].as_array().cloned().unwrap_or_default();
        if bodies(&timeline).iter().any(|b| b == "while peeking") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the new message never reached the subscription");
    }

    bob.post(&unpeek_path(&room), json!({})).await.ok();
    let r = bob.post(&format!("{SS}?timeout=0"), body).await.ok();
    assert!(r["rooms"].get(&room).is_none(), "after the unpeek: {r}");
}

/// Peeking something that is not a room id or alias is a 400; unpeeking a room nobody peeks is a 404.
#[tokio::test]
async fn bad_peek_requests_get_matrix_errors() {
    let s = TestServer::start().await;
    let bob = s.user("bob").await;
    let r = bob.post(&format!("{PEEK}/peek/not-a-room"), json!({})).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(r.body["errcode"].as_str().is_some_and(|e| e.starts_with("M_")), "{}", r.text);
    bob.post(&unpeek_path("!nothing:localhost"), json!({})).await.assert_err(404, "M_NOT_FOUND");
}
