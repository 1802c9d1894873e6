//! Data-parallel training on the CPU, on the tiny llama fixture: N ranks with b sequences each
//! train like one rank with N·b (in threads of one process, and as processes launched by
//! `specauf train --ranks N` reducing over TCP), and a run resumes on another number of ranks
//! with the steps it had.
//!
//! The objective's normaliser is `sequences`, so every rank divides its loss by the same count
//! and the mean over ranks is the single-rank gradient up to the order of float sums; weights
//! are compared within 1e-5 absolute after 3 AdamW steps (lr 6e-4).

use std::path::Path;

use specauf::train::trainer::{train, train_in_threads, RunOptions};
use specauf::util::progress::Silent;

mod common;
use common::{prepared, read_metrics, tiny_train_config as config};

const COMMON: [&str; 5] = ["steps=3", "checkpoint_every=1", "eval_every=0", "objective=decay:3", "objective.norm=sequences"];

fn with(extra: &[&str]) -> Vec<String> {
    COMMON.iter().chain(extra).map(|s| s.to_string()).collect()
}

fn cfg(data: &Path, out: &Path, extra: &[&str]) -> specauf::train::config::TrainConfig {
    let sets = with(extra);
    let refs: Vec<&str> = sets.iter().map(|s| s.as_str()).collect();
    config(data, out, &refs)
}

/// Every tensor of two drafters' final weights, the largest absolute difference.
fn max_weight_diff(a: &Path, b: &Path) -> f32 {
    let (ba, bb) = (std::fs::read(a.join("final/model.safetensors")).unwrap(), std::fs::read(b.join("final/model.safetensors")).unwrap());
    let (ta, tb) = (safetensors::SafeTensors::deserialize(&ba).unwrap(), safetensors::SafeTensors::deserialize(&bb).unwrap());
    let mut names = ta.names();
    names.sort();
    let mut nb = tb.names();
    nb.sort();
    assert_eq!(names, nb, "the two drafters hold different tensors");
    let mut worst = 0f32;
    for n in names {
        let (x, y) = (ta.tensor(n).unwrap(), tb.tensor(n).unwrap());
        assert_eq!((x.dtype(), x.shape()), (y.dtype(), y.shape()), "{n}");
        assert_eq!(x.dtype(), safetensors::Dtype::F32, "{n}");
        let f = |d: &[u8]| d.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect::<Vec<_>>();
        for (p, q) in f(x.data()).iter().zip(f(y.data())) {
            worst = worst.max((p - q).abs());
        }
    }
    worst
}

fn assert_same_losses(a: &Path, b: &Path) {
    let (ma, mb) = (read_metrics(a), read_metrics(b));
    assert_eq!(ma.len(), mb.len());
    for (x, y) in ma.iter().zip(&mb) {
        assert!((x.loss - y.loss).abs() <= 1e-5 * x.loss.abs().max(1.0), "step {}: loss {} vs {}", x.step, x.loss, y.loss);
        assert_eq!(x.tokens, y.tokens, "step {}: supervised rows", x.step);
    }
}

#[test]
fn two_ranks_in_threads_train_like_one_rank_with_twice_the_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, data) = prepared(tmp.path(), 10);
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    train(&m, &cfg(&data, &one, &["batch_sequences=2"]), &RunOptions::default()).unwrap();
    let summary = train_in_threads(&m, &cfg(&data, &two, &["batch_sequences=1"]), &RunOptions::default(), 2, &Silent).unwrap();
    assert_eq!(summary.steps_done, 3);
    assert_same_losses(&one, &two);
    let diff = max_weight_diff(&one, &two);
    println!("1 rank × 2 vs 2 ranks × 1: largest weight difference after 3 steps {diff:e}");
    assert!(diff <= 1e-5, "{diff}");
    // And the equivalence is not vacuous: one rank with one sequence trains differently.
    let half = tmp.path().join("half");
    train(&m, &cfg(&data, &half, &["batch_sequences=1"]), &RunOptions::default()).unwrap();
    assert!(max_weight_diff(&one, &half) > 1e-4);
}

#[test]
fn a_run_resumes_on_another_number_of_ranks_with_the_steps_it_had() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, data) = prepared(tmp.path(), 10);
    let whole = tmp.path().join("whole");
    train(&m, &cfg(&data, &whole, &["batch_sequences=2"]), &RunOptions::default()).unwrap();
    // 2 ranks × 1 stopped after step 1, resumed by one process: it keeps 2 sequences per step.
    let down = tmp.path().join("down");
    let c = cfg(&data, &down, &["batch_sequences=1"]);
    let stopped = train_in_threads(&m, &c, &RunOptions { stop_after: Some(1), ..Default::default() }, 2, &Silent).unwrap();
    assert_eq!((stopped.steps_done, stopped.final_dir.is_none()), (1, true));
    train(&m, &c, &RunOptions { resume: true, ..Default::default() }).unwrap();
    // 1 rank × 2 stopped after step 2, resumed by 2 ranks: 1 sequence each.
    let up = tmp.path().join("up");
    let c = cfg(&data, &up, &["batch_sequences=2"]);
    train(&m, &c, &RunOptions { stop_after: Some(2), ..Default::default() }).unwrap();
    train_in_threads(&m, &c, &RunOptions { resume: true, ..Default::default() }, 2, &Silent).unwrap();
    for run in [&down, &up] {
        assert_same_losses(&whole, run);
        let diff = max_weight_diff(&whole, run);
        println!("{}: largest weight difference from the uninterrupted run {diff:e}", run.display());
        assert!(diff <= 1e-5, "{}: {diff}", run.display());
    }
    // 2 sequences per step cannot be shared by 3 ranks: refused with what to do.
    let c = cfg(&data, &tmp.path().join("odd"), &["batch_sequences=2", "steps=2"]);
    train(&m, &c, &RunOptions { stop_after: Some(1), ..Default::default() }).unwrap();
    let e = train_in_threads(&m, &c, &RunOptions { resume: true, ..Default::default() }, 3, &Silent).unwrap_err().to_string();
    assert!(e.contains("3 ranks cannot share") && e.contains("divides 2"), "{e}");
}

#[test]
fn specauf_train_with_two_cpu_processes_trains_like_one_process_with_twice_the_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, data) = prepared(tmp.path(), 10);
    let model = tmp.path().join("tiny-llama");
    let one = tmp.path().join("one");
    let mut c = cfg(&data, &one, &["batch_sequences=2"]);
    c.model = model.display().to_string();
    train(&m, &c, &RunOptions::default()).unwrap();
    // The same tiny config with one sequence per rank, written for the CLI.
    let two = tmp.path().join("two");
    let mut c = cfg(&data, &two, &["batch_sequences=1"]);
    c.model = model.display().to_string();
    let config = tmp.path().join("two.json");
    std::fs::write(&config, serde_json::to_string(&c).unwrap()).unwrap();
    let args: Vec<String> = ["train", "--weights", "f32", "--ranks", "2", "--config"].iter().map(|s| s.to_string()).chain([config.display().to_string()]).collect();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_specauf")).args(&args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.matches("drafter written to").count(), 1, "rank 0 alone reports: {stdout}");
    assert_same_losses(&one, &two);
    let diff = max_weight_diff(&one, &two);
    println!("1 process × 2 vs 2 processes × 1 over TCP: largest weight difference {diff:e}");
    assert!(diff <= 1e-5, "{diff}");
    // A rank that cannot start stops the other with its error, not a hang: a mask token outside
    // the vocabulary fails on both ranks before the first step.
    let mut bad = args.clone();
    bad.extend(["--set", &format!("out={}", tmp.path().join("bad").display()), "--set", "drafter.mask_token_id=999999"].map(String::from));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_specauf")).args(&bad).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("999999") && stderr.contains("rank"), "{stderr}");
}
