//! Federation attacks (issue #8, "Federation attacks"), each against a scripted remote server
//! (`tests/common/fake_resident.rs`): huge gaps and prev_events lists, `get_missing_events` answers that never end
//! or are huge, huge `/state` answers, a remote answering with an endless body, slow-loris connections to our
//! federation listener, server ACLs on the resident endpoints, and outbound requests to private addresses
//! (directly, through `.well-known` delegation and redirects, and through SRV records served by a fake DNS server on
//! loopback). Each is bounded and refused without blocking other rooms or clients.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fake_resident::*;
use common::*;
use hearth::federation::client::{FedError, MAX_RESPONSE_BYTES};
use hearth::federation::FedClient;
use ruma::canonical_json::CanonicalJsonObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LONG: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;

/// Hearth (full joins), with the fakes' names resolvable, and `alice` joined to each fake's room.
async fn joined(fakes: &[&FakeResident]) -> (TestServer, Client) {
    let hearth = start_hearth_with_fakes(fakes, |c| c.federation.lazy_joins = false).await;
    let alice = hearth.user("alice").await;
    for f in fakes {
        let joined = join_via(&alice, f).await;
        assert_eq!(joined["room_id"], json!(f.room_id()));
    }
    (hearth, alice)
}

fn db(h: &TestServer) -> rusqlite::Connection {
    rusqlite::Connection::open_with_flags(&h.db_path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open database")
}

fn is_stored(h: &TestServer, event_id: &str) -> bool {
    db(h).query_row("SELECT count(*) FROM events WHERE event_id = ?1", [event_id], |r| r.get::<_, i64>(0)).unwrap() > 0
}

fn events_in_room(h: &TestServer, room_id: &str) -> i64 {
    db(h)
        .query_row("SELECT count(*) FROM events e JOIN rooms r USING (room_nid) WHERE r.room_id = ?1", [room_id], |r| {
            r.get(0)
        })
        .unwrap()
}

/// The server still serves clients, quickly: alice sends to a room of her own, reads it back and syncs.
async fn still_serving(alice: &Client) -> Duration {
    let started = Instant::now();
    let room = alice.create_room(json!({"name": "still here"})).await;
    let id = alice.send_text(&room, "still serving").await;
    alice.event(&room, &id).await.ok();
    alice.sync(None, &[("timeout", "0")]).await.ok();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "client requests took {took:?}");
    took
}

/// A federation client for discovery tests: private addresses refused unless `allow_private`, certificates not
/// verified (the fakes' are self-signed), and `dns` standing in for public DNS.
fn discovery_client(allow_private: bool, dns: &[(&str, SocketAddr)]) -> FedClient {
    srv_discovery_client(allow_private, dns, None)
}

/// [`discovery_client`] asking `dns_server` for SRV records.
fn srv_discovery_client(allow_private: bool, dns: &[(&str, SocketAddr)], dns_server: Option<&FakeDns>) -> FedClient {
    init_crypto();
    let cfg = hearth::config::Federation {
        verify_certificates: false,
        allow_private_ips: allow_private,
        trusted_key_servers: vec![],
        dns_servers: dns_server.map(|d| vec![d.addr]).unwrap_or_default(),
        ..Default::default()
    };
    FedClient::with_static_dns(hearth_identity("prober.example"), cfg, dns).expect("federation client")
}

/// A signing identity for Hearth's own federation client under test (the client, not the fake, is probed here).
fn hearth_identity(server_name: &str) -> Arc<hearth::room::Identity> {
    use base64::Engine;
    let der = ruma::signatures::Ed25519KeyPair::generate();
    let keypair = ruma::signatures::Ed25519KeyPair::from_der(&der, "probe1".into()).expect("generated key parses");
    let public_key_b64 = base64::engine::general_purpose::STANDARD_NO_PAD.encode(keypair.public_key());
    Arc::new(hearth::room::Identity {
        server_name: ruma::ServerName::parse(server_name).expect("valid server name"),
        keypair,
        key_id: "ed25519:probe1".into(),
        public_key_b64,
    })
}

/// A DNS server on loopback (UDP) answering SRV questions from a table, NXDOMAIN for everything else.
struct FakeDns {
    addr: SocketAddr,
    queries: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeDns {
    /// `records`: (`_service._tcp.name`, priority, weight, port, target).
    async fn start(records: &[(&str, u16, u16, u16, &str)]) -> FakeDns {
        use hickory_resolver::proto::op::{Message, OpCode, ResponseCode};
        use hickory_resolver::proto::rr::{rdata::SRV, Name, RData, Record};
        let table: Vec<(String, u16, u16, u16, String)> = records
            .iter()
            .map(|(n, p, w, port, t)| (format!("{}.", n.trim_end_matches('.')), *p, *w, *port, t.to_string()))
            .collect();
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let queries: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let seen = queries.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 1500];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else { return };
                let Ok(query) = Message::from_vec(&buf[..n]) else { continue };
                let mut answer = Message::response(query.metadata.id, OpCode::Query);
                answer.metadata.recursion_desired = query.metadata.recursion_desired;
                answer.metadata.recursion_available = true;
                for q in &query.queries {
                    let name = q.name().to_ascii().to_lowercase();
                    seen.lock().unwrap().push(name.clone());
                    answer.add_query(q.clone());
                    for (_, p, w, port, t) in table.iter().filter(|r| r.0 == name) {
                        let target = Name::from_ascii(t).unwrap();
                        let srv = RData::SRV(SRV::new(*p, *w, *port, target));
                        answer.add_answer(Record::from_rdata(q.name().clone(), 300, srv));
                    }
                }
                if answer.answers.is_empty() {
                    answer.metadata.response_code = ResponseCode::NXDomain;
                }
                let _ = socket.send_to(&answer.to_vec().unwrap(), from).await;
            }
        });
        FakeDns { addr, queries, task }
    }

    fn asked(&self, name: &str) -> bool {
        self.queries.lock().unwrap().iter().any(|q| q.trim_end_matches('.') == name)
    }
}

impl Drop for FakeDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---- gaps and prev_events ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gap_of_10000_unknown_events_is_filled_boundedly() {
    let fake = FakeResident::start(RoomSpec::default()).await;
    let (hearth, alice) = joined(&[&fake]).await;
    let room = fake.room_id();
    let before = events_in_room(&hearth, &room);

    // 10 000 events Hearth never hears of, then one on top of them.
    let built = Instant::now();
    {
        let mut r = fake.room.lock().unwrap();
        let creator = r.creator.clone();
        for i in 0..10_000 {
            r.append(EventSpec::message(&creator, &format!("unseen {i}")));
        }
    }
    eprintln!("built 10 000 events in {:?}", built.elapsed());
    let tip = fake.append(EventSpec::message(&fake.creator(), "the tip"));
    let started = Instant::now();
    let answer = fake.push(&[&tip.id]).await;
    let took = started.elapsed();
    assert_eq!(answer[&tip.id], json!({}), "{answer}");
    assert!(took < Duration::from_secs(15), "the gap was not walked: {took:?}");

    // One get_missing_events with a small limit, and no fetching of the 10 000 one by one.
    let gme = fake.requests_of("get_missing_events");
    assert_eq!(gme.len(), 1, "{gme:?}");
    let asked: Value = serde_json::from_str(&gme[0].detail).unwrap();
    assert!(asked["limit"].as_u64().is_some_and(|l| l <= 100), "{asked}");
    assert!(fake.count("event") <= 20, "{} /event requests", fake.count("event"));
    // Where the answer ends, the gap stays open: Hearth asks once for the state there (and fetches the event at
    // the edge), as Synapse does; nothing walks further.
    assert!(fake.count("state_ids") <= 1, "{} /state_ids requests", fake.count("state_ids"));
    assert_eq!(fake.count("backfill") + fake.count("state"), 0);
    let stored = events_in_room(&hearth, &room) - before;
    assert!(stored <= 1 + 20 + 1, "at most the tip, one get_missing_events answer and its edge, not {stored}");

    // The tip is accepted; the room and the server keep working.
    assert_eq!(alice.event(&room, &tip.id).await.ok()["content"]["body"], "the tip");
    let next = fake.append(EventSpec::message(&fake.creator(), "after the gap"));
    assert_eq!(fake.push(&[&next.id]).await[&next.id], json!({}));
    alice.send_text(&room, "alice is still here").await;
    still_serving(&alice).await;
    hearth.stop().await;
}

/// What a client sees of a gap left open: an incremental sync shows only what follows it, as a limited
/// timeline (so the client paginates), never the events from before the gap mixed with those after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gap_left_open_shows_as_a_limited_timeline() {
    let fake = FakeResident::start(RoomSpec::default()).await;
    let (hearth, alice) = joined(&[&fake]).await;
    let room = fake.room_id();
    let filter = json!({"room": {"timeline": {"limit": 20}}}).to_string();
    let since = alice.sync(None, &[("filter", &filter)]).await.ok()["next_batch"].as_str().unwrap().to_owned();
    alice.send_text(&room, "before the gap").await;
    {
        let mut r = fake.room.lock().unwrap();
        let creator = r.creator.clone();
        for i in 0..30 {
            r.append(EventSpec::message(&creator, &format!("unseen {i}")));
        }
    }
    fake.set_missing_events_limit(Some(5));
    let tip = fake.append(EventSpec::message(&fake.creator(), "the tip"));
    assert_eq!(fake.push(&[&tip.id]).await[&tip.id], json!({}));

    let r = alice.sync(Some(&since), &[("filter", &filter)]).await.ok();
    let timeline = &r["rooms"]["join"][&room]["timeline"];
    assert_eq!(timeline["limited"], true, "{timeline}");
    let events = events_of(timeline);
    assert_eq!(events.last().unwrap()["event_id"], json!(tip.id), "{timeline}");
    assert!(events.iter().all(|e| e["sender"] != alice.user_id.as_str()), "nothing from before the gap: {timeline}");
    // Without a gap, an incremental sync is not limited.
    let next = r["next_batch"].as_str().unwrap().to_owned();
    alice.send_text(&room, "after the gap").await;
    let r = alice.sync(Some(&next), &[("filter", &filter)]).await.ok();
    assert_eq!(r["rooms"]["join"][&room]["timeline"]["limited"], false, "{}", r["rooms"]);
    hearth.stop().await;
}

/// A member's long run of profile changes arrives at its tip only: each change is authorised by the one before, a
/// chain longer than one walk of auth-event fetches reaches. What the walk could not reach is not "rejected": the
/// chain is completed (by /get_missing_events and the state at the gap) and the tip is accepted with its state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_auth_chain_behind_a_gap_is_completed_not_rejected() {
    let fake = FakeResident::start(RoomSpec::default()).await;
    let (hearth, alice) = joined(&[&fake]).await;
    let room = fake.room_id();
    let creator = fake.creator();
    let mut last = None;
    for i in 0..60 {
        let content = json!({"membership": "join", "displayname": format!("name {i}")});
        last = Some(fake.append(EventSpec::state(&creator, "m.room.member", &creator, content)));
        // Our join stays a forward extremity (what follows it arrives as outliers), so the current state is the
        // resolution of it and the tip, which orders same-mainline events by timestamp: make them distinct.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let tip = last.unwrap();
    fake.set_missing_events_limit(Some(10));
    assert_eq!(fake.push(&[&tip.id]).await[&tip.id], json!({}));
    assert_eq!(alice.event(&room, &tip.id).await.ok()["content"]["displayname"], "name 59");
    assert_eq!(alice.state(&room, "m.room.member", &creator).await.ok()["displayname"], "name 59");
    still_serving(&alice).await;
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prev_events_pointing_to_thousands_of_unknown_events_are_refused_without_fetching() {
    let fake = FakeResident::start(RoomSpec::default()).await;
    let (hearth, alice) = joined(&[&fake]).await;
    let auth: Vec<String> = {
        let r = fake.room.lock().unwrap();
        ["m.room.create", "m.room.power_levels"]
            .iter()
            .filter_map(|t| r.state_id(t, ""))
            .chain(r.state_id("m.room.member", &r.creator))
            .collect()
    };
    let unknown = |n: usize| -> Vec<String> { (0..n).map(|i| format!("$unknownprev{i:0>32}")).collect() };

    // 1000 unknown prev events (fits in 65536 bytes) and 10 000 (does not: signed without the size check).
    let thousand = fake.build(
        EventSpec::message(&fake.creator(), "a thousand parents").with_prev(unknown(1000)).with_auth(auth.clone()),
    );
    let rules = rules(&fake.room_version());
    let mut obj: CanonicalJsonObject = serde_json::from_value(thousand.json.clone()).unwrap();
    obj.insert("prev_events".into(), serde_json::from_value(json!(unknown(10_000))).unwrap());
    obj.insert(
        "content".into(),
        serde_json::from_value(json!({"msgtype": "m.text", "body": "ten thousand parents"})).unwrap(),
    );
    sign_unchecked(&fake.identity, &rules, &mut obj);
    let ten_thousand_id = event_id_unchecked(&rules, &obj);
    let ten_thousand = serde_json::to_value(&obj).unwrap();

    let started = Instant::now();
    let answer = fake.push_json(vec![thousand.json.clone(), ten_thousand], vec![]).await.expect("transaction answered");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    assert!(answer["pdus"][&thousand.id]["error"].as_str().is_some_and(|e| e.contains("prev_events")), "{answer}");
    assert_ne!(answer["pdus"].get(&ten_thousand_id), Some(&json!({})), "{answer}");
    assert!(!is_stored(&hearth, &thousand.id) && !is_stored(&hearth, &ten_thousand_id));
    assert_eq!(
        fake.count("get_missing_events") + fake.count("event") + fake.count("state_ids"),
        0,
        "nothing was fetched: {:?}",
        fake.requests()
    );
    still_serving(&alice).await;
    hearth.stop().await;
}

// ---- get_missing_events answers that never end, or are huge -----------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_missing_events_answer_that_never_ends_times_out_without_blocking_other_rooms() {
    let fake = FakeResident::start(RoomSpec::default()).await;
    let other = FakeResident::start(RoomSpec { members: 2, messages: 1, ..RoomSpec::default() }).await;
    let (hearth, alice) = joined(&[&fake, &other]).await;
    let room = fake.room_id();

    // The answer starts (200, JSON) and then drips one space every 200 ms, forever.
    fake.script("get_missing_events", Script::Drip(Duration::from_millis(200)));
    fake.append(EventSpec::message(&fake.creator(), "hidden parent"));
    let child = fake.append(EventSpec::message(&fake.creator(), "child"));
    let started = Instant::now();
    let ids = [child.id.as_str()];
    let (answer, during) = tokio::join!(fake.push(&ids), async {
        fake.wait_requests("get_missing_events", 1, LONG).await;
        // Meanwhile another server's room and the clients are served.
        let t = Instant::now();
        let m = other.append(EventSpec::message(&other.creator(), "other room flows"));
        assert_eq!(other.push(&[&m.id]).await[&m.id], json!({}));
        alice.event(&other.room_id(), &m.id).await.ok();
        still_serving(&alice).await;
        t.elapsed()
    });
    let took = started.elapsed();
    eprintln!("the transaction took {took:?}; other work during it {during:?}");
    assert!(during < Duration::from_secs(10), "other rooms were blocked: {during:?}");
    assert!(took < Duration::from_secs(45), "the dripping answer was not timed out: {took:?}");
    // Its parent stays unknown: as Synapse, the pushed event is refused (an error for it in the answer), not stored.
    assert!(answer[&child.id]["error"].is_string(), "{answer}");
    alice.event(&room, &child.id).await.assert_err(404, "M_NOT_FOUND");
    assert_eq!(fake.count("get_missing_events"), 1, "asked once");
    assert!(fake.streamed() < 1000, "the drip was cut off ({} bytes)", fake.streamed());
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_missing_events_answer_of_a_gigabyte_is_cut_at_the_size_cap() {
    let fake = FakeResident::start(RoomSpec::default()).await;
    let (hearth, alice) = joined(&[&fake]).await;
    let room = fake.room_id();

    // A body that never ends: Hearth stops reading at its response cap (50 MiB), far below 1 GB.
    fake.script("get_missing_events", Script::Endless);
    fake.append(EventSpec::message(&fake.creator(), "hidden parent"));
    let child = fake.append(EventSpec::message(&fake.creator(), "child"));
    let started = Instant::now();
    let answer = fake.push(&[&child.id]).await;
    let took = started.elapsed();
    let sent = fake.streamed();
    eprintln!("cut after {} MiB in {took:?}", sent / MIB);
    assert!(took < Duration::from_secs(30), "{took:?}");
    assert!(sent < MAX_RESPONSE_BYTES + 16 * MIB, "Hearth read {} MiB", sent / MIB);
    assert!(sent >= MAX_RESPONSE_BYTES / 2, "the cap, not something else, ended it ({} MiB)", sent / MIB);
    // Its parent stays unknown: as Synapse, the pushed event is refused (an error for it in the answer), not stored.
    assert!(answer[&child.id]["error"].is_string(), "{answer}");
    alice.event(&room, &child.id).await.assert_err(404, "M_NOT_FOUND");
    still_serving(&alice).await;
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_missing_events_answer_with_more_events_than_asked_for_is_truncated() {
    let fake = FakeResident::start(RoomSpec::default()).await;
    let (hearth, alice) = joined(&[&fake]).await;
    let room = fake.room_id();
    let before = events_in_room(&hearth, &room);

    // A gap of 300 events; the remote answers all of them whatever limit was asked for.
    fake.set_missing_events_limit(Some(300));
    let gap: Vec<FakeEvent> =
        (0..300).map(|i| fake.append(EventSpec::message(&fake.creator(), &format!("gap {i}")))).collect();
    let tip = fake.append(EventSpec::message(&fake.creator(), "tip"));
    let answer = fake.push(&[&tip.id]).await;
    assert_eq!(answer[&tip.id], json!({}), "{answer}");
    let asked: Value = serde_json::from_str(&fake.requests_of("get_missing_events")[0].detail).unwrap();
    let limit = asked["limit"].as_i64().unwrap();
    let stored_gap = gap.iter().filter(|e| is_stored(&hearth, &e.id)).count() as i64;
    // The answer kept (at most `limit`), and the event at its edge, fetched with the state there.
    assert!(stored_gap <= limit + 1, "{stored_gap} gap events stored, asked for {limit}");
    assert!(events_in_room(&hearth, &room) - before <= limit + 2);
    still_serving(&alice).await;
    hearth.stop().await;
}

// ---- huge answers elsewhere ----------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_server_answering_a_gigabyte_is_cut_and_its_requests_refused() {
    let fake = FakeResident::start(RoomSpec::default()).await;
    let hostile =
        FakeResident::start_named(RoomSpec { members: 0, messages: 0, ..RoomSpec::default() }, "hostile.example").await;
    // Hearth fetches the key of a server that signs a request to it: the key answer never ends.
    hostile.script("key", Script::Endless);
    let hearth = start_hearth_with_fakes(&[&fake, &hostile], |c| c.federation.lazy_joins = false).await;
    let alice = hearth.user("alice").await;
    join_via(&alice, &fake).await;
    let started = Instant::now();
    let (status, body) = hostile.push_json(vec![], vec![]).await.expect_err("the request cannot be verified");
    let took = started.elapsed();
    assert_eq!(status, 401, "{body}");
    assert!(took < Duration::from_secs(30), "{took:?}");
    let sent = hostile.streamed();
    assert!(sent < MAX_RESPONSE_BYTES + 16 * MIB, "Hearth read {} MiB of the key answer", sent / MIB);
    // Everyone else is served.
    let m = fake.append(EventSpec::message(&fake.creator(), "still federating"));
    assert_eq!(fake.push(&[&m.id]).await[&m.id], json!({}));
    still_serving(&alice).await;
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_state_answer_is_cut_at_the_file_cap_and_the_resync_falls_back_to_events() {
    // Enough members that the resync asks /state rather than single events.
    let fake = FakeResident::start(RoomSpec { members: 80, ..RoomSpec::default() }).await;
    let hearth = start_hearth_with_fakes(&[&fake], |_| {}).await;
    // The cap for answers streamed to disk is 1 GiB; a test lowers it rather than write a gigabyte.
    let cap = 4 * MIB;
    hearth.running.services.federation.as_ref().unwrap().client.set_size_caps(MAX_RESPONSE_BYTES, cap);
    fake.script("state", Script::Endless);
    let alice = hearth.user("alice").await;
    join_via(&alice, &fake).await;
    let room = fake.room_id();

    // The lazy join's resync asks /state first (most of the state is missing), is cut off, and fetches the
    // missing events one by one instead.
    let members =
        within(LONG, alice.get(&format!("/rooms/{}/joined_members", enc(&room)))).await.expect("resync finished").ok();
    let mut expected = fake.joined_members();
    expected.sort();
    assert_eq!(joined_ids(&members), expected);
    assert!(
        fake.count("state") >= 1 && fake.count("event") > 0,
        "{:?}",
        fake.requests().iter().map(|r| &r.kind).collect::<Vec<_>>()
    );
    let sent = fake.streamed();
    assert!(sent < cap + 16 * MIB, "Hearth read {} MiB of /state", sent / MIB);
    let leftovers: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("hearth-state-{}-", std::process::id())))
        .collect();
    assert!(leftovers.is_empty(), "partial /state downloads are removed: {leftovers:?}");
    still_serving(&alice).await;
    hearth.stop().await;
}

// ---- slow-loris -----------------------------------------------------------------------------------------------------

/// Accepts any server certificate (Hearth's is self-signed).
#[derive(Debug)]
struct AnyCert;

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider().signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS connection to `addr` speaking HTTP/1.1 (what a slow-loris client sends).
async fn tls_connect(addr: SocketAddr) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert))
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.expect("TLS handshake")
}

/// Reads until the server closes the connection (EOF or reset); what it sent, and when it closed.
async fn until_closed(mut r: impl tokio::io::AsyncRead + Unpin, limit: Duration) -> Option<(Vec<u8>, Instant)> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, r.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some((out, Instant::now())),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_connections_do_not_block_others_and_are_closed() {
    let fake = FakeResident::start(RoomSpec::default()).await;
    let (hearth, alice) = joined(&[&fake]).await;
    let addr = hearth.running.federation_addr.unwrap();
    let opened = Instant::now();

    // 40 connections that never start TLS, 20 that stop in the middle of their headers, 10 that stop in the
    // middle of their body.
    let mut silent = Vec::new();
    for _ in 0..40 {
        silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let mut headers = Vec::new();
    for _ in 0..20 {
        let mut s = tls_connect(addr).await;
        s.write_all(b"GET /_matrix/federation/v1/version HTTP/1.1\r\nHost: localhost\r\nX-Slow: ").await.unwrap();
        s.flush().await.unwrap();
        headers.push(s);
    }
    let mut bodies = Vec::new();
    for i in 0..10 {
        let mut s = tls_connect(addr).await;
        let head = format!(
            "PUT /_matrix/federation/v1/send/slow{i} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\
             Authorization: X-Matrix origin=\"{}\",destination=\"{}\",key=\"ed25519:fake1\",sig=\"AAAA\"\r\n\r\n{{\"pdus\": [",
            fake.name, hearth.server_name
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.flush().await.unwrap();
        bodies.push(s);
    }

    // Everyone else is served at once: a signed federation request, a transaction, and client requests.
    let t = Instant::now();
    fake.request_hearth(reqwest::Method::GET, "/_matrix/federation/v1/version", None).await.expect("version answered");
    let m = fake.append(EventSpec::message(&fake.creator(), "through the crowd"));
    assert_eq!(fake.push(&[&m.id]).await[&m.id], json!({}));
    still_serving(&alice).await;
    assert!(t.elapsed() < Duration::from_secs(8), "others were served in {:?}", t.elapsed());

    // And the stalled connections are closed by the server: no handshake within 10 s, no complete headers
    // within 15 s, a body that stops for 15 s gets 408.
    let limit = Duration::from_secs(40);
    let closed_silent = futures::future::join_all(silent.into_iter().map(|s| until_closed(s, limit))).await;
    let closed_headers = futures::future::join_all(headers.into_iter().map(|s| until_closed(s, limit))).await;
    let closed_bodies = futures::future::join_all(bodies.into_iter().map(|s| until_closed(s, limit))).await;
    // (Slack for a loaded machine: the timeouts are 10 s and 15 s.)
    for (what, closed, max) in [
        ("no TLS", &closed_silent, 10 + 10),
        ("partial headers", &closed_headers, 15 + 10),
        ("partial body", &closed_bodies, 15 + 10),
    ] {
        for c in closed.iter() {
            let (_, at) = c.as_ref().unwrap_or_else(|| panic!("a {what} connection was still open after {limit:?}"));
            let after = at.duration_since(opened);
            assert!(after < Duration::from_secs(max), "a {what} connection was closed after {after:?}");
        }
    }
    for c in closed_bodies.iter().flatten() {
        let text = String::from_utf8_lossy(&c.0);
        assert!(text.starts_with("HTTP/1.1 408"), "a stalled body is answered 408: {text}");
    }
    fake.request_hearth(reqwest::Method::GET, "/_matrix/federation/v1/version", None).await.expect("version answered");
    still_serving(&alice).await;
    hearth.stop().await;
}

// ---- server ACLs on what we serve ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_acl_is_honoured_on_resident_endpoints() {
    let evil =
        FakeResident::start_named(RoomSpec { members: 0, messages: 0, ..RoomSpec::default() }, "evil.example").await;
    let good = FakeResident::start(RoomSpec { members: 0, messages: 0, ..RoomSpec::default() }).await;
    let hearth = start_hearth_with_fakes(&[&evil, &good], |_| {}).await;
    let alice = hearth.user("alice").await;
    let acl = json!({"allow": ["*"], "deny": ["evil.example", "*.evil.example"], "allow_ip_literals": true});
    let room = alice
        .create_room(json!({"preset": "public_chat", "initial_state": [{"type": "m.room.server_acl", "state_key": "", "content": acl}]}))
        .await;
    let version = alice.state(&room, "m.room.create", "").await.ok()["room_version"].as_str().unwrap_or("1").to_owned();
    let ev = alice.send_text(&room, "for allowed servers only").await;
    let mallory = evil.user("mallory");
    let (r, e, m) = (enc(&room), enc(&ev), enc(&mallory));
    let dummy = json!({"type": "m.room.member", "room_id": room, "sender": mallory, "state_key": mallory, "content": {"membership": "join"}});

    let get = reqwest::Method::GET;
    let put = reqwest::Method::PUT;
    let post = reqwest::Method::POST;
    let cases: Vec<(reqwest::Method, String, Option<Value>)> = vec![
        (get.clone(), format!("/_matrix/federation/v1/make_join/{r}/{m}?ver={version}"), None),
        (put.clone(), format!("/_matrix/federation/v1/send_join/{r}/{e}"), Some(dummy.clone())),
        (put.clone(), format!("/_matrix/federation/v2/send_join/{r}/{e}"), Some(dummy.clone())),
        (get.clone(), format!("/_matrix/federation/v1/make_leave/{r}/{m}"), None),
        (put.clone(), format!("/_matrix/federation/v2/send_leave/{r}/{e}"), Some(dummy.clone())),
        (get.clone(), format!("/_matrix/federation/v1/make_knock/{r}/{m}?ver={version}"), None),
        (put.clone(), format!("/_matrix/federation/v1/send_knock/{r}/{e}"), Some(dummy.clone())),
        (
            put.clone(),
            format!("/_matrix/federation/v2/invite/{r}/{e}"),
            Some(json!({"event": dummy, "room_version": version, "invite_room_state": []})),
        ),
        (get.clone(), format!("/_matrix/federation/v1/state/{r}?event_id={e}"), None),
        (get.clone(), format!("/_matrix/federation/v1/state_ids/{r}?event_id={e}"), None),
        (get.clone(), format!("/_matrix/federation/v1/event/{e}"), None),
        (get.clone(), format!("/_matrix/federation/v1/event_auth/{r}/{e}"), None),
        (get.clone(), format!("/_matrix/federation/v1/backfill/{r}?v={e}&limit=10"), None),
        (
            post.clone(),
            format!("/_matrix/federation/v1/get_missing_events/{r}"),
            Some(json!({"earliest_events": [], "latest_events": [ev], "limit": 10})),
        ),
    ];
    for (method, path, body) in &cases {
        let (status, body) =
            evil.request_hearth(method.clone(), path, body.as_ref()).await.expect_err("denied by the ACL");
        assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{method} {path}: {body}");
        assert!(!body.to_string().contains("for allowed servers only"));
    }
    // /send: PDUs for the room from the denied server are refused one by one, the transaction is answered.
    let pdu = json!({"type": "m.room.message", "room_id": room, "sender": mallory, "content": {"body": "let me in"}, "depth": 5,
                     "prev_events": [ev], "auth_events": [], "origin_server_ts": 1, "hashes": {"sha256": "AAAA"}, "signatures": {}});
    let answer = evil.push_json(vec![pdu], vec![]).await.expect("transaction answered");
    assert!(
        answer["pdus"].as_object().unwrap().values().all(|v| v["error"].as_str().is_some_and(|e| e.contains("ACL"))),
        "{answer}"
    );
    let from_evil: i64 = db(&hearth)
        .query_row("SELECT count(*) FROM events WHERE sender LIKE '%:evil.example'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(from_evil, 0);

    // An allowed server is answered.
    let joiner = good.user("joiner");
    let template = good
        .request_hearth(get, &format!("/_matrix/federation/v1/make_join/{r}/{}?ver={version}", enc(&joiner)), None)
        .await
        .expect("make_join for an allowed server");
    assert_eq!(template["event"]["state_key"], json!(joiner));
    still_serving(&alice).await;
    hearth.stop().await;
}

// ---- outbound requests to private addresses (SSRF) -------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_federation_to_private_and_loopback_addresses_is_refused_by_default() {
    let fake = FakeResident::start(RoomSpec::default()).await;
    let port = fake.addr.port();
    let hearth = start_hearth_with(|c| {
        c.federation.allow_private_ips = false;
        c.federation.resolve.insert("internal.example".into(), format!("127.0.0.1:{port}"));
    })
    .await;
    let alice = hearth.user("alice").await;

    for server in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
        format!("[::ffff:127.0.0.1]:{port}"),
        "internal.example".into(),
        "10.1.2.3:8448".into(),
    ] {
        let started = Instant::now();
        let r = alice.post(&format!("/join/{}?server_name={}", enc(&fake.room_id()), enc(&server)), json!({})).await;
        assert_ne!(r.status, 200, "joining via {server}: {}", r.text);
        assert!(r.status < 500 || r.status == 502, "joining via {server}: {} {}", r.status, r.text);
        // Refused before connecting (no connect timeout to an unroutable address).
        assert!(started.elapsed() < Duration::from_secs(5), "{server}: {:?}", started.elapsed());
        let profile = alice.get(&format!("/profile/{}", enc(&format!("@someone:{server}")))).await;
        assert_ne!(profile.status, 200, "{server}: {}", profile.text);
    }
    assert!(fake.requests().is_empty(), "nothing reached the loopback server: {:?}", fake.requests());
    still_serving(&alice).await;
    hearth.stop().await;
}

/// `client.get(name, /version)` through discovery; Ok if it reached a server that answered.
async fn probe(client: &FedClient, name: &str) -> Result<Value, FedError> {
    client.get(name, "/_matrix/federation/v1/version").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn well_known_delegation_to_private_addresses_is_refused() {
    let target = FakeResident::start(RoomSpec { members: 0, messages: 0, ..RoomSpec::default() }).await;
    let wk = FakeResident::start(RoomSpec { members: 0, messages: 0, ..RoomSpec::default() }).await;
    target.script("version", Script::json(200, json!({"server": {"name": "target"}})));
    let tp = target.addr.port();
    // "Public DNS": wk.example is the well-known server, public.example the delegated target (both on loopback
    // for the test, but not refused: they stand for public addresses).
    let dns = [("wk.example", wk.addr), ("public.example", target.addr)];

    let cases: Vec<(String, bool, bool)> = vec![
        (format!("public.example:{tp}"), false, true),
        (format!("127.0.0.1:{tp}"), false, false),
        (format!("localhost:{tp}"), false, false),
        (format!("[::1]:{tp}"), false, false),
        (format!("[::ffff:127.0.0.1]:{tp}"), false, false),
        ("10.20.30.40:8448".into(), false, false),
        ("192.168.1.1".into(), false, false),
        (format!("127.0.0.1:{tp}"), true, true),
    ];
    for (m_server, allow_private, reaches) in cases {
        wk.script("well_known", Script::json(200, json!({"m.server": m_server})));
        let client = discovery_client(allow_private, &dns);
        let (before_wk, before) = (wk.count("well_known"), target.count("version"));
        let started = Instant::now();
        let r = probe(&client, "wk.example").await;
        assert_eq!(wk.count("well_known"), before_wk + 1, "{m_server}: the well-known was asked");
        assert!(started.elapsed() < Duration::from_secs(5), "{m_server}: {:?}", started.elapsed());
        if reaches {
            assert_eq!(r.expect("delegated request answered")["server"]["name"], "target", "{m_server}");
            assert_eq!(target.count("version"), before + 1);
        } else {
            let e = r.expect_err("delegation to a private address is refused");
            assert!(e.to_string().contains("private"), "{m_server}: {e}");
            assert_eq!(target.count("version"), before, "{m_server}: nothing reached the target");
        }
    }
    // A server name that itself resolves to loopback: not even its well-known is fetched.
    let r = probe(&discovery_client(false, &dns), "localhost").await;
    assert!(r.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn well_known_redirects_to_private_addresses_are_not_followed() {
    let target = FakeResident::start(RoomSpec { members: 0, messages: 0, ..RoomSpec::default() }).await;
    let wk = FakeResident::start(RoomSpec { members: 0, messages: 0, ..RoomSpec::default() }).await;
    let wk2 = FakeResident::start(RoomSpec { members: 0, messages: 0, ..RoomSpec::default() }).await;
    target.script("version", Script::json(200, json!({"server": {"name": "target"}})));
    wk2.script("well_known", Script::json(200, json!({"m.server": format!("public.example:{}", target.addr.port())})));
    let dns = [("wk.example", wk.addr), ("wk2.example", wk2.addr), ("public.example", target.addr)];
    let p2 = wk2.addr.port();

    let cases: Vec<(String, bool, bool)> = vec![
        // Followed: a public name (positive control), and loopback when private addresses are allowed.
        ("https://wk2.example/.well-known/matrix/server".into(), false, true),
        (format!("https://127.0.0.1:{p2}/.well-known/matrix/server"), true, true),
        // Not followed: loopback by address or by name, a private address, plain http.
        (format!("https://127.0.0.1:{p2}/.well-known/matrix/server"), false, false),
        (format!("https://[::1]:{p2}/.well-known/matrix/server"), false, false),
        (format!("https://localhost:{p2}/.well-known/matrix/server"), false, false),
        ("https://169.254.169.254/latest/meta-data".into(), false, false),
        ("http://wk2.example/.well-known/matrix/server".into(), false, false),
    ];
    for (location, allow_private, followed) in cases {
        wk.script("well_known", Script::redirect(&location));
        let client = discovery_client(allow_private, &dns);
        let (before_wk2, before) = (wk2.count("well_known"), target.count("version"));
        let started = Instant::now();
        let r = probe(&client, "wk.example").await;
        assert!(started.elapsed() < Duration::from_secs(12), "{location}: {:?}", started.elapsed());
        if followed {
            assert_eq!(wk2.count("well_known"), before_wk2 + 1, "{location}: the redirect was followed");
            assert_eq!(r.expect("answered through the delegation")["server"]["name"], "target");
        } else {
            assert_eq!(wk2.count("well_known"), before_wk2, "{location}: the redirect was not followed");
            assert_eq!(target.count("version"), before, "{location}: the delegated target was not reached");
        }
    }
    // A redirect loop ends.
    wk.script("well_known", Script::redirect("https://wk.example/.well-known/matrix/server"));
    let before = wk.count("well_known");
    let _ = probe(&discovery_client(false, &dns), "wk.example").await;
    assert!(wk.count("well_known") - before <= 6, "{} well-known requests", wk.count("well_known") - before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_records_are_followed_and_their_targets_checked() {
    let target = FakeResident::start(RoomSpec { members: 0, messages: 0, ..RoomSpec::default() }).await;
    let old = FakeResident::start(RoomSpec { members: 0, messages: 0, ..RoomSpec::default() }).await;
    let wk = FakeResident::start(RoomSpec { members: 0, messages: 0, ..RoomSpec::default() }).await;
    target.script("version", Script::json(200, json!({"server": {"name": "srv target"}})));
    old.script("version", Script::json(200, json!({"server": {"name": "old srv target"}})));
    wk.script("well_known", Script::json(200, json!({"m.server": "delegated.example"})));
    let (tp, op) = (target.addr.port(), old.addr.port());
    let dns_server = FakeDns::start(&[
        // _matrix-fed wins over the deprecated _matrix; the lower priority wins.
        ("_matrix-fed._tcp.srv.example", 10, 0, tp, "box.example."),
        ("_matrix-fed._tcp.srv.example", 20, 0, op, "box.example."),
        ("_matrix._tcp.srv.example", 0, 0, op, "box.example."),
        // Only the deprecated service.
        ("_matrix._tcp.old.example", 0, 0, op, "box.example."),
        // The well-known delegates to a name without a port: SRV on that name.
        ("_matrix-fed._tcp.delegated.example", 0, 0, tp, "box.example."),
        // SRV pointing at loopback.
        ("_matrix-fed._tcp.sneaky.example", 0, 0, tp, "localhost."),
        ("_matrix-fed._tcp.internal.example", 0, 0, tp, "127.0.0.1."),
    ])
    .await;
    // "Public DNS": box.example stands for a public address (the port comes from the SRV record).
    let dns = [("box.example", SocketAddr::from(([127, 0, 0, 1], 0))), ("wk.example", wk.addr)];

    let client = srv_discovery_client(false, &dns, Some(&dns_server));
    let r = probe(&client, "srv.example").await.expect("reached through _matrix-fed._tcp");
    assert_eq!(r["server"]["name"], "srv target");
    assert!(dns_server.asked("_matrix-fed._tcp.srv.example"));
    let r = probe(&client, "old.example").await.expect("reached through _matrix._tcp");
    assert_eq!(r["server"]["name"], "old srv target");
    assert!(dns_server.asked("_matrix-fed._tcp.old.example"), "the current service name is asked first");
    let before = target.count("version");
    let r = probe(&client, "wk.example").await.expect("reached through the delegated name's SRV record");
    assert_eq!(r["server"]["name"], "srv target");
    assert_eq!(target.count("version"), before + 1);
    assert!(dns_server.asked("_matrix-fed._tcp.delegated.example"));
    assert!(!dns_server.asked("_matrix-fed._tcp.wk.example"), "no SRV lookup for a name that delegates");

    // SRV targets on loopback are refused unless private addresses are allowed, and nothing reaches them.
    for name in ["sneaky.example", "internal.example"] {
        let before = target.count("version");
        let e = probe(&client, name).await.expect_err("SRV to loopback is refused");
        assert!(e.to_string().contains("private"), "{name}: {e}");
        assert_eq!(target.count("version"), before, "{name}: nothing reached the target");
        let allowed = srv_discovery_client(true, &dns, Some(&dns_server));
        let r = probe(&allowed, name).await.expect("allowed when private addresses are");
        assert_eq!(r["server"]["name"], "srv target");
    }

    // No SRV record at all: port 8448 on the name itself (which has no address here).
    let e = probe(&client, "nothing.example").await.expect_err("no such server");
    assert!(dns_server.asked("_matrix._tcp.nothing.example"));
    assert!(e.to_string().contains("nothing.example"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_requests_do_not_follow_redirects() {
    let remote = FakeResident::start(RoomSpec { members: 0, messages: 0, ..RoomSpec::default() }).await;
    let inside = FakeResident::start(RoomSpec { members: 0, messages: 0, ..RoomSpec::default() }).await;
    inside.script("version", Script::json(200, json!({"server": {"name": "internal service"}})));
    remote.script(
        "version",
        Script::redirect(&format!("https://127.0.0.1:{}/_matrix/federation/v1/version", inside.addr.port())),
    );
    // Even with private addresses allowed (the remote itself is on loopback), a redirect is an answer, not a hop.
    let client = discovery_client(true, &[]);
    let r = probe(&client, &remote.name).await;
    match r {
        Err(FedError::Status { status, .. }) => assert_eq!(status, 302),
        other => panic!("expected the 302 as an error, got {other:?}"),
    }
    assert_eq!(inside.count("version"), 0, "the redirect was not followed");
}

// ---- an event that cannot be placed -------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_whose_parent_and_its_state_are_unavailable_is_dropped_until_the_parent_arrives() {
    let fake = FakeResident::start(RoomSpec::default()).await;
    let (hearth, alice) = joined(&[&fake]).await;
    let room = fake.room_id();
    // The sender answers neither get_missing_events nor /state_ids (as Complement's TestUnrejectRejectedEvents).
    fake.script("get_missing_events", Script::json(404, json!({"errcode": "M_NOT_FOUND", "error": "no"})));
    fake.script("state_ids", Script::json(404, json!({"errcode": "M_NOT_FOUND", "error": "no"})));
    let parent = fake.append(EventSpec::message(&fake.creator(), "parent"));
    let child = fake.append(EventSpec::message(&fake.creator(), "child"));

    // Nothing can tell where the child belongs: it is dropped (an error for it in the answer), not guessed.
    let answer = fake.push(&[&child.id]).await;
    assert!(answer[&child.id]["error"].is_string(), "{answer}");
    assert!(!is_stored(&hearth, &child.id));
    let since = alice.sync(None, &[("timeout", "0")]).await.ok()["next_batch"].as_str().unwrap().to_owned();

    // The parent arrives, then the child again: both are accepted and reach the client's timeline in order.
    assert_eq!(fake.push(&[&parent.id]).await[&parent.id], json!({}));
    assert_eq!(fake.push(&[&child.id]).await[&child.id], json!({}));
    let sync = alice.sync(Some(&since), &[("timeout", "0")]).await.ok();
    let bodies: Vec<&str> = sync["rooms"]["join"][&room]["timeline"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["content"]["body"].as_str())
        .collect();
    assert_eq!(bodies, ["parent", "child"]);
    hearth.stop().await;
}
