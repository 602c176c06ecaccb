//! Relations, threads and server-side search over HTTP, as a user sees them: `/relations` (filters, both
//! directions, pagination, recursion, visibility), bundled aggregations (threads, edits, references) in every way
//! an event reaches a client, `/threads`, threaded read receipts and per-thread notification counts, `POST /search`
//! (ordering, pagination, context, redactions, history visibility, rooms left), and room upgrades (with the
//! upgrader's push rules carried over).

mod common;

use common::*;

fn v1(path: &str) -> String {
    format!("/_matrix/client/v1{path}")
}

async fn send_rel(c: &Client, room: &str, body: &str, parent: &str, rel_type: &str) -> String {
    let content =
        json!({"msgtype": "m.text", "body": body, "m.relates_to": {"event_id": parent, "rel_type": rel_type}});
    c.send(room, "m.room.message", content).await.ok()["event_id"].as_str().unwrap().to_owned()
}

fn ids(v: &Value, key: &str) -> Vec<String> {
    v[key].as_array().unwrap().iter().map(|e| e["event_id"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn relations_paginate_filter_and_follow_visibility() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    let root = alice.send_text(&room, "root").await;
    let mut replies = Vec::new();
    for i in 0..4 {
        replies.push(send_rel(&alice, &room, &format!("reply {i}"), &root, "m.thread").await);
    }
    let edit = send_rel(&alice, &room, "* root", &root, "m.replace").await;
    let reaction = alice
        .send(
            &room,
            "m.reaction",
            json!({"m.relates_to": {"event_id": replies[0], "rel_type": "m.annotation", "key": "x"}}),
        )
        .await
        .ok()["event_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (r, e) = (enc(&room), enc(&root));

    let all = alice.get(&v1(&format!("/rooms/{r}/relations/{e}?limit=10"))).await.ok();
    assert_eq!(
        ids(&all, "chunk"),
        [edit.as_str(), replies[3].as_str(), replies[2].as_str(), replies[1].as_str(), replies[0].as_str()],
        "newest first"
    );
    assert!(all.get("next_batch").is_none() && all.get("recursion_depth").is_none());

    let page1 = alice.get(&v1(&format!("/rooms/{r}/relations/{e}/m.thread?limit=3&dir=f"))).await.ok();
    assert_eq!(ids(&page1, "chunk"), replies[..3]);
    let next = page1["next_batch"].as_str().unwrap();
    let page2 =
        alice.get(&v1(&format!("/rooms/{r}/relations/{e}/m.thread?limit=3&dir=f&from={}", enc(next)))).await.ok();
    assert_eq!(ids(&page2, "chunk"), replies[3..]);
    assert!(page2.get("next_batch").is_none());
    assert_eq!(page2["prev_batch"], next);

    let typed = alice.get(&v1(&format!("/rooms/{r}/relations/{e}/m.thread/m.reaction"))).await.ok();
    assert!(ids(&typed, "chunk").is_empty());
    let deep = alice.get(&v1(&format!("/rooms/{r}/relations/{e}?limit=10&recurse=true"))).await.ok();
    assert_eq!(ids(&deep, "chunk")[0], reaction, "the reaction to a reply relates indirectly");
    assert_eq!(deep["recursion_depth"], 3);

    // Someone who is not in the room sees nothing; an unknown parent is 404; bad input is 400.
    bob.get(&v1(&format!("/rooms/{r}/relations/{e}"))).await.assert_err(403, "M_FORBIDDEN");
    alice.get(&v1(&format!("/rooms/{r}/relations/{}", enc("$nope")))).await.assert_err(404, "M_NOT_FOUND");
    alice.get(&v1(&format!("/rooms/{r}/relations/{e}?dir=x"))).await.assert_err(400, "M_INVALID_PARAM");
    alice.get(&v1(&format!("/rooms/{r}/relations/{e}?from=zz"))).await.assert_err(400, "M_INVALID_PARAM");

    // A redacted reply no longer relates to anything.
    alice.put(&format!("/rooms/{r}/redact/{}/t1", enc(&replies[3])), json!({})).await.ok();
    let after = alice.get(&v1(&format!("/rooms/{r}/relations/{e}/m.thread?limit=10"))).await.ok();
    assert_eq!(ids(&after, "chunk"), [replies[2].as_str(), replies[1].as_str(), replies[0].as_str()]);

    // Each event is judged by the history visibility it was sent under: a newcomer sees the relations of what was
    // sent under `shared`, not of what was sent under `joined` before their join.
    alice.put_state(&room, "m.room.history_visibility", "", json!({"history_visibility": "joined"})).await.ok();
    let hidden = alice.send_text(&room, "hidden root").await;
    send_rel(&alice, &room, "hidden reply", &hidden, "m.thread").await;
    bob.join(&room).await.ok();
    bob.get(&v1(&format!("/rooms/{r}/relations/{e}"))).await.ok();
    bob.get(&v1(&format!("/rooms/{r}/relations/{}", enc(&hidden)))).await.assert_err(404, "M_NOT_FOUND");
    s.stop().await;
}

#[tokio::test]
async fn bundled_aggregations_and_threads_list() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    bob.join(&room).await.ok();
    let root1 = alice.send_text(&room, "thread one").await;
    let root2 = alice.send_text(&room, "thread two").await;
    let r1 = send_rel(&bob, &room, "in one", &root1, "m.thread").await;
    let r2 = send_rel(&alice, &room, "in two", &root2, "m.thread").await;
    let edit = alice
        .send(
            &room,
            "m.room.message",
            json!({"msgtype": "m.text", "body": "* thread one!", "m.new_content": {"msgtype": "m.text", "body": "thread one!"},
                   "m.relates_to": {"event_id": root1, "rel_type": "m.replace"}}),
        )
        .await
        .ok()["event_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Bob's "edit" of Alice's message is not an edit.
    send_rel(&bob, &room, "* hijack", &root1, "m.replace").await;
    let reference = send_rel(&bob, &room, "see above", &root1, "m.reference").await;

    let check = |ev: &Value, who: &str| {
        let rel = &ev["unsigned"]["m.relations"];
        assert_eq!(rel["m.thread"]["count"], 1, "{who}: {ev}");
        assert_eq!(rel["m.thread"]["latest_event"]["event_id"], json!(r1), "{who}");
        assert_eq!(rel["m.replace"]["event_id"], json!(edit), "{who}");
        assert_eq!(rel["m.reference"]["chunk"], json!([{"event_id": reference}]), "{who}");
    };
    let r = enc(&room);
    check(&alice.event(&room, &root1).await.ok(), "/event");
    check(&alice.get(&format!("/rooms/{r}/context/{}", enc(&root1))).await.ok()["event"], "/context");
    let msgs = alice.messages(&room, &[("dir", "b"), ("limit", "50")]).await.ok();
    check(msgs["chunk"].as_array().unwrap().iter().find(|e| e["event_id"] == json!(root1)).unwrap(), "/messages");
    let sync = alice.sync(None, &[("filter", r#"{"room":{"timeline":{"limit":50}}}"#)]).await.ok();
    let tl = events_of(&sync["rooms"]["join"][&room]["timeline"]);
    check(tl.iter().find(|e| e["event_id"] == json!(root1)).unwrap(), "/sync");
    // Participation is the viewer's own: Bob replied in thread one, not in thread two.
    let for_bob = bob.event(&room, &root1).await.ok();
    assert_eq!(for_bob["unsigned"]["m.relations"]["m.thread"]["current_user_participated"], true);
    let two = bob.event(&room, &root2).await.ok();
    assert_eq!(two["unsigned"]["m.relations"]["m.thread"]["current_user_participated"], false);
    assert_eq!(two["unsigned"]["m.relations"]["m.thread"]["latest_event"]["event_id"], json!(r2));

    // /threads: most recently active first; `participated` only the threads the user took part in.
    let list = alice.get(&v1(&format!("/rooms/{r}/threads"))).await.ok();
    assert_eq!(ids(&list, "chunk"), [root2.as_str(), root1.as_str()]);
    let r3 = send_rel(&alice, &room, "one again", &root1, "m.thread").await;
    let list = alice.get(&v1(&format!("/rooms/{r}/threads?limit=1"))).await.ok();
    assert_eq!(ids(&list, "chunk"), [root1.as_str()]);
    assert_eq!(list["chunk"][0]["unsigned"]["m.relations"]["m.thread"]["latest_event"]["event_id"], json!(r3));
    let next = list["next_batch"].as_str().unwrap();
    let rest = alice.get(&v1(&format!("/rooms/{r}/threads?limit=1&from={}", enc(next)))).await.ok();
    assert_eq!(ids(&rest, "chunk"), [root2.as_str()]);
    let carol = s.user("carol").await;
    carol.join(&room).await.ok();
    let mine = carol.get(&v1(&format!("/rooms/{r}/threads?include=participated"))).await.ok();
    assert!(ids(&mine, "chunk").is_empty());
    let bobs = bob.get(&v1(&format!("/rooms/{r}/threads?include=participated"))).await.ok();
    assert_eq!(ids(&bobs, "chunk"), [root1.as_str()]);
    alice.get(&v1(&format!("/rooms/{r}/threads?include=mine"))).await.assert_err(400, "M_INVALID_PARAM");
    s.stop().await;
}

fn unread(sync: &Value, room: &str) -> (Value, Value) {
    let r = &sync["rooms"]["join"][room];
    (r["unread_notifications"].clone(), r["unread_thread_notifications"].clone())
}

fn n(count: i64, highlight: i64) -> Value {
    json!({"notification_count": count, "highlight_count": highlight})
}

#[tokio::test]
async fn threaded_receipts_count_each_thread_apart() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    bob.join(&room).await.ok();
    let a = alice.send_text(&room, "main one").await;
    let b = send_rel(&alice, &room, "thread one", &a, "m.thread").await;
    send_rel(&alice, &room, &format!("thread two {}", bob.user_id), &a, "m.thread").await;
    alice.send_text(&room, "main two").await;
    let threads = [("filter", r#"{"room":{"timeline":{"unread_thread_notifications":true}}}"#)];

    let (total, none) = unread(&bob.sync(None, &[]).await.ok(), &room);
    assert_eq!((total, none), (n(4, 1), Value::Null), "summed without the filter");
    let (main, per) = unread(&bob.sync(None, &threads).await.ok(), &room);
    assert_eq!((main, per), (n(2, 0), json!({&a: n(2, 1)})));

    // A receipt in the thread reads only the thread; one in `main` only the main timeline.
    let r = enc(&room);
    bob.post(&format!("/rooms/{r}/receipt/m.read/{}", enc(&b)), json!({"thread_id": a})).await.ok();
    assert_eq!(unread(&bob.sync(None, &threads).await.ok(), &room), (n(2, 0), json!({&a: n(1, 1)})));
    bob.post(&format!("/rooms/{r}/receipt/m.read/{}", enc(&a)), json!({"thread_id": "main"})).await.ok();
    assert_eq!(unread(&bob.sync(None, &threads).await.ok(), &room), (n(1, 0), json!({&a: n(1, 1)})));
    assert_eq!(unread(&bob.sync(None, &[]).await.ok(), &room).0, n(2, 1));
    // An unthreaded receipt reads everything up to its event, in every thread.
    let last = alice.send_text(&room, "main three").await;
    bob.post(&format!("/rooms/{r}/receipt/m.read/{}", enc(&last)), json!({})).await.ok();
    assert_eq!(unread(&bob.sync(None, &threads).await.ok(), &room), (n(0, 0), Value::Null));

    // Both receipts on one event: sync shows the unthreaded one (MSC4102).
    let c = send_rel(&alice, &room, "thread three", &a, "m.thread").await;
    bob.post(&format!("/rooms/{r}/receipt/m.read/{}", enc(&c)), json!({})).await.ok();
    bob.post(&format!("/rooms/{r}/receipt/m.read/{}", enc(&c)), json!({"thread_id": a})).await.ok();
    let sync = alice.sync(None, &[]).await.ok();
    let receipts = events_of(&sync["rooms"]["join"][&room]["ephemeral"]);
    let receipt = receipts.iter().find(|e| e["type"] == "m.receipt").unwrap();
    let mine = &receipt["content"][&c]["m.read"][&bob.user_id];
    assert!(mine.is_object() && mine.get("thread_id").is_none(), "{receipt}");
    s.stop().await;
}

fn search_body(term: &str, rooms: &[&str], order_by: &str, extra: Value) -> Value {
    let mut re = json!({"search_term": term, "keys": ["content.body"], "order_by": order_by,
                        "filter": {"rooms": rooms, "limit": 3}});
    if let (Some(o), Some(x)) = (re.as_object_mut(), extra.as_object()) {
        o.extend(x.clone());
    }
    json!({"search_categories": {"room_events": re}})
}

fn results(v: &Value) -> Vec<String> {
    let re = &v["search_categories"]["room_events"];
    re["results"].as_array().unwrap().iter().map(|r| r["result"]["event_id"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn search_pages_respects_visibility_and_forgets_redactions() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    let mut sent = Vec::new();
    for i in 0..5 {
        sent.push(alice.send_text(&room, &format!("apple number {i}")).await);
    }
    alice.send_text(&room, "banana").await;

    // Most recent first, three at a time, with context around each result.
    let body =
        search_body("apples", &[&room], "recent", json!({"event_context": {"before_limit": 1, "after_limit": 1}}));
    let page = alice.post("/search", body.clone()).await.ok();
    assert_eq!(results(&page), [sent[4].as_str(), sent[3].as_str(), sent[2].as_str()], "stemmed: apples finds apple");
    let re = &page["search_categories"]["room_events"];
    assert_eq!(re["count"], 5);
    assert_eq!(re["results"][0]["context"]["events_after"][0]["content"]["body"], "banana");
    assert_eq!(re["results"][0]["context"]["events_before"][0]["event_id"], json!(sent[3]));
    let next = re["next_batch"].as_str().unwrap();
    let page2 = alice.post(&format!("/search?next_batch={}", enc(next)), body.clone()).await.ok();
    assert_eq!(results(&page2), [sent[1].as_str(), sent[0].as_str()]);
    assert!(page2["search_categories"]["room_events"].get("next_batch").is_none());
    // Best match first pages by offset.
    let ranked = alice.post("/search", search_body("apple 3", &[&room], "rank", json!({}))).await.ok();
    assert_eq!(results(&ranked), [sent[3].as_str()]);

    // Redacted events leave the index.
    alice.put(&format!("/rooms/{}/redact/{}/t1", enc(&room), enc(&sent[4])), json!({})).await.ok();
    let page = alice.post("/search", body.clone()).await.ok();
    assert_eq!(results(&page), [sent[3].as_str(), sent[2].as_str(), sent[1].as_str()]);

    // Bob is not in the room: nothing. Once joined, each result is judged by the history visibility it was sent
    // under: what was sent under `shared` is his, what was sent under `joined` before his join is not.
    assert!(results(&bob.post("/search", body.clone()).await.ok()).is_empty());
    alice.put_state(&room, "m.room.history_visibility", "", json!({"history_visibility": "joined"})).await.ok();
    let hidden = alice.send_text(&room, "apple hidden").await;
    bob.join(&room).await.ok();
    let shared = results(&bob.post("/search", body.clone()).await.ok());
    assert!(shared.contains(&sent[3]) && !shared.contains(&hidden), "{shared:?}");
    let later = alice.send_text(&room, "apple pie").await;
    let seen = results(&bob.post("/search", body.clone()).await.ok());
    assert!(seen.contains(&later) && !seen.contains(&hidden), "{seen:?}");
    // Rooms left are not searched.
    bob.leave(&room).await.ok();
    assert!(results(&bob.post("/search", body.clone()).await.ok()).is_empty());

    // Groupings by room and bad input.
    let grouped = alice
        .post(
            "/search",
            search_body("apple", &[&room], "recent", json!({"groupings": {"group_by": [{"key": "room_id"}]}})),
        )
        .await
        .ok();
    assert_eq!(grouped["search_categories"]["room_events"]["groups"]["room_id"][&room]["results"][0], json!(later));
    alice.post("/search", search_body("apple", &[&room], "best", json!({}))).await.assert_err(400, "M_BAD_JSON");
    alice.post("/search?next_batch=zz", body).await.assert_err(400, "M_INVALID_PARAM");
    alice
        .post("/search", json!({"search_categories": {"room_events": {"keys": ["content.body"]}}}))
        .await
        .assert_err(400, "M_BAD_JSON");
    assert_eq!(alice.post("/search", json!({"search_categories": {}})).await.ok(), json!({"search_categories": {}}));
    s.stop().await;
}

#[tokio::test]
async fn upgraded_room_points_both_ways_and_search_spans_both() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let old = alice.create_room(json!({"preset": "public_chat", "room_version": "10", "name": "Orchard"})).await;
    bob.join(&old).await.ok();
    let before = alice.send_text(&old, "pear before").await;
    let rule = |room: &str| format!("/pushrules/global/room/{}", enc(room));
    alice.put(&rule(&old), json!({"actions": ["dont_notify"]})).await.ok();
    bob.post(&format!("/rooms/{}/upgrade", enc(&old)), json!({"new_version": "11"}))
        .await
        .assert_err(403, "M_FORBIDDEN");
    let new = alice.post(&format!("/rooms/{}/upgrade", enc(&old)), json!({"new_version": "11"})).await.ok()
        ["replacement_room"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(alice.state(&old, "m.room.tombstone", "").await.ok()["replacement_room"], json!(new));
    assert_eq!(alice.state(&new, "m.room.create", "").await.ok()["predecessor"]["room_id"], json!(old));
    assert_eq!(alice.state(&new, "m.room.create", "").await.ok()["room_version"], "11");
    assert_eq!(alice.state(&new, "m.room.name", "").await.ok()["name"], "Orchard");
    assert_eq!(alice.state(&old, "m.room.power_levels", "").await.ok()["events_default"], 50);
    assert_eq!(alice.get(&rule(&new)).await.ok()["actions"], json!(["dont_notify"]), "push rules carried over");
    bob.send(&old, "m.room.message", json!({"msgtype": "m.text", "body": "hi"})).await.assert_err(403, "M_FORBIDDEN");
    let after = alice.send_text(&new, "pear after").await;
    let found = alice.post("/search", search_body("pear", &[&old, &new], "rank", json!({}))).await.ok();
    let mut got = results(&found);
    got.sort();
    let mut want = vec![before, after];
    want.sort();
    assert_eq!(got, want);
    alice
        .post(&format!("/rooms/{}/upgrade", enc(&new)), json!({"new_version": "99"}))
        .await
        .assert_err(400, "M_UNSUPPORTED_ROOM_VERSION");
    s.stop().await;
}
