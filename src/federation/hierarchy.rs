//! Spaces over federation: the client `/hierarchy` walk (rooms we hold are summarised locally, the others asked of
//! the servers their `m.space.child` link names, with the federation `/hierarchy`), the pagination sessions it
//! keeps between pages, and the remote summary `/room_summary` falls back on. As Synapse's `RoomSummaryHandler`:
//! a depth-first walk in the spec's child order, a room shown once, a remote answer judged again for the user
//! (another server answers for all of its users).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::federation::client::enc;
use crate::federation::FedContext;
use crate::room::hierarchy::{self as h, Entry, Viewer};

/// Rooms per page, at most (and by default), as Synapse's `MAX_ROOMS`.
const MAX_ROOMS: u64 = 50;
/// Servers asked about one room, at most.
const MAX_SERVERS_PER_ROOM: usize = 3;
/// Remote rooms asked about while building one page: a space of unreachable or hidden rooms cannot hold a request
/// for long (the page ends early and `next_batch` goes on).
const MAX_FETCHES_PER_PAGE: usize = 20;
/// How long a pagination token stays valid, and how many are kept.
const SESSION_TTL: Duration = Duration::from_secs(5 * 60);
const MAX_SESSIONS: usize = 1000;
/// How long one remote `/hierarchy` may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(15);

/// A client's `/hierarchy` request.
#[derive(Clone, Debug)]
pub struct Request {
    pub user_id: String,
    pub room_id: String,
    pub suggested_only: bool,
    pub max_depth: Option<u64>,
    pub limit: Option<u64>,
    pub from: Option<String>,
}

/// A room still to visit.
#[derive(Clone, Debug)]
struct Queued {
    room_id: String,
    via: Vec<String>,
    depth: u64,
    /// Its summary from the answer about its parent, when a remote server gave one.
    remote: Option<Value>,
}

struct Session {
    user_id: String,
    room_id: String,
    suggested_only: bool,
    max_depth: Option<u64>,
    queue: Vec<Queued>,
    processed: HashSet<String>,
    created: Instant,
}

/// The walks paused between pages, by `next_batch` token (in memory: a token outlives no restart, as it outlives
/// no five minutes).
#[derive(Default)]
pub struct Sessions(Mutex<HashMap<String, Session>>);

impl Sessions {
    /// The queue and visited rooms of a token, if it is ours, alive and was made for the same request.
    fn resume(&self, token: &str, req: &Request) -> Result<(Vec<Queued>, HashSet<String>)> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(token) {
            Some(s)
                if s.created.elapsed() < SESSION_TTL
                    && s.user_id == req.user_id
                    && s.room_id == req.room_id
                    && s.suggested_only == req.suggested_only
                    && s.max_depth == req.max_depth =>
            {
                Ok((s.queue.clone(), s.processed.clone()))
            }
            _ => Err(Error::invalid_param("unknown pagination token (or suggested_only or max_depth changed)")),
        }
    }

    fn save(&self, req: &Request, queue: Vec<Queued>, processed: HashSet<String>) -> String {
        let token = crate::util::random_string(24);
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, s| s.created.elapsed() < SESSION_TTL);
        if map.len() >= MAX_SESSIONS {
            if let Some(oldest) = map.iter().min_by_key(|(_, s)| s.created).map(|(k, _)| k.clone()) {
                map.remove(&oldest);
            }
        }
        let session = Session {
            user_id: req.user_id.clone(),
            room_id: req.room_id.clone(),
            suggested_only: req.suggested_only,
            max_depth: req.max_depth,
            queue,
            processed,
            created: Instant::now(),
        };
        map.insert(token.clone(), session);
        token
    }
}

/// What another server's federation `/hierarchy` said about a room, checked and kept to the spec's shapes.
#[derive(Clone, Debug)]
pub struct RemoteHierarchy {
    pub room: Entry,
    /// Summaries of its children that server holds, by room id.
    pub children: HashMap<String, Value>,
    /// Children that server says we may not see (not asked about again).
    pub inaccessible: HashSet<String>,
}

fn parse_answer(room_id: &str, v: &Value) -> Option<RemoteHierarchy> {
    let room_json = v.get("room")?;
    let room = h::sanitize_summary(room_json).filter(|r| r.get("room_id").and_then(Value::as_str) == Some(room_id))?;
    let children_state = h::sanitize_children_state(room_json.get("children_state"));
    let children = v
        .get("children")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(h::sanitize_summary)
        .filter_map(|c| Some((c.get("room_id")?.as_str()?.to_owned(), c)))
        .collect();
    let inaccessible = v
        .get("inaccessible_children")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect();
    Some(RemoteHierarchy { room: Entry { room, children_state }, children, inaccessible })
}

/// Asks the first of `via` (at most three, not ourselves) that answers for the room's federation `/hierarchy`.
/// None when federation is off or no server gave a usable answer (the room is then left out, as Synapse does).
pub async fn remote_hierarchy(
    fed: &FedContext,
    room_id: &str,
    via: &[String],
    suggested_only: bool,
) -> Option<RemoteHierarchy> {
    let f = fed.federation.as_ref()?;
    let me = fed.identity.server_name.as_str();
    let path = format!("/_matrix/federation/v1/hierarchy/{}?suggested_only={suggested_only}", enc(room_id));
    for server in via.iter().filter(|s| s.as_str() != me).take(MAX_SERVERS_PER_ROOM) {
        match f.client.request_timeout(reqwest::Method::GET, server, &path, None, FETCH_TIMEOUT).await {
            Ok(v) => match parse_answer(room_id, &v) {
                Some(answer) => return Some(answer),
                None => tracing::info!(room_id, server, "unusable /hierarchy answer"),
            },
            Err(e) => tracing::info!(room_id, server, error = %Error::from(e), "remote /hierarchy failed"),
        }
    }
    None
}

/// The server part of a room id, if it has one (room version 12 ids have none).
pub fn server_of_room(room_id: &str) -> Vec<String> {
    ruma::RoomId::parse(room_id).ok().and_then(|r| r.server_name().map(|s| vec![s.to_string()])).unwrap_or_default()
}

/// One client walk: the remote answers it got, so no room is asked about twice.
struct Walk<'a> {
    fed: &'a FedContext,
    req: &'a Request,
    fetched: HashMap<String, Option<RemoteHierarchy>>,
    fetches: usize,
}

impl Walk<'_> {
    async fn fetch(&mut self, room_id: &str, via: &[String]) -> Option<RemoteHierarchy> {
        if let Some(known) = self.fetched.get(room_id) {
            return known.clone();
        }
        self.fetches += 1;
        let answer = remote_hierarchy(self.fed, room_id, via, self.req.suggested_only).await;
        self.fetched.insert(room_id.to_owned(), answer.clone());
        answer
    }

    /// The room's entry as we hold it: None when we are not in it, Some(None) when the user may not see it.
    async fn local(&self, room_id: &str, with_children: bool) -> Result<Option<Option<Entry>>> {
        let (rid, user, me) = (room_id.to_owned(), self.req.user_id.clone(), self.fed.identity.server_name.to_string());
        let suggested_only = self.req.suggested_only;
        self.fed
            .store
            .read(move |c| match h::resident_room(c, &rid, &me)? {
                Some(room) => h::local_entry(c, &room, Viewer::User(&user), suggested_only, with_children).map(Some),
                None => Ok(None),
            })
            .await
    }

    async fn user_may_see(&self, room: &Value) -> Result<bool> {
        let (user, room) = (self.req.user_id.clone(), room.clone());
        self.fed.store.read(move |c| h::remote_room_accessible(c, Some(&user), &room)).await
    }

    /// 403 unless the user may see the root room (as we hold it, or as a server that holds it says).
    async fn check_root(&mut self) -> Result<()> {
        let allowed = match self.local(&self.req.room_id, false).await? {
            Some(entry) => entry.is_some(),
            None => {
                let room_id = self.req.room_id.clone();
                match self.fetch(&room_id, &server_of_room(&room_id)).await {
                    Some(answer) => self.user_may_see(&answer.room.room).await?,
                    None => false,
                }
            }
        };
        if allowed {
            Ok(())
        } else {
            Err(Error::forbidden("you may not see this room (not a member, and it cannot be previewed)"))
        }
    }

    /// The entry of a queued room for the user (None: hidden or unknown), with what the answer said of its
    /// children when it came from another server.
    async fn visit(&mut self, q: &Queued) -> Result<(Option<Entry>, HashMap<String, Value>, HashSet<String>)> {
        if let Some(entry) = self.local(&q.room_id, true).await? {
            return Ok((entry, HashMap::new(), HashSet::new()));
        }
        let at_max_depth = self.req.max_depth.is_some_and(|m| q.depth >= m);
        let (entry, children, inaccessible) = match &q.remote {
            // A room its parent's answer summarised needs no request unless we are to look at its children.
            Some(room) if room.get("room_type").and_then(Value::as_str) != Some("m.space") || at_max_depth => {
                (Some(Entry { room: room.clone(), children_state: vec![] }), HashMap::new(), HashSet::new())
            }
            _ => match self.fetch(&q.room_id, &q.via).await {
                Some(a) => (Some(a.room), a.children, a.inaccessible),
                None => (None, HashMap::new(), HashSet::new()),
            },
        };
        match entry {
            Some(e) if self.user_may_see(&e.room).await? => Ok((Some(e), children, inaccessible)),
            _ => Ok((None, HashMap::new(), HashSet::new())),
        }
    }
}

/// The client `/hierarchy`: one page of the depth-first walk from the requested room.
pub async fn client_hierarchy(fed: &FedContext, sessions: &Sessions, req: Request) -> Result<Value> {
    let mut walk = Walk { fed, req: &req, fetched: HashMap::new(), fetches: 0 };
    walk.check_root().await?;
    let (mut queue, mut processed) = match &req.from {
        Some(token) => sessions.resume(token, &req)?,
        None => {
            let root =
                Queued { room_id: req.room_id.clone(), via: server_of_room(&req.room_id), depth: 0, remote: None };
            (vec![root], HashSet::new())
        }
    };
    let limit = req.limit.unwrap_or(MAX_ROOMS).clamp(1, MAX_ROOMS) as usize;
    let mut rooms = Vec::new();
    while rooms.len() < limit && walk.fetches < MAX_FETCHES_PER_PAGE {
        let Some(q) = queue.pop() else { break };
        if !processed.insert(q.room_id.clone()) {
            continue;
        }
        let (entry, mut children, inaccessible) = walk.visit(&q).await?;
        let Some(entry) = entry else { continue };
        if req.max_depth.is_none_or(|m| q.depth < m) {
            // Pushed in reverse, so the first child is visited next.
            for child in entry.children_state.iter().rev() {
                let Some(id) = child.get("state_key").and_then(Value::as_str) else { continue };
                if inaccessible.contains(id) || processed.contains(id) {
                    continue;
                }
                let via = child
                    .pointer("/content/via")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
                    .unwrap_or_default();
                queue.push(Queued { room_id: id.to_owned(), via, depth: q.depth + 1, remote: children.remove(id) });
            }
        }
        rooms.push(entry.to_json());
    }
    queue.retain(|q| !processed.contains(&q.room_id));
    let mut body = json!({ "rooms": rooms });
    if !queue.is_empty() {
        body["next_batch"] = json!(sessions.save(&req, queue, processed));
    }
    Ok(body)
}

/// `/room_summary` of a room we are not in: what the first of `via` that answers says, if the user may see it.
pub async fn remote_summary(fed: &FedContext, user: Option<&str>, room_id: &str, via: &[String]) -> Result<Value> {
    let not_found = || Error::not_found("room not found, or you may not see it");
    let answer = remote_hierarchy(fed, room_id, via, true).await.ok_or_else(not_found)?;
    let (u, room) = (user.map(str::to_owned), answer.room.room);
    let checked = room.clone();
    if !fed.store.read(move |c| h::remote_room_accessible(c, u.as_deref(), &checked)).await? {
        return Err(not_found());
    }
    Ok(room)
}
