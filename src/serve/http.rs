//! The HTTP side: routes, authentication, request → engine job, engine events → JSON or SSE.
//!
//! Handlers never decode: they tokenize (on a blocking thread), queue a [`Job`] and turn its
//! events into OpenAI bodies. Every failure is an [`ApiError`] in OpenAI's shape.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::Stream;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::api::{
    parse_body, ApiError, AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
    ChatCompletionRequest, Checked, Completion, CompletionChoice, CompletionChunk, CompletionChunkChoice,
    CompletionRequest, Delta, ModelCard, ModelList, PromptField, SpeculativeUsage, Usage,
};
use super::engine::{EngineHandle, Event, Job, SubmitError};
use super::metrics::Metrics;
use super::text::TextAssembler;
use crate::spec::{AcceptRule, AcceptStats, FinishReason, GenerateConfig};
use crate::tokenizer::Tokenizer;

/// Everything a handler needs; shared by all connections.
pub struct AppState {
    /// The model id of requests and `/v1/models`.
    pub served_name: String,
    pub tokenizer: Arc<Tokenizer>,
    pub engine: EngineHandle,
    pub metrics: Arc<Metrics>,
    pub api_key: Option<String>,
    /// The target's context (max_position_embeddings).
    pub max_context: usize,
    /// Tokens per verified block (1 without a drafter).
    pub block_size: usize,
    /// The target's and the tokenizer's EOS ids, as `specauf generate` uses them.
    pub eos_token_ids: Vec<u32>,
    /// Unix seconds at start.
    pub created: u64,
}

pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .with_state(state)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.body())).into_response()
    }
}

/// With an API key set, `/v1/*` needs `Authorization: Bearer KEY`.
async fn authenticate(State(s): State<Arc<AppState>>, headers: HeaderMap, req: Request, next: Next) -> Response {
    if let Some(key) = &s.api_key {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim);
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes())) {
            return ApiError::InvalidApiKey.into_response();
        }
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn no_route(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    ApiError::NoRoute { method: method.to_string(), path: uri.path().to_string() }.into_response()
}

async fn wrong_method(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    ApiError::MethodNotAllowed { method: method.to_string(), path: uri.path().to_string() }.into_response()
}

async fn health(State(s): State<Arc<AppState>>) -> Response {
    if s.engine.is_stopped() {
        return ApiError::ShuttingDown.into_response();
    }
    Json(serde_json::json!({"status": "ok", "model": s.served_name, "queued": s.engine.queued()})).into_response()
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], s.metrics.encode()).into_response()
}

fn model_card(s: &AppState) -> ModelCard {
    ModelCard { id: s.served_name.clone(), object: "model".into(), created: s.created, owned_by: "specauf".into() }
}

async fn list_models(State(s): State<Arc<AppState>>) -> Response {
    Json(ModelList { object: "list".into(), data: vec![model_card(&s)] }).into_response()
}

async fn get_model(State(s): State<Arc<AppState>>, axum::extract::Path(id): axum::extract::Path<String>) -> Response {
    if id != s.served_name {
        return ApiError::ModelNotFound { requested: id, served: s.served_name.clone() }.into_response();
    }
    Json(model_card(&s)).into_response()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completions,
}

impl Endpoint {
    fn label(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat",
            Endpoint::Completions => "completions",
        }
    }
}

/// A request checked, tokenized and sized against the context.
struct Prepared {
    prompt_ids: Vec<u32>,
    cfg: GenerateConfig,
    checked: Checked,
}

async fn chat_completions(State(s): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let arrived = Instant::now();
    let body = match body {
        Ok(b) => b,
        Err(e) => return fail(&s, Endpoint::Chat, body_error(e)),
    };
    let st = s.clone();
    let prepared = tokio::task::spawn_blocking(move || prepare(&st, Endpoint::Chat, &body)).await;
    respond(s, Endpoint::Chat, prepared, arrived).await
}

async fn completions(State(s): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let arrived = Instant::now();
    let body = match body {
        Ok(b) => b,
        Err(e) => return fail(&s, Endpoint::Completions, body_error(e)),
    };
    let st = s.clone();
    let prepared = tokio::task::spawn_blocking(move || prepare(&st, Endpoint::Completions, &body)).await;
    respond(s, Endpoint::Completions, prepared, arrived).await
}

fn body_error(e: BytesRejection) -> ApiError {
    ApiError::BadBody { status: e.status().as_u16(), what: e.body_text() }
}

/// OpenAI's default `max_tokens` of /v1/completions.
const COMPLETIONS_DEFAULT_MAX_TOKENS: usize = 16;

fn prepare(s: &AppState, endpoint: Endpoint, body: &[u8]) -> Result<Prepared, ApiError> {
    let tok_err = |param: &str, e: crate::tokenizer::TokenizerError| ApiError::field(param, e.to_string());
    let (prompt_ids, checked, param) = match endpoint {
        Endpoint::Chat => {
            let (req, common) = parse_body::<ChatCompletionRequest>(body)?;
            let checked = req.check(&common, &s.served_name)?;
            let messages = req.chat_messages()?;
            let ids = s.tokenizer.encode_chat(&messages, true).map_err(|e| tok_err("messages", e))?;
            (ids, checked, "messages")
        }
        Endpoint::Completions => {
            let (req, common) = parse_body::<CompletionRequest>(body)?;
            let checked = common.check(&s.served_name)?;
            let ids = match &req.prompt {
                PromptField::Text(t) => s.tokenizer.encode(t, true).map_err(|e| tok_err("prompt", e))?,
                PromptField::Texts(v) if v.len() == 1 => s.tokenizer.encode(&v[0], true).map_err(|e| tok_err("prompt", e))?,
                PromptField::Texts(v) => {
                    return Err(ApiError::field("prompt", format!("a list of {} prompts is not supported; send one prompt per request", v.len())))
                }
                PromptField::Tokens(ids) => {
                    let vocab = s.tokenizer.vocab_size();
                    if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                        return Err(ApiError::field("prompt", format!("token id {bad} is outside the vocabulary of {vocab}")));
                    }
                    ids.clone()
                }
            };
            (ids, checked, "prompt")
        }
    };
    if prompt_ids.is_empty() {
        return Err(ApiError::field(param, "the prompt tokenizes to no tokens"));
    }
    // The last cycle may start at prompt + max_tokens - 1 and verify a block from there.
    let overhead = s.block_size.saturating_sub(1);
    let room = s.max_context.saturating_sub(prompt_ids.len() + overhead);
    let max_tokens = match (checked.max_tokens, endpoint) {
        (Some(m), _) => m,
        (None, Endpoint::Completions) => COMPLETIONS_DEFAULT_MAX_TOKENS.min(room.max(1)),
        (None, Endpoint::Chat) => room.max(1),
    };
    let needed = prompt_ids.len().saturating_add(max_tokens).saturating_add(overhead);
    if needed > s.max_context {
        let block = if overhead > 0 { format!(", {overhead} for the last speculative block") } else { String::new() };
        return Err(ApiError::ContextLength { param, max: s.max_context, needed, prompt: prompt_ids.len(), max_tokens, block });
    }
    let cfg = GenerateConfig {
        max_new_tokens: max_tokens,
        temperature: checked.temperature,
        top_p: checked.top_p,
        seed: checked.seed.unwrap_or_else(rand::random),
        eos_token_ids: if checked.ignore_eos { Vec::new() } else { s.eos_token_ids.clone() },
        accept_rule: AcceptRule::SampleMatch,
    };
    Ok(Prepared { prompt_ids, cfg, checked })
}

async fn respond(
    s: Arc<AppState>,
    endpoint: Endpoint,
    prepared: Result<Result<Prepared, ApiError>, tokio::task::JoinError>,
    arrived: Instant,
) -> Response {
    let prepared = match prepared {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return fail(&s, endpoint, e),
        Err(e) => return fail(&s, endpoint, ApiError::Internal { what: format!("preparing the request: {e}") }),
    };
    let (tx, rx) = unbounded_channel();
    let prompt_tokens = prepared.prompt_ids.len();
    let job = Job { prompt_ids: prepared.prompt_ids, cfg: prepared.cfg, events: tx };
    match s.engine.submit(job) {
        Ok(()) => {}
        Err(SubmitError::Full { queued, limit }) => return fail(&s, endpoint, ApiError::Overloaded { queued, limit }),
        Err(SubmitError::Stopped) => return fail(&s, endpoint, ApiError::ShuttingDown),
    }
    s.metrics.prompt_tokens.inc_by(prompt_tokens as u64);
    let run = Run::new(s.clone(), endpoint, prompt_tokens, prepared.checked.stop.clone(), arrived);
    if prepared.checked.stream {
        let stream = sse_stream(run, rx, prepared.checked.include_usage);
        Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
    } else {
        whole_response(run, rx).await
    }
}

fn fail(s: &AppState, endpoint: Endpoint, e: ApiError) -> Response {
    s.metrics.request(endpoint.label(), e.status());
    e.into_response()
}

/// One request's progress on the HTTP side.
struct Run {
    s: Arc<AppState>,
    endpoint: Endpoint,
    id: String,
    prompt_tokens: usize,
    stops: Vec<String>,
    ids: Vec<u32>,
    accept_lengths: Vec<usize>,
    draft_lengths: Vec<usize>,
    arrived: Instant,
    last_token_at: Option<Instant>,
}

/// What one engine event means for the client.
enum Progress {
    Text(String),
    Finished { text: String, reason: &'static str },
    Failed(String),
    /// The server is shutting down and cancelled the request.
    ShutDown,
}

impl Run {
    fn new(s: Arc<AppState>, endpoint: Endpoint, prompt_tokens: usize, stops: Vec<String>, arrived: Instant) -> Self {
        let prefix = match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completions => "cmpl",
        };
        let id = format!("{prefix}-{:016x}{:08x}", rand::random::<u64>(), rand::random::<u32>());
        Self {
            s,
            endpoint,
            id,
            prompt_tokens,
            stops,
            ids: Vec::new(),
            accept_lengths: Vec::new(),
            draft_lengths: Vec::new(),
            arrived,
            last_token_at: None,
        }
    }

    fn on_tokens(&mut self, tokens: &[u32], cycle: Option<super::engine::CycleStats>) {
        if let Some(c) = cycle {
            self.accept_lengths.push(c.accepted + 1);
            self.draft_lengths.push(c.drafted);
        }
        if tokens.is_empty() {
            return;
        }
        let now = Instant::now();
        match self.last_token_at {
            None => self.s.metrics.time_to_first_token.observe(now.duration_since(self.arrived).as_secs_f64()),
            Some(prev) => {
                let per = now.duration_since(prev).as_secs_f64() / tokens.len() as f64;
                for _ in 0..tokens.len() {
                    self.s.metrics.inter_token_latency.observe(per);
                }
            }
        }
        self.last_token_at = Some(now);
        self.ids.extend_from_slice(tokens);
    }

    fn usage(&self, completion_tokens: usize) -> Usage {
        let mut stats = AcceptStats::new();
        stats.add_cycles(&self.accept_lengths, &self.draft_lengths);
        let m = stats.summary();
        Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens,
            total_tokens: self.prompt_tokens + completion_tokens,
            speculative: SpeculativeUsage {
                block_size: self.s.block_size,
                cycles: m.cycles,
                drafted_tokens: self.draft_lengths.iter().sum(),
                accepted_tokens: self.accept_lengths.iter().map(|a| a - 1).sum(),
                tau: m.tau,
                acceptance_per_position: m.per_position_acceptance,
            },
        }
    }

    /// Records the end of a request that was answered.
    fn record_end(&self, status: u16, usage: &Usage) {
        let m = &self.s.metrics;
        m.request(self.endpoint.label(), status);
        m.completion_tokens.inc_by(usage.completion_tokens as u64);
        if usage.speculative.cycles > 0 {
            m.tau.observe(usage.speculative.tau);
        }
        m.request_latency.observe(self.arrived.elapsed().as_secs_f64());
    }
}

fn finish_reason(reason: FinishReason, stopped: bool) -> &'static str {
    match (reason, stopped) {
        (_, true) | (FinishReason::Eos, _) => "stop",
        (FinishReason::Length, false) => "length",
    }
}

/// Feeds one engine event to the run and its text.
fn advance(run: &mut Run, text: &mut TextAssembler<'_>, ev: Event) -> Progress {
    match ev {
        Event::Tokens { tokens, cycle } => {
            run.on_tokens(&tokens, cycle);
            match text.push(&tokens) {
                Ok(delta) if text.stopped() => Progress::Finished { text: delta, reason: "stop" },
                Ok(delta) => Progress::Text(delta),
                Err(e) => Progress::Failed(format!("decoding the output: {e}")),
            }
        }
        Event::Done { finish_reason: r } => Progress::Finished { text: text.finish(), reason: finish_reason(r, false) },
        Event::Failed { message } => Progress::Failed(message),
        Event::Cancelled => Progress::ShutDown,
    }
}

async fn whole_response(mut run: Run, mut rx: UnboundedReceiver<Event>) -> Response {
    let tokenizer = run.s.tokenizer.clone();
    let mut text = TextAssembler::new(&tokenizer, run.stops.clone());
    let mut out = String::new();
    let reason = loop {
        let Some(ev) = rx.recv().await else {
            break Err(ApiError::ShuttingDown);
        };
        match advance(&mut run, &mut text, ev) {
            Progress::Text(d) => out.push_str(&d),
            Progress::Finished { text: d, reason } => {
                out.push_str(&d);
                break Ok(reason);
            }
            Progress::Failed(what) => break Err(ApiError::Internal { what }),
            Progress::ShutDown => break Err(ApiError::ShuttingDown),
        }
    };
    // A stop sequence ends the request here: dropping the receiver frees its slot.
    drop(rx);
    let reason = match reason {
        Ok(r) => r,
        Err(e) => return fail(&run.s, run.endpoint, e),
    };
    let usage = run.usage(run.ids.len());
    run.record_end(200, &usage);
    let created = unix_now();
    let model = run.s.served_name.clone();
    match run.endpoint {
        Endpoint::Chat => Json(ChatCompletion {
            id: run.id.clone(),
            object: "chat.completion".into(),
            created,
            model,
            choices: vec![ChatChoice {
                index: 0,
                message: AssistantMessage { role: "assistant".into(), content: out },
                finish_reason: reason.into(),
                logprobs: None,
            }],
            usage,
        })
        .into_response(),
        Endpoint::Completions => Json(Completion {
            id: run.id.clone(),
            object: "text_completion".into(),
            created,
            model,
            choices: vec![CompletionChoice { index: 0, text: out, finish_reason: reason.into(), logprobs: None }],
            usage,
        })
        .into_response(),
    }
}

/// One chunk of the stream: a text delta, or the finish reason, or (with no choice) the usage.
fn chunk(run: &Run, created: u64, delta: Option<String>, role: bool, reason: Option<&str>, usage: Option<Usage>) -> SseEvent {
    let model = run.s.served_name.clone();
    let json = match run.endpoint {
        Endpoint::Chat => {
            let choices = if usage.is_some() {
                Vec::new()
            } else {
                vec![ChatChunkChoice {
                    index: 0,
                    delta: Delta { role: role.then(|| "assistant".to_string()), content: delta },
                    finish_reason: reason.map(str::to_string),
                    logprobs: None,
                }]
            };
            serde_json::to_string(&ChatCompletionChunk { id: run.id.clone(), object: "chat.completion.chunk".into(), created, model, choices, usage })
        }
        Endpoint::Completions => {
            let choices = if usage.is_some() {
                Vec::new()
            } else {
                vec![CompletionChunkChoice { index: 0, text: delta.unwrap_or_default(), finish_reason: reason.map(str::to_string), logprobs: None }]
            };
            serde_json::to_string(&CompletionChunk { id: run.id.clone(), object: "text_completion".into(), created, model, choices, usage })
        }
    };
    SseEvent::default().data(json.unwrap_or_default())
}

fn sse_stream(mut run: Run, mut rx: UnboundedReceiver<Event>, include_usage: bool) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    async_stream::stream! {
        let tokenizer = run.s.tokenizer.clone();
        let mut text = TextAssembler::new(&tokenizer, run.stops.clone());
        let created = unix_now();
        if run.endpoint == Endpoint::Chat {
            yield Ok(chunk(&run, created, Some(String::new()), true, None, None));
        }
        let mut failed = None;
        loop {
            let Some(ev) = rx.recv().await else {
                failed = Some(ApiError::ShuttingDown);
                break;
            };
            match advance(&mut run, &mut text, ev) {
                Progress::Text(d) => {
                    if !d.is_empty() {
                        yield Ok(chunk(&run, created, Some(d), false, None, None));
                    }
                }
                Progress::Finished { text: d, reason } => {
                    if !d.is_empty() {
                        yield Ok(chunk(&run, created, Some(d), false, None, None));
                    }
                    yield Ok(chunk(&run, created, None, false, Some(reason), None));
                    break;
                }
                Progress::Failed(what) => {
                    failed = Some(ApiError::Internal { what });
                    break;
                }
                Progress::ShutDown => {
                    failed = Some(ApiError::ShuttingDown);
                    break;
                }
            }
        }
        drop(rx);
        let usage = run.usage(run.ids.len());
        match failed {
            None => {
                run.record_end(200, &usage);
                if include_usage {
                    yield Ok(chunk(&run, created, None, false, None, Some(usage)));
                }
            }
            Some(e) => {
                // The status line is long gone: the error goes in the stream, in OpenAI's shape.
                run.record_end(e.status(), &usage);
                yield Ok(SseEvent::default().data(serde_json::to_string(&e.body()).unwrap_or_default()));
            }
        }
        yield Ok(SseEvent::default().data("[DONE]"));
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
