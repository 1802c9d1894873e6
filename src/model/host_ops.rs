//! The target's elementwise steps on host slices, for the CPU kernel path's layer forward
//! (`Target::forward_batch`): RMSNorm, rotate-half RoPE and the residual add, each written with
//! the expression candle-nn 0.11 uses for the same op, so the bits are those of
//! `candle_nn::ops::rms_norm`, `candle_nn::rotary_emb::rope` and a tensor add (tested below).
//!
//! Why: a layer of a decode step or a verify is a few dozen small ops. As candle tensors each
//! one allocates its output and some dispatch to the thread pool, which cost about 1 ms of a
//! 7–8 ms q8 decode step and 3 ms of an 8-token verify (examples/forward_ab, docs/perf.md).
//! On slices the layer writes into buffers it reuses from layer to layer.

use rayon::prelude::*;

/// Rows above which a step is split over the pool (candle splits RMSNorm above 32 rows too).
const PARALLEL_ROWS: usize = 32;

/// A row's root mean square with eps, as candle's `rms_row` computes it (the divisor).
fn rms(row: &[f32], eps: f32) -> f32 {
    let sum2 = row.iter().map(|&v| v * v).sum::<f32>();
    (sum2 / row.len() as f32 + eps).sqrt()
}

/// out = RMSNorm(x) · w, row by row over rows of `w.len()` values: candle's `rms_row`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let dim = w.len();
    debug_assert!(x.len() == out.len() && x.len().is_multiple_of(dim.max(1)));
    let row = |(src, dst): (&[f32], &mut [f32])| {
        let m = rms(src, eps);
        for ((d, s), a) in dst.iter_mut().zip(src).zip(w) {
            *d = *s / m * *a
        }
    };
    if x.len() / dim.max(1) > PARALLEL_ROWS {
        x.par_chunks(dim).zip(out.par_chunks_mut(dim)).for_each(row);
    } else {
        x.chunks(dim).zip(out.chunks_mut(dim)).for_each(row);
    }
}

/// RMSNorm in place (the per-head q/k norm of Qwen3): the same arithmetic as [`rms_norm`].
pub fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    let dim = w.len();
    let row = |v: &mut [f32]| {
        let m = rms(v, eps);
        for (d, a) in v.iter_mut().zip(w) {
            *d = *d / m * *a
        }
    };
    if x.len() / dim.max(1) > PARALLEL_ROWS * 8 {
        x.par_chunks_mut(dim).for_each(row);
    } else {
        x.chunks_mut(dim).for_each(row);
    }
}

/// Rotate-half RoPE in place on x (rows, heads, hd): row r's heads are rotated by cos/sin row r
/// (each `hd/2` values), as candle's `rope` computes `(1, heads, rows, hd)` with (rows, hd/2)
/// tables.
pub fn rope_in_place(x: &mut [f32], heads: usize, hd: usize, cos: &[f32], sin: &[f32]) {
    let half = hd / 2;
    let row = |(r, v): (usize, &mut [f32])| {
        let (c, s) = (&cos[r * half..(r + 1) * half], &sin[r * half..(r + 1) * half]);
        for head in v.chunks_exact_mut(hd) {
            for i in 0..half {
                let (x1, x2) = (head[i], head[i + half]);
                head[i] = x1 * c[i] - x2 * s[i];
                head[i + half] = x1 * s[i] + x2 * c[i];
            }
        }
    };
    if x.len() / (heads * hd).max(1) > PARALLEL_ROWS {
        x.par_chunks_mut(heads * hd).enumerate().for_each(row);
    } else {
        x.chunks_mut(heads * hd).enumerate().for_each(row);
    }
}

/// x += y elementwise (a tensor add's bits: x + y).
pub fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += *b;
    }
}

/// y (rows, b.len()) += b on every row (a broadcast bias add's bits).
pub fn add_bias(y: &mut [f32], b: &[f32]) {
    for row in y.chunks_mut(b.len().max(1)) {
        add_in_place(row, b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| (((i * 7919 + seed * 104729) % 2003) as f32 - 1001.0) * 0.0137).collect()
    }

    fn same(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    #[test]
    fn rms_norm_has_candles_bits_below_and_above_the_parallel_split() {
        for rows in [1usize, 8, 33, 70] {
            let dim = 576;
            let (x, w) = (values(rows * dim, rows), values(dim, 99));
            let want = candle_nn::ops::rms_norm(
                &Tensor::from_vec(x.clone(), (rows, dim), &Device::Cpu).unwrap(),
                &Tensor::from_vec(w.clone(), dim, &Device::Cpu).unwrap(),
                1e-5,
            )
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
            let mut got = vec![0f32; x.len()];
            rms_norm(&x, &w, 1e-5, &mut got);
            assert!(same(&got, &want), "{rows} rows");
            let mut inplace = x.clone();
            rms_norm_in_place(&mut inplace, &w, 1e-5);
            assert!(same(&inplace, &want), "{rows} rows, in place");
        }
    }

    #[test]
    fn rope_has_candles_bits_for_one_and_many_rows() {
        for rows in [1usize, 8, 40] {
            let (heads, hd) = (3, 64);
            let x = values(rows * heads * hd, rows + 1);
            let cos: Vec<f32> = values(rows * hd / 2, 5).iter().map(|v| v.cos()).collect();
            let sin: Vec<f32> = values(rows * hd / 2, 5).iter().map(|v| v.sin()).collect();
            let t = Tensor::from_vec(x.clone(), (rows, heads, hd), &Device::Cpu).unwrap();
            let c = Tensor::from_vec(cos.clone(), (rows, hd / 2), &Device::Cpu).unwrap();
            let s = Tensor::from_vec(sin.clone(), (rows, hd / 2), &Device::Cpu).unwrap();
            // What the tensor path of the target does: (1, heads, rows, hd), rope, and back.
            let r = candle_nn::rotary_emb::rope(&t.transpose(0, 1).unwrap().unsqueeze(0).unwrap().contiguous().unwrap(), &c, &s).unwrap();
            let want = r.squeeze(0).unwrap().transpose(0, 1).unwrap().contiguous().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mut got = x;
            rope_in_place(&mut got, heads, hd, &cos, &sin);
            assert!(same(&got, &want), "{rows} rows");
        }
    }

    #[test]
    fn the_adds_have_a_tensor_adds_bits() {
        let (x, y, b) = (values(24, 1), values(24, 2), values(6, 3));
        let tx = Tensor::from_vec(x.clone(), (4, 6), &Device::Cpu).unwrap();
        let ty = Tensor::from_vec(y.clone(), (4, 6), &Device::Cpu).unwrap();
        let tb = Tensor::from_vec(b.clone(), 6, &Device::Cpu).unwrap();
        let mut sum = x.clone();
        add_in_place(&mut sum, &y);
        assert!(same(&sum, &(&tx + &ty).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()));
        let mut biased = x;
        add_bias(&mut biased, &b);
        assert!(same(&biased, &tx.broadcast_add(&tb).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()));
    }
}
