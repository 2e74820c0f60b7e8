//! Request arrival times for open-loop load: a Poisson process at `rate` requests/s, or,
//! with `burstiness` ≠ 1, gamma-distributed gaps of the same mean (vLLM's definition:
//! shape = burstiness; below 1 burstier, above 1 more regular).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Gaps between arrivals, in seconds.
pub struct Arrivals {
    rng: StdRng,
    shape: f64,
    scale: f64,
}

impl Arrivals {
    /// Arrivals at `rate` per second on average.
    pub fn new(rate: f64, burstiness: f64, seed: u64) -> Self {
        Arrivals {
            rng: StdRng::seed_from_u64(seed),
            shape: burstiness,
            scale: 1.0 / (rate * burstiness),
        }
    }

    /// The next gap.
    pub fn next_gap(&mut self) -> f64 {
        gamma(&mut self.rng, self.shape) * self.scale
    }
}

/// A Gamma(shape, 1) sample (Marsaglia and Tsang; boosted below shape 1).
fn gamma(rng: &mut StdRng, shape: f64) -> f64 {
    if shape < 1.0 {
        let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        return gamma(rng, shape + 1.0) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = normal(rng);
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u: f64 = rng.random();
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_have_the_asked_mean_and_spread() {
        for (burst, cv2) in [(1.0, 1.0), (0.25, 4.0), (4.0, 0.25)] {
            let mut a = Arrivals::new(10.0, burst, 7);
            let g: Vec<f64> = (0..40_000).map(|_| a.next_gap()).collect();
            let mean = g.iter().sum::<f64>() / g.len() as f64;
            let var = g.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / g.len() as f64;
            assert!(
                (mean - 0.1).abs() < 0.004,
                "burstiness {burst}: mean {mean}"
            );
            // Squared coefficient of variation of a gamma is 1 / shape.
            let got = var / (mean * mean);
            assert!(
                (got - cv2).abs() < 0.1 * cv2,
                "burstiness {burst}: cv² {got}"
            );
        }
    }
}
