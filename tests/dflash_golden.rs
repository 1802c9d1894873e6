//! The DFlash drafter against the z-lab reference implementation (dflash/model.py), on a tiny
//! drafter for the qwen3 fixture target. tests/fixtures/dflash/make_dflash_golden.py wrote the
//! drafter (with HF `save_pretrained`, as published drafters are written) and the reference's
//! outputs; rerun it to regenerate them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use specauf::drafter::{DFlashDrafter, DFlashProposer};
use specauf::model::{load_target, ModelLocation, Target, WeightsMode};
use specauf::spec::{generate, Draft, GenerateConfig, Proposer, SpecError};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn target() -> Target {
    load_target(&ModelLocation::from_path(&fixtures().join("models/qwen3")).unwrap(), WeightsMode::F32).unwrap()
}

fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("dflash/expected.safetensors"), &Device::Cpu).unwrap()
}

fn ids(t: &Tensor) -> Vec<u32> {
    t.to_vec1::<i64>().unwrap().into_iter().map(|x| x as u32).collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

const TOL: f32 = 1e-4;
const HINT: &str = "check q/k norm before RoPE, context keys' RoPE positions, fc → hidden_norm, GQA head grouping";

#[test]
fn a_published_style_checkpoint_loads_and_matches_the_reference_block_outputs() {
    let target = target();
    let d = DFlashDrafter::load(&fixtures().join("dflash/tiny-qwen3-b4"), target.config()).unwrap();
    assert_eq!((d.config().head_dim, d.config().intermediate_size, d.block_size()), (16, 96, 4));
    assert_eq!(d.target_layer_ids(), [0, 2]);
    let exp = expected();
    let seq = ids(&exp["seq"]);
    let feats = &exp["features"];
    let mut cache = d.new_cache();
    for (name, from, to) in [("a", 0usize, 8usize), ("b", 8, 11)] {
        d.extend_context(&mut cache, &feats.narrow(0, from, to - from).unwrap()).unwrap();
        let h = d.forward_block(&target, &cache, &d.block_ids(&[seq[to]]), to).unwrap();
        let diff = max_abs_diff(&h, &exp[&format!("hidden_{name}")]);
        println!("block at {to}: max |Δ| vs reference = {diff:.2e}");
        assert!(diff < TOL, "block at {to} differs from the reference by {diff}; {HINT}");
        assert_eq!(d.draft(&target, &cache, seq[to], to).unwrap(), ids(&exp[&format!("draft_{name}")]));
    }
}

#[test]
fn the_training_forward_matches_the_reference_block_outputs() {
    let target = target();
    let d = DFlashDrafter::load(&fixtures().join("dflash/tiny-qwen3-b4"), target.config()).unwrap();
    let exp = expected();
    let seq = ids(&exp["seq"]);
    let h = d.forward_train(&target, &exp["features"], &[8, 11], &d.block_ids(&[seq[8], seq[11]])).unwrap();
    for (b, name) in ["a", "b"].into_iter().enumerate() {
        let diff = max_abs_diff(&h.narrow(0, b * 4, 4).unwrap(), &exp[&format!("hidden_{name}")]);
        println!("training block {b}: max |Δ| vs reference = {diff:.2e}");
        assert!(diff < TOL, "training block {name} differs from the reference by {diff}; {HINT}");
    }
}

/// Keeps the hidden of every draft call.
struct Recording {
    inner: DFlashProposer,
    hidden: Vec<Tensor>,
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
        let draft = self.inner.propose(t, last, start)?;
        let d = self.inner.drafter().expect("a reference proposer holds its drafter");
        let h = d.forward_block(t, self.inner.cache().expect("a reference proposer has the reference cache"), &d.block_ids(&[last]), start).map_err(SpecError::proposer)?;
        self.hidden.push(h);
        Ok(draft)
    }
    fn commit(&mut self, tokens: &[u32], f: Option<&Tensor>, start: usize) -> Result<(), SpecError> {
        self.inner.commit(tokens, f, start)
    }
}

#[test]
fn the_decode_loop_reproduces_the_reference_dflash_generate() {
    let target = target();
    let d = DFlashDrafter::load(&fixtures().join("dflash/tiny-qwen3-b4"), target.config()).unwrap();
    let exp = expected();
    let prompt = ids(&exp["generate.prompt"]);
    // The reference (f32 candle) path is the one that reproduces the reference's hidden states.
    let mut rec = Recording { inner: DFlashProposer::reference(d.clone()), hidden: vec![] };
    let cfg = GenerateConfig {
        max_new_tokens: 12,
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
        eos_token_ids: vec![],
        accept_rule: Default::default(),
    };
    let out = generate(&target, Some(&mut rec as &mut dyn Proposer), &prompt, &cfg).unwrap();
    assert_eq!(out.token_ids, ids(&exp["generate.output_ids"]));
    let want_acc: Vec<usize> = ids(&exp["generate.acceptance_lengths"]).into_iter().map(|x| x as usize).collect();
    assert_eq!(out.accept_lengths, want_acc);
    assert_eq!(rec.hidden.len(), want_acc.len());
    for (i, h) in rec.hidden.iter().enumerate() {
        let diff = max_abs_diff(h, &exp[&format!("generate.hidden.{i}")]);
        assert!(diff < TOL, "draft call {i} differs from the reference by {diff}; {HINT}");
    }
    // The fast inference path (int8) gives the same output, and here the same acceptance.
    let mut fast = DFlashProposer::new(d);
    assert!(fast.is_fast());
    let out = generate(&target, Some(&mut fast as &mut dyn Proposer), &prompt, &cfg).unwrap();
    assert_eq!(out.token_ids, ids(&exp["generate.output_ids"]), "fast path output");
    assert_eq!(out.accept_lengths, want_acc, "fast path acceptance on the fixture");
}
