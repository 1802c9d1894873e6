//! The trainer's view of a drafter. DFlash and Domino share everything else (objectives, the
//! chunked head, the optimiser, checkpoints): a drafter only says how its blocks are laid out
//! and turns one sequence's blocks into the rows the head scores.

use std::path::Path;

use candle_core::{Tensor, Var};

use super::trainer::TrainError;
use crate::drafter::blocks::Blocks;
use crate::drafter::dflash::CheckpointedForward;
use crate::drafter::{AnyDrafter, DFlashDrafter, DFlashInitConfig, DominoDrafter, DrafterInit, DrafterKind};
use crate::model::Target;
use crate::nn::Precision;
use crate::train::config::TrainConfig;
use crate::train::objective::BlockLayout;

/// What a drafter's training forward hands to the head.
pub struct TrainRows {
    /// (rows, H) final hidden of the predicted positions, in the autograd graph.
    pub hidden: Tensor,
    /// Domino's correction branch: its last bias-free Linear's input (rows, E), in the graph,
    /// and that Linear's weight (V, E) (the Var's tensor). None for DFlash.
    pub delta: Option<(Tensor, Tensor)>,
}

/// A drafter the trainer can train.
pub trait TrainableDrafter: Send + Sync {
    fn layout(&self) -> BlockLayout;
    fn block_size(&self) -> usize;
    fn mask_token_id(&self) -> u32;
    fn target_layer_ids(&self) -> Vec<usize>;
    fn named_vars(&self) -> Vec<(String, Var)>;
    /// The precision of the drafter layers' linears in its training forwards.
    fn set_layer_precision(&mut self, precision: Precision);
    fn train_rows(&self, target: &Target, features: &Tensor, blocks: &Blocks) -> Result<TrainRows, TrainError>;
    fn save(&self, dir: &Path) -> Result<(), TrainError>;
    /// Activation checkpointing: the rows' values (no graph) and a backward that recomputes the
    /// drafter one layer at a time and returns (variable, gradient) pairs; None where the drafter
    /// does not support it.
    fn train_rows_checkpointed<'a>(&'a self, _target: &Target, _features: &Tensor, _blocks: &Blocks) -> Result<Option<CheckpointedRows<'a>>, TrainError> {
        Ok(None)
    }
    /// Domino: predicted indices below this use the base logits only (pure_draft_prefix_len).
    fn base_only_prefix(&self) -> usize {
        0
    }
}

/// DFlash: positions 1..B-1 of each block are rows; no correction branch.
impl TrainableDrafter for DFlashDrafter {
    fn layout(&self) -> BlockLayout {
        BlockLayout::dflash(self.block_size())
    }
    fn block_size(&self) -> usize {
        DFlashDrafter::block_size(self)
    }
    fn mask_token_id(&self) -> u32 {
        DFlashDrafter::mask_token_id(self)
    }
    fn target_layer_ids(&self) -> Vec<usize> {
        DFlashDrafter::target_layer_ids(self).to_vec()
    }
    fn named_vars(&self) -> Vec<(String, Var)> {
        DFlashDrafter::named_vars(self)
    }
    fn set_layer_precision(&mut self, precision: Precision) {
        DFlashDrafter::set_layer_precision(self, precision)
    }
    fn train_rows(&self, target: &Target, features: &Tensor, blocks: &Blocks) -> Result<TrainRows, TrainError> {
        let hidden = self.forward_train(target, features, &blocks.anchors, &blocks.block_ids)?;
        Ok(TrainRows { hidden: self.predicted_rows(&hidden)?, delta: None })
    }
    fn save(&self, dir: &Path) -> Result<(), TrainError> {
        Ok(DFlashDrafter::save(self, dir)?)
    }
    fn train_rows_checkpointed<'a>(&'a self, target: &Target, features: &Tensor, blocks: &Blocks) -> Result<Option<CheckpointedRows<'a>>, TrainError> {
        let fwd = self.forward_train_checkpointed(target, features, &blocks.anchors, &blocks.block_ids)?;
        let values = self.predicted_rows(fwd.output())?;
        Ok(Some(CheckpointedRows { values, forward: fwd, drafter: self }))
    }
}

/// The rows of a checkpointed training forward ([`TrainableDrafter::train_rows_checkpointed`]).
pub struct CheckpointedRows<'a> {
    /// (rows, H) the predicted rows' values, no graph.
    pub values: Tensor,
    forward: CheckpointedForward<'a>,
    drafter: &'a DFlashDrafter,
}

impl CheckpointedRows<'_> {
    /// (variable, dL/dvariable) for the rows' gradient `grad_rows` (rows, H).
    pub fn backward(self, grad_rows: &Tensor) -> Result<Vec<(Var, Tensor)>, TrainError> {
        let d = self.drafter;
        Ok(self.forward.backward(|out| d.predicted_rows(out), grad_rows)?)
    }
}

/// Domino: all B positions are rows, the delta branch goes to the head, and position 0
/// (pure_draft_prefix_len) is base only.
impl TrainableDrafter for DominoDrafter {
    fn layout(&self) -> BlockLayout {
        BlockLayout::domino(self.block_size())
    }
    fn block_size(&self) -> usize {
        DominoDrafter::block_size(self)
    }
    fn mask_token_id(&self) -> u32 {
        DominoDrafter::mask_token_id(self)
    }
    fn target_layer_ids(&self) -> Vec<usize> {
        DominoDrafter::target_layer_ids(self).to_vec()
    }
    fn named_vars(&self) -> Vec<(String, Var)> {
        DominoDrafter::named_vars(self)
    }
    fn set_layer_precision(&mut self, precision: Precision) {
        DominoDrafter::set_layer_precision(self, precision)
    }
    fn train_rows(&self, target: &Target, features: &Tensor, blocks: &Blocks) -> Result<TrainRows, TrainError> {
        let rows = DominoDrafter::train_rows(self, target, features, blocks)?;
        Ok(TrainRows { hidden: rows.hidden, delta: Some((rows.delta_input, rows.delta_weight)) })
    }
    fn save(&self, dir: &Path) -> Result<(), TrainError> {
        Ok(DominoDrafter::save(self, dir)?)
    }
    fn base_only_prefix(&self) -> usize {
        self.config().pure_draft_prefix_len
    }
}

/// The trainable view of a loaded or fresh drafter.
pub fn trainable(d: AnyDrafter) -> Box<dyn TrainableDrafter> {
    match d {
        AnyDrafter::DFlash(d) => Box::new(d),
        AnyDrafter::Domino(d) => Box::new(d),
    }
}

/// Domino's λ in (1-λ)·CE_final + λ·CE_base: falls linearly from 1 at the first step to 0 at
/// the last.
pub fn base_ce_weight(step: u64, steps: u64) -> f32 {
    if steps <= 1 {
        return 0.0;
    }
    1.0 - step as f32 / (steps - 1) as f32
}

/// The drafter a config asks for: loaded from `init_from` (whose kind must match
/// `drafter.kind`), or fresh for the target.
pub fn build_drafter(cfg: &TrainConfig, target: &Target) -> Result<AnyDrafter, TrainError> {
    let spec = &cfg.drafter;
    if let Some(dir) = &spec.init_from {
        let found = DrafterKind::of_checkpoint(dir)?;
        if found != spec.kind {
            return Err(TrainError::Setup(format!(
                "drafter.kind is {:?} but init_from {} holds a {found} checkpoint; set drafter.kind to match it",
                spec.kind.as_str(),
                dir.display(),
            )));
        }
        let drafter = AnyDrafter::load_for(dir, target)?;
        if spec.mask_embedding && !drafter.named_vars().iter().any(|(n, _)| n == "mask_embedding") {
            return Err(TrainError::Setup(format!(
                "drafter.mask_embedding is set but init_from {} has no mask_embedding tensor; a drafter started from a checkpoint keeps its shape: leave drafter.mask_embedding unset",
                dir.display()
            )));
        }
        return Ok(drafter);
    }
    let mask = spec.mask_token_id.unwrap_or_else(|| crate::drafter::default_mask_token(target.config()));
    let mut backbone = DFlashInitConfig::new(spec.layers, spec.block_size, mask);
    backbone.target_layer_ids = spec.target_layer_ids.clone();
    backbone.mask_embedding = spec.mask_embedding;
    let init = DrafterInit { kind: spec.kind, backbone, gru_hidden_dim: spec.gru_hidden_dim, emb_dim: spec.emb_dim };
    // Drawn in host memory (reproducible from the seed on any device), then moved to the target's.
    let drafter = AnyDrafter::init_random(target.config(), &init, cfg.seed)?.to_device(target.device())?;
    init_final_norm_from_target(&drafter.named_vars(), target, drafter.mask_token_id())?;
    init_mask_embedding_from_target(&drafter.named_vars(), target, drafter.mask_token_id())?;
    if let Some(ids) = &spec.init_layers_from_target {
        init_layers_from_target(&drafter.named_vars(), target, ids, drafter.target_layer_ids())?;
    }
    Ok(drafter)
}

/// Makes drafter layer l a copy of target layer `from[l]` (issue 11's "drafter layers initialised
/// from the target's own layers").
///
/// The copied layers see two kinds of input. The context enters each layer through
/// `hidden_norm(fc(taps))`; when the tap right below the first copied layer (`from[0] - 1`) is
/// among the drafter's taps, `fc` starts as the identity on that tap and zero elsewhere, and
/// `hidden_norm` as that layer's `input_layernorm`, so the first layer's context keys and values
/// are exactly the ones the target computes there. The block enters as token embeddings, which
/// the target's upper layers never see: that gap is what training closes. When the last copied
/// layer is the target's last, the final `norm` is the target's final norm (the copied stack
/// then ends where the LM head expects). The target has no q/k norms (Llama) → those stay 1.
pub fn init_layers_from_target(vars: &[(String, Var)], target: &Target, from: &[usize], taps: &[usize]) -> Result<(), TrainError> {
    let depth = target.config().num_hidden_layers;
    if let Some(&bad) = from.iter().find(|&&i| i >= depth) {
        return Err(TrainError::Setup(format!(
            "drafter.init_layers_from_target names target layer {bad}, but the target has {depth} layers (0..{})",
            depth - 1
        )));
    }
    let var = |name: &str| -> Result<&Var, TrainError> {
        vars.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
            .ok_or_else(|| TrainError::Setup(format!("the drafter has no tensor {name:?} to initialise from the target")))
    };
    let set = |name: &str, value: &Tensor| -> Result<(), TrainError> {
        let v = var(name)?;
        if v.dims() != value.dims() {
            return Err(TrainError::Setup(format!(
                "cannot initialise {name} {:?} from the target's {:?}: the drafter's widths must equal the target's",
                v.dims(),
                value.dims()
            )));
        }
        v.set(value)?;
        Ok(())
    };
    let mut first_input_norm = None;
    for (l, &i) in from.iter().enumerate() {
        for (suffix, tensor) in target.layer_tensors_f32(i)? {
            set(&format!("layers.{l}.{suffix}"), &tensor)?;
            if l == 0 && suffix == "input_layernorm.weight" {
                first_input_norm = Some(tensor);
            }
        }
    }
    if let Some(k) = from.first().and_then(|&first| first.checked_sub(1)).and_then(|below| taps.iter().position(|&t| t == below)) {
        let fc = var("fc.weight")?;
        let (h, fc_in) = fc.dims2()?;
        let mut w = vec![0f32; h * fc_in];
        for r in 0..h {
            w[r * fc_in + k * h + r] = 1.0;
        }
        set("fc.weight", &Tensor::from_vec(w, (h, fc_in), fc.device())?)?;
        if let Some(norm) = &first_input_norm {
            set("hidden_norm.weight", norm)?;
        }
    }
    if from.last() == Some(&(depth - 1)) {
        set("norm.weight", target.final_norm_weight())?;
    }
    Ok(())
}

/// Starts a fresh drafter's trainable MASK input (when it has one) as the target's embedding of
/// `mask_token_id`, the vector a drafter without one uses: the two start identical.
pub fn init_mask_embedding_from_target(vars: &[(String, Var)], target: &Target, mask_token_id: u32) -> Result<(), TrainError> {
    if let Some((_, var)) = vars.iter().find(|(n, _)| n == "mask_embedding") {
        var.set(&target.embed(&[mask_token_id])?.squeeze(0)?.to_dtype(var.dtype())?.to_device(var.device())?)?;
    }
    Ok(())
}

/// Scales the fresh drafter's final `norm` so that its untrained logits have unit spread.
///
/// Why: at initialisation the drafter's output at a MASK position is essentially the normalised
/// MASK embedding (the layers start near zero), and with a tied LM head (SmolLM2) that row's dot
/// product with itself dominates: the reference's all-ones init starts at a CE near 60 and spends
/// its first steps unlearning it. With weight 1/σ, σ = std of the logits of the normalised MASK
/// embedding, the untrained drafter starts near-uniform (CE ≈ ln V) on every target.
pub fn init_final_norm_from_target(vars: &[(String, Var)], target: &Target, mask_token_id: u32) -> Result<(), TrainError> {
    if let Some((_, var)) = vars.iter().find(|(n, _)| n == "norm.weight") {
        let e = target.embed(&[mask_token_id])?;
        let unit = e.broadcast_div(&e.sqr()?.mean_keepdim(1)?.sqrt()?)?;
        let logits = target.lm_head(&unit)?;
        let sigma = logits.flatten_all()?.to_vec1::<f32>()?;
        let mean = sigma.iter().sum::<f32>() / sigma.len() as f32;
        let std = (sigma.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / sigma.len() as f32).sqrt();
        if std.is_finite() && std > 0.0 {
            var.set(&(var.as_tensor().ones_like()? * (1.0 / std as f64))?)?;
        }
    }
    Ok(())
}
