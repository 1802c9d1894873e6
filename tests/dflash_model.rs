//! The DFlash drafter's forwards on the tiny fixture targets (hidden 64): the training mask, the
//! alignment of the training path with the inference path, and gradients.

use std::path::{Path, PathBuf};

use candle_core::{Tensor, Var, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use specauf::drafter::{context_visible, DFlashConfig, DFlashDrafter, DFlashInitConfig};
use specauf::model::{load_target, Logits, ModelLocation, Target, WeightsMode};

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

/// A random drafter whose weights are scaled up from the HF init (std 0.02) so that every path
/// (context vs block, each layer) moves the output by far more than float noise.
fn drafter(target: &Target, layers: usize, block_size: usize, taps: Vec<usize>, seed: u64) -> DFlashDrafter {
    let mut init = DFlashInitConfig::new(layers, block_size, 5);
    init.target_layer_ids = Some(taps);
    let d = DFlashDrafter::init_random(target.config(), &init, seed).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 1);
    for (name, var) in d.named_vars() {
        let t = var.as_tensor();
        let scaled = if t.rank() == 1 {
            // Norm weights: ones plus noise, so their gradients are not symmetric.
            let n = t.elem_count();
            let noise: Vec<f32> = (0..n).map(|_| rng.gen_range(0.5..1.5)).collect();
            Tensor::from_vec(noise, t.dims(), t.device()).unwrap()
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

fn block_rows(h: &Tensor, b: usize, block_size: usize) -> Tensor {
    h.narrow(0, b * block_size, block_size).unwrap()
}

/// The full training attention mask the forward implements, as booleans: row r = b·B + i (query i
/// of block b), column c < T a context position, column T + b'·B + i' a block key. The forward
/// never builds it; this is the reference the bias below is checked against.
fn training_mask_dense(anchors: &[usize], block_size: usize, t: usize) -> Vec<Vec<bool>> {
    let nb = anchors.len();
    let mut rows = Vec::with_capacity(nb * block_size);
    for (b, &a) in anchors.iter().enumerate() {
        for _ in 0..block_size {
            let mut row: Vec<bool> = (0..t).map(|j| context_visible(a, j)).collect();
            row.extend((0..nb * block_size).map(|c| c / block_size == b));
            rows.push(row);
        }
    }
    rows
}

#[test]
fn training_mask_sees_earlier_context_and_its_own_block_only() {
    let anchors = [0usize, 3, 7, 7, 11];
    let (bs, t) = (4usize, 13usize);
    let dense = training_mask_dense(&anchors, bs, t);
    assert_eq!(dense.len(), anchors.len() * bs);
    for (row, visible) in dense.iter().enumerate() {
        let block = row / bs;
        assert_eq!(visible.len(), t + anchors.len() * bs);
        for (col, &v) in visible.iter().enumerate() {
            // DESIGN §2, in words: context j iff j < a_b; every position of the own block; no other block.
            let want = if col < t { col < anchors[block] } else { (col - t) / bs == block };
            assert_eq!(v, want, "row {row} (block {block}, anchor {}), column {col}", anchors[block]);
        }
    }
    // The additive bias the forward uses agrees with the predicate.
    let bias: Vec<Vec<f32>> = DFlashDrafter::training_context_bias(&anchors, t).unwrap().to_vec2().unwrap();
    for (b, row) in bias.iter().enumerate() {
        for (j, &x) in row.iter().enumerate() {
            assert_eq!(x == 0.0, j < anchors[b], "block {b}, context {j}: bias {x}");
        }
    }
}

#[test]
fn a_block_cannot_see_other_blocks_or_context_at_or_after_its_anchor() {
    let target = target("qwen3");
    let (bs, taps) = (4usize, vec![1usize, 3]);
    let d = drafter(&target, 2, bs, taps.clone(), 11);
    let ids = tokens(24, 256, 1);
    let feats = features(&target, &ids, &taps);
    let anchors = [5usize, 12, 17];
    let block_ids = d.block_ids(&anchors.iter().map(|&a| ids[a]).collect::<Vec<_>>());
    let base = d.forward_train(&target, &feats, &anchors, &block_ids).unwrap();
    let probe = 1; // block anchored at 12
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let perturb_rows = |rows: std::ops::Range<usize>, rng: &mut ChaCha8Rng| -> Tensor {
        let mut v: Vec<Vec<f32>> = feats.to_vec2().unwrap();
        for r in rows {
            for x in v[r].iter_mut() {
                *x += rng.gen_range(-3.0..3.0);
            }
        }
        let w = v[0].len();
        Tensor::from_vec(v.concat(), (24, w), &candle_core::Device::Cpu).unwrap()
    };

    // Features at the anchor and after it (the anchor's own feature would leak x_{a+1}).
    let f = perturb_rows(12..24, &mut rng);
    let h = d.forward_train(&target, &f, &anchors, &block_ids).unwrap();
    let same = max_abs_diff(&block_rows(&h, probe, bs), &block_rows(&base, probe, bs));
    assert!(same < 1e-6, "block 1 changed by {same} when context at positions >= its anchor changed");
    assert!(max_abs_diff(&block_rows(&h, 2, bs), &block_rows(&base, 2, bs)) > 1e-3, "block 2 (anchor 17) must see positions 12..16");

    // Only the anchor's own feature.
    let f = perturb_rows(12..13, &mut rng);
    let h = d.forward_train(&target, &f, &anchors, &block_ids).unwrap();
    let same = max_abs_diff(&block_rows(&h, probe, bs), &block_rows(&base, probe, bs));
    assert!(same < 1e-6, "block 1 changed by {same} when only its anchor's feature changed");

    // Other blocks' tokens.
    let mut other = block_ids.clone();
    for b in [0usize, 2] {
        for i in 0..bs {
            other[b * bs + i] = (other[b * bs + i] + 17) % 256;
        }
    }
    let h = d.forward_train(&target, &feats, &anchors, &other).unwrap();
    let same = max_abs_diff(&block_rows(&h, probe, bs), &block_rows(&base, probe, bs));
    assert!(same < 1e-6, "block 1 changed by {same} when other blocks' tokens changed");
    assert!(max_abs_diff(&block_rows(&h, 0, bs), &block_rows(&base, 0, bs)) > 1e-3, "block 0's own tokens must matter");

    // A context position just before the anchor does matter.
    let f = perturb_rows(11..12, &mut rng);
    let h = d.forward_train(&target, &f, &anchors, &block_ids).unwrap();
    let changed = max_abs_diff(&block_rows(&h, probe, bs), &block_rows(&base, probe, bs));
    assert!(changed > 1e-3, "block 1 did not react ({changed}) to the context at position 11 < anchor 12");
    // And so does the block's own MASK position content (bidirectional within the block).
    let mut own = block_ids.clone();
    own[probe * bs + bs - 1] = 7;
    let h = d.forward_train(&target, &feats, &anchors, &own).unwrap();
    let row0 = |t: &Tensor| t.narrow(0, probe * bs, 1).unwrap();
    assert!(max_abs_diff(&row0(&h), &row0(&base)) > 1e-3, "block position 0 must see the block's last position");
}

#[test]
fn training_forward_equals_inference_forward_at_every_anchor() {
    for (family, taps) in [("qwen3", vec![0usize, 2, 3]), ("llama", vec![1usize]), ("qwen2", vec![0usize, 1])] {
        let target = target(family);
        for bs in [4usize, 8] {
            let d = drafter(&target, 2, bs, taps.clone(), 21);
            let ids = tokens(30, 256, 3);
            let feats = features(&target, &ids, &taps);
            // Anchor 0 has no context at all; 13 and 13 repeat an anchor; 29 is the last position.
            let anchors = [0usize, 6, 13, 13, 22, 29];
            let block_ids = d.block_ids(&anchors.iter().map(|&a| ids[a]).collect::<Vec<_>>());
            let train = d.forward_train(&target, &feats, &anchors, &block_ids).unwrap();
            assert_eq!(train.dims(), &[anchors.len() * bs, 64]);
            for (b, &a) in anchors.iter().enumerate() {
                let mut cache = d.new_cache();
                // The context arrives in two pieces, as it does across decode cycles.
                let cut = a / 2;
                d.extend_context(&mut cache, &feats.narrow(0, 0, cut).unwrap()).unwrap();
                d.extend_context(&mut cache, &feats.narrow(0, cut, a - cut).unwrap()).unwrap();
                assert_eq!(cache.len(), a);
                let infer = d.forward_block(&target, &cache, &block_ids[b * bs..(b + 1) * bs], a).unwrap();
                let diff = max_abs_diff(&block_rows(&train, b, bs), &infer);
                println!("{family} B={bs} anchor {a}: max |Δ| train vs infer = {diff:.2e}");
                assert!(diff < 1e-4, "{family} B={bs}: block at anchor {a} differs between training and inference by {diff}");
            }
        }
    }
}

#[test]
fn a_block_must_start_where_the_context_ends() {
    let target = target("qwen3");
    let taps = vec![1usize, 2];
    let d = drafter(&target, 1, 4, taps.clone(), 5);
    let ids = tokens(12, 256, 4);
    let feats = features(&target, &ids, &taps);
    let mut cache = d.new_cache();
    d.extend_context(&mut cache, &feats).unwrap();
    let err = d.forward_block(&target, &cache, &d.block_ids(&[ids[8]]), 8).unwrap_err();
    assert!(matches!(err, specauf::drafter::DrafterError::ContextGap { cached: 12, start: 8 }), "{err}");
    assert!(!cache.tracks_gradients(), "the inference cache must hold plain values");
    let mut fresh = d.new_cache();
    d.extend_context(&mut fresh, &feats.narrow(0, 0, 8).unwrap()).unwrap();
    let direct = d.forward_block(&target, &fresh, &d.block_ids(&[ids[8]]), 8).unwrap();
    let draft = d.draft(&target, &fresh, ids[8], 8).unwrap();
    assert_eq!(draft.len(), 3);
    // The draft is the argmax of the target's head over block positions 1..B-1.
    let logits = target.lm_head(&direct.narrow(0, 1, 3).unwrap()).unwrap();
    let want: Vec<u32> = logits.argmax(D::Minus1).unwrap().to_vec1().unwrap();
    assert_eq!(draft, want);
}

/// Σ r ⊙ (h · Wᵀ) over the predicted rows: logits through the target's frozen f32 head.
fn head_loss(d: &DFlashDrafter, target: &Target, h: &Tensor, seed: u64) -> Tensor {
    let rows = d.predicted_rows(h).unwrap();
    let w = target.lm_head_weight_f32().unwrap();
    let logits = rows.matmul(&w.t().unwrap()).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let r: Vec<f32> = (0..logits.elem_count()).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let r = Tensor::from_vec(r, logits.dims(), logits.device()).unwrap();
    (logits * r).unwrap().sum_all().unwrap()
}

#[test]
fn every_trainable_tensor_receives_a_nonzero_gradient() {
    for mask_embedding in [false, true] {
        every_tensor_gets_a_gradient(mask_embedding);
    }
}

fn every_tensor_gets_a_gradient(mask_embedding: bool) {
    let target = target("qwen3");
    let taps = vec![0usize, 3];
    // The plain HF init, as training starts from it.
    let mut init = DFlashInitConfig::new(2, 4, 5);
    init.target_layer_ids = Some(taps.clone());
    init.mask_embedding = mask_embedding;
    let d = DFlashDrafter::init_random(target.config(), &init, 3).unwrap();
    assert_eq!(d.named_vars().iter().any(|(n, _)| n == "mask_embedding"), mask_embedding);
    let ids = tokens(20, 256, 5);
    let feats = features(&target, &ids, &taps);
    let anchors = [4usize, 9, 15];
    let block_ids = d.block_ids(&anchors.iter().map(|&a| ids[a]).collect::<Vec<_>>());
    let h = d.forward_train(&target, &feats, &anchors, &block_ids).unwrap();
    let grads = head_loss(&d, &target, &h, 1).backward().unwrap();
    let vars = d.named_vars();
    assert_eq!(vars.len(), d.config().tensor_shapes().len());
    for (name, var) in vars {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient reached it"));
        let norm = g.sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap();
        println!("{name}: |grad| = {norm:.3e}");
        assert!(norm > 1e-8 && norm.is_finite(), "{name}: gradient norm {norm}");
    }
}

/// `drafter.mask_embedding`: the block's MASK rows take a trainable vector. Set to the target's
/// embedding of the MASK token it is the drafter without one; set to anything else it moves the
/// MASK rows' outputs but not the anchor's inputs; training and both inference paths (candle and
/// the fast host forward) agree; and config.json and the checkpoint carry it.
#[test]
fn a_trainable_mask_embedding_replaces_the_mask_rows_everywhere() {
    use specauf::drafter::{DFlashInfer, DrafterPrecision};
    let target = target("qwen3");
    let taps = vec![0usize, 3];
    let plain = drafter(&target, 2, 4, taps.clone(), 9);
    let mut init = DFlashInitConfig::new(2, 4, 5);
    init.target_layer_ids = Some(taps.clone());
    init.mask_embedding = true;
    let d = DFlashDrafter::init_random(target.config(), &init, 1).unwrap();
    let mask_row = target.embed(&[5]).unwrap().squeeze(0).unwrap();
    for (name, var) in d.named_vars() {
        match plain.named_vars().into_iter().find(|(n, _)| *n == name) {
            Some((_, v)) => var.set(v.as_tensor()).unwrap(),
            None => {
                assert_eq!(name, "mask_embedding");
                var.set(&mask_row).unwrap();
            }
        }
    }
    // Through the checkpoint: config.json says so and the tensor is read back.
    let dir = std::env::temp_dir().join(format!("specauf-mask-emb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    d.save(&dir).unwrap();
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    assert!(text.contains("\"mask_embedding\": true"), "{text}");
    assert!(!plain.config().to_json().contains("mask_embedding"), "a drafter without one keeps the published format");
    let d = DFlashDrafter::load(&dir, target.config()).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(d.config().mask_embedding);

    let ids = tokens(20, 256, 5);
    let feats = features(&target, &ids, &taps);
    let anchors = [4usize, 9, 15];
    let block_ids = plain.block_ids(&anchors.iter().map(|&a| ids[a]).collect::<Vec<_>>());
    let base = plain.forward_train(&target, &feats, &anchors, &block_ids).unwrap();
    let same = d.forward_train(&target, &feats, &anchors, &block_ids).unwrap();
    assert!(max_abs_diff(&base, &same) < 1e-6, "starting as the target's MASK embedding, it is the plain drafter");

    let (_, var) = d.named_vars().into_iter().find(|(n, _)| n == "mask_embedding").unwrap();
    var.set(&(mask_row.clone() * 3.0).unwrap().broadcast_add(&Tensor::new(0.5f32, mask_row.device()).unwrap()).unwrap()).unwrap();
    let moved = d.forward_train(&target, &feats, &anchors, &block_ids).unwrap();
    assert!(max_abs_diff(&base, &moved) > 1e-3, "the vector must reach the output");

    let infer = DFlashInfer::with_precision(&d, DrafterPrecision::F32).unwrap();
    for (b, &a) in anchors.iter().enumerate() {
        let mut cache = d.new_cache();
        d.extend_context(&mut cache, &feats.narrow(0, 0, a).unwrap()).unwrap();
        let candle = d.forward_block(&target, &cache, &block_ids[b * 4..(b + 1) * 4], a).unwrap();
        let diff = max_abs_diff(&block_rows(&moved, b, 4), &candle);
        assert!(diff < 1e-4, "anchor {a}: training and inference differ by {diff}");
        let mut fc = infer.new_cache();
        let ctx = feats.narrow(0, 0, a).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        infer.extend_context(&mut fc, &ctx).unwrap();
        let fast = infer.forward_block(&target, &mut fc, ids[a], a).unwrap();
        let fast = Tensor::from_vec(fast, candle.dims(), candle.device()).unwrap();
        let (diff, scale) = (max_abs_diff(&fast, &candle), candle.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap());
        assert!(diff <= 1e-4 * scale, "anchor {a}: the fast forward differs from candle's by {diff} (scale {scale})");
    }
}

/// `layer_precision = "bf16"`: the layers' linears and their gradients run on AVX512-BF16. The
/// output and every tensor's gradient stay within bf16 rounding of the f32 ones (none lost); a
/// CPU without the instructions gets an error that says so.
#[test]
fn bf16_layers_stay_close_to_f32_and_give_every_tensor_its_gradient() {
    use specauf::nn::Precision;
    let target = target("qwen3");
    let taps = vec![0usize, 3];
    let mut d = drafter(&target, 2, 4, taps.clone(), 7);
    let ids = tokens(20, 256, 8);
    let feats = features(&target, &ids, &taps);
    let anchors = [4usize, 9, 15];
    let block_ids = d.block_ids(&anchors.iter().map(|&a| ids[a]).collect::<Vec<_>>());
    let h32 = d.forward_train(&target, &feats, &anchors, &block_ids).unwrap();
    let g32 = head_loss(&d, &target, &h32, 1).backward().unwrap();
    d.set_layer_precision(Precision::Bf16);
    if !Precision::Bf16.runs_here() {
        let err = d.forward_train(&target, &feats, &anchors, &block_ids).unwrap_err().to_string();
        assert!(err.contains("AVX512-BF16"), "{err}");
        return;
    }
    let h16 = d.forward_train(&target, &feats, &anchors, &block_ids).unwrap();
    let scale = h32.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    let diff = max_abs_diff(&h32, &h16);
    assert!(diff > 0.0, "the bf16 products must differ from f32 somewhere (else they did not run)");
    assert!(diff < 0.05 * scale, "output moved by {diff} against a scale of {scale}");
    let g16 = head_loss(&d, &target, &h16, 1).backward().unwrap();
    for (name, var) in d.named_vars() {
        let a = g32.get(var.as_tensor()).unwrap();
        let b = g16.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient in bf16"));
        let norm = |t: &Tensor| t.sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap();
        let rel = norm(&(a - b).unwrap()) / norm(a);
        println!("{name}: |grad| {:.3e}, relative difference {rel:.2e}", norm(b));
        assert!(norm(b) > 1e-8 && norm(b).is_finite(), "{name}: bf16 gradient norm {}", norm(b));
        assert!(rel < 0.05, "{name}: bf16 gradient differs from f32 by {rel} (relative)");
    }
}

#[test]
fn gradients_match_finite_differences() {
    let target = target("llama");
    let taps = vec![0usize, 2];
    let d = drafter(&target, 2, 4, taps.clone(), 31);
    let ids = tokens(14, 256, 6);
    let feats = features(&target, &ids, &taps);
    let anchors = [3usize, 8];
    let block_ids = d.block_ids(&anchors.iter().map(|&a| ids[a]).collect::<Vec<_>>());
    let loss = |d: &DFlashDrafter| -> Tensor {
        let h = d.forward_train(&target, &feats, &anchors, &block_ids).unwrap();
        head_loss(d, &target, &h, 2)
    };
    let grads = loss(&d).backward().unwrap();
    let vars: std::collections::HashMap<String, Var> = d.named_vars().into_iter().collect();
    let checked = [
        "fc.weight",
        "hidden_norm.weight",
        "layers.0.self_attn.q_proj.weight",
        "layers.0.self_attn.k_proj.weight",
        "layers.0.self_attn.v_proj.weight",
        "layers.0.self_attn.k_norm.weight",
        "layers.1.self_attn.o_proj.weight",
        "layers.1.mlp.down_proj.weight",
        "layers.1.post_attention_layernorm.weight",
        "norm.weight",
    ];
    for name in checked {
        let var = &vars[name];
        let g: Vec<f32> = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let base: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        // The largest-gradient coordinate and one fixed other coordinate.
        let big = (0..g.len()).max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs())).unwrap();
        for idx in [big, g.len() / 3] {
            let eps = 1e-2f32;
            let at = |delta: f32| -> f64 {
                let mut v = base.clone();
                v[idx] += delta;
                var.set(&Tensor::from_vec(v, var.as_tensor().dims(), var.as_tensor().device()).unwrap()).unwrap();
                let l = loss(&d).to_scalar::<f32>().unwrap() as f64;
                var.set(&Tensor::from_vec(base.clone(), var.as_tensor().dims(), var.as_tensor().device()).unwrap()).unwrap();
                l
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps as f64);
            let ad = g[idx] as f64;
            println!("{name}[{idx}]: autograd {ad:.5e}, finite difference {fd:.5e}");
            let tol = 2e-2 * ad.abs().max(fd.abs()) + 2e-3;
            assert!((fd - ad).abs() < tol, "{name}[{idx}]: autograd {ad} vs finite difference {fd}");
        }
    }
}

#[test]
fn predicted_rows_drop_each_blocks_anchor_row() {
    let target = target("qwen3");
    let d = drafter(&target, 1, 4, vec![1], 1);
    let h = Tensor::arange(0f32, (3 * 4 * 64) as f32, &candle_core::Device::Cpu).unwrap().reshape((12, 64)).unwrap();
    let rows = d.predicted_rows(&h).unwrap();
    assert_eq!(rows.dims(), &[9, 64]);
    let first: Vec<f32> = rows.narrow(0, 3, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(first[0], (5 * 64) as f32, "row 3 is block 1, position 1");
    let _ = DFlashConfig::fc_in(d.config());
}

#[test]
fn bad_training_inputs_are_refused_with_typed_errors() {
    use specauf::drafter::DrafterError;
    let target = target("qwen3");
    let taps = vec![1usize, 2];
    let d = drafter(&target, 1, 4, taps.clone(), 2);
    let ids = tokens(10, 256, 3);
    let f = features(&target, &ids, &taps);
    let ok_ids = d.block_ids(&[ids[3]]);
    let err = d.forward_train(&target, &f, &[10], &ok_ids).unwrap_err();
    assert!(matches!(err, DrafterError::AnchorOutOfRange { anchor: 10, block: 0, len: 10 }), "{err}");
    let err = d.forward_train(&target, &f, &[3, 4], &ok_ids).unwrap_err();
    assert!(matches!(err, DrafterError::InputShape { what: "block token ids", .. }), "{err}");
    let err = d.forward_train(&target, &f.narrow(1, 0, 64).unwrap(), &[3], &ok_ids).unwrap_err();
    assert!(matches!(err, DrafterError::InputShape { what: "context features", .. }), "{err}");
    let err = d.forward_train(&target, &f, &[3], &[ids[3], 5, 5, 999]).unwrap_err();
    assert!(matches!(err, DrafterError::TokenOutOfRange { token: 999, vocab: 256 }), "{err}");
}

#[test]
fn activation_checkpointing_gives_the_values_and_gradients_of_the_full_graph() {
    // Three layers, so that a layer's input gradient is handed down twice; the scaled-up weights
    // make every path count. The loss reads the predicted rows through a random projection.
    let target = target("qwen3");
    let taps = vec![0usize, 3];
    let d = drafter(&target, 3, 4, taps.clone(), 41);
    let ids = tokens(24, 256, 9);
    let feats = features(&target, &ids, &taps);
    let anchors = [5usize, 11, 17, 19];
    let block_ids = d.block_ids(&anchors.iter().map(|&a| ids[a]).collect::<Vec<_>>());
    let full = d.forward_train(&target, &feats, &anchors, &block_ids).unwrap();
    let rows = d.predicted_rows(&full).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let g: Vec<f32> = (0..rows.elem_count()).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let g = Tensor::from_vec(g, rows.dims(), rows.device()).unwrap();
    let want = (&rows * &g).unwrap().sum_all().unwrap().backward().unwrap();

    let ck = d.forward_train_checkpointed(&target, &feats, &anchors, &block_ids).unwrap();
    assert_eq!(max_abs_diff(ck.output(), &full), 0.0, "the forward values are the same computation");
    assert!(!ck.output().track_op(), "the checkpointed forward keeps no graph");
    let got = ck.backward(|out| d.predicted_rows(out), &g).unwrap();
    let vars = d.named_vars();
    assert_eq!(got.len(), vars.len(), "every trainable tensor gets a gradient");
    for (name, var) in &vars {
        let w = want.get(var.as_tensor()).unwrap();
        let (_, c) = got.iter().find(|(v, _)| v.as_tensor().id() == var.as_tensor().id()).unwrap_or_else(|| panic!("{name}: no gradient"));
        let scale = w.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let diff = max_abs_diff(c, w);
        assert!(scale > 0.0 && diff <= 1e-5 * scale.max(1.0), "{name}: |Δ| {diff:e} of {scale:e}");
    }
}
