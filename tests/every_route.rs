//! Every endpoint the routers serve answers (issue 21): each route of the client, media and federation routers is
//! called with an empty or bad request and must not answer `M_UNRECOGNIZED` (what an unknown endpoint answers) or
//! a 500; and every unstable feature `/versions` advertises is served. The routes are read from the router sources
//! (`src/client/mod.rs`, `src/media/mod.rs`, `src/federation_api/routes.rs`), so a route added there is walked too.

mod common;

use common::fake_resident::*;
use common::*;

/// One route: absolute path (with `{param}`s) and its methods.
#[derive(Debug)]
struct Route {
    path: String,
    methods: Vec<&'static str>,
}

/// The `.route(...)` calls of a router source; routes inside the functions named in `nested` get each of the
/// prefixes (the client API's `/_matrix/client/{v3,r0}`); `/_matrix/media/{v}` routes are expanded for v3, r0, v1.
fn routes_in(file: &str, nested: &[&str], prefixes: &[&str]) -> Vec<Route> {
    let src = std::fs::read_to_string(format!("{}/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let mut out = Vec::new();
    let mut current_fn = String::new();
    let mut rest = src.as_str();
    while let Some(i) = rest.find(".route(") {
        // The function this call is in: the last `fn name(` before it.
        if let Some(f) = rest[..i].rfind("fn ") {
            let name: String = rest[f + 3..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            current_fn = name;
        }
        let call = &rest[i + 7..];
        // The call's text up to its closing parenthesis.
        let mut depth = 1;
        let end = call
            .char_indices()
            .find(|&(_, c)| {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ => {}
                }
                depth == 0
            })
            .map(|(j, _)| j)
            .unwrap_or(call.len());
        let text = &call[..end];
        rest = &call[end..];
        let Some(q) = text.find('"') else { continue };
        let lit: String = text[q + 1..].chars().take_while(|&c| c != '"').collect();
        let mut methods = Vec::new();
        for (token, m) in [("get(", "GET"), ("post(", "POST"), ("put(", "PUT"), ("delete(", "DELETE")] {
            if text.contains(token) {
                methods.push(m);
            }
        }
        let paths: Vec<String> = if lit.contains("{v}") {
            ["v3", "r0", "v1"].iter().map(|v| lit.replace("{v}", v).replace("{{", "{").replace("}}", "}")).collect()
        } else if nested.contains(&current_fn.as_str()) {
            prefixes.iter().map(|p| format!("{p}{lit}")).collect()
        } else {
            vec![lit]
        };
        for path in paths {
            out.push(Route { path, methods: methods.clone() });
        }
    }
    out
}

/// A path with every `{param}` filled with something well-formed that names nothing.
fn fill(path: &str) -> String {
    let mut out = String::new();
    let mut rest = path;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let j = rest[i..].find('}').unwrap() + i;
        let value = match &rest[i + 1..j] {
            "room_id" | "room" => "!nosuch:localhost",
            "event_id" => "$nosuch",
            "user_id" => "@nosuch:localhost",
            "alias" => "#nosuch:localhost",
            "server_name" | "server" => "localhost",
            "media_id" => "nosuchmedia",
            "key_id" => "ed25519:x",
            // `/thirdparty/{kind}`: the spec names two kinds; any other is no endpoint at all.
            "kind" => "location",
            _ => "x",
        };
        out.push_str(&enc(value));
        rest = &rest[j + 1..];
    }
    out.push_str(rest);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_served_route_answers_and_versions_lists_only_served_features() {
    let s = start_hearth_with(|c| c.federation.serve_on_client_listener = true).await;
    let alice = s.user("alice").await;
    let mut routes = routes_in(
        "src/client/mod.rs",
        &["api", "extras", "backup_and_tags"],
        &["/_matrix/client/v3", "/_matrix/client/r0"],
    );
    routes.extend(routes_in("src/media/mod.rs", &[], &[]));
    routes.extend(routes_in("src/federation_api/routes.rs", &[], &[]));
    assert!(routes.len() > 150, "the router sources were read: {} routes", routes.len());
    // Logging out ends the token the other calls use: last.
    routes.sort_by_key(|r| r.path.contains("logout"));
    let mut failures = Vec::new();
    for r in &routes {
        let path = fill(&r.path);
        for m in &r.methods {
            let method = reqwest::Method::from_bytes(m.as_bytes()).unwrap();
            let body = (*m != "GET").then(|| json!({}));
            let mut req = alice.http.request(method, format!("{}{path}", alice.base_url));
            req = req.bearer_auth(alice.token.clone().unwrap());
            if let Some(b) = &body {
                req = req.json(b);
            }
            let res = req.send().await.expect("request");
            let status = res.status().as_u16();
            let text = res.text().await.unwrap_or_default();
            let errcode =
                serde_json::from_str::<Value>(&text).ok().and_then(|v| v["errcode"].as_str().map(str::to_owned));
            if errcode.as_deref() == Some("M_UNRECOGNIZED") || status >= 500 && status != 502 && status != 504 {
                failures.push(format!("{m} {path}: {status} {text}"));
            }
        }
    }
    assert!(failures.is_empty(), "routes that do not answer:\n{}", failures.join("\n"));

    // Each unstable feature /versions advertises, with a request that needs it served.
    let probes: &[(&str, &str, &str)] = &[
        ("org.matrix.msc3706", "PUT", "/_matrix/federation/v2/send_join/!nosuch:localhost/$x?omit_members=true"),
        ("org.matrix.msc2285.stable", "POST", "/_matrix/client/v3/rooms/!nosuch:localhost/receipt/m.read.private/$x"),
        ("org.matrix.msc3916.stable", "GET", "/_matrix/client/v1/media/config"),
        ("org.matrix.e2e_cross_signing", "POST", "/_matrix/client/v3/keys/device_signing/upload"),
        ("org.matrix.msc3266", "GET", "/_matrix/client/v1/room_summary/!nosuch:localhost"),
        ("org.matrix.simplified_msc3575", "POST", "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync"),
        ("org.matrix.msc2753", "POST", "/_matrix/client/unstable/org.matrix.msc2753/rooms/!nosuch:localhost/unpeek"),
    ];
    let fresh = s.user("bob").await;
    let versions = fresh.get("/_matrix/client/versions").await.ok();
    for (feature, on) in versions["unstable_features"].as_object().unwrap() {
        let Some((_, m, path)) = probes.iter().find(|p| p.0 == feature) else {
            panic!("/versions advertises {feature} = {on}, which this test does not know how to check: add a probe")
        };
        let res = fresh.request(reqwest::Method::from_bytes(m.as_bytes()).unwrap(), path, Some(&json!({}))).await;
        assert_ne!(res.errcode(), "M_UNRECOGNIZED", "{feature}: {m} {path}: {}", res.text);
    }
}
