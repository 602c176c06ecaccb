//! Guards of the source's shape (issue #16), read from `src/` as text:
//!
//! * `no_sql_outside_store`: SQL text lives in `src/store/` only. Every other file of `src/` (the bench and load
//!   binaries in `src/bin/` aside) is scanned for string literals that start an SQL statement (`SELECT `,
//!   `INSERT INTO`, `UPDATE ... SET`, `DELETE FROM`, `CREATE TABLE`, `PRAGMA`, ...; also after a `;`) or an SQL
//!   clause (`WHERE `, `FROM `, `ORDER BY `), and for calls of rusqlite's statement methods (`.execute(`,
//!   `.prepare(`, `.prepare_cached(`, `.query_row(`, `.execute_batch(`).
//! * `database_crates_only_in_store`: no file of `src/` outside `src/store/` (binaries included) names `rusqlite`,
//!   `r2d2` or `r2d2_sqlite`, so none can open a connection of its own; `error.rs` may name their error types only.
//!   The store's own handles (`Db`, `Writer`, `DirectDb`) keep their connection private, so the type system does
//!   the rest.
//! * `no_cycle_between_top_level_modules`: the top-level modules of `src/` (a file `src/x.rs` or a folder `src/x/`)
//!   import each other in one direction only. Every `crate::<module>` path and every `use crate::{...}` group is
//!   read per module; a cycle in the graph fails the test with its path and the lines that make each edge.
//!
//! Comments are ignored; string literals are ignored when reading imports.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("reading {}: {e}", d.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// `src/`-relative path with `/` separators.
fn rel(path: &Path) -> String {
    path.strip_prefix(src_dir()).unwrap().to_string_lossy().replace('\\', "/")
}

/// A source file split into code (comments and string literal contents blanked, newlines kept, so byte offsets
/// and line numbers still match) and its string literals (line of the opening quote, raw text between the quotes).
struct Lexed {
    code: String,
    strings: Vec<(usize, String)>,
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

fn lex(src: &str) -> Lexed {
    let b = src.as_bytes();
    let mut code = b.to_vec();
    let mut strings = Vec::new();
    let line_at = |i: usize| b[..i].iter().filter(|&&c| c == b'\n').count() + 1;
    let blank = |code: &mut Vec<u8>, from: usize, to: usize| {
        for c in &mut code[from..to] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
    };
    let mut i = 0;
    while i < b.len() {
        let boundary = i == 0 || !is_ident(b[i - 1]);
        if b[i] == b'/' && b.get(i + 1) == Some(&b'/') {
            let end = b[i..].iter().position(|&c| c == b'\n').map_or(b.len(), |p| i + p);
            blank(&mut code, i, end);
            i = end;
        } else if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            let (mut depth, mut j) = (1, i + 2);
            while j < b.len() && depth > 0 {
                if b[j] == b'/' && b.get(j + 1) == Some(&b'*') {
                    depth += 1;
                    j += 2;
                } else if b[j] == b'*' && b.get(j + 1) == Some(&b'/') {
                    depth -= 1;
                    j += 2;
                } else {
                    j += 1;
                }
            }
            blank(&mut code, i, j);
            i = j;
        } else if boundary && (b[i] == b'r' || (b[i] == b'b' && b.get(i + 1) == Some(&b'r'))) && {
            let k = if b[i] == b'b' { i + 2 } else { i + 1 };
            let hashes = b[k..].iter().take_while(|&&c| c == b'#').count();
            b.get(k + hashes) == Some(&b'"')
        } {
            // Raw string r"..." / r#"..."# (and br"...").
            let k = if b[i] == b'b' { i + 2 } else { i + 1 };
            let hashes = b[k..].iter().take_while(|&&c| c == b'#').count();
            let start = k + hashes + 1;
            let close: Vec<u8> = std::iter::once(b'"').chain(std::iter::repeat_n(b'#', hashes)).collect();
            let end = (start..b.len()).find(|&j| b[j..].starts_with(&close)).unwrap_or(b.len());
            strings.push((line_at(i), src[start..end].to_owned()));
            blank(&mut code, start, end);
            i = (end + close.len()).min(b.len());
        } else if b[i] == b'"' {
            let start = i + 1;
            let mut j = start;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            let end = j.min(b.len());
            strings.push((line_at(i), src[start..end].to_owned()));
            blank(&mut code, start, end);
            i = end + 1;
        } else if b[i] == b'\'' {
            // A char literal ('x', '\n', '\'', '"'), or a lifetime / label ('a) left as it is.
            if b.get(i + 1) == Some(&b'\\') {
                let end = (i + 2..b.len()).find(|&j| b[j] == b'\'' && j > i + 2).unwrap_or(b.len());
                blank(&mut code, i + 1, end);
                i = end + 1;
            } else if let Some(len) = src[i + 1..].chars().next().map(char::len_utf8) {
                if b.get(i + 1 + len) == Some(&b'\'') {
                    blank(&mut code, i + 1, i + 1 + len);
                    i += len + 2;
                } else {
                    i += 1;
                }
            } else {
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    Lexed { code: String::from_utf8(code).expect("blanking keeps UTF-8"), strings }
}

// ---- SQL outside store/ ---------------------------------------------------------------------------------------------

/// Words that start an SQL statement or clause (matched case-sensitively, after whitespace is collapsed).
const SQL_STARTS: &[&str] = &[
    "SELECT ",
    "INSERT INTO ",
    "INSERT OR ",
    "REPLACE INTO ",
    "DELETE FROM ",
    "CREATE TABLE ",
    "CREATE INDEX ",
    "CREATE UNIQUE INDEX ",
    "CREATE TRIGGER ",
    "CREATE VIEW ",
    "CREATE VIRTUAL TABLE ",
    "DROP TABLE ",
    "DROP INDEX ",
    "ALTER TABLE ",
    "PRAGMA ",
    "WITH RECURSIVE ",
    "BEGIN IMMEDIATE",
    "SAVEPOINT ",
    "RELEASE SAVEPOINT",
    "VACUUM",
    "WHERE ",
    "FROM ",
    "ORDER BY ",
];

/// Why a string literal is SQL, if it is.
fn sql_in(literal: &str) -> Option<String> {
    // Line continuations and escaped newlines/tabs are whitespace; then collapse whitespace.
    let text = literal.replace("\\n", " ").replace("\\t", " ").replace('\\', " ");
    let text: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    for stmt in text.split(';') {
        let t = stmt.trim_start().trim_start_matches('(').trim_start();
        let t = format!("{t} ");
        if let Some(kw) = SQL_STARTS.iter().find(|kw| t.starts_with(*kw)) {
            return Some(kw.trim().to_owned());
        }
        if t.starts_with("UPDATE ") && t.contains(" SET ") {
            return Some("UPDATE ... SET".into());
        }
        if t.starts_with("WITH ") && t.contains(" AS (") {
            return Some("WITH ... AS (".into());
        }
    }
    None
}

const SQL_CALLS: &[&str] = &[".execute(", ".execute_batch(", ".prepare(", ".prepare_cached(", ".query_row("];

/// `file:line: what` for every SQL site in `path` (a file outside `src/store/`).
fn sql_sites(path: &Path) -> Vec<String> {
    let src = std::fs::read_to_string(path).unwrap();
    let lexed = lex(&src);
    let mut sites = Vec::new();
    for (line, lit) in &lexed.strings {
        if let Some(kw) = sql_in(lit) {
            let shown: String = lit.split_whitespace().collect::<Vec<_>>().join(" ").chars().take(70).collect();
            sites.push((*line, format!("{}:{line}: SQL text ({kw}): \"{shown}\"", rel(path))));
        }
    }
    for (n, line) in lexed.code.lines().enumerate() {
        for call in SQL_CALLS {
            if line.contains(call) {
                sites.push((n + 1, format!("{}:{}: call {call}: {}", rel(path), n + 1, src_line(&src, n).trim())));
            }
        }
    }
    sites.sort();
    sites.into_iter().map(|(_, s)| s).collect()
}

fn src_line(src: &str, n: usize) -> String {
    src.lines().nth(n).unwrap_or_default().chars().take(110).collect()
}

#[test]
fn no_sql_outside_store() {
    let src = src_dir();
    let mut sites = Vec::new();
    let mut per_file: BTreeMap<String, usize> = BTreeMap::new();
    for path in rust_files(&src) {
        let r = rel(&path);
        if r.starts_with("store/") || r.starts_with("bin/") {
            continue;
        }
        let found = sql_sites(&path);
        if !found.is_empty() {
            per_file.insert(r, found.len());
        }
        sites.extend(found);
    }
    if !sites.is_empty() {
        let summary: Vec<String> = per_file.iter().map(|(f, n)| format!("  {n:4}  src/{f}")).collect();
        let calls = sites.iter().filter(|s| s.contains(": call .")).count();
        panic!(
            "SQL outside src/store/: {} sites ({} SQL string literals, {calls} statement calls) in {} files \
             (move them into store functions):\n{}\n\nper file:\n{}",
            sites.len(),
            sites.len() - calls,
            per_file.len(),
            sites.iter().map(|s| format!("  src/{s}")).collect::<Vec<_>>().join("\n"),
            summary.join("\n")
        );
    }
}

#[test]
fn the_sql_detector_finds_statements_and_calls_and_leaves_prose_alone() {
    for sql in [
        "SELECT a FROM t",
        "\n        SELECT a\n        FROM t",
        "INSERT INTO t (a) VALUES (?1)",
        "INSERT OR IGNORE INTO t VALUES (1)",
        "UPDATE t SET a = 1",
        "DELETE FROM t WHERE a = ?1",
        "CREATE TABLE t (a)",
        "PRAGMA journal_mode = WAL",
        "BEGIN; DELETE FROM t; COMMIT",
        " WHERE room_nid = ?1",
        "(SELECT 1)",
        "WITH x AS (SELECT 1) SELECT * FROM x",
    ] {
        assert!(sql_in(sql).is_some(), "not seen as SQL: {sql:?}");
    }
    for prose in [
        "select a room",
        "Update the profile",
        "the user was deleted from the room",
        "M_FORBIDDEN",
        "UPDATE: new version",
    ] {
        assert_eq!(sql_in(prose), None, "prose seen as SQL: {prose:?}");
    }
    let lexed = lex(
        "// SELECT a FROM t\nlet q = \"SELECT a FROM t\"; /* DELETE FROM t */ let c = '\"'; let r = r#\"UPDATE t SET a = \"x\"\"#;\nconn.execute(q)",
    );
    let found: Vec<&str> = lexed.strings.iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(found, ["SELECT a FROM t", "UPDATE t SET a = \"x\""]);
    assert!(!lexed.code.contains("DELETE"), "comments are blanked");
    assert!(lexed.code.lines().nth(2).unwrap().contains(".execute("), "code keeps its lines");
}

// ---- the database crates outside store/ -----------------------------------------------------------------------------

/// The crates that open or pool SQLite connections: named only in `src/store/`.
const DB_CRATES: &[&str] = &["rusqlite", "r2d2", "r2d2_sqlite"];

/// What `error.rs` may name of them: SQLite's error types, to map them to ours (and a test building one).
const ERROR_TYPE_PATHS: &[&str] = &["rusqlite::Error", "rusqlite::ErrorCode", "rusqlite::ffi::", "r2d2::Error"];

/// Lines (1-based) of `code` (comments and strings blanked) that name a database crate as a path (`rusqlite::`,
/// `use rusqlite`), leaving the [`ERROR_TYPE_PATHS`] alone when `error_types_allowed`.
fn db_crate_lines(code: &str, error_types_allowed: bool) -> Vec<usize> {
    let mut lines = Vec::new();
    for (n, line) in code.lines().enumerate() {
        let b = line.as_bytes();
        let named = line.match_indices('r').any(|(at, _)| {
            let Some(krate) = DB_CRATES.iter().filter(|k| line[at..].starts_with(*k)).max_by_key(|k| k.len()) else {
                return false;
            };
            let whole_word = (at == 0 || !is_ident(b[at - 1])) && b.get(at + krate.len()).is_none_or(|&c| !is_ident(c));
            whole_word && !(error_types_allowed && ERROR_TYPE_PATHS.iter().any(|p| line[at..].starts_with(p)))
        });
        if named {
            lines.push(n + 1);
        }
    }
    lines
}

/// The database is reached only through `store/`: its connection is private there (`Db`, `Writer`, `DirectDb`
/// do not hand it out), and this keeps every other file of `src/` (binaries included) from opening one of its own
/// through the database crates.
#[test]
fn database_crates_only_in_store() {
    let mut sites = Vec::new();
    for path in rust_files(&src_dir()) {
        let r = rel(&path);
        if r.starts_with("store/") {
            continue;
        }
        let src = std::fs::read_to_string(&path).unwrap();
        for n in db_crate_lines(&lex(&src).code, r == "error.rs") {
            sites.push(format!("  src/{r}:{n}: {}", src_line(&src, n - 1).trim()));
        }
    }
    assert!(
        sites.is_empty(),
        "rusqlite/r2d2 named outside src/store/ (call a store function, taking a `store::Db`):\n{}",
        sites.join("\n")
    );
}

#[test]
fn the_database_crate_detector_reads_paths_not_words() {
    let src = "use rusqlite::Connection;\n// rusqlite in a comment\nlet s = \"rusqlite\";\n\
               fn f(c: &r2d2::PooledConnection<M>) {}\nlet my_rusqlite_thing = 1;\n\
               let x: r2d2_sqlite::SqliteConnectionManager;\nimpl From<rusqlite::Error> for E {}\n";
    let code = lex(src).code;
    assert_eq!(db_crate_lines(&code, false), [1, 4, 6, 7]);
    assert_eq!(db_crate_lines(&code, true), [1, 4, 6]);
}

// ---- module cycles ------------------------------------------------------------------------------------------------

/// The top-level modules of `src/`: files `src/x.rs` and folders `src/x/` (not `main`, `lib` or `bin`).
fn top_level_modules() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for entry in std::fs::read_dir(src_dir()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if ["main", "lib", "bin"].contains(&name.as_str()) {
            continue;
        }
        if path.is_dir() || path.extension().is_some_and(|e| e == "rs") {
            out.insert(name);
        }
    }
    out
}

/// The top-level module a file of `src/` belongs to (`None` for main.rs, lib.rs and bin/).
fn module_of(rel_path: &str, modules: &BTreeSet<String>) -> Option<String> {
    let first = rel_path.split('/').next()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    modules.contains(name).then(|| name.to_owned())
}

/// The top-level modules `code` (comments and strings blanked) names through `crate::`: `crate::x::...` paths and
/// the first segments of `crate::{x::..., y, ...}` groups, with the byte offset of each mention.
fn crate_refs(code: &str) -> Vec<(usize, String)> {
    let b = code.as_bytes();
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(p) = code[from..].find("crate::") {
        let at = from + p;
        from = at + "crate::".len();
        if at > 0 && (is_ident(b[at - 1]) || b[at - 1] == b'$') {
            continue; // `$crate::` or part of a longer identifier
        }
        let rest = &code[from..];
        let rest_trim = rest.trim_start();
        if let Some(group) = rest_trim.strip_prefix('{') {
            // Segments right after `{` or a `,` at depth 1.
            let (mut depth, mut expect_segment) = (1, true);
            let gb = group.as_bytes();
            let mut j = 0;
            while j < gb.len() && depth > 0 {
                match gb[j] {
                    b'{' => {
                        depth += 1;
                        expect_segment = false;
                    }
                    b'}' => depth -= 1,
                    b',' if depth == 1 => expect_segment = true,
                    c if is_ident(c) && expect_segment => {
                        let len = gb[j..].iter().take_while(|&&c| is_ident(c)).count();
                        out.push((at, group[j..j + len].to_owned()));
                        expect_segment = false;
                        j += len;
                        continue;
                    }
                    c if !c.is_ascii_whitespace() => expect_segment = false,
                    _ => {}
                }
                j += 1;
            }
        } else {
            let len = rest.bytes().take_while(|&c| is_ident(c)).count();
            if len > 0 {
                out.push((at, rest[..len].to_owned()));
            }
        }
    }
    out
}

/// Edges `from -> to` between top-level modules, each with the sites (`file:line: source line`) that make it.
fn module_graph() -> BTreeMap<(String, String), Vec<String>> {
    let modules = top_level_modules();
    let mut edges: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for path in rust_files(&src_dir()) {
        let r = rel(&path);
        let Some(from) = module_of(&r, &modules) else { continue };
        let src = std::fs::read_to_string(&path).unwrap();
        let lexed = lex(&src);
        let mut seen_lines = BTreeSet::new();
        for (offset, to) in crate_refs(&lexed.code) {
            if to == from || !modules.contains(&to) {
                continue;
            }
            let line = lexed.code[..offset].matches('\n').count();
            if seen_lines.insert((line, to.clone())) {
                let site = format!("src/{r}:{}: {}", line + 1, src_line(&src, line).trim());
                edges.entry((from.clone(), to)).or_default().push(site);
            }
        }
    }
    edges
}

/// Strongly connected components with more than one module (Tarjan), each sorted.
fn cycles(nodes: &BTreeSet<String>, edges: &BTreeMap<(String, String), Vec<String>>) -> Vec<Vec<String>> {
    struct Tarjan<'a> {
        adj: BTreeMap<&'a str, Vec<&'a str>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    impl<'a> Tarjan<'a> {
        fn visit(&mut self, v: &'a str) {
            self.index.insert(v, self.next);
            self.low.insert(v, self.next);
            self.next += 1;
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.adj.get(v).cloned().unwrap_or_default() {
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(lw);
                } else if self.on_stack.contains(w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut scc = Vec::new();
                loop {
                    let w = self.stack.pop().unwrap();
                    self.on_stack.remove(w);
                    scc.push(w.to_owned());
                    if w == v {
                        break;
                    }
                }
                if scc.len() > 1 {
                    scc.sort();
                    self.out.push(scc);
                }
            }
        }
    }
    let mut adj: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (a, b) in edges.keys() {
        adj.entry(a.as_str()).or_default().push(b.as_str());
    }
    let mut t = Tarjan {
        adj,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: vec![],
        on_stack: BTreeSet::new(),
        next: 0,
        out: vec![],
    };
    for n in nodes {
        if !t.index.contains_key(n.as_str()) {
            t.visit(n);
        }
    }
    t.out
}

/// The shortest path `from -> ... -> to` using only edges inside `within` (breadth first).
fn shortest_path(
    from: &str,
    to: &str,
    within: &BTreeSet<&str>,
    edges: &BTreeMap<(String, String), Vec<String>>,
) -> Option<Vec<String>> {
    let mut prev: BTreeMap<String, String> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([from.to_owned()]);
    while let Some(v) = queue.pop_front() {
        for (a, b) in edges.keys() {
            if *a != v || !within.contains(b.as_str()) || prev.contains_key(b) || b == from {
                continue;
            }
            prev.insert(b.clone(), v.clone());
            if b == to {
                let mut path = vec![to.to_owned()];
                while let Some(p) = prev.get(path.last().unwrap()) {
                    path.push(p.clone());
                    if p == from {
                        break;
                    }
                }
                path.reverse();
                return Some(path);
            }
            queue.push_back(b.clone());
        }
    }
    None
}

#[test]
fn no_cycle_between_top_level_modules() {
    let modules = top_level_modules();
    let edges = module_graph();
    let found = cycles(&modules, &edges);
    if found.is_empty() {
        return;
    }
    let mut report = String::new();
    for scc in &found {
        let within: BTreeSet<&str> = scc.iter().map(String::as_str).collect();
        report.push_str(&format!("\nmodules in one cycle: {}\n", scc.join(", ")));
        // One cycle through each module of the component, by its shortest way back.
        let mut shown = BTreeSet::new();
        for m in scc {
            let back = edges
                .keys()
                .filter(|(a, b)| a == m && within.contains(b.as_str()))
                .filter_map(|(_, b)| shortest_path(b, m, &within, &edges).map(|p| (b.clone(), p)))
                .min_by_key(|(_, p)| p.len());
            if let Some((_, path)) = back {
                let mut cycle = vec![m.clone()];
                cycle.extend(path);
                if shown.insert(cycle.clone()) {
                    report.push_str(&format!("  cycle: {}\n", cycle.join(" -> ")));
                }
            }
        }
        report.push_str("  edges inside it (with the lines that make them):\n");
        for ((a, b), sites) in &edges {
            if within.contains(a.as_str()) && within.contains(b.as_str()) {
                report.push_str(&format!("    {a} -> {b} ({} sites)\n", sites.len()));
                for s in sites.iter().take(5) {
                    report.push_str(&format!("      {s}\n"));
                }
                if sites.len() > 5 {
                    report.push_str(&format!("      ... and {} more\n", sites.len() - 5));
                }
            }
        }
    }
    panic!("the top-level modules of src/ import each other in a cycle:{report}");
}

#[test]
fn the_import_reader_sees_paths_and_groups() {
    let code = "use crate::{client::sync, room::{a, b}, store};\nfn f() { crate::jobs::run(); $crate::x::y; }";
    let refs: Vec<String> = crate_refs(code).into_iter().map(|(_, m)| m).collect();
    assert_eq!(refs, ["client", "room", "store", "jobs"]);
    let nodes: BTreeSet<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
    let mut edges = BTreeMap::new();
    for (a, b) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")] {
        edges.insert((a.to_owned(), b.to_owned()), vec![]);
    }
    assert_eq!(cycles(&nodes, &edges), vec![vec!["a".to_owned(), "b".to_owned(), "c".to_owned()]]);
    let within: BTreeSet<&str> = ["a", "b", "c"].into();
    assert_eq!(shortest_path("b", "a", &within, &edges).unwrap(), ["b", "c", "a"]);
}
