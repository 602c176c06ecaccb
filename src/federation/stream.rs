//! Streaming reads of big federation answers (`/state`, `/send_join`): the PDU arrays are handed out in
//! batches while parsing, so a 100k-event answer never sits in memory as one JSON value.

use std::io::Read;

use serde::de::{DeserializeOwned, IgnoredAny};

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
/// wants it, with no JSON tree built). A `sink` answering false ends the read.
pub fn for_each_pdu_batch<R: Read, T: DeserializeOwned + Weigh>(
    reader: R,
    keys: &[&str],
    batch: usize,
    sink: &mut dyn FnMut(Vec<T>) -> bool,
) -> Result<(), String> {
    let mut buf = Vec::with_capacity(batch);
    let mut bytes = 0;
    let mut stopped = false;
    for_each_element(reader, keys, &mut |text| {
        let v: T = serde_json::from_slice(&text).map_err(|e| e.to_string())?;
        bytes += v.weight();
        buf.push(v);
        if buf.len() >= batch || bytes >= BATCH_BYTES {
            bytes = 0;
            if !sink(std::mem::replace(&mut buf, Vec::with_capacity(batch))) {
                stopped = true;
                return Ok(false);
            }
        }
        Ok(true)
    })?;
    if !buf.is_empty() && !stopped {
        sink(buf);
    }
    Ok(())
}

/// Hands `element` the text of each element of the arrays under `keys` of the top-level object `reader` holds, in
/// order, until it answers false. Only the document's structure is followed here (strings, brackets, commas): each
/// element's text is parsed by its consumer, and the values under other keys are skipped unparsed. serde_json's
/// reader did the same work a byte at a time with line and column counting, two passes over a 100 MB answer taking
/// a second of CPU (bench/PROFILE.md, round 11).
fn for_each_element<R: Read>(
    reader: R,
    keys: &[&str],
    element: &mut dyn FnMut(Vec<u8>) -> Result<bool, String>,
) -> Result<(), String> {
    let mut b = Bytes::new(reader);
    if b.next_token()? != b'{' {
        return Err("expected a JSON object".into());
    }
    if b.peek_token()? == b'}' {
        return Ok(());
    }
    loop {
        if b.next_token()? != b'"' {
            return Err("expected an object key".into());
        }
        let key = b.string_after_quote()?;
        if b.next_token()? != b':' {
            return Err("expected `:` after an object key".into());
        }
        if keys.contains(&key.as_str()) {
            if b.next_token()? != b'[' {
                return Err(format!("`{key}` is not an array of PDUs"));
            }
            if b.peek_token()? == b']' {
                b.next_token()?;
            } else {
                loop {
                    b.peek_token()?;
                    b.capture_from_here();
                    b.skip_value()?;
                    if !element(b.captured())? {
                        return Ok(());
                    }
                    match b.next_token()? {
                        b',' => continue,
                        b']' => break,
                        _ => return Err(format!("expected `,` or `]` in `{key}`")),
                    }
                }
            }
        } else {
            b.peek_token()?;
            b.skip_value()?;
        }
        match b.next_token()? {
            b',' => continue,
            b'}' => return Ok(()),
            _ => return Err("expected `,` or `}` after an object value".into()),
        }
    }
}

/// A reader's bytes in chunks, with the text of the value being captured copied out as whole runs.
struct Bytes<R> {
    reader: R,
    chunk: Box<[u8]>,
    pos: usize,
    len: usize,
    /// Capturing: where in `chunk` the captured text starts, and what earlier chunks held of it.
    capture: Option<(usize, Vec<u8>)>,
}

const CHUNK_BYTES: usize = 256 << 10;

impl<R: Read> Bytes<R> {
    fn new(reader: R) -> Self {
        Bytes { reader, chunk: vec![0; CHUNK_BYTES].into_boxed_slice(), pos: 0, len: 0, capture: None }
    }

    /// Reads the next chunk; false at the end of the input.
    fn refill(&mut self) -> Result<bool, String> {
        if let Some((from, out)) = &mut self.capture {
            out.extend_from_slice(&self.chunk[*from..self.len]);
            *from = 0;
        }
        self.pos = 0;
        self.len = loop {
            match self.reader.read(&mut self.chunk) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.to_string()),
            }
        };
        Ok(self.len > 0)
    }

    fn peek(&mut self) -> Result<Option<u8>, String> {
        if self.pos == self.len && !self.refill()? {
            return Ok(None);
        }
        Ok(Some(self.chunk[self.pos]))
    }

    fn next(&mut self) -> Result<u8, String> {
        let b = self.peek()?.ok_or("unexpected end of the JSON text")?;
        self.pos += 1;
        Ok(b)
    }

    /// The next byte that is not whitespace, not consumed.
    fn peek_token(&mut self) -> Result<u8, String> {
        loop {
            match self.peek()?.ok_or("unexpected end of the JSON text")? {
                b' ' | b'\n' | b'\r' | b'\t' => self.pos += 1,
                b => return Ok(b),
            }
        }
    }

    fn next_token(&mut self) -> Result<u8, String> {
        let b = self.peek_token()?;
        self.pos += 1;
        Ok(b)
    }

    fn capture_from_here(&mut self) {
        self.capture = Some((self.pos, Vec::new()));
    }

    fn captured(&mut self) -> Vec<u8> {
        let (from, mut out) = self.capture.take().unwrap_or_default();
        out.extend_from_slice(&self.chunk[from..self.pos]);
        out
    }

    /// Past the closing quote of a string whose opening quote was just read.
    fn skip_string(&mut self) -> Result<(), String> {
        loop {
            if self.pos == self.len && !self.refill()? {
                return Err("unterminated string".into());
            }
            let rest = &self.chunk[self.pos..self.len];
            match rest.iter().position(|&c| c == b'"' || c == b'\\') {
                None => self.pos = self.len,
                Some(i) => {
                    let quote = rest[i] == b'"';
                    self.pos += i + 1;
                    if quote {
                        return Ok(());
                    }
                    self.next()?; // the escaped character
                }
            }
        }
    }

    /// A string's value, its opening quote just read (escapes decoded by serde_json, when there are any).
    fn string_after_quote(&mut self) -> Result<String, String> {
        let start = self.pos.saturating_sub(1);
        self.capture = Some((start, Vec::new()));
        self.skip_string()?;
        let text = self.captured();
        if text.contains(&b'\\') {
            serde_json::from_slice(&text).map_err(|e| e.to_string())
        } else {
            String::from_utf8(text[1..text.len() - 1].to_vec()).map_err(|e| e.to_string())
        }
    }

    /// Past the value that starts at the next byte (whitespace already skipped). Brackets are only counted: a
    /// captured value is parsed by its consumer, which finds what else may be wrong with it.
    fn skip_value(&mut self) -> Result<(), String> {
        match self.next()? {
            b'"' => self.skip_string(),
            b'{' | b'[' => {
                let mut depth = 1usize;
                while depth > 0 {
                    match self.next()? {
                        b'"' => self.skip_string()?,
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => depth -= 1,
                        _ => {}
                    }
                }
                Ok(())
            }
            b',' | b':' | b'}' | b']' => Err("expected a JSON value".into()),
            _ => {
                // A number or literal: up to the next delimiter.
                while let Some(c) = self.peek()? {
                    if matches!(c, b',' | b']' | b'}' | b' ' | b'\n' | b'\r' | b'\t') {
                        break;
                    }
                    self.pos += 1;
                }
                Ok(())
            }
        }
    }
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

    /// A reader handing out one byte per call: every token and string crosses a chunk boundary somewhere.
    struct Trickle<'a>(&'a [u8]);
    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            match (self.0.split_first(), buf.first_mut()) {
                (Some((b, rest)), Some(slot)) => {
                    *slot = *b;
                    self.0 = rest;
                    Ok(1)
                }
                _ => Ok(0),
            }
        }
    }

    fn elements(doc: &str, keys: &[&str], trickle: bool) -> Result<Vec<serde_json::Value>, String> {
        let mut seen = Vec::new();
        let mut sink = |b: Vec<Box<serde_json::value::RawValue>>| {
            seen.extend(b.iter().map(|r| serde_json::from_str::<serde_json::Value>(r.get()).unwrap()));
            true
        };
        if trickle {
            for_each_pdu_batch(Trickle(doc.as_bytes()), keys, 3, &mut sink)?;
        } else {
            for_each_pdu_batch(doc.as_bytes(), keys, 3, &mut sink)?;
        }
        Ok(seen)
    }

    #[test]
    fn elements_are_what_a_json_parser_finds_under_the_keys() {
        let doc = r#" {
            "od\"d]": {"pdus": [1]}, "x": [1, {"]": "[{"}, "\\", -1.5e3, true, null],
            "p\u0064us" : [ {"a": "q\"]}", "b": [[], {}]} , "str]ing" ,
              {"c": "\u00e9\\"}, 12, false, null, [3, [4]] ] ,
            "auth_chain":[], "last": "}"
        } "#;
        let parsed: serde_json::Value = serde_json::from_str(doc).unwrap();
        let mut expected = parsed["pdus"].as_array().unwrap().clone();
        expected.extend(parsed["auth_chain"].as_array().unwrap().iter().cloned());
        for trickle in [false, true] {
            assert_eq!(elements(doc, &["pdus", "auth_chain"], trickle).unwrap(), expected, "trickle {trickle}");
        }
        assert_eq!(elements(r#"{}"#, &["pdus"], false).unwrap(), Vec::<serde_json::Value>::new());
    }

    /// Random documents, compact and pretty-printed: the elements are serde_json's, whatever the strings hold.
    #[test]
    fn random_documents_split_as_serde_json_parses_them() {
        use rand::{Rng, SeedableRng};
        use serde_json::{json, Value};
        fn value(rng: &mut rand::rngs::StdRng, depth: u32) -> Value {
            const CHARS: &[char] = &['a', '"', '\\', '[', ']', '{', '}', ',', ':', ' ', '\n', 'é', '\u{1}', '/'];
            match rng.gen_range(0..if depth > 3 { 4 } else { 6 }) {
                0 => json!(rng.gen_range(-1000..1000)),
                1 => [json!(true), json!(false), Value::Null][rng.gen_range(0..3)].clone(),
                2 | 3 => {
                    let n = rng.gen_range(0..8);
                    Value::String((0..n).map(|_| CHARS[rng.gen_range(0..CHARS.len())]).collect())
                }
                4 => Value::Array((0..rng.gen_range(0..4)).map(|_| value(rng, depth + 1)).collect()),
                _ => {
                    let mut m = serde_json::Map::new();
                    for _ in 0..rng.gen_range(0..4) {
                        if let Value::String(k) = value(rng, 9).clone() {
                            m.insert(k, value(rng, depth + 1));
                        }
                    }
                    Value::Object(m)
                }
            }
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(22);
        for _ in 0..300 {
            let arrays: Vec<Value> =
                (0..2).map(|_| Value::Array((0..5).map(|_| value(&mut rng, 0)).collect())).collect();
            let doc =
                json!({"x": value(&mut rng, 0), "pdus": arrays[0], "y": value(&mut rng, 0), "auth_chain": arrays[1]});
            // In the document's order (the map's, which serialises it).
            let expected: Vec<Value> = doc
                .as_object()
                .unwrap()
                .iter()
                .filter(|(k, _)| *k == "pdus" || *k == "auth_chain")
                .flat_map(|(_, v)| v.as_array().unwrap().iter().cloned())
                .collect();
            for text in [serde_json::to_string(&doc).unwrap(), serde_json::to_string_pretty(&doc).unwrap()] {
                assert_eq!(elements(&text, &["pdus", "auth_chain"], false).unwrap(), expected, "{text}");
            }
        }
    }

    #[test]
    fn a_broken_answer_is_an_error() {
        for doc in [
            r#"{"pdus": [{"a": 1}"#,
            r#"{"pdus": [{"a": "open}]}"#,
            r#"{"pdus": {"a": 1}}"#,
            r#"{"pdus": [{"a": 1} {"b": 2}]}"#,
            r#"{"pdus": [{"a": tru}]}"#,
            r#"{"pdus": [{"a": 1]]}"#,
            r#"["pdus"]"#,
            r#"{"x": 1 "pdus": []}"#,
            r#"{"pdus": [,]}"#,
        ] {
            for trickle in [false, true] {
                assert!(elements(doc, &["pdus"], trickle).is_err(), "{doc} (trickle {trickle})");
            }
        }
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
