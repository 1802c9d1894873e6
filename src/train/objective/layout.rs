//! The block-major row layout shared by the objective, the head and the drafters.

use serde::{Deserialize, Serialize};

use super::ObjectiveError;

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
        BlockLayout {
            positions_per_block: block_size.saturating_sub(1),
            first_position: 1,
        }
    }

    /// Domino (`shift_label`): positions 0..B-1 are predicted (position k predicts x_{a+k+1}).
    pub fn domino(block_size: usize) -> Self {
        BlockLayout {
            positions_per_block: block_size,
            first_position: 0,
        }
    }

    /// Number of blocks in `rows` rows, or a shape error when rows is not a multiple of the block.
    pub fn blocks(&self, rows: usize, what: &'static str) -> Result<usize, ObjectiveError> {
        let per_block = self.positions_per_block;
        if per_block == 0 {
            return Err(ObjectiveError::EmptyLayout);
        }
        if !rows.is_multiple_of(per_block) {
            let blocks = rows / per_block + 1;
            return Err(ObjectiveError::Shape {
                what,
                got: rows,
                expected: blocks * per_block,
                blocks,
                per_block,
            });
        }
        Ok(rows / per_block)
    }
}

pub(super) fn check_len(
    layout: BlockLayout,
    blocks: usize,
    what: &'static str,
    got: usize,
) -> Result<(), ObjectiveError> {
    let expected = blocks * layout.positions_per_block;
    if got != expected {
        return Err(ObjectiveError::Shape {
            what,
            got,
            expected,
            blocks,
            per_block: layout.positions_per_block,
        });
    }
    Ok(())
}
