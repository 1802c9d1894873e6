//! `Target::forward_batch`: several sequences, each with its own cache, in one forward. In the
//! batch-invariant weights modes (q8, and native on Q8_0/Q4_0/Q4_1 GGUFs) every item's logits,
//! taps and cache are bit-identical to a lone `Target::forward` of that item; in f32 mode they
//! are only close (the measured gap is printed).

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use specauf::model::{load_model, load_target, BatchItem, ForwardOutput, KvCache, Logits, ModelLocation, Target, WeightsMode};

fn fixture(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models").join(family)
}

fn load(path: PathBuf, mode: WeightsMode) -> Target {
    load_target(&ModelLocation::from_path(&path).unwrap(), mode).unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// One sequence of the test batch: a prefilled cache and the chunk to run next.
struct Case {
    cache: KvCache,
    chunk: Vec<u32>,
    taps: Vec<usize>,
    logits: Logits,
}

/// Sequences with different cache lengths (0 included), chunk lengths, taps and logits requests.
fn cases(target: &Target, salt: u32) -> Vec<Case> {
    let vocab = target.config().vocab_size as u32;
    let layers = target.config().num_hidden_layers;
    let tok = |i: u32, s: u32| (i * 37 + s * 101 + salt * 13 + 5) % vocab;
    let shapes = [(0usize, 5usize, Logits::All), (3, 1, Logits::Last), (9, 4, Logits::All), (1, 2, Logits::None), (14, 1, Logits::All)];
    shapes
        .iter()
        .enumerate()
        .map(|(s, &(cached, n, logits))| {
            let s = s as u32;
            let mut cache = target.new_cache();
            if cached > 0 {
                let prefix: Vec<u32> = (0..cached as u32).map(|i| tok(i, s)).collect();
                target.forward(&prefix, &mut cache, &[], Logits::None).unwrap();
            }
            let chunk = (0..n as u32).map(|i| tok(i + 50, s)).collect();
            let taps = match s % 3 {
                0 => vec![],
                1 => vec![0, layers - 1],
                _ => vec![layers - 1],
            };
            Case { cache, chunk, taps, logits }
        })
        .collect()
}

fn run_batch(target: &Target, cases: &mut [Case]) -> Vec<ForwardOutput> {
    let mut items: Vec<BatchItem> = cases
        .iter_mut()
        .map(|c| BatchItem { tokens: &c.chunk, cache: &mut c.cache, taps: &c.taps, logits: c.logits })
        .collect();
    target.forward_batch(&mut items).unwrap()
}

fn run_alone(target: &Target, cases: &mut [Case]) -> Vec<ForwardOutput> {
    cases.iter_mut().map(|c| target.forward(&c.chunk, &mut c.cache, &c.taps, c.logits).unwrap()).collect()
}

/// Two rounds (a mixed chunk, then one token each, so the second reads what the first wrote to
/// the caches); returns the largest difference seen, and whether every value had the same bits.
fn compare(what: &str, target: &Target) -> (f32, bool) {
    let mut batched = cases(target, 1);
    let mut alone = cases(target, 1);
    let (mut worst, mut same) = (0f32, true);
    for round in 0..2 {
        if round == 1 {
            for (i, (b, a)) in batched.iter_mut().zip(alone.iter_mut()).enumerate() {
                b.chunk = vec![(i as u32 * 7 + 3) % 200];
                a.chunk = b.chunk.clone();
                b.logits = Logits::All;
                a.logits = Logits::All;
            }
        }
        let got = run_batch(target, &mut batched);
        let want = run_alone(target, &mut alone);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.logits.is_some(), w.logits.is_some(), "{what} item {i}");
            if let (Some(gl), Some(wl)) = (&g.logits, &w.logits) {
                assert_eq!(gl.dims(), wl.dims(), "{what} item {i}");
                worst = worst.max(max_diff(gl, wl));
                same &= bits(gl) == bits(wl);
            }
            assert_eq!(g.taps.len(), w.taps.len());
            for (gt, wt) in g.taps.iter().zip(&w.taps) {
                assert_eq!(gt.dims(), wt.dims(), "{what} item {i}");
                worst = worst.max(max_diff(gt, wt));
                same &= bits(gt) == bits(wt);
            }
            assert_eq!(batched[i].cache.len(), alone[i].cache.len(), "{what} item {i}");
        }
    }
    println!("{what}: batch vs alone max |Δ| = {worst:.3e}, bit-identical: {same}");
    (worst, same)
}

#[test]
fn every_item_of_a_batch_is_bit_identical_to_its_lone_forward_in_the_quantized_modes() {
    for family in ["llama", "qwen2", "qwen3"] {
        let (d, same) = compare(&format!("{family} q8"), &load(fixture(family), WeightsMode::Q8));
        assert!(same, "{family} q8: a batched item differs from its lone forward by {d}");
    }
    for family in ["llama", "qwen2"] {
        for file in ["tiny-q8_0.gguf", "tiny-q4_0.gguf"] {
            for mode in [WeightsMode::Q8, WeightsMode::Native] {
                let what = format!("{family} {file} {mode:?}");
                let (d, same) = compare(&what, &load(fixture(family).join(file), mode));
                assert!(same, "{what}: a batched item differs from its lone forward by {d}");
            }
        }
    }
}

#[test]
fn f32_mode_batches_are_close_but_not_promised_bit_identical() {
    for family in ["llama", "qwen2", "qwen3"] {
        let (d, _) = compare(&format!("{family} f32"), &load(fixture(family), WeightsMode::F32));
        assert!(d < 1e-4, "{family} f32: a batched item is {d} away from its lone forward");
    }
}

#[test]
fn smollm2_batches_are_bit_identical_in_q8_and_native_modes() {
    for mode in [WeightsMode::Q8, WeightsMode::Native] {
        let m = load_model("smollm2", mode).expect("load the embedded default");
        let (d, same) = compare(&format!("smollm2 {mode:?}"), &m.target);
        assert!(same, "smollm2 {mode:?}: a batched item differs from its lone forward by {d}");
    }
}

#[test]
fn a_bad_item_fails_the_batch_before_any_cache_moves() {
    let target = load(fixture("llama"), WeightsMode::Q8);
    let mut good = target.new_cache();
    let mut bad = target.new_cache();
    target.forward(&[1, 2, 3], &mut good, &[], Logits::None).unwrap();
    let mut items = [
        BatchItem { tokens: &[4, 5], cache: &mut good, taps: &[], logits: Logits::All },
        BatchItem { tokens: &[999_999], cache: &mut bad, taps: &[], logits: Logits::All },
    ];
    let err = target.forward_batch(&mut items).unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    assert_eq!((good.len(), bad.len()), (3, 0));
    assert!(target.forward_batch(&mut []).unwrap().is_empty());
}

#[test]
fn a_wide_batch_attends_its_items_in_parallel_and_still_matches_each_lone_forward() {
    // 16 sequences at context ~300: enough attention work for forward_batch to attend the items
    // on several threads.
    let m = load_model("smollm2", WeightsMode::Q8).expect("load the embedded default");
    let target = &m.target;
    let prompt: Vec<u32> = (0..300u32).map(|i| (i * 7919 + 1000) % 49152).collect();
    let mut base = target.new_cache();
    target.forward(&prompt, &mut base, &[], Logits::None).unwrap();
    let mut batched: Vec<KvCache> = (0..16).map(|i| {
        let mut c = base.clone();
        c.truncate(300 - i);
        c
    }).collect();
    let mut alone = batched.clone();
    let tokens: Vec<[u32; 1]> = (0..16u32).map(|i| [i * 1000 + 17]).collect();
    let mut items: Vec<BatchItem> = batched
        .iter_mut()
        .zip(&tokens)
        .map(|(cache, t)| BatchItem { tokens: t, cache, taps: &[], logits: Logits::Last })
        .collect();
    let got = target.forward_batch(&mut items).unwrap();
    for (i, (cache, t)) in alone.iter_mut().zip(&tokens).enumerate() {
        let want = target.forward(t, cache, &[], Logits::Last).unwrap();
        assert_eq!(bits(got[i].logits.as_ref().unwrap()), bits(want.logits.as_ref().unwrap()), "item {i}");
    }
}
