//! Prometheus metrics: one registry per server, served as OpenMetrics text on `metrics_listen`.
//!
//! Built on `prometheus-client` (the Prometheus project's own Rust client): its registries are
//! values, not process globals, so every server — and every test server in one process — keeps
//! its own, and its label sets are typed structs. Counters and histograms are updated where the
//! events happen (the gRPC layer, the engine thread, the generate stream); gauges that mirror
//! state the engine already keeps (running, waiting, KV reservation) are read at scrape time and
//! handed to [`Metrics::render`] as [`Gauges`]. Serving `GET /metrics` is
//! [`crate::http::metrics`]'s: this module records and renders, and imports nothing of the server.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;
use std::time::Duration;

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;
type RatioGauge = Gauge<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    grpc_service: String,
    grpc_method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcCodeLabels {
    grpc_service: String,
    grpc_method: String,
    grpc_code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    /// The matched route (`/v1/chat/completions`, `/api/v1/Generate`, …), never the raw path.
    route: String,
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpStatusLabels {
    route: String,
    method: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SequenceLabels {
    model: String,
    /// `generate` or `capture` (projection, scoring, extraction and screening passes).
    kind: &'static str,
    steered: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MonitorLabels {
    model: String,
    vector: String,
    layer: String,
    /// `calibrated` (0 = helpful, 100 = trait) when the vector carries a calibration, else `raw`.
    scale: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AlertLabels {
    model: String,
    vector: String,
}

fn latency_buckets() -> Histogram {
    // 1 ms … ~65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

fn token_latency_buckets() -> Histogram {
    // 0.5 ms … ~8 s: decode steps of a small model on a GPU up to a long prefill on two cores.
    Histogram::new(exponential_buckets(0.0005, 2.0, 15))
}

fn batch_buckets() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 9))
}

fn score_buckets() -> Histogram {
    // Calibrated scores put 0 at the helpful mean and 100 at the trait mean.
    Histogram::new([
        -100.0, -50.0, -25.0, 0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 100.0, 125.0, 150.0, 200.0,
    ])
}

/// Every metric of one server.
pub struct Metrics {
    registry: Registry,
    rpc_handled: Family<RpcCodeLabels, Counter>,
    rpc_seconds: HistogramFamily<RpcLabels>,
    http_requests: Family<HttpStatusLabels, Counter>,
    http_seconds: HistogramFamily<HttpLabels>,
    queue_wait: HistogramFamily<ModelLabels>,
    first_token: HistogramFamily<ModelLabels>,
    inter_token: HistogramFamily<ModelLabels>,
    step_seconds: HistogramFamily<ModelLabels>,
    batch_size: HistogramFamily<ModelLabels>,
    prefill_tokens: Family<ModelLabels, Counter>,
    generation_tokens: Family<ModelLabels, Counter>,
    sequences: Family<SequenceLabels, Counter>,
    running: Family<ModelLabels, Gauge>,
    waiting: Family<ModelLabels, Gauge>,
    kv_reserved: Family<ModelLabels, Gauge>,
    kv_budget: Family<ModelLabels, Gauge>,
    kv_usage: Family<ModelLabels, RatioGauge>,
    kv_pool: Family<ModelLabels, Gauge>,
    serving: Family<ModelLabels, Gauge>,
    restarts: Family<ModelLabels, Gauge>,
    monitor_scores: HistogramFamily<MonitorLabels>,
    alerts: Family<AlertLabels, Counter>,
    resident_bytes: Gauge,
    vectors: Gauge,
    start_time: RatioGauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::default();
        let m = Self {
            registry: Registry::default(),
            rpc_handled: Family::default(),
            rpc_seconds: Family::new_with_constructor(latency_buckets),
            http_requests: Family::default(),
            http_seconds: Family::new_with_constructor(latency_buckets),
            queue_wait: Family::new_with_constructor(latency_buckets),
            first_token: Family::new_with_constructor(latency_buckets),
            inter_token: Family::new_with_constructor(token_latency_buckets),
            step_seconds: Family::new_with_constructor(token_latency_buckets),
            batch_size: Family::new_with_constructor(batch_buckets),
            prefill_tokens: Family::default(),
            generation_tokens: Family::default(),
            sequences: Family::default(),
            running: Family::default(),
            waiting: Family::default(),
            kv_reserved: Family::default(),
            kv_budget: Family::default(),
            kv_usage: Family::default(),
            kv_pool: Family::default(),
            serving: Family::default(),
            restarts: Family::default(),
            monitor_scores: Family::new_with_constructor(score_buckets),
            alerts: Family::default(),
            resident_bytes: Gauge::default(),
            vectors: Gauge::default(),
            start_time: Gauge::default(),
        };
        r.register("http_server_requests", "HTTP API requests, by route and status", m.http_requests.clone());
        r.register_with_unit(
            "http_server_request_duration",
            "HTTP API request duration until the response head (streams go on after it)",
            Unit::Seconds,
            m.http_seconds.clone(),
        );
        r.register("grpc_server_handled", "RPCs completed, by method and gRPC status code", m.rpc_handled.clone());
        r.register_with_unit(
            "grpc_server_handling",
            "RPC duration from request to the end of the response stream",
            Unit::Seconds,
            m.rpc_seconds.clone(),
        );
        r.register_with_unit(
            "persona_queue_wait",
            "Time a sequence waited for a place in the running batch",
            Unit::Seconds,
            m.queue_wait.clone(),
        );
        r.register_with_unit(
            "persona_time_to_first_token",
            "Time from submission to a generation's first token",
            Unit::Seconds,
            m.first_token.clone(),
        );
        r.register_with_unit(
            "persona_inter_token_latency",
            "Time between consecutive tokens of one generation",
            Unit::Seconds,
            m.inter_token.clone(),
        );
        r.register_with_unit(
            "persona_engine_step",
            "Duration of one packed forward pass",
            Unit::Seconds,
            m.step_seconds.clone(),
        );
        r.register("persona_batch_size", "Sequences in one forward pass", m.batch_size.clone());
        r.register("persona_prefill_tokens", "Prompt tokens run through the model", m.prefill_tokens.clone());
        r.register("persona_generation_tokens", "Tokens generated", m.generation_tokens.clone());
        r.register(
            "persona_sequences",
            "Sequences started, by kind (generate or capture) and whether they are steered",
            m.sequences.clone(),
        );
        r.register("persona_sequences_running", "Sequences in the running batch", m.running.clone());
        r.register("persona_sequences_waiting", "Sequences waiting for a place in the batch", m.waiting.clone());
        r.register_with_unit(
            "persona_kv_cache_reserved",
            "KV cache reserved by running sequences",
            Unit::Bytes,
            m.kv_reserved.clone(),
        );
        r.register_with_unit(
            "persona_kv_cache_budget",
            "KV cache budget (kv_cache_mb)",
            Unit::Bytes,
            m.kv_budget.clone(),
        );
        r.register("persona_kv_cache_usage_ratio", "KV cache reserved over budget (0-1)", m.kv_usage.clone());
        r.register_with_unit(
            "persona_kv_pool",
            "Device memory of the KV pool (GPU path; 0 on the host path)",
            Unit::Bytes,
            m.kv_pool.clone(),
        );
        r.register(
            "persona_engine_serving",
            "1 while the model's engine serves, 0 while it is down",
            m.serving.clone(),
        );
        r.register("persona_engine_restarts", "Engine restarts after a panic since start", m.restarts.clone());
        r.register(
            "persona_monitor_score",
            "Streamed per-token projection scores of monitored vectors (calibrated when the vector has a calibration)",
            m.monitor_scores.clone(),
        );
        r.register(
            "persona_monitor_alerts",
            "Generations whose monitor crossed the request's alert threshold",
            m.alerts.clone(),
        );
        r.register_with_unit(
            "process_resident_memory",
            "Resident set size of the server process",
            Unit::Bytes,
            m.resident_bytes.clone(),
        );
        r.register("persona_vectors_stored", "Persona vectors in the store", m.vectors.clone());
        r.register_with_unit(
            "process_start_time",
            "Start time of the process since the Unix epoch",
            Unit::Seconds,
            m.start_time.clone(),
        );
        let start = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        m.start_time.set(start);
        Self { registry: r, ..m }
    }

    /// The handles an engine updates for `model`.
    pub fn model(&self, model: &str) -> ModelMetrics {
        let l = ModelLabels { model: model.to_string() };
        let seq = |kind, steered| {
            self.sequences.get_or_create(&SequenceLabels { model: model.to_string(), kind, steered }).clone()
        };
        ModelMetrics {
            queue_wait: self.queue_wait.get_or_create(&l).clone(),
            first_token: self.first_token.get_or_create(&l).clone(),
            inter_token: self.inter_token.get_or_create(&l).clone(),
            step_seconds: self.step_seconds.get_or_create(&l).clone(),
            batch_size: self.batch_size.get_or_create(&l).clone(),
            prefill_tokens: self.prefill_tokens.get_or_create(&l).clone(),
            generation_tokens: self.generation_tokens.get_or_create(&l).clone(),
            sequences: [
                [seq("generate", "false"), seq("generate", "true")],
                [seq("capture", "false"), seq("capture", "true")],
            ],
        }
    }

    /// The score histogram and alert counter of one monitored vector.
    pub fn monitor(&self, model: &str, vector: &str, layer: usize, calibrated: bool) -> MonitorMetrics {
        let scale = if calibrated { "calibrated" } else { "raw" };
        let labels =
            MonitorLabels { model: model.to_string(), vector: vector.to_string(), layer: layer.to_string(), scale };
        MonitorMetrics {
            scores: self.monitor_scores.get_or_create(&labels).clone(),
            alerts: self.alerts.get_or_create(&AlertLabels { model: model.into(), vector: vector.into() }).clone(),
        }
    }

    /// Counts one HTTP API request.
    pub fn http_done(&self, route: &str, method: &str, status: u16, elapsed: Duration) {
        let (route, method) = (route.to_string(), method.to_string());
        self.http_seconds
            .get_or_create(&HttpLabels { route: route.clone(), method: method.clone() })
            .observe(elapsed.as_secs_f64());
        self.http_requests.get_or_create(&HttpStatusLabels { route, method, status: status.to_string() }).inc();
    }

    /// Counts one finished RPC.
    pub fn rpc_done(&self, service: &str, method: &str, code: tonic::Code, elapsed: Duration) {
        let (grpc_service, grpc_method) = (service.to_string(), method.to_string());
        self.rpc_seconds
            .get_or_create(&RpcLabels { grpc_service: grpc_service.clone(), grpc_method: grpc_method.clone() })
            .observe(elapsed.as_secs_f64());
        self.rpc_handled
            .get_or_create(&RpcCodeLabels { grpc_service, grpc_method, grpc_code: code_name(code).to_string() })
            .inc();
    }

    /// The OpenMetrics text of every metric, with `gauges` (when the models are loaded) and the
    /// process's resident memory.
    pub fn render(&self, gauges: Option<&Gauges>) -> String {
        if let Some(gauges) = gauges {
            for (id, s) in &gauges.models {
                let l = ModelLabels { model: id.clone() };
                let int = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
                self.running.get_or_create(&l).set(int(s.running));
                self.waiting.get_or_create(&l).set(int(s.waiting));
                self.kv_reserved.get_or_create(&l).set(int(s.kv_reserved_bytes));
                self.kv_budget.get_or_create(&l).set(int(s.kv_budget_bytes));
                let ratio =
                    if s.kv_budget_bytes == 0 { 0.0 } else { s.kv_reserved_bytes as f64 / s.kv_budget_bytes as f64 };
                self.kv_usage.get_or_create(&l).set(ratio);
                self.kv_pool.get_or_create(&l).set(int(s.kv_pool_bytes));
                self.serving.get_or_create(&l).set(i64::from(s.serving));
                self.restarts.get_or_create(&l).set(i64::try_from(s.restarts).unwrap_or(i64::MAX));
            }
            self.vectors.set(i64::try_from(gauges.vectors).unwrap_or(i64::MAX));
        }
        if let Some(rss) = resident_bytes() {
            self.resident_bytes.set(rss);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// State read at scrape time: each model's engine, and the vectors stored.
pub struct Gauges {
    pub models: Vec<(String, ModelGauges)>,
    pub vectors: usize,
}

/// One model's engine as the gauges show it.
pub struct ModelGauges {
    pub running: usize,
    pub waiting: usize,
    pub kv_reserved_bytes: usize,
    pub kv_budget_bytes: usize,
    pub kv_pool_bytes: usize,
    pub serving: bool,
    pub restarts: u64,
}

/// What an engine thread updates for its model.
#[derive(Clone, Debug)]
pub struct ModelMetrics {
    pub queue_wait: Histogram,
    pub first_token: Histogram,
    pub inter_token: Histogram,
    pub step_seconds: Histogram,
    pub batch_size: Histogram,
    pub prefill_tokens: Counter,
    pub generation_tokens: Counter,
    /// `[generate, capture][unsteered, steered]`.
    sequences: [[Counter; 2]; 2],
}

impl ModelMetrics {
    /// Handles registered nowhere: for engines built without a server (tests, benchmarks).
    pub fn detached() -> Self {
        Metrics::new().model("detached")
    }

    pub fn sequence_started(&self, capture: bool, steered: bool) {
        self.sequences[usize::from(capture)][usize::from(steered)].inc();
    }
}

/// One monitored vector's score histogram and alert counter.
#[derive(Clone, Debug)]
pub struct MonitorMetrics {
    pub scores: Histogram,
    pub alerts: Counter,
}

/// The process's resident set size, from `/proc/self/status` (Linux).
fn resident_bytes() -> Option<i64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The canonical name of a gRPC status code, as the gRPC specification spells it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}
