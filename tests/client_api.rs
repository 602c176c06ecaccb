//! The client-server API foundation, driven over real HTTP against an in-process server.

mod common;

use std::time::{Duration, Instant};

use common::*;

// ------------------------------------------------------------------------------------------------------------
// Discovery, login, logout, whoami

#[tokio::test]
async fn versions_and_well_known() {
    let s = TestServer::start().await;
    let c = s.client();
    let v = c.get("/_matrix/client/versions").await.ok();
    let versions: Vec<&str> = v["versions"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(versions.contains(&"v1.1") && versions.contains(&"r0.6.1"), "{v}");

    // Without `well_known.client_base_url` there is no client discovery (tests/well_known.rs has the configured case).
    c.get("/.well-known/matrix/client").await.assert_err(404, "M_NOT_FOUND");
    s.stop().await;
}

#[tokio::test]
async fn login_flows_and_password_login() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    assert_eq!(alice.user_id, "@alice:localhost");

    let flows = s.client().get("/login").await.ok();
    assert!(flows["flows"].as_array().unwrap().iter().any(|f| f["type"] == "m.login.password"), "{flows}");

    // By localpart, by full user id, and with the legacy `user` field.
    for who in ["alice", "@alice:localhost"] {
        let mut c = s.client();
        let r = c.login(who, PASSWORD).await.ok();
        assert_eq!(r["user_id"], "@alice:localhost");
        assert!(r["access_token"].as_str().is_some_and(|t| !t.is_empty()));
        assert!(r["device_id"].as_str().is_some_and(|t| !t.is_empty()));
        let me = c.get("/account/whoami").await.ok();
        assert_eq!(me["user_id"], "@alice:localhost");
        assert_eq!(me["device_id"], r["device_id"]);
    }
    let legacy =
        s.client().post("/login", json!({"type": "m.login.password", "user": "alice", "password": PASSWORD})).await;
    assert_eq!(legacy.status, 200, "{}", legacy.text);

    // A device id chosen by the client is kept.
    let c = s.client();
    let r = c
        .post(
            "/login",
            json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"},
                                "password": PASSWORD, "device_id": "MYPHONE", "initial_device_display_name": "Phone"}),
        )
        .await
        .ok();
    assert_eq!(r["device_id"], "MYPHONE");

    // User names are not case-sensitive at login, in either form.
    for who in ["ALICE", "@Alice:localhost"] {
        let mut c = s.client();
        assert_eq!(c.login(who, PASSWORD).await.ok()["user_id"], "@alice:localhost", "{who}");
        assert_eq!(c.get("/account/whoami").await.ok()["user_id"], "@alice:localhost");
    }

    let wrong = s.client().login("alice", "wrong").await;
    wrong.assert_err(403, "M_FORBIDDEN");
    let nobody = s.client().login("nobody", PASSWORD).await;
    nobody.assert_err(403, "M_FORBIDDEN");
    s.stop().await;
}

#[tokio::test]
async fn whoami_and_r0_alias() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let me = alice.get("/account/whoami").await.ok();
    assert_eq!(me["user_id"], alice.user_id);
    assert_eq!(me["device_id"], alice.device_id);
    let r0 = alice.get("/_matrix/client/r0/account/whoami").await.ok();
    assert_eq!(r0["user_id"], alice.user_id);
    s.stop().await;
}

#[tokio::test]
async fn logout_and_logout_all() {
    let s = TestServer::start().await;
    let first = s.user("alice").await;
    let mut second = s.client();
    second.login("alice", PASSWORD).await.ok();
    let mut third = s.client();
    third.login("alice", PASSWORD).await.ok();

    let device_ids = |v: Value| -> Vec<String> {
        let mut ids: Vec<String> =
            v["devices"].as_array().unwrap().iter().map(|d| d["device_id"].as_str().unwrap().to_owned()).collect();
        ids.sort();
        ids
    };
    assert_eq!(device_ids(second.get("/devices").await.ok()).len(), 3);

    // Logout ends the token and deletes its device.
    first.post("/logout", json!({})).await.ok();
    first.get("/account/whoami").await.assert_err(401, "M_UNKNOWN_TOKEN");
    second.get("/account/whoami").await.ok();
    let mut left = vec![second.device_id.clone(), third.device_id.clone()];
    left.sort();
    assert_eq!(device_ids(second.get("/devices").await.ok()), left);

    // Logout/all ends every token and deletes every device.
    second.post("/logout/all", json!({})).await.ok();
    second.get("/account/whoami").await.assert_err(401, "M_UNKNOWN_TOKEN");
    third.get("/account/whoami").await.assert_err(401, "M_UNKNOWN_TOKEN");

    // Logging in again still works, on a fresh device list.
    let mut again = s.client();
    again.login("alice", PASSWORD).await.ok();
    again.get("/account/whoami").await.ok();
    assert_eq!(device_ids(again.get("/devices").await.ok()), [again.device_id.clone()]);
    s.stop().await;
}

// ------------------------------------------------------------------------------------------------------------
// Registration

#[tokio::test]
async fn register_with_uia_dummy() {
    let s = TestServer::start().await;
    let c = s.client();
    // First request without auth: 401 with flows and a session.
    let first = c.post("/register", json!({"username": "bob", "password": PASSWORD})).await;
    assert_eq!(first.status, 401, "{}", first.text);
    let session = first.body["session"].as_str().expect("session").to_owned();
    let flows = first.body["flows"].as_array().expect("flows");
    assert!(flows.iter().any(|f| f["stages"] == json!(["m.login.dummy"])), "{}", first.text);

    let done = c
        .post(
            "/register",
            json!({"username": "bob", "password": PASSWORD, "auth": {"type": "m.login.dummy", "session": session}}),
        )
        .await
        .ok();
    assert_eq!(done["user_id"], "@bob:localhost");
    let token = done["access_token"].as_str().expect("access_token").to_owned();
    assert!(done["device_id"].is_string());
    let mut bob = s.client();
    bob.token = Some(token);
    assert_eq!(bob.get("/account/whoami").await.ok()["user_id"], "@bob:localhost");

    // The password works for login.
    s.client().login("bob", PASSWORD).await.ok();

    // Taken and invalid names.
    let taken =
        c.post("/register", json!({"username": "bob", "password": "x", "auth": {"type": "m.login.dummy"}})).await;
    taken.assert_err(400, "M_USER_IN_USE");
    let bad =
        c.post("/register", json!({"username": "Bad Name!", "password": "x", "auth": {"type": "m.login.dummy"}})).await;
    bad.assert_err(400, "M_INVALID_USERNAME");
    // The user name is a local part: a `:` or `@` in it is refused, not cut off.
    for name in ["bob2:-x", "@bob3", "bob4:localhost", "b\u{e9}b"] {
        let r =
            c.post("/register", json!({"username": name, "password": "x", "auth": {"type": "m.login.dummy"}})).await;
        r.assert_err(400, "M_INVALID_USERNAME");
    }
    s.stop().await;
}

#[tokio::test]
async fn register_dummy_in_first_request_like_nio() {
    let s = TestServer::start().await;
    let c = s.client();
    let r = c
        .post("/register", json!({"username": "carol", "password": PASSWORD, "auth": {"type": "m.login.dummy"}}))
        .await
        .ok();
    assert_eq!(r["user_id"], "@carol:localhost");
    assert!(r["access_token"].is_string());

    // inhibit_login: account made, no token.
    let r = c
        .post(
            "/register",
            json!({"username": "dave", "password": PASSWORD, "inhibit_login": true, "auth": {"type": "m.login.dummy"}}),
        )
        .await
        .ok();
    assert_eq!(r["user_id"], "@dave:localhost");
    assert!(r.get("access_token").is_none(), "{r}");
    s.client().login("dave", PASSWORD).await.ok();
    s.stop().await;
}

#[tokio::test]
async fn registration_disabled_by_default_config() {
    let s = TestServer::start_with(|c| c.registration.enabled = false).await;
    let r = s
        .client()
        .post("/register", json!({"username": "x", "password": "y", "auth": {"type": "m.login.dummy"}}))
        .await;
    r.assert_err(403, "M_FORBIDDEN");
    s.stop().await;
}

#[tokio::test]
async fn registration_token_flow() {
    let s = TestServer::start_with(|c| c.registration.token = Some("let-me-in".into())).await;
    let c = s.client();
    let first = c.post("/register", json!({"username": "erin", "password": PASSWORD})).await;
    assert_eq!(first.status, 401, "{}", first.text);
    assert!(first.body["flows"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["stages"] == json!(["m.login.registration_token"])));
    let session = first.body["session"].as_str().unwrap().to_owned();

    // m.login.dummy does not satisfy the token flow.
    let dummy = c
        .post(
            "/register",
            json!({"username": "erin", "password": PASSWORD, "auth": {"type": "m.login.dummy", "session": session}}),
        )
        .await;
    assert_eq!(dummy.status, 401, "{}", dummy.text);

    // A wrong token: 401 with an error code, and the flows again.
    let wrong = c
        .post(
            "/register",
            json!({"username": "erin", "password": PASSWORD,
                                  "auth": {"type": "m.login.registration_token", "token": "nope", "session": session}}),
        )
        .await;
    assert_eq!(wrong.status, 401, "{}", wrong.text);
    assert_eq!(wrong.errcode(), "M_FORBIDDEN");
    assert!(wrong.body["flows"].is_array());

    let ok = c
        .post("/register", json!({"username": "erin", "password": PASSWORD,
                                  "auth": {"type": "m.login.registration_token", "token": "let-me-in", "session": session}}))
        .await
        .ok();
    assert_eq!(ok["user_id"], "@erin:localhost");
    s.stop().await;
}

#[tokio::test]
async fn register_available() {
    let s = TestServer::start().await;
    s.user("frank").await;
    let c = s.client();
    assert_eq!(c.get("/register/available?username=george").await.ok()["available"], true);
    c.get("/register/available?username=frank").await.assert_err(400, "M_USER_IN_USE");
    c.get("/register/available?username=Not%20Valid").await.assert_err(400, "M_INVALID_USERNAME");
    s.stop().await;
}

#[tokio::test]
async fn capabilities() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let caps = alice.get("/capabilities").await.ok();
    let rv = &caps["capabilities"]["m.room_versions"];
    assert_eq!(rv["default"], "12", "{caps}");
    for v in ["1", "10", "11", "12"] {
        assert_eq!(rv["available"][v], "stable", "{caps}");
    }
    assert_eq!(caps["capabilities"]["m.change_password"]["enabled"], true);
    // Capabilities are per user: asking without an access token is refused.
    s.client().get("/capabilities").await.assert_err(401, "M_MISSING_TOKEN");
    s.stop().await;
}

#[tokio::test]
async fn filters_create_and_get() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let filter =
        json!({"room": {"timeline": {"limit": 5, "types": ["m.room.message"]}, "state": {"lazy_load_members": true}}});
    let r = alice.post(&format!("/user/{}/filter", enc(&alice.user_id)), filter.clone()).await.ok();
    let id = r["filter_id"].as_str().expect("filter_id").to_owned();
    let got = alice.get(&format!("/user/{}/filter/{}", enc(&alice.user_id), id)).await.ok();
    assert_eq!(got, filter);

    bob.get(&format!("/user/{}/filter/{}", enc(&alice.user_id), id)).await.assert_err(403, "M_FORBIDDEN");
    bob.post(&format!("/user/{}/filter", enc(&alice.user_id)), json!({})).await.assert_err(403, "M_FORBIDDEN");
    alice.get(&format!("/user/{}/filter/9999", enc(&alice.user_id))).await.assert_err(404, "M_NOT_FOUND");

    // The stored filter is usable by id in /sync.
    let room = alice.create_room(json!({})).await;
    alice.send_text(&room, "hello").await;
    let sync = alice.sync(None, &[("filter", &id)]).await.ok();
    let tl = events_of(&sync["rooms"]["join"][&room]["timeline"]);
    assert!(!tl.is_empty() && tl.iter().all(|e| e["type"] == "m.room.message"), "{tl:?}");
    s.stop().await;
}

// ------------------------------------------------------------------------------------------------------------
// Creating rooms

#[tokio::test]
async fn create_room_presets_name_topic() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;

    let public = alice.create_room(json!({"preset": "public_chat", "name": "Lobby", "topic": "Say hi"})).await;
    assert_eq!(alice.state(&public, "m.room.join_rules", "").await.ok()["join_rule"], "public");
    assert_eq!(alice.state(&public, "m.room.name", "").await.ok()["name"], "Lobby");
    let topic = alice.state(&public, "m.room.topic", "").await.ok();
    assert_eq!(topic["topic"], "Say hi");
    // The rich form carries the same text as plain text.
    assert_eq!(topic["m.topic"]["m.text"], json!([{"body": "Say hi", "mimetype": "text/plain"}]), "{topic}");
    // `topic` wins over a topic in `initial_state`.
    let both = alice
        .create_room(json!({"topic": "mine", "initial_state": [
            {"type": "m.room.topic", "state_key": "", "content": {"topic": "theirs"}}]}))
        .await;
    assert_eq!(alice.state(&both, "m.room.topic", "").await.ok()["m.topic"]["m.text"][0]["body"], "mine");
    assert_eq!(alice.state(&public, "m.room.history_visibility", "").await.ok()["history_visibility"], "shared");
    let member = alice.state(&public, "m.room.member", &alice.user_id).await.ok();
    assert_eq!(member["membership"], "join");

    let private = alice.create_room(json!({"preset": "private_chat"})).await;
    assert_eq!(alice.state(&private, "m.room.join_rules", "").await.ok()["join_rule"], "invite");

    // visibility=public without preset means public_chat.
    let vis = alice.create_room(json!({"visibility": "public"})).await;
    assert_eq!(alice.state(&vis, "m.room.join_rules", "").await.ok()["join_rule"], "public");

    let bad = alice.post("/createRoom", json!({"preset": "no_such_preset"})).await;
    assert_eq!(bad.status, 400, "{}", bad.text);
    s.stop().await;
}

#[tokio::test]
async fn create_room_versions() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;

    // Default: version 12, room id derived from the create event (no server part), creator not in power levels.
    let v12 = alice.create_room(json!({})).await;
    let create = alice.state(&v12, "m.room.create", "").await.ok();
    assert_eq!(create["room_version"], "12");
    assert!(!v12.contains(':'), "v12 room ids have no server name: {v12}");
    let pl = alice.state(&v12, "m.room.power_levels", "").await.ok();
    assert!(pl["users"].get(&alice.user_id).is_none(), "v12 creators are not listed: {pl}");
    // The creator still has full power: they can change power levels.
    alice.put_state(&v12, "m.room.power_levels", "", json!({"users": {}, "state_default": 60})).await.ok();

    // Creators have unlimited power (MSC4289): they cannot be given a level, neither later nor at creation (also
    // as additional creators), and only they may upgrade the room by default.
    assert_eq!(pl["events"]["m.room.tombstone"], 150, "{pl}");
    alice
        .put_state(&v12, "m.room.power_levels", "", json!({"users": {alice.user_id.clone(): 100}}))
        .await
        .assert_err(400, "M_BAD_JSON");
    let bob = s.user_id("bob");
    for (creation_content, listed) in [(json!({}), &alice.user_id), (json!({"additional_creators": [bob]}), &bob)] {
        alice
            .post(
                "/createRoom",
                json!({"creation_content": creation_content,
                       "power_level_content_override": {"users": {listed.clone(): 100}}}),
            )
            .await
            .assert_err(400, "M_BAD_JSON");
    }

    let explicit12 = alice.create_room(json!({"room_version": "12"})).await;
    assert_eq!(alice.state(&explicit12, "m.room.create", "").await.ok()["room_version"], "12");

    let v10 = alice.create_room(json!({"room_version": "10"})).await;
    assert!(v10.ends_with(":localhost"), "{v10}");
    let create = alice.state(&v10, "m.room.create", "").await.ok();
    assert_eq!(create["room_version"], "10");
    assert_eq!(create["creator"], alice.user_id);
    let pl = alice.state(&v10, "m.room.power_levels", "").await.ok();
    assert_eq!(pl["users"][&alice.user_id], 100, "{pl}");
    assert_eq!(pl["events"]["m.room.tombstone"], 100, "{pl}");
    // Messages work in both.
    alice.send_text(&v10, "in v10").await;
    alice.send_text(&v12, "in v12").await;

    // The oldest versions too: their events carry ids the server chose (`$local:server`).
    for v in ["1", "2"] {
        let room = alice.create_room(json!({"room_version": v, "preset": "public_chat"})).await;
        assert_eq!(alice.state(&room, "m.room.create", "").await.ok()["room_version"], v);
        let id = alice.send_text(&room, "old school").await;
        assert!(id.ends_with(":localhost"), "{id}");
        assert_eq!(alice.event(&room, &id).await.ok()["content"]["body"], "old school");
        let bob = s.user(&format!("bob{v}")).await;
        bob.join(&room).await.ok();
        bob.send_text(&room, "me too").await;
    }

    alice.post("/createRoom", json!({"room_version": "999"})).await.assert_err(400, "M_UNSUPPORTED_ROOM_VERSION");
    s.stop().await;
}

#[tokio::test]
async fn create_room_invite_initial_state_power_override() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = alice
        .create_room(json!({
            "invite": [bob.user_id],
            "initial_state": [
                {"type": "org.example.config", "state_key": "", "content": {"colour": "blue"}},
                {"type": "m.room.history_visibility", "content": {"history_visibility": "joined"}},
            ],
            "power_level_content_override": {"events_default": 10, "users_default": 5},
        }))
        .await;
    assert_eq!(alice.state(&room, "org.example.config", "").await.ok()["colour"], "blue");
    assert_eq!(alice.state(&room, "m.room.history_visibility", "").await.ok()["history_visibility"], "joined");
    let pl = alice.state(&room, "m.room.power_levels", "").await.ok();
    assert_eq!(pl["events_default"], 10);
    assert_eq!(pl["users_default"], 5);
    assert_eq!(alice.state(&room, "m.room.member", &bob.user_id).await.ok()["membership"], "invite");

    let sync = bob.sync(None, &[]).await.ok();
    let invite = &sync["rooms"]["invite"][&room];
    let stripped = events_of(&invite["invite_state"]);
    assert!(member_event(&stripped, &bob.user_id).is_some_and(|m| m["content"]["membership"] == "invite"), "{invite}");
    assert!(stripped.iter().any(|e| e["type"] == "m.room.create"), "{invite}");

    // Bob joins the invite-only room thanks to the invite.
    bob.join(&room).await.ok();
    assert!(bob.get("/joined_rooms").await.ok()["joined_rooms"].as_array().unwrap().contains(&json!(room)));

    // initial_state may not smuggle in memberships.
    let r = alice
        .post("/createRoom", json!({"initial_state": [{"type": "m.room.member", "state_key": bob.user_id, "content": {"membership": "join"}}]}))
        .await;
    assert_eq!(r.status, 400, "{}", r.text);
    s.stop().await;
}

// ------------------------------------------------------------------------------------------------------------
// Membership

#[tokio::test]
async fn join_by_id_and_alias_leave_forget() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let carol = s.user("carol").await;
    let room = alice.create_room(json!({"preset": "public_chat", "room_alias_name": "town"})).await;
    assert_eq!(alice.state(&room, "m.room.canonical_alias", "").await.ok()["alias"], "#town:localhost");

    assert_eq!(bob.join(&room).await.ok()["room_id"], room);
    assert_eq!(carol.join("#town:localhost").await.ok()["room_id"], room);
    // The /rooms/{id}/join form too (idempotent for a member).
    bob.post(&format!("/rooms/{}/join", enc(&room)), json!({})).await.ok();

    let joined = alice.get(&format!("/rooms/{}/joined_members", enc(&room))).await.ok();
    let joined = joined["joined"].as_object().unwrap();
    assert_eq!(joined.len(), 3);
    assert_eq!(joined[&bob.user_id]["display_name"], "bob");
    assert!(joined[&bob.user_id]["avatar_url"].is_null(), "unset fields are null");
    assert!(joined[&bob.user_id].get("avatar_url").is_some(), "unset fields are present (null), as in Synapse");

    assert_eq!(bob.get("/joined_rooms").await.ok()["joined_rooms"], json!([room]));
    bob.leave(&room).await.ok();
    assert_eq!(bob.get("/joined_rooms").await.ok()["joined_rooms"], json!([]));
    assert_eq!(alice.state(&room, "m.room.member", &bob.user_id).await.ok()["membership"], "leave");
    // The current member list is for members; bob keeps the list as of his leave.
    bob.get(&format!("/rooms/{}/joined_members", enc(&room))).await.assert_err(403, "M_FORBIDDEN");
    let at_leave = bob.get(&format!("/rooms/{}/members", enc(&room))).await.ok();
    assert!(at_leave["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["state_key"] == bob.user_id.as_str() && e["content"]["membership"] == "leave"));

    // Forget: only after leaving; then the room is gone from sync even with include_leave.
    carol.post(&format!("/rooms/{}/forget", enc(&room)), json!({})).await.assert_err(400, "M_UNKNOWN");
    let leave_filter = json!({"room": {"include_leave": true}}).to_string();
    let before = bob.sync(None, &[("filter", &leave_filter)]).await.ok();
    assert!(before["rooms"]["leave"].get(&room).is_some(), "left room listed with include_leave: {}", before["rooms"]);
    bob.post(&format!("/rooms/{}/forget", enc(&room)), json!({})).await.ok();
    let after = bob.sync(None, &[("filter", &leave_filter)]).await.ok();
    assert!(after["rooms"]["leave"].get(&room).is_none(), "forgotten room not listed: {}", after["rooms"]);
    // Its history is no longer readable either.
    bob.messages(&room, &[("dir", "b")]).await.assert_err(403, "M_FORBIDDEN");
    bob.get(&format!("/rooms/{}/members", enc(&room))).await.assert_err(403, "M_FORBIDDEN");

    // A leave forgotten at once still reaches another device's incremental sync (it must learn of the leave).
    let before_leave = carol.sync(None, &[]).await.ok()["next_batch"].as_str().unwrap().to_owned();
    carol.leave(&room).await.ok();
    carol.post(&format!("/rooms/{}/forget", enc(&room)), json!({})).await.ok();
    let r = carol.sync(Some(&before_leave), &[("filter", &leave_filter)]).await.ok();
    let tl = events_of(&r["rooms"]["leave"][&room]["timeline"]);
    assert!(member_event(&tl, &carol.user_id).is_some_and(|e| e["content"]["membership"] == "leave"), "{}", r["rooms"]);
    // ... but not an initial one.
    let r = carol.sync(None, &[("filter", &leave_filter)]).await.ok();
    assert!(r["rooms"]["leave"].get(&room).is_none(), "{}", r["rooms"]);

    // A join may carry extra member content; the membership stays the server's.
    let dave = s.user("dave").await;
    dave.post(&format!("/join/{}", enc(&room)), json!({"foo": "bar", "membership": "leave", "reason": "hi"}))
        .await
        .ok();
    let m = alice.state(&room, "m.room.member", &dave.user_id).await.ok();
    assert_eq!((&m["membership"], &m["foo"], &m["reason"]), (&json!("join"), &json!("bar"), &json!("hi")), "{m}");

    // Joining unknown rooms and aliases.
    bob.join("!nosuchroom:localhost").await.assert_err(404, "M_NOT_FOUND");
    bob.join("#nowhere:localhost").await.assert_err(404, "M_NOT_FOUND");
    s.stop().await;
}

#[tokio::test]
async fn invite_only_room_needs_invite() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = alice.create_room(json!({"preset": "private_chat"})).await;
    bob.join(&room).await.assert_err(403, "M_FORBIDDEN");
    alice.invite(&room, &bob.user_id).await.ok();
    bob.join(&room).await.ok();
    bob.send_text(&room, "thanks for the invite").await;
    s.stop().await;
}

#[tokio::test]
async fn kick_ban_unban() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let carol = s.user("carol").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    bob.join(&room).await.ok();
    carol.join(&room).await.ok();
    let path = |op: &str| format!("/rooms/{}/{op}", enc(&room));

    // Bob (power 0) may not kick.
    bob.post(&path("kick"), json!({"user_id": carol.user_id})).await.assert_err(403, "M_FORBIDDEN");

    alice.post(&path("kick"), json!({"user_id": bob.user_id, "reason": "spam"})).await.ok();
    let m = alice.state(&room, "m.room.member", &bob.user_id).await.ok();
    assert_eq!(m["membership"], "leave");
    assert_eq!(m["reason"], "spam");
    bob.send(&room, "m.room.message", json!({"msgtype": "m.text", "body": "x"})).await.assert_err(403, "M_FORBIDDEN");

    // Kicked users may rejoin a public room; banned ones may not.
    bob.join(&room).await.ok();
    alice.post(&path("ban"), json!({"user_id": bob.user_id})).await.ok();
    assert_eq!(alice.state(&room, "m.room.member", &bob.user_id).await.ok()["membership"], "ban");
    bob.join(&room).await.assert_err(403, "M_FORBIDDEN");

    // Unbanning someone who is not banned is refused.
    alice.post(&path("unban"), json!({"user_id": carol.user_id})).await.assert_err(403, "M_FORBIDDEN");
    alice.post(&path("unban"), json!({"user_id": bob.user_id})).await.ok();
    assert_eq!(alice.state(&room, "m.room.member", &bob.user_id).await.ok()["membership"], "leave");
    bob.join(&room).await.ok();

    // There must be someone to kick: not a user who was never here, nor one who already left.
    let dave = s.user("dave").await;
    alice.post(&path("kick"), json!({"user_id": dave.user_id})).await.assert_err(403, "M_FORBIDDEN");
    dave.join(&room).await.ok();
    dave.leave(&room).await.ok();
    alice.post(&path("kick"), json!({"user_id": dave.user_id})).await.assert_err(403, "M_FORBIDDEN");
    let m = alice.get(&format!("/rooms/{}/state/m.room.member/{}?format=event", enc(&room), dave.user_id)).await;
    assert_eq!(m.ok()["sender"], dave.user_id, "dave's own leave is still the latest");

    // Missing user_id.
    alice.post(&path("kick"), json!({})).await.assert_err(400, "M_MISSING_PARAM");
    s.stop().await;
}

// ------------------------------------------------------------------------------------------------------------
// Sending, redacting, state, events

#[tokio::test]
async fn send_is_idempotent_per_txn() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let room = alice.create_room(json!({})).await;
    let content = json!({"msgtype": "m.text", "body": "once"});
    let a = alice.send_txn(&room, "m.room.message", "txn1", content.clone()).await.ok();
    let b = alice.send_txn(&room, "m.room.message", "txn1", content.clone()).await.ok();
    assert_eq!(a["event_id"], b["event_id"]);
    let c = alice.send_txn(&room, "m.room.message", "txn2", content.clone()).await.ok();
    assert_ne!(a["event_id"], c["event_id"]);

    // Another device of the same user has its own transaction namespace.
    let mut other = s.client();
    other.login("alice", PASSWORD).await.ok();
    let d = other.send_txn(&room, "m.room.message", "txn1", content.clone()).await.ok();
    assert_ne!(a["event_id"], d["event_id"]);

    // Only one event for txn1 from the first device.
    let msgs = alice.messages(&room, &[("dir", "b"), ("limit", "50")]).await.ok();
    let once: Vec<&Value> =
        msgs["chunk"].as_array().unwrap().iter().filter(|e| e["content"]["body"] == "once").collect();
    assert_eq!(once.len(), 3, "txn1 (twice) + txn2 + other device's txn1 = 3 events: {once:?}");

    // The sending device sees its transaction id.
    let ev = alice.event(&room, a["event_id"].as_str().unwrap()).await.ok();
    assert_eq!(ev["unsigned"]["transaction_id"], "txn1");
    let ev = other.event(&room, a["event_id"].as_str().unwrap()).await.ok();
    assert!(ev["unsigned"].get("transaction_id").is_none(), "{ev}");
    s.stop().await;
}

#[tokio::test]
async fn get_event() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = alice.create_room(json!({})).await;
    let id = alice.send_text(&room, "hello").await;
    let ev = alice.event(&room, &id).await.ok();
    assert_eq!(ev["event_id"], id);
    assert_eq!(ev["room_id"], room);
    assert_eq!(ev["sender"], alice.user_id);
    assert_eq!(ev["type"], "m.room.message");
    assert_eq!(ev["content"]["body"], "hello");
    assert!(ev["origin_server_ts"].as_u64().is_some());
    // PDU internals are not shown to clients.
    assert!(ev.get("auth_events").is_none() && ev.get("signatures").is_none(), "{ev}");

    alice.event(&room, "$doesnotexist").await.assert_err(404, "M_NOT_FOUND");
    // A non-member cannot tell whether the event exists.
    bob.event(&room, &id).await.assert_err(404, "M_NOT_FOUND");
    s.stop().await;
}

#[tokio::test]
async fn redact() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    bob.join(&room).await.ok();
    let id = alice.send_text(&room, "oops").await;

    // Bob may not redact Alice's message.
    bob.put(&format!("/rooms/{}/redact/{}/r1", enc(&room), enc(&id)), json!({})).await.assert_err(403, "M_FORBIDDEN");

    let r = alice.put(&format!("/rooms/{}/redact/{}/r1", enc(&room), enc(&id)), json!({"reason": "typo"})).await.ok();
    let redaction_id = r["event_id"].as_str().unwrap().to_owned();
    // Same txn id: same redaction event.
    let again =
        alice.put(&format!("/rooms/{}/redact/{}/r1", enc(&room), enc(&id)), json!({"reason": "typo"})).await.ok();
    assert_eq!(again["event_id"], redaction_id);

    let ev = alice.event(&room, &id).await.ok();
    assert_eq!(ev["content"], json!({}), "content stripped: {ev}");
    assert_eq!(ev["unsigned"]["redacted_because"]["event_id"], redaction_id);
    let red = alice.event(&room, &redaction_id).await.ok();
    assert_eq!(red["type"], "m.room.redaction");
    assert_eq!(red["content"]["reason"], "typo");

    // Bob may redact his own message.
    let own = bob.send_text(&room, "mine").await;
    bob.put(&format!("/rooms/{}/redact/{}/r2", enc(&room), enc(&own)), json!({})).await.ok();
    assert_eq!(bob.event(&room, &own).await.ok()["content"], json!({}));
    s.stop().await;
}

/// A redaction is held to the same rules however it is sent (`/redact`, `/send/m.room.redaction`, or as state with
/// `PUT /state/m.room.redaction/...`, which Synapse also treats as a redaction): without the redact power level a
/// user may redact only their own events; the create event cannot be redacted; a redaction must name its target.
#[tokio::test]
async fn redaction_rules_hold_however_the_redaction_is_sent() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    for version in ["10", "12"] {
        // Anyone may send state (so a redaction sent as state meets only the redaction rules), but redacting
        // others' events still takes the redact power level (50).
        let room = alice
            .create_room(json!({"preset": "public_chat", "room_version": version,
                "power_level_content_override": {"state_default": 0}}))
            .await;
        bob.join(&room).await.ok();
        let hers = alice.send_text(&room, "alice's").await;
        let r = enc(&room);
        // Bob (power 0) through every door: refused, and alice's message keeps its content.
        bob.put_state(&room, "m.room.redaction", "x", json!({"redacts": hers})).await.assert_err(403, "M_FORBIDDEN");
        bob.put_state(&room, "m.room.redaction", "", json!({"redacts": hers})).await.assert_err(403, "M_FORBIDDEN");
        bob.send(&room, "m.room.redaction", json!({"redacts": hers})).await.assert_err(403, "M_FORBIDDEN");
        bob.put(&format!("/rooms/{r}/redact/{}/t1", enc(&hers)), json!({})).await.assert_err(403, "M_FORBIDDEN");
        assert_eq!(alice.event(&room, &hers).await.ok()["content"]["body"], "alice's", "v{version}");
        // A redaction naming nothing, or something unknown (without power), is refused.
        bob.send(&room, "m.room.redaction", json!({})).await.assert_err(400, "M_BAD_JSON");
        bob.send(&room, "m.room.redaction", json!({"redacts": 5})).await.assert_err(400, "M_BAD_JSON");
        bob.send(&room, "m.room.redaction", json!({"redacts": "nope"})).await.assert_err(400, "M_INVALID_PARAM");
        bob.send(&room, "m.room.redaction", json!({"redacts": "$unknown:localhost"}))
            .await
            .assert_err(404, "M_NOT_FOUND");

        // His own events he may redact, through /send or as state: the redaction takes effect.
        let his = bob.send_text(&room, "bob's").await;
        let red = bob.send(&room, "m.room.redaction", json!({"redacts": his})).await.ok();
        let ev = alice.event(&room, &his).await.ok();
        assert_eq!((&ev["content"], &ev["unsigned"]["redacted_because"]["event_id"]), (&json!({}), &red["event_id"]));
        let his2 = bob.send_text(&room, "bob's again").await;
        let red = bob.put_state(&room, "m.room.redaction", "y", json!({"redacts": his2})).await.ok();
        let ev = alice.event(&room, &his2).await.ok();
        assert_eq!((&ev["content"], &ev["unsigned"]["redacted_because"]["event_id"]), (&json!({}), &red["event_id"]));

        // Alice (power 100) may redact bob's events through /send, but nobody the create event.
        let his3 = bob.send_text(&room, "bob's third").await;
        alice.send(&room, "m.room.redaction", json!({"redacts": his3})).await.ok();
        assert_eq!(alice.event(&room, &his3).await.ok()["content"], json!({}), "v{version}");
        let create = alice.get(&format!("/rooms/{r}/state")).await.ok();
        let create = create.as_array().unwrap().iter().find(|e| e["type"] == "m.room.create").unwrap().clone();
        let create_id = create["event_id"].as_str().unwrap();
        alice.put(&format!("/rooms/{r}/redact/{}/t2", enc(create_id)), json!({})).await.assert_err(403, "M_FORBIDDEN");
        assert_eq!(alice.event(&room, create_id).await.ok()["content"], create["content"]);
    }
    s.stop().await;
}

#[tokio::test]
async fn get_and_put_state() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let eve = s.user("eve").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    bob.join(&room).await.ok();

    let r = alice.put_state(&room, "m.room.topic", "", json!({"topic": "new topic"})).await.ok();
    assert!(r["event_id"].as_str().unwrap().starts_with('$'));
    // Setting the same state again is idempotent: the same event, not a new one.
    let again = alice.put_state(&room, "m.room.topic", "", json!({"topic": "new topic"})).await.ok();
    assert_eq!(again["event_id"], r["event_id"]);
    assert_eq!(alice.state(&room, "m.room.topic", "").await.ok()["topic"], "new topic");
    // The path without a state key means the empty key.
    let no_key = alice.get(&format!("/rooms/{}/state/m.room.topic", enc(&room))).await.ok();
    assert_eq!(no_key["topic"], "new topic");
    // `format=event` answers the whole event rather than its content.
    let whole = alice.get(&format!("/rooms/{}/state/m.room.topic/?format=event", enc(&room))).await.ok();
    assert_eq!((&whole["content"]["topic"], &whole["sender"]), (&json!("new topic"), &json!(alice.user_id)));
    assert_eq!(
        (&whole["event_id"], &whole["room_id"], &whole["type"]),
        (&r["event_id"], &json!(room), &json!("m.room.topic"))
    );
    let mine = alice.get(&format!("/rooms/{}/state/m.room.member/{}?format=event", enc(&room), alice.user_id)).await;
    assert_eq!(mine.ok()["content"]["membership"], "join");
    alice
        .get(&format!("/rooms/{}/state/m.room.topic/?format=xml", enc(&room)))
        .await
        .assert_err(400, "M_INVALID_PARAM");

    // A custom state type with a key.
    alice.put_state(&room, "org.example.widget", "w1", json!({"url": "https://example.org"})).await.ok();
    assert_eq!(alice.state(&room, "org.example.widget", "w1").await.ok()["url"], "https://example.org");
    alice.state(&room, "org.example.widget", "w2").await.assert_err(404, "M_NOT_FOUND");

    // The full state list.
    let all = alice.get(&format!("/rooms/{}/state", enc(&room))).await.ok();
    let all = all.as_array().unwrap();
    for t in ["m.room.create", "m.room.power_levels", "m.room.join_rules", "m.room.topic", "org.example.widget"] {
        assert!(all.iter().any(|e| e["type"] == t), "{t} missing from state");
    }
    assert_eq!(all.iter().filter(|e| e["type"] == "m.room.member").count(), 2);

    // Permissions: bob has power 0, state_default is 50; eve is not in the room.
    bob.put_state(&room, "m.room.name", "", json!({"name": "mine"})).await.assert_err(403, "M_FORBIDDEN");
    eve.state(&room, "m.room.topic", "").await.assert_err(403, "M_FORBIDDEN");
    eve.get(&format!("/rooms/{}/state", enc(&room))).await.assert_err(403, "M_FORBIDDEN");
    s.stop().await;
}

// ------------------------------------------------------------------------------------------------------------
// Reading history

/// Sends `n` messages "m0".."m{n-1}" and returns their event ids.
async fn send_numbered(c: &Client, room: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(c.send_text(room, &format!("m{i}")).await);
    }
    ids
}

fn bodies(chunk: &Value) -> Vec<String> {
    chunk.as_array().unwrap().iter().filter_map(|e| e["content"]["body"].as_str().map(str::to_owned)).collect()
}

#[tokio::test]
async fn messages_both_directions() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let room = alice.create_room(json!({})).await;
    let before = alice.sync(None, &[]).await.ok()["next_batch"].as_str().unwrap().to_owned();
    send_numbered(&alice, &room, 6).await;
    let after = alice.sync(Some(&before), &[]).await.ok()["next_batch"].as_str().unwrap().to_owned();
    let only_msgs = json!({"types": ["m.room.message"]}).to_string();

    // Backwards from the newest, three at a time.
    let page1 = alice.messages(&room, &[("dir", "b"), ("limit", "3"), ("filter", &only_msgs)]).await.ok();
    assert_eq!(bodies(&page1["chunk"]), ["m5", "m4", "m3"]);
    let end = page1["end"].as_str().expect("end token").to_owned();
    let page2 =
        alice.messages(&room, &[("dir", "b"), ("from", &end), ("limit", "3"), ("filter", &only_msgs)]).await.ok();
    assert_eq!(bodies(&page2["chunk"]), ["m2", "m1", "m0"]);

    // Without a filter, paging back reaches the room's creation and stops there.
    let all = alice.messages(&room, &[("dir", "b"), ("limit", "100")]).await.ok();
    let chunk = all["chunk"].as_array().unwrap();
    assert_eq!(chunk.last().unwrap()["type"], "m.room.create");
    // That page still has an `end` (as in Synapse); the page after it is empty and has none.
    let end = all["end"].as_str().expect("end on a non-empty page");
    let past = alice.messages(&room, &[("dir", "b"), ("from", end), ("limit", "100")]).await.ok();
    assert_eq!(past["chunk"], json!([]));
    assert!(past.get("end").is_none(), "no more history after the create event: {past}");

    // Forwards from a sync token, and bounded by `to`.
    let fwd = alice.messages(&room, &[("dir", "f"), ("from", &before), ("limit", "4")]).await.ok();
    assert_eq!(bodies(&fwd["chunk"]), ["m0", "m1", "m2", "m3"]);
    let next = fwd["end"].as_str().unwrap().to_owned();
    let rest = alice.messages(&room, &[("dir", "f"), ("from", &next), ("limit", "10")]).await.ok();
    assert_eq!(bodies(&rest["chunk"]), ["m4", "m5"]);

    let bounded =
        alice.messages(&room, &[("dir", "b"), ("from", &after), ("to", &before), ("limit", "100")]).await.ok();
    assert_eq!(bodies(&bounded["chunk"]), ["m5", "m4", "m3", "m2", "m1", "m0"]);
    assert_eq!(bounded["chunk"].as_array().unwrap().len(), 6, "nothing before `to`");

    // A sender filter.
    let bob_only = json!({"senders": ["@bob:localhost"]}).to_string();
    let none = alice.messages(&room, &[("dir", "b"), ("filter", &bob_only)]).await.ok();
    assert_eq!(none["chunk"], json!([]));

    // `contains_url`: only events with a `url` in their content, or only those without.
    let file = json!({"msgtype": "m.file", "body": "f.png", "url": "mxc://localhost/abc"});
    alice.send(&room, "m.room.message", file).await.ok();
    let with_url = alice.messages(&room, &[("dir", "b"), ("filter", r#"{"contains_url":true}"#)]).await.ok();
    assert_eq!(bodies(&with_url["chunk"]), ["f.png"]);
    let without =
        alice.messages(&room, &[("dir", "b"), ("limit", "100"), ("filter", r#"{"contains_url":false}"#)]).await;
    let without = bodies(&without.ok()["chunk"]);
    assert!(!without.contains(&"f.png".to_owned()) && without.contains(&"m5".to_owned()), "{without:?}");

    alice.messages(&room, &[("dir", "x")]).await.assert_err(400, "M_INVALID_PARAM");
    alice.messages(&room, &[("dir", "b"), ("from", "garbage")]).await.assert_err(400, "M_INVALID_PARAM");
    s.stop().await;
}

#[tokio::test]
async fn messages_lazy_load_members() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let carol = s.user("carol").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    bob.join(&room).await.ok();
    carol.join(&room).await.ok();
    bob.send_text(&room, "from bob").await;
    let filter = json!({"types": ["m.room.message"], "lazy_load_members": true}).to_string();
    let r = alice.messages(&room, &[("dir", "b"), ("limit", "1"), ("filter", &filter)]).await.ok();
    assert_eq!(bodies(&r["chunk"]), ["from bob"]);
    let state = r["state"].as_array().expect("state with lazy members");
    assert!(member_event(state, &bob.user_id).is_some());
    assert!(member_event(state, &carol.user_id).is_none(), "only senders' members: {state:?}");
    s.stop().await;
}

#[tokio::test]
async fn context() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let room = alice.create_room(json!({})).await;
    let ids = send_numbered(&alice, &room, 5).await;
    let c = alice.get(&format!("/rooms/{}/context/{}?limit=2", enc(&room), enc(&ids[2]))).await.ok();
    assert_eq!(c["event"]["event_id"], ids[2]);
    assert_eq!(bodies(&c["events_before"]), ["m1"]);
    assert_eq!(bodies(&c["events_after"]), ["m3"]);
    assert!(c["start"].is_string() && c["end"].is_string());
    let state = c["state"].as_array().unwrap();
    assert!(state.iter().any(|e| e["type"] == "m.room.create"), "state at the event");

    // `end` continues forwards after the context window.
    let end = c["end"].as_str().unwrap();
    let more = alice.messages(&room, &[("dir", "f"), ("from", end)]).await.ok();
    assert_eq!(bodies(&more["chunk"]), ["m4"]);
    alice.get(&format!("/rooms/{}/context/%24nope", enc(&room))).await.assert_err(404, "M_NOT_FOUND");
    s.stop().await;
}

#[tokio::test]
async fn members_with_filters_and_at() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let carol = s.user("carol").await;
    let dave = s.user("dave").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    let before_bob = alice.sync(None, &[]).await.ok()["next_batch"].as_str().unwrap().to_owned();
    bob.join(&room).await.ok();
    carol.join(&room).await.ok();
    carol.leave(&room).await.ok();
    alice.invite(&room, &dave.user_id).await.ok();

    let members_of = |v: &Value| -> Vec<(String, String)> {
        let mut m: Vec<(String, String)> = v["chunk"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (e["state_key"].as_str().unwrap().to_owned(), e["content"]["membership"].as_str().unwrap().to_owned())
            })
            .collect();
        m.sort();
        m
    };
    let path = format!("/rooms/{}/members", enc(&room));
    let all = alice.get(&path).await.ok();
    assert_eq!(members_of(&all).len(), 4);
    let joined = alice.get(&format!("{path}?membership=join")).await.ok();
    assert_eq!(members_of(&joined), [(alice.user_id.clone(), "join".into()), (bob.user_id.clone(), "join".into())]);
    let not_leave = alice.get(&format!("{path}?not_membership=leave")).await.ok();
    assert_eq!(
        members_of(&not_leave),
        [
            (alice.user_id.clone(), "join".into()),
            (bob.user_id.clone(), "join".into()),
            (dave.user_id.clone(), "invite".into())
        ]
    );
    let at = alice.get(&format!("{path}?at={}", enc(&before_bob))).await.ok();
    assert_eq!(members_of(&at), [(alice.user_id.clone(), "join".into())]);

    // Strangers may not list members.
    let eve = s.user("eve").await;
    eve.get(&path).await.assert_err(403, "M_FORBIDDEN");
    s.stop().await;
}

// ------------------------------------------------------------------------------------------------------------
// Sync

#[tokio::test]
async fn sync_initial_and_incremental() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let room = alice.create_room(json!({"name": "Room"})).await;
    let hello = alice.send_text(&room, "hello").await;

    let initial = alice.sync(None, &[]).await.ok();
    let next = initial["next_batch"].as_str().expect("next_batch").to_owned();
    let joined = &initial["rooms"]["join"][&room];
    let timeline = events_of(&joined["timeline"]);
    assert_eq!(timeline.last().unwrap()["event_id"], hello);
    // State and timeline together describe the room.
    let mut all = events_of(&joined["state"]);
    all.extend(timeline.clone());
    for t in ["m.room.create", "m.room.name", "m.room.power_levels"] {
        assert!(all.iter().any(|e| e["type"] == t), "{t} missing from initial sync");
    }
    // The sending device gets its transaction id back.
    assert!(timeline.last().unwrap()["unsigned"]["transaction_id"].is_string());

    // Nothing new: the room is not repeated.
    let quiet = alice.sync(Some(&next), &[]).await.ok();
    assert!(quiet["rooms"]["join"].get(&room).is_none(), "{}", quiet["rooms"]);

    let second = alice.send_text(&room, "second").await;
    let inc = alice.sync(Some(&next), &[]).await.ok();
    let tl = events_of(&inc["rooms"]["join"][&room]["timeline"]);
    assert_eq!(tl.len(), 1, "{tl:?}");
    assert_eq!(tl[0]["event_id"], second);
    assert_eq!(inc["rooms"]["join"][&room]["timeline"]["limited"], false);
    assert!(events_of(&inc["rooms"]["join"][&room]["state"]).is_empty());
    s.stop().await;
}

#[tokio::test]
async fn sync_long_poll() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let room = alice.create_room(json!({})).await;
    let next = alice.sync(None, &[]).await.ok()["next_batch"].as_str().unwrap().to_owned();

    // Nothing happens: returns after about the timeout, empty.
    let t0 = Instant::now();
    let r = alice.sync(Some(&next), &[("timeout", "700")]).await.ok();
    let waited = t0.elapsed();
    assert!(waited >= Duration::from_millis(650), "returned too early: {waited:?}");
    assert!(waited < Duration::from_secs(10), "returned too late: {waited:?}");
    assert!(r["rooms"]["join"].as_object().unwrap().is_empty(), "{}", r["rooms"]);

    // A message during the wait wakes it up well before the timeout.
    let waiter = {
        let (a, n) = (alice.clone(), next.clone());
        tokio::spawn(async move {
            let t0 = Instant::now();
            let r = a.sync(Some(&n), &[("timeout", "20000")]).await;
            (r, t0.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let id = alice.send_text(&room, "wake up").await;
    let (r, took) = waiter.await.unwrap();
    let r = r.ok();
    assert!(took < Duration::from_secs(10), "long poll did not wake: {took:?}");
    let tl = events_of(&r["rooms"]["join"][&room]["timeline"]);
    assert!(tl.iter().any(|e| e["event_id"] == id), "{tl:?}");
    s.stop().await;
}

#[tokio::test]
async fn sync_full_state() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let room = alice.create_room(json!({"topic": "t"})).await;
    let next = alice.sync(None, &[]).await.ok()["next_batch"].as_str().unwrap().to_owned();
    alice.send_text(&room, "x").await;
    let full = alice.sync(Some(&next), &[("full_state", "true")]).await.ok();
    let state = events_of(&full["rooms"]["join"][&room]["state"]);
    for t in ["m.room.create", "m.room.topic", "m.room.member", "m.room.power_levels"] {
        assert!(state.iter().any(|e| e["type"] == t), "{t} missing from full_state sync");
    }
    s.stop().await;
}

#[tokio::test]
async fn sync_limited_timeline_and_prev_batch() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let room = alice.create_room(json!({})).await;
    let next = alice.sync(None, &[]).await.ok()["next_batch"].as_str().unwrap().to_owned();
    send_numbered(&alice, &room, 5).await;
    let filter = json!({"room": {"timeline": {"limit": 2}}}).to_string();
    let r = alice.sync(Some(&next), &[("filter", &filter)]).await.ok();
    let timeline = &r["rooms"]["join"][&room]["timeline"];
    assert_eq!(timeline["limited"], true, "{timeline}");
    let tl = events_of(timeline);
    assert_eq!(tl.iter().map(|e| e["content"]["body"].as_str().unwrap()).collect::<Vec<_>>(), ["m3", "m4"]);
    // prev_batch fills the gap with /messages.
    let prev = timeline["prev_batch"].as_str().expect("prev_batch");
    let gap = alice.messages(&room, &[("dir", "b"), ("from", prev), ("to", &next), ("limit", "10")]).await.ok();
    assert_eq!(bodies(&gap["chunk"]), ["m2", "m1", "m0"]);

    // Initial sync with a small limit is limited too.
    let init = alice.sync(None, &[("filter", &filter)]).await.ok();
    assert_eq!(init["rooms"]["join"][&room]["timeline"]["limited"], true);
    s.stop().await;
}

/// An initial sync whose timeline holds the whole room: its prev_batch stands for the sync's own position (as
/// Synapse gives it), so `/members?at=` it lists the members as of that sync, not of the empty room before it.
#[tokio::test]
async fn members_at_the_prev_batch_of_a_whole_timeline_are_those_of_that_sync() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    alice.send_text(&room, "hello").await;
    let timeline = alice.sync(None, &[]).await.ok()["rooms"]["join"][&room]["timeline"].clone();
    assert_eq!(timeline["limited"], false, "{timeline}");
    let at = timeline["prev_batch"].as_str().expect("prev_batch").to_owned();
    bob.join(&room).await.ok();
    bob.send_text(&room, "hello back").await;
    let members = alice.get(&format!("/rooms/{}/members?at={}", enc(&room), enc(&at))).await.ok();
    let users: Vec<&str> =
        members["chunk"].as_array().unwrap().iter().filter_map(|e| e["state_key"].as_str()).collect();
    assert_eq!(users, vec![alice.user_id.as_str()], "{members}");
    s.stop().await;
}

#[tokio::test]
async fn sync_lazy_load_members() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let carol = s.user("carol").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    bob.join(&room).await.ok();
    carol.join(&room).await.ok();
    for i in 0..3 {
        alice.send_text(&room, &format!("a{i}")).await;
    }
    bob.send_text(&room, "from bob").await;

    let lazy = json!({"room": {"state": {"lazy_load_members": true}, "timeline": {"limit": 3}}}).to_string();
    let r = bob.sync(None, &[("filter", &lazy)]).await.ok();
    let joined = &r["rooms"]["join"][&room];
    let state = events_of(&joined["state"]);
    let tl = events_of(&joined["timeline"]);
    let senders: Vec<&str> = tl.iter().map(|e| e["sender"].as_str().unwrap()).collect();
    assert!(senders.contains(&alice.user_id.as_str()) && senders.contains(&bob.user_id.as_str()), "{senders:?}");
    assert!(member_event(&state, &alice.user_id).is_some(), "sender alice's member event");
    assert!(member_event(&state, &bob.user_id).is_some() || member_event(&tl, &bob.user_id).is_some());
    assert!(member_event(&state, &carol.user_id).is_none(), "carol sent nothing in the window: {state:?}");
    // The summary still counts everyone.
    assert_eq!(joined["summary"]["m.joined_member_count"], 3);

    // Incremental: carol speaks; her member event arrives with her message.
    let next = r["next_batch"].as_str().unwrap().to_owned();
    carol.send_text(&room, "hi from carol").await;
    let inc = bob.sync(Some(&next), &[("filter", &lazy)]).await.ok();
    let joined = &inc["rooms"]["join"][&room];
    assert!(member_event(&events_of(&joined["state"]), &carol.user_id).is_some(), "{joined}");

    // Without lazy loading, an initial sync has every member.
    let full = bob.sync(None, &[]).await.ok();
    let state = events_of(&full["rooms"]["join"][&room]["state"]);
    let mut members = state.clone();
    members.extend(events_of(&full["rooms"]["join"][&room]["timeline"]));
    assert!(member_event(&members, &carol.user_id).is_some());
    s.stop().await;
}

#[tokio::test]
async fn sync_summary_heroes_and_counts() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let carol = s.user("carol").await;
    let room = alice.create_room(json!({"preset": "private_chat", "invite": [bob.user_id, carol.user_id]})).await;
    bob.join(&room).await.ok();
    let r = alice.sync(None, &[]).await.ok();
    let summary = &r["rooms"]["join"][&room]["summary"];
    assert_eq!(summary["m.joined_member_count"], 2, "{summary}");
    assert_eq!(summary["m.invited_member_count"], 1, "{summary}");
    let heroes: Vec<&str> =
        summary["m.heroes"].as_array().expect("heroes for an unnamed room").iter().filter_map(Value::as_str).collect();
    assert!(heroes.contains(&bob.user_id.as_str()) && heroes.contains(&carol.user_id.as_str()), "{heroes:?}");
    assert!(!heroes.contains(&alice.user_id.as_str()), "the syncing user is not a hero");

    // Named rooms need no heroes.
    alice.put_state(&room, "m.room.name", "", json!({"name": "Named"})).await.ok();
    let r = alice.sync(None, &[]).await.ok();
    let summary = &r["rooms"]["join"][&room]["summary"];
    assert!(summary.get("m.heroes").is_none_or(|h| h.as_array().is_some_and(|a| a.is_empty())), "{summary}");
    s.stop().await;
}

#[tokio::test]
async fn sync_invite_and_leave_sections() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = alice.create_room(json!({"preset": "private_chat", "name": "Secret"})).await;
    let next = bob.sync(None, &[]).await.ok()["next_batch"].as_str().unwrap().to_owned();

    alice.invite(&room, &bob.user_id).await.ok();
    let r = bob.sync(Some(&next), &[]).await.ok();
    let invite = &r["rooms"]["invite"][&room];
    let stripped = events_of(&invite["invite_state"]);
    assert!(member_event(&stripped, &bob.user_id).is_some_and(|e| e["sender"] == alice.user_id.as_str()), "{invite}");
    assert!(stripped.iter().any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Secret"), "{invite}");
    let next = r["next_batch"].as_str().unwrap().to_owned();

    // Joining moves the room to `join` (with its full state, the room being new to the client).
    bob.join(&room).await.ok();
    let r = bob.sync(Some(&next), &[]).await.ok();
    assert!(r["rooms"]["invite"].get(&room).is_none());
    let joined = &r["rooms"]["join"][&room];
    let mut all = events_of(&joined["state"]);
    all.extend(events_of(&joined["timeline"]));
    assert!(all.iter().any(|e| e["type"] == "m.room.create"), "newly joined room has its state: {joined}");
    let next = r["next_batch"].as_str().unwrap().to_owned();

    // Being kicked puts it in `leave`, with the kick in the timeline.
    alice.post(&format!("/rooms/{}/kick", enc(&room)), json!({"user_id": bob.user_id})).await.ok();
    let r = bob.sync(Some(&next), &[]).await.ok();
    let left = &r["rooms"]["leave"][&room];
    let tl = events_of(&left["timeline"]);
    assert!(member_event(&tl, &bob.user_id).is_some_and(|e| e["content"]["membership"] == "leave"), "{}", r["rooms"]);
    assert!(r["rooms"]["join"].get(&room).is_none());

    // A rejected invite shows up in `leave` too.
    let room2 = alice.create_room(json!({"invite": [bob.user_id]})).await;
    let next = r["next_batch"].as_str().unwrap().to_owned();
    let r = bob.sync(Some(&next), &[]).await.ok();
    assert!(r["rooms"]["invite"].get(&room2).is_some());
    let next = r["next_batch"].as_str().unwrap().to_owned();
    bob.leave(&room2).await.ok();
    let r = bob.sync(Some(&next), &[]).await.ok();
    assert!(r["rooms"]["leave"].get(&room2).is_some(), "{}", r["rooms"]);
    assert!(r["rooms"]["invite"].get(&room2).is_none());

    // Even where history visibility hides the room from non-members, the rejection itself is shown.
    let room3 = alice
        .create_room(json!({"invite": [bob.user_id], "initial_state": [
            {"type": "m.room.history_visibility", "state_key": "", "content": {"history_visibility": "joined"}}]}))
        .await;
    let next = r["next_batch"].as_str().unwrap().to_owned();
    let r = bob.sync(Some(&next), &[]).await.ok();
    assert!(r["rooms"]["invite"].get(&room3).is_some());
    let next = r["next_batch"].as_str().unwrap().to_owned();
    bob.leave(&room3).await.ok();
    let r = bob.sync(Some(&next), &[]).await.ok();
    let tl = events_of(&r["rooms"]["leave"][&room3]["timeline"]);
    assert!(member_event(&tl, &bob.user_id).is_some_and(|e| e["content"]["membership"] == "leave"), "{}", r["rooms"]);
    s.stop().await;
}

// ------------------------------------------------------------------------------------------------------------
// Profiles

#[tokio::test]
async fn profile_updates_member_events() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    bob.join(&room).await.ok();
    let next = bob.sync(None, &[]).await.ok()["next_batch"].as_str().unwrap().to_owned();

    // Registration sets the localpart as display name.
    assert_eq!(s.client().get(&format!("/profile/{}", enc(&alice.user_id))).await.ok()["displayname"], "alice");

    let path = format!("/profile/{}/displayname", enc(&alice.user_id));
    alice.put(&path, json!({"displayname": "Alice Liddell"})).await.ok();
    assert_eq!(bob.get(&path).await.ok()["displayname"], "Alice Liddell");
    alice
        .put(&format!("/profile/{}/avatar_url", enc(&alice.user_id)), json!({"avatar_url": "mxc://localhost/abc"}))
        .await
        .ok();
    let profile = bob.get(&format!("/profile/{}", enc(&alice.user_id))).await.ok();
    assert_eq!(profile, json!({"displayname": "Alice Liddell", "avatar_url": "mxc://localhost/abc"}));

    // The member event in the joined room changed, and bob sees it in sync.
    let m = bob.state(&room, "m.room.member", &alice.user_id).await.ok();
    assert_eq!(m["displayname"], "Alice Liddell");
    assert_eq!(m["avatar_url"], "mxc://localhost/abc");
    assert_eq!(m["membership"], "join");
    let r = bob.sync(Some(&next), &[]).await.ok();
    let tl = events_of(&r["rooms"]["join"][&room]["timeline"]);
    assert!(
        tl.iter().any(|e| e["type"] == "m.room.member"
            && e["state_key"] == alice.user_id.as_str()
            && e["content"]["displayname"] == "Alice Liddell"),
        "{tl:?}"
    );
    let joined = bob.get(&format!("/rooms/{}/joined_members", enc(&room))).await.ok();
    assert_eq!(joined["joined"][&alice.user_id]["display_name"], "Alice Liddell");

    // Not someone else's profile; unknown users are 404.
    bob.put(&path, json!({"displayname": "Mallory"})).await.assert_err(403, "M_FORBIDDEN");
    bob.get("/profile/%40nobody%3Alocalhost").await.assert_err(404, "M_NOT_FOUND");
    s.stop().await;
}

// ------------------------------------------------------------------------------------------------------------
// Aliases and the directory

#[tokio::test]
async fn room_aliases() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = alice.create_room(json!({})).await;
    let alias = "#garden:localhost";
    let path = format!("/directory/room/{}", enc(alias));
    alice.put(&path, json!({"room_id": room})).await.ok();
    let got = bob.get(&path).await.ok();
    assert_eq!(got["room_id"], room);
    assert_eq!(got["servers"], json!(["localhost"]));
    assert_eq!(alice.put(&path, json!({"room_id": room})).await.status, 409);
    let listed = alice.get(&format!("/rooms/{}/aliases", enc(&room))).await.ok();
    assert_eq!(listed["aliases"], json!([alias]));
    // The canonical alias: a malformed alias is a bad parameter, a well-formed one elsewhere a bad alias.
    let canonical = |a: &str, alt: &[&str]| json!({"alias": a, "alt_aliases": alt});
    let put = |c: Value| alice.put_state(&room, "m.room.canonical_alias", "", c);
    put(canonical("%garden:localhost", &[])).await.assert_err(400, "M_INVALID_PARAM");
    put(canonical(alias, &["%other:localhost"])).await.assert_err(400, "M_INVALID_PARAM");
    put(canonical("#nowhere:localhost", &[])).await.assert_err(400, "M_BAD_ALIAS");
    put(canonical(alias, &[alias])).await.ok();

    // Non-members may not add aliases, and only the creator (or a moderator) may delete.
    bob.put(&format!("/directory/room/{}", enc("#bobs:localhost")), json!({"room_id": room}))
        .await
        .assert_err(403, "M_FORBIDDEN");
    bob.delete(&path, json!({})).await.assert_err(403, "M_FORBIDDEN");
    alice.delete(&path, json!({})).await.ok();
    bob.get(&path).await.assert_err(404, "M_NOT_FOUND");
    // The deleted alias is dropped from the canonical alias event (alias and alt_aliases alike).
    assert_eq!(alice.state(&room, "m.room.canonical_alias", "").await.ok(), json!({}));
    // Aliases on other servers cannot be created here.
    alice
        .put(&format!("/directory/room/{}", enc("#x:elsewhere.org")), json!({"room_id": room}))
        .await
        .assert_err(400, "M_INVALID_PARAM");
    s.stop().await;
}

#[tokio::test]
async fn public_rooms_and_visibility() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let public = alice
        .create_room(
            json!({"visibility": "public", "name": "Open Space", "topic": "all welcome", "room_alias_name": "open"}),
        )
        .await;
    let private = alice.create_room(json!({"name": "Hidden"})).await;

    let list = s.client().get("/publicRooms").await.ok();
    let chunk = list["chunk"].as_array().unwrap();
    assert_eq!(chunk.len(), 1, "{list}");
    assert_eq!(chunk[0]["room_id"], public);
    assert_eq!(chunk[0]["name"], "Open Space");
    assert_eq!(chunk[0]["topic"], "all welcome");
    assert_eq!(chunk[0]["canonical_alias"], "#open:localhost");
    assert_eq!(chunk[0]["num_joined_members"], 1);
    assert_eq!(chunk[0]["join_rule"], "public");

    let vis_path = |r: &str| format!("/directory/list/room/{}", enc(r));
    assert_eq!(s.client().get(&vis_path(&public)).await.ok()["visibility"], "public");
    assert_eq!(s.client().get(&vis_path(&private)).await.ok()["visibility"], "private");

    // Publishing needs power in the room.
    bob.put(&vis_path(&private), json!({"visibility": "public"})).await.assert_err(403, "M_FORBIDDEN");
    alice.put(&vis_path(&private), json!({"visibility": "public"})).await.ok();
    let list = s.client().get("/publicRooms").await.ok();
    assert_eq!(list["chunk"].as_array().unwrap().len(), 2);

    // POST with a search term; limit and since paginate.
    let found = bob.post("/publicRooms", json!({"filter": {"generic_search_term": "hidden"}})).await.ok();
    let ids: Vec<&Value> = found["chunk"].as_array().unwrap().iter().map(|r| &r["room_id"]).collect();
    assert_eq!(ids, [&json!(private)]);
    let page = s.client().get("/publicRooms?limit=1").await.ok();
    assert_eq!(page["chunk"].as_array().unwrap().len(), 1);
    let since = page["next_batch"].as_str().expect("next_batch").to_owned();
    let page2 = s.client().get(&format!("/publicRooms?limit=1&since={}", enc(&since))).await.ok();
    assert_eq!(page2["chunk"].as_array().unwrap().len(), 1);
    assert_ne!(page["chunk"][0]["room_id"], page2["chunk"][0]["room_id"]);

    alice.put(&vis_path(&public), json!({"visibility": "private"})).await.ok();
    let list = s.client().get("/publicRooms").await.ok();
    assert_eq!(list["chunk"].as_array().unwrap().len(), 1);
    s.stop().await;
}

// ------------------------------------------------------------------------------------------------------------
// Devices

#[tokio::test]
async fn devices_list_get_update_delete() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    s.client()
        .post(
            "/login",
            json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"},
                                "password": PASSWORD, "device_id": "PHONE", "initial_device_display_name": "My phone"}),
        )
        .await
        .ok();
    let mut laptop = s.client();
    laptop.login("alice", PASSWORD).await.ok();
    let list = alice.get("/devices").await.ok();
    let devices = list["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 3, "{list}");
    assert!(devices.iter().any(|d| d["device_id"] == "PHONE" && d["display_name"] == "My phone"));

    let d = alice.get("/devices/PHONE").await.ok();
    assert_eq!(d["device_id"], "PHONE");
    assert_eq!(d["user_id"], alice.user_id);
    alice.get("/devices/NOPE").await.assert_err(404, "M_NOT_FOUND");

    alice.put("/devices/PHONE", json!({"display_name": "Old phone"})).await.ok();
    assert_eq!(alice.get("/devices/PHONE").await.ok()["display_name"], "Old phone");
    alice.put("/devices/NOPE", json!({"display_name": "x"})).await.assert_err(404, "M_NOT_FOUND");

    // Deleting needs user-interactive auth with the password.
    let first = alice.delete("/devices/PHONE", json!({})).await;
    assert_eq!(first.status, 401, "{}", first.text);
    assert!(first.body["flows"].as_array().unwrap().iter().any(|f| f["stages"] == json!(["m.login.password"])));
    let session = first.body["session"].as_str().expect("session").to_owned();
    let auth = |pw: &str| json!({"auth": {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": alice.user_id}, "password": pw, "session": session}});
    let wrong = alice.delete("/devices/PHONE", auth("wrong")).await;
    wrong.assert_err(401, "M_FORBIDDEN");
    // Another user's (right) password does not do: 403, and the device stays.
    let bob = s.user("bob").await;
    let as_bob = json!({"auth": {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": bob.user_id}, "password": PASSWORD, "session": session}});
    alice.delete("/devices/PHONE", as_bob).await.assert_err(403, "M_FORBIDDEN");
    alice.get("/devices/PHONE").await.ok();
    alice.delete("/devices/PHONE", auth(PASSWORD)).await.ok();
    alice.get("/devices/PHONE").await.assert_err(404, "M_NOT_FOUND");

    // Deleting a device logs it out; bulk delete works the same way.
    let laptop_device = laptop.device_id.clone();
    alice
        .post("/delete_devices", json!({"devices": [laptop_device], "auth": {"type": "m.login.password", "user": alice.user_id, "password": PASSWORD}}))
        .await
        .ok();
    laptop.get("/account/whoami").await.assert_err(401, "M_UNKNOWN_TOKEN");
    let list = alice.get("/devices").await.ok();
    assert_eq!(list["devices"].as_array().unwrap().len(), 1);
    s.stop().await;
}

#[tokio::test]
async fn redaction_per_room_version() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    for version in ["10", "12"] {
        let room = alice.create_room(json!({"room_version": version})).await;
        let member = alice
            .put_state(
                &room,
                "m.room.member",
                &alice.user_id,
                json!({"membership": "join", "displayname": "Temporary"}),
            )
            .await
            .ok()["event_id"]
            .as_str()
            .unwrap()
            .to_owned();
        let r = alice.put(&format!("/rooms/{}/redact/{}/r1", enc(&room), enc(&member)), json!({})).await.ok();
        let redaction = alice.event(&room, r["event_id"].as_str().unwrap()).await.ok();
        // v11 moved `redacts` into the content; clients look in both places.
        if version == "10" {
            assert_eq!(redaction["redacts"], member, "v{version}: {redaction}");
        } else {
            assert_eq!(redaction["content"]["redacts"], member, "v{version}: {redaction}");
        }
        // The redaction algorithm keeps `membership` and strips the rest.
        let ev = alice.event(&room, &member).await.ok();
        assert_eq!(ev["content"], json!({"membership": "join"}), "v{version}: {ev}");
        // The current state is the redacted event, and the user is still joined.
        assert_eq!(alice.state(&room, "m.room.member", &alice.user_id).await.ok(), json!({"membership": "join"}));
        alice.send_text(&room, "still here").await;
    }
    s.stop().await;
}

#[tokio::test]
async fn change_password() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let mut other = s.client();
    other.login("alice", PASSWORD).await.ok();
    let first = alice.post("/account/password", json!({"new_password": "brand new"})).await;
    assert_eq!(first.status, 401, "{}", first.text);
    assert!(first.body["session"].is_string());
    alice
        .post("/account/password", json!({"new_password": "brand new", "auth": {"type": "m.login.password", "user": alice.user_id, "password": "wrong"}}))
        .await
        .assert_err(401, "M_FORBIDDEN");
    alice
        .post("/account/password", json!({"new_password": "brand new", "auth": {"type": "m.login.password", "user": alice.user_id, "password": PASSWORD}}))
        .await
        .ok();
    // This device stays logged in, the others are logged out; only the new password works.
    alice.get("/account/whoami").await.ok();
    other.get("/account/whoami").await.assert_err(401, "M_UNKNOWN_TOKEN");
    s.client().login("alice", PASSWORD).await.assert_err(403, "M_FORBIDDEN");
    s.client().login("alice", "brand new").await.ok();
    s.stop().await;
}

/// Deactivation (password UIA): the account cannot log in or use its tokens any more, leaves its rooms (others see
/// the leave), loses its profile when it asks for erasure, and its id cannot be registered again.
#[tokio::test]
async fn deactivated_accounts_leave_their_rooms_and_stay_gone() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let mut other = s.client();
    other.login("alice", PASSWORD).await.ok();
    let room = bob.create_room(json!({"preset": "public_chat"})).await;
    alice.join(&room).await.ok();
    let invited = bob.create_room(json!({"preset": "private_chat"})).await;
    bob.invite(&invited, &alice.user_id).await.ok();
    alice.put("/profile/@alice:localhost/displayname", json!({"displayname": "Alice"})).await.ok();
    let since = bob.sync(None, &[]).await.ok()["next_batch"].as_str().unwrap().to_owned();

    let challenge = alice.post("/account/deactivate", json!({})).await;
    assert_eq!(challenge.status, 401, "{}", challenge.text);
    assert_eq!(challenge.body["flows"], json!([{"stages": ["m.login.password"]}]));
    let auth = |password: &str| {
        json!({"type": "m.login.password", "password": password,
                                       "identifier": {"type": "m.id.user", "user": alice.user_id}})
    };
    alice.post("/account/deactivate", json!({"auth": auth("wrong")})).await.assert_err(401, "M_FORBIDDEN");
    let done = alice.post("/account/deactivate", json!({"auth": auth(PASSWORD), "erase": true})).await.ok();
    assert_eq!(done, json!({"id_server_unbind_result": "success"}));

    // Every token is revoked, the password no longer logs in, the id stays taken.
    alice.get("/account/whoami").await.assert_err(401, "M_UNKNOWN_TOKEN");
    other.get("/account/whoami").await.assert_err(401, "M_UNKNOWN_TOKEN");
    s.client().login("alice", PASSWORD).await.assert_err(403, "M_FORBIDDEN");
    assert_eq!(s.client().register("alice", "another").await.errcode(), "M_USER_IN_USE");
    // A deactivated account has no profile.
    assert_eq!(s.client().get("/profile/@alice:localhost").await.status, 404);
    // Bob sees alice leave the shared room, and the invite refused.
    let sync = bob.sync(Some(&since), &[]).await.ok();
    for r in [&room, &invited] {
        let timeline = events_of(&sync["rooms"]["join"][r]["timeline"]);
        let left = member_event(&timeline, &alice.user_id).map(|e| e["content"]["membership"].clone());
        assert_eq!(left, Some(json!("leave")), "{r}: {sync}");
    }
    let members = bob.get(&format!("/rooms/{}/joined_members", enc(&room))).await.ok();
    assert!(members["joined"].get(&alice.user_id).is_none(), "{members}");
    s.stop().await;
}

#[tokio::test]
async fn history_visibility_joined_hides_earlier_events() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = alice
        .create_room(json!({"preset": "public_chat",
                            "initial_state": [{"type": "m.room.history_visibility", "content": {"history_visibility": "joined"}}]}))
        .await;
    let secret = alice.send_text(&room, "before bob").await;
    bob.join(&room).await.ok();
    alice.send_text(&room, "after bob").await;

    let m = bob.messages(&room, &[("dir", "b"), ("limit", "50")]).await.ok();
    assert_eq!(bodies(&m["chunk"]), ["after bob"], "only events after bob's join");
    let sync = bob.sync(None, &[]).await.ok();
    let tl = events_of(&sync["rooms"]["join"][&room]["timeline"]);
    assert!(tl.iter().all(|e| e["content"]["body"] != "before bob"), "{tl:?}");
    bob.event(&room, &secret).await.assert_err(404, "M_NOT_FOUND");
    s.stop().await;
}

#[tokio::test]
async fn events_carry_the_viewers_membership() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    alice.send_text(&room, "prejoin").await;
    bob.join(&room).await.ok();
    alice.send_text(&room, "postjoin").await;

    // Each event says what the reader's membership was as of it (spec v1.11 `unsigned.membership`).
    let expect = |events: &[Value]| {
        let mut seen_join = false;
        for e in events {
            seen_join |= e["type"] == "m.room.member" && e["state_key"] == bob.user_id.as_str();
            let want = if seen_join { "join" } else { "leave" };
            assert_eq!(e["unsigned"]["membership"], want, "{e}");
        }
        assert!(seen_join);
    };
    let r = bob.sync(None, &[]).await.ok();
    expect(&events_of(&r["rooms"]["join"][&room]["timeline"]));
    let mut page =
        bob.messages(&room, &[("dir", "b"), ("limit", "50")]).await.ok()["chunk"].as_array().unwrap().clone();
    page.reverse();
    expect(&page);
    // Alice was there all along.
    let mine = alice.messages(&room, &[("dir", "b"), ("limit", "3")]).await.ok();
    assert!(mine["chunk"].as_array().unwrap().iter().all(|e| e["unsigned"]["membership"] == "join"), "{mine}");
    s.stop().await;
}

#[tokio::test]
async fn refresh_tokens_rotate_the_access_token_of_the_same_device() {
    let s = TestServer::start().await;
    s.user("alice").await;
    let login = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"},
                       "password": PASSWORD, "refresh_token": true});
    let r = s.client().post("/login", login).await.ok();
    let refresh = r["refresh_token"].as_str().expect("refresh_token").to_owned();
    let mut c = s.client();
    c.token = r["access_token"].as_str().map(str::to_owned);
    let room = c.create_room(json!({})).await;
    let first = c.send_txn(&room, "m.room.message", "t1", json!({"msgtype": "m.text", "body": "hi"})).await.ok();

    let renewed = s.client().post("/refresh", json!({"refresh_token": refresh})).await.ok();
    let old_token = c.token.replace(renewed["access_token"].as_str().unwrap().to_owned());
    assert_ne!(old_token, c.token);
    // Same device: the transaction id still deduplicates, and is still reported.
    let again = c.send_txn(&room, "m.room.message", "t1", json!({"msgtype": "m.text", "body": "hi"})).await.ok();
    assert_eq!(again["event_id"], first["event_id"]);
    let me = c.get("/account/whoami").await.ok();
    assert_eq!(me["device_id"], r["device_id"]);
    let tl = events_of(&c.sync(None, &[]).await.ok()["rooms"]["join"][&room]["timeline"]);
    let sent = tl.iter().find(|e| e["event_id"] == first["event_id"]).expect("sent event in sync");
    assert_eq!(sent["unsigned"]["transaction_id"], "t1");
    // The old access token and the spent refresh token no longer work; the new refresh token does.
    let mut old = s.client();
    old.token = old_token;
    old.get("/account/whoami").await.assert_err(401, "M_UNKNOWN_TOKEN");
    s.client().post("/refresh", json!({"refresh_token": refresh})).await.assert_err(401, "M_UNKNOWN_TOKEN");
    let next = renewed["refresh_token"].as_str().unwrap();
    s.client().post("/refresh", json!({"refresh_token": next})).await.ok();
    // Without asking, no refresh token.
    assert!(s.client().login("alice", PASSWORD).await.ok().get("refresh_token").is_none());
    s.stop().await;
}

#[tokio::test]
async fn initial_sync_has_rooms_the_user_was_banned_or_kicked_from_but_not_rooms_they_left() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let bob_id = s.user_id("bob");
    let banned = alice.create_room(json!({"preset": "public_chat"})).await;
    let kicked = alice.create_room(json!({"preset": "public_chat"})).await;
    let left = alice.create_room(json!({"preset": "public_chat"})).await;
    for r in [&banned, &kicked, &left] {
        bob.join(r).await.ok();
    }
    alice.post(&format!("/rooms/{}/ban", enc(&banned)), json!({"user_id": bob_id})).await.ok();
    alice.post(&format!("/rooms/{}/kick", enc(&kicked)), json!({"user_id": bob_id})).await.ok();
    bob.leave(&left).await.ok();

    // Bob's first sync (a new device, say) comes after all of it: the ban and the kick are there (as in Synapse),
    // his own leave is not (no include_leave).
    let sync = bob.sync(None, &[("timeout", "0")]).await.ok();
    let leave = &sync["rooms"]["leave"];
    for (room, membership) in [(&banned, "ban"), (&kicked, "leave")] {
        let events = leave[room.as_str()]["timeline"]["events"].as_array().unwrap_or_else(|| panic!("{room}: {sync}"));
        assert!(
            events.iter().any(|e| e["type"] == "m.room.member"
                && e["state_key"] == bob_id.as_str()
                && e["content"]["membership"] == membership),
            "{room}: {events:?}"
        );
    }
    assert!(leave.get(left.as_str()).is_none(), "{sync}");
    // With include_leave, the room he left is there too.
    let filter = json!({"room": {"include_leave": true}}).to_string();
    let sync = bob.sync(None, &[("timeout", "0"), ("filter", &filter)]).await.ok();
    assert!(sync["rooms"]["leave"].get(left.as_str()).is_some(), "{sync}");
}

/// `rooms.default_version` sets the version of rooms created without one, and what `/capabilities` reports.
#[tokio::test]
async fn configured_default_room_version_applies_to_new_rooms() {
    let server = TestServer::start_with(|c| c.rooms.default_version = "11".into()).await;
    let alice = server.user("alice").await;
    let caps = alice.get("/capabilities").await.ok();
    assert_eq!(caps["capabilities"]["m.room_versions"]["default"], "11", "{caps}");
    let room = alice.create_room(json!({})).await;
    assert_eq!(alice.state(&room, "m.room.create", "").await.ok()["room_version"], "11");
    // A client's choice still wins.
    let room = alice.create_room(json!({"room_version": "12"})).await;
    assert_eq!(alice.state(&room, "m.room.create", "").await.ok()["room_version"], "12");
    server.stop().await;

    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let caps = alice.get("/capabilities").await.ok();
    assert_eq!(caps["capabilities"]["m.room_versions"]["default"], "12", "{caps}");
    server.stop().await;
}
