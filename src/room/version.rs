//! Everything that differs between room versions, in one place (ruma's `RoomVersionRules` underneath).

use ruma::canonical_json::{CanonicalJsonObject, CanonicalJsonValue};
use ruma::room_version_rules::{EventIdFormatVersion, EventsReferenceFormatVersion, RoomVersionRules};
use ruma::{EventId, OwnedEventId, RoomVersionId};

use crate::error::{Error, Result};
use crate::room::signatures;
use ruma::serde::base64::{Base64, Standard, UrlSafe};

/// Version of rooms we create when neither the client nor the configuration (`rooms.default_version`) says.
pub const DEFAULT_ROOM_VERSION: &str = crate::config::DEFAULT_ROOM_VERSION;

/// Versions we can create locally: all we understand (v1/v2 events carry a server-chosen `event_id`).
pub const CREATABLE: &[&str] = &["1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12"];

/// Versions we understand (for rooms joined over federation).
pub const SUPPORTED: &[&str] = &["1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12"];

pub fn rules(version: &str) -> Result<RoomVersionRules> {
    let id = RoomVersionId::try_from(version).map_err(|_| Error::unsupported_room_version(version.to_owned()))?;
    if !SUPPORTED.contains(&version) {
        return Err(Error::unsupported_room_version(format!("room version {version} is not supported")));
    }
    id.rules().ok_or_else(|| Error::unsupported_room_version(format!("room version {version} is not supported")))
}

/// The event id of a PDU: its reference hash (v3+) or the `event_id` field it carries (v1/v2).
pub fn event_id(pdu: &CanonicalJsonObject, rules: &RoomVersionRules) -> Result<OwnedEventId, String> {
    event_id_keeping_signed(pdu, rules).map(|(id, _)| id)
}

/// Longest redacted PDU a reference hash is computed for (ruma's `reference_hash` refuses longer ones).
const MAX_REFERENCE_HASHED_BYTES: usize = 65_535;

/// [`event_id`], with the bytes the reference hash covered (v3+): the same bytes the event's servers signed
/// ([`signatures::signed_bytes`]), which the signature check then need not serialize again. As ruma's
/// `reference_hash`: SHA-256 of those bytes, unpadded base64, URL-safe from room v4 on.
pub fn event_id_keeping_signed(
    pdu: &CanonicalJsonObject,
    rules: &RoomVersionRules,
) -> Result<(OwnedEventId, Option<String>), String> {
    let encode: fn(&[u8]) -> String = match rules.event_id_format {
        EventIdFormatVersion::V1 => {
            return match pdu.get("event_id") {
                Some(CanonicalJsonValue::String(s)) => Ok((EventId::parse(s).map_err(|e| e.to_string())?, None)),
                _ => Err("v1/v2 event without `event_id`".into()),
            }
        }
        EventIdFormatVersion::V2 => |h: &[u8]| Base64::<Standard, &[u8]>::new(h).encode(),
        _ => |h: &[u8]| Base64::<UrlSafe, &[u8]>::new(h).encode(),
    };
    let signed = signatures::signed_bytes(pdu, rules)?;
    if signed.len() > MAX_REFERENCE_HASHED_BYTES {
        return Err("PDU is larger than maximum of 65535 bytes".into());
    }
    let hash = ring::digest::digest(&ring::digest::SHA256, signed.as_bytes());
    let id = EventId::parse(format!("${}", encode(hash.as_ref()))).map_err(|e| e.to_string())?;
    Ok((id, Some(signed)))
}

/// `prev_events`/`auth_events` as this version writes them.
pub fn event_refs(ids: &[(OwnedEventId, String)], rules: &RoomVersionRules) -> CanonicalJsonValue {
    CanonicalJsonValue::Array(
        ids.iter()
            .map(|(id, sha256)| match rules.events_reference_format {
                EventsReferenceFormatVersion::V1 => {
                    let mut hashes = CanonicalJsonObject::new();
                    hashes.insert("sha256".into(), CanonicalJsonValue::String(sha256.clone()));
                    CanonicalJsonValue::Array(vec![
                        CanonicalJsonValue::String(id.to_string()),
                        CanonicalJsonValue::Object(hashes),
                    ])
                }
                _ => CanonicalJsonValue::String(id.to_string()),
            })
            .collect(),
    )
}

/// Whether `redacts` lives in `content` (v11+) rather than at the top level.
pub fn redacts_in_content(rules: &RoomVersionRules) -> bool {
    rules.redaction.keep_room_redaction_redacts
}

/// The room's creators have unlimited power and must not be listed in `m.room.power_levels` (v12+).
pub fn creators_privileged(rules: &RoomVersionRules) -> bool {
    rules.authorization.explicitly_privilege_room_creators
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our reference hash is ruma's, for each event id format, and an event too large for one is refused by both.
    #[test]
    fn event_ids_are_ruma_reference_hashes() {
        use ruma::canonical_json::to_canonical_value;
        for v in ["3", "4", "10", "11", "12"] {
            let rules = rules(v).unwrap();
            for body in ["hi", &"x".repeat(70_000)] {
                let pdu = serde_json::json!({
                    "auth_events": [], "content": {"body": body, "membership": "join"}, "depth": 3,
                    "hashes": {"sha256": "abc"}, "origin_server_ts": 1, "prev_events": [], "room_id": "!r:a.example",
                    "sender": "@u:a.example", "state_key": "@u:a.example", "type": "m.room.member",
                    "signatures": {"a.example": {"ed25519:k": "sig"}}, "unsigned": {"age": 1}
                });
                let CanonicalJsonValue::Object(pdu) = to_canonical_value(pdu).unwrap() else { unreachable!() };
                let ours = event_id_keeping_signed(&pdu, &rules);
                let theirs = ruma::signatures::reference_hash(&pdu, &rules);
                match (ours, theirs) {
                    (Ok((id, signed)), Ok(hash)) => {
                        assert_eq!(id.as_str(), format!("${hash}"), "room v{v}");
                        assert_eq!(signed.unwrap(), signatures::signed_bytes(&pdu, &rules).unwrap());
                    }
                    (Err(_), Err(_)) => assert!(body.len() > 65_535, "room v{v}: both refuse a small event"),
                    (ours, theirs) => panic!("room v{v}: ours {ours:?}, ruma's {theirs:?}"),
                }
            }
        }
    }

    #[test]
    fn the_configuration_knows_which_versions_are_creatable() {
        let newest = crate::config::NEWEST_ROOM_VERSION;
        let expected: Vec<String> = (1..=newest).map(|v| v.to_string()).collect();
        assert_eq!(CREATABLE, expected.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(CREATABLE.contains(&DEFAULT_ROOM_VERSION));
    }
}
