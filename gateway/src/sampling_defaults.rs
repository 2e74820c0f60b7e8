//! A model's default sampling: what a request that leaves a sampling field out gets, as
//! vLLM applies a model's `generation_config.json`. A request that sets a field always
//! gets exactly what it asked for; a field no source sets gets OpenAI's default
//! (temperature 1, top_p 1, no top_k, min_p or penalties).
//!
//! Sources, per field, first found wins: the model's `[[models]]` entry (`sampling =
//! {...}`), the GGUF's `general.sampling.*` metadata (llama.cpp's keys), the preset of a
//! model from Sluice's catalogue (`sluice model list`).

use serde::{Deserialize, Serialize};
use sluice_engine::gguf::GgufFile;

/// Default values for the sampling fields a request may leave out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingDefaults {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f64>,
}

impl SamplingDefaults {
    /// No defaults: OpenAI's apply.
    pub const NONE: SamplingDefaults = SamplingDefaults {
        temperature: None,
        top_p: None,
        top_k: None,
        min_p: None,
        repetition_penalty: None,
        presence_penalty: None,
        frequency_penalty: None,
    };

    /// Each field from `self`, or from `fallback` where `self` has none.
    pub fn or(self, fallback: SamplingDefaults) -> SamplingDefaults {
        SamplingDefaults {
            temperature: self.temperature.or(fallback.temperature),
            top_p: self.top_p.or(fallback.top_p),
            top_k: self.top_k.or(fallback.top_k),
            min_p: self.min_p.or(fallback.min_p),
            repetition_penalty: self.repetition_penalty.or(fallback.repetition_penalty),
            presence_penalty: self.presence_penalty.or(fallback.presence_penalty),
            frequency_penalty: self.frequency_penalty.or(fallback.frequency_penalty),
        }
    }

    /// The recommendations a GGUF carries (`general.sampling.temp`, `.top_p`, `.top_k`,
    /// `.min_p`, `.penalty_repeat`, as llama.cpp reads them).
    pub fn from_gguf(file: &GgufFile) -> SamplingDefaults {
        let f = |k: &str| {
            file.meta(&format!("general.sampling.{k}"))
                .and_then(|v| v.as_f64())
        };
        SamplingDefaults {
            temperature: f("temp"),
            top_p: f("top_p"),
            top_k: f("top_k").map(|k| k as i64),
            min_p: f("min_p"),
            repetition_penalty: f("penalty_repeat"),
            ..SamplingDefaults::NONE
        }
    }

    /// What is wrong with these values, if anything: the ranges requests are held to.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut check = |name: &str, v: Option<f64>, ok: fn(f64) -> bool, range: &str| {
            if let Some(x) = v.filter(|&x| !ok(x)) {
                out.push(format!("{name} must be {range}, got {x}"));
            }
        };
        check(
            "temperature",
            self.temperature,
            |x| (0.0..=2.0).contains(&x),
            "in [0, 2]",
        );
        check("top_p", self.top_p, |x| x > 0.0 && x <= 1.0, "in (0, 1]");
        check(
            "min_p",
            self.min_p,
            |x| (0.0..=1.0).contains(&x),
            "in [0, 1]",
        );
        check(
            "repetition_penalty",
            self.repetition_penalty,
            |x| x > 0.0 && x <= 10.0,
            "in (0, 10]",
        );
        check(
            "presence_penalty",
            self.presence_penalty,
            |x| (-2.0..=2.0).contains(&x),
            "in [-2, 2]",
        );
        check(
            "frequency_penalty",
            self.frequency_penalty,
            |x| (-2.0..=2.0).contains(&x),
            "in [-2, 2]",
        );
        if self.top_k.is_some_and(|k| k < -1) {
            out.push("top_k must be -1, 0 or positive".into());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_fall_back_one_by_one_and_ranges_are_checked() {
        let config = SamplingDefaults {
            temperature: Some(0.3),
            ..SamplingDefaults::NONE
        };
        let preset = SamplingDefaults {
            temperature: Some(0.2),
            top_p: Some(0.9),
            ..SamplingDefaults::NONE
        };
        let d = config.or(preset);
        assert_eq!(
            (d.temperature, d.top_p, d.top_k),
            (Some(0.3), Some(0.9), None)
        );
        assert!(d.problems().is_empty());
        let bad = SamplingDefaults {
            temperature: Some(3.0),
            top_p: Some(0.0),
            top_k: Some(-5),
            ..SamplingDefaults::NONE
        };
        assert_eq!(bad.problems().len(), 3, "{:?}", bad.problems());
    }
}
