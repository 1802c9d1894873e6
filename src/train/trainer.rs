//! The training loop: data → features → blocks → drafter → head/objective → optimizer.
//!
//! One step: for each of `grad_accum` micro-batches, take `batch_sequences` sequences in a
//! seeded per-epoch order, draw anchors (redrawn every step), run the drafter's training
//! forward, and hand all rows of the micro-batch to the chunked head, which returns the loss and
//! dL/dh; a surrogate Σ h⊙dL/dh backpropagates through the drafter. The optimizer steps once
//! per step. Every random choice is a function of (seed, step, slot) and the data order a
//! function of (seed, epoch), so a run resumed from a checkpoint continues exactly as the
//! uninterrupted run would have.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use super::blocks::{build_blocks, sample_anchors, step_rng, Blocks};
use super::config::TrainConfig;
use super::data::{Dataset, Split};
use super::features::{target_features, FeatureCache};
use super::head::{BaseSupport, ChunkedHead, DeltaBranch, HeadInput};
use super::objective::{BlockLayout, BlockMetrics, MetricCounts, ResolvedObjective};
use super::optim::{AdamW, AdamWConfig, CosineSchedule, ScheduleConfig};
use crate::drafter::dflash::{DFlashDrafter, DFlashInitConfig};
use crate::drafter::domino::{is_domino_checkpoint, DominoDrafter, DominoInitConfig};
use crate::model::{LoadedModel, Target};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Config(#[from] super::config::ConfigError),
    #[error(transparent)]
    Data(#[from] super::data::DataError),
    #[error(transparent)]
    Features(#[from] super::features::FeatureError),
    #[error(transparent)]
    Drafter(#[from] crate::drafter::DrafterError),
    #[error(transparent)]
    Objective(#[from] super::objective::ObjectiveError),
    #[error(transparent)]
    Head(#[from] super::head::HeadError),
    #[error(transparent)]
    Optim(#[from] super::optim::OptimError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io { path: path.display().to_string(), source }
}

/// One line of RUN/metrics.jsonl.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepMetrics {
    pub step: u64,
    pub loss: f32,
    /// Token accuracy on the shared block mask (all valid positions).
    pub acc: f32,
    pub support_acc: f32,
    pub support_size: f32,
    pub accept_len: f32,
    pub acc_per_position: Vec<f32>,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    /// Supervised rows (blocks × predicted positions) this step.
    pub tokens: usize,
    /// Held-out metrics, on the steps that evaluate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<EvalMetrics>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalMetrics {
    pub loss: f32,
    pub acc: f32,
    pub accept_len: f32,
    pub support_size: f32,
    pub acc_per_position: Vec<f32>,
    pub blocks: usize,
}

/// What a checkpoint records besides weights and optimizer state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct CheckpointState {
    step: u64,
    /// Sequences consumed so far (the data cursor).
    cursor: u64,
    /// Lines of metrics.jsonl that belong to steps ≤ step.
    metrics_lines: usize,
    config_hash: String,
}

/// What a drafter's training forward hands to the head.
pub struct TrainRows {
    /// (rows, H) final hidden of the predicted positions, in the autograd graph.
    pub hidden: Tensor,
    /// Domino's correction branch: its last bias-free Linear's input (rows, E), in the graph,
    /// and that Linear's weight (V, E) (the Var's tensor). None for DFlash.
    pub delta: Option<(Tensor, Tensor)>,
}

/// A drafter the trainer can train. DFlash and Domino share everything else.
pub trait TrainableDrafter {
    fn layout(&self) -> BlockLayout;
    fn block_size(&self) -> usize;
    fn mask_token_id(&self) -> u32;
    fn target_layer_ids(&self) -> Vec<usize>;
    fn named_vars(&self) -> Vec<(String, Var)>;
    fn train_rows(&self, target: &Target, features: &Tensor, blocks: &Blocks) -> Result<TrainRows, TrainError>;
    fn save(&self, dir: &Path) -> Result<(), TrainError>;
    /// Domino: predicted indices below this use the base logits only (pure_draft_prefix_len).
    fn base_only_prefix(&self) -> usize {
        0
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
    fn train_rows(&self, target: &Target, features: &Tensor, blocks: &Blocks) -> Result<TrainRows, TrainError> {
        let hidden = self.forward_train(target, features, &blocks.anchors, &blocks.block_ids)?;
        Ok(TrainRows { hidden: self.predicted_rows(&hidden)?, delta: None })
    }
    fn save(&self, dir: &Path) -> Result<(), TrainError> {
        Ok(DFlashDrafter::save(self, dir)?)
    }
}

/// Builds the drafter a config asks for: from `init_from`, or fresh for the target.
pub fn build_drafter(cfg: &TrainConfig, target: &Target) -> Result<Box<dyn TrainableDrafter>, TrainError> {
    let spec = &cfg.drafter;
    if let Some(dir) = &spec.init_from {
        let domino = is_domino_checkpoint(dir)?;
        if domino != (spec.kind == "domino") {
            return Err(TrainError::Setup(format!(
                "drafter.kind is {:?} but init_from {} holds a {} checkpoint; set drafter.kind to match it",
                spec.kind,
                dir.display(),
                if domino { "domino" } else { "dflash" }
            )));
        }
        return load_drafter(dir, target);
    }
    let mut init = DFlashInitConfig::new(spec.layers, spec.block_size, spec.mask_token_id.unwrap_or_else(|| default_mask_token(target)));
    init.target_layer_ids = spec.target_layer_ids.clone();
    let drafter: Box<dyn TrainableDrafter> = match spec.kind.as_str() {
        "dflash" => Box::new(DFlashDrafter::init_random(target.config(), &init, cfg.seed)?),
        "domino" => {
            let mut init = DominoInitConfig::new(init);
            init.gru_hidden_dim = spec.gru_hidden_dim;
            init.emb_dim = spec.emb_dim;
            Box::new(DominoDrafter::init_random(target.config(), &init, cfg.seed)?)
        }
        other => return Err(TrainError::Setup(format!("drafter.kind {other:?} is unknown; use \"dflash\" or \"domino\""))),
    };
    init_final_norm_from_target(&drafter.named_vars(), target, drafter.mask_token_id())?;
    Ok(drafter)
}

/// Loads a drafter checkpoint as the kind its config.json names (Domino or DFlash).
pub fn load_drafter(dir: &Path, target: &Target) -> Result<Box<dyn TrainableDrafter>, TrainError> {
    Ok(if is_domino_checkpoint(dir)? {
        Box::new(DominoDrafter::load(dir, target.config())?)
    } else {
        Box::new(DFlashDrafter::load(dir, target.config())?)
    })
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

/// The MASK token when a config does not name one: Qwen3's unused 151669 where the vocabulary
/// has it, else id 16 (SmolLM2's `<empty_output>`, which never occurs in text; ASSETS.md).
pub fn default_mask_token(target: &Target) -> u32 {
    if target.config().vocab_size > 151_669 {
        151_669
    } else {
        16
    }
}

/// Target features of sequences: from the prepared cache on disk when it has the right layers,
/// else computed online and kept in memory (f16) up to a budget.
pub struct FeatureSource<'a> {
    target: &'a Target,
    layer_ids: Vec<usize>,
    disk: Option<FeatureCache>,
    memory: HashMap<usize, Tensor>,
    budget_bytes: usize,
    used_bytes: usize,
}

impl<'a> FeatureSource<'a> {
    pub fn new(target: &'a Target, layer_ids: Vec<usize>, disk: Option<FeatureCache>, budget_mib: usize) -> Self {
        Self { target, layer_ids, disk, memory: HashMap::new(), budget_bytes: budget_mib << 20, used_bytes: 0 }
    }

    pub fn get(&mut self, idx: usize, ids: &[u32]) -> Result<Tensor, TrainError> {
        if let Some(disk) = &self.disk {
            return Ok(disk.get(idx)?.to_dtype(DType::F32)?);
        }
        if let Some(t) = self.memory.get(&idx) {
            return Ok(t.to_dtype(DType::F32)?);
        }
        // Features are always rounded through f16, whether they were just computed or come from
        // memory: a resumed run (empty memory) then sees exactly what the uninterrupted run saw.
        let f16 = target_features(self.target, ids, &self.layer_ids)?.to_dtype(DType::F16)?;
        let f = f16.to_dtype(DType::F32)?;
        let bytes = f16.elem_count() * 2;
        if self.used_bytes + bytes <= self.budget_bytes {
            self.memory.insert(idx, f16);
            self.used_bytes += bytes;
        }
        Ok(f)
    }
}

/// Held-out block metrics of a drafter: fixed anchors (independent of the training step) over
/// the first `n` sequences of `data`.
pub fn evaluate(
    target: &Target,
    drafter: &dyn TrainableDrafter,
    objective: &ResolvedObjective,
    head: &mut ChunkedHead,
    lm_head: &Tensor,
    data: &Dataset,
    features: &mut FeatureSource<'_>,
    n: usize,
    num_anchors: usize,
    seed: u64,
) -> Result<EvalMetrics, TrainError> {
    let layout = drafter.layout();
    let mut counts = MetricCounts::new(layout);
    let (mut loss_sum, mut loss_n) = (0f64, 0usize);
    for i in 0..n.min(data.len()) {
        let seq = data.get(i);
        let anchors = sample_anchors(&seq.loss_mask, num_anchors, &mut step_rng(seed ^ 0xE7A1, 0, i as u64));
        if anchors.is_empty() {
            continue;
        }
        let blocks = build_blocks(&seq.input_ids, &seq.loss_mask, &anchors, drafter.block_size(), layout, drafter.mask_token_id());
        let feats = features.get(i, &seq.input_ids)?;
        let rows = drafter.train_rows(target, &feats, &blocks)?;
        let hidden = rows.hidden.detach();
        let delta_vals = rows.delta.as_ref().map(|(i, w)| (i.detach(), w.detach()));
        let delta = delta_vals.as_ref().map(|(input, weight)| DeltaBranch {
            input,
            weight,
            base_ce_weight: 0.0,
            base_only_prefix: drafter.base_only_prefix(),
            base_support: BaseSupport::default(),
        });
        let out = head.run(
            objective,
            &HeadInput { hidden: &hidden, lm_head, labels: &blocks.labels, valid: &blocks.valid, layout, num_sequences: 1, seed, delta },
        )?;
        counts.merge(&out.rows.metrics);
        loss_sum += out.loss as f64;
        loss_n += 1;
    }
    let m: BlockMetrics = counts.summary();
    Ok(EvalMetrics {
        loss: if loss_n > 0 { (loss_sum / loss_n as f64) as f32 } else { 0.0 },
        acc: m.acc,
        accept_len: m.accept_len,
        support_size: m.support_size,
        acc_per_position: m.acc_per_position,
        blocks: counts.blocks,
    })
}

/// Options of one `train` invocation that are not part of the run's identity.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Continue from the latest checkpoint of the run directory.
    pub resume: bool,
    /// Stop (as if killed) after this step; for tests of resume.
    pub stop_after: Option<u64>,
    /// Show a progress bar.
    pub progress: bool,
}

/// What a finished (or stopped) run returns.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub steps_done: u64,
    pub final_dir: Option<PathBuf>,
    pub last: Option<StepMetrics>,
    pub eval_before: Option<EvalMetrics>,
    pub eval_after: Option<EvalMetrics>,
}

fn config_hash(cfg: &TrainConfig) -> String {
    let text = serde_json::to_string(cfg).unwrap_or_default();
    format!("{:016x}", crate::train::sharegpt::fnv1a64(text.as_bytes()))
}

/// [`crate::fsutil::write_atomic`] with this module's error.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    crate::fsutil::write_atomic(path, bytes).map_err(io_err(path))
}

/// Trains a drafter as `cfg` says, writing everything under `cfg.out`.
pub fn train(model: &LoadedModel, cfg: &TrainConfig, opts: &RunOptions) -> Result<RunSummary, TrainError> {
    let target = &model.target;
    let out = &cfg.out;
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let cfg_path = out.join("config.json");
    let hash = config_hash(cfg);
    let cfg_json = serde_json::to_string_pretty(cfg).map_err(|e| TrainError::Setup(e.to_string()))?;
    let ckpt_root = out.join("checkpoints");
    let latest_path = ckpt_root.join("latest.json");
    if cfg_path.exists() && !opts.resume {
        return Err(TrainError::Setup(format!(
            "{} already holds a run; pass --resume to continue it, or choose another --out",
            out.display()
        )));
    }
    if opts.resume && cfg_path.exists() {
        let saved = std::fs::read_to_string(&cfg_path).map_err(io_err(&cfg_path))?;
        let saved: TrainConfig = serde_json::from_str(&saved).map_err(|e| TrainError::Setup(format!("{}: {e}", cfg_path.display())))?;
        if config_hash(&saved) != hash {
            return Err(TrainError::Setup(format!(
                "--resume: the config differs from the one saved in {}; resume with the same config or start a new --out",
                cfg_path.display()
            )));
        }
    }
    write_atomically(&cfg_path, cfg_json.as_bytes())?;

    // 1. Data and the drafter.
    let train_data = Dataset::open(&cfg.data, Split::Train)?;
    let eval_data = Dataset::open(&cfg.data, Split::Eval).ok().filter(|d| d.len() > 0);
    if train_data.len() == 0 {
        return Err(TrainError::Setup(format!("{}: the training split is empty", cfg.data.display())));
    }
    let objective = cfg.objective.resolve(cfg.drafter.block_size)?;
    let mut state = CheckpointState { step: 0, cursor: 0, metrics_lines: 0, config_hash: hash.clone() };
    let latest = if opts.resume && latest_path.exists() {
        let text = std::fs::read_to_string(&latest_path).map_err(io_err(&latest_path))?;
        let s: CheckpointState = serde_json::from_str(&text).map_err(|e| TrainError::Setup(format!("{}: {e}", latest_path.display())))?;
        Some(s)
    } else {
        None
    };
    let drafter: Box<dyn TrainableDrafter> = match &latest {
        Some(s) => load_drafter(&ckpt_dir(&ckpt_root, s.step), target)?,
        None => build_drafter(cfg, target)?,
    };
    let layout = drafter.layout();
    let layer_ids = drafter.target_layer_ids();
    let disk = FeatureCache::open(&cfg.data, Split::Train, &model_identity(model)?, &layer_ids).ok();
    let mut features = FeatureSource::new(target, layer_ids.clone(), disk, cfg.feature_cache_mib);
    let mut eval_features = FeatureSource::new(target, layer_ids, None, cfg.feature_cache_mib / 4);
    let lm_head = target.lm_head_weight_f32()?;
    let mut head = ChunkedHead::new(cfg.head.clone());
    let adam_cfg = AdamWConfig {
        lr: cfg.optim.lr,
        beta1: cfg.optim.beta1,
        beta2: cfg.optim.beta2,
        eps: cfg.optim.eps,
        weight_decay: cfg.optim.weight_decay,
        max_grad_norm: Some(cfg.optim.clip),
        skip_missing_grads: false,
    };
    let schedule = CosineSchedule::new(cfg.optim.lr, cfg.steps, &ScheduleConfig { warmup_ratio: cfg.optim.warmup_ratio, min_lr: 0.0 });
    let mut optim = AdamW::new(drafter.named_vars(), adam_cfg, schedule)?;
    let metrics_path = out.join("metrics.jsonl");
    if let Some(s) = &latest {
        optim.load(&ckpt_dir(&ckpt_root, s.step).join("optimizer.safetensors"))?;
        truncate_lines(&metrics_path, s.metrics_lines)?;
        state = s.clone();
    } else {
        std::fs::write(&metrics_path, b"").map_err(io_err(&metrics_path))?;
    }
    let eval_before = match (&eval_data, latest.is_none()) {
        (Some(d), true) => Some(evaluate(target, drafter.as_ref(), &objective, &mut head, &lm_head, d, &mut eval_features, cfg.eval_sequences, cfg.num_anchors, cfg.seed)?),
        _ => None,
    };

    // 2. The loop.
    let pb = if opts.progress {
        let pb = indicatif::ProgressBar::new(cfg.steps);
        pb.set_style(
            indicatif::ProgressStyle::with_template("train [{bar:30}] {pos}/{len} {msg} ({elapsed}, eta {eta})")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        pb.set_position(state.step);
        pb
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut metrics_file = std::fs::OpenOptions::new().append(true).open(&metrics_path).map_err(io_err(&metrics_path))?;
    let n_train = train_data.len() as u64;
    let mut order_epoch = u64::MAX;
    let mut order: Vec<usize> = Vec::new();
    let mut last = None;
    while state.step < cfg.steps {
        let step = state.step;
        let t0 = Instant::now();
        let mut grads: Option<GradStore> = None;

        let mut counts = MetricCounts::new(layout);
        let mut loss = 0f32;
        let mut tokens = 0usize;
        let ctx = StepContext { target, drafter: drafter.as_ref(), objective: &objective, lm_head: &lm_head, seed: cfg.seed, steps: cfg.steps, base_support: cfg.base_support };
        for micro in 0..cfg.grad_accum {
            let mut items = Vec::with_capacity(cfg.batch_sequences);
            for s in 0..cfg.batch_sequences {
                let epoch = state.cursor / n_train;
                if epoch != order_epoch {
                    order = (0..train_data.len()).collect();
                    order.shuffle(&mut step_rng(cfg.seed ^ 0xDA7A, epoch, 0));
                    order_epoch = epoch;
                }
                let idx = order[(state.cursor % n_train) as usize];
                state.cursor += 1;
                let seq = train_data.get(idx);
                let slot = (micro * cfg.batch_sequences + s) as u64;
                let anchors = sample_anchors(&seq.loss_mask, cfg.num_anchors, &mut step_rng(cfg.seed, step, slot));
                if anchors.is_empty() {
                    continue;
                }
                let feats = features.get(idx, &seq.input_ids)?;
                items.push(BatchItem { seq, anchors, features: feats });
            }
            if items.is_empty() {
                continue;
            }
            let out = run_micro_batch(&ctx, &mut head, &items, step, 1.0 / cfg.grad_accum as f64)?;
            grads = Some(match grads {
                None => out.grads,
                Some(acc) => add_grads(acc, out.grads, &drafter.named_vars())?,
            });
            counts.merge(&out.counts);
            loss += out.loss / cfg.grad_accum as f32;
            tokens += out.tokens;
        }
        let Some(grads) = grads else {
            return Err(TrainError::Setup("no sequence in the batch has an anchor position; check the loss masks of the prepared data".into()));
        };
        let stats = optim.step(&grads)?;
        let secs = t0.elapsed().as_secs_f64();
        let m = counts.summary();
        state.step += 1;
        let eval = match &eval_data {
            Some(d) if (cfg.eval_every > 0 && state.step % cfg.eval_every == 0) || state.step == cfg.steps => {
                Some(evaluate(target, drafter.as_ref(), &objective, &mut head, &lm_head, d, &mut eval_features, cfg.eval_sequences, cfg.num_anchors, cfg.seed)?)
            }
            _ => None,
        };
        let line = StepMetrics {
            step: state.step,
            loss,
            acc: m.acc,
            support_acc: m.support_acc,
            support_size: m.support_size,
            accept_len: m.accept_len,
            acc_per_position: m.acc_per_position.clone(),
            lr: stats.lr,
            grad_norm: stats.grad_norm,
            tokens_per_s: tokens as f64 / secs,
            tokens,
            eval,
        };
        let json = serde_json::to_string(&line).map_err(|e| TrainError::Setup(e.to_string()))?;
        writeln!(metrics_file, "{json}").map_err(io_err(&metrics_path))?;
        metrics_file.flush().map_err(io_err(&metrics_path))?;
        state.metrics_lines += 1;
        pb.set_position(state.step);
        pb.set_message(format!("loss {:.3} acc {:.3} accept {:.2} {:.0} tok/s", line.loss, line.acc, line.accept_len, line.tokens_per_s));
        last = Some(line);
        if state.step % cfg.checkpoint_every == 0 || state.step == cfg.steps {
            save_checkpoint(&ckpt_root, drafter.as_ref(), &optim, &state)?;
        }
        if opts.stop_after == Some(state.step) && state.step < cfg.steps {
            pb.abandon();
            return Ok(RunSummary { steps_done: state.step, final_dir: None, last, eval_before, eval_after: None });
        }
    }
    pb.finish();
    let final_dir = out.join("final");
    drafter.save(&final_dir)?;
    let eval_after = last.as_ref().and_then(|l| l.eval.clone());
    Ok(RunSummary { steps_done: state.step, final_dir: Some(final_dir), last, eval_before, eval_after })
}

/// What one training step needs besides the batch.
pub struct StepContext<'a> {
    pub target: &'a Target,
    pub drafter: &'a dyn TrainableDrafter,
    pub objective: &'a ResolvedObjective,
    pub lm_head: &'a Tensor,
    pub seed: u64,
    /// Total steps of the run (Domino's λ schedule).
    pub steps: u64,
    pub base_support: BaseSupport,
}

/// One sequence of a micro-batch with its anchors and target features.
pub struct BatchItem {
    pub seq: super::data::Sequence,
    pub anchors: Vec<usize>,
    pub features: Tensor,
}

/// Loss, gradients and metrics of one micro-batch, with where the time went.
pub struct MicroBatchOut {
    pub loss: f32,
    pub grads: GradStore,
    pub counts: MetricCounts,
    /// Supervised rows.
    pub tokens: usize,
    pub forward_ms: f64,
    pub head_ms: f64,
    pub backward_ms: f64,
}

/// Forward of every sequence, one head call over all rows (so the objective normalises over
/// the whole micro-batch), and the backward of the surrogate scaled by `scale`.
pub fn run_micro_batch(ctx: &StepContext<'_>, head: &mut ChunkedHead, items: &[BatchItem], step: u64, scale: f64) -> Result<MicroBatchOut, TrainError> {
    let drafter = ctx.drafter;
    let layout = drafter.layout();
    let t0 = Instant::now();
    let mut rows = Vec::with_capacity(items.len());
    let mut delta_inputs = Vec::new();
    let mut delta_weight = None;
    let (mut labels, mut valid) = (Vec::new(), Vec::new());
    for item in items {
        let blocks = build_blocks(&item.seq.input_ids, &item.seq.loss_mask, &item.anchors, drafter.block_size(), layout, drafter.mask_token_id());
        let r = drafter.train_rows(ctx.target, &item.features, &blocks)?;
        rows.push(r.hidden);
        if let Some((input, weight)) = r.delta {
            delta_inputs.push(input);
            delta_weight = Some(weight);
        }
        labels.extend_from_slice(&blocks.labels);
        valid.extend_from_slice(&blocks.valid);
    }
    let hidden = Tensor::cat(&rows, 0)?;
    let values = hidden.detach();
    let delta_graph = match (delta_inputs.is_empty(), &delta_weight) {
        (false, Some(w)) => Some((Tensor::cat(&delta_inputs, 0)?, w.clone())),
        _ => None,
    };
    let delta_vals = delta_graph.as_ref().map(|(i, w)| (i.detach(), w.detach()));
    let delta = delta_vals.as_ref().map(|(input, weight)| DeltaBranch {
        input,
        weight,
        base_ce_weight: base_ce_weight(step, ctx.steps),
        base_only_prefix: drafter.base_only_prefix(),
        base_support: ctx.base_support,
    });
    let t1 = Instant::now();
    let head_out = head.run(
        ctx.objective,
        &HeadInput { hidden: &values, lm_head: ctx.lm_head, labels: &labels, valid: &valid, layout, num_sequences: items.len(), seed: ctx.seed ^ step, delta },
    )?;
    let t2 = Instant::now();
    let surrogate = (head_out.surrogate(&hidden, delta_graph.as_ref().map(|(i, w)| (i, w)))? * scale)?;
    let grads = surrogate.backward()?;
    let t3 = Instant::now();
    Ok(MicroBatchOut {
        loss: head_out.loss,
        grads,
        counts: head_out.rows.metrics.clone(),
        tokens: labels.len(),
        forward_ms: (t1 - t0).as_secs_f64() * 1e3,
        head_ms: (t2 - t1).as_secs_f64() * 1e3,
        backward_ms: (t3 - t2).as_secs_f64() * 1e3,
    })
}

/// Sums two gradient stores over the drafter's variables.
fn add_grads(mut acc: GradStore, new: GradStore, vars: &[(String, Var)]) -> Result<GradStore, TrainError> {
    for (_, var) in vars {
        if let Some(g) = new.get(var.as_tensor()) {
            let sum = match acc.get(var.as_tensor()) {
                Some(old) => (old + g)?,
                None => g.clone(),
            };
            acc.insert(var.as_tensor(), sum);
        }
    }
    Ok(acc)
}

fn ckpt_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!("step-{step:06}"))
}

/// Weights, optimizer state and the cursor, then `latest.json` last: a kill at any moment
/// leaves the previous checkpoint valid.
fn save_checkpoint(root: &Path, drafter: &dyn TrainableDrafter, optim: &AdamW, state: &CheckpointState) -> Result<(), TrainError> {
    let dir = ckpt_dir(root, state.step);
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    drafter.save(&dir)?;
    optim.save(&dir.join("optimizer.safetensors"))?;
    let json = serde_json::to_string_pretty(state).map_err(|e| TrainError::Setup(e.to_string()))?;
    write_atomically(&dir.join("state.json"), json.as_bytes())?;
    write_atomically(&root.join("latest.json"), json.as_bytes())?;
    // Keep the two newest checkpoints.
    if let Ok(entries) = std::fs::read_dir(root) {
        let mut steps: Vec<u64> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_prefix("step-")).and_then(|n| n.parse().ok()))
            .collect();
        steps.sort_unstable();
        for s in steps.iter().rev().skip(2) {
            let _ = std::fs::remove_dir_all(ckpt_dir(root, *s));
        }
    }
    Ok(())
}

fn truncate_lines(path: &Path, keep: usize) -> Result<(), TrainError> {
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    let lines: Vec<String> = std::io::BufReader::new(file).lines().take(keep).collect::<Result<_, _>>().map_err(io_err(path))?;
    let mut text = lines.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    write_atomically(path, text.as_bytes())
}

fn model_identity(model: &LoadedModel) -> Result<super::data::ModelIdentity, TrainError> {
    Ok(super::data::ModelIdentity::of(model)?)
}
