//! The DFlash block drafter (DESIGN §2), read top to bottom: config → rotary → MLP → attention →
//! layer → model (training forward, inference forward with its context KV cache).
//!
//! # The model
//! ```text
//! context feature  c = hidden_norm(fc(concat(taps at target_layer_ids)))      (T, H)
//! block            x = target.embed([anchor, MASK × (B-1)])                  (B, H)
//!                  (MASK rows: the trainable `mask_embedding` instead, when the config has one)
//! each layer       h = input_layernorm(x)
//!                  q = rope(q_norm(q_proj(h)))                 at the block positions
//!                  k = rope(k_norm(k_proj([c ; h])))           context keys at their own positions
//!                  v = v_proj([c ; h])
//!                  x = x + o_proj(attn(q, k, v));  x = x + mlp(post_attention_layernorm(x))
//! output           norm(x)  → the target's frozen lm_head
//! ```
//! Queries come only from the block; the context enters every layer through that layer's own
//! k_proj/v_proj. Only the layers, `fc`, `hidden_norm`, `norm` (and `mask_embedding`, when the
//! config has one) are trainable; they live in a candle `VarMap` under their checkpoint names.
//!
//! # Training attention (DESIGN §2)
//! A query of block b (anchor a_b) sees context position j iff j < a_b ([`context_visible`]) and
//! every position of its own block; blocks never see each other. The block part is computed block
//! by block (a batched (B × B) product per block), so no (nb·B × nb·B) mask is ever built; the
//! context part is one product against the shared context keys plus an additive (nb, T) bias; one
//! softmax spans both parts without concatenating them. Everything runs in a kv-head-major layout
//! (n_kv, nb, g·B, ·) so that the largest tensor, the (nb·g·B × T) context scores, is never copied.
//! Memory for nb blocks, context T and n_kv heads: about 6 × n_kv·nb·g·B·T floats per layer.
//!
//! # Inference
//! [`DFlashCache`] holds the context K/V of every layer for positions 0..len. A draft call appends
//! the new context rows, runs the block at `start == len`, and keeps nothing of the block: the
//! reference appends the block's K/V and crops back to `start`, which is the same thing.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use super::vocab::DraftVocab;
use super::DrafterError;
use crate::model::{Target, TargetConfig};
use crate::nn::{ops, Precision};

// ---------------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------------

/// The architecture name published DFlash checkpoints carry in `architectures`.
pub const ARCHITECTURE: &str = "DFlashDraftModel";

/// The drafter's configuration, resolved. On disk it is a Qwen3 `config.json` plus `block_size`
/// and `dflash_config: {mask_token_id, target_layer_ids}` (see [`DFlashConfig::to_json`]).
#[derive(Debug, Clone, PartialEq)]
pub struct DFlashConfig {
    /// Must equal the target's hidden size (shared embeddings and head).
    pub hidden_size: usize,
    pub intermediate_size: usize,
    /// Drafter depth (paper: 5).
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Must equal the target's vocabulary size.
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    /// Depth of the target the drafter was built for, when known (published configs carry it).
    pub num_target_layers: Option<usize>,
    /// Tokens per block, the anchor included (paper: 16).
    pub block_size: usize,
    pub mask_token_id: u32,
    /// Target layers tapped for the context feature, in concatenation order (HF indexing: the
    /// output of layer i, `hidden_states[i+1]`).
    pub target_layer_ids: Vec<usize>,
    /// The block's MASK positions take a trainable vector (`mask_embedding`, (H)) instead of the
    /// target's embedding of `mask_token_id` (issue 11's lever; DESIGN §2). An extension of the
    /// published format: `dflash_config.mask_embedding = true`, written only when set.
    pub mask_embedding: bool,
}

/// The drafter section of OUR training config: what to build for a given target. Unknown keys are
/// errors (`deny_unknown_fields`). Every width defaults to the target's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DFlashInitConfig {
    /// Drafter depth. Default [`super::DEFAULT_LAYERS`] (the paper's is 5).
    #[serde(default = "default_layers")]
    pub num_hidden_layers: usize,
    /// Tokens per block, anchor included. Default [`super::DEFAULT_BLOCK_SIZE`] (the paper's is 16).
    #[serde(default = "default_block_size")]
    pub block_size: usize,
    /// Required: an id of the target vocabulary that never occurs in text (Qwen3 151669,
    /// SmolLM2 16 `<empty_output>`).
    pub mask_token_id: u32,
    /// Default: [`build_target_layer_ids`] over the target's depth and the drafter's depth.
    #[serde(default)]
    pub target_layer_ids: Option<Vec<usize>>,
    /// Default: the target's.
    #[serde(default)]
    pub intermediate_size: Option<usize>,
    /// Default: the target's.
    #[serde(default)]
    pub num_attention_heads: Option<usize>,
    /// Default: the target's.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Default: the target's.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// A trainable MASK input vector ([`DFlashConfig::mask_embedding`]). Default false.
    #[serde(default)]
    pub mask_embedding: bool,
}

fn default_layers() -> usize {
    super::DEFAULT_LAYERS
}
fn default_block_size() -> usize {
    super::DEFAULT_BLOCK_SIZE
}

impl DFlashInitConfig {
    pub fn new(num_hidden_layers: usize, block_size: usize, mask_token_id: u32) -> Self {
        Self {
            num_hidden_layers,
            block_size,
            mask_token_id,
            target_layer_ids: None,
            intermediate_size: None,
            num_attention_heads: None,
            num_key_value_heads: None,
            head_dim: None,
            mask_embedding: false,
        }
    }

    /// Parses the drafter section of a training config; unknown keys are refused by name.
    pub fn from_json_str(text: &str, path: &str) -> Result<Self, DrafterError> {
        serde_json::from_str(text).map_err(|e| DrafterError::Json { path: path.to_string(), what: e.to_string() })
    }
}

/// The reference default for the tapped target layers (z-lab `build_target_layer_ids`):
/// n = 1 → [L // 2]; otherwise round(1 + i·(L-4)/(n-1)) for i = 0..n-1 with Python's
/// round-half-to-even, computed exactly in integers.
pub fn build_target_layer_ids(num_target_layers: usize, num_draft_layers: usize) -> Vec<usize> {
    if num_draft_layers == 0 {
        return Vec::new();
    }
    if num_draft_layers == 1 {
        return vec![num_target_layers / 2];
    }
    let span = num_target_layers as i64 - 4;
    let den = num_draft_layers as i64 - 1;
    (0..num_draft_layers as i64)
        .map(|i| {
            // 1 + i·span/den = 1 + q + r/den, with r in [0, den) (Euclidean division).
            let num = i * span;
            let (q, r) = (num.div_euclid(den), num.rem_euclid(den));
            let base = 1 + q;
            let rounded = match (2 * r).cmp(&den) {
                std::cmp::Ordering::Less => base,
                std::cmp::Ordering::Greater => base + 1,
                std::cmp::Ordering::Equal => {
                    if base % 2 == 0 {
                        base
                    } else {
                        base + 1
                    }
                }
            };
            rounded.max(0) as usize
        })
        .collect()
}

/// Keys of a `config.json` that are read ([`DFlashConfig::from_json_str`]).
const KNOWN_KEYS: &[&str] = &[
    "architectures",
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
    "max_position_embeddings",
    "vocab_size",
    "hidden_act",
    "attention_bias",
    "num_target_layers",
    "block_size",
    "dflash_config",
    "use_sliding_window",
    "sliding_window",
    "layer_types",
    "is_causal",
];

/// HF bookkeeping keys that published configs carry and that do not change the drafter's
/// computation: accepted and ignored. Any key in neither list is refused by name.
pub const HF_BOOKKEEPING_KEYS: &[&str] = &[
    "_name_or_path",
    "attention_dropout",
    "auto_map",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "dtype",
    "torch_dtype",
    "initializer_range",
    "transformers_version",
    "use_cache",
    "max_window_layers",
    // The drafter has no head of its own; the target's is used whatever this says.
    "tie_word_embeddings",
];

const DFLASH_KEYS: &[&str] = &["mask_token_id", "target_layer_ids", "block_size", "mask_embedding"];

/// config.json as written: the Qwen3 fields plus the DFlash ones, in the published layout.
#[derive(Serialize)]
struct ConfigJsonOut<'a> {
    architectures: [&'static str; 1],
    model_type: &'static str,
    attention_bias: bool,
    attention_dropout: f64,
    block_size: usize,
    dflash_config: DFlashSectionOut<'a>,
    dtype: &'static str,
    head_dim: usize,
    hidden_act: &'static str,
    hidden_size: usize,
    initializer_range: f64,
    intermediate_size: usize,
    max_position_embeddings: usize,
    num_attention_heads: usize,
    num_hidden_layers: usize,
    num_key_value_heads: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    num_target_layers: Option<usize>,
    rms_norm_eps: f64,
    rope_theta: f64,
    tie_word_embeddings: bool,
    use_sliding_window: bool,
    vocab_size: usize,
}

#[derive(Serialize)]
struct DFlashSectionOut<'a> {
    mask_token_id: u32,
    target_layer_ids: &'a [usize],
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    mask_embedding: bool,
}

impl DFlashConfig {
    /// The config of a new drafter for `target`.
    pub fn for_target(target: &TargetConfig, init: &DFlashInitConfig) -> Result<Self, DrafterError> {
        let cfg = DFlashConfig {
            hidden_size: target.hidden_size,
            intermediate_size: init.intermediate_size.unwrap_or(target.intermediate_size),
            num_hidden_layers: init.num_hidden_layers,
            num_attention_heads: init.num_attention_heads.unwrap_or(target.num_attention_heads),
            num_key_value_heads: init.num_key_value_heads.unwrap_or(target.num_key_value_heads),
            head_dim: init.head_dim.unwrap_or(target.head_dim),
            rms_norm_eps: target.rms_norm_eps,
            rope_theta: target.rope_theta,
            vocab_size: target.vocab_size,
            max_position_embeddings: target.max_position_embeddings,
            num_target_layers: Some(target.num_hidden_layers),
            block_size: init.block_size,
            mask_token_id: init.mask_token_id,
            target_layer_ids: init
                .target_layer_ids
                .clone()
                .unwrap_or_else(|| build_target_layer_ids(target.num_hidden_layers, init.num_hidden_layers)),
            mask_embedding: init.mask_embedding,
        };
        cfg.validate("drafter config")?;
        cfg.check_target(target)?;
        Ok(cfg)
    }

    /// Input width of `fc`: n_taps · H.
    pub fn fc_in(&self) -> usize {
        self.target_layer_ids.len() * self.hidden_size
    }

    /// Checks the config on its own (shapes that the model can be built with).
    pub fn validate(&self, path: &str) -> Result<(), DrafterError> {
        let bad = |what: String| DrafterError::InvalidConfig { path: path.to_string(), what };
        if self.hidden_size == 0 || self.intermediate_size == 0 || self.num_hidden_layers == 0 || self.vocab_size == 0 {
            return Err(bad("hidden_size, intermediate_size, num_hidden_layers and vocab_size must be > 0".into()));
        }
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 {
            return Err(bad("num_attention_heads and num_key_value_heads must be > 0".into()));
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(bad(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            )));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return Err(bad(format!("head_dim {} must be even and > 0", self.head_dim)));
        }
        if self.block_size < 2 {
            return Err(bad(format!(
                "block_size {} leaves no position to draft; a block is [anchor, MASK × (B-1)] with B ≥ 2",
                self.block_size
            )));
        }
        if self.target_layer_ids.is_empty() {
            return Err(bad("dflash_config.target_layer_ids is empty; the drafter needs at least one tapped layer".into()));
        }
        if self.mask_token_id as usize >= self.vocab_size {
            return Err(DrafterError::MaskTokenOutOfRange { mask_token_id: self.mask_token_id, vocab: self.vocab_size });
        }
        Ok(())
    }

    /// Checks that this drafter fits `target`: hidden size, vocabulary, tapped layers, mask token.
    pub fn check_target(&self, target: &TargetConfig) -> Result<(), DrafterError> {
        if self.hidden_size != target.hidden_size {
            return Err(DrafterError::HiddenSizeMismatch { drafter: self.hidden_size, target: target.hidden_size });
        }
        if self.vocab_size != target.vocab_size {
            return Err(DrafterError::VocabMismatch { drafter: self.vocab_size, target: target.vocab_size });
        }
        if let Some(&layer) = self.target_layer_ids.iter().find(|&&l| l >= target.num_hidden_layers) {
            return Err(DrafterError::TargetLayerOutOfRange { layer, target_layers: target.num_hidden_layers });
        }
        if self.mask_token_id as usize >= target.vocab_size {
            return Err(DrafterError::MaskTokenOutOfRange { mask_token_id: self.mask_token_id, vocab: target.vocab_size });
        }
        if let Some(n) = self.num_target_layers {
            if n != target.num_hidden_layers {
                return Err(DrafterError::TargetDepthMismatch { drafter: n, target: target.num_hidden_layers });
            }
        }
        Ok(())
    }

    /// The config.json text: Qwen3 fields, `block_size`, `dflash_config`. Stable key order.
    pub fn to_json(&self) -> String {
        let out = ConfigJsonOut {
            architectures: [ARCHITECTURE],
            model_type: "qwen3",
            attention_bias: false,
            attention_dropout: 0.0,
            block_size: self.block_size,
            dflash_config: DFlashSectionOut {
                mask_token_id: self.mask_token_id,
                target_layer_ids: &self.target_layer_ids,
                mask_embedding: self.mask_embedding,
            },
            dtype: "float32",
            head_dim: self.head_dim,
            hidden_act: "silu",
            hidden_size: self.hidden_size,
            initializer_range: INIT_STD,
            intermediate_size: self.intermediate_size,
            max_position_embeddings: self.max_position_embeddings,
            num_attention_heads: self.num_attention_heads,
            num_hidden_layers: self.num_hidden_layers,
            num_key_value_heads: self.num_key_value_heads,
            num_target_layers: self.num_target_layers,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            tie_word_embeddings: false,
            use_sliding_window: false,
            vocab_size: self.vocab_size,
        };
        // Serialising a struct of plain fields cannot fail.
        serde_json::to_string_pretty(&out).unwrap_or_default()
    }

    /// Reads a `config.json` (ours or a published z-lab / SpecForge one).
    ///
    /// The rule for keys: every top-level key must be one we read or one of
    /// [`HF_BOOKKEEPING_KEYS`]; every key of `dflash_config` must be `mask_token_id`,
    /// `target_layer_ids`, `block_size` (newer configs put it there) or our `mask_embedding`
    /// extension. Anything else is refused by name, since an unknown key may change the model.
    /// Settings we do not implement (sliding window, RoPE scaling, biases, non-SiLU activations,
    /// causal blocks) are refused ([`refuse_unsupported`]).
    pub fn from_json_str(text: &str, path: &str) -> Result<Self, DrafterError> {
        let json = |what: String| DrafterError::Json { path: path.to_string(), what };
        let bad = |what: String| DrafterError::InvalidConfig { path: path.to_string(), what };
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| json(e.to_string()))?;
        let obj = v.as_object().ok_or_else(|| json("the top level is not an object".into()))?;
        for key in obj.keys() {
            if !KNOWN_KEYS.contains(&key.as_str()) && !HF_BOOKKEEPING_KEYS.contains(&key.as_str()) {
                return Err(DrafterError::UnknownConfigKey { path: path.to_string(), key: key.clone() });
            }
        }
        let dflash = obj
            .get("dflash_config")
            .and_then(|d| d.as_object())
            .ok_or_else(|| bad("no `dflash_config` object: this is not a DFlash drafter config".into()))?;
        for key in dflash.keys() {
            if !DFLASH_KEYS.contains(&key.as_str()) {
                return Err(DrafterError::UnknownConfigKey { path: path.to_string(), key: format!("dflash_config.{key}") });
            }
        }
        refuse_unsupported(obj, path)?;
        let usize_of = |key: &str| -> Result<Option<usize>, DrafterError> {
            match obj.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(x) => x.as_u64().map(|n| Some(n as usize)).ok_or_else(|| bad(format!("`{key}` must be a non-negative integer"))),
            }
        };
        let req = |key: &str| -> Result<usize, DrafterError> { usize_of(key)?.ok_or_else(|| bad(format!("`{key}` is missing"))) };
        let hidden_size = req("hidden_size")?;
        let num_attention_heads = req("num_attention_heads")?;
        let rope_theta = obj
            .get("rope_theta")
            .and_then(|x| x.as_f64())
            .or_else(|| obj.get("rope_parameters").and_then(|p| p.get("rope_theta")).and_then(|x| x.as_f64()))
            .unwrap_or(10_000.0);
        let top_block = usize_of("block_size")?;
        let inner_block = match dflash.get("block_size") {
            None | Some(serde_json::Value::Null) => None,
            Some(x) => Some(x.as_u64().ok_or_else(|| bad("`dflash_config.block_size` must be an integer".into()))? as usize),
        };
        let block_size = match (top_block, inner_block) {
            (Some(a), Some(b)) if a != b => {
                return Err(bad(format!("block_size {a} and dflash_config.block_size {b} disagree")));
            }
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => return Err(bad("`block_size` is missing (top level or in dflash_config)".into())),
        };
        let mask_token_id = dflash
            .get("mask_token_id")
            .and_then(|x| x.as_u64())
            .ok_or_else(|| bad("`dflash_config.mask_token_id` is missing or not an integer".into()))?;
        let mask_embedding = match dflash.get("mask_embedding") {
            None | Some(serde_json::Value::Null) => false,
            Some(x) => x.as_bool().ok_or_else(|| bad("`dflash_config.mask_embedding` must be true or false".into()))?,
        };
        let num_hidden_layers = req("num_hidden_layers")?;
        let num_target_layers = usize_of("num_target_layers")?;
        let target_layer_ids = match dflash.get("target_layer_ids") {
            Some(ids) if !ids.is_null() => ids
                .as_array()
                .and_then(|a| a.iter().map(|x| x.as_u64().map(|n| n as usize)).collect::<Option<Vec<_>>>())
                .ok_or_else(|| bad("`dflash_config.target_layer_ids` must be a list of layer indices".into()))?,
            // The reference falls back to its default over num_target_layers.
            _ => match num_target_layers {
                Some(l) => build_target_layer_ids(l, num_hidden_layers),
                None => return Err(bad("`dflash_config.target_layer_ids` is missing and so is `num_target_layers`".into())),
            },
        };
        let cfg = DFlashConfig {
            hidden_size,
            intermediate_size: req("intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: usize_of("num_key_value_heads")?.unwrap_or(num_attention_heads),
            head_dim: usize_of("head_dim")?.unwrap_or(hidden_size / num_attention_heads.max(1)),
            rms_norm_eps: obj.get("rms_norm_eps").and_then(|x| x.as_f64()).unwrap_or(1e-6),
            rope_theta,
            vocab_size: req("vocab_size")?,
            max_position_embeddings: usize_of("max_position_embeddings")?.unwrap_or(32_768),
            num_target_layers,
            block_size,
            mask_token_id: u32::try_from(mask_token_id).map_err(|_| bad(format!("mask_token_id {mask_token_id} does not fit a token id")))?,
            target_layer_ids,
            mask_embedding,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Reads `dir/config.json`.
    pub fn read(dir: &Path) -> Result<Self, DrafterError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| DrafterError::io(&path, e))?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Every trainable tensor with its checkpoint name and shape, in checkpoint order.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let (q, kv, hd) = (self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim, self.head_dim);
        let mut out = vec![("fc.weight".to_string(), vec![h, self.fc_in()]), ("hidden_norm.weight".to_string(), vec![h])];
        for l in 0..self.num_hidden_layers {
            let p = format!("layers.{l}");
            out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
            out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
            out.push((format!("{p}.self_attn.q_norm.weight"), vec![hd]));
            out.push((format!("{p}.self_attn.k_norm.weight"), vec![hd]));
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        }
        out.push(("norm.weight".to_string(), vec![h]));
        if self.mask_embedding {
            out.push(("mask_embedding".to_string(), vec![h]));
        }
        out
    }

    /// Trainable parameter count.
    pub fn num_parameters(&self) -> usize {
        self.tensor_shapes().iter().map(|(_, s)| s.iter().product::<usize>()).sum()
    }
}

/// Refuses a `config.json` that asks for what the DFlash drafter does not implement (another
/// architecture or model type, a non-SiLU activation, biases, causal blocks, a sliding window,
/// scaled RoPE), by name.
fn refuse_unsupported(obj: &serde_json::Map<String, serde_json::Value>, path: &str) -> Result<(), DrafterError> {
    let unsupported = |what: String| DrafterError::Unsupported { path: path.to_string(), what };
    if let Some(arch) = obj.get("architectures") {
        let names: Vec<&str> = arch.as_array().map(|a| a.iter().filter_map(|x| x.as_str()).collect()).unwrap_or_default();
        if !names.contains(&ARCHITECTURE) {
            return Err(unsupported(format!("architectures {names:?}; only {ARCHITECTURE} is implemented")));
        }
    }
    if let Some(mt) = obj.get("model_type").and_then(|x| x.as_str()) {
        if mt != "qwen3" {
            return Err(unsupported(format!("model_type {mt:?}; DFlash drafters are Qwen3-style (model_type \"qwen3\")")));
        }
    }
    if let Some(act) = obj.get("hidden_act").and_then(|x| x.as_str()) {
        if act != "silu" {
            return Err(unsupported(format!("hidden_act {act:?} (only silu is implemented)")));
        }
    }
    if obj.get("attention_bias").and_then(|x| x.as_bool()) == Some(true) {
        return Err(unsupported("attention_bias = true (DFlash drafters have no biases)".into()));
    }
    if obj.get("is_causal").and_then(|x| x.as_bool()) == Some(true) {
        return Err(unsupported("is_causal = true (DFlash blocks are bidirectional)".into()));
    }
    if obj.get("use_sliding_window").and_then(|x| x.as_bool()) == Some(true) {
        return Err(unsupported("use_sliding_window = true (only full attention is implemented)".into()));
    }
    let window = obj.get("sliding_window").is_some_and(|w| !w.is_null());
    if let Some(types) = obj.get("layer_types").and_then(|x| x.as_array()) {
        if window && types.iter().any(|t| t.as_str() == Some("sliding_attention")) {
            return Err(unsupported("sliding_attention layers (only full attention is implemented)".into()));
        }
    }
    for key in ["rope_scaling", "rope_parameters"] {
        if let Some(rs) = obj.get(key).filter(|x| !x.is_null()) {
            let kind = rs.get("rope_type").or_else(|| rs.get("type")).and_then(|x| x.as_str()).unwrap_or("default");
            if kind != "default" {
                return Err(unsupported(format!("{key} type {kind:?} (only plain RoPE is implemented)")));
            }
        }
    }
    Ok(())
}

/// The HF `initializer_range` used for new drafters.
pub const INIT_STD: f64 = 0.02;

// ---------------------------------------------------------------------------------------------
// Rotary embedding
// ---------------------------------------------------------------------------------------------

/// Rotate-half RoPE tables for arbitrary positions (training blocks sit at scattered positions).
/// Angles are formed in f32 as p·inv_freq, the convention of the target runtime.
#[derive(Debug, Clone)]
struct Rotary {
    inv_freq: Vec<f32>,
}

impl Rotary {
    fn new(head_dim: usize, theta: f64) -> Self {
        let inv_freq = (0..head_dim / 2).map(|i| 1.0 / (theta.powf(2.0 * i as f64 / head_dim as f64)) as f32).collect();
        Self { inv_freq }
    }

    /// (cos, sin), each (positions.len(), head_dim/2).
    fn at(&self, positions: &[usize], device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut angles = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for f in &self.inv_freq {
                angles.push(p as f32 * f);
            }
        }
        let a = Tensor::from_vec(angles, (positions.len(), half), device)?;
        Ok((a.cos()?, a.sin()?))
    }
}

// ---------------------------------------------------------------------------------------------
// Layers
// ---------------------------------------------------------------------------------------------

/// x (n, in) → (n, out) with a bias-free weight (out, in): x·wᵀ in the compute dtype of w's
/// device (bf16 on CUDA, f32 on the CPU), or in bf16 on the CPU at `Precision::Bf16` (training
/// forwards with `layer_precision = "bf16"`): `ops::linear_at`.
fn linear_at(x: &Tensor, w: &Tensor, p: Precision) -> candle_core::Result<Tensor> {
    crate::nn::ops::linear_at(x, w, p)
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Tensor,
    up_proj: Tensor,
    down_proj: Tensor,
}

impl Mlp {
    /// (n, H) → (n, H): down(silu(gate(x)) ⊙ up(x)).
    fn forward(&self, x: &Tensor, p: Precision) -> candle_core::Result<Tensor> {
        let g = ops::silu(&linear_at(x, &self.gate_proj, p)?)?;
        linear_at(&(g * linear_at(x, &self.up_proj, p)?)?, &self.down_proj, p)
    }
}

/// One layer's context K/V: (n_kv, T, hd) each, keys normed and rotated at their positions.
#[derive(Debug, Clone)]
struct ContextKv {
    k: Tensor,
    v: Tensor,
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Tensor,
    k_proj: Tensor,
    v_proj: Tensor,
    o_proj: Tensor,
    q_norm: Tensor,
    k_norm: Tensor,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f64,
}

impl Attention {
    /// Context feature (T, H) at positions given by `cos`/`sin` (T, hd/2) → this layer's K/V.
    fn context_kv(&self, c: &Tensor, cos: &Tensor, sin: &Tensor, p: Precision) -> candle_core::Result<ContextKv> {
        let t = c.dim(0)?;
        let (nkv, hd) = (self.kv_heads, self.head_dim);
        // 1. (T, H) -> (T, n_kv, hd); per-head k_norm before RoPE
        let k = ops::rms_norm(&linear_at(c, &self.k_proj, p)?.reshape((t, nkv, hd))?, &self.k_norm, self.eps)?;
        let v = linear_at(c, &self.v_proj, p)?.reshape((t, nkv, hd))?;
        // 2. (T, n_kv, hd) -> (1, n_kv, T, hd) for rope -> (n_kv, T, hd)
        let k = ops::rope(&k.transpose(0, 1)?.unsqueeze(0)?.contiguous()?, cos, sin)?.squeeze(0)?;
        let v = v.transpose(0, 1)?.contiguous()?;
        Ok(ContextKv { k, v })
    }

    /// Block attention.
    ///
    /// x (nb·B, H) normed block hidden; `cos`/`sin` (nb, B, hd/2) at the block positions;
    /// `ctx`: the context K/V (n_kv, T, hd) shared by all blocks, and the runs of blocks that
    /// each read only its first `len` positions, with their visibility bias ([`LayerContext`]). Each block also sees all of itself and
    /// nothing of the other blocks. Returns (nb·B, H).
    fn forward(
        &self,
        x: &Tensor,
        nb: usize,
        cos: &Tensor,
        sin: &Tensor,
        ctx: LayerContext<'_>,
    ) -> candle_core::Result<Tensor> {
        let (p, spans) = (ctx.precision, ctx.spans);
        let n = x.dim(0)?;
        let bsz = n / nb;
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.head_dim);
        let g = nh / nkv;
        // 1. projections: (nb·B, H) -> (nb, B, heads, hd); per-head q/k norm before RoPE
        let q = ops::rms_norm(&linear_at(x, &self.q_proj, p)?.reshape((nb, bsz, nh, hd))?, &self.q_norm, self.eps)?;
        let k = ops::rms_norm(&linear_at(x, &self.k_proj, p)?.reshape((nb, bsz, nkv, hd))?, &self.k_norm, self.eps)?;
        let v = linear_at(x, &self.v_proj, p)?.reshape((nb, bsz, nkv, hd))?;
        // 2. (nb, B, heads, hd) -> (nb, heads, B, hd), rotate at the block positions; the score
        //    scale goes on q, the smallest operand
        let q = (ops::rope(&q.transpose(1, 2)?.contiguous()?, cos, sin)? * (1.0 / (hd as f64).sqrt()))?;
        let k = ops::rope(&k.transpose(1, 2)?.contiguous()?, cos, sin)?;
        // 3. kv-major layout, so that the context products need no copies of the large tensors.
        //    Query head h uses kv head h / g: (nb, nh, B, hd) -> (n_kv, nb, g·B, hd)
        let q = q.reshape((nb, nkv, g * bsz, hd))?.transpose(0, 1)?.contiguous()?;
        let k = k.transpose(0, 1)?.contiguous()?; // (n_kv, nb, B, hd)
        let v = v.permute((2, 0, 1, 3))?.contiguous()?; // (n_kv, nb, B, hd)
        // 4. scores against the own block: (n_kv, nb, g·B, B)
        let s_self = q.matmul(&k.t()?)?;
        let ctx = match ctx.kv {
            Some(c) if c.k.dim(1)? > 0 => Some(c),
            _ => None,
        };
        let out = match ctx {
            None => ops::softmax_last_dim(&s_self)?.matmul(&v)?,
            Some(c) => {
                let whole = [CtxSpan { first: 0, blocks: nb, len: c.k.dim(1)?, bias: None }];
                let spans = if spans.is_empty() { &whole[..] } else { spans };
                // A span over all blocks and the whole context narrows nothing (candle's narrow,
                // contiguous and a one-tensor cat return the tensor itself).
                let mut outs = Vec::with_capacity(spans.len());
                for span in spans {
                    let (first, blocks) = (span.first, span.blocks);
                    let (q, s_self, v) = (q.narrow(1, first, blocks)?.contiguous()?, s_self.narrow(1, first, blocks)?, v.narrow(1, first, blocks)?.contiguous()?);
                    outs.push(span_attention(&q, &s_self, &v, c, span, (nkv, g * bsz, hd))?);
                }
                Tensor::cat(&outs, 1)?
            }
        };
        // 8. (n_kv, nb, g·B, hd) -> (nb, B, n_kv, g, hd) = (nb·B, nh·hd) -> (nb·B, H)
        let out = out.reshape((nkv, nb, g, bsz, hd))?.permute((1, 3, 0, 2, 4))?.contiguous()?.reshape((n, nh * hd))?;
        linear_at(&out, &self.o_proj, p)
    }
}

/// What a layer's forward reads besides its input: the context K/V (None: no context), the runs
/// of blocks and the context each reads ([`CtxSpan`]; empty: every block sees all of it), and
/// the precision of the linears.
#[derive(Clone, Copy)]
struct LayerContext<'a> {
    kv: Option<&'a ContextKv>,
    spans: &'a [CtxSpan],
    precision: Precision,
}

/// A run of consecutive blocks of a training forward and the context they read: blocks
/// `first..first + blocks`, whose queries score only context positions `0..len` (the largest
/// anchor among them: no block sees a position at or past its anchor), with `bias` (blocks, len)
/// hiding what each block may not see (None: all visible). Positions a bias hides get a weight of
/// exactly 0, so reading fewer of them changes no weight; it saves the scores, softmax and
/// products over the keys no block of the run can see (about a third of the attention at
/// sorted, uniformly drawn anchors in four runs).
#[derive(Debug, Clone)]
struct CtxSpan {
    first: usize,
    blocks: usize,
    len: usize,
    bias: Option<Tensor>,
}

/// Splits blocks with these anchors into at most `max_spans` runs of consecutive blocks, of
/// equal size, each with its context length and visibility bias ([`CtxSpan`]).
fn context_spans(anchors: &[usize], max_spans: usize, device: &Device) -> candle_core::Result<Vec<CtxSpan>> {
    let nb = anchors.len();
    let runs = max_spans.clamp(1, nb.max(1));
    let per = nb.div_ceil(runs);
    let mut spans = Vec::with_capacity(runs);
    for first in (0..nb).step_by(per.max(1)) {
        let blocks = per.min(nb - first);
        let own = &anchors[first..first + blocks];
        let len = own.iter().copied().max().unwrap_or(0);
        let bias = if len > 0 { Some(DFlashDrafter::training_context_bias_on(own, len, device)?) } else { None };
        spans.push(CtxSpan { first, blocks, len, bias });
    }
    Ok(spans)
}

/// Runs of a training forward's blocks that read their own context lengths ([`context_spans`]).
const CONTEXT_SPANS: usize = 4;

/// One span's attention: q (n_kv, blocks, g·B, hd), `s_self` (n_kv, blocks, g·B, B) the scores
/// against the own block, v (n_kv, blocks, B, hd) → (n_kv, blocks, g·B, hd).
fn span_attention(q: &Tensor, s_self: &Tensor, v: &Tensor, c: &ContextKv, span: &CtxSpan, (nkv, gb, hd): (usize, usize, usize)) -> candle_core::Result<Tensor> {
    let (nbs, t) = (span.blocks, span.len);
    if t == 0 {
        return ops::softmax_last_dim(s_self)?.matmul(v);
    }
    let (k, cv) = (c.k.narrow(1, 0, t)?, c.v.narrow(1, 0, t)?);
    // 5. scores against the span's context: (n_kv, nbs·g·B, hd) x (n_kv, hd, t) -> (n_kv, nbs, g·B, t)
    let s_ctx = q.reshape((nkv, nbs * gb, hd))?.matmul(&k.t()?)?.reshape((nkv, nbs, gb, t))?;
    let s_ctx = match &span.bias {
        // (nbs, t) -> (1, nbs, 1, t)
        Some(bias) => s_ctx.broadcast_add(&bias.reshape((1, nbs, 1, t))?)?,
        None => s_ctx,
    };
    // 6. one softmax over [context ; own block]
    let (p_ctx, p_self) = softmax_pair(&s_ctx, s_self)?;
    // 7. (n_kv, nbs·g·B, t) x (n_kv, t, hd) + (n_kv, nbs, g·B, B) x (n_kv, nbs, B, hd)
    let o_ctx = p_ctx.reshape((nkv, nbs * gb, t))?.matmul(&cv)?.reshape((nkv, nbs, gb, hd))?;
    o_ctx + p_self.matmul(v)?
}

/// Softmax over the concatenation [a ; b] of the last dimensions, returned as its two parts,
/// without building the concatenation (it would be the largest tensor of the step, copied in
/// the forward and zero-padded twice in the backward). Same stabilisation as
/// [`ops::softmax_last_dim`]: subtract the detached row maximum.
fn softmax_pair(a: &Tensor, b: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    let max = a.max_keepdim(D::Minus1)?.maximum(&b.max_keepdim(D::Minus1)?)?.detach();
    let ea = a.broadcast_sub(&max)?.exp()?;
    let eb = b.broadcast_sub(&max)?.exp()?;
    let sum = (ea.sum_keepdim(D::Minus1)? + eb.sum_keepdim(D::Minus1)?)?;
    Ok((ea.broadcast_div(&sum)?, eb.broadcast_div(&sum)?))
}

#[derive(Debug, Clone)]
struct Layer {
    input_layernorm: Tensor,
    self_attn: Attention,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
    eps: f64,
}

impl Layer {
    fn forward(
        &self,
        x: &Tensor,
        nb: usize,
        cos: &Tensor,
        sin: &Tensor,
        ctx: LayerContext<'_>,
    ) -> candle_core::Result<Tensor> {
        let h = ops::rms_norm(x, &self.input_layernorm, self.eps)?;
        let x = (x + self.self_attn.forward(&h, nb, cos, sin, ctx)?)?;
        let h = ops::rms_norm(&x, &self.post_attention_layernorm, self.eps)?;
        x + self.mlp.forward(&h, ctx.precision)?
    }
}

// ---------------------------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------------------------

/// What every layer of a training forward shares: the context features it may see, the RoPE
/// tables of the context and of the blocks, the context visibility bias, the block inputs.
struct TrainSetup {
    nb: usize,
    /// (T_ctx, n·H) the tapped features of the visible context; None when no block has context.
    features_ctx: Option<Tensor>,
    ccos: Tensor,
    csin: Tensor,
    bcos: Tensor,
    bsin: Tensor,
    /// The runs of blocks and the context each reads ([`CtxSpan`]).
    spans: Vec<CtxSpan>,
    /// (nb·B, H) the target's embeddings of the block tokens (frozen).
    x0: Tensor,
    /// The precision of the layers' linears ([`DFlashDrafter::set_layer_precision`]).
    precision: Precision,
}

impl TrainSetup {
    /// One decoder layer over the blocks, with the context `c` (T_ctx, H) entering through the
    /// layer's own k/v projections.
    fn layer(&self, layer: &Layer, x: &Tensor, c: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let kv = match c {
            Some(c) => Some(layer.self_attn.context_kv(c, &self.ccos, &self.csin, self.precision)?),
            None => None,
        };
        layer.forward(x, self.nb, &self.bcos, &self.bsin, LayerContext { kv: kv.as_ref(), spans: &self.spans, precision: self.precision })
    }
}

/// A checkpointed training forward ([`DFlashDrafter::forward_train_checkpointed`]).
pub struct CheckpointedForward<'a> {
    drafter: &'a DFlashDrafter,
    setup: TrainSetup,
    /// (T_ctx, H) context values (no graph).
    c: Option<Tensor>,
    /// Layer l's input, l = 0..layers (no graph).
    inputs: Vec<Tensor>,
    /// (nb·B, H) the final normed hidden rows (no graph).
    out: Tensor,
}

impl CheckpointedForward<'_> {
    /// (nb·B, H) the values `forward_train` returns.
    pub fn output(&self) -> &Tensor {
        &self.out
    }

    /// Gradients of Σ `rows(output) ⊙ grad_rows` w.r.t. every trainable tensor, where `rows`
    /// selects what the loss reads from the output (the trainer's predicted rows), recomputing one
    /// layer at a time. Returns (variable, gradient) for every variable that received one.
    pub fn backward(
        self,
        rows: impl Fn(&Tensor) -> Result<Tensor, DrafterError>,
        grad_rows: &Tensor,
    ) -> Result<Vec<(Var, Tensor)>, DrafterError> {
        let d = self.drafter;
        let vars = d.named_vars();
        let mut acc: HashMap<candle_core::TensorId, (Var, Tensor)> = HashMap::new();
        let mut add = |grads: &candle_core::backprop::GradStore| -> candle_core::Result<()> {
            for (_, v) in &vars {
                if let Some(g) = grads.get(v.as_tensor()) {
                    let sum = match acc.remove(&v.as_tensor().id()) {
                        Some((_, old)) => (old + g)?,
                        None => g.clone(),
                    };
                    acc.insert(v.as_tensor().id(), (v.clone(), sum));
                }
            }
            Ok(())
        };
        let c_var = match &self.c {
            Some(c) => Some(Var::from_tensor(c)?),
            None => None,
        };
        let mut g_c: Option<Tensor> = None;
        let mut g = grad_rows.detach();
        for (l, layer) in d.layers.iter().enumerate().rev() {
            let x = Var::from_tensor(&self.inputs[l])?;
            let y = self.setup.layer(layer, x.as_tensor(), c_var.as_ref().map(|c| c.as_tensor()))?;
            let surrogate = if l + 1 == d.layers.len() {
                let out = ops::rms_norm(&y, &d.norm, d.config.rms_norm_eps)?;
                (rows(&out)? * &g)?.sum_all()?
            } else {
                (y * &g)?.sum_all()?
            };
            let grads = surrogate.backward()?;
            add(&grads)?;
            if let Some(c) = &c_var {
                if let Some(gc) = grads.get(c.as_tensor()) {
                    g_c = Some(match g_c.take() {
                        Some(old) => (old + gc)?,
                        None => gc.clone(),
                    });
                }
            }
            if l > 0 {
                g = grads.get(x.as_tensor()).cloned().ok_or_else(|| candle_core::Error::Msg("a layer's input got no gradient".into()))?.detach();
            }
        }
        // The context path: fc and hidden_norm, with the gradient the layers sent to the context.
        if let (Some(f), Some(gc)) = (&self.setup.features_ctx, g_c) {
            let c = d.context_feature(f, self.setup.precision)?;
            add(&(c * gc.detach())?.sum_all()?.backward()?)?;
        }
        Ok(acc.into_values().collect())
    }
}

/// Whether a query of the block anchored at `anchor` may see context position `j` (training).
/// The anchor's own feature is excluded: at inference the block's position 0 is the last
/// committed token, whose target feature does not exist yet.
pub fn context_visible(anchor: usize, j: usize) -> bool {
    j < anchor
}

/// The drafter's context KV cache: per layer, K and V (n_kv, len, hd) of context positions
/// 0..len. Block K/V are never stored.
#[derive(Debug, Clone)]
pub struct DFlashCache {
    layers: Vec<Option<ContextKv>>,
    len: usize,
}

impl DFlashCache {
    /// Context positions held (0..len).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether any cached tensor carries an autograd graph (it never should).
    pub fn tracks_gradients(&self) -> bool {
        self.layers.iter().flatten().any(|kv| kv.k.track_op() || kv.v.track_op())
    }
}

/// The DFlash drafter: trainable parameters in a `VarMap` (checkpoint names), frozen embedding and
/// head borrowed from the [`Target`] at each call. A clone shares the same `Var`s.
#[derive(Clone)]
pub struct DFlashDrafter {
    config: DFlashConfig,
    varmap: VarMap,
    fc: Tensor,
    hidden_norm: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    /// The trainable MASK input (H), when the config has one.
    mask_embedding: Option<Tensor>,
    rotary: Rotary,
    /// The ranking its training data gives the target's tokens, and the ids its drafts score
    /// (the top [`super::DEFAULT_DRAFT_VOCAB`] unless set otherwise), DESIGN §7.13. None: the whole
    /// vocabulary.
    draft_vocab: Option<(Arc<DraftVocab>, Arc<[u32]>)>,
    /// Drafts stop at the first position the drafter gives less than this probability (0: off;
    /// [`DFlashDrafter::set_draft_p_min`]).
    draft_p_min: f32,
    /// How its inference path holds the projections ([`DFlashDrafter::set_inference_precision`]).
    inference_precision: super::DrafterPrecision,
    /// The precision of the layers' linears in training forwards (`layer_precision` of the
    /// training config); inference always runs f32 (or its quantized kernels).
    layer_precision: Precision,
    /// Runs of blocks with their own context lengths in training forwards ([`CONTEXT_SPANS`];
    /// tests set 1 to compare).
    context_spans: usize,
}

impl std::fmt::Debug for DFlashDrafter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DFlashDrafter")
            .field("config", &self.config)
            .field("parameters", &self.config.num_parameters())
            .finish()
    }
}

impl DFlashDrafter {
    /// A copy of this drafter with its weights on `device`, in fresh `Var`s.
    pub fn to_device(&self, device: &Device) -> Result<Self, DrafterError> {
        let tensors = self
            .named_vars()
            .into_iter()
            .map(|(name, v)| Ok((name, v.as_tensor().to_device(device)?)))
            .collect::<Result<HashMap<_, _>, DrafterError>>()?;
        let mut d = Self::from_tensors(self.config.clone(), tensors)?;
        d.draft_vocab = self.draft_vocab.clone();
        d.draft_p_min = self.draft_p_min;
        d.inference_precision = self.inference_precision;
        Ok(d)
    }

    /// Builds the model from named f32 tensors (exactly [`DFlashConfig::tensor_shapes`], checked
    /// by the caller); each becomes a `Var` in a fresh `VarMap`.
    pub(crate) fn from_tensors(config: DFlashConfig, mut tensors: HashMap<String, Tensor>) -> Result<Self, DrafterError> {
        let varmap = VarMap::new();
        let mut vars: HashMap<String, Tensor> = HashMap::new();
        {
            let mut data = varmap.data().lock().map_err(|_| DrafterError::Model(crate::model::ModelError::Poisoned))?;
            for (name, shape) in config.tensor_shapes() {
                let t = tensors.remove(&name).ok_or_else(|| DrafterError::MissingTensor { path: "drafter".into(), name: name.clone() })?;
                if t.dims() != shape.as_slice() {
                    return Err(DrafterError::ShapeMismatch { path: "drafter".into(), name, expected: shape, got: t.dims().to_vec() });
                }
                let var = Var::from_tensor(&t.to_dtype(DType::F32)?.contiguous()?)?;
                vars.insert(name.clone(), var.as_tensor().clone());
                data.insert(name, var);
            }
        }
        let take = |name: &str| -> Result<Tensor, DrafterError> {
            vars.get(name).cloned().ok_or_else(|| DrafterError::MissingTensor { path: "drafter".into(), name: name.to_string() })
        };
        let eps = config.rms_norm_eps;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let p = format!("layers.{l}");
            layers.push(Layer {
                input_layernorm: take(&format!("{p}.input_layernorm.weight"))?,
                self_attn: Attention {
                    q_proj: take(&format!("{p}.self_attn.q_proj.weight"))?,
                    k_proj: take(&format!("{p}.self_attn.k_proj.weight"))?,
                    v_proj: take(&format!("{p}.self_attn.v_proj.weight"))?,
                    o_proj: take(&format!("{p}.self_attn.o_proj.weight"))?,
                    q_norm: take(&format!("{p}.self_attn.q_norm.weight"))?,
                    k_norm: take(&format!("{p}.self_attn.k_norm.weight"))?,
                    heads: config.num_attention_heads,
                    kv_heads: config.num_key_value_heads,
                    head_dim: config.head_dim,
                    eps,
                },
                post_attention_layernorm: take(&format!("{p}.post_attention_layernorm.weight"))?,
                mlp: Mlp {
                    gate_proj: take(&format!("{p}.mlp.gate_proj.weight"))?,
                    up_proj: take(&format!("{p}.mlp.up_proj.weight"))?,
                    down_proj: take(&format!("{p}.mlp.down_proj.weight"))?,
                },
                eps,
            });
        }
        let rotary = Rotary::new(config.head_dim, config.rope_theta);
        Ok(Self {
            fc: take("fc.weight")?,
            hidden_norm: take("hidden_norm.weight")?,
            norm: take("norm.weight")?,
            mask_embedding: if config.mask_embedding { Some(take("mask_embedding")?) } else { None },
            layers,
            rotary,
            varmap,
            config,
            draft_vocab: None,
            draft_p_min: 0.0,
            inference_precision: super::DrafterPrecision::default(),
            layer_precision: Precision::F32,
            context_spans: CONTEXT_SPANS,
        })
    }

    /// Drafts score the `size` most frequent ids of `vocab` (plus each request's context
    /// tokens), or the whole vocabulary when `vocab` is None or `size` is 0 or covers it.
    pub fn set_draft_vocab(&mut self, vocab: Option<Arc<DraftVocab>>, size: usize) {
        self.draft_vocab = vocab.map(|v| {
            let ids: Arc<[u32]> = if size == 0 || size >= v.vocab_size { Arc::from([]) } else { v.top(size).into() };
            (v, ids)
        });
    }

    /// The ranking this drafter carries (saved beside its checkpoint).
    /// The precision of the layers' linears (and `fc`) in training forwards; the attention
    /// scores, norms and inference stay f32. The trainer sets it from `layer_precision` after
    /// checking [`Precision::runs_here`].
    pub fn set_layer_precision(&mut self, precision: Precision) {
        self.layer_precision = precision;
    }

    pub fn draft_vocab(&self) -> Option<&Arc<DraftVocab>> {
        self.draft_vocab.as_ref().map(|(v, _)| v)
    }

    /// The ids its drafts score; None for the whole vocabulary.
    pub fn draft_ids(&self) -> Option<&Arc<[u32]>> {
        self.draft_vocab.as_ref().map(|(_, ids)| ids).filter(|ids| !ids.is_empty())
    }

    pub fn config(&self) -> &DFlashConfig {
        &self.config
    }

    /// The same drafter, its tensors unchanged, drafting blocks of `block_size` (no shape depends
    /// on it: a block is [last, MASK × (B-1)] whatever B). The caller checks that B is at most the
    /// trained one ([`super::AnyDrafter::at_block_size`]).
    pub(crate) fn into_block_size(mut self, block_size: usize) -> Self {
        self.config.block_size = block_size;
        self
    }

    pub fn block_size(&self) -> usize {
        self.config.block_size
    }

    pub fn mask_token_id(&self) -> u32 {
        self.config.mask_token_id
    }

    pub fn target_layer_ids(&self) -> &[usize] {
        &self.config.target_layer_ids
    }

    /// The trainable parameters; the optimiser updates these `Var`s in place.
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// (checkpoint name, Var) in checkpoint order, for `train::optim::AdamW::new`.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let data = match self.varmap.data().lock() {
            Ok(d) => d,
            Err(p) => p.into_inner(),
        };
        self.config.tensor_shapes().into_iter().filter_map(|(name, _)| data.get(&name).map(|v| (name, v.clone()))).collect()
    }

    /// The input rows (nb·B, H) of blocks `block_ids` ([anchor, MASK × (B-1)] each): the
    /// target's frozen embeddings, with the trainable MASK vector in every row after a block's
    /// first when the drafter has one.
    fn block_inputs(&self, target: &Target, block_ids: &[u32]) -> Result<Tensor, DrafterError> {
        let x = target.embed(block_ids)?;
        let Some(m) = &self.mask_embedding else { return Ok(x) };
        let b = self.config.block_size;
        let is_mask: Vec<f32> = (0..block_ids.len()).map(|r| f32::from(u8::from(r % b != 0))).collect();
        let is_mask = Tensor::from_vec(is_mask, (block_ids.len(), 1), x.device())?;
        let keep = is_mask.affine(-1.0, 1.0)?;
        Ok((x.broadcast_mul(&keep)? + is_mask.broadcast_mul(&m.unsqueeze(0)?)?)?)
    }

    /// The trainable MASK input (H), when the drafter has one.
    pub fn mask_embedding(&self) -> Option<&Tensor> {
        self.mask_embedding.as_ref()
    }

    /// The block token ids [anchor, MASK × (B-1)] for each anchor token, flattened (nb·B).
    pub fn block_ids(&self, anchor_tokens: &[u32]) -> Vec<u32> {
        let b = self.config.block_size;
        anchor_tokens
            .iter()
            .flat_map(|&t| std::iter::once(t).chain(std::iter::repeat_n(self.config.mask_token_id, b - 1)))
            .collect()
    }

    /// Rows of the predicted positions 1..B-1 of every block: (nb·B, H) -> (nb·(B-1), H),
    /// block-major, the row layout of `train::objective::BlockLayout::dflash`.
    pub fn predicted_rows(&self, hidden: &Tensor) -> Result<Tensor, DrafterError> {
        let b = self.config.block_size;
        let (n, h) = hidden.dims2()?;
        if n % b != 0 {
            return Err(DrafterError::InputShape { what: "drafter hidden", got: vec![n, h], expected: format!("(nb·{b}, {h})") });
        }
        let nb = n / b;
        Ok(hidden.reshape((nb, b, h))?.narrow(1, 1, b - 1)?.reshape((nb * (b - 1), h))?)
    }

    /// Fused context feature: (T, n_taps·H) -> hidden_norm(fc(·)) (T, H).
    fn context_feature(&self, features: &Tensor, p: Precision) -> candle_core::Result<Tensor> {
        ops::rms_norm(&linear_at(features, &self.fc, p)?, &self.hidden_norm, self.config.rms_norm_eps)
    }

    fn check_features(&self, features: &Tensor) -> Result<usize, DrafterError> {
        let want = self.config.fc_in();
        match features.dims() {
            &[t, w] if w == want && features.dtype() == DType::F32 => Ok(t),
            other => Err(DrafterError::InputShape {
                what: "context features",
                got: other.to_vec(),
                expected: format!(
                    "(T, {want}) f32: the taps of target layers {:?} concatenated",
                    self.config.target_layer_ids
                ),
            }),
        }
    }

    fn check_tokens(&self, ids: &[u32]) -> Result<(), DrafterError> {
        match ids.iter().find(|&&t| t as usize >= self.config.vocab_size) {
            Some(&token) => Err(DrafterError::TokenOutOfRange { token, vocab: self.config.vocab_size }),
            None => Ok(()),
        }
    }

    /// The additive context bias of the training mask: (nb, T), 0 where [`context_visible`].
    pub fn training_context_bias(anchors: &[usize], t: usize) -> candle_core::Result<Tensor> {
        Self::training_context_bias_on(anchors, t, &Device::Cpu)
    }

    /// [`Self::training_context_bias`] on `device`.
    pub fn training_context_bias_on(anchors: &[usize], t: usize, device: &Device) -> candle_core::Result<Tensor> {
        let mut bias = Vec::with_capacity(anchors.len() * t);
        for &a in anchors {
            bias.extend((0..t).map(|j| if context_visible(a, j) { 0.0 } else { ops::MASKED_BIAS }));
        }
        Tensor::from_vec(bias, (anchors.len(), t), device)
    }

    /// Training forward for one sequence.
    ///
    /// `features` (T, n_taps·H): the target's taps of the whole sequence; `anchors` (nb): block
    /// anchor positions, each < T; `block_ids` (nb·B): each block's tokens, normally
    /// `[x_anchor, MASK × (B-1)]` ([`Self::block_ids`]). Block b occupies positions
    /// a_b..a_b+B-1 and sees context positions < a_b. Returns the final-normed hidden
    /// (nb·B, H), block-major; every op is differentiable w.r.t. the drafter's `Var`s.
    pub fn forward_train(&self, target: &Target, features: &Tensor, anchors: &[usize], block_ids: &[u32]) -> Result<Tensor, DrafterError> {
        let setup = self.train_setup(target, features, anchors, block_ids)?;
        let c = match &setup.features_ctx {
            Some(f) => Some(self.context_feature(f, setup.precision)?),
            None => None,
        };
        let mut x = setup.x0.clone();
        for layer in &self.layers {
            x = setup.layer(layer, &x, c.as_ref())?;
        }
        // 4. final norm (nb·B, H)
        Ok(ops::rms_norm(&x, &self.norm, self.config.rms_norm_eps)?)
    }

    /// The checks and the inputs every layer of a training forward shares.
    fn train_setup(&self, target: &Target, features: &Tensor, anchors: &[usize], block_ids: &[u32]) -> Result<TrainSetup, DrafterError> {
        let b = self.config.block_size;
        let nb = anchors.len();
        let t_all = self.check_features(features)?;
        if nb == 0 || block_ids.len() != nb * b {
            return Err(DrafterError::InputShape {
                what: "block token ids",
                got: vec![block_ids.len()],
                expected: format!("({nb} anchors × block_size {b}), at least one anchor"),
            });
        }
        for (block, &anchor) in anchors.iter().enumerate() {
            if anchor >= t_all {
                return Err(DrafterError::AnchorOutOfRange { anchor, block, len: t_all });
            }
            if anchor + b > self.config.max_position_embeddings {
                return Err(DrafterError::ContextOverflow { needed: anchor + b, max: self.config.max_position_embeddings });
            }
        }
        self.check_tokens(block_ids)?;
        // 1. only positions < max anchor are visible to any block: (T_ctx, n·H)
        let t_ctx = anchors.iter().copied().max().unwrap_or(0);
        let ctx_pos: Vec<usize> = (0..t_ctx).collect();
        let block_pos: Vec<usize> = anchors.iter().flat_map(|&a| a..a + b).collect();
        let features_ctx = if t_ctx > 0 { Some(features.narrow(0, 0, t_ctx)?) } else { None };
        // 2. RoPE tables: context (T_ctx, hd/2), blocks (nb, B, hd/2)
        let (ccos, csin) = self.rotary.at(&ctx_pos, self.norm.device())?;
        let (bcos, bsin) = self.rotary.at(&block_pos, self.norm.device())?;
        let half = self.config.head_dim / 2;
        let (bcos, bsin) = (bcos.reshape((nb, b, half))?, bsin.reshape((nb, b, half))?);
        let spans = if t_ctx > 0 { context_spans(anchors, self.context_spans, self.norm.device())? } else { Vec::new() };
        // 3. block inputs: the target's frozen embeddings (nb·B, H)
        let x0 = self.block_inputs(target, block_ids)?;
        Ok(TrainSetup { nb, features_ctx, ccos, csin, bcos, bsin, spans, x0, precision: self.layer_precision })
    }

    /// [`Self::forward_train`] with activation checkpointing: the forward keeps only each layer's
    /// input (nb·B × H) and the context (T_ctx × H), not the layers' attention scores and MLP
    /// activations; [`CheckpointedForward::backward`] recomputes one layer at a time, from the last
    /// to the first. The values are those of `forward_train`; the gradients equal its gradients up
    /// to float summation order (the context's gradient is summed over the layers' passes).
    pub fn forward_train_checkpointed(
        &self,
        target: &Target,
        features: &Tensor,
        anchors: &[usize],
        block_ids: &[u32],
    ) -> Result<CheckpointedForward<'_>, DrafterError> {
        let setup = self.train_setup(target, features, anchors, block_ids)?;
        // Values only: each result is detached at once, so the graph built for it is dropped.
        let c = match &setup.features_ctx {
            Some(f) => Some(self.context_feature(f, setup.precision)?.detach()),
            None => None,
        };
        let mut inputs = Vec::with_capacity(self.layers.len());
        let mut x = setup.x0.detach();
        for layer in &self.layers {
            let y = setup.layer(layer, &x, c.as_ref())?.detach();
            inputs.push(std::mem::replace(&mut x, y));
        }
        let out = ops::rms_norm(&x, &self.norm, self.config.rms_norm_eps)?.detach();
        Ok(CheckpointedForward { drafter: self, setup, c, inputs, out })
    }

    /// An empty context cache.
    pub fn new_cache(&self) -> DFlashCache {
        DFlashCache { layers: vec![None; self.config.num_hidden_layers], len: 0 }
    }

    /// Appends the context rows of positions cache.len().. from their target taps
    /// (n, n_taps·H).
    pub fn extend_context(&self, cache: &mut DFlashCache, features: &Tensor) -> Result<(), DrafterError> {
        let n = self.check_features(features)?;
        if n == 0 {
            return Ok(());
        }
        let start = cache.len;
        if start + n > self.config.max_position_embeddings {
            return Err(DrafterError::ContextOverflow { needed: start + n, max: self.config.max_position_embeddings });
        }
        let positions: Vec<usize> = (start..start + n).collect();
        let (cos, sin) = self.rotary.at(&positions, self.norm.device())?;
        let c = self.context_feature(&features.detach(), Precision::F32)?;
        for (layer, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
            // Detached: a cached row must not keep the autograd graph that made it (nor, through
            // the concatenation, every earlier cache) alive for the whole request.
            let new = layer.self_attn.context_kv(&c, &cos, &sin, Precision::F32)?;
            let (k, v) = (new.k.detach(), new.v.detach());
            *slot = Some(match slot.take() {
                None => ContextKv { k, v },
                Some(old) => ContextKv { k: Tensor::cat(&[&old.k, &k], 1)?, v: Tensor::cat(&[&old.v, &v], 1)? },
            });
        }
        cache.len += n;
        Ok(())
    }

    /// Inference forward of one block at positions start..start+B-1 against the whole cached
    /// context, which must hold exactly positions 0..start. `block_ids` (B). Returns the
    /// final-normed hidden (B, H).
    pub fn forward_block(&self, target: &Target, cache: &DFlashCache, block_ids: &[u32], start: usize) -> Result<Tensor, DrafterError> {
        let b = self.config.block_size;
        if block_ids.len() != b {
            return Err(DrafterError::InputShape { what: "block token ids", got: vec![block_ids.len()], expected: format!("({b})") });
        }
        if cache.len != start {
            return Err(DrafterError::ContextGap { cached: cache.len, start });
        }
        if start + b > self.config.max_position_embeddings {
            return Err(DrafterError::ContextOverflow { needed: start + b, max: self.config.max_position_embeddings });
        }
        self.check_tokens(block_ids)?;
        let positions: Vec<usize> = (start..start + b).collect();
        let (cos, sin) = self.rotary.at(&positions, self.norm.device())?;
        let half = self.config.head_dim / 2;
        let (cos, sin) = (cos.reshape((1, b, half))?, sin.reshape((1, b, half))?);
        // 1. (B, H) frozen embeddings; 2. layers against the cached context; 3. final norm
        let mut x = self.block_inputs(target, block_ids)?;
        for (layer, kv) in self.layers.iter().zip(&cache.layers) {
            x = layer.forward(&x, 1, &cos, &sin, LayerContext { kv: kv.as_ref(), spans: &[], precision: Precision::F32 })?;
        }
        Ok(ops::rms_norm(&x, &self.norm, self.config.rms_norm_eps)?)
    }

    /// Drafts the B-1 tokens after `last_token` (at position `start`): greedy argmax of the
    /// target's head over block positions 1..B-1.
    pub fn draft(&self, target: &Target, cache: &DFlashCache, last_token: u32, start: usize) -> Result<Vec<u32>, DrafterError> {
        let logits = self.draft_logits(target, cache, last_token, start)?;
        Ok(logits.argmax(D::Minus1)?.to_dtype(DType::U32)?.to_vec1::<u32>()?)
    }

    /// [`DFlashDrafter::draft`] with each draft's probability under the drafter's softmax over
    /// the whole vocabulary (its confidence, which `--draft-p-min` compares).
    pub fn draft_scored(&self, target: &Target, cache: &DFlashCache, last_token: u32, start: usize) -> Result<Vec<(u32, f32)>, DrafterError> {
        let logits = self.draft_logits(target, cache, last_token, start)?.to_dtype(DType::F32)?.to_device(&candle_core::Device::Cpu)?;
        Ok(logits.to_vec2::<f32>()?.iter().map(|row| super::dflash_infer::top_with_probability(row)).collect())
    }

    /// The target head's (B-1, V) logits of the block after `last_token` at `start`.
    fn draft_logits(&self, target: &Target, cache: &DFlashCache, last_token: u32, start: usize) -> Result<Tensor, DrafterError> {
        let ids = self.block_ids(&[last_token]);
        let hidden = self.forward_block(target, cache, &ids, start)?;
        let b = self.config.block_size;
        Ok(target.lm_head(&hidden.narrow(0, 1, b - 1)?)?)
    }

    /// Drafts are cut at the first position whose probability is below `p` (0: never cut):
    /// llama.cpp's `--draft-p-min`. A run setting, not saved with the checkpoint.
    pub fn set_draft_p_min(&mut self, p: f32) {
        self.draft_p_min = p;
    }

    pub fn draft_p_min(&self) -> f32 {
        self.draft_p_min
    }

    /// How the fast inference path ([`super::DFlashProposer::new`]) holds the projections: Q4_1
    /// (the default), int8, or the trained f32 values. A run setting, not saved.
    pub fn set_inference_precision(&mut self, precision: super::DrafterPrecision) {
        self.inference_precision = precision;
    }

    pub fn inference_precision(&self) -> super::DrafterPrecision {
        self.inference_precision
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expected values from the reference formula (z-lab `build_target_layer_ids`), in Python:
    /// ```python
    /// def b(L, n):
    ///     if n == 1: return [L // 2]
    ///     return [int(round(1 + (i * (L - 4)) / (n - 1))) for i in range(n)]
    /// ```
    #[test]
    fn default_target_layer_ids_round_half_to_even_like_python() {
        let cases: &[(usize, usize, &[usize])] = &[
            (36, 5, &[1, 9, 17, 25, 33]),
            (30, 5, &[1, 8, 14, 20, 27]),
            (36, 1, &[18]),
            (30, 1, &[15]),
            (28, 3, &[1, 13, 25]),
            (24, 4, &[1, 8, 14, 21]),
            (32, 5, &[1, 8, 15, 22, 29]),
            (40, 8, &[1, 6, 11, 16, 22, 27, 32, 37]),
            (48, 6, &[1, 10, 19, 27, 36, 45]),
            (64, 7, &[1, 11, 21, 31, 41, 51, 61]),
            (4, 2, &[1, 1]),
            (4, 1, &[2]),
        ];
        for &(l, n, want) in cases {
            assert_eq!(build_target_layer_ids(l, n), want, "L = {l}, n = {n}");
        }
    }

    /// Splitting the blocks into runs with their own context lengths (`context_spans`) gives the
    /// forward and the gradients of one run over the whole context, up to float summation order;
    /// a run of anchors at 0 (no context at all) included.
    #[test]
    fn context_spans_give_the_whole_context_forward_and_gradients() {
        use crate::model::{load_target, Logits, ModelLocation, WeightsMode};
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/qwen3");
        let target = load_target(&ModelLocation::from_path(&dir).unwrap(), WeightsMode::F32).unwrap();
        let mut init = DFlashInitConfig::new(2, 4, 5);
        init.target_layer_ids = Some(vec![0, 3]);
        let mut d = DFlashDrafter::init_random(target.config(), &init, 11).unwrap();
        for (_, var) in d.named_vars() {
            if var.as_tensor().rank() == 2 {
                var.set(&(var.as_tensor() * 5.0).unwrap()).unwrap();
            }
        }
        let ids: Vec<u32> = (0..20u32).map(|i| 3 + (i * 37) % 250).collect();
        let mut cache = target.new_cache();
        let taps = target.forward(&ids, &mut cache, &[0, 3], Logits::None).unwrap().taps;
        let feats = Tensor::cat(&taps, 1).unwrap();
        let anchors = [0usize, 0, 3, 6, 9, 12, 15];
        let block_ids = d.block_ids(&anchors.iter().map(|&a| ids[a]).collect::<Vec<_>>());
        let run = |d: &DFlashDrafter| {
            let h = d.forward_train(&target, &feats, &anchors, &block_ids).unwrap();
            let r = Tensor::arange(0f32, h.elem_count() as f32, h.device()).unwrap().reshape(h.dims()).unwrap().sin().unwrap();
            let grads = (&h * r).unwrap().sum_all().unwrap().backward().unwrap();
            let g: Vec<Vec<f32>> = d.named_vars().iter().map(|(_, v)| grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap()).collect();
            (h.flatten_all().unwrap().to_vec1::<f32>().unwrap(), g)
        };
        d.context_spans = 1;
        let (h1, g1) = run(&d);
        d.context_spans = 4;
        assert_eq!(context_spans(&anchors, 4, &Device::Cpu).unwrap().iter().map(|s| (s.first, s.blocks, s.len)).collect::<Vec<_>>(), [(0, 2, 0), (2, 2, 6), (4, 2, 12), (6, 1, 15)]);
        let (h4, g4) = run(&d);
        let close = |a: &[f32], b: &[f32], what: &str| {
            let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
            let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(diff <= 1e-5 * scale, "{what}: {diff} against a scale of {scale}");
        };
        close(&h1, &h4, "output");
        for (i, (a, b)) in g1.iter().zip(&g4).enumerate() {
            close(a, b, &format!("gradient {i}"));
        }
    }

    #[test]
    fn a_half_rounds_to_even_not_away_from_zero_for_a_30_layer_target() {
        // L = 30, n = 5: 1 + 3·26/4 = 20.5 rounds to 20 (even), not 21.
        assert_eq!(build_target_layer_ids(30, 5)[3], 20);
    }
}
