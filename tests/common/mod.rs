//! Shared helpers for Hearth's integration tests.
//!
//! * [`TestServer`] starts a real server **in-process** on `127.0.0.1:0` with its database in a fresh temporary
//!   directory. Tweak its [`Config`] with [`TestServer::start_with`].
//! * [`Client`] is a tiny client-server API client over reqwest. Every call returns a [`Resp`] (`status` + JSON
//!   `body`), so a test can assert on errors as easily as on successes. Paths are relative to
//!   `/_matrix/client/v3` unless they start with `/_matrix/` or `/.well-known/`.
//! * [`BinServer`] runs the compiled `hearth` binary as a child process (crash and end-to-end tests).
//!
//! ```ignore
//! mod common;
//! use common::*;
//!
//! #[tokio::test]
//! async fn hello() {
//!     let server = TestServer::start().await;
//!     let alice = server.user("alice").await;          // registered and logged in
//!     let room = alice.create_room(json!({"name": "Test"})).await;
//!     let event_id = alice.send_text(&room, "hi").await;
//!     let sync = alice.sync(None, &[]).await;
//!     assert_eq!(sync.status, 200);
//!     server.stop().await;
//! }
//! ```
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hearth::config::Config;
use hearth::server::Running;
pub use serde_json::{json, Value};

pub mod fake_resident;

/// The password every helper-created user gets.
pub const PASSWORD: &str = "correct horse battery staple";

/// Installs rustls' crypto provider once (reqwest is built without one).
pub fn init_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A test configuration: database in `dir`, client listener on a free loopback port, registration open,
/// generous message, registration, login and join rates (tests send bursts from one address; the failed-login limit
/// stays as configured by default), server name `localhost`.
pub fn test_config(dir: &Path) -> Config {
    let mut config = Config { server_name: "localhost".into(), ..Config::default() };
    config.listen.client = "127.0.0.1:0".parse().unwrap();
    config.database.path = dir.join("hearth.db");
    config.registration.enabled = true;
    config.limits.messages_per_second = 1000.0;
    config.limits.messages_burst = 1000;
    config.limits.registrations_per_second = 1000.0;
    config.limits.registrations_burst = 1000;
    config.limits.logins_per_second = 1000.0;
    config.limits.logins_burst = 1000;
    config.limits.joins_per_second = 1000.0;
    config.limits.joins_burst = 1000;
    config.federation.enabled = false;
    config
}

/// A server running inside the test process. Dropping it without [`TestServer::stop`] is fine too
/// (the runtime going away ends the listener); stop it to also check a clean shutdown.
pub struct TestServer {
    pub running: Running,
    /// `http://127.0.0.1:PORT`
    pub base_url: String,
    pub server_name: String,
    /// The database file (inside `dir`).
    pub db_path: PathBuf,
    pub dir: tempfile::TempDir,
}

impl TestServer {
    /// Starts a server with [`test_config`].
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    /// Starts a server with [`test_config`] changed by `f` (e.g. `|c| c.registration.token = Some("t".into())`).
    pub async fn start_with(f: impl FnOnce(&mut Config)) -> TestServer {
        init_crypto();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = test_config(dir.path());
        f(&mut config);
        let server_name = config.server_name.clone();
        let db_path = config.database.path.clone();
        let running = hearth::server::start(config).await.expect("server starts");
        let base_url = format!("http://{}", running.client_addr);
        TestServer { running, base_url, server_name, db_path, dir }
    }

    /// An anonymous client (no access token).
    pub fn client(&self) -> Client {
        Client::new(&self.base_url)
    }

    /// Registers `localpart` with [`PASSWORD`] (completing UIA with `m.login.dummy`) and returns its client.
    /// Needs `registration.enabled` and no registration token (the default of [`test_config`]).
    pub async fn user(&self, localpart: &str) -> Client {
        let mut c = self.client();
        let r = c.register(localpart, PASSWORD).await;
        assert_eq!(r.status, 200, "registering {localpart}: {}", r.body);
        c
    }

    /// Full user id for a localpart on this server.
    pub fn user_id(&self, localpart: &str) -> String {
        format!("@{localpart}:{}", self.server_name)
    }

    pub async fn stop(self) {
        self.running.stop().await;
    }
}

/// A response: HTTP status and the JSON body (`Value::Null` when the body is empty or not JSON;
/// the raw text is kept in `text`).
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub body: Value,
    pub text: String,
}

impl Resp {
    /// The `errcode` of an error body ("" if none).
    pub fn errcode(&self) -> &str {
        self.body["errcode"].as_str().unwrap_or("")
    }

    /// Panics with the body unless the status is 200; returns the body.
    #[track_caller]
    pub fn ok(self) -> Value {
        assert_eq!(self.status, 200, "expected 200, got {}: {}", self.status, self.text);
        self.body
    }

    /// Panics unless status and errcode match.
    #[track_caller]
    pub fn assert_err(&self, status: u16, errcode: &str) {
        assert_eq!((self.status, self.errcode()), (status, errcode), "unexpected response: {}", self.text);
    }
}

/// Percent-encodes one path segment or query value (everything but RFC 3986 unreserved characters).
pub fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Builds `?k=v&...` with values percent-encoded ("" when empty).
pub fn query(params: &[(&str, &str)]) -> String {
    if params.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = params.iter().map(|(k, v)| format!("{}={}", enc(k), enc(v))).collect();
    format!("?{}", parts.join("&"))
}

/// A client-server API client. `token`, `user_id` and `device_id` are set by [`Client::register`] and
/// [`Client::login`]; set `token` by hand to test bad tokens.
#[derive(Clone)]
pub struct Client {
    pub http: reqwest::Client,
    pub base_url: String,
    pub token: Option<String>,
    pub user_id: String,
    pub device_id: String,
    txn: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Client {
    pub fn new(base_url: &str) -> Client {
        init_crypto();
        let http = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().expect("reqwest client");
        Client {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            token: None,
            user_id: String::new(),
            device_id: String::new(),
            txn: Default::default(),
        }
    }

    /// The same server, without a token (for logging in as someone else).
    pub fn anonymous(&self) -> Client {
        Client::new(&self.base_url)
    }

    pub fn url(&self, path: &str) -> String {
        if path.starts_with("/_matrix/") || path.starts_with("/.well-known/") {
            format!("{}{path}", self.base_url)
        } else {
            format!("{}/_matrix/client/v3{path}", self.base_url)
        }
    }

    /// The same user and token against another address (e.g. a restarted server on a new port).
    pub fn at(&self, base_url: &str) -> Client {
        let mut c = self.clone();
        c.base_url = base_url.trim_end_matches('/').to_owned();
        c
    }

    /// Sends a request with an optional JSON body (and the access token, if any). Panics if the HTTP exchange
    /// itself fails (connection refused, ...); see [`Client::try_request`].
    pub async fn request(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> Resp {
        self.try_request(method, path, body).await.expect("HTTP request failed")
    }

    /// Like [`Client::request`] but returns transport errors instead of panicking (for tests that kill servers).
    pub async fn try_request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Resp, reqwest::Error> {
        let mut req = self.http.request(method, self.url(path));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let res = req.send().await?;
        let status = res.status().as_u16();
        let text = res.text().await?;
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(Resp { status, body, text })
    }

    /// Sends a raw body (for malformed-JSON tests).
    pub async fn request_raw(&self, method: reqwest::Method, path: &str, body: impl Into<reqwest::Body>) -> Resp {
        let mut req = self.http.request(method, self.url(path)).header("content-type", "application/json").body(body);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        Self::finish(req).await
    }

    async fn finish(req: reqwest::RequestBuilder) -> Resp {
        let res = req.send().await.expect("HTTP request failed");
        let status = res.status().as_u16();
        let text = res.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Resp { status, body, text }
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.request(reqwest::Method::GET, path, None).await
    }
    pub async fn post(&self, path: &str, body: Value) -> Resp {
        self.request(reqwest::Method::POST, path, Some(&body)).await
    }
    pub async fn put(&self, path: &str, body: Value) -> Resp {
        self.request(reqwest::Method::PUT, path, Some(&body)).await
    }
    pub async fn delete(&self, path: &str, body: Value) -> Resp {
        self.request(reqwest::Method::DELETE, path, Some(&body)).await
    }

    /// A fresh transaction id, unique per client.
    pub fn next_txn(&self) -> String {
        format!("t{}", self.txn.fetch_add(1, std::sync::atomic::Ordering::SeqCst))
    }

    // ---- accounts -------------------------------------------------------------------------------------------

    /// `POST /register` with `m.login.dummy` UIA (first the 401 challenge, then the dummy stage with its session).
    /// On success stores token, user id and device id in `self`.
    pub async fn register(&mut self, username: &str, password: &str) -> Resp {
        let first = self.post("/register", json!({"username": username, "password": password})).await;
        if first.status != 401 {
            return first;
        }
        let session = first.body["session"].clone();
        let r = self
            .post("/register", json!({"username": username, "password": password, "auth": {"type": "m.login.dummy", "session": session}}))
            .await;
        self.adopt(&r);
        r
    }

    /// `POST /login` with `m.login.password` and an `m.id.user` identifier (localpart or full id).
    /// On success stores token, user id and device id in `self`.
    pub async fn login(&mut self, user: &str, password: &str) -> Resp {
        let r = self
            .post("/login", json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user}, "password": password}))
            .await;
        self.adopt(&r);
        r
    }

    fn adopt(&mut self, r: &Resp) {
        if r.status == 200 {
            if let Some(t) = r.body["access_token"].as_str() {
                self.token = Some(t.to_owned());
            }
            self.user_id = r.body["user_id"].as_str().unwrap_or_default().to_owned();
            self.device_id = r.body["device_id"].as_str().unwrap_or_default().to_owned();
        }
    }

    // ---- rooms ----------------------------------------------------------------------------------------------

    /// `POST /createRoom`; panics unless 200; returns the room id.
    pub async fn create_room(&self, body: Value) -> String {
        let b = self.post("/createRoom", body).await.ok();
        b["room_id"].as_str().expect("room_id").to_owned()
    }

    /// `POST /join/{room_id_or_alias}`.
    pub async fn join(&self, room: &str) -> Resp {
        self.post(&format!("/join/{}", enc(room)), json!({})).await
    }

    pub async fn leave(&self, room: &str) -> Resp {
        self.post(&format!("/rooms/{}/leave", enc(room)), json!({})).await
    }

    pub async fn invite(&self, room: &str, user_id: &str) -> Resp {
        self.post(&format!("/rooms/{}/invite", enc(room)), json!({"user_id": user_id})).await
    }

    /// `PUT /rooms/{room}/send/{type}/{txn}` with a fresh txn id.
    pub async fn send(&self, room: &str, event_type: &str, content: Value) -> Resp {
        let txn = self.next_txn();
        self.send_txn(room, event_type, &txn, content).await
    }

    pub async fn send_txn(&self, room: &str, event_type: &str, txn: &str, content: Value) -> Resp {
        self.put(&format!("/rooms/{}/send/{}/{}", enc(room), enc(event_type), enc(txn)), content).await
    }

    /// Sends an `m.text` message; panics unless 200; returns the event id.
    pub async fn send_text(&self, room: &str, text: &str) -> String {
        let b = self.send(room, "m.room.message", json!({"msgtype": "m.text", "body": text})).await.ok();
        b["event_id"].as_str().expect("event_id").to_owned()
    }

    /// `GET /rooms/{room}/state/{type}/{state_key}`.
    pub async fn state(&self, room: &str, event_type: &str, state_key: &str) -> Resp {
        self.get(&format!("/rooms/{}/state/{}/{}", enc(room), enc(event_type), enc(state_key))).await
    }

    /// `PUT /rooms/{room}/state/{type}/{state_key}`.
    pub async fn put_state(&self, room: &str, event_type: &str, state_key: &str, content: Value) -> Resp {
        self.put(&format!("/rooms/{}/state/{}/{}", enc(room), enc(event_type), enc(state_key)), content).await
    }

    /// `GET /rooms/{room}/event/{event_id}`.
    pub async fn event(&self, room: &str, event_id: &str) -> Resp {
        self.get(&format!("/rooms/{}/event/{}", enc(room), enc(event_id))).await
    }

    /// `GET /rooms/{room}/messages` with extra query parameters (`dir` is required by the API).
    pub async fn messages(&self, room: &str, params: &[(&str, &str)]) -> Resp {
        self.get(&format!("/rooms/{}/messages{}", enc(room), query(params))).await
    }

    // ---- sync -----------------------------------------------------------------------------------------------

    /// `GET /sync` with an optional `since` token and extra query parameters (`timeout`, `filter`, `full_state`).
    /// `timeout` defaults to 0 so incremental syncs return at once.
    pub async fn sync(&self, since: Option<&str>, params: &[(&str, &str)]) -> Resp {
        let mut p: Vec<(&str, &str)> = Vec::new();
        if let Some(s) = since {
            p.push(("since", s));
        }
        if !params.iter().any(|(k, _)| *k == "timeout") {
            p.push(("timeout", "0"));
        }
        p.extend_from_slice(params);
        self.get(&format!("/sync{}", query(&p))).await
    }
}

// ---- waiting ------------------------------------------------------------------------------------------------

/// The one wait-until helper of the test suite: polls `f` (every 20 ms) until it returns `Some`, and returns that
/// value; panics with `what` after `timeout`. Use it to wait for an observable event (a request reaching a fake,
/// a job ending, the outbox draining) instead of sleeping for a fixed time.
pub async fn wait_until<T, Fut>(what: &str, timeout: Duration, mut f: impl FnMut() -> Fut) -> T
where
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// [`wait_until`] for a plain condition.
pub async fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    wait_until(what, timeout, || std::future::ready(cond().then_some(()))).await
}

/// Rows in Hearth's federation outbox (PDUs and EDUs not yet delivered) for `destinations` (all when empty), read
/// from the database file.
pub fn outbox_depth(db_path: &Path, destinations: &[&str]) -> i64 {
    let conn = rusqlite::Connection::open_with_flags(db_path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open the database");
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let rows: Vec<String> = {
        let mut stmt = conn.prepare("SELECT destination FROM outbox").expect("read the outbox");
        let rows = stmt.query_map([], |r| r.get(0)).expect("read the outbox");
        rows.collect::<rusqlite::Result<_>>().expect("read the outbox")
    };
    rows.iter().filter(|d| destinations.is_empty() || destinations.contains(&d.as_str())).count() as i64
}

/// Waits until Hearth delivered everything it queued for `destinations` (all when empty): no outbox row for them
/// is left. Rows are deleted only after the destination accepted them, so once this returns, a server among
/// `destinations` that has not got something queued with the rows already seen was never sent it.
pub async fn wait_outbox_drained(server: &TestServer, destinations: &[&str], timeout: Duration) {
    let what = format!("Hearth's federation outbox to drain for {destinations:?}");
    wait_for(&what, timeout, || outbox_depth(&server.db_path, destinations) == 0).await
}

/// Events of a sync section (`rooms.join.{room}.timeline` etc.) as a slice; empty when absent.
pub fn events_of(v: &Value) -> Vec<Value> {
    v["events"].as_array().cloned().unwrap_or_default()
}

/// Finds the `m.room.member` event for `user_id` among `events`.
pub fn member_event<'a>(events: &'a [Value], user_id: &str) -> Option<&'a Value> {
    events.iter().find(|e| e["type"] == "m.room.member" && e["state_key"] == user_id)
}

// ---- the real binary ------------------------------------------------------------------------------------------

/// Path of the `hearth` binary built for this test run.
pub fn hearth_bin() -> &'static str {
    env!("CARGO_BIN_EXE_hearth")
}

/// A free TCP port on 127.0.0.1 (bound then released), for a server that must know its port before it starts.
/// Chosen at random below the kernel's ephemeral range when there is room: a port the kernel hands out (`:0`)
/// can be taken, between our release and the server's bind, as the source port of any outgoing connection of
/// the tests running beside it ("Address already in use", seen in CI); one below the range only by another
/// test's explicit choice, which randomness makes unlikely.
pub fn free_port() -> u16 {
    use rand::Rng;
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next().and_then(|lo| lo.parse::<u16>().ok()))
        .unwrap_or(32768);
    if ephemeral_start > 11_000 {
        let mut rng = rand::thread_rng();
        for _ in 0..200 {
            let port = rng.gen_range(10_000..ephemeral_start);
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The `hearth` binary run as a child process on a free port, with its database at `db_path`.
/// Configured only through `HEARTH_*` environment variables (the working directory is the database's folder,
/// so no stray `./hearth.toml` is picked up).
pub struct BinServer {
    pub child: Child,
    pub addr: SocketAddr,
    pub base_url: String,
    pub log_path: PathBuf,
}

impl BinServer {
    /// Starts the binary and waits (up to 60 s) until `/_matrix/client/versions` answers.
    /// `extra_env` is added to the test environment (e.g. `[("HEARTH_REGISTRATION__ENABLED", "true")]`).
    /// Registration, login and join rate limits are raised as in [`test_config`] unless `extra_env` sets them.
    pub async fn start(db_path: &Path, extra_env: &[(&str, &str)]) -> BinServer {
        init_crypto();
        let dir = db_path.parent().expect("db in a folder");
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let log_path = dir.join(format!("hearth-{port}.log"));
        let log = std::fs::File::create(&log_path).expect("log file");
        let mut cmd = Command::new(hearth_bin());
        // Every HEARTH_* variable is a config key to the server (a stray HEARTH_* variable would be an unknown one).
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("HEARTH_") {
                cmd.env_remove(k);
            }
        }
        cmd.current_dir(dir)
            .env("HEARTH_SERVER_NAME", "localhost")
            .env("HEARTH_LISTEN__CLIENT", addr.to_string())
            .env("HEARTH_DATABASE__PATH", db_path)
            .env("HEARTH_FEDERATION__ENABLED", "false")
            .env("HEARTH_LOG__LEVEL", "warn")
            .env("HEARTH_LIMITS__REGISTRATIONS_PER_SECOND", "1000")
            .env("HEARTH_LIMITS__REGISTRATIONS_BURST", "1000")
            .env("HEARTH_LIMITS__LOGINS_PER_SECOND", "1000")
            .env("HEARTH_LIMITS__LOGINS_BURST", "1000")
            .env("HEARTH_LIMITS__JOINS_PER_SECOND", "1000")
            .env("HEARTH_LIMITS__JOINS_BURST", "1000")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn hearth");
        let base_url = format!("http://{addr}");
        let probe = Client::new(&base_url);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("hearth exited early with {status}: {}", std::fs::read_to_string(&log_path).unwrap_or_default());
            }
            let ok = probe
                .http
                .get(probe.url("/_matrix/client/versions"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "hearth did not start: {}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        BinServer { child, addr, base_url, log_path }
    }

    pub fn client(&self) -> Client {
        Client::new(&self.base_url)
    }

    /// SIGKILL (on unix `Child::kill` sends SIGKILL) and reap.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for BinServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
