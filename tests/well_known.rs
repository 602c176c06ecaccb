//! `/.well-known/matrix/{client,server}` from configuration (delegation and client discovery).

mod common;

use common::TestServer;

#[tokio::test]
async fn well_known_defaults_and_configured() {
    let plain = TestServer::start().await;
    let c = plain.client();
    let client = c.get("/.well-known/matrix/client").await.ok();
    assert_eq!(client["m.homeserver"]["base_url"], serde_json::json!(plain.base_url));
    c.get("/.well-known/matrix/server").await.assert_err(404, "M_NOT_FOUND");

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
}
