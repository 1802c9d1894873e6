//! Step 5 of [`ChunkedHead::run`](super::ChunkedHead::run), and what a branch (final or base
//! logits) accumulates across chunks: per-row statistics, weights, weight totals and metrics.

use std::ops::Range;

use super::batch::{Batch, Mix};
use super::rows::RowStat;
use super::{BaseSupport, RowOutputs};
use crate::train::objective::{
    BlockLayout, BlockRows, MetricCounts, ResolvedObjective, WeightTotals,
};

/// Per-branch accumulation across chunks.
pub(super) struct BranchAcc {
    ce: Vec<f32>,
    correct: Vec<bool>,
    p_gold: Vec<f32>,
    p_top: Vec<f32>,
    pub weights: Vec<f32>,
    pub totals: WeightTotals,
    metrics: MetricCounts,
    weighted_ce: f64,
}

impl BranchAcc {
    pub(super) fn new(n: usize, layout: BlockLayout) -> Self {
        BranchAcc {
            ce: vec![0.0; n],
            correct: vec![false; n],
            p_gold: vec![0.0; n],
            p_top: vec![0.0; n],
            weights: vec![0.0; n],
            totals: WeightTotals::default(),
            metrics: MetricCounts::new(layout),
            weighted_ce: 0.0,
        }
    }

    pub(super) fn record_stats(&mut self, r0: usize, stats: &[RowStat]) {
        for (j, s) in stats.iter().enumerate() {
            self.ce[r0 + j] = s.ce;
            self.p_gold[r0 + j] = s.p_gold;
            self.p_top[r0 + j] = s.inv_sum;
            self.correct[r0 + j] = s.correct;
        }
    }

    /// Weights of the chunk's blocks, from this branch's statistics (`source` None) or from another
    /// branch's (correct, p_gold); the metrics always use this branch's own correctness.
    fn weigh(
        &mut self,
        objective: &ResolvedObjective,
        layout: BlockLayout,
        rows: Range<usize>,
        valid: &[bool],
        source: Option<(&[bool], &[f32])>,
        seed: u64,
    ) {
        let BranchAcc {
            ce,
            correct,
            p_gold,
            weights,
            totals,
            metrics,
            weighted_ce,
            ..
        } = self;
        let (src_correct, src_p_gold) = match source {
            Some(s) => s,
            None => (&correct[..], &p_gold[..]),
        };
        let p = layout.positions_per_block;
        let mut b0 = rows.start;
        while b0 < rows.end {
            let r = b0..b0 + p;
            let block = BlockRows {
                valid: &valid[r.clone()],
                correct: &src_correct[r.clone()],
                p_gold: &src_p_gold[r.clone()],
                first_row: b0,
            };
            objective.block_weights(block, seed, &mut weights[r.clone()]);
            totals.add_block(block.valid, &weights[r.clone()]);
            metrics.add_block(block.valid, &correct[r.clone()], &weights[r.clone()]);
            for i in r {
                *weighted_ce += f64::from(weights[i]) * f64::from(ce[i]);
            }
            b0 += p;
        }
    }

    pub(super) fn finish(self, normaliser: f32) -> RowOutputs {
        let loss = if normaliser > 0.0 {
            (self.weighted_ce / f64::from(normaliser)) as f32
        } else {
            0.0
        };
        RowOutputs {
            ce: self.ce,
            correct: self.correct,
            p_gold: self.p_gold,
            p_top: self.p_top,
            weights: self.weights,
            normaliser,
            loss,
            metrics: self.metrics,
        }
    }
}

/// The final branch and, for Domino, the base branch.
pub(super) struct Branches {
    pub fin: BranchAcc,
    pub base: Option<BranchAcc>,
}

impl Branches {
    pub fn new(n: usize, batch: &Batch<'_>) -> Self {
        Branches {
            fin: BranchAcc::new(n, batch.layout),
            base: batch.delta.map(|_| BranchAcc::new(n, batch.layout)),
        }
    }

    /// Weights of the chunk's `rows`, block by block: the final branch from its own statistics;
    /// the base branch from its own argmax ([`BaseSupport::OwnArgmax`]) or from the final
    /// branch's correctness and p_gold.
    pub fn weigh_chunk(
        &mut self,
        objective: &ResolvedObjective,
        mix: &Mix,
        batch: &Batch<'_>,
        rows: Range<usize>,
    ) {
        let Branches { fin, base } = self;
        fin.weigh(
            objective,
            batch.layout,
            rows.clone(),
            batch.valid,
            None,
            batch.seed,
        );
        if let Some(b) = base {
            let source = match mix.base_support {
                Some(BaseSupport::OwnArgmax) => None,
                _ => Some((&fin.correct[..], &fin.p_gold[..])),
            };
            b.weigh(
                &mix.base_objective,
                batch.layout,
                rows,
                batch.valid,
                source,
                batch.seed,
            );
        }
    }
}
