//! GGML tensor types: block layouts and reference dequantization.
//!
//! The reference code here is deliberately plain: it is the ground truth the SIMD and
//! integer kernels are tested against, and the path for embedding lookups.

use half::f16;

/// The tensor element types Sluice can load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q4K = 12,
    Q5K = 13,
    Q6K = 14,
}

/// Elements per block of the k-quants.
pub const QK_K: usize = 256;

impl GgmlType {
    /// Maps GGUF's type id; `None` for types we do not support.
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            _ => return None,
        })
    }

    /// Human-readable name as llama.cpp prints it.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q8_0 => "Q8_0",
            Self::Q4K => "Q4_K",
            Self::Q5K => "Q5_K",
            Self::Q6K => "Q6_K",
        }
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            Self::F32 | Self::F16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 => 32,
            Self::Q4K | Self::Q5K | Self::Q6K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
        }
    }

    /// Bytes taken by a row of `n` elements (`n` a multiple of the block size).
    pub fn row_bytes(self, n: usize) -> usize {
        n / self.block_size() * self.block_bytes()
    }
}

#[inline]
pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Scale and min of sub-block `j` of a Q4_K/Q5_K block, from its 12 packed 6-bit values.
#[inline]
pub(crate) fn k_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Dequantizes one row (`out.len()` elements) from its raw bytes.
pub fn dequantize_row(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    let n = out.len();
    debug_assert_eq!(bytes.len(), ty.row_bytes(n));
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::Q4_0 => {
            for (y, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(18)) {
                let d = f16_at(b, 0);
                for j in 0..16 {
                    y[j] = ((b[2 + j] & 0xF) as i32 - 8) as f32 * d;
                    y[j + 16] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        GgmlType::Q4_1 => {
            for (y, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(20)) {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                for j in 0..16 {
                    y[j] = (b[4 + j] & 0xF) as f32 * d + m;
                    y[j + 16] = (b[4 + j] >> 4) as f32 * d + m;
                }
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            // d (and m for Q5_1), then qh (bit j: the fifth bit of element j), then the
            // low nibbles: byte j holds element j (low) and element j + 16 (high).
            let min = ty == GgmlType::Q5_1;
            let bb = ty.block_bytes();
            for (y, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(bb)) {
                let d = f16_at(b, 0);
                let (m, h) = if min { (f16_at(b, 2), 4) } else { (0.0, 2) };
                let qh = u32::from_le_bytes([b[h], b[h + 1], b[h + 2], b[h + 3]]);
                let qs = &b[h + 4..h + 20];
                for j in 0..16 {
                    let lo = (qs[j] & 0xF) as u32 | ((qh >> j) & 1) << 4;
                    let hi = (qs[j] >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
                    if min {
                        y[j] = lo as f32 * d + m;
                        y[j + 16] = hi as f32 * d + m;
                    } else {
                        y[j] = (lo as i32 - 16) as f32 * d;
                        y[j + 16] = (hi as i32 - 16) as f32 * d;
                    }
                }
            }
        }
        GgmlType::Q8_0 => {
            for (y, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(34)) {
                let d = f16_at(b, 0);
                for j in 0..32 {
                    y[j] = b[2 + j] as i8 as f32 * d;
                }
            }
        }
        GgmlType::Q4K => {
            for (y, b) in out.chunks_exact_mut(QK_K).zip(bytes.chunks_exact(144)) {
                let d = f16_at(b, 0);
                let dmin = f16_at(b, 2);
                let scales = &b[4..16];
                let qs = &b[16..144];
                for (g, yg) in y.chunks_exact_mut(64).enumerate() {
                    let q = &qs[g * 32..g * 32 + 32];
                    let (s1, m1) = k_scale_min(2 * g, scales);
                    let (s2, m2) = k_scale_min(2 * g + 1, scales);
                    for l in 0..32 {
                        yg[l] = d * s1 as f32 * (q[l] & 0xF) as f32 - dmin * m1 as f32;
                        yg[l + 32] = d * s2 as f32 * (q[l] >> 4) as f32 - dmin * m2 as f32;
                    }
                }
            }
        }
        GgmlType::Q5K => {
            for (y, b) in out.chunks_exact_mut(QK_K).zip(bytes.chunks_exact(176)) {
                let d = f16_at(b, 0);
                let dmin = f16_at(b, 2);
                let scales = &b[4..16];
                let qh = &b[16..48];
                let qs = &b[48..176];
                for (g, yg) in y.chunks_exact_mut(64).enumerate() {
                    let q = &qs[g * 32..g * 32 + 32];
                    let (s1, m1) = k_scale_min(2 * g, scales);
                    let (s2, m2) = k_scale_min(2 * g + 1, scales);
                    let (u1, u2) = (1u8 << (2 * g), 2u8 << (2 * g));
                    for l in 0..32 {
                        let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                        let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                        yg[l] = d * s1 as f32 * ((q[l] & 0xF) + h1) as f32 - dmin * m1 as f32;
                        yg[l + 32] = d * s2 as f32 * ((q[l] >> 4) + h2) as f32 - dmin * m2 as f32;
                    }
                }
            }
        }
        GgmlType::Q6K => {
            for (y, b) in out.chunks_exact_mut(QK_K).zip(bytes.chunks_exact(210)) {
                let ql_all = &b[0..128];
                let qh_all = &b[128..192];
                let sc_all = &b[192..208];
                let d = f16_at(b, 208);
                for (h, yh) in y.chunks_exact_mut(128).enumerate() {
                    let ql = &ql_all[h * 64..];
                    let qh = &qh_all[h * 32..];
                    let sc = &sc_all[h * 8..];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        yh[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                        yh[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                        yh[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                        yh[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                    }
                }
            }
        }
    }
}

/// Quantizers used by tests to build weights of every type from floats.
///
/// These are simple (round-to-nearest, no error search), which is all a test needs:
/// the kernels must agree with `dequantize_row` on whatever bytes they are given.
pub mod quantize {
    use super::{GgmlType, QK_K};
    use half::f16;

    fn put_f16(out: &mut Vec<u8>, x: f32) {
        out.extend_from_slice(&f16::from_f32(x).to_le_bytes());
    }

    /// Quantizes a row of floats into `ty`'s block format.
    pub fn quantize_row(ty: GgmlType, x: &[f32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(ty.row_bytes(x.len()));
        match ty {
            GgmlType::F32 => x
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            GgmlType::F16 => x.iter().for_each(|&v| put_f16(&mut out, v)),
            GgmlType::Q8_0 => {
                for b in x.chunks_exact(32) {
                    let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let d = amax / 127.0;
                    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                    put_f16(&mut out, d);
                    out.extend(b.iter().map(|v| (v * id).round() as i8 as u8));
                }
            }
            GgmlType::Q4_0 => {
                for b in x.chunks_exact(32) {
                    let (mut amax, mut max) = (0f32, 0f32);
                    for &v in b {
                        if v.abs() > amax {
                            amax = v.abs();
                            max = v;
                        }
                    }
                    let d = max / -8.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    put_f16(&mut out, d);
                    let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
                    out.extend((0..16).map(|j| q(b[j]) | (q(b[j + 16]) << 4)));
                }
            }
            GgmlType::Q4_1 => {
                for b in x.chunks_exact(32) {
                    let min = b.iter().cloned().fold(f32::INFINITY, f32::min);
                    let max = b.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let d = (max - min) / 15.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    put_f16(&mut out, d);
                    put_f16(&mut out, min);
                    let q = |v: f32| (((v - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                    out.extend((0..16).map(|j| q(b[j]) | (q(b[j + 16]) << 4)));
                }
            }
            GgmlType::Q5_0 | GgmlType::Q5_1 => {
                // As llama.cpp's reference quantizers: Q5_0 maps the value of largest
                // magnitude to -16; Q5_1 spans min..max in 31 steps.
                for b in x.chunks_exact(32) {
                    let (d, base, offset) = if ty == GgmlType::Q5_0 {
                        let (mut amax, mut max) = (0f32, 0f32);
                        for &v in b {
                            if v.abs() > amax {
                                amax = v.abs();
                                max = v;
                            }
                        }
                        (max / -16.0, 0.0, 16.5)
                    } else {
                        let min = b.iter().cloned().fold(f32::INFINITY, f32::min);
                        let max = b.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                        ((max - min) / 31.0, min, 0.5)
                    };
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    put_f16(&mut out, d);
                    if ty == GgmlType::Q5_1 {
                        put_f16(&mut out, base);
                    }
                    let q: Vec<u32> = b
                        .iter()
                        .map(|&v| (((v - base) * id + offset) as i32).clamp(0, 31) as u32)
                        .collect();
                    let qh = q
                        .iter()
                        .enumerate()
                        .fold(0u32, |h, (j, &v)| h | ((v >> 4) << j));
                    out.extend_from_slice(&qh.to_le_bytes());
                    out.extend(
                        (0..16).map(|j| (q[j] & 0xF) as u8 | ((q[j + 16] & 0xF) << 4) as u8),
                    );
                }
            }
            GgmlType::Q4K | GgmlType::Q5K => {
                let bits = if ty == GgmlType::Q4K { 15.0 } else { 31.0 };
                for sb in x.chunks_exact(QK_K) {
                    // Per 32-element sub-block: scale and min, then 6-bit codes relative
                    // to the super-block's d and dmin.
                    let mut scales = [0f32; 8];
                    let mut mins = [0f32; 8];
                    for (j, sub) in sb.chunks_exact(32).enumerate() {
                        let mn = sub.iter().cloned().fold(f32::INFINITY, f32::min).min(0.0);
                        let mx = sub.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                        scales[j] = (mx - mn) / bits;
                        mins[j] = -mn;
                    }
                    let max_scale = scales.iter().cloned().fold(0f32, f32::max);
                    let max_min = mins.iter().cloned().fold(0f32, f32::max);
                    let d = max_scale / 63.0;
                    let dmin = max_min / 63.0;
                    let ls: Vec<u8> = scales
                        .iter()
                        .map(|s| {
                            if d > 0.0 {
                                (s / d).round().min(63.0) as u8
                            } else {
                                0
                            }
                        })
                        .collect();
                    let lm: Vec<u8> = mins
                        .iter()
                        .map(|m| {
                            if dmin > 0.0 {
                                (m / dmin).round().min(63.0) as u8
                            } else {
                                0
                            }
                        })
                        .collect();
                    let mut packed = [0u8; 12];
                    for j in 0..8 {
                        if j < 4 {
                            packed[j] = ls[j];
                            packed[j + 4] = lm[j];
                        } else {
                            packed[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4);
                            packed[j - 4] |= (ls[j] >> 4) << 6;
                            packed[j] |= (lm[j] >> 4) << 6;
                        }
                    }
                    let dh = f16::from_f32(d).to_f32();
                    let dminh = f16::from_f32(dmin).to_f32();
                    let mut codes = [0u8; QK_K];
                    for j in 0..8 {
                        let (s, m) = super::k_scale_min(j, &packed);
                        let sc = dh * s as f32;
                        let mm = dminh * m as f32;
                        for l in 0..32 {
                            let v = sb[j * 32 + l];
                            codes[j * 32 + l] = if sc > 0.0 {
                                ((v + mm) / sc).round().clamp(0.0, bits) as u8
                            } else {
                                0
                            };
                        }
                    }
                    put_f16(&mut out, d);
                    put_f16(&mut out, dmin);
                    out.extend_from_slice(&packed);
                    if ty == GgmlType::Q5K {
                        let mut qh = [0u8; 32];
                        for g in 0..4 {
                            for l in 0..32 {
                                if codes[g * 64 + l] & 16 != 0 {
                                    qh[l] |= 1 << (2 * g);
                                }
                                if codes[g * 64 + 32 + l] & 16 != 0 {
                                    qh[l] |= 2 << (2 * g);
                                }
                            }
                        }
                        out.extend_from_slice(&qh);
                    }
                    for g in 0..4 {
                        for l in 0..32 {
                            out.push(
                                (codes[g * 64 + l] & 0xF) | ((codes[g * 64 + 32 + l] & 0xF) << 4),
                            );
                        }
                    }
                }
            }
            GgmlType::Q6K => {
                for sb in x.chunks_exact(QK_K) {
                    let mut sub_scales = [0f32; 16];
                    for (j, sub) in sb.chunks_exact(16).enumerate() {
                        sub_scales[j] = sub.iter().fold(0f32, |m, v| m.max(v.abs())) / 31.0;
                    }
                    let max_scale = sub_scales.iter().cloned().fold(0f32, f32::max);
                    let d = max_scale / 127.0;
                    let dh = f16::from_f32(d).to_f32();
                    let sc: Vec<i8> = sub_scales
                        .iter()
                        .map(|s| {
                            if d > 0.0 {
                                (s / d).round().min(127.0) as i8
                            } else {
                                0
                            }
                        })
                        .collect();
                    let mut codes = [0u8; QK_K];
                    for (i, c) in codes.iter_mut().enumerate() {
                        let s = dh * sc[i / 16] as f32;
                        let q = if s != 0.0 {
                            (sb[i] / s).round().clamp(-32.0, 31.0) as i32
                        } else {
                            0
                        };
                        *c = (q + 32) as u8;
                    }
                    let mut ql = [0u8; 128];
                    let mut qh = [0u8; 64];
                    for h in 0..2 {
                        for l in 0..32 {
                            let c = |k: usize| codes[h * 128 + k * 32 + l];
                            ql[h * 64 + l] = (c(0) & 0xF) | ((c(2) & 0xF) << 4);
                            ql[h * 64 + l + 32] = (c(1) & 0xF) | ((c(3) & 0xF) << 4);
                            qh[h * 32 + l] = (c(0) >> 4)
                                | ((c(1) >> 4) << 2)
                                | ((c(2) >> 4) << 4)
                                | ((c(3) >> 4) << 6);
                        }
                    }
                    out.extend_from_slice(&ql);
                    out.extend_from_slice(&qh);
                    out.extend(sc.iter().map(|&s| s as u8));
                    put_f16(&mut out, d);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::quantize::quantize_row;
    use super::*;

    fn signal(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as f32 * 0.37 + seed as f32).sin() * 2.0) + ((i * 7 % 13) as f32 - 6.0) * 0.05
            })
            .collect()
    }

    /// A hand-made block in llama.cpp's layout (`dequantize_row_q5_0`/`_q5_1`): qh bit j
    /// is the fifth bit of element j, byte j of qs holds elements j and j + 16.
    #[test]
    fn q5_blocks_decode_as_llama_cpp_lays_them_out() {
        let mut q5_0 = vec![0u8; 22];
        q5_0[..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        // Fifth bits of elements 0, 3 and 17.
        q5_0[2..6].copy_from_slice(&(1u32 | 1 << 3 | 1 << 17).to_le_bytes());
        q5_0[6] = 0x21; // element 0: 1 | 16, element 16: 2
        q5_0[7] = 0xF0; // element 1: 0, element 17: 15 | 16
        q5_0[9] = 0x07; // element 3: 7 | 16, element 19: 0
        let mut y = [0f32; 32];
        dequantize_row(GgmlType::Q5_0, &q5_0, &mut y);
        assert_eq!(
            [y[0], y[16], y[1], y[17], y[3], y[19]],
            [0.5, -7.0, -8.0, 7.5, 3.5, -8.0]
        );
        let mut q5_1 = vec![0u8; 24];
        q5_1[..2].copy_from_slice(&f16::from_f32(2.0).to_le_bytes());
        q5_1[2..4].copy_from_slice(&f16::from_f32(-1.0).to_le_bytes());
        q5_1[4..8].copy_from_slice(&(1u32 << 16 | 1 << 31).to_le_bytes());
        q5_1[8] = 0x13; // element 0: 3, element 16: 1 | 16
        q5_1[23] = 0xF0; // element 15: 0, element 31: 15 | 16
        dequantize_row(GgmlType::Q5_1, &q5_1, &mut y);
        assert_eq!([y[0], y[16], y[15], y[31]], [5.0, 33.0, -1.0, 61.0]);
    }

    #[test]
    fn every_type_round_trips_within_its_precision() {
        let x = signal(512, 3);
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (ty, tol) in [
            (GgmlType::F32, 0.0),
            (GgmlType::F16, 0.002),
            (GgmlType::Q8_0, 0.01),
            (GgmlType::Q4_0, 0.15),
            (GgmlType::Q4_1, 0.1),
            (GgmlType::Q5_0, 0.07),
            (GgmlType::Q5_1, 0.05),
            (GgmlType::Q4K, 0.12),
            (GgmlType::Q5K, 0.06),
            (GgmlType::Q6K, 0.04),
        ] {
            let bytes = quantize_row(ty, &x);
            assert_eq!(bytes.len(), ty.row_bytes(x.len()), "{}", ty.name());
            let mut y = vec![0f32; x.len()];
            dequantize_row(ty, &bytes, &mut y);
            let err = x
                .iter()
                .zip(&y)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                err <= tol * amax,
                "{}: max error {err} (amax {amax})",
                ty.name()
            );
        }
    }
}
