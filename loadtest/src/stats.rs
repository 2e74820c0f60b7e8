//! Percentile summaries.

use serde::Serialize;

/// Mean, extremes and percentiles of one metric (interpolated like numpy's default).
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Summary {
    /// Arithmetic mean.
    pub mean: f64,
    /// Smallest sample.
    pub min: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest sample.
    pub max: f64,
}

/// The `p`-th percentile of sorted `xs`.
fn percentile(xs: &[f64], p: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let k = (xs.len() - 1) as f64 * p / 100.0;
    let (f, c) = (k.floor() as usize, k.ceil() as usize);
    xs[f] + (xs[c] - xs[f]) * (k - f as f64)
}

/// The 0th, 2nd, …, 100th percentiles of `xs`: a compact distribution for CDF charts.
pub fn cdf(xs: &[f64]) -> Vec<f64> {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return Vec::new();
    }
    (0..=50).map(|i| percentile(&v, i as f64 * 2.0)).collect()
}

impl Summary {
    /// Summarises `xs` (NaN everywhere when empty).
    pub fn of(xs: &[f64]) -> Summary {
        let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        Summary {
            mean: if v.is_empty() {
                f64::NAN
            } else {
                v.iter().sum::<f64>() / v.len() as f64
            },
            min: v.first().copied().unwrap_or(f64::NAN),
            p50: percentile(&v, 50.0),
            p90: percentile(&v, 90.0),
            p99: percentile(&v, 99.0),
            max: v.last().copied().unwrap_or(f64::NAN),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let s = Summary::of(&[4.0, 1.0, 3.0, 2.0, f64::NAN]);
        assert_eq!(s.mean, 2.5);
        assert_eq!(s.p50, 2.5);
        assert!((s.p90 - 3.7).abs() < 1e-12);
        assert_eq!((s.min, s.max), (1.0, 4.0));
        assert!(Summary::of(&[]).p50.is_nan());
    }
}
