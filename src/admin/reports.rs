//! Content reports users sent (`hearth report list`).

use super::Admin;
use crate::store::reports::{self, ReportRow, Target};

impl Admin {
    /// The newest `limit` reports, newest first.
    pub fn list_reports(&self, limit: i64) -> anyhow::Result<Vec<ReportRow>> {
        reports::list(self.db.db(), limit.max(1)).map_err(|e| anyhow::anyhow!("{e}"))
    }
}

/// One report as a line of `hearth report list`: id, time, reporter, what, score and reason.
pub fn report_line(r: &ReportRow) -> String {
    let what = match &r.target {
        Target::Event { room_id, event_id } => format!("event {event_id} in {room_id}"),
        Target::Room { room_id } => format!("room {room_id}"),
        Target::User { user_id } => format!("user {user_id}"),
    };
    let score = r.score.map(|s| format!(" score {s}")).unwrap_or_default();
    let reason = r.reason.as_deref().filter(|s| !s.is_empty()).map(|s| format!(": {s:?}")).unwrap_or_default();
    format!("#{} {} {} reported {what}{score}{reason}", r.report_id, super::format_ts(r.received_ts), r.reporter)
}
