//! Simplified sliding sync (MSC4186) at the protocol level, field by field, as matrix-rust-sdk reads it: lists with
//! ranges sorted by recency, filters, room subscriptions, required state (`*`, `$LAZY`, `$ME`), per-room fields,
//! positions and long polling, `M_UNKNOWN_POS`, and the extensions.

mod common;

use std::time::Duration;

use common::{enc, Client, Resp, TestServer};
use serde_json::{json, Value};

const SS: &str = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync";

/// One sliding sync request (`timeout` 0 unless given).
async fn ss(c: &Client, pos: Option<&str>, timeout: u64, body: Value) -> Resp {
    let mut path = format!("{SS}?timeout={timeout}");
    if let Some(p) = pos {
        path.push_str(&format!("&pos={}", enc(p)));
    }
    c.post(&path, body).await
}

fn pos_of(v: &Value) -> String {
    v["pos"].as_str().expect("pos").to_owned()
}

/// The rooms of a list in the order the answer sends them: by `bump_stamp`, highest first (as the sdk sorts).
fn ordered(v: &Value) -> Vec<String> {
    let rooms = v["rooms"].as_object().cloned().unwrap_or_default();
    let mut r: Vec<(i64, String)> =
        rooms.iter().map(|(id, r)| (r["bump_stamp"].as_i64().expect("bump_stamp"), id.clone())).collect();
    r.sort_by_key(|b| std::cmp::Reverse(b.0));
    r.into_iter().map(|x| x.1).collect()
}

fn bodies(events: &Value) -> Vec<String> {
    events.as_array().into_iter().flatten().filter_map(|e| e["content"]["body"].as_str().map(str::to_owned)).collect()
}

fn list(ranges: Value, timeline_limit: u64) -> Value {
    json!({"ranges": ranges, "timeline_limit": timeline_limit, "required_state": [["m.room.name", ""]]})
}

#[tokio::test]
async fn versions_advertise_simplified_sliding_sync() {
    let s = TestServer::start().await;
    let v = s.client().get("/_matrix/client/versions").await.ok();
    assert_eq!(v["unstable_features"]["org.matrix.simplified_msc3575"], true);
}

#[tokio::test]
async fn lists_are_sorted_by_recency_and_ranged() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let mut rooms = Vec::new();
    for i in 0..4 {
        rooms.push(alice.create_room(json!({"name": format!("room {i}")})).await);
    }
    alice.send_text(&rooms[1], "bump").await;
    let body = json!({"lists": {"all": list(json!([[0, 2]]), 1)}});
    let r = ss(&alice, None, 0, body.clone()).await.ok();
    assert_eq!(r["lists"]["all"]["count"], 4);
    // The three most recent: room 1 (a message), then rooms 3 and 2 by creation.
    assert_eq!(ordered(&r), vec![rooms[1].clone(), rooms[3].clone(), rooms[2].clone()]);
    let room1 = &r["rooms"][&rooms[1]];
    assert_eq!(room1["name"], "room 1");
    assert_eq!(room1["initial"], true);
    assert_eq!(bodies(&room1["timeline"]), vec!["bump"]);
    assert_eq!(room1["limited"], true, "more history than the timeline limit");
    assert!(room1["prev_batch"].is_string());
    assert_eq!(room1["num_live"], 0);
    assert_eq!(room1["joined_count"], 1);
    assert_eq!(room1["invited_count"], 0);
    assert_eq!(room1["notification_count"], 0);
    assert_eq!(room1["highlight_count"], 0);
    assert!(room1["timeline"][0].get("room_id").is_none(), "timeline events leave the room id out");
    let rs = room1["required_state"].as_array().unwrap();
    assert_eq!(rs.len(), 1);
    assert_eq!(rs[0]["type"], "m.room.name");

    // A message in room 0 brings it into the range, pushing room 2 out.
    let pos = pos_of(&r);
    alice.send_text(&rooms[0], "hello").await;
    let r2 = ss(&alice, Some(&pos), 0, body.clone()).await.ok();
    let sent: Vec<&String> = r2["rooms"].as_object().unwrap().keys().collect();
    assert_eq!(sent, vec![&rooms[0]], "only the room that changed: {r2}");
    assert_eq!(r2["rooms"][&rooms[0]]["initial"], true, "new to the connection");
    assert!(r2["rooms"][&rooms[0]]["bump_stamp"].as_i64() > room1["bump_stamp"].as_i64());
    // A second range.
    let r3 = ss(&alice, None, 0, json!({"lists": {"all": list(json!([[0, 0], [3, 3]]), 1)}})).await.ok();
    assert_eq!(ordered(&r3), vec![rooms[0].clone(), rooms[2].clone()]);
}

#[tokio::test]
async fn unchanged_rooms_are_not_resent_and_new_events_are_live() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = alice.create_room(json!({"preset": "public_chat", "name": "chat"})).await;
    let quiet = alice.create_room(json!({"name": "quiet"})).await;
    bob.join(&room).await.ok();
    let body = json!({"lists": {"all": list(json!([[0, 10]]), 5)}});
    let r = ss(&alice, None, 0, body.clone()).await.ok();
    assert_eq!(r["rooms"].as_object().unwrap().len(), 2);
    assert_eq!(r["rooms"][&room]["joined_count"], 2);
    let pos = pos_of(&r);

    // Nothing new: the same position back, no rooms.
    let idle = ss(&alice, Some(&pos), 0, body.clone()).await.ok();
    assert!(idle["rooms"].as_object().unwrap().is_empty(), "{idle}");

    bob.send_text(&room, "one").await;
    bob.send_text(&room, "two").await;
    let r2 = ss(&alice, Some(&pos_of(&idle)), 0, body.clone()).await.ok();
    let upd = &r2["rooms"][&room];
    assert!(r2["rooms"].get(&quiet).is_none(), "the quiet room is not resent");
    assert!(upd.get("initial").is_none(), "not initial: {upd}");
    assert_eq!(bodies(&upd["timeline"]), vec!["one", "two"]);
    assert_eq!(upd["num_live"], 2);
    assert_eq!(upd["limited"], false);
    assert_eq!(upd["notification_count"], 2);

    // A retry of the same position gives the same rooms (positions are kept for retries).
    let again = ss(&alice, Some(&pos_of(&idle)), 0, body.clone()).await.ok();
    assert_eq!(bodies(&again["rooms"][&room]["timeline"]), vec!["one", "two"]);
}

#[tokio::test]
async fn a_long_poll_wakes_on_a_new_event() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    bob.join(&room).await.ok();
    let body = json!({"lists": {"all": list(json!([[0, 10]]), 5)}});
    let pos = pos_of(&ss(&alice, None, 0, body.clone()).await.ok());
    let (a, p, b) = (alice.clone(), pos.clone(), body.clone());
    let poll = tokio::spawn(async move { ss(&a, Some(&p), 30_000, b).await });
    // The poll is waiting (it has not answered); then a message wakes it long before its timeout.
    let started = std::time::Instant::now();
    bob.send_text(&room, "wake up").await;
    let r = poll.await.unwrap().ok();
    assert!(started.elapsed() < Duration::from_secs(20), "woke at once");
    assert_eq!(bodies(&r["rooms"][&room]["timeline"]), vec!["wake up"]);
    assert_ne!(pos_of(&r), pos);
}

#[tokio::test]
async fn unknown_positions_answer_m_unknown_pos() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    alice.create_room(json!({})).await;
    let body = json!({"conn_id": "main", "lists": {"all": list(json!([[0, 10]]), 1)}});
    ss(&alice, Some("12345"), 0, body.clone()).await.assert_err(400, "M_UNKNOWN_POS");
    ss(&alice, Some("garbage"), 0, body.clone()).await.assert_err(400, "M_UNKNOWN_POS");
    let pos = pos_of(&ss(&alice, None, 0, body.clone()).await.ok());
    // Another connection's position is unknown to this one.
    ss(&alice, Some(&pos), 0, json!({"conn_id": "other"})).await.assert_err(400, "M_UNKNOWN_POS");
    // Another device's too.
    let mut other_device = s.client();
    other_device.login("alice", common::PASSWORD).await.ok();
    ss(&other_device, Some(&pos), 0, body.clone()).await.assert_err(400, "M_UNKNOWN_POS");
    // Starting the connection over drops its old positions.
    let fresh = ss(&alice, None, 0, body.clone()).await.ok();
    ss(&alice, Some(&pos), 0, body.clone()).await.assert_err(400, "M_UNKNOWN_POS");
    ss(&alice, Some(&pos_of(&fresh)), 0, body).await.ok();
}

#[tokio::test]
async fn bad_requests_are_refused() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    ss(&alice, None, 0, json!({"lists": {"a": {"ranges": [[3, 1]]}}})).await.assert_err(400, "M_INVALID_PARAM");
    ss(&alice, None, 0, json!({"lists": {"a": {"ranges": "all"}}})).await.assert_err(400, "M_BAD_JSON");
    ss(&alice, None, 0, json!({"room_subscriptions": {"not-a-room": {}}})).await.assert_err(400, "M_INVALID_PARAM");
    ss(&alice, None, 0, json!({"lists": {"a": {"required_state": [["m.room.name"]]}}}))
        .await
        .assert_err(400, "M_BAD_JSON");
    s.client().post(SS, json!({})).await.assert_err(401, "M_MISSING_TOKEN");
    // An empty request is a valid (empty) answer.
    let r = ss(&alice, None, 0, json!({})).await.ok();
    assert!(r["pos"].is_string());
}

#[tokio::test]
async fn filters_select_rooms() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let plain = alice.create_room(json!({"name": "plain"})).await;
    let dm = alice.create_room(json!({"is_direct": true, "invite": [bob.user_id]})).await;
    alice
        .put(&format!("/user/{}/account_data/m.direct", enc(&alice.user_id)), json!({bob.user_id.clone(): [dm]}))
        .await
        .ok();
    let encrypted = alice
        .create_room(json!({"initial_state": [{"type": "m.room.encryption", "state_key": "", "content": {"algorithm": "m.megolm.v1.aes-sha2"}}]}))
        .await;
    let space = alice.create_room(json!({"creation_content": {"type": "m.space"}, "name": "space"})).await;
    alice.put_state(&space, "m.space.child", &plain, json!({"via": [s.server_name]})).await.ok();
    let invited = bob.create_room(json!({"is_direct": true, "invite": [alice.user_id]})).await;

    let lists = json!({
        "dms": {"ranges": [[0, 20]], "filters": {"is_dm": true}},
        "not_dms": {"ranges": [[0, 20]], "filters": {"is_dm": false}},
        "enc": {"ranges": [[0, 20]], "filters": {"is_encrypted": true}},
        "invites": {"ranges": [[0, 20]], "filters": {"is_invite": true}},
        "spaces": {"ranges": [[0, 20]], "filters": {"room_types": ["m.space"]}},
        "no_spaces": {"ranges": [[0, 20]], "filters": {"not_room_types": ["m.space"]}},
        "plain_type": {"ranges": [[0, 20]], "filters": {"room_types": [null]}},
        "in_space": {"ranges": [[0, 20]], "filters": {"spaces": [space]}},
    });
    let r = ss(&alice, None, 0, json!({"lists": lists})).await.ok();
    let count = |l: &str| r["lists"][l]["count"].as_u64().unwrap();
    assert_eq!(count("dms"), 2, "the m.direct room and the direct invite: {r}");
    assert_eq!(count("not_dms"), 3);
    assert_eq!(count("enc"), 1);
    assert_eq!(count("invites"), 1);
    assert_eq!(count("spaces"), 1);
    assert_eq!(count("no_spaces"), 4);
    assert_eq!(count("plain_type"), 4);
    assert_eq!(count("in_space"), 1);
    assert_eq!(r["rooms"][&dm]["is_dm"], true);
    assert!(r["rooms"][&encrypted]["bump_stamp"].is_i64());
    assert!(r["rooms"][&plain].get("is_dm").is_none());
    let inv = &r["rooms"][&invited];
    assert_eq!(inv["is_dm"], true);
    let invite_state = inv["invite_state"].as_array().expect("invite_state");
    assert!(invite_state.iter().any(|e| e["type"] == "m.room.member" && e["state_key"] == json!(alice.user_id)));
    assert!(inv.get("timeline").is_none());
    assert!(inv["bump_stamp"].is_i64());
}

#[tokio::test]
async fn name_avatar_and_heroes() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    bob.put(&format!("/profile/{}/displayname", enc(&bob.user_id)), json!({"displayname": "Bob"})).await.ok();
    let nameless = alice.create_room(json!({"preset": "public_chat"})).await;
    bob.join(&nameless).await.ok();
    let named = alice.create_room(json!({"name": "Named"})).await;
    alice.put_state(&named, "m.room.avatar", "", json!({"url": "mxc://x/avatar"})).await.ok();
    let r = ss(&alice, None, 0, json!({"lists": {"all": {"ranges": [[0, 5]], "timeline_limit": 0}}})).await.ok();
    let n = &r["rooms"][&nameless];
    assert!(n.get("name").is_none(), "no m.room.name: {n}");
    assert_eq!(n["heroes"], json!([{"user_id": bob.user_id, "displayname": "Bob"}]));
    let m = &r["rooms"][&named];
    assert_eq!(m["name"], "Named");
    assert_eq!(m["avatar"], "mxc://x/avatar");
    assert!(m.get("heroes").is_none());
    assert!(m.get("timeline").is_none(), "timeline_limit 0");
}

#[tokio::test]
async fn required_state_wildcards_lazy_and_me() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let carol = s.user("carol").await;
    let room = alice.create_room(json!({"preset": "public_chat", "name": "r", "topic": "t"})).await;
    bob.join(&room).await.ok();
    carol.join(&room).await.ok();
    for i in 0..3 {
        alice.send_text(&room, &format!("filler {i}")).await;
    }
    bob.send_text(&room, "from bob").await;
    let types = |r: &Value| -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = r["rooms"][&room]["required_state"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| (e["type"].as_str().unwrap().to_owned(), e["state_key"].as_str().unwrap().to_owned()))
            .collect();
        v.sort();
        v
    };
    let sub = |rs: Value| json!({"room_subscriptions": {room.clone(): {"timeline_limit": 1, "required_state": rs}}});
    let lazy = ss(&alice, None, 0, sub(json!([["m.room.member", "$LAZY"]]))).await.ok();
    assert_eq!(types(&lazy), vec![("m.room.member".to_owned(), bob.user_id.clone())], "the timeline sender");
    let me = ss(&alice, None, 0, sub(json!([["m.room.member", "$ME"]]))).await.ok();
    assert_eq!(types(&me), vec![("m.room.member".to_owned(), alice.user_id.clone())]);
    let members = ss(&alice, None, 0, sub(json!([["m.room.member", "*"]]))).await.ok();
    assert_eq!(types(&members).len(), 3);
    let all = ss(&alice, None, 0, sub(json!([["*", "*"]]))).await.ok();
    let all_types = types(&all);
    for t in ["m.room.create", "m.room.power_levels", "m.room.join_rules", "m.room.name", "m.room.topic"] {
        assert!(all_types.iter().any(|(ty, _)| ty == t), "{t} in {all_types:?}");
    }
    assert_eq!(all_types.iter().filter(|(t, _)| t == "m.room.member").count(), 3);

    // On a later request only what changed: the new topic, and the new sender's member event.
    let body = sub(json!([["m.room.topic", ""], ["m.room.member", "$LAZY"]]));
    let pos = pos_of(&ss(&alice, None, 0, body.clone()).await.ok());
    alice.put_state(&room, "m.room.topic", "", json!({"topic": "new"})).await.ok();
    carol.send_text(&room, "from carol").await;
    let next = ss(&alice, Some(&pos), 0, body).await.ok();
    assert_eq!(
        types(&next),
        vec![("m.room.member".to_owned(), carol.user_id.clone()), ("m.room.topic".to_owned(), String::new())]
    );
}

#[tokio::test]
async fn subscriptions_paginate_back_with_prev_batch() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let room = alice.create_room(json!({})).await;
    for i in 0..6 {
        alice.send_text(&room, &format!("m{i}")).await;
    }
    let r = ss(&alice, None, 0, json!({"room_subscriptions": {room.clone(): {"timeline_limit": 3}}})).await.ok();
    let rr = &r["rooms"][&room];
    assert_eq!(bodies(&rr["timeline"]), vec!["m3", "m4", "m5"]);
    assert_eq!(rr["limited"], true);
    let prev = rr["prev_batch"].as_str().unwrap();
    let back = alice.messages(&room, &[("dir", "b"), ("from", prev), ("limit", "3")]).await.ok();
    assert_eq!(bodies(&back["chunk"]), vec!["m2", "m1", "m0"]);
    // A room the user is not in is not subscribable.
    let other = s.user("other").await;
    let r = ss(&other, None, 0, json!({"room_subscriptions": {room.clone(): {"timeline_limit": 3}}})).await.ok();
    assert!(r["rooms"].get(&room).is_none());
}

#[tokio::test]
async fn a_left_room_is_sent_once_with_the_leave() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    bob.join(&room).await.ok();
    let body = json!({"lists": {"all": list(json!([[0, 10]]), 3)}});
    let pos = pos_of(&ss(&bob, None, 0, body.clone()).await.ok());
    bob.leave(&room).await.ok();
    let r = ss(&bob, Some(&pos), 0, body.clone()).await.ok();
    assert!(r["rooms"][&room].get("initial").is_none(), "the timeline continues up to the leave");
    let tl = r["rooms"][&room]["timeline"].as_array().expect("the leave is sent").clone();
    let last = tl.last().unwrap();
    assert_eq!((last["type"].as_str(), last["content"]["membership"].as_str()), (Some("m.room.member"), Some("leave")));
    alice.send_text(&room, "after the leave").await;
    let r2 = ss(&bob, Some(&pos_of(&r)), 0, body).await.ok();
    assert!(r2["rooms"].get(&room).is_none(), "nothing after the leave: {r2}");
    assert_eq!(r2["lists"]["all"]["count"], 0);
}

#[tokio::test]
async fn extensions_to_device_and_e2ee() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    bob.join(&room).await.ok();
    alice
        .post("/keys/upload", json!({"one_time_keys": {"signed_curve25519:AAAA": {"key": "k", "signatures": {}}}, "fallback_keys": {"signed_curve25519:BBBB": {"key": "f", "fallback": true, "signatures": {}}}}))
        .await
        .ok();
    let ext = |since: Option<&str>| {
        let mut td = json!({"enabled": true});
        if let Some(s) = since {
            td["since"] = json!(s);
        }
        json!({"extensions": {"to_device": td, "e2ee": {"enabled": true}}})
    };
    let r = ss(&alice, None, 0, ext(None)).await.ok();
    let e2ee = &r["extensions"]["e2ee"];
    assert_eq!(e2ee["device_one_time_keys_count"]["signed_curve25519"], 1);
    assert_eq!(e2ee["device_unused_fallback_key_types"], json!(["signed_curve25519"]));
    let since = r["extensions"]["to_device"]["next_batch"].as_str().unwrap().to_owned();
    let pos = pos_of(&r);

    let msg = json!({"messages": {alice.user_id.clone(): {alice.device_id.clone(): {"hello": "there"}}}});
    bob.put("/sendToDevice/m.test/t1", msg).await.ok();
    // Bob changes his devices: alice, who shares a room with him, hears of it.
    bob.post("/keys/upload", json!({"device_keys": {"user_id": bob.user_id, "device_id": bob.device_id, "algorithms": [], "keys": {}, "signatures": {}}})).await.ok();
    let r2 = ss(&alice, Some(&pos), 0, ext(Some(&since))).await.ok();
    let td = &r2["extensions"]["to_device"];
    assert_eq!(td["events"][0]["type"], "m.test");
    assert_eq!(td["events"][0]["sender"], json!(bob.user_id));
    assert_eq!(td["events"][0]["content"]["hello"], "there");
    assert!(r2["extensions"]["e2ee"]["device_lists"]["changed"].as_array().unwrap().contains(&json!(bob.user_id)));
    // Not acknowledged yet (the same `since` again, as a retry would): sent again.
    let again = ss(&alice, Some(&pos), 0, ext(Some(&since))).await.ok();
    assert_eq!(again["extensions"]["to_device"]["events"].as_array().unwrap().len(), 1);
    // Acknowledged with the next `since`: gone.
    let since2 = td["next_batch"].as_str().unwrap().to_owned();
    let r3 = ss(&alice, Some(&pos_of(&r2)), 0, ext(Some(&since2))).await.ok();
    assert!(r3["extensions"]["to_device"]["events"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn extensions_account_data_receipts_typing_with_scopes() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let a = alice.create_room(json!({"preset": "public_chat", "name": "a"})).await;
    let b = alice.create_room(json!({"preset": "public_chat", "name": "b"})).await;
    bob.join(&a).await.ok();
    bob.join(&b).await.ok();
    alice.put(&format!("/user/{}/account_data/m.test", enc(&alice.user_id)), json!({"g": 1})).await.ok();
    for room in [&a, &b] {
        alice
            .put(&format!("/user/{}/rooms/{}/account_data/m.tag.test", enc(&alice.user_id), enc(room)), json!({"r": 1}))
            .await
            .ok();
    }
    let ev = bob.send_text(&a, "read me").await;
    bob.post(&format!("/rooms/{}/receipt/m.read/{}", enc(&a), enc(&ev)), json!({})).await.ok();
    bob.put(&format!("/rooms/{}/typing/{}", enc(&a), enc(&bob.user_id)), json!({"typing": true, "timeout": 30000}))
        .await
        .ok();
    bob.put(&format!("/rooms/{}/typing/{}", enc(&b), enc(&bob.user_id)), json!({"typing": true, "timeout": 30000}))
        .await
        .ok();

    // Room a only through the subscription; the extensions are scoped to the subscriptions (no lists).
    let body = json!({
        "lists": {"all": {"ranges": [[0, 5]], "timeline_limit": 1}},
        "room_subscriptions": {a.clone(): {"timeline_limit": 1}},
        "extensions": {
            "account_data": {"enabled": true, "lists": [], "rooms": [a]},
            "receipts": {"enabled": true, "lists": [], "rooms": ["*"]},
            "typing": {"enabled": true, "lists": [], "rooms": ["*"]},
        }
    });
    let r = ss(&alice, None, 0, body.clone()).await.ok();
    let x = &r["extensions"];
    let global = x["account_data"]["global"].as_array().unwrap();
    assert!(global.iter().any(|e| e["type"] == "m.test" && e["content"]["g"] == 1));
    assert!(global.iter().any(|e| e["type"] == "m.push_rules"), "the default push rules");
    assert_eq!(x["account_data"]["rooms"][&a][0]["type"], "m.tag.test");
    assert!(x["account_data"]["rooms"].get(&b).is_none(), "b is out of scope");
    assert_eq!(x["receipts"]["rooms"][&a]["type"], "m.receipt");
    assert!(x["receipts"]["rooms"][&a]["content"][&ev]["m.read"][&bob.user_id]["ts"].is_i64());
    assert_eq!(x["typing"]["rooms"][&a]["content"]["user_ids"], json!([bob.user_id]));
    assert!(x["typing"]["rooms"].get(&b).is_none(), "b is out of scope");

    // With the list in scope too, and incremental: only the moves.
    let mut body2 = body.clone();
    body2["extensions"]["typing"]["lists"] = json!(["all"]);
    body2["extensions"]["account_data"]["lists"] = json!(["*"]);
    let pos = pos_of(&ss(&alice, None, 0, body2.clone()).await.ok());
    bob.put(&format!("/rooms/{}/typing/{}", enc(&b), enc(&bob.user_id)), json!({"typing": false})).await.ok();
    alice
        .put(&format!("/user/{}/rooms/{}/account_data/m.tag.test", enc(&alice.user_id), enc(&b)), json!({"r": 2}))
        .await
        .ok();
    let r2 = ss(&alice, Some(&pos), 0, body2).await.ok();
    let x2 = &r2["extensions"];
    assert_eq!(x2["typing"]["rooms"][&b]["content"]["user_ids"], json!([]));
    assert!(x2["typing"]["rooms"].get(&a).is_none(), "a's typing did not move");
    assert_eq!(x2["account_data"]["rooms"][&b][0]["content"]["r"], 2);
    assert!(x2["account_data"]["rooms"].get(&a).is_none());
    assert!(x2["account_data"]["global"].as_array().unwrap().is_empty());
}

/// A larger `timeline_limit` for a room already sent (Synapse's per-connection room config): the room comes at
/// once, not `initial`, with the latest events up to the new limit (`unstable_expanded_timeline`); the same
/// config again sends nothing; a smaller one sends only what is new.
#[tokio::test]
async fn a_larger_timeline_limit_expands_the_timeline() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let room = alice.create_room(json!({"name": "r"})).await;
    for i in 0..3 {
        alice.send_text(&room, &format!("m{i}")).await;
    }
    let small = json!({"lists": {"all": list(json!([[0, 0]]), 1)}});
    let r = ss(&alice, None, 0, small.clone()).await.ok();
    assert_eq!(bodies(&r["rooms"][&room]["timeline"]), vec!["m2"]);
    assert!(r["rooms"][&room].get("unstable_expanded_timeline").is_none());
    let big = json!({"lists": {"all": list(json!([[0, 0]]), 1)}, "room_subscriptions": {room.clone(): {"timeline_limit": 10}}});
    let r2 = ss(&alice, Some(&pos_of(&r)), 0, big.clone()).await.ok();
    let rr = &r2["rooms"][&room];
    assert!(rr.get("initial").is_none(), "not initial: {rr}");
    assert_eq!(rr["unstable_expanded_timeline"], true, "{rr}");
    assert_eq!(bodies(&rr["timeline"]), vec!["m0", "m1", "m2"]);
    assert_eq!(rr["num_live"], 0, "nothing new happened");
    assert!(rr.get("required_state").is_none(), "the name was sent already: {rr}");
    // The same config again: nothing to send.
    let r3 = ss(&alice, Some(&pos_of(&r2)), 0, big).await.ok();
    assert!(r3["rooms"].as_object().unwrap().is_empty(), "{r3}");
    // Back to the smaller limit: nothing new, nothing sent; a new message comes alone.
    let r4 = ss(&alice, Some(&pos_of(&r3)), 0, small.clone()).await.ok();
    assert!(r4["rooms"].as_object().unwrap().is_empty(), "{r4}");
    alice.send_text(&room, "m3").await;
    let r5 = ss(&alice, Some(&pos_of(&r4)), 0, small).await.ok();
    let rr = &r5["rooms"][&room];
    assert_eq!(bodies(&rr["timeline"]), vec!["m3"]);
    assert!(rr.get("unstable_expanded_timeline").is_none() && rr.get("initial").is_none(), "{rr}");
}

/// Per-room `required_state` changes between requests (Synapse's connection state): entries newly asked for come
/// at once with their current state; entries already sent only when they change; an entry dropped and asked for
/// again is not resent when unchanged, and is when it changed in between.
#[tokio::test]
async fn required_state_changes_send_only_new_or_changed_entries() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let room = alice.create_room(json!({"name": "first", "topic": "t1"})).await;
    let with = |rs: Value| json!({"room_subscriptions": {room.clone(): {"timeline_limit": 1, "required_state": rs}}});
    let types = |v: &Value| -> Vec<String> {
        let mut t: Vec<String> = v["rooms"][&room]["required_state"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| e["type"].as_str().unwrap().to_owned())
            .collect();
        t.sort();
        t
    };
    let r = ss(&alice, None, 0, with(json!([["m.room.name", ""]]))).await.ok();
    assert_eq!(types(&r), vec!["m.room.name"]);
    // The topic newly asked for: the room comes at once with the topic only.
    let r2 = ss(&alice, Some(&pos_of(&r)), 0, with(json!([["m.room.name", ""], ["m.room.topic", ""]]))).await.ok();
    assert_eq!(types(&r2), vec!["m.room.topic"], "{r2}");
    assert!(r2["rooms"][&room].get("initial").is_none());
    assert_eq!(r2["rooms"][&room]["required_state"][0]["content"]["topic"], "t1");
    // Dropped, then asked for again, unchanged: nothing to send.
    let r3 = ss(&alice, Some(&pos_of(&r2)), 0, with(json!([["m.room.name", ""]]))).await.ok();
    assert!(r3["rooms"].as_object().unwrap().is_empty(), "{r3}");
    let r4 = ss(&alice, Some(&pos_of(&r3)), 0, with(json!([["m.room.name", ""], ["m.room.topic", ""]]))).await.ok();
    assert!(r4["rooms"].as_object().unwrap().is_empty(), "the topic did not change: {r4}");
    // Dropped, changed while not asked for, asked for again: sent.
    let r5 = ss(&alice, Some(&pos_of(&r4)), 0, with(json!([["m.room.name", ""]]))).await.ok();
    alice.put_state(&room, "m.room.topic", "", json!({"topic": "t2"})).await.ok();
    let r6 = ss(&alice, Some(&pos_of(&r5)), 0, with(json!([["m.room.name", ""]]))).await.ok();
    assert!(types(&r6).is_empty(), "the topic is not asked for: {r6}");
    let r7 = ss(&alice, Some(&pos_of(&r6)), 0, with(json!([["m.room.name", ""], ["m.room.topic", ""]]))).await.ok();
    assert_eq!(types(&r7), vec!["m.room.topic"], "{r7}");
    assert_eq!(r7["rooms"][&room]["required_state"][0]["content"]["topic"], "t2");
    // A change of an entry asked for all along: only it.
    alice.put_state(&room, "m.room.name", "", json!({"name": "second"})).await.ok();
    let r8 = ss(&alice, Some(&pos_of(&r7)), 0, with(json!([["m.room.name", ""], ["m.room.topic", ""]]))).await.ok();
    assert_eq!(types(&r8), vec!["m.room.name"], "{r8}");
    // A wildcard newly asked for: the state it adds (the create event, power levels, ...), not the name or topic.
    let r9 = ss(&alice, Some(&pos_of(&r8)), 0, with(json!([["*", "*"]]))).await.ok();
    let t9 = types(&r9);
    assert!(t9.contains(&"m.room.create".to_owned()) && t9.contains(&"m.room.member".to_owned()), "{t9:?}");
    assert!(!t9.contains(&"m.room.name".to_owned()) && !t9.contains(&"m.room.topic".to_owned()), "{t9:?}");
}

/// As MSC4186 and Synapse have it, `lists` and `room_subscriptions` are not sticky: each request says all it wants
/// (matrix-rust-sdk sends them every time), and a list or subscription left out of a request is not served. What
/// the connection keeps is what it sent: a room that comes back into a list or subscription is sent only if
/// something happened in it meanwhile, and then not `initial`, with just the events since it was last sent.
#[tokio::test]
async fn lists_and_subscriptions_are_not_sticky_but_the_connection_remembers_its_rooms() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let a = alice.create_room(json!({"name": "a"})).await;
    let b = alice.create_room(json!({"name": "b"})).await;
    let lists = json!({"lists": {"all": list(json!([[0, 10]]), 5)}});
    let r = ss(&alice, None, 0, lists.clone()).await.ok();
    assert_eq!(r["rooms"].as_object().unwrap().len(), 2);
    // A request without the list: the list is not served (no count, no rooms), even when a room changes.
    alice.send_text(&a, "while away").await;
    let r2 = ss(&alice, Some(&pos_of(&r)), 0, json!({})).await.ok();
    assert!(r2["lists"].get("all").is_none(), "{r2}");
    assert!(r2["rooms"].as_object().unwrap().is_empty(), "{r2}");
    // The list again: only the room that changed, not initial, with the events since it was last sent.
    let r3 = ss(&alice, Some(&pos_of(&r2)), 0, lists.clone()).await.ok();
    assert_eq!(r3["lists"]["all"]["count"], 2);
    assert_eq!(r3["rooms"].as_object().unwrap().keys().collect::<Vec<_>>(), vec![&a], "{r3}");
    assert!(r3["rooms"][&a].get("initial").is_none());
    assert_eq!(bodies(&r3["rooms"][&a]["timeline"]), vec!["while away"]);
    // A subscription is served while it is asked for only.
    let sub = json!({"room_subscriptions": {b.clone(): {"timeline_limit": 5}}});
    let r4 = ss(&alice, Some(&pos_of(&r3)), 0, sub.clone()).await.ok();
    assert!(r4["rooms"].as_object().unwrap().is_empty(), "b was sent with this config already: {r4}");
    alice.send_text(&b, "one").await;
    let r5 = ss(&alice, Some(&pos_of(&r4)), 0, sub.clone()).await.ok();
    assert_eq!(bodies(&r5["rooms"][&b]["timeline"]), vec!["one"]);
    alice.send_text(&b, "two").await;
    let r6 = ss(&alice, Some(&pos_of(&r5)), 0, json!({})).await.ok();
    assert!(r6["rooms"].as_object().unwrap().is_empty(), "the subscription was dropped: {r6}");
    let r7 = ss(&alice, Some(&pos_of(&r6)), 0, sub).await.ok();
    assert_eq!(bodies(&r7["rooms"][&b]["timeline"]), vec!["two"], "{r7}");
    assert!(r7["rooms"][&b].get("initial").is_none());
    // Another connection of the same device keeps its own state: everything is new to it.
    let mut other = lists.clone();
    other["conn_id"] = json!("other");
    let r8 = ss(&alice, None, 0, other).await.ok();
    assert_eq!(r8["rooms"][&a]["initial"], true);
}

#[tokio::test]
async fn tags_and_not_tags_filter_lists() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let fav = alice.create_room(json!({"name": "fav"})).await;
    let both = alice.create_room(json!({"name": "both"})).await;
    let low = alice.create_room(json!({"name": "low"})).await;
    let plain = alice.create_room(json!({"name": "plain"})).await;
    let tag = |room: &str, tag: &str| format!("/user/{}/rooms/{}/tags/{}", enc(&alice.user_id), enc(room), tag);
    alice.put(&tag(&fav, "m.favourite"), json!({"order": 0.5})).await.ok();
    alice.put(&tag(&both, "m.favourite"), json!({})).await.ok();
    alice.put(&tag(&both, "u.work"), json!({})).await.ok();
    alice.put(&tag(&low, "m.lowpriority"), json!({})).await.ok();
    let lists = json!({
        "favs": {"ranges": [[0, 20]], "filters": {"tags": ["m.favourite"]}},
        "favs_not_work": {"ranges": [[0, 20]], "filters": {"tags": ["m.favourite"], "not_tags": ["u.work"]}},
        "any_of": {"ranges": [[0, 20]], "filters": {"tags": ["u.work", "m.lowpriority"]}},
        "not_low": {"ranges": [[0, 20]], "filters": {"not_tags": ["m.lowpriority"]}},
        "none": {"ranges": [[0, 20]], "filters": {"tags": []}},
        "all": {"ranges": [[0, 20]], "filters": {"not_tags": []}},
    });
    let r = ss(&alice, None, 0, json!({"lists": lists})).await.ok();
    let count = |l: &str| r["lists"][l]["count"].as_u64().unwrap();
    assert_eq!(count("favs"), 2, "{r}");
    assert_eq!(count("favs_not_work"), 1, "not_tags wins over tags");
    assert_eq!(count("any_of"), 2);
    assert_eq!(count("not_low"), 3);
    assert_eq!(count("none"), 0, "an empty `tags` matches no room");
    assert_eq!(count("all"), 4);
    // Untagging moves a room out of the list.
    alice.delete(&tag(&fav, "m.favourite"), json!({})).await.ok();
    let only =
        json!({"lists": {"favs": {"ranges": [[0, 20]], "timeline_limit": 1, "filters": {"tags": ["m.favourite"]}}}});
    let r2 = ss(&alice, None, 0, only).await.ok();
    assert_eq!(r2["lists"]["favs"]["count"], 1);
    assert_eq!(r2["rooms"].as_object().unwrap().keys().collect::<Vec<_>>(), vec![&both]);
    let _ = plain;
}

/// The to-device extension's `limit`: at most that many messages per answer, `next_batch` the last one sent, and
/// the rest in the next answer (whose `since` acknowledges the first ones).
#[tokio::test]
async fn to_device_limit_pages_the_messages() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    for i in 0..5 {
        let msg = json!({"messages": {alice.user_id.clone(): {alice.device_id.clone(): {"n": i}}}});
        bob.put(&format!("/sendToDevice/m.test/t{i}"), msg).await.ok();
    }
    let ext = |since: Option<&str>| {
        let mut td = json!({"enabled": true, "limit": 2});
        if let Some(s) = since {
            td["since"] = json!(s);
        }
        json!({"extensions": {"to_device": td}})
    };
    let mut got = Vec::new();
    let (mut pos, mut since) = (None::<String>, None::<String>);
    for round in 0..3 {
        let r = ss(&alice, pos.as_deref(), 0, ext(since.as_deref())).await.ok();
        let td = &r["extensions"]["to_device"];
        let events = td["events"].as_array().unwrap();
        assert_eq!(events.len(), if round < 2 { 2 } else { 1 }, "round {round}: {td}");
        got.extend(events.iter().map(|e| e["content"]["n"].as_i64().unwrap()));
        since = Some(td["next_batch"].as_str().unwrap().to_owned());
        pos = Some(pos_of(&r));
    }
    assert_eq!(got, vec![0, 1, 2, 3, 4], "every message once, in order");
    let r = ss(&alice, pos.as_deref(), 0, ext(since.as_deref())).await.ok();
    assert!(r["extensions"]["to_device"]["events"].as_array().unwrap().is_empty());
}

/// A lazily joined (partial-state) room is listed at once, with its name, a timeline and the `$LAZY` members of
/// its senders taken from what Hearth holds; when the resync ends, a waiting request wakes and the room comes
/// again (`initial`) with the exact member count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazily_joined_room_is_listed_at_once_and_counted_exactly_after_its_resync() {
    use common::fake_resident::*;
    let hearth = start_hearth().await;
    // 600 members, as in the acceptance of issue #19.
    let fake = FakeResident::start(RoomSpec { members: 600, ..RoomSpec::default() }).await;
    fake.connect_to(&hearth);
    fake.hold("state_ids");
    let alice = hearth.user("alice").await;
    let room = fake.room_id();
    let user3 = fake.user("user3");
    let started = std::time::Instant::now();
    join_via(&alice, &fake).await;
    fake.wait_requests("state_ids", 1, Duration::from_secs(60)).await;
    let m1 = fake.append(EventSpec::message(&user3, "hello from user3"));
    fake.push(&[&m1.id]).await;

    let body = json!({"lists": {"all": {"ranges": [[0, 10]], "timeline_limit": 5,
        "required_state": [["m.room.name", ""], ["m.room.member", "$LAZY"], ["m.room.create", ""]]}}});
    let r = ss(&alice, None, 0, body.clone()).await.ok();
    let listed = started.elapsed();
    let rr = r["rooms"].get(&room).unwrap_or_else(|| panic!("the partial room is listed at once: {r}"));
    assert!(listed < Duration::from_secs(2), "listed {listed:?} after /join");
    assert!(rr["name"].is_string(), "{rr}");
    let timeline = rr["timeline"].as_array().expect("a timeline");
    assert!(timeline.iter().any(|e| e["event_id"] == json!(m1.id)), "{timeline:?}");
    let rs = rr["required_state"].as_array().unwrap();
    assert!(
        rs.iter().any(|e| e["type"] == "m.room.member" && e["state_key"] == json!(user3)),
        "user3's membership: {rs:?}"
    );
    let expected = fake.joined_members().len() as i64;
    let partial_count = rr["joined_count"].as_i64().unwrap();
    assert!(partial_count < expected, "members were omitted: {partial_count} of {expected}");

    // The resync ends: a waiting request wakes with the room again, counted exactly.
    let mut pos = pos_of(&r);
    fake.release("state_ids");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let again = loop {
        let r = ss(&alice, Some(&pos), 10_000, body.clone()).await.ok();
        if let Some(rr) = r["rooms"].get(&room) {
            if rr["joined_count"] == expected {
                break rr.clone();
            }
        }
        assert!(std::time::Instant::now() < deadline, "the room never came again with its exact count");
        pos = pos_of(&r);
    };
    assert_eq!(again["initial"], true, "{again}");
    hearth.stop().await;
}

#[tokio::test]
async fn an_accepted_invite_comes_again_as_a_joined_room() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = bob.create_room(json!({"name": "party", "invite": [alice.user_id]})).await;
    bob.send_text(&room, "come in").await;
    let body = json!({"lists": {"all": list(json!([[0, 10]]), 5)}});
    let r = ss(&alice, None, 0, body.clone()).await.ok();
    let inv = &r["rooms"][&room];
    assert!(inv["invite_state"].is_array() && inv.get("timeline").is_none(), "{inv}");
    // Unchanged: not resent.
    let idle = ss(&alice, Some(&pos_of(&r)), 0, body.clone()).await.ok();
    assert!(idle["rooms"].as_object().unwrap().is_empty());
    alice.join(&room).await.ok();
    let r2 = ss(&alice, Some(&pos_of(&idle)), 0, body).await.ok();
    let joined = &r2["rooms"][&room];
    assert_eq!(joined["initial"], true);
    assert!(joined.get("invite_state").is_none());
    assert_eq!(joined["name"], "party");
    assert!(bodies(&joined["timeline"]).contains(&"come in".to_owned()), "{joined}");
    assert_eq!(joined["joined_count"], 2);
}

/// State is read from `required_state` alone (matrix-rust-sdk ignores state on the timeline): an event both on the
/// timeline and asked for as state is in both.
#[tokio::test]
async fn required_state_holds_state_that_is_also_on_the_timeline() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let room = alice.create_room(json!({"name": "named"})).await;
    let r = ss(&alice, None, 0, json!({"lists": {"all": list(json!([[0, 0]]), 50)}})).await.ok();
    let rr = &r["rooms"][&room];
    let on_timeline = rr["timeline"].as_array().unwrap().iter().any(|e| e["type"] == "m.room.name");
    assert!(on_timeline, "{rr}");
    assert_eq!(rr["required_state"][0]["content"]["name"], "named", "{rr}");
}

#[tokio::test]
async fn a_read_receipt_sends_the_room_again_with_its_counts() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    bob.join(&room).await.ok();
    let ev = bob.send_text(&room, "unread").await;
    let body = json!({"lists": {"all": list(json!([[0, 5]]), 1)}});
    let r = ss(&alice, None, 0, body.clone()).await.ok();
    assert_eq!(r["rooms"][&room]["notification_count"], 1);
    // Read on another device.
    let mut phone = s.client();
    phone.login("alice", common::PASSWORD).await.ok();
    phone.post(&format!("/rooms/{}/receipt/m.read/{}", enc(&room), enc(&ev)), json!({})).await.ok();
    let r2 = ss(&alice, Some(&pos_of(&r)), 0, body).await.ok();
    let rr = &r2["rooms"][&room];
    assert_eq!(rr["notification_count"], 0, "{r2}");
    assert!(rr.get("initial").is_none() && rr.get("timeline").is_none(), "{rr}");
}

/// A room the user left is sent with the state at their leave, not the room's state since: its name, the state
/// the client asked for and the member counts. A user never joined (a rejected invite) gets none of its state.
#[tokio::test]
async fn a_left_room_shows_the_state_at_the_leave() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let carol = s.user("carol").await;
    let room = alice.create_room(json!({"preset": "public_chat", "name": "before"})).await;
    let invited = alice.create_room(json!({"preset": "private_chat", "name": "invited"})).await;
    bob.join(&room).await.ok();
    alice.invite(&invited, &bob.user_id).await.ok();
    let body = json!({"lists": {"all": {"ranges": [[0, 10]], "timeline_limit": 5, "required_state": [["*", "*"]]}}});
    let pos = pos_of(&ss(&bob, None, 0, body.clone()).await.ok());
    alice.post(&format!("/rooms/{}/kick", enc(&room)), json!({"user_id": bob.user_id})).await.ok();
    bob.leave(&invited).await.ok();
    for r in [&room, &invited] {
        alice.put_state(r, "m.room.name", "", json!({"name": "after bob"})).await.ok();
        alice.put_state(r, "m.room.topic", "", json!({"topic": "secret topic"})).await.ok();
    }
    carol.join(&room).await.ok();
    let r = ss(&bob, Some(&pos), 0, body).await.ok();
    let left = &r["rooms"][&room];
    assert_eq!(left["name"], "before", "{left}");
    assert_eq!(left["joined_count"], 1, "alice alone at the kick: {left}");
    let text = left.to_string();
    assert!(!text.contains("after bob") && !text.contains("secret topic") && !text.contains(&carol.user_id), "{text}");
    let rejected = &r["rooms"][&invited];
    assert!(rejected.is_object(), "the rejection is sent: {r}");
    let text = rejected.to_string();
    assert!(rejected.get("required_state").is_none() && rejected.get("name").is_none(), "{text}");
    assert!(!text.contains("after bob") && !text.contains("secret topic") && !text.contains("\"invited\""), "{text}");
    s.stop().await;
}
