//! The memory plan of a training run: what each device holds, computed from the config's shapes
//! (not measured), printed when training starts.
//!
//! Per training process (one GPU, or the CPU):
//!
//! ```text
//! target weights      embedding f32 (V·H·4) + linears and LM head at `weight_bytes` each
//! LM head for the CE  the head's f32 copy, V·H·4 (the training head reads f32)
//! drafter weights     P·4 (f32 masters), gradients P·4
//! optimizer           AdamW m and v, 2·P·4 — in host memory (`optim.rs` steps on the host)
//! features            S·T·n_taps·H·4 (the micro-batch's target taps, f32)
//! drafter activations per sequence and layer, held at the peak of the backward (R = anchors·B rows):
//!                     3·R·(6H + (nh + 2·nkv)·hd + 4I) + T·2·nkv·hd + 8.7·anchors·nh·B·(T + B)
//!                     (residual/norm/attention rows, q/k/v, the MLP, context K/V, and the
//!                     block-vs-context attention scores, with the factors measured on the CPU:
//!                     [`ROW_FACTOR`], [`SCORE_FACTOR`]), × layers × S; with activation
//!                     checkpointing one layer's plus every layer's input rows and the context
//! head chunk          chunk_rows·V·4 × 2 (CPU kernel: logits and gradient rows) or × 6 (generic
//!                     head: logits, log-softmax, exp, softmax, one-hot, gradient rows)
//! online target pass  KV cache T·L·2·nkv·hd·4 + one layer's rows T·(3H + 3I)·4
//! ```
//!
//! S = batch_sequences, T = the longest training sequence, P = the drafter's parameters. The
//! formula leaves out allocator slack and candle's temporaries (a few row-sized buffers).

use super::config::TrainConfig;
use super::trainable::TrainableDrafter;
use crate::model::{Target, TargetConfig, WeightsMode};
use crate::nn::KernelPath;

/// The shapes the plan is computed from.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryShape {
    pub target: TargetConfig,
    /// Bytes per element of the target's linears and LM head: 4 for f32, 2 for bf16 (CUDA),
    /// 34/32 for the q8 blocks (int8 + an f16 scale per 32).
    pub weight_bytes: f64,
    pub drafter_layers: usize,
    pub drafter_parameters: usize,
    pub taps: usize,
    pub block_size: usize,
    pub anchors: usize,
    pub seq_len: usize,
    pub batch_sequences: usize,
    pub chunk_rows: usize,
    /// The generic head (any non-CPU-kernel device) or the CPU kernel.
    pub generic_head: bool,
    /// Activation checkpointing: one layer's activations at a time, plus every layer's input.
    pub activation_checkpointing: bool,
}

/// One line of the plan.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryLine {
    pub what: &'static str,
    pub bytes: f64,
    /// Host memory rather than the device's.
    pub host: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MemoryPlan {
    pub lines: Vec<MemoryLine>,
}

const GIB: f64 = (1u64 << 30) as f64;

/// Calibration of the activation estimate against measurement. Counting the tensors a layer
/// saves (norms, q/k/v, attention output, MLP; scores and their softmax) undercounts what candle's
/// autograd holds at the peak of the backward (the differentiable compositions keep their
/// intermediates, and the backward's gradients of the same size live beside them). Measured on
/// the CPU in f32 (`specauf bench train --objectives full --runs 1`, SmolLM2-135M, block 16, peak
/// RSS: 4 layers × 128 anchors × 512 tokens 3137 MiB; 2 layers 1990; 64 anchors 2020; 256 tokens
/// 2509), one layer per sequence holds 2.97× the counted per-row values and 8.7 values per
/// (query row, key, head) instead of 2: hence these factors.
const ROW_FACTOR: f64 = 3.0;
const SCORE_FACTOR: f64 = 8.7;

impl MemoryShape {
    /// The shape of a run: `target` as loaded, the drafter as built, the config's batch, and
    /// `seq_len` (the longest training sequence).
    pub fn of_run(target: &Target, drafter: &dyn TrainableDrafter, cfg: &TrainConfig, seq_len: usize) -> Self {
        let backend = target.backend();
        let weight_bytes = match (backend.path(), target.weights_mode()) {
            (KernelPath::Generic, _) => backend.compute_dtype().size_in_bytes() as f64,
            (KernelPath::Cpu, WeightsMode::F32) => 4.0,
            (KernelPath::Cpu, _) => 34.0 / 32.0,
        };
        let vars = drafter.named_vars();
        MemoryShape {
            target: target.config().clone(),
            weight_bytes,
            drafter_layers: vars.iter().filter(|(n, _)| n.starts_with("layers.") && n.ends_with(".input_layernorm.weight")).count(),
            drafter_parameters: vars.iter().map(|(_, v)| v.elem_count()).sum(),
            taps: drafter.target_layer_ids().len(),
            block_size: drafter.block_size(),
            anchors: cfg.num_anchors,
            seq_len,
            batch_sequences: cfg.batch_sequences,
            chunk_rows: cfg.head.chunk_rows,
            generic_head: backend.path() == KernelPath::Generic,
            activation_checkpointing: cfg.activation_checkpointing,
        }
    }

    /// The target's parameters: (embedding, linears + LM head, norms).
    pub fn target_parameters(&self) -> (f64, f64, f64) {
        let c = &self.target;
        let (h, i, l, v) = (c.hidden_size as f64, c.intermediate_size as f64, c.num_hidden_layers as f64, c.vocab_size as f64);
        let (q, kv) = ((c.num_attention_heads * c.head_dim) as f64, (c.num_key_value_heads * c.head_dim) as f64);
        let per_layer = h * q + 2.0 * h * kv + q * h + 3.0 * h * i;
        let norms = l * 2.0 * h + h + if c.qk_norm { l * 2.0 * c.head_dim as f64 } else { 0.0 };
        (v * h, l * per_layer + v * h, norms)
    }

    /// Values saved for the backward per sequence, from one layer's `per_layer`: every layer's,
    /// or with activation checkpointing one layer's (recomputed in the backward) plus each layer's
    /// input rows (anchors·B × H) and the context (T × H).
    fn saved_activations(&self, per_layer: f64) -> f64 {
        let layers = self.drafter_layers as f64;
        if !self.activation_checkpointing {
            return per_layer * layers;
        }
        let rows = (self.anchors * self.block_size) as f64;
        let h = self.target.hidden_size as f64;
        per_layer + layers * rows * h + self.seq_len as f64 * h
    }

    pub fn plan(&self) -> MemoryPlan {
        let c = &self.target;
        let f = |x: usize| x as f64;
        let (h, i, v, t) = (f(c.hidden_size), f(c.intermediate_size), f(c.vocab_size), f(self.seq_len));
        let (nh, nkv, hd) = (f(c.num_attention_heads), f(c.num_key_value_heads), f(c.head_dim));
        let (b, a, s) = (f(self.block_size), f(self.anchors), f(self.batch_sequences));
        let (embed, linears, norms) = self.target_parameters();
        let p = f(self.drafter_parameters);
        let rows = a * b;
        let per_layer = ROW_FACTOR * rows * (6.0 * h + (nh + 2.0 * nkv) * hd + 4.0 * i)
            + t * 2.0 * nkv * hd
            + SCORE_FACTOR * a * nh * b * (t + b);
        let head_buffers = if self.generic_head { 6.0 } else { 2.0 };
        let line = |what, bytes, host| MemoryLine { what, bytes, host };
        MemoryPlan {
            lines: vec![
                line("target weights", embed * 4.0 + linears * self.weight_bytes + norms * 4.0, false),
                line("LM head f32 copy for the CE", v * h * 4.0, false),
                line("drafter weights (f32 masters)", p * 4.0, false),
                line("drafter gradients (f32)", p * 4.0, false),
                line("optimizer state (AdamW m, v; f32)", 2.0 * p * 4.0, true),
                line("target features of the micro-batch", s * t * f(self.taps) * h * 4.0, false),
                line("drafter activations for the backward", self.saved_activations(per_layer) * s * 4.0, false),
                line("LM head / CE chunk", f(self.chunk_rows) * v * 4.0 * head_buffers, false),
                line("online target forward (KV cache + one layer)", t * f(c.num_hidden_layers) * 2.0 * nkv * hd * 4.0 + t * (3.0 * h + 3.0 * i) * 4.0, false),
            ],
        }
    }
}

impl MemoryPlan {
    /// Bytes on the device (GPU, or the CPU's memory when training there).
    pub fn device_bytes(&self) -> f64 {
        self.lines.iter().filter(|l| !l.host).map(|l| l.bytes).sum()
    }

    pub fn host_bytes(&self) -> f64 {
        self.lines.iter().filter(|l| l.host).map(|l| l.bytes).sum()
    }

    /// The plan as lines of text, GiB with two decimals, computed (not measured).
    pub fn render(&self, device: &str) -> String {
        let mut out = format!("memory plan per process on {device} (computed from the shapes, not measured):\n");
        for l in &self.lines {
            out.push_str(&format!("  {:<46} {:>8.2} GiB{}\n", l.what, l.bytes / GIB, if l.host { " (host)" } else { "" }));
        }
        out.push_str(&format!("  {:<46} {:>8.2} GiB, + {:.2} GiB host", "total on the device", self.device_bytes() / GIB, self.host_bytes() / GIB));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Family;

    fn tiny() -> TargetConfig {
        TargetConfig {
            family: Family::Qwen3,
            vocab_size: 100,
            hidden_size: 8,
            intermediate_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 4,
            rope_theta: 1e4,
            rms_norm_eps: 1e-6,
            max_position_embeddings: 64,
            tie_word_embeddings: false,
            attention_bias: false,
            qk_norm: true,
            bos_token_id: None,
            eos_token_ids: vec![],
        }
    }

    #[test]
    fn the_plan_of_a_small_shape_equals_a_hand_computation() {
        let shape = MemoryShape {
            target: tiny(),
            weight_bytes: 2.0,
            drafter_layers: 1,
            drafter_parameters: 1000,
            taps: 2,
            block_size: 4,
            anchors: 3,
            seq_len: 10,
            batch_sequences: 2,
            chunk_rows: 6,
            generic_head: true,
            activation_checkpointing: false,
        };
        // By hand. Target: embedding 100·8 = 800; per layer q 8·8 = 64, k and v 8·4 = 32 each,
        // o 64, MLP 3·8·16 = 384 → 576, × 2 layers = 1152, + LM head 800 = 1952 linears;
        // norms 2·2·8 + 8 + 2·2·4 = 56.
        assert_eq!(shape.target_parameters(), (800.0, 1952.0, 56.0));
        let p = shape.plan();
        let bytes = |what: &str| p.lines.iter().find(|l| l.what == what).unwrap().bytes;
        assert_eq!(bytes("target weights"), 800.0 * 4.0 + 1952.0 * 2.0 + 56.0 * 4.0);
        assert_eq!(bytes("LM head f32 copy for the CE"), 3200.0);
        assert_eq!(bytes("drafter weights (f32 masters)"), 4000.0);
        assert_eq!(bytes("optimizer state (AdamW m, v; f32)"), 8000.0);
        assert_eq!(bytes("target features of the micro-batch"), 2.0 * 10.0 * 2.0 * 8.0 * 4.0);
        // Activations: R = 12 rows; 3·12·(48 + 4·4 + 64) = 4608; context K/V 10·2·4 = 80;
        // scores 8.7·3·2·4·14 = 2923.2 → 7611.2 per layer and sequence, × 1 layer × 2 sequences × 4 B.
        let per_layer = 4608.0 + 80.0 + 8.7 * 3.0 * 2.0 * 4.0 * 14.0;
        assert!((bytes("drafter activations for the backward") - per_layer * 2.0 * 4.0).abs() < 1e-6);
        assert_eq!(bytes("LM head / CE chunk"), 6.0 * 100.0 * 4.0 * 6.0);
        // KV cache 10 positions · 2 layers · (k, v) · 1 kv head · 4 dims · 4 B = 640; one layer
        // 10·(24 + 48)·4 = 2880.
        assert_eq!(bytes("online target forward (KV cache + one layer)"), 640.0 + 2880.0);
        assert_eq!(p.host_bytes(), 8000.0);
        assert_eq!(p.device_bytes(), p.lines.iter().map(|l| l.bytes).sum::<f64>() - 8000.0);
        assert!(p.render("cuda:0").contains("not measured"));
        // Activation checkpointing keeps one layer's values per sequence plus each layer's 12 × 8
        // input rows and the 10 × 8 context: with 3 layers, one layer + 3·96 + 80 instead of three.
        let deep = MemoryShape { drafter_layers: 3, ..shape.clone() };
        let ckpt = MemoryShape { activation_checkpointing: true, ..deep.clone() };
        let saved = |m: &MemoryShape| m.plan().lines.iter().find(|l| l.what == "drafter activations for the backward").unwrap().bytes;
        assert!((saved(&deep) - 3.0 * per_layer * 2.0 * 4.0).abs() < 1e-6);
        assert!((saved(&ckpt) - (per_layer + 3.0 * 96.0 + 80.0) * 2.0 * 4.0).abs() < 1e-6);
    }
}
