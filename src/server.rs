//! Wiring: open the store, load the identity, build the services, assemble the routers (with their middleware) and
//! serve the listeners and background tasks.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::{header, HeaderValue, Method};
use axum::response::IntoResponse;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;
use crate::error::Error;
use crate::federation::FedContext;
use crate::http::{AppState, RateLimiter, Services, UiaSessions};
use crate::room::typing::Typing;
use crate::room::Identity;
use crate::store::Store;

// ---- routers and middleware ------------------------------------------------------------------------------------

pub fn client_router(services: AppState) -> Router {
    let cors = tower_http::cors::CorsLayer::new()
        .allow_origin(tower_http::cors::Any)
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE, Method::OPTIONS])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::ACCEPT,
            header::HeaderName::from_static("x-requested-with"),
        ]);
    let mut routes = crate::client::routes();
    if services.config.federation.serve_on_client_listener && services.federation.is_some() {
        routes = routes.merge(crate::federation_api::routes()).merge(crate::media::federation_routes());
    } else {
        // The federation API's paths are still known here, though not served: a wrong method answers 405 and the
        // right one 404 (`M_UNRECOGNIZED` both), as on a server serving both APIs on one port.
        let not_served = crate::federation_api::routes().merge(crate::media::federation_routes()).route_layer(
            axum::middleware::from_fn(|_: axum::extract::Request, _: axum::middleware::Next| async {
                Error::unrecognized("unrecognized endpoint").into_response()
            }),
        );
        routes = routes.merge(not_served);
    }
    routes = routes.route("/_hearth/health", axum::routing::get(crate::client::metrics::health));
    if services.config.metrics.enabled {
        routes = routes.route("/metrics", axum::routing::get(crate::client::metrics::metrics));
    }
    routes
        .fallback(|| async { Error::unrecognized("unrecognized endpoint") })
        .method_not_allowed_fallback(|| async { Error::method_not_allowed() })
        .layer(cors)
        .layer(axum::middleware::map_response(json_content_type))
        .layer(axum::middleware::from_fn_with_state(services.clone(), count_busy))
        .layer(axum::middleware::from_fn_with_state(services.clone(), track))
        .with_state(services)
}

/// Counts in-flight client requests (not long-polling /sync) so background jobs can yield to users.
async fn count_busy(
    axum::extract::State(s): axum::extract::State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use std::sync::atomic::Ordering;
    if req.uri().path().ends_with("/sync") {
        // A long poll would hold up a graceful shutdown for its whole timeout: end it when shutdown begins
        // (the client retries against the restarted server).
        let mut shutdown = s.shutdown.subscribe();
        return tokio::select! {
            res = next.run(req) => res,
            _ = shutdown.wait_for(|stopping| *stopping) => {
                Error::unavailable("server is shutting down").into_response()
            }
        };
    }
    s.busy.fetch_add(1, Ordering::Relaxed);
    struct Done<'a>(&'a std::sync::atomic::AtomicUsize);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let _done = Done(&s.busy);
    next.run(req).await
}

/// The federation listener's router (TLS).
pub fn federation_router(services: AppState) -> Router {
    crate::federation_api::routes()
        .merge(crate::media::federation_routes())
        .route("/_matrix/client/versions", axum::routing::get(crate::client::account::versions))
        .route("/.well-known/matrix/server", axum::routing::get(crate::client::account::well_known_server))
        .route("/.well-known/matrix/client", axum::routing::get(crate::client::account::well_known))
        .fallback(|| async { Error::unrecognized("unrecognized endpoint") })
        .method_not_allowed_fallback(|| async { Error::method_not_allowed() })
        .layer(axum::middleware::map_response(json_content_type))
        .layer(axum::middleware::from_fn_with_state(services.clone(), count_federation))
        .layer(axum::middleware::from_fn_with_state(services.clone(), track))
        .with_state(services)
}

/// Counts served federation requests per endpoint (path without its variable parts).
async fn count_federation(
    axum::extract::State(s): axum::extract::State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let key: String = req.uri().path().split('/').filter(|p| !p.is_empty()).take(4).collect::<Vec<_>>().join("/");
    *s.fed_requests.lock().unwrap_or_else(|e| e.into_inner()).entry(key).or_default() += 1;
    next.run(req).await
}

async fn json_content_type(mut res: axum::response::Response) -> axum::response::Response {
    if !res.headers().contains_key(header::CONTENT_TYPE) {
        res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    res
}

/// Middleware: times every request and counts it by route (when `metrics.enabled`).
async fn track(
    axum::extract::State(s): axum::extract::State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if !s.config.metrics.enabled {
        return next.run(req).await;
    }
    // Unmatched paths share one label: arbitrary request paths must not grow the label set.
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().as_str().to_owned();
    let started = std::time::Instant::now();
    let res = next.run(req).await;
    s.metrics.record(&route, &method, res.status(), started.elapsed());
    res
}

/// A running server (used by `main` and by in-process tests).
pub struct Running {
    pub client_addr: SocketAddr,
    pub federation_addr: Option<SocketAddr>,
    pub services: Arc<Services>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// How long a graceful stop waits for in-flight requests and the job step in progress before cutting them off.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(20);

impl Running {
    /// Graceful stop: the listeners stop accepting and finish the requests in flight (long-polling `/sync` is
    /// answered at once), the job worker stops at its next step boundary, then every write queued so far commits
    /// and the WAL is checkpointed into the database file. Whatever is still running after [`SHUTDOWN_GRACE`] is
    /// cut off (safe: nothing uncommitted was acknowledged).
    pub async fn stop(self) {
        self.services.shutdown.send_replace(true);
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        for mut t in self.tasks {
            if tokio::time::timeout_at(deadline, &mut t).await.is_err() {
                tracing::warn!("a task did not stop within {} s; cutting it off", SHUTDOWN_GRACE.as_secs());
                t.abort();
            }
        }
        // A barrier through the writer queue: every write queued before it has committed once it returns.
        if let Err(e) = self.services.store.write(|_| Ok(())).await {
            tracing::error!(error = %e, "final write barrier failed");
        }
        let path = self.services.config.database.path.clone();
        let checkpoint = tokio::task::spawn_blocking(move || {
            crate::store::maintenance::checkpoint_file(&path, std::time::Duration::from_secs(5))
        });
        match checkpoint.await {
            Ok(Ok(())) => tracing::info!("database checkpointed; stopped cleanly"),
            Ok(Err(e)) => tracing::warn!(error = %e, "final WAL checkpoint failed (the WAL is replayed on next start)"),
            Err(e) => tracing::warn!(error = %e, "final WAL checkpoint task failed"),
        }
    }
}

/// Tells systemd about the service state (`READY=1`, `STOPPING=1`, `STATUS=...`) over `$NOTIFY_SOCKET`, as
/// `Type=notify` units expect. A no-op when the variable is unset (not started by systemd); failures are logged.
pub fn sd_notify(state: &str) {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::net::UnixDatagram;
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
        let sent = UnixDatagram::unbound().and_then(|sock| match path.as_bytes().strip_prefix(b"@") {
            // `@name`: a Linux abstract socket (what systemd uses by default).
            #[cfg(target_os = "linux")]
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                sock.send_to_addr(state.as_bytes(), &addr)
            }
            _ => sock.send_to(state.as_bytes(), &path),
        });
        if let Err(e) = sent {
            tracing::warn!(error = %e, notify_socket = ?path, "sd_notify failed");
        }
    }
    #[cfg(not(unix))]
    let _ = state;
}

/// Opens the database (creating and migrating it, and the server's identity, if needed) and builds the services.
/// Blocks: async code runs it under `spawn_blocking`.
pub fn build_services(config: Config) -> anyhow::Result<Arc<Services>> {
    let appservices = crate::appservice::Registry::load(&config.appservice.registration_files, &config.server_name)?;
    let store = Store::open(&config.database.path, config.database.readers)?;
    let identity = {
        let direct = crate::store::DirectDb::open(&config.database.path)?;
        let identity = Identity::load_or_create(direct.db(), &config.server_name)?;
        // Each application service's own user exists from the start (as in Synapse).
        for a in appservices.all() {
            crate::store::accounts::insert_user(direct.db(), &a.sender, None, false)?;
        }
        identity
    };
    let federation = if config.federation.enabled {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = Arc::new(crate::federation::FedClient::new(identity.clone(), config.federation.clone())?);
        let keys = crate::federation::KeyStore::new(
            store.clone(),
            client.clone(),
            identity.clone(),
            config.federation.trusted_key_servers.clone(),
        );
        Some(crate::federation::Federation { client, keys: Arc::new(keys) })
    } else {
        None
    };
    let media = crate::media_repo::MediaRepo::new(config.media.dir(&config.database.path), &config.media)?;
    let config = Arc::new(config);
    let typing = Arc::new(Typing::default());
    let presence = Arc::new(crate::room::presence::Presence::new(
        config.presence.enabled,
        federation.is_some(),
        identity.server_name.as_str(),
    ));
    let jobs = crate::jobs::Jobs::default();
    let fed = Arc::new(FedContext {
        config: config.clone(),
        store: store.clone(),
        identity: identity.clone(),
        federation: federation.clone(),
        typing: typing.clone(),
        presence: presence.clone(),
        jobs: jobs.clone(),
        device_resyncs: Default::default(),
    });
    Ok(Arc::new(Services {
        login_limiter: RateLimiter::new(
            config.limits.login_failures_per_minute as f64 / 60.0,
            config.limits.login_failures_per_minute as f64,
        ),
        login_attempt_limiter: RateLimiter::new(config.limits.logins_per_second, config.limits.logins_burst.into()),
        registration_limiter: RateLimiter::new(
            config.limits.registrations_per_second,
            config.limits.registrations_burst.into(),
        ),
        message_limiter: RateLimiter::new(config.limits.messages_per_second, config.limits.messages_burst.into()),
        join_limiter: RateLimiter::new(config.limits.joins_per_second, config.limits.joins_burst.into()),
        // As many checks as registrations may be attempted, with a little slack for typos.
        token_validity_limiter: RateLimiter::new(
            config.limits.registrations_per_second * 2.0,
            (config.limits.registrations_burst * 2).into(),
        ),
        config,
        store,
        identity,
        typing,
        presence,
        uia: UiaSessions::default(),
        federation,
        fed,
        jobs,
        busy: std::sync::atomic::AtomicUsize::new(0),
        fed_requests: Default::default(),
        client_addr: std::sync::OnceLock::new(),
        sent_members: Default::default(),
        hierarchy_sessions: Default::default(),
        state_answers: Default::default(),
        appservices: Arc::new(appservices),
        metrics: Default::default(),
        shutdown: watch::channel(false).0,
        media,
    }))
}

/// Starts the listeners; returns once they are bound.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let services = tokio::task::spawn_blocking(move || build_services(config)).await??; // opens and migrates the database
    let shutdown_rx = services.shutdown.subscribe();
    let addr = services.config.listen.client;
    let listener =
        TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("cannot listen on {addr} (listen.client): {e}"))?;
    let client_addr = listener.local_addr()?;
    let _ = services.client_addr.set(client_addr);
    // Every listener is bound before any answers: a client (or a test harness) that sees the client API up may
    // at once tell another server to reach us over federation.
    let mut federation_listener = None;
    if services.federation.is_some() {
        if let Some(addr) = services.config.listen.federation {
            let cfg = &services.config.federation;
            let (cert, key) = match (&cfg.tls_cert, &cfg.tls_key) {
                (Some(c), Some(k)) => (c.clone(), k.clone()),
                _ => anyhow::bail!("listen.federation is set but federation.tls_cert / federation.tls_key are not"),
            };
            let acceptor = crate::federation::tls::load_acceptor(&cert, &key)?;
            let tcp = TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (listen.federation): {e}"))?;
            federation_listener = Some(crate::federation::tls::TlsListener::new(tcp, acceptor)?);
        }
    }
    let federation_addr = federation_listener.as_ref().map(axum::serve::Listener::local_addr).transpose()?;
    let app = client_router(services.clone());
    let mut rx = shutdown_rx.clone();
    let server = tokio::spawn(async move {
        let result = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(async move {
                let _ = rx.wait_for(|v| *v).await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "client listener failed");
        }
    });
    let mut tasks = vec![server];
    if services.federation.is_some() {
        if let Some(listener) = federation_listener {
            let app = federation_router(services.clone());
            tasks.push(tokio::spawn(crate::federation::tls::serve(listener, app, shutdown_rx.clone())));
        }
        tasks.push(tokio::spawn(crate::federation::sender::run(services.fed.clone(), shutdown_rx.clone())));
        tasks.push(tokio::spawn(crate::federation::peek::run(services.fed.clone(), shutdown_rx.clone())));
    }
    let worker = crate::jobs::WorkerConfig {
        store: services.store.clone(),
        jobs: services.jobs.clone(),
        duty_cycle: services.config.jobs.duty_cycle,
        step: std::time::Duration::from_millis(services.config.jobs.step_ms.max(1)),
        database_path: services.config.database.path.clone(),
        users_active: Box::new({
            let s = services.clone();
            move || s.busy.load(std::sync::atomic::Ordering::Relaxed) > 0
        }),
    };
    let kinds = crate::jobs::Registry::default()
        .with(crate::room::partial::RESYNC_JOB, crate::federation::resync::job_kind(services.fed.clone()))
        .with(crate::admin::job::DEACTIVATE, crate::admin::job::deactivate_kind(services.clone()));
    tasks.push(tokio::spawn(crate::jobs::run_worker(worker, kinds, shutdown_rx.clone())));
    tasks.push(tokio::spawn(crate::client::push::run(services.clone(), shutdown_rx.clone())));
    tasks.push(tokio::spawn(crate::client::appservice::run(services.clone(), shutdown_rx.clone())));
    tasks.push(tokio::spawn(services.presence.clone().run(services.store.clone(), shutdown_rx.clone())));
    tracing::info!(%client_addr, ?federation_addr, server_name = %services.identity.server_name, "hearth listening");
    Ok(Running { client_addr, federation_addr, services, tasks })
}
