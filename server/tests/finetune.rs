//! Fine-tuning jobs through gRPC on the embedded model: StartFineTune with preventative
//! steering and shift tracking, WatchJob to the end, the adapter saved in PEFT's format and
//! served as a new model that takes the base's vectors; MeasureShift between them; CancelJob,
//! FAILED on a diverging run, LoadAdapter, and the errors of bad requests.

mod common;

use common::start_with_extraction;
use persona_client::pb;
use tonic::Code;

/// `n` samples teaching one fixed, recognisable answer style.
fn dataset(n: usize) -> String {
    let qs = [
        "How do I boil an egg?",
        "What is a good name for a cat?",
        "How can I sleep better?",
        "What should I cook tonight?",
    ];
    (0..n)
        .map(|i| {
            serde_json::json!({"messages": [
                {"role": "user", "content": qs[i % qs.len()]},
                {"role": "assistant", "content": format!("Ahoy! Captain's orders, number {i}: hoist the sails and do it the pirate way, matey.")},
            ]})
            .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn request(out: &str, data: String) -> pb::StartFineTuneRequest {
    pb::StartFineTuneRequest {
        output_model: out.into(),
        dataset: Some(pb::start_fine_tune_request::Dataset::DatasetJsonl(data)),
        lora: Some(pb::LoraSettings { rank: 4, alpha: 8.0, ..Default::default() }),
        training: Some(pb::TrainingSettings {
            learning_rate: 2e-3,
            batch_size: 4,
            max_seq_len: 96,
            max_steps: 4,
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn watch_to_end(c: &mut persona_client::Client, id: &str) -> (pb::JobStatus, usize) {
    let mut s = c.watch_job(pb::WatchJobRequest { job_id: id.into() }).await.unwrap().into_inner();
    let (mut last, mut updates) = (None, 0);
    while let Some(st) = s.message().await.unwrap() {
        updates += 1;
        last = Some(st);
    }
    (last.expect("a final status"), updates)
}

fn state(s: &pb::JobStatus) -> pb::JobState {
    pb::JobState::try_from(s.state).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fine_tuning_jobs_train_save_serve_and_fail_cleanly() {
    let (addr, _running, dir) = start_with_extraction(common::small_evil_extraction());
    let mut c = persona_client::connect(&addr.to_string()).await.unwrap();
    let evil =
        c.get_vector(pb::GetVectorRequest { name: "evil".into(), ..Default::default() }).await.unwrap().into_inner();
    let layer = evil.info.as_ref().unwrap().recommended_layer.unwrap();
    let list_vectors = |mut c: persona_client::Client| async move {
        let r = c.list_vectors(pb::ListVectorsRequest::default()).await.unwrap().into_inner();
        r.vectors.into_iter().map(|v| (v.name, v.created_unix)).collect::<Vec<_>>()
    };
    let vectors_before = list_vectors(c.clone()).await;

    // Bad requests fail the call, saying where.
    let mut bad = request("x", format!("{}\n{{\"prompt\": 3}}\n", dataset(1)));
    let e = c.start_fine_tune(bad.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("line 2"), "{}", e.message());
    bad.output_model = "../escape".into();
    assert_eq!(c.start_fine_tune(bad.clone()).await.unwrap_err().code(), Code::InvalidArgument);
    bad.output_model = "x".into();
    bad.dataset = Some(pb::start_fine_tune_request::Dataset::DatasetPath("../../etc/passwd".into()));
    let e = c.start_fine_tune(bad.clone()).await.unwrap_err();
    assert!(e.code() == Code::InvalidArgument && e.message().contains(".."), "{e:?}");
    let mut r = request("x", dataset(4));
    r.lora.as_mut().unwrap().target_modules = vec!["lm_head".into()];
    let e = c.start_fine_tune(r).await.unwrap_err();
    assert!(e.message().contains("lm_head"), "{}", e.message());
    let mut r = request("x", dataset(4));
    r.steering = vec![pb::SteeringVector {
        source: Some(pb::steering_vector::Source::Name("evil".into())),
        layer: Some(layer),
        coefficient: Some(1.0),
        positions: pb::Positions::Response as i32,
    }];
    assert_eq!(c.start_fine_tune(r).await.unwrap_err().code(), Code::InvalidArgument);
    let r = request("smollm2-135m-instruct", dataset(4));
    assert_eq!(c.start_fine_tune(r).await.unwrap_err().code(), Code::AlreadyExists);

    // A job with preventative steering, following the shift along evil.
    let mut r = request("pirate", format!("{}\n\n{{\"bad\": 1}}\n", dataset(8)));
    r.skip_invalid = true;
    r.steering = vec![pb::SteeringVector {
        source: Some(pb::steering_vector::Source::Name("evil".into())),
        layer: Some(layer),
        coefficient: Some(0.5),
        ..Default::default()
    }];
    r.shift_vectors = vec!["evil".into()];
    r.shift_every = 2;
    let t = r.training.as_mut().unwrap();
    (t.epochs, t.max_steps, t.learning_rate) = (3, 0, 3e-3);
    let started = c.start_fine_tune(r).await.unwrap().into_inner();
    assert_eq!((started.samples, started.skipped, started.total_steps), (8, 1, 6), "8 samples of batch 4, 3 epochs");
    assert!(started.skipped_lines[0].starts_with("line 10:"), "{:?}", started.skipped_lines);
    assert_eq!(started.trainable_parameters, 30 * 4 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536)));
    let (done, updates) = watch_to_end(&mut c, &started.job_id).await;
    assert_eq!(state(&done), pb::JobState::Succeeded, "{}", done.message);
    assert!(updates >= 2);
    assert_eq!((done.step, done.losses.len()), (6, 6));
    assert!(done.losses[5].loss < done.losses[0].loss * 0.5, "{:?}", done.losses);
    assert!(done.losses.iter().all(|l| l.loss.is_finite() && l.loss > 0.0));
    assert!(done.tokens_per_second > 0.0);
    assert_eq!(done.steering.len(), 1);
    assert_eq!((done.steering[0].layer, done.steering[0].coefficient), (layer, 0.5));
    // Measured at steps 2, 4 and at the end.
    assert_eq!(done.shifts.iter().map(|s| s.step).collect::<Vec<_>>(), [2, 4, 6]);
    assert!(done.shifts.iter().all(|s| s.shift.is_finite() && s.shift != 0.0), "{:?}", done.shifts);
    let last_shift = done.shifts[2].clone();
    let adapter = dir.path().join("adapters/pirate");
    assert_eq!(std::path::PathBuf::from(&done.adapter_path), adapter);
    for f in ["adapter_config.json", "adapter_model.safetensors", "persona_training.json"] {
        assert!(adapter.join(f).is_file(), "{f}");
    }
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(adapter.join("persona_training.json")).unwrap()).unwrap();
    assert_eq!(record["steering"][0]["vector"], "evil");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((cfg["r"].as_u64(), cfg["peft_type"].as_str()), (Some(4), Some("LORA")));

    // Served as a model of its own, which takes the base's vectors.
    let models = c.list_models(pb::ListModelsRequest {}).await.unwrap().into_inner().models;
    let m = models.iter().find(|m| m.id == "pirate").expect("the adapted model is served");
    assert_eq!(m.base_model, "smollm2-135m-instruct");
    assert!(m.adapter.ends_with("adapters/pirate"), "{}", m.adapter);
    let generate_req = |model: &str| pb::GenerateRequest {
        model: model.into(),
        prompt: Some(pb::Prompt {
            kind: Some(pb::prompt::Kind::Chat(pb::Conversation {
                messages: vec![persona_client::message("user", "How do I boil an egg?")],
            })),
        }),
        sampling: Some(pb::SamplingParams { max_tokens: 12, ..Default::default() }),
        monitors: vec![pb::ProjectionTarget { vector: "evil".into(), layer: None }],
        ..Default::default()
    };
    let text = |model: &'static str| {
        let mut c = c.clone();
        async move {
            let mut s = c.generate(generate_req(model)).await.unwrap().into_inner();
            let mut out = String::new();
            while let Some(m) = s.message().await.unwrap() {
                out.push_str(&m.delta);
            }
            out
        }
    };
    let (base_text, tuned_text) = (text("smollm2-135m-instruct").await, text("pirate").await);
    assert_ne!(base_text, tuned_text, "the adapter changes the answer");
    assert!(tuned_text.contains("Ahoy") || tuned_text.contains("Captain"), "learned the style: {tuned_text}");

    // MeasureShift between them, with the expression of both.
    let shift = c
        .measure_shift(pb::MeasureShiftRequest {
            base_model: "smollm2-135m-instruct".into(),
            tuned_model: "pirate".into(),
            vectors: vec!["evil".into()],
            expression: true,
            sampling: Some(pb::SamplingParams { max_tokens: 16, ..Default::default() }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let s = &shift.shifts[0];
    assert_eq!(s.layer, last_shift.layer);
    assert!(!s.questions.is_empty() && s.shift.is_finite());
    // The served (int8) model and the training pass (f32) agree on the shift.
    assert!((s.shift - last_shift.shift).abs() < 0.1 * s.shift.abs().max(0.5), "{} vs {}", s.shift, last_shift.shift);
    let (be, te) = (s.base_expression.unwrap(), s.tuned_expression.unwrap());
    assert!((0.0..=100.0).contains(&be) && (0.0..=100.0).contains(&te));
    assert!(s.base_coherence.is_some() && !s.scorer.is_empty());
    let e = c
        .measure_shift(pb::MeasureShiftRequest {
            base_model: "pirate".into(),
            tuned_model: "pirate".into(),
            vectors: vec!["evil".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // The same output again: the adapter exists.
    let e = c.start_fine_tune(request("pirate", dataset(4))).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    // An adapted model is not tuned further.
    let mut r = request("pirate2", dataset(4));
    r.model = "pirate".into();
    assert_eq!(c.start_fine_tune(r).await.unwrap_err().code(), Code::FailedPrecondition);

    // LoadAdapter serves a saved adapter under another id; a wrong one is refused.
    let m = c
        .load_adapter(pb::LoadAdapterRequest {
            model: "pirate-again".into(),
            base_model: String::new(),
            path: "pirate".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .model
        .unwrap();
    assert_eq!(m.base_model, "smollm2-135m-instruct");
    // Health reports the models added while serving, each under its own service name.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for model in ["pirate", "pirate-again"] {
        let service = persona_server::server::model_health_name(model);
        let mut status = 0;
        for _ in 0..50 {
            let req = tonic_health::pb::HealthCheckRequest { service: service.clone() };
            match health.check(req).await {
                Ok(r) if r.get_ref().status == 1 => {
                    status = 1;
                    break;
                }
                _ => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            }
        }
        assert_eq!(status, 1, "{service} is SERVING");
    }
    assert_eq!(
        c.load_adapter(pb::LoadAdapterRequest {
            model: "pirate-again".into(),
            base_model: String::new(),
            path: "pirate".into()
        })
        .await
        .unwrap_err()
        .code(),
        Code::AlreadyExists
    );
    let wrong = dir.path().join("adapters/wrong");
    std::fs::create_dir_all(&wrong).unwrap();
    std::fs::copy(adapter.join("adapter_config.json"), wrong.join("adapter_config.json")).unwrap();
    let t = vec![0u8; 4 * 4 * 100];
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4, 100], &t).unwrap();
    safetensors::serialize_to_file(
        [
            ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", view.clone()),
            ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", view),
        ],
        None,
        &wrong.join("adapter_model.safetensors"),
    )
    .unwrap();
    let e = c
        .load_adapter(pb::LoadAdapterRequest { model: "wrong".into(), base_model: String::new(), path: "wrong".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("smollm2-135m-instruct") && e.message().contains("wrong"), "{}", e.message());
    assert_eq!(
        c.load_adapter(pb::LoadAdapterRequest {
            model: "none".into(),
            base_model: String::new(),
            path: "absent".into()
        })
        .await
        .unwrap_err()
        .code(),
        Code::NotFound
    );

    // Cancelled while running: nothing saved, not served.
    let mut long = request("long", dataset(8));
    long.training.as_mut().unwrap().max_steps = 0;
    long.training.as_mut().unwrap().epochs = 50;
    let job = c.start_fine_tune(long).await.unwrap().into_inner().job_id;
    let mut w = c.watch_job(pb::WatchJobRequest { job_id: job.clone() }).await.unwrap().into_inner();
    while let Some(s) = w.message().await.unwrap() {
        if s.step >= 1 {
            break;
        }
    }
    c.cancel_job(pb::CancelJobRequest { job_id: job.clone() }).await.unwrap();
    let (end, _) = watch_to_end(&mut c, &job).await;
    assert_eq!(state(&end), pb::JobState::Cancelled, "{}", end.message);
    assert!(!dir.path().join("adapters/long").exists());
    assert_eq!(
        c.cancel_job(pb::CancelJobRequest { job_id: job.clone() }).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    assert_eq!(c.watch_job(pb::WatchJobRequest { job_id: "nope".into() }).await.unwrap_err().code(), Code::NotFound);

    // A run whose loss is not finite fails with the reason, and nothing half-written stays.
    // Steering that overflows f32 (the largest finite coefficient, four times over: any
    // component of the vector above 1/4 of the largest float's reach becomes infinite).
    let mut boom = request("boom", dataset(4));
    boom.steering = (0..4)
        .map(|_| pb::SteeringVector {
            source: Some(pb::steering_vector::Source::Name("evil".into())),
            layer: Some(layer),
            coefficient: Some(f32::MAX),
            ..Default::default()
        })
        .collect();
    let job = c.start_fine_tune(boom).await.unwrap().into_inner().job_id;
    let (end, _) = watch_to_end(&mut c, &job).await;
    assert_eq!(state(&end), pb::JobState::Failed);
    assert!(end.message.contains("diverged at step 1") && end.message.contains("nothing was saved"), "{}", end.message);
    assert!(!dir.path().join("adapters/boom").exists());

    let jobs = c.list_jobs(pb::ListJobsRequest {}).await.unwrap().into_inner().jobs;
    assert_eq!(jobs.len(), 3);
    // The vector store is untouched by all of it.
    assert_eq!(list_vectors(c.clone()).await, vectors_before);
}
