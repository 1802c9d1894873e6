//! [`AnyDrafter`]: a DFlash or a Domino drafter, and the one dispatch on the kind. Everything
//! that loads, builds or serves "a drafter" goes through it; only code that needs one kind's
//! internals (the trainer's per-kind forward) matches on the variants.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use candle_core::{Device, Var};
use serde::{Deserialize, Serialize};

use super::checkpoint::CONFIG_FILE;
use super::dflash::{DFlashDrafter, DFlashInitConfig};
use super::domino::{self, DominoDrafter, DominoInitConfig, DominoProposer};
use super::proposer::DFlashProposer;
use super::DrafterError;
use crate::model::{Target, TargetConfig};
use crate::nn::{Backend, KernelPath};
use crate::spec::Proposer;

/// The drafter families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DrafterKind {
    /// DFlash (z-lab): B-1 draft tokens from one forward of `[last, MASK × (B-1)]` (DESIGN §2).
    #[serde(rename = "dflash")]
    DFlash,
    /// Domino: the DFlash backbone plus a GRU correction of its logits (DESIGN §4).
    Domino,
}

impl DrafterKind {
    pub const ALL: [DrafterKind; 2] = [DrafterKind::DFlash, DrafterKind::Domino];

    pub fn as_str(self) -> &'static str {
        match self {
            DrafterKind::DFlash => "dflash",
            DrafterKind::Domino => "domino",
        }
    }

    /// The kind of the checkpoint in `dir`: Domino when its config.json names
    /// `DominoDraftModel` or `dflash_config.projector_type: "domino"`, else DFlash.
    pub fn of_checkpoint(dir: &Path) -> Result<DrafterKind, DrafterError> {
        let path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| DrafterError::io(&path, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| DrafterError::Json { path: path.display().to_string(), what: e.to_string() })?;
        let arch = v
            .get("architectures")
            .and_then(|a| a.as_array())
            .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(domino::ARCHITECTURE)));
        let projector =
            v.get("dflash_config").and_then(|d| d.get("projector_type")).and_then(|p| p.as_str()) == Some(domino::PROJECTOR_TYPE);
        Ok(if arch || projector { DrafterKind::Domino } else { DrafterKind::DFlash })
    }
}

impl fmt::Display for DrafterKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DrafterKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "dflash" => Ok(DrafterKind::DFlash),
            "domino" => Ok(DrafterKind::Domino),
            other => Err(format!("unknown drafter kind {other:?}; use \"dflash\" or \"domino\"")),
        }
    }
}

/// What to build for a target: the backbone's shape, plus Domino's branch widths (ignored for
/// DFlash).
#[derive(Debug, Clone, PartialEq)]
pub struct DrafterInit {
    pub kind: DrafterKind,
    pub backbone: DFlashInitConfig,
    /// Domino: GRU hidden size G (default: [`domino::default_dims`] of the target).
    pub gru_hidden_dim: Option<usize>,
    /// Domino: embed_proj width E (default: [`domino::default_dims`] of the target).
    pub emb_dim: Option<usize>,
}

/// A DFlash or Domino drafter.
#[derive(Debug, Clone)]
pub enum AnyDrafter {
    DFlash(DFlashDrafter),
    Domino(DominoDrafter),
}

impl AnyDrafter {
    /// Loads the checkpoint in `dir` as the kind its config names, validated against `target`.
    pub fn load(dir: &Path, target: &TargetConfig) -> Result<Self, DrafterError> {
        Ok(match DrafterKind::of_checkpoint(dir)? {
            DrafterKind::DFlash => AnyDrafter::DFlash(DFlashDrafter::load(dir, target)?),
            DrafterKind::Domino => AnyDrafter::Domino(DominoDrafter::load(dir, target)?),
        })
    }

    /// Loads the checkpoint in `dir` for `target` and puts its weights on the target's device.
    pub fn load_for(dir: &Path, target: &Target) -> Result<Self, DrafterError> {
        Self::load(dir, target.config())?.to_device(target.device())
    }

    /// This drafter with its weights on `device`: a copy in fresh `Var`s (checkpoints and random
    /// initialisation are read into host memory); itself when they are there already.
    pub fn to_device(self, device: &Device) -> Result<Self, DrafterError> {
        let here = self.named_vars().first().map(|(_, v)| v.device().location());
        if here.is_none() || here == Some(device.location()) {
            return Ok(self);
        }
        Ok(match self {
            AnyDrafter::DFlash(d) => AnyDrafter::DFlash(d.to_device(device)?),
            AnyDrafter::Domino(d) => AnyDrafter::Domino(d.to_device(device)?),
        })
    }

    /// A fresh drafter for `target`, its weights drawn from `seed`.
    pub fn init_random(target: &TargetConfig, init: &DrafterInit, seed: u64) -> Result<Self, DrafterError> {
        Ok(match init.kind {
            DrafterKind::DFlash => AnyDrafter::DFlash(DFlashDrafter::init_random(target, &init.backbone, seed)?),
            DrafterKind::Domino => {
                let mut d = DominoInitConfig::new(init.backbone.clone());
                d.gru_hidden_dim = init.gru_hidden_dim;
                d.emb_dim = init.emb_dim;
                AnyDrafter::Domino(DominoDrafter::init_random(target, &d, seed)?)
            }
        })
    }

    pub fn kind(&self) -> DrafterKind {
        match self {
            AnyDrafter::DFlash(_) => DrafterKind::DFlash,
            AnyDrafter::Domino(_) => DrafterKind::Domino,
        }
    }

    pub fn block_size(&self) -> usize {
        match self {
            AnyDrafter::DFlash(d) => d.block_size(),
            AnyDrafter::Domino(d) => d.block_size(),
        }
    }

    pub fn mask_token_id(&self) -> u32 {
        match self {
            AnyDrafter::DFlash(d) => d.mask_token_id(),
            AnyDrafter::Domino(d) => d.mask_token_id(),
        }
    }

    pub fn target_layer_ids(&self) -> &[usize] {
        match self {
            AnyDrafter::DFlash(d) => d.target_layer_ids(),
            AnyDrafter::Domino(d) => d.target_layer_ids(),
        }
    }

    /// Trainable tensors under their checkpoint names.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        match self {
            AnyDrafter::DFlash(d) => d.named_vars(),
            AnyDrafter::Domino(d) => d.named_vars(),
        }
    }

    pub fn num_layers(&self) -> usize {
        match self {
            AnyDrafter::DFlash(d) => d.config().num_hidden_layers,
            AnyDrafter::Domino(d) => d.backbone().config().num_hidden_layers,
        }
    }

    /// Drafts score the `size` most frequent ids of `vocab` plus each request's context tokens
    /// (DESIGN §7.13); `size` 0 or None `vocab`: the whole vocabulary. The ranking is saved with
    /// the checkpoint. Domino drafts through its candle forward over the whole head and keeps
    /// none.
    pub fn set_draft_vocab(&mut self, vocab: Option<std::sync::Arc<super::DraftVocab>>, size: usize) {
        if let AnyDrafter::DFlash(d) = self {
            d.set_draft_vocab(vocab, size);
        }
    }

    /// [`AnyDrafter::set_draft_vocab`] with the ranking the drafter already carries (read from
    /// its folder's draft_vocab.json): only the size changes.
    pub fn set_draft_vocab_size(&mut self, size: usize) {
        if let AnyDrafter::DFlash(d) = self {
            let v = d.draft_vocab().cloned();
            d.set_draft_vocab(v, size);
        }
    }

    /// Drafts stop before the first position whose probability under the drafter is below `p`
    /// (0: never; llama.cpp's `--draft-p-min`): fewer verify rows where the drafter is unsure.
    /// DFlash drafters; Domino drafts its whole block. A run setting, not saved.
    pub fn set_draft_p_min(&mut self, p: f32) {
        if let AnyDrafter::DFlash(d) = self {
            d.set_draft_p_min(p);
        }
    }

    /// Applies the run settings: the draft vocabulary's size, the draft cut (None: 0 here; the
    /// block-size choice may choose one) and the inference precision. A threshold that is not a
    /// probability below 1 is refused.
    pub fn apply(&mut self, s: &RunSettings) -> Result<(), DrafterError> {
        let p = s.draft_p_min.map(super::check_draft_p_min).transpose()?;
        self.set_draft_vocab_size(s.draft_vocab);
        self.set_draft_p_min(p.unwrap_or(0.0));
        if let AnyDrafter::DFlash(d) = self {
            d.set_inference_precision(s.precision);
        }
        Ok(())
    }

    /// The ids drafts score, when a draft vocabulary is in use.
    pub fn draft_ids(&self) -> Option<&std::sync::Arc<[u32]>> {
        match self {
            AnyDrafter::DFlash(d) => d.draft_ids(),
            AnyDrafter::Domino(_) => None,
        }
    }

    /// Writes the checkpoint (config.json + model.safetensors) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), DrafterError> {
        match self {
            AnyDrafter::DFlash(d) => d.save(dir),
            AnyDrafter::Domino(d) => d.save(dir),
        }
    }

    /// The same weights run on blocks of `block_size` tokens (the weights do not depend on B):
    /// a DFlash drafter drafts `block_size - 1` tokens from `[last, MASK × (block_size - 1)]`.
    /// `block_size` may only lower the trained size; Domino's correction branch is trained for
    /// its block, so it keeps it.
    pub fn at_block_size(self, block_size: usize) -> Result<Self, DrafterError> {
        let trained = self.block_size();
        if block_size == trained {
            return Ok(self);
        }
        let what = |w: String| DrafterError::InvalidConfig { path: "--block-size".into(), what: w };
        if block_size < 2 {
            return Err(what(format!("{block_size} is too small: a block is [last, MASK × (B-1)] and drafts B-1 tokens")));
        }
        if block_size > trained {
            return Err(what(format!("{block_size} exceeds the drafter's trained block size {trained}; it can only be lowered")));
        }
        match self {
            AnyDrafter::DFlash(d) => Ok(AnyDrafter::DFlash(d.into_block_size(block_size))),
            AnyDrafter::Domino(_) => Err(what("a block size other than the trained one is implemented for DFlash drafters only; this is a Domino drafter".into())),
        }
    }

    /// A proposer with fresh per-request state sharing this drafter's weights (a clone of a
    /// drafter shares its tensors): a server gives each request its own. For the default
    /// backend (the CPU kernels); [`AnyDrafter::proposer_on`] follows a target's.
    pub fn proposer(&self) -> Box<dyn Proposer + Send> {
        self.proposer_on(&Backend::default())
    }

    /// [`AnyDrafter::proposer`] for `backend` (pass the target's, [`Target::backend`]).
    pub fn proposer_on(&self, backend: &Backend) -> Box<dyn Proposer + Send> {
        self.clone().into_proposer_on(backend)
    }

    /// The drafter behind the decode loop, for the default backend.
    pub fn into_proposer(self) -> Box<dyn Proposer + Send> {
        self.into_proposer_on(&Backend::default())
    }

    /// The drafter behind the decode loop on `backend`'s kernel path: DFlash's quantized inference
    /// path (`dflash_infer`, a CPU kernel) on the CPU path, its candle forward
    /// ([`DFlashProposer::reference`]) on the generic path. Domino always runs its candle forward.
    /// The weights must already be on the backend's device ([`AnyDrafter::to_device`]).
    pub fn into_proposer_on(self, backend: &Backend) -> Box<dyn Proposer + Send> {
        match (self, backend.path()) {
            (AnyDrafter::DFlash(d), KernelPath::Cpu) => Box::new(DFlashProposer::new(d)),
            (AnyDrafter::DFlash(d), KernelPath::Generic) => Box::new(DFlashProposer::reference(d)),
            (AnyDrafter::Domino(d), _) => Box::new(DominoProposer::new(d)),
        }
    }
}

/// The MASK token when a config does not name one: Qwen3's unused 151669 where the vocabulary
/// has it, else id 16 (SmolLM2's `<empty_output>`, which never occurs in text; DESIGN §6).
pub fn default_mask_token(target: &TargetConfig) -> u32 {
    if target.vocab_size > 151_669 {
        151_669
    } else {
        16
    }
}

/// How a loaded drafter runs, set per run and not saved with it: what `--draft-vocab`,
/// `--draft-p-min` and `--drafter-precision` say ([`AnyDrafter::apply`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunSettings {
    /// Top-ranked ids of the draft vocabulary a draft scores (0: the whole vocabulary; DESIGN
    /// §7.13).
    pub draft_vocab: usize,
    /// Drafts stop before their first position below this probability; None: chosen with the
    /// block size where that is chosen, else 0.
    pub draft_p_min: Option<f32>,
    /// How a DFlash drafter's inference path holds its projections.
    pub precision: super::DrafterPrecision,
}

impl Default for RunSettings {
    fn default() -> Self {
        RunSettings { draft_vocab: super::DEFAULT_DRAFT_VOCAB, draft_p_min: None, precision: super::DrafterPrecision::default() }
    }
}
