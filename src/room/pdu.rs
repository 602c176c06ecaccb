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

/// The fields of a stored PDU [`Pdu::from_stored_fields`] reads, borrowed from its text where it has no escapes.
#[derive(serde::Deserialize)]
struct StoredFields<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(default, borrow)]
    room_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    sender: std::borrow::Cow<'a, str>,
    #[serde(default, borrow)]
    state_key: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    content: &'a RawValue,
    #[serde(borrow)]
    prev_events: Vec<&'a RawValue>,
    #[serde(borrow)]
    auth_events: Vec<&'a RawValue>,
    #[serde(default, borrow)]
    redacts: Option<std::borrow::Cow<'a, str>>,
    origin_server_ts: u64,
    depth: i64,
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

    /// [`Pdu::from_stored`] reading only the fields, for checks that read nothing else (the auth rules): `json`
    /// is left with `room_id` alone, when the event lists one (what [`ruma::state_res::Event::room_id`] looks at).
    /// The canonical tree of every key, `hashes` and `signatures` included, was most of the parse: the resync's
    /// auth phase reads every state event and the auth events it cites (bench/PROFILE.md, round 11).
    pub fn from_stored_fields(text: &str, event_id: &str, rules: &RoomVersionRules) -> Result<Pdu, String> {
        let f: StoredFields<'_> = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let event_id = EventId::parse(event_id).map_err(|e| e.to_string())?;
        let kind: TimelineEventType = f.kind.as_ref().into();
        let mut json = CanonicalJsonObject::new();
        let room_id = match f.room_id {
            Some(id) => {
                let parsed = RoomId::parse(id.as_ref()).map_err(|e| format!("invalid room_id: {e}"))?;
                json.insert("room_id".into(), CanonicalJsonValue::String(id.into_owned()));
                parsed
            }
            None if rules.authorization.room_create_event_id_as_room_id && kind == TimelineEventType::RoomCreate => {
                RoomId::parse(format!("!{}", event_id.localpart()))
                    .map_err(|e| format!("cannot derive room id: {e}"))?
            }
            None => return Err("missing `room_id`".into()),
        };
        let refs = |items: Vec<&RawValue>, key: &str| -> Result<Vec<OwnedEventId>, String> {
            items
                .into_iter()
                .map(|item| {
                    let id: std::borrow::Cow<'_, str> = match rules.events_reference_format {
                        EventsReferenceFormatVersion::V1 => {
                            let (id, _): (std::borrow::Cow<'_, str>, serde::de::IgnoredAny) =
                                serde_json::from_str(item.get()).map_err(|_| format!("invalid entry in `{key}`"))?;
                            id
                        }
                        _ => serde_json::from_str(item.get()).map_err(|_| format!("invalid entry in `{key}`"))?,
                    };
                    EventId::parse(id.as_ref()).map_err(|e| format!("invalid event id in `{key}`: {e}"))
                })
                .collect()
        };
        let redacts = match (f.redacts, kind == TimelineEventType::RoomRedaction) {
            (Some(id), _) if !rules.redaction.keep_room_redaction_redacts => {
                Some(EventId::parse(id.as_ref()).map_err(|e| e.to_string())?)
            }
            (_, true) if rules.redaction.keep_room_redaction_redacts => {
                let v: Value = serde_json::from_str(f.content.get()).map_err(|e| e.to_string())?;
                v.get("redacts").and_then(Value::as_str).and_then(|s| EventId::parse(s).ok())
            }
            _ => None,
        };
        Ok(Pdu {
            event_id,
            room_id,
            sender: UserId::parse(f.sender.as_ref()).map_err(|e| format!("invalid sender: {e}"))?,
            kind,
            state_key: f.state_key.map(std::borrow::Cow::into_owned),
            content: f.content.to_owned(),
            prev_events: refs(f.prev_events, "prev_events")?,
            auth_events: refs(f.auth_events, "auth_events")?,
            redacts,
            origin_server_ts: MilliSecondsSinceUnixEpoch(
                UInt::try_from(f.origin_server_ts).map_err(|_| "invalid origin_server_ts")?,
            ),
            depth: f.depth,
            rejected: false,
            json,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The fields a check reads, as text (`json` differs by design).
    fn fields(p: &Pdu) -> String {
        format!(
            "{} {} {} {} {:?} {} {:?} {:?} {:?} {:?} {} {:?}",
            p.event_id,
            p.room_id,
            p.sender,
            p.kind,
            p.state_key,
            p.content.get(),
            p.prev_events,
            p.auth_events,
            p.redacts,
            p.origin_server_ts,
            p.depth,
            ruma::state_res::Event::room_id(p),
        )
    }

    #[test]
    fn reading_the_fields_only_gives_the_fields_of_the_whole_parse() {
        let refs = |v: &str, ids: &[&str]| -> Value {
            if v == "1" || v == "2" {
                json!(ids.iter().map(|i| json!([i, {"sha256": "abc"}])).collect::<Vec<_>>())
            } else {
                json!(ids)
            }
        };
        for v in ["1", "2", "3", "10", "11", "12"] {
            let rules = crate::room::version::rules(v).unwrap();
            let events = [
                json!({"type": "m.room.member", "state_key": "@u\u{e9}\\\"x:a.example", "sender": "@u\u{e9}\\\"x:a.example",
                       "room_id": "!r:a.example", "content": {"membership": "join", "displayname": "Ü \"q\""},
                       "prev_events": refs(v, &["$p1", "$p2"]), "auth_events": refs(v, &["$a1"]), "depth": 12,
                       "origin_server_ts": 1_700_000_000_000u64, "hashes": {"sha256": "h"},
                       "signatures": {"a.example": {"ed25519:k": "s"}}, "origin": "a.example"}),
                json!({"type": "m.room.redaction", "sender": "@u:a.example", "room_id": "!r:a.example",
                       "redacts": "$top", "content": {"redacts": "$inner"}, "prev_events": refs(v, &["$p"]),
                       "auth_events": refs(v, &[]), "depth": 3, "origin_server_ts": 5, "hashes": {"sha256": "h"},
                       "signatures": {}}),
                json!({"type": "m.room.create", "state_key": "", "sender": "@u:a.example",
                       "content": {"room_version": v}, "prev_events": [], "auth_events": [], "depth": 1,
                       "origin_server_ts": 5, "hashes": {"sha256": "h"}, "signatures": {}}),
            ];
            for (i, e) in events.iter().enumerate() {
                let text = serde_json::to_string(&e).unwrap();
                let id = "$AbCdEfGhIjKlMnOpQrStUvWxYz0123456789-_abcde";
                let whole = Pdu::from_stored(&text, id, &rules);
                let light = Pdu::from_stored_fields(&text, id, &rules);
                match (&whole, &light) {
                    (Ok(w), Ok(l)) => assert_eq!(fields(w), fields(l), "room v{v}, event {i}"),
                    // Only a create event without room_id before v12 is refused, by both.
                    (Err(_), Err(_)) => assert!(i == 2 && v != "12", "room v{v}, event {i}: {whole:?}"),
                    _ => panic!("room v{v}, event {i}: whole {whole:?}, fields only {light:?}"),
                }
            }
        }
    }
}
