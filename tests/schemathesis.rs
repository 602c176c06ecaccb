//! Property-based tests against the Matrix spec: schemathesis (PyPI, pinned in tests/schema/requirements.txt) drives
//! the real binary from the spec's OpenAPI definitions (tests/schema/hearth-openapi.json, built by
//! tests/schema/bundle.py from the matrix-spec copy and restricted to the operations Hearth implements).
//!
//! Three passes, each with a fixed seed and a bounded number of examples per operation (phases: examples, coverage,
//! fuzzing; positive and negative data):
//! 1. client API, identifiers as generated (mostly unknown rooms, users, events: the error paths);
//! 2. client API, identifiers pinned to a real user, room, event, device and backup version
//!    (tests/schema/pinned-ids.toml), so the handlers behind the look-ups run;
//! 3. the federation endpoints that need no signature (`/_matrix/federation/v1/version`, `/_matrix/key/v2/server`,
//!    `/_matrix/key/v2/query`) on a server with federation on (served on the client listener).
//!
//! Checks: no 5xx (`not_a_server_error`), content types and response bodies conform to the spec's schemas, invalid
//! input is refused with a 4xx, and every error answer carries an `errcode` (custom checks in tests/schema/hooks.py,
//! which also lists the deliberate deviations). Passes 1-2 run on a server with federation off, so nothing the
//! generator invents (remote rooms, users, media) makes the server contact another host.
//!
//! Needs schemathesis: `target/schema-venv/bin/schemathesis` (what `.ci/run` installs:
//! `python3 -m venv target/schema-venv && target/schema-venv/bin/pip install -r tests/schema/requirements.txt`),
//! else `schemathesis` on PATH, else `$SCHEMATHESIS`. Set `HEARTHTEST_SKIP_SCHEMA=1` to skip it (it says so); without
//! that a missing schemathesis fails the test. Reports land in `target/schemathesis/`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const SEED: &str = "20260721";
const MAX_EXAMPLES: &str = "15";
const CHECKS: &str = "not_a_server_error,content_type_conformance,matrix_error_body,matrix_negative_data_rejection,matrix_response_schema";

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn schemathesis_bin() -> PathBuf {
    if let Ok(p) = std::env::var("SCHEMATHESIS") {
        return PathBuf::from(p);
    }
    let venv = manifest_dir().join("target/schema-venv/bin/schemathesis");
    if venv.exists() {
        return venv;
    }
    PathBuf::from("schemathesis")
}

struct Pass<'a> {
    name: &'a str,
    config: &'a str,
    url: &'a str,
    token: Option<&'a str>,
    /// `--include-path-regex` / `--exclude-path-regex`.
    include: Option<&'a str>,
    exclude: Option<&'a str>,
    env: Vec<(&'a str, String)>,
}

/// Runs one schemathesis pass; returns its output. Panics (with the output) unless it exits 0.
fn run_pass(bin: &Path, out_dir: &Path, pass: &Pass) -> String {
    let schema_dir = manifest_dir().join("tests/schema");
    let mut cmd = Command::new(bin);
    cmd.arg("--config-file")
        .arg(schema_dir.join(pass.config))
        .arg("--no-color")
        .arg("run")
        .arg(schema_dir.join("hearth-openapi.json"))
        .args(["--url", pass.url, "--seed", SEED, "--max-examples", MAX_EXAMPLES])
        .args(["--phases", "examples,coverage,fuzzing", "--checks", CHECKS, "--workers", "2"])
        .args(["--request-timeout", "30", "--output-truncate", "true"])
        .args(["--report", "junit,ndjson", "--report-dir"])
        .arg(out_dir.join(pass.name))
        .env("HEARTHTEST_SCHEMA_DIR", &schema_dir)
        .env("HYPOTHESIS_STORAGE_DIRECTORY", out_dir.join("hypothesis"))
        .env("SCHEMATHESIS_HOOKS", "")
        .stdin(Stdio::null());
    let log_path = out_dir.join(format!("{}.txt", pass.name));
    let log = std::fs::File::create(&log_path).expect("output file");
    cmd.stdout(log.try_clone().unwrap()).stderr(log);
    if let Some(t) = pass.token {
        cmd.args(["--header", &format!("Authorization: Bearer {t}")]);
    }
    if let Some(re) = pass.include {
        cmd.args(["--include-path-regex", re]);
    }
    if let Some(re) = pass.exclude {
        cmd.args(["--exclude-path-regex", re]);
    }
    for (k, v) in &pass.env {
        cmd.env(k, v);
    }
    let started = Instant::now();
    let mut child = cmd.spawn().unwrap_or_else(|e| {
        panic!(
            "cannot run {} ({e}): install it with `python3 -m venv target/schema-venv && \
             target/schema-venv/bin/pip install -r tests/schema/requirements.txt`, or set HEARTHTEST_SKIP_SCHEMA=1",
            bin.display()
        )
    });
    // Bounded: a pass takes well under a minute here; give up (and fail) after ten.
    let deadline = started + Duration::from_secs(600);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let summary: Vec<&str> = text
        .lines()
        .filter(|l| {
            let t = l.trim();
            t.starts_with("Tested:") || t.contains(" generated,")
        })
        .map(str::trim)
        .collect();
    println!("schemathesis pass `{}` ({:.0} s): {}", pass.name, started.elapsed().as_secs_f64(), summary.join("; "));
    assert!(
        status.is_some_and(|s| s.success()),
        "schemathesis pass `{}` failed ({status:?}, None = timed out); full output in {}\n{text}",
        pass.name,
        log_path.display()
    );
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs schemathesis (target/schema-venv); see tests/README.md"]
async fn schemathesis_against_the_spec() {
    if std::env::var("HEARTHTEST_SKIP_SCHEMA").as_deref() == Ok("1") {
        println!(
            "SKIPPED schemathesis_against_the_spec: HEARTHTEST_SKIP_SCHEMA=1 is set (the schemathesis passes did not run)"
        );
        return;
    }
    let bin = schemathesis_bin();
    let probe = Command::new(&bin).arg("--version").output();
    assert!(
        probe.as_ref().is_ok_and(|o| o.status.success()),
        "schemathesis is not runnable as `{}` ({probe:?}): run `python3 -m venv target/schema-venv && \
         target/schema-venv/bin/pip install -r tests/schema/requirements.txt`, or set HEARTHTEST_SKIP_SCHEMA=1",
        bin.display()
    );
    let out_dir = manifest_dir().join("target/schemathesis");
    std::fs::create_dir_all(&out_dir).unwrap();

    // Passes 1 and 2: the client API on a server with federation off.
    let dir = tempfile::tempdir().unwrap();
    let server = BinServer::start(
        &dir.path().join("hearth.db"),
        &[
            ("HEARTH_REGISTRATION__ENABLED", "true"),
            ("HEARTH_LIMITS__MESSAGES_PER_SECOND", "1000"),
            ("HEARTH_MEDIA__FETCH_REMOTE", "false"),
        ],
    )
    .await;
    let mut user = server.client();
    user.register("schema", PASSWORD).await.ok();
    let token = user.token.clone().unwrap();
    // logout and logout/all are not in the document (they would end the run's session).
    let client_only = Some("^/_matrix/(federation|key)/");
    run_pass(
        &bin,
        &out_dir,
        &Pass {
            name: "client-random-ids",
            config: "random-ids.toml",
            url: &server.base_url,
            token: Some(&token),
            include: None,
            exclude: client_only,
            env: vec![],
        },
    );

    let room = user.create_room(json!({"preset": "public_chat", "name": "schemathesis"})).await;
    let event = user.send_text(&room, "hello").await;
    let version = user
        .post(
            "/room_keys/version",
            json!({"algorithm": "m.megolm_backup.v1.curve25519-aes-sha2", "auth_data": {"public_key": "abc"}}),
        )
        .await
        .ok()["version"]
        .as_str()
        .unwrap()
        .to_owned();
    let env = vec![
        ("ST_USER_ID", user.user_id.clone()),
        ("ST_ROOM_ID", room),
        ("ST_EVENT_ID", event),
        ("ST_DEVICE_ID", user.device_id.clone()),
        ("ST_BACKUP_VERSION", version),
    ];
    run_pass(
        &bin,
        &out_dir,
        &Pass {
            name: "client-pinned-ids",
            config: "pinned-ids.toml",
            url: &server.base_url,
            token: Some(&token),
            include: None,
            exclude: client_only,
            env,
        },
    );
    // Still serving and the session still valid after everything thrown at it.
    user.get("/account/whoami").await.ok();
    server.kill();

    // Pass 3: the unauthenticated federation endpoints (served on the client listener).
    let dir = tempfile::tempdir().unwrap();
    let server = BinServer::start(
        &dir.path().join("hearth.db"),
        &[
            ("HEARTH_FEDERATION__ENABLED", "true"),
            ("HEARTH_FEDERATION__SERVE_ON_CLIENT_LISTENER", "true"),
            ("HEARTH_FEDERATION__TRUSTED_KEY_SERVERS", "[]"),
        ],
    )
    .await;
    run_pass(
        &bin,
        &out_dir,
        &Pass {
            name: "federation-unauthenticated",
            config: "random-ids.toml",
            url: &server.base_url,
            token: None,
            include: Some("^/_matrix/(federation|key)/"),
            exclude: None,
            env: vec![],
        },
    );
    let v = server.client().get("/_matrix/federation/v1/version").await.ok();
    assert_eq!(v["server"]["name"], "Hearth");
    server.kill();
}
