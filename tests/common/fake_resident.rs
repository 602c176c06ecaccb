//! A scripted fake resident homeserver for partial-join tests.
//!
//! [`FakeResident`] is a real federation server on `127.0.0.1:PORT` (TLS with a self-signed certificate made by
//! `rcgen`, its own ed25519 signing key, server name `127.0.0.1:PORT`). It holds one room ([`FakeRoom`]) whose
//! events it builds and signs itself with correct hashes, signatures, `auth_events` and `prev_events`, and serves
//! what a joining server needs: keys, `make_join`, `send_join` v2 (honouring `omit_members`), `/state_ids`,
//! `/state`, `/event`, `/event_auth`, `get_missing_events`, `backfill`, `make_leave`/`send_leave`,
//! `make_knock`/`send_knock` (refused unless the join rule takes knocks), and `PUT /send` (received PDUs are recorded, and added to the room's DAG when their
//! prev events are known).
//!
//! The fake is an independent oracle: it builds, hashes and signs events, computes event ids, answers key requests
//! and signs its `X-Matrix` requests with its own minimal code over ruma (`ruma::canonical_json`,
//! `ruma::signatures::{hash_and_sign_event, reference_hash, sign_json}`, ruma's room version rules), never with
//! Hearth's event builder, signing or federation client, so a bug there is not reproduced on both sides.
//!
//! Several fakes can share one room ([`FakeResident::start_peer`]): each signs the events of its own users and
//! answers for the room, so a test has a second server in `servers_in_room` to fall back to.
//!
//! Tests script it: [`FakeResident::hold`] / [`FakeResident::release`] make an endpoint wait, [`StateIdsMode`]
//! corrupts `/state_ids`, [`FakeResident::requests`] counts what Hearth asked for, [`FakeResident::push`] sends
//! PDUs to Hearth's `PUT /send` signed with `X-Matrix`, and [`FakeResident::received`] shows what Hearth sent.
//!
//! For attack tests: [`FakeResident::start_named`] gives a fake a DNS-style name (Hearth reaches it through
//! `federation.resolve`, see [`start_hearth_with_fakes`]), [`FakeResident::script`] replaces any endpoint's answer
//! ([`Script`]: hang, drip, endless body, fixed answer), [`FakeRoom::build_signed`] signs events as another server
//! would not, [`sign_unchecked`] signs events of any size, and [`FakeResident::push_json`] sends any transaction.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path as UrlPath, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use base64::Engine;
use ruma::canonical_json::{CanonicalJsonObject, CanonicalJsonValue};
use ruma::events::TimelineEventType;
use ruma::room_version_rules::{EventIdFormatVersion, EventsReferenceFormatVersion, RoomVersionRules};
use ruma::signatures::Ed25519KeyPair;
use serde_json::{json, Value};
use tokio::sync::watch;

use super::{free_port, Client, TestServer};

/// `(type, state_key)` -> event id.
pub type StateMap = BTreeMap<(String, String), String>;

// ---- TLS and configuration helpers ------------------------------------------------------------------------------

/// A fresh self-signed certificate for `127.0.0.1` and `localhost` (made with `rcgen`): PEM certificate, PEM key.
pub fn self_signed_pem() -> (String, String) {
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .expect("self-signed certificate");
    (ck.cert.pem(), ck.signing_key.serialize_pem())
}

/// Writes a self-signed certificate and key (`tls.crt`, `tls.key`) into `dir`.
pub fn self_signed_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let (crt, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let (crt_pem, key_pem) = self_signed_pem();
    std::fs::write(&crt, crt_pem).expect("write tls.crt");
    std::fs::write(&key, key_pem).expect("write tls.key");
    (crt, key)
}

/// Turns a test configuration into one with federation on: TLS listener on `127.0.0.1:0` with a fresh self-signed
/// certificate (next to the database), private addresses allowed, certificates not verified, no notaries.
pub fn federation_config(c: &mut hearth::config::Config) {
    let dir = c.database.path.parent().expect("database in a folder").to_owned();
    let (crt, key) = self_signed_cert(&dir);
    c.federation.enabled = true;
    c.listen.federation = Some("127.0.0.1:0".parse().unwrap());
    c.federation.tls_cert = Some(crt);
    c.federation.tls_key = Some(key);
    c.federation.allow_private_ips = true;
    c.federation.verify_certificates = false;
    c.federation.trusted_key_servers = vec![];
}

/// An in-process Hearth with federation on ([`federation_config`]).
/// Two in-process Hearths (`hearth-a.test`, `hearth-b.test`) federating over TLS on loopback.
pub async fn federated_pair() -> (TestServer, TestServer) {
    federated_pair_with(|_| {}).await
}

/// [`federated_pair`], with `extra` applied to both configurations.
pub async fn federated_pair_with(extra: fn(&mut hearth::config::Config)) -> (TestServer, TestServer) {
    let (pa, pb) = (free_port(), free_port());
    let start = |name: &'static str, port: u16, peer: &'static str, peer_port: u16| {
        TestServer::start_with(move |c| {
            federation_config(c);
            extra(c);
            c.server_name = name.into();
            c.listen.federation = Some(format!("127.0.0.1:{port}").parse().unwrap());
            c.federation.resolve.insert(peer.into(), format!("127.0.0.1:{peer_port}"));
        })
    };
    let a = start("hearth-a.test", pa, "hearth-b.test", pb).await;
    let b = start("hearth-b.test", pb, "hearth-a.test", pa).await;
    (a, b)
}

pub async fn start_hearth() -> TestServer {
    TestServer::start_with(federation_config).await
}

/// [`start_hearth`], with `f` changing the configuration afterwards.
pub async fn start_hearth_with(f: impl FnOnce(&mut hearth::config::Config)) -> TestServer {
    TestServer::start_with(|c| {
        federation_config(c);
        f(c)
    })
    .await
}

/// [`start_hearth`], resolving the names of `fakes` (which may be DNS-style, [`FakeResident::start_named`]) to
/// their addresses, and connecting each fake to it.
pub async fn start_hearth_with_fakes(
    fakes: &[&FakeResident],
    f: impl FnOnce(&mut hearth::config::Config),
) -> TestServer {
    let entries: Vec<(String, String)> = fakes.iter().map(|x| (x.name.clone(), x.addr.to_string())).collect();
    let hearth = start_hearth_with(|c| {
        c.federation.resolve.extend(entries);
        f(c)
    })
    .await;
    for x in fakes {
        x.connect_to(&hearth);
    }
    hearth
}

/// The fake's TLS listener: handshakes run in their own tasks, so a client that never finishes one blocks no other.
struct FakeTlsListener {
    local: SocketAddr,
    rx: tokio::sync::mpsc::Receiver<(tokio_rustls::server::TlsStream<tokio::net::TcpStream>, SocketAddr)>,
}

impl FakeTlsListener {
    /// The listener, and the accept loop to run next to the server (it ends with the task running it).
    fn new(tcp: tokio::net::TcpListener) -> (FakeTlsListener, impl std::future::Future<Output = ()> + Send + 'static) {
        use rustls::pki_types::pem::PemObject;
        let (crt, key) = self_signed_pem();
        let certs = vec![rustls::pki_types::CertificateDer::from_pem_slice(crt.as_bytes()).expect("certificate")];
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key");
        let mut config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("TLS versions")
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .expect("TLS configuration");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let local = tcp.local_addr().expect("local address");
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let accept_loop = async move {
            loop {
                let Ok((stream, addr)) = tcp.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    if let Ok(Ok(tls)) = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                        let _ = tx.send((tls, addr)).await;
                    }
                });
            }
        };
        (FakeTlsListener { local, rx }, accept_loop)
    }
}

impl axum::serve::Listener for FakeTlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(x) => x,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

// ---- the fake's own signing -------------------------------------------------------------------------------------

/// A fake server's signing identity: its name and an ed25519 key pair of its own.
pub struct FakeIdentity {
    pub server_name: String,
    pub keypair: Ed25519KeyPair,
    /// `ed25519:fake1`
    pub key_id: String,
    /// The public key, unpadded standard base64.
    pub public_key_b64: String,
}

/// A fresh signing identity for a fake server.
pub fn new_identity(server_name: &str) -> Arc<FakeIdentity> {
    let der = Ed25519KeyPair::generate();
    let keypair = Ed25519KeyPair::from_der(&der, "fake1".into()).expect("generated key parses");
    let public_key_b64 = base64::engine::general_purpose::STANDARD_NO_PAD.encode(keypair.public_key());
    Arc::new(FakeIdentity {
        server_name: server_name.to_owned(),
        keypair,
        key_id: "ed25519:fake1".into(),
        public_key_b64,
    })
}

/// ruma's rules for room version `version` (panics for one ruma does not know).
pub fn rules(version: &str) -> RoomVersionRules {
    ruma::RoomVersionId::try_from(version)
        .ok()
        .and_then(|v| v.rules())
        .unwrap_or_else(|| panic!("ruma has no rules for room version {version}"))
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock after 1970").as_millis() as i64
}

/// A random alphanumeric string (transaction ids, v1/v2 event ids).
fn random_string(n: usize) -> String {
    use rand::Rng;
    rand::thread_rng().sample_iter(rand::distributions::Alphanumeric).take(n).map(char::from).collect()
}

/// Percent-decodes a query string part (`+` is a space).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match b[i] {
            b'%' if i + 2 < b.len() && hex(b[i + 1]).is_some() && hex(b[i + 2]).is_some() => {
                out.push((hex(b[i + 1]).unwrap() * 16 + hex(b[i + 2]).unwrap()) as u8);
                i += 3;
                continue;
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The event id of a PDU as the room version defines it: the reference hash (v3+: `$` and the hash, URL-safe base64
/// from v4), or the `event_id` field the event carries (v1/v2).
pub fn event_id_of(obj: &CanonicalJsonObject, rules: &RoomVersionRules) -> Result<String, String> {
    match rules.event_id_format {
        EventIdFormatVersion::V1 => match obj.get("event_id") {
            Some(CanonicalJsonValue::String(s)) => Ok(s.clone()),
            _ => Err("v1/v2 event without `event_id`".into()),
        },
        _ => ruma::signatures::reference_hash(obj, rules).map(|h| format!("${h}")).map_err(|e| e.to_string()),
    }
}

/// Signs `obj` (any JSON object: a key response, an `X-Matrix` request) with `identity` (`sign_json`).
fn sign_object(identity: &FakeIdentity, obj: &mut CanonicalJsonObject) {
    ruma::signatures::sign_json(&identity.server_name, &identity.keypair, obj).expect("sign JSON");
}

/// The fake's `GET /_matrix/key/v2/server` answer, self-signed.
fn key_response(identity: &FakeIdentity) -> Value {
    let mut obj: CanonicalJsonObject = serde_json::from_value(json!({
        "server_name": identity.server_name,
        "verify_keys": {identity.key_id.clone(): {"key": identity.public_key_b64}},
        "old_verify_keys": {},
        "valid_until_ts": now_ms() + 24 * 3600 * 1000,
    }))
    .expect("canonical JSON");
    sign_object(identity, &mut obj);
    serde_json::to_value(obj).expect("JSON")
}

/// An event template from Hearth's `make_join`/`make_leave`/`make_knock`, completed and signed by `fake` as its
/// server would.
pub fn sign_template(fake: &FakeResident, version: &str, template: &Value) -> (String, Value) {
    let rules = rules(version);
    let mut obj: CanonicalJsonObject = serde_json::from_value(template.clone()).expect("template is canonical JSON");
    obj.insert("origin_server_ts".into(), CanonicalJsonValue::Integer(now_ms().try_into().unwrap()));
    ruma::signatures::hash_and_sign_event(
        &fake.identity.server_name,
        &fake.identity.keypair,
        &mut obj,
        &rules.redaction,
    )
    .expect("sign the event");
    let id = event_id_of(&obj, &rules).expect("event id");
    (id, serde_json::to_value(obj).unwrap())
}

/// Adds `hashes` and `signatures` (by `identity`) to an event of any size: unlike ruma's `hash_and_sign_event`
/// this does not refuse events over 65536 bytes, so tests can send oversized events that are otherwise valid.
pub fn sign_unchecked(identity: &FakeIdentity, rules: &RoomVersionRules, obj: &mut CanonicalJsonObject) {
    for k in ["hashes", "signatures", "unsigned"] {
        obj.remove(k);
    }
    let json = serde_json::to_string(&*obj).expect("canonical JSON");
    let hash = ring::digest::digest(&ring::digest::SHA256, json.as_bytes());
    let mut hashes = CanonicalJsonObject::new();
    hashes.insert(
        "sha256".into(),
        CanonicalJsonValue::String(base64::engine::general_purpose::STANDARD_NO_PAD.encode(hash.as_ref())),
    );
    obj.insert("hashes".into(), CanonicalJsonValue::Object(hashes));
    let mut redacted = ruma::canonical_json::redact(obj.clone(), &rules.redaction, None).expect("redact");
    sign_object(identity, &mut redacted);
    obj.insert("signatures".into(), redacted.get("signatures").cloned().expect("signatures"));
}

/// The event id of a v3+ event of any size (the reference hash ruma refuses to compute over 65536 bytes).
pub fn event_id_unchecked(rules: &RoomVersionRules, obj: &CanonicalJsonObject) -> String {
    let mut redacted = ruma::canonical_json::redact(obj.clone(), &rules.redaction, None).expect("redact");
    for k in ["signatures", "unsigned", "age_ts"] {
        redacted.remove(k);
    }
    let json = serde_json::to_string(&redacted).expect("canonical JSON");
    let hash = ring::digest::digest(&ring::digest::SHA256, json.as_bytes());
    format!("${}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(hash.as_ref()))
}

/// The fake's federation client towards Hearth: `X-Matrix` requests signed with the fake's key.
pub struct FakeFedClient {
    identity: Arc<FakeIdentity>,
    /// Where Hearth's federation listener is.
    addr: SocketAddr,
    http: reqwest::Client,
}

impl FakeFedClient {
    fn new(identity: Arc<FakeIdentity>, addr: SocketAddr) -> FakeFedClient {
        super::init_crypto();
        let http = reqwest::Client::builder()
            .tls_danger_accept_invalid_certs(true)
            .timeout(Duration::from_secs(120))
            .build()
            .expect("reqwest client");
        FakeFedClient { identity, addr, http }
    }

    /// The `Authorization` header value for a request to `destination` (the spec's `X-Matrix` scheme).
    pub fn x_matrix(
        &self,
        method: &str,
        uri: &str,
        destination: &str,
        content: Option<&Value>,
    ) -> Result<String, String> {
        let mut request =
            json!({"method": method, "uri": uri, "origin": self.identity.server_name, "destination": destination});
        if let Some(c) = content {
            request["content"] = c.clone();
        }
        let mut obj: CanonicalJsonObject = serde_json::from_value(request).map_err(|e| e.to_string())?;
        sign_object(&self.identity, &mut obj);
        let sig = serde_json::to_value(&obj).map_err(|e| e.to_string())?["signatures"][&self.identity.server_name]
            [&self.identity.key_id]
            .as_str()
            .ok_or("no signature produced")?
            .to_owned();
        Ok(format!(
            "X-Matrix origin=\"{}\",destination=\"{}\",key=\"{}\",sig=\"{}\"",
            self.identity.server_name, destination, self.identity.key_id, sig
        ))
    }

    /// A signed request to Hearth (known as `destination`); the JSON answer, or `Err((status, body))` for a
    /// non-2xx answer (status 0 for a transport error).
    pub async fn request(
        &self,
        method: reqwest::Method,
        destination: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, (u16, Value)> {
        let auth = self.x_matrix(method.as_str(), path, destination, body).map_err(|e| (0, json!({"error": e})))?;
        let mut req = self.http.request(method, format!("https://{}{path}", self.addr)).header("authorization", auth);
        if let Some(b) = body {
            req = req.json(b);
        }
        let res = req.send().await.map_err(|e| (0, json!({"error": e.to_string()})))?;
        let status = res.status().as_u16();
        let text = res.text().await.map_err(|e| (0, json!({"error": e.to_string()})))?;
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if (200..300).contains(&status) {
            Ok(value)
        } else {
            Err((status, value))
        }
    }
}

fn server_of(user_id: &str) -> &str {
    user_id.split_once(':').map(|x| x.1).unwrap_or_default()
}

// ---- the room -----------------------------------------------------------------------------------------------------

/// One event of the fake's room.
#[derive(Clone, Debug)]
pub struct FakeEvent {
    pub id: String,
    /// The PDU as sent over federation.
    pub json: Value,
    pub depth: i64,
    pub prev: Vec<String>,
    pub auth: Vec<String>,
    /// The state before this event.
    pub state_before: Arc<StateMap>,
    /// In the DAG (false: built but kept aside, e.g. an event the room's auth rules reject).
    pub in_dag: bool,
}

impl FakeEvent {
    pub fn state_key(&self) -> Option<(String, String)> {
        let k = self.json.get("state_key")?.as_str()?;
        Some((self.json["type"].as_str().unwrap_or_default().to_owned(), k.to_owned()))
    }

    /// The state after this event.
    pub fn state_after(&self) -> StateMap {
        let mut s = (*self.state_before).clone();
        if let Some(k) = self.state_key() {
            s.insert(k, self.id.clone());
        }
        s
    }
}

/// An event to build: type, sender, state key and content; `prev`/`auth`/`depth` default to the room's forward
/// extremities, the auth events the state before selects, and one more than the deepest prev.
#[derive(Clone, Debug)]
pub struct EventSpec {
    pub sender: String,
    pub kind: String,
    pub state_key: Option<String>,
    pub content: Value,
    pub prev: Option<Vec<String>>,
    pub auth: Option<Vec<String>>,
}

impl EventSpec {
    pub fn message(sender: &str, body: &str) -> EventSpec {
        EventSpec {
            sender: sender.into(),
            kind: "m.room.message".into(),
            state_key: None,
            content: json!({"msgtype": "m.text", "body": body}),
            prev: None,
            auth: None,
        }
    }
    pub fn state(sender: &str, kind: &str, state_key: &str, content: Value) -> EventSpec {
        EventSpec {
            sender: sender.into(),
            kind: kind.into(),
            state_key: Some(state_key.into()),
            content,
            prev: None,
            auth: None,
        }
    }
    pub fn member(user: &str, membership: &str) -> EventSpec {
        EventSpec::state(
            user,
            "m.room.member",
            user,
            json!({"membership": membership, "displayname": user.trim_start_matches('@').split(':').next().unwrap_or_default()}),
        )
    }
    pub fn with_prev(mut self, prev: Vec<String>) -> EventSpec {
        self.prev = Some(prev);
        self
    }
    pub fn with_auth(mut self, auth: Vec<String>) -> EventSpec {
        self.auth = Some(auth);
        self
    }
}

/// The room the fakes serve: a DAG of signed events with the state before each.
pub struct FakeRoom {
    pub room_id: String,
    pub version: String,
    pub rules: RoomVersionRules,
    pub events: HashMap<String, FakeEvent>,
    /// Event ids in the order they were added.
    pub order: Vec<String>,
    pub extremities: Vec<String>,
    /// Signing identities by server name (the fakes sharing this room).
    pub identities: HashMap<String, Arc<FakeIdentity>>,
    pub creator: String,
}

impl FakeRoom {
    fn identity_for(&self, user: &str) -> Arc<FakeIdentity> {
        self.identities.get(server_of(user)).cloned().unwrap_or_else(|| panic!("no fake server signs for {user}"))
    }

    /// The state after the forward extremities (they never conflict in scripted rooms: the latest wins).
    pub fn current_state(&self) -> StateMap {
        self.state_at(&self.extremities)
    }

    fn state_at(&self, prevs: &[String]) -> StateMap {
        let mut evs: Vec<&FakeEvent> = prevs.iter().filter_map(|p| self.events.get(p)).collect();
        evs.sort_by_key(|e| e.depth);
        let mut state = StateMap::new();
        for e in evs {
            // An event kept out of the DAG (rejected) changes no state.
            if e.in_dag {
                state.extend(e.state_after());
            } else {
                state.extend(e.state_before.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
        }
        state
    }

    pub fn get(&self, id: &str) -> Option<&FakeEvent> {
        self.events.get(id)
    }

    /// The event id of a current state entry.
    pub fn state_id(&self, kind: &str, state_key: &str) -> Option<String> {
        self.current_state().get(&(kind.to_owned(), state_key.to_owned())).cloned()
    }

    /// Joined members in the current state.
    pub fn joined_members(&self) -> Vec<String> {
        let state = self.current_state();
        state
            .iter()
            .filter(|((t, _), _)| t == "m.room.member")
            .filter(|(_, id)| {
                self.events[*id].json.pointer("/content/membership").and_then(Value::as_str) == Some("join")
            })
            .map(|((_, k), _)| k.clone())
            .collect()
    }

    /// Servers with joined members in `state`.
    pub fn servers_in(&self, state: &StateMap) -> Vec<String> {
        let mut out = BTreeSet::new();
        for ((t, k), id) in state {
            if t == "m.room.member"
                && self.events[id].json.pointer("/content/membership").and_then(Value::as_str) == Some("join")
            {
                out.insert(server_of(k).to_owned());
            }
        }
        out.into_iter().collect()
    }

    /// Auth event ids an event needs, selected from `state`.
    fn auth_for(&self, state: &StateMap, spec: &EventSpec) -> Vec<String> {
        let sender = ruma::UserId::parse(spec.sender.as_str()).expect("valid sender");
        let raw = serde_json::value::to_raw_value(&spec.content).expect("content serialises");
        let types = ruma::state_res::auth_types_for_event(
            &TimelineEventType::from(spec.kind.as_str()),
            &sender,
            spec.state_key.as_deref(),
            &raw,
            &self.rules.authorization,
        )
        .expect("auth types");
        types.into_iter().filter_map(|(t, k)| state.get(&(t.to_string(), k)).cloned()).collect()
    }

    /// Builds and signs an event (by the fake server of its sender) without adding it to the DAG.
    pub fn build(&mut self, spec: EventSpec) -> FakeEvent {
        self.build_signed(spec, None)
    }

    /// [`FakeRoom::build`], signed by `signer` instead of the sender's server (a forged sender) when given.
    pub fn build_signed(&mut self, spec: EventSpec, signer: Option<Arc<FakeIdentity>>) -> FakeEvent {
        let prev = spec.prev.clone().unwrap_or_else(|| self.extremities.clone());
        let state_before = self.state_at(&prev);
        let auth = spec.auth.clone().unwrap_or_else(|| self.auth_for(&state_before, &spec));
        let depth = prev.iter().filter_map(|p| self.events.get(p)).map(|e| e.depth).max().unwrap_or(0) + 1;
        let identity = signer.unwrap_or_else(|| self.identity_for(&spec.sender));
        let mut ev = json!({
            "type": spec.kind,
            "sender": spec.sender,
            "content": spec.content,
            "depth": depth,
            "origin_server_ts": now_ms(),
            "prev_events": self.refs(&prev),
            "auth_events": self.refs(&auth),
        });
        if let Some(k) = &spec.state_key {
            ev["state_key"] = json!(k);
        }
        // v12's create event has no room id (the room id is derived from its event id).
        if !self.room_id.is_empty() {
            ev["room_id"] = json!(self.room_id);
        }
        if matches!(self.rules.event_id_format, EventIdFormatVersion::V1) {
            ev["event_id"] = json!(format!("${}:{}", random_string(18), identity.server_name));
        }
        let mut obj: CanonicalJsonObject = serde_json::from_value(ev).expect("an event is canonical JSON");
        ruma::signatures::hash_and_sign_event(
            &identity.server_name,
            &identity.keypair,
            &mut obj,
            &self.rules.redaction,
        )
        .expect("hash and sign the event");
        let id = event_id_of(&obj, &self.rules).expect("event id");
        let ev = FakeEvent {
            id,
            json: serde_json::to_value(&obj).expect("pdu json"),
            depth,
            prev,
            auth,
            state_before: Arc::new(state_before),
            in_dag: false,
        };
        self.events.insert(ev.id.clone(), ev.clone());
        self.order.push(ev.id.clone());
        ev
    }

    /// `prev_events`/`auth_events` as the room version writes them: event ids (v3+), or `[id, {"sha256": hash}]`
    /// pairs with the referenced event's reference hash (v1/v2; empty for an event the fake does not have).
    fn refs(&self, ids: &[String]) -> Value {
        match self.rules.events_reference_format {
            EventsReferenceFormatVersion::V1 => ids
                .iter()
                .map(|id| {
                    let hash = self
                        .events
                        .get(id)
                        .and_then(|e| serde_json::from_value::<CanonicalJsonObject>(e.json.clone()).ok())
                        .and_then(|o| ruma::signatures::reference_hash(&o, &self.rules).ok())
                        .unwrap_or_default();
                    json!([id, {"sha256": hash}])
                })
                .collect(),
            _ => json!(ids),
        }
    }

    /// Adds a built (or received) event to the DAG: it becomes a forward extremity in place of its prev events.
    pub fn add_to_dag(&mut self, id: &str) {
        let e = self.events.get_mut(id).expect("known event");
        if e.in_dag {
            return;
        }
        e.in_dag = true;
        let prev = e.prev.clone();
        self.extremities.retain(|x| !prev.contains(x));
        self.extremities.push(id.to_owned());
    }

    /// Builds, signs and appends an event; returns its id.
    pub fn append(&mut self, spec: EventSpec) -> String {
        let ev = self.build(spec);
        self.add_to_dag(&ev.id);
        ev.id
    }

    /// Takes in a PDU from another server (e.g. Hearth's join or messages). Returns its event id.
    pub fn receive(&mut self, pdu: &Value, add_to_dag: bool) -> Result<String, String> {
        let mut obj: CanonicalJsonObject = serde_json::from_value(pdu.clone()).map_err(|e| e.to_string())?;
        obj.remove("unsigned");
        let id = event_id_of(&obj, &self.rules)?;
        if self.events.get(&id).is_some_and(|e| e.in_dag) {
            return Ok(id);
        }
        let list = |k: &str| -> Vec<String> {
            pdu.get(k)
                .and_then(Value::as_array)
                // An event id (v3+) or an `[id, hashes]` pair (v1/v2).
                .map(|a| a.iter().filter_map(|r| r.as_str().or_else(|| r[0].as_str())).map(str::to_owned).collect())
                .unwrap_or_default()
        };
        let prev = list("prev_events");
        if !prev.iter().all(|p| self.events.get(p).is_some_and(|e| e.in_dag)) {
            return Err(format!("{id}: unknown prev events"));
        }
        let ev = FakeEvent {
            id: id.clone(),
            json: serde_json::to_value(&obj).map_err(|e| e.to_string())?,
            depth: pdu.get("depth").and_then(Value::as_i64).unwrap_or(0),
            state_before: Arc::new(self.state_at(&prev)),
            prev,
            auth: list("auth_events"),
            in_dag: false,
        };
        self.events.insert(id.clone(), ev);
        self.order.push(id.clone());
        if add_to_dag {
            self.add_to_dag(&id);
        }
        Ok(id)
    }

    /// The auth chain (ids) of `ids`, not including them unless reachable.
    pub fn auth_chain(&self, ids: impl IntoIterator<Item = String>) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut todo: Vec<String> = ids.into_iter().collect();
        while let Some(id) = todo.pop() {
            if let Some(e) = self.events.get(&id) {
                for a in &e.auth {
                    if seen.insert(a.clone()) {
                        todo.push(a.clone());
                    }
                }
            }
        }
        seen
    }

    pub fn json_of(&self, ids: impl IntoIterator<Item = String>) -> Vec<Value> {
        ids.into_iter().filter_map(|i| self.events.get(&i).map(|e| e.json.clone())).collect()
    }
}

// ---- scripting: holds, corrupt answers, request log ---------------------------------------------------------------

/// How `/state_ids` answers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum StateIdsMode {
    Normal,
    /// Well-formed but wrong: ids of events that do not exist, no auth chain.
    Bogus,
    /// 500 M_UNKNOWN.
    Error,
    /// The true non-member state, plus ids of member events that do not exist instead of the real members.
    BogusMembers,
}

/// A scripted answer for one kind of request (see [`FakeResident::script`]).
#[derive(Clone, Debug)]
pub enum Script {
    /// Never answers (the connection stays open).
    Hang,
    /// 200 with a JSON content type and a body of one space every interval, forever.
    Drip(Duration),
    /// 200 with a body that never ends, sent as fast as the reader takes it ([`FakeResident::streamed`] counts it).
    Endless,
    /// A fixed answer.
    Respond { status: u16, headers: Vec<(String, String)>, body: String },
}

impl Script {
    pub fn json(status: u16, body: Value) -> Script {
        Script::Respond {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_string(),
        }
    }
    /// A `302 Found` to `location`.
    pub fn redirect(location: &str) -> Script {
        Script::Respond { status: 302, headers: vec![("location".into(), location.into())], body: String::new() }
    }
}

/// The kind of a request by its path: `key`, `well_known`, or the endpoint name after `/_matrix/federation/vN/`.
fn kind_of(path: &str) -> String {
    if path.starts_with("/_matrix/key/") {
        return "key".into();
    }
    if path.starts_with("/.well-known/matrix/server") {
        return "well_known".into();
    }
    let mut parts = path.trim_start_matches('/').split('/');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("_matrix"), Some("federation"), Some(_), Some(kind)) => kind.to_owned(),
        _ => "other".into(),
    }
}

/// Answers scripted requests before they reach the fake's handlers.
async fn scripted(State(i): State<Shared>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let kind = kind_of(req.uri().path());
    let script = i.ctl.scripts.lock().unwrap().get(&kind).cloned();
    let Some(script) = script else { return next.run(req).await };
    i.ctl.requests.lock().unwrap().push(Request {
        kind: kind.clone(),
        detail: req.uri().to_string(),
        at: Instant::now(),
    });
    i.ctl.bump();
    match script {
        Script::Hang => std::future::pending().await,
        Script::Drip(every) => {
            let inner = i.clone();
            let body = futures::stream::unfold((), move |()| {
                let inner = inner.clone();
                async move {
                    tokio::time::sleep(every).await;
                    inner.ctl.streamed.fetch_add(1, Ordering::Relaxed);
                    Some((Ok::<_, std::io::Error>(bytes::Bytes::from_static(b" ")), ()))
                }
            });
            ([("content-type", "application/json")], axum::body::Body::from_stream(body)).into_response()
        }
        Script::Endless => {
            static CHUNK: [u8; 65536] = [b' '; 65536];
            let inner = i.clone();
            let head =
                futures::stream::once(async { Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"{\"events\": [")) });
            let tail = futures::stream::repeat_with(move || {
                inner.ctl.streamed.fetch_add(CHUNK.len() as u64, Ordering::Relaxed);
                Ok::<_, std::io::Error>(bytes::Bytes::from_static(&CHUNK))
            });
            (
                [("content-type", "application/json")],
                axum::body::Body::from_stream(futures::StreamExt::chain(head, tail)),
            )
                .into_response()
        }
        Script::Respond { status, headers, body } => {
            let mut res =
                (StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), body).into_response();
            for (k, v) in headers {
                res.headers_mut().insert(
                    axum::http::HeaderName::try_from(k).unwrap(),
                    axum::http::HeaderValue::try_from(v).unwrap(),
                );
            }
            res
        }
    }
}

/// One request the fake received.
#[derive(Clone, Debug)]
pub struct Request {
    /// `make_join`, `send_join`, `make_leave`, `send_leave`, `make_knock`, `send_knock`, `state_ids`, `state`,
    /// `event`, `event_auth`, `get_missing_events`, `backfill`, `send`, `key`, or `other`.
    pub kind: String,
    /// The event id for `event`, `state_ids`, `state`; the path otherwise.
    pub detail: String,
    pub at: Instant,
}

struct Control {
    held: Mutex<HashMap<String, watch::Sender<bool>>>,
    state_ids_mode: Mutex<StateIdsMode>,
    /// `/state` returns at most this many of the state events (the auth chain in full).
    state_limit: Mutex<Option<usize>>,
    /// `servers_in_room` of the send_join answer (default: servers with joined members before the join).
    servers_in_room: Mutex<Option<Vec<String>>>,
    /// Events `/event` answers 404 for.
    hidden: Mutex<HashSet<String>>,
    /// Events `get_missing_events` never returns (nor walks past).
    withheld: Mutex<HashSet<String>>,
    /// Events whose `/state_ids` is answered even while `state_ids` is held.
    state_ids_free: Mutex<HashSet<String>>,
    /// `/state_ids` and `/state` list the value instead of the key (a resident lying about the state).
    state_substitutes: Mutex<HashMap<String, String>>,
    requests: Mutex<Vec<Request>>,
    received: Mutex<Vec<(String, Value)>>,
    /// EDUs received through `PUT /send`.
    edus: Mutex<Vec<Value>>,
    changed: watch::Sender<u64>,
    /// Scripted answers by request kind.
    scripts: Mutex<HashMap<String, Script>>,
    /// Body bytes sent by [`Script::Drip`] and [`Script::Endless`] answers.
    streamed: AtomicU64,
    /// `get_missing_events` answers up to this many events whatever limit was asked for.
    missing_events_limit: Mutex<Option<usize>>,
}

impl Control {
    fn gate(&self, kind: &str) -> watch::Sender<bool> {
        self.held.lock().unwrap().entry(kind.to_owned()).or_insert_with(|| watch::channel(false).0).clone()
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    fn substitute(&self, ids: Vec<String>) -> Vec<String> {
        let subs = self.state_substitutes.lock().unwrap();
        ids.into_iter().map(|id| subs.get(&id).cloned().unwrap_or(id)).collect()
    }

    /// Records a request (without waiting on its kind's hold).
    fn record(&self, kind: &str, detail: String) {
        self.requests.lock().unwrap().push(Request { kind: kind.to_owned(), detail, at: Instant::now() });
        self.bump();
    }

    /// Records a request, then waits while its kind is held.
    async fn arrive(&self, kind: &str, detail: String) {
        self.record(kind, detail);
        let mut rx = self.gate(kind).subscribe();
        let _ = rx.wait_for(|held| !*held).await;
    }
}

struct Inner {
    name: String,
    room: Arc<Mutex<FakeRoom>>,
    ctl: Control,
}

type Shared = Arc<Inner>;

/// A fake federation server answering for one room.
pub struct FakeResident {
    pub name: String,
    pub addr: SocketAddr,
    pub identity: Arc<FakeIdentity>,
    pub room: Arc<Mutex<FakeRoom>>,
    inner: Shared,
    hearth: Mutex<Option<(String, Arc<FakeFedClient>)>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeResident {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the fake's room looks like at the start.
#[derive(Clone, Debug)]
pub struct RoomSpec {
    pub version: String,
    /// Members from the fake's own server, besides the creator (`@user1:fake` ... `@userN:fake`).
    pub members: usize,
    /// Messages from the creator after the joins.
    pub messages: usize,
}

impl Default for RoomSpec {
    fn default() -> Self {
        RoomSpec { version: "10".into(), members: 20, messages: 3 }
    }
}

impl FakeResident {
    /// Starts a fake with a room built after `spec`: creator `@creator:fake`, power levels, public join rules,
    /// shared history, a name (so no heroes are needed), `spec.members` joined users and some messages.
    pub async fn start(spec: RoomSpec) -> FakeResident {
        Self::start_as(spec, None).await
    }

    /// [`FakeResident::start`] with a DNS-style server name (e.g. `evil.example`) instead of `127.0.0.1:PORT`;
    /// Hearth must resolve it through `federation.resolve` ([`start_hearth_with_fakes`]).
    pub async fn start_named(spec: RoomSpec, name: &str) -> FakeResident {
        Self::start_as(spec, Some(name)).await
    }

    async fn start_as(spec: RoomSpec, name: Option<&str>) -> FakeResident {
        let rules = rules(&spec.version);
        let room = Arc::new(Mutex::new(FakeRoom {
            room_id: String::new(),
            version: spec.version.clone(),
            rules: rules.clone(),
            events: HashMap::new(),
            order: vec![],
            extremities: vec![],
            identities: HashMap::new(),
            creator: String::new(),
        }));
        let fake = Self::serve(room.clone(), name).await;
        {
            let mut r = room.lock().unwrap();
            let creator = fake.user("creator");
            r.creator = creator.clone();
            let mut create_content = json!({"room_version": spec.version});
            if !rules.authorization.use_room_create_sender {
                create_content["creator"] = json!(creator);
            }
            if !rules.authorization.room_create_event_id_as_room_id {
                r.room_id = format!("!fakeroom{}:{}", fake.addr.port(), fake.name);
            }
            let create = r.build(EventSpec::state(&creator, "m.room.create", "", create_content));
            if r.room_id.is_empty() {
                r.room_id = format!("!{}", create.id.trim_start_matches('$'));
            }
            r.add_to_dag(&create.id);
            r.append(EventSpec::member(&creator, "join"));
            let users = if rules.authorization.explicitly_privilege_room_creators {
                json!({})
            } else {
                json!({creator.clone(): 100})
            };
            r.append(EventSpec::state(
                &creator,
                "m.room.power_levels",
                "",
                json!({"users": users, "users_default": 0, "events_default": 0, "state_default": 50, "ban": 50, "kick": 50, "redact": 50, "invite": 0, "events": {}}),
            ));
            r.append(EventSpec::state(&creator, "m.room.join_rules", "", json!({"join_rule": "public"})));
            r.append(EventSpec::state(
                &creator,
                "m.room.history_visibility",
                "",
                json!({"history_visibility": "shared"}),
            ));
            r.append(EventSpec::state(&creator, "m.room.name", "", json!({"name": "Fake resident's room"})));
            for i in 1..=spec.members {
                r.append(EventSpec::member(&fake.user(&format!("user{i}")), "join"));
            }
            for i in 0..spec.messages {
                r.append(EventSpec::message(&creator, &format!("message {i}")));
            }
        }
        fake
    }

    /// Starts a second fake server answering for the same room (e.g. to fall back to); none of its users is in
    /// the room until the test appends their joins.
    pub async fn start_peer(&self) -> FakeResident {
        Self::serve(self.room.clone(), None).await
    }

    /// [`FakeResident::start_peer`] with a DNS-style name (see [`FakeResident::start_named`]).
    pub async fn start_peer_named(&self, name: &str) -> FakeResident {
        Self::serve(self.room.clone(), Some(name)).await
    }

    async fn serve(room: Arc<Mutex<FakeRoom>>, name: Option<&str>) -> FakeResident {
        super::init_crypto();
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = tcp.local_addr().unwrap();
        let name = name.map(str::to_owned).unwrap_or_else(|| format!("127.0.0.1:{}", addr.port()));
        let identity = new_identity(&name);
        room.lock().unwrap().identities.insert(name.clone(), identity.clone());
        let inner = Arc::new(Inner {
            name: name.clone(),
            room: room.clone(),
            ctl: Control {
                held: Mutex::default(),
                state_ids_mode: Mutex::new(StateIdsMode::Normal),
                state_limit: Mutex::new(None),
                servers_in_room: Mutex::new(None),
                hidden: Mutex::default(),
                withheld: Mutex::default(),
                state_ids_free: Mutex::default(),
                state_substitutes: Mutex::default(),
                requests: Mutex::default(),
                received: Mutex::default(),
                edus: Mutex::default(),
                changed: watch::channel(0).0,
                scripts: Mutex::default(),
                streamed: AtomicU64::new(0),
                missing_events_limit: Mutex::new(None),
            },
        });
        let key_identity = identity.clone();
        let app = Router::new()
            .route(
                "/_matrix/key/v2/server",
                get(move |State(i): State<Shared>| async move {
                    i.ctl.arrive("key", String::new()).await;
                    axum::Json(key_response(&key_identity))
                }),
            )
            .route(
                "/_matrix/federation/v1/version",
                get(|| async { axum::Json(json!({"server": {"name": "fake-resident", "version": "0"}})) }),
            )
            .route("/_matrix/federation/v1/make_join/{room_id}/{user_id}", get(make_join))
            .route("/_matrix/federation/v2/send_join/{room_id}/{event_id}", put(send_join))
            .route("/_matrix/federation/v1/make_leave/{room_id}/{user_id}", get(make_leave))
            .route("/_matrix/federation/v2/send_leave/{room_id}/{event_id}", put(send_leave))
            .route("/_matrix/federation/v1/make_knock/{room_id}/{user_id}", get(make_knock))
            .route("/_matrix/federation/v1/send_knock/{room_id}/{event_id}", put(send_knock))
            .route("/_matrix/federation/v1/state_ids/{room_id}", get(state_ids))
            .route("/_matrix/federation/v1/state/{room_id}", get(state))
            .route("/_matrix/federation/v1/event/{event_id}", get(event))
            .route("/_matrix/federation/v1/event_auth/{room_id}/{event_id}", get(event_auth))
            .route("/_matrix/federation/v1/get_missing_events/{room_id}", post(get_missing_events))
            .route("/_matrix/federation/v1/backfill/{room_id}", get(backfill))
            .route("/_matrix/federation/v1/send/{txn}", put(send))
            .fallback(|State(i): State<Shared>, uri: axum::http::Uri| async move {
                i.ctl.arrive("other", uri.to_string()).await;
                err(StatusCode::NOT_FOUND, "M_UNRECOGNIZED", "the fake resident does not serve this")
            })
            .layer(axum::middleware::from_fn_with_state(inner.clone(), scripted))
            .with_state(inner.clone());
        let (listener, accept_loop) = FakeTlsListener::new(tcp);
        let task = tokio::spawn(async move {
            tokio::select! {
                _ = accept_loop => {}
                _ = axum::serve(listener, app.into_make_service()) => {}
            }
        });
        FakeResident { name, addr, identity, room, inner, hearth: Mutex::new(None), task }
    }

    /// `@localpart:<this fake>`.
    pub fn user(&self, localpart: &str) -> String {
        format!("@{localpart}:{}", self.name)
    }

    /// The room's creator (`@creator:<first fake>`, power 100).
    pub fn creator(&self) -> String {
        self.room.lock().unwrap().creator.clone()
    }

    pub fn room_id(&self) -> String {
        self.room.lock().unwrap().room_id.clone()
    }

    pub fn room_version(&self) -> String {
        self.room.lock().unwrap().version.clone()
    }

    /// Builds and appends an event to the room (signed by the fake of its sender); returns it.
    pub fn append(&self, spec: EventSpec) -> FakeEvent {
        let mut r = self.room.lock().unwrap();
        let id = r.append(spec);
        r.events[&id].clone()
    }

    /// Builds an event without adding it to the DAG (for events the room's rules reject, or gaps).
    pub fn build(&self, spec: EventSpec) -> FakeEvent {
        self.room.lock().unwrap().build(spec)
    }

    /// [`FakeRoom::build_signed`]: an event signed by `signer` (e.g. this fake) whatever its sender's server.
    pub fn build_signed(&self, spec: EventSpec, signer: &Arc<FakeIdentity>) -> FakeEvent {
        self.room.lock().unwrap().build_signed(spec, Some(signer.clone()))
    }

    pub fn event(&self, id: &str) -> Option<FakeEvent> {
        self.room.lock().unwrap().get(id).cloned()
    }

    /// Joined members of the room now (as the fake sees it).
    pub fn joined_members(&self) -> Vec<String> {
        self.room.lock().unwrap().joined_members()
    }

    // ---- scripting ----

    /// Makes requests of `kind` (see [`Request::kind`]) wait until [`FakeResident::release`].
    pub fn hold(&self, kind: &str) {
        self.inner.ctl.gate(kind).send_replace(true);
    }

    pub fn release(&self, kind: &str) {
        self.inner.ctl.gate(kind).send_replace(false);
    }

    pub fn set_state_ids_mode(&self, mode: StateIdsMode) {
        *self.inner.ctl.state_ids_mode.lock().unwrap() = mode;
    }

    /// `/state` answers with at most `limit` state events (None: all).
    pub fn set_state_limit(&self, limit: Option<usize>) {
        *self.inner.ctl.state_limit.lock().unwrap() = limit;
    }

    /// Answers requests of `kind` (see [`kind_of`]: `key`, `well_known`, `get_missing_events`, `state`, ...)
    /// with `script` instead of the normal handler, until [`FakeResident::unscript`].
    pub fn script(&self, kind: &str, script: Script) {
        self.inner.ctl.scripts.lock().unwrap().insert(kind.to_owned(), script);
    }

    pub fn unscript(&self, kind: &str) {
        self.inner.ctl.scripts.lock().unwrap().remove(kind);
    }

    /// Body bytes sent so far by scripted streaming answers.
    pub fn streamed(&self) -> u64 {
        self.inner.ctl.streamed.load(Ordering::Relaxed)
    }

    /// `get_missing_events` answers with up to `limit` events, ignoring the limit Hearth asked for (None: honour it).
    pub fn set_missing_events_limit(&self, limit: Option<usize>) {
        *self.inner.ctl.missing_events_limit.lock().unwrap() = limit;
    }

    pub fn set_servers_in_room(&self, servers: Option<Vec<String>>) {
        *self.inner.ctl.servers_in_room.lock().unwrap() = servers;
    }

    /// `/event` answers 404 for these events (until [`FakeResident::unhide`]).
    pub fn hide(&self, ids: &[&str]) {
        self.inner.ctl.hidden.lock().unwrap().extend(ids.iter().map(|i| i.to_string()));
    }

    pub fn unhide(&self) {
        self.inner.ctl.hidden.lock().unwrap().clear();
    }

    /// `get_missing_events` never returns these events nor walks past them (a gap it cannot close).
    pub fn withhold_from_missing_events(&self, ids: &[&str]) {
        self.inner.ctl.withheld.lock().unwrap().extend(ids.iter().map(|i| i.to_string()));
    }

    /// `/state_ids` and `/state` list `instead` where the state has `real` (a lying resident).
    pub fn substitute_state(&self, real: &str, instead: &str) {
        self.inner.ctl.state_substitutes.lock().unwrap().insert(real.to_owned(), instead.to_owned());
    }

    /// `/state_ids` at these events is answered even while `state_ids` is held (the hold keeps the resync's).
    pub fn free_state_ids_at(&self, ids: &[&str]) {
        self.inner.ctl.state_ids_free.lock().unwrap().extend(ids.iter().map(|i| i.to_string()));
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Request> {
        self.inner.ctl.requests.lock().unwrap().clone()
    }

    /// Requests of one kind received so far.
    pub fn requests_of(&self, kind: &str) -> Vec<Request> {
        self.requests().into_iter().filter(|r| r.kind == kind).collect()
    }

    pub fn count(&self, kind: &str) -> usize {
        self.requests_of(kind).len()
    }

    /// PDUs received through `PUT /send` (event id, PDU).
    pub fn received(&self) -> Vec<(String, Value)> {
        self.inner.ctl.received.lock().unwrap().clone()
    }

    /// Waits until `cond` holds (checked whenever a request arrives, and at least every 100 ms); panics after
    /// `timeout`. A thin wrapper of [`super::wait_until`] that also wakes on the fake's own events.
    pub async fn wait_until(&self, what: &str, timeout: Duration, cond: impl Fn(&FakeResident) -> bool) {
        let (cond, me) = (&cond, self);
        super::wait_until(what, timeout, move || async move {
            let mut changed = me.inner.ctl.changed.subscribe();
            if cond(me) {
                return Some(());
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), changed.changed()).await;
            cond(me).then_some(())
        })
        .await
    }

    /// Waits until `n` requests of `kind` arrived.
    pub async fn wait_requests(&self, kind: &str, n: usize, timeout: Duration) {
        self.wait_until(&format!("{n} `{kind}` request(s) at {}", self.name), timeout, |f| f.count(kind) >= n).await;
    }

    /// EDUs of `edu_type` Hearth sent through `/send` (their `content`s).
    pub fn edus_of(&self, edu_type: &str) -> Vec<Value> {
        let edus = self.inner.ctl.edus.lock().unwrap();
        edus.iter().filter(|e| e["edu_type"] == edu_type).map(|e| e["content"].clone()).collect()
    }

    /// Waits until Hearth sent the PDU `event_id` through `/send`; returns it.
    pub async fn wait_received(&self, event_id: &str, timeout: Duration) -> Value {
        self.wait_until(&format!("{event_id} sent to {}", self.name), timeout, |f| {
            f.received().iter().any(|(id, _)| id == event_id)
        })
        .await;
        self.received().into_iter().find(|(id, _)| id == event_id).map(|x| x.1).unwrap_or_default()
    }

    // ---- talking to Hearth ----

    /// Tells the fake where Hearth's federation listener is (Hearth's server name resolves to `addr`).
    pub fn connect(&self, hearth_name: &str, addr: SocketAddr) {
        let client = FakeFedClient::new(self.identity.clone(), addr);
        *self.hearth.lock().unwrap() = Some((hearth_name.to_owned(), Arc::new(client)));
    }

    /// [`FakeResident::connect`] to an in-process [`TestServer`].
    pub fn connect_to(&self, server: &TestServer) {
        self.connect(&server.server_name, server.running.federation_addr.expect("federation listener"));
    }

    /// A signed federation request to Hearth; `Err((status, body))` for non-2xx answers.
    pub async fn request_hearth(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, (u16, Value)> {
        let (name, client) = self.hearth.lock().unwrap().clone().expect("FakeResident::connect first");
        client.request(method, &name, path, body).await
    }

    /// The name Hearth is known by and the fake's federation client for it ([`FakeResident::connect`] first).
    pub fn hearth_client(&self) -> (String, Arc<FakeFedClient>) {
        self.hearth.lock().unwrap().clone().expect("FakeResident::connect first")
    }

    /// Sends any PDUs and EDUs to Hearth in one `PUT /send` transaction; the whole answer, or the error.
    pub async fn push_json(&self, pdus: Vec<Value>, edus: Vec<Value>) -> Result<Value, (u16, Value)> {
        let txn = format!("fake{}", random_string(12));
        let body = json!({"origin": self.name, "origin_server_ts": now_ms(), "pdus": pdus, "edus": edus});
        self.request_hearth(reqwest::Method::PUT, &format!("/_matrix/federation/v1/send/{txn}"), Some(&body)).await
    }

    /// Pushes events of the room to Hearth in one `PUT /send` transaction; returns the answer's `pdus` map.
    pub async fn push(&self, ids: &[&str]) -> Value {
        let pdus = {
            let r = self.room.lock().unwrap();
            ids.iter()
                .map(|i| r.events.get(*i).unwrap_or_else(|| panic!("unknown event {i}")).json.clone())
                .collect::<Vec<_>>()
        };
        let txn = format!("fake{}", random_string(12));
        let body = json!({"origin": self.name, "origin_server_ts": now_ms(), "pdus": pdus, "edus": []});
        let answer = self
            .request_hearth(reqwest::Method::PUT, &format!("/_matrix/federation/v1/send/{txn}"), Some(&body))
            .await
            .unwrap_or_else(|(status, body)| panic!("Hearth refused the transaction: {status} {body}"));
        answer["pdus"].clone()
    }
}

// ---- handlers -------------------------------------------------------------------------------------------------------

fn err(status: StatusCode, code: &str, msg: &str) -> Response {
    (status, axum::Json(json!({"errcode": code, "error": msg}))).into_response()
}

fn query_params(q: &Option<String>) -> Vec<(String, String)> {
    q.as_deref()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect()
}

fn param(q: &Option<String>, key: &str) -> Option<String> {
    query_params(q).into_iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

/// The `origin` of an `X-Matrix` header (not verified: the fake trusts its callers).
fn origin_of(headers: &HeaderMap) -> String {
    let h = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
    h.split(',')
        .find_map(|p| p.trim().trim_start_matches("X-Matrix ").strip_prefix("origin="))
        .map(|o| o.trim_matches('"').to_owned())
        .unwrap_or_default()
}

/// A 404 answer unless `room_id` is the fake's room.
fn check_room(r: &FakeRoom, room_id: &str) -> Option<Response> {
    (r.room_id != room_id).then(|| err(StatusCode::NOT_FOUND, "M_NOT_FOUND", "unknown room"))
}

async fn make_join(State(i): State<Shared>, UrlPath((room_id, user_id)): UrlPath<(String, String)>) -> Response {
    i.ctl.arrive("make_join", user_id.clone()).await;
    make_membership(&i, &room_id, &user_id, "join")
}

async fn make_leave(State(i): State<Shared>, UrlPath((room_id, user_id)): UrlPath<(String, String)>) -> Response {
    i.ctl.arrive("make_leave", user_id.clone()).await;
    make_membership(&i, &room_id, &user_id, "leave")
}

/// `send_leave` v2: the leave joins the DAG (and is recorded as received).
async fn send_leave(
    State(i): State<Shared>,
    UrlPath((room_id, event_id)): UrlPath<(String, String)>,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    i.ctl.arrive("send_leave", event_id.clone()).await;
    let mut r = i.room.lock().unwrap();
    if let Some(e) = check_room(&r, &room_id) {
        return e;
    }
    match r.receive(&body, true) {
        Ok(id) if id == event_id => {}
        Ok(_) => return err(StatusCode::BAD_REQUEST, "M_BAD_JSON", "event id does not match"),
        Err(e) => return err(StatusCode::BAD_REQUEST, "M_BAD_JSON", &e),
    }
    i.ctl.received.lock().unwrap().push((event_id, body));
    axum::Json(json!({})).into_response()
}

/// `make_knock`: refused (403) unless the room's join rule lets users knock.
async fn make_knock(State(i): State<Shared>, UrlPath((room_id, user_id)): UrlPath<(String, String)>) -> Response {
    i.ctl.arrive("make_knock", user_id.clone()).await;
    {
        let r = i.room.lock().unwrap();
        let rule = r
            .state_id("m.room.join_rules", "")
            .and_then(|id| r.get(&id).map(|e| e.json["content"]["join_rule"].clone()));
        if !matches!(rule.as_ref().and_then(Value::as_str), Some("knock" | "knock_restricted")) {
            return err(StatusCode::FORBIDDEN, "M_FORBIDDEN", "you may not knock on this room");
        }
    }
    make_membership(&i, &room_id, &user_id, "knock")
}

/// `send_knock`: the knock joins the DAG; the answer is the room's stripped state (create, join rules, name).
async fn send_knock(
    State(i): State<Shared>,
    UrlPath((room_id, event_id)): UrlPath<(String, String)>,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    i.ctl.arrive("send_knock", event_id.clone()).await;
    let mut r = i.room.lock().unwrap();
    if let Some(e) = check_room(&r, &room_id) {
        return e;
    }
    match r.receive(&body, true) {
        Ok(id) if id == event_id => {}
        Ok(_) => return err(StatusCode::BAD_REQUEST, "M_BAD_JSON", "event id does not match"),
        Err(e) => return err(StatusCode::BAD_REQUEST, "M_BAD_JSON", &e),
    }
    i.ctl.received.lock().unwrap().push((event_id, body));
    let stripped: Vec<Value> = ["m.room.create", "m.room.join_rules", "m.room.name"]
        .iter()
        .filter_map(|t| r.state_id(t, "").and_then(|id| r.get(&id).cloned()))
        .map(|e| json!({"type": e.json["type"], "state_key": "", "sender": e.json["sender"], "content": e.json["content"]}))
        .collect();
    axum::Json(json!({"knock_room_state": stripped})).into_response()
}

/// An unsigned `membership` event template for `user_id` on the room's current state.
fn make_membership(i: &Shared, room_id: &str, user_id: &str, membership: &str) -> Response {
    let user_id = user_id.to_owned();
    let r = i.room.lock().unwrap();
    if let Some(e) = check_room(&r, room_id) {
        return e;
    }
    let state = r.current_state();
    // A banned user may not join (as a real resident's auth rules would say).
    let banned = r
        .state_id("m.room.member", &user_id)
        .and_then(|id| r.get(&id).map(|e| e.json["content"]["membership"] == "ban"));
    if banned == Some(true) {
        return err(StatusCode::FORBIDDEN, "M_FORBIDDEN", "banned from the room");
    }
    let spec = EventSpec::member(&user_id, membership);
    let content = json!({"membership": membership});
    let auth = r.auth_for(&state, &EventSpec { content: content.clone(), ..spec });
    let depth = r.extremities.iter().map(|p| r.events[p].depth).max().unwrap_or(0) + 1;
    let mut ev = json!({
        "type": "m.room.member", "state_key": user_id, "sender": user_id, "room_id": r.room_id,
        "content": content, "depth": depth, "origin_server_ts": now_ms(),
        "prev_events": r.refs(&r.extremities),
        "auth_events": r.refs(&auth),
    });
    if !r.rules.authorization.use_room_create_sender {
        // v1-v10 templates name the resident as origin (the joiner replaces it).
        ev["origin"] = json!(i.name);
    }
    axum::Json(json!({"room_version": r.version, "event": ev})).into_response()
}

async fn send_join(
    State(i): State<Shared>,
    UrlPath((room_id, event_id)): UrlPath<(String, String)>,
    RawQuery(q): RawQuery,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    i.ctl.arrive("send_join", event_id.clone()).await;
    let omit = match param(&q, "omit_members").as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return err(StatusCode::BAD_REQUEST, "M_INVALID_PARAM", "omit_members must be true or false"),
    };
    let servers_override = i.ctl.servers_in_room.lock().unwrap().clone();
    let mut r = i.room.lock().unwrap();
    if let Some(e) = check_room(&r, &room_id) {
        return e;
    }
    let id = match r.receive(&body, true) {
        Ok(id) => id,
        Err(e) => return err(StatusCode::BAD_REQUEST, "M_BAD_JSON", &e),
    };
    if id != event_id {
        return err(StatusCode::BAD_REQUEST, "M_BAD_JSON", "event id does not match");
    }
    let join = r.events[&id].clone();
    let before = join.state_before.clone();
    let joiner = join.json["sender"].as_str().unwrap_or_default().to_owned();
    let mut state_ids: Vec<String> = Vec::new();
    for ((t, k), sid) in before.iter() {
        // Omitting members: only non-member state and the joiner's own previous membership (the room has a name,
        // so no heroes are needed).
        if omit && t == "m.room.member" && *k != joiner {
            continue;
        }
        state_ids.push(sid.clone());
    }
    let state_set: HashSet<&String> = state_ids.iter().collect();
    let chain: Vec<String> = r
        .auth_chain(state_ids.iter().cloned().chain(std::iter::once(id.clone())))
        .into_iter()
        .filter(|a| !(omit && state_set.contains(a)))
        .collect();
    let mut answer = json!({
        "origin": i.name,
        "state": r.json_of(state_ids.iter().cloned()),
        "auth_chain": r.json_of(chain),
        "event": join.json,
        "members_omitted": omit,
    });
    if omit {
        answer["servers_in_room"] = json!(servers_override.unwrap_or_else(|| r.servers_in(&before)));
    }
    axum::Json(answer).into_response()
}

/// State ids before `event_id`, and their auth chain.
fn state_at(r: &FakeRoom, event_id: &str) -> Option<(Vec<String>, Vec<String>)> {
    let e = r.events.get(event_id)?;
    let ids: Vec<String> = e.state_before.values().cloned().collect();
    let chain = r.auth_chain(ids.clone()).into_iter().collect();
    Some((ids, chain))
}

async fn state_ids(State(i): State<Shared>, UrlPath(room_id): UrlPath<String>, RawQuery(q): RawQuery) -> Response {
    let event_id = param(&q, "event_id").unwrap_or_default();
    if i.ctl.state_ids_free.lock().unwrap().contains(&event_id) {
        i.ctl.record("state_ids", event_id.clone());
    } else {
        i.ctl.arrive("state_ids", event_id.clone()).await;
    }
    match *i.ctl.state_ids_mode.lock().unwrap() {
        StateIdsMode::Normal | StateIdsMode::BogusMembers => {}
        StateIdsMode::Error => return err(StatusCode::INTERNAL_SERVER_ERROR, "M_UNKNOWN", "scripted failure"),
        StateIdsMode::Bogus => {
            let ids: Vec<String> =
                (0..30).map(|n| format!("$bogus{n}AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")).collect();
            return axum::Json(json!({"pdu_ids": ids, "auth_chain_ids": []})).into_response();
        }
    }
    let mode = *i.ctl.state_ids_mode.lock().unwrap();
    let r = i.room.lock().unwrap();
    if let Some(e) = check_room(&r, &room_id) {
        return e;
    }
    match state_at(&r, &event_id).map(|(ids, chain)| (i.ctl.substitute(ids), chain)) {
        Some((ids, chain)) if mode == StateIdsMode::BogusMembers => {
            let mut out: Vec<String> =
                ids.into_iter().filter(|id| r.events[id].json["type"] != "m.room.member").collect();
            out.extend((0..30).map(|n| format!("$bogusmember{n}AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")));
            axum::Json(json!({"pdu_ids": out, "auth_chain_ids": chain})).into_response()
        }
        Some((ids, chain)) => axum::Json(json!({"pdu_ids": ids, "auth_chain_ids": chain})).into_response(),
        None => err(StatusCode::NOT_FOUND, "M_NOT_FOUND", "unknown event"),
    }
}

async fn state(State(i): State<Shared>, UrlPath(room_id): UrlPath<String>, RawQuery(q): RawQuery) -> Response {
    let event_id = param(&q, "event_id").unwrap_or_default();
    i.ctl.arrive("state", event_id.clone()).await;
    let limit = *i.ctl.state_limit.lock().unwrap();
    let r = i.room.lock().unwrap();
    if let Some(e) = check_room(&r, &room_id) {
        return e;
    }
    match state_at(&r, &event_id).map(|(ids, chain)| (i.ctl.substitute(ids), chain)) {
        Some((mut ids, chain)) => {
            if let Some(l) = limit {
                ids.truncate(l);
            }
            axum::Json(json!({"pdus": r.json_of(ids), "auth_chain": r.json_of(chain)})).into_response()
        }
        None => err(StatusCode::NOT_FOUND, "M_NOT_FOUND", "unknown event"),
    }
}

async fn event(State(i): State<Shared>, UrlPath(event_id): UrlPath<String>) -> Response {
    i.ctl.arrive("event", event_id.clone()).await;
    if i.ctl.hidden.lock().unwrap().contains(&event_id) {
        return err(StatusCode::NOT_FOUND, "M_NOT_FOUND", "unknown event (hidden by the test)");
    }
    let r = i.room.lock().unwrap();
    match r.events.get(&event_id) {
        Some(e) => {
            axum::Json(json!({"origin": i.name, "origin_server_ts": now_ms(), "pdus": [e.json]})).into_response()
        }
        None => err(StatusCode::NOT_FOUND, "M_NOT_FOUND", "unknown event"),
    }
}

async fn event_auth(State(i): State<Shared>, UrlPath((room_id, event_id)): UrlPath<(String, String)>) -> Response {
    i.ctl.arrive("event_auth", event_id.clone()).await;
    let r = i.room.lock().unwrap();
    if let Some(e) = check_room(&r, &room_id) {
        return e;
    }
    if !r.events.contains_key(&event_id) {
        return err(StatusCode::NOT_FOUND, "M_NOT_FOUND", "unknown event");
    }
    let chain = r.auth_chain([event_id]);
    axum::Json(json!({"auth_chain": r.json_of(chain)})).into_response()
}

/// Walks prev events back from `from` (breadth first), not past `stop`, up to `limit` events.
fn walk_back(
    r: &FakeRoom,
    from: &[String],
    stop: &HashSet<String>,
    limit: usize,
    include_start: bool,
) -> Vec<FakeEvent> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut queue: VecDeque<String> = VecDeque::new();
    for f in from {
        if include_start {
            queue.push_back(f.clone());
        } else if let Some(e) = r.events.get(f) {
            queue.extend(e.prev.iter().cloned());
        }
    }
    while let Some(id) = queue.pop_front() {
        if out.len() >= limit || stop.contains(&id) || !seen.insert(id.clone()) {
            continue;
        }
        let Some(e) = r.events.get(&id) else { continue };
        queue.extend(e.prev.iter().cloned());
        out.push(e.clone());
    }
    out
}

async fn get_missing_events(
    State(i): State<Shared>,
    UrlPath(room_id): UrlPath<String>,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    i.ctl.arrive("get_missing_events", body.to_string()).await;
    let r = i.room.lock().unwrap();
    if let Some(e) = check_room(&r, &room_id) {
        return e;
    }
    let strs = |k: &str| -> Vec<String> {
        body.get(k)
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
            .unwrap_or_default()
    };
    let mut stop: HashSet<String> = strs("earliest_events").into_iter().collect();
    stop.extend(i.ctl.withheld.lock().unwrap().iter().cloned());
    let limit = body.get("limit").and_then(Value::as_u64).unwrap_or(10) as usize;
    let limit = i.ctl.missing_events_limit.lock().unwrap().unwrap_or(limit);
    let mut evs = walk_back(&r, &strs("latest_events"), &stop, limit, false);
    evs.sort_by_key(|e| e.depth);
    axum::Json(json!({"events": evs.into_iter().map(|e| e.json).collect::<Vec<_>>()})).into_response()
}

async fn backfill(State(i): State<Shared>, UrlPath(room_id): UrlPath<String>, RawQuery(q): RawQuery) -> Response {
    i.ctl.arrive("backfill", q.clone().unwrap_or_default()).await;
    let params = query_params(&q);
    let from: Vec<String> = params.iter().filter(|(k, _)| k == "v").map(|(_, v)| v.clone()).collect();
    let limit = params.iter().find(|(k, _)| k == "limit").and_then(|(_, v)| v.parse().ok()).unwrap_or(10usize).min(100);
    let r = i.room.lock().unwrap();
    if let Some(e) = check_room(&r, &room_id) {
        return e;
    }
    let evs = walk_back(&r, &from, &HashSet::new(), limit, true);
    axum::Json(json!({"origin": i.name, "origin_server_ts": now_ms(), "pdus": evs.into_iter().map(|e| e.json).collect::<Vec<_>>()}))
        .into_response()
}

async fn send(
    State(i): State<Shared>,
    UrlPath(txn): UrlPath<String>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    i.ctl.arrive("send", format!("{txn} from {}", origin_of(&headers))).await;
    let mut results = serde_json::Map::new();
    {
        let mut r = i.room.lock().unwrap();
        let mut received = i.ctl.received.lock().unwrap();
        for pdu in body.get("pdus").and_then(Value::as_array).cloned().unwrap_or_default() {
            let mut obj: CanonicalJsonObject = match serde_json::from_value(pdu.clone()) {
                Ok(o) => o,
                Err(_) => continue,
            };
            obj.remove("unsigned");
            let Ok(id) = event_id_of(&obj, &r.rules) else { continue };
            received.push((id.to_string(), pdu.clone()));
            // Hearth's events become part of the fake's DAG (so later fake events build on them).
            if pdu.get("room_id").and_then(Value::as_str) == Some(r.room_id.as_str()) {
                let _ = r.receive(&pdu, true);
            }
            results.insert(id.to_string(), json!({}));
        }
        let edus = body.get("edus").and_then(Value::as_array).cloned().unwrap_or_default();
        i.ctl.edus.lock().unwrap().extend(edus);
    }
    i.ctl.bump();
    axum::Json(json!({"pdus": results})).into_response()
}

// ---- helpers for tests ------------------------------------------------------------------------------------------------

/// Joins the fake's room through the fake (`via`) and panics unless 200.
pub async fn join_via(client: &Client, fake: &FakeResident) -> Value {
    let room = fake.room_id();
    let path = format!("/join/{}?server_name={}", super::enc(&room), super::enc(&fake.name));
    client.post(&path, json!({})).await.ok()
}

/// Sorted user ids of a `/joined_members` answer.
pub fn joined_ids(body: &Value) -> Vec<String> {
    let mut v: Vec<String> = body["joined"].as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default();
    v.sort();
    v
}

/// Waits up to `timeout` for a future; `None` if it did not finish.
pub async fn within<T>(timeout: Duration, f: impl std::future::Future<Output = T>) -> Option<T> {
    tokio::time::timeout(timeout, f).await.ok()
}
