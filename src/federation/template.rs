//! Our membership event from a resident's `make_join`/`make_knock` template: what both do to it.

use ruma::canonical_json::{CanonicalJsonObject, CanonicalJsonValue};
use ruma::room_version_rules::RoomVersionRules;
use ruma::Int;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::room::Identity;

/// The template's event, without the fields the resident must not choose for us. `what` names the request in
/// errors (`make_join`, `make_knock`).
pub fn event_of(made: &Value, what: &str) -> Result<CanonicalJsonObject> {
    let template =
        made.get("event").cloned().ok_or_else(|| Error::internal(format!("{what} answer without an event")))?;
    let mut obj: CanonicalJsonObject =
        serde_json::from_value(template).map_err(|e| Error::internal(format!("bad {what} template: {e}")))?;
    for k in ["event_id", "signatures", "hashes", "unsigned"] {
        obj.remove(k);
    }
    Ok(obj)
}

/// Our origin, the time and the reason, an event id where the room version carries one, then hash and signature.
pub fn stamp_and_sign(
    identity: &Identity,
    obj: &mut CanonicalJsonObject,
    rules: &RoomVersionRules,
    reason: Option<&str>,
    what: &str,
) -> Result<()> {
    obj.insert("origin".into(), CanonicalJsonValue::String(identity.server_name.to_string()));
    obj.insert(
        "origin_server_ts".into(),
        CanonicalJsonValue::Integer(Int::try_from(crate::store::accounts::now_ms()).unwrap_or_default()),
    );
    if let (Some(r), Some(CanonicalJsonValue::Object(content))) = (reason, obj.get_mut("content")) {
        content.insert("reason".into(), CanonicalJsonValue::String(r.to_owned()));
    }
    if matches!(rules.event_id_format, ruma::room_version_rules::EventIdFormatVersion::V1) {
        obj.insert(
            "event_id".into(),
            CanonicalJsonValue::String(format!("${}:{}", crate::util::random_string(18), identity.server_name)),
        );
    }
    ruma::signatures::hash_and_sign_event(identity.server_name.as_str(), &identity.keypair, obj, &rules.redaction)
        .map_err(|e| Error::internal(format!("signing the {what} failed: {e}")))
}
