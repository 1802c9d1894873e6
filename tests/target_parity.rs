//! Parity of the target runtime with HF transformers, on tiny random models written by
//! tools/make_model_fixtures.py (see tools/README.md), and the KV-cache rollback contract.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use specauf::model::{load_target, Logits, ModelError, ModelLocation, Target, WeightsMode};

fn fixture(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models").join(family)
}

fn expected(family: &str, file: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(family).join(file), &Device::Cpu).expect("fixture readable")
}

fn ids_of(exp: &std::collections::HashMap<String, Tensor>) -> Vec<u32> {
    exp["input_ids"].to_vec1::<i64>().unwrap().into_iter().map(|x| x as u32).collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn load(path: PathBuf, mode: WeightsMode) -> Target {
    load_target(&ModelLocation::from_path(&path).unwrap(), mode).unwrap()
}

fn check_logits(what: &str, target: &Target, exp_file: &str, family: &str, tol: f32) {
    let exp = expected(family, exp_file);
    let ids = ids_of(&exp);
    let mut cache = target.new_cache();
    let out = target.forward(&ids, &mut cache, &[], Logits::All).unwrap();
    let d = max_diff(out.logits.as_ref().unwrap(), &exp["logits"]);
    println!("{what}: max |Δlogit| vs {family}/{exp_file} = {d:.3e} (tol {tol:.0e})");
    assert!(
        d < tol,
        "{what}: logits differ from HF by {d}; check RoPE convention, Q/K permutation, norms and biases"
    );
}

#[test]
fn hf_dirs_match_transformers_logits_and_hidden_states() {
    for family in ["llama", "qwen2", "qwen3"] {
        let target = load(fixture(family), WeightsMode::F32);
        let exp = expected(family, "expected.safetensors");
        let ids = ids_of(&exp);
        let layers = target.config().num_hidden_layers;
        let taps: Vec<usize> = (0..layers).collect();
        let mut cache = target.new_cache();
        let out = target.forward(&ids, &mut cache, &taps, Logits::All).unwrap();
        let d = max_diff(out.logits.as_ref().unwrap(), &exp["logits"]);
        println!("{family}: max |Δlogit| = {d:.3e}");
        assert!(d < 1e-4, "{family}: logits differ from HF by {d}");
        // HF hidden_states[i+1] is the raw output of layer i, except the last entry, which has
        // the final norm applied; the raw last layer is stored separately.
        for i in 0..layers {
            let want = if i + 1 < layers {
                exp[&format!("hidden_states.{}", i + 1)].clone()
            } else {
                exp["last_layer_output_pre_norm"].clone()
            };
            let d = max_diff(&out.taps[i], &want);
            println!("{family}: tap {i}: max |Δ| = {d:.3e}");
            assert!(d < 1e-4, "{family}: tap of layer {i} differs from HF hidden_states[{}] by {d}", i + 1);
        }
    }
}

#[test]
fn gguf_files_match_transformers_including_llama_qk_permutation() {
    for family in ["llama", "qwen2"] {
        let dir = fixture(family);
        check_logits("f32 gguf, f32 mode", &load(dir.join("tiny-f32.gguf"), WeightsMode::F32), "expected.safetensors", family, 1e-4);
        check_logits("q8_0 gguf, f32 mode", &load(dir.join("tiny-q8_0.gguf"), WeightsMode::F32), "expected_q8_0.safetensors", family, 1e-4);
        check_logits("q4_0 gguf, f32 mode", &load(dir.join("tiny-q4_0.gguf"), WeightsMode::F32), "expected_q4_0.safetensors", family, 1e-4);
        // QMatMul quantizes activations to Q8 too; the *_actq references emulate that.
        check_logits("q8_0 gguf, native mode", &load(dir.join("tiny-q8_0.gguf"), WeightsMode::Native), "expected_q8_0_actq.safetensors", family, 2e-3);
        check_logits("q4_0 gguf, native mode", &load(dir.join("tiny-q4_0.gguf"), WeightsMode::Native), "expected_q4_0_actq.safetensors", family, 2e-3);
    }
}

#[test]
fn default_weights_mode_matches_a_quantized_reference_and_keeps_the_argmax() {
    // The default mode quantizes weights to Q8_0 and candle's QMatMul quantizes activations to
    // Q8 as well; expected_q8_0_actq emulates exactly that in numpy.
    for family in ["llama", "qwen2"] {
        let target = load(fixture(family).join("tiny-q8_0.gguf"), WeightsMode::default());
        check_logits("q8_0 gguf, default mode", &target, "expected_q8_0_actq.safetensors", family, 2e-3);
    }
    for family in ["llama", "qwen2", "qwen3"] {
        let target = load(fixture(family), WeightsMode::default());
        let exp = expected(family, "expected.safetensors");
        let ids = ids_of(&exp);
        let mut cache = target.new_cache();
        let got = target.forward(&ids, &mut cache, &[], Logits::All).unwrap().logits.unwrap();
        let d = max_diff(&got, &exp["logits"]);
        let a = got.argmax(1).unwrap().to_vec1::<u32>().unwrap();
        let b = exp["logits"].argmax(1).unwrap().to_vec1::<u32>().unwrap();
        let agree = a.iter().zip(&b).filter(|(x, y)| x == y).count();
        println!("{family}: default mode vs f32 HF: max |Δlogit| {d:.3e}, argmax agrees at {agree}/{}", a.len());
        assert!(d < 0.5, "{family}: default mode is {d} away from the f32 reference");
        assert!(agree + 1 >= a.len(), "{family}: default mode changes the argmax at {} positions", a.len() - agree);
    }
}

fn all_modes() -> [WeightsMode; 2] {
    [WeightsMode::F32, WeightsMode::default()]
}

#[test]
fn kv_rollback_is_exact_after_a_rejected_draft() {
    for family in ["llama", "qwen2", "qwen3"] {
        for mode in all_modes() {
            let target = load(fixture(family), mode);
            let ids: Vec<u32> = (0..13).map(|i| (i * 37 + 11) % 256).collect();
            let draft: Vec<u32> = vec![3, 250, 17, 99, 42];
            // prefill 8, verify 5 (of which the last 3 are rejected), truncate to 10, feed 3
            let mut cache = target.new_cache();
            target.forward(&ids[..8], &mut cache, &[], Logits::None).unwrap();
            let mut block = ids[8..10].to_vec();
            block.extend(&draft[2..]);
            target.forward(&block, &mut cache, &[], Logits::All).unwrap();
            cache.truncate(10);
            assert_eq!(cache.len(), 10);
            let got = target.forward(&ids[10..13], &mut cache, &[], Logits::All).unwrap().logits.unwrap();
            let mut fresh = target.new_cache();
            let want = target.forward(&ids, &mut fresh, &[], Logits::All).unwrap().logits.unwrap().narrow(0, 10, 3).unwrap();
            let d = max_diff(&got, &want);
            println!("{family} {mode:?}: rollback max |Δlogit| = {d:.3e}");
            assert!(d < 1e-4, "{family} {mode:?}: logits after rollback differ from a fresh prefill by {d}");
        }
    }
}

#[test]
fn chunked_forward_equals_token_by_token_forward() {
    for family in ["llama", "qwen2", "qwen3"] {
        for mode in all_modes() {
            let target = load(fixture(family), mode);
            let ids: Vec<u32> = (0..11).map(|i| (i * 53 + 7) % 256).collect();
            let mut c1 = target.new_cache();
            let chunked = target.forward(&ids, &mut c1, &[0], Logits::All).unwrap();
            let mut c2 = target.new_cache();
            let mut rows = Vec::new();
            let mut taps = Vec::new();
            for &t in &ids {
                let o = target.forward(&[t], &mut c2, &[0], Logits::All).unwrap();
                rows.push(o.logits.unwrap());
                taps.push(o.taps[0].clone());
            }
            let d = max_diff(chunked.logits.as_ref().unwrap(), &Tensor::cat(&rows, 0).unwrap());
            let dt = max_diff(&chunked.taps[0], &Tensor::cat(&taps, 0).unwrap());
            println!("{family} {mode:?}: chunked vs token-by-token max |Δlogit| = {d:.3e}, tap {dt:.3e}");
            assert!(d < 1e-4 && dt < 1e-4, "{family} {mode:?}: chunked forward differs by {d} (taps {dt})");
        }
    }
}

#[test]
fn bad_inputs_give_clear_errors() {
    let target = load(fixture("qwen3"), WeightsMode::F32);
    let mut cache = target.new_cache();
    assert!(matches!(target.forward(&[], &mut cache, &[], Logits::All), Err(ModelError::EmptyInput)));
    assert!(matches!(target.forward(&[256], &mut cache, &[], Logits::All), Err(ModelError::TokenOutOfRange { token: 256, .. })));
    assert!(matches!(target.forward(&[1], &mut cache, &[4], Logits::All), Err(ModelError::LayerOutOfRange { layer: 4, .. })));
    let long: Vec<u32> = vec![1; 513];
    let err = target.forward(&long, &mut cache, &[], Logits::Last).unwrap_err();
    assert!(matches!(err, ModelError::ContextOverflow { needed: 513, max: 512 }), "{err}");
    assert!(err.to_string().contains("shorter prompt"));
    assert_eq!(cache.len(), 0, "a failed forward must not advance the cache");

    let tmp = tempfile::tempdir().unwrap();
    // truncated GGUF
    let bytes = std::fs::read(fixture("llama").join("tiny-f32.gguf")).unwrap();
    let cut = tmp.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_target(&ModelLocation::from_path(&cut).unwrap(), WeightsMode::F32).unwrap_err();
    println!("truncated gguf: {err}");
    assert!(err.to_string().contains("truncated"), "{err}");
    // not a gguf at all
    let junk = tmp.path().join("junk.gguf");
    std::fs::write(&junk, b"hello").unwrap();
    let err = load_target(&ModelLocation::from_path(&junk).unwrap(), WeightsMode::F32).unwrap_err();
    assert!(matches!(err, ModelError::Corrupt { .. }), "{err}");
    // missing path, dir without config
    assert!(ModelLocation::from_path(&tmp.path().join("nope")).is_err());
    let err = ModelLocation::from_path(tmp.path()).unwrap_err();
    assert!(err.to_string().contains("config.json"), "{err}");
    // unsupported family and truncated safetensors
    let dir = tmp.path().join("m");
    std::fs::create_dir(&dir).unwrap();
    let cfg = std::fs::read_to_string(fixture("qwen3").join("config.json")).unwrap();
    std::fs::write(dir.join("config.json"), cfg.replace("\"qwen3\"", "\"gpt_neox\"")).unwrap();
    std::fs::copy(fixture("qwen3").join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    let err = load_target(&ModelLocation::from_path(&dir).unwrap(), WeightsMode::F32).unwrap_err();
    assert!(matches!(err, ModelError::Unsupported { .. }), "{err}");
    std::fs::write(dir.join("config.json"), &cfg).unwrap();
    let st = std::fs::read(fixture("qwen3").join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &st[..st.len() - 1000]).unwrap();
    let err = load_target(&ModelLocation::from_path(&dir).unwrap(), WeightsMode::F32).unwrap_err();
    println!("truncated safetensors: {err}");
    assert!(matches!(err, ModelError::Corrupt { .. }), "{err}");
}

/// The CPU kernel path runs its layers on host buffers (`host_ops`); the tensor-op layers it
/// replaced are kept as the reference. Both must give the same bits: logits and every tap, for
/// a prefill long enough that the row-parallel splits engage, a verify-sized chunk after it,
/// and a two-sequence batch.
#[test]
fn the_host_layer_forward_has_the_bits_of_the_tensor_layers() {
    let cases = [
        ("llama", fixture("llama"), WeightsMode::default()),
        ("qwen2 (q/k/v biases)", fixture("qwen2"), WeightsMode::default()),
        ("qwen3 (q/k norms)", fixture("qwen3"), WeightsMode::default()),
        ("llama gguf native", fixture("llama").join("tiny-q8_0.gguf"), WeightsMode::Native),
        ("qwen2 gguf native", fixture("qwen2").join("tiny-q8_0.gguf"), WeightsMode::Native),
    ];
    let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    for (what, path, mode) in cases {
        let loaded = load(path, mode);
        assert!(loaded.host_layers(), "{what}: the host layer forward should apply");
        assert!(loaded.team_layers(), "{what}: the layers should run in a team");
        // Host layers run by a team where they can (`util::team`), else dispatched matmul by
        // matmul; the dispatched path is checked on its own below.
        let host = loaded.clone().waiting_for_team();
        let tensor = loaded.clone().with_tensor_layers();
        let layers = host.config().num_hidden_layers;
        let taps: Vec<usize> = (0..layers).collect();
        let ids: Vec<u32> = (0..48).map(|i| (i * 53 + 7) % 256).collect();
        let (mut ch, mut ct) = (host.new_cache(), tensor.new_cache());
        for chunk in [&ids[..40], &ids[40..]] {
            let a = host.forward(chunk, &mut ch, &taps, Logits::All).unwrap();
            let b = tensor.forward(chunk, &mut ct, &taps, Logits::All).unwrap();
            assert_eq!(bits(a.logits.as_ref().unwrap()), bits(b.logits.as_ref().unwrap()), "{what}: logits of a {}-token chunk", chunk.len());
            for (l, (x, y)) in a.taps.iter().zip(&b.taps).enumerate() {
                assert_eq!(bits(x), bits(y), "{what}: tap {l} of a {}-token chunk", chunk.len());
            }
        }
        let (mut h1, mut h2, mut t1, mut t2) = (host.new_cache(), host.new_cache(), tensor.new_cache(), tensor.new_cache());
        let batch = |target: &Target, c1: &mut specauf::model::KvCache, c2: &mut specauf::model::KvCache| {
            let mut items = [
                specauf::model::BatchItem { tokens: &ids[..5], cache: c1, taps: &[0], logits: Logits::All },
                specauf::model::BatchItem { tokens: &ids[9..12], cache: c2, taps: &[0], logits: Logits::Last },
            ];
            target.forward_batch(&mut items).unwrap()
        };
        let (a, b) = (batch(&host, &mut h1, &mut h2), batch(&tensor, &mut t1, &mut t2));
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert_eq!(bits(x.logits.as_ref().unwrap()), bits(y.logits.as_ref().unwrap()), "{what}: batch item {i} logits");
            assert_eq!(bits(&x.taps[0]), bits(&y.taps[0]), "{what}: batch item {i} tap");
        }
        // The dispatched host path (the team's fallback) has the same bits too.
        let pool = loaded.with_pool_layers();
        assert!(!pool.team_layers());
        let (mut p1, mut p2) = (pool.new_cache(), pool.new_cache());
        let c = batch(&pool, &mut p1, &mut p2);
        for (i, (x, y)) in c.iter().zip(&b).enumerate() {
            assert_eq!(bits(x.logits.as_ref().unwrap()), bits(y.logits.as_ref().unwrap()), "{what}: dispatched batch item {i} logits");
            assert_eq!(bits(&x.taps[0]), bits(&y.taps[0]), "{what}: dispatched batch item {i} tap");
        }
    }
}

#[test]
fn the_default_mode_keeps_q8_0_and_q4_1_gguf_matrices_as_stored_and_quantizes_the_rest() {
    for family in ["llama", "qwen2"] {
        let dir = fixture(family);
        // Q8_0 matrices: kept as stored.
        assert_eq!(load(dir.join("tiny-q8_0.gguf"), WeightsMode::Auto).weights_mode(), WeightsMode::Native);
        // Q4_0 has no batch-invariant kernel as stored, and f32 matrices would stay dense: int8 blocks.
        assert_eq!(load(dir.join("tiny-q4_0.gguf"), WeightsMode::Auto).weights_mode(), WeightsMode::Q8);
        assert_eq!(load(dir.join("tiny-f32.gguf"), WeightsMode::Auto).weights_mode(), WeightsMode::Q8);
        // Safetensors: int8 blocks.
        assert_eq!(load(dir.clone(), WeightsMode::Auto).weights_mode(), WeightsMode::Q8);
        // An explicit mode is kept.
        assert_eq!(load(dir.join("tiny-q8_0.gguf"), WeightsMode::Q8).weights_mode(), WeightsMode::Q8);
        assert_eq!(load(dir.join("tiny-q4_0.gguf"), WeightsMode::Native).weights_mode(), WeightsMode::Native);
    }
    assert_eq!(WeightsMode::default(), WeightsMode::Auto);
    assert_eq!("auto".parse::<WeightsMode>().unwrap(), WeightsMode::Auto);
}
