//! Masked block drafters. They own no embedding and no LM head: block inputs are the target's
//! frozen token embeddings and draft logits come from the target's frozen `lm_head`
//! (DESIGN §2 "Shared frozen weights"). Only the drafter's own layers are trainable.
//!
//! - [`AnyDrafter`]: the one place that tells DFlash from Domino: load a checkpoint as its kind,
//!   build a fresh one, lower its block size, put it behind the decode loop's `Proposer`.
//! - [`blocks`]: the training block layout: anchors, block inputs, labels, validity.
//! - [`dflash`]: the DFlash drafter (config, model, training and inference forwards, KV cache).
//! - [`domino`]: the Domino drafter (the DFlash backbone plus a GRU logit correction), its
//!   checkpoint format and proposer.
//! - [`checkpoint`]: the z-lab / SpecForge checkpoint format (config.json + model.safetensors),
//!   random initialisation, and validation of the drafter/target pairing.
//! - [`proposer`]: DFlash behind the decode loop's `Proposer` trait.
//! - [`vocab`]: the draft vocabulary: drafts scored by a frequent subset of the target's head.

pub mod any;
pub mod block_choice;
pub mod blocks;
pub mod checkpoint;
pub mod dflash;
pub mod dflash_infer;
pub mod domino;
pub mod proposer;
pub mod vocab;

pub use any::{default_mask_token, AnyDrafter, DrafterInit, DrafterKind, RunSettings};
pub use dflash::{
    build_target_layer_ids, context_visible, DFlashCache, DFlashConfig, DFlashDrafter, DFlashInitConfig,
};
pub use domino::{DominoConfig, DominoDrafter, DominoInitConfig, DominoProposer};
pub use dflash_infer::{DFlashInfer, Precision as DrafterPrecision};
pub use proposer::DFlashProposer;
pub use vocab::{DraftHead, DraftVocab, DEFAULT_DRAFT_VOCAB, DRAFT_VOCAB_FILE};

/// Depth of a new drafter unless a config says otherwise: 2 layers, the shape that pays on a
/// 2-core CPU for the embedded default target (the paper's is 5, for Qwen3-8B on GPUs). The one
/// source of this default: the training config, `init-drafter` and the quickstart read it.
pub const DEFAULT_LAYERS: usize = 2;
/// Block size B of a new drafter unless a config says otherwise (the paper's is 16): on 2 CPU
/// cores a 16-token verify costs too much for the τ a small drafter reaches.
pub const DEFAULT_BLOCK_SIZE: usize = 8;

use crate::model::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum DrafterError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: not valid JSON for a drafter config: {what}")]
    Json { path: String, what: String },
    #[error(
        "{path}: unknown config key `{key}`; it may change the model (a DFlash2, tree or other \
         variant), so it is refused rather than ignored. Remove it, or if it is harmless HF \
         bookkeeping add it to HF_BOOKKEEPING_KEYS in src/drafter/dflash.rs"
    )]
    UnknownConfigKey { path: String, key: String },
    #[error("{path}: invalid drafter config: {what}")]
    InvalidConfig { path: String, what: String },
    #[error("{path}: unsupported drafter: {what}")]
    Unsupported { path: String, what: String },
    #[error("{path}: tensor {name} is missing; a DFlash checkpoint needs every tensor of DESIGN §2")]
    MissingTensor { path: String, name: String },
    #[error("{path}: unexpected tensor {name}; this is not a plain DFlash drafter checkpoint")]
    UnexpectedTensor { path: String, name: String },
    #[error("{path}: tensor {name} has shape {got:?}, expected {expected:?} from config.json")]
    ShapeMismatch { path: String, name: String, expected: Vec<usize>, got: Vec<usize> },
    #[error("{path}: tensor {name} has dtype {dtype}; supported are f32, bf16 and f16")]
    UnsupportedDtype { path: String, name: String, dtype: String },
    #[error(
        "the drafter's hidden size is {drafter} but the target's is {target}: the drafter shares the \
         target's embeddings and LM head, so it must be trained for this target"
    )]
    HiddenSizeMismatch { drafter: usize, target: usize },
    #[error("the drafter's vocab_size is {drafter} but the target's is {target}; use a drafter trained for this target")]
    VocabMismatch { drafter: usize, target: usize },
    #[error(
        "target_layer_ids contains layer {layer}, but the target has {target_layers} layers \
         (0..{target_layers}); use a drafter trained for this target or fix target_layer_ids"
    )]
    TargetLayerOutOfRange { layer: usize, target_layers: usize },
    #[error("the drafter was trained for a target with {drafter} layers (num_target_layers) but this target has {target}")]
    TargetDepthMismatch { drafter: usize, target: usize },
    #[error(
        "mask_token_id {mask_token_id} is outside the target vocabulary of {vocab}; pick an unused or \
         reserved id of the target's vocabulary (SmolLM2: 16, Qwen3: 151669)"
    )]
    MaskTokenOutOfRange { mask_token_id: u32, vocab: usize },
    #[error("{what} has shape {got:?}, expected {expected}")]
    InputShape { what: &'static str, got: Vec<usize>, expected: String },
    #[error("anchor {anchor} of block {block} is outside the sequence of {len} positions")]
    AnchorOutOfRange { anchor: usize, block: usize, len: usize },
    #[error("token id {token} is outside the target vocabulary of {vocab}")]
    TokenOutOfRange { token: u32, vocab: usize },
    #[error(
        "the drafter cache holds context positions 0..{cached} but the block starts at {start}; \
         the context must cover exactly the positions before the block (DESIGN §2 reference loop)"
    )]
    ContextGap { cached: usize, start: usize },
    #[error("position {needed} exceeds the drafter's max_position_embeddings {max}")]
    ContextOverflow { needed: usize, max: usize },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl DrafterError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        DrafterError::Io { path: path.display().to_string(), source }
    }
}

/// A `--draft-p-min` value as given: a probability in [0, 1), or an error that says so.
pub fn check_draft_p_min(p: f32) -> Result<f32, DrafterError> {
    if (0.0..1.0).contains(&p) {
        Ok(p)
    } else {
        Err(DrafterError::InvalidConfig {
            path: "--draft-p-min".into(),
            what: format!("{p} is not a probability below 1; drafts are cut before their first position below it (0: never)"),
        })
    }
}
