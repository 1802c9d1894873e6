//! `specauf eval`: τ, acceptance and speedup of one or more drafters against the plain AR baseline
//! on the six benchmarks (SPEC §1, §5), written to `--out` as results.json, requests.jsonl,
//! report.md and plot.svg.
//!
//! Everything that can be wrong with the inputs is checked before the first generation: the
//! benchmark names and data, the model, every drafter against the model (vocabulary, hidden size,
//! tapped layers), the block-size override, the chat template, and the context of every request.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use specauf::assets;
use specauf::drafter::{DFlashDrafter, DFlashProposer};
use specauf::eval::datasets::{self, Benchmark, BenchmarkName};
use specauf::eval::report::{self, DrafterSetting, Settings};
use specauf::eval::runner::{self, ChatRenderer, EvalConfig, EvalDrafter, EvalError, EvalObserver, RequestEntry, RequestRecord};
use specauf::model::{load_model, WeightsMode};
use specauf::spec::{AcceptRule, Proposer};

use super::util::progress_bar;

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
    #[arg(long, default_value_t = 256)]
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
    /// Seeds the --limit subset and the sampling at T > 0.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Target weights on CPU: q8 (default; bit-exact block verify), f32 (reference), native.
    #[arg(long, value_enum, default_value_t = WeightsMode::Q8)]
    pub weights: WeightsMode,
    /// A system message for every request (default: the chat template's own default, if any).
    #[arg(long)]
    pub system: Option<String>,
    /// Output folder (created if needed; files in it are replaced).
    #[arg(long)]
    pub out: PathBuf,
}

/// Drafters as given on the command line: (label, checkpoint folder).
fn drafter_list(a: &EvalArgs) -> anyhow::Result<Vec<(String, PathBuf)>> {
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
        out.push((label, path));
    }
    Ok(out)
}

fn check_args(a: &EvalArgs) -> anyhow::Result<Vec<BenchmarkName>> {
    if a.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    if a.limit == Some(0) {
        bail!("--limit 0 selects no request; give a positive limit, or leave it out for whole benchmarks");
    }
    if !(a.temperature >= 0.0 && a.temperature.is_finite()) {
        bail!("--temperature must be a finite number >= 0 (0 = greedy)");
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1]");
    }
    if a.block_size.is_some_and(|b| b < 2) {
        bail!("--block-size must be at least 2: a block is [last, MASK × (B-1)] and drafts B-1 tokens");
    }
    let mut names = Vec::new();
    for b in &a.benchmarks {
        let name: BenchmarkName = b.trim().parse()?;
        if names.contains(&name) {
            bail!("benchmark {name} is listed twice in --benchmarks");
        }
        names.push(name);
    }
    if names.is_empty() {
        bail!("--benchmarks is empty; name at least one of gsm8k, math500, humaneval, mbpp, mtbench, alpaca");
    }
    Ok(names)
}

/// Fetches the benchmark data (if needed) and loads every benchmark.
fn load_benchmarks(names: &[BenchmarkName], limit: Option<usize>, seed: u64) -> anyhow::Result<Vec<Benchmark>> {
    let root = assets::home()?.join("assets");
    let mut out = Vec::new();
    for &name in names {
        for (package, _) in name.required_assets() {
            let p = assets::ALL
                .iter()
                .find(|p| p.name == *package)
                .with_context(|| format!("benchmark {name} needs package {package}, which the asset table does not list"))?;
            assets::ensure(p).with_context(|| format!("fetching the data of {name}"))?;
        }
        let b = datasets::load(name, &root, limit, seed).with_context(|| format!("loading benchmark {name}"))?;
        out.push(b);
    }
    Ok(out)
}

/// A DFlash drafter that runs blocks of `block_size` tokens: the same weights with another
/// `block_size` (the weights do not depend on it).
fn dflash_at_block_size(d: &DFlashDrafter, block_size: usize) -> anyhow::Result<DFlashDrafter> {
    let mut config = d.config().clone();
    config.block_size = block_size;
    let out = DFlashDrafter::init_random_from_config(config, 0)?;
    for ((name, dst), (src_name, src)) in out.named_vars().into_iter().zip(d.named_vars()) {
        if name != src_name {
            bail!("internal: drafter tensors out of order ({name} vs {src_name})");
        }
        dst.set(src.as_tensor())?;
    }
    Ok(out)
}

/// A progress bar over requests × runs, showing the current run's running τ; and the journal of
/// finished requests, so that an interrupted evaluation resumes where it stopped.
struct Progress {
    bar: indicatif::ProgressBar,
    journal: Journal,
}

impl EvalObserver for Progress {
    fn start(&mut self, total: usize) {
        self.bar.set_length(total as u64);
    }
    fn turn_done(&mut self, r: &RequestRecord, running_tau: f64) {
        self.bar.inc(1);
        self.bar.set_message(format!("{} {} τ {running_tau:.2}", r.benchmark, r.drafter));
    }
    fn resumed(&mut self, benchmark: BenchmarkName, id: &str) -> Option<RequestEntry> {
        self.journal.done.remove(&(benchmark.to_string(), id.to_string()))
    }
    fn request_done(&mut self, entry: &RequestEntry) -> Result<(), EvalError> {
        self.journal.append(entry).map_err(|e| EvalError::InvalidConfig {
            what: format!("cannot record finished requests in {}: {e}", self.journal.path.display()),
        })
    }
}

/// `OUT/requests.partial.jsonl`: a header line with the evaluation's settings, then one line per
/// finished request (every run of it). Removed once the results are written.
struct Journal {
    path: PathBuf,
    done: HashMap<(String, String), RequestEntry>,
    file: std::fs::File,
}

impl Journal {
    const FILE: &'static str = "requests.partial.jsonl";

    /// Opens the journal in `out`, keeping the requests of an interrupted run with the same
    /// `settings`; refuses one written with other settings (its records would not be comparable).
    fn open(out: &Path, settings: &serde_json::Value) -> anyhow::Result<Journal> {
        let path = out.join(Self::FILE);
        let mut done = HashMap::new();
        let mut kept = Vec::new();
        if path.is_file() {
            let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            let mut lines = text.lines();
            let header: Option<serde_json::Value> = lines.next().and_then(|l| serde_json::from_str(l).ok());
            let Some(header) = header.filter(|h| h.get("journal").and_then(|j| j.as_str()) == Some("specauf-eval")) else {
                bail!("{} is not a readable evaluation journal (cut off or overwritten); delete it to start over", path.display());
            };
            if header.get("settings") != Some(settings) {
                bail!(
                    "{} holds a partial evaluation with other settings (model, weights, drafters, benchmarks, limit or \
                     generation settings differ); delete it to start over, or choose another --out",
                    path.display()
                );
            }
            for line in lines {
                // A line cut off by the interruption ends the journal: that request runs again.
                let Ok(entry) = serde_json::from_str::<RequestEntry>(line) else { break };
                kept.push(line.to_string());
                done.insert((entry.benchmark.clone(), entry.id.clone()), entry);
            }
        }
        // Rewrite header + complete entries (dropping a cut-off tail), then append to it.
        let mut body = serde_json::to_string(&serde_json::json!({ "journal": "specauf-eval", "settings": settings }))?;
        body.push('\n');
        for line in &kept {
            body.push_str(line);
            body.push('\n');
        }
        specauf::fsutil::write_atomic(&path, body.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
        let file = std::fs::OpenOptions::new().append(true).open(&path).with_context(|| format!("opening {}", path.display()))?;
        Ok(Journal { path, done, file })
    }

    fn append(&mut self, entry: &RequestEntry) -> std::io::Result<()> {
        let mut line = serde_json::to_string(entry).map_err(std::io::Error::other)?;
        line.push('\n');
        self.file.write_all(line.as_bytes())?;
        self.file.flush()
    }
}

/// What must match for a partial evaluation to be resumed: everything that changes a record.
fn journal_settings(a: &EvalArgs, model: &str, drafters: &[(String, PathBuf)]) -> serde_json::Value {
    let drafters: Vec<serde_json::Value> = drafters
        .iter()
        .map(|(label, dir)| {
            let meta = std::fs::metadata(dir.join("model.safetensors")).ok();
            let modified = meta.as_ref().and_then(|m| m.modified().ok()).and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
            serde_json::json!({
                "label": label,
                "dir": dir.display().to_string(),
                "bytes": meta.map(|m| m.len()),
                "modified_ns": modified.map(|d| d.as_nanos().to_string()),
            })
        })
        .collect();
    serde_json::json!({
        "model": model,
        "weights": format!("{:?}", a.weights),
        "drafters": drafters,
        "benchmarks": a.benchmarks,
        "limit": a.limit,
        "max_new_tokens": a.max_new_tokens,
        "temperature": a.temperature,
        "top_p": a.top_p,
        "block_size": a.block_size,
        "seed": a.seed,
        "system": a.system,
    })
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

pub fn run(a: EvalArgs) -> anyhow::Result<()> {
    // 1. Inputs that need nothing loaded.
    let names = check_args(&a)?;
    let drafter_dirs = drafter_list(&a)?;
    let out_dir = a.out.clone();
    if out_dir.is_file() {
        bail!("--out {} is a file; give a folder", out_dir.display());
    }

    // 2. Data, model, drafters: all loaded and checked before any generation.
    let benchmarks = load_benchmarks(&names, a.limit, a.seed)?;
    let m = load_model(&a.model, a.weights).with_context(|| format!("loading model {}", a.model))?;
    if !m.tokenizer.has_chat_template() {
        bail!(
            "model {} has no chat template; the benchmarks are chat prompts (give a model whose tokenizer_config.json or GGUF carries one)",
            a.model
        );
    }
    let tc = m.target.config().clone();
    let mut drafters: Vec<EvalDrafter> = Vec::new();
    let mut drafter_settings = Vec::new();
    for (label, dir) in &drafter_dirs {
        if specauf::drafter::domino::is_domino_checkpoint(dir).unwrap_or(false) {
            if a.block_size.is_some() {
                bail!("--block-size is implemented for DFlash drafters only; {label} is a Domino drafter");
            }
            let d = specauf::drafter::domino::DominoDrafter::load(dir, &tc)
                .with_context(|| format!("drafter {} does not fit model {}", dir.display(), a.model))?;
            let proposer: Box<dyn Proposer> = Box::new(specauf::drafter::domino::DominoProposer::new(d));
            drafter_settings.push(DrafterSetting {
                label: label.clone(),
                path: Some(dir.display().to_string()),
                block_size: proposer.block_size(),
                trained_block_size: proposer.block_size(),
            });
            drafters.push(EvalDrafter::new(label.clone(), proposer));
            continue;
        }
        let d = DFlashDrafter::load(dir, &tc).with_context(|| format!("drafter {} does not fit model {}", dir.display(), a.model))?;
        let trained = d.block_size();
        let d = match a.block_size {
            Some(b) if b > trained => {
                bail!("--block-size {b} exceeds drafter {label}'s trained block size {trained}; it can only be lowered")
            }
            Some(b) if b != trained => dflash_at_block_size(&d, b).with_context(|| format!("drafter {label} at block size {b}"))?,
            _ => d,
        };
        let proposer: Box<dyn Proposer> = Box::new(DFlashProposer::new(d));
        drafter_settings.push(DrafterSetting {
            label: label.clone(),
            path: Some(dir.display().to_string()),
            block_size: proposer.block_size(),
            trained_block_size: trained,
        });
        drafters.push(EvalDrafter::new(label.clone(), proposer));
    }
    let mut eos = tc.eos_token_ids.clone();
    for &id in m.tokenizer.eos_token_ids() {
        if !eos.contains(&id) {
            eos.push(id);
        }
    }
    let cfg = EvalConfig {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        eos_token_ids: eos,
        accept_rule: AcceptRule::SampleMatch,
        warmup_tokens: 8,
    };
    let renderer = ChatRenderer {
        tokenizer: &m.tokenizer,
        system: a.system.clone(),
    };
    runner::validate(&m.target, &drafters, &benchmarks, &cfg)?;
    let requests: usize = benchmarks.iter().map(|b| b.requests.len()).sum();
    eprintln!(
        "eval: model {} ({} layers, context {}), weights {:?}, {} threads; runs: AR{}; {} benchmarks, {requests} requests, max_new_tokens {}, T = {}",
        m.name,
        tc.num_hidden_layers,
        tc.max_position_embeddings,
        a.weights,
        candle_core::utils::get_num_threads(),
        drafter_settings.iter().map(|d| format!(", {} (B = {})", d.label, d.block_size)).collect::<String>(),
        benchmarks.len(),
        a.max_new_tokens,
        a.temperature,
    );

    // 3. Generate.
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let journal = Journal::open(&out_dir, &journal_settings(&a, &m.name, &drafter_dirs))?;
    if !journal.done.is_empty() {
        eprintln!(
            "eval: resuming an interrupted evaluation: {} requests already done (kept in {})",
            journal.done.len(),
            journal.path.display()
        );
    }
    let journal_path = journal.path.clone();
    let mut progress = Progress { bar: progress_bar(0, "eval"), journal };
    let results = runner::run(&m.target, &renderer, &mut drafters, &benchmarks, &cfg, &mut progress)?;
    progress.bar.finish_and_clear();

    // 4. Write, then summarise.
    let weights = serde_json::to_value(a.weights)?.as_str().unwrap_or("q8").to_string();
    let settings = Settings::describe(&m.name, &weights, drafter_settings, a.limit, &cfg, &results, &command_line());
    let written =
        report::write_all(&out_dir, &settings, &results).with_context(|| format!("writing the results to {}", out_dir.display()))?;
    drop(progress);
    // The results hold every request now; the journal has done its job.
    let _ = std::fs::remove_file(&journal_path);
    for run in &results.runs {
        let per: Vec<String> = run
            .benchmarks
            .iter()
            .filter(|(_, b)| b.requests > 0)
            .map(|(n, b)| format!("{n} τ {:.2} ×{:.2}", b.tau, b.speedup))
            .collect();
        println!(
            "{}: average τ {:.3}, speedup {:.2}× ({})",
            run.drafter,
            run.average.tau,
            run.average.speedup,
            per.join(", ")
        );
    }
    let skipped = results.skipped.iter().filter(|s| s.turn.is_none()).count();
    if skipped > 0 {
        eprintln!(
            "eval: {skipped} requests did not fit the context and were skipped (listed in {})",
            written.report_md.display()
        );
    }
    eprintln!(
        "eval: wrote {}, {}, {}, {}",
        written.results_json.display(),
        written.report_md.display(),
        written.requests_jsonl.display(),
        written.plot_svg.display()
    );
    if results.exactness_checked && results.exact_mismatches > 0 {
        for r in results.mismatched_records().filter(|r| r.counted) {
            eprintln!(
                "MISMATCH: {} {} turn {} ({}): the output differs from AR at T = 0",
                r.benchmark, r.id, r.turn, r.drafter
            );
        }
        bail!(
            "{} drafter requests differ from AR at T = 0; speculative decoding must reproduce the target's greedy output \
             token for token (see {}){}",
            results.exact_mismatches,
            written.report_md.display(),
            if a.weights == WeightsMode::F32 {
                "; with --weights f32 a near-tie can flip between a block and a one-token forward"
            } else {
                ""
            }
        );
    }
    Ok(())
}
