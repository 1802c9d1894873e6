//! The VNNI kernel's weight prefetch, A/B in one process: a decode step and verify forwards of 8
//! and 16 tokens at context 64, each prefetch distance in turn within every round, so machine
//! load hits all of them alike. Medians over the rounds.
//!
//! cargo run --release --example prefetch_ab -- [q8|native] [DISTANCES, e.g. 0,32,64] [ROUNDS]

use std::time::Instant;

use specauf::model::{load_model, qgemm, Logits, WeightsMode};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.to_string());
    let mode: WeightsMode = arg(0, "q8").parse().map_err(anyhow::Error::msg)?;
    let distances: Vec<usize> = arg(1, "0,64").split(',').map(str::parse).collect::<Result<_, _>>()?;
    let rounds: usize = arg(2, "40").parse()?;
    let ctx = 64;
    let sizes = [1usize, 8, 16];
    let model = load_model("smollm2", mode)?;
    let target = &model.target;
    let text = "The quick brown fox jumps over the lazy dog while the cat watches from the window. ";
    let mut prompt = Vec::new();
    while prompt.len() < ctx + sizes[2] {
        prompt.extend(model.tokenizer.encode(text, false)?);
    }
    let mut cache = target.new_cache();
    target.forward(&prompt[..ctx], &mut cache, &[], Logits::Last)?;
    let mut t = vec![vec![Vec::new(); sizes.len()]; distances.len()];
    for _ in 0..rounds {
        for (i, &d) in distances.iter().enumerate() {
            qgemm::set_prefetch_lines(d);
            for (j, &b) in sizes.iter().enumerate() {
                let t0 = Instant::now();
                target.forward(&prompt[ctx..ctx + b], &mut cache, &[], Logits::All)?;
                t[i][j].push(t0.elapsed().as_secs_f64() * 1e3);
                cache.truncate(ctx);
            }
        }
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("prefetch_ab: {mode:?}, context {ctx}, {rounds} rounds, load {}", load.split_whitespace().take(3).collect::<Vec<_>>().join(" "));
    println!("| prefetch lines | decode ms | verify(8) ms | ÷ decode | verify(16) ms | ÷ decode |");
    println!("|---|---|---|---|---|---|");
    for (i, d) in distances.iter().enumerate() {
        let [dec, v8, v16] = [0, 1, 2].map(|j| median(t[i][j].clone()));
        println!("| {d} | {dec:.2} | {v8:.2} | {:.2} | {v16:.2} | {:.2} |", v8 / dec, v16 / dec);
    }
    Ok(())
}
