//! Operations endpoints: `GET /_hearth/health` (always on, no auth) for probes, and Prometheus `GET /metrics`
//! (only with `metrics.enabled = true`, on the client listener, no auth: keep it off the internet), showing the
//! request counts of [`crate::metrics::Metrics`] (recorded by `server::track`). Database, outbox and job gauges
//! are read from SQLite at scrape time.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::http::AppState;
use crate::metrics::{wal_path, BUCKETS};
use crate::store::maintenance;
use crate::store::Db;

/// `GET /_hearth/health`: 200 `{"status":"ok","database":"ok",...}` when a database read succeeds within 5 s, else
/// 503 with the error. No authentication.
pub async fn health(State(s): State<AppState>) -> Response {
    let check = s.store.read(maintenance::ping);
    let database = match tokio::time::timeout(Duration::from_secs(5), check).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out after 5 s".to_owned()),
    };
    let stopping = *s.shutdown.borrow();
    let ok = database.is_ok() && !stopping;
    let body = json!({
        "status": if ok { "ok" } else if stopping { "stopping" } else { "error" },
        "database": match &database { Ok(()) => "ok".to_owned(), Err(e) => format!("error: {e}") },
        "server_name": s.identity.server_name.as_str(),
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": s.metrics.uptime().as_secs(),
    });
    let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, [(header::CACHE_CONTROL, "no-store")], axum::Json(body)).into_response()
}

/// Gauges read from the database at scrape time.
struct DbStats {
    gauges: maintenance::Gauges,
    jobs: Vec<serde_json::Value>,
}

fn db_stats(c: Db<'_>) -> crate::error::Result<DbStats> {
    Ok(DbStats { gauges: maintenance::gauges(c)?, jobs: crate::jobs::progress(c)? })
}

/// Escapes a Prometheus label value.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// `GET /metrics` in the Prometheus text format (404 unless `metrics.enabled`).
pub async fn metrics(State(s): State<AppState>) -> Response {
    if !s.config.metrics.enabled {
        return crate::error::Error::unrecognized("metrics are disabled (metrics.enabled = false)").into_response();
    }
    let db = match s.store.read(db_stats).await {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::warn!(error = %e, "metrics: database statistics unavailable");
            None
        }
    };
    let mut out = String::with_capacity(16 * 1024);

    header(&mut out, "hearth_build_info", "gauge", "Version of the running server.");
    let _ = writeln!(out, "hearth_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
    header(&mut out, "hearth_uptime_seconds", "gauge", "Seconds since the server started.");
    let _ = writeln!(out, "hearth_uptime_seconds {:.3}", s.metrics.uptime().as_secs_f64());
    header(
        &mut out,
        "hearth_http_requests_in_flight",
        "gauge",
        "Client requests being handled (long-polling /sync excluded).",
    );
    let _ = writeln!(out, "hearth_http_requests_in_flight {}", s.busy.load(std::sync::atomic::Ordering::Relaxed));
    header(&mut out, "hearth_stream_position", "gauge", "Highest committed position of the event stream.");
    let _ = writeln!(out, "hearth_stream_position {}", s.store.current_stream());

    {
        let routes = s.metrics.routes.lock().unwrap_or_else(|e| e.into_inner());
        header(
            &mut out,
            "hearth_http_requests_total",
            "counter",
            "HTTP requests answered, by route group, route, method and status class.",
        );
        for ((group, route, method), st) in routes.iter() {
            for (class, n) in &st.by_status {
                let _ = writeln!(
                    out,
                    "hearth_http_requests_total{{group=\"{group}\",route=\"{}\",method=\"{method}\",status=\"{class}\"}} {n}",
                    esc(route)
                );
            }
        }
        header(
            &mut out,
            "hearth_http_request_duration_seconds",
            "histogram",
            "Time to answer HTTP requests, by route group, route and method.",
        );
        for ((group, route, method), st) in routes.iter() {
            let labels = format!("group=\"{group}\",route=\"{}\",method=\"{method}\"", esc(route));
            let mut cumulative = 0;
            for (i, le) in BUCKETS.iter().enumerate() {
                cumulative += st.buckets[i];
                let _ =
                    writeln!(out, "hearth_http_request_duration_seconds_bucket{{{labels},le=\"{le}\"}} {cumulative}");
            }
            let _ = writeln!(out, "hearth_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}", st.count);
            let _ = writeln!(out, "hearth_http_request_duration_seconds_sum{{{labels}}} {:.6}", st.sum_seconds);
            let _ = writeln!(out, "hearth_http_request_duration_seconds_count{{{labels}}} {}", st.count);
        }
    }

    {
        let served = s.fed_requests.lock().unwrap_or_else(|e| e.into_inner());
        header(
            &mut out,
            "hearth_federation_requests_served_total",
            "counter",
            "Federation requests served on the federation listener, by endpoint.",
        );
        for (endpoint, n) in served.iter() {
            let _ = writeln!(out, "hearth_federation_requests_served_total{{endpoint=\"{}\"}} {n}", esc(endpoint));
        }
    }

    if let Some(db) = db {
        header(
            &mut out,
            "hearth_database_size_bytes",
            "gauge",
            "Size of the SQLite database (page_count * page_size; the WAL file is extra).",
        );
        let _ = writeln!(out, "hearth_database_size_bytes {}", db.gauges.size_bytes);
        header(&mut out, "hearth_database_free_bytes", "gauge", "Unused pages inside the database file, in bytes.");
        let _ = writeln!(out, "hearth_database_free_bytes {}", db.gauges.freelist_pages * db.gauges.page_size);
        let wal = std::fs::metadata(wal_path(&s.config.database.path)).map(|m| m.len()).unwrap_or(0);
        header(&mut out, "hearth_database_wal_bytes", "gauge", "Size of the SQLite write-ahead log file.");
        let _ = writeln!(out, "hearth_database_wal_bytes {wal}");
        header(&mut out, "hearth_federation_outbox_depth", "gauge", "PDUs and EDUs queued for other servers.");
        let _ = writeln!(out, "hearth_federation_outbox_depth {}", db.gauges.outbox_depth);
        header(&mut out, "hearth_federation_outbox_destinations", "gauge", "Servers with queued federation traffic.");
        let _ = writeln!(out, "hearth_federation_outbox_destinations {}", db.gauges.outbox_destinations);
        header(&mut out, "hearth_users", "gauge", "Local user accounts.");
        let _ = writeln!(out, "hearth_users {}", db.gauges.users);
        header(&mut out, "hearth_rooms", "gauge", "Rooms known to this server.");
        let _ = writeln!(out, "hearth_rooms {}", db.gauges.rooms);

        let mut by_kind: BTreeMap<String, i64> = BTreeMap::new();
        for j in &db.jobs {
            *by_kind.entry(j["kind"].as_str().unwrap_or("?").to_owned()).or_default() += 1;
        }
        header(&mut out, "hearth_jobs", "gauge", "Background jobs queued or running, by kind.");
        for (kind, n) in &by_kind {
            let _ = writeln!(out, "hearth_jobs{{kind=\"{}\"}} {n}", esc(kind));
        }
        header(&mut out, "hearth_job_done_units", "gauge", "Units (events) a background job has done.");
        for j in &db.jobs {
            let _ = writeln!(out, "hearth_job_done_units{{{}}} {}", job_labels(j), j["done"].as_i64().unwrap_or(0));
        }
        header(&mut out, "hearth_job_total_units", "gauge", "Units (events) a background job has in all, once known.");
        for j in db.jobs.iter().filter(|j| j["total"].is_i64()) {
            let _ = writeln!(out, "hearth_job_total_units{{{}}} {}", job_labels(j), j["total"].as_i64().unwrap_or(0));
        }
        header(&mut out, "hearth_job_attempts", "gauge", "Failed attempts of a background job's current step.");
        for j in &db.jobs {
            let _ = writeln!(out, "hearth_job_attempts{{{}}} {}", job_labels(j), j["attempts"].as_i64().unwrap_or(0));
        }
    }

    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], out).into_response()
}

fn job_labels(j: &serde_json::Value) -> String {
    format!(
        "kind=\"{}\",room_id=\"{}\"",
        esc(j["kind"].as_str().unwrap_or("?")),
        esc(j["room_id"].as_str().unwrap_or(""))
    )
}
