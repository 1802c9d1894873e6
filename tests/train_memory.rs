//! The memory plan printed at the start of a run: the counts it is made of, checked by hand, and
//! the plan a real run prints.

use std::sync::Mutex;

use specauf::model::{Family, TargetConfig};
use specauf::train::memory::{target_params, MemoryPlan, MemoryShape, Precision};
use specauf::util::progress::Progress;

mod common;

fn smollm2_135m() -> TargetConfig {
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

#[test]
fn the_target_parameter_count_matches_the_published_one() {
    // HF reports 134,515,008 parameters for SmolLM2-135M (tied embeddings).
    assert_eq!(target_params(&smollm2_135m()), 134_515_008);
    // Untying adds the LM head; Qwen3's q/k norms add 2 × head_dim per layer.
    let mut c = smollm2_135m();
    c.tie_word_embeddings = false;
    c.qk_norm = true;
    assert_eq!(target_params(&c), 134_515_008 + 49152 * 576 + 30 * 2 * 64);
}

#[test]
fn each_line_of_the_plan_is_the_hand_computed_product() {
    let shape = MemoryShape {
        target: smollm2_135m(),
        target_bytes_per_weight: 2.0,
        drafter_params: 1000,
        drafter_layers: 2,
        block_size: 8,
        num_anchors: 4,
        batch_sequences: 3,
        seq_len: 100,
        num_taps: 2,
        chunk_rows: 20, // rounds down to 16 = two whole blocks
        compute: Precision::Bf16,
    };
    let plan = MemoryPlan::new(&shape);
    let get = |what: &str| plan.items.iter().find(|i| i.what == what).unwrap_or_else(|| panic!("no line {what}")).bytes;
    let (h, i, v) = (576u64, 1536u64, 49152u64);
    let rows = 4 * 8u64;
    assert_eq!(get("target weights"), 134_515_008 * 2);
    assert_eq!(get("LM head, f32 copy"), v * h * 4);
    assert_eq!(get("drafter weights, grads, AdamW"), 1000 * 16 + 1000 * 2);
    assert_eq!(get("attention (training)"), 6 * 9 * rows * 100 * 2 * 2 * 3);
    assert_eq!(get("layer activations"), (rows * (5 * h + 2 * 576 + 2 * 192 + 4 * i) + 100 * 4 * 192) * 2 * 2 * 3);
    assert_eq!(get("context features"), 100 * (2 * h + 2 * h) * 2 * 3);
    assert_eq!(get("LM head chunks"), 2 * 16 * v * 4);
    assert_eq!(plan.total(), plan.items.iter().map(|i| i.bytes).sum::<u64>());
    // f32 compute keeps no working copy; fits() leaves 10% headroom.
    let f32_plan = MemoryPlan::new(&MemoryShape { compute: Precision::F32, ..shape });
    assert_eq!(f32_plan.items.iter().find(|i| i.what == "drafter weights, grads, AdamW").unwrap().bytes, 16_000);
    let gib = plan.total() as f64 / (1u64 << 30) as f64;
    assert!(plan.fits(gib / 0.9 + 1e-6) && !plan.fits(gib));
    assert!(plan.table().contains("total (estimate)"));
}

#[derive(Default)]
struct Notes(Mutex<Vec<String>>);

impl Progress for Notes {
    fn note(&self, line: &str) {
        self.0.lock().unwrap().push(line.to_string());
    }
}

#[test]
fn a_training_run_prints_its_memory_plan_before_the_first_step() {
    let dir = tempfile::tempdir().unwrap();
    let (m, data) = common::prepared(dir.path(), 12);
    let mut cfg = common::tiny_train_config(&data, &dir.path().join("run"), &["steps=1"]);
    cfg.checkpoint_every = 1;
    let notes = Notes::default();
    let opts = specauf::train::trainer::RunOptions { resume: false, stop_after: None };
    specauf::train::trainer::train_with(&m, &cfg, &opts, &notes).unwrap();
    let notes = notes.0.into_inner().unwrap();
    let plan = notes.iter().find(|n| n.starts_with("memory plan")).expect("a memory plan note");
    for line in ["target weights", "drafter weights, grads, AdamW", "attention (training)", "LM head chunks", "total (estimate)"] {
        assert!(plan.contains(line), "{line} missing from\n{plan}");
    }
}
