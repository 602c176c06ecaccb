//! Device lists over federation, as users of two Hearths see them (issue #24, Complement's
//! `TestDeviceListsUpdateOverFederation`, `TestFederationKeyUploadQuery`): a joiner is told about its own devices,
//! `/keys/query` for a remote user is answered from the device list cache kept up to date by
//! `m.device_list_update` EDUs (so it still answers while the user's server is down), and the cache is dropped when
//! no room is shared any more.

mod common;

use std::time::Duration;

use common::fake_resident::federated_pair;
use common::*;

const WAIT: Duration = Duration::from_secs(20);

fn changed(sync: &Value) -> Vec<String> {
    let mut v: Vec<String> = sync["device_lists"]["changed"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|u| u.as_str().map(str::to_owned))
        .collect();
    v.sort();
    v
}

fn device_keys(user_id: &str, device_id: &str) -> Value {
    json!({
        "user_id": user_id, "device_id": device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {format!("curve25519:{device_id}"): "curve", format!("ed25519:{device_id}"): "ed"},
        "signatures": {user_id: {format!("ed25519:{device_id}"): "sig"}},
    })
}

async fn query(client: &Client, user_id: &str) -> Value {
    client.post("/keys/query", json!({"device_keys": {user_id: []}, "timeout": 3000})).await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_device_lists_are_cached_kept_up_to_date_and_dropped_when_no_room_is_shared() {
    let (a, b) = federated_pair().await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    alice.post("/keys/upload", json!({"device_keys": device_keys(&alice.user_id, &alice.device_id)})).await.ok();
    let room = alice.create_room(json!({"preset": "private_chat", "invite": [bob.user_id]})).await;
    wait_until("bob's invite", WAIT, || async {
        let s = bob.sync(None, &[]).await.ok();
        s["rooms"]["invite"].get(&room).is_some().then_some(())
    })
    .await;
    let since = bob.sync(None, &[]).await.ok()["next_batch"].as_str().unwrap().to_owned();

    // The joiner's own devices count as changed (its other devices may need to know), with the room's members.
    bob.join(&room).await.ok();
    let s = bob.sync(Some(&since), &[("timeout", "5000")]).await.ok();
    assert_eq!(changed(&s), [alice.user_id.clone(), bob.user_id.clone()], "{s}");
    let since = s["next_batch"].as_str().unwrap().to_owned();

    // Bob's server fetches alice's list once and keeps it up to date with her server's updates: a new device name
    // reaches bob's query.
    let got = query(&bob, &alice.user_id).await;
    assert_eq!(got["device_keys"][&alice.user_id][&alice.device_id]["keys"], device_keys("", &alice.device_id)["keys"]);
    // (Servers keep device names to themselves in `/user/keys/query` answers: the name comes through the cache.)
    alice.put(&format!("/devices/{}", alice.device_id), json!({"display_name": "Alice's phone"})).await.ok();
    wait_until("alice's new device name in bob's query", WAIT, || async {
        let got = query(&bob, &alice.user_id).await;
        let device = &got["device_keys"][&alice.user_id][&alice.device_id];
        (device["unsigned"]["device_display_name"] == "Alice's phone").then_some(())
    })
    .await;
    let s = bob.sync(Some(&since), &[]).await.ok();
    assert!(changed(&s).contains(&alice.user_id), "{s}");

    // With alice's server gone, bob still gets her keys: from the cache.
    let alice_id = alice.user_id.clone();
    let alice_device = alice.device_id.clone();
    a.stop().await;
    let got = query(&bob, &alice_id).await;
    assert_eq!(got["failures"], json!({}), "{got}");
    assert_eq!(got["device_keys"][&alice_id][&alice_device]["unsigned"]["device_display_name"], "Alice's phone");

    // Once bob left the only room they shared, alice's server no longer tells his: nothing is answered from a
    // copy that would silently go stale, so her unreachable server is a failure.
    bob.leave(&room).await.ok();
    let got = query(&bob, &alice_id).await;
    assert!(got["failures"].get("hearth-a.test").is_some(), "{got}");
    assert_eq!(got["device_keys"].get(&alice_id), None, "{got}");
}

fn left(sync: &Value) -> Vec<String> {
    sync["device_lists"]["left"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|u| u.as_str().map(str::to_owned))
        .collect()
}

/// `/user/devices` (and `/user/keys/query`) requests the peer received.
fn device_requests(peer: &common::fake_resident::FakeResident) -> usize {
    peer.count("user")
}

/// A lazy join (MSC3902, Complement's "Device list no longer tracked for user incorrectly believed to be in room"):
/// a member who joins while the room is partial is tracked (their list fetched once, then answered from the
/// cache); when the resync shows they were never really joined (banned before our join), their cached list is
/// dropped, `/sync` lists them in `device_lists.left`, and the next query asks their server again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_wrongly_believed_joined_during_a_lazy_join_is_untracked_when_the_resync_completes() {
    use common::fake_resident::*;
    let hearth = start_hearth().await;
    let fake = FakeResident::start(RoomSpec::default()).await;
    let peer = fake.start_peer().await;
    let elsie = peer.user("elsie");
    let elsie_join = fake.append(EventSpec::member(&elsie, "join")).id;
    fake.append(EventSpec::state(&fake.creator(), "m.room.member", &elsie, json!({"membership": "ban"})));
    let devices = json!({
        "user_id": elsie, "stream_id": 3,
        "devices": [{"device_id": "ELSIE", "keys": device_keys(&elsie, "ELSIE")}],
        "device_keys": {&elsie: {"ELSIE": device_keys(&elsie, "ELSIE")}},
    });
    peer.script("user", Script::json(200, devices));
    fake.connect_to(&hearth);
    fake.hold("state_ids");
    let alice = hearth.user("alice").await;
    join_via(&alice, &fake).await;
    let room = fake.room_id();
    fake.wait_requests("state_ids", 1, WAIT).await;
    let since = alice.sync(None, &[]).await.ok()["next_batch"].as_str().unwrap().to_owned();

    // Elsie "joins" citing her old join: the partial state has no membership of hers, so it is accepted.
    let (pl, rules) = {
        let r = fake.room.lock().unwrap();
        (r.state_id("m.room.power_levels", "").unwrap(), r.state_id("m.room.join_rules", "").unwrap())
    };
    let mut auth = vec![pl, rules, elsie_join];
    if fake.room_version() != "12" {
        auth.push(fake.room.lock().unwrap().state_id("m.room.create", "").unwrap());
    }
    let rejoin = fake.build(EventSpec::member(&elsie, "join").with_auth(auth));
    let pushed = fake.push(&[&rejoin.id]).await;
    assert_eq!(pushed[&rejoin.id], json!({}), "{pushed}");

    // Tracked: the whole list fetched once (GET /user/devices), then answered from the cache.
    let got = query(&alice, &elsie).await;
    assert!(got["device_keys"][&elsie].get("ELSIE").is_some(), "{got}");
    let asked = device_requests(&peer);
    let requests = peer.requests_of("user");
    assert!(asked == 1 && requests[0].detail.contains("/user/devices/"), "{requests:?}");
    query(&alice, &elsie).await;
    assert_eq!(device_requests(&peer), asked, "answered from the cache");

    // The full state has her banned: she is no longer tracked, and alice is told she left.
    fake.release("state_ids");
    wait_until("the resync", WAIT, || async {
        let r = alice.get(&format!("/rooms/{}/joined_members", enc(&room))).await;
        (r.status == 200 && !joined_ids(&r.body).contains(&elsie) && !joined_ids(&r.body).is_empty()).then_some(())
    })
    .await;
    let s = alice.sync(Some(&since), &[]).await.ok();
    assert!(left(&s).contains(&elsie), "{}", s["device_lists"]);
    let got = query(&alice, &elsie).await;
    assert!(got["device_keys"][&elsie].get("ELSIE").is_some(), "{got}");
    assert_eq!(device_requests(&peer), asked + 1, "asked again: {:?}", peer.requests_of("user"));
    hearth.stop().await;
}
