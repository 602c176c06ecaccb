//! Account data, typing, receipts and read markers, push rules, E2EE keys, cross-signing and to-device messages,
//! as a client sees them over HTTP (mostly through /sync).

mod common;

use base64::Engine;
use common::*;
use ring::signature::{Ed25519KeyPair, KeyPair};

/// A public room created by `owner` that `others` joined.
async fn shared_room(owner: &Client, others: &[&Client]) -> String {
    let room = owner.create_room(json!({"preset": "public_chat"})).await;
    for c in others {
        c.join(&room).await.ok();
    }
    room
}

/// Initial sync; returns `next_batch`.
async fn sync_token(c: &Client) -> String {
    c.sync(None, &[]).await.ok()["next_batch"].as_str().unwrap().to_owned()
}

/// Incremental sync from `since`; returns the body (its `next_batch` is the next `since`).
async fn sync_from(c: &Client, since: &str) -> Value {
    c.sync(Some(since), &[]).await.ok()
}

fn account_data_of(v: &Value, data_type: &str) -> Option<Value> {
    events_of(v).into_iter().find(|e| e["type"] == data_type).map(|e| e["content"].clone())
}

fn ephemeral_of(sync: &Value, room: &str, event_type: &str) -> Option<Value> {
    account_data_of(&sync["rooms"]["join"][room]["ephemeral"], event_type)
}

fn rule_ids(list: &Value) -> Vec<String> {
    list.as_array().unwrap().iter().map(|r| r["rule_id"].as_str().unwrap().to_owned()).collect()
}

// ---- account data -------------------------------------------------------------------------------------------

#[tokio::test]
async fn account_data_round_trip_and_sync() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = alice.create_room(json!({})).await;
    let me = enc(&alice.user_id);
    let since = sync_token(&alice).await;

    alice.put(&format!("/user/{me}/account_data/org.example.config"), json!({"theme": "dark"})).await.ok();
    let got = alice.get(&format!("/user/{me}/account_data/org.example.config")).await.ok();
    assert_eq!(got, json!({"theme": "dark"}));
    let room_path = format!("/user/{me}/rooms/{}/account_data/m.tag", enc(&room));
    alice.put(&room_path, json!({"tags": {"u.work": {"order": 0.5}}})).await.ok();
    assert_eq!(alice.get(&room_path).await.ok()["tags"]["u.work"]["order"], 0.5);

    // Both show up in the next incremental sync: global at the top, room data under the room.
    let sync = sync_from(&alice, &since).await;
    assert_eq!(account_data_of(&sync["account_data"], "org.example.config"), Some(json!({"theme": "dark"})));
    let tags =
        account_data_of(&sync["rooms"]["join"][&room]["account_data"], "m.tag").expect("room account data in sync");
    assert_eq!(tags["tags"]["u.work"]["order"], 0.5);
    // ... and not again in the one after.
    let again = sync_from(&alice, sync["next_batch"].as_str().unwrap()).await;
    assert!(account_data_of(&again["account_data"], "org.example.config").is_none());

    // An overwrite is seen too.
    alice.put(&format!("/user/{me}/account_data/org.example.config"), json!({"theme": "light"})).await.ok();
    let sync = sync_from(&alice, again["next_batch"].as_str().unwrap()).await;
    assert_eq!(account_data_of(&sync["account_data"], "org.example.config"), Some(json!({"theme": "light"})));

    // Errors: unset type, other users, server-managed types, bad room ids and bodies.
    alice.get(&format!("/user/{me}/account_data/org.example.unset")).await.assert_err(404, "M_NOT_FOUND");
    alice
        .get(&format!("/user/{me}/rooms/{}/account_data/org.example.unset", enc(&room)))
        .await
        .assert_err(404, "M_NOT_FOUND");
    bob.get(&format!("/user/{me}/account_data/org.example.config")).await.assert_err(403, "M_FORBIDDEN");
    bob.put(&format!("/user/{me}/account_data/org.example.config"), json!({})).await.assert_err(403, "M_FORBIDDEN");
    bob.put(&room_path, json!({})).await.assert_err(403, "M_FORBIDDEN");
    alice.put(&format!("/user/{me}/account_data/m.push_rules"), json!({})).await.assert_err(405, "M_BAD_JSON");
    alice.put(&format!("/user/{me}/account_data/m.fully_read"), json!({})).await.assert_err(405, "M_BAD_JSON");
    alice
        .put(&format!("/user/{me}/rooms/{}/account_data/m.fully_read", enc(&room)), json!({"event_id": "$x"}))
        .await
        .assert_err(405, "M_BAD_JSON");
    alice
        .put(&format!("/user/{me}/rooms/not-a-room/account_data/x.y"), json!({}))
        .await
        .assert_err(400, "M_INVALID_PARAM");
    alice.put(&format!("/user/{me}/account_data/x.y"), json!([1, 2])).await.assert_err(400, "M_BAD_JSON");
    // Push rules can be read like any account data even before they were changed.
    let rules = alice.get(&format!("/user/{me}/account_data/m.push_rules")).await.ok();
    assert!(rules["global"]["override"].is_array());
    s.stop().await;
}

// ---- typing -------------------------------------------------------------------------------------------------

#[tokio::test]
async fn typing_reaches_other_members() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let carol = s.user("carol").await;
    let room = shared_room(&alice, &[&bob]).await;
    let since = sync_token(&bob).await;

    let typing_path = format!("/rooms/{}/typing/{}", enc(&room), enc(&alice.user_id));
    alice.put(&typing_path, json!({"typing": true, "timeout": 30000})).await.ok();
    let sync = sync_from(&bob, &since).await;
    let typing = ephemeral_of(&sync, &room, "m.typing").expect("typing in bob's sync");
    assert_eq!(typing["user_ids"], json!([alice.user_id]));

    alice.put(&typing_path, json!({"typing": false})).await.ok();
    let sync = sync_from(&bob, sync["next_batch"].as_str().unwrap()).await;
    let typing = ephemeral_of(&sync, &room, "m.typing").expect("stop typing in bob's sync");
    assert_eq!(typing["user_ids"], json!([]));

    // Only for yourself, and only in rooms you are joined to.
    alice
        .put(&format!("/rooms/{}/typing/{}", enc(&room), enc(&bob.user_id)), json!({"typing": true, "timeout": 1000}))
        .await
        .assert_err(403, "M_FORBIDDEN");
    carol
        .put(&format!("/rooms/{}/typing/{}", enc(&room), enc(&carol.user_id)), json!({"typing": true, "timeout": 1000}))
        .await
        .assert_err(403, "M_FORBIDDEN");
    alice.put(&typing_path, json!({"timeout": 1000})).await.assert_err(400, "M_BAD_JSON");
    s.stop().await;
}

// ---- receipts and read markers --------------------------------------------------------------------------------

#[tokio::test]
async fn receipts_public_private_and_fully_read() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let carol = s.user("carol").await;
    let room = shared_room(&alice, &[&bob]).await;
    let e1 = alice.send_text(&room, "one").await;
    let e2 = alice.send_text(&room, "two").await;
    let alice_since = sync_token(&alice).await;
    let bob_since = sync_token(&bob).await;
    let receipt = |t: &str, e: &str| format!("/rooms/{}/receipt/{t}/{}", enc(&room), enc(e));

    // A public receipt reaches alice.
    bob.post(&receipt("m.read", &e1), json!({})).await.ok();
    let sync = sync_from(&alice, &alice_since).await;
    let r = ephemeral_of(&sync, &room, "m.receipt").expect("receipt in alice's sync");
    assert!(r[&e1]["m.read"][&bob.user_id]["ts"].is_u64(), "{r}");
    let alice_since = sync["next_batch"].as_str().unwrap().to_owned();

    // A private one only reaches bob himself.
    bob.post(&receipt("m.read.private", &e2), json!({})).await.ok();
    let sync = sync_from(&alice, &alice_since).await;
    assert!(ephemeral_of(&sync, &room, "m.receipt").is_none(), "private receipt leaked: {sync}");
    let bob_sync = sync_from(&bob, &bob_since).await;
    let r = ephemeral_of(&bob_sync, &room, "m.receipt").expect("own receipts in bob's sync");
    assert!(r[&e2]["m.read.private"][&bob.user_id].is_object(), "{r}");
    assert!(r[&e1]["m.read"][&bob.user_id].is_object(), "{r}");
    // Nor does it show in an initial sync of someone else.
    let initial = alice.sync(None, &[]).await.ok();
    let r = ephemeral_of(&initial, &room, "m.receipt").expect("receipts in initial sync");
    assert!(r.get(&e2).is_none(), "private receipt leaked into initial sync: {r}");

    // Threaded receipts carry their thread id.
    let alice_since = sync["next_batch"].as_str().unwrap().to_owned();
    bob.post(&receipt("m.read", &e2), json!({"thread_id": "main"})).await.ok();
    let sync = sync_from(&alice, &alice_since).await;
    let r = ephemeral_of(&sync, &room, "m.receipt").expect("threaded receipt");
    assert_eq!(r[&e2]["m.read"][&bob.user_id]["thread_id"], "main");

    // A receipt never moves backwards.
    bob.post(&receipt("m.read", &e2), json!({})).await.ok();
    bob.post(&receipt("m.read", &e1), json!({})).await.ok();
    let initial = alice.sync(None, &[]).await.ok();
    let r = ephemeral_of(&initial, &room, "m.receipt").unwrap();
    assert!(r[&e2]["m.read"][&bob.user_id].is_object() && r.get(&e1).is_none(), "{r}");

    // The fully-read marker is room account data, set by /read_markers or as a receipt type.
    let bob_since = bob_sync["next_batch"].as_str().unwrap().to_owned();
    bob.post(&format!("/rooms/{}/read_markers", enc(&room)), json!({"m.fully_read": e1, "m.read.private": e2}))
        .await
        .ok();
    let sync = sync_from(&bob, &bob_since).await;
    let marker =
        account_data_of(&sync["rooms"]["join"][&room]["account_data"], "m.fully_read").expect("m.fully_read in sync");
    assert_eq!(marker["event_id"], e1.as_str());
    bob.post(&receipt("m.fully_read", &e2), json!({})).await.ok();
    let marker =
        bob.get(&format!("/user/{}/rooms/{}/account_data/m.fully_read", enc(&bob.user_id), enc(&room))).await.ok();
    assert_eq!(marker["event_id"], e2.as_str());

    // Errors.
    bob.post(&receipt("m.unknown", &e1), json!({})).await.assert_err(400, "M_INVALID_PARAM");
    bob.post(&receipt("m.fully_read", &e1), json!({"thread_id": "main"})).await.assert_err(400, "M_INVALID_PARAM");
    bob.post(&receipt("m.read", &e1), json!({"thread_id": ""})).await.assert_err(400, "M_INVALID_PARAM");
    bob.post(&receipt("m.read", "$nope:localhost"), json!({})).await.assert_err(404, "M_NOT_FOUND");
    carol.post(&receipt("m.read", &e1), json!({})).await.assert_err(403, "M_FORBIDDEN");
    carol
        .post(&format!("/rooms/{}/read_markers", enc(&room)), json!({"m.fully_read": e1}))
        .await
        .assert_err(403, "M_FORBIDDEN");
    s.stop().await;
}

// ---- push rules ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn push_rules_defaults_and_user_rules() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;

    // Defaults, with the user's id filled in; also in the initial sync.
    let initial = alice.sync(None, &[]).await.ok();
    let in_sync = account_data_of(&initial["account_data"], "m.push_rules").expect("push rules in initial sync");
    let all = alice.get("/pushrules/").await.ok();
    assert_eq!(in_sync, all);
    let g = &all["global"];
    let overrides = rule_ids(&g["override"]);
    assert_eq!(overrides[0], ".m.rule.master");
    assert_eq!(g["override"][0]["enabled"], false);
    for id in [
        ".m.rule.suppress_notices",
        ".m.rule.invite_for_me",
        ".m.rule.member_event",
        ".m.rule.is_user_mention",
        ".m.rule.contains_display_name",
        ".m.rule.is_room_mention",
        ".m.rule.roomnotif",
        ".m.rule.tombstone",
        ".m.rule.reaction",
        ".m.rule.room.server_acl",
        ".m.rule.suppress_edits",
    ] {
        assert!(overrides.contains(&id.to_owned()), "missing {id}");
    }
    let invite = g["override"].as_array().unwrap().iter().find(|r| r["rule_id"] == ".m.rule.invite_for_me").unwrap();
    assert!(invite["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["key"] == "state_key" && c["pattern"] == alice.user_id.as_str()));
    assert_eq!(g["content"][0]["rule_id"], ".m.rule.contains_user_name");
    assert_eq!(g["content"][0]["pattern"], "alice");
    assert_eq!(
        rule_ids(&g["underride"]),
        [
            ".m.rule.call",
            ".m.rule.encrypted_room_one_to_one",
            ".m.rule.room_one_to_one",
            ".m.rule.message",
            ".m.rule.encrypted"
        ]
    );
    assert_eq!(alice.get("/pushrules/global/").await.ok(), all["global"]);

    // User rules: newest first, `before`/`after` place them; they come down /sync as m.push_rules.
    let since = initial["next_batch"].as_str().unwrap().to_owned();
    let room_rule = |id: &str| format!("/pushrules/global/room/{}", enc(id));
    alice.put(&room_rule("!a:localhost"), json!({"actions": ["notify"]})).await.ok();
    alice.put(&room_rule("!b:localhost"), json!({"actions": ["notify"]})).await.ok();
    alice
        .put(&format!("{}?after={}", room_rule("!c:localhost"), enc("!b:localhost")), json!({"actions": []}))
        .await
        .ok();
    alice
        .put(&format!("{}?before={}", room_rule("!d:localhost"), enc("!b:localhost")), json!({"actions": []}))
        .await
        .ok();
    let rules = alice.get("/pushrules/").await.ok();
    assert_eq!(rule_ids(&rules["global"]["room"]), ["!d:localhost", "!b:localhost", "!c:localhost", "!a:localhost"]);
    let sync = sync_from(&alice, &since).await;
    let synced = account_data_of(&sync["account_data"], "m.push_rules").expect("m.push_rules in incremental sync");
    assert_eq!(rule_ids(&synced["global"]["room"]), ["!d:localhost", "!b:localhost", "!c:localhost", "!a:localhost"]);

    let rule = alice.get(&room_rule("!a:localhost")).await.ok();
    assert_eq!(rule["enabled"], true);
    assert_eq!(rule["default"], false);
    assert_eq!(rule["actions"], json!(["notify"]));

    // An override rule goes after the master rule and before the other defaults.
    let cond = json!([{"kind": "event_match", "key": "content.body", "pattern": "cake"}]);
    alice.put("/pushrules/global/override/cake", json!({"conditions": cond, "actions": ["notify"]})).await.ok();
    let rules = alice.get("/pushrules/").await.ok();
    assert_eq!(rule_ids(&rules["global"]["override"])[..3], [".m.rule.master", "cake", ".m.rule.suppress_notices"]);
    alice.put("/pushrules/global/content/lies", json!({"pattern": "cake*lie", "actions": ["notify"]})).await.ok();
    assert_eq!(alice.get("/pushrules/global/content/lies").await.ok()["pattern"], "cake*lie");

    // enabled / actions, on user and default rules; changes to defaults stick.
    alice.put("/pushrules/global/underride/.m.rule.message/enabled", json!({"enabled": false})).await.ok();
    assert_eq!(alice.get("/pushrules/global/underride/.m.rule.message/enabled").await.ok(), json!({"enabled": false}));
    alice.put("/pushrules/global/room/!a:localhost/actions", json!({"actions": []})).await.ok();
    assert_eq!(alice.get(&format!("{}/actions", room_rule("!a:localhost"))).await.ok(), json!({"actions": []}));
    let rules = alice.get("/pushrules/").await.ok();
    let message = rules["global"]["underride"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["rule_id"] == ".m.rule.message")
        .unwrap()
        .clone();
    assert_eq!(message["enabled"], false);
    assert_eq!(rule_ids(&rules["global"]["underride"])[3], ".m.rule.message");
    // Updating a user rule keeps its enabled state and place.
    alice.put(&format!("{}/enabled", room_rule("!b:localhost")), json!({"enabled": false})).await.ok();
    alice.put(&room_rule("!b:localhost"), json!({"actions": ["notify"]})).await.ok();
    let rules = alice.get("/pushrules/").await.ok();
    assert_eq!(rule_ids(&rules["global"]["room"])[1], "!b:localhost");
    assert_eq!(rules["global"]["room"][1]["enabled"], false);

    // Delete.
    alice.delete(&room_rule("!a:localhost"), json!({})).await.ok();
    alice.get(&room_rule("!a:localhost")).await.assert_err(404, "M_NOT_FOUND");
    alice.delete(&room_rule("!a:localhost"), json!({})).await.assert_err(404, "M_NOT_FOUND");

    // Bad requests.
    alice.get("/pushrules/global/override/nope").await.assert_err(404, "M_NOT_FOUND");
    alice.get("/pushrules/global/override/nope/enabled").await.assert_err(404, "M_NOT_FOUND");
    alice.put("/pushrules/global/override/nope/actions", json!({"actions": []})).await.assert_err(404, "M_NOT_FOUND");
    alice.get("/pushrules/device/").await.assert_err(400, "M_INVALID_PARAM");
    alice.put("/pushrules/device/room/x", json!({"actions": []})).await.assert_err(400, "M_INVALID_PARAM");
    alice.put("/pushrules/global/nonsense/x", json!({"actions": []})).await.assert_err(400, "M_INVALID_PARAM");
    alice
        .put("/pushrules/global/override/.mine", json!({"conditions": [], "actions": []}))
        .await
        .assert_err(400, "M_INVALID_PARAM");
    alice.put("/pushrules/global/room/x", json!({})).await.assert_err(400, "M_BAD_JSON");
    alice.put("/pushrules/global/room/x", json!({"actions": ["explode"]})).await.assert_err(400, "M_BAD_JSON");
    alice.put("/pushrules/global/override/x", json!({"actions": []})).await.assert_err(400, "M_BAD_JSON");
    alice.put("/pushrules/global/content/x", json!({"actions": []})).await.assert_err(400, "M_BAD_JSON");
    alice
        .put(&format!("{}?before=nope", room_rule("!e:localhost")), json!({"actions": []}))
        .await
        .assert_err(400, "M_INVALID_PARAM");
    alice.put("/pushrules/global/room/!b:localhost/colour", json!({})).await.assert_err(400, "M_INVALID_PARAM");
    alice
        .put("/pushrules/global/room/!b:localhost/enabled", json!({"enabled": "yes"}))
        .await
        .assert_err(400, "M_BAD_JSON");
    alice.delete("/pushrules/global/override/.m.rule.master", json!({})).await.assert_err(400, "M_INVALID_PARAM");
    s.stop().await;
}

// ---- E2EE keys ----------------------------------------------------------------------------------------------

fn device_keys(c: &Client, curve: &str) -> Value {
    json!({
        "user_id": c.user_id,
        "device_id": c.device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {format!("curve25519:{}", c.device_id): curve, format!("ed25519:{}", c.device_id): format!("ed-{curve}")},
        "signatures": {c.user_id.clone(): {format!("ed25519:{}", c.device_id): "sig"}},
    })
}

fn otk_count(sync: &Value) -> i64 {
    sync["device_one_time_keys_count"]["signed_curve25519"].as_i64().unwrap_or(0)
}

#[tokio::test]
async fn keys_upload_query_claim_and_changes() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let carol = s.user("carol").await;
    shared_room(&alice, &[&bob]).await;
    alice.put(&format!("/devices/{}", enc(&alice.device_id)), json!({"display_name": "Alice's phone"})).await.ok();
    let bob_since = sync_token(&bob).await;
    let carol_since = sync_token(&carol).await;

    let otks = json!({
        "signed_curve25519:AAAAAQ": {"key": "k1", "signatures": {}},
        "signed_curve25519:AAAAAg": {"key": "k2", "signatures": {}},
        "signed_curve25519:AAAAAw": {"key": "k3", "signatures": {}},
    });
    let up = alice
        .post(
            "/keys/upload",
            json!({
                "device_keys": device_keys(&alice, "curve-a"),
                "one_time_keys": otks,
                "fallback_keys": {"signed_curve25519:AAAAFB": {"key": "fb", "fallback": true, "signatures": {}}},
            }),
        )
        .await
        .ok();
    assert_eq!(up["one_time_key_counts"]["signed_curve25519"], 3);
    // Re-uploading the same keys is harmless; a different key under a used id is not.
    let up = alice
        .post("/keys/upload", json!({"one_time_keys": {"signed_curve25519:AAAAAQ": {"key": "k1", "signatures": {}}}}))
        .await
        .ok();
    assert_eq!(up["one_time_key_counts"]["signed_curve25519"], 3);
    alice
        .post(
            "/keys/upload",
            json!({"one_time_keys": {"signed_curve25519:AAAAAQ": {"key": "other", "signatures": {}}}}),
        )
        .await
        .assert_err(400, "M_INVALID_PARAM");
    let mut wrong = device_keys(&alice, "x");
    wrong["user_id"] = json!(bob.user_id);
    alice.post("/keys/upload", json!({"device_keys": wrong})).await.assert_err(400, "M_INVALID_PARAM");

    let alice_sync = alice.sync(None, &[]).await.ok();
    assert_eq!(otk_count(&alice_sync), 3);
    assert_eq!(alice_sync["device_unused_fallback_key_types"], json!(["signed_curve25519"]));

    // Bob shares a room with alice: her new keys are a device list change for him, not for carol.
    let bob_sync = sync_from(&bob, &bob_since).await;
    assert!(
        bob_sync["device_lists"]["changed"].as_array().unwrap().contains(&json!(alice.user_id)),
        "{}",
        bob_sync["device_lists"]
    );
    let changes = bob
        .get(&format!(
            "/keys/changes{}",
            query(&[("from", &bob_since), ("to", bob_sync["next_batch"].as_str().unwrap())])
        ))
        .await
        .ok();
    assert_eq!(changes["changed"], json!([alice.user_id]));
    let carol_changes = carol.get(&format!("/keys/changes{}", query(&[("from", &carol_since)]))).await.ok();
    assert_eq!(carol_changes["changed"], json!([]));
    bob.get("/keys/changes").await.assert_err(400, "M_MISSING_PARAM");

    // Query: the uploaded keys plus the device's display name; remote servers land in failures.
    let q = bob
        .post("/keys/query", json!({"device_keys": {alice.user_id.clone(): [], "@zed:elsewhere.example": []}}))
        .await
        .ok();
    let dk = &q["device_keys"][&alice.user_id][&alice.device_id];
    assert_eq!(dk["keys"][format!("curve25519:{}", alice.device_id)], "curve-a");
    assert_eq!(dk["unsigned"]["device_display_name"], "Alice's phone");
    assert!(q["failures"]["elsewhere.example"].is_object());
    let q = bob.post("/keys/query", json!({"device_keys": {alice.user_id.clone(): ["NOSUCHDEVICE"]}})).await.ok();
    assert_eq!(q["device_keys"][&alice.user_id], json!({}));

    // Claim: one-time keys are handed out once each, then the fallback key (again and again).
    let claim = json!({"one_time_keys": {alice.user_id.clone(): {alice.device_id.clone(): "signed_curve25519"}}});
    let mut seen = Vec::new();
    for _ in 0..3 {
        let c = bob.post("/keys/claim", claim.clone()).await.ok();
        let keys = c["one_time_keys"][&alice.user_id][&alice.device_id].as_object().unwrap().clone();
        assert_eq!(keys.len(), 1);
        let (id, key) = keys.into_iter().next().unwrap();
        assert!(!seen.contains(&id), "key {id} handed out twice");
        assert!(key["fallback"].is_null());
        seen.push(id);
        if seen.len() == 1 {
            assert_eq!(otk_count(&alice.sync(None, &[]).await.ok()), 2);
        }
    }
    assert_eq!(otk_count(&alice.sync(None, &[]).await.ok()), 0);
    for _ in 0..2 {
        let c = bob.post("/keys/claim", claim.clone()).await.ok();
        let key = &c["one_time_keys"][&alice.user_id][&alice.device_id]["signed_curve25519:AAAAFB"];
        assert_eq!(key["key"], "fb");
    }
    let alice_sync = alice.sync(None, &[]).await.ok();
    assert_eq!(alice_sync["device_unused_fallback_key_types"], json!([]), "the fallback key was used");
    // Unknown devices and users give nothing; remote ones a failure.
    let c = bob
        .post("/keys/claim", json!({"one_time_keys": {alice.user_id.clone(): {"NOPE": "signed_curve25519"}, "@zed:elsewhere.example": {"X": "signed_curve25519"}}}))
        .await
        .ok();
    assert_eq!(c["one_time_keys"], json!({}));
    assert!(c["failures"]["elsewhere.example"].is_object());
    s.stop().await;
}

// ---- cross-signing ------------------------------------------------------------------------------------------

struct SigningKey {
    pair: Ed25519KeyPair,
    public: String,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes)
}

fn signing_key() -> SigningKey {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    let public = b64(pair.public_key().as_ref());
    SigningKey { pair, public }
}

/// Signs `obj` (canonical JSON without `signatures` and `unsigned`) as `user` with `key`, under `key_id`.
fn sign(obj: &mut Value, user: &str, key_id: &str, key: &Ed25519KeyPair) {
    let mut content = obj.clone();
    content.as_object_mut().unwrap().remove("signatures");
    content.as_object_mut().unwrap().remove("unsigned");
    let canonical = ruma::canonical_json::CanonicalJsonValue::try_from(content).unwrap().to_string();
    let sig = b64(key.sign(canonical.as_bytes()).as_ref());
    if !obj["signatures"].is_object() {
        obj["signatures"] = json!({});
    }
    if !obj["signatures"][user].is_object() {
        obj["signatures"][user] = json!({});
    }
    obj["signatures"][user][key_id] = json!(sig);
}

fn cross_key(user: &str, usage: &str, key: &SigningKey) -> Value {
    json!({"user_id": user, "usage": [usage], "keys": {format!("ed25519:{}", key.public): key.public}})
}

/// Uploads a master, self-signing and user-signing key for `c` (first upload: no password needed).
async fn upload_cross_signing(c: &Client) -> (SigningKey, SigningKey, SigningKey) {
    let (master, ssk, usk) = (signing_key(), signing_key(), signing_key());
    let master_id = format!("ed25519:{}", master.public);
    let mut ssk_json = cross_key(&c.user_id, "self_signing", &ssk);
    sign(&mut ssk_json, &c.user_id, &master_id, &master.pair);
    let mut usk_json = cross_key(&c.user_id, "user_signing", &usk);
    sign(&mut usk_json, &c.user_id, &master_id, &master.pair);
    c.post(
        "/keys/device_signing/upload",
        json!({"master_key": cross_key(&c.user_id, "master", &master), "self_signing_key": ssk_json, "user_signing_key": usk_json}),
    )
    .await
    .ok();
    (master, ssk, usk)
}

#[tokio::test]
async fn cross_signing_keys_and_signatures() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let carol = s.user("carol").await;
    shared_room(&alice, &[&bob, &carol]).await;

    // Alice's device has a real ed25519 key so that she can sign her master key with it.
    let device_key = signing_key();
    let mut dk = device_keys(&alice, "curve-a");
    dk["keys"][format!("ed25519:{}", alice.device_id)] = json!(device_key.public);
    dk["signatures"] = json!({});
    sign(&mut dk, &alice.user_id, &format!("ed25519:{}", alice.device_id), &device_key.pair);
    alice.post("/keys/upload", json!({"device_keys": dk})).await.ok();

    let bob_since = sync_token(&bob).await;
    let (master, ssk, usk) = upload_cross_signing(&alice).await;
    let (bob_master, _, _) = upload_cross_signing(&bob).await;
    let bob_sync = sync_from(&bob, &bob_since).await;
    assert!(bob_sync["device_lists"]["changed"].as_array().unwrap().contains(&json!(alice.user_id)));

    // Everyone sees master and self-signing keys; the user-signing key only its owner.
    let q = alice.post("/keys/query", json!({"device_keys": {alice.user_id.clone(): []}})).await.ok();
    assert_eq!(q["master_keys"][&alice.user_id]["keys"][format!("ed25519:{}", master.public)], master.public.as_str());
    assert!(q["self_signing_keys"][&alice.user_id].is_object());
    assert!(q["user_signing_keys"][&alice.user_id].is_object());
    let q = bob.post("/keys/query", json!({"device_keys": {alice.user_id.clone(): []}})).await.ok();
    assert!(q["master_keys"][&alice.user_id].is_object());
    assert!(q["self_signing_keys"][&alice.user_id].is_object());
    assert!(q["user_signing_keys"].get(&alice.user_id).is_none());

    // Re-sending the same keys needs no password; replacing them does.
    alice
        .post("/keys/device_signing/upload", json!({"master_key": cross_key(&alice.user_id, "master", &master)}))
        .await
        .ok();
    let other = signing_key();
    let r = alice
        .post("/keys/device_signing/upload", json!({"master_key": cross_key(&alice.user_id, "master", &other)}))
        .await;
    assert_eq!(r.status, 401, "{}", r.text);
    assert!(r.body["flows"].is_array());
    // A self-signing key not signed by the master key is refused.
    let r = alice
        .post(
            "/keys/device_signing/upload",
            json!({"self_signing_key": cross_key(&alice.user_id, "self_signing", &other),
                   "auth": {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": alice.user_id}, "password": PASSWORD}}),
        )
        .await;
    r.assert_err(400, "M_INVALID_SIGNATURE");

    // Signatures: alice signs her device with her self-signing key, her master key with her device, and bob's
    // master key with her user-signing key.
    let q = alice
        .post("/keys/query", json!({"device_keys": {alice.user_id.clone(): [], bob.user_id.clone(): []}}))
        .await
        .ok();
    let mut my_device = q["device_keys"][&alice.user_id][&alice.device_id].clone();
    my_device.as_object_mut().unwrap().remove("unsigned");
    sign(&mut my_device, &alice.user_id, &format!("ed25519:{}", ssk.public), &ssk.pair);
    let mut my_master = q["master_keys"][&alice.user_id].clone();
    sign(&mut my_master, &alice.user_id, &format!("ed25519:{}", alice.device_id), &device_key.pair);
    let mut bobs_master = q["master_keys"][&bob.user_id].clone();
    sign(&mut bobs_master, &alice.user_id, &format!("ed25519:{}", usk.public), &usk.pair);
    let mut forged = q["master_keys"][&bob.user_id].clone();
    sign(&mut forged, &alice.user_id, &format!("ed25519:{}", usk.public), &other.pair);
    let r = alice
        .post(
            "/keys/signatures/upload",
            json!({
                alice.user_id.clone(): {alice.device_id.clone(): my_device, master.public.clone(): my_master},
                bob.user_id.clone(): {bob_master.public.clone(): bobs_master},
            }),
        )
        .await
        .ok();
    assert_eq!(r["failures"], json!({}));
    let r = carol
        .post("/keys/signatures/upload", json!({bob.user_id.clone(): {bob_master.public.clone(): forged}}))
        .await
        .ok();
    assert_eq!(r["failures"][&bob.user_id][&bob_master.public]["errcode"], "M_INVALID_SIGNATURE");

    let q = bob.post("/keys/query", json!({"device_keys": {alice.user_id.clone(): []}})).await.ok();
    assert!(q["device_keys"][&alice.user_id][&alice.device_id]["signatures"][&alice.user_id]
        [format!("ed25519:{}", ssk.public)]
    .is_string());
    assert!(q["master_keys"][&alice.user_id]["signatures"][&alice.user_id][format!("ed25519:{}", alice.device_id)]
        .is_string());
    // Alice's signature of bob's master key is hers to see (and bob's), not carol's.
    let usk_sig = format!("ed25519:{}", usk.public);
    let q = alice.post("/keys/query", json!({"device_keys": {bob.user_id.clone(): []}})).await.ok();
    assert!(q["master_keys"][&bob.user_id]["signatures"][&alice.user_id][&usk_sig].is_string());
    let q = carol.post("/keys/query", json!({"device_keys": {bob.user_id.clone(): []}})).await.ok();
    assert!(q["master_keys"][&bob.user_id]["signatures"].get(&alice.user_id).is_none());

    // Re-uploading the device keys keeps the cross-signing signature.
    alice.post("/keys/upload", json!({"device_keys": dk})).await.ok();
    let q = bob.post("/keys/query", json!({"device_keys": {alice.user_id.clone(): []}})).await.ok();
    assert!(q["device_keys"][&alice.user_id][&alice.device_id]["signatures"][&alice.user_id]
        [format!("ed25519:{}", ssk.public)]
    .is_string());
    s.stop().await;
}

// ---- to-device ----------------------------------------------------------------------------------------------

fn to_device_events(sync: &Value) -> Vec<Value> {
    events_of(&sync["to_device"])
}

#[tokio::test]
async fn to_device_arrives_exactly_once() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob1 = s.user("bob").await;
    let mut bob2 = s.client();
    bob2.login("bob", PASSWORD).await.ok();
    let since1 = sync_token(&bob1).await;
    let since2 = sync_token(&bob2).await;

    // `*` reaches every device of the user.
    let body = json!({"messages": {bob1.user_id.clone(): {"*": {"hello": "all"}}}});
    alice.put("/sendToDevice/m.test/txn1", body.clone()).await.ok();
    // A retry of the same transaction is not delivered again.
    alice.put("/sendToDevice/m.test/txn1", body).await.ok();
    let sync1 = sync_from(&bob1, &since1).await;
    let sync2 = sync_from(&bob2, &since2).await;
    for sync in [&sync1, &sync2] {
        let msgs = to_device_events(sync);
        assert_eq!(msgs.len(), 1, "{msgs:?}");
        assert_eq!(msgs[0]["sender"], alice.user_id.as_str());
        assert_eq!(msgs[0]["type"], "m.test");
        assert_eq!(msgs[0]["content"], json!({"hello": "all"}));
    }
    // Once the next sync acknowledges them, they are gone.
    let next1 = sync1["next_batch"].as_str().unwrap().to_owned();
    let after = sync_from(&bob1, &next1).await;
    assert!(to_device_events(&after).is_empty());

    // One named device only.
    let next2 = sync2["next_batch"].as_str().unwrap().to_owned();
    let next1 = after["next_batch"].as_str().unwrap().to_owned();
    alice
        .put("/sendToDevice/m.test/txn2", json!({"messages": {bob1.user_id.clone(): {bob2.device_id.clone(): {"n": 2}}, "@x:remote.example": {"D": {}}}}))
        .await
        .ok();
    let s1 = sync_from(&bob1, &next1).await;
    let s2 = sync_from(&bob2, &next2).await;
    assert!(to_device_events(&s1).is_empty());
    assert_eq!(to_device_events(&s2).len(), 1);
    // Without acknowledging, the same message comes again (it is only deleted once the client moved past it).
    let s2_again = sync_from(&bob2, &next2).await;
    assert_eq!(to_device_events(&s2_again).len(), 1);

    // Many pending messages all arrive, none is lost when the next sync acknowledges the batch.
    let next2 = s2["next_batch"].as_str().unwrap().to_owned();
    for i in 0..150 {
        alice
            .put(
                &format!("/sendToDevice/m.test/many{i}"),
                json!({"messages": {bob2.user_id.clone(): {bob2.device_id.clone(): {"i": i}}}}),
            )
            .await
            .ok();
    }
    let s2 = sync_from(&bob2, &next2).await;
    let got: Vec<i64> = to_device_events(&s2).iter().map(|e| e["content"]["i"].as_i64().unwrap()).collect();
    assert_eq!(got, (0..150).collect::<Vec<_>>());
    let s2 = sync_from(&bob2, s2["next_batch"].as_str().unwrap()).await;
    assert!(to_device_events(&s2).is_empty());

    alice
        .put("/sendToDevice/m.test/txn3", json!({"messages": {bob1.user_id.clone(): {"*": "not an object"}}}))
        .await
        .assert_err(400, "M_BAD_JSON");
    alice.put("/sendToDevice/m.test/txn4", json!({})).await.assert_err(400, "M_BAD_JSON");
    s.stop().await;
}

// ---- remote users (federation on, the remote server unreachable) --------------------------------------------------

#[tokio::test]
async fn remote_users_go_through_federation() {
    let s = TestServer::start_with(|c| {
        c.federation.enabled = true;
        // Nothing listens there: every request to the "remote" server fails fast.
        c.federation.resolve.insert("remote.invalid".into(), "127.0.0.1:9".into());
    })
    .await;
    let alice = s.user("alice").await;

    // Key queries and claims for remote users report the unreachable server in `failures`.
    let q = alice.post("/keys/query", json!({"device_keys": {"@zed:remote.invalid": []}, "timeout": 2000})).await.ok();
    assert!(q["failures"]["remote.invalid"].is_object(), "{q}");
    assert_eq!(q["device_keys"].get("@zed:remote.invalid"), None);
    let c = alice
        .post(
            "/keys/claim",
            json!({"one_time_keys": {"@zed:remote.invalid": {"D": "signed_curve25519"}}, "timeout": 2000}),
        )
        .await
        .ok();
    assert!(c["failures"]["remote.invalid"].is_object(), "{c}");

    // A to-device message for a remote user is queued once as an `m.direct_to_device` EDU for its server.
    let body = json!({"messages": {"@zed:remote.invalid": {"D": {"secret": 1}}}});
    alice.put("/sendToDevice/m.test/fed1", body.clone()).await.ok();
    alice.put("/sendToDevice/m.test/fed1", body).await.ok();
    let db = rusqlite::Connection::open_with_flags(&s.db_path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let edus: Vec<String> = db
        .prepare("SELECT payload FROM outbox WHERE destination = 'remote.invalid' AND kind = 'edu'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(edus.len(), 1, "{edus:?}");
    let edu: Value = serde_json::from_str(&edus[0]).unwrap();
    assert_eq!(edu["edu_type"], "m.direct_to_device");
    assert_eq!(edu["content"]["sender"], alice.user_id.as_str());
    assert_eq!(edu["content"]["messages"]["@zed:remote.invalid"]["D"]["secret"], 1);
    s.stop().await;
}

/// Clients that see an unstable feature advertised in `/versions` use the `unstable` prefix for its endpoints, as
/// Synapse serves them: Element Web 1.7 uploads its cross-signing keys to `/unstable/keys/device_signing/upload`
/// (advertised as `org.matrix.e2e_cross_signing`) and asks `/unstable/room_keys/version`; without them it shows
/// "Unable to set up keys" right after login.
#[tokio::test]
async fn unstable_prefix_serves_the_client_api() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let versions = alice.get("/_matrix/client/versions").await.ok();
    assert_eq!(versions["unstable_features"]["org.matrix.e2e_cross_signing"], true, "{versions}");

    let master = signing_key();
    alice
        .post(
            "/_matrix/client/unstable/keys/device_signing/upload",
            json!({"master_key": cross_key(&alice.user_id, "master", &master)}),
        )
        .await
        .ok();
    let q = alice.post("/keys/query", json!({"device_keys": {alice.user_id.clone(): []}})).await.ok();
    assert_eq!(q["master_keys"][&alice.user_id]["keys"][format!("ed25519:{}", master.public)], master.public.as_str());
    // No backup yet: the spec's "no current backup" answer, not an unknown endpoint.
    alice.get("/_matrix/client/unstable/room_keys/version").await.assert_err(404, "M_NOT_FOUND");
    assert_eq!(alice.get("/_matrix/client/unstable/account/whoami").await.ok()["user_id"], alice.user_id.as_str());
}
