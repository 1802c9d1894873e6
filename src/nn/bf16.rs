//! The head's two products with the frozen LM head in bf16, on AVX512-BF16 (`vdpbf16ps`).
//!
//! `vdpbf16ps` multiplies pairs of bf16 values and adds both products into an f32 lane: 32
//! multiply-adds per instruction against 16 for an f32 `vfmadd`, at the same rate on Zen 4, so
//! a product at the instruction's limit takes half the time of the f32 one. Inputs are rounded to
//! bf16 (round to nearest even, 8 significant bits); every sum is kept in f32. This is the
//! precision PyTorch's CPU autocast and every GPU recipe train in.
//!
//! # Layout
//! `C (m × n) = A (m × k) · B (k × n)`. A is bf16 row-major with k padded to an even length, so
//! that each `u32` holds the pair (k = 2p, 2p + 1) of a row. B is packed once, the way the
//! instruction reads it ([`PackedB`]): column panels of [`NR`] columns; within a panel, for each
//! pair p, the NR columns' pairs side by side. The head packs W twice, once per product: the
//! logits read `Wᵀ` (k = H, n = V) and the gradient rows read `W` (k = V, n = H).
//!
//! # Blocking
//! A tile is [`MR`] rows × [`NR`] columns: 24 accumulators, three panel loads and eight
//! broadcasts per pair. k runs in blocks of [`KC_PAIRS`] pairs, so that a panel's block (48 KB)
//! stays in L2 while all row tiles pass over it; the panels are split over rayon's workers.

use rayon::prelude::*;

/// Columns of a panel (three 16-lane vectors).
pub(super) const NR: usize = 48;
/// Rows of a tile.
pub(super) const MR: usize = 8;
/// Pairs of k per block.
pub(super) const KC_PAIRS: usize = 256;

/// Whether this CPU runs the bf16 products.
pub(super) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// f32 → bf16, round to nearest even (the rounding of `vcvtne2ps2bf16` on normal numbers).
pub(super) fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

#[cfg(test)]
pub(super) fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

fn pair(lo: f32, hi: f32) -> u32 {
    to_bf16(lo) as u32 | ((to_bf16(hi) as u32) << 16)
}

/// B (k × n) packed for [`gemm`]: `data[panel][pair][NR]`, zero-padded to whole panels and to an
/// even k.
#[derive(Debug, Clone)]
pub(super) struct PackedB {
    data: Vec<u32>,
    k: usize,
    n: usize,
}

impl PackedB {
    /// Packs `B[kk][j] = src[kk * rs + j * cs]` (row and column strides in elements).
    pub(super) fn pack(src: &[f32], k: usize, n: usize, rs: usize, cs: usize) -> Self {
        let k_pairs = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        let mut data = vec![0u32; panels * k_pairs * NR];
        let at = |kk: usize, j: usize| if kk < k { src[kk * rs + j * cs] } else { 0.0 };
        data.par_chunks_mut(k_pairs * NR).enumerate().for_each(|(panel, out)| {
            let j0 = panel * NR;
            let width = NR.min(n - j0);
            for p in 0..k_pairs {
                let row = &mut out[p * NR..p * NR + width];
                for (jj, slot) in row.iter_mut().enumerate() {
                    *slot = pair(at(2 * p, j0 + jj), at(2 * p + 1, j0 + jj));
                }
            }
        });
        PackedB { data, k, n }
    }

}

/// Writes row `src` (k floats) as bf16 pairs into `dst` (⌈k/2⌉ words; an odd k's last pair is
/// padded with zero).
pub(super) fn pack_row(src: &[f32], dst: &mut [u32]) {
    let k = src.len();
    debug_assert_eq!(dst.len(), k.div_ceil(2));
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the features were just detected; lengths are as the debug assertion states.
        unsafe { pack_row_avx512(src, dst) };
        return;
    }
    for (p, slot) in dst.iter_mut().enumerate() {
        let hi = if 2 * p + 1 < k { src[2 * p + 1] } else { 0.0 };
        *slot = pair(src[2 * p], hi);
    }
}

/// [`pack_row`] for each row of `src` (rows of `k` floats) into `dst` (rows of ⌈k/2⌉ words),
/// split over rayon's workers.
pub(super) fn pack_rows(src: &[f32], k: usize, dst: &mut [u32]) {
    let kp = k.div_ceil(2);
    dst.par_chunks_mut(kp).zip(src.par_chunks(k)).for_each(|(d, s)| pack_row(s, d));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_row_avx512(src: &[f32], dst: &mut [u32]) {
    use std::arch::x86_64::*;
    let k = src.len();
    let full = k / 32;
    for b in 0..full {
        let lo = _mm512_loadu_ps(src.as_ptr().add(32 * b));
        let hi = _mm512_loadu_ps(src.as_ptr().add(32 * b + 16));
        // Lanes 0..16 of the result come from the second operand.
        let v = _mm512_cvtne2ps_pbh(hi, lo);
        _mm512_storeu_si512(dst.as_mut_ptr().add(16 * b) as *mut _, std::mem::transmute::<__m512bh, __m512i>(v));
    }
    for p in 16 * full..dst.len() {
        let hi = if 2 * p + 1 < k { src[2 * p + 1] } else { 0.0 };
        dst[p] = pair(src[2 * p], hi);
    }
}

/// `C (m × n, row stride ldc) [+]= A · B`, A given as bf16 pair rows (`a_pairs` words a row,
/// ≥ ⌈k/2⌉, k = `b.k()`). Panics if a slice is shorter than the shapes say, or if the CPU lacks
/// AVX512-BF16 (check [`available`] first).
pub(super) fn gemm(m: usize, a: &[u32], a_pairs: usize, b: &PackedB, c: &mut [f32], ldc: usize, accumulate: bool) {
    let (k_pairs, n) = (b.k.div_ceil(2), b.n);
    if m == 0 || n == 0 {
        return;
    }
    assert!(available(), "bf16 head products need AVX512-BF16");
    assert!(a_pairs >= k_pairs && a.len() >= (m - 1) * a_pairs + k_pairs, "bf16 gemm: A too short");
    assert!(c.len() >= (m - 1) * ldc + n && ldc >= n, "bf16 gemm: C too short");
    let panels = n.div_ceil(NR);
    let c_addr = c.as_mut_ptr() as usize;
    let a_addr = a.as_ptr() as usize;
    let threads = rayon::current_num_threads().max(1);
    // Contiguous runs of panels per worker: each keeps its own block of B in its own L2.
    let per = panels.div_ceil(threads);
    // k blocks of equal size, at most KC_PAIRS each.
    let kc = k_pairs.div_ceil(k_pairs.div_ceil(KC_PAIRS));
    (0..panels.div_ceil(per)).into_par_iter().for_each(|t| {
        let (p0, p1) = (t * per, ((t + 1) * per).min(panels));
        for kb in (0..k_pairs).step_by(kc) {
            let kps = kc.min(k_pairs - kb);
            let first = kb == 0 && !accumulate;
            for panel in p0..p1 {
                let j0 = panel * NR;
                let width = NR.min(n - j0);
                let bp = &b.data[(panel * k_pairs + kb) * NR..];
                let mut r = 0;
                while r < m {
                    let rows = MR.min(m - r);
                    // SAFETY: the asserts above bound every row of A and C that a tile touches;
                    // workers write disjoint column panels of C.
                    unsafe {
                        let tile = Tile {
                            a: (a_addr as *const u32).add(r * a_pairs + kb),
                            lda: a_pairs,
                            b: bp.as_ptr(),
                            kps,
                            c: (c_addr as *mut f32).add(r * ldc + j0),
                            ldc,
                            width,
                            first,
                        };
                        tile.run(rows);
                    }
                    r += rows;
                }
            }
        }
    });
}

/// One tile's operands: rows of A from `a` (`lda` words a row), the panel's k block from `b`
/// (`kps` pairs), C from `c` (row stride `ldc`, the first `width` columns written; `first`:
/// overwrite instead of add).
#[derive(Clone, Copy)]
struct Tile {
    a: *const u32,
    lda: usize,
    b: *const u32,
    kps: usize,
    c: *mut f32,
    ldc: usize,
    width: usize,
    first: bool,
}

impl Tile {
    /// # Safety
    /// The CPU has AVX512-BF16; `rows` ≤ [`MR`] rows of A and C and the panel's `kps` pairs are
    /// in bounds.
    unsafe fn run(&self, rows: usize) {
        macro_rules! go {
            ($($r:literal)*) => {
                match rows {
                    $($r => self.rows::<$r>(),)*
                    _ => unreachable!("tile rows {rows} > MR"),
                }
            };
        }
        go!(1 2 3 4 5 6 7 8)
    }

    /// R rows × NR columns over `kps` pairs.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn rows<const R: usize>(&self) {
        use std::arch::x86_64::*;
        let Tile { a, lda, b, kps, c, ldc, width, first } = *self;
        let mut acc = [[_mm512_setzero_ps(); 3]; R];
        for p in 0..kps {
            let bq = b.add(p * NR);
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bq as *const _));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bq.add(16) as *const _));
            let b2: __m512bh = std::mem::transmute(_mm512_loadu_si512(bq.add(32) as *const _));
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(r * lda + p) as i32));
                acc_r[0] = _mm512_dpbf16_ps(acc_r[0], av, b0);
                acc_r[1] = _mm512_dpbf16_ps(acc_r[1], av, b1);
                acc_r[2] = _mm512_dpbf16_ps(acc_r[2], av, b2);
            }
        }
        for (r, acc_r) in acc.iter().enumerate() {
            let row = c.add(r * ldc);
            for (v, &x) in acc_r.iter().enumerate() {
                let lanes = width.saturating_sub(16 * v).min(16);
                if lanes == 0 {
                    break;
                }
                let mask: __mmask16 = if lanes == 16 { 0xffff } else { (1u16 << lanes) - 1 };
                let dst = row.add(16 * v);
                let sum = if first { x } else { _mm512_add_ps(_mm512_maskz_loadu_ps(mask, dst), x) };
                _mm512_mask_storeu_ps(dst, mask, sum);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even significand (1).
        assert_eq!(from_bf16(to_bf16(1.0 + 1.0 / 256.0)), 1.0);
        // 1 + 3·2^-8 lies halfway between 1 + 2^-7 and 1 + 2^-6: ties go to 1 + 2^-6.
        assert_eq!(from_bf16(to_bf16(1.0 + 3.0 / 256.0)), 1.0 + 1.0 / 64.0);
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
    }

    #[test]
    fn a_packed_row_holds_the_rounded_pairs() {
        let mut seed = 7;
        for k in [1usize, 2, 31, 32, 33, 64, 577] {
            let src: Vec<f32> = (0..k).map(|_| lcg(&mut seed) * 100.0).collect();
            let mut dst = vec![0u32; k.div_ceil(2)];
            pack_row(&src, &mut dst);
            for (i, &x) in src.iter().enumerate() {
                let word = dst[i / 2];
                let half = if i % 2 == 0 { word & 0xffff } else { word >> 16 } as u16;
                assert_eq!(half, to_bf16(x), "k {k} element {i}");
            }
            if k % 2 == 1 {
                assert_eq!(dst[k / 2] >> 16, 0, "odd k pads with zero");
            }
        }
    }

    /// The product equals the f32 product of the bf16-rounded operands up to f32 summation order.
    #[test]
    fn the_product_is_the_product_of_the_rounded_operands() {
        if !available() {
            eprintln!("no AVX512-BF16 on this CPU: the bf16 products are not used here");
            return;
        }
        let mut seed = 11;
        for &(m, k, n, accumulate) in
            &[(1usize, 2usize, 1usize, false), (8, 576, 48, false), (13, 1001, 100, true), (3, 600, 7, false), (9, 64, 145, true)]
        {
            let a: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect(); // n × k, B = wᵀ
            let kp = k.div_ceil(2);
            let mut a16 = vec![0u32; m * kp];
            for r in 0..m {
                pack_row(&a[r * k..(r + 1) * k], &mut a16[r * kp..(r + 1) * kp]);
            }
            let b = PackedB::pack(&w, k, n, 1, k);
            let ldc = n + 3;
            let init: Vec<f32> = (0..m * ldc).map(|_| lcg(&mut seed)).collect();
            let mut c = init.clone();
            gemm(m, &a16, kp, &b, &mut c, ldc, accumulate);
            for r in 0..m {
                for j in 0..ldc {
                    let got = c[r * ldc + j];
                    if j >= n {
                        assert_eq!(got, init[r * ldc + j], "column {j} past n is untouched");
                        continue;
                    }
                    let mut want = if accumulate { init[r * ldc + j] as f64 } else { 0.0 };
                    let mut mag = 0.0f64;
                    for kk in 0..k {
                        let x = from_bf16(to_bf16(a[r * k + kk])) as f64 * from_bf16(to_bf16(w[j * k + kk])) as f64;
                        want += x;
                        mag += x.abs();
                    }
                    let tol = 1e-5 * mag + 1e-6;
                    assert!((got as f64 - want).abs() <= tol, "m {m} k {k} n {n}: C[{r}][{j}] {got} vs {want}");
                }
            }
        }
    }
}
