//! `bench spec`: the command that proves the speed goal. On a fixed set of chat prompts it runs
//! our plain AR decoding and our DFlash speculative decoding with one drafter, per weights mode,
//! and — given a llama.cpp build — llama.cpp's `llama-bench` (tgN, ppB) and
//! `llama-speculative-simple --spec-type draft-dflash` with the same target GGUF and the same
//! drafter (converted by llama.cpp's own converter), interleaved run by run so that both see
//! the same load. Medians over the runs, after one warm-up run of ours.

use std::path::{Path, PathBuf};

use super::bench::step_costs;
use super::llama_cpp::{BenchRecord, LlamaCpp, PeerError, SpecRequest, SpecRun};
use super::stages::StageError;
use crate::drafter::AnyDrafter;
use crate::model::load::resolve;
use crate::model::{LoadedModel, ModelLocation, WeightsMode};
use crate::nn::DeviceChoice;
use crate::spec::{generate, GenerateConfig, Proposer};
use crate::tokenizer::ChatMessage;
use crate::util::measure::{load_average, median};
use crate::util::progress::{Progress, Unit};

/// Chat prompts of different kinds (facts, code, arithmetic, lists, translation, prose): `bench
/// spec` uses the first `--prompts`, `bench fidelity` all of them.
pub const CHAT_PROMPTS: [&str; 20] = [
    "What is the capital of France?",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain in two sentences why the sky is blue.",
    "List three uses of a paperclip.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did she sell altogether?",
    "Translate 'good morning, how are you?' into Spanish.",
    "Summarize the plot of Romeo and Juliet in one paragraph.",
    "What is 17 times 23? Show your steps.",
    "Give me a recipe for a simple tomato soup.",
    "What are the main differences between a cat and a dog as pets?",
    "Write a haiku about the ocean.",
    "How do I reverse a list in Python?",
    "Why do leaves change color in autumn?",
    "Name five countries in South America.",
    "What is photosynthesis?",
    "Write a short email asking my manager for a day off next Friday.",
    "If a train travels 60 miles per hour for 3 hours, how far does it go?",
    "What does HTTP stand for, and what is it used for?",
    "Suggest three names for a bakery.",
    "Explain what a black hole is to a ten-year-old.",
];

/// llama.cpp as the peer: its build and the drafter converted to GGUF.
#[derive(Debug, Clone)]
pub struct LlamaPlan {
    /// Holds llama-bench and llama-speculative-simple (directly or under bin/).
    pub dir: PathBuf,
    /// The drafter as converted by llama.cpp's convert_hf_to_gguf.py (tools/llama_cpp/convert.sh).
    pub drafter_gguf: PathBuf,
    /// Where the prompt files for llama-speculative-simple are written.
    pub work_dir: PathBuf,
}

/// What `bench spec` measures.
#[derive(Debug, Clone)]
pub struct SpecBenchPlan {
    /// `smollm2` or a .gguf file (llama.cpp needs a GGUF target).
    pub model: String,
    pub drafter: PathBuf,
    /// Verify blocks of B tokens instead of the drafter's trained size (only lower).
    pub block_size: Option<usize>,
    /// How our drafter runs (draft vocabulary, draft cut, precision); llama.cpp scores the
    /// whole vocabulary and drafts whole blocks.
    pub drafter_run: crate::drafter::RunSettings,
    pub weights: Vec<WeightsMode>,
    /// The first N of [`CHAT_PROMPTS`].
    pub prompts: usize,
    pub max_new_tokens: usize,
    pub runs: usize,
    /// Context at which decode steps and verify forwards (and llama-bench's tests) are timed.
    pub context: usize,
    /// Verify sizes timed against one decode step (llama-bench ppN).
    pub verifies: Vec<usize>,
    /// llama.cpp's threads (ours are rayon's: RAYON_NUM_THREADS).
    pub threads: usize,
    pub llama: Option<LlamaPlan>,
    /// The specauf binary: when given, each mode's peak memory is measured on a child process
    /// that runs one speculative generation (`generate --drafter`), as llama.cpp's is.
    pub specauf_exe: Option<PathBuf>,
    /// Where ours computes (llama.cpp runs on the CPU).
    pub device: DeviceChoice,
}

/// One engine's medians.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EngineRow {
    /// "specauf q8", "llama.cpp".
    pub engine: String,
    /// Plain decoding, tokens/s (ours: on the prompts; llama.cpp: llama-bench tgN at the context).
    pub ar_tokens_per_s: f64,
    /// Speculative decoding on the prompts, tokens/s (decode phase, prompt excluded).
    pub spec_tokens_per_s: f64,
    /// Mean tokens committed per verify cycle.
    pub tau: f64,
    pub decode_ms: f64,
    /// (B, median ms of one B-token forward ÷ one decode step).
    pub verify_over_decode: Vec<(usize, f64)>,
    /// Prompts whose speculative output equals the AR output (ours only; at T = 0 all must).
    pub exact_prompts: Option<usize>,
    /// Per run: (AR tok/s, speculative tok/s, τ).
    pub per_run: Vec<(f64, f64, f64)>,
    /// Peak resident memory of a process decoding speculatively (target + drafter), MiB: ours
    /// from `generate --drafter` as a child process, llama.cpp's from llama-speculative-simple
    /// (the largest over its runs).
    pub peak_rss_mib: Option<f64>,
}

impl EngineRow {
    pub fn spec_over_ar(&self) -> f64 {
        self.spec_tokens_per_s / self.ar_tokens_per_s
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SpecBenchReport {
    pub model: String,
    pub target_path: String,
    pub drafter: String,
    pub block_size: usize,
    /// Top-ranked ids our drafts scored (DESIGN §7.13); None: the whole vocabulary (the drafter
    /// folder has no draft_vocab.json, or `--draft-vocab 0`). llama.cpp always scores all of it.
    pub draft_vocab: Option<usize>,
    pub prompts: usize,
    pub max_new_tokens: usize,
    pub runs: usize,
    pub context: usize,
    pub threads_ours: usize,
    pub threads_llama: usize,
    /// /proc/loadavg's 1-minute load before and after the runs.
    pub load_before: Option<f64>,
    pub load_after: Option<f64>,
    pub rows: Vec<EngineRow>,
}

fn peer(e: PeerError) -> StageError {
    StageError::Invalid(format!("llama.cpp: {e}"))
}

/// Our side for one weights mode: the model, the prompts' ids and the drafter.
struct Ours {
    mode: WeightsMode,
    model: LoadedModel,
    prompts: Vec<Vec<u32>>,
    drafter: AnyDrafter,
    /// Per run: ms of one decode step, and of each verify forward.
    steps: Vec<(f64, Vec<f64>)>,
    per_run: Vec<(f64, f64, f64)>,
    exact: usize,
}

/// Renders `n` chat prompts with the model's template (as `generate --chat`).
pub fn chat_prompt_texts(m: &LoadedModel, n: usize) -> Result<Vec<String>, StageError> {
    CHAT_PROMPTS[..n]
        .iter()
        .map(|p| m.tokenizer.apply_chat_template(&[ChatMessage::user(*p)], true).map_err(|e| StageError::Invalid(format!("chat template: {e}"))))
        .collect()
}

fn validate(plan: &SpecBenchPlan) -> Result<(), StageError> {
    if plan.runs == 0 || plan.max_new_tokens == 0 || plan.context == 0 || plan.threads == 0 || plan.verifies.contains(&0) {
        return Err(StageError::Invalid("--runs, --max-new-tokens, --context, --threads and every --verify value must be at least 1".into()));
    }
    if plan.prompts == 0 || plan.prompts > CHAT_PROMPTS.len() {
        return Err(StageError::Invalid(format!("--prompts must be in 1..={}", CHAT_PROMPTS.len())));
    }
    if plan.weights.is_empty() {
        return Err(StageError::Invalid("--weights names no mode".into()));
    }
    Ok(())
}

fn load_ours(plan: &SpecBenchPlan, mode: WeightsMode, progress: &dyn Progress) -> Result<Ours, StageError> {
    progress.note(&format!("bench spec: loading {} ({mode} weights) and the drafter", plan.model));
    let model = super::stages::load(&plan.model, mode, plan.device)?;
    let drafter_err = |source| StageError::Drafter { path: plan.drafter.display().to_string(), source };
    let mut drafter = AnyDrafter::load_for(&plan.drafter, &model.target).map_err(drafter_err)?;
    drafter.apply(&plan.drafter_run).map_err(drafter_err)?;
    if let Some(b) = plan.block_size {
        drafter = drafter.at_block_size(b).map_err(drafter_err)?;
    }
    let prompts = chat_prompt_texts(&model, plan.prompts)?
        .iter()
        .map(|t| model.tokenizer.encode(t, false).map_err(|e| StageError::Invalid(format!("tokenizing a prompt: {e}"))))
        .collect::<Result<_, _>>()?;
    Ok(Ours { mode, model, prompts, drafter, steps: Vec::new(), per_run: Vec::new(), exact: 0 })
}

/// One pass of ours over the prompts: (AR tok/s, speculative tok/s, τ, prompts with equal output).
fn run_ours(o: &Ours, plan: &SpecBenchPlan, progress: &dyn Progress) -> Result<(f64, f64, f64, usize), StageError> {
    let target = &o.model.target;
    let mut cfg = GenerateConfig::greedy(target, plan.max_new_tokens);
    cfg.eos_token_ids = o.model.eos_token_ids();
    let (mut ar_tokens, mut ar_ms, mut sp_tokens, mut sp_ms, mut committed, mut cycles, mut exact) = (0usize, 0.0, 0usize, 0.0, 0usize, 0usize, 0usize);
    let spec_err = |e| StageError::Invalid(format!("decoding: {e}"));
    for (i, prompt) in o.prompts.iter().enumerate() {
        let ar = generate(target, None, prompt, &cfg).map_err(spec_err)?;
        let mut proposer: Box<dyn Proposer + Send> = o.drafter.proposer_on(target.backend());
        let sp = generate(target, Some(&mut *proposer as &mut dyn Proposer), prompt, &cfg).map_err(spec_err)?;
        // The first token comes from the prefill; the decode clock covers the rest.
        ar_tokens += ar.token_ids.len().saturating_sub(1);
        ar_ms += ar.decode_ms;
        sp_tokens += sp.token_ids.len().saturating_sub(1);
        sp_ms += sp.decode_ms;
        committed += sp.accept_lengths.iter().sum::<usize>();
        cycles += sp.cycles;
        exact += usize::from(sp.token_ids == ar.token_ids);
        progress.update(i as u64 + 1, &format!("{} prompt {}", o.mode, i + 1));
    }
    let rate = |n: usize, ms: f64| if ms > 0.0 { n as f64 / (ms / 1e3) } else { f64::NAN };
    Ok((rate(ar_tokens, ar_ms), rate(sp_tokens, sp_ms), committed as f64 / cycles.max(1) as f64, exact))
}

/// Peak memory of `exe generate --drafter` in `mode` on the first chat prompt, as a child process,
/// at the block size the benchmark ran (so `generate` does not calibrate one first).
fn our_peak_rss(exe: &Path, plan: &SpecBenchPlan, mode: WeightsMode, block_size: usize) -> Result<Option<f64>, StageError> {
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["generate", "--model", &plan.model, "--weights", &mode.to_string(), "--chat", "--json"])
        .args(["--prompt", CHAT_PROMPTS[0], "--max-new-tokens", &plan.max_new_tokens.to_string()])
        .arg("--drafter")
        .arg(&plan.drafter)
        .stdin(std::process::Stdio::null());
    let run = &plan.drafter_run;
    cmd.args(["--block-size", &block_size.to_string(), "--draft-vocab", &run.draft_vocab.to_string(), "--drafter-precision", &run.precision.to_string()]);
    if let Some(p) = run.draft_p_min {
        cmd.args(["--draft-p-min", &p.to_string()]);
    }
    let (out, peak) = crate::util::measure::run_measuring_rss(&mut cmd).map_err(|source| StageError::Io { path: exe.to_path_buf(), source })?;
    if !out.status.success() {
        return Err(StageError::Invalid(format!(
            "measuring our peak memory: {} generate failed ({}): {}",
            exe.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")
        )));
    }
    Ok(peak)
}

/// The GGUF file llama.cpp runs: the model spec must resolve to one.
fn target_gguf(model: &str) -> Result<PathBuf, StageError> {
    match resolve(model).map_err(|source| StageError::Model { name: model.to_string(), source })? {
        ModelLocation::Gguf(p) => Ok(p),
        ModelLocation::HfDir(d) => Err(StageError::Invalid(format!("llama.cpp runs GGUF files; {} is an HF directory", d.display()))),
    }
}

/// llama.cpp's side: prompt files written once, figures collected run by run.
struct Peer {
    llama: LlamaCpp,
    target: PathBuf,
    drafter: PathBuf,
    prompt_files: Vec<PathBuf>,
    /// Per run: (tgN tok/s, [ppB ms ÷ tg step ms], speculative tok/s, τ).
    per_run: Vec<(f64, Vec<f64>, f64, f64)>,
    /// The largest peak memory of its speculative runs, MiB.
    peak_rss_mib: Option<f64>,
}

fn setup_peer(lp: &LlamaPlan, target: &Path, prompts: &[String]) -> Result<Peer, StageError> {
    let llama = LlamaCpp::new(&lp.dir).map_err(peer)?;
    for name in ["llama-bench", "llama-speculative-simple"] {
        llama.binary(name).map_err(peer)?;
    }
    if !lp.drafter_gguf.is_file() {
        return Err(StageError::Invalid(format!("the llama.cpp drafter {} does not exist (convert it with tools/llama_cpp/convert.sh)", lp.drafter_gguf.display())));
    }
    std::fs::create_dir_all(&lp.work_dir).map_err(|source| StageError::Io { path: lp.work_dir.clone(), source })?;
    let mut prompt_files = Vec::new();
    for (i, text) in prompts.iter().enumerate() {
        let path = lp.work_dir.join(format!("prompt-{i:02}.txt"));
        crate::util::fs::write_atomic(&path, text.as_bytes()).map_err(|source| StageError::Io { path: path.clone(), source })?;
        prompt_files.push(path);
    }
    Ok(Peer { llama, target: target.to_path_buf(), drafter: lp.drafter_gguf.clone(), prompt_files, per_run: Vec::new(), peak_rss_mib: None })
}

fn run_peer(p: &mut Peer, plan: &SpecBenchPlan, draft_max: usize, progress: &dyn Progress) -> Result<(), StageError> {
    progress.note("bench spec: llama-bench");
    let records = p.llama.bench(&p.target, plan.threads, &plan.verifies, plan.max_new_tokens, plan.context, 1).map_err(peer)?;
    let find = |pp: usize, tg: usize| -> Result<&BenchRecord, StageError> {
        records
            .iter()
            .find(|r| r.n_prompt == pp && r.n_gen == tg)
            .ok_or_else(|| StageError::Invalid(format!("llama-bench printed no pp{pp}/tg{tg} test")))
    };
    let tg = median(&mut find(0, plan.max_new_tokens)?.samples_ts.clone());
    let mut ratios = Vec::new();
    for &b in &plan.verifies {
        let pp = median(&mut find(b, 0)?.samples_ts.clone());
        // ms of a B-token forward ÷ ms of one generated token.
        ratios.push((b as f64 / pp) / (1.0 / tg));
    }
    let (mut tokens, mut secs, mut cycles) = (0usize, 0.0, 0usize);
    for (i, f) in p.prompt_files.iter().enumerate() {
        let req = SpecRequest { target: p.target.clone(), drafter: p.drafter.clone(), prompt_file: f.clone(), n_predict: plan.max_new_tokens, draft_max, threads: plan.threads };
        let r: SpecRun = p.llama.speculative(&req).map_err(peer)?;
        tokens += r.n_predict;
        secs += r.decode_s;
        p.peak_rss_mib = match (p.peak_rss_mib, r.peak_rss_mib) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        cycles += r.cycles();
        progress.update(i as u64 + 1, &format!("llama.cpp prompt {}", i + 1));
    }
    p.per_run.push((tg, ratios, tokens as f64 / secs, tokens as f64 / cycles.max(1) as f64));
    Ok(())
}

pub fn spec(plan: &SpecBenchPlan, progress: &dyn Progress) -> Result<SpecBenchReport, StageError> {
    validate(plan)?;
    let target_path = target_gguf(&plan.model).ok();
    let mut ours = plan.weights.iter().map(|&m| load_ours(plan, m, progress)).collect::<Result<Vec<_>, _>>()?;
    let block_size = ours[0].drafter.block_size();
    let draft_vocab = ours[0].drafter.draft_ids().map(|ids| ids.len());
    let mut peer_state = match &plan.llama {
        Some(lp) => {
            let target = target_gguf(&plan.model)?;
            Some(setup_peer(lp, &target, &chat_prompt_texts(&ours[0].model, plan.prompts)?)?)
        }
        None => None,
    };
    let load_before = load_average();
    for run in 0..=plan.runs {
        let label = if run == 0 { "warm-up".to_string() } else { format!("run {run}/{}", plan.runs) };
        for o in ours.iter_mut() {
            progress.phase(&format!("bench spec {label}: specauf {}", o.mode), Some(plan.prompts as u64), 0, Unit::Items);
            let (ar, sp, tau, exact) = run_ours(o, plan, progress)?;
            progress.finish(false);
            if run > 0 {
                // The decode step and the verify forwards, timed in the same run as the rest.
                let costs = step_costs(&o.model.target, plan.context, &plan.verifies, 16, 1).map_err(|e| StageError::Invalid(format!("timing the verify cost: {e}")))?;
                o.steps.push(costs);
                o.per_run.push((ar, sp, tau));
                o.exact = exact;
            }
        }
        if let Some(p) = peer_state.as_mut().filter(|_| run > 0) {
            progress.phase(&format!("bench spec {label}: llama.cpp"), Some(plan.prompts as u64), 0, Unit::Items);
            run_peer(p, plan, block_size - 1, progress)?;
            progress.finish(false);
        }
    }
    let load_after = load_average();
    let mut rss = Vec::new();
    for o in &ours {
        rss.push(match &plan.specauf_exe {
            Some(exe) => our_peak_rss(exe, plan, o.mode, block_size)?,
            None => None,
        });
    }
    let med = |xs: Vec<f64>| median(&mut xs.clone());
    let mut rows: Vec<EngineRow> = ours
        .iter()
        .zip(rss)
        .map(|(o, peak_rss_mib)| EngineRow {
            engine: format!("specauf {}", o.mode),
            ar_tokens_per_s: med(o.per_run.iter().map(|r| r.0).collect()),
            spec_tokens_per_s: med(o.per_run.iter().map(|r| r.1).collect()),
            tau: med(o.per_run.iter().map(|r| r.2).collect()),
            decode_ms: med(o.steps.iter().map(|s| s.0).collect()),
            // The ratio per run (both timed back to back), then the median over runs.
            verify_over_decode: plan.verifies.iter().enumerate().map(|(i, &b)| (b, med(o.steps.iter().map(|s| s.1[i] / s.0).collect()))).collect(),
            exact_prompts: Some(o.exact),
            per_run: o.per_run.clone(),
            peak_rss_mib,
        })
        .collect();
    if let Some(p) = &peer_state {
        let tg = med(p.per_run.iter().map(|r| r.0).collect());
        rows.push(EngineRow {
            engine: "llama.cpp".into(),
            ar_tokens_per_s: tg,
            spec_tokens_per_s: med(p.per_run.iter().map(|r| r.2).collect()),
            tau: med(p.per_run.iter().map(|r| r.3).collect()),
            decode_ms: 1e3 / tg,
            verify_over_decode: plan.verifies.iter().enumerate().map(|(i, &b)| (b, med(p.per_run.iter().map(|r| r.1[i]).collect()))).collect(),
            exact_prompts: None,
            per_run: p.per_run.iter().map(|r| (r.0, r.2, r.3)).collect(),
            peak_rss_mib: p.peak_rss_mib,
        });
    }
    Ok(SpecBenchReport {
        model: plan.model.clone(),
        target_path: target_path.map(|p| p.display().to_string()).unwrap_or_default(),
        drafter: plan.drafter.display().to_string(),
        block_size,
        draft_vocab,
        prompts: plan.prompts,
        max_new_tokens: plan.max_new_tokens,
        runs: plan.runs,
        context: plan.context,
        threads_ours: rayon::current_num_threads(),
        threads_llama: plan.threads,
        load_before,
        load_after,
        rows,
    })
}
