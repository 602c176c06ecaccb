//! Orchestration: the resident, each joiner as a separate process, the measurements and the reports.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::limits::{self, CapReport, Cgroup, Limits};
use crate::world;

pub struct Options {
    pub members: Vec<usize>,
    pub messages: usize,
    pub joiners: Vec<String>,
    pub seed: u64,
    pub dir: PathBuf,
    pub runs: usize,
    /// Cores and memory for each Hearth joiner (the "Pi-like" profile); the resident runs free.
    pub limits: Limits,
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub(crate) fn self_signed(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (crt, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    if !crt.exists() {
        let st = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "365",
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
                "-keyout",
            ])
            .arg(&key)
            .arg("-out")
            .arg(&crt)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        anyhow::ensure!(st.success(), "openssl failed");
    }
    Ok((crt, key))
}

fn hearth_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.parent().context("exe dir")?.join("hearth");
    anyhow::ensure!(bin.exists(), "{} not built (cargo build --release --bins)", bin.display());
    Ok(bin)
}

fn hearth_config(
    dir: &Path,
    fed_port: u16,
    cli_port: u16,
    lazy: bool,
    trusted: Option<&str>,
) -> anyhow::Result<PathBuf> {
    let (crt, key) = self_signed(dir)?;
    let trusted = trusted.map(|t| format!("[\"{t}\"]")).unwrap_or_else(|| "[]".into());
    let cfg = format!(
        r#"server_name = "127.0.0.1:{fed_port}"
[listen]
client = "127.0.0.1:{cli_port}"
federation = "127.0.0.1:{fed_port}"
[database]
path = "{db}"
[limits]
messages_per_second = 1000.0
[federation]
trusted_key_servers = {trusted}
verify_certificates = false
allow_private_ips = true
lazy_joins = {lazy}
tls_cert = "{crt}"
tls_key = "{key}"
[log]
level = "info,ruma_state_res=warn"
"#,
        db = dir.join("hearth.db").display(),
        crt = crt.display(),
        key = key.display()
    );
    let path = dir.join("hearth.toml");
    std::fs::write(&path, cfg)?;
    Ok(path)
}

pub(crate) struct Proc {
    pub(crate) child: Child,
    pub(crate) log: PathBuf,
}

impl Drop for Proc {
    /// A process left behind by an error is not left running.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Proc {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
    pub(crate) fn stop(mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_up(http: &reqwest::Client, url: &str, p: &mut Proc) -> anyhow::Result<()> {
    for _ in 0..1200 {
        if let Ok(Some(st)) = p.child.try_wait() {
            bail!("process exited ({st}); see {}", p.log.display());
        }
        if http.get(format!("{url}/_matrix/client/versions")).send().await.is_ok_and(|r| r.status().is_success()) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{url} did not come up; see {}", p.log.display())
}

fn spawn(cmd: &mut Command, log: PathBuf) -> anyhow::Result<Proc> {
    let f = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
    let child = cmd.stdout(f.try_clone()?).stderr(f).stdin(Stdio::null()).spawn()?;
    Ok(Proc { child, log })
}

/// Peak RSS (VmHWM) in MB and CPU seconds of a process.
pub(crate) fn proc_usage(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm_kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (hwm_kb / 1024.0, ticks / 100.0)
}

fn dir_db_size_mb(dir: &Path, prefix: &str) -> f64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum::<u64>()
        })
        .unwrap_or(0) as f64
        / 1e6
}

pub(crate) async fn api(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> anyhow::Result<(u16, Value)> {
    let mut r = http.request(method, url).timeout(Duration::from_secs(900));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    let res = r.send().await?;
    let st = res.status().as_u16();
    Ok((st, res.json().await.unwrap_or(Value::Null)))
}

pub(crate) fn q(s: &str) -> String {
    hearth::federation::client::enc(s)
}

pub(crate) struct Resident {
    pub(crate) proc: Proc,
    pub(crate) url: String,
    pub(crate) server_name: String,
    pub(crate) token: String,
    pub(crate) world: world::World,
    pub(crate) dir: PathBuf,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ResidentMeta {
    world: world::World,
    fed_port: u16,
    cli_port: u16,
}

pub(crate) async fn start_resident(http: &reqwest::Client, o: &Options, n: usize) -> anyhow::Result<Resident> {
    let dir = o.dir.join(format!("resident-{n}"));
    let meta_path = dir.join("world.json");
    let bin = hearth_bin()?;
    if !meta_path.exists() {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let (fed_port, cli_port) = (free_port()?, free_port()?);
        let cfg = hearth_config(&dir, fed_port, cli_port, true, None)?;
        let config = hearth::config::Config::load(Some(&cfg))?;
        eprintln!("generating a {n}-member world into {} ...", dir.display());
        let services = tokio::task::spawn_blocking(move || hearth::server::build_services(config)).await??;
        let w = world::generate(
            &services.store,
            services.identity.clone(),
            &world::Spec { members: n, messages: o.messages, seed: o.seed, room_version: "12".into() },
        )
        .await?;
        let hash = hearth::client::account::hash_password("bench").map_err(|e| anyhow::anyhow!("{e}"))?;
        let admin = w.admin.clone();
        services
            .store
            .write(move |wr| {
                hearth::store::accounts::insert_user(wr.db(), &admin, Some(&hash), true)?;
                Ok(())
            })
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        eprintln!(
            "world: {} events ({} state, {} joined) from {} servers in {:.1}s",
            w.events, w.state_events, w.joined, w.servers, w.seconds
        );
        std::fs::write(&meta_path, serde_json::to_string_pretty(&ResidentMeta { world: w, fed_port, cli_port })?)?;
        drop(services);
        tokio::time::sleep(Duration::from_millis(800)).await;
        // Keep a pristine copy: every joiner starts from the same world (earlier joiners' events would otherwise
        // be in the room, signed by servers that are gone).
        hearth::store::maintenance::checkpoint_file(&dir.join("hearth.db"), Duration::from_secs(10))?;
        std::fs::copy(dir.join("hearth.db"), dir.join("pristine.db"))?;
    }
    for suffix in ["hearth.db", "hearth.db-wal", "hearth.db-shm"] {
        let _ = std::fs::remove_file(dir.join(suffix));
    }
    std::fs::copy(dir.join("pristine.db"), dir.join("hearth.db"))?;
    let meta: ResidentMeta = serde_json::from_str(&std::fs::read_to_string(&meta_path)?)?;
    let cfg = dir.join("hearth.toml");
    // A world's ports are fixed (its server name holds the federation port): a copy of the world served by another
    // resident on this machine would answer in our resident's place, and the run would measure that one.
    for port in [meta.fed_port, meta.cli_port] {
        if let Err(e) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            bail!("port {port} of this world is taken ({e}): another resident of a copy of it is running");
        }
    }
    let mut proc = spawn(Command::new(&bin).arg("-c").arg(&cfg), dir.join("log"))?;
    let url = format!("http://127.0.0.1:{}", meta.cli_port);
    wait_up(http, &url, &mut proc).await?;
    if let Ok(Some(st)) = proc.child.try_wait() {
        bail!("the resident exited ({st}) and something else answers on its port; see {}", proc.log.display());
    }
    let (st, login) = api(
        http,
        reqwest::Method::POST,
        &format!("{url}/_matrix/client/v3/login"),
        None,
        Some(json!({"type": "m.login.password", "user": meta.world.admin, "password": "bench"})),
    )
    .await?;
    anyhow::ensure!(st == 200, "resident admin login failed: {login}");
    Ok(Resident {
        proc,
        url,
        server_name: format!("127.0.0.1:{}", meta.fed_port),
        token: login["access_token"].as_str().unwrap_or_default().to_owned(),
        world: meta.world,
        dir,
    })
}

#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, Default)]
pub struct Measure {
    members: usize,
    joiner: String,
    join_ms: f64,
    first_message_ms: f64,
    full_members_ms: f64,
    peak_rss_mb: f64,
    cpu_s: f64,
    db_mb: f64,
    resident_requests: u64,
    sync_p50_ms: f64,
    sync_p99_ms: f64,
    send_p50_ms: f64,
    send_p99_ms: f64,
    resident_send_join_ms: Option<f64>,
    resident_state_ms: Option<f64>,
    /// The resident's `/state` until its last byte was handed to the connection (`resident_state_ms` is the time
    /// to the state and its auth chain, before the stream).
    #[serde(default)]
    resident_state_streamed_ms: Option<f64>,
    #[serde(default)]
    resident_state_ids_ms: Option<f64>,
    resident_peak_rss_mb: f64,
    /// CPU seconds the resident spent from the join until the member list was complete (serving the joiner).
    #[serde(default)]
    resident_cpu_s: f64,
    /// The joiner's core and memory cap ("Pi-like"), when one was asked for.
    #[serde(default)]
    cap: Option<CapReport>,
    note: String,
}

/// A Hearth joiner's process, under `o.limits` when any: pinned to its cores and in a memory cgroup of its own.
fn spawn_joiner(
    o: &Options,
    bin: &Path,
    cfg: &Path,
    log: PathBuf,
    kind: &str,
) -> anyhow::Result<(Proc, Option<Cgroup>, Option<CapReport>)> {
    let mut cmd = Command::new(bin);
    cmd.arg("-c").arg(cfg);
    if !o.limits.any() {
        return Ok((spawn(&mut cmd, log)?, None, None));
    }
    let mut cap = CapReport { cpus: o.limits.cpus, memory_limit_mb: o.limits.memory_mb, ..Default::default() };
    let group = match o.limits.memory_mb {
        Some(mb) => match Cgroup::create(&format!("hearth-bench-{}-{kind}", std::process::id()), mb) {
            Ok(g) => {
                cap.cgroup = g.describe();
                Some(g)
            }
            Err(why) => {
                cap.cgroup = format!("none: {why}");
                cap.memory_limit_mb = None;
                eprintln!("   NO MEMORY CAP: {why}");
                None
            }
        },
        None => {
            cap.cgroup = "none: no memory cap asked for".into();
            None
        }
    };
    limits::apply(&mut cmd, o.limits.cpus, group.as_ref());
    let p = spawn(&mut cmd, log)?;
    if let Some(g) = &group {
        anyhow::ensure!(g.holds(p.pid()), "the joiner (pid {}) is not in {}", p.pid(), g.describe());
    }
    let allowed = limits::cpus_allowed(p.pid()).unwrap_or_default();
    if let Some(n) = o.limits.cpus {
        let want = if n == 1 { "0".to_owned() } else { format!("0-{}", n - 1) };
        anyhow::ensure!(allowed == want, "the joiner may run on cores {allowed}, not {want}");
    }
    eprintln!(
        "   joiner pid {} on cores {allowed}, memory: {}",
        p.pid(),
        if cap.cgroup.is_empty() { "uncapped" } else { &cap.cgroup }
    );
    Ok((p, group, Some(cap)))
}

/// The cap's figures once the run is over (before the joiner is stopped): the group's peak, limit hits and OOM
/// kills, and how the joiner ended if it already has.
fn cap_report(cap: Option<CapReport>, group: Option<&Cgroup>, p: &mut Proc) -> Option<CapReport> {
    use std::os::unix::process::ExitStatusExt;
    let mut cap = cap?;
    if let Some(g) = group {
        (cap.cgroup_peak_mb, cap.limit_hits, cap.oom_kills) = g.usage();
    }
    if let Ok(Some(st)) = p.child.try_wait() {
        cap.exit = Some(match st.signal() {
            Some(sig) => format!("killed by signal {sig}{}", if sig == libc::SIGKILL { " (OOM killer?)" } else { "" }),
            None => format!("exited {st}"),
        });
    }
    Some(cap)
}

fn cap_note(cap: &Option<CapReport>) -> String {
    let Some(c) = cap else { return String::new() };
    let cores =
        c.cpus.map(|n| format!("{n} core{}", if n == 1 { "" } else { "s" })).unwrap_or_else(|| "all cores".into());
    let mem = match (c.memory_limit_mb, c.cgroup_peak_mb) {
        (Some(l), Some(p)) => {
            format!("{l} MB cap (cgroup {}), cgroup peak {p:.0} MB", c.cgroup.split(' ').next().unwrap_or(""))
        }
        (Some(l), None) => format!("{l} MB cap"),
        (None, _) => format!("no memory cap ({})", c.cgroup),
    };
    let oom = match (c.limit_hits, c.oom_kills) {
        (Some(h), Some(k)) => format!(", limit hit {h}x, OOM kills {k}"),
        _ => String::new(),
    };
    let exit = c.exit.as_deref().map(|e| format!(", joiner {e}")).unwrap_or_default();
    format!("{cores}, {mem}{oom}{exit}")
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Sends /sync and /send every 100 ms until stopped; returns latencies (ms) of each. With `BENCH_SHOW_SLOW_MS=N`
/// in the environment, each request slower than N ms is printed with its time since the probe started (to line
/// it up with the joiner's log).
fn probe(
    http: reqwest::Client,
    url: String,
    token: String,
    room: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(Vec<f64>, Vec<f64>)> {
    tokio::spawn(async move {
        let (mut syncs, mut sends) = (Vec::new(), Vec::new());
        let slow_ms: Option<f64> = std::env::var("BENCH_SHOW_SLOW_MS").ok().and_then(|v| v.parse().ok());
        let started = Instant::now();
        let show = |what: &str, t: Instant, ms: f64| {
            if slow_ms.is_some_and(|slow| ms > slow) {
                eprintln!("slow {what}: {ms:.0} ms at {:.1} s", (t - started).as_secs_f64());
            }
        };
        let mut since: Option<String> = None;
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            // A lazy-loading client (as Element is): the filter on every request.
            let filter = q(r#"{"room":{"timeline":{"limit":10},"state":{"lazy_load_members":true}}}"#);
            let path = match &since {
                Some(s) => format!("{url}/_matrix/client/v3/sync?timeout=0&filter={filter}&since={s}"),
                None => format!("{url}/_matrix/client/v3/sync?timeout=0&filter={filter}"),
            };
            if let Ok((200, v)) = api(&http, reqwest::Method::GET, &path, Some(&token), None).await {
                syncs.push(t.elapsed().as_secs_f64() * 1000.0);
                show("sync", t, t.elapsed().as_secs_f64() * 1000.0);
                since = v["next_batch"].as_str().map(str::to_owned);
            }
            let t = Instant::now();
            i += 1;
            let send = format!("{url}/_matrix/client/v3/rooms/{}/send/m.room.message/probe{i}", q(&room));
            if let Ok((200, _)) = api(
                &http,
                reqwest::Method::PUT,
                &send,
                Some(&token),
                Some(json!({"msgtype": "m.text", "body": format!("probe {i}")})),
            )
            .await
            {
                sends.push(t.elapsed().as_secs_f64() * 1000.0);
                show("send", t, t.elapsed().as_secs_f64() * 1000.0);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (syncs, sends)
    })
}

async fn resident_requests(http: &reqwest::Client, r: &Resident) -> u64 {
    match api(http, reqwest::Method::GET, &format!("{}/_hearth/admin/v1/stats", r.url), Some(&r.token), None).await {
        Ok((200, v)) => {
            v["federation_requests"].as_object().map(|m| m.values().filter_map(Value::as_u64).sum()).unwrap_or(0)
        }
        _ => 0,
    }
}

/// Milliseconds of the last `what` line in the resident log (written after `from` bytes), optionally matching `filter`.
fn resident_log_ms(r: &Resident, from: u64, what: &str, filter: &str) -> Option<f64> {
    let log = std::fs::read(&r.proc.log).ok()?;
    let text = String::from_utf8_lossy(&log[(from as usize).min(log.len())..]).to_string();
    let line = text.lines().rfind(|l| l.contains(what) && l.contains(filter))?;
    let plain: String = strip_ansi(line);
    plain.split_whitespace().find_map(|w| w.strip_prefix("ms=")).and_then(|v| v.parse().ok())
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut esc = false;
    for c in s.chars() {
        if c == '\x1b' {
            esc = true;
        } else if esc {
            if c == 'm' {
                esc = false;
            }
        } else {
            out.push(c);
        }
    }
    out
}

async fn wait_message(http: &reqwest::Client, r: &Resident, body: &str, timeout: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        let url = format!("{}/_matrix/client/v3/rooms/{}/messages?dir=b&limit=30", r.url, q(&r.world.room_id));
        if let Ok((200, v)) = api(http, reqwest::Method::GET, &url, Some(&r.token), None).await {
            if v["chunk"].as_array().is_some_and(|c| c.iter().any(|e| e["content"]["body"] == body)) {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("message `{body}` did not reach the resident")
}

async fn run_hearth(
    http: &reqwest::Client,
    o: &Options,
    r: &Resident,
    n: usize,
    lazy: bool,
) -> anyhow::Result<Measure> {
    let kind = if lazy { "hearth-lazy" } else { "hearth-full" };
    let dir = o.dir.join(format!("run-{n}-{kind}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let (fed, cli) = (free_port()?, free_port()?);
    let cfg = hearth_config(&dir, fed, cli, lazy, Some(&r.server_name))?;
    let bin = hearth_bin()?;
    let (mut p, group, cap) = spawn_joiner(o, &bin, &cfg, dir.join("log"), kind)?;
    let url = format!("http://127.0.0.1:{cli}");
    if let Err(e) = wait_up(http, &url, &mut p).await {
        let cap = cap_report(cap, group.as_ref(), &mut p);
        return Err(e.context(cap_note(&cap)));
    }
    // The admin commands work on the running server's database (they never create one).
    let st = Command::new(&bin)
        .arg("-c")
        .arg(&cfg)
        .args(["user", "create", "bench", "--password", "bench", "--admin"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    anyhow::ensure!(st.success(), "creating the bench user failed");
    let (_, login) = api(
        http,
        reqwest::Method::POST,
        &format!("{url}/_matrix/client/v3/login"),
        None,
        Some(json!({"type": "m.login.password", "user": "bench", "password": "bench"})),
    )
    .await?;
    let token = login["access_token"].as_str().unwrap_or_default().to_owned();
    let result = measure_join(http, r, n, kind, &url, &token, p.pid(), |http, url, token| {
        let (http, url, token) = (http.clone(), url.to_owned(), token.to_owned());
        async move {
            loop {
                let (_, v) =
                    api(&http, reqwest::Method::GET, &format!("{url}/_hearth/admin/v1/jobs"), Some(&token), None)
                        .await?;
                if v["jobs"].as_array().is_some_and(|a| a.is_empty())
                    && v["partial_state_rooms"].as_array().is_some_and(|a| a.is_empty())
                {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    })
    .await;
    let cap = cap_report(cap, group.as_ref(), &mut p);
    p.stop();
    drop(group);
    let note = cap_note(&cap);
    let mut m = result.map_err(|e| if note.is_empty() { e } else { e.context(note.clone()) })?;
    m.db_mb = dir_db_size_mb(&dir, "hearth.db");
    if !note.is_empty() {
        m.note = if m.note.is_empty() { note } else { format!("{}; {note}", m.note) };
    }
    m.cap = cap;
    Ok(m)
}

/// A Hearth peeking into the room (MSC2444/MSC2753) instead of joining it: the resident's admin first makes the
/// room's history world-readable (on this run's copy of the world). `join_ms` is the `POST /peek`, then the first
/// `/sync` showing the room under `rooms.peek` (the time a client waits to show it), `first_message_ms` the time a
/// message sent at the resident takes to reach the peeker's `/messages`; no member list is ever fetched.
async fn run_hearth_peek(http: &reqwest::Client, o: &Options, r: &Resident, n: usize) -> anyhow::Result<Measure> {
    let kind = "hearth-peek";
    let room = q(&r.world.room_id);
    let (st, v) = api(
        http,
        reqwest::Method::PUT,
        &format!("{}/_matrix/client/v3/rooms/{room}/state/m.room.history_visibility/", r.url),
        Some(&r.token),
        Some(json!({"history_visibility": "world_readable"})),
    )
    .await?;
    anyhow::ensure!(st == 200, "{kind}: making the room world-readable failed: {st} {v}");
    let dir = o.dir.join(format!("run-{n}-{kind}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let (fed, cli) = (free_port()?, free_port()?);
    let cfg = hearth_config(&dir, fed, cli, true, Some(&r.server_name))?;
    let bin = hearth_bin()?;
    let (mut p, group, cap) = spawn_joiner(o, &bin, &cfg, dir.join("log"), kind)?;
    let url = format!("http://127.0.0.1:{cli}");
    wait_up(http, &url, &mut p).await?;
    let st = Command::new(&bin)
        .arg("-c")
        .arg(&cfg)
        .args(["user", "create", "bench", "--password", "bench"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    anyhow::ensure!(st.success(), "creating the bench user failed");
    let (_, login) = api(
        http,
        reqwest::Method::POST,
        &format!("{url}/_matrix/client/v3/login"),
        None,
        Some(json!({"type": "m.login.password", "user": "bench", "password": "bench"})),
    )
    .await?;
    let token = login["access_token"].as_str().unwrap_or_default().to_owned();
    let before = resident_requests(http, r).await;
    let t0 = Instant::now();
    let peek_url =
        format!("{url}/_matrix/client/unstable/org.matrix.msc2753/peek/{room}?server_name={}", q(&r.server_name));
    let (st, v) = api(http, reqwest::Method::POST, &peek_url, Some(&token), Some(json!({}))).await?;
    anyhow::ensure!(st == 200 && v.get("summary_only").is_none(), "{kind}: peek failed: {st} {v}");
    let peek_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let filter = q(r#"{"room":{"state":{"lazy_load_members":true},"timeline":{"limit":20}}}"#);
    let (st, v) =
        api(http, reqwest::Method::GET, &format!("{url}/_matrix/client/v3/sync?filter={filter}"), Some(&token), None)
            .await?;
    anyhow::ensure!(st == 200 && v["rooms"]["peek"].get(&r.world.room_id).is_some(), "{kind}: not in rooms.peek: {st}");
    let shown_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let body = format!("bench {kind} {}", hearth::http::random_string(6));
    let t1 = Instant::now();
    let send =
        format!("{}/_matrix/client/v3/rooms/{room}/send/m.room.message/peek-{}", r.url, hearth::http::random_string(6));
    let (st, v) =
        api(http, reqwest::Method::PUT, &send, Some(&r.token), Some(json!({"msgtype": "m.text", "body": body})))
            .await?;
    anyhow::ensure!(st == 200, "{kind}: send at the resident failed: {st} {v}");
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let m = format!("{url}/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=10");
        if let Ok((200, v)) = api(http, reqwest::Method::GET, &m, Some(&token), None).await {
            if v["chunk"].as_array().is_some_and(|c| c.iter().any(|e| e["content"]["body"] == body)) {
                break;
            }
        }
        anyhow::ensure!(Instant::now() < end, "{kind}: the resident's message never reached the peeker");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let first_message_ms = t1.elapsed().as_secs_f64() * 1000.0;
    let (rss, cpu) = proc_usage(p.pid());
    let after = resident_requests(http, r).await;
    let (res_rss, _) = proc_usage(r.proc.pid());
    let cap = cap_report(cap, group.as_ref(), &mut p);
    let cap_text = cap_note(&cap);
    let m = Measure {
        members: n,
        joiner: kind.to_owned(),
        join_ms: peek_ms,
        first_message_ms,
        full_members_ms: 0.0,
        peak_rss_mb: rss,
        cpu_s: cpu,
        db_mb: dir_db_size_mb(&dir, "hearth.db"),
        resident_requests: after.saturating_sub(before),
        resident_peak_rss_mb: res_rss,
        note: format!(
            "peek; shown in /sync after {shown_ms:.0} ms; no member list{}",
            if cap_text.is_empty() { String::new() } else { format!("; {cap_text}") }
        ),
        cap,
        ..Default::default()
    };
    p.stop();
    drop(group);
    Ok(m)
}

#[allow(clippy::too_many_arguments)]
async fn measure_join<F, Fut>(
    http: &reqwest::Client,
    r: &Resident,
    n: usize,
    kind: &str,
    url: &str,
    token: &str,
    pid: u32,
    wait_full: F,
) -> anyhow::Result<Measure>
where
    F: Fn(&reqwest::Client, &str, &str) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let log_from = std::fs::metadata(&r.proc.log).map(|m| m.len()).unwrap_or(0);
    let before = resident_requests(http, r).await;
    let (_, res_cpu_before) = proc_usage(r.proc.pid());
    let t0 = Instant::now();
    let join_url = format!("{url}/_matrix/client/v3/join/{}?server_name={}", q(&r.world.room_id), q(&r.server_name));
    let (st, v) = api(http, reqwest::Method::POST, &join_url, Some(token), Some(json!({}))).await?;
    anyhow::ensure!(st == 200, "{kind}: join failed: {st} {v}");
    let join_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let body = format!("bench {kind} {}", hearth::http::random_string(6));
    let t1 = Instant::now();
    let send = format!("{url}/_matrix/client/v3/rooms/{}/send/m.room.message/first", q(&r.world.room_id));
    let (st, v) =
        api(http, reqwest::Method::PUT, &send, Some(token), Some(json!({"msgtype": "m.text", "body": body}))).await?;
    anyhow::ensure!(st == 200, "{kind}: send failed: {st} {v}");
    let stop = Arc::new(AtomicBool::new(false));
    let prober = probe(http.clone(), url.to_owned(), token.to_owned(), r.world.room_id.clone(), stop.clone());
    wait_message(http, r, &body, Duration::from_secs(120)).await?;
    let first_message_ms = t1.elapsed().as_secs_f64() * 1000.0;
    wait_full(http, url, token).await?;
    let full_members_ms = t0.elapsed().as_secs_f64() * 1000.0;
    stop.store(true, Ordering::Relaxed);
    let (mut syncs, mut sends) = prober.await?;
    let (rss, cpu) = proc_usage(pid);
    let after = resident_requests(http, r).await;
    let (res_rss, res_cpu) = proc_usage(r.proc.pid());
    // Check the member list is really complete.
    let (st, jm) = api(
        http,
        reqwest::Method::GET,
        &format!("{url}/_matrix/client/v3/rooms/{}/joined_members", q(&r.world.room_id)),
        Some(token),
        None,
    )
    .await?;
    let joined = jm["joined"].as_object().map(|o| o.len()).unwrap_or(0);
    let note = if st == 200 && joined >= r.world.joined {
        String::new()
    } else {
        format!("joined_members {st}: {joined} of {}", r.world.joined + 1)
    };
    Ok(Measure {
        members: n,
        joiner: kind.to_owned(),
        join_ms,
        first_message_ms,
        full_members_ms,
        peak_rss_mb: rss,
        cpu_s: cpu,
        db_mb: 0.0,
        resident_requests: after.saturating_sub(before),
        sync_p50_ms: pct(&mut syncs, 0.5),
        sync_p99_ms: pct(&mut syncs, 0.99),
        send_p50_ms: pct(&mut sends, 0.5),
        send_p99_ms: pct(&mut sends, 0.99),
        resident_send_join_ms: resident_log_ms(r, log_from, "send_join served", ""),
        resident_state_ms: resident_log_ms(r, log_from, "/state served", ""),
        resident_state_streamed_ms: resident_log_ms(r, log_from, "/state streamed", ""),
        resident_state_ids_ms: resident_log_ms(r, log_from, "/state_ids served", ""),
        resident_peak_rss_mb: res_rss,
        resident_cpu_s: res_cpu - res_cpu_before,
        cap: None,
        note,
    })
}

fn synapse_python() -> Option<PathBuf> {
    let mut c: Vec<PathBuf> = std::env::var_os("SYNAPSE_PYTHON").map(PathBuf::from).into_iter().collect();
    c.push(PathBuf::from("target/synapse-venv/bin/python"));
    if let Some(h) = std::env::var_os("HOME") {
        c.push(PathBuf::from(h).join(".cache/hearth-synapse-lab/venv/bin/python"));
    }
    c.into_iter().find(|p| p.exists())
}

async fn run_synapse(
    http: &reqwest::Client,
    o: &Options,
    r: &Resident,
    n: usize,
    full: bool,
) -> anyhow::Result<Measure> {
    let kind = if full { "synapse-full" } else { "synapse" };
    let py = synapse_python().context("no Synapse virtualenv (run .ci/run or set SYNAPSE_PYTHON)")?;
    let dir = std::fs::canonicalize(&o.dir)?.join(format!("run-{n}-{kind}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("media"))?;
    let (crt, key) = self_signed(&dir)?;
    let (fed, cli) = (free_port()?, free_port()?);
    let rl = "{per_second: 1000, burst_count: 10000}";
    let d = dir.display();
    std::fs::write(dir.join("log.yaml"), format!("version: 1\nformatters:\n  p:\n    format: '%(asctime)s %(name)s %(levelname)s %(message)s'\nhandlers:\n  f:\n    class: logging.FileHandler\n    formatter: p\n    filename: {d}/homeserver.log\nroot:\n  level: INFO\n  handlers: [f]\ndisable_existing_loggers: false\n"))?;
    std::fs::write(
        dir.join("homeserver.yaml"),
        format!(
            r#"server_name: "127.0.0.1:{fed}"
pid_file: {d}/homeserver.pid
report_stats: false
signing_key_path: {d}/signing.key
log_config: {d}/log.yaml
media_store_path: {d}/media
listeners:
  - {{port: {cli}, bind_addresses: ['127.0.0.1'], type: http, tls: false, resources: [{{names: [client], compress: false}}]}}
  - {{port: {fed}, bind_addresses: ['127.0.0.1'], type: http, tls: true, resources: [{{names: [federation], compress: false}}]}}
tls_certificate_path: {crt}
tls_private_key_path: {key}
database: {{name: sqlite3, args: {{database: {d}/homeserver.db}}}}
federation_verify_certificates: false
federation_ip_range_blacklist: []
federation_domain_whitelist: ['127.0.0.1:{fed}', '{res}']
trusted_key_servers: [{{server_name: '{res}', accept_keys_insecurely: true}}]
suppress_key_server_warning: true
enable_registration: false
registration_shared_secret: "bench"
macaroon_secret_key: "bench"
form_secret: "bench"
bcrypt_rounds: 4
rc_joins: {{local: {rl}, remote: {rl}}}
rc_joins_per_room: {rl}
rc_message: {rl}
rc_login: {{address: {rl}, account: {rl}}}
url_preview_enabled: false
"#,
            crt = crt.display(),
            key = key.display(),
            res = r.server_name
        ),
    )?;
    let st = Command::new(&py)
        .args(["-m", "synapse.app.homeserver", "-c"])
        .arg(dir.join("homeserver.yaml"))
        .arg("--generate-keys")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    anyhow::ensure!(st.success(), "synapse --generate-keys failed");
    let mut cmd = Command::new(&py);
    if full {
        cmd.arg(std::fs::canonicalize("tests/interop/synapse_fulljoin.py")?);
    } else {
        cmd.args(["-m", "synapse.app.homeserver"]);
    }
    let mut p = spawn(cmd.arg("-c").arg(dir.join("homeserver.yaml")), dir.join("stdout"))?;
    let url = format!("http://127.0.0.1:{cli}");
    wait_up(http, &url, &mut p).await?;
    // Shared-secret registration: HMAC-SHA1(nonce NUL user NUL password NUL notadmin).
    let (_, v) = api(http, reqwest::Method::GET, &format!("{url}/_synapse/admin/v1/register"), None, None).await?;
    let nonce = v["nonce"].as_str().unwrap_or_default().to_owned();
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, b"bench");
    let mac = ring::hmac::sign(&k, format!("{nonce}\0bench\0bench\0notadmin").as_bytes());
    let hex: String = mac.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let (st, v) = api(
        http,
        reqwest::Method::POST,
        &format!("{url}/_synapse/admin/v1/register"),
        None,
        Some(json!({"nonce": nonce, "username": "bench", "password": "bench", "admin": false, "mac": hex})),
    )
    .await?;
    anyhow::ensure!(st == 200, "synapse registration failed: {v}");
    let token = v["access_token"].as_str().unwrap_or_default().to_owned();
    let room = r.world.room_id.clone();
    let result = measure_join(http, r, n, kind, &url, &token, p.pid(), move |http, url, token| {
        let (http, url, token, room) = (http.clone(), url.to_owned(), token.to_owned(), room.clone());
        async move {
            // Synapse answers /joined_members only once its partial state is complete.
            let (st, v) = api(
                &http,
                reqwest::Method::GET,
                &format!("{url}/_matrix/client/v3/rooms/{}/joined_members", q(&room)),
                Some(&token),
                None,
            )
            .await?;
            anyhow::ensure!(st == 200, "synapse joined_members: {st} {v}");
            Ok(())
        }
    })
    .await;
    let mut m = result?;
    m.db_mb = dir_db_size_mb(&dir, "homeserver.db");
    p.stop();
    Ok(m)
}

pub async fn join_bench(o: Options) -> anyhow::Result<()> {
    std::fs::create_dir_all(&o.dir)?;
    let http = reqwest::Client::builder().build()?;
    let mut results: Vec<Measure> = Vec::new();
    // Rounds: every joiner once per round, so the runs of one joiner are spread over the session's noise like
    // those of the others.
    for (round, &n) in (0..o.runs.max(1)).flat_map(|r| o.members.iter().map(move |n| (r, n))) {
        for j in &o.joiners {
            let r = start_resident(&http, &o, n).await?;
            eprintln!(
                "== N={n} joiner {j} run {} of {} (resident: {} events from {} servers)",
                round + 1,
                o.runs.max(1),
                r.world.events,
                r.world.servers
            );
            let m = match j.as_str() {
                "hearth-lazy" => run_hearth(&http, &o, &r, n, true).await,
                "hearth-full" => run_hearth(&http, &o, &r, n, false).await,
                "hearth-peek" => run_hearth_peek(&http, &o, &r, n).await,
                "synapse" => run_synapse(&http, &o, &r, n, false).await,
                "synapse-full" => run_synapse(&http, &o, &r, n, true).await,
                other => Err(anyhow::anyhow!("unknown joiner {other}")),
            };
            match m {
                Ok(m) => {
                    let o = |x: Option<f64>| x.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into());
                    eprintln!(
                        "   join {:.0} ms, first message {:.0} ms, full members {:.0} ms, rss {:.0} MB, cpu {:.1} s \
                         (resident: cpu {:.1} s, rss {:.0} MB, send_join {} ms, /state {} ms (streamed {} ms), \
                         /state_ids {} ms){}",
                        m.join_ms,
                        m.first_message_ms,
                        m.full_members_ms,
                        m.peak_rss_mb,
                        m.cpu_s,
                        m.resident_cpu_s,
                        m.resident_peak_rss_mb,
                        o(m.resident_send_join_ms),
                        o(m.resident_state_ms),
                        o(m.resident_state_streamed_ms),
                        o(m.resident_state_ids_ms),
                        if m.note.is_empty() { String::new() } else { format!("; {}", m.note) }
                    );
                    results.push(m)
                }
                Err(e) => {
                    eprintln!("   FAILED: {e:#}");
                    results.push(Measure {
                        members: n,
                        joiner: j.clone(),
                        note: format!("failed: {e:#}"),
                        ..Default::default()
                    });
                }
            }
            let _ = &r.dir;
            r.proc.stop();
        }
    }
    print_table(&results);
    if o.runs > 1 {
        print_summary(&results);
    }
    let stamp = hearth::store::accounts::now_ms();
    let json_path = o.dir.join(format!("results-{stamp}.json"));
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&json!({"results": results, "command": std::env::args().collect::<Vec<_>>()}))?,
    )?;
    std::fs::copy(&json_path, o.dir.join("results-latest.json"))?;
    let svg = o.dir.join("results-latest.svg");
    std::fs::write(&svg, chart(&results))?;
    println!("\nwrote {} and {}", json_path.display(), svg.display());
    if results.iter().any(|m| m.note.starts_with("failed")) {
        bail!("some joiners failed");
    }
    Ok(())
}

fn print_table(rs: &[Measure]) {
    println!(
        "\n{:>7} {:<13} {:>9} {:>10} {:>12} {:>8} {:>7} {:>7} {:>6} {:>9} {:>9} {:>12} {:>9} {:>9} {:>10}  note",
        "members",
        "joiner",
        "join ms",
        "1st msg ms",
        "full mem ms",
        "rss MB",
        "cpu s",
        "db MB",
        "reqs",
        "sync p99",
        "send p99",
        "res sj ms",
        "res st ms",
        "res cpu s",
        "res rss MB"
    );
    for m in rs {
        let o = |x: Option<f64>| x.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into());
        println!(
            "{:>7} {:<13} {:>9.0} {:>10.0} {:>12.0} {:>8.0} {:>7.1} {:>7.1} {:>6} {:>9.0} {:>9.0} {:>12} {:>9} {:>9.1} {:>10.0}  {}",
            m.members,
            m.joiner,
            m.join_ms,
            m.first_message_ms,
            m.full_members_ms,
            m.peak_rss_mb,
            m.cpu_s,
            m.db_mb,
            m.resident_requests,
            m.sync_p99_ms,
            m.send_p99_ms,
            o(m.resident_send_join_ms),
            o(m.resident_state_ms),
            m.resident_cpu_s,
            m.resident_peak_rss_mb,
            m.note
        );
    }
    // Ratios against Synapse in the same run.
    let by: BTreeMap<(usize, &str), &Measure> = rs.iter().map(|m| ((m.members, m.joiner.as_str()), m)).collect();
    for (&(n, j), m) in &by {
        if j != "hearth-lazy" {
            continue;
        }
        if let Some(s) = by.get(&(n, "synapse")) {
            if s.join_ms > 0.0 && m.join_ms > 0.0 {
                println!(
                    "N={n}: hearth-lazy vs synapse: join {:.1}x faster, full member list {:.1}x faster, peak RSS {:.1}x smaller",
                    s.join_ms / m.join_ms,
                    s.full_members_ms / m.full_members_ms.max(1.0),
                    s.peak_rss_mb / m.peak_rss_mb.max(1.0)
                );
            }
        }
    }
}

/// Median and worst of each figure over the runs of each (N, joiner): what the README's table shows. "Worst" is the
/// highest value (every figure here is better lower).
fn print_summary(rs: &[Measure]) {
    let mut groups: BTreeMap<(usize, &str), Vec<&Measure>> = BTreeMap::new();
    for m in rs.iter().filter(|m| !m.note.starts_with("failed")) {
        groups.entry((m.members, m.joiner.as_str())).or_default().push(m);
    }
    println!(
        "\nmedian / worst of the runs\n{:>7} {:<13} {:>4} {:>13} {:>13} {:>17} {:>11} {:>11} {:>11} {:>11} {:>13} {:>11}",
        "members",
        "joiner",
        "runs",
        "join ms",
        "1st msg ms",
        "full mem ms",
        "rss MB",
        "cpu s",
        "sync p99",
        "send p99",
        "res st ms",
        "res cpu s"
    );
    for ((n, j), ms) in &groups {
        let fig = |f: &dyn Fn(&Measure) -> f64, prec: usize| {
            let mut v: Vec<f64> = ms.iter().map(|m| f(m)).collect();
            v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
            let median = if v.len() % 2 == 1 { v[v.len() / 2] } else { (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0 };
            format!("{median:.prec$} / {:.prec$}", v[v.len() - 1])
        };
        println!(
            "{:>7} {:<13} {:>4} {:>13} {:>13} {:>17} {:>11} {:>11} {:>11} {:>11} {:>13} {:>11}",
            n,
            j,
            ms.len(),
            fig(&|m| m.join_ms, 0),
            fig(&|m| m.first_message_ms, 0),
            fig(&|m| m.full_members_ms, 0),
            fig(&|m| m.peak_rss_mb, 0),
            fig(&|m| m.cpu_s, 1),
            fig(&|m| m.sync_p99_ms, 0),
            fig(&|m| m.send_p99_ms, 0),
            fig(&|m| m.resident_state_ms.unwrap_or(0.0), 0),
            fig(&|m| m.resident_cpu_s, 1),
        );
    }
}

/// Join time and time to the full member list against N, per joiner (log-log), as SVG.
fn chart(rs: &[Measure]) -> String {
    let (w, h, pad) = (760.0, 420.0, 60.0);
    let ok: Vec<&Measure> = rs.iter().filter(|m| m.join_ms > 0.0).collect();
    let nmin = ok.iter().map(|m| m.members as f64).fold(f64::MAX, f64::min).max(1.0);
    let nmax = ok.iter().map(|m| m.members as f64).fold(1.0, f64::max).max(nmin * 10.0);
    let ymin = 10.0f64;
    let ymax = ok.iter().map(|m| m.full_members_ms.max(m.join_ms)).fold(100.0, f64::max) * 2.0;
    let x = |n: f64| pad + (n.log10() - nmin.log10()) / (nmax.log10() - nmin.log10()) * (w - 2.0 * pad);
    let y = |v: f64| h - pad - (v.max(ymin).log10() - ymin.log10()) / (ymax.log10() - ymin.log10()) * (h - 2.0 * pad);
    let colors =
        [("hearth-lazy", "#d9480f"), ("hearth-full", "#f08c00"), ("synapse", "#1971c2"), ("synapse-full", "#5f3dc4")];
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/>"#
    );
    s += &format!(
        r#"<text x="{}" y="20" font-size="14">Join (solid) and full member list (dashed), ms, vs room members (log-log)</text>"#,
        pad
    );
    s += &format!(
        r#"<line x1="{pad}" y1="{}" x2="{}" y2="{}" stroke="black"/><line x1="{pad}" y1="{pad}" x2="{pad}" y2="{}" stroke="black"/>"#,
        h - pad,
        w - pad,
        h - pad,
        h - pad
    );
    let mut v = ymin;
    while v <= ymax {
        s += &format!(
            r##"<text x="5" y="{:.0}">{}</text><line x1="{pad}" x2="{}" y1="{:.0}" y2="{:.0}" stroke="#eee"/>"##,
            y(v) + 4.0,
            v,
            w - pad,
            y(v),
            y(v)
        );
        v *= 10.0;
    }
    let mut ns: Vec<usize> = ok.iter().map(|m| m.members).collect();
    ns.sort();
    ns.dedup();
    for n in &ns {
        s += &format!(r#"<text x="{:.0}" y="{}">{}</text>"#, x(*n as f64) - 15.0, h - pad + 18.0, n);
    }
    for (i, (name, color)) in colors.iter().enumerate() {
        let mut pts: Vec<&&Measure> = ok.iter().filter(|m| m.joiner == *name).collect();
        pts.sort_by_key(|m| m.members);
        if pts.is_empty() {
            continue;
        }
        for (field, dash) in [(0, ""), (1, r#" stroke-dasharray="5,4""#)] {
            let path: Vec<String> = pts
                .iter()
                .map(|m| {
                    format!(
                        "{:.1},{:.1}",
                        x(m.members as f64),
                        y(if field == 0 { m.join_ms } else { m.full_members_ms })
                    )
                })
                .collect();
            s += &format!(
                r#"<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="{}"/>"#,
                path.join(" ")
            );
            for p in &path {
                let (px, py) = p.split_once(',').unwrap_or(("0", "0"));
                s += &format!(r#"<circle cx="{px}" cy="{py}" r="3" fill="{color}"/>"#);
            }
        }
        s += &format!(r#"<text x="{}" y="{}" fill="{color}">{name}</text>"#, w - pad - 90.0, pad + 16.0 * i as f64);
    }
    s + "</svg>\n"
}

/// Table and chart over the results of several runs.
pub fn chart_files(files: &[PathBuf], out: &Path) -> anyhow::Result<()> {
    let mut all: Vec<Measure> = Vec::new();
    for f in files {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(f)?)?;
        let rs: Vec<Measure> = serde_json::from_value(v["results"].clone())?;
        all.extend(rs.into_iter().filter(|m| m.join_ms > 0.0));
    }
    print_table(&all);
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(out, chart(&all))?;
    println!("wrote {}", out.display());
    Ok(())
}
