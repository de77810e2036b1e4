//! End to end: a real server on 127.0.0.1:0 serving the embedded SmolLM2 model, driven through
//! the client library over gRPC.

mod common;

use common::{Running, TEST_CONTEXT, settings, start};
use persona_client::{Client, chat, chat_request, generate_text, pb, steer_by_name, steer_inline};
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;
use tonic::Code;

const SYSTEM: &str = "You are a helpful assistant.";

/// The server shared by the tests of this binary; it lives as long as the process.
fn shared() -> SocketAddr {
    static SERVER: OnceLock<(SocketAddr, std::sync::Mutex<Running>, tempfile::TempDir)> = OnceLock::new();
    SERVER
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let running = start(settings(dir.path()));
            (running.addr, std::sync::Mutex::new(running), dir)
        })
        .0
}

async fn client() -> Client {
    persona_client::connect(&shared().to_string()).await.unwrap()
}

fn greedy(user: &str, max_tokens: u32) -> pb::GenerateRequest {
    let mut req = chat_request(user, Some(SYSTEM));
    req.sampling = Some(pb::SamplingParams { max_tokens, ..Default::default() });
    req
}

fn d_model() -> usize {
    576
}

fn n_rows() -> usize {
    31
}

/// Stores a deterministic pseudo-random vector of the model's shape.
async fn put_random(c: &mut Client, name: &str, seed: u64) -> pb::VectorInfo {
    let values = persona_client::pseudo_random_vector(seed, n_rows() * d_model());
    let req = pb::PutVectorRequest { name: name.into(), values, overwrite: true, ..Default::default() };
    c.put_vector(req).await.unwrap().into_inner().info.unwrap()
}

/// The bare question "What is the capital of France?" is a coin toss for this model: the f32
/// reference puts "The" 0.10 nats above "La" as the first token, and on an Intel CI machine the
/// default kernels' activation rounding put it 0.10 nats the other way ("La femme de France…").
/// Asked for one sentence, the reference's first token leads by 1.7 nats and every later one by
/// more than 1.2, so a wrong answer here means a broken model, not a rounding.
#[tokio::test]
async fn generate_answers_paris() {
    let mut c = client().await;
    let out =
        generate_text(&mut c, greedy("What is the capital of France? Answer in one sentence.", 24)).await.unwrap();
    assert!(out.text.contains("Paris"), "answer: {:?}", out.text);
    let s = out.summary.expect("final message carries a summary");
    assert_eq!(s.completion_tokens as usize, out.token_ids.len());
    assert!(s.prompt_tokens > 10);
    assert_eq!(s.model, "smollm2-135m-instruct");
    assert_eq!(s.finish_reason, pb::FinishReason::Stop as i32, "a one-sentence answer ends by itself: {:?}", out.text);
}

#[tokio::test]
async fn steering_changes_greedy_output_and_zero_coefficient_does_not() {
    let mut c = client().await;
    put_random(&mut c, "e2e-steer", 7).await;
    let question = "Describe your ideal weekend in two sentences.";
    let plain = generate_text(&mut c, greedy(question, 32)).await.unwrap();

    let mut zero = greedy(question, 32);
    zero.steering = vec![steer_by_name("e2e-steer", Some(12), 0.0)];
    let zero = generate_text(&mut c, zero).await.unwrap();
    assert_eq!(zero.text.as_bytes(), plain.text.as_bytes());
    assert_eq!(zero.token_ids, plain.token_ids);

    let mut steered = greedy(question, 32);
    steered.steering = vec![steer_by_name("e2e-steer", Some(12), 6.0)];
    let steered = generate_text(&mut c, steered).await.unwrap();
    assert_ne!(steered.token_ids, plain.token_ids, "steering left the output unchanged: {:?}", plain.text);

    // The same row given inline steers identically to the stored vector.
    let row = &persona_client::pseudo_random_vector(7, n_rows() * d_model())[12 * d_model()..13 * d_model()];
    let mut inline = greedy(question, 32);
    inline.steering = vec![steer_inline(row.to_vec(), 12, 6.0)];
    let inline = generate_text(&mut c, inline).await.unwrap();
    assert_eq!(inline.token_ids, steered.token_ids);
}

#[tokio::test]
async fn sampling_is_reproducible_with_a_seed_and_stops_on_stop_strings() {
    let mut c = client().await;
    let mut req = greedy("Write a short poem about the sea.", 24);
    req.sampling = Some(pb::SamplingParams {
        max_tokens: 24,
        temperature: 0.9,
        top_p: 0.95,
        seed: Some(42),
        ..Default::default()
    });
    let a = generate_text(&mut c, req.clone()).await.unwrap();
    let b = generate_text(&mut c, req).await.unwrap();
    assert_eq!(a.token_ids, b.token_ids);

    let mut counting = greedy("Count from 1 to 20, separated by commas.", 64);
    let full = generate_text(&mut c, counting.clone()).await.unwrap();
    assert!(full.text.contains('5'), "{:?}", full.text);
    counting.sampling.as_mut().unwrap().stop = vec!["5".into()];
    let stopped = generate_text(&mut c, counting).await.unwrap();
    assert!(!stopped.text.contains('5'), "stop string leaked: {:?}", stopped.text);
    assert!(full.text.starts_with(&stopped.text), "{:?} vs {:?}", stopped.text, full.text);
    assert_eq!(stopped.summary.unwrap().finish_reason, pb::FinishReason::Stop as i32);
}

async fn status_of(c: &mut Client, req: pb::GenerateRequest) -> tonic::Status {
    match c.generate(req).await {
        Err(s) => s,
        Ok(stream) => {
            let mut stream = stream.into_inner();
            loop {
                match stream.message().await {
                    Err(s) => return s,
                    Ok(None) => panic!("request succeeded"),
                    Ok(Some(_)) => {}
                }
            }
        }
    }
}

#[tokio::test]
async fn bad_requests_get_precise_statuses() {
    let mut c = client().await;
    put_random(&mut c, "no-recommendation", 5).await;
    let mut inline_without_layer = steer_inline(vec![0.1; d_model()], 3, 1.0);
    inline_without_layer.layer = None;
    let empty = pb::GenerateRequest {
        prompt: Some(pb::Prompt { kind: Some(pb::prompt::Kind::Chat(pb::Conversation { messages: vec![] })) }),
        ..Default::default()
    };
    let cases: Vec<(&str, pb::GenerateRequest, Code, &str)> = vec![
        ("empty messages", empty, Code::InvalidArgument, "no messages"),
        ("no prompt", pb::GenerateRequest::default(), Code::InvalidArgument, "prompt is required"),
        ("unknown model", pb::GenerateRequest { model: "gpt-17".into(), ..greedy("hi", 4) }, Code::NotFound, "gpt-17"),
        (
            "unknown vector",
            pb::GenerateRequest { steering: vec![steer_by_name("no-such-vector", Some(3), 1.0)], ..greedy("hi", 4) },
            Code::NotFound,
            "no-such-vector",
        ),
        (
            "layer out of range",
            pb::GenerateRequest { steering: vec![steer_inline(vec![0.1; d_model()], 31, 1.0)], ..greedy("hi", 4) },
            Code::InvalidArgument,
            "layer 31",
        ),
        (
            "wrong dimension",
            pb::GenerateRequest { steering: vec![steer_inline(vec![0.1; 100], 3, 1.0)], ..greedy("hi", 4) },
            Code::InvalidArgument,
            "100 values",
        ),
        (
            "inline vector without a layer",
            pb::GenerateRequest { steering: vec![inline_without_layer], ..greedy("hi", 4) },
            Code::InvalidArgument,
            "need a layer",
        ),
        (
            "no layer and no recommended one",
            pb::GenerateRequest { steering: vec![steer_by_name("no-recommendation", None, 1.0)], ..greedy("hi", 4) },
            Code::InvalidArgument,
            "no recommended layer",
        ),
        (
            "non-finite coefficient",
            pb::GenerateRequest { steering: vec![steer_inline(vec![0.1; d_model()], 3, f32::NAN)], ..greedy("hi", 4) },
            Code::InvalidArgument,
            "finite",
        ),
        (
            "prompt longer than the context",
            greedy(&"word ".repeat(TEST_CONTEXT + 100), 4),
            Code::InvalidArgument,
            "context window",
        ),
        (
            "top_p out of range",
            pb::GenerateRequest {
                sampling: Some(pb::SamplingParams { top_p: 1.5, ..Default::default() }),
                ..greedy("hi", 4)
            },
            Code::InvalidArgument,
            "top_p",
        ),
        (
            "unknown role",
            pb::GenerateRequest {
                prompt: Some(pb::Prompt {
                    kind: Some(pb::prompt::Kind::Chat(pb::Conversation {
                        messages: vec![persona_client::message("wizard", "hi")],
                    })),
                }),
                ..Default::default()
            },
            Code::InvalidArgument,
            "wizard",
        ),
    ];
    for (what, req, code, needle) in cases {
        let s = status_of(&mut c, req).await;
        assert_eq!(s.code(), code, "{what}: {s:?}");
        assert!(s.message().contains(needle), "{what}: message {:?} lacks {needle:?}", s.message());
        // Only an unknown model is marked as one (the HTTP API's `model_not_found` reads this).
        let kind = s.metadata().get("persona-error-kind").map(|v| v.to_str().unwrap_or("not text").to_string());
        assert_eq!(kind.as_deref(), (what == "unknown model").then_some("model-not-found"), "{what}: error kind");
    }
    // The server is still healthy afterwards.
    let out = generate_text(&mut c, greedy("Say hi.", 4)).await.unwrap();
    assert!(!out.token_ids.is_empty());
}

#[tokio::test]
async fn vector_crud_rejects_bad_input_and_keeps_the_stored_vector() {
    let mut c = client().await;
    let info = put_random(&mut c, "e2e-crud", 1).await;
    assert_eq!((info.n_rows as usize, info.d_model as usize), (n_rows(), d_model()));
    assert_eq!(info.model, "smollm2-135m-instruct");
    assert_eq!(info.row_norms.len(), n_rows());

    let get = |name: &str| pb::GetVectorRequest { name: name.into(), include_values: true };
    let before = c.get_vector(get("e2e-crud")).await.unwrap().into_inner();
    assert_eq!(before.values, persona_client::pseudo_random_vector(1, n_rows() * d_model()));

    // Wrong shape, non-finite values, bad name, no overwrite flag: each refused, vector intact.
    let bad = [
        (
            pb::PutVectorRequest {
                name: "e2e-crud".into(),
                values: vec![1.0; 10],
                overwrite: true,
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            pb::PutVectorRequest {
                name: "e2e-crud".into(),
                values: vec![f32::INFINITY; n_rows() * d_model()],
                overwrite: true,
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            pb::PutVectorRequest {
                name: "../escape".into(),
                values: vec![0.5; n_rows() * d_model()],
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            pb::PutVectorRequest {
                name: "e2e-crud".into(),
                values: vec![0.5; n_rows() * d_model()],
                ..Default::default()
            },
            Code::AlreadyExists,
        ),
        (
            pb::PutVectorRequest {
                name: "e2e-other".into(),
                model: "nope".into(),
                values: vec![0.5; n_rows() * d_model()],
                ..Default::default()
            },
            Code::NotFound,
        ),
    ];
    for (req, code) in bad {
        let s = c.put_vector(req.clone()).await.unwrap_err();
        assert_eq!(s.code(), code, "{}: {s:?}", req.name);
    }
    let after = c.get_vector(get("e2e-crud")).await.unwrap().into_inner();
    assert_eq!(after.values, before.values);

    let listed = c.list_vectors(pb::ListVectorsRequest::default()).await.unwrap().into_inner();
    assert!(listed.vectors.iter().any(|v| v.name == "e2e-crud"));
    let none = c.list_vectors(pb::ListVectorsRequest { model: "other-model".into() }).await.unwrap().into_inner();
    assert!(none.vectors.is_empty());

    c.delete_vector(pb::DeleteVectorRequest { name: "e2e-crud".into() }).await.unwrap();
    assert_eq!(c.get_vector(get("e2e-crud")).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(
        c.delete_vector(pb::DeleteVectorRequest { name: "e2e-crud".into() }).await.unwrap_err().code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn projections_follow_the_vector() {
    let mut c = client().await;
    put_random(&mut c, "e2e-proj", 3).await;
    let values: Vec<f32> =
        persona_client::pseudo_random_vector(3, n_rows() * d_model()).iter().map(|v| -2.0 * v).collect();
    c.put_vector(pb::PutVectorRequest { name: "e2e-proj-neg".into(), values, overwrite: true, ..Default::default() })
        .await
        .unwrap();
    let Some(pb::prompt::Kind::Chat(conversation)) = chat("What is 2 + 2?", Some(SYSTEM)).kind else { unreachable!() };
    let targets = vec![
        pb::ProjectionTarget { vector: "e2e-proj".into(), layer: Some(10) },
        pb::ProjectionTarget { vector: "e2e-proj-neg".into(), layer: Some(10) },
        pb::ProjectionTarget { vector: "e2e-proj".into(), layer: Some(20) },
    ];
    let req = pb::ProjectActivationRequest {
        conversation: Some(conversation),
        response: "2 + 2 equals 4.".into(),
        targets,
        ..Default::default()
    };
    let r = c.project_activation(req.clone()).await.unwrap().into_inner();
    assert_eq!(r.projections.len(), 3);
    assert!(r.prompt_tokens > 5 && r.response_tokens > 3);
    let (p, n, deep) = (&r.projections[0], &r.projections[1], &r.projections[2]);
    assert!(p.has_response);
    // a·v/|v| is invariant to v's scale and flips with its sign.
    for (a, b) in [(p.prompt_last, n.prompt_last), (p.prompt_avg, n.prompt_avg), (p.response_avg, n.response_avg)] {
        assert!(a.is_finite() && a != 0.0);
        assert!((a + b).abs() < 1e-3 * a.abs().max(1.0), "{a} vs {b}");
    }
    assert_ne!(p.prompt_avg, deep.prompt_avg);
    // Deterministic: the same request projects the same.
    let again = c.project_activation(req.clone()).await.unwrap().into_inner();
    assert_eq!(again.projections[0].response_avg, p.response_avg);

    let bad_layer = pb::ProjectActivationRequest {
        targets: vec![pb::ProjectionTarget { vector: "e2e-proj".into(), layer: Some(99) }],
        ..req.clone()
    };
    assert_eq!(c.project_activation(bad_layer).await.unwrap_err().code(), Code::InvalidArgument);
    let unknown = pb::ProjectActivationRequest {
        targets: vec![pb::ProjectionTarget { vector: "missing".into(), layer: Some(3) }],
        ..req
    };
    assert_eq!(c.project_activation(unknown).await.unwrap_err().code(), Code::NotFound);
}

#[tokio::test]
async fn extraction_streams_progress_and_stores_three_vectors() {
    let mut c = client().await;
    let req = pb::ExtractVectorRequest {
        name: "e2e-pirate".into(),
        trait_name: "pirate".into(),
        pairs: vec![pb::InstructionPair {
            pos: "You are a pirate. Always talk like a pirate, with arr and matey.".into(),
            neg: "You are a helpful assistant. Answer plainly.".into(),
        }],
        questions: vec!["How do I boil an egg?".into(), "What is your favourite food?".into()],
        sampling: Some(pb::SamplingParams { max_tokens: 12, ..Default::default() }),
        overwrite: true,
        ..Default::default()
    };
    let mut stream = c.extract_vector(req.clone()).await.unwrap().into_inner();
    let (mut last_done, mut total, mut info, mut calibrated) = (0, 0, None, 0);
    while let Some(msg) = stream.message().await.unwrap() {
        match msg.event.unwrap() {
            pb::extract_vector_response::Event::Progress(p) if p.stage == "rollouts" => {
                assert!(p.done >= last_done, "progress went backwards");
                (last_done, total) = (p.done, p.total);
            }
            pb::extract_vector_response::Event::Progress(p) if p.stage == "calibrate" => {
                assert!(p.done <= p.total && p.total == 4, "every kept answer is re-read once: {p:?}");
                calibrated = p.done;
            }
            pb::extract_vector_response::Event::Progress(p) => assert_eq!(p.stage, "store"),
            pb::extract_vector_response::Event::Result(r) => {
                assert_eq!((r.rollouts, r.kept_pos, r.kept_neg), (4, 2, 2));
                assert_eq!(r.filtering, "no judge configured: answers were not filtered");
                info = r.vector;
            }
        }
    }
    assert_eq!((last_done, total, calibrated), (4, 4, 4));
    let info = info.expect("final message describes the vector");
    assert_eq!(info.calibration.len(), n_rows(), "the extraction calibrates every layer");
    assert_eq!((info.name.as_str(), info.trait_name.as_str()), ("e2e-pirate", "pirate"));
    assert_eq!(info.kind, pb::VectorKind::ResponseAvg as i32);
    assert_eq!(info.row_norms.len(), n_rows());
    assert!(info.row_norms[1..].iter().all(|n| *n > 0.0), "{:?}", info.row_norms);
    for (name, kind) in
        [("e2e-pirate.prompt_avg", pb::VectorKind::PromptAvg), ("e2e-pirate.prompt_last", pb::VectorKind::PromptLast)]
    {
        let v =
            c.get_vector(pb::GetVectorRequest { name: name.into(), include_values: false }).await.unwrap().into_inner();
        assert_eq!(v.info.unwrap().kind, kind as i32);
    }
    // Without overwrite, a second extraction under the same name is refused up front.
    let again = pb::ExtractVectorRequest { overwrite: false, ..req };
    assert_eq!(c.extract_vector(again).await.unwrap_err().code(), Code::AlreadyExists);
}

#[tokio::test]
async fn models_health_and_reflection() {
    let mut c = client().await;
    let models = c.list_models(pb::ListModelsRequest {}).await.unwrap().into_inner().models;
    assert_eq!(models.len(), 1);
    let m = &models[0];
    assert_eq!((m.n_layers, m.d_model, m.context_length), (30, 576, TEST_CONTEXT as u32));
    assert!(m.is_default && m.architecture == "llama");

    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", shared())).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest { service: "persona.v1.PersonaService".into() })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

    use tonic_reflection::pb::v1::{ServerReflectionRequest, server_reflection_client::ServerReflectionClient};
    use tonic_reflection::pb::v1::{
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection.server_reflection_info(tokio_stream::iter([req])).await.unwrap().into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = replies.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"persona.v1.PersonaService".to_string()), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health".to_string()), "{names:?}");
}

#[tokio::test]
async fn a_cancelled_stream_does_not_disturb_others() {
    let mut c = client().await;
    let expected = generate_text(&mut c, greedy("Name a colour.", 12)).await.unwrap();
    let mut long = c.generate(greedy("Tell me a very long story about dragons.", 400)).await.unwrap().into_inner();
    assert!(long.message().await.unwrap().is_some());
    drop(long);
    let after = generate_text(&mut c, greedy("Name a colour.", 12)).await.unwrap();
    assert_eq!(after.token_ids, expected.token_ids);
}

/// A second server on the same vector directory: vectors survive the restart, and SIGTERM-style
/// shutdown lets an in-flight stream finish before `serve` returns.
#[test]
fn restart_keeps_vectors_and_shutdown_drains_in_flight_streams() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut first = start(settings(dir.path()));
    let values = persona_client::pseudo_random_vector(11, n_rows() * d_model());
    let streamed = rt.block_on(async {
        let mut c = persona_client::connect(&first.addr.to_string()).await.unwrap();
        let put = pb::PutVectorRequest { name: "durable".into(), values: values.clone(), ..Default::default() };
        c.put_vector(put).await.unwrap();
        let mut stream = c.generate(greedy("Tell me about the moon.", 24)).await.unwrap().into_inner();
        let first_msg = stream.message().await.unwrap().unwrap();
        first.shutdown.take().unwrap().send(()).unwrap();
        let mut n = first_msg.token_ids.len();
        let mut summary = None;
        while let Some(m) = stream.message().await.unwrap() {
            n += m.token_ids.len();
            summary = summary.or(m.summary);
        }
        (n, summary)
    });
    let summary = streamed.1.expect("the in-flight stream finished with a summary");
    assert_eq!(summary.completion_tokens as usize, streamed.0);
    first.done.recv_timeout(Duration::from_secs(30)).expect("serve returned").expect("serve ended cleanly");

    let second = start(settings(dir.path()));
    rt.block_on(async {
        let mut c = persona_client::connect(&second.addr.to_string()).await.unwrap();
        let got = c
            .get_vector(pb::GetVectorRequest { name: "durable".into(), include_values: true })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.values, values);
    });
}
