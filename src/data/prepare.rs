//! The `prepare` pipeline: conversations → (regenerated replies) → masked token sequences →
//! train/eval shards (→ feature cache) → manifest.
//!
//! 1. Load ShareGPT JSON/JSONL; malformed records are skipped and counted by the loader.
//!    Conversations of the benchmark hold-out (`sharegpt::is_heldout`) are never used; share-site
//!    banner system turns are dropped; the first `max_turns` exchanges are kept; the first
//!    `max_conversations` remaining conversations, in file order, are selected; with `topics`
//!    (`topic::TopicFilter`), after its first `after`, only those on its topics.
//! 2. Optionally regenerate every assistant turn with the target (`regenerate.rs`, cached).
//! 3. Tokenize with the assistant-only loss mask, cut to `max_len` (`data.rs`).
//! 4. Split by conversation id (`data::is_eval`), write shards of about `shard_tokens` tokens.
//! 5. Optionally write the feature cache (`features.rs`).
//! 6. Write `manifest.json` last. The old manifest is removed first, so a run that fails half
//!    way never leaves a manifest that describes files it overwrote.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;


use crate::model::{ModelError, Target};
use crate::tokenizer::Tokenizer;
use crate::data::{
    self, io_err, tokenize_chat, ChatExample, DataError, FeatureInfo, FeatureSettings, Manifest, ModelIdentity,
    PrepareSettings, Sequence, SourceReport, Split, SplitInfo, TokenizerInfo,
};
use crate::data::features::{self, FeatureError, MAX_SOFT_LABELS};
use crate::data::regenerate::{
    self, CacheKey, EngineFactory, FnReplies, Outcome, RegenerateError, RegenerationCache, RegenerationProgress, Reply, ReplyEngine, ReplyError,
    ReplyRequest, Schedule, TargetReplies,
};
use crate::data::sharegpt::{self, ShareGptError};
use crate::util::progress::{Observer, Progress, Unit};

/// Default sequence length for the embedded default target.
pub const DEFAULT_MAX_LEN: usize = 512;
/// Default target size of a shard, in tokens.
pub const DEFAULT_SHARD_TOKENS: usize = 1 << 18;

#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// The ShareGPT JSON/JSONL file.
    pub data_path: PathBuf,
    pub settings: PrepareSettings,
    /// Regeneration threads, each with its own engine over the shared target.
    pub workers: usize,
    /// Conversations each regeneration thread decodes together (their replies share every
    /// target forward; see `regenerate::DEFAULT_BATCH`).
    pub batch: usize,
    pub shard_tokens: usize,
    pub out: PathBuf,
    /// Where regeneration and feature extraction report their progress.
    pub progress: Observer,
    /// Regeneration starts no conversation after this instant; the rest are left out of the
    /// data, counted in the manifest's `skipped` as [`NOT_REACHED`]. None: all of them.
    pub regenerate_deadline: Option<Instant>,
}

/// The manifest's `skipped` reason of conversations a regeneration deadline left out.
pub const NOT_REACHED: &str = "not_regenerated_before_the_deadline";

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    Source(#[from] ShareGptError),
    #[error("{path}: no conversation left to use ({why}); pass other data or a larger --max-conversations")]
    NothingSelected { path: PathBuf, why: String },
    #[error("no conversation produced a training sequence (skipped: {skipped}); try a larger --max-len")]
    NoSequences { skipped: String },
    #[error("--regenerate needs the target's weights, but none were given")]
    NoGenerator,
    #[error("--features needs the target's weights, but none were given")]
    NoFeatureTarget,
    #[error("invalid setting: {0}")]
    Invalid(String),
    #[error(transparent)]
    Regenerate(#[from] RegenerateError),
    #[error(transparent)]
    Features(#[from] FeatureError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// What a run did, beyond the manifest.
#[derive(Debug, Clone)]
pub struct PrepareReport {
    pub manifest: Manifest,
    /// Conversations regenerated in this run, and reused from `regenerated.jsonl`.
    pub regenerated: usize,
    pub reused: usize,
    pub regenerate_seconds: f64,
    /// New tokens generated in this run.
    pub generated_tokens: usize,
    pub feature_seconds: f64,
    pub total_seconds: f64,
}

/// A reply generator: prompt ids and request in, reply out. Shared by the worker threads.
pub type ReplyFn<'a> = dyn Fn(&[u32], &ReplyRequest) -> Result<Reply, ReplyError> + Sync + 'a;

/// Runs the pipeline with `target` for regeneration (if asked) and `feature_target` for the
/// feature cache (if asked; it may be the same target, or one loaded with other weights).
///
/// Regeneration decodes `opts.batch` conversations together per worker ([`TargetReplies`]) when
/// the target's forward is batch-invariant (`q8`, `native`), and one at a time otherwise
/// (`f32`), so that the replies, and the cache of them, never depend on the batch.
pub fn prepare(
    tok: &Tokenizer,
    model: &ModelIdentity,
    target: Option<&Target>,
    feature_target: Option<&Target>,
    opts: &PrepareOptions,
) -> Result<PrepareReport, PrepareError> {
    // Stop at the model's EOS ids and the tokenizer's (a chat model may name its end-of-turn
    // token only in its tokenizer config).
    let eos = crate::model::load::stop_token_ids(target.map(|t| t.config().eos_token_ids.as_slice()).unwrap_or_default(), tok);
    let eos = &eos;
    let engines = target.map(|t| move || Box::new(TargetReplies::new(t, eos)) as Box<dyn ReplyEngine + '_>);
    let batch = if target.is_some_and(|t| t.is_batch_invariant()) { opts.batch } else { 1 };
    let weights = target.map(|t| t.weights_mode().to_string());
    match &engines {
        Some(f) => prepare_engines(tok, model, Some((f, weights)), batch, feature_target, opts),
        None => prepare_engines(tok, model, None, batch, feature_target, opts),
    }
}

/// [`prepare`] with any reply generator (tests use a cheap deterministic one), one reply at a
/// time per worker.
pub fn prepare_with(
    tok: &Tokenizer,
    model: &ModelIdentity,
    reply: Option<&ReplyFn<'_>>,
    feature_target: Option<&Target>,
    opts: &PrepareOptions,
) -> Result<PrepareReport, PrepareError> {
    match reply {
        Some(f) => {
            let engines = move || Box::new(FnReplies::new(f)) as Box<dyn ReplyEngine + '_>;
            prepare_engines(tok, model, Some((&engines, None)), opts.batch, feature_target, opts)
        }
        None => prepare_engines(tok, model, None, opts.batch, feature_target, opts),
    }
}

/// The pipeline, with reply engines from `engines` decoding `batch` conversations together (and
/// the weights mode of their target, part of the regeneration cache's key).
fn prepare_engines(
    tok: &Tokenizer,
    model: &ModelIdentity,
    engines: Option<(&EngineFactory<'_>, Option<String>)>,
    batch: usize,
    feature_target: Option<&Target>,
    opts: &PrepareOptions,
) -> Result<PrepareReport, PrepareError> {
    let started = Instant::now();
    let s = &opts.settings;
    // 0. Every setting is refused before the output folder is touched; then the old manifest goes.
    check_inputs(s, opts, engines.is_some(), feature_target)?;
    clear_manifest(&opts.out)?;

    // 1. load and select
    let mut sel = select(s, opts)?;

    // 2. regenerate (the examples become the regenerated ones)
    let regen = match (&s.regenerate, engines) {
        (Some(rs), Some((engines, weights))) => regenerate_selected(tok, model, rs, (engines, weights), batch, opts, &mut sel)?,
        _ => Regeneration::default(),
    };

    // 3. tokenize: split → [(conversation id, sequence)]
    let by_split = tokenize_selected(tok, &sel.examples, s, &mut sel.skipped)?;

    // 4. token shards; `groups`: split → per shard, the indices of its sequences in `by_split`
    let tokenizer = TokenizerInfo::of(tok);
    let settings_hash = data::settings_hash(model, &tokenizer, s);
    let mut keep_files = Vec::new();
    let (splits, groups) = write_token_shards(&by_split, &settings_hash, opts, &mut keep_files)?;

    // 5. features
    let mut feature_seconds = 0.0;
    let features = match (&s.features, feature_target) {
        (Some(fs), Some(target)) => {
            let t0 = Instant::now();
            let info = write_features(target, fs, &by_split, &groups, &settings_hash, opts, &mut keep_files)?;
            feature_seconds = t0.elapsed().as_secs_f64();
            Some(info)
        }
        _ => None,
    };
    remove_other_shards(&opts.out, &keep_files)?;

    // 6. manifest
    let manifest = Manifest {
        format: data::MANIFEST_FORMAT.to_string(),
        version: data::MANIFEST_VERSION,
        created_by: format!("specauf {}", crate::version()),
        model: model.clone(),
        tokenizer,
        settings: s.clone(),
        settings_hash,
        source: sel.source,
        skipped: sel.skipped,
        splits,
        features,
    };
    manifest.write(&opts.out)?;
    Ok(PrepareReport {
        manifest,
        regenerated: regen.regenerated,
        reused: regen.reused,
        regenerate_seconds: regen.seconds,
        generated_tokens: regen.generated_tokens,
        feature_seconds,
        total_seconds: started.elapsed().as_secs_f64(),
    })
}

/// The settings, and the inputs they ask for. A bad layer id is caught here, not after an hour
/// of regeneration.
fn check_inputs(
    s: &PrepareSettings,
    opts: &PrepareOptions,
    has_generator: bool,
    feature_target: Option<&Target>,
) -> Result<(), PrepareError> {
    validate(s, opts)?;
    if s.regenerate.is_some() && !has_generator {
        return Err(PrepareError::NoGenerator);
    }
    if let Some(fs) = &s.features {
        let target = feature_target.ok_or(PrepareError::NoFeatureTarget)?;
        // Checked before any work: a bad layer id would otherwise surface after regeneration.
        let layers = target.config().num_hidden_layers;
        if let Some(&bad) = fs.target_layer_ids.iter().find(|&&l| l >= layers) {
            return Err(ModelError::LayerOutOfRange { layer: bad, layers }.into());
        }
    }
    Ok(())
}

/// Creates `out` and removes its manifest, so that a run that fails half way never leaves a
/// manifest that describes files it overwrote.
fn clear_manifest(out: &Path) -> Result<(), PrepareError> {
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let manifest_path = out.join(data::MANIFEST_FILE);
    if manifest_path.exists() {
        std::fs::remove_file(&manifest_path).map_err(io_err(&manifest_path))?;
    }
    Ok(())
}

/// The conversations a run uses, what became of the others, and the manifest's skip counts
/// (reason → conversations), which the later phases add to.
struct Selected {
    source: SourceReport,
    examples: Vec<ChatExample>,
    skipped: BTreeMap<String, usize>,
}

/// Phase 1: the first `max_conversations` conversations outside the hold-out, in file order,
/// (with `topics`, those of its topics once its first `after` are selected), cut to `max_turns`
/// exchanges and without share-site banners.
fn select(s: &PrepareSettings, opts: &PrepareOptions) -> Result<Selected, PrepareError> {
    let loaded = sharegpt::load(&opts.data_path)?;
    let mut source = SourceReport {
        path: opts.data_path.display().to_string(),
        loaded: loaded.conversations.len(),
        truncated_tail: loaded.truncated_tail,
        skipped_records: loaded.skipped.clone(),
        ..SourceReport::default()
    };
    let mut examples: Vec<ChatExample> = Vec::new();
    for conv in &loaded.conversations {
        if sharegpt::is_heldout(conv) {
            source.heldout_excluded += 1;
            continue;
        }
        if s.max_conversations.is_some_and(|m| examples.len() >= m) {
            continue;
        }
        if let Some(filter) = &s.topics {
            if !filter.keeps(examples.len(), conv.first_user_turn().unwrap_or_default()) {
                source.off_topic += 1;
                continue;
            }
        }
        let (ex, banner) = ChatExample::from_conversation(conv, s.max_turns);
        source.share_banners_dropped += usize::from(banner);
        examples.push(ex);
    }
    source.selected = examples.len();
    if examples.is_empty() {
        return Err(PrepareError::NothingSelected {
            path: opts.data_path.clone(),
            why: format!(
                "{} loaded, {} in the benchmark hold-out, {} off the chosen topics",
                source.loaded, source.heldout_excluded, source.off_topic
            ),
        });
    }
    Ok(Selected { source, examples, skipped: BTreeMap::new() })
}

/// What phase 2 did, for the report.
#[derive(Default)]
struct Regeneration {
    /// Conversations regenerated in this run, and reused from the cache.
    regenerated: usize,
    reused: usize,
    /// New tokens generated in this run.
    generated_tokens: usize,
    seconds: f64,
}

/// Phase 2: regenerates every selected conversation not yet in the cache of `opts.out` and
/// replaces the examples by the regenerated ones; a prompt longer than `max_len` drops its
/// conversation (counted in `sel.skipped`).
fn regenerate_selected(
    tok: &Tokenizer,
    model: &ModelIdentity,
    rs: &regenerate::RegenerateSettings,
    (engines, weights): (&EngineFactory<'_>, Option<String>),
    batch: usize,
    opts: &PrepareOptions,
    sel: &mut Selected,
) -> Result<Regeneration, PrepareError> {
    let s = &opts.settings;
    let t0 = Instant::now();
    let key = CacheKey {
        model_fingerprint: model.fingerprint.clone(),
        settings: rs.clone(),
        max_len: s.max_len,
        max_turns: s.max_turns,
        weights,
    };
    let mut cache = RegenerationCache::open(&opts.out, &key)?;
    let reused = sel.examples.iter().filter(|ex| cache.get(ex).is_some()).count();
    let todo = sel.examples.len() - reused;
    let mut bar = Phase::new(&*opts.progress, todo as u64, "regenerate", Unit::Items);
    let schedule = Schedule { workers: opts.workers, batch, deadline: opts.regenerate_deadline };
    let outcomes = regenerate::regenerate_all(tok, &sel.examples, &mut cache, schedule, &mut bar, engines)?;
    let generated_tokens = bar.tokens;
    bar.finish();
    let mut kept = Vec::with_capacity(sel.examples.len());
    for o in outcomes {
        match o {
            Outcome::Done(rec) => {
                sel.source.regenerated_new_tokens += rec.new_tokens;
                kept.push(rec.example());
            }
            Outcome::PromptTooLong => *sel.skipped.entry("prompt_exceeds_max_len".into()).or_insert(0) += 1,
            Outcome::NotReached => *sel.skipped.entry(NOT_REACHED.into()).or_insert(0) += 1,
        }
    }
    let regenerated = kept.len() - reused;
    sel.examples = kept;
    Ok(Regeneration { regenerated, reused, generated_tokens, seconds: t0.elapsed().as_secs_f64() })
}

/// Phase 3: each example as a masked sequence, in the split its id falls in (both splits present,
/// maybe empty); examples that do not tokenize are counted in `skipped` by reason.
fn tokenize_selected(
    tok: &Tokenizer,
    examples: &[ChatExample],
    s: &PrepareSettings,
    skipped: &mut BTreeMap<String, usize>,
) -> Result<BTreeMap<Split, Vec<(String, Sequence)>>, PrepareError> {
    let mut by_split: BTreeMap<Split, Vec<(String, Sequence)>> = BTreeMap::new();
    by_split.insert(Split::Train, Vec::new());
    by_split.insert(Split::Eval, Vec::new());
    for ex in examples {
        match tokenize_chat(tok, ex, s.max_len) {
            Ok(seq) => {
                let split = if data::is_eval(&ex.id, s.eval_fraction) { Split::Eval } else { Split::Train };
                by_split.entry(split).or_default().push((ex.id.clone(), seq));
            }
            Err(e) => *skipped.entry(e.reason().to_string()).or_insert(0) += 1,
        }
    }
    if by_split.values().all(Vec::is_empty) {
        return Err(PrepareError::NoSequences {
            skipped: skipped.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", "),
        });
    }
    Ok(by_split)
}

/// Split → its shards' sequence indices (see [`shard_groups`]).
type ShardGroups = BTreeMap<Split, Vec<Vec<usize>>>;

/// Phase 4: writes `<split>-<k:05>.safetensors` per split and shard, adding each file name to
/// `keep_files`. Returns the manifest's split infos and the shard groups.
fn write_token_shards(
    by_split: &BTreeMap<Split, Vec<(String, Sequence)>>,
    settings_hash: &str,
    opts: &PrepareOptions,
    keep_files: &mut Vec<String>,
) -> Result<(BTreeMap<Split, SplitInfo>, ShardGroups), PrepareError> {
    let mut splits = BTreeMap::new();
    let mut groups: ShardGroups = BTreeMap::new();
    for (&split, seqs) in by_split {
        let shards = shard_groups(seqs.iter().map(|(_, q)| q.len()), opts.shard_tokens);
        let mut info = SplitInfo::default();
        for (k, group) in shards.iter().enumerate() {
            let members: Vec<(&str, &Sequence)> = group.iter().map(|&i| (seqs[i].0.as_str(), &seqs[i].1)).collect();
            let path = opts.out.join(format!("{}-{k:05}.safetensors", split.as_str()));
            let shard = data::write_token_shard(&path, split, &members, settings_hash)?;
            keep_files.push(shard.file.clone());
            info.sequences += shard.sequences;
            info.tokens += shard.tokens;
            info.loss_tokens += members.iter().map(|(_, q)| q.loss_tokens()).sum::<usize>();
            info.shards.push(shard);
        }
        splits.insert(split, info);
        groups.insert(split, shards);
    }
    Ok((splits, groups))
}

fn validate(s: &PrepareSettings, opts: &PrepareOptions) -> Result<(), PrepareError> {
    if s.max_len < 2 {
        return Err(PrepareError::Invalid(format!("--max-len {} must be at least 2", s.max_len)));
    }
    if !(0.0..=1.0).contains(&s.eval_fraction) {
        return Err(PrepareError::Invalid(format!("--eval-fraction {} must lie in [0, 1]", s.eval_fraction)));
    }
    if s.max_turns == Some(0) {
        return Err(PrepareError::Invalid("--max-turns must be at least 1".into()));
    }
    if opts.workers == 0 || opts.batch == 0 {
        return Err(PrepareError::Invalid(format!("--workers {} and --batch {} must be at least 1", opts.workers, opts.batch)));
    }
    if opts.shard_tokens == 0 {
        return Err(PrepareError::Invalid("shard size must be at least one token".into()));
    }
    if let Some(r) = &s.regenerate {
        if r.max_new_tokens == 0 {
            return Err(PrepareError::Invalid("--max-new-tokens must be at least 1".into()));
        }
        if r.mode == regenerate::RegenerateMode::Sample && (r.temperature <= 0.0 || !(r.top_p > 0.0 && r.top_p <= 1.0)) {
            return Err(PrepareError::Invalid(format!(
                "sampling needs --temperature > 0 and --top-p in (0, 1] (got {} and {})",
                r.temperature, r.top_p
            )));
        }
    }
    if let Some(f) = &s.features {
        if f.target_layer_ids.is_empty() {
            return Err(PrepareError::Invalid("--features needs at least one layer id".into()));
        }
        if f.soft_labels.is_some_and(|k| k == 0 || k > MAX_SOFT_LABELS) {
            return Err(PrepareError::Invalid(format!("--soft-labels must lie in 1..={MAX_SOFT_LABELS} (the top k of the target's logits kept per position)")));
        }
    }
    Ok(())
}

/// Consecutive groups of sequence indices, each closed once it reaches `shard_tokens` tokens.
fn shard_groups(lens: impl Iterator<Item = usize>, shard_tokens: usize) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut current = Vec::new();
    let mut tokens = 0usize;
    for (i, len) in lens.enumerate() {
        current.push(i);
        tokens += len;
        if tokens >= shard_tokens {
            groups.push(std::mem::take(&mut current));
            tokens = 0;
        }
    }
    if !current.is_empty() {
        groups.push(current);
    }
    groups
}

fn write_features(
    target: &Target,
    fs: &FeatureSettings,
    by_split: &BTreeMap<Split, Vec<(String, Sequence)>>,
    groups: &ShardGroups,
    settings_hash: &str,
    opts: &PrepareOptions,
    keep_files: &mut Vec<String>,
) -> Result<FeatureInfo, PrepareError> {
    let total: usize = by_split.values().flat_map(|v| v.iter().map(|(_, q)| q.len())).sum();
    let mut bar = Phase::new(&*opts.progress, total as u64, "features", Unit::Tokens);
    let mut shards = BTreeMap::new();
    for (&split, seqs) in by_split {
        let mut infos = Vec::new();
        for (k, group) in groups.get(&split).map(Vec::as_slice).unwrap_or(&[]).iter().enumerate() {
            let members: Vec<&Sequence> = group.iter().map(|&i| &seqs[i].1).collect();
            let path = opts.out.join(features::feature_shard_name(split, k));
            let info = features::write_feature_shard(
                &path,
                target,
                &members,
                &fs.target_layer_ids,
                fs.dtype,
                fs.soft_labels,
                settings_hash,
                &mut |n| bar.inc(n as u64),
            )?;
            keep_files.push(info.file.clone());
            infos.push(info);
        }
        shards.insert(split, infos);
    }
    bar.finish();
    Ok(FeatureInfo {
        target_layer_ids: fs.target_layer_ids.clone(),
        dtype: fs.dtype,
        weights: fs.weights,
        dim: fs.target_layer_ids.len() * target.config().hidden_size,
        soft_labels: fs.soft_labels,
        shards,
    })
}

/// Removes shard files of `dir` that this run did not write (an earlier run's extra shards).
fn remove_other_shards(dir: &Path, keep: &[String]) -> Result<(), DataError> {
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = ["train-", "eval-", "features-"].iter().any(|p| name.starts_with(p)) && name.ends_with(".safetensors");
        if ours && !keep.contains(&name) {
            std::fs::remove_file(entry.path()).map_err(io_err(&entry.path()))?;
        }
    }
    Ok(())
}

/// One phase of the pipeline as seen by the observer: items done, and for regeneration the
/// new tokens and their rate.
struct Phase<'a> {
    progress: &'a dyn Progress,
    done: u64,
    tokens: usize,
    started: Instant,
}

impl<'a> Phase<'a> {
    fn new(progress: &'a dyn Progress, len: u64, what: &str, unit: Unit) -> Self {
        progress.phase(what, Some(len), 0, unit);
        Phase { progress, done: 0, tokens: 0, started: Instant::now() }
    }

    fn inc(&mut self, n: u64) {
        self.done += n;
        let status = if self.tokens > 0 {
            format!("{:.1} tok/s", self.tokens as f64 / self.started.elapsed().as_secs_f64().max(1e-9))
        } else {
            String::new()
        };
        self.progress.update(self.done, &status);
    }

    fn finish(&self) {
        self.progress.finish(true);
    }
}

impl RegenerationProgress for Phase<'_> {
    fn conversation_done(&mut self, new_tokens: usize) {
        self.tokens += new_tokens;
        self.inc(1);
    }
}
