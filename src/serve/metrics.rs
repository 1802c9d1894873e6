//! The server's Prometheus metrics (`GET /metrics`, OpenMetrics text).
//!
//! Request-level figures (requests, tokens, time to first token, inter-token latency, τ per
//! request) are recorded by the HTTP side; cycle-level figures (acceptance length, drafted and
//! accepted tokens, queue depth, tokens/s) by the engine, which sees every cycle, also those of
//! requests that were cancelled.

use std::collections::VecDeque;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, linear_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `chat` or `completions`.
    pub endpoint: String,
    /// The HTTP status of the answer (200 also for a stream that ended in an error event).
    pub status: u16,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub prompt_tokens: Counter,
    pub completion_tokens: Counter,
    pub cancelled: Counter,
    pub cycles: Counter,
    /// Cycles run as plain decode steps because the batch was at least
    /// `--speculative-disable-by-batch-size`.
    pub cycles_without_drafts: Counter,
    pub drafted_tokens: Counter,
    pub accepted_tokens: Counter,
    /// acc + 1 of every cycle.
    pub accept_length: Histogram,
    /// τ of every finished request.
    pub tau: Histogram,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub request_latency: Histogram,
    /// Engine time by phase: prefill of admitted requests, drafting, verify forwards (with
    /// the verdicts and commits).
    pub prefill_seconds: Counter<f64, AtomicU64>,
    pub draft_seconds: Counter<f64, AtomicU64>,
    pub verify_seconds: Counter<f64, AtomicU64>,
    /// Blocks verified per target forward (1 = unbatched).
    pub verify_batch_size: Histogram,
    pub queue_depth: Gauge,
    pub active_requests: Gauge,
    pub tokens_per_second: Gauge<f64, AtomicU64>,
    /// (time, tokens) of the last seconds' cycles, for `tokens_per_second`.
    window: Mutex<VecDeque<(Instant, usize)>>,
}

/// The window over which `tokens_per_second` is measured.
const RATE_WINDOW: Duration = Duration::from_secs(10);

impl Metrics {
    pub fn new(max_block: usize) -> Self {
        let mut registry = Registry::with_prefix("specauf");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("requests", "Requests answered, by endpoint and HTTP status", requests.clone());
        let prompt_tokens = Counter::default();
        registry.register("prompt_tokens", "Prompt tokens of admitted requests", prompt_tokens.clone());
        let completion_tokens = Counter::default();
        registry.register("completion_tokens", "Tokens returned to clients", completion_tokens.clone());
        let cancelled = Counter::default();
        registry.register("cancelled_requests", "Requests whose client went away before the end; their slot was freed at the next cycle", cancelled.clone());
        let cycles = Counter::default();
        registry.register("cycles", "Draft-verify-commit cycles", cycles.clone());
        let drafted_tokens = Counter::default();
        registry.register("drafted_tokens", "Draft tokens proposed", drafted_tokens.clone());
        let accepted_tokens = Counter::default();
        registry.register("accepted_tokens", "Draft tokens accepted", accepted_tokens.clone());
        let accept_length = Histogram::new(linear_buckets(1.0, 1.0, max_block.clamp(1, 256) as u16));
        registry.register("accept_length", "Tokens committed per cycle (acc + 1)", accept_length.clone());
        let tau = Histogram::new(linear_buckets(1.0, 0.25, (4 * max_block.clamp(1, 256)) as u16));
        registry.register("tau", "Mean tokens per cycle of each finished request", tau.clone());
        let time_to_first_token = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register("time_to_first_token_seconds", "From the request's arrival to its first token", time_to_first_token.clone());
        let inter_token_latency = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register("inter_token_latency_seconds", "Time between output tokens (a cycle's gap spread over its tokens)", inter_token_latency.clone());
        let request_latency = Histogram::new(exponential_buckets(0.01, 2.0, 14));
        registry.register("request_latency_seconds", "From the request's arrival to its last token", request_latency.clone());
        let cycles_without_drafts = Counter::default();
        registry.register(
            "cycles_without_drafts",
            "Cycles decoded without drafting, the batch being at least --speculative-disable-by-batch-size",
            cycles_without_drafts.clone(),
        );
        let prefill_seconds = Counter::<f64, AtomicU64>::default();
        registry.register("engine_prefill_seconds", "Engine time spent prefilling admitted requests", prefill_seconds.clone());
        let draft_seconds = Counter::<f64, AtomicU64>::default();
        registry.register("engine_draft_seconds", "Engine time spent drafting", draft_seconds.clone());
        let verify_seconds = Counter::<f64, AtomicU64>::default();
        registry.register("engine_verify_seconds", "Engine time spent in verify forwards, verdicts and commits", verify_seconds.clone());
        let verify_batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 8));
        registry.register("verify_batch_size", "Requests whose blocks were verified in one target forward", verify_batch_size.clone());
        let queue_depth = Gauge::default();
        registry.register("queue_depth", "Requests waiting for a decode slot", queue_depth.clone());
        let active_requests = Gauge::default();
        registry.register("active_requests", "Requests being decoded", active_requests.clone());
        let tokens_per_second = Gauge::<f64, AtomicU64>::default();
        registry.register("tokens_per_second", "Tokens committed per second over the last 10 s", tokens_per_second.clone());
        Self {
            registry,
            requests,
            prompt_tokens,
            completion_tokens,
            cancelled,
            cycles,
            cycles_without_drafts,
            drafted_tokens,
            accepted_tokens,
            accept_length,
            tau,
            time_to_first_token,
            inter_token_latency,
            request_latency,
            prefill_seconds,
            draft_seconds,
            verify_seconds,
            verify_batch_size,
            queue_depth,
            active_requests,
            tokens_per_second,
            window: Mutex::new(VecDeque::new()),
        }
    }

    pub fn request(&self, endpoint: &str, status: u16) {
        self.requests.get_or_create(&RequestLabels { endpoint: endpoint.to_string(), status }).inc();
    }

    /// One cycle of the engine: k drafted, acc accepted, `committed` tokens out.
    pub fn cycle(&self, drafted: usize, accepted: usize, committed: usize) {
        self.cycles.inc();
        self.drafted_tokens.inc_by(drafted as u64);
        self.accepted_tokens.inc_by(accepted as u64);
        self.accept_length.observe((accepted + 1) as f64);
        self.add_tokens(committed);
    }

    /// Tokens committed now (a cycle's, or the first token of a prefill).
    pub fn add_tokens(&self, n: usize) {
        let now = Instant::now();
        let Ok(mut w) = self.window.lock() else { return };
        w.push_back((now, n));
        while w.front().is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW) {
            w.pop_front();
        }
        let total: usize = w.iter().map(|(_, n)| n).sum();
        self.tokens_per_second.set(total as f64 / RATE_WINDOW.as_secs_f64());
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        // Let the rate decay when nothing runs.
        self.add_tokens(0);
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
