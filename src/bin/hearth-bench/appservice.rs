//! `hearth-bench appservice`: what application services cost. (1) The transaction sender's throughput: a backlog
//! of N messages builds up while the one service answers 503, then the time until it has received them all gives
//! events per second. (2) The extra time a message send takes with ten services registered (each with a user in
//! the room, so every one is interested), against the same server with none: median and p95 of sequential sends.
//! In-process servers on loopback with fresh databases; prints the figures (it asserts nothing).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

pub struct Options {
    pub events: usize,
    pub sends: usize,
    pub dir: PathBuf,
}

/// A receiving application service: counts the events it accepts; answers 503 while `down`.
#[derive(Default)]
struct Receiver {
    events: AtomicUsize,
    down: AtomicBool,
}

async fn receiver() -> anyhow::Result<(Arc<Receiver>, String)> {
    use axum::routing::put;
    let r = Arc::new(Receiver::default());
    let app = axum::Router::new()
        .route(
            "/_matrix/app/v1/transactions/{txn}",
            put(|axum::extract::State(r): axum::extract::State<Arc<Receiver>>, axum::Json(b): axum::Json<Value>| async move {
                if r.down.load(Ordering::SeqCst) {
                    return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                }
                r.events.fetch_add(b["events"].as_array().map_or(0, Vec::len), Ordering::SeqCst);
                axum::http::StatusCode::OK
            }),
        )
        .with_state(r.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((r, url))
}

struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    async fn call(&self, token: &str, method: reqwest::Method, path: &str, body: Value) -> anyhow::Result<Value> {
        let url = format!("{}/_matrix/client/v3{path}", self.base);
        let r = self.http.request(method, url).bearer_auth(token).json(&body).send().await?;
        let status = r.status();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("{path}: {status} {v}");
        }
        Ok(v)
    }
}

fn write_registration(dir: &Path, i: usize, url: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(format!("bridge{i}.yaml"));
    std::fs::write(
        &path,
        format!(
            "id: bridge{i}\nurl: {url}\nas_token: as{i}\nhs_token: hs{i}\nsender_localpart: bot{i}\nrate_limited: false\n\
             namespaces:\n  users:\n    - exclusive: true\n      regex: '@b{i}_.*'\n  aliases: []\n  rooms: []\n"
        ),
    )?;
    Ok(path)
}

/// A server with `n` services (all at `url`), alice in a room joined by one user of each service.
async fn setup(dir: &Path, n: usize, url: &str) -> anyhow::Result<(hearth::server::Running, Api, String, String)> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let mut config = hearth::config::Config { server_name: "localhost".into(), ..Default::default() };
    config.listen.client = "127.0.0.1:0".parse()?;
    config.database.path = dir.join("hearth.db");
    config.registration.enabled = true;
    config.federation.enabled = false;
    config.limits.messages_per_second = 1_000_000.0;
    config.limits.messages_burst = 1_000_000;
    config.limits.registrations_per_second = 1000.0;
    config.limits.registrations_burst = 1000;
    config.limits.joins_per_second = 100_000.0;
    config.limits.joins_burst = 100_000;
    config.appservice.retry_base_ms = 10;
    config.appservice.retry_max_ms = 50;
    config.appservice.registration_files =
        (0..n).map(|i| write_registration(dir, i, url)).collect::<anyhow::Result<_>>()?;
    let running = hearth::server::start(config).await?;
    let api = Api { http: reqwest::Client::new(), base: format!("http://{}", running.client_addr) };
    let url = format!("{}/_matrix/client/v3/register", api.base);
    let body = json!({"username": "alice", "password": "bench password", "auth": {"type": "m.login.dummy"}});
    let first: Value = api.http.post(&url).json(&body).send().await?.json().await?;
    let v: Value = match first.get("access_token") {
        Some(_) => first,
        None => {
            let mut b = body.clone();
            b["auth"]["session"] = first["session"].clone();
            api.http.post(&url).json(&b).send().await?.json().await?
        }
    };
    let alice = v["access_token"].as_str().context("no access token")?.to_owned();
    let room = api.call(&alice, reqwest::Method::POST, "/createRoom", json!({"preset": "public_chat"})).await?;
    let room = room["room_id"].as_str().context("room_id")?.to_owned();
    for i in 0..n {
        let token = format!("as{i}");
        let reg =
            json!({"type": "m.login.application_service", "username": format!("b{i}_user"), "inhibit_login": true});
        api.call(&token, reqwest::Method::POST, "/register", reg).await?;
        let path = format!("/join/{}?user_id=%40b{i}_user%3Alocalhost", enc(&room));
        api.call(&token, reqwest::Method::POST, &path, json!({})).await?;
    }
    Ok((running, api, alice, room))
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

async fn send(api: &Api, alice: &str, room: &str, txn: &str) -> anyhow::Result<()> {
    let path = format!("/rooms/{}/send/m.room.message/{txn}", enc(room));
    api.call(alice, reqwest::Method::PUT, &path, json!({"msgtype": "m.text", "body": "bench"})).await?;
    Ok(())
}

pub async fn run(o: Options) -> anyhow::Result<()> {
    // (1) Throughput to one service: a backlog of `events` messages, then the drain.
    let (rx, url) = receiver().await?;
    let (running, api, alice, room) = setup(&o.dir.join("one"), 1, &url).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    rx.down.store(true, Ordering::SeqCst);
    let before = rx.events.load(Ordering::SeqCst);
    for i in 0..o.events {
        send(&api, &alice, &room, &format!("backlog{i}")).await?;
    }
    let t = Instant::now();
    rx.down.store(false, Ordering::SeqCst);
    while rx.events.load(Ordering::SeqCst) < before + o.events {
        if t.elapsed() > Duration::from_secs(600) {
            bail!("the service got {} of {} events", rx.events.load(Ordering::SeqCst) - before, o.events);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "appservice sender: a backlog of {} events delivered to one service in {:.2} s: {:.0} events/s",
        o.events,
        secs,
        o.events as f64 / secs
    );
    running.stop().await;

    // (2) The cost of a send with ten interested services, against none.
    let mut medians = Vec::new();
    for n in [0usize, 10] {
        let (running, api, alice, room) = setup(&o.dir.join(format!("send{n}")), n, &url).await?;
        for i in 0..20 {
            send(&api, &alice, &room, &format!("warm{i}")).await?;
        }
        let mut ms = Vec::new();
        for i in 0..o.sends {
            let t = Instant::now();
            send(&api, &alice, &room, &format!("s{i}")).await?;
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let (median, p95) = (pct(&mut ms.clone(), 0.5), pct(&mut ms, 0.95));
        println!(
            "message send with {n:>2} appservices registered: median {median:.2} ms, p95 {p95:.2} ms ({} sends)",
            o.sends
        );
        medians.push(median);
        running.stop().await;
    }
    println!("extra time per send with ten appservices: {:+.2} ms (median)", medians[1] - medians[0]);
    Ok(())
}
