//! Steps 2 and 3 of [`ChunkedHead::run`](super::ChunkedHead::run): the scratch buffers and a
//! chunk's logits, written into them.

use std::ops::Range;

use super::batch::Batch;
use super::bf16;
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
}
