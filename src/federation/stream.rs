//! Streaming reads of big federation answers (`/state`, `/send_join`): the PDU arrays are handed out in
//! batches while parsing, so a 100k-event answer never sits in memory as one JSON value.

use std::io::Read;

use serde::de::{DeserializeOwned, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// Most JSON text in one batch: a batch is cut at [`for_each_pdu_batch`]'s count or at this many bytes, whichever
/// comes first, so the memory a batch holds does not depend on how big the resident's events are (200 events of
/// the 64 KiB maximum would be 13 MB).
pub const BATCH_BYTES: usize = 2 << 20;

/// What an element weighs towards [`BATCH_BYTES`].
pub trait Weigh {
    fn weight(&self) -> usize;
}

impl Weigh for Box<serde_json::value::RawValue> {
    fn weight(&self) -> usize {
        self.get().len()
    }
}

impl Weigh for serde_json::Value {
    /// A tree's text length is not known without serialising it: counted by elements only.
    fn weight(&self) -> usize {
        0
    }
}

/// Calls `sink` with batches of at most `batch` elements (and about [`BATCH_BYTES`] of text) of the arrays under
/// `keys` of a top-level object, each read as a `T` (`Box<RawValue>` keeps an element's text for a parser that
/// wants it, with no JSON tree built).
pub fn for_each_pdu_batch<R: Read, T: DeserializeOwned + Weigh>(
    reader: R,
    keys: &[&str],
    batch: usize,
    sink: &mut dyn FnMut(Vec<T>) -> bool,
) -> Result<(), String> {
    let mut de = serde_json::Deserializer::from_reader(reader);
    let mut buf = Vec::with_capacity(batch);
    let top = Top { keys, batch, buf: &mut buf, bytes: 0, sink: &mut *sink, stop: false };
    top.deserialize(&mut de).map_err(|e| e.to_string())?;
    if !buf.is_empty() {
        sink(std::mem::take(&mut buf));
    }
    Ok(())
}

/// What a cheap first pass over a downloaded answer finds in the PDUs under its `keys`: the signing keys (server
/// -> key ids) they are signed with, fetched in one go before the batches are verified, and the state keys they
/// name, in order and once each, created before the events are stored (see [`ensure_state_keys`]).
///
/// [`ensure_state_keys`]: crate::store::state_groups::ensure_state_keys
#[derive(Debug, Default)]
pub struct FileScan {
    pub signing: std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
    pub state_keys: std::collections::BTreeSet<(String, String)>,
}

/// Most text of the state keys a [`FileScan`] gathers: the answer is not verified yet, so its size, not its count
/// of keys, bounds what the scan holds (100k typical keys are about 4 MB of text and 11 MB of memory; beyond,
/// keys are created as the events naming them are stored).
pub const MOST_SCANNED_STATE_KEY_BYTES: usize = 4 << 20;
/// A longer event type or state key is not gathered (the spec's limit for both; such an event is refused later).
const LONGEST_STATE_KEY_PART: usize = 255;

/// The [`FileScan`] of the PDUs under `keys` of a downloaded answer.
pub fn scan_file(file: &std::path::Path, keys: &[&str]) -> Result<FileScan, String> {
    use serde_json::Value;
    let reader = std::io::BufReader::new(std::fs::File::open(file).map_err(|e| e.to_string())?);
    let (mut scan, mut key_bytes) = (FileScan::default(), 0);
    for_each_pdu_batch(reader, keys, crate::federation::batches::PARSE_BATCH, &mut |batch: Vec<Signed>| {
        for signed in batch {
            for (server, keys) in signed.signatures {
                scan.signing.entry(server).or_default().extend(keys.into_keys());
            }
            if let (Some(Value::String(kind)), Some(Value::String(state_key))) = (signed.kind, signed.state_key) {
                let size = kind.len() + state_key.len();
                if kind.len().max(state_key.len()) <= LONGEST_STATE_KEY_PART
                    && key_bytes + size <= MOST_SCANNED_STATE_KEY_BYTES
                    && scan.state_keys.insert((kind, state_key))
                {
                    key_bytes += size;
                }
            }
        }
        true
    })?;
    Ok(scan)
}

/// The signatures, type and state key of a PDU, read straight from the stream (the rest of its text is skipped:
/// neither kept nor parsed into a tree).
#[derive(serde::Deserialize)]
struct Signed {
    #[serde(default)]
    signatures: std::collections::BTreeMap<String, std::collections::BTreeMap<String, IgnoredAny>>,
    /// Any JSON value: a malformed event is refused later, by its verification; the scan only gathers hints.
    #[serde(default, rename = "type")]
    kind: Option<serde_json::Value>,
    #[serde(default)]
    state_key: Option<serde_json::Value>,
}

impl Weigh for Signed {
    /// Holds no text: counted by elements only.
    fn weight(&self) -> usize {
        0
    }
}

struct Top<'a, T> {
    keys: &'a [&'a str],
    batch: usize,
    buf: &'a mut Vec<T>,
    /// The text weight of `buf`.
    bytes: usize,
    sink: &'a mut dyn FnMut(Vec<T>) -> bool,
    stop: bool,
}

impl<'de, T: DeserializeOwned + Weigh> DeserializeSeed<'de> for Top<'_, T> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, T: DeserializeOwned + Weigh> Visitor<'de> for Top<'_, T> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object")
    }
    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            if self.keys.contains(&key.as_str()) && !self.stop {
                map.next_value_seed(Elements { top: &mut self })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

struct Elements<'a, 'b, T> {
    top: &'a mut Top<'b, T>,
}

impl<'de, T: DeserializeOwned + Weigh> DeserializeSeed<'de> for Elements<'_, '_, T> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, T: DeserializeOwned + Weigh> Visitor<'de> for Elements<'_, '_, T> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an array of PDUs")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(v) = seq.next_element::<T>()? {
            if self.top.stop {
                continue;
            }
            self.top.bytes += v.weight();
            self.top.buf.push(v);
            if self.top.buf.len() >= self.top.batch || self.top.bytes >= BATCH_BYTES {
                self.top.bytes = 0;
                let full = std::mem::replace(self.top.buf, Vec::with_capacity(self.top.batch));
                if !(self.top.sink)(full) {
                    self.top.stop = true;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_both_arrays_and_skips_the_rest() {
        let doc = r#"{"origin":"x","pdus":[1,2,3,4,5],"other":{"a":[9]},"auth_chain":[6,7]}"#;
        let mut seen = Vec::new();
        for_each_pdu_batch(doc.as_bytes(), &["pdus", "auth_chain"], 2, &mut |b: Vec<serde_json::Value>| {
            seen.push(b.len());
            true
        })
        .unwrap();
        assert_eq!(seen, vec![2, 2, 2, 1]);
    }

    #[test]
    fn a_scan_gathers_signing_keys_and_state_keys_in_order() {
        let doc = r#"{"pdus":[
            {"type":"m.room.member","state_key":"@b:x","signatures":{"x":{"ed25519:1":"s"}}},
            {"type":"m.room.member","state_key":"@a:y","signatures":{"y":{"ed25519:2":"s"}}},
            {"type":"m.room.message","signatures":{"x":{"ed25519:3":"s"}}},
            {"type":{"odd":1},"state_key":"@c:x"},
            {"type":"m.room.member","state_key":"@LONG:x"},
            {"type":"m.room.member","state_key":"@b:x"}],
          "auth_chain":[{"type":"m.room.create","state_key":""}]}"#;
        let doc = doc.replace("@LONG", &"l".repeat(300));
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), doc).unwrap();
        let scan = scan_file(file.path(), &["pdus", "auth_chain"]).unwrap();
        let keys: Vec<(&str, &str)> = scan.state_keys.iter().map(|(t, k)| (t.as_str(), k.as_str())).collect();
        assert_eq!(keys, [("m.room.create", ""), ("m.room.member", "@a:y"), ("m.room.member", "@b:x")]);
        assert_eq!(scan.signing["x"].iter().collect::<Vec<_>>(), ["ed25519:1", "ed25519:3"]);
        assert_eq!(scan.signing["y"].len(), 1);
    }

    #[test]
    fn big_elements_cut_a_batch_by_bytes() {
        let big = format!(r#"{{"b":"{}"}}"#, "x".repeat(BATCH_BYTES / 2));
        let doc = format!(r#"{{"pdus":[{big},{big},{big},{{"s":1}},{big}]}}"#);
        let mut seen = Vec::new();
        for_each_pdu_batch(doc.as_bytes(), &["pdus"], 200, &mut |b: Vec<Box<serde_json::value::RawValue>>| {
            seen.push(b.len());
            true
        })
        .unwrap();
        assert_eq!(seen, vec![2, 3]);
    }
}
