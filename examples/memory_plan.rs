//! The training memory plan (`src/train/memory.rs`) next to what it was calibrated on, and at the
//! paper's shape.
//!
//! 1. SmolLM2-135M with a DFlash drafter (block 16, one 512- or 256-token sequence, q8 target on
//!    the CPU) at the shapes `specauf bench train` measured: the plan's total beside the measured
//!    peak RSS, passed as LAYERS:ANCHORS:SEQ:MIB arguments.
//! 2. The paper's shape: Qwen3-8B target in bf16, a 5-layer block-16 drafter, one 3072-token
//!    sequence per GPU, 512 / 256 / 128 anchors, with and without activation checkpointing, and
//!    which GPU sizes each fits (10% left for the allocator and the runtime). Computed, never
//!    measured on a GPU.
//!
//! cargo run --release --example memory_plan -- 4:128:512:3137 2:128:512:1990 4:64:512:2020 4:128:256:2509 4:128:512:1673:ckpt

use specauf::drafter::{DFlashConfig, DFlashInitConfig};
use specauf::model::{Family, TargetConfig};
use specauf::train::memory::{MemoryPlan, MemoryShape};

const GIB: f64 = (1u64 << 30) as f64;

fn smollm2() -> TargetConfig {
    TargetConfig {
        family: Family::Llama,
        vocab_size: 49152,
        hidden_size: 576,
        intermediate_size: 1536,
        num_hidden_layers: 30,
        num_attention_heads: 9,
        num_key_value_heads: 3,
        head_dim: 64,
        rope_theta: 100000.0,
        rms_norm_eps: 1e-5,
        max_position_embeddings: 8192,
        tie_word_embeddings: true,
        attention_bias: false,
        qk_norm: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    }
}

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

fn shape(target: &TargetConfig, layers: usize, anchors: usize, seq_len: usize, weight_bytes: f64, generic_head: bool) -> MemoryShape {
    let d = DFlashConfig::for_target(target, &DFlashInitConfig::new(layers, 16, 5)).expect("a drafter config");
    MemoryShape {
        target: target.clone(),
        weight_bytes,
        drafter_layers: layers,
        drafter_parameters: d.tensor_shapes().iter().map(|(_, s)| s.iter().product::<usize>()).sum(),
        taps: d.target_layer_ids.len(),
        block_size: 16,
        anchors,
        seq_len,
        batch_sequences: 1,
        chunk_rows: 512,
        generic_head,
        activation_checkpointing: false,
    }
}

fn total(p: &MemoryPlan) -> f64 {
    (p.device_bytes() + p.host_bytes()) / GIB
}

fn main() {
    println!("SmolLM2-135M on the CPU (q8 target, f32 training): plan vs measured peak RSS\n");
    println!("| layers | anchors | tokens | activation checkpointing | plan GiB | measured GiB | plan ÷ measured |");
    println!("|--:|--:|--:|---|--:|--:|--:|");
    for arg in std::env::args().skip(1) {
        let ckpt = arg.ends_with(":ckpt");
        let v: Vec<f64> = arg.trim_end_matches(":ckpt").split(':').filter_map(|x| x.parse().ok()).collect();
        let [l, a, t, mib] = v[..] else {
            eprintln!("skipping {arg}: give LAYERS:ANCHORS:SEQ:MIB[:ckpt]");
            continue;
        };
        // The online target pass is not in a bench step (features are computed once, before it).
        let s = MemoryShape { activation_checkpointing: ckpt, ..shape(&smollm2(), l as usize, a as usize, t as usize, 34.0 / 32.0, false) };
        let p = s.plan();
        let online = p.lines.iter().find(|x| x.what.starts_with("online")).map_or(0.0, |x| x.bytes) / GIB;
        let planned = total(&p) - online;
        println!("| {l} | {a} | {t} | {} | {planned:.2} | {:.2} | {:.2} |", if ckpt { "yes" } else { "no" }, mib / 1024.0, planned / (mib / 1024.0));
    }
    println!("\nQwen3-8B, 5-layer block-16 drafter, 3072-token sequence, bf16 compute (GPU total; AdamW state in host memory)\n");
    let gpus = [("24 GB", 22.3), ("48 GB", 44.7), ("H100 80 GB", 78.0), ("H200 141 GB", 139.0)];
    println!("| anchors | activation checkpointing | activations GiB | GPU total GiB | {} |", gpus.map(|g| g.0).join(" | "));
    println!("|--:|---|--:|--:|{}", "--:|".repeat(gpus.len()));
    for anchors in [512, 256, 128] {
        for ckpt in [false, true] {
            let s = MemoryShape { activation_checkpointing: ckpt, ..shape(&qwen3_8b(), 5, anchors, 3072, 2.0, true) };
            let p = s.plan();
            let acts = p.lines.iter().find(|x| x.what.starts_with("drafter activations")).map_or(0.0, |x| x.bytes) / GIB;
            let dev = p.device_bytes() / GIB;
            let fits: Vec<&str> = gpus.iter().map(|(_, g)| if dev <= 0.9 * g { "fits" } else { "no" }).collect();
            println!("| {anchors} | {} | {acts:.1} | {dev:.1} | {} |", if ckpt { "yes" } else { "no" }, fits.join(" | "));
        }
    }
}
