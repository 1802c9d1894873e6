//! Causal attention over the KV cache, each (query, head) pair with arithmetic of its own.
//!
//! Why not batched matmuls: speculative decoding promises that verifying B tokens in one
//! forward gives exactly the logits of B single-token steps. Batched attention changes the
//! floating-point summation order with the chunk length (different GEMM tiling, masked
//! columns), and with Q8 activation quantization downstream a 1e-6 difference can flip an int8
//! rounding and grow to O(1) in the logits. Here every (query, head) is reduced over exactly
//! its own causal prefix in a fixed order, so the result does not depend on how the tokens
//! were chunked: a chunked forward is bit-identical to a token-by-token one.
//!
//! The pairs that share a KV head (a GQA group's heads, for up to four queries) are computed
//! together so that they share the reads of its keys and values and interleave their
//! dependency chains; what each pair adds, and in which order, does not change.

use rayon::prelude::*;

/// Keys and values of one layer, layout (kv_heads, capacity, head_dim).
#[derive(Debug, Clone, Default)]
pub struct LayerKv {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// Dot product with 16 independent lanes summed in a fixed order: vectorizes without
/// reassociation, and gives the same bits wherever it is called.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = a.len() / 16;
    for c in 0..chunks {
        let (x, y) = (&a[c * 16..c * 16 + 16], &b[c * 16..c * 16 + 16]);
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0f32;
    for i in chunks * 16..a.len() {
        tail += a[i] * b[i];
    }
    let mut s = 0f32;
    for v in acc {
        s += v;
    }
    s + tail
}

#[inline(always)]
fn axpy(out: &mut [f32], w: f32, x: &[f32]) {
    for (o, v) in out.iter_mut().zip(x) {
        *o += w * v;
    }
}

/// One query row of one head against keys 0..len of its KV head.
#[inline(always)]
fn attend_one(q: &[f32], k: &[f32], v: &[f32], len: usize, hd: usize, scale: f32, scores: &mut Vec<f32>, out: &mut [f32]) {
    scores.clear();
    let mut max = f32::NEG_INFINITY;
    for j in 0..len {
        let s = dot(q, &k[j * hd..(j + 1) * hd]) * scale;
        max = max.max(s);
        scores.push(s);
    }
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    out.fill(0.0);
    for (j, &w) in scores.iter().enumerate() {
        axpy(out, w, &v[j * hd..(j + 1) * hd]);
    }
    let inv = 1.0 / sum;
    for o in out.iter_mut() {
        *o *= inv;
    }
}

/// One query row of one head on AVX2 + FMA: the vector kernel for head sizes of 16, 32, 64 or
/// 128, [`attend_one`] compiled for these features otherwise.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_one_avx2(q: &[f32], k: &[f32], v: &[f32], len: usize, hd: usize, scale: f32, scores: &mut Vec<f32>, out: &mut [f32]) {
    match hd {
        16 => attend_one_vec8::<2>(q, k, v, len, scale, scores, out),
        32 => attend_one_vec8::<4>(q, k, v, len, scale, scores, out),
        64 => attend_one_vec8::<8>(q, k, v, len, scale, scores, out),
        128 => attend_one_vec8::<16>(q, k, v, len, scale, scores, out),
        _ => attend_one(q, k, v, len, hd, scale, scores, out),
    }
}

/// ln 2 split for the exponentials' range reduction ([`exp512`], [`exp256`]): n · EXP_LN2_HI is
/// exact for the n they use.
#[cfg(target_arch = "x86_64")]
const EXP_LN2_HI: f32 = 0.693_359_4;
#[cfg(target_arch = "x86_64")]
const EXP_LN2_LO: f32 = -2.121_944_4e-4;
/// The Cephes expf polynomial of e^r on |r| ≤ ln2/2, highest degree first (Horner).
#[cfg(target_arch = "x86_64")]
const EXP_POLY: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5.000_000_1e-1];

/// The sums of eight vectors' lanes, in order, by a fixed tree of `hadd`s (the same pairs for
/// every vector, whatever the other seven hold).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn reduce8(a: &[std::arch::x86_64::__m256; 8]) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // hadd(x, y) = [x0+x1 x2+x3 y0+y1 y2+y3 | x4+x5 x6+x7 y4+y5 y6+y7]
    let t = [_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]), _mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7])];
    // [s0 s1 s2 s3 | s0' s1' s2' s3'] where s_i = vector i's lanes 0..4 and s_i' its lanes 4..8
    let u = [_mm256_hadd_ps(t[0], t[1]), _mm256_hadd_ps(t[2], t[3])];
    _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(u[0], u[1]), _mm256_permute2f128_ps::<0x31>(u[0], u[1]))
}

/// The sum of one vector's lanes by [`reduce8`]'s tree (lane 0 of the result).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn hsum8(a: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let z = _mm256_setzero_ps();
    _mm256_cvtss_f32(reduce8(&[a, z, z, z, z, z, z, z]))
}

/// e^x for x ≤ 0, 8 lanes: [`exp512`]'s reduction and polynomial, scaled by 2ⁿ built in the
/// exponent bits; below −87 (where 2ⁿ would be subnormal) the result is 0, a weight under
/// 2⁻¹²⁵ against a sum of at least 1. The same bits on every call.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn exp256(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let keep = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(-87.0));
    let x = _mm256_max_ps(x, _mm256_set1_ps(-87.0));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_HI), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_LO), r);
    let mut p = _mm256_set1_ps(EXP_POLY[0]);
    for c in &EXP_POLY[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
    }
    let e = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0));
    let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127))));
    _mm256_and_ps(_mm256_mul_ps(e, pow2), keep)
}

/// One query row of one head against keys 0..len, hd = 8·NV, on 8-lane registers. The
/// arithmetic is fixed by len and hd alone: per key one fma chain over the head's registers,
/// summed by [`reduce8`]'s tree (eight keys at a time; the keys after the last full eight one by
/// one, by the same tree); the exponentials in order, summed in 8 lanes then by the tree; the
/// values' weighted sum one key after the other. So the row has the same bits whatever rows
/// or chunk it is computed with.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_one_vec8<const NV: usize>(q: &[f32], k: &[f32], v: &[f32], len: usize, scale: f32, scores: &mut Vec<f32>, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let hd = NV * 8;
    debug_assert!(q.len() >= hd && out.len() >= hd && k.len() >= len * hd && v.len() >= len * hd);
    let padded = len.next_multiple_of(8);
    scores.clear();
    scores.resize(padded, f32::NEG_INFINITY);
    let (kp, vp, sp) = (k.as_ptr(), v.as_ptr(), scores.as_mut_ptr());
    let qv: [__m256; NV] = std::array::from_fn(|c| _mm256_loadu_ps(q.as_ptr().add(c * 8)));
    let partials = |j: usize| -> __m256 {
        let row = kp.add(j * hd);
        let mut acc = _mm256_mul_ps(qv[0], _mm256_loadu_ps(row));
        for (c, qc) in qv.iter().enumerate().skip(1) {
            acc = _mm256_fmadd_ps(*qc, _mm256_loadu_ps(row.add(c * 8)), acc);
        }
        acc
    };
    let sv = _mm256_set1_ps(scale);
    let full = len / 8 * 8;
    let mut maxv = _mm256_set1_ps(f32::NEG_INFINITY);
    for j0 in (0..full).step_by(8) {
        let p: [__m256; 8] = std::array::from_fn(|i| partials(j0 + i));
        let s = _mm256_mul_ps(reduce8(&p), sv);
        _mm256_storeu_ps(sp.add(j0), s);
        maxv = _mm256_max_ps(maxv, s);
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), maxv);
    let mut max = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for j in full..len {
        let s = hsum8(partials(j)) * scale;
        *sp.add(j) = s;
        max = max.max(s);
    }
    // weights exp(s − max) in place (padding: exp(−inf) = 0), and their sum
    let mv = _mm256_set1_ps(max);
    let mut sum = _mm256_setzero_ps();
    for c in (0..padded).step_by(8) {
        let e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sp.add(c)), mv));
        _mm256_storeu_ps(sp.add(c), e);
        sum = _mm256_add_ps(sum, e);
    }
    let inv = 1.0 / hsum8(sum);
    let mut acc = [_mm256_setzero_ps(); NV];
    for j in 0..len {
        let w = _mm256_set1_ps(*sp.add(j));
        let row = vp.add(j * hd);
        for (c, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(row.add(c * 8)), *a);
        }
    }
    let iv = _mm256_set1_ps(inv);
    for (c, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(out.as_mut_ptr().add(c * 8), _mm256_mul_ps(*a, iv));
    }
}

/// AVX-512 attention of several query rows that share one KV head (the heads of a GQA group,
/// for one or more queries): `NV` registers of 16 lanes hold a query (hd = 16·NV). Row r's
/// query is q[offs[r]..], it sees keys 0..lens[r], and its output goes to out[offs[r]..] (the
/// layouts of q and of the output agree). Keys are visited in blocks of 16, every row in turn
/// within a block, so a block's K (then V) rows are read from memory once for all the rows and
/// from L1 after that, where one row at a time streamed the whole K and V once per row.
///
/// Each row's arithmetic is fixed by its own len and hd alone, in this order: per key, one fma
/// chain over the head's registers, summed by the tree of `_mm512_reduce_add_ps` (sixteen keys
/// at once by `reduce16`, which adds the same pairs; the keys after the last full sixteen one by
/// one); exp-sums over the keys in 16 lanes, in order, then the same tree; the values' weighted
/// sum one key after the other (the accumulators go through memory between blocks, which is
/// exact). So a (query, head) gives the same bits whatever rows it is computed with.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_rows_vec<const NV: usize>(q: &[f32], offs: &[usize], lens: &[usize], k: &[f32], v: &[f32], scale: f32, scratch: &mut Vec<f32>, out: *mut f32) {
    use std::arch::x86_64::*;
    let hd = NV * 16;
    let rows = offs.len();
    let max_len = lens.iter().copied().max().unwrap_or(0);
    debug_assert!(lens.len() == rows && offs.iter().all(|&o| o + hd <= q.len()) && k.len() >= max_len * hd && v.len() >= max_len * hd);
    let stride = max_len.next_multiple_of(16);
    // scores (rows × stride), then each row's maximum and 1 / Σ exp
    scratch.clear();
    scratch.resize(rows * stride + 2 * rows, f32::NEG_INFINITY);
    let (scores, stats) = scratch.split_at_mut(rows * stride);
    let (maxes, inv) = stats.split_at_mut(rows);
    let (kp, vp, sp) = (k.as_ptr(), v.as_ptr(), scores.as_mut_ptr());
    let sv = _mm512_set1_ps(scale);
    // 1. scores and their maxima
    for j0 in (0..max_len).step_by(16) {
        for (r, (&off, &len)) in offs.iter().zip(lens).enumerate() {
            if j0 >= len {
                continue;
            }
            let qp = q.as_ptr().add(off);
            let qv: [__m512; NV] = std::array::from_fn(|c| _mm512_loadu_ps(qp.add(c * 16)));
            let partials = |j: usize| -> __m512 {
                let row = kp.add(j * hd);
                let mut acc = _mm512_mul_ps(qv[0], _mm512_loadu_ps(row));
                for (c, qc) in qv.iter().enumerate().skip(1) {
                    acc = _mm512_fmadd_ps(*qc, _mm512_loadu_ps(row.add(c * 16)), acc);
                }
                acc
            };
            let srow = sp.add(r * stride);
            if j0 + 16 <= len {
                let p: [__m512; 16] = std::array::from_fn(|i| partials(j0 + i));
                let s = _mm512_mul_ps(reduce16(&p), sv);
                _mm512_storeu_ps(srow.add(j0), s);
                maxes[r] = maxes[r].max(_mm512_reduce_max_ps(s));
            } else {
                for j in j0..len {
                    let s = _mm512_reduce_add_ps(partials(j)) * scale;
                    maxes[r] = maxes[r].max(s);
                    *srow.add(j) = s;
                }
            }
        }
    }
    // 2. weights exp(s - max) in place, and their sums (padding lanes give exp(-inf) = 0)
    for r in 0..rows {
        let mv = _mm512_set1_ps(maxes[r]);
        let mut sum = _mm512_setzero_ps();
        for c in (0..lens[r].next_multiple_of(16)).step_by(16) {
            let at = sp.add(r * stride + c);
            let e = exp512(_mm512_sub_ps(_mm512_loadu_ps(at), mv));
            _mm512_storeu_ps(at, e);
            sum = _mm512_add_ps(sum, e);
        }
        inv[r] = 1.0 / _mm512_reduce_add_ps(sum);
    }
    // 3. weighted sums of the values, keys in order; row r's accumulators live in out[r]
    //    between blocks. Rows go `pv_rows` at a time, sharing each V row: one row's sum is a
    //    chain of dependent fmas, so it is the interleaving of rows that keeps the fma units busy.
    for &off in offs {
        std::ptr::write_bytes(out.add(off), 0, hd);
    }
    let rt = if NV <= 4 { 3 } else { 2 };
    for j0 in (0..max_len).step_by(16) {
        let mut r = 0;
        while r < rows {
            let n = rt.min(rows - r);
            match n {
                3 => pv_rows::<NV, 3>(r, j0, offs, lens, stride, sp, vp, out),
                2 => pv_rows::<NV, 2>(r, j0, offs, lens, stride, sp, vp, out),
                _ => pv_rows::<NV, 1>(r, j0, offs, lens, stride, sp, vp, out),
            }
            r += n;
        }
    }
    for (&off, &iv) in offs.iter().zip(inv.iter()) {
        let o = out.add(off);
        let iv = _mm512_set1_ps(iv);
        for c in 0..NV {
            _mm512_storeu_ps(o.add(c * 16), _mm512_mul_ps(_mm512_loadu_ps(o.add(c * 16)), iv));
        }
    }
}

/// Lane i of the result is the sum of the 16 lanes of `v[i]`, added as `_mm512_reduce_add_ps`
/// adds them: lane l with lane l + 8, then l + 4, l + 2, l + 1 (a halving tree). Sixteen
/// reductions share their shuffles here, about 3 instructions per vector instead of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn reduce16(v: &[std::arch::x86_64::__m512; 16]) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // 1. l + (l + 8): 128-bit quarters 0,1 of a with 2,3 of a; likewise b. Each result holds
    //    two vectors' 8 partials: [a 0..8 | b 0..8].
    let halves = |a: __m512, b: __m512| {
        _mm512_add_ps(_mm512_shuffle_f32x4::<0b01_00_01_00>(a, b), _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b))
    };
    let h: [__m512; 8] = std::array::from_fn(|i| halves(v[2 * i], v[2 * i + 1]));
    // 2. l + (l + 4) within each vector's 8: quarters [a0 a2 b0 b2] + [a1 a3 b1 b3], giving one
    //    quarter (4 partials) per vector, vectors 4i..4i+4 in order.
    let quarters = |a: __m512, b: __m512| {
        _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(a, b), _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b))
    };
    let q: [__m512; 4] = std::array::from_fn(|i| quarters(h[2 * i], h[2 * i + 1]));
    // 3. l + (l + 2) within each quarter: in quarter m, [a0 a1 b0 b1] + [a2 a3 b2 b3] pairs
    //    vector m of a's group with vector m of b's.
    let pairs = |a: __m512, b: __m512| _mm512_add_ps(_mm512_shuffle_ps::<0b01_00_01_00>(a, b), _mm512_shuffle_ps::<0b11_10_11_10>(a, b));
    let w0 = pairs(q[0], q[1]);
    let w1 = pairs(q[2], q[3]);
    // 4. l + (l + 1): [a0 a2 b0 b2] + [a1 a3 b1 b3]. Quarter m now holds the sums of vectors
    //    m, 4 + m, 8 + m, 12 + m; put them back in order.
    let s = _mm512_add_ps(_mm512_shuffle_ps::<0b10_00_10_00>(w0, w1), _mm512_shuffle_ps::<0b11_01_11_01>(w0, w1));
    let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_permutexvar_ps(order, s)
}

/// e^x for x ≤ 0 (and -inf → 0), 16 lanes: x = n·ln2 + r with |r| ≤ ln2/2, e^r by the Cephes
/// expf polynomial, times 2^n by `scalef`. Within 2 ulp of expf; the same bits on every call.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn exp512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let x = _mm512_max_ps(x, _mm512_set1_ps(-104.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)));
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_HI), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_LO), r);
    let mut p = _mm512_set1_ps(EXP_POLY[0]);
    for c in &EXP_POLY[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
    }
    let r2 = _mm512_mul_ps(r, r);
    let e = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0));
    _mm512_scalef_ps(e, n)
}

/// Rows r0..r0+RT of [`attend_rows_vec`]'s step 3 over the keys j0..j0+16 that each sees: the
/// keys all of them see go together (one V row load, RT fma chains), then each row's own
/// remaining keys. Per row the keys are added in order, as one row alone would.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn pv_rows<const NV: usize, const RT: usize>(r0: usize, j0: usize, offs: &[usize], lens: &[usize], stride: usize, sp: *const f32, vp: *const f32, out: *mut f32) {
    use std::arch::x86_64::*;
    let hd = NV * 16;
    let ends: [usize; RT] = std::array::from_fn(|t| lens[r0 + t].min(j0 + 16));
    let common = ends.iter().copied().min().unwrap_or(j0);
    let o: [*mut f32; RT] = std::array::from_fn(|t| out.add(offs[r0 + t]));
    let mut acc: [[__m512; NV]; RT] = std::array::from_fn(|t| std::array::from_fn(|c| _mm512_loadu_ps(o[t].add(c * 16))));
    for j in j0..common.max(j0) {
        let row = vp.add(j * hd);
        let vv: [__m512; NV] = std::array::from_fn(|c| _mm512_loadu_ps(row.add(c * 16)));
        for (t, a) in acc.iter_mut().enumerate() {
            let w = _mm512_set1_ps(*sp.add((r0 + t) * stride + j));
            for (c, a) in a.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(w, vv[c], *a);
            }
        }
    }
    for (t, a) in acc.iter_mut().enumerate() {
        for j in common.max(j0)..ends[t] {
            let w = _mm512_set1_ps(*sp.add((r0 + t) * stride + j));
            let row = vp.add(j * hd);
            for (c, a) in a.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(w, _mm512_loadu_ps(row.add(c * 16)), *a);
            }
        }
        for (c, a) in a.iter().enumerate() {
            _mm512_storeu_ps(o[t].add(c * 16), *a);
        }
    }
}

/// Rows sharing one KV head (see [`attend_rows_vec`]), for the head sizes it has a kernel for
/// ([`vector_head`]).
///
/// # Safety
/// avx512f, avx2 and fma are available; out[offs[r]..offs[r] + hd] is writable for every row
/// and written by no one else meanwhile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_rows_avx512(q: &[f32], offs: &[usize], lens: &[usize], k: &[f32], v: &[f32], hd: usize, scale: f32, scratch: &mut Vec<f32>, out: *mut f32) {
    debug_assert!(vector_head(hd));
    match hd {
        16 => attend_rows_vec::<1>(q, offs, lens, k, v, scale, scratch, out),
        32 => attend_rows_vec::<2>(q, offs, lens, k, v, scale, scratch, out),
        64 => attend_rows_vec::<4>(q, offs, lens, k, v, scale, scratch, out),
        _ => attend_rows_vec::<8>(q, offs, lens, k, v, scale, scratch, out),
    }
}

/// Head sizes [`attend_rows_avx512`] has a kernel for; others go row by row through the
/// portable code.
#[cfg(target_arch = "x86_64")]
fn vector_head(hd: usize) -> bool {
    matches!(hd, 16 | 32 | 64 | 128)
}

#[derive(Clone, Copy)]
enum Isa {
    Generic,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

fn isa() -> Isa {
    static ISA: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
    let level = *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return 2;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return 1;
            }
        }
        0
    });
    match level {
        #[cfg(target_arch = "x86_64")]
        2 => Isa::Avx512,
        #[cfg(target_arch = "x86_64")]
        1 => Isa::Avx2,
        _ => Isa::Generic,
    }
}

/// Below this many multiply-adds (about 50 µs of work) attention stays on one thread. A decode
/// step's attention is far below; a 16-token verify at context 64 (0.7 M per layer) is above,
/// and the forward runs on a pool worker whose sibling is spinning for the next matmul's tiles,
/// so the split costs little.
const PARALLEL_MIN_WORK: usize = 256 << 10;

/// Attention for `n` new queries at positions start..start+n.
/// q: (n, heads, hd) row-major; kv: the layer cache holding at least start+n positions with
/// `capacity` rows per KV head. Returns (n, heads·hd).
pub fn causal_attention(q: &[f32], kv: &LayerKv, n: usize, start: usize, heads: usize, kv_heads: usize, hd: usize, capacity: usize) -> Vec<f32> {
    attention_rows(q, kv, n, heads, kv_heads, hd, capacity, |i| start + i + 1)
}

/// Attention of `n` queries that all see keys 0..len (a bidirectional block after its
/// context: the DFlash drafter writes the block's K/V after the context rows and attends over
/// both). Same layout and the same per-(query, head) arithmetic as [`causal_attention`].
pub fn full_attention(q: &[f32], kv: &LayerKv, n: usize, len: usize, heads: usize, kv_heads: usize, hd: usize, capacity: usize) -> Vec<f32> {
    attention_rows(q, kv, n, heads, kv_heads, hd, capacity, |_| len)
}

/// Queries per unit of work: a unit is the rows of one KV head's query heads for up to this
/// many queries, which share every K/V block they read (`attend_rows_vec`).
const QUERY_TILE: usize = 4;

/// A unit's rows and buffers, reused from unit to unit on a thread.
#[derive(Default)]
struct Scratch {
    offs: Vec<usize>,
    lens: Vec<usize>,
    f: Vec<f32>,
}

/// The output rows, written by the units in parallel: each (query, head) row by exactly one.
#[derive(Clone, Copy)]
struct Rows(*mut f32);
// SAFETY: units write disjoint rows (each (query, head) belongs to one unit).
unsafe impl Send for Rows {}
unsafe impl Sync for Rows {}

/// The shape of one attention call: `n` queries (n, heads, hd) over a layer cache with
/// `capacity` rows per KV head.
#[derive(Clone, Copy)]
struct Shape {
    n: usize,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    capacity: usize,
}

impl Shape {
    fn units(&self) -> usize {
        unit_count(self.n, self.kv_heads)
    }
}

/// Unit u = (query tile t, KV head g): the rows (i, h) of the tile's queries and of g's query
/// heads; row (i, h) sits at (i·heads + h)·hd in q and in the output. Query row i attends over
/// keys 0..len_of(i) of its KV head. Every (query, head) row is computed the same way whatever
/// unit, thread or call computes it.
#[allow(clippy::too_many_arguments)]
fn attend_unit(s: &mut Scratch, u: usize, q: &[f32], kv: &LayerKv, sh: Shape, len_of: &impl Fn(usize) -> usize, isa: Isa, out: Rows) {
    let Shape { n, heads, kv_heads, hd, capacity } = sh;
    let groups = heads / kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let (t, g) = (u / kv_heads, u % kv_heads);
    s.offs.clear();
    s.lens.clear();
    for i in t * QUERY_TILE..n.min((t + 1) * QUERY_TILE) {
        for h in g * groups..(g + 1) * groups {
            s.offs.push((i * heads + h) * hd);
            s.lens.push(len_of(i));
        }
    }
    let max_len = s.lens.iter().copied().max().unwrap_or(0);
    let base = g * capacity * hd;
    let (k, v) = (&kv.k[base..base + max_len * hd], &kv.v[base..base + max_len * hd]);
    match isa {
        // SAFETY: the features were detected at run time; this unit's rows are its own.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if vector_head(hd) => unsafe { attend_rows_avx512(q, &s.offs, &s.lens, k, v, hd, scale, &mut s.f, out.0) },
        _ => {
            for (&off, &len) in s.offs.iter().zip(&s.lens) {
                // SAFETY: as above; the row lies inside the output (n · heads · hd).
                let o = unsafe { std::slice::from_raw_parts_mut(out.0.add(off), hd) };
                match isa {
                    // SAFETY: the features were detected at run time.
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => unsafe { attend_one_avx2(&q[off..off + hd], k, v, len, hd, scale, &mut s.f, o) },
                    _ => attend_one(&q[off..off + hd], k, v, len, hd, scale, &mut s.f, o),
                }
            }
        }
    }
}

/// Query row i of every head attends over keys 0..len_of(i) of its KV head.
#[allow(clippy::too_many_arguments)]
fn attention_rows(q: &[f32], kv: &LayerKv, n: usize, heads: usize, kv_heads: usize, hd: usize, capacity: usize, len_of: impl Fn(usize) -> usize + Sync) -> Vec<f32> {
    let sh = Shape { n, heads, kv_heads, hd, capacity };
    let isa = isa();
    let mut out = vec![0f32; n * heads * hd];
    let rows_out = Rows(out.as_mut_ptr());
    let work = |s: &mut Scratch, u: usize| attend_unit(s, u, q, kv, sh, &len_of, isa, rows_out);
    // Small problems (a decode step) run on the calling thread, where waking another thread
    // costs more than the work. Each (query, head) is computed the same way on either path and
    // in any unit, so the choice does not change a single bit.
    let units = sh.units();
    let flops: usize = (0..n).map(|i| heads * len_of(i) * hd).sum();
    if flops < PARALLEL_MIN_WORK || units == 1 {
        let mut s = Scratch::default();
        (0..units).for_each(|u| work(&mut s, u));
    } else {
        (0..units).into_par_iter().for_each_init(Scratch::default, work);
    }
    out
}

/// Units of a [`causal_attention`] or [`full_attention`] call of `n` queries (for a team to
/// share out with [`attention_units`]).
pub(crate) fn unit_count(n: usize, kv_heads: usize) -> usize {
    n.div_ceil(QUERY_TILE) * kv_heads
}

/// Units `units` of [`causal_attention`] or [`full_attention`], written into `out` (n · heads
/// · hd f32, the layout those calls return): query i sees keys 0..len_of(i) (`start + i + 1`
/// for the causal call, `len` for the full one), and the bits are those of that call's rows.
///
/// # Safety
/// `out` points to n · heads · hd writable f32, and no one else writes these units' rows.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn attention_units(q: &[f32], kv: &LayerKv, n: usize, heads: usize, kv_heads: usize, hd: usize, capacity: usize, len_of: impl Fn(usize) -> usize, units: std::ops::Range<usize>, out: *mut f32) {
    let sh = Shape { n, heads, kv_heads, hd, capacity };
    let isa = isa();
    let mut s = Scratch::default();
    for u in units {
        attend_unit(&mut s, u, q, kv, sh, &len_of, isa, Rows(out));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.gen_range(-2.0f32..2.0)).collect()
    }

    /// (kv_heads, capacity, hd) cache holding `len` random positions.
    fn cache(kv_heads: usize, capacity: usize, hd: usize, seed: u64) -> LayerKv {
        LayerKv { k: rand_vec(kv_heads * capacity * hd, seed), v: rand_vec(kv_heads * capacity * hd, seed + 1) }
    }

    /// The same attention in f64, one (query, head) at a time.
    fn reference(q: &[f32], kv: &LayerKv, n: usize, start: usize, heads: usize, kv_heads: usize, hd: usize, cap: usize) -> Vec<f64> {
        let mut out = vec![0f64; n * heads * hd];
        for i in 0..n {
            for h in 0..heads {
                let base = h / (heads / kv_heads) * cap * hd;
                let qr = &q[(i * heads + h) * hd..][..hd];
                let len = start + i + 1;
                let s: Vec<f64> = (0..len)
                    .map(|j| (0..hd).map(|d| qr[d] as f64 * kv.k[base + j * hd + d] as f64).sum::<f64>() / (hd as f64).sqrt())
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = w.iter().sum();
                for d in 0..hd {
                    out[(i * heads + h) * hd + d] = (0..len).map(|j| w[j] * kv.v[base + j * hd + d] as f64).sum::<f64>() / z;
                }
            }
        }
        out
    }

    #[test]
    fn attention_matches_an_f64_reference_for_vectorised_and_scalar_head_sizes() {
        for (hd, heads, kv_heads) in [(64usize, 9usize, 3usize), (16, 4, 2), (128, 2, 1), (24, 4, 4)] {
            let (n, start, cap) = (5, 37, 64);
            let kv = cache(kv_heads, cap, hd, hd as u64);
            let q = rand_vec(n * heads * hd, 7);
            let got = causal_attention(&q, &kv, n, start, heads, kv_heads, hd, cap);
            let want = reference(&q, &kv, n, start, heads, kv_heads, hd, cap);
            for (g, w) in got.iter().zip(&want) {
                assert!((*g as f64 - w).abs() < 2e-5, "hd {hd}: {g} vs {w}");
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn reduce16_adds_each_vector_as_mm512_reduce_add_ps_does() {
        use std::arch::x86_64::*;
        if !is_x86_feature_detected!("avx512f") {
            return;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        for _ in 0..2000 {
            // Magnitudes over 8 decades, so that any other order of the additions rounds
            // differently somewhere.
            let vals: Vec<f32> = (0..256).map(|_| rng.gen_range(-1.0f32..1.0) * 10f32.powi(rng.gen_range(-4..4))).collect();
            // SAFETY: avx512f detected above; every load reads 16 of the 256 values.
            let (got, want) = unsafe {
                let v: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(vals.as_ptr().add(16 * i)));
                let mut got = [0f32; 16];
                _mm512_storeu_ps(got.as_mut_ptr(), reduce16(&v));
                (got, v.map(|x| _mm512_reduce_add_ps(x)))
            };
            assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{got:?} vs {want:?}");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn reduce8_sums_each_vector_by_one_tree_whatever_the_others_hold() {
        use std::arch::x86_64::*;
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            return;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(12);
        for _ in 0..2000 {
            let vals: Vec<f32> = (0..64).map(|_| rng.gen_range(-1.0f32..1.0) * 10f32.powi(rng.gen_range(-4..4))).collect();
            // SAFETY: avx2 and fma detected above; every load reads 8 of the 64 values.
            let (got, alone) = unsafe {
                let v: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(vals.as_ptr().add(8 * i)));
                let mut got = [0f32; 8];
                _mm256_storeu_ps(got.as_mut_ptr(), reduce8(&v));
                (got, v.map(|x| hsum8(x)))
            };
            assert!(got.iter().zip(&alone).all(|(a, b)| a.to_bits() == b.to_bits()), "{got:?} vs {alone:?}");
            let want: Vec<f64> = vals.chunks(8).map(|c| c.iter().map(|&x| x as f64).sum()).collect();
            for (g, w) in got.iter().zip(&want) {
                assert!((*g as f64 - w).abs() <= 1e-6 * (1.0 + w.abs()) * 1e4, "{g} vs {w}");
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn exp256_is_within_a_few_ulp_and_zero_below_its_range() {
        use std::arch::x86_64::*;
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            return;
        }
        let mut xs: Vec<f32> = (0..80_000).map(|i| -87.0 * i as f32 / 80_000.0).collect();
        xs.extend([0.0, -0.0, -1e-30, -86.99, -87.0, -87.5, -100.0, -1e30, f32::NEG_INFINITY, -0.5, -0.3466]);
        xs.resize(xs.len().next_multiple_of(8), 0.0);
        for c in xs.chunks(8) {
            let mut got = [0f32; 8];
            // SAFETY: avx2 and fma detected above; c holds 8 values.
            unsafe { _mm256_storeu_ps(got.as_mut_ptr(), exp256(_mm256_loadu_ps(c.as_ptr()))) };
            for (&x, &g) in c.iter().zip(&got) {
                if x < -87.0 {
                    assert_eq!(g, 0.0, "e^{x}");
                } else {
                    let want = (x as f64).exp();
                    assert!(((g as f64) - want).abs() <= 3.0 * f32::EPSILON as f64 * want, "e^{x}: {g} vs {want}");
                }
            }
        }
    }

    #[test]
    fn a_query_row_gives_the_same_bits_alone_and_in_a_chunk() {
        for hd in [64usize, 16, 24] {
            let (heads, kv_heads, cap, start, n) = (6, 2, 128, 50, 16);
            let kv = cache(kv_heads, cap, hd, 3);
            let q = rand_vec(n * heads * hd, 4);
            let all = causal_attention(&q, &kv, n, start, heads, kv_heads, hd, cap);
            for i in 0..n {
                let row = &q[i * heads * hd..(i + 1) * heads * hd];
                let one = causal_attention(row, &kv, 1, start + i, heads, kv_heads, hd, cap);
                let same = one.iter().zip(&all[i * heads * hd..]).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "hd {hd}: query {i} of a {n}-row chunk differs from its lone call");
            }
        }
    }
}
