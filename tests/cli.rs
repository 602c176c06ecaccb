//! The `hearth` binary: configuration errors, `config example`, `--version` and the user commands.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

/// Runs the binary in `dir` with only the given `HEARTH_*` variables (inherited ones are removed) and stdin closed.
fn hearth(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(hearth_bin());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("HEARTH_") {
            cmd.env_remove(k);
        }
    }
    cmd.current_dir(dir).args(args).stdin(std::process::Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_with_timeout(cmd)
}

/// Waits at most 30 s (a server that wrongly starts would otherwise hang the test).
fn run_with_timeout(mut cmd: Command) -> Output {
    let mut child =
        cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().expect("spawn hearth");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!("hearth did not exit within 30 s; stderr: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts the start failed with a message naming `key` (compared case-insensitively: keys from the
/// environment are reported as written there).
#[track_caller]
fn assert_fails_naming(o: &Output, key: &str) {
    assert!(!o.status.success(), "expected failure, got {:?}; stderr: {}", o.status, stderr(o));
    let err = stderr(o).to_lowercase();
    assert!(err.contains(&key.to_lowercase()), "message does not name `{key}`: {}", stderr(o));
}

#[test]
fn unknown_config_keys_stop_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("h.db");
    let db = db.to_str().unwrap();

    std::fs::write(dir.path().join("top.toml"), "server_name = \"localhost\"\nbogus_key = 1\n").unwrap();
    let o = hearth(dir.path(), &["-c", "top.toml"], &[("HEARTH_DATABASE__PATH", db)]);
    assert_fails_naming(&o, "bogus_key");

    std::fs::write(dir.path().join("nested.toml"), "[limits]\nmax_request_bytez = 100000\n").unwrap();
    let o = hearth(dir.path(), &["-c", "nested.toml"], &[("HEARTH_DATABASE__PATH", db)]);
    assert_fails_naming(&o, "max_request_bytez");

    let o = hearth(dir.path(), &[], &[("HEARTH_DATABASE__PATH", db), ("HEARTH_REGISTRATION__OPEN", "true")]);
    assert_fails_naming(&o, "registration.open");

    // ./hearth.toml is read when no -c is given.
    std::fs::write(dir.path().join("hearth.toml"), "[database]\nwhere = \"x\"\n").unwrap();
    let o = hearth(dir.path(), &[], &[]);
    assert_fails_naming(&o, "where");

    // A -c file that does not exist is an error too.
    let o = hearth(dir.path(), &["-c", "missing.toml"], &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("missing.toml"), "{}", stderr(&o));
    assert!(!dir.path().join("h.db").exists(), "no database is created when the config is invalid");
}

#[test]
fn invalid_config_values_stop_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("h.db");
    let db = db.to_str().unwrap();
    let cases: &[(&str, &str)] = &[
        ("[limits]\nmax_request_bytes = \"lots\"\n", "limits.max_request_bytes"),
        ("[listen]\nclient = \"not an address\"\n", "listen.client"),
        ("[registration]\nenabled = \"yes please\"\n", "registration.enabled"),
        ("[jobs]\nduty_cycle = 5.0\n", "jobs.duty_cycle"),
        ("server_name = \"not a valid server name!\"\n", "server_name"),
        ("[limits]\nmax_request_bytes = 10\n", "limits.max_request_bytes"),
        ("[database]\nreaders = 0\n", "database.readers"),
    ];
    for (i, (toml, key)) in cases.iter().enumerate() {
        let file = format!("c{i}.toml");
        std::fs::write(dir.path().join(&file), toml).unwrap();
        let o = hearth(dir.path(), &["-c", &file], &[("HEARTH_DATABASE__PATH", db)]);
        assert_fails_naming(&o, key);
    }
    // The same through the environment.
    let o = hearth(dir.path(), &[], &[("HEARTH_DATABASE__PATH", db), ("HEARTH_LIMITS__MAX_REQUEST_BYTES", "abc")]);
    assert_fails_naming(&o, "limits.max_request_bytes");
    let o = hearth(dir.path(), &[], &[("HEARTH_DATABASE__PATH", db), ("HEARTH_LISTEN__CLIENT", "nope")]);
    assert_fails_naming(&o, "listen.client");
}

/// Every leaf key of the default configuration, as dotted paths.
fn leaf_keys(prefix: &str, v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                let p = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                leaf_keys(&p, v, out);
            }
        }
        _ => out.push(prefix.to_owned()),
    }
}

#[test]
fn config_example_parses_and_has_every_key() {
    let dir = tempfile::tempdir().unwrap();
    let o = hearth(dir.path(), &["config", "example"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let example = String::from_utf8(o.stdout).unwrap();

    // It is valid TOML and a valid configuration as it stands.
    let parsed: toml::Table = toml::from_str(&example).expect("example is TOML");
    let _: hearth::config::Config = toml::from_str(&example).expect("example is a valid config");

    // Uncommenting the commented-out keys gives a valid configuration too.
    let uncommented: String = example
        .lines()
        .map(|l| {
            let t = l.trim_start_matches("# ");
            let looks_like_key = t.split_once(" = ").is_some_and(|(k, _)| {
                let k = k.trim_matches('"');
                !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-')
            });
            if l.starts_with("# ") && looks_like_key {
                t.to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let full: toml::Table = toml::from_str(&uncommented).expect("uncommented example is TOML");
    let _: hearth::config::Config = toml::from_str(&uncommented).expect("uncommented example is a valid config");

    // Every key of the configuration appears (set, or commented out for optional ones).
    let defaults = serde_json::to_value(hearth::config::Config::default()).unwrap();
    let mut keys = Vec::new();
    leaf_keys("", &defaults, &mut keys);
    assert!(keys.len() > 10, "{keys:?}");
    let json_full = serde_json::to_value(&full).unwrap();
    for key in &keys {
        let mut v = &json_full;
        for part in key.split('.') {
            v = &v[part];
        }
        assert!(!v.is_null(), "`hearth config example` lacks `{key}`");
    }
    assert!(!parsed.contains_key("server_name"), "server_name has no default: the example shows it commented out");
    assert!(full.contains_key("server_name"));
}

#[test]
fn version_flag() {
    let dir = tempfile::tempdir().unwrap();
    let o = hearth(dir.path(), &["--version"], &[]);
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains(env!("CARGO_PKG_VERSION")), "{out}");
}

#[tokio::test]
async fn cli_user_create_then_login() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("hearth.db");
    let dbs = db.to_str().unwrap();
    let env = [("HEARTH_DATABASE__PATH", dbs), ("HEARTH_SERVER_NAME", "localhost")];

    // The commands work on the database a server made (and runs on).
    let server = BinServer::start(&db, &[]).await;
    let o = hearth(dir.path(), &["user", "create", "alice", "--password", "s3cret-pw"], &env);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("@alice:localhost"));
    let o = hearth(dir.path(), &["user", "create", "root", "--password", "adminpw", "--admin"], &env);
    assert!(o.status.success(), "{}", stderr(&o));
    // Creating the same user again fails.
    let o = hearth(dir.path(), &["user", "create", "alice", "--password", "other"], &env);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
    // Invalid names are refused.
    let o = hearth(dir.path(), &["user", "create", "Not Valid", "--password", "x"], &env);
    assert!(!o.status.success());

    {
        let mut c = server.client();
        let r = c.login("alice", "s3cret-pw").await.ok();
        assert_eq!(r["user_id"], "@alice:localhost");
        c.get("/account/whoami").await.ok();
        let mut admin = server.client();
        admin.login("@root:localhost", "adminpw").await.ok();
        server.kill();
    }

    // reset-password (the server stopped, as well): the old password stops working, the new one works.
    let o = hearth(dir.path(), &["user", "reset-password", "alice", "--password", "n3w-pw"], &env);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = hearth(dir.path(), &["user", "reset-password", "nobody", "--password", "x"], &env);
    assert!(!o.status.success());
    let server = BinServer::start(&db, &[]).await;
    let mut c = server.client();
    c.login("alice", "s3cret-pw").await.assert_err(403, "M_FORBIDDEN");
    c.login("alice", "n3w-pw").await.ok();
    server.kill();
}

#[tokio::test]
async fn embedded_defaults_and_layering() {
    // No config file, no environment: database ./hearth.db, and no server name (the one key without a default).
    let dir = tempfile::tempdir().unwrap();
    let o = hearth(dir.path(), &["config", "check", "--server-name", "example.org"], &[]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success() && out.contains("server_name example.org") && out.contains("database hearth.db"),
        "{out}"
    );
    // With no configuration at all, a try-out as `localhost` (what a bare `cargo run --release` serves), said so.
    let o = hearth(dir.path(), &["config", "check"], &[]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success() && out.contains("server_name localhost"), "{out}");
    assert!(stderr(&o).contains("--server-name"), "{}", stderr(&o));
    // A configuration file without a server name (the packaged one) is refused, naming the key and the file.
    std::fs::write(dir.path().join("hearth.toml"), "[metrics]\nenabled = true\n").unwrap();
    let o = hearth(dir.path(), &[], &[]);
    assert!(
        !o.status.success() && stderr(&o).contains("server_name") && stderr(&o).contains("hearth.toml"),
        "{}",
        stderr(&o)
    );
    assert!(!dir.path().join("hearth.db").exists(), "a refused start creates no database");
    let defaults = hearth::config::Config::default();
    assert_eq!(defaults.listen.client.to_string(), "127.0.0.1:8008");
    assert_eq!(defaults.server_name, "");
    assert!(!defaults.registration.enabled, "registration is off by default");

    // ./hearth.toml overrides the defaults, HEARTH_* overrides the file (with __ for nesting), --server-name both.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hearth.toml"), "server_name = \"fromfile.test\"\n[database]\npath = \"file.db\"\n")
        .unwrap();
    let check = |env: &[(&str, &str)], args: &[&str]| {
        let mut a = vec!["config", "check"];
        a.extend_from_slice(args);
        let o = hearth(dir.path(), &a, env);
        assert!(o.status.success(), "{}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let out = check(&[], &[]);
    assert!(out.contains("server_name fromfile.test") && out.contains("database file.db"), "{out}");
    let out = check(&[("HEARTH_SERVER_NAME", "fromenv.test"), ("HEARTH_DATABASE__PATH", "env.db")], &[]);
    assert!(out.contains("server_name fromenv.test") && out.contains("database env.db"), "{out}");
    let out = check(&[("HEARTH_SERVER_NAME", "fromenv.test")], &["--server-name", "fromflag.test"]);
    assert!(out.contains("server_name fromflag.test"), "{out}");

    // The server name is fixed once the database exists: the commands refuse another configured one.
    let db = dir.path().join("env.db");
    BinServer::start(&db, &[]).await.kill();
    let o = hearth(dir.path(), &["user", "list"], &[("HEARTH_DATABASE__PATH", "env.db")]);
    assert!(!o.status.success(), "a database keeps its server name");
    assert!(stderr(&o).contains("localhost") && stderr(&o).contains("fromfile.test"), "{}", stderr(&o));
    // Without a configured name the database's own is used.
    std::fs::write(dir.path().join("hearth.toml"), "[database]\npath = \"env.db\"\n").unwrap();
    let o = hearth(dir.path(), &["user", "create", "dave", "--password", "pw"], &[]);
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("@dave:localhost"), "{}", stderr(&o));
}
