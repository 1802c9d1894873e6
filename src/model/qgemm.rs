//! A batch-invariant int8 linear for CPU: `y = x Wᵀ` with W quantized to symmetric int8 blocks
//! of 32 along the input dimension and x quantized the same way, row by row, at call time.
//! Both use Q8_0's rule (see `q8_0_scale`), so a product is ggml's Q8_0 × Q8_0 dot up to the
//! order of the float sums.
//!
//! The math, for output element (r, o) over input blocks b = 0..nb:
//!
//! ```text
//! acc = 0
//! for b in 0..nb:                     // always this order
//!     isum = Σ_{i<32} qw[o, 32b+i] · qx[r, 32b+i]       // exact i32
//!     acc  = fma(f32(isum), dw[o, b] · dx[r, b], acc)    // one rounding for the product of
//!                                                        // scales, one for the fma
//! y[r, o] = acc
//! ```
//!
//! Why it is batch-invariant: activations are quantized per row (a row's int8 values and scales
//! never depend on the other rows), the integer dot is exact whatever instructions compute it,
//! and the float accumulation above is the same sequence of roundings for every (r, o) whatever
//! the number of rows m, however rows are grouped into register tiles, and however output tiles
//! are split across threads. So row r of an m-row call is bit-identical to an m = 1 call on that
//! row — the contract speculative verification relies on. The portable kernels compute exactly
//! the same sequence (f32::mul_add is a correctly rounded fma), so every kernel gives the same bits.
//!
//! Weight layout: output rows are grouped in tiles of 16 (the last one padded with zero rows).
//! For each tile and each pair of blocks one 1088-byte record of 17 lines of 64 bytes: per
//! block 8 lines holding the weights as u8 = q + 128, line k holding inputs 4k..4k+4 of the
//! block for outputs 0..16 (`[k][o][j]`, j < 4: one `vpdpbusd` lane per output), then one line
//! with the 16 scales of each block as f16 (exact: the scale rule rounds them to f16, and
//! f16 → f32 is exact; f32 scales would add 6% to every weight read). The records of a tile
//! follow each other, so a tile streams through memory once.
//!
//! Why weights carry the +128 offset (not the activations): `vpdpbusd` multiplies u8 by s8, so
//! one side must be unsigned. Σ (qw + 128)·qx = Σ qw·qx + 128·Σ qx, and the correction
//! −128·Σ qx is a per-(row, block) scalar computed with the activations, which costs no weight
//! bandwidth (storing per-block weight sums instead would add 12% to every read).

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape};

/// Inputs per quantization block.
pub const BLOCK: usize = 32;
/// Outputs per weight tile: one 512-bit register of i32/f32 lanes.
pub const TILE: usize = 16;
/// Rows of x processed against one weight tile while it sits in registers.
pub const MAX_ROWS: usize = 16;
/// 64-byte lines per (tile, block pair) record: 8 of weights per block, 1 of scales.
const PAIR_LINES: usize = 17;

/// Line of block b's first weight line, within its tile's records.
#[inline(always)]
fn weights_line(b: usize) -> usize {
    b / 2 * PAIR_LINES + b % 2 * 8
}

/// Line holding block b's scales (in its half), within its tile's records.
#[inline(always)]
fn scales_line(b: usize) -> usize {
    b / 2 * PAIR_LINES + 16
}
/// Below this many (row, tile, block) steps a call runs on the calling thread: splitting a
/// small product costs more in wake-ups than it saves (measured in examples/bench_qgemm.rs).
const MIN_PARALLEL_WORK: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum QGemmError {
    #[error("weight of {name} has {got} values, expected {out}x{inp} = {}", out * inp)]
    WeightLen { name: String, got: usize, out: usize, inp: usize },
    #[error("weight of {name} has a non-finite value at row {row}, column {col}; the checkpoint is corrupt")]
    NonFinite { name: String, row: usize, col: usize },
    #[error("{name}: cannot convert a {dtype:?} tensor of shape {shape:?}; expected a 2-d (out, in) weight")]
    BadTensor { name: String, dtype: GgmlDType, shape: Vec<usize> },
    #[error("input has {got} values, not m = {m} rows of in_features = {inp}")]
    InputLen { got: usize, m: usize, inp: usize },
    #[error("output has {got} values, expected m = {m} rows of out_features = {out}")]
    OutputLen { got: usize, m: usize, out: usize },
    #[error("kernel {kernel:?} needs CPU features this machine lacks; use Kernel::Auto")]
    KernelUnavailable { kernel: Kernel },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Which implementation runs. All give bit-identical results; tests force each one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// The fastest one this CPU supports.
    Auto,
    /// AVX-512 VNNI `vpdpbusd` (needs avx512f, avx512bw, avx512vnni).
    Vnni,
    /// The portable code compiled with AVX2 + FMA enabled.
    Avx2,
    /// The portable code as plain Rust.
    Portable,
}

impl Kernel {
    /// Whether this CPU can run the kernel.
    pub fn available(self) -> bool {
        match self {
            Kernel::Auto | Kernel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni => {
                is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(not(target_arch = "x86_64"))]
            Kernel::Vnni | Kernel::Avx2 => false,
        }
    }

    fn resolve(self) -> Result<Kernel, QGemmError> {
        static BEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        match self {
            Kernel::Auto => Ok(*BEST.get_or_init(|| {
                [Kernel::Vnni, Kernel::Avx2].into_iter().find(|k| k.available()).unwrap_or(Kernel::Portable)
            })),
            k if k.available() => Ok(k),
            k => Err(QGemmError::KernelUnavailable { kernel: k }),
        }
    }
}

/// How a call runs: which kernel, and how many threads may share the output tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exec {
    pub kernel: Kernel,
    /// 0: split across rayon's pool, with small products kept on the calling thread;
    /// n: split into at most n parts (1: the calling thread only).
    pub threads: usize,
}

impl Default for Exec {
    fn default() -> Self {
        Exec { kernel: Kernel::Auto, threads: 0 }
    }
}

#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

/// An (out, in) weight in the tiled int8 layout described in the module docs.
#[derive(Clone)]
pub struct QMatrix {
    out: usize,
    inp: usize,
    tiles: usize,
    blocks: usize,
    /// tiles · ⌈blocks/2⌉ records of `PAIR_LINES` lines.
    data: Vec<Line>,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QMatrix({}x{}, int8 blocks of {BLOCK})", self.out, self.inp)
    }
}

/// Q8_0's scale rule, for weights and activations alike: q = round-half-away(x · (127/amax))
/// with the f32 scale amax/127, and the scale kept as its nearest f16 (returned first, widened
/// to f32 exactly; the second value is the multiplier for q). Keeping ggml's rule makes the
/// kernel compute what ggml/candle's Q8_0 vec_dot computes up to float summation order, so the
/// Q8_0 references of tests/target_parity.rs apply unchanged; the f16 rounding moves a block's
/// scale by at most 2⁻¹², far below the int8 step of 1/254 of amax.
#[inline(always)]
fn q8_0_scale(amax: f32) -> (f32, f32) {
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    (half::f16::from_f32(d).to_f32(), id)
}

/// Quantizes one block with Q8_0's rule (`q8_0_scale`), clamped to ±127; returns the scale.
/// `src` may be shorter than `q` (a padded last block): the rest is zero.
#[inline(always)]
fn quantize_block(src: &[f32], q: &mut [i8; BLOCK]) -> f32 {
    let mut amax = 0f32;
    for v in src {
        amax = amax.max(v.abs());
    }
    let (d, id) = q8_0_scale(amax);
    q.fill(0);
    for (qi, v) in q.iter_mut().zip(src) {
        *qi = (v * id).round().clamp(-127.0, 127.0) as i8;
    }
    d
}

impl QMatrix {
    pub fn out_features(&self) -> usize {
        self.out
    }

    pub fn in_features(&self) -> usize {
        self.inp
    }

    /// Bytes the kernel streams per call (weights + scales).
    pub fn bytes(&self) -> usize {
        self.data.len() * 64
    }

    fn empty(out: usize, inp: usize) -> Self {
        let tiles = out.div_ceil(TILE);
        let blocks = inp.div_ceil(BLOCK);
        // Padding rows and padding inputs hold q = 0 (u8 128) and d = 0.
        let mut data = vec![Line([128u8; 64]); tiles * blocks.div_ceil(2) * PAIR_LINES];
        for rec in data.chunks_mut(PAIR_LINES) {
            rec[16] = Line([0u8; 64]);
        }
        QMatrix { out, inp, tiles, blocks, data }
    }

    /// The records of output tile t.
    fn tile_lines(&self, t: usize) -> &[Line] {
        let n = self.blocks.div_ceil(2) * PAIR_LINES;
        &self.data[t * n..(t + 1) * n]
    }

    /// Stores q (int8) and d (an f16 value, see `q8_0_scale`) for output row `row`, block `b`.
    fn set_block(&mut self, row: usize, b: usize, q: &[i8; BLOCK], d: f32) {
        let (t, o) = (row / TILE, row % TILE);
        let base = t * self.blocks.div_ceil(2) * PAIR_LINES;
        let w = base + weights_line(b);
        for (i, &qi) in q.iter().enumerate() {
            self.data[w + i / 4].0[o * 4 + i % 4] = (qi as i16 + 128) as u8;
        }
        let at = b % 2 * 32 + o * 2;
        debug_assert_eq!(half::f16::from_f32(d).to_f32().to_bits(), d.to_bits(), "scale {d} is not an f16 value");
        let bits = half::f16::from_f32(d).to_bits().to_le_bytes();
        self.data[base + scales_line(b)].0[at..at + 2].copy_from_slice(&bits);
    }

    /// Quantizes an f32 (out, in) row-major weight. `name` is for error messages.
    pub fn quantize(name: &str, w: &[f32], out: usize, inp: usize) -> Result<Self, QGemmError> {
        if w.len() != out * inp {
            return Err(QGemmError::WeightLen { name: name.into(), got: w.len(), out, inp });
        }
        if let Some(i) = w.iter().position(|v| !v.is_finite()) {
            return Err(QGemmError::NonFinite { name: name.into(), row: i / inp, col: i % inp });
        }
        let mut m = Self::empty(out, inp);
        // The activation quantizer applies the same rule as `quantize_block`, vectorized.
        let (mut q, mut d, mut corr) = (vec![0i8; m.blocks * BLOCK], vec![0f32; m.blocks], vec![0i32; m.blocks]);
        for row in 0..out {
            quantize_row(&w[row * inp..(row + 1) * inp], &mut q, &mut d, &mut corr);
            for (b, (qb, &db)) in q.chunks_exact(BLOCK).zip(&d).enumerate() {
                let qb: &[i8; BLOCK] = qb.try_into().expect("chunks_exact gives BLOCK");
                m.set_block(row, b, qb, db);
            }
        }
        Ok(m)
    }

    /// Converts a candle QTensor of HF shape (out, in). Q8_0 blocks are taken as they are (the
    /// f16 scale widened to f32 exactly), so the weights equal candle's; other types are
    /// dequantized and quantized again with `quantize`.
    pub fn from_qtensor(name: &str, qt: &QTensor) -> Result<Self, QGemmError> {
        let dims = qt.shape().dims().to_vec();
        let bad = || QGemmError::BadTensor { name: name.into(), dtype: qt.dtype(), shape: dims.clone() };
        let &[out, inp] = dims.as_slice() else { return Err(bad()) };
        if qt.dtype() != GgmlDType::Q8_0 || inp % BLOCK != 0 {
            let w = qt.dequantize(&candle_core::Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
            return Self::quantize(name, &w, out, inp);
        }
        let raw = qt.data()?;
        const BYTES: usize = 2 + BLOCK; // f16 d, then 32 × i8
        if raw.len() != out * inp / BLOCK * BYTES {
            return Err(bad());
        }
        let mut m = Self::empty(out, inp);
        let mut q = [0i8; BLOCK];
        for (i, blk) in raw.chunks_exact(BYTES).enumerate() {
            let d = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32();
            if !d.is_finite() {
                return Err(QGemmError::NonFinite { name: name.into(), row: i / m.blocks, col: i % m.blocks * BLOCK });
            }
            for (qi, &byte) in q.iter_mut().zip(&blk[2..]) {
                *qi = byte as i8;
            }
            m.set_block(i / m.blocks, i % m.blocks, &q, d);
        }
        Ok(m)
    }

    /// The weight the kernel multiplies by, as f32 (out, in) row-major: q · d.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.out * self.inp];
        for row in 0..self.out {
            let (t, o) = (row / TILE, row % TILE);
            let lines = self.tile_lines(t);
            for col in 0..self.inp {
                let (b, i) = (col / BLOCK, col % BLOCK);
                let q = lines[weights_line(b) + i / 4].0[o * 4 + i % 4] as i32 - 128;
                w[row * self.inp + col] = q as f32 * scale(lines, b, o);
            }
        }
        w
    }

    /// y (m, out) = x (m, in) · Wᵀ with the fastest kernel and the default threading.
    pub fn matmul(&self, x: &[f32], m: usize, y: &mut [f32]) -> Result<(), QGemmError> {
        self.matmul_with(x, m, y, Exec::default())
    }

    /// As `matmul`, with the kernel and thread count chosen by the caller (tests compare them).
    pub fn matmul_with(&self, x: &[f32], m: usize, y: &mut [f32], exec: Exec) -> Result<(), QGemmError> {
        if x.len() != m * self.inp {
            return Err(QGemmError::InputLen { got: x.len(), m, inp: self.inp });
        }
        if y.len() != m * self.out {
            return Err(QGemmError::OutputLen { got: y.len(), m, out: self.out });
        }
        let kernel = exec.kernel.resolve()?;
        if m == 0 || self.out == 0 {
            return Ok(());
        }
        let acts = QActs::quantize(x, m, self.inp, self.blocks);
        let pool = rayon::current_num_threads().max(1);
        // Four parts per thread: on a shared machine a descheduled thread's share is stolen
        // by the others instead of holding up the call.
        let parts = match exec.threads {
            0 if m * self.tiles * self.blocks < MIN_PARALLEL_WORK || pool == 1 => 1,
            0 => 4 * pool,
            n => n,
        }
        .min(self.tiles);
        let out = OutPtr(y.as_mut_ptr());
        let run = |part: usize| {
            let t0 = self.tiles * part / parts;
            let t1 = self.tiles * (part + 1) / parts;
            // SAFETY: parts own disjoint tile ranges, so disjoint output columns of y, which
            // has m · out elements (checked above); x was checked to have m · in.
            unsafe { self.tiles_range(kernel, &acts, t0, t1, out) };
        };
        if parts <= 1 {
            run(0);
        } else {
            use rayon::prelude::*;
            (0..parts).into_par_iter().for_each(run);
        }
        Ok(())
    }

    /// Output tiles t0..t1 for all rows, rows in groups of up to MAX_ROWS per weight pass.
    ///
    /// # Safety
    /// `y` points to m · out f32 that no one else writes in these tiles' columns.
    unsafe fn tiles_range(&self, kernel: Kernel, acts: &QActs, t0: usize, t1: usize, y: OutPtr) {
        for t in t0..t1 {
            let rec = self.tile_lines(t);
            let valid = TILE.min(self.out - t * TILE);
            let mut r0 = 0;
            while r0 < acts.rows {
                let rows = MAX_ROWS.min(acts.rows - r0);
                let dst = y.0.add(r0 * self.out + t * TILE);
                let job = TileJob { rec, blocks: self.blocks, acts, r0, rows, dst, ldy: self.out, valid };
                match kernel {
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Vnni => vnni::tile(&job),
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Avx2 => portable::tile_avx2(&job),
                    _ => portable::tile(&job),
                }
                r0 += rows;
            }
        }
    }
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: threads write disjoint column ranges (see matmul_with).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// The scale of block b, output o, from a tile's records.
#[inline(always)]
fn scale(lines: &[Line], b: usize, o: usize) -> f32 {
    let line = &lines[scales_line(b)].0;
    let at = b % 2 * 32 + o * 2;
    half::f16::from_le_bytes([line[at], line[at + 1]]).to_f32()
}

/// x quantized row by row: (rows, blocks, 32) int8, a scale per (row, block), and the
/// correction −128·Σq per (row, block) that undoes the weights' +128 offset.
struct QActs {
    rows: usize,
    blocks: usize,
    q: Vec<i8>,
    d: Vec<f32>,
    corr: Vec<i32>,
}

impl QActs {
    fn quantize(x: &[f32], m: usize, inp: usize, blocks: usize) -> Self {
        let mut a = QActs { rows: m, blocks, q: vec![0; m * blocks * BLOCK], d: vec![0.0; m * blocks], corr: vec![0; m * blocks] };
        let rows = a.q.chunks_mut(blocks * BLOCK).zip(a.d.chunks_mut(blocks)).zip(a.corr.chunks_mut(blocks));
        for (r, ((q, d), corr)) in rows.enumerate() {
            quantize_row(&x[r * inp..(r + 1) * inp], q, d, corr);
        }
        a
    }
}

fn quantize_row(x: &[f32], q: &mut [i8], d: &mut [f32], corr: &mut [i32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
        // SAFETY: features detected above.
        return unsafe { vnni::quantize_row(x, q, d, corr) };
    }
    quantize_row_generic(x, q, d, corr)
}

#[inline(always)]
fn quantize_row_generic(x: &[f32], q: &mut [i8], d: &mut [f32], corr: &mut [i32]) {
    for (b, ((qb, db), cb)) in q.chunks_exact_mut(BLOCK).zip(d.iter_mut()).zip(corr.iter_mut()).enumerate() {
        let src = &x[(b * BLOCK).min(x.len())..x.len().min((b + 1) * BLOCK)];
        let qb: &mut [i8; BLOCK] = qb.try_into().expect("chunks_exact gives BLOCK");
        if src.iter().all(|v| v.is_finite()) {
            *db = quantize_block(src, qb);
            *cb = -128 * qb.iter().map(|&v| v as i32).sum::<i32>();
        } else {
            // A NaN or infinity must reach the output, not be rounded away into int8.
            qb.fill(0);
            *db = f32::NAN;
            *cb = 0;
        }
    }
}

/// One weight tile against up to MAX_ROWS rows of x.
struct TileJob<'a> {
    /// The tile's records (`tile_lines`).
    rec: &'a [Line],
    blocks: usize,
    acts: &'a QActs,
    r0: usize,
    rows: usize,
    /// y[r0, 16·t]; row stride `ldy`.
    dst: *mut f32,
    ldy: usize,
    /// Outputs of this tile that exist (16 except in a padded last tile).
    valid: usize,
}

mod portable {
    use super::*;

    /// The reference kernel: the integer dot as a plain sum, then the same fma sequence as the
    /// SIMD kernel.
    #[inline(always)]
    pub(super) unsafe fn tile_generic(job: &TileJob) {
        let a = job.acts;
        for i in 0..job.rows {
            let r = job.r0 + i;
            let mut acc = [0f32; TILE];
            for b in 0..job.blocks {
                let rec = &job.rec[weights_line(b)..][..8];
                let xq = &a.q[(r * a.blocks + b) * BLOCK..][..BLOCK];
                let dx = a.d[r * a.blocks + b];
                let mut isum = [0i32; TILE];
                for k in 0..8 {
                    let w = &rec[k].0;
                    for o in 0..TILE {
                        for j in 0..4 {
                            isum[o] += (w[o * 4 + j] as i32 - 128) * xq[4 * k + j] as i32;
                        }
                    }
                }
                for o in 0..TILE {
                    acc[o] = (isum[o] as f32).mul_add(scale(job.rec, b, o) * dx, acc[o]);
                }
            }
            // SAFETY (caller): dst row i has `valid` writable elements.
            let dst = std::slice::from_raw_parts_mut(job.dst.add(i * job.ldy), job.valid);
            dst.copy_from_slice(&acc[..job.valid]);
        }
    }

    pub(super) unsafe fn tile(job: &TileJob) {
        tile_generic(job)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_avx2(job: &TileJob) {
        tile_generic(job)
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::*;
    use std::arch::x86_64::*;

    /// R rows against one weight tile: the 8 weight registers and the tile's scales are loaded
    /// once per block and serve all R rows; one f32 accumulator register per row.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn rows<const R: usize>(job: &TileJob) {
        let a = job.acts;
        let rec = job.rec.as_ptr() as *const __m512i;
        let xq = a.q.as_ptr().add(job.r0 * a.blocks * BLOCK);
        let xd = a.d.as_ptr().add(job.r0 * a.blocks);
        let xc = a.corr.as_ptr().add(job.r0 * a.blocks);
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..job.blocks {
            let p = rec.add(weights_line(b));
            let w = [
                _mm512_load_si512(p),
                _mm512_load_si512(p.add(1)),
                _mm512_load_si512(p.add(2)),
                _mm512_load_si512(p.add(3)),
                _mm512_load_si512(p.add(4)),
                _mm512_load_si512(p.add(5)),
                _mm512_load_si512(p.add(6)),
                _mm512_load_si512(p.add(7)),
            ];
            // 16 f16 scales, the low or high half of the pair's scale line, widened exactly.
            let sp = (rec.add(scales_line(b)) as *const __m256i).add(b % 2);
            let dw = _mm512_cvtph_ps(_mm256_load_si256(sp));
            // One row of x against the tile; written out per row (not a loop over `acc`) so the
            // R accumulators stay in registers.
            macro_rules! row {
                ($i:literal) => {
                    if $i < R {
                        let o = $i * a.blocks + b;
                        let x = xq.add(o * BLOCK) as *const i32;
                        // Two exact integer chains, so consecutive vpdpbusd do not wait on each other.
                        let mut s0 = _mm512_set1_epi32(*xc.add(o));
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
            row!(8);
            row!(9);
            row!(10);
            row!(11);
            row!(12);
            row!(13);
            row!(14);
            row!(15);
        }
        let mask: __mmask16 = if job.valid >= TILE { 0xffff } else { (1u16 << job.valid) - 1 };
        for (i, acc) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(job.dst.add(i * job.ldy), mask, *acc);
        }
    }

    /// `quantize_row_generic` in AVX-512, with the same bits: the same IEEE products, and
    /// round-half-away-from-zero (`f32::round`) as trunc plus a step where |frac| ≥ 0.5 (the
    /// fraction x − trunc(x) is exact for |x| < 2²³).
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
            // Masked loads read only x[..n]; lanes past the end are zero (a padded last block).
            let m0 = lanes(n, base);
            let m1 = lanes(n, base + 16);
            let v0 = _mm512_maskz_loadu_ps(m0, x.as_ptr().wrapping_add(base));
            let v1 = _mm512_maskz_loadu_ps(m1, x.as_ptr().wrapping_add(base + 16));
            let a0 = _mm512_abs_ps(v0);
            let a1 = _mm512_abs_ps(v1);
            let finite = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(a0, big) & _mm512_cmp_ps_mask::<_CMP_LE_OQ>(a1, big);
            if finite != 0xffff {
                // NaN or infinity in the block: scale NaN, q = 0, as the generic code does.
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

    /// # Safety
    /// The CPU has avx512f, avx512bw and avx512vnni (checked by `Kernel::resolve`).
    pub(super) unsafe fn tile(job: &TileJob) {
        match job.rows {
            1 => rows::<1>(job),
            2 => rows::<2>(job),
            3 => rows::<3>(job),
            4 => rows::<4>(job),
            5 => rows::<5>(job),
            6 => rows::<6>(job),
            7 => rows::<7>(job),
            8 => rows::<8>(job),
            9 => rows::<9>(job),
            10 => rows::<10>(job),
            11 => rows::<11>(job),
            12 => rows::<12>(job),
            13 => rows::<13>(job),
            14 => rows::<14>(job),
            15 => rows::<15>(job),
            _ => rows::<16>(job),
        }
    }
}

/// `x (.., in) -> (.., out)` as a candle op, so `Linear` can call the kernel without copies.
#[derive(Debug, Clone)]
pub struct QLinearOp(pub Arc<QMatrix>);

impl CustomOp1 for QLinearOp {
    fn name(&self) -> &'static str {
        "qgemm-int8"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = &self.0;
        let dims = layout.shape().dims();
        if dims.last() != Some(&w.inp) {
            return Err(candle_core::Error::Msg(format!("qgemm: input shape {dims:?} does not end in in_features {}", w.inp)));
        }
        let Some((start, end)) = layout.contiguous_offsets() else {
            return Err(candle_core::Error::Msg("qgemm: input must be contiguous (call .contiguous())".into()));
        };
        let x = &storage.as_slice::<f32>()?[start..end];
        let m = x.len() / w.inp.max(1);
        let mut y = vec![0f32; m * w.out];
        w.matmul(x, m, &mut y).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = w.out;
        }
        Ok((CpuStorage::F32(y), Shape::from(out_dims)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        // Mixed magnitudes so blocks get different scales, plus some exact zeros.
        (0..n)
            .map(|i| if i % 97 == 0 { 0.0 } else { rng.gen_range(-1.0f32..1.0) * if i % 7 == 0 { 4.0 } else { 0.5 } })
            .collect()
    }

    fn kernels() -> Vec<Kernel> {
        [Kernel::Vnni, Kernel::Avx2, Kernel::Portable].into_iter().filter(|k| k.available()).collect()
    }

    fn run(w: &QMatrix, x: &[f32], m: usize, exec: Exec) -> Vec<f32> {
        let mut y = vec![0f32; m * w.out_features()];
        w.matmul_with(x, m, &mut y, exec).unwrap();
        y
    }

    /// The same quantized math in f64: dequantized weights times dequantized activations.
    fn reference(w: &QMatrix, x: &[f32], m: usize) -> Vec<f64> {
        let (out, inp) = (w.out_features(), w.in_features());
        let wd = w.dequantize();
        let mut y = vec![0f64; m * out];
        let mut q = [0i8; BLOCK];
        for r in 0..m {
            let mut xd = vec![0f64; inp];
            for b in 0..inp.div_ceil(BLOCK) {
                let src = &x[r * inp + b * BLOCK..r * inp + inp.min((b + 1) * BLOCK)];
                let d = quantize_block(src, &mut q);
                for i in 0..src.len() {
                    xd[b * BLOCK + i] = q[i] as f64 * d as f64;
                }
            }
            for o in 0..out {
                y[r * out + o] = (0..inp).map(|i| wd[o * inp + i] as f64 * xd[i]).sum();
            }
        }
        y
    }

    #[test]
    fn every_kernel_matches_an_f64_reference_of_the_same_quantized_math() {
        for &(out, inp) in &[(48usize, 64usize), (37, 96), (20, 50)] {
            let w = QMatrix::quantize("w", &rand_vec(out * inp, 1), out, inp).unwrap();
            let m = 5;
            let x = rand_vec(m * inp, 2);
            let want = reference(&w, &x, m);
            let scale = want.iter().fold(0f64, |a, v| a.max(v.abs()));
            for k in kernels() {
                let got = run(&w, &x, m, Exec { kernel: k, threads: 1 });
                for (g, e) in got.iter().zip(&want) {
                    let err = (*g as f64 - e).abs();
                    assert!(err <= 1e-5 * scale.max(1e-30), "{k:?} {out}x{inp}: {g} vs {e} (|err| {err}, scale {scale})");
                }
            }
        }
    }

    #[test]
    fn quantization_error_is_within_half_a_step_per_weight() {
        let (out, inp) = (19, 70);
        let src = rand_vec(out * inp, 3);
        let w = QMatrix::quantize("w", &src, out, inp).unwrap();
        let back = w.dequantize();
        for row in 0..out {
            for b in 0..inp.div_ceil(BLOCK) {
                let cols = b * BLOCK..inp.min((b + 1) * BLOCK);
                let amax = cols.clone().map(|c| src[row * inp + c].abs()).fold(0f32, f32::max);
                for c in cols {
                    let err = (src[row * inp + c] - back[row * inp + c]).abs();
                    // Half an int8 step, plus 127 steps times the f16 rounding of the scale.
                    let bound = amax / 127.0 * (0.5 + 127.0 / 4096.0);
                    assert!(err <= bound, "row {row} col {c}: {err} > {bound}");
                }
            }
        }
    }

    #[test]
    fn rows_of_a_batch_are_bit_identical_to_single_row_calls() {
        let shapes = [(192usize, 576usize), (576, 576), (576, 1536), (1536, 576), (40, 64), (33, 100), (4096 + 8, 64)];
        for (si, &(out, inp)) in shapes.iter().enumerate() {
            let w = QMatrix::quantize("w", &rand_vec(out * inp, 10 + si as u64), out, inp).unwrap();
            let x = rand_vec(20 * inp, 20 + si as u64);
            let singles: Vec<Vec<f32>> = (0..20).map(|r| run(&w, &x[r * inp..(r + 1) * inp], 1, Exec::default())).collect();
            for m in 1..=20 {
                for threads in [1, 2, 3] {
                    let y = run(&w, &x[..m * inp], m, Exec { kernel: Kernel::Auto, threads });
                    for r in 0..m {
                        let row = &y[r * out..(r + 1) * out];
                        assert!(
                            row.iter().zip(&singles[r]).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{out}x{inp}: row {r} of an m={m} call on {threads} threads differs from the m=1 call"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn all_kernels_give_the_same_bits() {
        for &(out, inp, m) in &[(1536usize, 576usize, 17usize), (200, 1536, 3), (49, 64, 16), (21, 45, 2)] {
            let w = QMatrix::quantize("w", &rand_vec(out * inp, 7), out, inp).unwrap();
            let x = rand_vec(m * inp, 8);
            let base = run(&w, &x, m, Exec { kernel: Kernel::Portable, threads: 1 });
            for k in kernels() {
                let y = run(&w, &x, m, Exec { kernel: k, threads: 2 });
                let same = y.iter().zip(&base).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{k:?} differs from the portable kernel on {out}x{inp}, m={m}");
            }
        }
    }

    #[test]
    fn q8_0_qtensors_convert_without_changing_a_weight() {
        let (out, inp) = (48, 96);
        let src = candle_core::Tensor::from_vec(rand_vec(out * inp, 5), (out, inp), &candle_core::Device::Cpu).unwrap();
        let qt = QTensor::quantize(&src, GgmlDType::Q8_0).unwrap();
        let want = qt.dequantize(&candle_core::Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let got = QMatrix::from_qtensor("w", &qt).unwrap().dequantize();
        assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "Q8_0 blocks changed in conversion");
        // Through the f32 route (dequantize, quantize again) the weights are the same too.
        let again = QMatrix::quantize("w", &want, out, inp).unwrap().dequantize();
        assert!(again.iter().zip(&want).all(|(a, b)| a == b), "re-quantizing Q8_0 values is not idempotent");
        // And quantizing the f32 source follows candle's Q8_0 rule exactly.
        let ours = QMatrix::quantize("w", &src.flatten_all().unwrap().to_vec1::<f32>().unwrap(), out, inp).unwrap().dequantize();
        assert!(ours.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "quantize differs from candle's Q8_0");
    }

    #[test]
    fn non_finite_inputs_reach_the_output_and_bad_weights_are_refused() {
        let (out, inp) = (16, 64);
        let mut src = rand_vec(out * inp, 4);
        let w = QMatrix::quantize("w", &src, out, inp).unwrap();
        let mut x = rand_vec(inp, 6);
        x[40] = f32::NAN;
        let y = run(&w, &x, 1, Exec::default());
        assert!(y.iter().all(|v| v.is_nan()), "a NaN input must not vanish in int8 rounding");
        src[3 * inp + 5] = f32::INFINITY;
        let err = QMatrix::quantize("blk.0.w", &src, out, inp).unwrap_err();
        assert!(matches!(err, QGemmError::NonFinite { row: 3, col: 5, .. }), "{err}");
        let err = w.matmul(&x[..10], 1, &mut [0.0; 16]).unwrap_err();
        assert!(matches!(err, QGemmError::InputLen { .. }), "{err}");
    }

    #[test]
    fn the_simd_activation_quantizer_equals_the_generic_one_including_ties_and_tails() {
        let mut rows: Vec<Vec<f32>> = vec![
            // amax 127 makes the scale exactly 1, so these are exact ties: half away from zero.
            (0..40).map(|i| if i == 0 { 127.0 } else { (i as f32 - 20.0) + 0.5 }).collect(),
            vec![0.0; 64],
            vec![1e-30; 33],
        ];
        for (n, seed) in [(576usize, 1u64), (45, 2), (31, 3), (1536, 4), (7, 5)] {
            rows.push(rand_vec(n, seed));
        }
        for x in rows {
            let blocks = x.len().div_ceil(BLOCK);
            let (mut q1, mut d1, mut c1) = (vec![0i8; blocks * BLOCK], vec![0f32; blocks], vec![0i32; blocks]);
            let (mut q2, mut d2, mut c2) = (vec![1i8; blocks * BLOCK], vec![1f32; blocks], vec![1i32; blocks]);
            quantize_row_generic(&x, &mut q1, &mut d1, &mut c1);
            quantize_row(&x, &mut q2, &mut d2, &mut c2);
            assert_eq!(q1, q2, "int8 values differ for a row of {}", x.len());
            assert_eq!(d1, d2);
            assert_eq!(c1, c2);
        }
        let (mut q, mut d, mut c) = ([0i8; BLOCK], [0f32; 1], [0i32; 1]);
        quantize_row_generic(&[2.5, -3.5, 0.5, 127.0], &mut q, &mut d, &mut c);
        assert_eq!(&q[..4], &[3, -4, 1, 127], "ties round half away from zero, as Q8_0 does");
    }

    #[test]
    fn the_candle_op_keeps_leading_dimensions() {
        let (out, inp) = (24, 64);
        let w = Arc::new(QMatrix::quantize("w", &rand_vec(out * inp, 9), out, inp).unwrap());
        let xs = rand_vec(2 * 3 * inp, 11);
        let x = candle_core::Tensor::from_vec(xs.clone(), (2, 3, inp), &candle_core::Device::Cpu).unwrap();
        let y = x.apply_op1_no_bwd(&QLinearOp(w.clone())).unwrap();
        assert_eq!(y.dims(), &[2, 3, out]);
        let want = run(&w, &xs, 6, Exec::default());
        assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
    }
}
