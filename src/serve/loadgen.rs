//! The load generator of `specauf bench serve`: N concurrent clients send M streamed chat
//! completions in all, and the report gives throughput, time to first token and latency
//! percentiles, errors and τ.
//!
//! It only talks to loopback (127.0.0.1, ::1, localhost), sends a bounded number of requests
//! and gives up after a time limit: it cannot be pointed at someone else's server.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// `http://127.0.0.1:PORT`
    pub base_url: String,
    pub model: String,
    pub api_key: Option<String>,
    /// Concurrent streams.
    pub clients: usize,
    /// Requests in all.
    pub requests: usize,
    pub max_tokens: usize,
    pub temperature: f32,
    /// Generate max_tokens every time, past EOS (fixed-length load).
    pub ignore_eos: bool,
    /// Request i sends prompts[i % len] as the user message.
    pub prompts: Vec<String>,
    /// The whole run stops after this; unfinished requests count as errors.
    pub time_limit: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{url}: the load generator only sends to loopback (127.0.0.1, ::1, localhost)")]
    NotLoopback { url: String },
    #[error("{url}: not a URL: {what}")]
    BadUrl { url: String, what: String },
    #[error("invalid load: {0}")]
    Invalid(String),
    #[error("starting the client: {0}")]
    Start(String),
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub clients: usize,
    pub requests: usize,
    pub ok: usize,
    pub errors: usize,
    /// Up to five error messages.
    pub error_samples: Vec<String>,
    pub wall_s: f64,
    pub completion_tokens: usize,
    /// Completion tokens of all requests per second of wall time.
    pub tokens_per_s: f64,
    pub requests_per_s: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    /// Mean of the requests' τ (from `usage.speculative`).
    pub tau: f64,
    pub cycles: usize,
    pub drafted_tokens: usize,
    pub accepted_tokens: usize,
    /// Where a specauf server's engine spent the run (from /metrics before and after; None
    /// when the server has no such metrics).
    pub engine: Option<EngineTime>,
}

/// Engine seconds by phase over a run, and the mean number of blocks per verify forward.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EngineTime {
    pub prefill_s: f64,
    pub draft_s: f64,
    pub verify_s: f64,
    pub mean_verify_batch: f64,
}

const ENGINE_METRICS: [&str; 5] = [
    "specauf_engine_prefill_seconds_total",
    "specauf_engine_draft_seconds_total",
    "specauf_engine_verify_seconds_total",
    "specauf_verify_batch_size_sum",
    "specauf_verify_batch_size_count",
];

/// The engine counters of a specauf server's /metrics.
async fn engine_counters(client: &reqwest::Client, base: &reqwest::Url, api_key: Option<&str>) -> Option<[f64; 5]> {
    let url = base.join("metrics").ok()?;
    let mut req = client.get(url);
    if let Some(k) = api_key {
        req = req.bearer_auth(k);
    }
    let text = req.send().await.ok()?.text().await.ok()?;
    let mut out = [0.0; 5];
    for (slot, name) in out.iter_mut().zip(ENGINE_METRICS) {
        let line = text.lines().find(|l| l.split(' ').next() == Some(name))?;
        *slot = line.rsplit(' ').next()?.parse().ok()?;
    }
    Some(out)
}

#[derive(Debug, Default)]
struct One {
    ttft: Option<Duration>,
    latency: Duration,
    completion_tokens: usize,
    tau: f64,
    cycles: usize,
    drafted: usize,
    accepted: usize,
}

pub fn check_loopback(url: &str) -> Result<reqwest::Url, LoadError> {
    let parsed = reqwest::Url::parse(url).map_err(|e| LoadError::BadUrl { url: url.to_string(), what: e.to_string() })?;
    let ok = match parsed.host_str() {
        Some("localhost") => true,
        Some(h) => h.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback()),
        None => false,
    };
    if !ok || parsed.scheme() != "http" {
        return Err(LoadError::NotLoopback { url: url.to_string() });
    }
    Ok(parsed)
}

/// Runs the load and waits for it (builds its own async runtime).
pub fn run(cfg: &LoadConfig) -> Result<LoadReport, LoadError> {
    let base = check_loopback(&cfg.base_url)?;
    if cfg.clients == 0 || cfg.requests == 0 || cfg.prompts.is_empty() || cfg.max_tokens == 0 {
        return Err(LoadError::Invalid("clients, requests, max_tokens and the prompts must all be at least 1".into()));
    }
    let url = base.join("v1/chat/completions").map_err(|e| LoadError::BadUrl { url: cfg.base_url.clone(), what: e.to_string() })?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| LoadError::Start(e.to_string()))?;
    let client = reqwest::Client::builder().no_proxy().build().map_err(|e| LoadError::Start(e.to_string()))?;
    let next = Arc::new(AtomicUsize::new(0));
    let cfg = Arc::new(cfg.clone());
    let before = rt.block_on(engine_counters(&client, &base, cfg.api_key.as_deref()));
    let t0 = Instant::now();
    let results: Vec<Result<One, String>> = rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..cfg.clients {
            let (client, url, next, cfg) = (client.clone(), url.clone(), next.clone(), cfg.clone());
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= cfg.requests {
                        break;
                    }
                    let left = cfg.time_limit.saturating_sub(t0.elapsed());
                    let r = match tokio::time::timeout(left, one_request(&client, url.clone(), &cfg, i)).await {
                        Ok(r) => r,
                        Err(_) => Err(format!("request {i}: past the time limit of {:?}", cfg.time_limit)),
                    };
                    out.push(r);
                }
                out
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            match t.await {
                Ok(v) => all.extend(v),
                Err(e) => all.push(Err(format!("client task: {e}"))),
            }
        }
        all
    });
    let wall = t0.elapsed();
    let after = rt.block_on(engine_counters(&client, &base, cfg.api_key.as_deref()));
    let mut r = report(&cfg, &results, wall);
    if let (Some(b), Some(a)) = (before, after) {
        let d: Vec<f64> = a.iter().zip(&b).map(|(a, b)| a - b).collect();
        r.engine = Some(EngineTime { prefill_s: d[0], draft_s: d[1], verify_s: d[2], mean_verify_batch: if d[4] > 0.0 { d[3] / d[4] } else { 0.0 } });
    }
    Ok(r)
}

fn report(cfg: &LoadConfig, results: &[Result<One, String>], wall: Duration) -> LoadReport {
    let ok: Vec<&One> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    let errors: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    let mut ttft: Vec<f64> = ok.iter().filter_map(|o| o.ttft.map(|d| d.as_secs_f64() * 1e3)).collect();
    let mut lat: Vec<f64> = ok.iter().map(|o| o.latency.as_secs_f64() * 1e3).collect();
    let tokens: usize = ok.iter().map(|o| o.completion_tokens).sum();
    let wall_s = wall.as_secs_f64();
    let with_cycles: Vec<&&One> = ok.iter().filter(|o| o.cycles > 0).collect();
    LoadReport {
        clients: cfg.clients,
        requests: results.len(),
        ok: ok.len(),
        errors: errors.len() + cfg.requests.saturating_sub(results.len()),
        error_samples: errors.iter().take(5).map(|s| s.to_string()).collect(),
        wall_s,
        completion_tokens: tokens,
        tokens_per_s: if wall_s > 0.0 { tokens as f64 / wall_s } else { 0.0 },
        requests_per_s: if wall_s > 0.0 { ok.len() as f64 / wall_s } else { 0.0 },
        ttft_p50_ms: percentile(&mut ttft, 50.0),
        ttft_p99_ms: percentile(&mut ttft, 99.0),
        latency_p50_ms: percentile(&mut lat, 50.0),
        latency_p99_ms: percentile(&mut lat, 99.0),
        tau: if with_cycles.is_empty() { 0.0 } else { with_cycles.iter().map(|o| o.tau).sum::<f64>() / with_cycles.len() as f64 },
        cycles: ok.iter().map(|o| o.cycles).sum(),
        drafted_tokens: ok.iter().map(|o| o.drafted).sum(),
        accepted_tokens: ok.iter().map(|o| o.accepted).sum(),
        engine: None,
    }
}

/// Nearest-rank percentile; 0 for no samples.
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

async fn one_request(client: &reqwest::Client, url: reqwest::Url, cfg: &LoadConfig, i: usize) -> Result<One, String> {
    let body = serde_json::json!({
        "model": cfg.model,
        "messages": [{"role": "user", "content": cfg.prompts[i % cfg.prompts.len()]}],
        "max_tokens": cfg.max_tokens,
        "temperature": cfg.temperature,
        "seed": i,
        "ignore_eos": cfg.ignore_eos,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let t0 = Instant::now();
    let mut req = client.post(url).json(&body);
    if let Some(key) = &cfg.api_key {
        req = req.bearer_auth(key);
    }
    let mut resp = req.send().await.map_err(|e| format!("request {i}: {e}"))?;
    if !resp.status().is_success() {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        return Err(format!("request {i}: HTTP {status}: {text}"));
    }
    let mut one = One::default();
    let mut buf: Vec<u8> = Vec::new();
    let mut done = false;
    while let Some(bytes) = resp.chunk().await.map_err(|e| format!("request {i}: reading the stream: {e}"))? {
        buf.extend_from_slice(&bytes);
        while let Some(pos) = find(&buf, b"\n\n") {
            let event: Vec<u8> = buf.drain(..pos + 2).collect();
            let event = String::from_utf8_lossy(&event);
            for line in event.lines() {
                let Some(data) = line.strip_prefix("data: ").or_else(|| line.strip_prefix("data:")) else { continue };
                if data.trim() == "[DONE]" {
                    done = true;
                    continue;
                }
                let v: serde_json::Value = serde_json::from_str(data).map_err(|e| format!("request {i}: a chunk is not JSON ({e}): {data}"))?;
                if let Some(err) = v.get("error") {
                    return Err(format!("request {i}: error event: {err}"));
                }
                let has_text = v["choices"][0]["delta"]["content"].as_str().is_some_and(|s| !s.is_empty());
                if has_text && one.ttft.is_none() {
                    one.ttft = Some(t0.elapsed());
                }
                if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                    one.completion_tokens = u["completion_tokens"].as_u64().unwrap_or(0) as usize;
                    let s = &u["speculative"];
                    one.tau = s["tau"].as_f64().unwrap_or(0.0);
                    one.cycles = s["cycles"].as_u64().unwrap_or(0) as usize;
                    one.drafted = s["drafted_tokens"].as_u64().unwrap_or(0) as usize;
                    one.accepted = s["accepted_tokens"].as_u64().unwrap_or(0) as usize;
                }
            }
        }
    }
    if !done {
        return Err(format!("request {i}: the stream ended without data: [DONE]"));
    }
    one.latency = t0.elapsed();
    Ok(one)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
