//! Unit tests of the room core against an in-memory database: creating a room, appending local events,
//! membership changes and who may read what. No HTTP, no federation.

use std::sync::Arc;

use serde_json::json;

use crate::room::append::{append_local, LocalEvent};
use crate::room::create::{create_room, CreateRoom};
use crate::room::membership::set_membership;
use crate::room::visibility::{readable_room, visibility, ClientJudge, Visibility};
use crate::room::Identity;
use crate::store::ids::StreamPos;
use crate::store::testing::{memory_db, write, MemDb};
use crate::store::{events, members, rooms, state_groups};

const ALICE: &str = "@alice:test.example";
const BOB: &str = "@bob:test.example";

fn uid(u: &str) -> ruma::OwnedUserId {
    ruma::UserId::parse(u).unwrap()
}

fn rid(r: &str) -> ruma::OwnedRoomId {
    ruma::RoomId::parse(r).unwrap()
}

struct Fixture {
    conn: MemDb,
    stream: i64,
    identity: Arc<Identity>,
}

impl Fixture {
    fn new() -> Fixture {
        let conn = memory_db();
        let identity = Identity::load_or_create(conn.db(), "test.example").unwrap();
        Fixture { conn, stream: 0, identity }
    }

    /// A private room (invite only, shared history) created by Alice.
    fn room(&mut self) -> String {
        let identity = self.identity.clone();
        let req = CreateRoom { name: Some("Test".into()), ..CreateRoom::new(uid(ALICE)) };
        write(&mut self.conn, &mut self.stream, |w| create_room(w, &identity, req)).unwrap().0
    }

    fn membership(&mut self, room_id: &str, sender: &str, target: &str, membership: &str) -> crate::error::Result<()> {
        let identity = self.identity.clone();
        write(&mut self.conn, &mut self.stream, |w| {
            set_membership(w, &identity, &rid(room_id), &uid(sender), &uid(target), membership, None, None)
        })
        .map(|_| ())
    }

    fn state(&mut self, room_id: &str, event_type: &str, content: serde_json::Value) {
        let identity = self.identity.clone();
        let ev = LocalEvent::state(event_type, "", content);
        write(&mut self.conn, &mut self.stream, |w| append_local(w, &identity, &rid(room_id), &uid(ALICE), ev, None))
            .unwrap();
    }

    /// What `user` may see of the room's whole timeline, each event as a short label: a message's body, or
    /// `member {user} {membership}`, or the state event's type.
    fn seen_by(&self, room_id: &str, user: &str) -> Vec<String> {
        let c = self.conn.db();
        let room = rooms::room_by_id(c, room_id).unwrap().unwrap();
        let rows =
            crate::store::timeline::oldest_first(c, room.room_nid, StreamPos(i64::MIN), StreamPos(i64::MAX), 1000)
                .unwrap();
        let rows = ClientJudge::new(c, user).filter(rows).unwrap();
        rows.iter()
            .map(|r| {
                let v: serde_json::Value = serde_json::from_str(&r.json).unwrap();
                match r.event_type.as_str() {
                    "m.room.message" => v["content"]["body"].as_str().unwrap().to_owned(),
                    "m.room.member" => format!(
                        "member {} {}",
                        v["state_key"].as_str().unwrap(),
                        v["content"]["membership"].as_str().unwrap()
                    ),
                    t => t.to_owned(),
                }
            })
            .collect()
    }

    fn send(&mut self, room_id: &str, sender: &str, body: &str) -> crate::error::Result<crate::room::append::Appended> {
        let identity = self.identity.clone();
        let ev = LocalEvent::message("m.room.message", json!({"msgtype": "m.text", "body": body}));
        write(&mut self.conn, &mut self.stream, |w| append_local(w, &identity, &rid(room_id), &uid(sender), ev, None))
    }
}

#[test]
fn a_new_room_has_its_state_and_its_creator_joined() {
    let mut f = Fixture::new();
    let room_id = f.room();
    let room = rooms::room_by_id(f.conn.db(), &room_id).unwrap().unwrap();
    let sg = room.current_sg.expect("current state");
    assert_eq!(crate::room::state_content(f.conn.db(), sg, "m.room.name", "").unwrap().unwrap()["name"], "Test");
    assert_eq!(
        crate::room::state_content(f.conn.db(), sg, "m.room.join_rules", "").unwrap().unwrap()["join_rule"],
        "invite"
    );
    assert_eq!(members::membership_of(f.conn.db(), room.room_nid, ALICE).unwrap().unwrap().0, "join");
    assert_eq!(members::member_counts(f.conn.db(), room.room_nid).unwrap(), (1, 0));
    assert_eq!(members::joined_servers(f.conn.db(), room.room_nid).unwrap(), ["test.example"]);
    assert!(members::was_locally_joined(f.conn.db(), ALICE, room.room_nid).unwrap());
    // One forward extremity: the last event created.
    assert_eq!(events::forward_extremities(f.conn.db(), room.room_nid).unwrap().len(), 1);
}

#[test]
fn appended_messages_extend_the_timeline() {
    let mut f = Fixture::new();
    let room_id = f.room();
    let room = rooms::room_by_id(f.conn.db(), &room_id).unwrap().unwrap();
    let first = f.send(&room_id, ALICE, "one").unwrap();
    let second = f.send(&room_id, ALICE, "two").unwrap();
    assert!(second.stream > first.stream);
    assert_eq!(events::forward_extremities(f.conn.db(), room.room_nid).unwrap(), [second.event_nid]);
    let row = events::event_by_id(f.conn.db(), &second.event_id).unwrap().unwrap();
    assert_eq!(row.event_nid, second.event_nid);
    assert_eq!(row.stream_ordering, Some(second.stream));
    assert_eq!(row.sender, ALICE);
    // A message does not change the state: the state after it is the room's current state.
    let room = rooms::room_by_id(f.conn.db(), &room_id).unwrap().unwrap();
    assert_eq!(row.sg_after, room.current_sg);
    // Its prev event is the first message.
    let v: serde_json::Value = serde_json::from_str(&row.json).unwrap();
    assert_eq!(v["prev_events"], json!([first.event_id]));
    assert!(crate::room::load_pdu(f.conn.db(), &ruma::EventId::parse(&second.event_id).unwrap()).unwrap().is_some());
}

#[test]
fn a_non_member_may_not_send() {
    let mut f = Fixture::new();
    let room_id = f.room();
    let err = f.send(&room_id, BOB, "hello").unwrap_err();
    assert!(err.to_string().contains("not allowed"), "{err}");
    assert!(f.send("!unknown:test.example", ALICE, "hello").is_err());
}

#[test]
fn invite_join_and_leave_keep_the_member_table_in_step() {
    let mut f = Fixture::new();
    let room_id = f.room();
    let nid = rooms::room_by_id(f.conn.db(), &room_id).unwrap().unwrap().room_nid;
    // Bob may not join an invite-only room uninvited.
    assert!(f.membership(&room_id, BOB, BOB, "join").is_err());
    f.membership(&room_id, ALICE, BOB, "invite").unwrap();
    assert_eq!(members::member_counts(f.conn.db(), nid).unwrap(), (1, 1));
    assert_eq!(members::rooms_with_membership(f.conn.db(), BOB, "invite").unwrap(), [(nid, room_id.clone())]);
    f.membership(&room_id, BOB, BOB, "join").unwrap();
    assert_eq!(members::member_counts(f.conn.db(), nid).unwrap(), (2, 0));
    // Joining again is a no-op, not a new event.
    let before = events::forward_extremities(f.conn.db(), nid).unwrap();
    f.membership(&room_id, BOB, BOB, "join").unwrap();
    assert_eq!(events::forward_extremities(f.conn.db(), nid).unwrap(), before);
    f.send(&room_id, BOB, "hi").unwrap();
    f.membership(&room_id, BOB, BOB, "leave").unwrap();
    assert_eq!(members::member_counts(f.conn.db(), nid).unwrap(), (1, 0));
    assert_eq!(members::membership_of(f.conn.db(), nid, BOB).unwrap().unwrap().0, "leave");
    // Leaving again after one's own leave is a no-op (as in Synapse), not a new event.
    let before = events::forward_extremities(f.conn.db(), nid).unwrap();
    f.membership(&room_id, BOB, BOB, "leave").unwrap();
    assert_eq!(events::forward_extremities(f.conn.db(), nid).unwrap(), before);
    // The membership table agrees with the current state.
    let room = rooms::room_by_id(f.conn.db(), &room_id).unwrap().unwrap();
    let state = state_groups::load_state_of_type(f.conn.db(), room.current_sg.unwrap(), "m.room.member").unwrap();
    assert_eq!(state.len(), 2);
    assert_eq!(state[BOB], members::membership_of(f.conn.db(), nid, BOB).unwrap().unwrap().1);
}

#[test]
fn a_former_member_reads_up_to_their_leave() {
    let mut f = Fixture::new();
    let room_id = f.room();
    f.membership(&room_id, ALICE, BOB, "invite").unwrap();
    f.membership(&room_id, BOB, BOB, "join").unwrap();
    f.membership(&room_id, BOB, BOB, "leave").unwrap();
    let leave_pos = {
        let room = rooms::room_by_id(f.conn.db(), &room_id).unwrap().unwrap();
        let (_, nid) = members::membership_of(f.conn.db(), room.room_nid, BOB).unwrap().unwrap();
        events::event_by_nid(f.conn.db(), nid).unwrap().unwrap().stream_ordering.unwrap()
    };
    f.send(&room_id, ALICE, "after bob left").unwrap();
    let identity = f.identity.clone();
    let room_id_ = room_id.clone();
    write(&mut f.conn, &mut f.stream, |w| {
        append_local(
            w,
            &identity,
            &rid(&room_id_),
            &uid(ALICE),
            LocalEvent::state("m.room.topic", "", json!({"topic": "new"})),
            None,
        )
    })
    .unwrap();
    let room = rooms::room_by_id(f.conn.db(), &room_id).unwrap().unwrap();
    assert_eq!(visibility(f.conn.db(), &room, &uid(ALICE)).unwrap(), Visibility::All);
    assert_eq!(visibility(f.conn.db(), &room, &uid(BOB)).unwrap(), Visibility::UpTo(leave_pos.0));
    assert_eq!(visibility(f.conn.db(), &room, &uid("@carol:test.example")).unwrap(), Visibility::None);
    assert!(readable_room(f.conn.db(), &rid(&room_id), &uid("@carol:test.example")).is_err());
    let (_, vis) = readable_room(f.conn.db(), &rid(&room_id), &uid(BOB)).unwrap();
    // The state Bob sees is the state at his leave: he is not joined in it.
    let sg = crate::room::visibility::visible_state_group(f.conn.db(), &room, vis).unwrap().unwrap();
    assert_ne!(Some(sg), room.current_sg);
    assert!(crate::room::state_content(f.conn.db(), sg, "m.room.topic", "").unwrap().is_none());
    let member = crate::room::state_content(f.conn.db(), sg, "m.room.member", BOB).unwrap().unwrap();
    assert_eq!(member["membership"], "leave");
    assert!(leave_pos > StreamPos(0));
}

#[test]
fn joined_history_is_visible_from_the_join() {
    let mut f = Fixture::new();
    let room_id = f.room();
    let identity = f.identity.clone();
    let room_id_ = room_id.clone();
    write(&mut f.conn, &mut f.stream, |w| {
        append_local(
            w,
            &identity,
            &rid(&room_id_),
            &uid(ALICE),
            LocalEvent::state("m.room.history_visibility", "", json!({"history_visibility": "joined"})),
            None,
        )
    })
    .unwrap();
    f.send(&room_id, ALICE, "before bob").unwrap();
    f.membership(&room_id, ALICE, BOB, "invite").unwrap();
    f.membership(&room_id, BOB, BOB, "join").unwrap();
    let seen = f.seen_by(&room_id, BOB);
    assert!(!seen.contains(&"before bob".to_owned()), "{seen:?}");
    assert!(seen.contains(&format!("member {BOB} join")), "{seen:?}");
    // Never joined under these rules: nothing.
    assert!(f.seen_by(&room_id, "@carol:test.example").is_empty());
}

#[test]
fn a_redaction_strips_its_target() {
    let mut f = Fixture::new();
    let room_id = f.room();
    let target = f.send(&room_id, ALICE, "secret").unwrap();
    let identity = f.identity.clone();
    let room_id_ = room_id.clone();
    let tid = target.event_id.clone();
    write(&mut f.conn, &mut f.stream, |w| {
        let ev = LocalEvent {
            kind: "m.room.redaction".into(),
            state_key: None,
            content: json!({}),
            redacts: Some(tid),
            ts: None,
        };
        append_local(w, &identity, &rid(&room_id_), &uid(ALICE), ev, None)
    })
    .unwrap();
    let row = events::event_by_id(f.conn.db(), &target.event_id).unwrap().unwrap();
    assert!(row.redacted_by.is_some());
    assert!(!row.json.contains("secret"));
}

#[test]
fn invite_preview_for_servers_is_whole_pdus_and_checks_against_the_room_id() {
    let mut f = Fixture::new();
    let room_id = f.room();
    f.membership(&room_id, ALICE, BOB, "invite").unwrap();
    let room = rooms::room_by_id(f.conn.db(), &room_id).unwrap().unwrap();
    let pdus = crate::room::stripped::stripped_state_pdus(f.conn.db(), &room, BOB).unwrap();
    let create = pdus.iter().find(|e| e["type"] == "m.room.create").expect("create event in the preview");
    assert!(create.get("signatures").is_some() && create.get("hashes").is_some(), "whole PDU: {create}");
    let rules = crate::room::version::rules(&room.version).unwrap();
    crate::room::stripped::check_received(&pdus, &rid(&room_id), &rules).unwrap();
    // A create event that does not hash to the room id (room v12) is refused.
    let mut forged = pdus.clone();
    for e in forged.iter_mut().filter(|e| e["type"] == "m.room.create") {
        e["content"]["m.federate"] = json!(false);
    }
    let err = crate::room::stripped::check_received(&forged, &rid(&room_id), &rules).unwrap_err();
    assert_eq!(err.errcode(), "M_INVALID_PARAM");
    // What the client API shows of a received entry: the four stripped keys (and the create event's time).
    let shown = crate::room::stripped::received_for_client(create).unwrap();
    let mut keys: Vec<&str> = shown.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["content", "origin_server_ts", "sender", "state_key", "type"]);
    // The client form of our own preview includes the create event too.
    let client = crate::room::stripped::stripped_state(f.conn.db(), &room, BOB).unwrap();
    assert!(client.iter().any(|e| e["type"] == "m.room.create" && e.get("origin_server_ts").is_some()));
}

#[test]
fn restricted_join_while_partial_goes_through_the_residents_servers() {
    use crate::room::membership::remote_authorisers;
    let mut f = Fixture::new();
    let identity = f.identity.clone();
    let rule =
        json!({"join_rule": "restricted", "allow": [{"type": "m.room_membership", "room_id": "!o:remote.example"}]});
    let req = CreateRoom {
        room_version: Some("10".into()),
        initial_state: vec![LocalEvent::state("m.room.join_rules", "", rule)],
        // Nobody here may invite, so nobody here may vouch for a joiner.
        power_level_content_override: Some(json!({"invite": 200})),
        ..CreateRoom::new(uid(ALICE))
    };
    let room_id = write(&mut f.conn, &mut f.stream, |w| create_room(w, &identity, req)).unwrap().0;
    let room = rooms::room_by_id(f.conn.db(), &room_id).unwrap().unwrap();
    assert_eq!(remote_authorisers(f.conn.db(), &room, &uid(BOB), "test.example").unwrap(), Some(vec![]));
    // While a lazy join is partial the members who may vouch may be among those not known yet: the servers the
    // resident listed are asked (ours left out).
    crate::store::resync::set_room_partial(f.conn.db(), room.room_nid, true).unwrap();
    crate::store::resync::add_partial_servers(f.conn.db(), room.room_nid, ["remote.example", "test.example"]).unwrap();
    let room = rooms::room_by_id(f.conn.db(), &room_id).unwrap().unwrap();
    assert_eq!(
        remote_authorisers(f.conn.db(), &room, &uid(BOB), "test.example").unwrap(),
        Some(vec!["remote.example".to_owned()])
    );
}

/// The membership histories of the table test: each a list of (actor, membership) steps applied to Bob, with
/// messages sent by Alice before ("m0"), between each step ("m1", "m2", ...) and after the last.
const HISTORIES: &[(&str, &[(&str, &str)])] = &[
    ("never", &[]),
    ("invited, rejected", &[(ALICE, "invite"), (BOB, "leave")]),
    ("joined", &[(ALICE, "invite"), (BOB, "join")]),
    ("joined, left", &[(ALICE, "invite"), (BOB, "join"), (BOB, "leave")]),
    ("joined, kicked", &[(ALICE, "invite"), (BOB, "join"), (ALICE, "leave")]),
    ("joined, banned", &[(ALICE, "invite"), (BOB, "join"), (ALICE, "ban")]),
    ("left, re-invited", &[(ALICE, "invite"), (BOB, "join"), (BOB, "leave"), (ALICE, "invite")]),
    ("left, re-joined", &[(ALICE, "invite"), (BOB, "join"), (BOB, "leave"), (ALICE, "invite"), (BOB, "join")]),
    ("knocked, retracted", &[(BOB, "knock"), (BOB, "leave")]),
];

/// Which messages Bob sees, per history visibility and history (m0 before the first step, m{i} after step i).
fn expected(hv: &str, history: &str) -> &'static [&'static str] {
    match (hv, history) {
        ("world_readable", "never") => &["m0"],
        ("world_readable", "invited, rejected" | "joined" | "knocked, retracted") => &["m0", "m1", "m2"],
        ("world_readable", "joined, left" | "joined, kicked" | "joined, banned") => &["m0", "m1", "m2", "m3"],
        ("world_readable", "left, re-invited") => &["m0", "m1", "m2", "m3", "m4"],
        ("world_readable", _) => &["m0", "m1", "m2", "m3", "m4", "m5"],
        ("shared", "joined") => &["m0", "m1", "m2"],
        ("shared", "joined, left" | "joined, kicked" | "joined, banned") => &["m0", "m1", "m2"],
        ("shared", "left, re-invited") => &["m0", "m1", "m2"],
        ("shared", "left, re-joined") => &["m0", "m1", "m2", "m3", "m4", "m5"],
        ("invited", "invited, rejected") => &["m1"],
        ("invited", "joined") => &["m1", "m2"],
        ("invited", "joined, left" | "joined, kicked" | "joined, banned") => &["m1", "m2"],
        ("invited", "left, re-invited") => &["m1", "m2", "m4"],
        ("invited", "left, re-joined") => &["m1", "m2", "m4", "m5"],
        ("joined", "joined" | "joined, left" | "joined, kicked" | "joined, banned" | "left, re-invited") => &["m2"],
        ("joined", "left, re-joined") => &["m2", "m5"],
        _ => &[],
    }
}

#[test]
fn history_visibility_by_membership_history_table() {
    for hv in ["world_readable", "shared", "invited", "joined"] {
        for (name, steps) in HISTORIES {
            let mut f = Fixture::new();
            let identity = f.identity.clone();
            let req = CreateRoom {
                initial_state: vec![
                    LocalEvent::state("m.room.join_rules", "", json!({"join_rule": "knock"})),
                    LocalEvent::state("m.room.history_visibility", "", json!({"history_visibility": hv})),
                ],
                ..CreateRoom::new(uid(ALICE))
            };
            let room_id = write(&mut f.conn, &mut f.stream, |w| create_room(w, &identity, req)).unwrap().0;
            f.send(&room_id, ALICE, "m0").unwrap();
            for (i, (actor, membership)) in steps.iter().enumerate() {
                f.membership(&room_id, actor, BOB, membership).unwrap();
                f.send(&room_id, ALICE, &format!("m{}", i + 1)).unwrap();
            }
            let seen = f.seen_by(&room_id, BOB);
            let messages: Vec<&str> =
                seen.iter().map(String::as_str).filter(|s| s.len() == 2 && s.starts_with('m')).collect();
            assert_eq!(messages, expected(hv, name), "{hv} / {name}: saw {seen:?}");
            // Bob's own membership events: a join, and a leave or ban that ends a join, invite or knock, are his
            // to see whatever the setting.
            let joined = steps.iter().any(|s| s.1 == "join");
            if joined {
                assert!(seen.contains(&format!("member {BOB} join")), "{hv} / {name}: {seen:?}");
            }
            if steps.last().is_some_and(|s| s.1 == "leave" || s.1 == "ban") {
                assert!(seen.iter().any(|s| s.starts_with(&format!("member {BOB} "))), "{hv} / {name}: {seen:?}");
            }
        }
    }
}

#[test]
fn each_event_keeps_the_visibility_it_was_sent_under() {
    let mut f = Fixture::new();
    let room_id = f.room();
    f.state(&room_id, "m.room.history_visibility", json!({"history_visibility": "joined"}));
    f.send(&room_id, ALICE, "sent under joined").unwrap();
    f.state(&room_id, "m.room.history_visibility", json!({"history_visibility": "world_readable"}));
    f.send(&room_id, ALICE, "sent under world_readable").unwrap();
    f.state(&room_id, "m.room.history_visibility", json!({"history_visibility": "joined"}));
    f.send(&room_id, ALICE, "joined again").unwrap();
    let seen = f.seen_by(&room_id, "@carol:test.example");
    let messages: Vec<&str> =
        seen.iter().map(String::as_str).filter(|s| s.starts_with("sent") || s.starts_with("joined")).collect();
    assert_eq!(messages, ["sent under world_readable"], "{seen:?}");
    // The setting events themselves count under the more open of the old and the new setting: the change to
    // world_readable and the change back from it are visible, the first change (shared -> joined) is not
    // (shared hides it from someone who never joined).
    assert_eq!(seen.iter().filter(|s| *s == "m.room.history_visibility").count(), 2, "{seen:?}");
}

#[test]
fn another_server_is_judged_by_its_joined_users() {
    use crate::room::visibility::{server_may_read_room, ServerJudge};
    let mut f = Fixture::new();
    let room_id = f.room();
    f.state(&room_id, "m.room.history_visibility", json!({"history_visibility": "joined"}));
    let early = f.send(&room_id, ALICE, "before anyone from there").unwrap();
    // Members of other servers, as federation would store them, are not possible through local appends; the
    // membership table decides who may read the room: a server with no member may not.
    let room = rooms::room_by_id(f.conn.db(), &room_id).unwrap().unwrap();
    assert!(server_may_read_room(f.conn.db(), &room, "test.example").unwrap());
    assert!(!server_may_read_room(f.conn.db(), &room, "other.example").unwrap());
    // Users of other servers who are only invited, knocking, gone or banned do not let their server read it.
    for (user, membership) in [
        ("@m:invited.example", "invite"),
        ("@m:knocking.example", "knock"),
        ("@m:gone.example", "leave"),
        ("@m:banned.example", "ban"),
    ] {
        let update = members::MemberUpdate {
            room_nid: room.room_nid,
            user_id: user,
            membership,
            event_nid: early.event_nid,
            displayname: None,
            avatar_url: None,
        };
        members::upsert_member(f.conn.db(), &update).unwrap();
        let server = user.split_once(':').unwrap().1;
        assert!(!server_may_read_room(f.conn.db(), &room, server).unwrap(), "{membership}");
    }
    let row = events::event_by_id(f.conn.db(), &early.event_id).unwrap().unwrap();
    assert!(!ServerJudge::new(f.conn.db(), room.room_nid, "other.example").unwrap().may_see(&row).unwrap());
    assert!(ServerJudge::new(f.conn.db(), room.room_nid, "test.example").unwrap().may_see(&row).unwrap());
    // While our join is partial, the servers the resident listed may read it too.
    crate::store::resync::set_room_partial(f.conn.db(), room.room_nid, true).unwrap();
    crate::store::resync::add_partial_servers(f.conn.db(), room.room_nid, ["other.example"]).unwrap();
    let room = rooms::room_by_id(f.conn.db(), &room_id).unwrap().unwrap();
    assert!(server_may_read_room(f.conn.db(), &room, "other.example").unwrap());
}

/// One event of the second branch of a fork: built on `prev` (as another server would), with the auth events the
/// state after `prev` gives, and taken in as a federated event is. Returns its id.
fn branch_event(
    f: &mut Fixture,
    room_id: &str,
    prev: &str,
    sender: &str,
    kind: &str,
    key: &str,
    content: serde_json::Value,
) -> String {
    use crate::room::append::{build_pdu, reference, Outcome};
    use crate::room::remote::{handle_incoming, Incoming};
    let identity = f.identity.clone();
    let pdu = {
        let c = f.conn.db();
        let room = rooms::room_by_id(c, room_id).unwrap().unwrap();
        let rules = crate::room::version::rules(&room.version).unwrap();
        let prev_row = events::event_by_id(c, prev).unwrap().unwrap();
        let sg = prev_row.sg_after.unwrap();
        let raw = serde_json::value::to_raw_value(&content).unwrap();
        let types =
            ruma::state_res::auth_types_for_event(&kind.into(), &uid(sender), Some(key), &raw, &rules.authorization)
                .unwrap();
        let mut auth = Vec::new();
        for (t, k) in types {
            if let Some(skn) = state_groups::find_state_key_nid(c, &t.to_string(), &k).unwrap() {
                if let Some(nid) = state_groups::lookup_state(c, sg, skn).unwrap() {
                    let (id, sha, _) = reference(c, nid).unwrap();
                    auth.push((id, sha));
                }
            }
        }
        let (pid, psha, depth) = reference(c, prev_row.event_nid).unwrap();
        let ev = LocalEvent::state(kind, key, content);
        let room = rid(room_id);
        build_pdu(&identity, &rules, Some(&*room), &uid(sender), &ev, &[(pid, psha)], &auth, depth + 1).unwrap()
    };
    let got = write(&mut f.conn, &mut f.stream, |w| handle_incoming(w, &identity, &rid(room_id), &pdu, None)).unwrap();
    assert!(matches!(got, Incoming::Stored(_, Outcome::Accepted)), "{kind} {key}: {got:?}");
    pdu.event_id.to_string()
}

fn local_state(
    f: &mut Fixture,
    room_id: &str,
    sender: &str,
    kind: &str,
    key: &str,
    content: serde_json::Value,
) -> String {
    let identity = f.identity.clone();
    let ev = LocalEvent::state(kind, key, content);
    write(&mut f.conn, &mut f.stream, |w| append_local(w, &identity, &rid(room_id), &uid(sender), ev, None))
        .unwrap()
        .event_id
}

/// A fork resolved from the entries its states differ in (what `resolve_groups` does since the 100k-member fork
/// benchmark) gives the state the whole states resolved give, and the same auth difference: in particular an event
/// only one branch's conflicted events cite, but which an unconflicted event descends from (Carol's first join,
/// under her later display name change), is in every state's auth chain, so not in the difference.
#[test]
fn a_fork_resolved_from_its_differences_matches_the_whole_states_resolved() {
    use crate::room::state;
    use std::collections::HashSet;
    for version in ["12", "10"] {
        let mut f = Fixture::new();
        let identity = f.identity.clone();
        let req = CreateRoom { room_version: Some(version.into()), ..CreateRoom::new(uid(ALICE)) };
        let room_id = write(&mut f.conn, &mut f.stream, |w| create_room(w, &identity, req)).unwrap().0;
        f.state(&room_id, "m.room.join_rules", json!({"join_rule": "public"}));
        let u: Vec<String> = (0..10).map(|i| format!("@u{i}:test.example")).collect();
        let carol = u[0].clone();
        let bob = u[1].clone();
        for x in &u {
            f.membership(&room_id, x, x, "join").unwrap();
        }
        let carol_first_join = {
            let c = f.conn.db();
            let room = rooms::room_by_id(c, &room_id).unwrap().unwrap();
            let nid = state_groups::lookup_state(
                c,
                room.current_sg.unwrap(),
                state_groups::find_state_key_nid(c, "m.room.member", &carol).unwrap().unwrap(),
            )
            .unwrap()
            .unwrap();
            events::event_id_of(c, nid).unwrap().unwrap()
        };
        local_state(
            &mut f,
            &room_id,
            &carol,
            "m.room.member",
            &carol,
            json!({"membership": "join", "displayname": "Carol"}),
        );
        let mut users = serde_json::Map::new();
        if version != "12" {
            users.insert(ALICE.into(), json!(100));
        }
        users.insert(bob.clone(), json!(100));
        users.insert(carol.clone(), json!(50));
        let pl0 = json!({"users": users, "users_default": 0, "events_default": 0, "state_default": 50, "ban": 50, "kick": 50, "redact": 50, "invite": 0});
        let fork_point = local_state(&mut f, &room_id, ALICE, "m.room.power_levels", "", pl0.clone());

        // Branch one, local: promotions, a kick, a ban, the topic.
        let mut pl1 = pl0.clone();
        pl1["users"][&u[2]] = json!(50);
        pl1["users"][&u[3]] = json!(50);
        local_state(&mut f, &room_id, ALICE, "m.room.power_levels", "", pl1);
        f.membership(&room_id, ALICE, &u[4], "leave").unwrap();
        f.membership(&room_id, ALICE, &u[5], "ban").unwrap();
        let tip1 = local_state(&mut f, &room_id, ALICE, "m.room.topic", "", json!({"topic": "one"}));

        // Branch two, on the fork point: other power levels, Carol's topic, a ban of a promoted member, a leave, a
        // new member.
        let mut pl2 = pl0.clone();
        pl2["users"][&u[6]] = json!(50);
        let mut prev = branch_event(&mut f, &room_id, &fork_point, &bob, "m.room.power_levels", "", pl2.clone());
        prev = branch_event(&mut f, &room_id, &prev, &carol, "m.room.topic", "", json!({"topic": "two"}));
        prev = branch_event(&mut f, &room_id, &prev, &bob, "m.room.member", &u[2], json!({"membership": "ban"}));
        prev = branch_event(&mut f, &room_id, &prev, &u[7], "m.room.member", &u[7], json!({"membership": "leave"}));
        let newcomer = "@new:test.example";
        let tip2 =
            branch_event(&mut f, &room_id, &prev, newcomer, "m.room.member", newcomer, json!({"membership": "join"}));

        let c = f.conn.db();
        let room = rooms::room_by_id(c, &room_id).unwrap().unwrap();
        let rules = crate::room::version::rules(version).unwrap();
        let sg_of = |id: &str| events::event_by_id(c, id).unwrap().unwrap().sg_after.unwrap();
        let mut groups = vec![sg_of(&tip1), sg_of(&tip2)];
        groups.sort_unstable();
        let fast = state::resolve_groups(c, room.room_nid, version, &groups).unwrap();
        let states: Vec<_> = groups.iter().map(|g| state_groups::load_state(c, *g).unwrap()).collect();
        let full = state::resolve_full(c, &rules, &states).unwrap();
        assert_eq!(state_groups::load_state(c, fast).unwrap(), full, "room version {version}");
        // The room's current state (resolved when the second branch came in) is the same.
        assert_eq!(state_groups::load_state(c, room.current_sg.unwrap()).unwrap(), full, "room version {version}");
        let content = |t: &str, k: &str| crate::room::state_content(c, fast, t, k).unwrap().unwrap();
        assert_eq!(content("m.room.power_levels", "")["users"], pl2["users"], "room version {version}");
        assert_eq!(content("m.room.topic", "")["topic"], "two", "room version {version}");
        assert_eq!(content("m.room.member", &u[2])["membership"], "ban");
        assert_eq!(content("m.room.member", &u[4])["membership"], "leave");
        assert_eq!(content("m.room.member", &u[5])["membership"], "ban");
        assert_eq!(content("m.room.member", &u[7])["membership"], "leave");
        assert_eq!(content("m.room.member", newcomer)["membership"], "join");

        // The auth difference from the conflicted part equals the one from the whole states.
        let diff = state_groups::differing_entries(c, &groups).unwrap();
        let inputs = state::conflict_inputs(c, &rules, groups[0], &diff).unwrap().unwrap();
        let difference = |chains: Vec<HashSet<String>>| -> HashSet<String> {
            let union: HashSet<String> = chains.iter().flatten().cloned().collect();
            union.into_iter().filter(|id| chains.iter().any(|ch| !ch.contains(id))).collect()
        };
        let fast_diff =
            difference(inputs.chains.iter().map(|ch| ch.iter().map(|id| id.to_string()).collect()).collect());
        let full_chains: Vec<HashSet<String>> = states
            .iter()
            .map(|s| {
                let ids = s
                    .values()
                    .map(|n| ruma::OwnedEventId::try_from(events::event_id_of(c, *n).unwrap().unwrap()).unwrap());
                state::auth_chain(c, ids).unwrap().into_iter().map(|id| id.to_string()).collect()
            })
            .collect();
        assert_eq!(fast_diff, difference(full_chains), "room version {version}");
        assert!(!fast_diff.contains(&carol_first_join), "room version {version}");
        assert!(!fast_diff.is_empty());
    }
}
