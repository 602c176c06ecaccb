//! `include_redundant_members` in lazy-loading sync: member events already sent to a device are left out of later
//! incremental syncs unless the filter asks for redundant members.

mod common;

use common::TestServer;
use serde_json::{json, Value};

fn members_in(body: &Value, room: &str) -> Vec<String> {
    body["rooms"]["join"][room]["state"]["events"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|e| e["type"] == "m.room.member")
                .filter_map(|e| e["state_key"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn redundant_members_are_sent_only_when_asked() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    bob.join(&room).await.ok();
    // Enough messages that each incremental sync below is gappy (timeline limit 1): state is then computed.
    for redundant in [false, true] {
        let filter = json!({"room": {"timeline": {"limit": 1}, "state": {"lazy_load_members": true, "include_redundant_members": redundant}}}).to_string();
        bob.send_text(&room, "first").await;
        let initial = alice.sync(None, &[("filter", &filter)]).await.ok();
        assert!(
            members_in(&initial, &room).contains(&bob.user_id),
            "initial lazy sync carries the sender's membership"
        );
        let since = initial["next_batch"].as_str().unwrap().to_owned();
        bob.send_text(&room, "second").await;
        bob.send_text(&room, "third").await;
        let next = alice.sync(Some(&since), &[("filter", &filter)]).await.ok();
        let has_bob = members_in(&next, &room).contains(&bob.user_id);
        assert_eq!(has_bob, redundant, "include_redundant_members={redundant}: bob's membership resent? {has_bob}");
    }
}
