//! Causal attention over the KV cache, computed one (query, head) pair at a time.
//!
//! Why not batched matmuls: speculative decoding promises that verifying B tokens in one
//! forward gives exactly the logits of B single-token steps. Batched attention changes the
//! floating-point summation order with the chunk length (different GEMM tiling, masked
//! columns), and with Q8 activation quantization downstream a 1e-6 difference can flip an int8
//! rounding and grow to O(1) in the logits. Here every (query, head) is reduced over exactly
//! its own causal prefix in a fixed order, so the result does not depend on how the tokens
//! were chunked: a chunked forward is bit-identical to a token-by-token one.

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

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_one_avx2(q: &[f32], k: &[f32], v: &[f32], len: usize, hd: usize, scale: f32, scores: &mut Vec<f32>, out: &mut [f32]) {
    attend_one(q, k, v, len, hd, scale, scores, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn attend_one_avx512(q: &[f32], k: &[f32], v: &[f32], len: usize, hd: usize, scale: f32, scores: &mut Vec<f32>, out: &mut [f32]) {
    attend_one(q, k, v, len, hd, scale, scores, out)
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

/// Below this many multiply-adds attention stays on one thread.
const PARALLEL_MIN_WORK: usize = 8 << 20;

/// Attention for `n` new queries at positions start..start+n.
/// q: (n, heads, hd) row-major; kv: the layer cache holding at least start+n positions with
/// `capacity` rows per KV head. Returns (n, heads·hd).
pub fn causal_attention(q: &[f32], kv: &LayerKv, n: usize, start: usize, heads: usize, kv_heads: usize, hd: usize, capacity: usize) -> Vec<f32> {
    let groups = heads / kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let isa = isa();
    let mut out = vec![0f32; n * heads * hd];
    let work = |scores: &mut Vec<f32>, (idx, o): (usize, &mut [f32])| {
        let (i, h) = (idx / heads, idx % heads);
        let g = h / groups;
        let qrow = &q[idx * hd..(idx + 1) * hd];
        let base = g * capacity * hd;
        let len = start + i + 1;
        let k = &kv.k[base..base + len * hd];
        let v = &kv.v[base..base + len * hd];
        match isa {
            // SAFETY: the features were detected at run time.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { attend_one_avx512(qrow, k, v, len, hd, scale, scores, o) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { attend_one_avx2(qrow, k, v, len, hd, scale, scores, o) },
            Isa::Generic => attend_one(qrow, k, v, len, hd, scale, scores, o),
        }
    };
    // Small problems (decode, verify) run on the calling thread: waking a second pool next to
    // candle's spinning matmul workers costs more than the work. Each (query, head) is computed
    // the same way on either path, so the choice does not change a single bit.
    let flops = n * heads * (start + n) * hd;
    if flops < PARALLEL_MIN_WORK {
        let mut scores = Vec::new();
        for item in out.chunks_mut(hd).enumerate() {
            work(&mut scores, item);
        }
    } else {
        out.par_chunks_mut(hd).enumerate().for_each_init(Vec::new, work);
    }
    out
}
