//! The Domino drafter on the tiny fixture targets (hidden 64, vocab 256): the GRU against a naive
//! loop and finite differences, teacher-forced training == inference, gradients through the
//! trainer's head path, and the SpecForge checkpoint format.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use specauf::drafter::domino::Gru;
use specauf::drafter::DrafterKind;
use specauf::drafter::{DFlashDrafter, DFlashInitConfig, DominoConfig, DominoDrafter, DominoInitConfig};
use specauf::model::{load_target, Logits, ModelLocation, Target, WeightsMode};
use specauf::drafter::blocks::build_blocks;
use specauf::train::head::{BaseSupport, ChunkedHead, DeltaBranch, HeadConfig, HeadInput};
use specauf::train::objective::Objective;

fn fixture(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models").join(family)
}

fn target(family: &str) -> Target {
    load_target(&ModelLocation::from_path(&fixture(family)).unwrap(), WeightsMode::F32).unwrap()
}

fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(3..vocab as u32)).collect()
}

/// (T, n_taps·H): the target's taps of `ids` at `layers`, concatenated.
fn features(target: &Target, ids: &[u32], layers: &[usize]) -> Tensor {
    let mut cache = target.new_cache();
    let out = target.forward(ids, &mut cache, layers, Logits::None).unwrap();
    Tensor::cat(&out.taps, 1).unwrap()
}

fn init(layers: usize, block_size: usize, taps: Vec<usize>, g: usize, e: usize) -> DominoInitConfig {
    let mut backbone = DFlashInitConfig::new(layers, block_size, 5);
    backbone.target_layer_ids = Some(taps);
    let mut init = DominoInitConfig::new(backbone);
    init.gru_hidden_dim = Some(g);
    init.emb_dim = Some(e);
    init
}

/// A random drafter whose weights are scaled up from the init so that the backbone, the GRU and
/// the delta each move the logits by far more than float noise.
fn drafter(target: &Target, block_size: usize, taps: Vec<usize>, seed: u64) -> DominoDrafter {
    let d = DominoDrafter::init_random(target.config(), &init(2, block_size, taps, 24, 16), seed).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 1);
    for (name, var) in d.named_vars() {
        let t = var.as_tensor();
        let scaled = if t.rank() == 1 {
            let noise: Vec<f32> = (0..t.elem_count()).map(|_| rng.gen_range(0.5..1.5)).collect();
            Tensor::from_vec(noise, t.dims(), t.device()).unwrap()
        } else if name.starts_with("prefix_gru.") {
            (t * 3.0).unwrap()
        } else if name.starts_with("embed_proj.") {
            (t * 20.0).unwrap()
        } else {
            (t * 5.0).unwrap()
        };
        var.set(&scaled).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    d
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// PyTorch's GRU equations written out element by element (no biases, gates r, z, n).
fn naive_gru(w_ih: &[Vec<f64>], w_hh: &[Vec<f64>], xs: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let g = w_hh[0].len();
    let mut h = vec![0.0; g];
    let mut out = Vec::new();
    for x in xs {
        let dot = |row: &[f64], v: &[f64]| row.iter().zip(v).map(|(a, b)| a * b).sum::<f64>();
        let mut next = vec![0.0; g];
        for j in 0..g {
            let r = sigmoid(dot(&w_ih[j], x) + dot(&w_hh[j], &h));
            let z = sigmoid(dot(&w_ih[g + j], x) + dot(&w_hh[g + j], &h));
            let n = (dot(&w_ih[2 * g + j], x) + r * dot(&w_hh[2 * g + j], &h)).tanh();
            next[j] = (1.0 - z) * n + z * h[j];
        }
        h = next;
        out.push(h.clone());
    }
    out
}

fn random_matrix(rows: usize, cols: usize, scale: f64, rng: &mut ChaCha8Rng) -> Vec<Vec<f64>> {
    (0..rows).map(|_| (0..cols).map(|_| rng.gen_range(-scale..scale)).collect()).collect()
}

fn to_tensor(m: &[Vec<f64>]) -> Tensor {
    Tensor::new(m.to_vec(), &Device::Cpu).unwrap()
}

#[test]
fn the_gru_matches_a_naive_loop_over_pytorch_equations() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (i, g, t, n) = (5usize, 4usize, 6usize, 3usize);
    let w_ih = random_matrix(3 * g, i, 1.2, &mut rng);
    let w_hh = random_matrix(3 * g, g, 1.2, &mut rng);
    let seqs: Vec<Vec<Vec<f64>>> = (0..n).map(|_| random_matrix(t, i, 2.0, &mut rng)).collect();
    let gru = Gru::new(to_tensor(&w_ih), to_tensor(&w_hh)).unwrap();
    let x = Tensor::new(seqs.clone(), &Device::Cpu).unwrap();
    let got: Vec<Vec<Vec<f64>>> = gru.forward(&x).unwrap().to_vec3().unwrap();
    for (s, seq) in seqs.iter().enumerate() {
        let want = naive_gru(&w_ih, &w_hh, seq);
        for k in 0..t {
            for j in 0..g {
                assert!((got[s][k][j] - want[k][j]).abs() < 1e-12, "seq {s} step {k} unit {j}: {} vs {}", got[s][k][j], want[k][j]);
            }
        }
    }
    // Stepping one token at a time from a carried state gives the same states.
    let mut h = gru.zero_state(1).unwrap();
    for (k, x) in seqs[1].iter().enumerate() {
        let gi = gru.input_gates(&to_tensor(std::slice::from_ref(x))).unwrap();
        h = gru.step(&gi, &h).unwrap();
        let row: Vec<f64> = h.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(row, got[1][k], "step {k}");
    }
}

/// Why Domino keeps its own GRU rather than `candle_nn::rnn::GRU`: the same equations, values and
/// gradients (checked here), but ours takes the input projections of a whole sequence as one
/// product (`input_gates`) and lets inference feed one precomputed step at a time, where
/// candle-nn recomputes x·W_ih inside every step. This test is the evidence that they agree.
#[test]
fn our_gru_gives_candle_nns_states_and_gradients() {
    use candle_nn::rnn::{GRUConfig, RNN};
    let max_abs_diff = |a: &Tensor, b: &Tensor| -> f64 { (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap() };
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let (i, g, t, n) = (5usize, 4usize, 6usize, 3usize);
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let reference = candle_nn::rnn::gru(i, g, GRUConfig::default_no_bias(), vb).unwrap();
    let vars = varmap.data().lock().unwrap().clone();
    let (w_ih, w_hh) = (vars["weight_ih_l0"].clone(), vars["weight_hh_l0"].clone());
    w_ih.set(&to_tensor(&random_matrix(3 * g, i, 1.0, &mut rng))).unwrap();
    w_hh.set(&to_tensor(&random_matrix(3 * g, g, 1.0, &mut rng))).unwrap();
    let x = Tensor::new((0..n).map(|_| random_matrix(t, i, 1.5, &mut rng)).collect::<Vec<_>>(), &Device::Cpu).unwrap();
    let probe = Tensor::new((0..n).map(|_| random_matrix(t, g, 1.0, &mut rng)).collect::<Vec<_>>(), &Device::Cpu).unwrap();

    let ours = Gru::new(w_ih.as_tensor().clone(), w_hh.as_tensor().clone()).unwrap().forward(&x).unwrap();
    let states = reference.seq(&x).unwrap();
    let theirs = Tensor::stack(&states.iter().map(|s| s.h().clone()).collect::<Vec<_>>(), 1).unwrap();
    assert!(max_abs_diff(&ours, &theirs) < 1e-12, "states differ by {}", max_abs_diff(&ours, &theirs));

    let g_ours = (ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    let g_theirs = (theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, var) in [("weight_ih", &w_ih), ("weight_hh", &w_hh)] {
        let (a, b) = (g_ours.get(var.as_tensor()).unwrap(), g_theirs.get(var.as_tensor()).unwrap());
        assert!(max_abs_diff(a, b) < 1e-12, "{name} gradients differ by {}", max_abs_diff(a, b));
    }
}

#[test]
fn the_gru_gradient_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let (i, g, t, n) = (4usize, 3usize, 5usize, 2usize);
    let w_ih = Var::from_tensor(&to_tensor(&random_matrix(3 * g, i, 1.0, &mut rng))).unwrap();
    let w_hh = Var::from_tensor(&to_tensor(&random_matrix(3 * g, g, 1.0, &mut rng))).unwrap();
    let x = Var::from_tensor(&Tensor::new((0..n).map(|_| random_matrix(t, i, 1.5, &mut rng)).collect::<Vec<_>>(), &Device::Cpu).unwrap()).unwrap();
    let probe = Tensor::new((0..n).map(|_| random_matrix(t, g, 1.0, &mut rng)).collect::<Vec<_>>(), &Device::Cpu).unwrap();
    // loss = Σ states ⊙ probe: every state of every step contributes.
    let loss = |w_ih: &Tensor, w_hh: &Tensor, x: &Tensor| -> Tensor {
        let gru = Gru::new(w_ih.clone(), w_hh.clone()).unwrap();
        (gru.forward(x).unwrap() * &probe).unwrap().sum_all().unwrap()
    };
    let grads = loss(w_ih.as_tensor(), w_hh.as_tensor(), x.as_tensor()).backward().unwrap();
    let eps = 1e-6;
    let mut checked = 0;
    for (which, var) in [("weight_ih", &w_ih), ("weight_hh", &w_hh), ("input", &x)] {
        let analytic: Vec<f64> = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for idx in 0..base.len() {
            let at = |delta: f64| -> f64 {
                let mut v = base.clone();
                v[idx] += delta;
                let t = Tensor::from_vec(v, var.as_tensor().dims(), &Device::Cpu).unwrap();
                let (a, b, c) = match which {
                    "weight_ih" => (t, w_hh.as_tensor().clone(), x.as_tensor().clone()),
                    "weight_hh" => (w_ih.as_tensor().clone(), t, x.as_tensor().clone()),
                    _ => (w_ih.as_tensor().clone(), w_hh.as_tensor().clone(), t),
                };
                loss(&a, &b, &c).to_scalar::<f64>().unwrap()
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
            let err = (numeric - analytic[idx]).abs();
            assert!(err < 1e-7 * (1.0 + numeric.abs()), "{which}[{idx}]: autograd {} vs finite difference {numeric}", analytic[idx]);
            checked += 1;
        }
    }
    assert_eq!(checked, 3 * g * i + 3 * g * g + n * t * i);
}

#[test]
fn teacher_forced_training_equals_inference_when_the_drafts_are_gold() {
    for (family, taps) in [("qwen3", vec![0usize, 3]), ("llama", vec![1usize]), ("qwen2", vec![0usize, 1])] {
        let target = target(family);
        let lm_head = target.lm_head_weight_f32().unwrap();
        for bs in [4usize, 8] {
            let d = drafter(&target, bs, taps.clone(), 21);
            let ids = tokens(30, 256, 3);
            let feats = features(&target, &ids, &taps);
            let mask = vec![1u8; ids.len()];
            // Anchor 0 has no context; 25 runs past the end of the sequence for B = 8.
            let anchors = [0usize, 6, 13, 25];
            let blocks = build_blocks(&ids, &mask, &anchors, bs, d.layout(), d.mask_token_id());
            let rows = d.train_rows(&target, &feats, &blocks).unwrap();
            assert_eq!(rows.hidden.dims(), &[anchors.len() * bs, 64], "Domino keeps all B positions");
            assert_eq!(rows.delta_input.dims(), &[anchors.len() * bs, 16]);
            let train = d.final_logits(&rows, &lm_head).unwrap();
            let base = rows.hidden.matmul(&lm_head.t().unwrap()).unwrap();
            for (b, &a) in anchors.iter().enumerate() {
                let mut cache = d.backbone().new_cache();
                d.backbone().extend_context(&mut cache, &feats.narrow(0, 0, a).unwrap()).unwrap();
                // The drafter's own tokens are the gold ones (token 0 past the end of the sequence).
                let gold: Vec<u32> = (1..bs).map(|k| ids.get(a + k).copied().unwrap_or(0)).collect();
                let infer = d.block_logits_forced(&target, &cache, ids[a], a, &gold).unwrap();
                let t = train.narrow(0, b * bs, bs - 1).unwrap();
                let diff = max_abs_diff(&t, &infer);
                assert!(diff < 1e-4, "{family} B={bs} anchor {a}: training and inference logits differ by {diff}");
                // Position 0 is base only; later positions carry a delta far above float noise.
                let bt = base.narrow(0, b * bs, bs - 1).unwrap();
                assert!(max_abs_diff(&t.narrow(0, 0, 1).unwrap(), &bt.narrow(0, 0, 1).unwrap()) < 1e-6);
                assert!(max_abs_diff(&t.narrow(0, 1, bs - 2).unwrap(), &bt.narrow(0, 1, bs - 2).unwrap()) > 1e-2, "{family}: the delta is negligible");
            }
        }
    }
}

#[test]
fn the_delta_at_position_k_depends_on_the_tokens_up_to_k_and_not_after() {
    let target = target("qwen3");
    let taps = vec![1usize, 2];
    let bs = 6;
    let d = drafter(&target, bs, taps.clone(), 7);
    let ids = tokens(20, 256, 9);
    let feats = features(&target, &ids, &taps);
    let mut cache = d.backbone().new_cache();
    d.backbone().extend_context(&mut cache, &feats.narrow(0, 0, 10).unwrap()).unwrap();
    let next: Vec<u32> = ids[11..16].to_vec();
    let base = d.block_logits_forced(&target, &cache, ids[10], 10, &next).unwrap();
    // Change the token at block position 3 (next[2]): positions 0..2 must not move, 3.. must.
    let mut other = next.clone();
    other[2] = (other[2] + 1) % 256;
    let changed = d.block_logits_forced(&target, &cache, ids[10], 10, &other).unwrap();
    assert_eq!(max_abs_diff(&base.narrow(0, 0, 3).unwrap(), &changed.narrow(0, 0, 3).unwrap()), 0.0);
    assert!(max_abs_diff(&base.narrow(0, 3, 2).unwrap(), &changed.narrow(0, 3, 2).unwrap()) > 1e-3);
    // Greedy drafting is the forced decoding of its own argmaxes.
    let draft = d.draft(&target, &cache, ids[10], 10).unwrap();
    assert_eq!(draft.len(), bs - 1);
    let replay = d.block_logits_forced(&target, &cache, ids[10], 10, &draft).unwrap();
    let argmax: Vec<u32> = replay.argmax(D::Minus1).unwrap().to_vec1().unwrap();
    assert_eq!(argmax, draft);
}

/// Cross-entropy per row (n, V) against labels, differentiable.
fn ce_rows(logits: &Tensor, labels: &[u32]) -> Tensor {
    let lse = logits.exp().unwrap().sum_keepdim(D::Minus1).unwrap().log().unwrap();
    let idx = Tensor::new(labels, &Device::Cpu).unwrap().unsqueeze(1).unwrap();
    (lse - logits.gather(&idx, 1).unwrap()).unwrap().squeeze(1).unwrap()
}

#[test]
fn every_tensor_gets_the_autograd_gradient_through_the_chunked_head() {
    let target = target("qwen3");
    let lm_head = target.lm_head_weight_f32().unwrap();
    let taps = vec![0usize, 3];
    let bs = 4;
    let d = drafter(&target, bs, taps.clone(), 31);
    let ids = tokens(24, 256, 5);
    let feats = features(&target, &ids, &taps);
    // A loss-mask gap mid-sequence: some blocks have invalid rows between valid ones.
    let mut mask = vec![1u8; ids.len()];
    mask[0] = 0;
    mask[11] = 0;
    let anchors = [2usize, 8, 9, 14, 21];
    let blocks = build_blocks(&ids, &mask, &anchors, bs, d.layout(), d.mask_token_id());
    assert!(blocks.valid.iter().any(|v| !v));
    let lambda = 0.4f32;
    let objective = Objective::full().resolve(bs).unwrap();

    // 1. The trainer's path: values to the head, the surrogate back through the drafter.
    let rows = d.train_rows(&target, &feats, &blocks).unwrap();
    let (hidden, input, weight) = (rows.hidden.detach(), rows.delta_input.detach(), rows.delta_weight.detach());
    let delta = DeltaBranch { input: &input, weight: &weight, base_ce_weight: lambda, base_only_prefix: 1, base_support: BaseSupport::default() };
    let mut head = ChunkedHead::new(HeadConfig { chunk_rows: 8, ..Default::default() });
    let out = head
        .run(
            &objective,
            &HeadInput { hidden: &hidden, lm_head: &lm_head, labels: &blocks.labels, valid: &blocks.valid, layout: d.layout(), num_sequences: 1, seed: 0, delta: Some(delta), soft: None },
        )
        .unwrap();
    let grads = out.surrogate(&rows.hidden, Some((&rows.delta_input, &rows.delta_weight))).unwrap().backward().unwrap();

    // 2. Reference: the full logits and the loss written out, plain autograd.
    let rows2 = d.train_rows(&target, &feats, &blocks).unwrap();
    let final_logits = d.final_logits(&rows2, &lm_head).unwrap();
    let base_logits = rows2.hidden.matmul(&lm_head.t().unwrap()).unwrap();
    let valid: Vec<f32> = blocks.valid.iter().map(|&v| if v { 1.0 } else { 0.0 }).collect();
    let n_valid: f32 = valid.iter().sum();
    let w = Tensor::new(valid.as_slice(), &Device::Cpu).unwrap();
    let mean = |ce: Tensor| (ce * &w).unwrap().sum_all().unwrap().affine(1.0 / n_valid as f64, 0.0).unwrap();
    let loss = ((mean(ce_rows(&final_logits, &blocks.labels)) * (1.0 - lambda) as f64).unwrap()
        + (mean(ce_rows(&base_logits, &blocks.labels)) * lambda as f64).unwrap())
    .unwrap();
    let want_loss = loss.to_scalar::<f32>().unwrap();
    assert!((out.loss - want_loss).abs() < 1e-4 * want_loss.abs().max(1.0), "head loss {} vs reference {want_loss}", out.loss);
    let want = loss.backward().unwrap();

    let vars = d.named_vars();
    assert_eq!(vars.len(), d.config().tensor_shapes().len());
    for (name, var) in &vars {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient through the head path"));
        let r = want.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no reference gradient"));
        let norm = g.sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap();
        let scale = r.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(norm > 0.0, "{name}: zero gradient");
        let diff = max_abs_diff(g, r);
        assert!(diff <= 1e-3 * scale.max(1e-3), "{name}: head-path gradient differs from autograd by {diff} (scale {scale})");
    }
    for branch in ["prefix_gru.weight_ih_l0", "prefix_gru.weight_hh_l0", "embed_proj.0.weight", "embed_proj.2.weight"] {
        assert!(vars.iter().any(|(n, _)| n == branch), "{branch} is trainable");
    }
}

#[test]
fn save_and_load_round_trip_with_the_specforge_names() {
    let target = target("qwen3");
    let taps = vec![1usize, 3];
    let d = drafter(&target, 4, taps.clone(), 13);
    let dir = tempfile::tempdir().unwrap();
    d.save(dir.path()).unwrap();
    assert_eq!(DrafterKind::of_checkpoint(dir.path()).unwrap(), DrafterKind::Domino);

    let raw = candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    let (h, g, e, v) = (64usize, 24usize, 16usize, 256usize);
    for (name, shape) in [
        ("prefix_gru.weight_ih_l0", vec![3 * g, h]),
        ("prefix_gru.weight_hh_l0", vec![3 * g, g]),
        ("embed_proj.0.weight", vec![e, h + g]),
        ("embed_proj.2.weight", vec![v, e]),
        ("fc.weight", vec![h, 2 * h]),
        ("layers.1.mlp.down_proj.weight", vec![h, 128]),
        ("norm.weight", vec![h]),
    ] {
        let t = raw.get(name).unwrap_or_else(|| panic!("{name} missing from the checkpoint"));
        assert_eq!(t.dims(), shape.as_slice(), "{name}");
        assert_eq!(t.dtype(), DType::F32);
    }
    assert_eq!(raw.len(), d.config().tensor_shapes().len());
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "DominoDraftModel");
    let section = &cfg["dflash_config"];
    assert_eq!(section["projector_type"], "domino");
    assert_eq!(section["shift_label"], true);
    assert_eq!(section["pure_draft_prefix_len"], 1);
    assert_eq!(section["emb_dim"], 16);
    assert_eq!(section["gru_hidden_dim"], 24);
    assert_eq!(section["mask_token_id"], 5);

    let back = DominoDrafter::load(dir.path(), target.config()).unwrap();
    assert_eq!(back.config(), d.config());
    for ((n1, v1), (n2, v2)) in d.named_vars().iter().zip(back.named_vars()) {
        assert_eq!(n1, &n2);
        assert_eq!(max_abs_diff(v1.as_tensor(), v2.as_tensor()), 0.0, "{n1}");
    }
    let ids = tokens(16, 256, 2);
    let feats = features(&target, &ids, &taps);
    let mut cache = d.backbone().new_cache();
    d.backbone().extend_context(&mut cache, &feats.narrow(0, 0, 9).unwrap()).unwrap();
    assert_eq!(d.draft(&target, &cache, ids[9], 9).unwrap(), back.draft(&target, &cache, ids[9], 9).unwrap());

    // A Domino checkpoint is not a DFlash one, and the reverse.
    let err = DFlashDrafter::load(dir.path(), target.config()).unwrap_err();
    assert!(matches!(&err, specauf::drafter::DrafterError::UnknownConfigKey { key, .. } if key.starts_with("dflash_config.")), "{err}");
    let dflash_dir = tempfile::tempdir().unwrap();
    d.backbone().save(dflash_dir.path()).unwrap();
    assert_eq!(DrafterKind::of_checkpoint(dflash_dir.path()).unwrap(), DrafterKind::DFlash);
    let err = DominoDrafter::load(dflash_dir.path(), target.config()).unwrap_err();
    assert!(err.to_string().contains("DominoDraftModel"), "{err}");
    // A checkpoint for another target is refused at load.
    let llama = self::target("llama");
    assert!(DominoDrafter::load(dir.path(), llama.config()).is_err());
}

/// The released SpecForge config of the Qwen3-8B Domino drafter (configs/qwen3-8b-domino.json).
const SPECFORGE_QWEN3_8B_DOMINO: &str = r#"{
  "emb_dim": 256,
  "architectures": ["DominoDraftModel"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "auto_map": {"AutoModel": "domino.DominoDraftModel"},
  "block_size": 16,
  "bos_token_id": 151643,
  "dflash_config": {
    "mask_token_id": 151669,
    "target_layer_ids": [1, 9, 17, 25, 33],
    "projector_type": "domino",
    "pure_draft_prefix_len": 1,
    "emb_dim": 256,
    "gru_hidden_dim": 1024,
    "shift_label": true
  },
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
  "use_cache": true,
  "use_sliding_window": false,
  "vocab_size": 151936
}"#;

#[test]
fn the_released_specforge_domino_config_parses_and_odd_ones_are_refused() {
    let cfg = DominoConfig::from_json_str(SPECFORGE_QWEN3_8B_DOMINO, "qwen3-8b-domino.json").unwrap();
    assert_eq!((cfg.gru_hidden_dim, cfg.emb_dim, cfg.pure_draft_prefix_len), (1024, 256, 1));
    assert_eq!(cfg.backbone.block_size, 16);
    assert_eq!(cfg.backbone.mask_token_id, 151669);
    assert_eq!(cfg.backbone.target_layer_ids, vec![1, 9, 17, 25, 33]);
    let shapes = cfg.tensor_shapes();
    assert!(shapes.contains(&("embed_proj.0.weight".to_string(), vec![256, 4096 + 1024])));
    assert!(shapes.contains(&("prefix_gru.weight_hh_l0".to_string(), vec![3 * 1024, 1024])));
    // Our writer's text reads back to the same config.
    assert_eq!(DominoConfig::from_json_str(&cfg.to_json(), "ours").unwrap(), cfg);

    let edit = |from: &str, to: &str| SPECFORGE_QWEN3_8B_DOMINO.replacen(from, to, 1);
    let refused = [
        (edit("\"shift_label\": true", "\"shift_label\": false"), "shift_label"),
        (edit("\"projector_type\": \"domino\"", "\"projector_type\": \"dspark\""), "projector_type"),
        (edit("\"gru_hidden_dim\": 1024,", ""), "gru_hidden_dim"),
        (edit("\"emb_dim\": 256,\n  \"architectures\"", "\"emb_dim\": 128,\n  \"architectures\""), "disagree"),
        (edit("\"pure_draft_prefix_len\": 1", "\"pure_draft_prefix_len\": 16"), "pure_draft_prefix_len"),
        (edit("\"shift_label\": true", "\"shift_label\": true, \"markov_head\": 1"), "markov_head"),
        (edit("[\"DominoDraftModel\"]", "[\"DFlashDraftModel\"]"), "DominoDraftModel"),
    ];
    for (text, word) in refused {
        let err = DominoConfig::from_json_str(&text, "edited.json").unwrap_err().to_string();
        assert!(err.contains(word), "expected an error naming {word}, got: {err}");
    }
}
