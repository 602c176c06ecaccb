#![allow(dead_code)] // each fuzz binary uses one of these; tests/fuzz_corpus.rs uses them all
//! The fuzz targets' bodies, shared by the libFuzzer binaries (`fuzz/fuzz_targets/*.rs`, run with cargo-fuzz) and by
//! `tests/fuzz_corpus.rs`, which replays every committed corpus seed and crash reproducer through them on stable Rust
//! in the normal test run. Each function takes untrusted bytes and must not panic (nor hang) on any input; where a
//! round trip must hold it asserts it.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use hearth::room::pdu::Pdu;
use hearth::room::signatures::{self, DecodedKeys};
use hearth::room::{remote, version};
use ruma::canonical_json::{CanonicalJsonObject, CanonicalJsonValue};
use ruma::events::StateEventType;
use ruma::serde::Base64;
use ruma::signatures::PublicKeyMap;
use serde_json::Value;

/// Rooms of versions 3-12 written by a Hearth instance (fuzz/rooms.json: its public key and every event), so fuzzed
/// PDUs can reference real auth events and be authorised against real state.
struct Rooms {
    keys: PublicKeyMap,
    /// The key above as a curve point, decoded by the first check (as a server keeps it).
    decoded: DecodedKeys,
    /// version -> events of that room (the create event first).
    rooms: BTreeMap<String, Vec<Pdu>>,
}

fn rooms() -> &'static Rooms {
    static ROOMS: OnceLock<Rooms> = OnceLock::new();
    ROOMS.get_or_init(|| {
        let v: Value = serde_json::from_str(include_str!("rooms.json")).expect("rooms.json");
        let mut set = BTreeMap::new();
        set.insert(v["key_id"].as_str().unwrap().to_owned(), Base64::parse(v["public_key"].as_str().unwrap()).unwrap());
        let mut keys = PublicKeyMap::new();
        keys.insert(v["server_name"].as_str().unwrap().to_owned(), set);
        let mut rooms = BTreeMap::new();
        for (ver, events) in v["rooms"].as_object().unwrap() {
            let rules = version::rules(ver).unwrap();
            let pdus = events
                .as_array()
                .unwrap()
                .iter()
                .map(|e| Pdu::from_stored(&e["pdu"].to_string(), e["event_id"].as_str().unwrap(), &rules).unwrap())
                .collect();
            rooms.insert(ver.clone(), pdus);
        }
        Rooms { keys, decoded: DecodedKeys::default(), rooms }
    })
}

/// A PDU from federation: first byte = room version (1-12), the rest JSON. JSON -> canonical JSON (round trip) ->
/// `parse_remote` (size cap, event id / reference hash, field checks) -> `verify_remote` (signatures with the seed
/// server's key, content hash, redaction on mismatch) -> ruma's auth rules against the seed room of that version ->
/// redaction and the client format.
pub fn pdu(data: &[u8]) {
    let Some((&v, json)) = data.split_first() else { return };
    let ver = version::SUPPORTED[(v as usize + 11) % version::SUPPORTED.len()];
    let rules = version::rules(ver).expect("supported version");
    // Our direct parse must accept what ruma's two-step one accepts, and give the same object.
    if let Ok(text) = std::str::from_utf8(json) {
        let ruma = serde_json::from_str::<CanonicalJsonObject>(text).ok();
        assert_eq!(hearth::room::canonical::object_from_str(text).ok(), ruma, "canonical parse differs from ruma's");
    }
    let Ok(CanonicalJsonValue::Object(obj)) = serde_json::from_slice::<CanonicalJsonValue>(json) else { return };
    // Canonical JSON must re-parse to the same object.
    let canonical = serde_json::to_string(&obj).expect("canonical JSON serialises");
    let again: CanonicalJsonObject = serde_json::from_str(&canonical).expect("canonical JSON re-parses");
    assert_eq!(again, obj, "canonical JSON round trip");

    let (_, Ok((pdu, signed))) = remote::parse_remote_keeping_signed(obj, &rules, None) else { return };
    let r = rooms();
    // Our signature check (keys decoded once, the signed bytes made once for the event id and the check) must judge
    // every input as ruma's own `verify_event` does.
    let ruma = ruma::signatures::verify_event(&r.keys, &pdu.json, &rules).ok();
    assert_eq!(signatures::verify_event(&r.keys, &r.decoded, &pdu.json, &rules, None).ok(), ruma);
    assert_eq!(
        signatures::verify_event(&r.keys, &r.decoded, &pdu.json, &rules, signed.as_deref()).ok(),
        ruma,
        "signature check differs from ruma's"
    );
    let pdu = match remote::verify_remote(pdu.clone(), signed.as_deref(), &rules, &r.keys, &r.decoded) {
        Ok(verified) => verified,
        // Unsigned or forged: still push it through the auth rules, which must not panic either.
        Err(_) => pdu,
    };
    let events = r.rooms.get(ver).map(Vec::as_slice).unwrap_or_default();
    let by_id = |id: &ruma::EventId| events.iter().find(|e| e.event_id == id).cloned();
    let _ = ruma::state_res::check_state_independent_auth_rules(&rules.authorization, &pdu, by_id);
    let _ =
        ruma::state_res::check_state_dependent_auth_rules(&rules.authorization, &pdu, |t: &StateEventType, k: &str| {
            events
                .iter()
                .rev()
                .find(|e| e.kind.to_string() == t.to_string() && e.state_key.as_deref() == Some(k))
                .cloned()
        });
    let _ = ruma::canonical_json::redact(pdu.json.clone(), &rules.redaction, None);
    let _ = hearth::room::pdu::client_event(
        &pdu.canonical_string(),
        pdu.event_id.as_str(),
        pdu.room_id.as_str(),
        Value::Null,
        true,
    );
    let _ = pdu.membership();
}

/// An `Authorization: X-Matrix ...` header value.
pub fn x_matrix(data: &[u8]) {
    let Ok(h) = std::str::from_utf8(data) else { return };
    if let Some((origin, destination, key, sig)) = hearth::federation::parse_x_matrix(h) {
        // What the parser returns is what a header built from it parses to (for values a server would send).
        let plain = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:-+/".contains(&b));
        if plain(&origin) && plain(&key) && plain(&sig) && destination.as_deref().is_none_or(plain) {
            let mut rebuilt = format!("X-Matrix origin=\"{origin}\",key=\"{key}\",sig=\"{sig}\"");
            if let Some(d) = &destination {
                rebuilt.push_str(&format!(",destination=\"{d}\""));
            }
            assert_eq!(hearth::federation::parse_x_matrix(&rebuilt), Some((origin, destination, key, sig)));
        }
    }
}

/// Server names, user/room/event ids and aliases, media ids, percent-encoding, as they arrive in paths and bodies.
pub fn ids(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    if let Ok(name) = ruma::ServerName::parse(s.as_ref()) {
        let _ = (name.host(), name.port(), name.is_ip_literal());
    }
    if let Ok(u) = ruma::UserId::parse(s.as_ref()) {
        let _ = (u.localpart(), u.server_name(), u.validate_strict());
    }
    if let Ok(r) = ruma::RoomId::parse(s.as_ref()) {
        let _ = r.server_name();
    }
    let _ = ruma::EventId::parse(s.as_ref());
    let _ = ruma::RoomAliasId::parse(s.as_ref());
    let _ = ruma::OwnedMxcUri::from(s.as_ref()).parts();
    let _ = hearth::media::check_media_id(&s);
    let decoded = hearth::http::percent_decode(&s);
    let _ = hearth::http::percent_decode(&decoded);
}

/// `/sync` and `/messages` tokens: `s{stream}[_{typing}]`. A parsed token prints back to the same token.
pub fn sync_token(data: &[u8]) {
    let Ok(t) = std::str::from_utf8(data) else { return };
    if let Ok(tok) = hearth::client::sync::parse_token(t) {
        let again = hearth::client::sync::parse_token(&format!("s{}_{}", tok.stream, tok.typing))
            .expect("printed token parses");
        assert_eq!((again.stream, again.typing), (tok.stream, tok.typing));
    }
}

/// A `/sync` filter (the JSON of `?filter=` or `POST /filter`), then applied to a few events.
pub fn filter(data: &[u8]) {
    let Ok(v) = serde_json::from_slice::<Value>(data) else { return };
    if let Ok(f) = hearth::client::sync::Filter::parse(&v) {
        for (t, sender) in [("m.room.message", "@a:x"), ("m.room.member", "@b:y"), ("", "")] {
            let _ = f.timeline.allows(t, sender);
            let _ = f.state.allows(t, sender);
            let _ = f.account_data.allows(t, sender);
        }
    }
}

/// Federation media answers (`multipart/mixed`): first line the Content-Type, the rest the body.
pub fn multipart(data: &[u8]) {
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let content_type = String::from_utf8_lossy(&data[..split]);
    let body = data.get(split + 1..).unwrap_or_default();
    if let Some(boundary) = hearth::media::multipart::boundary_of(&content_type) {
        if let Some(parts) = hearth::media::multipart::parse(body, &boundary) {
            for p in parts {
                if let Some(d) = p.headers.get("content-disposition") {
                    let _ = hearth::media::multipart::disposition_filename(d);
                }
            }
        }
    }
    let _ = hearth::media::multipart::disposition_filename(&content_type);
}
