//! `persona bench`: single-stream and concurrent speed, steering and monitoring overhead,
//! projection throughput, long prompts and extraction time.

use anyhow::{Context, Result};
use clap::Args;
use persona_client::{Client, generate_text, pb};

use crate::measure::{median, percentile, timed_stream};

#[derive(Args)]
pub(crate) struct BenchArgs {
    #[arg(long, default_value = "")]
    model: String,
    /// Measured runs per configuration (medians are reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    /// Residual layer for the steered runs (default: the middle layer).
    #[arg(long)]
    layer: Option<u32>,
    #[arg(long, default_value_t = 4.0)]
    coefficient: f32,
    /// Also run N concurrent streams, each steered by its own vector, for each N listed
    /// (e.g. 1,4,8,16); prints aggregate tok/s, TTFT and inter-token latency percentiles.
    #[arg(long, value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Skip the single-stream steered/unsteered comparison.
    #[arg(long)]
    no_single: bool,
    /// Also time one full extraction of this library trait (every pair and question, one greedy
    /// answer per side, no judge), stored as `bench-TRAIT`.
    #[arg(long, value_name = "TRAIT")]
    extract: Option<String>,
    /// New tokens per rollout for --extract.
    #[arg(long, default_value_t = 128)]
    extract_tokens: u32,
    /// Measure the cost of per-token monitoring: single-stream decode with two monitors against none.
    #[arg(long)]
    monitor: bool,
    /// ProjectActivation throughput with N concurrent clients, for each N listed (e.g. 1,16).
    #[arg(long, value_delimiter = ',')]
    project: Vec<usize>,
    /// Also run N concurrent streams through the HTTP API at this base URL (e.g.
    /// http://127.0.0.1:8080), alternated with the same streams over gRPC, for each N of
    /// --concurrency (default 1,8): streamed chat completions against Generate, as a client sees them.
    #[arg(long, value_name = "URL")]
    http: Option<String>,
    /// Also measure single-stream prefill and decode after the user message in this file (a
    /// long prompt: how cost grows with context); repeatable.
    #[arg(long, value_name = "FILE")]
    long_prompt: Vec<std::path::PathBuf>,
}

/// Prefill tok/s, decode tok/s and time to first token of one run.
pub(crate) async fn bench_once(c: &mut Client, req: pb::GenerateRequest) -> Result<(f64, f64, f64)> {
    let out = generate_text(c, req).await?;
    let s = out.summary.context("no summary")?;
    let prefill = s.prompt_tokens as f64 / (s.prefill_ms / 1e3);
    let decode = (s.completion_tokens.saturating_sub(1)) as f64 / (s.decode_ms / 1e3);
    Ok((prefill, decode, out.time_to_first_token.unwrap_or(f64::NAN)))
}

pub(crate) async fn bench(c: &mut Client, a: BenchArgs) -> Result<()> {
    let models = c.list_models(pb::ListModelsRequest {}).await?.into_inner().models;
    let m = models
        .iter()
        .find(|m| if a.model.is_empty() { m.is_default } else { m.id == a.model })
        .context("model not loaded")?;
    let layer = a.layer.unwrap_or(m.n_layers / 2);
    // A prompt of a few hundred tokens, so prefill is measured on real work.
    let user = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle. ".repeat(8);
    let base = pb::GenerateRequest {
        model: m.id.clone(),
        prompt: Some(persona_client::chat(&user, Some("You are a creative writer."))),
        sampling: Some(pb::SamplingParams { max_tokens: a.max_tokens, ..Default::default() }),
        ..Default::default()
    };
    let mut v = persona_client::pseudo_random_vector(7, m.d_model as usize);
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= norm);
    let steered =
        pb::GenerateRequest { steering: vec![persona_client::steer_inline(v, layer, a.coefficient)], ..base.clone() };
    println!(
        "model {} ({} layers, d={}, weights {}), {} runs, {} new tokens",
        m.id, m.n_layers, m.d_model, m.weights, a.runs, a.max_tokens
    );
    bench_once(c, base.clone()).await?; // warm-up
    if !a.no_single {
        single_stream(c, &a, &base, &steered, layer).await?;
    }
    if let Some(url) = &a.http {
        let ns = if a.concurrency.is_empty() { vec![1, 8] } else { a.concurrency.clone() };
        for n in ns {
            crate::http_bench::http_vs_grpc(c, url, m, layer, a.coefficient, a.max_tokens, a.runs, n).await?;
        }
    } else {
        for &n in &a.concurrency {
            concurrent(c, &a, m, layer, n).await?;
        }
    }
    for file in &a.long_prompt {
        long_prompt(c, &a, &base, file).await?;
    }
    if a.monitor || !a.project.is_empty() {
        // Monitors and projections read stored vectors: two pseudo-random ones of the model's shape.
        for (i, name) in BENCH_VECTORS.iter().enumerate() {
            let values =
                persona_client::pseudo_random_vector(100 + i as u64, (m.n_layers as usize + 1) * m.d_model as usize);
            let put = pb::PutVectorRequest {
                name: name.to_string(),
                model: m.id.clone(),
                values,
                overwrite: true,
                ..Default::default()
            };
            c.put_vector(put).await?;
        }
    }
    if a.monitor {
        monitor_overhead(c, &a, &base, layer).await?;
    }
    for &n in &a.project {
        project_throughput(c, m, layer, n).await?;
    }
    if let Some(t) = &a.extract {
        bench_extract(c, m, t, a.extract_tokens).await?;
    }
    Ok(())
}

const BENCH_VECTORS: [&str; 2] = ["bench-monitor-a", "bench-monitor-b"];

pub(crate) fn bench_targets(layer: u32) -> Vec<pb::ProjectionTarget> {
    BENCH_VECTORS.iter().map(|v| pb::ProjectionTarget { vector: v.to_string(), layer: Some(layer) }).collect()
}

pub(crate) async fn monitor_overhead(
    c: &mut Client,
    a: &BenchArgs,
    base: &pb::GenerateRequest,
    layer: u32,
) -> Result<()> {
    let watched = pb::GenerateRequest { monitors: bench_targets(layer), ..base.clone() };
    let (mut plain, mut monitored) = (Vec::new(), Vec::new());
    for _ in 0..a.runs {
        plain.push(bench_once(c, base.clone()).await?.1);
        monitored.push(bench_once(c, watched.clone()).await?.1);
    }
    let (p, w) = (median(&mut plain), median(&mut monitored));
    println!("decode tok/s (median of {}): unmonitored {p:.1}, two monitors {w:.1}", a.runs);
    println!("monitoring overhead (decode, median): {:+.1}%", (p / w - 1.0) * 100.0);
    Ok(())
}

/// `clients` concurrent callers of ProjectActivation, each scoring its own conversations.
pub(crate) async fn project_throughput(c: &mut Client, m: &pb::ModelInfo, layer: u32, clients: usize) -> Result<()> {
    const PER_CLIENT: usize = 8;
    let answer = "Start by writing down what happened and when, then talk to them calmly in private. \
                  If nothing changes, bring your notes to your manager and ask for advice on next steps.";
    let t0 = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..clients {
        let mut c = c.clone();
        let model = m.id.clone();
        tasks.spawn(async move {
            for i in 0..PER_CLIENT {
                let user =
                    format!("Conversation {k}-{i}: a coworker keeps taking credit for my work. What should I do?");
                let Some(pb::prompt::Kind::Chat(conversation)) =
                    persona_client::chat(&user, Some("You are a helpful assistant.")).kind
                else {
                    unreachable!("chat() builds a conversation")
                };
                let req = pb::ProjectActivationRequest {
                    model: model.clone(),
                    conversation: Some(conversation),
                    response: answer.to_string(),
                    targets: bench_targets(layer),
                    per_token: false,
                };
                c.project_activation(req).await?;
            }
            Ok::<_, tonic::Status>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let secs = t0.elapsed().as_secs_f64();
    let n = clients * PER_CLIENT;
    println!(
        "ProjectActivation, {clients:>2} concurrent clients: {n} conversations in {secs:.2} s = {:.1} conversations/s",
        n as f64 / secs
    );
    Ok(())
}

pub(crate) async fn bench_extract(c: &mut Client, m: &pb::ModelInfo, trait_name: &str, max_tokens: u32) -> Result<()> {
    let req = pb::ExtractVectorRequest {
        model: m.id.clone(),
        name: format!("bench-{trait_name}"),
        trait_source: Some(pb::extract_vector_request::TraitSource::TraitRef(trait_name.to_string())),
        sampling: Some(pb::SamplingParams { max_tokens, ..Default::default() }),
        skip_judge: true,
        overwrite: true,
        ..Default::default()
    };
    let started = std::time::Instant::now();
    let mut stream = c.extract_vector(req).await?.into_inner();
    let mut result = None;
    while let Some(msg) = stream.message().await? {
        if let Some(pb::extract_vector_response::Event::Result(r)) = msg.event {
            result = Some(r);
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let r = result.context("extraction ended without a result")?;
    println!(
        "extraction of `{trait_name}`: {} rollouts x {max_tokens} max new tokens, {} tokens generated",
        r.rollouts, r.generated_tokens
    );
    println!(
        "  wall {wall:.1} s ({:.2} rollouts/s, {:.1} generated tok/s); recommended layer {}",
        r.rollouts as f64 / wall,
        r.generated_tokens as f64 / wall,
        r.vector.and_then(|v| v.recommended_layer).map_or("-".into(), |l| l.to_string())
    );
    Ok(())
}

pub(crate) async fn single_stream(
    c: &mut Client,
    a: &BenchArgs,
    base: &pb::GenerateRequest,
    steered: &pb::GenerateRequest,
    layer: u32,
) -> Result<()> {
    let (mut pu, mut du, mut tu, mut ps, mut ds, mut ts) = (vec![], vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..a.runs {
        let (p, d, t) = bench_once(c, base.clone()).await?;
        pu.push(p);
        du.push(d);
        tu.push(t);
        let (p, d, t) = bench_once(c, steered.clone()).await?;
        ps.push(p);
        ds.push(d);
        ts.push(t);
    }
    let (pu, du, tu, ps, ds, ts) =
        (median(&mut pu), median(&mut du), median(&mut tu), median(&mut ps), median(&mut ds), median(&mut ts));
    println!("{:<12} {:>14} {:>14} {:>10}", "", "prefill tok/s", "decode tok/s", "TTFT ms");
    println!("{:<12} {:>14.1} {:>14.1} {:>10.1}", "unsteered", pu, du, tu * 1e3);
    println!("{:<12} {:>14.1} {:>14.1} {:>10.1}", format!("steered L{layer}"), ps, ds, ts * 1e3);
    println!("steering overhead (decode, median): {:+.1}%", (du / ds - 1.0) * 100.0);
    Ok(())
}

/// Single-stream prefill and decode after a long user message (unsteered, medians of the runs).
async fn long_prompt(c: &mut Client, a: &BenchArgs, base: &pb::GenerateRequest, file: &std::path::Path) -> Result<()> {
    let user = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let req = pb::GenerateRequest {
        prompt: Some(persona_client::chat(&user, Some("You are a creative writer."))),
        ..base.clone()
    };
    let (mut pre, mut dec, mut tokens) = (Vec::new(), Vec::new(), 0);
    for _ in 0..a.runs {
        let out = generate_text(c, req.clone()).await?;
        let s = out.summary.context("no summary")?;
        tokens = s.prompt_tokens;
        pre.push(s.prompt_tokens as f64 / (s.prefill_ms / 1e3));
        dec.push(s.completion_tokens.saturating_sub(1) as f64 / (s.decode_ms / 1e3));
    }
    println!(
        "long prompt {tokens:>5} tokens   prefill {:>7.1} tok/s   decode {:>6.1} tok/s",
        median(&mut pre),
        median(&mut dec)
    );
    Ok(())
}

/// N concurrent streams, each with its own steering vector and question.
pub(crate) async fn concurrent(c: &mut Client, a: &BenchArgs, m: &pb::ModelInfo, layer: u32, n: usize) -> Result<()> {
    const TOPICS: [&str; 8] =
        ["a lighthouse", "a dragon", "the ocean", "a small town", "a robot", "a garden", "the moon", "a train journey"];
    let (mut aggregate, mut decode) = (Vec::new(), Vec::new());
    let (mut ttft, mut itl) = (Vec::new(), Vec::new());
    // The KV cache the engine reserves for the streams at its peak (what it holds is at most
    // that), polled while they run.
    let peak_kv = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let poller = {
        let (mut c, peak_kv, id) = (c.clone(), peak_kv.clone(), m.id.clone());
        tokio::spawn(async move {
            loop {
                if let Ok(s) = c.get_server_status(pb::GetServerStatusRequest {}).await {
                    let kv = s
                        .into_inner()
                        .engines
                        .iter()
                        .filter(|e| e.model == id)
                        .map(|e| e.kv_cache_reserved_bytes)
                        .sum();
                    peak_kv.fetch_max(kv, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        })
    };
    for run in 0..a.runs {
        let t0 = std::time::Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..n {
            let mut v = persona_client::pseudo_random_vector((run * 1000 + i) as u64, m.d_model as usize);
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.iter_mut().for_each(|x| *x /= norm);
            let user = format!("Write a long, detailed story about {}.", TOPICS[i % TOPICS.len()]);
            let req = pb::GenerateRequest {
                model: m.id.clone(),
                prompt: Some(persona_client::chat(&user, Some("You are a creative writer."))),
                sampling: Some(pb::SamplingParams { max_tokens: a.max_tokens, ..Default::default() }),
                steering: vec![persona_client::steer_inline(v, layer, a.coefficient)],
                ..Default::default()
            };
            tasks.spawn(timed_stream(c.clone(), req, t0));
        }
        let (mut tokens, mut decoded) = (0, 0);
        let (mut first_token, mut last_token) = (f64::INFINITY, 0f64);
        for times in tasks.join_all().await {
            let times = times?;
            tokens += times.len();
            decoded += times.len().saturating_sub(1);
            if let (Some(first), Some(last)) = (times.first(), times.last()) {
                ttft.push(*first);
                first_token = first_token.min(*first);
                last_token = last_token.max(*last);
            }
            itl.extend(times.windows(2).map(|w| w[1] - w[0]));
        }
        aggregate.push(tokens as f64 / t0.elapsed().as_secs_f64());
        // Decode phase only: tokens after each stream's first, over the span from the first
        // stream's first token to the last stream's last token.
        decode.push(decoded as f64 / (last_token - first_token));
    }
    poller.abort();
    let status = c.get_server_status(pb::GetServerStatusRequest {}).await?.into_inner();
    let ms = |x: f64| x * 1e3;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "{n:>3} streams  aggregate {:>6.1} tok/s  decode {:>6.1} tok/s   TTFT p50 {:>5.0} ms p99 {:>5.0} ms   ITL p50 {:>5.1} ms p99 {:>5.1} ms   peak RSS {:>4.0} MiB   KV reserved {:>4.0} MiB",
        median(&mut aggregate),
        median(&mut decode),
        ms(percentile(&mut ttft, 0.5)),
        ms(percentile(&mut ttft, 0.99)),
        ms(percentile(&mut itl, 0.5)),
        ms(percentile(&mut itl, 0.99)),
        mib(status.peak_rss_bytes),
        mib(peak_kv.load(std::sync::atomic::Ordering::Relaxed)),
    );
    Ok(())
}
