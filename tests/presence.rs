//! Presence as users and peers see it: `PUT`/`GET /presence/{userId}/status`, `set_presence` on `/sync`, `m.presence`
//! in `/sync` for users sharing a room (initial, incremental, and for members new to the syncing user), `m.presence`
//! EDUs to and from other servers, and the `presence.enabled` switch.

mod common;

use std::time::Duration;

use common::fake_resident::*;
use common::*;

const WAIT: Duration = Duration::from_secs(20);

fn status_path(user_id: &str) -> String {
    format!("/presence/{}/status", enc(user_id))
}

/// The `m.presence` event of `user` in a sync answer.
fn presence_of(sync: &Value, user: &str) -> Option<Value> {
    events_of(&sync["presence"]).into_iter().find(|e| e["sender"] == user)
}

fn next_batch(sync: &Value) -> String {
    sync["next_batch"].as_str().expect("next_batch").to_owned()
}

/// Syncs from `since` (long-polling, without changing the syncing user's presence) until `user`'s presence satisfies
/// `want`; returns that event.
async fn wait_presence(c: &Client, since: &str, user: &str, want: impl Fn(&Value) -> bool) -> Value {
    let since = std::sync::Mutex::new(since.to_owned());
    wait_until(&format!("{user}'s presence in {}'s sync", c.user_id), WAIT, || async {
        let from = since.lock().unwrap().clone();
        let sync = c.sync(Some(&from), &[("timeout", "1000"), ("set_presence", "offline")]).await.ok();
        *since.lock().unwrap() = next_batch(&sync);
        presence_of(&sync, user).filter(|e| want(e))
    })
    .await
}

/// A fresh token of `c` (an initial sync that leaves presence alone).
async fn token(c: &Client) -> String {
    next_batch(&c.sync(None, &[("set_presence", "offline")]).await.ok())
}

#[tokio::test]
async fn room_members_see_presence_changes_and_others_do_not() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let carol = s.user("carol").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    bob.join(&room).await.ok();
    let (bob_since, carol_since) = (token(&bob).await, token(&carol).await);

    alice.put(&status_path(&alice.user_id), json!({"presence": "online", "status_msg": "here"})).await.ok();
    let seen = wait_presence(&bob, &bob_since, &alice.user_id, |e| e["content"]["presence"] == "online").await;
    assert_eq!(seen["type"], "m.presence");
    assert_eq!(seen["content"]["status_msg"], "here");
    assert_eq!(seen["content"]["currently_active"], true);
    assert!(seen["content"]["last_active_ago"].as_i64().is_some_and(|a| a >= 0), "{seen}");

    // GET: one's own and a room member's; a stranger's is forbidden (as Synapse).
    let own = alice.get(&status_path(&alice.user_id)).await.ok();
    assert_eq!((own["presence"].as_str(), own["status_msg"].as_str()), (Some("online"), Some("here")));
    assert_eq!(bob.get(&status_path(&alice.user_id)).await.ok()["presence"], "online");
    carol.get(&status_path(&alice.user_id)).await.assert_err(403, "M_FORBIDDEN");
    // Carol shares no room with alice: her sync (the PUT above is committed) carries nothing of alice.
    let carol_sync = carol.sync(Some(&carol_since), &[("set_presence", "offline")]).await.ok();
    assert_eq!(presence_of(&carol_sync, &alice.user_id), None, "{carol_sync}");

    // An initial sync shows the presence of everyone visible who is not offline.
    let initial = bob.sync(None, &[("set_presence", "offline")]).await.ok();
    assert_eq!(presence_of(&initial, &alice.user_id).unwrap()["content"]["presence"], "online");

    // A PUT without status_msg clears it; `unavailable` reaches room members.
    let since = next_batch(&initial);
    alice.put(&status_path(&alice.user_id), json!({"presence": "unavailable"})).await.ok();
    let seen = wait_presence(&bob, &since, &alice.user_id, |e| e["content"]["presence"] == "unavailable").await;
    assert_eq!(seen["content"].get("status_msg"), None, "{seen}");
    s.stop().await;
}

#[tokio::test]
async fn sync_sets_presence_unless_told_offline() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    bob.join(&room).await.ok();
    let since = token(&bob).await;

    // set_presence=offline leaves presence alone: alice is still offline (never seen).
    alice.sync(None, &[("set_presence", "offline")]).await.ok();
    assert_eq!(bob.get(&status_path(&alice.user_id)).await.ok(), json!({"presence": "offline"}));
    // The default is online, and the syncing user sees their own presence.
    let own = alice.sync(None, &[]).await.ok();
    assert_eq!(presence_of(&own, &alice.user_id).unwrap()["content"]["presence"], "online");
    wait_presence(&bob, &since, &alice.user_id, |e| e["content"]["presence"] == "online").await;
    let since = token(&bob).await;
    alice.sync(None, &[("set_presence", "unavailable")]).await.ok();
    wait_presence(&bob, &since, &alice.user_id, |e| e["content"]["presence"] == "unavailable").await;
    // A presence filter can leave presence out.
    let filtered =
        bob.sync(None, &[("set_presence", "offline"), ("filter", r#"{"presence":{"not_types":["*"]}}"#)]).await.ok();
    assert_eq!(filtered["presence"]["events"], json!([]));
    s.stop().await;
}

#[tokio::test]
async fn users_new_to_each_other_get_each_others_presence_in_incremental_sync() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    alice.put(&status_path(&alice.user_id), json!({"presence": "online", "status_msg": "host"})).await.ok();
    bob.put(&status_path(&bob.user_id), json!({"presence": "online", "status_msg": "guest"})).await.ok();
    let (alice_since, bob_since) = (token(&alice).await, token(&bob).await);

    // Both presences were set before the tokens: only the join makes them visible to each other.
    bob.join(&room).await.ok();
    let to_alice = alice.sync(Some(&alice_since), &[("set_presence", "offline")]).await.ok();
    assert_eq!(presence_of(&to_alice, &bob.user_id).unwrap()["content"]["status_msg"], "guest", "{to_alice}");
    let to_bob = bob.sync(Some(&bob_since), &[("set_presence", "offline")]).await.ok();
    assert_eq!(presence_of(&to_bob, &alice.user_id).unwrap()["content"]["status_msg"], "host", "{to_bob}");
    // One event per user.
    let senders: Vec<Value> = events_of(&to_bob["presence"]).iter().map(|e| e["sender"].clone()).collect();
    let mut unique = senders.clone();
    unique.dedup();
    assert_eq!(senders.len(), unique.len(), "{senders:?}");
    s.stop().await;
}

#[tokio::test]
async fn presence_off_reads_everyone_offline() {
    let s = TestServer::start_with(|c| c.presence.enabled = false).await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let me = alice.user_id.clone();
    alice.put(&status_path(&me), json!({"presence": "online", "status_msg": "here"})).await.ok();
    assert_eq!(bob.get(&status_path(&me)).await.ok(), json!({"presence": "offline"}));
    assert_eq!(alice.sync(None, &[("set_presence", "online")]).await.ok()["presence"]["events"], json!([]));
    s.stop().await;
}

#[tokio::test]
async fn bad_presence_requests_are_refused() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let me = alice.user_id.clone();
    bob.put(&status_path(&me), json!({"presence": "online"})).await.assert_err(403, "M_FORBIDDEN");
    alice.put(&status_path(&me), json!({"presence": "dancing"})).await.assert_err(400, "M_INVALID_PARAM");
    let long = "x".repeat(5000);
    alice
        .put(&status_path(&me), json!({"presence": "online", "status_msg": long}))
        .await
        .assert_err(400, "M_INVALID_PARAM");
    alice.get("/presence/not-a-user/status").await.assert_err(400, "M_INVALID_PARAM");
    alice.sync(None, &[("set_presence", "dancing")]).await.assert_err(400, "M_INVALID_PARAM");
    s.client().get(&status_path(&me)).await.assert_err(401, "M_MISSING_TOKEN");
    s.stop().await;
}

/// Two Hearths: presence changes of a user reach the members of their rooms on the other server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_reaches_room_members_on_other_servers() {
    let (a, b) = federated_pair().await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    let path = format!("/join/{}?server_name={}", enc(&room), enc("hearth-a.test"));
    bob.post(&path, json!({})).await.ok();
    let since = token(&bob).await;

    alice.put(&status_path(&alice.user_id), json!({"presence": "online", "status_msg": "from a"})).await.ok();
    let seen = wait_presence(&bob, &since, &alice.user_id, |e| e["content"]["status_msg"] == "from a").await;
    assert_eq!(seen["content"]["presence"], "online");
    alice.put(&status_path(&alice.user_id), json!({"presence": "unavailable"})).await.ok();
    wait_presence(&bob, &since, &alice.user_id, |e| e["content"]["presence"] == "unavailable").await;
    assert_eq!(bob.get(&status_path(&alice.user_id)).await.ok()["presence"], "unavailable");
}

/// A peer's `m.presence` EDUs count for its own users who share a room with ours; entries about users of other
/// servers, or about users sharing no room with ours, are ignored. Our users' presence goes to the peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_presence_edus_count_only_for_its_own_users_in_our_rooms() {
    let fake = FakeResident::start(RoomSpec { members: 2, messages: 0, ..RoomSpec::default() }).await;
    let hearth = start_hearth_with_fakes(&[&fake], |c| c.federation.lazy_joins = false).await;
    let alice = hearth.user("alice").await;
    join_via(&alice, &fake).await;
    let since = token(&alice).await;

    let (member, stranger, forged) = (fake.user("user1"), fake.user("nobody"), "@mallory:elsewhere.example".to_owned());
    let push = |user: &str, msg: &str| {
        json!({"user_id": user, "presence": "online", "status_msg": msg,
                                             "last_active_ago": 1000, "currently_active": true})
    };
    let edu = json!({"edu_type": "m.presence", "content": {"push": [
        push(&member, "member"), push(&stranger, "stranger"), push(&forged, "forged")]}});
    fake.push_json(vec![], vec![edu]).await.expect("transaction accepted");

    let sync = alice.sync(Some(&since), &[("set_presence", "offline")]).await.ok();
    let seen = presence_of(&sync, &member).expect("the member's presence");
    assert_eq!(
        (seen["content"]["presence"].as_str(), seen["content"]["status_msg"].as_str()),
        (Some("online"), Some("member"))
    );
    assert!(seen["content"]["last_active_ago"].as_i64().is_some_and(|a| a >= 1000), "{seen}");
    assert_eq!(presence_of(&sync, &stranger), None, "{sync}");
    assert_eq!(presence_of(&sync, &forged), None, "{sync}");

    // Ours goes to the peer.
    alice.put(&status_path(&alice.user_id), json!({"presence": "online", "status_msg": "hi peer"})).await.ok();
    let user = alice.user_id.clone();
    wait_for("alice's presence at the peer", WAIT, || {
        fake.edus_of("m.presence")
            .iter()
            .flat_map(|c| c["push"].as_array().cloned().unwrap_or_default())
            .any(|p| p["user_id"] == user.as_str() && p["status_msg"] == "hi peer" && p["last_active_ago"].is_i64())
    })
    .await;
    hearth.stop().await;
}

/// Presence is stored: after a restart a room member still reads the status message that was set before.
#[tokio::test]
async fn presence_survives_a_restart() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    bob.join(&room).await.ok();
    alice.put(&status_path(&alice.user_id), json!({"presence": "unavailable", "status_msg": "back soon"})).await.ok();
    let TestServer { running, dir, db_path, .. } = s;
    running.stop().await;

    let s = TestServer::start_with(|c| c.database.path = db_path.clone()).await;
    let bob = bob.at(&s.base_url);
    let seen = bob.get(&status_path(&alice.user_id)).await.ok();
    assert_eq!(seen["status_msg"], "back soon", "{seen}");
    // (Whether she is still `unavailable` depends on the timers: she never synced, so she times out to offline.)
    assert!(["unavailable", "offline"].contains(&seen["presence"].as_str().unwrap()), "{seen}");
    s.stop().await;
    drop(dir);
}
