//! Room upgrades (and room v12 creators) as clients see them: `POST /rooms/{roomId}/upgrade` makes a replacement room that names its
//! predecessor and keeps its configuration, tombstones the old room, moves its aliases, and local users who join
//! the new room keep their push rules and tags for the old one.

mod common;

use common::*;

#[tokio::test]
async fn upgrade_replaces_the_room_and_keeps_its_configuration() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let mallory = s.user("mallory").await;
    let (alice_id, bob_id, mallory_id) = (s.user_id("alice"), s.user_id("bob"), s.user_id("mallory"));
    let old = alice
        .create_room(json!({"room_version": "10", "preset": "public_chat", "name": "Lounge", "topic": "tea",
                            "room_alias_name": "lounge", "visibility": "public"}))
        .await;
    bob.join(&old).await.ok();
    mallory.join(&old).await.ok();
    let carol = s.user("carol").await;
    carol.join(&old).await.ok();
    alice.post(&format!("/rooms/{}/ban", enc(&old)), json!({"user_id": mallory_id})).await.ok();
    alice
        .put_state(
            &old,
            "m.room.power_levels",
            "",
            json!({"users": {alice_id.clone(): 100, bob_id.clone(): 50}, "events": {"m.room.tombstone": 100}}),
        )
        .await
        .ok();

    // Bob (50) may not send the tombstone (needs 100 here): refused, and nothing changed.
    bob.post(&format!("/rooms/{}/upgrade", enc(&old)), json!({"new_version": "12"}))
        .await
        .assert_err(403, "M_FORBIDDEN");
    alice.state(&old, "m.room.tombstone", "").await.assert_err(404, "M_NOT_FOUND");
    // An unknown version: 400.
    alice
        .post(&format!("/rooms/{}/upgrade", enc(&old)), json!({"new_version": "999"}))
        .await
        .assert_err(400, "M_UNSUPPORTED_ROOM_VERSION");

    let new = alice.post(&format!("/rooms/{}/upgrade", enc(&old)), json!({"new_version": "12"})).await.ok()
        ["replacement_room"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(new, old);

    let create = alice.state(&new, "m.room.create", "").await.ok();
    assert_eq!(create["room_version"], "12");
    assert_eq!(create["predecessor"], json!({"room_id": old}));
    let tombstone = alice.state(&old, "m.room.tombstone", "").await.ok();
    assert_eq!(tombstone["replacement_room"], new.as_str());
    assert_eq!(alice.state(&new, "m.room.name", "").await.ok()["name"], "Lounge");
    assert_eq!(alice.state(&new, "m.room.topic", "").await.ok()["topic"], "tea");
    assert_eq!(alice.state(&new, "m.room.join_rules", "").await.ok()["join_rule"], "public");
    // Room v12 privileges its creator: the upgrader is not listed, the other levels are kept exactly.
    let pl = alice.state(&new, "m.room.power_levels", "").await.ok();
    assert_eq!(pl, json!({"users": {bob_id.clone(): 50}, "events": {"m.room.tombstone": 100}}));
    // The ban carries over.
    assert_eq!(alice.state(&new, "m.room.member", &mallory_id).await.ok()["membership"], "ban");
    mallory.join(&new).await.assert_err(403, "M_FORBIDDEN");
    // The old room: ordinary members can no longer talk or invite.
    let old_pl = alice.state(&old, "m.room.power_levels", "").await.ok();
    assert_eq!((old_pl["events_default"].as_i64(), old_pl["invite"].as_i64()), (Some(50), Some(50)));
    assert_eq!(carol.send(&old, "m.room.message", json!({"msgtype": "m.text", "body": "hi"})).await.status, 403);
    // The alias and the directory entry moved.
    let alias = format!("#lounge:{}", s.user_id("x").split_once(':').unwrap().1);
    let resolved = alice.get(&format!("/directory/room/{}", enc(&alias))).await.ok();
    assert_eq!(resolved["room_id"], new.as_str());
    let listed = alice.get("/publicRooms").await.ok();
    let ids: Vec<&str> = listed["chunk"].as_array().unwrap().iter().filter_map(|r| r["room_id"].as_str()).collect();
    assert!(ids.contains(&new.as_str()) && !ids.contains(&old.as_str()), "{ids:?}");

    // A create event cannot be sent into an existing room.
    alice
        .put_state(&new, "m.room.create", "", json!({"room_version": "12", "x": 1}))
        .await
        .assert_err(400, "M_BAD_JSON");
}

#[tokio::test]
async fn joining_the_new_room_carries_push_rules_and_tags_over() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let old = alice.create_room(json!({"room_version": "11", "preset": "public_chat"})).await;
    bob.join(&old).await.ok();
    bob.put(&format!("/pushrules/global/room/{}", enc(&old)), json!({"actions": ["dont_notify"]})).await.ok();
    let bob_id = s.user_id("bob");
    bob.put(&format!("/user/{}/rooms/{}/tags/u.work", enc(&bob_id), enc(&old)), json!({"order": 0.5})).await.ok();

    let new = alice.post(&format!("/rooms/{}/upgrade", enc(&old)), json!({"new_version": "11"})).await.ok()
        ["replacement_room"]
        .as_str()
        .unwrap()
        .to_owned();
    // Not joined yet: nothing copied.
    bob.get(&format!("/pushrules/global/room/{}", enc(&new))).await.assert_err(404, "M_NOT_FOUND");
    bob.join(&new).await.ok();
    let rule = bob.get(&format!("/pushrules/global/room/{}", enc(&new))).await.ok();
    assert_eq!(rule["actions"], json!(["dont_notify"]));
    let tags = bob.get(&format!("/user/{}/rooms/{}/tags", enc(&bob_id), enc(&new))).await.ok();
    assert_eq!(tags["tags"]["u.work"]["order"], 0.5);
    // The old room's rule stays.
    bob.get(&format!("/pushrules/global/room/{}", enc(&old))).await.ok();
}

#[tokio::test]
async fn trusted_private_chat_invitees_become_creators_where_creators_are_privileged() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let _bob = s.user("bob").await;
    let (bob_id, carol_id) = (s.user_id("bob"), s.user_id("carol"));
    let room = alice
        .create_room(json!({"room_version": "12", "preset": "trusted_private_chat", "is_direct": true,
                            "invite": [bob_id], "creation_content": {"additional_creators": [carol_id]}}))
        .await;
    let create = alice.state(&room, "m.room.create", "").await.ok();
    assert_eq!(create["additional_creators"], json!([carol_id, bob_id]));
    // Creators are not listed in the power levels (MSC4289).
    let pl = alice.state(&room, "m.room.power_levels", "").await.ok();
    assert_eq!(pl["users"], json!({}));
    // Before room version 12 the invitee gets the creator's level instead.
    let v11 =
        alice.create_room(json!({"room_version": "11", "preset": "trusted_private_chat", "invite": [bob_id]})).await;
    let pl = alice.state(&v11, "m.room.power_levels", "").await.ok();
    assert_eq!(pl["users"][&bob_id], 100);
    assert!(alice.state(&v11, "m.room.create", "").await.ok().get("additional_creators").is_none());
}

#[tokio::test]
async fn upgrade_refuses_bad_input_with_matrix_errors() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = alice.create_room(json!({"room_version": "11"})).await;
    let path = format!("/rooms/{}/upgrade", enc(&room));
    // No new_version, a version that is not a string, a bad additional creator.
    assert_eq!(alice.post(&path, json!({})).await.status, 400);
    assert_eq!(alice.post(&path, json!({"new_version": 12})).await.status, 400);
    alice
        .post(&path, json!({"new_version": "12", "additional_creators": ["not a user"]}))
        .await
        .assert_err(400, "M_INVALID_PARAM");
    // A malformed room id names no room (the room core's answer for ids that do not parse).
    alice.post("/rooms/not-a-room/upgrade", json!({"new_version": "12"})).await.assert_err(404, "M_NOT_FOUND");
    // Someone not in the room, and a room that does not exist: 403.
    bob.post(&path, json!({"new_version": "12"})).await.assert_err(403, "M_FORBIDDEN");
    alice.post("/rooms/!nowhere:localhost/upgrade", json!({"new_version": "12"})).await.assert_err(403, "M_FORBIDDEN");
    // Nothing was upgraded.
    alice.state(&room, "m.room.tombstone", "").await.assert_err(404, "M_NOT_FOUND");
}
