//! Spaces as a user sees them: `/hierarchy` (order, visibility, paging, `max_depth`, `suggested_only`), the room
//! summary (`/room_summary`, MSC3266) and both across two servers (the federation `/hierarchy`).

mod common;

use std::time::Duration;

use common::fake_resident::federated_pair;
use common::*;

const WAIT: Duration = Duration::from_secs(20);

fn hierarchy_path(room: &str, params: &[(&str, &str)]) -> String {
    format!("/_matrix/client/v1/rooms/{}/hierarchy{}", enc(room), query(params))
}

fn ids(page: &Value) -> Vec<String> {
    page["rooms"].as_array().unwrap().iter().map(|r| r["room_id"].as_str().unwrap().to_owned()).collect()
}

fn room<'a>(page: &'a Value, id: &str) -> &'a Value {
    page["rooms"].as_array().unwrap().iter().find(|r| r["room_id"] == id).unwrap_or_else(|| panic!("{id} in {page}"))
}

fn children(entry: &Value) -> Vec<String> {
    entry["children_state"].as_array().unwrap().iter().map(|e| e["state_key"].as_str().unwrap().to_owned()).collect()
}

async fn space(c: &Client, name: &str, extra: Value) -> String {
    let mut body = json!({"preset": "public_chat", "name": name, "creation_content": {"type": "m.space"}});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    c.create_room(body).await
}

async fn link(c: &Client, parent: &str, child: &str, content: Value) {
    c.put_state(parent, "m.space.child", child, content).await.ok();
}

/// A space's children come in the spec's order (`order`, then link time, then room id), depth first; a user sees
/// public rooms and rooms they are in, not private rooms they are not invited to; a link without `via` (a removed
/// one) is no link; the summary fields and the stripped link events are there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_space_lists_its_children_in_order_and_only_those_the_user_may_see() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let via = json!([server.server_name]);
    let root = space(&alice, "Root", json!({"topic": "the root"})).await;
    let sub = space(&alice, "Sub", json!({})).await;
    let first = alice.create_room(json!({"preset": "public_chat", "name": "First"})).await;
    let last = alice.create_room(json!({"preset": "public_chat", "name": "Last"})).await;
    let inner = alice.create_room(json!({"preset": "public_chat", "name": "Inner"})).await;
    let private = alice.create_room(json!({"preset": "private_chat", "name": "Private"})).await;
    let removed = alice.create_room(json!({"preset": "public_chat"})).await;
    // Linked in this order, but "order" puts `first` before `sub`, and rooms without one come last.
    link(&alice, &root, &last, json!({"via": via})).await;
    link(&alice, &root, &sub, json!({"via": via, "order": "b"})).await;
    link(&alice, &root, &first, json!({"via": via, "order": "a", "suggested": true})).await;
    link(&alice, &root, &private, json!({"via": via})).await;
    link(&alice, &root, &removed, json!({})).await;
    link(&alice, &sub, &inner, json!({"via": via})).await;
    bob.join(&root).await.ok();

    let page = bob.get(&hierarchy_path(&root, &[])).await.ok();
    assert_eq!(ids(&page), vec![root.clone(), first.clone(), sub.clone(), inner.clone(), last.clone()], "{page}");
    assert!(page.get("next_batch").is_none(), "one page holds it all: {page}");
    let r = room(&page, &root);
    assert_eq!(children(r), vec![first.clone(), sub.clone(), last.clone(), private.clone()], "links: {r}");
    assert_eq!((r["name"].as_str(), r["topic"].as_str()), (Some("Root"), Some("the root")));
    assert_eq!((r["room_type"].as_str(), r["join_rule"].as_str()), (Some("m.space"), Some("public")));
    assert_eq!(r["num_joined_members"], 2);
    assert_eq!((r["world_readable"].as_bool(), r["guest_can_join"].as_bool()), (Some(false), Some(false)));
    let ev = &r["children_state"][0];
    assert_eq!((ev["type"].as_str(), ev["sender"].as_str()), (Some("m.space.child"), Some(alice.user_id.as_str())));
    assert!(ev["origin_server_ts"].as_i64().is_some_and(|t| t > 0), "{ev}");
    assert!(ev.get("event_id").is_none(), "stripped: {ev}");
    assert_eq!(room(&page, &first)["children_state"], json!([]), "a room that is not a space has no links");

    // Alice is in the private room: she sees it.
    let page = alice.get(&hierarchy_path(&root, &[])).await.ok();
    assert!(ids(&page).contains(&private), "{page}");
    // Invited, bob sees it too.
    alice.invite(&private, &bob.user_id).await.ok();
    let page = bob.get(&hierarchy_path(&root, &[])).await.ok();
    assert!(ids(&page).contains(&private), "{page}");
}

/// `max_depth`, `suggested_only`, and paging with `limit` and `next_batch`; the token is tied to the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hierarchy_pages_and_filters() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let via = json!([server.server_name]);
    let root = space(&alice, "Root", json!({})).await;
    let sub = space(&alice, "Sub", json!({})).await;
    let a = alice.create_room(json!({"preset": "public_chat"})).await;
    let b = alice.create_room(json!({"preset": "public_chat"})).await;
    link(&alice, &root, &sub, json!({"via": via, "order": "1", "suggested": true})).await;
    link(&alice, &root, &b, json!({"via": via, "order": "2"})).await;
    link(&alice, &sub, &a, json!({"via": via})).await;

    let page = alice.get(&hierarchy_path(&root, &[("max_depth", "1")])).await.ok();
    assert_eq!(ids(&page), vec![root.clone(), sub.clone(), b.clone()]);
    assert_eq!(children(room(&page, &sub)), vec![a.clone()], "the links below max_depth are still shown");
    let page = alice.get(&hierarchy_path(&root, &[("max_depth", "0")])).await.ok();
    assert_eq!(ids(&page), vec![root.clone()]);

    let page = alice.get(&hierarchy_path(&root, &[("suggested_only", "true")])).await.ok();
    assert_eq!(ids(&page), vec![root.clone(), sub.clone()], "only suggested links (sub's link to a is not)");
    assert_eq!(children(room(&page, &root)), vec![sub.clone()]);

    let mut seen = Vec::new();
    let mut from: Option<String> = None;
    for _ in 0..10 {
        let mut params = vec![("limit", "1")];
        if let Some(f) = &from {
            params.push(("from", f.as_str()));
        }
        let page = alice.get(&hierarchy_path(&root, &params)).await.ok();
        seen.extend(ids(&page));
        from = page["next_batch"].as_str().map(str::to_owned);
        if from.is_none() {
            break;
        }
    }
    assert_eq!(seen, vec![root.clone(), sub.clone(), a.clone(), b.clone()], "pages in walk order, once each");

    let page = alice.get(&hierarchy_path(&root, &[("limit", "2")])).await.ok();
    let token = page["next_batch"].as_str().unwrap().to_owned();
    let changed = alice.get(&hierarchy_path(&root, &[("from", &token), ("suggested_only", "true")])).await;
    changed.assert_err(400, "M_INVALID_PARAM");
    alice.get(&hierarchy_path(&root, &[("from", "nonsense")])).await.assert_err(400, "M_INVALID_PARAM");
    alice.get(&hierarchy_path(&root, &[("limit", "0")])).await.assert_err(400, "M_INVALID_PARAM");
    alice.get(&hierarchy_path(&root, &[("max_depth", "-1")])).await.assert_err(400, "M_INVALID_PARAM");
    for bad in ["", "maybe"] {
        alice.get(&hierarchy_path(&root, &[("suggested_only", bad)])).await.assert_err(400, "M_INVALID_PARAM");
    }
    let unknown = format!("!nowhere:{}", server.server_name);
    alice.get(&hierarchy_path(&unknown, &[])).await.assert_err(403, "M_FORBIDDEN");
}

/// A private space shows nothing to an outsider (403); a restricted room appears once the user is in the room
/// its rule allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restricted_and_private_rooms_follow_membership() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let via = json!([server.server_name]);
    let root = space(&alice, "Root", json!({})).await;
    let secret = space(&alice, "Secret", json!({"preset": "private_chat"})).await;
    let restricted = alice
        .create_room(json!({"room_version": "10", "preset": "public_chat", "initial_state": [{
            "type": "m.room.join_rules", "state_key": "",
            "content": {"join_rule": "restricted", "allow": [{"type": "m.room_membership", "room_id": root}]}}]}))
        .await;
    link(&alice, &root, &restricted, json!({"via": via})).await;
    bob.get(&hierarchy_path(&secret, &[])).await.assert_err(403, "M_FORBIDDEN");

    let page = bob.get(&hierarchy_path(&root, &[])).await.ok();
    assert_eq!(ids(&page), vec![root.clone()], "bob is not in the allowed room yet");
    bob.join(&root).await.ok();
    let page = bob.get(&hierarchy_path(&root, &[])).await.ok();
    assert_eq!(ids(&page), vec![root.clone(), restricted.clone()]);
    assert_eq!(room(&page, &restricted)["allowed_room_ids"], json!([root]));
    assert_eq!(room(&page, &restricted)["join_rule"], "restricted");
}

/// `/room_summary`: the summary with the user's membership, `allowed_room_ids` for a restricted room only, by id or
/// alias, without a token for a public room, and 404 for a room the user may not see.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_summary_shows_what_a_preview_needs() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let public = alice
        .create_room(json!({"preset": "public_chat", "name": "Lobby", "room_alias_name": "lobby",
            "initial_state": [{"type": "m.room.encryption", "state_key": "",
                "content": {"algorithm": "m.megolm.v1.aes-sha2"}}]}))
        .await;
    let private = alice.create_room(json!({"preset": "private_chat"})).await;
    let restricted = alice
        .create_room(json!({"room_version": "9", "preset": "public_chat", "initial_state": [{
            "type": "m.room.join_rules", "state_key": "",
            "content": {"join_rule": "restricted", "allow": [{"type": "m.room_membership", "room_id": public}]}}]}))
        .await;
    let summary = |c: &Client, r: &str| {
        let (c, path) = (c.clone(), format!("/_matrix/client/v1/room_summary/{}", enc(r)));
        async move { c.get(&path).await }
    };

    let s = summary(&bob, &public).await.ok();
    assert_eq!((s["room_id"].as_str(), s["name"].as_str()), (Some(public.as_str()), Some("Lobby")));
    assert_eq!((s["membership"].as_str(), s["join_rule"].as_str()), (Some("leave"), Some("public")));
    assert_eq!(s["encryption"], "m.megolm.v1.aes-sha2");
    assert_eq!(s["room_version"].as_str().map(|v| !v.is_empty()), Some(true));
    assert!(s.get("allowed_room_ids").is_none(), "{s}");
    let by_alias = summary(&alice, &format!("#lobby:{}", server.server_name)).await.ok();
    assert_eq!((by_alias["room_id"].as_str(), by_alias["membership"].as_str()), (Some(public.as_str()), Some("join")));
    let anonymous = summary(&server.client(), &public).await.ok();
    assert!(anonymous.get("membership").is_none(), "no membership without a user: {anonymous}");

    let s = summary(&alice, &restricted).await.ok();
    assert_eq!((s["join_rule"].clone(), s["allowed_room_ids"].clone()), (json!("restricted"), json!([public])));
    assert_eq!(summary(&alice, &private).await.ok()["membership"], "join");
    summary(&bob, &private).await.assert_err(404, "M_NOT_FOUND");
    summary(&server.client(), &private).await.assert_err(404, "M_NOT_FOUND");
    alice.invite(&private, &bob.user_id).await.ok();
    assert_eq!(summary(&bob, &private).await.ok()["membership"], "invite");
    summary(&bob, &format!("#nothing:{}", server.server_name)).await.assert_err(404, "M_NOT_FOUND");
    // The unstable path clients used before the stable one.
    let unstable = format!("/_matrix/client/unstable/im.nheko.summary/summary/{}", enc(&public));
    assert_eq!(bob.get(&unstable).await.ok()["room_id"], public);
}

/// Across servers: a space on one server lists rooms only the other holds (asked with the federation
/// `/hierarchy`), a restricted room there appears only to members of the allowed space once that server can tell,
/// a private one never; `/room_summary` of a remote room works through `via`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_space_reaches_rooms_on_another_server() {
    let (a, b) = federated_pair().await;
    let alice = a.user("alice").await;
    let carol = a.user("carol").await;
    let bob = b.user("bob").await;
    let root = space(&alice, "Root", json!({})).await;
    let remote_space = space(&bob, "Remote space", json!({})).await;
    let remote_room = bob.create_room(json!({"preset": "public_chat", "name": "Remote room"})).await;
    let remote_private = bob.create_room(json!({"preset": "private_chat"})).await;
    let remote_restricted = bob
        .create_room(json!({"room_version": "10", "preset": "public_chat", "initial_state": [{
            "type": "m.room.join_rules", "state_key": "",
            "content": {"join_rule": "restricted", "allow": [{"type": "m.room_membership", "room_id": root}]}}]}))
        .await;
    let via_b = json!([b.server_name]);
    link(&alice, &root, &remote_space, json!({"via": via_b, "order": "1"})).await;
    link(&alice, &root, &remote_private, json!({"via": via_b, "order": "2"})).await;
    link(&alice, &root, &remote_restricted, json!({"via": via_b, "order": "3"})).await;
    link(&bob, &remote_space, &remote_room, json!({"via": via_b})).await;

    let page = alice.get(&hierarchy_path(&root, &[])).await.ok();
    assert_eq!(ids(&page), vec![root.clone(), remote_space.clone(), remote_room.clone()], "{page}");
    assert_eq!(children(room(&page, &remote_space)), vec![remote_room.clone()]);
    assert_eq!(room(&page, &remote_room)["name"], "Remote room");

    // Once bob's server is in the allowed space it can tell that alice's server has a member there.
    bob.post(&format!("/join/{}?via={}", enc(&root), enc(&a.server_name)), json!({})).await.ok();
    let expected = vec![root.clone(), remote_space.clone(), remote_room.clone(), remote_restricted.clone()];
    wait_until("the restricted room in alice's hierarchy", WAIT, || async {
        (ids(&alice.get(&hierarchy_path(&root, &[])).await.ok()) == expected).then_some(())
    })
    .await;
    let page = carol.get(&hierarchy_path(&root, &[])).await.ok();
    assert!(!ids(&page).contains(&remote_restricted), "carol is not in the space: {page}");

    let path = format!("/_matrix/client/v1/room_summary/{}?via={}", enc(&remote_room), enc(&b.server_name));
    let s = carol.get(&path).await.ok();
    assert_eq!((s["name"].as_str(), s["membership"].as_str()), (Some("Remote room"), Some("leave")));
    let path = format!("/_matrix/client/v1/room_summary/{}?via={}", enc(&remote_private), enc(&b.server_name));
    carol.get(&path).await.assert_err(404, "M_NOT_FOUND");
}

/// What another server sees of our spaces (the federation `/hierarchy`): the space with its links, the children it
/// may see, the ids of those it may not, 404 for a room hidden from it; and what a server's answer may put in front
/// of our users: only the spec's fields, of the spec's types.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_sees_what_it_may_and_its_answers_are_kept_to_the_spec() {
    use common::fake_resident::{start_hearth_with_fakes, FakeResident, RoomSpec, Script};
    let fake = FakeResident::start(RoomSpec { members: 0, messages: 0, ..Default::default() }).await;
    let hearth = start_hearth_with_fakes(&[&fake], |_| {}).await;
    let alice = hearth.user("alice").await;
    let via = json!([hearth.server_name]);
    let root = space(&alice, "Root", json!({})).await;
    let public = alice.create_room(json!({"preset": "public_chat", "name": "Public"})).await;
    let private = alice.create_room(json!({"preset": "private_chat"})).await;
    let hidden_space = space(&alice, "Hidden", json!({"preset": "private_chat"})).await;
    let remote = format!("!remote:{}", fake.name);
    link(&alice, &root, &public, json!({"via": via, "order": "1"})).await;
    link(&alice, &root, &private, json!({"via": via, "order": "2"})).await;
    link(&alice, &root, &remote, json!({"via": [fake.name], "order": "3", "suggested": true})).await;

    let path = format!("/_matrix/federation/v1/hierarchy/{}", enc(&root));
    let answer = fake.request_hearth(reqwest::Method::GET, &path, None).await.expect("hierarchy answer");
    assert_eq!(answer["room"]["room_id"], root);
    assert_eq!(children(&answer["room"]), vec![public.clone(), private.clone(), remote.clone()]);
    let child_ids: Vec<&str> =
        answer["children"].as_array().unwrap().iter().filter_map(|c| c["room_id"].as_str()).collect();
    assert_eq!(child_ids, vec![public.as_str()], "{answer}");
    assert_eq!(answer["inaccessible_children"], json!([private]));
    let suggested = fake.request_hearth(reqwest::Method::GET, &format!("{path}?suggested_only=true"), None).await;
    assert_eq!(children(&suggested.expect("suggested answer")["room"]), vec![remote.clone()]);
    let path = format!("/_matrix/federation/v1/hierarchy/{}", enc(&hidden_space));
    assert_eq!(fake.request_hearth(reqwest::Method::GET, &path, None).await.unwrap_err().0, 404);

    fake.script(
        "hierarchy",
        Script::json(
            200,
            json!({
                "room": {"room_id": remote, "world_readable": true, "num_joined_members": 3, "name": 42,
                    "avatar_url": "https://not-mxc.example/a.png", "evil": "field", "encryption": "rot13",
                    "children_state": [{"type": "m.space.child", "state_key": "not a room id",
                        "content": {"via": ["x"]}, "sender": "@x:y", "origin_server_ts": 1}]},
                "children": [{"no": "room id"}], "inaccessible_children": [],
            }),
        ),
    );
    let page = alice.get(&hierarchy_path(&root, &[])).await.ok();
    let r = room(&page, &remote);
    let mut keys: Vec<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, vec!["children_state", "guest_can_join", "num_joined_members", "room_id", "world_readable"]);
    assert_eq!(r["num_joined_members"], 3);
}
