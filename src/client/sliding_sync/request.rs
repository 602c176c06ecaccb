//! The request body of simplified sliding sync (MSC4186) and what is derived from it: the room config each room is
//! shown with, merged over the lists and subscriptions that name it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Timelines are cut at this many events (clients paginate further with `/messages`).
pub const MAX_TIMELINE_LIMIT: u64 = 100;

#[derive(Deserialize, Default, Debug)]
#[serde(default)]
pub struct Request {
    pub conn_id: Option<String>,
    pub txn_id: Option<String>,
    pub lists: BTreeMap<String, ListRequest>,
    pub room_subscriptions: BTreeMap<String, RoomConfig>,
    pub extensions: Extensions,
}

/// `timeline_limit` and `required_state`, of a list or a room subscription.
#[derive(Deserialize, Default, Debug, Clone)]
#[serde(default)]
pub struct RoomConfig {
    pub timeline_limit: Option<u64>,
    pub required_state: Vec<(String, String)>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default)]
pub struct ListRequest {
    pub ranges: Vec<(u64, u64)>,
    pub timeline_limit: Option<u64>,
    pub required_state: Vec<(String, String)>,
    pub filters: Option<Filters>,
}

/// List filters (the simplified MSC's: `tags`/`not_tags` and others are accepted and ignored).
#[derive(Deserialize, Default, Debug)]
#[serde(default)]
pub struct Filters {
    pub is_dm: Option<bool>,
    pub is_encrypted: Option<bool>,
    pub is_invite: Option<bool>,
    pub spaces: Option<Vec<String>>,
    pub room_types: Option<Vec<Option<String>>>,
    pub not_room_types: Vec<Option<String>>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default)]
pub struct Extensions {
    pub to_device: Option<ToDeviceRequest>,
    pub e2ee: Option<Scoped>,
    pub account_data: Option<Scoped>,
    pub receipts: Option<Scoped>,
    pub typing: Option<Scoped>,
}

/// An extension's switch and its scope (`lists`, `rooms`: `*` for all; absent means all).
#[derive(Deserialize, Default, Debug)]
#[serde(default)]
pub struct Scoped {
    pub enabled: Option<bool>,
    pub lists: Option<Vec<String>>,
    pub rooms: Option<Vec<String>>,
}

impl Scoped {
    pub fn on(this: &Option<Scoped>) -> Option<&Scoped> {
        this.as_ref().filter(|s| s.enabled == Some(true))
    }
}

#[derive(Deserialize, Default, Debug)]
#[serde(default)]
pub struct ToDeviceRequest {
    pub enabled: Option<bool>,
    pub since: Option<String>,
    pub limit: Option<u64>,
}

impl ToDeviceRequest {
    /// The `since` token: a stream position (anything else counts as the start).
    pub fn since_stream(&self) -> Option<i64> {
        self.since.as_deref().and_then(|s| s.parse().ok()).filter(|s: &i64| *s >= 0)
    }
}

impl Request {
    /// Checks what serde cannot: ranges run forwards, subscriptions name rooms, `required_state` pairs are sane.
    pub fn validate(&self) -> Result<()> {
        for (name, list) in &self.lists {
            if list.ranges.iter().any(|(a, b)| a > b) {
                return Err(Error::invalid_param(format!("list `{name}`: a range must run from low to high")));
            }
        }
        if let Some(id) = self.room_subscriptions.keys().find(|id| !id.starts_with('!')) {
            return Err(Error::invalid_param(format!("room_subscriptions: `{id}` is not a room id")));
        }
        Ok(())
    }
}

/// The config a room is shown with: the largest timeline limit and the union of the required state of every list
/// (range) and subscription that names it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Effective {
    pub timeline_limit: u64,
    pub required_state: BTreeSet<(String, String)>,
}

impl Effective {
    pub fn merge(&mut self, timeline_limit: Option<u64>, required_state: &[(String, String)]) {
        self.timeline_limit = self.timeline_limit.max(timeline_limit.unwrap_or(0).min(MAX_TIMELINE_LIMIT));
        self.required_state.extend(required_state.iter().cloned());
    }

    /// Whether `other` asks for nothing this config did not already cover (a room sent with this config need not
    /// be sent afresh for `other`).
    pub fn covers(&self, other: &Effective) -> bool {
        self.timeline_limit >= other.timeline_limit && other.required_state.is_subset(&self.required_state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_merge_and_cover() {
        let mut a = Effective::default();
        a.merge(Some(5), &[("m.room.name".into(), "".into())]);
        a.merge(Some(1000), &[("m.room.member".into(), "$LAZY".into())]);
        assert_eq!(a.timeline_limit, MAX_TIMELINE_LIMIT);
        assert_eq!(a.required_state.len(), 2);
        let mut b = Effective::default();
        b.merge(Some(1), &[("m.room.name".into(), "".into())]);
        assert!(a.covers(&b));
        assert!(!b.covers(&a));
    }

    #[test]
    fn requests_parse_and_validate() {
        let r: Request = serde_json::from_value(serde_json::json!({
            "lists": {"all": {"ranges": [[0, 9]], "timeline_limit": 1, "required_state": [["m.room.name", ""]],
                              "filters": {"is_dm": true, "room_types": [null, "m.space"], "tags": ["x"]}}},
            "room_subscriptions": {"!r:x": {"timeline_limit": 20}},
            "extensions": {"e2ee": {"enabled": true}, "to_device": {"enabled": true, "since": "12"}}
        }))
        .unwrap();
        r.validate().unwrap();
        assert_eq!(r.lists["all"].filters.as_ref().unwrap().room_types, Some(vec![None, Some("m.space".into())]));
        assert_eq!(r.extensions.to_device.as_ref().unwrap().since_stream(), Some(12));
        let bad: Request = serde_json::from_value(serde_json::json!({"lists": {"a": {"ranges": [[5, 1]]}}})).unwrap();
        assert!(bad.validate().is_err());
    }
}
