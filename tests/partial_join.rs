//! Lazy (partial-state) joins against a scripted fake resident (issue #4, DESIGN.md section 6): one test per
//! checklist scenario, each asserting what a client of Hearth or the resident server observes.
//!
//! The fake resident (`tests/common/fake_resident.rs`) is a real TLS federation server with its own key and a room
//! it built and signed itself; the tests hold back its `/state_ids` answer to keep Hearth in partial state as long
//! as they need, corrupt it, push events to Hearth, and count what Hearth asked for.

mod common;

use std::time::Duration;

use common::fake_resident::*;
use common::*;

const LONG: Duration = Duration::from_secs(60);

/// `{"room":{"state":{"lazy_load_members":true}}}`
fn lazy_filter() -> String {
    json!({"room": {"state": {"lazy_load_members": true}, "timeline": {"limit": 20}}}).to_string()
}

/// Hearth (in-process, federation on), a fake resident with `spec`'s room, and `alice` joined to that room
/// lazily; the fake holds `/state_ids`, so the room stays partial until the test releases it.
async fn partially_joined(spec: RoomSpec) -> (TestServer, FakeResident, Client) {
    partially_joined_with(spec, |_| {}).await
}

/// [`partially_joined`] with `f` changing Hearth's configuration.
async fn partially_joined_with(
    spec: RoomSpec,
    f: impl FnOnce(&mut hearth::config::Config),
) -> (TestServer, FakeResident, Client) {
    let hearth = start_hearth_with(f).await;
    let fake = FakeResident::start(spec).await;
    fake.connect_to(&hearth);
    fake.hold("state_ids");
    let alice = hearth.user("alice").await;
    let started = std::time::Instant::now();
    let joined = join_via(&alice, &fake).await;
    assert_eq!(joined["room_id"], json!(fake.room_id()));
    eprintln!("lazy join returned in {:?}", started.elapsed());
    // The resident saw a partial join: send_join with omit_members=true.
    let sj = fake.requests_of("send_join");
    assert_eq!(sj.len(), 1, "one send_join: {sj:?}");
    // The resync started and is now waiting on the held /state_ids.
    fake.wait_requests("state_ids", 1, LONG).await;
    (hearth, fake, alice)
}

/// Member events (user id -> membership) in a sync room's state and timeline.
fn memberships_in(room: &Value) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    for e in events_of(&room["state"]).into_iter().chain(events_of(&room["timeline"])) {
        if e["type"] == "m.room.member" {
            out.insert(
                e["state_key"].as_str().unwrap_or_default().to_owned(),
                e["content"]["membership"].as_str().unwrap_or_default().to_owned(),
            );
        }
    }
    out
}

/// Everyone the fake's room has joined (the fake's users and Hearth's), sorted.
fn expected_members(fake: &FakeResident) -> Vec<String> {
    let mut v = fake.joined_members();
    v.sort();
    v
}

async fn joined_members(c: &Client, room: &str) -> Resp {
    c.get(&format!("/rooms/{}/joined_members", enc(room))).await
}

/// Client requests being handled by Hearth right now (`hearth_http_requests_in_flight` of `/metrics`, which counts
/// the scrape itself; needs `metrics.enabled`).
async fn requests_in_flight(hearth: &TestServer) -> u64 {
    let c = hearth.client();
    let text = c.http.get(format!("{}/metrics", c.base_url)).send().await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("hearth_http_requests_in_flight "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no hearth_http_requests_in_flight in /metrics: {text}"))
}

/// Waits (bounded) until the room's resync completed, observed through `/joined_members` (which waits for it).
async fn wait_resynced(c: &Client, room: &str) -> Value {
    within(LONG, joined_members(c, room)).await.expect("/joined_members answered after the resync").ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eager_sync_hides_partial_room_until_resync_then_shows_all_members() {
    let (hearth, fake, alice) = partially_joined(RoomSpec::default()).await;
    let room = fake.room_id();

    let initial = alice.sync(None, &[]).await.ok();
    assert!(
        initial["rooms"]["join"].get(&room).is_none(),
        "eager initial sync must hide the partial room: {}",
        initial["rooms"]
    );
    // Still hidden in an incremental sync while the resync waits.
    let since = initial["next_batch"].as_str().unwrap().to_owned();
    let inc = alice.sync(Some(&since), &[("timeout", "500")]).await.ok();
    assert!(
        inc["rooms"]["join"].get(&room).is_none(),
        "eager incremental sync must hide the partial room: {}",
        inc["rooms"]
    );
    let mut since = inc["next_batch"].as_str().unwrap().to_owned();

    fake.release("state_ids");
    // A long-polling eager sync is woken by the resync and gets the room as newly joined, with everyone in it.
    let deadline = std::time::Instant::now() + LONG;
    let room_sync = loop {
        let s = alice.sync(Some(&since), &[("timeout", "10000")]).await.ok();
        if let Some(r) = s["rooms"]["join"].get(&room) {
            break r.clone();
        }
        assert!(std::time::Instant::now() < deadline, "room never appeared in eager sync after the resync");
        since = s["next_batch"].as_str().unwrap().to_owned();
    };
    let members = memberships_in(&room_sync);
    let joined: Vec<String> = members.iter().filter(|(_, m)| *m == "join").map(|(u, _)| u.clone()).collect();
    assert_eq!(joined, expected_members(&fake), "after the resync, eager sync shows every member");
    assert!(joined.contains(&alice.user_id));
    // Room stats and the user directory know the omitted members too.
    assert_eq!(
        room_sync["summary"]["m.joined_member_count"],
        json!(expected_members(&fake).len()),
        "{}",
        room_sync["summary"]
    );
    let user7 = fake.user("user7");
    let found = alice.post("/user_directory/search", json!({"search_term": "user7"})).await.ok();
    assert!(found["results"].as_array().unwrap().iter().any(|r| r["user_id"] == json!(user7)), "{found}");
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_sync_shows_partial_room_at_once_with_senders_memberships() {
    let (hearth, fake, alice) = partially_joined(RoomSpec::default()).await;
    let room = fake.room_id();
    let filter = lazy_filter();

    // A remote member Hearth has no membership event for (members were omitted) speaks.
    let user3 = fake.user("user3");
    let m1 = fake.append(EventSpec::message(&user3, "hello from user3"));
    let answer = fake.push(&[&m1.id]).await;
    assert_eq!(answer[&m1.id], json!({}), "Hearth accepted the message: {answer}");

    let initial = alice.sync(None, &[("filter", &filter)]).await.ok();
    let r = initial["rooms"]["join"]
        .get(&room)
        .unwrap_or_else(|| panic!("lazy-loading initial sync shows the partial room at once: {}", initial["rooms"]));
    let timeline: Vec<String> =
        events_of(&r["timeline"]).iter().filter_map(|e| e["event_id"].as_str().map(str::to_owned)).collect();
    assert!(timeline.contains(&m1.id), "the remote message is in the timeline: {timeline:?}");
    let members = memberships_in(r);
    assert_eq!(
        members.get(&user3).map(String::as_str),
        Some("join"),
        "the sender's membership comes with the lazy-loaded state: {members:?}"
    );
    assert_eq!(members.get(&alice.user_id).map(String::as_str), Some("join"));

    // Incremental: another remote sender.
    let since = initial["next_batch"].as_str().unwrap().to_owned();
    let user4 = fake.user("user4");
    let m2 = fake.append(EventSpec::message(&user4, "hello from user4"));
    fake.push(&[&m2.id]).await;
    let inc = alice.sync(Some(&since), &[("filter", &filter), ("timeout", "5000")]).await.ok();
    let r = inc["rooms"]["join"]
        .get(&room)
        .unwrap_or_else(|| panic!("incremental lazy sync shows the new message: {}", inc["rooms"]));
    assert!(events_of(&r["timeline"]).iter().any(|e| e["event_id"] == json!(m2.id)));
    let members = memberships_in(r);
    assert_eq!(
        members.get(&user4).map(String::as_str),
        Some("join"),
        "incremental lazy sync carries the new sender's membership: {members:?}"
    );

    fake.release("state_ids");
    wait_resynced(&alice, &room).await;
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_and_joined_members_block_until_resync_then_list_everyone() {
    let (hearth, fake, alice) = partially_joined_with(RoomSpec::default(), |c| c.metrics.enabled = true).await;
    let room = fake.room_id();

    let (a, r) = (alice.clone(), room.clone());
    let members = tokio::spawn(async move { a.get(&format!("/rooms/{}/members", enc(&r))).await });
    let (a, r) = (alice.clone(), room.clone());
    let joined = tokio::spawn(async move { joined_members(&a, &r).await });
    // Both requests have reached Hearth and are being handled (in flight: they and the scrape itself).
    wait_until("/members and /joined_members in flight at Hearth", LONG, || async {
        (requests_in_flight(&hearth).await >= 3).then_some(())
    })
    .await;
    // Non-member state answers at once meanwhile.
    let name = alice.state(&room, "m.room.name", "").await.ok();
    assert_eq!(name["name"], "Fake resident's room");

    assert_eq!(fake.count("state"), 0, "the resync is still held");
    assert!(!members.is_finished(), "/members must wait for the full member list");
    assert!(!joined.is_finished(), "/joined_members must wait for the full member list");

    fake.release("state_ids");
    let members = within(LONG, members).await.expect("/members answered after the resync").unwrap().ok();
    let joined = within(LONG, joined).await.expect("/joined_members answered after the resync").unwrap().ok();
    let expected = expected_members(&fake);
    assert_eq!(joined_ids(&joined), expected);
    let mut from_members: Vec<String> = members["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["content"]["membership"] == "join")
        .map(|e| e["state_key"].as_str().unwrap().to_owned())
        .collect();
    from_members.sort();
    assert_eq!(from_members, expected);
    assert!(expected.len() > 20, "the fake's 21 users and alice: {expected:?}");
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_during_partial_state_reaches_the_resident() {
    let (hearth, fake, alice) = partially_joined(RoomSpec::default()).await;
    let room = fake.room_id();

    let started = std::time::Instant::now();
    let event_id = within(Duration::from_secs(10), alice.send_text(&room, "sent while partial"))
        .await
        .expect("sending does not wait for the resync");
    let pdu = fake.wait_received(&event_id, Duration::from_secs(10)).await;
    eprintln!("message reached the resident after {:?}", started.elapsed());
    assert_eq!(pdu["content"]["body"], "sent while partial");
    assert_eq!(pdu["sender"], json!(alice.user_id));
    assert_eq!(pdu["room_id"], json!(room));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the resident got the message quickly ({:?})",
        started.elapsed()
    );
    // The resync is still waiting: this happened during partial state.
    assert_eq!(fake.count("state"), 0);
    assert!(fake.requests_of("event").is_empty());

    fake.release("state_ids");
    wait_resynced(&alice, &room).await;
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_with_missing_parents_during_partial_state_are_fetched() {
    let (hearth, fake, alice) = partially_joined(RoomSpec::default()).await;
    let room = fake.room_id();

    // Two events Hearth never hears of directly, then one on top of them that the resident pushes.
    let a = fake.append(EventSpec::message(&fake.user("user1"), "parent"));
    let b = fake.append(EventSpec::message(&fake.user("user2"), "child"));
    let c = fake.append(EventSpec::message(&fake.user("user5"), "grandchild"));
    assert_eq!(c.prev, vec![b.id.clone()]);
    let answer = fake.push(&[&c.id]).await;
    assert_eq!(answer[&c.id], json!({}), "{answer}");

    // Hearth asked the resident for what lies between its extremities and the pushed event.
    let gme = fake.requests_of("get_missing_events");
    assert_eq!(gme.len(), 1, "one get_missing_events: {gme:?}");
    let asked: Value = serde_json::from_str(&gme[0].detail).unwrap();
    assert_eq!(asked["latest_events"], json!([c.id]));

    // A client sees all three, in order.
    for ev in [&a, &b, &c] {
        let r = alice.event(&room, &ev.id).await.ok();
        assert_eq!(r["content"]["body"], ev.json["content"]["body"]);
    }
    let msgs = alice.messages(&room, &[("dir", "b"), ("limit", "10")]).await.ok();
    let bodies: Vec<&str> = msgs["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .filter_map(|e| e["content"]["body"].as_str())
        .collect();
    assert_eq!(&bodies[..3], &["grandchild", "child", "parent"]);

    fake.release("state_ids");
    wait_resynced(&alice, &room).await;
    // Still there after the resync.
    alice.event(&room, &a.id).await.ok();
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_event_during_partial_state_stays_rejected_after_resync() {
    let (hearth, fake, alice) = partially_joined(RoomSpec::default()).await;
    let room = fake.room_id();

    // user1 (power 0) renames the room; state_default is 50: the room's rules reject it.
    let bad = fake.build(EventSpec::state(&fake.user("user1"), "m.room.name", "", json!({"name": "vandalised"})));
    // And a good event that builds on the rejected one, so the test knows Hearth processed `bad` (it would
    // otherwise have to fetch it as a missing parent).
    let good = fake.append(EventSpec::message(&fake.creator(), "after the bad rename").with_prev(vec![bad.id.clone()]));
    let answer = fake.push(&[&bad.id, &good.id]).await;
    assert!(answer.get(&bad.id).is_some() && answer.get(&good.id).is_some(), "{answer}");
    assert_eq!(fake.count("get_missing_events"), 0, "Hearth had the rejected event: no gap to fill");

    let check = |when: &'static str| {
        let (alice, room, bad, good) = (alice.clone(), room.clone(), bad.id.clone(), good.id.clone());
        async move {
            let name = alice.state(&room, "m.room.name", "").await.ok();
            assert_eq!(name["name"], "Fake resident's room", "{when}: the rejected rename has no effect");
            alice.event(&room, &bad).await.assert_err(404, "M_NOT_FOUND");
            alice.event(&room, &good).await.ok();
            let msgs = alice.messages(&room, &[("dir", "b"), ("limit", "20")]).await.ok();
            let ids: Vec<&str> =
                msgs["chunk"].as_array().unwrap().iter().filter_map(|e| e["event_id"].as_str()).collect();
            assert!(!ids.contains(&bad.as_str()), "{when}: the rejected event is not in /messages");
            assert!(ids.contains(&good.as_str()), "{when}: the accepted event is in /messages");
        }
    };
    check("during partial state").await;
    fake.release("state_ids");
    wait_resynced(&alice, &room).await;
    check("after the resync").await;
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bogus_state_ids_falls_back_to_another_server_in_the_room() {
    let hearth = start_hearth().await;
    let fake = FakeResident::start(RoomSpec::default()).await;
    // A second server in the room, answering for the same DAG with its own key.
    let peer = fake.start_peer().await;
    let bob = peer.user("bob");
    fake.append(EventSpec::member(&bob, "join"));
    fake.connect_to(&hearth);
    fake.set_state_ids_mode(StateIdsMode::Bogus);

    let alice = hearth.user("alice").await;
    join_via(&alice, &fake).await;
    let room = fake.room_id();
    let joined = wait_resynced(&alice, &room).await;
    assert_eq!(joined_ids(&joined), expected_members(&fake), "the member list came from the other server");
    assert!(joined_ids(&joined).contains(&bob));
    assert!(fake.count("state_ids") >= 1, "the server joined via was asked first");
    assert!(peer.count("state_ids") >= 1, "the other server in servers_in_room was asked after the bogus answer");
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leave_during_resync_does_not_wait() {
    let (hearth, fake, alice) = partially_joined(RoomSpec::default()).await;
    let room = fake.room_id();

    let left = within(Duration::from_secs(10), alice.leave(&room)).await.expect("leave does not wait for the resync");
    left.ok();
    // The resident hears about it.
    let leave_pdu = wait_until("the resident to get the leave", Duration::from_secs(10), || async {
        fake.received().into_iter().map(|x| x.1).find(|p| {
            p["type"] == "m.room.member"
                && p["state_key"] == json!(alice.user_id)
                && p["content"]["membership"] == "leave"
        })
    })
    .await;
    assert_eq!(leave_pdu["room_id"], json!(room));
    // The client sees itself out of the room.
    let jr = alice.get("/joined_rooms").await.ok();
    assert!(!jr["joined_rooms"].as_array().unwrap().contains(&json!(room)));
    let s = alice.sync(None, &[("filter", &json!({"room": {"include_leave": true}}).to_string())]).await.ok();
    assert!(s["rooms"]["join"].get(&room).is_none());
    assert!(s["rooms"]["leave"].get(&room).is_some(), "the room is in the leave section: {}", s["rooms"]);
    assert_eq!(fake.count("state"), 0, "all this while the resync was still held");

    // Rejoining works (a fresh partial join through the resident).
    fake.release("state_ids");
    join_via(&alice, &fake).await;
    let joined = wait_resynced(&alice, &room).await;
    assert!(joined_ids(&joined).contains(&alice.user_id));
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_local_user_joins_during_resync() {
    let (hearth, fake, alice) = partially_joined(RoomSpec::default()).await;
    let room = fake.room_id();

    let bob = hearth.user("bob").await;
    let r = within(Duration::from_secs(10), join_via(&bob, &fake))
        .await
        .expect("a second join does not wait for the resync");
    assert_eq!(r["room_id"], json!(room));
    // As in Synapse, a resident with the full state judges the join (it may know of a ban we do not): bob joins
    // through make_join/send_join, not as a local event.
    let joins = fake.requests_of("make_join");
    assert!(joins.iter().any(|r| r.detail == bob.user_id), "bob's make_join: {joins:?}");
    assert!(fake.joined_members().contains(&bob.user_id));
    // Bob can talk at once, and the resident gets it.
    let ev = bob.send_text(&room, "bob here").await;
    fake.wait_received(&ev, Duration::from_secs(10)).await;

    fake.release("state_ids");
    let expected = expected_members(&fake);
    assert!(expected.contains(&alice.user_id) && expected.contains(&bob.user_id));
    assert_eq!(joined_ids(&wait_resynced(&alice, &room).await), expected);
    assert_eq!(joined_ids(&wait_resynced(&bob, &room).await), expected);
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_room_refuses_to_act_as_resident() {
    let (hearth, fake, alice) = partially_joined(RoomSpec::default()).await;
    let room = fake.room_id();
    let newcomer = fake.user("newcomer");
    let join_ev = alice.state(&room, "m.room.member", &alice.user_id).await;
    assert_eq!(join_ev.status, 200);

    // make_join / send_join: 404 M_NOT_FOUND while partial.
    let ver = format!("ver={}", fake.room_version());
    let mj = fake
        .request_hearth(
            reqwest::Method::GET,
            &format!("/_matrix/federation/v1/make_join/{}/{}?{ver}", enc(&room), enc(&newcomer)),
            None,
        )
        .await;
    let (status, body) = mj.expect_err("make_join must be refused");
    assert_eq!((status, body["errcode"].as_str()), (404, Some("M_NOT_FOUND")), "{body}");
    let join = fake.build(EventSpec::member(&newcomer, "join"));
    for v in ["v1", "v2"] {
        let sj = fake
            .request_hearth(
                reqwest::Method::PUT,
                &format!("/_matrix/federation/{v}/send_join/{}/{}", enc(&room), enc(&join.id)),
                Some(&join.json),
            )
            .await;
        let (status, body) = sj.expect_err("send_join must be refused");
        assert_eq!((status, body["errcode"].as_str()), (404, Some("M_NOT_FOUND")), "{v}: {body}");
    }
    // State queries: 403 M_UNABLE_DUE_TO_PARTIAL_STATE.
    let at = fake.room.lock().unwrap().extremities[0].clone();
    for path in [
        format!("/_matrix/federation/v1/state_ids/{}?event_id={}", enc(&room), enc(&at)),
        format!("/_matrix/federation/v1/state/{}?event_id={}", enc(&room), enc(&at)),
        format!("/_matrix/federation/v1/event_auth/{}/{}", enc(&room), enc(&at)),
    ] {
        let (status, body) = fake
            .request_hearth(reqwest::Method::GET, &path, None)
            .await
            .expect_err("state must be refused while partial");
        assert_eq!((status, body["errcode"].as_str()), (403, Some("M_UNABLE_DUE_TO_PARTIAL_STATE")), "{path}: {body}");
    }

    // Once the resync is done, Hearth answers again.
    fake.release("state_ids");
    wait_resynced(&alice, &room).await;
    let mj = fake
        .request_hearth(
            reqwest::Method::GET,
            &format!("/_matrix/federation/v1/make_join/{}/{}?{ver}", enc(&room), enc(&newcomer)),
            None,
        )
        .await;
    let template = mj.expect("make_join answered after the resync");
    assert_eq!(template["event"]["state_key"], json!(newcomer));
    let ids = fake
        .request_hearth(
            reqwest::Method::GET,
            &format!("/_matrix/federation/v1/state_ids/{}?event_id={}", enc(&room), enc(&at)),
            None,
        )
        .await
        .expect("state_ids answered after the resync");
    assert!(ids["pdu_ids"].as_array().is_some_and(|a| a.len() > 20), "{ids}");
    hearth.stop().await;
}

/// The `hearth` binary with federation on, configured by a TOML file (`-c`), on fresh ports each start.
struct FedBinary {
    child: std::process::Child,
    base_url: String,
    log: std::path::PathBuf,
}

impl FedBinary {
    async fn start(dir: &std::path::Path, n: usize) -> FedBinary {
        let (crt, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        if !crt.exists() {
            self_signed_cert(dir);
        }
        let (port, fed_port) = (free_port(), free_port());
        let config = format!(
            r#"server_name = "localhost"
[listen]
client = "127.0.0.1:{port}"
federation = "127.0.0.1:{fed_port}"
[database]
path = "{db}"
[registration]
enabled = true
[limits]
messages_per_second = 1000.0
[federation]
enabled = true
trusted_key_servers = []
verify_certificates = false
allow_private_ips = true
tls_cert = "{crt}"
tls_key = "{key}"
[log]
level = "info,ruma_state_res=warn"
"#,
            db = dir.join("hearth.db").display(),
            crt = crt.display(),
            key = key.display(),
        );
        let config_path = dir.join("hearth.toml");
        std::fs::write(&config_path, config).unwrap();
        let log = dir.join(format!("hearth-{n}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = std::process::Command::new(hearth_bin());
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("HEARTH_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd
            .arg("-c")
            .arg(&config_path)
            .current_dir(dir)
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn hearth");
        let mut me = FedBinary { child, base_url: format!("http://127.0.0.1:{port}"), log };
        let probe = Client::new(&me.base_url);
        let deadline = std::time::Instant::now() + LONG;
        loop {
            if let Ok(Some(status)) = me.child.try_wait() {
                panic!("hearth exited early with {status}: {}", me.logs());
            }
            if probe
                .try_request(reqwest::Method::GET, "/_matrix/client/versions", None)
                .await
                .is_ok_and(|r| r.status == 200)
            {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "hearth did not start: {}", me.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        me
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL and reap.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for FedBinary {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_resumes_after_sigkill_without_refetching_what_was_stored() {
    // 80 members: enough missing state that the resync fetches through /state.
    let fake = FakeResident::start(RoomSpec { members: 80, ..Default::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    fake.hold("state_ids");

    // First run: join lazily; SIGKILL while the resync waits for /state_ids.
    let mut hearth = FedBinary::start(dir.path(), 1).await;
    let mut alice = Client::new(&hearth.base_url);
    alice.register("alice", PASSWORD).await.ok();
    join_via(&alice, &fake).await;
    let room = fake.room_id();
    fake.wait_requests("state_ids", 1, LONG).await;
    hearth.kill();

    // Second run: /state_ids is answered, /state covers only part of the state (the rest must come through
    // /event), and /event is held; SIGKILL once the resync is waiting on /event.
    fake.set_state_limit(Some(40));
    fake.hold("event");
    fake.release("state_ids");
    let mut hearth = FedBinary::start(dir.path(), 2).await;
    // The join's prev event is asked for alongside /state (and left to the single fetches when held): the second
    // /event request is the single fetches', after /state's events were stored.
    fake.wait_requests("event", 2, LONG).await;
    hearth.kill();
    // Requests the dead process had already written may still be read by the fake: wait until they settle.
    let mut held_events = fake.count("event");
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let n = fake.count("event");
        if n == held_events {
            break;
        }
        held_events = n;
    }
    assert_eq!(fake.count("state_ids"), 2, "the resync restarted from /state_ids after the first kill");
    assert_eq!(fake.count("state"), 1);

    // What the second run stored: the state /state returned (at the join's prev event, as Synapse answers) and
    // what send_join gave at join time.
    let join_id = fake.requests_of("send_join")[0].detail.clone();
    let stored: std::collections::HashSet<String> = {
        let r = fake.room.lock().unwrap();
        let join = r.get(&join_id).unwrap();
        let prev = join.json["prev_events"][0].as_str().unwrap().to_owned();
        let mut ids: Vec<String> = r.get(&prev).unwrap().state_before.values().cloned().collect();
        ids.truncate(40);
        ids.into_iter()
            .chain(join.state_before.iter().filter(|((t, _), _)| t != "m.room.member").map(|(_, id)| id.clone()))
            .collect()
    };

    // Third run: everything answers; the resync finishes from its cursor.
    fake.release("event");
    let hearth = FedBinary::start(dir.path(), 3).await;
    let alice = alice.at(&hearth.base_url);
    let joined = within(LONG, joined_members(&alice, &room))
        .await
        .unwrap_or_else(|| panic!("resync did not finish: {}", hearth.logs()));
    let joined = joined.ok();
    assert_eq!(joined_ids(&joined), expected_members(&fake), "the member list is complete after the restarts");

    // Not refetched: no new join, no /state_ids or /state after the second kill, and /event only for events
    // that were not stored before it.
    assert_eq!(fake.count("make_join"), 1);
    assert_eq!(fake.count("send_join"), 1);
    assert_eq!(fake.count("state_ids"), 2, "/state_ids was not asked again: its answer was stored");
    assert_eq!(fake.count("state"), 1, "/state was not asked again: its events were stored");
    let refetched: Vec<String> = fake.requests_of("event").into_iter().skip(held_events).map(|r| r.detail).collect();
    assert!(!refetched.is_empty(), "the third run fetched the rest (held {held_events} at the kill)");
    for id in &refetched {
        assert!(!stored.contains(id), "{id} was stored before the kill but fetched again");
    }
    let unique: std::collections::HashSet<&String> = refetched.iter().collect();
    assert!(
        refetched.len() <= 81 - 40 + 5,
        "only what was missing: {} requests, {} distinct events; log: {}",
        refetched.len(),
        unique.len(),
        hearth.logs()
    );
    // The room works: a message reaches the resident.
    let ev = alice.send_text(&room, "back after two kills").await;
    fake.wait_received(&ev, Duration::from_secs(10)).await;
    drop(hearth);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_wrongly_accepted_during_partial_state_is_gone_after_resync() {
    let hearth = start_hearth().await;
    let fake = FakeResident::start(RoomSpec::default()).await;
    fake.connect_to(&hearth);
    let (creator, user7) = (fake.creator(), fake.user("user7"));
    // user7 may set the topic, then gets banned — before Hearth joins, so the ban is among the omitted members.
    let user7_join = fake.room.lock().unwrap().state_id("m.room.member", &user7).unwrap();
    grant_power(&fake, &user7, 50);
    fake.append(EventSpec::state(&creator, "m.room.member", &user7, json!({"membership": "ban"})));
    fake.hold("state_ids");
    let alice = hearth.user("alice").await;
    join_via(&alice, &fake).await;
    let room = fake.room_id();
    fake.wait_requests("state_ids", 1, LONG).await;

    // user7's server sends a topic change citing user7's old join as auth event. Partial state has no
    // membership for user7, so it can only be judged by its own auth events; the full state says banned.
    let (create, pl_now) = {
        let r = fake.room.lock().unwrap();
        (r.state_id("m.room.create", "").unwrap(), r.state_id("m.room.power_levels", "").unwrap())
    };
    let mut auth = vec![pl_now, user7_join];
    if fake.room_version() != "12" {
        auth.push(create);
    }
    let topic = fake
        .build(EventSpec::state(&user7, "m.room.topic", "", json!({"topic": "from a banned user"})).with_auth(auth));
    fake.push(&[&topic.id]).await;
    let during = alice.state(&room, "m.room.topic", "").await;
    eprintln!("topic during partial state: {} {}", during.status, during.text);

    fake.release("state_ids");
    wait_resynced(&alice, &room).await;
    alice.state(&room, "m.room.topic", "").await.assert_err(404, "M_NOT_FOUND");
    alice.event(&room, &topic.id).await.assert_err(404, "M_NOT_FOUND");
    let state = alice.get(&format!("/rooms/{}/state", enc(&room))).await.ok();
    assert!(
        !state.as_array().unwrap().iter().any(|e| e["type"] == "m.room.topic"),
        "the banned user's topic is not in the room state"
    );
    let joined = joined_ids(&joined_members(&alice, &room).await.ok());
    assert!(!joined.contains(&user7), "user7 is banned, not joined");
    hearth.stop().await;
}

/// While partial, a kick by a member who in truth left before our join is accepted (we lack their leave). The
/// kicked member's own leave that follows it, citing their join, must not be rejected on that wrong state: as in
/// Synapse, our state before the event is resolved with the event's auth events (the join, applied after the
/// kick in the algorithm's order, wins), and the full state settles it when the resync ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leave_after_a_kick_wrongly_accepted_while_partial_is_accepted() {
    let hearth = start_hearth().await;
    let fake = FakeResident::start(RoomSpec::default()).await;
    fake.connect_to(&hearth);
    let (derek, elsie) = (fake.user("user7"), fake.user("user8"));
    let derek_join = fake.room.lock().unwrap().state_id("m.room.member", &derek).unwrap();
    grant_power(&fake, &derek, 100);
    fake.append(EventSpec::state(&derek, "m.room.member", &derek, json!({"membership": "leave"})));
    fake.hold("state_ids");
    let alice = hearth.user("alice").await;
    join_via(&alice, &fake).await;
    let room = fake.room_id();
    fake.wait_requests("state_ids", 1, LONG).await;

    let (create, pl, elsie_join) = {
        let r = fake.room.lock().unwrap();
        let id = |t: &str, k: &str| r.state_id(t, k).unwrap();
        (id("m.room.create", ""), id("m.room.power_levels", ""), id("m.room.member", &elsie))
    };
    let with_create = |mut auth: Vec<String>| {
        if fake.room_version() != "12" {
            auth.push(create.clone());
        }
        auth
    };
    let kick = fake.build(
        EventSpec::state(&derek, "m.room.member", &elsie, json!({"membership": "leave"}))
            // As Complement's "incorrectly kicked" tests build it: the kicked member's join is not cited (were it,
            // the algorithm would order it before the kick, and the kick would win).
            .with_auth(with_create(vec![pl.clone(), derek_join])),
    );
    assert_eq!(fake.push(&[&kick.id]).await[&kick.id], json!({}));
    alice.event(&room, &kick.id).await.ok();
    let leave = fake.build(
        EventSpec::state(&elsie, "m.room.member", &elsie, json!({"membership": "leave"}))
            .with_auth(with_create(vec![pl, elsie_join]))
            .with_prev(vec![kick.id.clone()]),
    );
    assert_eq!(fake.push(&[&leave.id]).await[&leave.id], json!({}));
    alice.event(&room, &leave.id).await.ok();

    fake.release("state_ids");
    wait_resynced(&alice, &room).await;
    alice.event(&room, &leave.id).await.ok();
    assert_eq!(alice.state(&room, "m.room.member", &elsie).await.ok()["membership"], "leave");
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_join_of_a_v12_room_completes() {
    let (hearth, fake, alice) = partially_joined(RoomSpec { version: "12".into(), ..Default::default() }).await;
    let room = fake.room_id();
    assert!(!room.contains(':'), "v12 room ids have no server part: {room}");
    let ev = alice.send_text(&room, "hello v12").await;
    fake.wait_received(&ev, Duration::from_secs(10)).await;
    let m = fake.append(EventSpec::message(&fake.user("user9"), "hi from user9"));
    assert_eq!(fake.push(&[&m.id]).await[&m.id], json!({}));
    alice.event(&room, &m.id).await.ok();
    fake.release("state_ids");
    assert_eq!(joined_ids(&wait_resynced(&alice, &room).await), expected_members(&fake));
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_wrongly_rejected_during_partial_state_is_accepted_after_resync() {
    let hearth = start_hearth().await;
    let fake = FakeResident::start(RoomSpec::default()).await;
    fake.connect_to(&hearth);
    let user8 = fake.user("user8");
    grant_power(&fake, &user8, 50);
    fake.hold("state_ids");
    let alice = hearth.user("alice").await;
    join_via(&alice, &fake).await;
    let room = fake.room_id();
    fake.wait_requests("state_ids", 1, LONG).await;

    // user8 (power 50) sets the topic: valid. But user8's membership was omitted from the partial state and the
    // resident will not serve it now, so Hearth cannot authorise the topic yet.
    let user8_join = fake.room.lock().unwrap().state_id("m.room.member", &user8).unwrap();
    fake.hide(&[&user8_join]);
    let topic = fake.append(EventSpec::state(&user8, "m.room.topic", "", json!({"topic": "set by user8"})));
    fake.push(&[&topic.id]).await;
    let during = alice.state(&room, "m.room.topic", "").await;
    eprintln!("topic during partial state: {} {}", during.status, during.text);

    fake.unhide();
    fake.release("state_ids");
    wait_resynced(&alice, &room).await;
    let t = alice.state(&room, "m.room.topic", "").await.ok();
    assert_eq!(
        t["topic"], "set by user8",
        "the topic is accepted once the full state shows user8 joined with power 50"
    );
    alice.event(&room, &topic.id).await.ok();
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_ids_with_invented_members_falls_back_to_another_server() {
    let hearth = start_hearth().await;
    let fake = FakeResident::start(RoomSpec::default()).await;
    let peer = fake.start_peer().await;
    let bob = peer.user("bob");
    fake.append(EventSpec::member(&bob, "join"));
    fake.connect_to(&hearth);
    // Consistent with what send_join gave (the non-member state is right) but the members are invented.
    fake.set_state_ids_mode(StateIdsMode::BogusMembers);

    let alice = hearth.user("alice").await;
    join_via(&alice, &fake).await;
    let room = fake.room_id();
    let joined = wait_resynced(&alice, &room).await;
    assert_eq!(joined_ids(&joined), expected_members(&fake), "the member list came from the other server");
    assert!(peer.count("state_ids") >= 1, "the other server in servers_in_room was asked for /state_ids");
    hearth.stop().await;
}

/// The room's creator gives `user` power `level` (a new power levels event in the fake's DAG); its id.
fn grant_power(fake: &FakeResident, user: &str, level: i64) -> String {
    let pl_id = fake.room.lock().unwrap().state_id("m.room.power_levels", "").unwrap();
    let mut pl = fake.event(&pl_id).unwrap().json["content"].clone();
    pl["users"][user] = json!(level);
    fake.append(EventSpec::state(&fake.creator(), "m.room.power_levels", "", pl)).id
}

/// Device keys for `c`'s device (enough for Hearth to store and announce them).
fn device_keys(c: &Client) -> Value {
    json!({
        "user_id": c.user_id, "device_id": c.device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {format!("curve25519:{}", c.device_id): "curve", format!("ed25519:{}", c.device_id): "ed"},
        "signatures": {},
    })
}

fn device_updates_for(f: &FakeResident, user: &str) -> Vec<Value> {
    f.edus_of("m.device_list_update").into_iter().filter(|c| c["user_id"] == user).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_list_updates_during_partial_state_reach_servers_in_room_then_the_rest() {
    let hearth = start_hearth().await;
    let fake = FakeResident::start(RoomSpec::default()).await;
    // A second server with a member in the room, which the resident leaves out of servers_in_room.
    let peer = fake.start_peer().await;
    let bob = peer.user("bob");
    fake.append(EventSpec::member(&bob, "join"));
    fake.set_servers_in_room(Some(vec![fake.name.clone()]));
    fake.connect_to(&hearth);
    fake.hold("state_ids");
    let alice = hearth.user("alice").await;
    let since = alice.sync(None, &[]).await.ok()["next_batch"].as_str().unwrap().to_owned();
    join_via(&alice, &fake).await;
    let room = fake.room_id();
    fake.wait_requests("state_ids", 1, LONG).await;

    // Outbound: a device of alice's changes while the room is partial: the servers in servers_in_room hear of it.
    alice.post("/keys/upload", json!({"device_keys": device_keys(&alice)})).await.ok();
    fake.wait_until("alice's device list update at the resident", Duration::from_secs(10), |f| {
        !device_updates_for(f, &alice.user_id).is_empty()
    })
    .await;
    let update = &device_updates_for(&fake, &alice.user_id)[0];
    assert_eq!(update["device_id"], json!(alice.device_id));
    assert_eq!(update["keys"]["keys"][format!("curve25519:{}", alice.device_id)], "curve", "{update}");
    // Everything queued with that update has been delivered: had the peer been sent it, the peer would have it.
    wait_outbox_drained(&hearth, &[&fake.name, &peer.name], LONG).await;
    assert!(device_updates_for(&peer, &alice.user_id).is_empty(), "the peer is not known to be in the room yet");

    // Inbound: an omitted member of the resident's server changes devices while we are partial.
    let carol = fake.user("user3");
    let edu = json!({"edu_type": "m.device_list_update", "content": {
        "user_id": carol, "device_id": "CAROLDEV", "stream_id": 7, "prev_id": [], "deleted": false}});
    fake.push_json(vec![], vec![edu]).await.expect("transaction accepted");
    // And another omitted member's cross-signing keys change (a signing key update is accepted while partial).
    let erin = fake.user("user4");
    let master = json!({"user_id": erin, "usage": ["master"], "keys": {"ed25519:erinmaster": "erinmaster"}});
    let edu = json!({"edu_type": "m.signing_key_update", "content": {"user_id": erin, "master_key": master}});
    fake.push_json(vec![], vec![edu]).await.expect("transaction accepted");
    assert_eq!(fake.count("state"), 0, "all this while the resync was held");

    // After the resync: the peer, learned from the full state, gets alice's device; alice's sync lists the
    // members whose device lists she must (re)fetch, the omitted ones included.
    fake.release("state_ids");
    wait_resynced(&alice, &room).await;
    peer.wait_until("alice's device list update at the peer", Duration::from_secs(10), |p| {
        device_updates_for(p, &alice.user_id).iter().any(|c| c["device_id"] == json!(alice.device_id))
    })
    .await;
    let s = alice.sync(Some(&since), &[]).await.ok();
    let changed: Vec<&str> =
        s["device_lists"]["changed"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    for u in [carol.as_str(), erin.as_str(), bob.as_str(), fake.creator().as_str()] {
        assert!(changed.contains(&u), "{u} in device_lists.changed: {changed:?}");
    }
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edus_aliases_and_profile_changes_work_during_resync() {
    let (hearth, fake, alice) = partially_joined(RoomSpec::default()).await;
    let room = fake.room_id();
    let since = alice.sync(None, &[("filter", &lazy_filter())]).await.ok()["next_batch"].as_str().unwrap().to_owned();

    // Typing, a read receipt and a to-device message from an omitted member reach alice.
    let user1 = fake.user("user1");
    let last = fake.append(EventSpec::message(&user1, "read me"));
    fake.push(&[&last.id]).await;
    let edus = vec![
        json!({"edu_type": "m.typing", "content": {"room_id": room, "user_id": user1, "typing": true}}),
        json!({"edu_type": "m.receipt", "content": {room.clone(): {"m.read": {user1.clone(): {
            "event_ids": [last.id], "data": {"ts": 1}}}}}}),
        json!({"edu_type": "m.direct_to_device", "content": {"sender": user1, "type": "m.partial.test",
            "message_id": "m1", "messages": {alice.user_id.clone(): {alice.device_id.clone(): {"hello": "partial"}}}}}),
    ];
    fake.push_json(vec![], edus).await.expect("transaction accepted");
    let s = alice.sync(Some(&since), &[("filter", &lazy_filter())]).await.ok();
    let eph = events_of(&s["rooms"]["join"][&room]["ephemeral"]);
    let typing = eph.iter().find(|e| e["type"] == "m.typing").expect("typing in ephemeral");
    assert_eq!(typing["content"]["user_ids"], json!([user1]));
    let receipt = eph.iter().find(|e| e["type"] == "m.receipt").expect("receipt in ephemeral");
    assert!(receipt["content"][&last.id]["m.read"].get(&user1).is_some(), "{receipt}");
    let td = events_of(&s["to_device"]);
    assert!(td.iter().any(|e| e["type"] == "m.partial.test" && e["content"]["hello"] == "partial"), "{td:?}");

    // Aliases can be added, read and deleted.
    let alias = format!("#partial:{}", hearth.server_name);
    within(Duration::from_secs(10), alice.put(&format!("/directory/room/{}", enc(&alias)), json!({"room_id": room})))
        .await
        .expect("adding an alias does not wait")
        .ok();
    assert_eq!(alice.get(&format!("/directory/room/{}", enc(&alias))).await.ok()["room_id"], json!(room));
    alice.delete(&format!("/directory/room/{}", enc(&alias)), json!({})).await.ok();
    alice.get(&format!("/directory/room/{}", enc(&alias))).await.assert_err(404, "M_NOT_FOUND");

    // A display name change does not wait for the resync, and the resident gets the new member event.
    within(
        Duration::from_secs(10),
        alice.put(&format!("/profile/{}/displayname", enc(&alice.user_id)), json!({"displayname": "Alice P."})),
    )
    .await
    .expect("setting a display name does not wait")
    .ok();
    fake.wait_until("alice's new display name at the resident", Duration::from_secs(10), |f| {
        f.received().iter().any(|(_, p)| {
            p["type"] == "m.room.member"
                && p["state_key"] == json!(alice.user_id)
                && p["content"]["displayname"] == "Alice P."
        })
    })
    .await;
    assert_eq!(fake.count("state"), 0, "all this while the resync was held");

    fake.release("state_ids");
    let joined = wait_resynced(&alice, &room).await;
    assert_eq!(joined["joined"][&alice.user_id]["display_name"], "Alice P.");
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_kick_and_ban_during_resync_apply() {
    let (hearth, fake, alice) = partially_joined(RoomSpec::default()).await;
    let room = fake.room_id();
    let creator = fake.creator();

    // The resident kicks alice while her room is partial: she is out at once.
    let kick = fake.append(EventSpec::state(&creator, "m.room.member", &alice.user_id, json!({"membership": "leave"})));
    assert_eq!(fake.push(&[&kick.id]).await[&kick.id], json!({}));
    let jr = alice.get("/joined_rooms").await.ok();
    assert!(!jr["joined_rooms"].as_array().unwrap().contains(&json!(room)), "kicked: {jr}");
    alice
        .send(&room, "m.room.message", json!({"msgtype": "m.text", "body": "still here?"}))
        .await
        .assert_err(403, "M_FORBIDDEN");

    // Then bans her: a rejoin is refused with 403.
    let ban = fake.append(EventSpec::state(&creator, "m.room.member", &alice.user_id, json!({"membership": "ban"})));
    assert_eq!(fake.push(&[&ban.id]).await[&ban.id], json!({}));
    let path = format!("/join/{}?server_name={}", enc(&room), enc(&fake.name));
    alice.post(&path, json!({})).await.assert_err(403, "M_FORBIDDEN");
    fake.release("state_ids");
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_with_half_missing_parents_and_grandparents_take_the_state_at_the_gap() {
    let (hearth, fake, alice) = partially_joined(RoomSpec::default()).await;
    let room = fake.room_id();
    let creator = fake.creator();
    let known = fake.room.lock().unwrap().extremities.clone();

    // Half-missing parents: B cites a known event and A, which get_missing_events will not return. A changed
    // the topic. B was pushed to us: as Synapse, a pushed event whose parents its sender does not give is refused
    // (its state would be the sender's word alone), not placed on state asked for at A.
    let a = fake.append(EventSpec::state(&creator, "m.room.topic", "", json!({"topic": "from the missing branch"})));
    fake.withhold_from_missing_events(&[&a.id]);
    fake.free_state_ids_at(&[&a.id]);
    let mut prevs = known.clone();
    prevs.push(a.id.clone());
    let b = fake.append(EventSpec::message(&fake.user("user1"), "half-missing parents").with_prev(prevs));
    let answer = fake.push(&[&b.id]).await;
    assert!(answer[&b.id]["error"].is_string(), "{answer}");
    alice.event(&room, &b.id).await.assert_err(404, "M_NOT_FOUND");
    assert!(!fake.requests_of("state_ids").iter().any(|r| r.detail == a.id), "no state asked for a pushed event");

    // Half-missing grandparents: C's parent D is returned by get_missing_events, and with it B; D cites B and G,
    // and B cites A, both withheld. G renamed the room. B and D were pulled, not pushed: the state at A and G
    // comes from /state_ids there, so their branches' state counts.
    let g = fake.append(EventSpec::state(&creator, "m.room.name", "", json!({"name": "grandparent branch"})));
    fake.withhold_from_missing_events(&[&g.id]);
    fake.free_state_ids_at(&[&g.id]);
    let d = fake.append(EventSpec::message(&fake.user("user2"), "parent").with_prev(vec![b.id.clone(), g.id.clone()]));
    let c = fake.append(EventSpec::message(&fake.user("user5"), "half-missing grandparents"));
    assert_eq!(c.prev, vec![d.id.clone()]);
    assert_eq!(fake.push(&[&c.id]).await[&c.id], json!({}));
    assert!(fake.requests_of("state_ids").iter().any(|r| r.detail == g.id), "state at the missing grandparent");
    assert!(fake.requests_of("state_ids").iter().any(|r| r.detail == a.id), "state at the missing parent");
    for ev in [&b, &d, &c] {
        assert_eq!(alice.event(&room, &ev.id).await.ok()["content"]["body"], ev.json["content"]["body"]);
    }
    assert_eq!(alice.state(&room, "m.room.name", "").await.ok()["name"], "grandparent branch");
    let topic = alice.state(&room, "m.room.topic", "").await.ok();
    assert_eq!(topic["topic"], "from the missing branch", "the missing branch's state counts");
    assert_eq!(fake.count("state"), 0, "all this while the resync was held");

    // The resync completes on top of it, and the state learned across the gaps stays.
    fake.release("state_ids");
    assert_eq!(joined_ids(&wait_resynced(&alice, &room).await), expected_members(&fake));
    assert_eq!(alice.state(&room, "m.room.topic", "").await.ok()["topic"], "from the missing branch");
    assert_eq!(alice.state(&room, "m.room.name", "").await.ok()["name"], "grandparent branch");
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_completes_with_100_outliers_fetched_during_partial_state() {
    let (hearth, fake, alice) = partially_joined(RoomSpec { members: 150, ..Default::default() }).await;
    let room = fake.room_id();
    // 100 omitted members speak while the room is partial: Hearth fetches each one's membership (an auth event
    // of the message) as an outlier.
    let messages: Vec<FakeEvent> =
        (1..=100).map(|n| fake.append(EventSpec::message(&fake.user(&format!("user{n}")), &format!("m{n}")))).collect();
    for chunk in messages.chunks(50) {
        let ids: Vec<&str> = chunk.iter().map(|m| m.id.as_str()).collect();
        let answer = fake.push(&ids).await;
        for id in ids {
            assert_eq!(answer[id], json!({}), "{answer}");
        }
    }
    let member_ids: Vec<String> = {
        let r = fake.room.lock().unwrap();
        (1..=100).map(|n| r.state_id("m.room.member", &fake.user(&format!("user{n}"))).unwrap()).collect()
    };
    let fetched =
        |f: &FakeResident| f.requests_of("event").into_iter().filter(|r| member_ids.contains(&r.detail)).count();
    assert_eq!(fetched(&fake), 100, "each speaker's membership fetched once");
    assert_eq!(alice.event(&room, &messages[99].id).await.ok()["content"]["body"], "m100");

    fake.release("state_ids");
    assert_eq!(joined_ids(&wait_resynced(&alice, &room).await), expected_members(&fake));
    assert_eq!(fetched(&fake), 100, "the resync did not fetch the outliers it held again");
    for m in [&messages[0], &messages[49], &messages[99]] {
        assert_eq!(alice.event(&room, &m.id).await.ok()["content"]["body"], m.json["content"]["body"]);
    }
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_lists_after_resync_follow_the_full_state() {
    let hearth = start_hearth().await;
    let fake = FakeResident::start(RoomSpec::default()).await;
    let (creator, user7) = (fake.creator(), fake.user("user7"));
    // peer1's bob is in the room; peer2's dave joined and left, but the resident lists peer2 in servers_in_room.
    let (peer1, peer2) = (fake.start_peer().await, fake.start_peer().await);
    let (bob, dave) = (peer1.user("bob"), peer2.user("dave"));
    let bob_join = fake.append(EventSpec::member(&bob, "join")).id;
    fake.append(EventSpec::member(&dave, "join"));
    fake.append(EventSpec::member(&dave, "leave"));
    // user7 gets power 50 (enough to kick), then is banned: among the omitted members, so partial state
    // cannot tell.
    let user7_join = fake.room.lock().unwrap().state_id("m.room.member", &user7).unwrap();
    let pl_now = grant_power(&fake, &user7, 50);
    fake.append(EventSpec::state(&creator, "m.room.member", &user7, json!({"membership": "ban"})));
    fake.set_servers_in_room(Some(vec![fake.name.clone(), peer1.name.clone(), peer2.name.clone()]));
    fake.connect_to(&hearth);
    fake.hold("state_ids");
    let alice = hearth.user("alice").await;
    join_via(&alice, &fake).await;
    let room = fake.room_id();
    fake.wait_requests("state_ids", 1, LONG).await;

    // The banned user7 "kicks" bob, citing the memberships partial state lacks: accepted while partial.
    let create = fake.room.lock().unwrap().state_id("m.room.create", "").unwrap();
    let mut auth = vec![pl_now, user7_join, bob_join];
    if fake.room_version() != "12" {
        auth.push(create);
    }
    let kick =
        fake.build(EventSpec::state(&user7, "m.room.member", &bob, json!({"membership": "leave"})).with_auth(auth));
    fake.push(&[&kick.id]).await;
    let during = alice.state(&room, "m.room.member", &bob).await;
    eprintln!("bob's membership during partial state: {} {}", during.status, during.text);

    fake.release("state_ids");
    let joined = joined_ids(&wait_resynced(&alice, &room).await);
    assert!(joined.contains(&bob), "the kick is rejected under the full state: {joined:?}");
    assert!(!joined.contains(&dave), "{joined:?}");

    // A device change after the resync: bob's wrongly kicked server hears of it, dave's departed one does not.
    alice.post("/keys/upload", json!({"device_keys": device_keys(&alice)})).await.ok();
    peer1
        .wait_until("alice's device list update at the wrongly kicked server", Duration::from_secs(10), |p| {
            device_updates_for(p, &alice.user_id).iter().any(|c| c["device_id"] == json!(alice.device_id))
        })
        .await;
    fake.wait_until("alice's device list update at the resident", Duration::from_secs(10), |f| {
        !device_updates_for(f, &alice.user_id).is_empty()
    })
    .await;
    // Everything queued with those updates has been delivered: had peer2 been sent one, it would have it.
    wait_outbox_drained(&hearth, &[&fake.name, &peer1.name, &peer2.name], LONG).await;
    assert!(device_updates_for(&peer2, &alice.user_id).is_empty(), "the departed server gets no updates");
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gappy_lazy_sync_after_resync_includes_members_learned_late() {
    let (hearth, fake, alice) = partially_joined(RoomSpec::default()).await;
    let room = fake.room_id();
    let since = alice.sync(None, &[("filter", &lazy_filter())]).await.ok()["next_batch"].as_str().unwrap().to_owned();
    fake.release("state_ids");
    wait_resynced(&alice, &room).await;

    // user9's membership was learned by the resync only; then user9 speaks more than the timeline shows.
    let user9 = fake.user("user9");
    let msgs: Vec<FakeEvent> = (0..5).map(|n| fake.append(EventSpec::message(&user9, &format!("late {n}")))).collect();
    fake.push(&msgs.iter().map(|m| m.id.as_str()).collect::<Vec<_>>()).await;
    let filter = json!({"room": {"state": {"lazy_load_members": true}, "timeline": {"limit": 2}}}).to_string();
    let s = alice.sync(Some(&since), &[("filter", &filter)]).await.ok();
    let r = &s["rooms"]["join"][&room];
    assert_eq!(r["timeline"]["limited"], json!(true), "a gappy sync: {r}");
    assert_eq!(memberships_in(r).get(&user9).map(String::as_str), Some("join"), "user9's membership: {r}");
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_rejects_listed_state_that_its_own_auth_events_do_not_allow() {
    let hearth = start_hearth().await;
    let fake = FakeResident::start(RoomSpec::default()).await;
    fake.connect_to(&hearth);
    // The resident's state at the join lists, instead of user4's join, a ban of user4 by powerless user3: a
    // properly signed event that the room's auth rules forbid.
    let (user3, user4) = (fake.user("user3"), fake.user("user4"));
    let user4_join = fake.room.lock().unwrap().state_id("m.room.member", &user4).unwrap();
    let forged = fake.build(EventSpec::state(&user3, "m.room.member", &user4, json!({"membership": "ban"})));
    fake.substitute_state(&user4_join, &forged.id);

    let alice = hearth.user("alice").await;
    join_via(&alice, &fake).await;
    let room = fake.room_id();
    let joined = joined_ids(&wait_resynced(&alice, &room).await);
    assert!(fake.requests_of("event").iter().any(|r| r.detail == forged.id), "the forged ban was fetched");
    let m = alice.state(&room, "m.room.member", &user4).await;
    assert!(!m.text.contains("\"ban\""), "the forbidden ban is not user4's membership: {} {}", m.status, m.text);
    let mut expected: Vec<String> = expected_members(&fake).into_iter().filter(|u| *u != user4).collect();
    expected.sort();
    assert_eq!(joined, expected, "everyone else, as listed");
    // The room works as before.
    let ev = alice.send_text(&room, "after the resync").await;
    fake.wait_received(&ev, Duration::from_secs(10)).await;
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_through_single_events_fetches_their_auth_events_too() {
    let hearth = start_hearth().await;
    let fake = FakeResident::start(RoomSpec::default()).await;
    fake.connect_to(&hearth);
    // user5 left and came back: the current join cites the leave, which cites the first join; neither is
    // in the state, and few events are missing, so the resync fetches them one by one with /event.
    let user5 = fake.user("user5");
    let leave = fake.append(EventSpec::member(&user5, "leave"));
    fake.append(EventSpec::member(&user5, "join"));
    let alice = hearth.user("alice").await;
    join_via(&alice, &fake).await;
    let room = fake.room_id();
    let joined = joined_ids(&wait_resynced(&alice, &room).await);
    assert_eq!(fake.count("state"), 0, "the resync used /event, not /state");
    assert!(fake.requests_of("event").iter().any(|r| r.detail == leave.id), "the rejoin's auth event was fetched");
    assert!(joined.contains(&user5), "user5's rejoin is accepted: its auth events were fetched and checked");
    assert_eq!(joined, expected_members(&fake));
    hearth.stop().await;
}
