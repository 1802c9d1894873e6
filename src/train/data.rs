//! Training sequences: chat conversations rendered with the target's template and tokenized with
//! an assistant-only loss mask, stored as safetensors shards under a manifest.
//!
//! **Loss mask.** A conversation is rendered once with the chat template (thinking off) and
//! tokenized with byte offsets. `loss_mask[t] = 1` when token t's characters overlap the content
//! of an assistant turn, and for the tokens that close that turn, up to and including its
//! end-of-turn token (the first EOS or special token after the content, e.g. `<|im_end|>`), so the
//! drafter learns where the target stops. Everything else (system and user turns, role headers,
//! Qwen3's empty think block) is 0. A turn whose reply was cut off by a token limit
//! ([`ChatExample::closed`] false) keeps its content but not its end-of-turn token: the target
//! did not stop there.
//!
//! Where an assistant turn's content lies in the rendered text is found from prefix renders, so
//! that it works for any template: `R(messages[..i])` (up to the user turn, no generation
//! prompt) must be a prefix of the full text; the generation prompt `R(messages[..i], true)`
//! past that prefix is the header the template writes before the reply (Qwen3 writes its empty
//! think block only for the last turn, so only the part the full text shares with it counts);
//! the content is found right after it, and must end before the next user turn.
//!
//! **Shards.** `DIR/{train,eval}-NNNNN.safetensors`, each holding its sequences concatenated:
//! `input_ids` U32 `(T,)`, `loss_mask` U8 `(T,)`, `offsets` I64 `(N+1,)` (sequence i is
//! `offsets[i]..offsets[i+1]`), and in the header metadata the conversation ids and the hash of
//! the settings that produced it. `DIR/manifest.json` is written last; [`Dataset::open`] checks
//! every shard against it, so a half-written or mixed directory is refused.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::tokenizer::{ChatMessage, Tokenizer, TokenizerError};
use crate::train::sharegpt::{fnv1a64, heldout_group, Conversation, Role};

/// One training sequence.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Sequence {
    pub input_ids: Vec<u32>,
    /// 1 where the token is an assistant token to learn, else 0; same length as `input_ids`.
    pub loss_mask: Vec<u8>,
}

impl Sequence {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    pub fn loss_tokens(&self) -> usize {
        self.loss_mask.iter().filter(|&&m| m == 1).count()
    }

    /// Whether some position p has `loss_mask[p] = loss_mask[p+1] = 1`: the condition for a
    /// DFlash anchor (SPEC §3), without which the sequence teaches nothing.
    pub fn has_anchor_position(&self) -> bool {
        self.loss_mask.windows(2).any(|w| w[0] == 1 && w[1] == 1)
    }
}

/// A conversation ready to tokenize: chat messages in template form, and for each assistant
/// turn (in order) whether the reply ended by itself (so its end-of-turn token is learned).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatExample {
    pub id: String,
    pub messages: Vec<ChatMessage>,
    pub closed: Vec<bool>,
}

/// Whether a system turn is a share-site banner rather than an instruction: ShareGPT V3 has 41
/// system turns such as "*This chat conversation is shared from [**TypingMind.com**](...)*".
/// Such a turn says nothing about the conversation, and rendering it would put a banner in every
/// training prompt that no evaluation prompt has, so it is dropped.
pub fn is_share_banner(text: &str) -> bool {
    let t = text.trim().trim_matches('*').trim_start();
    t.starts_with("This chat conversation is shared from") || t.starts_with("This conversation is shared from")
}

impl ChatExample {
    /// Template messages of a loaded conversation: a share-site banner system turn is dropped
    /// (see [`is_share_banner`]), and only the first `max_turns` exchanges are kept (all when None).
    /// Returns the example and whether a banner was dropped.
    pub fn from_conversation(conv: &Conversation, max_turns: Option<usize>) -> (ChatExample, bool) {
        let mut messages = Vec::with_capacity(conv.turns.len());
        let mut banner = false;
        let mut exchanges = 0usize;
        for turn in &conv.turns {
            match turn.role {
                Role::System if is_share_banner(&turn.content) => {
                    banner = true;
                    continue;
                }
                Role::User => {
                    if max_turns.is_some_and(|m| exchanges >= m) {
                        break;
                    }
                }
                Role::Assistant => exchanges += 1,
                Role::System => {}
            }
            messages.push(ChatMessage::new(turn.role.as_str(), turn.content.clone()));
        }
        let closed = vec![true; messages.iter().filter(|m| m.role == "assistant").count()];
        (ChatExample { id: conv.id.clone(), messages, closed }, banner)
    }
}

/// Why one conversation yields no sequence. [`SequenceError::reason`] is its key in the
/// manifest's `skipped` counts.
#[derive(Debug, thiserror::Error)]
pub enum SequenceError {
    #[error("conversation {id}: the chat template failed: {source}")]
    Template {
        id: String,
        #[source]
        source: TokenizerError,
    },
    #[error("conversation {id}: rendering the turns before message {message} is not a prefix of the whole conversation; this template rewrites earlier turns, which the loss mask cannot follow")]
    NotPrefixStable { id: String, message: usize },
    #[error("conversation {id}: the content of assistant message {message} does not appear where the template should have written it")]
    ContentNotFound { id: String, message: usize },
    #[error("conversation {id}: no two consecutive loss tokens within {max_len} tokens (the prompt fills the window); no anchor can be drawn")]
    NoAnchorPosition { id: String, max_len: usize },
    #[error("conversation {id}: {closed} closed flags for {assistant} assistant turns")]
    ClosedFlags { id: String, closed: usize, assistant: usize },
}

impl SequenceError {
    pub fn reason(&self) -> &'static str {
        match self {
            SequenceError::Template { .. } => "template_error",
            SequenceError::NotPrefixStable { .. } => "template_not_prefix_stable",
            SequenceError::ContentNotFound { .. } => "assistant_content_not_found",
            SequenceError::NoAnchorPosition { .. } => "no_anchor_position",
            SequenceError::ClosedFlags { .. } => "bad_closed_flags",
        }
    }
}

/// Byte ranges of each assistant turn's content in `full` (the render of all of `messages`
/// without a generation prompt), in turn order.
fn assistant_spans(tok: &Tokenizer, ex: &ChatExample, full: &str) -> Result<Vec<Range<usize>>, SequenceError> {
    let id = &ex.id;
    let render = |msgs: &[ChatMessage], gen: bool| {
        tok.apply_chat_template(msgs, gen).map_err(|source| SequenceError::Template { id: id.clone(), source })
    };
    let assistant_at: Vec<usize> =
        ex.messages.iter().enumerate().filter(|(_, m)| m.role == "assistant").map(|(i, _)| i).collect();
    let mut spans = Vec::with_capacity(assistant_at.len());
    let mut floor = 0usize;
    for (k, &i) in assistant_at.iter().enumerate() {
        let prefix = render(&ex.messages[..i], false)?;
        let gen = render(&ex.messages[..i], true)?;
        if !full.starts_with(&prefix) || !gen.starts_with(&prefix) {
            return Err(SequenceError::NotPrefixStable { id: id.clone(), message: i });
        }
        let start = prefix.len();
        // The reply ends before the next user turn, whose prefix must also be a prefix of `full`.
        let end_bound = match assistant_at.get(k + 1) {
            Some(&next) => {
                let next_prefix = render(&ex.messages[..next], false)?;
                if !full.starts_with(&next_prefix) {
                    return Err(SequenceError::NotPrefixStable { id: id.clone(), message: next });
                }
                next_prefix.len()
            }
            None => full.len(),
        };
        let header = &gen[start..];
        let rest = &full[start..end_bound];
        let shared = common_prefix_len(rest, header);
        let content = &ex.messages[i].content;
        let found = [content.as_str(), content.trim_start_matches('\n'), content.trim()]
            .into_iter()
            .find_map(|c| locate(rest, c, shared).map(|p| (p, c.len())));
        let Some((pos, len)) = found else {
            return Err(SequenceError::ContentNotFound { id: id.clone(), message: i });
        };
        let span = start + pos..start + pos + len;
        if span.start < floor {
            return Err(SequenceError::ContentNotFound { id: id.clone(), message: i });
        }
        floor = span.end;
        spans.push(span);
    }
    Ok(spans)
}

/// Where `content` starts in `rest`, given that the first `shared` bytes of `rest` equal the
/// template's reply header: right after the header if it is there, else its first occurrence
/// after the last line break of the shared part (the header may share a first character with
/// the content, e.g. `<`).
fn locate(rest: &str, content: &str, shared: usize) -> Option<usize> {
    if rest[shared..].starts_with(content) {
        return Some(shared);
    }
    let back = rest[..shared].rfind('\n').map(|p| p + 1).unwrap_or(0);
    rest[back..].find(content).map(|p| back + p)
}

fn common_prefix_len(a: &str, b: &str) -> usize {
    let mut n = 0;
    for (x, y) in a.chars().zip(b.chars()) {
        if x != y {
            break;
        }
        n += x.len_utf8();
    }
    n
}

/// How many tokens after an assistant turn's content may precede its end-of-turn token (e.g. a
/// template writing `content + "\n" + "<|end|>"`).
const MAX_CLOSING_TOKENS: usize = 4;

/// Renders `ex` with the chat template (thinking off), tokenizes it with offsets, builds the
/// assistant-only loss mask and keeps the first `max_len` tokens. See the module docs.
pub fn tokenize_chat(tok: &Tokenizer, ex: &ChatExample, max_len: usize) -> Result<Sequence, SequenceError> {
    let id = &ex.id;
    let assistant = ex.messages.iter().filter(|m| m.role == "assistant").count();
    if ex.closed.len() != assistant {
        return Err(SequenceError::ClosedFlags { id: id.clone(), closed: ex.closed.len(), assistant });
    }
    let messages = within_budget(tok, ex, max_len)?;
    let ex = ChatExample { id: id.clone(), closed: ex.closed[..count_assistant(&messages)].to_vec(), messages };
    let full = tok
        .apply_chat_template(&ex.messages, false)
        .map_err(|source| SequenceError::Template { id: id.clone(), source })?;
    let spans = assistant_spans(tok, &ex, &full)?;
    let enc = tok
        .inner()
        .encode(full.as_str(), false)
        .map_err(|e| SequenceError::Template { id: id.clone(), source: TokenizerError::Encode { message: e.to_string() } })?;
    let ids = enc.get_ids();
    let offsets = enc.get_offsets();
    let special: std::collections::HashSet<u32> = tok
        .inner()
        .get_added_tokens_decoder()
        .iter()
        .filter(|(_, t)| t.special)
        .map(|(&i, _)| i)
        .chain(tok.eos_token_ids().iter().copied())
        .collect();
    let mut mask = vec![0u8; ids.len()];
    let mut t = 0usize;
    for (span, &closed) in spans.iter().zip(&ex.closed) {
        // 1. tokens overlapping the content
        while t < ids.len() && offsets[t].1 <= span.start {
            t += 1;
        }
        while t < ids.len() && offsets[t].0 < span.end {
            mask[t] = 1;
            t += 1;
        }
        // 2. the closing tokens, through the end-of-turn token
        if closed {
            let close = (t..ids.len().min(t + MAX_CLOSING_TOKENS)).find(|&j| special.contains(&ids[j]));
            let last = close.unwrap_or(t);
            for m in mask.iter_mut().take((last + 1).min(ids.len())).skip(t) {
                *m = 1;
            }
            t = (last + 1).min(ids.len());
        }
    }
    let keep = ids.len().min(max_len);
    let seq = Sequence { input_ids: ids[..keep].to_vec(), loss_mask: mask[..keep].to_vec() };
    if !seq.has_anchor_position() {
        return Err(SequenceError::NoAnchorPosition { id: id.clone(), max_len });
    }
    Ok(seq)
}

fn count_assistant(messages: &[ChatMessage]) -> usize {
    messages.iter().filter(|m| m.role == "assistant").count()
}

/// Drops the turns that start past `max_len` tokens (they would be cut away anyway), so that a
/// conversation of thousands of tokens is not rendered and tokenized for its first 512.
/// A token covers at least one byte, so a prefix shorter than `max_len` bytes needs no encode.
fn within_budget(tok: &Tokenizer, ex: &ChatExample, max_len: usize) -> Result<Vec<ChatMessage>, SequenceError> {
    for (i, m) in ex.messages.iter().enumerate() {
        if m.role != "assistant" || i == 0 {
            continue;
        }
        let prefix = tok
            .apply_chat_template(&ex.messages[..i], true)
            .map_err(|source| SequenceError::Template { id: ex.id.clone(), source })?;
        if prefix.len() < max_len {
            continue;
        }
        let n = tok.encode(&prefix, false).map_err(|source| SequenceError::Template { id: ex.id.clone(), source })?.len();
        if n >= max_len {
            // Keep this turn when it is the first: its prompt alone fills the window, which
            // `tokenize_chat` reports as having no anchor position.
            let keep = if count_assistant(&ex.messages[..i]) == 0 { i + 1 } else { i };
            return Ok(ex.messages[..keep].to_vec());
        }
    }
    Ok(ex.messages.clone())
}

// ---------------------------------------------------------------------------------------------
// Splits

/// Which part of a prepared dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Eval,
}

impl Split {
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Eval => "eval",
        }
    }
}

/// Whether a conversation goes to the evaluation split: FNV-1a of `specauf-eval:` + its hold-out
/// group key (chunks of one ShareGPT conversation stay together), modulo one million, below
/// `fraction`·10⁶. Independent of the benchmark hold-out hash ([`crate::train::sharegpt::is_heldout`]).
pub fn is_eval(id: &str, fraction: f64) -> bool {
    let key = format!("specauf-eval:{}", heldout_group(id));
    let threshold = (fraction.clamp(0.0, 1.0) * 1_000_000.0).round() as u64;
    fnv1a64(key.as_bytes()) % 1_000_000 < threshold
}

// ---------------------------------------------------------------------------------------------
// Errors of the on-disk format

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no manifest.json: this is not a prepared dataset, or `specauf prepare` did not finish; run it (again) with --out {path}")]
    NoManifest { path: PathBuf },
    #[error("{path}: {what}")]
    BadManifest { path: PathBuf, what: String },
    #[error("{path}: {what}; the directory no longer matches its manifest (files from another run?): run `specauf prepare` again into a fresh --out")]
    Stale { path: PathBuf, what: String },
    #[error("{path}: not a readable shard: {what}")]
    BadShard { path: PathBuf, what: String },
    #[error("{path}: the dataset was prepared for {what}; prepare it again for this model or pass the model it was made with")]
    ModelMismatch { path: PathBuf, what: String },
    #[error("sequence {index} does not exist: the {split} split has {len}")]
    IndexOutOfRange { index: usize, len: usize, split: &'static str },
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io { path: path.to_path_buf(), source }
}

/// Writes `bytes` to `<path>.tmp` in the same directory, fsyncs and renames it over `path`.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    crate::fsutil::write_atomic(path, bytes).map_err(io_err(path))
}

pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Makes a rename durable; best effort (some file systems refuse to open a directory).
fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Streaming safetensors writer / reader

/// Element types the shards use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardDtype {
    U8,
    U32,
    I64,
    F16,
    BF16,
}

impl ShardDtype {
    pub fn size(self) -> usize {
        match self {
            ShardDtype::U8 => 1,
            ShardDtype::F16 | ShardDtype::BF16 => 2,
            ShardDtype::U32 => 4,
            ShardDtype::I64 => 8,
        }
    }

    fn name(self) -> &'static str {
        match self {
            ShardDtype::U8 => "U8",
            ShardDtype::U32 => "U32",
            ShardDtype::I64 => "I64",
            ShardDtype::F16 => "F16",
            ShardDtype::BF16 => "BF16",
        }
    }

    fn of(d: safetensors::Dtype) -> Option<Self> {
        match d {
            safetensors::Dtype::U8 => Some(ShardDtype::U8),
            safetensors::Dtype::U32 => Some(ShardDtype::U32),
            safetensors::Dtype::I64 => Some(ShardDtype::I64),
            safetensors::Dtype::F16 => Some(ShardDtype::F16),
            safetensors::Dtype::BF16 => Some(ShardDtype::BF16),
            _ => None,
        }
    }
}

/// A safetensors file written front to back: every tensor's dtype and shape is declared first,
/// so the header can be written before the data, and a multi-gigabyte feature shard never has
/// to sit in memory. Data goes to `<name>.tmp`; [`ShardWriter::finish`] checks that exactly the
/// declared bytes came, fsyncs and renames.
pub(crate) struct ShardWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<File>,
    expected: u64,
    written: u64,
}

impl ShardWriter {
    /// `tensors`: (name, dtype, shape), in the order their bytes will be written.
    pub(crate) fn create(
        path: &Path,
        tensors: &[(&str, ShardDtype, Vec<usize>)],
        metadata: &BTreeMap<String, String>,
    ) -> Result<Self, DataError> {
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::to_value(metadata).unwrap_or_default());
        let mut offset = 0u64;
        for (name, dtype, shape) in tensors {
            let bytes = shape.iter().product::<usize>() as u64 * dtype.size() as u64;
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": dtype.name(), "shape": shape, "data_offsets": [offset, offset + bytes]}),
            );
            offset += bytes;
        }
        let mut text = serde_json::Value::Object(header).to_string().into_bytes();
        // Pad to 8 bytes with spaces, as the reference writer does, so the data is aligned.
        while !text.len().is_multiple_of(8) {
            text.push(b' ');
        }
        let tmp = tmp_path(path);
        let f = File::create(&tmp).map_err(io_err(&tmp))?;
        let mut out = BufWriter::with_capacity(1 << 20, f);
        out.write_all(&(text.len() as u64).to_le_bytes()).map_err(io_err(&tmp))?;
        out.write_all(&text).map_err(io_err(&tmp))?;
        Ok(ShardWriter { path: path.to_path_buf(), tmp, out, expected: offset, written: 0 })
    }

    pub(crate) fn write(&mut self, bytes: &[u8]) -> Result<(), DataError> {
        self.written += bytes.len() as u64;
        self.out.write_all(bytes).map_err(io_err(&self.tmp))
    }

    pub(crate) fn finish(self) -> Result<u64, DataError> {
        let ShardWriter { path, tmp, out, expected, written } = self;
        if written != expected {
            return Err(DataError::BadShard {
                path: tmp,
                what: format!("{written} data bytes written, {expected} declared"),
            });
        }
        let f = out.into_inner().map_err(|e| DataError::Io { path: tmp.clone(), source: e.into_error() })?;
        f.sync_all().map_err(io_err(&tmp))?;
        let len = f.metadata().map_err(io_err(&tmp))?.len();
        drop(f);
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        sync_dir(&path);
        Ok(len)
    }
}

/// A memory-mapped shard.
pub(crate) struct Shard {
    pub(crate) path: PathBuf,
    mmap: memmap2::Mmap,
    data_start: usize,
    tensors: BTreeMap<String, (ShardDtype, Vec<usize>, Range<usize>)>,
    pub(crate) metadata: BTreeMap<String, String>,
}

impl Shard {
    pub(crate) fn open(path: &Path) -> Result<Self, DataError> {
        let f = File::open(path).map_err(io_err(path))?;
        // SAFETY: the shard is opened read-only; a concurrent writer replaces files by rename,
        // which leaves this mapping on the old inode.
        let mmap = unsafe { memmap2::Mmap::map(&f) }.map_err(io_err(path))?;
        let bad = |what: String| DataError::BadShard { path: path.to_path_buf(), what };
        let (n, meta) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| bad(e.to_string()))?;
        let mut tensors = BTreeMap::new();
        for (name, info) in meta.tensors() {
            let dtype = ShardDtype::of(info.dtype).ok_or_else(|| bad(format!("tensor {name} has type {:?}", info.dtype)))?;
            tensors.insert(name, (dtype, info.shape.clone(), info.data_offsets.0..info.data_offsets.1));
        }
        let metadata = meta.metadata().clone().unwrap_or_default().into_iter().collect();
        Ok(Shard { path: path.to_path_buf(), mmap, data_start: 8 + n, tensors, metadata })
    }

    /// Raw little-endian bytes of tensor `name`, with its dtype and shape.
    pub(crate) fn raw(&self, name: &str) -> Result<(ShardDtype, &[usize], &[u8]), DataError> {
        let (dtype, shape, range) = self.tensors.get(name).ok_or_else(|| DataError::BadShard {
            path: self.path.clone(),
            what: format!("no tensor `{name}`"),
        })?;
        Ok((*dtype, shape, &self.mmap[self.data_start + range.start..self.data_start + range.end]))
    }

    pub(crate) fn expect(&self, name: &str, dtype: ShardDtype, rank: usize) -> Result<(&[usize], &[u8]), DataError> {
        let (d, shape, bytes) = self.raw(name)?;
        if d != dtype || shape.len() != rank {
            return Err(DataError::BadShard {
                path: self.path.clone(),
                what: format!("tensor `{name}` is {d:?} {shape:?}, expected {dtype:?} of rank {rank}"),
            });
        }
        Ok((shape, bytes))
    }

    /// `offsets` as usize, checked to start at 0, never decrease and end at `total`.
    pub(crate) fn offsets(&self, total: usize) -> Result<Vec<usize>, DataError> {
        let (_, bytes) = self.expect("offsets", ShardDtype::I64, 1)?;
        let offs: Vec<i64> = bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect();
        let ok = offs.first() == Some(&0)
            && offs.windows(2).all(|w| w[0] <= w[1])
            && offs.last().is_some_and(|&l| l as usize == total);
        if !ok {
            return Err(DataError::BadShard {
                path: self.path.clone(),
                what: format!("`offsets` must rise from 0 to {total}"),
            });
        }
        Ok(offs.into_iter().map(|o| o as usize).collect())
    }
}

pub(crate) fn offsets_bytes(offsets: &[usize]) -> Vec<u8> {
    offsets.iter().flat_map(|&o| (o as i64).to_le_bytes()).collect()
}

/// Writes one token shard of `seqs`.
pub(crate) fn write_token_shard(
    path: &Path,
    split: Split,
    seqs: &[(&str, &Sequence)],
    settings_hash: &str,
) -> Result<ShardInfo, DataError> {
    let total: usize = seqs.iter().map(|(_, s)| s.len()).sum();
    let mut offsets = Vec::with_capacity(seqs.len() + 1);
    offsets.push(0usize);
    for (_, s) in seqs {
        offsets.push(offsets.last().copied().unwrap_or(0) + s.len());
    }
    let ids: Vec<&str> = seqs.iter().map(|(id, _)| *id).collect();
    let mut metadata = BTreeMap::new();
    metadata.insert("format".to_string(), TOKEN_SHARD_FORMAT.to_string());
    metadata.insert("split".to_string(), split.as_str().to_string());
    metadata.insert("settings_hash".to_string(), settings_hash.to_string());
    metadata.insert("conversation_ids".to_string(), serde_json::to_string(&ids).unwrap_or_default());
    let mut w = ShardWriter::create(
        path,
        &[
            ("input_ids", ShardDtype::U32, vec![total]),
            ("loss_mask", ShardDtype::U8, vec![total]),
            ("offsets", ShardDtype::I64, vec![seqs.len() + 1]),
        ],
        &metadata,
    )?;
    let id_bytes: Vec<u8> = seqs.iter().flat_map(|(_, s)| s.input_ids.iter().flat_map(|t| t.to_le_bytes())).collect();
    w.write(&id_bytes)?;
    let mask: Vec<u8> = seqs.iter().flat_map(|(_, s)| s.loss_mask.iter().copied()).collect();
    w.write(&mask)?;
    w.write(&offsets_bytes(&offsets))?;
    let bytes = w.finish()?;
    Ok(ShardInfo {
        file: path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        sequences: seqs.len(),
        tokens: total,
        bytes,
    })
}

pub(crate) const TOKEN_SHARD_FORMAT: &str = "specauf-tokens-v1";

// ---------------------------------------------------------------------------------------------
// Manifest

pub const MANIFEST_FILE: &str = "manifest.json";
pub const MANIFEST_VERSION: u32 = 1;

/// What a prepared dataset was made from and with: written last into the output directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub created_by: String,
    pub model: ModelIdentity,
    pub tokenizer: TokenizerInfo,
    pub settings: PrepareSettings,
    /// SHA-256 (hex) of the canonical JSON of `{model, tokenizer, settings}`: the same data made
    /// the same way has the same hash; the trainer compares it to detect a stale dataset.
    pub settings_hash: String,
    pub source: SourceReport,
    /// Selected conversations that yielded no sequence, by reason ([`SequenceError::reason`],
    /// `prompt_exceeds_max_len` from regeneration). Malformed records of the file are counted in
    /// `source.skipped_records`.
    pub skipped: BTreeMap<String, usize>,
    pub splits: BTreeMap<Split, SplitInfo>,
    pub features: Option<FeatureInfo>,
}

/// The model a dataset belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelIdentity {
    /// `smollm2` or the checkpoint's file/directory name.
    pub name: String,
    pub location: String,
    /// See [`crate::model::load::fingerprint`].
    pub fingerprint: String,
    pub family: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizerInfo {
    pub vocab_size: usize,
    pub eos_token_ids: Vec<u32>,
}

/// Everything that decides the content of a prepared dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrepareSettings {
    /// `sharegpt` or the data file's path.
    pub data: String,
    pub max_conversations: Option<usize>,
    pub max_len: usize,
    /// Exchanges kept per conversation (None: all).
    pub max_turns: Option<usize>,
    pub eval_fraction: f64,
    pub seed: u64,
    pub regenerate: Option<crate::train::regenerate::RegenerateSettings>,
    pub features: Option<FeatureSettings>,
}

/// Which target taps the feature cache stores.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureSettings {
    pub target_layer_ids: Vec<usize>,
    pub dtype: FeatureDtype,
    /// The weights the target ran with (features from Q8 and f32 weights differ slightly).
    pub weights: crate::model::WeightsMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FeatureDtype {
    F16,
    Bf16,
}

impl FeatureDtype {
    pub(crate) fn shard_dtype(self) -> ShardDtype {
        match self {
            FeatureDtype::F16 => ShardDtype::F16,
            FeatureDtype::Bf16 => ShardDtype::BF16,
        }
    }
}

/// Where the conversations came from and what the loader and selection dropped.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SourceReport {
    pub path: String,
    /// Usable conversations in the file.
    pub loaded: usize,
    /// Records of the whole file the loader skipped, by reason (`sharegpt::SkipReason`).
    pub skipped_records: BTreeMap<String, usize>,
    pub truncated_tail: bool,
    /// Conversations of the benchmark hold-out (`sharegpt::is_heldout`), never used.
    pub heldout_excluded: usize,
    pub selected: usize,
    pub share_banners_dropped: usize,
    pub regenerated_new_tokens: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SplitInfo {
    pub sequences: usize,
    pub tokens: usize,
    pub loss_tokens: usize,
    pub shards: Vec<ShardInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    pub file: String,
    pub sequences: usize,
    pub tokens: usize,
    pub bytes: u64,
}

/// The feature cache: shard `k` of a split holds the features of the sequences of token shard `k`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureInfo {
    pub target_layer_ids: Vec<usize>,
    pub dtype: FeatureDtype,
    pub weights: crate::model::WeightsMode,
    /// n_layers · hidden_size.
    pub dim: usize,
    pub shards: BTreeMap<Split, Vec<ShardInfo>>,
}

impl ModelIdentity {
    pub fn of(model: &crate::model::load::LoadedModel) -> Result<Self, crate::model::ModelError> {
        Self::from_parts(&model.name, &model.location, model.target.config())
    }

    pub fn from_parts(
        name: &str,
        location: &crate::model::ModelLocation,
        cfg: &crate::model::TargetConfig,
    ) -> Result<Self, crate::model::ModelError> {
        Ok(ModelIdentity {
            name: name.to_string(),
            location: location.path().display().to_string(),
            fingerprint: crate::model::load::fingerprint(location)?,
            family: format!("{:?}", cfg.family).to_lowercase(),
            vocab_size: cfg.vocab_size,
            hidden_size: cfg.hidden_size,
            num_hidden_layers: cfg.num_hidden_layers,
        })
    }
}

impl TokenizerInfo {
    pub fn of(tok: &Tokenizer) -> Self {
        TokenizerInfo { vocab_size: tok.vocab_size(), eos_token_ids: tok.eos_token_ids().to_vec() }
    }
}

/// SHA-256 (hex) of the canonical JSON of what decides a dataset's content.
pub fn settings_hash(model: &ModelIdentity, tokenizer: &TokenizerInfo, settings: &PrepareSettings) -> String {
    // The location is left out: the same checkpoint moved elsewhere makes the same data.
    let mut model = serde_json::to_value(model).unwrap_or_default();
    if let Some(m) = model.as_object_mut() {
        m.remove("location");
    }
    let value = serde_json::json!({"model": model, "tokenizer": tokenizer, "settings": settings});
    // serde_json's maps are sorted (no preserve_order feature here), so this text is canonical.
    let digest = Sha256::digest(value.to_string().as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

impl Manifest {
    pub fn read(dir: &Path) -> Result<Manifest, DataError> {
        let path = dir.join(MANIFEST_FILE);
        if !path.is_file() {
            return Err(DataError::NoManifest { path: dir.to_path_buf() });
        }
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        let m: Manifest =
            serde_json::from_str(&text).map_err(|e| DataError::BadManifest { path: path.clone(), what: e.to_string() })?;
        if m.format != MANIFEST_FORMAT || m.version != MANIFEST_VERSION {
            return Err(DataError::BadManifest {
                path,
                what: format!(
                    "format {} v{}; this build reads {MANIFEST_FORMAT} v{MANIFEST_VERSION}: prepare the data again",
                    m.format, m.version
                ),
            });
        }
        let computed = settings_hash(&m.model, &m.tokenizer, &m.settings);
        if computed != m.settings_hash {
            return Err(DataError::Stale {
                path,
                what: format!("settings_hash {} does not match its settings ({computed})", m.settings_hash),
            });
        }
        Ok(m)
    }

    pub fn write(&self, dir: &Path) -> Result<(), DataError> {
        let text = serde_json::to_string_pretty(self).map_err(|e| DataError::BadManifest {
            path: dir.join(MANIFEST_FILE),
            what: e.to_string(),
        })?;
        write_atomic(&dir.join(MANIFEST_FILE), text.as_bytes())
    }

    /// Checks that the dataset was prepared for `model` (same weights and shapes).
    pub fn check_model(&self, dir: &Path, model: &ModelIdentity) -> Result<(), DataError> {
        let m = &self.model;
        let mut diffs = Vec::new();
        if m.fingerprint != model.fingerprint {
            diffs.push(format!("weights fingerprint {} (given {})", m.fingerprint, model.fingerprint));
        }
        if (m.vocab_size, m.hidden_size, m.num_hidden_layers) != (model.vocab_size, model.hidden_size, model.num_hidden_layers) {
            diffs.push(format!(
                "vocab {} / hidden {} / {} layers (given {} / {} / {})",
                m.vocab_size, m.hidden_size, m.num_hidden_layers, model.vocab_size, model.hidden_size, model.num_hidden_layers
            ));
        }
        if diffs.is_empty() {
            Ok(())
        } else {
            Err(DataError::ModelMismatch {
                path: dir.to_path_buf(),
                what: format!("model `{}` with {}", m.name, diffs.join(", ")),
            })
        }
    }
}

pub const MANIFEST_FORMAT: &str = "specauf-dataset";

// ---------------------------------------------------------------------------------------------
// Reading a split

/// One split of a prepared dataset, in memory (token ids and masks are small: 5 bytes a token).
#[derive(Debug)]
pub struct Dataset {
    manifest: Manifest,
    split: Split,
    input_ids: Vec<u32>,
    loss_mask: Vec<u8>,
    /// Global offsets, len() + 1 entries.
    offsets: Vec<usize>,
    conversation_ids: Vec<String>,
}

impl Dataset {
    /// Opens `split` of the dataset in `dir`, checking every shard against the manifest (file
    /// sizes, counts, settings hash).
    pub fn open(dir: &Path, split: Split) -> Result<Dataset, DataError> {
        let manifest = Manifest::read(dir)?;
        let info = manifest.splits.get(&split).cloned().unwrap_or_default();
        let mut input_ids = Vec::with_capacity(info.tokens);
        let mut loss_mask = Vec::with_capacity(info.tokens);
        let mut offsets = vec![0usize];
        let mut conversation_ids = Vec::with_capacity(info.sequences);
        for s in &info.shards {
            let path = dir.join(&s.file);
            let shard = open_checked(&path, s, &manifest.settings_hash)?;
            let (shape, ids) = shard.expect("input_ids", ShardDtype::U32, 1)?;
            let n = shape[0];
            let (mshape, mask) = shard.expect("loss_mask", ShardDtype::U8, 1)?;
            if n != s.tokens || mshape[0] != n {
                return Err(DataError::Stale { path, what: format!("{n} tokens, manifest says {}", s.tokens) });
            }
            let offs = shard.offsets(n)?;
            if offs.len() != s.sequences + 1 {
                return Err(DataError::Stale {
                    path,
                    what: format!("{} sequences, manifest says {}", offs.len() - 1, s.sequences),
                });
            }
            let base = input_ids.len();
            input_ids.extend(ids.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])));
            loss_mask.extend_from_slice(mask);
            offsets.extend(offs[1..].iter().map(|o| base + o));
            let ids: Vec<String> = shard
                .metadata
                .get("conversation_ids")
                .and_then(|t| serde_json::from_str(t).ok())
                .unwrap_or_default();
            if ids.len() != s.sequences {
                return Err(DataError::BadShard { path, what: "conversation_ids does not list every sequence".into() });
            }
            conversation_ids.extend(ids);
        }
        if offsets.len() != info.sequences + 1 || input_ids.len() != info.tokens {
            return Err(DataError::Stale {
                path: dir.join(MANIFEST_FILE),
                what: format!(
                    "the {} shards hold {} sequences / {} tokens, the manifest says {} / {}",
                    split.as_str(),
                    offsets.len() - 1,
                    input_ids.len(),
                    info.sequences,
                    info.tokens
                ),
            });
        }
        Ok(Dataset { manifest, split, input_ids, loss_mask, offsets, conversation_ids })
    }

    pub fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn split(&self) -> Split {
        self.split
    }

    /// Sequence `i` (a copy; [`Dataset::input_ids`] and [`Dataset::loss_mask`] are views).
    ///
    /// Panics if `i >= len()`, like slice indexing; [`Dataset::try_get`] does not.
    pub fn get(&self, i: usize) -> Sequence {
        let r = self.offsets[i]..self.offsets[i + 1];
        Sequence { input_ids: self.input_ids[r.clone()].to_vec(), loss_mask: self.loss_mask[r].to_vec() }
    }

    /// Sequence `i`, or [`DataError::IndexOutOfRange`].
    pub fn try_get(&self, i: usize) -> Result<Sequence, DataError> {
        self.range(i)?;
        Ok(self.get(i))
    }

    pub fn input_ids(&self, i: usize) -> Result<&[u32], DataError> {
        let r = self.range(i)?;
        Ok(&self.input_ids[r])
    }

    pub fn loss_mask(&self, i: usize) -> Result<&[u8], DataError> {
        let r = self.range(i)?;
        Ok(&self.loss_mask[r])
    }

    pub fn conversation_id(&self, i: usize) -> Result<&str, DataError> {
        self.range(i)?;
        Ok(&self.conversation_ids[i])
    }

    fn range(&self, i: usize) -> Result<Range<usize>, DataError> {
        if i >= self.len() {
            return Err(DataError::IndexOutOfRange { index: i, len: self.len(), split: self.split.as_str() });
        }
        Ok(self.offsets[i]..self.offsets[i + 1])
    }

    pub fn total_tokens(&self) -> usize {
        self.input_ids.len()
    }

    pub fn loss_tokens(&self) -> usize {
        self.loss_mask.iter().filter(|&&m| m == 1).count()
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
}

/// Opens a shard and checks its size and settings hash against the manifest's entry.
pub(crate) fn open_checked(path: &Path, info: &ShardInfo, settings_hash: &str) -> Result<Shard, DataError> {
    let len = std::fs::metadata(path).map_err(io_err(path))?.len();
    if len != info.bytes {
        return Err(DataError::Stale { path: path.to_path_buf(), what: format!("{len} bytes, manifest says {}", info.bytes) });
    }
    let shard = Shard::open(path)?;
    let hash = shard.metadata.get("settings_hash").map(String::as_str).unwrap_or("");
    if hash != settings_hash {
        return Err(DataError::Stale {
            path: path.to_path_buf(),
            what: format!("written with settings {hash}, manifest has {settings_hash}"),
        });
    }
    Ok(shard)
}
