//! The training memory plan at the paper's shape (Qwen3-8B target, 5-layer block-16 DFlash
//! drafter, 512 anchors, 3072-token sequences, bf16 compute), and which GPU sizes it fits, with
//! the levers that exist today (anchors per sequence, sequences per micro-batch, LM-head chunk
//! rows). Computed from the shapes, not measured.
//!
//! cargo run --release --example memory_plan

use specauf::drafter::dflash::{DFlashConfig, DFlashInitConfig};
use specauf::model::{Family, TargetConfig};
use specauf::train::memory::{fmt_bytes, MemoryPlan, MemoryShape, Precision};

fn qwen3_8b() -> TargetConfig {
    TargetConfig {
        family: Family::Qwen3,
        vocab_size: 151936,
        hidden_size: 4096,
        intermediate_size: 12288,
        num_hidden_layers: 36,
        num_attention_heads: 32,
        num_key_value_heads: 8,
        head_dim: 128,
        rope_theta: 1_000_000.0,
        rms_norm_eps: 1e-6,
        max_position_embeddings: 40960,
        tie_word_embeddings: false,
        attention_bias: false,
        qk_norm: true,
        bos_token_id: None,
        eos_token_ids: vec![151645],
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let target = qwen3_8b();
    let drafter = DFlashConfig::for_target(&target, &DFlashInitConfig::new(5, 16, 151669))?;
    let params: u64 = drafter.tensor_shapes().iter().map(|(_, s)| s.iter().product::<usize>() as u64).sum();
    let paper = MemoryShape {
        target: target.clone(),
        target_bytes_per_weight: 2.0,
        drafter_params: params,
        drafter_layers: 5,
        block_size: 16,
        num_anchors: 512,
        batch_sequences: 1,
        seq_len: 3072,
        num_taps: drafter.target_layer_ids.len(),
        chunk_rows: 512,
        compute: Precision::Bf16,
    };
    let gpus = [("24 GB (22.3 GiB)", 22.3), ("48 GB (44.7 GiB)", 44.7), ("H100 (78 GiB)", 78.0), ("H200 (139 GiB)", 139.0)];
    let variants = [
        ("paper: 512 anchors, 1 seq, chunk 512", paper.clone()),
        ("256 anchors", MemoryShape { num_anchors: 256, ..paper.clone() }),
        ("128 anchors", MemoryShape { num_anchors: 128, ..paper.clone() }),
        ("512 anchors, 1536-token sequences", MemoryShape { seq_len: 1536, ..paper.clone() }),
    ];
    println!("Qwen3-8B target, DFlash drafter 5 layers × block 16 ({:.2} G trainable params), bf16 compute\n", params as f64 / 1e9);
    println!("{}\n", MemoryPlan::new(&paper).table());
    println!("| shape | total | {} |", gpus.iter().map(|g| g.0).collect::<Vec<_>>().join(" | "));
    println!("|---|--:|{}", "--:|".repeat(gpus.len()));
    for (name, shape) in &variants {
        let plan = MemoryPlan::new(shape);
        let fits: Vec<&str> = gpus.iter().map(|(_, gib)| if plan.fits(*gib) { "fits" } else { "no" }).collect();
        println!("| {name} | {} | {} |", fmt_bytes(plan.total()), fits.join(" | "));
    }
    Ok(())
}
