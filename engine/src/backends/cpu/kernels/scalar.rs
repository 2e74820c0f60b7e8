//! Portable kernels: the reference for the SIMD ones and the path on CPUs without AVX2.

use std::ops::Range;

use half::f16;

use super::{OutMatrix, QuantizedActs, QK8};
use crate::gguf::quant::{f16_at, k_scale_min, GgmlType, QK_K};

/// Float weights (F32/F16) times float activations.
///
/// # Safety
/// No other thread may access the cells of `out` in `rows` while this runs.
pub(super) unsafe fn gemm_float(
    ty: GgmlType,
    w: &[u8],
    k: usize,
    rows: Range<usize>,
    x: &[f32],
    out: OutMatrix,
) {
    let n_tok = x.len() / k;
    let rb = ty.row_bytes(k);
    let mut row = vec![0f32; k];
    for r in rows {
        let wr = &w[r * rb..(r + 1) * rb];
        match ty {
            GgmlType::F32 => {
                for (o, c) in row.iter_mut().zip(wr.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            _ => {
                for (o, c) in row.iter_mut().zip(wr.chunks_exact(2)) {
                    *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
        }
        for t in 0..n_tok {
            // SAFETY: the cells of `rows` are ours (the caller's contract).
            unsafe { out.set(t, r, dot_f32(&row, &x[t * k..(t + 1) * k])) };
        }
    }
}

/// A float dot product in eight independent lanes, so the compiler vectorises it.
pub(crate) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, ar) = a.split_at(a.len() / 8 * 8);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for i in 0..8 {
            // Plain multiply-add: `mul_add` is a slow library call without FMA.
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

/// Quantized weights times 8-bit activations, with integer inner products.
///
/// # Safety
/// No other thread may access the cells of `out` in `rows` while this runs.
pub(super) unsafe fn gemm_quant(
    ty: GgmlType,
    w: &[u8],
    k: usize,
    rows: Range<usize>,
    acts: &QuantizedActs,
    out: OutMatrix,
) {
    let rb = ty.row_bytes(k);
    let nb = k / QK8;
    for r in rows {
        let wr = &w[r * rb..(r + 1) * rb];
        for t in 0..acts.n_rows {
            let qa = &acts.qs[t * k..(t + 1) * k];
            let da = &acts.d[t * nb..(t + 1) * nb];
            let sa = &acts.s[t * nb..(t + 1) * nb];
            // SAFETY: the cells of `rows` are ours (the caller's contract).
            unsafe { out.set(t, r, vec_dot(ty, wr, qa, da, sa)) };
        }
    }
}

#[inline]
fn isum(a: impl Iterator<Item = i32>, b: &[i8]) -> i32 {
    a.zip(b).map(|(x, &y)| x * y as i32).sum()
}

/// One weight row against one quantized activation row.
pub(crate) fn vec_dot(ty: GgmlType, w: &[u8], qa: &[i8], da: &[f32], sa: &[f32]) -> f32 {
    let mut acc = 0f32;
    match ty {
        GgmlType::Q4_0 => {
            for (i, b) in w.chunks_exact(18).enumerate() {
                let q = &b[2..18];
                let a = &qa[i * 32..i * 32 + 32];
                let s = isum(q.iter().map(|&v| (v & 0xF) as i32 - 8), &a[..16])
                    + isum(q.iter().map(|&v| (v >> 4) as i32 - 8), &a[16..]);
                acc += f16_at(b, 0) * da[i] * s as f32;
            }
        }
        GgmlType::Q4_1 => {
            for (i, b) in w.chunks_exact(20).enumerate() {
                let q = &b[4..20];
                let a = &qa[i * 32..i * 32 + 32];
                let s = isum(q.iter().map(|&v| (v & 0xF) as i32), &a[..16])
                    + isum(q.iter().map(|&v| (v >> 4) as i32), &a[16..]);
                acc += f16_at(b, 0) * da[i] * s as f32 + f16_at(b, 2) * sa[i];
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let min = ty == GgmlType::Q5_1;
            let h = if min { 4 } else { 2 };
            for (i, b) in w.chunks_exact(ty.block_bytes()).enumerate() {
                let qh = u32::from_le_bytes([b[h], b[h + 1], b[h + 2], b[h + 3]]);
                let q = &b[h + 4..h + 20];
                let a = &qa[i * 32..i * 32 + 32];
                // Q5_0 is centred on 16; Q5_1 adds its offset times the activations' sum.
                let off = if min { 0 } else { 16 };
                let code = |j: usize, v: u8| (v as u32 | ((qh >> j) & 1) << 4) as i32 - off;
                let s = isum((0..16).map(|j| code(j, q[j] & 0xF)), &a[..16])
                    + isum((0..16).map(|j| code(j + 16, q[j] >> 4)), &a[16..]);
                acc += f16_at(b, 0) * da[i] * s as f32;
                if min {
                    acc += f16_at(b, 2) * sa[i];
                }
            }
        }
        GgmlType::Q8_0 => {
            for (i, b) in w.chunks_exact(34).enumerate() {
                let s = isum(
                    b[2..34].iter().map(|&v| v as i8 as i32),
                    &qa[i * 32..i * 32 + 32],
                );
                acc += f16_at(b, 0) * da[i] * s as f32;
            }
        }
        GgmlType::Q4K | GgmlType::Q5K => {
            let five = ty == GgmlType::Q5K;
            for (sbi, b) in w.chunks_exact(ty.block_bytes()).enumerate() {
                let d = f16_at(b, 0);
                let dmin = f16_at(b, 2);
                let scales = &b[4..16];
                let (qh, qs) = if five {
                    (&b[16..48], &b[48..176])
                } else {
                    (&b[0..0], &b[16..144])
                };
                for j in 0..8 {
                    // Sub-block j: low nibbles of group j/2 for even j, high for odd.
                    let g = j / 2;
                    let q = &qs[g * 32..g * 32 + 32];
                    let blk = sbi * (QK_K / QK8) + j;
                    let a = &qa[blk * 32..blk * 32 + 32];
                    let code = |l: usize| -> i32 {
                        let lo = if j % 2 == 0 { q[l] & 0xF } else { q[l] >> 4 } as i32;
                        let hi = if five && qh[l] & (1 << j) != 0 { 16 } else { 0 };
                        lo + hi
                    };
                    let s = isum((0..32).map(code), a);
                    let (sc, m) = k_scale_min(j, scales);
                    acc += d * sc as f32 * da[blk] * s as f32 - dmin * m as f32 * sa[blk];
                }
            }
        }
        GgmlType::Q6K => {
            for (sbi, b) in w.chunks_exact(210).enumerate() {
                let d = f16_at(b, 208);
                let sc = &b[192..208];
                for blk32 in 0..8 {
                    // Element e of the super-block sits in half h, quarter k, lane l.
                    let blk = sbi * (QK_K / QK8) + blk32;
                    let a = &qa[blk * 32..blk * 32 + 32];
                    let (h, kq) = (blk32 / 4, blk32 % 4);
                    let ql = &b[h * 64..h * 64 + 64];
                    let qh = &b[128 + h * 32..128 + h * 32 + 32];
                    let code = |l: usize| -> i32 {
                        let lo = match kq {
                            0 => ql[l] & 0xF,
                            1 => ql[l + 32] & 0xF,
                            2 => ql[l] >> 4,
                            _ => ql[l + 32] >> 4,
                        };
                        let hi = (qh[l] >> (2 * kq)) & 3;
                        (lo | (hi << 4)) as i32 - 32
                    };
                    let s1 = isum((0..16).map(code), &a[..16]);
                    let s2 = isum((16..32).map(code), &a[16..]);
                    let sc1 = sc[h * 8 + kq * 2] as i8 as i32;
                    let sc2 = sc[h * 8 + kq * 2 + 1] as i8 as i32;
                    acc += d * da[blk] * (sc1 * s1 + sc2 * s2) as f32;
                }
            }
        }
        GgmlType::F32 | GgmlType::F16 => unreachable!("float weights use gemm_float"),
    }
    acc
}
