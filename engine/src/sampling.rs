//! Choosing the next token from logits.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Per-request sampling settings (already validated by the caller).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 disables.
    pub top_p: f32,
    /// 0 disables.
    pub top_k: usize,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
        }
    }
}

/// A request's sampler with its own random stream, so a seed gives the same text
/// whatever else the engine runs.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    scratch: Vec<(f32, u32)>,
}

impl Sampler {
    /// A sampler seeded from `params.seed`, or from the OS when absent.
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Sampler {
            params,
            rng,
            scratch: Vec::new(),
        }
    }

    /// Picks a token id.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 {
            return argmax(logits);
        }
        let t = self.params.temperature;
        self.scratch.clear();
        self.scratch
            .extend(logits.iter().enumerate().map(|(i, &l)| (l / t, i as u32)));
        let c = &mut self.scratch;
        // Ties go to the lower id, as in greedy decoding, so top_k = 1 equals greedy.
        c.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        if self.params.top_k > 0 {
            c.truncate(self.params.top_k.max(1));
        }
        let max = c[0].0;
        let mut sum = 0f32;
        for e in c.iter_mut() {
            e.0 = (e.0 - max).exp();
            sum += e.0;
        }
        if self.params.top_p < 1.0 {
            let mut acc = 0f32;
            let mut keep = c.len();
            for (i, e) in c.iter().enumerate() {
                acc += e.0 / sum;
                if acc >= self.params.top_p {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep);
            sum = c.iter().map(|e| e.0).sum();
        }
        let mut r = self.rng.random::<f32>() * sum;
        for e in c.iter() {
            r -= e.0;
            if r <= 0.0 {
                return e.1;
            }
        }
        c.last().map_or(0, |e| e.1)
    }
}

/// Index of the largest logit; the first one on ties, as llama.cpp's greedy sampler.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.0, 3.0, 1.0, 3.0]), 1);
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            ..Default::default()
        });
        assert_eq!(s.sample(&[0.5, -1.0, 2.0]), 2);
    }

    #[test]
    fn same_seed_same_choices_and_top_k_one_is_greedy() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            top_k: 0,
            seed: Some(7),
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(p.clone());
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(p);
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
        assert!(a.iter().any(|&x| x != a[0]), "temperature 1 should vary");
        let mut k1 = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 1,
            seed: Some(1),
        });
        assert!((0..20).all(|_| k1.sample(&logits) == argmax(&logits)));
    }
}
