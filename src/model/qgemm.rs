//! A batch-invariant quantized linear for CPU: `y = x Wᵀ` with W in blocks of 32 along the
//! input dimension and x quantized to int8 blocks of 32, row by row, at call time.
//!
//! Two weight formats share the activations, the tiling and the invariance argument:
//! - `Format::Int8`: q ∈ [-127, 127], w = d·q (Q8_0's rule, see `q8_0_scale`), so a product is
//!   ggml's Q8_0 × Q8_0 dot up to the order of the float sums.
//! - `Format::Q4_1`: q ∈ [0, 15], w = d·q + m, GGUF Q4_1 blocks kept as stored (41% fewer
//!   bytes per weight read than Int8, and no re-quantization of a Q4_1 checkpoint).
//!
//! The math, for output element (r, o) over input blocks b = 0..nb (x ≈ dx·qx per block):
//!
//! ```text
//! acc = 0
//! for b in 0..nb:                                          // always this order
//!     isum = Σ_{i<32} qw[o, 32b+i] · qx[r, 32b+i]           // exact i32
//!     acc  = fma(f32(isum), dw[o, b] · dx[r, b], acc)
//!     Q4_1 only: acc = fma(mw[o, b], sx[r, b], acc)         // sx = dx · Σ qx
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
//! For each tile and each pair of blocks one record of 64-byte lines; a lane of a line holds 4
//! consecutive inputs of one output (`[k][o][j]`, j < 4), which is what one `vpdpbusd` lane
//! multiplies:
//! - Int8: per block 8 lines of u8 = q + 128 (line k: inputs 4k..4k+4), then one line with
//!   each block's 16 scales as f16 (17 lines per pair).
//! - Q4_1: per block 4 lines of nibbles (line k: inputs 4k..4k+4 low, 16+4k.. high), then one
//!   line of scales d and one of offsets m, f16 (10 lines per pair).
//!
//! f16 scales are exact: Int8 scales are rounded to f16 by the scale rule, Q4_1 stores f16.
//! The records of a tile follow each other, so a tile streams through memory once.
//!
//! Why Int8 weights carry the +128 offset (not the activations): `vpdpbusd` multiplies u8 by
//! s8, so one side must be unsigned. Σ (qw + 128)·qx = Σ qw·qx + 128·Σ qx, and the correction
//! −128·Σ qx is a per-(row, block) scalar computed with the activations, which costs no weight
//! bandwidth. Q4_1 nibbles are unsigned already.

use std::sync::Arc;

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape};

/// Runs a SIMD kernel's `rows::<R, Q4>(job)` with R = `job.rows` (1..=MAX_ROWS) and Q4 the
/// job's format: R and Q4 are const generics so that each row count keeps its accumulators in
/// registers. Shared by the kernels' `tile` functions (defined before their modules, so that
/// they see it).
#[cfg(target_arch = "x86_64")]
macro_rules! tile_by_rows {
    ($rows:ident, $job:expr) => {{
        const _: () = assert!(super::MAX_ROWS == 8, "tile_by_rows! is written out for 8 rows");
        let job = $job;
        macro_rules! by_rows {
            ($q4:literal) => {
                match job.rows {
                    1 => $rows::<1, $q4>(job),
                    2 => $rows::<2, $q4>(job),
                    3 => $rows::<3, $q4>(job),
                    4 => $rows::<4, $q4>(job),
                    5 => $rows::<5, $q4>(job),
                    6 => $rows::<6, $q4>(job),
                    7 => $rows::<7, $q4>(job),
                    _ => $rows::<8, $q4>(job),
                }
            };
        }
        match job.format {
            Format::Int8 => by_rows!(false),
            Format::Q4_1 => by_rows!(true),
        }
    }};
}

#[cfg(target_arch = "x86_64")]
mod avx2;
mod portable;
#[cfg(target_arch = "x86_64")]
mod vnni;

/// How far ahead of the block it multiplies the VNNI kernel asks for weight lines
/// (`prefetcht0`), in 64-byte lines: 64 lines is about four blocks of an Int8 tile. At m = 8 a
/// block takes long enough to compute that the hardware prefetcher alone let the kernel stall on
/// each tile's first lines; asking 4 KB ahead cut a q8 verify(8) by about a quarter and a native
/// one by a third at the same decode speed (`examples/forward_ab`, docs/perf.md). Distances from
/// 16 to 160 lines measured alike. Prefetching changes no arithmetic, so no bits.
pub const PREFETCH_LINES: usize = 64;

static PREFETCH: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(PREFETCH_LINES);

/// Sets the kernel's prefetch distance in lines (0: none) for every later call in the process.
/// For measuring the prefetch (`examples/forward_ab`), not for tuning a deployment.
#[doc(hidden)]
pub fn set_prefetch_lines(lines: usize) {
    PREFETCH.store(lines, std::sync::atomic::Ordering::Relaxed);
}

fn prefetch_lines() -> usize {
    PREFETCH.load(std::sync::atomic::Ordering::Relaxed)
}

/// Asks for the lines block b of a tile owns (its weights; after a pair's second block, the
/// pair's scale lines too) `pf` lines ahead of `rec`, the tile's records: both SIMD kernels do
/// this at each block. Tiles are contiguous, so near a tile's end this reaches into the next
/// tile; past the matrix's end the address is never read (a prefetch does not fault), hence
/// wrapping_add. No arithmetic, so no bits, change.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_block(rec: *const u8, f: Format, b: usize, pf: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    let end = if b % 2 == 1 { f.weights_line(b + 1) } else { f.weights_line(b) + f.block_lines() };
    for l in f.weights_line(b)..end {
        // SAFETY: a prefetch reads nothing architecturally and never faults (SSE, every x86_64).
        unsafe { _mm_prefetch::<_MM_HINT_T0>(rec.wrapping_add((l + pf) * 64) as *const i8) };
    }
}

/// Parts each pool thread's share of a parallel call is cut into: on a shared machine a
/// descheduled thread's parts are stolen by the others instead of holding up the call.
pub const PARTS_PER_THREAD: usize = 4;

static PARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(PARTS_PER_THREAD);

/// Sets the parts per pool thread (at least 1) for every later call in the process. For
/// measuring the split (`examples/forward_ab`), not for tuning a deployment.
#[doc(hidden)]
pub fn set_parts_per_thread(parts: usize) {
    PARTS.store(parts.max(1), std::sync::atomic::Ordering::Relaxed);
}

/// The parts per pool thread now in force (`PARTS_PER_THREAD` unless set for a measurement).
pub(crate) fn parts_per_thread() -> usize {
    PARTS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Inputs per quantization block.
pub const BLOCK: usize = 32;
/// Outputs per weight tile: one 512-bit register of i32/f32 lanes.
pub const TILE: usize = 16;
/// Rows of x processed against one weight tile while it sits in registers. Eight accumulators,
/// the tile's eight weight registers and its scales leave AVX-512's 32 registers room for each
/// row's temporaries; at sixteen rows the compiler spilled accumulators to the stack every block
/// (`perf annotate`), and a second pass over a tile already in L1 costs less than the spills:
/// m = 16 products ran 15–25% faster on one thread (examples/bench_qgemm.rs).
pub const MAX_ROWS: usize = 8;
/// Below this many (row, tile, block) steps (about 5 µs of work) a call runs on the calling
/// thread. Every one-row product of SmolLM2's layers is above it (the smallest, o_proj, has 648),
/// so a decode step reads its weights with both cores' memory bandwidth: with the forward on a
/// pool worker whose sibling spins for the next split, the split costs less than it saves
/// (2048, which kept all but gate/up on one thread: q8 decode 104–107 tok/s; 512: 109–132,
/// `bench decode`, alternating runs).
const MIN_PARALLEL_WORK: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum QGemmError {
    #[error("weight of {name} has {got} values, expected {out}x{inp} = {}", out * inp)]
    WeightLen { name: String, got: usize, out: usize, inp: usize },
    #[error("weight of {name} has a non-finite value at row {row}, column {col}; the checkpoint is corrupt")]
    NonFinite { name: String, row: usize, col: usize },
    #[error("{name}: cannot convert a {dtype:?} tensor of shape {shape:?}; expected a 2-d (out, in) weight{what}")]
    BadTensor { name: String, dtype: GgmlDType, shape: Vec<usize>, what: String },
    #[error("input has {got} values, not m = {m} rows of in_features = {inp}")]
    InputLen { got: usize, m: usize, inp: usize },
    #[error("output has {got} values, expected m = {m} rows of out_features = {out}")]
    OutputLen { got: usize, m: usize, out: usize },
    #[error("a grouped call got {mats} matrices but {outputs} outputs")]
    GroupLen { mats: usize, outputs: usize },
    #[error("row {row} is outside the matrix's {out} output rows")]
    RowOutOfRange { row: usize, out: usize },
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
    /// AVX2 `vpmaddubsw` / `vpmaddwd` (needs avx2, fma, f16c): machines without AVX-512.
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
            Kernel::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c"),
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

/// How weights are stored (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Symmetric int8, w = d·q.
    Int8,
    /// GGUF Q4_1, w = d·q + m with q ∈ [0, 15].
    Q4_1,
}

impl Format {
    /// 64-byte lines per (tile, block pair) record.
    const fn pair_lines(self) -> usize {
        match self {
            Format::Int8 => 17,
            Format::Q4_1 => 10,
        }
    }

    /// Lines of weights per block.
    const fn block_lines(self) -> usize {
        match self {
            Format::Int8 => 8,
            Format::Q4_1 => 4,
        }
    }

    /// Line of block b's first weight line, within its tile's records.
    #[inline(always)]
    fn weights_line(self, b: usize) -> usize {
        b / 2 * self.pair_lines() + b % 2 * self.block_lines()
    }

    /// Line holding block b's 16 f16 scales (in half b % 2), within its tile's records.
    #[inline(always)]
    fn scales_line(self, b: usize) -> usize {
        b / 2 * self.pair_lines() + 2 * self.block_lines()
    }

    /// Q4_1: line holding block b's 16 f16 offsets m (in half b % 2).
    #[inline(always)]
    fn mins_line(self, b: usize) -> usize {
        self.scales_line(b) + 1
    }
}

#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

/// The f16 at `half` (0 or 1) of a line holding two blocks' 16 values, output o.
#[inline(always)]
fn f16_at(line: &Line, half: usize, o: usize) -> f32 {
    let at = half * 32 + o * 2;
    half::f16::from_le_bytes([line.0[at], line.0[at + 1]]).to_f32()
}

/// An (out, in) weight in the tiled layout described in the module docs.
#[derive(Clone)]
pub struct QMatrix {
    format: Format,
    out: usize,
    inp: usize,
    tiles: usize,
    blocks: usize,
    /// tiles · ⌈blocks/2⌉ records of `format.pair_lines()` lines.
    data: Vec<Line>,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QMatrix({}x{}, {:?} blocks of {BLOCK})", self.out, self.inp, self.format)
    }
}

/// Q8_0's scale rule, for Int8 weights and all activations: q = round-half-away(x · (127/amax))
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

fn f16_exact(v: f32) -> [u8; 2] {
    debug_assert_eq!(half::f16::from_f32(v).to_f32().to_bits(), v.to_bits(), "{v} is not an f16 value");
    half::f16::from_f32(v).to_bits().to_le_bytes()
}

impl QMatrix {
    pub fn out_features(&self) -> usize {
        self.out
    }

    pub fn in_features(&self) -> usize {
        self.inp
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// Bytes the kernel streams per call (weights + scales).
    pub fn bytes(&self) -> usize {
        self.data.len() * 64
    }

    fn empty(format: Format, out: usize, inp: usize) -> Self {
        let tiles = out.div_ceil(TILE);
        let blocks = inp.div_ceil(BLOCK);
        // Padding rows and padding inputs have weight 0: Int8 q = 0 (u8 128) with d = 0,
        // Q4_1 q = 0 with d = m = 0.
        let fill = match format {
            Format::Int8 => 128u8,
            Format::Q4_1 => 0,
        };
        let pl = format.pair_lines();
        let mut data = vec![Line([fill; 64]); tiles * blocks.div_ceil(2) * pl];
        for rec in data.chunks_mut(pl) {
            for line in &mut rec[2 * format.block_lines()..] {
                *line = Line([0u8; 64]);
            }
        }
        QMatrix { format, out, inp, tiles, blocks, data }
    }

    /// The records of output tile t.
    fn tile_lines(&self, t: usize) -> &[Line] {
        let n = self.blocks.div_ceil(2) * self.format.pair_lines();
        &self.data[t * n..(t + 1) * n]
    }

    /// (first line of row's tile, lane o) for output row `row`.
    fn place(&self, row: usize) -> (usize, usize) {
        (row / TILE * self.blocks.div_ceil(2) * self.format.pair_lines(), row % TILE)
    }

    /// Int8: stores q and d (an f16 value, see `q8_0_scale`) for output row `row`, block `b`.
    fn set_block_int8(&mut self, row: usize, b: usize, q: &[i8; BLOCK], d: f32) {
        let (base, o) = self.place(row);
        let (f, half) = (self.format, b % 2);
        for (i, &qi) in q.iter().enumerate() {
            self.data[base + f.weights_line(b) + i / 4].0[o * 4 + i % 4] = (qi as i16 + 128) as u8;
        }
        let at = half * 32 + o * 2;
        self.data[base + f.scales_line(b)].0[at..at + 2].copy_from_slice(&f16_exact(d));
    }

    /// Q4_1: stores q (each < 16), d and m (f16 values) for output row `row`, block `b`.
    fn set_block_q4_1(&mut self, row: usize, b: usize, q: &[u8; BLOCK], d: f32, m: f32) {
        let (base, o) = self.place(row);
        let (f, half) = (self.format, b % 2);
        for i in 0..16 {
            self.data[base + f.weights_line(b) + i / 4].0[o * 4 + i % 4] = q[i] | (q[i + 16] << 4);
        }
        let at = half * 32 + o * 2;
        self.data[base + f.scales_line(b)].0[at..at + 2].copy_from_slice(&f16_exact(d));
        self.data[base + f.mins_line(b)].0[at..at + 2].copy_from_slice(&f16_exact(m));
    }

    /// Quantizes an f32 (out, in) row-major weight to Int8. `name` is for error messages.
    pub fn quantize(name: &str, w: &[f32], out: usize, inp: usize) -> Result<Self, QGemmError> {
        if w.len() != out * inp {
            return Err(QGemmError::WeightLen { name: name.into(), got: w.len(), out, inp });
        }
        if let Some(i) = w.iter().position(|v| !v.is_finite()) {
            return Err(QGemmError::NonFinite { name: name.into(), row: i / inp, col: i % inp });
        }
        let mut m = Self::empty(Format::Int8, out, inp);
        // The activation quantizer applies the same rule as `quantize_block`, vectorized.
        let (mut q, mut d, mut corr) = (vec![0i8; m.blocks * BLOCK], vec![0f32; m.blocks], vec![0i32; m.blocks]);
        for row in 0..out {
            quantize_row(&w[row * inp..(row + 1) * inp], &mut q, &mut d, &mut corr);
            for (b, (qb, &db)) in q.chunks_exact(BLOCK).zip(&d).enumerate() {
                let qb: &[i8; BLOCK] = qb.try_into().expect("chunks_exact gives BLOCK");
                m.set_block_int8(row, b, qb, db);
            }
        }
        Ok(m)
    }

    /// Converts a candle QTensor of HF shape (out, in) to Int8 ([`QMatrix::from_ggml`]).
    pub fn from_qtensor(name: &str, qt: &QTensor) -> Result<Self, QGemmError> {
        let (out, inp) = dims2(name, qt)?;
        Self::from_ggml(name, &qt.data()?, qt.dtype(), out, inp)
    }

    /// Int8 from a ggml tensor's bytes as a GGUF file stores them, HF shape (out, in). Q8_0
    /// blocks are taken as they are, so the weights equal candle's; other types are dequantized
    /// and quantized again with `quantize`'s rule (for Q4_1 that is what candle's Q8_0
    /// conversion gives too).
    pub fn from_ggml(name: &str, raw: &[u8], dtype: GgmlDType, out: usize, inp: usize) -> Result<Self, QGemmError> {
        if dtype != GgmlDType::Q8_0 || inp % BLOCK != 0 {
            return Self::requantize(name, raw, dtype, out, inp);
        }
        const BYTES: usize = 2 + BLOCK; // f16 d, then 32 × i8
        let mut m = Self::empty(Format::Int8, out, inp);
        check_len(name, dtype, out, inp, raw.len(), out * inp / BLOCK * BYTES)?;
        let mut q = [0i8; BLOCK];
        for (i, blk) in raw.chunks_exact(BYTES).enumerate() {
            let d = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32();
            if !d.is_finite() {
                return Err(QGemmError::NonFinite { name: name.into(), row: i / m.blocks, col: i % m.blocks * BLOCK });
            }
            for (qi, &byte) in q.iter_mut().zip(&blk[2..]) {
                *qi = byte as i8;
            }
            m.set_block_int8(i / m.blocks, i % m.blocks, &q, d);
        }
        Ok(m)
    }

    /// Int8 from any other stored type, a slab of rows at a time: dequantizing the whole tensor
    /// first would hold it twice in f32 (the tied head of SmolLM2 is 113 MB as f32), which
    /// was most of the q8 mode's peak memory. A ggml block dequantizes to the same values
    /// alone as within its tensor, so the result equals `quantize` of the whole dequantized
    /// weight (tested).
    fn requantize(name: &str, raw: &[u8], dtype: GgmlDType, out: usize, inp: usize) -> Result<Self, QGemmError> {
        let (bs, ts) = (dtype.block_size(), dtype.type_size());
        check_len(name, dtype, out, inp, raw.len(), (out * inp).div_ceil(bs) * ts)?;
        let cpu = candle_core::Device::Cpu;
        if inp % bs != 0 {
            // Rows are not whole blocks (not seen in GGUF files): the whole tensor at once.
            let w = qtensor_from_ggml(dtype, raw, vec![out, inp], &cpu)?.dequantize(&cpu)?.flatten_all()?.to_vec1::<f32>()?;
            return Self::quantize(name, &w, out, inp);
        }
        let row_bytes = inp / bs * ts;
        let mut m = Self::empty(Format::Int8, out, inp);
        let (mut q, mut d, mut corr) = (vec![0i8; m.blocks * BLOCK], vec![0f32; m.blocks], vec![0i32; m.blocks]);
        // About 1 MB of f32 per slab.
        let slab = ((1 << 18) / inp.max(1)).max(1);
        for r0 in (0..out).step_by(slab) {
            let r1 = out.min(r0 + slab);
            let part = qtensor_from_ggml(dtype, &raw[r0 * row_bytes..r1 * row_bytes], vec![r1 - r0, inp], &cpu)?;
            let w = part.dequantize(&cpu)?.flatten_all()?.to_vec1::<f32>()?;
            if let Some(i) = w.iter().position(|v| !v.is_finite()) {
                return Err(QGemmError::NonFinite { name: name.into(), row: r0 + i / inp, col: i % inp });
            }
            for (i, row) in w.chunks_exact(inp).enumerate() {
                quantize_row(row, &mut q, &mut d, &mut corr);
                for (b, (qb, &db)) in q.chunks_exact(BLOCK).zip(&d).enumerate() {
                    let qb: &[i8; BLOCK] = qb.try_into().expect("chunks_exact gives BLOCK");
                    m.set_block_int8(r0 + i, b, qb, db);
                }
            }
        }
        Ok(m)
    }

    /// Converts a GGUF Q4_1 QTensor of HF shape (out, in), keeping its blocks as they are.
    pub fn from_q4_1(name: &str, qt: &QTensor) -> Result<Self, QGemmError> {
        let (out, inp) = dims2(name, qt)?;
        if qt.dtype() != GgmlDType::Q4_1 {
            return Err(QGemmError::BadTensor {
                name: name.into(),
                dtype: qt.dtype(),
                shape: vec![out, inp],
                what: " of type Q4_1 with in a multiple of 32".into(),
            });
        }
        Self::from_q4_1_bytes(name, &qt.data()?, out, inp)
    }

    /// [`QMatrix::from_q4_1`] from the tensor's bytes as a GGUF file stores them.
    pub fn from_q4_1_bytes(name: &str, raw: &[u8], out: usize, inp: usize) -> Result<Self, QGemmError> {
        if inp % BLOCK != 0 {
            return Err(QGemmError::BadTensor {
                name: name.into(),
                dtype: GgmlDType::Q4_1,
                shape: vec![out, inp],
                what: " of type Q4_1 with in a multiple of 32".into(),
            });
        }
        const BYTES: usize = 4 + BLOCK / 2; // f16 d, f16 m, then 32 nibbles
        let mut m = Self::empty(Format::Q4_1, out, inp);
        check_len(name, GgmlDType::Q4_1, out, inp, raw.len(), out * inp / BLOCK * BYTES)?;
        let mut q = [0u8; BLOCK];
        for (i, blk) in raw.chunks_exact(BYTES).enumerate() {
            let d = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32();
            let mn = half::f16::from_le_bytes([blk[2], blk[3]]).to_f32();
            if !d.is_finite() || !mn.is_finite() {
                return Err(QGemmError::NonFinite { name: name.into(), row: i / m.blocks, col: i % m.blocks * BLOCK });
            }
            // ggml: byte j holds input j in its low nibble and input j + 16 in its high one.
            for (j, &byte) in blk[4..].iter().enumerate() {
                q[j] = byte & 0x0f;
                q[j + 16] = byte >> 4;
            }
            m.set_block_q4_1(i / m.blocks, i % m.blocks, &q, d, mn);
        }
        Ok(m)
    }

    /// The matrix of `rows` of this one, in that order: row i of the result is row `rows[i]`
    /// here with the same weights, scales and offsets, so each of its outputs is bit-identical to
    /// that row's output of this matrix (the kernel computes every output on its own, in a fixed
    /// order of blocks). A draft head over a subset of the vocabulary is built this way.
    pub fn select_rows(&self, rows: &[u32]) -> Result<Self, QGemmError> {
        let f = self.format;
        let mut m = Self::empty(f, rows.len(), self.inp);
        for (dst, &src) in rows.iter().enumerate() {
            let src = src as usize;
            if src >= self.out {
                return Err(QGemmError::RowOutOfRange { row: src, out: self.out });
            }
            let ((sb, so), (db, d_o)) = (self.place(src), m.place(dst));
            for b in 0..self.blocks {
                for k in 0..f.block_lines() {
                    let l = f.weights_line(b) + k;
                    let lane: [u8; 4] = self.data[sb + l].0[so * 4..so * 4 + 4].try_into().expect("4 bytes");
                    m.data[db + l].0[d_o * 4..d_o * 4 + 4].copy_from_slice(&lane);
                }
                let h = b % 2;
                let (scales, mins) = (f.scales_line(b), f.mins_line(b));
                let lines: &[usize] = if f == Format::Q4_1 { &[scales, mins] } else { &[scales] };
                for &l in lines {
                    let v: [u8; 2] = self.data[sb + l].0[h * 32 + so * 2..h * 32 + so * 2 + 2].try_into().expect("2 bytes");
                    m.data[db + l].0[h * 32 + d_o * 2..h * 32 + d_o * 2 + 2].copy_from_slice(&v);
                }
            }
        }
        Ok(m)
    }

    /// The weight the kernel multiplies by, as f32 (out, in) row-major: d·q (Int8) or d·q + m
    /// (Q4_1, rounded once, as ggml dequantizes).
    pub fn dequantize(&self) -> Vec<f32> {
        let f = self.format;
        let mut w = vec![0f32; self.out * self.inp];
        for row in 0..self.out {
            let (t, o) = (row / TILE, row % TILE);
            let lines = self.tile_lines(t);
            for col in 0..self.inp {
                let (b, i) = (col / BLOCK, col % BLOCK);
                let d = f16_at(&lines[f.scales_line(b)], b % 2, o);
                w[row * self.inp + col] = match f {
                    Format::Int8 => {
                        let q = lines[f.weights_line(b) + i / 4].0[o * 4 + i % 4] as i32 - 128;
                        q as f32 * d
                    }
                    Format::Q4_1 => {
                        let byte = lines[f.weights_line(b) + i % 16 / 4].0[o * 4 + i % 4];
                        let q = if i < 16 { byte & 0x0f } else { byte >> 4 };
                        q as f32 * d + f16_at(&lines[f.mins_line(b)], b % 2, o)
                    }
                };
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
        matmul_group(&[self], x, m, &mut [y], exec)
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
                let job = TileJob { format: self.format, rec, blocks: self.blocks, acts, r0, rows, dst, ldy: self.out, valid };
                match kernel {
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Vnni => vnni::tile(&job),
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Avx2 => avx2::tile(&job),
                    _ => portable::tile(&job),
                }
                r0 += rows;
            }
        }
    }
}

/// Several matrices with the same input width against the same x, as one call: y_i (m, out_i)
/// = x · W_iᵀ. x is quantized once and the output tiles of all of them are shared out in one
/// parallel region, so a layer's q, k and v projections (or gate and up) cost one dispatch of
/// the thread pool instead of three. Every output is computed exactly as [`QMatrix::matmul`]
/// computes it (same tiles, same order of sums), so the bits are those of separate calls
/// (tested).
pub fn matmul_group(mats: &[&QMatrix], x: &[f32], m: usize, ys: &mut [&mut [f32]], exec: Exec) -> Result<(), QGemmError> {
    let Some(first) = mats.first() else { return Ok(()) };
    if ys.len() != mats.len() {
        return Err(QGemmError::GroupLen { mats: mats.len(), outputs: ys.len() });
    }
    for (w, y) in mats.iter().zip(ys.iter()) {
        if w.inp != first.inp || x.len() != m * w.inp {
            return Err(QGemmError::InputLen { got: x.len(), m, inp: w.inp });
        }
        if y.len() != m * w.out {
            return Err(QGemmError::OutputLen { got: y.len(), m, out: w.out });
        }
    }
    let kernel = exec.kernel.resolve()?;
    let tiles = group_tile_count(mats);
    if m == 0 || tiles == 0 {
        return Ok(());
    }
    let acts = QActs::quantize(x, m, first.inp, first.blocks);
    let pool = rayon::current_num_threads().max(1);
    let parts = match exec.threads {
        0 if m * tiles * first.blocks < MIN_PARALLEL_WORK || pool == 1 => 1,
        0 => parts_per_thread() * pool,
        n => n,
    }
    .min(tiles);
    let outs: Vec<OutPtr> = ys.iter_mut().map(|y| OutPtr(y.as_mut_ptr())).collect();
    let run = |part: usize| {
        // This part's share of the tiles of all matrices, in order, as global tile indices.
        // SAFETY: parts own disjoint tile ranges of each matrix, so disjoint output columns of
        // its y, which has m · out elements (checked above); x has m · in.
        unsafe { group_range(mats, kernel, &acts, tiles * part / parts, tiles * (part + 1) / parts, &outs) };
    };
    if parts <= 1 {
        run(0);
    } else {
        use rayon::prelude::*;
        (0..parts).into_par_iter().for_each(run);
    }
    Ok(())
}

/// Activations shared by the members of a team (`util::team`): allocated before the team
/// starts, quantized by the members row range by row range (each row is its own, as in
/// [`QActs::quantize`], so the values are the same bits), then read by every member's tiles in
/// the next phase.
pub(crate) struct SharedActs {
    acts: std::cell::UnsafeCell<QActs>,
    inp: usize,
    q: *mut i8,
    d: *mut f32,
    corr: *mut i32,
    sx: *mut f32,
}

// SAFETY: members write disjoint rows through the raw pointers in one phase and only read in
// the next; a team barrier separates the two (the callers' contract, see `quantize_rows`).
unsafe impl Sync for SharedActs {}
unsafe impl Send for SharedActs {}

impl SharedActs {
    /// Room for `rows` rows of input width `inp` (the width of the matrices it will feed).
    pub(crate) fn new(rows: usize, inp: usize) -> Self {
        let mut a = QActs::zeroed(rows, inp.div_ceil(BLOCK));
        let (q, d, corr, sx) = (a.q.as_mut_ptr(), a.d.as_mut_ptr(), a.corr.as_mut_ptr(), a.sx.as_mut_ptr());
        SharedActs { acts: std::cell::UnsafeCell::new(a), inp, q, d, corr, sx }
    }

    /// The input width.
    pub(crate) fn width(&self) -> usize {
        self.inp
    }

    /// Quantizes rows r0..r1; `x` holds exactly those rows (r1 − r0 rows of `inp` values).
    ///
    /// # Safety
    /// r1 ≤ the rows this was made for; no other member writes these rows, and no member reads
    /// any row (through [`group_tiles`]) until a barrier after every member's call.
    pub(crate) unsafe fn quantize_rows(&self, x: &[f32], r0: usize, r1: usize) {
        let (inp, blocks) = (self.inp, self.inp.div_ceil(BLOCK));
        debug_assert_eq!(x.len(), (r1 - r0) * inp);
        for r in r0..r1 {
            let o = r * blocks;
            quantize_act_row(
                &x[(r - r0) * inp..(r - r0 + 1) * inp],
                std::slice::from_raw_parts_mut(self.q.add(o * BLOCK), blocks * BLOCK),
                std::slice::from_raw_parts_mut(self.d.add(o), blocks),
                std::slice::from_raw_parts_mut(self.corr.add(o), blocks),
                std::slice::from_raw_parts_mut(self.sx.add(o), blocks),
            );
        }
    }
}

/// Output tiles of a group of matrices, counted as [`matmul_group`] shares them out.
pub(crate) fn group_tile_count(mats: &[&QMatrix]) -> usize {
    mats.iter().map(|w| w.tiles).sum()
}

/// Global tiles g0..g1 of a group (the tiles of all its matrices, in order) for every row of
/// `acts`: what one part of [`matmul_group`] computes.
///
/// # Safety
/// Every matrix has `acts`' input width and `outs[i]` points to rows · out_i f32 that no one
/// else writes in these tiles' columns.
unsafe fn group_range(mats: &[&QMatrix], kernel: Kernel, acts: &QActs, g0: usize, g1: usize, outs: &[OutPtr]) {
    let mut base = 0;
    for (w, &out) in mats.iter().zip(outs) {
        let n = w.tiles;
        let (t0, t1) = (g0.max(base) - base, g1.min(base + n).saturating_sub(base));
        if t0 < t1 {
            w.tiles_range(kernel, acts, t0, t1, out);
        }
        base += n;
    }
}

/// [`group_range`] for a team: global tiles g0..g1 of a group with the fastest kernel, the
/// same tiles, sums and bits as `matmul_group`.
///
/// # Safety
/// As for `group_range`, and every row of `acts` was quantized before a barrier that precedes
/// this call.
pub(crate) unsafe fn group_tiles(mats: &[&QMatrix], acts: &SharedActs, g0: usize, g1: usize, outs: &[OutPtr]) {
    let kernel = Kernel::Auto.resolve().unwrap_or(Kernel::Portable);
    group_range(mats, kernel, &*acts.acts.get(), g0, g1, outs);
}

/// `mats`' tiles for every row of `acts`, claimed by the members of a team in chunks (`parts`
/// per member, as many as the dispatched path cuts a thread's share into), into `outs`.
///
/// # Safety
/// `acts` was filled before a barrier (or by this member alone, for its own use); `outs` are
/// the matrices' outputs (rows · out each), written by nothing else in this phase.
pub(crate) unsafe fn team_matmul(t: &crate::util::team::Team, parts: usize, mats: &[&QMatrix], acts: &SharedActs, outs: &[crate::util::team::SharedBuf]) {
    let n = group_tile_count(mats);
    let outs: Vec<OutPtr> = outs.iter().map(|b| OutPtr(b.0)).collect();
    t.claim(n, n.div_ceil(parts * t.size()), |r| group_tiles(mats, acts, r.start, r.end, &outs));
}

fn dims2(name: &str, qt: &QTensor) -> Result<(usize, usize), QGemmError> {
    match qt.shape().dims() {
        &[out, inp] => Ok((out, inp)),
        dims => Err(QGemmError::BadTensor { name: name.into(), dtype: qt.dtype(), shape: dims.to_vec(), what: String::new() }),
    }
}

fn check_len(name: &str, dtype: GgmlDType, out: usize, inp: usize, got: usize, want: usize) -> Result<(), QGemmError> {
    if got != want {
        return Err(QGemmError::BadTensor {
            name: name.into(),
            dtype,
            shape: vec![out, inp],
            what: format!(" (its data has {got} bytes, expected {want})"),
        });
    }
    Ok(())
}

/// An output matrix that parts of a call write in disjoint columns.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: threads write disjoint column ranges (see matmul_with).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// x quantized row by row: (rows, blocks, 32) int8 and per (row, block) the scale dx, the
/// correction −128·Σqx that undoes the Int8 weights' +128 offset, and sx = dx·Σqx, which
/// carries the Q4_1 offsets m.
struct QActs {
    rows: usize,
    blocks: usize,
    q: Vec<i8>,
    d: Vec<f32>,
    corr: Vec<i32>,
    sx: Vec<f32>,
}

impl QActs {
    fn zeroed(rows: usize, blocks: usize) -> Self {
        let n = rows * blocks;
        QActs { rows, blocks, q: vec![0; n * BLOCK], d: vec![0.0; n], corr: vec![0; n], sx: vec![0.0; n] }
    }

    fn quantize(x: &[f32], m: usize, inp: usize, blocks: usize) -> Self {
        let mut a = Self::zeroed(m, blocks);
        let rows = a.q.chunks_mut(blocks * BLOCK).zip(a.d.chunks_mut(blocks)).zip(a.corr.chunks_mut(blocks)).zip(a.sx.chunks_mut(blocks));
        for (r, (((q, d), corr), sx)) in rows.enumerate() {
            quantize_act_row(&x[r * inp..(r + 1) * inp], q, d, corr, sx);
        }
        a
    }
}

/// One row of activations: its int8 blocks, scales and corrections ([`quantize_row`]), and
/// sx = dx·Σqx per block (Σqx is −corr/128, exactly).
fn quantize_act_row(x: &[f32], q: &mut [i8], d: &mut [f32], corr: &mut [i32], sx: &mut [f32]) {
    quantize_row(x, q, d, corr);
    for ((sx, &d), &c) in sx.iter_mut().zip(d.iter()).zip(corr.iter()) {
        *sx = d * (-c / 128) as f32;
    }
}

/// Quantizes one row with `quantize_block`'s rule; a block holding a NaN or an infinity gets
/// scale NaN (so it reaches the output instead of being rounded away into int8) and q = 0.
fn quantize_row(x: &[f32], q: &mut [i8], d: &mut [f32], corr: &mut [i32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
        // SAFETY: features detected above.
        return unsafe { vnni::quantize_row(x, q, d, corr) };
    }
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: features detected above.
        return unsafe { avx2::quantize_row(x, q, d, corr) };
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
            qb.fill(0);
            *db = f32::NAN;
            *cb = 0;
        }
    }
}

/// One weight tile against up to MAX_ROWS rows of x.
#[derive(Clone, Copy)]
struct TileJob<'a> {
    format: Format,
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

/// `x (.., in) -> (.., out)` as a candle op, so `Linear` can call the kernel without copies.
#[derive(Debug, Clone)]
pub struct QLinearOp(pub Arc<QMatrix>);

impl CustomOp1 for QLinearOp {
    fn name(&self) -> &'static str {
        "qgemm"
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

    fn qtensor(out: usize, inp: usize, seed: u64, dtype: GgmlDType) -> QTensor {
        let t = candle_core::Tensor::from_vec(rand_vec(out * inp, seed), (out, inp), &candle_core::Device::Cpu).unwrap();
        QTensor::quantize(&t, dtype).unwrap()
    }

    /// A weight of either format. Q4_1 needs `inp` to be a multiple of 32.
    fn matrix(format: Format, out: usize, inp: usize, seed: u64) -> QMatrix {
        match format {
            Format::Int8 => QMatrix::quantize("w", &rand_vec(out * inp, seed), out, inp).unwrap(),
            Format::Q4_1 => QMatrix::from_q4_1("w", &qtensor(out, inp, seed, GgmlDType::Q4_1)).unwrap(),
        }
    }

    fn run(w: &QMatrix, x: &[f32], m: usize, exec: Exec) -> Vec<f32> {
        let mut y = vec![0f32; m * w.out_features()];
        w.matmul_with(x, m, &mut y, exec).unwrap();
        y
    }

    fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
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
        let cases = [(Format::Int8, 48usize, 64usize), (Format::Int8, 37, 96), (Format::Int8, 20, 50), (Format::Q4_1, 37, 96), (Format::Q4_1, 64, 160)];
        for (seed, &(format, out, inp)) in cases.iter().enumerate() {
            let w = matrix(format, out, inp, seed as u64);
            let m = 5;
            let x = rand_vec(m * inp, 100 + seed as u64);
            let want = reference(&w, &x, m);
            let scale = want.iter().fold(0f64, |a, v| a.max(v.abs()));
            for k in kernels() {
                let got = run(&w, &x, m, Exec { kernel: k, threads: 1 });
                for (g, e) in got.iter().zip(&want) {
                    let err = (*g as f64 - e).abs();
                    assert!(err <= 1e-5 * scale, "{k:?} {format:?} {out}x{inp}: {g} vs {e} (|err| {err}, scale {scale})");
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
        let shapes = [
            (Format::Int8, 192usize, 576usize),
            (Format::Int8, 576, 576),
            (Format::Int8, 576, 1536),
            (Format::Int8, 1536, 576),
            (Format::Int8, 40, 64),
            (Format::Int8, 33, 100),
            (Format::Int8, 4096 + 8, 64),
            (Format::Q4_1, 192, 576),
            (Format::Q4_1, 576, 1536),
            (Format::Q4_1, 4096 + 8, 96),
        ];
        for (si, &(format, out, inp)) in shapes.iter().enumerate() {
            let w = matrix(format, out, inp, 10 + si as u64);
            let x = rand_vec(20 * inp, 20 + si as u64);
            let singles: Vec<Vec<f32>> = (0..20).map(|r| run(&w, &x[r * inp..(r + 1) * inp], 1, Exec::default())).collect();
            for m in 1..=20 {
                for threads in [1, 2, 3] {
                    let y = run(&w, &x[..m * inp], m, Exec { kernel: Kernel::Auto, threads });
                    for r in 0..m {
                        assert!(
                            same_bits(&y[r * out..(r + 1) * out], &singles[r]),
                            "{format:?} {out}x{inp}: row {r} of an m={m} call on {threads} threads differs from the m=1 call"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn requantizing_in_slabs_equals_quantizing_the_whole_dequantized_weight() {
        // 1100 rows of 576 span several slabs (455 rows each) and end in a partial one; one
        // tensor of rows narrower than a slab's width; each type goes through `requantize`.
        for (out, inp) in [(1100usize, 576usize), (7, 64)] {
            for dtype in [GgmlDType::Q4_1, GgmlDType::Q4_0, GgmlDType::Q5_1, GgmlDType::F16] {
                let qt = qtensor(out, inp, 5, dtype);
                let whole = qt.dequantize(&candle_core::Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let want = QMatrix::quantize("w", &whole, out, inp).unwrap();
                let got = QMatrix::from_qtensor("w", &qt).unwrap();
                assert_eq!((got.format, got.out, got.inp, got.data.len()), (Format::Int8, out, inp, want.data.len()));
                assert!(got.data.iter().zip(&want.data).all(|(a, b)| a.0 == b.0), "{dtype:?} {out}x{inp}");
            }
        }
    }

    #[test]
    fn a_grouped_call_gives_the_bits_of_separate_calls() {
        // q/k/v-like and gate/up-like groups, mixed formats, an output count that is not a
        // multiple of the tile, every row count up to 20 and several thread counts.
        let groups: [&[(Format, usize)]; 3] = [&[(Format::Int8, 576), (Format::Int8, 192), (Format::Int8, 192)], &[(Format::Q4_1, 96), (Format::Int8, 40)], &[(Format::Int8, 33)]];
        let inp = 96;
        for (gi, group) in groups.iter().enumerate() {
            let mats: Vec<QMatrix> = group.iter().enumerate().map(|(i, &(f, out))| matrix(f, out, inp, 40 + 10 * gi as u64 + i as u64)).collect();
            let refs: Vec<&QMatrix> = mats.iter().collect();
            for m in [1usize, 2, 7, 16, 20] {
                let x = rand_vec(m * inp, 60 + m as u64);
                for threads in [0, 1, 2, 5] {
                    let exec = Exec { kernel: Kernel::Auto, threads };
                    let mut outs: Vec<Vec<f32>> = mats.iter().map(|w| vec![f32::NAN; m * w.out_features()]).collect();
                    let mut views: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
                    matmul_group(&refs, &x, m, &mut views, exec).unwrap();
                    for (w, got) in mats.iter().zip(&outs) {
                        let want = run(w, &x, m, Exec { kernel: Kernel::Auto, threads: 1 });
                        assert!(same_bits(got, &want), "group {gi}, m = {m}, threads {threads}: a grouped output differs from its own call");
                    }
                }
            }
        }
        let (a, b) = (matrix(Format::Int8, 16, 64, 1), matrix(Format::Int8, 16, 96, 2));
        let mut y = [vec![0f32; 16], vec![0f32; 16]];
        let mut views: Vec<&mut [f32]> = y.iter_mut().map(|o| o.as_mut_slice()).collect();
        assert!(matmul_group(&[&a, &b], &[0.0; 64], 1, &mut views, Exec::default()).is_err(), "different input widths are refused");
        assert!(matmul_group(&[&a], &[0.0; 64], 1, &mut views, Exec::default()).is_err(), "one output per matrix");
    }

    #[test]
    fn selected_rows_give_the_bits_of_those_rows_of_the_whole_product() {
        for (seed, format) in [Format::Int8, Format::Q4_1].into_iter().enumerate() {
            let (out, inp, m) = (53, 96, 3);
            let w = matrix(format, out, inp, 40 + seed as u64);
            let x = rand_vec(m * inp, 41 + seed as u64);
            let whole = run(&w, &x, m, Exec::default());
            // out of order, repeated, across tiles, and the last (padded) tile's rows
            let rows = [52u32, 0, 17, 16, 31, 17, 48, 1];
            let sub = w.select_rows(&rows).unwrap();
            assert_eq!((sub.out_features(), sub.in_features()), (rows.len(), inp));
            let got = run(&sub, &x, m, Exec::default());
            for r in 0..m {
                for (i, &row) in rows.iter().enumerate() {
                    let (g, e) = (got[r * rows.len() + i], whole[r * out + row as usize]);
                    assert_eq!(g.to_bits(), e.to_bits(), "{format:?} row {row}: {g} vs {e}");
                }
            }
            assert!(matches!(w.select_rows(&[out as u32]), Err(QGemmError::RowOutOfRange { .. })));
        }
    }

    #[test]
    fn all_kernels_give_the_same_bits() {
        let cases = [
            (Format::Int8, 1536usize, 576usize, 17usize),
            (Format::Int8, 200, 1536, 3),
            (Format::Int8, 49, 64, 16),
            (Format::Int8, 21, 45, 2),
            (Format::Q4_1, 1536, 576, 17),
            (Format::Q4_1, 49, 96, 16),
            (Format::Q4_1, 21, 64, 1),
        ];
        for (seed, &(format, out, inp, m)) in cases.iter().enumerate() {
            let w = matrix(format, out, inp, 7 + seed as u64);
            let x = rand_vec(m * inp, 8);
            let base = run(&w, &x, m, Exec { kernel: Kernel::Portable, threads: 1 });
            for k in kernels() {
                let y = run(&w, &x, m, Exec { kernel: k, threads: 2 });
                assert!(same_bits(&y, &base), "{k:?} differs from the portable kernel on {format:?} {out}x{inp}, m={m}");
            }
        }
    }

    #[test]
    fn extreme_weights_and_activations_give_the_same_bits_in_every_kernel() {
        // Every product at the integer range's edge, all of one sign: where a kernel summing in
        // 16 bits (AVX2's vpmaddubsw) would saturate if it paired or summed the wrong things.
        let (out, inp, m) = (32usize, 128usize, 3usize);
        let signs = [1.0f32, -1.0];
        for (ws, xs) in signs.iter().flat_map(|w| signs.iter().map(move |x| (*w, *x))) {
            let wv: Vec<f32> = (0..out * inp).map(|i| if i % 32 == 0 { 0.5 * ws } else { ws }).collect();
            let xv: Vec<f32> = (0..m * inp).map(|i| if i % 5 == 0 { 0.999 * xs } else { xs }).collect();
            let t = candle_core::Tensor::from_vec(wv.clone(), (out, inp), &candle_core::Device::Cpu).unwrap();
            for w in [QMatrix::quantize("w", &wv, out, inp).unwrap(), QMatrix::from_q4_1("w", &QTensor::quantize(&t, GgmlDType::Q4_1).unwrap()).unwrap()] {
                let base = run(&w, &xv, m, Exec { kernel: Kernel::Portable, threads: 1 });
                // the integer sums are exact: the outputs are close to the true product (≈ ±inp)
                assert!(base.iter().all(|y| (y.abs() - inp as f32).abs() < 0.05 * inp as f32), "{:?}: {:?}", w.format(), &base[..4]);
                for k in kernels() {
                    let y = run(&w, &xv, m, Exec { kernel: k, threads: 1 });
                    assert!(same_bits(&y, &base), "{k:?} differs on {:?} at weight sign {ws}, activation sign {xs}", w.format());
                }
            }
        }
    }

    #[test]
    fn q8_0_qtensors_convert_without_changing_a_weight() {
        let (out, inp) = (48, 96);
        let qt = qtensor(out, inp, 5, GgmlDType::Q8_0);
        let want = qt.dequantize(&candle_core::Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let got = QMatrix::from_qtensor("w", &qt).unwrap();
        assert_eq!(got.format(), Format::Int8);
        assert!(same_bits(&got.dequantize(), &want), "Q8_0 blocks changed in conversion");
        // Through the f32 route (dequantize, quantize again) the weights are the same too.
        let again = QMatrix::quantize("w", &want, out, inp).unwrap().dequantize();
        assert!(same_bits(&again, &want), "re-quantizing Q8_0 values is not idempotent");
        // And quantizing the f32 source follows candle's Q8_0 rule exactly.
        let ours = QMatrix::quantize("w", &rand_vec(out * inp, 5), out, inp).unwrap().dequantize();
        assert!(same_bits(&ours, &want), "quantize differs from candle's Q8_0");
    }

    #[test]
    fn q4_1_qtensors_convert_without_changing_a_weight() {
        for (out, inp) in [(48usize, 96usize), (17, 64)] {
            let qt = qtensor(out, inp, 6, GgmlDType::Q4_1);
            let want = qt.dequantize(&candle_core::Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let got = QMatrix::from_q4_1("w", &qt).unwrap();
            assert_eq!(got.format(), Format::Q4_1);
            assert!(same_bits(&got.dequantize(), &want), "Q4_1 blocks changed in conversion ({out}x{inp})");
            assert!(got.bytes() * 17 < QMatrix::from_qtensor("w", &qt).unwrap().bytes() * 10 + 1, "Q4_1 should read fewer bytes");
        }
        let err = QMatrix::from_q4_1("blk.0.w", &qtensor(16, 64, 1, GgmlDType::Q8_0)).unwrap_err();
        assert!(matches!(err, QGemmError::BadTensor { .. }) && err.to_string().contains("Q4_1"), "{err}");
    }

    #[test]
    fn non_finite_inputs_reach_the_output_and_bad_weights_are_refused() {
        let (out, inp) = (16, 64);
        let mut src = rand_vec(out * inp, 4);
        for w in [QMatrix::quantize("w", &src, out, inp).unwrap(), matrix(Format::Q4_1, out, inp, 4)] {
            let mut x = rand_vec(inp, 6);
            x[40] = f32::NAN;
            let y = run(&w, &x, 1, Exec::default());
            assert!(y.iter().all(|v| v.is_nan()), "{:?}: a NaN input must not vanish in int8 rounding", w.format());
            let err = w.matmul(&x[..10], 1, &mut [0.0; 16]).unwrap_err();
            assert!(matches!(err, QGemmError::InputLen { .. }), "{err}");
        }
        src[3 * inp + 5] = f32::INFINITY;
        let err = QMatrix::quantize("blk.0.w", &src, out, inp).unwrap_err();
        assert!(matches!(err, QGemmError::NonFinite { row: 3, col: 5, .. }), "{err}");
    }

    #[test]
    fn the_simd_activation_quantizer_equals_the_generic_one_including_ties_and_tails() {
        let mut rows: Vec<Vec<f32>> = vec![
            // amax 127 makes the scale exactly 1, so these are exact ties: half away from zero.
            (0..40).map(|i| if i == 0 { 127.0 } else { (i as f32 - 20.0) + 0.5 }).collect(),
            vec![0.0; 64],
            vec![1e-30; 33],
            // a non-finite value gives its block scale NaN and zeros (blocks 0 and 1); block 2 is normal
            (0..96).map(|i| if i == 5 { f32::NAN } else if i == 40 { f32::NEG_INFINITY } else { i as f32 }).collect(),
            (0..70).map(|i| if i % 2 == 0 { -1e30 } else { 1e30 }).collect(),
        ];
        for (n, seed) in [(576usize, 1u64), (45, 2), (31, 3), (1536, 4), (7, 5)] {
            rows.push(rand_vec(n, seed));
        }
        for x in rows {
            let blocks = x.len().div_ceil(BLOCK);
            let (mut q1, mut d1, mut c1) = (vec![0i8; blocks * BLOCK], vec![0f32; blocks], vec![0i32; blocks]);
            quantize_row_generic(&x, &mut q1, &mut d1, &mut c1);
            // the dispatched one, and each SIMD one this CPU has
            let mut quantizers: Vec<(&str, fn(&[f32], &mut [i8], &mut [f32], &mut [i32]))> = vec![("dispatched", quantize_row)];
            #[cfg(target_arch = "x86_64")]
            {
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    // SAFETY: features detected.
                    quantizers.push(("avx2", |x, q, d, c| unsafe { avx2::quantize_row(x, q, d, c) }));
                }
                if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
                    // SAFETY: features detected.
                    quantizers.push(("avx512", |x, q, d, c| unsafe { vnni::quantize_row(x, q, d, c) }));
                }
            }
            assert!(quantizers.len() >= 2 || !cfg!(target_arch = "x86_64") || !is_x86_feature_detected!("avx2"), "no SIMD quantizer compared");
            for (name, quantize) in quantizers {
                let (mut q2, mut d2, mut c2) = (vec![1i8; blocks * BLOCK], vec![1f32; blocks], vec![1i32; blocks]);
                quantize(&x, &mut q2, &mut d2, &mut c2);
                assert_eq!(q1, q2, "{name}: int8 values differ for a row of {}", x.len());
                assert_eq!(d1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), d2.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{name}");
                assert_eq!(c1, c2, "{name}");
            }
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
