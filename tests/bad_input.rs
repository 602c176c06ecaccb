//! Bad input gets the right Matrix error (never a 500, never a half-written event).

mod common;

use common::*;
use reqwest::Method;

#[tokio::test]
async fn malformed_json_is_m_not_json() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let r = alice.request_raw(Method::POST, "/createRoom", "{\"name\": ").await;
    r.assert_err(400, "M_NOT_JSON");
    let r = alice.request_raw(Method::PUT, "/rooms/!x:localhost/send/m.room.message/t1", "not json at all").await;
    r.assert_err(400, "M_NOT_JSON");
    let r = s.client().request_raw(Method::POST, "/login", vec![0xffu8, 0xfe, 0x00]).await;
    r.assert_err(400, "M_NOT_JSON");
    s.stop().await;
}

#[tokio::test]
async fn wrong_shape_is_m_bad_json() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let room = alice.create_room(json!({})).await;

    alice.post("/createRoom", json!({"invite": "not-a-list"})).await.assert_err(400, "M_BAD_JSON");
    alice
        .post("/createRoom", json!({"initial_state": [{"type": "x", "content": "not an object"}]}))
        .await
        .assert_err(400, "M_BAD_JSON");
    s.client().post("/login", json!({"type": 5})).await.assert_err(400, "M_BAD_JSON");
    s.client().post("/login", json!({"type": "m.login.password", "password": "x"})).await.assert_err(400, "M_BAD_JSON");
    alice.send(&room, "m.room.message", json!([1, 2, 3])).await.assert_err(400, "M_BAD_JSON");
    alice.put_state(&room, "m.room.topic", "", json!("a string")).await.assert_err(400, "M_BAD_JSON");
    alice
        .post(&format!("/user/{}/filter", enc(&alice.user_id)), json!({"room": {"timeline": {"limit": "ten"}}}))
        .await
        .assert_err(400, "M_BAD_JSON");
    alice
        .put(&format!("/profile/{}/displayname", enc(&alice.user_id)), json!({"displayname": 42}))
        .await
        .assert_err(400, "M_BAD_JSON");
    // Nothing was half-written by any of that.
    let msgs = alice.messages(&room, &[("dir", "b"), ("limit", "100")]).await.ok();
    assert!(msgs["chunk"].as_array().unwrap().iter().all(|e| e["type"] != "m.room.message"));
    s.stop().await;
}

#[tokio::test]
async fn unknown_endpoint_is_m_unrecognized() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    alice.get("/no/such/endpoint").await.assert_err(404, "M_UNRECOGNIZED");
    s.client().get("/_matrix/client/v9/whatever").await.assert_err(404, "M_UNRECOGNIZED");
    s.client().get("/_matrix/not_an_api").await.assert_err(404, "M_UNRECOGNIZED");
    // A known path with the wrong method.
    let r = alice.request(Method::DELETE, "/login", None).await;
    r.assert_err(405, "M_UNRECOGNIZED");
    s.stop().await;
}

#[tokio::test]
async fn missing_and_unknown_tokens() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let anon = s.client();
    anon.get("/account/whoami").await.assert_err(401, "M_MISSING_TOKEN");
    anon.post("/createRoom", json!({})).await.assert_err(401, "M_MISSING_TOKEN");
    anon.get("/sync").await.assert_err(401, "M_MISSING_TOKEN");

    let mut bad = s.client();
    bad.token = Some("hth_not_a_real_token".into());
    let r = bad.get("/account/whoami").await;
    r.assert_err(401, "M_UNKNOWN_TOKEN");
    assert_eq!(r.body["soft_logout"], false);

    // The token may also come as a query parameter.
    let token = alice.token.clone().unwrap();
    let q = anon.get(&format!("/account/whoami?access_token={}", enc(&token))).await.ok();
    assert_eq!(q["user_id"], alice.user_id);
    anon.get("/account/whoami?access_token=nope").await.assert_err(401, "M_UNKNOWN_TOKEN");
    s.stop().await;
}

#[tokio::test]
async fn not_allowed_is_m_forbidden() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = alice.create_room(json!({"preset": "private_chat"})).await;

    bob.send(&room, "m.room.message", json!({"msgtype": "m.text", "body": "let me in"}))
        .await
        .assert_err(403, "M_FORBIDDEN");
    bob.state(&room, "m.room.create", "").await.assert_err(403, "M_FORBIDDEN");
    bob.messages(&room, &[("dir", "b")]).await.assert_err(403, "M_FORBIDDEN");
    bob.invite(&room, &bob.user_id).await.assert_err(403, "M_FORBIDDEN");
    bob.put(&format!("/profile/{}/displayname", enc(&alice.user_id)), json!({"displayname": "x"}))
        .await
        .assert_err(403, "M_FORBIDDEN");
    bob.join(&room).await.assert_err(403, "M_FORBIDDEN");
    // Power levels: a member with power 0 may not change state that needs 50.
    alice.invite(&room, &bob.user_id).await.ok();
    bob.join(&room).await.ok();
    bob.put_state(&room, "m.room.power_levels", "", json!({"users": {bob.user_id.clone(): 100}}))
        .await
        .assert_err(403, "M_FORBIDDEN");
    s.stop().await;
}

#[tokio::test]
async fn body_over_limit_is_m_too_large() {
    let s = TestServer::start_with(|c| c.limits.max_request_bytes = 65536).await;
    let alice = s.user("alice").await;
    let room = alice.create_room(json!({})).await;
    let big = "x".repeat(100_000);
    let r = alice.send(&room, "m.room.message", json!({"msgtype": "m.text", "body": big})).await;
    r.assert_err(413, "M_TOO_LARGE");
    let r = alice.request_raw(Method::POST, "/createRoom", format!("{{\"name\": \"{big}\"}}")).await;
    r.assert_err(413, "M_TOO_LARGE");
    // A body just under the limit that is still a valid request goes through.
    alice.send_text(&room, &"y".repeat(30_000)).await;
    s.stop().await;
}

#[tokio::test]
async fn event_over_65536_bytes_is_m_too_large() {
    let s = TestServer::start().await; // request limit 1 MiB: the event limit is what stops these
    let alice = s.user("alice").await;
    let room = alice.create_room(json!({})).await;
    let before = alice.messages(&room, &[("dir", "b"), ("limit", "100")]).await.ok()["chunk"].as_array().unwrap().len();

    let big = "x".repeat(70_000);
    alice.send(&room, "m.room.message", json!({"msgtype": "m.text", "body": big})).await.assert_err(413, "M_TOO_LARGE");
    alice.put_state(&room, "org.example.big", "", json!({"data": big})).await.assert_err(413, "M_TOO_LARGE");

    // Nothing was written: no event, no state.
    let after = alice.messages(&room, &[("dir", "b"), ("limit", "100")]).await.ok()["chunk"].as_array().unwrap().len();
    assert_eq!(before, after);
    alice.state(&room, "org.example.big", "").await.assert_err(404, "M_NOT_FOUND");
    // The room still works.
    alice.send_text(&room, "small").await;
    s.stop().await;
}

#[tokio::test]
async fn login_brute_force_is_rate_limited() {
    let s = TestServer::start().await; // 5 failures per minute
    s.user("alice").await;
    let c = s.client();
    for i in 0..5 {
        let mut c = c.clone();
        let r = c.login("alice", &format!("guess{i}")).await;
        r.assert_err(403, "M_FORBIDDEN");
    }
    let mut c2 = c.clone();
    let r = c2.login("alice", "guess-again").await;
    r.assert_err(429, "M_LIMIT_EXCEEDED");
    let retry = r.body["retry_after_ms"].as_u64().expect("retry_after_ms");
    assert!(retry > 0 && retry <= 60_000, "retry_after_ms = {retry}");
    // While limited, even the right password is refused (the attacker learns nothing).
    let mut c3 = c.clone();
    c3.login("alice", PASSWORD).await.assert_err(429, "M_LIMIT_EXCEEDED");
    s.stop().await;
}

/// A sweep of odd requests: each gets a 4xx with a Matrix error body, never a 500.
#[tokio::test]
async fn garbage_never_500s() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let room = alice.create_room(json!({})).await;
    let cases: Vec<(Method, String, Option<Value>)> = vec![
        (Method::PUT, "/rooms/not-a-room/send/m.room.message/t1".into(), Some(json!({"body": "x"}))),
        (
            Method::PUT,
            format!("/rooms/{}/send/m.room.message/t1", enc("!unknown:localhost")),
            Some(json!({"body": "x"})),
        ),
        (Method::GET, format!("/rooms/{}/event/not-an-event", enc(&room)), None),
        (Method::GET, format!("/rooms/{}/messages?dir=b&limit=abc", enc(&room)), None),
        (Method::GET, format!("/rooms/{}/members?at=zzz", enc(&room)), None),
        (Method::GET, "/sync?since=garbage".into(), None),
        (Method::GET, "/sync?filter=%7Bbroken".into(), None),
        (Method::GET, "/sync?filter=12345".into(), None),
        (Method::GET, "/sync?timeout=-5".into(), None),
        (Method::POST, "/join/not-a-room".into(), Some(json!({}))),
        (Method::POST, format!("/rooms/{}/invite", enc(&room)), Some(json!({"user_id": "not a user id"}))),
        (
            Method::PUT,
            format!("/rooms/{}/state/m.room.member/notauser", enc(&room)),
            Some(json!({"membership": "join"})),
        ),
        (Method::PUT, format!("/rooms/{}/redact/notanevent/t9", enc(&room)), Some(json!({}))),
        (Method::GET, "/directory/room/not-an-alias".into(), None),
        (Method::PUT, format!("/directory/list/room/{}", enc(&room)), Some(json!({"visibility": "sideways"}))),
        (Method::GET, "/profile/%40nobody%3Alocalhost/not_a_field".into(), None),
        (Method::POST, "/createRoom".into(), Some(json!({"room_alias_name": "has:colon"}))),
        (Method::POST, "/createRoom".into(), Some(json!({"visibility": "sideways"}))),
        (Method::POST, "/createRoom".into(), Some(json!({"invite": ["not-a-user"]}))),
        (Method::GET, "/user/%40alice%3Alocalhost/filter/notanumber".into(), None),
    ];
    for (method, path, body) in cases {
        let r = alice.request(method.clone(), &path, body.as_ref()).await;
        assert!((400..500).contains(&r.status), "{method} {path}: {} {}", r.status, r.text);
        assert!(r.errcode().starts_with("M_"), "{method} {path}: {}", r.text);
    }
    // And the server is still fine.
    alice.send_text(&room, "still alive").await;
    s.stop().await;
}

/// A number parameter left empty (`limit=`) is no number: 400 `M_INVALID_PARAM`, as Synapse answers, not the
/// default as if it were absent (schemathesis found `/relations?limit=` answered 200). Absent still means the
/// default.
#[tokio::test]
async fn an_empty_number_parameter_is_refused() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let room = alice.create_room(json!({})).await;
    let event = alice.send_text(&room, "parent").await;
    let (room, event) = (enc(&room), enc(&event));
    for path in [
        format!("/rooms/{room}/messages?dir=b&limit="),
        format!("/rooms/{room}/context/{event}?limit="),
        "/sync?timeout=".to_owned(),
        "/notifications?limit=".to_owned(),
    ] {
        let r = alice.request(Method::GET, &path, None).await;
        assert_eq!((r.status, r.errcode()), (400, "M_INVALID_PARAM"), "{path}: {}", r.text);
    }
    let relations = |q: &str| format!("/_matrix/client/v1/rooms/{room}/relations/{event}{q}");
    let r = alice.request(Method::GET, &relations("?limit=&dir=f"), None).await;
    assert_eq!((r.status, r.errcode()), (400, "M_INVALID_PARAM"), "{}", r.text);
    let r = alice.request(Method::GET, &relations("?dir=f"), None).await;
    assert_eq!((r.status, r.body["chunk"].as_array().map(Vec::len)), (200, Some(0)), "{}", r.text);
    s.stop().await;
}

/// User ids outside the spec's grammar (historical ids included) are refused with 400 `M_INVALID_PARAM` wherever a
/// client names a user, before anything is stored or queued; registration refuses user names outside
/// `[a-z0-9._=-/+]` with `M_INVALID_USERNAME`.
#[tokio::test]
async fn invalid_user_ids_are_refused_and_nothing_is_queued() {
    let s = TestServer::start_with(|c| {
        // Federation on (no listener needed): remote to-device messages would be queued for other servers.
        c.federation.enabled = true;
        c.federation.trusted_key_servers = vec![];
    })
    .await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = alice.create_room(json!({})).await;
    let bad_ids =
        ["@:", "@bob", "bob:localhost", "@:localhost", "@bo b:localhost", "@bob:", "@bob:bad_server!", "@é:localhost"];
    for bad in bad_ids {
        // To-device: the whole request is refused, the valid recipient included; nothing is queued anywhere.
        let body = json!({"messages": {
            bad: {"D": {"x": 1}}, bob.user_id.clone(): {"*": {"x": 2}}, "@carol:remote.example": {"D": {"x": 3}}
        }});
        alice.put(&format!("/sendToDevice/m.test/{}", alice.next_txn()), body).await.assert_err(400, "M_INVALID_PARAM");
        alice.post("/keys/query", json!({"device_keys": {bad: []}})).await.assert_err(400, "M_INVALID_PARAM");
        alice
            .post("/keys/claim", json!({"one_time_keys": {bad: {"D": "signed_curve25519"}}}))
            .await
            .assert_err(400, "M_INVALID_PARAM");
        alice
            .post(&format!("/rooms/{}/invite", enc(&room)), json!({"user_id": bad}))
            .await
            .assert_err(400, "M_INVALID_PARAM");
        alice.get(&format!("/profile/{}", enc(bad))).await.assert_err(400, "M_INVALID_PARAM");
        alice.get(&format!("/profile/{}/displayname", enc(bad))).await.assert_err(400, "M_INVALID_PARAM");
        alice.get(&format!("/presence/{}/status", enc(bad))).await.assert_err(400, "M_INVALID_PARAM");
    }
    let conn = rusqlite::Connection::open(&s.db_path).unwrap();
    let queued: i64 = conn.query_row("SELECT count(*) FROM outbox", [], |r| r.get(0)).unwrap();
    assert_eq!(queued, 0, "nothing was queued for any server");
    let sync = bob.sync(None, &[("timeout", "0")]).await.ok();
    assert_eq!(sync["to_device"]["events"], json!([]), "the valid recipient got nothing either: {sync}");

    // Registration: a user name is a localpart of the new grammar only.
    for bad in ["has:colon", "@x:other", "@x", "Space d", "é", "", "semi;colon"] {
        let r = s
            .client()
            .post("/register", json!({"username": bad, "password": PASSWORD, "auth": {"type": "m.login.dummy"}}))
            .await;
        r.assert_err(400, "M_INVALID_USERNAME");
        s.client()
            .get(&format!("/register/available?username={}", enc(bad)))
            .await
            .assert_err(400, "M_INVALID_USERNAME");
    }
    let users: i64 = conn.query_row("SELECT count(*) FROM users", [], |r| r.get(0)).unwrap();
    assert_eq!(users, 2, "no account was created");
    s.stop().await;
}
