//! The HTTP API on the real embedded model: the official `openai` Python package against
//! `/v1` (installed by scripts/openai-venv), compared token for token with gRPC `Generate`;
//! the persona API as JSON under `/api/v1`.

mod common;

use common::{settings, start, start_secured};
use persona_client::{chat, pb};
use serde_json::Value;

const QUESTION: &str = "What should I do if I find a lost wallet?";

fn key(name: &str, secret: &str, scopes: &[&str]) -> persona_server::auth::ApiKey {
    let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
    persona_server::auth::ApiKey::from_hex(name, &persona_server::auth::hash_hex(secret), &scopes).unwrap()
}

/// What gRPC `Generate` streams for a request: token strings (from the log-probabilities),
/// text, per-token scores of the first monitor, the summary.
struct Streamed {
    tokens: Vec<String>,
    text: String,
    scores: Vec<f32>,
    summary: pb::GenerateSummary,
}

async fn grpc_generate(c: &mut persona_client::Client, mut req: pb::GenerateRequest) -> Streamed {
    req.logprobs = true;
    let mut s = c.generate(req).await.unwrap().into_inner();
    let (mut tokens, mut text, mut scores, mut summary) = (Vec::new(), String::new(), Vec::new(), None);
    while let Some(m) = s.message().await.unwrap() {
        if let Some(l) = m.logprob {
            tokens.push(l.token);
        }
        text.push_str(&m.delta);
        scores.extend(m.scores.first().copied());
        summary = m.summary.or(summary);
    }
    Streamed { tokens, text, scores, summary: summary.expect("a summary") }
}

fn greedy_chat(max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(chat(QUESTION, Some("You are a helpful assistant."))),
        sampling: Some(pb::SamplingParams { max_tokens, ..Default::default() }),
        ..Default::default()
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap_or_else(|| panic!("not an array: {v}")).iter().map(|t| t.as_str().unwrap().to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_client_gets_what_grpc_generate_gives() {
    let python = std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/openai-venv"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("running scripts/openai-venv");
    assert!(python.status.success(), "scripts/openai-venv failed: the test needs the openai package from PyPI");
    let python = String::from_utf8(python.stdout).unwrap().trim().to_owned();

    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path());
    s.http_listen = "127.0.0.1:0".into();
    let running = start(s);
    let http = running.http_addr.expect("HTTP API bound");
    let mut c = persona_client::connect(&running.addr.to_string()).await.unwrap();
    common::extract(&mut c, common::small_evil_extraction()).await;
    let info = c.get_vector(pb::GetVectorRequest { name: "evil".into(), include_values: false }).await.unwrap();
    let layer = info.into_inner().info.unwrap().recommended_layer.expect("a monitoring layer");
    let coefficient = 4.0f32;

    // A second server with keys: one with the generate scope, one read-only.
    let keyed_dir = tempfile::tempdir().unwrap();
    let mut s = settings(keyed_dir.path());
    s.http_listen = "127.0.0.1:0".into();
    let keyed = start_secured(
        s,
        persona_server::security::Security::open()
            .with_keys(vec![key("gen", "gen-secret", &["generate"]), key("reader", "read-secret", &["read"])]),
    );
    let keyed_http = keyed.http_addr.unwrap();

    let out = std::process::Command::new(&python)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py"))
        .args([format!("http://{http}/v1"), "evil".into(), layer.to_string(), coefficient.to_string()])
        .args([format!("http://{keyed_http}/v1"), "gen-secret".into(), "read-secret".into()])
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "openai_client.py failed");
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();

    // Greedy chat, streamed and not, is gRPC Generate token for token.
    let want = grpc_generate(&mut c, greedy_chat(24)).await;
    assert_eq!(want.tokens.len(), 24);
    for case in ["chat", "chat_stream"] {
        assert_eq!(strings(&got[case]["tokens"]), want.tokens, "{case}");
        assert_eq!(got[case]["text"], want.text.as_str(), "{case}");
    }
    assert_eq!(got["chat"]["object"], "chat.completion");
    assert_eq!(got["chat"]["finish_reason"], "length");
    assert!(got["chat"]["top"].as_array().unwrap().iter().all(|n| n == 3), "three alternatives per token");
    let usage = &got["chat"]["usage"];
    assert_eq!(usage["prompt_tokens"], want.summary.prompt_tokens);
    assert_eq!(usage["completion_tokens"], 24);
    assert_eq!(usage["total_tokens"], want.summary.prompt_tokens + 24);
    assert_eq!(got["chat_stream"]["usage"], *usage, "stream_options.include_usage: the same usage");
    assert_eq!(got["chat_stream"]["roles"], serde_json::json!(["assistant"]));
    assert_eq!(got["chat_stream"]["finish_reason"], serde_json::json!(["length"]));
    assert_eq!(got["chat_stream"]["objects"], serde_json::json!(["chat.completion.chunk"]));

    // Steered and monitored: the same tokens and per-token scores as gRPC, and not the
    // unsteered answer.
    let mut steered = greedy_chat(24);
    steered.steering = vec![pb::SteeringVector {
        source: Some(pb::steering_vector::Source::Name("evil".into())),
        layer: Some(layer),
        coefficient: Some(coefficient),
        positions: pb::Positions::Response as i32,
    }];
    steered.monitors = vec![pb::ProjectionTarget { vector: "evil".into(), layer: None }];
    let want_steered = grpc_generate(&mut c, steered).await;
    assert_ne!(want_steered.tokens, want.tokens, "steering changed the answer");
    let stream = &got["steered_stream"];
    assert_eq!(strings(&stream["tokens"]), want_steered.tokens);
    let scores: Vec<f32> = stream["scores"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
    assert_eq!(scores, want_steered.scores, "per-token monitor scores in each chunk's persona field");
    let m = &want_steered.summary.monitors[0];
    assert_eq!(stream["prompt_last"].as_f64().unwrap() as f32, m.prompt_last, "the early warning in the first chunk");
    let summary = &stream["summary"];
    assert_eq!(summary["monitors"][0]["vector"], "evil");
    assert_eq!(summary["monitors"][0]["layer"], m.layer);
    assert_eq!(summary["monitors"][0]["alert"], true, "alert_threshold -1e9 alerts at once");
    assert_eq!(summary["monitors"][0]["first_alert_token"], 0);
    assert_eq!(summary["monitors"][0]["mean"].as_f64().unwrap() as f32, m.mean);
    assert_eq!(summary["steering"][0]["layer"], layer);
    assert_eq!(summary["steering"][0]["coefficient"].as_f64().unwrap() as f32, coefficient);
    let whole = &got["steered"];
    assert_eq!(strings(&whole["tokens"]), want_steered.tokens);
    let per_token: Vec<f32> = whole["persona"]["monitors"][0]["scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(per_token, want_steered.scores, "the non-streamed reply carries every token's score");
    assert!(whole["persona"]["monitors"][0]["scores_calibrated"].as_array().unwrap().len() == 24);

    // Legacy completions on a raw prompt.
    let raw = pb::GenerateRequest {
        prompt: Some(pb::Prompt { kind: Some(pb::prompt::Kind::Raw("The capital of France is".into())) }),
        sampling: Some(pb::SamplingParams { max_tokens: 8, ..Default::default() }),
        ..Default::default()
    };
    let want_raw = grpc_generate(&mut c, raw).await;
    assert_eq!(strings(&got["completion"]["tokens"]), want_raw.tokens);
    assert_eq!(got["completion"]["text"], want_raw.text.as_str());
    assert_eq!(got["completion_stream"]["text"], want_raw.text.as_str());
    assert_eq!(got["completion"]["object"], "text_completion");
    assert_eq!(got["models"], serde_json::json!(["smollm2-135m-instruct"]));

    // Errors: typed by the openai package from the status, in OpenAI's body shape.
    let e = &got["errors"];
    assert_eq!(
        (e["unknown_model"]["status"].as_u64(), e["unknown_model"]["class"].as_str()),
        (Some(404), Some("NotFoundError"))
    );
    assert_eq!(e["unknown_model"]["body"]["code"], "model_not_found");
    assert_eq!(e["stream_unknown_model"]["status"], 404, "a streamed request fails before its stream starts");
    assert_eq!((e["n"]["status"].as_u64(), e["n"]["body"]["param"].as_str()), (Some(400), Some("n")));
    assert_eq!(e["unknown_vector"]["status"], 404);
    assert!(e["unknown_vector"]["body"]["message"].as_str().unwrap().contains("nope"));

    // Keys and scopes as on the gRPC side.
    let a = &got["auth"];
    assert_eq!((a["wrong"]["status"].as_u64(), a["wrong"]["class"].as_str()), (Some(401), Some("AuthenticationError")));
    assert_eq!(a["read_only"]["status"], 403);
    assert!(a["read_only"]["body"]["message"].as_str().unwrap().contains("`generate` scope"));
    assert_eq!(a["ok"], Value::Null, "the generate key generates");
    assert_eq!(a["read_only_models"], serde_json::json!(["smollm2-135m-instruct"]));
}

/// A POST with a JSON body over a plain TCP connection (HTTP/1.1, Connection: close).
async fn post(addr: std::net::SocketAddr, path: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let status = raw.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// A GET over a plain TCP connection: the status and the body.
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let status = raw.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, raw.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
}

/// The SSE `data:` payloads of a (possibly chunked) body.
fn sse_data(body: &str) -> Vec<Value> {
    body.lines().filter_map(|l| l.strip_prefix("data: ")).filter_map(|d| serde_json::from_str(d).ok()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_persona_api_answers_json_and_streams_server_sent_events() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path());
    s.http_listen = "127.0.0.1:0".into();
    s.http_cors_origins = vec!["https://app.example".into()];
    let running = start(s);
    let http = running.http_addr.unwrap();

    // CORS: a listed origin's preflight is answered; another origin gets no grant.
    for (origin, allowed) in [("https://app.example", true), ("https://evil.example", false)] {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(http).await.unwrap();
        let req = format!(
            "OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nOrigin: {origin}\r\n\
             Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: authorization, content-type\r\n\
             Connection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).await.unwrap();
        let raw = raw.to_lowercase();
        let granted = raw.contains(&format!("access-control-allow-origin: {origin}"));
        assert_eq!(granted, allowed, "{origin}: {raw}");
        if allowed {
            assert!(raw.contains("access-control-allow-headers: authorization,content-type"), "{raw}");
        }
    }

    let (status, body) = get(http, "/health").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, body) = post(http, "/api/v1/ListModels", "").await;
    assert_eq!(status, 200, "{body}");
    let models: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(models["models"][0]["nLayers"], 30, "proto3 JSON: camelCase names");

    // An inline vector put over JSON, read back over gRPC: the same values.
    let values: Vec<f32> = (0..31 * 576).map(|i| ((i % 7) as f32 - 3.0) / 8.0).collect();
    let put = serde_json::json!({
        "name": "wave", "model": "smollm2-135m-instruct", "traitName": "wave", "values": values,
    });
    let (status, body) = post(http, "/api/v1/PutVector", &put.to_string()).await;
    assert_eq!(status, 200, "{body}");
    let mut c = persona_client::connect(&running.addr.to_string()).await.unwrap();
    let got =
        c.get_vector(pb::GetVectorRequest { name: "wave".into(), include_values: true }).await.unwrap().into_inner();
    assert_eq!(got.values, values);

    // Export as base64 bytes, import them back under another name: the same values.
    let (status, body) = post(http, "/api/v1/ExportVector", r#"{"name": "wave"}"#).await;
    assert_eq!(status, 200, "{body}");
    let exported: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(exported["extension"], "safetensors");
    let import = serde_json::json!({"name": "wave2", "data": exported["data"]});
    let (status, body) = post(http, "/api/v1/ImportVector", &import.to_string()).await;
    assert_eq!(status, 200, "{body}");
    let got = c.get_vector(pb::GetVectorRequest { name: "wave2".into(), include_values: true }).await.unwrap();
    assert_eq!(got.into_inner().values, values);
    let (status, _) = post(http, "/api/v1/ImportVector", &import.to_string()).await;
    assert_eq!(status, 409, "ALREADY_EXISTS without overwrite");
    let (status, _) = post(http, "/api/v1/DeleteVector", r#"{"name": "wave2"}"#).await;
    assert_eq!(status, 200);

    // Generate streams one event per message, the summary last.
    let req = serde_json::json!({
        "prompt": {"raw": "The capital of France is"},
        "sampling": {"maxTokens": 5},
        "monitors": [{"vector": "wave", "layer": 10}],
    });
    let (status, body) = post(http, "/api/v1/Generate", &req.to_string()).await;
    assert_eq!(status, 200, "{body}");
    let events = sse_data(&body);
    assert_eq!(events.len(), 6, "five tokens and the summary: {body}");
    assert!(events[..5].iter().all(|e| e["scores"].as_array().is_some_and(|s| s.len() == 1)));
    assert_eq!(events[5]["summary"]["completionTokens"], 5);
    assert_eq!(events[5]["summary"]["finishReason"], "FINISH_REASON_LENGTH", "enums by name");

    // Errors in OpenAI's shape with the matching status.
    for (path, body, status) in [
        ("/api/v1/GetVector", r#"{"name": "missing"}"#, 404),
        ("/api/v1/GetVector", r#"{"name": "../etc"}"#, 400),
        ("/api/v1/GetVector", r#"{"nme": 3"#, 400),
        ("/api/v1/NoSuchMethod", "{}", 404),
        ("/api/v1/MonitorStream", "{}", 501),
        ("/v1/chat/completions", r#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}"#, 400),
        ("/v1/chat/completions", r#"{"messages": [{"role": "tool", "content": "hi"}]}"#, 400),
    ] {
        let (got, text) = post(http, path, body).await;
        assert_eq!(got, status, "{path} {body}: {text}");
        let e: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{path}: not JSON: {text}"));
        assert!(e["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{text}");
        assert!(e["error"]["type"].is_string(), "{text}");
    }

    // A MonitorStream item reaches the live feed too.
    let item = pb::MonitorRequest {
        id: "conv-1".into(),
        item: Some(pb::ProjectActivationRequest {
            conversation: Some(pb::Conversation { messages: vec![persona_client::message("user", "Hello")] }),
            response: "Hi there.".into(),
            targets: vec![pb::ProjectionTarget { vector: "wave".into(), layer: Some(10) }],
            ..Default::default()
        }),
    };
    let mut replies = c.monitor_stream(tokio_stream::iter(vec![item])).await.unwrap().into_inner();
    assert!(replies.message().await.unwrap().unwrap().result.is_some());

    // The live feed saw the monitored generation (start, five tokens, done), then the item.
    let (mut s, live) = (tokio::net::TcpStream::connect(http).await.unwrap(), Vec::new());
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(b"GET /api/live HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let mut live = live;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !String::from_utf8_lossy(&live).contains("\"kind\":\"projection\"") {
            assert!(std::time::Instant::now() < deadline, "no done event: {}", String::from_utf8_lossy(&live));
            let n = tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut buf)).await.unwrap().unwrap();
            live.extend_from_slice(&buf[..n]);
        }
        let events = sse_data(&String::from_utf8_lossy(&live));
        let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["start", "token", "token", "token", "token", "token", "done", "projection"]);
        assert_eq!(events[0]["monitors"][0]["vector"], "wave");
        assert_eq!(events[6]["tokens"], 5);
        assert_eq!(events[7]["projections"][0]["layer"], 10);
        assert!(events[7]["projections"][0]["response_avg"].is_number());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_in_openai_shape_and_the_rest_complete() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path());
    s.http_listen = "127.0.0.1:0".into();
    s.engine.max_batch = 1;
    s.engine.max_queue = 1;
    let running = start(s);
    let http = running.http_addr.unwrap();
    let body = r#"{"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 48, "temperature": 0}"#;
    let replies = futures_join(6, || post(http, "/v1/chat/completions", body)).await;
    let statuses: Vec<u16> = replies.iter().map(|r| r.0).collect();
    assert!(statuses.iter().all(|&s| s == 200 || s == 429), "{statuses:?}");
    assert!(statuses.contains(&429), "one running and one queued: the rest are refused: {statuses:?}");
    assert!(statuses.contains(&200), "{statuses:?}");
    for (status, text) in &replies {
        let v: Value = serde_json::from_str(text).unwrap();
        if *status == 429 {
            assert_eq!(v["error"]["type"], "rate_limit_error", "{text}");
            assert_eq!(v["error"]["code"], "rate_limit_exceeded", "{text}");
        } else {
            assert_eq!(v["usage"]["completion_tokens"], 48, "{text}");
        }
    }
}

/// Runs `n` copies of a request concurrently.
async fn futures_join<F, Fut>(n: usize, f: F) -> Vec<(u16, String)>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = (u16, String)> + Send + 'static,
{
    let tasks: Vec<_> = (0..n).map(|_| tokio::spawn(f())).collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}
