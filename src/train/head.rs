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

use std::ops::Range;

use candle_core::{DType, Device, Storage, Tensor};
use serde::{Deserialize, Serialize};

use super::objective::{
    BlockLayout, BlockRows, MetricCounts, ObjectiveError, ResolvedObjective, WeightTotals,
};

#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error(
        "{what} must be an f32 tensor on the CPU (got {dtype:?} on {device}); the chunked head runs \
         on the CPU: convert with .to_dtype(DType::F32)? and .to_device(&Device::Cpu)?"
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
    #[error("Domino base_ce_weight (lambda) = {0} must lie in [0, 1]")]
    BadLambda(f32),
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
}

fn default_chunk_rows() -> usize {
    512
}

impl Default for HeadConfig {
    fn default() -> Self {
        HeadConfig {
            chunk_rows: default_chunk_rows(),
        }
    }
}

/// Which weights Domino's base-branch CE uses (SPEC §4).
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
}

/// Per-row results of one branch. Invalid rows have ce = 0, p_gold = 0, correct = false.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RowOutputs {
    pub ce: Vec<f32>,
    pub correct: Vec<bool>,
    pub p_gold: Vec<f32>,
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

/// A read view of a contiguous CPU f32 tensor.
struct F32View<'a> {
    guard: candle_core::StorageRef<'a>,
    start: usize,
    len: usize,
}

impl<'a> F32View<'a> {
    fn new(t: &'a Tensor, what: &'static str) -> Result<Self, HeadError> {
        let bad = || HeadError::NotCpuF32 {
            what,
            dtype: t.dtype(),
            device: format!("{:?}", t.device()),
        };
        if t.dtype() != DType::F32 || !t.device().is_cpu() {
            return Err(bad());
        }
        let (guard, layout) = t.storage_and_layout();
        if !layout.is_contiguous() {
            return Err(HeadError::Shape {
                what,
                got: t.dims().to_vec(),
                expected: "a contiguous tensor (call .contiguous()? first)".into(),
            });
        }
        let start = layout.start_offset();
        let len = t.elem_count();
        match &*guard {
            Storage::Cpu(cpu) => {
                if cpu.as_slice::<f32>()?.len() < start + len {
                    return Err(bad());
                }
            }
            _ => return Err(bad()),
        }
        Ok(F32View { guard, start, len })
    }

    fn slice(&self) -> &[f32] {
        match &*self.guard {
            Storage::Cpu(cpu) => match cpu.as_slice::<f32>() {
                Ok(s) => &s[self.start..self.start + self.len],
                Err(_) => &[],
            },
            _ => &[],
        }
    }
}

fn dims2(t: &Tensor, what: &'static str, expected: &str) -> Result<(usize, usize), HeadError> {
    t.dims2().map_err(|_| HeadError::Shape {
        what,
        got: t.dims().to_vec(),
        expected: expected.into(),
    })
}

/// A strided read-only matrix operand for [`gemm_f32`].
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    /// Row and column strides in elements.
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    fn new(data: &'a [f32], rs: usize, cs: usize) -> Self {
        Mat { data, rs, cs }
    }
}

/// dst (m × n, row stride `dst_rs`, unit column stride) = [dst +] lhs (m × k) · rhs (k × n).
#[allow(clippy::too_many_arguments)]
fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat<'_>,
    rhs: Mat<'_>,
) -> Result<(), HeadError> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    let span =
        |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs + 1;
    if span(m, n, dst_rs, 1) > dst.len() {
        return Err(internal_shape(
            "gemm destination",
            dst.len(),
            span(m, n, dst_rs, 1),
        ));
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_rs..r * dst_rs + n].fill(0.0);
            }
        }
        return Ok(());
    }
    if span(m, k, lhs.rs, lhs.cs) > lhs.data.len() {
        return Err(internal_shape(
            "gemm lhs",
            lhs.data.len(),
            span(m, k, lhs.rs, lhs.cs),
        ));
    }
    if span(k, n, rhs.rs, rhs.cs) > rhs.data.len() {
        return Err(internal_shape(
            "gemm rhs",
            rhs.data.len(),
            span(k, n, rhs.rs, rhs.cs),
        ));
    }
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the spans above keep every index the kernel touches inside the three slices, and
    // dst is borrowed mutably, so it does not alias lhs or rhs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

fn internal_shape(what: &'static str, got: usize, needed: usize) -> HeadError {
    HeadError::Shape {
        what,
        got: vec![got],
        expected: format!("at least {needed} elements"),
    }
}

/// Forward statistics of one row.
#[derive(Clone, Copy, Debug, Default)]
struct RowStat {
    ce: f32,
    p_gold: f32,
    /// Row maximum of the logits and 1 / Σ exp(logit − max): softmax = exp(logit − max)·inv_sum.
    max: f32,
    inv_sum: f32,
    correct: bool,
}

/// Splits `out` (rows × width) into one contiguous part of rows per worker thread and runs
/// `f(row_range, part)` on each.
fn for_row_parts<T: Send>(
    rows: usize,
    width: usize,
    out: &mut [T],
    f: impl Fn(Range<usize>, &mut [T]) + Sync,
) {
    let threads = candle_core::utils::get_num_threads().clamp(1, rows.max(1));
    let per = rows.div_ceil(threads).max(1);
    if threads == 1 || rows <= per {
        f(0..rows, &mut out[..rows * width]);
        return;
    }
    std::thread::scope(|scope| {
        let f = &f;
        let mut rest = &mut out[..rows * width];
        let mut start = 0;
        while start < rows {
            let n = per.min(rows - start);
            let (part, tail) = std::mem::take(&mut rest).split_at_mut(n * width);
            rest = tail;
            let range = start..start + n;
            scope.spawn(move || f(range, part));
            start += n;
        }
    });
}

/// Fills `stats` for the chunk's rows of logits `buf` (rows × vocab), reading it once.
fn chunk_row_stats(
    buf: &[f32],
    vocab: usize,
    labels: &[u32],
    valid: &[bool],
    stats: &mut [RowStat],
) {
    let rows = labels.len();
    for_row_parts(rows, 1, stats, |range, out| {
        for (j, r) in range.enumerate() {
            let label = labels[r] as usize;
            if !valid[r] || label >= vocab {
                out[j] = RowStat::default();
                continue;
            }
            let row = &buf[r * vocab..(r + 1) * vocab];
            let (max, argmax, sum) = kernels::row_stats(row);
            // CE = logsumexp − logit[label] = ln Σ + (max − logit[label]).
            let ce = sum.ln() + (max - row[label]);
            out[j] = RowStat {
                ce,
                p_gold: (-ce).exp(),
                max,
                inv_sum: 1.0 / sum,
                correct: argmax == label,
            };
        }
    });
}

/// One term of a gradient row: coef · w · softmax, from a chunk's logits and row statistics.
#[derive(Clone, Copy)]
struct GradTerm<'a> {
    logits: &'a [f32],
    stats: &'a [RowStat],
    weights: &'a [f32],
    coef: f32,
}

/// Writes, for each chunk-local row r in `support` (in order), the row
/// Σ_t coef_t·w_t[r]·(softmax_t[r] − onehot(label[r])) into `dst` (support.len() × vocab).
fn build_grad_rows(
    support: &[usize],
    terms: &[GradTerm<'_>],
    labels: &[u32],
    vocab: usize,
    dst: &mut [f32],
) {
    fn row<'a>(t: &GradTerm<'a>, r: usize, vocab: usize) -> &'a [f32] {
        &t.logits[r * vocab..(r + 1) * vocab]
    }
    for_row_parts(support.len(), vocab, dst, |range, part| {
        for (j, &r) in support[range].iter().enumerate() {
            let out = &mut part[j * vocab..(j + 1) * vocab];
            let scale = |t: &GradTerm<'_>| t.coef * t.weights[r] * t.stats[r].inv_sum;
            match terms {
                [a] => kernels::softmax_scaled(out, row(a, r, vocab), a.stats[r].max, scale(a)),
                [a, b] => kernels::softmax_scaled2(
                    out,
                    (row(a, r, vocab), a.stats[r].max, scale(a)),
                    (row(b, r, vocab), b.stats[r].max, scale(b)),
                ),
                _ => out.fill(0.0),
            }
            let onehot: f32 = terms.iter().map(|t| t.coef * t.weights[r]).sum();
            out[labels[r] as usize] -= onehot;
        }
    });
}

/// Adds `rows` (support.len() × width) into `acc` at the (chunk offset + support) rows.
fn scatter_add(acc: &mut [f32], width: usize, offset: usize, support: &[usize], rows: &[f32]) {
    for (j, &r) in support.iter().enumerate() {
        let dst = &mut acc[(offset + r) * width..(offset + r + 1) * width];
        for (d, s) in dst.iter_mut().zip(&rows[j * width..(j + 1) * width]) {
            *d += *s;
        }
    }
}

/// Grows `buf` to at least `len` floats (contents unspecified).
fn ensure_len(buf: &mut Vec<f32>, len: usize) {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
}

/// The chunked LM head with its scratch buffers, reused across steps.
#[derive(Debug, Default)]
pub struct ChunkedHead {
    pub config: HeadConfig,
    base_logits: Vec<f32>,
    final_logits: Vec<f32>,
    grad_a: Vec<f32>,
    grad_b: Vec<f32>,
    small: Vec<f32>,
    delta_rows: Vec<f32>,
}

/// Per-branch accumulation across chunks.
struct BranchAcc {
    ce: Vec<f32>,
    correct: Vec<bool>,
    p_gold: Vec<f32>,
    weights: Vec<f32>,
    totals: WeightTotals,
    metrics: MetricCounts,
    weighted_ce: f64,
}

impl BranchAcc {
    fn new(n: usize, layout: BlockLayout) -> Self {
        BranchAcc {
            ce: vec![0.0; n],
            correct: vec![false; n],
            p_gold: vec![0.0; n],
            weights: vec![0.0; n],
            totals: WeightTotals::default(),
            metrics: MetricCounts::new(layout),
            weighted_ce: 0.0,
        }
    }

    fn record_stats(&mut self, r0: usize, stats: &[RowStat]) {
        for (j, s) in stats.iter().enumerate() {
            self.ce[r0 + j] = s.ce;
            self.p_gold[r0 + j] = s.p_gold;
            self.correct[r0 + j] = s.correct;
        }
    }

    /// Weights of the chunk's blocks, from this branch's statistics (`source` None) or from another
    /// branch's (correct, p_gold); the metrics always use this branch's own correctness.
    fn weigh(
        &mut self,
        objective: &ResolvedObjective,
        layout: BlockLayout,
        rows: Range<usize>,
        valid: &[bool],
        source: Option<(&[bool], &[f32])>,
        seed: u64,
    ) {
        let BranchAcc {
            ce,
            correct,
            p_gold,
            weights,
            totals,
            metrics,
            weighted_ce,
        } = self;
        let (src_correct, src_p_gold) = match source {
            Some(s) => s,
            None => (&correct[..], &p_gold[..]),
        };
        let p = layout.positions_per_block;
        let mut b0 = rows.start;
        while b0 < rows.end {
            let r = b0..b0 + p;
            let block = BlockRows {
                valid: &valid[r.clone()],
                correct: &src_correct[r.clone()],
                p_gold: &src_p_gold[r.clone()],
                first_row: b0,
            };
            objective.block_weights(block, seed, &mut weights[r.clone()]);
            totals.add_block(block.valid, &weights[r.clone()]);
            metrics.add_block(block.valid, &correct[r.clone()], &weights[r.clone()]);
            for i in r {
                *weighted_ce += f64::from(weights[i]) * f64::from(ce[i]);
            }
            b0 += p;
        }
    }

    fn finish(self, normaliser: f32) -> RowOutputs {
        let loss = if normaliser > 0.0 {
            (self.weighted_ce / f64::from(normaliser)) as f32
        } else {
            0.0
        };
        RowOutputs {
            ce: self.ce,
            correct: self.correct,
            p_gold: self.p_gold,
            weights: self.weights,
            normaliser,
            loss,
            metrics: self.metrics,
        }
    }
}

fn inv(x: f32) -> f32 {
    if x > 0.0 {
        1.0 / x
    } else {
        0.0
    }
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
        // 1. Shapes and views.
        let (n, hdim) = dims2(input.hidden, "hidden", "(N, H)")?;
        let (vocab, hdim_w) = dims2(input.lm_head, "lm_head", "(V, H)")?;
        if hdim_w != hdim {
            return Err(HeadError::Shape {
                what: "lm_head",
                got: vec![vocab, hdim_w],
                expected: format!("(V, {hdim}) to match hidden"),
            });
        }
        for (what, len) in [("labels", input.labels.len()), ("valid", input.valid.len())] {
            if len != n {
                return Err(HeadError::Shape {
                    what,
                    got: vec![len],
                    expected: format!("({n}) rows"),
                });
            }
        }
        let layout = input.layout;
        let p = layout.positions_per_block;
        layout.blocks(n, "hidden rows")?;
        for (row, (&label, &v)) in input.labels.iter().zip(input.valid).enumerate() {
            if v && label as usize >= vocab {
                return Err(HeadError::LabelOutOfRange {
                    label,
                    row,
                    block: row / p,
                    position: layout.first_position + row % p,
                    vocab,
                });
            }
        }
        let hidden = input.hidden.contiguous()?;
        let h_view = F32View::new(&hidden, "hidden")?;
        let w_view = F32View::new(input.lm_head, "lm_head")?;
        let (h, w) = (h_view.slice(), w_view.slice());

        let delta_tensors = match &input.delta {
            Some(d) => {
                if !(0.0..=1.0).contains(&d.base_ce_weight) {
                    return Err(HeadError::BadLambda(d.base_ce_weight));
                }
                let (na, edim) = dims2(d.input, "delta input", "(N, E)")?;
                let (vw, ew) = dims2(d.weight, "delta weight", "(V, E)")?;
                if na != n || vw != vocab || ew != edim {
                    return Err(HeadError::Shape {
                        what: "delta branch",
                        got: vec![na, edim, vw, ew],
                        expected: format!("input ({n}, E) and weight ({vocab}, E)"),
                    });
                }
                Some((d.input.contiguous()?, edim, *d))
            }
            None => None,
        };
        let delta_views = match &delta_tensors {
            Some((a, _, d)) => Some((
                F32View::new(a, "delta input")?,
                F32View::new(d.weight, "delta weight")?,
            )),
            None => None,
        };
        let edim = delta_tensors.as_ref().map_or(0, |(_, e, _)| *e);
        let (coef_final, coef_base) = match &input.delta {
            Some(d) => (1.0 - d.base_ce_weight, d.base_ce_weight),
            None => (1.0, 0.0),
        };
        let base_support = input.delta.map(|d| d.base_support);
        // Base CE shares the final support and normaliser: one combined gradient product.
        let mixed =
            base_support == Some(BaseSupport::SameAsFinal) && coef_final > 0.0 && coef_base > 0.0;
        let base_objective = match base_support {
            Some(BaseSupport::Unmasked) => objective.without_auf(),
            _ => objective.clone(),
        };

        // 2. Buffers.
        let chunk_rows = (self.config.chunk_rows / p).max(1) * p;
        let c_max = chunk_rows.min(n);
        ensure_len(&mut self.base_logits, c_max * vocab);
        ensure_len(&mut self.grad_a, c_max * vocab);
        ensure_len(&mut self.small, c_max * hdim.max(edim));
        if delta_tensors.is_some() {
            ensure_len(&mut self.final_logits, c_max * vocab);
            ensure_len(&mut self.grad_b, c_max * vocab);
            ensure_len(&mut self.delta_rows, c_max * edim);
        }
        let mut fin = BranchAcc::new(n, layout);
        let mut base = delta_tensors.as_ref().map(|_| BranchAcc::new(n, layout));
        // Unnormalised gradient accumulators; scaled once the normalisers are known.
        let mut gh_final = vec![0.0f32; n * hdim];
        let mut gh_base = if delta_tensors.is_some() && !mixed {
            vec![0.0f32; n * hdim]
        } else {
            Vec::new()
        };
        let mut g_input = vec![0.0f32; n * edim];
        let mut g_weight = vec![
            0.0f32;
            if delta_tensors.is_some() {
                vocab * edim
            } else {
                0
            }
        ];
        let mut stats_f = vec![RowStat::default(); c_max];
        let mut stats_b = vec![RowStat::default(); c_max];

        // The LM head as Wᵀ (H × V) for the forward and as W (V × H) for the backward.
        let w_t = Mat::new(w, 1, hdim);
        let w_m = Mat::new(w, hdim, 1);

        let mut r0 = 0;
        while r0 < n {
            let r1 = (r0 + chunk_rows).min(n);
            let c = r1 - r0;
            let labels = &input.labels[r0..r1];
            let valid = &input.valid[r0..r1];

            // 3. Logits: base = h·Wᵀ; final = base + a·W₂ᵀ (a zeroed on base-only rows).
            let h_c = Mat::new(&h[r0 * hdim..r1 * hdim], hdim, 1);
            gemm_f32(
                c,
                vocab,
                hdim,
                &mut self.base_logits,
                vocab,
                false,
                h_c,
                w_t,
            )?;
            if let (Some((_, _, d)), Some((a_view, w2_view))) = (&delta_tensors, &delta_views) {
                let a = a_view.slice();
                for j in 0..c {
                    let dst = &mut self.delta_rows[j * edim..(j + 1) * edim];
                    if (r0 + j) % p < d.base_only_prefix {
                        dst.fill(0.0);
                    } else {
                        dst.copy_from_slice(&a[(r0 + j) * edim..(r0 + j + 1) * edim]);
                    }
                }
                self.final_logits[..c * vocab].copy_from_slice(&self.base_logits[..c * vocab]);
                let a_c = Mat::new(&self.delta_rows[..c * edim], edim, 1);
                let w2_t = Mat::new(w2_view.slice(), 1, edim);
                gemm_f32(
                    c,
                    vocab,
                    edim,
                    &mut self.final_logits,
                    vocab,
                    true,
                    a_c,
                    w2_t,
                )?;
            }

            // 4. Row statistics (the buffers keep the logits).
            let has_delta = delta_tensors.is_some();
            {
                let final_buf = if has_delta {
                    &self.final_logits
                } else {
                    &self.base_logits
                };
                chunk_row_stats(
                    &final_buf[..c * vocab],
                    vocab,
                    labels,
                    valid,
                    &mut stats_f[..c],
                );
            }
            fin.record_stats(r0, &stats_f[..c]);
            if let Some(b) = base.as_mut() {
                chunk_row_stats(
                    &self.base_logits[..c * vocab],
                    vocab,
                    labels,
                    valid,
                    &mut stats_b[..c],
                );
                b.record_stats(r0, &stats_b[..c]);
            }

            // 5. Weights, block by block.
            fin.weigh(objective, layout, r0..r1, input.valid, None, input.seed);
            if let Some(b) = base.as_mut() {
                let source = match base_support {
                    Some(BaseSupport::OwnArgmax) => None,
                    _ => Some((&fin.correct[..], &fin.p_gold[..])),
                };
                b.weigh(
                    &base_objective,
                    layout,
                    r0..r1,
                    input.valid,
                    source,
                    input.seed,
                );
            }

            // 6. Gradients of support rows only.
            let support_f: Vec<usize> = (0..c).filter(|&j| fin.weights[r0 + j] > 0.0).collect();
            let final_probs: &[f32] = if has_delta {
                &self.final_logits
            } else {
                &self.base_logits
            };
            let final_term = GradTerm {
                logits: final_probs,
                stats: &stats_f[..c],
                weights: &fin.weights[r0..r1],
                coef: 1.0,
            };
            if coef_final > 0.0 && !support_f.is_empty() {
                build_grad_rows(&support_f, &[final_term], labels, vocab, &mut self.grad_a);
                let s = support_f.len();
                let g = Mat::new(&self.grad_a[..s * vocab], vocab, 1);
                if let (Some((_, _, _)), Some((_, w2_view))) = (&delta_tensors, &delta_views) {
                    // dL/da rows = G·W₂ ; dL/dW₂ += Gᵀ·a_support (base-only rows of a are zero).
                    let w2 = Mat::new(w2_view.slice(), edim, 1);
                    gemm_f32(s, edim, vocab, &mut self.small, edim, false, g, w2)?;
                    for (j, &r) in support_f.iter().enumerate() {
                        if (r0 + r) % p >= input.delta.map_or(0, |d| d.base_only_prefix) {
                            g_input[(r0 + r) * edim..(r0 + r + 1) * edim]
                                .copy_from_slice(&self.small[j * edim..(j + 1) * edim]);
                        }
                    }
                    let mut a_s = vec![0.0f32; s * edim];
                    for (j, &r) in support_f.iter().enumerate() {
                        a_s[j * edim..(j + 1) * edim]
                            .copy_from_slice(&self.delta_rows[r * edim..(r + 1) * edim]);
                    }
                    let g_t = Mat::new(&self.grad_a[..s * vocab], 1, vocab);
                    let a_m = Mat::new(&a_s, edim, 1);
                    gemm_f32(vocab, edim, s, &mut g_weight, edim, true, g_t, a_m)?;
                }
                if !mixed {
                    gemm_f32(s, hdim, vocab, &mut self.small, hdim, false, g, w_m)?;
                    scatter_add(&mut gh_final, hdim, r0, &support_f, &self.small);
                }
            }
            if let Some(b) = base.as_ref() {
                if coef_base > 0.0 {
                    let base_term = GradTerm {
                        logits: &self.base_logits,
                        stats: &stats_b[..c],
                        weights: &b.weights[r0..r1],
                        coef: if mixed { coef_base } else { 1.0 },
                    };
                    let (support, terms, acc): (Vec<usize>, Vec<GradTerm<'_>>, &mut Vec<f32>) =
                        if mixed {
                            let f = GradTerm {
                                coef: coef_final,
                                ..final_term
                            };
                            (support_f.clone(), vec![f, base_term], &mut gh_final)
                        } else {
                            let sb = (0..c).filter(|&j| b.weights[r0 + j] > 0.0).collect();
                            (sb, vec![base_term], &mut gh_base)
                        };
                    if !support.is_empty() {
                        build_grad_rows(&support, &terms, labels, vocab, &mut self.grad_b);
                        let s = support.len();
                        let g = Mat::new(&self.grad_b[..s * vocab], vocab, 1);
                        gemm_f32(s, hdim, vocab, &mut self.small, hdim, false, g, w_m)?;
                        scatter_add(acc, hdim, r0, &support, &self.small);
                    }
                }
            }
            r0 = r1;
        }

        // 7. Normalise.
        let n_final = objective.normaliser(&fin.totals, input.num_sequences);
        let rows = fin.finish(n_final);
        let device = input.hidden.device().clone();
        let (loss, grad_hidden, delta) = match (base, delta_tensors.as_ref()) {
            (Some(b), Some((_, _, d))) => {
                let n_base = match d.base_support {
                    BaseSupport::SameAsFinal => n_final,
                    _ => base_objective.normaliser(&b.totals, input.num_sequences),
                };
                let base_rows = b.finish(n_base);
                let loss = coef_final * rows.loss + coef_base * base_rows.loss;
                let s_final = if mixed {
                    inv(n_final)
                } else {
                    coef_final * inv(n_final)
                };
                let s_base = coef_base * inv(n_base);
                let mut gh = gh_final;
                for x in gh.iter_mut() {
                    *x *= s_final;
                }
                for (x, y) in gh.iter_mut().zip(&gh_base) {
                    *x += s_base * y;
                }
                let s_delta = coef_final * inv(n_final);
                for x in g_input.iter_mut().chain(g_weight.iter_mut()) {
                    *x *= s_delta;
                }
                let delta = DeltaOutput {
                    grad_input: Tensor::from_vec(g_input, (n, edim), &device)?,
                    grad_weight: Tensor::from_vec(g_weight, (vocab, edim), &device)?,
                    base: base_rows,
                };
                (loss, gh, Some(delta))
            }
            _ => {
                let s = inv(n_final);
                let mut gh = gh_final;
                for x in gh.iter_mut() {
                    *x *= s;
                }
                (rows.loss, gh, None)
            }
        };
        Ok(HeadOutput {
            loss,
            grad_hidden: Tensor::from_vec(grad_hidden, (n, hdim), &device)?,
            rows,
            delta,
        })
    }
}

/// Per-row kernels over contiguous f32 rows. Written as fixed-width lane loops that the compiler
/// vectorises; compiled again with AVX-512 / AVX2 enabled and picked at run time, so the binary
/// stays safe on CPUs without them.
mod kernels {
    const LANES: usize = 16;

    /// a·b + c, fused where the caller was compiled with FMA (a libm call otherwise, so the
    /// baseline build uses the plain expression).
    #[inline(always)]
    fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
        if FMA {
            a.mul_add(b, c)
        } else {
            a * b + c
        }
    }

    /// exp(x) for x ≤ 0 (Cephes expf polynomial, about 1 ulp); x below -87.3 gives exp(-87.3) ≈ 1e-38
    /// instead of underflowing to a denormal.
    #[inline(always)]
    fn exp_nonpositive<const FMA: bool>(x: f32) -> f32 {
        const LOG2E: f32 = std::f32::consts::LOG2_E;
        // Adding 1.5·2^23 rounds to an integer n, kept in the low mantissa bits.
        const MAGIC: f32 = 12_582_912.0;
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_4e-4;
        let x = if x < -87.3 { -87.3 } else { x };
        let t = madd::<FMA>(x, LOG2E, MAGIC);
        let n = t - MAGIC;
        let r = madd::<FMA>(n, -LN2_HI, x);
        let r = madd::<FMA>(n, -LN2_LO, r);
        let mut q = 1.987_569_1e-4f32;
        q = madd::<FMA>(q, r, 1.398_199_9e-3);
        q = madd::<FMA>(q, r, 8.333_452e-3);
        q = madd::<FMA>(q, r, 4.166_579_6e-2);
        q = madd::<FMA>(q, r, 1.666_666_5e-1);
        q = madd::<FMA>(q, r, 0.5);
        let y = madd::<FMA>(q, r * r, r) + 1.0;
        // 2^n from n's bits: n ∈ [-126, 0], so n + 127 is a valid normal exponent.
        let bits = t.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127) << 23;
        y * f32::from_bits(bits)
    }

    /// Elements per block of the one-pass statistics: small enough to stay in L1 between the max
    /// scan and the exp scan of the block.
    const BLOCK: usize = 1024;

    #[inline(always)]
    fn lane_max(xs: &[f32]) -> f32 {
        let mut lanes = [f32::NEG_INFINITY; LANES];
        let mut chunks = xs.chunks_exact(LANES);
        for ch in &mut chunks {
            for j in 0..LANES {
                lanes[j] = if ch[j] > lanes[j] { ch[j] } else { lanes[j] };
            }
        }
        let mut max = f32::NEG_INFINITY;
        for &x in lanes.iter().chain(chunks.remainder()) {
            if x > max {
                max = x;
            }
        }
        max
    }

    #[inline(always)]
    fn lane_sum_exp<const FMA: bool>(xs: &[f32], max: f32) -> f32 {
        let mut lanes = [0.0f32; LANES];
        let mut chunks = xs.chunks_exact(LANES);
        for ch in &mut chunks {
            for j in 0..LANES {
                lanes[j] += exp_nonpositive::<FMA>(ch[j] - max);
            }
        }
        let mut sum: f32 = chunks
            .remainder()
            .iter()
            .map(|&x| exp_nonpositive::<FMA>(x - max))
            .sum();
        sum += lanes.iter().sum::<f32>();
        sum
    }

    /// (max, first argmax, Σ exp(x − max)) in one read of the row: block by block, the running sum
    /// is rescaled whenever a block raises the maximum.
    #[inline(always)]
    fn row_stats_impl<const FMA: bool>(row: &[f32]) -> (f32, usize, f32) {
        let mut max = f32::NEG_INFINITY;
        let mut argmax = 0usize;
        let mut sum = 0.0f32;
        for (b, block) in row.chunks(BLOCK).enumerate() {
            let block_max = lane_max(block);
            if block_max > max {
                // Strictly greater: an equal maximum in a later block keeps the earlier index.
                let at = block.iter().position(|&x| x == block_max).unwrap_or(0);
                argmax = b * BLOCK + at;
                if sum > 0.0 {
                    sum *= exp_nonpositive::<FMA>(max - block_max);
                }
                max = block_max;
            }
            sum += lane_sum_exp::<FMA>(block, max);
        }
        (max, argmax, sum)
    }

    /// out = a·exp(x − max).
    #[inline(always)]
    fn softmax_scaled_impl<const FMA: bool>(out: &mut [f32], x: &[f32], max: f32, a: f32) {
        for (o, &x) in out.iter_mut().zip(x) {
            *o = a * exp_nonpositive::<FMA>(x - max);
        }
    }

    /// out = a·exp(x − mx) + b·exp(y − my).
    #[inline(always)]
    fn softmax_scaled2_impl<const FMA: bool>(
        out: &mut [f32],
        x: &[f32],
        mx: f32,
        a: f32,
        y: &[f32],
        my: f32,
        b: f32,
    ) {
        for ((o, &x), &y) in out.iter_mut().zip(x).zip(y) {
            *o = madd::<FMA>(
                a,
                exp_nonpositive::<FMA>(x - mx),
                b * exp_nonpositive::<FMA>(y - my),
            );
        }
    }

    /// Defines `$name` dispatching at run time to copies of `$imp` compiled for AVX-512F, for
    /// AVX2+FMA, or for the baseline target.
    macro_rules! multiversion {
        ($name:ident, $imp:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
            pub(super) fn $name($($arg: $ty),*) -> $ret {
                #[cfg(target_arch = "x86_64")]
                {
                    #[target_feature(enable = "avx512f,fma")]
                    unsafe fn avx512($($arg: $ty),*) -> $ret {
                        $imp::<true>($($arg),*)
                    }
                    #[target_feature(enable = "avx2,fma")]
                    unsafe fn avx2($($arg: $ty),*) -> $ret {
                        $imp::<true>($($arg),*)
                    }
                    if std::arch::is_x86_feature_detected!("avx512f")
                        && std::arch::is_x86_feature_detected!("fma")
                    {
                        // SAFETY: the CPU supports AVX-512F and FMA (checked just above).
                        return unsafe { avx512($($arg),*) };
                    }
                    if std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                    {
                        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
                        return unsafe { avx2($($arg),*) };
                    }
                }
                $imp::<false>($($arg),*)
            }
        };
    }

    multiversion!(row_stats, row_stats_impl, (row: &[f32]) -> (f32, usize, f32));
    multiversion!(softmax_scaled_dispatch, softmax_scaled_impl, (out: &mut [f32], x: &[f32], max: f32, a: f32) -> ());
    multiversion!(softmax_scaled2_dispatch, softmax_scaled2_impl,
        (out: &mut [f32], x: &[f32], mx: f32, a: f32, y: &[f32], my: f32, b: f32) -> ());

    /// out = a·exp(x − max) for a row of logits x with maximum `max`.
    pub(super) fn softmax_scaled(out: &mut [f32], x: &[f32], max: f32, a: f32) {
        softmax_scaled_dispatch(out, x, max, a)
    }

    /// out = a·exp(x − mx) + b·exp(y − my).
    pub(super) fn softmax_scaled2(
        out: &mut [f32],
        (x, mx, a): (&[f32], f32, f32),
        (y, my, b): (&[f32], f32, f32),
    ) {
        softmax_scaled2_dispatch(out, x, mx, a, y, my, b)
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn fast_exp_matches_the_standard_library_to_a_few_ulp() {
            let mut worst = 0.0f32;
            let mut x = -87.0f32;
            while x <= 0.0 {
                let want = x.exp();
                for got in [
                    super::exp_nonpositive::<false>(x),
                    super::exp_nonpositive::<true>(x),
                ] {
                    worst = worst.max(((got - want) / want).abs());
                }
                x += 0.000_37;
            }
            assert!(worst < 5e-7, "worst relative error {worst}");
            assert_eq!(super::exp_nonpositive::<false>(0.0), 1.0);
            assert_eq!(super::exp_nonpositive::<true>(0.0), 1.0);
            assert!(super::exp_nonpositive::<false>(-1000.0) > 0.0);
        }

        #[test]
        fn one_pass_row_statistics_match_a_two_pass_computation() {
            // Rising values make every block raise the maximum; a tie keeps the first index.
            let mut row: Vec<f32> = (0..5000)
                .map(|i| ((i * 37) % 101) as f32 * 0.05 + i as f32 * 1e-3)
                .collect();
            row[4321] = 20.0;
            row[4400] = 20.0;
            let (max, argmax, sum) = super::row_stats(&row);
            let want_max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let want_sum: f64 = row.iter().map(|&x| ((x - want_max) as f64).exp()).sum();
            assert_eq!(max, want_max);
            assert_eq!(argmax, 4321);
            assert!(
                ((sum as f64 - want_sum) / want_sum).abs() < 1e-5,
                "{sum} vs {want_sum}"
            );
            let mut out = vec![0.0; row.len()];
            super::softmax_scaled(&mut out, &row, max, 1.0 / sum);
            let total: f32 = out.iter().sum();
            assert!((total - 1.0).abs() < 1e-4);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::objective::{Objective, RowStats};
    use candle_core::{Var, D};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    struct Case {
        h: Tensor,
        w: Tensor,
        labels: Vec<u32>,
        valid: Vec<bool>,
        layout: BlockLayout,
        a: Tensor,
        w2: Tensor,
    }

    /// Random rows where about 60% of labels are the base argmax, so AUF sees runs of successes;
    /// one block is wholly invalid and others have invalid tails or holes.
    fn case(
        seed: u64,
        layout: BlockLayout,
        blocks: usize,
        hdim: usize,
        vocab: usize,
        edim: usize,
    ) -> Case {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n = blocks * layout.positions_per_block;
        let mut rand_t = |len: usize, scale: f32, shape: (usize, usize)| {
            let v: Vec<f32> = (0..len).map(|_| rng.gen_range(-scale..scale)).collect();
            Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
        };
        let h = rand_t(n * hdim, 1.0, (n, hdim));
        let w = rand_t(vocab * hdim, 0.5, (vocab, hdim));
        let a = rand_t(n * edim, 1.0, (n, edim));
        let w2 = rand_t(vocab * edim, 0.3, (vocab, edim));
        let argmax: Vec<u32> = h
            .matmul(&w.t().unwrap())
            .unwrap()
            .argmax(D::Minus1)
            .unwrap()
            .to_vec1()
            .unwrap();
        let p = layout.positions_per_block;
        let labels = (0..n)
            .map(|r| {
                if rng.gen_bool(0.6) {
                    argmax[r]
                } else {
                    rng.gen_range(0..vocab as u32)
                }
            })
            .collect();
        let valid = (0..n)
            .map(|r| match (r / p) % 4 {
                1 => r % p < p - 2,
                2 => r % p != 2,
                3 if r / p == 3 => false,
                _ => true,
            })
            .collect();
        Case {
            h,
            w,
            labels,
            valid,
            layout,
            a,
            w2,
        }
    }

    struct Naive {
        loss: f32,
        grad_h: Tensor,
        grad_a: Option<Tensor>,
        grad_w2: Option<Tensor>,
        weights: Vec<f32>,
    }

    fn ce_and_stats(logits: &Tensor, labels: &Tensor) -> (Tensor, Vec<bool>, Vec<f32>) {
        let logsm = candle_nn::ops::log_softmax(logits, D::Minus1).unwrap();
        let ce = logsm
            .gather(labels, 1)
            .unwrap()
            .squeeze(1)
            .unwrap()
            .neg()
            .unwrap();
        let argmax: Vec<u32> = logits.argmax(D::Minus1).unwrap().to_vec1().unwrap();
        let gold: Vec<u32> = labels.squeeze(1).unwrap().to_vec1().unwrap();
        let correct = argmax.iter().zip(&gold).map(|(a, g)| a == g).collect();
        let p_gold = ce
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|c| (-c).exp())
            .collect();
        (ce, correct, p_gold)
    }

    /// Full logits, autograd through candle, weights from the same objective code.
    fn naive(obj: &ResolvedObjective, c: &Case, delta: Option<(f32, usize, BaseSupport)>) -> Naive {
        let n = c.labels.len();
        let hv = Var::from_tensor(&c.h).unwrap();
        let labels = Tensor::from_vec(c.labels.clone(), (n, 1), &Device::Cpu).unwrap();
        let base_logits = hv.as_tensor().matmul(&c.w.t().unwrap()).unwrap();
        let weigh = |obj: &ResolvedObjective, correct: &[bool], p_gold: &[f32]| {
            obj.weights(
                c.layout,
                RowStats {
                    valid: &c.valid,
                    correct,
                    p_gold,
                },
                1,
                0,
            )
            .unwrap()
        };
        let term = |ce: &Tensor, w: &[f32], norm: f32| {
            let wt = Tensor::from_vec(w.to_vec(), n, &Device::Cpu).unwrap();
            ((ce * wt).unwrap().sum_all().unwrap() / norm as f64).unwrap()
        };
        match delta {
            None => {
                let (ce, correct, p_gold) = ce_and_stats(&base_logits, &labels);
                let w = weigh(obj, &correct, &p_gold);
                let loss = term(&ce, &w.w, w.normaliser);
                let grads = loss.backward().unwrap();
                Naive {
                    loss: loss.to_scalar().unwrap(),
                    grad_h: grads.get(hv.as_tensor()).unwrap().clone(),
                    grad_a: None,
                    grad_w2: None,
                    weights: w.w,
                }
            }
            Some((lambda, prefix, support)) => {
                let av = Var::from_tensor(&c.a).unwrap();
                let w2v = Var::from_tensor(&c.w2).unwrap();
                let p = c.layout.positions_per_block;
                let mask: Vec<f32> = (0..n)
                    .map(|r| if r % p < prefix { 0.0 } else { 1.0 })
                    .collect();
                let mask = Tensor::from_vec(mask, (n, 1), &Device::Cpu).unwrap();
                let delta = av
                    .as_tensor()
                    .broadcast_mul(&mask)
                    .unwrap()
                    .matmul(&w2v.as_tensor().t().unwrap())
                    .unwrap();
                let final_logits = (&base_logits + delta).unwrap();
                let (ce_f, cor_f, p_f) = ce_and_stats(&final_logits, &labels);
                let (ce_b, cor_b, p_b) = ce_and_stats(&base_logits, &labels);
                let wf = weigh(obj, &cor_f, &p_f);
                let wb = match support {
                    BaseSupport::SameAsFinal => wf.clone(),
                    BaseSupport::OwnArgmax => weigh(obj, &cor_b, &p_b),
                    BaseSupport::Unmasked => weigh(&obj.without_auf(), &cor_f, &p_f),
                };
                let loss = ((term(&ce_f, &wf.w, wf.normaliser) * (1.0 - lambda as f64)).unwrap()
                    + (term(&ce_b, &wb.w, wb.normaliser) * lambda as f64).unwrap())
                .unwrap();
                let grads = loss.backward().unwrap();
                // candle prunes a branch multiplied by exactly 0 (λ = 0 or 1): its gradient is zero.
                let grad = |v: &Var| {
                    grads
                        .get(v.as_tensor())
                        .cloned()
                        .unwrap_or_else(|| v.as_tensor().zeros_like().unwrap())
                };
                Naive {
                    loss: loss.to_scalar().unwrap(),
                    grad_h: grad(&hv),
                    grad_a: Some(grad(&av)),
                    grad_w2: Some(grad(&w2v)),
                    weights: wf.w,
                }
            }
        }
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    fn objectives() -> Vec<Objective> {
        vec![
            Objective::full(),
            Objective::decay(),
            Objective::auf(),
            Objective::auf_decay(),
            Objective::dpace(0.5),
            Objective::dpace_prefix(0.5),
        ]
    }

    fn run_head(
        chunk_rows: usize,
        obj: &ResolvedObjective,
        c: &Case,
        delta: Option<DeltaBranch<'_>>,
    ) -> HeadOutput {
        let mut head = ChunkedHead::new(HeadConfig { chunk_rows });
        let input = HeadInput {
            hidden: &c.h,
            lm_head: &c.w,
            labels: &c.labels,
            valid: &c.valid,
            layout: c.layout,
            num_sequences: 1,
            seed: 0,
            delta,
        };
        head.run(obj, &input).unwrap()
    }

    #[test]
    fn loss_and_hidden_gradient_equal_candle_autograd_for_every_objective() {
        let c = case(1, BlockLayout::dflash(8), 6, 24, 301, 0);
        for objective in objectives() {
            let obj = objective.resolve(8).unwrap();
            let want = naive(&obj, &c, None);
            // 16 rows → 2 blocks per chunk, 3 chunks.
            let got = run_head(16, &obj, &c, None);
            assert_eq!(
                got.rows
                    .weights
                    .iter()
                    .map(|&w| w > 0.0)
                    .collect::<Vec<_>>(),
                want.weights.iter().map(|&w| w > 0.0).collect::<Vec<_>>(),
                "{}",
                objective.name()
            );
            assert!(
                (got.loss - want.loss).abs() < 1e-5 * want.loss.abs().max(1.0),
                "{}: loss {} vs {}",
                objective.name(),
                got.loss,
                want.loss
            );
            let diff = max_abs_diff(&got.grad_hidden, &want.grad_h);
            println!(
                "{}: loss {} max |Δgrad_h| {diff:e}",
                objective.name(),
                got.loss
            );
            assert!(
                diff < 1e-5,
                "{}: grad_h differs by {diff}",
                objective.name()
            );
        }
    }

    #[test]
    fn chunking_does_not_change_the_result() {
        let c = case(2, BlockLayout::dflash(8), 6, 16, 200, 0);
        let obj = Objective::auf().resolve(8).unwrap();
        let one = run_head(1000, &obj, &c, None);
        let many = run_head(7, &obj, &c, None);
        assert!((one.loss - many.loss).abs() < 1e-6);
        assert!(max_abs_diff(&one.grad_hidden, &many.grad_hidden) < 1e-7);
        assert_eq!(one.rows.metrics, many.rows.metrics);
    }

    #[test]
    fn support_only_backward_equals_the_full_backward() {
        let c = case(3, BlockLayout::dflash(8), 6, 20, 257, 0);
        let obj = Objective::auf().resolve(8).unwrap();
        let got = run_head(14, &obj, &c, None);
        let n = c.labels.len();
        let support = got.rows.weights.iter().filter(|&&w| w > 0.0).count();
        assert!(
            support > 0 && support < n,
            "support {support} of {n} rows: the test needs both kinds"
        );
        // Every row, zero-weighted or not: G = w/norm·(softmax − onehot), grad = G·W.
        let logits = c.h.matmul(&c.w.t().unwrap()).unwrap();
        let softmax = candle_nn::ops::softmax_last_dim(&logits).unwrap();
        let labels = Tensor::from_vec(c.labels.clone(), n, &Device::Cpu).unwrap();
        let onehot = candle_nn::encoding::one_hot(labels, 257, 1f32, 0f32).unwrap();
        let scale: Vec<f32> = got
            .rows
            .weights
            .iter()
            .map(|w| w / got.rows.normaliser)
            .collect();
        let scale = Tensor::from_vec(scale, (n, 1), &Device::Cpu).unwrap();
        let g = (softmax - onehot).unwrap().broadcast_mul(&scale).unwrap();
        let full = g.matmul(&c.w).unwrap();
        let diff = max_abs_diff(&got.grad_hidden, &full);
        assert!(
            diff < 1e-6,
            "support-only backward differs from the full one by {diff}"
        );
        // Rows outside the support get exactly zero gradient.
        let gh: Vec<Vec<f32>> = got.grad_hidden.to_vec2().unwrap();
        for (r, row) in gh.iter().enumerate() {
            if got.rows.weights[r] == 0.0 {
                assert!(row.iter().all(|&x| x == 0.0));
            }
        }
    }

    #[test]
    fn hidden_gradient_matches_finite_differences() {
        let c = case(4, BlockLayout::dflash(8), 6, 12, 97, 0);
        // Objectives whose weights are locally constant in h; D-PACE's weights move with p_gold, and
        // the head (like SpecForge) treats them as detached, so a finite difference would see more.
        for objective in [Objective::auf_decay(), Objective::full()] {
            let obj = objective.resolve(8).unwrap();
            let base = run_head(64, &obj, &c, None);
            let gh: Vec<Vec<f32>> = base.grad_hidden.to_vec2().unwrap();
            let hv: Vec<Vec<f32>> = c.h.to_vec2().unwrap();
            let support: Vec<usize> = (0..c.labels.len())
                .filter(|&r| base.rows.weights[r] > 0.0)
                .collect();
            let eps = 1e-2f32;
            let mut checked = 0;
            for (k, &r) in support.iter().take(10).enumerate() {
                let j = (k * 5) % 12;
                let loss_at = |delta: f32| {
                    let mut h2 = hv.clone();
                    h2[r][j] += delta;
                    let flat: Vec<f32> = h2.concat();
                    let c2 = Case {
                        h: Tensor::from_vec(flat, c.h.dims2().unwrap(), &Device::Cpu).unwrap(),
                        ..clone_case(&c)
                    };
                    let out = run_head(64, &obj, &c2, None);
                    (out.loss, out.rows.correct)
                };
                let (lp, cp) = loss_at(eps);
                let (lm, cm) = loss_at(-eps);
                if cp != base.rows.correct || cm != base.rows.correct {
                    continue; // an argmax flipped: the loss is not differentiable across it
                }
                let fd = (lp - lm) / (2.0 * eps);
                let g = gh[r][j];
                assert!(
                    (fd - g).abs() < 1e-3 + 2e-2 * g.abs(),
                    "{} row {r} col {j}: fd {fd} vs {g}",
                    objective.name()
                );
                assert!(g != 0.0);
                checked += 1;
            }
            assert!(
                checked >= 3,
                "{}: only {checked} coordinates away from argmax ties",
                objective.name()
            );
        }
    }

    fn clone_case(c: &Case) -> Case {
        Case {
            h: c.h.clone(),
            w: c.w.clone(),
            labels: c.labels.clone(),
            valid: c.valid.clone(),
            layout: c.layout,
            a: c.a.clone(),
            w2: c.w2.clone(),
        }
    }

    #[test]
    fn domino_loss_and_gradients_equal_candle_autograd() {
        let c = case(5, BlockLayout::domino(8), 5, 16, 211, 6);
        for objective in [
            Objective::auf(),
            Objective::auf_decay(),
            Objective::dpace(0.5),
        ] {
            let obj = objective.resolve(8).unwrap();
            for support in [
                BaseSupport::SameAsFinal,
                BaseSupport::OwnArgmax,
                BaseSupport::Unmasked,
            ] {
                for lambda in [0.0f32, 0.3, 1.0] {
                    let want = naive(&obj, &c, Some((lambda, 1, support)));
                    let delta = DeltaBranch {
                        input: &c.a,
                        weight: &c.w2,
                        base_ce_weight: lambda,
                        base_only_prefix: 1,
                        base_support: support,
                    };
                    let got = run_head(16, &obj, &c, Some(delta));
                    let tag = format!("{} {support:?} λ={lambda}", objective.name());
                    assert!(
                        (got.loss - want.loss).abs() < 1e-5 * want.loss.abs().max(1.0),
                        "{tag}: loss {} vs {}",
                        got.loss,
                        want.loss
                    );
                    let d = got.delta.as_ref().unwrap();
                    let dh = max_abs_diff(&got.grad_hidden, &want.grad_h);
                    let da = max_abs_diff(&d.grad_input, want.grad_a.as_ref().unwrap());
                    let dw = max_abs_diff(&d.grad_weight, want.grad_w2.as_ref().unwrap());
                    assert!(
                        dh < 1e-5 && da < 1e-5 && dw < 1e-5,
                        "{tag}: Δh {dh:e} Δa {da:e} ΔW₂ {dw:e}"
                    );
                    assert_eq!(
                        got.rows
                            .weights
                            .iter()
                            .map(|&w| w > 0.0)
                            .collect::<Vec<_>>(),
                        want.weights.iter().map(|&w| w > 0.0).collect::<Vec<_>>(),
                        "{tag}"
                    );
                }
            }
        }
    }

    #[test]
    fn surrogate_backward_delivers_the_head_gradient_to_upstream_weights() {
        // h = x·Aᵀ with A trainable: dL/dA from the surrogate must equal autograd through the full head.
        let c = case(6, BlockLayout::dflash(8), 3, 10, 64, 0);
        let obj = Objective::auf().resolve(8).unwrap();
        let n = c.labels.len();
        let x = Tensor::randn(0f32, 1.0, (n, 8), &Device::Cpu).unwrap();
        let a =
            Var::from_tensor(&Tensor::randn(0f32, 0.5, (10, 8), &Device::Cpu).unwrap()).unwrap();
        let h_graph = x.matmul(&a.as_tensor().t().unwrap()).unwrap();
        let c2 = Case {
            h: h_graph.detach(),
            ..clone_case(&c)
        };
        let out = run_head(64, &obj, &c2, None);
        let grads = out.surrogate(&h_graph, None).unwrap().backward().unwrap();
        let via_surrogate = grads.get(a.as_tensor()).unwrap().clone();
        // Autograd all the way, with the head's own weights and normaliser held fixed.
        let logits = h_graph.matmul(&c.w.t().unwrap()).unwrap();
        let labels = Tensor::from_vec(c.labels.clone(), (n, 1), &Device::Cpu).unwrap();
        let (ce, _, _) = ce_and_stats(&logits, &labels);
        let wt = Tensor::from_vec(out.rows.weights.clone(), n, &Device::Cpu).unwrap();
        let loss = ((ce * wt).unwrap().sum_all().unwrap() / out.rows.normaliser as f64).unwrap();
        let direct = loss.backward().unwrap().get(a.as_tensor()).unwrap().clone();
        assert!(max_abs_diff(&via_surrogate, &direct) < 1e-5);
        assert!(
            via_surrogate
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );
    }

    #[test]
    fn bad_inputs_are_reported_with_context() {
        let c = case(7, BlockLayout::dflash(8), 2, 8, 50, 0);
        let obj = Objective::full().resolve(8).unwrap();
        let mut head = ChunkedHead::new(HeadConfig::default());
        let mut labels = c.labels.clone();
        labels[9] = 50;
        let input = HeadInput {
            hidden: &c.h,
            lm_head: &c.w,
            labels: &labels,
            valid: &c.valid,
            layout: c.layout,
            num_sequences: 1,
            seed: 0,
            delta: None,
        };
        match head.run(&obj, &input) {
            Err(HeadError::LabelOutOfRange {
                label: 50,
                row: 9,
                block: 1,
                position: 3,
                vocab: 50,
            }) => {}
            other => panic!("unexpected {other:?}"),
        }
        let h64 = c.h.to_dtype(DType::F64).unwrap();
        let input = HeadInput {
            hidden: &h64,
            labels: &c.labels,
            ..input
        };
        assert!(matches!(
            head.run(&obj, &input),
            Err(HeadError::NotCpuF32 { what: "hidden", .. })
        ));
        let short = c.h.narrow(0, 0, 13).unwrap();
        let input = HeadInput {
            hidden: &short,
            labels: &c.labels[..13],
            valid: &c.valid[..13],
            ..input
        };
        assert!(matches!(
            head.run(&obj, &input),
            Err(HeadError::Objective(ObjectiveError::Shape { .. }))
        ));
    }
}
