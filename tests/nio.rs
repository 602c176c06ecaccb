//! End-to-end test with matrix-nio (tests/e2e/nio_test.py) against the real binary.
//!
//! Needs `python3` with the packages of tests/e2e/requirements.txt (`.ci/run` installs them). Set
//! `HEARTHTEST_SKIP_E2E=1` to skip it; without that a missing Python or nio fails the test.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Python 3 with matrix-nio (tests/e2e/requirements.txt); see tests/README.md"]
async fn matrix_nio_end_to_end() {
    if std::env::var("HEARTHTEST_SKIP_E2E").as_deref() == Ok("1") {
        println!(
            "SKIPPED matrix_nio_end_to_end: HEARTHTEST_SKIP_E2E=1 is set (the matrix-nio end-to-end test did not run)"
        );
        return;
    }
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python).args(["-c", "import nio"]).output().unwrap_or_else(|e| {
        panic!("`{python}` is not runnable ({e}); install Python 3 and `pip install -r tests/e2e/requirements.txt`, or set HEARTHTEST_SKIP_E2E=1")
    });
    assert!(
        probe.status.success(),
        "matrix-nio is not importable by `{python}`: {}\nrun `pip install -r tests/e2e/requirements.txt`, or set HEARTHTEST_SKIP_E2E=1",
        String::from_utf8_lossy(&probe.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("hearth.db");
    let server = BinServer::start(&db, &[("HEARTH_REGISTRATION__ENABLED", "true")]).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/nio_test.py");
    let mut child = Command::new(&python)
        .arg(script)
        .arg(&server.base_url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python");
    let deadline = Instant::now() + Duration::from_secs(180);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = child.wait_with_output().expect("python output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    let server_log = std::fs::read_to_string(&server.log_path).unwrap_or_default();
    assert!(
        out.status.success(),
        "nio end-to-end test failed ({:?})\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n--- server log\n{server_log}",
        out.status
    );
    server.kill();
}
