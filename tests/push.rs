//! Push notifications: the pushers API and delivery to a push gateway (a test double that records each request and
//! checks it against the push gateway API's notification schema).

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

/// The gateway test double.
#[derive(Default)]
struct Gateway {
    /// Notifications accepted (the `notification` objects).
    got: Mutex<Vec<Value>>,
    /// Requests answered 500 while `down`.
    attempts: AtomicUsize,
    down: AtomicBool,
    /// Pushkeys answered as rejected.
    reject: Mutex<HashSet<String>>,
    /// Requests that did not match the spec's schema.
    invalid: Mutex<Vec<String>>,
}

/// What the push gateway spec requires of a notification request (and the types of the fields it names).
fn check(body: &Value) -> Result<(), String> {
    let n = body.get("notification").and_then(Value::as_object).ok_or("no notification object")?;
    for key in ["event_id", "room_id", "type", "sender", "sender_display_name", "room_name", "prio"] {
        if n.get(key).is_some_and(|v| !v.is_string()) {
            return Err(format!("{key} is not a string"));
        }
    }
    if n.get("prio").is_some_and(|p| p != "high" && p != "low") {
        return Err("prio is neither high nor low".into());
    }
    if n.get("content").is_some_and(|c| !c.is_object()) {
        return Err("content is not an object".into());
    }
    if let Some(counts) = n.get("counts") {
        let ok = counts.as_object().is_some_and(|c| c.values().all(|v| v.is_u64()));
        if !ok {
            return Err(format!("bad counts {counts}"));
        }
    }
    let devices = n.get("devices").and_then(Value::as_array).ok_or("no devices array")?;
    if devices.is_empty() {
        return Err("no devices".into());
    }
    for d in devices {
        if !d["app_id"].is_string() || !d["pushkey"].is_string() {
            return Err(format!("device without app_id/pushkey: {d}"));
        }
        if d.get("pushkey_ts").is_some_and(|t| !t.is_u64()) {
            return Err("pushkey_ts is not an integer".into());
        }
        for key in ["data", "tweaks"] {
            if d.get(key).is_some_and(|v| !v.is_object()) {
                return Err(format!("{key} is not an object"));
            }
        }
    }
    Ok(())
}

async fn notify(
    axum::extract::State(g): axum::extract::State<Arc<Gateway>>,
    axum::Json(body): axum::Json<Value>,
) -> (axum::http::StatusCode, axum::Json<Value>) {
    g.attempts.fetch_add(1, Ordering::SeqCst);
    if let Err(e) = check(&body) {
        g.invalid.lock().unwrap().push(format!("{e}: {body}"));
    }
    if g.down.load(Ordering::SeqCst) {
        return (axum::http::StatusCode::INTERNAL_SERVER_ERROR, axum::Json(json!({})));
    }
    let reject = g.reject.lock().unwrap().clone();
    let rejected: Vec<String> = body["notification"]["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["pushkey"].as_str())
        .filter(|k| reject.contains(*k))
        .map(str::to_owned)
        .collect();
    g.got.lock().unwrap().push(body["notification"].clone());
    (axum::http::StatusCode::OK, axum::Json(json!({"rejected": rejected})))
}

/// Starts the gateway; returns it and its notify URL.
async fn gateway() -> (Arc<Gateway>, String) {
    let g = Arc::new(Gateway::default());
    let app = axum::Router::new().route("/_matrix/push/v1/notify", axum::routing::post(notify)).with_state(g.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/_matrix/push/v1/notify", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (g, url)
}

impl Gateway {
    fn got(&self) -> Vec<Value> {
        self.got.lock().unwrap().clone()
    }

    async fn wait_for_event(&self, event_id: &str, timeout: Duration) -> Value {
        wait_until(&format!("{event_id} at the gateway"), timeout, || {
            std::future::ready(self.got().into_iter().find(|n| n["event_id"] == event_id))
        })
        .await
    }

    fn assert_valid(&self) {
        let invalid = self.invalid.lock().unwrap();
        assert!(invalid.is_empty(), "requests not matching the push gateway spec: {invalid:?}");
    }
}

fn push_config(c: &mut hearth::config::Config) {
    c.push.allow_private_gateways = true;
    c.push.retry_base_ms = 50;
}

fn pusher_body(url: &str, pushkey: &str) -> Value {
    json!({
        "kind": "http", "app_id": "org.example.app", "pushkey": pushkey, "app_display_name": "Example",
        "device_display_name": "Phone", "lang": "en", "profile_tag": "tag", "data": {"url": url, "extra": 1},
    })
}

/// Alice and Bob in a DM (Bob created it and invited Alice); Alice has a pusher.
async fn dm_with_pusher(server: &TestServer, url: &str) -> (Client, Client, String) {
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let room = bob.create_room(json!({"is_direct": true, "invite": [alice.user_id], "name": "Chat"})).await;
    assert_eq!(alice.join(&room).await.status, 200);
    // Events are evaluated shortly after they are stored: once the invite is among Alice's notifications, what came
    // before the pusher will not reach it.
    wait_until("the invite evaluated", Duration::from_secs(5), || async {
        alice.get("/notifications").await.ok()["notifications"].as_array().is_some_and(|a| !a.is_empty()).then_some(())
    })
    .await;
    alice.post("/pushers/set", pusher_body(url, "key-alice")).await.ok();
    (alice, bob, room)
}

#[tokio::test]
async fn dm_message_reaches_the_gateway_with_the_spec_body() {
    let (g, url) = gateway().await;
    let server = TestServer::start_with(push_config).await;
    let (alice, bob, room) = dm_with_pusher(&server, &url).await;
    let sent = std::time::Instant::now();
    let event_id = bob.send_text(&room, "hello there").await;
    let n = g.wait_for_event(&event_id, Duration::from_secs(1)).await;
    assert!(sent.elapsed() < Duration::from_secs(1));
    assert_eq!(n["room_id"], room);
    assert_eq!(n["type"], "m.room.message");
    assert_eq!(n["sender"], bob.user_id);
    assert_eq!(n["sender_display_name"], "bob");
    assert_eq!(n["room_name"], "Chat");
    assert_eq!(n["content"]["body"], "hello there");
    assert_eq!(n["counts"]["unread"], 1);
    let d = &n["devices"][0];
    assert_eq!((d["app_id"].as_str(), d["pushkey"].as_str()), (Some("org.example.app"), Some("key-alice")));
    assert_eq!(d["data"], json!({"extra": 1}), "the pusher's data, without the url");
    assert!(d["pushkey_ts"].as_u64().is_some());
    assert_eq!(d["tweaks"]["sound"], "default", "a one-to-one message rings");
    assert!(d["tweaks"].get("highlight").is_none());
    assert_eq!(alice.get("/pushers").await.ok()["pushers"][0]["pushkey"], "key-alice");
    g.assert_valid();
    server.stop().await;
}

#[tokio::test]
async fn own_messages_are_not_pushed_and_mentions_highlight() {
    let (g, url) = gateway().await;
    let server = TestServer::start_with(push_config).await;
    let (alice, bob, room) = dm_with_pusher(&server, &url).await;
    let own = alice.send_text(&room, "my own words").await;
    let mention = bob
        .send(
            &room,
            "m.room.message",
            json!({"msgtype": "m.text", "body": "alice: look", "m.mentions": {"user_ids": [alice.user_id]}}),
        )
        .await
        .ok()["event_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let n = g.wait_for_event(&mention, Duration::from_secs(5)).await;
    assert_eq!(n["devices"][0]["tweaks"]["highlight"], true);
    assert_eq!(n["prio"], "high");
    // Alice's event came first in the stream and the pusher's queue is in order: had it been pushed, it would be here.
    assert!(g.got().iter().all(|n| n["event_id"] != own), "own message pushed");
    g.assert_valid();
    server.stop().await;
}

#[tokio::test]
async fn event_id_only_format() {
    let (g, url) = gateway().await;
    let server = TestServer::start_with(push_config).await;
    let (alice, bob, room) = dm_with_pusher(&server, &url).await;
    let mut body = pusher_body(&url, "key-alice");
    body["data"]["format"] = json!("event_id_only");
    alice.post("/pushers/set", body).await.ok();
    let event_id = bob.send_text(&room, "secret").await;
    let n = g.wait_for_event(&event_id, Duration::from_secs(5)).await;
    assert_eq!(n["room_id"], room);
    assert!(n.get("content").is_none() && n.get("sender").is_none(), "{n}");
    assert_eq!(n["devices"][0]["data"]["format"], "event_id_only");
    g.assert_valid();
    server.stop().await;
}

#[tokio::test]
async fn nothing_is_lost_across_a_gateway_outage_and_a_restart() {
    let (g, url) = gateway().await;
    g.down.store(true, Ordering::SeqCst);
    let server = TestServer::start_with(push_config).await;
    let (_alice, bob, room) = dm_with_pusher(&server, &url).await;
    let first = bob.send_text(&room, "one").await;
    wait_for("a failed attempt", Duration::from_secs(5), || g.attempts.load(Ordering::SeqCst) > 0).await;
    let second = bob.send_text(&room, "two").await;
    wait_for("a retry", Duration::from_secs(5), || g.attempts.load(Ordering::SeqCst) > 1).await;
    // Restart Hearth on the same database while the gateway is still down.
    let TestServer { running, dir, .. } = server;
    running.stop().await;
    let mut config = test_config(dir.path());
    push_config(&mut config);
    let running = hearth::server::start(config).await.expect("restarts");
    g.down.store(false, Ordering::SeqCst);
    g.wait_for_event(&first, Duration::from_secs(10)).await;
    g.wait_for_event(&second, Duration::from_secs(10)).await;
    let order: Vec<Value> = g.got().into_iter().map(|n| n["event_id"].clone()).collect();
    assert_eq!(order, vec![json!(first), json!(second)], "in order, each once");
    g.assert_valid();
    running.stop().await;
}

#[tokio::test]
async fn a_rejected_pushkey_deletes_the_pusher() {
    let (g, url) = gateway().await;
    g.reject.lock().unwrap().insert("key-alice".into());
    let server = TestServer::start_with(push_config).await;
    let (alice, bob, room) = dm_with_pusher(&server, &url).await;
    let event_id = bob.send_text(&room, "hi").await;
    g.wait_for_event(&event_id, Duration::from_secs(5)).await;
    wait_until("the pusher gone", Duration::from_secs(5), || async {
        alice.get("/pushers").await.ok()["pushers"].as_array().is_some_and(|a| a.is_empty()).then_some(())
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn pushers_go_with_password_change_logout_and_deactivation() {
    let server = TestServer::start_with(push_config).await;
    let url = "https://push.example.org/_matrix/push/v1/notify";
    let alice = server.user("alice").await;
    let mut phone = alice.anonymous();
    phone.login("alice", PASSWORD).await.ok();
    phone.post("/pushers/set", pusher_body(url, "phone")).await.ok();
    alice.post("/pushers/set", pusher_body(url, "laptop")).await.ok();
    assert_eq!(alice.get("/pushers").await.ok()["pushers"].as_array().unwrap().len(), 2);
    let change = json!({"new_password": "another one", "logout_devices": false,
        "auth": {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": PASSWORD}});
    alice.post("/account/password", change).await.ok();
    let left: Vec<Value> = alice.get("/pushers").await.ok()["pushers"].as_array().unwrap().clone();
    assert_eq!(left.len(), 1, "only the pusher of the token that changed the password stays");
    assert_eq!(left[0]["pushkey"], "laptop");
    // Logging out a device removes its pushers.
    let mut tablet = alice.anonymous();
    tablet.login("alice", "another one").await.ok();
    tablet.post("/pushers/set", pusher_body(url, "tablet")).await.ok();
    tablet.post("/logout", json!({})).await.ok();
    let keys: Vec<Value> = alice.get("/pushers").await.ok()["pushers"].as_array().unwrap().clone();
    assert_eq!(keys.iter().map(|p| p["pushkey"].clone()).collect::<Vec<_>>(), vec![json!("laptop")]);
    // Deactivation removes them all (checked from the database: the account can no longer ask).
    let deactivate = json!({"auth": {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": "another one"}});
    alice.post("/account/deactivate", deactivate).await.ok();
    let db = rusqlite::Connection::open(&server.db_path).unwrap();
    let n: i64 = db.query_row("SELECT count(*) FROM pushers", [], |r| r.get(0)).unwrap();
    assert_eq!(n, 0);
    server.stop().await;
}

#[tokio::test]
async fn pushers_api_validation() {
    let server = TestServer::start_with(push_config).await;
    let alice = server.user("alice").await;
    let good = "https://push.example.org/_matrix/push/v1/notify";
    alice
        .post("/pushers/set", pusher_body("https://push.example.org/notify", "k"))
        .await
        .assert_err(400, "M_INVALID_PARAM");
    let mut email = pusher_body(good, "a@example.org");
    email["kind"] = json!("email");
    let r = alice.post("/pushers/set", email).await;
    r.assert_err(400, "M_INVALID_PARAM");
    assert!(r.body["error"].as_str().unwrap().contains("not supported"), "{}", r.body);
    let mut no_data = pusher_body(good, "k");
    no_data.as_object_mut().unwrap().remove("data");
    alice.post("/pushers/set", no_data).await.assert_err(400, "M_MISSING_PARAM");
    let mut no_lang = pusher_body(good, "k");
    no_lang.as_object_mut().unwrap().remove("lang");
    alice.post("/pushers/set", no_lang).await.assert_err(400, "M_MISSING_PARAM");
    alice.post("/pushers/set", json!({"kind": "http", "app_id": "a"})).await.assert_err(400, "M_MISSING_PARAM");
    let mut bad_format = pusher_body(good, "k");
    bad_format["data"]["format"] = json!("full_event");
    alice.post("/pushers/set", bad_format).await.assert_err(400, "M_INVALID_PARAM");
    assert_eq!(alice.get("/pushers").await.ok()["pushers"], json!([]));

    // append: another user's pusher with the same app and key stays only with append.
    let bob = server.user("bob").await;
    alice.post("/pushers/set", pusher_body(good, "shared")).await.ok();
    let mut appended = pusher_body(good, "shared");
    appended["append"] = json!(true);
    bob.post("/pushers/set", appended).await.ok();
    assert_eq!(alice.get("/pushers").await.ok()["pushers"].as_array().unwrap().len(), 1);
    bob.post("/pushers/set", pusher_body(good, "shared")).await.ok();
    assert_eq!(alice.get("/pushers").await.ok()["pushers"], json!([]), "without append the key moves to bob");
    let got = bob.get("/pushers").await.ok();
    assert_eq!(got["pushers"][0]["profile_tag"], "tag");
    assert_eq!(got["pushers"][0]["data"]["url"], good);
    // kind: null deletes.
    bob.post("/pushers/set", json!({"kind": null, "app_id": "org.example.app", "pushkey": "shared"})).await.ok();
    assert_eq!(bob.get("/pushers").await.ok()["pushers"], json!([]));
    server.stop().await;
}

#[tokio::test]
async fn private_gateways_are_refused_by_default() {
    let (g, url) = gateway().await;
    let server = TestServer::start_with(|c| c.push.retry_base_ms = 50).await;
    let (alice, bob, room) = dm_with_pusher(&server, &url).await;
    bob.send_text(&room, "hi").await;
    // The refusal shows as the pusher's backoff in the database; the gateway never hears of it.
    let db = server.db_path.clone();
    wait_for("a failed delivery", Duration::from_secs(5), || {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.query_row("SELECT failures FROM pushers", [], |r| r.get::<_, i64>(0)).unwrap_or(0) > 0
    })
    .await;
    assert_eq!(g.attempts.load(Ordering::SeqCst), 0);
    drop(alice);
    server.stop().await;
}

#[tokio::test]
async fn notifications_list_with_highlight_filter_paging_and_read() {
    let server = TestServer::start_with(push_config).await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let room = bob.create_room(json!({"invite": [alice.user_id]})).await;
    assert_eq!(alice.join(&room).await.status, 200);
    let invite = wait_until("the invite among the notifications", Duration::from_secs(5), || async {
        let r = alice.get("/notifications").await.ok();
        r["notifications"].as_array().and_then(|a| a.first()).filter(|n| n["event"]["type"] == "m.room.member").cloned()
    })
    .await;
    assert_eq!(invite["event"]["state_key"], alice.user_id, "the invitee hears of the invite");
    let first = bob.send_text(&room, "one").await;
    let mention = bob.send_text(&room, "hey alice").await;
    alice.send_text(&room, "my own").await;
    let last = bob.send_text(&room, "three").await;
    let all = wait_until("three notifications", Duration::from_secs(5), || async {
        let r = alice.get("/notifications").await.ok();
        (r["notifications"].as_array().map(Vec::len) == Some(4)).then_some(r)
    })
    .await;
    let ids: Vec<Value> =
        all["notifications"].as_array().unwrap().iter().map(|n| n["event"]["event_id"].clone()).collect();
    let invite_id = invite["event"]["event_id"].clone();
    assert_eq!(ids, vec![json!(last), json!(mention), json!(first), invite_id], "newest first, own event left out");
    let n = &all["notifications"][0];
    assert_eq!((n["room_id"].as_str(), n["read"].as_bool()), (Some(room.as_str()), Some(false)));
    assert!(n["ts"].as_i64().is_some() && n["actions"].as_array().is_some_and(|a| a.contains(&json!("notify"))));
    assert!(n["event"].get("room_id").is_none());
    assert!(all.get("next_token").is_none());
    let hl = alice.get("/notifications?only=highlight").await.ok();
    assert_eq!(hl["notifications"].as_array().unwrap().len(), 1);
    assert_eq!(hl["notifications"][0]["event"]["event_id"], mention);
    let page = alice.get("/notifications?limit=2").await.ok();
    assert_eq!(page["notifications"].as_array().unwrap().len(), 2);
    let token = page["next_token"].as_str().expect("next_token").to_owned();
    let rest = alice.get(&format!("/notifications?limit=2&from={token}")).await.ok();
    assert_eq!(rest["notifications"][0]["event"]["event_id"], first);
    assert!(rest.get("next_token").is_none());
    alice.post(&format!("/rooms/{}/receipt/m.read/{}", enc(&room), enc(&last)), json!({})).await.ok();
    let read = alice.get("/notifications").await.ok();
    assert!(read["notifications"].as_array().unwrap().iter().all(|n| n["read"] == true));
    alice.get("/notifications?from=nonsense").await.assert_err(400, "M_INVALID_PARAM");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federated_message_is_pushed() {
    let (g, url) = gateway().await;
    let (a, b) = common::fake_resident::federated_pair_with(push_config).await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let room = bob.create_room(json!({"is_direct": true, "invite": [alice.user_id]})).await;
    wait_until("alice joins over federation", Duration::from_secs(20), || async {
        (alice.join(&room).await.status == 200).then_some(())
    })
    .await;
    alice.post("/pushers/set", pusher_body(&url, "key-alice")).await.ok();
    wait_until("bob sees alice joined", Duration::from_secs(20), || async {
        let r = bob.get(&format!("/rooms/{}/joined_members", enc(&room))).await;
        r.body["joined"].get(&alice.user_id).is_some().then_some(())
    })
    .await;
    let event_id = bob.send_text(&room, "over the wire").await;
    let n = g.wait_for_event(&event_id, Duration::from_secs(20)).await;
    assert_eq!(n["sender"], bob.user_id);
    assert_eq!(n["content"]["body"], "over the wire");
    assert_eq!(n["devices"][0]["pushkey"], "key-alice");
    g.assert_valid();
    a.stop().await;
    b.stop().await;
}

/// Alice's counts in a room: summed, and (main timeline, thread root -> counts) with `unread_thread_notifications`.
async fn counts(alice: &Client, room: &str) -> (Value, Value, Value) {
    let threads = [("filter", r#"{"room":{"timeline":{"limit":1,"unread_thread_notifications":true}}}"#)];
    let summed = alice.sync(None, &[("filter", r#"{"room":{"timeline":{"limit":1}}}"#)]).await.ok();
    let by_thread = alice.sync(None, &threads).await.ok();
    let r = &by_thread["rooms"]["join"][room];
    let per_thread = r.get("unread_thread_notifications").cloned().unwrap_or_else(|| json!({}));
    (summed["rooms"]["join"][room]["unread_notifications"].clone(), r["unread_notifications"].clone(), per_thread)
}

fn n(count: i64, highlight: i64) -> Value {
    json!({"notification_count": count, "highlight_count": highlight})
}

/// The scenario `tests/interop/counts.py` runs on Hearth and Synapse, with Synapse's numbers: the counts come from
/// the push evaluator's decisions, the main timeline apart from threads, and read receipts (threaded, private,
/// unthreaded) read what they cover.
#[tokio::test]
async fn unread_counts_follow_the_evaluated_rules_and_receipts() {
    let server = TestServer::start().await;
    let bob = server.user("bob").await;
    let alice = server.user("alice").await;
    let room = bob.create_room(json!({"preset": "public_chat"})).await;
    alice.join(&room).await.ok();
    let r = enc(&room);
    let send = |content: Value| {
        let (bob, room) = (&bob, room.clone());
        async move { bob.send(&room, "m.room.message", content).await.ok()["event_id"].as_str().unwrap().to_owned() }
    };
    let text = |body: &str| json!({"msgtype": "m.text", "body": body});
    assert_eq!(counts(&alice, &room).await, (n(0, 0), n(0, 0), json!({})));

    let root = send(text("plain one")).await;
    let plain2 = send(text("plain two")).await;
    assert_eq!(counts(&alice, &room).await, (n(2, 0), n(2, 0), json!({})));
    let mention = send(json!({"msgtype": "m.text", "body": "hey", "m.mentions": {"user_ids": [alice.user_id]}})).await;
    assert_eq!(counts(&alice, &room).await, (n(3, 1), n(3, 1), json!({})));
    let in_thread = |body: &str| json!({"msgtype": "m.text", "body": body, "m.relates_to": {"rel_type": "m.thread", "event_id": root}});
    let reply1 = send(in_thread("in the thread")).await;
    assert_eq!(counts(&alice, &room).await, (n(4, 1), n(3, 1), json!({&root: n(1, 0)})));
    let edit = json!({"msgtype": "m.text", "body": "* 2", "m.new_content": text("2"),
                      "m.relates_to": {"rel_type": "m.replace", "event_id": plain2}});
    send(edit).await;
    let reply2 = send(in_thread("more")).await;
    assert_eq!(counts(&alice, &room).await, (n(5, 1), n(3, 1), json!({&root: n(2, 0)})), "an edit does not count");

    // A receipt in `main` reads only the main timeline; later events count again.
    alice.post(&format!("/rooms/{r}/receipt/m.read/{}", enc(&mention)), json!({"thread_id": "main"})).await.ok();
    assert_eq!(counts(&alice, &room).await, (n(2, 0), n(0, 0), json!({&root: n(2, 0)})));
    let last_main = send(text("three")).await;
    assert_eq!(counts(&alice, &room).await, (n(3, 0), n(1, 0), json!({&root: n(2, 0)})));
    // Receipts in the thread (private, then public) read only the thread.
    let receipt = |kind: &str, event: &str| format!("/rooms/{r}/receipt/{kind}/{}", enc(event));
    alice.post(&receipt("m.read.private", &reply1), json!({"thread_id": root})).await.ok();
    assert_eq!(counts(&alice, &room).await, (n(2, 0), n(1, 0), json!({&root: n(1, 0)})));
    alice.post(&receipt("m.read", &reply2), json!({"thread_id": root})).await.ok();
    assert_eq!(counts(&alice, &room).await, (n(1, 0), n(1, 0), json!({})));
    // An unthreaded receipt reads every thread, but only up to its event.
    send(in_thread("a last one")).await;
    alice.post(&receipt("m.read", &last_main), json!({})).await.ok();
    assert_eq!(counts(&alice, &room).await, (n(1, 0), n(0, 0), json!({&root: n(1, 0)})));
    // Notices and reactions do not count; Alice's own message reads its thread (the main timeline) up to it.
    bob.send(&room, "m.room.message", json!({"msgtype": "m.notice", "body": "bot"})).await.ok();
    bob.send(
        &room,
        "m.reaction",
        json!({"m.relates_to": {"rel_type": "m.annotation", "event_id": reply1, "key": "+1"}}),
    )
    .await
    .ok();
    send(text("four")).await;
    assert_eq!(counts(&alice, &room).await, (n(2, 0), n(1, 0), json!({&root: n(1, 0)})));
    alice.send_text(&room, "mine").await;
    assert_eq!(counts(&alice, &room).await, (n(1, 0), n(0, 0), json!({&root: n(1, 0)})));
    // Leaving the room forgets its counts.
    alice.leave(&room).await.ok();
    alice.join(&room).await.ok();
    assert_eq!(counts(&alice, &room).await, (n(0, 0), n(0, 0), json!({})));
    server.stop().await;
}

/// An invite over federation to a room this server holds no state for (stored as an outlier) reaches the
/// invitee's gateway, by the default `.m.rule.invite_for_me`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federated_invite_is_pushed() {
    let (g, url) = gateway().await;
    let (a, b) = common::fake_resident::federated_pair_with(push_config).await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    alice.post("/pushers/set", pusher_body(&url, "key-alice")).await.ok();
    let room = bob.create_room(json!({"name": "Over there"})).await;
    let invite = bob.invite(&room, &alice.user_id).await;
    assert_eq!(invite.status, 200, "{:?}", invite.body);
    let got = wait_until("the invite at the gateway", Duration::from_secs(20), || {
        std::future::ready(g.got().into_iter().find(|n| n["type"] == "m.room.member"))
    })
    .await;
    assert_eq!(got["room_id"], room);
    assert_eq!(got["sender"], bob.user_id);
    assert_eq!((got["membership"].as_str(), got["user_is_target"].as_bool()), (Some("invite"), Some(true)));
    assert_eq!(got["devices"][0]["tweaks"]["sound"], "default", ".m.rule.invite_for_me rings");
    let listed = alice.get("/notifications").await.ok();
    assert_eq!(listed["notifications"][0]["event"]["event_id"], got["event_id"]);
    g.assert_valid();
    a.stop().await;
    b.stop().await;
}
