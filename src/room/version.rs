//! Everything that differs between room versions, in one place (ruma's `RoomVersionRules` underneath).

use ruma::canonical_json::{CanonicalJsonObject, CanonicalJsonValue};
use ruma::room_version_rules::{EventIdFormatVersion, EventsReferenceFormatVersion, RoomVersionRules};
use ruma::{EventId, OwnedEventId, RoomVersionId};

use crate::error::{Error, Result};

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
    match rules.event_id_format {
        EventIdFormatVersion::V1 => match pdu.get("event_id") {
            Some(CanonicalJsonValue::String(s)) => EventId::parse(s).map_err(|e| e.to_string()),
            _ => Err("v1/v2 event without `event_id`".into()),
        },
        _ => {
            let hash = ruma::signatures::reference_hash(pdu, rules).map_err(|e| e.to_string())?;
            EventId::parse(format!("${hash}")).map_err(|e| e.to_string())
        }
    }
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

    #[test]
    fn the_configuration_knows_which_versions_are_creatable() {
        let newest = crate::config::NEWEST_ROOM_VERSION;
        let expected: Vec<String> = (1..=newest).map(|v| v.to_string()).collect();
        assert_eq!(CREATABLE, expected.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(CREATABLE.contains(&DEFAULT_ROOM_VERSION));
    }
}
