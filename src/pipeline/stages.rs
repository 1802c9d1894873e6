//! The pipeline's stages as functions of typed plans: [`prepare`], [`train`], [`init_drafter`],
//! [`evaluate`]. The CLI builds a plan from its arguments; the quickstart and the experiment
//! build them in code. Each stage loads what it needs, checks everything before the long work,
//! reports through a [`Progress`] observer and returns what it did; none prints.
//!
//! Every default of a plan is set in its `new` (one source), and the CLI's flags show them.

use std::path::{Path, PathBuf};

use crate::assets::{self, AssetError};
use crate::data::prepare::{PrepareError, PrepareOptions, PrepareReport, DEFAULT_MAX_LEN, DEFAULT_SHARD_TOKENS};
use crate::data::regenerate::{RegenerateMode, RegenerateSettings, DEFAULT_BATCH, GENERATOR};
use crate::data::{FeatureDtype, FeatureSettings, ModelIdentity, PrepareSettings};
use crate::data::topic::{Topic, TopicFilter};
use crate::drafter::{AnyDrafter, DFlashInitConfig, DrafterError, DrafterInit, DrafterKind};
use crate::eval::datasets::{self, Benchmark, BenchmarkName};
use crate::eval::journal::{Journal, JournalError, JournaledObserver};
use crate::eval::report::{self, DrafterSetting, ReportError, Settings, Written};
use crate::eval::runner::{self, ChatRenderer, EvalConfig, EvalDrafter, EvalError, EvalResults};
use crate::model::load::load_info;
use crate::model::{load_model_on, LoadError, LoadedModel, WeightsMode, DEFAULT_MODEL};
use crate::nn::DeviceChoice;
use crate::spec::AcceptRule;
use crate::train::config::TrainConfig;
use crate::train::parallel::World;
use crate::train::trainable::init_final_norm_from_target;
use crate::train::trainer::{train_with, RunOptions, RunSummary, TrainError};
use crate::util::progress::{Observer, Progress};

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("loading model {name}: {source}")]
    Model { name: String, source: LoadError },
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {source}")]
    Asset { what: String, source: AssetError },
    #[error("drafter {path}: {source}")]
    Drafter { path: String, source: DrafterError },
    #[error("loading benchmark {name}: {source}")]
    Benchmark { name: BenchmarkName, source: datasets::DatasetError },
    #[error("preparing {path}: {source}")]
    Prepare { path: PathBuf, source: PrepareError },
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Eval(#[from] EvalError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("writing the results to {path}: {source}")]
    Report { path: PathBuf, source: ReportError },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Device(#[from] crate::nn::DeviceError),
}

/// Loads a model for the device a plan names: the one place the pipeline opens a device.
pub(crate) fn load(name: &str, weights: WeightsMode, device: DeviceChoice) -> Result<LoadedModel, StageError> {
    let backend = device.backend()?;
    load_model_on(name, weights, &backend).map_err(|source| StageError::Model { name: name.to_string(), source })
}

// ---------------------------------------------------------------------------------------------
// prepare

/// Sequence length for targets other than the embedded default.
pub const DEFAULT_MAX_LEN_OTHER: usize = 2048;

/// What `prepare` makes: conversations → (regenerated replies) → shards (→ feature cache).
#[derive(Debug, Clone)]
pub struct PreparePlan {
    /// `smollm2`, an HF directory or a .gguf file.
    pub model: String,
    /// `sharegpt` (fetched on first use) or a ShareGPT-style JSON / JSONL file.
    pub data: String,
    pub out: PathBuf,
    /// The first N usable conversations, in file order (None: all).
    pub max_conversations: Option<usize>,
    /// Only conversations on these topics (`data::topic`), once the first `topics_after` are
    /// selected (None: every topic).
    pub topics: Option<Vec<Topic>>,
    pub topics_after: usize,
    /// Tokens per sequence (None: [`DEFAULT_MAX_LEN`] for smollm2, [`DEFAULT_MAX_LEN_OTHER`] else).
    pub max_len: Option<usize>,
    /// Exchanges kept per conversation (None: 1 when regenerating, else all).
    pub max_turns: Option<usize>,
    pub eval_fraction: f64,
    pub regenerate: Option<RegenerateMode>,
    pub temperature: f32,
    pub top_p: f32,
    pub max_new_tokens: usize,
    pub workers: usize,
    /// Conversations each regeneration worker decodes together.
    pub batch: usize,
    /// Weights for regeneration.
    pub weights: WeightsMode,
    /// Cache the target's hidden states after these layers.
    pub features: Option<Vec<usize>>,
    pub feature_dtype: FeatureDtype,
    /// Weights for the feature forward.
    pub feature_weights: WeightsMode,
    /// Store the top-k of the target's next-token logits beside the features (distillation).
    pub soft_labels: Option<usize>,
    pub seed: u64,
    pub shard_tokens: usize,
    /// Where regeneration and the feature forward compute.
    pub device: DeviceChoice,
    /// Regeneration starts no conversation after this instant (`PrepareOptions::regenerate_deadline`).
    pub regenerate_deadline: Option<std::time::Instant>,
}

impl PreparePlan {
    pub const DEFAULT_EVAL_FRACTION: f64 = 0.05;
    pub const DEFAULT_TEMPERATURE: f32 = 0.8;
    pub const DEFAULT_MAX_NEW_TOKENS: usize = 256;

    pub fn new(model: &str, data: &str, out: &Path) -> Self {
        PreparePlan {
            model: model.to_string(),
            data: data.to_string(),
            out: out.to_path_buf(),
            max_conversations: None,
            topics: None,
            topics_after: 0,
            max_len: None,
            max_turns: None,
            eval_fraction: Self::DEFAULT_EVAL_FRACTION,
            regenerate: None,
            temperature: Self::DEFAULT_TEMPERATURE,
            top_p: 1.0,
            max_new_tokens: Self::DEFAULT_MAX_NEW_TOKENS,
            workers: 1,
            batch: DEFAULT_BATCH,
            weights: WeightsMode::default(),
            features: None,
            feature_dtype: FeatureDtype::F16,
            feature_weights: WeightsMode::F32,
            soft_labels: None,
            seed: 0,
            shard_tokens: DEFAULT_SHARD_TOKENS,
            device: DeviceChoice::default(),
            regenerate_deadline: None,
        }
    }

    fn settings(&self) -> PrepareSettings {
        let max_len = self.max_len.unwrap_or(if self.model == DEFAULT_MODEL { DEFAULT_MAX_LEN } else { DEFAULT_MAX_LEN_OTHER });
        let regenerate = self.regenerate.map(|mode| RegenerateSettings {
            mode,
            temperature: if mode == RegenerateMode::Greedy { 0.0 } else { self.temperature },
            top_p: if mode == RegenerateMode::Greedy { 1.0 } else { self.top_p },
            max_new_tokens: self.max_new_tokens,
            seed: self.seed,
            generator: GENERATOR.to_string(),
        });
        let features = self.features.clone().map(|ids| FeatureSettings {
            target_layer_ids: ids,
            dtype: self.feature_dtype,
            weights: self.feature_weights,
            soft_labels: self.soft_labels,
        });
        PrepareSettings {
            data: self.data.clone(),
            max_conversations: self.max_conversations,
            max_len,
            max_turns: self.max_turns.or(self.regenerate.map(|_| 1)),
            eval_fraction: self.eval_fraction,
            seed: self.seed,
            regenerate,
            features,
            topics: self.topics.clone().map(|topics| TopicFilter { topics, after: self.topics_after }),
        }
    }
}

/// Runs the prepare pipeline. The target's weights are read only when something runs the target
/// (regeneration, features); the feature forward shares the regeneration model when the weights
/// modes agree.
pub fn prepare(plan: &PreparePlan, progress: Observer) -> Result<PrepareReport, StageError> {
    if plan.regenerate.is_none() && plan.workers != 1 {
        return Err(StageError::Invalid("--workers only applies with --regenerate".into()));
    }
    if plan.regenerate.is_none() && plan.regenerate_deadline.is_some() {
        return Err(StageError::Invalid("--regenerate-minutes only applies with --regenerate".into()));
    }
    if plan.workers == 0 {
        return Err(StageError::Invalid("--workers must be at least 1".into()));
    }
    if plan.batch == 0 {
        return Err(StageError::Invalid("--batch must be at least 1".into()));
    }
    match &plan.topics {
        Some(t) if t.is_empty() => return Err(StageError::Invalid("--topics needs at least one of chat, code, math".into())),
        None if plan.topics_after > 0 => {
            return Err(StageError::Invalid("--topics-after only applies with --topics (e.g. --topics code,math)".into()))
        }
        _ => {}
    }
    if plan.soft_labels.is_some() && plan.features.is_none() {
        return Err(StageError::Invalid(
            "--soft-labels stores the target's logits beside its features; give --features too (the drafter's target_layer_ids)".into(),
        ));
    }
    let data_path = if plan.data == "sharegpt" {
        assets::file(&assets::SHAREGPT, assets::SHAREGPT_JSON)
            .map_err(|source| StageError::Asset { what: "fetching the ShareGPT data (`specauf fetch --all`)".into(), source })?
    } else {
        PathBuf::from(&plan.data)
    };
    let gen_model = match plan.regenerate {
        Some(_) => Some(load(&plan.model, plan.weights, plan.device)?),
        None => None,
    };
    let own_feature_model = match (&plan.features, &gen_model) {
        (Some(_), Some(_)) if plan.feature_weights == plan.weights => None,
        (Some(_), _) => Some(load(&plan.model, plan.feature_weights, plan.device)?),
        (None, _) => None,
    };
    let feature_model = own_feature_model.as_ref().or(if plan.features.is_some() { gen_model.as_ref() } else { None });
    let info;
    let (tok, identity) = match gen_model.as_ref().or(feature_model) {
        Some(m) => (&m.tokenizer, ModelIdentity::of(m).map_err(prep_err(plan))?),
        None => {
            info = load_info(&plan.model).map_err(|source| StageError::Model { name: plan.model.clone(), source })?;
            (&info.tokenizer, ModelIdentity::from_parts(&info.name, &info.location, &info.config).map_err(prep_err(plan))?)
        }
    };
    let settings = plan.settings();
    progress.note(&format!(
        "prepare: model {} ({} layers, hidden {}), data {}, max_len {}, max_turns {}, eval {:.1}%, out {}",
        identity.name,
        identity.num_hidden_layers,
        identity.hidden_size,
        data_path.display(),
        settings.max_len,
        settings.max_turns.map_or("all".to_string(), |t| t.to_string()),
        plan.eval_fraction * 100.0,
        plan.out.display()
    ));
    if let Some(r) = &settings.regenerate {
        progress.note(&format!(
            "prepare: regenerating replies ({:?}, T {}, top-p {}, ≤ {} new tokens, {} worker(s) × batch {}{}, {} weights)",
            r.mode,
            r.temperature,
            r.top_p,
            r.max_new_tokens,
            plan.workers,
            plan.batch,
            if gen_model.as_ref().is_some_and(|m| !m.target.is_batch_invariant()) {
                " (these weights are not batch-invariant: decoding one at a time)"
            } else {
                ""
            },
            gen_model.as_ref().map_or(plan.weights, |m| m.target.weights_mode())
        ));
    }
    if let Some(f) = &settings.features {
        let dim = f.target_layer_ids.len() * identity.hidden_size;
        progress.note(&format!(
            "prepare: caching features of layers {:?} ({dim} values a token, {} bytes a token in {})",
            f.target_layer_ids,
            dim * 2,
            f.dtype
        ));
    }
    let opts = PrepareOptions { data_path, settings, workers: plan.workers, batch: plan.batch, shard_tokens: plan.shard_tokens, out: plan.out.clone(), progress, regenerate_deadline: plan.regenerate_deadline };
    crate::data::prepare::prepare(tok, &identity, gen_model.as_ref().map(|m| &m.target), feature_model.map(|m| &m.target), &opts)
        .map_err(|source| StageError::Prepare { path: plan.out.clone(), source })
}

fn prep_err(plan: &PreparePlan) -> impl Fn(crate::model::ModelError) -> StageError + '_ {
    move |e| StageError::Prepare { path: plan.out.clone(), source: PrepareError::Model(e) }
}

// ---------------------------------------------------------------------------------------------
// train, init-drafter

/// Trains a drafter as `cfg` says; the target's feature forward runs in `weights`.
/// `world` is this process's rank among data-parallel processes ([`World::single`] for one).
/// `deadline`: when the run should be done by ([`RunOptions::deadline`]; None: run every step).
pub fn train(
    cfg: &TrainConfig,
    weights: WeightsMode,
    device: DeviceChoice,
    world: World,
    resume: bool,
    deadline: Option<std::time::Instant>,
    progress: &dyn Progress,
) -> Result<RunSummary, StageError> {
    let model = load(&cfg.model, weights, device)?;
    let tc = model.target.config();
    progress.note(&format!(
        "train: target {} ({} layers, hidden {}), drafter {} with {} layers, block {}, objective {}, {} steps × {} sequences × {} anchors = {} supervised rows/step; run dir {}",
        cfg.model,
        tc.num_hidden_layers,
        tc.hidden_size,
        cfg.drafter.kind,
        cfg.drafter.layers,
        cfg.drafter.block_size,
        cfg.objective.name(),
        cfg.steps,
        cfg.batch_sequences * cfg.grad_accum,
        cfg.num_anchors,
        cfg.batch_sequences * cfg.grad_accum * cfg.num_anchors * (cfg.drafter.block_size - 1),
        cfg.out.display()
    ));
    Ok(train_with(&model, cfg, &RunOptions { resume, stop_after: None, world, deadline }, progress)?)
}

/// What `init-drafter` writes: an untrained drafter for a target.
#[derive(Debug, Clone)]
pub struct InitPlan {
    pub model: String,
    pub out: PathBuf,
    pub kind: DrafterKind,
    pub layers: usize,
    pub block_size: usize,
    /// None: [`crate::drafter::default_mask_token`].
    pub mask_token_id: Option<u32>,
    /// None: the DFlash reference's choice for the depths (DESIGN §2).
    pub target_layer_ids: Option<Vec<usize>>,
    pub seed: u64,
}

impl InitPlan {
    pub fn new(model: &str, out: &Path) -> Self {
        InitPlan {
            model: model.to_string(),
            out: out.to_path_buf(),
            kind: DrafterKind::DFlash,
            layers: crate::drafter::DEFAULT_LAYERS,
            block_size: crate::drafter::DEFAULT_BLOCK_SIZE,
            mask_token_id: None,
            target_layer_ids: None,
            seed: 0,
        }
    }
}

/// Writes an untrained drafter (the same initialisation as a training run's first step).
pub fn init_drafter(plan: &InitPlan) -> Result<AnyDrafter, StageError> {
    let m = load(&plan.model, WeightsMode::default(), DeviceChoice::default())?;
    let tc = m.target.config();
    let mut backbone = DFlashInitConfig::new(plan.layers, plan.block_size, plan.mask_token_id.unwrap_or_else(|| crate::drafter::default_mask_token(tc)));
    backbone.target_layer_ids = plan.target_layer_ids.clone();
    let init = DrafterInit { kind: plan.kind, backbone, gru_hidden_dim: None, emb_dim: None };
    let drafter_err = |source| StageError::Drafter { path: plan.out.display().to_string(), source };
    let drafter = AnyDrafter::init_random(tc, &init, plan.seed).map_err(drafter_err)?;
    init_final_norm_from_target(&drafter.named_vars(), &m.target, drafter.mask_token_id())?;
    drafter.save(&plan.out).map_err(drafter_err)?;
    Ok(drafter)
}

/// `specauf draft-vocab`: ranks the target's tokens by their count in the replies of `data`'s
/// training split and writes the ranking into the drafter folder `drafter` (DESIGN §7.13), for a
/// drafter trained elsewhere or before draft vocabularies existed (`specauf train` writes one
/// itself). Checks that the data and the drafter are for the same vocabulary.
pub fn write_draft_vocab(data: &Path, drafter: &Path) -> Result<crate::drafter::DraftVocab, StageError> {
    let drafter_err = |source| StageError::Drafter { path: drafter.display().to_string(), source };
    if DrafterKind::of_checkpoint(drafter).map_err(drafter_err)? != DrafterKind::DFlash {
        return Err(StageError::Invalid(format!(
            "{} is a Domino drafter, which drafts through its candle forward over the whole vocabulary; a draft vocabulary applies to DFlash drafters",
            drafter.display()
        )));
    }
    let config = crate::drafter::DFlashConfig::read(drafter).map_err(drafter_err)?;
    let ds = crate::data::Dataset::open(data, crate::data::Split::Train).map_err(|e| StageError::Invalid(e.to_string()))?;
    let model_vocab = ds.manifest().model.vocab_size;
    if model_vocab != config.vocab_size {
        return Err(StageError::Invalid(format!(
            "{} was prepared for a vocabulary of {model_vocab} tokens but the drafter {} has vocab_size {}: use data prepared with the drafter's target",
            data.display(),
            drafter.display(),
            config.vocab_size
        )));
    }
    let vocab = ds.draft_vocab().map_err(|e| StageError::Invalid(e.to_string()))?;
    if vocab.tokens == 0 {
        return Err(StageError::Invalid(format!("{}: the training split has no reply tokens to count", data.display())));
    }
    vocab.write(drafter).map_err(drafter_err)?;
    Ok(vocab)
}

// ---------------------------------------------------------------------------------------------
// evaluate

/// One drafter of an evaluation: its report label, its checkpoint folder, and the block size it
/// runs at (None: the plan's `block_size` if set, else chosen from measurement).
#[derive(Debug, Clone, PartialEq)]
pub struct EvalDrafterSpec {
    pub label: String,
    pub dir: PathBuf,
    pub block_size: Option<usize>,
}

impl EvalDrafterSpec {
    /// A drafter whose block size follows the plan.
    pub fn new(label: impl Into<String>, dir: impl Into<PathBuf>) -> Self {
        EvalDrafterSpec { label: label.into(), dir: dir.into(), block_size: None }
    }

    /// The same drafter fixed at block size `b`.
    pub fn at_block_size(self, b: usize) -> Self {
        EvalDrafterSpec { block_size: Some(b), ..self }
    }
}

/// What `eval` runs: AR and each drafter on the same requests.
#[derive(Debug, Clone)]
pub struct EvalPlan {
    pub model: String,
    /// The drafters to evaluate; empty: AR alone.
    pub drafters: Vec<EvalDrafterSpec>,
    pub benchmarks: Vec<BenchmarkName>,
    /// Requests per benchmark, a seeded subset (None: all).
    pub limit: Option<usize>,
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    /// Verify blocks of this size instead of each drafter's trained size (only lower).
    pub block_size: Option<usize>,
    /// How every drafter runs: its draft vocabulary's size, its draft cut, its precision.
    pub drafter_run: crate::drafter::RunSettings,
    pub seed: u64,
    pub weights: WeightsMode,
    /// Where the target and drafters compute.
    pub device: DeviceChoice,
    /// A system message for every request (None: the template's default).
    pub system: Option<String>,
    pub out: PathBuf,
    /// The command line as typed, recorded in the report.
    pub command: String,
}

impl EvalPlan {
    pub const DEFAULT_MAX_NEW_TOKENS: usize = 256;

    pub fn new(model: &str, out: &Path) -> Self {
        EvalPlan {
            model: model.to_string(),
            drafters: Vec::new(),
            benchmarks: BenchmarkName::ALL.to_vec(),
            limit: None,
            max_new_tokens: Self::DEFAULT_MAX_NEW_TOKENS,
            temperature: 0.0,
            top_p: 1.0,
            block_size: None,
            drafter_run: crate::drafter::RunSettings::default(),
            seed: 0,
            weights: WeightsMode::default(),
            device: DeviceChoice::default(),
            system: None,
            out: out.to_path_buf(),
            command: String::new(),
        }
    }

    /// Everything that can be wrong with the plan before anything is loaded.
    pub fn validate(&self) -> Result<(), StageError> {
        let bad = |m: &str| Err(StageError::Invalid(m.to_string()));
        if self.max_new_tokens == 0 {
            return bad("--max-new-tokens must be at least 1");
        }
        if self.limit == Some(0) {
            return bad("--limit 0 selects no request; give a positive limit, or leave it out for whole benchmarks");
        }
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad("--temperature must be a finite number >= 0 (0 = greedy)");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("--top-p must be in (0, 1]");
        }
        if self.block_size.is_some_and(|b| b < 2) || self.drafters.iter().any(|d| d.block_size.is_some_and(|b| b < 2)) {
            return bad("--block-size must be at least 2: a block is [last, MASK × (B-1)] and drafts B-1 tokens");
        }
        if let Some(d) = self.drafters.iter().enumerate().find_map(|(i, d)| self.drafters[..i].iter().any(|e| e.label == d.label).then_some(d)) {
            return Err(StageError::Invalid(format!(
                "two drafters are labelled `{}`; give each a distinct label (--label)",
                d.label
            )));
        }
        if self.benchmarks.is_empty() {
            return bad("--benchmarks is empty; name at least one of gsm8k, math500, humaneval, mbpp, mtbench, alpaca");
        }
        if self.out.is_file() {
            return Err(StageError::Invalid(format!("--out {} is a file; give a folder", self.out.display())));
        }
        Ok(())
    }

    /// What must match for a partial evaluation to be resumed: everything that changes a record.
    /// `chosen`: the block size each drafter runs at (measured choices may differ between runs;
    /// a resume at another B is refused — fix B with --block-size to resume across machines).
    fn journal_settings(&self, model: &str, chosen: &[usize]) -> serde_json::Value {
        let drafters: Vec<serde_json::Value> = self
            .drafters
            .iter()
            .map(|EvalDrafterSpec { label, dir, .. }| {
                let meta = std::fs::metadata(dir.join("model.safetensors")).ok();
                let modified =
                    meta.as_ref().and_then(|m| m.modified().ok()).and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
                serde_json::json!({
                    "label": label,
                    "dir": dir.display().to_string(),
                    "bytes": meta.map(|m| m.len()),
                    "modified_ns": modified.map(|d| d.as_nanos().to_string()),
                })
            })
            .collect();
        let benchmarks: Vec<&str> = self.benchmarks.iter().map(|b| b.as_str()).collect();
        serde_json::json!({
            "model": model,
            "weights": format!("{:?}", self.weights),
            "drafters": drafters,
            "benchmarks": benchmarks,
            "limit": self.limit,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "block_size": self.block_size,
            "chosen_block_sizes": chosen,
            "seed": self.seed,
            "system": self.system,
        })
    }
}

/// What an evaluation produced.
pub struct EvalOutcome {
    pub results: EvalResults,
    pub written: Written,
    /// Requests resumed from an interrupted run.
    pub resumed: usize,
}

impl EvalOutcome {
    /// The contract: at T = 0 every drafter reproduces AR token for token. An error naming the
    /// mismatched requests otherwise.
    pub fn check_exact(&self, weights: WeightsMode) -> Result<(), StageError> {
        let r = &self.results;
        if !(r.exactness_checked && r.exact_mismatches > 0) {
            return Ok(());
        }
        let which: Vec<String> = r
            .mismatched_records()
            .filter(|x| x.counted)
            .map(|x| format!("{} {} turn {} ({})", x.benchmark, x.id, x.turn, x.drafter))
            .collect();
        Err(StageError::Invalid(format!(
            "{} drafter requests differ from AR at T = 0 ({}); speculative decoding must reproduce the target's greedy output \
             token for token (see {}){}",
            r.exact_mismatches,
            which.join("; "),
            self.written.report_md.display(),
            if weights == WeightsMode::F32 { "; with --weights f32 a near-tie can flip between a block and a one-token forward" } else { "" }
        )))
    }
}

/// Fetches the benchmark data (if needed) and loads every benchmark.
fn load_benchmarks(names: &[BenchmarkName], limit: Option<usize>, seed: u64) -> Result<Vec<Benchmark>, StageError> {
    let home = assets::home().map_err(|source| StageError::Asset { what: "locating $SPECAUF_HOME".into(), source })?;
    let root = home.join("assets");
    let mut out = Vec::new();
    for &name in names {
        for (package, _) in name.required_assets() {
            let p = assets::ALL.iter().find(|p| p.name == *package).ok_or_else(|| {
                StageError::Invalid(format!("benchmark {name} needs package {package}, which the asset table does not list"))
            })?;
            assets::ensure(p).map_err(|source| StageError::Asset { what: format!("fetching the data of {name}"), source })?;
        }
        out.push(datasets::load(name, &root, limit, seed).map_err(|source| StageError::Benchmark { name, source })?);
    }
    Ok(out)
}

/// Loads every drafter, checked against the target, at the plan's block size.
fn load_drafters(plan: &EvalPlan, m: &LoadedModel) -> Result<(Vec<EvalDrafter<'static>>, Vec<DrafterSetting>), StageError> {
    let (mut drafters, mut settings) = (Vec::new(), Vec::new());
    for EvalDrafterSpec { label, dir, block_size } in &plan.drafters {
        let err = |source| StageError::Drafter { path: dir.display().to_string(), source };
        let mut d = AnyDrafter::load_for(dir, &m.target).map_err(err)?;
        d.apply(&plan.drafter_run).map_err(err)?;
        let draft_vocab = d.draft_ids().map(|ids| ids.len());
        let trained = d.block_size();
        let (d, block_choice) = match block_size.or(plan.block_size) {
            Some(b) => (d.at_block_size(b).map_err(err)?, None),
            None => {
                let (d, c) = crate::drafter::block_choice::choose_for(&m.target, d, dir, plan.drafter_run.draft_p_min)
                    .map_err(|e| StageError::Invalid(format!("drafter {}: choosing the block size: {e}", dir.display())))?;
                (d, Some(c))
            }
        };
        settings.push(DrafterSetting {
            label: label.clone(),
            path: Some(dir.display().to_string()),
            block_size: d.block_size(),
            trained_block_size: trained,
            block_choice,
            draft_vocab,
        });
        drafters.push(EvalDrafter::new(label.clone(), d.into_proposer_on(m.target.backend())));
    }
    Ok((drafters, settings))
}

/// Evaluates AR and every drafter on the plan's benchmarks, resuming an interrupted run from its
/// journal, and writes results.json, requests.jsonl, report.md and plot.svg into `plan.out`.
pub fn evaluate(plan: &EvalPlan, progress: &dyn Progress) -> Result<EvalOutcome, StageError> {
    // 1. Everything loaded and checked before the first generation.
    plan.validate()?;
    let benchmarks = load_benchmarks(&plan.benchmarks, plan.limit, plan.seed)?;
    let m = load(&plan.model, plan.weights, plan.device)?;
    if !m.tokenizer.has_chat_template() {
        return Err(StageError::Invalid(format!(
            "model {} has no chat template; the benchmarks are chat prompts (give a model whose tokenizer_config.json or GGUF carries one)",
            plan.model
        )));
    }
    let (mut drafters, drafter_settings) = load_drafters(plan, &m)?;
    let cfg = EvalConfig {
        max_new_tokens: plan.max_new_tokens,
        temperature: plan.temperature,
        top_p: plan.top_p,
        seed: plan.seed,
        eos_token_ids: m.eos_token_ids(),
        accept_rule: AcceptRule::SampleMatch,
        warmup_tokens: 8,
    };
    let renderer = ChatRenderer { tokenizer: &m.tokenizer, system: plan.system.clone() };
    runner::validate(&m.target, &drafters, &benchmarks, &cfg)?;
    let tc = m.target.config();
    let requests: usize = benchmarks.iter().map(|b| b.requests.len()).sum();
    progress.note(&format!(
        "eval: model {} ({} layers, context {}), weights {}, {} threads; runs: AR{}; {} benchmarks, {requests} requests, max_new_tokens {}, T = {}",
        m.name,
        tc.num_hidden_layers,
        tc.max_position_embeddings,
        m.target.weights_mode(),
        candle_core::utils::get_num_threads(),
        drafter_settings.iter().map(|d| format!(", {} (B = {})", d.label, d.block_size)).collect::<String>(),
        benchmarks.len(),
        plan.max_new_tokens,
        plan.temperature,
    ));

    // 2. Generate, journaling finished requests.
    std::fs::create_dir_all(&plan.out).map_err(|source| StageError::Io { path: plan.out.clone(), source })?;
    let chosen: Vec<usize> = drafter_settings.iter().map(|d| d.block_size).collect();
    let journal = Journal::open(&plan.out, &plan.journal_settings(&m.name, &chosen))?;
    let resumed = journal.resumable();
    if resumed > 0 {
        progress.note(&format!(
            "eval: resuming an interrupted evaluation: {resumed} requests already done (kept in {})",
            journal.path().display()
        ));
    }
    let mut observer = JournaledObserver::new(journal, progress);
    let results = runner::run(&m.target, &renderer, &mut drafters, &benchmarks, &cfg, &mut observer)?;
    progress.finish(false);

    // 3. Write; the results hold every request now, so the journal goes.
    let settings = Settings::describe(&m.name, &m.target.weights_mode().to_string(), drafter_settings, plan.limit, &cfg, &results, &plan.command);
    let written = report::write_all(&plan.out, &settings, &results).map_err(|source| StageError::Report { path: plan.out.clone(), source })?;
    observer.journal.remove();
    Ok(EvalOutcome { results, written, resumed })
}
