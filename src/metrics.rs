//! Request metrics, kept in memory per route (the matched path template, so ids never become labels) and route
//! group. The endpoints that show them (`/metrics`, `/_hearth/health`) and the middleware that records them are in
//! `client::metrics`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::StatusCode;

/// Upper bounds (seconds) of the request latency histogram buckets.
pub const BUCKETS: [f64; 14] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

#[derive(Default)]
pub struct RouteStats {
    /// Responses by status class ("2xx", "4xx", ...).
    pub by_status: BTreeMap<&'static str, u64>,
    /// Cumulative counts per bucket of [`BUCKETS`] (Prometheus `le` semantics are applied when rendering).
    pub buckets: [u64; BUCKETS.len()],
    pub count: u64,
    pub sum_seconds: f64,
}

/// In-memory request metrics.
pub struct Metrics {
    started: Instant,
    /// (group, route, method) -> stats.
    pub routes: Mutex<BTreeMap<(&'static str, String, String), RouteStats>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics { started: Instant::now(), routes: Mutex::default() }
    }
}

/// The coarse group of a route template: separates long-polling sync and federation from the rest.
pub fn route_group(route: &str) -> &'static str {
    if route.starts_with("/_matrix/media") || route.contains("/v1/media/") {
        "media"
    } else if route.starts_with("/_matrix/client/") && route.ends_with("/sync") {
        "client_sync"
    } else if route.starts_with("/_matrix/client/") {
        "client"
    } else if route.starts_with("/_matrix/federation") || route.starts_with("/_matrix/key") {
        "federation"
    } else if route.starts_with("/_hearth/") {
        "hearth"
    } else if route.starts_with("/.well-known/") {
        "well_known"
    } else if route == "/metrics" {
        "metrics"
    } else {
        "other"
    }
}

fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

impl Metrics {
    pub fn record(&self, route: &str, method: &str, status: StatusCode, took: Duration) {
        let group = route_group(route);
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        let stats = routes.entry((group, route.to_owned(), method.to_owned())).or_default();
        *stats.by_status.entry(status_class(status)).or_default() += 1;
        let secs = took.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            stats.buckets[i] += 1;
        }
        stats.count += 1;
        stats.sum_seconds += secs;
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }
}

/// `hearth.db` -> `hearth.db-wal`.
pub fn wal_path(db: &std::path::Path) -> std::path::PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push("-wal");
    s.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_and_histogram() {
        assert_eq!(route_group("/_matrix/client/v3/sync"), "client_sync");
        assert_eq!(route_group("/_matrix/client/v3/rooms/{room_id}/send/{event_type}/{txn_id}"), "client");
        assert_eq!(route_group("/_matrix/federation/v1/send/{txn_id}"), "federation");
        assert_eq!(route_group("/_matrix/media/v3/upload"), "media");
        assert_eq!(route_group("/_matrix/client/v1/media/download/{server_name}/{media_id}"), "media");
        assert_eq!(route_group("/_hearth/health"), "hearth");
        let m = Metrics::default();
        m.record("/x", "GET", StatusCode::OK, Duration::from_millis(3));
        m.record("/x", "GET", StatusCode::NOT_FOUND, Duration::from_secs(100));
        let routes = m.routes.lock().unwrap();
        let st = &routes[&("other", "/x".to_owned(), "GET".to_owned())];
        assert_eq!(st.count, 2);
        assert_eq!(st.buckets[1], 1, "3 ms falls in the 5 ms bucket");
        assert_eq!(st.buckets.iter().sum::<u64>(), 1, "100 s is only in +Inf");
        assert_eq!(st.by_status["2xx"], 1);
        assert_eq!(st.by_status["4xx"], 1);
    }
}
