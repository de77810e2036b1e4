//! The llama-family forward pass on the embedded SmolLM2 GGUF: agreement with candle's
//! reference implementation, packed batching, tokenizer and chat template.

mod common;

use candle_core::{Device, Tensor};
use persona_server::model::arch::llama::{ForwardContext, KvCache, RowInput};
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
    packed_rows_match_solo_runs_on(&common::served_model());
}

#[test]
fn packed_rows_match_solo_runs_on_the_device_path() {
    packed_rows_match_solo_runs_on(&device_path_model());
}

fn packed_rows_match_solo_runs_on(m: &persona_server::model::LoadedModel) {
    let texts =
        ["The capital of France is", "1, 2, 3, 4,", "Once upon a time, in a small village by the sea, there lived"];
    let prompts: Vec<Vec<u32>> = texts.iter().map(|t| m.tokenizer.encode(t).unwrap()).collect();
    assert!(prompts.iter().map(Vec::len).collect::<std::collections::HashSet<_>>().len() > 1, "lengths differ");
    let (solo, solo_logits) = greedy(m, &prompts, 8, false);
    let (packed, packed_logits) = greedy(m, &prompts, 8, true);
    assert_eq!(solo, packed);
    for (a, b) in solo_logits.iter().zip(&packed_logits) {
        let d = max_abs_diff(a, b);
        assert!(d < 1e-4, "logits differ by {d}");
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

fn steering_changes_logits_only_where_applied_on(m: &persona_server::model::LoadedModel) {
    let c = m.config();
    let prompt = m.tokenizer.encode("The weather today is").unwrap();
    let mut addends: Vec<Option<Vec<f32>>> = vec![None; c.n_residual_rows()];
    addends[10] = Some((0..c.hidden_size).map(|i| if i % 2 == 0 { 4.0 } else { -4.0 }).collect());
    let run = |steer: Option<&[Option<Vec<f32>>]>| -> (Vec<f32>, Vec<Vec<f32>>) {
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
