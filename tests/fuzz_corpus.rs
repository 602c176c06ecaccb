//! Replays every committed fuzz input (fuzz/corpus/<target>/*: seeds, and minimised crash reproducers the fuzzers
//! found, named `crash-*`) through the fuzz targets' bodies (fuzz/targets.rs) on stable Rust, so the normal test run
//! keeps them fixed. The fuzzers themselves need cargo-fuzz: see fuzz/README.md.

#[path = "../fuzz/targets.rs"]
mod targets;

use std::path::Path;

fn replay(target: &str, f: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let result = std::panic::catch_unwind(|| f(&data));
        assert!(result.is_ok(), "fuzz target `{target}` panics on {}", path.display());
        n += 1;
    }
    assert!(n > 0, "no corpus for `{target}` in {}", dir.display());
    println!("{target}: {n} inputs");
}

#[test]
fn pdu_corpus() {
    replay("pdu", targets::pdu);
}

#[test]
fn x_matrix_corpus() {
    replay("x_matrix", targets::x_matrix);
}

#[test]
fn ids_corpus() {
    replay("ids", targets::ids);
}

#[test]
fn sync_token_corpus() {
    replay("sync_token", targets::sync_token);
}

#[test]
fn filter_corpus() {
    replay("filter", targets::filter);
}

#[test]
fn multipart_corpus() {
    replay("multipart", targets::multipart);
}
