//! What other servers see of Hearth, and what Hearth asks of them (issue #24, the federation items that Complement
//! checks): a peer joining a room of ours (the partial `send_join` answer, `servers_in_room`, `/event_auth` with
//! the v12 create event), leaving it through `send_leave` v1, reading its history through `get_missing_events`
//! (redacted where the history visibility hides it from that peer), joining a restricted room through a member of
//! an allowed room (countersigned by us); and our users knocking on a peer's room, reading a peer's profiles and
//! resolving a peer's (unicode) aliases. The peer is the scripted fake server of `tests/common/fake_resident.rs`.

mod common;

use std::time::Duration;

use common::fake_resident::*;
use common::*;
use reqwest::Method;

const WAIT: Duration = Duration::from_secs(20);

/// `make_join` for `user` (of the fake) in Hearth's `room`.
async fn make_join(fake: &FakeResident, room: &str, user: &str) -> Result<Value, (u16, Value)> {
    let vers: String = (1..=12).map(|v| format!("ver={v}")).collect::<Vec<_>>().join("&");
    let path = format!("/_matrix/federation/v1/make_join/{}/{}?{vers}", enc(room), enc(user));
    fake.request_hearth(Method::GET, &path, None).await
}

/// `user` of the fake joins Hearth's `room`: `make_join`, then `send_join` v2 (`omit_members` as asked). Returns
/// the join's id and the answer.
async fn peer_joins(fake: &FakeResident, room: &str, user: &str, omit_members: bool) -> (String, Value) {
    let made = make_join(fake, room, user).await.unwrap_or_else(|e| panic!("make_join for {user}: {e:?}"));
    let version = made["room_version"].as_str().expect("room_version").to_owned();
    let (id, ev) = sign_template(fake, &version, &made["event"]);
    let path = format!("/_matrix/federation/v2/send_join/{}/{}?omit_members={omit_members}", enc(room), enc(&id));
    let answer =
        fake.request_hearth(Method::PUT, &path, Some(&ev)).await.unwrap_or_else(|e| panic!("send_join: {e:?}"));
    (id, answer)
}

fn type_and_key(ev: &Value) -> String {
    format!("{}|{}", ev["type"].as_str().unwrap_or_default(), ev["state_key"].as_str().unwrap_or_default())
}

async fn joined_members(client: &Client, room: &str) -> Vec<String> {
    joined_ids(&client.get(&format!("/rooms/{}/joined_members", enc(room))).await.ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_joins_with_a_partial_answer_reads_auth_chains_and_leaves_through_send_leave_v1() {
    let fake = FakeResident::start(RoomSpec::default()).await;
    let hearth = start_hearth_with_fakes(&[&fake], |_| {}).await;
    let alice = hearth.user("alice").await;
    let bob = hearth.user("bob").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    bob.join(&room).await.ok();
    let charlie = fake.user("charlie");

    // The partial answer: the non-member state, and the members a nameless room's heroes need; no guest access
    // event (a public room's default), nothing more in the auth chain, and only the servers in before the join.
    let (join_id, answer) = peer_joins(&fake, &room, &charlie, true).await;
    assert_eq!(answer["members_omitted"], json!(true), "{answer}");
    let mut state: Vec<String> = answer["state"].as_array().unwrap().iter().map(type_and_key).collect();
    state.sort();
    let mut want = vec![
        "m.room.create|".to_owned(),
        "m.room.history_visibility|".into(),
        "m.room.join_rules|".into(),
        format!("m.room.member|{}", hearth.user_id("alice")),
        format!("m.room.member|{}", hearth.user_id("bob")),
        "m.room.power_levels|".into(),
    ];
    want.sort();
    assert_eq!(state, want);
    assert_eq!(answer["auth_chain"], json!([]), "{answer}");
    assert_eq!(answer["servers_in_room"], json!([hearth.server_name]), "{answer}");

    // /event_auth of the join: its auth events, the create event among them although v12 cites it nowhere.
    let auth = fake
        .request_hearth(
            Method::GET,
            &format!("/_matrix/federation/v1/event_auth/{}/{}", enc(&room), enc(&join_id)),
            None,
        )
        .await
        .expect("event_auth");
    let types: Vec<String> = auth["auth_chain"].as_array().unwrap().iter().map(type_and_key).collect();
    assert!(types.contains(&"m.room.create|".to_owned()), "{types:?}");
    assert!(types.contains(&"m.room.power_levels|".to_owned()) && types.contains(&"m.room.join_rules|".to_owned()));
    assert!(auth["auth_chain"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["type"] != "m.room.member" || e["state_key"] != json!(charlie)));
    wait_until("alice sees charlie joined", WAIT, || async {
        joined_members(&alice, &room).await.contains(&charlie).then_some(())
    })
    .await;

    // send_leave v1: anything but the sender's own leave is refused with 400, the leave is answered `[200, {}]`.
    let leave_path = format!("/_matrix/federation/v1/make_leave/{}/{}", enc(&room), enc(&charlie));
    let made = fake.request_hearth(Method::GET, &leave_path, None).await.expect("make_leave");
    let version = made["room_version"].as_str().unwrap().to_owned();
    let mut not_a_leave = made["event"].clone();
    not_a_leave["content"]["membership"] = json!("join");
    let (bad_id, bad) = sign_template(&fake, &version, &not_a_leave);
    let send_leave = |id: &str| format!("/_matrix/federation/v1/send_leave/{}/{}", enc(&room), enc(id));
    let (status, body) = fake.request_hearth(Method::PUT, &send_leave(&bad_id), Some(&bad)).await.expect_err("a join");
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_BAD_JSON")), "{body}");
    let (leave_id, leave) = sign_template(&fake, &version, &made["event"]);
    let answer = fake.request_hearth(Method::PUT, &send_leave(&leave_id), Some(&leave)).await.expect("send_leave v1");
    assert_eq!(answer, json!([200, {}]));
    wait_until("alice sees charlie gone", WAIT, || async {
        (!joined_members(&alice, &room).await.contains(&charlie)).then_some(())
    })
    .await;
    hearth.stop().await;
}

/// `/state_ids` and `/state` at an event (streamed, the second from the cached state and auth chain) agree with
/// each other: the same state, the same auth chain, which holds what the state's events cite and the state lacks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_and_state_ids_agree_and_carry_the_auth_chain_beyond_the_state() {
    let fake = FakeResident::start(RoomSpec::default()).await;
    let hearth = start_hearth_with_fakes(&[&fake], |_| {}).await;
    let alice = hearth.user("alice").await;
    let bob = hearth.user("bob").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    // Bob's first join and his leave are out of the state but in its auth chain (each cites the one before).
    bob.join(&room).await.ok();
    bob.leave(&room).await.ok();
    bob.join(&room).await.ok();
    let charlie = fake.user("charlie");
    peer_joins(&fake, &room, &charlie, false).await;
    let at = alice.send_text(&room, "here").await;
    let q = format!("{}?event_id={}", enc(&room), enc(&at));
    let ids = fake.request_hearth(Method::GET, &format!("/_matrix/federation/v1/state_ids/{q}"), None).await;
    let ids = ids.expect("state_ids");
    let again = fake.request_hearth(Method::GET, &format!("/_matrix/federation/v1/state_ids/{q}"), None).await;
    assert_eq!(again.expect("state_ids again"), ids);
    let state = fake.request_hearth(Method::GET, &format!("/_matrix/federation/v1/state/{q}"), None).await;
    let state = state.expect("state");
    let (pdu_ids, pdus) = (ids["pdu_ids"].as_array().unwrap(), state["pdus"].as_array().unwrap());
    let (chain_ids, chain) = (ids["auth_chain_ids"].as_array().unwrap(), state["auth_chain"].as_array().unwrap());
    assert_eq!(pdu_ids.len(), pdus.len(), "{ids} {state}");
    assert_eq!(chain_ids.len(), chain.len(), "{ids} {state}");
    let mut keys: Vec<String> = pdus.iter().map(type_and_key).collect();
    keys.sort();
    let mut want = vec![
        "m.room.create|".to_owned(),
        "m.room.history_visibility|".into(),
        "m.room.join_rules|".into(),
        format!("m.room.member|{}", hearth.user_id("alice")),
        format!("m.room.member|{}", hearth.user_id("bob")),
        format!("m.room.member|{charlie}"),
        "m.room.power_levels|".into(),
    ];
    want.sort();
    assert_eq!(keys, want);
    let bobs: Vec<&str> = chain
        .iter()
        .filter(|e| e["state_key"] == json!(hearth.user_id("bob")))
        .filter_map(|e| e["content"]["membership"].as_str())
        .collect();
    assert_eq!(bobs.len(), 2, "bob's first join and his leave: {bobs:?}");
    assert!(bobs.contains(&"join") && bobs.contains(&"leave"), "{bobs:?}");
    // No event in both halves.
    let mut all: Vec<&Value> = pdu_ids.iter().chain(chain_ids).collect();
    let n = all.len();
    all.sort_by_key(|v| v.as_str().unwrap_or_default().to_owned());
    all.dedup();
    assert_eq!(all.len(), n);
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_missing_events_gives_a_peer_redacted_copies_of_what_history_visibility_hides_from_it() {
    let fake = FakeResident::start(RoomSpec::default()).await;
    let hearth = start_hearth_with_fakes(&[&fake], |_| {}).await;
    let alice = hearth.user("alice").await;
    for (visibility, hidden) in [("world_readable", false), ("shared", false), ("invited", true), ("joined", true)] {
        let room = alice.create_room(json!({"preset": "public_chat"})).await;
        alice.put_state(&room, "m.room.history_visibility", "", json!({"history_visibility": visibility})).await.ok();
        alice.send_text(&room, "before the peer came").await;
        let (join_id, _) = peer_joins(&fake, &room, &fake.user("charlie"), false).await;
        let state = alice.get(&format!("/rooms/{}/state", enc(&room))).await.ok();
        let create_id = state
            .as_array()
            .and_then(|a| a.iter().find(|e| e["type"] == "m.room.create"))
            .map(|e| e["event_id"].as_str().unwrap().to_owned())
            .expect("create event");
        let body = json!({"earliest_events": [create_id], "latest_events": [join_id], "limit": 10, "min_depth": 1});
        let path = format!("/_matrix/federation/v1/get_missing_events/{}", enc(&room));
        let answer = fake.request_hearth(Method::POST, &path, Some(&body)).await.expect("get_missing_events");
        let events = answer["events"].as_array().unwrap().clone();
        let types: Vec<String> = events.iter().map(|e| e["type"].as_str().unwrap().to_owned()).collect();
        // The creator's join, power levels, join rules, the first history visibility, the new one unless the
        // same as before (an unchanged state event is not sent again: its id is the current one), the message.
        let mut want = vec!["m.room.member", "m.room.power_levels", "m.room.join_rules", "m.room.history_visibility"];
        if visibility != "shared" {
            want.push("m.room.history_visibility");
        }
        want.push("m.room.message");
        assert_eq!(types, want, "{visibility}: {answer}");
        let message = events.iter().find(|e| e["type"] == "m.room.message").unwrap();
        assert_eq!(message["content"].get("body").is_none(), hidden, "{visibility}: {message}");
        // A redacted copy keeps the original's hashes and signatures (it is the same event).
        assert!(message["hashes"]["sha256"].is_string() && message["signatures"][&hearth.server_name].is_object());
        let last_hv = events.iter().rev().find(|e| e["type"] == "m.room.history_visibility").unwrap();
        assert_eq!(last_hv["content"]["history_visibility"], json!(visibility), "{visibility}");
    }
    // Setting the same state again from the same sender answers with the current event, sending nothing.
    let room = alice.create_room(json!({"preset": "public_chat", "name": "Same"})).await;
    let first = alice.put_state(&room, "m.room.topic", "", json!({"topic": "t"})).await.ok();
    let again = alice.put_state(&room, "m.room.topic", "", json!({"topic": "t"})).await.ok();
    assert_eq!(first["event_id"], again["event_id"]);
    let other = alice.put_state(&room, "m.room.topic", "", json!({"topic": "u"})).await.ok();
    assert_ne!(first["event_id"], other["event_id"]);
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restricted_rooms_admit_members_of_an_allowed_room_locally_and_through_make_join() {
    let fake = FakeResident::start(RoomSpec::default()).await;
    let hearth = start_hearth_with_fakes(&[&fake], |_| {}).await;
    let alice = hearth.user("alice").await;
    let bob = hearth.user("bob").await;
    let allowed = alice.create_room(json!({"preset": "public_chat", "name": "Allowed"})).await;
    let rule = json!({"join_rule": "restricted", "allow": [{"type": "m.room_membership", "room_id": allowed, "via": [hearth.server_name]}]});
    let room = alice
        .create_room(json!({"preset": "public_chat", "room_version": "8",
            "initial_state": [{"type": "m.room.join_rules", "state_key": "", "content": rule}]}))
        .await;

    // A local user: refused until in the allowed room, then joined on alice's authority.
    bob.join(&room).await.assert_err(403, "M_FORBIDDEN");
    bob.join(&allowed).await.ok();
    bob.join(&room).await.ok();
    let member = alice.state(&room, "m.room.member", &bob.user_id).await.ok();
    assert_eq!(member["join_authorised_via_users_server"], json!(alice.user_id), "{member}");
    // A join -> join (a profile change) drops whatever authorising user it names.
    let again = json!({"membership": "join", "displayname": "Bobby", "join_authorised_via_users_server": "unused"});
    bob.put_state(&room, "m.room.member", &bob.user_id, again).await.ok();
    let member = alice.state(&room, "m.room.member", &bob.user_id).await.ok();
    assert_eq!((member["displayname"].as_str(), member.get("join_authorised_via_users_server")), (Some("Bobby"), None));

    // A peer's user: make_join is refused until they are in the allowed room; then its template names alice,
    // and send_join answers with the join countersigned by Hearth.
    let carol = fake.user("carol");
    let (status, body) = make_join(&fake, &room, &carol).await.expect_err("carol is in no allowed room");
    assert_eq!(status, 403, "{body}");
    peer_joins(&fake, &allowed, &carol, false).await;
    let made = make_join(&fake, &room, &carol).await.expect("make_join once in the allowed room");
    assert_eq!(made["event"]["content"]["join_authorised_via_users_server"], json!(alice.user_id), "{made}");
    let (id, ev) = sign_template(&fake, "8", &made["event"]);
    let path = format!("/_matrix/federation/v2/send_join/{}/{}", enc(&room), enc(&id));
    let answer = fake.request_hearth(Method::PUT, &path, Some(&ev)).await.expect("send_join");
    let signatures = answer["event"]["signatures"].as_object().expect("the countersigned join");
    assert!(signatures.contains_key(&hearth.server_name) && signatures.contains_key(&fake.name), "{signatures:?}");
    wait_until("alice sees carol joined", WAIT, || async {
        joined_members(&alice, &room).await.contains(&carol).then_some(())
    })
    .await;
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_users_knock_on_a_room_of_another_server() {
    let fake = FakeResident::start(RoomSpec::default()).await;
    fake.append(EventSpec::state(&fake.creator(), "m.room.join_rules", "", json!({"join_rule": "knock"})));
    let hearth = start_hearth_with_fakes(&[&fake], |_| {}).await;
    let alice = hearth.user("alice").await;
    let room = fake.room_id();
    let knock = |reason: &str| json!({"reason": reason});
    let path = format!("/knock/{}?server_name={}", enc(&room), enc(&fake.name));
    let r = alice.post(&path, knock("let me in")).await.ok();
    assert_eq!(r["room_id"], json!(room));

    // The resident got a signed knock with the reason; alice's sync shows the room under `knock`.
    let knocks = fake.received();
    let (_, ev) = knocks.iter().find(|(_, e)| e["type"] == "m.room.member").expect("the knock reached the resident");
    assert_eq!(
        (ev["content"]["membership"].as_str(), ev["content"]["reason"].as_str()),
        (Some("knock"), Some("let me in"))
    );
    assert_eq!(ev["state_key"], json!(alice.user_id));
    let sync = alice.sync(None, &[("timeout", "0")]).await.ok();
    let state = sync["rooms"]["knock"][&room]["knock_state"]["events"].as_array().cloned().unwrap_or_default();
    assert!(state.iter().any(|e| e["type"] == "m.room.name"), "{sync}");
    assert!(
        state.iter().any(|e| e["type"] == "m.room.member"
            && e["state_key"] == json!(alice.user_id)
            && e["content"]["membership"] == "knock"),
        "{sync}"
    );

    // Knocking again is allowed; once the room no longer takes knocks, the resident's refusal is the user's.
    alice.post(&path, knock("please")).await.ok();
    fake.append(EventSpec::state(&fake.creator(), "m.room.join_rules", "", json!({"join_rule": "invite"})));
    let bob = hearth.user("bob").await;
    bob.post(&path, knock("me too")).await.assert_err(403, "M_FORBIDDEN");
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_and_aliases_of_other_servers_are_asked_of_those_servers() {
    let fake = FakeResident::start(RoomSpec::default()).await;
    let hearth = start_hearth_with_fakes(&[&fake], |_| {}).await;
    let alice = hearth.user("alice").await;
    let dave = fake.user("dave");

    fake.script("query", Script::json(200, json!({"displayname": "Remote Dave", "avatar_url": "mxc://x/y"})));
    let name = alice.get(&format!("/profile/{}/displayname", enc(&dave))).await.ok();
    assert_eq!(name, json!({"displayname": "Remote Dave"}));
    let profile = alice.get(&format!("/profile/{}", enc(&dave))).await.ok();
    assert_eq!(profile, json!({"displayname": "Remote Dave", "avatar_url": "mxc://x/y"}));
    let asked = fake.requests_of("query");
    assert!(
        asked[0].detail.contains(&format!("user_id={}", enc(&dave))) && asked[0].detail.contains("field=displayname")
    );
    fake.script("query", Script::json(404, json!({"errcode": "M_NOT_FOUND", "error": "no such user"})));
    alice.get(&format!("/profile/{}/displayname", enc(&dave))).await.assert_err(404, "M_NOT_FOUND");

    // A unicode alias on the peer: asked of it, percent-encoded as UTF-8.
    let alias = format!("#老虎Â£я🤨👉ඞ:{}", fake.name);
    fake.script("query", Script::json(200, json!({"room_id": fake.room_id(), "servers": [fake.name]})));
    let resolved = alice.get(&format!("/directory/room/{}", enc(&alias))).await.ok();
    assert_eq!(resolved["room_id"], json!(fake.room_id()));
    assert!(fake.requests_of("query").last().unwrap().detail.contains(&enc(&alias)));
    fake.unscript("query");

    // And one of ours, as a peer asks for it.
    let room = alice.create_room(json!({})).await;
    let ours = format!("#老虎Â£я🤨👉ඞ:{}", hearth.server_name);
    alice.put(&format!("/directory/room/{}", enc(&ours)), json!({"room_id": room})).await.ok();
    let path = format!("/_matrix/federation/v1/query/directory?room_alias={}", enc(&ours));
    let answer = fake.request_hearth(Method::GET, &path, None).await.expect("query/directory");
    assert_eq!(answer["room_id"], json!(room));
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_asks_the_servers_the_client_named_and_the_room_ids_server_only_when_it_named_none() {
    let fake = FakeResident::start(RoomSpec::default()).await;
    let refusing = fake.start_peer().await;
    refusing.script("make_join", Script::json(403, json!({"errcode": "M_FORBIDDEN", "error": "not through us"})));
    let hearth = start_hearth_with_fakes(&[&fake, &refusing], |_| {}).await;
    let alice = hearth.user("alice").await;
    let room = fake.room_id();
    assert!(room.ends_with(&fake.name), "the room id names the resident: {room}");

    // Named a server that refuses: the refusal is the answer; the room id's server is not asked behind its back.
    let path = format!("/join/{}?server_name={}", enc(&room), enc(&refusing.name));
    alice.post(&path, json!({})).await.assert_err(403, "M_FORBIDDEN");
    assert_eq!((refusing.count("make_join"), fake.count("make_join")), (1, 0));

    // Named none: the room id's server is the one to ask.
    let joined = alice.post(&format!("/join/{}", enc(&room)), json!({})).await.ok();
    assert_eq!(joined["room_id"], json!(room));
    assert_eq!(fake.count("make_join"), 1);
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejecting_an_invite_over_federation_shows_the_leave_in_sync() {
    let fake = FakeResident::start(RoomSpec::default()).await;
    let hearth = start_hearth_with_fakes(&[&fake], |_| {}).await;
    let alice = hearth.user("alice").await;
    let room = fake.room_id();

    // The resident's creator invites alice (`/invite`, countersigned by Hearth).
    let invite =
        fake.build(EventSpec::state(&fake.creator(), "m.room.member", &alice.user_id, json!({"membership": "invite"})));
    let body = json!({"event": invite.json, "room_version": fake.room_version(), "invite_room_state": []});
    let path = format!("/_matrix/federation/v2/invite/{}/{}", enc(&room), enc(&invite.id));
    fake.request_hearth(Method::PUT, &path, Some(&body)).await.expect("invite countersigned");
    let since = wait_until("alice sees the invite", WAIT, || async {
        let s = alice.sync(None, &[("timeout", "0")]).await.ok();
        s["rooms"]["invite"].get(&room).is_some().then(|| s["next_batch"].as_str().unwrap().to_owned())
    })
    .await;

    // She rejects it: make_leave/send_leave at the inviter's server; her next sync shows the leave itself.
    alice.leave(&room).await.ok();
    assert_eq!(fake.count("send_leave"), 1);
    let sync = alice.sync(Some(&since), &[("timeout", "0")]).await.ok();
    let timeline = sync["rooms"]["leave"][&room]["timeline"]["events"].as_array().cloned().unwrap_or_default();
    assert!(
        timeline.iter().any(|e| e["type"] == "m.room.member"
            && e["state_key"] == json!(alice.user_id)
            && e["content"]["membership"] == "leave"),
        "{sync}"
    );
    assert!(sync["rooms"]["invite"].get(&room).is_none(), "{sync}");
    hearth.stop().await;
}
