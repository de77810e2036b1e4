//! Server assembly: load models, start engines, serve gRPC with health and reflection until
//! shutdown.

use crate::auth::AuthLayer;
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::model::LoadedModel;
use crate::observe::ObserveLayer;
use crate::scheduler::{EngineConfig, EngineHandle, GenEvent, GenerateJob};
use crate::security::Security;
use crate::service::{AppState, PersonaSvc};
use crate::steering::store::VectorStore;
use anyhow::{Context, Result};
use persona_proto::v1 as pb;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

/// Loads every configured model and opens the vector store, with a new metrics registry.
pub async fn build_state(settings: &Settings) -> Result<Arc<AppState>> {
    build_state_with(settings, Arc::new(Metrics::new())).await
}

/// [`build_state`] reporting to `metrics`.
pub async fn build_state_with(settings: &Settings, metrics: Arc<Metrics>) -> Result<Arc<AppState>> {
    let mut engines = BTreeMap::new();
    for m in &settings.models {
        let spec = m.load_spec(settings)?;
        let started = std::time::Instant::now();
        let model = tokio::task::spawn_blocking(move || LoadedModel::load(&spec))
            .await?
            .with_context(|| format!("loading model `{}`", m.id))?;
        let c = model.config();
        tracing::info!(
            model = %model.id, source = %model.source, weights = %model.weights, layers = c.n_layers,
            d_model = c.hidden_size, context = c.context_length, secs = started.elapsed().as_secs_f64(),
            "model loaded"
        );
        let cfg = EngineConfig { metrics: metrics.model(&m.id), ..EngineConfig::from(&settings.engine) };
        let engine = EngineHandle::spawn(Arc::new(model), cfg)?;
        warm_up(&engine).await.with_context(|| format!("warming up `{}`", m.id))?;
        engines.insert(m.id.clone(), engine);
    }
    let store = Arc::new(VectorStore::open(&settings.vector_dir)?);
    Ok(Arc::new(AppState {
        engines: std::sync::RwLock::new(engines),
        default_model: settings.default_model_id().to_string(),
        store,
        started: std::time::Instant::now(),
        traits: crate::traits::TraitLibrary::load(settings.traits_dir.as_deref()),
        judge: crate::judge::Judge::new(&settings.judge),
        own_responses: Default::default(),
        metrics,
        live: Default::default(),
        jobs: Arc::new(crate::jobs::Jobs::new(settings.training.clone())),
        models_added: tokio::sync::watch::Sender::new(0),
    }))
}

/// One short generation so the first real request does not pay for lazy initialisation.
async fn warm_up(engine: &EngineHandle) -> Result<()> {
    let prompt = engine.model().tokenizer.encode("Hello")?;
    let mut rx = engine.generate(GenerateJob::greedy(prompt, 2))?;
    while let Some(ev) = rx.recv().await {
        if let GenEvent::Done(_) = ev? {
            break;
        }
    }
    Ok(())
}

type Persona = pb::persona_service_server::PersonaServiceServer<PersonaSvc>;

/// The health service name of one model's engine.
pub fn model_health_name(model: &str) -> String {
    format!("persona.v1.PersonaService/{model}")
}

/// Publishes every engine's health: each model as its own health service
/// ([`model_health_name`]), SERVING or NOT_SERVING; and `persona.v1.PersonaService` NOT_SERVING
/// while any model's engine is down (recovering from a panic, or given up after a crash loop),
/// so a probe on the service sees a replica that cannot serve all its models. Models added
/// while serving (adapters) are published when they arrive.
async fn watch_engines(state: &Arc<AppState>, reporter: &tonic_health::server::HealthReporter) {
    let mut added = state.models_added.subscribe();
    let mut watched = std::collections::BTreeSet::new();
    watch_new_engines(state, reporter, &mut watched).await;
    // The task holds the state weakly: it ends with the state, whose sender it listens to.
    let (state, reporter) = (Arc::downgrade(state), reporter.clone());
    tokio::spawn(async move {
        while added.changed().await.is_ok() {
            let Some(state) = state.upgrade() else { break };
            watch_new_engines(&state, &reporter, &mut watched).await;
        }
    });
}

/// Starts reporting the health of each engine not in `watched` yet.
async fn watch_new_engines(
    state: &Arc<AppState>,
    reporter: &tonic_health::server::HealthReporter,
    watched: &mut std::collections::BTreeSet<String>,
) {
    use tonic_health::ServingStatus;
    let status = |serving: bool| if serving { ServingStatus::Serving } else { ServingStatus::NotServing };
    for (id, engine) in state.engines() {
        if !watched.insert(id.clone()) {
            continue;
        }
        let mut rx = engine.health();
        let serving = rx.borrow().serving;
        reporter.set_service_status(model_health_name(&id), status(serving)).await;
        let (reporter, state) = (reporter.clone(), Arc::downgrade(state));
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let serving = rx.borrow_and_update().serving;
                reporter.set_service_status(model_health_name(&id), status(serving)).await;
                let Some(state) = state.upgrade() else { break };
                let every = state.engines().iter().all(|(_, e)| e.health().borrow().serving);
                drop(state);
                reporter.set_service_status(<Persona as tonic::server::NamedService>::NAME, status(every)).await;
            }
        });
    }
}

/// Where the server listens: gRPC, and optionally the Prometheus endpoint (`GET /metrics`) and
/// the HTTP API with the console.
pub struct Listeners {
    pub grpc: TcpListener,
    pub metrics: Option<TcpListener>,
    pub http: Option<TcpListener>,
    /// The HTTP listener serves `/metrics` too (`metrics_listen` = `http_listen`).
    pub metrics_on_http: bool,
    /// Origins the HTTP API answers CORS requests from (`http_cors_origins`).
    pub cors_origins: Vec<String>,
}

impl From<TcpListener> for Listeners {
    fn from(grpc: TcpListener) -> Self {
        Self { grpc, metrics: None, http: None, metrics_on_http: false, cors_origins: Vec::new() }
    }
}

impl Listeners {
    /// Binds `settings.listen`, and `settings.metrics_listen` and `settings.http_listen` unless
    /// they are empty (once when they are the same address).
    pub async fn bind(settings: &Settings) -> Result<Self> {
        let grpc = TcpListener::bind(&settings.listen).await.with_context(|| format!("binding {}", settings.listen))?;
        let bind = |key: &'static str, addr: &str| {
            let addr = addr.to_owned();
            async move {
                match addr.as_str() {
                    "" => Ok(None),
                    a => TcpListener::bind(a).await.map(Some).with_context(|| format!("binding {key} {a}")),
                }
            }
        };
        let shared = !settings.http_listen.is_empty() && settings.http_listen == settings.metrics_listen;
        let http = bind("http_listen", &settings.http_listen).await?;
        let metrics = if shared { None } else { bind("metrics_listen", &settings.metrics_listen).await? };
        Ok(Self { grpc, metrics, http, metrics_on_http: shared, cors_origins: settings.http_cors_origins.clone() })
    }
}

/// Serves already loaded models until `shutdown` resolves, then drains in-flight calls for up
/// to `grace`.
pub async fn serve(
    state: Arc<AppState>,
    listeners: impl Into<Listeners>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> Result<()> {
    serve_secured(state, listeners, Security::open(), shutdown, grace).await
}

/// [`serve`] with API keys, TLS and the reflection setting of `security`.
pub async fn serve_secured(
    state: Arc<AppState>,
    listeners: impl Into<Listeners>,
    security: Security,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> Result<()> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<Persona>().await;
    watch_engines(&state, &reporter).await;
    let metrics = state.metrics.clone();
    serve_service(PersonaSvc::new(state), metrics, security, reporter, health, listeners.into(), shutdown, grace).await
}

/// Answers on `listener` at once and loads the configured models meanwhile: health reports the
/// persona service NOT_SERVING (and its calls UNAVAILABLE) until they are ready, while the
/// overall health (service "") says the process is alive. A model that fails to load ends the
/// server with that error.
pub async fn load_and_serve(
    settings: &Settings,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> Result<()> {
    let security = Security::from_settings(settings)?;
    let mut addrs = vec![listeners.grpc.local_addr()?];
    addrs.extend(listeners.http.as_ref().map(TcpListener::local_addr).transpose()?);
    for addr in addrs.into_iter().filter(|a| !a.ip().is_loopback()) {
        if !security.has_keys() {
            tracing::warn!(
                %addr,
                "NO API KEYS: listening on a non-loopback address without authentication; anyone who can reach \
                 this port can generate, and overwrite or delete every stored vector (configure auth.keys)"
            );
        }
    }
    // Reloads keys and certificates on SIGHUP or when their files change, while the server runs.
    let watcher = tokio::spawn(security.clone().watch(Duration::from_secs(10)));
    let _stop_watching = crate::support::AbortOnDrop(watcher);
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_not_serving::<Persona>().await;
    let svc = PersonaSvc::loading();
    let metrics = Arc::new(Metrics::new());
    let server =
        serve_service(svc.clone(), metrics.clone(), security, reporter.clone(), health, listeners, shutdown, grace);
    tokio::pin!(server);
    let load = async {
        let state = build_state_with(settings, metrics).await?;
        watch_engines(&state, &reporter).await;
        svc.set_ready(state);
        reporter.set_serving::<Persona>().await;
        tracing::info!("models loaded; serving");
        Ok::<_, anyhow::Error>(())
    };
    tokio::select! {
        r = &mut server => return r,
        r = load => r?,
    }
    server.await
}

#[allow(clippy::too_many_arguments)]
async fn serve_service(
    svc: PersonaSvc,
    metrics: Arc<Metrics>,
    security: Security,
    reporter: tonic_health::server::HealthReporter,
    health: tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> Result<()> {
    let listener = listeners.grpc;
    // The metrics endpoint and the HTTP API stay up while calls drain and stop with the gRPC
    // server.
    let (metrics_stop, stopped) = tokio::sync::watch::channel(false);
    let stop = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        }
    };
    let mut side_servers = Vec::new();
    if let Some(l) = listeners.metrics {
        side_servers.push((
            "metrics endpoint",
            tokio::spawn(crate::http::metrics::serve(l, metrics.clone(), svc.clone(), stop())),
        ));
    }
    if let Some(l) = listeners.http {
        let app = crate::http::router(
            svc.clone(),
            security.keys.clone(),
            metrics.clone(),
            listeners.metrics_on_http,
            &listeners.cors_origins,
        );
        side_servers.push(("HTTP API", tokio::spawn(crate::http::serve(l, security.tls.clone(), app, stop()))));
    }
    let reflection = if security.reflection {
        Some(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .build_v1()?,
        )
    } else {
        None
    };
    let layer = ObserveLayer::new(metrics);
    let svc = Persona::new(svc).max_decoding_message_size(64 * 1024 * 1024).max_encoding_message_size(64 * 1024 * 1024);
    tracing::info!(
        addr = %listener.local_addr()?,
        tls = security.tls.is_some(),
        api_keys = security.has_keys(),
        "listening"
    );
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let notify = async move {
        shutdown.await;
        tracing::info!("shutdown requested; draining");
        reporter.set_not_serving::<Persona>().await;
        let _ = drain_tx.send(());
    };
    let router = tonic::transport::Server::builder()
        .layer(layer)
        .layer(AuthLayer::new(security.keys.clone()))
        .add_service(health)
        .add_optional_service(reflection)
        .add_service(svc);
    let server: std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> = match security
        .tls
        .clone()
    {
        None => Box::pin(router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), notify)),
        Some(tls) => Box::pin(router.serve_with_incoming_shutdown(crate::security::incoming(listener, tls), notify)),
    };
    tokio::pin!(server);
    let served = tokio::select! {
        r = &mut server => r.map_err(anyhow::Error::from),
        _ = async { let _ = drain_rx.await; tokio::time::sleep(grace).await } => {
            tracing::warn!(secs = grace.as_secs(), "grace period over; dropping remaining calls");
            Ok(())
        }
    };
    let _ = metrics_stop.send(true);
    for (what, task) in side_servers {
        match task.await {
            Ok(Err(e)) => tracing::warn!(error = %e, "{what} failed"),
            Err(e) => tracing::warn!(error = %e, "{what} task failed"),
            Ok(Ok(())) => {}
        }
    }
    served
}

/// Resolves on SIGTERM or Ctrl-C.
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
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
