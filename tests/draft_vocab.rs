//! The draft vocabulary (DESIGN §7.13): drafts scored by a subset of the target's head rows stay
//! in the subset plus the request's own tokens, take the best of those logits, and leave the
//! T = 0 output exactly the target's greedy output.

mod spec_support;

use std::sync::Arc;

use spec_support::{prompt, reference_greedy, target_in, FAMILIES};
use specauf::drafter::{DFlashDrafter, DFlashInfer, DFlashInitConfig, DFlashProposer, DraftHead, DraftVocab};
use specauf::model::{Logits, WeightsMode};
use specauf::spec::{generate, GenerateConfig, Proposer};

fn greedy_cfg(max_new_tokens: usize) -> GenerateConfig {
    GenerateConfig { max_new_tokens, temperature: 0.0, top_p: 1.0, seed: 0, eos_token_ids: vec![], accept_rule: Default::default() }
}

/// Counts that rank every 7th id first (so the subset is not a prefix of the vocabulary).
fn vocab_every_7th(v: usize) -> DraftVocab {
    let counts: Vec<u64> = (0..v).map(|i| if i % 7 == 3 { 100 + i as u64 } else { (i % 5) as u64 }).collect();
    DraftVocab::from_counts(&counts, "test")
}

#[test]
fn drafts_stay_in_the_subset_and_the_context_and_take_the_best_logit_there() {
    for family in FAMILIES {
        let target = target_in(family, WeightsMode::Q8);
        let (v, h) = (target.config().vocab_size, target.config().hidden_size);
        let layers = target.config().num_hidden_layers;
        let mut init = DFlashInitConfig::new(2, 4, 5);
        init.target_layer_ids = Some(vec![1, layers - 1]);
        let mut drafter = DFlashDrafter::init_random(target.config(), &init, 3).unwrap();
        let k = v / 10;
        drafter.set_draft_vocab(Some(Arc::new(vocab_every_7th(v))), k);
        let ids = drafter.draft_ids().unwrap().clone();
        assert_eq!(ids.len(), k);
        assert!(ids.iter().all(|&i| i % 7 == 3) && ids.windows(2).all(|w| w[0] < w[1]), "the top {k}, ascending");

        let infer = DFlashInfer::new(&drafter).unwrap();
        let seq = prompt(20, 9);
        let mut cache = target.new_cache();
        let feats = candle_core::Tensor::cat(&target.forward(&seq, &mut cache, &[1, layers - 1], Logits::None).unwrap().taps, 1).unwrap();
        let mut head = DraftHead::new(&target, &ids).unwrap().expect("q8 holds the head in blocks");
        let context = &seq[..12];
        head.observe(context);
        let allowed: Vec<u32> = (0..v as u32).filter(|i| ids.contains(i) || context.contains(i)).collect();
        assert_eq!(head.len(), allowed.len());
        let mut fc = infer.new_cache();
        infer.extend_context(&mut fc, &feats.narrow(0, 0, 12).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()).unwrap();
        let drafts = infer.draft_in(&target, &mut fc, seq[12], 12, Some(&mut head)).unwrap();
        // the whole head's logits on the same rows: each draft has the highest logit among the
        // allowed ids (the subset's rows are the whole head's rows, bit for bit)
        let x = infer.forward_block(&target, &mut fc, seq[12], 12).unwrap();
        let rows = candle_core::Tensor::from_slice(&x[h..], (3, h), &candle_core::Device::Cpu).unwrap();
        let logits = target.lm_head(&rows).unwrap().to_vec2::<f32>().unwrap();
        for (d, row) in drafts.iter().zip(&logits) {
            assert!(allowed.contains(d), "{family}: draft {d} is outside the subset and the context");
            let best = allowed.iter().map(|&i| row[i as usize]).fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(row[*d as usize].to_bits(), best.to_bits(), "{family}: draft {d} is not the best allowed logit");
        }
        // Each draft's confidence is its softmax probability over the allowed ids (the subset
        // and the context: the two parts' normalizers combined), within float rounding.
        let scored = head.scored(&target, &x[h..], 3).unwrap();
        for ((id, p), row) in scored.iter().zip(&logits) {
            let best = f64::from(row[*id as usize]);
            let z: f64 = allowed.iter().map(|&i| (f64::from(row[i as usize]) - best).exp()).sum();
            assert!((f64::from(*p) - 1.0 / z).abs() < 1e-5, "{family}: confidence {p} against {}", 1.0 / z);
            assert!(*p > 0.0 && *p <= 1.0);
        }
        let whole = infer.draft_scored_in(&target, &mut fc, seq[12], 12, None).unwrap();
        for ((id, p), row) in whole.iter().zip(&logits) {
            let best = f64::from(row[*id as usize]);
            let z: f64 = row.iter().map(|&l| (f64::from(l) - best).exp()).sum();
            assert!((f64::from(*p) - 1.0 / z).abs() < 1e-5, "{family}: whole-head confidence {p} against {}", 1.0 / z);
        }
    }
}

#[test]
fn greedy_output_with_a_draft_vocabulary_equals_plain_greedy() {
    let n = 24;
    for family in FAMILIES {
        let target = target_in(family, WeightsMode::Q8);
        let v = target.config().vocab_size;
        let layers = target.config().num_hidden_layers;
        let mut init = DFlashInitConfig::new(2, 4, 5);
        init.target_layer_ids = Some(vec![0, layers - 1]);
        let mut drafter = DFlashDrafter::init_random(target.config(), &init, 8).unwrap();
        drafter.set_draft_vocab(Some(Arc::new(vocab_every_7th(v))), v / 8);
        let mut proposer = DFlashProposer::new(drafter);
        for (pi, plen) in [1usize, 9].into_iter().enumerate() {
            let prompt = prompt(plen, pi as u32 + 1);
            let want = reference_greedy(&target, &prompt, n);
            let out = generate(&target, Some(&mut proposer as &mut dyn Proposer), &prompt, &greedy_cfg(n)).unwrap();
            assert_eq!(out.token_ids, want, "{family} prompt {pi}");
        }
    }
}

#[test]
fn size_zero_or_the_whole_vocabulary_drafts_over_the_whole_head() {
    let target = target_in("llama", WeightsMode::Q8);
    let v = target.config().vocab_size;
    let init = DFlashInitConfig::new(1, 4, 5);
    let mut drafter = DFlashDrafter::init_random(target.config(), &init, 0).unwrap();
    for size in [0, v, v + 5] {
        drafter.set_draft_vocab(Some(Arc::new(vocab_every_7th(v))), size);
        assert!(drafter.draft_ids().is_none(), "size {size}");
        assert!(drafter.draft_vocab().is_some(), "the ranking is kept for the checkpoint");
    }
    let q8 = target_in("llama", WeightsMode::Q8);
    assert!(DraftHead::new(&q8, &Arc::from(Vec::<u32>::new())).unwrap().is_none(), "no ids: the whole head");
    // an f32 target has no block head: the proposer drafts over the whole head
    let f32_target = target_in("llama", WeightsMode::F32);
    drafter.set_draft_vocab(Some(Arc::new(vocab_every_7th(v))), 10);
    assert!(DraftHead::new(&f32_target, drafter.draft_ids().unwrap()).unwrap().is_none());
}

/// `--draft-p-min`: drafts are cut before their first position below the threshold, some cycles
/// verify shorter blocks than the drafter's, and the output is still exactly greedy.
#[test]
fn drafts_cut_at_a_confidence_threshold_leave_the_output_greedy() {
    let n = 24;
    for family in FAMILIES {
        let target = target_in(family, WeightsMode::Q8);
        let layers = target.config().num_hidden_layers;
        let mut init = DFlashInitConfig::new(2, 4, 5);
        init.target_layer_ids = Some(vec![0, layers - 1]);
        let drafter = DFlashDrafter::init_random(target.config(), &init, 8).unwrap();
        let prompt = prompt(9, 2);
        let want = reference_greedy(&target, &prompt, n);
        let mut lengths = Vec::new();
        for p_min in [0.0f32, 0.02, 0.5, 0.999, 0.9999999] {
            let mut d = drafter.clone();
            d.set_draft_p_min(p_min);
            let mut proposer = DFlashProposer::new(d);
            let out = generate(&target, Some(&mut proposer as &mut dyn Proposer), &prompt, &greedy_cfg(n)).unwrap();
            assert_eq!(out.token_ids, want, "{family} p_min {p_min}");
            lengths.push(out.draft_lengths.iter().sum::<usize>() as f64 / out.draft_lengths.len() as f64);
        }
        assert_eq!(lengths[0], 3.0, "{family}: no threshold, whole blocks");
        assert!(lengths.windows(2).all(|w| w[1] <= w[0]), "{family}: a higher threshold drafts no more: {lengths:?}");
        assert!(lengths[4] < 1.0, "{family}: a drafter is rarely that sure: {lengths:?}");
    }
    assert!(specauf::drafter::check_draft_p_min(1.0).unwrap_err().to_string().contains("--draft-p-min"));
    assert!(specauf::drafter::check_draft_p_min(-0.1).is_err());
}
