//! Signing key rotation: the retired key stays published in `old_verify_keys` (with `expired_ts`), so events it
//! signed can still be verified by other servers.

mod common;

use common::TestServer;

#[tokio::test]
async fn rotated_key_is_kept_as_old_verify_key() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("hearth.db");
    let server_name;
    let first_key;
    {
        let d = db.clone();
        let s = TestServer::start_with(move |cfg| {
            cfg.database.path = d;
            cfg.federation.serve_on_client_listener = true;
            cfg.federation.enabled = true;
            cfg.federation.trusted_key_servers = vec![];
        })
        .await;
        server_name = s.server_name.clone();
        let r = s.client().get("/_matrix/key/v2/server").await.ok();
        first_key = r["verify_keys"].as_object().unwrap().keys().next().unwrap().clone();
        assert!(r["old_verify_keys"].as_object().unwrap().is_empty());
        s.stop().await;
    }
    let direct = hearth::store::DirectDb::open(&db).unwrap();
    let identity = hearth::room::Identity::load_or_create(direct.db(), &server_name).unwrap();
    let new_key = hearth::federation::keys::rotate_own_key(direct.db(), &identity).unwrap();
    drop(direct);
    assert_ne!(new_key, first_key);

    let d = db.clone();
    let s = TestServer::start_with(move |cfg| {
        cfg.database.path = d;
        cfg.federation.serve_on_client_listener = true;
        cfg.federation.enabled = true;
        cfg.federation.trusted_key_servers = vec![];
    })
    .await;
    let r = s.client().get("/_matrix/key/v2/server").await.ok();
    assert!(r["verify_keys"].get(&new_key).is_some(), "{r}");
    assert!(r["old_verify_keys"][&first_key]["expired_ts"].as_i64().unwrap() > 0, "{r}");
    s.stop().await;
}
