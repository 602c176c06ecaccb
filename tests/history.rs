//! History across federation (issue 21): `/messages` in topological order (depth, then stream position), backfill
//! when paging back reaches a gap in our history, tokens that stay valid across pages, and jump-to-date answers
//! from other servers brought into our timeline and judged for the user.

mod common;

use common::fake_resident::*;
use common::*;
use serde_json::{json, Value};

/// Milliseconds since the epoch, a little after the previous call (so events sent between two calls fall between
/// their values).
async fn mark() -> i64 {
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let t = common::fake_resident::now_ms();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    t
}

async fn jump(c: &Client, room: &str, ts: i64, dir: &str) -> Resp {
    c.get(&format!("/_matrix/client/v1/rooms/{}/timestamp_to_event?ts={ts}&dir={dir}", enc(room))).await
}

async fn messages(c: &Client, room: &str, dir: &str, from: Option<&str>, limit: usize) -> Value {
    let from = from.map(|f| format!("&from={}", enc(f))).unwrap_or_default();
    c.get(&format!("/rooms/{}/messages?dir={dir}&limit={limit}{from}", enc(room))).await.ok()
}

fn ids(page: &Value) -> Vec<String> {
    page["chunk"].as_array().unwrap().iter().map(|e| e["event_id"].as_str().unwrap().to_owned()).collect()
}

/// Bodies of the `m.room.message` events of a list of pages' chunks, in order.
fn bodies(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .map(|e| e["content"]["body"].as_str().unwrap().to_owned())
        .collect()
}

/// Pages `dir` from `from` until a page has no `end`; every page's events, in the order given.
async fn page_all(c: &Client, room: &str, dir: &str, from: Option<String>, limit: usize) -> (Vec<Value>, Vec<String>) {
    let (mut events, mut tokens, mut from) = (Vec::new(), Vec::new(), from);
    for _ in 0..100 {
        let page = messages(c, room, dir, from.as_deref(), limit).await;
        events.extend(page["chunk"].as_array().unwrap().iter().cloned());
        match page["end"].as_str() {
            Some(end) => {
                tokens.push(end.to_owned());
                from = Some(end.to_owned());
            }
            None => return (events, tokens),
        }
    }
    panic!("paging {dir} never ended");
}

/// A user of a server that joined late pages back through the room's whole history: every page past our join is
/// backfilled from the other server, in order, to the room's creation, with no event twice; a token given once
/// answers the same page again; and paging forwards from the oldest token walks the same history the other way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_back_backfills_a_remote_rooms_history_with_stable_tokens() {
    let (a, b) = federated_pair().await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    for i in 0..25 {
        alice.send_text(&room, &format!("m{i}")).await;
    }
    bob.post(&format!("/join/{}?server_name=hearth-a.test", enc(&room)), json!({})).await.ok();

    let (back, tokens) = page_all(&bob, &room, "b", None, 7).await;
    let expected: Vec<String> = (0..25).rev().map(|i| format!("m{i}")).collect();
    assert_eq!(bodies(&back), expected, "newest first, nothing missing");
    let all: Vec<&str> = back.iter().map(|e| e["event_id"].as_str().unwrap()).collect();
    let mut unique = all.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), all.len(), "no event twice");
    assert_eq!(back.first().unwrap()["type"], "m.room.member", "bob's join first");
    assert_eq!(back.last().unwrap()["type"], "m.room.create", "down to the room's creation");

    // The same token answers the same page.
    let mid = &tokens[1];
    assert_eq!(
        ids(&messages(&bob, &room, "b", Some(mid), 7).await),
        ids(&messages(&bob, &room, "b", Some(mid), 7).await)
    );
    // Forwards from the last token (just before the create event) walks it all back up, oldest first.
    let oldest = tokens.last().unwrap().clone();
    let (fwd, _) = page_all(&bob, &room, "f", Some(oldest), 6).await;
    let mut reversed: Vec<&str> = all.clone();
    reversed.reverse();
    let forward: Vec<&str> = fwd.iter().map(|e| e["event_id"].as_str().unwrap()).collect();
    assert_eq!(forward, reversed);
}

/// Events backfilled out of order (a jump-to-date answer in the middle of history first, what lies around it later)
/// get stream positions in the order they arrived, not the room's: `/messages` still shows them by depth. The
/// answer itself is in our timeline, so `/context` on it gives tokens to page from in both directions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_follow_depth_when_stream_order_differs() {
    let (a, b) = federated_pair().await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    let mut sent = Vec::new();
    let mut before_8 = 0;
    for i in 0..12 {
        if i == 8 {
            before_8 = mark().await;
        }
        sent.push(alice.send_text(&room, &format!("m{i}")).await);
    }
    bob.post(&format!("/join/{}?server_name=hearth-a.test", enc(&room)), json!({})).await.ok();

    // Jump to m8: asked of hearth-a, fetched into bob's server's timeline before the rest of the history.
    let found = jump(&bob, &room, before_8, "f").await.ok();
    assert_eq!(found["event_id"], json!(sent[8]));
    let ctx = bob.get(&format!("/rooms/{}/context/{}?limit=0", enc(&room), enc(&sent[8]))).await.ok();
    assert_eq!(ctx["event"]["event_id"], json!(sent[8]));
    // Backwards from just before m8: backfilled from there.
    let start = ctx["start"].as_str().unwrap();
    let page = messages(&bob, &room, "b", Some(start), 3).await;
    assert_eq!(ids(&page), vec![sent[7].clone(), sent[6].clone(), sent[5].clone()]);
    // Backwards from just after m8: m8 first.
    let end = ctx["end"].as_str().unwrap();
    assert_eq!(ids(&messages(&bob, &room, "b", Some(end), 2).await), vec![sent[8].clone(), sent[7].clone()]);

    // From the end: the join, then m11..m0 in depth order, though m11..m9 arrived after all the rest.
    let (back, _) = page_all(&bob, &room, "b", None, 5).await;
    let expected: Vec<String> = (0..12).rev().map(|i| format!("m{i}")).collect();
    assert_eq!(bodies(&back), expected);
    assert_eq!(back.last().unwrap()["type"], "m.room.create");
}

/// A jump-to-date answer from another server is shown only if the user may see the event it names: fetched into
/// our timeline and judged like any event. Another server may answer with an event from before our join in a room
/// whose history is `joined`-only: the user gets no answer (404), not that event; in a `shared` room, the event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_jump_to_date_answers_are_judged_for_the_user() {
    let shared = FakeResident::start(RoomSpec { messages: 0, ..RoomSpec::default() }).await;
    let open = shared.append(EventSpec::message(&shared.creator(), "shared history"));
    let private = FakeResident::start(RoomSpec { messages: 0, ..RoomSpec::default() }).await;
    private.append(EventSpec::state(
        &private.creator(),
        "m.room.history_visibility",
        "",
        json!({"history_visibility": "joined"}),
    ));
    let secret = private.append(EventSpec::message(&private.creator(), "before you came"));
    let hearth = start_hearth_with_fakes(&[&shared, &private], |_| {}).await;
    let bob = hearth.user("bob").await;
    join_via(&bob, &shared).await;
    join_via(&bob, &private).await;

    let ts_of = |e: &FakeEvent| e.json["origin_server_ts"].as_i64().unwrap();
    for (fake, ev) in [(&shared, &open), (&private, &secret)] {
        fake.script("timestamp_to_event", Script::json(200, json!({"event_id": ev.id, "origin_server_ts": ts_of(ev)})));
    }

    let found = jump(&bob, &shared.room_id(), ts_of(&open) + 1, "b").await.ok();
    assert_eq!(found["event_id"], json!(open.id));
    assert_eq!(found["origin_server_ts"], json!(ts_of(&open)));
    let ctx = bob.get(&format!("/rooms/{}/context/{}", enc(&shared.room_id()), enc(&open.id))).await.ok();
    assert_eq!(ctx["event"]["content"]["body"], "shared history");

    let hidden = jump(&bob, &private.room_id(), ts_of(&secret) + 1, "b").await;
    hidden.assert_err(404, "M_NOT_FOUND");
    assert!(!hidden.text.contains(&secret.id), "{}", hidden.text);
    assert!(private.count("timestamp_to_event") >= 1, "the other server was asked");
    // Nor does the event show anywhere else.
    bob.get(&format!("/rooms/{}/event/{}", enc(&private.room_id()), enc(&secret.id)))
        .await
        .assert_err(404, "M_NOT_FOUND");
}

/// A user who left and joins again finds the history sent while their server was away: the gap between their
/// leave and their new join is backfilled when paging back reaches it, and shown in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_back_fills_the_gap_between_a_leave_and_a_new_join() {
    let (a, b) = federated_pair().await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    let join = format!("/join/{}?server_name=hearth-a.test", enc(&room));
    bob.post(&join, json!({})).await.ok();
    bob.leave(&room).await.ok();
    for i in 0..15 {
        alice.send_text(&room, &format!("m{i}")).await;
    }
    bob.post(&join, json!({})).await.ok();

    let (back, _) = page_all(&bob, &room, "b", None, 10).await;
    let expected: Vec<String> = (0..15).rev().map(|i| format!("m{i}")).collect();
    assert_eq!(bodies(&back), expected);
    let members: Vec<&str> = back
        .iter()
        .filter(|e| e["type"] == "m.room.member")
        .map(|e| e["content"]["membership"].as_str().unwrap())
        .collect();
    assert_eq!(members[..3], ["join", "leave", "join"], "bob's new join, his leave, his first join");
    assert_eq!(back.last().unwrap()["type"], "m.room.create");
}

/// A `/messages` token that is neither a `/sync` token nor `t{depth}_{stream}` is a 400 `M_INVALID_PARAM`.
#[tokio::test]
async fn malformed_page_tokens_are_refused() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let room = alice.create_room(json!({})).await;
    for bad in ["tx_1", "t1", "t1_y", "zzz"] {
        alice.messages(&room, &[("dir", "b"), ("from", bad)]).await.assert_err(400, "M_INVALID_PARAM");
    }
}
