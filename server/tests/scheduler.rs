//! Continuous batching through the real server: batch invariance under mixed steering,
//! cancellation, queue bound, KV cache budget and deadlines.

mod common;

use persona_client::{Client, chat_request, generate_text, pb, steer_inline};
use std::time::Duration;
use tonic::Code;

fn greedy(user: &str, max_tokens: u32) -> pb::GenerateRequest {
    let mut req = chat_request(user, Some("You are a helpful assistant."));
    req.sampling = Some(pb::SamplingParams { max_tokens, ..Default::default() });
    req
}

async fn status(c: &mut Client) -> pb::EngineStatus {
    c.get_server_status(pb::GetServerStatusRequest {}).await.unwrap().into_inner().engines.remove(0)
}

/// Polls the engine status until `pred` holds (the engine publishes after each step).
async fn wait_for(c: &mut Client, what: &str, pred: impl Fn(&pb::EngineStatus) -> bool) -> pb::EngineStatus {
    for _ in 0..200 {
        let s = status(c).await;
        if pred(&s) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}: {:?}", status(c).await);
}

/// One server per test, configured for what it checks.
fn server(configure: impl FnOnce(&mut persona_server::config::Settings)) -> (common::Running, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut s = common::settings(dir.path());
    configure(&mut s);
    (common::start(s), dir)
}

#[test]
fn greedy_output_is_the_same_alone_and_in_a_batch_of_eight_differently_steered_sequences() {
    let s = batch_invariance_under_mixed_steering(|_| {});
    assert_eq!(s.kv_pool_bytes, 0, "the CPU's host kernels keep caches per sequence");
}

/// The same through the GPU's code path (dense f16 weights, pooled f16 KV cache, batched
/// attention, device argmax), run on the CPU.
#[test]
fn batch_invariance_holds_in_the_gpu_configuration() {
    let s = batch_invariance_under_mixed_steering(|s| {
        s.models[0].requantize = "dense".into();
        s.models[0].dtype = "f16".into();
    });
    // Eight sequences at once: eight slots of (at least) the longest sequence's 128 positions,
    // 30 layers × keys and values × 3 kv heads × 64 dims × 2 bytes each.
    assert!(s.kv_pool_bytes >= 8 * 128 * 30 * 2 * 3 * 64 * 2, "{s:?}");
}

/// Runs one greedy probe alone, then with seven differently steered sequences in one batch, and
/// requires the same tokens; returns the engine's status afterwards.
fn batch_invariance_under_mixed_steering(
    configure: impl FnOnce(&mut persona_server::config::Settings),
) -> pb::EngineStatus {
    let (srv, _dir) = server(configure);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = persona_client::connect(&srv.addr.to_string()).await.unwrap();
        let probe = greedy("Explain why the sky is blue.", 40);
        let alone = generate_text(&mut c, probe.clone()).await.unwrap();
        assert_eq!(status(&mut c).await.completed, 2, "warm-up plus the solo run");

        let mut tasks = tokio::task::JoinSet::new();
        let questions = [
            "Name a fruit.",
            "What is rust?",
            "Describe a cat.",
            "Why do birds sing?",
            "Count to ten.",
            "What is a river?",
            "Tell me a joke.",
        ];
        for (i, q) in questions.iter().enumerate() {
            let mut req = greedy(q, 48);
            let v = persona_client::pseudo_random_vector(100 + i as u64, 576);
            req.steering = vec![steer_inline(v, 4 + 3 * i as u32, 1.0 + i as f32)];
            let mut c = c.clone();
            tasks.spawn(async move { generate_text(&mut c, req).await.unwrap() });
        }
        let mut c2 = c.clone();
        let batched = tokio::spawn(async move { generate_text(&mut c2, probe).await.unwrap() });
        // All eight run in one batch (max_batch 16): the engine reports them together.
        wait_for(&mut c, "eight running sequences", |s| s.running == 8).await;
        let batched = batched.await.unwrap();
        let others = tasks.join_all().await;
        assert_eq!(batched.token_ids, alone.token_ids, "{:?} vs {:?}", batched.text, alone.text);
        assert_eq!(batched.text, alone.text);
        assert!(others.iter().all(|o| !o.token_ids.is_empty()));
        status(&mut c).await
    })
}

#[test]
fn cancelled_streams_free_their_slot_and_the_queue_is_bounded() {
    // One slot and one queue place: a second request waits, a third is refused.
    let (srv, _dir) = server(|s| {
        s.engine.max_batch = 1;
        s.engine.max_queue = 1;
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = persona_client::connect(&srv.addr.to_string()).await.unwrap();
        let long = greedy("Write a very long story about a dragon who learns to bake bread.", 600);
        let mut a = c.generate(long.clone()).await.unwrap().into_inner();
        assert!(a.message().await.unwrap().is_some(), "first token of the long stream");

        let mut c2 = c.clone();
        let waiting = tokio::spawn(async move { generate_text(&mut c2, greedy("Say hello.", 8)).await });
        wait_for(&mut c, "the second request to queue", |s| s.waiting == 1).await;
        let refused = c.generate(greedy("And me?", 4)).await.unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
        assert!(refused.message().contains("queue"), "{}", refused.message());

        // Dropping the long stream frees the only slot; the queued request then completes.
        drop(a);
        let done = waiting.await.unwrap().unwrap();
        assert!(!done.token_ids.is_empty());
        let s = wait_for(&mut c, "the cancellation to be counted", |s| s.cancelled == 1 && s.running == 0).await;
        assert!(s.generated_tokens < 600, "the cancelled sequence ran on: {s:?}");
        assert_eq!((s.rejected, s.kv_cache_reserved_bytes), (1, 0));
    });
}

#[test]
fn kv_budget_and_deadlines_get_precise_statuses() {
    // 8 MiB holds ~180 tokens of SmolLM2's KV cache (45 KiB each).
    let (srv, _dir) = server(|s| s.engine.kv_cache_mb = 8);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = persona_client::connect(&srv.addr.to_string()).await.unwrap();
        let too_big = c.generate(greedy("Hi", 500)).await.unwrap_err();
        assert_eq!(too_big.code(), Code::ResourceExhausted, "{too_big:?}");
        assert!(too_big.message().contains("KV cache"), "{}", too_big.message());

        // Two requests of ~130 tokens each cannot run together: the second waits, then runs.
        let req = greedy("Tell me about the ocean.", 100);
        let (mut c1, mut c2) = (c.clone(), c.clone());
        let (r1, r2) = tokio::join!(generate_text(&mut c1, req.clone()), generate_text(&mut c2, req));
        assert_eq!(r1.unwrap().token_ids.len(), r2.unwrap().token_ids.len());

        // A deadline cuts a long generation short with DEADLINE_EXCEEDED.
        let mut req = tonic::Request::new(greedy("Write a long essay about mountains.", 150));
        req.set_timeout(Duration::from_millis(400));
        let mut stream = c.generate(req).await.unwrap().into_inner();
        let mut tokens = 0;
        let err = loop {
            match stream.message().await {
                Ok(Some(m)) => tokens += m.token_ids.len(),
                Ok(None) => panic!("stream ended without hitting the deadline after {tokens} tokens"),
                Err(e) => break e,
            }
        };
        assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
        assert!(tokens < 150);
        let s = wait_for(&mut c, "an idle engine", |s| s.running == 0 && s.kv_cache_reserved_bytes == 0).await;
        assert_eq!((s.cancelled, s.rejected), (1, 1), "the deadline counts as a cancellation: {s:?}");
    });
}

/// A generation that captures as it runs (extraction's single pass) summarises exactly the states a
/// separate capture pass over the prompt and the tokens fed back would see.
#[test]
fn a_capturing_generation_matches_a_capture_pass_over_what_it_fed() {
    use persona_server::scheduler::{CaptureJob, EngineConfig, EngineHandle, GenEvent, GenerateJob};
    use persona_server::steering::plan::SteeringPlan;
    let model = common::served_model();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let engine = EngineHandle::spawn(model.clone(), EngineConfig::default()).unwrap();
        let text = model.template.render(&[persona_server::model::chat::Message::new("user", "Name three rivers.")]);
        let prompt = model.tokenizer.encode(&text.unwrap()).unwrap();
        let job = GenerateJob { capture: true, ..GenerateJob::greedy(prompt.clone(), 12) };
        let mut rx = engine.generate(job).unwrap();
        let (mut ids, mut summary) = (Vec::new(), None);
        while let Some(ev) = rx.recv().await {
            match ev.unwrap() {
                GenEvent::Token { id, .. } => ids.push(id),
                GenEvent::Done(s) => summary = Some(s),
            }
        }
        let live = summary.unwrap().capture.expect("the summary carries the capture");
        assert_eq!(ids.len(), 12);
        // Stopped by max_tokens: the last token was sampled, never fed back.
        let fed = &ids[..ids.len() - 1];
        let job = CaptureJob {
            tokens: [prompt.as_slice(), fed].concat(),
            prompt_len: prompt.len(),
            steering: SteeringPlan::new(0),
            probes: Vec::new(),
            logprobs: None,
            token_states: None,
        };
        let offline = engine.capture(job).await.unwrap();
        let close = |a: &[f32], b: &[f32], what: &str| {
            let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs() / y.abs().max(1.0)).fold(0f32, f32::max);
            assert!(worst < 1e-3, "{what}: relative difference {worst}");
        };
        close(&live.prompt_last, &offline.prompt_last, "prompt_last");
        close(&live.prompt_avg, &offline.prompt_avg, "prompt_avg");
        close(live.response_avg.as_ref().unwrap(), offline.response_avg.as_ref().unwrap(), "response_avg");
    });
}

/// The engine's health reaches gRPC health checks and the status report: a panic fails the
/// request that was running with INTERNAL and a message; after a crash loop the model's health
/// service and `persona.v1.PersonaService` turn NOT_SERVING and calls get UNAVAILABLE.
#[test]
fn engine_panics_reach_health_checks_and_the_status() {
    let tok = &common::served_model().tokenizer;
    let poison = *tok.encode(" zebra").unwrap().last().unwrap();
    let (srv, _dir) = server(|s| s.engine.panic_on_token = Some(poison));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = persona_client::connect(&srv.addr.to_string()).await.unwrap();
        let channel =
            tonic::transport::Channel::from_shared(format!("http://{}", srv.addr)).unwrap().connect().await.unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let check = |service: String| tonic_health::pb::HealthCheckRequest { service };
        let model = persona_server::server::model_health_name("smollm2-135m-instruct");
        let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
        let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
        assert_eq!(health.check(check(model.clone())).await.unwrap().into_inner().status, serving);

        for i in 0..5 {
            let status = generate_text(&mut c, greedy("Tell me about the zebra.", 8)).await.unwrap_err();
            assert_eq!(status.code(), Code::Internal, "panic {i}: {status:?}");
            assert!(
                status.message().contains("injected fault") && status.message().contains("restarted"),
                "{status:?}"
            );
        }
        let s = wait_for(&mut c, "the crash loop", |s| !s.serving).await;
        assert_eq!((s.restarts, s.failed), (5, 5), "{s:?}");
        assert!(s.last_panic.contains("injected fault"), "{s:?}");
        for service in [model, "persona.v1.PersonaService".to_string()] {
            assert_eq!(
                health.check(check(service.clone())).await.unwrap().into_inner().status,
                not_serving,
                "{service}"
            );
        }
        let e = c.generate(greedy("Hello?", 4)).await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    });
}
