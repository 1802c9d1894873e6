//! AVX-512 VNNI kernels and the vectorized activation quantizer.

use std::arch::x86_64::*;

use super::{q8_0_scale, Format, TileJob, BLOCK, TILE};

/// R rows against one weight tile: the tile's 8 weight registers (inputs 4k..4k+4 of the
/// block for 16 outputs) and its scales are loaded once per block and serve all R rows; one
/// f32 accumulator register per row. `Q4` selects the Q4_1 format (nibbles, offsets m)
/// instead of Int8 (u8 = q + 128).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn rows<const R: usize, const Q4: bool>(job: &TileJob) {
    let (a, f) = (job.acts, job.format);
    let rec = job.rec.as_ptr() as *const __m512i;
    let xq = a.q.as_ptr().add(job.r0 * a.blocks * BLOCK);
    let xd = a.d.as_ptr().add(job.r0 * a.blocks);
    let xc = a.corr.as_ptr().add(job.r0 * a.blocks);
    let xs = a.sx.as_ptr().add(job.r0 * a.blocks);
    let nib = _mm512_set1_epi8(0x0f);
    let mut acc = [_mm512_setzero_ps(); R];
    let pf = super::prefetch_lines();
    for b in 0..job.blocks {
        let p = rec.add(f.weights_line(b));
        if pf > 0 {
            super::prefetch_block(rec as *const u8, f, b, pf);
        }
        let w: [__m512i; 8] = if Q4 {
            let l = [_mm512_load_si512(p), _mm512_load_si512(p.add(1)), _mm512_load_si512(p.add(2)), _mm512_load_si512(p.add(3))];
            let hi = |v: __m512i| _mm512_and_si512(_mm512_srli_epi16::<4>(v), nib);
            [
                _mm512_and_si512(l[0], nib),
                _mm512_and_si512(l[1], nib),
                _mm512_and_si512(l[2], nib),
                _mm512_and_si512(l[3], nib),
                hi(l[0]),
                hi(l[1]),
                hi(l[2]),
                hi(l[3]),
            ]
        } else {
            [
                _mm512_load_si512(p),
                _mm512_load_si512(p.add(1)),
                _mm512_load_si512(p.add(2)),
                _mm512_load_si512(p.add(3)),
                _mm512_load_si512(p.add(4)),
                _mm512_load_si512(p.add(5)),
                _mm512_load_si512(p.add(6)),
                _mm512_load_si512(p.add(7)),
            ]
        };
        // 16 f16 values, the low or high half of the pair's line, widened exactly.
        let half = |line: usize| _mm512_cvtph_ps(_mm256_load_si256((rec.add(line) as *const __m256i).add(b % 2)));
        let dw = half(f.scales_line(b));
        let mw = if Q4 { half(f.mins_line(b)) } else { _mm512_setzero_ps() };
        // One row of x against the tile; written out per row (not a loop over `acc`) so the
        // R accumulators stay in registers.
        macro_rules! row {
            ($i:literal) => {
                if $i < R {
                    let o = $i * a.blocks + b;
                    let x = xq.add(o * BLOCK) as *const i32;
                    // Two exact integer chains, so consecutive vpdpbusd do not wait on each other.
                    let mut s0 = if Q4 { _mm512_setzero_si512() } else { _mm512_set1_epi32(*xc.add(o)) };
                    let mut s1 = _mm512_setzero_si512();
                    s0 = _mm512_dpbusd_epi32(s0, w[0], _mm512_set1_epi32(x.read_unaligned()));
                    s1 = _mm512_dpbusd_epi32(s1, w[1], _mm512_set1_epi32(x.add(1).read_unaligned()));
                    s0 = _mm512_dpbusd_epi32(s0, w[2], _mm512_set1_epi32(x.add(2).read_unaligned()));
                    s1 = _mm512_dpbusd_epi32(s1, w[3], _mm512_set1_epi32(x.add(3).read_unaligned()));
                    s0 = _mm512_dpbusd_epi32(s0, w[4], _mm512_set1_epi32(x.add(4).read_unaligned()));
                    s1 = _mm512_dpbusd_epi32(s1, w[5], _mm512_set1_epi32(x.add(5).read_unaligned()));
                    s0 = _mm512_dpbusd_epi32(s0, w[6], _mm512_set1_epi32(x.add(6).read_unaligned()));
                    s1 = _mm512_dpbusd_epi32(s1, w[7], _mm512_set1_epi32(x.add(7).read_unaligned()));
                    let isum = _mm512_add_epi32(s0, s1);
                    let sc = _mm512_mul_ps(dw, _mm512_set1_ps(*xd.add(o)));
                    acc[$i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), sc, acc[$i]);
                    if Q4 {
                        acc[$i] = _mm512_fmadd_ps(mw, _mm512_set1_ps(*xs.add(o)), acc[$i]);
                    }
                }
            };
        }
        row!(0);
        row!(1);
        row!(2);
        row!(3);
        row!(4);
        row!(5);
        row!(6);
        row!(7);
    }
    let mask: __mmask16 = if job.valid >= TILE { 0xffff } else { (1u16 << job.valid) - 1 };
    for (i, acc) in acc.iter().enumerate() {
        _mm512_mask_storeu_ps(job.dst.add(i * job.ldy), mask, *acc);
    }
}

/// # Safety
/// The CPU has avx512f, avx512bw and avx512vnni (checked by `Kernel::resolve`); `job.dst`
/// rows 0..rows (stride ldy) have `valid` writable f32 each.
pub(super) unsafe fn tile(job: &TileJob) {
    const _: () = assert!(super::MAX_ROWS == 8, "rows! is written out for 8 rows");
    tile_by_rows!(rows, job)
}

/// `quantize_row_generic` in AVX-512, with the same bits: the same IEEE products, and
/// round-half-away-from-zero (`f32::round`) as trunc plus a step where |frac| ≥ 0.5 (the
/// fraction x − trunc(x) is exact for |x| < 2²³).
///
/// # Safety
/// The CPU has avx512f and avx512bw; q, d, corr hold `d.len()` blocks and x.len() ≤ 32·blocks.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn quantize_row(x: &[f32], q: &mut [i8], d: &mut [f32], corr: &mut [i32]) {
    let n = x.len();
    let blocks = d.len();
    debug_assert!(q.len() == blocks * BLOCK && corr.len() == blocks && n <= blocks * BLOCK);
    let half = _mm512_set1_ps(0.5);
    let one = _mm512_set1_ps(1.0);
    let lim = _mm512_set1_ps(127.0);
    let big = _mm512_set1_ps(f32::MAX);
    for b in 0..blocks {
        let base = b * BLOCK;
        // Masked loads read only x[..n] (masked-off lanes never fault); the rest is zero.
        let v0 = _mm512_maskz_loadu_ps(lanes(n, base), x.as_ptr().wrapping_add(base));
        let v1 = _mm512_maskz_loadu_ps(lanes(n, base + 16), x.as_ptr().wrapping_add(base + 16));
        let a0 = _mm512_abs_ps(v0);
        let a1 = _mm512_abs_ps(v1);
        let finite = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(a0, big) & _mm512_cmp_ps_mask::<_CMP_LE_OQ>(a1, big);
        if finite != 0xffff {
            q[base..base + BLOCK].fill(0);
            d[b] = f32::NAN;
            corr[b] = 0;
            continue;
        }
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1));
        let (scale, id) = q8_0_scale(amax);
        let idv = _mm512_set1_ps(id);
        let round = |v: __m512| {
            let s = _mm512_mul_ps(v, idv);
            let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(s);
            let frac = _mm512_abs_ps(_mm512_sub_ps(s, t));
            let step = _mm512_castsi512_ps(_mm512_or_si512(
                _mm512_castps_si512(one),
                _mm512_and_si512(_mm512_castps_si512(s), _mm512_set1_epi32(i32::MIN)),
            ));
            let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(frac, half);
            let r = _mm512_mask_add_ps(t, up, t, step);
            _mm512_cvtps_epi32(_mm512_max_ps(_mm512_min_ps(r, lim), _mm512_sub_ps(_mm512_setzero_ps(), lim)))
        };
        let i0 = round(v0);
        let i1 = round(v1);
        let dst = q.as_mut_ptr().add(base) as *mut __m128i;
        _mm_storeu_si128(dst, _mm512_cvtepi32_epi8(i0));
        _mm_storeu_si128(dst.add(1), _mm512_cvtepi32_epi8(i1));
        d[b] = scale;
        corr[b] = -128 * _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
    }
}

/// Mask of the lanes start..start+16 that lie below n.
#[inline(always)]
fn lanes(n: usize, start: usize) -> __mmask16 {
    match n.saturating_sub(start) {
        0 => 0,
        k if k >= 16 => 0xffff,
        k => ((1u32 << k) - 1) as __mmask16,
    }
}
