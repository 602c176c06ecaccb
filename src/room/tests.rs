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
