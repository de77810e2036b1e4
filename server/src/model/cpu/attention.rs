//! Host (CPU) attention for packed rows: rotary embedding, key/value cache append and causal
//! attention over each row's cache in plain loops, spread over candle's worker pool by
//! (row, kv head). On the CPU this replaces a dozen small tensor ops per row and layer, whose
//! fixed costs dominated batched decoding; devices keep the tensor path.

/// One layer's keys and values for one sequence: `[n_kv_heads, capacity, head_dim]` each.
#[derive(Default)]
pub struct HostKv {
    k: Vec<f32>,
    v: Vec<f32>,
    cap: usize,
}

/// Geometry shared by every call of one model's layer.
#[derive(Clone, Copy)]
pub struct Heads {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Keys a token attends to at most, its own included (a sliding-window layer); `None`:
    /// every earlier position.
    pub window: Option<usize>,
}

impl Heads {
    /// The first position a token at `pos` sees.
    fn first_visible(&self, pos: usize) -> usize {
        match self.window {
            Some(w) => (pos + 1).saturating_sub(w),
            None => 0,
        }
    }

    fn q_width(&self) -> usize {
        self.n_heads * self.head_dim
    }

    fn kv_width(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Width of one token's packed q|k|v row.
    pub fn qkv_width(&self) -> usize {
        self.q_width() + 2 * self.kv_width()
    }
}

impl HostKv {
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Appends `t` tokens' keys and values (rows of the packed q|k|v layout) at position
    /// `len`, growing to `cap` slots when needed.
    fn append(&mut self, h: &Heads, qkv: &[f32], t: usize, len: usize, cap: usize) {
        let hd = h.head_dim;
        if cap > self.cap {
            for buf in [&mut self.k, &mut self.v] {
                let mut grown = vec![0f32; h.n_kv_heads * cap * hd];
                for head in 0..h.n_kv_heads {
                    let src = &buf[head * self.cap * hd..][..len * hd];
                    grown[head * cap * hd..][..len * hd].copy_from_slice(src);
                }
                *buf = grown;
            }
            self.cap = cap;
        }
        let (qw, kvw) = (h.q_width(), h.kv_width());
        for j in 0..t {
            let row = &qkv[j * h.qkv_width()..][..h.qkv_width()];
            for head in 0..h.n_kv_heads {
                let dst = (head * self.cap + len + j) * hd;
                self.k[dst..dst + hd].copy_from_slice(&row[qw + head * hd..][..hd]);
                self.v[dst..dst + hd].copy_from_slice(&row[qw + kvw + head * hd..][..hd]);
            }
        }
    }
}

/// Rotates the q and k parts of packed q|k|v rows in place. `cos`/`sin` hold one row of
/// `head_dim / 2` values per token. Interleaved pairs are (2i, 2i+1) (GGUF llama layout);
/// otherwise (i, i + head_dim/2) (Hugging Face layout).
pub fn rope(h: &Heads, qkv: &mut [f32], cos: &[f32], sin: &[f32], interleaved: bool) {
    let (hd, half) = (h.head_dim, h.head_dim / 2);
    for ((row, c), s) in qkv.chunks_exact_mut(h.qkv_width()).zip(cos.chunks_exact(half)).zip(sin.chunks_exact(half)) {
        for head in row[..h.q_width() + h.kv_width()].chunks_exact_mut(hd) {
            for i in 0..half {
                let (a, b) = if interleaved { (2 * i, 2 * i + 1) } else { (i, i + half) };
                let (x, y) = (head[a], head[b]);
                head[a] = x * c[i] - y * s[i];
                head[b] = x * s[i] + y * c[i];
            }
        }
    }
}

/// One row of a packed pass, as attention sees it.
pub(crate) struct RowSpan<'a> {
    /// Offset of the row's first token in the packed batch, its token count, and the
    /// position of its first new token (= tokens already cached).
    pub off: usize,
    pub t: usize,
    pub start: usize,
    pub kv: &'a HostKv,
}

/// Appends a row's new keys/values to its cache for one layer.
pub fn append(kv: &mut HostKv, h: &Heads, qkv: &[f32], span_off: usize, t: usize, len: usize, cap: usize) {
    let w = h.qkv_width();
    kv.append(h, &qkv[span_off * w..(span_off + t) * w], t, len, cap);
}

/// Keys per chunk of the one order every token's attention is computed in: chunks aligned to
/// multiples of this absolute position, each a partial softmax (its max, its sum, its weighted
/// values), merged in position order. Work can then be split over chunks (one long decode row)
/// or over query tiles (a prefill) without changing a single result, whatever rows share the
/// batch and however it is spread over the cores.
const KEY_CHUNK: usize = 64;
/// Query tokens per task of a prefill: they share each chunk of keys and values while it is in
/// cache.
const QUERY_TILE: usize = 16;
/// Chunks a one-token row's history must span before its attention is split over them: on a
/// short history the merge pass costs more than the idle core would have given (with every
/// row split, SmolLM2's single-stream decode after a 170-token prompt measured 183 tok/s
/// against 222 before the split existed, in one run each on the same machine).
const MIN_SPLIT_CHUNKS: usize = 8;

/// Causal attention for all rows: returns `[n_tokens, n_heads * head_dim]`.
///
/// Work is split three ways so that every core has some, whatever the batch: a prefill row
/// into tiles of [`QUERY_TILE`] tokens per kv head (a single long prompt on a model with one or
/// two kv heads would otherwise run on one or two cores), a one-token row with a long history
/// into its chunks of keys per kv head (whose partial sums are merged afterwards), and short
/// rows whole.
///
/// The kernels below read through raw pointers; this is the safe boundary, so it checks what
/// they rely on: every row's tokens lie in `qkv`, the rows' token ranges do not overlap (each
/// task writes its own rows' outputs), and every row's cache holds the positions it attends to.
pub(crate) fn attend(h: &Heads, qkv: &[f32], rows: &[RowSpan<'_>], n_tokens: usize) -> Vec<f32> {
    // Splitting a one-token row over its key chunks costs a second pass over the pool (the
    // merge); it pays only when the rows alone would leave cores idle and the row's history is
    // long. Either way every output is the same bit for bit (one order of chunks).
    let whole_items: usize = rows.iter().map(|r| r.t.div_ceil(QUERY_TILE) * h.n_kv_heads).sum();
    let split_from = (whole_items < 2 * candle_core::utils::get_num_threads()).then_some(MIN_SPLIT_CHUNKS);
    attend_split(h, qkv, rows, n_tokens, split_from)
}

/// [`attend`], with one-token rows whose history spans at least `split_from` chunks split over
/// them (`None`: none split).
fn attend_split(h: &Heads, qkv: &[f32], rows: &[RowSpan<'_>], n_tokens: usize, split_from: Option<usize>) -> Vec<f32> {
    assert!(qkv.len() >= n_tokens * h.qkv_width(), "attend: qkv holds fewer than {n_tokens} tokens");
    assert!(h.n_kv_heads > 0 && h.n_heads.is_multiple_of(h.n_kv_heads), "attend: heads must group evenly");
    let mut next_free = 0;
    for (i, row) in rows.iter().enumerate() {
        assert!(
            row.off >= next_free && row.off + row.t <= n_tokens,
            "attend: row {i} span out of bounds or overlapping"
        );
        assert!(row.start + row.t <= row.kv.cap, "attend: row {i} attends past its cache capacity");
        let cache_floats = h.n_kv_heads * row.kv.cap * h.head_dim;
        assert!(row.kv.k.len() >= cache_floats && row.kv.v.len() >= cache_floats, "attend: row {i} cache is short");
        next_free = row.off + row.t;
    }
    let mut out = vec![0f32; n_tokens * h.q_width()];
    let group = h.n_heads / h.n_kv_heads;
    let partial_width = group * (h.head_dim + 2);
    // The work items, and for split rows the slots of their chunks' partial results.
    let mut items = Vec::new();
    let mut splits = Vec::new();
    let mut slots = 0;
    for (r, row) in rows.iter().enumerate() {
        let pos = row.start + row.t - 1;
        let chunks = chunks_of(h, pos);
        if row.t == 1 && chunks.len() > 1 && split_from.is_some_and(|n| chunks.len() >= n) {
            for kv_head in 0..h.n_kv_heads {
                splits.push(Split { row: r, kv_head, first_slot: slots, chunks: chunks.clone() });
                items.extend(chunks.clone().map(|c| Item::Chunk {
                    row: r,
                    kv_head,
                    chunk: c,
                    slot: slots + c - chunks.start,
                }));
                slots += chunks.len();
            }
        } else {
            // Latest tiles first: they attend to the most keys, and the pool hands out items in
            // order, so the long ones start early and the short ones fill in.
            for j0 in (0..row.t).step_by(QUERY_TILE).rev() {
                let j1 = (j0 + QUERY_TILE).min(row.t);
                items.extend((0..h.n_kv_heads).map(|kv_head| Item::Tile { row: r, kv_head, tokens: j0..j1 }));
            }
        }
    }
    let mut partials = vec![0f32; slots * partial_width];
    let (out_ptr, partial_ptr) = (super::SendPtr(out.as_mut_ptr()), super::SendPtr(partials.as_mut_ptr()));
    candle_core::utils::barrier_pool().execute_chunked(items.len(), |range| {
        let (out_ptr, partial_ptr) = (&out_ptr, &partial_ptr);
        let mut scratch = Scratch::new(h);
        for item in &items[range] {
            match item {
                Item::Tile { row, kv_head, tokens } => {
                    // SAFETY: this (row, kv head, tokens) owns these outputs; in bounds as
                    // checked above.
                    unsafe { tile(h, qkv, &rows[*row], *kv_head, tokens.clone(), &mut scratch, out_ptr.0) }
                }
                Item::Chunk { row, kv_head, chunk, slot } => {
                    let row = &rows[*row];
                    let pos = row.start;
                    let keys = h.first_visible(pos).max(chunk * KEY_CHUNK)..(pos + 1).min((chunk + 1) * KEY_CHUNK);
                    let q = &qkv[row.off * h.qkv_width() + kv_head * group * h.head_dim..][..group * h.head_dim];
                    // SAFETY: each slot belongs to one item; slots * partial_width floats.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(partial_ptr.0.add(slot * partial_width), partial_width)
                    };
                    partial(h, q, row.kv, *kv_head, keys, &mut scratch.scores, dst);
                }
            }
        }
    });
    if !splits.is_empty() {
        let (out_ptr, partials) = (&out_ptr, &partials);
        candle_core::utils::barrier_pool().execute_chunked(splits.len(), |range| {
            let mut state = State::new(group, h.head_dim);
            for split in &splits[range] {
                state.reset();
                for slot in split.first_slot..split.first_slot + split.chunks.len() {
                    state.merge(&partials[slot * partial_width..][..partial_width]);
                }
                let token = rows[split.row].off;
                // SAFETY: (token, this kv head's query heads) is written by this split only.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(
                        out_ptr.0.add(token * h.q_width() + split.kv_head * group * h.head_dim),
                        group * h.head_dim,
                    )
                };
                state.finish(dst);
            }
        });
    }
    out
}

/// A unit of attention work.
enum Item {
    /// Tokens `tokens` of a row (indices within the row) for one kv head's query heads.
    Tile { row: usize, kv_head: usize, tokens: std::ops::Range<usize> },
    /// One chunk of keys of a one-token row, its partial result into `slot`.
    Chunk { row: usize, kv_head: usize, chunk: usize, slot: usize },
}

/// A one-token row whose chunks run as separate items: where their partials are.
struct Split {
    row: usize,
    kv_head: usize,
    first_slot: usize,
    chunks: std::ops::Range<usize>,
}

/// The chunks a token at `pos` attends over.
fn chunks_of(h: &Heads, pos: usize) -> std::ops::Range<usize> {
    h.first_visible(pos) / KEY_CHUNK..pos / KEY_CHUNK + 1
}

/// One task's buffers.
struct Scratch {
    scores: Vec<f32>,
    partial: Vec<f32>,
    states: Vec<State>,
}

impl Scratch {
    fn new(h: &Heads) -> Self {
        let group = h.n_heads / h.n_kv_heads;
        Self {
            scores: vec![0f32; group * KEY_CHUNK],
            partial: vec![0f32; group * (h.head_dim + 2)],
            // Grown to a tile's tokens on first use: a decode step's tasks need one.
            states: Vec::new(),
        }
    }
}

/// A token's attention so far, per query head of a group: the largest score seen, the sum of
/// `e^(score − max)` and the values weighted by it.
struct State {
    max: Vec<f32>,
    sum: Vec<f32>,
    acc: Vec<f32>,
    head_dim: usize,
}

impl State {
    fn new(group: usize, head_dim: usize) -> Self {
        Self { max: vec![f32::NEG_INFINITY; group], sum: vec![0.0; group], acc: vec![0.0; group * head_dim], head_dim }
    }

    fn reset(&mut self) {
        self.max.fill(f32::NEG_INFINITY);
        self.sum.fill(0.0);
        self.acc.fill(0.0);
    }

    /// Takes in the next chunk's partial result (`[max; group] ++ [sum; group] ++ [values;
    /// group·head_dim]`, see [`partial`]).
    fn merge(&mut self, p: &[f32]) {
        let group = self.max.len();
        let (pmax, rest) = p.split_at(group);
        let (psum, pacc) = rest.split_at(group);
        for g in 0..group {
            let max = self.max[g].max(pmax[g]);
            let (old, new) = ((self.max[g] - max).exp(), (pmax[g] - max).exp());
            self.max[g] = max;
            self.sum[g] = self.sum[g] * old + psum[g] * new;
            let acc = &mut self.acc[g * self.head_dim..][..self.head_dim];
            for (a, v) in acc.iter_mut().zip(&pacc[g * self.head_dim..][..self.head_dim]) {
                *a = *a * old + v * new;
            }
        }
    }

    /// The attention output of each query head: the weighted values over the sum.
    fn finish(&self, out: &mut [f32]) {
        for (g, (o, a)) in out.chunks_exact_mut(self.head_dim).zip(self.acc.chunks_exact(self.head_dim)).enumerate() {
            let inv = 1.0 / self.sum[g];
            o.iter_mut().zip(a).for_each(|(o, a)| *o = a * inv);
        }
    }
}

/// Tokens `tokens` of `row` for the query heads of `kv_head`: chunk by chunk, each chunk's keys
/// and values used by every token of the tile that sees them while they are in cache.
///
/// # Safety
/// `out` points to `[n_tokens, n_heads * head_dim]` floats, and no other thread writes the
/// slices of these tokens for these heads.
unsafe fn tile(
    h: &Heads,
    qkv: &[f32],
    row: &RowSpan<'_>,
    kv_head: usize,
    tokens: std::ops::Range<usize>,
    scratch: &mut Scratch,
    out: *mut f32,
) {
    let (hd, group) = (h.head_dim, h.n_heads / h.n_kv_heads);
    let first_pos = row.start + tokens.start;
    let last_pos = row.start + tokens.end - 1;
    let Scratch { scores, partial: buf, states } = scratch;
    while states.len() < tokens.len() {
        states.push(State::new(group, hd));
    }
    let states = &mut states[..tokens.len()];
    states.iter_mut().for_each(State::reset);
    for chunk in h.first_visible(first_pos) / KEY_CHUNK..last_pos / KEY_CHUNK + 1 {
        for (state, j) in states.iter_mut().zip(tokens.clone()) {
            let pos = row.start + j;
            if !chunks_of(h, pos).contains(&chunk) {
                continue;
            }
            let keys = h.first_visible(pos).max(chunk * KEY_CHUNK)..(pos + 1).min((chunk + 1) * KEY_CHUNK);
            let q = &qkv[(row.off + j) * h.qkv_width() + kv_head * group * hd..][..group * hd];
            partial(h, q, row.kv, kv_head, keys, scores, buf);
            state.merge(buf);
        }
    }
    for (state, j) in states.iter().zip(tokens) {
        // SAFETY: (token, heads of this group) is written by this task only; in bounds per the
        // contract.
        let dst = unsafe {
            std::slice::from_raw_parts_mut(out.add((row.off + j) * h.q_width() + kv_head * group * hd), group * hd)
        };
        state.finish(dst);
    }
}

/// The partial attention of a group of query heads `q` (`group · head_dim` floats) over cached
/// positions `keys` of `kv_head`: per head the max score, the sum of `e^(score − max)`, and the
/// values weighted by those, written to `out` as `[max; group] ++ [sum; group] ++ [values]`.
fn partial(
    h: &Heads,
    q: &[f32],
    kv: &HostKv,
    kv_head: usize,
    keys: std::ops::Range<usize>,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let (hd, group) = (h.head_dim, h.n_heads / h.n_kv_heads);
    let n = keys.len();
    assert!(n > 0 && n <= KEY_CHUNK && keys.end <= kv.cap, "partial: a chunk of 1..={KEY_CHUNK} cached keys");
    assert!(q.len() >= group * hd && scores.len() >= group * n && out.len() >= group * (hd + 2));
    let base = kv_head * kv.cap * hd;
    let k = &kv.k[base + keys.start * hd..][..n * hd];
    let v = &kv.v[base + keys.start * hd..][..n * hd];
    let scale = 1.0 / (hd as f32).sqrt();
    let scores = &mut scores[..group * n];
    #[cfg(target_arch = "x86_64")]
    if super::supported() && hd.is_multiple_of(64) {
        // SAFETY: AVX2/FMA detected; the lengths are checked above.
        unsafe { scores_avx2(q, k, n, hd, scale, scores) };
    } else {
        scores_portable(q, k, n, hd, scale, scores);
    }
    #[cfg(not(target_arch = "x86_64"))]
    scores_portable(q, k, n, hd, scale, scores);
    let (stats, acc) = out.split_at_mut(2 * group);
    for (g, probs) in scores.chunks_exact_mut(n).enumerate() {
        (stats[g], stats[group + g]) = super::elementwise::exp_shifted(probs);
        let acc = &mut acc[g * hd..][..hd];
        #[cfg(target_arch = "x86_64")]
        if super::supported() && hd.is_multiple_of(64) {
            // SAFETY: as above.
            unsafe { weighted_values_avx2(probs, v, hd, acc) };
            continue;
        }
        acc.fill(0.0);
        for (p, value) in probs.iter().zip(v.chunks_exact(hd)) {
            acc.iter_mut().zip(value).for_each(|(a, x)| *a += p * x);
        }
    }
}

fn scores_portable(q: &[f32], k: &[f32], n: usize, hd: usize, scale: f32, scores: &mut [f32]) {
    for (g, row) in scores.chunks_exact_mut(n).enumerate() {
        for (s, key) in row.iter_mut().zip(k.chunks_exact(hd)) {
            *s = dot(&q[g * hd..][..hd], key) * scale;
        }
    }
}

/// Scores of every query head of a group against `n` keys (head sizes a multiple of 64): eight
/// keys at a time with one horizontal reduction for all eight, eight accumulators hiding the
/// FMA latency; the last `n % 8` keys one by one.
///
/// # Safety
/// AVX2 and FMA must be available; `q` holds `group · hd` floats, `k` `n · hd`, `scores`
/// `group · n`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scores_avx2(q: &[f32], k: &[f32], n: usize, hd: usize, scale: f32, scores: &mut [f32]) {
    use std::arch::x86_64::*;
    let group = scores.len() / n;
    assert!(q.len() >= group * hd && k.len() >= n * hd);
    let eights = n / 8 * 8;
    for s in (0..eights).step_by(8) {
        for g in 0..group {
            // SAFETY: s + 7 < n, so the eight keys lie in `k`; q is in bounds; the eight scores at
            // g·n + s.. lie in `scores`.
            unsafe {
                let (qg, k0) = (q.as_ptr().add(g * hd), k.as_ptr().add(s * hd));
                let mut a = [_mm256_setzero_ps(); 8];
                for c in (0..hd).step_by(8) {
                    let qv = _mm256_loadu_ps(qg.add(c));
                    for (i, a) in a.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0.add(i * hd + c)), *a);
                    }
                }
                // a0..a7 -> their eight sums in one register.
                let lo = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
                let hi = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
                let sums = _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
                _mm256_storeu_ps(scores.as_mut_ptr().add(g * n + s), _mm256_mul_ps(sums, _mm256_set1_ps(scale)));
            }
        }
    }
    for s in eights..n {
        for g in 0..group {
            scores[g * n + s] = dot(&q[g * hd..][..hd], &k[s * hd..][..hd]) * scale;
        }
    }
}

/// `acc = Σ_s probs[s] · values[s]` for one head (`hd` a multiple of 64), 64 columns at a time
/// in eight registers.
///
/// # Safety
/// AVX2 and FMA must be available; `values` holds `probs.len() · hd` floats, `acc` `hd`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn weighted_values_avx2(probs: &[f32], values: &[f32], hd: usize, acc: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(values.len() >= probs.len() * hd && acc.len() >= hd);
    for c0 in (0..hd).step_by(64) {
        // SAFETY: every value row holds hd >= c0 + 64 floats; acc holds hd.
        unsafe {
            let mut a = [_mm256_setzero_ps(); 8];
            for (s, &p) in probs.iter().enumerate() {
                let (p, v) = (_mm256_set1_ps(p), values.as_ptr().add(s * hd + c0));
                for (i, a) in a.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(p, _mm256_loadu_ps(v.add(8 * i)), *a);
                }
            }
            for (i, a) in a.iter().enumerate() {
                _mm256_storeu_ps(acc.as_mut_ptr().add(c0 + 8 * i), *a);
            }
        }
    }
}

/// Dot product with eight independent lanes, so it vectorizes.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Naive reference: softmax(q·kᵀ/√d)·v per head over positions 0..=p, or the last
    /// `window` of them.
    fn reference(h: &Heads, q: &[f32], ks: &[Vec<f32>], vs: &[Vec<f32>], head: usize, p: usize) -> Vec<f32> {
        let hd = h.head_dim;
        let kv_head = head / (h.n_heads / h.n_kv_heads);
        let qh = &q[head * hd..(head + 1) * hd];
        let first = h.window.map_or(0, |w| (p + 1).saturating_sub(w));
        let logits: Vec<f32> = (first..=p)
            .map(|s| qh.iter().zip(&ks[s][kv_head * hd..]).map(|(a, b)| a * b).sum::<f32>() / (hd as f32).sqrt())
            .collect();
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let w: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
        let z: f32 = w.iter().sum();
        (0..hd).map(|i| (first..=p).map(|s| w[s - first] / z * vs[s][kv_head * hd + i]).sum()).collect()
    }

    #[test]
    fn packed_rows_attend_causally_over_their_own_cache() {
        // Head size 16 takes the portable loops, 64 the AVX2 kernel where the CPU has it; groups
        // of two and three query heads per kv head; full attention, and a sliding window of
        // three keys (A's tokens see 3 of 10 and 11, B's 1 to 3 of 1 to 4).
        let geometries = [(4, 16, None), (6, 64, None), (4, 16, Some(3)), (6, 64, Some(3))];
        for h in geometries.map(|(n_heads, head_dim, window)| Heads { n_heads, n_kv_heads: 2, head_dim, window }) {
            let (w, hd) = (h.qkv_width(), h.head_dim);
            let val = |i: usize| ((i * 7919 % 1000) as f32 / 500.0) - 1.0;
            // Row A: 9 cached tokens + 2 new; row B: 0 cached + 4 new.
            let mut kv_a = HostKv::default();
            let hist: Vec<f32> = (0..9 * w).map(|i| val(i + 11)).collect();
            append(&mut kv_a, &h, &hist, 0, 9, 0, 10);
            let mut kv_b = HostKv::default();
            let qkv: Vec<f32> = (0..6 * w).map(val).collect();
            append(&mut kv_a, &h, &qkv, 0, 2, 9, 16); // grows 10 -> 16, keeping the history
            append(&mut kv_b, &h, &qkv, 2, 4, 0, 4);
            let rows = [RowSpan { off: 0, t: 2, start: 9, kv: &kv_a }, RowSpan { off: 2, t: 4, start: 0, kv: &kv_b }];
            let out = attend(&h, &qkv, &rows, 6);
            let split = |buf: &[f32], n: usize| -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
                (0..n)
                    .map(|t| {
                        let r = &buf[t * w..(t + 1) * w];
                        (r[h.q_width()..h.q_width() + h.kv_width()].to_vec(), r[h.q_width() + h.kv_width()..].to_vec())
                    })
                    .unzip()
            };
            let (mut ks_a, mut vs_a) = split(&hist, 9);
            let (ks_new, vs_new) = split(&qkv, 6);
            ks_a.extend_from_slice(&ks_new[..2]);
            vs_a.extend_from_slice(&vs_new[..2]);
            let (ks_b, vs_b) = (ks_new[2..].to_vec(), vs_new[2..].to_vec());
            // (token, its keys and values, its position): A's tokens see 10 and 11 keys (a group
            // of eight and a tail), B's 1 to 4.
            let mut cases = vec![(0, &ks_a, &vs_a, 9), (1, &ks_a, &vs_a, 10)];
            cases.extend((0..4).map(|p| (2 + p, &ks_b, &vs_b, p)));
            for (token, ks, vs, p) in cases {
                for head in 0..h.n_heads {
                    let want = reference(&h, &qkv[token * w..], ks, vs, head, p);
                    let got = &out[token * h.q_width() + head * hd..][..hd];
                    for (a, b) in got.iter().zip(&want) {
                        assert!(
                            (a - b).abs() < 1e-4,
                            "hd {hd} window {:?} token {token} head {head}: {a} vs {b}",
                            h.window
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn rope_layouts_rotate_the_right_pairs() {
        let h = Heads { n_heads: 1, n_kv_heads: 1, head_dim: 4, window: None };
        let (cos, sin) = ([0.0f32, 1.0], [1.0f32, 0.0]); // pair 0 turned by 90°, pair 1 unchanged
        let mut inter = vec![1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0, 9.0, 9.0, 9.0, 9.0];
        rope(&h, &mut inter, &cos, &sin, true);
        assert_eq!(&inter[..4], &[-2.0, 1.0, 3.0, 4.0]);
        assert_eq!(&inter[8..], &[9.0; 4], "v is not rotated");
        let mut split = vec![1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0, 9.0, 9.0, 9.0, 9.0];
        rope(&h, &mut split, &cos, &sin, false);
        assert_eq!(&split[..4], &[-3.0, 2.0, 1.0, 4.0]);
    }

    /// Long rows: a 200-token prefill (tiles of queries, chunks of keys, several of each) and the
    /// same last token decoded on its own (its chunks run as separate items and are merged, or
    /// as one item) give the same output bit for bit, and both match the naive reference; with a sliding
    /// window of 100 keys too, which starts mid-chunk.
    #[test]
    fn long_rows_split_over_tiles_and_chunks_agree_exactly() {
        let n = 200;
        for (head_dim, window) in [(64, None), (16, None), (64, Some(100)), (16, Some(100))] {
            let h = Heads { n_heads: 6, n_kv_heads: 2, head_dim, window };
            let w = h.qkv_width();
            let val = |i: usize| ((i * 7919 % 1000) as f32 / 500.0) - 1.0;
            let qkv: Vec<f32> = (0..n * w).map(val).collect();
            let mut all = HostKv::default();
            append(&mut all, &h, &qkv, 0, n, 0, n);
            let prefill = attend(&h, &qkv, &[RowSpan { off: 0, t: n, start: 0, kv: &all }], n);
            // The last token alone, after the others were cached.
            let mut kv = HostKv::default();
            append(&mut kv, &h, &qkv, 0, n - 1, 0, n);
            append(&mut kv, &h, &qkv, n - 1, 1, n - 1, n);
            let last = &qkv[(n - 1) * w..];
            let row = [RowSpan { off: 0, t: 1, start: n - 1, kv: &kv }];
            let decode = attend_split(&h, last, &row, 1, Some(2));
            assert_eq!(decode[..], prefill[(n - 1) * h.q_width()..], "hd {head_dim} window {window:?}");
            // Unsplit (as a batch with enough rows to fill the cores runs it): the same bits.
            assert_eq!(attend_split(&h, last, &row, 1, None), decode, "hd {head_dim} window {window:?} unsplit");
            let (ks, vs): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (0..n)
                .map(|t| {
                    let r = &qkv[t * w..(t + 1) * w];
                    (r[h.q_width()..h.q_width() + h.kv_width()].to_vec(), r[h.q_width() + h.kv_width()..].to_vec())
                })
                .unzip();
            for token in [0, 15, 16, 63, 64, 130, n - 1] {
                for head in 0..h.n_heads {
                    let want = reference(&h, &qkv[token * w..], &ks, &vs, head, token);
                    let got = &prefill[token * h.q_width() + head * head_dim..][..head_dim];
                    for (a, b) in got.iter().zip(&want) {
                        assert!(
                            (a - b).abs() < 1e-4,
                            "hd {head_dim} window {window:?} token {token} head {head}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }
}
