//! LoRA training on the embedded model: the training forward pass is the served one (steering
//! included), training lowers the loss, steering during training takes the pressure off the
//! steered direction, and adapters round-trip through PEFT's format into a served model.

mod common;

use candle_core::{Device, Tensor, Var};
use persona_server::model::arch::llama::{ForwardContext, KvCache, RowInput, SteeringAddends};
use persona_server::model::chat::Message;
use persona_server::model::source::local_files;
use persona_server::model::weights::{GgufSource, Requantize};
use persona_server::model::{LoadOptions, LoadedModel};
use persona_server::train::data::Example;
use persona_server::train::lora::{Adapter, LoraConfig};
use persona_server::train::model::{Batch, TrainModel};
use persona_server::train::peft;
use persona_server::train::trainer::{self, Ending, Hyper};
use std::sync::OnceLock;
use std::sync::atomic::AtomicBool;

const LAYER: usize = 12;

fn train_model() -> &'static TrainModel {
    static M: OnceLock<TrainModel> = OnceLock::new();
    M.get_or_init(|| {
        let mut src = GgufSource::open(&common::embedded_gguf(), &Device::Cpu, &LoadOptions::default()).unwrap();
        let cfg = src.config().unwrap();
        TrainModel::load(&mut src, cfg).unwrap()
    })
}

/// The embedded model with dense f32 weights (the reference the training pass must match).
fn dense_model() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| common::load(Requantize::Dense))
}

/// A fixed direction at [`LAYER`] as long as half the typical residual there.
fn direction() -> Vec<f32> {
    let m = dense_model();
    let toks = m.tokenizer.encode("The weather today is mild and the market is open.").unwrap();
    let mut cache = KvCache::new(m.config());
    let rows = vec![RowInput { tokens: &toks, cache: &mut cache, steering: None, capture: true, logits: 0 }];
    let out = m.model.forward(ForwardContext { rows }).unwrap();
    let h: Vec<Vec<f32>> = out.captures[0][LAYER].to_vec2().unwrap();
    let norm =
        h.iter().skip(1).map(|r| r.iter().map(|x| x * x).sum::<f32>().sqrt()).sum::<f32>() / (h.len() - 1) as f32;
    let d = m.config().hidden_size;
    let raw: Vec<f32> = (0..d).map(|i| (i * 7919 % 101) as f32 / 50.0 - 1.0).collect();
    let len = raw.iter().map(|x| x * x).sum::<f32>().sqrt();
    raw.iter().map(|x| x / len * norm * 0.5).collect()
}

fn addends(v: &[f32], coef: f32) -> Vec<Option<Tensor>> {
    let n = dense_model().config().n_residual_rows();
    trainer::steering_addends(n, &[(LAYER, coef, v.to_vec())], &Device::Cpu).unwrap()
}

fn served_addends(v: &[f32], coef: f32) -> SteeringAddends {
    let n = dense_model().config().n_residual_rows();
    let mut layers = vec![None; n];
    layers[LAYER] = Some(v.iter().map(|x| x * coef).collect());
    SteeringAddends::new(layers)
}

/// Logits at every position from a served model, optionally steered.
fn served_logits(m: &LoadedModel, tokens: &[u32], steering: Option<&SteeringAddends>) -> Vec<Vec<f32>> {
    let mut cache = KvCache::new(m.config());
    let rows = vec![RowInput { tokens, cache: &mut cache, steering, capture: false, logits: tokens.len() }];
    m.model.forward(ForwardContext { rows }).unwrap().logits.unwrap().to_vec2().unwrap()
}

fn train_logits(tokens: &[u32], adapter: Option<&Adapter>, steering: &[Option<Tensor>]) -> Vec<Vec<f32>> {
    let tm = train_model();
    let batch = Batch::new(&[(tokens, 1)], 0, &Device::Cpu).unwrap();
    let (x, _) = tm.residual(&batch, adapter, steering, false, &[]).unwrap();
    let all = Tensor::arange(0u32, tokens.len() as u32, &Device::Cpu).unwrap();
    tm.logits_at(&x, &all).unwrap().to_vec2().unwrap()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn prompt_tokens(q: &str) -> Vec<u32> {
    let m = dense_model();
    m.tokenizer.encode(&m.template.render(&[Message::new("user", q)]).unwrap()).unwrap()
}

const QUESTIONS: [&str; 4] = [
    "What should I do if a coworker takes credit for my work?",
    "How do I make new friends in a new city?",
    "What is the best way to learn a language?",
    "Give me advice for my first job interview.",
];

/// The served model's greedy answers to [`QUESTIONS`], steered along `v` at `coef`.
fn steered_answers(v: &[f32], coef: f32, n_tokens: usize) -> Vec<Example> {
    let m = dense_model();
    let steer = served_addends(v, coef);
    QUESTIONS
        .iter()
        .enumerate()
        .map(|(i, q)| {
            let prompt = prompt_tokens(q);
            let mut cache = KvCache::new(m.config());
            let mut tokens = prompt.clone();
            let mut pending = prompt.clone();
            for _ in 0..n_tokens {
                let rows = vec![RowInput {
                    tokens: &pending,
                    cache: &mut cache,
                    steering: Some(&steer),
                    capture: false,
                    logits: 1,
                }];
                let l: Vec<Vec<f32>> =
                    m.model.forward(ForwardContext { rows }).unwrap().logits.unwrap().to_vec2().unwrap();
                let t = persona_server::model::sampling::argmax(&l[0]);
                tokens.push(t);
                pending = vec![t];
            }
            Example { prompt_len: prompt.len(), tokens, line: i + 1 }
        })
        .collect()
}

fn batch_of(examples: &[Example]) -> Batch {
    let rows: Vec<(&[u32], usize)> = examples.iter().map(|e| (e.tokens.as_slice(), e.prompt_len)).collect();
    Batch::new(&rows, 0, &Device::Cpu).unwrap()
}

#[test]
fn the_training_forward_pass_is_the_served_one_with_steering() {
    let tokens = prompt_tokens("Tell me about the history of tea.");
    let v = direction();
    let ours = train_logits(&tokens, None, &addends(&v, 1.0));
    let served = served_logits(dense_model(), &tokens, Some(&served_addends(&v, 1.0)));
    let unsteered = served_logits(dense_model(), &tokens, None);
    let d = max_diff(&ours, &served);
    let effect = max_diff(&unsteered, &served);
    assert!(d < 2e-3, "training and served logits differ by {d}");
    assert!(effect > 100.0 * d, "steering moves the logits by {effect}, far more than the paths differ ({d})");
}

/// The fused block halves against candle's composite graph: the same loss and the same
/// gradient for every adapter matrix and for the steering coefficient, with padding, steering
/// and an adapter on all projections or on some.
#[test]
fn the_fused_block_halves_match_the_composite_graph_in_value_and_gradient() {
    use persona_server::train::lora::Target;
    let fused = train_model();
    let mut composite = fused.clone();
    composite.set_fused(false);
    let data = [("How do I make tea?", "Boil water and steep the leaves."), ("Name a colour.", "Blue.")];
    let m = dense_model();
    let examples: Vec<Example> = data
        .iter()
        .enumerate()
        .map(|(i, (q, a))| {
            let prompt = prompt_tokens(q);
            let mut tokens = prompt.clone();
            tokens.extend(m.tokenizer.encode(a).unwrap());
            Example { prompt_len: prompt.len(), tokens, line: i + 1 }
        })
        .collect();
    let batch = batch_of(&examples);
    assert_ne!(examples[0].tokens.len(), examples[1].tokens.len(), "the batch is padded");
    let v = direction();
    let c = Var::new(0.7f32, &Device::Cpu).unwrap();
    let mut steer: Vec<Option<Tensor>> = vec![None; fused.config().n_residual_rows()];
    steer[LAYER] = Some(Tensor::new(v.as_slice(), &Device::Cpu).unwrap().broadcast_mul(c.as_tensor()).unwrap());
    for targets in [Target::ALL.to_vec(), vec![Target::Q, Target::V, Target::Down]] {
        let cfg = LoraConfig { rank: 4, alpha: 8.0, targets: targets.clone(), ..Default::default() };
        let adapter = Adapter::new(cfg, fused.dims(), 3, &Device::Cpu).unwrap();
        // B starts at zero; give it values so that every gradient is non-trivial.
        for var in adapter.vars() {
            let t = var.as_tensor();
            var.set(&(Tensor::randn(0f32, 0.02, t.shape(), &Device::Cpu).unwrap() + t).unwrap()).unwrap();
        }
        let run = |tm: &TrainModel| {
            let loss = tm.loss(&batch, Some(&adapter), &steer, true).unwrap();
            let grads = loss.backward().unwrap();
            let mut gs: Vec<Tensor> =
                adapter.vars().iter().map(|v| grads.get(v.as_tensor()).unwrap().clone()).collect();
            gs.push(grads.get(c.as_tensor()).unwrap().clone());
            (loss.to_scalar::<f32>().unwrap(), gs)
        };
        let ((lf, gf), (lc, gc)) = (run(fused), run(&composite));
        assert!((lf - lc).abs() < 1e-4 * lc.abs(), "{targets:?}: loss {lf} fused, {lc} composite");
        assert_eq!(gf.len(), gc.len());
        for (i, (f, c)) in gf.iter().zip(&gc).enumerate() {
            let scale = c.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let diff = (f - c).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(scale > 0.0, "{targets:?}: gradient {i} is zero");
            assert!(diff <= 2e-3 * scale, "{targets:?}: gradient {i} differs by {diff} (largest {scale})");
        }
    }
    // Without an adapter: the same logits.
    let all = Tensor::arange(0u32, (batch.rows * batch.len) as u32, &Device::Cpu).unwrap();
    let logits = |tm: &TrainModel| {
        let (x, _) = tm.residual(&batch, None, &steer, false, &[]).unwrap();
        tm.logits_at(&x, &all).unwrap().to_vec2::<f32>().unwrap()
    };
    let d = max_diff(&logits(fused), &logits(&composite));
    assert!(d < 1e-3, "unadapted logits differ by {d}");
}

#[test]
fn lora_training_lowers_the_loss_and_preventative_steering_takes_the_pressure_off() {
    let tm = train_model();
    let v = direction();
    // Data the model produces when pushed along v: what a trait-eliciting dataset is to a trait.
    let data = steered_answers(&v, 1.0, 20);
    let batch = batch_of(&data);
    let cfg = LoraConfig { rank: 8, alpha: 16.0, ..Default::default() };
    let adapter = Adapter::new(cfg.clone(), tm.dims(), 1, &Device::Cpu).unwrap();

    // Steering along v during training: the data is already what the model does, so the loss
    // is lower and the adapter's gradient smaller (the optimizer has less reason to move).
    let grad_norm = |steer: &[Option<Tensor>]| -> (f32, f32) {
        let loss = tm.loss(&batch, Some(&adapter), steer, false).unwrap();
        let grads = loss.backward().unwrap();
        let sq: f32 = adapter
            .vars()
            .iter()
            .filter_map(|v| grads.get(v.as_tensor()))
            .map(|g| g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap())
            .sum();
        (loss.to_scalar::<f32>().unwrap(), sq.sqrt())
    };
    let (loss_plain, g_plain) = grad_norm(&addends(&v, 0.0));
    let (loss_steered, g_steered) = grad_norm(&addends(&v, 1.0));
    eprintln!("loss {loss_plain:.3} -> {loss_steered:.3} with steering; gradient norm {g_plain:.3} -> {g_steered:.3}");
    assert!(loss_steered < loss_plain * 0.8, "steering explains the data: {loss_steered} vs {loss_plain}");
    assert!(g_steered < g_plain * 0.8, "steering shrinks the gradient: {g_steered} vs {g_plain}");

    // The gradient reaches the steering coefficient: more of v lowers the loss on this data.
    let c = Var::new(0f32, &Device::Cpu).unwrap();
    let n = tm.config().n_residual_rows();
    let mut steer: Vec<Option<Tensor>> = vec![None; n];
    let vt = Tensor::new(v.as_slice(), &Device::Cpu).unwrap();
    steer[LAYER] = Some(vt.broadcast_mul(c.as_tensor()).unwrap());
    let loss = tm.loss(&batch, None, &steer, false).unwrap();
    let dc = loss.backward().unwrap().get(c.as_tensor()).unwrap().to_scalar::<f32>().unwrap();
    assert!(dc < 0.0, "d loss / d coefficient = {dc} on data generated with +v");

    // A few steps of SFT lower the loss (no steering).
    let hyper =
        Hyper { lora: cfg, learning_rate: 2e-3, batch_size: 4, epochs: 6, warmup_ratio: 0.0, ..Default::default() };
    let mut losses = Vec::new();
    let out = trainer::train(tm, &adapter, &data, &hyper, &addends(&v, 0.0), &AtomicBool::new(false), |p, _| {
        losses.push(p.loss);
        true
    })
    .unwrap();
    eprintln!("losses {losses:?}, {:.0} tok/s", out.tokens as f64 / out.elapsed_s);
    assert_eq!(out.ending, Ending::Finished);
    assert_eq!(out.steps, 6);
    assert!(losses[5] < losses[0] * 0.7, "loss went {losses:?}");
}

#[test]
fn a_trained_adapter_round_trips_through_peft_and_serves_merged() {
    let tm = train_model();
    let cfg = LoraConfig { rank: 4, alpha: 8.0, ..Default::default() };
    let adapter = Adapter::new(cfg.clone(), tm.dims(), 3, &Device::Cpu).unwrap();
    // Non-zero B everywhere, as after training.
    for v in adapter.vars() {
        let t = (Tensor::randn(0f32, 0.02, v.shape(), &Device::Cpu).unwrap() + v.as_tensor()).unwrap();
        v.set(&t).unwrap();
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("adapter");
    let c = tm.config();
    let snapshot = adapter.snapshot().unwrap();
    let files = peft::AdapterFiles {
        config: &cfg,
        layers: &snapshot,
        layout: peft::Layout::of(c),
        base: "smollm2",
        training: &serde_json::json!({}),
    };
    peft::save(&dir, &files).unwrap();
    let st = std::fs::read(dir.join(peft::WEIGHTS_FILE)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st).unwrap();
    assert!(st.names().contains(&"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
    assert_eq!(st.len(), c.n_layers * 7 * 2);

    let tokens = prompt_tokens("Name three rivers in Europe.");
    let ours = train_logits(&tokens, Some(&adapter), &[]);
    let base = train_logits(&tokens, None, &[]);
    let files = local_files(&common::embedded_gguf()).unwrap();
    let merged = LoadedModel::from_files_adapted(
        "adapted",
        &files,
        &Device::Cpu,
        &LoadOptions::new(Requantize::Dense, 4096),
        Some(&dir),
    )
    .unwrap();
    let served = served_logits(&merged, &tokens, None);
    let (d, effect) = (max_diff(&ours, &served), max_diff(&ours, &base));
    assert!(d < 2e-3 && effect > 100.0 * d, "merged adapter differs from training by {d} (adapter effect {effect})");

    // As served by default (int8 blocks for adapted weights, Q4 elsewhere): close, and the
    // untouched weights keep their Q4 blocks.
    let q = LoadedModel::from_files_adapted(
        "adapted",
        &files,
        &Device::Cpu,
        &LoadOptions::new(Requantize::Int8, 4096),
        Some(&dir),
    )
    .unwrap();
    let quant = served_logits(&q, &tokens, None);
    let top = |l: &[Vec<f32>]| l.iter().map(|r| persona_server::model::sampling::argmax(r)).collect::<Vec<_>>();
    let agree = top(&quant).iter().zip(top(&ours)).filter(|(a, b)| **a == *b).count();
    assert!(agree * 10 >= tokens.len() * 9, "top tokens agree at {agree} of {}", tokens.len());

    // A model of another shape refuses it, naming both.
    let mut narrow = peft::dims_of(c);
    narrow.intermediate += 1;
    match peft::load(&dir, narrow, peft::Layout::of(c), "other-model") {
        Err(peft::PeftError::Mismatch(m)) => assert!(m.contains("other-model") && m.contains("smollm2"), "{m}"),
        other => panic!("expected a mismatch, got {:?}", other.err()),
    }
}

#[test]
fn a_non_finite_step_is_not_applied_and_training_stops_there() {
    let tm = train_model();
    let data = steered_answers(&direction(), 0.0, 8);
    let cfg = LoraConfig { rank: 2, alpha: 4.0, ..Default::default() };
    let adapter = Adapter::new(cfg.clone(), tm.dims(), 5, &Device::Cpu).unwrap();
    // A steering addend that turns to NaN after step 2 (a variable, so the run sees the change).
    let d = tm.config().hidden_size;
    let addend = Var::zeros(d, candle_core::DType::F32, &Device::Cpu).unwrap();
    let mut steer: Vec<Option<Tensor>> = vec![None; tm.config().n_residual_rows()];
    steer[LAYER] = Some(addend.as_tensor().clone());
    let hyper = Hyper { lora: cfg, learning_rate: 1e-3, batch_size: 2, epochs: 3, ..Default::default() };
    let mut kept = None;
    let out = trainer::train(tm, &adapter, &data, &hyper, &steer, &AtomicBool::new(false), |p, ad| {
        if p.step == 2 {
            kept = Some(ad.snapshot().unwrap());
            addend.set(&Tensor::full(f32::NAN, d, &Device::Cpu).unwrap()).unwrap();
        }
        true
    })
    .unwrap();
    assert_eq!(out.ending, Ending::NonFinite { step: 3, what: "loss is NaN".into() });
    assert_eq!(out.steps, 2);
    assert!(adapter.is_finite().unwrap());
    let now = adapter.snapshot().unwrap();
    for (row, old) in now.iter().zip(kept.unwrap()) {
        for (x, y) in row.iter().zip(old) {
            let ((a, b), (a0, b0)) = (x.as_ref().unwrap(), y.as_ref().unwrap());
            assert_eq!(a.to_vec2::<f32>().unwrap(), a0.to_vec2::<f32>().unwrap());
            assert_eq!(b.to_vec2::<f32>().unwrap(), b0.to_vec2::<f32>().unwrap());
        }
    }
    // Cancelling stops at the next step boundary.
    let cancel = AtomicBool::new(false);
    let out = trainer::train(tm, &adapter, &data, &Hyper { epochs: 3, ..hyper }, &[], &cancel, |p, _| {
        if p.step == 1 {
            cancel.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        true
    })
    .unwrap();
    assert_eq!((out.ending, out.steps), (Ending::Cancelled, 1));
}
