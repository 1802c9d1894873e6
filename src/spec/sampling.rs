//! Logits → token: greedy argmax, or temperature + top-p sampling by inverse CDF with a uniform
//! number keyed by (seed, stream, output index).
//!
//! Keying the randomness by output index (instead of drawing from one running stream) makes the
//! token at output index j a fixed function of the committed prefix and u_j. Sample-and-match
//! therefore reproduces plain AR sampling with the same seed token for token, however many
//! positions a cycle verifies and discards.

use candle_core::{Tensor, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::SpecError;

/// Temperatures at or below this decode greedily (the DFlash reference uses 1e-5).
pub const GREEDY_TEMPERATURE: f32 = 1e-5;

/// How a cycle decides which draft tokens to accept when T > 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AcceptRule {
    /// Sample the target at each block position; accept draft tokens while they equal the
    /// sample (the DFlash reference). Needs nothing from the drafter.
    #[default]
    SampleMatch,
    /// Residual rejection sampling (accept x with probability min(1, p(x)/q(x)), on rejection
    /// resample from max(0, p - q)). Used for cycles whose draft carries the drafter's
    /// probabilities q; cycles without them fall back to sample-and-match.
    Residual,
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    /// 0 (or ≤ 1e-5) = greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 keeps the whole vocabulary. Ignored when greedy.
    pub top_p: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self::default()
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= GREEDY_TEMPERATURE
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(SpecError::InvalidConfig {
                what: format!("temperature {} must be finite and ≥ 0 (0 = greedy)", self.temperature),
            });
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SpecError::InvalidConfig {
                what: format!("top_p {} must lie in (0, 1] (1 = no nucleus filter)", self.top_p),
            });
        }
        Ok(())
    }

    /// The sampling distribution of one row of logits: softmax(logits / T), restricted to the
    /// smallest set of most likely tokens whose mass reaches top_p (the token that crosses
    /// top_p is kept; ties broken by lower id), renormalised. Computed in f64. `index` only
    /// labels errors.
    pub fn probs(&self, logits: &[f32], index: usize) -> Result<Vec<f64>, SpecError> {
        let t = self.temperature.max(GREEDY_TEMPERATURE) as f64;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        if !max.is_finite() || logits.iter().any(|x| x.is_nan()) {
            return Err(SpecError::NonFiniteLogits { index });
        }
        let mut p: Vec<f64> = logits.iter().map(|&x| ((x as f64 - max) / t).exp()).collect();
        let sum: f64 = p.iter().sum();
        p.iter_mut().for_each(|x| *x /= sum);
        if self.top_p < 1.0 {
            let mut order: Vec<usize> = (0..p.len()).collect();
            order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
            let mut cum = 0.0;
            let mut keep = order.len();
            for (rank, &i) in order.iter().enumerate() {
                cum += p[i];
                if cum >= self.top_p as f64 {
                    keep = rank + 1;
                    break;
                }
            }
            for &i in &order[keep..] {
                p[i] = 0.0;
            }
            let kept: f64 = p.iter().sum();
            p.iter_mut().for_each(|x| *x /= kept);
        }
        Ok(p)
    }
}

/// Which independent stream a uniform number comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Sampling a token from the target's distribution.
    Target = 0,
    /// The accept/reject coin of residual rejection sampling.
    Accept = 1,
    /// Resampling from the residual max(0, p - q) after a rejection.
    Residual = 2,
}

/// Uniform numbers in [0, 1) addressed by (seed, stream, output index): ChaCha8 with the seed
/// as key, the stream as nonce, and word position 2·index.
#[derive(Debug, Clone)]
pub struct KeyedRng {
    rng: ChaCha8Rng,
}

impl KeyedRng {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    pub fn uniform(&mut self, stream: Stream, index: usize) -> f64 {
        self.rng.set_stream(stream as u64);
        self.rng.set_word_pos(2 * index as u128);
        self.rng.gen::<f64>()
    }
}

/// Inverse-CDF draw over token ids in id order: the first id whose cumulative mass exceeds
/// u·total. Zero-mass ids are never returned.
pub fn sample_from(probs: &[f64], u: f64) -> u32 {
    let total: f64 = probs.iter().sum();
    let target = u * total;
    let mut cum = 0.0;
    let mut last_nonzero = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            cum += p;
            last_nonzero = i;
            if cum > target {
                return i as u32;
            }
        }
    }
    last_nonzero as u32
}

/// Argmax of every row of (n, V) logits.
pub fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>, SpecError> {
    Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_p_keeps_the_token_that_crosses_the_threshold_and_renormalises() {
        // softmax at T = 1 of ln(p) is p itself.
        let p = [0.1f32, 0.5, 0.15, 0.25];
        let logits: Vec<f32> = p.iter().map(|x| x.ln()).collect();
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.7,
        };
        let q = params.probs(&logits, 0).unwrap();
        // 0.5 + 0.25 = 0.75 ≥ 0.7: ids 1 and 3 are kept.
        assert_eq!(q[0], 0.0);
        assert_eq!(q[2], 0.0);
        assert!((q[1] - 0.5 / 0.75).abs() < 1e-6);
        assert!((q[3] - 0.25 / 0.75).abs() < 1e-6);
        let all = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
        }
        .probs(&logits, 0)
        .unwrap();
        for (a, b) in all.iter().zip(p) {
            assert!((a - b as f64).abs() < 1e-6);
        }
    }

    #[test]
    fn low_temperature_concentrates_on_the_argmax() {
        let logits = [1.0f32, 3.0, 2.9, -1.0];
        let q = SamplingParams {
            temperature: 0.005,
            top_p: 1.0,
        }
        .probs(&logits, 0)
        .unwrap();
        assert!(q[1] > 0.99999);
    }

    #[test]
    fn inverse_cdf_skips_zero_mass_tokens() {
        let probs = [0.0, 0.25, 0.0, 0.75, 0.0];
        assert_eq!(sample_from(&probs, 0.0), 1);
        assert_eq!(sample_from(&probs, 0.2499), 1);
        assert_eq!(sample_from(&probs, 0.25), 3);
        assert_eq!(sample_from(&probs, 0.999999), 3);
    }

    #[test]
    fn keyed_uniforms_depend_on_seed_stream_and_index_only() {
        let mut a = KeyedRng::new(7);
        let mut b = KeyedRng::new(7);
        let x5 = a.uniform(Stream::Target, 5);
        let _ = b.uniform(Stream::Accept, 9);
        let _ = b.uniform(Stream::Target, 2);
        assert_eq!(b.uniform(Stream::Target, 5), x5);
        assert_ne!(a.uniform(Stream::Target, 6), x5);
        assert_ne!(a.uniform(Stream::Accept, 5), x5);
        assert_ne!(KeyedRng::new(8).uniform(Stream::Target, 5), x5);
        assert!((0.0..1.0).contains(&x5));
    }

    #[test]
    fn invalid_sampling_params_are_rejected() {
        assert!(SamplingParams {
            temperature: -1.0,
            top_p: 1.0
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            temperature: f32::NAN,
            top_p: 1.0
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            temperature: 1.0,
            top_p: 0.0
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            temperature: 1.0,
            top_p: 1.5
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            temperature: 0.7,
            top_p: 0.9
        }
        .validate()
        .is_ok());
    }
}
