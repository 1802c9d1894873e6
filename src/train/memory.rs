//! The memory plan of a training run: what one device holds, computed from the shapes before the
//! first step, so that a user sees whether a run fits (and which lever to pull) before loading an
//! 8B target onto a GPU.
//!
//! The plan counts what this trainer allocates, item by item:
//! - **target weights**: the whole frozen target, at its storage precision (the q8 CPU path keeps
//!   34 bytes per 32 weights; bf16 is 2 bytes). The trainer loads the whole target whether features
//!   come from the prepared cache or are computed online.
//! - **LM head copy**: the frozen LM head in f32, which the chunked head reads.
//! - **drafter**: f32 master weights, f32 gradients and AdamW's two f32 moments (16 bytes per
//!   trainable parameter), plus a working copy in the compute precision when that is not f32.
//! - **attention**: the training attention keeps about 6 × heads × rows × context floats per layer
//!   (scores, their softmax and the pieces of the composition autograd saves; see
//!   `drafter::dflash`), rows = anchors × block. It dominates at the paper's shape.
//! - **layer activations**: per query row the saved inputs and outputs of norms, projections and the
//!   MLP (5H + 2·q + 2·kv + 4I floats per row), per context row the context keys and values.
//! - **context features**: the tapped target hidden states (n_taps × H per token) and the context
//!   after `fc` and `hidden_norm`.
//! - **LM head**: the chunked head's reused buffers, two chunk_rows × V f32 blocks (logits and
//!   gradient rows); `head.chunk_rows` is the lever.
//!
//! Every sequence of a micro-batch is alive at once in the backward; `grad_accum` spreads a batch
//! over micro-batches without adding memory. Estimates of activations are upper bounds of what the
//! graph keeps, not allocator measurements.

use crate::model::TargetConfig;

/// Bytes per element of the compute precision (activations and the drafter's working weights).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    Bf16,
}

impl Precision {
    pub fn bytes(self) -> u64 {
        match self {
            Precision::F32 => 4,
            Precision::Bf16 => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

/// The shapes a plan is computed from.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryShape {
    pub target: TargetConfig,
    /// Bytes per target weight as stored (q8: 34/32; bf16: 2; f32: 4).
    pub target_bytes_per_weight: f64,
    /// Trainable drafter parameters (Σ over its tensors).
    pub drafter_params: u64,
    pub drafter_layers: usize,
    pub block_size: usize,
    pub num_anchors: usize,
    /// Sequences per micro-batch.
    pub batch_sequences: usize,
    /// Longest sequence (tokens).
    pub seq_len: usize,
    pub num_taps: usize,
    pub chunk_rows: usize,
    pub compute: Precision,
}

/// One line of the plan.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryItem {
    pub what: &'static str,
    pub bytes: u64,
    /// How the figure is made, in words and numbers.
    pub how: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MemoryPlan {
    pub items: Vec<MemoryItem>,
}

/// Parameters of a target of this config (embeddings, every layer, final norm, LM head if untied).
pub fn target_params(t: &TargetConfig) -> u64 {
    let (h, i, v) = (t.hidden_size as u64, t.intermediate_size as u64, t.vocab_size as u64);
    let (q, kv) = ((t.num_attention_heads * t.head_dim) as u64, (t.num_key_value_heads * t.head_dim) as u64);
    let bias = if t.attention_bias { q + 2 * kv } else { 0 };
    let qk_norm = if t.qk_norm { 2 * t.head_dim as u64 } else { 0 };
    let layer = h * q + 2 * h * kv + q * h + bias + 3 * h * i + 2 * h + qk_norm;
    let head = if t.tie_word_embeddings { 0 } else { v * h };
    v * h + t.num_hidden_layers as u64 * layer + h + head
}

impl MemoryPlan {
    pub fn new(s: &MemoryShape) -> Self {
        let t = &s.target;
        let c = s.compute.bytes();
        let (h, i, v) = (t.hidden_size as u64, t.intermediate_size as u64, t.vocab_size as u64);
        let (heads, hd) = (t.num_attention_heads as u64, t.head_dim as u64);
        let (q, kv) = (heads * hd, t.num_key_value_heads as u64 * hd);
        let seqs = s.batch_sequences.max(1) as u64;
        let rows = (s.num_anchors * s.block_size) as u64;
        let ctx = s.seq_len as u64;
        let layers = s.drafter_layers as u64;
        let p = s.drafter_params;
        let tp = target_params(t);

        let target_bytes = (tp as f64 * s.target_bytes_per_weight).round() as u64;
        let working = if s.compute == Precision::F32 { 0 } else { p * c };
        let attn = 6 * heads * rows * ctx * c * layers * seqs;
        let per_row = 5 * h + 2 * q + 2 * kv + 4 * i;
        let per_ctx_row = 4 * kv;
        let acts = (rows * per_row + ctx * per_ctx_row) * c * layers * seqs;
        let features = ctx * (s.num_taps as u64 * h + 2 * h) * c * seqs;
        let chunk = (s.chunk_rows / s.block_size.max(1)).max(1) as u64 * s.block_size as u64;
        let head = 2 * chunk.min(rows * seqs) * v * 4;
        let items = vec![
            MemoryItem {
                what: "target weights",
                bytes: target_bytes,
                how: format!("{} params × {} B", fmt_count(tp), trim(s.target_bytes_per_weight)),
            },
            MemoryItem {
                what: "LM head, f32 copy",
                bytes: v * h * 4,
                how: format!("{v} vocab × {h} × 4 B (the chunked head reads f32)"),
            },
            MemoryItem {
                what: "drafter weights, grads, AdamW",
                bytes: 16 * p + working,
                how: format!(
                    "{} params × (4 master + 4 grad + 8 moments{}) B",
                    fmt_count(p),
                    if working > 0 { format!(" + {c} {}", s.compute.as_str()) } else { String::new() }
                ),
            },
            MemoryItem {
                what: "attention (training)",
                bytes: attn,
                how: format!(
                    "6 × {heads} heads × {rows} rows × {ctx} context × {layers} layers × {seqs} seq × {c} B"
                ),
            },
            MemoryItem {
                what: "layer activations",
                bytes: acts,
                how: format!("({rows} rows × {per_row} + {ctx} ctx × {per_ctx_row}) × {layers} layers × {seqs} seq × {c} B"),
            },
            MemoryItem {
                what: "context features",
                bytes: features,
                how: format!("{ctx} tokens × ({} taps + 2) × {h} × {seqs} seq × {c} B", s.num_taps),
            },
            MemoryItem {
                what: "LM head chunks",
                bytes: head,
                how: format!("2 × {} rows × {v} vocab × 4 B (head.chunk_rows)", chunk.min(rows * seqs)),
            },
        ];
        MemoryPlan { items }
    }

    pub fn total(&self) -> u64 {
        self.items.iter().map(|i| i.bytes).sum()
    }

    /// Whether the plan fits `gib` GiB, keeping 10% for the allocator and the runtime.
    pub fn fits(&self, gib: f64) -> bool {
        (self.total() as f64) <= gib * 0.9 * (1u64 << 30) as f64
    }

    /// The plan as aligned text lines, largest lever first in the note.
    pub fn table(&self) -> String {
        let mut s = String::new();
        for i in &self.items {
            s.push_str(&format!("  {:<30} {:>10}   {}\n", i.what, fmt_bytes(i.bytes), i.how));
        }
        s.push_str(&format!("  {:<30} {:>10}", "total (estimate)", fmt_bytes(self.total())));
        s
    }
}

fn trim(x: f64) -> String {
    let s = format!("{x:.4}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn fmt_count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} G", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1} M", n as f64 / 1e6),
        n => format!("{n}"),
    }
}

/// Bytes in binary units (MiB / GiB).
pub fn fmt_bytes(b: u64) -> String {
    let gib = b as f64 / (1u64 << 30) as f64;
    if gib >= 1.0 {
        format!("{gib:.2} GiB")
    } else {
        format!("{:.0} MiB", b as f64 / (1u64 << 20) as f64)
    }
}
