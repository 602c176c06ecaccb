//! Bad input over federation (issue #3, "Bad input"): each case gets the spec's answer, nothing that should not be
//! stored is stored, and the server keeps serving everyone else (a normal client request works afterwards).
//!
//! A scripted fake resident (`tests/common/fake_resident.rs`) holds a room that `alice` on Hearth joined (full
//! join), and pushes hand-made transactions to Hearth's federation listener.

mod common;

use std::time::{Duration, Instant};

use common::fake_resident::*;
use common::*;
use ruma::canonical_json::CanonicalJsonObject;

/// Hearth (full joins), with the fakes' names resolvable, and `alice` joined to the first fake's room.
async fn joined(fakes: &[&FakeResident]) -> (TestServer, Client) {
    let hearth = start_hearth_with_fakes(fakes, |c| c.federation.lazy_joins = false).await;
    let alice = hearth.user("alice").await;
    let joined = join_via(&alice, fakes[0]).await;
    assert_eq!(joined["room_id"], json!(fakes[0].room_id()));
    (hearth, alice)
}

/// Hearth's database, read-only (WAL: safe while the server runs).
fn db(h: &TestServer) -> rusqlite::Connection {
    rusqlite::Connection::open_with_flags(&h.db_path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open database")
}

/// `(rejected reason, outlier)` of a stored event, None when it is not stored at all.
fn stored(h: &TestServer, event_id: &str) -> Option<(Option<String>, bool)> {
    use rusqlite::OptionalExtension;
    db(h)
        .query_row("SELECT rejected, outlier FROM events WHERE event_id = ?1", [event_id], |r| {
            Ok((r.get(0)?, r.get::<_, i64>(1)? != 0))
        })
        .optional()
        .expect("query events")
}

/// The message bodies a client sees in the room's recent history.
async fn bodies(c: &Client, room: &str) -> Vec<String> {
    let msgs = c.messages(room, &[("dir", "b"), ("limit", "50")]).await.ok();
    msgs["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .collect()
}

/// Event ids a client sees in the room's recent history and in an initial sync's timeline.
async fn visible_ids(c: &Client, room: &str) -> Vec<String> {
    let msgs = c.messages(room, &[("dir", "b"), ("limit", "50")]).await.ok();
    let mut ids: Vec<String> =
        msgs["chunk"].as_array().unwrap().iter().filter_map(|e| e["event_id"].as_str().map(str::to_owned)).collect();
    let sync = c.sync(None, &[]).await.ok();
    ids.extend(
        events_of(&sync["rooms"]["join"][room]["timeline"])
            .iter()
            .filter_map(|e| e["event_id"].as_str().map(str::to_owned)),
    );
    ids.extend(
        events_of(&sync["rooms"]["join"][room]["state"])
            .iter()
            .filter_map(|e| e["event_id"].as_str().map(str::to_owned)),
    );
    ids
}

/// The server still serves clients: alice sends to a room of her own and reads it back, and syncs.
async fn still_serving(h: &TestServer, alice: &Client) {
    let started = Instant::now();
    let room = alice.create_room(json!({"name": "still here"})).await;
    let id = alice.send_text(&room, "still serving").await;
    alice.event(&room, &id).await.ok();
    alice.sync(None, &[]).await.ok();
    let bob = h.user(&format!("bob{}", hearth::http::random_string(6).to_lowercase())).await;
    bob.get("/account/whoami").await.ok();
    assert!(started.elapsed() < Duration::from_secs(10), "client requests took {:?}", started.elapsed());
}

/// A federation client that accepts Hearth's self-signed certificate, for hand-made requests.
fn raw_client() -> reqwest::Client {
    init_crypto();
    reqwest::Client::builder().tls_danger_accept_invalid_certs(true).timeout(Duration::from_secs(60)).build().unwrap()
}

/// Sends `body` (raw bytes) to Hearth's federation listener with an `Authorization` header.
async fn raw_request(h: &TestServer, method: reqwest::Method, path: &str, auth: &str, body: Option<Vec<u8>>) -> Resp {
    let url = format!("https://{}{path}", h.running.federation_addr.expect("federation listener"));
    let mut req = raw_client().request(method, url).header("authorization", auth);
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b);
    }
    let res = req.send().await.expect("request sent");
    let status = res.status().as_u16();
    let text = res.text().await.unwrap_or_default();
    Resp { status, body: serde_json::from_str(&text).unwrap_or(Value::Null), text }
}

fn txn_path() -> String {
    format!("/_matrix/federation/v1/send/bad{}", hearth::http::random_string(10))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_signature_is_refused_and_not_stored() {
    let fake = FakeResident::start(RoomSpec::default()).await;
    let (hearth, alice) = joined(&[&fake]).await;
    let room = fake.room_id();

    // A message and a rename by the creator (allowed by the room's rules), their signatures corrupted.
    let mut msg = fake.build(EventSpec::message(&fake.creator(), "forged message"));
    let mut rename = fake.build(EventSpec::state(&fake.creator(), "m.room.name", "", json!({"name": "forged name"})));
    for ev in [&mut msg, &mut rename] {
        let sigs = ev.json["signatures"][&fake.name].as_object_mut().unwrap();
        let (key, sig) = sigs.iter().next().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned())).unwrap();
        // Same length, different bytes: a well-formed signature that does not verify.
        let flipped: String = sig.chars().rev().collect();
        sigs.insert(key, json!(flipped));
    }
    // And a good message in the same transaction.
    let good = fake.append(EventSpec::message(&fake.creator(), "good message"));
    let answer = fake
        .push_json(vec![msg.json.clone(), rename.json.clone(), good.json.clone()], vec![])
        .await
        .expect("transaction accepted");
    let pdus = &answer["pdus"];
    assert_eq!(pdus[&good.id], json!({}), "the good PDU is processed: {answer}");
    for bad in [&msg, &rename] {
        assert!(
            pdus[&bad.id]["error"].as_str().is_some_and(|e| e.contains("signature")),
            "per-PDU error for {}: {answer}",
            bad.id
        );
        assert_eq!(stored(&hearth, &bad.id), None, "an event with a bad signature is not stored");
        alice.event(&room, &bad.id).await.assert_err(404, "M_NOT_FOUND");
    }
    let name = alice.state(&room, "m.room.name", "").await.ok();
    assert_eq!(name["name"], "Fake resident's room", "the forged rename changed nothing");
    assert_eq!(bodies(&alice, &room).await.first().map(String::as_str), Some("good message"));
    still_serving(&hearth, &alice).await;
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_content_hash_is_stored_redacted() {
    let fake = FakeResident::start(RoomSpec::default()).await;
    let (hearth, alice) = joined(&[&fake]).await;
    let room = fake.room_id();

    // Signed, then the content changed: the signature (over the redacted form) still verifies, the content
    // hash does not. The spec: keep the event, redacted.
    let mut ev = fake.append(EventSpec::message(&fake.creator(), "original text"));
    ev.json["content"]["body"] = json!("tampered text");
    let answer = fake.push_json(vec![ev.json.clone()], vec![]).await.expect("transaction accepted");
    assert_eq!(answer["pdus"][&ev.id], json!({}), "{answer}");
    let (rejected, outlier) = stored(&hearth, &ev.id).expect("the event is stored");
    assert_eq!((rejected, outlier), (None, false), "stored in the timeline, not rejected");
    let seen = alice.event(&room, &ev.id).await.ok();
    assert_eq!(seen["content"], json!({}), "clients see it redacted: {seen}");
    assert!(!bodies(&alice, &room).await.iter().any(|b| b.contains("text")), "neither text is served");
    let json: String =
        db(&hearth).query_row("SELECT json FROM events WHERE event_id = ?1", [&ev.id], |r| r.get(0)).unwrap();
    assert!(!json.contains("tampered") && !json.contains("original"), "the tampered content is not kept: {json}");
    still_serving(&hearth, &alice).await;
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_event_is_refused() {
    let fake = FakeResident::start(RoomSpec::default()).await;
    let (hearth, alice) = joined(&[&fake]).await;
    let room = fake.room_id();

    // A correctly hashed and signed message of about 70 000 bytes.
    let template = fake.build(EventSpec::message(&fake.creator(), "x"));
    let rules = rules(&fake.room_version());
    let mut obj: CanonicalJsonObject = serde_json::from_value(template.json.clone()).unwrap();
    obj.insert(
        "content".into(),
        serde_json::from_value(json!({"msgtype": "m.text", "body": "x".repeat(70_000)})).unwrap(),
    );
    sign_unchecked(&fake.identity, &rules, &mut obj);
    let big = serde_json::to_value(&obj).unwrap();
    assert!(big.to_string().len() > 65536);
    let big_id = event_id_unchecked(&rules, &obj);
    let good = fake.append(EventSpec::message(&fake.creator(), "small message"));

    let answer = fake.push_json(vec![big, good.json.clone()], vec![]).await.expect("transaction accepted");
    assert_eq!(answer["pdus"][&good.id], json!({}), "{answer}");
    assert_ne!(answer["pdus"].get(&big_id), Some(&json!({})), "the oversized PDU is not reported processed: {answer}");
    assert_eq!(stored(&hearth, &big_id), None, "the oversized event is not stored");
    let long: i64 =
        db(&hearth).query_row("SELECT count(*) FROM events WHERE length(json) > 65536", [], |r| r.get(0)).unwrap();
    assert_eq!(long, 0, "no event over 65536 bytes is stored");
    assert_eq!(bodies(&alice, &room).await.first().map(String::as_str), Some("small message"));
    still_serving(&hearth, &alice).await;
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_from_a_server_denied_by_the_acl_are_dropped() {
    let fake = FakeResident::start(RoomSpec::default()).await;
    let evil = fake.start_peer_named("evil.example").await;
    let mallory = evil.user("mallory");
    fake.append(EventSpec::member(&mallory, "join"));
    let (hearth, alice) = joined(&[&fake, &evil]).await;
    let room = fake.room_id();

    // Before the ACL, evil.example's events are accepted.
    let before = fake.append(EventSpec::message(&mallory, "before the ACL"));
    assert_eq!(evil.push(&[&before.id]).await[&before.id], json!({}));
    // The creator denies evil.example.
    let acl = fake.append(EventSpec::state(
        &fake.creator(),
        "m.room.server_acl",
        "",
        json!({"allow": ["*"], "deny": ["evil.example"], "allow_ip_literals": true}),
    ));
    assert_eq!(fake.push(&[&acl.id]).await[&acl.id], json!({}));

    // evil.example sends a message of its user and relays one of the creator's: both refused, per PDU. (Kept out
    // of the fake's DAG: events of the allowed server that built on them would, correctly, bring them in through
    // get_missing_events from an allowed server.)
    let denied = fake.build(EventSpec::message(&mallory, "after the ACL"));
    let relayed = fake.build(EventSpec::message(&fake.creator(), "relayed by a denied server"));
    let answer =
        evil.push_json(vec![denied.json.clone(), relayed.json.clone()], vec![]).await.expect("transaction answered");
    for ev in [&denied, &relayed] {
        assert!(answer["pdus"][&ev.id]["error"].as_str().is_some_and(|e| e.contains("ACL")), "{answer}");
        assert_eq!(stored(&hearth, &ev.id), None, "nothing from a denied server is stored");
    }
    // Its EDUs are ignored too: mallory's typing notification does not reach alice.
    let typing = json!({"edu_type": "m.typing", "content": {"room_id": room, "user_id": mallory, "typing": true}});
    evil.push_json(vec![], vec![typing]).await.expect("transaction answered");
    let sync = alice.sync(None, &[]).await.ok();
    let typing_now = events_of(&sync["rooms"]["join"][&room]["ephemeral"]);
    assert!(
        !typing_now.iter().any(|e| e["type"] == "m.typing"
            && e["content"]["user_ids"].as_array().is_some_and(|u| u.contains(&json!(mallory)))),
        "{typing_now:?}"
    );

    // The allowed server is served as before.
    let ok = fake.append(EventSpec::message(&fake.creator(), "from an allowed server"));
    assert_eq!(fake.push(&[&ok.id]).await[&ok.id], json!({}));
    let seen = bodies(&alice, &room).await;
    assert!(
        seen.contains(&"from an allowed server".to_owned()) && seen.contains(&"before the ACL".to_owned()),
        "{seen:?}"
    );
    assert!(
        !seen.contains(&"after the ACL".to_owned()) && !seen.contains(&"relayed by a denied server".to_owned()),
        "{seen:?}"
    );
    still_serving(&hearth, &alice).await;
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_matrix_for_another_destination_or_with_a_bad_signature_is_401() {
    let fake = FakeResident::start(RoomSpec::default()).await;
    let (hearth, alice) = joined(&[&fake]).await;
    let (hearth_name, client) = fake.hearth_client();
    let ev = fake.append(EventSpec::message(&fake.creator(), "never accepted"));
    let path = txn_path();
    let body = json!({"origin": fake.name, "origin_server_ts": 1, "pdus": [ev.json], "edus": []});
    let bytes = serde_json::to_vec(&body).unwrap();

    // Signed correctly, but for another destination (the header says so).
    let auth = client.x_matrix("PUT", &path, "other.example", Some(&body)).unwrap();
    raw_request(&hearth, reqwest::Method::PUT, &path, &auth, Some(bytes.clone()))
        .await
        .assert_err(401, "M_UNAUTHORIZED");
    // The header names us, but the signature covers another destination.
    let auth = client
        .x_matrix("PUT", &path, "other.example", Some(&body))
        .unwrap()
        .replace("destination=\"other.example\"", &format!("destination=\"{hearth_name}\""));
    raw_request(&hearth, reqwest::Method::PUT, &path, &auth, Some(bytes.clone()))
        .await
        .assert_err(401, "M_UNAUTHORIZED");
    // A signature over another body.
    let auth = client.x_matrix("PUT", &path, &hearth_name, Some(&json!({"pdus": []}))).unwrap();
    raw_request(&hearth, reqwest::Method::PUT, &path, &auth, Some(bytes.clone()))
        .await
        .assert_err(401, "M_UNAUTHORIZED");
    // Garbage instead of a signature, an unknown key, no header at all, a malformed header.
    let good_auth = client.x_matrix("PUT", &path, &hearth_name, Some(&body)).unwrap();
    let sig = good_auth.rsplit_once("sig=\"").unwrap().1.trim_end_matches('"').to_owned();
    for auth in [
        good_auth.replace(&sig, "AAAAbm90IGEgc2lnbmF0dXJl"),
        good_auth.replace("ed25519:fake1", "ed25519:nosuchkey"),
        String::new(),
        "X-Matrix garbage".to_owned(),
    ] {
        raw_request(&hearth, reqwest::Method::PUT, &path, &auth, Some(bytes.clone()))
            .await
            .assert_err(401, "M_UNAUTHORIZED");
    }
    assert_eq!(stored(&hearth, &ev.id), None, "no refused request stored anything");
    // The correctly signed request is accepted.
    let ok = raw_request(&hearth, reqwest::Method::PUT, &path, &good_auth, Some(bytes)).await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    assert_eq!(ok.body["pdus"][&ev.id], json!({}));
    still_serving(&hearth, &alice).await;
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_json_is_400_not_json() {
    let fake = FakeResident::start(RoomSpec::default()).await;
    let (hearth, alice) = joined(&[&fake]).await;
    let (hearth_name, client) = fake.hearth_client();
    let path = txn_path();
    // The signature cannot cover a body that is not JSON; the body is refused first.
    let auth = client.x_matrix("PUT", &path, &hearth_name, None).unwrap();
    for garbage in [&b"{\"pdus\": [ {"[..], &b"\xff\xfe not json"[..], &b"[1, 2,"[..]] {
        raw_request(&hearth, reqwest::Method::PUT, &path, &auth, Some(garbage.to_vec()))
            .await
            .assert_err(400, "M_NOT_JSON");
    }
    // Valid JSON of the wrong shape for a transaction (`pdus` not an array) is not a 500 either.
    let body = json!({"origin": fake.name, "pdus": "nope", "edus": 7});
    let auth = client.x_matrix("PUT", &path, &hearth_name, Some(&body)).unwrap();
    let r = raw_request(&hearth, reqwest::Method::PUT, &path, &auth, Some(serde_json::to_vec(&body).unwrap())).await;
    assert!(r.status < 500, "{} {}", r.status, r.text);
    still_serving(&hearth, &alice).await;
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_with_51_pdus_or_101_edus_is_400() {
    let fake = FakeResident::start(RoomSpec::default()).await;
    let (hearth, alice) = joined(&[&fake]).await;
    let room = fake.room_id();

    let evs: Vec<FakeEvent> =
        (0..51).map(|i| fake.append(EventSpec::message(&fake.creator(), &format!("bulk {i}")))).collect();
    let (status, body) =
        fake.push_json(evs.iter().map(|e| e.json.clone()).collect(), vec![]).await.expect_err("51 PDUs are refused");
    assert_eq!(status, 400, "{body}");
    for e in &evs {
        assert_eq!(stored(&hearth, &e.id), None, "nothing of a refused transaction is stored");
    }
    let typing = |n: usize| -> Vec<Value> {
        (0..n).map(|_| json!({"edu_type": "m.typing", "content": {"room_id": room, "user_id": fake.creator(), "typing": true}})).collect()
    };
    let (status, body) = fake.push_json(vec![], typing(101)).await.expect_err("101 EDUs are refused");
    assert_eq!(status, 400, "{body}");
    let sync = alice.sync(None, &[]).await.ok();
    assert!(
        events_of(&sync["rooms"]["join"][&room]["ephemeral"])
            .iter()
            .all(|e| e["type"] != "m.typing" || e["content"]["user_ids"] == json!([])),
        "no EDU of the refused transaction applied"
    );

    // At the limits, both are fine.
    let answer = fake
        .push_json(evs[..50].iter().map(|e| e.json.clone()).collect(), typing(100))
        .await
        .expect("50 PDUs and 100 EDUs are accepted");
    assert_eq!(answer["pdus"].as_object().map(|m| m.len()), Some(50), "{answer}");
    assert!(bodies(&alice, &room).await.contains(&"bulk 49".to_owned()));
    still_serving(&hearth, &alice).await;
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pdu_for_an_unknown_room_is_ignored() {
    let fake = FakeResident::start(RoomSpec::default()).await;
    // Another server's room that Hearth never joined.
    let elsewhere = FakeResident::start(RoomSpec { members: 1, messages: 1, ..RoomSpec::default() }).await;
    let (hearth, alice) = joined(&[&fake, &elsewhere]).await;
    let unknown = elsewhere.append(EventSpec::message(&elsewhere.creator(), "in a room Hearth is not in"));
    let good = fake.append(EventSpec::message(&fake.creator(), "in the shared room"));

    // Relayed by the fake together with a good PDU, and sent by its own server.
    let answer =
        fake.push_json(vec![unknown.json.clone(), good.json.clone()], vec![]).await.expect("transaction accepted");
    assert_eq!(answer["pdus"][&good.id], json!({}), "{answer}");
    assert_ne!(answer["pdus"].get(&unknown.id), Some(&json!({})), "{answer}");
    let answer = elsewhere.push_json(vec![unknown.json.clone()], vec![]).await.expect("transaction accepted");
    assert_ne!(answer["pdus"].get(&unknown.id), Some(&json!({})), "{answer}");

    assert_eq!(stored(&hearth, &unknown.id), None, "the PDU is not stored");
    let rooms: i64 = db(&hearth)
        .query_row("SELECT count(*) FROM rooms WHERE room_id = ?1", [elsewhere.room_id()], |r| r.get(0))
        .unwrap();
    assert_eq!(rooms, 0, "no room row was made for the unknown room");
    assert_eq!(
        elsewhere.count("make_join") + elsewhere.count("state_ids") + elsewhere.count("get_missing_events"),
        0,
        "Hearth did not try to join or fetch"
    );
    still_serving(&hearth, &alice).await;
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_sender_is_refused() {
    let fake = FakeResident::start(RoomSpec::default()).await;
    let peer = fake.start_peer_named("peer.example").await;
    let victim = peer.user("victim");
    fake.append(EventSpec::member(&victim, "join"));
    let (hearth, alice) = joined(&[&fake, &peer]).await;
    let room = fake.room_id();

    // The fake signs messages "from" a user of peer.example, and from a server that does not exist.
    let forged = fake.build_signed(EventSpec::message(&victim, "words put in the victim's mouth"), &fake.identity);
    let ghost = fake.build_signed(EventSpec::message("@ghost:nowhere.invalid", "from nowhere"), &fake.identity);
    // A legitimately relayed event (signed by its sender's server) is fine.
    let relayed = fake.append(EventSpec::message(&victim, "really from the victim"));
    let started = Instant::now();
    let answer = fake
        .push_json(vec![forged.json.clone(), ghost.json.clone(), relayed.json.clone()], vec![])
        .await
        .expect("transaction answered");
    assert!(started.elapsed() < Duration::from_secs(30), "bounded: {:?}", started.elapsed());
    for ev in [&forged, &ghost] {
        assert!(answer["pdus"][&ev.id]["error"].is_string(), "per-PDU error for the forged sender: {answer}");
        assert_eq!(stored(&hearth, &ev.id), None, "a forged event is not stored");
        alice.event(&room, &ev.id).await.assert_err(404, "M_NOT_FOUND");
    }
    assert_eq!(answer["pdus"][&relayed.id], json!({}), "{answer}");
    let seen = bodies(&alice, &room).await;
    assert!(seen.contains(&"really from the victim".to_owned()), "{seen:?}");
    assert!(!seen.iter().any(|b| b.contains("mouth") || b.contains("nowhere")), "{seen:?}");

    // EDUs for users of another server are ignored too.
    let typing = json!({"edu_type": "m.typing", "content": {"room_id": room, "user_id": victim, "typing": true}});
    fake.push_json(vec![], vec![typing]).await.expect("transaction answered");
    let sync = alice.sync(None, &[]).await.ok();
    assert!(!events_of(&sync["rooms"]["join"][&room]["ephemeral"])
        .iter()
        .any(|e| e["content"]["user_ids"].as_array().is_some_and(|u| u.contains(&json!(victim)))));
    still_serving(&hearth, &alice).await;
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_not_allowed_by_its_auth_events_is_rejected() {
    let fake = FakeResident::start(RoomSpec::default()).await;
    let (hearth, alice) = joined(&[&fake]).await;
    let room = fake.room_id();

    // user1 has power 0; renaming needs 50 (state_default).
    let rename = fake.build(EventSpec::state(&fake.user("user1"), "m.room.name", "", json!({"name": "vandalised"})));
    // Someone who never joined speaks.
    let outsider = fake.build(EventSpec::message(&fake.user("outsider"), "I am not in this room"));
    // user2 bans user3 without the power to.
    let ban = fake.build(EventSpec::state(
        &fake.user("user2"),
        "m.room.member",
        &fake.user("user3"),
        json!({"membership": "ban"}),
    ));
    let good = fake.append(EventSpec::message(&fake.creator(), "a good message"));
    let answer = fake
        .push_json(vec![rename.json.clone(), outsider.json.clone(), ban.json.clone(), good.json.clone()], vec![])
        .await
        .expect("transaction accepted");
    assert_eq!(answer["pdus"][&good.id], json!({}), "{answer}");
    let visible = visible_ids(&alice, &room).await;
    for bad in [&rename, &outsider, &ban] {
        assert!(answer["pdus"].get(&bad.id).is_some(), "every PDU gets a result: {answer}");
        if let Some((rejected, _)) = stored(&hearth, &bad.id) {
            assert!(rejected.is_some(), "{} is kept only as rejected", bad.id);
        }
        alice.event(&room, &bad.id).await.assert_err(404, "M_NOT_FOUND");
        assert!(!visible.contains(&bad.id), "{} is not in /messages or /sync", bad.id);
    }
    assert!(visible.contains(&good.id));
    assert_eq!(alice.state(&room, "m.room.name", "").await.ok()["name"], "Fake resident's room");
    let user3 = alice.state(&room, "m.room.member", &fake.user("user3")).await.ok();
    assert_eq!(user3["membership"], "join", "the unauthorised ban changed nothing");
    let members = alice.get(&format!("/rooms/{}/joined_members", enc(&room))).await.ok();
    assert!(members["joined"].get(fake.user("outsider")).is_none());
    still_serving(&hearth, &alice).await;
    hearth.stop().await;
}

/// Redactions from another server (spec, room versions 3+, "Redactions"): every one is accepted into the room, but
/// one only takes effect when its sender has the redact power level, or is of the same server as the redacted
/// event's sender. The create event is never redacted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_redactions_take_effect_only_with_power_or_from_the_senders_server() {
    let fake = FakeResident::start(RoomSpec { version: "11".into(), members: 2, messages: 0 }).await;
    let (hearth, alice) = joined(&[&fake]).await;
    let room = fake.room_id();
    let ours = alice.send_text(&room, "alice's message").await;
    let theirs = fake.append(EventSpec::message(&fake.user("user2"), "user2's message"));
    fake.push(&[&theirs.id]).await;
    let redaction = |sender: &str, target: &str| EventSpec {
        kind: "m.room.redaction".into(),
        content: json!({"redacts": target}),
        ..EventSpec::message(sender, "")
    };
    // A powerless remote user redacts alice's event: accepted, not applied.
    let r1 = fake.append(redaction(&fake.user("user1"), &ours));
    // ... and the event of a user of its own server: applied.
    let r2 = fake.append(redaction(&fake.user("user1"), &theirs.id));
    // The creator (power 100) may redact alice's event, but not the create event.
    let create = fake.room.lock().unwrap().state_id("m.room.create", "").unwrap();
    let r3 = fake.append(redaction(&fake.creator(), &create));
    let answer = fake.push(&[&r1.id, &r2.id, &r3.id]).await;
    for r in [&r1.id, &r2.id, &r3.id] {
        assert_eq!(answer[r], json!({}), "every redaction is accepted: {answer}");
    }
    let body = |ev: Value| ev["content"]["body"].as_str().map(str::to_owned);
    assert_eq!(body(alice.event(&room, &ours).await.ok()).as_deref(), Some("alice's message"), "no power: not applied");
    let seen = alice.event(&room, &theirs.id).await.ok();
    assert_eq!((body(seen.clone()), &seen["unsigned"]["redacted_because"]["event_id"]), (None, &json!(r2.id)));
    // (Read as state: the create event reached us with the join, before alice's membership, so it is no timeline
    // event of hers to fetch with /event.)
    let create_ev = alice.state(&room, "m.room.create", "").await.ok();
    assert_eq!(create_ev["room_version"], "11", "the create event is never redacted: {create_ev}");

    let r4 = fake.append(redaction(&fake.creator(), &ours));
    fake.push(&[&r4.id]).await;
    let seen = alice.event(&room, &ours).await.ok();
    assert_eq!((body(seen.clone()), &seen["unsigned"]["redacted_because"]["event_id"]), (None, &json!(r4.id)));
    still_serving(&hearth, &alice).await;
    hearth.stop().await;
}

/// Redactions in history fetched with `/backfill` take effect too: a backfilled batch holds the redaction before
/// the event it redacts (newest first), and neither was applied before (history never went through the room's
/// persist step), so `/messages` showed redacted content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redactions_in_backfilled_history_take_effect() {
    let fake = FakeResident::start(RoomSpec { version: "11".into(), members: 2, messages: 0 }).await;
    let redaction = |sender: &str, target: &str| EventSpec {
        kind: "m.room.redaction".into(),
        content: json!({"redacts": target}),
        ..EventSpec::message(sender, "")
    };
    // History before alice joins: user1 redacts their own message, the creator (power 100) redacts user2's.
    let own = fake.append(EventSpec::message(&fake.user("user1"), "secret one"));
    let theirs = fake.append(EventSpec::message(&fake.user("user2"), "secret two"));
    let kept = fake.append(EventSpec::message(&fake.user("user2"), "kept"));
    fake.append(redaction(&fake.user("user1"), &own.id));
    fake.append(redaction(&fake.creator(), &theirs.id));
    for i in 0..3 {
        fake.append(EventSpec::message(&fake.creator(), &format!("later {i}")));
    }
    let (hearth, alice) = joined(&[&fake]).await;
    let room = fake.room_id();
    let page = alice.messages(&room, &[("dir", "b"), ("limit", "50")]).await.ok();
    let events = page["chunk"].as_array().cloned().unwrap_or_default();
    let by_id = |id: &str| events.iter().find(|e| e["event_id"] == id).cloned();
    let got = by_id(&kept.id).unwrap_or_else(|| panic!("history was backfilled: {page}"));
    assert_eq!(got["content"]["body"], "kept");
    for id in [&own.id, &theirs.id] {
        let e = by_id(id).unwrap_or_else(|| panic!("{id} backfilled: {page}"));
        assert_eq!(e["content"], json!({}), "redacted in backfilled history: {e}");
    }
    assert!(!page.to_string().contains("secret"), "no redacted text is served: {page}");
    hearth.stop().await;
}
