//! Loading what the server serves: the target with its tokenizer, and optionally a drafter
//! checked against the target (the same load-time validation as `specauf generate`).
//!
//! The server keeps one drafter *template* and gives every request a fresh proposer built from
//! it: a proposer holds per-request state (its context cache), the weights are shared (a clone
//! of a drafter shares its tensors).

use std::path::{Path, PathBuf};

use crate::drafter::{AnyDrafter, DrafterError, RunSettings};
use crate::model::{load_model_on, LoadError, LoadedModel, WeightsMode};
use crate::nn::{DeviceChoice, DeviceError};

#[derive(Debug, thiserror::Error)]
pub enum ServeLoadError {
    #[error("loading model {model}: {source}")]
    Model { model: String, source: LoadError },
    #[error("loading drafter {path}: {source}")]
    Drafter { path: PathBuf, source: DrafterError },
    #[error("--block-size {requested}: {what}")]
    BlockSize { requested: usize, what: String },
    #[error("drafter {path}: choosing the block size: {source}")]
    BlockChoice { path: PathBuf, source: crate::spec::SpecError },
    #[error(transparent)]
    Device(#[from] DeviceError),
}

/// A loaded drafter, from which each request gets its own proposer ([`AnyDrafter::proposer`]:
/// fresh per-request state, shared weights).
pub type DrafterTemplate = AnyDrafter;

/// What `specauf serve` serves.
pub struct Served {
    pub model: LoadedModel,
    pub drafter: Option<DrafterTemplate>,
    /// How the drafter's block size and draft cut were chosen (None: fixed by `--block-size`,
    /// or no drafter).
    pub block_choice: Option<crate::spec::block_size::BlockChoice>,
}

/// Loads `model` (`smollm2` or a path) and, with `drafter`, a DFlash or Domino drafter checked
/// against it. `block_size` lowers a DFlash drafter's block (the weights do not depend on it;
/// a smaller block verifies more cheaply).
/// `run`: how the drafter runs (draft vocabulary, draft cut, precision). Without `block_size` the
/// block size and the cut are chosen from measurement as `generate` chooses them
/// ([`crate::drafter::block_choice::choose_for`]); with it, drafts are cut only where
/// `run.draft_p_min` says so.
pub fn load(model: &str, weights: WeightsMode, device: DeviceChoice, drafter: Option<&Path>, block_size: Option<usize>, run: &RunSettings) -> Result<Served, ServeLoadError> {
    let backend = device.backend()?;
    let m = load_model_on(model, weights, &backend).map_err(|source| ServeLoadError::Model { model: model.to_string(), source })?;
    let mut choice = None;
    let drafter = match drafter {
        None => {
            if let Some(b) = block_size {
                return Err(ServeLoadError::BlockSize { requested: b, what: "applies to a drafter; give --drafter DIR".into() });
            }
            None
        }
        Some(dir) => {
            let err = |source| ServeLoadError::Drafter { path: dir.to_path_buf(), source };
            let mut d = AnyDrafter::load_for(dir, &m.target).map_err(err)?;
            d.apply(run).map_err(err)?;
            match block_size {
                Some(b) => Some(d.at_block_size(b).map_err(err)?),
                None => {
                    let (d, c) = crate::drafter::block_choice::choose_for(&m.target, d, dir, run.draft_p_min)
                        .map_err(|source| ServeLoadError::BlockChoice { path: dir.to_path_buf(), source })?;
                    choice = Some(c);
                    Some(d)
                }
            }
        }
    };
    Ok(Served { model: m, drafter, block_choice: choice })
}
