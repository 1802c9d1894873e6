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
//! Threads: the target decodes batch 1, so [`regenerate_all`] runs `workers` threads over the
//! shared `&Target` (it is `Sync`), each call with its own KV cache. Measured on the 2-core
//! development machine (SmolLM2 Q8, 12 ShareGPT conversations, ≤ 96 new tokens, greedy; seven
//! interleaved pairs, machine shared, load 7–10): 1 worker (candle's 2-thread kernels) 37.6 s
//! mean, 2 workers (1 kernel thread each) 38.3 s: no difference within the noise, and the same
//! CPU time per token (~25 ms). The outputs are identical either way. The default is 1 worker;
//! more pay off on machines with more cores than one decode can use. With several workers each
//! runs in its own rayon pool of cores/workers threads; the global pool is left alone, so the
//! stages that follow in the same process (features, training, evaluation) use every core.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;

use serde::{Deserialize, Serialize};

use crate::model::Target;
use crate::spec::{generate, AcceptRule, FinishReason, GenerateConfig, SpecError};
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
}

pub fn source_hash(ex: &ChatExample) -> u64 {
    let text = serde_json::to_string(&ex.messages).unwrap_or_default();
    fnv1a64(text.as_bytes())
}

/// The seed of one turn's reply.
pub fn turn_seed(seed: u64, id: &str, turn: usize) -> u64 {
    crate::util::turn_seed(seed, "regenerate", id, turn)
}

/// Regenerates the assistant turns of `ex` with `reply` (prompt ids, request) -> reply.
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
    let tok_err = |source| RegenerateError::Tokenizer { id: ex.id.clone(), source };
    let mut messages: Vec<ChatMessage> = Vec::with_capacity(ex.messages.len());
    let mut closed = Vec::new();
    let mut new_tokens = 0usize;
    let mut turn = 0usize;
    for m in &ex.messages {
        match m.role.as_str() {
            "assistant" => {
                let prompt = tok.encode_chat(&messages, true).map_err(tok_err)?;
                // A reply needs two tokens inside the window to give an anchor position.
                if prompt.len() + 2 > max_len {
                    messages.pop();
                    break;
                }
                let req = ReplyRequest {
                    max_new_tokens: settings.max_new_tokens.min(max_len - prompt.len()).max(1),
                    temperature: match settings.mode {
                        RegenerateMode::Greedy => 0.0,
                        RegenerateMode::Sample => settings.temperature,
                    },
                    top_p: settings.top_p,
                    seed: turn_seed(settings.seed, &ex.id, turn),
                };
                let r = reply(&prompt, &req).map_err(|source| RegenerateError::Generate { id: ex.id.clone(), source })?;
                new_tokens += r.token_ids.len() + usize::from(r.stopped);
                let text = tok.decode(&r.token_ids, false).map_err(tok_err)?;
                messages.push(ChatMessage::assistant(text));
                closed.push(r.stopped);
                turn += 1;
            }
            _ => messages.push(m.clone()),
        }
    }
    while messages.last().is_some_and(|m| m.role != "assistant") {
        messages.pop();
    }
    if closed.is_empty() {
        return Ok(Outcome::PromptTooLong);
    }
    Ok(Outcome::Done(RegeneratedRecord { id: ex.id.clone(), source_hash: source_hash(ex), messages, closed, new_tokens }))
}

/// The target's reply through the one decode loop (`spec::driver::generate`, no proposer: plain
/// autoregressive decoding), stopping at any of `eos_token_ids`.
pub fn reply_with_target(target: &Target, eos_token_ids: &[u32], prompt: &[u32], req: &ReplyRequest) -> Result<Reply, SpecError> {
    let cfg = GenerateConfig {
        max_new_tokens: req.max_new_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        seed: req.seed,
        eos_token_ids: eos_token_ids.to_vec(),
        accept_rule: AcceptRule::SampleMatch,
    };
    let out = generate(target, None, prompt, &cfg)?;
    let stopped = out.finish_reason == FinishReason::Eos;
    let mut token_ids = out.token_ids;
    if stopped {
        token_ids.pop();
    }
    Ok(Reply { token_ids, stopped })
}

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

/// Regenerates every example not yet in `cache` with `workers` threads sharing `reply` (each
/// call has its own KV cache), with the cache's settings and max_len, appending each finished
/// conversation to the cache as it comes. Returns one outcome per example, in example order.
/// The first error stops the workers; what finished before it stays cached.
pub fn regenerate_all<F>(
    tok: &Tokenizer,
    examples: &[ChatExample],
    cache: &mut RegenerationCache,
    workers: usize,
    progress: &mut dyn RegenerationProgress,
    reply: &F,
) -> Result<Vec<Outcome>, RegenerateError>
where
    F: Fn(&[u32], &ReplyRequest) -> Result<Reply, ReplyError> + Sync + ?Sized,
{
    // Owned copies: `cache` is appended to while the workers read these.
    let (settings, max_len) = (cache.key.settings.clone(), cache.key.max_len);
    let settings = &settings;
    let mut outcomes: Vec<Option<Outcome>> = examples.iter().map(|ex| cache.get(ex).cloned().map(Outcome::Done)).collect();
    let todo: Vec<usize> = (0..examples.len()).filter(|&i| outcomes[i].is_none()).collect();
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel::<(usize, Result<Outcome, RegenerateError>)>();
    let result = std::thread::scope(|scope| -> Result<(), RegenerateError> {
        let mut handles = Vec::new();
        let n_workers = workers.max(1).min(todo.len().max(1));
        // Several workers: each runs its kernels in its own pool of cores/workers threads, so
        // that they do not spin against each other, and the process's global pool (used by
        // whatever runs after the regeneration) keeps every core.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let per_worker = (cores / n_workers).max(1);
        for _ in 0..n_workers {
            let tx = tx.clone();
            let (todo, next, stop) = (&todo, &next, &stop);
            handles.push(scope.spawn(move || {
                let work = move || {
                    while !stop.load(Ordering::Relaxed) {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&i) = todo.get(k) else { break };
                        let r = regenerate_conversation(tok, &examples[i], settings, max_len, reply);
                        if tx.send((i, r)).is_err() {
                            break;
                        }
                    }
                };
                let pool = (n_workers > 1).then(|| rayon::ThreadPoolBuilder::new().num_threads(per_worker).build().ok()).flatten();
                match pool {
                    Some(pool) => pool.install(work),
                    None => work(),
                }
            }));
        }
        drop(tx);
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
        for h in handles {
            h.join().map_err(|_| RegenerateError::WorkerPanicked)?;
        }
        first_err.map_or(Ok(()), Err)
    });
    result?;
    outcomes.into_iter().map(|o| o.ok_or(RegenerateError::WorkerPanicked)).collect()
}
