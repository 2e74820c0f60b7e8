//! Micro-benchmark of the matrix kernels, one thread: every weight type through the
//! scalar kernel, the row-major SIMD kernel and the packed x8 tiles, for 1, 16 and 128
//! tokens on the shapes of Gemma 3 270M's layers. Run it with
//! `cargo test --release -p sluice-engine kernel_speed -- --ignored --nocapture`.

use std::hint::black_box;
use std::time::Instant;

use super::{cpu_summary, detected, gemm, gemm_packed, KernelSet, OutMatrix, PackedMatrix};
use super::{wants_quantized_acts, QuantizedActs};
use crate::gguf::quant::{quantize::quantize_row, GgmlType};

fn pseudo(n: usize, seed: u64) -> Vec<f32> {
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

/// Median seconds of one call of `f`, repeated for about a fifth of a second.
fn time(mut f: impl FnMut()) -> f64 {
    let t = Instant::now();
    f();
    let once = t.elapsed().as_secs_f64().max(1e-7);
    let reps = ((0.2 / once) as usize).clamp(3, 2000);
    let mut v: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[reps / 2]
}

#[test]
#[ignore = "a benchmark: prints timings, run with --ignored --nocapture in release"]
fn kernel_speed() {
    println!("{}", cpu_summary());
    if detected() != KernelSet::Avx2 {
        println!("no AVX2 kernels on this CPU: nothing to compare");
        return;
    }
    println!(
        "one thread; µs per call (median); GB/s = weight bytes read per second at 1 token; \
         GMAC/s = multiply-adds per second"
    );
    println!(
        "{:<6} {:>11} {:>4} {:>11} {:>11} {:>11} {:>8} {:>8} {:>9}",
        "type",
        "rows x k",
        "tok",
        "scalar µs",
        "avx2 µs",
        "packed µs",
        "GB/s",
        "GMAC/s",
        "vs scalar"
    );
    for &(rows, k) in &[(2048usize, 640usize), (640, 2048)] {
        let wf = pseudo(rows * k, 1);
        for ty in [
            GgmlType::Q4_1,
            GgmlType::Q8_0,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q4K,
            GgmlType::Q5K,
            GgmlType::Q6K,
            GgmlType::F16,
        ] {
            if !k.is_multiple_of(ty.block_size()) {
                continue;
            }
            let w: Vec<u8> = wf
                .chunks_exact(k)
                .flat_map(|r| quantize_row(ty, r))
                .collect();
            let packed = PackedMatrix::pack(ty, &w, rows, k);
            for n_tok in [1usize, 16, 128] {
                let x = pseudo(n_tok * k, 2 + n_tok as u64);
                let mut q = QuantizedActs::default();
                let mut out = vec![0f32; n_tok * rows];
                let mut run = |set: KernelSet, use_packed: bool| {
                    if wants_quantized_acts(ty) {
                        q.quantize(&x, n_tok, k);
                    }
                    let om = OutMatrix::new(&mut out, rows);
                    // SAFETY: one thread owns every cell.
                    unsafe {
                        match (&packed, use_packed) {
                            (Some(p), true) => gemm_packed(p, 0..rows, &q, om),
                            _ => gemm(set, ty, &w, k, 0..rows, &q, &x, om),
                        }
                    }
                    black_box(&out);
                };
                // The scalar kernel on 128 tokens takes seconds: timed on 16 and scaled.
                let scalar = if n_tok <= 16 {
                    time(|| run(KernelSet::Scalar, false))
                } else {
                    f64::NAN
                };
                let avx2 = time(|| run(KernelSet::Avx2, false));
                let pk = if packed.is_some() {
                    time(|| run(KernelSet::Avx2, true))
                } else {
                    f64::NAN
                };
                let best = if pk.is_nan() { avx2 } else { pk.min(avx2) };
                let gbs = w.len() as f64 / best / 1e9;
                let gmacs = (rows * k * n_tok) as f64 / best / 1e9;
                println!(
                    "{:<6} {:>11} {:>4} {:>11.1} {:>11.1} {:>11.1} {:>8.1} {:>8.1} {:>8.1}x",
                    ty.name(),
                    format!("{rows}x{k}"),
                    n_tok,
                    scalar * 1e6,
                    avx2 * 1e6,
                    pk * 1e6,
                    if n_tok == 1 { gbs } else { f64::NAN },
                    gmacs,
                    scalar / best
                );
            }
        }
    }
}
