//! A PDU as the room core handles it: the canonical JSON plus the fields auth and state resolution need.

use ruma::canonical_json::{CanonicalJsonObject, CanonicalJsonValue};
use ruma::events::TimelineEventType;
use ruma::room_version_rules::{EventsReferenceFormatVersion, RoomVersionRules};
use ruma::{EventId, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UInt, UserId};
use serde_json::value::RawValue;
use serde_json::{json, Value};

/// Largest PDU accepted or built, in bytes of canonical JSON (spec: 65536).
pub const MAX_PDU_BYTES: usize = 65536;

#[derive(Clone, Debug)]
pub struct Pdu {
    pub event_id: OwnedEventId,
    pub room_id: OwnedRoomId,
    pub sender: OwnedUserId,
    pub kind: TimelineEventType,
    pub state_key: Option<String>,
    pub content: Box<RawValue>,
    pub prev_events: Vec<OwnedEventId>,
    pub auth_events: Vec<OwnedEventId>,
    pub redacts: Option<OwnedEventId>,
    pub origin_server_ts: MilliSecondsSinceUnixEpoch,
    pub depth: i64,
    pub rejected: bool,
    /// The whole PDU as received or built (signatures included, `unsigned` removed).
    pub json: CanonicalJsonObject,
}

fn str_field<'a>(obj: &'a CanonicalJsonObject, key: &str) -> Result<&'a str, String> {
    match obj.get(key) {
        Some(CanonicalJsonValue::String(s)) => Ok(s),
        Some(_) => Err(format!("`{key}` is not a string")),
        None => Err(format!("missing `{key}`")),
    }
}

fn event_refs(
    obj: &CanonicalJsonObject,
    key: &str,
    format: EventsReferenceFormatVersion,
) -> Result<Vec<OwnedEventId>, String> {
    let Some(CanonicalJsonValue::Array(items)) = obj.get(key) else {
        return Err(format!("missing or invalid `{key}`"));
    };
    items
        .iter()
        .map(|item| {
            let id = match (format, item) {
                (EventsReferenceFormatVersion::V1, CanonicalJsonValue::Array(pair)) => match pair.first() {
                    Some(CanonicalJsonValue::String(s)) => s.as_str(),
                    _ => return Err(format!("invalid entry in `{key}`")),
                },
                (_, CanonicalJsonValue::String(s)) => s.as_str(),
                _ => return Err(format!("invalid entry in `{key}`")),
            };
            EventId::parse(id).map_err(|e| format!("invalid event id in `{key}`: {e}"))
        })
        .collect()
}

impl Pdu {
    /// Parses a PDU whose id is already known (computed from the reference hash, or given in v1/v2 events).
    pub fn from_canonical(
        mut json: CanonicalJsonObject,
        event_id: OwnedEventId,
        rules: &RoomVersionRules,
    ) -> Result<Pdu, String> {
        json.remove("unsigned");
        let kind: TimelineEventType = str_field(&json, "type")?.into();
        // Since v12 the create event has no room_id: the room id is derived from its event id.
        let room_id = match json.get("room_id") {
            Some(CanonicalJsonValue::String(s)) => RoomId::parse(s).map_err(|e| format!("invalid room_id: {e}"))?,
            Some(_) => return Err("`room_id` is not a string".into()),
            None if rules.authorization.room_create_event_id_as_room_id && kind == TimelineEventType::RoomCreate => {
                RoomId::parse(format!("!{}", event_id.localpart()))
                    .map_err(|e| format!("cannot derive room id: {e}"))?
            }
            None => return Err("missing `room_id`".into()),
        };
        let sender = UserId::parse(str_field(&json, "sender")?).map_err(|e| format!("invalid sender: {e}"))?;
        let state_key = match json.get("state_key") {
            Some(CanonicalJsonValue::String(s)) => Some(s.clone()),
            Some(_) => return Err("`state_key` is not a string".into()),
            None => None,
        };
        let content = match json.get("content") {
            Some(c @ CanonicalJsonValue::Object(_)) => {
                RawValue::from_string(serde_json::to_string(c).map_err(|e| e.to_string())?)
                    .map_err(|e| e.to_string())?
            }
            _ => return Err("missing or invalid `content`".into()),
        };
        let format = rules.events_reference_format;
        let prev_events = event_refs(&json, "prev_events", format)?;
        let auth_events = event_refs(&json, "auth_events", format)?;
        // Where `redacts` lives depends on the room version: at the top level up to v10, in `content` from v11
        // (the other place is an ordinary extra key there, naming nothing).
        let in_content = rules.redaction.keep_room_redaction_redacts;
        let redacts = match (json.get("redacts"), kind == TimelineEventType::RoomRedaction) {
            (Some(CanonicalJsonValue::String(s)), _) if !in_content => {
                Some(EventId::parse(s).map_err(|e| e.to_string())?)
            }
            (_, true) if in_content => {
                let v: Value = serde_json::from_str(content.get()).map_err(|e| e.to_string())?;
                v.get("redacts").and_then(Value::as_str).and_then(|s| EventId::parse(s).ok())
            }
            _ => None,
        };
        let origin_server_ts = match json.get("origin_server_ts") {
            Some(CanonicalJsonValue::Integer(i)) => {
                MilliSecondsSinceUnixEpoch(UInt::try_from(i64::from(*i)).map_err(|_| "negative origin_server_ts")?)
            }
            _ => return Err("missing or invalid `origin_server_ts`".into()),
        };
        let depth = match json.get("depth") {
            Some(CanonicalJsonValue::Integer(i)) => i64::from(*i),
            _ => return Err("missing or invalid `depth`".into()),
        };
        Ok(Pdu {
            event_id,
            room_id,
            sender,
            kind,
            state_key,
            content,
            prev_events,
            auth_events,
            redacts,
            origin_server_ts,
            depth,
            rejected: false,
            json,
        })
    }

    /// Parses a PDU stored by us (canonical JSON string).
    pub fn from_stored(json: &str, event_id: &str, rules: &RoomVersionRules) -> Result<Pdu, String> {
        let obj = crate::room::canonical::object_from_str(json).map_err(|e| e.to_string())?;
        let id = EventId::parse(event_id).map_err(|e| e.to_string())?;
        Pdu::from_canonical(obj, id, rules)
    }

    pub fn content_value(&self) -> Value {
        serde_json::from_str(self.content.get()).unwrap_or(Value::Null)
    }

    pub fn is_state(&self) -> bool {
        self.state_key.is_some()
    }

    pub fn membership(&self) -> Option<String> {
        if self.kind != TimelineEventType::RoomMember {
            return None;
        }
        self.content_value().get("membership").and_then(Value::as_str).map(str::to_owned)
    }

    pub fn canonical_string(&self) -> String {
        serde_json::to_string(&self.json).expect("canonical json serialises")
    }
}

/// The client-server event format (`ClientEvent`) of a stored PDU.
pub fn client_event(pdu_json: &str, event_id: &str, room_id: &str, unsigned: Value, with_room_id: bool) -> Value {
    let v: Value = serde_json::from_str(pdu_json).unwrap_or(Value::Null);
    let mut out = serde_json::Map::new();
    for key in ["type", "content", "sender", "origin_server_ts", "state_key", "redacts"] {
        if let Some(x) = v.get(key) {
            out.insert(key.into(), x.clone());
        }
    }
    out.insert("event_id".into(), json!(event_id));
    if with_room_id {
        out.insert("room_id".into(), json!(room_id));
    }
    // v11+ moved `redacts` into content; clients still read the top-level key.
    if v.get("type").and_then(Value::as_str) == Some("m.room.redaction") && !out.contains_key("redacts") {
        if let Some(r) = v.pointer("/content/redacts") {
            out.insert("redacts".into(), r.clone());
        }
    }
    if unsigned.as_object().is_some_and(|o| !o.is_empty()) {
        out.insert("unsigned".into(), unsigned);
    }
    Value::Object(out)
}

impl ruma::state_res::Event for Pdu {
    type Id = OwnedEventId;

    fn event_id(&self) -> &Self::Id {
        &self.event_id
    }
    fn room_id(&self) -> Option<&RoomId> {
        // v12 create events carry no room_id (the room id is derived from their event id).
        self.json.contains_key("room_id").then_some(&*self.room_id)
    }
    fn sender(&self) -> &UserId {
        &self.sender
    }
    fn origin_server_ts(&self) -> MilliSecondsSinceUnixEpoch {
        self.origin_server_ts
    }
    fn event_type(&self) -> &TimelineEventType {
        &self.kind
    }
    fn content(&self) -> &RawValue {
        &self.content
    }
    fn state_key(&self) -> Option<&str> {
        self.state_key.as_deref()
    }
    fn prev_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.prev_events.iter())
    }
    fn auth_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.auth_events.iter())
    }
    fn redacts(&self) -> Option<&Self::Id> {
        self.redacts.as_ref()
    }
    fn rejected(&self) -> bool {
        self.rejected
    }
}
