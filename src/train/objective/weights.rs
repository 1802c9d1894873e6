//! The weights: per block of predicted positions (every rule is block-local), and their totals
//! for the batch-global normaliser.

use super::definition::{FailureRule, Normaliser};
use super::layout::{check_len, BlockLayout};
use super::resolve::{DpaceRule, ResolvedObjective, WeightRule};
use super::ObjectiveError;

/// One block's per-position statistics (slices of length P, the predicted positions).
#[derive(Clone, Copy, Debug)]
pub struct BlockRows<'a> {
    pub valid: &'a [bool],
    /// argmax == label.
    pub correct: &'a [bool],
    /// Detached probability of the label.
    pub p_gold: &'a [f32],
    /// Global row index of the block's predicted index 0; keys [`FailureRule::Sample`]'s draws.
    pub first_row: usize,
}

/// A batch's per-row statistics, rows laid out as in [`BlockLayout`].
#[derive(Clone, Copy, Debug)]
pub struct RowStats<'a> {
    pub valid: &'a [bool],
    pub correct: &'a [bool],
    pub p_gold: &'a [f32],
}

/// Sums over blocks that the normaliser needs; add blocks chunk by chunk, then call
/// [`ResolvedObjective::normaliser`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct WeightTotals {
    pub weight_sum: f64,
    pub valid: usize,
    pub real_blocks: usize,
}

impl WeightTotals {
    pub fn add_block(&mut self, valid: &[bool], weights: &[f32]) {
        let n_valid = valid.iter().filter(|&&v| v).count();
        self.valid += n_valid;
        self.real_blocks += usize::from(n_valid > 0);
        self.weight_sum += weights.iter().map(|&w| f64::from(w)).sum::<f64>();
    }
}

/// Per-row weights of a batch and the value the weighted CE sum is divided by.
#[derive(Clone, Debug, PartialEq)]
pub struct Weights {
    pub w: Vec<f32>,
    pub totals: WeightTotals,
    /// 0 when the batch has nothing to learn from (then the loss and its gradient are 0).
    pub normaliser: f32,
}

/// Uniform in [0, 1) from (seed, row) with splitmix64: reproducible and independent of chunking.
fn uniform(seed: u64, row: usize) -> f32 {
    let mut z = seed ^ (row as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    // 24 high bits give every f32 in [0, 1) on a 2^-24 grid.
    (z >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
}

impl ResolvedObjective {
    /// Weights of one block's predicted positions into `out` (length P). `seed` keys the draws of
    /// [`FailureRule::Sample`] and is unused otherwise.
    pub fn block_weights(&self, rows: BlockRows<'_>, seed: u64, out: &mut [f32]) {
        let n = out
            .len()
            .min(rows.valid.len())
            .min(rows.correct.len())
            .min(rows.p_gold.len());
        match self.rule {
            WeightRule::Mask { decay_gamma, auf } => {
                let mut alive = true;
                for (i, w_out) in out.iter_mut().enumerate().take(n) {
                    let v = rows.valid[i];
                    let mut w = if v && alive { 1.0 } else { 0.0 };
                    if let Some(gamma) = decay_gamma {
                        w *= (-(i as f32) / gamma).exp();
                    }
                    *w_out = w;
                    if let Some(rule) = auf {
                        let survives = if v {
                            match rule.failure {
                                FailureRule::Argmax => rows.correct[i],
                                FailureRule::Sample => {
                                    uniform(seed, rows.first_row + i) < rows.p_gold[i]
                                }
                            }
                        } else {
                            rule.invalid_transparent
                        };
                        alive &= survives;
                    }
                }
            }
            WeightRule::Dpace(DpaceRule { alpha, prefix_only }) => {
                // out[i] <- P_i = Π_{j≤i} s_j, invalid s = 1.
                let mut prefix = 1.0f32;
                for ((o, &v), &p) in out.iter_mut().zip(rows.valid).zip(rows.p_gold).take(n) {
                    if v {
                        prefix *= (1.0 - alpha) * p + alpha;
                    }
                    *o = prefix;
                }
                if prefix_only {
                    for (o, &v) in out.iter_mut().zip(rows.valid).take(n) {
                        if !v {
                            *o = 0.0;
                        }
                    }
                } else {
                    // W_i = Σ_{j≥i} P_j v_j, from the end.
                    let mut suffix = 0.0f32;
                    for i in (0..n).rev() {
                        if rows.valid[i] {
                            suffix += out[i];
                            out[i] = suffix;
                        } else {
                            out[i] = 0.0;
                        }
                    }
                }
            }
        }
        for w in out.iter_mut().skip(n) {
            *w = 0.0;
        }
    }

    /// The normaliser for accumulated totals; 0 when there is nothing to divide (empty batch).
    pub fn normaliser(&self, totals: &WeightTotals, num_sequences: usize) -> f32 {
        match self.norm {
            Normaliser::WeightSum => totals.weight_sum as f32,
            Normaliser::ValidCount => totals.valid as f32,
            Normaliser::Blocks => totals.real_blocks as f32,
            Normaliser::Sequences => num_sequences as f32,
        }
    }

    /// Weights for a whole batch (rows block-major as in [`BlockLayout`]).
    pub fn weights(
        &self,
        layout: BlockLayout,
        stats: RowStats<'_>,
        num_sequences: usize,
        seed: u64,
    ) -> Result<Weights, ObjectiveError> {
        let rows = stats.valid.len();
        let blocks = super::layout::blocks_in(layout, rows, "valid")?;
        check_len(layout, blocks, "correct", stats.correct.len())?;
        check_len(layout, blocks, "p_gold", stats.p_gold.len())?;
        let per_block = layout.positions_per_block;
        let mut w = vec![0.0f32; rows];
        let mut totals = WeightTotals::default();
        for b in 0..blocks {
            let r = b * per_block..(b + 1) * per_block;
            let block = BlockRows {
                valid: &stats.valid[r.clone()],
                correct: &stats.correct[r.clone()],
                p_gold: &stats.p_gold[r.clone()],
                first_row: r.start,
            };
            self.block_weights(block, seed, &mut w[r.clone()]);
            totals.add_block(block.valid, &w[r]);
        }
        let normaliser = self.normaliser(&totals, num_sequences);
        Ok(Weights {
            w,
            totals,
            normaliser,
        })
    }
}
