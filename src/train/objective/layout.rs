//! The block-major row layout shared by the objective, the head and the drafters. The layout
//! itself belongs to the drafters ([`crate::drafter::blocks::BlockLayout`]); this module adds
//! the objective's shape checks.

pub use crate::drafter::blocks::BlockLayout;

use super::ObjectiveError;

/// Number of blocks in `rows` rows, or a shape error when rows is not a multiple of the block.
pub fn blocks_in(layout: BlockLayout, rows: usize, what: &'static str) -> Result<usize, ObjectiveError> {
    let per_block = layout.positions_per_block;
    if per_block == 0 {
        return Err(ObjectiveError::EmptyLayout);
    }
    if !rows.is_multiple_of(per_block) {
        let blocks = rows / per_block + 1;
        return Err(ObjectiveError::Shape { what, got: rows, expected: blocks * per_block, blocks, per_block });
    }
    Ok(rows / per_block)
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
