//! Real clients in a real browser and in Node, against the `hearth` binary:
//!
//! * `hydrogen_in_chromium`: Hydrogen (the web client, built from npm `hydrogen-view-sdk` by
//!   `tests/browser/build.mjs`) in headless Debian Chromium driven by playwright-core
//!   (`tests/browser/hydrogen.test.mjs`), through a real reverse proxy (Debian's `caddy`, or `$CADDY`) as in a
//!   deployment, with `well_known.client_base_url` naming the proxy: log in, room list, open a room, scroll back through history, send from the
//!   composer, see the other user's reply live, display names and an avatar (authenticated media), send a picture
//!   from the attachment menu (upload, shown in the timeline, downloaded intact by the other user).
//! * `matrix_js_sdk_end_to_end_encryption`: matrix-js-sdk 37 with its Rust crypto (WebAssembly) in Node
//!   (`tests/browser/jssdk.test.mjs`): `startClient({lazyLoadMembers})`, cross-signing bootstrap, key backup, an
//!   encrypted message each way between two Hearth users, and a second device restoring the keys from the backup.
//! * `matrix_js_sdk_encryption_hearth_and_synapse`: the same script with Bob on a real Synapse
//!   (`tests/interop/e2ee.py` starts the lab): keys, claims, to-device and device lists over federation.
//!   Also skipped with `HEARTHTEST_SKIP_SYNAPSE=1`.
//!
//! Needs `node`, `npm ci` run in `tests/browser`, Debian's `chromium` and `caddy` (`.ci/run` installs them). Set
//! `HEARTHTEST_SKIP_BROWSER=1` to skip deliberately (it prints that it was skipped); otherwise anything missing fails.
//! On failure a screenshot, the page HTML and the browser console are kept under `target/browser-artifacts/`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

fn artifacts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/browser-artifacts")
}

/// `None` (after printing why) when the browser tests are to be skipped; panics when something needed is missing.
fn prerequisites(test: &str) -> Option<()> {
    if std::env::var("HEARTHTEST_SKIP_BROWSER").as_deref() == Ok("1") {
        println!("SKIPPED {test}: HEARTHTEST_SKIP_BROWSER=1 is set (the browser test did not run)");
        return None;
    }
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.as_ref().is_ok_and(|o| o.status.success()),
        "`node` is not runnable ({node:?}); install Node.js 20, or set HEARTHTEST_SKIP_BROWSER=1"
    );
    assert!(
        browser_dir().join("node_modules/playwright-core").is_dir(),
        "tests/browser/node_modules is missing: run `npm ci` in tests/browser, or set HEARTHTEST_SKIP_BROWSER=1"
    );
    Some(())
}

/// Runs `node SCRIPT ARGS...` in tests/browser with a deadline; returns (success, stdout, stderr).
async fn node(script: &str, args: &[&str], env: &[(&str, &str)], limit: Duration) -> (bool, String, String) {
    let mut cmd = Command::new("node");
    cmd.current_dir(browser_dir())
        .arg(script)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn node");
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = child.wait_with_output().expect("node output");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Node 20, Chromium and `npm ci` in tests/browser; see tests/README.md"]
async fn hydrogen_in_chromium() {
    if prerequisites("hydrogen_in_chromium").is_none() {
        return;
    }
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "{chromium} does not exist: `apt-get install chromium`, or set HEARTHTEST_SKIP_BROWSER=1"
    );

    let (ok, out, err) = node("build.mjs", &[], &[], Duration::from_secs(120)).await;
    assert!(ok, "building Hydrogen failed\n{out}\n{err}");

    let dir = tempfile::tempdir().unwrap();
    // Clients reach Hearth only through the proxy, which the configuration names as the public URL.
    let proxy_port = free_port();
    let public_url = format!("http://127.0.0.1:{proxy_port}");
    // The set-up sends 40 messages in a row: a message rate for tests (the script also honours 429 retry_after_ms).
    let env = [
        ("HEARTH_REGISTRATION__ENABLED", "true"),
        ("HEARTH_LIMITS__MESSAGES_PER_SECOND", "1000"),
        ("HEARTH_WELL_KNOWN__CLIENT_BASE_URL", public_url.as_str()),
    ];
    let server = BinServer::start(&dir.path().join("hearth.db"), &env).await;
    let proxy = Caddy::start(dir.path(), proxy_port, server.addr, None).await;
    // Discovery and login through the proxy name the proxy, never the address Hearth listens on.
    let anon = Client::new(&public_url);
    assert_eq!(anon.get("/.well-known/matrix/client").await.ok()["m.homeserver"]["base_url"], public_url.as_str());
    let mut probe = anon.clone();
    probe.register("proxyprobe", "probe-pass").await.ok();
    let login = probe.login("proxyprobe", "probe-pass").await.ok();
    assert_eq!(login["well_known"]["m.homeserver"]["base_url"], public_url.as_str(), "{login}");

    let artifacts = artifacts_dir();
    let _ = std::fs::remove_dir_all(&artifacts); // only this run's failure artifacts are kept
    let (ok, out, err) = node(
        "hydrogen.test.mjs",
        &[&public_url, artifacts.to_str().unwrap()],
        &[("CHROMIUM", &chromium)],
        Duration::from_secs(300),
    )
    .await;
    println!("{out}");
    if !ok {
        let log = std::fs::read_to_string(&server.log_path).unwrap_or_default();
        let _ = std::fs::create_dir_all(&artifacts);
        let _ = std::fs::write(artifacts.join("hydrogen-hearth.log"), &log);
        panic!(
            "Hydrogen in Chromium failed (artifacts in {})\n--- stdout\n{out}\n--- stderr\n{err}",
            artifacts.display()
        );
    }
    assert!(out.contains("Bob's reply arrived live"), "the script ended without its last check:\n{out}");
    // After logging in, the app kept talking to the proxy: its syncs and sends went through it (Hydrogen uses the
    // r0 paths; the set-up in the script uses v3).
    let paths = proxy.request_paths();
    for path in ["/_matrix/client/r0/login", "/_matrix/client/r0/sync", "/_matrix/client/r0/keys/upload"] {
        assert!(paths.iter().any(|p| p == path), "no {path} request went through the proxy: {paths:?}");
    }
    assert!(
        paths.iter().any(|p| p.starts_with("/_matrix/client/r0/rooms/") && p.contains("/send/")),
        "Hydrogen's sends did not go through the proxy: {paths:?}"
    );
    drop(proxy);
    server.kill();
}

/// Element Web (1.7.14, the last release on npm, built from its npm package by `tests/element/build.mjs`) in
/// headless Chromium, served by the same Caddy that proxies Hearth, with `well_known.client_base_url` naming the
/// proxy (`tests/element/element.test.mjs`): sign in, keys set up, room list, history, send from the composer, a
/// reply live, an edit and a reaction shown (and again after a reload, from the server's aggregations), still signed
/// in after a reload, server-side search from the room header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Node 20, Chromium, Caddy and `npm ci` in tests/browser and tests/element; see tests/README.md"]
async fn element_web_in_chromium_through_caddy() {
    if prerequisites("element_web_in_chromium_through_caddy").is_none() {
        return;
    }
    let element = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/element");
    assert!(
        element.join("node_modules/.bin/webpack").exists(),
        "tests/element/node_modules is missing: run `npm ci` in tests/element, or set HEARTHTEST_SKIP_BROWSER=1"
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(Path::new(&chromium).exists(), "{chromium} does not exist: `apt-get install chromium`");
    // A no-op when .ci/run built it already; a first build takes a minute or two.
    let (ok, out, err) = node("../element/build.mjs", &[], &[], Duration::from_secs(900)).await;
    assert!(ok, "building Element Web failed\n{out}\n{err}");

    let dir = tempfile::tempdir().unwrap();
    let proxy_port = free_port();
    let public_url = format!("http://127.0.0.1:{proxy_port}");
    let env = [("HEARTH_REGISTRATION__ENABLED", "true"), ("HEARTH_WELL_KNOWN__CLIENT_BASE_URL", public_url.as_str())];
    let server = BinServer::start(&dir.path().join("hearth.db"), &env).await;
    // Element reads its homeserver from config.json beside the app: the proxy's address, as a deployment writes it.
    let webapp = element.join("build/webapp");
    let config = serde_json::json!({
        "default_server_config": {"m.homeserver": {"base_url": public_url, "server_name": "localhost"}},
        "disable_guests": true, "disable_3pid_login": true, "brand": "Element", "piwik": false,
    });
    std::fs::write(webapp.join("config.json"), config.to_string()).unwrap();
    let proxy = Caddy::start(dir.path(), proxy_port, server.addr, Some(&webapp)).await;

    let artifacts = artifacts_dir();
    let _ = std::fs::remove_dir_all(&artifacts);
    let (ok, out, err) = node(
        "../element/element.test.mjs",
        &[&public_url, artifacts.to_str().unwrap()],
        &[("CHROMIUM", &chromium)],
        Duration::from_secs(300),
    )
    .await;
    println!("{out}");
    if !ok {
        let log = std::fs::read_to_string(&server.log_path).unwrap_or_default();
        let _ = std::fs::create_dir_all(&artifacts);
        let _ = std::fs::write(artifacts.join("element-hearth.log"), &log);
        panic!("Element Web failed (artifacts in {})\n--- stdout\n{out}\n--- stderr\n{err}", artifacts.display());
    }
    assert!(out.contains("Element Web passed"), "the script ended without its last check:\n{out}");
    // Element's own requests after sign-in went through the proxy (it uses the r0 and unstable paths).
    let paths = proxy.request_paths();
    for path in
        ["/_matrix/client/r0/login", "/_matrix/client/r0/sync", "/_matrix/client/unstable/keys/device_signing/upload"]
    {
        assert!(paths.iter().any(|p| p == path), "no {path} request went through the proxy: {paths:?}");
    }
    assert!(
        paths.iter().any(|p| p.starts_with("/_matrix/client/r0/rooms/") && p.contains("/send/")),
        "Element's sends did not go through the proxy: {paths:?}"
    );
    drop(proxy);
    server.kill();
}

/// Debian's Caddy (`caddy`, or `$CADDY`) as a plain-HTTP reverse proxy on `port` in front of `upstream`, logging
/// every request, and serving the files of `site` (a web client) for every other path; stopped when dropped.
struct Caddy {
    child: std::process::Child,
    access_log: PathBuf,
}

impl Caddy {
    async fn start(dir: &Path, port: u16, upstream: std::net::SocketAddr, site: Option<&Path>) -> Caddy {
        let caddy = std::env::var("CADDY").unwrap_or_else(|_| "caddy".into());
        let home = dir.join("caddy");
        std::fs::create_dir_all(&home).unwrap();
        let access_log = home.join("access.log");
        // The README's example, plus what a test needs: no admin endpoint, no HTTPS, a request log.
        let files = site.map(|s| format!("    root * {}\n    file_server\n", s.display())).unwrap_or_default();
        let caddyfile = format!(
            "{{\n    admin off\n    auto_https off\n}}\nhttp://127.0.0.1:{port} {{\n    reverse_proxy /_matrix/* {upstream}\n    \
             reverse_proxy /.well-known/matrix/* {upstream}\n{files}    log {{\n        output file {}\n    }}\n}}\n",
            access_log.display()
        );
        std::fs::write(home.join("Caddyfile"), caddyfile).unwrap();
        let log = std::fs::File::create(home.join("caddy.log")).unwrap();
        let child = Command::new(&caddy)
            .args(["run", "--adapter", "caddyfile", "--config"])
            .arg(home.join("Caddyfile"))
            .env("XDG_DATA_HOME", &home)
            .env("XDG_CONFIG_HOME", &home)
            .env("HOME", &home)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run {caddy} ({e}): `apt-get install caddy`, or set HEARTHTEST_SKIP_BROWSER=1")
            });
        let mut proxy = Caddy { child, access_log };
        let url = format!("http://127.0.0.1:{port}/_matrix/client/versions");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = proxy.child.try_wait() {
                panic!(
                    "caddy exited with {status}: {}",
                    std::fs::read_to_string(home.join("caddy.log")).unwrap_or_default()
                );
            }
            if reqwest::get(&url).await.is_ok_and(|r| r.status().is_success()) {
                return proxy;
            }
            assert!(Instant::now() < deadline, "caddy did not proxy {url} within 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = &mut proxy;
        }
    }

    /// The paths (without query) of the requests the proxy handled, in order.
    fn request_paths(&self) -> Vec<String> {
        let log = std::fs::read_to_string(&self.access_log).unwrap_or_default();
        log.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| v["request"]["uri"].as_str().map(|u| u.split('?').next().unwrap_or(u).to_owned()))
            .collect()
    }
}

impl Drop for Caddy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Node 20, Chromium and `npm ci` in tests/browser; see tests/README.md"]
async fn matrix_js_sdk_end_to_end_encryption() {
    if prerequisites("matrix_js_sdk_end_to_end_encryption").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = BinServer::start(&dir.path().join("hearth.db"), &[("HEARTH_REGISTRATION__ENABLED", "true")]).await;
    let (ok, out, err) = node("jssdk.test.mjs", &[&server.base_url], &[], Duration::from_secs(240)).await;
    let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("[js-sdk") || l.contains("passed")).collect();
    println!("{}", lines.join("\n"));
    if !ok {
        let log = std::fs::read_to_string(&server.log_path).unwrap_or_default();
        panic!(
            "matrix-js-sdk end-to-end encryption failed\n--- stdout\n{out}\n--- stderr\n{err}\n--- server log\n{log}"
        );
    }
    assert!(
        out.contains("decrypted alice's message with the key from the backup"),
        "the script ended without its last check:\n{out}"
    );
    server.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Node 20, `npm ci` in tests/browser and Synapse (target/synapse-venv); see tests/README.md"]
async fn matrix_js_sdk_encryption_hearth_and_synapse() {
    if prerequisites("matrix_js_sdk_encryption_hearth_and_synapse").is_none() {
        return;
    }
    if std::env::var("HEARTHTEST_SKIP_SYNAPSE").as_deref() == Ok("1") {
        println!(
            "SKIPPED matrix_js_sdk_encryption_hearth_and_synapse: HEARTHTEST_SKIP_SYNAPSE=1 (Synapse interop not run)"
        );
        return;
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let mut child = Command::new("python3")
        .arg(format!("{root}/tests/interop/e2ee.py"))
        .env("HEARTHTEST_BIN", hearth_bin())
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 must be installed to run the Synapse interop tests");
    let deadline = Instant::now() + Duration::from_secs(400);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = child.wait_with_output().expect("python output");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{stdout}");
    assert!(
        out.status.success(),
        "js-sdk E2EE between Hearth and Synapse failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    assert!(stdout.contains("e2ee with synapse: ok"), "{stdout}");
}
