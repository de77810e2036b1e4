//! Client library for persona-steer: a connected gRPC client plus helpers for the common calls.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let mut c = persona_client::connect("http://127.0.0.1:50051").await?;
//! let out = persona_client::generate_text(&mut c, persona_client::chat_request("Hi!", None)).await?;
//! println!("{}", out.text);
//! # Ok(()) }
//! ```

pub mod charts;
pub mod dataset;
pub mod elicit;

use pb::persona_service_client::PersonaServiceClient;
pub use persona_proto::v1 as pb;
use std::path::PathBuf;
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A connected client; every call carries the API key it was connected with, if any.
pub type Client = PersonaServiceClient<InterceptedService<Channel, ApiKey>>;

/// Adds `authorization: Bearer <key>` to every call (nothing when there is no key).
#[derive(Clone, Default)]
pub struct ApiKey(Option<tonic::metadata::AsciiMetadataValue>);

impl tonic::service::Interceptor for ApiKey {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// How to reach a server beyond its address.
#[derive(Clone, Debug, Default)]
pub struct ConnectOptions {
    /// Sent as `authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// PEM CA bundle that signed the server's certificate (implies TLS); without it an `https://`
    /// address is checked against the system's roots.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for servers that require them (mTLS).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// The name the server's certificate must carry, when it is not the address's host.
    pub tls_domain: Option<String>,
}

impl ConnectOptions {
    fn uses_tls(&self, addr: &str) -> bool {
        addr.starts_with("https://") || self.tls_ca.is_some() || self.tls_cert.is_some()
    }

    fn tls_config(&self, host: &str) -> anyhow::Result<ClientTlsConfig> {
        let read = |p: &PathBuf| std::fs::read(p).map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()));
        let mut tls = ClientTlsConfig::new().domain_name(self.tls_domain.clone().unwrap_or_else(|| host.to_string()));
        tls = match &self.tls_ca {
            Some(ca) => tls.ca_certificate(Certificate::from_pem(read(ca)?)),
            None => tls.with_native_roots(),
        };
        match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => tls = tls.identity(Identity::from_pem(read(c)?, read(k)?)),
            (None, None) => {}
            _ => anyhow::bail!("a client certificate needs both --tls-cert and --tls-key"),
        }
        Ok(tls)
    }
}

/// Connects to a server: `127.0.0.1:50051`, `http://host:port`, `https://host:port`, or
/// `dns:///name:port` to balance calls round robin over every address the name resolves to
/// (a Kubernetes headless Service), resolving it again every 10 seconds.
pub async fn connect(addr: &str) -> anyhow::Result<Client> {
    connect_with(addr, &ConnectOptions::default()).await
}

/// [`connect`] with an API key and TLS settings.
pub async fn connect_with(addr: &str, opts: &ConnectOptions) -> anyhow::Result<Client> {
    let channel = channel(addr, opts).await?;
    let key = match &opts.api_key {
        Some(k) => {
            Some(format!("Bearer {k}").parse().map_err(|_| anyhow::anyhow!("the API key must be printable ASCII"))?)
        }
        None => None,
    };
    Ok(PersonaServiceClient::with_interceptor(channel, ApiKey(key))
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(64 * 1024 * 1024))
}

/// How often a `dns:///` address is resolved again.
const RESOLVE_EVERY: Duration = Duration::from_secs(10);

/// A channel to `addr` (see [`connect`]).
pub async fn channel(addr: &str, opts: &ConnectOptions) -> anyhow::Result<Channel> {
    if let Some(target) = addr.strip_prefix("dns:///") {
        return balanced(target, opts).await;
    }
    let tls = opts.uses_tls(addr);
    let url = match addr.split_once("://") {
        Some(_) => addr.to_string(),
        None if tls => format!("https://{addr}"),
        None => format!("http://{addr}"),
    };
    let mut endpoint = Endpoint::from_shared(url.clone())?;
    if tls {
        let host = endpoint.uri().host().unwrap_or_default().to_string();
        endpoint = endpoint.tls_config(opts.tls_config(&host)?)?;
    }
    endpoint.connect().await.map_err(|e| anyhow::anyhow!("connecting to {url}: {e:?}"))
}

/// A channel over every address `target` (`name:port`) resolves to, kept up to date.
async fn balanced(target: &str, opts: &ConnectOptions) -> anyhow::Result<Channel> {
    balanced_with(
        target,
        opts,
        RESOLVE_EVERY,
        |target| async move { Ok(tokio::net::lookup_host(&target).await?.collect()) },
    )
    .await
}

/// [`balanced`] with its resolver and re-resolution interval given (for tests). Calls go to the
/// endpoint with fewer calls in flight of two picked at random ("power of two choices"), which
/// spreads load evenly and away from a slow replica.
#[doc(hidden)]
pub async fn balanced_with<R, F>(
    target: &str,
    opts: &ConnectOptions,
    every: Duration,
    lookup: R,
) -> anyhow::Result<Channel>
where
    R: Fn(String) -> F + Send + Sync + 'static,
    F: std::future::Future<Output = std::io::Result<Vec<std::net::SocketAddr>>> + Send,
{
    use tonic::transport::channel::Change;
    let (host, _) = target.rsplit_once(':').ok_or_else(|| anyhow::anyhow!("dns:///{target}: expected name:port"))?;
    let tls = if opts.uses_tls("") { Some(opts.tls_config(host)?) } else { None };
    let endpoint = move |a: std::net::SocketAddr| -> anyhow::Result<Endpoint> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let e = Endpoint::from_shared(format!("{scheme}://{a}"))?.connect_timeout(Duration::from_secs(5));
        Ok(match &tls {
            Some(t) => e.tls_config(t.clone())?,
            None => e,
        })
    };
    let lookup = std::sync::Arc::new(lookup);
    let resolve = move |target: String| {
        let lookup = lookup.clone();
        async move {
            let mut addrs = lookup(target).await?;
            addrs.sort();
            addrs.dedup();
            Ok::<_, std::io::Error>(addrs)
        }
    };
    let first = resolve(target.to_string()).await.map_err(|e| anyhow::anyhow!("resolving {target}: {e}"))?;
    anyhow::ensure!(!first.is_empty(), "{target} resolves to no address");
    let (channel, changes) = Channel::balance_channel::<std::net::SocketAddr>(64);
    for &a in &first {
        changes.send(Change::Insert(a, endpoint(a)?)).await?;
    }
    let target = target.to_string();
    tokio::spawn(async move {
        let mut known: std::collections::BTreeSet<_> = first.into_iter().collect();
        loop {
            tokio::time::sleep(every).await;
            let Ok(now) = resolve(target.clone()).await else { continue };
            if now.is_empty() {
                continue; // a failed lookup keeps the last known set
            }
            let now: std::collections::BTreeSet<_> = now.into_iter().collect();
            for gone in known.difference(&now) {
                if changes.send(Change::Remove(*gone)).await.is_err() {
                    return; // the channel is gone
                }
            }
            for &new in now.difference(&known) {
                let Ok(e) = endpoint(new) else { continue };
                if changes.send(Change::Insert(new, e)).await.is_err() {
                    return;
                }
            }
            known = now;
        }
    });
    Ok(channel)
}

pub fn message(role: &str, content: &str) -> pb::ChatMessage {
    pb::ChatMessage { role: role.to_string(), content: content.to_string() }
}

/// A chat prompt with an optional system message.
pub fn chat(user: &str, system: Option<&str>) -> pb::Prompt {
    let mut messages = Vec::new();
    if let Some(s) = system {
        messages.push(message("system", s));
    }
    messages.push(message("user", user));
    pb::Prompt { kind: Some(pb::prompt::Kind::Chat(pb::Conversation { messages })) }
}

/// A greedy generation request for one user message on the default model.
pub fn chat_request(user: &str, system: Option<&str>) -> pb::GenerateRequest {
    pb::GenerateRequest { prompt: Some(chat(user, system)), ..Default::default() }
}

/// Steering by a stored vector at one layer; `None` uses the vector's steering recommendation
/// (from an evaluation), else its monitoring layer.
pub fn steer_by_name(name: &str, layer: Option<u32>, coefficient: f32) -> pb::SteeringVector {
    pb::SteeringVector { coefficient: Some(coefficient), ..steer_recommended(name, layer) }
}

/// Steering by a stored vector with the coefficient its evaluation recommended (at `layer`, or at
/// the recommended layer).
pub fn steer_recommended(name: &str, layer: Option<u32>) -> pb::SteeringVector {
    pb::SteeringVector {
        source: Some(pb::steering_vector::Source::Name(name.to_string())),
        layer,
        coefficient: None,
        positions: pb::Positions::All as i32,
    }
}

/// A steering spec from `NAME[:LAYER[:COEF[:all|prompt|response]]]`; an empty or missing LAYER
/// or COEF (`auto` too) leaves it to the server: the vector's steering recommendation.
pub fn parse_steer(s: &str) -> anyhow::Result<pb::SteeringVector> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.is_empty() || parts.len() > 4 || parts[0].is_empty() {
        anyhow::bail!("--steer expects NAME[:LAYER[:COEF[:all|prompt|response]]], got `{s}`");
    }
    let given = |i: usize| parts.get(i).copied().filter(|p| !p.is_empty() && *p != "auto");
    let layer = given(1).map(|l| l.parse()).transpose().map_err(|e| anyhow::anyhow!("layer in `{s}`: {e}"))?;
    let coefficient =
        given(2).map(|c| c.parse()).transpose().map_err(|e| anyhow::anyhow!("coefficient in `{s}`: {e}"))?;
    let positions = match parts.get(3).copied().unwrap_or("all") {
        "all" | "" => pb::Positions::All,
        "prompt" => pb::Positions::Prompt,
        "response" => pb::Positions::Response,
        other => anyhow::bail!("unknown positions `{other}` (all, prompt or response)"),
    };
    Ok(pb::SteeringVector { coefficient, positions: positions as i32, ..steer_recommended(parts[0], layer) })
}

/// A projection target from `NAME` (the vector's recommended layer) or `NAME:LAYER`.
pub fn parse_target(s: &str) -> anyhow::Result<pb::ProjectionTarget> {
    Ok(match s.rsplit_once(':') {
        Some((v, l)) => pb::ProjectionTarget {
            vector: v.to_string(),
            layer: Some(l.parse().map_err(|e| anyhow::anyhow!("layer `{l}` in `{s}`: {e}"))?),
        },
        None => pb::ProjectionTarget { vector: s.to_string(), layer: None },
    })
}

/// Steering by inline values (one layer's row).
pub fn steer_inline(values: Vec<f32>, layer: u32, coefficient: f32) -> pb::SteeringVector {
    pb::SteeringVector {
        source: Some(pb::steering_vector::Source::Inline(pb::InlineVector { values })),
        layer: Some(layer),
        coefficient: Some(coefficient),
        positions: pb::Positions::All as i32,
    }
}

/// The JSON schema of the files in `traits/`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct TraitJson {
    #[serde(rename = "trait")]
    name: String,
    #[serde(default)]
    description: String,
    instruction: Vec<PairJson>,
    questions: Vec<String>,
    #[serde(default)]
    eval_questions: Vec<String>,
    #[serde(default)]
    eval_prompt: String,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct PairJson {
    pos: String,
    neg: String,
}

/// Parses a trait file (the `traits/` schema).
pub fn trait_from_json(text: &str) -> anyhow::Result<pb::TraitDefinition> {
    let t: TraitJson = serde_json::from_str(text)?;
    Ok(pb::TraitDefinition {
        trait_name: t.name,
        description: t.description,
        instruction: t.instruction.into_iter().map(|p| pb::InstructionPair { pos: p.pos, neg: p.neg }).collect(),
        questions: t.questions,
        eval_questions: t.eval_questions,
        eval_prompt: t.eval_prompt,
    })
}

/// A trait definition as a pretty-printed file in the `traits/` schema.
pub fn trait_to_json(t: &pb::TraitDefinition) -> String {
    let j = TraitJson {
        name: t.trait_name.clone(),
        description: t.description.clone(),
        instruction: t.instruction.iter().map(|p| PairJson { pos: p.pos.clone(), neg: p.neg.clone() }).collect(),
        questions: t.questions.clone(),
        eval_questions: t.eval_questions.clone(),
        eval_prompt: t.eval_prompt.clone(),
    };
    serde_json::to_string_pretty(&j).expect("plain strings serialize")
}

/// A finished generation.
#[derive(Debug, Clone, Default)]
pub struct Completion {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub summary: Option<pb::GenerateSummary>,
    /// Seconds from sending the request to the first token message.
    pub time_to_first_token: Option<f64>,
}

/// Runs a generation and collects its stream.
pub async fn generate_text(client: &mut Client, req: pb::GenerateRequest) -> Result<Completion, tonic::Status> {
    let started = std::time::Instant::now();
    let mut stream = client.generate(req).await?.into_inner();
    let mut out = Completion::default();
    while let Some(msg) = stream.message().await? {
        if out.time_to_first_token.is_none() && !msg.token_ids.is_empty() {
            out.time_to_first_token = Some(started.elapsed().as_secs_f64());
        }
        out.text.push_str(&msg.delta);
        out.token_ids.extend(msg.token_ids);
        if msg.summary.is_some() {
            out.summary = msg.summary;
        }
    }
    Ok(out)
}

/// A deterministic pseudo-random unit-scale vector (no RNG dependency), for benchmarks and demos.
pub fn pseudo_random_vector(seed: u64, len: usize) -> Vec<f32> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseudo_random_vectors_are_deterministic_and_centred() {
        let a = pseudo_random_vector(3, 1000);
        assert_eq!(a, pseudo_random_vector(3, 1000));
        assert_ne!(a, pseudo_random_vector(4, 1000));
        assert!(a.iter().all(|v| (-1.0..=1.0).contains(v)));
        let mean: f32 = a.iter().sum::<f32>() / a.len() as f32;
        assert!(mean.abs() < 0.1, "{mean}");
    }

    #[test]
    fn trait_files_round_trip_through_the_protobuf_form() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../traits/evil.json");
        let text = std::fs::read_to_string(path).unwrap();
        let t = trait_from_json(&text).unwrap();
        assert_eq!((t.trait_name.as_str(), t.instruction.len(), t.questions.len()), ("evil", 5, 20));
        let again = trait_from_json(&trait_to_json(&t)).unwrap();
        assert_eq!(again, t);
        let original: serde_json::Value = serde_json::from_str(&text).unwrap();
        let written: serde_json::Value = serde_json::from_str(&trait_to_json(&t)).unwrap();
        assert_eq!(original, written);
        assert!(trait_from_json("{\"trait\": \"x\"}").is_err());
    }

    #[test]
    fn steering_specs_leave_missing_parts_to_the_recommendation() {
        let v = parse_steer("evil").unwrap();
        assert_eq!((v.layer, v.coefficient), (None, None));
        let v = parse_steer("evil::1.5").unwrap();
        assert_eq!((v.layer, v.coefficient), (None, Some(1.5)));
        let v = parse_steer("evil:12:-2:response").unwrap();
        assert_eq!((v.layer, v.coefficient, v.positions), (Some(12), Some(-2.0), pb::Positions::Response as i32));
        assert_eq!(parse_steer("evil:auto").unwrap().layer, None);
        for bad in ["", ":3:1", "evil:x:1", "evil:3:y", "evil:3:1:sideways", "a:1:2:all:5"] {
            assert!(parse_steer(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn targets_parse_with_and_without_a_layer() {
        assert_eq!(parse_target("evil").unwrap().layer, None);
        let t = parse_target("my.vec:12").unwrap();
        assert_eq!((t.vector.as_str(), t.layer), ("my.vec", Some(12)));
        assert!(parse_target("evil:x").is_err());
    }

    #[test]
    fn chat_puts_the_system_message_first() {
        let p = chat("q", Some("s"));
        let Some(pb::prompt::Kind::Chat(c)) = p.kind else { panic!("chat prompt expected") };
        assert_eq!(c.messages.iter().map(|m| m.role.as_str()).collect::<Vec<_>>(), ["system", "user"]);
    }
}
