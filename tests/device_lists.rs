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
