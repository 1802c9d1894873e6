//! Products in bf16 on AVX512-BF16 (`vdpbf16ps`): the training head's two products with the
//! frozen LM head (`train::head`), and, as the candle op [`matmul`], the drafter layers' linears
//! when a run asks for `layer_precision = "bf16"`.
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
//! logits read `Wᵀ` (k = H, n = V) and the gradient rows read `W` (k = V, n = H). Both A and B
//! are packed from any strided f32 source, so a transposed operand costs no copy of its own.
//!
//! # Blocking
//! A tile is [`MR`] rows × [`NR`] columns: 24 accumulators, three panel loads and eight
//! broadcasts per pair. k runs in blocks of [`KC_PAIRS`] pairs, so that a panel's block (48 KB)
//! stays in L2 while all row tiles pass over it; the panels are split over rayon's workers.

use rayon::prelude::*;

/// Columns of a panel (three 16-lane vectors).
pub(crate) const NR: usize = 48;
/// Rows of a tile.
pub(crate) const MR: usize = 8;
/// Pairs of k per block.
pub(crate) const KC_PAIRS: usize = 256;

/// Whether this CPU runs the bf16 products.
pub(crate) fn available() -> bool {
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
pub(crate) fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

#[cfg(test)]
pub(crate) fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

fn pair(lo: f32, hi: f32) -> u32 {
    to_bf16(lo) as u32 | ((to_bf16(hi) as u32) << 16)
}

/// B (k × n) packed for [`gemm`]: `data[panel][pair][NR]`, zero-padded to whole panels and to an
/// even k.
#[derive(Debug, Clone)]
pub(crate) struct PackedB {
    data: Vec<u32>,
    k: usize,
    n: usize,
}

impl PackedB {
    /// Packs `B[kk][j] = src[kk * rs + j * cs]` (row and column strides in elements).
    pub(crate) fn pack(src: &[f32], k: usize, n: usize, rs: usize, cs: usize) -> Self {
        let k_pairs = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        let mut data = vec![0u32; panels * k_pairs * NR];
        if k == 0 || n == 0 {
            return PackedB { data, k, n };
        }
        assert!(src.len() > (k - 1) * rs + (n - 1) * cs, "bf16 pack: B source too short");
        #[cfg(target_arch = "x86_64")]
        if available() && (cs == 1 || rs == 1) {
            data.par_chunks_mut(k_pairs * NR).enumerate().for_each(|(panel, out)| {
                let j0 = panel * NR;
                let width = NR.min(n - j0);
                // SAFETY: the features were just detected; the assert above bounds every element
                // of B, and each panel's reads stay within its `width` columns.
                unsafe {
                    if cs == 1 {
                        pack_panel_rows(src, rs, k, j0, width, out);
                    } else {
                        pack_panel_columns(src, cs, k, j0, width, out);
                    }
                }
            });
            return PackedB { data, k, n };
        }
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

/// A (m × k) packed as the rows [`gemm`] reads: ⌈k/2⌉ pair words a row, from
/// `A[i][kk] = src[i * rs + kk * cs]`.
pub(crate) fn pack_a(src: &[f32], m: usize, k: usize, rs: usize, cs: usize) -> Vec<u32> {
    let kp = k.div_ceil(2);
    let mut dst = vec![0u32; m * kp];
    if m == 0 || k == 0 {
        return dst;
    }
    assert!(src.len() > (m - 1) * rs + (k - 1) * cs, "bf16 pack: A source too short");
    if cs == 1 {
        dst.par_chunks_mut(kp).enumerate().for_each(|(i, d)| pack_row(&src[i * rs..i * rs + k], d));
        return dst;
    }
    #[cfg(target_arch = "x86_64")]
    if available() && rs == 1 {
        // Sixteen rows at a time: row i's pair p comes from src[2p·cs + i] and src[(2p+1)·cs + i],
        // which are contiguous in i.
        dst.par_chunks_mut(16 * kp).enumerate().for_each(|(blk, d)| {
            let i0 = 16 * blk;
            // SAFETY: as above; `d` holds the block's rows (fewer than 16 in the last block).
            unsafe { pack_a_columns(src, cs, k, i0, (m - i0).min(16), d, kp) };
        });
        return dst;
    }
    dst.par_chunks_mut(kp).enumerate().for_each(|(i, d)| {
        for (p, slot) in d.iter_mut().enumerate() {
            let hi = if 2 * p + 1 < k { src[i * rs + (2 * p + 1) * cs] } else { 0.0 };
            *slot = pair(src[i * rs + 2 * p * cs], hi);
        }
    });
    dst
}

/// The bf16 pair words (lo[j], hi[j]) of two vectors of 16 floats: lo in the low half of each
/// word. Rounds as [`to_bf16`] on normal numbers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pairs16(lo: std::arch::x86_64::__m512, hi: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    // [lo0..lo15 | hi0..hi15] as bf16 lanes, then interleaved to lo0 hi0 lo1 hi1 ...
    let v = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
    let idx = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0,
    );
    _mm512_permutexvar_epi16(idx, v)
}

/// Mask of the first `lanes` (≤ 16) lanes.
#[cfg(target_arch = "x86_64")]
fn first_lanes(lanes: usize) -> u16 {
    if lanes >= 16 {
        0xffff
    } else {
        ((1u32 << lanes) - 1) as u16
    }
}

/// One panel of B whose rows are contiguous (`cs` = 1): pair p of the panel is rows 2p and
/// 2p + 1, columns j0..j0 + width.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_panel_rows(src: &[f32], rs: usize, k: usize, j0: usize, width: usize, out: &mut [u32]) {
    use std::arch::x86_64::*;
    let s = src.as_ptr();
    for p in 0..k.div_ceil(2) {
        for v in 0..width.div_ceil(16) {
            let mask = first_lanes(width - 16 * v);
            let col = j0 + 16 * v;
            let lo = _mm512_maskz_loadu_ps(mask, s.add(2 * p * rs + col));
            let hi = if 2 * p + 1 < k { _mm512_maskz_loadu_ps(mask, s.add((2 * p + 1) * rs + col)) } else { _mm512_setzero_ps() };
            _mm512_mask_storeu_epi32(out.as_mut_ptr().add(p * NR + 16 * v) as *mut i32, mask, pairs16(lo, hi));
        }
    }
}

/// One panel of B whose columns are contiguous (`rs` = 1, e.g. `Wᵀ`): each column is one packed
/// row, scattered into the panel's pair rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_panel_columns(src: &[f32], cs: usize, k: usize, j0: usize, width: usize, out: &mut [u32]) {
    let kp = k.div_ceil(2);
    let mut col = vec![0u32; kp];
    for jj in 0..width {
        let base = (j0 + jj) * cs;
        pack_row_avx512(&src[base..base + k], &mut col);
        for (p, &w) in col.iter().enumerate() {
            *out.get_unchecked_mut(p * NR + jj) = w;
        }
    }
}

/// Rows i0..i0 + rows of A whose columns are contiguous (`rs` = 1, e.g. `Gᵀ`), into `d` (rows
/// of `kp` words).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_a_columns(src: &[f32], cs: usize, k: usize, i0: usize, rows: usize, d: &mut [u32], kp: usize) {
    use std::arch::x86_64::*;
    let s = src.as_ptr();
    let mask = first_lanes(rows);
    let mut words = [0u32; 16];
    for p in 0..kp {
        let lo = _mm512_maskz_loadu_ps(mask, s.add(2 * p * cs + i0));
        let hi = if 2 * p + 1 < k { _mm512_maskz_loadu_ps(mask, s.add((2 * p + 1) * cs + i0)) } else { _mm512_setzero_ps() };
        _mm512_storeu_si512(words.as_mut_ptr() as *mut _, pairs16(lo, hi));
        for (r, &w) in words.iter().enumerate().take(rows) {
            *d.get_unchecked_mut(r * kp + p) = w;
        }
    }
}

/// Writes row `src` (k floats) as bf16 pairs into `dst` (⌈k/2⌉ words; an odd k's last pair is
/// padded with zero).
pub(crate) fn pack_row(src: &[f32], dst: &mut [u32]) {
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
pub(crate) fn pack_rows(src: &[f32], k: usize, dst: &mut [u32]) {
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
pub(crate) fn gemm(m: usize, a: &[u32], a_pairs: usize, b: &PackedB, c: &mut [f32], ldc: usize, accumulate: bool) {
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
                let mask: __mmask16 = first_lanes(lanes);
                let dst = row.add(16 * v);
                let sum = if first { x } else { _mm512_add_ps(_mm512_maskz_loadu_ps(mask, dst), x) };
                _mm512_mask_storeu_ps(dst, mask, sum);
            }
        }
    }
}

/// The precision of a family of products (the head's, the drafter layers').
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 operands and sums.
    #[default]
    F32,
    /// Operands rounded to bf16, products on `vdpbf16ps`, sums in f32: about twice the f32 rate
    /// (DESIGN §7.14). Only on CPUs with AVX512-BF16.
    Bf16,
}

crate::named_enum!(Precision, "precision", ["f32", "bf16"]);

impl Precision {
    pub fn is_f32(&self) -> bool {
        *self == Precision::F32
    }

    /// Whether this CPU can run products at this precision (f32 everywhere; bf16 with
    /// AVX512-BF16).
    pub fn runs_here(self) -> bool {
        self == Precision::F32 || available()
    }
}

/// `C = A · B` for f32 tensors A (m × k) and B (k × n) of any strides (a transposed view costs
/// no copy), with the operands rounded to bf16 and f32 sums ([`gemm`]); differentiable, the two
/// gradient products in bf16 as well (the recipe of PyTorch's autocast). CPU only, and only
/// where [`available`].
pub fn matmul(a: &candle_core::Tensor, b: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
    a.apply_op2(b, Bf16Matmul)
}

struct Bf16Matmul;

impl candle_core::CustomOp2 for Bf16Matmul {
    fn name(&self) -> &'static str {
        "bf16-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let (k2, n) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("bf16 matmul: A is {m}×{k} but B is {k2}×{n}");
        }
        if !available() {
            candle_core::bail!("bf16 matmul needs AVX512-BF16, which this CPU lacks; use f32 products");
        }
        let (candle_core::CpuStorage::F32(a), candle_core::CpuStorage::F32(b)) = (s1, s2) else {
            candle_core::bail!("bf16 matmul takes f32 tensors");
        };
        let a16 = pack_a(&a[l1.start_offset()..], m, k, l1.stride()[0], l1.stride()[1]);
        let bp = PackedB::pack(&b[l2.start_offset()..], k, n, l2.stride()[0], l2.stride()[1]);
        let mut c = vec![0f32; m * n];
        gemm(m, &a16, k.div_ceil(2), &bp, &mut c, n.max(1), false);
        Ok((candle_core::CpuStorage::F32(c), candle_core::Shape::from((m, n))))
    }

    fn bwd(
        &self,
        a: &candle_core::Tensor,
        b: &candle_core::Tensor,
        _res: &candle_core::Tensor,
        g: &candle_core::Tensor,
    ) -> candle_core::Result<(Option<candle_core::Tensor>, Option<candle_core::Tensor>)> {
        // dA = G · Bᵀ, dB = Aᵀ · G, both over views; not recorded (no second derivatives).
        let ga = g.apply_op2_no_bwd(&b.t()?, &Bf16Matmul)?;
        let gb = a.t()?.apply_op2_no_bwd(g, &Bf16Matmul)?;
        Ok((Some(ga), Some(gb)))
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

    /// The reference packing: every word from the scalar rounding.
    fn pair_at(src: &[f32], k: usize, i: usize, p: usize, rs: usize, cs: usize) -> u32 {
        let hi = if 2 * p + 1 < k { src[i * rs + (2 * p + 1) * cs] } else { 0.0 };
        pair(src[i * rs + 2 * p * cs], hi)
    }

    /// Every layout of A and B, the vectorized ones included, packs the words the scalar
    /// rounding gives, with odd k and partial panels and row blocks.
    #[test]
    fn strided_packing_gives_the_scalar_words() {
        let mut seed = 3;
        for &(rows, k) in &[(1usize, 1usize), (5, 7), (16, 32), (17, 33), (50, 96), (3, 130)] {
            let src: Vec<f32> = (0..rows * k + 5).map(|_| lcg(&mut seed) * 10.0).collect();
            let kp = k.div_ceil(2);
            // A rows-major (cs = 1), columns-major (rs = 1) and a general stride.
            for (rs, cs) in [(k, 1), (1, rows), (2 * k, 2)] {
                if (rows - 1) * rs + (k - 1) * cs >= src.len() {
                    continue;
                }
                let a = pack_a(&src, rows, k, rs, cs);
                for i in 0..rows {
                    for p in 0..kp {
                        assert_eq!(a[i * kp + p], pair_at(&src, k, i, p, rs, cs), "A {rows}x{k} strides ({rs},{cs}) row {i} pair {p}");
                    }
                }
                // The same source read as B (k × n = rows): B[kk][j] = src[j·rs + kk·cs].
                let b = PackedB::pack(&src, k, rows, cs, rs);
                for j in 0..rows {
                    for p in 0..kp {
                        let got = b.data[((j / NR) * kp + p) * NR + j % NR];
                        assert_eq!(got, pair_at(&src, k, j, p, rs, cs), "B {k}x{rows} strides ({cs},{rs}) column {j} pair {p}");
                    }
                }
            }
        }
    }

    fn tensor(rows: usize, cols: usize, seed: &mut u64) -> candle_core::Tensor {
        let v: Vec<f32> = (0..rows * cols).map(|_| lcg(seed)).collect();
        candle_core::Tensor::from_vec(v, (rows, cols), &candle_core::Device::Cpu).unwrap()
    }

    /// Σ_k round(a[i][k])·round(b[k][j]) in f64, and Σ |terms| for the tolerance.
    fn reference(a: &[Vec<f32>], b: &[Vec<f32>]) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
        let r = |x: f32| from_bf16(to_bf16(x)) as f64;
        let (m, k, n) = (a.len(), b.len(), b[0].len());
        let mut c = vec![vec![0.0; n]; m];
        let mut mag = vec![vec![0.0; n]; m];
        for i in 0..m {
            for j in 0..n {
                for kk in 0..k {
                    let t = r(a[i][kk]) * r(b[kk][j]);
                    c[i][j] += t;
                    mag[i][j] += t.abs();
                }
            }
        }
        (c, mag)
    }

    fn assert_close(got: &candle_core::Tensor, want: &(Vec<Vec<f64>>, Vec<Vec<f64>>), what: &str) {
        let got = got.to_vec2::<f32>().unwrap();
        for (i, row) in got.iter().enumerate() {
            for (j, &g) in row.iter().enumerate() {
                let (w, mag) = (want.0[i][j], want.1[i][j]);
                assert!((g as f64 - w).abs() <= 1e-5 * mag + 1e-6, "{what}[{i}][{j}]: {g} vs {w}");
            }
        }
    }

    /// The candle op: its value is the product of the rounded operands, also for a transposed
    /// operand, and its gradients are the two products of the rounded gradient and operands.
    #[test]
    fn the_matmul_op_and_its_gradients_are_products_of_the_rounded_operands() {
        let x = tensor(37, 50, &mut 5);
        let w = tensor(29, 50, &mut 9);
        if !available() {
            let err = matmul(&x, &w.t().unwrap()).unwrap_err().to_string();
            assert!(err.contains("AVX512-BF16"), "{err}");
            return;
        }
        let xv = candle_core::Var::from_tensor(&x).unwrap();
        let wv = candle_core::Var::from_tensor(&w).unwrap();
        // y = x · wᵀ (B is a transposed view), loss = Σ y ⊙ g.
        let y = matmul(xv.as_tensor(), &wv.as_tensor().t().unwrap()).unwrap();
        let g = tensor(37, 29, &mut 13);
        let rows = |t: &candle_core::Tensor| t.to_vec2::<f32>().unwrap();
        let (xs, ws, gs) = (rows(&x), rows(&w), rows(&g));
        let wt: Vec<Vec<f32>> = (0..50).map(|kk| (0..29).map(|j| ws[j][kk]).collect()).collect();
        assert_close(&y, &reference(&xs, &wt), "y");
        let grads = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        // dx = g · w, dw = gᵀ · x
        let gt: Vec<Vec<f32>> = (0..29).map(|j| (0..37).map(|i| gs[i][j]).collect()).collect();
        assert_close(grads.get(xv.as_tensor()).unwrap(), &reference(&gs, &ws), "dx");
        assert_close(grads.get(wv.as_tensor()).unwrap(), &reference(&gt, &xs), "dw");
    }
}
