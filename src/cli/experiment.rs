//! `specauf experiment paper [--config experiments/paper.json] [--out DIR] [--docs DIR]`: the
//! paper's comparison on the embedded default — DFlash with decay (the baseline), auf and
//! auf+decay, full and dpace for context, Domino with decay and auf — on identical data
//! (target-regenerated), steps, seed and evaluation. Resumable: the data stage resumes its
//! regeneration, each arm resumes its training from its last checkpoint and is skipped once
//! finished, and the evaluation is skipped once written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;
use specauf::eval::experiment::{bootstrap, check_findings, paired, point_estimates, table, write_training_curves, Arm, ArmSummary, CurvePoint, BenchTau, RequestTau};
use specauf::model::WeightsMode;
use specauf::train::trainer::StepMetrics;

use super::{eval, prepare, train};

#[derive(clap::Args, Debug)]
pub struct ExperimentArgs {
    /// Which experiment: `paper`.
    pub name: String,
    #[arg(long, default_value = "experiments/paper.json")]
    pub config: PathBuf,
    /// Working folder (default: $SPECAUF_HOME/experiments/NAME).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Where results.md / results.json / the plots go.
    #[arg(long, default_value = "docs")]
    pub docs: PathBuf,
    /// Use this already prepared dataset instead of preparing one.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Train this many arms at once, each a `specauf train` child process with
    /// cores/jobs threads (its log in arms/NAME/train.log). On 2 cores, 2 one-thread jobs
    /// train about a third more steps per second than one two-thread job.
    #[arg(long, default_value_t = 1)]
    pub jobs: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PaperConfig {
    #[serde(rename = "_comment", default)]
    _comment: Option<String>,
    model: String,
    data: DataCfg,
    train: TrainCfg,
    arms: Vec<Arm>,
    eval: EvalCfg,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DataCfg {
    conversations: usize,
    max_len: usize,
    max_new_tokens: usize,
    features: Vec<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrainCfg {
    steps: u64,
    layers: usize,
    block_size: usize,
    target_layer_ids: Vec<usize>,
    num_anchors: usize,
    batch_sequences: usize,
    lr: f64,
    seed: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EvalCfg {
    benchmarks: Vec<String>,
    limit: usize,
    max_new_tokens: usize,
    bootstrap_samples: usize,
}

pub fn run(a: ExperimentArgs) -> anyhow::Result<()> {
    if a.name != "paper" {
        bail!("unknown experiment {:?}; available: paper", a.name);
    }
    let text = std::fs::read_to_string(&a.config).with_context(|| format!("reading {}", a.config.display()))?;
    let cfg: PaperConfig = serde_json::from_str(&text).with_context(|| format!("parsing {}", a.config.display()))?;
    if cfg.arms.is_empty() {
        bail!("{}: no arms", a.config.display());
    }
    let out = match &a.out {
        Some(p) => p.clone(),
        None => specauf::assets::home()?.join("experiments").join(&a.name),
    };
    std::fs::create_dir_all(&out)?;
    // As a user would type it (the binary as `specauf`, wherever it was built).
    let command = std::iter::once("specauf".to_string()).chain(std::env::args().skip(1)).collect::<Vec<_>>().join(" ");
    eprintln!("experiment {}: {} arms, working folder {}", a.name, cfg.arms.len(), out.display());

    // 1. Shared data: the target's own greedy answers, with cached features.
    let data = match &a.data {
        Some(d) => d.clone(),
        None => out.join("data"),
    };
    if !data.join("manifest.json").is_file() {
        prepare::run(prepare::PrepareArgs {
            model: cfg.model.clone(),
            data: "sharegpt".into(),
            out: data.clone(),
            max_conversations: Some(cfg.data.conversations),
            max_len: Some(cfg.data.max_len),
            max_turns: Some(1),
            eval_fraction: 0.05,
            regenerate: Some(specauf::train::regenerate::RegenerateMode::Greedy),
            temperature: 0.8,
            top_p: 1.0,
            max_new_tokens: cfg.data.max_new_tokens,
            workers: 2,
            weights: WeightsMode::Q8,
            features: Some(cfg.data.features.clone()),
            feature_dtype: specauf::train::data::FeatureDtype::F16,
            feature_weights: WeightsMode::Q8,
            seed: 0,
            shard_tokens: specauf::train::prepare::DEFAULT_SHARD_TOKENS,
        })
        .context("preparing the shared data")?;
    }

    // 2. Every arm, identical but for drafter and objective.
    if a.jobs == 0 {
        bail!("--jobs must be at least 1");
    }
    let mut pending = Vec::new();
    for (i, arm) in cfg.arms.iter().enumerate() {
        let dir = out.join("arms").join(&arm.name);
        if dir.join("final/model.safetensors").is_file() {
            eprintln!("arm {}/{} {}: trained (cached)", i + 1, cfg.arms.len(), arm.name);
        } else {
            pending.push(arm);
        }
    }
    if a.jobs == 1 {
        for arm in &pending {
            let dir = out.join("arms").join(&arm.name);
            eprintln!("arm {}: training", arm.name);
            train::run(train::TrainArgs {
                config: None,
                set: arm_settings(&cfg, arm, &data, &dir),
                resume: dir.join("config.json").is_file(),
                weights: WeightsMode::Q8,
            })
            .with_context(|| format!("training arm {}", arm.name))?;
        }
    } else if !pending.is_empty() {
        train_in_parallel(&cfg, &pending, &data, &out, a.jobs)?;
    }

    // 3. One evaluation of every arm on the same prompts (one shared AR baseline).
    let eval_dir = out.join("eval");
    if !eval_dir.join("requests.jsonl").is_file() {
        eval::run(eval::EvalArgs {
            model: cfg.model.clone(),
            drafter: cfg.arms.iter().map(|arm| out.join("arms").join(&arm.name).join("final").display().to_string()).collect(),
            label: cfg.arms.iter().map(|arm| arm.name.clone()).collect(),
            benchmarks: cfg.eval.benchmarks.clone(),
            limit: Some(cfg.eval.limit),
            max_new_tokens: cfg.eval.max_new_tokens,
            temperature: 0.0,
            top_p: 1.0,
            block_size: None,
            seed: 0,
            weights: WeightsMode::Q8,
            system: None,
            out: eval_dir.clone(),
        })
        .context("evaluating the arms")?;
    }

    // 4. Summary with bootstrap intervals.
    let config_json: serde_json::Value = serde_json::from_str(&text)?;
    summarize(&cfg, &a.config, &config_json, &out, &eval_dir, &a.docs, &command)
}

/// The `--set` overrides of one arm: everything but drafter kind and objective is the
/// experiment's, so arms differ only there.
fn arm_settings(cfg: &PaperConfig, arm: &Arm, data: &Path, dir: &Path) -> Vec<String> {
    let t = &cfg.train;
    vec![
        format!("model={}", cfg.model),
        format!("data={}", data.display()),
        format!("out={}", dir.display()),
        format!("steps={}", t.steps),
        format!("objective={}", arm.objective),
        format!("drafter.kind={}", arm.drafter),
        format!("drafter.layers={}", t.layers),
        format!("drafter.block_size={}", t.block_size),
        format!("drafter.target_layer_ids={:?}", t.target_layer_ids),
        format!("num_anchors={}", t.num_anchors),
        format!("batch_sequences={}", t.batch_sequences),
        format!("optim.lr={}", t.lr),
        format!("seed={}", t.seed),
        "checkpoint_every=50".into(),
        format!("eval_every={}", t.steps),
        "eval_sequences=12".into(),
    ]
}

/// Trains `arms` as `specauf train` child processes, at most `jobs` at a time, each with
/// cores/jobs threads. One progress bar follows the steps of all of them (their metrics.jsonl);
/// a failed arm is reported with the tail of its log after the others have finished, so that no
/// finished work is lost; rerunning resumes it.
fn train_in_parallel(cfg: &PaperConfig, arms: &[&Arm], data: &Path, out: &Path, jobs: usize) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating the specauf binary to run the arms")?;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads = (cores / jobs).max(1);
    eprintln!("training {} arms, {jobs} at a time, {threads} thread(s) each; logs in <arm>/train.log", arms.len());
    let pb = super::util::progress_bar(cfg.train.steps * arms.len() as u64, "arms");
    let steps_done = |dir: &Path| -> u64 {
        std::fs::read_to_string(dir.join("metrics.jsonl")).map(|t| t.lines().filter(|l| !l.trim().is_empty()).count() as u64).unwrap_or(0)
    };
    let mut queue: std::collections::VecDeque<&Arm> = arms.iter().copied().collect();
    let mut running: Vec<(&Arm, std::process::Child)> = Vec::new();
    let mut failed: Vec<(String, String)> = Vec::new();
    loop {
        while running.len() < jobs {
            let Some(arm) = queue.pop_front() else { break };
            let dir = out.join("arms").join(&arm.name);
            std::fs::create_dir_all(&dir)?;
            let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("train.log"))?;
            let mut cmd = std::process::Command::new(&exe);
            cmd.arg("train");
            for s in arm_settings(cfg, arm, data, &dir) {
                cmd.arg("--set").arg(s);
            }
            if dir.join("config.json").is_file() {
                cmd.arg("--resume");
            }
            cmd.env("RAYON_NUM_THREADS", threads.to_string())
                .stdin(std::process::Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            let child = cmd.spawn().with_context(|| format!("starting the training of arm {}", arm.name))?;
            pb.println(format!("arm {}: training (pid {})", arm.name, child.id()));
            running.push((arm, child));
        }
        if running.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_secs(2));
        let mut still = Vec::new();
        for (arm, mut child) in running {
            match child.try_wait()? {
                None => still.push((arm, child)),
                Some(status) => {
                    let dir = out.join("arms").join(&arm.name);
                    if status.success() && dir.join("final/model.safetensors").is_file() {
                        pb.println(format!("arm {}: trained", arm.name));
                    } else {
                        let log = std::fs::read_to_string(dir.join("train.log")).unwrap_or_default();
                        let lines: Vec<&str> = log.lines().collect();
                        pb.println(format!("arm {}: FAILED ({status})", arm.name));
                        failed.push((arm.name.clone(), lines[lines.len().saturating_sub(5)..].join("\n")));
                    }
                }
            }
        }
        running = still;
        let done: u64 = arms.iter().map(|arm| steps_done(&out.join("arms").join(&arm.name)).min(cfg.train.steps)).sum();
        pb.set_position(done);
    }
    pb.finish_and_clear();
    if !failed.is_empty() {
        let detail: Vec<String> = failed.iter().map(|(n, t)| format!("arm {n}:\n{t}")).collect();
        bail!(
            "{} arm(s) failed; the others are kept. Fix the cause and rerun the same command to resume:\n{}",
            failed.len(),
            detail.join("\n")
        );
    }
    Ok(())
}

fn summarize(cfg: &PaperConfig, config_path: &Path, config_json: &serde_json::Value, out: &Path, eval_dir: &Path, docs: &Path, command: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(eval_dir.join("requests.jsonl")).context("reading requests.jsonl")?;
    let full: Vec<specauf::eval::runner::RequestRecord> =
        text.lines().filter(|l| !l.trim().is_empty()).map(serde_json::from_str).collect::<Result<_, _>>().context("reading requests.jsonl")?;
    let records: Vec<RequestTau> = full.iter().map(RequestTau::from).collect();
    let t = table(&records);
    let names: Vec<String> = cfg.arms.iter().map(|a| a.name.clone()).collect();
    let boots = bootstrap(&t, &names, cfg.eval.bootstrap_samples, 0);
    let mut arms_json = serde_json::Map::new();
    let mut summaries: Vec<(String, ArmSummary)> = Vec::new();
    let mut curves = Vec::new();
    for arm in &cfg.arms {
        let run = out.join("arms").join(&arm.name);
        let lines = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default();
        let metrics: Vec<StepMetrics> = lines.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        let held_out = metrics.iter().rev().find_map(|m| m.eval.clone());
        curves.push((
            arm.name.clone(),
            metrics
                .iter()
                .map(|m| CurvePoint { step: m.step, loss: m.loss as f64, acc: m.acc as f64, accept_len: m.accept_len as f64 })
                .collect::<Vec<_>>(),
        ));
        let (per, avg) = point_estimates(&t, &arm.name);
        let (cis, avg_ci, _) = boots.get(&arm.name).cloned().unwrap_or_default();
        let benchmarks: BTreeMap<String, BenchTau> = per
            .iter()
            .map(|(b, (tau, n))| (b.clone(), BenchTau { tau: *tau, tau_ci: cis.get(b).copied().unwrap_or([f64::NAN; 2]), requests: *n }))
            .collect();
        let s = ArmSummary {
            drafter: arm.drafter.clone(),
            objective: arm.objective.clone(),
            benchmarks,
            average_tau: avg,
            average_tau_ci: avg_ci,
            acc: held_out.as_ref().map(|e| e.acc as f64).unwrap_or(f64::NAN),
            support_size: held_out.as_ref().map(|e| e.support_size as f64).unwrap_or(f64::NAN),
            accept_len: held_out.as_ref().map(|e| e.accept_len as f64).unwrap_or(f64::NAN),
        };
        arms_json.insert(arm.name.clone(), serde_json::to_value(&s)?);
        summaries.push((arm.name.clone(), s));
    }
    let comparisons: Vec<_> = [
        ("dflash-auf", "dflash-decay"),
        ("dflash-auf+decay", "dflash-decay"),
        ("dflash-auf+decay", "dflash-auf"),
        ("dflash-auf", "dflash-full"),
        ("dflash-auf", "dflash-dpace"),
        ("domino-auf", "domino-decay"),
    ]
        .iter()
        .filter_map(|(x, y)| paired(&t, &boots, x, y))
        .collect();
    let findings = check_findings(&summaries, &comparisons);
    std::fs::create_dir_all(docs)?;
    let machine = specauf::eval::report::Machine::detect();
    let json = serde_json::json!({
        "arms": arms_json,
        "comparisons": comparisons,
        "findings": findings,
        "command": command,
        "machine": machine,
        "date": specauf::eval::report::utc_now_rfc3339(),
        "config": config_json,
    });
    specauf::eval::report::write_atomic(&docs.join("results.json"), serde_json::to_string_pretty(&json)?.as_bytes())?;
    write_training_curves(&docs.join("training_curves.svg"), &curves, 50).map_err(|e| anyhow::anyhow!("training curves: {e}"))?;
    // τ per benchmark and acceptance per position of every arm, redrawn from the evaluation's
    // records (so a summary rerun picks up plot changes without re-evaluating).
    let order: Vec<specauf::eval::datasets::BenchmarkName> = cfg.eval.benchmarks.iter().filter_map(|b| b.parse().ok()).collect();
    let runs: Vec<_> = cfg
        .arms
        .iter()
        .map(|arm| specauf::eval::runner::summarize(&full, &arm.name, cfg.train.block_size, &order))
        .collect();
    specauf::eval::plot::write_svg(
        &docs.join("results_eval.svg"),
        &runs,
        &format!("{}: {} prompts per benchmark, max_new_tokens {}, T = 0", cfg.model, cfg.eval.limit, cfg.eval.max_new_tokens),
    )
    .map_err(|e| anyhow::anyhow!("plotting the evaluation: {e}"))?;

    // results.md in the paper's layout: rows = arms, columns = benchmarks + average.
    let benches: Vec<String> = cfg.eval.benchmarks.clone();
    let mut md = String::new();
    md.push_str("# The paper's comparison at small scale (SmolLM2-135M target, CPU)\n\n");
    md.push_str(&format!(
        "Command: `{command}` (training and evaluation are cached in the working folder: a rerun only redoes what is missing, then this summary)\n\nMachine: {} ({} threads); summary written {}.\n\n",
        machine.cpu_model,
        machine.threads,
        specauf::eval::report::utc_now_rfc3339()
    ));
    md.push_str("τ = mean accepted drafts + 1 per cycle (T = 0, block size from the config); each cell is the mean over requests with a 95% bootstrap interval over requests. Stand-ins: gsm8k = GSM-Symbolic, math500 = CHAMP, mbpp = CodeI/O prompts, alpaca = held-out ShareGPT first turns.\n\n");
    md.push_str(&format!("| arm | {} | average | acc (shared mask) | support/block | held-out accept len |\n|---|{}---|---|---|---|\n", benches.join(" | "), "---|".repeat(benches.len())));
    for (name, s) in &summaries {
        let cells: Vec<String> = benches
            .iter()
            .map(|b| s.benchmarks.get(b).map(|x| format!("{:.2} [{:.2}, {:.2}]", x.tau, x.tau_ci[0], x.tau_ci[1])).unwrap_or_else(|| "–".into()))
            .collect();
        md.push_str(&format!(
            "| {name} | {} | **{:.3}** [{:.3}, {:.3}] | {:.3} | {:.2} | {:.3} |\n",
            cells.join(" | "),
            s.average_tau,
            s.average_tau_ci[0],
            s.average_tau_ci[1],
            s.acc,
            s.support_size,
            s.accept_len
        ));
    }
    let t = &cfg.train;
    md.push_str(&format!(
        "\nBudget ({config}): the target's greedy answers to {conv} ShareGPT prompts (≤ {new_tok} new tokens, prompts ≤ {max_len} tokens), \
         {layers}-layer drafters of the target's width tapping target layers {taps:?}, B = {b}, {steps} steps × {seqs} sequence(s) × {anchors} anchors, \
         lr {lr} (cosine, 4% warmup), seed {seed}; evaluation on {limit} prompts per benchmark (MT-Bench: both turns), {eval_tok} new tokens, T = 0. \
         acc, support and accept length are measured on the held-out split at the end of training.\n",
        config = config_path.display(),
        conv = cfg.data.conversations,
        new_tok = cfg.data.max_new_tokens,
        max_len = cfg.data.max_len,
        layers = t.layers,
        taps = t.target_layer_ids,
        b = t.block_size,
        steps = t.steps,
        seqs = t.batch_sequences,
        anchors = t.num_anchors,
        lr = t.lr,
        seed = t.seed,
        limit = cfg.eval.limit,
        eval_tok = cfg.eval.max_new_tokens,
    ));
    md.push_str("\n## The paper's findings, checked on this run\n\n| finding | verdict | evidence |\n|---|---|---|\n");
    for f in &findings {
        md.push_str(&format!("| {} | **{}** | {} |\n", f.claim, f.verdict.label(), f.evidence));
    }
    if docs.join("investigation.md").is_file() {
        md.push_str("\nInvestigation notes (what we checked when a run disagreed with the paper): [investigation.md](investigation.md).\n");
    }
    md.push_str("\n## Paired comparisons (same requests, paired bootstrap of the average τ)\n\n| a vs b | Δ avg τ | relative | 95% CI of Δ | benchmarks where a > b |\n|---|---|---|---|---|\n");
    for c in &comparisons {
        md.push_str(&format!("| {} vs {} | {:+.3} | {:+.1}% | [{:+.3}, {:+.3}] | {}/{} |\n", c.a, c.b, c.diff, 100.0 * c.relative, c.ci[0], c.ci[1], c.benchmarks_won, c.benchmarks));
    }
    md.push_str("\n![training curves](training_curves.svg)\n\n![τ per benchmark and acceptance per position](results_eval.svg)\n");
    specauf::eval::report::write_atomic(&docs.join("results.md"), md.as_bytes())?;
    println!("{md}");
    eprintln!("wrote {}, {}", docs.join("results.md").display(), docs.join("results.json").display());
    Ok(())
}
