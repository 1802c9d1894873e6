//! The trainer end to end on the tiny llama fixture target: resume is bit-exact, a tiny drafter
//! overfits a tiny fixed set, every trainable tensor gets a gradient, bad configs are refused.

use specauf::train::config::TrainConfig;
use specauf::train::trainer::{train, RunOptions};

mod common;
use common::{prepared, read_metrics as metrics, tiny_train_config as config};

#[test]
fn resume_after_an_interruption_reproduces_the_uninterrupted_run_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, data) = prepared(tmp.path(), 12);
    let extra = ["steps=7", "checkpoint_every=2", "eval_every=3"];
    let a = tmp.path().join("a");
    train(&m, &config(&data, &a, &extra), &RunOptions::default()).unwrap();
    // "killed" after step 5: the last checkpoint is step 4, so step 5 is redone on resume
    let b = tmp.path().join("b");
    let cfg_b = config(&data, &b, &extra);
    let stopped = train(&m, &cfg_b, &RunOptions { stop_after: Some(5), ..Default::default() }).unwrap();
    assert_eq!(stopped.steps_done, 5);
    assert!(stopped.final_dir.is_none());
    let err = train(&m, &cfg_b, &RunOptions::default()).unwrap_err();
    assert!(err.to_string().contains("--resume"), "{err}");
    train(&m, &cfg_b, &RunOptions { resume: true, ..Default::default() }).unwrap();
    let (ma, mb) = (metrics(&a), metrics(&b));
    assert_eq!(ma.len(), 7);
    assert_eq!(ma, mb, "metrics of the resumed run differ from the uninterrupted run");
    let wa = std::fs::read(a.join("final/model.safetensors")).unwrap();
    let wb = std::fs::read(b.join("final/model.safetensors")).unwrap();
    assert!(wa == wb, "final weights differ after resume");
    // the draft vocabulary of the training data is saved beside the weights, and loads with them
    let vocab = m.target.config().vocab_size;
    let v = specauf::drafter::DraftVocab::read(&a.join("final"), vocab).unwrap().expect("train writes draft_vocab.json");
    let ds = specauf::data::Dataset::open(&data, specauf::data::Split::Train).unwrap();
    assert_eq!(v.tokens as usize, ds.loss_tokens());
    assert_eq!(v.ids.len(), ds.loss_token_counts(vocab).unwrap().iter().filter(|&&c| c > 0).count());
    let d = specauf::drafter::AnyDrafter::load_for(&a.join("final"), &m.target).unwrap();
    assert!(d.draft_ids().is_none_or(|ids| ids.len() == specauf::drafter::DEFAULT_DRAFT_VOCAB.min(vocab)));
    println!("resume: 7 steps, losses {:?}", ma.iter().map(|m| m.loss).collect::<Vec<_>>());
}

#[test]
fn a_run_past_its_deadline_stops_at_the_first_timing_and_a_resume_keeps_the_cut() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, data) = prepared(tmp.path(), 6);
    let out = tmp.path().join("run");
    let cfg = config(&data, &out, &["steps=60", "checkpoint_every=5", "eval_every=0", "optim.lr=0.001"]);
    // Already past the deadline: the steps are timed after 3 warm-up steps and 20 more, and the
    // run ends there, its schedule decayed over those 23 steps.
    let past = std::time::Instant::now();
    let done = train(&m, &cfg, &RunOptions { deadline: Some(past), ..Default::default() }).unwrap();
    assert_eq!(done.steps_done, 23);
    assert!(out.join("final/model.safetensors").is_file(), "the cut run saves its drafter");
    let lines = metrics(&out);
    assert_eq!(lines.len(), 23);
    let latest: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("checkpoints/latest.json")).unwrap()).unwrap();
    assert_eq!(latest["budget_steps"], 23, "{latest}");
    // A resume without a deadline keeps the cut: the run is complete.
    let again = train(&m, &cfg, &RunOptions { resume: true, ..Default::default() }).unwrap();
    assert_eq!(again.steps_done, 23);
    assert_eq!(metrics(&out).len(), 23);
    // A cut recorded at step 10 of a run stopped there: the resumed run ends at the cut, its
    // learning rate decaying to the cut's end rather than the config's 60 steps.
    let out3 = tmp.path().join("run3");
    let cfg3 = config(&data, &out3, &["steps=60", "checkpoint_every=5", "eval_every=0", "optim.lr=0.001"]);
    train(&m, &cfg3, &RunOptions { stop_after: Some(10), ..Default::default() }).unwrap();
    let path = out3.join("checkpoints/latest.json");
    let mut state: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    state["budget_steps"] = 20.into();
    std::fs::write(&path, serde_json::to_vec(&state).unwrap()).unwrap();
    let done = train(&m, &cfg3, &RunOptions { resume: true, ..Default::default() }).unwrap();
    assert_eq!(done.steps_done, 20);
    let lines = metrics(&out3);
    assert_eq!(lines.len(), 20);
    let (peak, last) = (lines.iter().map(|l| l.lr).fold(0.0, f64::max), lines[19].lr);
    assert!(last < 0.05 * peak, "the learning rate decays over the cut run: last {last}, peak {peak}");
    // A deadline far away cuts nothing.
    let far = std::time::Instant::now() + std::time::Duration::from_secs(3600);
    let out2 = tmp.path().join("run2");
    let cfg2 = config(&data, &out2, &["steps=30", "checkpoint_every=10", "eval_every=0"]);
    assert_eq!(train(&m, &cfg2, &RunOptions { deadline: Some(far), ..Default::default() }).unwrap().steps_done, 30);
}

#[test]
fn a_tiny_drafter_overfits_a_tiny_fixed_set() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, data) = prepared(tmp.path(), 3);
    let out = tmp.path().join("run");
    // The same few sequences every step; evaluation on the training split measures memorisation.
    let cfg = config(&data, &out, &["steps=150", "optim.lr=0.003", "num_anchors=64", "checkpoint_every=1000", "eval_every=0", "objective=full"]);
    let summary = train(&m, &cfg, &RunOptions::default()).unwrap();
    let last = summary.last.unwrap();
    let first = metrics(&out)[0].clone();
    println!("overfit: loss {:.3} -> {:.3}, in-block accept length {:.3} -> {:.3} (B = 4)", first.loss, last.loss, first.accept_len, last.accept_len);
    assert!(last.accept_len >= 0.8 * 3.0, "accept length {} after 150 steps on 3 sequences", last.accept_len);
}

#[test]
fn bad_configs_are_refused_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let err = TrainConfig::load(None, &["data=/x".into(), "out=/y".into(), "drafter.layerz=2".into()]).unwrap_err();
    assert!(err.to_string().contains("layerz"), "{err}");
    let (m, data) = prepared(tmp.path(), 4);
    // a drafter mask token outside the target's vocabulary
    let cfg = config(&data, &tmp.path().join("r1"), &["drafter.mask_token_id=999999"]);
    let err = train(&m, &cfg, &RunOptions::default()).unwrap_err();
    println!("{err}");
    assert!(err.to_string().contains("999999"), "{err}");
    // a data directory that is not a prepared dataset
    let cfg = config(tmp.path(), &tmp.path().join("r2"), &[]);
    let err = train(&m, &cfg, &RunOptions::default()).unwrap_err();
    println!("{err}");
    assert!(err.to_string().contains("manifest"), "{err}");
}

#[test]
fn drafter_layers_initialised_from_the_target_are_copies_of_its_layers() {
    use specauf::train::trainable::build_drafter;
    let tmp = tempfile::tempdir().unwrap();
    let (m, data) = prepared(tmp.path(), 4);
    // tiny target: 3 layers; the drafter taps layer 1, the tap right below target layer 2
    let cfg = config(&data, &tmp.path().join("r"), &["drafter.target_layer_ids=[1]", "drafter.init_layers_from_target=[2]"]);
    let drafter = build_drafter(&cfg, &m.target).unwrap();
    let vars = drafter.named_vars();
    let get = |name: &str| vars.iter().find(|(n, _)| n == name).unwrap().1.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let layer2 = m.target.layer_tensors_f32(2).unwrap();
    for (suffix, t) in &layer2 {
        let want = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(get(&format!("layers.0.{suffix}")), want, "layers.0.{suffix} is not target layer 2's");
    }
    // fc is the identity on the single tap; hidden_norm is layer 2's input norm; the final norm
    // is the target's (layer 2 is its last)
    let fc = get("fc.weight");
    let h = 64;
    for r in 0..h {
        for c in 0..h {
            assert_eq!(fc[r * h + c], if r == c { 1.0 } else { 0.0 });
        }
    }
    let in_norm = layer2.iter().find(|(n, _)| n == "input_layernorm.weight").unwrap().1.to_vec1::<f32>().unwrap();
    assert_eq!(get("hidden_norm.weight"), in_norm);
    assert_eq!(get("norm.weight"), m.target.final_norm_weight().to_vec1::<f32>().unwrap());
    // and it trains from there
    let cfg = config(&data, &tmp.path().join("t"), &["steps=3", "drafter.target_layer_ids=[1]", "drafter.init_layers_from_target=[2]"]);
    let summary = train(&m, &cfg, &RunOptions::default()).unwrap();
    assert!(summary.last.unwrap().loss.is_finite());
}

/// `drafter.mask_embedding`: the trainable MASK vector starts as the target's embedding of the
/// MASK token, training moves it, the checkpoint carries it, and a run that starts from a drafter
/// without one and asks for it is refused.
#[test]
fn a_trainable_mask_embedding_starts_as_the_targets_and_trains() {
    use specauf::train::trainable::build_drafter;
    let tmp = tempfile::tempdir().unwrap();
    let (m, data) = prepared(tmp.path(), 4);
    let out = tmp.path().join("t");
    let cfg = config(&data, &out, &["steps=3", "drafter.mask_embedding=true"]);
    let drafter = build_drafter(&cfg, &m.target).unwrap();
    let row = |d: &specauf::drafter::AnyDrafter| {
        d.named_vars().into_iter().find(|(n, _)| n == "mask_embedding").expect("a mask_embedding tensor").1.as_tensor().to_vec1::<f32>().unwrap()
    };
    let start = row(&drafter);
    let want = m.target.embed(&[drafter.mask_token_id()]).unwrap().squeeze(0).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(start, want);
    train(&m, &cfg, &RunOptions::default()).unwrap();
    let trained = specauf::drafter::AnyDrafter::load_for(&out.join("final"), &m.target).unwrap();
    let moved = row(&trained).iter().zip(&start).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(moved > 0.0, "three steps left the MASK vector where it started");
    // starting from a checkpoint that has none
    let plain = tmp.path().join("plain");
    train(&m, &config(&data, &plain, &["steps=1"]), &RunOptions::default()).unwrap();
    let from = format!("drafter.init_from={}", plain.join("final").display());
    let err = train(&m, &config(&data, &tmp.path().join("r"), &[from.as_str(), "drafter.mask_embedding=true"]), &RunOptions::default()).unwrap_err();
    assert!(err.to_string().contains("no mask_embedding tensor"), "{err}");
}

#[test]
fn bad_target_initialisation_is_refused_with_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, data) = prepared(tmp.path(), 4);
    // one id per drafter layer (the tiny config has 1 layer)
    let err = TrainConfig::load(None, &["data=/x".into(), "out=/y".into(), "drafter.layers=2".into(), "drafter.init_layers_from_target=[1]".into()])
        .unwrap_err();
    assert!(err.to_string().contains("one target layer id per drafter layer"), "{err}");
    // a layer the target does not have
    let cfg = config(&data, &tmp.path().join("r"), &["drafter.init_layers_from_target=[7]"]);
    let err = train(&m, &cfg, &RunOptions::default()).unwrap_err();
    assert!(err.to_string().contains("target layer 7") && err.to_string().contains("3 layers"), "{err}");
}

/// The tiny fixture prepared with a feature cache of tap 1 (and soft labels when `soft` is set).
fn prepared_with_features(root: &std::path::Path, soft: Option<usize>) -> (specauf::model::LoadedModel, std::path::PathBuf) {
    use specauf::data::prepare::{prepare, PrepareOptions};
    use specauf::data::{FeatureDtype, FeatureSettings, ModelIdentity, PrepareSettings};
    let model_dir = common::tiny_model_dir(root);
    let data = common::write_data(root, 10, false);
    let m = specauf::model::load::load_model(model_dir.to_str().unwrap(), specauf::model::WeightsMode::F32).unwrap();
    let id = ModelIdentity::of(&m).unwrap();
    let out = root.join(if soft.is_some() { "soft" } else { "plain" });
    let settings = PrepareSettings {
        data: "data.jsonl".into(),
        max_conversations: Some(10),
        max_len: 160,
        max_turns: Some(2),
        eval_fraction: 0.2,
        seed: 1,
        regenerate: None,
        features: Some(FeatureSettings { target_layer_ids: vec![1], dtype: FeatureDtype::F16, weights: specauf::model::WeightsMode::F32, soft_labels: soft }),
        topics: None,
    };
    let opts = PrepareOptions { data_path: data, settings, workers: 1, batch: 1, shard_tokens: 4096, out: out.clone(), progress: Default::default(), regenerate_deadline: None };
    prepare(&m.tokenizer, &id, None, Some(&m.target), &opts).unwrap();
    (m, out)
}

#[test]
fn distillation_trains_towards_the_cached_distribution_and_needs_it() {
    let tmp = tempfile::tempdir().unwrap();
    let base = ["steps=4", "checkpoint_every=2", "eval_every=0", "drafter.target_layer_ids=[1]"];
    // Without soft labels in the cache, distill is refused with what to do.
    let (m, plain) = prepared_with_features(tmp.path(), None);
    let cfg = config(&plain, &tmp.path().join("r0"), &[&base[..], &["distill.weight=0.5"]].concat());
    let err = train(&m, &cfg, &RunOptions::default()).unwrap_err().to_string();
    assert!(err.contains("--soft-labels") && err.contains("--features 1"), "{err}");

    let (m, data) = prepared_with_features(tmp.path(), Some(8));
    let run = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        train(&m, &config(&data, &out, &[&base[..], extra].concat()), &RunOptions::default()).unwrap();
        metrics(&out)
    };
    let hard = run("hard", &[]);
    let zero = run("zero", &["distill.weight=0"]);
    let soft = run("soft", &["distill.weight=0.5", "distill.temperature=2"]);
    assert_eq!(hard, zero, "weight 0 is hard-label training");
    assert_ne!(hard[0].loss, soft[0].loss, "the soft targets change the loss");
    assert!(soft.iter().all(|s| s.loss.is_finite()));
    // A resumed distillation run continues exactly.
    let out = tmp.path().join("soft-resumed");
    let cfg = config(&data, &out, &[&base[..], &["distill.weight=0.5", "distill.temperature=2"]].concat());
    train(&m, &cfg, &RunOptions { stop_after: Some(3), ..Default::default() }).unwrap();
    train(&m, &cfg, &RunOptions { resume: true, ..Default::default() }).unwrap();
    assert_eq!(metrics(&out), soft);
    // Out-of-range settings are config errors.
    for bad in ["distill.weight=1.5", "distill.temperature=0", "distill.wieght=0.5"] {
        let sets: Vec<String> = ["data=/d", "out=/o", bad].iter().map(|s| s.to_string()).collect();
        assert!(TrainConfig::load(None, &sets).is_err(), "{bad} accepted");
    }
}

#[test]
fn training_on_the_generic_path_matches_the_cpu_kernels_step_for_step() {
    // The same run twice: the CPU kernels (f32 target, chunked support-only head) and the generic
    // path (row-wise f32 target, tensor-op head) on the CPU. Tolerance: 1e-4 relative on the loss
    // and grad norm of each of 3 steps (the paths sum in different orders; features are rounded
    // through f16 in both, so the drafter sees identical inputs unless a rounding tie flips).
    use specauf::nn::{Backend, DeviceSpec, Kernels};
    let tmp = tempfile::tempdir().unwrap();
    let (m, data) = prepared(tmp.path(), 6);
    let generic = Backend::open(DeviceSpec::Cpu, Kernels::Generic).unwrap();
    let dir = tmp.path().join("tiny-llama");
    let g = specauf::model::load_model_on(dir.to_str().unwrap(), specauf::model::WeightsMode::F32, &generic).unwrap();
    assert!(!g.target.backend().cpu_kernels());
    let extra = ["steps=3", "checkpoint_every=1000", "eval_every=0"];
    let (a, b) = (tmp.path().join("kernels"), tmp.path().join("generic"));
    train(&m, &config(&data, &a, &extra), &RunOptions::default()).unwrap();
    train(&g, &config(&data, &b, &extra), &RunOptions::default()).unwrap();
    let (ma, mb) = (metrics(&a), metrics(&b));
    assert_eq!(ma.len(), 3);
    for (x, y) in ma.iter().zip(&mb) {
        println!("step {}: loss {} vs {}, grad norm {} vs {}", x.step, x.loss, y.loss, x.grad_norm, y.grad_norm);
        assert!((x.loss - y.loss).abs() <= 1e-4 * x.loss.abs().max(1.0), "step {}: loss {} vs {}", x.step, x.loss, y.loss);
        assert!((x.grad_norm - y.grad_norm).abs() <= 1e-4 * x.grad_norm.max(1.0), "step {}: grad norm {} vs {}", x.step, x.grad_norm, y.grad_norm);
        assert_eq!(x.tokens, y.tokens);
    }
}

#[test]
fn training_with_activation_checkpointing_follows_the_full_graph_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, data) = prepared(tmp.path(), 8);
    let extra = ["steps=3", "checkpoint_every=1000", "eval_every=0", "drafter.layers=2", "objective=full"];
    let (a, b) = (tmp.path().join("full"), tmp.path().join("ckpt"));
    train(&m, &config(&data, &a, &extra), &RunOptions::default()).unwrap();
    train(&m, &config(&data, &b, &[&extra[..], &["activation_checkpointing=true"]].concat()), &RunOptions::default()).unwrap();
    let (ma, mb) = (metrics(&a), metrics(&b));
    assert_eq!(ma.len(), 3);
    for (x, y) in ma.iter().zip(&mb) {
        assert!((x.loss - y.loss).abs() <= 1e-5 * x.loss.abs().max(1.0), "step {}: loss {} vs {}", x.step, x.loss, y.loss);
        assert!((x.grad_norm - y.grad_norm).abs() <= 1e-5 * x.grad_norm.max(1.0), "step {}: grad norm {} vs {}", x.step, x.grad_norm, y.grad_norm);
    }
    // Domino has no checkpointed forward: refused with what to do.
    let cfg = config(&data, &tmp.path().join("domino"), &["steps=1", "drafter.kind=domino", "activation_checkpointing=true"]);
    let err = train(&m, &cfg, &RunOptions::default()).unwrap_err().to_string();
    assert!(err.contains("activation_checkpointing") && err.contains("DFlash"), "{err}");
}

#[test]
fn a_head_over_the_draft_vocabulary_scores_its_rows_and_leaves_other_labels_unsupervised() {
    use specauf::train::trainer::HeadWeight;
    let tmp = tempfile::tempdir().unwrap();
    let (m, _) = prepared(tmp.path(), 2);
    let v = m.target.config().vocab_size;
    let mut counts = vec![0u64; v];
    for (i, id) in [40usize, 7, 200, 99].into_iter().enumerate() {
        counts[id] = 10 - i as u64;
    }
    let ranking = specauf::drafter::DraftVocab::from_counts(&counts, "t");
    let head = HeadWeight::draft(&m.target, &ranking, 0).unwrap();
    assert_eq!(head.rows(), 4);
    // rows in id order, each the whole head's row
    let full = m.target.lm_head_weight_f32().unwrap().to_vec2::<f32>().unwrap();
    let rows = head.weight.to_vec2::<f32>().unwrap();
    for (r, id) in [7usize, 40, 99, 200].into_iter().enumerate() {
        assert_eq!(rows[r], full[id], "row {r} is id {id}");
    }
    let (mut labels, mut valid) = (vec![200u32, 3, 7, 40], vec![true, true, true, false]);
    head.map_labels(&mut labels, &mut valid);
    assert_eq!(labels, vec![3, 0, 0, 1]);
    assert_eq!(valid, vec![true, false, true, false], "an id without a row is not supervised");
    // filled to a minimum with the lowest uncounted ids
    assert_eq!(HeadWeight::draft(&m.target, &ranking, 10).unwrap().rows(), 10);
}

#[test]
fn a_draft_head_that_covers_the_vocabulary_trains_as_the_full_head_and_refuses_what_spans_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, data) = prepared(tmp.path(), 6);
    // The fixture's 256 tokens are fewer than the draft vocabulary's 8192 rows, so `draft` scores
    // every row, in id order: the same run, bit for bit, through the label map.
    let base = ["steps=5", "checkpoint_every=5", "eval_every=2"];
    let full = tmp.path().join("full");
    train(&m, &config(&data, &full, &base), &RunOptions::default()).unwrap();
    let draft = tmp.path().join("draft");
    train(&m, &config(&data, &draft, &[&base[..], &["head.vocab=draft"]].concat()), &RunOptions::default()).unwrap();
    assert_eq!(metrics(&full), metrics(&draft));
    let err = train(&m, &config(&data, &tmp.path().join("d"), &["drafter.kind=domino", "head.vocab=draft"]), &RunOptions::default()).unwrap_err();
    assert!(err.to_string().contains("head.vocab = full"), "{err}");
    let err = TrainConfig::load(None, &["data=/x".into(), "out=/y".into(), "head.vocab=tiny".into()]).unwrap_err();
    assert!(err.to_string().contains("tiny"), "{err}");
}

#[test]
fn frozen_tensors_keep_their_initial_values_and_a_freeze_that_matches_nothing_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, data) = prepared(tmp.path(), 4);
    // the drafter's layer starts as target layer 2; its MLP is frozen, the rest trains
    let init = ["steps=4", "optim.lr=0.01", "drafter.target_layer_ids=[1]", "drafter.init_layers_from_target=[2]", "optim.freeze=[\"mlp.\"]"];
    let out = tmp.path().join("f");
    train(&m, &config(&data, &out, &init), &RunOptions::default()).unwrap();
    let saved = candle_core::safetensors::load(out.join("final/model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let layer2 = m.target.layer_tensors_f32(2).unwrap();
    let values = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (suffix, t) in &layer2 {
        let got = values(&saved[&format!("layers.0.{suffix}")]);
        if suffix.starts_with("mlp.") {
            assert_eq!(got, values(t), "layers.0.{suffix} is frozen but changed");
        } else if suffix.ends_with("proj.weight") {
            assert_ne!(got, values(t), "layers.0.{suffix} is not frozen but did not train");
        }
    }
    for bad in ["optim.freeze=[\"mlpp\"]", "optim.freeze=[\"\"]", "optim.freeze=[\"layers\", \"fc\", \"norm\"]"] {
        // one --out for all three: a refused run leaves nothing behind that would need --resume
        let cfg = config(&data, &tmp.path().join("bad"), &["steps=1", bad]);
        let err = train(&m, &cfg, &RunOptions::default()).unwrap_err().to_string();
        println!("{bad}: {err}");
        assert!(err.contains("optim.freeze"), "{err}");
        assert!(!tmp.path().join("bad").exists(), "a refused run left its directory behind");
    }
}
