//! Disk full: the database lives on a small tmpfs that a filler file then fills up. Writes must fail with a Matrix
//! error (503 `M_UNKNOWN`, retryable), reads keep working, the server does not die, and once space returns writes
//! succeed again without a restart; after a SIGKILL every acknowledged event is there and the database passes
//! `PRAGMA integrity_check`.
//!
//! Needs root (to mount the tmpfs). Where mounting is not permitted the test says so and passes without running.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

/// A mounted tmpfs, unmounted on drop (also when the test panics).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(path).map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Ok(Tmpfs(path.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes zeros to `path` until the file system refuses (ENOSPC); returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).expect("filler file");
    let chunk = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(_) => break,
        }
    }
    // The last partial block too.
    while f.write(&[0u8; 512]).is_ok_and(|n| n > 0) {
        written += 512;
    }
    let _ = f.sync_all();
    written
}

fn integrity_check(db: &Path) {
    let conn = rusqlite::Connection::open(db).expect("open database");
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    let result: Vec<String> = conn
        .prepare("PRAGMA integrity_check")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(result, ["ok"], "integrity_check");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_fail_with_503_when_the_disk_is_full_and_recover_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small-disk");
    let _tmpfs = match Tmpfs::mount(&mnt, "24m") {
        Ok(t) => t,
        Err(e) => {
            println!("SKIPPED disk-full test: cannot mount a tmpfs here ({e}); run it as root on Linux");
            return;
        }
    };
    let db = mnt.join("hearth.db");
    let env = [
        ("HEARTH_REGISTRATION__ENABLED", "true"),
        ("HEARTH_LIMITS__MESSAGES_PER_SECOND", "100000"),
        ("HEARTH_LIMITS__MESSAGES_BURST", "100000"),
    ];
    let mut server = BinServer::start(&db, &env).await;
    let mut alice = server.client();
    alice.register("alice", PASSWORD).await.ok();
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    let mut acked = vec![alice.send_text(&room, "before the disk filled up").await];
    let since = alice.sync(None, &[]).await.ok()["next_batch"].as_str().unwrap().to_owned();

    let filler = mnt.join("filler");
    let filled = fill(&filler);
    println!("filled the disk with {} MiB", filled >> 20);

    // Big messages until the database cannot grow: that answer is 503 M_UNKNOWN, never a 500 or a dead server.
    let big = "x".repeat(60_000);
    let mut refused = None;
    for i in 0..2000 {
        let r = alice.send(&room, "m.room.message", json!({"msgtype": "m.text", "body": format!("{i} {big}")})).await;
        match r.status {
            200 => acked.push(r.body["event_id"].as_str().unwrap().to_owned()),
            503 => {
                refused = Some(r);
                break;
            }
            s => panic!("a write on a full disk got {s}: {}", r.text),
        }
    }
    let refused = refused.expect("the disk never filled up");
    refused.assert_err(503, "M_UNKNOWN");
    println!("{} messages acknowledged, then 503: {}", acked.len() - 1, refused.text);
    assert!(server.child.try_wait().unwrap().is_none(), "the server died on a full disk");
    // Still refused while full, and other writes too.
    alice.send(&room, "m.room.message", json!({"msgtype": "m.text", "body": big})).await.assert_err(503, "M_UNKNOWN");
    // A media upload too.
    let upload = alice
        .http
        .post(alice.url("/_matrix/media/v3/upload?filename=a.bin"))
        .bearer_auth(alice.token.as_deref().unwrap())
        .header("content-type", "application/octet-stream")
        .body(vec![7u8; 256 * 1024])
        .send()
        .await
        .unwrap();
    let status = upload.status().as_u16();
    let body: Value = upload.json().await.unwrap_or(Value::Null);
    assert_eq!((status, body["errcode"].as_str()), (503, Some("M_UNKNOWN")), "media upload on a full disk: {body}");
    // Reads keep working.
    alice.sync(Some(&since), &[]).await.ok();
    alice.messages(&room, &[("dir", "b"), ("limit", "5")]).await.ok();
    alice.event(&room, &acked[0]).await.ok();

    // Space returns: writes succeed again, without a restart.
    std::fs::remove_file(&filler).unwrap();
    acked.push(alice.send_text(&room, "after space returned").await);
    alice.put_state(&room, "m.room.topic", "", json!({"topic": "recovered"})).await.ok();

    // Nothing corrupted, nothing acknowledged lost, also across a SIGKILL.
    server.kill();
    integrity_check(&db);
    server = BinServer::start(&db, &env).await;
    let alice = alice.at(&server.base_url);
    for id in &acked {
        alice.event(&room, id).await.ok();
    }
    alice.send_text(&room, "after the restart").await;
    server.kill();
    integrity_check(&db);
}
