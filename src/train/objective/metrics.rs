//! The training metrics: counts that merge across chunks, micro-batches and steps, and their
//! summary (DESIGN §3 "Metrics to log").

use serde::{Deserialize, Serialize};

use super::layout::{check_len, BlockLayout};
use super::ObjectiveError;

/// Counts behind the training metrics; merge across chunks, micro-batches or steps, then
/// [`MetricCounts::summary`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricCounts {
    /// Block position of predicted index 0 (labels `acc_per_position`).
    pub first_position: usize,
    /// Real blocks (at least one valid position).
    pub blocks: usize,
    pub valid: usize,
    pub correct: usize,
    /// Valid positions with w > 0.
    pub support: usize,
    pub support_correct: usize,
    /// Σ over real blocks of (1 + leading run of correct valid positions).
    pub accept_len_sum: usize,
    pub valid_per_position: Vec<usize>,
    pub correct_per_position: Vec<usize>,
}

/// Per-batch training metrics (DESIGN §3 "Metrics to log").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BlockMetrics {
    /// argmax == label over all valid positions (DFlash's `acc`).
    pub acc: f32,
    /// Accuracy over positions with w > 0.
    pub support_acc: f32,
    /// Mean number of positions with w > 0 per real block.
    pub support_size: f32,
    /// Mean over real blocks of 1 + the leading run of correct positions (an invalid position ends it).
    pub accept_len: f32,
    /// Accuracy at predicted index i (block position `first_position + i`); 0 where nothing was valid.
    pub acc_per_position: Vec<f32>,
    pub first_position: usize,
}

fn ratio(num: usize, den: usize) -> f32 {
    if den == 0 {
        0.0
    } else {
        num as f32 / den as f32
    }
}

impl MetricCounts {
    pub fn new(layout: BlockLayout) -> Self {
        MetricCounts {
            first_position: layout.first_position,
            valid_per_position: vec![0; layout.positions_per_block],
            correct_per_position: vec![0; layout.positions_per_block],
            ..Default::default()
        }
    }

    /// Adds one block (slices of length P).
    pub fn add_block(&mut self, valid: &[bool], correct: &[bool], weights: &[f32]) {
        let n = valid.len().min(correct.len()).min(weights.len());
        if self.valid_per_position.len() < n {
            self.valid_per_position.resize(n, 0);
            self.correct_per_position.resize(n, 0);
        }
        let mut any_valid = false;
        let mut run_open = true;
        let mut run = 0usize;
        for i in 0..n {
            let (v, c) = (valid[i], correct[i]);
            if v {
                any_valid = true;
                self.valid += 1;
                self.valid_per_position[i] += 1;
                if c {
                    self.correct += 1;
                    self.correct_per_position[i] += 1;
                }
                if weights[i] > 0.0 {
                    self.support += 1;
                    self.support_correct += usize::from(c);
                }
            }
            if run_open && v && c {
                run += 1;
            } else {
                run_open = false;
            }
        }
        if any_valid {
            self.blocks += 1;
            self.accept_len_sum += 1 + run;
        }
    }

    /// Counts of a whole batch.
    pub fn from_batch(
        layout: BlockLayout,
        valid: &[bool],
        correct: &[bool],
        weights: &[f32],
    ) -> Result<Self, ObjectiveError> {
        let blocks = super::layout::blocks_in(layout, valid.len(), "valid")?;
        check_len(layout, blocks, "correct", correct.len())?;
        check_len(layout, blocks, "weights", weights.len())?;
        let p = layout.positions_per_block;
        let mut counts = MetricCounts::new(layout);
        for b in 0..blocks {
            let r = b * p..(b + 1) * p;
            counts.add_block(&valid[r.clone()], &correct[r.clone()], &weights[r]);
        }
        Ok(counts)
    }

    pub fn merge(&mut self, other: &MetricCounts) {
        self.blocks += other.blocks;
        self.valid += other.valid;
        self.correct += other.correct;
        self.support += other.support;
        self.support_correct += other.support_correct;
        self.accept_len_sum += other.accept_len_sum;
        let n = other.valid_per_position.len();
        if self.valid_per_position.len() < n {
            self.valid_per_position.resize(n, 0);
            self.correct_per_position.resize(n, 0);
        }
        for i in 0..n {
            self.valid_per_position[i] += other.valid_per_position[i];
            self.correct_per_position[i] += other.correct_per_position.get(i).copied().unwrap_or(0);
        }
    }

    pub fn summary(&self) -> BlockMetrics {
        BlockMetrics {
            acc: ratio(self.correct, self.valid),
            support_acc: ratio(self.support_correct, self.support),
            support_size: ratio(self.support, self.blocks),
            accept_len: ratio(self.accept_len_sum, self.blocks),
            acc_per_position: self
                .valid_per_position
                .iter()
                .zip(&self.correct_per_position)
                .map(|(&v, &c)| ratio(c, v))
                .collect(),
            first_position: self.first_position,
        }
    }
}
