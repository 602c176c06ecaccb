//! Rate limits on by default with Synapse's numbers: registrations and login attempts per address, messages and
//! joins per user; each answers 429 `M_LIMIT_EXCEEDED` with `retry_after_ms`, and each is configurable.

mod common;

use common::*;
use hearth::config::{Config, Limits};

/// A test server with the built-in (production) limits instead of the test suite's generous ones.
async fn default_limits() -> TestServer {
    TestServer::start_with(|c| c.limits = Limits::default()).await
}

fn assert_limited(r: &Resp) -> u64 {
    r.assert_err(429, "M_LIMIT_EXCEEDED");
    let wait = r.body["retry_after_ms"].as_u64().expect("retry_after_ms");
    assert!(wait > 0, "{}", r.text);
    wait
}

#[test]
fn defaults_are_synapses() {
    let l = Config::default().limits;
    assert_eq!((l.registrations_per_second, l.registrations_burst), (0.17, 3)); // rc_registration
    assert_eq!((l.logins_per_second, l.logins_burst), (0.003, 5)); // rc_login.address
    assert_eq!((l.messages_per_second, l.messages_burst), (0.2, 10)); // rc_message
    assert_eq!((l.joins_per_second, l.joins_burst), (0.1, 10)); // rc_joins.local
}

#[tokio::test]
async fn registrations_per_address() {
    let server = default_limits().await;
    for i in 0..3 {
        server.user(&format!("u{i}")).await;
    }
    let mut c = server.client();
    let r = c.register("u3", PASSWORD).await;
    let wait = assert_limited(&r);
    assert!(wait <= 6000, "one more account every ~6 s: {wait}");
    server.stop().await;
}

#[tokio::test]
async fn login_attempts_per_address() {
    let server = default_limits().await;
    server.user("alice").await;
    for _ in 0..5 {
        server.client().login("alice", PASSWORD).await.ok();
    }
    assert_limited(&server.client().login("alice", PASSWORD).await);
    server.stop().await;
}

#[tokio::test]
async fn messages_per_user() {
    let server = default_limits().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    for i in 0..10 {
        alice.send_text(&room, &format!("m{i}")).await;
    }
    let wait = assert_limited(
        &alice.send(&room, "m.room.message", json!({"msgtype": "m.text", "body": "one too many"})).await,
    );
    assert!(wait <= 5000, "0.2 per second: {wait}");
    // Per user: bob is not affected.
    bob.join(&room).await.ok();
    bob.send_text(&room, "hi").await;
    server.stop().await;
}

#[tokio::test]
async fn joins_per_user() {
    let server = default_limits().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let mut rooms = Vec::new();
    for _ in 0..11 {
        rooms.push(alice.create_room(json!({"preset": "public_chat"})).await);
    }
    for room in &rooms[..10] {
        bob.join(room).await.ok();
    }
    assert_limited(&bob.join(&rooms[10]).await);
    server.stop().await;
}

#[tokio::test]
async fn limits_are_configurable() {
    let server = TestServer::start_with(|c| {
        c.limits = Limits { messages_per_second: 1000.0, messages_burst: 100, ..Limits::default() };
    })
    .await;
    let alice = server.user("alice").await;
    let room = alice.create_room(json!({})).await;
    for i in 0..50 {
        alice.send_text(&room, &format!("m{i}")).await;
    }
    server.stop().await;
}
