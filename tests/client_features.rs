//! Client features real clients rely on, over HTTP: server-side key backup (`/room_keys/*`), room tags, ignored
//! users and notification counts from push rules (presence: tests/presence.rs).

mod common;

use common::*;

fn key(fmi: i64, fc: i64, verified: bool, marker: &str) -> Value {
    json!({"first_message_index": fmi, "forwarded_count": fc, "is_verified": verified,
           "session_data": {"ephemeral": marker, "ciphertext": "c", "mac": "m"}})
}

// ---- key backup -----------------------------------------------------------------------------------------------

#[tokio::test]
async fn key_backup_versions_and_keys() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = "!room:localhost";
    let r = enc(room);

    alice.get("/room_keys/version").await.assert_err(404, "M_NOT_FOUND");
    let algo = "m.megolm_backup.v1.curve25519-aes-sha2";
    let v1 =
        alice.post("/room_keys/version", json!({"algorithm": algo, "auth_data": {"public_key": "pk1"}})).await.ok()
            ["version"]
            .as_str()
            .unwrap()
            .to_owned();
    let info = alice.get("/room_keys/version").await.ok();
    assert_eq!(
        (info["version"].as_str(), info["algorithm"].as_str(), info["count"].as_i64()),
        (Some(v1.as_str()), Some(algo), Some(0))
    );
    assert_eq!(info["auth_data"]["public_key"], "pk1");
    // Another user's backup is separate.
    bob.get("/room_keys/version").await.assert_err(404, "M_NOT_FOUND");

    // Keys: all rooms, one room, one session.
    let put = alice
        .put(
            &format!("/room_keys/keys?version={v1}"),
            json!({"rooms": {room: {"sessions": {"s1": key(5, 0, false, "a"), "s2": key(0, 0, false, "b")}}}}),
        )
        .await
        .ok();
    assert_eq!(put["count"], 2);
    let etag1 = put["etag"].as_str().unwrap().to_owned();
    alice.put(&format!("/room_keys/keys/{r}/s3?version={v1}"), key(0, 0, true, "c")).await.ok();
    let all = alice.get(&format!("/room_keys/keys?version={v1}")).await.ok();
    assert_eq!(all["rooms"][room]["sessions"].as_object().unwrap().len(), 3);
    assert_eq!(
        alice.get(&format!("/room_keys/keys/{r}?version={v1}")).await.ok()["sessions"]["s2"]["session_data"]
            ["ephemeral"],
        "b"
    );
    assert_eq!(alice.get(&format!("/room_keys/keys/{r}/s3?version={v1}")).await.ok()["is_verified"], true);
    alice.get(&format!("/room_keys/keys/{r}/nosuch?version={v1}")).await.assert_err(404, "M_NOT_FOUND");
    assert_eq!(
        alice.get(&format!("/room_keys/keys/{}?version={v1}", enc("!other:localhost"))).await.ok(),
        json!({"sessions": {}})
    );

    // A worse key does not replace a better one; a better one does (and changes the etag).
    let same = alice.put(&format!("/room_keys/keys/{r}/s1?version={v1}"), key(9, 0, false, "worse")).await.ok();
    assert_eq!(same["etag"], json!(alice.get("/room_keys/version").await.ok()["etag"]));
    assert_eq!(alice.get(&format!("/room_keys/keys/{r}/s1?version={v1}")).await.ok()["session_data"]["ephemeral"], "a");
    let better = alice.put(&format!("/room_keys/keys/{r}/s1?version={v1}"), key(1, 0, false, "better")).await.ok();
    assert_ne!(better["etag"].as_str().unwrap(), etag1);
    assert_eq!(
        alice.get(&format!("/room_keys/keys/{r}/s1?version={v1}")).await.ok()["session_data"]["ephemeral"],
        "better"
    );
    alice.put(&format!("/room_keys/keys/{r}/s3?version={v1}"), key(0, 0, false, "unverified")).await.ok();
    assert_eq!(alice.get(&format!("/room_keys/keys/{r}/s3?version={v1}")).await.ok()["session_data"]["ephemeral"], "c");

    // Update auth_data (the algorithm cannot change); a new version makes the old one read-only.
    alice
        .put(&format!("/room_keys/version/{v1}"), json!({"algorithm": algo, "auth_data": {"public_key": "pk1b"}}))
        .await
        .ok();
    assert_eq!(alice.get(&format!("/room_keys/version/{v1}")).await.ok()["auth_data"]["public_key"], "pk1b");
    alice
        .put(&format!("/room_keys/version/{v1}"), json!({"algorithm": "other", "auth_data": {}}))
        .await
        .assert_err(400, "M_INVALID_PARAM");
    let v2 =
        alice.post("/room_keys/version", json!({"algorithm": algo, "auth_data": {"public_key": "pk2"}})).await.ok()
            ["version"]
            .as_str()
            .unwrap()
            .to_owned();
    assert_ne!(v1, v2);
    assert_eq!(alice.get("/room_keys/version").await.ok()["version"], json!(v2));
    // The algorithm is opaque to the server: another of the megolm backup family is stored as given (as Synapse
    // does); a name outside it is refused.
    let other = alice.post("/room_keys/version", json!({"algorithm": "m.megolm_backup.v1", "auth_data": {}})).await;
    let v3 = other.ok()["version"].as_str().unwrap().to_owned();
    assert_eq!(alice.get(&format!("/room_keys/version/{v3}")).await.ok()["algorithm"], "m.megolm_backup.v1");
    alice.delete(&format!("/room_keys/version/{v3}"), json!({})).await.ok();
    for bad in ["", "AAA"] {
        let r = alice.post("/room_keys/version", json!({"algorithm": bad, "auth_data": {}})).await;
        r.assert_err(400, "M_INVALID_PARAM");
    }
    let wrong = alice.put(&format!("/room_keys/keys/{r}/s9?version={v1}"), key(0, 0, false, "x")).await;
    wrong.assert_err(403, "M_WRONG_ROOM_KEYS_VERSION");
    assert_eq!(wrong.body["current_version"], json!(v2));
    alice
        .put(&format!("/room_keys/keys/{r}/s9?version=999"), key(0, 0, false, "x"))
        .await
        .assert_err(404, "M_NOT_FOUND");
    alice.put(&format!("/room_keys/keys/{r}/s9"), key(0, 0, false, "x")).await.assert_err(400, "M_MISSING_PARAM");
    alice
        .put(&format!("/room_keys/keys/{r}/s9?version={v2}"), json!({"bad": true}))
        .await
        .assert_err(400, "M_BAD_JSON");
    // Old keys stay readable.
    assert_eq!(
        alice.get(&format!("/room_keys/keys?version={v1}")).await.ok()["rooms"][room]["sessions"]
            .as_object()
            .unwrap()
            .len(),
        3
    );

    // Deleting keys, then a version (its keys go with it).
    let del = alice.delete(&format!("/room_keys/keys/{r}/s2?version={v1}"), json!({})).await.ok();
    assert_eq!(del["count"], 2);
    alice.delete(&format!("/room_keys/keys?version={v1}"), json!({})).await.ok();
    assert_eq!(alice.get(&format!("/room_keys/keys?version={v1}")).await.ok(), json!({"rooms": {}}));
    alice.delete(&format!("/room_keys/version/{v2}"), json!({})).await.ok();
    assert_eq!(alice.get("/room_keys/version").await.ok()["version"], json!(v1));
    alice.get(&format!("/room_keys/version/{v2}")).await.assert_err(404, "M_NOT_FOUND");
    alice.delete(&format!("/room_keys/version/{v2}"), json!({})).await.assert_err(404, "M_NOT_FOUND");
    s.client().get("/room_keys/version").await.assert_err(401, "M_MISSING_TOKEN");
    s.stop().await;
}

// ---- E2EE keys over federation (two Hearths) ------------------------------------------------------------------

use base64::Engine;
use common::fake_resident::federated_pair;
use ring::signature::{Ed25519KeyPair, KeyPair};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes)
}

/// A fresh ed25519 key: (pair, unpadded base64 public key).
fn ed25519() -> (Ed25519KeyPair, String) {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    let public = b64(pair.public_key().as_ref());
    (pair, public)
}

/// Signs `obj` (canonical JSON without `signatures` and `unsigned`) as `user` with `key` under `key_id`.
fn sign(obj: &mut Value, user: &str, key_id: &str, key: &Ed25519KeyPair) {
    let mut content = obj.clone();
    content.as_object_mut().unwrap().remove("signatures");
    content.as_object_mut().unwrap().remove("unsigned");
    let canonical = ruma::canonical_json::CanonicalJsonValue::try_from(content).unwrap().to_string();
    obj["signatures"][user][key_id] = json!(b64(key.sign(canonical.as_bytes()).as_ref()));
}

fn device_keys(c: &Client) -> Value {
    json!({
        "user_id": c.user_id, "device_id": c.device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {format!("curve25519:{}", c.device_id): "curve", format!("ed25519:{}", c.device_id): "ed"},
        "signatures": {c.user_id.clone(): {format!("ed25519:{}", c.device_id): "sig"}},
    })
}

fn to_device_of(sync: &Value) -> Vec<Value> {
    sync["to_device"]["events"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2ee_keys_to_device_and_device_lists_over_federation() {
    let (a, b) = federated_pair().await;
    let mut alice = a.user("alice").await;
    let bob = b.user("bob").await;

    // Alice's device keys, a one-time key, a fallback key and cross-signing keys.
    alice
        .post(
            "/keys/upload",
            json!({
                "device_keys": device_keys(&alice),
                "one_time_keys": {"signed_curve25519:AAAA": {"key": "otk1", "signatures": {}}},
                "fallback_keys": {"signed_curve25519:FFFF": {"key": "fallback1", "fallback": true, "signatures": {}}},
            }),
        )
        .await
        .ok();
    let ((master, mpub), (_, spub), (_, upub)) = (ed25519(), ed25519(), ed25519());
    let cross = |usage: &str, public: &str| json!({"user_id": alice.user_id, "usage": [usage], "keys": {format!("ed25519:{public}"): public}});
    let master_id = format!("ed25519:{mpub}");
    let (mut ssk, mut usk) = (cross("self_signing", &spub), cross("user_signing", &upub));
    sign(&mut ssk, &alice.user_id, &master_id, &master);
    sign(&mut usk, &alice.user_id, &master_id, &master);
    alice
        .post(
            "/keys/device_signing/upload",
            json!({"master_key": cross("master", &mpub), "self_signing_key": ssk, "user_signing_key": usk}),
        )
        .await
        .ok();

    // Bob (on B) queries Alice's keys: B asks A over federation. Master and self-signing keys come along; the
    // user-signing key and device display names stay private.
    let q = bob.post("/keys/query", json!({"device_keys": {alice.user_id.clone(): []}})).await.ok();
    assert_eq!(q["failures"], json!({}), "{q}");
    let dk = &q["device_keys"][&alice.user_id][&alice.device_id];
    assert_eq!(dk["keys"][format!("curve25519:{}", alice.device_id)], "curve", "{q}");
    assert!(dk.get("unsigned").is_none(), "device display names are not shared over federation: {dk}");
    assert_eq!(q["master_keys"][&alice.user_id]["keys"][&master_id], json!(mpub), "{q}");
    assert_eq!(q["self_signing_keys"][&alice.user_id]["keys"][format!("ed25519:{spub}")], json!(spub), "{q}");
    assert!(q["user_signing_keys"].get(&alice.user_id).is_none(), "{q}");

    // Claims over federation: the one-time key first, then the fallback key.
    let claim = json!({"one_time_keys": {alice.user_id.clone(): {alice.device_id.clone(): "signed_curve25519"}}});
    let c1 = bob.post("/keys/claim", claim.clone()).await.ok();
    assert_eq!(c1["one_time_keys"][&alice.user_id][&alice.device_id]["signed_curve25519:AAAA"]["key"], "otk1", "{c1}");
    let c2 = bob.post("/keys/claim", claim).await.ok();
    assert_eq!(
        c2["one_time_keys"][&alice.user_id][&alice.device_id]["signed_curve25519:FFFF"]["key"], "fallback1",
        "{c2}"
    );

    // /user/devices carries the cross-signing keys too.
    let fed_b = b.running.services.federation.as_ref().unwrap();
    let devices = fed_b
        .client
        .get("hearth-a.test", &format!("/_matrix/federation/v1/user/devices/{}", enc(&alice.user_id)))
        .await
        .unwrap();
    assert_eq!(devices["master_key"]["keys"][&master_id], json!(mpub), "{devices}");
    assert!(devices["self_signing_key"].is_object(), "{devices}");

    // To-device messages both ways over federation.
    let a_since = alice.sync(None, &[]).await.ok()["next_batch"].as_str().unwrap().to_owned();
    let b_since = bob.sync(None, &[]).await.ok()["next_batch"].as_str().unwrap().to_owned();
    let msg =
        |to: &Client, body: &str| json!({"messages": {to.user_id.clone(): {to.device_id.clone(): {"body": body}}}});
    bob.put(&format!("/sendToDevice/m.test/{}", bob.next_txn()), msg(&alice, "to alice")).await.ok();
    alice.put(&format!("/sendToDevice/m.test/{}", alice.next_txn()), msg(&bob, "to bob")).await.ok();
    let got = wait_until("alice's to-device message", std::time::Duration::from_secs(20), || async {
        let s = alice.sync(Some(&a_since), &[("timeout", "1000")]).await.ok();
        to_device_of(&s).into_iter().find(|e| e["content"]["body"] == "to alice")
    })
    .await;
    assert_eq!((got["sender"].as_str(), got["type"].as_str()), (Some(bob.user_id.as_str()), Some("m.test")));
    let got = wait_until("bob's to-device message", std::time::Duration::from_secs(20), || async {
        let s = bob.sync(Some(&b_since), &[("timeout", "1000")]).await.ok();
        to_device_of(&s).into_iter().find(|e| e["content"]["body"] == "to bob")
    })
    .await;
    assert_eq!(got["sender"].as_str(), Some(alice.user_id.as_str()));

    // Device list updates: once they share a room, a new device of Alice reaches Bob's /sync device_lists.
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    let joined = bob.post(&format!("/join/{}?server_name=hearth-a.test", enc(&room)), json!({})).await;
    assert_eq!(joined.status, 200, "{}", joined.text);
    let since = bob.sync(None, &[]).await.ok()["next_batch"].as_str().unwrap().to_owned();
    alice.login("alice", PASSWORD).await.ok();
    alice.post("/keys/upload", json!({"device_keys": device_keys(&alice)})).await.ok();
    let changed = wait_until("alice in bob's device_lists.changed", std::time::Duration::from_secs(20), || async {
        let s = bob.sync(Some(&since), &[("timeout", "1000")]).await.ok();
        let changed = s["device_lists"]["changed"].as_array().cloned().unwrap_or_default();
        changed.iter().any(|u| u == &json!(alice.user_id)).then_some(changed)
    })
    .await;
    assert!(!changed.is_empty());
    let q = bob.post("/keys/query", json!({"device_keys": {alice.user_id.clone(): []}})).await.ok();
    assert!(q["device_keys"][&alice.user_id].get(&alice.device_id).is_some(), "the new device is visible to Bob: {q}");
    a.stop().await;
    b.stop().await;
}

// ---- tags, ignored users, notification counts -------------------------------------------------------------------

#[tokio::test]
async fn room_tags_round_trip_and_sync() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = alice.create_room(json!({})).await;
    let base = format!("/user/{}/rooms/{}/tags", enc(&alice.user_id), enc(&room));
    assert_eq!(alice.get(&base).await.ok(), json!({"tags": {}}));
    let since = alice.sync(None, &[]).await.ok()["next_batch"].as_str().unwrap().to_owned();
    alice.put(&format!("{base}/m.favourite"), json!({"order": 0.25})).await.ok();
    alice.put(&format!("{base}/u.work"), json!({})).await.ok();
    assert_eq!(alice.get(&base).await.ok(), json!({"tags": {"m.favourite": {"order": 0.25}, "u.work": {}}}));
    // Tags reach the user's clients as the room's m.tag account data.
    let sync = alice.sync(Some(&since), &[]).await.ok();
    let tag_event = events_of(&sync["rooms"]["join"][&room]["account_data"])
        .into_iter()
        .find(|e| e["type"] == "m.tag")
        .expect("m.tag in sync");
    assert_eq!(tag_event["content"]["tags"]["m.favourite"]["order"], 0.25);
    alice.delete(&format!("{base}/u.work"), json!({})).await.ok();
    assert_eq!(alice.get(&base).await.ok(), json!({"tags": {"m.favourite": {"order": 0.25}}}));
    // Errors: someone else's tags, a bad order, a bad room id.
    bob.get(&base).await.assert_err(403, "M_FORBIDDEN");
    bob.put(&format!("{base}/x"), json!({})).await.assert_err(403, "M_FORBIDDEN");
    alice.put(&format!("{base}/x"), json!({"order": "first"})).await.assert_err(400, "M_BAD_JSON");
    alice.get(&format!("/user/{}/rooms/not-a-room/tags", enc(&alice.user_id))).await.assert_err(400, "M_INVALID_PARAM");
    s.stop().await;
}

fn counts(sync: &Value, room: &str) -> (i64, i64) {
    let u = &sync["rooms"]["join"][room]["unread_notifications"];
    (u["notification_count"].as_i64().unwrap_or(-1), u["highlight_count"].as_i64().unwrap_or(-1))
}

#[tokio::test]
async fn unread_notification_counts_follow_push_rules_and_receipts() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let carol = s.user("carol").await;
    alice
        .put(&format!("/profile/{}/displayname", enc(&alice.user_id)), json!({"displayname": "Alice Wonder"}))
        .await
        .ok();
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    bob.join(&room).await.ok();
    carol.join(&room).await.ok();
    assert_eq!(counts(&alice.sync(None, &[]).await.ok(), &room), (0, 0));

    for i in 0..3 {
        bob.send_text(&room, &format!("plain {i}")).await;
    }
    assert_eq!(counts(&alice.sync(None, &[]).await.ok(), &room), (3, 0));
    bob.send_text(&room, "hello Alice Wonder").await; // display name: highlight
    bob.send_text(&room, "ping alice").await; // user name: highlight
    bob.send(
        &room,
        "m.room.message",
        json!({"msgtype": "m.text", "body": "x", "m.mentions": {"user_ids": [alice.user_id]}}),
    )
    .await
    .ok();
    bob.send(&room, "m.room.message", json!({"msgtype": "m.notice", "body": "a bot says"})).await.ok(); // suppressed
    bob.send_text(&room, "@room everyone").await; // bob has no notification power: a plain notification
    bob.send(&room, "m.reaction", json!({"m.relates_to": {"rel_type": "m.annotation", "event_id": "$x", "key": "+1"}}))
        .await
        .ok();
    assert_eq!(counts(&alice.sync(None, &[]).await.ok(), &room), (7, 3));

    // A read receipt on the latest event clears them; later events count again.
    let last = carol.send_text(&room, "from carol").await;
    let since = alice.sync(None, &[]).await.ok()["next_batch"].as_str().unwrap().to_owned();
    alice.post(&format!("/rooms/{}/receipt/m.read/{}", enc(&room), enc(&last)), json!({})).await.ok();
    let after = alice.sync(Some(&since), &[]).await.ok();
    assert_eq!(counts(&after, &room), (0, 0), "{}", after["rooms"]);
    alice.send_text(&room, "my own message").await;
    bob.send_text(&room, "one more").await;
    assert_eq!(counts(&alice.sync(None, &[]).await.ok(), &room), (1, 0));
    // Sending a message marks everything before it read.
    alice.send_text(&room, "caught up").await;
    assert_eq!(counts(&alice.sync(None, &[]).await.ok(), &room), (0, 0));

    // The creator (power 100) may notify the room: @room highlights for bob.
    alice.send_text(&room, "@room meeting now").await;
    assert_eq!(counts(&bob.sync(None, &[]).await.ok(), &room).1, 1);

    // User rules count: disabling .m.rule.message silences plain messages.
    alice.put("/pushrules/global/underride/.m.rule.message/enabled", json!({"enabled": false})).await.ok();
    bob.send_text(&room, "quiet now").await;
    bob.send_text(&room, "still pinging alice").await;
    assert_eq!(counts(&alice.sync(None, &[]).await.ok(), &room), (1, 1));
    s.stop().await;
}

#[tokio::test]
async fn ignored_users_are_filtered_from_sync_messages_and_context() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let carol = s.user("carol").await;
    let room = carol.create_room(json!({"preset": "public_chat"})).await;
    alice.join(&room).await.ok();
    bob.join(&room).await.ok();
    alice
        .put(
            &format!("/user/{}/account_data/m.ignored_user_list", enc(&alice.user_id)),
            json!({"ignored_users": {bob.user_id.clone(): {}}}),
        )
        .await
        .ok();
    let since = alice.sync(None, &[]).await.ok()["next_batch"].as_str().unwrap().to_owned();
    bob.send_text(&room, "from the ignored bob").await;
    carol.send_text(&room, "from carol").await;
    let sync = alice.sync(Some(&since), &[]).await.ok();
    let bodies: Vec<String> = events_of(&sync["rooms"]["join"][&room]["timeline"])
        .iter()
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(bodies, vec!["from carol".to_owned()]);
    assert_eq!(counts(&sync, &room), (1, 0), "bob's message is not counted");
    // ... nor in /messages and /context.
    let msgs = alice.messages(&room, &[("dir", "b"), ("limit", "10")]).await.ok();
    let senders: Vec<&str> = msgs["chunk"].as_array().unwrap().iter().filter_map(|e| e["sender"].as_str()).collect();
    assert!(!senders.contains(&bob.user_id.as_str()) && senders.contains(&carol.user_id.as_str()), "{senders:?}");
    let last =
        events_of(&sync["rooms"]["join"][&room]["timeline"]).last().unwrap()["event_id"].as_str().unwrap().to_owned();
    let ctx = alice.get(&format!("/rooms/{}/context/{}?limit=10", enc(&room), enc(&last))).await.ok();
    assert!(ctx["events_before"].as_array().unwrap().iter().all(|e| e["sender"] != json!(bob.user_id)), "{ctx}");
    // Bob (unaware) still sees everything; an invite from him does not reach alice, one from carol does.
    assert!(bob.sync(None, &[]).await.ok()["rooms"]["join"][&room].is_object());
    let from_bob = bob.create_room(json!({"invite": [alice.user_id]})).await;
    let from_carol = carol.create_room(json!({"invite": [alice.user_id]})).await;
    let sync = alice.sync(None, &[]).await.ok();
    assert!(sync["rooms"]["invite"].get(&from_bob).is_none(), "{}", sync["rooms"]["invite"]);
    assert!(sync["rooms"]["invite"].get(&from_carol).is_some(), "{}", sync["rooms"]["invite"]);
    // Un-ignoring shows new messages again.
    alice
        .put(&format!("/user/{}/account_data/m.ignored_user_list", enc(&alice.user_id)), json!({"ignored_users": {}}))
        .await
        .ok();
    let since = sync["next_batch"].as_str().unwrap().to_owned();
    bob.send_text(&room, "bob again").await;
    let sync = alice.sync(Some(&since), &[]).await.ok();
    assert!(events_of(&sync["rooms"]["join"][&room]["timeline"]).iter().any(|e| e["content"]["body"] == "bob again"));
    s.stop().await;
}

// ---- what Element-family clients probe on start-up -------------------------------------------------------------

/// GET or POST `path` with an `Origin` (as a browser sends); returns status, errcode, body and whether CORS allowed it.
async fn probe(c: &Client, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, String, Value, bool) {
    let mut req = c.http.request(method, c.url(path)).header("origin", "http://app.example");
    if let Some(t) = &c.token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    let cors = res.headers().get("access-control-allow-origin").is_some_and(|v| v == "*");
    let body: Value = res.json().await.unwrap_or(Value::Null);
    (status, body["errcode"].as_str().unwrap_or("").to_owned(), body, cors)
}

#[tokio::test]
async fn start_up_probes_get_clean_answers_with_cors() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = alice.create_room(json!({})).await;
    alice.invite(&room, &bob.user_id).await.ok();
    bob.join(&room).await.ok();
    bob.put(&format!("/profile/{}/displayname", enc(&bob.user_id)), json!({"displayname": "Bobby Tables"})).await.ok();
    let get = reqwest::Method::GET;

    let (st, _, versions, cors) = probe(&alice, get.clone(), "/_matrix/client/versions", None).await;
    assert!(st == 200 && cors);
    assert!(versions["versions"].as_array().unwrap().contains(&json!("v1.11")), "authenticated media: {versions}");
    assert_eq!(versions["unstable_features"]["org.matrix.msc3916.stable"], true);
    // No `well_known.client_base_url` here: no client discovery (404, which clients read as "keep the URL you
    // have"), with CORS like every other answer.
    let (st, code, wk, cors) = probe(&alice, get.clone(), "/.well-known/matrix/client", None).await;
    assert_eq!((st, code.as_str(), cors), (404, "M_NOT_FOUND", true), "{wk}");

    // Unstable and unsupported endpoints: 404 M_UNRECOGNIZED (clients fall back), never 500, always with CORS.
    for path in [
        "/_matrix/client/v1/auth_metadata", // OIDC (MSC2965): password login instead
        "/_matrix/client/unstable/org.matrix.msc2965/auth_issuer",
        "/_matrix/client/unstable/org.matrix.msc2697.v2/dehydrated_device", // Hydrogen
        "/_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device", // Element
    ] {
        let (st, code, body, cors) = probe(&alice, get.clone(), path, None).await;
        assert_eq!((st, code.as_str(), cors), (404, "M_UNRECOGNIZED", true), "{path}: {body}");
    }
    // `/notifications` is served (tests/push.rs), with CORS.
    let (st, _, body, cors) = probe(&alice, get.clone(), "/_matrix/client/v3/notifications", None).await;
    assert!(st == 200 && cors && body["notifications"].is_array(), "{body}");
    // Simplified sliding sync (MSC4186, Element X) is offered: advertised, and answered with CORS.
    assert_eq!(versions["unstable_features"]["org.matrix.simplified_msc3575"], true);
    let (st, _, body, cors) = probe(
        &alice,
        reqwest::Method::POST,
        "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync",
        Some(json!({})),
    )
    .await;
    assert_eq!((st, cors), (200, true), "sliding sync answers: {body}");
    assert!(body["pos"].is_string(), "{body}");

    // Routine calls with honest empty answers.
    for (path, expected) in [
        ("/pushers", json!({"pushers": []})),
        ("/thirdparty/protocols", json!({})),
        ("/voip/turnServer", json!({})),
        ("/account/3pid", json!({"threepids": []})),
    ] {
        let (st, _, body, cors) = probe(&alice, get.clone(), &format!("/_matrix/client/v3{path}"), None).await;
        assert_eq!((st, body, cors), (200, expected, true), "{path}");
    }
    for path in [
        "/_matrix/client/v3/login",
        "/_matrix/client/v3/capabilities",
        "/_matrix/client/v3/pushrules/",
        "/_matrix/client/v1/media/config",
    ] {
        let (st, _, body, cors) = probe(&alice, get.clone(), path, None).await;
        assert!(st == 200 && cors, "{path}: {st} {body}");
    }

    // The user directory finds people sharing a room (by display name or id), not strangers.
    let carol = s.user("carol").await;
    let (st, _, found, _) = probe(
        &alice,
        reqwest::Method::POST,
        "/_matrix/client/v3/user_directory/search",
        Some(json!({"search_term": "bobby"})),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(found["results"], json!([{"user_id": bob.user_id, "display_name": "Bobby Tables"}]), "{found}");
    let (_, _, found, _) = probe(
        &alice,
        reqwest::Method::POST,
        "/_matrix/client/v3/user_directory/search",
        Some(json!({"search_term": "carol"})),
    )
    .await;
    assert_eq!(found["results"], json!([]), "carol shares no room with alice: {found}");
    let public = carol.create_room(json!({"preset": "public_chat", "visibility": "public"})).await;
    assert!(!public.is_empty());
    let (_, _, found, _) = probe(
        &alice,
        reqwest::Method::POST,
        "/_matrix/client/v3/user_directory/search",
        Some(json!({"search_term": "carol"})),
    )
    .await;
    assert_eq!(found["results"][0]["user_id"], json!(carol.user_id), "carol is in a public room: {found}");

    // A preflight for an authenticated /sync from a web client.
    let pre = alice
        .http
        .request(reqwest::Method::OPTIONS, alice.url("/sync"))
        .header("origin", "http://app.example")
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .unwrap();
    assert!(pre.status().is_success());
    assert_eq!(pre.headers()["access-control-allow-origin"], "*");
    assert!(pre.headers()["access-control-allow-headers"].to_str().unwrap().to_lowercase().contains("authorization"));
    s.stop().await;
}
