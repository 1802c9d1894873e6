//! Text <-> token ids for the target model, with its chat template and special ids.
//!
//! One [`Tokenizer`] serves both sources a target can come from:
//! - a GGUF file, whose metadata carries the byte-level BPE vocab, merges and chat template
//!   ([`Tokenizer::from_gguf`], see `gguf.rs`);
//! - a Hugging Face folder with `tokenizer.json` + `tokenizer_config.json` ([`Tokenizer::from_hf_dir`]).
//!
//! Chat prompts render exactly like `transformers`' `apply_chat_template(..., tokenize=False)` and are
//! tokenized without adding special tokens, as `transformers` does for chat templates (`chat.rs`).

mod chat;
mod gguf;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use chat::ChatMessage;
use chat::ChatTemplate;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("GGUF metadata `{key}`: {reason}")]
    GgufKey { key: String, reason: String },
    #[error("GGUF tokenizer.ggml.model = `{model}` is not supported; only byte-level BPE (`gpt2`) GGUFs are, use a HF folder with tokenizer.json instead")]
    UnsupportedModel { model: String },
    #[error("GGUF tokenizer.ggml.pre = `{pre}` is not supported (known: smollm, qwen2); use a HF folder with tokenizer.json, or add its pre-tokenizer to tokenizer/gguf.rs")]
    UnknownPre { pre: String },
    #[error("GGUF merge #{index} `{merge}` is not two tokens separated by one space")]
    BadMerge { index: usize, merge: String },
    #[error("building the tokenizer ({what}): {message}")]
    Build { what: String, message: String },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("loading {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("{what} `{token}` is not in the vocabulary of {source_name}")]
    UnknownToken {
        what: String,
        token: String,
        source_name: String,
    },
    #[error("{what}: {value} is not a valid value (expected {expected})")]
    BadConfig {
        what: String,
        value: String,
        expected: String,
    },
    #[error("no end-of-sequence token: neither the tokenizer config nor generation_config.json names one; generation could not stop")]
    NoEos,
    #[error("encoding text: {message}")]
    Encode { message: String },
    #[error("decoding ids: {message}")]
    Decode { message: String },
    #[error("this tokenizer has no chat template (no `chat_template` in tokenizer_config.json / `tokenizer.chat_template` in the GGUF); run without --chat, or use a model that ships one")]
    NoChatTemplate,
    #[error("chat template: {message}")]
    Template { message: String },
}

pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;

/// A byte-level BPE tokenizer plus what generation needs around it: special ids and the chat
/// template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// `bos_token`, `eos_token`, `pad_token`, `unk_token` as the chat template sees them.
    special_tokens: BTreeMap<&'static str, String>,
    bos_token_id: Option<u32>,
    /// Prepended by `encode(.., add_special_tokens = true)` when a GGUF sets `add_bos_token`
    /// (a tokenizer.json does this through its own post-processor instead).
    add_bos_token_id: Option<u32>,
    /// Every id that ends generation (`eos_token_id` of the config, plus generation_config's list).
    eos_token_ids: Vec<u32>,
    chat_template: Option<ChatTemplate>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("special_tokens", &self.special_tokens)
            .field("eos_token_ids", &self.eos_token_ids)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

impl Tokenizer {
    /// Builds from the GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`).
    pub fn from_gguf(content: &candle_core::quantized::gguf_file::Content) -> Result<Self> {
        gguf::from_gguf(content)
    }

    /// Builds from a Hugging Face folder: `tokenizer.json`, `tokenizer_config.json` (chat_template,
    /// bos/eos/pad/unk tokens) and, if present, `generation_config.json` (`eos_token_id`, int or list).
    pub fn from_hf_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let tokenizer_json = dir.join("tokenizer.json");
        if !tokenizer_json.is_file() {
            return Err(TokenizerError::Read {
                path: tokenizer_json,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no tokenizer.json in the model folder",
                ),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&tokenizer_json).map_err(|e| {
            TokenizerError::Load {
                path: tokenizer_json.clone(),
                message: e.to_string(),
            }
        })?;
        let source_name = tokenizer_json.display().to_string();

        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.is_file() {
            read_json(&config_path)?
        } else {
            serde_json::Value::Null
        };
        let mut special_tokens = BTreeMap::new();
        for key in ["bos_token", "eos_token", "pad_token", "unk_token"] {
            if let Some(token) = token_content(&config[key], &config_path, key)? {
                special_tokens.insert(key, token);
            }
        }
        let id_of =
            |key: &str| -> Result<Option<u32>> {
                match special_tokens.get(key) {
                    None => Ok(None),
                    Some(token) => inner.token_to_id(token).map(Some).ok_or_else(|| {
                        TokenizerError::UnknownToken {
                            what: key.to_string(),
                            token: token.clone(),
                            source_name: source_name.clone(),
                        }
                    }),
                }
            };
        let bos_token_id = id_of("bos_token")?;
        let mut eos_token_ids: Vec<u32> = id_of("eos_token")?.into_iter().collect();

        let generation_path = dir.join("generation_config.json");
        if generation_path.is_file() {
            let generation = read_json(&generation_path)?;
            let what = format!("{} eos_token_id", generation_path.display());
            let ids: Vec<&serde_json::Value> = match &generation["eos_token_id"] {
                serde_json::Value::Null => vec![],
                serde_json::Value::Array(a) => a.iter().collect(),
                v => vec![v],
            };
            for v in ids {
                let id = v
                    .as_u64()
                    .and_then(|id| u32::try_from(id).ok())
                    .ok_or_else(|| TokenizerError::BadConfig {
                        what: what.clone(),
                        value: v.to_string(),
                        expected: "a token id or a list of token ids".into(),
                    })?;
                if !eos_token_ids.contains(&id) {
                    eos_token_ids.push(id);
                }
            }
        }
        if eos_token_ids.is_empty() {
            return Err(TokenizerError::NoEos);
        }

        let chat_template = match &config["chat_template"] {
            serde_json::Value::String(s) => Some(ChatTemplate::new(s.clone())),
            serde_json::Value::Null => None,
            // Some configs list named templates: [{"name": "default", "template": ...}, ...].
            serde_json::Value::Array(list) => list
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .map(|s| ChatTemplate::new(s.to_string())),
            v => {
                return Err(TokenizerError::BadConfig {
                    what: format!("{} chat_template", config_path.display()),
                    value: v.to_string(),
                    expected: "a string".into(),
                })
            }
        };
        Ok(Tokenizer {
            inner,
            special_tokens,
            bos_token_id,
            add_bos_token_id: None,
            eos_token_ids,
            chat_template,
        })
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor (e.g. BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding =
            self.inner
                .encode(text, add_special_tokens)
                .map_err(|e| TokenizerError::Encode {
                    message: e.to_string(),
                })?;
        let ids = encoding.get_ids();
        match self.add_bos_token_id {
            Some(bos) if add_special_tokens => {
                Ok(std::iter::once(bos).chain(ids.iter().copied()).collect())
            }
            _ => Ok(ids.to_vec()),
        }
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Decode {
                message: e.to_string(),
            })
    }

    /// Ids that end generation; never empty.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of ids, added tokens included (may be below the model's embedding rows).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The wrapped `tokenizers` object, for streaming decode and the like.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// The prompt string, as `transformers`' `apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=...)` renders it, with `enable_thinking=False` (Qwen3 thinking off).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self
            .chat_template
            .as_ref()
            .ok_or(TokenizerError::NoChatTemplate)?;
        template.render(messages, add_generation_prompt, &self.special_tokens)
    }

    /// [`Self::apply_chat_template`] then [`Self::encode`] without special tokens: the template
    /// already wrote them, as `transformers` assumes.
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let text = self.apply_chat_template(messages, add_generation_prompt)?;
        self.encode(&text, false)
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Read {
        path: path.into(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| TokenizerError::Json {
        path: path.into(),
        source,
    })
}

/// A special token in tokenizer_config.json: a string, an AddedToken object `{"content": ...}`, or null.
fn token_content(value: &serde_json::Value, path: &Path, key: &str) -> Result<Option<String>> {
    match value {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::String(s) => Ok(Some(s.clone())),
        serde_json::Value::Object(o) => match o.get("content") {
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(TokenizerError::BadConfig {
                what: format!("{} {key}", path.display()),
                value: value.to_string(),
                expected: "a string or an object with a string `content`".into(),
            }),
        },
        v => Err(TokenizerError::BadConfig {
            what: format!("{} {key}", path.display()),
            value: v.to_string(),
            expected: "a string or an object with a string `content`".into(),
        }),
    }
}
