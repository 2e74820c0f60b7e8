//! GeGLU (`gelu_tanh(gate) * up`, Gemma's feed-forward gate), computed as llama.cpp's
//! CPU backend does.
//!
//! ggml builds with `GGML_GELU_FP16`: it rounds the input to f16 and looks the result up
//! in a 65,536-entry table of f16-rounded `gelu_tanh` values (inputs at or beyond ±10
//! are taken as 0 and x). Following it keeps Gemma's activations on llama.cpp's bits;
//! a table lookup is also much cheaper than `tanh` per element.

use std::sync::OnceLock;

use half::f16;

/// `gelu_tanh(x)` in f32 with ggml's constants.
fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    const COEF_A: f32 = 0.044_715;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + COEF_A * x * x)).tanh())
}

/// For every f16 bit pattern, `gelu_tanh` of it rounded to f16 and widened back.
fn table() -> &'static [f32] {
    static TABLE: OnceLock<Vec<f32>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|bits| f16::from_f32(gelu_tanh(f16::from_bits(bits).to_f32())).to_f32())
            .collect()
    })
}

/// `gate[i] = gelu_tanh(gate[i]) * up[i]`.
pub fn geglu(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    let t = table();
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        *g = if x <= -10.0 {
            0.0
        } else if x >= 10.0 {
            x * u
        } else {
            t[f16::from_f32(x).to_bits() as usize] * u
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_gelu_within_f16_rounding_and_saturates_like_ggml() {
        let xs: Vec<f32> = (-1200..=1200).map(|i| i as f32 / 100.0).collect();
        let mut g = xs.clone();
        geglu(&mut g, &vec![2.0; xs.len()]);
        for (&x, &y) in xs.iter().zip(&g) {
            let want = 2.0 * gelu_tanh(x);
            if x <= -10.0 {
                assert_eq!(y, 0.0);
            } else if x >= 10.0 {
                assert_eq!(y, 2.0 * x);
            } else {
                // Two f16 roundings (input and output): a few parts in a thousand.
                assert!(
                    (y - want).abs() <= 4e-3 * want.abs().max(0.05),
                    "{x}: {y} vs {want}"
                );
            }
        }
        // Known values of the tanh form: gelu(1) ≈ 0.8412, gelu(-1) ≈ -0.1588.
        assert!((gelu_tanh(1.0) - 0.841_192).abs() < 1e-5);
        assert!((gelu_tanh(-1.0) + 0.158_808).abs() < 1e-5);
    }
}
