//! The DFlash drafter's inference path: the same model as [`DFlashDrafter::forward_block`]
//! (module docs of [`super::dflash`]), computed without candle's per-op dispatch.
//!
//! - Projections are Q4_1 (the default) or int8 blocks run by the target's batch-invariant
//!   VNNI kernels ([`crate::model::qgemm`]): k and v fused into one matrix, gate and up into
//!   another, so a layer is four weight passes for the block and one for the context.
//! - Where it can, the forward runs in a team of the pool's two workers (`team`), as the
//!   target's layers do: the matmuls' tiles shared out, no pool dispatch per matmul.
//! - The context K/V live in a [`KvCache`] (preallocated, grown by doubling, truncated in O(1));
//!   a cycle appends only its new rows. The block's own K/V are written after the context rows
//!   without committing them, so one bidirectional attention over positions 0..start+B covers
//!   [context ; block] with the target's vectorised attention kernel.
//! - The LM head is the target's (quantised in q8/native) over the B-1 predicted rows only, or
//!   only its rows of a draft vocabulary ([`super::vocab`]) when the proposer has one.
//!
//! Precision: Q4_1 or int8 weights, int8 activations per block of 32, as the target's native
//! and q8 modes. Drafts may differ from the f32 reference where two logits nearly tie; that
//! changes τ, never the output, which the target's verification decides (tests/dflash_spec.rs
//! checks both).

use candle_core::{Device, Tensor};

use super::dflash::DFlashDrafter;
use super::vocab::DraftHead;
use super::DrafterError;
use crate::model::attention::full_attention;
use crate::model::qgemm::QMatrix;
use crate::model::{KvCache, Target};

mod team;

/// How the inference path holds the drafter's projections (`--drafter-precision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Int8 blocks through the target's VNNI kernel (a quarter of the bytes of f32).
    Int8,
    /// GGUF Q4_1 blocks (ggml's rule: per 32 inputs a scale and a minimum, 4-bit steps) through
    /// the same kernel family: 0.56 of the bytes of Int8. The default: a draft is a weight read,
    /// which this makes about 20% shorter, for about 0.5% of τ (the chain's acceptance at
    /// positions 1 / 2 / 3, paired: 0.410 / 0.142 / 0.036 against 0.411 / 0.142 / 0.037 for the
    /// `cpu-60min` drafter, 0.304 / 0.081 / 0.027 against 0.310 / 0.083 / 0.029 for the `quick`
    /// one; docs/perf.md § "The drafter in a team, in Q4_1").
    #[default]
    Q4,
    /// The trained f32 values, multiplied by candle's gemm.
    F32,
}

crate::named_enum!(Precision, "drafter precision", ["q4", "int8", "f32"]);

/// One projection (out, in).
#[derive(Debug, Clone)]
enum Weight {
    /// Int8 or Q4_1 blocks.
    Blocks(QMatrix),
    /// Wᵀ (in, out), contiguous.
    F32 { wt: Tensor, out: usize, inp: usize },
}

impl Weight {
    /// The int8 or Q4_1 blocks, where the projection is held in them.
    fn blocks(&self) -> Option<&QMatrix> {
        match self {
            Weight::Blocks(q) => Some(q),
            Weight::F32 { .. } => None,
        }
    }

    fn in_features(&self) -> usize {
        match self {
            Weight::Blocks(q) => q.in_features(),
            Weight::F32 { inp, .. } => *inp,
        }
    }

    /// y (m, out) = x (m, in) Wᵀ.
    fn mm(&self, x: &[f32], m: usize) -> Result<Vec<f32>, DrafterError> {
        match self {
            Weight::Blocks(w) => {
                let mut y = vec![0f32; m * w.out_features()];
                w.matmul(x, m, &mut y).map_err(qgemm_error)?;
                Ok(y)
            }
            Weight::F32 { wt, out, inp } => {
                let y = Tensor::from_slice(x, (m, *inp), &Device::Cpu)?.matmul(wt)?;
                debug_assert_eq!(y.dims(), &[m, *out]);
                Ok(y.flatten_all()?.to_vec1::<f32>()?)
            }
        }
    }
}

/// One layer's weights for inference.
#[derive(Debug, Clone)]
struct Layer {
    input_norm: Vec<f32>,
    post_norm: Vec<f32>,
    q_norm: Vec<f32>,
    k_norm: Vec<f32>,
    q: Weight,
    /// [k_proj ; v_proj]: (2·n_kv·hd, H)
    kv: Weight,
    o: Weight,
    /// [gate_proj ; up_proj]: (2·I, H)
    gate_up: Weight,
    down: Weight,
}

/// A DFlash drafter's weights, quantised for inference. Built from a drafter's current values
/// (a snapshot: build a new one after the drafter is trained further).
#[derive(Debug, Clone)]
pub struct DFlashInfer {
    fc: Weight,
    hidden_norm: Vec<f32>,
    norm: Vec<f32>,
    layers: Vec<Layer>,
    inv_freq: Vec<f32>,
    hidden: usize,
    inter: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f32,
    block_size: usize,
    mask: u32,
    /// The drafter's trainable MASK input (H), which replaces the embedding of `mask`.
    mask_row: Option<Vec<f32>>,
    max_pos: usize,
}

/// (rows, in) f32 values of several weights stacked along the output dimension.
fn stacked(d: &DFlashDrafter, names: &[String]) -> Result<(Vec<f32>, usize, usize), DrafterError> {
    let vars = d.named_vars();
    let mut parts = Vec::with_capacity(names.len());
    let (mut rows, mut inp) = (0, 0);
    for name in names {
        let t = vars
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_tensor().detach())
            .ok_or_else(|| DrafterError::MissingTensor { path: "drafter".into(), name: name.clone() })?;
        let dims = t.dims().to_vec();
        let (r, i) = match dims.as_slice() {
            &[r, i] => (r, i),
            &[r] => (r, 1),
            _ => return Err(DrafterError::ShapeMismatch { path: "drafter".into(), name: name.clone(), expected: vec![], got: dims }),
        };
        rows += r;
        inp = i;
        parts.push(t);
    }
    // One allocation of the final size, each part copied straight in: growing the vector part by
    // part left freed blocks of every intermediate size behind in the heap (peak memory).
    let mut out = Vec::with_capacity(rows * inp);
    for t in parts {
        let t = t.flatten_all()?.contiguous()?;
        if crate::nn::with_host_f32(&t, |s| out.extend_from_slice(s)).is_none() {
            out.extend(t.to_dtype(candle_core::DType::F32)?.to_device(&candle_core::Device::Cpu)?.to_vec1::<f32>()?);
        }
    }
    Ok((out, rows, inp))
}

fn qgemm_error(e: crate::model::qgemm::QGemmError) -> DrafterError {
    DrafterError::Unsupported { path: "drafter".into(), what: format!("quantized inference weights: {e}") }
}

fn matrix(d: &DFlashDrafter, names: &[String], precision: Precision) -> Result<Weight, DrafterError> {
    let (w, rows, inp) = stacked(d, names)?;
    let int8 = |w: &[f32]| QMatrix::quantize(&names.join("+"), w, rows, inp).map_err(qgemm_error);
    match precision {
        Precision::Q4 if inp % crate::model::qgemm::BLOCK == 0 => {
            let t = Tensor::from_vec(w, (rows, inp), &Device::Cpu)?;
            let qt = candle_core::quantized::QTensor::quantize(&t, candle_core::quantized::GgmlDType::Q4_1)?;
            Ok(Weight::Blocks(QMatrix::from_q4_1_bytes(&names.join("+"), &qt.data()?, rows, inp).map_err(qgemm_error)?))
        }
        // Q4_1 needs whole blocks of 32 inputs; another width keeps Int8 (its last block padded).
        Precision::Q4 | Precision::Int8 => Ok(Weight::Blocks(int8(&w)?)),
        Precision::F32 => {
            let wt = Tensor::from_vec(w, (rows, inp), &Device::Cpu)?.t()?.contiguous()?;
            Ok(Weight::F32 { wt, out: rows, inp })
        }
    }
}

fn vector(d: &DFlashDrafter, name: &str) -> Result<Vec<f32>, DrafterError> {
    Ok(stacked(d, &[name.to_string()])?.0)
}

/// y = x / sqrt(mean(x²) + eps) · w, row by row (rows of w.len()).
fn rms_norm_rows(x: &mut [f32], w: &[f32], eps: f32) {
    for row in x.chunks_exact_mut(w.len()) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / w.len() as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for (v, g) in row.iter_mut().zip(w) {
            *v = *v * inv * g;
        }
    }
}

impl DFlashInfer {
    /// `d`'s current weights in the default precision ([`Precision::Q4`]).
    pub fn new(d: &DFlashDrafter) -> Result<Self, DrafterError> {
        Self::with_precision(d, Precision::default())
    }

    /// `d`'s current weights, projections held in `precision`.
    pub fn with_precision(d: &DFlashDrafter, precision: Precision) -> Result<Self, DrafterError> {
        let c = d.config();
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let p = |s: &str| format!("layers.{l}.{s}.weight");
            layers.push(Layer {
                input_norm: vector(d, &p("input_layernorm"))?,
                post_norm: vector(d, &p("post_attention_layernorm"))?,
                q_norm: vector(d, &p("self_attn.q_norm"))?,
                k_norm: vector(d, &p("self_attn.k_norm"))?,
                q: matrix(d, &[p("self_attn.q_proj")], precision)?,
                kv: matrix(d, &[p("self_attn.k_proj"), p("self_attn.v_proj")], precision)?,
                o: matrix(d, &[p("self_attn.o_proj")], precision)?,
                gate_up: matrix(d, &[p("mlp.gate_proj"), p("mlp.up_proj")], precision)?,
                down: matrix(d, &[p("mlp.down_proj")], precision)?,
            });
        }
        let hd = c.head_dim;
        let inv_freq = (0..hd / 2).map(|i| 1.0 / (c.rope_theta.powf(2.0 * i as f64 / hd as f64)) as f32).collect();
        Ok(Self {
            fc: matrix(d, &["fc.weight".to_string()], precision)?,
            hidden_norm: vector(d, "hidden_norm.weight")?,
            norm: vector(d, "norm.weight")?,
            layers,
            inv_freq,
            hidden: c.hidden_size,
            inter: c.intermediate_size,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: hd,
            eps: c.rms_norm_eps as f32,
            block_size: c.block_size,
            mask: c.mask_token_id,
            mask_row: d.mask_embedding().map(|_| vector(d, "mask_embedding")).transpose()?,
            max_pos: c.max_position_embeddings,
        })
    }

    /// An empty context cache.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len(), self.kv_heads, self.head_dim)
    }

    /// y (m, out) = x (m, in) Wᵀ.
    fn mm(w: &Weight, x: &[f32], m: usize) -> Result<Vec<f32>, DrafterError> {
        w.mm(x, m)
    }

    /// Per-head norm then rotate-half RoPE, in place: x (n, heads, hd) at positions start.. .
    fn norm_rope(&self, x: &mut [f32], heads: usize, w: &[f32], start: usize) {
        let (hd, half) = (self.head_dim, self.head_dim / 2);
        // A row's angles are the same for every head: computed once per row.
        let (mut cos, mut sin) = (vec![0f32; half], vec![0f32; half]);
        for (r, row) in x.chunks_exact_mut(heads * hd).enumerate() {
            rms_norm_rows(row, w, self.eps);
            let p = (start + r) as f32;
            for ((c, s), f) in cos.iter_mut().zip(sin.iter_mut()).zip(&self.inv_freq) {
                (*c, *s) = ((p * f).cos(), (p * f).sin());
            }
            for head in row.chunks_exact_mut(hd) {
                for i in 0..half {
                    let (a, b) = (head[i], head[i + half]);
                    head[i] = a * cos[i] - b * sin[i];
                    head[i + half] = b * cos[i] + a * sin[i];
                }
            }
        }
    }

    /// K (n, n_kv·hd) normed and rotated, and V, of `n` rows of `h` at positions start.. .
    fn keys_values(&self, layer: &Layer, h: &[f32], n: usize, start: usize) -> Result<(Vec<f32>, Vec<f32>), DrafterError> {
        Ok(self.split_keys_values(layer, &Self::mm(&layer.kv, h, n)?, start))
    }

    /// K normed and rotated, and V, from the rows of `layer`'s [k; v] projection `kv`
    /// (n, 2·n_kv·hd) at positions start.. .
    fn split_keys_values(&self, layer: &Layer, kv: &[f32], start: usize) -> (Vec<f32>, Vec<f32>) {
        let kvw = self.kv_heads * self.head_dim;
        let n = kv.len() / (2 * kvw);
        let (mut k, mut v) = (Vec::with_capacity(n * kvw), Vec::with_capacity(n * kvw));
        for row in kv.chunks_exact(2 * kvw) {
            k.extend_from_slice(&row[..kvw]);
            v.extend_from_slice(&row[kvw..]);
        }
        self.norm_rope(&mut k, self.kv_heads, &layer.k_norm, start);
        (k, v)
    }

    /// Appends context rows for positions cache.len().. from their target taps
    /// (n, n_taps·H) row-major.
    pub fn extend_context(&self, cache: &mut KvCache, features: &[f32]) -> Result<(), DrafterError> {
        let fin = self.fc.in_features();
        if features.len() % fin != 0 {
            return Err(DrafterError::InputShape { what: "context features", got: vec![features.len()], expected: format!("(n, {fin})") });
        }
        let n = features.len() / fin;
        let start = cache.len();
        if n == 0 {
            return Ok(());
        }
        if start + n > self.max_pos {
            return Err(DrafterError::ContextOverflow { needed: start + n, max: self.max_pos });
        }
        cache.reserve(n);
        crate::util::pool::on_pool(|| {
            if self.context_team(cache, features, n).is_none() {
                self.context_rows(cache, features, n)?;
            }
            cache.advance(n);
            Ok(())
        })
    }

    /// `extend_context`'s work dispatched matmul by matmul (where no team can be formed, and
    /// for f32 projections): the K/V of `n` rows of features written past the cache's length,
    /// which the caller then advances.
    fn context_rows(&self, cache: &mut KvCache, features: &[f32], n: usize) -> Result<(), DrafterError> {
        let start = cache.len();
        let mut c = Self::mm(&self.fc, features, n)?;
        rms_norm_rows(&mut c, &self.hidden_norm, self.eps);
        for (l, layer) in self.layers.iter().enumerate() {
            let (k, v) = self.keys_values(layer, &c, n, start)?;
            cache.write(l, &k, &v, n);
        }
        Ok(())
    }

    /// The final-normed hidden (B, H) of the block `[last, MASK × (B-1)]` at positions
    /// start..start+B against the context 0..start held by `cache` (which must hold exactly
    /// that). The block's K/V are written past the context and not committed.
    pub fn forward_block(&self, target: &Target, cache: &mut KvCache, last: u32, start: usize) -> Result<Vec<f32>, DrafterError> {
        let b = self.block_size;
        if cache.len() != start {
            return Err(DrafterError::ContextGap { cached: cache.len(), start });
        }
        if start + b > self.max_pos {
            return Err(DrafterError::ContextOverflow { needed: start + b, max: self.max_pos });
        }
        let vocab = target.config().vocab_size;
        if last as usize >= vocab {
            return Err(DrafterError::TokenOutOfRange { token: last, vocab });
        }
        let ids: Vec<u32> = std::iter::once(last).chain(std::iter::repeat_n(self.mask, b - 1)).collect();
        let mut x = target.embed(&ids)?.flatten_all()?.to_vec1::<f32>()?;
        let h = self.hidden;
        if let Some(m) = &self.mask_row {
            for row in x.chunks_exact_mut(h).skip(1) {
                row.copy_from_slice(m);
            }
        }
        cache.reserve(b);
        if crate::util::pool::on_pool(|| self.block_layers_team(&mut x, cache, start)).is_none() {
            self.block_layers(&mut x, cache, start)?;
        }
        rms_norm_rows(&mut x, &self.norm, self.eps);
        debug_assert_eq!(x.len(), b * h);
        Ok(x)
    }

    /// `forward_block`'s layers dispatched matmul by matmul (the path where no team can be
    /// formed, and for f32 projections): x (B, H) in place.
    fn block_layers(&self, x: &mut [f32], cache: &mut KvCache, start: usize) -> Result<(), DrafterError> {
        let b = self.block_size;
        let qw = self.heads * self.head_dim;
        for (l, layer) in self.layers.iter().enumerate() {
            // attention: q from the block; k/v of the block after the context's
            let mut hn = x.to_vec();
            rms_norm_rows(&mut hn, &layer.input_norm, self.eps);
            let mut q = Self::mm(&layer.q, &hn, b)?;
            self.norm_rope(&mut q, self.heads, &layer.q_norm, start);
            let (k, v) = self.keys_values(layer, &hn, b, start)?;
            cache.write(l, &k, &v, b);
            let att = full_attention(&q, cache.layer(l), b, start + b, self.heads, self.kv_heads, self.head_dim, cache.capacity());
            debug_assert_eq!(att.len(), b * qw);
            for (xi, oi) in x.iter_mut().zip(Self::mm(&layer.o, &att, b)?) {
                *xi += oi;
            }
            // MLP: down(silu(gate) ⊙ up)
            let mut hn = x.to_vec();
            rms_norm_rows(&mut hn, &layer.post_norm, self.eps);
            let gu = Self::mm(&layer.gate_up, &hn, b)?;
            let mut a = Vec::with_capacity(b * self.inter);
            for row in gu.chunks_exact(2 * self.inter) {
                let (g, u) = row.split_at(self.inter);
                let start = a.len();
                a.extend_from_slice(g);
                crate::model::host_ops::silu_mul(&mut a[start..], u);
            }
            for (xi, di) in x.iter_mut().zip(Self::mm(&layer.down, &a, b)?) {
                *xi += di;
            }
        }
        Ok(())
    }

    /// The B-1 greedy drafts after `last` (at position `start`): argmax of the target's head
    /// over block positions 1..B-1.
    pub fn draft(&self, target: &Target, cache: &mut KvCache, last: u32, start: usize) -> Result<Vec<u32>, DrafterError> {
        self.draft_in(target, cache, last, start, None)
    }

    /// [`DFlashInfer::draft`] with the drafts taken among a draft vocabulary's ids (`head`,
    /// [`super::vocab`]) instead of the whole head.
    pub fn draft_in(&self, target: &Target, cache: &mut KvCache, last: u32, start: usize, head: Option<&mut DraftHead>) -> Result<Vec<u32>, DrafterError> {
        Ok(self.draft_scored_in(target, cache, last, start, head)?.into_iter().map(|(id, _)| id).collect())
    }

    /// [`DFlashInfer::draft_in`] with each draft's probability under the drafter's softmax (over
    /// the ids it scores): its confidence, which `--draft-p-min` compares.
    pub fn draft_scored_in(&self, target: &Target, cache: &mut KvCache, last: u32, start: usize, head: Option<&mut DraftHead>) -> Result<Vec<(u32, f32)>, DrafterError> {
        crate::util::pool::on_pool(|| self.draft_here(target, cache, last, start, head))
    }

    fn draft_here(&self, target: &Target, cache: &mut KvCache, last: u32, start: usize, head: Option<&mut DraftHead>) -> Result<Vec<(u32, f32)>, DrafterError> {
        let b = self.block_size;
        let x = self.forward_block(target, cache, last, start)?;
        if let Some(head) = head {
            return head.scored(target, &x[self.hidden..], b - 1);
        }
        let rows = Tensor::from_slice(&x[self.hidden..], (b - 1, self.hidden), &Device::Cpu)?;
        Ok(target.lm_head(&rows)?.to_vec2::<f32>()?.iter().map(|row| top_with_probability(row)).collect())
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }
}

/// The first index of a row's largest value (candle's argmax) and its softmax probability.
pub(crate) fn top_with_probability(row: &[f32]) -> (u32, f32) {
    let (i, _, sum) = crate::model::host_ops::argmax_and_sum_exp(row);
    (i as u32, 1.0 / sum)
}

#[cfg(test)]
mod tests {
    use super::{DFlashInfer, Precision};
    use crate::drafter::{DFlashDrafter, DFlashInitConfig};
    use crate::model::{load_target, ModelLocation, Target, WeightsMode};

    /// Q4_1 needs whole blocks of 32 inputs: a drafter of hidden size 48 keeps Int8 for the
    /// projections that read 48 inputs and takes Q4_1 where the width allows (gate/up's 96 → the
    /// down projection reads 96 = 3 blocks), instead of failing to build.
    #[test]
    fn q4_keeps_int8_where_a_width_is_not_whole_blocks() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/llama");
        let target: Target = load_target(&ModelLocation::from_path(&dir).unwrap(), WeightsMode::Q8).unwrap();
        let mut cfg = target.config().clone();
        (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) = (48, 96, 3, 1, 16);
        let mut init = DFlashInitConfig::new(1, 4, 5);
        init.target_layer_ids = Some(vec![0]);
        let d = DFlashDrafter::init_random(&cfg, &init, 3).unwrap();
        let infer = DFlashInfer::with_precision(&d, Precision::Q4).unwrap();
        use crate::model::qgemm::Format;
        let l = &infer.layers[0];
        assert_eq!(l.q.blocks().unwrap().format(), Format::Int8, "q reads 48 inputs");
        assert_eq!(l.down.blocks().unwrap().format(), Format::Q4_1, "down reads 96 inputs");
    }
}
