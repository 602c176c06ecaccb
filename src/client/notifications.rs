//! Push rule evaluation (used by the push evaluator, `client::push`), notification counts for `/sync`
//! (`unread_notifications`) as that evaluator recorded them, and the ignored-users list.
//!
//! The evaluator covers the conditions of the default rules: `event_match` (with globs;
//! `content.body` by whole words), `event_property_is`, `event_property_contains`, `contains_display_name`,
//! `room_member_count` and `sender_notification_permission`; unknown conditions never match.

use std::collections::HashSet;

use serde_json::{json, Value};

use crate::error::Result;
use crate::store::rooms::RoomRow;
use crate::store::unread::{self, MAIN};
use crate::store::{account_data, events, members, relations, state_groups, Db};

/// Users `user_id` ignores (`m.ignored_user_list`).
pub fn ignored_users(c: Db<'_>, user_id: &str) -> Result<HashSet<String>> {
    let list = account_data::get(c, user_id, "", "m.ignored_user_list")?;
    Ok(list
        .and_then(|v| v.get("ignored_users").and_then(Value::as_object).map(|m| m.keys().cloned().collect()))
        .unwrap_or_default())
}

/// What the rules decided for one event.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub notify: bool,
    pub highlight: bool,
}

/// Facts about the room and the user the conditions need.
pub struct Context {
    pub user_id: String,
    pub display_name: Option<String>,
    pub member_count: i64,
    pub power_levels: Value,
    pub creator: String,
}

impl Context {
    fn power_of(&self, user: &str) -> i64 {
        if self.power_levels.is_null() {
            return if user == self.creator { 100 } else { 0 };
        }
        if user == self.creator && self.power_levels["users"].get(user).is_none() {
            return i64::MAX; // room version 12: creators are above every power level
        }
        int(&self.power_levels["users"][user]).or_else(|| int(&self.power_levels["users_default"])).unwrap_or(0)
    }
}

fn int(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
}

fn to_json(n: unread::Counts) -> Value {
    json!({"notification_count": n.notifications, "highlight_count": n.highlights})
}

/// The thread an event belongs to: the root of its `m.thread` relation, or, for an event relating to a thread's
/// event in another way (an edit or reaction in a thread), that event's thread; [`unread::MAIN`] otherwise.
pub fn thread_of(c: Db<'_>, event: &Value) -> Result<String> {
    let Some((parent, rel_type, _)) = event.get("content").and_then(relations::relation_of) else {
        return Ok(MAIN.into());
    };
    if rel_type == "m.thread" {
        return Ok(parent.to_owned());
    }
    Ok(match relations::relation_by_id(c, parent)? {
        Some((root, t)) if t == "m.thread" => root,
        _ => MAIN.into(),
    })
}

/// The counts for `room`: `unread_notifications` (`{"notification_count": n, "highlight_count": h}`) and, when
/// `by_thread`, `unread_thread_notifications` (thread root -> counts, threads with something unread only; None
/// when there is none). The counts are those the push evaluator recorded (`client::push`, table
/// `unread_notifications`) and read receipts have not read: without `by_thread` the first value sums every
/// thread, with it only the main timeline.
pub fn unread_counts(c: Db<'_>, room: &RoomRow, user_id: &str, by_thread: bool) -> Result<(Value, Option<Value>)> {
    let threads = unread::counts(c, user_id, room.room_nid)?;
    if !by_thread {
        let total = threads.iter().fold(unread::Counts::default(), |a, (_, b)| unread::Counts {
            notifications: a.notifications + b.notifications,
            highlights: a.highlights + b.highlights,
        });
        return Ok((to_json(total), None));
    }
    let main = threads.iter().find(|(t, _)| t == MAIN).map(|(_, n)| *n).unwrap_or_default();
    let per_thread: serde_json::Map<String, Value> =
        threads.into_iter().filter(|(t, _)| t != MAIN).map(|(t, n)| (t, to_json(n))).collect();
    Ok((to_json(main), (!per_thread.is_empty()).then_some(Value::Object(per_thread))))
}

/// The facts the conditions need about `room` for `user_id`, from the room's current state.
pub fn context(c: Db<'_>, room: &RoomRow, user_id: &str) -> Result<Context> {
    let (joined, _) = members::member_counts(c, room.room_nid)?;
    let display_name = members::displayname(c, room.room_nid, user_id)?;
    let state_content = |event_type: &str| -> Result<Option<Value>> {
        let (Some(sg), Some(skn)) = (room.current_sg, state_groups::find_state_key_nid(c, event_type, "")?) else {
            return Ok(None);
        };
        let Some(nid) = state_groups::lookup_state(c, sg, skn)? else { return Ok(None) };
        let Some(row) = events::event_by_nid(c, nid)? else { return Ok(None) };
        Ok(serde_json::from_str::<Value>(&row.json).ok())
    };
    let power_levels = state_content("m.room.power_levels")?.map(|e| e["content"].clone()).unwrap_or(Value::Null);
    let creator =
        state_content("m.room.create")?.and_then(|e| e["sender"].as_str().map(str::to_owned)).unwrap_or_default();
    Ok(Context { user_id: user_id.to_owned(), display_name, member_count: joined, power_levels, creator })
}

/// Runs `event` through the effective rule set (override, content, room, sender, underride; first match wins).
pub fn evaluate(rules: &Value, event: &Value, room_id: &str, ctx: &Context) -> Outcome {
    matched_actions(rules, event, room_id, ctx).map(actions).unwrap_or_default()
}

/// The actions of the first rule matching `event`, if any.
pub fn matched_actions<'a>(rules: &'a Value, event: &Value, room_id: &str, ctx: &Context) -> Option<&'a Value> {
    let sender = event["sender"].as_str().unwrap_or("");
    for kind in ["override", "content", "room", "sender", "underride"] {
        for rule in rules["global"][kind].as_array().into_iter().flatten() {
            if rule["enabled"] == json!(false) {
                continue;
            }
            let id = rule["rule_id"].as_str().unwrap_or("");
            let matched = match kind {
                "content" => rule["pattern"]
                    .as_str()
                    .is_some_and(|p| event["content"]["body"].as_str().is_some_and(|b| word_glob(p, b))),
                "room" => id == room_id,
                "sender" => id == sender,
                _ => rule["conditions"].as_array().is_none_or(|conds| conds.iter().all(|c| condition(c, event, ctx))),
            };
            if matched {
                return Some(&rule["actions"]);
            }
        }
    }
    None
}

/// The `sound` tweak among `actions`, if set.
pub fn sound(actions: &Value) -> Option<String> {
    actions.as_array()?.iter().find(|x| x["set_tweak"] == "sound").and_then(|x| x["value"].as_str()).map(str::to_owned)
}

/// Notify and highlight, as `actions` say.
pub fn actions(a: &Value) -> Outcome {
    let mut o = Outcome::default();
    for x in a.as_array().into_iter().flatten() {
        if x == "notify" {
            o.notify = true;
        } else if x["set_tweak"] == "highlight" {
            o.highlight = x.get("value").is_none_or(|v| v == &json!(true));
        }
    }
    o
}

/// The value at a dotted key (`content.m\.relates_to.rel_type`: `\.` is a literal dot, `\\` a backslash).
fn property<'a>(event: &'a Value, key: &str) -> Option<&'a Value> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = key.chars();
    while let Some(ch) = chars.next() {
        match ch {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            '.' => parts.push(std::mem::take(&mut cur)),
            _ => cur.push(ch),
        }
    }
    parts.push(cur);
    parts.iter().try_fold(event, |v, p| v.get(p.as_str()))
}

fn condition(c: &Value, event: &Value, ctx: &Context) -> bool {
    match c["kind"].as_str().unwrap_or("") {
        "event_match" => {
            let (Some(key), Some(pattern)) = (c["key"].as_str(), c["pattern"].as_str()) else { return false };
            match property(event, key).and_then(Value::as_str) {
                Some(v) if key == "content.body" => word_glob(pattern, v),
                Some(v) => glob(&pattern.to_lowercase(), &v.to_lowercase()),
                None => false,
            }
        }
        "event_property_is" => c["key"].as_str().and_then(|k| property(event, k)).is_some_and(|v| v == &c["value"]),
        "event_property_contains" => c["key"]
            .as_str()
            .and_then(|k| property(event, k))
            .and_then(Value::as_array)
            .is_some_and(|a| a.contains(&c["value"])),
        "contains_display_name" => match (&ctx.display_name, event["content"]["body"].as_str()) {
            (Some(name), Some(body)) if !name.is_empty() => contains_word(&body.to_lowercase(), &name.to_lowercase()),
            _ => false,
        },
        "room_member_count" => member_count_matches(c["is"].as_str().unwrap_or(""), ctx.member_count),
        "sender_notification_permission" => {
            let key = c["key"].as_str().unwrap_or("room");
            let needed = int(&ctx.power_levels["notifications"][key]).unwrap_or(50);
            ctx.power_of(event["sender"].as_str().unwrap_or("")) >= needed
        }
        _ => false,
    }
}

fn member_count_matches(is: &str, count: i64) -> bool {
    let (op, n) = match is.find(|ch: char| ch.is_ascii_digit()) {
        Some(i) => is.split_at(i),
        None => return false,
    };
    let Ok(n) = n.parse::<i64>() else { return false };
    match op {
        "" | "==" => count == n,
        "<" => count < n,
        ">" => count > n,
        "<=" => count <= n,
        ">=" => count >= n,
        _ => false,
    }
}

/// Case-sensitive glob (`*` any run, `?` one character) over the whole value.
fn glob(pattern: &str, value: &str) -> bool {
    let (p, v): (Vec<char>, Vec<char>) = (pattern.chars().collect(), value.chars().collect());
    let (mut pi, mut vi, mut star, mut mark) = (0, 0, None, 0);
    while vi < v.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == v[vi]) {
            pi += 1;
            vi += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = vi;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            vi = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|ch| *ch == '*')
}

/// Case-insensitive glob match of `pattern` against some run of whole words of `body`.
fn word_glob(pattern: &str, body: &str) -> bool {
    let (pattern, body) = (pattern.to_lowercase(), body.to_lowercase());
    if !pattern.contains(['*', '?']) {
        return contains_word(&body, &pattern);
    }
    let chars: Vec<(usize, char)> = body.char_indices().collect();
    let is_word = |ch: char| ch.is_alphanumeric() || ch == '_';
    for (i, &(start, ch)) in chars.iter().enumerate() {
        if i > 0 && is_word(chars[i - 1].1) && is_word(ch) {
            continue; // not at a word start
        }
        for j in i..chars.len() {
            let end = chars.get(j + 1).map(|x| x.0).unwrap_or(body.len());
            let at_word_end = chars.get(j + 1).is_none_or(|x| !(is_word(x.1) && is_word(chars[j].1)));
            if at_word_end && glob(&pattern, &body[start..end]) {
                return true;
            }
        }
    }
    false
}

/// `needle` occurs in `hay` not inside a longer word.
fn contains_word(hay: &str, needle: &str) -> bool {
    let word_char = |c: char| c.is_alphanumeric() || c == '_';
    let is_word = |ch: Option<char>| ch.is_some_and(word_char);
    hay.match_indices(needle).any(|(i, _)| {
        let before = hay[..i].chars().next_back();
        let after = hay[i + needle.len()..].chars().next();
        let glued_before = is_word(before) && needle.starts_with(word_char);
        let glued_after = is_word(after) && needle.ends_with(word_char);
        !glued_before && !glued_after
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::push_rules;

    fn ctx(members: i64) -> Context {
        Context {
            user_id: "@alice:hs".into(),
            display_name: Some("Alice L".into()),
            member_count: members,
            power_levels: json!({"users": {"@mod:hs": 50}, "users_default": 0}),
            creator: "@creator:hs".into(),
        }
    }

    fn msg(sender: &str, body: &str) -> Value {
        json!({"type": "m.room.message", "sender": sender, "content": {"msgtype": "m.text", "body": body}})
    }

    #[test]
    fn default_rules() {
        let rules = push_rules::default_ruleset("@alice:hs");
        let eval = |e: &Value, n: i64| evaluate(&rules, e, "!r:hs", &ctx(n));
        let yes = Outcome { notify: true, highlight: false };
        let hl = Outcome { notify: true, highlight: true };
        assert_eq!(eval(&msg("@bob:hs", "hello"), 3), yes);
        assert_eq!(eval(&msg("@bob:hs", "hello"), 2), yes, "one-to-one");
        assert_eq!(eval(&msg("@bob:hs", "hi alice, look"), 3), hl, "user name");
        assert_eq!(eval(&msg("@bob:hs", "hi Alice L!"), 3), hl, "display name");
        assert_eq!(eval(&msg("@bob:hs", "malice aforethought"), 3), yes, "not a whole word");
        let mention = json!({"type": "m.room.message", "sender": "@bob:hs", "content": {"body": "x", "m.mentions": {"user_ids": ["@alice:hs"]}}});
        assert_eq!(eval(&mention, 3), hl);
        assert_eq!(eval(&msg("@bob:hs", "@room wake up"), 3), yes, "@room needs notification power");
        assert_eq!(eval(&msg("@mod:hs", "@room wake up"), 3), hl);
        assert_eq!(eval(&msg("@creator:hs", "@room wake up"), 3), hl);
        let notice =
            json!({"type": "m.room.message", "sender": "@bob:hs", "content": {"msgtype": "m.notice", "body": "bot"}});
        assert_eq!(eval(&notice, 3), Outcome::default());
        assert_eq!(
            eval(
                &json!({"type": "m.room.member", "sender": "@bob:hs", "state_key": "@bob:hs", "content": {"membership": "join"}}),
                3
            ),
            Outcome::default()
        );
        let edit = json!({"type": "m.room.message", "sender": "@bob:hs", "content": {"body": "* x", "m.relates_to": {"rel_type": "m.replace"}}});
        assert_eq!(eval(&edit, 3), Outcome::default());
        assert_eq!(eval(&json!({"type": "m.room.encrypted", "sender": "@bob:hs", "content": {}}), 3), yes);
        assert_eq!(eval(&json!({"type": "m.reaction", "sender": "@bob:hs", "content": {}}), 3), Outcome::default());
    }

    #[test]
    fn globs_and_counts() {
        assert!(glob("m.room.*", "m.room.message"));
        assert!(glob("a?c", "abc"));
        assert!(!glob("a?c", "abbc"));
        assert!(word_glob("cake*", "I like cakes a lot"));
        assert!(!word_glob("cake", "cakes"));
        assert!(member_count_matches("2", 2) && member_count_matches("==2", 2) && member_count_matches(">=3", 5));
        assert!(!member_count_matches("<2", 2) && !member_count_matches("x", 2));
        assert_eq!(
            property(&json!({"content": {"m.relates_to": {"a": 1}}}), "content.m\\.relates_to.a"),
            Some(&json!(1))
        );
    }
}
