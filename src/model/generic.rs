//! The target's attention on the generic path (DESIGN §7.11): plain candle tensor ops on any
//! device, over the device-tensor KV cache ([`KvCache::on_device`](super::KvCache::on_device)).
//!
//! Batch invariance, as for the CPU kernel (`attention.rs`): each query row is attended on its
//! own, over exactly its causal prefix, with one (heads, 1, hd) × (heads, hd, len) product, a
//! softmax and one (heads, 1, len) × (heads, len, hd) product whose shapes depend only on the
//! row's position. A row verified inside a block of B therefore gets the bits it gets when
//! decoded alone, on any device whose kernels are deterministic for a fixed shape. The cost is
//! one small product pair per row and layer instead of one batched product per chunk; the
//! generic linears are row-wise for the same reason (`weights.rs`, `rowwise_matmul`).

use candle_core::Tensor;

use super::target::{BatchItem, Span};

/// q, k (Σn, heads, hd) after RoPE, v (Σn, kv_heads, hd), all f32 on the device. Writes every
/// item's k/v rows into its cache at layer `idx`, attends each item's queries over its cache and
/// returns (Σn, heads·hd).
pub(super) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    idx: usize,
    items: &mut [BatchItem<'_>],
    spans: &[Span],
    (nh, nkv, hd): (usize, usize, usize),
) -> candle_core::Result<Tensor> {
    let rep = nh / nkv;
    let scale = 1.0 / (hd as f64).sqrt();
    let mut rows = Vec::with_capacity(q.dim(0)?);
    for (item, s) in items.iter_mut().zip(spans) {
        item.cache.write_tensors(idx, &k.narrow(0, s.row, s.n)?, &v.narrow(0, s.row, s.n)?)?;
        let (kc, vc) = item.cache.layer_tensors(idx, s.start + s.n)?;
        for i in 0..s.n {
            let len = s.start + i + 1;
            // (kv_heads, len, hd) -> (heads, len, hd): kv head g serves query heads g·rep..(g+1)·rep.
            let expand = |t: &Tensor| -> candle_core::Result<Tensor> {
                t.narrow(1, 0, len)?.unsqueeze(1)?.broadcast_as((nkv, rep, len, hd))?.reshape((nh, len, hd))
            };
            let (kr, vr) = (expand(&kc)?, expand(&vc)?);
            // (1, heads, hd) -> (heads, 1, hd)
            let qi = q.narrow(0, s.row + i, 1)?.transpose(0, 1)?.contiguous()?;
            let scores = (qi.matmul(&kr.t()?)? * scale)?;
            let p = candle_nn::ops::softmax_last_dim(&scores)?;
            rows.push(p.matmul(&vr)?.reshape((1, nh * hd))?);
        }
    }
    Tensor::cat(&rows, 0)
}
