//! LoRA adapters: `W x + (α / r) · B (A x)` on chosen projections of every block, with `A`
//! (`[r, in]`) and `B` (`[out, r]`) trainable and `W` frozen.
//!
//! `B` starts at zero, so a new adapter leaves the model unchanged; `A` starts uniform in
//! `±1/√in`, the scale PEFT's default initialisation gives it. Deltas are kept in the weight
//! layout of the loaded model (GGUF llama checkpoints store q/k rows permuted for interleaved
//! rotary pairs; [`super::peft`] converts at the file boundary).

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// A projection LoRA can adapt, in block order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [Self::Q, Self::K, Self::V, Self::O, Self::Gate, Self::Up, Self::Down];

    /// Hugging Face module name (PEFT's `target_modules`).
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Q => "q_proj",
            Self::K => "k_proj",
            Self::V => "v_proj",
            Self::O => "o_proj",
            Self::Gate => "gate_proj",
            Self::Up => "up_proj",
            Self::Down => "down_proj",
        }
    }

    /// GGUF tensor stem inside a block (`blk.N.<stem>.weight`).
    pub fn gguf_name(self) -> &'static str {
        match self {
            Self::Q => "attn_q",
            Self::K => "attn_k",
            Self::V => "attn_v",
            Self::O => "attn_output",
            Self::Gate => "ffn_gate",
            Self::Up => "ffn_up",
            Self::Down => "ffn_down",
        }
    }

    /// The Hugging Face parent module (`self_attn` or `mlp`).
    pub fn hf_parent(self) -> &'static str {
        match self {
            Self::Q | Self::K | Self::V | Self::O => "self_attn",
            _ => "mlp",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.hf_name() == s || t.gguf_name() == s || t.hf_name().trim_end_matches("_proj") == s)
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Shape and scale of an adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Dropout on the adapter's input during training (PEFT's `lora_dropout`).
    pub dropout: f64,
    pub targets: Vec<Target>,
    /// rsLoRA scaling (`α / √r` instead of `α / r`).
    pub use_rslora: bool,
}

impl Default for LoraConfig {
    /// The persona-vectors paper's setting: rank 32, α 64, every attention and MLP projection.
    fn default() -> Self {
        Self { rank: 32, alpha: 64.0, dropout: 0.0, targets: Target::ALL.to_vec(), use_rslora: false }
    }
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        if self.use_rslora { self.alpha / (self.rank as f64).sqrt() } else { self.alpha / self.rank as f64 }
    }

    /// Trainable parameters of an adapter of this shape over a model of `dims`.
    pub fn n_params(&self, dims: Dims) -> usize {
        self.targets
            .iter()
            .map(|&t| {
                let (out, inp) = dims.shape(t);
                self.rank * (out + inp) * dims.n_layers
            })
            .sum()
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.rank == 0 || self.rank > 1024 {
            return Err(format!("LoRA rank must be in 1..=1024, got {}", self.rank));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(format!("LoRA alpha must be a positive number, got {}", self.alpha));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("LoRA dropout must be in [0, 1), got {}", self.dropout));
        }
        if self.targets.is_empty() {
            return Err("LoRA needs at least one target module".to_string());
        }
        Ok(())
    }
}

/// One block's `(A, B)` per target, detached from training (a checkpoint, or read from disk).
pub type BlockWeights = [Option<(Tensor, Tensor)>; 7];

/// One adapted projection.
pub struct LoraLayer {
    /// `[r, in]`.
    pub a: Var,
    /// `[out, r]`.
    pub b: Var,
}

impl LoraLayer {
    /// The low-rank path `scale · (x Aᵀ) Bᵀ` for `x` of shape `[n, in]`.
    pub fn forward(&self, x: &Tensor, scale: f64, dropout: f64, train: bool) -> Result<Tensor> {
        let x = if train && dropout > 0.0 { candle_nn::ops::dropout(x, dropout as f32)? } else { x.clone() };
        x.matmul(&self.a.as_tensor().t()?)?.matmul(&self.b.as_tensor().t()?)? * scale
    }

    /// `scale · B A`, the `[out, in]` change to the weight.
    pub fn delta(&self, scale: f64) -> Result<Tensor> {
        self.b.as_tensor().matmul(self.a.as_tensor())? * scale
    }
}

/// An adapter over every block of a model: `layers[block][target]`.
pub struct Adapter {
    pub config: LoraConfig,
    pub layers: Vec<[Option<LoraLayer>; 7]>,
}

/// `(out, in)` of each target for a model's dimensions.
pub fn target_shape(t: Target, d: usize, inter: usize, q_width: usize, kv_width: usize) -> (usize, usize) {
    match t {
        Target::Q => (q_width, d),
        Target::K | Target::V => (kv_width, d),
        Target::O => (d, q_width),
        Target::Gate | Target::Up => (inter, d),
        Target::Down => (d, inter),
    }
}

/// The dimensions an adapter needs from a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub n_layers: usize,
    pub d_model: usize,
    pub intermediate: usize,
    pub q_width: usize,
    pub kv_width: usize,
}

impl Dims {
    pub fn shape(&self, t: Target) -> (usize, usize) {
        target_shape(t, self.d_model, self.intermediate, self.q_width, self.kv_width)
    }
}

impl Adapter {
    /// A fresh adapter: `A` uniform in `±1/√in` from `seed`, `B` zero.
    pub fn new(config: LoraConfig, dims: Dims, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let r = config.rank;
        let layers = (0..dims.n_layers)
            .map(|_| {
                let mut row: [Option<LoraLayer>; 7] = Default::default();
                for &t in &config.targets {
                    let (out, inp) = dims.shape(t);
                    let bound = 1.0 / (inp as f32).sqrt();
                    let a: Vec<f32> = (0..r * inp).map(|_| rng.random_range(-bound..bound)).collect();
                    let a = Var::from_tensor(&Tensor::from_vec(a, (r, inp), device)?)?;
                    let b = Var::zeros((out, r), DType::F32, device)?;
                    row[t.index()] = Some(LoraLayer { a, b });
                }
                Ok(row)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { config, layers })
    }

    pub fn layer(&self, block: usize, t: Target) -> Option<&LoraLayer> {
        self.layers.get(block).and_then(|row| row[t.index()].as_ref())
    }

    /// Every trainable variable, for the optimizer.
    pub fn vars(&self) -> Vec<Var> {
        self.layers.iter().flatten().flatten().flat_map(|l| [l.a.clone(), l.b.clone()]).collect()
    }

    /// Trainable parameter count.
    pub fn n_params(&self) -> usize {
        self.vars().iter().map(|v| v.elem_count()).sum()
    }

    /// Whether every value is finite.
    pub fn is_finite(&self) -> Result<bool> {
        for v in self.vars() {
            let s = v.as_tensor().abs()?.max_all()?.to_scalar::<f32>()?;
            if !s.is_finite() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// A detached copy of the current values (a checkpoint).
    pub fn snapshot(&self) -> Result<Vec<BlockWeights>> {
        self.layers
            .iter()
            .map(|row| {
                let mut out: BlockWeights = Default::default();
                for (i, l) in row.iter().enumerate() {
                    if let Some(l) = l {
                        out[i] = Some((l.a.as_tensor().copy()?, l.b.as_tensor().copy()?));
                    }
                }
                Ok(out)
            })
            .collect()
    }

    /// The weight changes `scale · B A` per block and target, in the model's layout.
    pub fn deltas(&self) -> Result<Vec<(usize, Target, Tensor)>> {
        let scale = self.config.scale();
        let mut out = Vec::new();
        for (block, row) in self.layers.iter().enumerate() {
            for t in Target::ALL {
                if let Some(l) = &row[t.index()] {
                    out.push((block, t, l.delta(scale)?));
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims() -> Dims {
        Dims { n_layers: 2, d_model: 8, intermediate: 12, q_width: 8, kv_width: 4 }
    }

    #[test]
    fn a_new_adapter_changes_nothing_and_has_the_right_shapes() -> Result<()> {
        let cfg = LoraConfig { rank: 2, ..Default::default() };
        let ad = Adapter::new(cfg, dims(), 1, &Device::Cpu)?;
        let k = ad.layer(1, Target::K).expect("k adapted");
        assert_eq!(k.a.dims(), &[2, 8]);
        assert_eq!(k.b.dims(), &[4, 2]);
        let down = ad.layer(0, Target::Down).expect("down adapted");
        assert_eq!(down.a.dims(), &[2, 12]);
        let x = Tensor::ones((3, 8), DType::F32, &Device::Cpu)?;
        let y = ad.layer(0, Target::Q).unwrap().forward(&x, ad.config.scale(), 0.0, true)?;
        assert_eq!(y.abs()?.max_all()?.to_scalar::<f32>()?, 0.0, "B starts at zero");
        // r (in + out) per target: q 2·16, k and v 2·12, o 2·16, gate, up and down 2·20; two blocks.
        assert_eq!(ad.n_params(), 2 * (32 + 24 + 24 + 32 + 40 + 40 + 40));
        assert_eq!(ad.config.n_params(dims()), ad.n_params());
        Ok(())
    }

    #[test]
    fn targets_parse_by_either_name_and_configs_validate() {
        assert_eq!(Target::parse("q_proj"), Some(Target::Q));
        assert_eq!(Target::parse("ffn_down"), Some(Target::Down));
        assert_eq!(Target::parse("gate"), Some(Target::Gate));
        assert_eq!(Target::parse("lm_head"), None);
        assert!(LoraConfig::default().validate().is_ok());
        assert_eq!(LoraConfig::default().scale(), 2.0);
        assert!(LoraConfig { rank: 0, ..Default::default() }.validate().unwrap_err().contains("rank"));
        assert!(LoraConfig { dropout: 1.0, ..Default::default() }.validate().unwrap_err().contains("dropout"));
        assert!(LoraConfig { targets: vec![], ..Default::default() }.validate().is_err());
    }
}
