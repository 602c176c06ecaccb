//! What Element X does at start, with the real client library (matrix-sdk + matrix-sdk-ui) against the `hearth`
//! binary: discover simplified sliding sync from `/versions`, log in, run the `SyncService`, see the rooms in the
//! `RoomListService` sorted by recency and filtered, page a `Timeline` back to the room's start, and exchange an
//! end-to-end encrypted message between two devices.
//!
//! `element_x_lazily_joins_a_big_synapse_room` (ignored unless asked for, as the other Synapse tests: it needs
//! Synapse in `target/synapse-venv` or `$SYNAPSE_PYTHON`) joins a room of a few hundred members on the real Synapse
//! lazily: the room is listed at once, its timeline shows messages, sending works, and the member count is exact
//! after the resync.
//!
//! The binary is `HEARTH_BIN`, else `target/debug/hearth` of the repository (build it first).

#![recursion_limit = "256"]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use matrix_sdk::authentication::matrix::MatrixSession;
use matrix_sdk::ruma::api::client::account::register;
use matrix_sdk::ruma::api::client::room::create_room;
use matrix_sdk::ruma::api::client::uiaa;
use matrix_sdk::ruma::events::room::encryption::RoomEncryptionEventContent;
use matrix_sdk::ruma::events::room::message::RoomMessageEventContent;
use matrix_sdk::ruma::events::InitialStateEvent;
use matrix_sdk::ruma::{OwnedRoomId, OwnedUserId};
use matrix_sdk::sliding_sync::VersionBuilder;
use matrix_sdk::Client;
use matrix_sdk_ui::room_list_service::filters::{new_filter_fuzzy_match_room_name, new_filter_non_left};
use matrix_sdk_ui::sync_service::SyncService;
use matrix_sdk_ui::timeline::{RoomExt, Timeline};

const PASSWORD: &str = "correct horse battery staple";

struct Server {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn hearth_bin() -> PathBuf {
    match std::env::var_os("HEARTH_BIN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/hearth"),
    }
}

fn start_server() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    // The server's log: HEARTH_SDK_TEST_LOG names a file to keep it in.
    let log_path = std::env::var_os("HEARTH_SDK_TEST_LOG").map_or_else(|| dir.path().join("hearth.log"), PathBuf::from);
    let log = std::fs::File::create(log_path).unwrap();
    let mut cmd = Command::new(hearth_bin());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("HEARTH_") {
            cmd.env_remove(k);
        }
    }
    cmd.current_dir(dir.path())
        .env("HEARTH_SERVER_NAME", "localhost")
        .env("HEARTH_LISTEN__CLIENT", format!("127.0.0.1:{port}"))
        .env("HEARTH_DATABASE__PATH", dir.path().join("hearth.db"))
        .env("HEARTH_FEDERATION__ENABLED", "false")
        .env("HEARTH_REGISTRATION__ENABLED", "true")
        .env("HEARTH_LOG__LEVEL", std::env::var("HEARTH_SDK_TEST_LOG_LEVEL").unwrap_or_else(|_| "warn".into()))
        .env("HEARTH_LIMITS__REGISTRATIONS_PER_SECOND", "1000")
        .env("HEARTH_LIMITS__REGISTRATIONS_BURST", "1000")
        .env("HEARTH_LIMITS__LOGINS_PER_SECOND", "1000")
        .env("HEARTH_LIMITS__LOGINS_BURST", "1000")
        .env("HEARTH_LIMITS__MESSAGES_PER_SECOND", "1000")
        .env("HEARTH_LIMITS__MESSAGES_BURST", "1000")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {}: {e}", hearth_bin().display()));
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "hearth did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Server { child, url: format!("http://127.0.0.1:{port}"), _dir: dir }
}

/// A client that finds sliding sync the way Element X does (from `/versions`), registered and logged in.
async fn user(server: &Server, name: &str) -> Client {
    let client = Client::builder()
        .homeserver_url(&server.url)
        .sliding_sync_version_builder(VersionBuilder::DiscoverNative)
        .build()
        .await
        .expect("client (with simplified sliding sync discovered from /versions)");
    let mut req = register::v3::Request::new();
    req.username = Some(name.to_owned());
    req.password = Some(PASSWORD.to_owned());
    req.inhibit_login = true;
    if let Err(e) = client.matrix_auth().register(req.clone()).await {
        let info = e.as_uiaa_response().expect("a UIA challenge");
        let mut dummy = uiaa::Dummy::new();
        dummy.session = info.session.clone();
        req.auth = Some(uiaa::AuthData::Dummy(dummy));
        client.matrix_auth().register(req).await.expect("register");
    }
    client.matrix_auth().login_username(name, PASSWORD).initial_device_display_name(name).send().await.expect("login");
    let _: Option<MatrixSession> = client.matrix_auth().session();
    client
}

async fn create(client: &Client, name: &str, invite: &[OwnedUserId], encrypted: bool) -> OwnedRoomId {
    let mut req = create_room::v3::Request::new();
    req.name = Some(name.to_owned());
    req.invite = invite.to_vec();
    if encrypted {
        let content = RoomEncryptionEventContent::with_recommended_defaults();
        req.initial_state = vec![InitialStateEvent::with_empty_state_key(content).to_raw_any()];
    }
    client.create_room(req).await.expect("create room").room_id().to_owned()
}

/// Polls `f` until it gives `Some` (or panics with `what` after `secs`).
async fn eventually<T, F, Fut>(what: &str, secs: u64, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn bodies(timeline: &Timeline) -> Vec<String> {
    timeline
        .items()
        .await
        .iter()
        .filter_map(|i| i.as_event().and_then(|e| e.content().as_message().map(|m| m.body().to_owned())))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn element_x_start_up() {
    let server = start_server();
    let alice = user(&server, "alice").await;
    let bob = user(&server, "bob").await;
    let bob_id = bob.user_id().unwrap().to_owned();

    // Three rooms; the first gets the newest message, and 30 messages of history to page through.
    let old = create(&alice, "old news", &[], false).await;
    let quiet = create(&alice, "quiet", &[], false).await;
    let busy = create(&alice, "busy", &[], false).await;
    let _ = old;
    for i in 0..30 {
        let room = alice.get_room(&busy).expect("room known after create");
        room.send(RoomMessageEventContent::text_plain(format!("m{i}"))).await.expect("send");
    }
    let secret = create(&alice, "secret", &[bob_id.clone()], true).await;

    let sync = SyncService::builder(alice.clone()).build().await.expect("sync service");
    sync.start().await;
    let rls = sync.room_list_service();
    let all = rls.all_rooms().await.expect("all_rooms");
    let (stream, controller) = all.entries_with_dynamic_adapters(50);
    controller.set_filter(Box::new(new_filter_non_left()));
    let mut stream = Box::pin(stream);
    let mut rooms: matrix_sdk_ui::eyeball_im::Vector<matrix_sdk_ui::room_list_service::RoomListItem> =
        Default::default();
    // Applies the list's updates until `done` holds of it (or fails after 30 s).
    macro_rules! until {
        ($what:expr, $done:expr) => {{
            let deadline = Instant::now() + Duration::from_secs(30);
            while !$done(&rooms) {
                let names: Vec<_> = rooms.iter().map(|r| (r.room_id().to_owned(), r.cached_display_name())).collect();
                assert!(Instant::now() < deadline, "timed out waiting for {}: {names:?}", $what);
                if let Ok(Some(diffs)) = tokio::time::timeout(Duration::from_millis(500), stream.next()).await {
                    for d in diffs {
                        d.apply(&mut rooms);
                    }
                }
            }
        }};
    }
    until!("the four rooms in the room list", |r: &matrix_sdk_ui::eyeball_im::Vector<_>| r.len() == 4);
    let order: Vec<OwnedRoomId> = rooms.iter().map(|r| r.room_id().to_owned()).collect();
    // "secret" was created last (its creation bumps it); then "busy" with its messages, before "quiet".
    let pos = |id: &OwnedRoomId| order.iter().position(|x| x == id).unwrap();
    assert!(pos(&busy) < pos(&quiet), "recency order {order:?}");
    assert_eq!(order[0], secret, "the newest room first: {order:?}");
    // A name filter.
    controller.set_filter(Box::new(new_filter_fuzzy_match_room_name("quiet")));
    until!("the filtered list", |r: &matrix_sdk_ui::eyeball_im::Vector<_>| r.len() == 1);
    let filtered: Vec<OwnedRoomId> = rooms.iter().map(|r| r.room_id().to_owned()).collect();
    assert_eq!(filtered, vec![quiet.clone()]);

    // A timeline pages back to the start of the room.
    let room = alice.get_room(&busy).unwrap();
    let timeline = room.timeline().await.expect("timeline");
    eventually("the room's whole history", 60, || {
        let t = &timeline;
        async move {
            let _ = t.paginate_backwards(20).await;
            let b = bodies(t).await;
            b.contains(&"m0".to_owned()).then_some(())
        }
    })
    .await;
    let b = bodies(&timeline).await;
    assert_eq!(b.len(), 30, "every message once: {b:?}");

    // End-to-end encryption between alice's device and bob's.
    let bob_sync = SyncService::builder(bob.clone()).build().await.expect("bob's sync service");
    bob_sync.start().await;
    eventually("bob's invite", 30, || {
        let b = bob.clone();
        let s = secret.clone();
        async move { b.get_room(&s).map(|_| ()) }
    })
    .await;
    bob.join_room_by_id(&secret).await.expect("bob joins");
    let alice_room = alice.get_room(&secret).unwrap();
    eventually("bob's join seen by alice", 30, || {
        let r = alice_room.clone();
        let bob_id = bob_id.clone();
        async move { r.get_member_no_sync(&bob_id).await.ok().flatten().map(|_| ()) }
    })
    .await;
    let alice_tl = alice_room.timeline().await.unwrap();
    alice_tl.send(RoomMessageEventContent::text_plain("for your eyes only").into()).await.expect("send encrypted");
    let bob_room = bob.get_room(&secret).unwrap();
    let bob_tl = bob_room.timeline().await.unwrap();
    eventually("bob decrypts alice's message", 60, || {
        let t = &bob_tl;
        async move { bodies(t).await.contains(&"for your eyes only".to_owned()).then_some(()) }
    })
    .await;

    // It was encrypted on the wire: bob's item carries the decryption's info.
    let decrypted = bob_tl.items().await.iter().any(|i| {
        i.as_event().is_some_and(|e| {
            e.content().as_message().is_some_and(|m| m.body() == "for your eyes only") && e.encryption_info().is_some()
        })
    });
    assert!(decrypted, "the message came encrypted and was decrypted");
    bob_sync.stop().await;
    sync.stop().await;
    drop(server);
}

/// Every field Hearth sends parses as ruma's `sync_events::v5` response (the types matrix-rust-sdk deserialises):
/// lists, joined and invited rooms, heroes, counts, required state and timeline events, extensions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sliding_sync_answers_parse_as_ruma_v5() {
    use matrix_sdk::ruma::api::client::sync::sync_events::v5;
    use matrix_sdk::ruma::directory::RoomTypeFilter;
    use matrix_sdk::ruma::events::StateEventType;
    use matrix_sdk::ruma::UInt;

    let server = start_server();
    let alice = user(&server, "alice").await;
    let bob = user(&server, "bob").await;
    let bob_id = bob.user_id().unwrap().to_owned();
    let alice_id = alice.user_id().unwrap().to_owned();
    let named = create(&alice, "named", &[], true).await;
    let mut req = create_room::v3::Request::new();
    req.invite = vec![bob_id.clone()];
    let nameless = alice.create_room(req).await.unwrap().room_id().to_owned();
    bob.join_room_by_id(&nameless).await.expect("bob joins");
    let invite = create(&bob, "invitation", &[alice_id.clone()], false).await;
    alice.get_room(&named).unwrap().send(RoomMessageEventContent::text_plain("hello")).await.unwrap();

    let request = |pos: Option<String>| {
        let mut req = v5::Request::new();
        req.pos = pos;
        req.conn_id = Some("shape".into());
        let mut list = v5::request::List::default();
        list.ranges = vec![(UInt::from(0u32), UInt::from(10u32))];
        list.room_details.timeline_limit = UInt::from(5u32);
        list.room_details.required_state = vec![
            (StateEventType::RoomName, String::new()),
            (StateEventType::RoomCreate, String::new()),
            (StateEventType::RoomMember, "$LAZY".into()),
            (StateEventType::RoomMember, "$ME".into()),
        ];
        let mut filters = v5::request::ListFilters::default();
        filters.not_room_types = vec![RoomTypeFilter::Space];
        list.filters = Some(filters);
        req.lists.insert("all".into(), list);
        req.extensions.to_device.enabled = Some(true);
        req.extensions.e2ee.enabled = Some(true);
        req.extensions.account_data.enabled = Some(true);
        req.extensions.receipts.enabled = Some(true);
        req.extensions.typing.enabled = Some(true);
        req
    };
    let r = alice.send(request(None)).await.expect("the answer parses as ruma's v5 response");
    assert_eq!(r.lists["all"].count, UInt::from(3u32));
    let room = &r.rooms[&named];
    assert_eq!(room.name.as_deref(), Some("named"));
    assert_eq!(room.initial, Some(true));
    assert_eq!(room.joined_count, Some(UInt::from(1u32)));
    assert_eq!(room.invited_count, Some(UInt::from(0u32)));
    assert!(room.bump_stamp.is_some() && room.prev_batch.is_some());
    assert_eq!(room.unread_notifications.notification_count, Some(UInt::from(0u32)));
    assert!(!room.required_state.is_empty());
    for e in &room.required_state {
        e.deserialize().expect("a state event");
    }
    assert_eq!(room.timeline.len(), 5);
    for e in &room.timeline {
        e.deserialize().expect("a timeline event");
    }
    let heroes = r.rooms[&nameless].heroes.as_ref().expect("heroes of the nameless room");
    assert_eq!(heroes[0].user_id, bob_id);
    assert_eq!(heroes[0].name.as_deref(), Some("bob"));
    let inv = r.rooms[&invite].invite_state.as_ref().expect("invite_state");
    for e in inv {
        e.deserialize().expect("a stripped state event");
    }
    let x = &r.extensions;
    assert!(x.to_device.is_some());
    assert!(x.e2ee.device_one_time_keys_count.contains_key(&matrix_sdk::ruma::OneTimeKeyAlgorithm::SignedCurve25519));
    for e in &x.account_data.global {
        e.deserialize().expect("global account data");
    }

    // Incremental: one new message, live.
    bob.get_room(&nameless).unwrap().send(RoomMessageEventContent::text_plain("news")).await.unwrap();
    let r2 = alice.send(request(Some(r.pos.clone()))).await.expect("the incremental answer parses");
    let room = &r2.rooms[&nameless];
    assert_eq!(room.initial, None);
    assert_eq!(room.timeline.len(), 1);
    assert_eq!(room.num_live, Some(UInt::from(1u32)));
    assert!(!r2.rooms.contains_key(&named), "unchanged rooms are not resent");
}

/// The Synapse side of the lazy-join test: `tests/interop/sdk_lab.py` (a Hearth and a Synapse that federate, a big
/// room on Synapse), driven over its stdin/stdout.
struct SynapseLab {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
    ready: std::collections::HashMap<String, String>,
}

impl SynapseLab {
    fn start() -> SynapseLab {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut child = Command::new("python3")
            .arg(root.join("tests/interop/sdk_lab.py"))
            .env("HEARTHTEST_BIN", hearth_bin())
            .current_dir(&root)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 must be installed to run the Synapse test");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let rest = line.trim().strip_prefix("READY ").unwrap_or_else(|| panic!("the lab did not start: {line:?}"));
        let ready =
            rest.split(' ').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
        SynapseLab { child, out, ready }
    }

    fn get(&self, key: &str) -> &str {
        &self.ready[key]
    }

    /// Asks the lab one question (blocking: the answer may take a minute), returns the answer's argument.
    fn ask(&mut self, question: &str) -> String {
        tokio::task::block_in_place(|| {
            let stdin = self.child.stdin.as_mut().unwrap();
            writeln!(stdin, "{question}").unwrap();
            stdin.flush().unwrap();
            let mut line = String::new();
            self.out.read_line(&mut line).unwrap();
            let word = question.split(' ').next().unwrap();
            let answer = line.trim().strip_prefix(word).unwrap_or_else(|| panic!("{question}: {line:?}"));
            answer.trim().to_owned()
        })
    }
}

impl Drop for SynapseLab {
    fn drop(&mut self) {
        if let Some(stdin) = self.child.stdin.as_mut() {
            let _ = writeln!(stdin, "quit");
        }
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// A Hearth user joins a room of a few hundred members on Synapse: the join is lazy (partial state), the
/// `RoomListService` lists the room at once, its `Timeline` shows the room's messages, a message sent from the
/// sdk reaches Synapse, and after the resync the member count the sdk shows is Synapse's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Synapse (target/synapse-venv); see tests/README.md"]
async fn element_x_lazily_joins_a_big_synapse_room() {
    use matrix_sdk::ruma::{OwnedServerName, RoomOrAliasId};
    if std::env::var("HEARTHTEST_SKIP_SYNAPSE").as_deref() == Ok("1") {
        eprintln!("SKIPPED: HEARTHTEST_SKIP_SYNAPSE=1 (the matrix-rust-sdk Synapse test not run)");
        return;
    }
    let mut lab = SynapseLab::start();
    let room_id: OwnedRoomId = lab.get("room").try_into().unwrap();
    let server: OwnedServerName = lab.get("synapse_server").try_into().unwrap();
    let members: u64 = lab.get("members").parse().unwrap();
    let client = Client::builder()
        .homeserver_url(lab.get("hearth"))
        .sliding_sync_version_builder(VersionBuilder::DiscoverNative)
        .build()
        .await
        .expect("client");
    client.matrix_auth().login_username(lab.get("user"), lab.get("password")).send().await.expect("login");

    let sync = SyncService::builder(client.clone()).build().await.expect("sync service");
    sync.start().await;
    let rls = sync.room_list_service();
    let all = rls.all_rooms().await.expect("all_rooms");
    let (stream, controller) = all.entries_with_dynamic_adapters(50);
    controller.set_filter(Box::new(new_filter_non_left()));
    let mut stream = Box::pin(stream);
    let mut rooms: matrix_sdk_ui::eyeball_im::Vector<matrix_sdk_ui::room_list_service::RoomListItem> =
        Default::default();

    let started = Instant::now();
    let alias: &RoomOrAliasId = room_id.as_str().try_into().unwrap();
    client.join_room_by_id_or_alias(alias, &[server]).await.expect("the lazy join");
    let joined_after = started.elapsed();
    assert_eq!(lab.ask("partial"), "true", "the join should be partial (Synapse serves omit_members)");

    // Listed at once.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !rooms.iter().any(|r| r.room_id() == room_id) {
        assert!(Instant::now() < deadline, "the lazily joined room was never listed");
        if let Ok(Some(diffs)) = tokio::time::timeout(Duration::from_millis(200), stream.next()).await {
            for d in diffs {
                d.apply(&mut rooms);
            }
        }
    }
    let room = client.get_room(&room_id).expect("the room");
    // The list entry may come from the sdk's own join; the room's data from Hearth's sliding sync: its name (the
    // `m.room.name` in `required_state`) and a member count.
    eventually("the room's name and members from sliding sync", 30, || {
        let r = room.clone();
        async move {
            (r.name().is_some_and(|n| n.starts_with("big synapse room")) && r.joined_members_count() > 0).then_some(())
        }
    })
    .await;
    let listed_after = started.elapsed();
    let still_partial = lab.ask("partial") == "true";
    let first_count = room.joined_members_count();
    eprintln!(
        "lazy join of a {members}-member Synapse room: /join {joined_after:?}, listed with its name {listed_after:?} \
         after /join started (resync still running then: {still_partial}; joined_count then {first_count})"
    );

    // Its timeline shows the room's messages (paging back over federation if need be).
    rls.subscribe_to_rooms(&[&room_id]).await;
    let timeline = room.timeline().await.expect("timeline");
    eventually("the messages sent on Synapse before the join", 60, || {
        let t = &timeline;
        async move {
            let b = bodies(t).await;
            if b.iter().any(|x| x == "before the join 2") {
                return Some(());
            }
            let _ = t.paginate_backwards(20).await;
            None
        }
    })
    .await;

    // Sending works: the message reaches Synapse.
    timeline.send(RoomMessageEventContent::text_plain("hello from matrix-rust-sdk").into()).await.expect("send");
    assert_eq!(lab.ask("has hello from matrix-rust-sdk"), "true", "the message reached Synapse");

    // After the resync, the member count is Synapse's.
    let on_synapse: u64 = lab.ask("members").parse().unwrap();
    assert_eq!(on_synapse, members + 1, "the owner's members and ours");
    eventually("the exact member count after the resync", 180, || {
        let r = room.clone();
        async move { (r.joined_members_count() == on_synapse).then_some(()) }
    })
    .await;
    assert_eq!(lab.ask("partial"), "false", "the resync has ended");
    sync.stop().await;
}
