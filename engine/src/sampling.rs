//! Choosing the next token from logits, and the log-probabilities reported to clients.
//!
//! The order follows vLLM: logit bias, banned tokens (`min_tokens`), penalties, then
//! temperature, `min_p`, `top_k` and `top_p`. With temperature 0 the processed logits'
//! argmax is taken, so penalties and biases apply to greedy decoding too.

use std::collections::{HashMap, HashSet};

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
    /// Drop tokens less likely than `min_p` times the most likely one; 0 disables.
    pub min_p: f32,
    /// Subtracted once from every token already generated (OpenAI).
    pub presence_penalty: f32,
    /// Subtracted per occurrence in the output so far (OpenAI).
    pub frequency_penalty: f32,
    /// Divides positive / multiplies negative logits of tokens seen in the prompt or
    /// output (the Hugging Face and vLLM definition); 1 disables.
    pub repetition_penalty: f32,
    /// Added to the logits of these tokens.
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            seed: None,
        }
    }
}

impl SamplingParams {
    fn processes_logits(&self) -> bool {
        !self.logit_bias.is_empty()
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || self.repetition_penalty != 1.0
    }
}

/// A request's sampler with its own random stream, so a seed gives the same text
/// whatever else the engine runs.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Tokens of the prompt, for the repetition penalty.
    prompt_tokens: HashSet<u32>,
    output_counts: HashMap<u32, u32>,
    logits: Vec<f32>,
    candidates: Vec<(f32, u32)>,
}

impl Sampler {
    /// A sampler seeded from `params.seed`, or from the OS when absent.
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        let prompt_tokens = if params.repetition_penalty != 1.0 {
            prompt.iter().copied().collect()
        } else {
            HashSet::new()
        };
        Sampler {
            params,
            rng,
            prompt_tokens,
            output_counts: HashMap::new(),
            logits: Vec::new(),
            candidates: Vec::new(),
        }
    }

    /// Picks a token id, never one of `banned`, and records it as generated.
    pub fn sample(&mut self, raw: &[f32], banned: &[u32]) -> u32 {
        let id = self.choose(raw, banned);
        *self.output_counts.entry(id).or_default() += 1;
        id
    }

    fn choose(&mut self, raw: &[f32], banned: &[u32]) -> u32 {
        let p = &self.params;
        let logits: &[f32] = if p.processes_logits() || !banned.is_empty() {
            self.logits.clear();
            self.logits.extend_from_slice(raw);
            let l = &mut self.logits;
            for &(t, b) in &p.logit_bias {
                if let Some(x) = l.get_mut(t as usize) {
                    *x += b;
                }
            }
            for &t in banned {
                if let Some(x) = l.get_mut(t as usize) {
                    *x = f32::NEG_INFINITY;
                }
            }
            if p.repetition_penalty != 1.0 {
                let r = p.repetition_penalty;
                let seen = self
                    .prompt_tokens
                    .iter()
                    .chain(self.output_counts.keys())
                    .collect::<HashSet<_>>();
                for &t in seen {
                    if let Some(x) = l.get_mut(t as usize) {
                        *x = if *x > 0.0 { *x / r } else { *x * r };
                    }
                }
            }
            for (&t, &n) in &self.output_counts {
                if let Some(x) = l.get_mut(t as usize) {
                    *x -= p.frequency_penalty * n as f32 + p.presence_penalty;
                }
            }
            &self.logits
        } else {
            raw
        };
        if p.temperature <= 0.0 {
            return argmax(logits);
        }
        let t = p.temperature;
        let c = &mut self.candidates;
        c.clear();
        c.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, l)| l.is_finite())
                .map(|(i, &l)| (l / t, i as u32)),
        );
        if c.is_empty() {
            return argmax(logits);
        }
        // Ties go to the lower id, as in greedy decoding, so top_k = 1 equals greedy.
        c.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        if p.top_k > 0 {
            c.truncate(p.top_k);
        }
        let max = c[0].0;
        for e in c.iter_mut() {
            e.0 = (e.0 - max).exp();
        }
        if p.min_p > 0.0 {
            // Sorted: the first weight is the largest (1.0).
            let keep = c.iter().take_while(|e| e.0 >= p.min_p).count().max(1);
            c.truncate(keep);
        }
        let mut sum: f32 = c.iter().map(|e| e.0).sum();
        if p.top_p < 1.0 {
            let mut acc = 0f32;
            let mut keep = c.len();
            for (i, e) in c.iter().enumerate() {
                acc += e.0 / sum;
                if acc >= p.top_p {
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

/// Log-probability of a chosen token and of the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    /// The `n` most likely tokens, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Log-probabilities under the model's own distribution (the raw logits, before any
/// sampling settings), as vLLM and OpenAI report them.
pub fn logprobs(logits: &[f32], chosen: u32, n: usize) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    if n > 0 {
        for (i, &l) in logits.iter().enumerate() {
            if top.len() == n && l <= top[n - 1].1 {
                continue;
            }
            let at = top.partition_point(|e| e.1 >= l);
            top.insert(at, (i as u32, l));
            top.truncate(n);
        }
    }
    for e in &mut top {
        e.1 -= lse;
    }
    TokenLogprobs {
        logprob: logits
            .get(chosen as usize)
            .map_or(f32::NEG_INFINITY, |l| l - lse),
        top,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn greedy() -> SamplingParams {
        SamplingParams {
            temperature: 0.0,
            ..Default::default()
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.0, 3.0, 1.0, 3.0]), 1);
        let mut s = Sampler::new(greedy(), &[]);
        assert_eq!(s.sample(&[0.5, -1.0, 2.0], &[]), 2);
    }

    #[test]
    fn same_seed_same_choices_and_top_k_one_is_greedy() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let p = SamplingParams {
            top_p: 0.9,
            seed: Some(7),
            ..Default::default()
        };
        let draw = |p: &SamplingParams| -> Vec<u32> {
            let mut s = Sampler::new(p.clone(), &[]);
            (0..50).map(|_| s.sample(&logits, &[])).collect()
        };
        let a = draw(&p);
        assert_eq!(a, draw(&p));
        assert!(a.iter().any(|&x| x != a[0]), "temperature 1 should vary");
        let k1 = SamplingParams {
            top_k: 1,
            seed: Some(1),
            ..Default::default()
        };
        assert!(draw(&k1).iter().all(|&x| x == argmax(&logits)));
    }

    #[test]
    fn bias_bans_and_penalties_move_greedy_choices() {
        let logits = [1.0, 2.0, 3.0];
        let mut s = Sampler::new(
            SamplingParams {
                logit_bias: vec![(0, 5.0)],
                ..greedy()
            },
            &[],
        );
        assert_eq!(s.sample(&logits, &[]), 0);
        assert_eq!(s.sample(&logits, &[0]), 2, "banned tokens are never drawn");
        // Frequency penalty: each use of token 2 costs 0.6.
        let mut s = Sampler::new(
            SamplingParams {
                frequency_penalty: 0.6,
                ..greedy()
            },
            &[],
        );
        let seq: Vec<u32> = (0..4).map(|_| s.sample(&logits, &[])).collect();
        assert_eq!(seq, vec![2, 2, 1, 2]);
        // Presence penalty: once used, a token loses 1.5 for good.
        let mut s = Sampler::new(
            SamplingParams {
                presence_penalty: 1.5,
                ..greedy()
            },
            &[],
        );
        let seq: Vec<u32> = (0..3).map(|_| s.sample(&logits, &[])).collect();
        assert_eq!(seq, vec![2, 1, 2]);
        // Repetition penalty covers prompt tokens: 3/2 < 2.
        let mut s = Sampler::new(
            SamplingParams {
                repetition_penalty: 2.0,
                ..greedy()
            },
            &[2],
        );
        assert_eq!(s.sample(&logits, &[]), 1);
    }

    #[test]
    fn min_p_keeps_only_likely_tokens() {
        // Token 0 has probability ~0.98; min_p 0.1 drops everything else.
        let logits = [10.0, 5.0, 5.0, 5.0];
        let mut s = Sampler::new(
            SamplingParams {
                min_p: 0.1,
                seed: Some(3),
                ..Default::default()
            },
            &[],
        );
        assert!((0..200).all(|_| s.sample(&logits, &[]) == 0));
    }

    #[test]
    fn logprobs_are_a_normalised_log_softmax() {
        let logits = [1.0f32, 3.0, 2.0, 0.5];
        let lp = logprobs(&logits, 2, 2);
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        assert!((lp.logprob - (2f32.exp() / z).ln()).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|e| e.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!((lp.top[0].1 - (3f32.exp() / z).ln()).abs() < 1e-6);
        assert!(logprobs(&logits, 0, 0).top.is_empty());
    }
}
