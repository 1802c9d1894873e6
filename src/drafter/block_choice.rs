//! The block size a loaded drafter runs at, chosen from measurement on this machine
//! ([`crate::spec::block_size`]) unless the user fixes it.

use std::path::Path;

use super::AnyDrafter;
use crate::model::Target;
use crate::spec::block_size::{choose_block_size, held_out_acceptance, measure_draft_ms, measure_verify_curve, BlockChoice, DEFAULT_ACCEPTANCE};
use crate::spec::SpecError;

/// Times the target's verify curve up to the drafter's trained block size and one draft,
/// reads the drafter's held-out acceptance from its run folder (`dir`, or the folder above),
/// and returns the drafter at the block size that maximises modelled tokens per second.
pub fn choose_for(target: &Target, drafter: AnyDrafter, dir: &Path) -> Result<(AnyDrafter, BlockChoice), SpecError> {
    let max_b = drafter.block_size();
    let t0 = std::time::Instant::now();
    let verify_ms = measure_verify_curve(target, max_b, drafter.target_layer_ids(), 3)?;
    let draft_ms = measure_draft_ms(target, &mut *drafter.proposer_on(target.backend()))?;
    let (acceptance, acceptance_source) = match held_out_acceptance(dir) {
        Some(found) => found,
        None => (vec![DEFAULT_ACCEPTANCE; max_b - 1], format!("{DEFAULT_ACCEPTANCE} per position (default: no held-out metrics next to the drafter)")),
    };
    let (block_size, expected_tokens, expected_tokens_per_s) = choose_block_size(&verify_ms, draft_ms, &acceptance, max_b)?;
    let choice = BlockChoice {
        block_size,
        expected_tokens,
        expected_tokens_per_s,
        ar_tokens_per_s: 1e3 / verify_ms[0],
        verify_ms,
        draft_ms,
        acceptance,
        acceptance_source,
        calibration_ms: t0.elapsed().as_secs_f64() * 1e3,
    };
    let drafter = drafter.at_block_size(block_size).map_err(SpecError::proposer)?;
    Ok((drafter, choice))
}
