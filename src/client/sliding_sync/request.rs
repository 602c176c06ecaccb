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

/// List filters (the simplified MSC's; others are accepted and ignored).
#[derive(Deserialize, Default, Debug)]
#[serde(default)]
pub struct Filters {
    pub is_dm: Option<bool>,
    pub is_encrypted: Option<bool>,
    pub is_invite: Option<bool>,
    pub spaces: Option<Vec<String>>,
    pub room_types: Option<Vec<Option<String>>>,
    pub not_room_types: Vec<Option<String>>,
    /// Only rooms with any of these tags (the user's `m.tag` room account data); an empty list matches none.
    pub tags: Option<Vec<String>>,
    /// No room with any of these tags (wins over `tags`).
    pub not_tags: Option<Vec<String>>,
}

impl Filters {
    /// Whether the filter looks at room tags (they are read only then).
    pub fn uses_tags(&self) -> bool {
        self.tags.is_some() || self.not_tags.is_some()
    }
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

/// The to-device extension sends at most this many messages when the request names no `limit` (as Synapse).
pub const TO_DEVICE_DEFAULT_LIMIT: u64 = 100;
/// ... and never more than this many, whatever it names.
pub const TO_DEVICE_MAX_LIMIT: u64 = 1000;

impl ToDeviceRequest {
    /// How many messages one answer carries (at least one, so a connection always moves on).
    pub fn limit(&self) -> usize {
        self.limit.unwrap_or(TO_DEVICE_DEFAULT_LIMIT).clamp(1, TO_DEVICE_MAX_LIMIT) as usize
    }

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
    /// be sent again for `other`).
    pub fn covers(&self, other: &Effective) -> bool {
        self.timeline_limit >= other.timeline_limit && self.covers_state(other)
    }

    /// Whether every `required_state` entry of `other` is one of this config's, or within one of its wildcards.
    pub fn covers_state(&self, other: &Effective) -> bool {
        other.required_state.iter().all(|(t, k)| {
            let has = |t: &str, k: &str| self.required_state.contains(&(t.to_owned(), k.to_owned()));
            has(t, k) || (k != "$LAZY" && (has(t, "*") || has("*", k) || has("*", "*")))
        })
    }

    /// Whether the state entry (`event_type`, `state_key`) is one this config's `required_state` asks for (`*` any
    /// type or key, `$ME` the user `me`; `$LAZY` names no entry of its own).
    pub fn wants(&self, event_type: &str, state_key: &str, me: &str) -> bool {
        self.required_state.iter().any(|(t, k)| {
            (t == "*" || t == event_type)
                && match k.as_str() {
                    "*" => true,
                    "$ME" => state_key == me,
                    "$LAZY" => false,
                    k => k == state_key,
                }
        })
    }
}

/// What a connection remembers of the `required_state` a room was sent with (Synapse's per-connection room
/// config): what was asked now, plus the entries asked before and dropped since whose state did not change (the
/// client still holds their current value, so asking for them again sends nothing). `unchanged` tells, for an
/// exact (type, key) entry, whether its state is unchanged since the room was last sent; wildcard and `$LAZY`
/// entries dropped from the request are forgotten. Bounded: past [`MAX_REMEMBERED_STATE`] entries only the
/// request is kept.
pub fn remembered_state(
    before: &BTreeSet<(String, String)>,
    now: &BTreeSet<(String, String)>,
    mut unchanged: impl FnMut(&str, &str) -> Result<bool>,
) -> Result<BTreeSet<(String, String)>> {
    let mut out = now.clone();
    for (t, k) in before.difference(now) {
        if t == "*" || k == "*" || k == "$LAZY" {
            continue;
        }
        if unchanged(t, k)? {
            out.insert((t.clone(), k.clone()));
        }
    }
    if out.len() > MAX_REMEMBERED_STATE {
        return Ok(now.clone());
    }
    Ok(out)
}

/// At most this many `required_state` entries are remembered per room and connection.
pub const MAX_REMEMBERED_STATE: usize = 100;

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
        let mut all = Effective::default();
        all.merge(Some(1), &[("*".into(), "*".into())]);
        assert!(all.covers_state(&b), "a wildcard covers the entries within it");
        assert!(!all.covers_state(&a), "but not `$LAZY`");
    }

    #[test]
    fn wants_matches_wildcards_and_me() {
        let mut e = Effective::default();
        e.merge(None, &[("m.room.member".into(), "$ME".into()), ("*".into(), "".into())]);
        assert!(e.wants("m.room.member", "@me:x", "@me:x"));
        assert!(!e.wants("m.room.member", "@other:x", "@me:x"));
        assert!(e.wants("m.room.topic", "", "@me:x"));
        let mut lazy = Effective::default();
        lazy.merge(None, &[("m.room.member".into(), "$LAZY".into())]);
        assert!(!lazy.wants("m.room.member", "@me:x", "@me:x"));
    }

    #[test]
    fn dropped_entries_are_remembered_while_unchanged() {
        let set = |v: &[(&str, &str)]| v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect::<BTreeSet<_>>();
        let before = set(&[("m.room.name", ""), ("m.room.topic", ""), ("m.room.member", "*")]);
        let now = set(&[("m.room.name", "")]);
        let r = remembered_state(&before, &now, |t, _| Ok(t != "m.room.topic")).unwrap();
        assert_eq!(r, set(&[("m.room.name", "")]), "the topic changed, the member wildcard is forgotten");
        let r = remembered_state(&before, &now, |_, _| Ok(true)).unwrap();
        assert_eq!(r, set(&[("m.room.name", ""), ("m.room.topic", "")]));
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
        assert_eq!(r.extensions.to_device.as_ref().unwrap().limit(), TO_DEVICE_DEFAULT_LIMIT as usize);
        assert_eq!(r.lists["all"].filters.as_ref().unwrap().tags, Some(vec!["x".to_owned()]));
        let bad: Request = serde_json::from_value(serde_json::json!({"lists": {"a": {"ranges": [[5, 1]]}}})).unwrap();
        assert!(bad.validate().is_err());
    }
}
