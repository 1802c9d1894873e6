//! The Domino drafter (DESIGN §4): the DFlash backbone unchanged, plus a GRU logit correction.
//!
//! # The model
//! ```text
//! backbone   z = DFlashDrafter block hidden, final-normed                      (B, H)
//! base       base_k  = lm_head(z_k)                      the target's frozen head  (V)
//! GRU        h_k     = GRU(embed(t_k), h_{k-1}),  h_{-1} = 0                    (G)
//!            t_0 = the block's known token, t_k = the token at block position k (k ≥ 1)
//! delta      delta_k = W₂ · silu(W₁ · [z_k ; h_k])   embed_proj.2 · SiLU · embed_proj.0 (V)
//! final      logits_k = base_k                       k < pure_draft_prefix_len (= 1)
//!            logits_k = base_k + delta_k             otherwise
//! ```
//! The GRU is one bias-free layer with PyTorch's equations and gate order (r, z, n); `embed_proj`
//! takes the backbone hidden first, then the GRU state (SpecForge `DominoDraftModel`,
//! `torch.cat([z_n, prefix_states], -1)`).
//!
//! # Labels (`shift_label = true`, the released convention)
//! Block position k (0..B-1) predicts the token at block position k+1, i.e. x_{a+k+1}. So h_k has
//! consumed t_0..t_k, everything before the token it predicts, and nothing after.
//! - Training (teacher forcing): t_k = x_{a+k}, the gold tokens; every position 0..B-1 is a
//!   row (`BlockLayout::domino`), position 0 on base logits only.
//! - Inference: the block is `[last, MASK × (B-1)]` at start..start+B-1, as in DFlash; t_0 = last
//!   and t_k = d_k, the drafter's own k-th draft. Position 0's argmax(base) is d_1; position k's
//!   argmax(base + delta) is d_{k+1}. The verify block is `[last, d_1..d_{B-1}]`, so positions
//!   0..B-2 are used and Domino drafts B-1 tokens per cycle, like DFlash (position B-1's hidden is
//!   computed by the backbone, which sees the whole block, but predicts beyond the verify block).
//!
//! The GRU state is carried from position to position (one step per drafted token), never
//! recomputed from the start of the block.
//!
//! # Checkpoint (SpecForge layout)
//! `config.json` is the DFlash one with `architectures: ["DominoDraftModel"]` and
//! `dflash_config: {…, projector_type: "domino", emb_dim, gru_hidden_dim, shift_label: true,
//! pure_draft_prefix_len}`; `model.safetensors` holds the DFlash tensors plus
//! `prefix_gru.weight_ih_l0` (3G, H), `prefix_gru.weight_hh_l0` (3G, G), `embed_proj.0.weight`
//! (E, H+G) and `embed_proj.2.weight` (V, E).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::checkpoint::{read_weights, standard_normal, write_checkpoint, CONFIG_FILE};
use super::dflash::{DFlashCache, DFlashConfig, DFlashDrafter, DFlashInitConfig, INIT_STD};
use super::proposer::DFlashProposer;
use super::DrafterError;
use crate::model::{Target, TargetConfig};
use crate::nn::ops;
use crate::spec::{Draft, Proposer, SpecError};
use super::blocks::{BlockLayout, Blocks};

// ---------------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------------

/// The architecture name of Domino checkpoints (SpecForge `DominoDraftModel`).
pub const ARCHITECTURE: &str = "DominoDraftModel";
/// `dflash_config.projector_type` of a Domino checkpoint.
pub const PROJECTOR_TYPE: &str = "domino";

/// Paper widths (Qwen3-8B, H = 4096): GRU hidden G and embed_proj width E.
pub const PAPER_GRU_HIDDEN_DIM: usize = 1024;
pub const PAPER_EMB_DIM: usize = 256;
/// Widths for small targets (hidden size below 2048, e.g. SmolLM2-135M with H = 576): the paper's
/// G = 1024 would make the GRU larger than the target's own layers.
pub const SMALL_GRU_HIDDEN_DIM: usize = 256;
pub const SMALL_EMB_DIM: usize = 128;

/// Default (G, E) for a target of hidden size `h`: the paper's for h ≥ 2048, else the small ones.
pub fn default_dims(h: usize) -> (usize, usize) {
    if h >= 2048 {
        (PAPER_GRU_HIDDEN_DIM, PAPER_EMB_DIM)
    } else {
        (SMALL_GRU_HIDDEN_DIM, SMALL_EMB_DIM)
    }
}

/// Keys of `dflash_config` that only Domino has.
const DOMINO_SECTION_KEYS: &[&str] = &["projector_type", "emb_dim", "gru_hidden_dim", "shift_label", "pure_draft_prefix_len"];

/// The Domino drafter's configuration: the DFlash backbone's plus the correction branch.
#[derive(Debug, Clone, PartialEq)]
pub struct DominoConfig {
    pub backbone: DFlashConfig,
    /// E: width of embed_proj's hidden layer (paper 256).
    pub emb_dim: usize,
    /// G: the GRU's hidden size (paper 1024).
    pub gru_hidden_dim: usize,
    /// Block positions below this use base logits only (released: 1).
    pub pure_draft_prefix_len: usize,
}

/// What to build for a target: the backbone's init config plus the branch widths.
#[derive(Debug, Clone, PartialEq)]
pub struct DominoInitConfig {
    pub backbone: DFlashInitConfig,
    /// Default: [`default_dims`] of the target's hidden size.
    pub gru_hidden_dim: Option<usize>,
    /// Default: [`default_dims`] of the target's hidden size.
    pub emb_dim: Option<usize>,
    /// Default 1 (released checkpoints).
    pub pure_draft_prefix_len: usize,
}

impl DominoInitConfig {
    pub fn new(backbone: DFlashInitConfig) -> Self {
        Self { backbone, gru_hidden_dim: None, emb_dim: None, pure_draft_prefix_len: 1 }
    }
}

impl DominoConfig {
    /// The config of a new drafter for `target`.
    pub fn for_target(target: &TargetConfig, init: &DominoInitConfig) -> Result<Self, DrafterError> {
        let backbone = DFlashConfig::for_target(target, &init.backbone)?;
        let (g, e) = default_dims(target.hidden_size);
        let cfg = DominoConfig {
            backbone,
            emb_dim: init.emb_dim.unwrap_or(e),
            gru_hidden_dim: init.gru_hidden_dim.unwrap_or(g),
            pure_draft_prefix_len: init.pure_draft_prefix_len,
        };
        cfg.validate("drafter config")?;
        Ok(cfg)
    }

    pub fn validate(&self, path: &str) -> Result<(), DrafterError> {
        self.backbone.validate(path)?;
        let bad = |what: String| DrafterError::InvalidConfig { path: path.to_string(), what };
        if self.emb_dim == 0 || self.gru_hidden_dim == 0 {
            return Err(bad(format!("emb_dim ({}) and gru_hidden_dim ({}) must be > 0", self.emb_dim, self.gru_hidden_dim)));
        }
        if self.pure_draft_prefix_len >= self.backbone.block_size {
            return Err(bad(format!(
                "pure_draft_prefix_len {} leaves no block position for the correction branch (block_size {})",
                self.pure_draft_prefix_len, self.backbone.block_size
            )));
        }
        Ok(())
    }

    /// The backbone's tensors, then the correction branch's, in checkpoint order.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = self.backbone.tensor_shapes();
        out.extend(self.branch_shapes());
        out
    }

    fn branch_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, g, e, v) = (self.backbone.hidden_size, self.gru_hidden_dim, self.emb_dim, self.backbone.vocab_size);
        vec![
            (GRU_IH.to_string(), vec![3 * g, h]),
            (GRU_HH.to_string(), vec![3 * g, g]),
            (PROJ_IN.to_string(), vec![e, h + g]),
            (PROJ_OUT.to_string(), vec![v, e]),
        ]
    }

    /// Trainable parameter count (backbone and branch).
    pub fn num_parameters(&self) -> usize {
        self.tensor_shapes().iter().map(|(_, s)| s.iter().product::<usize>()).sum()
    }

    /// config.json: the DFlash text with the Domino architecture and `dflash_config` keys.
    pub fn to_json(&self) -> String {
        let mut v: serde_json::Value = serde_json::from_str(&self.backbone.to_json()).unwrap_or_default();
        if let Some(obj) = v.as_object_mut() {
            obj.insert("architectures".into(), serde_json::json!([ARCHITECTURE]));
            if let Some(section) = obj.get_mut("dflash_config").and_then(|s| s.as_object_mut()) {
                section.insert("projector_type".into(), PROJECTOR_TYPE.into());
                section.insert("emb_dim".into(), self.emb_dim.into());
                section.insert("gru_hidden_dim".into(), self.gru_hidden_dim.into());
                section.insert("shift_label".into(), true.into());
                section.insert("pure_draft_prefix_len".into(), self.pure_draft_prefix_len.into());
            }
        }
        serde_json::to_string_pretty(&v).unwrap_or_default()
    }

    /// Reads a Domino `config.json` (ours or SpecForge's). The Domino keys are taken out and
    /// checked here; the rest must be a valid DFlash config ([`DFlashConfig::from_json_str`], with
    /// its refusal of unknown keys). `emb_dim` / `gru_hidden_dim` may sit in `dflash_config` or at
    /// the top level (the released config has `emb_dim` in both).
    pub fn from_json_str(text: &str, path: &str) -> Result<Self, DrafterError> {
        let json = |what: String| DrafterError::Json { path: path.to_string(), what };
        let bad = |what: String| DrafterError::InvalidConfig { path: path.to_string(), what };
        let unsupported = |what: String| DrafterError::Unsupported { path: path.to_string(), what };
        let mut v: serde_json::Value = serde_json::from_str(text).map_err(|e| json(e.to_string()))?;
        let obj = v.as_object_mut().ok_or_else(|| json("the top level is not an object".into()))?;
        let names: Vec<String> = obj
            .get("architectures")
            .and_then(|a| a.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        if obj.contains_key("architectures") && !names.iter().any(|n| n == ARCHITECTURE) {
            return Err(unsupported(format!("architectures {names:?}; a Domino drafter is a {ARCHITECTURE}")));
        }
        let top_emb = obj.remove("emb_dim");
        let top_gru = obj.remove("gru_hidden_dim");
        let section = obj
            .get_mut("dflash_config")
            .and_then(|d| d.as_object_mut())
            .ok_or_else(|| bad("no `dflash_config` object: this is not a Domino drafter config".into()))?;
        let mut taken: HashMap<&str, serde_json::Value> = HashMap::new();
        for key in DOMINO_SECTION_KEYS {
            if let Some(x) = section.remove(*key) {
                taken.insert(key, x);
            }
        }
        match taken.get("projector_type").map(|p| p.as_str()) {
            None => {
                // SpecForge fills in "domino" for a DominoDraftModel without one.
                if names.is_empty() {
                    return Err(bad("neither `architectures` nor `dflash_config.projector_type` says this is a Domino drafter".into()));
                }
            }
            Some(Some(PROJECTOR_TYPE)) => {}
            Some(other) => return Err(unsupported(format!("dflash_config.projector_type {other:?}; a Domino drafter has \"domino\""))),
        }
        // SpecForge's default for a missing shift_label is false.
        match taken.get("shift_label").map(|x| x.as_bool()) {
            Some(Some(true)) => {}
            None | Some(Some(false)) => {
                return Err(unsupported(
                    "dflash_config.shift_label = false (or missing): only the released shift_label = true layout \
                     (position k predicts the token after it) is implemented"
                        .into(),
                ))
            }
            Some(None) => return Err(bad("`dflash_config.shift_label` must be a boolean".into())),
        }
        let dim = |key: &str, top: Option<serde_json::Value>| -> Result<usize, DrafterError> {
            let read = |x: &serde_json::Value| x.as_u64().map(|n| n as usize).ok_or_else(|| bad(format!("`{key}` must be a positive integer")));
            let inner = taken.get(key).map(read).transpose()?;
            let outer = top.as_ref().map(read).transpose()?;
            match (inner, outer) {
                (Some(a), Some(b)) if a != b => Err(bad(format!("{key} {b} and dflash_config.{key} {a} disagree"))),
                (Some(a), _) | (None, Some(a)) => Ok(a),
                (None, None) => Err(bad(format!("`dflash_config.{key}` is missing"))),
            }
        };
        let emb_dim = dim("emb_dim", top_emb)?;
        let gru_hidden_dim = dim("gru_hidden_dim", top_gru)?;
        let pure_draft_prefix_len = match taken.get("pure_draft_prefix_len") {
            None => 0,
            Some(x) => x.as_u64().ok_or_else(|| bad("`dflash_config.pure_draft_prefix_len` must be an integer".into()))? as usize,
        };
        obj.insert("architectures".into(), serde_json::json!([super::dflash::ARCHITECTURE]));
        let backbone = DFlashConfig::from_json_str(&v.to_string(), path)?;
        let cfg = DominoConfig { backbone, emb_dim, gru_hidden_dim, pure_draft_prefix_len };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Reads `dir/config.json`.
    pub fn read(dir: &Path) -> Result<Self, DrafterError> {
        let path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| DrafterError::io(&path, e))?;
        Self::from_json_str(&text, &path.display().to_string())
    }
}

const GRU_IH: &str = "prefix_gru.weight_ih_l0";
const GRU_HH: &str = "prefix_gru.weight_hh_l0";
const PROJ_IN: &str = "embed_proj.0.weight";
const PROJ_OUT: &str = "embed_proj.2.weight";

// ---------------------------------------------------------------------------------------------
// GRU
// ---------------------------------------------------------------------------------------------

/// x (n, in) → (n, out) with a bias-free weight (out, in).
/// x·wᵀ in the compute dtype of w's device (bf16 on CUDA, f32 on the CPU): `ops::linear`.
fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    crate::nn::ops::linear(x, w)
}

/// A one-layer GRU without biases, PyTorch's equations and gate order (r, z, n):
/// ```text
/// r = σ(W_ir x + W_hr h)      z = σ(W_iz x + W_hz h)
/// n = tanh(W_in x + r ⊙ (W_hn h))
/// h' = (1 - z) ⊙ n + z ⊙ h
/// ```
/// `weight_ih` (3G, I) and `weight_hh` (3G, G) stack the r, z, n rows. Differentiable in any float
/// dtype (sigmoid and tanh have backward passes).
///
/// Why not `candle_nn::rnn::GRU`: it computes the same states and gradients (tests/domino_model.rs
/// `our_gru_gives_candle_nns_states_and_gradients`), but it recomputes x·W_ih inside every step;
/// here a whole sequence's input projections are one product ([`Gru::input_gates`]), and
/// inference feeds one precomputed step at a time as the drafter picks tokens.
#[derive(Debug, Clone)]
pub struct Gru {
    weight_ih: Tensor,
    weight_hh: Tensor,
    hidden: usize,
}

impl Gru {
    pub fn new(weight_ih: Tensor, weight_hh: Tensor) -> Result<Self, DrafterError> {
        let (g3, _) = weight_ih.dims2()?;
        let hh = weight_hh.dims2()?;
        if g3 % 3 != 0 || hh != (g3, g3 / 3) {
            return Err(DrafterError::InputShape {
                what: "GRU weights",
                got: [weight_ih.dims(), weight_hh.dims()].concat(),
                expected: "weight_ih (3G, I) and weight_hh (3G, G)".into(),
            });
        }
        Ok(Self { weight_ih, weight_hh, hidden: g3 / 3 })
    }

    /// The same GRU on detached weights: no autograd graph is recorded (inference).
    pub fn detached(&self) -> Self {
        Self { weight_ih: self.weight_ih.detach(), weight_hh: self.weight_hh.detach(), hidden: self.hidden }
    }

    /// G.
    pub fn hidden_size(&self) -> usize {
        self.hidden
    }

    /// The zero initial state (n, G).
    pub fn zero_state(&self, n: usize) -> candle_core::Result<Tensor> {
        Tensor::zeros((n, self.hidden), self.weight_hh.dtype(), self.weight_hh.device())
    }

    /// Input projections W_i·x of any number of inputs: (n, I) → (n, 3G). Split out so that a
    /// whole sequence's are one product.
    pub fn input_gates(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        linear(x, &self.weight_ih)
    }

    /// One step: `gi` (n, 3G) this step's input projections, `h` (n, G) → h' (n, G).
    pub fn step(&self, gi: &Tensor, h: &Tensor) -> candle_core::Result<Tensor> {
        let g = self.hidden;
        let gh = linear(h, &self.weight_hh)?;
        let part = |t: &Tensor, i: usize| t.narrow(1, i * g, g);
        let r = candle_nn::ops::sigmoid(&(part(gi, 0)? + part(&gh, 0)?)?)?;
        let z = candle_nn::ops::sigmoid(&(part(gi, 1)? + part(&gh, 1)?)?)?;
        let n = (part(gi, 2)? + (r * part(&gh, 2)?)?)?.tanh()?;
        // (1 - z)·n + z·h = n + z·(h - n)
        &n + (z * (h - &n)?)?
    }

    /// Every state of a batch of sequences from h = 0: x (n, T, I) → (n, T, G), state t having
    /// consumed inputs 0..=t.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (n, t, i) = x.dims3()?;
        let gi = self.input_gates(&x.reshape((n * t, i))?)?.reshape((n, t, 3 * self.hidden))?;
        let mut h = self.zero_state(n)?;
        let mut states = Vec::with_capacity(t);
        for k in 0..t {
            h = self.step(&gi.narrow(1, k, 1)?.squeeze(1)?, &h)?;
            states.push(h.clone());
        }
        Tensor::stack(&states, 1)
    }
}

// ---------------------------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------------------------

/// What the training forward hands to the head: every block position is a row.
#[derive(Debug, Clone)]
pub struct DominoRows {
    /// (nb·B, H) the backbone's final-normed hidden of all B positions, in the graph.
    pub hidden: Tensor,
    /// (nb·B, E) the SiLU output feeding `embed_proj.2`, in the graph.
    pub delta_input: Tensor,
    /// (V, E) `embed_proj.2.weight` (the Var's tensor).
    pub delta_weight: Tensor,
}

/// The Domino drafter: a [`DFlashDrafter`] backbone and the GRU correction branch, whose four
/// tensors live in their own `VarMap` under their checkpoint names. A clone shares the `Var`s.
#[derive(Clone)]
pub struct DominoDrafter {
    config: DominoConfig,
    backbone: DFlashDrafter,
    varmap: VarMap,
    gru: Gru,
    /// (E, H+G) embed_proj.0.weight.
    proj_in: Tensor,
    /// (V, E) embed_proj.2.weight.
    proj_out: Tensor,
}

impl std::fmt::Debug for DominoDrafter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DominoDrafter")
            .field("config", &self.config)
            .field("parameters", &self.config.num_parameters())
            .finish()
    }
}

impl DominoDrafter {
    /// A new, untrained drafter for `target`, reproducible from `seed`: the backbone as
    /// [`DFlashDrafter::init_random_from_config`]; `embed_proj` Linears ~ N(0, 0.02²) (HF init);
    /// the GRU ~ U(-1/√G, 1/√G) (PyTorch's GRU init, which the HF init leaves alone).
    /// The backbone's layer precision in training forwards ([`DFlashDrafter::set_layer_precision`]);
    /// the GRU branch stays f32.
    pub fn set_layer_precision(&mut self, precision: crate::nn::Precision) {
        self.backbone.set_layer_precision(precision);
    }

    pub fn init_random(target: &TargetConfig, init: &DominoInitConfig, seed: u64) -> Result<Self, DrafterError> {
        Self::init_random_from_config(DominoConfig::for_target(target, init)?, seed)
    }

    pub fn init_random_from_config(config: DominoConfig, seed: u64) -> Result<Self, DrafterError> {
        config.validate("drafter config")?;
        let backbone = DFlashDrafter::init_random_from_config(config.backbone.clone(), seed)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xD0_A1_40);
        let bound = 1.0 / (config.gru_hidden_dim as f64).sqrt();
        let mut tensors = HashMap::new();
        for (name, shape) in config.branch_shapes() {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = if name.starts_with("prefix_gru.") {
                (0..n).map(|_| rng.gen_range(-bound..bound) as f32).collect()
            } else {
                (0..n).map(|_| (standard_normal(&mut rng) * INIT_STD) as f32).collect()
            };
            tensors.insert(name, Tensor::from_vec(values, shape, &Device::Cpu)?);
        }
        Self::from_parts(config, backbone, tensors)
    }

    /// A copy of this drafter with its weights on `device`, in fresh `Var`s.
    pub fn to_device(&self, device: &Device) -> Result<Self, DrafterError> {
        let backbone = self.backbone.to_device(device)?;
        let branch: std::collections::HashSet<String> = self.config.branch_shapes().into_iter().map(|(n, _)| n).collect();
        let tensors = self
            .named_vars()
            .into_iter()
            .filter(|(name, _)| branch.contains(name))
            .map(|(name, v)| Ok((name, v.as_tensor().to_device(device)?)))
            .collect::<Result<HashMap<_, _>, DrafterError>>()?;
        Self::from_parts(self.config.clone(), backbone, tensors)
    }

    /// Builds the drafter from a backbone and the branch's named f32 tensors.
    fn from_parts(config: DominoConfig, backbone: DFlashDrafter, mut tensors: HashMap<String, Tensor>) -> Result<Self, DrafterError> {
        let varmap = VarMap::new();
        let mut vars: HashMap<String, Tensor> = HashMap::new();
        {
            let mut data = varmap.data().lock().map_err(|_| DrafterError::Model(crate::model::ModelError::Poisoned))?;
            for (name, shape) in config.branch_shapes() {
                let t = tensors.remove(&name).ok_or_else(|| DrafterError::MissingTensor { path: "drafter".into(), name: name.clone() })?;
                if t.dims() != shape.as_slice() {
                    return Err(DrafterError::ShapeMismatch { path: "drafter".into(), name, expected: shape, got: t.dims().to_vec() });
                }
                let var = Var::from_tensor(&t.to_dtype(DType::F32)?.contiguous()?)?;
                vars.insert(name.clone(), var.as_tensor().clone());
                data.insert(name, var);
            }
        }
        let take = |name: &str| vars.get(name).cloned().ok_or_else(|| DrafterError::MissingTensor { path: "drafter".into(), name: name.into() });
        let gru = Gru::new(take(GRU_IH)?, take(GRU_HH)?)?;
        Ok(Self { proj_in: take(PROJ_IN)?, proj_out: take(PROJ_OUT)?, gru, varmap, backbone, config })
    }

    /// Writes `dir/config.json` and `dir/model.safetensors` (f32, SpecForge names), atomically.
    pub fn save(&self, dir: &Path) -> Result<(), DrafterError> {
        write_checkpoint(dir, &self.named_vars(), &self.config.to_json())
    }

    /// Reads a Domino checkpoint and checks it against `target` (as [`DFlashDrafter::load`], plus
    /// the branch's tensors).
    pub fn load(dir: &Path, target: &TargetConfig) -> Result<Self, DrafterError> {
        let config = DominoConfig::read(dir)?;
        config.backbone.check_target(target)?;
        let mut tensors = read_weights(dir, &config.tensor_shapes())?;
        let branch: HashMap<String, Tensor> =
            config.branch_shapes().into_iter().filter_map(|(name, _)| tensors.remove_entry(&name)).collect();
        let backbone = DFlashDrafter::from_tensors(config.backbone.clone(), tensors)?;
        Self::from_parts(config, backbone, branch)
    }

    pub fn config(&self) -> &DominoConfig {
        &self.config
    }

    /// The DFlash backbone (shares its `Var`s with this drafter).
    pub fn backbone(&self) -> &DFlashDrafter {
        &self.backbone
    }

    pub fn gru(&self) -> &Gru {
        &self.gru
    }

    pub fn block_size(&self) -> usize {
        self.config.backbone.block_size
    }

    pub fn mask_token_id(&self) -> u32 {
        self.config.backbone.mask_token_id
    }

    pub fn target_layer_ids(&self) -> &[usize] {
        &self.config.backbone.target_layer_ids
    }

    /// Row layout of the training batch: all B positions.
    pub fn layout(&self) -> BlockLayout {
        BlockLayout::domino(self.block_size())
    }

    /// (checkpoint name, Var): the backbone's, then the branch's, in checkpoint order.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let mut out = self.backbone.named_vars();
        let data = match self.varmap.data().lock() {
            Ok(d) => d,
            Err(p) => p.into_inner(),
        };
        out.extend(self.config.branch_shapes().into_iter().filter_map(|(name, _)| data.get(&name).map(|v| (name, v.clone()))));
        out
    }

    /// The tokens the GRU consumes in training, t_k = x_{a+k} (nb·B), from a batch's blocks:
    /// the anchor token, then the labels of predicted indices 0..B-2 (index i's label is
    /// x_{a+1+i}; `build_blocks` keeps gold tokens in invalid rows that lie inside the sequence,
    /// so a mid-block loss-mask gap feeds the GRU the real token, as SpecForge does; past the end
    /// of the sequence the token is 0, and every later label there is invalid anyway).
    pub fn gru_tokens(&self, blocks: &Blocks) -> Result<Vec<u32>, DrafterError> {
        let b = self.block_size();
        let nb = blocks.anchors.len();
        if blocks.block_ids.len() != nb * b || blocks.labels.len() != nb * b {
            return Err(DrafterError::InputShape {
                what: "Domino training blocks",
                got: vec![blocks.block_ids.len(), blocks.labels.len()],
                expected: format!("{nb} blocks × block_size {b} block ids and labels (BlockLayout::domino)"),
            });
        }
        let mut out = Vec::with_capacity(nb * b);
        for blk in 0..nb {
            out.push(blocks.block_ids[blk * b]);
            out.extend_from_slice(&blocks.labels[blk * b..blk * b + b - 1]);
        }
        Ok(out)
    }

    /// Training forward of one sequence's blocks (teacher forcing).
    ///
    /// `features` (T, n_taps·H), `anchors` (nb), `block_ids` (nb·B) as for
    /// [`DFlashDrafter::forward_train`]; `gru_tokens` (nb·B): t_k = x_{a+k} for each block.
    /// Returns all B rows of every block, block-major (`BlockLayout::domino`).
    pub fn forward_train(
        &self,
        target: &Target,
        features: &Tensor,
        anchors: &[usize],
        block_ids: &[u32],
        gru_tokens: &[u32],
    ) -> Result<DominoRows, DrafterError> {
        let b = self.block_size();
        let nb = anchors.len();
        if gru_tokens.len() != nb * b {
            return Err(DrafterError::InputShape { what: "GRU tokens", got: vec![gru_tokens.len()], expected: format!("({nb}·{b})") });
        }
        if let Some(&token) = gru_tokens.iter().find(|&&t| t as usize >= self.config.backbone.vocab_size) {
            return Err(DrafterError::TokenOutOfRange { token, vocab: self.config.backbone.vocab_size });
        }
        // 1. backbone (nb·B, H)
        let hidden = self.backbone.forward_train(target, features, anchors, block_ids)?;
        // 2. GRU over the frozen embeddings of t_0..t_{B-1}: (nb, B, H) -> (nb, B, G) -> (nb·B, G)
        let h = self.config.backbone.hidden_size;
        let emb = target.embed(gru_tokens)?.reshape((nb, b, h))?;
        let states = self.gru.forward(&emb)?.reshape((nb * b, self.gru.hidden_size()))?;
        // 3. embed_proj.0 + SiLU over [z ; h]: (nb·B, H+G) -> (nb·B, E)
        let delta_input = ops::silu(&linear(&Tensor::cat(&[&hidden, &states], 1)?, &self.proj_in)?)?;
        Ok(DominoRows { hidden, delta_input, delta_weight: self.proj_out.clone() })
    }

    /// [`Self::forward_train`] on a batch's [`Blocks`] (built with `BlockLayout::domino`).
    pub fn train_rows(&self, target: &Target, features: &Tensor, blocks: &Blocks) -> Result<DominoRows, DrafterError> {
        let tokens = self.gru_tokens(blocks)?;
        self.forward_train(target, features, &blocks.anchors, &blocks.block_ids, &tokens)
    }

    /// The final logits of training rows, materialised (nb·B, V): base everywhere, plus delta at
    /// block positions ≥ pure_draft_prefix_len. A reference for tests and small evaluations; the
    /// trainer's chunked head computes the same thing without materialising it.
    pub fn final_logits(&self, rows: &DominoRows, lm_head: &Tensor) -> Result<Tensor, DrafterError> {
        let b = self.block_size();
        let base = linear(&rows.hidden, lm_head)?;
        let delta = linear(&rows.delta_input, &rows.delta_weight)?;
        let n = base.dim(0)?;
        let keep: Vec<f32> = (0..n).map(|r| if r % b >= self.config.pure_draft_prefix_len { 1.0 } else { 0.0 }).collect();
        let keep = Tensor::from_vec(keep, (n, 1), base.device())?;
        Ok((base + delta.broadcast_mul(&keep)?)?)
    }

    /// Drafts the B-1 tokens after `last_token` (at position `start`), greedily: one backbone
    /// forward, then the GRU stepped over [last, d_1, ...] and argmax(base + delta) per position.
    pub fn draft(&self, target: &Target, cache: &DFlashCache, last_token: u32, start: usize) -> Result<Vec<u32>, DrafterError> {
        self.decode_block(target, cache, last_token, start, |_, logits| Ok(argmax(logits)))
    }

    /// The inference logits of block positions 0..B-2 when the drafter's tokens are `next`
    /// (B-1 tokens: the GRU consumes [last, next[0], ..., next[B-3]]): (B-1, V). With `next` the
    /// gold tokens this is the teacher-forced training output of the same block. Not a serving
    /// API: it exists so that tests can check that inference and training compute the same block.
    #[doc(hidden)]
    pub fn block_logits_forced(&self, target: &Target, cache: &DFlashCache, last_token: u32, start: usize, next: &[u32]) -> Result<Tensor, DrafterError> {
        let b = self.block_size();
        if next.len() != b - 1 {
            return Err(DrafterError::InputShape { what: "forced draft tokens", got: vec![next.len()], expected: format!("({})", b - 1) });
        }
        let mut rows = Vec::with_capacity(b - 1);
        self.decode_block(target, cache, last_token, start, |k, logits| {
            rows.push(Tensor::from_slice(logits, (1, logits.len()), target.device())?);
            Ok(next[k])
        })?;
        Ok(Tensor::cat(&rows, 0)?)
    }

    /// One inference block. `pick(k, logits_k (V))` chooses the token at block position k+1,
    /// which the GRU consumes next. Returns the B-1 picked tokens.
    fn decode_block(
        &self,
        target: &Target,
        cache: &DFlashCache,
        last_token: u32,
        start: usize,
        mut pick: impl FnMut(usize, &[f32]) -> Result<u32, DrafterError>,
    ) -> Result<Vec<u32>, DrafterError> {
        let b = self.block_size();
        let (h, g) = (self.config.backbone.hidden_size, self.gru.hidden_size());
        let vocab = self.config.backbone.vocab_size;
        // Inference builds no autograd graph: the branch's weights are used detached.
        let (gru, proj_in) = (self.gru.detached(), self.proj_in.detach());
        // 1. backbone once: (B, H); positions 0..B-2 predict inside the verify block
        let z = self.backbone.forward_block(target, cache, &self.backbone.block_ids(&[last_token]), start)?.narrow(0, 0, b - 1)?.detach();
        // 2. base logits (B-1, V), and embed_proj.0's z part for every position at once (B-1, E)
        let base: Vec<Vec<f32>> = target.lm_head(&z)?.to_vec2()?;
        let z_proj = linear(&z, &proj_in.narrow(1, 0, h)?)?;
        let w_state = proj_in.narrow(1, h, g)?.contiguous()?;
        // 3. the GRU, one step per consumed token, its state carried across positions
        let mut state = gru.zero_state(1)?;
        let mut token = last_token;
        let mut out = Vec::with_capacity(b - 1);
        for (k, base_k) in base.into_iter().enumerate() {
            state = gru.step(&gru.input_gates(&target.embed(&[token])?)?, &state)?;
            let mut logits = base_k;
            if k >= self.config.pure_draft_prefix_len {
                // (1, E) activations of embed_proj.2, then logits += W₂ · a
                let a = ops::silu(&(z_proj.narrow(0, k, 1)? + linear(&state, &w_state)?)?)?;
                add_delta(&mut logits, &self.proj_out, &a)?;
            }
            token = pick(k, &logits)?;
            if token as usize >= vocab {
                return Err(DrafterError::TokenOutOfRange { token, vocab });
            }
            out.push(token);
        }
        Ok(out)
    }
}

/// The first index of the largest value.
fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// logits (V) += W₂ · a for W₂ (V, E) and a (1, E): a dot product per vocabulary row, read in
/// place from the weight's storage (candle's matmul would pack a copy of W₂ for a one-row
/// product). Memory-bound: every drafted token streams all of W₂ (SmolLM2, E = 128: 25 MB).
fn add_delta(logits: &mut [f32], w2: &Tensor, a: &Tensor) -> Result<(), DrafterError> {
    let a: Vec<f32> = a.flatten_all()?.to_vec1()?;
    let e = a.len();
    let in_place = crate::nn::with_host_f32(w2, |w| {
        let fits = w.len() == logits.len() * e;
        if fits {
            for (row, out) in w.chunks_exact(e).zip(logits.iter_mut()) {
                *out += dot(row, &a);
            }
        }
        fits
    });
    if in_place == Some(true) {
        return Ok(());
    }
    // Any other layout or device: the plain product.
    let a = Tensor::from_vec(a, (1, e), w2.device())?;
    let delta: Vec<f32> = linear(&a, w2)?.flatten_all()?.to_vec1()?;
    for (x, d) in logits.iter_mut().zip(delta) {
        *x += d;
    }
    Ok(())
}

/// Σ x·y with eight independent partial sums, so the compiler vectorises it.
fn dot(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (xc, yc) = (x.chunks_exact(8), y.chunks_exact(8));
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (a, b) in xc.zip(yc) {
        for i in 0..8 {
            acc[i] += a[i] * b[i];
        }
    }
    let tail: f32 = xr.iter().zip(yr).map(|(a, b)| a * b).sum();
    acc.iter().sum::<f32>() + tail
}

// ---------------------------------------------------------------------------------------------
// Proposer
// ---------------------------------------------------------------------------------------------

/// Domino behind the decode loop: the context bookkeeping is [`DFlashProposer`]'s (same backbone,
/// same cache, same reference semantics); only the block's decoding differs.
#[derive(Debug, Clone)]
pub struct DominoProposer {
    drafter: DominoDrafter,
    context: DFlashProposer,
}

impl DominoProposer {
    pub fn new(drafter: DominoDrafter) -> Self {
        let context = DFlashProposer::reference(drafter.backbone().clone());
        Self { drafter, context }
    }

    pub fn drafter(&self) -> &DominoDrafter {
        &self.drafter
    }

    /// Context positions currently cached.
    pub fn context_len(&self) -> usize {
        self.context.context_len()
    }
}

impl Proposer for DominoProposer {
    fn block_size(&self) -> usize {
        self.drafter.block_size()
    }

    fn target_layer_ids(&self) -> &[usize] {
        self.drafter.target_layer_ids()
    }

    fn begin(&mut self, target: &Target, prompt_ids: &[u32], features: Option<&Tensor>) -> Result<(), SpecError> {
        self.context.begin(target, prompt_ids, features)
    }

    fn propose(&mut self, target: &Target, last_token: u32, start: usize) -> Result<Draft, SpecError> {
        let cache = self.context.sync_context()?;
        let tokens = self.drafter.draft(target, cache, last_token, start).map_err(SpecError::proposer)?;
        Ok(Draft::tokens(tokens))
    }

    fn commit(&mut self, tokens: &[u32], features: Option<&Tensor>, start: usize) -> Result<(), SpecError> {
        self.context.commit(tokens, features, start)
    }
}

