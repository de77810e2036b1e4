//! Gemma 3 270M, the second architecture (the packaged base model, fetched like the embedded
//! one): its SentencePiece tokenizer, the forward pass against candle's reference and the f32
//! yardstick, sliding-window attention on both attention paths, and the residual hooks.

mod common;

use candle_core::{Device, Tensor};
use persona_server::model::arch::llama::{ForwardContext, KvCache, RowInput, SteeringAddends};
use persona_server::model::cpu::elementwise::Activation;
use persona_server::model::sampling::argmax;
use persona_server::model::weights::Requantize;
use persona_server::model::{LoadOptions, LoadedModel};
use std::sync::{Arc, OnceLock};

fn gemma(requantize: Requantize) -> LoadedModel {
    common::load_gemma(&LoadOptions::new(requantize, 4096))
}

/// The served configuration, shared by the tests of this binary.
fn served() -> Arc<LoadedModel> {
    static M: OnceLock<Arc<LoadedModel>> = OnceLock::new();
    M.get_or_init(|| Arc::new(gemma(Requantize::Int8))).clone()
}

/// Next-token logits after feeding `tokens` to `cache`.
fn step(m: &LoadedModel, cache: &mut KvCache, tokens: &[u32]) -> Vec<f32> {
    let rows = vec![RowInput { tokens, cache, steering: None, capture: false, logits: 1 }];
    m.model.forward(ForwardContext { rows }).unwrap().logits.unwrap().squeeze(0).unwrap().to_vec1().unwrap()
}

/// Logits at every position of `tokens`, prefilled at once.
fn all_logits(m: &LoadedModel, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = KvCache::new(m.config());
    let rows = vec![RowInput { tokens, cache: &mut cache, steering: None, capture: false, logits: tokens.len() }];
    m.model.forward(ForwardContext { rows }).unwrap().logits.unwrap().to_vec2().unwrap()
}

fn greedy_text(m: &LoadedModel, prompt: &str, n: usize) -> String {
    let mut cache = KvCache::new(m.config());
    let mut next = m.tokenizer.encode_document(prompt).unwrap();
    let mut out = Vec::new();
    for _ in 0..n {
        let t = argmax(&step(m, &mut cache, &next));
        out.push(t);
        next = vec![t];
    }
    m.tokenizer.decode(&out).unwrap()
}

fn log_softmax(l: &[f32]) -> Vec<f64> {
    let max = l.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let z = l.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln() + max;
    l.iter().map(|&x| x as f64 - z).collect()
}

/// KL(reference ‖ got) of two next-token distributions.
fn kl(reference: &[f32], got: &[f32]) -> f64 {
    let (p, q) = (log_softmax(reference), log_softmax(got));
    p.iter().zip(&q).map(|(a, b)| a.exp() * (a - b)).sum()
}

/// A few hundred words of plain prose (the kind of text a base model reads).
fn prose(min_tokens: usize, m: &LoadedModel) -> Vec<u32> {
    let paragraph = "The river ran past the old mill, where the miller's daughter counted sacks of grain each \
                     morning before the carts came down from the hills. In winter the wheel froze, and the village \
                     ate what it had stored; in spring the water rose so high that the lower fields became a lake \
                     for a week, and children sailed bark boats across the meadow. ";
    let mut text = String::new();
    let mut ids = Vec::new();
    let mut i = 0;
    while ids.len() < min_tokens {
        text.push_str(&format!("Chapter {i}. {paragraph}"));
        ids = m.tokenizer.encode_document(&text).unwrap();
        i += 1;
    }
    ids
}

/// Token ids as llama.cpp (llama-cpp-python 0.3, `add_bos`, `special`) produces them from the
/// same GGUF: spaces as `▁`, no prefix space, runs of spaces and newlines as their own pieces,
/// digits one by one, byte fallback for characters no piece covers, control tokens whole.
#[test]
fn the_tokenizer_matches_llama_cpp_on_the_gemma_vocabulary() {
    let m = served();
    let cases: [(&str, &[u32]); 5] = [
        ("The capital of France is", &[2, 818, 5279, 529, 7001, 563]),
        (
            "Hello world!\n\nThis  is   a test: naïve café, 12345 — ok?",
            &[
                2, 9259, 1902, 236888, 108, 2094, 138, 511, 139, 236746, 1594, 236787, 120362, 33443, 236764, 236743,
                236770, 236778, 236800, 236812, 236810, 2192, 7546, 236881,
            ],
        ),
        ("<start_of_turn>user\nHi<end_of_turn>\n", &[2, 105, 2364, 107, 10979, 106, 107]),
        ("  leading spaces and\ttabs", &[2, 138, 26016, 9952, 532, 255968, 39218]),
        ("emoji 🙂 and 漢字", &[2, 67906, 57235, 532, 236743, 201637]),
    ];
    for (text, want) in cases {
        let ids = m.tokenizer.encode_document(text).unwrap();
        assert_eq!(ids, want, "{text:?}");
        assert_eq!(m.tokenizer.decode(&ids).unwrap(), text.replace("<start_of_turn>", "").replace("<end_of_turn>", ""));
    }
    assert!(m.tokenizer.adds_bos());
    assert!(m.tokenizer.is_eos(1) && m.tokenizer.is_eos(106), "<eos> and <end_of_turn> end generation");
    assert_eq!(m.config().architecture, "gemma3");
}

/// Token by token against candle-transformers' quantized Gemma 3 on the same GGUF blocks and
/// kernels. candle 0.11 gates the MLP with SiLU where Gemma 3 uses tanh-GELU, so our model runs
/// with SiLU here; everything else (scaled embeddings, QK-norm, sandwich norms, the two rotary
/// bases, the tied head) must agree to rounding. The prompt is shorter than the sliding window,
/// which candle ignores when decoding.
#[test]
fn logits_match_candle_quantized_gemma3_token_by_token() {
    let path = common::gemma_gguf();
    let mut file = std::fs::File::open(&path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let mut reference =
        candle_transformers::models::quantized_gemma3::ModelWeights::from_gguf(content, &mut file, &Device::Cpu)
            .unwrap();
    let mut ours = gemma(Requantize::None);
    ours.model.set_host_attention(false);
    ours.model.set_mlp_activation(Activation::Silu);
    let mut tokens = ours.tokenizer.encode_document("Roses are red, violets are").unwrap();
    let prompt = tokens.len();
    let mut cache = KvCache::new(ours.config());
    for pos in 0..prompt + 6 {
        let input = Tensor::new(&tokens[pos..pos + 1], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let want: Vec<f32> = reference.forward(&input, pos).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
        let got = step(&ours, &mut cache, &tokens[pos..pos + 1]);
        let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff < 2e-3, "position {pos}: logits differ by {diff}");
        if pos + 1 >= tokens.len() {
            tokens.push(argmax(&got));
        }
    }
}

/// With its own activation, the served model (K-quants re-blocked to int8, activations in
/// int8 blocks) stays close to the same weights in f32 over a few hundred tokens of prose.
#[test]
fn served_kernels_stay_close_to_the_f32_reference() {
    let served = served();
    let exact = gemma(Requantize::F32);
    let tokens = prose(200, &served);
    let (got, want) = (all_logits(&served, &tokens), all_logits(&exact, &tokens));
    let n = tokens.len();
    let mean_kl = want.iter().zip(&got).map(|(w, g)| kl(w, g)).sum::<f64>() / n as f64;
    let same = want.iter().zip(&got).filter(|(w, g)| argmax(w) == argmax(g)).count();
    eprintln!("Gemma 3 served vs f32 over {n} positions: mean KL {mean_kl:.2e}, top-1 {same}/{n}");
    assert!(mean_kl < 0.02, "mean KL {mean_kl}");
    assert!(same * 100 >= n * 93, "top-1 agrees at {same} of {n} positions");
}

/// A base model continues plain text sensibly (greedy).
#[test]
fn greedy_continuations_look_right() {
    let m = served();
    let answer = greedy_text(&m, "Question: What is the capital of France?\nAnswer:", 4);
    assert!(answer.starts_with(" Paris"), "{answer:?}");
    let country = greedy_text(&m, "Paris is the capital of", 3);
    assert!(country.starts_with(" France"), "{country:?}");
}

/// Past the 512-token window, local layers see only their window: the host loops and the
/// device path's masks agree on a 700-token text, prefilled in two chunks and then decoded.
#[test]
fn sliding_window_attention_agrees_on_both_paths() {
    let host = gemma(Requantize::F32);
    let mut device = gemma(Requantize::F32);
    device.model.set_host_attention(false);
    let window = host.config().gemma3.as_ref().unwrap().sliding_window;
    let tokens = prose(window + 180, &host);
    let split = window - 40;
    let (mut hc, mut dc) = (KvCache::new(host.config()), KvCache::new(device.config()));
    let mut next = Vec::new();
    for chunk in [&tokens[..split], &tokens[split..]] {
        let (a, b) = (step(&host, &mut hc, chunk), step(&device, &mut dc, chunk));
        let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(diff < 5e-3, "prefill chunk of {}: logits differ by {diff}", chunk.len());
        next = vec![argmax(&a)];
    }
    for i in 0..4 {
        let (a, b) = (step(&host, &mut hc, &next), step(&device, &mut dc, &next));
        let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(diff < 5e-3, "decode step {i} at position {}: logits differ by {diff}", hc.len());
        assert_eq!(argmax(&a), argmax(&b));
        next = vec![argmax(&a)];
    }
    assert!(hc.len() > window + 100);
}

/// Capture gives the embeddings and every block's output (d_model 640), and steering a layer
/// moves the logits while a zero addend leaves them alone: the hooks work as on llama.
#[test]
fn residual_hooks_capture_and_steer() {
    let m = served();
    let cfg = m.config();
    let tokens = m.tokenizer.encode_document("The weather today is").unwrap();
    let run = |steering: Option<&SteeringAddends>| {
        let mut cache = KvCache::new(cfg);
        let rows = vec![RowInput { tokens: &tokens, cache: &mut cache, steering, capture: true, logits: 1 }];
        let out = m.model.forward(ForwardContext { rows }).unwrap();
        (out.logits.unwrap().squeeze(0).unwrap().to_vec1::<f32>().unwrap(), out.captures)
    };
    let (plain, captures) = run(None);
    assert_eq!(captures.len(), 1);
    assert_eq!(captures[0].len(), cfg.n_layers + 1);
    assert_eq!(captures[0][5].dims(), &[tokens.len(), cfg.hidden_size]);
    let layer = 9;
    let mut zero = vec![None; cfg.n_residual_rows()];
    zero[layer] = Some(vec![0.0; cfg.hidden_size]);
    let (same, _) = run(Some(&SteeringAddends::new(zero)));
    assert_eq!(same, plain, "a zero addend changes nothing");
    // Push along the captured state's own direction, scaled to its norm.
    let state: Vec<f32> = captures[0][layer].get(tokens.len() - 1).unwrap().to_vec1().unwrap();
    let mut push = vec![None; cfg.n_residual_rows()];
    push[layer] = Some(state.iter().map(|x| -2.0 * x).collect());
    let (steered, _) = run(Some(&SteeringAddends::new(push)));
    let moved = steered.iter().zip(&plain).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(moved > 1.0, "steering moved the logits by only {moved}");
}

/// A server holding the embedded SmolLM2 (default) and Gemma 3, with its vector directory.
fn both_models() -> (common::Running, tempfile::TempDir) {
    let _ = common::gemma_gguf();
    let dir = tempfile::tempdir().unwrap();
    let mut settings = common::settings(dir.path());
    settings.models.push(persona_server::config::ModelSettings {
        id: "gemma3-270m".into(),
        source: "embedded:gemma3-270m".into(),
        max_context: common::TEST_CONTEXT,
        ..Default::default()
    });
    (common::start(settings), dir)
}

/// One server holding both models: ListModels shows both; a reading-mode extraction stores a
/// Gemma vector from the answers SmolLM2 writes (the response average only: both sides read the
/// same questions); that vector steers Gemma's generation and scores a conversation on Gemma's
/// calibrated scale; bad reading requests and fine-tuning Gemma get precise statuses.
#[test]
fn both_models_serve_side_by_side_and_gemma_extracts_by_reading() {
    use persona_client::pb;
    let (running, _dir) = both_models();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut c = persona_client::connect(&running.addr.to_string()).await.unwrap();
        let models = c.list_models(pb::ListModelsRequest {}).await.unwrap().into_inner().models;
        let gemma = models.iter().find(|m| m.id == "gemma3-270m").expect("gemma is listed");
        assert_eq!((gemma.n_layers, gemma.d_model), (18, 640));
        assert!(models.iter().any(|m| m.id == "smollm2-135m-instruct"));

        let reading = |from: &str, format: i32| pb::ExtractVectorRequest {
            model: "gemma3-270m".into(),
            name: "evil-read".into(),
            reading: Some(pb::ReadingMode { rollouts_from: from.into(), format }),
            ..common::small_evil_extraction()
        };
        let err = c.extract_vector(reading("no-such-model", 0)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
        let err = c.extract_vector(reading("smollm2-135m-instruct", 9)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("reading.format"), "{}", err.message());

        let mut stream = c.extract_vector(reading("smollm2-135m-instruct", 0)).await.unwrap().into_inner();
        let mut result = None;
        while let Some(msg) = stream.message().await.unwrap() {
            if let Some(pb::extract_vector_response::Event::Result(r)) = msg.event {
                result = Some(r);
            }
        }
        let result = result.expect("the extraction finished");
        assert_eq!(result.rollouts, 16);
        assert!(result.variants.is_empty(), "reading mode stores no prompt variants");
        let v = result.vector.unwrap();
        assert_eq!((v.model.as_str(), v.n_rows, v.d_model), ("gemma3-270m", 19, 640));
        assert!(
            v.description.contains("read by `gemma3-270m` as plain text")
                && v.description.contains("`smollm2-135m-instruct` wrote"),
            "{}",
            v.description
        );

        // Steering Gemma with its own vector changes a greedy continuation.
        let raw = |text: &str| pb::Prompt { kind: Some(pb::prompt::Kind::Raw(text.into())) };
        let base = pb::GenerateRequest {
            model: "gemma3-270m".into(),
            prompt: Some(raw("Question: How should I treat my neighbours?\nAnswer:")),
            sampling: Some(pb::SamplingParams { max_tokens: 12, ..Default::default() }),
            ..Default::default()
        };
        let plain = persona_client::generate_text(&mut c, base.clone()).await.unwrap().text;
        let steered = pb::GenerateRequest {
            steering: vec![persona_client::steer_by_name("evil-read", v.recommended_layer, 8.0)],
            ..base
        };
        let steered = persona_client::generate_text(&mut c, steered).await.unwrap().text;
        assert_ne!(plain, steered, "steering Gemma changed nothing");

        // Monitoring on Gemma's calibrated scale.
        let conversation = pb::Conversation { messages: vec![persona_client::message("user", "Any advice?")] };
        let projected = c
            .project_activation(pb::ProjectActivationRequest {
                model: "gemma3-270m".into(),
                conversation: Some(conversation),
                response: "Be kind to everyone you meet.".into(),
                targets: vec![pb::ProjectionTarget { vector: "evil-read".into(), layer: None }],
                per_token: false,
            })
            .await
            .unwrap()
            .into_inner();
        let p = &projected.projections[0];
        assert!(p.has_response && p.calibrated && p.response_avg.is_finite(), "{p:?}");

        // Fine-tuning is llama-family only.
        let err = c
            .start_fine_tune(pb::StartFineTuneRequest {
                model: "gemma3-270m".into(),
                output_model: "gemma-tuned".into(),
                dataset: Some(pb::start_fine_tune_request::Dataset::DatasetJsonl(
                    "{\"prompt\": \"a\", \"completion\": \"b\"}".into(),
                )),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("gemma3"), "{}", err.message());
    });
}

/// Runs a TransferVector call to its result (or its error status).
async fn transfer(
    c: &persona_client::Client,
    req: persona_client::pb::TransferVectorRequest,
) -> Result<persona_client::pb::TransferResult, tonic::Status> {
    use persona_client::pb::transfer_vector_response::Event;
    let mut stream = c.clone().transfer_vector(req).await?.into_inner();
    let mut result = None;
    while let Some(msg) = stream.message().await? {
        if let Some(Event::Result(r)) = msg.event {
            result = Some(r);
        }
    }
    Ok(result.expect("the transfer finished"))
}

/// TransferVector: a vector carried from SmolLM2 to itself at the same layer comes back nearly
/// unchanged (the map is close to the identity, held-out R² ≈ 1); carried to Gemma at the same
/// relative depth, it lands on that one layer with its provenance, and the map explains a real
/// share of Gemma's residual stream on held-out texts. Bad requests get precise statuses.
#[test]
fn transfer_carries_a_vector_across_models_through_a_fitted_map() {
    use persona_client::pb;
    let (running, _dir) = both_models();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut c = persona_client::connect(&running.addr.to_string()).await.unwrap();
        // A real direction: a small `evil` extraction on SmolLM2, its response average at layer 15.
        let d = 576;
        common::extract(&mut c, pb::ExtractVectorRequest { name: "probe".into(), ..common::small_evil_extraction() })
            .await;
        let values = c
            .get_vector(pb::GetVectorRequest { name: "probe".into(), include_values: true })
            .await
            .unwrap()
            .into_inner()
            .values;
        let request = |to: &str| pb::TransferVectorRequest {
            vector: "probe".into(),
            to_model: to.into(),
            source_layer: Some(15),
            ..Default::default()
        };
        let client = c.clone();
        let run = |req| transfer(&client, req);

        let itself = run(pb::TransferVectorRequest {
            target_layer: Some(15),
            name: "probe-back".into(),
            ..request("smollm2-135m-instruct")
        })
        .await
        .unwrap();
        assert!(itself.fits[0].ridge_r2 > 0.99, "identity map R² {}", itself.fits[0].ridge_r2);
        let back: Vec<f32> = c
            .get_vector(pb::GetVectorRequest { name: "probe-back".into(), include_values: true })
            .await
            .unwrap()
            .into_inner()
            .values;
        let (a, b) = (&values[15 * d..16 * d], &back[15 * d..16 * d]);
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        let cos = dot / (norm(a) * norm(b));
        eprintln!("SmolLM2 -> SmolLM2 at layer 15: R² {:.4}, cos {cos:.4}", itself.fits[0].ridge_r2);
        assert!(cos > 0.9, "a vector carried to its own model at the same layer keeps its direction: cos {cos}");

        let r = run(request("gemma3-270m")).await.unwrap();
        let v = r.vector.unwrap();
        assert_eq!(
            (v.name.as_str(), v.model.as_str(), v.n_rows, v.d_model),
            ("probe.gemma3-270m", "gemma3-270m", 19, 640)
        );
        let from = v.transferred_from.unwrap();
        assert_eq!(
            (from.model.as_str(), from.vector.as_str(), from.source_layer),
            ("smollm2-135m-instruct", "probe", 15)
        );
        assert_eq!(from.target_layer, 9, "same relative depth: 15 of 30 -> 9 of 18");
        assert_eq!(v.recommended_layer, Some(9));
        let set: Vec<usize> = v.row_norms.iter().enumerate().filter(|(_, n)| **n > 0.0).map(|(i, _)| i).collect();
        assert_eq!(set, vec![9], "only the target layer's row is set");
        assert!(r.samples as usize > 2 * d && r.fits.len() == 1, "{} samples", r.samples);
        let fit = &r.fits[0];
        eprintln!(
            "SmolLM2 15 -> Gemma 9: ridge R² {:.3}, Procrustes R² {:?}, {} samples",
            fit.ridge_r2, fit.procrustes_r2, r.samples
        );
        assert!(fit.ridge_r2 > 0.3 && fit.ridge_r2 < 1.0, "held-out R² {}", fit.ridge_r2);
        assert!(fit.procrustes_r2.is_some());
        assert!((from.r2 - fit.ridge_r2).abs() < 1e-6);

        let code = |e: tonic::Status| e.code();
        let again = run(request("gemma3-270m")).await.map(|_| ()).unwrap_err();
        assert_eq!(code(again), tonic::Code::AlreadyExists);
        let wrong_source = pb::TransferVectorRequest { from_model: "gemma3-270m".into(), ..request("gemma3-270m") };
        assert_eq!(code(run(wrong_source).await.map(|_| ()).unwrap_err()), tonic::Code::InvalidArgument);
        assert_eq!(code(run(request("no-such-model")).await.map(|_| ()).unwrap_err()), tonic::Code::NotFound);
        let both =
            pb::TransferVectorRequest { target_layer: Some(3), search_target_layer: true, ..request("gemma3-270m") };
        assert_eq!(code(run(both).await.map(|_| ()).unwrap_err()), tonic::Code::InvalidArgument);
        let too_deep = pb::TransferVectorRequest { target_layer: Some(19), overwrite: true, ..request("gemma3-270m") };
        assert_eq!(code(run(too_deep).await.map(|_| ()).unwrap_err()), tonic::Code::InvalidArgument);
    });
}

/// Part 3 of a transfer, small: the SmolLM2 vector carried to every Gemma layer is compared with
/// Gemma's native vector (read from the same SmolLM2 rollouts) on the same held-out readings,
/// layer by layer, against random directions; then Gemma, asked in plain text, is steered with the
/// transferred vector and scored by SmolLM2's calibrated vector, next to unsteered answers sampled
/// at temperature 1 (seeded: the same request gives the same scores). Bad requests get precise
/// statuses.
#[test]
fn a_transferred_vector_is_measured_against_the_native_one_and_sampling() {
    use persona_client::pb;
    let (running, _dir) = both_models();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut c = persona_client::connect(&running.addr.to_string()).await.unwrap();
        common::extract(&mut c, pb::ExtractVectorRequest { name: "src".into(), ..common::small_evil_extraction() })
            .await;
        let source = c.get_vector(pb::GetVectorRequest { name: "src".into(), include_values: false }).await.unwrap();
        let monitoring =
            source.into_inner().info.unwrap().recommended_layer.expect("the source has a monitoring layer");

        let client = c.clone();
        let transfer = |req| transfer(&client, req);
        let every = pb::TransferVectorRequest {
            vector: "src".into(),
            to_model: "gemma3-270m".into(),
            all_layers: true,
            max_samples: 1500,
            ..Default::default()
        };
        for bad in [
            pb::TransferVectorRequest { search_target_layer: true, ..every.clone() },
            pb::TransferVectorRequest { source_layer: Some(10), ..every.clone() },
        ] {
            let err = transfer(bad).await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
            assert!(err.message().contains("all_layers"), "{}", err.message());
        }
        let r = transfer(every).await.unwrap();
        let pairs: Vec<(u32, u32)> = r.fits.iter().map(|f| (f.source_layer, f.target_layer)).collect();
        assert_eq!(pairs.len(), 18, "{pairs:?}");
        assert_eq!(pairs[0], (2, 1), "layer 1 of 18 reads SmolLM2's layer at the same depth");
        assert_eq!(pairs[17], (30, 18));
        let v = r.vector.unwrap();
        let set: Vec<usize> = v.row_norms.iter().enumerate().filter(|(_, n)| **n > 0.0).map(|(i, _)| i).collect();
        assert_eq!(set, (1..19).collect::<Vec<_>>(), "every block output carries a row");
        let expected = (monitoring as f64 / 30.0 * 18.0).round() as u32;
        assert_eq!(v.recommended_layer, Some(expected.max(1)));
        assert!(r.fits.iter().all(|f| f.ridge_r2 > 0.0 && f.ridge_r2 < 1.0), "{:?}", r.fits);

        // Gemma's native vector from the same rollouts, compared with the transferred one.
        let native = pb::ExtractVectorRequest {
            model: "gemma3-270m".into(),
            name: "native".into(),
            reading: Some(pb::ReadingMode { rollouts_from: "smollm2-135m-instruct".into(), format: 0 }),
            compare: vec!["src.gemma3-270m".into()],
            ..common::small_evil_extraction()
        };
        let err = c
            .extract_vector(pb::ExtractVectorRequest { compare: vec!["src".into()], ..native.clone() })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("belongs to model `smollm2-135m-instruct`"), "{}", err.message());
        let mut stream = c.extract_vector(native).await.unwrap().into_inner();
        let mut result = None;
        while let Some(msg) = stream.message().await.unwrap() {
            if let Some(pb::extract_vector_response::Event::Result(r)) = msg.event {
                result = Some(r);
            }
        }
        let result = result.expect("the extraction finished");
        let compared = &result.comparisons[0];
        let random = result.random_baseline.as_ref().expect("comparisons come with the random baseline");
        assert_eq!(compared.vector, "src.gemma3-270m");
        assert!(compared.scored_on.contains("held-out"), "{}", compared.scored_on);
        assert_eq!(compared.layers.iter().map(|l| l.layer).collect::<Vec<_>>(), (1..19).collect::<Vec<_>>());
        assert_eq!(random.layers.len(), 19);
        for l in compared.layers.iter().chain(&random.layers) {
            assert!(l.cosine.abs() <= 1.0 + 1e-5 && (0.0..=1.0).contains(&l.auroc) && l.cohens_d.is_finite(), "{l:?}");
        }
        let mean = |x: Vec<f32>| x.iter().sum::<f32>() / x.len() as f32;
        let cos = mean(compared.layers.iter().map(|l| l.cosine.abs()).collect());
        let chance = mean(random.layers.iter().map(|l| l.cosine).collect());
        eprintln!("transferred vs native: mean |cos| {cos:.3}, random p95 {chance:.3}");
        assert!(chance > 0.03 && chance < 0.2, "random |cos| p95 in d = 640 is about 0.08: {chance}");
        assert!(cos > 2.0 * chance, "the transferred vector points along Gemma's own: |cos| {cos} vs chance {chance}");

        // Steering Gemma with it, asked in plain text and scored by SmolLM2's vector.
        let eval = pb::EvaluateSteeringRequest {
            vector: "src.gemma3-270m".into(),
            layers: vec![expected],
            coefficients: vec![4.0],
            max_questions: 2,
            format: pb::ReadingFormat::Plain as i32,
            score_with: "src".into(),
            sampling: Some(pb::SamplingParams { max_tokens: 16, ..Default::default() }),
            sampling_baselines: vec![pb::SamplingBaseline { temperature: 1.0, top_p: 0.0 }],
            dry_run: true,
            ..Default::default()
        };
        let client = c.clone();
        let evaluate = |req: pb::EvaluateSteeringRequest| {
            let mut c = client.clone();
            async move {
                let mut stream = c.evaluate_steering(req).await?.into_inner();
                let mut result = None;
                while let Some(msg) = stream.message().await? {
                    if let Some(pb::evaluate_steering_response::Event::Result(r)) = msg.event {
                        result = Some(r);
                    }
                }
                Ok::<_, tonic::Status>(result.expect("the evaluation finished"))
            }
        };
        let r = evaluate(eval.clone()).await.unwrap();
        assert_eq!(r.format, "plain text");
        assert_eq!(r.monitoring_layer, monitoring, "SmolLM2's vector scores at its own monitoring layer");
        assert!(r.scorer.contains("onto `src` of `smollm2-135m-instruct`"), "{}", r.scorer);
        assert!(r.suppression.is_empty(), "no system prompt to suppress in plain text");
        assert_eq!((r.cells.len(), r.sampling_baselines.len()), (1, 1));
        let sampled = r.sampling_baselines[0].cell.clone().unwrap();
        let unsteered = r.unsteered.clone().unwrap();
        assert_eq!((unsteered.answers, sampled.answers, r.cells[0].answers), (2, 2, 2));
        for cell in [&unsteered, &sampled, &r.cells[0]] {
            assert!(!cell.example.contains("Question:") && !cell.example.contains("Answer:"), "{:?}", cell.example);
            assert!((0.0..=100.0).contains(&cell.trait_score) && (0.0..=100.0).contains(&cell.coherence), "{cell:?}");
        }
        assert_ne!(unsteered.example, sampled.example, "temperature 1 samples another answer");
        let again = evaluate(eval.clone()).await.unwrap();
        assert_eq!(again.sampling_baselines, r.sampling_baselines, "sampling baselines are seeded");
        assert_eq!(again.cells, r.cells);

        let refused = |req: pb::EvaluateSteeringRequest| {
            let e = evaluate(req);
            async move { e.await.map(|_| ()).unwrap_err() }
        };
        let no_score = refused(pb::EvaluateSteeringRequest { score_with: String::new(), ..eval.clone() }).await;
        assert_eq!(no_score.code(), tonic::Code::FailedPrecondition, "{no_score:?}");
        assert!(no_score.message().contains("no calibration"), "{}", no_score.message());
        let uncalibrated =
            refused(pb::EvaluateSteeringRequest { score_with: "src.gemma3-270m".into(), ..eval.clone() }).await;
        assert_eq!(uncalibrated.code(), tonic::Code::FailedPrecondition, "{uncalibrated:?}");
        let missing = refused(pb::EvaluateSteeringRequest { score_with: "nope".into(), ..eval.clone() }).await;
        assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");
        let cold = pb::SamplingBaseline { temperature: -1.0, top_p: 0.0 };
        let bad = refused(pb::EvaluateSteeringRequest { sampling_baselines: vec![cold], ..eval.clone() }).await;
        assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad:?}");
        let format = refused(pb::EvaluateSteeringRequest { format: 7, ..eval }).await;
        assert_eq!(format.code(), tonic::Code::InvalidArgument, "{format:?}");
    });
}
