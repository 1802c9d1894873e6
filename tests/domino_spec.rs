//! The Domino proposer in the decode loop: greedy exactness on the fixture targets, B-1 drafts
//! per cycle, and drafts that equal a fresh drafter call over the committed context.

mod spec_support;

use candle_core::Tensor;
use spec_support::{prompt, reference_greedy, target, FAMILIES};
use specauf::drafter::{DFlashInitConfig, DominoDrafter, DominoInitConfig, DominoProposer};
use specauf::model::{Logits, Target};
use specauf::spec::{generate, Draft, FinishReason, GenerateConfig, Proposer, SpecError};

fn greedy_cfg(max_new_tokens: usize) -> GenerateConfig {
    GenerateConfig { max_new_tokens, temperature: 0.0, top_p: 1.0, seed: 0, eos_token_ids: vec![], accept_rule: Default::default() }
}

fn drafter(target: &Target, block_size: usize, taps: Vec<usize>, seed: u64) -> DominoDrafter {
    let mut backbone = DFlashInitConfig::new(2, block_size, 5);
    backbone.target_layer_ids = Some(taps);
    let mut init = DominoInitConfig::new(backbone);
    init.gru_hidden_dim = Some(16);
    init.emb_dim = Some(8);
    let d = DominoDrafter::init_random(target.config(), &init, seed).unwrap();
    // Larger branch weights so that the correction changes drafts, not just logits.
    for (name, var) in d.named_vars() {
        if name.starts_with("embed_proj.") {
            var.set(&(var.as_tensor() * 30.0).unwrap()).unwrap();
        }
    }
    d
}

#[test]
fn greedy_spec_decode_with_a_random_domino_drafter_equals_plain_greedy() {
    let n = 20;
    for family in FAMILIES {
        let target = target(family);
        let layers = target.config().num_hidden_layers;
        for b in [4usize, 8] {
            let mut proposer = DominoProposer::new(drafter(&target, b, vec![0, layers - 1], b as u64));
            for (pi, plen) in [1usize, 6, 13].into_iter().enumerate() {
                let prompt = prompt(plen, pi as u32 + 3);
                let want = reference_greedy(&target, &prompt, n);
                let out = generate(&target, Some(&mut proposer as &mut dyn Proposer), &prompt, &greedy_cfg(n)).unwrap();
                assert_eq!(out.token_ids, want, "{family} B={b} prompt {pi}");
                assert_eq!(out.finish_reason, FinishReason::Length);
                assert!(out.accept_lengths.iter().all(|&a| (1..=b).contains(&a)));
                assert!(out.draft_lengths.iter().all(|&k| k == b - 1), "Domino drafts B-1 tokens every cycle");
            }
        }
    }
}

/// Records every proposal of the wrapped proposer.
struct Recording {
    inner: DominoProposer,
    proposals: Vec<(usize, u32, Vec<u32>)>,
}

impl Proposer for Recording {
    fn block_size(&self) -> usize {
        self.inner.block_size()
    }
    fn target_layer_ids(&self) -> &[usize] {
        self.inner.target_layer_ids()
    }
    fn begin(&mut self, t: &Target, p: &[u32], f: Option<&Tensor>) -> Result<(), SpecError> {
        self.inner.begin(t, p, f)
    }
    fn propose(&mut self, t: &Target, last: u32, start: usize) -> Result<Draft, SpecError> {
        let d = self.inner.propose(t, last, start)?;
        assert_eq!(self.inner.context_len(), start, "the context holds exactly the positions before the block");
        self.proposals.push((start, last, d.tokens.clone()));
        Ok(d)
    }
    fn commit(&mut self, tokens: &[u32], f: Option<&Tensor>, start: usize) -> Result<(), SpecError> {
        self.inner.commit(tokens, f, start)
    }
}

#[test]
fn every_domino_draft_equals_a_fresh_call_over_the_committed_context() {
    let n = 24;
    for family in FAMILIES {
        let target = target(family);
        let layers = target.config().num_hidden_layers;
        let taps = vec![layers - 1, 0];
        let d = drafter(&target, 4, taps.clone(), 9);
        // The same drafter with the delta switched off (embed_proj.2 = 0): base logits only.
        let base_only = drafter(&target, 4, taps.clone(), 9);
        for (name, var) in base_only.named_vars() {
            if name == "embed_proj.2.weight" {
                var.set(&var.as_tensor().zeros_like().unwrap()).unwrap();
            }
        }
        let mut rec = Recording { inner: DominoProposer::new(d.clone()), proposals: vec![] };
        let prompt = prompt(7, 1);
        let out = generate(&target, Some(&mut rec as &mut dyn Proposer), &prompt, &greedy_cfg(n)).unwrap();
        let seq: Vec<u32> = prompt.iter().chain(&out.token_ids).copied().collect();
        let mut cache = target.new_cache();
        let fwd = target.forward(&seq, &mut cache, &taps, Logits::None).unwrap();
        let feats = Tensor::cat(&fwd.taps, 1).unwrap();
        assert_eq!(rec.proposals.len(), out.cycles);
        let mut corrected = 0;
        for (start, last, draft) in &rec.proposals {
            assert_eq!(*last, seq[*start], "{family}: the block starts with the last committed token");
            let mut ctx = d.backbone().new_cache();
            d.backbone().extend_context(&mut ctx, &feats.narrow(0, 0, *start).unwrap()).unwrap();
            let fresh = d.draft(&target, &ctx, *last, *start).unwrap();
            assert_eq!(&fresh, draft, "{family}: draft at start {start} differs from one over a fresh context");
            // The correction branch matters: some drafts differ from the base-only ones.
            if base_only.draft(&target, &ctx, *last, *start).unwrap() != fresh {
                corrected += 1;
            }
        }
        assert!(corrected > 0, "{family}: the GRU correction never changed a draft");
    }
}
