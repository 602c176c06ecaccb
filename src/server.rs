//! Wiring: open the store, load the identity, build the services and serve the listeners.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::client::ephemeral::Typing;
use crate::config::Config;
use crate::http::{RateLimiter, UiaSessions};
use crate::room::Identity;
use crate::store::Store;

/// What request handlers and background tasks need. Passed explicitly (axum state), never global.
pub struct Services {
    pub config: Arc<Config>,
    pub store: Store,
    pub identity: Arc<Identity>,
    pub typing: Typing,
    /// Failed logins, per user id and per address.
    pub login_limiter: RateLimiter,
    /// Every login attempt, per address.
    pub login_attempt_limiter: RateLimiter,
    /// Accounts created, per address.
    pub registration_limiter: RateLimiter,
    /// `/send`, per user.
    pub message_limiter: RateLimiter,
    /// Joins, per user.
    pub join_limiter: RateLimiter,
    pub uia: UiaSessions,
    /// None when `federation.enabled = false`.
    pub federation: Option<crate::federation::Federation>,
    pub jobs: crate::jobs::Jobs,
    /// Client requests being handled right now (long-polling /sync excluded): the job worker runs at full speed
    /// only when this is zero.
    pub busy: std::sync::atomic::AtomicUsize,
    /// Federation requests served, by endpoint (for `/_hearth/admin/v1/stats` and the benchmark).
    pub fed_requests: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    /// Request counts and latencies for `/metrics`.
    pub metrics: crate::metrics::Metrics,
    /// Set to true once shutdown begins (listeners stop accepting, long polls end, the job worker stops).
    pub shutdown: watch::Sender<bool>,
    /// The media folder and in-flight remote media fetches.
    pub media: crate::media::MediaRepo,
    /// The client listener's bound address (differs from the configured one when that used port 0).
    pub client_addr: std::sync::OnceLock<SocketAddr>,
    /// Lazy-loaded member events already sent per device (`include_redundant_members`).
    pub sent_members: crate::client::sync::SentMembers,
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
    let store = Store::open(&config.database.path, config.database.readers)?;
    let identity = {
        let conn = rusqlite::Connection::open(&config.database.path)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        Identity::load_or_create(&conn, &config.server_name)?
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
        Some(crate::federation::Federation { client, keys })
    } else {
        None
    };
    let media = crate::media::MediaRepo::new(config.media.dir(&config.database.path))?;
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
        config: Arc::new(config),
        store,
        identity,
        typing: Typing::default(),
        uia: UiaSessions::default(),
        federation,
        jobs: crate::jobs::Jobs::default(),
        busy: std::sync::atomic::AtomicUsize::new(0),
        fed_requests: Default::default(),
        client_addr: std::sync::OnceLock::new(),
        sent_members: Default::default(),
        metrics: Default::default(),
        shutdown: watch::channel(false).0,
        media,
    }))
}

/// Starts the listeners; returns once they are bound.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let services = tokio::task::spawn_blocking(move || build_services(config)).await??; // opens and migrates the database
    let shutdown_rx = services.shutdown.subscribe();
    let listener = TcpListener::bind(services.config.listen.client).await?;
    let client_addr = listener.local_addr()?;
    let _ = services.client_addr.set(client_addr);
    let app = crate::http::client_router(services.clone());
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
    let mut federation_addr = None;
    if services.federation.is_some() {
        if let Some(addr) = services.config.listen.federation {
            let cfg = &services.config.federation;
            let (cert, key) = match (&cfg.tls_cert, &cfg.tls_key) {
                (Some(c), Some(k)) => (c.clone(), k.clone()),
                _ => anyhow::bail!("listen.federation is set but federation.tls_cert / federation.tls_key are not"),
            };
            let acceptor = crate::federation::tls::load_acceptor(&cert, &key)?;
            let tcp = TcpListener::bind(addr).await?;
            federation_addr = Some(tcp.local_addr()?);
            let listener = crate::federation::tls::TlsListener::new(tcp, acceptor)?;
            let app = crate::http::federation_router(services.clone());
            tasks.push(tokio::spawn(crate::federation::tls::serve(listener, app, shutdown_rx.clone())));
        }
        tasks.push(tokio::spawn(crate::federation::sender::run(services.clone(), shutdown_rx.clone())));
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
        .with(crate::room::partial::RESYNC_JOB, crate::federation::resync::job_kind(services.clone()));
    tasks.push(tokio::spawn(crate::jobs::run_worker(worker, kinds, shutdown_rx.clone())));
    tracing::info!(%client_addr, ?federation_addr, server_name = %services.identity.server_name, "hearth listening");
    Ok(Running { client_addr, federation_addr, services, tasks })
}
