//! Small helpers used by every layer: random strings, URL percent-decoding.

/// `n` random alphanumeric characters (ids, tokens, temporary file names).
pub fn random_string(n: usize) -> String {
    use rand::Rng;
    rand::thread_rng().sample_iter(rand::distributions::Alphanumeric).take(n).map(char::from).collect()
}

/// Decodes `%XX` escapes and `+` (a query string's space); invalid escapes stay as they are.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A user id a client named (an invitee, a to-device recipient, a profile or key lookup): the spec's grammar
/// ("User Identifiers", historical ids included: a non-empty localpart of printable ASCII other than `:`, a valid
/// server name, 255 bytes in all), else 400 `M_INVALID_PARAM`. ruma alone accepts far more (any character but `:`
/// and NUL), which let ids like `@:` or `@x y:server` through to the outbox as destinations.
pub fn parse_user_id(s: &str) -> crate::error::Result<ruma::OwnedUserId> {
    let bad = |why: &str| crate::error::Error::invalid_param(format!("invalid user id {s:?}: {why}"));
    if s.len() > 255 {
        return Err(bad("longer than 255 bytes"));
    }
    let id = ruma::UserId::parse(s).map_err(|e| bad(&e.to_string()))?;
    let localpart = id.localpart();
    if localpart.is_empty() || !localpart.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(bad("the localpart must be printable ASCII"));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_follow_the_spec_grammar_historical_ids_included() {
        for ok in ["@alice:example.org", "@a.b_c=d-e/f+g:example.org:8448", "@Upper!Case:[::1]", "@x:1.2.3.4"] {
            assert!(parse_user_id(ok).is_ok(), "{ok}");
        }
        let long = format!("@{}:example.org", "a".repeat(250));
        for bad in [
            "",
            "@",
            "@:",
            "@alice",
            "alice:example.org",
            "@:example.org",
            "@a b:example.org",
            "@é:x.org",
            "@a:",
            "@a:bad_server!",
            &long,
        ] {
            let e = parse_user_id(bad).expect_err(bad);
            assert_eq!(e.errcode(), "M_INVALID_PARAM", "{bad}");
        }
    }
}
