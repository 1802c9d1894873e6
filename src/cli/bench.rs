//! `specauf bench decode|train`: speed figures as medians of several runs (benchmarks, not
//! timed tests).

use std::time::Instant;

use anyhow::Context;
use specauf::model::{load_model, Logits, WeightsMode};

use super::util::{median, mib, ms, peak_rss_bytes, reset_peak_rss};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchWhat,
}

#[derive(clap::Subcommand, Debug)]
enum BenchWhat {
    /// Prefill and decode speed of the target, and the verify cost of a B-token forward.
    Decode(DecodeArgs),
}

#[derive(clap::Args, Debug)]
struct DecodeArgs {
    /// `smollm2` (the embedded default), an HF directory or a .gguf file.
    #[arg(long, default_value = "smollm2")]
    model: String,
    /// Weights modes to measure (default: all three).
    #[arg(long, value_delimiter = ',', default_values = ["q8", "f32", "native"])]
    weights: Vec<WeightsMode>,
    /// Repetitions; medians are reported.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Prompt length for prefill, and the context at which decode/verify are timed.
    #[arg(long, default_value_t = 256)]
    context: usize,
    /// Tokens in the verify forward.
    #[arg(long, default_value_t = 16)]
    verify: usize,
    /// Decode steps per run.
    #[arg(long, default_value_t = 32)]
    steps: usize,
    /// Print one JSON object per mode instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.what {
        BenchWhat::Decode(a) => decode(a),
    }
}

fn decode(a: DecodeArgs) -> anyhow::Result<()> {
    if a.runs == 0 || a.context == 0 || a.verify == 0 || a.steps == 0 {
        anyhow::bail!("--runs, --context, --verify and --steps must be at least 1");
    }
    eprintln!(
        "bench decode: model {}, {} runs, prefill {} tokens, {} decode steps and a {}-token verify at context {}, {} threads",
        a.model,
        a.runs,
        a.context,
        a.steps,
        a.verify,
        a.context,
        rayon::current_num_threads()
    );
    if !a.json {
        println!("| weights | load s | prefill tok/s | decode tok/s | decode ms/step | verify {} ms | verify ÷ decode step | peak RSS MiB |", a.verify);
        println!("|---|---|---|---|---|---|---|---|");
    }
    for mode in &a.weights {
        reset_peak_rss();
        let t = Instant::now();
        let m = load_model(&a.model, *mode).with_context(|| format!("loading {}", a.model))?;
        let load_s = t.elapsed().as_secs_f64();
        let target = &m.target;
        let vocab = target.config().vocab_size as u32;
        // A fixed, ordinary-looking token sequence (ids spread over the vocabulary).
        let prompt: Vec<u32> = (0..a.context as u32).map(|i| (i * 7919 + 1000) % vocab).collect();
        let block: Vec<u32> = (0..a.verify as u32).map(|i| (i * 104_729 + 77) % vocab).collect();
        let (mut prefill, mut step, mut verify) = (Vec::new(), Vec::new(), Vec::new());
        // One warm-up run (page faults, packing of quantized weights), then the timed runs.
        for run in 0..=a.runs {
            let mut cache = target.new_cache();
            let t = Instant::now();
            target.forward(&prompt, &mut cache, &[], Logits::Last)?;
            let p = t.elapsed();
            let mut steps = Vec::new();
            for s in 0..a.steps {
                cache.truncate(a.context);
                let t = Instant::now();
                target.forward(&[block[s % block.len()]], &mut cache, &[], Logits::Last)?;
                steps.push(ms(t.elapsed()));
            }
            cache.truncate(a.context);
            let t = Instant::now();
            target.forward(&block, &mut cache, &[], Logits::All)?;
            let v = t.elapsed();
            if run > 0 {
                prefill.push(a.context as f64 / p.as_secs_f64());
                step.push(median(&mut steps));
                verify.push(ms(v));
            }
        }
        let (prefill, step, verify) = (median(&mut prefill), median(&mut step), median(&mut verify));
        let peak = peak_rss_bytes().map(mib).unwrap_or(f64::NAN);
        if a.json {
            println!(
                "{}",
                serde_json::json!({"weights": mode, "load_s": load_s, "prefill_tokens_per_s": prefill,
                    "decode_tokens_per_s": 1e3 / step, "decode_ms": step, "verify_tokens": a.verify,
                    "verify_ms": verify, "verify_over_decode": verify / step, "peak_rss_mib": peak})
            );
        } else {
            println!(
                "| {mode:?} | {load_s:.2} | {prefill:.0} | {:.1} | {step:.2} | {verify:.1} | {:.2} | {peak:.0} |",
                1e3 / step,
                verify / step
            );
        }
        drop(m);
    }
    Ok(())
}
