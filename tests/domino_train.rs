//! Domino through `specauf::train::trainer` on the tiny llama fixture target: the same trainer,
//! objectives and checkpoints as DFlash; resume picks the drafter kind from the checkpoint.

use std::path::Path;

use specauf::drafter::DrafterKind;
use specauf::drafter::{DFlashDrafter, DominoDrafter};
use specauf::train::config::TrainConfig;
use specauf::train::trainer::{train, RunOptions};

mod common;
use common::{prepared, read_metrics as metrics, tiny_train_config};

fn config(data: &Path, out: &Path, extra: &[&str]) -> TrainConfig {
    let mut sets = vec!["drafter.kind=domino", "drafter.gru_hidden_dim=16", "drafter.emb_dim=8"];
    sets.extend_from_slice(extra);
    tiny_train_config(data, out, &sets)
}

#[test]
fn domino_trains_through_the_shared_trainer_and_resumes_from_its_own_checkpoint_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, data) = prepared(tmp.path(), 12);
    let extra = ["steps=6", "checkpoint_every=2", "eval_every=3", "objective=auf"];
    let a = tmp.path().join("a");
    let summary = train(&m, &config(&data, &a, &extra), &RunOptions::default()).unwrap();
    let final_dir = summary.final_dir.unwrap();
    assert!(DrafterKind::of_checkpoint(&final_dir).unwrap() == DrafterKind::Domino);
    let d = DominoDrafter::load(&final_dir, m.target.config()).unwrap();
    assert_eq!((d.config().gru_hidden_dim, d.config().emb_dim, d.block_size()), (16, 8, 4));
    let ma = metrics(&a);
    assert_eq!(ma.len(), 6);
    // Domino supervises all B block positions.
    assert!(ma.iter().all(|s| s.acc_per_position.len() == 4), "{:?}", ma[0].acc_per_position);
    assert!(ma.iter().all(|s| s.loss.is_finite() && s.grad_norm > 0.0));

    // Killed after step 5 (last checkpoint: step 4); the resumed run reloads a Domino drafter.
    let b = tmp.path().join("b");
    let cfg_b = config(&data, &b, &extra);
    train(&m, &cfg_b, &RunOptions { stop_after: Some(5), ..Default::default() }).unwrap();
    train(&m, &cfg_b, &RunOptions { resume: true, ..Default::default() }).unwrap();
    assert_eq!(ma, metrics(&b), "metrics of the resumed Domino run differ from the uninterrupted run");
    let wa = std::fs::read(a.join("final/model.safetensors")).unwrap();
    let wb = std::fs::read(b.join("final/model.safetensors")).unwrap();
    assert!(wa == wb, "final Domino weights differ after resume");
}

#[test]
fn a_tiny_domino_drafter_fits_a_tiny_fixed_set() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, data) = prepared(tmp.path(), 3);
    let out = tmp.path().join("run");
    let cfg = config(&data, &out, &["steps=150", "optim.lr=0.003", "num_anchors=64", "checkpoint_every=1000", "eval_every=0", "objective=full"]);
    let summary = train(&m, &cfg, &RunOptions::default()).unwrap();
    let last = summary.last.unwrap();
    let first = metrics(&out)[0].clone();
    println!(
        "domino fit: loss {:.3} -> {:.3}, acc {:.3} -> {:.3}, in-block accept length {:.3} -> {:.3} (B = 4)",
        first.loss, last.loss, first.acc, last.acc, first.accept_len, last.accept_len
    );
    // The same budget as DFlash's overfit test; Domino's in-block accept length runs to 1 + B.
    assert!(last.accept_len >= 3.0, "accept length {} after 150 steps on 3 sequences", last.accept_len);
    assert!(last.loss < 0.2 * first.loss, "loss {} -> {}", first.loss, last.loss);
}

#[test]
fn init_from_a_checkpoint_of_the_other_kind_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, data) = prepared(tmp.path(), 4);
    let dflash_dir = tmp.path().join("dflash");
    DFlashDrafter::init_random_for(m.target.config(), 1, 4, 0, 0).unwrap().save(&dflash_dir).unwrap();
    let init_from = format!("drafter.init_from={}", dflash_dir.display());
    let cfg = config(&data, &tmp.path().join("r"), &[init_from.as_str()]);
    let err = train(&m, &cfg, &RunOptions::default()).unwrap_err();
    assert!(err.to_string().contains("dflash checkpoint"), "{err}");
}
