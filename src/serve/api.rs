//! The OpenAI wire format: request bodies (parsed leniently: unknown fields are ignored),
//! their validation into typed [`ApiError`]s, and the response and stream-chunk bodies.
//!
//! Every error leaves the server as OpenAI's shape,
//! `{"error": {"message", "type", "param", "code"}}`, with the status OpenAI uses for it.

use serde::{Deserialize, Serialize};

use crate::tokenizer::ChatMessage;

/// The error classes of the API, each with its HTTP status.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// 400: the body is not JSON.
    #[error("the request body is not valid JSON: {what}")]
    InvalidJson { what: String },
    /// 400: a field has the wrong type, a wrong value, or a required field is missing.
    #[error("{message}")]
    InvalidField { param: String, message: String },
    /// 400: prompt + max_tokens do not fit the model's context.
    #[error(
        "this model's maximum context length is {max} tokens; the request needs {needed} \
         ({prompt} in the prompt, {max_tokens} for the completion{block}); shorten the prompt or lower max_tokens"
    )]
    ContextLength { param: &'static str, max: usize, needed: usize, prompt: usize, max_tokens: usize, block: String },
    /// 400/413/415: the body could not be read (too large, not UTF-8 ...).
    #[error("the request body could not be read: {what}")]
    BadBody { status: u16, what: String },
    /// 404: the model name is not the one served.
    #[error("the model `{requested}` does not exist; this server serves `{served}`")]
    ModelNotFound { requested: String, served: String },
    /// 404: no such route.
    #[error("no route for {method} {path}; the API serves /v1/chat/completions, /v1/completions, /v1/models, /health and /metrics")]
    NoRoute { method: String, path: String },
    /// 405: the route exists, the method does not.
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    /// 401: a key is set and the request's is missing or wrong.
    #[error("incorrect API key provided; pass it as `Authorization: Bearer KEY`")]
    InvalidApiKey,
    /// 503: the queue is full.
    #[error("the server is overloaded: {queued} requests are already waiting (limit {limit}); retry later")]
    Overloaded { queued: usize, limit: usize },
    /// 503: the server is shutting down.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// 500: generation failed.
    #[error("generation failed: {what}")]
    Internal { what: String },
}

impl ApiError {
    pub fn field(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::InvalidField { param: param.into(), message: message.into() }
    }

    pub fn status(&self) -> u16 {
        match self {
            ApiError::InvalidJson { .. } | ApiError::InvalidField { .. } | ApiError::ContextLength { .. } => 400,
            ApiError::BadBody { status, .. } => *status,
            ApiError::InvalidApiKey => 401,
            ApiError::ModelNotFound { .. } | ApiError::NoRoute { .. } => 404,
            ApiError::MethodNotAllowed { .. } => 405,
            ApiError::Overloaded { .. } | ApiError::ShuttingDown => 503,
            ApiError::Internal { .. } => 500,
        }
    }

    /// OpenAI's `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::InvalidJson { .. } | ApiError::InvalidField { .. } | ApiError::ContextLength { .. } => "invalid_request_error",
            ApiError::BadBody { .. } => "invalid_request_error",
            ApiError::ModelNotFound { .. } | ApiError::NoRoute { .. } | ApiError::MethodNotAllowed { .. } => "invalid_request_error",
            ApiError::InvalidApiKey => "invalid_request_error",
            ApiError::Overloaded { .. } | ApiError::ShuttingDown => "server_error",
            ApiError::Internal { .. } => "server_error",
        }
    }

    /// OpenAI's `code`.
    pub fn code(&self) -> Option<&'static str> {
        match self {
            ApiError::InvalidJson { .. } => Some("invalid_json"),
            ApiError::BadBody { .. } => Some("invalid_body"),
            ApiError::InvalidField { .. } => Some("invalid_value"),
            ApiError::ContextLength { .. } => Some("context_length_exceeded"),
            ApiError::ModelNotFound { .. } => Some("model_not_found"),
            ApiError::NoRoute { .. } => Some("unknown_url"),
            ApiError::MethodNotAllowed { .. } => Some("method_not_allowed"),
            ApiError::InvalidApiKey => Some("invalid_api_key"),
            ApiError::Overloaded { .. } => Some("overloaded"),
            ApiError::ShuttingDown => Some("shutting_down"),
            ApiError::Internal { .. } => None,
        }
    }

    pub fn param(&self) -> Option<&str> {
        match self {
            ApiError::InvalidField { param, .. } => Some(param),
            ApiError::ContextLength { param, .. } => Some(param),
            ApiError::ModelNotFound { .. } => Some("model"),
            _ => None,
        }
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                kind: self.kind().to_string(),
                param: self.param().map(str::to_string),
                code: self.code().map(str::to_string),
            },
        }
    }
}

/// `{"error": {...}}`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

/// Parses a body into a JSON object; not JSON, or not an object, is a 400.
pub fn parse_json(body: &[u8]) -> Result<serde_json::Value, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| ApiError::InvalidJson { what: e.to_string() })?;
    if !value.is_object() {
        return Err(ApiError::InvalidJson { what: "expected a JSON object".into() });
    }
    Ok(value)
}

/// Reads `T` out of a request object: a type error becomes a 400 naming the offending field.
/// Several types can be read from one object (each ignores the fields of the others).
pub fn fields<T: serde::de::DeserializeOwned>(value: &serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.inner().to_string();
        // A missing field is reported at its parent: name the field itself.
        let missing = inner.strip_prefix("missing field `").and_then(|r| r.split('`').next());
        let param = match (path.as_str(), missing) {
            (".", Some(f)) => f.to_string(),
            (".", None) => String::new(),
            (p, Some(f)) => format!("{p}.{f}"),
            (p, None) => p.to_string(),
        };
        ApiError::InvalidField { message: format!("{}: {}", if param.is_empty() { "request" } else { &param }, e.inner()), param }
    })
}

/// A chat or completion request: its own fields and the shared ones.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<(T, CommonParams), ApiError> {
    let value = parse_json(body)?;
    let own = fields::<T>(&value)?;
    let common = fields::<CommonParams>(&value)?;
    Ok((own, common))
}

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// The fields both endpoints share. Numbers are read wide and checked here, so that a negative
/// `max_tokens` gets a message about `max_tokens`, not about integer types.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CommonParams {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub stop: Option<StopField>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub n: Option<i64>,
    /// vLLM's extension: generate up to max_tokens even past EOS (load tests with fixed lengths).
    #[serde(default)]
    pub ignore_eos: Option<bool>,
}

/// A message's `content`: a string or a list of parts (only `text` parts are supported).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MessageIn {
    pub role: String,
    #[serde(default)]
    pub content: Option<MessageContent>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatCompletionRequest {
    pub messages: Vec<MessageIn>,
    /// The newer name of `max_tokens` for chat.
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
}

/// `prompt`: a string, a list of one string, or a list of token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub prompt: PromptField,
}

/// A checked request, ready to tokenize and queue.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    /// None: as many as the context allows (chat) or 16 (completions), as OpenAI.
    pub max_tokens: Option<usize>,
    pub temperature: f32,
    pub top_p: f32,
    /// None: a fresh random seed.
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub ignore_eos: bool,
}

/// At most this many stop strings, as OpenAI.
pub const MAX_STOP: usize = 4;

impl CommonParams {
    /// Checks the shared fields against the served model name.
    pub fn check(&self, served: &str) -> Result<Checked, ApiError> {
        if let Some(m) = &self.model {
            if m != served {
                return Err(ApiError::ModelNotFound { requested: m.clone(), served: served.to_string() });
            }
        }
        match self.n {
            None | Some(1) => {}
            Some(n) => return Err(ApiError::field("n", format!("n = {n} is not supported; this server returns one choice per request (n = 1)"))),
        }
        let max_tokens = match self.max_tokens {
            None => None,
            Some(v) if v < 1 => return Err(ApiError::field("max_tokens", format!("max_tokens must be at least 1, got {v}"))),
            Some(v) => Some(usize::try_from(v).unwrap_or(usize::MAX)),
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
            return Err(ApiError::field("temperature", format!("temperature must be in [0, 2], got {temperature}")));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p.is_finite() && top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::field("top_p", format!("top_p must be in (0, 1], got {top_p}")));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s.clone()],
            Some(StopField::Many(v)) => v.clone(),
        };
        if stop.len() > MAX_STOP {
            return Err(ApiError::field("stop", format!("at most {MAX_STOP} stop sequences, got {}", stop.len())));
        }
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::field("stop", "stop sequences must not be empty"));
        }
        Ok(Checked {
            max_tokens,
            temperature: temperature as f32,
            top_p: top_p as f32,
            // A negative seed keeps its bits: any i64 is a valid OpenAI seed.
            seed: self.seed.map(|s| s as u64),
            stop,
            stream: self.stream.unwrap_or(false),
            include_usage: self.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false),
            ignore_eos: self.ignore_eos.unwrap_or(false),
        })
    }
}

impl ChatCompletionRequest {
    /// The conversation as the chat template takes it.
    pub fn chat_messages(&self) -> Result<Vec<ChatMessage>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::field("messages", "messages must hold at least one message"));
        }
        let mut out = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.iter().enumerate() {
            let content = match &m.content {
                None => String::new(),
                Some(MessageContent::Text(s)) => s.clone(),
                Some(MessageContent::Parts(parts)) => {
                    let mut s = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => s.push_str(t),
                            ("text", None) => return Err(ApiError::field(format!("messages[{i}].content[{j}].text"), "a text part needs `text`")),
                            (kind, _) => {
                                return Err(ApiError::field(
                                    format!("messages[{i}].content[{j}].type"),
                                    format!("content parts of type `{kind}` are not supported; only `text`"),
                                ))
                            }
                        }
                    }
                    s
                }
            };
            out.push(ChatMessage::new(m.role.clone(), content));
        }
        Ok(out)
    }

    /// The shared checks, plus `max_completion_tokens` standing in for `max_tokens`.
    pub fn check(&self, common: &CommonParams, served: &str) -> Result<Checked, ApiError> {
        let mut c = common.check(served)?;
        if c.max_tokens.is_none() {
            if let Some(v) = self.max_completion_tokens {
                if v < 1 {
                    return Err(ApiError::field("max_completion_tokens", format!("max_completion_tokens must be at least 1, got {v}")));
                }
                c.max_tokens = Some(usize::try_from(v).unwrap_or(usize::MAX));
            }
        }
        Ok(c)
    }
}

// ---------------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------------

/// This request's speculative decoding: what `/metrics` aggregates, per request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SpeculativeUsage {
    /// Tokens per verified block (1 = no drafter).
    pub block_size: usize,
    /// Draft → verify → commit cycles.
    pub cycles: usize,
    pub drafted_tokens: usize,
    pub accepted_tokens: usize,
    /// Mean tokens committed per cycle (acc + 1).
    pub tau: f64,
    /// Entry i: how often draft position i+1 was accepted among the cycles that drafted it.
    pub acceptance_per_position: Vec<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub speculative: SpeculativeUsage,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AssistantMessage {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    pub finish_reason: String,
    pub logprobs: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub finish_reason: String,
    pub logprobs: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Completion {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    pub usage: Usage,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: Delta,
    pub finish_reason: Option<String>,
    pub logprobs: Option<serde_json::Value>,
}

/// One `data:` event of a streamed chat completion.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    /// Only on the last chunk (empty `choices`), with `stream_options.include_usage`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompletionChunkChoice {
    pub index: usize,
    pub text: String,
    pub finish_reason: Option<String>,
    pub logprobs: Option<serde_json::Value>,
}

/// One `data:` event of a streamed completion.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompletionChunk {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelCard {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub owned_by: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelCard>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_negative_max_tokens_names_the_field() {
        let (_, common) = parse_body::<CompletionRequest>(br#"{"prompt": "hi", "max_tokens": -3}"#).unwrap();
        let e = common.check("m").unwrap_err();
        assert_eq!(e.param(), Some("max_tokens"));
        assert_eq!(e.status(), 400);
    }

    #[test]
    fn a_wrong_type_names_its_path_and_unknown_fields_are_ignored() {
        let e = parse_body::<CompletionRequest>(br#"{"prompt": "hi", "temperature": "hot"}"#).unwrap_err();
        assert_eq!(e.status(), 400);
        assert_eq!(e.param(), Some("temperature"), "{e}");
        let (r, _) = parse_body::<CompletionRequest>(br#"{"prompt": "hi", "frequency_penalty": 0.5, "user": "x"}"#).unwrap();
        assert!(matches!(r.prompt, PromptField::Text(_)));
    }

    #[test]
    fn the_error_body_has_openais_four_fields() {
        let v = serde_json::to_value(ApiError::InvalidApiKey.body()).unwrap();
        let e = v["error"].as_object().unwrap();
        for k in ["message", "type", "param", "code"] {
            assert!(e.contains_key(k), "{v}");
        }
    }
}
