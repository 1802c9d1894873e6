//! The block size a loaded drafter runs at, chosen from measurement on this machine
//! ([`crate::spec::block_size`]) unless the user fixes it.

use std::path::Path;

use super::AnyDrafter;
use crate::model::Target;
use crate::spec::block_size::{choose_block_size, draft_curve, held_out_acceptance, measure_draft_ms, measure_verify_curve, BlockChoice, DEFAULT_ACCEPTANCE};
use crate::spec::SpecError;

/// Times the target's verify curve up to the drafter's trained block size and a draft at the
/// smallest and the largest block (the drafter's trained size, and 2 for DFlash, whose block can
/// be lowered),
/// reads the drafter's held-out acceptance from its run folder (`dir`, or the folder above),
/// and returns the drafter at the block size that maximises modelled tokens per second.
pub fn choose_for(target: &Target, drafter: AnyDrafter, dir: &Path) -> Result<(AnyDrafter, BlockChoice), SpecError> {
    let max_b = drafter.block_size();
    let t0 = std::time::Instant::now();
    let verify_ms = measure_verify_curve(target, max_b, drafter.target_layer_ids(), 5)?;
    crate::util::measure::release_free_heap();
    let at_max = measure_draft_ms(target, &mut *drafter.proposer_on(target.backend()))?;
    crate::util::measure::release_free_heap();
    let at_two = match max_b > 2 {
        true => match drafter.clone().at_block_size(2) {
            Ok(small) => measure_draft_ms(target, &mut *small.proposer_on(target.backend()))?,
            Err(_) => at_max, // Domino keeps its trained block
        },
        false => at_max,
    };
    crate::util::measure::release_free_heap();
    let draft_ms_by_block = draft_curve(at_two, at_max, max_b);
    let (acceptance, acceptance_source) = match held_out_acceptance(dir) {
        Some(found) => found,
        None => (vec![DEFAULT_ACCEPTANCE; max_b - 1], format!("{DEFAULT_ACCEPTANCE} per position (default: no held-out metrics next to the drafter)")),
    };
    let (block_size, expected_tokens, expected_tokens_per_s) = choose_block_size(&verify_ms, &draft_ms_by_block, &acceptance, max_b)?;
    let choice = BlockChoice {
        block_size,
        expected_tokens,
        expected_tokens_per_s,
        ar_tokens_per_s: 1e3 / verify_ms[0],
        verify_ms,
        draft_ms: draft_ms_by_block[block_size - 1],
        draft_ms_by_block,
        acceptance,
        acceptance_source,
        calibration_ms: t0.elapsed().as_secs_f64() * 1e3,
    };
    let drafter = drafter.at_block_size(block_size).map_err(SpecError::proposer)?;
    Ok((drafter, choice))
}
