//! The head on the generic path (DESIGN §7.11): the same loss, weights, metrics and gradients
//! as [`ChunkedHead`](super::ChunkedHead), written as chunked candle tensor ops (matmul,
//! log-sum-exp, gather, scatter-add) that run on any device.
//!
//! Per chunk of whole blocks: logits = h·Wᵀ (Domino: + a·W₂ᵀ, a zeroed on base-only rows) on
//! the device; the per-row statistics (CE, p_gold, correctness) come to the host as c numbers
//! each, where the objective weighs the blocks with the very code the CPU head uses
//! ([`Branches`]); then G = w·(softmax − onehot(label)) and G·W (Domino: G·W₂ and Gᵀ·a) on the
//! device. It multiplies every row, not only the support rows: the saving of skipping w = 0
//! rows is the CPU kernel's. The normalisers are known after the last chunk, so the chunk
//! gradients are kept unscaled and scaled once at the end.

use candle_core::{DType, Tensor, D};

use super::batch::{check_delta, check_rows, check_soft, Batch, DeltaRows, Mix};
use super::branch::Branches;
use super::rows::RowStat;
use super::{BaseSupport, DeltaOutput, HeadConfig, HeadError, HeadInput, HeadOutput};
use crate::train::objective::ResolvedObjective;

/// The generic head; holds no buffers (the device allocator reuses them).
#[derive(Debug, Clone)]
pub struct GenericHead {
    pub config: HeadConfig,
    /// The dtype of the three products (logits, G·W, Domino's G·W₂ and Gᵀ·a): the backend's
    /// compute dtype, bf16 on CUDA; the softmax statistics and gradients stay f32.
    pub dtype: DType,
}

/// The unscaled gradient pieces of one batch, one tensor per chunk.
#[derive(Default)]
struct Pieces {
    /// (c, H) G_final·W per chunk.
    gh_final: Vec<Tensor>,
    /// (c, H) G_base·W per chunk (Domino).
    gh_base: Vec<Tensor>,
    /// (c, E) G_final·W₂ per chunk, zero on base-only rows (Domino).
    g_input: Vec<Tensor>,
    /// (V, E) Σ G_finalᵀ·a (Domino).
    g_weight: Option<Tensor>,
}

impl GenericHead {
    pub fn new(config: HeadConfig) -> Self {
        GenericHead { config, dtype: DType::F32 }
    }

    /// [`GenericHead::new`] with its products in `dtype`.
    pub fn with_dtype(config: HeadConfig, dtype: DType) -> Self {
        GenericHead { config, dtype }
    }

    /// What [`ChunkedHead::run`](super::ChunkedHead::run) returns, on the device of `input`.
    pub fn run(&mut self, objective: &ResolvedObjective, input: &HeadInput<'_>) -> Result<HeadOutput, HeadError> {
        let (n, hdim, vocab) = check_rows(input)?;
        let delta_input = check_delta(input, n, vocab)?;
        let soft = check_soft(input, n, vocab)?;
        let mix = Mix::new(objective, input.delta);
        // The objective's weighing reads only the layout, validity, seed and whether a delta
        // branch exists: a batch with no host copies of the tensors.
        let batch = Batch {
            h: &[],
            w: &[],
            w16: None,
            labels: input.labels,
            valid: input.valid,
            layout: input.layout,
            seed: input.seed,
            hdim,
            vocab,
            delta: delta_input.as_ref().map(|(_, edim, d)| DeltaRows { a: &[], w2: &[], edim: *edim, base_only_prefix: d.base_only_prefix }),
            soft: None,
        };
        let device = input.hidden.device();
        let h = input.hidden.to_dtype(DType::F32)?;
        let w = input.lm_head.to_dtype(DType::F32)?;
        let p = input.layout.positions_per_block;
        let chunk_rows = (self.config.chunk_rows / p).max(1) * p;
        let mut branches = Branches::new(n, &batch);
        let mut pieces = Pieces::default();
        let mut r0 = 0;
        while r0 < n {
            let c = chunk_rows.min(n - r0);
            let rows = r0..r0 + c;
            // Labels of invalid rows may lie outside the vocabulary: gather row 0 for them.
            let labels: Vec<u32> = rows.clone().map(|r| if input.valid[r] { input.labels[r] } else { 0 }).collect();
            let labels = Tensor::from_vec(labels, (c, 1), device)?;
            // 1. logits (c, V): base, and final = base + a·W₂ᵀ for Domino.
            let mm = |x: &Tensor, y: &Tensor| -> candle_core::Result<Tensor> { x.to_dtype(self.dtype)?.matmul(&y.to_dtype(self.dtype)?)?.to_dtype(DType::F32) };
            let base = mm(&h.narrow(0, r0, c)?, &w.t()?)?;
            let a = match &delta_input {
                Some((a, _, d)) => {
                    let keep: Vec<f32> = rows.clone().map(|r| if r % p >= d.base_only_prefix { 1.0 } else { 0.0 }).collect();
                    let keep = Tensor::from_vec(keep, (c, 1), device)?;
                    Some((a.narrow(0, r0, c)?.to_dtype(DType::F32)?.broadcast_mul(&keep)?, d.weight.to_dtype(DType::F32)?, keep))
                }
                None => None,
            };
            let fin = match &a {
                Some((a, w2, _)) => (&base + mm(a, &w2.t()?)?)?,
                None => base.clone(),
            };
            // The CE target: onehot(label), mixed with the distillation targets when there are any.
            let onehot = Tensor::zeros((c, vocab), DType::F32, device)?.scatter_add(&labels, &Tensor::ones((c, 1), DType::F32, device)?, 1)?;
            let target = match &soft {
                None => onehot,
                Some(s) => {
                    let ids = Tensor::from_slice(&s.ids[r0 * s.k..(r0 + c) * s.k], (c, s.k), device)?;
                    let probs = (Tensor::from_slice(&s.probs[r0 * s.k..(r0 + c) * s.k], (c, s.k), device)? * f64::from(s.weight))?;
                    (onehot * f64::from(1.0 - s.weight))?.scatter_add(&ids, &probs, 1)?
                }
            };
            // 2. row statistics to the host; 3. weights, block by block, as the CPU head weighs.
            let (fin_stats, fin_soft) = row_stats(&fin, &labels, &target, &input.valid[rows.clone()])?;
            branches.fin.record_stats(r0, &fin_stats);
            let base_soft = match branches.base.as_mut() {
                Some(b) => {
                    let (stats, soft) = row_stats(&base, &labels, &target, &input.valid[rows.clone()])?;
                    b.record_stats(r0, &stats);
                    Some(soft)
                }
                None => None,
            };
            branches.weigh_chunk(objective, &mix, &batch, rows.clone());
            // 4. unscaled gradients: G = w·(softmax − target), then its products.
            let weighted = |softmax: &Tensor, weights: &[f32]| -> Result<Tensor, HeadError> {
                let wt = Tensor::from_slice(&weights[rows.clone()], (c, 1), device)?;
                Ok((softmax - &target)?.broadcast_mul(&wt)?)
            };
            let g_fin = weighted(&fin_soft, &branches.fin.weights)?;
            pieces.gh_final.push(mm(&g_fin, &w)?);
            if let (Some(b), Some(soft)) = (&branches.base, &base_soft) {
                pieces.gh_base.push(mm(&weighted(soft, &b.weights)?, &w)?);
            }
            if let Some((a, w2, keep)) = &a {
                pieces.g_input.push(mm(&g_fin, w2)?.broadcast_mul(keep)?);
                let gw = mm(&g_fin.t()?, a)?;
                pieces.g_weight = Some(match pieces.g_weight.take() {
                    Some(acc) => (acc + gw)?,
                    None => gw,
                });
            }
            r0 += c;
        }
        finish(objective, &mix, input.num_sequences, branches, pieces)
    }
}

/// Per-row statistics of `logits` (c, V) against the CE `target` (c, V) and `labels` (c, 1) as
/// the CPU head defines them (CE = −Σ target·log-softmax; p_gold and correctness from the hard
/// label; invalid rows: ce = 0, p_gold = 0, not correct), and the softmax (c, V).
fn row_stats(logits: &Tensor, labels: &Tensor, target: &Tensor, valid: &[bool]) -> Result<(Vec<RowStat>, Tensor), HeadError> {
    let max = logits.max_keepdim(D::Minus1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let sum = shifted.exp()?.sum_keepdim(D::Minus1)?;
    // log-softmax = (logits − max) − log Σ exp(logits − max)
    let logp = shifted.broadcast_sub(&sum.log()?)?;
    let ce: Vec<f32> = (&logp * target)?.sum_keepdim(D::Minus1)?.neg()?.flatten_all()?.to_vec1()?;
    let logp_gold: Vec<f32> = logp.gather(labels, 1)?.flatten_all()?.to_vec1()?;
    let argmax: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
    let gold: Vec<u32> = labels.flatten_all()?.to_vec1()?;
    let max_h: Vec<f32> = max.flatten_all()?.to_vec1()?;
    let sum_h: Vec<f32> = sum.flatten_all()?.to_vec1()?;
    let stats = (0..valid.len())
        .map(|j| {
            let v = valid[j];
            RowStat {
                ce: if v { ce[j] } else { 0.0 },
                p_gold: if v { logp_gold[j].exp() } else { 0.0 },
                max: max_h[j],
                inv_sum: 1.0 / sum_h[j],
                correct: v && argmax[j] == gold[j],
            }
        })
        .collect();
    Ok((stats, logp.exp()?))
}

fn inv(x: f32) -> f64 {
    if x > 0.0 {
        1.0 / f64::from(x)
    } else {
        0.0
    }
}

/// Divides by the normalisers (as the CPU head's step 7) and builds the output.
fn finish(objective: &ResolvedObjective, mix: &Mix, num_sequences: usize, branches: Branches, pieces: Pieces) -> Result<HeadOutput, HeadError> {
    let n_final = objective.normaliser(&branches.fin.totals, num_sequences);
    let rows = branches.fin.finish(n_final);
    let gh_final = Tensor::cat(&pieces.gh_final, 0)?;
    let Some(b) = branches.base else {
        return Ok(HeadOutput { loss: rows.loss, grad_hidden: (gh_final * inv(n_final))?, rows, delta: None });
    };
    let n_base = match mix.base_support {
        Some(BaseSupport::SameAsFinal) => n_final,
        _ => mix.base_objective.normaliser(&b.totals, num_sequences),
    };
    let base = b.finish(n_base);
    let loss = mix.coef_final * rows.loss + mix.coef_base * base.loss;
    let s_final = f64::from(mix.coef_final) * inv(n_final);
    let s_base = f64::from(mix.coef_base) * inv(n_base);
    let grad_hidden = ((gh_final * s_final)? + (Tensor::cat(&pieces.gh_base, 0)? * s_base)?)?;
    let g_weight = pieces.g_weight.ok_or_else(|| candle_core::Error::Msg("Domino head: no chunk ran".into()))?;
    let delta = DeltaOutput { grad_input: (Tensor::cat(&pieces.g_input, 0)? * s_final)?, grad_weight: (g_weight * s_final)?, base };
    Ok(HeadOutput { loss, grad_hidden, rows, delta: Some(delta) })
}
