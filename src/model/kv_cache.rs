//! Per-layer KV cache with O(1) rollback.
//!
//! Keys and values live in preallocated buffers laid out (kv_heads, capacity, head_dim); the
//! valid prefix is `len` positions. `truncate` only moves `len`, so undoing a rejected draft
//! costs nothing: rows past `len` are overwritten by the next append. Capacity doubles when
//! full (one copy of the valid prefix).
//!
//! A cache made by a target on the generic path ([`KvCache::on_device`]) keeps the same layout in
//! device tensors instead of host buffers, with the same O(1) truncation.

use candle_core::{DType, Device, Tensor};

use super::attention::LayerKv;

#[derive(Debug)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    /// The generic path's storage: per layer (keys, values), each (kv_heads, capacity, head_dim)
    /// f32 on the device; `layers` then stays empty.
    tensors: Option<(Device, Vec<(Tensor, Tensor)>)>,
    len: usize,
    capacity: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl KvCache {
    pub fn new(num_layers: usize, kv_heads: usize, head_dim: usize) -> Self {
        Self { layers: vec![LayerKv::default(); num_layers], tensors: None, len: 0, capacity: 0, kv_heads, head_dim }
    }

    /// A cache for the generic path: device tensors, allocated on the first `reserve`.
    pub fn on_device(num_layers: usize, kv_heads: usize, head_dim: usize, device: &Device) -> Self {
        let empty = || Tensor::zeros((kv_heads, 0, head_dim), DType::F32, device);
        let layers = (0..num_layers).map(|_| Ok((empty()?, empty()?))).collect::<candle_core::Result<Vec<_>>>();
        // Allocating zero elements cannot fail on a device that opened; keep the error path anyway.
        let tensors = layers.ok().map(|l| (device.clone(), l));
        Self { layers: Vec::new(), tensors, len: 0, capacity: 0, kv_heads, head_dim }
    }

    /// Number of committed positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Rows allocated per KV head.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Drops every position at or after `len`. O(1): nothing is copied or freed.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Makes room for `extra` positions after `len`.
    pub fn reserve(&mut self, extra: usize) {
        let needed = self.len + extra;
        if needed <= self.capacity {
            return;
        }
        // From 64 positions (3 MB for SmolLM2's 30 layers): a short start-up measurement or
        // request does not hold a 256-position cache (12 MB); longer ones double as they grow.
        let new_cap = needed.max(self.capacity * 2).max(64).next_multiple_of(64);
        let (hd, old_cap, len) = (self.head_dim, self.capacity, self.len);
        if let Some((device, layers)) = &mut self.tensors {
            for pair in layers.iter_mut() {
                for t in [&mut pair.0, &mut pair.1] {
                    // Growing a device buffer; only an out-of-memory device fails here, and a
                    // later write reports it.
                    if let Ok(grown) = grow(t, self.kv_heads, new_cap, hd, len, device) {
                        *t = grown;
                    }
                }
            }
            self.capacity = new_cap;
            return;
        }
        for layer in self.layers.iter_mut() {
            for buf in [&mut layer.k, &mut layer.v] {
                let mut grown = vec![0f32; self.kv_heads * new_cap * hd];
                for g in 0..self.kv_heads {
                    grown[g * new_cap * hd..g * new_cap * hd + len * hd]
                        .copy_from_slice(&buf[g * old_cap * hd..g * old_cap * hd + len * hd]);
                }
                *buf = grown;
            }
        }
        self.capacity = new_cap;
    }

    /// Writes keys and values of `n` new positions, each (n, kv_heads, head_dim) row-major, at
    /// positions len..len+n of `layer`. `reserve(n)` must have been called; `advance(n)` commits
    /// them once every layer has been written.
    pub fn write(&mut self, layer: usize, k: &[f32], v: &[f32], n: usize) {
        let (hd, cap, len) = (self.head_dim, self.capacity, self.len);
        let kv = &mut self.layers[layer];
        for i in 0..n {
            for g in 0..self.kv_heads {
                let src = (i * self.kv_heads + g) * hd;
                let dst = (g * cap + len + i) * hd;
                kv.k[dst..dst + hd].copy_from_slice(&k[src..src + hd]);
                kv.v[dst..dst + hd].copy_from_slice(&v[src..src + hd]);
            }
        }
    }

    pub fn layer(&self, layer: usize) -> &LayerKv {
        &self.layers[layer]
    }

    /// Generic path: writes `k`, `v` (n, kv_heads, head_dim) at positions len..len+n of `layer`;
    /// `reserve(n)` first, `advance(n)` after every layer, as for [`KvCache::write`].
    pub fn write_tensors(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> candle_core::Result<()> {
        let len = self.len;
        let Some((_, layers)) = &self.tensors else {
            candle_core::bail!("write_tensors on a host cache: make the cache with Target::new_cache")
        };
        let (kc, vc) = &layers[layer];
        if kc.dim(1)? < len + k.dim(0)? {
            candle_core::bail!("KV cache of {} rows cannot take {} more after {len}: out of device memory?", kc.dim(1)?, k.dim(0)?)
        }
        kc.slice_set(&k.transpose(0, 1)?.contiguous()?, 1, len)?;
        vc.slice_set(&v.transpose(0, 1)?.contiguous()?, 1, len)
    }

    /// Generic path: keys and values of positions 0..n of `layer`, each (kv_heads, n, head_dim).
    pub fn layer_tensors(&self, layer: usize, n: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let Some((_, layers)) = &self.tensors else {
            candle_core::bail!("layer_tensors on a host cache")
        };
        let (k, v) = &layers[layer];
        Ok((k.narrow(1, 0, n)?, v.narrow(1, 0, n)?))
    }

    /// Commits `n` positions written to every layer.
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }
}

impl Clone for KvCache {
    /// A deep copy: device tensors are copied too (a tensor clone would share the storage that
    /// `write_tensors` writes into).
    fn clone(&self) -> Self {
        let tensors = self.tensors.as_ref().map(|(d, layers)| {
            let layers = layers.iter().map(|(k, v)| (k.copy().unwrap_or_else(|_| k.clone()), v.copy().unwrap_or_else(|_| v.clone()))).collect();
            (d.clone(), layers)
        });
        Self { layers: self.layers.clone(), tensors, len: self.len, capacity: self.capacity, kv_heads: self.kv_heads, head_dim: self.head_dim }
    }
}

/// A (kv_heads, new_cap, hd) zero tensor holding the first `len` rows of `t`.
fn grow(t: &Tensor, kv_heads: usize, new_cap: usize, hd: usize, len: usize, device: &Device) -> candle_core::Result<Tensor> {
    let grown = Tensor::zeros((kv_heads, new_cap, hd), DType::F32, device)?;
    if len > 0 {
        grown.slice_set(&t.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
    }
    Ok(grown)
}
