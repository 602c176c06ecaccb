//! Client features real clients rely on, over HTTP: server-side key backup (`/room_keys/*`), room tags, ignored
//! users, notification counts from push rules, and presence being off.

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
    let v1 = alice.post("/room_keys/version", json!({"algorithm": algo, "auth_data": {"public_key": "pk1"}})).await.ok()["version"]
        .as_str()
        .unwrap()
        .to_owned();
    let info = alice.get("/room_keys/version").await.ok();
    assert_eq!((info["version"].as_str(), info["algorithm"].as_str(), info["count"].as_i64()), (Some(v1.as_str()), Some(algo), Some(0)));
    assert_eq!(info["auth_data"]["public_key"], "pk1");
    // Another user's backup is separate.
    bob.get("/room_keys/version").await.assert_err(404, "M_NOT_FOUND");

    // Keys: all rooms, one room, one session.
    let put = alice
        .put(&format!("/room_keys/keys?version={v1}"), json!({"rooms": {room: {"sessions": {"s1": key(5, 0, false, "a"), "s2": key(0, 0, false, "b")}}}}))
        .await
        .ok();
    assert_eq!(put["count"], 2);
    let etag1 = put["etag"].as_str().unwrap().to_owned();
    alice.put(&format!("/room_keys/keys/{r}/s3?version={v1}"), key(0, 0, true, "c")).await.ok();
    let all = alice.get(&format!("/room_keys/keys?version={v1}")).await.ok();
    assert_eq!(all["rooms"][room]["sessions"].as_object().unwrap().len(), 3);
    assert_eq!(alice.get(&format!("/room_keys/keys/{r}?version={v1}")).await.ok()["sessions"]["s2"]["session_data"]["ephemeral"], "b");
    assert_eq!(alice.get(&format!("/room_keys/keys/{r}/s3?version={v1}")).await.ok()["is_verified"], true);
    alice.get(&format!("/room_keys/keys/{r}/nosuch?version={v1}")).await.assert_err(404, "M_NOT_FOUND");
    assert_eq!(alice.get(&format!("/room_keys/keys/{}?version={v1}", enc("!other:localhost"))).await.ok(), json!({"sessions": {}}));

    // A worse key does not replace a better one; a better one does (and changes the etag).
    let same = alice.put(&format!("/room_keys/keys/{r}/s1?version={v1}"), key(9, 0, false, "worse")).await.ok();
    assert_eq!(same["etag"], json!(alice.get("/room_keys/version").await.ok()["etag"]));
    assert_eq!(alice.get(&format!("/room_keys/keys/{r}/s1?version={v1}")).await.ok()["session_data"]["ephemeral"], "a");
    let better = alice.put(&format!("/room_keys/keys/{r}/s1?version={v1}"), key(1, 0, false, "better")).await.ok();
    assert_ne!(better["etag"].as_str().unwrap(), etag1);
    assert_eq!(alice.get(&format!("/room_keys/keys/{r}/s1?version={v1}")).await.ok()["session_data"]["ephemeral"], "better");
    alice.put(&format!("/room_keys/keys/{r}/s3?version={v1}"), key(0, 0, false, "unverified")).await.ok();
    assert_eq!(alice.get(&format!("/room_keys/keys/{r}/s3?version={v1}")).await.ok()["session_data"]["ephemeral"], "c");

    // Update auth_data (the algorithm cannot change); a new version makes the old one read-only.
    alice.put(&format!("/room_keys/version/{v1}"), json!({"algorithm": algo, "auth_data": {"public_key": "pk1b"}})).await.ok();
    assert_eq!(alice.get(&format!("/room_keys/version/{v1}")).await.ok()["auth_data"]["public_key"], "pk1b");
    alice.put(&format!("/room_keys/version/{v1}"), json!({"algorithm": "other", "auth_data": {}})).await.assert_err(400, "M_INVALID_PARAM");
    let v2 = alice.post("/room_keys/version", json!({"algorithm": algo, "auth_data": {"public_key": "pk2"}})).await.ok()["version"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(v1, v2);
    assert_eq!(alice.get("/room_keys/version").await.ok()["version"], json!(v2));
    let wrong = alice.put(&format!("/room_keys/keys/{r}/s9?version={v1}"), key(0, 0, false, "x")).await;
    wrong.assert_err(403, "M_WRONG_ROOM_KEYS_VERSION");
    assert_eq!(wrong.body["current_version"], json!(v2));
    alice.put(&format!("/room_keys/keys/{r}/s9?version=999"), key(0, 0, false, "x")).await.assert_err(404, "M_NOT_FOUND");
    alice.put(&format!("/room_keys/keys/{r}/s9"), key(0, 0, false, "x")).await.assert_err(400, "M_MISSING_PARAM");
    alice.put(&format!("/room_keys/keys/{r}/s9?version={v2}"), json!({"bad": true})).await.assert_err(400, "M_BAD_JSON");
    // Old keys stay readable.
    assert_eq!(alice.get(&format!("/room_keys/keys?version={v1}")).await.ok()["rooms"][room]["sessions"].as_object().unwrap().len(), 3);

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
