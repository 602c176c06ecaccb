//! `hearth-bench sliding-sync`: the first simplified sliding sync (MSC4186) of an account in N rooms, as Element X
//! makes it at start, and how soon a waiting (long-poll) request answers after a new message. An in-process server
//! on loopback, a fresh database; prints the figures (it asserts nothing).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

const SS: &str = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync";

pub struct Options {
    pub rooms: usize,
    pub messages: usize,
    pub samples: usize,
    pub dir: PathBuf,
}

struct User {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl User {
    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> anyhow::Result<Value> {
        let url = if path.starts_with("/_matrix") {
            format!("{}{path}", self.base)
        } else {
            format!("{}/_matrix/client/v3{path}", self.base)
        };
        let r = self.http.request(method, url).bearer_auth(&self.token).json(&body).send().await?;
        let status = r.status();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("{path}: {status} {v}");
        }
        Ok(v)
    }
}

async fn register(http: &reqwest::Client, base: &str, name: &str) -> anyhow::Result<User> {
    let url = format!("{base}/_matrix/client/v3/register");
    let body = json!({"username": name, "password": "bench password", "auth": {"type": "m.login.dummy"}});
    let first: Value = http.post(&url).json(&body).send().await?.json().await?;
    let v: Value = match first.get("access_token") {
        Some(_) => first,
        None => {
            let mut b = body.clone();
            b["auth"]["session"] = first["session"].clone();
            http.post(&url).json(&b).send().await?.json().await?
        }
    };
    let token = v["access_token"].as_str().context("no access token")?.to_owned();
    Ok(User { http: http.clone(), base: base.to_owned(), token })
}

/// What Element X asks for at start: the first 20 rooms by recency with one event each, the state its room list
/// shows, and the extensions it keeps on.
fn element_x_request(range_end: usize) -> Value {
    json!({
        "conn_id": "room-list",
        "lists": {"all_rooms": {
            "ranges": [[0, range_end]],
            "timeline_limit": 1,
            "required_state": [["m.room.encryption", ""], ["m.room.member", "$LAZY"], ["m.room.member", "$ME"],
                               ["m.room.name", ""], ["m.room.canonical_alias", ""], ["m.room.power_levels", ""],
                               ["m.room.avatar", ""], ["m.room.create", ""], ["m.room.join_rules", ""],
                               ["m.room.topic", ""], ["m.room.history_visibility", ""]],
        }},
        "extensions": {"account_data": {"enabled": true}, "receipts": {"enabled": true, "rooms": ["*"]},
                       "typing": {"enabled": true}, "e2ee": {"enabled": true}, "to_device": {"enabled": true}},
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

pub async fn run(o: Options) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(&o.dir);
    std::fs::create_dir_all(&o.dir)?;
    let mut config = hearth::config::Config { server_name: "localhost".into(), ..Default::default() };
    config.listen.client = "127.0.0.1:0".parse()?;
    config.database.path = o.dir.join("hearth.db");
    config.registration.enabled = true;
    config.federation.enabled = false;
    config.limits.messages_per_second = 100_000.0;
    config.limits.messages_burst = 100_000;
    config.limits.registrations_per_second = 1000.0;
    config.limits.registrations_burst = 1000;
    config.limits.joins_per_second = 100_000.0;
    config.limits.joins_burst = 100_000;
    let running = hearth::server::start(config).await?;
    let base = format!("http://{}", running.client_addr);
    let http = reqwest::Client::builder().build()?;
    let alice = register(&http, &base, "alice").await?;
    let bob = register(&http, &base, "bob").await?;
    let bob_id = "@bob:localhost";

    let setup = Instant::now();
    let mut rooms = Vec::new();
    for i in 0..o.rooms {
        let v = alice
            .call(reqwest::Method::POST, "/createRoom", json!({"name": format!("room {i}"), "preset": "public_chat"}))
            .await?;
        let room = v["room_id"].as_str().context("room_id")?.to_owned();
        bob.call(reqwest::Method::POST, &format!("/join/{}", urlencoding(&room)), json!({})).await?;
        for m in 0..o.messages {
            let path = format!("/rooms/{}/send/m.room.message/t{i}-{m}", urlencoding(&room));
            bob.call(reqwest::Method::PUT, &path, json!({"msgtype": "m.text", "body": format!("message {m}")})).await?;
        }
        rooms.push(room);
    }
    println!(
        "sliding-sync bench: {} rooms, {} messages each, set up in {:.1} s (bob: {bob_id})",
        o.rooms,
        o.messages,
        setup.elapsed().as_secs_f64()
    );

    for (label, end) in [("first 20 rooms", 19), ("all rooms", o.rooms.saturating_sub(1))] {
        let mut ms = Vec::new();
        let mut size = 0;
        for _ in 0..o.samples {
            let t = Instant::now();
            let v = alice.call(reqwest::Method::POST, SS, element_x_request(end)).await?;
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
            size = v.to_string().len();
            if v["lists"]["all_rooms"]["count"] != o.rooms {
                bail!("list count {} != {}", v["lists"]["all_rooms"]["count"], o.rooms);
            }
        }
        println!(
            "first sliding sync, {label:>14}: median {:7.1} ms  min {:7.1} ms  max {:7.1} ms  ({} bytes)",
            median(&mut ms.clone()),
            ms.iter().cloned().fold(f64::MAX, f64::min),
            ms.iter().cloned().fold(0.0, f64::max),
            size
        );
    }

    // Long-poll wake: a request waits at a position; bob sends; how long from the send's answer to the poll's.
    let first = alice.call(reqwest::Method::POST, SS, element_x_request(19)).await?;
    let mut pos = first["pos"].as_str().context("pos")?.to_owned();
    let (mut after_send, mut from_send_start) = (Vec::new(), Vec::new());
    for i in 0..o.samples {
        let path = format!("{SS}?timeout=30000&pos={pos}");
        let poll = {
            let (http, base, token, body) =
                (alice.http.clone(), base.clone(), alice.token.clone(), element_x_request(19));
            tokio::spawn(async move {
                let r = http.post(format!("{base}{path}")).bearer_auth(token).json(&body).send().await?;
                let v: Value = r.json().await?;
                Ok::<_, anyhow::Error>((Instant::now(), v))
            })
        };
        // Let the poll reach its wait (a bench may sleep: the figure is the wake-up, not this pause).
        tokio::time::sleep(Duration::from_millis(150)).await;
        let room = &rooms[i % rooms.len()];
        let t0 = Instant::now();
        let path = format!("/rooms/{}/send/m.room.message/wake{i}", urlencoding(room));
        bob.call(reqwest::Method::PUT, &path, json!({"msgtype": "m.text", "body": "wake"})).await?;
        let t1 = Instant::now();
        let (done, v) = poll.await??;
        if v["rooms"].get(room.as_str()).is_none() {
            bail!("the poll answered without the room: {v}");
        }
        pos = v["pos"].as_str().context("pos")?.to_owned();
        after_send.push(done.saturating_duration_since(t1).as_secs_f64() * 1000.0);
        from_send_start.push(done.saturating_duration_since(t0).as_secs_f64() * 1000.0);
    }
    println!(
        "long-poll wake after a message: median {:.1} ms, p95 {:.1} ms after the send's answer; median {:.1} ms, p95 \
         {:.1} ms from the send's start",
        median(&mut after_send.clone()),
        pct(&mut after_send, 0.95),
        median(&mut from_send_start.clone()),
        pct(&mut from_send_start, 0.95)
    );
    running.stop().await;
    Ok(())
}

fn urlencoding(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
