//! Rate limits on by default with Synapse's numbers: registrations and login attempts per address, messages and
//! joins per user, failed password checks (login and every user-interactive password step) per user and per
//! address; each answers 429 `M_LIMIT_EXCEEDED` with `retry_after_ms`, and each is configurable.

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

/// Every password check counts, not only `/login`: the user-interactive `m.login.password` step of each endpoint
/// that asks for one (`/delete_devices`, `DELETE /devices/{id}`, `/account/password`, `/account/deactivate`)
/// shares the failed-password budget (`limits.login_failures_per_minute`, 5) per user and per address with
/// `/login`. Once spent, even the right password answers 429, and nothing is done.
#[tokio::test]
async fn password_guesses_through_user_interactive_auth_are_limited_like_logins() {
    let server = default_limits().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let wrong = |i: usize| json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": format!("guess{i}")});
    let right =
        json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": PASSWORD});
    let attempts = [
        ("/delete_devices", json!({"devices": ["NOPE"]})),
        ("/account/password", json!({"new_password": "new password 1"})),
        ("/account/deactivate", json!({})),
    ];
    // Five wrong guesses spread over the endpoints: each is a failed stage (401 with the flows).
    for i in 0..5 {
        let (path, mut body) = attempts[i % attempts.len()].clone();
        body["auth"] = wrong(i);
        let r = alice.post(path, body).await;
        assert_eq!((r.status, r.errcode()), (401, "M_FORBIDDEN"), "{path}: {}", r.text);
    }
    // The sixth, on any endpoint, is refused before the password is looked at; so is the right password.
    for (path, body) in &attempts {
        let mut body = body.clone();
        body["auth"] = right.clone();
        assert_limited(&alice.post(path, body).await);
    }
    let mut body = json!({"auth": right.clone()});
    assert_limited(&alice.delete(&format!("/devices/{}", alice.device_id), body.take()).await);
    // The same budget as /login: alice cannot log in either, while still being logged in.
    assert_limited(&server.client().login("alice", PASSWORD).await);
    alice.get("/account/whoami").await.ok();
    // The address is spent too: bob (same address) is limited on his first guess.
    let bob_auth =
        json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "bob"}, "password": PASSWORD});
    assert_limited(&bob.post("/delete_devices", json!({"devices": ["NOPE"], "auth": bob_auth})).await);
    server.stop().await;
}

/// A user-interactive password step sent from `addr` (through the loopback proxy's `X-Forwarded-For`, which the
/// default `limits.trusted_proxies` trust).
async fn password_step_from(c: &Client, addr: &str, password: &str) -> Resp {
    let localpart = c.user_id.trim_start_matches('@').split(':').next().unwrap().to_owned();
    let auth = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": localpart}, "password": password});
    let res = reqwest::Client::new()
        .post(c.url("/delete_devices"))
        .bearer_auth(c.token.as_deref().unwrap())
        .header("x-forwarded-for", addr)
        .json(&json!({"devices": ["NOPE"], "auth": auth}))
        .send()
        .await
        .expect("HTTP request failed");
    let status = res.status().as_u16();
    let text = res.text().await.unwrap_or_default();
    Resp { status, body: serde_json::from_str(&text).unwrap_or(Value::Null), text }
}

/// As Synapse's `rc_login`: every password check (right or wrong, login or user-interactive) counts against the
/// address (`logins_per_second`/`logins_burst`, 5), failed ones against the user (`login_failures_per_minute`, 5).
#[tokio::test]
async fn every_password_check_counts_per_address_failed_ones_per_user() {
    let server = default_limits().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    // Right passwords from one address: five pass, the sixth (and a login from there) is 429.
    for _ in 0..5 {
        password_step_from(&alice, "10.0.0.1", PASSWORD).await.ok();
    }
    assert_limited(&password_step_from(&alice, "10.0.0.1", PASSWORD).await);
    assert_limited(&password_step_from(&bob, "10.0.0.1", PASSWORD).await);
    // Right passwords do not count against the user: from another address alice goes on.
    password_step_from(&alice, "10.0.0.2", PASSWORD).await.ok();
    // Wrong ones do: five guesses from five addresses spend alice's budget, wherever she asks from next.
    for i in 0..5 {
        let r = password_step_from(&alice, &format!("10.0.1.{i}"), "wrong").await;
        assert_eq!((r.status, r.errcode()), (401, "M_FORBIDDEN"), "{}", r.text);
    }
    assert_limited(&password_step_from(&alice, "10.0.2.1", PASSWORD).await);
    // That address is not spent: bob's right password from there passes.
    password_step_from(&bob, "10.0.2.1", PASSWORD).await.ok();
    server.stop().await;
}
