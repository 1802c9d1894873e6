//! Changes to the target's forward, A/B in one process: the VNNI kernel's weight prefetch, the
//! parts each thread's share of a matmul is cut into, and how the layers run: on host buffers by
//! a team of the pool's threads (`team`, the default), on host buffers with one pool dispatch per
//! matmul (`pool`), or as candle tensor ops (`tensor`). Each variant times a
//! decode step and verify forwards of 8 and 16 tokens at context 64; every round runs every
//! variant in turn, so machine load hits all of them alike. Medians over the rounds.
//!
//! cargo run --release --example forward_ab -- [q8|native] [VARIANTS] [ROUNDS] [SIZES]
//!
//! VARIANTS: comma-separated `LAYERS:PREFETCH[:PARTS]`, LAYERS `team`, `pool` or `tensor`,
//! PREFETCH in 64-byte lines (0: none), PARTS per pool thread (default
//! `qgemm::PARTS_PER_THREAD`: a matmul's tiles are cut into that many chunks per thread or team
//! member); default `team:64,pool:64,tensor:64`. SIZES: the forwards' token counts, comma-separated,
//! the first the decode step the others are divided by (default `1,8,16`).

use std::time::Instant;

use specauf::model::{load_model, qgemm, Logits, Target, WeightsMode};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.to_string());
    let mode: WeightsMode = arg(0, "q8").parse().map_err(anyhow::Error::msg)?;
    let variants: Vec<(String, usize, usize)> = arg(1, "team:64,pool:64,tensor:64")
        .split(',')
        .map(|v| {
            let f: Vec<&str> = v.split(':').collect();
            anyhow::ensure!(f.len() == 2 || f.len() == 3, "variant {v}: expected LAYERS:PREFETCH[:PARTS]");
            anyhow::ensure!(["team", "pool", "tensor"].contains(&f[0]), "variant {v}: layers are team, pool or tensor");
            let parts = f.get(2).map_or(Ok(qgemm::PARTS_PER_THREAD), |p| p.parse())?;
            Ok((f[0].to_string(), f[1].parse()?, parts))
        })
        .collect::<anyhow::Result<_>>()?;
    let rounds: usize = arg(2, "40").parse()?;
    let ctx = 64;
    let sizes: Vec<usize> = arg(3, "1,8,16").split(',').map(|s| s.parse()).collect::<Result<_, _>>()?;
    anyhow::ensure!(!sizes.is_empty() && !sizes.contains(&0), "SIZES: token counts of at least 1");
    let model = load_model("smollm2", mode)?;
    let host = &model.target;
    anyhow::ensure!(host.host_layers(), "{mode:?}: this target has no host layer forward to compare");
    let tensor: Target = host.clone().with_tensor_layers();
    let pool: Target = host.clone().with_pool_layers();
    let text = "The quick brown fox jumps over the lazy dog while the cat watches from the window. ";
    let mut prompt = Vec::new();
    while prompt.len() < ctx + sizes.iter().max().copied().unwrap_or(1) {
        prompt.extend(model.tokenizer.encode(text, false)?);
    }
    let mut cache = host.new_cache();
    host.forward(&prompt[..ctx], &mut cache, &[], Logits::Last)?;
    let mut t = vec![vec![Vec::new(); sizes.len()]; variants.len()];
    for _ in 0..rounds {
        for (i, (layers, lines, parts)) in variants.iter().enumerate() {
            qgemm::set_prefetch_lines(*lines);
            qgemm::set_parts_per_thread(*parts);
            let target = match layers.as_str() {
                "team" => host,
                "pool" => &pool,
                _ => &tensor,
            };
            for (j, &b) in sizes.iter().enumerate() {
                let t0 = Instant::now();
                target.forward(&prompt[ctx..ctx + b], &mut cache, &[], Logits::All)?;
                t[i][j].push(t0.elapsed().as_secs_f64() * 1e3);
                cache.truncate(ctx);
            }
        }
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("forward_ab: {mode:?}, context {ctx}, {rounds} rounds, load {}", load.split_whitespace().take(3).collect::<Vec<_>>().join(" "));
    let head: String = sizes[1..].iter().map(|b| format!(" verify({b}) ms | ÷ decode |")).collect();
    println!("| layers | prefetch lines | parts per thread | {} ms |{head}", if sizes[0] == 1 { "decode".to_string() } else { format!("verify({})", sizes[0]) });
    println!("|---|---|---|---|{}", "---|---|".repeat(sizes.len() - 1));
    for (i, (layers, lines, parts)) in variants.iter().enumerate() {
        let m: Vec<f64> = (0..sizes.len()).map(|j| median(t[i][j].clone())).collect();
        let cells: String = m[1..].iter().map(|v| format!(" {v:.2} | {:.2} |", v / m[0])).collect();
        println!("| {layers} | {lines} | {parts} | {:.2} |{cells}", m[0]);
    }
    Ok(())
}
