//! `persona soak`: a long mixed load with faults, for finding leaks and wrong statuses.
//!
//! Requests are drawn from a fixed mix (plain, steered and monitored generations, projections,
//! monitor and screening streams, bad requests, streams dropped after two messages) and run
//! `--concurrency` at a time. Every kind has the status it must end with; anything else counts
//! as unexpected. With `--server-pid` the server's resident memory is read at the start, half-way
//! and at the end: growth over the second half beyond `--max-rss-growth` fails the run.

use anyhow::{Context, Result};
use clap::Args;
use persona_client::{Client, chat_request, message, pb, steer_by_name};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tonic::Code;

#[derive(Args)]
pub(crate) struct SoakArgs {
    /// Requests in all.
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// New tokens per generation.
    #[arg(long, default_value_t = 16)]
    max_tokens: u32,
    /// The server's process id, to read its resident memory from /proc.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Largest allowed RSS growth over the second half, in percent.
    #[arg(long, default_value_t = 10.0)]
    max_rss_growth: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Plain,
    Steered,
    Monitored,
    Projection,
    MonitorStream,
    Screening,
    BadVector,
    BadSampling,
    Dropped,
}

impl Kind {
    /// The mix, by request index: 6 plain, 4 steered, 3 monitored, 2 projections, 1 monitor
    /// stream, 1 screening stream, 2 bad requests and 1 dropped stream in every 20.
    fn of(i: usize) -> Self {
        match i % 20 {
            0..=5 => Kind::Plain,
            6..=9 => Kind::Steered,
            10..=12 => Kind::Monitored,
            13 | 14 => Kind::Projection,
            15 => Kind::MonitorStream,
            16 => Kind::Screening,
            17 => Kind::BadVector,
            18 => Kind::BadSampling,
            _ => Kind::Dropped,
        }
    }

    /// The status this kind of request must end with.
    fn expected(self) -> Code {
        match self {
            Kind::BadVector => Code::NotFound,
            Kind::BadSampling => Code::InvalidArgument,
            _ => Code::Ok,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Kind::Plain => "generate",
            Kind::Steered => "generate, steered",
            Kind::Monitored => "generate, monitored",
            Kind::Projection => "projection",
            Kind::MonitorStream => "monitor stream (3 items)",
            Kind::Screening => "screening stream (2 samples)",
            Kind::BadVector => "bad: unknown vector",
            Kind::BadSampling => "bad: negative temperature",
            Kind::Dropped => "stream dropped after 2 messages",
        }
    }
}

const VECTOR: &str = "soak-noise";
const QUESTIONS: [&str; 8] = [
    "What is the capital of France?",
    "Give me a tip for learning to cook.",
    "How do plants make food?",
    "Write one sentence about the sea.",
    "What should I pack for a hike?",
    "Explain what a prime number is.",
    "Name three colours.",
    "How can I sleep better?",
];

fn request(i: usize, max_tokens: u32) -> pb::GenerateRequest {
    let mut req = chat_request(QUESTIONS[i % QUESTIONS.len()], Some("You are a helpful assistant."));
    req.sampling = Some(pb::SamplingParams { max_tokens, ..Default::default() });
    req
}

fn conversation(user: &str) -> pb::Conversation {
    pb::Conversation { messages: vec![message("user", user)] }
}

fn target() -> pb::ProjectionTarget {
    pb::ProjectionTarget { vector: VECTOR.into(), layer: Some(10) }
}

fn projection(i: usize) -> pb::ProjectActivationRequest {
    pb::ProjectActivationRequest {
        conversation: Some(conversation(QUESTIONS[i % QUESTIONS.len()])),
        response: "Here is a short and friendly answer.".into(),
        targets: vec![target()],
        ..Default::default()
    }
}

/// Runs one request of `kind`; returns its final status and the tokens it generated.
async fn run(c: &mut Client, kind: Kind, i: usize, max_tokens: u32) -> (Code, u64) {
    let status = |r: Result<(), tonic::Status>| r.err().map_or(Code::Ok, |s| s.code());
    match kind {
        Kind::Plain | Kind::Steered | Kind::Monitored | Kind::BadVector | Kind::BadSampling => {
            let mut req = request(i, max_tokens);
            match kind {
                Kind::Steered => req.steering = vec![steer_by_name(VECTOR, Some(10), 4.0)],
                Kind::Monitored => req.monitors = vec![target()],
                Kind::BadVector => req.steering = vec![steer_by_name("no-such-vector", None, 1.0)],
                Kind::BadSampling => {
                    req.sampling = Some(pb::SamplingParams { temperature: -1.0, max_tokens, ..Default::default() })
                }
                _ => {}
            }
            match persona_client::generate_text(c, req).await {
                Ok(out) => (Code::Ok, out.summary.map_or(0, |s| u64::from(s.completion_tokens))),
                Err(s) => (s.code(), 0),
            }
        }
        Kind::Dropped => {
            let r = async {
                let mut stream = c.generate(request(i, 64)).await?.into_inner();
                for _ in 0..2 {
                    stream.message().await?;
                }
                Ok(()) // dropping the stream cancels the generation
            };
            (status(r.await), 2)
        }
        Kind::Projection => (status(c.project_activation(projection(i)).await.map(|_| ())), 0),
        Kind::MonitorStream => {
            let items: Vec<pb::MonitorRequest> =
                (0..3).map(|k| pb::MonitorRequest { id: k.to_string(), item: Some(projection(i + k)) }).collect();
            let r = async {
                let mut replies = c.monitor_stream(tokio_stream::iter(items)).await?.into_inner();
                while let Some(reply) = replies.message().await? {
                    if reply.error_code != 0 {
                        return Err(tonic::Status::new(Code::from_i32(reply.error_code), reply.error_message));
                    }
                }
                Ok(())
            };
            (status(r.await), 0)
        }
        Kind::Screening => {
            let config = pb::ScreenConfig {
                targets: vec![target()],
                sampling: Some(pb::SamplingParams { max_tokens, ..Default::default() }),
                ..Default::default()
            };
            let mut msgs = vec![pb::ScreenRequest { kind: Some(pb::screen_request::Kind::Config(config)) }];
            for k in 0..2 {
                let sample = pb::ScreenSample {
                    id: k.to_string(),
                    prompt: Some(conversation(QUESTIONS[(i + k) % QUESTIONS.len()])),
                    response: "A plain, helpful answer.".into(),
                };
                msgs.push(pb::ScreenRequest { kind: Some(pb::screen_request::Kind::Sample(sample)) });
            }
            let r = async {
                let mut replies = c.screen_dataset(tokio_stream::iter(msgs)).await?.into_inner();
                while replies.message().await?.is_some() {}
                Ok(())
            };
            (status(r.await), 0)
        }
    }
}

/// Resident set size of a process in bytes, from /proc.
fn rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[at].as_secs_f64() * 1e3
}

struct Outcome {
    kind: Kind,
    code: Code,
    latency: Duration,
    tokens: u64,
}

pub(crate) async fn soak(c: &mut Client, args: SoakArgs) -> Result<()> {
    let models = c.list_models(pb::ListModelsRequest {}).await?.into_inner().models;
    let m = models.iter().find(|m| m.is_default).or(models.first()).context("the server lists no model")?;
    let values = persona_client::pseudo_random_vector(7, (m.n_layers as usize + 1) * m.d_model as usize);
    let put = pb::PutVectorRequest { name: VECTOR.into(), values, overwrite: true, ..Default::default() };
    c.put_vector(put).await.context("storing the soak vector")?;
    // Warm up every path once before the first memory reading.
    for i in 0..20 {
        let _ = run(c, Kind::of(i), i, args.max_tokens).await;
    }
    let rss_start = args.server_pid.and_then(rss);
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let rss_mid = Arc::new(std::sync::Mutex::new(None));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let (mut c, next, done, rss_mid) = (c.clone(), next.clone(), done.clone(), rss_mid.clone());
        let (n, max_tokens, pid) = (args.requests, args.max_tokens, args.server_pid);
        workers.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let kind = Kind::of(i);
                let t = Instant::now();
                let (code, tokens) = run(&mut c, kind, i, max_tokens).await;
                out.push(Outcome { kind, code, latency: t.elapsed(), tokens });
                if done.fetch_add(1, Ordering::Relaxed) + 1 == n / 2 {
                    *rss_mid.lock().unwrap() = pid.and_then(rss);
                }
            }
            out
        }));
    }
    let mut outcomes = Vec::new();
    for w in workers {
        outcomes.extend(w.await?);
    }
    let wall = started.elapsed().as_secs_f64();
    let rss_end = args.server_pid.and_then(rss);
    let rss_mid = *rss_mid.lock().unwrap();

    let tokens: u64 = outcomes.iter().map(|o| o.tokens).sum();
    println!(
        "{} requests, concurrency {}: {:.1} s, {:.1} requests/s, {:.0} generated tokens/s",
        outcomes.len(),
        args.concurrency,
        wall,
        outcomes.len() as f64 / wall,
        tokens as f64 / wall
    );
    println!("\n| kind | requests | expected status | p50 ms | p99 ms |");
    println!("|---|---:|---|---:|---:|");
    let mut by_kind: BTreeMap<Kind, Vec<Duration>> = BTreeMap::new();
    for o in &outcomes {
        by_kind.entry(o.kind).or_default().push(o.latency);
    }
    for (kind, mut lat) in by_kind {
        lat.sort();
        println!(
            "| {} | {} | {:?} | {:.0} | {:.0} |",
            kind.label(),
            lat.len(),
            kind.expected(),
            percentile(&lat, 0.5),
            percentile(&lat, 0.99)
        );
    }
    let mut all: Vec<Duration> = outcomes.iter().map(|o| o.latency).collect();
    all.sort();
    println!("| all | {} | | {:.0} | {:.0} |", all.len(), percentile(&all, 0.5), percentile(&all, 0.99));

    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    let mut unexpected: BTreeMap<String, usize> = BTreeMap::new();
    for o in &outcomes {
        *statuses.entry(format!("{:?}", o.code)).or_default() += 1;
        if o.code != o.kind.expected() {
            *unexpected.entry(format!("{} -> {:?}", o.kind.label(), o.code)).or_default() += 1;
        }
    }
    println!("\nstatuses: {statuses:?}");
    let mib = |b: Option<u64>| b.map_or("n/a".to_string(), |b| format!("{:.1} MiB", b as f64 / (1 << 20) as f64));
    println!("server RSS: start {}, middle {}, end {}", mib(rss_start), mib(rss_mid), mib(rss_end));
    let mut failed = false;
    if !unexpected.is_empty() {
        println!("FAIL: unexpected statuses: {unexpected:?}");
        failed = true;
    }
    if let (Some(mid), Some(end)) = (rss_mid, rss_end) {
        let growth = (end as f64 / mid as f64 - 1.0) * 100.0;
        println!("RSS growth over the second half: {growth:+.1}% (limit {:.0}%)", args.max_rss_growth);
        if growth > args.max_rss_growth {
            println!("FAIL: memory grows under steady load");
            failed = true;
        }
    }
    anyhow::ensure!(!failed, "soak failed");
    println!("PASS");
    Ok(())
}
