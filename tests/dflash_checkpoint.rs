//! DFlash checkpoints: the z-lab / SpecForge format, round trips, and refusals with typed errors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use specauf::drafter::{DFlashConfig, DFlashDrafter, DFlashInitConfig, DrafterError};
use specauf::model::{load_target, ModelLocation, Target, TargetConfig, WeightsMode};

fn fixture(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models").join(family)
}

fn target(family: &str) -> Target {
    load_target(&ModelLocation::from_path(&fixture(family)).unwrap(), WeightsMode::F32).unwrap()
}

fn tensors(d: &DFlashDrafter) -> HashMap<String, Vec<f32>> {
    d.named_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

fn qwen3_drafter(target: &Target) -> DFlashDrafter {
    let mut init = DFlashInitConfig::new(2, 4, 5);
    init.target_layer_ids = Some(vec![1, 3]);
    DFlashDrafter::init_random(target.config(), &init, 7).unwrap()
}

#[test]
fn save_then_load_round_trips_exactly_with_the_published_names_and_shapes() {
    let target = target("qwen3");
    let d = qwen3_drafter(&target);
    let dir = tempfile::tempdir().unwrap();
    d.save(dir.path()).unwrap();
    let names: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    let mut names = names;
    names.sort();
    assert_eq!(names, ["config.json", "model.safetensors"], "no .tmp file left behind");

    // The safetensors file holds exactly DESIGN §2's names (no prefix, no embedding, no head).
    let raw = candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    let h = 64;
    let (q, kv, hd, i) = (4 * 32, 2 * 32, 32, 128);
    let mut want: Vec<(String, Vec<usize>)> = vec![("fc.weight".into(), vec![h, 2 * h]), ("hidden_norm.weight".into(), vec![h]), ("norm.weight".into(), vec![h])];
    for l in 0..2 {
        for (n, s) in [
            ("self_attn.q_proj.weight", vec![q, h]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.o_proj.weight", vec![h, q]),
            ("self_attn.q_norm.weight", vec![hd]),
            ("self_attn.k_norm.weight", vec![hd]),
            ("mlp.gate_proj.weight", vec![i, h]),
            ("mlp.up_proj.weight", vec![i, h]),
            ("mlp.down_proj.weight", vec![h, i]),
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
        ] {
            want.push((format!("layers.{l}.{n}"), s));
        }
    }
    assert_eq!(raw.len(), want.len());
    for (name, shape) in &want {
        let t = raw.get(name).unwrap_or_else(|| panic!("{name} missing from the checkpoint"));
        assert_eq!(t.dims(), shape.as_slice(), "{name}");
        assert_eq!(t.dtype(), DType::F32);
    }

    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(json["architectures"], serde_json::json!(["DFlashDraftModel"]));
    assert_eq!(json["model_type"], "qwen3");
    assert_eq!(json["block_size"], 4);
    assert_eq!(json["dflash_config"], serde_json::json!({"mask_token_id": 5, "target_layer_ids": [1, 3]}));
    assert_eq!(json["num_target_layers"], 4);

    let back = DFlashDrafter::load(dir.path(), target.config()).unwrap();
    assert_eq!(back.config(), d.config());
    let (a, b) = (tensors(&d), tensors(&back));
    assert_eq!(a.len(), b.len());
    for (name, v) in &a {
        let w = &b[name];
        assert!(v.iter().zip(w).all(|(x, y)| x.to_bits() == y.to_bits()), "{name} changed in the round trip");
    }
}

#[test]
fn load_reads_bf16_and_f16_checkpoints_as_f32() {
    let target = target("qwen3");
    let d = qwen3_drafter(&target);
    for dtype in [DType::BF16, DType::F16] {
        let dir = tempfile::tempdir().unwrap();
        d.save(dir.path()).unwrap();
        let half: HashMap<String, Tensor> =
            d.named_vars().into_iter().map(|(n, v)| (n, v.as_tensor().to_dtype(dtype).unwrap())).collect();
        candle_core::safetensors::save(&half, dir.path().join("model.safetensors")).unwrap();
        let back = DFlashDrafter::load(dir.path(), target.config()).unwrap();
        for (name, var) in back.named_vars() {
            let got: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let want: Vec<f32> = half[&name].to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(got, want, "{dtype:?} {name}");
        }
    }
}

fn saved(target: &Target, init: DFlashInitConfig) -> tempfile::TempDir {
    let d = DFlashDrafter::init_random(target.config(), &init, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    d.save(dir.path()).unwrap();
    dir
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn loading_against_a_mismatched_target_fails_with_a_typed_error() {
    let qwen3 = target("qwen3");
    let mut init = DFlashInitConfig::new(1, 4, 5);
    init.target_layer_ids = Some(vec![0, 3]);
    let dir = saved(&qwen3, init);

    // Another hidden size.
    let mut wide: TargetConfig = qwen3.config().clone();
    wide.hidden_size = 128;
    let err = DFlashDrafter::load(dir.path(), &wide).unwrap_err();
    assert!(matches!(err, DrafterError::HiddenSizeMismatch { drafter: 64, target: 128 }), "{err}");

    // Another vocabulary.
    let mut vocab: TargetConfig = qwen3.config().clone();
    vocab.vocab_size = 300;
    let err = DFlashDrafter::load(dir.path(), &vocab).unwrap_err();
    assert!(matches!(err, DrafterError::VocabMismatch { drafter: 256, target: 300 }), "{err}");

    // A tapped layer the target does not have: the llama fixture has 3 layers, the drafter taps 3.
    let llama = target("llama");
    let err = DFlashDrafter::load(dir.path(), llama.config()).unwrap_err();
    assert!(matches!(err, DrafterError::TargetLayerOutOfRange { layer: 3, target_layers: 3 }), "{err}");
    assert!(err.to_string().contains("layer 3"), "{err}");

    // Layers in range but trained for a deeper target.
    let mut init = DFlashInitConfig::new(1, 4, 5);
    init.target_layer_ids = Some(vec![0, 2]);
    let dir2 = saved(&qwen3, init);
    let err = DFlashDrafter::load(dir2.path(), llama.config()).unwrap_err();
    assert!(matches!(err, DrafterError::TargetDepthMismatch { drafter: 4, target: 3 }), "{err}");

    // A mask token outside the vocabulary.
    edit_config(dir.path(), |v| v["dflash_config"]["mask_token_id"] = 256.into());
    let err = DFlashDrafter::load(dir.path(), qwen3.config()).unwrap_err();
    assert!(matches!(err, DrafterError::MaskTokenOutOfRange { mask_token_id: 256, vocab: 256 }), "{err}");

    // Building one for a target fails the same way.
    let err = DFlashDrafter::init_random_for(qwen3.config(), 1, 4, 400, 0).unwrap_err();
    assert!(matches!(err, DrafterError::MaskTokenOutOfRange { mask_token_id: 400, vocab: 256 }), "{err}");
}

#[test]
fn tensors_of_the_wrong_shape_missing_or_extra_are_refused_by_name() {
    let target = target("qwen3");
    let d = qwen3_drafter(&target);
    let dir = tempfile::tempdir().unwrap();
    d.save(dir.path()).unwrap();
    let full: HashMap<String, Tensor> = d.named_vars().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
    let weights = dir.path().join("model.safetensors");

    // fc input must be n_taps·H: a config claiming three taps does not fit a two-tap fc.
    edit_config(dir.path(), |v| v["dflash_config"]["target_layer_ids"] = serde_json::json!([0, 1, 3]));
    let err = DFlashDrafter::load(dir.path(), target.config()).unwrap_err();
    match &err {
        DrafterError::ShapeMismatch { name, expected, got, .. } => {
            assert_eq!(name, "fc.weight");
            assert_eq!((expected.as_slice(), got.as_slice()), (&[64usize, 192][..], &[64usize, 128][..]));
        }
        other => panic!("expected a shape mismatch on fc.weight, got {other}"),
    }
    edit_config(dir.path(), |v| v["dflash_config"]["target_layer_ids"] = serde_json::json!([1, 3]));

    let mut missing = full.clone();
    missing.remove("layers.1.self_attn.k_norm.weight");
    candle_core::safetensors::save(&missing, &weights).unwrap();
    let err = DFlashDrafter::load(dir.path(), target.config()).unwrap_err();
    assert!(matches!(&err, DrafterError::MissingTensor { name, .. } if name == "layers.1.self_attn.k_norm.weight"), "{err}");

    let mut extra = full.clone();
    extra.insert("lm_head.weight".into(), Tensor::zeros((256, 64), DType::F32, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&extra, &weights).unwrap();
    let err = DFlashDrafter::load(dir.path(), target.config()).unwrap_err();
    assert!(matches!(&err, DrafterError::UnexpectedTensor { name, .. } if name == "lm_head.weight"), "{err}");

    let mut ints = full.clone();
    ints.insert("norm.weight".into(), Tensor::zeros(64, DType::U32, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&ints, &weights).unwrap();
    let err = DFlashDrafter::load(dir.path(), target.config()).unwrap_err();
    assert!(matches!(&err, DrafterError::UnsupportedDtype { name, .. } if name == "norm.weight"), "{err}");

    // A cut-off file, a header length past its end, and garbage are refused by the reader, not
    // read short or allocated blindly.
    candle_core::safetensors::save(&full, &weights).unwrap();
    let good = std::fs::read(&weights).unwrap();
    let mut huge = good.clone();
    huge[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    for bytes in [&good[..good.len() - 5], &huge[..], &b"not a safetensors file"[..]] {
        std::fs::write(&weights, bytes).unwrap();
        let err = DFlashDrafter::load(dir.path(), target.config()).unwrap_err();
        assert!(matches!(&err, DrafterError::Json { what, .. } if what.contains("not a readable safetensors file")), "{err}");
    }
}

#[test]
fn our_drafter_config_refuses_an_unknown_key_and_names_it() {
    let ok = DFlashInitConfig::from_json_str(r#"{"num_hidden_layers": 2, "block_size": 8, "mask_token_id": 16}"#, "train.json").unwrap();
    assert_eq!((ok.num_hidden_layers, ok.block_size, ok.mask_token_id, ok.target_layer_ids), (2, 8, 16, None));
    let defaults = DFlashInitConfig::from_json_str(r#"{"mask_token_id": 16}"#, "train.json").unwrap();
    // One source of the defaults: the drafter module's, which the training config also reads.
    assert_eq!((defaults.num_hidden_layers, defaults.block_size), (specauf::drafter::DEFAULT_LAYERS, specauf::drafter::DEFAULT_BLOCK_SIZE));
    let err = DFlashInitConfig::from_json_str(r#"{"num_layers": 2, "mask_token_id": 16}"#, "train.json").unwrap_err();
    assert!(err.to_string().contains("num_layers"), "{err}");
}

#[test]
fn a_checkpoint_config_with_an_unknown_key_is_refused_with_the_key_named() {
    let target = target("qwen3");
    let dir = saved(&target, {
        let mut i = DFlashInitConfig::new(1, 4, 5);
        i.target_layer_ids = Some(vec![1]);
        i
    });
    edit_config(dir.path(), |v| v["use_tree_pos_emb"] = true.into());
    let err = DFlashDrafter::load(dir.path(), target.config()).unwrap_err();
    assert!(matches!(&err, DrafterError::UnknownConfigKey { key, .. } if key == "use_tree_pos_emb"), "{err}");
    assert!(err.to_string().contains("use_tree_pos_emb"));
    edit_config(dir.path(), |v| {
        v.as_object_mut().unwrap().remove("use_tree_pos_emb");
        v["dflash_config"]["selector_rank"] = 256.into();
    });
    let err = DFlashDrafter::load(dir.path(), target.config()).unwrap_err();
    assert!(matches!(&err, DrafterError::UnknownConfigKey { key, .. } if key == "dflash_config.selector_rank"), "{err}");
}

/// The shape of a published z-lab config.json (Qwen3-8B-DFlash-b16 style), HF bookkeeping keys
/// included.
const PUBLISHED: &str = r#"{
  "architectures": ["DFlashDraftModel"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
  "block_size": 16,
  "bos_token_id": 151643,
  "dflash_config": {"mask_token_id": 151669, "target_layer_ids": [1, 9, 17, 25, 33]},
  "dtype": "bfloat16",
  "eos_token_id": 151645,
  "head_dim": 128,
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 12288,
  "layer_types": ["full_attention", "full_attention", "full_attention", "full_attention", "full_attention"],
  "max_position_embeddings": 40960,
  "max_window_layers": 5,
  "model_type": "qwen3",
  "num_attention_heads": 32,
  "num_hidden_layers": 5,
  "num_key_value_heads": 8,
  "num_target_layers": 36,
  "rms_norm_eps": 1e-06,
  "rope_scaling": null,
  "rope_theta": 1000000,
  "sliding_window": null,
  "tie_word_embeddings": false,
  "transformers_version": "4.57.1",
  "use_cache": true,
  "use_sliding_window": false,
  "vocab_size": 151936
}"#;

#[test]
fn a_published_config_with_hf_bookkeeping_keys_is_read() {
    let cfg = DFlashConfig::from_json_str(PUBLISHED, "config.json").unwrap();
    assert_eq!(cfg.block_size, 16);
    assert_eq!(cfg.mask_token_id, 151669);
    assert_eq!(cfg.target_layer_ids, [1, 9, 17, 25, 33]);
    assert_eq!(cfg.num_target_layers, Some(36));
    assert_eq!((cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim), (4096, 32, 8, 128));
    assert_eq!(cfg.rope_theta, 1e6);
    assert_eq!(cfg.fc_in(), 5 * 4096);
    // Our writer's output reads back to the same config.
    assert_eq!(DFlashConfig::from_json_str(&cfg.to_json(), "ours").unwrap(), cfg);

    // Newer configs keep block_size inside dflash_config; transformers 5 nests rope_theta.
    let mut v: serde_json::Value = serde_json::from_str(PUBLISHED).unwrap();
    let obj = v.as_object_mut().unwrap();
    obj.remove("block_size");
    obj.remove("rope_theta");
    obj.insert("rope_parameters".into(), serde_json::json!({"rope_type": "default", "rope_theta": 5e5}));
    v["dflash_config"]["block_size"] = 10.into();
    let cfg = DFlashConfig::from_json_str(&v.to_string(), "config.json").unwrap();
    assert_eq!((cfg.block_size, cfg.rope_theta), (10, 5e5));

    // Without target_layer_ids the reference default over num_target_layers applies.
    v["dflash_config"].as_object_mut().unwrap().remove("target_layer_ids");
    let cfg = DFlashConfig::from_json_str(&v.to_string(), "config.json").unwrap();
    assert_eq!(cfg.target_layer_ids, [1, 9, 17, 25, 33]);
}

#[test]
fn settings_the_drafter_does_not_implement_are_refused() {
    for (key, value, needle) in [
        ("use_sliding_window", serde_json::json!(true), "sliding"),
        ("rope_scaling", serde_json::json!({"rope_type": "yarn", "factor": 4.0}), "yarn"),
        ("attention_bias", serde_json::json!(true), "attention_bias"),
        ("hidden_act", serde_json::json!("gelu"), "gelu"),
        ("architectures", serde_json::json!(["DFlash2DraftModel"]), "DFlash2DraftModel"),
    ] {
        let mut v: serde_json::Value = serde_json::from_str(PUBLISHED).unwrap();
        v[key] = value;
        let err = DFlashConfig::from_json_str(&v.to_string(), "config.json").unwrap_err();
        assert!(matches!(err, DrafterError::Unsupported { .. }), "{key}: {err}");
        assert!(err.to_string().contains(needle), "{key}: {err}");
    }
    let mut v: serde_json::Value = serde_json::from_str(PUBLISHED).unwrap();
    v["dflash_config"]["block_size"] = 8.into();
    let err = DFlashConfig::from_json_str(&v.to_string(), "config.json").unwrap_err();
    assert!(err.to_string().contains("disagree"), "{err}");
}

#[test]
fn init_is_reproducible_from_the_seed_and_hf_like() {
    let target = target("llama");
    let a = DFlashDrafter::init_random_for(target.config(), 2, 8, 16, 42).unwrap();
    let b = DFlashDrafter::init_random_for(target.config(), 2, 8, 16, 42).unwrap();
    let c = DFlashDrafter::init_random_for(target.config(), 2, 8, 16, 43).unwrap();
    assert_eq!(tensors(&a), tensors(&b));
    assert_ne!(tensors(&a)["fc.weight"], tensors(&c)["fc.weight"]);
    // Default taps over a 3-layer target with 2 drafter layers: round(1 + i·(3-4)/1) = [1, 0].
    assert_eq!(a.target_layer_ids(), [1, 0]);
    for (name, v) in tensors(&a) {
        if name.ends_with("norm.weight") {
            assert!(v.iter().all(|&x| x == 1.0), "{name} must start at 1");
        } else {
            let n = v.len() as f64;
            let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
            let std = (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
            assert!(mean.abs() < 0.002 && (std - 0.02).abs() < 0.002, "{name}: mean {mean}, std {std}");
        }
    }
}
