//! `specauf bench decode|train|serve`: speed figures as medians of several runs, and a load
//! generator against the server (benchmarks, not timed tests).

use anyhow::Context;
use specauf::model::WeightsMode;
use specauf::train::head::{Precision, HeadVocab};
use specauf::pipeline::bench::{self, DecodePlan, TrainBenchPlan};

use super::progress::Bars;

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
    /// Plain and DFlash speculative decoding on chat prompts, side by side with llama.cpp's
    /// llama-bench and `draft-dflash` when --llama-cpp is given: tokens/s, τ, verify ÷ decode.
    Spec(SpecArgs),
    /// Agreement of each weights mode (and llama.cpp) with the f32 reference: greedy match over
    /// N tokens, first divergence, |Δlogit| at the prompt's last position.
    Fidelity(FidelityArgs),
}

#[derive(clap::Args, Debug)]
struct SpecArgs {
    /// `smollm2` (the embedded default) or a .gguf file (llama.cpp runs the same file).
    #[arg(long, default_value = "smollm2")]
    model: String,
    /// The drafter (DFlash: config.json + model.safetensors).
    #[arg(long)]
    drafter: std::path::PathBuf,
    /// Verify blocks of B tokens instead of the drafter's trained size (only lower); llama.cpp
    /// then drafts B - 1 tokens too.
    #[arg(long)]
    block_size: Option<usize>,
    #[command(flatten)]
    drafter_run: super::drafter_run::DrafterRunArgs,
    /// Our weights modes to run.
    #[arg(long, value_delimiter = ',', default_values = ["q8", "native"])]
    weights: Vec<WeightsMode>,
    /// The first N of the fixed chat prompts.
    #[arg(long, default_value_t = 8)]
    prompts: usize,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Repetitions (after one warm-up of ours); medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Context at which decode steps and verify forwards are timed (llama-bench -d).
    #[arg(long, default_value_t = 64)]
    context: usize,
    /// Verify sizes timed against one decode step (llama-bench ppN).
    #[arg(long, value_delimiter = ',', default_values_t = [8usize, 16])]
    verify: Vec<usize>,
    /// llama.cpp's threads (-t, -td); ours follow RAYON_NUM_THREADS (default: all cores).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// A llama.cpp build (tools/llama_cpp/build.sh DIR): llama-bench and
    /// llama-speculative-simple run beside us.
    #[arg(long)]
    llama_cpp: Option<std::path::PathBuf>,
    /// The drafter converted for llama.cpp; without it, tools/llama_cpp/convert.sh converts
    /// --drafter into --work-dir.
    #[arg(long, requires = "llama_cpp")]
    llama_drafter: Option<std::path::PathBuf>,
    /// Where prompt files and a converted drafter go (default: $SPECAUF_HOME/bench-spec).
    #[arg(long)]
    work_dir: Option<std::path::PathBuf>,
    /// Also write the report as JSON here.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    #[command(flatten)]
    device: super::device::DeviceArgs,
}

#[derive(clap::Args, Debug)]
struct FidelityArgs {
    #[arg(long, default_value = "smollm2")]
    model: String,
    /// Modes compared with the f32 reference.
    #[arg(long, value_delimiter = ',', default_values = ["q8", "native"])]
    weights: Vec<WeightsMode>,
    /// The first N of the fixed chat prompts.
    #[arg(long, default_value_t = 20)]
    prompts: usize,
    /// Agreement over the first N tokens, for each N.
    #[arg(long, value_delimiter = ',', default_values_t = [32usize, 128])]
    tokens: Vec<usize>,
    /// A llama.cpp build with llama-server: its greedy output on the same prompt ids joins the table.
    #[arg(long)]
    llama_cpp: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Also write the report as JSON here.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
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
    #[command(flatten)]
    drafter_run: super::drafter_run::DrafterRunArgs,
    /// Target weights: auto (default: native for a GGUF of Q8_0/Q4_1 tensors, q8 otherwise), native (GGUF types as stored), q8 (int8 blocks), f32 (reference).
    #[arg(long, default_value_t = WeightsMode::default())]
    weights: WeightsMode,
    /// Requests the in-process server decodes at once (default: --clients).
    #[arg(long)]
    max_concurrency: Option<usize>,
    /// The in-process server's `serve --speculative-disable-by-batch-size` (0: always draft).
    #[arg(long, default_value_t = specauf::serve::DEFAULT_SPECULATIVE_DISABLE_BY_BATCH_SIZE)]
    speculative_disable_by_batch_size: usize,
    /// The run stops after this many seconds; unfinished requests count as errors.
    #[arg(long, default_value_t = 600.0)]
    time_limit_s: f64,
    /// Print one JSON object instead of a table row.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: super::device::DeviceArgs,
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
    /// Recompute the drafter's layers in the backward instead of keeping their activations
    /// (the train config's `activation_checkpointing`).
    #[arg(long)]
    activation_checkpointing: bool,
    /// The head's vocabulary (the train config's `head.vocab`): full, or draft (the lowest 8192
    /// ids here, standing in for a draft vocabulary ranked from data).
    #[arg(long, default_value_t = HeadVocab::Full)]
    head_vocab: HeadVocab,
    /// The precision of the head's products (the train config's `head.precision`): f32 or bf16
    /// (AVX512-BF16 CPUs).
    #[arg(long, default_value_t = Precision::F32)]
    head_precision: Precision,
    /// The precision of the drafter layers' linears and their gradients (the train config's
    /// `layer_precision`): f32 or bf16 (AVX512-BF16 CPUs).
    #[arg(long, default_value_t = Precision::F32)]
    layer_precision: Precision,
    #[command(flatten)]
    device: super::device::DeviceArgs,
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
    #[command(flatten)]
    device: super::device::DeviceArgs,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.what {
        BenchWhat::Decode(a) => decode(a),
        BenchWhat::Train(a) => train_bench(a),
        BenchWhat::Serve(a) => serve_bench(a),
        BenchWhat::Spec(a) => spec_bench(a),
        BenchWhat::Fidelity(a) => fidelity_bench(a),
    }
}

/// How many of the fixed chat prompts (`pipeline::spec_bench::CHAT_PROMPTS`) the load generator
/// sends, round-robin.
const SERVE_PROMPTS: usize = 8;

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
            let served = serve::load(&a.model, a.weights, a.device.choice(), a.drafter.as_deref(), a.block_size, &a.drafter_run.settings())?;
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
                speculative_disable_by_batch_size: a.speculative_disable_by_batch_size,
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
        prompts: specauf::pipeline::spec_bench::CHAT_PROMPTS[..SERVE_PROMPTS].iter().map(|s| s.to_string()).collect(),
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
    let plan = DecodePlan { model: a.model, weights: a.weights, runs: a.runs, context: a.context, verify: a.verify, steps: a.steps, batches: a.batches, device: a.device.choice() };
    eprintln!(
        "bench decode: model {}, {} runs, prefill {} tokens, {} decode steps and a {}-token verify at context {}, {} threads",
        plan.model,
        plan.runs,
        plan.context,
        plan.steps,
        plan.verify,
        plan.context,
        rayon::current_num_threads()
    );
    let rows = bench::decode(&plan, &Bars::new())?;
    if a.json {
        for r in &rows {
            let batched: Vec<_> =
                r.batched.iter().map(|&(b, ms)| serde_json::json!({"batch": b, "step_ms": ms, "tokens_per_s": b as f64 * 1e3 / ms})).collect();
            println!(
                "{}",
                serde_json::json!({"weights": r.weights, "load_s": r.load_s, "prefill_tokens_per_s": r.prefill_tokens_per_s,
                    "decode_tokens_per_s": 1e3 / r.decode_ms, "decode_ms": r.decode_ms, "verify_tokens": plan.verify,
                    "verify_ms": r.verify_ms, "verify_over_decode": r.verify_ms / r.decode_ms, "peak_rss_mib": r.peak_rss_mib,
                    "batched_decode": batched})
            );
        }
        return Ok(());
    }
    println!("| weights | load s | prefill tok/s | decode tok/s | decode ms/step | verify {} ms | verify ÷ decode step | peak RSS MiB |", plan.verify);
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {:?} | {:.2} | {:.0} | {:.1} | {:.2} | {:.1} | {:.2} | {:.0} |",
            r.weights,
            r.load_s,
            r.prefill_tokens_per_s,
            1e3 / r.decode_ms,
            r.decode_ms,
            r.verify_ms,
            r.verify_ms / r.decode_ms,
            r.peak_rss_mib.unwrap_or(f64::NAN)
        );
    }
    println!("\nBatched decode (one step: one token of each of B sequences at context {}, one forward_batch):\n", plan.context);
    println!("| weights | B | ms/step | tokens/s | tokens/s ÷ B=1 |");
    println!("|---|---|---|---|---|");
    for r in &rows {
        let one = r.batched.iter().find(|x| x.0 == 1).map(|x| 1e3 / x.1);
        for &(b, step_ms) in &r.batched {
            let rate = b as f64 * 1e3 / step_ms;
            let ratio = one.map_or("-".to_string(), |o| format!("{:.2}", rate / o));
            println!("| {:?} | {b} | {step_ms:.2} | {rate:.1} | {ratio} |", r.weights);
        }
    }
    Ok(())
}

fn train_bench(a: TrainBenchArgs) -> anyhow::Result<()> {
    let plan = TrainBenchPlan {
        model: a.model,
        drafter: a.drafter,
        layers: a.layers,
        block_size: a.block_size,
        anchors: a.anchors,
        seq_len: a.seq_len,
        objectives: a.objectives,
        runs: a.runs,
        device: a.device.choice(),
        activation_checkpointing: a.activation_checkpointing,
        head_vocab: a.head_vocab,
        head_precision: a.head_precision,
        layer_precision: a.layer_precision,
    };
    let (shape, rows) = bench::train(&plan)?;
    eprintln!(
        "bench train: {} with a {}-layer DFlash drafter (block {}, {} parameters), {} anchors × {} positions on a {}-token sequence, {} threads, head products in {}, layer products in {}, medians of {} steps",
        plan.model,
        shape.layers,
        shape.block_size,
        shape.parameters,
        shape.anchors,
        shape.block_size - 1,
        shape.seq_len,
        shape.threads,
        shape.head_products,
        shape.layer_products,
        plan.runs
    );
    println!("| objective | step ms | supervised tokens/s | forward ms | LM head + CE ms | backward ms | head share | support/block | peak RSS MiB |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0}% | {:.2} | {:.0} |",
            r.objective,
            r.step_ms,
            r.supervised_tokens_per_s,
            r.forward_ms,
            r.head_ms,
            r.backward_ms,
            100.0 * r.head_ms / r.step_ms,
            r.support_per_block,
            r.peak_rss_mib.unwrap_or(f64::NAN)
        );
    }
    Ok(())
}

/// The drafter in llama.cpp's GGUF: --llama-drafter, else converted once by
/// tools/llama_cpp/convert.sh into the work dir (named by a hash of the drafter's files).
fn llama_drafter(a: &SpecArgs, llama: &std::path::Path, work: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    if let Some(p) = &a.llama_drafter {
        return Ok(p.clone());
    }
    if specauf::drafter::DFlashConfig::read(&a.drafter).is_ok_and(|c| c.mask_embedding) {
        anyhow::bail!(
            "{} has a trainable mask_embedding (drafter.mask_embedding), which the DFlash format llama.cpp reads does not have; run bench spec without --llama-cpp for it",
            a.drafter.display()
        );
    }
    let mut bytes = std::fs::read(a.drafter.join("config.json")).with_context(|| format!("reading {}/config.json", a.drafter.display()))?;
    bytes.extend(std::fs::read(a.drafter.join("model.safetensors")).with_context(|| format!("reading {}/model.safetensors", a.drafter.display()))?);
    let out = work.join(format!("drafter-{:016x}-f32.gguf", specauf::util::hash::fnv1a64(&bytes)));
    if out.is_file() {
        return Ok(out);
    }
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/llama_cpp/convert.sh");
    if !script.is_file() {
        anyhow::bail!("no --llama-drafter given and {} is missing; convert the drafter with llama.cpp's convert_hf_to_gguf.py and pass it", script.display());
    }
    eprintln!("bench spec: converting {} for llama.cpp with {}", a.drafter.display(), script.display());
    let status = std::process::Command::new(&script)
        .arg(llama)
        .arg(&a.drafter)
        .arg(&out)
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !status.success() || !out.is_file() {
        anyhow::bail!("{} failed ({status}); convert the drafter yourself and pass --llama-drafter", script.display());
    }
    Ok(out)
}

fn write_json(path: &std::path::Path, v: &impl serde::Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(v)?;
    specauf::util::fs::write_atomic(path, text.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

fn spec_bench(a: SpecArgs) -> anyhow::Result<()> {
    use specauf::pipeline::spec_bench::{self, LlamaPlan, SpecBenchPlan};
    let work = match &a.work_dir {
        Some(w) => w.clone(),
        None => specauf::assets::home()?.join("bench-spec"),
    };
    let llama = match &a.llama_cpp {
        Some(dir) => {
            std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
            Some(LlamaPlan { dir: dir.clone(), drafter_gguf: llama_drafter(&a, dir, &work)?, work_dir: work.clone() })
        }
        None => None,
    };
    let plan = SpecBenchPlan {
        model: a.model.clone(),
        drafter: a.drafter.clone(),
        block_size: a.block_size,
        drafter_run: a.drafter_run.settings(),
        weights: a.weights.clone(),
        prompts: a.prompts,
        max_new_tokens: a.max_new_tokens,
        runs: a.runs,
        context: a.context,
        verifies: a.verify.clone(),
        threads: a.threads,
        llama,
        specauf_exe: std::env::current_exe().ok(),
        device: a.device.choice(),
    };
    let r = spec_bench::spec(&plan, &Bars::new())?;
    let load = |l: Option<f64>| l.map_or("?".to_string(), |l| format!("{l:.2}"));
    println!(
        "bench spec: {} ({}), drafter {} at B = {}{}, {} chat prompts × {} new tokens, T = 0; our threads {}, llama.cpp threads {}; medians of {} runs; 1-min load {} before, {} after\n",
        r.model,
        r.target_path,
        r.drafter,
        r.block_size,
        r.draft_vocab.map_or(String::new(), |k| format!(" (our drafts over the top {k} ids of its draft vocabulary)")),
        r.prompts, r.max_new_tokens, r.threads_ours, r.threads_llama, r.runs, load(r.load_before), load(r.load_after)
    );
    let vcols: String = plan.verifies.iter().map(|b| format!(" verify({b}) ÷ decode |")).collect();
    println!("| engine | AR tok/s | speculative tok/s | τ | speculative ÷ AR | decode ms (ctx {}) |{vcols} exact at T = 0 | peak RSS MiB |", r.context);
    println!("|---|---|---|---|---|---|{}---|---|", "---|".repeat(plan.verifies.len()));
    for row in &r.rows {
        let v: String = row.verify_over_decode.iter().map(|(_, x)| format!(" {x:.2} |")).collect();
        let exact = row.exact_prompts.map_or("-".to_string(), |e| format!("{e}/{}", r.prompts));
        let rss = row.peak_rss_mib.map_or("-".to_string(), |m| format!("{m:.0}"));
        println!(
            "| {} | {:.1} | {:.1} | {:.2} | {:.2}× | {:.2} |{v} {exact} | {rss} |",
            row.engine, row.ar_tokens_per_s, row.spec_tokens_per_s, row.tau, row.spec_over_ar(), row.decode_ms
        );
    }
    println!("\nPeak RSS: one speculative generation as its own process (ours: `specauf generate --drafter`, llama.cpp: llama-speculative-simple), target and drafter loaded.");
    if let Some(peer) = r.rows.iter().find(|x| x.engine == "llama.cpp") {
        println!("\nRatios to llama.cpp (AR: our AR on the prompts ÷ llama-bench tg{}; speculative: same prompts, same drafter):\n", r.max_new_tokens);
        println!("| engine | AR ÷ llama.cpp AR | speculative ÷ llama.cpp speculative |");
        println!("|---|---|---|");
        for row in r.rows.iter().filter(|x| x.engine != "llama.cpp") {
            println!("| {} | {:.2}× | {:.2}× |", row.engine, row.ar_tokens_per_s / peer.ar_tokens_per_s, row.spec_tokens_per_s / peer.spec_tokens_per_s);
        }
    }
    if let Some(out) = &a.out {
        write_json(out, &r)?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}

fn fidelity_bench(a: FidelityArgs) -> anyhow::Result<()> {
    use specauf::pipeline::fidelity::{self, FidelityPlan};
    let plan = FidelityPlan { model: a.model.clone(), weights: a.weights.clone(), prompts: a.prompts, lengths: a.tokens.clone(), llama: a.llama_cpp.clone(), threads: a.threads };
    let r = fidelity::fidelity(&plan, &Bars::new())?;
    println!("bench fidelity: {}, {} chat prompts, greedy (T = 0), reference: our f32 mode\n", r.model, r.prompts);
    let cols: String = plan.lengths.iter().map(|n| format!(" full match over {n} | mean first divergence ({n}) |")).collect();
    println!("| engine |{cols} mean \\|Δlogit\\| (last prompt position) | max \\|Δlogit\\| |");
    println!("|---|{}---|---|", "---|---|".repeat(plan.lengths.len()));
    for row in &r.rows {
        let c: String = row
            .agreement
            .iter()
            .map(|g| format!(" {}/{} | {} |", g.full_match, r.prompts, g.mean_divergence().map_or("-".to_string(), |d| format!("{d:.1}"))))
            .collect();
        let f = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.4}"));
        println!("| {} |{c} {} | {} |", row.engine, f(row.mean_abs_dlogit), f(row.max_abs_dlogit));
    }
    if let Some(out) = &a.out {
        write_json(out, &r)?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}
