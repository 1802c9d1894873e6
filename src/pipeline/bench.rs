//! Benchmarks as typed plans and typed results (the CLI prints them): the target's prefill,
//! decode and verify speed with batched-decode steps, and the drafter's training step per
//! objective. Medians of several runs after one warm-up run; not timed tests.

use std::path::PathBuf;
use std::time::Instant;

use super::stages::{load, StageError};
use crate::nn::DeviceChoice;
use crate::data::features::target_features;
use crate::data::Sequence;
use crate::drafter::blocks::{sample_anchors, step_rng};
use crate::drafter::{default_mask_token, DFlashDrafter};
use crate::model::{BatchItem, Logits, Target, WeightsMode};
use crate::train::head::{BaseSupport, Head, HeadConfig, Precision, HeadVocab};
use crate::train::objective::Objective;
use crate::train::optim::{AdamW, AdamWConfig, LrSchedule, ScheduleConfig, DEFAULT_LR};
use crate::train::trainable::TrainableDrafter;
use crate::train::trainer::{run_micro_batch, BatchItem as TrainItem, HeadWeight, StepContext, TrainError};
use crate::util::measure::{median, ms, peak_rss_mib, reset_peak_rss};
use crate::util::progress::Progress;


fn train_err(e: impl Into<TrainError>) -> StageError {
    StageError::Train(e.into())
}

/// What `bench decode` measures.
#[derive(Debug, Clone)]
pub struct DecodePlan {
    pub model: String,
    pub weights: Vec<WeightsMode>,
    pub runs: usize,
    /// Prompt length for prefill, and the context at which decode and verify are timed.
    pub context: usize,
    /// Tokens in the verify forward.
    pub verify: usize,
    /// Decode steps per run.
    pub steps: usize,
    /// Batch sizes of the batched-decode steps.
    pub batches: Vec<usize>,
    pub device: DeviceChoice,
}

/// One weights mode's figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DecodeRow {
    pub weights: WeightsMode,
    pub load_s: f64,
    pub prefill_tokens_per_s: f64,
    pub decode_ms: f64,
    pub verify_ms: f64,
    pub peak_rss_mib: Option<f64>,
    /// (B, median ms of one step that decodes one token of each of B sequences).
    pub batched: Vec<(usize, f64)>,
}

pub fn decode(plan: &DecodePlan, progress: &dyn Progress) -> Result<Vec<DecodeRow>, StageError> {
    if plan.runs == 0 || plan.context == 0 || plan.verify == 0 || plan.steps == 0 || plan.batches.contains(&0) {
        return Err(StageError::Invalid("--runs, --context, --verify, --steps and every --batches value must be at least 1".into()));
    }
    let mut rows = Vec::new();
    for &mode in &plan.weights {
        progress.note(&format!("bench decode: {mode} weights"));
        reset_peak_rss();
        let t = Instant::now();
        let m = load(&plan.model, mode, plan.device)?;
        let load_s = t.elapsed().as_secs_f64();
        let target = &m.target;
        let vocab = target.config().vocab_size as u32;
        // A fixed, ordinary-looking token sequence (ids spread over the vocabulary).
        let prompt: Vec<u32> = (0..plan.context as u32).map(|i| (i * 7919 + 1000) % vocab).collect();
        let block: Vec<u32> = (0..plan.verify as u32).map(|i| (i * 104_729 + 77) % vocab).collect();
        let (prefill, decode_ms, verify_ms) = single_stream(target, &prompt, &block, plan).map_err(train_err)?;
        let peak_rss_mib = peak_rss_mib();
        let batched = batched_decode(target, &prompt, &block, plan).map_err(train_err)?;
        rows.push(DecodeRow { weights: mode, load_s, prefill_tokens_per_s: prefill, decode_ms, verify_ms, peak_rss_mib, batched });
    }
    Ok(rows)
}

/// (prefill tokens/s, ms per decode step, ms per verify forward), medians over the runs.
fn single_stream(target: &Target, prompt: &[u32], block: &[u32], plan: &DecodePlan) -> Result<(f64, f64, f64), crate::model::ModelError> {
    let (mut prefill, mut step, mut verify) = (Vec::new(), Vec::new(), Vec::new());
    // One warm-up run (page faults, packing of quantized weights), then the timed runs.
    for run in 0..=plan.runs {
        let mut cache = target.new_cache();
        let t = Instant::now();
        target.forward(prompt, &mut cache, &[], Logits::Last)?;
        let p = t.elapsed();
        let mut steps = Vec::new();
        for s in 0..plan.steps {
            cache.truncate(plan.context);
            let t = Instant::now();
            target.forward(&[block[s % block.len()]], &mut cache, &[], Logits::Last)?;
            steps.push(ms(t.elapsed()));
        }
        cache.truncate(plan.context);
        let t = Instant::now();
        target.forward(block, &mut cache, &[], Logits::All)?;
        let v = t.elapsed();
        if run > 0 {
            prefill.push(plan.context as f64 / p.as_secs_f64());
            step.push(median(&mut steps));
            verify.push(ms(v));
        }
    }
    Ok((median(&mut prefill), median(&mut step), median(&mut verify)))
}

/// Median ms of one batched decode step for each B: B caches prefilled with `prompt`, each step
/// one token per sequence through one `forward_batch` (last logits).
fn batched_decode(target: &Target, prompt: &[u32], block: &[u32], plan: &DecodePlan) -> Result<Vec<(usize, f64)>, crate::model::ModelError> {
    let mut prefilled = target.new_cache();
    target.forward(prompt, &mut prefilled, &[], Logits::None)?;
    let mut rows = Vec::new();
    for &b in &plan.batches {
        let mut caches: Vec<_> = (0..b).map(|_| prefilled.clone()).collect();
        let mut steps = Vec::new();
        // The first step is a warm-up (cache growth, page faults).
        for s in 0..=plan.steps {
            let tokens: Vec<[u32; 1]> = (0..b).map(|i| [block[(s + i) % block.len()]]).collect();
            let mut items: Vec<BatchItem> = caches
                .iter_mut()
                .zip(&tokens)
                .map(|(cache, t)| {
                    cache.truncate(plan.context);
                    BatchItem { tokens: t, cache, taps: &[], logits: Logits::Last }
                })
                .collect();
            let t = Instant::now();
            target.forward_batch(&mut items)?;
            if s > 0 {
                steps.push(ms(t.elapsed()));
            }
        }
        rows.push((b, median(&mut steps)));
    }
    Ok(rows)
}

/// What `bench train` measures: one DFlash training step at a shape, per objective.
#[derive(Debug, Clone)]
pub struct TrainBenchPlan {
    pub model: String,
    /// A trained drafter instead of a fresh one (AUF's support, and so its cost, depends on
    /// how often the drafter is right).
    pub drafter: Option<PathBuf>,
    pub layers: usize,
    pub block_size: usize,
    pub anchors: usize,
    pub seq_len: usize,
    pub objectives: Vec<String>,
    pub runs: usize,
    pub device: DeviceChoice,
    /// Recompute the drafter's layers in the backward (`activation_checkpointing`).
    pub activation_checkpointing: bool,
    /// The head's vocabulary (`head.vocab`); `draft` scores the lowest
    /// [`crate::drafter::DEFAULT_DRAFT_VOCAB`] ids (there is no data to rank them by).
    pub head_vocab: HeadVocab,
    /// The precision of the head's products (`head.precision`).
    pub head_precision: Precision,
    /// The precision of the drafter layers' linears (`layer_precision`).
    pub layer_precision: Precision,
}

/// The shape measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainBenchShape {
    pub layers: usize,
    pub block_size: usize,
    pub parameters: usize,
    pub anchors: usize,
    pub seq_len: usize,
    pub threads: usize,
    /// The precision the head's products ran in on this CPU: "bf16" or "f32" (the generic head:
    /// the backend's compute dtype).
    pub head_products: String,
    /// The precision the drafter layers' linears ran in: "bf16" or "f32" (the generic path: the
    /// backend's compute dtype).
    pub layer_products: String,
}

/// One objective's step, medians.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainBenchRow {
    pub objective: String,
    pub step_ms: f64,
    pub supervised_tokens_per_s: f64,
    pub forward_ms: f64,
    pub head_ms: f64,
    pub backward_ms: f64,
    pub support_per_block: f64,
    pub peak_rss_mib: Option<f64>,
}

pub fn train(plan: &TrainBenchPlan) -> Result<(TrainBenchShape, Vec<TrainBenchRow>), StageError> {
    if plan.runs == 0 || plan.anchors == 0 || plan.seq_len < 4 {
        return Err(StageError::Invalid("--runs and --anchors must be at least 1 and --seq-len at least 4".into()));
    }
    // The allocator policy of a training run (`train` sets the same), so a step costs here what
    // it costs there.
    crate::util::measure::retain_freed_heap();
    let m = load(&plan.model, WeightsMode::default(), plan.device)?;
    let target = &m.target;
    // A real text repeated to the sequence length: the last three quarters are supervised.
    let text = "Speculative decoding lets a small drafter propose several tokens that the target then verifies in one forward pass. ";
    let mut ids = m.tokenizer.encode(&text.repeat(1 + plan.seq_len / 16), false).map_err(|e| StageError::Invalid(e.to_string()))?;
    ids.truncate(plan.seq_len);
    if ids.len() < plan.seq_len {
        return Err(StageError::Invalid(format!("could not build a {}-token sequence", plan.seq_len)));
    }
    let mask: Vec<u8> = (0..ids.len()).map(|i| u8::from(i >= ids.len() / 4)).collect();
    // The precisions the products run in: as asked on the CPU (refused where it cannot), the
    // backend's compute dtype on the generic path.
    let cpu = matches!(target.backend().path(), crate::nn::KernelPath::Cpu);
    if cpu {
        crate::train::head::use_bf16(plan.head_precision).map_err(train_err)?;
        if !plan.layer_precision.runs_here() {
            return Err(StageError::Invalid("--layer-precision bf16 needs AVX512-BF16, which this CPU lacks; use f32".into()));
        }
    }
    let generic = format!("{:?}", target.backend().compute_dtype()).to_lowercase();
    let new_drafter = || -> Result<DFlashDrafter, StageError> {
        let d = match &plan.drafter {
            Some(dir) => DFlashDrafter::load(dir, target.config()),
            None => DFlashDrafter::init_random_for(target.config(), plan.layers, plan.block_size, default_mask_token(target.config()), 0),
        };
        let mut d = d.map_err(train_err)?;
        d.set_layer_precision(plan.layer_precision);
        Ok(d)
    };
    let probe = new_drafter()?;
    let features = target_features(target, &ids, probe.target_layer_ids()).map_err(train_err)?;
    let unranked = crate::drafter::DraftVocab::from_counts(&vec![0; target.config().vocab_size], "bench train");
    let lm_head = HeadWeight::new(target, plan.head_vocab, &unranked).map_err(train_err)?;
    let shape = TrainBenchShape {
        layers: probe.config().num_hidden_layers,
        block_size: TrainableDrafter::block_size(&probe),
        parameters: probe.config().num_parameters(),
        anchors: plan.anchors,
        seq_len: plan.seq_len,
        threads: rayon::current_num_threads(),
        head_products: if cpu { plan.head_precision.to_string() } else { generic.clone() },
        layer_products: if cpu { plan.layer_precision.to_string() } else { generic },
    };
    let mut rows = Vec::new();
    for name in &plan.objectives {
        let objective: Objective = name.parse().map_err(|e| StageError::Invalid(format!("objective {name:?}: {e}")))?;
        let drafter = new_drafter()?;
        let resolved = objective.resolve(TrainableDrafter::block_size(&drafter)).map_err(train_err)?;
        let mut head = Head::for_backend(HeadConfig { vocab: plan.head_vocab, precision: plan.head_precision, ..HeadConfig::default() }, target.backend());
        let schedule = LrSchedule::new(DEFAULT_LR, 1000, &ScheduleConfig::default());
        let mut optim = AdamW::new(TrainableDrafter::named_vars(&drafter), AdamWConfig::default(), schedule).map_err(train_err)?;
        let ctx = StepContext { target, drafter: &drafter, objective: &resolved, lm_head: &lm_head, seed: 0, steps: 1000, base_support: BaseSupport::default(), distill: None, activation_checkpointing: plan.activation_checkpointing };
        reset_peak_rss();
        let (mut step_ms, mut fwd, mut hd, mut bwd, mut support, mut rate) = (vec![], vec![], vec![], vec![], vec![], vec![]);
        for run in 0..=plan.runs {
            let anchors = sample_anchors(&mask, plan.anchors, &mut step_rng(0, run as u64, 0));
            let items = [TrainItem { seq: Sequence { input_ids: ids.clone(), loss_mask: mask.clone() }, anchors, features: features.clone(), soft: None }];
            let t = Instant::now();
            // On a pool worker, as the trainer runs its steps (util::pool).
            let out = crate::util::pool::on_pool(|| -> Result<_, StageError> {
                let out = run_micro_batch(&ctx, &mut head, &items, run as u64, 1.0)?;
                optim.step(&out.grads).map_err(train_err)?;
                Ok(out)
            })?;
            let total = ms(t.elapsed());
            if run > 0 {
                step_ms.push(total);
                fwd.push(out.forward_ms);
                hd.push(out.head_ms);
                bwd.push(out.backward_ms);
                support.push(out.counts.summary().support_size as f64);
                rate.push(out.tokens as f64 / (total / 1e3));
            }
        }
        rows.push(TrainBenchRow {
            objective: name.clone(),
            step_ms: median(&mut step_ms),
            supervised_tokens_per_s: median(&mut rate),
            forward_ms: median(&mut fwd),
            head_ms: median(&mut hd),
            backward_ms: median(&mut bwd),
            support_per_block: median(&mut support),
            peak_rss_mib: peak_rss_mib(),
        });
    }
    Ok((shape, rows))
}

/// Median ms of one decode step and of one forward of each `verifies` size, at `context`
/// tokens of a fixed token sequence: `steps` decode steps per run, one warm-up run then `runs`.
pub(crate) fn step_costs(target: &Target, context: usize, verifies: &[usize], steps: usize, runs: usize) -> Result<(f64, Vec<f64>), crate::model::ModelError> {
    let vocab = target.config().vocab_size as u32;
    let prompt: Vec<u32> = (0..context as u32).map(|i| (i * 7919 + 1000) % vocab).collect();
    let longest = verifies.iter().copied().max().unwrap_or(1).max(1);
    let block: Vec<u32> = (0..longest as u32).map(|i| (i * 104_729 + 77) % vocab).collect();
    let mut cache = target.new_cache();
    target.forward(&prompt, &mut cache, &[], Logits::None)?;
    let mut step = Vec::new();
    let mut verify: Vec<Vec<f64>> = vec![Vec::new(); verifies.len()];
    for run in 0..=runs {
        for s in 0..steps {
            cache.truncate(context);
            let t = Instant::now();
            target.forward(&[block[s % block.len()]], &mut cache, &[], Logits::Last)?;
            if run > 0 {
                step.push(ms(t.elapsed()));
            }
        }
        for (i, &b) in verifies.iter().enumerate() {
            cache.truncate(context);
            let t = Instant::now();
            target.forward(&block[..b], &mut cache, &[], Logits::All)?;
            if run > 0 {
                verify[i].push(ms(t.elapsed()));
            }
        }
    }
    Ok((median(&mut step), verify.iter_mut().map(|v| median(v)).collect()))
}
