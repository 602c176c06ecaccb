//! `hearth backup` taken while clients write, `hearth restore`, and a server started on the restored copy: every
//! event acknowledged before the backup began is there, and each room holds a gap-free prefix of what was sent
//! (a consistent snapshot, not a torn copy).

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// Runs the CLI with only the given `HEARTH_*` variables.
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

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A writer: its client, its room, what it had acknowledged, its task.
type Writer = (Client, String, Arc<Mutex<Vec<Acked>>>, tokio::task::JoinHandle<()>);

#[derive(Clone, Debug)]
struct Acked {
    event_id: String,
    body: String,
}

/// Sends numbered messages into `room` one after another until `stop`, recording each acknowledged one.
async fn writer(c: Client, room: String, acked: Arc<Mutex<Vec<Acked>>>, stop: Arc<AtomicBool>) {
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let body = format!("{} message {n}", c.user_id);
        let r = c.send(&room, "m.room.message", json!({"msgtype": "m.text", "body": body})).await;
        assert_eq!(r.status, 200, "send failed: {}", r.text);
        let event_id = r.body["event_id"].as_str().unwrap().to_owned();
        acked.lock().unwrap().push(Acked { event_id, body });
        n += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backup_while_clients_write_then_restore() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("live")).unwrap();
    std::fs::create_dir(dir.path().join("restored")).unwrap();
    let db = dir.path().join("live/hearth.db");
    let server = BinServer::start(
        &db,
        &[("HEARTH_REGISTRATION__ENABLED", "true"), ("HEARTH_LIMITS__MESSAGES_PER_SECOND", "1000")],
    )
    .await;

    // Four writers, each into its own room (versions 10 and 12), so each room's order is the order of acks.
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers: Vec<Writer> = Vec::new();
    let mut rooms = Vec::new();
    for i in 0..4 {
        let mut c = server.client();
        c.register(&format!("writer{i}"), PASSWORD).await.ok();
        let version = if i % 2 == 0 { "10" } else { "12" };
        let room = c.create_room(json!({"room_version": version})).await;
        let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
        writers.push((
            c.clone(),
            room.clone(),
            acked.clone(),
            tokio::spawn(writer(c, room.clone(), acked, stop.clone())),
        ));
        rooms.push(room);
    }
    let total = |ws: &[Writer]| -> usize { ws.iter().map(|w| w.2.lock().unwrap().len()).sum() };
    let t0 = Instant::now();
    while total(&writers) < 60 && t0.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // What was acknowledged before the backup starts must all be in it.
    let before: Vec<Vec<Acked>> = writers.iter().map(|w| w.2.lock().unwrap().clone()).collect();
    let backup = dir.path().join("hearth-backup.db");
    let dbs = db.to_str().unwrap().to_owned();
    let bk = backup.to_str().unwrap().to_owned();
    let live_dir = dir.path().join("live");
    let out = tokio::task::spawn_blocking(move || {
        hearth(&live_dir, &["backup", &bk], &[("HEARTH_DATABASE__PATH", &dbs), ("HEARTH_SERVER_NAME", "localhost")])
    })
    .await
    .unwrap();
    assert!(out.status.success(), "backup failed: {}", text(&out));
    let during = total(&writers) - before.iter().map(Vec::len).sum::<usize>();
    // Let the writers go on a little after the backup, then stop them.
    let after_backup = total(&writers);
    while total(&writers) < after_backup + 20 && t0.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut sent: Vec<Vec<Acked>> = Vec::new();
    let mut clients = Vec::new();
    for (c, _, acked, handle) in writers {
        handle.await.unwrap();
        sent.push(acked.lock().unwrap().clone());
        clients.push(c);
    }
    eprintln!(
        "acknowledged: {} before the backup, {during} while it ran, {} in all",
        before.iter().map(Vec::len).sum::<usize>(),
        sent.iter().map(Vec::len).sum::<usize>()
    );

    // The backup: one self-contained file, private, nothing beside it.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&backup).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "backup mode is {mode:o}");
    }
    assert!(!dir.path().join("hearth-backup.db-wal").exists());
    assert!(!dir.path().join("hearth-backup.db.partial").exists());
    // A second backup to the same file is refused without --force.
    let o =
        hearth(dir.path(), &["backup", backup.to_str().unwrap()], &[("HEARTH_DATABASE__PATH", db.to_str().unwrap())]);
    assert!(!o.status.success() && text(&o).contains("--force"), "{}", text(&o));

    // Restore refuses while a server answers on listen.client, and refuses a wrong server name.
    let restored = dir.path().join("restored/hearth.db");
    let rs = restored.to_str().unwrap();
    let live_addr = server.addr.to_string();
    let o = hearth(
        dir.path(),
        &["restore", backup.to_str().unwrap()],
        &[("HEARTH_DATABASE__PATH", rs), ("HEARTH_SERVER_NAME", "localhost"), ("HEARTH_LISTEN__CLIENT", &live_addr)],
    );
    assert!(!o.status.success() && text(&o).contains("stop the server"), "{}", text(&o));
    let free = format!("127.0.0.1:{}", free_port());
    let o = hearth(
        dir.path(),
        &["restore", backup.to_str().unwrap()],
        &[("HEARTH_DATABASE__PATH", rs), ("HEARTH_SERVER_NAME", "other.example"), ("HEARTH_LISTEN__CLIENT", &free)],
    );
    assert!(!o.status.success() && text(&o).contains("server_name"), "{}", text(&o));
    assert!(!restored.exists());
    server.kill();

    let env =
        [("HEARTH_DATABASE__PATH", rs), ("HEARTH_SERVER_NAME", "localhost"), ("HEARTH_LISTEN__CLIENT", free.as_str())];
    let o = hearth(dir.path(), &["restore", backup.to_str().unwrap()], &env);
    assert!(o.status.success(), "restore failed: {}", text(&o));
    // Restoring over an existing database needs --force, which moves the old one aside.
    let o = hearth(dir.path(), &["restore", backup.to_str().unwrap()], &env);
    assert!(!o.status.success() && text(&o).contains("--force"), "{}", text(&o));
    let o = hearth(dir.path(), &["restore", "--force", backup.to_str().unwrap()], &env);
    assert!(o.status.success(), "{}", text(&o));
    let aside = std::fs::read_dir(dir.path().join("restored"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("before-restore"))
        .count();
    assert!(aside >= 1, "the replaced database was moved aside");
    {
        let conn = rusqlite::Connection::open(&restored).unwrap();
        let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
        assert_eq!(check, "ok");
        let fk: Option<String> = conn.query_row("PRAGMA foreign_key_check", [], |r| r.get(0)).ok();
        assert!(fk.is_none(), "foreign key violations in the restore: {fk:?}");
    }

    // A server on the restored copy has every event acknowledged before the backup, and each room a gap-free prefix.
    let server = BinServer::start(&restored, &[]).await;
    for (i, c) in clients.iter().enumerate() {
        let c = c.at(&server.base_url);
        for a in &before[i] {
            let r = c.event(&rooms[i], &a.event_id).await;
            assert_eq!(r.status, 200, "event {} acknowledged before the backup is missing: {}", a.event_id, r.text);
            assert_eq!(r.body["content"]["body"], a.body.as_str());
        }
        let r = c
            .messages(&rooms[i], &[("dir", "b"), ("limit", "1000"), ("filter", r#"{"types":["m.room.message"]}"#)])
            .await
            .ok();
        let mut ids: Vec<String> =
            r["chunk"].as_array().unwrap().iter().map(|e| e["event_id"].as_str().unwrap().to_owned()).collect();
        ids.reverse();
        let expected: Vec<String> = sent[i].iter().take(ids.len()).map(|a| a.event_id.clone()).collect();
        assert_eq!(ids, expected, "room {i}: the restored timeline is not a prefix of what was sent");
        assert!(ids.len() >= before[i].len());
        // The restored room takes new messages.
        c.send_text(&rooms[i], "after restore").await;
    }
    server.kill();
}
