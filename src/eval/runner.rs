//! The evaluation runner: plain AR and every drafter over the same benchmark requests, through the
//! one decode loop ([`crate::spec::driver`]), and the per-benchmark figures of DESIGN §1.
//!
//! # What runs
//!
//! For every benchmark and every request (a conversation of one or more user turns):
//! 1. the AR baseline (`proposer: None`) runs the conversation once — it is shared by every drafter
//!    of the call;
//! 2. each drafter runs the same conversation.
//!
//! Each turn is one request of the decode loop (DESIGN §1: a multi-turn conversation counts each
//! turn). Turn k+1 of a run is conditioned on *that run's own* answers to turns 1..=k: the prompt
//! is `[user1, assistant = own answer 1, user2, ...]`, rendered by a [`PromptRenderer`]. At T = 0 an
//! exact loop gives every run the same answers; when it does not, each run still sees a
//! coherent conversation of its own.
//!
//! # Inputs stay pre-tokenized at the core
//!
//! The runner never sees text: a [`PromptRenderer`] turns (user turns, earlier answers as token
//! ids) into prompt ids. [`ChatRenderer`] does this with a model's chat template (thinking off);
//! tests use renderers over tiny fixture targets that have no tokenizer.
//!
//! # Honest accounting
//!
//! - **Context.** Before any generation, every conversation is checked against the target's
//!   context: turn k needs `prompt + max_new_tokens + B - 1` positions (the driver's own bound,
//!   with B the largest block of the call). Later turns are estimated with the earlier answers at
//!   their full `max_new_tokens`. A conversation that does not fit is skipped, whole, for every
//!   run, and counted ([`Skipped`]). Should a later turn still overflow at run time (a re-encoded
//!   answer can be a few tokens longer than generated), that turn is dropped from the statistics
//!   of every run, so that all runs are compared over the same turns.
//! - **Warm-up.** Before anything is timed, AR and every drafter generate a few tokens from the
//!   first prompt ([`EvalConfig::warmup_tokens`]), so that first-touch costs are charged to no run.
//! - **Time.** Decode time is the driver's `decode_ms`: from the end of the prefill to the end of
//!   the last cycle. It includes `first_draft_ms`, the drafter's first pass over the prompt
//!   context, which the DFlash reference leaves off its clock; we charge it, because a user waits
//!   for it. The proposer's `begin` lies in `prefill_ms`; `speedup_with_prefill` charges that too.
//! - **Speedup** = Σ AR decode time / Σ drafter decode time over the same (request, turn) pairs.
//! - **Exactness.** At T = 0 every drafter's tokens must equal AR's, turn by turn. Every
//!   difference is counted ([`EvalResults::exact_mismatches`]) and recorded per request.
//! - **Tokens per second** = output tokens after the first (the first comes from the prefill) per
//!   second of decode time.

use std::collections::HashMap;
use std::error::Error as StdError;

use crate::eval::datasets::{BenchRequest, Benchmark, BenchmarkName};
use crate::model::Target;
use crate::spec::driver::{generate, FinishReason, GenerateConfig, GenerateOutput};
use crate::spec::metrics::AcceptStats;
use crate::spec::proposer::Proposer;
use crate::spec::sampling::{AcceptRule, SamplingParams};
use crate::spec::SpecError;
use crate::tokenizer::{ChatMessage, Tokenizer};

/// The label of the shared autoregressive baseline in records and reports.
pub const AR_LABEL: &str = "ar";

/// A renderer's own error, boxed.
pub type RenderError = Box<dyn StdError + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("no benchmark to evaluate; name at least one of gsm8k, math500, humaneval, mbpp, mtbench, alpaca")]
    NoBenchmarks,
    #[error("benchmark {benchmark} is listed twice; list each benchmark once")]
    DuplicateBenchmark { benchmark: String },
    #[error("benchmark {benchmark} has no request; its data file is empty or every record was filtered out (re-fetch it)")]
    EmptyBenchmark { benchmark: String },
    #[error("request {id} of {benchmark} has no user turn; every request needs at least one")]
    NoTurns { benchmark: String, id: String },
    #[error("two drafters are labelled `{label}`; labels name the report's columns, give each its own")]
    DuplicateLabel { label: String },
    #[error("a drafter may not be labelled `{AR_LABEL}` (or be unlabelled): that label names the autoregressive baseline")]
    ReservedLabel,
    #[error("drafter `{label}` has block size 0; a block holds the last committed token, so it is at least 1")]
    ZeroBlockSize { label: String },
    #[error(
        "drafter `{label}` taps target layer {layer}, but the target has {layers} layers (0..{layers}); \
         the drafter was trained for another target"
    )]
    TapOutOfRange { label: String, layer: usize, layers: usize },
    #[error("invalid eval config: {what}")]
    InvalidConfig { what: String },
    #[error("{benchmark} request {id}, turn {turn}: rendering the prompt failed: {source}")]
    Render {
        benchmark: String,
        id: String,
        turn: usize,
        source: RenderError,
    },
    #[error("{benchmark} request {id}, turn {turn}: the prompt renders to no tokens")]
    EmptyPrompt { benchmark: String, id: String, turn: usize },
    #[error(
        "no request of any benchmark fits the target's context of {max} positions with max_new_tokens \
         {max_new_tokens} and block size {block_size}; lower max_new_tokens"
    )]
    NothingFits {
        max: usize,
        max_new_tokens: usize,
        block_size: usize,
    },
    #[error("{benchmark} request {id}, turn {turn}, run `{run}`: {source}")]
    Generate {
        benchmark: String,
        id: String,
        turn: usize,
        run: String,
        source: Box<SpecError>,
    },
}

/// Turns a conversation into prompt ids.
pub trait PromptRenderer {
    /// The prompt for turn `answers.len() + 1` (1-based): the user turns
    /// `user_turns[..=answers.len()]` interleaved with this run's own earlier answers (output token
    /// ids as generated, possibly ending with an EOS), ending where the model's next answer starts.
    fn render(&self, user_turns: &[String], answers: &[Vec<u32>]) -> Result<Vec<u32>, RenderError>;
}

/// Renders with a model's chat template (`add_generation_prompt`, thinking off): earlier answers are
/// decoded without special tokens and passed back as assistant messages, as the DFlash benchmark
/// script does for MT-Bench.
pub struct ChatRenderer<'a> {
    pub tokenizer: &'a Tokenizer,
    /// A system message; None keeps the template's default (if any).
    pub system: Option<String>,
}

impl PromptRenderer for ChatRenderer<'_> {
    fn render(&self, user_turns: &[String], answers: &[Vec<u32>]) -> Result<Vec<u32>, RenderError> {
        let k = answers.len();
        let mut messages = Vec::with_capacity(2 * k + 2);
        if let Some(s) = &self.system {
            messages.push(ChatMessage::system(s.clone()));
        }
        for (i, user) in user_turns.iter().take(k + 1).enumerate() {
            messages.push(ChatMessage::user(user.clone()));
            if let Some(answer) = answers.get(i) {
                let text = self.tokenizer.decode(answer, true)?;
                messages.push(ChatMessage::assistant(text));
            }
        }
        Ok(self.tokenizer.encode_chat(&messages, true)?)
    }
}

/// One drafter of an evaluation. The same proposer serves every request: the driver calls
/// [`Proposer::begin`] at the start of each, which must reset all per-request state.
pub struct EvalDrafter<'a> {
    /// The report's column name; unique, not [`AR_LABEL`].
    pub label: String,
    pub proposer: Box<dyn Proposer + 'a>,
}

impl<'a> EvalDrafter<'a> {
    pub fn new(label: impl Into<String>, proposer: Box<dyn Proposer + 'a>) -> Self {
        Self {
            label: label.into(),
            proposer,
        }
    }
}

/// What every run of an evaluation shares.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EvalConfig {
    /// At least 1; per turn.
    pub max_new_tokens: usize,
    /// 0 = greedy, where the exactness check applies.
    pub temperature: f32,
    pub top_p: f32,
    /// The seed of (benchmark, request, turn) is derived from it; every run of a turn shares it.
    pub seed: u64,
    /// Generation stops at the first of these.
    pub eos_token_ids: Vec<u32>,
    pub accept_rule: AcceptRule,
    /// Before anything is timed, AR and every drafter generate this many tokens from the first
    /// evaluated prompt, and the result is dropped: the first forwards of a process pay for page
    /// faults and weight packing, which would otherwise be charged to whichever run goes first
    /// (AR). 0 = no warm-up.
    pub warmup_tokens: usize,
}

impl EvalConfig {
    /// Greedy decoding that stops at the target's EOS ids.
    pub fn greedy(target: &Target, max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            eos_token_ids: target.config().eos_token_ids.clone(),
            accept_rule: AcceptRule::SampleMatch,
            warmup_tokens: 8,
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.sampling().is_greedy()
    }

    fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
        }
    }
}

/// One turn of one run.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RequestRecord {
    pub benchmark: String,
    pub id: String,
    /// 1-based.
    pub turn: usize,
    /// A drafter label, or [`AR_LABEL`].
    pub drafter: String,
    pub prompt_len: usize,
    pub tau: f64,
    pub accept_lengths: Vec<usize>,
    pub draft_lengths: Vec<usize>,
    /// Output token ids (ending at the first EOS, at most max_new_tokens).
    pub tokens: Vec<u32>,
    pub finish_reason: FinishReason,
    pub prefill_ms: f64,
    /// Includes `first_draft_ms` (see the module docs).
    pub decode_ms: f64,
    pub first_draft_ms: f64,
    pub draft_ms: f64,
    pub verify_ms: f64,
    /// Whether the tokens equal AR's for the same turn; None for AR itself, or when AR did not run
    /// the turn.
    pub exact_match_vs_ar: Option<bool>,
    /// False when some other run could not run this turn (context overflow at run time), so it
    /// is left out of every run's statistics.
    pub counted: bool,
}

/// A conversation, or one turn of it, left out of the evaluation.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Skipped {
    pub benchmark: String,
    pub id: String,
    /// None: the whole conversation, before any generation. Some(k): turn k, at run time.
    pub turn: Option<usize>,
    pub reason: String,
}

/// The figures of one run on one benchmark (DESIGN §1).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BenchmarkResult {
    /// Mean over requests (turns) of each request's τ.
    pub tau: f64,
    /// Σ (acc+1) / Σ cycles.
    pub tau_pooled: f64,
    /// Entry i: rate at which draft position i+1 was accepted among the cycles that drafted it.
    pub accept_per_position: Vec<f64>,
    /// Entry a: cycles with acc+1 == a (entry 0 is always 0).
    pub accept_histogram: Vec<usize>,
    /// Requests (turns) counted.
    pub requests: usize,
    pub cycles: usize,
    pub ar_tokens_per_s: f64,
    pub spec_tokens_per_s: f64,
    /// Σ AR decode_ms / Σ this run's decode_ms over the same turns.
    pub speedup: f64,
    /// The same with prefill (and the proposer's `begin`) charged to both.
    pub speedup_with_prefill: f64,
    pub ar_decode_ms: f64,
    pub spec_decode_ms: f64,
    pub ar_prefill_ms: f64,
    pub spec_prefill_ms: f64,
    /// Output tokens of this run (all counted turns).
    pub tokens: usize,
    /// Counted turns whose tokens differ from AR's (must be 0 at T = 0).
    pub exact_mismatches: usize,
}

/// Means over benchmarks, and acceptance pooled over all of them.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AverageResult {
    /// Mean over benchmarks of their τ (the paper's "average τ").
    pub tau: f64,
    /// Mean over benchmarks of their speedup.
    pub speedup: f64,
    /// Σ (acc+1) / Σ cycles over every counted turn of every benchmark.
    pub tau_pooled: f64,
    /// Per-position acceptance pooled over every counted turn of every benchmark.
    pub accept_per_position: Vec<f64>,
    pub requests: usize,
}

/// One run (a drafter, or the AR baseline when it is evaluated alone).
#[derive(Debug, Clone, PartialEq)]
pub struct RunResult {
    pub drafter: String,
    /// The verified block size (1 for AR).
    pub block_size: usize,
    /// In the order the benchmarks were given.
    pub benchmarks: Vec<(BenchmarkName, BenchmarkResult)>,
    pub average: AverageResult,
}

impl RunResult {
    pub fn benchmark(&self, name: BenchmarkName) -> Option<&BenchmarkResult> {
        self.benchmarks.iter().find(|(n, _)| *n == name).map(|(_, r)| r)
    }
}

/// Everything an evaluation produced ([`crate::eval::report`] writes it out).
#[derive(Debug, Clone, PartialEq)]
pub struct EvalResults {
    /// One per drafter, in order; just the AR baseline when no drafter was given.
    pub runs: Vec<RunResult>,
    /// Every turn of every run, in execution order (AR first within each request).
    pub records: Vec<RequestRecord>,
    pub skipped: Vec<Skipped>,
    /// Requests (conversations) evaluated per benchmark, in the order given.
    pub evaluated: Vec<(BenchmarkName, usize)>,
    /// How many times the AR baseline generated (once per evaluated turn, whatever the number
    /// of drafters).
    pub ar_generations: usize,
    /// Whether the exactness check applied (T = 0).
    pub exactness_checked: bool,
    /// Counted drafter turns whose tokens differ from AR's.
    pub exact_mismatches: usize,
}

impl EvalResults {
    pub fn run(&self, label: &str) -> Option<&RunResult> {
        self.runs.iter().find(|r| r.drafter == label)
    }
    /// Conversations skipped before generation, per benchmark.
    pub fn skipped_requests(&self, name: BenchmarkName) -> usize {
        self.skipped
            .iter()
            .filter(|s| s.benchmark == name.as_str() && s.turn.is_none())
            .count()
    }
    /// Drafter turns at T = 0 whose tokens differ from AR's.
    pub fn mismatched_records(&self) -> impl Iterator<Item = &RequestRecord> {
        self.records.iter().filter(|r| r.exact_match_vs_ar == Some(false))
    }
}

/// Progress of an evaluation, for a progress bar.
pub trait EvalObserver {
    /// Called once, before the first generation: the number of turn-runs to come.
    fn start(&mut self, _total: usize) {}
    /// Called after every turn of every run, with the running τ of that run on that benchmark.
    fn turn_done(&mut self, _record: &RequestRecord, _running_tau: f64) {}
    /// A request finished by an earlier, interrupted run of this same evaluation: its records are
    /// taken as they are and the request is not generated again.
    fn resumed(&mut self, _benchmark: BenchmarkName, _id: &str) -> Option<RequestEntry> {
        None
    }
    /// Called once a request has been run by AR and every drafter (its turns' `counted` flags
    /// final), so that it can be kept for a resume.
    fn request_done(&mut self, _entry: &RequestEntry) -> Result<(), EvalError> {
        Ok(())
    }
}

/// Everything one request produced: the records of every run and turn, and the turns skipped
/// at run time. The unit an interrupted evaluation resumes by: AR and the drafters of one
/// request always come from the same process, so their timings stay paired.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RequestEntry {
    pub benchmark: String,
    pub id: String,
    pub records: Vec<RequestRecord>,
    pub skipped: Vec<Skipped>,
}

/// An observer that does nothing.
pub struct Silent;
impl EvalObserver for Silent {}

/// Checks the inputs without generating anything: benchmark list, drafter labels and block sizes,
/// drafter taps against the target, the config, and every conversation's first prompt.
pub fn validate(target: &Target, drafters: &[EvalDrafter], benchmarks: &[Benchmark], cfg: &EvalConfig) -> Result<(), EvalError> {
    if benchmarks.is_empty() {
        return Err(EvalError::NoBenchmarks);
    }
    for (i, b) in benchmarks.iter().enumerate() {
        if benchmarks[..i].iter().any(|o| o.name == b.name) {
            return Err(EvalError::DuplicateBenchmark {
                benchmark: b.name.to_string(),
            });
        }
        if b.requests.is_empty() {
            return Err(EvalError::EmptyBenchmark {
                benchmark: b.name.to_string(),
            });
        }
        if let Some(r) = b.requests.iter().find(|r| r.turns.is_empty()) {
            return Err(EvalError::NoTurns {
                benchmark: b.name.to_string(),
                id: r.id.clone(),
            });
        }
    }
    if cfg.max_new_tokens == 0 {
        return Err(EvalError::InvalidConfig {
            what: "max_new_tokens must be at least 1".into(),
        });
    }
    cfg.sampling()
        .validate()
        .map_err(|e| EvalError::InvalidConfig { what: e.to_string() })?;
    let layers = target.config().num_hidden_layers;
    for (i, d) in drafters.iter().enumerate() {
        if d.label.is_empty() || d.label == AR_LABEL {
            return Err(EvalError::ReservedLabel);
        }
        if drafters[..i].iter().any(|o| o.label == d.label) {
            return Err(EvalError::DuplicateLabel { label: d.label.clone() });
        }
        if d.proposer.block_size() == 0 {
            return Err(EvalError::ZeroBlockSize { label: d.label.clone() });
        }
        if let Some(&layer) = d.proposer.target_layer_ids().iter().find(|&&l| l >= layers) {
            return Err(EvalError::TapOutOfRange {
                label: d.label.clone(),
                layer,
                layers,
            });
        }
    }
    Ok(())
}

/// Runs the evaluation: validation and the context check first, then AR and every drafter on every
/// request. See the module docs.
pub fn run(
    target: &Target,
    renderer: &dyn PromptRenderer,
    drafters: &mut [EvalDrafter],
    benchmarks: &[Benchmark],
    cfg: &EvalConfig,
    observer: &mut dyn EvalObserver,
) -> Result<EvalResults, EvalError> {
    validate(target, drafters, benchmarks, cfg)?;
    let max_pos = target.config().max_position_embeddings;
    let block = drafters.iter().map(|d| d.proposer.block_size()).max().unwrap_or(1);

    // 1. Which conversations fit (renders every first prompt, so template errors surface here).
    let mut skipped = Vec::new();
    let plan = plan_requests(renderer, benchmarks, cfg, block, max_pos, &mut skipped)?;
    if cfg.warmup_tokens > 0 {
        warm_up(target, renderer, drafters, &plan, cfg)?;
    }
    let turn_runs: usize = plan.iter().flat_map(|(_, reqs)| reqs.iter().map(|r| r.turns.len())).sum::<usize>() * (1 + drafters.len());
    observer.start(turn_runs);

    // 2. Generate: per request, the AR conversation, then each drafter's; or the records an
    //    interrupted run kept.
    let mut gen = Generator {
        target,
        renderer,
        cfg,
        block,
        max_pos,
        records: Vec::new(),
        skipped,
        ar_generations: 0,
        running: HashMap::new(),
    };
    for (name, reqs) in &plan {
        for r in reqs {
            match observer.resumed(*name, &r.id) {
                Some(entry) => gen.resume(*name, r, entry, 1 + drafters.len(), observer)?,
                None => gen.request(drafters, *name, r, observer)?,
            }
        }
    }

    // 3. Figures.
    Ok(figures(gen, drafters, &plan, cfg))
}

/// Benchmark → the requests that fit the context, in the order given.
type Plan<'r> = Vec<(BenchmarkName, Vec<&'r BenchRequest>)>;

/// The requests of every benchmark that fit the context ([`fits`]); the others go to `skipped`,
/// whole. Fails when none is left.
fn plan_requests<'r>(
    renderer: &dyn PromptRenderer,
    benchmarks: &'r [Benchmark],
    cfg: &EvalConfig,
    block: usize,
    max_pos: usize,
    skipped: &mut Vec<Skipped>,
) -> Result<Plan<'r>, EvalError> {
    let mut plan: Plan<'r> = Vec::new();
    for b in benchmarks {
        let mut keep = Vec::new();
        for r in &b.requests {
            match fits(renderer, b.name, r, cfg.max_new_tokens, block, max_pos)? {
                None => keep.push(r),
                Some(reason) => skipped.push(Skipped {
                    benchmark: b.name.to_string(),
                    id: r.id.clone(),
                    turn: None,
                    reason,
                }),
            }
        }
        plan.push((b.name, keep));
    }
    if plan.iter().all(|(_, reqs)| reqs.is_empty()) {
        return Err(EvalError::NothingFits {
            max: max_pos,
            max_new_tokens: cfg.max_new_tokens,
            block_size: block,
        });
    }
    Ok(plan)
}

/// The generation phase: what stays fixed over it, and what it accumulates.
struct Generator<'a> {
    target: &'a Target,
    renderer: &'a dyn PromptRenderer,
    cfg: &'a EvalConfig,
    /// The largest block of the call, and the target's context.
    block: usize,
    max_pos: usize,
    /// Every turn of every run, in execution order.
    records: Vec<RequestRecord>,
    skipped: Vec<Skipped>,
    ar_generations: usize,
    /// (benchmark, run) → (Σ τ, turns), for the observer's running τ.
    running: HashMap<(BenchmarkName, String), (f64, usize)>,
}

impl Generator<'_> {
    /// Keeps one finished turn and tells the observer.
    fn push(&mut self, name: BenchmarkName, rec: RequestRecord, observer: &mut dyn EvalObserver) {
        let t = note_tau(&mut self.running, name, &rec);
        observer.turn_done(&rec, t);
        self.records.push(rec);
    }

    /// Takes the records and run-time skips of a request an earlier, interrupted run finished, as
    /// they are (`runs`: AR plus the drafters).
    fn resume(
        &mut self,
        name: BenchmarkName,
        r: &BenchRequest,
        entry: RequestEntry,
        runs: usize,
        observer: &mut dyn EvalObserver,
    ) -> Result<(), EvalError> {
        if entry.benchmark != name.to_string() || entry.id != r.id || entry.records.len() > runs * r.turns.len() {
            return Err(EvalError::InvalidConfig {
                what: format!("the resumed entry for {name} {} does not belong to this evaluation", r.id),
            });
        }
        for rec in entry.records {
            if rec.drafter == AR_LABEL {
                self.ar_generations += 1;
            }
            self.push(name, rec, observer);
        }
        self.skipped.extend(entry.skipped);
        Ok(())
    }

    /// Runs one request by AR, then by each drafter (its turns compared with AR's), and hands it
    /// to the observer once its turns' `counted` flags are final.
    fn request(
        &mut self,
        drafters: &mut [EvalDrafter],
        name: BenchmarkName,
        r: &BenchRequest,
        observer: &mut dyn EvalObserver,
    ) -> Result<(), EvalError> {
        let (target, renderer, cfg, block, max_pos) = (self.target, self.renderer, self.cfg, self.block, self.max_pos);
        let first = self.records.len();
        let skipped_before = self.skipped.len();
        let ar = run_conversation(target, renderer, None, name, r, cfg, block, max_pos, &mut self.skipped)?;
        self.ar_generations += ar.len();
        for rec in ar {
            self.push(name, rec, observer);
        }
        for d in drafters.iter_mut() {
            let label = d.label.clone();
            let recs = run_conversation(
                target,
                renderer,
                Some((&label, d.proposer.as_mut())),
                name,
                r,
                cfg,
                block,
                max_pos,
                &mut self.skipped,
            )?;
            for mut rec in recs {
                let ar_tokens = self.records[first..]
                    .iter()
                    .find(|a| a.drafter == AR_LABEL && a.turn == rec.turn)
                    .map(|a| &a.tokens);
                rec.exact_match_vs_ar = ar_tokens.map(|a| *a == rec.tokens);
                self.push(name, rec, observer);
            }
        }
        // A turn counts only if every run (AR and each drafter) ran it.
        let runs = 1 + drafters.len();
        let turns = r.turns.len();
        let records = &mut self.records[first..];
        for turn in 1..=turns {
            let done = records.iter().filter(|x| x.turn == turn).count();
            if done < runs {
                for x in records.iter_mut().filter(|x| x.turn == turn) {
                    x.counted = false;
                }
            }
        }
        observer.request_done(&RequestEntry {
            benchmark: name.to_string(),
            id: r.id.clone(),
            records: self.records[first..].to_vec(),
            skipped: self.skipped[skipped_before..].to_vec(),
        })
    }
}

/// The figures of every run (just AR's when no drafter was given) from the generated records.
fn figures(gen: Generator<'_>, drafters: &[EvalDrafter], plan: &Plan<'_>, cfg: &EvalConfig) -> EvalResults {
    let Generator { records, skipped, ar_generations, .. } = gen;
    let labels: Vec<(String, usize)> = if drafters.is_empty() {
        vec![(AR_LABEL.to_string(), 1)]
    } else {
        drafters.iter().map(|d| (d.label.clone(), d.proposer.block_size())).collect()
    };
    let order: Vec<BenchmarkName> = plan.iter().map(|(n, _)| *n).collect();
    let runs = labels.iter().map(|(label, b)| summarize(&records, label, *b, &order)).collect();
    let exactness_checked = cfg.is_greedy();
    let exact_mismatches = if exactness_checked {
        records.iter().filter(|r| r.counted && r.exact_match_vs_ar == Some(false)).count()
    } else {
        0
    };
    EvalResults {
        runs,
        records,
        skipped,
        evaluated: plan.iter().map(|(n, reqs)| (*n, reqs.len())).collect(),
        ar_generations,
        exactness_checked,
        exact_mismatches,
    }
}

/// Untimed generations of `cfg.warmup_tokens` from the first evaluated prompt, by AR and by every
/// drafter; nothing of them is kept.
fn warm_up(
    target: &Target,
    renderer: &dyn PromptRenderer,
    drafters: &mut [EvalDrafter],
    plan: &[(BenchmarkName, Vec<&BenchRequest>)],
    cfg: &EvalConfig,
) -> Result<(), EvalError> {
    let Some((name, r)) = plan.iter().find_map(|(n, reqs)| reqs.first().map(|r| (*n, *r))) else {
        return Ok(());
    };
    let prompt = renderer.render(&r.turns, &[]).map_err(|source| EvalError::Render {
        benchmark: name.to_string(),
        id: r.id.clone(),
        turn: 1,
        source,
    })?;
    let gcfg = GenerateConfig {
        max_new_tokens: cfg.warmup_tokens.min(cfg.max_new_tokens),
        temperature: cfg.temperature,
        top_p: cfg.top_p,
        seed: cfg.seed,
        eos_token_ids: cfg.eos_token_ids.clone(),
        accept_rule: cfg.accept_rule,
    };
    let fail = |run: &str, source: SpecError| EvalError::Generate {
        benchmark: name.to_string(),
        id: r.id.clone(),
        turn: 1,
        run: format!("{run} (warm-up)"),
        source: Box::new(source),
    };
    generate(target, None, &prompt, &gcfg).map_err(|e| fail(AR_LABEL, e))?;
    for d in drafters.iter_mut() {
        generate(target, Some(d.proposer.as_mut()), &prompt, &gcfg).map_err(|e| fail(&d.label, e))?;
    }
    Ok(())
}

/// None when every turn of `r` fits the context; otherwise why not.
fn fits(
    renderer: &dyn PromptRenderer,
    name: BenchmarkName,
    r: &BenchRequest,
    max_new_tokens: usize,
    block: usize,
    max_pos: usize,
) -> Result<Option<String>, EvalError> {
    for k in 0..r.turns.len() {
        // Turn k+1 with k empty answers, plus the k answers at their longest.
        let empty = vec![Vec::new(); k];
        let ids = renderer.render(&r.turns, &empty).map_err(|source| EvalError::Render {
            benchmark: name.to_string(),
            id: r.id.clone(),
            turn: k + 1,
            source,
        })?;
        if ids.is_empty() {
            return Err(EvalError::EmptyPrompt {
                benchmark: name.to_string(),
                id: r.id.clone(),
                turn: k + 1,
            });
        }
        let prompt = ids.len() + k * max_new_tokens;
        let needed = prompt + max_new_tokens + block - 1;
        if needed > max_pos {
            return Ok(Some(format!(
                "turn {} needs {needed} positions (prompt {}{} + max_new_tokens {max_new_tokens} + block {block} - 1), the context is {max_pos}",
                k + 1,
                ids.len(),
                if k > 0 { format!(" + {k} earlier answers of up to {max_new_tokens}") } else { String::new() },
            )));
        }
    }
    Ok(None)
}

/// The seed of one turn: shared by every run of it, different across turns and requests.
fn turn_seed(seed: u64, name: BenchmarkName, id: &str, turn: usize) -> u64 {
    crate::util::turn_seed(seed, name.as_str(), id, turn)
}

/// Runs every turn of one conversation for one run (None = AR). Stops at the first turn that does
/// not fit the context (recorded in `skipped`); later turns depend on it.
#[allow(clippy::too_many_arguments)]
fn run_conversation(
    target: &Target,
    renderer: &dyn PromptRenderer,
    mut drafter: Option<(&str, &mut (dyn Proposer + '_))>,
    name: BenchmarkName,
    r: &BenchRequest,
    cfg: &EvalConfig,
    block: usize,
    max_pos: usize,
    skipped: &mut Vec<Skipped>,
) -> Result<Vec<RequestRecord>, EvalError> {
    let label = drafter.as_ref().map(|(l, _)| l.to_string()).unwrap_or_else(|| AR_LABEL.to_string());
    let mut answers: Vec<Vec<u32>> = Vec::new();
    let mut out = Vec::new();
    for turn in 1..=r.turns.len() {
        let prompt = renderer.render(&r.turns, &answers).map_err(|source| EvalError::Render {
            benchmark: name.to_string(),
            id: r.id.clone(),
            turn,
            source,
        })?;
        let needed = prompt.len() + cfg.max_new_tokens + block - 1;
        if needed > max_pos {
            skipped.push(Skipped {
                benchmark: name.to_string(),
                id: r.id.clone(),
                turn: Some(turn),
                reason: format!(
                    "run `{label}`: the prompt grew to {} tokens with its own answers; {needed} positions > context {max_pos}",
                    prompt.len()
                ),
            });
            break;
        }
        let gcfg = GenerateConfig {
            max_new_tokens: cfg.max_new_tokens,
            temperature: cfg.temperature,
            top_p: cfg.top_p,
            seed: turn_seed(cfg.seed, name, &r.id, turn),
            eos_token_ids: cfg.eos_token_ids.clone(),
            accept_rule: cfg.accept_rule,
        };
        let proposer: Option<&mut dyn Proposer> = match drafter.as_mut() {
            Some((_, p)) => Some(&mut **p),
            None => None,
        };
        let res = generate(target, proposer, &prompt, &gcfg).map_err(|source| EvalError::Generate {
            benchmark: name.to_string(),
            id: r.id.clone(),
            turn,
            run: label.clone(),
            source: Box::new(source),
        })?;
        answers.push(res.token_ids.clone());
        out.push(record(name, &r.id, turn, &label, res));
    }
    Ok(out)
}

fn record(name: BenchmarkName, id: &str, turn: usize, label: &str, res: GenerateOutput) -> RequestRecord {
    RequestRecord {
        benchmark: name.to_string(),
        id: id.to_string(),
        turn,
        drafter: label.to_string(),
        prompt_len: res.prompt_len,
        tau: res.tau,
        accept_lengths: res.accept_lengths,
        draft_lengths: res.draft_lengths,
        tokens: res.token_ids,
        finish_reason: res.finish_reason,
        prefill_ms: res.prefill_ms,
        decode_ms: res.decode_ms,
        first_draft_ms: res.first_draft_ms,
        draft_ms: res.draft_ms,
        verify_ms: res.verify_ms,
        exact_match_vs_ar: None,
        counted: true,
    }
}

/// Adds a record's τ to its run's running mean on its benchmark; returns the mean.
fn note_tau(running: &mut HashMap<(BenchmarkName, String), (f64, usize)>, name: BenchmarkName, rec: &RequestRecord) -> f64 {
    let e = running.entry((name, rec.drafter.clone())).or_insert((0.0, 0));
    e.0 += rec.tau;
    e.1 += 1;
    e.0 / e.1 as f64
}

fn div(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// Tokens produced by the decode cycles (the first output token comes from the prefill).
fn decoded_tokens(r: &RequestRecord) -> usize {
    r.tokens.len().saturating_sub(1)
}

/// The figures of run `label` from the counted records.
pub fn summarize(records: &[RequestRecord], label: &str, block_size: usize, order: &[BenchmarkName]) -> RunResult {
    let ar: HashMap<(&str, &str, usize), &RequestRecord> = records
        .iter()
        .filter(|r| r.counted && r.drafter == AR_LABEL)
        .map(|r| ((r.benchmark.as_str(), r.id.as_str(), r.turn), r))
        .collect();
    let mut all = AcceptStats::new();
    let mut benchmarks = Vec::new();
    for &name in order {
        let mut stats = AcceptStats::new();
        let (mut ar_dec, mut ar_pre, mut sp_dec, mut sp_pre) = (0.0, 0.0, 0.0, 0.0);
        let (mut ar_tok, mut sp_tok, mut tokens, mut mismatches) = (0usize, 0usize, 0usize, 0usize);
        for r in records
            .iter()
            .filter(|r| r.counted && r.drafter == label && r.benchmark == name.as_str())
        {
            let Some(a) = ar.get(&(r.benchmark.as_str(), r.id.as_str(), r.turn)) else {
                continue;
            };
            stats.add_cycles(&r.accept_lengths, &r.draft_lengths);
            all.add_cycles(&r.accept_lengths, &r.draft_lengths);
            ar_dec += a.decode_ms;
            ar_pre += a.prefill_ms;
            sp_dec += r.decode_ms;
            sp_pre += r.prefill_ms;
            ar_tok += decoded_tokens(a);
            sp_tok += decoded_tokens(r);
            tokens += r.tokens.len();
            if r.exact_match_vs_ar == Some(false) {
                mismatches += 1;
            }
        }
        let m = stats.summary();
        benchmarks.push((
            name,
            BenchmarkResult {
                tau: m.tau,
                tau_pooled: m.tau_pooled,
                accept_per_position: m.per_position_acceptance,
                accept_histogram: m.histogram,
                requests: m.requests,
                cycles: m.cycles,
                ar_tokens_per_s: div(ar_tok as f64 * 1e3, ar_dec),
                spec_tokens_per_s: div(sp_tok as f64 * 1e3, sp_dec),
                speedup: div(ar_dec, sp_dec),
                speedup_with_prefill: div(ar_dec + ar_pre, sp_dec + sp_pre),
                ar_decode_ms: ar_dec,
                spec_decode_ms: sp_dec,
                ar_prefill_ms: ar_pre,
                spec_prefill_ms: sp_pre,
                tokens,
                exact_mismatches: mismatches,
            },
        ));
    }
    let with_requests: Vec<&BenchmarkResult> = benchmarks.iter().map(|(_, b)| b).filter(|b| b.requests > 0).collect();
    let n = with_requests.len() as f64;
    let m = all.summary();
    RunResult {
        drafter: label.to_string(),
        block_size,
        average: AverageResult {
            tau: div(with_requests.iter().map(|b| b.tau).sum(), n),
            speedup: div(with_requests.iter().map(|b| b.speedup).sum(), n),
            tau_pooled: m.tau_pooled,
            accept_per_position: m.per_position_acceptance,
            requests: m.requests,
        },
        benchmarks,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(drafter: &str, turn: usize, accept: &[usize], tokens: usize, decode_ms: f64) -> RequestRecord {
        RequestRecord {
            benchmark: "gsm8k".into(),
            id: "q".into(),
            turn,
            drafter: drafter.into(),
            prompt_len: 5,
            tau: accept.iter().sum::<usize>() as f64 / accept.len() as f64,
            accept_lengths: accept.to_vec(),
            draft_lengths: vec![3; accept.len()],
            tokens: vec![7; tokens],
            finish_reason: FinishReason::Length,
            prefill_ms: 1.0,
            decode_ms,
            first_draft_ms: 0.0,
            draft_ms: 0.0,
            verify_ms: 0.0,
            exact_match_vs_ar: if drafter == AR_LABEL { None } else { Some(true) },
            counted: true,
        }
    }

    #[test]
    fn speedup_is_the_ratio_of_summed_decode_times_over_the_same_turns() {
        let records = vec![
            rec(AR_LABEL, 1, &[1; 8], 9, 80.0),
            rec("d", 1, &[4, 4], 9, 20.0),
            rec(AR_LABEL, 2, &[1; 4], 5, 40.0),
            rec("d", 2, &[2, 2], 5, 40.0),
        ];
        let r = summarize(&records, "d", 4, &[BenchmarkName::Gsm8k]);
        let b = r.benchmark(BenchmarkName::Gsm8k).unwrap();
        assert_eq!(b.requests, 2);
        assert!((b.speedup - 120.0 / 60.0).abs() < 1e-12, "{}", b.speedup);
        assert!((b.tau - 3.0).abs() < 1e-12);
        assert!((b.tau_pooled - 12.0 / 4.0).abs() < 1e-12);
        // (8 + 4) decoded tokens in 120 ms / 60 ms.
        assert!((b.ar_tokens_per_s - 100.0).abs() < 1e-9, "{}", b.ar_tokens_per_s);
        assert!((b.spec_tokens_per_s - 200.0).abs() < 1e-9, "{}", b.spec_tokens_per_s);
        assert!((b.speedup_with_prefill - 122.0 / 62.0).abs() < 1e-12);
    }

    #[test]
    fn uncounted_turns_leave_every_run_s_statistics() {
        let mut records = vec![
            rec(AR_LABEL, 1, &[1; 8], 9, 80.0),
            rec("d", 1, &[4, 4], 9, 20.0),
            rec(AR_LABEL, 2, &[1; 4], 5, 40.0),
        ];
        records[2].counted = false;
        let r = summarize(&records, "d", 4, &[BenchmarkName::Gsm8k]);
        let b = r.benchmark(BenchmarkName::Gsm8k).unwrap();
        assert_eq!(b.requests, 1);
        assert!((b.speedup - 4.0).abs() < 1e-12);
        let ar = summarize(&records, AR_LABEL, 1, &[BenchmarkName::Gsm8k]);
        assert_eq!(ar.benchmark(BenchmarkName::Gsm8k).unwrap().requests, 1);
    }

    #[test]
    fn averages_skip_benchmarks_without_requests() {
        let records = vec![rec(AR_LABEL, 1, &[1; 8], 9, 80.0), rec("d", 1, &[4, 4], 9, 20.0)];
        let r = summarize(&records, "d", 4, &[BenchmarkName::Gsm8k, BenchmarkName::Alpaca]);
        assert_eq!(r.benchmark(BenchmarkName::Alpaca).unwrap().requests, 0);
        assert!((r.average.tau - 4.0).abs() < 1e-12);
        assert!((r.average.speedup - 4.0).abs() < 1e-12);
    }

    #[test]
    fn turn_seeds_differ_across_turns_and_requests_but_not_across_runs() {
        let a = turn_seed(0, BenchmarkName::MtBench, "81", 1);
        assert_eq!(a, turn_seed(0, BenchmarkName::MtBench, "81", 1));
        assert_ne!(a, turn_seed(0, BenchmarkName::MtBench, "81", 2));
        assert_ne!(a, turn_seed(0, BenchmarkName::MtBench, "82", 1));
        assert_ne!(a, turn_seed(1, BenchmarkName::MtBench, "81", 1));
    }
}
