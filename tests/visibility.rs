//! History visibility over HTTP (issue #17): what a user sees of a room, per history visibility setting x membership
//! history x read path (`/sync` initial, incremental and with `include_leave`, `/messages`, `/context`, `/event`,
//! search), each event judged by the setting and the membership *at that event*; the setting changing mid-room;
//! `/members?at=`; `/relations`; and other servers: one whose users only knocked, left or were banned gets 403 from
//! `/backfill`, `/event`, `/state_ids` and `/get_missing_events`.

mod common;

use std::collections::{BTreeSet, HashMap};

use common::fake_resident::*;
use common::*;
use reqwest::Method;

const SETTINGS: [&str; 4] = ["world_readable", "shared", "invited", "joined"];

/// Membership histories of Bob: (name, steps), each step (who acts, membership). Alice sends `m0` before the
/// first step and `m{i}` after step i.
const HISTORIES: &[(&str, &[(&str, &str)])] = &[
    ("never", &[]),
    ("invited", &[("alice", "invite")]),
    ("rejected", &[("alice", "invite"), ("bob", "leave")]),
    ("joined", &[("alice", "invite"), ("bob", "join")]),
    ("left", &[("alice", "invite"), ("bob", "join"), ("bob", "leave")]),
    ("kicked", &[("alice", "invite"), ("bob", "join"), ("alice", "leave")]),
    ("banned", &[("alice", "invite"), ("bob", "join"), ("alice", "ban")]),
    ("kicked_banned", &[("alice", "invite"), ("bob", "join"), ("alice", "leave"), ("alice", "ban")]),
    ("reinvited", &[("alice", "invite"), ("bob", "join"), ("bob", "leave"), ("alice", "invite")]),
    ("rejoined", &[("alice", "invite"), ("bob", "join"), ("bob", "leave"), ("alice", "invite"), ("bob", "join")]),
    ("knocking", &[("bob", "knock")]),
    ("knocked", &[("bob", "knock"), ("bob", "leave")]),
    ("knock_rejected", &[("bob", "knock"), ("alice", "leave")]),
];

/// The messages (by index) Bob may see under the spec's rules, judged per event, before any cap at his leave.
fn judged(hv: &str, steps: &[(&str, &str)]) -> BTreeSet<usize> {
    // Bob's membership as of m{i}: after step i.
    let membership = |i: usize| if i == 0 { "none" } else { steps[i - 1].1 };
    let last_join = steps.iter().rposition(|s| s.1 == "join").map(|p| p + 1);
    (0..=steps.len())
        .filter(|&i| {
            let m = membership(i);
            m == "join"
                || match hv {
                    "world_readable" => true,
                    // Joined at any point after the event (m{i} comes after step i, before step i + 1).
                    "shared" => last_join.is_some_and(|j| j > i),
                    "invited" => m == "invite",
                    _ => false,
                }
        })
        .collect()
}

struct Case {
    hv: &'static str,
    name: &'static str,
    steps: &'static [(&'static str, &'static str)],
    room: String,
    /// Event id of each message m{i}.
    messages: Vec<String>,
}

impl Case {
    fn label(&self, i: usize) -> String {
        format!("{}-{}-m{i}", self.hv, self.name)
    }

    /// Bob's membership now.
    fn now(&self) -> &str {
        self.steps.last().map_or("none", |s| s.1)
    }

    fn ever_joined(&self) -> bool {
        self.steps.iter().any(|s| s.1 == "join")
    }

    /// Whether Bob may read the room's timeline and state (/messages, /state, /members): joined now, departed
    /// (any `leave`: left, kicked, rejected an invite, retracted a knock; or banned after a join), or a
    /// world-readable room. `/event` and `/context` are the judge's alone.
    fn readable(&self) -> bool {
        self.now() == "join" || self.departed() || self.hv == "world_readable"
    }

    /// The messages Bob sees: judged per event, and through `/sync`'s `leave` section or as a departed member
    /// (`capped`) only up to his leave.
    fn expected(&self, capped: bool) -> BTreeSet<usize> {
        let mut set = judged(self.hv, self.steps);
        if capped && matches!(self.now(), "leave" | "ban") {
            set.remove(&self.steps.len());
        }
        set
    }

    /// A departed user reads up to their leave (as Synapse's `allow_departed_users`); others (a world-readable
    /// room's readers, a banned user among them, as in Synapse) up to now.
    fn departed(&self) -> bool {
        self.now() == "leave" || (self.now() == "ban" && self.ever_joined() && self.hv != "world_readable")
    }

    fn seen_in(&self, bodies: &[String]) -> BTreeSet<usize> {
        (0..=self.steps.len()).filter(|&i| bodies.contains(&self.label(i))).collect()
    }
}

fn bodies(events: &[Value]) -> Vec<String> {
    events.iter().filter_map(|e| e["content"]["body"].as_str().map(str::to_owned)).collect()
}

async fn build_case(
    alice: &Client,
    bob: &Client,
    hv: &'static str,
    name: &'static str,
    steps: &'static [(&'static str, &'static str)],
) -> Case {
    let room = alice
        .create_room(json!({"preset": "private_chat", "initial_state": [
            {"type": "m.room.history_visibility", "content": {"history_visibility": hv}},
            {"type": "m.room.join_rules", "content": {"join_rule": "knock"}},
        ]}))
        .await;
    let mut case = Case { hv, name, steps, room, messages: Vec::new() };
    case.messages.push(alice.send_text(&case.room, &case.label(0)).await);
    let bob_id = bob.user_id.clone();
    for (i, (actor, membership)) in steps.iter().enumerate() {
        let r = enc(&case.room);
        match (*actor, *membership) {
            ("alice", "invite") => alice.invite(&case.room, &bob_id).await.ok(),
            ("alice", "leave") => alice.post(&format!("/rooms/{r}/kick"), json!({"user_id": bob_id})).await.ok(),
            ("alice", "ban") => alice.post(&format!("/rooms/{r}/ban"), json!({"user_id": bob_id})).await.ok(),
            ("bob", "join") => bob.join(&case.room).await.ok(),
            ("bob", "leave") => bob.leave(&case.room).await.ok(),
            ("bob", "knock") => bob.post(&format!("/knock/{r}"), json!({})).await.ok(),
            other => panic!("unknown step {other:?}"),
        };
        case.messages.push(alice.send_text(&case.room, &case.label(i + 1)).await);
    }
    case
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_visibility_x_membership_history_x_read_path() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let filter = json!({"room": {"include_leave": true, "timeline": {"limit": 100}}}).to_string();
    let before = bob.sync(None, &[("filter", &filter)]).await.ok()["next_batch"].as_str().unwrap().to_owned();
    let mut cases = Vec::new();
    for hv in SETTINGS {
        for (name, steps) in HISTORIES {
            cases.push(build_case(&alice, &bob, hv, name, steps).await);
        }
    }
    let initial = bob.sync(None, &[("filter", &filter)]).await.ok();
    let incremental = bob.sync(Some(&before), &[("filter", &filter)]).await.ok();
    for case in &cases {
        let what = format!("{} / {}", case.hv, case.name);
        // /sync: joined rooms up to now, left rooms up to the leave; invited and never-member rooms show nothing.
        for (kind, sync) in [("initial", &initial), ("incremental", &incremental)] {
            let section = match case.now() {
                "join" => "join",
                "leave" | "ban" => "leave",
                _ => "",
            };
            let room = &sync["rooms"][section][&case.room];
            let shown = case.seen_in(&bodies(&events_of(&room["timeline"])));
            if section.is_empty() {
                for sec in ["join", "leave"] {
                    assert!(sync["rooms"][sec].get(&case.room).is_none(), "{kind} sync, {what}: shown in {sec}");
                }
                continue;
            }
            assert!(room.is_object(), "{kind} sync, {what}: room missing from {section}: {}", sync["rooms"]);
            assert_eq!(shown, case.expected(true), "{kind} sync timeline, {what}");
            if !case.ever_joined() {
                // Never joined (a rejected invite, a retracted knock): only their own leave, none of the state.
                let tl = events_of(&room["timeline"]);
                assert!(
                    tl.iter().any(|e| e["type"] == "m.room.member" && e["state_key"] == json!(bob.user_id)),
                    "{what}"
                );
                assert!(events_of(&room["state"]).is_empty(), "{kind} sync, {what}: state {}", room["state"]);
            }
        }
        // /messages, /context, /event.
        let m = bob.messages(&case.room, &[("dir", "b"), ("limit", "100")]).await;
        if !case.readable() {
            m.assert_err(403, "M_FORBIDDEN");
        } else {
            let shown = case.seen_in(&bodies(m.ok()["chunk"].as_array().unwrap()));
            assert_eq!(shown, case.expected(case.departed()), "/messages, {what}");
        }
        // One event, and the events around it, by the judge alone: whatever Bob's membership now, no cap.
        let expected = case.expected(false);
        for (i, id) in case.messages.iter().enumerate() {
            let ev = bob.event(&case.room, id).await;
            assert_eq!(ev.status == 200, expected.contains(&i), "/event m{i}, {what}: {}", ev.status);
            let ctx = bob.get(&format!("/rooms/{}/context/{}?limit=20", enc(&case.room), enc(id))).await;
            assert_eq!(ctx.status == 200, expected.contains(&i), "/context m{i}, {what}: {}", ctx.status);
            if ctx.status == 200 {
                let body = ctx.ok();
                let mut around = bodies(body["events_before"].as_array().unwrap());
                around.extend(bodies(body["events_after"].as_array().unwrap()));
                let seen = case.seen_in(&around);
                assert!(seen.is_subset(&expected), "/context m{i}, {what}: saw {seen:?}");
            }
        }
        // Search covers the rooms Bob is joined to, each result judged.
        if case.now() == "join" {
            let r = bob
                .post(
                    "/search",
                    json!({"search_categories": {"room_events": {"search_term": case.name, "filter": {"rooms": [case.room]}}}}),
                )
                .await
                .ok();
            let results: Vec<Value> = r["search_categories"]["room_events"]["results"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x["result"].clone())
                .collect();
            assert_eq!(case.seen_in(&bodies(&results)), case.expected(true), "search, {what}");
        }
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_event_is_judged_by_the_setting_it_was_sent_under() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = alice
        .create_room(json!({"preset": "public_chat", "initial_state": [
            {"type": "m.room.history_visibility", "content": {"history_visibility": "joined"}}]}))
        .await;
    let hidden = alice.send_text(&room, "sent under joined").await;
    alice.put_state(&room, "m.room.history_visibility", "", json!({"history_visibility": "world_readable"})).await.ok();
    let open = alice.send_text(&room, "sent under world_readable").await;
    // Bob peeks (never a member): the world-readable room lets him read, each event by its own setting.
    let m = bob.messages(&room, &[("dir", "b"), ("limit", "50")]).await.ok();
    let seen = bodies(m["chunk"].as_array().unwrap());
    assert!(seen.contains(&"sent under world_readable".to_owned()), "{seen:?}");
    assert!(!seen.contains(&"sent under joined".to_owned()), "{seen:?}");
    bob.event(&room, &hidden).await.assert_err(404, "M_NOT_FOUND");
    bob.event(&room, &open).await.ok();
    // Joining later does not open `joined` history either.
    bob.join(&room).await.ok();
    let m = bob.messages(&room, &[("dir", "b"), ("limit", "50")]).await.ok();
    assert!(!bodies(m["chunk"].as_array().unwrap()).contains(&"sent under joined".to_owned()));
    let sync = bob.sync(None, &[]).await.ok();
    assert!(!bodies(&events_of(&sync["rooms"]["join"][&room]["timeline"])).contains(&"sent under joined".to_owned()));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_at_a_token_and_relations_follow_visibility() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let carol = s.user("carol").await;
    let room = alice
        .create_room(json!({"preset": "public_chat", "initial_state": [
            {"type": "m.room.history_visibility", "content": {"history_visibility": "joined"}}]}))
        .await;
    let parent = alice.send_text(&room, "before bob").await;
    let before_bob = alice.sync(None, &[]).await.ok()["next_batch"].as_str().unwrap().to_owned();
    bob.join(&room).await.ok();
    let r = enc(&room);
    // A relation of an event Bob may not see: 404 for the parent; relations sent after his join of a hidden
    // parent are still under a hidden parent.
    let reply =
        json!({"msgtype": "m.text", "body": "reply", "m.relates_to": {"event_id": parent, "rel_type": "m.thread"}});
    alice.send(&room, "m.room.message", reply).await.ok();
    let rel = bob.get(&format!("/_matrix/client/v1/rooms/{r}/relations/{}", enc(&parent))).await;
    assert_eq!(rel.status, 404, "relations of a hidden parent: {}", rel.status);
    // /members?at: the state at a point Bob may see; a future token is the present; a point before his join, or
    // after his leave in a `joined` room, is 403; a token that does not parse is 400.
    let token = bob.sync(None, &[]).await.ok()["next_batch"].as_str().unwrap().to_owned();
    let at = |t: String| {
        let bob = &bob;
        let r = r.clone();
        async move { bob.get(&format!("/rooms/{r}/members?at={}", enc(&t))).await }
    };
    let now = at(token.clone()).await.ok();
    assert!(now["chunk"].as_array().unwrap().iter().any(|m| m["state_key"] == json!(bob.user_id)));
    at("s999999999_0".into()).await.ok();
    at(before_bob).await.assert_err(403, "M_FORBIDDEN");
    at("garbage".into()).await.assert_err(400, "M_INVALID_PARAM");
    carol.join(&room).await.ok();
    bob.leave(&room).await.ok();
    alice.send_text(&room, "after bob left").await;
    // Departed: the members at his leave by default; a token after the leave shows nothing new.
    let members = bob.get(&format!("/rooms/{r}/members")).await.ok();
    assert!(members["chunk"].as_array().unwrap().iter().any(|m| m["state_key"] == json!(bob.user_id)));
    at("s999999999_0".into()).await.assert_err(403, "M_FORBIDDEN");
    s.stop().await;
}

// ---- other servers ----------------------------------------------------------------------------------------------

/// `user` of the fake joins (`make_join`/`send_join`) or knocks (`make_knock`/`send_knock`) on Hearth's room.
async fn peer_membership(fake: &FakeResident, room: &str, user: &str, kind: &str) {
    let vers: String = (1..=12).map(|v| format!("ver={v}")).collect::<Vec<_>>().join("&");
    let path = format!("/_matrix/federation/v1/make_{kind}/{}/{}?{vers}", enc(room), enc(user));
    let made = fake.request_hearth(Method::GET, &path, None).await.unwrap_or_else(|e| panic!("make_{kind}: {e:?}"));
    let version = made["room_version"].as_str().expect("room_version").to_owned();
    let (id, ev) = sign_template(fake, &version, &made["event"]);
    let send = if kind == "join" { "v2/send_join" } else { "v1/send_knock" };
    let path = format!("/_matrix/federation/{send}/{}/{}", enc(room), enc(&id));
    fake.request_hearth(Method::PUT, &path, Some(&ev)).await.unwrap_or_else(|e| panic!("send_{kind}: {e:?}"));
}

async fn server_reads(fake: &FakeResident, room: &str, event: &str) -> HashMap<&'static str, (u16, String)> {
    let (r, e) = (enc(room), enc(event));
    let reads: [(&'static str, Method, String, Option<Value>); 4] = [
        ("backfill", Method::GET, format!("/_matrix/federation/v1/backfill/{r}?v={e}&limit=10"), None),
        ("event", Method::GET, format!("/_matrix/federation/v1/event/{e}"), None),
        ("state_ids", Method::GET, format!("/_matrix/federation/v1/state_ids/{r}?event_id={e}"), None),
        (
            "get_missing_events",
            Method::POST,
            format!("/_matrix/federation/v1/get_missing_events/{r}"),
            Some(json!({"earliest_events": [], "latest_events": [event], "limit": 10})),
        ),
    ];
    let mut out = HashMap::new();
    for (name, method, path, body) in reads {
        let answer = match fake.request_hearth(method, &path, body.as_ref()).await {
            Ok(v) => (200, v.to_string()),
            Err((status, v)) => (status, v.to_string()),
        };
        out.insert(name, answer);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_without_a_joined_user_may_not_read_the_room() {
    let fake =
        FakeResident::start_named(RoomSpec { members: 0, messages: 0, ..RoomSpec::default() }, "other.example").await;
    let hearth = start_hearth_with_fakes(&[&fake], |_| {}).await;
    let alice = hearth.user("alice").await;
    for ending in ["knocked", "left", "banned", "never"] {
        let room = alice
            .create_room(json!({"preset": "public_chat", "initial_state": [
                {"type": "m.room.join_rules", "content": {"join_rule": if ending == "knocked" { "knock" } else { "public" }}},
                {"type": "m.room.history_visibility", "content": {"history_visibility": "shared"}}]}))
            .await;
        let secret = alice.send_text(&room, &format!("secret {ending}")).await;
        let mallory = fake.user(&format!("mallory-{ending}"));
        match ending {
            "knocked" => peer_membership(&fake, &room, &mallory, "knock").await,
            "left" | "banned" => {
                peer_membership(&fake, &room, &mallory, "join").await;
                // While joined the server reads the room.
                let reads = server_reads(&fake, &room, &secret).await;
                for (name, (status, body)) in &reads {
                    assert_eq!(*status, 200, "{name} while joined: {body}");
                }
                let action = if ending == "left" { "kick" } else { "ban" };
                alice.post(&format!("/rooms/{}/{action}", enc(&room)), json!({"user_id": mallory})).await.ok();
            }
            _ => {}
        }
        let after = alice.send_text(&room, &format!("after {ending}")).await;
        for ev in [&secret, &after] {
            for (name, (status, body)) in server_reads(&fake, &room, ev).await {
                assert_eq!(status, 403, "{name} by a server that {ending}: {body}");
                assert!(body.contains("M_FORBIDDEN"), "{name}: {body}");
                assert!(!body.contains("secret") && !body.contains("after "), "{name}: {body}");
            }
        }
    }
    hearth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_loaded_members_in_messages_are_those_at_the_events() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    bob.join(&room).await.ok();
    let alice_id = alice.user_id.clone();
    let member = json!({"membership": "join", "displayname": "Old Alice"});
    alice.put_state(&room, "m.room.member", &alice_id, member).await.ok();
    alice.send_text(&room, "said by old alice").await;
    let token = bob.sync(None, &[]).await.ok()["next_batch"].as_str().unwrap().to_owned();
    let member = json!({"membership": "join", "displayname": "New Alice"});
    alice.put_state(&room, "m.room.member", &alice_id, member).await.ok();
    let filter = json!({"lazy_load_members": true, "types": ["m.room.message"]}).to_string();
    let page = bob.messages(&room, &[("dir", "b"), ("limit", "1"), ("from", &token), ("filter", &filter)]).await.ok();
    assert_eq!(bodies(page["chunk"].as_array().unwrap()), ["said by old alice"]);
    let state = page["state"].as_array().unwrap();
    let m = state.iter().find(|e| e["state_key"] == json!(alice_id)).expect("alice's membership");
    assert_eq!(m["content"]["displayname"], "Old Alice", "{m}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundled_thread_summaries_and_edits_are_judged_too() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    bob.join(&room).await.ok();
    let root = alice.send_text(&room, "thread root").await;
    bob.leave(&room).await.ok();
    let reply = json!({"msgtype": "m.text", "body": "reply after bob left", "m.relates_to": {"event_id": root, "rel_type": "m.thread"}});
    alice.send(&room, "m.room.message", reply).await.ok();
    let edit = json!({"msgtype": "m.text", "body": "* edited after bob left", "m.new_content": {"msgtype": "m.text", "body": "edited after bob left"},
                      "m.relates_to": {"event_id": root, "rel_type": "m.replace"}});
    alice.send(&room, "m.room.message", edit).await.ok();
    // Alice sees both bundled; Bob (departed) sees the root, without what came after his leave.
    let mine = alice.event(&room, &root).await.ok().to_string();
    assert!(mine.contains("reply after bob left") && mine.contains("edited after bob left"), "{mine}");
    let his = bob.event(&room, &root).await.ok().to_string();
    assert!(!his.contains("after bob left"), "{his}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_count_counts_only_what_the_user_may_see() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = alice
        .create_room(json!({"preset": "public_chat", "initial_state": [
            {"type": "m.room.history_visibility", "content": {"history_visibility": "joined"}}]}))
        .await;
    alice.send_text(&room, "needle before bob").await;
    bob.join(&room).await.ok();
    let search = |term: &'static str| {
        let (bob, room) = (&bob, room.clone());
        async move {
            let body =
                json!({"search_categories": {"room_events": {"search_term": term, "filter": {"rooms": [room]}}}});
            bob.post("/search", body).await.ok()["search_categories"]["room_events"].clone()
        }
    };
    alice.send_text(&room, "needle after bob").await;
    let found = search("needle").await;
    assert_eq!(
        bodies(&found["results"].as_array().unwrap().iter().map(|r| r["result"].clone()).collect::<Vec<_>>()),
        ["needle after bob"]
    );
    assert_eq!(found["count"], 1, "{found}");
    // A hidden match does not change the count; a visible one does.
    let other = alice.create_room(json!({"preset": "public_chat"})).await;
    alice.send_text(&other, "needle in a room bob is not in").await;
    alice.send_text(&room, "needle two after bob").await;
    assert_eq!(search("needle").await["count"], 2);
    s.stop().await;
}
