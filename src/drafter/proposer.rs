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

use std::sync::Arc;

use candle_core::Tensor;

use super::dflash::{DFlashCache, DFlashConfig, DFlashDrafter};
use super::dflash_infer::{DFlashInfer, Precision};
use super::vocab::DraftHead;
use super::DrafterError;
use crate::model::{KvCache, Target};
use crate::spec::{Draft, Proposer, SpecError};

/// A DFlash drafter serving one request at a time.
///
/// Two paths compute the same model: the fast one ([`DFlashInfer`]: Q4_1 or int8 projections, a
/// truncatable context cache, no per-op dispatch), which [`DFlashProposer::new`] builds and
/// `propose` uses, and the reference one (the candle forward that training differentiates),
/// kept for [`DFlashProposer::reference`] and for drafters built on the backbone (Domino), which
/// read [`DFlashProposer::cache`]. A fast proposer keeps only the fast path's weights: the
/// drafter's f32 tensors are released unless something else holds them (a clone kept by the
/// caller, as a server keeps one per model), which takes 31 MB off a `generate --drafter`
/// process with the quickstart's drafter.
#[derive(Debug, Clone)]
pub struct DFlashProposer {
    config: DFlashConfig,
    path: Path,
    /// Context rows not yet in the cache: (n, n_taps·H).
    pending: Option<Tensor>,
    /// The draft vocabulary's ids (DESIGN §7.13), and this request's head over them (built at
    /// `begin` from the target's head; None where that head has no block form).
    draft_ids: Option<Arc<[u32]>>,
    draft_head: Option<DraftHead>,
    /// Drafts stop before the first position whose probability is below this (0: never).
    p_min: f32,
}

#[derive(Debug, Clone)]
enum Path {
    Fast { infer: DFlashInfer, cache: KvCache },
    Reference { drafter: DFlashDrafter, cache: DFlashCache },
}

impl DFlashProposer {
    /// A proposer on the fast inference path, in the drafter's inference precision (Q4_1 unless
    /// set otherwise). Quantises the drafter's current weights (a
    /// snapshot: a drafter trained further needs a new proposer). Weights that cannot be
    /// quantised (a non-finite value, from a diverged run) leave it on the reference path,
    /// which drafts from them as they are; the output stays exact either way.
    pub fn new(drafter: DFlashDrafter) -> Self {
        let precision = drafter.inference_precision();
        Self::with_precision(drafter, precision)
    }

    /// [`DFlashProposer::new`] with the inference path's projections in `precision`.
    pub fn with_precision(drafter: DFlashDrafter, precision: Precision) -> Self {
        match DFlashInfer::with_precision(&drafter, precision) {
            Ok(infer) => {
                let cache = infer.new_cache();
                let draft_ids = drafter.draft_ids().cloned();
                let p_min = drafter.draft_p_min();
                Self { config: drafter.config().clone(), path: Path::Fast { infer, cache }, pending: None, draft_ids, draft_head: None, p_min }
            }
            Err(_) => Self::reference(drafter),
        }
    }

    /// Whether `propose` runs the fast inference path.
    pub fn is_fast(&self) -> bool {
        matches!(self.path, Path::Fast { .. })
    }

    /// A proposer on the reference (candle f32) path.
    pub fn reference(drafter: DFlashDrafter) -> Self {
        let cache = drafter.new_cache();
        let p_min = drafter.draft_p_min();
        Self { config: drafter.config().clone(), path: Path::Reference { drafter, cache }, pending: None, draft_ids: None, draft_head: None, p_min }
    }

    /// The drafter, on the reference path (a fast proposer no longer holds its f32 weights).
    pub fn drafter(&self) -> Option<&DFlashDrafter> {
        match &self.path {
            Path::Reference { drafter, .. } => Some(drafter),
            Path::Fast { .. } => None,
        }
    }

    /// Context positions currently cached.
    pub fn context_len(&self) -> usize {
        match &self.path {
            Path::Fast { cache, .. } => cache.len(),
            Path::Reference { cache, .. } => cache.len(),
        }
    }

    /// The reference path's context cache as of the last `propose` (positions 0..start of that
    /// call); None on the fast path, whose cache is the inference path's own.
    pub fn cache(&self) -> Option<&DFlashCache> {
        match &self.path {
            Path::Reference { cache, .. } => Some(cache),
            Path::Fast { .. } => None,
        }
    }

    /// Appends the pending context rows (the prompt's, or the last commit's) and returns the
    /// cache, which then holds positions 0..start of the next block. Drafters built on the DFlash
    /// backbone (Domino) call this in their own `propose`, on a reference proposer.
    pub fn sync_context(&mut self) -> Result<&DFlashCache, SpecError> {
        match &mut self.path {
            Path::Reference { drafter, cache } => {
                if let Some(f) = self.pending.take() {
                    drafter.extend_context(cache, &f).map_err(SpecError::proposer)?;
                }
                Ok(cache)
            }
            Path::Fast { .. } => Err(SpecError::proposer(DrafterError::Unsupported {
                path: "DFlashProposer".into(),
                what: "the reference context cache of a proposer on the fast path (build it with DFlashProposer::reference)".into(),
            })),
        }
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
        self.config.block_size
    }

    fn target_layer_ids(&self) -> &[usize] {
        &self.config.target_layer_ids
    }

    fn begin(&mut self, target: &Target, prompt_ids: &[u32], features: Option<&Tensor>) -> Result<(), SpecError> {
        self.config.check_target(target.config()).map_err(SpecError::proposer)?;
        let features = features.ok_or_else(|| missing_features("prompt features"))?;
        let rows = features.dim(0)?;
        if rows != prompt_ids.len() {
            return Err(SpecError::proposer(DrafterError::InputShape {
                what: "prompt features",
                got: features.dims().to_vec(),
                expected: format!("one row per prompt token ({})", prompt_ids.len()),
            }));
        }
        match &mut self.path {
            Path::Fast { cache, .. } => cache.clear(),
            Path::Reference { drafter, cache } => *cache = drafter.new_cache(),
        }
        // draft_ids is set on the fast path only
        self.draft_head = match &self.draft_ids {
            Some(ids) => DraftHead::new(target, ids).map_err(SpecError::proposer)?,
            None => None,
        };
        if let Some(h) = &mut self.draft_head {
            h.observe(prompt_ids);
        }
        self.pending = Some(features.clone());
        Ok(())
    }

    fn propose(&mut self, target: &Target, last_token: u32, start: usize) -> Result<Draft, SpecError> {
        let p_min = self.p_min;
        let scored = match &mut self.path {
            Path::Fast { infer, cache } => {
                if let Some(f) = self.pending.take() {
                    let rows = f.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
                    infer.extend_context(cache, &rows).map_err(SpecError::proposer)?;
                }
                infer.draft_scored_in(target, cache, last_token, start, self.draft_head.as_mut()).map_err(SpecError::proposer)?
            }
            Path::Reference { drafter, cache } => {
                if let Some(f) = self.pending.take() {
                    drafter.extend_context(cache, &f).map_err(SpecError::proposer)?;
                }
                match p_min > 0.0 {
                    true => drafter.draft_scored(target, cache, last_token, start).map_err(SpecError::proposer)?,
                    false => drafter.draft(target, cache, last_token, start).map_err(SpecError::proposer)?.into_iter().map(|t| (t, 1.0)).collect(),
                }
            }
        };
        // A chain is accepted only up to its first miss: the drafts after the first unlikely one
        // would cost verify rows for little chance of being reached.
        Ok(Draft::tokens(scored.into_iter().take_while(|&(_, p)| p >= p_min).map(|(t, _)| t).collect()))
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
        // Rows committed since the last propose (cycles that did not draft) wait here with the
        // new ones; the next propose extends the context by all of them at once.
        let waiting = self.pending.as_ref().map(|p| p.dim(0)).transpose()?.unwrap_or(0);
        if self.context_len() + waiting != start {
            return Err(SpecError::proposer(DrafterError::ContextGap { cached: self.context_len() + waiting, start }));
        }
        if let Some(h) = &mut self.draft_head {
            h.observe(tokens);
        }
        self.pending = Some(match self.pending.take() {
            Some(p) => Tensor::cat(&[&p, features], 0)?,
            None => features.clone(),
        });
        Ok(())
    }
}
