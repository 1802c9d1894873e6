//! A byte-level BPE tokenizer rebuilt from GGUF metadata, equal to the model's HF tokenizer.json.
//!
//! llama.cpp's converter stores the full vocab (`tokenizer.ggml.tokens`, added tokens included at
//! their ids), the merges as `"left right"` strings, a type per token and the name of the
//! pre-tokenizer (`tokenizer.ggml.pre`), which stands for the HF pre-tokenizer pipeline:
//! - `smollm`: Digits(individual) then ByteLevel with GPT-2's regex;
//! - `qwen2`: NFC, then a Split on Qwen's regex (digits one by one, letters with one leading
//!   non-letter, ...), then ByteLevel without its own regex.

use std::collections::{BTreeMap, HashMap};

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use super::chat::ChatTemplate;
use super::{Result, Tokenizer, TokenizerError};

/// The pre-tokenizer regex of Qwen2/2.5/3 tokenizer.json (and llama.cpp's `qwen2` pre-type).
pub(crate) const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

fn key_err(key: &str, reason: impl Into<String>) -> TokenizerError {
    TokenizerError::GgufKey {
        key: key.to_string(),
        reason: reason.into(),
    }
}

fn build_err(what: &str, e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Build {
        what: what.to_string(),
        message: e.to_string(),
    }
}

fn get<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<&'a Value> {
    md.get(key).ok_or_else(|| {
        key_err(
            key,
            "missing; this GGUF carries no tokenizer, use a HF folder with tokenizer.json",
        )
    })
}

fn as_int(v: &Value) -> Option<i64> {
    match *v {
        Value::U8(x) => Some(x.into()),
        Value::I8(x) => Some(x.into()),
        Value::U16(x) => Some(x.into()),
        Value::I16(x) => Some(x.into()),
        Value::U32(x) => Some(x.into()),
        Value::I32(x) => Some(x.into()),
        Value::U64(x) => i64::try_from(x).ok(),
        Value::I64(x) => Some(x),
        _ => None,
    }
}

fn string_array<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<Vec<&'a str>> {
    match get(md, key)? {
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.as_str()),
                other => Err(key_err(
                    key,
                    format!("item {i} is {:?}, expected a string", other.value_type()),
                )),
            })
            .collect(),
        other => Err(key_err(
            key,
            format!("is {:?}, expected an array of strings", other.value_type()),
        )),
    }
}

/// A token id key, absent -> None; present -> checked against the vocab size.
fn token_id(md: &HashMap<String, Value>, key: &str, n_vocab: usize) -> Result<Option<u32>> {
    match md.get(key) {
        None => Ok(None),
        Some(v) => {
            let id = as_int(v).ok_or_else(|| {
                key_err(key, format!("is {:?}, expected an integer", v.value_type()))
            })?;
            if id < 0 {
                // llama.cpp writes -1 (as i32/u32 max) for "none".
                return Ok(None);
            }
            match u32::try_from(id) {
                Ok(id) if (id as usize) < n_vocab => Ok(Some(id)),
                _ if id == i64::from(u32::MAX) => Ok(None),
                _ => Err(key_err(
                    key,
                    format!("id {id} is outside the vocabulary of {n_vocab} tokens"),
                )),
            }
        }
    }
}

/// A GGUF's `tokenizer.*` metadata → a [`Tokenizer`]. Every key is checked before the BPE model
/// is built, so a malformed file fails on its first bad key.
pub(super) fn from_gguf(content: &Content) -> Result<Tokenizer> {
    let md = &content.metadata;
    // 0. The keys: model kind, vocab (ids = positions), merges, a type per token, pre-type name.
    check_model(md)?;
    let tokens = string_array(md, "tokenizer.ggml.tokens")?;
    let merges_raw = string_array(md, "tokenizer.ggml.merges")?;
    let token_types = token_types(md, tokens.len())?;
    let pre = pre_name(md)?;

    // 1. BPE model over the full vocab; ids are positions in `tokenizer.ggml.tokens`.
    let mut inner = tokenizers::Tokenizer::new(bpe_model(&tokens, &merges_raw)?);

    // 2. Normalizer and pre-tokenizer named by `tokenizer.ggml.pre`.
    set_pre_tokenizer(&mut inner, &pre)?;
    inner.with_decoder(Some(ByteLevelDecoder::default()));

    // 3. Control tokens are special (skipped by decode(skip_special)); user-defined ones are added
    //    tokens that still decode. Neither is normalized, so they match raw text exactly.
    add_typed_tokens(&mut inner, &tokens, &token_types);

    // 4. Special ids and the strings the chat template sees.
    let ids = SpecialIds::read(md, &tokens)?;
    let chat_template = chat_template(md)?;
    Ok(Tokenizer {
        inner,
        special_tokens: ids.special_tokens,
        bos_token_id: ids.bos_token_id,
        add_bos_token_id: ids.add_bos_token_id,
        eos_token_ids: ids.eos_token_ids,
        chat_template,
    })
}

/// Only llama.cpp's `gpt2` (byte-level BPE) tokenizer model is rebuilt.
fn check_model(md: &HashMap<String, Value>) -> Result<()> {
    match get(md, "tokenizer.ggml.model")? {
        Value::String(m) if m == "gpt2" => Ok(()),
        Value::String(m) => Err(TokenizerError::UnsupportedModel { model: m.clone() }),
        other => Err(key_err(
            "tokenizer.ggml.model",
            format!("is {:?}, expected a string", other.value_type()),
        )),
    }
}

/// One llama.cpp token type per token; absent → every token normal (1).
fn token_types(md: &HashMap<String, Value>, n_tokens: usize) -> Result<Vec<i64>> {
    let token_types: Vec<i64> = match md.get("tokenizer.ggml.token_type") {
        None => vec![1; n_tokens],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                as_int(v).ok_or_else(|| key_err("tokenizer.ggml.token_type", "holds a non-integer"))
            })
            .collect::<Result<_>>()?,
        Some(other) => {
            return Err(key_err(
                "tokenizer.ggml.token_type",
                format!("is {:?}, expected an array", other.value_type()),
            ))
        }
    };
    if token_types.len() != n_tokens {
        return Err(key_err(
            "tokenizer.ggml.token_type",
            format!(
                "has {} entries for {} tokens",
                token_types.len(),
                n_tokens
            ),
        ));
    }
    Ok(token_types)
}

/// The pre-tokenizer name; absent → "default" (which [`set_pre_tokenizer`] rejects).
fn pre_name(md: &HashMap<String, Value>) -> Result<String> {
    match md.get("tokenizer.ggml.pre") {
        Some(Value::String(p)) => Ok(p.clone()),
        Some(other) => Err(key_err(
            "tokenizer.ggml.pre",
            format!("is {:?}, expected a string", other.value_type()),
        )),
        None => Ok("default".to_string()),
    }
}

/// The BPE model: token i has id i; merges are `"left right"` strings.
fn bpe_model(tokens: &[&str], merges_raw: &[&str]) -> Result<BPE> {
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.to_string(), id as u32))
        .collect();
    let merges: Merges = merges_raw
        .iter()
        .enumerate()
        .map(|(index, m)| match m.split_once(' ') {
            Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => {
                Ok((a.to_string(), b.to_string()))
            }
            _ => Err(TokenizerError::BadMerge {
                index,
                merge: m.to_string(),
            }),
        })
        .collect::<Result<_>>()?;
    BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| build_err("BPE model", e))
}

/// The HF pre-tokenizer pipeline that `pre` stands for (see the module docs); `qwen2` also sets
/// the NFC normalizer.
fn set_pre_tokenizer(inner: &mut tokenizers::Tokenizer, pre: &str) -> Result<()> {
    let pre_tokenizer: PreTokenizerWrapper = match pre {
        "smollm" => Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])
        .into(),
        "qwen2" => {
            let split = Split::new(
                SplitPattern::Regex(QWEN2_PATTERN.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| build_err("qwen2 split regex", e))?;
            inner.with_normalizer(Some(NFC));
            Sequence::new(vec![
                split.into(),
                ByteLevel::new(false, false, false).into(),
            ])
            .into()
        }
        other => {
            return Err(TokenizerError::UnknownPre {
                pre: other.to_string(),
            })
        }
    };
    inner.with_pre_tokenizer(Some(pre_tokenizer));
    Ok(())
}

/// Adds the control tokens as special tokens and the user-defined ones as plain added tokens.
fn add_typed_tokens(inner: &mut tokenizers::Tokenizer, tokens: &[&str], token_types: &[i64]) {
    let mut special = Vec::new();
    let mut user_defined = Vec::new();
    for (t, &ty) in tokens.iter().zip(token_types) {
        match ty {
            TOKEN_TYPE_CONTROL => {
                special.push(AddedToken::from(t.to_string(), true).normalized(false))
            }
            TOKEN_TYPE_USER_DEFINED => {
                user_defined.push(AddedToken::from(t.to_string(), false).normalized(false))
            }
            _ => {}
        }
    }
    inner.add_special_tokens(&special);
    inner.add_tokens(&user_defined);
}

/// The special token ids of the metadata, checked against the vocab, and their strings by HF name.
struct SpecialIds {
    bos_token_id: Option<u32>,
    add_bos_token_id: Option<u32>,
    /// EOS then EOT, each once; never empty.
    eos_token_ids: Vec<u32>,
    special_tokens: BTreeMap<&'static str, String>,
}

impl SpecialIds {
    fn read(md: &HashMap<String, Value>, tokens: &[&str]) -> Result<Self> {
        let n = tokens.len();
        let bos_token_id = token_id(md, "tokenizer.ggml.bos_token_id", n)?;
        let mut eos_token_ids = Vec::new();
        for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
            if let Some(id) = token_id(md, key, n)? {
                if !eos_token_ids.contains(&id) {
                    eos_token_ids.push(id);
                }
            }
        }
        if eos_token_ids.is_empty() {
            return Err(TokenizerError::NoEos);
        }
        let mut special_tokens = BTreeMap::new();
        for (name, key) in [
            ("bos_token", "tokenizer.ggml.bos_token_id"),
            ("eos_token", "tokenizer.ggml.eos_token_id"),
            ("pad_token", "tokenizer.ggml.padding_token_id"),
            ("unk_token", "tokenizer.ggml.unknown_token_id"),
        ] {
            if let Some(id) = token_id(md, key, n)? {
                special_tokens.insert(name, tokens[id as usize].to_string());
            }
        }
        let add_bos = matches!(
            md.get("tokenizer.ggml.add_bos_token"),
            Some(Value::Bool(true))
        );
        let add_bos_token_id = match (add_bos, bos_token_id) {
            (true, Some(id)) => Some(id),
            (true, None) => {
                return Err(key_err(
                    "tokenizer.ggml.add_bos_token",
                    "is true but there is no bos_token_id",
                ))
            }
            (false, _) => None,
        };
        Ok(SpecialIds { bos_token_id, add_bos_token_id, eos_token_ids, special_tokens })
    }
}

fn chat_template(md: &HashMap<String, Value>) -> Result<Option<ChatTemplate>> {
    match md.get("tokenizer.chat_template") {
        Some(Value::String(s)) => Ok(Some(ChatTemplate::new(s.clone()))),
        Some(other) => Err(key_err(
            "tokenizer.chat_template",
            format!("is {:?}, expected a string", other.value_type()),
        )),
        None => Ok(None),
    }
}
