//! The federation listener: TLS handshakes run concurrently (a slow client never blocks other connections'
//! accepts), and [`serve`] bounds how long a connection may sit on the server: the handshake, a request's
//! headers, its body, and the time between requests are all timed out (slow-loris protection).

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

pub fn load_acceptor(cert: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| anyhow::anyhow!("reading {}: {e}", key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The TLS handshake must finish within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A request's headers must arrive within this (HTTP/1: also the longest wait for the next request).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(15);
/// A connection with no request in progress for this long is closed (HTTP/2, and any stall between requests).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A request body must keep coming: at most this between two chunks...
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(15);
/// ... and all of it within this.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(60);

pub struct TlsListener {
    local: SocketAddr,
    rx: mpsc::Receiver<(TlsStream<tokio::net::TcpStream>, SocketAddr)>,
}

impl TlsListener {
    pub fn new(tcp: TcpListener, acceptor: TlsAcceptor) -> io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (stream, addr) = match tcp.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "federation accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    return;
                }
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let hs = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
                    match hs {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, addr)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%addr, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%addr, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { local, rx })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(x) => x,
            // The acceptor task only ends when we are dropped; park forever otherwise.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// A request body that stopped arriving in time ([`BODY_IDLE_TIMEOUT`], [`BODY_TIMEOUT`]).
#[derive(Debug)]
pub struct BodyTimeout;

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body did not arrive in time")
    }
}

impl std::error::Error for BodyTimeout {}

/// Whether `e` (or an error it wraps) is a [`BodyTimeout`].
pub fn is_body_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if e.is::<BodyTimeout>() {
            return true;
        }
        cur = e.source();
    }
    false
}

/// Wraps a request body so that reading it fails with [`BodyTimeout`] when it stalls.
fn timed_body(body: hyper::body::Incoming) -> axum::body::Body {
    let deadline = Instant::now() + BODY_TIMEOUT;
    let stream = axum::body::Body::new(body).into_data_stream();
    let timed = futures::stream::unfold(Some(stream), move |st| async move {
        let mut st = st?;
        let until = (Instant::now() + BODY_IDLE_TIMEOUT).min(deadline);
        match tokio::time::timeout_at(until, st.next()).await {
            Ok(Some(Ok(b))) => Some((Ok(b), Some(st))),
            Ok(Some(Err(e))) => Some((Err(Box::new(e) as Box<dyn std::error::Error + Send + Sync>), None)),
            Ok(None) => None,
            Err(_) => Some((Err(Box::new(BodyTimeout) as Box<dyn std::error::Error + Send + Sync>), None)),
        }
    });
    axum::body::Body::from_stream(timed)
}

/// Requests in progress on one connection and when the last one started or ended.
struct Activity {
    in_flight: AtomicUsize,
    last: Mutex<Instant>,
}

impl Activity {
    fn touch(&self) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    /// Returns once no request has been in progress for `idle`.
    async fn idle(&self, idle: Duration) {
        loop {
            let last = *self.last.lock().unwrap_or_else(|e| e.into_inner());
            let busy = self.in_flight.load(Ordering::SeqCst) > 0;
            if !busy && last.elapsed() >= idle {
                return;
            }
            if busy {
                tokio::time::sleep(idle).await;
            } else {
                tokio::time::sleep_until(last + idle).await;
            }
        }
    }
}

struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(a: Arc<Activity>) -> InFlight {
        a.in_flight.fetch_add(1, Ordering::SeqCst);
        a.touch();
        InFlight(a)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serves `app` on the TLS listener until `shutdown` turns true, then stops accepting and waits for the
/// connections' requests in progress (the caller bounds that wait).
pub async fn serve(mut listener: TlsListener, app: axum::Router, mut shutdown: watch::Receiver<bool>) {
    use axum::serve::Listener;
    let (stop_tx, stop_rx) = watch::channel(false);
    let (close_tx, close_rx) = watch::channel(());
    loop {
        let (io, addr) = tokio::select! {
            c = listener.accept() => c,
            _ = shutdown.wait_for(|v| *v) => break,
        };
        let (app, stop, close_rx) = (app.clone(), stop_rx.clone(), close_rx.clone());
        tokio::spawn(async move {
            serve_connection(io, addr, app, stop).await;
            drop(close_rx);
        });
    }
    drop(listener);
    stop_tx.send_replace(true);
    drop(close_rx);
    close_tx.closed().await;
}

async fn serve_connection(
    io: TlsStream<tokio::net::TcpStream>,
    addr: SocketAddr,
    app: axum::Router,
    mut stop: watch::Receiver<bool>,
) {
    use tower::ServiceExt;
    let activity = Arc::new(Activity { in_flight: AtomicUsize::new(0), last: Mutex::new(Instant::now()) });
    let act = activity.clone();
    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let (app, guard) = (app.clone(), InFlight::new(act.clone()));
        async move {
            let res = app.oneshot(req.map(timed_body)).await;
            drop(guard);
            res
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder.http1().timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(10));
    let conn = builder.serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(io), svc);
    tokio::pin!(conn);
    let mut closing: Option<Instant> = None;
    loop {
        let hard_stop = async {
            match closing {
                // An idle connection asked to close gets a moment to do so cleanly, then is dropped.
                Some(at) if activity.in_flight.load(Ordering::SeqCst) == 0 => {
                    tokio::time::sleep_until(at + Duration::from_secs(2)).await
                }
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%addr, error = %e, "federation connection ended with an error");
                }
                return;
            }
            _ = stop.wait_for(|v| *v), if closing.is_none() => {
                conn.as_mut().graceful_shutdown();
                closing = Some(Instant::now());
            }
            _ = activity.idle(IDLE_TIMEOUT), if closing.is_none() => {
                tracing::debug!(%addr, "closing an idle federation connection");
                conn.as_mut().graceful_shutdown();
                closing = Some(Instant::now());
            }
            _ = hard_stop => {
                tracing::debug!(%addr, "dropping a federation connection that did not close");
                return;
            }
        }
    }
}
