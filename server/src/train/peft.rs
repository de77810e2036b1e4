//! Adapters in PEFT's format: a directory with `adapter_config.json` and
//! `adapter_model.safetensors`, tensors named as PEFT names them
//! (`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`, `[r, in]`; `lora_B`,
//! `[out, r]`), so Hugging Face tools load what we train and we load what they train.
//!
//! GGUF llama checkpoints store the q and k projections with each head's rows interleaved for
//! GPT-J-style rotary pairs; Hugging Face checkpoints (and so PEFT adapters) use the half-split
//! layout. The rows of `lora_B` for q and k are permuted at this boundary, in both directions.
//!
//! Writing goes to a temporary directory renamed into place, so a reader never sees a half
//! written adapter.

use super::lora::{BlockWeights, Dims, LoraConfig, Target};
use crate::model::arch::llama::LlamaConfig;
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Our own record of how an adapter was trained (PEFT ignores it).
pub const TRAINING_FILE: &str = "persona_training.json";

#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    /// The files are not a LoRA adapter we can read.
    #[error("{0}")]
    Invalid(String),
    /// A valid adapter for a different base model.
    #[error("{0}")]
    Mismatch(String),
    #[error("{0}")]
    Io(String),
}

type Result<T> = std::result::Result<T, PeftError>;

fn io(what: &str, path: &Path, e: impl std::fmt::Display) -> PeftError {
    PeftError::Io(format!("{what} {}: {e}", path.display()))
}

/// How q/k rows are laid out in the model that uses the adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Rows of q/k interleaved per rotary pair (GGUF llama); the file's are half-split.
    pub interleaved: bool,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl Layout {
    /// The q/k layout of a loaded model.
    pub fn of(cfg: &LlamaConfig) -> Self {
        Self {
            interleaved: cfg.rope_interleaved,
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
        }
    }

    fn heads(&self, t: Target) -> Option<usize> {
        match t {
            Target::Q if self.interleaved => Some(self.n_heads),
            Target::K if self.interleaved => Some(self.n_kv_heads),
            _ => None,
        }
    }
}

/// The adapter dimensions of a model.
pub fn dims_of(cfg: &LlamaConfig) -> Dims {
    Dims {
        n_layers: cfg.n_layers,
        d_model: cfg.hidden_size,
        intermediate: cfg.intermediate_size,
        q_width: cfg.n_heads * cfg.head_dim,
        kv_width: cfg.n_kv_heads * cfg.head_dim,
    }
}

/// `[out, r]` rows from the half-split layout to the interleaved one (`to_model`) or back.
fn permute_rows(b: &Tensor, heads: usize, head_dim: usize, to_model: bool) -> candle_core::Result<Tensor> {
    let (out, r) = b.dims2()?;
    let half = head_dim / 2;
    let split = if to_model { (heads, 2, half, r) } else { (heads, half, 2, r) };
    b.reshape(split)?.transpose(1, 2)?.contiguous()?.reshape((out, r))
}

/// An adapter read from disk, in the model's layout.
pub struct PeftAdapter {
    pub config: LoraConfig,
    /// `base_model_name_or_path` as written.
    pub base: Option<String>,
    /// `layers[block][target] = (A [r, in], B [out, r])`.
    pub layers: Vec<BlockWeights>,
}

impl PeftAdapter {
    /// The weight changes `scale · B A` keyed by GGUF tensor name (`blk.N.attn_q.weight`).
    pub fn deltas(&self) -> candle_core::Result<BTreeMap<String, Tensor>> {
        let scale = self.config.scale();
        let mut out = BTreeMap::new();
        for (block, row) in self.layers.iter().enumerate() {
            for t in Target::ALL {
                if let Some((a, b)) = &row[t.index()] {
                    out.insert(format!("blk.{block}.{}.weight", t.gguf_name()), (b.matmul(a)? * scale)?);
                }
            }
        }
        Ok(out)
    }
}

fn tensor_name(block: usize, t: Target, which: &str) -> String {
    format!("base_model.model.model.layers.{block}.{}.{}.lora_{which}.weight", t.hf_parent(), t.hf_name())
}

/// What an adapter directory holds: the adapter (`layers` in the model's layout), the base's
/// name, and our record of how it was trained.
pub struct AdapterFiles<'a> {
    pub config: &'a LoraConfig,
    pub layers: &'a [BlockWeights],
    pub layout: Layout,
    pub base: &'a str,
    pub training: &'a serde_json::Value,
}

/// Writes an adapter as a PEFT directory at `dir`, replacing any adapter there only once the new
/// one is complete.
pub fn save(dir: &Path, files: &AdapterFiles<'_>) -> Result<()> {
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| io("creating", parent, e))?;
    let name = dir.file_name().ok_or_else(|| PeftError::Invalid(format!("{} names no directory", dir.display())))?;
    let tmp = parent.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| io("creating", &tmp, e))?;
    let written = write_files(&tmp, files);
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    // Swap in: the old adapter (if any) moves aside first, so `dir` always holds a whole one.
    let old = parent.join(format!(".{}.old-{}", name.to_string_lossy(), std::process::id()));
    let had_old = dir.exists();
    if had_old {
        std::fs::rename(dir, &old).map_err(|e| io("moving aside", dir, e))?;
    }
    if let Err(e) = std::fs::rename(&tmp, dir) {
        if had_old {
            let _ = std::fs::rename(&old, dir);
        }
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(io("renaming into", dir, e));
    }
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(())
}

fn write_files(dir: &Path, files: &AdapterFiles<'_>) -> Result<()> {
    let AdapterFiles { config, layers, layout, base, training } = *files;
    let mut tensors: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::new();
    for (block, row) in layers.iter().enumerate() {
        for t in Target::ALL {
            let Some((a, b)) = &row[t.index()] else { continue };
            let b = match layout.heads(t) {
                Some(h) => permute_rows(b, h, layout.head_dim, false),
                None => Ok(b.clone()),
            }
            .map_err(|e| PeftError::Invalid(e.to_string()))?;
            for (which, x) in [("A", a), ("B", &b)] {
                let v: Vec<f32> = x
                    .to_dtype(DType::F32)
                    .and_then(|x| x.flatten_all())
                    .and_then(|x| x.to_vec1())
                    .map_err(|e| PeftError::Invalid(e.to_string()))?;
                let bytes = v.iter().flat_map(|f| f.to_le_bytes()).collect();
                tensors.push((tensor_name(block, t, which), bytes, x.dims().to_vec()));
            }
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, bytes, shape)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (n.clone(), v))
                .map_err(|e| PeftError::Invalid(e.to_string()))
        })
        .collect::<Result<_>>()?;
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let weights = dir.join(WEIGHTS_FILE);
    safetensors::serialize_to_file(views, Some(meta), &weights).map_err(|e| io("writing", &weights, e))?;
    let cfg = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": config.targets.iter().map(|t| t.hf_name()).collect::<Vec<_>>(),
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "use_rslora": config.use_rslora,
        "use_dora": false,
        "layers_to_transform": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    });
    let write_json = |name: &str, v: &serde_json::Value| {
        let p = dir.join(name);
        let text = serde_json::to_string_pretty(v).map_err(|e| PeftError::Invalid(e.to_string()))?;
        std::fs::write(&p, text).map_err(|e| io("writing", &p, e))
    };
    write_json(CONFIG_FILE, &cfg)?;
    write_json(TRAINING_FILE, training)?;
    Ok(())
}

/// Whether `dir` looks like a PEFT adapter directory.
pub fn is_adapter_dir(dir: &Path) -> bool {
    dir.join(CONFIG_FILE).is_file()
}

/// Reads a PEFT LoRA adapter for a model of `dims` and q/k `layout`. What PEFT can express but
/// this server cannot apply (DoRA, biases, extra trained modules, per-module ranks) is refused
/// by name; an adapter whose shapes do not fit the model is a [`PeftError::Mismatch`] naming
/// both.
pub fn load(dir: &Path, dims: Dims, layout: Layout, model_name: &str) -> Result<PeftAdapter> {
    let cfg_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| io("reading", &cfg_path, e))?;
    let cfg: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| PeftError::Invalid(format!("{}: {e}", cfg_path.display())))?;
    let bad = |m: String| PeftError::Invalid(format!("{}: {m}", cfg_path.display()));
    match cfg["peft_type"].as_str() {
        Some("LORA") => {}
        other => return Err(bad(format!("peft_type is {other:?}; only LORA adapters are supported"))),
    }
    let rank =
        cfg["r"].as_u64().filter(|&r| r > 0).ok_or_else(|| bad("`r` must be a positive integer".into()))? as usize;
    let alpha = cfg["lora_alpha"].as_f64().ok_or_else(|| bad("`lora_alpha` must be a number".into()))?;
    if cfg["use_dora"].as_bool() == Some(true) {
        return Err(bad("DoRA adapters (use_dora) are not supported".into()));
    }
    if let Some(b) = cfg["bias"].as_str().filter(|b| *b != "none") {
        return Err(bad(format!("adapters with trained biases (bias = \"{b}\") are not supported")));
    }
    if cfg["modules_to_save"].as_array().is_some_and(|a| !a.is_empty()) {
        return Err(bad("adapters with fully trained modules (modules_to_save) are not supported".into()));
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if cfg[key].as_object().is_some_and(|o| !o.is_empty()) {
            return Err(bad(format!("per-module ranks or alphas (`{key}`) are not supported")));
        }
    }
    if cfg["fan_in_fan_out"].as_bool() == Some(true) {
        return Err(bad("fan_in_fan_out adapters (GPT-2 style Conv1D) do not apply to llama models".into()));
    }
    let config = LoraConfig {
        rank,
        alpha,
        dropout: cfg["lora_dropout"].as_f64().unwrap_or(0.0),
        targets: Vec::new(),
        use_rslora: cfg["use_rslora"].as_bool().unwrap_or(false),
    };
    let weights = dir.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&weights).map_err(|e| io("reading", &weights, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| PeftError::Invalid(format!("{}: {e}", weights.display())))?;
    let mut halves: BTreeMap<(usize, Target), [Option<Tensor>; 2]> = BTreeMap::new();
    for (name, view) in st.tensors() {
        let (block, t, which) = parse_name(&name).ok_or_else(|| {
            PeftError::Invalid(format!(
                "{}: tensor `{name}` is not a LoRA A/B weight of a q/k/v/o/gate/up/down projection",
                weights.display()
            ))
        })?;
        if block >= dims.n_layers {
            return Err(PeftError::Mismatch(format!(
                "adapter {} has weights for layer {block}, model `{model_name}` has {} layers",
                dir.display(),
                dims.n_layers
            )));
        }
        let shape = view.shape().to_vec();
        let t_ = to_tensor(&view).map_err(|e| PeftError::Invalid(format!("{name}: {e}")))?;
        let (out, inp) = dims.shape(t);
        let want = if which == 0 { vec![rank, inp] } else { vec![out, rank] };
        if shape != want {
            return Err(PeftError::Mismatch(format!(
                "adapter {} (base `{}`) has {name} of shape {shape:?}, model `{model_name}` needs {want:?}",
                dir.display(),
                cfg["base_model_name_or_path"].as_str().unwrap_or("?"),
            )));
        }
        halves.entry((block, t)).or_default()[which] = Some(t_);
    }
    if halves.is_empty() {
        return Err(PeftError::Invalid(format!("{} holds no LoRA weights", weights.display())));
    }
    let mut layers: Vec<BlockWeights> = (0..dims.n_layers).map(|_| Default::default()).collect();
    let mut targets = std::collections::BTreeSet::new();
    for ((block, t), [a, b]) in halves {
        let (Some(a), Some(b)) = (a, b) else {
            return Err(PeftError::Invalid(format!("layer {block} {} has only one of lora_A and lora_B", t.hf_name())));
        };
        let b = match layout.heads(t) {
            Some(h) => permute_rows(&b, h, layout.head_dim, true).map_err(|e| PeftError::Invalid(e.to_string()))?,
            None => b,
        };
        layers[block][t.index()] = Some((a, b));
        targets.insert(t);
    }
    Ok(PeftAdapter {
        config: LoraConfig { targets: targets.into_iter().collect(), ..config },
        base: cfg["base_model_name_or_path"].as_str().map(String::from),
        layers,
    })
}

/// `(block, target, 0 for A | 1 for B)` of a PEFT tensor name.
fn parse_name(name: &str) -> Option<(usize, Target, usize)> {
    let rest = &name[name.find("layers.")? + "layers.".len()..];
    let (block, rest) = rest.split_once('.')?;
    let block: usize = block.parse().ok()?;
    let parts: Vec<&str> = rest.split('.').collect();
    // <parent>.<module>.lora_A[.<adapter name>].weight
    let (parent, module, ab) = (parts.first()?, parts.get(1)?, parts.get(2)?);
    let t = Target::parse(module)?;
    if *parent != t.hf_parent() || parts.last() != Some(&"weight") || parts.len() > 5 {
        return None;
    }
    let which = match *ab {
        "lora_A" => 0,
        "lora_B" => 1,
        _ => return None,
    };
    Some((block, t, which))
}

fn to_tensor(view: &safetensors::tensor::TensorView<'_>) -> candle_core::Result<Tensor> {
    let dtype = match view.dtype() {
        safetensors::Dtype::F32 => DType::F32,
        safetensors::Dtype::F16 => DType::F16,
        safetensors::Dtype::BF16 => DType::BF16,
        d => candle_core::bail!("unsupported dtype {d:?}"),
    };
    Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)?.to_dtype(DType::F32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_names_parse_and_others_do_not() {
        assert_eq!(
            parse_name("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"),
            Some((3, Target::Q, 0))
        );
        assert_eq!(
            parse_name("base_model.model.model.layers.12.mlp.down_proj.lora_B.default.weight"),
            Some((12, Target::Down, 1))
        );
        assert_eq!(parse_name("base_model.model.model.layers.1.mlp.q_proj.lora_A.weight"), None);
        assert_eq!(parse_name("base_model.model.lm_head.lora_A.weight"), None);
        assert_eq!(parse_name("base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector"), None);
    }

    #[test]
    fn qk_rows_permute_to_the_interleaved_layout_and_back() -> candle_core::Result<()> {
        // Two heads of dimension 4: half-split rows (h, j, i) become interleaved (h, i, j).
        let b = Tensor::arange(0f32, 8.0, &Device::Cpu)?.reshape((8, 1))?;
        let model = permute_rows(&b, 2, 4, true)?;
        assert_eq!(model.flatten_all()?.to_vec1::<f32>()?, vec![0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
        let back = permute_rows(&model, 2, 4, false)?;
        assert_eq!(back.flatten_all()?.to_vec1::<f32>()?, b.flatten_all()?.to_vec1::<f32>()?);
        Ok(())
    }

    #[test]
    fn an_adapter_round_trips_and_bad_ones_are_refused_by_name() {
        let dims = Dims { n_layers: 2, d_model: 8, intermediate: 12, q_width: 8, kv_width: 4 };
        let layout = Layout { interleaved: true, n_heads: 2, n_kv_heads: 1, head_dim: 4 };
        let cfg = LoraConfig { rank: 2, ..Default::default() };
        let ad = super::super::lora::Adapter::new(cfg.clone(), dims, 7, &Device::Cpu).unwrap();
        // Give B values so the permutation matters.
        for v in ad.vars() {
            v.set(&Tensor::randn(0f32, 1.0, v.shape(), &Device::Cpu).unwrap()).unwrap();
        }
        let snap = ad.snapshot().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a");
        let record = json!({});
        let files = |base| AdapterFiles { config: &cfg, layers: &snap, layout, base, training: &record };
        save(&dir, &files("base")).unwrap();
        let back = load(&dir, dims, layout, "m").unwrap();
        assert_eq!(back.config.rank, 2);
        assert_eq!(back.config.targets, Target::ALL.to_vec());
        assert_eq!(back.base.as_deref(), Some("base"));
        for (row, orig) in back.layers.iter().zip(&snap) {
            for (x, y) in row.iter().zip(orig) {
                let ((a, b), (a0, b0)) = (x.as_ref().unwrap(), y.as_ref().unwrap());
                assert_eq!(a.to_vec2::<f32>().unwrap(), a0.to_vec2::<f32>().unwrap());
                assert_eq!(b.to_vec2::<f32>().unwrap(), b0.to_vec2::<f32>().unwrap());
            }
        }
        // Saving again replaces the adapter whole.
        save(&dir, &files("base2")).unwrap();
        assert_eq!(load(&dir, dims, layout, "m").unwrap().base.as_deref(), Some("base2"));
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers.len(), 1, "no temporary directories left: {leftovers:?}");
        // A model of another width.
        let other = Dims { d_model: 16, ..dims };
        match load(&dir, other, layout, "wide") {
            Err(PeftError::Mismatch(m)) => assert!(m.contains("wide") && m.contains("base2"), "{m}"),
            other => panic!("expected a mismatch, got {:?}", other.err()),
        }
        // Unsupported PEFT options.
        let cfg_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&cfg_path).unwrap();
        std::fs::write(&cfg_path, text.replace("\"use_dora\": false", "\"use_dora\": true")).unwrap();
        match load(&dir, dims, layout, "m") {
            Err(PeftError::Invalid(m)) => assert!(m.contains("DoRA"), "{m}"),
            other => panic!("expected invalid, got {:?}", other.err()),
        }
    }
}
