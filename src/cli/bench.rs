//! `specauf bench decode|train`: speed figures as medians of several runs (benchmarks, not
//! timed tests).

use std::time::Instant;

use anyhow::Context;
use specauf::model::{load_model, BatchItem, Logits, WeightsMode};

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
    /// Drafter training step time, tokens/s, peak memory and LM-head share, per objective.
    Train(TrainBenchArgs),
}

#[derive(clap::Args, Debug)]
struct TrainBenchArgs {
    #[arg(long, default_value = "smollm2")]
    model: String,
    /// Measure this trained drafter instead of a fresh one (AUF's support, and so its cost,
    /// depends on how often the drafter is right).
    #[arg(long)]
    drafter: Option<std::path::PathBuf>,
    /// Drafter layers (fresh drafter).
    #[arg(long, default_value_t = 2)]
    layers: usize,
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Anchors (blocks) per sequence.
    #[arg(long, default_value_t = 32)]
    anchors: usize,
    /// Sequence length.
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    #[arg(long, value_delimiter = ',', default_values = ["full", "decay", "auf", "auf+decay", "dpace"])]
    objectives: Vec<String>,
    #[arg(long, default_value_t = 5)]
    runs: usize,
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
    /// Batch sizes of the batched-decode rows: one step decodes one token of each of B
    /// sequences (each with its own cache at --context) in one forward.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 4, 16])]
    batches: Vec<usize>,
    /// Print one JSON object per mode instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.what {
        BenchWhat::Decode(a) => decode(a),
        BenchWhat::Train(a) => train_bench(a),
    }
}

fn decode(a: DecodeArgs) -> anyhow::Result<()> {
    if a.runs == 0 || a.context == 0 || a.verify == 0 || a.steps == 0 || a.batches.contains(&0) {
        anyhow::bail!("--runs, --context, --verify, --steps and every --batches value must be at least 1");
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
    // (mode, B, median ms per batched step), printed after the main table.
    let mut batched_rows = Vec::new();
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
        let batched = batched_decode(target, &prompt, &block, &a)?;
        if a.json {
            let rows: Vec<_> = batched.iter().map(|&(b, ms)| serde_json::json!({"batch": b, "step_ms": ms, "tokens_per_s": b as f64 * 1e3 / ms})).collect();
            println!(
                "{}",
                serde_json::json!({"weights": mode, "load_s": load_s, "prefill_tokens_per_s": prefill,
                    "decode_tokens_per_s": 1e3 / step, "decode_ms": step, "verify_tokens": a.verify,
                    "verify_ms": verify, "verify_over_decode": verify / step, "peak_rss_mib": peak,
                    "batched_decode": rows})
            );
        } else {
            println!(
                "| {mode:?} | {load_s:.2} | {prefill:.0} | {:.1} | {step:.2} | {verify:.1} | {:.2} | {peak:.0} |",
                1e3 / step,
                verify / step
            );
        }
        batched_rows.extend(batched.into_iter().map(|(b, ms)| (*mode, b, ms)));
        drop(m);
    }
    if !a.json {
        println!("\nBatched decode (one step: one token of each of B sequences at context {}, one forward_batch):\n", a.context);
        println!("| weights | B | ms/step | tokens/s | tokens/s ÷ B=1 |");
        println!("|---|---|---|---|---|");
        for &(mode, b, step_ms) in &batched_rows {
            let one = batched_rows.iter().find(|r| r.0 == mode && r.1 == 1).map(|r| 1e3 / r.2);
            let rate = b as f64 * 1e3 / step_ms;
            let ratio = one.map_or("-".to_string(), |o| format!("{:.2}", rate / o));
            println!("| {mode:?} | {b} | {step_ms:.2} | {rate:.1} | {ratio} |");
        }
    }
    Ok(())
}

/// Median ms of one batched decode step for each B in `a.batches`: B caches prefilled with
/// `prompt`, each step one token per sequence through one `forward_batch` (last logits).
fn batched_decode(target: &specauf::model::Target, prompt: &[u32], block: &[u32], a: &DecodeArgs) -> anyhow::Result<Vec<(usize, f64)>> {
    let mut prefilled = target.new_cache();
    target.forward(prompt, &mut prefilled, &[], Logits::None)?;
    let mut rows = Vec::new();
    for &b in &a.batches {
        let mut caches: Vec<_> = (0..b).map(|_| prefilled.clone()).collect();
        let mut steps = Vec::new();
        // The first step is a warm-up (cache growth, page faults).
        for s in 0..=a.steps {
            let tokens: Vec<[u32; 1]> = (0..b).map(|i| [block[(s + i) % block.len()]]).collect();
            let mut items: Vec<BatchItem> = caches
                .iter_mut()
                .zip(&tokens)
                .map(|(cache, t)| {
                    cache.truncate(a.context);
                    BatchItem { tokens: t, cache, taps: &[], logits: Logits::Last }
                })
                .collect();
            let t = Instant::now();
            target.forward_batch(&mut items)?;
            if s > 0 {
                steps.push(ms(t.elapsed()));
            }
        }
        rows.push((b, median(&mut steps)));
    }
    Ok(rows)
}

fn train_bench(a: TrainBenchArgs) -> anyhow::Result<()> {
    use specauf::drafter::blocks::{sample_anchors, step_rng};
    use specauf::data::Sequence;
    use specauf::data::features::target_features;
    use specauf::train::head::{BaseSupport, ChunkedHead, HeadConfig};
    use specauf::train::objective::Objective;
    use specauf::train::optim::{AdamW, AdamWConfig, CosineSchedule, ScheduleConfig};
    use specauf::drafter::default_mask_token;
    use specauf::train::trainable::TrainableDrafter;
    use specauf::train::trainer::{run_micro_batch, BatchItem, StepContext};
    use specauf::drafter::dflash::DFlashDrafter;

    if a.runs == 0 || a.anchors == 0 || a.seq_len < 4 {
        anyhow::bail!("--runs and --anchors must be at least 1 and --seq-len at least 4");
    }
    let m = load_model(&a.model, WeightsMode::Q8).with_context(|| format!("loading {}", a.model))?;
    let target = &m.target;
    // A real text repeated to the sequence length: the second half is the supervised answer.
    let text = "Speculative decoding lets a small drafter propose several tokens that the target then verifies in one forward pass. ";
    let mut ids = m.tokenizer.encode(&text.repeat(1 + a.seq_len / 16), false)?;
    ids.truncate(a.seq_len);
    if ids.len() < a.seq_len {
        anyhow::bail!("could not build a {}-token sequence", a.seq_len);
    }
    let mask: Vec<u8> = (0..ids.len()).map(|i| u8::from(i >= ids.len() / 4)).collect();
    let new_drafter = || -> anyhow::Result<DFlashDrafter> {
        Ok(match &a.drafter {
            Some(dir) => DFlashDrafter::load(dir, target.config())?,
            None => DFlashDrafter::init_random_for(target.config(), a.layers, a.block_size, default_mask_token(target.config()), 0)?,
        })
    };
    let probe = new_drafter()?;
    let features = target_features(target, &ids, probe.target_layer_ids())?;
    let lm_head = target.lm_head_weight_f32()?;
    eprintln!(
        "bench train: {} with a {}-layer DFlash drafter (block {}, {} parameters), {} anchors × {} positions on a {}-token sequence, {} threads, medians of {} steps",
        a.model,
        probe.config().num_hidden_layers,
        TrainableDrafter::block_size(&probe),
        probe.config().num_parameters(),
        a.anchors,
        TrainableDrafter::block_size(&probe) - 1,
        a.seq_len,
        rayon::current_num_threads(),
        a.runs
    );
    println!("| objective | step ms | supervised tokens/s | forward ms | LM head + CE ms | backward ms | head share | support/block | peak RSS MiB |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for name in &a.objectives {
        let objective: Objective = name.parse().map_err(|e| anyhow::anyhow!("objective {name:?}: {e}"))?;
        let drafter = new_drafter()?;
        let resolved = objective.resolve(TrainableDrafter::block_size(&drafter))?;
        let mut head = ChunkedHead::new(HeadConfig::default());
        let mut optim = AdamW::new(
            TrainableDrafter::named_vars(&drafter),
            AdamWConfig::default(),
            CosineSchedule::new(6e-4, 1000, &ScheduleConfig::default()),
        )?;
        let ctx = StepContext { target, drafter: &drafter, objective: &resolved, lm_head: &lm_head, seed: 0, steps: 1000, base_support: BaseSupport::default() };
        reset_peak_rss();
        let (mut step_ms, mut fwd, mut hd, mut bwd, mut support, mut rate) = (vec![], vec![], vec![], vec![], vec![], vec![]);
        for run in 0..=a.runs {
            let anchors = sample_anchors(&mask, a.anchors, &mut step_rng(0, run as u64, 0));
            let items = [BatchItem { seq: Sequence { input_ids: ids.clone(), loss_mask: mask.clone() }, anchors, features: features.clone() }];
            let t = Instant::now();
            let out = run_micro_batch(&ctx, &mut head, &items, run as u64, 1.0)?;
            optim.step(&out.grads)?;
            let total = ms(t.elapsed());
            if run > 0 {
                step_ms.push(total);
                fwd.push(out.forward_ms);
                hd.push(out.head_ms);
                bwd.push(out.backward_ms);
                support.push(out.counts.summary().support_size as f64);
                rate.push(out.tokens as f64 / (total / 1e3));
            }
        }
        let step = median(&mut step_ms);
        let head_ms = median(&mut hd);
        println!(
            "| {name} | {step:.0} | {:.0} | {:.0} | {head_ms:.0} | {:.0} | {:.0}% | {:.2} | {:.0} |",
            median(&mut rate),
            median(&mut fwd),
            median(&mut bwd),
            100.0 * head_ms / step,
            median(&mut support),
            peak_rss_bytes().map(mib).unwrap_or(f64::NAN)
        );
    }
    Ok(())
}
