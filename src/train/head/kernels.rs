//! Per-row kernels over contiguous f32 rows. Written as fixed-width lane loops that the compiler
//! vectorises; compiled again with AVX-512 / AVX2 enabled and picked at run time, so the binary
//! stays safe on CPUs without them.

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
