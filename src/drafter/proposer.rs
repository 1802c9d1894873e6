//! DFlash behind the decode loop's [`Proposer`] trait, with the z-lab `dflash_generate`
//! semantics (DESIGN §2 "Reference loop semantics"):
//!
//! - `begin`: the prompt's taps become the first context (positions 0..prompt_len); they are
//!   appended at the first `propose`, as the reference feeds them with its first draft call.
//! - `propose(last, start)`: append the pending context rows, run `[last, MASK × (B-1)]` at
//!   positions start..start+B-1 against the context 0..start, and return the argmax of the
//!   target's head at block positions 1..B-1. The block's K/V are not kept (the reference
//!   appends and crops back to `start`).
//! - `commit(tokens, features, start)`: the acc+1 committed positions start..start+acc, with
//!   their taps from the same verify pass, become the next pending context rows.
//!
//! Invariant: at every `propose`, after the pending rows are appended, the drafter's cache holds
//! exactly positions 0..start, the positions the target's cache holds.

use candle_core::Tensor;

use super::dflash::{DFlashCache, DFlashDrafter};
use super::DrafterError;
use crate::model::Target;
use crate::spec::{Draft, Proposer, SpecError};

/// A DFlash drafter serving one request at a time.
#[derive(Debug, Clone)]
pub struct DFlashProposer {
    drafter: DFlashDrafter,
    cache: DFlashCache,
    /// Context rows not yet in the cache: (n, n_taps·H).
    pending: Option<Tensor>,
}

impl DFlashProposer {
    pub fn new(drafter: DFlashDrafter) -> Self {
        let cache = drafter.new_cache();
        Self { drafter, cache, pending: None }
    }

    pub fn drafter(&self) -> &DFlashDrafter {
        &self.drafter
    }

    /// Context positions currently cached.
    pub fn context_len(&self) -> usize {
        self.cache.len()
    }

    /// The context cache as of the last `propose` (positions 0..start of that call).
    pub fn cache(&self) -> &DFlashCache {
        &self.cache
    }

    /// Appends the pending context rows (the prompt's, or the last commit's) and returns the
    /// cache, which then holds positions 0..start of the next block. Drafters built on the DFlash
    /// backbone (Domino) call this in their own `propose`.
    pub fn sync_context(&mut self) -> Result<&DFlashCache, SpecError> {
        if let Some(f) = self.pending.take() {
            self.drafter.extend_context(&mut self.cache, &f).map_err(SpecError::proposer)?;
        }
        Ok(&self.cache)
    }
}

fn missing_features(what: &'static str) -> SpecError {
    SpecError::proposer(DrafterError::InputShape {
        what,
        got: vec![],
        expected: "the tapped target features (the driver passes them when target_layer_ids is non-empty)".into(),
    })
}

impl Proposer for DFlashProposer {
    fn block_size(&self) -> usize {
        self.drafter.block_size()
    }

    fn target_layer_ids(&self) -> &[usize] {
        self.drafter.target_layer_ids()
    }

    fn begin(&mut self, target: &Target, prompt_ids: &[u32], features: Option<&Tensor>) -> Result<(), SpecError> {
        self.drafter.config().check_target(target.config()).map_err(SpecError::proposer)?;
        let features = features.ok_or_else(|| missing_features("prompt features"))?;
        let rows = features.dim(0)?;
        if rows != prompt_ids.len() {
            return Err(SpecError::proposer(DrafterError::InputShape {
                what: "prompt features",
                got: features.dims().to_vec(),
                expected: format!("one row per prompt token ({})", prompt_ids.len()),
            }));
        }
        self.cache = self.drafter.new_cache();
        self.pending = Some(features.clone());
        Ok(())
    }

    fn propose(&mut self, target: &Target, last_token: u32, start: usize) -> Result<Draft, SpecError> {
        self.sync_context()?;
        let tokens = self.drafter.draft(target, &self.cache, last_token, start).map_err(SpecError::proposer)?;
        Ok(Draft::tokens(tokens))
    }

    fn commit(&mut self, tokens: &[u32], features: Option<&Tensor>, start: usize) -> Result<(), SpecError> {
        let features = features.ok_or_else(|| missing_features("verify features"))?;
        if features.dim(0)? != tokens.len() {
            return Err(SpecError::proposer(DrafterError::InputShape {
                what: "verify features",
                got: features.dims().to_vec(),
                expected: format!("one row per committed block position ({})", tokens.len()),
            }));
        }
        if self.cache.len() != start {
            return Err(SpecError::proposer(DrafterError::ContextGap { cached: self.cache.len(), start }));
        }
        self.pending = Some(features.clone());
        Ok(())
    }
}
