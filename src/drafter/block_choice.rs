//! The block size a loaded drafter runs at, chosen from measurement on this machine
//! ([`crate::spec::block_size`]) unless the user fixes it.

use std::path::Path;

use super::AnyDrafter;
use crate::model::Target;
use crate::spec::block_size::{choose_block_and_cut, choose_block_size, draft_curve, held_out_acceptance, held_out_cuts, measure_draft_ms, measure_verify_curve, BlockChoice, CURVE_REPS, DEFAULT_ACCEPTANCE};
use crate::spec::SpecError;

/// Times the target's verify curve up to the drafter's trained block size and a draft at the
/// smallest and the largest block (the drafter's trained size, and 2 for DFlash, whose block can
/// be lowered),
/// reads the drafter's held-out acceptance from its run folder (`dir`, or the folder above),
/// and returns the drafter at the block size that maximises modelled tokens per second.
///
/// Where the run folder has the held-out cut statistics ([`crate::spec::block_size::CutStat`]),
/// a DFlash drafter's confidence threshold (`--draft-p-min`) is chosen with B: the pair whose
/// measured tokens a cycle over its mean verify and draft time is highest. `p_min` fixes the
/// threshold instead; Domino's drafts are never cut.
pub fn choose_for(target: &Target, mut drafter: AnyDrafter, dir: &Path, p_min: Option<f32>) -> Result<(AnyDrafter, BlockChoice), SpecError> {
    let max_b = drafter.block_size();
    let t0 = std::time::Instant::now();
    let verify_ms = measure_verify_curve(target, max_b, drafter.target_layer_ids(), CURVE_REPS)?;
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
    let draft_ms_by_block = draft_curve(at_two.draft_ms, at_max.draft_ms, max_b);
    // The rest of a cycle (verdict, commits) is a difference of two medians timed apart, so a
    // load spike during one generation inflates it (0 to 4.4 ms over twelve calibrations in one
    // process, examples/calib_spread): the smaller of the two estimates, the same at every B,
    // so that it moves the modelled speed but cannot tilt the choice of B.
    let rest_ms = at_two.rest_ms(verify_ms[1.min(max_b - 1)]).min(at_max.rest_ms(verify_ms[max_b - 1]));
    // what a cycle costs beside its verify forward
    let outside_verify: Vec<f64> = draft_ms_by_block.iter().map(|d| d + rest_ms).collect();
    let (acceptance, acceptance_source) = match held_out_acceptance(dir) {
        Some(found) => found,
        None => (vec![DEFAULT_ACCEPTANCE; max_b - 1], format!("{DEFAULT_ACCEPTANCE} per position (default: no held-out metrics next to the drafter)")),
    };
    let cuttable = matches!(drafter, AnyDrafter::DFlash(_));
    let fixed = if cuttable { p_min } else { Some(0.0) };
    let from_cuts = held_out_cuts(dir).and_then(|cuts| choose_block_and_cut(&verify_ms, &outside_verify, &cuts, max_b, fixed));
    let (block_size, p_min, expected_tokens, expected_tokens_per_s, acceptance_source) = match from_cuts {
        Some((b, p, e, rate)) => (b, p, e, rate, format!("{acceptance_source}; tokens a cycle and rows verified measured there for each block and threshold")),
        None => {
            let (b, e, rate) = choose_block_size(&verify_ms, &outside_verify, &acceptance, max_b)?;
            (b, fixed.unwrap_or(0.0), e, rate, acceptance_source)
        }
    };
    drafter.set_draft_p_min(p_min);
    let choice = BlockChoice {
        block_size,
        expected_tokens,
        expected_tokens_per_s,
        ar_tokens_per_s: 1e3 / verify_ms[0],
        verify_ms,
        draft_ms: draft_ms_by_block[block_size - 1],
        draft_ms_by_block,
        rest_ms,
        acceptance,
        acceptance_source,
        calibration_ms: t0.elapsed().as_secs_f64() * 1e3,
        p_min,
    };
    let drafter = drafter.at_block_size(block_size).map_err(SpecError::proposer)?;
    Ok((drafter, choice))
}
