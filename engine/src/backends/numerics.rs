//! How the CPU backend rounds inside a forward pass: `--numerics int8|f32`
//! (`[engine] numerics`).
//!
//! `int8` (the default) is llama.cpp's arithmetic: each matrix input is rounded to 8-bit
//! blocks of 32 before the integer dot products with the quantized weights, and decode
//! attention multiplies an f16 copy of the query and accumulates V in f16. It is the
//! fast path, and the one whose greedy output follows llama.cpp's.
//!
//! `f32` keeps activations in f32: weights are dequantized row by row and multiplied in
//! f32, and attention accumulates in f32 (the KV cache stays f16). It is slower, and it
//! is what to use when results must not depend on the runtime: with 8-bit activations,
//! a difference in the last bit of one float (another summation order, another kernel
//! set, another runtime) can move an activation across a rounding boundary, and that
//! step of 1/127 of its block grows through the layers into logit differences of tenths
//! of a nat, so two correct implementations part at the first close call. In f32 the
//! same differences stay in the last bits, and greedy output agrees with ONNX Runtime's
//! (f32) and across kernel sets (see `sluice check consistency --numerics f32`).

use std::fmt;
use std::str::FromStr;

use serde::Deserialize;

/// The arithmetic of the CPU backend's forward pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Numerics {
    /// 8-bit activations and f16 decode attention, as llama.cpp (fast).
    #[default]
    Int8,
    /// f32 activations and attention (reproducible across runtimes and kernel sets).
    F32,
}

impl FromStr for Numerics {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "int8" => Ok(Self::Int8),
            "f32" => Ok(Self::F32),
            _ => Err(format!("unknown numerics {s:?} (numerics: int8, f32)")),
        }
    }
}

impl fmt::Display for Numerics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Int8 => "int8",
            Self::F32 => "f32",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_are_refused() {
        for n in [Numerics::Int8, Numerics::F32] {
            assert_eq!(n.to_string().parse::<Numerics>(), Ok(n));
        }
        assert_eq!("F32".parse::<Numerics>(), Ok(Numerics::F32));
        let e = "fp16".parse::<Numerics>().unwrap_err();
        assert!(e.contains("int8, f32"), "{e}");
    }
}
