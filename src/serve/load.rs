//! Loading what the server serves: the target with its tokenizer, and optionally a drafter
//! checked against the target (the same load-time validation as `specauf generate`).
//!
//! The server keeps one drafter *template* and gives every request a fresh proposer built from
//! it: a proposer holds per-request state (its context cache), the weights are shared (a clone
//! of a drafter shares its tensors).

use std::path::{Path, PathBuf};

use crate::drafter::dflash::DFlashDrafter;
use crate::drafter::domino::{is_domino_checkpoint, DominoDrafter, DominoProposer};
use crate::drafter::proposer::DFlashProposer;
use crate::drafter::DrafterError;
use crate::model::{load_model, LoadError, LoadedModel, WeightsMode};
use crate::spec::Proposer;

#[derive(Debug, thiserror::Error)]
pub enum ServeLoadError {
    #[error("loading model {model}: {source}")]
    Model { model: String, source: LoadError },
    #[error("loading drafter {path}: {source}")]
    Drafter { path: PathBuf, source: DrafterError },
    #[error("--block-size {requested}: {what}")]
    BlockSize { requested: usize, what: String },
}

/// A loaded drafter, from which each request gets its own proposer.
#[derive(Clone)]
pub enum DrafterTemplate {
    DFlash(DFlashDrafter),
    Domino(DominoDrafter),
}

impl DrafterTemplate {
    /// A proposer with fresh per-request state, sharing the template's weights.
    pub fn proposer(&self) -> Box<dyn Proposer> {
        match self {
            DrafterTemplate::DFlash(d) => Box::new(DFlashProposer::new(d.clone())),
            DrafterTemplate::Domino(d) => Box::new(DominoProposer::new(d.clone())),
        }
    }

    pub fn block_size(&self) -> usize {
        match self {
            DrafterTemplate::DFlash(d) => d.block_size(),
            DrafterTemplate::Domino(d) => d.block_size(),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            DrafterTemplate::DFlash(_) => "dflash",
            DrafterTemplate::Domino(_) => "domino",
        }
    }
}

/// What `specauf serve` serves.
pub struct Served {
    pub model: LoadedModel,
    pub drafter: Option<DrafterTemplate>,
}

/// Loads `model` (`smollm2` or a path) and, with `drafter`, a DFlash or Domino drafter checked
/// against it. `block_size` lowers a DFlash drafter's block (the weights do not depend on it;
/// a smaller block verifies more cheaply).
pub fn load(model: &str, weights: WeightsMode, drafter: Option<&Path>, block_size: Option<usize>) -> Result<Served, ServeLoadError> {
    let m = load_model(model, weights).map_err(|source| ServeLoadError::Model { model: model.to_string(), source })?;
    let drafter = match drafter {
        None => {
            if let Some(b) = block_size {
                return Err(ServeLoadError::BlockSize { requested: b, what: "applies to a drafter; give --drafter DIR".into() });
            }
            None
        }
        Some(dir) => Some(load_drafter(dir, &m, block_size)?),
    };
    Ok(Served { model: m, drafter })
}

fn load_drafter(dir: &Path, m: &LoadedModel, block_size: Option<usize>) -> Result<DrafterTemplate, ServeLoadError> {
    let err = |source| ServeLoadError::Drafter { path: dir.to_path_buf(), source };
    let tc = m.target.config();
    if is_domino_checkpoint(dir).map_err(err)? {
        if let Some(b) = block_size {
            return Err(ServeLoadError::BlockSize { requested: b, what: "is implemented for DFlash drafters only; this is a Domino drafter".into() });
        }
        return Ok(DrafterTemplate::Domino(DominoDrafter::load(dir, tc).map_err(err)?));
    }
    let d = DFlashDrafter::load(dir, tc).map_err(err)?;
    let trained = d.block_size();
    match block_size {
        None => Ok(DrafterTemplate::DFlash(d)),
        Some(b) if b == trained => Ok(DrafterTemplate::DFlash(d)),
        Some(b) if b < 2 => Err(ServeLoadError::BlockSize {
            requested: b,
            what: "must be at least 2: a block is [last, MASK × (B-1)] and drafts B-1 tokens".into(),
        }),
        Some(b) if b > trained => Err(ServeLoadError::BlockSize {
            requested: b,
            what: format!("exceeds the drafter's trained block size {trained}; it can only be lowered"),
        }),
        Some(b) => Ok(DrafterTemplate::DFlash(dflash_at_block_size(&d, b).map_err(err)?)),
    }
}

/// The same weights with another `block_size` (as `specauf eval --block-size`).
fn dflash_at_block_size(d: &DFlashDrafter, block_size: usize) -> Result<DFlashDrafter, DrafterError> {
    let mut config = d.config().clone();
    config.block_size = block_size;
    let out = DFlashDrafter::init_random_from_config(config, 0)?;
    for ((name, dst), (src_name, src)) in out.named_vars().into_iter().zip(d.named_vars()) {
        if name != src_name {
            return Err(DrafterError::InvalidConfig {
                path: "(block-size override)".into(),
                what: format!("drafter tensors out of order ({name} vs {src_name})"),
            });
        }
        dst.set(src.as_tensor())?;
    }
    Ok(out)
}
