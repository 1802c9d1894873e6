//! The LM head and weighted cross-entropy, chunked, with a hand-written gradient.
//!
//! The drafter's final hidden rows `h` (N, H) meet the target's frozen LM head `W` (V, H). Logits
//! for all rows at once would be N × V floats (7680 rows × 151k vocab = 4.6 GB for the paper's
//! batch), so this module never materialises them, and never puts them in an autograd graph:
//!
//! 1. For each chunk of whole blocks: logits = h_chunk · Wᵀ into a reused buffer; per row, in one
//!    read (a blocked online softmax in plain Rust): max, argmax, Σexp → CE, correctness, p_gold.
//! 2. The objective turns the chunk's statistics into weights block by block (every weight rule is
//!    block-local; only the normaliser is global, and the gradient is linear in 1/normaliser).
//! 3. Still in the chunk, for **support rows only** (w > 0): G = w·(softmax − onehot(label)), and
//!    dL/dh rows = G · W, with the softmax recomputed from the logits and the row statistics. Rows
//!    with w = 0 are skipped entirely, which is AUF's saving: the gradient is identical to the full
//!    computation because those rows contribute exactly zero.
//! 4. After the last chunk, the loss and gradients are divided by the normaliser.
//!
//! Under AUF with the argmax failure rule (and DFlash), step 1 scores only the rows that can have
//! a weight: position by position, each block's rows up to its first failure
//! ([`ResolvedObjective::stops_at_first_failure`]; `Scratch::logits_until_failure`). The loss and
//! gradient are those of scoring every row; the rows left out read as wrong in the batch's
//! `acc` metrics. `head.score_every_row` turns this off; held-out evaluation always scores every
//! row ([`Head::run_every_row`]).
//!
//! Each chunk costs one (c × H × V) product forward and one (s × V × H) backward, s = support rows:
//! the minimum. Weights are detached, as in SpecForge: D-PACE's dependence of w on p_gold carries no
//! gradient. The products call the `gemm` crate directly (the kernel candle's CPU matmul uses,
//! with its AVX-512 path) so that the logits land in buffers reused across chunks and steps instead
//! of a fresh zeroed allocation per chunk.
//!
//! # Getting the gradient into the drafter
//! The trainer runs the drafter with autograd up to `h_graph` (N, H), passes `h_graph.detach()`
//! here, and then calls backward on the surrogate `Σ h_graph ⊙ grad_hidden`
//! ([`HeadOutput::surrogate`], [`surrogate_loss`]): its gradient w.r.t. every drafter weight is
//! exactly dL/dθ by the chain rule. The surrogate's value means nothing; log [`HeadOutput::loss`].
//!
//! # Row layout
//! Rows are block-major as in [`BlockLayout`]: row `b·P + i` is predicted index `i` of block `b`.
//! Chunks hold whole blocks (`chunk_rows` is rounded down to a multiple of P).
//!
//! # Domino
//! Domino's final logits are base logits plus a delta from a trainable branch whose last layer is a
//! bias-free Linear: delta = a · W₂ᵀ with a (N, E) the branch's activations and W₂ (V, E). Give both in
//! [`DeltaBranch`]; the head computes final = base + delta chunk by chunk and the loss
//! (1-λ)·CE_final + λ·CE_base, and returns dL/da (N, E) and dL/dW₂ (V, E) beside dL/dh. The surrogate
//! then covers all three: `Σ h⊙g_h + Σ a⊙g_a + Σ W₂⊙g_W₂`. Predicted indices below
//! `base_only_prefix` get base logits only (Domino's `pure_draft_prefix_len`).
//!
//! # Code layout
//! [`ChunkedHead::run`] reads as its numbered steps; each lives in a submodule:
//! `batch` (1: input checks, the batch as slices, how the two CE terms mix), `forward` (2–3:
//! scratch buffers, a chunk's logits), `rows` (4: per-row statistics), `branch` (5: weights and
//! what each branch accumulates), `grad` (6–7: support-row gradients, normalisation); `gemm` holds
//! the tensor views and the matrix product, `kernels` the vectorised per-row loops.

mod batch;
use crate::nn::bf16;
pub use crate::nn::Precision;
mod branch;
mod forward;
mod gemm;
mod generic;
mod grad;
mod kernels;
mod rows;
#[cfg(test)]
mod tests;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::objective::{BlockLayout, MetricCounts, ObjectiveError, ResolvedObjective};
use batch::{check_delta, check_rows, Batch, DeltaRows, Mix};
use branch::Branches;
use gemm::F32View;
use grad::GradAcc;
use rows::ChunkStats;

pub use generic::GenericHead;
use crate::nn::{Backend, KernelPath};

#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error(
        "{what} must be an f32 tensor on the CPU (got {dtype:?} on {device}); the chunked head runs \
         on the CPU: convert with .to_dtype(DType::F32)? and .to_device(&Device::Cpu)?, or use \
         Head::for_backend, which picks the generic head on other devices"
    )]
    NotCpuF32 {
        what: &'static str,
        dtype: DType,
        device: String,
    },
    #[error("{what} has shape {got:?}, expected {expected}")]
    Shape {
        what: &'static str,
        got: Vec<usize>,
        expected: String,
    },
    #[error(
        "label {label} at row {row} (block {block}, block position {position}) is outside the \
         vocabulary of {vocab} tokens; the labels must come from the target's tokenizer"
    )]
    LabelOutOfRange {
        label: u32,
        row: usize,
        block: usize,
        position: usize,
        vocab: usize,
    },
    #[error("distillation weight {0} must lie in [0, 1]")]
    BadSoftWeight(f32),
    #[error("Domino base_ce_weight (lambda) = {0} must lie in [0, 1]")]
    BadLambda(f32),
    #[error(
        "head.precision is bf16 but this CPU has no AVX512-BF16 instructions; set head.precision \
         to \"f32\" (the default) in the training config"
    )]
    NoBf16,
    #[error(transparent)]
    Objective(#[from] ObjectiveError),
    #[error("tensor operation failed in the LM head: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Chunking of the head; the only knob is memory against per-chunk overhead.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadConfig {
    /// Rows per chunk, rounded down to whole blocks (at least one block). Each chunk needs
    /// chunk_rows × V floats for the logits and as many for the gradient rows (DFlash; Domino twice
    /// that): 2 × 100 MB at 512 rows and V = 49152, 2 × 310 MB for Qwen3's 151,936. Larger chunks run
    /// the GEMMs faster (on 2 cores: 84 GFLOP/s at 128 rows, about 110 at 256, 130 at 480).
    /// Default 512.
    #[serde(default = "default_chunk_rows")]
    pub chunk_rows: usize,
    /// The vocabulary the cross-entropy's softmax runs over: `full` (default) or `draft`, the
    /// drafter's draft vocabulary (DESIGN §7.13).
    #[serde(default, skip_serializing_if = "HeadVocab::is_full")]
    pub vocab: HeadVocab,
    /// The precision of the two products with the LM head on the CPU kernel path: `f32`
    /// (default) or `bf16` (AVX512-BF16 CPUs only; about twice the rate, measured slightly worse
    /// drafters: DESIGN §7.14). Sums are f32 either way. The generic (GPU) head ignores it.
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
    /// Score every row, also those past a block's first failure under AUF (default false: the
    /// CPU head leaves them out, since their weight is zero; the loss and gradient are the same,
    /// and the training log's `acc` and `acc_per_position` then count such rows as wrong).
    /// Held-out evaluation always scores every row.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub score_every_row: bool,
}

/// Whether the head's products run in bf16 on this CPU; an error for `bf16` where it cannot.
pub fn use_bf16(precision: Precision) -> Result<bool, HeadError> {
    match precision {
        Precision::F32 => Ok(false),
        Precision::Bf16 if precision.runs_here() => Ok(true),
        Precision::Bf16 => Err(HeadError::NoBf16),
    }
}

/// Which rows of the target's LM head the training head scores.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeadVocab {
    /// Every token of the vocabulary.
    #[default]
    Full,
    /// Only the ids a draft can take (DESIGN §7.13): every id the training replies contain, at
    /// least the top `DEFAULT_DRAFT_VOCAB`, as EAGLE-3 trains over its reduced draft vocabulary. The
    /// softmax, the argmax behind AUF's support and the metrics run over those rows; a row whose
    /// label is outside them is not supervised. The head's two products shrink by V/K.
    Draft,
}

crate::named_enum!(HeadVocab, "head vocabulary", ["full", "draft"]);

impl HeadVocab {
    pub fn is_full(&self) -> bool {
        *self == HeadVocab::Full
    }
}

fn default_chunk_rows() -> usize {
    512
}

impl Default for HeadConfig {
    fn default() -> Self {
        HeadConfig {
            chunk_rows: default_chunk_rows(),
            vocab: HeadVocab::Full,
            precision: Precision::F32,
            score_every_row: false,
        }
    }
}

/// Which weights Domino's base-branch CE uses (DESIGN §4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BaseSupport {
    /// The final logits' weights and normaliser (the inferred default: AUF's support comes from what
    /// Domino emits and applies to both CE terms).
    #[default]
    SameAsFinal,
    /// The objective applied to the base logits' own argmax / p_gold, with its own normaliser.
    OwnArgmax,
    /// The objective without the AUF mask (masking only the final CE), with its own normaliser.
    Unmasked,
}

/// Domino's correction branch, given by its last Linear: delta = input · weightᵀ.
#[derive(Clone, Copy, Debug)]
pub struct DeltaBranch<'a> {
    /// (N, E) activations feeding the last Linear, values only (detached).
    pub input: &'a Tensor,
    /// (V, E) weight of that Linear, values only.
    pub weight: &'a Tensor,
    /// λ in loss = (1-λ)·CE_final + λ·CE_base.
    pub base_ce_weight: f32,
    /// Predicted indices i < this use base logits only (Domino: pure_draft_prefix_len = 1).
    pub base_only_prefix: usize,
    pub base_support: BaseSupport,
}

/// Distillation targets: per row, `k` token ids of the target's distribution and their
/// probabilities (each row sums to 1). A row's CE target becomes
/// `(1 − weight)·onehot(label) + weight·p` (so CE = logsumexp − Σ target·logit and
/// dL/dlogits = softmax − target); correctness and p_gold, which the objectives weigh by, stay
/// those of the hard label.
#[derive(Clone, Copy, Debug)]
pub struct SoftTargets<'a> {
    pub k: usize,
    /// (N·k) token ids.
    pub ids: &'a [u32],
    /// (N·k) probabilities.
    pub probs: &'a [f32],
    /// In [0, 1]: 0 is plain hard-label CE.
    pub weight: f32,
}

impl<'a> SoftTargets<'a> {
    /// Row `r`'s ids and probabilities.
    pub fn row(&self, r: usize) -> (&'a [u32], &'a [f32]) {
        (&self.ids[r * self.k..(r + 1) * self.k], &self.probs[r * self.k..(r + 1) * self.k])
    }
}

/// One batch for the head. All tensors are values only; see the module doc for the surrogate.
#[derive(Clone, Copy, Debug)]
pub struct HeadInput<'a> {
    /// (N, H) drafter final hidden rows (after the final norm).
    pub hidden: &'a Tensor,
    /// (V, H) the target's frozen LM head.
    pub lm_head: &'a Tensor,
    /// (N) gold token ids; only valid rows must be inside the vocabulary.
    pub labels: &'a [u32],
    /// (N) validity v of each row.
    pub valid: &'a [bool],
    pub layout: BlockLayout,
    /// Sequences in the batch ([`super::objective::Normaliser::Sequences`]).
    pub num_sequences: usize,
    /// Keys the draws of [`super::objective::FailureRule::Sample`]; unused otherwise.
    pub seed: u64,
    /// Domino's correction branch; None for DFlash.
    pub delta: Option<DeltaBranch<'a>>,
    /// Distillation targets beside the hard labels; None: hard labels only.
    pub soft: Option<SoftTargets<'a>>,
}

/// Per-row results of one branch. Invalid rows have ce = 0, p_gold = 0, correct = false.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RowOutputs {
    pub ce: Vec<f32>,
    pub correct: Vec<bool>,
    pub p_gold: Vec<f32>,
    /// The softmax probability of the row's top logit (the drafter's confidence in its greedy
    /// draft; 0 for an invalid row).
    pub p_top: Vec<f32>,
    pub weights: Vec<f32>,
    pub normaliser: f32,
    /// Σ w·CE / normaliser of this branch (0 when the normaliser is 0).
    pub loss: f32,
    pub metrics: MetricCounts,
}

/// Domino's extra outputs.
#[derive(Clone, Debug)]
pub struct DeltaOutput {
    /// (N, E) dL/d(delta input).
    pub grad_input: Tensor,
    /// (V, E) dL/d(delta weight).
    pub grad_weight: Tensor,
    /// The base branch's rows, weights, loss and metrics.
    pub base: RowOutputs,
}

#[derive(Clone, Debug)]
pub struct HeadOutput {
    /// The training loss: final-branch loss for DFlash, (1-λ)·final + λ·base for Domino.
    pub loss: f32,
    /// (N, H) dL/dh.
    pub grad_hidden: Tensor,
    /// The emitted (final) logits' rows, weights, loss and metrics.
    pub rows: RowOutputs,
    pub delta: Option<DeltaOutput>,
}

impl HeadOutput {
    /// The scalar to call `backward` on: Σ hidden⊙grad_hidden (+ Σ input⊙grad_input + Σ weight⊙grad_weight
    /// for Domino, where `delta` = (input_graph, weight_var_tensor)).
    pub fn surrogate(
        &self,
        hidden_graph: &Tensor,
        delta_graph: Option<(&Tensor, &Tensor)>,
    ) -> candle_core::Result<Tensor> {
        let mut pairs = vec![(hidden_graph, &self.grad_hidden)];
        if let (Some((input, weight)), Some(d)) = (delta_graph, &self.delta) {
            pairs.push((input, &d.grad_input));
            pairs.push((weight, &d.grad_weight));
        }
        surrogate_loss(&pairs)
    }
}

/// Σ_i sum(graph_i ⊙ grad_i): a scalar whose gradient w.r.t. each `graph_i` is `grad_i` (detached).
pub fn surrogate_loss(pairs: &[(&Tensor, &Tensor)]) -> candle_core::Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for (graph, grad) in pairs {
        let term = (*graph * grad.detach())?.sum_all()?;
        total = Some(match total {
            None => term,
            Some(t) => (t + term)?,
        });
    }
    match total {
        Some(t) => Ok(t),
        None => Tensor::new(0f32, &Device::Cpu),
    }
}

/// The LM head/CE behind the kernel seam (DESIGN §7.11): the chunked CPU kernel
/// ([`ChunkedHead`]) on the CPU kernel path, the tensor-op head ([`GenericHead`]) on the generic
/// path; both return the same [`HeadOutput`] (tests: `generic_head_*` in this module's tests).
#[derive(Debug)]
pub enum Head {
    Chunked(ChunkedHead),
    Generic(GenericHead),
}

impl Head {
    /// The head for `backend`'s kernel path (pass the target's, `Target::backend`).
    pub fn for_backend(config: HeadConfig, backend: &Backend) -> Self {
        match backend.path() {
            KernelPath::Cpu => Head::Chunked(ChunkedHead::new(config)),
            KernelPath::Generic => Head::Generic(GenericHead::with_dtype(config, backend.compute_dtype())),
        }
    }

    pub fn run(&mut self, objective: &ResolvedObjective, input: &HeadInput<'_>) -> Result<HeadOutput, HeadError> {
        match self {
            Head::Chunked(h) => h.run(objective, input),
            Head::Generic(h) => h.run(objective, input),
        }
    }

    /// [`Head::run`] with logits for every row, whatever `score_every_row` says: the same loss and
    /// gradient, and metrics over every row (held-out evaluation).
    pub fn run_every_row(&mut self, objective: &ResolvedObjective, input: &HeadInput<'_>) -> Result<HeadOutput, HeadError> {
        match self {
            Head::Chunked(h) => h.run_with(objective, input, true),
            Head::Generic(h) => h.run(objective, input),
        }
    }
}

/// The chunked LM head with its scratch buffers, reused across steps.
#[derive(Debug, Default)]
pub struct ChunkedHead {
    pub config: HeadConfig,
    scratch: Scratch,
    /// The LM head packed for the bf16 products, and the tensor it was packed from.
    packed: Option<(candle_core::TensorId, PackedHead)>,
}

/// The frozen LM head W (V × H) in bf16, packed once per tensor for each of the two products.
#[derive(Debug)]
pub(super) struct PackedHead {
    /// Wᵀ (k = H, n = V): the logits' operand.
    wt: bf16::PackedB,
    /// W (k = V, n = H): the gradient rows' operand.
    wm: bf16::PackedB,
}

/// Per-chunk buffers; they only grow, so steady-state steps allocate none of them.
#[derive(Debug, Default)]
struct Scratch {
    /// (c, V) h·Wᵀ of the chunk.
    base_logits: Vec<f32>,
    /// (c, V) base + a·W₂ᵀ (Domino only).
    final_logits: Vec<f32>,
    /// (s, V) gradient rows of the final CE term.
    grad_a: Vec<f32>,
    /// (s, V) gradient rows of the base CE term (or of both terms when they share the support).
    grad_b: Vec<f32>,
    /// (s, max(H, E)) gradient rows times W or W₂, before they are scattered into the batch.
    small: Vec<f32>,
    /// (c, E) the chunk's delta-branch input, zeroed on base-only rows.
    delta_rows: Vec<f32>,
    /// bf16 pair rows of the chunk's h (c × ⌈H/2⌉) and of the gradient rows (s × ⌈V/2⌉).
    h16: Vec<u32>,
    g16: Vec<u32>,
}

impl ChunkedHead {
    pub fn new(config: HeadConfig) -> Self {
        ChunkedHead {
            config,
            ..Default::default()
        }
    }

    /// Loss, dL/dh (and Domino's delta gradients), per-row statistics and metrics for one batch.
    pub fn run(
        &mut self,
        objective: &ResolvedObjective,
        input: &HeadInput<'_>,
    ) -> Result<HeadOutput, HeadError> {
        self.run_with(objective, input, self.config.score_every_row)
    }

    /// [`ChunkedHead::run`]; `every_row` false leaves out the rows past a block's first failure
    /// where the objective weighs them zero ([`ResolvedObjective::stops_at_first_failure`], DFlash).
    pub fn run_with(
        &mut self,
        objective: &ResolvedObjective,
        input: &HeadInput<'_>,
        every_row: bool,
    ) -> Result<HeadOutput, HeadError> {
        // 1. Shapes and views: after these checks every later step indexes without checking.
        let (n, hdim, vocab) = check_rows(input)?;
        let hidden = input.hidden.contiguous()?;
        let h_view = F32View::new(&hidden, "hidden")?;
        let w_view = F32View::new(input.lm_head, "lm_head")?;
        // Domino: the branch input a (N, E), made contiguous, and its views beside W₂ (V, E).
        let delta_input = check_delta(input, n, vocab)?;
        let delta_views = match &delta_input {
            Some((a, _, d)) => Some((
                F32View::new(a, "delta input")?,
                F32View::new(d.weight, "delta weight")?,
            )),
            None => None,
        };
        let delta = match (&delta_input, &delta_views) {
            (Some((_, edim, d)), Some((a, w2))) => Some(DeltaRows {
                a: a.slice(),
                w2: w2.slice(),
                edim: *edim,
                base_only_prefix: d.base_only_prefix,
            }),
            _ => None,
        };
        let soft = batch::check_soft(input, n, vocab)?;
        let w16 = if use_bf16(self.config.precision)? {
            let id = input.lm_head.id();
            if self.packed.as_ref().map(|(k, _)| *k) != Some(id) {
                let w = w_view.slice();
                let packed = PackedHead {
                    wt: bf16::PackedB::pack(w, hdim, vocab, 1, hdim),
                    wm: bf16::PackedB::pack(w, vocab, hdim, hdim, 1),
                };
                self.packed = Some((id, packed));
            }
            self.packed.as_ref().map(|(_, p)| p)
        } else {
            None
        };
        let batch = Batch {
            w16,
            soft,
            h: h_view.slice(),
            w: w_view.slice(),
            labels: input.labels,
            valid: input.valid,
            layout: input.layout,
            seed: input.seed,
            hdim,
            vocab,
            delta,
        };
        let mix = Mix::new(objective, input.delta);

        // 2. Buffers: chunks of whole blocks; accumulators for the whole batch.
        let p = batch.layout.positions_per_block;
        let chunk_rows = (self.config.chunk_rows / p).max(1) * p;
        let c_max = chunk_rows.min(n);
        self.scratch.reserve(c_max, &batch);
        let mut branches = Branches::new(n, &batch);
        let mut grads = GradAcc::new(n, &batch, mix.mixed);
        let mut stats = ChunkStats::new(c_max);
        let until_failure = !every_row && batch.delta.is_none() && objective.stops_at_first_failure();

        let mut r0 = 0;
        while r0 < n {
            let rows = r0..(r0 + chunk_rows).min(n);
            if until_failure {
                // 3–4. Logits and row statistics of each block's rows up to its first failure.
                let c = rows.len();
                self.scratch.logits_until_failure(&batch, objective, rows.clone(), &mut stats.fin[..c])?;
                branches.fin.record_stats(rows.start, &stats.fin[..c]);
            } else {
                // 3. Logits: base = h·Wᵀ; final = base + a·W₂ᵀ (a zeroed on base-only rows).
                self.scratch.logits(&batch, rows.clone())?;
                // 4. Row statistics (the buffers keep the logits for step 6).
                stats.fill(&self.scratch, &batch, rows.clone(), &mut branches);
            }
            // 5. Weights, block by block.
            branches.weigh_chunk(objective, &mix, &batch, rows.clone());
            // 6. Gradients of support rows only.
            grads.add_chunk(
                &mut self.scratch,
                &batch,
                &mix,
                &stats,
                rows.clone(),
                &branches,
            )?;
            r0 = rows.end;
        }

        // 7. Normalise: the normalisers are known only after the last chunk.
        let device = input.hidden.device().clone();
        grads.finish(
            objective,
            &mix,
            input.num_sequences,
            branches,
            &batch,
            &device,
        )
    }
}
