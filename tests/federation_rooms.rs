//! Rooms shared between two Hearths over federation, seen by their users: invites, their withdrawal, and joins
//! after events a server received while it was only invited.

mod common;

use std::time::Duration;

use common::fake_resident::federated_pair;
use common::*;

const WAIT: Duration = Duration::from_secs(20);
const LEAVE_FILTER: &str = r#"{"room":{"include_leave":true}}"#;

fn invited_to(sync: &Value, room: &str) -> bool {
    sync["rooms"]["invite"].get(room).is_some()
}

/// The room is in the "leave" section with the leave event of `user` (in its timeline or state), as clients look
/// for it.
fn left(sync: &Value, room: &str, user: &str) -> bool {
    let section = &sync["rooms"]["leave"][room];
    ["timeline", "state"]
        .iter()
        .flat_map(|k| events_of(&section[k]))
        .any(|e| e["type"] == "m.room.member" && e["state_key"] == user && e["content"]["membership"] == "leave")
}

/// The inviting server withdraws an invite (a kick of the invitee) while the invitee's server holds no state for
/// the room: the invitee sees the room move from "invite" to "leave", and can no longer join.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invite_withdrawn_by_the_inviting_server_reaches_the_invitee() {
    let (a, b) = federated_pair().await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let room = alice.create_room(json!({"preset": "private_chat"})).await;
    alice.invite(&room, &bob.user_id).await.ok();
    let since = wait_until("bob's invite", WAIT, || async {
        let s = bob.sync(None, &[]).await.ok();
        invited_to(&s, &room).then(|| s["next_batch"].as_str().unwrap().to_owned())
    })
    .await;

    alice.post(&format!("/rooms/{}/kick", enc(&room)), json!({"user_id": bob.user_id, "reason": "oops"})).await.ok();
    wait_until("the withdrawn invite in bob's sync", WAIT, || async {
        let s = bob.sync(Some(&since), &[("timeout", "500"), ("filter", LEAVE_FILTER)]).await.ok();
        left(&s, &room, &bob.user_id).then_some(())
    })
    .await;
    let s = bob.sync(None, &[]).await.ok();
    assert!(!invited_to(&s, &room), "the invite is gone from an initial sync too: {s}");
    assert_eq!(bob.join(&room).await.status, 403, "no invite any more");
}

/// Events of the room reach the invitee's server before its user joins (the invite itself, a topic change, the
/// withdrawal of another invite). They cannot be judged without the room's state, so they must not be stored as
/// rejected: the join that follows brings the state, and later events build on them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_received_while_only_invited_do_not_spoil_the_join() {
    let (a, b) = federated_pair().await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let carol = b.user("carol").await;
    let room = alice.create_room(json!({"preset": "private_chat"})).await;
    alice.invite(&room, &bob.user_id).await.ok();
    alice.invite(&room, &carol.user_id).await.ok();
    alice.put_state(&room, "m.room.topic", "", json!({"topic": "before the join"})).await.ok();
    alice.post(&format!("/rooms/{}/kick", enc(&room)), json!({"user_id": carol.user_id})).await.ok();
    // Everything A queued for B has been accepted by B.
    wait_outbox_drained(&a, &["hearth-b.test"], WAIT).await;

    bob.join(&room).await.ok();
    let text = alice.send_text(&room, "after the join").await;
    wait_until("alice's message at bob", WAIT, || async {
        let r = bob.event(&room, &text).await;
        (r.status == 200).then_some(())
    })
    .await;
    assert_eq!(bob.state(&room, "m.room.topic", "").await.ok()["topic"], "before the join");
    bob.send_text(&room, "hello from b").await;
}
