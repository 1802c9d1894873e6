//! Shared helpers of the speculative-decoding tests: fixture targets, a cache-free greedy
//! reference, and exact next-token distributions.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Once;

use candle_core::Tensor;
use specauf::model::{self, Logits, ModelLocation, Target, WeightsMode};
use specauf::spec::SamplingParams;

pub const FAMILIES: [&str; 3] = ["llama", "qwen2", "qwen3"];

static SINGLE_THREAD: Once = Once::new();

/// Loads a tiny fixture target in f32. The first call pins candle to one thread: on the
/// shared 2-core machine its thread pool makes these microsecond-sized forwards ~10x slower.
/// (Set before any candle work; every test calls this first, and `Once` holds the others.)
pub fn target(family: &str) -> Target {
    target_in(family, WeightsMode::F32)
}

/// Like [`target`], in weights mode `mode`.
pub fn target_in(family: &str, mode: WeightsMode) -> Target {
    SINGLE_THREAD.call_once(|| {
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            std::env::set_var("RAYON_NUM_THREADS", "1");
        }
    });
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models").join(family);
    let loc = ModelLocation::from_path(&dir).unwrap_or_else(|e| panic!("fixture {family}: {e}"));
    model::load_target(&loc, mode).unwrap_or_else(|e| panic!("fixture {family}: {e}"))
}

/// A deterministic prompt of `n` tokens.
pub fn prompt(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + salt * 11 + 5) % 251).collect()
}

/// Last-position logits of a fresh, cache-free prefill of `ids`: (V,).
pub fn fresh_last_logits(target: &Target, ids: &[u32]) -> Vec<f32> {
    let mut cache = target.new_cache();
    let out = target.forward(ids, &mut cache, &[], Logits::Last).expect("forward");
    out.logits.expect("logits").flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

pub fn argmax(v: &[f32]) -> u32 {
    let t = Tensor::new(v, &candle_core::Device::Cpu).unwrap();
    t.argmax(0).unwrap().to_scalar::<u32>().unwrap()
}

/// The target's greedy continuation, recomputed from scratch for every token (no KV cache,
/// no speculation): the reference the loop must reproduce.
pub fn reference_greedy(target: &Target, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut seq = prompt.to_vec();
    for _ in 0..n {
        let next = argmax(&fresh_last_logits(target, &seq));
        seq.push(next);
    }
    seq[prompt.len()..].to_vec()
}

/// Exact joint distribution of the first two generated tokens under `params`:
/// (t1, t2, probability) for every pair with positive probability.
pub fn exact_first_two(target: &Target, prompt: &[u32], params: SamplingParams) -> Vec<(u32, u32, f64)> {
    let p1 = params.probs(&fresh_last_logits(target, prompt), 0).unwrap();
    let mut cells = Vec::new();
    for (t1, &a) in p1.iter().enumerate() {
        if a == 0.0 {
            continue;
        }
        let mut seq = prompt.to_vec();
        seq.push(t1 as u32);
        let p2 = params.probs(&fresh_last_logits(target, &seq), 1).unwrap();
        for (t2, &b) in p2.iter().enumerate() {
            if b > 0.0 {
                cells.push((t1 as u32, t2 as u32, a * b));
            }
        }
    }
    cells
}

/// Pearson chi-square of `observed` pairs against the exact cells; cells expected to hold
/// fewer than 5 samples are pooled into one bin. Returns (statistic, degrees of freedom).
pub fn chi_square(cells: &[(u32, u32, f64)], observed: &[(u32, u32)]) -> (f64, usize) {
    let n = observed.len() as f64;
    let mut bins: Vec<(f64, f64)> = Vec::new(); // (expected, observed)
    let mut pooled = (0.0, 0.0);
    let mut seen = 0.0;
    for &(a, b, p) in cells {
        let count = observed.iter().filter(|&&(x, y)| x == a && y == b).count() as f64;
        seen += count;
        if p * n >= 5.0 {
            bins.push((p * n, count));
        } else {
            pooled.0 += p * n;
            pooled.1 += count;
        }
    }
    // Pairs outside the exact support belong to no cell: an impossible sample.
    assert_eq!(seen, n, "{} samples fell outside the exact support", n - seen);
    if pooled.0 > 0.0 {
        bins.push(pooled);
    }
    let stat = bins.iter().map(|(e, o)| (o - e) * (o - e) / e).sum();
    (stat, bins.len().saturating_sub(1))
}

/// Upper quantile of chi-square(df) at standard-normal score z (Wilson–Hilferty).
pub fn chi_square_critical(df: usize, z: f64) -> f64 {
    let k = df as f64;
    let h = 2.0 / (9.0 * k);
    k * (1.0 - h + z * h.sqrt()).powi(3)
}
