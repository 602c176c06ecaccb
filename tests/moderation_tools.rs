//! Moderation and tools clients use (issue 21): content reports (`/report`, listed by `hearth report list`),
//! jump to date (`/timestamp_to_event`, client and federation), OpenID tokens (`/openid/request_token`, federation
//! `/openid/userinfo`) and link previews (`/preview_url`).

mod common;

use std::process::Command;

use common::fake_resident::*;
use common::*;

/// Milliseconds since the epoch, a little after the previous call (so events sent between two calls fall between
/// their values).
async fn mark() -> i64 {
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let t = common::fake_resident::now_ms();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    t
}

async fn jump(c: &Client, room: &str, ts: i64, dir: &str) -> Resp {
    c.get(&format!("/_matrix/client/v1/rooms/{}/timestamp_to_event?ts={ts}&dir={dir}", enc(room))).await
}

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
    assert_eq!(bob.post(&path, json!(["not", "an", "object"])).await.status, 400);
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

#[tokio::test]
async fn timestamp_to_event_finds_the_closest_visible_event() {
    let s = TestServer::start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let eve = s.user("eve").await;
    let before_room = mark().await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    alice.put_state(&room, "m.room.history_visibility", "", json!({"history_visibility": "joined"})).await.ok();
    let t0 = mark().await;
    let a = alice.send_text(&room, "A").await;
    let t1 = mark().await;
    let b = alice.send_text(&room, "B").await;
    let t2 = mark().await;

    let found = |r: Resp| r.ok()["event_id"].as_str().unwrap_or("").to_owned();
    assert_eq!(found(jump(&alice, &room, t0, "f").await), a);
    assert_eq!(found(jump(&alice, &room, t1, "b").await), a);
    assert_eq!(found(jump(&alice, &room, t1, "f").await), b);
    let at_b = jump(&alice, &room, t2, "b").await.ok();
    assert_eq!(at_b["event_id"], json!(b));
    assert!(at_b["origin_server_ts"].as_i64().is_some_and(|ts| ts > t1 && ts < t2), "{at_b}");
    jump(&alice, &room, t2, "f").await.assert_err(404, "M_NOT_FOUND");
    jump(&alice, &room, before_room, "b").await.assert_err(404, "M_NOT_FOUND");

    // Bob joins later; history is `joined` from before A on: A is skipped (what he finds instead is the
    // history visibility change, which was shared history).
    bob.join(&room).await.ok();
    let instead = found(jump(&bob, &room, t1, "b").await);
    assert_ne!(instead, a);
    assert_eq!(bob.event(&room, &instead).await.ok()["type"], "m.room.history_visibility");
    let after_join = found(jump(&bob, &room, t0, "f").await);
    assert_ne!(after_join, a);
    assert_eq!(bob.event(&room, &after_join).await.ok()["sender"], json!(bob.user_id));
    // Not in the room: 403.
    jump(&eve, &room, t0, "f").await.assert_err(403, "M_FORBIDDEN");

    // Parameters.
    let base = format!("/_matrix/client/v1/rooms/{}/timestamp_to_event", enc(&room));
    alice.get(&format!("{base}?ts={t0}")).await.assert_err(400, "M_MISSING_PARAM");
    alice.get(&format!("{base}?dir=f")).await.assert_err(400, "M_MISSING_PARAM");
    alice.get(&format!("{base}?ts={t0}&dir=x")).await.assert_err(400, "M_INVALID_PARAM");
    alice.get(&format!("{base}?ts=soon&dir=f")).await.assert_err(400, "M_INVALID_PARAM");
}

/// A server that joined late asks the room's other servers for what came before its join (over
/// `/_matrix/federation/v1/timestamp_to_event`), and gives its user their answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamp_to_event_asks_other_servers_about_history_before_our_join() {
    let (a, b) = federated_pair().await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    let t0 = mark().await;
    let ev_a = alice.send_text(&room, "A").await;
    let t1 = mark().await;
    let ev_b = alice.send_text(&room, "B").await;
    let t2 = mark().await;
    bob.post(&format!("/join/{}?server_name=hearth-a.test", enc(&room)), json!({})).await.ok();

    let found = |r: Resp| r.ok()["event_id"].as_str().unwrap_or("").to_owned();
    assert_eq!(found(jump(&bob, &room, t0, "f").await), ev_a);
    assert_eq!(found(jump(&bob, &room, t2, "b").await), ev_b);
    assert_eq!(found(jump(&bob, &room, t1, "f").await), ev_b);
}

/// A widget's server checks who a user is: the token from `/openid/request_token`, exchanged at our
/// `/_matrix/federation/v1/openid/userinfo` (unsigned), names the user; an unknown token is 401 `M_UNKNOWN_TOKEN`.
#[tokio::test]
async fn openid_tokens_name_their_user_to_other_servers() {
    let s = start_hearth_with(|c| c.federation.serve_on_client_listener = true).await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let path = format!("/user/{}/openid/request_token", enc(&alice.user_id));
    let t = alice.post(&path, json!({})).await.ok();
    assert_eq!(t["token_type"], "Bearer");
    assert_eq!(t["matrix_server_name"], json!(s.server_name));
    assert_eq!(t["expires_in"], 3600);
    let token = t["access_token"].as_str().unwrap().to_owned();
    assert!(!token.is_empty() && token != alice.token.clone().unwrap_or_default());

    let anon = s.client();
    let info = anon.get(&format!("/_matrix/federation/v1/openid/userinfo?access_token={}", enc(&token))).await.ok();
    assert_eq!(info, json!({"sub": alice.user_id}));
    anon.get("/_matrix/federation/v1/openid/userinfo?access_token=nope").await.assert_err(401, "M_UNKNOWN_TOKEN");
    // The token is no access token for the client API.
    anon.get("/_matrix/federation/v1/openid/userinfo").await.assert_err(400, "M_MISSING_PARAM");
    let mut as_token = s.client();
    as_token.token = Some(token);
    as_token.get("/account/whoami").await.assert_err(401, "M_UNKNOWN_TOKEN");

    // Only for oneself, and only with a JSON object.
    bob.post(&path, json!({})).await.assert_err(403, "M_FORBIDDEN");
    let not_object = alice.post(&path, json!([])).await;
    assert_eq!(not_object.status, 400, "{}", not_object.text);
}

/// A web server on loopback for link previews: `/page.html` (Open Graph tags, a relative `og:image`), `/img.png`
/// (3x2 pixels), `/away` (a redirect to a link-local address) and `/hits` counting page fetches.
async fn web_server() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>, Vec<u8>) {
    use axum::http::header;
    use axum::routing::get;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let mut png = Vec::new();
    image::RgbImage::new(3, 2).write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).expect("png");
    let hits = std::sync::Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let img = png.clone();
    let app = axum::Router::new()
        .route(
            "/page.html",
            get(move || {
                h.fetch_add(1, Ordering::SeqCst);
                async {
                    let html = r#"<html><head><title>Ignored</title><meta property="og:title" content="The Rock">
                        <meta property="og:type" content="video.movie"><meta property="og:image" content="img.png">
                        <meta name="description" content="A film"></head><body>x</body></html>"#;
                    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html)
                }
            }),
        )
        .route("/img.png", get(move || async move { ([(header::CONTENT_TYPE, "image/png")], img.clone()) }))
        .route(
            "/away",
            get(|| async { (axum::http::StatusCode::FOUND, [(header::LOCATION, "http://169.254.169.254/latest")]) }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), hits, png)
}

fn preview_path(url: &str) -> String {
    format!("/_matrix/client/v1/media/preview_url?url={}", enc(url))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_previews_read_open_graph_and_refuse_private_addresses() {
    use std::sync::atomic::Ordering;
    let (web, hits, png) = web_server().await;
    let page = format!("{web}/page.html");

    // By default loopback is refused, by address and by name.
    let closed = TestServer::start().await;
    let carol = closed.user("carol").await;
    carol.get(&preview_path(&page)).await.assert_err(403, "M_FORBIDDEN");
    let by_name = page.replace("127.0.0.1", "localhost");
    carol.get(&preview_path(&by_name)).await.assert_err(403, "M_FORBIDDEN");
    assert_eq!(hits.load(Ordering::SeqCst), 0);

    let s = TestServer::start_with(|c| c.media.preview_allow_private_ips = vec!["127.0.0.0/8".into()]).await;
    let alice = s.user("alice").await;
    let og = alice.get(&preview_path(&page)).await.ok();
    assert_eq!(og["og:title"], "The Rock");
    assert_eq!(og["og:type"], "video.movie");
    assert_eq!(og["og:description"], "A film");
    assert_eq!((og["og:image:width"].as_u64(), og["og:image:height"].as_u64()), (Some(3), Some(2)), "{og}");
    assert_eq!(og["matrix:image:size"].as_u64(), Some(png.len() as u64));
    assert_eq!(og["og:image:type"], "image/png");
    let mxc = og["og:image"].as_str().unwrap();
    let media = mxc.strip_prefix("mxc://").expect("an mxc URI");
    let http = reqwest::Client::new();
    let got = http
        .get(format!("{}/_matrix/client/v1/media/download/{media}", s.base_url))
        .bearer_auth(alice.token.clone().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.bytes().await.unwrap().to_vec(), png, "the image is in the media repository");

    // Cached: asking again (on the legacy path too) does not fetch the page again.
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    let again = alice.get(&format!("/_matrix/media/v3/preview_url?url={}&ts=1", enc(&page))).await.ok();
    assert_eq!(again["og:title"], "The Rock");
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    // A redirect to a private address is refused although the first hop was allowed; bad requests are 400.
    alice.get(&preview_path(&format!("{web}/away"))).await.assert_err(403, "M_FORBIDDEN");
    alice.get("/_matrix/client/v1/media/preview_url").await.assert_err(400, "M_MISSING_PARAM");
    alice.get(&preview_path("ftp://example.com/x")).await.assert_err(400, "M_INVALID_PARAM");
    alice.get(&preview_path("not a url")).await.assert_err(400, "M_INVALID_PARAM");
    s.client().get(&preview_path(&page)).await.assert_err(401, "M_MISSING_TOKEN");

    // Switched off.
    let off = TestServer::start_with(|c| c.media.url_preview_enabled = false).await;
    off.user("dave").await.get(&preview_path(&page)).await.assert_err(403, "M_FORBIDDEN");
}
