//! The admin CLI against a running server (`hearth user|room|media|token ...`), registration tokens end to end, and
//! the foot-guns refused at start (a second server on one database, a read-only database, no server name, a bad
//! log level, a failed start leaving files behind, management commands creating databases).

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::fake_resident::*;
use common::*;

/// Runs the binary in `dir` against `db` (server name `localhost`), with only the given `HEARTH_*` variables and
/// `stdin` as its input; at most 60 s.
fn hearth(dir: &Path, args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(hearth_bin());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("HEARTH_") {
            cmd.env_remove(k);
        }
    }
    cmd.current_dir(dir).args(args).envs(env.iter().copied());
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn hearth");
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("hearth {args:?} did not exit within 60 s: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn text(o: &Output) -> String {
    format!("status {:?}\nstdout: {}\nstderr: {}", o.status, out(o), String::from_utf8_lossy(&o.stderr))
}

#[track_caller]
fn ok(o: Output) -> String {
    assert!(o.status.success(), "{}", text(&o));
    out(&o)
}

#[track_caller]
fn fails_saying(o: Output, what: &[&str]) {
    assert!(!o.status.success(), "expected a failure: {}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr).to_lowercase();
    for w in what {
        assert!(err.contains(&w.to_lowercase()), "the message does not say `{w}`: {}", text(&o));
    }
}

/// Registers through the UIA token stage; returns the final response.
async fn register_with_token(c: &Client, name: &str, token: &str) -> Resp {
    let first = c.post("/register", json!({"username": name, "password": "pw-token"})).await;
    assert_eq!(first.status, 401, "{:?}", first.body);
    assert_eq!(first.body["flows"][0]["stages"][0], "m.login.registration_token", "{:?}", first.body);
    let session = first.body["session"].clone();
    let auth = json!({"type": "m.login.registration_token", "token": token, "session": session});
    c.post("/register", json!({"username": name, "password": "pw-token", "auth": auth})).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_against_a_running_server() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let db = d.join("hearth.db");
    let dbs = db.to_str().unwrap();
    let env = [("HEARTH_DATABASE__PATH", dbs)];
    let server = BinServer::start(
        &db,
        &[("HEARTH_REGISTRATION__ENABLED", "true"), ("HEARTH_REGISTRATION__REQUIRES_TOKEN", "true")],
    )
    .await;

    // Users: from --password, --password-file and stdin; other servers' names and duplicates refused.
    assert!(
        ok(hearth(d, &["user", "create", "alice", "--password", "pw-alice"], &env, None)).contains("@alice:localhost")
    );
    std::fs::write(d.join("pw"), "pw-bob\n").unwrap();
    ok(hearth(d, &["user", "create", "@bob:localhost", "--password-file", "pw"], &env, None));
    ok(hearth(d, &["user", "create", "carol"], &env, Some("pw-carol\n")));
    fails_saying(
        hearth(d, &["user", "create", "@x:other.example", "--password", "pw"], &env, None),
        &["other.example"],
    );
    fails_saying(hearth(d, &["user", "create", "alice", "--password", "pw"], &env, None), &["already exists"]);
    fails_saying(hearth(d, &["user", "create", "dave"], &env, None), &["password"]);
    let list = ok(hearth(d, &["user", "list"], &env, None));
    for u in ["@alice:localhost", "@bob:localhost", "@carol:localhost"] {
        assert!(list.contains(u), "{list}");
    }

    let mut alice = server.client();
    alice.login("alice", "pw-alice").await.ok();
    let mut bob = server.client();
    bob.login("bob", "pw-bob").await.ok();
    let mut carol = server.client();
    carol.login("carol", "pw-carol").await.ok();

    // set-admin takes effect on the next request.
    let jobs = |c: &Client| {
        let req = reqwest::Client::new()
            .get(format!("{}/_hearth/admin/v1/jobs", c.base_url))
            .bearer_auth(c.token.clone().unwrap());
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(jobs(&alice).await, 403);
    assert!(ok(hearth(d, &["user", "set-admin", "alice", "true"], &env, None)).contains("an admin"));
    assert_eq!(jobs(&alice).await, 200);
    ok(hearth(d, &["user", "set-admin", "alice", "false"], &env, None));
    assert_eq!(jobs(&alice).await, 403);

    // Rooms: listed with members, local members and name.
    let room = alice.create_room(json!({"name": "Kitchen", "preset": "public_chat"})).await;
    bob.join(&room).await.ok();
    carol.join(&room).await.ok();
    let rooms = ok(hearth(d, &["room", "list"], &env, None));
    let line = rooms.lines().find(|l| l.contains(&room)).unwrap_or_else(|| panic!("{rooms}"));
    assert!(line.contains("Kitchen"), "{line}");
    assert_eq!(line.split_whitespace().nth(1), Some("3"), "members: {line}");
    assert_eq!(line.split_whitespace().nth(2), Some("3"), "local members: {line}");

    // Deactivation: bob's session ends and bob leaves the room, as with POST /account/deactivate.
    let o = ok(hearth(d, &["user", "deactivate", "bob"], &env, None));
    assert!(o.contains("left every room"), "{o}");
    bob.get("/account/whoami").await.assert_err(401, "M_UNKNOWN_TOKEN");
    server.client().login("bob", "pw-bob").await.assert_err(403, "M_FORBIDDEN");
    let members = alice.get(&format!("/rooms/{}/joined_members", enc(&room))).await.ok();
    assert!(members["joined"].get("@bob:localhost").is_none(), "{members}");
    assert!(ok(hearth(d, &["user", "list"], &env, None)).lines().any(|l| l.contains("@bob") && l.contains("yes")));

    // reset-password logs the user out everywhere.
    ok(hearth(d, &["user", "reset-password", "carol", "--password", "pw-carol-2"], &env, None));
    carol.get("/account/whoami").await.assert_err(401, "M_UNKNOWN_TOKEN");
    carol.login("carol", "pw-carol-2").await.ok();

    // Purge: refused while local users are in the room, done once the last one left.
    fails_saying(hearth(d, &["room", "purge", &room], &env, None), &["@alice:localhost", "leave"]);
    alice.leave(&room).await.ok();
    carol.leave(&room).await.ok();
    let o = ok(hearth(d, &["room", "purge", &room], &env, None));
    assert!(o.contains("purged") && o.contains(&room), "{o}");
    let rooms = ok(hearth(d, &["room", "list"], &env, None));
    assert!(rooms.lines().any(|l| l.contains(&room) && l.contains("no state")), "{rooms}");
    alice.get(&format!("/rooms/{}/messages?dir=b", enc(&room))).await.assert_err(403, "M_FORBIDDEN");

    // Block: local users can no longer join; unblocking lets them again.
    let other = alice.create_room(json!({"preset": "public_chat"})).await;
    assert!(ok(hearth(d, &["room", "block", &other], &env, None)).contains("blocked"));
    carol.join(&other).await.assert_err(403, "M_FORBIDDEN");
    assert!(ok(hearth(d, &["room", "list"], &env, None)).lines().any(|l| l.contains(&other) && l.contains("yes")));
    ok(hearth(d, &["room", "unblock", &other], &env, None));
    carol.join(&other).await.ok();

    // Registration tokens: the validity endpoint, one use, then refused; list and revoke.
    let o = ok(hearth(d, &["token", "create", "--uses", "1", "--expires", "7d"], &env, None));
    let token = o.lines().last().unwrap().trim().to_owned();
    assert_eq!(token.len(), 16, "{o}");
    let validity = |t: &str| format!("/_matrix/client/v1/register/m.login.registration_token/validity?token={t}");
    let anon = server.client();
    assert_eq!(anon.get(&validity(&token)).await.ok()["valid"], true);
    assert_eq!(anon.get(&validity("nonsense")).await.ok()["valid"], false);
    let r = register_with_token(&anon, "erin", "wrong-token").await;
    assert_eq!((r.status, r.body["errcode"].as_str()), (401, Some("M_FORBIDDEN")), "{:?}", r.body);
    let r = register_with_token(&anon, "erin", &token).await;
    assert_eq!(r.ok()["user_id"], "@erin:localhost");
    assert_eq!(anon.get(&validity(&token)).await.ok()["valid"], false, "used up");
    let r = register_with_token(&anon, "frank", &token).await;
    assert_eq!(r.status, 401, "{:?}", r.body);
    let list = ok(hearth(d, &["token", "list"], &env, None));
    let line = list.lines().find(|l| l.contains(&token)).unwrap_or_else(|| panic!("{list}"));
    assert!(line.contains(" 1 ") && line.trim_end().ends_with("no"), "{line}");
    ok(hearth(d, &["token", "revoke", &token], &env, None));
    fails_saying(hearth(d, &["token", "revoke", &token], &env, None), &["no registration token"]);
    let o = ok(hearth(d, &["token", "create", "--token", "party-2026"], &env, None));
    assert_eq!(o.lines().last(), Some("party-2026"));
    assert_eq!(register_with_token(&anon, "gina", "party-2026").await.ok()["user_id"], "@gina:localhost");

    // Media: nothing cached from other servers here; the command runs and reports.
    assert!(ok(hearth(d, &["media", "purge", "--older-than", "30d"], &env, None)).contains("purged 0"));
    fails_saying(hearth(d, &["media", "purge", "--older-than", "soon"], &env, None), &["--older-than"]);

    // Every command has --help.
    for cmd in [
        vec!["user", "create"],
        vec!["user", "list"],
        vec!["user", "deactivate"],
        vec!["user", "set-admin"],
        vec!["user", "reset-password"],
        vec!["room", "list"],
        vec!["room", "purge"],
        vec!["room", "block"],
        vec!["media", "purge"],
        vec!["token", "create"],
        vec!["token", "list"],
        vec!["token", "revoke"],
    ] {
        let mut args = cmd.clone();
        args.push("--help");
        assert!(ok(hearth(d, &args, &[], None)).contains("Usage"), "{cmd:?}");
    }
    server.kill();

    // Without a server the deactivation is queued for the next start.
    let o = ok(hearth(d, &["user", "deactivate", "carol"], &env, None));
    assert!(o.contains("next starts"), "{o}");
    let server = BinServer::start(&db, &[]).await;
    let carol_id = "@carol:localhost";
    wait_until("the queued deactivation leaves the room", Duration::from_secs(30), || {
        let c = alice.at(&server.base_url);
        let other = other.clone();
        async move {
            let m = c.get(&format!("/rooms/{}/joined_members", enc(&other))).await.ok();
            m["joined"].get(carol_id).is_none().then_some(())
        }
    })
    .await;
    server.kill();
}

#[tokio::test]
async fn foot_guns_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let db = d.join("hearth.db");
    let dbs = db.to_str().unwrap();

    // Management commands never create a database; they say where they looked.
    let env = [("HEARTH_DATABASE__PATH", dbs)];
    for args in
        [vec!["user", "list"], vec!["room", "list"], vec!["token", "list"], vec!["keys", "rotate"], vec!["jobs"]]
    {
        fails_saying(hearth(d, &args, &env, None), &[dbs, "database.path"]);
    }
    assert!(!db.exists(), "no database was created");

    // No server name: refused, naming the key and the file.
    std::fs::write(d.join("hearth.toml"), format!("[database]\npath = \"{dbs}\"\n")).unwrap();
    fails_saying(hearth(d, &[], &[], None), &["server_name", "hearth.toml"]);
    // An invalid log level.
    fails_saying(hearth(d, &["--server-name", "localhost"], &[("HEARTH_LOG__LEVEL", "loud")], None), &["log.level"]);
    // The address in use: the message names it and the key, and the failed start leaves nothing behind.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    fails_saying(
        hearth(d, &["--server-name", "localhost"], &[("HEARTH_LISTEN__CLIENT", &addr)], None),
        &[&addr, "listen.client"],
    );
    drop(taken);
    let left: Vec<_> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, [std::ffi::OsString::from("hearth.toml")], "a failed start leaves nothing behind");
    std::fs::remove_file(d.join("hearth.toml")).unwrap();

    // One server per database: the second names the first's pid.
    let server = BinServer::start(&db, &[]).await;
    let pid = server.child.id().to_string();
    let free = format!("127.0.0.1:{}", free_port());
    fails_saying(
        hearth(
            d,
            &[],
            &[("HEARTH_DATABASE__PATH", dbs), ("HEARTH_SERVER_NAME", "localhost"), ("HEARTH_LISTEN__CLIENT", &free)],
            None,
        ),
        &["in use", &pid],
    );
    // No colour codes in a log that is not a terminal.
    let log = std::fs::read_to_string(&server.log_path).unwrap();
    assert!(!log.contains('\u{1b}'), "{log:?}");
    server.kill();

    // A read-only database is refused at start (even for root: the file's mode says so).
    let mut perms = std::fs::metadata(&db).unwrap().permissions();
    perms.set_readonly(true);
    std::fs::set_permissions(&db, perms).unwrap();
    fails_saying(
        hearth(
            d,
            &[],
            &[("HEARTH_DATABASE__PATH", dbs), ("HEARTH_SERVER_NAME", "localhost"), ("HEARTH_LISTEN__CLIENT", &free)],
            None,
        ),
        &[dbs, "read-only"],
    );
}

/// A blocked room refuses other servers too: `make_join` through us, and invites into it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_room_refuses_other_servers() {
    let fake = FakeResident::start(RoomSpec { members: 0, messages: 0, ..RoomSpec::default() }).await;
    let server = start_hearth_with_fakes(&[&fake], |_| {}).await;
    let alice = server.user("alice").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    let version = alice.state(&room, "m.room.create", "").await.ok()["room_version"].as_str().unwrap().to_owned();
    let make_join = format!("/_matrix/federation/v1/make_join/{}/{}?ver={version}", enc(&room), enc(&fake.user("joe")));
    let get = reqwest::Method::GET;
    fake.request_hearth(get.clone(), &make_join, None).await.expect("make_join before the block");

    let cwd = tempfile::tempdir().unwrap();
    let env = [("HEARTH_DATABASE__PATH", server.db_path.to_str().unwrap())];
    ok(hearth(cwd.path(), &["room", "block", &room], &env, None));
    let (status, body) = fake.request_hearth(get.clone(), &make_join, None).await.expect_err("blocked");
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{body}");
    assert!(body["error"].as_str().unwrap_or("").contains("blocked"), "{body}");

    // A room known only by id (the fake's) can be blocked too: an invite into it is refused.
    ok(hearth(cwd.path(), &["room", "block", &fake.room_id()], &env, None));
    let invite = json!({"event": {"type": "m.room.member", "room_id": fake.room_id(), "sender": fake.creator(),
                                  "state_key": alice.user_id, "content": {"membership": "invite"}},
                        "room_version": fake.room_version(), "invite_room_state": []});
    let path = format!("/_matrix/federation/v2/invite/{}/{}", enc(&fake.room_id()), enc("$invite"));
    let (status, body) = fake.request_hearth(reqwest::Method::PUT, &path, Some(&invite)).await.expect_err("blocked");
    assert_eq!(status, 403, "{body}");
    assert!(body["error"].as_str().unwrap_or("").contains("blocked"), "{body}");

    ok(hearth(cwd.path(), &["room", "unblock", &room], &env, None));
    fake.request_hearth(get, &make_join, None).await.expect("make_join after the block is lifted");
    server.stop().await;
}
