//! The synthetic world: a Matrix-HQ-shaped room, signed by its many (virtual) servers, imported into the
//! resident Hearth's database through the bulk import path.

use std::collections::HashMap;
use std::sync::Arc;

use hearth::room::append::{build_pdu, LocalEvent};
use hearth::room::{version, Identity, Pdu};
use hearth::store::Store;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ruma::signatures::Ed25519KeyPair;
use serde_json::{json, Value};

pub struct Spec {
    pub members: usize,
    pub messages: usize,
    pub seed: u64,
    pub room_version: String,
}

#[derive(serde::Serialize, serde::Deserialize, Clone, Debug)]
pub struct World {
    pub room_id: String,
    pub admin: String,
    pub servers: usize,
    pub events: usize,
    pub state_events: usize,
    pub joined: usize,
    pub seconds: f64,
}

fn virtual_identity(i: usize) -> anyhow::Result<Identity> {
    // Loopback addresses with port 1: valid server names that refuse connections at once (keys come from the
    // resident acting as notary), and nothing ever leaves the machine.
    let name = format!("127.{}.{}.{}:1", 1 + i / 62500, 1 + (i / 250) % 250, 1 + i % 250);
    let der = Ed25519KeyPair::generate();
    let keypair = Ed25519KeyPair::from_der(&der, "v1".into()).map_err(|e| anyhow::anyhow!("{e}"))?;
    use base64::Engine;
    let public_key_b64 = base64::engine::general_purpose::STANDARD_NO_PAD.encode(keypair.public_key());
    Ok(Identity { server_name: ruma::ServerName::parse(&name)?, keypair, key_id: "ed25519:v1".into(), public_key_b64 })
}

fn key_response(id: &Identity) -> anyhow::Result<String> {
    let v = hearth::federation::keys::sign_value(
        id,
        json!({
            "server_name": id.server_name.as_str(),
            "verify_keys": {id.key_id.clone(): {"key": id.public_key_b64}},
            "old_verify_keys": {},
            "valid_until_ts": hearth::store::accounts::now_ms() + 365 * 24 * 3600 * 1000,
        }),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(v.to_string())
}

struct Builder {
    rules: ruma::room_version_rules::RoomVersionRules,
    room_id: Option<String>,
    state: HashMap<(String, String), (ruma::OwnedEventId, String)>,
    last: Option<(ruma::OwnedEventId, String)>,
    depth: i64,
    ts: i64,
    out: Vec<Pdu>,
    state_events: usize,
}

impl Builder {
    fn add(&mut self, id: &Identity, sender: &str, ev: LocalEvent) -> anyhow::Result<()> {
        let raw = serde_json::value::to_raw_value(&ev.content)?;
        let sender_id = ruma::UserId::parse(sender)?;
        let types = ruma::state_res::auth_types_for_event(
            &ev.kind.as_str().into(),
            &sender_id,
            ev.state_key.as_deref(),
            &raw,
            &self.rules.authorization,
        )
        .map_err(|e| anyhow::anyhow!(e))?;
        let auth: Vec<(ruma::OwnedEventId, String)> =
            types.iter().filter_map(|(t, k)| self.state.get(&(t.to_string(), k.clone())).cloned()).collect();
        let prev: Vec<_> = self.last.iter().cloned().collect();
        self.depth += 1;
        self.ts += 1;
        let room_id = self.room_id.as_deref().map(ruma::RoomId::parse).transpose()?;
        let mut pdu = build_pdu(id, &self.rules, room_id.as_deref(), &sender_id, &ev, &prev, &auth, self.depth)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        // Deterministic timestamps (the world is seeded); re-sign after changing one.
        pdu.json.insert(
            "origin_server_ts".into(),
            ruma::canonical_json::CanonicalJsonValue::Integer(ruma::Int::try_from(self.ts)?),
        );
        pdu.json.remove("signatures");
        pdu.json.remove("hashes");
        ruma::signatures::hash_and_sign_event(
            id.server_name.as_str(),
            &id.keypair,
            &mut pdu.json,
            &self.rules.redaction,
        )?;
        let event_id = version::event_id(&pdu.json, &self.rules).map_err(|e| anyhow::anyhow!(e))?;
        let pdu = Pdu::from_canonical(pdu.json, event_id, &self.rules).map_err(|e| anyhow::anyhow!(e))?;
        if self.room_id.is_none() {
            self.room_id = Some(pdu.room_id.to_string());
        }
        let sha = pdu.json.get("hashes").and_then(|h| {
            if let ruma::canonical_json::CanonicalJsonValue::Object(o) = h {
                o.get("sha256").cloned()
            } else {
                None
            }
        });
        let sha = match sha {
            Some(ruma::canonical_json::CanonicalJsonValue::String(s)) => s,
            _ => String::new(),
        };
        if let Some(k) = &ev.state_key {
            self.state.insert((ev.kind.clone(), k.clone()), (pdu.event_id.clone(), sha.clone()));
            self.state_events += 1;
        }
        self.last = Some((pdu.event_id.clone(), sha));
        self.out.push(pdu);
        Ok(())
    }
}

/// Generates the world and imports it into `store` (the resident's database) in chunks.
pub async fn generate(store: &Store, resident: Arc<Identity>, spec: &Spec) -> anyhow::Result<World> {
    let started = std::time::Instant::now();
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let n_servers = (spec.members / 50).clamp(5, 5000);
    let mut servers = Vec::with_capacity(n_servers);
    for i in 0..n_servers {
        servers.push(virtual_identity(i)?);
    }
    let rules = version::rules(&spec.room_version).map_err(|e| anyhow::anyhow!("{e}"))?;
    let admin = format!("@admin:{}", resident.server_name);
    let mut b = Builder {
        rules,
        room_id: None,
        state: HashMap::new(),
        last: None,
        depth: 0,
        ts: 1_700_000_000_000,
        out: Vec::new(),
        state_events: 0,
    };
    let res = resident.as_ref();
    b.add(
        res,
        &admin,
        LocalEvent::state("m.room.create", "", json!({"room_version": spec.room_version, "creator": admin})),
    )?;
    let room_id = b.room_id.clone().unwrap_or_default();
    b.add(
        res,
        &admin,
        LocalEvent::state("m.room.member", &admin, json!({"membership": "join", "displayname": "Admin"})),
    )?;

    // Users: ~40% on the resident, the rest over a long tail of servers (weights 1/i).
    let user_server = |rng: &mut StdRng| -> Option<usize> {
        if rng.gen_bool(0.4) {
            return None;
        }
        let h: f64 = (1..n_servers).map(|i| 1.0 / i as f64).sum();
        let mut x = rng.gen::<f64>() * h;
        for i in 1..n_servers {
            x -= 1.0 / i as f64;
            if x <= 0.0 {
                return Some(i);
            }
        }
        Some(n_servers - 1)
    };
    let users: Vec<(String, Option<usize>)> = (0..spec.members)
        .map(|i| {
            let s = user_server(&mut rng);
            let server =
                s.map(|s| servers[s].server_name.to_string()).unwrap_or_else(|| resident.server_name.to_string());
            (format!("@u{i}:{server}"), s)
        })
        .collect();
    let mut pl_users = serde_json::Map::new();
    if !b.rules.authorization.explicitly_privilege_room_creators {
        pl_users.insert(admin.clone(), json!(100));
    }
    for (u, _) in users.iter().take(49) {
        pl_users.insert(u.clone(), json!(50));
    }
    b.add(res, &admin, LocalEvent::state("m.room.power_levels", "", json!({"users": pl_users, "users_default": 0, "events_default": 0, "state_default": 50, "ban": 50, "kick": 50, "redact": 50, "invite": 0})))?;
    b.add(res, &admin, LocalEvent::state("m.room.join_rules", "", json!({"join_rule": "public"})))?;
    b.add(res, &admin, LocalEvent::state("m.room.history_visibility", "", json!({"history_visibility": "shared"})))?;
    b.add(res, &admin, LocalEvent::state("m.room.guest_access", "", json!({"guest_access": "forbidden"})))?;
    b.add(
        res,
        &admin,
        LocalEvent::state("m.room.name", "", json!({"name": format!("Bench HQ ({} members)", spec.members)})),
    )?;
    b.add(
        res,
        &admin,
        LocalEvent::state("m.room.topic", "", json!({"topic": "A synthetic room shaped like Matrix HQ"})),
    )?;
    b.add(res, &admin, LocalEvent::state("m.room.avatar", "", json!({"url": "mxc://bench/avatar"})))?;
    b.add(
        res,
        &admin,
        LocalEvent::state("m.room.canonical_alias", "", json!({"alias": format!("#hq:{}", resident.server_name)})),
    )?;
    b.add(
        res,
        &admin,
        LocalEvent::state(
            "m.room.server_acl",
            "",
            json!({"allow": ["*"], "deny": ["evil.example"], "allow_ip_literals": true}),
        ),
    )?;
    for i in 0..40 {
        b.add(
            res,
            &admin,
            LocalEvent::state(
                "m.bench.widget",
                &format!("w{i}"),
                json!({"url": format!("https://widgets.example/{i}"), "n": i}),
            ),
        )?;
    }

    let ident = |s: &Option<usize>| -> &Identity {
        match s {
            Some(i) => &servers[*i],
            None => res,
        }
    };
    let mut imported = 0usize;
    let room_nid = {
        let (rid, ver) = (ruma::RoomId::parse(&room_id)?, spec.room_version.clone());
        store
            .write(move |w| hearth::room::import::ensure_room(w, &rid, &ver))
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?
    };
    async fn flush(
        store: &Store,
        room_nid: hearth::store::ids::RoomNid,
        b: &mut Builder,
        imported: &mut usize,
    ) -> anyhow::Result<()> {
        let chunk = std::mem::take(&mut b.out);
        *imported += chunk.len();
        store
            .write_background(move |w| hearth::room::import::import_events(w, room_nid, &chunk))
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(())
    }
    let mut joined_now: Vec<usize> = Vec::new();
    for (i, (u, s)) in users.iter().enumerate() {
        let id = ident(s);
        let fate: f64 = rng.gen();
        let member = |m: &str| json!({"membership": m, "displayname": format!("User {i}")});
        if fate < 0.49 {
            b.add(id, u, LocalEvent::state("m.room.member", u, member("join")))?;
            joined_now.push(i);
        } else if fate < 0.97 {
            b.add(id, u, LocalEvent::state("m.room.member", u, member("join")))?;
            b.add(id, u, LocalEvent::state("m.room.member", u, json!({"membership": "leave"})))?;
            if rng.gen_bool(0.1) {
                // Came back and left again: a longer auth chain.
                b.add(id, u, LocalEvent::state("m.room.member", u, member("join")))?;
                b.add(id, u, LocalEvent::state("m.room.member", u, json!({"membership": "leave"})))?;
            }
        } else if fate < 0.995 {
            b.add(id, u, LocalEvent::state("m.room.member", u, member("join")))?;
            b.add(res, &admin, LocalEvent::state("m.room.member", u, json!({"membership": "ban", "reason": "spam"})))?;
        } else {
            b.add(res, &admin, LocalEvent::state("m.room.member", u, json!({"membership": "invite"})))?;
        }
        if b.out.len() >= 2000 {
            flush(store, room_nid, &mut b, &mut imported).await?;
        }
    }
    let mut timeline_from = None;
    for m in 0..spec.messages {
        let i = if joined_now.is_empty() { None } else { Some(joined_now[rng.gen_range(0..joined_now.len())]) };
        let (u, s) = match i {
            Some(i) => (users[i].0.clone(), users[i].1),
            None => (admin.clone(), None),
        };
        b.add(
            ident(&s),
            &u,
            LocalEvent::message("m.room.message", json!({"msgtype": "m.text", "body": format!("message {m}")})),
        )?;
        if timeline_from.is_none() {
            timeline_from = b.last.as_ref().map(|l| l.0.clone());
        }
        if b.out.len() >= 2000 {
            flush(store, room_nid, &mut b, &mut imported).await?;
        }
    }
    let last = b.last.as_ref().map(|l| l.0.clone()).ok_or_else(|| anyhow::anyhow!("empty world"))?;
    let timeline_from = timeline_from.unwrap_or_else(|| last.clone());
    flush(store, room_nid, &mut b, &mut imported).await?;
    let state_ids: Vec<ruma::OwnedEventId> = b.state.values().map(|(id, _)| id.clone()).collect();
    let n_state = state_ids.len();
    store
        .write_background(move |w| hearth::room::import::import_finish(w, room_nid, &state_ids, &timeline_from, &last))
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for s in &servers {
        let (name, resp) = (s.server_name.clone(), key_response(s)?);
        store
            .write_background(move |w| hearth::room::import::store_notary_key(w, &name, &resp))
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let _ = Value::Null;
    Ok(World {
        room_id,
        admin,
        servers: n_servers,
        events: imported,
        state_events: n_state,
        joined: joined_now.len() + 1,
        seconds: started.elapsed().as_secs_f64(),
    })
}
