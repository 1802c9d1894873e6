//! Regenerating assistant turns with the target itself (DESIGN §3: the drafter learns best from
//! the target's own responses).
//!
//! For each conversation, the user turns are kept and every assistant turn is replaced by the
//! target's reply to the conversation so far (the regenerated history included), greedy or
//! sampled. Each turn's sampling seed is derived from (seed, conversation id, turn), so a result
//! does not depend on which worker produced it, in which order, or whether the run was resumed.
//!
//! Generation is the slow part of `prepare`, so results are cached: one JSON line per finished
//! conversation in `regenerated.jsonl`, appended and flushed as each finishes; a rerun reuses
//! them. `regenerated.settings.json` holds what the cached replies depend on (model, decoding
//! settings, max_len, max_turns); a rerun with other settings is refused instead of silently
//! mixing replies. A partial last line (a killed run) is cut off on open.
//!
//! Budget: a reply is capped at `max_new_tokens` and at what still fits in `max_len` (tokens
//! past `max_len` are cut from the sequence anyway); a turn whose prompt already fills
//! `max_len` ends the conversation there.
//!
//! Batches: a conversation is a [`ConversationRun`] that asks for one reply at a time, and
//! [`regenerate_all`] keeps `batch` conversations in flight per worker. Their replies are
//! decoded together by a [`ReplyEngine`]: [`TargetReplies`] runs one batched target forward
//! per cycle over every reply in flight (`spec::step_all`); a conversation whose reply
//! finishes asks for its next turn (or leaves, and the next conversation takes its place)
//! while the others go on. With batch-invariant weights (q8, native) every reply is bit for
//! bit the one-at-a-time reply, so the cache key (settings, `GENERATOR`) is unchanged and
//! caches made either way are interchangeable; `prepare` decodes one at a time with f32.
//! Decode on CPU is mostly memory-bound, so one forward over 16 rows costs a few rows' time;
//! see `DEFAULT_BATCH` for the measurements.
//!
//! Threads: `workers` threads each run their own engine over the shared `&Target` (it is
//! `Sync`), each in its own rayon pool of cores/workers threads; the global pool is left
//! alone, so the stages that follow in the same process use every core. Before batching,
//! measured on the 2-core development machine (SmolLM2 Q8, 12 ShareGPT conversations, ≤ 96
//! new tokens, greedy; load 7–10), 1 worker took 37.6 s and 2 workers 38.3 s: workers only pay
//! off with more cores than one decode uses; the batch is what pays off on a small machine.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;

use serde::{Deserialize, Serialize};

use crate::model::Target;
use crate::spec::{generate, step_all, AcceptRule, FinishReason, GenerateConfig, GenerateOutput, Generation, SpecError};
use crate::tokenizer::{ChatMessage, Tokenizer, TokenizerError};
use crate::data::{io_err, write_atomic, ChatExample, DataError};
use crate::util::fnv1a64;

/// How replies are decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegenerateMode {
    /// argmax at every step: the target's own greedy output.
    Greedy,
    /// Sampling at `temperature` with nucleus `top_p`.
    Sample,
}

crate::named_enum!(RegenerateMode, "regeneration mode", ["greedy", "sample"]);

/// What regenerated replies depend on (besides the model and the prompts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegenerateSettings {
    pub mode: RegenerateMode,
    /// Ignored for greedy.
    pub temperature: f32,
    pub top_p: f32,
    pub max_new_tokens: usize,
    pub seed: u64,
    /// Names the decode loop, so a cache made by another loop (other sampling draws) is not reused.
    pub generator: String,
}

/// The decode loop of [`reply_with_target`].
pub const GENERATOR: &str = "spec-driver-ar-v1";

impl RegenerateSettings {
    pub fn greedy(max_new_tokens: usize) -> Self {
        RegenerateSettings {
            mode: RegenerateMode::Greedy,
            temperature: 0.0,
            top_p: 1.0,
            max_new_tokens,
            seed: 0,
            generator: GENERATOR.to_string(),
        }
    }
}

/// One reply to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplyRequest {
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
}

/// Why a reply generator failed.
pub type ReplyError = Box<dyn std::error::Error + Send + Sync>;

/// A generated reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The reply's tokens, without the stop token.
    pub token_ids: Vec<u32>,
    /// Whether the reply ended with a stop token (else it hit the token limit).
    pub stopped: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RegenerateError {
    #[error("generating a reply for conversation {id}: {source}")]
    Generate {
        id: String,
        #[source]
        source: ReplyError,
    },
    #[error("conversation {id}: {source}")]
    Tokenizer {
        id: String,
        #[source]
        source: TokenizerError,
    },
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("{path} was made with other settings ({what}); delete it (and regenerated.jsonl) to regenerate, or choose another --out")]
    SettingsChanged { path: PathBuf, what: String },
    #[error("a regeneration worker panicked")]
    WorkerPanicked,
}

/// A conversation with regenerated assistant turns: one line of `regenerated.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegeneratedRecord {
    pub id: String,
    /// FNV-1a of the source conversation's messages: a changed source is regenerated.
    pub source_hash: u64,
    pub messages: Vec<ChatMessage>,
    /// Per assistant turn: whether the reply ended by itself.
    pub closed: Vec<bool>,
    pub new_tokens: usize,
}

impl RegeneratedRecord {
    pub fn example(&self) -> ChatExample {
        ChatExample { id: self.id.clone(), messages: self.messages.clone(), closed: self.closed.clone() }
    }
}

/// What happened to one conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Done(RegeneratedRecord),
    /// The first prompt alone fills `max_len`: nothing to learn from.
    PromptTooLong,
    /// Not started before the schedule's deadline ([`Schedule::deadline`]).
    NotReached,
}

pub fn source_hash(ex: &ChatExample) -> u64 {
    let text = serde_json::to_string(&ex.messages).unwrap_or_default();
    fnv1a64(text.as_bytes())
}

/// The seed of one turn's reply.
pub fn turn_seed(seed: u64, id: &str, turn: usize) -> u64 {
    crate::util::turn_seed(seed, "regenerate", id, turn)
}

/// Regenerates the assistant turns of `ex` with `reply` (prompt ids, request) -> reply: the
/// one-conversation driver of [`ConversationRun`] (the batched one is [`regenerate_all`]).
pub fn regenerate_conversation<F>(
    tok: &Tokenizer,
    ex: &ChatExample,
    settings: &RegenerateSettings,
    max_len: usize,
    reply: &F,
) -> Result<Outcome, RegenerateError>
where
    F: Fn(&[u32], &ReplyRequest) -> Result<Reply, ReplyError> + ?Sized,
{
    let mut run = ConversationRun::new(ex, settings, max_len);
    while let Some((prompt, req)) = run.next_request(tok)? {
        let r = reply(&prompt, &req).map_err(|source| RegenerateError::Generate { id: ex.id.clone(), source })?;
        run.give_reply(tok, r)?;
    }
    Ok(run.finish())
}

/// One conversation being regenerated, one reply at a time: [`ConversationRun::next_request`]
/// says what to generate next, [`ConversationRun::give_reply`] hands the reply back. Splitting
/// the conversation this way lets [`regenerate_all`] decode the replies of many conversations
/// in one batch while each conversation's turns stay in order.
pub struct ConversationRun<'e> {
    ex: &'e ChatExample,
    settings: &'e RegenerateSettings,
    max_len: usize,
    /// Index of the next source message to look at.
    next: usize,
    /// The conversation so far: source user/system turns, regenerated assistant turns.
    messages: Vec<ChatMessage>,
    closed: Vec<bool>,
    new_tokens: usize,
    /// A prompt filled max_len, or every message was used.
    ended: bool,
}

impl<'e> ConversationRun<'e> {
    pub fn new(ex: &'e ChatExample, settings: &'e RegenerateSettings, max_len: usize) -> Self {
        let messages = Vec::with_capacity(ex.messages.len());
        ConversationRun { ex, settings, max_len, next: 0, messages, closed: Vec::new(), new_tokens: 0, ended: false }
    }

    pub fn id(&self) -> &str {
        &self.ex.id
    }

    /// The next reply to generate (prompt ids, request), or None when the conversation is
    /// complete. Call [`ConversationRun::give_reply`] with the reply before asking again.
    pub fn next_request(&mut self, tok: &Tokenizer) -> Result<Option<(Vec<u32>, ReplyRequest)>, RegenerateError> {
        while !self.ended {
            let Some(m) = self.ex.messages.get(self.next) else { break };
            self.next += 1;
            if m.role != "assistant" {
                self.messages.push(m.clone());
                continue;
            }
            let prompt = tok.encode_chat(&self.messages, true).map_err(|source| RegenerateError::Tokenizer { id: self.ex.id.clone(), source })?;
            // A reply needs two tokens inside the window to give an anchor position.
            if prompt.len() + 2 > self.max_len {
                self.messages.pop();
                break;
            }
            let s = self.settings;
            let req = ReplyRequest {
                max_new_tokens: s.max_new_tokens.min(self.max_len - prompt.len()).max(1),
                temperature: match s.mode {
                    RegenerateMode::Greedy => 0.0,
                    RegenerateMode::Sample => s.temperature,
                },
                top_p: s.top_p,
                seed: turn_seed(s.seed, &self.ex.id, self.closed.len()),
            };
            return Ok(Some((prompt, req)));
        }
        self.ended = true;
        Ok(None)
    }

    /// Appends the reply to the request [`ConversationRun::next_request`] returned last.
    pub fn give_reply(&mut self, tok: &Tokenizer, r: Reply) -> Result<(), RegenerateError> {
        self.new_tokens += r.token_ids.len() + usize::from(r.stopped);
        let text = tok.decode(&r.token_ids, false).map_err(|source| RegenerateError::Tokenizer { id: self.ex.id.clone(), source })?;
        self.messages.push(ChatMessage::assistant(text));
        self.closed.push(r.stopped);
        Ok(())
    }

    /// The conversation up to its last regenerated reply.
    pub fn finish(mut self) -> Outcome {
        while self.messages.last().is_some_and(|m| m.role != "assistant") {
            self.messages.pop();
        }
        if self.closed.is_empty() {
            return Outcome::PromptTooLong;
        }
        let ex = self.ex;
        Outcome::Done(RegeneratedRecord { id: ex.id.clone(), source_hash: source_hash(ex), messages: self.messages, closed: self.closed, new_tokens: self.new_tokens })
    }
}

/// The target's reply through the one decode loop (`spec::driver::generate`, no proposer: plain
/// autoregressive decoding), stopping at any of `eos_token_ids`. [`TargetReplies`] decodes
/// the same replies several at a time.
pub fn reply_with_target(target: &Target, eos_token_ids: &[u32], prompt: &[u32], req: &ReplyRequest) -> Result<Reply, SpecError> {
    Ok(reply_of(generate(target, None, prompt, &reply_config(eos_token_ids, req))?))
}

fn reply_config(eos_token_ids: &[u32], req: &ReplyRequest) -> GenerateConfig {
    GenerateConfig {
        max_new_tokens: req.max_new_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        seed: req.seed,
        eos_token_ids: eos_token_ids.to_vec(),
        accept_rule: AcceptRule::SampleMatch,
    }
}

/// The reply without its stop token.
fn reply_of(out: GenerateOutput) -> Reply {
    let stopped = out.finish_reason == FinishReason::Eos;
    let mut token_ids = out.token_ids;
    if stopped {
        token_ids.pop();
    }
    Reply { token_ids, stopped }
}

/// Decodes replies, possibly several at a time. Replies are named by a caller's `key`.
pub trait ReplyEngine {
    /// Starts the reply to `prompt`.
    fn begin(&mut self, key: usize, prompt: &[u32], req: &ReplyRequest) -> Result<(), ReplyError>;
    /// Replies started and not yet returned by `step`.
    fn in_flight(&self) -> usize;
    /// Advances every reply in flight and returns those that finished (each with its own
    /// result). An outer error concerns every reply in flight.
    fn step(&mut self) -> Result<Vec<(usize, Result<Reply, ReplyError>)>, ReplyError>;
}

/// The target's replies, decoded together: every cycle verifies the last token of each reply
/// in flight in one batched forward (`spec::step_all`). Each reply is the one
/// [`reply_with_target`] gives alone, bit for bit when the target is batch-invariant
/// ([`Target::is_batch_invariant`]; `prepare` decodes one at a time otherwise).
pub struct TargetReplies<'a> {
    target: &'a Target,
    eos_token_ids: &'a [u32],
    /// (key, its generation)
    gens: Vec<(usize, Generation<'a>)>,
}

impl<'a> TargetReplies<'a> {
    pub fn new(target: &'a Target, eos_token_ids: &'a [u32]) -> Self {
        TargetReplies { target, eos_token_ids, gens: Vec::new() }
    }
}

impl ReplyEngine for TargetReplies<'_> {
    fn begin(&mut self, key: usize, prompt: &[u32], req: &ReplyRequest) -> Result<(), ReplyError> {
        let g = Generation::start(self.target, None, prompt, &reply_config(self.eos_token_ids, req))?;
        self.gens.push((key, g));
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.gens.len()
    }

    fn step(&mut self) -> Result<Vec<(usize, Result<Reply, ReplyError>)>, ReplyError> {
        let cycles = {
            let mut gens: Vec<&mut Generation<'_>> = self.gens.iter_mut().map(|(_, g)| g).collect();
            step_all(&mut gens)?
        };
        let mut done = Vec::new();
        let mut still = Vec::with_capacity(self.gens.len());
        for ((key, g), cycle) in std::mem::take(&mut self.gens).into_iter().zip(cycles) {
            match cycle {
                Err(e) => done.push((key, Err(e.into()))),
                Ok(_) if g.is_finished() => done.push((key, Ok(reply_of(g.finish())))),
                Ok(_) => still.push((key, g)),
            }
        }
        self.gens = still;
        Ok(done)
    }
}

/// A one-reply-at-a-time generator (a closure) as a [`ReplyEngine`]: `begin` generates the
/// whole reply, the next `step` returns it.
pub struct FnReplies<'f, F: ?Sized> {
    reply: &'f F,
    ready: Vec<(usize, Result<Reply, ReplyError>)>,
}

impl<'f, F: ?Sized> FnReplies<'f, F> {
    pub fn new(reply: &'f F) -> Self {
        FnReplies { reply, ready: Vec::new() }
    }
}

impl<F> ReplyEngine for FnReplies<'_, F>
where
    F: Fn(&[u32], &ReplyRequest) -> Result<Reply, ReplyError> + ?Sized,
{
    fn begin(&mut self, key: usize, prompt: &[u32], req: &ReplyRequest) -> Result<(), ReplyError> {
        let r = (self.reply)(prompt, req);
        self.ready.push((key, r));
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.ready.len()
    }

    fn step(&mut self) -> Result<Vec<(usize, Result<Reply, ReplyError>)>, ReplyError> {
        Ok(std::mem::take(&mut self.ready))
    }
}

/// Makes one [`ReplyEngine`] per regeneration worker.
pub type EngineFactory<'a> = dyn Fn() -> Box<dyn ReplyEngine + 'a> + Sync + 'a;

// ---------------------------------------------------------------------------------------------
// The on-disk cache

pub const REGENERATED_FILE: &str = "regenerated.jsonl";
pub const REGENERATED_SETTINGS_FILE: &str = "regenerated.settings.json";

/// What cached replies depend on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheKey {
    pub model_fingerprint: String,
    pub settings: RegenerateSettings,
    pub max_len: usize,
    pub max_turns: Option<usize>,
    /// The weights mode of the target that answered (`q8`, `native`, `f32`): the modes' greedy
    /// replies differ, so a cache made in one is not reused by another. None: a reply engine
    /// that is not a target (tests).
    #[serde(default)]
    pub weights: Option<String>,
}

/// `regenerated.jsonl`, open for appending.
pub struct RegenerationCache {
    key: CacheKey,
    path: PathBuf,
    file: File,
    done: HashMap<(String, u64), RegeneratedRecord>,
}

impl RegenerationCache {
    /// Opens (or starts) the cache in `dir` for `key`.
    pub fn open(dir: &Path, key: &CacheKey) -> Result<Self, RegenerateError> {
        let key_path = dir.join(REGENERATED_SETTINGS_FILE);
        let path = dir.join(REGENERATED_FILE);
        let key_text = serde_json::to_string_pretty(key).unwrap_or_default();
        if key_path.is_file() {
            let old = std::fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
            let same = serde_json::from_str::<CacheKey>(&old).is_ok_and(|k| &k == key);
            if !same {
                return Err(RegenerateError::SettingsChanged { path: key_path, what: describe_change(&old, key) });
            }
        } else {
            if path.is_file() && std::fs::metadata(&path).map_err(io_err(&path))?.len() > 0 {
                return Err(RegenerateError::SettingsChanged {
                    path: key_path,
                    what: format!("{} exists without its settings file", path.display()),
                });
            }
            write_atomic(&key_path, key_text.as_bytes())?;
        }
        let mut done = HashMap::new();
        let mut good_len = 0u64;
        if path.is_file() {
            let f = File::open(&path).map_err(io_err(&path))?;
            let mut reader = BufReader::new(f);
            let mut line = String::new();
            loop {
                line.clear();
                let n = reader.read_line(&mut line).map_err(io_err(&path))?;
                if n == 0 || !line.ends_with('\n') {
                    break;
                }
                match serde_json::from_str::<RegeneratedRecord>(line.trim_end()) {
                    Ok(r) => {
                        done.insert((r.id.clone(), r.source_hash), r);
                        good_len += n as u64;
                    }
                    Err(_) => break,
                }
            }
        }
        let file = OpenOptions::new().create(true).append(true).open(&path).map_err(io_err(&path))?;
        // Cut a partial or corrupt tail (a killed run) so the next line starts clean.
        file.set_len(good_len).map_err(io_err(&path))?;
        Ok(RegenerationCache { key: key.clone(), path, file, done })
    }

    /// What the cached replies were made with; [`regenerate_all`] generates with the same.
    pub fn key(&self) -> &CacheKey {
        &self.key
    }

    pub fn get(&self, ex: &ChatExample) -> Option<&RegeneratedRecord> {
        self.done.get(&(ex.id.clone(), source_hash(ex)))
    }

    pub fn len(&self) -> usize {
        self.done.len()
    }

    pub fn is_empty(&self) -> bool {
        self.done.is_empty()
    }

    /// Appends one finished conversation and flushes it to disk.
    pub fn append(&mut self, rec: RegeneratedRecord) -> Result<(), RegenerateError> {
        let mut line = serde_json::to_string(&rec).unwrap_or_default();
        line.push('\n');
        self.file.write_all(line.as_bytes()).map_err(io_err(&self.path))?;
        self.file.sync_data().map_err(io_err(&self.path))?;
        self.done.insert((rec.id.clone(), rec.source_hash), rec);
        Ok(())
    }
}

fn describe_change(old: &str, new: &CacheKey) -> String {
    let Ok(old) = serde_json::from_str::<serde_json::Value>(old) else {
        return "unreadable settings file".into();
    };
    let new = serde_json::to_value(new).unwrap_or_default();
    let mut diffs = Vec::new();
    diff_values("", &old, &new, &mut diffs);
    if diffs.is_empty() {
        "unreadable settings file".into()
    } else {
        diffs.join(", ")
    }
}

fn diff_values(at: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    match (a, b) {
        (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
            for (k, va) in x {
                let path = if at.is_empty() { k.clone() } else { format!("{at}.{k}") };
                diff_values(&path, va, y.get(k).unwrap_or(&serde_json::Value::Null), out);
            }
            for (k, vb) in y.iter().filter(|(k, _)| !x.contains_key(*k)) {
                let path = if at.is_empty() { k.clone() } else { format!("{at}.{k}") };
                diff_values(&path, &serde_json::Value::Null, vb, out);
            }
        }
        _ if a != b => out.push(format!("{at}: was {a}, now {b}")),
        _ => {}
    }
}

/// Progress hooks: called on the calling thread after each conversation.
pub trait RegenerationProgress {
    fn conversation_done(&mut self, new_tokens: usize);
}

impl RegenerationProgress for () {
    fn conversation_done(&mut self, _new_tokens: usize) {}
}

/// How many conversations one regeneration worker decodes together by default (`--batch`).
///
/// Measured on the shared 2-core development machine (AMD EPYC, AVX-512 VNNI; load 2–5 from
/// other jobs), SmolLM2 Q8, `prepare --data sharegpt --max-conversations 32 --regenerate
/// greedy --max-new-tokens 96 --max-len 320` (25 conversations regenerated, 2155 new tokens),
/// medians of 3 interleaved runs, new tokens/s. Load 3–5: before batching 74.9; batch 1
/// 74.9; batch 4 141.5; batch 16 182.0 (2.4×); a series of batch 8 / 16 / 32 gave 201 / 217 /
/// 200. Load 0.5–3.6: before batching 77.9; batch 1 75.9; batch 4 174.7; batch 16 263.0
/// (3.4×). The replies, shards and cache key were identical in every run. Batch 16 is also where one
/// `qgemm` weight tile serves all rows (`MAX_ROWS`), and `bench decode` measures one
/// 16-sequence step at 4.8–5.0× the tokens/s of one sequence; what keeps regeneration below
/// that is the prefill of each new turn (compute-bound, not shared) and the last replies of
/// a run, which decode in a thinning batch.
pub const DEFAULT_BATCH: usize = 16;

/// How [`regenerate_all`] schedules its work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// No conversation is started after this instant (those in flight finish); the ones never
    /// started come back as [`Outcome::NotReached`]. None: every conversation.
    pub deadline: Option<std::time::Instant>,
    /// Threads, each with its own engine (and its own pool of cores/workers kernel threads).
    pub workers: usize,
    /// Conversations each worker keeps in flight, their replies decoded together.
    pub batch: usize,
}

/// What a worker sends back: (example index, its outcome).
type Done = (usize, Result<Outcome, RegenerateError>);

/// Regenerates every example not yet in `cache`, with the cache's settings and max_len:
/// `schedule.workers` threads, each with its own engine from `engines`, each keeping up to
/// `schedule.batch` conversations in flight. Each finished conversation is appended to the
/// cache as it comes. Returns one outcome per example, in example order; no outcome depends
/// on the schedule (given a batch-invariant engine), except which conversations a deadline
/// leaves unstarted ([`Outcome::NotReached`]). The first error stops the workers; what
/// finished before it stays cached.
pub fn regenerate_all(
    tok: &Tokenizer,
    examples: &[ChatExample],
    cache: &mut RegenerationCache,
    schedule: Schedule,
    progress: &mut dyn RegenerationProgress,
    engines: &EngineFactory<'_>,
) -> Result<Vec<Outcome>, RegenerateError> {
    // Owned copies: `cache` is appended to while the workers read these.
    let (settings, max_len) = (cache.key.settings.clone(), cache.key.max_len);
    let settings = &settings;
    let mut outcomes: Vec<Option<Outcome>> = examples.iter().map(|ex| cache.get(ex).cloned().map(Outcome::Done)).collect();
    let todo: Vec<usize> = (0..examples.len()).filter(|&i| outcomes[i].is_none()).collect();
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel::<Done>();
    let result = std::thread::scope(|scope| -> Result<(), RegenerateError> {
        let mut handles = Vec::new();
        let n_workers = schedule.workers.max(1).min(todo.len().max(1));
        // Several workers: each runs its kernels in its own pool of cores/workers threads, so
        // that they do not spin against each other, and the process's global pool (used by
        // whatever runs after the regeneration) keeps every core.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let per_worker = (cores / n_workers).max(1);
        for _ in 0..n_workers {
            let tx = tx.clone();
            let worker = Worker {
                tok,
                examples,
                todo: &todo,
                next: &next,
                stop: &stop,
                settings,
                max_len,
                batch: schedule.batch.max(1),
                deadline: schedule.deadline,
            };
            handles.push(scope.spawn(move || {
                let work = move || worker.run(engines().as_mut(), &tx);
                let pool = (n_workers > 1).then(|| rayon::ThreadPoolBuilder::new().num_threads(per_worker).build().ok()).flatten();
                match pool {
                    Some(pool) => pool.install(work),
                    None => work(),
                }
            }));
        }
        drop(tx);
        let first_err = collect(rx, cache, &stop, progress, &mut outcomes);
        for h in handles {
            h.join().map_err(|_| RegenerateError::WorkerPanicked)?;
        }
        first_err.map_or(Ok(()), Err)
    });
    result?;
    // With a deadline, the workers leave the rest of the queue unstarted; without one, a
    // missing outcome means a worker died.
    outcomes
        .into_iter()
        .map(|o| match (o, schedule.deadline) {
            (Some(o), _) => Ok(o),
            (None, Some(_)) => Ok(Outcome::NotReached),
            (None, None) => Err(RegenerateError::WorkerPanicked),
        })
        .collect()
}

/// On the calling thread: stores each outcome, appends finished conversations to the cache,
/// reports progress; returns the first error (after which the workers are told to stop).
fn collect(
    rx: mpsc::Receiver<Done>,
    cache: &mut RegenerationCache,
    stop: &AtomicBool,
    progress: &mut dyn RegenerationProgress,
    outcomes: &mut [Option<Outcome>],
) -> Option<RegenerateError> {
    let mut first_err = None;
    for (i, r) in rx {
        match r {
            Ok(o) => {
                if let Outcome::Done(rec) = &o {
                    progress.conversation_done(rec.new_tokens);
                    if first_err.is_none() {
                        if let Err(e) = cache.append(rec.clone()) {
                            stop.store(true, Ordering::Relaxed);
                            first_err = Some(e);
                        }
                    }
                } else {
                    progress.conversation_done(0);
                }
                outcomes[i] = Some(o);
            }
            Err(e) => {
                stop.store(true, Ordering::Relaxed);
                first_err.get_or_insert(e);
            }
        }
    }
    first_err
}

/// One regeneration thread: takes conversations from the shared queue and keeps up to `batch`
/// of them in flight in its engine.
struct Worker<'w> {
    tok: &'w Tokenizer,
    examples: &'w [ChatExample],
    todo: &'w [usize],
    next: &'w AtomicUsize,
    stop: &'w AtomicBool,
    settings: &'w RegenerateSettings,
    max_len: usize,
    batch: usize,
    deadline: Option<std::time::Instant>,
}

impl<'w> Worker<'w> {
    fn run(&self, engine: &mut dyn ReplyEngine, tx: &mpsc::Sender<Done>) {
        // Conversations whose reply is in flight, by example index.
        let mut runs: HashMap<usize, ConversationRun<'w>> = HashMap::new();
        while !self.stop.load(Ordering::Relaxed) {
            // 1. fill the batch from the queue, until the deadline
            let open = self.deadline.is_none_or(|d| std::time::Instant::now() < d);
            while open && runs.len() < self.batch {
                let k = self.next.fetch_add(1, Ordering::Relaxed);
                let Some(&i) = self.todo.get(k) else { break };
                let run = ConversationRun::new(&self.examples[i], self.settings, self.max_len);
                if let Some(run) = self.advance(i, run, engine, tx) {
                    runs.insert(i, run);
                }
            }
            if runs.is_empty() {
                break;
            }
            // 2. one cycle of every reply in flight; finished replies move their conversation on
            let finished = match engine.step() {
                Ok(f) => f,
                Err(source) => {
                    let i = runs.keys().copied().min().unwrap_or(0);
                    let _ = tx.send((i, Err(RegenerateError::Generate { id: self.examples[i].id.clone(), source })));
                    return;
                }
            };
            for (i, reply) in finished {
                let Some(mut run) = runs.remove(&i) else { continue };
                let next = match reply {
                    Ok(r) => run.give_reply(self.tok, r).map(|_| run),
                    Err(source) => Err(RegenerateError::Generate { id: run.id().to_string(), source }),
                };
                match next {
                    Ok(run) => {
                        if let Some(run) = self.advance(i, run, engine, tx) {
                            runs.insert(i, run);
                        }
                    }
                    Err(e) => {
                        let _ = tx.send((i, Err(e)));
                    }
                }
            }
        }
    }

    /// Starts conversation `i`'s next reply in the engine and gives the run back, or sends its
    /// outcome (complete, or failed) and gives nothing back.
    fn advance(&self, i: usize, mut run: ConversationRun<'w>, engine: &mut dyn ReplyEngine, tx: &mpsc::Sender<Done>) -> Option<ConversationRun<'w>> {
        let r = match run.next_request(self.tok) {
            Ok(Some((prompt, req))) => match engine.begin(i, &prompt, &req) {
                Ok(()) => return Some(run),
                Err(source) => Err(RegenerateError::Generate { id: run.id().to_string(), source }),
            },
            Ok(None) => Ok(run.finish()),
            Err(e) => Err(e),
        };
        let _ = tx.send((i, r));
        None
    }
}
