//! Deciding how much of a draft the target accepts, from the logits of one verify pass.
//!
//! The verify pass runs the block `[last, d1..dk]`; logits row i (0..=k) is the target's
//! next-token distribution after `d_i` (row 0: after `last`). A verdict is `accepted` = acc,
//! the number of leading draft tokens kept, and `bonus`, the target's own token at row acc.
//! The committed chunk is `d1..d_acc, bonus`: acc + 1 tokens.
//!
//! - Greedy (T = 0): acc = longest prefix with d_{i+1} == argmax(row i); bonus = argmax(row acc).
//! - Sample-and-match (T > 0, the DFlash reference): s_i ~ p(row i) with the uniform of its
//!   output index; acc = longest prefix with d_{i+1} == s_i; bonus = s_acc. Every committed
//!   token is a target sample given the committed prefix, whatever the drafter proposed.
//! - Residual rejection (T > 0, drafts with probabilities q): accept d_{i+1} with probability
//!   min(1, p_i(d)/q_i(d)); at the first rejection the bonus comes from norm(max(0, p_i - q_i));
//!   if all k are accepted the bonus is a sample of row k. Exact for any q that is the true
//!   drawing distribution of the drafts; accepts more often than sample-and-match.

use candle_core::Tensor;

use super::sampling::{argmax_rows, sample_from, AcceptRule, KeyedRng, SamplingParams, Stream};
use super::SpecError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Leading draft tokens accepted (acc).
    pub accepted: usize,
    /// The target's token after them.
    pub bonus: u32,
}

/// The acceptance rule of one request: sampling parameters, rule, and its keyed randomness.
#[derive(Debug, Clone)]
pub struct Verifier {
    params: SamplingParams,
    rule: AcceptRule,
    rng: KeyedRng,
}

impl Verifier {
    pub fn new(params: SamplingParams, rule: AcceptRule, seed: u64) -> Self {
        Self {
            params,
            rule,
            rng: KeyedRng::new(seed),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The token for output index `index` from one (1, V) or (V,) row of logits: argmax, or a
    /// sample with that index's uniform.
    pub fn next_token(&mut self, logits: &Tensor, index: usize) -> Result<u32, SpecError> {
        let row = logits.flatten_all()?;
        if self.params.is_greedy() {
            return Ok(argmax_rows(&row.unsqueeze(0)?)?[0]);
        }
        let p = self.params.probs(&row.to_vec1::<f32>()?, index)?;
        Ok(sample_from(&p, self.rng.uniform(Stream::Target, index)))
    }

    /// Verifies `drafts` (k tokens) against `logits` (k+1, V) of the block `[last, drafts]`.
    /// `first_index` is the output index of the token row 0 decides (the first draft's slot).
    /// `draft_probs`: optional (k, V) drawing distributions of the drafts.
    pub fn verify(
        &mut self,
        drafts: &[u32],
        draft_probs: Option<&Tensor>,
        logits: &Tensor,
        first_index: usize,
    ) -> Result<Verdict, SpecError> {
        let k = drafts.len();
        if self.params.is_greedy() {
            let best = argmax_rows(logits)?;
            return Ok(greedy(drafts, &best));
        }
        match (self.rule, draft_probs) {
            (AcceptRule::Residual, Some(q)) if k > 0 => self.residual(drafts, q, logits, first_index),
            _ => self.sample_match(drafts, logits, first_index),
        }
    }

    fn sample_match(&mut self, drafts: &[u32], logits: &Tensor, first_index: usize) -> Result<Verdict, SpecError> {
        for i in 0..=drafts.len() {
            let index = first_index + i;
            let p = self.params.probs(&logits.get(i)?.to_vec1::<f32>()?, index)?;
            let s = sample_from(&p, self.rng.uniform(Stream::Target, index));
            if drafts.get(i) != Some(&s) {
                return Ok(Verdict { accepted: i, bonus: s });
            }
        }
        // Unreachable: row k has no draft to match, so the loop returns there.
        Err(SpecError::InvalidConfig {
            what: "verify block has no bonus row".into(),
        })
    }

    fn residual(&mut self, drafts: &[u32], q: &Tensor, logits: &Tensor, first_index: usize) -> Result<Verdict, SpecError> {
        let k = drafts.len();
        let vocab = logits.dim(1)?;
        if q.dims() != [k, vocab] {
            return Err(SpecError::DraftProbsShape {
                got: q.dims().to_vec(),
                expected: vec![k, vocab],
            });
        }
        for (i, &d) in drafts.iter().enumerate() {
            let index = first_index + i;
            let p = self.params.probs(&logits.get(i)?.to_vec1::<f32>()?, index)?;
            let raw = q.get(i)?.to_vec1::<f32>()?;
            let Some(&qd) = raw.get(d as usize) else {
                return Err(SpecError::DraftTokenOutOfRange {
                    token: d,
                    position: i + 1,
                    vocab,
                });
            };
            let qsum: f64 = raw.iter().map(|&x| x.max(0.0) as f64).sum();
            if !(qd > 0.0 && qsum.is_finite()) {
                return Err(SpecError::DraftProbInconsistent {
                    token: d,
                    position: i + 1,
                    prob: qd,
                });
            }
            let qi: Vec<f64> = raw.iter().map(|&x| x.max(0.0) as f64 / qsum).collect();
            // Accept with probability min(1, p/q): u·q < p.
            if self.rng.uniform(Stream::Accept, index) * qi[d as usize] < p[d as usize] {
                continue;
            }
            let mut r: Vec<f64> = p.iter().zip(&qi).map(|(&pp, &qq)| (pp - qq).max(0.0)).collect();
            if r.iter().sum::<f64>() <= 0.0 {
                // p ≤ q everywhere only in rounding; the residual is then p itself.
                r = p;
            }
            return Ok(Verdict {
                accepted: i,
                bonus: sample_from(&r, self.rng.uniform(Stream::Residual, index)),
            });
        }
        let index = first_index + k;
        let p = self.params.probs(&logits.get(k)?.to_vec1::<f32>()?, index)?;
        Ok(Verdict {
            accepted: k,
            bonus: sample_from(&p, self.rng.uniform(Stream::Target, index)),
        })
    }
}

/// Greedy acceptance from the argmax of each of the k+1 rows.
pub fn greedy(drafts: &[u32], target_argmax: &[u32]) -> Verdict {
    let accepted = drafts.iter().zip(target_argmax).take_while(|(d, t)| d == t).count();
    Verdict {
        accepted,
        bonus: target_argmax[accepted],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn greedy_accepts_the_longest_matching_prefix_and_takes_the_bonus_after_it() {
        assert_eq!(greedy(&[5, 6, 7], &[5, 6, 9, 1]), Verdict { accepted: 2, bonus: 9 });
        assert_eq!(greedy(&[5, 6, 7], &[4, 6, 7, 1]), Verdict { accepted: 0, bonus: 4 });
        assert_eq!(greedy(&[5, 6, 7], &[5, 6, 7, 1]), Verdict { accepted: 3, bonus: 1 });
        assert_eq!(greedy(&[], &[3]), Verdict { accepted: 0, bonus: 3 });
    }

    #[test]
    fn a_draft_outside_the_nucleus_is_always_rejected() {
        // Row 0 puts all top-p mass on token 1; the draft proposes 0.
        let logits = Tensor::new(&[[0.0f32, 10.0, 0.0], [0.0, 0.0, 10.0]], &Device::Cpu).unwrap();
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
        };
        let q = Tensor::new(&[[1.0f32, 0.0, 0.0]], &Device::Cpu).unwrap();
        for seed in 0..50 {
            let mut sm = Verifier::new(params, AcceptRule::SampleMatch, seed);
            assert_eq!(sm.verify(&[0], None, &logits, 0).unwrap(), Verdict { accepted: 0, bonus: 1 });
            let mut rr = Verifier::new(params, AcceptRule::Residual, seed);
            assert_eq!(rr.verify(&[0], Some(&q), &logits, 0).unwrap(), Verdict { accepted: 0, bonus: 1 });
        }
    }

    #[test]
    fn residual_rejection_rejects_probabilities_that_do_not_cover_the_draft() {
        let logits = Tensor::new(&[[0.0f32, 1.0], [1.0, 0.0]], &Device::Cpu).unwrap();
        let q = Tensor::new(&[[0.0f32, 1.0]], &Device::Cpu).unwrap();
        let mut v = Verifier::new(
            SamplingParams {
                temperature: 1.0,
                top_p: 1.0,
            },
            AcceptRule::Residual,
            0,
        );
        assert!(matches!(
            v.verify(&[0], Some(&q), &logits, 0),
            Err(SpecError::DraftProbInconsistent { token: 0, .. })
        ));
        let bad_shape = Tensor::new(&[[0.5f32, 0.5], [0.5, 0.5]], &Device::Cpu).unwrap();
        assert!(matches!(
            v.verify(&[0], Some(&bad_shape), &logits, 0),
            Err(SpecError::DraftProbsShape { .. })
        ));
    }
}
