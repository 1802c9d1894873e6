//! Steps 6 and 7 of [`ChunkedHead::run`](super::ChunkedHead::run): gradient rows of the support
//! rows only, their products with W (and W₂), and the final division by the normalisers.
//!
//! A CE term with weight w on a row contributes w·(softmax − target) to the row's dL/dlogits, target
//! = onehot(label) or its mix with distillation targets,
//! G; dL/dh = G·W, and for Domino dL/da = G_final·W₂ and dL/dW₂ = G_finalᵀ·a. Rows with w = 0
//! contribute exactly zero, so only support rows are built and multiplied.

use std::ops::Range;

use candle_core::{Device, Tensor};

use super::batch::{Batch, DeltaRows, Mix};
use crate::nn::bf16;
use super::branch::Branches;
use super::gemm::{gemm_f32, Mat};
use super::kernels;
use super::rows::{for_row_parts, ChunkStats, RowStat};
use super::{BaseSupport, DeltaOutput, HeadError, HeadOutput, Scratch};
use crate::train::objective::ResolvedObjective;

/// One term of a gradient row: coef · w · softmax, from a chunk's logits and row statistics.
#[derive(Clone, Copy)]
struct GradTerm<'a> {
    logits: &'a [f32],
    stats: &'a [RowStat],
    weights: &'a [f32],
    coef: f32,
}

/// Writes, for each chunk-local row r in `support` (in order), the row
/// Σ_t coef_t·w_t[r]·(softmax_t[r] − target[r]) into `dst` (support.len() × vocab), target being
/// onehot(label) mixed with the soft targets ([`Batch::sub_target`]); `r0` is the chunk's first row.
fn build_grad_rows(support: &[usize], terms: &[GradTerm<'_>], batch: &Batch<'_>, r0: usize, dst: &mut [f32]) {
    let vocab = batch.vocab;
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
            let target: f32 = terms.iter().map(|t| t.coef * t.weights[r]).sum();
            batch.sub_target(r0 + r, target, out);
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

fn inv(x: f32) -> f32 {
    if x > 0.0 {
        1.0 / x
    } else {
        0.0
    }
}

/// Unnormalised gradient accumulators of one batch; scaled once the normalisers are known.
pub(super) struct GradAcc {
    /// (N, H) dL/dh of the final CE, plus the base CE's when the two share one product (`mixed`).
    gh_final: Vec<f32>,
    /// (N, H) dL/dh of the base CE when it has its own support or normaliser; empty otherwise.
    gh_base: Vec<f32>,
    /// (N, E) dL/da and (V, E) dL/dW₂ of the final CE; empty for DFlash.
    g_input: Vec<f32>,
    g_weight: Vec<f32>,
}

impl GradAcc {
    pub fn new(n: usize, batch: &Batch<'_>, mixed: bool) -> Self {
        let (hdim, edim, has_delta) = (batch.hdim, batch.edim(), batch.delta.is_some());
        GradAcc {
            gh_final: vec![0.0f32; n * hdim],
            gh_base: if has_delta && !mixed {
                vec![0.0f32; n * hdim]
            } else {
                Vec::new()
            },
            g_input: vec![0.0f32; n * edim],
            g_weight: vec![0.0f32; if has_delta { batch.vocab * edim } else { 0 }],
        }
    }

    /// Adds the gradients of the chunk's `rows`, from the logits in `scratch` and their `stats`.
    pub fn add_chunk(
        &mut self,
        scratch: &mut Scratch,
        batch: &Batch<'_>,
        mix: &Mix,
        stats: &ChunkStats,
        rows: Range<usize>,
        branches: &Branches,
    ) -> Result<(), HeadError> {
        let Scratch {
            base_logits,
            final_logits,
            grad_a,
            grad_b,
            small,
            delta_rows,
            h16: _,
            g16,
        } = scratch;
        let (r0, c) = (rows.start, rows.len());
        let fin = &branches.fin;
        // Chunk-local indices of the final branch's support rows.
        let support_f: Vec<usize> = (0..c).filter(|&j| fin.weights[r0 + j] > 0.0).collect();
        let final_term = GradTerm {
            logits: if batch.delta.is_some() {
                &final_logits[..]
            } else {
                &base_logits[..]
            },
            stats: &stats.fin[..c],
            weights: &fin.weights[rows.clone()],
            coef: 1.0,
        };
        if mix.coef_final > 0.0 && !support_f.is_empty() {
            build_grad_rows(&support_f, &[final_term], batch, r0, grad_a);
            let g_rows = &grad_a[..support_f.len() * batch.vocab];
            if let Some(d) = &batch.delta {
                self.add_delta(d, batch, r0, &support_f, g_rows, &delta_rows[..], small)?;
            }
            if !mix.mixed {
                hidden_rows(&mut self.gh_final, batch, r0, &support_f, g_rows, small, g16)?;
            }
        }
        let Some(b) = branches.base.as_ref().filter(|_| mix.coef_base > 0.0) else {
            return Ok(());
        };
        let base_term = GradTerm {
            logits: &base_logits[..],
            stats: &stats.base[..c],
            weights: &b.weights[rows],
            coef: if mix.mixed { mix.coef_base } else { 1.0 },
        };
        // Mixed: one row per final support row holding both terms, into the final accumulator.
        let (support, terms, acc): (Vec<usize>, Vec<GradTerm<'_>>, &mut Vec<f32>) = if mix.mixed {
            let f = GradTerm {
                coef: mix.coef_final,
                ..final_term
            };
            (support_f, vec![f, base_term], &mut self.gh_final)
        } else {
            let sb = (0..c).filter(|&j| b.weights[r0 + j] > 0.0).collect();
            (sb, vec![base_term], &mut self.gh_base)
        };
        if !support.is_empty() {
            build_grad_rows(&support, &terms, batch, r0, grad_b);
            let g_rows = &grad_b[..support.len() * batch.vocab];
            hidden_rows(acc, batch, r0, &support, g_rows, small, g16)?;
        }
        Ok(())
    }

    /// Domino's branch: dL/da rows = G·W₂ (kept on rows past the base-only prefix) and
    /// dL/dW₂ += Gᵀ·a_support, for the final CE's gradient rows `g_rows` (s × V) of `support`.
    #[allow(clippy::too_many_arguments)]
    fn add_delta(
        &mut self,
        d: &DeltaRows<'_>,
        batch: &Batch<'_>,
        r0: usize,
        support: &[usize],
        g_rows: &[f32],
        delta_rows: &[f32],
        small: &mut [f32],
    ) -> Result<(), HeadError> {
        let (s, vocab, edim) = (support.len(), batch.vocab, d.edim);
        let p = batch.layout.positions_per_block;
        let g = Mat::new(g_rows, vocab, 1);
        let w2 = Mat::new(d.w2, edim, 1);
        gemm_f32(s, edim, vocab, small, edim, false, g, w2)?;
        for (j, &r) in support.iter().enumerate() {
            if (r0 + r) % p >= d.base_only_prefix {
                self.g_input[(r0 + r) * edim..(r0 + r + 1) * edim]
                    .copy_from_slice(&small[j * edim..(j + 1) * edim]);
            }
        }
        // a of the support rows (base-only rows of the chunk's a are already zero).
        let mut a_s = vec![0.0f32; s * edim];
        for (j, &r) in support.iter().enumerate() {
            a_s[j * edim..(j + 1) * edim].copy_from_slice(&delta_rows[r * edim..(r + 1) * edim]);
        }
        let g_t = Mat::new(g_rows, 1, vocab);
        let a_m = Mat::new(&a_s, edim, 1);
        gemm_f32(vocab, edim, s, &mut self.g_weight, edim, true, g_t, a_m)
    }

    /// Step 7: divides the accumulated loss and gradients by the normalisers and builds the output.
    pub fn finish(
        self,
        objective: &ResolvedObjective,
        mix: &Mix,
        num_sequences: usize,
        branches: Branches,
        batch: &Batch<'_>,
        device: &Device,
    ) -> Result<HeadOutput, HeadError> {
        let n = batch.labels.len();
        let n_final = objective.normaliser(&branches.fin.totals, num_sequences);
        let rows = branches.fin.finish(n_final);
        let (loss, grad_hidden, delta) = match branches.base {
            Some(b) => {
                let n_base = match mix.base_support {
                    Some(BaseSupport::SameAsFinal) => n_final,
                    _ => mix.base_objective.normaliser(&b.totals, num_sequences),
                };
                let base = b.finish(n_base);
                let loss = mix.coef_final * rows.loss + mix.coef_base * base.loss;
                let (gh, delta) = self.scale_domino(mix, n_final, base, batch, device)?;
                (loss, gh, Some(delta))
            }
            None => {
                let s = inv(n_final);
                let mut gh = self.gh_final;
                for x in gh.iter_mut() {
                    *x *= s;
                }
                (rows.loss, gh, None)
            }
        };
        Ok(HeadOutput {
            loss,
            grad_hidden: Tensor::from_vec(grad_hidden, (n, batch.hdim), device)?,
            rows,
            delta,
        })
    }

    /// Domino's scaling: dL/dh = s_final·gh_final + s_base·gh_base (in that order), and the delta
    /// gradients scaled by (1-λ)/n_final.
    fn scale_domino(
        self,
        mix: &Mix,
        n_final: f32,
        base: super::RowOutputs,
        batch: &Batch<'_>,
        device: &Device,
    ) -> Result<(Vec<f32>, DeltaOutput), HeadError> {
        let GradAcc {
            gh_final,
            gh_base,
            mut g_input,
            mut g_weight,
        } = self;
        let (n, edim) = (batch.labels.len(), batch.edim());
        // Mixed rows already carry (1-λ) and λ inside them.
        let s_final = if mix.mixed {
            inv(n_final)
        } else {
            mix.coef_final * inv(n_final)
        };
        let s_base = mix.coef_base * inv(base.normaliser);
        let mut gh = gh_final;
        for x in gh.iter_mut() {
            *x *= s_final;
        }
        for (x, y) in gh.iter_mut().zip(&gh_base) {
            *x += s_base * y;
        }
        let s_delta = mix.coef_final * inv(n_final);
        for x in g_input.iter_mut().chain(g_weight.iter_mut()) {
            *x *= s_delta;
        }
        let delta = DeltaOutput {
            grad_input: Tensor::from_vec(g_input, (n, edim), device)?,
            grad_weight: Tensor::from_vec(g_weight, (batch.vocab, edim), device)?,
            base,
        };
        Ok((gh, delta))
    }
}

/// acc[r0 + support] += g_rows·W: the (s × V) gradient rows times the LM head (V × H), through
/// `small` (s × H).
fn hidden_rows(
    acc: &mut [f32],
    batch: &Batch<'_>,
    r0: usize,
    support: &[usize],
    g_rows: &[f32],
    small: &mut [f32],
    g16: &mut [u32],
) -> Result<(), HeadError> {
    let (s, hdim, vocab) = (support.len(), batch.hdim, batch.vocab);
    if let Some(packed) = batch.w16 {
        let vp = vocab.div_ceil(2);
        bf16::pack_rows(g_rows, vocab, &mut g16[..s * vp]);
        bf16::gemm(s, g16, vp, &packed.wm, small, hdim, false);
    } else {
        gemm_f32(s, hdim, vocab, small, hdim, false, Mat::new(g_rows, vocab, 1), batch.w_m())?;
    }
    scatter_add(acc, hdim, r0, support, small);
    Ok(())
}
