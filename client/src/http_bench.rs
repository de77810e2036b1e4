//! `persona bench --http URL`: the same concurrent streams through the OpenAI-compatible HTTP
//! API and through gRPC, alternated run by run, so the figures compare the two surfaces of one
//! server under the same load.

use crate::measure::{median, percentile, timed_stream};
use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use persona_client::{Client, pb};

const TOPICS: [&str; 8] =
    ["a lighthouse", "a dragon", "the ocean", "a small town", "a robot", "a garden", "the moon", "a train journey"];
const SYSTEM: &str = "You are a creative writer.";

type Http = hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// A unit vector per stream, as `persona bench --concurrency` steers with.
fn vector(run: usize, i: usize, d: usize) -> Vec<f32> {
    let mut v = persona_client::pseudo_random_vector((run * 1000 + i) as u64, d);
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

/// Token arrival times (seconds since `t0`) of one streamed chat completion.
async fn http_stream(client: Http, url: String, body: serde_json::Value, t0: std::time::Instant) -> Result<Vec<f64>> {
    let req = http::Request::post(url)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))?;
    let res = client.request(req).await.context("HTTP request")?;
    if !res.status().is_success() {
        let status = res.status();
        let text = res.into_body().collect().await?.to_bytes();
        bail!("HTTP {status}: {}", String::from_utf8_lossy(&text));
    }
    let mut body = res.into_body();
    let (mut buf, mut times) = (String::new(), Vec::new());
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else { continue };
        buf.push_str(&String::from_utf8_lossy(&data));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let Some(json) = event.trim().strip_prefix("data: ") else { continue };
            if json == "[DONE]" {
                return Ok(times);
            }
            let chunk: serde_json::Value = serde_json::from_str(json)?;
            if let Some(e) = chunk.get("error") {
                bail!("stream failed: {e}");
            }
            // One chunk per generated token; the role chunk and the finish chunk carry none.
            if chunk["choices"][0]["logprobs"]["content"].is_array() {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
    }
    bail!("the stream ended without [DONE]")
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn http_vs_grpc(
    c: &mut Client,
    base_url: &str,
    m: &pb::ModelInfo,
    layer: u32,
    coefficient: f32,
    max_tokens: u32,
    runs: usize,
    n: usize,
) -> Result<()> {
    let http: Http =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Full<Bytes>>();
    let url = format!("{}/v1/chat/completions", base_url.trim_end_matches('/'));
    // Per surface: aggregate tok/s and TTFTs over the runs.
    let mut figures = [(Vec::new(), Vec::new()), (Vec::new(), Vec::new())];
    for run in 0..runs {
        for (surface, (aggregate, ttft)) in figures.iter_mut().enumerate() {
            let t0 = std::time::Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..n {
                let v = vector(run, i, m.d_model as usize);
                let user = format!("Write a long, detailed story about {}.", TOPICS[i % TOPICS.len()]);
                if surface == 0 {
                    let req = pb::GenerateRequest {
                        model: m.id.clone(),
                        prompt: Some(persona_client::chat(&user, Some(SYSTEM))),
                        sampling: Some(pb::SamplingParams { max_tokens, ..Default::default() }),
                        steering: vec![persona_client::steer_inline(v, layer, coefficient)],
                        // The HTTP side asks for logprobs to count tokens; the same work here.
                        logprobs: true,
                        ..Default::default()
                    };
                    tasks.spawn(timed_stream(c.clone(), req, t0));
                } else {
                    let body = serde_json::json!({
                        "model": m.id,
                        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
                        "max_tokens": max_tokens,
                        "temperature": 0,
                        "logprobs": true,
                        "stream": true,
                        "steering": [{"values": v, "layer": layer, "coefficient": coefficient, "positions": "all"}],
                    });
                    tasks.spawn(http_stream(http.clone(), url.clone(), body, t0));
                }
            }
            let mut tokens = 0;
            for times in tasks.join_all().await {
                let times = times?;
                tokens += times.len();
                ttft.extend(times.first().copied());
            }
            aggregate.push(tokens as f64 / t0.elapsed().as_secs_f64());
        }
    }
    let [(mut g_agg, mut g_ttft), (mut h_agg, mut h_ttft)] = figures;
    let (g, h) = (median(&mut g_agg), median(&mut h_agg));
    println!(
        "{n:>3} streams  gRPC {g:>6.1} tok/s TTFT p50 {:>5.0} ms   HTTP {h:>6.1} tok/s TTFT p50 {:>5.0} ms   HTTP/gRPC {:.3}x",
        percentile(&mut g_ttft, 0.5) * 1e3,
        percentile(&mut h_ttft, 0.5) * 1e3,
        h / g,
    );
    Ok(())
}
