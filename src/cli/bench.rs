//! `specauf bench decode|train|serve`: speed figures as medians of several runs, and a load
//! generator against the server (benchmarks, not timed tests).

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
    /// Load on `specauf serve` (loopback only): throughput, time to first token, latency, errors, τ.
    Serve(ServeBenchArgs),
}

#[derive(clap::Args, Debug)]
struct ServeBenchArgs {
    /// Concurrent streams.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Requests in all.
    #[arg(long, default_value_t = 16)]
    requests: usize,
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Generate --max-tokens every time, past EOS (fixed-length requests; τ then counts the
    /// tokens after EOS too).
    #[arg(long)]
    ignore_eos: bool,
    /// A running server on loopback (e.g. http://127.0.0.1:8000); without it the bench starts
    /// one in this process on an ephemeral loopback port with --model/--drafter.
    #[arg(long)]
    url: Option<String>,
    /// The model id to send (with --url; default: the server's, from /v1/models).
    #[arg(long)]
    served_model_name: Option<String>,
    #[arg(long)]
    api_key: Option<String>,
    #[arg(long, default_value = "smollm2")]
    model: String,
    #[arg(long)]
    drafter: Option<std::path::PathBuf>,
    #[arg(long)]
    block_size: Option<usize>,
    #[arg(long, default_value_t = WeightsMode::Q8)]
    weights: WeightsMode,
    /// Requests the in-process server decodes at once (default: --clients).
    #[arg(long)]
    max_concurrency: Option<usize>,
    /// The run stops after this many seconds; unfinished requests count as errors.
    #[arg(long, default_value_t = 600.0)]
    time_limit_s: f64,
    /// Print one JSON object instead of a table row.
    #[arg(long)]
    json: bool,
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
        BenchWhat::Serve(a) => serve_bench(a),
    }
}

/// Short chat prompts of different kinds, sent round-robin.
const SERVE_PROMPTS: [&str; 8] = [
    "What is the capital of France?",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain in two sentences why the sky is blue.",
    "List three uses of a paperclip.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did she sell altogether?",
    "Translate 'good morning, how are you?' into Spanish.",
    "Summarize the plot of Romeo and Juliet in one paragraph.",
    "What is 17 times 23? Show your steps.",
];

fn serve_bench(a: ServeBenchArgs) -> anyhow::Result<()> {
    use specauf::serve::{self, loadgen, ServeOptions, ServerHandle};
    if !(a.time_limit_s > 0.0 && a.time_limit_s.is_finite()) {
        anyhow::bail!("--time-limit-s must be a positive number");
    }
    // Either a server the user runs (loopback only), or one of our own.
    let (server, base_url, model, drafter_label) = match &a.url {
        Some(url) => {
            loadgen::check_loopback(url)?;
            let model = match &a.served_model_name {
                Some(m) => m.clone(),
                None => served_model(url, a.api_key.as_deref()).with_context(|| format!("asking {url}/v1/models for the model id"))?,
            };
            (None, url.trim_end_matches('/').to_string(), model, "(the server's)".to_string())
        }
        None => {
            let served = serve::load(&a.model, a.weights, a.drafter.as_deref(), a.block_size)?;
            let label = match &served.drafter {
                Some(d) => format!("{} B={}", d.kind(), d.block_size()),
                None => "none".to_string(),
            };
            let opts = ServeOptions {
                served_model_name: None,
                max_concurrency: a.max_concurrency.unwrap_or(a.clients).max(1),
                max_queue: a.requests.max(1),
                api_key: a.api_key.clone(),
                shutdown_grace: std::time::Duration::from_secs(2),
            };
            let handle = ServerHandle::spawn(served, opts, "127.0.0.1:0".parse()?)?;
            let url = handle.base_url();
            (Some(handle), url, a.model.clone(), label)
        }
    };
    let cfg = loadgen::LoadConfig {
        base_url: base_url.clone(),
        model,
        api_key: a.api_key.clone(),
        clients: a.clients,
        requests: a.requests,
        max_tokens: a.max_tokens,
        temperature: a.temperature,
        ignore_eos: a.ignore_eos,
        prompts: SERVE_PROMPTS.iter().map(|s| s.to_string()).collect(),
        time_limit: std::time::Duration::from_secs_f64(a.time_limit_s),
    };
    eprintln!(
        "bench serve: {} clients, {} requests of up to {} tokens at T = {} against {base_url} (drafter {drafter_label})",
        a.clients, a.requests, a.max_tokens, a.temperature
    );
    let r = loadgen::run(&cfg)?;
    if let Some(h) = server {
        h.shutdown()?;
    }
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["drafter"] = serde_json::Value::from(drafter_label);
        println!("{v}");
    } else {
        println!("| clients | drafter | requests | errors | tokens/s | req/s | TTFT p50 ms | TTFT p99 ms | latency p50 ms | latency p99 ms | τ |");
        println!("|---|---|---|---|---|---|---|---|---|---|---|");
        println!(
            "| {} | {} | {} | {} | {:.1} | {:.2} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} |",
            r.clients, drafter_label, r.requests, r.errors, r.tokens_per_s, r.requests_per_s, r.ttft_p50_ms, r.ttft_p99_ms, r.latency_p50_ms, r.latency_p99_ms, r.tau
        );
        if let Some(e) = &r.engine {
            let total = (e.prefill_s + e.draft_s + e.verify_s).max(1e-9);
            println!(
                "engine: prefill {:.1} s ({:.0}%), draft {:.1} s ({:.0}%), verify {:.1} s ({:.0}%); {:.1} blocks per verify forward",
                e.prefill_s,
                100.0 * e.prefill_s / total,
                e.draft_s,
                100.0 * e.draft_s / total,
                e.verify_s,
                100.0 * e.verify_s / total,
                e.mean_verify_batch
            );
        }
        for e in &r.error_samples {
            eprintln!("error: {e}");
        }
    }
    if r.errors > 0 {
        anyhow::bail!("{} of {} requests failed", r.errors, a.requests);
    }
    Ok(())
}

/// The first model id of a server's /v1/models.
fn served_model(url: &str, api_key: Option<&str>) -> anyhow::Result<String> {
    let client = reqwest::blocking::Client::builder().no_proxy().build()?;
    let mut req = client.get(format!("{}/v1/models", url.trim_end_matches('/')));
    if let Some(k) = api_key {
        req = req.bearer_auth(k);
    }
    let v: serde_json::Value = req.send()?.error_for_status()?.json()?;
    v["data"][0]["id"].as_str().map(str::to_string).context("no model in /v1/models")
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
