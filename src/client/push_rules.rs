//! Push rules: the server-default rule set merged with the user's own rules and their changes to default rules.
//!
//! The user's effective rule set is stored whole as their `m.push_rules` account data, so it also reaches clients
//! through /sync. Reading always re-merges with the current defaults: a default rule keeps only its `enabled` and
//! `actions` from storage (the definition itself comes from this file), and user rules keep their stored order.

use axum::extract::{Path, State};
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::http::{AppState, Auth, Json, Query};
use crate::store::account_data;

pub const PUSH_RULES: &str = "m.push_rules";

/// Rule kinds in evaluation order.
const KINDS: [&str; 5] = ["override", "content", "room", "sender", "underride"];

fn is_default(rule: &Value) -> bool {
    rule["rule_id"].as_str().is_some_and(|id| id.starts_with('.'))
}

fn sound(value: &str) -> Value {
    json!({"set_tweak": "sound", "value": value})
}

fn highlight() -> Value {
    json!({"set_tweak": "highlight"})
}

fn rule(id: &str, conditions: Value, actions: Value) -> Value {
    json!({"rule_id": id, "default": true, "enabled": true, "conditions": conditions, "actions": actions})
}

fn event_match(key: &str, pattern: &str) -> Value {
    json!({"kind": "event_match", "key": key, "pattern": pattern})
}

/// The server-default rules of one kind. `.m.rule.contains_display_name`, `.m.rule.roomnotif` and
/// `.m.rule.contains_user_name` were dropped from the spec in v1.17 but are kept (as Synapse does) because clients
/// still send messages without `m.mentions`.
fn defaults(kind: &str, user_id: &str) -> Vec<Value> {
    match kind {
        "override" => vec![
            json!({"rule_id": ".m.rule.master", "default": true, "enabled": false, "conditions": [], "actions": []}),
            rule(".m.rule.suppress_notices", json!([event_match("content.msgtype", "m.notice")]), json!([])),
            rule(
                ".m.rule.invite_for_me",
                json!([
                    event_match("type", "m.room.member"),
                    event_match("content.membership", "invite"),
                    event_match("state_key", user_id)
                ]),
                json!(["notify", sound("default")]),
            ),
            rule(".m.rule.member_event", json!([event_match("type", "m.room.member")]), json!([])),
            rule(
                ".m.rule.is_user_mention",
                json!([{"kind": "event_property_contains", "key": "content.m\\.mentions.user_ids", "value": user_id}]),
                json!(["notify", sound("default"), highlight()]),
            ),
            rule(
                ".m.rule.contains_display_name",
                json!([{"kind": "contains_display_name"}]),
                json!(["notify", sound("default"), highlight()]),
            ),
            rule(
                ".m.rule.is_room_mention",
                json!([{"kind": "event_property_is", "key": "content.m\\.mentions.room", "value": true},
                       {"kind": "sender_notification_permission", "key": "room"}]),
                json!(["notify", highlight()]),
            ),
            rule(
                ".m.rule.roomnotif",
                json!([event_match("content.body", "@room"), {"kind": "sender_notification_permission", "key": "room"}]),
                json!(["notify", highlight()]),
            ),
            rule(
                ".m.rule.tombstone",
                json!([event_match("type", "m.room.tombstone"), event_match("state_key", "")]),
                json!(["notify", highlight()]),
            ),
            rule(".m.rule.reaction", json!([event_match("type", "m.reaction")]), json!([])),
            rule(
                ".m.rule.room.server_acl",
                json!([event_match("type", "m.room.server_acl"), event_match("state_key", "")]),
                json!([]),
            ),
            rule(
                ".m.rule.suppress_edits",
                json!([{"kind": "event_property_is", "key": "content.m\\.relates_to.rel_type", "value": "m.replace"}]),
                json!([]),
            ),
        ],
        "content" => {
            let localpart = user_id.trim_start_matches('@').split(':').next().unwrap_or_default();
            vec![json!({
                "rule_id": ".m.rule.contains_user_name", "default": true, "enabled": true, "pattern": localpart,
                "actions": ["notify", sound("default"), highlight()],
            })]
        }
        "underride" => vec![
            rule(".m.rule.call", json!([event_match("type", "m.call.invite")]), json!(["notify", sound("ring")])),
            rule(
                ".m.rule.encrypted_room_one_to_one",
                json!([{"kind": "room_member_count", "is": "2"}, event_match("type", "m.room.encrypted")]),
                json!(["notify", sound("default")]),
            ),
            rule(
                ".m.rule.room_one_to_one",
                json!([{"kind": "room_member_count", "is": "2"}, event_match("type", "m.room.message")]),
                json!(["notify", sound("default")]),
            ),
            rule(".m.rule.message", json!([event_match("type", "m.room.message")]), json!(["notify"])),
            rule(".m.rule.encrypted", json!([event_match("type", "m.room.encrypted")]), json!(["notify"])),
        ],
        _ => Vec::new(),
    }
}

/// The `m.push_rules` content of a user who never changed anything.
pub fn default_ruleset(user_id: &str) -> Value {
    effective(user_id, None)
}

/// Merges stored `m.push_rules` content with the current defaults; returns `{"global": {kind: [rules]}}`.
/// Order per kind: `.m.rule.master`, then user rules, then the other default rules.
pub fn effective(user_id: &str, stored: Option<&Value>) -> Value {
    let mut global = serde_json::Map::new();
    for kind in KINDS {
        let stored_rules: Vec<Value> = stored.and_then(|s| s["global"][kind].as_array()).cloned().unwrap_or_default();
        let mut defaults = defaults(kind, user_id);
        for d in defaults.iter_mut() {
            if let Some(s) = stored_rules.iter().find(|s| s["rule_id"] == d["rule_id"]) {
                if let Some(e) = s.get("enabled").filter(|e| e.is_boolean()) {
                    d["enabled"] = e.clone();
                }
                if let Some(a) = s.get("actions").filter(|a| valid_actions(a)) {
                    d["actions"] = a.clone();
                }
            }
        }
        let user_rules = stored_rules.into_iter().filter(|r| !is_default(r) && r["rule_id"].is_string());
        let master_first = usize::from(defaults.first().is_some_and(|r| r["rule_id"] == ".m.rule.master"));
        let rest = defaults.split_off(master_first);
        let rules: Vec<Value> = defaults.into_iter().chain(user_rules).chain(rest).collect();
        global.insert(kind.to_owned(), Value::Array(rules));
    }
    json!({ "global": global })
}

fn valid_actions(v: &Value) -> bool {
    v.as_array().is_some_and(|a| {
        a.iter().all(|x| match x {
            // `dont_notify` and `coalesce` are obsolete but older clients still send them.
            Value::String(s) => matches!(s.as_str(), "notify" | "dont_notify" | "coalesce"),
            Value::Object(o) => o.get("set_tweak").is_some_and(Value::is_string),
            _ => false,
        })
    })
}

/// The user's current effective rule set.
pub async fn load(s: &AppState, user_id: &str) -> Result<Value> {
    let uid = user_id.to_owned();
    let stored = s.store.read(move |c| account_data::get(c, &uid, "", PUSH_RULES)).await?;
    Ok(effective(user_id, stored.as_ref()))
}

/// Read-modify-write of the rule list of one kind, atomically on the writer; the new set is stored (and so synced)
/// only when `f` succeeds.
async fn modify<F>(s: &AppState, user_id: &str, kind: &str, f: F) -> Result<()>
where
    F: FnOnce(&mut Vec<Value>) -> Result<()> + Send + 'static,
{
    let (uid, kind) = (user_id.to_owned(), kind.to_owned());
    s.store
        .write(move |w| {
            let stored = account_data::get(w.db(), &uid, "", PUSH_RULES)?;
            let mut rules = effective(&uid, stored.as_ref());
            let list = rules["global"][&kind].as_array_mut().ok_or_else(|| Error::internal("rule kind missing"))?;
            f(list)?;
            let rules = effective(&uid, Some(&rules)); // re-normalise the order
            account_data::set(w, &uid, "", PUSH_RULES, &rules)?;
            Ok(())
        })
        .await
}

fn check_scope(scope: &str) -> Result<()> {
    if scope != "global" {
        return Err(Error::invalid_param("the only push rule scope is `global`"));
    }
    Ok(())
}

fn check_kind(kind: &str) -> Result<()> {
    if !KINDS.contains(&kind) {
        return Err(Error::invalid_param(format!("unknown push rule kind `{kind}`")));
    }
    Ok(())
}

fn find<'a>(rules: &'a Value, kind: &str, rule_id: &str) -> Result<&'a Value> {
    rules["global"][kind]
        .as_array()
        .and_then(|l| l.iter().find(|r| r["rule_id"] == rule_id))
        .ok_or_else(|| Error::not_found("push rule not found"))
}

pub async fn get_all(State(s): State<AppState>, auth: Auth) -> Result<impl IntoResponse> {
    Ok(axum::Json(load(&s, auth.user_id.as_str()).await?))
}

pub async fn get_scope(State(s): State<AppState>, auth: Auth, Path(scope): Path<String>) -> Result<impl IntoResponse> {
    check_scope(&scope)?;
    let mut rules = load(&s, auth.user_id.as_str()).await?;
    Ok(axum::Json(rules["global"].take()))
}

pub async fn get_rule(
    State(s): State<AppState>,
    auth: Auth,
    Path((scope, kind, rule_id)): Path<(String, String, String)>,
) -> Result<impl IntoResponse> {
    check_scope(&scope)?;
    // A kind we do not know (`postcontent`, MSC4306) holds no rule: 404, so clients probing for one move on.
    if !KINDS.contains(&kind.as_str()) {
        return Err(Error::not_found(format!("no push rule kind `{kind}`")));
    }
    let rules = load(&s, auth.user_id.as_str()).await?;
    Ok(axum::Json(find(&rules, &kind, &rule_id)?.clone()))
}

#[derive(Deserialize)]
pub struct Position {
    before: Option<String>,
    after: Option<String>,
}

pub async fn put_rule(
    State(s): State<AppState>,
    auth: Auth,
    Path((scope, kind, rule_id)): Path<(String, String, String)>,
    Query(pos): Query<Position>,
    Json(body): Json<Value>,
) -> Result<impl IntoResponse> {
    check_scope(&scope)?;
    check_kind(&kind)?;
    if rule_id.is_empty() || rule_id.contains('/') || rule_id.contains('\\') {
        return Err(Error::invalid_param("invalid rule id"));
    }
    if rule_id.starts_with('.') {
        return Err(Error::invalid_param("rule ids starting with `.` are reserved for server-default rules"));
    }
    let actions = body.get("actions").cloned().ok_or_else(|| Error::bad_json("`actions` is required"))?;
    if !valid_actions(&actions) {
        return Err(Error::bad_json("invalid `actions`"));
    }
    let mut new = json!({"rule_id": rule_id, "default": false, "enabled": true, "actions": actions});
    match kind.as_str() {
        "override" | "underride" => {
            let conditions =
                body.get("conditions").cloned().ok_or_else(|| Error::bad_json("`conditions` is required"))?;
            let ok = conditions.as_array().is_some_and(|c| c.iter().all(|c| c["kind"].is_string()));
            if !ok {
                return Err(Error::bad_json("`conditions` must be a list of conditions with a `kind`"));
            }
            new["conditions"] = conditions;
        }
        "content" => {
            let pattern = body
                .get("pattern")
                .filter(|p| p.is_string())
                .ok_or_else(|| Error::bad_json("`pattern` is required"))?;
            new["pattern"] = pattern.clone();
        }
        _ => {}
    }
    modify(&s, auth.user_id.as_str(), &kind, move |list| {
        let anchor = |id: &str| -> Result<usize> {
            list.iter()
                .position(|r| r["rule_id"] == id && !is_default(r))
                .ok_or_else(|| Error::invalid_param(format!("no user-defined rule `{id}` to place this rule next to")))
        };
        let at = match (&pos.before, &pos.after) {
            (Some(b), _) => Some(anchor(b)?),
            (None, Some(a)) => Some(anchor(a)? + 1),
            (None, None) => None,
        };
        let existing = list.iter().position(|r| r["rule_id"] == rule_id);
        match (existing, at) {
            (Some(i), None) => {
                // An update keeps the rule's place and its enabled state.
                new["enabled"] = list[i]["enabled"].clone();
                list[i] = new;
            }
            (existing, at) => {
                if let Some(i) = existing {
                    new["enabled"] = list[i]["enabled"].clone();
                }
                let rule_id = new["rule_id"].clone();
                // Insert first, then remove the old copy, so the anchor index stays meaningful.
                let at =
                    at.unwrap_or_else(|| usize::from(list.first().is_some_and(|r| r["rule_id"] == ".m.rule.master")));
                list.insert(at, new);
                if let Some(old) = list.iter().enumerate().position(|(j, r)| j != at && r["rule_id"] == rule_id) {
                    list.remove(old);
                }
            }
        }
        Ok(())
    })
    .await?;
    Ok(axum::Json(json!({})))
}

pub async fn delete_rule(
    State(s): State<AppState>,
    auth: Auth,
    Path((scope, kind, rule_id)): Path<(String, String, String)>,
) -> Result<impl IntoResponse> {
    check_scope(&scope)?;
    check_kind(&kind)?;
    if rule_id.starts_with('.') {
        return Err(Error::invalid_param("server-default rules cannot be deleted (disable them instead)"));
    }
    modify(&s, auth.user_id.as_str(), &kind, move |list| {
        let i =
            list.iter().position(|r| r["rule_id"] == rule_id).ok_or_else(|| Error::not_found("push rule not found"))?;
        list.remove(i);
        Ok(())
    })
    .await?;
    Ok(axum::Json(json!({})))
}

fn check_attr(attr: &str) -> Result<()> {
    if attr != "enabled" && attr != "actions" {
        return Err(Error::invalid_param(format!("unknown push rule attribute `{attr}`")));
    }
    Ok(())
}

pub async fn get_attr(
    State(s): State<AppState>,
    auth: Auth,
    Path((scope, kind, rule_id, attr)): Path<(String, String, String, String)>,
) -> Result<impl IntoResponse> {
    check_scope(&scope)?;
    check_kind(&kind)?;
    check_attr(&attr)?;
    let rules = load(&s, auth.user_id.as_str()).await?;
    let rule = find(&rules, &kind, &rule_id)?;
    Ok(axum::Json(json!({ &attr: rule[&attr] })))
}

pub async fn put_attr(
    State(s): State<AppState>,
    auth: Auth,
    Path((scope, kind, rule_id, attr)): Path<(String, String, String, String)>,
    Json(body): Json<Value>,
) -> Result<impl IntoResponse> {
    check_scope(&scope)?;
    check_kind(&kind)?;
    check_attr(&attr)?;
    let value = body.get(&attr).cloned().unwrap_or(Value::Null);
    let ok = if attr == "enabled" { value.is_boolean() } else { valid_actions(&value) };
    if !ok {
        return Err(Error::bad_json(format!("invalid `{attr}`")));
    }
    modify(&s, auth.user_id.as_str(), &kind, move |list| {
        let rule =
            list.iter_mut().find(|r| r["rule_id"] == rule_id).ok_or_else(|| Error::not_found("push rule not found"))?;
        rule[&attr] = value;
        Ok(())
    })
    .await?;
    Ok(axum::Json(json!({})))
}
