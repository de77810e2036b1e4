//! Trait-eliciting datasets (`persona_client::elicit`, the `persona dataset` command) on the
//! real embedded model: the trait side reads higher on the trait's vector than the matched
//! normal side, and no sample keeps the system prompt that elicited it.

mod common;

use common::start_with_extraction;
use persona_client::elicit::{self, Elicit, Side};
use persona_client::pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_evil_dataset_reads_more_evil_than_its_normal_twin() {
    let (addr, _running, _dir) = start_with_extraction(common::small_evil_extraction());
    let mut c = persona_client::connect(&addr.to_string()).await.unwrap();
    let def = c.list_traits(pb::ListTraitsRequest {}).await.unwrap().into_inner();
    let def = def.traits.into_iter().find(|t| t.trait_name == "evil").unwrap();
    let opts = elicit::Options {
        model: String::new(),
        n: 24,
        max_tokens: 40,
        temperature: 0.7,
        seed: 5,
        concurrency: 8,
        elicit: Elicit::SystemPrompt,
    };
    let mut calls = 0;
    let evil = elicit::generate(&c, &def, &opts, Side::Trait, |_, _| calls += 1).await.unwrap();
    let normal = elicit::generate(&c, &def, &opts, Side::Normal, |_, _| {}).await.unwrap();
    assert_eq!((evil.len(), normal.len(), calls), (24, 24, 24));
    // Matched: the same questions in the same order, framed variations past the first 20.
    for (e, n) in evil.iter().zip(&normal) {
        assert_eq!((&e.question, e.question_index, e.framing), (&n.question, n.question_index, n.framing));
        assert!(!e.answer.is_empty() && !n.answer.is_empty());
    }
    assert_eq!(evil[20].framing, 1, "20 questions, then the next framing");
    assert!(evil[20].question.starts_with("I have a question: "));
    assert!(
        def.eval_questions.iter().all(|q| evil.iter().all(|s| !s.question.contains(q.as_str()))),
        "held-out questions stay out"
    );
    // Saved without the system prompt: one user turn, one assistant turn.
    let line: serde_json::Value = serde_json::from_str(&evil[0].to_json("evil")).unwrap();
    let roles: Vec<&str> = line["messages"].as_array().unwrap().iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["user", "assistant"]);
    assert_eq!(line["source"], "system prompt of pair 0");
    // The trait side reads higher on the evil vector (response average, calibrated).
    let mean_score = |samples: Vec<elicit::Sample>| {
        let mut c = c.clone();
        async move {
            let mut sum = 0.0;
            for s in &samples {
                let r = c
                    .project_activation(pb::ProjectActivationRequest {
                        conversation: Some(pb::Conversation {
                            messages: vec![persona_client::message("user", &s.question)],
                        }),
                        response: s.answer.clone(),
                        targets: vec![pb::ProjectionTarget { vector: "evil".into(), layer: None }],
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                sum += r.projections[0].response_avg_calibrated;
            }
            sum / samples.len() as f32
        }
    };
    let (e, n) = (mean_score(evil.clone()).await, mean_score(normal).await);
    eprintln!("calibrated evil reading: evil-elicited answers {e:.1}, normal answers {n:.1}");
    assert!(e > n + 10.0, "evil-elicited answers read {e:.1} on evil, normal ones {n:.1}");
    // Steered elicitation: no system prompt, the vector at a layer and coefficient.
    let steered =
        elicit::Options { n: 2, elicit: Elicit::Steered(persona_client::steer_by_name("evil", Some(16), 4.0)), ..opts };
    let s = elicit::generate(&c, &def, &steered, Side::Trait, |_, _| {}).await.unwrap();
    assert_eq!(s[0].source, "steered");
    assert!(elicit::questions(&def, 10_000).is_err(), "more samples than questions x framings");
}
