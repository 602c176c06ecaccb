//! Typed numeric keys. SQLite interns room ids, event ids and (type, state_key) pairs as integers; these newtypes
//! keep one kind of key from being passed where another is meant. They convert to and from SQL as plain integers.

use rusqlite::types::{FromSql, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use serde::{Deserialize, Serialize};

macro_rules! numeric_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub i64);

        impl ToSql for $name {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                self.0.to_sql()
            }
        }

        impl FromSql for $name {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                i64::column_result(value).map($name)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

numeric_id!(
    /// `rooms.room_nid`: a room's interned id.
    RoomNid
);
numeric_id!(
    /// `events.event_nid`: an event's interned id.
    EventNid
);
numeric_id!(
    /// `state_groups.sg`: an immutable state snapshot (a root or a delta over its parent).
    StateGroup
);
numeric_id!(
    /// `state_keys.state_key_nid`: an interned (event type, state key) pair.
    StateKeyNid
);
numeric_id!(
    /// `jobs.job_id`: a row of the background job queue.
    JobId
);
numeric_id!(
    /// A position in the global stream (events, account data, receipts, to-device, device lists, memberships).
    StreamPos
);
