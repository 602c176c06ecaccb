//! `hearth-bench stateres`: state resolution at scale. A resident Hearth holds the N-member world room; a scripted
//! remote server (this process: its own signing key and TLS listener, serving keys, `/event` and
//! `/get_missing_events`) joins the room through the resident (`make_join`/`send_join`) and is given power level
//! 100. Then the two are partitioned: both sides change the power levels, memberships and the topic on the same fork
//! point, unaware of each other. The remote heals the partition by sending its fork in one `/send`; the resident
//! resolves the two branches (state resolution v2 over two 100k-member states) and its next local event merges
//! them. The run measures the `/send`, the time until the resolved state is visible, the merging send and the
//! resident's CPU and memory, and checks the resolved state is what the algorithm says (see [`expected`]).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axum::extract::{Path, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use hearth::room::append::{build_pdu, LocalEvent};
use hearth::room::{version, Identity, Pdu};
use ruma::canonical_json::{CanonicalJsonObject, CanonicalJsonValue};
use ruma::signatures::Ed25519KeyPair;
use serde_json::{json, Value};

use crate::run::{self, api, proc_usage, q};

pub struct Options {
    pub members: Vec<usize>,
    /// New users of the remote server who join during the partition.
    pub joins: usize,
    pub messages: usize,
    pub seed: u64,
    pub dir: PathBuf,
    /// Record a `perf` profile of the resident from the heal to the end of the merge.
    pub perf: bool,
}

#[derive(serde::Serialize, Clone, Debug, Default)]
struct Measure {
    members: usize,
    state_events: usize,
    fork_pdus: usize,
    send_ms: f64,
    visible_ms: f64,
    merge_send_ms: f64,
    resident_cpu_s: f64,
    peak_rss_before_mb: f64,
    peak_rss_after_mb: f64,
    remote_requests: BTreeMap<String, u64>,
    checks: usize,
}

/// The scripted remote: what it serves, and what the resident asked of it.
struct Remote {
    identity: Arc<Identity>,
    /// Events it can serve by id (its own).
    events: Mutex<HashMap<String, Value>>,
    /// Its side of the fork, in order (the answer to `/get_missing_events`).
    fork: Mutex<Vec<Value>>,
    requests: Mutex<BTreeMap<String, u64>>,
    received_pdus: AtomicU64,
}

impl Remote {
    fn count(&self, what: &str) {
        *self.requests.lock().unwrap_or_else(|e| e.into_inner()).entry(what.to_owned()).or_default() += 1;
    }
}

async fn key(State(r): State<Arc<Remote>>) -> Response {
    r.count("key");
    let id = &r.identity;
    match hearth::federation::keys::sign_value(
        id,
        json!({
            "server_name": id.server_name.as_str(),
            "verify_keys": {id.key_id.clone(): {"key": id.public_key_b64}},
            "old_verify_keys": {},
            "valid_until_ts": hearth::store::accounts::now_ms() + 24 * 3600 * 1000,
        }),
    ) {
        Ok(v) => Json(v).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// The resident's own transactions: recorded, never built on (the partition: the remote does not see them).
async fn send(State(r): State<Arc<Remote>>, Path(_txn): Path<String>, Json(body): Json<Value>) -> Json<Value> {
    r.count("send");
    let n = body["pdus"].as_array().map(Vec::len).unwrap_or(0) as u64;
    r.received_pdus.fetch_add(n, Ordering::Relaxed);
    Json(json!({"pdus": {}}))
}

async fn event(State(r): State<Arc<Remote>>, Path(id): Path<String>) -> Response {
    r.count("event");
    match r.events.lock().unwrap_or_else(|e| e.into_inner()).get(&id) {
        Some(ev) => Json(json!({
            "origin": r.identity.server_name.as_str(),
            "origin_server_ts": hearth::store::accounts::now_ms(),
            "pdus": [ev],
        }))
        .into_response(),
        None => not_found(),
    }
}

async fn missing_events(State(r): State<Arc<Remote>>, Path(_room): Path<String>) -> Json<Value> {
    r.count("get_missing_events");
    let events = r.fork.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Json(json!({"events": events}))
}

async fn fallback(State(r): State<Arc<Remote>>, uri: Uri) -> Response {
    // Anything else (state_ids, device lists, profiles): counted, and refused.
    let path = uri.path();
    let what = path.split('/').filter(|s| !s.is_empty()).take(4).collect::<Vec<_>>().join("/");
    r.count(&what);
    not_found()
}

fn not_found() -> Response {
    (StatusCode::NOT_FOUND, Json(json!({"errcode": "M_NOT_FOUND", "error": "not here"}))).into_response()
}

/// The remote: its TLS listener and state, and its federation client towards the resident `resident` (reached where
/// the resident's configuration in `dir` says it listens: a world copied from another directory keeps its server
/// name, and may listen on another port).
async fn start_remote(
    dir: &std::path::Path,
    resident: &str,
) -> anyhow::Result<(Arc<Remote>, hearth::federation::client::FedClient)> {
    let port = run::free_port()?;
    let name = format!("127.0.0.1:{port}");
    let der = Ed25519KeyPair::generate();
    let keypair = Ed25519KeyPair::from_der(&der, "bench".into()).map_err(|e| anyhow::anyhow!("{e}"))?;
    use base64::Engine;
    let public_key_b64 = base64::engine::general_purpose::STANDARD_NO_PAD.encode(keypair.public_key());
    let identity = Arc::new(Identity {
        server_name: ruma::ServerName::parse(&name)?,
        keypair,
        key_id: "ed25519:bench".into(),
        public_key_b64,
    });
    let remote = Arc::new(Remote {
        identity: identity.clone(),
        events: Mutex::default(),
        fork: Mutex::default(),
        requests: Mutex::default(),
        received_pdus: AtomicU64::new(0),
    });
    let app = Router::new()
        .route("/_matrix/key/v2/server", get(key))
        .route("/_matrix/federation/v1/send/{txn}", put(send))
        .route("/_matrix/federation/v1/event/{id}", get(event))
        .route("/_matrix/federation/v1/get_missing_events/{room}", post(missing_events))
        .fallback(fallback)
        .with_state(remote.clone());
    let remote_dir = dir.join("remote");
    std::fs::create_dir_all(&remote_dir)?;
    let (crt, key) = run::self_signed(&remote_dir)?;
    let acceptor = hearth::federation::tls::load_acceptor(&crt, &key)?;
    let tcp = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let listener = hearth::federation::tls::TlsListener::new(tcp, acceptor)?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let mut config =
        hearth::config::Federation { verify_certificates: false, allow_private_ips: true, ..Default::default() };
    let resident_config = hearth::config::Config::load(Some(&dir.join("hearth.toml")))?;
    if let Some(addr) = resident_config.listen.federation {
        config.resolve.insert(resident.to_owned(), addr.to_string());
    }
    let client = hearth::federation::client::FedClient::new(identity, config)?;
    Ok((remote, client))
}

fn sha_of(obj: &CanonicalJsonObject) -> String {
    match obj.get("hashes") {
        Some(CanonicalJsonValue::Object(h)) => match h.get("sha256") {
            Some(CanonicalJsonValue::String(s)) => s.clone(),
            _ => String::new(),
        },
        _ => String::new(),
    }
}

type Ref = (ruma::OwnedEventId, String);

/// The remote's side of the fork: events on the fork point, chained, with the auth events its own view of the
/// state gives (the state at the fork point, then its own changes).
struct Fork {
    rules: ruma::room_version_rules::RoomVersionRules,
    room_id: ruma::OwnedRoomId,
    state: HashMap<(String, String), Ref>,
    prev: Ref,
    depth: i64,
    ts: i64,
    out: Vec<Pdu>,
}

impl Fork {
    fn add(&mut self, id: &Identity, sender: &str, kind: &str, key: &str, content: Value) -> anyhow::Result<String> {
        let raw = serde_json::value::to_raw_value(&content)?;
        let sender_id = ruma::UserId::parse(sender)?;
        let types =
            ruma::state_res::auth_types_for_event(&kind.into(), &sender_id, Some(key), &raw, &self.rules.authorization)
                .map_err(|e| anyhow::anyhow!(e))?;
        let auth: Vec<Ref> =
            types.iter().filter_map(|(t, k)| self.state.get(&(t.to_string(), k.clone())).cloned()).collect();
        self.depth += 1;
        // Distinct, increasing timestamps: the mainline ordering breaks ties on them.
        self.ts += 1;
        let mut ev = LocalEvent::state(kind, key, content);
        ev.ts = Some(self.ts);
        let pdu = build_pdu(
            id,
            &self.rules,
            Some(&*self.room_id),
            &sender_id,
            &ev,
            std::slice::from_ref(&self.prev),
            &auth,
            self.depth,
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        let r = (pdu.event_id.clone(), sha_of(&pdu.json));
        self.state.insert((kind.to_owned(), key.to_owned()), r.clone());
        self.prev = r;
        let event_id = pdu.event_id.to_string();
        self.out.push(pdu);
        Ok(event_id)
    }
}

/// Current peak (VmHWM) and resident (VmRSS) memory of a process, MB.
fn rss_now(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

async fn client_ok(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    token: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let (st, v) = api(http, method.clone(), url, Some(token), body).await?;
    anyhow::ensure!(st == 200, "{method} {url}: {st} {v}");
    Ok(v)
}

async fn fed_event(fed: &hearth::federation::client::FedClient, dest: &str, id: &str) -> anyhow::Result<Value> {
    let v = fed
        .request(reqwest::Method::GET, dest, &format!("/_matrix/federation/v1/event/{}", q(id)), None)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(v["pdus"][0].clone())
}

/// What the fork must resolve to, with the reasoning of state resolution v2 (room version 12) for this script:
///
/// * Power events, in reverse topological power order: the resident's power levels `PL1` (sent by the room's
///   creator, whose power is infinite) sort before the remote's `PL2` (sender at 100); both pass the iterative
///   auth checks, the later applied wins: **`PL2`** (the remote took the promotions of `PL1` back: it may, at
///   100 against their 50). The kicks and bans of both sides pass (each target's pre-fork join, in the ban's or
///   kick's auth chain, is applied before it): the resident's kicks and bans, the **remote's bans of the users
///   the resident promoted** (their level in `PL2` is 0).
/// * The other events by mainline order under `PL2`: the resident's topic hangs off `PL1`, whose closest mainline
///   event is the fork point, the remote's off `PL2`, later in the mainline: **the remote's topic**. The remote's
///   new users' joins pass (public room), then one of them leaves.
struct Expected {
    power_levels: Value,
    topic: String,
    memberships: Vec<(String, &'static str)>,
}

pub async fn run(o: Options) -> anyhow::Result<()> {
    std::fs::create_dir_all(&o.dir)?;
    let http = reqwest::Client::builder().build()?;
    let mut results = Vec::new();
    for &n in &o.members {
        let m = one(&http, &o, n).await.with_context(|| format!("N={n}"))?;
        results.push(m);
    }
    println!(
        "\n{:>7} {:>8} {:>5} {:>10} {:>11} {:>10} {:>10} {:>13} {:>12}  checks",
        "members", "state", "pdus", "/send ms", "visible ms", "merge ms", "res cpu s", "peak before", "peak after"
    );
    for m in &results {
        println!(
            "{:>7} {:>8} {:>5} {:>10.0} {:>11.0} {:>10.0} {:>10.1} {:>10.0} MB {:>9.0} MB  {} passed",
            m.members,
            m.state_events,
            m.fork_pdus,
            m.send_ms,
            m.visible_ms,
            m.merge_send_ms,
            m.resident_cpu_s,
            m.peak_rss_before_mb,
            m.peak_rss_after_mb,
            m.checks
        );
    }
    let stamp = hearth::store::accounts::now_ms();
    let path = o.dir.join(format!("stateres-{stamp}.json"));
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&json!({"results": results, "command": std::env::args().collect::<Vec<_>>()}))?,
    )?;
    println!("wrote {}", path.display());
    Ok(())
}

async fn one(http: &reqwest::Client, o: &Options, n: usize) -> anyhow::Result<Measure> {
    let ro = run::Options {
        members: vec![n],
        messages: o.messages,
        joiners: vec![],
        seed: o.seed,
        dir: o.dir.clone(),
        runs: 1,
        limits: Default::default(),
    };
    let r = run::start_resident(http, &ro, n).await?;
    let result = fork_and_heal(http, o, &r, n).await;
    r.proc.stop();
    result
}

async fn fork_and_heal(http: &reqwest::Client, o: &Options, r: &run::Resident, n: usize) -> anyhow::Result<Measure> {
    let room = r.world.room_id.clone();
    let rq = q(&room);
    let rules = version::rules("12").map_err(|e| anyhow::anyhow!("{e}"))?;
    let (remote, fed) = start_remote(&r.dir, &r.server_name).await?;
    let rname = remote.identity.server_name.to_string();
    let dest = r.server_name.as_str();
    eprintln!(
        "== N={n}: resident {} ({} events, {} state); remote {rname}",
        dest, r.world.events, r.world.state_events
    );

    // 1. The remote's user joins through the resident (partial state answer: it needs no member list).
    let ruser = format!("@remote:{rname}");
    let t = Instant::now();
    let tmpl = fed
        .request(
            reqwest::Method::GET,
            dest,
            &format!("/_matrix/federation/v1/make_join/{rq}/{}?ver=12", q(&ruser)),
            None,
        )
        .await
        .map_err(|e| anyhow::anyhow!("make_join: {e}"))?;
    let mut join: CanonicalJsonObject = serde_json::from_value(tmpl["event"].clone())?;
    join.insert(
        "origin_server_ts".into(),
        CanonicalJsonValue::Integer(ruma::Int::try_from(hearth::store::accounts::now_ms())?),
    );
    ruma::signatures::hash_and_sign_event(&rname, &remote.identity.keypair, &mut join, &rules.redaction)?;
    let join_id = version::event_id(&join, &rules).map_err(|e| anyhow::anyhow!(e))?;
    let join_json = serde_json::to_value(&join)?;
    fed.request(
        reqwest::Method::PUT,
        dest,
        &format!("/_matrix/federation/v2/send_join/{rq}/{}?omit_members=true", q(join_id.as_str())),
        Some(&join_json),
    )
    .await
    .map_err(|e| anyhow::anyhow!("send_join: {e}"))?;
    remote.events.lock().unwrap_or_else(|e| e.into_inner()).insert(join_id.to_string(), join_json);
    let join_ms = t.elapsed().as_secs_f64() * 1000.0;

    // 2. The resident's admin (the room's creator) gives the remote's user power level 100: P0, the fork point.
    let base = format!("{}/_matrix/client/v3/rooms/{rq}", r.url);
    let get = reqwest::Method::GET;
    let put = reqwest::Method::PUT;
    let pl_world = client_ok(http, get.clone(), &format!("{base}/state/m.room.power_levels/"), &r.token, None).await?;
    let mut p0 = pl_world.clone();
    p0["users"][&ruser] = json!(100);
    let p0_id = client_ok(http, put.clone(), &format!("{base}/state/m.room.power_levels/"), &r.token, Some(p0.clone()))
        .await?["event_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let p0_pdu = fed_event(&fed, dest, &p0_id).await?;

    // Targets: joined members with no power of their own, in the member list's order.
    let t = Instant::now();
    let members = client_ok(http, get.clone(), &format!("{base}/members?membership=join"), &r.token, None).await?;
    let members_ms = t.elapsed().as_secs_f64() * 1000.0;
    let mut targets: Vec<(String, String)> = members["chunk"]
        .as_array()
        .context("members chunk")?
        .iter()
        .filter(|e| e["content"]["membership"] == "join")
        .filter_map(|e| Some((e["state_key"].as_str()?.to_owned(), e["event_id"].as_str()?.to_owned())))
        .filter(|(u, _)| *u != r.world.admin && *u != ruser && p0["users"].get(u).is_none())
        .collect();
    targets.sort();
    anyhow::ensure!(targets.len() >= 11, "only {} joined members to script with", targets.len());
    let promoted: Vec<(String, String)> = targets[0..5].to_vec();
    let kicked: Vec<String> = targets[5..8].iter().map(|t| t.0.clone()).collect();
    let banned: Vec<String> = targets[8..11].iter().map(|t| t.0.clone()).collect();

    // 3. Partition. The resident's side: its admin promotes five members, kicks three, bans three, sets the topic.
    let t = Instant::now();
    let mut pl1 = p0.clone();
    for (u, _) in &promoted {
        pl1["users"][u] = json!(50);
    }
    client_ok(http, put.clone(), &format!("{base}/state/m.room.power_levels/"), &r.token, Some(pl1)).await?;
    for u in &kicked {
        client_ok(http, reqwest::Method::POST, &format!("{base}/kick"), &r.token, Some(json!({"user_id": u}))).await?;
    }
    for u in &banned {
        client_ok(http, reqwest::Method::POST, &format!("{base}/ban"), &r.token, Some(json!({"user_id": u}))).await?;
    }
    let res_topic = "Topic from the resident's side of the fork";
    let res_tip = client_ok(
        http,
        put.clone(),
        &format!("{base}/state/m.room.topic/"),
        &r.token,
        Some(json!({"topic": res_topic})),
    )
    .await?["event_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let resident_side_ms = t.elapsed().as_secs_f64() * 1000.0;

    // The remote's side, on the fork point P0: its own power levels (one of its new users at 50; the resident's
    // promotions are not in it), the topic, bans of the five members the resident promoted, joins of new users,
    // and a leave.
    let mut state: HashMap<(String, String), Ref> = HashMap::new();
    let p0_obj: CanonicalJsonObject = serde_json::from_value(p0_pdu.clone())?;
    state.insert(
        ("m.room.power_levels".into(), String::new()),
        (ruma::OwnedEventId::try_from(p0_id.as_str())?, sha_of(&p0_obj)),
    );
    for a in tmpl["event"]["auth_events"].as_array().context("template auth events")? {
        let id = a.as_str().context("auth event id")?;
        let ev = fed_event(&fed, dest, id).await?;
        if ev["type"] == "m.room.join_rules" {
            let obj: CanonicalJsonObject = serde_json::from_value(ev)?;
            state
                .insert(("m.room.join_rules".into(), String::new()), (ruma::OwnedEventId::try_from(id)?, sha_of(&obj)));
        }
    }
    state.insert(("m.room.member".into(), ruser.clone()), (join_id.clone(), sha_of(&join)));
    for (u, id) in &promoted {
        state.insert(("m.room.member".into(), u.clone()), (ruma::OwnedEventId::try_from(id.as_str())?, String::new()));
    }
    let mut fork = Fork {
        rules: rules.clone(),
        room_id: ruma::OwnedRoomId::try_from(room.as_str())?,
        state,
        prev: (ruma::OwnedEventId::try_from(p0_id.as_str())?, sha_of(&p0_obj)),
        depth: p0_pdu["depth"].as_i64().context("depth")?,
        ts: hearth::store::accounts::now_ms(),
        out: Vec::new(),
    };
    let id = remote.identity.clone();
    let joiners: Vec<String> = (1..=o.joins.max(2)).map(|i| format!("@j{i}:{rname}")).collect();
    let mut pl2 = p0.clone();
    pl2["users"][&joiners[0]] = json!(50);
    fork.add(&id, &ruser, "m.room.power_levels", "", pl2.clone())?;
    let remote_topic = "Topic from the remote's side of the fork";
    fork.add(&id, &ruser, "m.room.topic", "", json!({"topic": remote_topic}))?;
    for (u, _) in &promoted {
        fork.add(&id, &ruser, "m.room.member", u, json!({"membership": "ban", "reason": "fork"}))?;
    }
    for j in &joiners {
        fork.add(&id, j, "m.room.member", j, json!({"membership": "join", "displayname": "joined in the fork"}))?;
    }
    let leaver = joiners[1].clone();
    let remote_tip = fork.add(&id, &leaver, "m.room.member", &leaver, json!({"membership": "leave"}))?;
    let pdus: Vec<Value> = fork.out.iter().map(|p| serde_json::to_value(&p.json)).collect::<Result<_, _>>()?;
    {
        let mut evs = remote.events.lock().unwrap_or_else(|e| e.into_inner());
        for (p, v) in fork.out.iter().zip(&pdus) {
            evs.insert(p.event_id.to_string(), v.clone());
        }
        *remote.fork.lock().unwrap_or_else(|e| e.into_inner()) = pdus.clone();
    }
    let mut memberships: Vec<(String, &'static str)> = Vec::new();
    memberships.extend(promoted.iter().map(|(u, _)| (u.clone(), "ban")));
    memberships.extend(kicked.iter().map(|u| (u.clone(), "leave")));
    memberships.extend(banned.iter().map(|u| (u.clone(), "ban")));
    memberships.extend(joiners.iter().map(|j| (j.clone(), if *j == leaver { "leave" } else { "join" })));
    memberships.push((ruser.clone(), "join"));
    let expected = Expected { power_levels: pl2, topic: remote_topic.into(), memberships };
    eprintln!(
        "   remote joined in {join_ms:.0} ms; member list {members_ms:.0} ms; resident side (PL, 3 kicks, 3 bans, \
         topic) {resident_side_ms:.0} ms; remote side: {} events",
        pdus.len()
    );

    // 4. Heal: the remote's fork in one transaction; the resident resolves.
    let pid = r.proc.pid();
    let (peak_before, cpu_before) = proc_usage(pid);
    let perf = if o.perf { Some(start_perf(pid, &r.dir)?) } else { None };
    let t0 = Instant::now();
    let txn = json!({"origin": rname, "origin_server_ts": hearth::store::accounts::now_ms(), "pdus": pdus});
    let answer = fed
        .request_timeout(
            put.clone(),
            dest,
            &format!("/_matrix/federation/v1/send/heal{}", hearth::store::accounts::now_ms()),
            Some(&txn),
            Duration::from_secs(1800),
        )
        .await
        .map_err(|e| anyhow::anyhow!("/send: {e}"))?;
    let send_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let refused: Vec<String> = answer["pdus"]
        .as_object()
        .map(|m| m.iter().filter(|(_, v)| v.get("error").is_some()).map(|(k, v)| format!("{k}: {v}")).collect())
        .unwrap_or_default();
    anyhow::ensure!(refused.is_empty(), "the resident refused fork PDUs: {refused:?}");
    // The resolved power levels are the remote's (they name its first new user).
    let end = Instant::now() + Duration::from_secs(1800);
    loop {
        let (st, v) =
            api(http, get.clone(), &format!("{base}/state/m.room.power_levels/"), Some(&r.token), None).await?;
        if st == 200 && v["users"].get(&joiners[0]).is_some() {
            break;
        }
        anyhow::ensure!(Instant::now() < end, "the resolved power levels never showed the remote's: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let visible_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let (_, cpu_healed) = proc_usage(pid);
    let mut checks = check_state(http, &base, &r.token, &expected).await?;

    // 5. The resident's next local event merges the two branches.
    let t1 = Instant::now();
    let merge = client_ok(
        http,
        put.clone(),
        &format!("{base}/send/m.room.message/merge{}", hearth::store::accounts::now_ms()),
        &r.token,
        Some(json!({"msgtype": "m.text", "body": "after the partition"})),
    )
    .await?;
    let merge_send_ms = t1.elapsed().as_secs_f64() * 1000.0;
    let (peak_after, cpu_after) = proc_usage(pid);
    if let Some(p) = perf {
        stop_perf(p, &r.dir)?;
    }
    let merge_id = merge["event_id"].as_str().unwrap_or_default().to_owned();
    let merged = fed_event(&fed, dest, &merge_id).await?;
    let prevs: Vec<&str> =
        merged["prev_events"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    anyhow::ensure!(
        prevs.contains(&res_tip.as_str()) && prevs.contains(&remote_tip.as_str()),
        "the merging event cites {prevs:?}, not both tips ({res_tip}, {remote_tip})"
    );
    checks += 1;
    checks += check_state(http, &base, &r.token, &expected).await?;
    let requests = remote.requests.lock().unwrap_or_else(|e| e.into_inner()).clone();
    eprintln!(
        "   heal: /send of {} PDUs answered in {send_ms:.0} ms; resolved power levels visible after {visible_ms:.0} ms \
         (resident cpu {:.1} s)",
        pdus.len(),
        cpu_healed - cpu_before
    );
    eprintln!(
        "   merge: local send citing both tips {merge_send_ms:.0} ms; resident cpu heal+merge {:.1} s; peak RSS \
         {peak_before:.0} MB before, {peak_after:.0} MB after (RSS now {:.0} MB)",
        cpu_after - cpu_before,
        rss_now(pid)
    );
    eprintln!("   resident asked the remote: {requests:?}; {checks} checks passed");
    Ok(Measure {
        members: n,
        state_events: r.world.state_events,
        fork_pdus: pdus.len(),
        send_ms,
        visible_ms,
        merge_send_ms,
        resident_cpu_s: cpu_after - cpu_before,
        peak_rss_before_mb: peak_before,
        peak_rss_after_mb: peak_after,
        remote_requests: requests,
        checks,
    })
}

/// Checks the resident's current state against [`Expected`]; returns how many checks passed (fails on the first
/// that does not).
async fn check_state(http: &reqwest::Client, base: &str, token: &str, e: &Expected) -> anyhow::Result<usize> {
    let get = reqwest::Method::GET;
    let mut n = 0;
    let pl = client_ok(http, get.clone(), &format!("{base}/state/m.room.power_levels/"), token, None).await?;
    if pl["users"] != e.power_levels["users"] {
        bail!("resolved power levels: {} (expected the remote's: {})", pl["users"], e.power_levels["users"]);
    }
    n += 1;
    let topic = client_ok(http, get.clone(), &format!("{base}/state/m.room.topic/"), token, None).await?;
    if topic["topic"] != e.topic.as_str() {
        bail!("resolved topic: {topic} (expected {:?})", e.topic);
    }
    n += 1;
    for (u, want) in &e.memberships {
        let (st, v) =
            api(http, get.clone(), &format!("{base}/state/m.room.member/{}", q(u)), Some(token), None).await?;
        let got = if st == 200 { v["membership"].as_str().unwrap_or("?").to_owned() } else { format!("{st}") };
        if got != *want {
            bail!("resolved membership of {u}: {got} (expected {want})");
        }
        n += 1;
    }
    Ok(n)
}

fn start_perf(pid: u32, dir: &std::path::Path) -> anyhow::Result<std::process::Child> {
    let out = dir.join("perf.data");
    let child = Command::new("perf")
        .args(["record", "-F", "997", "-g", "-p", &pid.to_string(), "-o"])
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("perf.log"))?)
        .spawn()
        .context("perf")?;
    std::thread::sleep(Duration::from_millis(500));
    Ok(child)
}

fn stop_perf(mut child: std::process::Child, dir: &std::path::Path) -> anyhow::Result<()> {
    let _ = Command::new("kill").arg("-INT").arg(child.id().to_string()).status();
    let _ = child.wait();
    eprintln!("   profile: perf report --no-children --stdio -i {}", dir.join("perf.data").display());
    Ok(())
}
