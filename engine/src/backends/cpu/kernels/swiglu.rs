//! SwiGLU (`silu(gate) * up`), computed the way llama.cpp's CPU backend does.
//!
//! ggml's `ggml_vec_swiglu_f32` evaluates `exp` with its own vector polynomial (adapted
//! from Arm's optimized routines), in a 16-lane AVX-512 form where the CPU has AVX-512F
//! and DQ and an 8-lane AVX2 form otherwise; the two round differently in the last bit.
//! Ports of both follow, picked the same way, so the feed-forward activations carry
//! llama.cpp's exact bits (checked against `ggml_vec_swiglu_f32` from llama.cpp's own
//! AVX-512 build on 2^20 inputs: all equal, where libm's `expf` differs in a quarter of
//! them). They are also ~10× faster than calling libm per element,
//! which matters because this runs on one thread between two parallel matrix multiplies.

/// `gate[i] = silu(gate[i]) * up[i]`.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    {
        if avx512_detected() {
            // SAFETY: the CPU reported avx512f and avx512dq.
            done = unsafe { x86::swiglu_avx512(gate, up) };
        } else if super::detected() == super::KernelSet::Avx2 {
            // SAFETY: the CPU reported avx2, fma and f16c.
            done = unsafe { x86::swiglu_avx2(gate, up) };
        }
    }
    // ggml finishes the tail (and runs non-SIMD builds) with libm's expf.
    for (g, &u) in gate[done..].iter_mut().zip(&up[done..]) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// Which form [`swiglu`] runs here: `avx512`, `avx2` or `scalar`.
pub fn form() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if avx512_detected() {
            return "avx512";
        }
        if super::detected() == super::KernelSet::Avx2 {
            return "avx2";
        }
    }
    "scalar"
}

/// Whether SwiGLU runs its AVX-512 form (AVX-512F and DQ present and allowed).
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx512_detected() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        super::detected() == super::KernelSet::Avx2
            && super::avx512_allowed()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512dq")
    })
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// ggml's 16-lane `ggml_v_expf` (AVX-512F/DQ).
    ///
    /// # Safety
    /// The CPU must support AVX-512F and AVX-512DQ.
    #[inline(always)]
    unsafe fn expf16(x: __m512) -> __m512 {
        let r = _mm512_set1_ps(f32::from_bits(0x4b40_0000)); // 0x1.8p23
        let z = _mm512_fmadd_ps(x, _mm512_set1_ps(f32::from_bits(0x3fb8_aa3b)), r);
        let n = _mm512_sub_ps(z, r);
        let b = _mm512_fnmadd_ps(
            n,
            _mm512_set1_ps(f32::from_bits(0x35bf_be8e)),
            _mm512_fnmadd_ps(n, _mm512_set1_ps(f32::from_bits(0x3f31_7200)), x),
        );
        let d = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_abs_ps(n), _mm512_set1_ps(192.0));
        let u = _mm512_mul_ps(b, b);
        let j = _mm512_fmadd_ps(
            _mm512_fmadd_ps(
                _mm512_fmadd_ps(
                    _mm512_set1_ps(f32::from_bits(0x3c07_2010)),
                    b,
                    _mm512_set1_ps(f32::from_bits(0x3d2b_9f17)),
                ),
                u,
                _mm512_fmadd_ps(
                    _mm512_set1_ps(f32::from_bits(0x3e2a_af33)),
                    b,
                    _mm512_set1_ps(f32::from_bits(0x3eff_fedb)),
                ),
            ),
            u,
            _mm512_fmadd_ps(
                _mm512_set1_ps(f32::from_bits(0x3f7f_fff6)),
                b,
                _mm512_set1_ps(1.0),
            ),
        );
        let res = _mm512_scalef_ps(j, n);
        if d == 0 {
            return res;
        }
        let zero = _mm512_setzero_ps();
        let alt = _mm512_mask_blend_ps(
            _mm512_cmp_ps_mask::<_CMP_LE_OQ>(n, zero),
            _mm512_set1_ps(f32::INFINITY),
            zero,
        );
        _mm512_mask_blend_ps(d, res, alt)
    }

    /// ggml's 8-lane `ggml_v_expf` (AVX2 + FMA).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[inline(always)]
    unsafe fn expf8(x: __m256) -> __m256 {
        let r = _mm256_set1_ps(f32::from_bits(0x4b40_0000));
        let z = _mm256_fmadd_ps(x, _mm256_set1_ps(f32::from_bits(0x3fb8_aa3b)), r);
        let n = _mm256_sub_ps(z, r);
        let b = _mm256_fnmadd_ps(
            n,
            _mm256_set1_ps(f32::from_bits(0x35bf_be8e)),
            _mm256_fnmadd_ps(n, _mm256_set1_ps(f32::from_bits(0x3f31_7200)), x),
        );
        let e = _mm256_slli_epi32::<23>(_mm256_castps_si256(z));
        let k = _mm256_castsi256_ps(_mm256_add_epi32(
            e,
            _mm256_castps_si256(_mm256_set1_ps(1.0)),
        ));
        let abs_n = _mm256_andnot_ps(_mm256_set1_ps(-0.0), n);
        let c = _mm256_cmp_ps::<_CMP_GT_OQ>(abs_n, _mm256_set1_ps(126.0));
        let u = _mm256_mul_ps(b, b);
        let j = _mm256_fmadd_ps(
            _mm256_fmadd_ps(
                _mm256_fmadd_ps(
                    _mm256_set1_ps(f32::from_bits(0x3c07_2010)),
                    b,
                    _mm256_set1_ps(f32::from_bits(0x3d2b_9f17)),
                ),
                u,
                _mm256_fmadd_ps(
                    _mm256_set1_ps(f32::from_bits(0x3e2a_af33)),
                    b,
                    _mm256_set1_ps(f32::from_bits(0x3eff_fedb)),
                ),
            ),
            u,
            _mm256_mul_ps(_mm256_set1_ps(f32::from_bits(0x3f7f_fff6)), b),
        );
        if _mm256_movemask_ps(c) == 0 {
            return _mm256_fmadd_ps(j, k, k);
        }
        let g = _mm256_and_si256(
            _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LE_OQ>(n, _mm256_setzero_ps())),
            _mm256_set1_epi32(0x8200_0000u32 as i32),
        );
        let s1 = _mm256_castsi256_ps(_mm256_add_epi32(g, _mm256_set1_epi32(0x7f00_0000)));
        let s2 = _mm256_castsi256_ps(_mm256_sub_epi32(e, g));
        let d = _mm256_cmp_ps::<_CMP_GT_OQ>(abs_n, _mm256_set1_ps(192.0));
        _mm256_or_ps(
            _mm256_and_ps(d, _mm256_mul_ps(s1, s1)),
            _mm256_andnot_ps(
                d,
                _mm256_or_ps(
                    _mm256_and_ps(c, _mm256_mul_ps(_mm256_fmadd_ps(s2, j, s2), s1)),
                    _mm256_andnot_ps(c, _mm256_fmadd_ps(k, j, k)),
                ),
            ),
        )
    }

    /// SwiGLU over the whole 16-lane part; returns how many elements it did.
    ///
    /// # Safety
    /// The CPU must support AVX-512F and AVX-512DQ.
    #[target_feature(enable = "avx512f,avx512dq,fma")]
    pub(super) unsafe fn swiglu_avx512(gate: &mut [f32], up: &[f32]) -> usize {
        let n = gate.len() / 16 * 16;
        let (g, u) = (gate.as_mut_ptr(), up.as_ptr());
        for i in (0..n).step_by(16) {
            let x = _mm512_loadu_ps(g.add(i));
            let e = expf16(_mm512_sub_ps(_mm512_setzero_ps(), x));
            let silu = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0), e));
            _mm512_storeu_ps(g.add(i), _mm512_mul_ps(silu, _mm512_loadu_ps(u.add(i))));
        }
        n
    }

    /// SwiGLU over the whole 8-lane part; returns how many elements it did.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn swiglu_avx2(gate: &mut [f32], up: &[f32]) -> usize {
        let n = gate.len() / 8 * 8;
        let (g, u) = (gate.as_mut_ptr(), up.as_ptr());
        for i in (0..n).step_by(8) {
            let x = _mm256_loadu_ps(g.add(i));
            let e = expf8(_mm256_sub_ps(_mm256_setzero_ps(), x));
            let silu = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0), e));
            _mm256_storeu_ps(g.add(i), _mm256_mul_ps(silu, _mm256_loadu_ps(u.add(i))));
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every form this CPU runs (16-lane, 8-lane, scalar) stays within ggml's stated
    /// error of the exact SwiGLU over the whole range (including where `exp` overflows
    /// and underflows), and the tails are handled.
    #[test]
    fn swiglu_matches_the_exact_function() {
        let xs: Vec<f32> = (0..4003)
            .map(|i| (i as f32 - 2000.0) * 0.061)
            .chain([-120.0, -104.5, -88.0, 0.0, -0.0, 88.5, 100.0, 130.0, 200.0])
            .collect();
        let up: Vec<f32> = (0..xs.len()).map(|i| 0.5 + (i % 7) as f32 * 0.25).collect();
        let check = |got: &[f32], upto: usize, form: &str| {
            for ((&x, &u), &g) in xs.iter().zip(&up).zip(got).take(upto) {
                let want = (x as f64 / (1.0 + (-x as f64).exp()) * u as f64) as f32;
                let tol = (4.0 * f32::EPSILON * want.abs()).max(1e-30);
                assert!((g - want).abs() <= tol, "{form} x={x}: {g} vs {want}");
            }
        };
        let mut got = xs.clone();
        swiglu(&mut got, &up);
        check(&got, xs.len(), "dispatched");
        use super::super::test_support::{avx2, avx512, skipped};
        const NAME: &str = "swiglu_matches_the_exact_function";
        // Both vector forms where the CPU has them, whatever SLUICE_NO_AVX512 picks.
        match avx512() {
            Ok(()) => {
                #[cfg(target_arch = "x86_64")]
                {
                    let mut got = xs.clone();
                    // SAFETY: the CPU has avx512f and avx512dq (checked above).
                    let n = unsafe { x86::swiglu_avx512(&mut got, &up) };
                    check(&got, n, "avx512");
                }
            }
            Err(why) => skipped(&format!("{NAME} (avx512 form)"), &why),
        }
        match avx2() {
            Ok(()) => {
                #[cfg(target_arch = "x86_64")]
                {
                    let mut got = xs.clone();
                    // SAFETY: the CPU has avx2 and fma (checked above).
                    let n = unsafe { x86::swiglu_avx2(&mut got, &up) };
                    check(&got, n, "avx2");
                }
            }
            Err(why) => skipped(&format!("{NAME} (avx2 form)"), &why),
        }
    }
}
