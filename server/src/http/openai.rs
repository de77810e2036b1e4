//! The OpenAI API: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`.
//!
//! A request becomes the `GenerateRequest` the gRPC API takes and runs through the same handler,
//! so a greedy completion here is token for token the gRPC `Generate` of the same request.
//! Differences from OpenAI's own defaults follow the API, not gRPC: `temperature` defaults to 1
//! and `/v1/completions` to 16 tokens. Steering and monitoring come as extra body fields:
//!
//! ```json
//! "steering": [{"vector": "evil", "layer": 20, "coefficient": 1.5, "positions": "response"}],
//! "monitors": ["evil", {"vector": "sycophantic", "layer": 16}],
//! "alert_threshold_calibrated": 60
//! ```
//!
//! Every streamed chunk then carries a `persona` field with each monitor's score for its token
//! (the first also the last prompt token's, the early warning), and the last chunk (or the whole
//! reply when not streaming) a summary per monitor and the steering as applied.

use super::{ApiError, Http, parse_json, unix_now};
use crate::service::ResponseStream;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use pb::persona_service_server::PersonaService;
use persona_proto::v1 as pb;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_stream::StreamExt;

pub fn routes() -> axum::Router<Http> {
    axum::Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
}

/// Fields the chat and completion requests share.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Common {
    model: String,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    /// An extension, as vLLM takes it.
    top_k: Option<u32>,
    seed: Option<i64>,
    stop: Option<Stop>,
    n: Option<u32>,
    stream: bool,
    stream_options: Option<StreamOptions>,
    steering: Vec<Steer>,
    monitors: Vec<Monitor>,
    alert_threshold: Option<f32>,
    alert_threshold_calibrated: Option<f32>,
    // Accepted when they ask for nothing, refused otherwise (rather than silently ignored).
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    logit_bias: Option<serde_json::Map<String, Value>>,
    tools: Option<Vec<Value>>,
    response_format: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Steer {
    /// A stored vector's name…
    vector: Option<String>,
    /// …or one layer's values (d_model floats).
    values: Option<Vec<f32>>,
    layer: Option<u32>,
    coefficient: Option<f32>,
    /// "all" (default), "prompt" or "response".
    positions: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Monitor {
    Name(String),
    At { vector: String, layer: Option<u32> },
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    #[serde(flatten)]
    common: Common,
    messages: Vec<Message>,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Content,
}

/// A message's content: a string, or text parts.
#[derive(Debug, Default, Deserialize)]
#[serde(untagged)]
enum Content {
    #[default]
    None,
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: String,
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    #[serde(flatten)]
    common: Common,
    prompt: PromptInput,
    /// The legacy API's number of alternatives per position (0-5 there; 0-20 here).
    logprobs: Option<u32>,
    #[serde(default)]
    echo: bool,
    suffix: Option<String>,
    best_of: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PromptInput {
    One(String),
    Many(Vec<String>),
}

/// The two endpoints differ in their request and in the shape of their replies.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

impl Kind {
    fn id_prefix(self) -> &'static str {
        match self {
            Kind::Chat => "chatcmpl-",
            Kind::Completion => "cmpl-",
        }
    }

    fn object(self, streaming: bool) -> &'static str {
        match (self, streaming) {
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Completion, _) => "text_completion",
        }
    }
}

async fn chat(State(http): State<Http>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    http.authorize("Generate", &headers)?;
    let req: ChatRequest = parse_json(&body)?;
    let messages = req
        .messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(ApiError::invalid(
                        "messages",
                        format!("messages[{i}]: role `{other}` is not supported (system, developer, user, assistant)"),
                    ));
                }
            };
            let content = match m.content {
                Content::None => String::new(),
                Content::Text(t) => t,
                Content::Parts(parts) => {
                    let mut text = String::new();
                    for p in parts {
                        if p.kind != "text" {
                            return Err(ApiError::invalid(
                                "messages",
                                format!(
                                    "messages[{i}]: content parts of type `{}` are not supported (text only)",
                                    p.kind
                                ),
                            ));
                        }
                        text.push_str(&p.text);
                    }
                    text
                }
            };
            Ok(pb::ChatMessage { role: role.into(), content })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    let prompt = pb::prompt::Kind::Chat(pb::Conversation { messages });
    let top = req.top_logprobs.unwrap_or(0);
    if top > 0 && !req.logprobs {
        return Err(ApiError::invalid("top_logprobs", "top_logprobs needs logprobs: true"));
    }
    run(http, Kind::Chat, req.common, prompt, req.logprobs, top, DEFAULT_CHAT_TOKENS).await
}

/// `max_tokens` when a chat request gives none: the gRPC default.
const DEFAULT_CHAT_TOKENS: u32 = crate::service::DEFAULT_MAX_TOKENS as u32;

/// `max_tokens` when a completion request gives none, as OpenAI's legacy endpoint.
const DEFAULT_COMPLETION_TOKENS: u32 = 16;

async fn completions(State(http): State<Http>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    http.authorize("Generate", &headers)?;
    let req: CompletionRequest = parse_json(&body)?;
    if req.echo {
        return Err(ApiError::invalid("echo", "echo is not supported"));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix", "suffix is not supported"));
    }
    if req.best_of.is_some_and(|b| b > 1) {
        return Err(ApiError::invalid("best_of", "best_of must be 1"));
    }
    let prompt = match req.prompt {
        PromptInput::One(p) => p,
        PromptInput::Many(mut ps) if ps.len() == 1 => ps.remove(0),
        PromptInput::Many(_) => {
            return Err(ApiError::invalid("prompt", "give one prompt (batches of prompts are not supported)"));
        }
    };
    let top = req.logprobs.unwrap_or(0);
    run(
        http,
        Kind::Completion,
        req.common,
        pb::prompt::Kind::Raw(prompt),
        req.logprobs.is_some(),
        top,
        DEFAULT_COMPLETION_TOKENS,
    )
    .await
}

/// The gRPC request an OpenAI request amounts to.
fn generate_request(
    c: &Common,
    prompt: pb::prompt::Kind,
    logprobs: bool,
    top_logprobs: u32,
    default_max_tokens: u32,
) -> Result<pb::GenerateRequest, ApiError> {
    if c.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("n", "n must be 1"));
    }
    for (name, v) in [("presence_penalty", c.presence_penalty), ("frequency_penalty", c.frequency_penalty)] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(ApiError::invalid(name, format!("{name} is not supported (send 0 or leave it out)")));
        }
    }
    if c.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
        return Err(ApiError::invalid("logit_bias", "logit_bias is not supported"));
    }
    if c.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::invalid("tools", "tools are not supported"));
    }
    if let Some(f) = &c.response_format
        && f.get("type").and_then(Value::as_str) != Some("text")
    {
        return Err(ApiError::invalid("response_format", "only response_format {\"type\": \"text\"} is supported"));
    }
    let max_tokens = match (c.max_completion_tokens, c.max_tokens) {
        (Some(0), _) | (None, Some(0)) => {
            return Err(ApiError::invalid("max_tokens", "max_tokens must be at least 1"));
        }
        (Some(n), _) | (None, Some(n)) => n,
        (None, None) => default_max_tokens,
    };
    let temperature = c.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid("temperature", format!("temperature must be in [0, 2], got {temperature}")));
    }
    let stop = match &c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stop.len() > 4 {
        return Err(ApiError::invalid("stop", "at most 4 stop sequences"));
    }
    let steering = c
        .steering
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let source = match (&s.vector, &s.values) {
                (Some(name), None) => pb::steering_vector::Source::Name(name.clone()),
                (None, Some(values)) => {
                    pb::steering_vector::Source::Inline(pb::InlineVector { values: values.clone() })
                }
                _ => {
                    return Err(ApiError::invalid(
                        "steering",
                        format!("steering[{i}]: give `vector` (a name) or `values`"),
                    ));
                }
            };
            let positions = match s.positions.as_deref() {
                None | Some("all") => pb::Positions::All,
                Some("prompt") => pb::Positions::Prompt,
                Some("response") => pb::Positions::Response,
                Some(other) => {
                    return Err(ApiError::invalid(
                        "steering",
                        format!("steering[{i}].positions: `{other}` is not one of all, prompt, response"),
                    ));
                }
            };
            Ok(pb::SteeringVector {
                source: Some(source),
                layer: s.layer,
                coefficient: s.coefficient,
                positions: positions as i32,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let monitors = c
        .monitors
        .iter()
        .map(|m| match m {
            Monitor::Name(n) => pb::ProjectionTarget { vector: n.clone(), layer: None },
            Monitor::At { vector, layer } => pb::ProjectionTarget { vector: vector.clone(), layer: *layer },
        })
        .collect();
    Ok(pb::GenerateRequest {
        model: c.model.clone(),
        prompt: Some(pb::Prompt { kind: Some(prompt) }),
        sampling: Some(pb::SamplingParams {
            max_tokens,
            temperature,
            top_p: c.top_p.unwrap_or(1.0),
            top_k: c.top_k.unwrap_or(0),
            seed: c.seed.map(|s| s as u64),
            stop,
        }),
        steering,
        monitors,
        alert_threshold: c.alert_threshold,
        alert_threshold_calibrated: c.alert_threshold_calibrated,
        logprobs,
        top_logprobs,
    })
}

async fn run(
    http: Http,
    kind: Kind,
    common: Common,
    prompt: pb::prompt::Kind,
    logprobs: bool,
    top_logprobs: u32,
    default_max_tokens: u32,
) -> Result<Response, ApiError> {
    let state = http.state()?;
    let req = generate_request(&common, prompt, logprobs, top_logprobs, default_max_tokens)?;
    let monitors: Vec<String> = req.monitors.iter().map(|m| m.vector.clone()).collect();
    let requested_model = if req.model.is_empty() { state.default_model.clone() } else { req.model.clone() };
    let stream = http.svc.generate(tonic::Request::new(req)).await?.into_inner();
    let reply = Reply {
        kind,
        id: format!("{}{}", kind.id_prefix(), random_id()),
        created: unix_now(),
        model: requested_model,
        monitors,
        logprobs,
    };
    if common.stream {
        let usage = common.stream_options.is_some_and(|o| o.include_usage);
        Ok(stream_reply(reply, stream, usage).into_response())
    } else {
        Ok(axum::Json(collect_reply(reply, stream).await?).into_response())
    }
}

fn random_id() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..24).map(|_| char::from_digit(rng.random_range(0..36), 36).unwrap_or('0')).collect()
}

/// What every chunk or reply of one request repeats.
struct Reply {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    /// Monitored vector names, in request order.
    monitors: Vec<String>,
    logprobs: bool,
}

impl Reply {
    fn envelope(&self, streaming: bool, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.kind.object(streaming),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": Value::Null,
            "choices": choices,
        })
    }

    /// One token's monitor scores (and, for the first, the last prompt token's).
    fn token_scores(&self, m: &pb::GenerateResponse) -> Value {
        let scores = |raw: &[f32], cal: &[f32]| -> Value {
            self.monitors
                .iter()
                .zip(raw)
                .enumerate()
                .map(|(i, (v, s))| json!({"vector": v, "score": s, "calibrated": finite(cal.get(i).copied())}))
                .collect()
        };
        let mut p = json!({ "scores": scores(&m.scores, &m.calibrated_scores) });
        if !m.prompt_scores.is_empty() {
            p["prompt_last"] = scores(&m.prompt_scores, &m.prompt_scores_calibrated);
        }
        p
    }

    /// A chat `logprobs.content` entry for one token.
    fn chat_logprob(l: &pb::TokenLogprob) -> Value {
        json!({
            "token": l.token,
            "logprob": l.logprob,
            "bytes": l.token.as_bytes(),
            "top_logprobs": l.top_logprobs.iter()
                .map(|t| json!({"token": t.token, "logprob": t.logprob, "bytes": t.token.as_bytes()}))
                .collect::<Vec<_>>(),
        })
    }
}

/// NaN (no calibration) as null.
fn finite(v: Option<f32>) -> Value {
    match v {
        Some(v) if v.is_finite() => json!(v),
        _ => Value::Null,
    }
}

fn finish_reason(s: &pb::GenerateSummary) -> &'static str {
    match s.finish_reason() {
        pb::FinishReason::Stop => "stop",
        _ => "length",
    }
}

fn usage(s: &pb::GenerateSummary) -> Value {
    json!({
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.completion_tokens,
        "total_tokens": s.prompt_tokens + s.completion_tokens,
    })
}

/// The end-of-generation `persona` field: a summary per monitor, the steering as applied.
fn summary_json(s: &pb::GenerateSummary, per_token: Option<&[Vec<(f32, f32)>]>) -> Value {
    let monitors: Vec<Value> = s
        .monitors
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let mut v = json!({
                "vector": m.vector,
                "layer": m.layer,
                "calibrated": m.calibrated,
                "prompt_last": m.prompt_last,
                "mean": m.mean,
                "max": m.max,
                "alert": m.alert,
                "first_alert_token": (m.first_alert_token >= 0).then_some(m.first_alert_token),
            });
            if m.calibrated {
                v["prompt_last_calibrated"] = json!(m.prompt_last_calibrated);
                v["mean_calibrated"] = json!(m.mean_calibrated);
                v["max_calibrated"] = json!(m.max_calibrated);
            }
            if let Some(tokens) = per_token {
                v["scores"] = tokens.iter().map(|t| json!(t.get(i).map(|p| p.0))).collect();
                if m.calibrated {
                    v["scores_calibrated"] = tokens.iter().map(|t| finite(t.get(i).map(|p| p.1))).collect();
                }
            }
            v
        })
        .collect();
    let steering: Vec<Value> = s
        .steering
        .iter()
        .map(|a| {
            json!({
                "vector": a.vector,
                "layer": a.layer,
                "coefficient": a.coefficient,
                "layer_source": a.layer_source,
                "coefficient_source": a.coefficient_source,
            })
        })
        .collect();
    json!({ "monitors": monitors, "steering": steering })
}

/// Server-sent events: one chunk per token, the finish chunk, usage when asked, `[DONE]`.
fn stream_reply(
    reply: Reply,
    mut stream: ResponseStream<pb::GenerateResponse>,
    include_usage: bool,
) -> Sse<impl tokio_stream::Stream<Item = Result<Event, std::convert::Infallible>>> {
    let events = super::task_events(move |tx| async move {
        let send = async |v: Value| tx.send(Event::default().data(v.to_string())).await.is_err();
        if reply.kind == Kind::Chat {
            let first = json!([{ "index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": Value::Null, "finish_reason": Value::Null }]);
            if send(reply.envelope(true, first)).await {
                return;
            }
        }
        let mut offset = 0usize;
        while let Some(item) = stream.next().await {
            let m = match item {
                Ok(m) => m,
                Err(status) => {
                    send(ApiError::from(status).body()).await;
                    return;
                }
            };
            let chunk = match &m.summary {
                Some(s) => {
                    let mut c = reply.envelope(true, finish_choice(&reply, s));
                    if !reply.monitors.is_empty() || !s.steering.is_empty() {
                        c["persona"] = summary_json(s, None);
                    }
                    if send(c).await {
                        return;
                    }
                    if include_usage {
                        let mut u = reply.envelope(true, json!([]));
                        u["usage"] = usage(s);
                        if send(u).await {
                            return;
                        }
                    }
                    continue;
                }
                None => {
                    let mut c = reply.envelope(true, token_choice(&reply, &m, offset));
                    offset += m.delta.len();
                    if !reply.monitors.is_empty() {
                        c["persona"] = reply.token_scores(&m);
                    }
                    c
                }
            };
            if send(chunk).await {
                return;
            }
        }
        let _ = tx.send(Event::default().data("[DONE]")).await;
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}

/// The choice of a token chunk.
fn token_choice(reply: &Reply, m: &pb::GenerateResponse, offset: usize) -> Value {
    let logprobs = match (&m.logprob, reply.logprobs) {
        (Some(l), true) => match reply.kind {
            Kind::Chat => json!({ "content": [Reply::chat_logprob(l)] }),
            Kind::Completion => legacy_logprobs(std::slice::from_ref(l), &[offset]),
        },
        _ => Value::Null,
    };
    match reply.kind {
        Kind::Chat => {
            json!([{ "index": 0, "delta": {"content": m.delta}, "logprobs": logprobs, "finish_reason": Value::Null }])
        }
        Kind::Completion => {
            json!([{ "index": 0, "text": m.delta, "logprobs": logprobs, "finish_reason": Value::Null }])
        }
    }
}

/// The choice of the last chunk: empty content and the finish reason.
fn finish_choice(reply: &Reply, s: &pb::GenerateSummary) -> Value {
    match reply.kind {
        Kind::Chat => json!([{ "index": 0, "delta": {}, "logprobs": Value::Null, "finish_reason": finish_reason(s) }]),
        Kind::Completion => {
            json!([{ "index": 0, "text": "", "logprobs": Value::Null, "finish_reason": finish_reason(s) }])
        }
    }
}

/// The legacy completions `logprobs` object.
fn legacy_logprobs(ls: &[pb::TokenLogprob], offsets: &[usize]) -> Value {
    json!({
        "tokens": ls.iter().map(|l| l.token.clone()).collect::<Vec<_>>(),
        "token_logprobs": ls.iter().map(|l| l.logprob).collect::<Vec<_>>(),
        "top_logprobs": ls.iter().map(|l| {
            l.top_logprobs.iter().map(|t| (t.token.clone(), json!(t.logprob))).collect::<serde_json::Map<_, _>>()
        }).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

/// The whole reply of a request that did not ask to stream.
async fn collect_reply(reply: Reply, mut stream: ResponseStream<pb::GenerateResponse>) -> Result<Value, ApiError> {
    let (mut text, mut lps, mut offsets, mut scores) = (String::new(), Vec::new(), Vec::new(), Vec::new());
    let mut prompt_last = Value::Null;
    while let Some(m) = stream.next().await {
        let m = m?;
        if let Some(s) = &m.summary {
            let logprobs = match (reply.logprobs, reply.kind) {
                (false, _) => Value::Null,
                (true, Kind::Chat) => json!({ "content": lps.iter().map(Reply::chat_logprob).collect::<Vec<_>>() }),
                (true, Kind::Completion) => legacy_logprobs(&lps, &offsets),
            };
            let choice = match reply.kind {
                Kind::Chat => json!({
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": Value::Null},
                    "logprobs": logprobs,
                    "finish_reason": finish_reason(s),
                }),
                Kind::Completion => {
                    json!({ "index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason(s) })
                }
            };
            let mut out = reply.envelope(false, json!([choice]));
            out["usage"] = usage(s);
            if !reply.monitors.is_empty() || !s.steering.is_empty() {
                let mut p = summary_json(s, Some(&scores));
                if !prompt_last.is_null() {
                    p["prompt_last"] = prompt_last;
                }
                out["persona"] = p;
            }
            return Ok(out);
        }
        if !m.prompt_scores.is_empty() {
            prompt_last = reply.token_scores(&m)["prompt_last"].take();
        }
        scores.push(
            m.scores
                .iter()
                .zip(m.calibrated_scores.iter().chain(std::iter::repeat(&f32::NAN)))
                .map(|(&a, &b)| (a, b))
                .collect(),
        );
        offsets.push(text.len());
        text.push_str(&m.delta);
        if let Some(l) = m.logprob {
            lps.push(l);
        }
    }
    Err(ApiError::from(tonic::Status::internal("the generation ended without a summary")))
}

async fn models(State(http): State<Http>, headers: HeaderMap) -> Result<Response, ApiError> {
    http.authorize("ListModels", &headers)?;
    let state = http.state()?;
    let created = unix_now() - state.started.elapsed().as_secs();
    let data: Vec<Value> = crate::service::list_models(state).models.iter().map(|m| model_json(m, created)).collect();
    Ok(axum::Json(json!({ "object": "list", "data": data })).into_response())
}

async fn model(
    State(http): State<Http>,
    axum::extract::Path(id): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    http.authorize("ListModels", &headers)?;
    let state = http.state()?;
    let created = unix_now() - state.started.elapsed().as_secs();
    let models = crate::service::list_models(state).models;
    let m = models
        .iter()
        .find(|m| m.id == id)
        .ok_or_else(|| ApiError::model_not_found(format!("model `{id}` is not loaded")))?;
    Ok(axum::Json(model_json(m, created)).into_response())
}

fn model_json(m: &pb::ModelInfo, created: u64) -> Value {
    json!({
        "id": m.id,
        "object": "model",
        "created": created,
        "owned_by": "persona-steer",
        "context_length": m.context_length,
        "n_layers": m.n_layers,
        "d_model": m.d_model,
        "default": m.is_default,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn common(v: Value) -> Common {
        serde_json::from_value(v).unwrap()
    }

    fn raw() -> pb::prompt::Kind {
        pb::prompt::Kind::Raw("Hi".into())
    }

    #[test]
    fn requests_map_to_generate_with_openai_defaults() {
        let r = generate_request(&common(json!({})), raw(), false, 0, 16).unwrap();
        let s = r.sampling.unwrap();
        assert_eq!((s.max_tokens, s.temperature, s.top_p, s.seed), (16, 1.0, 1.0, None));
        let c = common(json!({
            "max_completion_tokens": 5, "max_tokens": 9, "temperature": 0, "seed": 7, "stop": "\n",
            "steering": [{"vector": "evil", "layer": 20, "coefficient": 1.5, "positions": "response"}],
            "monitors": ["evil", {"vector": "calm", "layer": 3}], "alert_threshold_calibrated": 60
        }));
        let r = generate_request(&c, raw(), true, 2, 16).unwrap();
        let s = r.sampling.unwrap();
        assert_eq!((s.max_tokens, s.temperature, s.seed, s.stop), (5, 0.0, Some(7), vec!["\n".to_string()]));
        assert_eq!(r.steering[0].layer, Some(20));
        assert_eq!(r.steering[0].positions(), pb::Positions::Response);
        assert_eq!(r.monitors[1].layer, Some(3));
        assert_eq!(r.alert_threshold_calibrated, Some(60.0));
        assert!(r.logprobs && r.top_logprobs == 2);
    }

    #[test]
    fn unsupported_fields_are_refused_by_name() {
        for (body, param) in [
            (json!({"n": 2}), "n"),
            (json!({"presence_penalty": 0.5}), "presence_penalty"),
            (json!({"logit_bias": {"1": 5}}), "logit_bias"),
            (json!({"tools": [{}]}), "tools"),
            (json!({"response_format": {"type": "json_object"}}), "response_format"),
            (json!({"max_tokens": 0}), "max_tokens"),
            (json!({"temperature": 3}), "temperature"),
            (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
            (json!({"steering": [{"layer": 3}]}), "steering"),
            (json!({"steering": [{"vector": "evil", "positions": "middle"}]}), "steering"),
        ] {
            let e = generate_request(&common(body.clone()), raw(), false, 0, 16).unwrap_err();
            assert_eq!(e.status, 400, "{body}");
            assert_eq!(e.param, Some(param), "{body}: {}", e.message);
        }
        // Asking for nothing is fine.
        let ok = json!({"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "tools": [], "n": 1});
        generate_request(&common(ok), raw(), false, 0, 16).unwrap();
    }
}
