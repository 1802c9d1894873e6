//! AVX2 kernels for CPUs without AVX-512 VNNI (most laptops and many servers: Zen 2 and 3, Intel
//! client cores): the same products and the same float sequence as the VNNI kernel, so the same
//! bits, on 256-bit registers. Before this kernel such a machine ran the portable code compiled
//! for AVX2, which the compiler could not vectorize across the tile's layout: a fresh machine
//! without AVX-512 regenerated the quickstart's data at 0.5 conversations/s instead of about 7.
//!
//! There is no `vpdpbusd` here. The integer dot of a line (4 inputs × 16 outputs) is
//! `vpmaddubsw` (u8 × s8 → adjacent pairs summed into i16) then `vpmaddwd` against ones (i16
//! pairs → i32), which must not saturate to stay exact:
//! - Q4_1: nibbles (0..15) are the unsigned side and the activations the signed one; a pair is
//!   at most 2 · 15 · 128 = 3840 in magnitude, so the eight lines of a block are summed in i16
//!   (≤ 30 720) before the one widening `vpmaddwd`.
//! - Int8: weights are stored as u8 = q + 128; `q` itself (xor 0x80) is the signed side, made
//!   to carry the activation's sign (`vpsignb`), and |x| the unsigned one: a pair is at most
//!   2 · 128 · 127 = 32 512, so each line is widened to i32 on its own. The sum is Σ q·x
//!   directly, the same integer the VNNI kernel gets as Σ (q + 128)·x − 128·Σ x.
//!
//! The float steps are the VNNI kernel's, lane for lane: f16 scales widened exactly
//! (`vcvtph2ps`), `dw · dx` rounded once, one fma of the integer sum into the accumulator, and
//! for Q4_1 one fma of `mw · sx`.

use std::arch::x86_64::*;

use super::{Format, TileJob, BLOCK, TILE};

/// Int8 rows a weight line serves before the next group reloads it (from L1): four rows' i32
/// sums (eight registers), the line's two halves and the broadcasts fit the sixteen ymm
/// registers. Measured on one Zen 3 core (`examples/bench_qgemm`), this cut an Int8 product at
/// m = 4–16 by a fifth to a third against unpacking a block's eight lines once for all rows,
/// which spilled them; for Q4_1 the grouped order measured slower, so Q4_1 keeps that one.
const INT8_GROUP: usize = 4;

/// R rows against one weight tile, two 8-output halves per register pair.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows<const R: usize, const Q4: bool>(job: &TileJob) {
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    if Q4 {
        q4_rows::<R>(job, &mut acc);
    } else {
        let mut g = 0;
        while g < R {
            match R - g {
                1 => int8_group::<1>(job, g, &mut acc[g..]),
                2 => int8_group::<2>(job, g, &mut acc[g..]),
                3 => int8_group::<3>(job, g, &mut acc[g..]),
                _ => int8_group::<INT8_GROUP>(job, g, &mut acc[g..]),
            }
            g += INT8_GROUP;
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        let dst = job.dst.add(i * job.ldy);
        if job.valid >= TILE {
            _mm256_storeu_ps(dst, acc[0]);
            _mm256_storeu_ps(dst.add(8), acc[1]);
        } else {
            let mut out = [0f32; TILE];
            _mm256_storeu_ps(out.as_mut_ptr(), acc[0]);
            _mm256_storeu_ps(out.as_mut_ptr().add(8), acc[1]);
            std::ptr::copy_nonoverlapping(out.as_ptr(), dst, job.valid);
        }
    }
}

/// Q4_1: each block's weights are unpacked once (nibbles split) and serve all R rows.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q4_rows<const R: usize>(job: &TileJob, acc: &mut [[__m256; 2]; R]) {
    let (a, f) = (job.acts, job.format);
    let rec = job.rec.as_ptr() as *const u8;
    let xq = a.q.as_ptr().add(job.r0 * a.blocks * BLOCK);
    let xd = a.d.as_ptr().add(job.r0 * a.blocks);
    let xs = a.sx.as_ptr().add(job.r0 * a.blocks);
    let nib = _mm256_set1_epi8(0x0f);
    let ones = _mm256_set1_epi16(1);
    // w[k][h]: inputs 4k..4k+4 of the block for outputs 8h..8h+8, nibbles as u8
    let mut w = [[_mm256_setzero_si256(); 2]; 8];
    let pf = super::prefetch_lines();
    for b in 0..job.blocks {
        if pf > 0 {
            super::prefetch_block(rec, f, b, pf);
        }
        let p = rec.add(f.weights_line(b) * 64);
        for h in 0..2 {
            for k in 0..4 {
                let l = _mm256_load_si256(p.add(k * 64 + h * 32) as *const __m256i);
                w[k][h] = _mm256_and_si256(l, nib);
                w[k + 4][h] = _mm256_and_si256(_mm256_srli_epi16::<4>(l), nib);
            }
        }
        let dw = halves(rec, f.scales_line(b), b);
        let mw = halves(rec, f.mins_line(b), b);
        for (i, acc) in acc.iter_mut().enumerate() {
            let o = i * a.blocks + b;
            let x = xq.add(o * BLOCK) as *const i32;
            let mut s = [_mm256_setzero_si256(); 2];
            for (k, wk) in w.iter().enumerate() {
                let xk = _mm256_set1_epi32(x.add(k).read_unaligned());
                for h in 0..2 {
                    s[h] = _mm256_add_epi16(s[h], _mm256_maddubs_epi16(wk[h], xk));
                }
            }
            let isum = [_mm256_madd_epi16(s[0], ones), _mm256_madd_epi16(s[1], ones)];
            let dx = _mm256_set1_ps(*xd.add(o));
            for h in 0..2 {
                acc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[h]), _mm256_mul_ps(dw[h], dx), acc[h]);
                acc[h] = _mm256_fmadd_ps(mw[h], _mm256_set1_ps(*xs.add(o)), acc[h]);
            }
        }
    }
}

/// Int8 rows g..g+G of the tile over all its blocks, into `acc[0..G]`: each weight line is
/// loaded once (offset removed) and multiplied into every row of the group before the next.
/// The integer sums are exact in any order; each row's float steps per block are the VNNI
/// kernel's, in its order.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn int8_group<const G: usize>(job: &TileJob, g: usize, acc: &mut [[__m256; 2]]) {
    let (a, f) = (job.acts, job.format);
    let rec = job.rec.as_ptr() as *const u8;
    let r0 = job.r0 + g;
    let xq = a.q.as_ptr().add(r0 * a.blocks * BLOCK);
    let xd = a.d.as_ptr().add(r0 * a.blocks);
    let flip = _mm256_set1_epi8(-128);
    let ones = _mm256_set1_epi16(1);
    // the first group's pass brings the lines in; the others find them in L1
    let pf = if g == 0 { super::prefetch_lines() } else { 0 };
    for b in 0..job.blocks {
        if pf > 0 {
            super::prefetch_block(rec, f, b, pf);
        }
        let p = rec.add(f.weights_line(b) * 64);
        // i32 sums of row i, outputs 8h..8h+8
        let mut s = [[_mm256_setzero_si256(); 2]; G];
        for k in 0..8 {
            let line = |h: usize| _mm256_load_si256(p.add(k * 64 + h * 32) as *const __m256i);
            let w = [_mm256_xor_si256(line(0), flip), _mm256_xor_si256(line(1), flip)];
            for (i, si) in s.iter_mut().enumerate() {
                // row i's activations of inputs 4k..4k+4 of block b
                let x = _mm256_set1_epi32((xq.add((i * a.blocks + b) * BLOCK) as *const i32).add(k).read_unaligned());
                let ax = _mm256_abs_epi8(x);
                for h in 0..2 {
                    let pairs = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(w[h], x));
                    si[h] = _mm256_add_epi32(si[h], _mm256_madd_epi16(pairs, ones));
                }
            }
        }
        let dw = halves(rec, f.scales_line(b), b);
        for (i, (acc, isum)) in acc.iter_mut().zip(s.iter()).enumerate() {
            let dx = _mm256_set1_ps(*xd.add(i * a.blocks + b));
            for h in 0..2 {
                acc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[h]), _mm256_mul_ps(dw[h], dx), acc[h]);
            }
        }
    }
}

/// Block b's 16 f16 values in half b % 2 of a pair's line `l`, widened: outputs 0..8, then 8..16.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn halves(rec: *const u8, l: usize, b: usize) -> [__m256; 2] {
    let at = rec.add(l * 64 + b % 2 * 32);
    [_mm256_cvtph_ps(_mm_load_si128(at as *const __m128i)), _mm256_cvtph_ps(_mm_load_si128(at.add(16) as *const __m128i))]
}

/// # Safety
/// The CPU has avx2, fma and f16c (checked by `Kernel::resolve`); `job.dst` rows 0..rows
/// (stride ldy) have `valid` writable f32 each.
pub(super) unsafe fn tile(job: &TileJob) {
    tile_by_rows!(rows, job)
}

/// `quantize_row_generic` on eight lanes, with the same bits: the same IEEE products, the
/// maximum (exact in any order), and round-half-away-from-zero (`f32::round`) as trunc plus a
/// step where |frac| ≥ 0.5 (the fraction x − trunc(x) is exact for |x| < 2²³; here |x| ≤ 127
/// and a little).
///
/// # Safety
/// The CPU has avx2 and fma; q, d, corr hold `d.len()` blocks and x.len() ≤ 32·blocks.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn quantize_row(x: &[f32], q: &mut [i8], d: &mut [f32], corr: &mut [i32]) {
    let n = x.len();
    let blocks = d.len();
    debug_assert!(q.len() == blocks * BLOCK && corr.len() == blocks && n <= blocks * BLOCK);
    let half = _mm256_set1_ps(0.5);
    let one = _mm256_set1_ps(1.0);
    let lim = _mm256_set1_ps(127.0);
    let neg_lim = _mm256_set1_ps(-127.0);
    let big = _mm256_set1_ps(f32::MAX);
    let sign = _mm256_set1_ps(-0.0);
    let abs = |v: __m256| _mm256_andnot_ps(sign, v);
    let lane_ids = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for b in 0..blocks {
        let base = b * BLOCK;
        // Masked loads read only x[..n] (masked-off lanes never fault); the rest is zero.
        let load = |at: usize| {
            let valid = n.saturating_sub(at).min(8) as i32;
            let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(valid), lane_ids);
            _mm256_maskload_ps(x.as_ptr().wrapping_add(at), mask)
        };
        let v = [load(base), load(base + 8), load(base + 16), load(base + 24)];
        let a = [abs(v[0]), abs(v[1]), abs(v[2]), abs(v[3])];
        let finite = a.iter().fold(-1, |m, &ai| m & _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_LE_OQ>(ai, big)));
        if finite != 0xff {
            q[base..base + BLOCK].fill(0);
            d[b] = f32::NAN;
            corr[b] = 0;
            continue;
        }
        let m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)));
        let (scale, id) = super::q8_0_scale(amax);
        let idv = _mm256_set1_ps(id);
        let round = |v: __m256| {
            let s = _mm256_mul_ps(v, idv);
            let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(s);
            let frac = abs(_mm256_sub_ps(s, t));
            let step = _mm256_or_ps(one, _mm256_and_ps(s, sign));
            let up = _mm256_cmp_ps::<_CMP_GE_OQ>(frac, half);
            let r = _mm256_add_ps(t, _mm256_and_ps(up, step));
            _mm256_cvtps_epi32(_mm256_max_ps(_mm256_min_ps(r, lim), neg_lim))
        };
        let i = [round(v[0]), round(v[1]), round(v[2]), round(v[3])];
        // i32 → i8 (all within ±127, so the saturating packs are exact), then undo the packs'
        // per-128-bit-lane interleave
        let p16 = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
        let p8 = _mm256_permutevar8x32_epi32(p16, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(q.as_mut_ptr().add(base) as *mut __m256i, p8);
        let s = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
        let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        d[b] = scale;
        corr[b] = -128 * _mm_cvtsi128_si32(s);
    }
}
