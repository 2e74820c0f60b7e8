//! Choosing the next token from logits, and the log-probabilities reported to clients.
//!
//! The order follows vLLM: logit bias, banned tokens (`min_tokens`), penalties, then
//! temperature, `min_p`, `top_k` and `top_p`. With temperature 0 the processed logits'
//! argmax is taken, so penalties and biases apply to greedy decoding too, and `top_k = 1`
//! takes the same argmax.
//!
//! Sampling runs for every token of every sequence, so nothing here sorts the vocabulary
//! (49,152 entries for the default model). The weights `exp((logit - max) / temperature)`
//! come from one vector pass for the maximum and one for the exponentials and their sums
//! per block of `CHUNK` tokens (a fast polynomial `exp`, within a few units in the last
//! place, picked by CPU at run time); sampling need not round as libm does. Then:
//! - whole vocabulary (OpenAI's defaults): an inverse-CDF draw that walks the block sums,
//!   then one block;
//! - `min_p`: tokens whose weight is below `min_p` (the top token's weight is 1) get
//!   weight 0 in the same pass;
//! - `top_k`: a partial selection of the k best, and only those k are sorted;
//! - `top_p`: the nucleus is the smallest set of most likely tokens whose mass reaches
//!   `top_p`, and a token belongs to it exactly when the tokens more likely than it weigh
//!   less than that (one vector pass tells). So a token is drawn from the whole
//!   distribution and kept if it belongs; if not, every token not more likely than it is
//!   dropped and the draw repeats. Accepted draws follow the nucleus' own distribution
//!   (rejection sampling), a draw is accepted with probability at least `top_p`, and
//!   nothing is sorted or even collected.
//!
//! "Most likely first" means by processed logit, highest first, then lower token id
//! first, so ties are cut the same way every time. A seed gives the same draws whatever
//! else the engine runs; the draws differ from Sluice versions before this scheme.

use std::collections::{HashMap, HashSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Temperatures below this sample greedily (vLLM's `_SAMPLING_EPS`).
pub const GREEDY_BELOW_TEMPERATURE: f32 = 1e-5;

/// Per-request sampling settings (already validated by the caller).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 disables.
    pub top_p: f32,
    /// 0 disables.
    pub top_k: usize,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 disables.
    pub min_p: f32,
    /// Subtracted once from every token already generated (OpenAI).
    pub presence_penalty: f32,
    /// Subtracted per occurrence in the output so far (OpenAI).
    pub frequency_penalty: f32,
    /// Divides positive / multiplies negative logits of tokens seen in the prompt or
    /// output (the Hugging Face and vLLM definition); 1 disables.
    pub repetition_penalty: f32,
    /// Added to the logits of these tokens.
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            seed: None,
        }
    }
}

impl SamplingParams {
    fn processes_logits(&self) -> bool {
        !self.logit_bias.is_empty()
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || self.repetition_penalty != 1.0
    }
}

/// A request's sampler with its own random stream, so a seed gives the same text
/// whatever else the engine runs.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Tokens of the prompt, for the repetition penalty.
    prompt_tokens: HashSet<u32>,
    output_counts: HashMap<u32, u32>,
    /// The logits after bias, bans and penalties (when any apply).
    logits: Vec<f32>,
    weights: Vec<f32>,
    chunk_sums: Vec<f32>,
    candidates: Vec<Candidate>,
}

/// A token still in the running, with its processed logit (the sort key) and weight.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    logit: f32,
    weight: f32,
    id: u32,
}

/// Most likely first: higher logit, then lower id. Logits compare as numbers (-0 and 0
/// tie, as in `vector::mass_before`); candidates' logits are finite.
fn likelier(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    by_logit(a.logit, a.id, b.logit, b.id)
}

/// `likelier` on (logit, id) pairs.
fn by_logit(la: f32, a: u32, lb: f32, b: u32) -> std::cmp::Ordering {
    lb.partial_cmp(&la)
        .unwrap_or(std::cmp::Ordering::Equal)
        .then(a.cmp(&b))
}

/// What `select` left to draw from.
enum Selection {
    /// Decided without drawing.
    Token(u32),
    /// Every token, by `weights` (zero for those filtered out).
    Weights,
    /// `candidates`, most likely first.
    Candidates,
    /// The nucleus of `weights`: the tokens whose more likely tokens weigh less than this.
    Nucleus(f64),
}

impl Sampler {
    /// A sampler seeded from `params.seed`, or from the OS when absent.
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        let prompt_tokens = if params.repetition_penalty != 1.0 {
            prompt.iter().copied().collect()
        } else {
            HashSet::new()
        };
        Sampler {
            params,
            rng,
            prompt_tokens,
            output_counts: HashMap::new(),
            logits: Vec::new(),
            weights: Vec::new(),
            chunk_sums: Vec::new(),
            candidates: Vec::new(),
        }
    }

    /// Whether this sampler only ever takes the most likely token of the raw logits
    /// (greedy, nothing applied to the logits): then the token may be picked where the
    /// logits are (a GPU) and handed to [`Sampler::accept`].
    pub fn is_plain_greedy(&self) -> bool {
        (self.params.temperature < GREEDY_BELOW_TEMPERATURE || self.params.top_k == 1)
            && !self.params.processes_logits()
    }

    /// Records a token picked elsewhere (by argmax on a device) as this sampler's own
    /// draw.
    pub fn accept(&mut self, id: u32) {
        *self.output_counts.entry(id).or_default() += 1;
    }

    /// Picks a token id, never one of `banned`, and records it as generated.
    pub fn sample(&mut self, raw: &[f32], banned: &[u32]) -> u32 {
        let id = self.choose(raw, banned);
        *self.output_counts.entry(id).or_default() += 1;
        id
    }

    fn choose(&mut self, raw: &[f32], banned: &[u32]) -> u32 {
        match self.select(raw, banned) {
            Selection::Token(t) => t,
            Selection::Weights => {
                let u = self.rng.random::<f64>();
                draw_weights(&self.weights, &self.chunk_sums, u)
            }
            Selection::Candidates => {
                let u = self.rng.random::<f64>();
                draw_candidates(&self.candidates, u)
            }
            Selection::Nucleus(target) => {
                let logits: &[f32] = if self.processes(banned) {
                    &self.logits
                } else {
                    raw
                };
                let isa = vector::detected();
                // Each rejection drops the drawn token and all less likely ones; the most
                // likely token is always accepted, so this ends. The bound only guards
                // against a broken invariant.
                for _ in 0..64 {
                    let u = self.rng.random::<f64>();
                    let t = draw_weights(&self.weights, &self.chunk_sums, u);
                    let (lt, t) = (logits[t as usize], t as usize);
                    if vector::mass_before(isa, logits, &self.weights, lt, t) < target {
                        return t as u32;
                    }
                    vector::keep_before(
                        isa,
                        logits,
                        lt,
                        t,
                        &mut self.weights,
                        &mut self.chunk_sums,
                    );
                }
                argmax(logits)
            }
        }
    }

    /// Whether this token's logits are processed (copied to `self.logits`).
    fn processes(&self, banned: &[u32]) -> bool {
        self.params.processes_logits() || !banned.is_empty()
    }

    /// Applies the settings to `raw` and leaves what remains to draw from.
    fn select(&mut self, raw: &[f32], banned: &[u32]) -> Selection {
        let processed = self.processes(banned);
        if processed {
            self.process(raw, banned);
        }
        let Sampler {
            params: p,
            logits: buf,
            weights,
            chunk_sums,
            candidates,
            ..
        } = self;
        let logits: &[f32] = if processed { &buf[..] } else { raw };
        // Below vLLM's epsilon a temperature is greedy: 1/t would overflow the weights.
        if p.temperature < GREEDY_BELOW_TEMPERATURE || p.top_k == 1 {
            return Selection::Token(argmax(logits));
        }
        let Some(total) = exp_weights(
            vector::detected(),
            logits,
            p.temperature,
            p.min_p,
            weights,
            chunk_sums,
        ) else {
            // Nothing finite to sample from.
            return Selection::Token(argmax(logits));
        };
        if total.is_nan() || total <= 0.0 {
            // Every weight underflowed (cannot happen above the greedy epsilon: the top
            // token weighs 1), so nothing can be drawn: the likeliest token is the answer.
            return Selection::Token(argmax(logits));
        }
        if p.top_k > 0 {
            top_k(logits, weights, p.top_k, candidates);
            if p.top_p < 1.0 {
                let mass: f64 = candidates.iter().map(|c| c.weight as f64).sum();
                let keep = prefix_reaching(candidates, p.top_p as f64 * mass);
                candidates.truncate(keep.unwrap_or(candidates.len()));
            }
            Selection::Candidates
        } else if p.top_p < 1.0 {
            let target = p.top_p as f64 * total;
            if target > 0.0 {
                Selection::Nucleus(target)
            } else {
                Selection::Token(argmax(logits))
            }
        } else {
            Selection::Weights
        }
    }

    /// Bias, bans and penalties, into `self.logits`.
    fn process(&mut self, raw: &[f32], banned: &[u32]) {
        let p = &self.params;
        self.logits.clear();
        self.logits.extend_from_slice(raw);
        let l = &mut self.logits;
        for &(t, b) in &p.logit_bias {
            if let Some(x) = l.get_mut(t as usize) {
                *x += b;
            }
        }
        for &t in banned {
            if let Some(x) = l.get_mut(t as usize) {
                *x = f32::NEG_INFINITY;
            }
        }
        if p.repetition_penalty != 1.0 {
            let r = p.repetition_penalty;
            let seen = self
                .prompt_tokens
                .iter()
                .chain(self.output_counts.keys())
                .collect::<HashSet<_>>();
            for &t in seen {
                if let Some(x) = l.get_mut(t as usize) {
                    *x = if *x > 0.0 { *x / r } else { *x * r };
                }
            }
        }
        for (&t, &n) in &self.output_counts {
            if let Some(x) = l.get_mut(t as usize) {
                *x -= p.frequency_penalty * n as f32 + p.presence_penalty;
            }
        }
    }
}

/// Fills `weights[i]` with `exp((logits[i] - max) / temperature)` (0 for non-finite
/// logits, for those whose weight underflows, and for those below `min_p`; the top token
/// weighs exactly 1) and `sums` with the sum of each block of `vector::CHUNK`. Returns
/// the total weight, or `None` when no logit is finite.
fn exp_weights(
    isa: vector::Isa,
    logits: &[f32],
    temperature: f32,
    min_p: f32,
    weights: &mut Vec<f32>,
    sums: &mut Vec<f32>,
) -> Option<f64> {
    let max = vector::max_finite(isa, logits);
    if max == f32::NEG_INFINITY {
        return None;
    }
    weights.resize(logits.len(), 0.0);
    sums.resize(logits.len().div_ceil(vector::CHUNK), 0.0);
    vector::weights(
        isa,
        logits,
        max,
        1.0 / temperature,
        min_p.max(0.0),
        weights,
        sums,
    );
    Some(sums.iter().map(|&s| s as f64).sum())
}

/// The `k` most likely tokens of positive weight, most likely first, into `out`.
fn top_k(logits: &[f32], weights: &[f32], k: usize, out: &mut Vec<Candidate>) {
    out.clear();
    // A k past the vocabulary (any client may send one) keeps every token.
    let k = k.min(weights.len()).max(1);
    // A partial selection over a bounded buffer: once it overflows, only its k best stay
    // and anything not more likely than the k-th of them is skipped for good, so most
    // tokens cost one comparison and nothing is sorted but the final k.
    let cap = k.saturating_mul(4).max(256);
    let mut floor = f32::NEG_INFINITY;
    for (i, (&w, &logit)) in weights.iter().zip(logits).enumerate() {
        // Tokens come in id order: one tied with the k-th so far has a higher id, so
        // it is less likely too.
        if w <= 0.0 || (logit <= floor && out.len() >= k) {
            continue;
        }
        out.push(Candidate {
            logit,
            weight: w,
            id: i as u32,
        });
        if out.len() >= cap {
            out.select_nth_unstable_by(k - 1, likelier);
            out.truncate(k);
            floor = out[k - 1].logit;
        }
    }
    if out.len() > k {
        out.select_nth_unstable_by(k - 1, likelier);
        out.truncate(k);
    }
    out.sort_unstable_by(likelier);
}

/// Length of the shortest prefix of `c` (most likely first) whose weights, summed in
/// order, reach `target`.
fn prefix_reaching(c: &[Candidate], target: f64) -> Option<usize> {
    let mut acc = 0f64;
    for (i, x) in c.iter().enumerate() {
        acc += x.weight as f64;
        if acc >= target {
            return Some(i + 1);
        }
    }
    None
}

/// Inverse-CDF draw over `weights` for `u` in [0, 1): finds the block, then the token.
fn draw_weights(weights: &[f32], sums: &[f32], u: f64) -> u32 {
    let total: f64 = sums.iter().map(|&s| s as f64).sum();
    let mut r = u * total;
    for (b, &s) in sums.iter().enumerate() {
        let s = s as f64;
        if r < s {
            let start = b * vector::CHUNK;
            let block = &weights[start..(start + vector::CHUNK).min(weights.len())];
            let mut last = None;
            for (i, &w) in block.iter().enumerate() {
                if w > 0.0 {
                    if r < w as f64 {
                        return (start + i) as u32;
                    }
                    r -= w as f64;
                    last = Some(start + i);
                }
            }
            // The block's own sum rounded differently: its last token absorbs it.
            if let Some(i) = last {
                return i as u32;
            }
        }
        r -= s;
    }
    // Rounding past the end: the last token that can be drawn.
    weights.iter().rposition(|&w| w > 0.0).unwrap_or(0) as u32
}

/// Inverse-CDF draw over candidates for `u` in [0, 1).
fn draw_candidates(c: &[Candidate], u: f64) -> u32 {
    let total: f64 = c.iter().map(|x| x.weight as f64).sum();
    let mut r = u * total;
    for x in c {
        if r < x.weight as f64 {
            return x.id;
        }
        r -= x.weight as f64;
    }
    c.last().map_or(0, |x| x.id)
}

/// The vector passes over the vocabulary: the largest finite logit, and the weights with
/// their block sums. An AVX-512 and an AVX2 form where the CPU has them (chosen at run
/// time; `SLUICE_NO_AVX512` and `SLUICE_FORCE_SCALAR` as for the other kernels), and a
/// scalar one. The forms may differ in the last bits of a weight.
mod vector {
    use std::sync::OnceLock;

    /// Tokens per block sum: the draw walks block sums, then one block.
    pub(super) const CHUNK: usize = 256;

    /// Below this the weight would be subnormal (slow) or zero: it is 0.
    const MIN_EXPONENT: f32 = -87.0;
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    /// ln 2 split in two so that `n * LN2_HI` is exact (Cody and Waite): 0.693359375.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    /// Cephes' `expf` polynomial for e^r - 1 - r over |r| <= ln(2) / 2, as r^2 * P(r).
    const P: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ];

    /// Which form runs.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(super) enum Isa {
        Scalar,
        #[cfg(target_arch = "x86_64")]
        Avx2,
        #[cfg(target_arch = "x86_64")]
        Avx512,
    }

    /// The best form this CPU runs, detected once.
    pub(super) fn detected() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            if crate::backends::cpu::kernels::detected()
                == crate::backends::cpu::kernels::KernelSet::Avx2
            {
                if crate::backends::cpu::kernels::avx512_allowed()
                    && is_x86_feature_detected!("avx512f")
                {
                    return Isa::Avx512;
                }
                return Isa::Avx2;
            }
            Isa::Scalar
        })
    }

    /// Every form this CPU can run, for tests.
    #[cfg(test)]
    pub(super) fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                v.push(Isa::Avx2);
            }
            if is_x86_feature_detected!("avx512f") {
                v.push(Isa::Avx512);
            }
        }
        v
    }

    /// The largest finite value of `x`; -inf when there is none.
    pub(super) fn max_finite(isa: Isa, x: &[f32]) -> f32 {
        match isa {
            Isa::Scalar => max_finite_scalar(x),
            // SAFETY: `detected` (or the caller, for tests) checked the CPU features.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { x86::max_finite_avx2(x) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { x86::max_finite_avx512(x) },
        }
    }

    fn max_finite_scalar(x: &[f32]) -> f32 {
        x.iter()
            .copied()
            .filter(|v| v.is_finite())
            .fold(f32::NEG_INFINITY, f32::max)
    }

    /// `out[i] = exp((logits[i] - max) * inv_t)`, or 0 when that exponent is not in
    /// [MIN_EXPONENT, 0] (non-finite logits included) or the weight is below `floor`;
    /// `sums[b]` is the sum of block `b` of `CHUNK` weights.
    pub(super) fn weights(
        isa: Isa,
        logits: &[f32],
        max: f32,
        inv_t: f32,
        floor: f32,
        out: &mut [f32],
        sums: &mut [f32],
    ) {
        assert!(out.len() == logits.len() && sums.len() == logits.len().div_ceil(CHUNK));
        for ((l, o), s) in logits.chunks(CHUNK).zip(out.chunks_mut(CHUNK)).zip(sums) {
            let done = match isa {
                Isa::Scalar => (0, 0.0),
                // SAFETY: as in `max_finite`.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => unsafe { x86::weights_avx2(l, max, inv_t, floor, o) },
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => unsafe { x86::weights_avx512(l, max, inv_t, floor, o) },
            };
            let mut sum = done.1;
            for (&x, w) in l[done.0..].iter().zip(&mut o[done.0..]) {
                *w = weight(x, max, inv_t, floor);
                sum += *w;
            }
            *s = sum;
        }
    }

    /// The weight of the tokens more likely than token `j` (logit `lj`): a higher logit,
    /// or the same one and a lower id. Summed in f64.
    pub(super) fn mass_before(isa: Isa, logits: &[f32], weights: &[f32], lj: f32, j: usize) -> f64 {
        assert_eq!(logits.len(), weights.len());
        let (done, mut sum) = match isa {
            Isa::Scalar => (0, 0.0),
            // SAFETY: as in `max_finite`.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { x86::mass_before_avx2(logits, weights, lj, j) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { x86::mass_before_avx512(logits, weights, lj, j) },
        };
        for (i, (&l, &w)) in logits.iter().zip(weights).enumerate().skip(done) {
            if l > lj || (l == lj && i < j) {
                sum += w as f64;
            }
        }
        sum
    }

    /// Keeps only the weights of the tokens more likely than token `j` (as in
    /// `mass_before`), and their block sums.
    pub(super) fn keep_before(
        isa: Isa,
        logits: &[f32],
        lj: f32,
        j: usize,
        weights: &mut [f32],
        sums: &mut [f32],
    ) {
        assert!(weights.len() == logits.len() && sums.len() == logits.len().div_ceil(CHUNK));
        for (b, ((l, w), s)) in logits
            .chunks(CHUNK)
            .zip(weights.chunks_mut(CHUNK))
            .zip(sums)
            .enumerate()
        {
            let base = b * CHUNK;
            let (done, mut sum) = match isa {
                Isa::Scalar => (0, 0.0),
                // SAFETY: as in `max_finite`.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => unsafe { x86::keep_before_avx2(l, w, base, lj, j) },
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => unsafe { x86::keep_before_avx512(l, w, base, lj, j) },
            };
            for (i, (&l, w)) in l.iter().zip(w.iter_mut()).enumerate().skip(done) {
                if !(l > lj || (l == lj && base + i < j)) {
                    *w = 0.0;
                }
                sum += *w;
            }
            *s = sum;
        }
    }

    /// The scalar form of one weight.
    fn weight(x: f32, max: f32, inv_t: f32, floor: f32) -> f32 {
        let d = (x - max) * inv_t;
        if !(MIN_EXPONENT..=0.0).contains(&d) {
            return 0.0;
        }
        // Round to nearest by the 1.5 * 2^23 trick (|d * LOG2E| < 2^22): no libm call.
        let n = (d * LOG2E + 12_582_912.0) - 12_582_912.0;
        let r = d - n * LN2_HI - n * LN2_LO;
        let p = P.iter().fold(0.0, |acc, &c| acc * r + c);
        let e = f32::from_bits(((n as i32 + 127) as u32) << 23);
        let w = (p * r * r + r + 1.0) * e;
        if w >= floor {
            w
        } else {
            0.0
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use super::{CHUNK, LN2_HI, LN2_LO, LOG2E, MIN_EXPONENT, P};
        use std::arch::x86_64::*;

        /// # Safety
        /// The CPU must support AVX2 and FMA.
        #[target_feature(enable = "avx2,fma")]
        pub(in super::super) unsafe fn max_finite_avx2(x: &[f32]) -> f32 {
            let n = x.len() / 8 * 8;
            let inf = _mm256_set1_ps(f32::INFINITY);
            let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
            let sign = _mm256_set1_ps(-0.0);
            let mut m = ninf;
            for i in (0..n).step_by(8) {
                let v = _mm256_loadu_ps(x.as_ptr().add(i));
                let finite = _mm256_cmp_ps::<_CMP_LT_OQ>(_mm256_andnot_ps(sign, v), inf);
                m = _mm256_max_ps(m, _mm256_blendv_ps(ninf, v, finite));
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), m);
            lanes
                .into_iter()
                .chain(x[n..].iter().copied().filter(|v| v.is_finite()))
                .fold(f32::NEG_INFINITY, f32::max)
        }

        /// # Safety
        /// The CPU must support AVX-512F.
        #[target_feature(enable = "avx512f")]
        pub(in super::super) unsafe fn max_finite_avx512(x: &[f32]) -> f32 {
            let n = x.len() / 16 * 16;
            let inf = _mm512_set1_ps(f32::INFINITY);
            let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
            let mut m = ninf;
            for i in (0..n).step_by(16) {
                let v = _mm512_loadu_ps(x.as_ptr().add(i));
                let finite = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(_mm512_abs_ps(v), inf);
                m = _mm512_mask_max_ps(m, finite, m, v);
            }
            x[n..]
                .iter()
                .copied()
                .filter(|v| v.is_finite())
                .fold(_mm512_reduce_max_ps(m), f32::max)
        }

        /// The weights of the whole 8-lane part of one block; returns how many it did and
        /// their sum.
        ///
        /// # Safety
        /// The CPU must support AVX2 and FMA.
        #[target_feature(enable = "avx2,fma")]
        pub(in super::super) unsafe fn weights_avx2(
            l: &[f32],
            max: f32,
            inv_t: f32,
            floor: f32,
            out: &mut [f32],
        ) -> (usize, f32) {
            debug_assert!(l.len() <= CHUNK && out.len() == l.len());
            let n = l.len() / 8 * 8;
            let (vmax, vinv, vfloor) = (
                _mm256_set1_ps(max),
                _mm256_set1_ps(inv_t),
                _mm256_set1_ps(floor),
            );
            let (lo, zero) = (_mm256_set1_ps(MIN_EXPONENT), _mm256_setzero_ps());
            let mut acc = zero;
            for i in (0..n).step_by(8) {
                let d = _mm256_mul_ps(
                    _mm256_sub_ps(_mm256_loadu_ps(l.as_ptr().add(i)), vmax),
                    vinv,
                );
                // Ordered compares: NaN (and so any non-finite logit) is dropped too.
                let keep = _mm256_and_ps(
                    _mm256_cmp_ps::<_CMP_GE_OQ>(d, lo),
                    _mm256_cmp_ps::<_CMP_LE_OQ>(d, zero),
                );
                let d = _mm256_min_ps(_mm256_max_ps(d, lo), zero);
                let k = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                    _mm256_mul_ps(d, _mm256_set1_ps(LOG2E)),
                );
                let r = _mm256_fnmadd_ps(k, _mm256_set1_ps(LN2_HI), d);
                let r = _mm256_fnmadd_ps(k, _mm256_set1_ps(LN2_LO), r);
                let mut p = _mm256_set1_ps(P[0]);
                for &c in &P[1..] {
                    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
                }
                let y = _mm256_add_ps(
                    _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
                    _mm256_set1_ps(1.0),
                );
                let e = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
                    _mm256_cvtps_epi32(k),
                    _mm256_set1_epi32(127),
                )));
                let w = _mm256_and_ps(_mm256_mul_ps(y, e), keep);
                let w = _mm256_and_ps(w, _mm256_cmp_ps::<_CMP_GE_OQ>(w, vfloor));
                _mm256_storeu_ps(out.as_mut_ptr().add(i), w);
                acc = _mm256_add_ps(acc, w);
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
            (n, lanes.iter().sum())
        }

        /// `mass_before` over the whole 8-lane part: (how many it did, their mass).
        ///
        /// # Safety
        /// The CPU must support AVX2.
        #[target_feature(enable = "avx2")]
        pub(in super::super) unsafe fn mass_before_avx2(
            l: &[f32],
            w: &[f32],
            lj: f32,
            j: usize,
        ) -> (usize, f64) {
            let n = l.len() / 8 * 8;
            let (vl, vj) = (
                _mm256_set1_ps(lj),
                _mm256_set1_epi32(j.min(i32::MAX as usize) as i32),
            );
            let mut idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let (mut lo, mut hi) = (_mm256_setzero_pd(), _mm256_setzero_pd());
            for i in (0..n).step_by(8) {
                let x = _mm256_loadu_ps(l.as_ptr().add(i));
                let before = _mm256_or_ps(
                    _mm256_cmp_ps::<_CMP_GT_OQ>(x, vl),
                    _mm256_and_ps(
                        _mm256_cmp_ps::<_CMP_EQ_OQ>(x, vl),
                        _mm256_castsi256_ps(_mm256_cmpgt_epi32(vj, idx)),
                    ),
                );
                let m = _mm256_and_ps(_mm256_loadu_ps(w.as_ptr().add(i)), before);
                lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(m)));
                hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(m)));
                idx = _mm256_add_epi32(idx, _mm256_set1_epi32(8));
            }
            let mut lanes = [0f64; 4];
            _mm256_storeu_pd(lanes.as_mut_ptr(), _mm256_add_pd(lo, hi));
            (n, lanes.iter().sum())
        }

        /// `keep_before` over the whole 8-lane part of one block starting at token
        /// `base`: (how many it did, their sum).
        ///
        /// # Safety
        /// The CPU must support AVX2.
        #[target_feature(enable = "avx2")]
        pub(in super::super) unsafe fn keep_before_avx2(
            l: &[f32],
            w: &mut [f32],
            base: usize,
            lj: f32,
            j: usize,
        ) -> (usize, f32) {
            let n = l.len() / 8 * 8;
            let (vl, vj) = (
                _mm256_set1_ps(lj),
                _mm256_set1_epi32(j.min(i32::MAX as usize) as i32),
            );
            let b = base as i32;
            let mut idx = _mm256_setr_epi32(b, b + 1, b + 2, b + 3, b + 4, b + 5, b + 6, b + 7);
            let mut acc = _mm256_setzero_ps();
            for i in (0..n).step_by(8) {
                let x = _mm256_loadu_ps(l.as_ptr().add(i));
                let before = _mm256_or_ps(
                    _mm256_cmp_ps::<_CMP_GT_OQ>(x, vl),
                    _mm256_and_ps(
                        _mm256_cmp_ps::<_CMP_EQ_OQ>(x, vl),
                        _mm256_castsi256_ps(_mm256_cmpgt_epi32(vj, idx)),
                    ),
                );
                let m = _mm256_and_ps(_mm256_loadu_ps(w.as_ptr().add(i)), before);
                _mm256_storeu_ps(w.as_mut_ptr().add(i), m);
                acc = _mm256_add_ps(acc, m);
                idx = _mm256_add_epi32(idx, _mm256_set1_epi32(8));
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
            (n, lanes.iter().sum())
        }

        /// The 16-lane form of `mass_before_avx2`.
        ///
        /// # Safety
        /// The CPU must support AVX-512F.
        #[target_feature(enable = "avx512f")]
        pub(in super::super) unsafe fn mass_before_avx512(
            l: &[f32],
            w: &[f32],
            lj: f32,
            j: usize,
        ) -> (usize, f64) {
            let n = l.len() / 16 * 16;
            let (vl, vj) = (
                _mm512_set1_ps(lj),
                _mm512_set1_epi32(j.min(i32::MAX as usize) as i32),
            );
            let mut idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
            let (mut lo, mut hi) = (_mm512_setzero_pd(), _mm512_setzero_pd());
            for i in (0..n).step_by(16) {
                let x = _mm512_loadu_ps(l.as_ptr().add(i));
                let before = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, vl)
                    | (_mm512_cmp_ps_mask::<_CMP_EQ_OQ>(x, vl) & _mm512_cmplt_epi32_mask(idx, vj));
                let m = _mm512_maskz_mov_ps(before, _mm512_loadu_ps(w.as_ptr().add(i)));
                let upper = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(m)));
                lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(m)));
                hi = _mm512_add_pd(hi, _mm512_cvtps_pd(upper));
                idx = _mm512_add_epi32(idx, _mm512_set1_epi32(16));
            }
            (n, _mm512_reduce_add_pd(_mm512_add_pd(lo, hi)))
        }

        /// The 16-lane form of `keep_before_avx2`.
        ///
        /// # Safety
        /// The CPU must support AVX-512F.
        #[target_feature(enable = "avx512f")]
        pub(in super::super) unsafe fn keep_before_avx512(
            l: &[f32],
            w: &mut [f32],
            base: usize,
            lj: f32,
            j: usize,
        ) -> (usize, f32) {
            let n = l.len() / 16 * 16;
            let (vl, vj) = (
                _mm512_set1_ps(lj),
                _mm512_set1_epi32(j.min(i32::MAX as usize) as i32),
            );
            let mut idx = _mm512_add_epi32(
                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                _mm512_set1_epi32(base as i32),
            );
            let mut acc = _mm512_setzero_ps();
            for i in (0..n).step_by(16) {
                let x = _mm512_loadu_ps(l.as_ptr().add(i));
                let before = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, vl)
                    | (_mm512_cmp_ps_mask::<_CMP_EQ_OQ>(x, vl) & _mm512_cmplt_epi32_mask(idx, vj));
                let m = _mm512_maskz_mov_ps(before, _mm512_loadu_ps(w.as_ptr().add(i)));
                _mm512_storeu_ps(w.as_mut_ptr().add(i), m);
                acc = _mm512_add_ps(acc, m);
                idx = _mm512_add_epi32(idx, _mm512_set1_epi32(16));
            }
            (n, _mm512_reduce_add_ps(acc))
        }

        /// The 16-lane form of `weights_avx2`.
        ///
        /// # Safety
        /// The CPU must support AVX-512F.
        #[target_feature(enable = "avx512f")]
        pub(in super::super) unsafe fn weights_avx512(
            l: &[f32],
            max: f32,
            inv_t: f32,
            floor: f32,
            out: &mut [f32],
        ) -> (usize, f32) {
            debug_assert!(l.len() <= CHUNK && out.len() == l.len());
            let n = l.len() / 16 * 16;
            let (vmax, vinv, vfloor) = (
                _mm512_set1_ps(max),
                _mm512_set1_ps(inv_t),
                _mm512_set1_ps(floor),
            );
            let (lo, zero) = (_mm512_set1_ps(MIN_EXPONENT), _mm512_setzero_ps());
            let mut acc = zero;
            for i in (0..n).step_by(16) {
                let d = _mm512_mul_ps(
                    _mm512_sub_ps(_mm512_loadu_ps(l.as_ptr().add(i)), vmax),
                    vinv,
                );
                let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(d, lo)
                    & _mm512_cmp_ps_mask::<_CMP_LE_OQ>(d, zero);
                let d = _mm512_min_ps(_mm512_max_ps(d, lo), zero);
                let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                    _mm512_mul_ps(d, _mm512_set1_ps(LOG2E)),
                );
                let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(LN2_HI), d);
                let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(LN2_LO), r);
                let mut p = _mm512_set1_ps(P[0]);
                for &c in &P[1..] {
                    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
                }
                let y = _mm512_add_ps(
                    _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r),
                    _mm512_set1_ps(1.0),
                );
                let e = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(
                    _mm512_cvtps_epi32(k),
                    _mm512_set1_epi32(127),
                )));
                let w = _mm512_maskz_mov_ps(keep, _mm512_mul_ps(y, e));
                let w = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_GE_OQ>(w, vfloor), w);
                _mm512_storeu_ps(out.as_mut_ptr().add(i), w);
                acc = _mm512_add_ps(acc, w);
            }
            (n, _mm512_reduce_add_ps(acc))
        }
    }
}

/// Index of the largest logit; the first one on ties, as llama.cpp's greedy sampler.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Log-probability of a chosen token and of the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    /// The `n` most likely tokens, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Log-probabilities under the model's own distribution (the raw logits, before any
/// sampling settings), as vLLM and OpenAI report them.
pub fn logprobs(logits: &[f32], chosen: u32, n: usize) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    if n > 0 {
        for (i, &l) in logits.iter().enumerate() {
            if top.len() == n && l <= top[n - 1].1 {
                continue;
            }
            let at = top.partition_point(|e| e.1 >= l);
            top.insert(at, (i as u32, l));
            top.truncate(n);
        }
    }
    for e in &mut top {
        e.1 -= lse;
    }
    TokenLogprobs {
        logprob: logits
            .get(chosen as usize)
            .map_or(f32::NEG_INFINITY, |l| l - lse),
        top,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn greedy() -> SamplingParams {
        SamplingParams {
            temperature: 0.0,
            ..Default::default()
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.0, 3.0, 1.0, 3.0]), 1);
        let mut s = Sampler::new(greedy(), &[]);
        assert_eq!(s.sample(&[0.5, -1.0, 2.0], &[]), 2);
    }

    #[test]
    fn same_seed_same_choices_and_top_k_one_is_greedy() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let p = SamplingParams {
            top_p: 0.9,
            seed: Some(7),
            ..Default::default()
        };
        let draw = |p: &SamplingParams| -> Vec<u32> {
            let mut s = Sampler::new(p.clone(), &[]);
            (0..50).map(|_| s.sample(&logits, &[])).collect()
        };
        let a = draw(&p);
        assert_eq!(a, draw(&p));
        assert!(a.iter().any(|&x| x != a[0]), "temperature 1 should vary");
        let k1 = SamplingParams {
            top_k: 1,
            seed: Some(1),
            ..Default::default()
        };
        assert!(draw(&k1).iter().all(|&x| x == argmax(&logits)));
    }

    /// A client may send any positive top_k: one past the vocabulary (even one whose
    /// candidate buffer size would overflow) keeps every token instead of panicking.
    #[test]
    fn a_top_k_past_the_vocabulary_keeps_every_token() {
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 * 0.01).collect();
        for k in [1001, 1 << 40, usize::MAX / 2, usize::MAX] {
            let mut s = Sampler::new(
                SamplingParams {
                    top_k: k,
                    seed: Some(3),
                    ..Default::default()
                },
                &[],
            );
            let drawn: HashSet<u32> = (0..2000).map(|_| s.sample(&logits, &[])).collect();
            assert!(
                drawn.len() > 500,
                "top_k {k} drew only {} tokens",
                drawn.len()
            );
        }
    }

    /// A temperature too small to invert (1/t overflows) samples greedily, as at 0,
    /// rather than from a distribution whose weights all vanished.
    #[test]
    fn a_vanishing_temperature_is_greedy() {
        let logits = [0.5f32, -1.0, 2.0, 1.9];
        for t in [1e-39f32, 1e-30, 1e-6] {
            let mut s = Sampler::new(
                SamplingParams {
                    temperature: t,
                    seed: Some(5),
                    ..Default::default()
                },
                &[],
            );
            for _ in 0..20 {
                assert_eq!(s.sample(&logits, &[]), 2, "temperature {t}");
            }
        }
    }

    #[test]
    fn bias_bans_and_penalties_move_greedy_choices() {
        let logits = [1.0, 2.0, 3.0];
        let mut s = Sampler::new(
            SamplingParams {
                logit_bias: vec![(0, 5.0)],
                ..greedy()
            },
            &[],
        );
        assert_eq!(s.sample(&logits, &[]), 0);
        assert_eq!(s.sample(&logits, &[0]), 2, "banned tokens are never drawn");
        // Frequency penalty: each use of token 2 costs 0.6.
        let mut s = Sampler::new(
            SamplingParams {
                frequency_penalty: 0.6,
                ..greedy()
            },
            &[],
        );
        let seq: Vec<u32> = (0..4).map(|_| s.sample(&logits, &[])).collect();
        assert_eq!(seq, vec![2, 2, 1, 2]);
        // Presence penalty: once used, a token loses 1.5 for good.
        let mut s = Sampler::new(
            SamplingParams {
                presence_penalty: 1.5,
                ..greedy()
            },
            &[],
        );
        let seq: Vec<u32> = (0..3).map(|_| s.sample(&logits, &[])).collect();
        assert_eq!(seq, vec![2, 1, 2]);
        // Repetition penalty covers prompt tokens: 3/2 < 2.
        let mut s = Sampler::new(
            SamplingParams {
                repetition_penalty: 2.0,
                ..greedy()
            },
            &[2],
        );
        assert_eq!(s.sample(&logits, &[]), 1);
    }

    #[test]
    fn min_p_keeps_only_likely_tokens() {
        // Token 0 has probability ~0.98; min_p 0.1 drops everything else.
        let logits = [10.0, 5.0, 5.0, 5.0];
        let mut s = Sampler::new(
            SamplingParams {
                min_p: 0.1,
                seed: Some(3),
                ..Default::default()
            },
            &[],
        );
        assert!((0..200).all(|_| s.sample(&logits, &[]) == 0));
    }

    /// Pseudo-random logits in [-scale, scale], rounded to `step` so that ties occur.
    fn random_logits(n: usize, seed: u64, scale: f32, step: f32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let v = ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale;
                (v / step).round() * step
            })
            .collect()
    }

    /// Pearson's chi-square of `counts` against probabilities `p`.
    fn chi_square(counts: &[u64], p: &[f64]) -> f64 {
        let n: u64 = counts.iter().sum();
        counts
            .iter()
            .zip(p)
            .map(|(&c, &p)| {
                let e = p * n as f64;
                (c as f64 - e).powi(2) / e
            })
            .sum()
    }

    fn softmax(logits: &[f32], t: f64) -> Vec<f64> {
        let max = logits
            .iter()
            .fold(f64::NEG_INFINITY, |m, &l| m.max(l as f64));
        let w: Vec<f64> = logits
            .iter()
            .map(|&l| ((l as f64 - max) / t).exp())
            .collect();
        let z: f64 = w.iter().sum();
        w.iter().map(|x| x / z).collect()
    }

    #[test]
    fn every_vector_form_computes_the_weights_and_block_sums() {
        // Long enough for several blocks and a ragged tail, with non-finite logits.
        let mut logits = random_logits(3001, 9, 40.0, 0.0001);
        logits[5] = f32::NEG_INFINITY;
        logits[700] = f32::NAN;
        logits[2999] = f32::INFINITY;
        logits[1234] = 45.0;
        for isa in vector::available() {
            let max = vector::max_finite(isa, &logits);
            assert_eq!(max, 45.0, "{isa:?}");
            let (mut w, mut sums) = (Vec::new(), Vec::new());
            let total = exp_weights(isa, &logits, 0.7, 0.0, &mut w, &mut sums).unwrap();
            assert_eq!(w[1234], 1.0, "{isa:?}: the top token weighs exactly 1");
            for (i, (&l, &got)) in logits.iter().zip(&w).enumerate() {
                // The exponent as the kernels round it (its own rounding scales the
                // weight by up to |d| ulp; the exponential adds a few ulp more).
                let d = ((l - 45.0) * (1.0 / 0.7f32)) as f64;
                if !l.is_finite() || d < -86.9 {
                    assert!(got == 0.0 || d >= -87.1, "{isa:?} {i}: {l} -> {got}");
                    continue;
                }
                let want = d.exp();
                assert!(
                    ((got as f64 - want) / want).abs() < 1e-6,
                    "{isa:?} {i}: exp({d}) = {got}, want {want}"
                );
            }
            for (b, &s) in sums.iter().enumerate() {
                let exact: f64 = w[b * vector::CHUNK..]
                    .iter()
                    .take(vector::CHUNK)
                    .map(|&x| x as f64)
                    .sum();
                assert!(
                    (s as f64 - exact).abs() <= 1e-5 * exact.max(1e-30),
                    "{isa:?} block {b}"
                );
            }
            let exact: f64 = w.iter().map(|&x| x as f64).sum();
            assert!((total - exact).abs() < 1e-5 * exact);
            // The tokens more likely than a pivot (ties: lower ids), every form alike;
            // tied logits make the id comparison count.
            let mut tied = logits.clone();
            for i in (0..tied.len()).step_by(7) {
                tied[i] = 1.5;
            }
            let (mut wt, mut st) = (Vec::new(), Vec::new());
            exp_weights(isa, &tied, 0.7, 0.0, &mut wt, &mut st).unwrap();
            for pivot in [0usize, 7, 700, 1400, 2996, 1234] {
                let lp = tied[pivot];
                let before = |i: usize| tied[i] > lp || (tied[i] == lp && i < pivot);
                let want: f64 = (0..tied.len())
                    .filter(|&i| before(i))
                    .map(|i| wt[i] as f64)
                    .sum();
                let got = vector::mass_before(isa, &tied, &wt, lp, pivot);
                assert!(
                    (got - want).abs() <= 1e-12 * want.max(1.0),
                    "{isa:?} {pivot}"
                );
                let (mut kw, mut ks) = (wt.clone(), st.clone());
                vector::keep_before(isa, &tied, lp, pivot, &mut kw, &mut ks);
                for i in 0..tied.len() {
                    assert_eq!(
                        kw[i],
                        if before(i) { wt[i] } else { 0.0 },
                        "{isa:?} {pivot} {i}"
                    );
                }
                for (b, &s) in ks.iter().enumerate() {
                    let exact: f32 = kw[b * vector::CHUNK..].iter().take(vector::CHUNK).sum();
                    assert!(
                        (s - exact).abs() <= 1e-5 * exact.max(1e-30),
                        "{isa:?} block {b}"
                    );
                }
            }
            // min_p drops exactly the weights below it.
            let (mut wp, mut sp) = (Vec::new(), Vec::new());
            exp_weights(isa, &logits, 0.7, 0.01, &mut wp, &mut sp).unwrap();
            for (a, b) in w.iter().zip(&wp) {
                assert_eq!(*b, if *a >= 0.01 { *a } else { 0.0 }, "{isa:?}");
            }
        }
        let none = [f32::NAN, f32::NEG_INFINITY];
        assert!(exp_weights(
            vector::detected(),
            &none,
            1.0,
            0.0,
            &mut Vec::new(),
            &mut Vec::new()
        )
        .is_none());
    }

    #[test]
    fn whole_vocabulary_draws_follow_the_softmax() {
        // A small vocabulary, every token counted, one of them banned.
        let logits = [1.0f32, 2.5, 0.0, -1.0, 3.0, 2.9, -4.0, 0.5, 1.5, 2.0];
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 0.8,
                seed: Some(42),
                ..Default::default()
            },
            &[],
        );
        let mut counts = [0u64; 10];
        for _ in 0..100_000 {
            counts[s.choose(&logits, &[3]) as usize] += 1;
        }
        assert_eq!(counts[3], 0, "a banned token was drawn");
        let mut allowed = logits;
        allowed[3] = f32::NEG_INFINITY;
        let p = softmax(&allowed, 0.8);
        let (c, p): (Vec<u64>, Vec<f64>) = counts
            .iter()
            .zip(&p)
            .filter(|(_, &p)| p > 0.0)
            .map(|(&c, &p)| (c, p))
            .unzip();
        // 8 degrees of freedom: P(chi2 > 45) < 1e-6 when the draws follow p.
        let x2 = chi_square(&c, &p);
        assert!(x2 < 45.0, "chi-square {x2}: {counts:?}");

        // A vocabulary of several blocks, counted in 30 bins of 100 ids.
        let logits = random_logits(3000, 3, 6.0, 0.001);
        let p = softmax(&logits, 1.0);
        let mut s = Sampler::new(
            SamplingParams {
                seed: Some(7),
                ..Default::default()
            },
            &[],
        );
        let mut bins = [0u64; 30];
        for _ in 0..60_000 {
            bins[s.sample(&logits, &[]) as usize / 100] += 1;
        }
        let pb: Vec<f64> = p.chunks(100).map(|c| c.iter().sum()).collect();
        // 29 degrees of freedom: P(chi2 > 80) < 1e-6.
        let x2 = chi_square(&bins, &pb);
        assert!(x2 < 80.0, "chi-square {x2}");
    }

    /// What `select` keeps, most likely first: every token left for a plain draw, the
    /// tokens the nucleus test accepts for a `top_p` draw.
    fn kept(s: &mut Sampler, logits: &[f32]) -> Vec<u32> {
        let mut ids: Vec<u32> = match s.select(logits, &[]) {
            Selection::Token(t) => return vec![t],
            Selection::Candidates => return s.candidates.iter().map(|c| c.id).collect(),
            Selection::Weights => (0..logits.len() as u32)
                .filter(|&i| s.weights[i as usize] > 0.0)
                .collect(),
            Selection::Nucleus(target) => (0..logits.len() as u32)
                .filter(|&i| {
                    let (l, i) = (logits[i as usize], i as usize);
                    s.weights[i] > 0.0
                        && vector::mass_before(vector::detected(), logits, &s.weights, l, i)
                            < target
                })
                .collect(),
        };
        ids.sort_by(|&a, &b| by_logit(logits[a as usize], a, logits[b as usize], b));
        ids
    }

    /// The sets by the definitions, sorting everything: on the sampler's own weights,
    /// most likely first (logit, then id), top_k, then the shortest prefix reaching top_p.
    fn reference(logits: &[f32], w: &[f32], sums: &[f32], p: &SamplingParams) -> Vec<u32> {
        let mut ids: Vec<u32> = (0..logits.len() as u32)
            .filter(|&i| w[i as usize] > 0.0)
            .collect();
        ids.sort_by(|&a, &b| by_logit(logits[a as usize], a, logits[b as usize], b));
        if p.top_k > 0 {
            ids.truncate(p.top_k);
        }
        if p.top_p < 1.0 {
            let mass: f64 = if p.top_k > 0 {
                ids.iter().map(|&i| w[i as usize] as f64).sum()
            } else {
                sums.iter().map(|&s| s as f64).sum()
            };
            let mut acc = 0.0;
            let cut = ids
                .iter()
                .position(|&i| {
                    acc += w[i as usize] as f64;
                    acc >= p.top_p as f64 * mass
                })
                .map_or(ids.len(), |k| k + 1);
            ids.truncate(cut);
        }
        ids
    }

    #[test]
    fn top_p_top_k_and_min_p_keep_exactly_the_reference_sets() {
        let settings = [
            (1.0, 0, 0.9, 0.0),
            (1.0, 0, 0.5, 0.0),
            (0.7, 0, 0.95, 0.0),
            (1.3, 0, 0.99, 0.0),
            (2.0, 0, 0.999, 0.0),
            (1.0, 40, 1.0, 0.0),
            (1.0, 7, 0.8, 0.0),
            (0.5, 3000, 0.9, 0.0),
            (1.0, 0, 1.0, 0.05),
            (1.0, 0, 0.9, 0.02),
            (0.8, 50, 0.95, 0.01),
        ];
        for trial in 0..40u64 {
            // Coarse logits give ties; a flat or a peaked distribution by turns.
            let scale = [2.0, 8.0, 20.0][trial as usize % 3];
            let step = [0.5, 0.01, 0.0001][trial as usize % 3];
            let n = 2000 + 517 * (trial as usize % 5);
            let logits = random_logits(n, trial + 100, scale, step);
            for &(temperature, top_k, top_p, min_p) in &settings {
                let params = SamplingParams {
                    temperature,
                    top_k,
                    top_p,
                    min_p,
                    seed: Some(1),
                    ..Default::default()
                };
                let mut s = Sampler::new(params.clone(), &[]);
                let got = kept(&mut s, &logits);
                let want = reference(&logits, &s.weights, &s.chunk_sums, &params);
                assert_eq!(got, want, "trial {trial}, {params:?}");
                if min_p > 0.0 {
                    // min_p by its definition, on exact exponentials.
                    let max = logits.iter().fold(f32::MIN, |m, &l| m.max(l)) as f64;
                    for (i, &l) in logits.iter().enumerate() {
                        let w = ((l as f64 - max) / temperature as f64).exp();
                        let kept = s.weights[i] > 0.0;
                        if w >= min_p as f64 * (1.0 + 1e-6) {
                            assert!(
                                kept,
                                "trial {trial}: token {i} ({w}) dropped by min_p {min_p}"
                            );
                        } else if w < min_p as f64 * (1.0 - 1e-6) {
                            assert!(
                                !kept,
                                "trial {trial}: token {i} ({w}) kept by min_p {min_p}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn ties_are_cut_by_token_id() {
        let logits = [1.0f32, 3.0, 3.0, 3.0, 2.0];
        let mut s = Sampler::new(
            SamplingParams {
                top_k: 2,
                ..Default::default()
            },
            &[],
        );
        assert_eq!(kept(&mut s, &logits), vec![1, 2]);
        let flat = [0.5f32; 8];
        let mut s = Sampler::new(
            SamplingParams {
                top_p: 0.5,
                ..Default::default()
            },
            &[],
        );
        assert_eq!(kept(&mut s, &flat), vec![0, 1, 2, 3]);
        let mut s = Sampler::new(
            SamplingParams {
                top_p: 0.3,
                ..Default::default()
            },
            &[],
        );
        assert_eq!(kept(&mut s, &flat), vec![0, 1, 2]);
    }

    #[test]
    fn nucleus_draws_follow_the_renormalised_softmax() {
        // A broad nucleus (few rejections) and a narrow one (many), and top_k with top_p.
        let logits = random_logits(5000, 11, 10.0, 0.001);
        for (top_p, top_k) in [(0.8, 0), (0.2, 0), (0.9, 30)] {
            let params = SamplingParams {
                temperature: 0.9,
                top_p,
                top_k,
                seed: Some(5),
                ..Default::default()
            };
            let mut s = Sampler::new(params.clone(), &[]);
            let set = kept(&mut s, &logits);
            assert!(set.len() > 5, "a nucleus of {} tokens", set.len());
            let sub: Vec<f32> = set.iter().map(|&i| logits[i as usize]).collect();
            let p = softmax(&sub, 0.9);
            let mut counts = vec![0u64; set.len()];
            for _ in 0..40_000 {
                let t = s.sample(&logits, &[]);
                let at = set
                    .iter()
                    .position(|&x| x == t)
                    .expect("drawn from the nucleus");
                counts[at] += 1;
            }
            // Merge the rare tail into one cell so every expected count is large.
            let (mut c, mut q) = (Vec::new(), Vec::new());
            let (mut tc, mut tq) = (0, 0.0);
            for (&n, &p) in counts.iter().zip(&p) {
                if p * 40_000.0 >= 20.0 {
                    c.push(n);
                    q.push(p);
                } else {
                    tc += n;
                    tq += p;
                }
            }
            if tq > 0.0 {
                c.push(tc);
                q.push(tq);
            }
            let df = c.len() - 1;
            let x2 = chi_square(&c, &q);
            // Far beyond the 1e-6 tail for these degrees of freedom.
            assert!(
                x2 < df as f64 + 10.0 * (2.0 * df as f64).sqrt() + 20.0,
                "top_p {top_p}, top_k {top_k}: chi-square {x2} with {df} df"
            );
        }
    }

    #[test]
    fn logprobs_are_a_normalised_log_softmax() {
        let logits = [1.0f32, 3.0, 2.0, 0.5];
        let lp = logprobs(&logits, 2, 2);
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        assert!((lp.logprob - (2f32.exp() / z).ln()).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|e| e.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!((lp.top[0].1 - (3f32.exp() / z).ln()).abs() < 1e-6);
        assert!(logprobs(&logits, 0, 0).top.is_empty());
    }
}
