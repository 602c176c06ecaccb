//! Operating Hearth: `/_hearth/health`, Prometheus `/metrics`, `hearth config check`, systemd readiness
//! (`READY=1`/`STOPPING=1` on `$NOTIFY_SOCKET`) and a graceful stop on SIGTERM.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn hearth(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(hearth_bin());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("HEARTH_") {
            cmd.env_remove(k);
        }
    }
    cmd.current_dir(dir).args(args).envs(env.iter().copied()).stdin(Stdio::null());
    cmd.output().expect("run hearth")
}

/// GET of a path outside the client API (the test client prefixes `/_matrix/client/v3` otherwise).
async fn get_raw(base_url: &str, path: &str) -> Resp {
    let r = reqwest::get(format!("{base_url}{path}")).await.expect("request");
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    Resp { status, body: serde_json::from_str(&text).unwrap_or(Value::Null), text }
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test]
async fn health_needs_no_auth() {
    let server = TestServer::start().await;
    let r = get_raw(&server.base_url, "/_hearth/health").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["status"], "ok");
    assert_eq!(r.body["database"], "ok");
    assert_eq!(r.body["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(r.body["server_name"], "localhost");
    server.stop().await;
}

#[tokio::test]
async fn metrics_are_off_by_default() {
    let server = TestServer::start().await;
    get_raw(&server.base_url, "/metrics").await.assert_err(404, "M_UNRECOGNIZED");
    server.stop().await;
}

/// One sample's value from Prometheus text (`name{labels} value`), matched by the whole series text.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.parse().ok()))
}

#[tokio::test]
async fn metrics_count_requests_per_route_and_read_the_database() {
    let server = TestServer::start_with(|c| c.metrics.enabled = true).await;
    let alice = server.user("alice").await;
    let room = alice.create_room(json!({})).await;
    for i in 0..3 {
        alice.send_text(&room, &format!("m{i}")).await;
    }
    alice.get("/no/such/endpoint/at/all").await.assert_err(404, "M_UNRECOGNIZED");
    alice.get("/another/unknown/path").await.assert_err(404, "M_UNRECOGNIZED");

    let r = get_raw(&server.base_url, "/metrics").await;
    assert_eq!(r.status, 200);
    let m = r.text;
    let send = r#"hearth_http_requests_total{group="client",route="/_matrix/client/v3/rooms/{room_id}/send/{event_type}/{txn_id}",method="PUT",status="2xx"}"#;
    assert_eq!(sample(&m, send), Some(3.0), "{m}");
    let hist = r#"hearth_http_request_duration_seconds_count{group="client",route="/_matrix/client/v3/rooms/{room_id}/send/{event_type}/{txn_id}",method="PUT"}"#;
    assert_eq!(sample(&m, hist), Some(3.0), "{m}");
    let inf = r#"hearth_http_request_duration_seconds_bucket{group="client",route="/_matrix/client/v3/rooms/{room_id}/send/{event_type}/{txn_id}",method="PUT",le="+Inf"}"#;
    assert_eq!(sample(&m, inf), Some(3.0), "{m}");
    // Unknown paths share one label instead of growing the series set.
    let unmatched = r#"hearth_http_requests_total{group="other",route="unmatched",method="GET",status="4xx"}"#;
    assert_eq!(sample(&m, unmatched), Some(2.0), "{m}");
    assert_eq!(sample(&m, "hearth_federation_outbox_depth"), Some(0.0));
    assert!(sample(&m, "hearth_database_size_bytes").unwrap() > 10_000.0);
    assert_eq!(sample(&m, "hearth_users"), Some(1.0));
    assert!(sample(&m, "hearth_stream_position").unwrap() > 0.0);
    assert!(m.contains("# TYPE hearth_http_request_duration_seconds histogram"));
    assert!(m.contains("# TYPE hearth_jobs gauge"));

    // Job progress appears once there is a job.
    server
        .running
        .services
        .store
        .write(|w| {
            hearth::jobs::enqueue(w.db(), "resync", None, 0, &json!({}))?;
            // At 7 of 10 units and never due again, so the job worker leaves it as it is.
            let job = hearth::store::jobs::next_due(w.db())?.expect("the job just queued");
            hearth::store::jobs::save_cursor(w.db(), job.job_id, "{}", 7, Some(10))?;
            hearth::store::jobs::record_failure(w.db(), job.job_id, 0, i64::MAX, "parked by the test")?;
            Ok(())
        })
        .await
        .unwrap();
    let m = get_raw(&server.base_url, "/metrics").await.text;
    assert_eq!(sample(&m, r#"hearth_jobs{kind="resync"}"#), Some(1.0), "{m}");
    assert_eq!(sample(&m, r#"hearth_job_done_units{kind="resync",room_id=""}"#), Some(7.0), "{m}");
    assert_eq!(sample(&m, r#"hearth_job_total_units{kind="resync",room_id=""}"#), Some(10.0), "{m}");
    server.stop().await;
}

#[test]
fn config_check_names_the_offending_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("good.toml"), "server_name = \"example.org\"\n[metrics]\nenabled = true\n").unwrap();
    let o = hearth(d, &["config", "check", "-c", "good.toml"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("configuration OK"), "{}", text(&o));
    assert!(!d.join("hearth.db").exists(), "checking does not create the database");

    // No server name is an error naming the key and the file to edit; so is an invalid log level.
    std::fs::write(d.join("noname.toml"), "[metrics]\nenabled = true\n").unwrap();
    let o = hearth(d, &["config", "check", "-c", "noname.toml"], &[]);
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("server_name") && err.contains("noname.toml"), "{}", text(&o));
    let o = hearth(d, &["config", "check", "-c", "noname.toml", "--server-name", "example.org"], &[]);
    assert!(o.status.success(), "--server-name sets it: {}", text(&o));
    let o = hearth(d, &["config", "check", "-c", "good.toml"], &[("HEARTH_LOG__LEVEL", "info,hearth=chatty")]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("log.level"), "{}", text(&o));

    let cases: &[(&str, &str)] = &[
        ("[metrics]\nenable = true\n", "enable"),
        ("[metrics]\nenabled = \"sometimes\"\n", "metrics.enabled"),
        ("[log]\njson = 3\n", "log.json"),
        ("[rooms]\ndefault_version = 13\n", "rooms.default_version"),
        ("[rooms]\ndefault_version = \"org.example.v12\"\n", "rooms.default_version"),
        ("[listen]\nfederation = \"0.0.0.0:8448\"\n", "federation.tls_cert"),
        (
            "[listen]\nfederation = \"0.0.0.0:8448\"\n[federation]\ntls_cert = \"/nonexistent/cert.pem\"\ntls_key = \"/nonexistent/key.pem\"\n",
            "federation.tls_cert",
        ),
    ];
    for (i, (toml, key)) in cases.iter().enumerate() {
        let file = format!("bad{i}.toml");
        std::fs::write(d.join(&file), toml).unwrap();
        let o = hearth(d, &["config", "check", "-c", &file], &[]);
        assert!(!o.status.success(), "{toml:?} passed: {}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(key),
            "{toml:?}: message does not name `{key}`: {}",
            text(&o)
        );
    }
    let o = hearth(d, &["config", "check", "-c", "missing.toml"], &[]);
    assert!(!o.status.success());
}

/// Starts the binary with a notify socket, checks READY=1 comes when it serves, then SIGTERMs it during a long poll
/// and a burst of sends: it answers the long poll at once, finishes what was in flight, says STOPPING=1, exits 0
/// with the WAL checkpointed, and everything acknowledged is there after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn systemd_notify_and_graceful_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("hearth.db");
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut server = BinServer::start(
        &db,
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("HEARTH_REGISTRATION__ENABLED", "true"),
            ("HEARTH_LIMITS__MESSAGES_PER_SECOND", "1000"),
        ],
    )
    .await;
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).unwrap();
    let ready = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");

    let mut alice = server.client();
    alice.register("alice", PASSWORD).await.ok();
    let room = alice.create_room(json!({})).await;
    // A long poll that nothing wakes (bob is in no room), and a burst of sends.
    let mut bob = server.client();
    bob.register("bob", PASSWORD).await.ok();
    let since = bob.sync(None, &[]).await.ok()["next_batch"].as_str().unwrap().to_owned();
    let poller = bob.clone();
    let poll = tokio::spawn(async move {
        let t = Instant::now();
        let r = poller.try_request(reqwest::Method::GET, &format!("/sync?since={since}&timeout=60000"), None).await;
        (t.elapsed(), r.map(|r| r.status))
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sends: Vec<_> = (0..20)
        .map(|i| {
            let c = alice.clone();
            let room = room.clone();
            tokio::spawn(async move {
                let txn = format!("burst{i}");
                let r = c
                    .try_request(
                        reqwest::Method::PUT,
                        &format!("/rooms/{}/send/m.room.message/{txn}", enc(&room)),
                        Some(&json!({"msgtype": "m.text", "body": format!("burst {i}")})),
                    )
                    .await;
                r.ok().filter(|r| r.status == 200).and_then(|r| r.body["event_id"].as_str().map(str::to_owned))
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let stop_started = Instant::now();
    // SIGTERM as systemd sends it; through libc, not the `kill` program (a minimal Debian has no procps).
    // SAFETY: kill(2) on the pid of our own child process, which has not been reaped yet.
    let kill = unsafe { libc::kill(server.child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(kill, 0, "kill: {}", std::io::Error::last_os_error());

    let n = sock.recv(&mut buf).unwrap();
    let stopping = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping}");
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(stop_started.elapsed() < Duration::from_secs(15), "no exit within 15 s of SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = stop_started.elapsed();
    assert!(
        status.success(),
        "exit status {status:?}: {}",
        std::fs::read_to_string(&server.log_path).unwrap_or_default()
    );
    assert!(took < Duration::from_secs(10), "graceful stop took {took:?}");
    let (poll_took, poll_status) = poll.await.unwrap();
    assert!(poll_took < Duration::from_secs(10), "the long poll held on for {poll_took:?} ({poll_status:?})");
    let mut acked = Vec::new();
    for s in sends {
        acked.extend(s.await.unwrap());
    }
    eprintln!(
        "stopped in {took:?}; long poll ended after {poll_took:?} with {poll_status:?}; {} of 20 sends acknowledged",
        acked.len()
    );
    let wal = std::fs::metadata(dir.path().join("hearth.db-wal")).map(|m| m.len()).unwrap_or(0);
    assert_eq!(wal, 0, "the WAL was checkpointed on the way out");
    drop(server);

    let server = BinServer::start(&db, &[]).await;
    let alice = alice.at(&server.base_url);
    for id in &acked {
        alice.event(&room, id).await.ok();
    }
    alice.send_text(&room, "after restart").await;
    server.kill();
}

/// Behind a reverse proxy on the same machine, the login limit per address uses the proxy's `X-Forwarded-For`, so
/// one client's failures do not lock out the others that share the proxy's address.
#[tokio::test]
async fn login_limit_per_address_behind_a_local_proxy() {
    let server = TestServer::start().await;
    let login = |user: String, forwarded: &'static str| {
        let url = format!("{}/_matrix/client/v3/login", server.base_url);
        async move {
            let body = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user}, "password": "wrong"});
            reqwest::Client::new()
                .post(url)
                .header("X-Forwarded-For", forwarded)
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    // Different user names each time: only the address limit (5 failures a minute) can trip.
    let mut statuses = Vec::new();
    for i in 0..7 {
        statuses.push(login(format!("nobody{i}"), "10.9.8.7, 203.0.113.5").await);
    }
    assert_eq!(statuses.last(), Some(&429), "{statuses:?}");
    // Another client behind the same proxy is not affected.
    assert_eq!(login("someone".into(), "198.51.100.7").await, 403);
    server.stop().await;

    // A peer that is not a trusted proxy is taken by its own address: its X-Forwarded-For is ignored, so the
    // "other client" is the same address and is limited too.
    let server = TestServer::start_with(|c| c.limits.trusted_proxies = vec!["192.0.2.0/24".into()]).await;
    let login = |user: String, forwarded: &'static str| {
        let url = format!("{}/_matrix/client/v3/login", server.base_url);
        async move {
            let body = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user}, "password": "wrong"});
            let r = reqwest::Client::new().post(url).header("X-Forwarded-For", forwarded).json(&body).send().await;
            r.unwrap().status().as_u16()
        }
    };
    for i in 0..6 {
        login(format!("nobody{i}"), "10.9.8.7").await;
    }
    assert_eq!(login("someone".into(), "198.51.100.7").await, 429, "a forged X-Forwarded-For does not help");
    server.stop().await;
}

/// systemd's default notify socket is an abstract one (`@/org/freedesktop/systemd1/notify/...`).
#[tokio::test]
async fn systemd_notify_to_an_abstract_socket() {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("hearth-test-notify-{}", std::process::id());
    let sock =
        UnixDatagram::bind_addr(&std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = BinServer::start(&dir.path().join("hearth.db"), &[("NOTIFY_SOCKET", &format!("@{name}"))]).await;
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).lines().any(|l| l == "READY=1"));
    server.kill();
}
