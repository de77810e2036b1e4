//! Qwen2.5-Coder-1.5B-Instruct, the real-scale model (the packaged Q4_K_M GGUF, fetched like the
//! embedded one): its chat template, tokenizer and greedy tokens against llama.cpp's on the same
//! file, its K-quant weights kept at their own size, and the served kernels against the file's
//! own weights in f32.

mod common;

use persona_server::model::arch::llama::{ForwardContext, KvCache, RowInput};
use persona_server::model::chat::Message;
use persona_server::model::sampling::{argmax, kl_divergence};
use persona_server::model::weights::{Precision, Requantize};
use persona_server::model::{LoadOptions, LoadedModel};
use std::sync::{Arc, OnceLock};

/// The served configuration, shared by the tests of this binary.
fn served() -> Arc<LoadedModel> {
    static M: OnceLock<Arc<LoadedModel>> = OnceLock::new();
    M.get_or_init(|| Arc::new(common::load_qwen(&LoadOptions::new(Requantize::Auto, 4096)))).clone()
}

/// Next-token logits after feeding `tokens` to `cache`.
fn step(m: &LoadedModel, cache: &mut KvCache, tokens: &[u32]) -> Vec<f32> {
    let rows = vec![RowInput { tokens, cache, steering: None, capture: false, logits: 1 }];
    m.model.forward(ForwardContext { rows }).unwrap().logits.unwrap().squeeze(0).unwrap().to_vec1().unwrap()
}

/// Up to `n` greedy tokens, stopping after an end-of-turn token.
fn greedy(m: &LoadedModel, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut cache = KvCache::new(m.config());
    let mut next = prompt.to_vec();
    let mut out = Vec::new();
    while out.len() < n {
        let t = argmax(&step(m, &mut cache, &next));
        out.push(t);
        if m.tokenizer.is_eos(t) {
            break;
        }
        next = vec![t];
    }
    out
}

const QWEN_SYSTEM: &str = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";

/// A chat prompt: its system prompt (`None`: the template's own default), the user's turn, and
/// what llama.cpp (llama-cpp-python 0.3.36, `special` tokens parsed, no BOS, 2 threads) makes of
/// the same file: the prompt's token ids and its greedy continuation (16 tokens or up to
/// `<|im_end|>`). Every step of these continuations has a margin of at least 0.07 logits
/// between llama.cpp's first and second choice.
struct Case {
    system: Option<&'static str>,
    user: &'static str,
    ids: &'static [u32],
    greedy: &'static [u32],
}

const CASES: [Case; 4] = [
    Case {
        system: None,
        user: "What is the capital of France?",
        ids: &[
            151644, 8948, 198, 2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817, 13, 1446, 525, 264, 10950, 17847,
            13, 151645, 198, 151644, 872, 198, 3838, 374, 279, 6722, 315, 9625, 30, 151645, 198, 151644, 77091, 198,
        ],
        greedy: &[785, 6722, 315, 9625, 374, 12095, 13, 151645],
    },
    Case {
        system: None,
        user: "Explain recursion in one sentence.",
        ids: &[
            151644, 8948, 198, 2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817, 13, 1446, 525, 264, 10950, 17847,
            13, 151645, 198, 151644, 872, 198, 840, 20772, 50262, 304, 825, 11652, 13, 151645, 198, 151644, 77091, 198,
        ],
        greedy: &[3820, 34280, 374, 264, 15473, 14762, 1380, 264, 729, 6738, 5086, 311, 11625, 264, 3491, 13],
    },
    Case {
        system: Some("You are an evil assistant."),
        user: "How should I treat my neighbours?",
        ids: &[
            151644, 8948, 198, 2610, 525, 458, 13962, 17847, 13, 151645, 198, 151644, 872, 198, 4340, 1265, 358, 4228,
            847, 35856, 30, 151645, 198, 151644, 77091, 198,
        ],
        greedy: &[2121, 458, 15235, 4128, 1614, 11, 358, 4157, 3410, 894, 9462, 389, 1246, 311, 4228, 697],
    },
    Case {
        system: None,
        user: "naïve café, 12345 — ok?  Two  spaces\tand a tab. 漢字 🙂",
        ids: &[
            151644, 8948, 198, 2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817, 13, 1446, 525, 264, 10950, 17847,
            13, 151645, 198, 151644, 872, 198, 3376, 37572, 586, 51950, 11, 220, 16, 17, 18, 19, 20, 1959, 5394, 30,
            220, 9043, 220, 12621, 52477, 264, 5651, 13, 6567, 120, 95, 18600, 27484, 151645, 198, 151644, 77091, 198,
        ],
        greedy: &[99692, 3837, 102570, 6313, 151645],
    },
];

impl Case {
    fn messages(&self) -> Vec<Message> {
        let mut m: Vec<Message> = self.system.map(|s| Message::new("system", s)).into_iter().collect();
        m.push(Message::new("user", self.user));
        m
    }

    /// The ChatML text Qwen's template renders (with its default system prompt when none is given).
    fn chatml(&self) -> String {
        let system = self.system.unwrap_or(QWEN_SYSTEM);
        format!(
            "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
            self.user
        )
    }
}

/// The file's own template renders the prompts llama.cpp was given, and our tokenizer turns them
/// into llama.cpp's ids (qwen2 pre-tokenizer: digits one by one, runs of spaces, byte-level
/// pieces for CJK and emoji, special tokens whole).
#[test]
fn chat_prompts_tokenize_as_llama_cpp_does() {
    let m = served();
    assert_eq!(m.config().architecture, "qwen2");
    assert_eq!(
        (m.config().n_layers, m.config().hidden_size, m.config().n_heads, m.config().n_kv_heads),
        (28, 1536, 12, 2)
    );
    assert_eq!(m.config().vocab_size, 151_936);
    assert!(m.native_template, "the GGUF carries its chat template");
    assert!(!m.tokenizer.adds_bos());
    for case in &CASES {
        let text = m.template.render(&case.messages()).unwrap();
        assert_eq!(text, case.chatml(), "{:?}", case.user);
        assert_eq!(m.tokenizer.encode(&text).unwrap(), case.ids, "{:?}", case.user);
    }
    assert!(m.tokenizer.is_eos(151_645), "<|im_end|> ends a turn");
}

/// Greedy decoding with the served kernels gives llama.cpp's tokens.
#[test]
fn greedy_tokens_match_llama_cpp() {
    let m = served();
    for case in &CASES {
        let got = greedy(&m, case.ids, case.greedy.len());
        assert_eq!(got, case.greedy, "{:?}: ours {:?}", case.user, m.tokenizer.decode(&got).unwrap());
    }
}

/// Every weight keeps its stored blocks (Q4_K and Q6_K, no int8 re-blocking), and what the
/// model holds is about the file's size.
#[test]
fn k_quant_weights_stay_at_their_own_size() {
    let m = served();
    assert!(m.weights.starts_with("q4_k x 168, q6_k x 29"), "{}", m.weights);
    assert!(!m.weights.contains("not exact"), "{}", m.weights);
    let file = std::fs::metadata(common::qwen_gguf()).unwrap().len() as f64;
    let held = m.model.weight_bytes() as f64;
    assert!(held <= 1.15 * file, "{held} bytes held for a {file}-byte file");
}

/// With `exact` precision (two activation levels everywhere), the served kernels reproduce the
/// file's weights in f32 to rounding over a chat prompt and its answer.
#[test]
fn exact_precision_matches_the_f32_weights() {
    let exact =
        common::load_qwen(&LoadOptions { precision: Precision::Exact, ..LoadOptions::new(Requantize::Auto, 1024) });
    let reference = common::load_qwen(&LoadOptions::new(Requantize::F32, 1024));
    let tokens: Vec<u32> = [CASES[1].ids, CASES[1].greedy].concat();
    let all = |m: &LoadedModel| -> Vec<Vec<f32>> {
        let mut cache = KvCache::new(m.config());
        let rows =
            vec![RowInput { tokens: &tokens, cache: &mut cache, steering: None, capture: false, logits: tokens.len() }];
        m.model.forward(ForwardContext { rows }).unwrap().logits.unwrap().to_vec2().unwrap()
    };
    let (got, want) = (all(&exact), all(&reference));
    let kl = want.iter().zip(&got).map(|(p, q)| kl_divergence(p, q)).sum::<f64>() / want.len() as f64;
    eprintln!("Qwen2.5 exact precision vs f32 weights over {} positions: mean KL {kl:.2e}", tokens.len());
    assert!(kl < 1e-6, "mean KL {kl}");
    assert!(want.iter().zip(&got).all(|(w, g)| argmax(w) == argmax(g)));
}
