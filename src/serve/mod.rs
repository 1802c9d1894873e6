//! `specauf serve`: an OpenAI-compatible HTTP server over the one decode loop.
//!
//! Split by responsibility:
//! - [`load`]: the target, its tokenizer and the drafter, loaded once and checked together;
//! - [`api`]: the OpenAI wire format, request validation and the typed errors;
//! - [`engine`]: the decode thread that owns the target and steps every active request;
//! - [`http`]: routes, authentication, SSE, request → job → response;
//! - [`text`]: output tokens → text deltas with stop sequences;
//! - [`metrics`]: the Prometheus registry behind `/metrics`;
//! - [`loadgen`]: the load generator of `specauf bench serve`.
//!
//! # Invariants
//!
//! - At T = 0 a request's text is exactly `specauf generate`'s for the same prompt: every
//!   request is a [`crate::spec::Generation`] with its own KV cache and proposer, stepped by
//!   the same code as `generate`.
//! - Memory is bounded: at most `max_concurrency` requests hold a KV cache, at most `max_queue`
//!   wait; the next one gets a 503.
//! - A request whose client is gone is dropped before its next cycle.
//! - Shutdown (the future given to [`serve`]) stops accepting, lets in-flight requests run for
//!   `shutdown_grace`, then cancels what is left and returns.

pub mod api;
pub mod engine;
pub mod http;
pub mod load;
pub mod loadgen;
pub mod metrics;
pub mod text;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub use api::ApiError;
pub use load::{load, DrafterTemplate, Served, ServeLoadError};

use engine::{EngineConfig, EngineHandle};
use http::AppState;
use metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("binding {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("starting the {what}: {source}")]
    Start { what: &'static str, source: std::io::Error },
    #[error("serving: {0}")]
    Serve(std::io::Error),
    #[error("invalid option: {0}")]
    Option(String),
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The model id clients use; None: the `--model` value as given.
    pub served_model_name: Option<String>,
    /// Requests decoded at once.
    pub max_concurrency: usize,
    /// Requests waiting for a slot; beyond them, 503.
    pub max_queue: usize,
    /// When set, `/v1/*` needs `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// How long in-flight requests may run after a shutdown signal before they are cancelled.
    pub shutdown_grace: Duration,
    /// With a drafter: cycles in which at least this many requests are decoded together run
    /// as plain batched decode steps, without drafts (0: always draft). See
    /// [`DEFAULT_SPECULATIVE_DISABLE_BY_BATCH_SIZE`].
    pub speculative_disable_by_batch_size: usize,
}

/// The batch from which the server stops drafting. Two streams already decode together for
/// about the price of one, while each drafting stream adds its block's rows to the verify and a
/// draft of its own: with the `cpu-60min` drafter (τ ≈ 1.4) on the 2-core CPU, 4 clients got
/// 355 tok/s with this default, 278 with 4, 234 drafting always and 390 with no drafter at all,
/// and one client the same with any setting (README § Serve). A drafter whose τ is far higher
/// pays at larger batches: raise it, or 0 to always draft.
pub const DEFAULT_SPECULATIVE_DISABLE_BY_BATCH_SIZE: usize = 2;

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            served_model_name: None,
            max_concurrency: 8,
            max_queue: 64,
            api_key: None,
            shutdown_grace: Duration::from_secs(10),
            speculative_disable_by_batch_size: DEFAULT_SPECULATIVE_DISABLE_BY_BATCH_SIZE,
        }
    }
}

/// The router and the engine behind it, ready to serve.
pub struct App {
    pub router: axum::Router,
    pub engine: EngineHandle,
    pub engine_thread: JoinHandle<()>,
    pub served_name: String,
}

/// Starts the engine thread with `served` and builds the router.
pub fn build(served: Served, opts: &ServeOptions) -> Result<App, ServeError> {
    if opts.max_concurrency == 0 || opts.max_queue == 0 {
        return Err(ServeError::Option("--max-concurrency and --max-queue must be at least 1".into()));
    }
    let Served { model, drafter, .. } = served;
    let served_name = opts.served_model_name.clone().unwrap_or_else(|| model.name.clone());
    let block_size = drafter.as_ref().map_or(1, DrafterTemplate::block_size);
    let tc = model.target.config().clone();
    let mut eos = tc.eos_token_ids.clone();
    for &id in model.tokenizer.eos_token_ids() {
        if !eos.contains(&id) {
            eos.push(id);
        }
    }
    let metrics = Arc::new(Metrics::new(block_size));
    let cfg = EngineConfig { max_concurrency: opts.max_concurrency, max_queue: opts.max_queue, speculative_disable_by_batch_size: opts.speculative_disable_by_batch_size };
    let (engine, engine_thread) =
        engine::spawn(model.target, drafter, cfg, metrics.clone()).map_err(|source| ServeError::Start { what: "engine thread", source })?;
    let state = Arc::new(AppState {
        served_name: served_name.clone(),
        tokenizer: Arc::new(model.tokenizer),
        engine: engine.clone(),
        metrics,
        api_key: opts.api_key.clone(),
        max_context: tc.max_position_embeddings,
        block_size,
        eos_token_ids: eos,
        created: http::unix_now(),
    });
    Ok(App { router: http::router(state), engine, engine_thread, served_name })
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains within the grace period.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: App,
    grace: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let App { router, engine, engine_thread, .. } = app;
    let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, router).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = signalled_tx.send(());
    });
    let mut server = tokio::spawn(async move { server.await });
    let result = tokio::select! {
        r = &mut server => r,
        _ = async {
            if signalled_rx.await.is_err() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(grace).await;
        } => {
            // Past the grace period: cancel what is still decoding; its streams end with an
            // error event, and the connections close.
            engine.stop();
            match tokio::time::timeout(Duration::from_secs(2), &mut server).await {
                Ok(r) => r,
                Err(_) => {
                    server.abort();
                    Ok(Ok(()))
                }
            }
        }
    };
    engine.stop();
    // The engine leaves within one cycle.
    let _ = tokio::task::spawn_blocking(move || engine_thread.join()).await;
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(ServeError::Serve(e)),
        Err(_) => Ok(()),
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, ServeError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("specauf-http")
        .build()
        .map_err(|source| ServeError::Start { what: "async runtime", source })
}

/// Serves on `addr` until SIGINT/SIGTERM (the command's entry point). `on_ready` is called
/// with the bound address once the server accepts connections.
pub fn run_until_signal(served: Served, opts: ServeOptions, addr: SocketAddr, on_ready: impl FnOnce(SocketAddr, &str)) -> Result<(), ServeError> {
    let rt = runtime()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| ServeError::Bind { addr, source })?;
        let bound = listener.local_addr().map_err(|source| ServeError::Bind { addr, source })?;
        let app = build(served, &opts)?;
        on_ready(bound, &app.served_name);
        serve(listener, app, opts.shutdown_grace, shutdown_signal()).await
    })
}

/// A server running on its own threads (tests, `bench serve`); it stops when dropped.
pub struct ServerHandle {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), ServeError>>>,
}

impl ServerHandle {
    /// Binds `addr` (port 0: an ephemeral port) and serves in the background.
    pub fn spawn(served: Served, opts: ServeOptions, addr: SocketAddr) -> Result<Self, ServeError> {
        let std_listener = std::net::TcpListener::bind(addr).map_err(|source| ServeError::Bind { addr, source })?;
        std_listener.set_nonblocking(true).map_err(|source| ServeError::Bind { addr, source })?;
        let bound = std_listener.local_addr().map_err(|source| ServeError::Bind { addr, source })?;
        let app = build(served, &opts)?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let rt = runtime()?;
        let thread = std::thread::Builder::new()
            .name("specauf-server".into())
            .spawn(move || {
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(std_listener).map_err(|source| ServeError::Bind { addr, source })?;
                    serve(listener, app, opts.shutdown_grace, async move {
                        let _ = rx.await;
                    })
                    .await
                })
            })
            .map_err(|source| ServeError::Start { what: "server thread", source })?;
        Ok(Self { addr: bound, shutdown: Some(tx), thread: Some(thread) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Signals shutdown and waits for the server to finish (at most the grace period plus a
    /// few seconds).
    pub fn shutdown(mut self) -> Result<(), ServeError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), ServeError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(ServeError::Serve(std::io::Error::other("the server thread panicked"))),
            None => Ok(()),
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
