//! Federation: outbound client, keys, inbound routes (with `X-Matrix` verification), the transaction sender,
//! remote joins and the partial-state resync.

pub mod acl;
pub mod backfill;
pub mod batches;
pub mod client;
pub mod gap;
pub mod inbound;
pub mod invite;
pub mod join;
pub mod keys;
pub mod resync;
pub mod routes;
pub mod sender;
pub mod stream;
pub mod tls;

use std::sync::Arc;

use axum::extract::{FromRequest, Request};
use axum::http::header;
use base64::Engine;
use ruma::canonical_json::{CanonicalJsonObject, CanonicalJsonValue};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::http::AppState;

pub use client::FedClient;
pub use keys::KeyStore;

/// What federation code needs beyond the store.
pub struct Federation {
    pub client: Arc<FedClient>,
    pub keys: KeyStore,
}

/// A verified inbound federation request: the origin server and the JSON body (if any).
pub struct Signed {
    pub origin: String,
    pub body: Option<Value>,
}

/// Parses an `Authorization: X-Matrix origin=..,destination=..,key=..,sig=..` header (public for the fuzz targets).
pub fn parse_x_matrix(h: &str) -> Option<(String, Option<String>, String, String)> {
    let rest = h.strip_prefix("X-Matrix ")?;
    let mut origin = None;
    let mut destination = None;
    let mut key = None;
    let mut sig = None;
    for part in rest.split(',') {
        let (k, v) = part.trim().split_once('=')?;
        let v = v.trim().trim_matches('"').to_owned();
        match k.trim() {
            "origin" => origin = Some(v),
            "destination" => destination = Some(v),
            "key" => key = Some(v),
            "sig" => sig = Some(v),
            _ => {}
        }
    }
    Some((origin?, destination, key?, sig?))
}

impl FromRequest<AppState> for Signed {
    type Rejection = Error;

    async fn from_request(req: Request, s: &AppState) -> Result<Self> {
        let uri = req.uri().path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_default();
        let method = req.method().as_str().to_owned();
        let header = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
            .ok_or_else(|| Error::unauthorized("missing X-Matrix authorization"))?;
        let (origin, destination, key_id, sig) =
            parse_x_matrix(&header).ok_or_else(|| Error::unauthorized("malformed X-Matrix header"))?;
        let ours = s.identity.server_name.as_str();
        if let Some(d) = &destination {
            if d != ours {
                return Err(Error::unauthorized("request is for another destination"));
            }
        }
        ruma::ServerName::parse(&origin).map_err(|_| Error::unauthorized("invalid origin"))?;
        let limit = s.config.limits.max_request_bytes.max(4 << 20);
        let bytes = axum::body::to_bytes(req.into_body(), limit).await.map_err(|e| {
            let e = e.into_inner();
            if tls::is_body_timeout(e.as_ref()) {
                Error::request_timeout("the request body did not arrive in time")
            } else {
                Error::too_large("request body too large")
            }
        })?;
        let body: Option<Value> = if bytes.is_empty() {
            None
        } else {
            Some(serde_json::from_slice(&bytes).map_err(|e| Error::not_json(format!("body is not JSON: {e}")))?)
        };
        let fed = s.federation.as_ref().ok_or_else(|| Error::forbidden("federation is disabled"))?;
        let public =
            fed.keys.server_key(&origin, &key_id).await?.ok_or_else(|| Error::unauthorized("unknown signing key"))?;

        let mut obj = CanonicalJsonObject::new();
        obj.insert("method".into(), CanonicalJsonValue::String(method));
        obj.insert("uri".into(), CanonicalJsonValue::String(uri));
        obj.insert("origin".into(), CanonicalJsonValue::String(origin.clone()));
        obj.insert("destination".into(), CanonicalJsonValue::String(ours.to_owned()));
        if let Some(b) = &body {
            obj.insert(
                "content".into(),
                CanonicalJsonValue::try_from(b.clone()).map_err(|e| Error::bad_json(e.to_string()))?,
            );
        }
        let json =
            ruma::signatures::to_canonical_json_string_for_signing(&obj).map_err(|e| Error::bad_json(e.to_string()))?;
        let sig_bytes = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(sig.trim_end_matches('='))
            .map_err(|_| Error::unauthorized("signature is not base64"))?;
        ruma::signatures::verify_canonical_json_bytes(
            &ruma::SigningKeyAlgorithm::Ed25519,
            &public,
            &sig_bytes,
            json.as_bytes(),
        )
        .map_err(|_| Error::unauthorized("invalid X-Matrix signature"))?;
        Ok(Signed { origin, body })
    }
}
