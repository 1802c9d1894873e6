//! Per-layer KV cache with O(1) rollback.
//!
//! Keys and values live in preallocated buffers of shape (kv_heads, capacity, head_dim); the
//! valid prefix is `len` rows. `truncate` only moves `len`, so a rejected draft costs nothing to
//! undo: rows past `len` are overwritten by the next append. Capacity doubles when full.

use candle_core::{DType, Device, Result, Tensor};

#[derive(Debug, Clone)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
}

#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    len: usize,
    capacity: usize,
    kv_heads: usize,
    head_dim: usize,
    device: Device,
}

impl KvCache {
    pub fn new(num_layers: usize, kv_heads: usize, head_dim: usize, device: &Device) -> Self {
        Self {
            layers: vec![None; num_layers],
            len: 0,
            capacity: 0,
            kv_heads,
            head_dim,
            device: device.clone(),
        }
    }

    /// Number of committed positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Drops every position at or after `len`. O(1): nothing is copied or freed.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    fn ensure_capacity(&mut self, needed: usize) -> Result<()> {
        if needed <= self.capacity {
            return Ok(());
        }
        let new_cap = needed.max(self.capacity * 2).max(256).next_multiple_of(64);
        for layer in self.layers.iter_mut() {
            let shape = (self.kv_heads, new_cap, self.head_dim);
            let k = Tensor::zeros(shape, DType::F32, &self.device)?;
            let v = Tensor::zeros(shape, DType::F32, &self.device)?;
            if let Some(old) = layer.as_ref() {
                if self.len > 0 {
                    k.slice_set(&old.k.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                    v.slice_set(&old.v.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                }
            }
            *layer = Some(LayerKv { k, v });
        }
        self.capacity = new_cap;
        Ok(())
    }

    /// Writes `k`, `v` of shape (kv_heads, n, head_dim) for `layer` at positions len..len+n and
    /// returns the keys and values of positions 0..len+n. Call `advance(n)` after the last layer.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = k.dim(1)?;
        self.ensure_capacity(self.len + n)?;
        let Some(kv) = self.layers.get(layer).and_then(|l| l.as_ref()) else {
            candle_core::bail!("kv cache has no layer {layer}")
        };
        kv.k.slice_set(&k.contiguous()?, 1, self.len)?;
        kv.v.slice_set(&v.contiguous()?, 1, self.len)?;
        let total = self.len + n;
        Ok((kv.k.narrow(1, 0, total)?, kv.v.narrow(1, 0, total)?))
    }

    /// Commits `n` positions appended to every layer.
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }
}
