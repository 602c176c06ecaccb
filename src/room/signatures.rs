//! Checking a received PDU's signatures and content hash (the spec's checks on receipt of a PDU, steps 2 and 3) the
//! way ruma's `verify_event` does, with each server key decoded once instead of once per event.
//!
//! ruma takes public keys as bytes and turns them into curve points (a decompression: a field inversion and a square
//! root) for every signature it checks. A resync checks 160k events signed by a few thousand keys, and that
//! decompression was a tenth of the signature checks' CPU (`bench/PROFILE.md`, round 8). The rules stay ruma's:
//! its list of servers that must sign, its redacting serializer for the signed bytes, its `content_hash`, and the
//! same `ed25519_dalek::VerifyingKey::verify` call; `tests` checks the outcome against ruma's `verify_event` for
//! valid and damaged events alike.

use std::collections::HashMap;
use std::sync::Mutex;

use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use ruma::canonical_json::{CanonicalJsonObject, CanonicalJsonValue, RedactingSerializer};
use ruma::room_version_rules::RoomVersionRules;
use ruma::serde::{base64::Standard, Base64};
use ruma::signatures::{PublicKeyMap, Verified};
use ruma::{AnyKeyName, SigningKeyAlgorithm, SigningKeyId};

/// The fields left out of the bytes a server signs (ruma's, and the spec's).
const NOT_SIGNED: &[&str] = &["signatures", "unsigned"];

/// Keys decoded to curve points, by their bytes. An entry never goes stale (the same bytes always decode to the
/// same point), so it is kept across batches and resyncs; the map is emptied when full.
#[derive(Default)]
pub struct DecodedKeys(Mutex<HashMap<[u8; 32], VerifyingKey>>);

/// Room for every server of a very large room's state (Matrix HQ's comes from about 10k servers); 2 MB at most.
const MAX_DECODED: usize = 10_000;

impl DecodedKeys {
    fn decoded(&self, bytes: &[u8]) -> Result<VerifyingKey, String> {
        let bytes: [u8; 32] =
            bytes.try_into().map_err(|_| format!("invalid ed25519 public key: {} bytes, not 32", bytes.len()))?;
        if let Some(key) = self.lock().get(&bytes) {
            return Ok(*key);
        }
        let key = VerifyingKey::from_bytes(&bytes).map_err(|e| format!("invalid ed25519 public key: {e}"))?;
        let mut map = self.lock();
        if map.len() >= MAX_DECODED {
            map.clear();
        }
        map.insert(bytes, key);
        Ok(key)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], VerifyingKey>> {
        // A panic while holding the lock leaves a map that is still correct (entries are inserted whole).
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The bytes a PDU's servers sign: the event redacted by its room version's rules, without `signatures` and
/// `unsigned`, as canonical JSON. The same bytes are what its reference hash (the event id, room v3+) covers.
pub fn signed_bytes(object: &CanonicalJsonObject, rules: &RoomVersionRules) -> Result<String, String> {
    RedactingSerializer::new()
        .rules(&rules.redaction)
        .custom_redacted_root_fields(NOT_SIGNED)
        .serialize(object)
        .map_err(|e| e.to_string())
}

/// Checks the signatures of every server that must have signed `object` and its content hash. `Ok(Signatures)`:
/// the signatures hold but the content does not match its hash (the spec keeps such an event, redacted).
/// `signed`: the event's [`signed_bytes`] when already made (computing its event id made them), else made here.
pub fn verify_event(
    keys: &PublicKeyMap,
    decoded: &DecodedKeys,
    object: &CanonicalJsonObject,
    rules: &RoomVersionRules,
    signed: Option<&str>,
) -> Result<Verified, String> {
    let hash = match object.get("hashes") {
        Some(CanonicalJsonValue::Object(hashes)) => match hashes.get("sha256") {
            Some(CanonicalJsonValue::String(h)) => h,
            _ => return Err("hashes.sha256 is missing or not a string".into()),
        },
        _ => return Err("hashes is missing or not an object".into()),
    };
    let Some(CanonicalJsonValue::Object(signatures)) = object.get("signatures") else {
        return Err("signatures is missing or not an object".into());
    };
    let servers = ruma::signatures::required_server_signatures_to_verify_event(object, &rules.signatures)
        .map_err(|e| e.to_string())?;
    let made;
    let signed = match signed {
        Some(s) => s,
        None => {
            made = signed_bytes(object, rules)?;
            &made
        }
    };
    for server in &servers {
        check_server(server.as_str(), keys, decoded, signatures, signed.as_bytes())?;
    }
    let computed = ruma::signatures::content_hash(object).map_err(|e| e.to_string())?;
    let matches = Base64::<Standard>::parse(hash).is_ok_and(|h| h.as_bytes() == computed.as_bytes());
    Ok(if matches { Verified::All } else { Verified::Signatures })
}

/// `server`'s signatures on `signed`: each by a key we hold must be valid, and at least one must be by such a key.
/// Signatures by keys we do not hold, or of algorithms other than ed25519, are skipped (as ruma does).
fn check_server(
    server: &str,
    keys: &PublicKeyMap,
    decoded: &DecodedKeys,
    signatures: &CanonicalJsonObject,
    signed: &[u8],
) -> Result<(), String> {
    let set = match signatures.get(server) {
        Some(CanonicalJsonValue::Object(set)) => set,
        Some(_) => return Err(format!("signatures.{server} is not an object")),
        None => return Err(format!("no signatures from {server}")),
    };
    let held = keys.get(server).ok_or_else(|| format!("no public keys for {server}"))?;
    let mut checked = false;
    for (key_id, signature) in set {
        let Some(public_key) = held.get(key_id) else { continue };
        let Ok(parsed) = <&SigningKeyId<AnyKeyName>>::try_from(key_id.as_str()) else { continue };
        if parsed.algorithm() != SigningKeyAlgorithm::Ed25519 {
            continue;
        }
        let CanonicalJsonValue::String(signature) = signature else {
            return Err(format!("signatures.{server}.{key_id} is not a string"));
        };
        let signature = Base64::<Standard>::parse(signature)
            .map_err(|e| format!("signatures.{server}.{key_id} is not base64: {e}"))?;
        let signature: &[u8; 64] = signature
            .as_bytes()
            .try_into()
            .map_err(|_| format!("signatures.{server}.{key_id}: {} bytes, not 64", signature.as_bytes().len()))?;
        decoded
            .decoded(public_key.as_bytes())?
            .verify(signed, &Signature::from_bytes(signature))
            .map_err(|e| format!("{server}'s signature {key_id} does not match: {e}"))?;
        checked = true;
    }
    if checked {
        Ok(())
    } else {
        Err(format!("no signature from {server} by a key we hold"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::room::{version, Identity};
    use ruma::signatures::PublicKeySet;
    use serde_json::json;

    fn identity(name: &str) -> Identity {
        Identity::from_key(name, &Identity::new_signing_key()).unwrap()
    }

    fn keys_of(ids: &[&Identity]) -> PublicKeyMap {
        let mut map = PublicKeyMap::new();
        for id in ids {
            let mut set = PublicKeySet::new();
            set.insert(id.key_id.clone(), Base64::parse(&id.public_key_b64).unwrap());
            map.insert(id.server_name.to_string(), set);
        }
        map
    }

    /// A member event of `sender` signed by `by`, as a server would send it.
    fn signed_member(by: &Identity, sender: &str, rules: &RoomVersionRules) -> CanonicalJsonObject {
        let v = json!({
            "room_id": "!r:a.example", "type": "m.room.member", "state_key": sender, "sender": sender,
            "content": {"membership": "join", "displayname": "Someone"}, "origin_server_ts": 1, "depth": 3,
            "auth_events": [], "prev_events": [],
        });
        let CanonicalJsonValue::Object(mut obj) = CanonicalJsonValue::try_from(v).unwrap() else { unreachable!() };
        ruma::signatures::hash_and_sign_event(by.server_name.as_str(), &by.keypair, &mut obj, &rules.redaction)
            .unwrap();
        obj
    }

    /// a.example's signatures of a signed event, to damage.
    fn signatures_by_a(o: &mut CanonicalJsonObject) -> &mut CanonicalJsonObject {
        let Some(CanonicalJsonValue::Object(s)) = o.get_mut("signatures") else { unreachable!() };
        let Some(CanonicalJsonValue::Object(set)) = s.get_mut("a.example") else { unreachable!() };
        set
    }

    /// The outcome as a comparable value: which `Verified`, or that it failed (error texts differ from ruma's).
    fn outcome(r: Result<Verified, impl std::fmt::Display>) -> Option<Verified> {
        r.ok()
    }

    #[test]
    fn agrees_with_ruma_on_valid_and_damaged_events() {
        let rules = version::rules("10").unwrap();
        let a = identity("a.example");
        let b = identity("b.example");
        let keys = keys_of(&[&a, &b]);
        let decoded = DecodedKeys::default();
        let good = signed_member(&a, "@u:a.example", &rules);

        type Damage = fn(&mut CanonicalJsonObject);
        let cases: Vec<(&str, Damage, Option<Verified>)> = vec![
            ("untouched", |_| {}, Some(Verified::All)),
            (
                "unsigned content changed: the hash fails, the signature holds",
                |o| {
                    let Some(CanonicalJsonValue::Object(c)) = o.get_mut("content") else { unreachable!() };
                    c.insert("displayname".into(), CanonicalJsonValue::String("Changed".into()));
                },
                Some(Verified::Signatures),
            ),
            (
                "a signed field changed",
                |o| drop(o.insert("depth".into(), CanonicalJsonValue::Integer(4u32.into()))),
                None,
            ),
            (
                "signature replaced by another of the right length",
                |o| {
                    let set = signatures_by_a(o);
                    for v in set.values_mut() {
                        *v = CanonicalJsonValue::String(Base64::<Standard>::new(vec![7u8; 64]).encode());
                    }
                },
                None,
            ),
            (
                "signature not base64",
                |o| {
                    let set = signatures_by_a(o);
                    for v in set.values_mut() {
                        *v = CanonicalJsonValue::String("!!!".into());
                    }
                },
                None,
            ),
            ("no signatures at all", |o| drop(o.remove("signatures")), None),
            ("no hashes", |o| drop(o.remove("hashes")), None),
            (
                "signed only by a key we do not hold",
                |o| {
                    let set = signatures_by_a(o);
                    let sig = set.values().next().unwrap().clone();
                    set.clear();
                    set.insert("ed25519:unknown".into(), sig);
                },
                None,
            ),
            (
                "an extra signature by an algorithm we do not know is skipped",
                |o| {
                    let set = signatures_by_a(o);
                    set.insert("curve9:x".into(), CanonicalJsonValue::String("AAAA".into()));
                },
                Some(Verified::All),
            ),
            (
                "sent by a user of a server whose signature is missing",
                |o| drop(o.insert("sender".into(), CanonicalJsonValue::String("@u:c.example".into()))),
                None,
            ),
        ];
        for (name, damage, expected) in cases {
            let mut event = good.clone();
            damage(&mut event);
            let ours = outcome(verify_event(&keys, &decoded, &event, &rules, None));
            let ruma = outcome(ruma::signatures::verify_event(&keys, &event, &rules));
            assert_eq!(ours, ruma, "{name}: ours and ruma's differ");
            // The bytes handed over by the event id's computation give the same outcome.
            let (_, signed) = version::event_id_keeping_signed(&event, &rules).unwrap();
            let given = outcome(verify_event(&keys, &decoded, &event, &rules, signed.as_deref()));
            assert_eq!(given, ours, "{name}: the signed bytes given and made differ");
            assert_eq!(ours, expected, "{name}");
        }
    }

    #[test]
    fn a_key_is_decoded_once_and_a_bad_key_fails_the_check() {
        let rules = version::rules("11").unwrap();
        let a = identity("a.example");
        let mut keys = keys_of(&[&a]);
        let decoded = DecodedKeys::default();
        for _ in 0..3 {
            let event = signed_member(&a, "@u:a.example", &rules);
            assert!(matches!(verify_event(&keys, &decoded, &event, &rules, None), Ok(Verified::All)));
        }
        assert_eq!(decoded.lock().len(), 1);

        // A key that is not a curve point (or not 32 bytes) fails the event, as in ruma.
        let set = keys.get_mut("a.example").unwrap();
        set.insert(a.key_id.clone(), Base64::new(vec![1u8; 31]));
        let event = signed_member(&a, "@u:a.example", &rules);
        assert!(verify_event(&keys, &decoded, &event, &rules, None).is_err());
        assert!(ruma::signatures::verify_event(&keys, &event, &rules).is_err());
    }
}
