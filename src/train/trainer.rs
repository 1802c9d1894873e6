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
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use super::checkpoint::{io_err, CheckpointState, RunDir};
use super::config::{DistillSpec, TrainConfig};
use super::head::{BaseSupport, DeltaBranch, Head, HeadInput, HeadVocab, SoftTargets};
use super::objective::{BlockMetrics, MetricCounts, ResolvedObjective};
use super::optim::{AdamW, AdamWConfig, LrSchedule, ScheduleConfig};
use super::memory::MemoryShape;
use super::parallel::{all_reduce_for, thread_group, AllReduce, World};
use super::trainable::{base_ce_weight, build_drafter, trainable, CheckpointedRows, TrainableDrafter};
use crate::data::features::{target_features, FeatureCache, SoftLabels};
use crate::data::{Dataset, ModelIdentity, Split};
use crate::drafter::blocks::{build_blocks, sample_anchors, step_rng};
use crate::drafter::AnyDrafter;
use crate::model::{LoadedModel, Target};
use crate::util::pool::on_pool;
use crate::util::progress::{Progress, Silent, Unit};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Config(#[from] super::config::ConfigError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Features(#[from] crate::data::features::FeatureError),
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
    /// DFlash drafters: each block size and confidence threshold's tokens a cycle and rows
    /// verified over these blocks, were drafts cut below the threshold; the block-size choice
    /// reads the last evaluation's (`--draft-p-min`). Absent in logs written before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cuts: Vec<crate::spec::block_size::CutStat>,
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

    /// The cached top-k next-token logits of sequence `idx` (None without a cache that has them).
    pub fn soft_labels(&self, idx: usize) -> Result<Option<SoftLabels>, TrainError> {
        match &self.disk {
            Some(disk) => Ok(disk.soft_labels(idx)?),
            None => Ok(None),
        }
    }

    /// Whether the feature cache holds soft labels.
    pub fn has_soft_labels(&self) -> bool {
        self.disk.as_ref().is_some_and(|d| d.info().soft_labels.is_some())
    }

    pub fn get(&mut self, idx: usize, ids: &[u32]) -> Result<Tensor, TrainError> {
        if let Some(disk) = &self.disk {
            return Ok(disk.get(idx)?.to_dtype(DType::F32)?.to_device(self.target.device())?);
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

/// The LM head the training head scores against: the target's whole head (`head.vocab = full`),
/// or the rows of the draft vocabulary's ids (`draft`, DESIGN §7.13) with the map from token id
/// to row.
pub struct HeadWeight {
    /// (V or K, H) f32.
    pub weight: Tensor,
    /// Token id → row of `weight` (u32::MAX: no row); None for the whole head.
    label_map: Option<Vec<u32>>,
}

impl HeadWeight {
    /// The target's whole head.
    pub fn full(target: &Target) -> Result<Self, TrainError> {
        Ok(Self { weight: target.lm_head_weight_f32()?, label_map: None })
    }

    /// The head `vocab` asks for: for `draft`, every id `ranking` counts, and at least its top
    /// [`crate::drafter::DEFAULT_DRAFT_VOCAB`].
    pub fn new(target: &Target, vocab: HeadVocab, ranking: &crate::drafter::DraftVocab) -> Result<Self, TrainError> {
        match vocab {
            HeadVocab::Full => Self::full(target),
            HeadVocab::Draft => Self::draft(target, ranking, crate::drafter::DEFAULT_DRAFT_VOCAB),
        }
    }

    /// The rows of every id `ranking` counts, filled to at least `min_rows` ([`DraftVocab::top`]).
    ///
    /// [`DraftVocab::top`]: crate::drafter::DraftVocab::top
    pub fn draft(target: &Target, ranking: &crate::drafter::DraftVocab, min_rows: usize) -> Result<Self, TrainError> {
        let full = Self::full(target)?;
        if ranking.vocab_size != target.config().vocab_size {
            return Err(TrainError::Setup(format!(
                "the draft vocabulary ranks {} tokens but the target has {}",
                ranking.vocab_size,
                target.config().vocab_size
            )));
        }
        let ids = ranking.top(min_rows.max(ranking.ids.len()));
        let mut map = vec![u32::MAX; ranking.vocab_size];
        for (row, &id) in ids.iter().enumerate() {
            map[id as usize] = row as u32;
        }
        let n = ids.len();
        let idx = Tensor::from_vec(ids, (n,), full.weight.device())?;
        Ok(Self { weight: full.weight.index_select(&idx, 0)?.contiguous()?, label_map: Some(map) })
    }

    /// Rows of the head it scores.
    pub fn rows(&self) -> usize {
        self.weight.dims().first().copied().unwrap_or(0)
    }

    /// Labels as rows of `weight`; a row whose label has none is no longer supervised.
    pub fn map_labels(&self, labels: &mut [u32], valid: &mut [bool]) {
        let Some(map) = &self.label_map else { return };
        for (l, v) in labels.iter_mut().zip(valid.iter_mut()) {
            match map.get(*l as usize).copied().filter(|&r| r != u32::MAX) {
                Some(r) => *l = r,
                None => {
                    *l = 0;
                    *v = false;
                }
            }
        }
    }
}

/// Held-out block metrics of a drafter: fixed anchors (independent of the training step) over
/// the first `n` sequences of `data`.
pub fn evaluate(
    target: &Target,
    drafter: &dyn TrainableDrafter,
    objective: &ResolvedObjective,
    head: &mut Head,
    lm_head: &HeadWeight,
    data: &Dataset,
    features: &mut FeatureSource<'_>,
    n: usize,
    num_anchors: usize,
    seed: u64,
) -> Result<EvalMetrics, TrainError> {
    let layout = drafter.layout();
    let mut counts = MetricCounts::new(layout);
    let (mut loss_sum, mut loss_n) = (0f64, 0usize);
    // Per block: the drafter's confidence and correctness at positions 1, 2, ... (DFlash).
    let mut scored: Vec<Vec<(f32, bool)>> = Vec::new();
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
        let (mut labels, mut valid) = (blocks.labels.clone(), blocks.valid.clone());
        lm_head.map_labels(&mut labels, &mut valid);
        let out = head.run_every_row(
            objective,
            &HeadInput { hidden: &hidden, lm_head: &lm_head.weight, labels: &labels, valid: &valid, layout, num_sequences: 1, seed, delta, soft: None },
        )?;
        counts.merge(&out.rows.metrics);
        loss_sum += out.loss as f64;
        loss_n += 1;
        if layout.first_position == 1 && layout.positions_per_block > 0 {
            let p = layout.positions_per_block;
            let rows = &out.rows;
            for ((v, top), ok) in valid.chunks(p).zip(rows.p_top.chunks(p)).zip(rows.correct.chunks(p)) {
                let a: Vec<(f32, bool)> = v.iter().zip(top.iter().zip(ok)).take_while(|(v, _)| **v).map(|(_, (t, c))| (*t, *c)).collect();
                if !a.is_empty() {
                    scored.push(a);
                }
            }
        }
    }
    let m: BlockMetrics = counts.summary();
    Ok(EvalMetrics {
        loss: if loss_n > 0 { (loss_sum / loss_n as f64) as f32 } else { 0.0 },
        acc: m.acc,
        accept_len: m.accept_len,
        support_size: m.support_size,
        acc_per_position: m.acc_per_position,
        blocks: counts.blocks,
        cuts: crate::spec::block_size::cut_stats(&scored, drafter.block_size()),
    })
}

/// Options of one `train` invocation that are not part of the run's identity.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Continue from the latest checkpoint of the run directory.
    pub resume: bool,
    /// Stop (as if killed) after this step; for tests of resume.
    pub stop_after: Option<u64>,
    /// This process's rank among data-parallel processes (world size 1 by default).
    pub world: World,
    /// When the run should be done by (`train --max-minutes`, the quickstart's 15 minutes). The
    /// trainer times its steps and, where the config's `steps` would run past this instant,
    /// cuts the run short, its learning-rate schedule decaying over the new length
    /// ([`steps_within`]); the cut is saved with the checkpoints, so a resumed run keeps it.
    pub deadline: Option<Instant>,
}

/// Steps taken before a budget's timing window opens (the first steps fill caches).
const BUDGET_WARM_STEPS: u64 = 3;
/// A measured step time is stretched by this much when planning against a deadline (the held-out
/// evaluations, the checkpoints and the final save are not in every window alike).
pub const BUDGET_MARGIN: f64 = 1.03;

/// The number of steps a run may have so that it ends by its deadline: `done` steps taken,
/// `per_step` seconds each, `left` seconds to the deadline (negative: already past it). Never
/// more than `total`, never fewer than `done` (a run past its deadline stops where it is).
pub fn steps_within(done: u64, total: u64, per_step: f64, left: f64) -> u64 {
    if !(per_step.is_finite() && per_step > 0.0) || done >= total {
        return total.max(done);
    }
    let more = (left.max(0.0) / (per_step * BUDGET_MARGIN)).floor();
    if more >= (total - done) as f64 {
        total
    } else {
        done + more as u64
    }
}

/// When to time the steps against a deadline: the first look after a twentieth of the run (at
/// least 20 steps), then every tenth; the step time is the mean since the window opened.
struct BudgetWatch {
    deadline: Instant,
    opened: Option<(u64, Instant)>,
    open_at: u64,
    next: u64,
    every: u64,
}

impl BudgetWatch {
    fn new(deadline: Instant, start: u64, total: u64) -> Self {
        let open_at = start + BUDGET_WARM_STEPS;
        BudgetWatch { deadline, opened: None, open_at, next: open_at + (total / 20).max(20), every: (total / 10).max(20) }
    }

    /// At a step where the plan is due: (seconds per step, seconds left to the deadline).
    fn look(&mut self, step: u64) -> Option<(f64, f64)> {
        let now = Instant::now();
        if step == self.open_at {
            self.opened = Some((step, now));
        }
        let (s0, t0) = self.opened?;
        if step < self.next || step <= s0 {
            return None;
        }
        self.next = step + self.every;
        let per_step = (now - t0).as_secs_f64() / (step - s0) as f64;
        let left = match self.deadline.checked_duration_since(now) {
            Some(d) => d.as_secs_f64(),
            None => -(now - self.deadline).as_secs_f64(),
        };
        Some((per_step, left))
    }
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

/// The objective of a run, resolved for the drafter actually trained: its default decay γ
/// follows that drafter's block size, which differs from `cfg.drafter.block_size` when the run
/// starts from `init_from` or resumes a checkpoint of another shape.
/// The drafter tensors the optimizer updates: all but those `optim.freeze` names (an entry
/// freezes every tensor whose name contains it). An entry that matches nothing, or a freeze that
/// leaves nothing to train, is refused: both are a misspelt or misplaced config.
pub fn trained_vars(vars: Vec<(String, candle_core::Var)>, freeze: &[String]) -> Result<Vec<(String, candle_core::Var)>, TrainError> {
    if let Some(bad) = freeze.iter().find(|f| f.is_empty() || !vars.iter().any(|(n, _)| n.contains(f.as_str()))) {
        let examples: Vec<&str> = vars.iter().take(4).map(|(n, _)| n.as_str()).collect();
        return Err(TrainError::Setup(format!(
            "optim.freeze entry {bad:?} matches no drafter tensor; an entry freezes every tensor whose name contains it, and the names look like {}",
            examples.join(", ")
        )));
    }
    let kept: Vec<_> = vars.into_iter().filter(|(n, _)| !freeze.iter().any(|f| n.contains(f.as_str()))).collect();
    if kept.is_empty() {
        return Err(TrainError::Setup(format!("optim.freeze {freeze:?} freezes every drafter tensor: nothing would train")));
    }
    Ok(kept)
}

pub fn objective_for(cfg: &TrainConfig, drafter: &dyn TrainableDrafter) -> Result<ResolvedObjective, TrainError> {
    Ok(cfg.objective.resolve(drafter.block_size())?)
}

/// Trains a drafter as `cfg` says, writing everything under `cfg.out`; reports nothing.
pub fn train(model: &LoadedModel, cfg: &TrainConfig, opts: &RunOptions) -> Result<RunSummary, TrainError> {
    train_with(model, cfg, opts, &Silent)
}

/// [`train`], reporting each step to `progress`, as this process's rank of `opts.world`.
pub fn train_with(model: &LoadedModel, cfg: &TrainConfig, opts: &RunOptions, progress: &dyn Progress) -> Result<RunSummary, TrainError> {
    let cpu = model.target.device().is_cpu();
    train_as(model, cfg, opts, progress, all_reduce_for(opts.world, cpu)?)
}

/// Data parallel inside one process: `ranks` ranks, each a thread, reducing through shared
/// memory ([`thread_group`]); rank 0 reports to `progress` and writes the run. The result
/// equals one rank with `ranks` × `batch_sequences` within the spread of the ranks' loss
/// normalisers (`parallel`; tested). It is how the tests check data parallelism in one process;
/// for speed on a CPU, `specauf train --ranks N` runs the ranks as processes, since candle's
/// element-wise thread pool is shared by the threads of a process.
pub fn train_in_threads(model: &LoadedModel, cfg: &TrainConfig, opts: &RunOptions, ranks: usize, progress: &dyn Progress) -> Result<RunSummary, TrainError> {
    if opts.world.size > 1 {
        return Err(TrainError::Setup("ranks in threads and several processes (WORLD_SIZE) cannot be combined; use one of them".into()));
    }
    let mut results: Vec<Option<Result<RunSummary, TrainError>>> = (0..ranks).map(|_| None).collect();
    std::thread::scope(|scope| {
        for (reducer, slot) in thread_group(ranks).into_iter().zip(results.iter_mut()) {
            let rank = reducer.world().rank;
            let abort = reducer.abort_handle();
            let report: &dyn Progress = if rank == 0 { progress } else { &Silent };
            scope.spawn(move || {
                // Each rank on a compute pool of its own: a rank that blocks in a collective must
                // not be the thread that runs (steals) another rank's step, or neither finishes.
                let own = rayon::ThreadPoolBuilder::new().num_threads(1).build();
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match own {
                    Ok(pool) => pool.install(|| train_as(model, cfg, opts, report, Box::new(reducer))),
                    Err(e) => Err(TrainError::Setup(format!("rank {rank}'s thread pool: {e}"))),
                }));
                let result = run.unwrap_or_else(|p| {
                    let what = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
                    Err(TrainError::Setup(format!("data-parallel rank {rank} panicked: {}", what.unwrap_or_default())))
                });
                if result.is_err() {
                    abort.abort();
                }
                *slot = Some(result);
            });
        }
    });
    // The first rank's own error, not the "rank k stopped" of the ranks that waited for it.
    let results: Vec<Result<RunSummary, TrainError>> = results.into_iter().map(|r| r.expect("every rank ran")).collect();
    let own = |r: &Result<RunSummary, TrainError>| r.as_ref().is_err_and(|e| !e.to_string().starts_with(super::parallel::PEER_FAILED));
    let pick = results.iter().position(own).or_else(|| results.iter().position(|r| r.is_err())).unwrap_or(0);
    results.into_iter().nth(pick).expect("rank in range")
}

/// One rank's run: `reducer` says which rank of how many, and averages with the others.
fn train_as(model: &LoadedModel, cfg: &TrainConfig, opts: &RunOptions, progress: &dyn Progress, reducer: Box<dyn AllReduce>) -> Result<RunSummary, TrainError> {
    // 1. Run directory, data, drafter, optimiser (from the latest checkpoint when resuming).
    //    Rank 0 alone writes the run directory (DESIGN §7.11, `parallel`).
    let primary = reducer.world().is_primary();
    crate::util::measure::retain_freed_heap();
    let run = RunDir::open_as(cfg, opts.resume, primary)?;
    let mut state = run.start_state();
    let mut session = match Session::new(model, cfg, &run, reducer) {
        Ok(s) => s,
        Err(e) => {
            if primary {
                run.abandon();
            }
            return Err(e);
        }
    };
    if let Some(line) = session.set_batch(&mut state)? {
        progress.note(&line);
    }
    let shape = MemoryShape::of_run(&model.target, session.drafter.as_ref(), cfg, session.train_data.max_len());
    progress.note(&shape.plan().render(&model.target.backend().describe()));
    if primary {
        run.reset_metrics()?;
    }
    let eval_before = if run.latest.is_none() && primary { on_pool(|| session.held_out())? } else { None };

    // 2. The loop: one optimizer step, metrics line, checkpoint when due.
    let metrics_path = run.metrics_path();
    let mut metrics_file = match primary {
        true => Some(std::fs::OpenOptions::new().append(true).open(&metrics_path).map_err(io_err(&metrics_path))?),
        false => None,
    };
    progress.phase("train", Some(session.total), state.step, Unit::Items);
    let mut watch = opts.deadline.map(|d| BudgetWatch::new(d, state.step, session.total));
    let mut last = None;
    while state.step < session.total {
        // On a pool worker, so that candle's and our kernels' splits do not each wake and park
        // this thread (util::pool; 7–11% more tokens/s on 2 cores, same bits).
        let line = on_pool(|| session.step(&mut state))?;
        let json = serde_json::to_string(&line).map_err(|e| TrainError::Setup(e.to_string()))?;
        if let Some(f) = metrics_file.as_mut() {
            writeln!(f, "{json}").and_then(|()| f.flush()).map_err(io_err(&metrics_path))?;
        }
        state.metrics_lines += 1;
        progress.update(
            state.step,
            &format!("loss {:.3} acc {:.3} accept {:.2} {:.0} tok/s", line.loss, line.acc, line.accept_len, line.tokens_per_s),
        );
        last = Some(line);
        if let Some((per_step, left)) = watch.as_mut().and_then(|w| w.look(state.step)) {
            // Every rank plans from the same numbers, so all stop at the same step.
            let mut v = [per_step, left];
            session.reducer.mean_scalars(&mut v)?;
            let fits = steps_within(state.step, session.total, v[0], v[1]);
            if fits < session.total {
                progress.note(&format!(
                    "time budget: at {:.2} s a step the remaining {} steps would end {:.0} s after the deadline ({:.0} s from now); the run stops at step {fits} of {}, its learning rate decaying over {fits} steps",
                    v[0],
                    session.total - state.step,
                    (session.total - state.step) as f64 * v[0] * BUDGET_MARGIN - v[1],
                    v[1].max(0.0),
                    cfg.steps
                ));
                session.set_total(fits);
                state.budget_steps = Some(fits);
                progress.phase("train", Some(fits), state.step, Unit::Items);
            }
        }
        if primary && (state.step % cfg.checkpoint_every == 0 || state.step == session.total) {
            run.save(session.drafter.as_ref(), &session.optim, &state)?;
        }
        if opts.stop_after == Some(state.step) && state.step < session.total {
            progress.finish(false);
            return Ok(RunSummary { steps_done: state.step, final_dir: None, last, eval_before, eval_after: None });
        }
    }
    progress.finish(true);

    // 3. The trained drafter, in the DFlash / SpecForge format.
    let final_dir = run.out.join("final");
    if primary {
        session.drafter.save(&final_dir)?;
    }
    let eval_after = last.as_ref().and_then(|l| l.eval.clone());
    Ok(RunSummary { steps_done: state.step, final_dir: Some(final_dir), last, eval_before, eval_after })
}

/// The learning-rate schedule of a run of `total` steps under `cfg`.
fn schedule_for(cfg: &TrainConfig, total: u64) -> LrSchedule {
    LrSchedule::new(cfg.optim.lr, total, &ScheduleConfig { warmup_ratio: cfg.optim.warmup_ratio, min_lr: 0.0, shape: cfg.optim.schedule })
}

/// Everything a run holds between steps.
struct Session<'a> {
    cfg: &'a TrainConfig,
    target: &'a Target,
    train_data: Dataset,
    eval_data: Option<Dataset>,
    drafter: Box<dyn TrainableDrafter>,
    objective: ResolvedObjective,
    features: FeatureSource<'a>,
    eval_features: FeatureSource<'a>,
    lm_head: HeadWeight,
    head: Head,
    optim: AdamW,
    /// The data order of `order_epoch` (a seeded shuffle per epoch).
    order: Vec<usize>,
    order_epoch: u64,
    /// Averages gradients and the loss over the ranks (a no-op at world size 1).
    reducer: Box<dyn AllReduce>,
    /// Sequences per micro-batch on this rank ([`Session::set_batch`]).
    per_rank: usize,
    /// The run's length: the config's `steps`, or fewer where a time budget cut it.
    total: u64,
}

impl<'a> Session<'a> {
    fn new(model: &'a LoadedModel, cfg: &'a TrainConfig, run: &RunDir, reducer: Box<dyn AllReduce>) -> Result<Self, TrainError> {
        let target = &model.target;
        let train_data = Dataset::open(&cfg.data, Split::Train)?;
        let eval_data = Dataset::open(&cfg.data, Split::Eval).ok().filter(|d| d.len() > 0);
        if train_data.len() == 0 {
            return Err(TrainError::Setup(format!("{}: the training split is empty", cfg.data.display())));
        }
        let mut drafter: AnyDrafter = match &run.latest {
            Some(s) => AnyDrafter::load_for(&run.checkpoint(s.step), target)?,
            None => build_drafter(cfg, target)?,
        };
        // the draft vocabulary of this data, saved with every checkpoint (DESIGN §7.13)
        let ranking = std::sync::Arc::new(train_data.draft_vocab()?);
        drafter.set_draft_vocab(Some(ranking.clone()), crate::drafter::DEFAULT_DRAFT_VOCAB);
        if cfg.head.vocab == HeadVocab::Draft && (drafter.kind() != crate::drafter::DrafterKind::DFlash || cfg.distill.is_some()) {
            return Err(TrainError::Setup(
                "head.vocab = draft trains DFlash drafters on hard labels: Domino's correction branch and distillation's soft labels span the whole vocabulary; drop head.vocab or use head.vocab = full".into(),
            ));
        }
        let mut drafter = trainable(drafter);
        if target.device().is_cpu() && !cfg.layer_precision.runs_here() {
            return Err(TrainError::Setup(
                "layer_precision is bf16 but this CPU has no AVX512-BF16 instructions; set layer_precision to \"f32\" (the default) in the training config".into(),
            ));
        }
        drafter.set_layer_precision(cfg.layer_precision);
        let objective = objective_for(cfg, drafter.as_ref())?;
        let layer_ids = drafter.target_layer_ids();
        let disk = FeatureCache::open(&cfg.data, Split::Train, &ModelIdentity::of(model)?, &layer_ids).ok();
        let features = FeatureSource::new(target, layer_ids.clone(), disk, cfg.feature_cache_mib);
        if cfg.distill.is_some() && !features.has_soft_labels() {
            return Err(TrainError::Setup(format!(
                "distill needs the target's next-token distribution in the feature cache of {}: prepare it with                  --features {} --soft-labels K (e.g. 32), or drop distill",
                cfg.data.display(),
                layer_ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",")
            )));
        }
        let eval_features = FeatureSource::new(target, layer_ids, None, cfg.feature_cache_mib / 4);
        let adam_cfg = AdamWConfig {
            lr: cfg.optim.lr,
            beta1: cfg.optim.beta1,
            beta2: cfg.optim.beta2,
            eps: cfg.optim.eps,
            weight_decay: cfg.optim.weight_decay,
            max_grad_norm: Some(cfg.optim.clip),
            skip_missing_grads: false,
        };
        let total = run.latest.as_ref().and_then(|s| s.budget_steps).unwrap_or(cfg.steps);
        let mut optim = AdamW::new(trained_vars(drafter.named_vars(), &cfg.optim.freeze)?, adam_cfg, schedule_for(cfg, total))?;
        if let Some(s) = &run.latest {
            optim.load(&run.checkpoint(s.step).join("optimizer.safetensors"))?;
        }
        Ok(Session {
            cfg,
            target,
            train_data,
            eval_data,
            drafter,
            objective,
            features,
            eval_features,
            lm_head: HeadWeight::new(target, cfg.head.vocab, &ranking)?,
            head: Head::for_backend(cfg.head.clone(), target.backend()),
            optim,
            order: Vec::new(),
            order_epoch: u64::MAX,
            reducer,
            per_rank: cfg.batch_sequences,
            total,
        })
    }

    /// Shortens the run to `total` steps (a time budget): the schedule decays over the new length.
    fn set_total(&mut self, total: u64) {
        self.total = total;
        self.optim.set_schedule(schedule_for(self.cfg, total));
    }

    /// This rank's sequences per micro-batch: `batch_sequences`, except when resuming a run that
    /// had another number of ranks, which keeps the checkpoint's global batch so that the steps
    /// stay what they were (then a line saying so is returned). Records the global batch.
    fn set_batch(&mut self, state: &mut CheckpointState) -> Result<Option<String>, TrainError> {
        let ranks = self.reducer.world().size;
        let mut line = None;
        if let Some(global) = state.global_batch.filter(|&g| g != self.cfg.batch_sequences * ranks) {
            if !global.is_multiple_of(ranks) {
                return Err(TrainError::Setup(format!(
                    "the checkpoint's steps took {global} sequences, which {ranks} ranks cannot share evenly; resume with a number of ranks that divides {global}"
                )));
            }
            self.per_rank = global / ranks;
            line = Some(format!(
                "resuming with {ranks} rank(s): {} sequence(s) each instead of batch_sequences = {}, to keep the checkpoint's {global} per step",
                self.per_rank, self.cfg.batch_sequences
            ));
        }
        state.global_batch = Some(self.per_rank * ranks);
        Ok(line)
    }

    /// Held-out metrics, when the data has an eval split.
    fn held_out(&mut self) -> Result<Option<EvalMetrics>, TrainError> {
        let Some(d) = &self.eval_data else { return Ok(None) };
        let c = self.cfg;
        // Held out, the drafter runs as it will be served: its layers in f32.
        self.drafter.set_layer_precision(crate::nn::Precision::F32);
        let metrics = evaluate(
            self.target,
            self.drafter.as_ref(),
            &self.objective,
            &mut self.head,
            &self.lm_head,
            d,
            &mut self.eval_features,
            c.eval_sequences,
            c.num_anchors,
            c.seed,
        );
        self.drafter.set_layer_precision(c.layer_precision);
        Ok(Some(metrics?))
    }

    /// The next sequence of the seeded per-epoch order; advances the cursor.
    fn next_sequence(&mut self, state: &mut CheckpointState) -> usize {
        let n = self.train_data.len() as u64;
        let epoch = state.cursor / n;
        if epoch != self.order_epoch {
            self.order = (0..self.train_data.len()).collect();
            self.order.shuffle(&mut step_rng(self.cfg.seed ^ 0xDA7A, epoch, 0));
            self.order_epoch = epoch;
        }
        let idx = self.order[(state.cursor % n) as usize];
        state.cursor += 1;
        idx
    }

    /// One micro-batch's sequences with their anchors (drawn from (seed, step, slot)) and features.
    /// The micro-batch has `batch_sequences` slots per rank; every rank advances the cursor over
    /// all of them and takes its own ([`World::owns`]), so the ranks together read exactly what
    /// one process with world × batch_sequences would.
    fn micro_batch(&mut self, state: &mut CheckpointState, micro: usize) -> Result<Vec<BatchItem>, TrainError> {
        let c = self.cfg;
        let world = self.reducer.world();
        let global = self.per_rank * world.size;
        let mut items = Vec::with_capacity(self.per_rank);
        for (s, idx) in world.take(self.per_rank, || self.next_sequence(state)) {
            let seq = self.train_data.get(idx);
            let slot = (micro * global + s) as u64;
            let anchors = sample_anchors(&seq.loss_mask, c.num_anchors, &mut step_rng(c.seed, state.step, slot));
            if anchors.is_empty() {
                continue;
            }
            let features = self.features.get(idx, &seq.input_ids)?;
            let soft = if c.distill.is_some() { self.features.soft_labels(idx)? } else { None };
            items.push(BatchItem { seq, anchors, features, soft });
        }
        Ok(items)
    }

    /// One optimizer step over `grad_accum` micro-batches, then the held-out evaluation when due.
    fn step(&mut self, state: &mut CheckpointState) -> Result<StepMetrics, TrainError> {
        let c = self.cfg;
        let t0 = Instant::now();
        let mut grads: Option<GradStore> = None;
        let mut counts = MetricCounts::new(self.drafter.layout());
        let (mut loss, mut tokens) = (0f32, 0usize);
        for micro in 0..c.grad_accum {
            let items = self.micro_batch(state, micro)?;
            if items.is_empty() {
                continue;
            }
            let ctx = StepContext {
                target: self.target,
                drafter: self.drafter.as_ref(),
                objective: &self.objective,
                lm_head: &self.lm_head,
                seed: c.seed,
                steps: self.total,
                base_support: c.base_support,
                distill: c.distill.as_ref(),
                activation_checkpointing: c.activation_checkpointing,
            };
            let out = run_micro_batch(&ctx, &mut self.head, &items, state.step, 1.0 / c.grad_accum as f64)?;
            grads = Some(match grads {
                None => out.grads,
                Some(acc) => add_grads(acc, out.grads, &self.drafter.named_vars())?,
            });
            counts.merge(&out.counts);
            loss += out.loss / c.grad_accum as f32;
            tokens += out.tokens;
        }
        let Some(mut grads) = grads else {
            return Err(TrainError::Setup("no sequence in the batch has an anchor position; check the loss masks of the prepared data".into()));
        };
        // Data parallel: the mean over ranks of gradients, loss and metrics (world 1: unchanged).
        self.reducer.mean_grads(&mut grads, &self.drafter.named_vars())?;
        let mut m = counts.summary();
        let mut scalars = vec![f64::from(loss), f64::from(m.acc), f64::from(m.support_acc), f64::from(m.support_size), f64::from(m.accept_len), tokens as f64];
        scalars.extend(m.acc_per_position.iter().map(|&a| f64::from(a)));
        self.reducer.mean_scalars(&mut scalars)?;
        let ranks = self.reducer.world().size;
        let loss = scalars[0] as f32;
        if ranks > 1 {
            (m.acc, m.support_acc, m.support_size, m.accept_len) = (scalars[1] as f32, scalars[2] as f32, scalars[3] as f32, scalars[4] as f32);
            tokens = (scalars[5] * ranks as f64).round() as usize;
            m.acc_per_position = scalars[6..].iter().map(|&a| a as f32).collect();
        }
        let stats = self.optim.step(&grads)?;
        let secs = t0.elapsed().as_secs_f64();
        state.step += 1;
        // The held-out evaluation is the same on every rank: rank 0 alone runs it.
        let due = (c.eval_every > 0 && state.step % c.eval_every == 0) || state.step == self.total;
        let eval = if due && self.reducer.world().is_primary() { self.held_out()? } else { None };
        Ok(StepMetrics {
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
        })
    }
}

/// What one training step needs besides the batch.
pub struct StepContext<'a> {
    pub target: &'a Target,
    pub drafter: &'a dyn TrainableDrafter,
    pub objective: &'a ResolvedObjective,
    pub lm_head: &'a HeadWeight,
    pub seed: u64,
    /// Total steps of the run (Domino's λ schedule).
    pub steps: u64,
    pub base_support: BaseSupport,
    /// Distillation towards the items' soft labels (None: hard labels only).
    pub distill: Option<&'a DistillSpec>,
    /// Recompute the drafter's layers in the backward instead of keeping their activations.
    pub activation_checkpointing: bool,
}

/// One sequence of a micro-batch with its anchors and target features.
pub struct BatchItem {
    pub seq: crate::data::Sequence,
    pub anchors: Vec<usize>,
    pub features: Tensor,
    /// The target's top-k next-token logits at every position (distillation); None: hard labels.
    pub soft: Option<SoftLabels>,
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
pub fn run_micro_batch(ctx: &StepContext<'_>, head: &mut Head, items: &[BatchItem], step: u64, scale: f64) -> Result<MicroBatchOut, TrainError> {
    let drafter = ctx.drafter;
    let layout = drafter.layout();
    let t0 = Instant::now();
    let mut rows = Vec::with_capacity(items.len());
    let mut checkpointed = Vec::new();
    let mut delta_inputs = Vec::new();
    let mut delta_weight = None;
    let (mut labels, mut valid) = (Vec::new(), Vec::new());
    let mut soft = SoftRows::default();
    for item in items {
        let blocks = build_blocks(&item.seq.input_ids, &item.seq.loss_mask, &item.anchors, drafter.block_size(), layout, drafter.mask_token_id());
        if ctx.activation_checkpointing {
            let r = drafter.train_rows_checkpointed(ctx.target, &item.features, &blocks)?.ok_or_else(|| {
                TrainError::Setup("activation_checkpointing is implemented for DFlash drafters only; drop it for this drafter".into())
            })?;
            rows.push(r.values.clone());
            checkpointed.push(r);
        } else {
            let r = drafter.train_rows(ctx.target, &item.features, &blocks)?;
            rows.push(r.hidden);
            if let Some((input, weight)) = r.delta {
                delta_inputs.push(input);
                delta_weight = Some(weight);
            }
        }
        labels.extend_from_slice(&blocks.labels);
        valid.extend_from_slice(&blocks.valid);
        if let Some(d) = ctx.distill {
            soft_rows(item, &blocks, layout.positions_per_block, d.temperature, &mut soft)?;
        }
    }
    ctx.lm_head.map_labels(&mut labels, &mut valid);
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
        &HeadInput { hidden: &values, lm_head: &ctx.lm_head.weight, labels: &labels, valid: &valid, layout, num_sequences: items.len(), seed: ctx.seed ^ step, delta, soft: soft.targets(ctx.distill) },
    )?;
    let t2 = Instant::now();
    let grads = if checkpointed.is_empty() {
        let surrogate = (head_out.surrogate(&hidden, delta_graph.as_ref().map(|(i, w)| (i, w)))? * scale)?;
        surrogate.backward()?
    } else {
        checkpointed_backward(checkpointed, &head_out.grad_hidden, scale)?
    };
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

/// The backward of a checkpointed micro-batch: each sequence's rows get their slice of dL/dh and
/// recompute their layers; the per-variable sums come back as a gradient store (through the
/// surrogate Σ var ⊙ grad, whose gradient w.r.t. each variable is that sum).
fn checkpointed_backward(items: Vec<CheckpointedRows<'_>>, grad_hidden: &Tensor, scale: f64) -> Result<GradStore, TrainError> {
    let mut sums: Vec<(Var, Tensor)> = Vec::new();
    let mut r0 = 0;
    for item in items {
        let n = item.values.dim(0)?;
        let g = grad_hidden.narrow(0, r0, n)?;
        r0 += n;
        for (var, grad) in item.backward(&g)? {
            match sums.iter_mut().find(|(v, _)| v.as_tensor().id() == var.as_tensor().id()) {
                Some((_, acc)) => *acc = (&*acc + &grad)?,
                None => sums.push((var, grad)),
            }
        }
    }
    let pairs: Vec<(&Tensor, Tensor)> = sums.iter().map(|(v, g)| Ok((v.as_tensor(), (g * scale)?))).collect::<Result<_, TrainError>>()?;
    let refs: Vec<(&Tensor, &Tensor)> = pairs.iter().map(|(v, g)| (*v, g)).collect();
    Ok(super::head::surrogate_loss(&refs)?.backward()?)
}

/// The distillation targets of a micro-batch's rows, k per row.
#[derive(Default)]
struct SoftRows {
    k: usize,
    ids: Vec<u32>,
    probs: Vec<f32>,
}

impl SoftRows {
    fn targets(&self, distill: Option<&DistillSpec>) -> Option<SoftTargets<'_>> {
        let d = distill?;
        (self.k > 0).then_some(SoftTargets { k: self.k, ids: &self.ids, probs: &self.probs, weight: d.weight })
    }
}

/// Appends the soft targets of `blocks`' rows: the row predicting token t gets the target's
/// distribution at position t − 1; rows past the sequence's end get zeros (they are invalid, so
/// the head never reads them).
fn soft_rows(item: &BatchItem, blocks: &crate::drafter::blocks::Blocks, p: usize, temperature: f32, out: &mut SoftRows) -> Result<(), TrainError> {
    let Some(s) = &item.soft else {
        return Err(TrainError::Setup("distill is set but a sequence has no soft labels in the feature cache".into()));
    };
    if out.k != 0 && out.k != s.k {
        return Err(TrainError::Setup(format!("the feature cache holds soft labels of k = {} and {}; prepare the data again", out.k, s.k)));
    }
    out.k = s.k;
    for &a in &blocks.anchors {
        for i in 0..p {
            let t = a + 1 + i;
            if t < item.seq.len() && t - 1 < s.len() {
                out.ids.extend_from_slice(s.ids(t - 1));
                out.probs.extend(s.probs(t - 1, temperature));
            } else {
                out.ids.extend(std::iter::repeat_n(0, s.k));
                out.probs.extend(std::iter::repeat_n(0.0, s.k));
            }
        }
    }
    Ok(())
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


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_keeps_the_steps_that_fit_with_the_margin() {
        // 100 s left at 1 s a step: 100 / 1.03 → 97 more steps.
        assert_eq!(steps_within(10, 1000, 1.0, 100.0), 107);
        // room for everything: the config's steps, never more
        assert_eq!(steps_within(10, 50, 1.0, 100.0), 50);
        // past the deadline: stop where the run is
        assert_eq!(steps_within(10, 1000, 1.0, -5.0), 10);
        // a step time that cannot be planned with leaves the run alone
        assert_eq!(steps_within(10, 1000, 0.0, 100.0), 1000);
        assert_eq!(steps_within(10, 1000, f64::NAN, 100.0), 1000);
        // already done
        assert_eq!(steps_within(60, 50, 1.0, 100.0), 60);
    }

    #[test]
    fn the_watch_opens_after_the_warm_steps_and_looks_every_tenth_of_the_run() {
        let mut w = BudgetWatch::new(Instant::now() + std::time::Duration::from_secs(60), 0, 1000);
        let looks: Vec<u64> = (1..=200).filter(|&s| w.look(s).is_some()).collect();
        // opens at 3; first look 3 + 1000/20 = 53, then every 100
        assert_eq!(looks, vec![53, 153]);
        let mut w = BudgetWatch::new(Instant::now(), 7, 60);
        let first = (8..=60).find(|&s| w.look(s).is_some());
        assert_eq!(first, Some(7 + 3 + 20), "a resumed run opens its window after its own warm steps");
    }
}
