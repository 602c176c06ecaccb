//! Remote users' device lists over federation: the `m.device_list_update` / `m.signing_key_update` EDUs we
//! receive, the resync of a tracked user's list (GET `/user/devices`), and the remote half of `/keys/query`.
//!
//! The rule (the spec's "Device Management", as Synapse builds it): a remote user is tracked while they share a
//! room with one of our users (`store::device_lists::is_tracked`; in a partial-state room, the members we know of).
//! A tracked user's list is cached: an update whose `prev_id`s we hold is applied to the copy, any other makes the
//! copy stale and starts a resync. `/keys/query` answers tracked users from a fresh copy (fetching it first when
//! stale or missing) and asks the servers of the others (POST `/user/keys/query`), caching nothing for those.
//! Copies are dropped when the user stops sharing a room with ours (the room core calls the store when a join
//! ends), so a user who comes back is fetched anew.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::federation::client::enc;
use crate::federation::{FedContext, Federation};
use crate::store::device_lists::{self, Applied, DeviceUpdate, RemoteDevice, RemoteList};
use crate::store::Store;

/// How long a resync started by an update may take.
const RESYNC_TIMEOUT: Duration = Duration::from_secs(30);

fn server_of(user_id: &str) -> &str {
    user_id.split_once(':').map(|x| x.1).unwrap_or_default()
}

/// One resync per user at a time: a `/keys/query` that finds a resync of the same user under way waits for it
/// and then answers from its result, rather than asking the remote twice.
#[derive(Default)]
pub struct Resyncs {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Resyncs {
    fn lock_for(&self, user_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.retain(|_, l| Arc::strong_count(l) > 1);
        locks.entry(user_id.to_owned()).or_default().clone()
    }
}

/// The handles a resync needs, owned, so an update can start one in the background.
#[derive(Clone)]
pub struct DeviceLists {
    store: Store,
    federation: Option<Federation>,
    our_server: String,
    resyncs: Arc<Resyncs>,
}

impl DeviceLists {
    pub fn of(s: &FedContext) -> Self {
        DeviceLists {
            store: s.store.clone(),
            federation: s.federation.clone(),
            our_server: s.identity.server_name.to_string(),
            resyncs: s.device_resyncs.clone(),
        }
    }

    /// Fetches tracked `user_id`'s whole device list from their server and stores it, unless a fresh copy is
    /// held by then (another resync just finished). A user no longer tracked when the answer comes is not stored.
    pub async fn resync(&self, user_id: &str, timeout: Duration) -> Result<()> {
        let lock = self.resyncs.lock_for(user_id);
        let _one_at_a_time = lock.lock().await;
        let uid = user_id.to_owned();
        if self.store.read(move |c| device_lists::is_fresh(c, &uid)).await? {
            return Ok(());
        }
        let fed = self.federation.as_ref().ok_or_else(|| Error::forbidden("federation is disabled"))?;
        let path = format!("/_matrix/federation/v1/user/devices/{}", enc(user_id));
        let answer = fed.client.request_timeout(reqwest::Method::GET, server_of(user_id), &path, None, timeout).await?;
        let (stream_id, list) = parse_user_devices(user_id, &answer)?;
        let (uid, ours) = (user_id.to_owned(), self.our_server.clone());
        self.store
            .write(move |w| {
                if device_lists::is_tracked(w.db(), &ours, &uid)? {
                    device_lists::store_list(w.db(), &uid, stream_id, &list)?;
                }
                Ok(())
            })
            .await
    }

    fn resync_in_background(&self, user_id: String) {
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this.resync(&user_id, RESYNC_TIMEOUT).await {
                tracing::info!(user_id, error = %e, "device list resync failed (the next /keys/query asks again)");
            }
        });
    }
}

/// A `/user/devices` answer: its position and the list (devices whose keys name another user or device are
/// left out).
fn parse_user_devices(user_id: &str, v: &Value) -> Result<(i64, RemoteList)> {
    if v["user_id"] != user_id {
        return Err(Error::bad_json("the /user/devices answer is about another user"));
    }
    let stream_id = v["stream_id"].as_i64().ok_or_else(|| Error::bad_json("/user/devices without stream_id"))?;
    let mut devices = Vec::new();
    for d in v["devices"].as_array().into_iter().flatten() {
        let Some(device_id) = d["device_id"].as_str() else { continue };
        let keys = d.get("keys").filter(|k| k.is_object()).cloned();
        if keys.as_ref().is_some_and(|k| k["user_id"] != user_id || k["device_id"] != device_id) {
            continue;
        }
        let display_name = d["device_display_name"].as_str().map(str::to_owned);
        devices.push(RemoteDevice { device_id: device_id.to_owned(), display_name, keys });
    }
    let key = |k: &str| v.get(k).filter(|x| x.is_object()).cloned();
    Ok((stream_id, RemoteList { devices, master_key: key("master_key"), self_signing_key: key("self_signing_key") }))
}

// ------------------------------------------------------------------------------------------------------------
// Inbound EDUs

/// An `m.device_list_update` from `user_id`'s own server: recorded for `/sync` and `/keys/changes` (whoever shares
/// a room with the user then, even a member we learn of only when a lazy join completes, is told), and applied to
/// the cached copy, or a resync started when it cannot be.
pub async fn on_device_list_update(s: &FedContext, user_id: String, content: &Value) -> Result<()> {
    let update = content["device_id"].as_str().map(|device_id| DeviceUpdate {
        device_id: device_id.to_owned(),
        stream_id: content["stream_id"].as_i64().unwrap_or(0),
        prev_ids: content["prev_id"].as_array().into_iter().flatten().filter_map(Value::as_i64).collect(),
        deleted: content["deleted"].as_bool().unwrap_or(false),
        display_name: content["device_display_name"].as_str().map(str::to_owned),
        keys: content.get("keys").filter(|k| k.is_object()).cloned(),
    });
    let (uid, ours) = (user_id.clone(), s.identity.server_name.to_string());
    let stale = s
        .store
        .write(move |w| {
            crate::store::e2ee::device_list_changed(w, &uid)?;
            if !device_lists::is_tracked(w.db(), &ours, &uid)? {
                return Ok(false);
            }
            Ok(match &update {
                Some(u) => device_lists::apply_update(w.db(), &uid, u)? == Applied::Stale,
                None => {
                    device_lists::mark_stale(w.db(), &uid, 0)?;
                    true
                }
            })
        })
        .await?;
    if stale {
        DeviceLists::of(s).resync_in_background(user_id);
    }
    Ok(())
}

/// An `m.signing_key_update` from `user_id`'s own server: recorded for `/sync`, and the cached copy's keys replaced.
pub async fn on_signing_key_update(s: &FedContext, user_id: String, content: &Value) -> Result<()> {
    let master = content.get("master_key").filter(|k| k.is_object()).cloned();
    let ssk = content.get("self_signing_key").filter(|k| k.is_object()).cloned();
    s.store
        .write(move |w| {
            crate::store::e2ee::device_list_changed(w, &user_id)?;
            device_lists::set_signing_keys(w.db(), &user_id, master.as_ref(), ssk.as_ref())
        })
        .await
}

// ------------------------------------------------------------------------------------------------------------
// /keys/query for remote users

/// The remote part of a `/keys/query` answer.
#[derive(Default)]
pub struct RemoteKeys {
    pub device_keys: Map<String, Value>,
    pub master_keys: Map<String, Value>,
    pub self_signing_keys: Map<String, Value>,
    /// Servers that could not answer.
    pub failures: Map<String, Value>,
}

fn failure(message: impl std::fmt::Display) -> Value {
    json!({"status": 503, "message": message.to_string()})
}

/// Keys of remote users (`{user: [device ids]}` per server, an empty list meaning all devices): tracked users
/// from a fresh cached copy (resynced first if needed), the others from their servers. Servers in parallel.
pub async fn query_keys(
    s: &FedContext,
    wanted: BTreeMap<String, Map<String, Value>>,
    timeout: Duration,
) -> Result<RemoteKeys> {
    let lists = DeviceLists::of(s);
    let asks = wanted.into_iter().map(|(server, users)| query_server(&lists, server, users, timeout));
    let mut out = RemoteKeys::default();
    for (server, answer) in futures::future::join_all(asks).await {
        match answer {
            Ok(a) => {
                for (into, field) in [
                    (&mut out.device_keys, "device_keys"),
                    (&mut out.master_keys, "master_keys"),
                    (&mut out.self_signing_keys, "self_signing_keys"),
                ] {
                    // A server answers for its own users only.
                    for (user, v) in a[field].as_object().into_iter().flatten() {
                        if server_of(user) == server {
                            into.insert(user.clone(), v.clone());
                        }
                    }
                }
            }
            Err(e) => {
                out.failures.insert(server, failure(e));
            }
        }
    }
    Ok(out)
}

/// One server's users: `{device_keys, master_keys, self_signing_keys}`.
async fn query_server(
    lists: &DeviceLists,
    server: String,
    users: Map<String, Value>,
    timeout: Duration,
) -> (String, Result<Value>) {
    let r = query_server_inner(lists, &server, users, timeout).await;
    (server, r)
}

async fn query_server_inner(
    lists: &DeviceLists,
    server: &str,
    users: Map<String, Value>,
    timeout: Duration,
) -> Result<Value> {
    let ids: Vec<String> = users.keys().cloned().collect();
    let ours = lists.our_server.clone();
    let tracked: Vec<String> = lists
        .store
        .read(move |c| {
            let mut t = Vec::new();
            for u in ids {
                if device_lists::is_tracked(c, &ours, &u)? {
                    t.push(u);
                }
            }
            Ok(t)
        })
        .await?;
    let resyncs = tracked.iter().map(|u| async move { (u.clone(), lists.resync(u, timeout).await) });
    let mut from_cache = Vec::new();
    for (u, r) in futures::future::join_all(resyncs).await {
        match r {
            Ok(()) => from_cache.push(u),
            Err(e) => tracing::info!(user_id = u, error = %e, "device list resync failed; asking for the keys only"),
        }
    }
    let mut out = json!({"device_keys": {}, "master_keys": {}, "self_signing_keys": {}});
    let mut rest = users.clone();
    let cached_users: Vec<(String, Vec<String>)> = from_cache
        .into_iter()
        .filter_map(|u| {
            let devices = users.get(&u)?.as_array()?.iter().filter_map(Value::as_str).map(str::to_owned).collect();
            Some((u, devices))
        })
        .collect();
    let lists_read = cached_users.clone();
    let held = lists
        .store
        .read(move |c| {
            let mut held = Vec::new();
            for (u, _) in &lists_read {
                held.push(device_lists::cached(c, u)?);
            }
            Ok(held)
        })
        .await?;
    for ((u, devices), list) in cached_users.into_iter().zip(held) {
        let Some(list) = list else { continue };
        rest.remove(&u);
        out["device_keys"][&u] = device_keys_of(&list, &devices);
        if let Some(k) = list.master_key {
            out["master_keys"][&u] = k;
        }
        if let Some(k) = list.self_signing_key {
            out["self_signing_keys"][&u] = k;
        }
    }
    if rest.is_empty() {
        return Ok(out);
    }
    let fed = lists.federation.as_ref().ok_or_else(|| Error::forbidden("federation is disabled on this server"))?;
    let body = json!({"device_keys": rest});
    let path = "/_matrix/federation/v1/user/keys/query";
    let answer = fed.client.request_timeout(reqwest::Method::POST, server, path, Some(&body), timeout).await?;
    for field in ["device_keys", "master_keys", "self_signing_keys"] {
        for (u, v) in answer[field].as_object().into_iter().flatten() {
            out[field][u] = v.clone();
        }
    }
    Ok(out)
}

/// `{device id: keys}` of a cached list, the device's name in `unsigned` as for local users; `devices` empty = all.
fn device_keys_of(list: &RemoteList, devices: &[String]) -> Value {
    let mut out = Map::new();
    for d in &list.devices {
        let Some(keys) = &d.keys else { continue };
        if !devices.is_empty() && !devices.contains(&d.device_id) {
            continue;
        }
        let mut keys = keys.clone();
        if let (Some(name), Some(o)) = (&d.display_name, keys.as_object_mut()) {
            o.insert("unsigned".into(), json!({"device_display_name": name}));
        }
        out.insert(d.device_id.clone(), keys);
    }
    Value::Object(out)
}
