//! Fidelity of the served kernels to the reference weights: over a corpus of documents, the KL
//! divergence of each engine's next-token distribution from the f32 model's (the GGUF's own
//! weights dequantized, no activation quantization), its 99th percentile, and top-1 agreement;
//! then, over everyday chat prompts, how much of the f32 model's greedy answer each engine
//! reproduces before its first different token.
//!
//! `scripts/bench-fidelity` runs this with llama.cpp as a second engine: `--worker CMD` starts a
//! process that reads token windows on stdin (`u32` count, then the `u32` ids, little-endian; a
//! count of 0 ends) and answers each with `count × vocab` raw `f32` logits on stdout.
//!
//! ```text
//! cargo run --release -p persona-server --example fidelity -- --corpus scripts/data/fidelity-corpus.jsonl
//! ```

use anyhow::{Context, Result, bail};
use candle_core::Device;
use persona_server::model::arch::llama::{ForwardContext, KvCache, RowInput};
use persona_server::model::chat::Message;
use persona_server::model::source::{Packaged, ensure_packaged, local_files};
use persona_server::model::weights::{ComputeDtype, Precision, Requantize};
use persona_server::model::{LoadOptions, LoadedModel};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

struct Args {
    corpus: PathBuf,
    prompts: PathBuf,
    answer_tokens: usize,
    window: usize,
    worker: Option<String>,
    limit: usize,
    /// Also measure the GPU's code path (run here on the CPU).
    gpu_path: bool,
    /// A packaged model (`embedded:NAME`); the embedded SmolLM2 by default.
    model: String,
    /// Greedy prompts as plain text (`Question: …\nAnswer:`), for base models without a chat format.
    plain_prompts: bool,
}

fn args() -> Result<Args> {
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/data");
    let mut a = Args {
        corpus: data.join("fidelity-corpus.jsonl"),
        prompts: data.join("fidelity-prompts.txt"),
        answer_tokens: 48,
        window: 512,
        worker: None,
        limit: usize::MAX,
        gpu_path: false,
        model: persona_server::model::source::EMBEDDED_ID.to_string(),
        plain_prompts: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--corpus" => a.corpus = value()?.into(),
            "--prompts" => a.prompts = value()?.into(),
            "--answer-tokens" => a.answer_tokens = value()?.parse()?,
            "--window" => a.window = value()?.parse()?,
            "--worker" => a.worker = Some(value()?),
            "--limit" => a.limit = value()?.parse()?,
            "--gpu-path" => a.gpu_path = true,
            "--model" => a.model = value()?,
            "--plain-prompts" => a.plain_prompts = true,
            // `cargo bench`/`cargo test` pass their own flags to harness-less targets.
            "--bench" | "--test" => {}
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(a)
}

/// Per-position comparison of one engine against the reference, and how much of the
/// reference's greedy answers it reproduces.
#[derive(Default)]
struct Tally {
    kl: Vec<f64>,
    same_top: usize,
    /// Per answer: the share of its tokens before the engine's first different greedy pick.
    answer_share: Vec<f64>,
}

impl Tally {
    fn add(&mut self, reference: &[f32], logits: &[f32]) {
        self.kl.push(persona_server::model::sampling::kl_divergence(reference, logits));
        let argmax = persona_server::model::sampling::argmax;
        self.same_top += usize::from(argmax(reference) == argmax(logits));
    }

    /// Greedy along the reference's answer: the engine picks the same token at every position
    /// up to its first divergence, so counting matches until the first miss gives the length of
    /// the answer it would have reproduced.
    fn add_answer(&mut self, logits: &[f32], vocab: usize, prompt_len: usize, answer: &[u32]) {
        let argmax = persona_server::model::sampling::argmax;
        let p = prompt_len - 1;
        let same = answer.iter().enumerate().take_while(|&(j, &t)| argmax(&logits[(p + j) * vocab..][..vocab]) == t);
        self.answer_share.push(same.count() as f64 / answer.len().max(1) as f64);
    }

    fn answers_line(&self, name: &str) -> String {
        let n = self.answer_share.len().max(1) as f64;
        let mean = 100.0 * self.answer_share.iter().sum::<f64>() / n;
        let whole = self.answer_share.iter().filter(|&&s| s >= 1.0).count();
        format!(
            "{name:<46} reproduces {mean:>5.1}% of each answer on average, {whole} of {} whole",
            self.answer_share.len()
        )
    }

    fn line(&self, name: &str) -> String {
        let n = self.kl.len().max(1);
        let mean = self.kl.iter().sum::<f64>() / n as f64;
        let mut sorted = self.kl.clone();
        sorted.sort_by(f64::total_cmp);
        let p99 = sorted.get((sorted.len() * 99 / 100).min(sorted.len().saturating_sub(1))).copied().unwrap_or(0.0);
        let top1 = 100.0 * self.same_top as f64 / n as f64;
        format!("{name:<46} mean KL {mean:>9.2e}   p99 KL {p99:>9.2e}   top-1 agreement {top1:>6.2}%")
    }
}

/// A llama.cpp (or any other) engine behind the worker protocol.
struct Worker {
    child: Child,
    vocab: usize,
}

impl Worker {
    fn start(cmd: &str, vocab: usize) -> Result<Self> {
        let child = Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting `{cmd}`"))?;
        Ok(Self { child, vocab })
    }

    fn logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let stdin = self.child.stdin.as_mut().context("worker stdin")?;
        let mut msg = (tokens.len() as u32).to_le_bytes().to_vec();
        tokens.iter().for_each(|t| msg.extend_from_slice(&t.to_le_bytes()));
        stdin.write_all(&msg)?;
        stdin.flush()?;
        let mut bytes = vec![0u8; tokens.len() * self.vocab * 4];
        self.child.stdout.as_mut().context("worker stdout")?.read_exact(&mut bytes).context("reading worker logits")?;
        Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }

    fn finish(mut self) -> Result<()> {
        if let Some(mut stdin) = self.child.stdin.take() {
            stdin.write_all(&0u32.to_le_bytes())?;
        }
        let status = self.child.wait()?;
        if !status.success() {
            bail!("worker exited with {status}");
        }
        Ok(())
    }
}

/// The reference's greedy answer (up to `n` tokens, stopping at end of sequence).
fn greedy(m: &LoadedModel, prompt: &[u32], n: usize) -> Result<Vec<u32>> {
    let mut cache = KvCache::new(m.config());
    let mut next = prompt.to_vec();
    let mut answer = Vec::new();
    while answer.len() < n {
        let rows = vec![RowInput { tokens: &next, cache: &mut cache, steering: None, capture: false, logits: 1 }];
        let logits: Vec<f32> =
            m.model.forward(ForwardContext { rows })?.logits.context("no logits")?.flatten_all()?.to_vec1()?;
        let t = persona_server::model::sampling::argmax(&logits);
        answer.push(t);
        if m.tokenizer.is_eos(t) {
            break;
        }
        next = vec![t];
    }
    Ok(answer)
}

/// Logits for every position of `tokens`, prefilled in one pass from an empty cache.
fn all_logits(m: &LoadedModel, tokens: &[u32]) -> Result<Vec<f32>> {
    let mut cache = KvCache::new(m.config());
    let rows = vec![RowInput { tokens, cache: &mut cache, steering: None, capture: false, logits: tokens.len() }];
    let out = m.model.forward(ForwardContext { rows })?;
    Ok(out.logits.context("no logits")?.flatten_all()?.to_vec1()?)
}

fn main() -> Result<()> {
    // SAFETY: no other thread exists yet.
    unsafe { persona_server::set_cpu_threads(0) };
    let args = args()?;
    let dir = persona_server::model::default_model_dir();
    let gguf = ensure_packaged(Packaged::named(&args.model)?, &dir, true)?;
    let files = local_files(&gguf)?;
    let load = |requantize, precision, dtype| {
        let opts = LoadOptions { requantize, precision, dtype, max_context: Some(args.window.max(512)) };
        LoadedModel::from_files("fidelity", &files, &Device::Cpu, &opts)
    };
    let reference = load(Requantize::F32, Precision::default(), ComputeDtype::F32)?;
    // The served CPU default first, then the other activation precisions of the same kernels,
    // then what a GPU runs (dense weights in f16 or bf16, candle ops), here on the CPU.
    let mut engines = Vec::new();
    for p in [Precision::Balanced, Precision::Fast, Precision::Exact] {
        let served = if p == Precision::default() { ", served CPU default" } else { "" };
        let name = format!("persona-steer ({}{served})", format!("{p:?}").to_lowercase());
        engines.push((name, load(Requantize::Int8, p, ComputeDtype::F32)?));
    }
    if args.gpu_path {
        for (dtype, name) in [(ComputeDtype::F16, "GPU path, f16, GPU default"), (ComputeDtype::Bf16, "GPU path, bf16")]
        {
            engines.push((format!("persona-steer ({name})"), load(Requantize::Dense, Precision::default(), dtype)?));
        }
    }
    let vocab = reference.config().vocab_size;
    println!("model: {}  served weights: {}", gguf.display(), engines[0].1.weights);

    let mut docs = Vec::new();
    let text = std::fs::read_to_string(&args.corpus).with_context(|| format!("reading {}", args.corpus.display()))?;
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("corpus line {}", i + 1))?;
        let doc = v["text"].as_str().with_context(|| format!("corpus line {} has no `text`", i + 1))?;
        let mut ids = reference.tokenizer.encode_document(doc)?;
        ids.truncate(args.window);
        if ids.len() >= 2 {
            docs.push(ids);
        }
    }
    docs.truncate(args.limit);
    let total: usize = docs.iter().map(|d| d.len() - 1).sum();
    println!("corpus: {} ({} documents, {total} predicted tokens)", args.corpus.display(), docs.len());

    let mut worker = args.worker.as_deref().map(|cmd| Worker::start(cmd, vocab)).transpose()?;
    let mut ours: Vec<Tally> = engines.iter().map(|_| Tally::default()).collect();
    let mut theirs = Tally::default();
    let mut stderr = std::io::stderr().lock();
    for (i, doc) in docs.iter().enumerate() {
        write!(stderr, "\rdocument {}/{}", i + 1, docs.len())?;
        stderr.flush()?;
        let want = all_logits(&reference, doc)?;
        let got = engines.iter().map(|(_, m)| all_logits(m, doc)).collect::<Result<Vec<_>>>()?;
        let other = worker.as_mut().map(|w| w.logits(doc)).transpose()?;
        // Position p's logits predict token p + 1; the last position predicts nothing in the text.
        for p in 0..doc.len() - 1 {
            let row = |v: &[f32]| v[p * vocab..(p + 1) * vocab].to_vec();
            for (tally, g) in ours.iter_mut().zip(&got) {
                tally.add(&row(&want), &row(g));
            }
            if let Some(o) = &other {
                theirs.add(&row(&want), &row(o));
            }
        }
    }
    writeln!(stderr)?;

    // Greedy answers to everyday chat prompts: how much of the reference's answer each engine
    // reproduces before its first different pick.
    let prompts =
        std::fs::read_to_string(&args.prompts).with_context(|| format!("reading {}", args.prompts.display()))?;
    let prompts: Vec<&str> = prompts.lines().filter(|l| !l.trim().is_empty()).collect();
    for (i, prompt) in prompts.iter().enumerate() {
        write!(stderr, "\rprompt {}/{}", i + 1, prompts.len())?;
        stderr.flush()?;
        let ids = if args.plain_prompts {
            reference.tokenizer.encode_document(&format!("Question: {prompt}\nAnswer:"))?
        } else {
            reference.tokenizer.encode(&reference.template.render(&[Message::new("user", *prompt)])?)?
        };
        let answer = greedy(&reference, &ids, args.answer_tokens)?;
        let seq: Vec<u32> = ids.iter().chain(&answer).copied().collect();
        for (tally, (_, m)) in ours.iter_mut().zip(&engines) {
            tally.add_answer(&all_logits(m, &seq)?, vocab, ids.len(), &answer);
        }
        if let Some(w) = worker.as_mut() {
            theirs.add_answer(&w.logits(&seq)?, vocab, ids.len(), &answer);
        }
    }
    writeln!(stderr)?;
    println!("\nnext-token distributions over the corpus, against the f32 reference:");
    for (tally, (name, _)) in ours.iter().zip(&engines) {
        println!("{}", tally.line(name));
    }
    if worker.is_some() {
        println!("{}", theirs.line("llama.cpp"));
    }
    println!(
        "\ngreedy answers ({} tokens) to {} chat prompts, against the f32 reference's:",
        args.answer_tokens,
        prompts.len()
    );
    for (tally, (name, _)) in ours.iter().zip(&engines) {
        println!("{}", tally.answers_line(name));
    }
    if let Some(w) = worker {
        println!("{}", theirs.answers_line("llama.cpp"));
        w.finish()?;
    }
    Ok(())
}
