//! Keeps the join benchmark working (issue #5): `hearth-bench join --quick` (N = 1000; Hearth lazy and full, and
//! Synapse partial when its virtualenv is there) must complete and report every joiner. Debug build: the figures
//! are not the point here, the release run in the README is.

use std::process::Command;

#[test]
#[ignore = "needs the openssl CLI (hearth-bench makes its TLS certificates with it); see tests/README.md"]
fn hearth_bench_quick_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut joiners = "hearth-lazy,hearth-full".to_owned();
    let root = env!("CARGO_MANIFEST_DIR");
    let synapse = std::path::Path::new(root).join("target/synapse-venv/bin/python");
    if synapse.exists() || std::env::var_os("SYNAPSE_PYTHON").is_some() {
        joiners.push_str(",synapse");
    } else {
        eprintln!("no Synapse virtualenv: measuring the Hearth joiners only");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_hearth-bench"))
        .args(["join", "--members", "1000", "--messages", "50", "--joiners", &joiners, "--dir"])
        .arg(dir.path())
        .current_dir(root)
        .env_remove("RUST_LOG")
        .output()
        .expect("hearth-bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr).lines().filter(|l| !l.contains("WARN")).collect::<Vec<_>>().join("\n")
    );
    assert!(out.status.success(), "hearth-bench failed");
    for j in joiners.split(',') {
        let line =
            stdout.lines().find(|l| l.contains(&format!(" {j} "))).unwrap_or_else(|| panic!("no result line for {j}"));
        assert!(!line.contains("failed"), "{line}");
    }
    let json = std::fs::read_to_string(dir.path().join("results-latest.json")).expect("results json");
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(v["results"].as_array().map(Vec::len), Some(joiners.split(',').count()));
    for r in v["results"].as_array().unwrap() {
        assert!(r["join_ms"].as_f64().unwrap_or(0.0) > 0.0, "{r}");
        assert!(r["full_members_ms"].as_f64().unwrap_or(0.0) >= r["join_ms"].as_f64().unwrap_or(0.0), "{r}");
        // Every run reports the joiner's CPU seconds and peak RSS, and the resident's CPU while serving it.
        assert!(r["cpu_s"].as_f64().unwrap_or(0.0) > 0.0, "{r}");
        assert!(r["peak_rss_mb"].as_f64().unwrap_or(0.0) > 0.0, "{r}");
        assert!(r["resident_cpu_s"].as_f64().is_some_and(|c| c >= 0.0), "{r}");
    }
}
