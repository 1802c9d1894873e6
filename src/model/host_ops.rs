//! The target's elementwise steps on host slices, for the CPU kernel path's layer forward
//! (`Target::forward_batch`): RMSNorm, rotate-half RoPE and the residual add, each written with
//! the expression candle-nn 0.11 uses for the same op, so the bits are those of
//! `candle_nn::ops::rms_norm`, `candle_nn::rotary_emb::rope` and a tensor add (tested below);
//! and SiLU · up with a vectorized e^x of its own ([`silu_mul`], within float rounding of
//! candle's, used by the tensor layers of the kernel path too, so both give the same bits).
//!
//! Why: a layer of a decode step or a verify is a few dozen small ops. As candle tensors each
//! one allocates its output and some dispatch to the thread pool, which cost about 1 ms of a
//! 7–8 ms q8 decode step and 3 ms of an 8-token verify (examples/forward_ab, docs/perf.md).
//! On slices the layer writes into buffers it reuses from layer to layer.

use rayon::prelude::*;

/// Rows above which a step is split over the pool (candle splits RMSNorm above 32 rows too).
pub(crate) const PARALLEL_ROWS: usize = 32;

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

/// g ← silu(g) · u = g / (1 + e^(−g)) · u elementwise, with e^x from [`exp`]: AVX-512 sixteen
/// lanes at a time where the CPU has it, the same arithmetic one value at a time elsewhere (the
/// same bits for every x whose e^x is a normal float; tested). Every element goes through the same
/// operations whatever its position or the length, so a row's result does not depend on the
/// batch; large products (a verify, a prefill) are split over the pool, which changes no bit.
/// libm's `expf`, which candle's silu calls, one value at a time was about 4% of a decode step.
pub fn silu_mul(g: &mut [f32], u: &[f32]) {
    debug_assert_eq!(g.len(), u.len());
    if g.len() >= SILU_PARALLEL_MIN {
        g.par_chunks_mut(4096).zip(u.par_chunks(4096)).for_each(|(g, u)| silu_mul_serial(g, u));
    } else {
        silu_mul_serial(g, u);
    }
}

/// Elements below which [`silu_mul`] stays on the calling thread.
const SILU_PARALLEL_MIN: usize = 8192;

/// [`silu_mul`] on the calling thread whatever the length.
pub(crate) fn silu_mul_serial(g: &mut [f32], u: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the feature was just detected; the lengths are equal.
        unsafe { silu_mul_avx512(g, u) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the features were just detected.
        unsafe { silu_mul_fma(g, u) };
        return;
    }
    silu_mul_scalar(g, u);
}

#[inline(always)]
fn silu_mul_scalar(g: &mut [f32], u: &[f32]) {
    for (g, &u) in g.iter_mut().zip(u) {
        *g = *g / (1.0 + exp(-*g)) * u;
    }
}

/// The scalar loop compiled with FMA, so that [`exp`]'s fused multiply-adds are instructions and
/// not calls into libm's `fmaf` (which, on a machine without AVX-512, took a quarter of a
/// regeneration's time with this loop). The same operations, so the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_fma(g: &mut [f32], u: &[f32]) {
    silu_mul_scalar(g, u)
}

/// Σ e^(x_i − shift) in order.
#[inline(always)]
fn sum_exp_scalar(x: &[f32], shift: f32) -> f32 {
    x.iter().map(|&v| exp(v - shift)).sum()
}

/// [`sum_exp_scalar`] compiled with FMA (as [`silu_mul_fma`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sum_exp_fma(x: &[f32], shift: f32) -> f32 {
    sum_exp_scalar(x, shift)
}

/// The exponent's range: below `EXP_LO` e^x is below half the smallest subnormal, above `EXP_HI`
/// it overflows; clamping there first keeps `n` small and gives 0 and +inf.
const EXP_LO: f32 = -104.0;
const EXP_HI: f32 = 89.0;
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 = LN2_HI + LN2_LO, LN2_HI = 355/512 with nine significant bits, so that n · LN2_HI is
/// exact for every n [`exp`] uses.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Taylor coefficients 1/k!, k = 6 down to 2, of e^r on |r| ≤ ln2/2 (truncation error below
/// 1.2e-7 relative, about one ulp).
const EXP_POLY: [f32; 5] = [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5];

/// e^x in f32 to about two ulp: x = n·ln2 + r with n = round(x·log2 e) (ties to even) and
/// |r| ≤ ln2/2, e^r by a degree-6 polynomial (fused multiply-adds, Horner), then scaled by 2ⁿ.
/// NaN stays NaN, ±inf gives +inf and 0. The scalar twin of the AVX-512 lanes in
/// [`silu_mul_avx512`].
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    let x = x.clamp(EXP_LO, EXP_HI);
    let n = (x * LOG2E).round_ties_even();
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let mut p = EXP_POLY[0];
    for c in &EXP_POLY[1..] {
        p = p.mul_add(r, *c);
    }
    let p = p.mul_add(r, 1.0).mul_add(r, 1.0);
    scale_by_pow2(p, n as i32)
}

/// p · 2ⁿ with one rounding where the result is a normal float (as `vscalefps`), for n in the
/// range [`exp`] produces.
#[inline(always)]
fn scale_by_pow2(p: f32, n: i32) -> f32 {
    let pow2 = |k: i32| f32::from_bits(((k + 127) as u32) << 23);
    if n > 127 {
        p * pow2(127) * pow2(n - 127)
    } else if n < -126 {
        p * pow2(-126) * pow2((n + 126).max(-126))
    } else {
        p * pow2(n)
    }
}

/// The first index of `x`'s largest value, that value, and Σ e^(x_i − max): a softmax's
/// normalizer, so that the top value's probability is 1 / sum. Sixteen lanes at a time with the
/// same e^x as [`silu_mul`] where the CPU has AVX-512 (the lanes' order of summation differs from
/// the scalar twin's in the last bits). An empty `x` gives (0, −inf, 0); a non-finite maximum a
/// NaN sum.
pub fn argmax_and_sum_exp(x: &[f32]) -> (usize, f32, f32) {
    let (mut index, mut max) = (0usize, f32::NEG_INFINITY);
    for (i, &v) in x.iter().enumerate() {
        if v > max {
            (index, max) = (i, v);
        }
    }
    if x.is_empty() || !max.is_finite() {
        return (index, max, if x.is_empty() { 0.0 } else { f32::NAN });
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the feature was just detected.
        return (index, max, unsafe { sum_exp_avx512(x, max) });
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the features were just detected.
        return (index, max, unsafe { sum_exp_fma(x, max) });
    }
    (index, max, sum_exp_scalar(x, max))
}

/// e^x of sixteen lanes `$x`, lane by lane as [`exp`] (clamped to its range; NaN lanes are the
/// caller's to mask), inside an `avx512f` function.
#[cfg(target_arch = "x86_64")]
macro_rules! exp_lanes {
    ($x:expr) => {{
        use std::arch::x86_64::*;
        let one = _mm512_set1_ps(1.0);
        let x = _mm512_min_ps(_mm512_max_ps($x, _mm512_set1_ps(EXP_LO)), _mm512_set1_ps(EXP_HI));
        let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(x, _mm512_set1_ps(LOG2E)));
        let nk = _mm512_xor_ps(k, _mm512_set1_ps(-0.0));
        let r = _mm512_fmadd_ps(nk, _mm512_set1_ps(LN2_LO), _mm512_fmadd_ps(nk, _mm512_set1_ps(LN2_HI), x));
        let mut p = _mm512_set1_ps(EXP_POLY[0]);
        for c in &EXP_POLY[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
        }
        let p = _mm512_fmadd_ps(_mm512_fmadd_ps(p, r, one), r, one);
        _mm512_scalef_ps(p, k)
    }};
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_exp_avx512(x: &[f32], shift: f32) -> f32 {
    use std::arch::x86_64::*;
    let n = x.len();
    let s = _mm512_set1_ps(shift);
    let mut acc = _mm512_setzero_ps();
    for start in (0..n).step_by(16) {
        let lanes = (n - start).min(16);
        let mask: __mmask16 = if lanes == 16 { 0xffff } else { ((1u32 << lanes) - 1) as __mmask16 };
        let v = _mm512_sub_ps(_mm512_maskz_loadu_ps(mask, x.as_ptr().add(start)), s);
        acc = _mm512_mask_add_ps(acc, mask, acc, exp_lanes!(v));
    }
    _mm512_reduce_add_ps(acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn silu_mul_avx512(g: &mut [f32], u: &[f32]) {
    use std::arch::x86_64::*;
    let n = g.len();
    let one = _mm512_set1_ps(1.0);
    let sign = _mm512_set1_ps(-0.0);
    for start in (0..n).step_by(16) {
        let lanes = (n - start).min(16);
        let mask: __mmask16 = if lanes == 16 { 0xffff } else { ((1u32 << lanes) - 1) as __mmask16 };
        let v = _mm512_maskz_loadu_ps(mask, g.as_ptr().add(start));
        let w = _mm512_maskz_loadu_ps(mask, u.as_ptr().add(start));
        // e^(−v), lane by lane as `exp`
        let neg = _mm512_xor_ps(v, sign);
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(neg, neg);
        let e = _mm512_mask_mov_ps(exp_lanes!(neg), nan, neg);
        let out = _mm512_mul_ps(_mm512_div_ps(v, _mm512_add_ps(one, e)), w);
        _mm512_mask_storeu_ps(g.as_mut_ptr().add(start), mask, out);
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

    /// [`exp`] is within 2.5 ulp of e^x (f64) over the range where e^x is a normal float, and
    /// gives libm's values at the edges: NaN, +inf past the top, 0 below the bottom.
    #[test]
    fn argmax_and_sum_exp_is_a_softmax_normalizer_at_every_tail_length() {
        for n in [1usize, 5, 16, 17, 33, 8192 + 3] {
            let x = values(n, 7);
            let (index, max, sum) = argmax_and_sum_exp(&x);
            let want_max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(index, x.iter().position(|&v| v == want_max).unwrap(), "n = {n}: the first maximum");
            let want: f64 = x.iter().map(|&v| (f64::from(v) - f64::from(want_max)).exp()).sum();
            assert_eq!(max, want_max, "n = {n}");
            assert!((f64::from(sum) - want).abs() <= 1e-5 * want, "n = {n}: {sum} against {want}");
        }
        assert_eq!(argmax_and_sum_exp(&[]), (0, f32::NEG_INFINITY, 0.0));
        assert!(argmax_and_sum_exp(&[1.0, f32::INFINITY]).2.is_nan());
    }

    #[test]
    fn exp_is_within_a_few_ulp_and_keeps_the_edges() {
        let mut worst = 0f64;
        let steps = 400_000;
        for i in 0..=steps {
            let x = -87.0 + 175.0 * i as f32 / steps as f32;
            let want = (x as f64).exp();
            let ulp = f32::EPSILON as f64 * want;
            worst = worst.max(((exp(x) as f64) - want).abs() / ulp);
        }
        assert!(worst <= 2.5, "worst error {worst} ulp");
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-104.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    /// Values across the whole range of a SiLU input (overflow and underflow of e^(−g) included)
    /// and every tail length of the sixteen-lane loop.
    fn silu_inputs(n: usize) -> (Vec<f32>, Vec<f32>) {
        let g = (0..n).map(|i| ((i * 7919 % 2001) as f32 - 1000.0) * if i % 13 == 0 { 0.5 } else { 0.01 }).collect();
        let u = (0..n).map(|i| ((i * 104729 % 997) as f32 - 498.0) * 0.003).collect();
        (g, u)
    }

    /// The AVX-512 lanes and the scalar twin give the same bits, element by element, whatever the
    /// length (so a row's result does not depend on how many rows share the call), and the
    /// products stay within float rounding of candle's `silu(g) · u`.
    #[test]
    fn silu_mul_lanes_match_the_scalar_twin_and_candles_silu() {
        for n in (1usize..40).chain([3 * 4096 + 5]) {
            let (g, u) = silu_inputs(n);
            let mut got = g.clone();
            silu_mul(&mut got, &u);
            let twin: Vec<f32> = g.iter().zip(&u).map(|(&g, &u)| g / (1.0 + exp(-g)) * u).collect();
            assert!(same(&got, &twin), "n = {n}");
            let gt = Tensor::from_vec(g.clone(), n, &Device::Cpu).unwrap();
            let ut = Tensor::from_vec(u.clone(), n, &Device::Cpu).unwrap();
            let want = (candle_nn::ops::silu(&gt).unwrap() * ut).unwrap().to_vec1::<f32>().unwrap();
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!((a - b).abs() <= 1e-6 * b.abs() + 1e-30, "n = {n}, element {i}: {a} against candle's {b}");
            }
        }
        // A lone row gives what the same row gives inside a longer call.
        let (g, u) = silu_inputs(100);
        let mut all = g.clone();
        silu_mul(&mut all, &u);
        let mut part = g[37..61].to_vec();
        silu_mul(&mut part, &u[37..61]);
        assert!(same(&part, &all[37..61]));
    }
}
