//! The llama-family forward pass on the embedded SmolLM2 GGUF: agreement with candle's
//! reference implementation, packed batching, tokenizer and chat template.

mod common;

use candle_core::{Device, Tensor};
use persona_server::model::arch::llama::{ForwardContext, KvCache, RowInput, SteeringAddends};
use persona_server::model::chat::Message;
use persona_server::model::weights::Requantize;

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn reference_model(path: &std::path::Path) -> candle_transformers::models::quantized_llama::ModelWeights {
    let mut file = std::fs::File::open(path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    candle_transformers::models::quantized_llama::ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap()
}

fn ours_step(m: &persona_server::model::LoadedModel, cache: &mut KvCache, tokens: &[u32]) -> Vec<f32> {
    let rows = vec![RowInput { tokens, cache, steering: None, capture: false, logits: 1 }];
    m.model.forward(ForwardContext { rows }).unwrap().logits.unwrap().squeeze(0).unwrap().to_vec1().unwrap()
}

fn reference_step(
    r: &mut candle_transformers::models::quantized_llama::ModelWeights,
    tokens: &[u32],
    pos: usize,
) -> Vec<f32> {
    let input = Tensor::new(tokens, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    r.forward(&input, pos).unwrap().squeeze(0).unwrap().to_vec1().unwrap()
}

/// Token by token, both implementations run the same kernels on the same shapes, so the logits
/// agree exactly at every position of a chat prompt and during greedy decoding.
#[test]
fn logits_match_candle_quantized_llama_token_by_token() {
    let mut reference = reference_model(&common::embedded_gguf());
    // Same weights and attention arithmetic as the reference: no re-quantization, tensor ops.
    let ours = common::load_with_tensor_attention(Requantize::None);
    let prompt =
        ours.tokenizer.encode("<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n").unwrap();
    let mut cache = KvCache::new(ours.config());
    let mut tokens = prompt.clone();
    for pos in 0..prompt.len() + 6 {
        let want = reference_step(&mut reference, &tokens[pos..pos + 1], pos);
        let got = ours_step(&ours, &mut cache, &tokens[pos..pos + 1]);
        let diff = max_abs_diff(&got, &want);
        assert!(diff < 1e-4, "position {pos}: logits differ by {diff}");
        if pos + 1 >= tokens.len() {
            tokens.push(persona_server::model::sampling::argmax(&got));
        }
    }
}

/// Host-loop attention (the CPU default) against tensor-op attention on float weights, where
/// no activation quantization can magnify rounding: the logits agree closely, token by token
/// and for whole-prompt prefill, with the same greedy tokens.
#[test]
fn host_attention_matches_tensor_attention() {
    let host = common::load(Requantize::F32);
    let tensor = common::load_with_tensor_attention(Requantize::F32);
    let prompt =
        host.tokenizer.encode("<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n").unwrap();
    let (mut hc, mut tc) = (KvCache::new(host.config()), KvCache::new(tensor.config()));
    // Prefill in two chunks (the second sees a cached prefix), then decode token by token.
    let split = prompt.len() / 2;
    let mut last = Vec::new();
    for chunk in [&prompt[..split], &prompt[split..]] {
        let (a, b) = (ours_step(&host, &mut hc, chunk), ours_step(&tensor, &mut tc, chunk));
        assert!(max_abs_diff(&a, &b) < 2e-3, "prefill chunk: {}", max_abs_diff(&a, &b));
        last = a;
    }
    let mut next = vec![persona_server::model::sampling::argmax(&last)];
    for step in 0..8 {
        let (a, b) = (ours_step(&host, &mut hc, &next), ours_step(&tensor, &mut tc, &next));
        let diff = max_abs_diff(&a, &b);
        assert!(diff < 2e-3, "decode step {step}: logits differ by {diff}");
        let (ga, gb) = (persona_server::model::sampling::argmax(&a), persona_server::model::sampling::argmax(&b));
        assert_eq!(ga, gb, "decode step {step}");
        next = vec![ga];
    }
}

/// The served path keeps the GGUF's Q4_1 weights bit for bit (int4 blocks) and quantizes
/// activations to int8 blocks of 32 like candle's kernel does (the tied output layer is Q8_0 in
/// the file and goes to int8 blocks too). Against the float yardstick (same weights, no
/// activation quantization) both drift by ~0.2 logits on average. A single rounding step can
/// flip an activation's 8-bit bucket and move one position's logits by tenths, so the drift is
/// averaged over a fixed conversation fed token by token (~60 positions): ours must stay within
/// 25% of the reference's, and both must pick the same top token at nearly every position.
#[test]
fn served_block_kernels_drift_like_the_reference() {
    let mut reference = reference_model(&common::embedded_gguf());
    let ours = common::served_model();
    let exact = common::load(Requantize::F32);
    let tokens = ours
        .tokenizer
        .encode(
            "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\nRed, green and blue are three \
             colours. Red is the colour of ripe tomatoes, green the colour of fresh grass, and blue the colour of a \
             clear summer sky.<|im_end|>\n",
        )
        .unwrap();
    let (mut ours_cache, mut exact_cache) = (KvCache::new(ours.config()), KvCache::new(exact.config()));
    let steps = tokens.len();
    let mean_diff =
        |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| f64::from((x - y).abs())).sum::<f64>() / a.len() as f64;
    let (mut ours_err, mut ref_err, mut same_top) = (0f64, 0f64, 0);
    for pos in 0..steps {
        let want = ours_step(&exact, &mut exact_cache, &tokens[pos..pos + 1]);
        let got = ours_step(&ours, &mut ours_cache, &tokens[pos..pos + 1]);
        let theirs = reference_step(&mut reference, &tokens[pos..pos + 1], pos);
        ours_err += mean_diff(&got, &want) / steps as f64;
        ref_err += mean_diff(&theirs, &want) / steps as f64;
        let argmax = persona_server::model::sampling::argmax;
        same_top += usize::from(argmax(&got) == argmax(&theirs));
    }
    eprintln!(
        "mean |logit error| vs f32 weights over {steps} positions: served {ours_err:.4}, candle reference \
         {ref_err:.4}; same top token at {same_top}"
    );
    assert!(ours_err <= ref_err * 1.25, "served kernels drift more ({ours_err}) than the reference ({ref_err})");
    assert!(same_top * 10 >= steps * 9, "top token agrees with the reference at only {same_top} of {steps} positions");
}

/// Logits at every position of `tokens`, prefilled at once.
fn all_logits(m: &persona_server::model::LoadedModel, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = KvCache::new(m.config());
    let rows = vec![RowInput { tokens, cache: &mut cache, steering: None, capture: false, logits: tokens.len() }];
    let logits = m.model.forward(ForwardContext { rows }).unwrap().logits.unwrap();
    logits.to_vec2().unwrap()
}

fn mean_kl(reference: &[Vec<f32>], got: &[Vec<f32>]) -> f64 {
    let kl = persona_server::model::sampling::kl_divergence;
    reference.iter().zip(got).map(|(p, q)| kl(p, q)).sum::<f64>() / reference.len() as f64
}

/// Fidelity to the reference weights (the GGUF dequantized to f32) on a fixed chat exchange:
/// the served kernels' mean KL divergence per position stays under a bound the default meets
/// with margin (measured 1.2e-3 here, where one-level activations measure 2.4e-3 and fail it;
/// llama.cpp measures 3.0e-3 on scripts/bench-fidelity's corpus), the precision setting orders
/// the three levels, and `exact` is the reference to rounding.
#[test]
fn served_kernels_stay_close_to_the_f32_reference() {
    use persona_server::model::weights::Precision;
    let text = "<|im_start|>user\nWhat is 17 times 3?<|im_end|>\n<|im_start|>assistant\n17 times 3 is 51. You can \
                check it by adding 17 three times: 17 + 17 = 34, and 34 + 17 = 51.<|im_end|>\n<|im_start|>user\nAnd \
                17 times 4?<|im_end|>\n<|im_start|>assistant\nThat is 68, one more 17 on top of 51.<|im_end|>\n";
    let reference = common::load(Requantize::F32);
    let tokens = reference.tokenizer.encode(text).unwrap();
    let want = all_logits(&reference, &tokens);
    let kl = |precision| {
        let files = persona_server::model::source::local_files(&common::embedded_gguf()).unwrap();
        let opts = persona_server::model::LoadOptions {
            precision,
            ..persona_server::model::LoadOptions::new(Requantize::Int8, 4096)
        };
        let m = persona_server::model::LoadedModel::from_files("m", &files, &Device::Cpu, &opts).unwrap();
        mean_kl(&want, &all_logits(&m, &tokens))
    };
    let (balanced, fast, exact) = (kl(Precision::Balanced), kl(Precision::Fast), kl(Precision::Exact));
    eprintln!(
        "mean KL vs f32 over {} positions: balanced {balanced:.3e}, fast {fast:.3e}, exact {exact:.3e}",
        tokens.len()
    );
    assert!(balanced < 2e-3, "served (balanced) kernels drift from the f32 reference: mean KL {balanced}");
    assert!(balanced < fast, "two-level activations ({balanced}) are no closer than one level ({fast})");
    assert!(exact < 1e-5, "exact precision strays from the f32 reference: mean KL {exact}");
}

/// The GPU's default configuration (dense f16 weights, f16 activations and KV cache, f32
/// residual stream, softmax and output head), run on the CPU: on the same chat exchange its
/// mean KL from the f32 reference (measured 5.5e-6) stays far below the served CPU kernels'
/// bound, and bf16 (measured 4.4e-4)
/// (3 fewer mantissa bits) within it.
#[test]
fn the_gpu_configuration_stays_close_to_the_f32_reference() {
    use persona_server::model::weights::ComputeDtype;
    let text = "<|im_start|>user\nWhat is 17 times 3?<|im_end|>\n<|im_start|>assistant\n17 times 3 is 51. You can \
                check it by adding 17 three times: 17 + 17 = 34, and 34 + 17 = 51.<|im_end|>\n";
    let reference = common::load(Requantize::F32);
    let tokens = reference.tokenizer.encode(text).unwrap();
    let want = all_logits(&reference, &tokens);
    let f16 = mean_kl(&want, &all_logits(&common::load_gpu_configuration(ComputeDtype::F16), &tokens));
    let bf16 = mean_kl(&want, &all_logits(&common::load_gpu_configuration(ComputeDtype::Bf16), &tokens));
    eprintln!("mean KL vs f32 over {} positions: f16 {f16:.3e}, bf16 {bf16:.3e}", tokens.len());
    assert!(f16 < F16_KL_BOUND, "the f16 device path drifts from the f32 reference: mean KL {f16}");
    assert!(bf16 < 2e-3, "the bf16 device path drifts from the f32 reference: mean KL {bf16}");
    assert!(f16 < bf16, "f16 ({f16}) is no closer than bf16 ({bf16})");
}

/// Bound on the f16 device path's mean KL from the f32 reference on a short chat exchange.
const F16_KL_BOUND: f64 = 5e-5;

/// Whole-prompt prefill: activations are quantized to 8 bits inside every matmul, so a float
/// rounding difference of ~1e-7 in attention (different matmul shapes) can flip a quantization
/// bucket and move logits by a few tenths. The reference shows the same spread between its own
/// prefill and token-by-token modes; we hold ours to that spread and to the same top token.
#[test]
fn prefill_logits_match_candle_quantized_llama() {
    let path = common::embedded_gguf();
    let ours = common::load_with_tensor_attention(Requantize::None);
    let text = "The quick brown fox jumps over the lazy dog and then it runs away into the forest near the river";
    let all = ours.tokenizer.encode(text).unwrap();
    let mut exact = 0;
    for n in [1usize, 2, 5, 9, 12, 17, 20] {
        let prompt = &all[..n];
        let mut reference = reference_model(&path);
        let want = reference_step(&mut reference, prompt, 0);
        let got = ours_step(&ours, &mut KvCache::new(ours.config()), prompt);
        let diff = max_abs_diff(&got, &want);
        assert!(diff < 1.0, "n={n}: prefill logits differ by {diff}");
        assert_eq!(
            persona_server::model::sampling::argmax(&got),
            persona_server::model::sampling::argmax(&want),
            "n={n}: top token differs"
        );
        exact += usize::from(diff == 0.0);
    }
    assert!(exact >= 4, "only {exact} of 7 prefills agreed exactly");
}

/// Greedy-decodes each prompt `steps` tokens; rows are run together when `packed`.
fn greedy(
    model: &persona_server::model::LoadedModel,
    prompts: &[Vec<u32>],
    steps: usize,
    packed: bool,
) -> (Vec<Vec<u32>>, Vec<Vec<f32>>) {
    let mut caches: Vec<KvCache> = prompts.iter().map(|_| KvCache::new(model.config())).collect();
    let mut pending: Vec<Vec<u32>> = prompts.to_vec();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let mut last_logits = vec![Vec::new(); prompts.len()];
    for _ in 0..steps {
        let groups: Vec<Vec<usize>> =
            if packed { vec![(0..prompts.len()).collect()] } else { (0..prompts.len()).map(|i| vec![i]).collect() };
        for group in groups {
            let rows = caches
                .iter_mut()
                .zip(&pending)
                .enumerate()
                .filter(|(i, _)| group.contains(i))
                .map(|(_, (cache, toks))| RowInput { tokens: toks, cache, steering: None, capture: false, logits: 1 })
                .collect();
            let logits: Vec<Vec<f32>> =
                model.model.forward(ForwardContext { rows }).unwrap().logits.unwrap().to_vec2().unwrap();
            for (&i, l) in group.iter().zip(logits) {
                let t = persona_server::model::sampling::argmax(&l);
                out[i].push(t);
                last_logits[i] = l;
            }
        }
        for (p, o) in pending.iter_mut().zip(&out) {
            *p = vec![*o.last().unwrap()];
        }
    }
    (out, last_logits)
}

/// The device path (what CUDA and Metal run: candle's matmuls and tensor-op attention, no host
/// kernels), exercised on the CPU so every CI run covers the code a GPU would execute.
fn device_path_model() -> persona_server::model::LoadedModel {
    common::load_with_tensor_attention(Requantize::None)
}

#[test]
fn packed_rows_match_solo_runs() {
    packed_rows_match_solo_runs_on(&common::served_model(), 1e-4);
}

#[test]
fn packed_rows_match_solo_runs_on_the_device_path() {
    packed_rows_match_solo_runs_on(&device_path_model(), 1e-4);
}

fn packed_rows_match_solo_runs_on(m: &persona_server::model::LoadedModel, tolerance: f32) {
    let texts =
        ["The capital of France is", "1, 2, 3, 4,", "Once upon a time, in a small village by the sea, there lived"];
    let prompts: Vec<Vec<u32>> = texts.iter().map(|t| m.tokenizer.encode(t).unwrap()).collect();
    assert!(prompts.iter().map(Vec::len).collect::<std::collections::HashSet<_>>().len() > 1, "lengths differ");
    let (solo, solo_logits) = greedy(m, &prompts, 8, false);
    let (packed, packed_logits) = greedy(m, &prompts, 8, true);
    assert_eq!(solo, packed);
    for (a, b) in solo_logits.iter().zip(&packed_logits) {
        let d = max_abs_diff(a, b);
        assert!(d < tolerance, "logits differ by {d}");
    }
}

/// In f16 a matmul's rounding depends on its shapes (as cuBLAS's does), so a row's logits move
/// by a few hundredths between a solo and a packed run; the greedy tokens stay the same.
#[test]
fn packed_rows_match_solo_runs_in_the_gpu_configuration() {
    let m = common::load_gpu_configuration(persona_server::model::weights::ComputeDtype::F16);
    packed_rows_match_solo_runs_on(&m, 0.2);
}

/// The device path's pooled KV cache: caches lease slots and give them back on drop, a slot
/// handed out again starts clean, and rows attend correctly whatever the order of their slots
/// (consecutive slots are read in place, others gathered) and however their histories differ
/// in length: every row of a mixed pass matches the same sequence run alone.
#[test]
fn pooled_kv_slots_are_reused_and_rows_attend_in_any_slot_order() {
    let m = device_path_model();
    let texts = ["The capital of France is", "1, 2, 3, 4, 5, 6, 7,", "Once upon a time", "Water boils at"];
    let prompts: Vec<Vec<u32>> = texts.iter().map(|t| m.tokenizer.encode(t).unwrap()).collect();
    let last = |out: persona_server::model::arch::llama::ForwardOutput| -> Vec<Vec<f32>> {
        out.logits.unwrap().to_vec2().unwrap()
    };
    // Logits after `tokens`, run alone from an empty cache.
    let alone = |tokens: &[u32]| all_logits(&m, tokens).pop().unwrap();
    let prefill = |tokens: &[u32]| {
        let mut cache = KvCache::new(m.config());
        let rows = vec![RowInput { tokens, cache: &mut cache, steering: None, capture: false, logits: 1 }];
        m.model.forward(ForwardContext { rows }).unwrap();
        cache
    };
    let (mut a, b, mut c) = (prefill(&prompts[0]), prefill(&prompts[1]), prefill(&prompts[2]));
    let slots_before = m.model.kv_pool_bytes();
    drop(b);
    // The fourth prompt takes the second one's slot back, cleaned.
    let mut d = prefill(&prompts[3]);
    assert_eq!(m.model.kv_pool_bytes(), slots_before, "a freed slot is reused before the pool grows");
    // One pass: two decode rows whose slots are out of order, and a two-token chunk.
    let (ta, tc, td) = ([11u32], [12u32], [13u32, 14]);
    let rows = vec![
        RowInput { tokens: &tc, cache: &mut c, steering: None, capture: false, logits: 1 },
        RowInput { tokens: &td, cache: &mut d, steering: None, capture: false, logits: 1 },
        RowInput { tokens: &ta, cache: &mut a, steering: None, capture: false, logits: 1 },
    ];
    let got = last(m.model.forward(ForwardContext { rows }).unwrap());
    let with = |p: &[u32], extra: &[u32]| [p, extra].concat();
    let want = [alone(&with(&prompts[2], &tc)), alone(&with(&prompts[3], &td)), alone(&with(&prompts[0], &ta))];
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let d = max_abs_diff(g, w);
        assert!(d < 1e-3, "row {i} differs from its sequence run alone by {d}");
    }
}

#[test]
fn tokenizer_matches_smollm_conventions() {
    let m = common::served_model();
    let t = &m.tokenizer;
    assert_eq!(t.encode("<|im_start|>").unwrap(), vec![1]);
    assert_eq!(t.encode("<|im_end|>").unwrap(), vec![2]);
    assert!(t.is_eos(2));
    // Digits split one by one: "2025" is four tokens.
    let digits = t.encode("2025").unwrap();
    assert_eq!(digits.len(), 4, "{digits:?}");
    // No prefix space: "Hello" alone and at the start of a longer text encode alike.
    let hello = t.encode("Hello").unwrap();
    assert_eq!(hello.len(), 1);
    assert_eq!(t.encode("Hello world").unwrap()[0], hello[0]);
    for s in ["Hello, world! Ça va? 東京 🙂", "  two  spaces\nand\ttabs", "x = 3.14159"] {
        assert_eq!(t.decode(&t.encode(s).unwrap()).unwrap(), s);
    }
}

#[test]
fn chat_template_renders_chatml() {
    let m = common::served_model();
    let s = m.template.render(&[Message::new("system", "Be brief."), Message::new("user", "Hi")]).unwrap();
    assert_eq!(s, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    let ids = m.tokenizer.encode(&s).unwrap();
    assert_eq!(ids[0], 1);
    assert_eq!(ids.iter().filter(|&&i| i == 1).count(), 3);
}

#[test]
fn steering_changes_logits_only_where_applied() {
    steering_changes_logits_only_where_applied_on(&common::served_model());
}

#[test]
fn steering_and_capture_work_the_same_on_the_device_path() {
    steering_changes_logits_only_where_applied_on(&device_path_model());
}

/// Steering addends go to the device once per batch composition: the same steered rows
/// prefilling and then decoding share one upload (per-row addends are spread over a chunk's
/// tokens on the device), and a change of rows uploads again.
#[test]
fn steering_addends_are_uploaded_once_per_batch_composition() {
    let m = device_path_model();
    let c = m.config();
    let steer = |seed: f32| {
        let mut layers = vec![None; c.n_residual_rows()];
        layers[6] = Some((0..c.hidden_size).map(|i| seed * ((i % 7) as f32 - 3.0)).collect());
        SteeringAddends::new(layers)
    };
    let (s1, s2) = (steer(0.5), steer(-0.5));
    let prompt = m.tokenizer.encode("The weather today is").unwrap();
    let (mut a, mut b) = (KvCache::new(c), KvCache::new(c));
    let step = |tokens: &[u32], a: &mut KvCache, b: &mut KvCache, first: &SteeringAddends| {
        let rows = vec![
            RowInput { tokens, cache: a, steering: Some(first), capture: false, logits: 1 },
            RowInput {
                tokens,
                cache: b,
                steering: Some(if first.id() == s1.id() { &s2 } else { &s1 }),
                capture: false,
                logits: 1,
            },
        ];
        m.model.forward(ForwardContext { rows }).unwrap();
    };
    let before = m.model.steering_uploads();
    step(&prompt, &mut a, &mut b, &s1);
    for _ in 0..5 {
        step(&[42], &mut a, &mut b, &s1);
    }
    assert_eq!(m.model.steering_uploads() - before, 1, "the same rows prefilling then decoding: one upload");
    step(&[42], &mut a, &mut b, &s2);
    assert_eq!(m.model.steering_uploads() - before, 2, "swapped steering is uploaded again");
}

#[test]
fn steering_and_capture_work_the_same_in_the_gpu_configuration() {
    steering_changes_logits_only_where_applied_on(&common::load_gpu_configuration(
        persona_server::model::weights::ComputeDtype::F16,
    ));
}

fn steering_changes_logits_only_where_applied_on(m: &persona_server::model::LoadedModel) {
    let c = m.config();
    let prompt = m.tokenizer.encode("The weather today is").unwrap();
    let mut layers: Vec<Option<Vec<f32>>> = vec![None; c.n_residual_rows()];
    layers[10] = Some((0..c.hidden_size).map(|i| if i % 2 == 0 { 4.0 } else { -4.0 }).collect());
    let addends = SteeringAddends::new(layers);
    let run = |steer: Option<&SteeringAddends>| -> (Vec<f32>, Vec<Vec<f32>>) {
        let mut cache = KvCache::new(c);
        let out = m
            .model
            .forward(ForwardContext {
                rows: vec![RowInput { tokens: &prompt, cache: &mut cache, steering: steer, capture: true, logits: 1 }],
            })
            .unwrap();
        let states = out.captures[0].iter().map(|s| s.flatten_all().unwrap().to_vec1().unwrap()).collect();
        (out.logits.unwrap().squeeze(0).unwrap().to_vec1().unwrap(), states)
    };
    let (plain, plain_states) = run(None);
    let (steered, steered_states) = run(Some(&addends));
    assert_eq!(plain_states.len(), c.n_residual_rows());
    assert!(max_abs_diff(&plain, &steered) > 1e-2);
    // Rows up to the hooked layer are untouched; from it on they differ.
    for l in 0..10 {
        assert_eq!(plain_states[l], steered_states[l], "layer {l}");
    }
    assert!(max_abs_diff(&plain_states[10], &steered_states[10]) >= 3.99);
}
