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

/// Causal attention for all rows: returns `[n_tokens, n_heads * head_dim]`.
///
/// The kernels below read through raw pointers; this is the safe boundary, so it checks what
/// they rely on: every row's tokens lie in `qkv`, the rows' token ranges do not overlap (each
/// task writes its own rows' outputs), and every row's cache holds the positions it attends to.
pub(crate) fn attend(h: &Heads, qkv: &[f32], rows: &[RowSpan<'_>], n_tokens: usize) -> Vec<f32> {
    assert!(qkv.len() >= n_tokens * h.qkv_width(), "attend: qkv holds fewer than {n_tokens} tokens");
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
    // Every task writes a disjoint set of (token, head) slices of the output.
    let ptr = super::SendPtr(out.as_mut_ptr());
    let items = rows.len() * h.n_kv_heads;
    candle_core::utils::barrier_pool().execute_chunked(items, |range| {
        let ptr = &ptr;
        let (mut scores, mut acc) = (Vec::new(), Vec::new());
        for item in range {
            let (row, kv_head) = (&rows[item / h.n_kv_heads], item % h.n_kv_heads);
            #[cfg(target_arch = "x86_64")]
            if super::supported() {
                // SAFETY: AVX2/FMA detected; outputs are disjoint per (row, kv head).
                unsafe { attend_avx2(h, qkv, row, kv_head, &mut scores, &mut acc, ptr.0) };
                continue;
            }
            // SAFETY: as above.
            unsafe { attend_one(h, qkv, row, kv_head, &mut scores, &mut acc, ptr.0) };
        }
    });
    out
}

/// [`attend_one`] with explicit AVX2 for head sizes that are a multiple of 64: scores eight
/// keys at a time with one horizontal reduction for all eight, and each query head's output
/// accumulated in eight registers over the whole cache.
///
/// # Safety
/// AVX2 and FMA must be available; otherwise as [`attend_one`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(
    h: &Heads,
    qkv: &[f32],
    row: &RowSpan<'_>,
    kv_head: usize,
    scores: &mut Vec<f32>,
    acc: &mut Vec<f32>,
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    let hd = h.head_dim;
    if !hd.is_multiple_of(64) {
        // SAFETY: forwarded from the caller.
        return unsafe { attend_one(h, qkv, row, kv_head, scores, acc, out) };
    }
    let group = h.n_heads / h.n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let cache = row.kv.cap * hd;
    for j in 0..row.t {
        let pos = row.start + j;
        let first = h.first_visible(pos);
        let visible = pos + 1 - first;
        let token = row.off + j;
        let qs = &qkv[token * h.qkv_width() + kv_head * group * hd..][..group * hd];
        let keys = &row.kv.k[kv_head * cache + first * hd..][..visible * hd];
        let values = &row.kv.v[kv_head * cache + first * hd..][..visible * hd];
        scores.clear();
        scores.resize(group * visible, 0.0);
        // Eight keys at a time: eight independent accumulators hide the FMA latency.
        let eights = visible / 8 * 8;
        for s in (0..eights).step_by(8) {
            for g in 0..group {
                // SAFETY: s + 7 < visible, so the eight keys lie in `keys`; q is in `qs`; the
                // eight scores at g·visible + s.. lie in `scores`.
                unsafe {
                    let (q, k0) = (qs.as_ptr().add(g * hd), keys.as_ptr().add(s * hd));
                    let mut a = [_mm256_setzero_ps(); 8];
                    for c in (0..hd).step_by(8) {
                        let qv = _mm256_loadu_ps(q.add(c));
                        for (i, a) in a.iter_mut().enumerate() {
                            *a = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0.add(i * hd + c)), *a);
                        }
                    }
                    // a0..a7 -> their eight sums in one register.
                    let lo = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
                    let hi = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
                    let sums =
                        _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
                    _mm256_storeu_ps(
                        scores.as_mut_ptr().add(g * visible + s),
                        _mm256_mul_ps(sums, _mm256_set1_ps(scale)),
                    );
                }
            }
        }
        for (s, key) in keys.chunks_exact(hd).enumerate().skip(eights) {
            for (g, q) in qs.chunks_exact(hd).enumerate() {
                scores[g * visible + s] = dot(q, key) * scale;
            }
        }
        softmax_rows(scores, visible);
        for g in 0..group {
            let probs = &scores[g * visible..][..visible];
            for c0 in (0..hd).step_by(64) {
                // SAFETY: every value row holds hd >= c0 + 64 floats; (token, head g) is written
                // by this task only and lies in `out` per the contract.
                unsafe {
                    let mut a = [_mm256_setzero_ps(); 8];
                    for (s, &p) in probs.iter().enumerate() {
                        let (p, v) = (_mm256_set1_ps(p), values.as_ptr().add(s * hd + c0));
                        for (i, a) in a.iter_mut().enumerate() {
                            *a = _mm256_fmadd_ps(p, _mm256_loadu_ps(v.add(8 * i)), *a);
                        }
                    }
                    let dst = out.add(token * h.q_width() + (kv_head * group + g) * hd + c0);
                    for (i, a) in a.iter().enumerate() {
                        _mm256_storeu_ps(dst.add(8 * i), *a);
                    }
                }
            }
        }
    }
}

/// Softmax in place over each run of `visible` scores.
fn softmax_rows(scores: &mut [f32], visible: usize) {
    scores.chunks_exact_mut(visible).for_each(super::elementwise::softmax);
}

/// Attention of the query heads sharing `kv_head`, for every new token of `row`. Each cached
/// key and value is read once for the whole group of query heads (their scores and outputs
/// sit side by side in `scores` and `acc`), so a long cache streams through the core once per
/// kv head instead of once per query head.
///
/// # Safety
/// `out` points to `[n_tokens, n_heads * head_dim]` floats, and no other thread writes the
/// slices of this row's tokens for these heads.
#[inline(always)]
unsafe fn attend_one(
    h: &Heads,
    qkv: &[f32],
    row: &RowSpan<'_>,
    kv_head: usize,
    scores: &mut Vec<f32>,
    acc: &mut Vec<f32>,
    out: *mut f32,
) {
    let hd = h.head_dim;
    let group = h.n_heads / h.n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let keys = &row.kv.k[kv_head * row.kv.cap * hd..];
    let values = &row.kv.v[kv_head * row.kv.cap * hd..];
    for j in 0..row.t {
        let pos = row.start + j;
        let first = h.first_visible(pos);
        let visible = pos + 1 - first;
        let token = row.off + j;
        // The group's query heads are adjacent in the packed row.
        let qs = &qkv[token * h.qkv_width() + kv_head * group * hd..][..group * hd];
        scores.clear();
        scores.resize(group * visible, 0.0);
        for (s, key) in keys[first * hd..(pos + 1) * hd].chunks_exact(hd).enumerate() {
            for (g, q) in qs.chunks_exact(hd).enumerate() {
                scores[g * visible + s] = dot(q, key) * scale;
            }
        }
        softmax_rows(scores, visible);
        acc.clear();
        acc.resize(group * hd, 0.0);
        for (s, value) in values[first * hd..(pos + 1) * hd].chunks_exact(hd).enumerate() {
            for (g, head_acc) in acc.chunks_exact_mut(hd).enumerate() {
                let p = scores[g * visible + s];
                for (a, v) in head_acc.iter_mut().zip(value) {
                    *a += p * v;
                }
            }
        }
        // SAFETY: (token, heads of this group) is written by this task only; in bounds per the
        // contract.
        let dst =
            unsafe { std::slice::from_raw_parts_mut(out.add(token * h.q_width() + kv_head * group * hd), group * hd) };
        dst.copy_from_slice(acc);
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
}
