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
use specauf::eval::experiment::{bootstrap, paired, point_estimates, table, write_training_curves, Arm, ArmSummary, BenchTau, RequestTau};
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
    let command = std::env::args().collect::<Vec<_>>().join(" ");
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
    for (i, arm) in cfg.arms.iter().enumerate() {
        let dir = out.join("arms").join(&arm.name);
        if dir.join("final/model.safetensors").is_file() {
            eprintln!("arm {}/{} {}: trained (cached)", i + 1, cfg.arms.len(), arm.name);
            continue;
        }
        eprintln!("arm {}/{} {}: training", i + 1, cfg.arms.len(), arm.name);
        let t = &cfg.train;
        train::run(train::TrainArgs {
            config: None,
            set: vec![
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
            ],
            resume: dir.join("config.json").is_file(),
            weights: WeightsMode::Q8,
        })
        .with_context(|| format!("training arm {}", arm.name))?;
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
    summarize(&cfg, &config_json, &out, &eval_dir, &a.docs, &command)
}

fn summarize(cfg: &PaperConfig, config_json: &serde_json::Value, out: &Path, eval_dir: &Path, docs: &Path, command: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(eval_dir.join("requests.jsonl")).context("reading requests.jsonl")?;
    let records: Vec<RequestTau> = text.lines().filter(|l| !l.trim().is_empty()).map(serde_json::from_str).collect::<Result<_, _>>()?;
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
        curves.push((arm.name.clone(), metrics.iter().map(|m| (m.step, m.loss as f64, m.acc as f64)).collect::<Vec<_>>()));
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
    let comparisons: Vec<_> = [("dflash-auf", "dflash-decay"), ("dflash-auf+decay", "dflash-decay"), ("dflash-auf+decay", "dflash-auf"), ("domino-auf", "domino-decay")]
        .iter()
        .filter_map(|(x, y)| paired(&t, &boots, x, y))
        .collect();
    std::fs::create_dir_all(docs)?;
    let machine = specauf::eval::report::Machine::detect();
    let json = serde_json::json!({
        "arms": arms_json,
        "comparisons": comparisons,
        "command": command,
        "machine": machine,
        "date": specauf::eval::report::utc_now_rfc3339(),
        "config": config_json,
    });
    specauf::eval::report::write_atomic(&docs.join("results.json"), serde_json::to_string_pretty(&json)?.as_bytes())?;
    write_training_curves(&docs.join("training_curves.svg"), &curves, 20).map_err(|e| anyhow::anyhow!("training curves: {e}"))?;
    let _ = std::fs::copy(eval_dir.join("plot.svg"), docs.join("results_eval.svg"));

    // results.md in the paper's layout: rows = arms, columns = benchmarks + average.
    let benches: Vec<String> = cfg.eval.benchmarks.clone();
    let mut md = String::new();
    md.push_str("# The paper's comparison at small scale (SmolLM2-135M target, CPU)\n\n");
    md.push_str(&format!("Command: `{command}`\n\nMachine: {} ({} threads), {}.\n\n", machine.cpu_model, machine.threads, specauf::eval::report::utc_now_rfc3339()));
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
