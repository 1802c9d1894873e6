//! From sequences to training blocks: anchor sampling, block inputs, labels and validity
//! (DESIGN §3).
//!
//! A block anchored at position a holds `[x_a, MASK × (B-1)]` at positions a..a+B-1.
//! DFlash: block position k = 1..B-1 predicts x_{a+k}. Domino (`shift_label`): k = 0..B-1
//! predicts x_{a+k+1}. A label is valid iff it lies inside the sequence and under the loss
//! mask. Anchors are drawn uniformly, without replacement, among positions p with
//! loss_mask[p] = loss_mask[p+1] = 1, and redrawn every step from a seed derived from
//! (run seed, step, sequence slot), so a resumed run draws exactly what the uninterrupted run
//! would have drawn.

use rand::seq::index::sample;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use serde::{Deserialize, Serialize};

/// Layout of the rows of a batch: `positions_per_block` consecutive rows per block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockLayout {
    /// Predicted positions (rows) per block: B-1 for DFlash, B for Domino.
    pub positions_per_block: usize,
    /// Block position of predicted index 0: 1 for DFlash (position 0 is the anchor), 0 for Domino.
    pub first_position: usize,
}

impl BlockLayout {
    /// DFlash: positions 1..B-1 of a block of size B are predicted.
    pub fn dflash(block_size: usize) -> Self {
        BlockLayout { positions_per_block: block_size.saturating_sub(1), first_position: 1 }
    }

    /// Domino (`shift_label`): positions 0..B-1 are predicted (position k predicts x_{a+k+1}).
    pub fn domino(block_size: usize) -> Self {
        BlockLayout { positions_per_block: block_size, first_position: 0 }
    }
}

/// One sequence's blocks, ready for the drafter and the head.
#[derive(Debug, Clone, PartialEq)]
pub struct Blocks {
    /// Anchor positions, ascending.
    pub anchors: Vec<usize>,
    /// (n_blocks · B) block input ids: the anchor token, then the MASK token.
    pub block_ids: Vec<u32>,
    /// (n_blocks · P) gold labels, P = predicted positions per block: the token x_{a+1+i}
    /// whenever it lies inside the sequence, valid or not (0 past the end).
    pub labels: Vec<u32>,
    /// (n_blocks · P) validity of each label.
    pub valid: Vec<bool>,
}

/// A deterministic RNG for (seed, step, slot): independent of anything that happened before.
pub fn step_rng(seed: u64, step: u64, slot: u64) -> ChaCha8Rng {
    // SplitMix-style mixing so nearby (step, slot) pairs give unrelated streams.
    let mut z = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ slot.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ChaCha8Rng::seed_from_u64(z ^ (z >> 31))
}

/// Positions that may anchor a block: loss_mask[p] = loss_mask[p+1] = 1.
pub fn anchor_candidates(loss_mask: &[u8]) -> Vec<usize> {
    (0..loss_mask.len().saturating_sub(1)).filter(|&p| loss_mask[p] != 0 && loss_mask[p + 1] != 0).collect()
}

/// Draws up to `num_anchors` distinct anchors uniformly among the candidates, ascending.
pub fn sample_anchors(loss_mask: &[u8], num_anchors: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
    let cands = anchor_candidates(loss_mask);
    let k = num_anchors.min(cands.len());
    let mut picked: Vec<usize> = sample(rng, cands.len(), k).into_iter().map(|i| cands[i]).collect();
    picked.sort_unstable();
    picked
}

/// Builds block inputs, labels and validity for the given anchors.
pub fn build_blocks(ids: &[u32], loss_mask: &[u8], anchors: &[usize], block_size: usize, layout: BlockLayout, mask_token_id: u32) -> Blocks {
    let p = layout.positions_per_block;
    let mut block_ids = Vec::with_capacity(anchors.len() * block_size);
    let mut labels = Vec::with_capacity(anchors.len() * p);
    let mut valid = Vec::with_capacity(anchors.len() * p);
    for &a in anchors {
        block_ids.push(ids[a]);
        block_ids.extend(std::iter::repeat_n(mask_token_id, block_size - 1));
        for i in 0..p {
            // Predicted index i predicts x_{a+1+i} in both layouts: DFlash's block position
            // 1+i predicts the token at its own position, Domino's position i the next one.
            let t = a + 1 + i;
            // An invalid label inside the sequence keeps its gold token (Domino's GRU consumes
            // it: the labels are the block's teacher-forced tokens); past the end it is 0.
            let ok = t < ids.len() && loss_mask[t] != 0;
            labels.push(ids.get(t).copied().unwrap_or(0));
            valid.push(ok);
        }
    }
    Blocks { anchors: anchors.to_vec(), block_ids, labels, valid }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchors_sit_where_the_anchor_and_its_successor_are_supervised() {
        let mask = [0, 1, 1, 0, 1, 1, 1, 0];
        assert_eq!(anchor_candidates(&mask), vec![1, 4, 5]);
        let mut rng = step_rng(0, 0, 0);
        let a = sample_anchors(&mask, 10, &mut rng);
        assert_eq!(a, vec![1, 4, 5]);
        let a = sample_anchors(&mask, 2, &mut step_rng(0, 1, 0));
        assert_eq!(a.len(), 2);
        assert!(a.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn anchors_are_redrawn_every_step_and_reproducible() {
        let mask = vec![1u8; 200];
        let a0 = sample_anchors(&mask, 16, &mut step_rng(7, 0, 0));
        let a0_again = sample_anchors(&mask, 16, &mut step_rng(7, 0, 0));
        let a1 = sample_anchors(&mask, 16, &mut step_rng(7, 1, 0));
        assert_eq!(a0, a0_again);
        assert_ne!(a0, a1);
    }

    #[test]
    fn dflash_block_position_k_predicts_the_token_k_after_the_anchor() {
        let ids: Vec<u32> = (100..110).collect();
        let mask = vec![1u8; 10];
        let b = build_blocks(&ids, &mask, &[2], 4, BlockLayout::dflash(4), 9);
        assert_eq!(b.block_ids, vec![102, 9, 9, 9]);
        assert_eq!(b.labels, vec![103, 104, 105]);
        assert_eq!(b.valid, vec![true, true, true]);
    }

    #[test]
    fn domino_position_k_predicts_one_further() {
        let ids: Vec<u32> = (100..110).collect();
        let mask = vec![1u8; 10];
        let b = build_blocks(&ids, &mask, &[2], 4, BlockLayout::domino(4), 9);
        assert_eq!(b.labels, vec![103, 104, 105, 106]);
    }

    #[test]
    fn labels_past_the_end_or_outside_the_loss_mask_are_invalid() {
        let ids: Vec<u32> = (100..106).collect();
        let mask = [1, 1, 1, 0, 1, 1];
        let b = build_blocks(&ids, &mask, &[1], 6, BlockLayout::dflash(6), 9);
        // positions 2,3,4,5,6: 3 is unmasked (mid-block invalid), 6 is past the end
        assert_eq!(b.valid, vec![true, false, true, true, false]);
        // The unsupervised mid-block label keeps its gold token; past the end it is 0.
        assert_eq!(b.labels, vec![102, 103, 104, 105, 0]);
    }
}
