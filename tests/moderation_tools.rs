//! Moderation and tools clients use (issue 21): content reports (`/report`, listed by `hearth report list`),
//! jump to date (`/timestamp_to_event`, client and federation), OpenID tokens (`/openid/request_token`, federation
//! `/openid/userinfo`) and link previews (`/preview_url`).

mod common;

use std::process::Command;

use common::*;

/// `hearth report list` against the server's database (the command works while the server runs).
fn report_list(s: &TestServer) -> String {
    let mut cmd = Command::new(hearth_bin());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("HEARTH_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd
        .current_dir(s.dir.path())
        .args(["report", "list"])
        .env("HEARTH_DATABASE__PATH", &s.db_path)
        .output()
        .expect("run hearth report list");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn reports_of_events_rooms_and_users() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let eve = s.user("eve").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    bob.join(&room).await.ok();
    let ev = alice.send_text(&room, "rude words").await;
    let r = enc(&room);

    // An event the reporter sees: reported, with a reason and an old client's score.
    let path = format!("/rooms/{r}/report/{}", enc(&ev));
    assert_eq!(bob.post(&path, json!({"reason": "offensive", "score": -100})).await.ok(), json!({}));
    bob.post(&path, json!({"score": 5})).await.assert_err(400, "M_INVALID_PARAM");
    bob.post(&path, json!({"reason": 3})).await.assert_err(400, "M_INVALID_PARAM");
    // Someone outside the (shared-history) room cannot see it: 404, as for an event that does not exist.
    eve.post(&path, json!({"reason": "x"})).await.assert_err(404, "M_NOT_FOUND");
    bob.post(&format!("/rooms/{r}/report/{}", enc("$nosuch")), json!({})).await.assert_err(404, "M_NOT_FOUND");
    bob.post(&format!("/rooms/{}/report/{}", enc("!nosuch:localhost"), enc(&ev)), json!({}))
        .await
        .assert_err(404, "M_NOT_FOUND");

    // Rooms: any room the server knows, member or not; `reason` is required.
    assert_eq!(eve.post(&format!("/rooms/{r}/report"), json!({"reason": "spam room"})).await.ok(), json!({}));
    let missing = eve.post(&format!("/rooms/{r}/report"), json!({})).await;
    assert_eq!(missing.status, 400, "{}", missing.text);
    eve.post(&format!("/rooms/{}/report", enc("!nosuch:localhost")), json!({"reason": ""}))
        .await
        .assert_err(404, "M_NOT_FOUND");

    // Users: known ones only.
    let users = format!("/users/{}/report", enc(&alice.user_id));
    assert_eq!(eve.post(&users, json!({"reason": ""})).await.ok(), json!({}));
    eve.post(&format!("/users/{}/report", enc("@ghost:localhost")), json!({"reason": "x"}))
        .await
        .assert_err(404, "M_NOT_FOUND");
    eve.post(&format!("/users/{}/report", enc("@ghost:elsewhere.example")), json!({"reason": "x"}))
        .await
        .assert_err(404, "M_NOT_FOUND");
    eve.anonymous().post(&users, json!({"reason": "x"})).await.assert_err(401, "M_MISSING_TOKEN");

    // The operator sees all three, newest first.
    let listed = report_list(&s);
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines.len(), 4, "{listed}");
    assert!(lines[0].contains(&format!("{} reported user {}", eve.user_id, alice.user_id)), "{listed}");
    assert!(lines[1].contains(&format!("reported room {room}")) && lines[1].contains("spam room"), "{listed}");
    assert!(lines[2].contains(&format!("{} reported event {ev} in {room} score -100", bob.user_id)), "{listed}");
    assert!(lines[2].contains("offensive"), "{listed}");
    assert_eq!(lines[3], "3 reports");
}
