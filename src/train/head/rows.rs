//! Step 4 of [`ChunkedHead::run`](super::ChunkedHead::run): per-row statistics of a chunk's
//! logits in one read of each row, and the row-parallel driver the gradient rows share.

use std::ops::Range;

use super::batch::Batch;
use super::branch::Branches;
use super::kernels;
use super::Scratch;

/// Forward statistics of one row.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct RowStat {
    pub ce: f32,
    pub p_gold: f32,
    /// Row maximum of the logits and 1 / Σ exp(logit − max): softmax = exp(logit − max)·inv_sum.
    pub max: f32,
    pub inv_sum: f32,
    pub correct: bool,
}

/// Splits `out` (rows × width) into one contiguous part of rows per worker thread and runs
/// `f(row_range, part)` on each.
pub(super) fn for_row_parts<T: Send>(
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

/// Fills `stats` for the chunk's rows of logits `buf` (rows × vocab), reading it once (and the
/// few soft-target logits again); `r0` is the chunk's first batch row.
fn chunk_row_stats(buf: &[f32], batch: &Batch<'_>, r0: usize, stats: &mut [RowStat]) {
    let vocab = batch.vocab;
    let rows = stats.len();
    for_row_parts(rows, 1, stats, |range, out| {
        for (j, r) in range.enumerate() {
            out[j] = row_stat(&buf[r * vocab..(r + 1) * vocab], batch, r0 + r);
        }
    });
}

/// The statistics of batch row `r` from its logits `row`; an invalid row (or a label outside the
/// vocabulary) gets the default (ce 0, not correct).
pub(super) fn row_stat(row: &[f32], batch: &Batch<'_>, r: usize) -> RowStat {
    let label = batch.labels[r] as usize;
    if !batch.valid[r] || label >= batch.vocab {
        return RowStat::default();
    }
    let (max, argmax, sum) = kernels::row_stats(row);
    // CE = logsumexp − Σ target·logit = ln Σ + (max − Σ target·logit); with hard labels
    // Σ target·logit = logit[label]. p_gold is always the hard label's probability.
    let ce = sum.ln() + (max - batch.target_dot(r, row));
    RowStat {
        ce,
        p_gold: if batch.soft.is_none() { (-ce).exp() } else { (row[label] - max).exp() / sum },
        max,
        inv_sum: 1.0 / sum,
        correct: argmax == label,
    }
}

/// The row statistics of one chunk: of the final logits and, for Domino, of the base logits.
pub(super) struct ChunkStats {
    /// (c) statistics of the emitted logits (base + delta for Domino).
    pub fin: Vec<RowStat>,
    /// (c) statistics of the base logits h·Wᵀ (Domino only).
    pub base: Vec<RowStat>,
}

impl ChunkStats {
    pub fn new(c_max: usize) -> Self {
        ChunkStats {
            fin: vec![RowStat::default(); c_max],
            base: vec![RowStat::default(); c_max],
        }
    }

    /// Statistics of the chunk's `rows` from the logits in `scratch`, recorded into the branches.
    pub fn fill(
        &mut self,
        scratch: &Scratch,
        batch: &Batch<'_>,
        rows: Range<usize>,
        branches: &mut Branches,
    ) {
        let (r0, c, vocab) = (rows.start, rows.len(), batch.vocab);
        let final_buf = scratch.final_logits(batch);
        chunk_row_stats(&final_buf[..c * vocab], batch, r0, &mut self.fin[..c]);
        branches.fin.record_stats(r0, &self.fin[..c]);
        if let Some(b) = branches.base.as_mut() {
            chunk_row_stats(&scratch.base_logits[..c * vocab], batch, r0, &mut self.base[..c]);
            b.record_stats(r0, &self.base[..c]);
        }
    }
}
