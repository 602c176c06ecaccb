//! `m.room.server_acl`: which servers may take part in a room.

use serde_json::Value;

use crate::error::Result;
use crate::store::ids::StateGroup;
use crate::store::Db;

fn glob(pattern: &str, s: &str) -> bool {
    // `*` any run, `?` one char; case-insensitive like server names.
    let (p, s): (Vec<char>, Vec<char>) = (pattern.to_lowercase().chars().collect(), s.to_lowercase().chars().collect());
    let (mut pi, mut si, mut star, mut mark) = (0, 0, None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// Whether the ACL content allows `server` (`host[:port]`; the port is ignored as the spec says).
pub fn allows(acl: &Value, server: &str) -> bool {
    let host = if server.starts_with('[') {
        server.split_once(']').map(|(h, _)| &h[1..]).unwrap_or(server)
    } else if server.matches(':').count() == 1 {
        server.split_once(':').map(|x| x.0).unwrap_or(server)
    } else {
        server
    };
    let list = |k: &str| -> Vec<String> {
        acl.get(k)
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
            .unwrap_or_default()
    };
    let is_ip = host.parse::<std::net::IpAddr>().is_ok();
    if is_ip && acl.get("allow_ip_literals").and_then(Value::as_bool) == Some(false) {
        return false;
    }
    if list("deny").iter().any(|p| glob(p, host)) {
        return false;
    }
    list("allow").iter().any(|p| glob(p, host))
}

/// Checks a room's current ACL; rooms without one allow everyone.
pub fn room_allows(conn: Db<'_>, sg: Option<StateGroup>, server: &str) -> Result<bool> {
    let Some(sg) = sg else { return Ok(true) };
    match crate::room::state_content(conn, sg, "m.room.server_acl", "")? {
        Some(acl) => Ok(allows(&acl, server)),
        None => Ok(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn acl_globs() {
        let acl = json!({"allow": ["*"], "deny": ["evil.org", "*.evil.org"], "allow_ip_literals": false});
        assert!(allows(&acl, "good.org"));
        assert!(allows(&acl, "good.org:8448"));
        assert!(!allows(&acl, "evil.org"));
        assert!(!allows(&acl, "a.evil.org:443"));
        assert!(!allows(&acl, "127.0.0.1:8448"));
        assert!(!allows(&json!({}), "good.org"));
    }
}
