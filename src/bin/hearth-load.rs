//! hearth-load: a load generator for Hearth on loopback.
//!
//! Starts the `hearth` binary built beside it (or uses `--url` with `--pid`), registers `--syncers` users spread over
//! `--rooms` public rooms, keeps every user in a `/sync` long-poll loop, and sends a steady stream of messages
//! (`--rate` per second in total, round-robin over the users) for `--seconds`. Reports send throughput, send
//! latency (PUT until 200), delivery latency (send until a long-polling member's `/sync` returns the message),
//! errors, and the server's resident memory (VmRSS) sampled every `--sample-secs`, with a verdict on whether it
//! stayed flat after the warm-up. Exits non-zero on any request error or a memory climb.
//!
//! ```sh
//! cargo build --release --bins
//! target/release/hearth-load --seconds 60                          # one minute, 200 syncers, 50 msg/s
//! target/release/hearth-load --seconds 600 --out bench/load-soak.json   # the 10-minute soak
//! ```
//!
//! Traffic goes to 127.0.0.1 only, every loop is bounded by `--seconds`, and the spawned server is killed at the end.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(about = "Load generator for Hearth on loopback: /sync long-polls plus a steady stream of sends")]
struct Args {
    /// Long-polling users (each one /sync loop).
    #[arg(long, default_value_t = 200)]
    syncers: usize,
    /// Rooms the users are spread over (each message wakes the long polls of its room's members).
    #[arg(long, default_value_t = 20)]
    rooms: usize,
    /// Messages per second, in total.
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
    /// How long to send, in seconds.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Seconds between two VmRSS samples.
    #[arg(long, default_value_t = 10)]
    sample_secs: u64,
    /// Use this running server (http://127.0.0.1:PORT, registration open, limits raised) instead of starting one.
    #[arg(long)]
    url: Option<String>,
    /// The running server's pid, for VmRSS (with --url).
    #[arg(long)]
    pid: Option<u32>,
    /// Write the figures as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
}

struct Spawned {
    child: Child,
    dir: PathBuf,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn now_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

fn vm_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Starts `hearth` from the same folder as this binary on a free loopback port.
fn spawn_server() -> anyhow::Result<(Spawned, String)> {
    let bin = std::env::current_exe()?.with_file_name("hearth");
    anyhow::ensure!(bin.exists(), "{} not found: build it with `cargo build --release --bins`", bin.display());
    let dir = std::env::temp_dir().join(format!("hearth-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut cmd = Command::new(&bin);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("HEARTH_") {
            cmd.env_remove(k);
        }
    }
    let log = std::fs::File::create(dir.join("hearth.log"))?;
    let limits = [
        ("MESSAGES_PER_SECOND", "100000"),
        ("MESSAGES_BURST", "100000"),
        ("REGISTRATIONS_PER_SECOND", "100000"),
        ("REGISTRATIONS_BURST", "100000"),
        ("LOGINS_PER_SECOND", "100000"),
        ("LOGINS_BURST", "100000"),
        ("JOINS_PER_SECOND", "100000"),
        ("JOINS_BURST", "100000"),
    ];
    cmd.current_dir(&dir)
        .env("HEARTH_SERVER_NAME", "localhost")
        .env("HEARTH_LISTEN__CLIENT", format!("127.0.0.1:{port}"))
        .env("HEARTH_DATABASE__PATH", dir.join("hearth.db"))
        .env("HEARTH_FEDERATION__ENABLED", "false")
        .env("HEARTH_REGISTRATION__ENABLED", "true")
        .env("HEARTH_LOG__LEVEL", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    for (k, v) in limits {
        cmd.env(format!("HEARTH_LIMITS__{k}"), v);
    }
    let child = cmd.spawn()?;
    Ok((Spawned { child, dir }, format!("http://127.0.0.1:{port}")))
}

#[derive(Clone)]
struct User {
    token: String,
    user_id: String,
}

async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    token: Option<&str>,
    body: Option<&Value>,
) -> anyhow::Result<(u16, Value)> {
    let mut req = http.request(method, url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(b);
    }
    let res = req.send().await?;
    let status = res.status().as_u16();
    let text = res.text().await?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
}

async fn register(http: &reqwest::Client, base: &str, name: String) -> anyhow::Result<User> {
    let body = json!({"username": name, "password": "load-test-password", "auth": {"type": "m.login.dummy"}});
    let (status, v) =
        call(http, reqwest::Method::POST, format!("{base}/_matrix/client/v3/register"), None, Some(&body)).await?;
    anyhow::ensure!(status == 200, "register {name}: {status} {v}");
    Ok(User {
        token: v["access_token"].as_str().unwrap_or_default().to_owned(),
        user_id: v["user_id"].as_str().unwrap_or_default().to_owned(),
    })
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // reqwest is built without a default crypto provider (no aws-lc): ring, as in the server.
    let _ = rustls::crypto::ring::default_provider().install_default();
    anyhow::ensure!(args.syncers >= 1 && args.rooms >= 1 && args.rooms <= args.syncers, "need 1 <= rooms <= syncers");
    anyhow::ensure!(args.rate > 0.0, "--rate must be positive");
    let (spawned, base, pid) = match &args.url {
        Some(u) => (None, u.trim_end_matches('/').to_owned(), args.pid),
        None => {
            let (s, base) = spawn_server()?;
            let pid = s.child.id();
            (Some(s), base, Some(pid))
        }
    };
    anyhow::ensure!(
        base.starts_with("http://127.") || base.starts_with("http://localhost") || base.starts_with("http://[::1]"),
        "loopback only: {base}"
    );
    let http = reqwest::Client::builder().timeout(Duration::from_secs(90)).pool_max_idle_per_host(1024).build()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while call(&http, reqwest::Method::GET, format!("{base}/_matrix/client/versions"), None, None).await.is_err() {
        anyhow::ensure!(Instant::now() < deadline, "server at {base} did not answer");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rss_start = pid.and_then(vm_rss_kb);

    // Set-up: users, rooms (user r creates room r), memberships.
    let t0 = Instant::now();
    let tag = now_micros() % 1_000_000;
    let mut users = Vec::with_capacity(args.syncers);
    for chunk in (0..args.syncers).collect::<Vec<_>>().chunks(16) {
        let batch =
            futures::future::join_all(chunk.iter().map(|i| register(&http, &base, format!("load{tag}_{i}")))).await;
        for u in batch {
            users.push(u?);
        }
    }
    let mut rooms = Vec::with_capacity(args.rooms);
    for creator in users.iter().take(args.rooms) {
        let (status, v) = call(
            &http,
            reqwest::Method::POST,
            format!("{base}/_matrix/client/v3/createRoom"),
            Some(&creator.token),
            Some(&json!({"preset": "public_chat"})),
        )
        .await?;
        anyhow::ensure!(status == 200, "createRoom: {status} {v}");
        rooms.push(v["room_id"].as_str().unwrap_or_default().to_owned());
    }
    for chunk in (args.rooms..args.syncers).collect::<Vec<_>>().chunks(16) {
        let joins = chunk.iter().map(|&i| {
            let url = format!("{base}/_matrix/client/v3/join/{}", enc(&rooms[i % args.rooms]));
            let (http, token) = (http.clone(), users[i].token.clone());
            async move { call(&http, reqwest::Method::POST, url, Some(&token), Some(&json!({}))).await }
        });
        for r in futures::future::join_all(joins).await {
            let (status, v) = r?;
            anyhow::ensure!(status == 200, "join: {status} {v}");
        }
    }
    let setup_secs = t0.elapsed().as_secs_f64();
    eprintln!("set-up: {} users in {} rooms in {setup_secs:.1} s", users.len(), rooms.len());

    // Long polls.
    let stop = Arc::new(AtomicBool::new(false));
    let delivery = Arc::new(Mutex::new(Vec::<u64>::new()));
    let sync_errors = Arc::new(AtomicU64::new(0));
    let syncs = Arc::new(AtomicU64::new(0));
    let mut sync_tasks = Vec::new();
    for u in users.iter().cloned() {
        let (http, base, stop, delivery, sync_errors, syncs) =
            (http.clone(), base.clone(), stop.clone(), delivery.clone(), sync_errors.clone(), syncs.clone());
        sync_tasks.push(tokio::spawn(async move {
            let filter = enc(r#"{"room":{"timeline":{"limit":100},"state":{"lazy_load_members":true}}}"#);
            let mut since: Option<String> = None;
            while !stop.load(Ordering::Relaxed) {
                let mut url = format!("{base}/_matrix/client/v3/sync?filter={filter}&timeout=30000");
                if let Some(s) = &since {
                    url.push_str(&format!("&since={}", enc(s)));
                }
                match call(&http, reqwest::Method::GET, url, Some(&u.token), None).await {
                    Ok((200, v)) => {
                        syncs.fetch_add(1, Ordering::Relaxed);
                        let first = since.is_none();
                        since = v["next_batch"].as_str().map(str::to_owned);
                        if first {
                            continue;
                        }
                        let now = now_micros();
                        let mut seen = Vec::new();
                        for room in v["rooms"]["join"].as_object().into_iter().flat_map(|m| m.values()) {
                            for ev in room["timeline"]["events"].as_array().into_iter().flatten() {
                                if let Some(t) = ev["content"]["t"].as_u64() {
                                    seen.push(now.saturating_sub(t));
                                }
                            }
                        }
                        delivery.lock().unwrap().extend(seen);
                    }
                    _ if stop.load(Ordering::Relaxed) => break,
                    _ => {
                        sync_errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }));
    }
    // Let every syncer finish its initial sync and enter its long poll.
    let warm = Instant::now();
    while syncs.load(Ordering::Relaxed) < users.len() as u64 && warm.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Memory sampler.
    let rss = Arc::new(Mutex::new(Vec::<(f64, u64)>::new()));
    let sampler = {
        let (rss, stop) = (rss.clone(), stop.clone());
        let every = Duration::from_secs(args.sample_secs.max(1));
        tokio::spawn(async move {
            let start = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                if let Some(kb) = pid.and_then(vm_rss_kb) {
                    rss.lock().unwrap().push((start.elapsed().as_secs_f64(), kb));
                }
                tokio::time::sleep(every).await;
            }
        })
    };

    // The steady stream of sends.
    let send_lat = Arc::new(Mutex::new(Vec::<u64>::new()));
    let send_errors = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let run_for = Duration::from_secs(args.seconds);
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    let mut in_flight = Vec::new();
    while started.elapsed() < run_for {
        ticker.tick().await;
        let i = (n as usize) % users.len();
        let u = users[i].clone();
        let room = rooms[i % args.rooms].clone();
        let (http, base, send_lat, send_errors, sent) =
            (http.clone(), base.clone(), send_lat.clone(), send_errors.clone(), sent.clone());
        n += 1;
        in_flight.push(tokio::spawn(async move {
            let body = json!({"msgtype": "m.text", "body": format!("load {n}"), "t": now_micros()});
            let url = format!("{base}/_matrix/client/v3/rooms/{}/send/m.room.message/l{n}", enc(&room));
            let t = Instant::now();
            match call(&http, reqwest::Method::PUT, url, Some(&u.token), Some(&body)).await {
                Ok((200, _)) => {
                    send_lat.lock().unwrap().push(t.elapsed().as_micros() as u64);
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                other => {
                    send_errors.fetch_add(1, Ordering::Relaxed);
                    eprintln!("send failed ({}): {:?}", u.user_id, other.map(|(s, v)| (s, v.to_string())));
                }
            }
        }));
        in_flight.retain(|h| !h.is_finished());
    }
    for h in in_flight {
        let _ = h.await;
    }
    let send_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await; // the last deliveries
    if let Some(kb) = pid.and_then(vm_rss_kb) {
        rss.lock().unwrap().push((started.elapsed().as_secs_f64(), kb));
    }
    stop.store(true, Ordering::Relaxed);
    for t in &sync_tasks {
        t.abort();
    }
    sampler.abort();

    // Figures.
    let mut sl = send_lat.lock().unwrap().clone();
    sl.sort_unstable();
    let mut dl = delivery.lock().unwrap().clone();
    dl.sort_unstable();
    let members_per_room = args.syncers as f64 / args.rooms as f64;
    let samples = rss.lock().unwrap().clone();
    // Flat: the mean of the last fifth of the samples against the mean of the middle fifth. The first half is
    // warm-up: SQLite's page caches (32 MB writer, 4 MB per reader) fill as the database grows, which is bounded
    // growth, not a leak; a leak keeps climbing through the second half.
    let fifth = (samples.len() / 5).max(1);
    let mean =
        |s: &[(f64, u64)]| if s.is_empty() { 0.0 } else { s.iter().map(|x| x.1 as f64).sum::<f64>() / s.len() as f64 };
    let (early, late) = if samples.len() >= 5 {
        (mean(&samples[2 * fifth..3 * fifth]), mean(&samples[samples.len() - fifth..]))
    } else {
        (mean(&samples[..samples.len().min(1)]), mean(&samples[samples.len().saturating_sub(1)..]))
    };
    let growth = if early > 0.0 { (late - early) / early } else { 0.0 };
    let flat = growth < 0.10 || (late - early) < 16.0 * 1024.0;
    let errors = send_errors.load(Ordering::Relaxed) + sync_errors.load(Ordering::Relaxed);
    let report = json!({
        "syncers": args.syncers,
        "rooms": args.rooms,
        "target_rate_per_s": args.rate,
        "seconds": send_secs,
        "setup_seconds": setup_secs,
        "messages_sent": sent.load(Ordering::Relaxed),
        "send_throughput_per_s": sent.load(Ordering::Relaxed) as f64 / send_secs,
        "send_latency_ms": {"p50": percentile(&sl, 0.50), "p90": percentile(&sl, 0.90), "p99": percentile(&sl, 0.99), "max": percentile(&sl, 1.0)},
        "deliveries": dl.len(),
        "expected_deliveries": (sent.load(Ordering::Relaxed) as f64 * members_per_room).round(),
        "delivery_latency_ms": {"p50": percentile(&dl, 0.50), "p90": percentile(&dl, 0.90), "p99": percentile(&dl, 0.99), "max": percentile(&dl, 1.0)},
        "sync_responses": syncs.load(Ordering::Relaxed),
        "sync_throughput_per_s": syncs.load(Ordering::Relaxed) as f64 / send_secs,
        "errors": {"send": send_errors.load(Ordering::Relaxed), "sync": sync_errors.load(Ordering::Relaxed)},
        "rss_kb": {"before_setup": rss_start, "samples": samples.iter().map(|(t, kb)| json!([(t * 10.0).round() / 10.0, kb])).collect::<Vec<_>>(),
                   "early_mean": early.round(), "late_mean": late.round(), "growth": (growth * 1000.0).round() / 1000.0, "flat": flat},
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    eprintln!(
        "sent {} msgs in {send_secs:.0} s ({:.1}/s); send p50 {:.1} ms p99 {:.1} ms; delivered {} to long polls, p50 {:.1} ms p99 {:.1} ms; \
         {} sync responses; errors {errors}; RSS {:.0} -> {:.0} MiB ({:+.1}%, {})",
        sent.load(Ordering::Relaxed),
        sent.load(Ordering::Relaxed) as f64 / send_secs,
        percentile(&sl, 0.5),
        percentile(&sl, 0.99),
        dl.len(),
        percentile(&dl, 0.5),
        percentile(&dl, 0.99),
        syncs.load(Ordering::Relaxed),
        early / 1024.0,
        late / 1024.0,
        growth * 100.0,
        if flat { "flat" } else { "CLIMBING" }
    );
    if let Some(out) = &args.out {
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(out, serde_json::to_string_pretty(&report)? + "\n")?;
    }
    drop(spawned);
    anyhow::ensure!(errors == 0, "{errors} requests failed");
    anyhow::ensure!(flat, "server memory climbed {:.1}% over the run", growth * 100.0);
    Ok(())
}
