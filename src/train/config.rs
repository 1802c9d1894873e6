//! The training configuration: a typed tree with documented defaults. Unknown keys are errors
//! at every level; `--set a.b=value` overrides are applied to the JSON tree before it is typed,
//! so they are checked the same way. The resolved config is written into the run directory
//! before the first step.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::head::{BaseSupport, HeadConfig};
use super::objective::Objective;
use crate::drafter::DrafterKind;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("--set {arg:?}: {message}")]
    BadOverride { arg: String, message: String },
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The drafter to train: either a fresh one of this shape, or `init_from` a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DrafterSpec {
    /// `dflash` or `domino`.
    #[serde(default = "default_kind")]
    pub kind: DrafterKind,
    /// Drafter decoder layers.
    #[serde(default = "default_layers")]
    pub layers: usize,
    /// Block size B (B-1 draft tokens per cycle).
    #[serde(default = "default_block_size")]
    pub block_size: usize,
    /// Target layers whose hidden states condition the drafter; default per DESIGN §2.
    #[serde(default)]
    pub target_layer_ids: Option<Vec<usize>>,
    /// The MASK token; default: the target's documented spare id (SmolLM2: 16).
    #[serde(default)]
    pub mask_token_id: Option<u32>,
    /// Start from this drafter's weights (DFlash format); the shape fields above are then taken
    /// from its config.
    #[serde(default)]
    pub init_from: Option<PathBuf>,
    /// Initialise drafter layer l as a copy of target layer `init_layers_from_target[l]` (one
    /// target layer id per drafter layer, HF indexing) instead of at random; `fc`, `hidden_norm`
    /// and the final `norm` are then set so that the copied layers start where they sit in the
    /// target (see `train::trainable::init_layers_from_target`).
    #[serde(default)]
    pub init_layers_from_target: Option<Vec<usize>>,
    /// A trainable MASK input vector instead of the target's embedding of `mask_token_id`,
    /// starting as that embedding (issue 11's lever). Our extension of the DFlash format: other
    /// engines (SGLang, vLLM, llama.cpp) cannot load such a drafter. Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mask_embedding: bool,
    /// Domino only: GRU hidden size G and embed_proj width E.
    #[serde(default)]
    pub gru_hidden_dim: Option<usize>,
    #[serde(default)]
    pub emb_dim: Option<usize>,
}

fn default_kind() -> DrafterKind {
    DrafterKind::DFlash
}
fn default_layers() -> usize {
    crate::drafter::DEFAULT_LAYERS
}
fn default_block_size() -> usize {
    crate::drafter::DEFAULT_BLOCK_SIZE
}

impl Default for DrafterSpec {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults deserialize")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OptimSpec {
    /// Peak learning rate (SpecForge DFlash recipe: 6e-4).
    #[serde(default = "super::optim::default_lr")]
    pub lr: f64,
    /// Fraction of steps of linear warmup before the cosine decay.
    #[serde(default = "super::optim::default_warmup_ratio")]
    pub warmup_ratio: f64,
    /// The decay after the warmup: cosine (the default, SpecForge's), linear or constant.
    #[serde(default, skip_serializing_if = "super::optim::ScheduleShape::is_cosine")]
    pub schedule: super::optim::ScheduleShape,
    #[serde(default)]
    pub weight_decay: f64,
    /// Global gradient-norm clip.
    #[serde(default = "super::optim::default_clip")]
    pub clip: f64,
    #[serde(default = "super::optim::default_beta1")]
    pub beta1: f64,
    #[serde(default = "super::optim::default_beta2")]
    pub beta2: f64,
    #[serde(default = "super::optim::default_eps")]
    pub eps: f64,
    /// Drafter tensors the optimizer leaves as they are: each entry freezes every tensor whose
    /// checkpoint name contains it (`"mlp."`: every layer's MLP; `"layers.0."`: the first
    /// layer). Frozen tensors keep their initial values (a random init, or the target layers
    /// they were copied from) and are saved with the rest. Default: none.
    #[serde(default)]
    pub freeze: Vec<String>,
}

impl Default for OptimSpec {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults deserialize")
    }
}

/// Distillation from the target's distribution (issue 11's lever): each row's CE target becomes
/// `(1 − weight)·onehot(label) + weight·softmax(top-k logits / temperature)`, the top-k logits
/// read from the feature cache (`prepare --features … --soft-labels K`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DistillSpec {
    /// Weight of the target's distribution in [0, 1] (0: hard labels only).
    pub weight: f32,
    /// Temperature applied to the stored logits.
    #[serde(default = "default_distill_temperature")]
    pub temperature: f32,
}

fn default_distill_temperature() -> f32 {
    1.0
}

/// Everything a training run needs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Target: `smollm2` or a path.
    #[serde(default = "default_model")]
    pub model: String,
    /// A directory written by `specauf prepare`.
    pub data: PathBuf,
    /// The run directory (checkpoints, metrics.jsonl, final/).
    pub out: PathBuf,
    #[serde(default)]
    pub drafter: DrafterSpec,
    /// The weighted-CE objective: {"type": "auf"}, {"type": "decay", "gamma": 7}, ...
    #[serde(default = "default_objective")]
    pub objective: Objective,
    #[serde(default)]
    pub optim: OptimSpec,
    #[serde(default)]
    pub head: HeadConfig,
    /// Optimizer steps.
    #[serde(default = "default_steps")]
    pub steps: u64,
    /// Sequences per micro-batch.
    #[serde(default = "default_batch")]
    pub batch_sequences: usize,
    /// Micro-batches per optimizer step.
    #[serde(default = "default_accum")]
    pub grad_accum: usize,
    /// Anchors (blocks) drawn per sequence and step (paper: 512).
    #[serde(default = "default_anchors")]
    pub num_anchors: usize,
    #[serde(default)]
    pub seed: u64,
    /// Write a resumable checkpoint every N steps (and at the end).
    #[serde(default = "default_ckpt")]
    pub checkpoint_every: u64,
    /// Evaluate on the held-out split every N steps (0 = only at the end).
    #[serde(default = "default_eval_every")]
    pub eval_every: u64,
    /// Held-out sequences used by each evaluation.
    #[serde(default = "default_eval_seqs")]
    pub eval_sequences: usize,
    /// Domino: which weights the base-branch CE uses: same-as-final (default: AUF's support
    /// from the emitted logits applies to both terms), own-argmax, or unmasked.
    #[serde(default)]
    pub base_support: BaseSupport,
    /// Keep target features of seen sequences in memory (f16), up to this many MiB.
    #[serde(default = "default_feature_mem")]
    pub feature_cache_mib: usize,
    /// Train towards the target's distribution as well as its tokens (None: hard labels only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<DistillSpec>,
    /// Activation checkpointing of the drafter layers (DFlash): keep only each layer's input in
    /// the forward and recompute the layer in the backward — the same gradients for about one
    /// more drafter forward per step, and the attention scores of one layer in memory instead of
    /// all layers' (the memory plan shows both).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub activation_checkpointing: bool,
    /// The precision of the drafter layers' linears (q/k/v/o, the MLP, `fc`) and their gradient
    /// products on the CPU: `f32` (default) or `bf16` (AVX512-BF16 CPUs only: operands rounded to
    /// bf16, sums in f32, as PyTorch's autocast; DESIGN §7.14). Attention scores, norms, the
    /// optimizer and the master weights stay f32; held-out evaluation runs the layers in f32.
    /// GPUs already compute in bf16 and ignore it.
    #[serde(default, skip_serializing_if = "crate::nn::Precision::is_f32")]
    pub layer_precision: crate::nn::Precision,
}

fn default_model() -> String {
    crate::model::DEFAULT_MODEL.into()
}
fn default_objective() -> Objective {
    Objective::auf()
}
fn default_steps() -> u64 {
    300
}
fn default_batch() -> usize {
    2
}
fn default_accum() -> usize {
    1
}
fn default_anchors() -> usize {
    32
}
fn default_ckpt() -> u64 {
    50
}
fn default_eval_every() -> u64 {
    100
}
fn default_eval_seqs() -> usize {
    32
}
fn default_feature_mem() -> usize {
    4096
}

impl TrainConfig {
    /// A config with every default, training on the prepared data in `data` into the run
    /// directory `out`. The defaults are the serde defaults above, the one source.
    pub fn new(data: &Path, out: &Path) -> Self {
        TrainConfig {
            model: default_model(),
            data: data.to_path_buf(),
            out: out.to_path_buf(),
            drafter: DrafterSpec::default(),
            objective: default_objective(),
            optim: OptimSpec::default(),
            head: HeadConfig::default(),
            steps: default_steps(),
            batch_sequences: default_batch(),
            grad_accum: default_accum(),
            num_anchors: default_anchors(),
            seed: 0,
            checkpoint_every: default_ckpt(),
            eval_every: default_eval_every(),
            eval_sequences: default_eval_seqs(),
            base_support: BaseSupport::default(),
            feature_cache_mib: default_feature_mem(),
            distill: None,
            activation_checkpointing: false,
            layer_precision: crate::nn::Precision::F32,
        }
    }

    /// Reads a JSON config file and applies `key=value` overrides (dotted keys; values parsed
    /// as JSON, falling back to a string).
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self, ConfigError> {
        let mut tree = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read { path: p.display().to_string(), source })?;
                serde_json::from_str::<serde_json::Value>(&text)
                    .map_err(|e| ConfigError::Parse { path: p.display().to_string(), message: e.to_string() })?
            }
            None => serde_json::json!({}),
        };
        for arg in overrides {
            apply_override(&mut tree, arg)?;
        }
        let where_ = path.map(|p| p.display().to_string()).unwrap_or_else(|| "--set".into());
        let cfg: TrainConfig = serde_json::from_value(tree)
            .map_err(|e| ConfigError::Parse { path: where_, message: format!("{e} (see `specauf train --help` for the keys)") })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        if self.steps == 0 {
            return bad("steps must be at least 1");
        }
        if self.batch_sequences == 0 || self.grad_accum == 0 {
            return bad("batch_sequences and grad_accum must be at least 1");
        }
        if self.num_anchors == 0 {
            return bad("num_anchors must be at least 1");
        }
        if self.drafter.block_size < 2 {
            return bad("drafter.block_size must be at least 2");
        }
        if self.drafter.layers == 0 {
            return bad("drafter.layers must be at least 1");
        }
        if let Some(ids) = &self.drafter.init_layers_from_target {
            if self.drafter.init_from.is_some() {
                return bad("drafter.init_layers_from_target and drafter.init_from both say where the weights come from; keep one");
            }
            if ids.len() != self.drafter.layers {
                return Err(ConfigError::Invalid(format!(
                    "drafter.init_layers_from_target names {} target layers but the drafter has {} (drafter.layers): give one target layer id per drafter layer",
                    ids.len(),
                    self.drafter.layers
                )));
            }
        }
        if !(self.optim.lr > 0.0) || !(0.0..1.0).contains(&self.optim.warmup_ratio) {
            return bad("optim.lr must be > 0 and optim.warmup_ratio in [0, 1)");
        }
        if self.checkpoint_every == 0 {
            return bad("checkpoint_every must be at least 1");
        }
        if let Some(d) = &self.distill {
            if !(0.0..=1.0).contains(&d.weight) || !(d.temperature > 0.0 && d.temperature.is_finite()) {
                return bad("distill.weight must lie in [0, 1] and distill.temperature be > 0");
            }
        }
        Ok(())
    }
}

fn apply_override(tree: &mut serde_json::Value, arg: &str) -> Result<(), ConfigError> {
    let (key, raw) = arg
        .split_once('=')
        .ok_or_else(|| ConfigError::BadOverride { arg: arg.into(), message: "expected key=value".into() })?;
    if key.is_empty() {
        return Err(ConfigError::BadOverride { arg: arg.into(), message: "empty key".into() });
    }
    let value = serde_json::from_str::<serde_json::Value>(raw).unwrap_or_else(|_| serde_json::Value::String(raw.to_string()));
    // `objective=auf` / `objective=decay:7` are shorthands for the tagged form.
    let value = if key == "objective" {
        match &value {
            serde_json::Value::String(s) => {
                let o: Objective = s.parse().map_err(|e| ConfigError::BadOverride { arg: arg.into(), message: format!("{e}") })?;
                serde_json::to_value(o).map_err(|e| ConfigError::BadOverride { arg: arg.into(), message: e.to_string() })?
            }
            _ => value,
        }
    } else {
        value
    };
    let mut node = tree;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let obj = node
            .as_object_mut()
            .ok_or_else(|| ConfigError::BadOverride { arg: arg.into(), message: format!("{} is not a table", parts[..i].join(".")) })?;
        if i + 1 == parts.len() {
            obj.insert(part.to_string(), value);
            return Ok(());
        }
        node = obj.entry(part.to_string()).or_insert_with(|| serde_json::json!({}));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let err = TrainConfig::load(None, &["data=/d".into(), "out=/o".into(), "stepz=3".into()]).unwrap_err();
        assert!(err.to_string().contains("stepz"), "{err}");
        let err = TrainConfig::load(None, &["data=/d".into(), "out=/o".into(), "optim.lrr=1".into()]).unwrap_err();
        assert!(err.to_string().contains("lrr"), "{err}");
    }

    #[test]
    fn layer_precision_takes_f32_or_bf16_and_names_the_choices_otherwise() {
        let base = || vec!["data=/d".to_string(), "out=/o".to_string()];
        assert_eq!(TrainConfig::load(None, &base()).unwrap().layer_precision, crate::nn::Precision::F32);
        let mut args = base();
        args.push("layer_precision=bf16".into());
        assert_eq!(TrainConfig::load(None, &args).unwrap().layer_precision, crate::nn::Precision::Bf16);
        let mut args = base();
        args.push("layer_precision=fp8".into());
        let err = TrainConfig::load(None, &args).unwrap_err().to_string();
        assert!(err.contains("fp8") && err.contains("bf16"), "{err}");
    }

    #[test]
    fn a_missing_required_key_is_named() {
        let err = TrainConfig::load(None, &["out=/o".into()]).unwrap_err();
        assert!(err.to_string().contains("data"), "{err}");
    }

    #[test]
    fn overrides_reach_nested_keys_and_objective_shorthands() {
        let cfg = TrainConfig::load(
            None,
            &["data=/d".into(), "out=/o".into(), "optim.lr=0.001".into(), "drafter.layers=3".into(), "objective=decay:7".into()],
        )
        .unwrap();
        assert_eq!(cfg.optim.lr, 0.001);
        assert_eq!(cfg.drafter.layers, 3);
        assert_eq!(cfg.objective.name(), "decay");
    }

    #[test]
    fn defaults_are_documented_values() {
        let cfg = TrainConfig::load(None, &["data=/d".into(), "out=/o".into()]).unwrap();
        assert_eq!(cfg.optim.lr, 6e-4);
        assert_eq!(cfg.optim.warmup_ratio, 0.04);
        assert_eq!(cfg.optim.clip, 1.0);
        assert_eq!(cfg.objective.name(), "auf");
    }
}
