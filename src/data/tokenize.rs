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

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::data::sharegpt::{Conversation, Role};
use crate::tokenizer::{ChatMessage, Tokenizer, TokenizerError};

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
    /// DFlash anchor (DESIGN §3), without which the sequence teaches nothing.
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

