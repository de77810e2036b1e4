//! Token sampling on the host: greedy, temperature, top-k and top-p (nucleus).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 or ≥ 1 = off.
    pub top_p: f32,
    /// 0 = off.
    pub top_k: usize,
    pub seed: Option<u64>,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self { temperature: 0.0, top_p: 0.0, top_k: 0, seed: None }
    }
}

pub struct Sampler {
    cfg: SamplingConfig,
    rng: StdRng,
}

impl Sampler {
    pub fn new(cfg: SamplingConfig) -> Self {
        let rng = match cfg.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Self { cfg, rng }
    }

    /// Whether every choice is the most likely token (so the logits themselves need not be read).
    pub fn is_greedy(&self) -> bool {
        self.cfg.temperature <= 0.0
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.cfg.temperature <= 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.cfg.temperature;
        let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l * inv_t)).collect();
        let k = self.cfg.top_k;
        if k > 0 && k < cand.len() {
            cand.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
            cand.truncate(k);
        }
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|(_, l)| (l - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        let p = self.cfg.top_p;
        if p > 0.0 && p < 1.0 {
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|q| {
                    acc += q;
                    acc >= p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            cand.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (c, q) in cand.iter().zip(&probs) {
            r -= q;
            if r <= 0.0 {
                return c.0;
            }
        }
        cand[cand.len() - 1].0
    }
}

/// A token's log-probability under one logits row, and the row's most likely tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Logprobs {
    pub token: u32,
    pub logprob: f32,
    /// `(token, logprob)`, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Log-softmax of `logits` read at `token`, plus the `top` most likely tokens (ties: lower id
/// first). The normaliser is summed in f64, so long vocabularies lose no precision.
pub fn logprobs(logits: &[f32], token: u32, top: usize) -> Logprobs {
    let lse = log_sum_exp(logits);
    let lp = |l: f32| (l as f64 - lse) as f32;
    let mut best: Vec<(u32, f32)> = Vec::new();
    if top > 0 {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
        let k = top.min(idx.len());
        if k < idx.len() {
            idx.select_nth_unstable_by(k - 1, by_logit);
            idx.truncate(k);
        }
        idx.sort_unstable_by(by_logit);
        best = idx.into_iter().map(|i| (i, lp(logits[i as usize]))).collect();
    }
    let logprob = logits.get(token as usize).map_or(f32::NEG_INFINITY, |&l| lp(l));
    Logprobs { token, logprob, top: best }
}

/// `log Σ exp(logits)`, summed in f64.
fn log_sum_exp(logits: &[f32]) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    max as f64 + logits.iter().map(|&l| ((l - max) as f64).exp()).sum::<f64>().ln()
}

/// KL(P ‖ Q) in nats between the softmax distributions of two logit vectors over one
/// vocabulary: how far `q` (an engine under test) strays from `p` (the reference).
pub fn kl_divergence(p: &[f32], q: &[f32]) -> f64 {
    assert_eq!(p.len(), q.len(), "KL divergence of distributions over different vocabularies");
    let (lp, lq) = (log_sum_exp(p), log_sum_exp(q));
    let kl: f64 = p
        .iter()
        .zip(q)
        .map(|(&a, &b)| {
            let log_p = a as f64 - lp;
            log_p.exp() * (log_p - (b as f64 - lq))
        })
        .sum();
    kl.max(0.0)
}

pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in xs.iter().enumerate() {
        if *v > xs[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_divergence_is_zero_for_equal_distributions_and_matches_the_formula() {
        let p = [1.0f32, 2.0, 3.0];
        assert!(kl_divergence(&p, &p) < 1e-12);
        // A constant shift leaves the softmax unchanged.
        assert!(kl_divergence(&p, &[11.0, 12.0, 13.0]) < 1e-12);
        let q = [3.0f32, 2.0, 1.0];
        let soft = |v: &[f32]| {
            let z: f64 = v.iter().map(|&x| (x as f64).exp()).sum();
            v.iter().map(|&x| (x as f64).exp() / z).collect::<Vec<_>>()
        };
        let (sp, sq) = (soft(&p), soft(&q));
        let want: f64 = sp.iter().zip(&sq).map(|(a, b)| a * (a / b).ln()).sum();
        assert!((kl_divergence(&p, &q) - want).abs() < 1e-9);
    }

    #[test]
    fn greedy_picks_the_largest_and_first_on_ties() {
        let mut s = Sampler::new(SamplingConfig::default());
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 3.0]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_even_when_hot() {
        let mut s = Sampler::new(SamplingConfig { temperature: 5.0, top_k: 1, seed: Some(1), ..Default::default() });
        for _ in 0..20 {
            assert_eq!(s.sample(&[0.0, 1.0, 0.5]), 1);
        }
    }

    #[test]
    fn top_p_drops_the_tail() {
        // Probabilities ~ [0.88, 0.12, ~0]: with top_p 0.5 only the first survives.
        let logits = [4.0, 2.0, -20.0];
        let mut s = Sampler::new(SamplingConfig { temperature: 1.0, top_p: 0.5, seed: Some(7), ..Default::default() });
        for _ in 0..50 {
            assert_eq!(s.sample(&logits), 0);
        }
    }

    #[test]
    fn logprobs_are_a_log_softmax_with_the_top_tokens_first() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        let lp = logprobs(&logits, 2, 3);
        assert!((lp.logprob as f64 - (2.0 - z.ln())).abs() < 1e-6);
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 3, 2], "ties broken by the lower id");
        let total: f64 =
            logits.iter().map(|&l| (logprobs(&logits, 0, 0).logprob as f64 + (l - 1.0) as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6, "probabilities sum to one: {total}");
        assert!(logprobs(&logits, 0, 0).top.is_empty());
        assert_eq!(logprobs(&logits, 0, 10).top.len(), 4);
        assert_eq!(logprobs(&logits, 9, 0).logprob, f32::NEG_INFINITY);
    }

    #[test]
    fn same_seed_same_sequence() {
        let cfg = SamplingConfig { temperature: 1.0, seed: Some(42), ..Default::default() };
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let a: Vec<u32> = {
            let mut s = Sampler::new(cfg.clone());
            (0..30).map(|_| s.sample(&logits)).collect()
        };
        let mut s = Sampler::new(cfg);
        let b: Vec<u32> = (0..30).map(|_| s.sample(&logits)).collect();
        assert_eq!(a, b);
        assert!(a.iter().collect::<std::collections::HashSet<_>>().len() > 1, "sampling should vary");
    }
}
