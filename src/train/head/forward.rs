//! Steps 2 and 3 of [`ChunkedHead::run`](super::ChunkedHead::run): the scratch buffers and a
//! chunk's logits, written into them.

use std::ops::Range;

use rayon::prelude::*;

use super::batch::Batch;
use crate::nn::bf16;
use super::rows::{row_stat, RowStat};
use crate::train::objective::{BlockRows, ResolvedObjective};
use super::gemm::{gemm_f32, Mat};
use super::{HeadError, Scratch};

/// Grows `buf` to at least `len` floats (contents unspecified).
fn ensure_len(buf: &mut Vec<f32>, len: usize) {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
}

impl Scratch {
    /// Room for chunks of up to `c_max` rows of `batch`.
    pub(super) fn reserve(&mut self, c_max: usize, batch: &Batch<'_>) {
        let (vocab, hdim, edim) = (batch.vocab, batch.hdim, batch.edim());
        ensure_len(&mut self.base_logits, c_max * vocab);
        ensure_len(&mut self.grad_a, c_max * vocab);
        ensure_len(&mut self.small, c_max * hdim.max(edim));
        if batch.w16.is_some() {
            self.h16.resize(self.h16.len().max(c_max * hdim.div_ceil(2)), 0);
            self.g16.resize(self.g16.len().max(c_max * vocab.div_ceil(2)), 0);
        }
        if batch.delta.is_some() {
            ensure_len(&mut self.final_logits, c_max * vocab);
            ensure_len(&mut self.grad_b, c_max * vocab);
            ensure_len(&mut self.delta_rows, c_max * edim);
        }
    }

    /// The emitted logits: base + delta for Domino, the base logits for DFlash.
    pub(super) fn final_logits(&self, batch: &Batch<'_>) -> &[f32] {
        if batch.delta.is_some() {
            &self.final_logits
        } else {
            &self.base_logits
        }
    }

    /// The logits of the chunk's `rows` (c of them): base (c, V) = h·Wᵀ, and for Domino
    /// final (c, V) = base + a·W₂ᵀ with a zeroed on base-only rows (kept in `delta_rows`).
    pub(super) fn logits(
        &mut self,
        batch: &Batch<'_>,
        rows: Range<usize>,
    ) -> Result<(), HeadError> {
        let (r0, r1, c) = (rows.start, rows.end, rows.len());
        let (hdim, vocab) = (batch.hdim, batch.vocab);
        let h_rows = &batch.h[r0 * hdim..r1 * hdim];
        if let Some(packed) = batch.w16 {
            let hp = hdim.div_ceil(2);
            bf16::pack_rows(h_rows, hdim, &mut self.h16[..c * hp]);
            bf16::gemm(c, &self.h16, hp, &packed.wt, &mut self.base_logits, vocab, false);
        } else {
            gemm_f32(
                c,
                vocab,
                hdim,
                &mut self.base_logits,
                vocab,
                false,
                Mat::new(h_rows, hdim, 1),
                batch.w_t(),
            )?;
        }
        let Some(d) = &batch.delta else {
            return Ok(());
        };
        let (p, edim) = (batch.layout.positions_per_block, d.edim);
        for j in 0..c {
            let dst = &mut self.delta_rows[j * edim..(j + 1) * edim];
            if (r0 + j) % p < d.base_only_prefix {
                dst.fill(0.0);
            } else {
                dst.copy_from_slice(&d.a[(r0 + j) * edim..(r0 + j + 1) * edim]);
            }
        }
        self.final_logits[..c * vocab].copy_from_slice(&self.base_logits[..c * vocab]);
        let a_c = Mat::new(&self.delta_rows[..c * edim], edim, 1);
        let w2_t = Mat::new(d.w2, 1, edim);
        gemm_f32(
            c,
            vocab,
            edim,
            &mut self.final_logits,
            vocab,
            true,
            a_c,
            w2_t,
        )
    }

    /// The logits of the chunk's `rows` that `objective` can weigh above zero, and only those
    /// (DFlash, [`ResolvedObjective::stops_at_first_failure`]), with their statistics in `stats`
    /// (c rows; the rows left out get those of an invalid row): each round weighs the chunk's
    /// blocks from what is known, a row without logits counting as a failure, and scores the rows
    /// that came out with a weight and no logits yet, i.e. the next position of every block
    /// still without a failure. The logits land in `base_logits` at their rows.
    pub(super) fn logits_until_failure(
        &mut self,
        batch: &Batch<'_>,
        objective: &ResolvedObjective,
        rows: Range<usize>,
        stats: &mut [RowStat],
    ) -> Result<(), HeadError> {
        let (r0, c, vocab) = (rows.start, rows.len(), batch.vocab);
        let p = batch.layout.positions_per_block;
        stats.fill(RowStat::default());
        let mut computed = vec![false; c];
        let mut correct = vec![false; c];
        let mut p_gold = vec![0.0f32; c];
        let mut w = vec![0.0f32; c];
        loop {
            for b in (0..c).step_by(p) {
                let block = BlockRows {
                    valid: &batch.valid[r0 + b..r0 + b + p],
                    correct: &correct[b..b + p],
                    p_gold: &p_gold[b..b + p],
                    first_row: r0 + b,
                };
                objective.block_weights(block, batch.seed, &mut w[b..b + p]);
            }
            let need: Vec<usize> = (0..c).filter(|&j| w[j] > 0.0 && !computed[j]).collect();
            if need.is_empty() {
                return Ok(());
            }
            self.logits_of(batch, r0, &need)?;
            let logits = &self.base_logits;
            let found: Vec<RowStat> =
                need.par_iter().map(|&j| row_stat(&logits[j * vocab..(j + 1) * vocab], batch, r0 + j)).collect();
            for (&j, s) in need.iter().zip(found) {
                computed[j] = true;
                correct[j] = s.correct;
                p_gold[j] = s.p_gold;
                stats[j] = s;
            }
        }
    }

    /// base_logits rows `need` (chunk-local, r0 the chunk's first batch row) = h·Wᵀ, through
    /// `small` (the gathered h rows) and `grad_a` (their logits, free until step 6).
    fn logits_of(&mut self, batch: &Batch<'_>, r0: usize, need: &[usize]) -> Result<(), HeadError> {
        let (hdim, vocab, k) = (batch.hdim, batch.vocab, need.len());
        for (i, &j) in need.iter().enumerate() {
            self.small[i * hdim..(i + 1) * hdim].copy_from_slice(&batch.h[(r0 + j) * hdim..(r0 + j + 1) * hdim]);
        }
        if let Some(packed) = batch.w16 {
            let hp = hdim.div_ceil(2);
            bf16::pack_rows(&self.small[..k * hdim], hdim, &mut self.h16[..k * hp]);
            bf16::gemm(k, &self.h16, hp, &packed.wt, &mut self.grad_a, vocab, false);
        } else {
            gemm_f32(k, vocab, hdim, &mut self.grad_a, vocab, false, Mat::new(&self.small[..k * hdim], hdim, 1), batch.w_t())?;
        }
        for (i, &j) in need.iter().enumerate() {
            self.base_logits[j * vocab..(j + 1) * vocab].copy_from_slice(&self.grad_a[i * vocab..(i + 1) * vocab]);
        }
        Ok(())
    }
}
