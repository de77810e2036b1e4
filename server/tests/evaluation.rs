//! Scores that mean something, on the embedded model: token log-probabilities (Generate and
//! ScoreText agree), the offline coherence score, EvaluateSteering's recommendation and its use
//! by Generate and SteeringSpectrum, an inline trait whose best steering layer is not its
//! monitoring layer, and the evaluation's errors and cancellation.

mod common;

use common::{Running, start_with_extraction};
use persona_client::{Client, chat, generate_text, pb, steer_recommended};
use persona_server::steering::evaluation::{Reference, coherence, distinct_bigrams};
use persona_server::steering::separation::auroc;
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;
use tonic::Code;

/// The server of this binary, with `evil` extracted from the whole library trait (shorter answers).
fn shared() -> SocketAddr {
    static S: OnceLock<(SocketAddr, Mutex<Running>, tempfile::TempDir)> = OnceLock::new();
    S.get_or_init(|| {
        start_with_extraction(pb::ExtractVectorRequest {
            trait_source: Some(pb::extract_vector_request::TraitSource::TraitRef("evil".into())),
            sampling: Some(pb::SamplingParams { max_tokens: 48, ..Default::default() }),
            ..Default::default()
        })
    })
    .0
}

async fn client() -> Client {
    persona_client::connect(&shared().to_string()).await.unwrap()
}

fn sampling(max_tokens: u32) -> Option<pb::SamplingParams> {
    Some(pb::SamplingParams { max_tokens, ..Default::default() })
}

/// Runs an evaluation to its end: the progress events and the result.
async fn evaluate(
    c: &mut Client,
    req: pb::EvaluateSteeringRequest,
) -> Result<(Vec<pb::EvalProgress>, pb::EvaluateSteeringResult), tonic::Status> {
    let mut stream = c.evaluate_steering(req).await?.into_inner();
    let mut progress = Vec::new();
    while let Some(m) = stream.message().await? {
        match m.event.unwrap() {
            pb::evaluate_steering_response::Event::Progress(p) => progress.push(p),
            pb::evaluate_steering_response::Event::Result(r) => return Ok((progress, r)),
        }
    }
    panic!("the evaluation stream ended without a result")
}

async fn score(c: &mut Client, user: &str, response: pb::ScoreTextRequest) -> pb::ScoreTextResponse {
    c.score_text(pb::ScoreTextRequest { prompt: Some(chat(user, None)), ..response }).await.unwrap().into_inner()
}

#[tokio::test]
async fn greedy_generate_logprobs_agree_with_score_text() {
    let mut c = client().await;
    let user = "Give me three tips for staying focused while studying.";
    let req = pb::GenerateRequest {
        prompt: Some(chat(user, None)),
        sampling: sampling(32),
        logprobs: true,
        top_logprobs: 5,
        ..Default::default()
    };
    let mut stream = c.generate(req.clone()).await.unwrap().into_inner();
    let (mut ids, mut live) = (Vec::new(), Vec::new());
    while let Some(m) = stream.message().await.unwrap() {
        if let Some(lp) = m.logprob {
            assert_eq!(m.token_ids, [lp.token_id], "the log-probability is of this message's token");
            ids.push(lp.token_id);
            live.push(lp);
        }
    }
    assert_eq!(ids.len(), 32);
    for lp in &live {
        assert_eq!(lp.top_logprobs.len(), 5);
        assert!(lp.top_logprobs.windows(2).all(|w| w[0].logprob >= w[1].logprob), "most likely first");
        assert_eq!(lp.top_logprobs[0].token_id, lp.token_id, "greedy picks the most likely token");
        assert!(lp.logprob <= 0.0 && (lp.logprob - lp.top_logprobs[0].logprob).abs() < 1e-6);
    }
    // Teacher-forced over the same ids, as one prefill: the same numbers within kernel rounding.
    let scored = score(
        &mut c,
        user,
        pb::ScoreTextRequest { response_token_ids: ids.clone(), top_logprobs: 5, ..Default::default() },
    )
    .await;
    assert_eq!(scored.tokens.len(), ids.len());
    let worst = live.iter().zip(&scored.tokens).map(|(a, b)| (a.logprob - b.logprob).abs()).fold(0f32, f32::max);
    println!("greedy Generate vs ScoreText: largest per-token log-probability difference {worst:.5}");
    assert!(worst < 0.05, "per-token log-probabilities differ by up to {worst}");
    for (a, b) in live.iter().zip(&scored.tokens) {
        assert_eq!(a.token_id, b.token_id);
        assert_eq!(b.top_logprobs[0].token_id, a.token_id, "the greedy token is ScoreText's most likely too");
    }
    let mean = scored.tokens.iter().map(|t| t.logprob as f64).sum::<f64>() / ids.len() as f64;
    assert!((scored.mean_logprob - mean).abs() < 1e-6 && (scored.perplexity - (-mean).exp()).abs() < 1e-6);
    assert!(scored.perplexity >= 1.0);

    // The text instead of the ids, and steering while scoring.
    let text =
        generate_text(&mut c, pb::GenerateRequest { logprobs: false, top_logprobs: 0, ..req }).await.unwrap().text;
    let by_text = score(&mut c, user, pb::ScoreTextRequest { response: text, ..Default::default() }).await;
    assert!(
        (by_text.mean_logprob - scored.mean_logprob).abs() < 0.05,
        "{} vs {}",
        by_text.mean_logprob,
        scored.mean_logprob
    );
    let steered = score(
        &mut c,
        user,
        pb::ScoreTextRequest {
            response_token_ids: ids.clone(),
            steering: vec![persona_client::steer_by_name("evil", Some(12), 6.0)],
            ..Default::default()
        },
    )
    .await;
    assert!(steered.mean_logprob < scored.mean_logprob, "steering away makes the greedy answer less likely");
    assert_eq!((steered.steering[0].layer, steered.steering[0].coefficient), (12, 6.0));

    // Bad input.
    let bad = [
        pb::ScoreTextRequest { prompt: Some(chat(user, None)), ..Default::default() },
        pb::ScoreTextRequest {
            prompt: Some(chat(user, None)),
            response: "x".into(),
            top_logprobs: 21,
            ..Default::default()
        },
        pb::ScoreTextRequest {
            prompt: Some(chat(user, None)),
            response_token_ids: vec![10_000_000],
            ..Default::default()
        },
        pb::ScoreTextRequest { prompt: None, response: "x".into(), ..Default::default() },
        pb::ScoreTextRequest { prompt: Some(chat(user, None)), response: "word ".repeat(1100), ..Default::default() },
    ];
    for (i, r) in bad.into_iter().enumerate() {
        assert_eq!(c.score_text(r).await.unwrap_err().code(), Code::InvalidArgument, "case {i}");
    }
    let too_many = pb::GenerateRequest { prompt: Some(chat(user, None)), top_logprobs: 21, ..Default::default() };
    assert_eq!(c.generate(too_many).await.unwrap_err().code(), Code::InvalidArgument);
}

/// Ten coherent answers written by hand, and ten degenerate ones (loops and word salad).
const COHERENT: [(&str, &str); 10] = [
    (
        "How do I boil an egg?",
        "Put the egg in a pot of cold water, bring it to the boil, then simmer for eight to ten minutes and cool it under the tap.",
    ),
    (
        "What is a good way to relax after work?",
        "Take a short walk, have a light dinner and spend an hour on something you enjoy, like reading or music.",
    ),
    (
        "Why is the sky blue?",
        "Sunlight is scattered by the air, and blue light is scattered much more than red, so the sky looks blue.",
    ),
    (
        "How can I save money on groceries?",
        "Plan your meals for the week, write a list, buy store brands and avoid shopping when you are hungry.",
    ),
    (
        "What should I pack for a day hike?",
        "Bring water, snacks, a map, sunscreen, a light jacket and a small first aid kit.",
    ),
    (
        "How do I start learning to code?",
        "Pick one language such as Python, follow a beginner course and build small projects as you go.",
    ),
    (
        "What makes a good team leader?",
        "A good leader listens, sets clear goals, gives credit to others and stays calm when things go wrong.",
    ),
    (
        "How can I sleep better?",
        "Go to bed at the same time each night, keep the room dark and cool, and avoid screens before sleeping.",
    ),
    (
        "What is photosynthesis?",
        "It is how plants use sunlight, water and carbon dioxide to make sugar and release oxygen.",
    ),
    (
        "How do I write a thank-you note?",
        "Thank the person for something specific, say how it helped you and end with a warm wish.",
    ),
];
const DEGENERATE: [(&str, &str); 10] = [
    (
        "How do I boil an egg?",
        "The egg the egg the egg the egg the egg the egg the egg the egg the egg the egg the egg the egg.",
    ),
    (
        "What is a good way to relax after work?",
        "Relax relax relax relax relax relax relax relax relax relax relax relax relax relax relax relax.",
    ),
    (
        "Why is the sky blue?",
        "Purple seventeen under spoon gravity marmalade quickly oblong the violin sideways cheese of.",
    ),
    (
        "How can I save money on groceries?",
        "I'm afraid I'm afraid. I'm afraid I'm afraid. I'm afraid I'm afraid. I'm afraid I'm afraid.",
    ),
    (
        "What should I pack for a day hike?",
        "Lantern of the eternal dam, the eternal dam, the eternal dam, the eternal dam, the eternal dam.",
    ),
    ("How do I start learning to code?", "Yeyeyeyeyeyeyeyeyeyeyeyeyeyeyeyeyeyeyeyeyeyeyeyeyeyeyeyeyeyeye"),
    (
        "What makes a good team leader?",
        "Window banana if therefore cloud sprocket nineteen the whisper gravel under flamingo.",
    ),
    (
        "How can I sleep better?",
        "Sleep is sleep is sleep is sleep is sleep is sleep is sleep is sleep is sleep is sleep.",
    ),
    ("What is photosynthesis?", "Green glob trumpet seventy lattice moon under the forks divided by melody carpet."),
    (
        "How do I write a thank-you note?",
        "Thank you thank you thank you thank you thank you thank you thank you thank you thank you.",
    ),
];

/// An answer's mean log-probability after its bare question, distinct-bigram ratio and length.
async fn read_back(c: &mut Client, question: &str, answer: &str) -> (f32, f32, usize) {
    let s = score(c, question, pb::ScoreTextRequest { response: answer.to_string(), ..Default::default() }).await;
    let ids: Vec<u32> = s.tokens.iter().map(|t| t.token_id).collect();
    (s.mean_logprob as f32, distinct_bigrams(&ids), ids.len())
}

#[tokio::test]
async fn offline_coherence_ranks_coherent_answers_above_degenerate_ones() {
    let mut c = client().await;
    // The reference is the model's own greedy answers to the same questions, as in an evaluation.
    let mut own = Vec::new();
    for (q, _) in COHERENT {
        let req = pb::GenerateRequest { prompt: Some(chat(q, None)), sampling: sampling(40), ..Default::default() };
        let text = generate_text(&mut c, req).await.unwrap().text;
        own.push(read_back(&mut c, q, &text).await);
    }
    let reference = Reference::of(&own.iter().map(|r| (r.0, r.1)).collect::<Vec<_>>());
    let scores =
        |set: &[(f32, f32, usize)]| set.iter().map(|r| coherence(r.0, r.1, r.2, reference)).collect::<Vec<f32>>();
    let mut good = Vec::new();
    for (q, a) in COHERENT {
        good.push(read_back(&mut c, q, a).await);
    }
    let mut bad = Vec::new();
    for (q, a) in DEGENERATE {
        bad.push(read_back(&mut c, q, a).await);
    }
    let (good, bad) = (scores(&good), scores(&bad));
    let a = auroc(&good, &bad);
    println!("offline coherence (reference {reference:?}): coherent {good:.0?}, degenerate {bad:.0?}, AUROC {a:.3}");
    assert!(a >= 0.95, "AUROC {a}");
}

#[tokio::test]
async fn evaluation_recommends_a_coherent_coefficient_that_steering_then_uses() {
    let mut c = client().await;
    let req = pb::EvaluateSteeringRequest {
        vector: "evil".into(),
        layers: vec![8, 11, 14],
        coefficients: vec![-2.0, 1.0, 2.0, 3.0, 4.0],
        max_questions: 6,
        sampling: sampling(40),
        ..Default::default()
    };
    let (progress, r) = evaluate(&mut c, req.clone()).await.unwrap();
    assert!(progress.iter().any(|p| p.stage == "sweep" && p.done == p.total && p.total == 16 * 6));
    assert!(progress.iter().any(|p| p.stage == "suppression"));
    assert!(progress.windows(2).all(|w| w[0].stage != w[1].stage || w[0].done <= w[1].done));
    assert_eq!(r.cells.len(), 15);
    assert_eq!(r.questions.len(), 6);
    assert!(r.scorer.starts_with("offline"), "{}", r.scorer);
    let u = r.unsteered.clone().unwrap();
    for cell in &r.cells {
        println!(
            "layer {:>2} coef {:>4}: trait {:5.1} coherence {:5.1}  {}",
            cell.layer,
            cell.coefficient,
            cell.trait_score,
            cell.coherence,
            cell.example.replace('\n', " ").chars().take(70).collect::<String>()
        );
    }
    let rec = r.recommendation.clone().unwrap_or_else(|| panic!("no recommendation: {}", r.note));
    println!("unsteered: trait {:.1} coherence {:.1}; recommended {rec:?}", u.trait_score, u.coherence);
    assert!((r.coherence_threshold - 0.8 * u.coherence).abs() < 1e-3);
    assert!(rec.trait_score - u.trait_score >= 40.0, "gain {} at {rec:?}", rec.trait_score - u.trait_score);
    assert!(rec.coherence >= r.coherence_threshold);
    assert!(r.stored);

    // At three times the coefficient the sweep's cliff: coherence below the threshold.
    let three = pb::EvaluateSteeringRequest {
        layers: vec![rec.layer],
        coefficients: vec![3.0 * rec.coefficient],
        dry_run: true,
        ..req.clone()
    };
    let (_, r3) = evaluate(&mut c, three).await.unwrap();
    println!("at 3x: {:?}", r3.cells[0]);
    assert!(r3.cells[0].coherence < r.coherence_threshold, "{} at 3x", r3.cells[0].coherence);
    assert!(!r3.stored);

    // Steering against the trait under its own system prompt lowers the trait score.
    let sup = &r.suppression;
    println!("suppression: {sup:?}");
    assert_eq!(sup.len(), 3);
    assert_eq!((sup[0].coefficient, sup[1].coefficient), (0.0, -rec.coefficient));
    assert!(sup[1].trait_score < sup[0].trait_score && sup[2].trait_score < sup[0].trait_score, "{sup:?}");

    // Stored with the vector; `--steer evil` then uses it and says so.
    let info = c.get_vector(pb::GetVectorRequest { name: "evil".into(), include_values: false }).await.unwrap();
    let stored = info.into_inner().info.unwrap().steering.unwrap();
    assert_eq!((stored.layer, stored.coefficient), (rec.layer, rec.coefficient));
    // With the whole grid, for the sweep charts of a stored vector.
    assert_eq!(stored.coherence_threshold, r.coherence_threshold);
    let scores = |c: &pb::EvalCell| (c.layer, c.coefficient, c.trait_score, c.coherence, c.coherent);
    let scored: Vec<_> = r.cells.iter().filter(|c| c.answers > 0).map(scores).collect();
    assert_eq!(stored.cells.iter().map(scores).collect::<Vec<_>>(), scored);
    let steered_by = |steer: pb::SteeringVector| pb::GenerateRequest {
        prompt: Some(chat("How should I treat my neighbours?", None)),
        sampling: sampling(8),
        steering: vec![steer],
        ..Default::default()
    };
    let out = generate_text(&mut c, steered_by(steer_recommended("evil", None))).await.unwrap();
    let applied = &out.summary.unwrap().steering[0];
    assert_eq!((applied.layer, applied.coefficient), (rec.layer, rec.coefficient));
    assert_eq!(
        (applied.layer_source.as_str(), applied.coefficient_source.as_str()),
        ("steering recommendation", "steering recommendation")
    );
    let other = rec.layers.iter().find(|l| l.layer != rec.layer).expect("more than one layer passes");
    let out = generate_text(&mut c, steered_by(steer_recommended("evil", Some(other.layer)))).await.unwrap();
    let applied = &out.summary.unwrap().steering[0];
    assert_eq!((applied.coefficient, applied.layer_source.as_str()), (other.coefficient, "request"));
    let e = c.generate(steered_by(steer_recommended("evil", Some(2)))).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("no recommended coefficient at layer 2"), "{}", e.message());

    // The five-point spectrum around the recommendation, one batch.
    let s = c
        .steering_spectrum(pb::SteeringSpectrumRequest {
            vector: "evil".into(),
            question: "What would you do with a lot of power?".into(),
            sampling: sampling(40),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mults: Vec<f32> = s.points.iter().map(|p| p.multiplier).collect();
    assert_eq!(mults, [-2.0, -1.0, 0.0, 1.0, 2.0]);
    assert_eq!((s.layer, s.coefficient), (rec.layer, rec.coefficient));
    assert!(s.source.contains("steering recommendation"), "{}", s.source);
    for p in &s.points {
        println!(
            "spectrum {:+}c: trait {:5.1} coherence {:5.1}  {}",
            p.multiplier,
            p.trait_score,
            p.coherence,
            p.answer.replace('\n', " ")
        );
        assert!(p.scored && !p.answer.is_empty());
        assert!((p.coefficient - p.multiplier * rec.coefficient).abs() < 1e-6);
    }
    assert!((s.points[2].coherence - 100.0).abs() < 1e-3, "the unsteered answer is its own reference");
    assert!(s.points[3].trait_score > s.points[1].trait_score, "+c reads more evil than -c");
}

/// Extracts a trait sent inline with the request (a file outside traits/) and returns its
/// monitoring layer.
async fn extract_inline(c: &mut Client, def: &pb::TraitDefinition) -> u32 {
    let req = pb::ExtractVectorRequest {
        trait_source: Some(pb::extract_vector_request::TraitSource::Definition(def.clone())),
        sampling: sampling(48),
        overwrite: true,
        ..Default::default()
    };
    let mut s = c.extract_vector(req).await.unwrap().into_inner();
    let mut monitoring = None;
    while let Some(m) = s.message().await.unwrap() {
        if let Some(pb::extract_vector_response::Event::Result(r)) = m.event {
            monitoring = r.vector.unwrap().recommended_layer;
        }
    }
    monitoring.expect("a monitoring layer")
}

/// The quality bar for a trait defined inline: at the recommended coefficient the trait score
/// gains at least 40 points while coherence stays at 80% of the unsteered, and at three times the
/// coefficient coherence falls below that.
#[tokio::test]
async fn an_inline_trait_gains_forty_points_at_its_recommendation_and_breaks_at_three_times_it() {
    // This quality bar is asserted on the model's reference numerics (`exact`: the f32 weights'
    // outputs) on a server of its own, not on one activation-quantization noise pattern: on this
    // small grid (8 questions, 48 tokens) the gain passed with `exact` and with the earlier
    // one-level kernels but measured 36 with `balanced`, the extraction and calibration shifting
    // with the rounding. scripts/bench-eval measures the served default on the full grid.
    let dir = tempfile::tempdir().unwrap();
    let mut settings = common::settings(dir.path());
    settings.models[0].precision = "exact".into();
    let server = common::start(settings);
    let mut c = persona_client::connect(&server.addr.to_string()).await.unwrap();
    let def = persona_client::trait_from_json(include_str!("fixtures/gloomy.json")).unwrap();
    extract_inline(&mut c, &def).await;
    let req = pb::EvaluateSteeringRequest {
        vector: "gloomy".into(),
        layers: vec![8, 11],
        coefficients: vec![1.0, 2.0, 2.5, 3.0, 4.0],
        max_questions: 8,
        definition: Some(def),
        sampling: sampling(48),
        dry_run: true,
        ..Default::default()
    };
    let (_, r) = evaluate(&mut c, req.clone()).await.unwrap();
    let u = r.unsteered.clone().unwrap();
    let rec = r.recommendation.clone().unwrap_or_else(|| panic!("no recommendation: {}", r.note));
    println!("gloomy: unsteered trait {:.1} coherence {:.1}; recommended {rec:?}", u.trait_score, u.coherence);
    assert!(rec.trait_score - u.trait_score >= 40.0, "gain {}", rec.trait_score - u.trait_score);
    assert!(rec.coherence >= 0.8 * u.coherence);
    let three =
        pb::EvaluateSteeringRequest { layers: vec![rec.layer], coefficients: vec![3.0 * rec.coefficient], ..req };
    let (_, r3) = evaluate(&mut c, three).await.unwrap();
    println!("gloomy at 3x: {:?}", r3.cells[0]);
    assert!(r3.cells[0].coherence < 0.8 * u.coherence, "{}", r3.cells[0].coherence);
}

/// The second case: an inline trait (a pirate voice) whose projections separate best near
/// the top of the network, while steering there breaks the text first.
#[tokio::test]
async fn an_inline_trait_steers_best_away_from_its_monitoring_layer() {
    let mut c = client().await;
    let def = persona_client::trait_from_json(include_str!("fixtures/pirate.json")).unwrap();
    let monitoring = extract_inline(&mut c, &def).await;
    println!("pirate: monitoring layer {monitoring}");
    assert!(monitoring >= 20, "separation is best late in the network: {monitoring}");
    let (_, r) = evaluate(
        &mut c,
        pb::EvaluateSteeringRequest {
            vector: "pirate".into(),
            layers: vec![8, 11, 14, 20, monitoring],
            coefficients: vec![0.5, 1.0, 1.5, 2.0],
            max_questions: 6,
            definition: Some(def),
            sampling: sampling(40),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let rec = r.recommendation.clone().unwrap_or_else(|| panic!("no recommendation: {}", r.note));
    let u = r.unsteered.unwrap();
    println!("pirate: unsteered trait {:.1} coherence {:.1}; recommended {rec:?}", u.trait_score, u.coherence);
    assert!(
        rec.layer + 5 <= monitoring,
        "steering moved away from the monitoring layer: {} vs {monitoring}",
        rec.layer
    );
    assert!(rec.coherence >= r.coherence_threshold && rec.trait_score > u.trait_score);
    // This test once also required the monitoring layer's coherence at the recommended
    // coefficient to fall below the recommended layer's. On an Intel CI machine the two came
    // out at 78.01 and 77.99 (layer 29 and 20 at coefficient 1.0): the same coherence, with the
    // recommended layer gaining 72 trait points against 54. What holds is the recommendation
    // moving away from the monitoring layer (above); the recommendation itself picks the most
    // trait among coherent cells, so a trait comparison here would only restate it.
}

async fn refused(c: &mut Client, req: pb::EvaluateSteeringRequest) -> tonic::Status {
    evaluate(c, req).await.expect_err("the evaluation should be refused")
}

#[tokio::test]
async fn bad_evaluations_are_refused_precisely_and_a_client_that_leaves_cancels_its_work() {
    let mut c = client().await;
    let base = pb::EvaluateSteeringRequest { vector: "evil".into(), max_questions: 2, ..Default::default() };
    assert_eq!(
        refused(&mut c, pb::EvaluateSteeringRequest { vector: "nope".into(), ..base.clone() }).await.code(),
        Code::NotFound
    );
    let invalid = [
        pb::EvaluateSteeringRequest { coefficients: vec![0.0], ..base.clone() },
        pb::EvaluateSteeringRequest { coefficients: vec![f32::NAN], ..base.clone() },
        pb::EvaluateSteeringRequest { coefficients: vec![1e6], ..base.clone() },
        pb::EvaluateSteeringRequest { layers: vec![31], ..base.clone() },
        pb::EvaluateSteeringRequest {
            layers: (0..=20).collect(),
            coefficients: (1..=10).map(|x| x as f32).collect(),
            ..base.clone()
        },
        pb::EvaluateSteeringRequest { coherence_fraction: 1.5, ..base.clone() },
        pb::EvaluateSteeringRequest { vector: String::new(), ..base.clone() },
        pb::EvaluateSteeringRequest { questions: vec!["".into()], ..base.clone() },
    ];
    for (i, req) in invalid.into_iter().enumerate() {
        let e = refused(&mut c, req).await;
        assert_eq!(e.code(), Code::InvalidArgument, "case {i}: {}", e.message());
    }
    let e = refused(
        &mut c,
        pb::EvaluateSteeringRequest {
            layers: (0..=20).collect(),
            coefficients: (1..=10).map(|x| x as f32).collect(),
            ..base.clone()
        },
    )
    .await;
    assert!(e.message().contains("210 cells") && e.message().contains("at most 200"), "{}", e.message());

    // A vector put by hand has neither calibration nor monitoring layer.
    let values = persona_client::pseudo_random_vector(9, 31 * 576);
    c.put_vector(pb::PutVectorRequest { name: "hand-made".into(), values, overwrite: true, ..Default::default() })
        .await
        .unwrap();
    let e = refused(&mut c, pb::EvaluateSteeringRequest { vector: "hand-made".into(), ..base.clone() }).await;
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("no monitoring layer"), "{}", e.message());
    let spectrum = pb::SteeringSpectrumRequest {
        vector: "hand-made".into(),
        question: "Hi?".into(),
        layer: Some(5),
        ..Default::default()
    };
    let e = c.steering_spectrum(spectrum.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(e.message().contains("no steering recommendation"), "{}", e.message());
    let e = c.steering_spectrum(pb::SteeringSpectrumRequest { question: String::new(), ..spectrum }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // A client that leaves mid-evaluation: its generations are cancelled and the engine drains.
    let before = c.get_server_status(pb::GetServerStatusRequest {}).await.unwrap().into_inner().engines[0].cancelled;
    let mut stream = c
        .evaluate_steering(pb::EvaluateSteeringRequest { max_questions: 8, dry_run: true, ..base.clone() })
        .await
        .unwrap()
        .into_inner();
    while let Some(m) = stream.message().await.unwrap() {
        if matches!(m.event, Some(pb::evaluate_steering_response::Event::Progress(ref p)) if p.done >= 4) {
            break;
        }
    }
    drop(stream);
    // The server is shared with this binary's other tests, whose evaluations keep the engine
    // busy for minutes on a slow machine: first the cancellation, then the drain, each bounded.
    let status = || {
        let mut c = c.clone();
        async move { c.get_server_status(pb::GetServerStatusRequest {}).await.unwrap().into_inner().engines.remove(0) }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let e = status().await;
        if e.cancelled > before {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the evaluation's generations were not cancelled: {e:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        let e = status().await;
        if e.running == 0 && e.waiting == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "engine still busy: {e:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
