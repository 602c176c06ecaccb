//! The job `hearth user deactivate` queues: the server's worker finishes the deactivation with the same domain code
//! as `POST /account/deactivate` (devices, account data, presence, leaving every room, telling other servers),
//! which needs the room core and the federation sender of a running server.

use std::sync::Arc;

use serde::Deserialize;

use crate::error::Error;
use crate::http::AppState;
use crate::jobs::{JobKind, JobRow, Step, StepFuture};

/// The job kind (the `kind` column).
pub const DEACTIVATE: &str = "admin.deactivate";

#[derive(Deserialize)]
struct Cursor {
    user_id: String,
    #[serde(default)]
    erase: bool,
}

/// The runner, registered by the wiring.
pub fn deactivate_kind(s: AppState) -> Arc<dyn JobKind> {
    Arc::new(Deactivate(s))
}

struct Deactivate(AppState);

impl JobKind for Deactivate {
    fn step(&self, job: JobRow, _batch: usize) -> StepFuture {
        let s = self.0.clone();
        Box::pin(async move {
            let c: Cursor = serde_json::from_str(&job.cursor)
                .map_err(|e| Error::internal(format!("unreadable deactivation job: {e}")))?;
            let user_id = ruma::UserId::parse(&c.user_id)
                .map_err(|e| Error::internal(format!("deactivation job names a bad user id: {e}")))?;
            crate::client::account::deactivate_account(&s, &user_id, c.erase).await?;
            Ok(Step::Done)
        })
    }
}
