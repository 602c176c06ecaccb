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

/// The signing keys (server -> key ids) that the PDUs under `keys` of a downloaded answer are signed with: a cheap
/// first pass over the file, so the keys can be fetched in one go before the batches are verified.
pub fn keys_needed_by_file(
    file: &std::path::Path,
    keys: &[&str],
) -> Result<std::collections::BTreeMap<String, std::collections::BTreeSet<String>>, String> {
    let reader = std::io::BufReader::new(std::fs::File::open(file).map_err(|e| e.to_string())?);
    let mut need: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> = Default::default();
    for_each_pdu_batch(reader, keys, crate::federation::batches::PARSE_BATCH, &mut |batch: Vec<Signed>| {
        for signed in batch {
            for (server, keys) in signed.signatures {
                need.entry(server).or_default().extend(keys.into_keys());
            }
        }
        true
    })?;
    Ok(need)
}

/// Just the signatures of a PDU, read straight from the stream (the rest of its text is skipped: neither kept
/// nor parsed into a tree).
#[derive(serde::Deserialize)]
struct Signed {
    #[serde(default)]
    signatures: std::collections::BTreeMap<String, std::collections::BTreeMap<String, IgnoredAny>>,
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
