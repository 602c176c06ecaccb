//! `/.well-known/matrix/{client,server}` from configuration (delegation and client discovery).

mod common;

use common::TestServer;

#[tokio::test]
async fn well_known_defaults_and_configured() {
    let plain = TestServer::start().await;
    let c = plain.client();
    // Unconfigured: no client discovery at all (never the listen address, which a reverse proxy hides), and no
    // `well_known` in the login answer.
    c.get("/.well-known/matrix/client").await.assert_err(404, "M_NOT_FOUND");
    c.get("/.well-known/matrix/server").await.assert_err(404, "M_NOT_FOUND");
    plain.client().register("alice", "pw-alice").await.ok();
    let login = plain.client().login("alice", "pw-alice").await.ok();
    assert!(login.get("well_known").is_none(), "{login}");

    let delegated = TestServer::start_with(|cfg| {
        cfg.well_known.client_base_url = Some("https://matrix.example.org".into());
        cfg.well_known.server = Some("matrix.example.org:443".into());
    })
    .await;
    let c = delegated.client();
    assert_eq!(
        c.get("/.well-known/matrix/client").await.ok()["m.homeserver"]["base_url"],
        "https://matrix.example.org"
    );
    assert_eq!(c.get("/.well-known/matrix/server").await.ok()["m.server"], "matrix.example.org:443");
    delegated.client().register("bob", "pw-bob").await.ok();
    let login = delegated.client().login("bob", "pw-bob").await.ok();
    assert_eq!(login["well_known"]["m.homeserver"]["base_url"], "https://matrix.example.org");
}
