//! `expf` four lanes at a time, with the C library's exact results.
//!
//! llama.cpp's decode attention calls the C library's `expf` once per cache row for the
//! online softmax, and so do we: its numbers are part of what we mirror. One call costs
//! 10–20 ns, which on a 16-stream step adds up to about a tenth of the step. glibc's
//! `expf` (since 2.27, from Arm's optimized routines) is a short double-precision
//! computation: a 32-entry table of 2^(i/32) and a cubic polynomial. Run on four lanes
//! with the same operations it gives the same floats: all 2^32 of them, which the test
//! suite checks against this machine's libm (`vector_exp_equals_libm_on_every_float`).
//! Because another libm could differ, the vector form is only used after a start-up
//! self-check against `f32::exp` on thousands of arguments; otherwise [`exp_many`] calls
//! `f32::exp`.

use std::sync::OnceLock;

/// `out[i] = in[i].exp()`, bit-identical to `f32::exp` on this machine.
pub fn exp_many(args: &[f32], out: &mut [f32]) {
    assert_eq!(args.len(), out.len());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if vector_matches_libm() {
        // SAFETY: only true when the CPU reported avx2 and fma (checked in the self-check).
        done = unsafe { x86::exp_avx2(args, out) };
    }
    for (o, &x) in out[done..].iter_mut().zip(&args[done..]) {
        *o = x.exp();
    }
}

/// [`exp_many`], eight lanes at a time with AVX-512 where the CPU has it (the same
/// operations on twice the lanes, so the same floats; self-checked like the 4-lane form).
pub(super) fn exp_many_wide(args: &[f32], out: &mut [f32]) {
    assert_eq!(args.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    if wide_matches_libm() {
        // SAFETY: only true when the CPU has avx512f and avx512dq (checked there).
        let done = unsafe { x86::exp_avx512(args, out) };
        return exp_many(&args[done..], &mut out[done..]);
    }
    exp_many(args, out)
}

/// Whether the 8-lane form runs here and reproduces this machine's libm (checked once).
#[cfg(target_arch = "x86_64")]
fn wide_matches_libm() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        if !(vector_matches_libm() && super::avx512::detected()) {
            return false;
        }
        let args = self_check_args();
        let mut got = vec![0f32; args.len()];
        // SAFETY: the CPU has avx512f and avx512dq (`avx512::detected`).
        let n = unsafe { x86::exp_avx512(&args, &mut got) };
        args[..n]
            .iter()
            .zip(&got)
            .all(|(x, g)| x.exp().to_bits() == g.to_bits())
    })
}

/// Whether the vector form reproduces this machine's libm (checked once).
fn vector_matches_libm() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if super::detected() != super::KernelSet::Avx2 {
                return false;
            }
            let args = self_check_args();
            let mut got = vec![0f32; args.len()];
            // SAFETY: the CPU reported avx2 and fma.
            let n = unsafe { x86::exp_avx2(&args, &mut got) };
            let ok = args[..n]
                .iter()
                .zip(&got)
                .all(|(x, g)| x.exp().to_bits() == g.to_bits());
            if !ok {
                tracing::info!(
                    "libm expf differs from glibc's algorithm; attention calls it per row"
                );
            }
            ok
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// Arguments across the softmax's range: dense near 0, the subnormal tail, the cut-offs,
/// infinities and NaN.
fn self_check_args() -> Vec<f32> {
    let mut v: Vec<f32> = (0..4096).map(|i| -(i as f32) * 0.0271).collect();
    v.extend((0..512).map(|i| -87.0 - i as f32 * 0.037));
    v.extend((0..512).map(|i| i as f32 * 0.173 - 40.0));
    v.extend([
        0.0,
        -0.0,
        f32::NEG_INFINITY,
        f32::INFINITY,
        f32::NAN,
        -103.97,
        -103.28,
        -1e-30,
        88.7,
        89.0,
        f32::MIN,
    ]);
    let pad = v.len().next_multiple_of(4) - v.len();
    v.extend(std::iter::repeat_n(-1.0, pad));
    v
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// glibc's `__exp2f_data.tab`: bits of 2^(i/32) minus `i << 47`.
    const T: [u64; 32] = [
        0x3ff0000000000000,
        0x3fefd9b0d3158574,
        0x3fefb5586cf9890f,
        0x3fef9301d0125b51,
        0x3fef72b83c7d517b,
        0x3fef54873168b9aa,
        0x3fef387a6e756238,
        0x3fef1e9df51fdee1,
        0x3fef06fe0a31b715,
        0x3feef1a7373aa9cb,
        0x3feedea64c123422,
        0x3feece086061892d,
        0x3feebfdad5362a27,
        0x3feeb42b569d4f82,
        0x3feeab07dd485429,
        0x3feea47eb03a5585,
        0x3feea09e667f3bcd,
        0x3fee9f75e8ec5f74,
        0x3feea11473eb0187,
        0x3feea589994cce13,
        0x3feeace5422aa0db,
        0x3feeb737b0cdc5e5,
        0x3feec49182a3f090,
        0x3feed503b23e255d,
        0x3feee89f995ad3ad,
        0x3feeff76f2fb5e47,
        0x3fef199bdd85529c,
        0x3fef3720dcef9069,
        0x3fef5818dcfba487,
        0x3fef7c97337b9b5f,
        0x3fefa4afa2a490da,
        0x3fefd0765b6e4540,
    ];

    /// Four `expf`s.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[inline(always)]
    unsafe fn exp4(x: __m128) -> __m128 {
        const N: f64 = 32.0;
        let inv_ln2_n = f64::from_bits(0x3ff71547652b82fe) * N;
        let shift = f64::from_bits(0x4338000000000000); // 0x1.8p52
        let c0 = f64::from_bits(0x3fac6af84b912394) / (N * N * N);
        let c1 = f64::from_bits(0x3fcebfce50fac4f3) / (N * N);
        let c2 = f64::from_bits(0x3fe62e42ff0c52d6) / N;
        let xd = _mm256_cvtps_pd(x);
        // glibc's FMA build fuses `z = x * N/ln2` into both of its uses (`z + shift` and
        // `z - kd`); with a separately rounded `z`, 2 of the 2^32 floats come out 1 ulp off.
        let inv = _mm256_set1_pd(inv_ln2_n);
        let kd = _mm256_fmadd_pd(inv, xd, _mm256_set1_pd(shift));
        let ki = _mm256_castpd_si256(kd);
        let kd = _mm256_sub_pd(kd, _mm256_set1_pd(shift));
        let r = _mm256_fmsub_pd(inv, xd, kd);
        let idx = _mm256_and_si256(ki, _mm256_set1_epi64x(31));
        let t = _mm256_i64gather_epi64::<8>(T.as_ptr() as *const i64, idx);
        let s = _mm256_castsi256_pd(_mm256_add_epi64(t, _mm256_slli_epi64::<47>(ki)));
        let zp = _mm256_fmadd_pd(_mm256_set1_pd(c0), r, _mm256_set1_pd(c1));
        let r2 = _mm256_mul_pd(r, r);
        let y = _mm256_fmadd_pd(_mm256_set1_pd(c2), r, _mm256_set1_pd(1.0));
        let y = _mm256_fmadd_pd(zp, r2, y);
        let y = _mm256_mul_pd(y, s);
        let out = _mm256_cvtpd_ps(y);
        // glibc's special cases: below log(2^-150) (and -inf) the result is 0, above
        // log(2^128) it is +inf, and NaN stays NaN.
        let under = _mm_cmp_ps::<_CMP_LT_OQ>(x, _mm_set1_ps(f32::from_bits(0xc2cf_f1b4)));
        let over = _mm_cmp_ps::<_CMP_GT_OQ>(x, _mm_set1_ps(f32::from_bits(0x42b1_7217)));
        let nan = _mm_cmp_ps::<_CMP_UNORD_Q>(x, x);
        let out = _mm_andnot_ps(under, out);
        let out = _mm_blendv_ps(out, _mm_set1_ps(f32::INFINITY), over);
        _mm_blendv_ps(out, _mm_add_ps(x, x), nan)
    }

    /// Eight `expf`s: [`exp4`]'s operations on eight lanes; `tab` holds `T`.
    ///
    /// # Safety
    /// The CPU must support AVX-512F and DQ, AVX2 and FMA.
    #[inline(always)]
    unsafe fn exp8(x: __m256, tab: &[__m512i; 4]) -> __m256 {
        const N: f64 = 32.0;
        let inv_ln2_n = f64::from_bits(0x3ff71547652b82fe) * N;
        let shift = f64::from_bits(0x4338000000000000); // 0x1.8p52
        let c0 = f64::from_bits(0x3fac6af84b912394) / (N * N * N);
        let c1 = f64::from_bits(0x3fcebfce50fac4f3) / (N * N);
        let c2 = f64::from_bits(0x3fe62e42ff0c52d6) / N;
        let xd = _mm512_cvtps_pd(x);
        let inv = _mm512_set1_pd(inv_ln2_n);
        let kd = _mm512_fmadd_pd(inv, xd, _mm512_set1_pd(shift));
        let ki = _mm512_castpd_si512(kd);
        let kd = _mm512_sub_pd(kd, _mm512_set1_pd(shift));
        let r = _mm512_fmsub_pd(inv, xd, kd);
        // The table lookup as two 16-entry permutes and a blend on bit 4 of the index,
        // cheaper than an 8-lane gather (the table's 4 registers stay loaded).
        let idx = _mm512_and_si512(ki, _mm512_set1_epi64(31));
        let lo = _mm512_permutex2var_epi64(tab[0], idx, tab[1]);
        let hi = _mm512_permutex2var_epi64(tab[2], idx, tab[3]);
        let upper = _mm512_test_epi64_mask(idx, _mm512_set1_epi64(16));
        let t = _mm512_mask_blend_epi64(upper, lo, hi);
        let s = _mm512_castsi512_pd(_mm512_add_epi64(t, _mm512_slli_epi64::<47>(ki)));
        let zp = _mm512_fmadd_pd(_mm512_set1_pd(c0), r, _mm512_set1_pd(c1));
        let r2 = _mm512_mul_pd(r, r);
        let y = _mm512_fmadd_pd(_mm512_set1_pd(c2), r, _mm512_set1_pd(1.0));
        let y = _mm512_fmadd_pd(zp, r2, y);
        let y = _mm512_mul_pd(y, s);
        let out = _mm512_cvtpd_ps(y);
        let under = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(f32::from_bits(0xc2cf_f1b4)));
        let over = _mm256_cmp_ps::<_CMP_GT_OQ>(x, _mm256_set1_ps(f32::from_bits(0x42b1_7217)));
        let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x);
        let out = _mm256_andnot_ps(under, out);
        let out = _mm256_blendv_ps(out, _mm256_set1_ps(f32::INFINITY), over);
        _mm256_blendv_ps(out, _mm256_add_ps(x, x), nan)
    }

    /// `expf` over the whole groups of eight; returns how many it did.
    ///
    /// # Safety
    /// The CPU must support AVX-512F and DQ, AVX2 and FMA.
    #[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
    pub(super) unsafe fn exp_avx512(args: &[f32], out: &mut [f32]) -> usize {
        let n = args.len().min(out.len()) / 8 * 8;
        let mut tab = [_mm512_setzero_si512(); 4];
        for (j, t) in tab.iter_mut().enumerate() {
            *t = _mm512_loadu_si512(T.as_ptr().add(8 * j) as *const _);
        }
        for i in (0..n).step_by(8) {
            let v = exp8(_mm256_loadu_ps(args.as_ptr().add(i)), &tab);
            _mm256_storeu_ps(out.as_mut_ptr().add(i), v);
        }
        n
    }

    /// `expf` over the whole groups of four; returns how many it did.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_avx2(args: &[f32], out: &mut [f32]) -> usize {
        let n = args.len().min(out.len()) / 4 * 4;
        for i in (0..n).step_by(4) {
            let v = exp4(_mm_loadu_ps(args.as_ptr().add(i)));
            _mm_storeu_ps(out.as_mut_ptr().add(i), v);
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector form equals `f32::exp` bit for bit on a sweep much wider than the
    /// start-up check (every 97th float below zero, and the positives up to overflow),
    /// and on glibc (whose algorithm it ports) the self-check passes, so it is used.
    #[test]
    fn vector_exp_equals_libm_bit_for_bit() {
        let mut args: Vec<f32> = (0x8000_0000u32..=0xff80_0000)
            .step_by(97)
            .map(f32::from_bits)
            .collect();
        args.extend((0..0x42b2_0000u32).step_by(997).map(f32::from_bits));
        args.extend(self_check_args());
        let same = |x: f32, g: f32| x.exp().to_bits() == g.to_bits() || (x.is_nan() && g.is_nan());
        let mut got = vec![0f32; args.len()];
        exp_many(&args, &mut got);
        for (&x, &g) in args.iter().zip(&got) {
            assert!(
                same(x, g),
                "exp_many({x:e}) = {g:e}, libm says {:e}",
                x.exp()
            );
        }
        if let Err(why) = super::super::test_support::avx2() {
            super::super::test_support::skipped(
                "vector_exp_equals_libm_bit_for_bit (vector forms)",
                &why,
            );
        }
        #[cfg(target_arch = "x86_64")]
        if super::super::detected() == super::super::KernelSet::Avx2 {
            let mut got = vec![0f32; args.len()];
            // SAFETY: detected above.
            let n = unsafe { x86::exp_avx2(&args, &mut got) };
            for (&x, &g) in args[..n].iter().zip(&got) {
                assert!(same(x, g), "exp4({x:e}) = {g:e}, libm says {:e}", x.exp());
            }
            #[cfg(target_env = "gnu")]
            assert!(
                vector_matches_libm(),
                "self-check rejected the vector form on glibc"
            );
            if !super::super::avx512::cpu_has() {
                super::super::test_support::skipped(
                    "vector_exp_equals_libm_bit_for_bit (8-lane form)",
                    "the CPU lacks AVX-512 F, DQ or VL",
                );
            } else {
                let mut got = vec![0f32; args.len()];
                // SAFETY: the CPU has avx512f and avx512dq (`cpu_has`).
                let n = unsafe { x86::exp_avx512(&args, &mut got) };
                for (&x, &g) in args[..n].iter().zip(&got) {
                    assert!(same(x, g), "exp8({x:e}) = {g:e}, libm says {:e}", x.exp());
                }
                let mut wide = vec![0f32; args.len()];
                exp_many_wide(&args, &mut wide);
                assert!(args.iter().zip(&wide).all(|(&x, &g)| same(x, g)));
            }
        }
    }

    /// Every one of the 2^32 floats (NaNs compared as NaN): the vector forms (4 and 8
    /// lanes) equal this machine's libm bit for bit. About 51 s of CPU on the 2-core
    /// development machine (Sapphire Rapids), spread over all cores: ~26 s there idle.
    #[test]
    fn vector_exp_equals_libm_on_every_float() {
        if let Err(why) = super::super::test_support::avx2() {
            super::super::test_support::skipped(
                "vector_exp_equals_libm_on_every_float",
                &format!("no vector expf here: {why}"),
            );
            return;
        }
        #[cfg(target_arch = "x86_64")]
        {
            use std::sync::atomic::{AtomicU32, Ordering};
            // The 8-lane form too where the CPU has it, whatever SLUICE_NO_AVX512 picks.
            let wide = super::super::avx512::cpu_has();
            if !wide {
                super::super::test_support::skipped(
                    "vector_exp_equals_libm_on_every_float (8-lane form)",
                    "the CPU lacks AVX-512 F, DQ or VL",
                );
            }
            const SLICE: u32 = 1 << 20;
            let next = AtomicU32::new(0);
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            std::thread::scope(|sc| {
                for _ in 0..threads {
                    sc.spawn(|| {
                        let mut args = vec![0f32; SLICE as usize];
                        let mut got = vec![0f32; SLICE as usize];
                        let mut got8 = vec![0f32; SLICE as usize];
                        loop {
                            let hi = next.fetch_add(1, Ordering::Relaxed);
                            if u64::from(hi) >= (1u64 << 32) / u64::from(SLICE) {
                                return;
                            }
                            for (i, a) in args.iter_mut().enumerate() {
                                *a = f32::from_bits((hi * SLICE) | i as u32);
                            }
                            // SAFETY: the CPU has avx2 and fma (checked above), and
                            // avx512f/dq when `wide`.
                            let n = unsafe { x86::exp_avx2(&args, &mut got) };
                            assert_eq!(n, args.len());
                            if wide {
                                // SAFETY: as above.
                                unsafe { x86::exp_avx512(&args, &mut got8) };
                            }
                            for ((&x, &g), &g8) in args.iter().zip(&got).zip(&got8) {
                                let libm = x.exp();
                                assert!(
                                    libm.to_bits() == g.to_bits() || (x.is_nan() && g.is_nan()),
                                    "exp4({x:e}) = {g:e}, libm says {libm:e}"
                                );
                                assert!(
                                    !wide
                                        || libm.to_bits() == g8.to_bits()
                                        || (x.is_nan() && g8.is_nan()),
                                    "exp8({x:e}) = {g8:e}, libm says {libm:e}"
                                );
                            }
                        }
                    });
                }
            });
        }
    }
}
