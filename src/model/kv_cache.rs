//! Per-layer KV cache with O(1) rollback.
//!
//! Keys and values live in preallocated buffers laid out (kv_heads, capacity, head_dim); the
//! valid prefix is `len` positions. `truncate` only moves `len`, so undoing a rejected draft
//! costs nothing: rows past `len` are overwritten by the next append. Capacity doubles when
//! full (one copy of the valid prefix).

use super::attention::LayerKv;

#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    len: usize,
    capacity: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl KvCache {
    pub fn new(num_layers: usize, kv_heads: usize, head_dim: usize) -> Self {
        Self { layers: vec![LayerKv::default(); num_layers], len: 0, capacity: 0, kv_heads, head_dim }
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
        let new_cap = needed.max(self.capacity * 2).max(256).next_multiple_of(64);
        let (hd, old_cap, len) = (self.head_dim, self.capacity, self.len);
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

    /// Commits `n` positions written to every layer.
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }
}
