//! Canonical JSON objects read straight from text. ruma's `Deserialize` for `CanonicalJsonValue` reads a whole
//! `serde_json::Value` tree first and converts it node by node into a second tree; every PDU we receive or load
//! went through both (a 100k-member resync parses 160k received events and reads as many back to judge them, and
//! the first tree's allocations were a tenth of the allocator's time in its profile). This reads the text into the
//! canonical tree directly, with ruma's rules: integers within ±(2^53 - 1), no floats, the last of duplicate keys
//! kept (as a `serde_json::Map` keeps it).

use std::fmt;

use ruma::canonical_json::{CanonicalJsonObject, CanonicalJsonValue};
use ruma::Int;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// `text` as a canonical JSON object (what `serde_json::from_str::<CanonicalJsonObject>` accepts, and the same
/// tree).
pub fn object_from_str(text: &str) -> serde_json::Result<CanonicalJsonObject> {
    serde_json::from_str::<Object>(text).map(|o| o.0)
}

struct Value(CanonicalJsonValue);
struct Object(CanonicalJsonObject);

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ValueVisitor).map(Value)
    }
}

impl<'de> Deserialize<'de> for Object {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(ObjectVisitor).map(Object)
    }
}

struct ValueVisitor;
struct ObjectVisitor;

fn integer<E: de::Error>(n: i64) -> Result<CanonicalJsonValue, E> {
    Int::try_from(n)
        .map(CanonicalJsonValue::Integer)
        .map_err(|_| E::custom("integer is out of the range of a canonical JSON integer"))
}

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = CanonicalJsonValue;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a canonical JSON value")
    }

    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Self::Value, E> {
        Ok(CanonicalJsonValue::Bool(b))
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Self::Value, E> {
        integer(n)
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Self::Value, E> {
        integer(i64::try_from(n).map_err(|_| E::custom("integer is out of the range of a canonical JSON integer"))?)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Err(E::custom("canonical JSON has no floats"))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
        Ok(CanonicalJsonValue::String(s.to_owned()))
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<Self::Value, E> {
        Ok(CanonicalJsonValue::String(s))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(CanonicalJsonValue::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(CanonicalJsonValue::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(Value(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(CanonicalJsonValue::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        ObjectVisitor.visit_map(map).map(CanonicalJsonValue::Object)
    }
}

impl<'de> Visitor<'de> for ObjectVisitor {
    type Value = CanonicalJsonObject;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a canonical JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut object = CanonicalJsonObject::new();
        while let Some((key, Value(v))) = map.next_entry::<String, Value>()? {
            object.insert(key, v);
        }
        Ok(object)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same tree as ruma's two-step parse, and an error wherever it gives one.
    fn same_as_ruma(text: &str) {
        let ruma = serde_json::from_str::<CanonicalJsonObject>(text);
        let ours = object_from_str(text);
        match (&ruma, &ours) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{text}"),
            (Err(_), Err(_)) => {}
            _ => panic!("{text}: ruma {ruma:?}, ours {ours:?}"),
        }
    }

    #[test]
    fn reads_what_ruma_reads_and_refuses_what_it_refuses() {
        let cases = [
            r#"{"type":"m.room.member","state_key":"@a:x","content":{"membership":"join","displayname":"A \u00e9 \"q\""},"depth":12,"prev_events":["$a","$b"],"hashes":{"sha256":"abc"},"signatures":{"x":{"ed25519:1":"sig"}},"unsigned":{"age":5}}"#,
            r#"{"a":null,"b":true,"c":false,"d":[],"e":{},"f":[1,[2,[3]],{"g":-4}],"h":"\ud83d\ude00"}"#,
            r#"{"max":9007199254740991,"min":-9007199254740991}"#,
            r#"{"over":9007199254740992}"#,
            r#"{"under":-9007199254740992}"#,
            r#"{"big":18446744073709551615}"#,
            r#"{"huge":1000000000000000000000000}"#,
            r#"{"float":1.5}"#,
            r#"{"float":1.0}"#,
            r#"{"exp":1e3}"#,
            r#"{"negzero":-0}"#,
            r#"{"zero":0}"#,
            r#"{"dup":1,"dup":2}"#,
            r#"{"dup":{"a":1},"dup":[1]}"#,
            r#"[1,2]"#,
            r#""text""#,
            r#"null"#,
            r#"{"a":1} trailing"#,
            r#"{"a":1,}"#,
            r#"{"a":"unterminated}"#,
            r#"{"a":"bad escape \x"}"#,
            r#"{"nested":{"deeper":{"deepest":[{"k":"v"}]}}}"#,
            "{}",
            "",
            " { \"spaced\" : [ 1 , 2 ] } ",
        ];
        for case in cases {
            same_as_ruma(case);
        }
        let deep = format!("{}{}", "{\"a\":".repeat(200), "1".to_owned() + &"}".repeat(200));
        same_as_ruma(&deep);
    }
}
