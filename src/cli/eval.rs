//! `specauf eval`: τ, acceptance and speedup of one or more drafters against the plain AR baseline
//! on the six benchmarks (DESIGN §1, §5), written to `--out` as results.json, requests.jsonl,
//! report.md and plot.svg.
//!
//! Everything that can be wrong with the inputs is checked before the first generation: the
//! benchmark names and data, the model, every drafter against the model (vocabulary, hidden size,
//! tapped layers), the block-size override, the chat template, and the context of every request.

use std::path::PathBuf;

use anyhow::bail;
use specauf::eval::datasets::BenchmarkName;
use specauf::model::WeightsMode;
use specauf::pipeline::stages::{self, EvalDrafterSpec, EvalPlan};

use super::progress::Bars;

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// `smollm2` (the embedded default, fetched on first use), an HF directory or a .gguf file.
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    /// DFlash drafter checkpoint folders (config.json + model.safetensors), comma-separated, all
    /// compared against one shared AR baseline; `none` evaluates plain AR alone.
    #[arg(long, value_delimiter = ',', required = true)]
    pub drafter: Vec<String>,
    /// Report labels of the drafters, comma-separated, in --drafter order (default: each
    /// folder's name).
    #[arg(long, value_delimiter = ',')]
    pub label: Vec<String>,
    /// Benchmarks, comma-separated: gsm8k, math500, humaneval, mbpp, mtbench, alpaca (default:
    /// all six). Stand-ins are named in the report.
    #[arg(long, value_delimiter = ',', default_value = "gsm8k,math500,humaneval,mbpp,mtbench,alpaca")]
    pub benchmarks: Vec<String>,
    /// Requests per benchmark, a seeded subset (default: every request).
    #[arg(long)]
    pub limit: Option<usize>,
    /// New tokens per turn.
    #[arg(long, default_value_t = EvalPlan::DEFAULT_MAX_NEW_TOKENS)]
    pub max_new_tokens: usize,
    /// 0 = greedy, where every drafter must reproduce AR token for token.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Verify blocks of B tokens (the drafter runs [last, MASK × (B-1)] and drafts B-1) instead
    /// of its trained block size; at most the trained size (default: the trained size).
    #[arg(long)]
    pub block_size: Option<usize>,
    #[command(flatten)]
    pub drafter_run: super::drafter_run::DrafterRunArgs,
    /// Seeds the --limit subset and the sampling at T > 0.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Target weights on CPU: auto (default: native for a GGUF of Q8_0/Q4_1 tensors, q8 otherwise), native (GGUF types as stored), q8 (int8 blocks), f32 (reference).
    #[arg(long, default_value_t = WeightsMode::default())]
    pub weights: WeightsMode,
    /// A system message for every request (default: the chat template's own default, if any).
    #[arg(long)]
    pub system: Option<String>,
    /// Output folder (created if needed; files in it are replaced).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub device: super::device::DeviceArgs,
}

/// Drafters as given on the command line (their block size follows --block-size).
fn drafter_list(a: &EvalArgs) -> anyhow::Result<Vec<EvalDrafterSpec>> {
    if a.drafter.iter().any(|d| d == "none") {
        if a.drafter.len() > 1 {
            bail!("--drafter none evaluates AR alone; it cannot be combined with drafter folders (the AR baseline runs with every drafter anyway)");
        }
        if !a.label.is_empty() {
            bail!("--label names drafters; there is none with --drafter none");
        }
        if a.block_size.is_some() {
            bail!("--block-size applies to drafters; there is none with --drafter none");
        }
        return Ok(Vec::new());
    }
    if !a.label.is_empty() && a.label.len() != a.drafter.len() {
        bail!(
            "--label has {} labels for {} drafters; give one per drafter, in order",
            a.label.len(),
            a.drafter.len()
        );
    }
    let mut out = Vec::new();
    for (i, d) in a.drafter.iter().enumerate() {
        if d.is_empty() {
            bail!("--drafter has an empty entry; give checkpoint folders separated by commas, or `none`");
        }
        let path = PathBuf::from(d);
        if !path.is_dir() {
            bail!("drafter {d}: no such directory; give a DFlash checkpoint folder (config.json + model.safetensors) or `none`");
        }
        let label = match a.label.get(i) {
            Some(l) => l.clone(),
            None => path
                .canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| d.clone()),
        };
        out.push(EvalDrafterSpec::new(label, path));
    }
    Ok(out)
}

/// The benchmark names, each once.
fn benchmark_names(a: &EvalArgs) -> anyhow::Result<Vec<BenchmarkName>> {
    let mut names = Vec::new();
    for b in &a.benchmarks {
        let name: BenchmarkName = b.trim().parse()?;
        if names.contains(&name) {
            bail!("benchmark {name} is listed twice in --benchmarks");
        }
        names.push(name);
    }
    Ok(names)
}

/// The command line as typed, quoted for a POSIX shell where needed.
fn command_line() -> String {
    std::env::args()
        .enumerate()
        .map(|(i, a)| {
            let a = if i == 0 { "specauf".to_string() } else { a };
            if !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./,=:@%+".contains(c)) {
                a
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The plan of an evaluation as typed.
pub fn plan(a: &EvalArgs) -> anyhow::Result<EvalPlan> {
    // Checked by `stages::evaluate` before anything is loaded.
    let plan = EvalPlan {
        model: a.model.clone(),
        drafters: drafter_list(a)?,
        benchmarks: benchmark_names(a)?,
        limit: a.limit,
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        block_size: a.block_size,
        drafter_run: a.drafter_run.settings(),
        seed: a.seed,
        weights: a.weights,
        device: a.device.choice(),
        system: a.system.clone(),
        out: a.out.clone(),
        command: command_line(),
    };
    Ok(plan)
}

/// Runs an evaluation, prints each run's summary, and fails if a drafter broke exactness.
pub fn evaluate(plan: &EvalPlan) -> anyhow::Result<stages::EvalOutcome> {
    let outcome = stages::evaluate(plan, &Bars::new())?;
    let results = &outcome.results;
    for run in &results.runs {
        let per: Vec<String> = run
            .benchmarks
            .iter()
            .filter(|(_, b)| b.requests > 0)
            .map(|(n, b)| format!("{n} τ {:.2} ×{:.2}", b.tau, b.speedup))
            .collect();
        println!("{}: average τ {:.3}, speedup {:.2}× ({})", run.drafter, run.average.tau, run.average.speedup, per.join(", "));
    }
    let w = &outcome.written;
    let skipped = results.skipped.iter().filter(|s| s.turn.is_none()).count();
    if skipped > 0 {
        eprintln!("eval: {skipped} requests did not fit the context and were skipped (listed in {})", w.report_md.display());
    }
    eprintln!(
        "eval: wrote {}, {}, {}, {}",
        w.results_json.display(),
        w.report_md.display(),
        w.requests_jsonl.display(),
        w.plot_svg.display()
    );
    outcome.check_exact(plan.weights)?;
    Ok(outcome)
}

pub fn run(a: EvalArgs) -> anyhow::Result<()> {
    evaluate(&plan(&a)?)?;
    Ok(())
}
