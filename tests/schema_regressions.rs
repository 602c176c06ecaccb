//! Regression tests for what schemathesis (tests/schemathesis.rs) found against the spec's schemas, so they stay
//! fixed without Python: each answer below used to be a 200 with a body outside the spec, or a 200 for invalid input.

mod common;

use common::*;

#[tokio::test]
async fn responses_have_the_spec_shape() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    // Devices: unknown optional fields are omitted, not null.
    let devices = alice.get("/devices").await.ok();
    let d = &devices["devices"][0];
    assert!(d.as_object().unwrap().values().all(|v| !v.is_null()), "{devices}");
    let one = alice.get(&format!("/devices/{}", enc(&alice.device_id))).await.ok();
    assert!(one.as_object().unwrap().values().all(|v| !v.is_null()), "{one}");
    // A filter stored with nulls reads back without them.
    let path = format!("/user/{}/filter", enc(&alice.user_id));
    let id = alice.post(&path, json!({"room": null, "presence": {"types": null}})).await.ok()["filter_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let f = alice.get(&format!("{path}/{id}")).await.ok();
    assert_eq!(f, json!({"presence": {}}));
    server.stop().await;
}

#[tokio::test]
async fn invalid_input_is_refused() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    let me = enc(&alice.user_id);

    // Every JSON body of the API is an object.
    alice.post(&format!("/join/{}", enc(&room)), json!([null, null])).await.assert_err(400, "M_BAD_JSON");
    alice.put(&format!("/profile/{me}/displayname"), json!([1])).await.assert_err(400, "M_BAD_JSON");
    // The profile field must be there (null removes it).
    alice.put(&format!("/profile/{me}/displayname"), json!({})).await.assert_err(400, "M_BAD_JSON");
    alice.put(&format!("/profile/{me}/displayname"), json!({"displayname": null})).await.ok();
    // Third-party invites are not supported.
    let tps = json!({"third_party_signed": {"sender": "@a:x", "mxid": "@b:x", "token": "t", "signatures": {}}});
    alice.post(&format!("/rooms/{}/join", enc(&room)), tps).await.assert_err(400, "M_INVALID_PARAM");

    // Filters: shapes and ids.
    let path = format!("/user/{me}/filter");
    for bad in [
        json!({"room": "AAA"}),
        json!({"room": [null, null]}),
        json!({"room": {"rooms": "x"}}),
        json!({"room": {"timeline": {"rooms": [""]}}}),
        json!({"room": {"timeline": {"unread_thread_notifications": "yes"}}}),
        json!({"room": {"state": {"senders": ["alice"]}}}),
        json!({"room": {"include_leave": 1}}),
        json!({"presence": {"limit": -1}}),
        json!({"event_format": "xml"}),
    ] {
        alice.post(&path, bad.clone()).await.assert_err(400, "M_BAD_JSON");
        let f = serde_json::to_string(&bad).unwrap();
        alice.sync(None, &[("filter", &f)]).await.assert_err(400, "M_BAD_JSON");
    }
    alice
        .post(&path, json!({"room": {"timeline": {"rooms": [room.clone()], "limit": 5, "lazy_load_members": true}}}))
        .await
        .ok();

    // /sync: set_presence and use_state_after are validated (MSC4222 is not implemented).
    alice.sync(None, &[("set_presence", "dancing")]).await.assert_err(400, "M_INVALID_PARAM");
    alice.sync(None, &[("use_state_after", "null")]).await.assert_err(400, "M_INVALID_PARAM");
    alice.sync(None, &[("set_presence", "online"), ("use_state_after", "false")]).await.ok();

    // /members: membership values.
    alice.get(&format!("/rooms/{}/members?not_membership=null", enc(&room))).await.assert_err(400, "M_INVALID_PARAM");
    alice.get(&format!("/rooms/{}/members?membership=join", enc(&room))).await.ok();

    // publicRooms filter.
    alice.post("/publicRooms", json!({"filter": "AAA"})).await.assert_err(400, "M_BAD_JSON");
    alice.post("/publicRooms", json!({"filter": {"room_types": {}}})).await.assert_err(400, "M_BAD_JSON");
    alice
        .post("/publicRooms", json!({"filter": {"generic_search_term": "x", "room_types": [null, "m.space"]}}))
        .await
        .ok();

    // E2EE key endpoints.
    alice.post("/keys/query", json!({"device_keys": {"@x:localhost": [null]}})).await.assert_err(400, "M_BAD_JSON");
    alice.post("/keys/signatures/upload", json!({"@x:localhost": [null, null]})).await.assert_err(400, "M_BAD_JSON");
    alice.post("/keys/signatures/upload", json!({"@x:localhost": {"k": "AAA"}})).await.assert_err(400, "M_BAD_JSON");
    alice
        .post("/room_keys/version", json!({"algorithm": "AAA", "auth_data": {}}))
        .await
        .assert_err(400, "M_INVALID_PARAM");
    server.stop().await;
}

#[tokio::test]
async fn notary_query_is_checked() {
    let server = TestServer::start_with(|c| {
        c.federation.enabled = true;
        c.federation.serve_on_client_listener = true;
        c.federation.trusted_key_servers = vec![];
    })
    .await;
    let anon = server.client();
    anon.post("/_matrix/key/v2/query", json!({})).await.assert_err(400, "M_BAD_JSON");
    anon.post(
        "/_matrix/key/v2/query",
        json!({"server_keys": {"localhost": {"ed25519:x": {"minimum_valid_until_ts": 1u64 << 60}}}}),
    )
    .await
    .assert_err(400, "M_BAD_JSON");
    let ok = anon.post("/_matrix/key/v2/query", json!({"server_keys": {"localhost": {}}})).await.ok();
    assert_eq!(ok["server_keys"][0]["server_name"], "localhost");
    server.stop().await;
}
