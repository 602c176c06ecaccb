//! Power levels as the client API needs them for checks ruma's auth does not cover (redacting others' events,
//! room directory changes). Auth of events themselves is ruma's job.

use ruma::UserId;
use serde_json::Value;

use crate::error::Result;
use crate::room::{load_pdu, state_content, state_event, version, Pdu};
use crate::store::ids::StateGroup;
use crate::store::Db;

pub struct PowerLevels {
    content: Value,
    creators: Vec<String>,
    creators_privileged: bool,
    has_pl_event: bool,
}

fn int(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

impl PowerLevels {
    pub fn load(conn: Db<'_>, sg: StateGroup, room_version: &str) -> Result<PowerLevels> {
        let pl = state_content(conn, sg, "m.room.power_levels", "")?;
        let create = state_event(conn, sg, "m.room.create", "")?;
        Self::from_events(pl, create, room_version)
    }

    /// The power levels an event was authorised with: those among its own auth events (as Synapse judges a
    /// redaction), so events held without a state group (backfilled history) can be judged too. The create event
    /// is the room id's event in versions that leave it out of auth events (v12).
    pub fn of_auth_events(conn: Db<'_>, pdu: &Pdu, room_version: &str) -> Result<PowerLevels> {
        let (mut pl, mut create) = (None, None);
        for id in &pdu.auth_events {
            match load_pdu(conn, id)? {
                Some(e) if e.kind.to_string() == "m.room.power_levels" && e.state_key.as_deref() == Some("") => {
                    pl = Some(e.content_value());
                }
                Some(e) if e.kind.to_string() == "m.room.create" => create = Some(e),
                _ => {}
            }
        }
        if create.is_none() {
            let implied = format!("${}", pdu.room_id.as_str().trim_start_matches('!'));
            create = ruma::EventId::parse(&implied).ok().and_then(|id| load_pdu(conn, &id).ok().flatten());
        }
        Self::from_events(pl, create, room_version)
    }

    fn from_events(pl: Option<Value>, create: Option<Pdu>, room_version: &str) -> Result<PowerLevels> {
        let rules = version::rules(room_version)?;
        let mut creators = Vec::new();
        if let Some(create) = &create {
            creators.push(create.sender.to_string());
            if let Some(extra) = create.content_value().get("additional_creators").and_then(Value::as_array) {
                creators.extend(extra.iter().filter_map(Value::as_str).map(str::to_owned));
            }
        }
        Ok(PowerLevels {
            has_pl_event: pl.is_some(),
            content: pl.unwrap_or(Value::Null),
            creators,
            creators_privileged: version::creators_privileged(&rules),
        })
    }

    /// The room's creators: the create event's sender, then its `additional_creators`.
    pub fn creators(&self) -> &[String] {
        &self.creators
    }

    pub fn user(&self, user_id: &UserId) -> i64 {
        let user_id = user_id.as_str();
        if self.creators_privileged && self.creators.iter().any(|c| c == user_id) {
            return i64::MAX;
        }
        if !self.has_pl_event {
            // Without a power levels event the creator has 100, everyone else 0.
            return if self.creators.first().map(String::as_str) == Some(user_id) { 100 } else { 0 };
        }
        int(self.content.get("users").and_then(|u| u.get(user_id)))
            .or_else(|| int(self.content.get("users_default")))
            .unwrap_or(0)
    }

    pub fn action(&self, name: &str, default: i64) -> i64 {
        int(self.content.get(name)).unwrap_or(default)
    }

    pub fn for_event(&self, event_type: &str, is_state: bool) -> i64 {
        int(self.content.get("events").and_then(|e| e.get(event_type))).unwrap_or_else(|| {
            if is_state {
                self.action("state_default", if self.has_pl_event { 50 } else { 0 })
            } else {
                self.action("events_default", 0)
            }
        })
    }

    pub fn can_redact_others(&self, user_id: &UserId) -> bool {
        self.user(user_id) >= self.action("redact", 50)
    }
}
