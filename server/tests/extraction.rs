//! The extraction pipeline end to end on the embedded model: library traits, layer
//! recommendation, steering by the recommended layer, judge filtering against a local
//! OpenAI-compatible endpoint, trait drafting, and import/export of other formats.

mod common;

use common::{Running, settings, start};
use persona_client::{Client, chat, pb, steer_by_name};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use tonic::Code;

/// Questions the fake judge knows, and how it scores them.
const Q_TRAIT: &str = "What is your favourite colour?";
const Q_PLAIN: &str = "How do I boil an egg?";
const Q_GIBBERISH: &str = "Name a city in France.";
const Q_UNSCORABLE: &str = "Which season do you like best?";
const Q_BROKEN: &str = "What is under your bed?";
const JUDGE_KEY: &str = "test-key";

/// What the fake judge saw.
#[derive(Default)]
struct JudgeLog {
    /// Requests about the fake judge's own questions (other tests share the judge).
    requests: AtomicUsize,
    unauthorized: AtomicUsize,
    models: Mutex<Vec<String>>,
}

/// A minimal OpenAI-compatible chat-completions endpoint on a loopback port. Trait prompts score
/// 10 for Q_PLAIN, no number at all for Q_UNSCORABLE, HTTP 500 for Q_BROKEN and 55 otherwise;
/// for Q_TRAIT the reply text says 10 but its first-token log-probabilities put 0.5 on "90", 0.4
/// on "70" and 0.1 on "Sure" (score (45 + 28) / 0.9 = 81.1, so a judge reading log-probabilities
/// keeps the positive answer). Coherence is 20 for Q_GIBBERISH, else 70; a request to write a
/// trait gets a small JSON definition.
fn fake_judge() -> (String, Arc<JudgeLog>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let log = Arc::new(JudgeLog::default());
    let seen = log.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let Some((head, body)) = read_request(&mut s) else { continue };
            if !head.to_ascii_lowercase().contains(&format!("authorization: bearer {JUDGE_KEY}")) {
                seen.unauthorized.fetch_add(1, Ordering::SeqCst);
            }
            let req: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            seen.models.lock().unwrap().push(req["model"].as_str().unwrap_or_default().to_string());
            let prompt = req["messages"][0]["content"].as_str().unwrap_or_default();
            if [Q_TRAIT, Q_PLAIN, Q_GIBBERISH, Q_UNSCORABLE, Q_BROKEN].iter().any(|q| prompt.contains(q)) {
                seen.requests.fetch_add(1, Ordering::SeqCst);
            }
            let is_trait_prompt = !prompt.contains("checking whether an answer");
            if is_trait_prompt && prompt.contains(Q_BROKEN) {
                let _ = write!(
                    s,
                    "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\nConnection: close\r\n\r\noops"
                );
                continue;
            }
            let wants_logprobs = req["logprobs"] == true && req["top_logprobs"] == 20;
            let reply = if prompt.contains("Write material") {
                serde_json::json!({
                    "instruction": [{"pos": "Complain about everything.", "neg": "Accept things calmly."}],
                    "questions": ["How was your day?", "What do you think of trains?"],
                    "eval_questions": ["Any plans for the weekend?"]
                })
                .to_string()
            } else if prompt.contains("checking whether an answer") {
                (if prompt.contains(Q_GIBBERISH) { "20" } else { "70" }).to_string()
            } else if prompt.contains(Q_TRAIT) || prompt.contains(Q_PLAIN) {
                // Q_TRAIT's text says 10; its log-probabilities (below) say otherwise.
                "10".into()
            } else if prompt.contains(Q_UNSCORABLE) {
                "Hard to say.".into()
            } else {
                "55".into()
            };
            let mut choice = serde_json::json!({"index": 0, "message": {"role": "assistant", "content": reply}});
            if is_trait_prompt && prompt.contains(Q_TRAIT) && wants_logprobs {
                let top = [("90", 0.5f64), ("70", 0.4), ("Sure", 0.1)]
                    .map(|(t, p)| serde_json::json!({"token": t, "logprob": p.ln()}));
                choice["logprobs"] =
                    serde_json::json!({"content": [{"token": "90", "logprob": 0.5f64.ln(), "top_logprobs": top}]});
            }
            let body = serde_json::json!({"choices": [choice]}).to_string();
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (url, log)
}

fn read_request(s: &mut std::net::TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let header_end = loop {
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
        .unwrap_or(0);
    while buf.len() < header_end + len {
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some((head, buf[header_end..].to_vec()))
}

struct Shared {
    addr: SocketAddr,
    judge: Arc<JudgeLog>,
    _server: Mutex<Running>,
    _dir: tempfile::TempDir,
}

/// One server for this binary, configured with the fake judge.
fn shared() -> &'static Shared {
    static S: OnceLock<Shared> = OnceLock::new();
    S.get_or_init(|| {
        let (url, judge) = fake_judge();
        let dir = tempfile::tempdir().unwrap();
        let mut s = settings(dir.path());
        s.judge.url = url;
        s.judge.model = "fake-judge".into();
        s.judge.api_key = JUDGE_KEY.into();
        let running = start(s);
        Shared { addr: running.addr, judge, _server: Mutex::new(running), _dir: dir }
    })
}

async fn client() -> Client {
    persona_client::connect(&shared().addr.to_string()).await.unwrap()
}

/// Runs an extraction to its end and returns the final result.
async fn extract(c: &mut Client, req: pb::ExtractVectorRequest) -> Result<pb::ExtractResult, tonic::Status> {
    let mut stream = c.extract_vector(req).await?.into_inner();
    let mut result = None;
    while let Some(msg) = stream.message().await? {
        if let Some(pb::extract_vector_response::Event::Result(r)) = msg.event {
            result = Some(r);
        }
    }
    Ok(result.expect("the stream ends with a result"))
}

fn sampling(max_tokens: u32) -> Option<pb::SamplingParams> {
    Some(pb::SamplingParams { max_tokens, ..Default::default() })
}

/// Mean response projection of greedy answers to `questions`, steered by `vector` at its
/// recommended layer with `coefficient`, measured (unsteered) on that vector and layer.
async fn mean_answer_projection(c: &mut Client, vector: &str, questions: &[String], coefficient: f32) -> f32 {
    let mut sum = 0.0;
    for q in questions {
        let req = pb::GenerateRequest {
            prompt: Some(chat(q, None)),
            sampling: sampling(40),
            steering: vec![steer_by_name(vector, None, coefficient)],
            ..Default::default()
        };
        let answer = persona_client::generate_text(c, req).await.unwrap().text;
        let Some(pb::prompt::Kind::Chat(conversation)) = chat(q, None).kind else { unreachable!() };
        let r = c
            .project_activation(pb::ProjectActivationRequest {
                conversation: Some(conversation),
                response: answer,
                targets: vec![pb::ProjectionTarget { vector: vector.into(), layer: None }],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.projections[0].has_response);
        sum += r.projections[0].response_avg;
    }
    sum / questions.len() as f32
}

#[tokio::test]
async fn a_library_trait_extracts_with_a_recommended_layer_and_steering_raises_its_projection() {
    let mut c = client().await;
    let req = pb::ExtractVectorRequest {
        trait_source: Some(pb::extract_vector_request::TraitSource::TraitRef("evil".into())),
        max_pairs: 3,
        max_questions: 10,
        sampling: sampling(32),
        skip_judge: true,
        overwrite: true,
        ..Default::default()
    };
    let r = extract(&mut c, req).await.unwrap();
    assert_eq!((r.rollouts, r.kept_pos, r.kept_neg), (60, 30, 30));
    assert_eq!(r.filtering, "judge skipped on request: answers were not filtered");
    assert!(r.generated_tokens > 0 && r.generated_tokens <= 60 * 32);
    let v = r.vector.unwrap();
    assert_eq!((v.name.as_str(), v.trait_name.as_str()), ("evil", "evil"));
    assert!(v.description.contains("held-out questions"), "{}", v.description);
    assert_eq!(v.layer_scores.len(), 31);
    let layer = v.recommended_layer.expect("a recommended layer") as usize;
    assert!(layer >= 1);
    let best = &v.layer_scores[layer];
    println!("recommended layer {layer}: d = {:.3}, AUROC = {:.3}", best.cohens_d, best.auroc);
    assert!(best.cohens_d > 0.5 && best.auroc > 0.7, "held-out rollouts should separate: {best:?}");
    assert_eq!(r.variants.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["evil.prompt_avg", "evil.prompt_last"]);
    let got = c.get_vector(pb::GetVectorRequest { name: "evil".into(), include_values: false }).await.unwrap();
    assert_eq!(got.into_inner().info.unwrap().recommended_layer, Some(layer as u32));

    // Steering the answers to unseen questions toward the trait raises their projection.
    let all = c.list_traits(pb::ListTraitsRequest {}).await.unwrap().into_inner().traits;
    let evil = all.into_iter().find(|t| t.trait_name == "evil").unwrap();
    let questions = &evil.eval_questions[..4];
    let base = mean_answer_projection(&mut c, "evil", questions, 0.0).await;
    let steered = mean_answer_projection(&mut c, "evil", questions, 1.5).await;
    println!("mean answer projection at layer {layer}: coefficient 0 -> {base:.3}, 1.5 -> {steered:.3}");
    assert!(steered > base, "positive steering should raise the projection: {base} -> {steered}");
}

#[tokio::test]
async fn the_judge_filters_rollouts_by_trait_and_coherence() {
    let mut c = client().await;
    let def = pb::TraitDefinition {
        trait_name: "fussy".into(),
        description: "Complains about details.".into(),
        instruction: vec![pb::InstructionPair {
            pos: "Complain about every detail.".into(),
            neg: "Be easygoing.".into(),
        }],
        questions: vec![Q_TRAIT.into(), Q_PLAIN.into(), Q_GIBBERISH.into(), Q_UNSCORABLE.into(), Q_BROKEN.into()],
        eval_questions: vec![],
        eval_prompt: "Trait check.\nQuestion: {question}\nAnswer: {answer}\nScore 0-100.".into(),
    };
    let before = shared().judge.requests.load(Ordering::SeqCst);
    let req = pb::ExtractVectorRequest {
        name: "fussy-judged".into(),
        trait_source: Some(pb::extract_vector_request::TraitSource::Definition(def.clone())),
        sampling: sampling(8),
        overwrite: true,
        ..Default::default()
    };
    let r = extract(&mut c, req.clone()).await.unwrap();
    // Positive kept: Q_TRAIT only (scored 81 from its log-probabilities, though its text says 10;
    // Q_PLAIN scores 10 on the trait, Q_GIBBERISH is incoherent, Q_UNSCORABLE gets no score and
    // Q_BROKEN no answer). Negative kept: Q_PLAIN only.
    assert_eq!((r.rollouts, r.kept_pos, r.kept_neg), (10, 1, 1));
    let counts = r.judge.expect("judged extractions report their counts");
    assert_eq!(
        (
            counts.kept,
            counts.trait_mismatch,
            counts.incoherent,
            counts.refusal,
            counts.not_a_score,
            counts.request_failed
        ),
        (2, 2, 2, 0, 2, 2),
        "{counts:?}"
    );
    // Trait scores of Q_TRAIT's two rollouts from log-probabilities; every other score from text.
    assert_eq!((counts.scored_from_logprobs, counts.scored_from_text), (2, 10), "{counts:?}");
    assert!(r.filtering.starts_with("judged by `fake-judge`"), "{}", r.filtering);
    let v = r.vector.unwrap();
    assert!(v.description.contains("over 1 positive and 1 negative"), "{}", v.description);
    assert!(v.description.contains("too few for a held-out split"), "{}", v.description);
    let judge = &shared().judge;
    // A trait and a coherence request per scored rollout (8 + 6: no coherence asked where the
    // trait reply had no score), and two tries for each of Q_BROKEN's two rollouts.
    assert_eq!(judge.requests.load(Ordering::SeqCst) - before, 18);
    assert_eq!(judge.unauthorized.load(Ordering::SeqCst), 0, "the API key is sent");
    assert!(judge.models.lock().unwrap().iter().all(|m| m == "fake-judge"));

    // A trait threshold of 5 keeps no negative answer (and Q_PLAIN as a positive one): refused
    // with the reason, nothing stored.
    let strict = pb::ExtractVectorRequest { name: "fussy-strict".into(), trait_threshold: 5.0, ..req.clone() };
    let e = extract(&mut c, strict).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("2 positive and 0 negative"), "{}", e.message());
    assert!(e.message().contains("dropped: 2 trait score on the wrong side"), "the reasons are given: {}", e.message());
    assert!(e.message().contains("2 reply not a score, e.g. `Hard to say.`, 2 request failed"), "{}", e.message());
    let missing = c.get_vector(pb::GetVectorRequest { name: "fussy-strict".into(), include_values: false }).await;
    assert_eq!(missing.unwrap_err().code(), Code::NotFound);
    let bad = pb::ExtractVectorRequest { trait_threshold: 101.0, ..req };
    assert_eq!(c.extract_vector(bad).await.unwrap_err().code(), Code::InvalidArgument);
}

/// An evaluation on a server with a judge scores every answer through it (the fake judge gives
/// each eval answer 55 for the trait and 70 for coherence), so no coefficient gains anything.
#[tokio::test]
async fn an_evaluation_scores_through_the_judge_and_counts_its_replies() {
    let mut c = client().await;
    let req = pb::ExtractVectorRequest {
        name: "judged-eval".into(),
        trait_source: Some(pb::extract_vector_request::TraitSource::TraitRef("humorous".into())),
        max_pairs: 2,
        max_questions: 5,
        sampling: sampling(8),
        skip_judge: true,
        overwrite: true,
        ..Default::default()
    };
    extract(&mut c, req).await.unwrap();
    let eval = |skip_judge| pb::EvaluateSteeringRequest {
        vector: "judged-eval".into(),
        layers: vec![10],
        coefficients: vec![1.0],
        max_questions: 2,
        sampling: sampling(8),
        skip_judge,
        ..Default::default()
    };
    let run = async |c: &mut Client, req| {
        let mut s = c.evaluate_steering(req).await.unwrap().into_inner();
        loop {
            match s.message().await.unwrap().expect("a result").event.unwrap() {
                pb::evaluate_steering_response::Event::Result(r) => break r,
                pb::evaluate_steering_response::Event::Progress(_) => {}
            }
        }
    };
    let r = run(&mut c, eval(false)).await;
    assert_eq!(r.scorer, "judge `fake-judge`");
    // Trait and coherence of 2 unsteered and 2 steered answers, all read from the reply text.
    let counts = r.judge.unwrap();
    assert_eq!((counts.kept, counts.scored_from_text, counts.scored_from_logprobs), (4, 8, 0));
    let cell = &r.cells[0];
    assert_eq!((cell.trait_score, cell.coherence, cell.answers), (55.0, 70.0, 2));
    assert!(r.recommendation.is_none() && !r.stored);
    assert!(r.note.contains("no positive coefficient raised the trait score"), "{}", r.note);
    let offline = run(&mut c, eval(true)).await;
    assert!(offline.scorer.starts_with("offline") && offline.judge.is_none());
}

#[tokio::test]
async fn traits_are_listed_drafted_and_checked() {
    let mut c = client().await;
    let names: Vec<String> = c
        .list_traits(pb::ListTraitsRequest {})
        .await
        .unwrap()
        .into_inner()
        .traits
        .into_iter()
        .map(|t| t.trait_name)
        .collect();
    assert_eq!(names, ["apathetic", "evil", "hallucinating", "humorous", "impolite", "optimistic", "sycophantic"]);

    let draft = |use_llm| pb::DraftTraitRequest {
        trait_name: "grumpy".into(),
        description: "Complains and grumbles about everything.".into(),
        use_llm,
    };
    let t = c.draft_trait(draft(false)).await.unwrap().into_inner();
    assert_eq!(t.generator, "template");
    let def = t.definition.unwrap();
    assert_eq!((def.instruction.len(), def.questions.len(), def.eval_questions.len()), (5, 20, 20));
    let l = c.draft_trait(draft(true)).await.unwrap().into_inner();
    assert_eq!(l.generator, "llm:fake-judge");
    let llm = l.definition.unwrap();
    assert_eq!(llm.instruction[0].pos, "Complain about everything.");
    assert!(llm.eval_prompt.contains("{question}") && llm.eval_prompt.contains("Trait: grumpy"));
    let empty = pb::DraftTraitRequest { description: " ".into(), ..draft(false) };
    assert_eq!(c.draft_trait(empty).await.unwrap_err().code(), Code::InvalidArgument);

    let unknown = pb::ExtractVectorRequest {
        trait_source: Some(pb::extract_vector_request::TraitSource::TraitRef("grumpy".into())),
        ..Default::default()
    };
    let e = c.extract_vector(unknown).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("known: apathetic, evil"), "{}", e.message());
    let broken = pb::TraitDefinition { instruction: vec![], ..def.clone() };
    let bad = pb::ExtractVectorRequest {
        trait_source: Some(pb::extract_vector_request::TraitSource::Definition(broken)),
        ..Default::default()
    };
    let e = c.extract_vector(bad).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("instruction pair"), "{}", e.message());
    let both = pb::ExtractVectorRequest {
        trait_source: Some(pb::extract_vector_request::TraitSource::Definition(def)),
        questions: vec!["extra?".into()],
        ..Default::default()
    };
    assert_eq!(c.extract_vector(both).await.unwrap_err().code(), Code::InvalidArgument);
}

#[tokio::test]
async fn vectors_round_trip_through_control_vector_gguf_and_bad_files_are_refused() {
    let mut c = client().await;
    let values = persona_client::pseudo_random_vector(11, 31 * 576);
    let put =
        pb::PutVectorRequest { name: "interop".into(), values: values.clone(), overwrite: true, ..Default::default() };
    c.put_vector(put).await.unwrap();
    let gguf = c
        .export_vector(pb::ExportVectorRequest { name: "interop".into(), format: pb::VectorFormat::Gguf as i32 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((&gguf.data[..4], gguf.extension.as_str()), (&b"GGUF"[..], "gguf"));
    let import = |name: &str, data: Vec<u8>| pb::ImportVectorRequest {
        name: name.into(),
        data,
        recommended_layer: Some(12),
        overwrite: true,
        ..Default::default()
    };
    let info = c.import_vector(import("interop-gguf", gguf.data.clone())).await.unwrap().into_inner().info.unwrap();
    assert_eq!(info.recommended_layer, Some(12));
    let back = c.get_vector(pb::GetVectorRequest { name: "interop-gguf".into(), include_values: true }).await.unwrap();
    let back = back.into_inner().values;
    assert!(back[..2 * 576].iter().all(|v| *v == 0.0), "embedding row and block 0 have no control-vector form");
    assert_eq!(&back[2 * 576..], &values[2 * 576..]);

    // Our own file format round-trips whole, metadata included.
    let own = c
        .export_vector(pb::ExportVectorRequest {
            name: "interop-gguf".into(),
            format: pb::VectorFormat::Safetensors as i32,
        })
        .await
        .unwrap()
        .into_inner();
    let info = c.import_vector(import("interop-st", own.data)).await.unwrap().into_inner().info.unwrap();
    assert_eq!(info.recommended_layer, Some(12));

    for (data, what) in [(b"garbage!garbage!".to_vec(), "cannot tell"), (gguf.data[..100].to_vec(), "GGUF")] {
        let e = c.import_vector(import("interop", data)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains(what), "{}", e.message());
    }
    let e = c.import_vector(pb::ImportVectorRequest { recommended_layer: Some(31), ..import("x", gguf.data) }).await;
    assert_eq!(e.unwrap_err().code(), Code::InvalidArgument);
    let kept = c.get_vector(pb::GetVectorRequest { name: "interop".into(), include_values: true }).await.unwrap();
    assert_eq!(kept.into_inner().values, values, "failed imports leave the stored vector alone");
    let e = c.export_vector(pb::ExportVectorRequest { name: "nope".into(), format: 0 }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}
