//! Micro-benchmark of the matrix kernels, one thread: every weight type through the
//! scalar kernel, the row-major SIMD kernel and the packed x8 tiles (AVX2, and VNNI where
//! the CPU has it), for 1, 16 and 128
//! tokens on the shapes of Gemma 3 270M's layers. Run it with
//! `cargo test -p sluice-engine --lib kernel_speed -- --ignored --nocapture` (the engine is
//! optimised in the test profile too); `KERNEL_SPEED_TYPES=Q5_0,Q6_K` picks types.

use std::hint::black_box;
use std::time::Instant;

use super::packed::gemm_packed_avx2;
use super::packed_vnni::{gemm_packed_vnni, Vnni};
use super::test_support::pseudo;
use super::{cpu_summary, detected, gemm, KernelSet, OutMatrix, PackedMatrix};
use super::{wants_quantized_acts, QuantizedActs};
use crate::gguf::quant::{quantize::quantize_row, GgmlType};

/// Seconds this thread has spent on a CPU (`CLOCK_THREAD_CPUTIME_ID`), or the wall clock
/// off Linux.
fn cpu_seconds(wall: &Instant) -> f64 {
    #[cfg(target_os = "linux")]
    {
        #[repr(C)]
        struct Timespec {
            sec: i64,
            nsec: i64,
        }
        extern "C" {
            fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
        }
        const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
        let mut ts = Timespec { sec: 0, nsec: 0 };
        // SAFETY: `ts` is a valid timespec (two i64 on x86-64 Linux) for the call to fill.
        if unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) } == 0 {
            return ts.sec as f64 + ts.nsec as f64 * 1e-9;
        }
    }
    wall.elapsed().as_secs_f64()
}

/// Seconds of CPU time per call of `f`: the least over batches of about 20 ms, for about
/// a third of a second. CPU time rather than wall time, and the least batch rather than the
/// median: on a shared machine the other loads only ever add time.
fn time(mut f: impl FnMut()) -> f64 {
    let wall = Instant::now();
    let t = cpu_seconds(&wall);
    f();
    let once = (cpu_seconds(&wall) - t).max(1e-7);
    let batch = ((0.02 / once) as usize).clamp(1, 1000);
    let mut best = f64::INFINITY;
    for _ in 0..(0.3 / (once * batch as f64)).clamp(3.0, 100.0) as usize {
        let t = cpu_seconds(&wall);
        for _ in 0..batch {
            f();
        }
        best = best.min((cpu_seconds(&wall) - t) / batch as f64);
    }
    best
}

/// Whether `KERNEL_SPEED_TYPES` (comma-separated names, e.g. `Q5_0,Q6_K`; all when
/// unset) asks for `ty`.
fn wanted(ty: GgmlType) -> bool {
    std::env::var("KERNEL_SPEED_TYPES")
        .map(|v| v.split(',').any(|n| n.trim() == ty.name()))
        .unwrap_or(true)
}

#[test]
#[ignore = "a benchmark: prints timings, run with --ignored --nocapture"]
fn kernel_speed() {
    println!("{}", cpu_summary());
    if detected() != KernelSet::Avx2 {
        println!("no AVX2 kernels on this CPU: nothing to compare");
        return;
    }
    println!(
        "one thread; CPU µs per call (least of many batches, activation quantization included); \
         GB/s = weight bytes read per second at 1 token; GMAC/s = multiply-adds per second; \
         both and the ratio to scalar from the fastest kernel"
    );
    let vnni = if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") {
        Some(Vnni::Avx512)
    } else if is_x86_feature_detected!("avxvnni") {
        Some(Vnni::Avx)
    } else {
        None
    };
    println!(
        "{:<6} {:>9} {:>4} {:>10} {:>9} {:>9} {:>9} {:>6} {:>7} {:>9}",
        "type",
        "rows x k",
        "tok",
        "scalar µs",
        "avx2 µs",
        "x8 µs",
        "x8vnni µs",
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
            if !k.is_multiple_of(ty.block_size()) || !wanted(ty) {
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
                // 0: row-major kernel of `set`; 1: packed AVX2 tiles; 2: packed VNNI tiles.
                let mut run = |set: KernelSet, path: usize| {
                    if wants_quantized_acts(ty) {
                        q.quantize(&x, n_tok, k);
                    }
                    let om = OutMatrix::new(&mut out, rows);
                    // SAFETY: one thread owns every cell.
                    unsafe {
                        match (&packed, path, vnni) {
                            (Some(p), 1, _) => gemm_packed_avx2(p, 0..rows, &q, om),
                            (Some(p), 2, Some(v)) => gemm_packed_vnni(v, p, 0..rows, &q, om),
                            _ => gemm(set, ty, &w, k, 0..rows, &q, &x, om),
                        }
                    }
                    black_box(&out);
                };
                // The scalar kernel on 128 tokens takes seconds: timed on 16 and scaled.
                let scalar = if n_tok <= 16 {
                    time(|| run(KernelSet::Scalar, 0))
                } else {
                    f64::NAN
                };
                // Types without a row-major SIMD kernel run the scalar one there: not timed
                // again on 128 tokens.
                let row_simd = !matches!(ty, GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K);
                let avx2 = if n_tok <= 16 || row_simd {
                    time(|| run(KernelSet::Avx2, 0))
                } else {
                    f64::NAN
                };
                let (pk, pv) = match (&packed, vnni) {
                    (Some(_), Some(_)) => (
                        time(|| run(KernelSet::Avx2, 1)),
                        time(|| run(KernelSet::Avx2, 2)),
                    ),
                    (Some(_), None) => (time(|| run(KernelSet::Avx2, 1)), f64::NAN),
                    _ => (f64::NAN, f64::NAN),
                };
                let best = [avx2, pk, pv].into_iter().fold(f64::INFINITY, f64::min);
                let gbs = w.len() as f64 / best / 1e9;
                let gmacs = (rows * k * n_tok) as f64 / best / 1e9;
                println!(
                    "{:<6} {:>9} {:>4} {:>10.0} {:>9.0} {:>9.0} {:>9.0} {:>6.1} {:>7.1} {:>8.1}x",
                    ty.name(),
                    format!("{rows}x{k}"),
                    n_tok,
                    scalar * 1e6,
                    avx2 * 1e6,
                    pk * 1e6,
                    pv * 1e6,
                    if n_tok == 1 { gbs } else { f64::NAN },
                    gmacs,
                    scalar / best
                );
            }
        }
    }
}
