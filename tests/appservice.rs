//! Application services (bridges), against a scripted appservice in the test (an axum server that records the
//! transactions it gets and can be taken down): registration files checked at start, the `as_token` and identity
//! assertion, appservice registration and login, exclusive namespaces, rate limits, transactions delivered in
//! order across an outage and a restart (same txn id on a retry, nothing duplicated), user and alias queries on
//! demand, and the ping.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const AS_TOKEN: &str = "as-secret-token";
const HS_TOKEN: &str = "hs-secret-token";

/// The scripted application service.
#[derive(Default)]
struct FakeAs {
    /// Accepted transactions: (txn id, body).
    txns: Mutex<Vec<(String, Value)>>,
    /// Every transaction attempt's txn id, accepted or not.
    attempts: Mutex<Vec<String>>,
    down: AtomicBool,
    /// Requests that came without the hs_token.
    unauthorized: AtomicUsize,
    pings: Mutex<Vec<Value>>,
    /// Hearth's client API URL, for the queries' handlers (which create what they are asked about).
    hearth: Mutex<Option<String>>,
    user_queries: Mutex<Vec<String>>,
    alias_queries: Mutex<Vec<String>>,
}

type St = axum::extract::State<Arc<FakeAs>>;

fn authorized(g: &FakeAs, headers: &axum::http::HeaderMap) -> bool {
    let ok = headers.get("authorization").and_then(|h| h.to_str().ok()) == Some(&format!("Bearer {HS_TOKEN}"));
    if !ok {
        g.unauthorized.fetch_add(1, Ordering::SeqCst);
    }
    ok
}

async fn transaction(
    axum::extract::State(g): St,
    axum::extract::Path(txn): axum::extract::Path<String>,
    headers: axum::http::HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> (axum::http::StatusCode, axum::Json<Value>) {
    g.attempts.lock().unwrap().push(txn.clone());
    if !authorized(&g, &headers) {
        return (axum::http::StatusCode::FORBIDDEN, axum::Json(json!({"errcode": "M_FORBIDDEN"})));
    }
    if g.down.load(Ordering::SeqCst) {
        return (axum::http::StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({})));
    }
    let mut txns = g.txns.lock().unwrap();
    // A retry of an accepted transaction is acknowledged and not recorded again (as the spec asks of services).
    if !txns.iter().any(|(t, _)| *t == txn) {
        txns.push((txn, body));
    }
    (axum::http::StatusCode::OK, axum::Json(json!({})))
}

async fn ping(
    axum::extract::State(g): St,
    headers: axum::http::HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> (axum::http::StatusCode, axum::Json<Value>) {
    if !authorized(&g, &headers) {
        return (axum::http::StatusCode::FORBIDDEN, axum::Json(json!({"errcode": "M_FORBIDDEN"})));
    }
    g.pings.lock().unwrap().push(body);
    (axum::http::StatusCode::OK, axum::Json(json!({})))
}

fn as_client(hearth: &str) -> Client {
    let mut c = Client::new(hearth);
    c.token = Some(AS_TOKEN.into());
    c
}

/// `GET /_matrix/app/v1/users/{userId}`: registers the user if it is one of ours.
async fn query_user(
    axum::extract::State(g): St,
    axum::extract::Path(user_id): axum::extract::Path<String>,
) -> axum::http::StatusCode {
    g.user_queries.lock().unwrap().push(user_id.clone());
    let hearth = g.hearth.lock().unwrap().clone().unwrap();
    let local = user_id.trim_start_matches('@').split(':').next().unwrap().to_owned();
    if !local.starts_with("bridge_") {
        return axum::http::StatusCode::NOT_FOUND;
    }
    let r = as_client(&hearth)
        .post("/register", json!({"type": "m.login.application_service", "username": local, "inhibit_login": true}))
        .await;
    if r.status == 200 {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::NOT_FOUND
    }
}

/// `GET /_matrix/app/v1/rooms/{alias}`: creates a room with that alias.
async fn query_alias(
    axum::extract::State(g): St,
    axum::extract::Path(alias): axum::extract::Path<String>,
) -> axum::http::StatusCode {
    g.alias_queries.lock().unwrap().push(alias.clone());
    let hearth = g.hearth.lock().unwrap().clone().unwrap();
    let local = alias.trim_start_matches('#').split(':').next().unwrap().to_owned();
    let r = as_client(&hearth).post("/createRoom", json!({"room_alias_name": local})).await;
    if r.status == 200 {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::NOT_FOUND
    }
}

/// Starts the scripted appservice; returns it and its URL.
async fn fake_as() -> (Arc<FakeAs>, String) {
    use axum::routing::{get, post, put};
    let g = Arc::new(FakeAs::default());
    let app = axum::Router::new()
        .route("/_matrix/app/v1/transactions/{txn}", put(transaction))
        .route("/_matrix/app/v1/ping", post(ping))
        .route("/_matrix/app/v1/users/{user_id}", get(query_user))
        .route("/_matrix/app/v1/rooms/{alias}", get(query_alias))
        .with_state(g.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (g, url)
}

impl FakeAs {
    /// Every event received, in order of arrival.
    fn events(&self) -> Vec<Value> {
        self.txns
            .lock()
            .unwrap()
            .iter()
            .flat_map(|(_, b)| b["events"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    fn event_ids(&self) -> Vec<String> {
        self.events().iter().filter_map(|e| e["event_id"].as_str().map(str::to_owned)).collect()
    }

    async fn wait_for_event(&self, event_id: &str) {
        wait_for(&format!("{event_id} at the appservice"), Duration::from_secs(15), || {
            self.event_ids().iter().any(|e| e == event_id)
        })
        .await
    }
}

fn registration(url: &str) -> String {
    format!(
        "id: bridge\nurl: {url}\nas_token: {AS_TOKEN}\nhs_token: {HS_TOKEN}\nsender_localpart: bridgebot\n\
         rate_limited: false\nprotocols: [fakenet]\nnamespaces:\n  users:\n    - exclusive: true\n      regex: '@bridge_.*'\n  \
         aliases:\n    - exclusive: true\n      regex: '#bridge_.*'\n  rooms: []\n"
    )
}

fn write_registration(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn with_appservice(file: PathBuf) -> impl FnOnce(&mut hearth::config::Config) {
    move |c| {
        c.appservice.registration_files = vec![file];
        c.appservice.retry_base_ms = 50;
        c.appservice.retry_max_ms = 200;
    }
}

#[tokio::test]
async fn broken_registrations_stop_the_start_naming_file_and_key() {
    init_crypto();
    let dir = tempfile::tempdir().unwrap();
    let good = registration("http://127.0.0.1:9");
    let cases = [
        ("regex.yaml", good.replace("'@bridge_.*'", "'@bridge_(.*'"), "namespaces.users[0].regex"),
        ("missing.yaml", good.replace(&format!("hs_token: {HS_TOKEN}\n"), ""), "hs_token"),
        ("broken.yaml", "id: [unclosed\n".to_owned(), "broken.yaml"),
    ];
    for (name, text, key) in cases {
        let file = write_registration(dir.path(), name, &text);
        let mut config = test_config(dir.path());
        config.appservice.registration_files = vec![file];
        let err = hearth::server::start(config).await.err().expect("the start fails").to_string();
        assert!(err.contains(name) && err.contains(key), "{name}: {err}");
    }
    // Two services with the same as_token.
    let a = write_registration(dir.path(), "a.yaml", &good);
    let b =
        write_registration(dir.path(), "b.yaml", &good.replace("id: bridge", "id: other").replace("bridgebot", "o"));
    let mut config = test_config(dir.path());
    config.appservice.registration_files = vec![a, b];
    let err = hearth::server::start(config).await.err().expect("the start fails").to_string();
    assert!(err.contains("b.yaml") && err.contains("as_token"), "{err}");
}

#[tokio::test]
async fn as_token_identity_assertion_registration_login_and_exclusive_namespaces() {
    let (g, url) = fake_as().await;
    let dir = tempfile::tempdir().unwrap();
    let file = write_registration(dir.path(), "bridge.yaml", &registration(&url));
    let server = TestServer::start_with(|c| {
        with_appservice(file)(c);
        c.limits.messages_per_second = 0.01;
        c.limits.messages_burst = 2;
    })
    .await;
    *g.hearth.lock().unwrap() = Some(server.base_url.clone());
    let bot = as_client(&server.base_url);
    let me = bot.get("/account/whoami").await.ok();
    assert_eq!(me["user_id"], server.user_id("bridgebot"), "the as_token is the sender");

    // Registering users of its namespace; none outside it.
    let r = bot.post("/register", json!({"type": "m.login.application_service", "username": "bridge_alice"})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.body["access_token"].is_string());
    bot.post("/register", json!({"type": "m.login.application_service", "username": "alice"}))
        .await
        .assert_err(400, "M_EXCLUSIVE");
    let anyone = server.client();
    anyone
        .post("/register", json!({"type": "m.login.application_service", "username": "bridge_x"}))
        .await
        .assert_err(401, "M_MISSING_TOKEN");
    // Nobody else may take a name of its exclusive namespace.
    let mut other = server.client();
    other.register("bridge_mallory", PASSWORD).await.assert_err(400, "M_EXCLUSIVE");
    anyone.get("/register/available?username=bridge_y").await.assert_err(400, "M_EXCLUSIVE");

    // Identity assertion.
    let alice_id = server.user_id("bridge_alice");
    let as_alice = bot.get(&format!("/account/whoami?user_id={}", enc(&alice_id))).await.ok();
    assert_eq!(as_alice["user_id"], alice_id);
    let carol = server.user("carol").await;
    bot.get(&format!("/account/whoami?user_id={}", enc(&carol.user_id))).await.assert_err(403, "M_EXCLUSIVE");
    bot.get(&format!("/account/whoami?user_id={}", enc(&server.user_id("bridge_nobody"))))
        .await
        .assert_err(403, "M_FORBIDDEN");

    // Logging in as one of its users.
    let login =
        json!({"type": "m.login.application_service", "identifier": {"type": "m.id.user", "user": "bridge_alice"}});
    let r = bot.post("/login", login.clone()).await.ok();
    assert_eq!(r["user_id"], alice_id);
    let mut logged_in = server.client();
    logged_in.token = r["access_token"].as_str().map(str::to_owned);
    assert_eq!(logged_in.get("/account/whoami").await.ok()["user_id"], alice_id);
    anyone.post("/login", login).await.assert_err(403, "M_FORBIDDEN");
    let outside = json!({"type": "m.login.application_service", "identifier": {"type": "m.id.user", "user": "carol"}});
    bot.post("/login", outside).await.assert_err(403, "M_EXCLUSIVE");

    // Aliases of its exclusive namespace are its own.
    let room = carol.create_room(json!({})).await;
    carol
        .put(&format!("/directory/room/{}", enc("#bridge_room:localhost")), json!({"room_id": room}))
        .await
        .assert_err(400, "M_EXCLUSIVE");
    carol.put(&format!("/directory/room/{}", enc("#carols:localhost")), json!({"room_id": room})).await.ok();

    // rate_limited: false: the bridge's users are not rate limited; carol is.
    let bot_room = bot.create_room(json!({})).await;
    for i in 0..5 {
        bot.send(&bot_room, "m.room.message", json!({"msgtype": "m.text", "body": format!("m{i}")})).await.ok();
    }
    let mut limited = false;
    for i in 0..5 {
        let r = carol.send(&room, "m.room.message", json!({"msgtype": "m.text", "body": format!("m{i}")})).await;
        limited |= r.status == 429;
    }
    assert!(limited, "carol is rate limited");
    assert_eq!(g.unauthorized.load(Ordering::SeqCst), 0);
    server.stop().await;
}

#[tokio::test]
async fn transactions_arrive_in_order_once_across_an_outage_and_a_restart() {
    let (g, url) = fake_as().await;
    let dir = tempfile::tempdir().unwrap();
    let file = write_registration(dir.path(), "bridge.yaml", &registration(&url));
    let server = TestServer::start_with(with_appservice(file.clone())).await;
    let bot = as_client(&server.base_url);
    bot.post("/register", json!({"type": "m.login.application_service", "username": "bridge_bob"})).await.ok();
    let bob_id = server.user_id("bridge_bob");
    let as_bob = |path: &str| format!("{path}?user_id={}", enc(&bob_id));

    // A room of a local user, joined by a bridged user: the bridge hears of everything in it.
    let alice = server.user("alice").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    let joined = bot.post(&as_bob(&format!("/rooms/{}/join", enc(&room))), json!({})).await.ok();
    assert_eq!(joined["room_id"], room);
    let first = alice.send_text(&room, "before the outage").await;
    g.wait_for_event(&first).await;
    // A room the bridge has nothing to do with: none of its events reach it.
    let private = alice.create_room(json!({})).await;
    let unrelated = alice.send_text(&private, "not for the bridge").await;

    // The bridge goes down; messages keep coming, and the server restarts meanwhile.
    g.down.store(true, Ordering::SeqCst);
    let mut during = Vec::new();
    for i in 0..3 {
        during.push(alice.send_text(&room, &format!("during the outage {i}")).await);
    }
    wait_for("failed attempts", Duration::from_secs(10), || {
        let ok = g.txns.lock().unwrap().len();
        g.attempts.lock().unwrap().len() >= ok + 2
    })
    .await;
    let TestServer { running, dir: server_dir, .. } = server;
    running.stop().await;
    let mut config = test_config(server_dir.path());
    with_appservice(file)(&mut config);
    let running = hearth::server::start(config).await.expect("restarts");
    let alice = alice.at(&format!("http://{}", running.client_addr));
    let after = alice.send_text(&room, "after the restart").await;
    g.down.store(false, Ordering::SeqCst);
    g.wait_for_event(&after).await;

    let ids = g.event_ids();
    let pos = |id: &str| ids.iter().position(|e| e == id).unwrap_or_else(|| panic!("{id} missing from {ids:?}"));
    let mut order = vec![pos(&first)];
    order.extend(during.iter().map(|e| pos(e)));
    order.push(pos(&after));
    assert!(order.windows(2).all(|w| w[0] < w[1]), "in order: {order:?}");
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "nothing delivered twice: {ids:?}");
    assert!(!ids.contains(&unrelated), "events of rooms without the bridge's users stay out");
    // A failed transaction was retried with the same txn id (before and after the restart).
    let attempts = g.attempts.lock().unwrap().clone();
    let accepted: Vec<String> = g.txns.lock().unwrap().iter().map(|(t, _)| t.clone()).collect();
    let retried = accepted.iter().any(|t| attempts.iter().filter(|a| *a == t).count() > 1);
    assert!(retried, "a transaction was retried under its own id: attempts {attempts:?}, accepted {accepted:?}");
    let mut sorted = accepted.clone();
    sorted.sort_by_key(|t| t.parse::<u64>().unwrap());
    assert_eq!(sorted, accepted, "transactions accepted in id order");
    // Events are in the client format.
    let ev = g.events().into_iter().find(|e| e["event_id"] == first).unwrap();
    assert_eq!(ev["room_id"], room);
    assert_eq!(ev["content"]["body"], "before the outage");
    assert!(ev.get("signatures").is_none() && ev.get("auth_events").is_none(), "{ev}");
    assert_eq!(g.unauthorized.load(Ordering::SeqCst), 0, "every request carried the hs_token");
    running.stop().await;
}

#[tokio::test]
async fn users_and_aliases_are_queried_on_demand_and_the_ping_reaches_the_service() {
    let (g, url) = fake_as().await;
    let dir = tempfile::tempdir().unwrap();
    let file = write_registration(dir.path(), "bridge.yaml", &registration(&url));
    let server = TestServer::start_with(with_appservice(file)).await;
    *g.hearth.lock().unwrap() = Some(server.base_url.clone());
    let alice = server.user("alice").await;

    // An unknown user of the namespace: the bridge is asked and creates it.
    let bridged = server.user_id("bridge_dave");
    let profile = alice.get(&format!("/profile/{}", enc(&bridged))).await.ok();
    assert_eq!(profile["displayname"], "bridge_dave");
    assert_eq!(g.user_queries.lock().unwrap().clone(), vec![bridged]);
    // Outside the namespace nobody is asked.
    alice.get(&format!("/profile/{}", enc(&server.user_id("nobody")))).await.assert_err(404, "M_NOT_FOUND");
    assert_eq!(g.user_queries.lock().unwrap().len(), 1);

    // An unknown alias of the namespace: the bridge creates the room.
    let alias = "#bridge_chan:localhost";
    let r = alice.get(&format!("/directory/room/{}", enc(alias))).await.ok();
    assert!(r["room_id"].as_str().is_some_and(|id| id.starts_with('!')), "{r}");
    assert_eq!(g.alias_queries.lock().unwrap().clone(), vec![alias.to_owned()]);

    // The ping goes through to the service with the transaction id.
    let bot = as_client(&server.base_url);
    let r = bot.post("/_matrix/client/v1/appservice/bridge/ping", json!({"transaction_id": "p1"})).await.ok();
    assert!(r["duration_ms"].is_u64(), "{r}");
    assert_eq!(g.pings.lock().unwrap().clone(), vec![json!({"transaction_id": "p1"})]);
    alice.post("/_matrix/client/v1/appservice/bridge/ping", json!({})).await.assert_err(403, "M_FORBIDDEN");
    bot.post("/_matrix/client/v1/appservice/other/ping", json!({})).await.assert_err(403, "M_FORBIDDEN");

    // Third-party protocols come from the registrations; the network directory takes the bridge's rooms.
    let protocols = alice.get("/thirdparty/protocols").await.ok();
    assert!(protocols["fakenet"]["instances"].is_array(), "{protocols}");
    alice.get("/thirdparty/protocol/nothing").await.assert_err(404, "M_NOT_FOUND");
    let room = alice.create_room(json!({})).await;
    bot.put(&format!("/directory/list/appservice/fakenet/{}", enc(&room)), json!({"visibility": "public"})).await.ok();
    alice
        .put(&format!("/directory/list/appservice/fakenet/{}", enc(&room)), json!({"visibility": "public"}))
        .await
        .assert_err(403, "M_FORBIDDEN");
    server.stop().await;
}

#[test]
fn the_cli_lists_and_checks_registrations() {
    let dir = tempfile::tempdir().unwrap();
    let good = write_registration(dir.path(), "bridge.yaml", &registration("http://127.0.0.1:9"));
    let bad =
        write_registration(dir.path(), "bad.yaml", &registration("http://127.0.0.1:9").replace("'@bridge_.*'", "'('"));
    let run = |args: &[&str], files: &str| {
        std::process::Command::new(hearth_bin())
            .args(args)
            .current_dir(dir.path())
            .env("HEARTH_SERVER_NAME", "hs.example")
            .env("HEARTH_APPSERVICE__REGISTRATION_FILES", files)
            .output()
            .unwrap()
    };
    let files = format!("[\"{}\"]", good.display());
    let o = run(&["appservice", "list"], &files);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && out.contains("bridge: url http://127.0.0.1:9, sender @bridgebot:hs.example"),
        "{out}"
    );
    let o = run(&["appservice", "check", good.to_str().unwrap()], "[]");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(&["appservice", "check", bad.to_str().unwrap()], "[]");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("bad.yaml") && err.contains("namespaces.users[0].regex"), "{err}");
    // The same file twice beside the configured one: a duplicate id.
    let copy = write_registration(dir.path(), "copy.yaml", &registration("http://127.0.0.1:9"));
    let o = run(&["appservice", "check", copy.to_str().unwrap()], &files);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("copy.yaml") && err.contains("key `id`"), "{err}");
    let o = run(&["config", "check"], &format!("[\"{}\"]", bad.display()));
    assert_eq!(o.status.code(), Some(2), "config check refuses a broken registration");
}

#[tokio::test]
async fn an_appservice_may_set_the_timestamp_of_its_events() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_registration(dir.path(), "bridge.yaml", &registration("http://127.0.0.1:9"));
    let server = TestServer::start_with(with_appservice(file)).await;
    let bot = as_client(&server.base_url);
    let room = bot.create_room(json!({})).await;
    let path = format!("/rooms/{}/send/m.room.message/t1?ts=1000000", enc(&room));
    let id =
        bot.put(&path, json!({"msgtype": "m.text", "body": "old"})).await.ok()["event_id"].as_str().unwrap().to_owned();
    assert_eq!(bot.event(&room, &id).await.ok()["origin_server_ts"], 1000000);
    // Anyone else's `ts` is ignored.
    let alice = server.user("alice").await;
    let room = alice.create_room(json!({})).await;
    let path = format!("/rooms/{}/send/m.room.message/t1?ts=1000000", enc(&room));
    let id = alice.put(&path, json!({"msgtype": "m.text", "body": "now"})).await.ok()["event_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(alice.event(&room, &id).await.ok()["origin_server_ts"], 1000000);
    server.stop().await;
}

impl FakeAs {
    /// Every value under `key` (an array per transaction) received, in order.
    fn all_of(&self, key: &str) -> Vec<Value> {
        self.txns.lock().unwrap().iter().flat_map(|(_, b)| b[key].as_array().cloned().unwrap_or_default()).collect()
    }

    /// The transaction bodies received so far.
    fn bodies(&self) -> Vec<Value> {
        self.txns.lock().unwrap().iter().map(|(_, b)| b.clone()).collect()
    }

    async fn wait_body(&self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        wait_until(&format!("{what} at the appservice"), Duration::from_secs(15), || {
            std::future::ready(self.bodies().into_iter().find(|b| f(b)))
        })
        .await
    }
}

/// The registration with MSC2409 (`receive_ephemeral`, here by its unstable name) and MSC3202 switched on.
fn registration_ephemeral(url: &str) -> String {
    registration(url) + "de.sorunome.msc2409.push_ephemeral: true\norg.matrix.msc3202: true\n"
}

#[tokio::test]
async fn ephemeral_events_to_device_and_msc3202_reach_a_service_that_asks_and_survive_a_restart() {
    let (g, url) = fake_as().await;
    let dir = tempfile::tempdir().unwrap();
    let file = write_registration(dir.path(), "bridge.yaml", &registration_ephemeral(&url));
    let server = TestServer::start_with(with_appservice(file.clone())).await;
    let bot = as_client(&server.base_url);
    // A bridged user with a device (the registration logs it in).
    let reg =
        bot.post("/register", json!({"type": "m.login.application_service", "username": "bridge_bob"})).await.ok();
    let (bob_id, bob_device) =
        (reg["user_id"].as_str().unwrap().to_owned(), reg["device_id"].as_str().unwrap().to_owned());
    let mut bob = Client::new(&server.base_url);
    bob.token = Some(reg["access_token"].as_str().unwrap().to_owned());
    let alice = server.user("alice").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    bob.join(&room).await.ok();

    // Typing, a receipt and presence of a user sharing a room with the bridge's user: ephemeral.
    alice
        .put(
            &format!("/rooms/{}/typing/{}", enc(&room), enc(&alice.user_id)),
            json!({"typing": true, "timeout": 30000}),
        )
        .await
        .ok();
    let typing = g
        .wait_body("m.typing", |b| b["ephemeral"].as_array().into_iter().flatten().any(|e| e["type"] == "m.typing"))
        .await;
    let ev = typing["ephemeral"].as_array().unwrap().iter().find(|e| e["type"] == "m.typing").unwrap().clone();
    assert_eq!(ev["room_id"], room);
    assert_eq!(ev["content"]["user_ids"], json!([alice.user_id]));
    assert_eq!(typing["de.sorunome.msc2409.ephemeral"], typing["ephemeral"], "the unstable name too");
    let msg = alice.send_text(&room, "read me").await;
    alice.post(&format!("/rooms/{}/receipt/m.read/{}", enc(&room), enc(&msg)), json!({})).await.ok();
    let receipt = g
        .wait_body("m.receipt", |b| b["ephemeral"].as_array().into_iter().flatten().any(|e| e["type"] == "m.receipt"))
        .await;
    let ev = receipt["ephemeral"].as_array().unwrap().iter().find(|e| e["type"] == "m.receipt").unwrap().clone();
    assert_eq!(ev["room_id"], room);
    assert!(ev["content"][&msg]["m.read"][&alice.user_id]["ts"].is_i64(), "{ev}");
    alice
        .put(&format!("/presence/{}/status", enc(&alice.user_id)), json!({"presence": "online", "status_msg": "here"}))
        .await
        .ok();
    g.wait_body("m.presence", |b| {
        b["ephemeral"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["type"] == "m.presence" && e["sender"] == alice.user_id && e["content"]["status_msg"] == "here")
    })
    .await;
    // A private receipt stays out.
    alice.post(&format!("/rooms/{}/receipt/m.read.private/{}", enc(&room), enc(&msg)), json!({})).await.ok();

    // MSC3202: the bridged user's one-time keys are counted, and a device list change of alice is announced.
    let keys = json!({"signed_curve25519:AAAA": {"key": "k1"}, "signed_curve25519:AAAB": {"key": "k2"}});
    bob.post("/keys/upload", json!({"one_time_keys": keys})).await.ok();
    alice
        .post(
            "/keys/upload",
            json!({"device_keys": {"user_id": alice.user_id, "device_id": alice.device_id,
            "algorithms": ["m.olm.v1.curve25519-aes-sha2"], "keys": {format!("ed25519:{}", alice.device_id): "x"},
            "signatures": {}}}),
        )
        .await
        .ok();
    let lists = g
        .wait_body("device_lists", |b| {
            b["device_lists"]["changed"].as_array().is_some_and(|c| c.contains(&json!(alice.user_id)))
        })
        .await;
    assert_eq!(lists["org.matrix.msc3202.device_lists"], lists["device_lists"]);
    // Key counts come for the service's users a transaction mentions (here bob, sending).
    let said = bob.send_text(&room, "bob speaks").await;
    let counts = g
        .wait_body("bob's message", |b| b["events"].as_array().into_iter().flatten().any(|e| e["event_id"] == said))
        .await;
    let counted = counts["device_one_time_keys_count"][&bob_id][&bob_device]["signed_curve25519"].clone();
    assert_eq!(counted, 2, "{counts}");
    assert_eq!(counts["org.matrix.msc3202.device_one_time_keys_count"], counts["device_one_time_keys_count"]);
    assert!(counts["org.matrix.msc3202.device_unused_fallback_key_types"][&bob_id][&bob_device].is_array(), "{counts}");

    // To-device messages for the bridge's users: durable across an outage and a restart, delivered once.
    g.down.store(true, Ordering::SeqCst);
    let sent = alice
        .put(
            "/sendToDevice/m.room_key_request/td1",
            json!({"messages": {&bob_id: {&bob_device: {"action": "request", "n": 1}}}}),
        )
        .await;
    assert_eq!(sent.status, 200, "{}", sent.text);
    wait_for("a failed attempt", Duration::from_secs(10), || {
        g.attempts.lock().unwrap().len() > g.txns.lock().unwrap().len()
    })
    .await;
    let TestServer { running, dir: server_dir, .. } = server;
    running.stop().await;
    let mut config = test_config(server_dir.path());
    with_appservice(file)(&mut config);
    let running = hearth::server::start(config).await.expect("restarts");
    let alice = alice.at(&format!("http://{}", running.client_addr));
    g.down.store(false, Ordering::SeqCst);
    let td = wait_until("the to-device message", Duration::from_secs(15), || {
        std::future::ready(g.all_of("to_device").into_iter().find(|m| m["content"]["n"] == 1))
    })
    .await;
    assert_eq!(td["type"], "m.room_key_request");
    assert_eq!(td["sender"], alice.user_id);
    assert_eq!(td["to_user_id"], bob_id);
    assert_eq!(td["to_device_id"], bob_device);
    // Once only, and under the unstable name too.
    let after = alice.send_text(&room, "after").await;
    g.wait_for_event(&after).await;
    assert_eq!(g.all_of("to_device").iter().filter(|m| m["content"]["n"] == 1).count(), 1);
    assert_eq!(g.all_of("de.sorunome.msc2409.to_device"), g.all_of("to_device"));
    assert!(
        !g.all_of("ephemeral").iter().any(|e| e["type"] == "m.receipt" && e.to_string().contains("m.read.private")),
        "private receipts stay out"
    );

    // Alice leaves the only room she shares with the bridge's user: she is `left`.
    alice.leave(&room).await.ok();
    g.wait_body("device_lists.left", |b| {
        b["device_lists"]["left"].as_array().is_some_and(|l| l.contains(&json!(alice.user_id)))
    })
    .await;
    running.stop().await;
}

#[tokio::test]
async fn a_service_without_receive_ephemeral_gets_no_ephemeral_events() {
    let (g, url) = fake_as().await;
    let dir = tempfile::tempdir().unwrap();
    let file = write_registration(dir.path(), "bridge.yaml", &registration(&url));
    let server = TestServer::start_with(with_appservice(file)).await;
    let bot = as_client(&server.base_url);
    let reg =
        bot.post("/register", json!({"type": "m.login.application_service", "username": "bridge_bob"})).await.ok();
    let (bob_id, bob_device) =
        (reg["user_id"].as_str().unwrap().to_owned(), reg["device_id"].as_str().unwrap().to_owned());
    let alice = server.user("alice").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    bot.post(&format!("/rooms/{}/join?user_id={}", enc(&room), enc(&bob_id)), json!({})).await.ok();
    alice
        .put(
            &format!("/rooms/{}/typing/{}", enc(&room), enc(&alice.user_id)),
            json!({"typing": true, "timeout": 30000}),
        )
        .await
        .ok();
    alice.put("/sendToDevice/m.test/t1", json!({"messages": {&bob_id: {&bob_device: {"n": 1}}}})).await.ok();
    let last = alice.send_text(&room, "last").await;
    g.wait_for_event(&last).await;
    for b in g.bodies() {
        assert_eq!(b["ephemeral"], json!([]), "{b}");
        assert!(b.get("to_device").is_none() && b.get("device_lists").is_none(), "{b}");
    }
    server.stop().await;
}

#[tokio::test]
async fn network_directories_are_read_by_public_rooms() {
    let (_g, url) = fake_as().await;
    let dir = tempfile::tempdir().unwrap();
    let file = write_registration(dir.path(), "bridge.yaml", &registration(&url));
    let server = TestServer::start_with(with_appservice(file)).await;
    let bot = as_client(&server.base_url);
    let alice = server.user("alice").await;
    let main = alice.create_room(json!({"preset": "public_chat", "visibility": "public", "name": "main"})).await;
    let bridged = alice.create_room(json!({"preset": "public_chat", "name": "bridged"})).await;
    let r =
        bot.put(&format!("/directory/list/appservice/libera/{}", enc(&bridged)), json!({"visibility": "public"})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let ids = |v: &Value| -> Vec<String> {
        v["chunk"].as_array().unwrap().iter().map(|e| e["room_id"].as_str().unwrap().to_owned()).collect()
    };
    let plain = alice.get("/publicRooms").await.ok();
    assert_eq!(ids(&plain), vec![main.clone()], "the main directory only");
    let net = alice.post("/publicRooms", json!({"third_party_instance_id": "bridge|libera"})).await.ok();
    assert_eq!(ids(&net), vec![bridged.clone()]);
    assert_eq!(net["chunk"][0]["name"], "bridged");
    let get = alice.get(&format!("/publicRooms?third_party_instance_id={}", enc("bridge|libera"))).await.ok();
    assert_eq!(ids(&get), vec![bridged.clone()]);
    let mut all = ids(&alice.post("/publicRooms", json!({"include_all_networks": true})).await.ok());
    all.sort();
    let mut want = vec![main.clone(), bridged.clone()];
    want.sort();
    assert_eq!(all, want, "every network and the main directory");
    let other = alice.post("/publicRooms", json!({"third_party_instance_id": "bridge|oftc"})).await.ok();
    assert!(ids(&other).is_empty());
    alice
        .post("/publicRooms", json!({"third_party_instance_id": "bridge|libera", "include_all_networks": true}))
        .await
        .assert_err(400, "M_INVALID_PARAM");
    alice.post("/publicRooms", json!({"third_party_instance_id": "libera"})).await.assert_err(400, "M_INVALID_PARAM");
    // Withdrawn: gone from the network's directory.
    bot.put(&format!("/directory/list/appservice/libera/{}", enc(&bridged)), json!({"visibility": "private"}))
        .await
        .ok();
    let net = alice.post("/publicRooms", json!({"third_party_instance_id": "bridge|libera"})).await.ok();
    assert!(ids(&net).is_empty());
    server.stop().await;
}

#[tokio::test]
async fn an_appservice_registration_may_ask_for_a_refresh_token() {
    let (_g, url) = fake_as().await;
    let dir = tempfile::tempdir().unwrap();
    let file = write_registration(dir.path(), "bridge.yaml", &registration(&url));
    let server = TestServer::start_with(with_appservice(file)).await;
    let bot = as_client(&server.base_url);
    let reg = bot
        .post(
            "/register",
            json!({"type": "m.login.application_service", "username": "bridge_carol", "refresh_token": true}),
        )
        .await
        .ok();
    let refresh = reg["refresh_token"].as_str().expect("a refresh token").to_owned();
    let renewed = server.client().post("/refresh", json!({"refresh_token": refresh})).await.ok();
    let mut carol = server.client();
    carol.token = Some(renewed["access_token"].as_str().unwrap().to_owned());
    assert_eq!(carol.get("/account/whoami").await.ok()["user_id"], server.user_id("bridge_carol"));
    // Without asking: none (and inhibit_login: no token at all).
    let plain =
        bot.post("/register", json!({"type": "m.login.application_service", "username": "bridge_dan"})).await.ok();
    assert!(plain.get("refresh_token").is_none() && plain["access_token"].is_string(), "{plain}");
    server.stop().await;
}

#[tokio::test]
async fn another_server_reads_a_network_directory_over_federation() {
    use common::fake_resident::{start_hearth_with_fakes, FakeResident, RoomSpec};
    let (_g, url) = fake_as().await;
    let dir = tempfile::tempdir().unwrap();
    let file = write_registration(dir.path(), "bridge.yaml", &registration(&url));
    let fake = FakeResident::start(RoomSpec { members: 0, messages: 0, ..RoomSpec::default() }).await;
    let server = start_hearth_with_fakes(&[&fake], with_appservice(file)).await;
    let bot = as_client(&server.base_url);
    let alice = server.user("alice").await;
    let main = alice.create_room(json!({"preset": "public_chat", "visibility": "public", "name": "main"})).await;
    let bridged = alice.create_room(json!({"preset": "public_chat", "name": "bridged on libera"})).await;
    bot.put(&format!("/directory/list/appservice/libera/{}", enc(&bridged)), json!({"visibility": "public"}))
        .await
        .ok();
    let ids = |v: &Value| -> Vec<String> {
        v["chunk"].as_array().unwrap().iter().map(|e| e["room_id"].as_str().unwrap().to_owned()).collect()
    };
    let get = |q: String| {
        let fake = &fake;
        async move {
            fake.request_hearth(reqwest::Method::GET, &format!("/_matrix/federation/v1/publicRooms{q}"), None).await
        }
    };
    assert_eq!(ids(&get(String::new()).await.unwrap()), vec![main.clone()]);
    let net = get(format!("?third_party_instance_id={}", enc("bridge|libera"))).await.unwrap();
    assert_eq!(ids(&net), vec![bridged.clone()]);
    assert_eq!(net["chunk"][0]["name"], "bridged on libera");
    assert_eq!(ids(&get("?include_all_networks=true".into()).await.unwrap()).len(), 2);
    let post = |body: Value| {
        let fake = &fake;
        async move { fake.request_hearth(reqwest::Method::POST, "/_matrix/federation/v1/publicRooms", Some(&body)).await }
    };
    let found = post(json!({"third_party_instance_id": "bridge|libera", "filter": {"generic_search_term": "LIBERA"}}))
        .await
        .unwrap();
    assert_eq!(ids(&found), vec![bridged.clone()]);
    let none = post(json!({"include_all_networks": true, "filter": {"generic_search_term": "nowhere"}})).await.unwrap();
    assert!(ids(&none).is_empty());
    let err =
        post(json!({"third_party_instance_id": "bridge|libera", "include_all_networks": true})).await.unwrap_err();
    assert_eq!((err.0, err.1["errcode"].as_str()), (400, Some("M_INVALID_PARAM")));
    server.stop().await;
}
