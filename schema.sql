-- Hearth: the whole SQLite schema. Applied on first start; PRAGMA user_version records the version.
-- Later versions append numbered migrations to src/store/migrate.rs and bump SCHEMA_VERSION.

-- Small key/value facts about this server (signing key, server name it was created with).
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
) WITHOUT ROWID;

------------------------------------------------------------------------------------------------------------------
-- Accounts
CREATE TABLE users (
    user_id       TEXT PRIMARY KEY,          -- @local:server
    password_hash TEXT,                      -- argon2 PHC string; NULL = cannot log in with a password
    admin         INTEGER NOT NULL DEFAULT 0,
    displayname   TEXT,
    avatar_url    TEXT,
    created_ts    INTEGER NOT NULL,
    deactivated   INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

CREATE TABLE devices (
    user_id      TEXT NOT NULL REFERENCES users(user_id),
    device_id    TEXT NOT NULL,
    display_name TEXT,
    last_seen_ts INTEGER,
    last_seen_ip TEXT,
    PRIMARY KEY (user_id, device_id)
) WITHOUT ROWID;

-- Tokens are stored as their SHA-256, so a leaked database does not leak live sessions.
CREATE TABLE access_tokens (
    token_sha256 BLOB PRIMARY KEY,
    user_id      TEXT NOT NULL,
    device_id    TEXT NOT NULL,
    created_ts   INTEGER NOT NULL,
    FOREIGN KEY (user_id, device_id) REFERENCES devices(user_id, device_id) ON DELETE CASCADE
) WITHOUT ROWID;
CREATE INDEX access_tokens_device ON access_tokens(user_id, device_id);

-- Refresh tokens (clients that ask with `refresh_token: true`): each belongs to one access token and goes with it.
CREATE TABLE refresh_tokens (
    token_sha256  BLOB PRIMARY KEY,
    access_sha256 BLOB NOT NULL REFERENCES access_tokens(token_sha256) ON DELETE CASCADE,
    created_ts    INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX refresh_tokens_access ON refresh_tokens(access_sha256);

CREATE TABLE filters (
    user_id   TEXT NOT NULL,
    filter_id INTEGER NOT NULL,
    json      TEXT NOT NULL,
    PRIMARY KEY (user_id, filter_id)
) WITHOUT ROWID;

------------------------------------------------------------------------------------------------------------------
-- Rooms and events. Identifiers are interned to integers (nid) so state rows stay small.
CREATE TABLE rooms (
    room_nid         INTEGER PRIMARY KEY,
    room_id          TEXT NOT NULL UNIQUE,
    room_version     TEXT NOT NULL,
    current_sg       INTEGER,                    -- state group of the current (resolved) room state
    partial_state    INTEGER NOT NULL DEFAULT 0, -- 1 while a lazy join's member list is still being fetched
    published        INTEGER NOT NULL DEFAULT 0, -- listed in the local public room directory
    joined_members   INTEGER NOT NULL DEFAULT 0, -- materialised counts, kept by room_members updates
    invited_members  INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE state_keys (
    state_key_nid INTEGER PRIMARY KEY,
    event_type    TEXT NOT NULL,
    state_key     TEXT NOT NULL,
    UNIQUE (event_type, state_key)
);

-- stream_ordering: positive and increasing for events that enter the live timeline (one global stream shared with
-- account data, receipts, to-device and device lists, so one number is a sync position); negative for backfilled
-- events; NULL for outliers (events we hold only for auth or state, not in the timeline).
CREATE TABLE events (
    event_nid        INTEGER PRIMARY KEY,
    event_id         TEXT NOT NULL UNIQUE,
    room_nid         INTEGER NOT NULL REFERENCES rooms(room_nid),
    event_type       TEXT NOT NULL,
    state_key_nid    INTEGER REFERENCES state_keys(state_key_nid),   -- NULL for non-state events
    sender           TEXT NOT NULL,
    origin_server_ts INTEGER NOT NULL,
    depth            INTEGER NOT NULL,
    stream_ordering  INTEGER UNIQUE,
    outlier          INTEGER NOT NULL DEFAULT 0,
    rejected         TEXT,                 -- reason, when the event failed auth
    soft_failed      INTEGER NOT NULL DEFAULT 0,
    redacted_by      TEXT,                 -- event id of the redaction applied to `json`
    sg_after         INTEGER,              -- state group after this event (NULL for outliers)
    txn_device       TEXT,                 -- for local sends: device and txn id, so /sync can echo transaction_id
    txn_id           TEXT,
    json             TEXT NOT NULL         -- the full PDU, canonical JSON, without `unsigned`
);
CREATE INDEX events_room_stream ON events(room_nid, stream_ordering) WHERE stream_ordering IS NOT NULL;
CREATE INDEX events_room_depth ON events(room_nid, depth);
-- /messages and /context page in topological order: (depth, stream position) of timeline events.
CREATE INDEX events_room_topo ON events(room_nid, depth, stream_ordering) WHERE stream_ordering IS NOT NULL;
CREATE INDEX events_room_ts ON events(room_nid, origin_server_ts);  -- /timestamp_to_event
CREATE INDEX events_redacts ON events(room_nid, event_type) WHERE event_type = 'm.room.redaction';

-- DAG edges, for backfill and missing-event lookups.
CREATE TABLE event_edges (
    event_nid     INTEGER NOT NULL REFERENCES events(event_nid),
    prev_event_id TEXT NOT NULL,
    PRIMARY KEY (event_nid, prev_event_id)
) WITHOUT ROWID;
CREATE INDEX event_edges_prev ON event_edges(prev_event_id);

-- Auth edges, so auth chains are walked over indexed rows instead of parsing event JSON.
CREATE TABLE event_auth (
    event_nid     INTEGER NOT NULL REFERENCES events(event_nid),
    auth_event_id TEXT NOT NULL,
    PRIMARY KEY (event_nid, auth_event_id)
) WITHOUT ROWID;
-- Downwards (the events citing an event): state resolution asks whether an event is in the auth chain of a fork's
-- shared state by walking down from it.
CREATE INDEX event_auth_by_auth ON event_auth(auth_event_id);

CREATE TABLE forward_extremities (
    room_nid  INTEGER NOT NULL,
    event_nid INTEGER NOT NULL,
    PRIMARY KEY (room_nid, event_nid)
) WITHOUT ROWID;

-- State groups: immutable snapshots addressed by id. A group stores the entries that differ from its parent
-- (`delta_of`); a root group (no parent) stores the whole state. Chains are bounded by `depth`: past the limit a
-- new group is written as a full snapshot of the non-member state plus a delta over the nearest member base.
-- `partial` marks a lazy join's base group whose member entries are still being fetched.
CREATE TABLE state_groups (
    sg        INTEGER PRIMARY KEY,
    room_nid  INTEGER NOT NULL REFERENCES rooms(room_nid),
    delta_of  INTEGER REFERENCES state_groups(sg),
    depth     INTEGER NOT NULL DEFAULT 0,
    partial   INTEGER NOT NULL DEFAULT 0
);

-- event_nid NULL = the key is absent in this group although present in an ancestor (only after state resolution).
CREATE TABLE state_group_entries (
    sg            INTEGER NOT NULL,
    state_key_nid INTEGER NOT NULL,
    event_nid     INTEGER,
    PRIMARY KEY (sg, state_key_nid)
) WITHOUT ROWID;

-- The current membership of every user in every room we know, kept incrementally as current state changes, so
-- /members, lazy-loading, sync and "servers in room" never read a whole state snapshot.
CREATE TABLE room_members (
    room_nid    INTEGER NOT NULL,
    user_id     TEXT NOT NULL,
    membership  TEXT NOT NULL,            -- join | invite | leave | ban | knock
    event_nid   INTEGER NOT NULL,
    server_name TEXT NOT NULL,
    displayname TEXT,
    avatar_url  TEXT,
    PRIMARY KEY (room_nid, user_id)
) WITHOUT ROWID;
CREATE INDEX room_members_user ON room_members(user_id, membership);
CREATE INDEX room_members_server ON room_members(room_nid, server_name, membership);

-- Room membership changes of local users in stream order, so /sync can find newly joined/left/invited rooms.
CREATE TABLE local_membership_stream (
    stream_ordering INTEGER PRIMARY KEY,
    user_id         TEXT NOT NULL,
    room_nid        INTEGER NOT NULL,
    membership      TEXT NOT NULL,
    event_nid       INTEGER NOT NULL
);
CREATE INDEX local_membership_user ON local_membership_stream(user_id, stream_ordering);

-- Stripped state sent with an invite from another server (we hold no state of such rooms yet).
CREATE TABLE invite_state (
    room_nid  INTEGER NOT NULL,
    user_id   TEXT NOT NULL,
    events    TEXT NOT NULL,                 -- JSON array of stripped state events
    PRIMARY KEY (room_nid, user_id)
) WITHOUT ROWID;

-- Users who left a room and asked to forget it.
CREATE TABLE forgotten_rooms (
    user_id  TEXT NOT NULL,
    room_nid INTEGER NOT NULL,
    PRIMARY KEY (user_id, room_nid)
) WITHOUT ROWID;

CREATE TABLE room_aliases (
    alias      TEXT PRIMARY KEY,
    room_id    TEXT NOT NULL,
    creator    TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX room_aliases_room ON room_aliases(room_id);

------------------------------------------------------------------------------------------------------------------
-- Per-user streams (all share the global stream counter)
CREATE TABLE account_data (
    user_id         TEXT NOT NULL,
    room_id         TEXT NOT NULL,           -- '' for global account data
    data_type       TEXT NOT NULL,
    content         TEXT NOT NULL,
    stream_ordering INTEGER NOT NULL,
    PRIMARY KEY (user_id, room_id, data_type)
) WITHOUT ROWID;
CREATE INDEX account_data_stream ON account_data(user_id, stream_ordering);

CREATE TABLE receipts (
    room_nid        INTEGER NOT NULL,
    receipt_type    TEXT NOT NULL,
    user_id         TEXT NOT NULL,
    thread_id       TEXT NOT NULL,           -- '' for unthreaded
    event_id        TEXT NOT NULL,
    ts              INTEGER NOT NULL,
    stream_ordering INTEGER NOT NULL,
    PRIMARY KEY (room_nid, receipt_type, user_id, thread_id)
) WITHOUT ROWID;
CREATE INDEX receipts_stream ON receipts(room_nid, stream_ordering);

CREATE TABLE to_device (
    stream_ordering INTEGER PRIMARY KEY,
    user_id         TEXT NOT NULL,
    device_id       TEXT NOT NULL,
    sender          TEXT NOT NULL,
    event_type      TEXT NOT NULL,
    content         TEXT NOT NULL
);
CREATE INDEX to_device_target ON to_device(user_id, device_id, stream_ordering);

CREATE TABLE txn_ids (
    user_id   TEXT NOT NULL,
    device_id TEXT NOT NULL,
    txn_id    TEXT NOT NULL,
    kind      TEXT NOT NULL,                 -- 'send' | 'to_device'
    result    TEXT NOT NULL,                 -- event id, or '' for to-device
    PRIMARY KEY (user_id, device_id, kind, txn_id)
) WITHOUT ROWID;

------------------------------------------------------------------------------------------------------------------
-- End-to-end encryption plumbing
CREATE TABLE device_keys (
    user_id   TEXT NOT NULL,
    device_id TEXT NOT NULL,
    keys      TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id)
) WITHOUT ROWID;

CREATE TABLE one_time_keys (
    user_id   TEXT NOT NULL,
    device_id TEXT NOT NULL,
    key_id    TEXT NOT NULL,                 -- algorithm:id
    algorithm TEXT NOT NULL,
    key_json  TEXT NOT NULL,
    fallback  INTEGER NOT NULL DEFAULT 0,    -- 0 one-time key, 1 unused fallback key, 2 fallback key handed out
    upload_seq INTEGER NOT NULL DEFAULT 0,   -- claims hand out keys of older uploads first
    PRIMARY KEY (user_id, device_id, key_id)
) WITHOUT ROWID;

-- Cross-signing keys as uploaded, with signatures from /keys/signatures/upload merged into `signatures`.
CREATE TABLE cross_signing_keys (
    user_id   TEXT NOT NULL,
    key_type  TEXT NOT NULL,                 -- master | self_signing | user_signing
    key_json  TEXT NOT NULL,
    PRIMARY KEY (user_id, key_type)
) WITHOUT ROWID;

-- Presence (one row per user, local or remote; absent = offline). A change worth telling clients about takes a
-- position of the global stream, so /sync picks it up; activity timestamps alone are stored without one.
CREATE TABLE presence (
    user_id           TEXT PRIMARY KEY,
    state             TEXT NOT NULL,          -- online | unavailable | offline
    status_msg        TEXT,
    last_active_ts    INTEGER NOT NULL DEFAULT 0,
    last_sync_ts      INTEGER NOT NULL DEFAULT 0,
    last_federation_ts INTEGER NOT NULL DEFAULT 0, -- local: last sent to other servers; remote: last heard of
    currently_active  INTEGER NOT NULL DEFAULT 0,
    stream_ordering   INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX presence_stream ON presence(stream_ordering);
CREATE INDEX presence_not_offline ON presence(state) WHERE state != 'offline';

CREATE TABLE device_list_stream (
    stream_ordering INTEGER PRIMARY KEY,
    user_id         TEXT NOT NULL
);
CREATE INDEX device_list_user ON device_list_stream(user_id, stream_ordering);

-- Remote users' device lists as we hold them (the spec's device list cache): one row per remote user we track (a
-- user joined to a room a local user is joined to) and have fetched or been told about. `stream_id` is the origin's
-- device list position of what we hold (NULL: nothing held yet); `wanted` the highest position announced to us.
-- The copy is fresh when stream_id >= wanted; otherwise the next /keys/query refetches it (GET /user/devices).
CREATE TABLE remote_device_lists (
    user_id          TEXT PRIMARY KEY,
    stream_id        INTEGER,
    wanted           INTEGER NOT NULL DEFAULT 0,
    master_key       TEXT,
    self_signing_key TEXT
) WITHOUT ROWID;
CREATE TABLE remote_devices (
    user_id      TEXT NOT NULL REFERENCES remote_device_lists(user_id) ON DELETE CASCADE,
    device_id    TEXT NOT NULL,
    display_name TEXT,
    keys         TEXT,                      -- the device's signed keys, NULL when it has none
    PRIMARY KEY (user_id, device_id)
) WITHOUT ROWID;

------------------------------------------------------------------------------------------------------------------
-- Federation
CREATE TABLE server_signing_keys (
    server_name     TEXT NOT NULL,
    key_id          TEXT NOT NULL,
    public_key      TEXT NOT NULL,           -- unpadded base64
    valid_until_ts  INTEGER NOT NULL,
    expired_ts      INTEGER,                 -- set for old_verify_keys
    PRIMARY KEY (server_name, key_id)
) WITHOUT ROWID;

-- Other servers' self-signed key responses we serve as a notary (`POST /_matrix/key/v2/query`).
CREATE TABLE notary_keys (
    server_name TEXT PRIMARY KEY,
    response    TEXT NOT NULL
) WITHOUT ROWID;

-- Outgoing PDUs and EDUs waiting for a destination.
CREATE TABLE outbox (
    id           INTEGER PRIMARY KEY,
    destination  TEXT NOT NULL,
    kind         TEXT NOT NULL,              -- 'pdu' | 'edu'
    payload      TEXT NOT NULL               -- event id for pdus, JSON for edus
);
CREATE INDEX outbox_destination ON outbox(destination, id);

-- Servers that failed lately. catch_up_from: set once one keeps failing (no PDUs are queued for it then); when
-- it answers again it gets the latest event we sent after this stream position in each room it shares with us.
CREATE TABLE destinations (
    destination   TEXT PRIMARY KEY,
    failures      INTEGER NOT NULL DEFAULT 0,
    retry_at      INTEGER NOT NULL DEFAULT 0,
    catch_up_from INTEGER
) WITHOUT ROWID;

-- Servers known to be in a partial-state room (from send_join's servers_in_room) until resync completes.
CREATE TABLE partial_state_servers (
    room_nid    INTEGER NOT NULL,
    server_name TEXT NOT NULL,
    PRIMARY KEY (room_nid, server_name)
) WITHOUT ROWID;

-- A partial-state room's full state ids (from /state_ids) while the resync job fetches what is missing.
CREATE TABLE resync_state (
    room_nid  INTEGER NOT NULL,
    event_id  TEXT NOT NULL,
    missing   INTEGER NOT NULL,              -- 1: not stored when the ids came (fetched once in events)
    PRIMARY KEY (room_nid, event_id)
) WITHOUT ROWID;
CREATE INDEX resync_state_missing ON resync_state(room_nid, missing);

------------------------------------------------------------------------------------------------------------------
-- The persistent background job queue (one worker). `cursor` is the job's own resumable position.
CREATE TABLE jobs (
    job_id       INTEGER PRIMARY KEY,
    kind         TEXT NOT NULL,
    room_nid     INTEGER,
    priority     INTEGER NOT NULL DEFAULT 0,    -- higher runs first
    cursor       TEXT NOT NULL DEFAULT '{}',
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_run_at  INTEGER NOT NULL DEFAULT 0,
    done_units   INTEGER NOT NULL DEFAULT 0,
    total_units  INTEGER,
    created_ts   INTEGER NOT NULL,
    last_error   TEXT,
    UNIQUE (kind, room_nid)
);

------------------------------------------------------------------------------------------------------------------
-- Media. Metadata only: the files live under `media.path` (default: `media/` beside the database), one file per
-- (origin, media_id) and per thumbnail size. Local uploads have `uploader`; cached remote media has it NULL.
CREATE TABLE media (
    origin       TEXT NOT NULL,                 -- the server name of the mxc:// URI
    media_id     TEXT NOT NULL,
    uploader     TEXT,                          -- local user id; NULL for remote media cached here
    content_type TEXT,
    filename     TEXT,
    size         INTEGER,                       -- NULL: created for an async upload, content not uploaded yet
    sha256       TEXT,
    created_ts   INTEGER NOT NULL,
    authenticated INTEGER NOT NULL DEFAULT 0,   -- 1: stored while `media.freeze_legacy` was on: served only through
                                                -- the authenticated endpoints (spec v1.11), not the legacy ones
    PRIMARY KEY (origin, media_id)
) WITHOUT ROWID;
CREATE INDEX media_by_uploader ON media(uploader) WHERE uploader IS NOT NULL;
CREATE TABLE media_thumbnails (
    origin       TEXT NOT NULL,
    media_id     TEXT NOT NULL,
    width        INTEGER NOT NULL,              -- the requested (normalised) size, not the thumbnail's own
    height       INTEGER NOT NULL,
    method       TEXT NOT NULL,                 -- 'scale' | 'crop'
    content_type TEXT NOT NULL,
    size         INTEGER NOT NULL,
    PRIMARY KEY (origin, media_id, width, height, method)
) WITHOUT ROWID;

------------------------------------------------------------------------------------------------------------------
-- Server-side key backup (`/room_keys/*`): versions per user, and the encrypted session keys of each version.
CREATE TABLE room_key_backup_versions (
    user_id      TEXT NOT NULL,
    version      INTEGER NOT NULL,
    algorithm    TEXT NOT NULL,
    auth_data    TEXT NOT NULL,                 -- JSON
    etag         INTEGER NOT NULL DEFAULT 0,    -- bumped whenever the version's keys change
    deleted      INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, version)
) WITHOUT ROWID;
CREATE TABLE room_key_backup (
    user_id              TEXT NOT NULL,
    version              INTEGER NOT NULL,
    room_id              TEXT NOT NULL,
    session_id           TEXT NOT NULL,
    first_message_index  INTEGER NOT NULL,
    forwarded_count      INTEGER NOT NULL,
    is_verified          INTEGER NOT NULL,
    session_data         TEXT NOT NULL,         -- JSON
    PRIMARY KEY (user_id, version, room_id, session_id)
) WITHOUT ROWID;

------------------------------------------------------------------------------------------------------------------
-- Relations (`content.m.relates_to`) of stored events, one row per relating event (written when the event is
-- stored, removed when it is redacted): /relations, /threads, bundled aggregations, thread-aware notification counts.
CREATE TABLE event_relations (
    event_nid   INTEGER PRIMARY KEY,            -- the relating (child) event
    room_nid    INTEGER NOT NULL,
    relates_to  TEXT NOT NULL,                  -- the parent's event id
    rel_type    TEXT NOT NULL,
    agg_key     TEXT                            -- m.annotation key
);
CREATE INDEX event_relations_parent ON event_relations(relates_to, rel_type);

-- Full-text index of searchable event fields (`POST /search`): rowid = event_nid; `key` is `content.body`,
-- `content.name` or `content.topic`. Written when the event is stored, removed when it is redacted.
CREATE VIRTUAL TABLE event_search USING fts5(key UNINDEXED, value, tokenize = 'porter unicode61');

------------------------------------------------------------------------------------------------------------------
-- Administration (`hearth token ...`, `hearth room block`).
-- Registration tokens: registration with `m.login.registration_token` accepts one while it has uses left and has
-- not expired; each account created with it counts one use.
CREATE TABLE registration_tokens (
    token         TEXT PRIMARY KEY,
    uses_allowed  INTEGER,                      -- NULL: unlimited
    completed     INTEGER NOT NULL DEFAULT 0,   -- accounts registered with it
    expiry_ts     INTEGER,                      -- NULL: never expires
    created_ts    INTEGER NOT NULL
) WITHOUT ROWID;

-- Rooms an admin blocked: local users cannot join them, other servers cannot join or invite through us. By id: a
-- room need not be known here to be blocked.
CREATE TABLE blocked_rooms (
    room_id    TEXT PRIMARY KEY,
    blocked_ts INTEGER NOT NULL
) WITHOUT ROWID;

-- Simplified sliding sync (MSC4186): one row per connection (user, device, conn_id), bounded per device and
-- expired when unused; each answered request is a position of its connection, holding what the connection has
-- been sent (JSON: per room, the stream position it was sent up to and the room config it was sent with; the list
-- counts). A request names the position it continues from; older positions of the connection are dropped then.
CREATE TABLE sliding_sync_connections (
    conn_nid     INTEGER PRIMARY KEY,
    user_id      TEXT NOT NULL,
    device_id    TEXT NOT NULL,
    conn_id      TEXT NOT NULL,
    last_used_ts INTEGER NOT NULL,
    UNIQUE (user_id, device_id, conn_id)
);
CREATE INDEX sliding_sync_connections_used ON sliding_sync_connections(last_used_ts);
CREATE TABLE sliding_sync_positions (
    pos        INTEGER PRIMARY KEY AUTOINCREMENT,
    conn_nid   INTEGER NOT NULL REFERENCES sliding_sync_connections(conn_nid) ON DELETE CASCADE,
    stream     INTEGER NOT NULL,    -- the global stream position the answer went up to
    typing     INTEGER NOT NULL,    -- the typing serial it went up to
    sent       TEXT NOT NULL,       -- JSON: what the connection has been sent
    created_ts INTEGER NOT NULL
);
CREATE INDEX sliding_sync_positions_conn ON sliding_sync_positions(conn_nid);

-- Pushers (`POST /pushers/set`): HTTP pushers only; `device_id` is the device whose token set it (a password change
-- removes the others, a logout its own). `failures`/`retry_at`: the delivery backoff.
CREATE TABLE pushers (
    pusher_nid INTEGER PRIMARY KEY, user_id TEXT NOT NULL, device_id TEXT, kind TEXT NOT NULL, app_id TEXT NOT NULL,
    pushkey TEXT NOT NULL, app_display_name TEXT NOT NULL, device_display_name TEXT NOT NULL, profile_tag TEXT,
    lang TEXT NOT NULL, data TEXT NOT NULL, pushkey_ts INTEGER NOT NULL, failures INTEGER NOT NULL DEFAULT 0,
    retry_at INTEGER NOT NULL DEFAULT 0, UNIQUE (user_id, app_id, pushkey)
);
CREATE INDEX pushers_key ON pushers(app_id, pushkey);
-- Notifications waiting for a pusher's gateway, oldest first (capped per pusher).
CREATE TABLE push_outbox (
    id INTEGER PRIMARY KEY, pusher_nid INTEGER NOT NULL REFERENCES pushers(pusher_nid) ON DELETE CASCADE,
    event_id TEXT NOT NULL, highlight INTEGER NOT NULL, sound TEXT
);
CREATE INDEX push_outbox_pusher ON push_outbox(pusher_nid, id);
-- What each local user's push rules said to notify about (`GET /notifications`), by the event's stream position.
CREATE TABLE notifications (
    user_id TEXT NOT NULL, stream INTEGER NOT NULL, event_id TEXT NOT NULL, room_nid INTEGER NOT NULL,
    highlight INTEGER NOT NULL, actions TEXT NOT NULL, ts INTEGER NOT NULL, PRIMARY KEY (user_id, stream)
) WITHOUT ROWID;
-- Unread notifications of each local user: what their push rules said to notify about and they have not read yet,
-- by room and thread (`main` or the thread root's id). A read receipt (or the user's own event) deletes what it
-- reads, leaving the room deletes the room's: the table is bounded by what is unread, not by a count, so the
-- counts in `/sync` never depend on the cap of `notifications`.
CREATE TABLE unread_notifications (
    user_id TEXT NOT NULL, room_nid INTEGER NOT NULL, stream INTEGER NOT NULL, thread_id TEXT NOT NULL,
    highlight INTEGER NOT NULL, PRIMARY KEY (user_id, room_nid, stream)
) WITHOUT ROWID;
-- The stream position up to which events have been run through the push rules.
CREATE TABLE push_cursor (id INTEGER PRIMARY KEY CHECK (id = 0), stream INTEGER NOT NULL);
INSERT INTO push_cursor (id, stream) VALUES (0, 0);
-- Application services: each one's position in the event stream (events up to it were put into transactions),
-- its transaction ids and its backoff. A service new to the server starts at the latest event.
CREATE TABLE appservice_state (
    appservice_id TEXT PRIMARY KEY, stream INTEGER NOT NULL, last_txn_id INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0, retry_at INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
-- Transactions written before they are sent (a retry sends the same txn id and body), deleted on a 2xx.
CREATE TABLE appservice_txns (
    appservice_id TEXT NOT NULL, txn_id INTEGER NOT NULL, body TEXT NOT NULL, PRIMARY KEY (appservice_id, txn_id)
) WITHOUT ROWID;
-- Rooms an application service published in its network's room directory (PUT /directory/list/appservice).
CREATE TABLE appservice_room_list (
    appservice_id TEXT NOT NULL, network_id TEXT NOT NULL, room_id TEXT NOT NULL,
    PRIMARY KEY (appservice_id, network_id, room_id)
) WITHOUT ROWID;

-- Content reports (`/rooms/{id}/report/{eventId}`, `/rooms/{id}/report`, `/users/{id}/report`), listed by
-- `hearth report list`. `kind` is 'event', 'room' or 'user'.
CREATE TABLE reports (
    report_id    INTEGER PRIMARY KEY,
    received_ts  INTEGER NOT NULL,
    reporter     TEXT NOT NULL,
    kind         TEXT NOT NULL,
    room_id      TEXT,
    event_id     TEXT,
    target_user  TEXT,
    reason       TEXT,
    score        INTEGER
);

-- OpenID tokens (`/user/{id}/openid/request_token`): another server's `/openid/userinfo` exchanges one for the
-- user id until it expires.
CREATE TABLE openid_tokens (
    token       TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL,
    expires_ts  INTEGER NOT NULL
) WITHOUT ROWID;

-- Link previews (`/preview_url`): the Open Graph answer per URL, kept until `expires_ts`.
CREATE TABLE url_previews (
    url         TEXT PRIMARY KEY,
    og          TEXT NOT NULL,
    expires_ts  INTEGER NOT NULL
) WITHOUT ROWID;

-- Peeking over federation (MSC2444, unstable). Resident side: other servers following one of our world-readable
-- rooms without a member in it; they get its new events until `expires_ts` (renewed by a new PUT) or a DELETE.
CREATE TABLE peeks_in (
    room_nid    INTEGER NOT NULL,
    server_name TEXT NOT NULL,
    peek_id     TEXT NOT NULL,
    expires_ts  INTEGER NOT NULL,
    PRIMARY KEY (room_nid, server_name, peek_id)
) WITHOUT ROWID;
CREATE INDEX peeks_in_server ON peeks_in(server_name);

-- Peeking side: a remote room we follow through `server_name` for local users (no local member), renewed at
-- `renew_ts` while anyone in `local_peeks` looks at it.
CREATE TABLE peeks_out (
    room_nid    INTEGER PRIMARY KEY,
    server_name TEXT NOT NULL,
    peek_id     TEXT NOT NULL,
    renew_ts    INTEGER NOT NULL
);

-- Local users peeking a room (MSC2753), remote or not; `stream` is the position the peek began at (its first
-- /sync shows the room whole).
CREATE TABLE local_peeks (
    user_id     TEXT NOT NULL,
    room_nid    INTEGER NOT NULL,
    stream      INTEGER NOT NULL,
    PRIMARY KEY (user_id, room_nid)
) WITHOUT ROWID;
CREATE INDEX local_peeks_room ON local_peeks(room_nid);
