//! AdamW with fp32 moments, global grad-norm clipping, the cosine schedule with linear warmup, and
//! resumable state in safetensors.
//!
//! Defaults are SpecForge's DFlash recipe: AdamW (torch defaults β = (0.9, 0.999), ε = 1e-8) with
//! weight decay 0, lr 6e-4, cosine decay to 0 after 4% linear warmup, global grad-norm clip 1.0.
//!
//! The update is torch's `AdamW` (decoupled decay, bias-corrected, ε added after the bias
//! correction of √v), one fused loop per parameter over plain `Vec<f32>`:
//! ```text
//! t  = step + 1
//! p ← p·(1 − lr·wd)
//! m ← β1·m + (1−β1)·g          v ← β2·v + (1−β2)·g²
//! p ← p − (lr / (1−β1^t)) · m / (√v / √(1−β2^t) + ε)
//! ```
//! Moments live on the CPU whatever the parameters' device (the drafters train on the CPU here).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Format tag written into the state file's metadata.
const STATE_FORMAT: &str = "specauf-adamw-v1";

#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    #[error(
        "parameter {name} got no gradient: it is not connected to the loss (an op without backward, \
         a detached tensor, or a frozen branch); fix the graph, or set skip_missing_grads = true"
    )]
    MissingGradient { name: String },
    #[error(
        "parameter {name} is {dtype:?}; AdamW keeps f32 master weights, so load the drafter in f32"
    )]
    NotF32 { name: String, dtype: DType },
    #[error("parameter name {0:?} is given twice; names key the optimizer state")]
    DuplicateName(String),
    #[error(
        "global gradient norm is {norm}; the step was not taken (skip this batch or lower the lr)"
    )]
    NonFiniteGradNorm { norm: f64 },
    #[error("optimizer setting {name} = {value} is invalid: {hint}")]
    BadConfig {
        name: &'static str,
        value: f64,
        hint: &'static str,
    },
    #[error("optimizer state {path}: {reason}")]
    State { path: PathBuf, reason: String },
    #[error("writing optimizer state {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tensor operation failed in the optimizer: {0}")]
    Candle(#[from] candle_core::Error),
}

// The optimizer defaults (SpecForge's DFlash recipe, see the module doc), defined once: the
// serde defaults and `Default` impls of [`AdamWConfig`] and [`ScheduleConfig`] below, and the
// training config's `optim` section (`super::config::OptimSpec`), all take them from here.
// Weight decay and the minimum lr default to 0 everywhere.

/// Peak learning rate.
pub const DEFAULT_LR: f64 = 6e-4;
/// AdamW β1 (torch's default).
pub const DEFAULT_BETA1: f64 = 0.9;
/// AdamW β2 (torch's default).
pub const DEFAULT_BETA2: f64 = 0.999;
/// AdamW ε (torch's default).
pub const DEFAULT_EPS: f64 = 1e-8;
/// Global L2 gradient-norm clip.
pub const DEFAULT_MAX_GRAD_NORM: f64 = 1.0;
/// Fraction of the steps spent in linear warmup.
pub const DEFAULT_WARMUP_RATIO: f64 = 0.04;

pub(crate) fn default_lr() -> f64 {
    DEFAULT_LR
}
pub(crate) fn default_beta1() -> f64 {
    DEFAULT_BETA1
}
pub(crate) fn default_beta2() -> f64 {
    DEFAULT_BETA2
}
pub(crate) fn default_eps() -> f64 {
    DEFAULT_EPS
}
/// The clip as the training config writes it (a plain number; [`AdamWConfig`] takes an Option).
pub(crate) fn default_clip() -> f64 {
    DEFAULT_MAX_GRAD_NORM
}
fn default_max_grad_norm() -> Option<f64> {
    Some(DEFAULT_MAX_GRAD_NORM)
}
pub(crate) fn default_warmup_ratio() -> f64 {
    DEFAULT_WARMUP_RATIO
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    /// Peak learning rate (the schedule scales it). Default 6e-4.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Default 0.9.
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    /// Default 0.999.
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    /// Default 1e-8.
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Decoupled weight decay. Default 0.
    #[serde(default)]
    pub weight_decay: f64,
    /// Global L2 grad-norm clip; None disables. Default 1.0.
    #[serde(default = "default_max_grad_norm")]
    pub max_grad_norm: Option<f64>,
    /// Leave parameters without a gradient untouched instead of failing. Default false: a missing
    /// gradient usually means an op silently dropped it.
    #[serde(default)]
    pub skip_missing_grads: bool,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: default_lr(),
            beta1: default_beta1(),
            beta2: default_beta2(),
            eps: default_eps(),
            weight_decay: 0.0,
            max_grad_norm: default_max_grad_norm(),
            skip_missing_grads: false,
        }
    }
}

impl AdamWConfig {
    pub fn validate(&self) -> Result<(), OptimError> {
        let bad = |name, value, hint| Err(OptimError::BadConfig { name, value, hint });
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad("lr", self.lr, "use a finite lr ≥ 0 (6e-4 by default)");
        }
        if !(0.0..1.0).contains(&self.beta1) {
            return bad(
                "beta1",
                self.beta1,
                "beta1 must lie in [0, 1) (0.9 by default)",
            );
        }
        if !(0.0..1.0).contains(&self.beta2) {
            return bad(
                "beta2",
                self.beta2,
                "beta2 must lie in [0, 1) (0.999 by default)",
            );
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad("eps", self.eps, "eps must be positive (1e-8 by default)");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(
                "weight_decay",
                self.weight_decay,
                "weight_decay must be ≥ 0 (0 by default)",
            );
        }
        if let Some(c) = self.max_grad_norm {
            if !(c.is_finite() && c > 0.0) {
                return bad(
                    "max_grad_norm",
                    c,
                    "use a positive clip (1.0) or null to disable clipping",
                );
            }
        }
        Ok(())
    }
}

/// How the learning rate moves from its peak after the warmup (`optim.schedule` of the training
/// config). Every shape starts with the same linear warmup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleShape {
    /// Half a cosine from the peak to the minimum (SpecForge's `CosineAnnealingWarmupLR`).
    #[default]
    Cosine,
    /// A straight line from the peak to the minimum (HF Trainer's `linear`).
    Linear,
    /// The peak, held to the end (HF Trainer's `constant_with_warmup`).
    Constant,
}

impl ScheduleShape {
    pub fn is_cosine(&self) -> bool {
        *self == ScheduleShape::Cosine
    }
}

/// Learning-rate schedule settings (the peak lr is [`AdamWConfig::lr`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Fraction of the total steps spent in linear warmup. Default 0.04.
    #[serde(default = "default_warmup_ratio")]
    pub warmup_ratio: f64,
    /// Learning rate at the end of the decay. Default 0.
    #[serde(default)]
    pub min_lr: f64,
    /// The decay after the warmup. Default cosine.
    #[serde(default)]
    pub shape: ScheduleShape,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            warmup_ratio: default_warmup_ratio(),
            min_lr: 0.0,
            shape: ScheduleShape::Cosine,
        }
    }
}

/// Linear warmup, then the [`ScheduleShape`]'s decay: step s (0-based, the s-th optimizer step)
/// uses `base·(s+1)/W` for s < W, then, with t = (s−W)/(T−W) clamped to [0, 1] and
/// W = ⌊warmup_ratio·T⌋: cosine `min + (base−min)·(1 + cos(π·t))/2`, linear
/// `base + (min−base)·t`, constant `base`. Past T it holds the end value.
#[derive(Clone, Debug, PartialEq)]
pub struct LrSchedule {
    pub base_lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub shape: ScheduleShape,
}

impl LrSchedule {
    /// The schedule for `total_steps` optimizer steps peaking at `base_lr`.
    pub fn new(base_lr: f64, total_steps: u64, config: &ScheduleConfig) -> Self {
        let ratio = config.warmup_ratio.clamp(0.0, 1.0);
        LrSchedule {
            base_lr,
            min_lr: config.min_lr,
            warmup_steps: (ratio * total_steps as f64).floor() as u64,
            total_steps,
            shape: config.shape,
        }
    }

    /// A constant learning rate (no warmup, no decay).
    pub fn constant(lr: f64) -> Self {
        LrSchedule {
            base_lr: lr,
            min_lr: lr,
            warmup_steps: 0,
            total_steps: 0,
            shape: ScheduleShape::Constant,
        }
    }

    /// Learning rate of the optimizer step with 0-based index `step`.
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.base_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps);
        if decay_steps == 0 {
            return self.base_lr;
        }
        let t = (step - self.warmup_steps).min(decay_steps) as f64 / decay_steps as f64;
        match self.shape {
            ScheduleShape::Cosine => self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()),
            ScheduleShape::Linear => self.base_lr + (self.min_lr - self.base_lr) * t,
            ScheduleShape::Constant => self.base_lr,
        }
    }
}

/// What one optimizer step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// Global L2 norm of the gradients before clipping.
    pub grad_norm: f64,
    /// Factor the gradients were multiplied by (1 when not clipped).
    pub clip_scale: f64,
    pub lr: f64,
}

struct Param {
    name: String,
    var: Var,
    m: Vec<f32>,
    v: Vec<f32>,
}

/// AdamW over named variables, with its learning-rate schedule: the step count is the state that
/// drives both, so a resumed run continues the schedule where it stopped.
pub struct AdamW {
    config: AdamWConfig,
    schedule: LrSchedule,
    params: Vec<Param>,
    step: u64,
}

/// The resumable state: moments per parameter and the step count.
#[derive(Clone, Debug, PartialEq)]
pub struct OptimState {
    pub step: u64,
    /// name → (first moment, second moment), flattened f32.
    pub moments: HashMap<String, (Vec<f32>, Vec<f32>)>,
}

fn grad_vec(grads: &GradStore, var: &Var) -> Result<Option<Vec<f32>>, OptimError> {
    match grads.get(var.as_tensor()) {
        None => Ok(None),
        Some(g) => Ok(Some(
            g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
        )),
    }
}

/// Elements per task of the update and of the gradient norm's partial sums. Fixed, so that the
/// norm's summation order (and its bits) do not depend on the number of threads.
const UPDATE_CHUNK: usize = 1 << 14;

/// Σ x² in f64: partial sums over fixed chunks, each over eight interleaved accumulators (so the
/// loop vectorizes), added in chunk order.
fn sum_of_squares(g: &[f32]) -> f64 {
    let partial: Vec<f64> = g
        .par_chunks(UPDATE_CHUNK)
        .map(|chunk| {
            let mut acc = [0f64; 8];
            let mut lanes = chunk.chunks_exact(8);
            for x in &mut lanes {
                for (a, &xi) in acc.iter_mut().zip(x) {
                    *a += f64::from(xi) * f64::from(xi);
                }
            }
            for (a, &xi) in acc.iter_mut().zip(lanes.remainder()) {
                *a += f64::from(xi) * f64::from(xi);
            }
            acc.iter().sum::<f64>()
        })
        .collect();
    partial.iter().sum()
}

/// One step's AdamW constants (f32, as the update runs).
struct UpdateConsts {
    b1: f32,
    b2: f32,
    one_b1: f32,
    one_b2: f32,
    eps: f32,
    /// The clip factor (1 when not clipped: x · 1 is x, bit for bit).
    scale: f32,
    step_size: f32,
    inv_sqrt_bias2: f32,
    decay: f32,
}

impl UpdateConsts {
    /// The decoupled-weight-decay Adam update of one slice, in place: torch.optim.AdamW's order of
    /// operations. Written over zipped slices, without index checks, so that it vectorizes.
    #[inline]
    fn update(&self, w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        for (((w, &g), m), v) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            let gi = g * self.scale;
            let mi = self.b1 * *m + self.one_b1 * gi;
            let vi = self.b2 * *v + self.one_b2 * gi * gi;
            *m = mi;
            *v = vi;
            let denom = vi.sqrt() * self.inv_sqrt_bias2 + self.eps;
            *w = *w * self.decay - self.step_size * mi / denom;
        }
    }
}

impl AdamW {
    /// Optimizer over `params` (name, variable); names key the saved state. The schedule's peak is
    /// usually `config.lr`: `LrSchedule::new(config.lr, total_steps, &ScheduleConfig::default())`.
    pub fn new(
        params: Vec<(String, Var)>,
        config: AdamWConfig,
        schedule: LrSchedule,
    ) -> Result<Self, OptimError> {
        config.validate()?;
        let mut seen = HashSet::new();
        let mut out = Vec::with_capacity(params.len());
        for (name, var) in params {
            if !seen.insert(name.clone()) {
                return Err(OptimError::DuplicateName(name));
            }
            if var.dtype() != DType::F32 {
                return Err(OptimError::NotF32 {
                    name,
                    dtype: var.dtype(),
                });
            }
            let n = var.elem_count();
            out.push(Param {
                name,
                var,
                m: vec![0.0; n],
                v: vec![0.0; n],
            });
        }
        Ok(AdamW {
            config,
            schedule,
            params: out,
            step: 0,
        })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    pub fn schedule(&self) -> &LrSchedule {
        &self.schedule
    }

    /// Replaces the schedule (a run cut short by its time budget decays over its new length);
    /// the step count, and so the position in the new schedule, stays.
    pub fn set_schedule(&mut self, schedule: LrSchedule) {
        self.schedule = schedule;
    }

    /// The learning rate the next [`AdamW::step`] will use.
    pub fn current_lr(&self) -> f64 {
        self.schedule.lr(self.step)
    }

    /// Steps taken so far (the index of the next step).
    pub fn step_count(&self) -> u64 {
        self.step
    }

    pub fn param_names(&self) -> impl Iterator<Item = &str> {
        self.params.iter().map(|p| p.name.as_str())
    }

    /// Global L2 norm over all parameters' gradients (accumulated in f64).
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64, OptimError> {
        let mut sq = 0.0f64;
        for p in &self.params {
            if let Some(g) = grads.get(p.var.as_tensor()) {
                sq += f64::from(
                    g.to_dtype(DType::F32)?
                        .sqr()?
                        .sum_all()?
                        .to_scalar::<f32>()?,
                );
            }
        }
        Ok(sq.sqrt())
    }

    /// One AdamW step at the schedule's learning rate, after clipping the global grad norm. On a
    /// non-finite norm nothing changes and an error is returned.
    pub fn step(&mut self, grads: &GradStore) -> Result<StepStats, OptimError> {
        let lr = self.current_lr();
        self.step_with_lr(grads, lr)
    }

    /// [`AdamW::step`] at an explicit learning rate (the schedule is bypassed, the step still counts).
    pub fn step_with_lr(&mut self, grads: &GradStore, lr: f64) -> Result<StepStats, OptimError> {
        let mut gs = Vec::with_capacity(self.params.len());
        let mut sq = 0.0f64;
        for p in &self.params {
            let g = grad_vec(grads, &p.var)?;
            match &g {
                Some(g) => sq += sum_of_squares(g),
                None if self.config.skip_missing_grads => {}
                None => {
                    return Err(OptimError::MissingGradient {
                        name: p.name.clone(),
                    })
                }
            }
            gs.push(g);
        }
        let grad_norm = sq.sqrt();
        if !grad_norm.is_finite() {
            return Err(OptimError::NonFiniteGradNorm { norm: grad_norm });
        }
        // torch.nn.utils.clip_grad_norm_: scale by max / (norm + 1e-6) when that is below 1.
        let clip_scale = match self.config.max_grad_norm {
            Some(max) => (max / (grad_norm + 1e-6)).min(1.0),
            None => 1.0,
        };

        let t = self.step + 1;
        let c = &self.config;
        let bias1 = 1.0 - c.beta1.powf(t as f64);
        let bias2 = 1.0 - c.beta2.powf(t as f64);
        let k = UpdateConsts {
            b1: c.beta1 as f32,
            b2: c.beta2 as f32,
            one_b1: (1.0 - c.beta1) as f32,
            one_b2: (1.0 - c.beta2) as f32,
            eps: c.eps as f32,
            scale: clip_scale as f32,
            step_size: (lr / bias1) as f32,
            inv_sqrt_bias2: (1.0 / bias2.sqrt()) as f32,
            decay: (1.0 - lr * c.weight_decay) as f32,
        };
        for (p, g) in self.params.iter_mut().zip(gs) {
            let Some(g) = g else { continue };
            let t = p.var.as_tensor();
            let mut w = t.flatten_all()?.to_vec1::<f32>()?;
            // Element by element, so the split over threads changes no bit.
            w.par_chunks_mut(UPDATE_CHUNK)
                .zip(g.par_chunks(UPDATE_CHUNK))
                .zip(p.m.par_chunks_mut(UPDATE_CHUNK))
                .zip(p.v.par_chunks_mut(UPDATE_CHUNK))
                .for_each(|(((w, g), m), v)| k.update(w, g, m, v));
            p.var.set(&Tensor::from_vec(w, t.shape(), t.device())?)?;
        }
        self.step += 1;
        Ok(StepStats {
            grad_norm,
            clip_scale,
            lr,
        })
    }

    pub fn state_dict(&self) -> OptimState {
        OptimState {
            step: self.step,
            moments: self
                .params
                .iter()
                .map(|p| (p.name.clone(), (p.m.clone(), p.v.clone())))
                .collect(),
        }
    }

    /// Restores moments and step count; every parameter must be present with its size.
    pub fn load_state_dict(&mut self, state: &OptimState) -> Result<(), OptimError> {
        self.check_state(state, Path::new("<memory>"))?;
        for p in &mut self.params {
            if let Some((m, v)) = state.moments.get(&p.name) {
                p.m.clone_from(m);
                p.v.clone_from(v);
            }
        }
        self.step = state.step;
        Ok(())
    }

    fn check_state(&self, state: &OptimState, path: &Path) -> Result<(), OptimError> {
        for p in &self.params {
            let bad = |reason: String| OptimError::State {
                path: path.to_path_buf(),
                reason,
            };
            let Some((m, v)) = state.moments.get(&p.name) else {
                return Err(bad(format!(
                    "no moments for parameter {}; the state was saved for another drafter",
                    p.name
                )));
            };
            if m.len() != p.m.len() || v.len() != p.v.len() {
                return Err(bad(format!(
                    "parameter {} has {} elements but the saved moments have {}",
                    p.name,
                    p.m.len(),
                    m.len()
                )));
            }
        }
        if state.moments.len() != self.params.len() {
            let known: HashSet<&str> = self.param_names().collect();
            let extra: Vec<&String> = state
                .moments
                .keys()
                .filter(|k| !known.contains(k.as_str()))
                .collect();
            return Err(OptimError::State {
                path: path.to_path_buf(),
                reason: format!("moments for unknown parameters {extra:?}; the state belongs to another drafter"),
            });
        }
        Ok(())
    }

    /// Writes `exp_avg.<name>` / `exp_avg_sq.<name>` tensors and the step count (metadata) to a
    /// safetensors file, atomically.
    pub fn save(&self, path: &Path) -> Result<(), OptimError> {
        let io = |source| OptimError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut bytes: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for p in &self.params {
            let shape = p.var.dims().to_vec();
            for (prefix, data) in [("exp_avg", &p.m), ("exp_avg_sq", &p.v)] {
                let raw: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
                bytes.push((format!("{prefix}.{}", p.name), shape.clone(), raw));
            }
        }
        let views = bytes
            .iter()
            .map(|(name, shape, raw)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), raw)
                    .map(|v| (name.clone(), v))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| OptimError::State {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        let metadata = HashMap::from([
            ("format".to_string(), STATE_FORMAT.to_string()),
            ("step".to_string(), self.step.to_string()),
        ]);
        let data =
            safetensors::serialize(views, Some(metadata)).map_err(|e| OptimError::State {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        crate::util::fs::write_atomic(path, &data).map_err(io)
    }

    /// Reads a state written by [`AdamW::save`].
    pub fn load(&mut self, path: &Path) -> Result<(), OptimError> {
        let bad = |reason: String| OptimError::State {
            path: path.to_path_buf(),
            reason,
        };
        let data = std::fs::read(path).map_err(|source| OptimError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let st = safetensors::SafeTensors::deserialize(&data).map_err(|e| bad(e.to_string()))?;
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(&data).map_err(|e| bad(e.to_string()))?;
        let info = meta.metadata().clone().unwrap_or_default();
        match info.get("format") {
            Some(f) if f == STATE_FORMAT => {}
            other => return Err(bad(format!("format {other:?}, expected {STATE_FORMAT:?}"))),
        }
        let step = info
            .get("step")
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| bad("missing or malformed step count in the metadata".into()))?;
        let mut moments = HashMap::new();
        for p in &self.params {
            let read = |prefix: &str| -> Result<Vec<f32>, OptimError> {
                let name = format!("{prefix}.{}", p.name);
                let view = st.tensor(&name).map_err(|e| bad(format!("{name}: {e}")))?;
                if view.dtype() != safetensors::Dtype::F32 {
                    return Err(bad(format!("{name} is {:?}, expected F32", view.dtype())));
                }
                Ok(view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect())
            };
            moments.insert(p.name.clone(), (read("exp_avg")?, read("exp_avg_sq")?));
        }
        let expected = 2 * self.params.len();
        if st.len() != expected {
            return Err(bad(format!(
                "{} tensors, expected {expected}: the state belongs to another drafter",
                st.len()
            )));
        }
        let state = OptimState { step, moments };
        self.check_state(&state, path)?;
        self.load_state_dict(&state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn var(values: &[f32], shape: (usize, usize)) -> Var {
        Var::from_tensor(&Tensor::from_vec(values.to_vec(), shape, &Device::Cpu).unwrap()).unwrap()
    }

    fn grads_for(pairs: &[(&Var, &[f32])]) -> GradStore {
        let mut g = GradStore::default();
        for (v, values) in pairs {
            let t = Tensor::from_vec(values.to_vec(), v.shape(), &Device::Cpu).unwrap();
            g.insert(v.as_tensor(), t);
        }
        g
    }

    fn values(v: &Var) -> Vec<f32> {
        v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
    }

    fn adamw(params: &[(&str, &Var)], config: AdamWConfig, schedule: LrSchedule) -> AdamW {
        let params = params
            .iter()
            .map(|(n, v)| (n.to_string(), (*v).clone()))
            .collect();
        AdamW::new(params, config, schedule).unwrap()
    }

    #[test]
    fn two_steps_equal_a_hand_computed_adamw_update() {
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            max_grad_norm: None,
            ..Default::default()
        };
        let p = var(&[1.0, -2.0, 0.5, 0.0], (2, 2));
        let mut opt = adamw(&[("w", &p)], cfg, LrSchedule::constant(0.0));
        let g1 = [0.1f32, -0.3, 2.0, 0.0];
        let g2 = [-0.2f32, 0.4, 1.0, 1e-3];
        let lrs = [0.01f64, 0.005];
        opt.step_with_lr(&grads_for(&[(&p, &g1)]), lrs[0]).unwrap();
        opt.step_with_lr(&grads_for(&[(&p, &g2)]), lrs[1]).unwrap();

        // Reference in f64, written from the torch AdamW documentation.
        let (b1, b2, eps, wd) = (0.9f64, 0.999f64, 1e-8f64, 0.1f64);
        let mut w = [1.0f64, -2.0, 0.5, 0.0];
        let mut m = [0.0f64; 4];
        let mut v = [0.0f64; 4];
        for (t, (g, lr)) in [(&g1, lrs[0]), (&g2, lrs[1])].into_iter().enumerate() {
            let t = (t + 1) as i32;
            for i in 0..4 {
                let gi = g[i] as f64;
                w[i] *= 1.0 - lr * wd;
                m[i] = b1 * m[i] + (1.0 - b1) * gi;
                v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                let m_hat = m[i] / (1.0 - b1.powi(t));
                let v_hat = v[i] / (1.0 - b2.powi(t));
                w[i] -= lr * m_hat / (v_hat.sqrt() + eps);
            }
        }
        for (got, want) in values(&p).iter().zip(&w) {
            assert!((*got as f64 - want).abs() < 1e-6, "{got} vs {want}");
        }
        assert_eq!(opt.step_count(), 2);
    }

    #[test]
    fn clipping_scales_the_global_gradient_norm_to_the_limit() {
        let a = var(&[0.0, 0.0], (1, 2));
        let b = var(&[0.0], (1, 1));
        let sched = LrSchedule::constant(1e-3);
        let mut opt = adamw(&[("a", &a), ("b", &b)], AdamWConfig::default(), sched);
        // Global norm sqrt(3² + 4² + 12²) = 13 across two parameters.
        let grads = grads_for(&[(&a, &[3.0, 4.0]), (&b, &[12.0])]);
        assert!((opt.grad_norm(&grads).unwrap() - 13.0).abs() < 1e-9);
        let stats = opt.step(&grads).unwrap();
        assert_eq!(stats.lr, 1e-3);
        assert!((stats.grad_norm - 13.0).abs() < 1e-9);
        assert!((stats.clip_scale - 1.0 / (13.0 + 1e-6)).abs() < 1e-12);
        // The first moment holds (1-β1)·clipped gradient.
        let state = opt.state_dict();
        let (m_a, _) = &state.moments["a"];
        let (m_b, _) = &state.moments["b"];
        let clipped = [3.0 / 13.0, 4.0 / 13.0, 12.0 / 13.0];
        for (got, want) in m_a.iter().chain(m_b).zip(clipped) {
            assert!(
                (*got as f64 - 0.1 * want).abs() < 1e-7,
                "{got} vs {}",
                0.1 * want
            );
        }
        // Below the limit nothing is scaled.
        let small = grads_for(&[(&a, &[0.3, 0.4]), (&b, &[0.0])]);
        assert_eq!(opt.step(&small).unwrap().clip_scale, 1.0);
    }

    #[test]
    fn save_load_step_is_bit_identical_to_stepping_without_saving() {
        let init = [0.3f32, -0.7, 1.1, 0.05, -0.2, 0.9];
        let grads_seq: Vec<[f32; 6]> = (0..4)
            .map(|s| std::array::from_fn(|i| ((s * 7 + i * 3) % 11) as f32 / 5.0 - 1.0))
            .collect();
        let cfg = AdamWConfig {
            weight_decay: 0.01,
            ..Default::default()
        };
        let sched = LrSchedule::new(
            6e-4,
            4,
            &ScheduleConfig {
                warmup_ratio: 0.5,
                ..ScheduleConfig::default()
            },
        );
        let name = "layers.0.self_attn.q_proj.weight";

        let p_a = var(&init, (2, 3));
        let mut a = adamw(&[(name, &p_a)], cfg.clone(), sched.clone());
        let lrs_a: Vec<f64> = grads_seq
            .iter()
            .map(|g| a.step(&grads_for(&[(&p_a, g)])).unwrap().lr)
            .collect();

        let p_b = var(&init, (2, 3));
        let mut b = adamw(&[(name, &p_b)], cfg.clone(), sched.clone());
        let mut lrs_c: Vec<f64> = grads_seq[..2]
            .iter()
            .map(|g| b.step(&grads_for(&[(&p_b, g)])).unwrap().lr)
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("optim.safetensors");
        b.save(&path).unwrap();
        assert!(!dir.path().join("optim.safetensors.tmp").exists());

        // A fresh process: parameters come back from the model checkpoint, moments from the file.
        let p_c = var(&values(&p_b), (2, 3));
        let mut c = adamw(&[(name, &p_c)], cfg, sched);
        c.load(&path).unwrap();
        assert_eq!(c.step_count(), 2);
        for g in &grads_seq[2..] {
            lrs_c.push(c.step(&grads_for(&[(&p_c, g)])).unwrap().lr);
        }
        let bits = |v: &Var| values(v).iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&p_a), bits(&p_c));
        assert_eq!(a.state_dict(), c.state_dict());
        // The schedule resumes too: warmup, then the cosine, with no restart.
        assert_eq!(lrs_a, lrs_c);
        assert!(lrs_a[0] < lrs_a[1] && lrs_a[3] < lrs_a[2]);
    }

    #[test]
    fn a_state_for_other_parameters_is_rejected() {
        let sched = LrSchedule::constant(1e-3);
        let p = var(&[1.0, 2.0], (1, 2));
        let opt = adamw(&[("fc.weight", &p)], AdamWConfig::default(), sched.clone());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("optim.safetensors");
        opt.save(&path).unwrap();
        let q = var(&[1.0, 2.0], (1, 2));
        let mut other = adamw(
            &[("norm.weight", &q)],
            AdamWConfig::default(),
            sched.clone(),
        );
        assert!(matches!(other.load(&path), Err(OptimError::State { .. })));
        let r = var(&[1.0, 2.0, 3.0], (1, 3));
        let mut wrong_size = adamw(&[("fc.weight", &r)], AdamWConfig::default(), sched);
        assert!(matches!(
            wrong_size.load(&path),
            Err(OptimError::State { .. })
        ));
        let mut again = adamw(
            &[("fc.weight", &p)],
            AdamWConfig::default(),
            LrSchedule::constant(0.0),
        );
        assert!(matches!(
            again.load(&dir.path().join("missing.safetensors")),
            Err(OptimError::Io { .. })
        ));
    }

    #[test]
    fn a_parameter_without_gradient_is_an_error_unless_skipped() {
        let sched = LrSchedule::constant(1e-3);
        let a = var(&[1.0], (1, 1));
        let b = var(&[2.0], (1, 1));
        let grads = grads_for(&[(&a, &[0.5])]);
        let mut strict = adamw(
            &[("a", &a), ("b", &b)],
            AdamWConfig::default(),
            sched.clone(),
        );
        match strict.step(&grads) {
            Err(OptimError::MissingGradient { name }) => assert_eq!(name, "b"),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(
            values(&a),
            vec![1.0],
            "a failed step must not move any parameter"
        );
        let lenient_cfg = AdamWConfig {
            skip_missing_grads: true,
            ..Default::default()
        };
        let mut lenient = adamw(&[("a", &a), ("b", &b)], lenient_cfg, sched.clone());
        lenient.step(&grads).unwrap();
        assert_ne!(values(&a), vec![1.0]);
        assert_eq!(values(&b), vec![2.0]);
        let dup = vec![("x".to_string(), a.clone()), ("x".to_string(), b)];
        assert!(matches!(
            AdamW::new(dup, AdamWConfig::default(), sched.clone()),
            Err(OptimError::DuplicateName(_))
        ));
        let nan = grads_for(&[(&a, &[f32::NAN])]);
        let mut opt = adamw(&[("a", &a)], AdamWConfig::default(), sched);
        assert!(matches!(
            opt.step(&nan),
            Err(OptimError::NonFiniteGradNorm { .. })
        ));
        assert_eq!(opt.step_count(), 0);
    }

    #[test]
    fn schedule_warms_up_linearly_then_follows_the_cosine_to_the_minimum() {
        let s = LrSchedule::new(6e-4, 1000, &ScheduleConfig::default());
        assert_eq!(s.warmup_steps, 40);
        assert!((s.lr(0) - 6e-4 / 40.0).abs() < 1e-15);
        assert!((s.lr(19) - 6e-4 * 20.0 / 40.0).abs() < 1e-15);
        // End of warmup: the peak.
        assert!((s.lr(39) - 6e-4).abs() < 1e-15);
        assert!((s.lr(40) - 6e-4).abs() < 1e-15);
        // Middle of the cosine: half way between peak and minimum.
        assert!((s.lr(40 + 480) - 3e-4).abs() < 1e-12);
        // End: the minimum, held afterwards.
        assert!(s.lr(1000).abs() < 1e-15);
        assert!(s.lr(5000).abs() < 1e-15);
        let floor = LrSchedule::new(
            1.0,
            100,
            &ScheduleConfig {
                warmup_ratio: 0.0,
                min_lr: 0.1,
                shape: ScheduleShape::Cosine,
            },
        );
        assert!((floor.lr(0) - 1.0).abs() < 1e-12);
        assert!((floor.lr(50) - 0.55).abs() < 1e-12);
        assert!((floor.lr(100) - 0.1).abs() < 1e-12);
        // Monotone decreasing after warmup.
        assert!((40..1000).all(|t| s.lr(t + 1) <= s.lr(t)));
        assert_eq!(LrSchedule::constant(3e-4).lr(12345), 3e-4);
    }

    #[test]
    fn the_linear_and_constant_shapes_share_the_warmup_and_differ_after_it() {
        let at = |shape| LrSchedule::new(1.0, 100, &ScheduleConfig { warmup_ratio: 0.1, min_lr: 0.2, shape });
        let (cos, lin, con) = (at(ScheduleShape::Cosine), at(ScheduleShape::Linear), at(ScheduleShape::Constant));
        for s in 0..10 {
            assert_eq!(cos.lr(s), lin.lr(s));
            assert_eq!(cos.lr(s), con.lr(s));
        }
        // A quarter of the decay: the line is a quarter of the way down, the cosine less.
        assert!((lin.lr(10 + 90 / 4) - (1.0 - 0.8 * 22.0 / 90.0)).abs() < 1e-12);
        assert!(cos.lr(32) > lin.lr(32));
        assert!((lin.lr(100) - 0.2).abs() < 1e-12 && (lin.lr(500) - 0.2).abs() < 1e-12);
        assert!((10..1000).all(|s| con.lr(s) == 1.0));
        assert!((10..100).all(|s| lin.lr(s + 1) < lin.lr(s)));
    }

    #[test]
    fn the_training_config_takes_its_optimizer_defaults_from_here() {
        let spec = crate::train::config::OptimSpec::default();
        let adam = AdamWConfig::default();
        let schedule = ScheduleConfig::default();
        assert_eq!(
            (spec.lr, spec.beta1, spec.beta2, spec.eps, spec.weight_decay),
            (adam.lr, adam.beta1, adam.beta2, adam.eps, adam.weight_decay)
        );
        assert_eq!(Some(spec.clip), adam.max_grad_norm);
        assert_eq!(spec.warmup_ratio, schedule.warmup_ratio);
    }

    #[test]
    fn config_rejects_unknown_fields_and_bad_values() {
        let c: AdamWConfig = serde_json::from_str(r#"{"lr": 1e-3}"#).unwrap();
        assert_eq!(c.beta2, 0.999);
        assert_eq!(c.max_grad_norm, Some(1.0));
        assert!(serde_json::from_str::<AdamWConfig>(r#"{"learning_rate": 1e-3}"#).is_err());
        let bad = AdamWConfig {
            beta1: 1.0,
            ..Default::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(OptimError::BadConfig { name: "beta1", .. })
        ));
    }
}
