//! Batched decoding: several [`Generation`]s advance together, and each cycle's verify forwards
//! of all of them run as ONE [`Target::forward_batch`].
//!
//! Decode on CPU is memory-bound (a forward reads every weight once whatever its row count), so
//! verifying the blocks of B generations in one forward costs little more than one
//! generation's cycle. Nothing else is shared: each generation keeps its own KV cache,
//! proposer, acceptance, sampling (its own position-keyed RNG), metrics and stop conditions,
//! and leaves the batch when it finishes.
//!
//! There is one decode loop: a cycle is [`Generation`]'s three phases (draft the block → verify
//! forward → consume the verify output), and [`Generation::step`] is [`step_all`] on a batch of
//! one. With batch-invariant weights (`q8`, `native`; see [`Target::forward_batch`]) every
//! generation's logits are bit-identical to its lone run, so at T = 0 and at T > 0 (same
//! seeds) every output is token for token what the generation gives alone.
//!
//! Timings: a batched generation's `verify_ms` and `decode_ms` include the shared forward and
//! the other members' work in the same cycle (wall time of the cycle as this request saw it).
//!
//! ```text
//! step_all(G):                                   // G: generations, one target
//!     for g in G: block_g = g.draft_block()      // [last, d1..dk] at start_g..; errors stay g's
//!     outs = target.forward_batch([(block_g, cache_g, taps_g, All) for g with a block])
//!     for g: cycle_g = g.finish_cycle(block_g, outs_g)
//! ```

use std::time::Instant;

use super::driver::{Cycle, GenerateConfig, GenerateOutput, Generation};
use super::proposer::Proposer;
use super::SpecError;
use crate::model::Target;

/// Runs one cycle of every generation in `gens`, their verify forwards in one batched forward.
///
/// Returns one result per generation, in order: a generation whose own phase fails (finished
/// already, a bad draft, its proposer's error, its verdict) gets its error and the others go
/// on. The outer error is one that concerns the whole batch (the shared forward failed, or
/// the generations use different targets); the forward checks every item before touching any
/// cache, so each cache still holds the positions it held before the call.
pub fn step_all(gens: &mut [&mut Generation<'_>]) -> Result<Vec<Result<Cycle, SpecError>>, SpecError> {
    // The drafts and the verify on one pool worker (util::pool).
    crate::util::pool::on_pool(|| step_all_here(gens))
}

fn step_all_here(gens: &mut [&mut Generation<'_>]) -> Result<Vec<Result<Cycle, SpecError>>, SpecError> {
    let Some(target) = gens.first().map(|g| g.target()) else {
        return Ok(Vec::new());
    };
    if gens.iter().any(|g| !std::ptr::eq(g.target(), target)) {
        return Err(SpecError::MixedTargets);
    }
    // 1. draft every block.
    let mut results: Vec<Option<Result<Cycle, SpecError>>> = (0..gens.len()).map(|_| None).collect();
    let mut pending = Vec::with_capacity(gens.len());
    for (g, slot) in gens.iter_mut().zip(results.iter_mut()) {
        match g.draft_block() {
            Ok(p) => pending.push(Some(p)),
            Err(e) => {
                *slot = Some(Err(e));
                pending.push(None);
            }
        }
    }
    // 2. verify every block in one forward; `who[j]`: the generation of item j.
    let t1 = Instant::now();
    let mut who = Vec::with_capacity(gens.len());
    let outs = {
        let mut items = Vec::with_capacity(gens.len());
        for (i, (g, p)) in gens.iter_mut().zip(&pending).enumerate() {
            if let Some(p) = p {
                items.push(g.verify_item(p));
                who.push(i);
            }
        }
        if items.is_empty() {
            Vec::new()
        } else {
            target.forward_batch(&mut items)?
        }
    };
    // 3. consume each generation's output.
    for (i, out) in who.into_iter().zip(outs) {
        if let Some(p) = pending[i].take() {
            results[i] = Some(gens[i].finish_cycle(p, out, t1));
        }
    }
    Ok(results.into_iter().map(|r| r.unwrap_or(Err(SpecError::Finished))).collect())
}

/// One request of [`generate_batch`]: its proposer (None: plain AR), prompt and settings.
pub struct BatchRequest<'a> {
    pub proposer: Option<&'a mut dyn Proposer>,
    pub prompt_ids: &'a [u32],
    pub cfg: GenerateConfig,
}

/// Generates every request to the end, up to `batch` at a time in lock-step cycles (a finished
/// generation leaves and the next waiting request takes its place). Returns one result per
/// request, in order; each equals what [`super::generate`] gives for that request alone (see
/// the module doc for when that is bit-for-bit).
pub fn generate_batch<'a>(target: &'a Target, requests: Vec<BatchRequest<'a>>, batch: usize) -> Result<Vec<Result<GenerateOutput, SpecError>>, SpecError> {
    let n = requests.len();
    let mut results: Vec<Option<Result<GenerateOutput, SpecError>>> = (0..n).map(|_| None).collect();
    let mut waiting = requests.into_iter().enumerate();
    // (request index, its generation)
    let mut active: Vec<(usize, Generation<'a>)> = Vec::new();
    loop {
        while active.len() < batch.max(1) {
            let Some((i, r)) = waiting.next() else { break };
            match Generation::start(target, r.proposer, r.prompt_ids, &r.cfg) {
                Ok(g) => active.push((i, g)),
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        if active.is_empty() {
            break;
        }
        let cycles = {
            let mut gens: Vec<&mut Generation<'a>> = active.iter_mut().map(|(_, g)| g).collect();
            step_all(&mut gens)?
        };
        // Finished or failed generations leave the batch; the rest go on.
        let mut still = Vec::with_capacity(active.len());
        for ((i, g), cycle) in active.into_iter().zip(cycles) {
            match cycle {
                Err(e) => results[i] = Some(Err(e)),
                Ok(_) if g.is_finished() => results[i] = Some(Ok(g.finish())),
                Ok(_) => still.push((i, g)),
            }
        }
        active = still;
    }
    Ok(results.into_iter().map(|r| r.unwrap_or(Err(SpecError::Finished))).collect())
}
