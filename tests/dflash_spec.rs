//! The DFlash proposer in the decode loop: greedy exactness with an untrained drafter, and the
//! context it holds across cycles.

mod spec_support;

use spec_support::{prompt, reference_greedy, target, FAMILIES};
use specauf::drafter::{DFlashDrafter, DFlashInitConfig, DFlashProposer};
use specauf::spec::{generate, FinishReason, GenerateConfig, Proposer};

fn greedy_cfg(max_new_tokens: usize) -> GenerateConfig {
    GenerateConfig {
        max_new_tokens,
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
        eos_token_ids: vec![],
        accept_rule: Default::default(),
    }
}

#[test]
fn greedy_spec_decode_with_a_random_dflash_drafter_equals_plain_greedy() {
    let n = 20;
    for family in FAMILIES {
        let target = target(family);
        let layers = target.config().num_hidden_layers;
        for b in [4usize, 8] {
            let mut init = DFlashInitConfig::new(2, b, 5);
            init.target_layer_ids = Some(vec![0, layers - 1]);
            let drafter = DFlashDrafter::init_random(target.config(), &init, b as u64).unwrap();
            let mut proposer = DFlashProposer::new(drafter);
            assert!(proposer.is_fast(), "DFlashProposer::new runs the fast inference path");
            assert!(proposer.drafter().is_none() && proposer.cache().is_none(), "a fast proposer keeps only the fast path's weights");
            for (pi, plen) in [1usize, 6, 13].into_iter().enumerate() {
                let prompt = prompt(plen, pi as u32 + 3);
                let want = reference_greedy(&target, &prompt, n);
                let out = generate(&target, Some(&mut proposer as &mut dyn Proposer), &prompt, &greedy_cfg(n)).unwrap();
                assert_eq!(out.token_ids, want, "{family} B={b} prompt {pi}");
                assert_eq!(out.finish_reason, FinishReason::Length);
                assert!(out.accept_lengths.iter().all(|&a| (1..=b).contains(&a)));
                assert!(out.draft_lengths.iter().all(|&k| k == b - 1), "DFlash drafts B-1 tokens every cycle");
                // After the last cycle the pending rows are the last committed ones; the cache holds
                // every position before the last cycle's start.
                let last_start = plen + 1 + out.accept_lengths[..out.cycles - 1].iter().sum::<usize>() - 1;
                assert_eq!(proposer.context_len(), last_start, "{family} B={b} prompt {pi}");
            }
        }
    }
}

#[test]
fn a_drafter_for_another_target_is_refused_before_generation() {
    let qwen3 = target("qwen3");
    let llama = target("llama");
    let mut init = DFlashInitConfig::new(1, 4, 5);
    init.target_layer_ids = Some(vec![3]);
    let drafter = DFlashDrafter::init_random(qwen3.config(), &init, 0).unwrap();
    let mut proposer = DFlashProposer::new(drafter);
    let err = generate(&llama, Some(&mut proposer as &mut dyn Proposer), &prompt(5, 0), &greedy_cfg(4)).unwrap_err();
    assert!(err.to_string().contains("layer 3"), "{err}");
}

/// Records every proposal of the wrapped DFlash proposer.
struct Recording {
    inner: DFlashProposer,
    proposals: Vec<(usize, u32, Vec<u32>, specauf::drafter::DFlashCache)>,
}

impl Proposer for Recording {
    fn block_size(&self) -> usize {
        self.inner.block_size()
    }
    fn target_layer_ids(&self) -> &[usize] {
        self.inner.target_layer_ids()
    }
    fn begin(&mut self, t: &specauf::model::Target, p: &[u32], f: Option<&candle_core::Tensor>) -> Result<(), specauf::spec::SpecError> {
        self.inner.begin(t, p, f)
    }
    fn propose(&mut self, t: &specauf::model::Target, last: u32, start: usize) -> Result<specauf::spec::Draft, specauf::spec::SpecError> {
        let d = self.inner.propose(t, last, start)?;
        self.proposals.push((start, last, d.tokens.clone(), self.inner.cache().expect("a reference proposer has the reference cache").clone()));
        Ok(d)
    }
    fn commit(&mut self, tokens: &[u32], f: Option<&candle_core::Tensor>, start: usize) -> Result<(), specauf::spec::SpecError> {
        self.inner.commit(tokens, f, start)
    }
}

#[test]
fn every_draft_sees_exactly_the_committed_context_before_its_block() {
    use specauf::model::Logits;
    let n = 24;
    for family in FAMILIES {
        let target = target(family);
        let layers = target.config().num_hidden_layers;
        let taps = vec![layers - 1, 0];
        let mut init = DFlashInitConfig::new(2, 4, 5);
        init.target_layer_ids = Some(taps.clone());
        let drafter = DFlashDrafter::init_random(target.config(), &init, 9).unwrap();
        let mut rec = Recording { inner: DFlashProposer::reference(drafter.clone()), proposals: vec![] };
        let prompt = prompt(7, 1);
        let out = generate(&target, Some(&mut rec as &mut dyn Proposer), &prompt, &greedy_cfg(n)).unwrap();
        // Taps of the whole committed sequence from one fresh prefill.
        let seq: Vec<u32> = prompt.iter().chain(&out.token_ids).copied().collect();
        let mut cache = target.new_cache();
        let fwd = target.forward(&seq, &mut cache, &taps, Logits::None).unwrap();
        let feats = candle_core::Tensor::cat(&fwd.taps, 1).unwrap();
        assert_eq!(rec.proposals.len(), out.cycles);
        for (start, last, draft, used) in &rec.proposals {
            assert_eq!(*last, seq[*start], "{family}: the block starts with the last committed token");
            let mut ctx = drafter.new_cache();
            drafter.extend_context(&mut ctx, &feats.narrow(0, 0, *start).unwrap()).unwrap();
            let fresh = drafter.draft(&target, &ctx, *last, *start).unwrap();
            assert_eq!(&fresh, draft, "{family}: draft at start {start} differs from one over a fresh context");
            // The context the proposer used: features from the verify passes vs one prefill.
            let ids = drafter.block_ids(&[*last]);
            let a = drafter.forward_block(&target, used, &ids, *start).unwrap();
            let b = drafter.forward_block(&target, &ctx, &ids, *start).unwrap();
            let diff = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "{family}: the context at start {start} differs from a fresh one by {diff}");
        }
    }
}

#[test]
fn commits_of_several_accepted_positions_extend_the_context_in_order() {
    use specauf::model::Logits;
    let target = target("qwen3");
    let taps = vec![1usize, 3];
    let mut init = DFlashInitConfig::new(2, 4, 5);
    init.target_layer_ids = Some(taps.clone());
    let drafter = DFlashDrafter::init_random(target.config(), &init, 4).unwrap();
    let seq = prompt(20, 2);
    let mut cache = target.new_cache();
    let fwd = target.forward(&seq, &mut cache, &taps, Logits::None).unwrap();
    let feats = candle_core::Tensor::cat(&fwd.taps, 1).unwrap();
    let rows = |a: usize, n: usize| feats.narrow(0, a, n).unwrap();
    let block = |cache: &specauf::drafter::DFlashCache, start: usize| {
        drafter.forward_block(&target, cache, &drafter.block_ids(&[seq[start]]), start).unwrap()
    };
    let fresh = |start: usize| {
        let mut ctx = drafter.new_cache();
        drafter.extend_context(&mut ctx, &rows(0, start)).unwrap();
        ctx
    };
    let max_diff = |a: &candle_core::Tensor, b: &candle_core::Tensor| {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    };
    let mut p = DFlashProposer::reference(drafter.clone());
    // Prompt 0..8, first token at 8; then cycles accepting 2, 0 and 3 drafts.
    p.begin(&target, &seq[..8], Some(&rows(0, 8))).unwrap();
    let mut start = 8;
    for acc in [2usize, 0, 3, 1] {
        let draft = p.propose(&target, seq[start], start).unwrap();
        assert_eq!(p.context_len(), start);
        let want = fresh(start);
        assert_eq!(draft.tokens, drafter.draft(&target, &want, seq[start], start).unwrap(), "start {start}");
        // The proposer's context gives the same block hidden as a one-shot context over 0..start.
        let diff = max_diff(&block(p.cache().expect("a reference proposer has the reference cache"), start), &block(&want, start));
        assert!(diff < 1e-5, "start {start}: the proposer's context differs from a fresh one by {diff}");
        p.commit(&seq[start..start + acc + 1], Some(&rows(start, acc + 1)), start).unwrap();
        start += acc + 1;
    }
    // A commit that does not start where the context ends is refused.
    p.propose(&target, seq[start], start).unwrap();
    let err = p.commit(&seq[start + 1..start + 2], Some(&rows(start + 1, 1)), start + 1).unwrap_err();
    assert!(err.to_string().contains("block starts at"), "{err}");
}

/// The fast inference path (int8 or Q4_1 projections, KvCache context) against the reference
/// candle forward: the block hidden agrees to the blocks' precision, and the drafts of the fast
/// proposer equal the fast path's drafts over a context built in one go (the context is
/// extended correctly).
#[test]
fn the_fast_inference_path_matches_the_reference_forward_and_keeps_its_context_exact() {
    use specauf::drafter::{DFlashInfer, DrafterPrecision};
    use specauf::model::Logits;
    for family in FAMILIES {
        let target = target(family);
        let layers = target.config().num_hidden_layers;
        let taps = vec![1usize, layers - 1];
        let mut init = DFlashInitConfig::new(2, 4, 5);
        init.target_layer_ids = Some(taps.clone());
        let drafter = DFlashDrafter::init_random(target.config(), &init, 11).unwrap();
        let seq = prompt(24, 5);
        let mut cache = target.new_cache();
        let fwd = target.forward(&seq, &mut cache, &taps, Logits::None).unwrap();
        let feats = candle_core::Tensor::cat(&fwd.taps, 1).unwrap();
        let rows = |a: usize, n: usize| feats.narrow(0, a, n).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // The reference forward's block hidden at each start, and a fast path's at the same start.
        let starts = [3usize, 10, 17];
        let wants: Vec<Vec<f32>> = starts
            .iter()
            .map(|&start| {
                let mut ctx = drafter.new_cache();
                drafter.extend_context(&mut ctx, &feats.narrow(0, 0, start).unwrap()).unwrap();
                let want = drafter.forward_block(&target, &ctx, &drafter.block_ids(&[seq[start]]), start).unwrap();
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            })
            .collect();
        let fast = |infer: &DFlashInfer, start: usize| {
            let mut fc = infer.new_cache();
            infer.extend_context(&mut fc, &rows(0, start)).unwrap();
            let got = infer.forward_block(&target, &mut fc, seq[start], start).unwrap();
            (got, fc.len())
        };
        // Measured on the fixtures' random drafters, as a share of the hidden's scale: int8
        // 0.15–0.3%, Q4_1 (the default) up to 1.1%.
        for (precision, tolerance) in [(DrafterPrecision::Int8, 0.01f32), (DrafterPrecision::Q4, 0.03)] {
            let infer = DFlashInfer::with_precision(&drafter, precision).unwrap();
            let (mut worst, mut scale, mut same_top, mut total) = (0f32, 0f32, 0usize, 0usize);
            for (&start, want) in starts.iter().zip(&wants) {
                let (got, context) = fast(&infer, start);
                assert_eq!(context, start, "the block's K/V are not committed to the context");
                for (g, w) in got.iter().zip(want) {
                    worst = worst.max((g - w).abs());
                    scale = scale.max(w.abs());
                }
                // Top-1 of the target's head on the predicted rows.
                let h = target.config().hidden_size;
                let head = |x: &[f32]| {
                    let t = candle_core::Tensor::from_slice(&x[h..], (4 - 1, h), &candle_core::Device::Cpu).unwrap();
                    specauf::spec::sampling::argmax_rows(&target.lm_head(&t).unwrap()).unwrap()
                };
                let (a, b) = (head(&got), head(want));
                same_top += a.iter().zip(&b).filter(|(x, y)| x == y).count();
                total += a.len();
            }
            assert!(worst <= tolerance * scale, "{family} {precision:?}: fast hidden differs from the reference by {worst} (scale {scale})");
            assert!(same_top * 4 >= total * 3, "{family} {precision:?}: fast and reference drafts agree on only {same_top} of {total} positions");
        }
        // The same path with f32 projections: only the summation order differs.
        let infer32 = DFlashInfer::with_precision(&drafter, DrafterPrecision::F32).unwrap();
        for (&start, want) in starts.iter().zip(&wants) {
            let (got32, _) = fast(&infer32, start);
            let (d32, s32) = got32.iter().zip(want).fold((0f32, 0f32), |(d, s), (g, w)| (d.max((g - w).abs()), s.max(w.abs())));
            assert!(d32 <= 1e-4 * s32, "{family}: the f32 fast path differs from the reference by {d32} (scale {s32})");
        }
        let infer = DFlashInfer::new(&drafter).unwrap();

        // The proposer's incremental context vs one built in one go: the same drafts, bit for bit.
        let mut p = DFlashProposer::new(drafter.clone());
        p.begin(&target, &seq[..8], Some(&feats.narrow(0, 0, 8).unwrap())).unwrap();
        let mut start = 8;
        for acc in [2usize, 0, 3, 1] {
            let draft = p.propose(&target, seq[start], start).unwrap();
            let mut fc = infer.new_cache();
            infer.extend_context(&mut fc, &rows(0, start)).unwrap();
            assert_eq!(draft.tokens, infer.draft(&target, &mut fc, seq[start], start).unwrap(), "{family} start {start}");
            p.commit(&seq[start..start + acc + 1], Some(&feats.narrow(0, start, acc + 1).unwrap()), start).unwrap();
            start += acc + 1;
        }
    }
}

/// Cycles that skip drafting (`Generation::plain_block`, what the server does on a large batch),
/// one or two in a row, between drafting ones: the drafter catches up on every committed
/// position at its next draft, so its drafts equal those of a drafter whose context was built in
/// one go, and the output is plain greedy.
#[test]
fn cycles_without_drafts_keep_the_drafter_in_step_and_the_output_exact() {
    use specauf::drafter::DFlashInfer;
    use specauf::model::Logits;
    use specauf::spec::Generation;
    for family in FAMILIES {
        let target = target(family);
        let layers = target.config().num_hidden_layers;
        let mut init = DFlashInitConfig::new(2, 4, 5);
        init.target_layer_ids = Some(vec![1, layers - 1]);
        let drafter = DFlashDrafter::init_random(target.config(), &init, 5).unwrap();
        let infer = DFlashInfer::new(&drafter).unwrap();
        let prompt = prompt(7, 3);
        let n = 20;
        let want = reference_greedy(&target, &prompt, n);
        let mut p = DFlashProposer::new(drafter.clone());
        let mut g = Generation::start(&target, Some(&mut p as &mut dyn Proposer), &prompt, &greedy_cfg(n)).unwrap();
        let (mut cycle, mut plain) = (0usize, 0usize);
        while !g.is_finished() {
            let speculate = !matches!(cycle % 5, 1 | 2);
            let pending = if speculate { g.draft_block() } else { g.plain_block() }.unwrap();
            if speculate {
                // The drafts against a context built in one go over everything committed so far.
                let start = pending.start();
                let all: Vec<u32> = prompt.iter().copied().chain(g.committed().iter().copied()).collect();
                let mut cache = target.new_cache();
                let taps = target.forward(&all[..start], &mut cache, &[1, layers - 1], Logits::None).unwrap().taps;
                let feats = candle_core::Tensor::cat(&taps, 1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let mut fc = infer.new_cache();
                infer.extend_context(&mut fc, &feats).unwrap();
                let want_drafts = infer.draft(&target, &mut fc, all[start], start).unwrap();
                assert_eq!(pending.block()[1..], want_drafts[..], "{family} cycle {cycle}");
            } else {
                assert_eq!(pending.block().len(), 1, "a plain cycle verifies the last token alone");
                plain += 1;
            }
            let t1 = std::time::Instant::now();
            let out = {
                let mut item = [g.verify_item(&pending)];
                target.forward_batch(&mut item).unwrap().remove(0)
            };
            g.finish_cycle(pending, out, t1).unwrap();
            cycle += 1;
        }
        assert!(plain >= 2, "{family}: the test ran {plain} plain cycles");
        assert_eq!(g.finish().token_ids, want, "{family}");
    }
}
