//! Matrix-multiply kernels over quantized weights.
//!
//! Activations are quantized once per matrix input into 8-bit blocks of 32 (`QuantizedActs`);
//! every quantized weight type is then multiplied with integer dot products. Each kernel
//! exists as portable scalar code and, for the hot types, as AVX2 code picked at run time
//! (plus VNNI tiles for the packed matrices where the CPU has them). The scalar code is the
//! reference the SIMD code is tested against.

mod attention;
mod avx2;
mod avx2_float;
mod avx512;
#[cfg(all(test, target_arch = "x86_64"))]
mod bench;
mod expf;
mod f32_acts;
mod geglu;
mod packed;
mod packed_k;
mod packed_q5;
mod packed_vnni;
mod prefill_attention;
mod scalar;
mod swiglu;

pub use attention::{attend_tile, CacheRows, TileQueries, TileScratch};
pub use expf::exp_many;
pub use f32_acts::gemm as gemm_f32_acts;
pub use geglu::geglu;
pub use packed::{PackedMatrix, PackedQ4_1x8, PackedQ8_0x8, PACK_ROWS};
pub use packed_k::PackedKx8;
pub use packed_q5::PackedQ5x8;
#[cfg(target_arch = "x86_64")]
pub use packed_vnni::{detected_vnni, Vnni};
pub use swiglu::swiglu;

use std::marker::PhantomData;
use std::ops::Range;
use std::sync::OnceLock;

use half::f16;

use crate::gguf::quant::GgmlType;

/// Elements per activation block.
pub const QK8: usize = 32;

/// A batch of activation rows quantized to 8-bit blocks of 32.
///
/// Per block: `d` (the scale, rounded through f16 exactly as llama.cpp stores it),
/// `s = d * sum(q)` (also f16-rounded), which the offset formats (Q4_1, k-quants) need,
/// and `sum(q)` itself, exact, for kernels that multiply unsigned codes and take the
/// centre off afterwards (Q5_0's packed tiles).
#[derive(Default)]
pub struct QuantizedActs {
    pub n_rows: usize,
    pub row_len: usize,
    pub qs: Vec<i8>,
    pub d: Vec<f32>,
    pub s: Vec<f32>,
    pub sum: Vec<i32>,
}

impl QuantizedActs {
    /// Blocks per row.
    pub fn blocks_per_row(&self) -> usize {
        self.row_len / QK8
    }

    /// Quantizes `n_rows` rows of `row_len` floats, reusing this buffer's allocations.
    pub fn quantize(&mut self, x: &[f32], n_rows: usize, row_len: usize) {
        debug_assert_eq!(x.len(), n_rows * row_len);
        debug_assert_eq!(row_len % QK8, 0);
        self.n_rows = n_rows;
        self.row_len = row_len;
        let nb = n_rows * row_len / QK8;
        self.qs.resize(n_rows * row_len, 0);
        self.d.resize(nb, 0.0);
        self.s.resize(nb, 0.0);
        self.sum.resize(nb, 0);
        let set = detected();
        for (b, (xb, qb)) in x
            .chunks_exact(QK8)
            .zip(self.qs.chunks_exact_mut(QK8))
            .enumerate()
        {
            let (amax, sum) = match set {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: Avx2 is only detected when the CPU has avx2, fma and f16c.
                KernelSet::Avx2 => unsafe { avx2::quantize_block(xb, qb) },
                _ => quantize_block_scalar(xb, qb),
            };
            let d = amax / 127.0;
            self.d[b] = f16::from_f32(d).to_f32();
            self.s[b] = f16::from_f32(d * sum as f32).to_f32();
            self.sum[b] = sum;
        }
    }
}

fn quantize_block_scalar(xb: &[f32], qb: &mut [i8]) -> (f32, i32) {
    let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in qb.iter_mut().zip(xb) {
        // Ties to even, as the AVX2 rounding llama.cpp uses on x86.
        let r = (v * id).round_ties_even() as i32;
        *q = r as i8;
        sum += r;
    }
    (amax, sum)
}

/// Float dot product (attention scores).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if detected() == KernelSet::Avx2 && a.len().is_multiple_of(8) {
        // SAFETY: the CPU reported avx2, fma and f16c.
        return unsafe { avx2::dot(a, b) };
    }
    scalar::dot_f32(a, b)
}

/// `out = x * s + out`, rounded to f16 precision when `round` (llama.cpp's f16 accumulator).
pub fn axpy(out: &mut [f32], x: &[f32], s: f32, round: bool) {
    #[cfg(target_arch = "x86_64")]
    if detected() == KernelSet::Avx2 && out.len().is_multiple_of(8) {
        // SAFETY: the CPU reported avx2, fma and f16c.
        return unsafe { avx2::axpy(out, x, s, round) };
    }
    for (o, &v) in out.iter_mut().zip(x) {
        let r = v * s + *o;
        *o = if round { f16::from_f32(r).to_f32() } else { r };
    }
}

/// `dst[i] = src[i]` rounded to f16 precision (round to nearest even), kept as f32.
pub fn round_f16(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if detected() == KernelSet::Avx2 {
        // SAFETY: the CPU reported avx2, fma and f16c.
        done = unsafe { avx2::round_f16(dst, src) };
    }
    for (d, &x) in dst[done..].iter_mut().zip(&src[done..]) {
        *d = f16::from_f32(x).to_f32();
    }
}

/// `dst[i]` = the f16 bits of `src[i]`, rounded to nearest even (F16C where available).
pub fn f32_to_f16(dst: &mut [u16], src: &[f32]) {
    assert_eq!(dst.len(), src.len());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if detected() == KernelSet::Avx2 {
        // SAFETY: the CPU reported avx2, fma and f16c.
        done = unsafe { avx2::f32_to_f16(dst, src) };
    }
    for (d, &x) in dst[done..].iter_mut().zip(&src[done..]) {
        *d = f16::from_f32(x).to_bits();
    }
}

/// `dst[i]` = the f16 whose bits are `src[i]`, widened to f32 (exact; F16C where
/// available).
pub fn f16_to_f32(dst: &mut [f32], src: &[u16]) {
    assert_eq!(dst.len(), src.len());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if detected() == KernelSet::Avx2 {
        // SAFETY: the CPU reported avx2, fma and f16c.
        done = unsafe { avx2::f16_to_f32(dst, src) };
    }
    for (d, &x) in dst[done..].iter_mut().zip(&src[done..]) {
        *d = f16::from_bits(x).to_f32();
    }
}

/// Rows `0..n` of `hd` f16 values (bits; row `i` at `src[i * stride..]`) widened to f32
/// into `dst`, back to back.
pub fn widen_rows(dst: &mut [f32], src: &[u16], stride: usize, n: usize, hd: usize) {
    #[cfg(target_arch = "x86_64")]
    if detected() == KernelSet::Avx2 && hd.is_multiple_of(8) {
        // SAFETY: the CPU reported avx2, fma and f16c; the kernel checks the lengths.
        return unsafe { avx2::widen_rows(dst, src, stride, n, hd) };
    }
    for i in 0..n {
        f16_to_f32(
            &mut dst[i * hd..(i + 1) * hd],
            &src[i * stride..i * stride + hd],
        );
    }
}

/// `out *= s`, rounded to f16 precision when `round`.
pub fn scale(out: &mut [f32], s: f32, round: bool) {
    #[cfg(target_arch = "x86_64")]
    if detected() == KernelSet::Avx2 && out.len().is_multiple_of(8) {
        // SAFETY: the CPU reported avx2, fma and f16c.
        return unsafe { avx2::scale(out, s, round) };
    }
    for o in out.iter_mut() {
        let r = *o * s;
        *o = if round { f16::from_f32(r).to_f32() } else { r };
    }
}

/// The running maximum and denominator of an online softmax.
#[derive(Debug, Clone, Copy)]
pub struct OnlineSoftmax {
    pub max: f32,
    pub sum: f32,
}

impl Default for OnlineSoftmax {
    fn default() -> Self {
        OnlineSoftmax {
            max: f32::NEG_INFINITY,
            sum: 0.0,
        }
    }
}

/// Whether `n` rows of `row` elements, `stride` apart, fit in a slice of `len`: checked,
/// so that no stride a safe caller passes can wrap the bound and let a kernel read past it.
pub(crate) fn rows_fit(len: usize, n: usize, stride: usize, row: usize) -> bool {
    n == 0
        || (n - 1)
            .checked_mul(stride)
            .and_then(|x| x.checked_add(row))
            .is_some_and(|need| len >= need)
}

/// Folds `n` keys and values into one head's online-softmax attention, in the order and
/// rounding of llama.cpp's CPU flash attention (f16 accumulator when `round`).
///
/// Row `i` of K is `k[i * stride..][..q.len()]`, likewise V; `out` is the unnormalised
/// weighted sum of V (divide by `state.sum` at the end).
#[allow(clippy::too_many_arguments)]
pub fn attend(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    stride: usize,
    n: usize,
    scale: f32,
    round: bool,
    state: &mut OnlineSoftmax,
    out: &mut [f32],
) {
    let hd = q.len();
    assert!(out.len() == hd && n > 0);
    assert!(rows_fit(k.len(), n, stride, hd) && rows_fit(v.len(), n, stride, hd));
    #[cfg(target_arch = "x86_64")]
    if detected() == KernelSet::Avx2 && hd.is_multiple_of(8) {
        // SAFETY: the CPU reported avx2, fma and f16c; lengths asserted above.
        return unsafe { avx2::attend(q, k, v, stride, n, scale, round, state, out) };
    }
    for i in 0..n {
        let sc = scalar::dot_f32(q, &k[i * stride..i * stride + hd]) * scale;
        let (mut ms, mut vs) = (1f32, 1f32);
        if sc > state.max {
            ms = (state.max - sc).exp();
            state.max = sc;
            scale_rows(out, ms, round);
        } else {
            vs = (sc - state.max).exp();
        }
        for (o, &x) in out.iter_mut().zip(&v[i * stride..i * stride + hd]) {
            let r = x * vs + *o;
            *o = if round { f16::from_f32(r).to_f32() } else { r };
        }
        state.sum = state.sum * ms + vs;
    }
}

fn scale_rows(out: &mut [f32], s: f32, round: bool) {
    for o in out.iter_mut() {
        let r = *o * s;
        *o = if round { f16::from_f32(r).to_f32() } else { r };
    }
}

/// An output matrix, `out[token * stride + row]`, that several threads fill at once.
///
/// It holds the buffer's exclusive borrow for `'a`, so it cannot outlive the buffer and
/// nothing else reads or writes the buffer meanwhile; copies of it go to the threads.
/// Writing is `unsafe` because the type cannot check the one remaining rule: no two
/// threads touch the same cell at the same time (each takes its own weight rows, or
/// its own tokens and heads).
#[derive(Clone, Copy)]
pub struct OutMatrix<'a> {
    ptr: *mut f32,
    len: usize,
    /// Distance between consecutive token rows (the weight's row count).
    stride: usize,
    _buf: PhantomData<&'a mut [f32]>,
}

// SAFETY: the buffer is exclusively borrowed for 'a and only reached through the
// `unsafe` writes below, whose contract forbids two threads touching one cell at once.
unsafe impl Send for OutMatrix<'_> {}
unsafe impl Sync for OutMatrix<'_> {}

impl<'a> OutMatrix<'a> {
    /// Wraps `out`, laid out as `out[token * stride + row]`.
    pub fn new(out: &'a mut [f32], stride: usize) -> Self {
        OutMatrix {
            ptr: out.as_mut_ptr(),
            len: out.len(),
            stride,
            _buf: PhantomData,
        }
    }

    /// Distance between consecutive token rows.
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// Sets cell (`token`, `row`); panics when it is out of bounds.
    ///
    /// # Safety
    /// No other thread may read or write this cell while this runs.
    #[inline]
    pub unsafe fn set(&self, token: usize, row: usize, v: f32) {
        let i = token * self.stride + row;
        assert!(row < self.stride && i < self.len);
        // SAFETY: in bounds (checked above); exclusive access is the caller's contract.
        unsafe { *self.ptr.add(i) = v }
    }

    /// Copies `src` into cells `row..row + src.len()` of one token row; panics when they
    /// are out of bounds.
    ///
    /// # Safety
    /// No other thread may read or write these cells while this runs.
    #[inline]
    pub unsafe fn write(&self, token: usize, row: usize, src: &[f32]) {
        let dst = self.cells(token, row, src.len());
        // SAFETY: `cells` checked the bounds; the buffer is borrowed exclusively by us
        // (so it cannot overlap `src`), and exclusive access to the cells is the
        // caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) }
    }

    /// Pointer to `n` consecutive cells of one token row, bounds checked. Writes through
    /// it are bound by the contract of [`OutMatrix::set`].
    #[inline]
    pub(crate) fn cells(&self, token: usize, row: usize, n: usize) -> *mut f32 {
        let i = token * self.stride + row;
        assert!(row + n <= self.stride && i + n <= self.len);
        // In bounds (checked above), so the offset stays inside the allocation.
        self.ptr.wrapping_add(i)
    }
}

/// Which kernel family this CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelSet {
    Scalar,
    Avx2,
}

/// The best kernel set this CPU supports, detected once.
pub fn detected() -> KernelSet {
    static SET: OnceLock<KernelSet> = OnceLock::new();
    *SET.get_or_init(|| {
        if std::env::var_os("SLUICE_FORCE_SCALAR").is_some() {
            return KernelSet::Scalar;
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            return KernelSet::Avx2;
        }
        KernelSet::Scalar
    })
}

/// Whether AVX-512 kernels may run where the CPU has them: `SLUICE_NO_AVX512` turns them
/// off, to run (and compare) as on an AVX2-only CPU. Read once by each detector.
pub(crate) fn avx512_allowed() -> bool {
    std::env::var_os("SLUICE_NO_AVX512").is_none()
}

/// Whether this process runs the AVX-512 forms of the kernels that have one. ggml's
/// SwiGLU (which `swiglu` ports) rounds differently in its AVX-512 and AVX2 forms, so
/// this decides which llama.cpp build our results match bit for bit: a native build on
/// an AVX-512 CPU, or an AVX2-only build.
pub fn avx512_in_use() -> bool {
    #[cfg(target_arch = "x86_64")]
    return swiglu::avx512_detected();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The kernels in use, for logs: the family, plus the VNNI encoding of the packed tiles.
pub fn describe() -> &'static str {
    match detected() {
        KernelSet::Scalar => "scalar",
        #[cfg(target_arch = "x86_64")]
        KernelSet::Avx2 => match detected_vnni() {
            Some(Vnni::Avx512) => "avx2+avx512-vnni",
            Some(Vnni::Avx) => "avx2+avx-vnni",
            None => "avx2",
        },
        #[cfg(not(target_arch = "x86_64"))]
        KernelSet::Avx2 => "avx2",
    }
}

/// The CPU's model name (`/proc/cpuinfo` on Linux; the architecture elsewhere).
pub fn cpu_model_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// The CPU features our kernels use, as (name, present on this CPU), whatever the
/// `SLUICE_NO_*` variables ask.
pub fn cpu_features() -> Vec<(&'static str, bool)> {
    #[cfg(target_arch = "x86_64")]
    {
        vec![
            ("AVX2", is_x86_feature_detected!("avx2")),
            ("FMA", is_x86_feature_detected!("fma")),
            ("F16C", is_x86_feature_detected!("f16c")),
            ("AVX-512", is_x86_feature_detected!("avx512f")),
            (
                "AVX-512 VNNI",
                is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl"),
            ),
            ("AVX-VNNI", is_x86_feature_detected!("avxvnni")),
        ]
    }
    #[cfg(not(target_arch = "x86_64"))]
    vec![]
}

/// One line for benchmark output: the CPU, its features (yes/no) and the kernels in use,
/// with any `SLUICE_*` override that changed them.
pub fn cpu_summary() -> String {
    let features: Vec<String> = cpu_features()
        .iter()
        .map(|(name, has)| format!("{name} {}", if *has { "yes" } else { "no" }))
        .collect();
    let overrides: Vec<&str> = ["SLUICE_FORCE_SCALAR", "SLUICE_NO_AVX512", "SLUICE_NO_VNNI"]
        .into_iter()
        .filter(|v| std::env::var_os(v).is_some())
        .collect();
    #[cfg(target_arch = "x86_64")]
    let attention = if avx512::detected() {
        "avx512"
    } else {
        describe_family()
    };
    #[cfg(not(target_arch = "x86_64"))]
    let attention = describe_family();
    format!(
        "CPU: {}; {}; kernels in use: {} (attention {attention}, SwiGLU {}){}",
        cpu_model_name(),
        if features.is_empty() {
            "no x86 features".to_string()
        } else {
            features.join(", ")
        },
        describe(),
        swiglu::form(),
        if overrides.is_empty() {
            String::new()
        } else {
            format!(", set: {}", overrides.join(" "))
        }
    )
}

/// The kernel family alone: `scalar` or `avx2`.
fn describe_family() -> &'static str {
    match detected() {
        KernelSet::Scalar => "scalar",
        KernelSet::Avx2 => "avx2",
    }
}

/// Whether `ty` is multiplied against quantized (rather than float) activations.
pub fn wants_quantized_acts(ty: GgmlType) -> bool {
    !matches!(ty, GgmlType::F32 | GgmlType::F16)
}

/// Computes `out[t][r] = dot(weight row r, activation row t)` for `r` in `rows` and every token.
///
/// `w` holds the whole matrix (`row_bytes` per row). Float weights read `acts_f32`
/// (`n_tokens × k`); quantized ones read `acts_q`.
///
/// # Safety
/// No other thread may access the cells `(t, r)` of `out`, `r` in `rows`, while this
/// runs: calls on copies of one `OutMatrix` at the same time take disjoint `rows`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm(
    set: KernelSet,
    ty: GgmlType,
    w: &[u8],
    k: usize,
    rows: Range<usize>,
    acts_q: &QuantizedActs,
    acts_f32: &[f32],
    out: OutMatrix,
) {
    // SAFETY (all arms): the kernels write only cells (t, r) with r in `rows`, which the
    // caller gives us alone.
    match ty {
        GgmlType::F32 | GgmlType::F16 if set == KernelSet::Avx2 => {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `set` is Avx2 only when the CPU reported avx2, fma and f16c.
            unsafe {
                avx2_float::gemm(ty, w, k, rows, acts_f32, out)
            }
            #[cfg(not(target_arch = "x86_64"))]
            unsafe {
                scalar::gemm_float(ty, w, k, rows, acts_f32, out)
            }
        }
        GgmlType::F32 | GgmlType::F16 => unsafe {
            scalar::gemm_float(ty, w, k, rows, acts_f32, out)
        },
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0
            if set == KernelSet::Avx2 =>
        {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `set` is Avx2 only when the CPU reported avx2, fma and f16c.
            unsafe {
                avx2::gemm(ty, w, k, rows, acts_q, out)
            }
            #[cfg(not(target_arch = "x86_64"))]
            unsafe {
                scalar::gemm_quant(ty, w, k, rows, acts_q, out)
            }
        }
        _ => unsafe { scalar::gemm_quant(ty, w, k, rows, acts_q, out) },
    }
}

/// [`gemm`] for a matrix repacked by [`PackedMatrix::pack`]; `rows` are multiples of
/// [`PACK_ROWS`]. Matrices are packed only when this CPU runs the AVX2 kernels.
///
/// # Safety
/// As for [`gemm`]: no other thread may access the cells of `out` in `rows` meanwhile.
pub unsafe fn gemm_packed(
    w: &PackedMatrix,
    rows: Range<usize>,
    acts: &QuantizedActs,
    out: OutMatrix,
) {
    assert_eq!(
        detected(),
        KernelSet::Avx2,
        "packed weights need the AVX2 kernels"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU reported avx2, fma and f16c, and the VNNI encoding when one is
    // used; the cells of `rows` are ours (the caller's contract).
    unsafe {
        match detected_vnni() {
            Some(vnni) => packed_vnni::gemm_packed_vnni(vnni, w, rows, acts, out),
            None => packed::gemm_packed_avx2(w, rows, acts, out),
        }
    }
}

/// What the kernel tests can run here, and how they say what they could not.
#[cfg(test)]
pub(crate) mod test_support {
    use std::io::Write;

    use crate::gguf::quant::GgmlType;

    /// Every weight type the kernels multiply.
    pub(crate) const WEIGHT_TYPES: [GgmlType; 10] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];

    /// `n` pseudo-random floats in [-1, 1) from `seed` (xorshift): test inputs that
    /// every run sees alike.
    pub(crate) fn pseudo(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// Tells the person running the tests (libtest does not capture a direct stderr
    /// write) that part of a test did not run, and why.
    pub(crate) fn skipped(test: &str, why: &str) {
        let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
    }

    /// Whether the AVX2 kernels (and the packed tiles) can run.
    pub(crate) fn avx2() -> Result<(), String> {
        if super::detected() == super::KernelSet::Avx2 {
            return Ok(());
        }
        if std::env::var_os("SLUICE_FORCE_SCALAR").is_some() {
            return Err("SLUICE_FORCE_SCALAR is set".into());
        }
        Err("the CPU lacks AVX2, FMA or F16C".into())
    }

    /// Whether the AVX-512 SwiGLU and attention kernels can run (the CPU has AVX-512 F,
    /// DQ and VL, whatever `SLUICE_NO_AVX512` picks).
    pub(crate) fn avx512() -> Result<(), String> {
        avx2()?;
        #[cfg(target_arch = "x86_64")]
        if super::avx512::cpu_has() {
            return Ok(());
        }
        Err("the CPU lacks AVX-512 F, DQ or VL".into())
    }

    /// Whether the packed tiles in this VNNI encoding can run (whatever `SLUICE_NO_VNNI`).
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn vnni(v: super::Vnni) -> Result<(), String> {
        avx2()?;
        if super::packed_vnni::encodings_on_this_cpu().contains(&v) {
            Ok(())
        } else {
            Err(format!("the CPU lacks {}", vnni_name(v)))
        }
    }

    #[cfg(target_arch = "x86_64")]
    pub(crate) fn vnni_name(v: super::Vnni) -> &'static str {
        match v {
            super::Vnni::Avx512 => "avx512-vnni",
            super::Vnni::Avx => "avx-vnni",
        }
    }

    /// Every kernel set the tests know, with whether they run it on this CPU.
    pub(crate) fn kernel_sets() -> Vec<(&'static str, Result<(), String>)> {
        #[allow(unused_mut)]
        let mut v = vec![("scalar", Ok(())), ("avx2", avx2()), ("avx512", avx512())];
        #[cfg(target_arch = "x86_64")]
        for e in [super::Vnni::Avx512, super::Vnni::Avx] {
            v.push((vnni_name(e), vnni(e)));
        }
        #[cfg(not(target_arch = "x86_64"))]
        for name in ["avx512-vnni", "avx-vnni"] {
            v.push((name, Err("not an x86-64 build".to_string())));
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{self, skipped};
    use super::*;
    use crate::gguf::quant::{dequantize_row, quantize::quantize_row};

    /// The suite's summary line: which kernel sets the kernel tests exercise on this
    /// CPU, and which they cannot (each skipping test also says so).
    #[test]
    fn kernel_sets_exercised() {
        let sets = test_support::kernel_sets();
        let ran: Vec<&str> = sets
            .iter()
            .filter(|(_, r)| r.is_ok())
            .map(|(n, _)| *n)
            .collect();
        let not: Vec<String> = sets
            .iter()
            .filter_map(|(n, r)| r.as_ref().err().map(|why| format!("{n} ({why})")))
            .collect();
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            format!(
                "kernel sets exercised: {}; not on this CPU: {}\n{}\n",
                ran.join(", "),
                if not.is_empty() {
                    "none".to_string()
                } else {
                    not.join(", ")
                },
                cpu_summary()
            )
            .as_bytes(),
        );
        assert_eq!(ran[0], "scalar");
    }

    fn pseudo(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Plain dequantize-then-multiply, in f64: the ground truth.
    fn reference(
        ty: GgmlType,
        w: &[u8],
        rows: usize,
        k: usize,
        x: &[f32],
        n_tok: usize,
    ) -> Vec<f64> {
        let mut out = vec![0f64; n_tok * rows];
        let mut row = vec![0f32; k];
        for r in 0..rows {
            dequantize_row(
                ty,
                &w[r * ty.row_bytes(k)..(r + 1) * ty.row_bytes(k)],
                &mut row,
            );
            for t in 0..n_tok {
                out[t * rows + r] = row
                    .iter()
                    .zip(&x[t * k..(t + 1) * k])
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum();
            }
        }
        out
    }

    fn run(
        set: KernelSet,
        ty: GgmlType,
        w: &[u8],
        rows: usize,
        k: usize,
        x: &[f32],
        n_tok: usize,
    ) -> Vec<f32> {
        let mut q = QuantizedActs::default();
        q.quantize(x, n_tok, k);
        let mut out = vec![f32::NAN; n_tok * rows];
        let om = OutMatrix::new(&mut out, rows);
        // Split rows into two ranges to exercise the range handling as threads do.
        let mid = rows / 2 + 1;
        // SAFETY: one thread, disjoint row ranges.
        unsafe {
            gemm(set, ty, w, k, 0..mid, &q, x, om);
            gemm(set, ty, w, k, mid..rows, &q, x, om);
        }
        out
    }

    #[test]
    fn every_kernel_matches_dequantize_then_multiply() {
        let sets: Vec<KernelSet> = match test_support::avx2() {
            Ok(()) => vec![KernelSet::Scalar, KernelSet::Avx2],
            Err(why) => {
                skipped(
                    "every_kernel_matches_dequantize_then_multiply (avx2 part)",
                    &why,
                );
                vec![KernelSet::Scalar]
            }
        };
        // Odd row and token counts hit every tile remainder path.
        for &(rows, k, n_tok) in &[
            (7usize, 256usize, 1usize),
            (13, 512, 3),
            (9, 256, 7),
            (4, 768, 2),
        ] {
            let x = pseudo(n_tok * k, 7 + rows as u64);
            let wf = pseudo(rows * k, 99 + k as u64);
            for ty in test_support::WEIGHT_TYPES {
                let w: Vec<u8> = wf
                    .chunks_exact(k)
                    .flat_map(|r| quantize_row(ty, r))
                    .collect();
                let truth = reference(ty, &w, rows, k, &x, n_tok);
                let scalar = run(KernelSet::Scalar, ty, &w, rows, k, &x, n_tok);
                for &set in &sets {
                    let got = run(set, ty, &w, rows, k, &x, n_tok);
                    for i in 0..truth.len() {
                        // Activation quantization costs ~0.4% of the row's magnitude;
                        // float weights read float activations and must be near exact.
                        let scale = (k as f64).sqrt() * 0.6;
                        let tol = if wants_quantized_acts(ty) {
                            0.02 * scale
                        } else {
                            1e-4 * scale
                        };
                        assert!(
                            (got[i] as f64 - truth[i]).abs() <= tol,
                            "{set:?} {} rows={rows} k={k} n_tok={n_tok} i={i}: {} vs {}",
                            ty.name(),
                            got[i],
                            truth[i]
                        );
                        // SIMD and scalar compute the same integer sums; only the
                        // float summation order differs.
                        assert!(
                            (got[i] - scalar[i]).abs() <= 1e-4 * (1.0 + scalar[i].abs()),
                            "{set:?} vs scalar {}: {} vs {}",
                            ty.name(),
                            got[i],
                            scalar[i]
                        );
                    }
                }
            }
        }
    }

    /// The F16C conversions of the KV cache equal the portable ones: widening on all
    /// 65,536 f16 values, narrowing on ties, subnormals, overflow and a sweep.
    #[test]
    fn f16_conversions_equal_the_portable_ones() {
        if let Err(why) = test_support::avx2() {
            skipped("f16_conversions_equal_the_portable_ones (F16C part)", &why);
        }
        let same = |a: f32, b: f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let mut wide = vec![0f32; all.len()];
        f16_to_f32(&mut wide, &all);
        for (&h, &w) in all.iter().zip(&wide) {
            assert!(same(w, f16::from_bits(h).to_f32()), "{h:#06x}: {w}");
        }
        // The same through `widen_rows`, three rows of 24 at a stride of 40.
        let mut rows = vec![0f32; 3 * 24];
        widen_rows(&mut rows, &all[1000..], 40, 3, 24);
        for i in 0..3 {
            for x in 0..24 {
                assert!(same(rows[i * 24 + x], wide[1000 + i * 40 + x]));
            }
        }
        let mut xs: Vec<f32> = (0..20_000)
            .map(|i| (i as f32 - 10_000.0) * 7.31e-3)
            .collect();
        xs.extend([
            65504.0,
            65520.0,
            65519.99,
            1e9,
            -1e9,
            6.0e-8,
            2.9802322e-8,
            5.9604645e-8,
            1e-10,
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            1.0 + 1.0 / 2048.0,
            1.0 + 3.0 / 2048.0,
            2049.0,
            2051.0,
        ]);
        let mut narrow = vec![0u16; xs.len()];
        f32_to_f16(&mut narrow, &xs);
        for (&x, &h) in xs.iter().zip(&narrow) {
            let want = f16::from_f32(x);
            assert!(
                h == want.to_bits() || (x.is_nan() && f16::from_bits(h).is_nan()),
                "{x:e}: {h:#06x} vs {:#06x}",
                want.to_bits()
            );
        }
    }

    #[test]
    fn simd_quantization_equals_scalar() {
        if let Err(why) = test_support::avx2() {
            skipped("simd_quantization_equals_scalar (avx2 part)", &why);
        }
        let x = pseudo(32 * 40, 5);
        for b in x.chunks_exact(32) {
            let mut qs = [0i8; 32];
            let want = quantize_block_scalar(b, &mut qs);
            #[cfg(target_arch = "x86_64")]
            if detected() == KernelSet::Avx2 {
                let mut qv = [0i8; 32];
                // SAFETY: detected above.
                let got = unsafe { avx2::quantize_block(b, &mut qv) };
                assert_eq!(got, want);
                assert_eq!(qv, qs);
            }
        }
        let (a, b) = (pseudo(64, 1), pseudo(64, 2));
        let plain: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - plain).abs() < 1e-4);
        let mut o = vec![0.5f32; 64];
        axpy(&mut o, &a, 2.0, true);
        for (o, x) in o.iter().zip(&a) {
            assert_eq!(*o, half::f16::from_f32(x * 2.0 + 0.5).to_f32());
        }
    }

    #[test]
    fn fused_attention_is_softmax_attention() {
        // 64: the in-register path; 40: the general one.
        for hd in [64, 40] {
            fused_attention_case(hd);
        }
    }

    /// A stride so large that `(n - 1) * stride + hd` wraps must be refused, not let the
    /// kernel read past the slices.
    #[test]
    #[should_panic]
    fn attend_refuses_a_stride_that_wraps_the_bound() {
        let (q, k, v) = (vec![0f32; 64], vec![0f32; 64], vec![0f32; 64]);
        let mut out = vec![0f32; 64];
        let stride = usize::MAX / 2 + 1; // (3 - 1) * stride wraps to 0
        attend(
            &q,
            &k,
            &v,
            stride,
            3,
            1.0,
            false,
            &mut OnlineSoftmax::default(),
            &mut out,
        );
    }

    #[test]
    fn rows_fit_is_checked() {
        assert!(rows_fit(10, 0, usize::MAX, 5));
        assert!(rows_fit(10, 2, 5, 5) && !rows_fit(9, 2, 5, 5));
        assert!(!rows_fit(usize::MAX, 3, usize::MAX / 2 + 1, 64));
        assert!(!rows_fit(usize::MAX, 2, usize::MAX, 1));
    }

    fn fused_attention_case(hd: usize) {
        let (stride, n) = (192, 37);
        let q = pseudo(hd, 1);
        let k = pseudo(n * stride, 2);
        let v = pseudo(n * stride, 3);
        let scale = 0.125;
        let scores: Vec<f64> = (0..n)
            .map(|i| {
                let s: f64 = (0..hd)
                    .map(|d| q[d] as f64 * k[i * stride + d] as f64)
                    .sum();
                s * scale as f64
            })
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f64 = w.iter().sum();
        for round in [false, true] {
            let mut state = OnlineSoftmax::default();
            let mut out = vec![0f32; hd];
            // In two runs, as the cache's blocks split a sequence.
            attend(&q, &k, &v, stride, 20, scale, round, &mut state, &mut out);
            let (k2, v2) = (&k[20 * stride..], &v[20 * stride..]);
            attend(
                &q,
                k2,
                v2,
                stride,
                n - 20,
                scale,
                round,
                &mut state,
                &mut out,
            );
            let tol = if round { 2e-2 } else { 1e-5 };
            for d in 0..hd {
                let want: f64 =
                    (0..n).map(|i| w[i] * v[i * stride + d] as f64).sum::<f64>() / total;
                let got = out[d] / state.sum;
                assert!(
                    (got as f64 - want).abs() < tol,
                    "round={round} d={d}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn activation_quantization_matches_llama_cpp_rounding() {
        let mut x = vec![0f32; 32];
        x[0] = 127.0;
        x[1] = 2.5; // ties to even: 2
        x[2] = 3.5; // ties to even: 4
        x[3] = -2.5;
        let mut q = QuantizedActs::default();
        q.quantize(&x, 1, 32);
        assert_eq!(&q.qs[..4], &[127, 2, 4, -2]);
        assert_eq!(q.d[0], 1.0);
        assert_eq!(q.s[0], 131.0);
        assert_eq!(q.sum[0], 131);
    }
}
