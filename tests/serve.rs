//! `specauf serve` driven over HTTP on an ephemeral loopback port: streamed and whole answers,
//! T = 0 equality with `specauf generate`, every error class, a client that disconnects while
//! others continue, the metrics, the load generator, SIGTERM, and the official `openai` client.
//!
//! The target is the tiny llama fixture with a character tokenizer (tests/common), so a request
//! takes milliseconds.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use specauf::drafter::dflash::{DFlashDrafter, DFlashInitConfig};
use specauf::drafter::{AnyDrafter, DrafterPrecision, RunSettings};
use specauf::model::WeightsMode;
use specauf::serve::{self, loadgen, ServeOptions, ServerHandle};
use specauf::spec::{generate, GenerateConfig};

static SINGLE_THREAD: Once = Once::new();

/// The tiny model dir (with its tokenizer) and an untrained DFlash drafter for it (B = 4),
/// written once per test binary.
fn fixtures() -> &'static (PathBuf, PathBuf) {
    static DIRS: std::sync::OnceLock<(PathBuf, PathBuf)> = std::sync::OnceLock::new();
    DIRS.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("serve-fixtures");
        let model = common::tiny_model_dir(&root);
        let m = specauf::model::load_model(model.to_str().unwrap(), WeightsMode::Q8).unwrap();
        let drafter = DFlashDrafter::init_random(m.target.config(), &DFlashInitConfig::new(1, 4, 3), 7).unwrap();
        let ddir = root.join("drafter");
        drafter.save(&ddir).unwrap();
        (model, ddir)
    })
}

fn model_dir() -> &'static Path {
    &fixtures().0
}

fn drafter_dir() -> &'static Path {
    &fixtures().1
}

/// The tests' drafter runs: the whole vocabulary, the default cut and precision.
fn no_vocab() -> RunSettings {
    RunSettings { draft_vocab: 0, ..RunSettings::default() }
}

fn start(drafter: bool, opts: ServeOptions) -> ServerHandle {
    // Tiny forwards are ~10x slower on candle's thread pool on a shared 2-core machine.
    SINGLE_THREAD.call_once(|| {
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            std::env::set_var("RAYON_NUM_THREADS", "1");
        }
    });
    let d = drafter.then(drafter_dir);
    // The drafter's trained block, fixed: the tests count its rows (a chosen block is timed).
    let served = serve::load(model_dir().to_str().unwrap(), WeightsMode::Q8, Default::default(), d, drafter.then_some(4), &no_vocab()).unwrap();
    ServerHandle::spawn(served, opts, "127.0.0.1:0".parse().unwrap()).unwrap()
}

fn default_server(drafter: bool) -> ServerHandle {
    start(drafter, ServeOptions { shutdown_grace: Duration::from_secs(2), ..ServeOptions::default() })
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().no_proxy().timeout(Duration::from_secs(60)).build().unwrap()
}

fn post(s: &ServerHandle, path: &str, body: &Value) -> (u16, Value) {
    let r = client().post(format!("{}{path}", s.base_url())).json(body).send().unwrap();
    let status = r.status().as_u16();
    let text = r.text().unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}")))
}

/// The `data:` payloads of an SSE response, in order.
fn sse_events(r: reqwest::blocking::Response) -> Vec<String> {
    let mut out = Vec::new();
    for line in BufReader::new(r).lines() {
        let line = line.unwrap();
        if let Some(d) = line.strip_prefix("data: ") {
            out.push(d.to_string());
        }
    }
    out
}

fn model_name() -> String {
    model_dir().to_str().unwrap().to_string()
}

/// What the library's decode loop gives for `prompt_ids` at T = 0.
fn reference_text(prompt_ids: &[u32], max_new: usize, drafter: bool) -> (String, Vec<u32>) {
    let m = specauf::model::load_model(model_dir().to_str().unwrap(), WeightsMode::Q8).unwrap();
    let mut cfg = GenerateConfig::greedy(&m.target, max_new);
    for &id in m.tokenizer.eos_token_ids() {
        if !cfg.eos_token_ids.contains(&id) {
            cfg.eos_token_ids.push(id);
        }
    }
    let mut proposer = drafter.then(|| {
        let d = DFlashDrafter::load(drafter_dir(), m.target.config()).unwrap();
        specauf::drafter::DFlashProposer::new(d)
    });
    let out = generate(&m.target, proposer.as_mut().map(|p| p as &mut dyn specauf::spec::Proposer), prompt_ids, &cfg).unwrap();
    (m.tokenizer.decode(&out.token_ids, true).unwrap(), out.token_ids)
}

fn tokenizer() -> specauf::tokenizer::Tokenizer {
    specauf::model::load::load_info(model_dir().to_str().unwrap()).unwrap().tokenizer
}

#[test]
fn whole_answers_at_t0_are_the_decode_loops_text_with_and_without_a_drafter() {
    let tok = tokenizer();
    for drafter in [false, true] {
        let s = default_server(drafter);
        let prompt = "The cat sat on";
        let (status, v) = post(&s, "/v1/completions", &json!({"model": model_name(), "prompt": prompt, "max_tokens": 24, "temperature": 0}));
        assert_eq!(status, 200, "{v}");
        let ids = tok.encode(prompt, true).unwrap();
        let (want, want_ids) = reference_text(&ids, 24, drafter);
        assert_eq!(v["choices"][0]["text"], want, "drafter {drafter}: {v}");
        assert_eq!(v["object"], "text_completion");
        let u = &v["usage"];
        assert_eq!(u["prompt_tokens"], ids.len());
        assert_eq!(u["completion_tokens"], want_ids.len());
        assert_eq!(u["total_tokens"], ids.len() + want_ids.len());
        let sp = &u["speculative"];
        assert!(sp["cycles"].as_u64().unwrap() >= 1, "{u}");
        assert_eq!(sp["block_size"], if drafter { 4 } else { 1 });
        if drafter {
            assert_eq!(sp["acceptance_per_position"].as_array().unwrap().len(), 3, "{u}");
            assert!(sp["drafted_tokens"].as_u64().unwrap() >= sp["accepted_tokens"].as_u64().unwrap());
        }
        let tau = sp["tau"].as_f64().unwrap();
        assert!(tau >= 1.0, "{u}");

        let messages = vec![specauf::tokenizer::ChatMessage::user("hello there")];
        let (status, v) = post(
            &s,
            "/v1/chat/completions",
            &json!({"model": model_name(), "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 20, "temperature": 0.0, "some_future_field": {"x": 1}}),
        );
        assert_eq!(status, 200, "{v}");
        let ids = tok.encode_chat(&messages, true).unwrap();
        let (want, _) = reference_text(&ids, 20, drafter);
        assert_eq!(v["choices"][0]["message"]["content"], want, "{v}");
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert_eq!(v["object"], "chat.completion");
        assert!(["stop", "length"].contains(&v["choices"][0]["finish_reason"].as_str().unwrap()));
        s.shutdown().unwrap();
    }
}

#[test]
fn the_served_text_at_t0_equals_the_generate_command() {
    let s = default_server(true);
    let prompt = "Once upon a time";
    let out = Command::new(env!("CARGO_BIN_EXE_specauf"))
        .args(["generate", "--model", model_dir().to_str().unwrap(), "--prompt", prompt, "--max-new-tokens", "30", "--json"])
        .args(["--drafter", drafter_dir().to_str().unwrap()])
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let g: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let (status, v) = post(&s, "/v1/completions", &json!({"model": model_name(), "prompt": prompt, "max_tokens": 30, "temperature": 0}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], g["text"], "server {v}\ngenerate {g}");
    assert_eq!(v["usage"]["completion_tokens"], g["token_ids"].as_array().unwrap().len());
    assert_eq!(v["usage"]["speculative"]["cycles"], g["cycles"]);
}

#[test]
fn a_stream_concatenates_to_the_whole_answer_and_ends_with_done() {
    let s = default_server(true);
    for (path, body) in [
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "tell me a story"}], "max_tokens": 40, "temperature": 0})),
        ("/v1/completions", json!({"prompt": "tell me a story", "max_tokens": 40, "temperature": 0})),
    ] {
        let (status, whole) = post(&s, path, &body);
        assert_eq!(status, 200, "{whole}");
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        streamed["stream_options"] = json!({"include_usage": true});
        let r = client().post(format!("{}{path}", s.base_url())).json(&streamed).send().unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
        let events = sse_events(r);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
        let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
        let chat = path.contains("chat");
        let mut text = String::new();
        let mut finish = None;
        for c in &chunks {
            if let Some(choice) = c["choices"].as_array().and_then(|a| a.first()) {
                let piece = if chat { &choice["delta"]["content"] } else { &choice["text"] };
                text.push_str(piece.as_str().unwrap_or(""));
                if let Some(r) = choice["finish_reason"].as_str() {
                    finish = Some(r.to_string());
                }
            }
        }
        let want = if chat { &whole["choices"][0]["message"]["content"] } else { &whole["choices"][0]["text"] };
        assert_eq!(text, want.as_str().unwrap(), "{path}: {events:?}");
        assert_eq!(finish.as_deref(), whole["choices"][0]["finish_reason"].as_str());
        if chat {
            assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
            assert_eq!(chunks[0]["object"], "chat.completion.chunk");
        }
        // The usage chunk comes last, with no choices, and matches the whole answer's.
        let usage_chunk = chunks.last().unwrap();
        assert_eq!(usage_chunk["choices"].as_array().unwrap().len(), 0, "{usage_chunk}");
        assert_eq!(usage_chunk["usage"]["completion_tokens"], whole["usage"]["completion_tokens"]);
        assert_eq!(usage_chunk["usage"]["speculative"]["tau"], whole["usage"]["speculative"]["tau"]);
    }
}

#[test]
fn a_stop_sequence_ends_the_text_before_it() {
    let s = default_server(false);
    let body = json!({"prompt": "abc", "max_tokens": 60, "temperature": 0, "ignore_eos": true});
    let (_, whole) = post(&s, "/v1/completions", &body);
    let text = whole["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(text.chars().count() >= 10, "{whole}");
    // Stop at a piece from the middle of the text: the answer is everything before it.
    let chars: Vec<char> = text.chars().collect();
    let stop: String = chars[5..7].iter().collect();
    let cut = text.find(&stop).unwrap();
    let mut b = body.clone();
    b["stop"] = json!([stop, "\u{1}never"]);
    let (status, v) = post(&s, "/v1/completions", &b);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], &text[..cut], "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // Streamed, the same.
    b["stream"] = json!(true);
    let r = client().post(format!("{}/v1/completions", s.base_url())).json(&b).send().unwrap();
    let events = sse_events(r);
    let streamed: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(streamed, &text[..cut]);
}

fn assert_error(status: u16, v: &Value, want_status: u16, want_param: Option<&str>) {
    assert_eq!(status, want_status, "{v}");
    let e = v["error"].as_object().unwrap_or_else(|| panic!("not an OpenAI error: {v}"));
    for k in ["message", "type", "param", "code"] {
        assert!(e.contains_key(k), "{k} missing in {v}");
    }
    assert!(!e["message"].as_str().unwrap().is_empty());
    if let Some(p) = want_param {
        assert_eq!(e["param"], p, "{v}");
    }
}

#[test]
fn every_bad_request_gets_openais_error_shape_and_status() {
    let s = default_server(true);
    let url = format!("{}/v1/chat/completions", s.base_url());
    // Malformed JSON.
    let r = client().post(&url).header("content-type", "application/json").body("{\"messages\": [").send().unwrap();
    let status = r.status().as_u16();
    assert_error(status, &r.json().unwrap(), 400, None);
    let msgs = json!([{"role": "user", "content": "hi"}]);
    // Wrong types, a negative max_tokens, n > 1, a missing field, an unsupported part.
    for (body, param) in [
        (json!({"messages": msgs, "max_tokens": "ten"}), "max_tokens"),
        (json!({"messages": msgs, "temperature": [1]}), "temperature"),
        (json!({"messages": "hi"}), "messages"),
        (json!({"messages": msgs, "max_tokens": -1}), "max_tokens"),
        (json!({"messages": msgs, "n": 2}), "n"),
        (json!({"messages": msgs, "temperature": 5}), "temperature"),
        (json!({"messages": msgs, "top_p": 0}), "top_p"),
        (json!({"max_tokens": 3}), "messages"),
        (json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}), "messages[0].content[0].type"),
    ] {
        let (status, v) = post(&s, "/v1/chat/completions", &body);
        assert_error(status, &v, 400, Some(param));
    }
    let (status, v) = post(&s, "/v1/completions", &json!({"prompt": "hi", "max_tokens": -5}));
    assert_error(status, &v, 400, Some("max_tokens"));
    let (status, v) = post(&s, "/v1/completions", &json!({"prompt": 17}));
    assert_error(status, &v, 400, Some("prompt"));
    // A prompt past the context (512 positions), and a max_tokens past it.
    let long = "x".repeat(600);
    let (status, v) = post(&s, "/v1/completions", &json!({"prompt": long, "max_tokens": 4}));
    assert_error(status, &v, 400, None);
    assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
    let (status, v) = post(&s, "/v1/completions", &json!({"prompt": "hi", "max_tokens": 100000}));
    assert_error(status, &v, 400, None);
    // An unknown model, on the endpoints and on /v1/models/{id}.
    let (status, v) = post(&s, "/v1/chat/completions", &json!({"model": "gpt-4o", "messages": msgs}));
    assert_error(status, &v, 404, Some("model"));
    assert_eq!(v["error"]["code"], "model_not_found");
    let r = client().get(format!("{}/v1/models/gpt-4o", s.base_url())).send().unwrap();
    assert_error(r.status().as_u16(), &r.json().unwrap(), 404, None);
    // An unknown route.
    let r = client().get(format!("{}/v2/anything", s.base_url())).send().unwrap();
    assert_error(r.status().as_u16(), &r.json().unwrap(), 404, None);
    // A known route with the wrong method.
    let r = client().get(format!("{}/v1/chat/completions", s.base_url())).send().unwrap();
    assert_error(r.status().as_u16(), &r.json().unwrap(), 405, None);
    // A body that is not UTF-8 JSON.
    let r = client().post(&url).header("content-type", "application/json").body(vec![0xffu8, 0xfe, 0x00]).send().unwrap();
    let status = r.status().as_u16();
    assert_error(status, &r.json().unwrap(), 400, None);
    // After all that, the server still answers.
    let (status, v) = post(&s, "/v1/chat/completions", &json!({"messages": msgs, "max_tokens": 4}));
    assert_eq!(status, 200, "{v}");
}

#[test]
fn a_set_api_key_is_required_on_v1_but_not_on_health_and_metrics() {
    let s = start(false, ServeOptions { api_key: Some("sekrit".into()), shutdown_grace: Duration::from_secs(2), ..ServeOptions::default() });
    let body = json!({"prompt": "hi", "max_tokens": 3});
    let url = format!("{}/v1/completions", s.base_url());
    for auth in [None, Some("Bearer wrong"), Some("sekrit")] {
        let mut req = client().post(&url).json(&body);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let r = req.send().unwrap();
        let status = r.status().as_u16();
        assert_error(status, &r.json().unwrap(), 401, None);
    }
    let r = client().post(&url).bearer_auth("sekrit").json(&body).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = client().get(format!("{}/v1/models", s.base_url())).send().unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(client().get(format!("{}/health", s.base_url())).send().unwrap().status().as_u16(), 200);
    assert_eq!(client().get(format!("{}/metrics", s.base_url())).send().unwrap().status().as_u16(), 200);
}

#[test]
fn past_the_queue_limit_the_server_answers_503_and_serves_the_rest() {
    let s = start(false, ServeOptions { max_concurrency: 1, max_queue: 1, shutdown_grace: Duration::from_secs(2), ..ServeOptions::default() });
    let url = format!("{}/v1/completions", s.base_url());
    let body = json!({"prompt": "hi", "max_tokens": 400, "temperature": 0, "ignore_eos": true});
    let handles: Vec<_> = (0..12)
        .map(|_| {
            let (url, body) = (url.clone(), body.clone());
            std::thread::spawn(move || {
                let r = client().post(&url).json(&body).send().unwrap();
                let status = r.status().as_u16();
                (status, r.json::<Value>().unwrap())
            })
        })
        .collect();
    let results: Vec<(u16, Value)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ok = results.iter().filter(|(s, _)| *s == 200).count();
    let overloaded: Vec<&(u16, Value)> = results.iter().filter(|(s, _)| *s == 503).collect();
    assert_eq!(ok + overloaded.len(), 12, "{results:?}");
    assert!(ok >= 1 && !overloaded.is_empty(), "ok {ok}, 503 {}", overloaded.len());
    assert_error(503, &overloaded[0].1, 503, None);
    for (_, v) in results.iter().filter(|(s, _)| *s == 200) {
        assert_eq!(v["usage"]["completion_tokens"], 400);
    }
}

/// A metric's value from the text exposition (the first sample whose line starts with `name`).
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
}

#[test]
fn a_client_that_disconnects_mid_stream_is_cancelled_while_the_others_finish() {
    let s = start(true, ServeOptions { max_concurrency: 2, shutdown_grace: Duration::from_secs(2), ..ServeOptions::default() });
    let base = s.base_url();
    // A long stream that goes away after its first chunks.
    let long = json!({"prompt": "a long one", "max_tokens": 480, "stream": true, "ignore_eos": true});
    let r = client().post(format!("{base}/v1/completions")).json(&long).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let mut reader = BufReader::new(r);
    let mut line = String::new();
    let mut seen = 0;
    while seen < 2 {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if line.starts_with("data: ") {
            seen += 1;
        }
    }
    drop(reader);
    // Others keep being served meanwhile, with the right text.
    let tok = tokenizer();
    let others: Vec<_> = (0..3)
        .map(|i| {
            let base = base.clone();
            std::thread::spawn(move || {
                let prompt = format!("other {i}");
                let r = client().post(format!("{base}/v1/completions")).json(&json!({"prompt": prompt, "max_tokens": 16, "temperature": 0})).send().unwrap();
                (prompt, r.status().as_u16(), r.json::<Value>().unwrap())
            })
        })
        .collect();
    for h in others {
        let (prompt, status, v) = h.join().unwrap();
        assert_eq!(status, 200, "{v}");
        let (want, _) = reference_text(&tok.encode(&prompt, true).unwrap(), 16, true);
        assert_eq!(v["choices"][0]["text"], want);
    }
    // A whole (not streamed) request whose client gives up is dropped too.
    let impatient = reqwest::blocking::Client::builder().no_proxy().timeout(Duration::from_millis(30)).build().unwrap();
    let r = impatient.post(format!("{base}/v1/completions")).json(&json!({"prompt": "patience", "max_tokens": 480, "ignore_eos": true})).send();
    assert!(r.is_err(), "the request should have timed out on the client side");
    // Both dropped requests were cancelled, not decoded to their end.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = client().get(format!("{base}/metrics")).send().unwrap().text().unwrap();
        let cancelled = metric(&text, "specauf_cancelled_requests_total").unwrap_or(0.0);
        if cancelled >= 2.0 {
            assert_eq!(metric(&text, "specauf_active_requests"), Some(0.0), "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "no cancellation recorded:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn models_health_and_metrics_describe_the_server() {
    let s = start(true, ServeOptions { served_model_name: Some("tiny".into()), shutdown_grace: Duration::from_secs(2), ..ServeOptions::default() });
    let base = s.base_url();
    let v: Value = client().get(format!("{base}/v1/models")).send().unwrap().json().unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "tiny");
    let v: Value = client().get(format!("{base}/v1/models/tiny")).send().unwrap().json().unwrap();
    assert_eq!(v["id"], "tiny");
    let v: Value = client().get(format!("{base}/health")).send().unwrap().json().unwrap();
    assert_eq!(v["status"], "ok");
    // The served name is the one requests must use.
    let (status, _) = post(&s, "/v1/completions", &json!({"model": model_name(), "prompt": "x", "max_tokens": 2}));
    assert_eq!(status, 404);
    let r = client().post(format!("{base}/v1/completions")).json(&json!({"model": "tiny", "prompt": "hello", "max_tokens": 12, "stream": true})).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(sse_events(r).last().map(String::as_str), Some("[DONE]"));
    let r = client().get(format!("{base}/metrics")).send().unwrap();
    assert!(r.headers()["content-type"].to_str().unwrap().contains("openmetrics-text"));
    let text = r.text().unwrap();
    for name in [
        "specauf_requests_total{endpoint=\"completions\",status=\"200\"}",
        "specauf_requests_total{endpoint=\"completions\",status=\"404\"}",
        "specauf_prompt_tokens_total",
        "specauf_completion_tokens_total",
        "specauf_cycles_total",
        "specauf_drafted_tokens_total",
        "specauf_accepted_tokens_total",
        "specauf_accept_length_bucket",
        "specauf_tau_bucket",
        "specauf_time_to_first_token_seconds_bucket",
        "specauf_inter_token_latency_seconds_bucket",
        "specauf_request_latency_seconds_bucket",
        "specauf_engine_prefill_seconds_total",
        "specauf_engine_draft_seconds_total",
        "specauf_engine_verify_seconds_total",
        "specauf_verify_batch_size_bucket",
        "specauf_queue_depth",
        "specauf_active_requests",
        "specauf_tokens_per_second",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    assert!(metric(&text, "specauf_completion_tokens_total").unwrap() >= 1.0, "{text}");
    assert!(metric(&text, "specauf_cycles_total").unwrap() >= 1.0, "{text}");
}

#[test]
fn the_load_generator_reports_no_errors_and_only_talks_to_loopback() {
    let s = default_server(true);
    let cfg = loadgen::LoadConfig {
        base_url: s.base_url(),
        model: model_name(),
        api_key: None,
        clients: 4,
        requests: 10,
        max_tokens: 24,
        temperature: 0.0,
        ignore_eos: false,
        prompts: vec!["one".into(), "two".into(), "three".into()],
        time_limit: Duration::from_secs(60),
    };
    let r = loadgen::run(&cfg).unwrap();
    assert_eq!(r.errors, 0, "{r:?}");
    assert_eq!(r.ok, 10);
    assert!(r.tokens_per_s > 0.0 && r.ttft_p50_ms > 0.0 && r.ttft_p99_ms >= r.ttft_p50_ms, "{r:?}");
    assert!(r.latency_p99_ms >= r.latency_p50_ms && r.tau >= 1.0, "{r:?}");
    let e = r.engine.as_ref().expect("engine time from /metrics");
    assert!(e.draft_s > 0.0 && e.verify_s > 0.0 && e.mean_verify_batch >= 1.0, "{e:?}");
    for url in ["http://10.0.0.1:8000", "http://example.com", "https://127.0.0.1:1"] {
        let mut c = cfg.clone();
        c.base_url = url.into();
        assert!(matches!(loadgen::run(&c), Err(loadgen::LoadError::NotLoopback { .. })), "{url}");
    }
}

#[test]
fn sigterm_stops_accepting_and_exits_zero_within_the_grace_period() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_specauf"))
        .args(["serve", "--model", model_dir().to_str().unwrap(), "--port", "0", "--shutdown-grace-s", "1"])
        .env("RAYON_NUM_THREADS", "1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let addr = line.split("http://").nth(1).and_then(|r| r.split_whitespace().next()).unwrap_or_else(|| panic!("no address in {line:?}")).to_string();
    let base = format!("http://{addr}");
    assert_eq!(client().get(format!("{base}/health")).send().unwrap().status().as_u16(), 200);
    // A stream in flight when the signal comes: it is finished or cut within the grace.
    let r = client()
        .post(format!("{base}/v1/completions"))
        .json(&json!({"prompt": "x", "max_tokens": 480, "stream": true, "ignore_eos": true}))
        .send()
        .unwrap();
    let t0 = Instant::now();
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let mut body = String::new();
    let _ = BufReader::new(r).read_to_string(&mut body);
    let deadline = Instant::now() + Duration::from_secs(15);
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the server did not exit within 15 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "exit status {exit:?}");
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(body.contains("data: [DONE]"), "{body}");
    // It no longer accepts connections.
    assert!(client().get(format!("{base}/health")).send().is_err());
}

#[test]
fn the_official_openai_python_client_works_against_the_server() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = Command::new("python3").arg("--version").output();
    if !python.is_ok_and(|o| o.status.success()) {
        println!("SKIPPED: python3 is not available; the openai client check needs it");
        return;
    }
    let setup = Command::new("bash").arg(root.join("tools/openai_check/setup.sh")).stderr(Stdio::piped()).output().unwrap();
    if !setup.status.success() {
        println!("SKIPPED: could not set up the openai venv (no network to PyPI?): {}", String::from_utf8_lossy(&setup.stderr));
        return;
    }
    let venv_python = String::from_utf8(setup.stdout).unwrap().trim().lines().last().unwrap_or("").to_string();
    let s = default_server(true);
    let out = Command::new(&venv_python)
        .arg(root.join("tools/openai_check/check.py"))
        .args(["--base-url", &format!("{}/v1", s.base_url()), "--model", &model_name()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "check.py failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("openai check: ok"), "{stdout}");
    println!("{}", stdout.trim());
}

#[test]
fn concurrent_requests_decoded_together_each_get_their_own_t0_text() {
    let s = start(true, ServeOptions { max_concurrency: 6, shutdown_grace: Duration::from_secs(2), ..ServeOptions::default() });
    let base = s.base_url();
    let tok = tokenizer();
    let handles: Vec<_> = (0..6)
        .map(|i| {
            let base = base.clone();
            std::thread::spawn(move || {
                let prompt = format!("request number {i} says {}", "ab".repeat(i));
                let body = json!({"prompt": prompt, "max_tokens": 20 + 5 * i, "temperature": 0, "stream": i % 2 == 0});
                let r = client().post(format!("{base}/v1/completions")).json(&body).send().unwrap();
                assert_eq!(r.status().as_u16(), 200);
                let text = if i % 2 == 0 {
                    let events = sse_events(r);
                    events[..events.len() - 1]
                        .iter()
                        .map(|e| serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"].as_str().unwrap_or("").to_string())
                        .collect::<String>()
                } else {
                    r.json::<Value>().unwrap()["choices"][0]["text"].as_str().unwrap().to_string()
                };
                (prompt, 20 + 5 * i, text)
            })
        })
        .collect();
    for h in handles {
        let (prompt, max, text) = h.join().unwrap();
        let (want, _) = reference_text(&tok.encode(&prompt, true).unwrap(), max, true);
        assert_eq!(text, want, "{prompt}");
    }
    // They were verified together: some target forward held more than one request's block.
    let text = client().get(format!("{base}/metrics")).send().unwrap().text().unwrap();
    let (sum, count) = (metric(&text, "specauf_verify_batch_size_sum").unwrap(), metric(&text, "specauf_verify_batch_size_count").unwrap());
    assert!(sum > count, "no batched verify: {sum} blocks in {count} forwards");
}

#[test]
fn from_the_disable_batch_size_on_cycles_are_plain_decode_steps_with_the_same_text() {
    // Batch size 1: every cycle runs without drafts.
    let s = start(true, ServeOptions { speculative_disable_by_batch_size: 1, shutdown_grace: Duration::from_secs(2), ..ServeOptions::default() });
    let base = s.base_url();
    let tok = tokenizer();
    let prompt = "a request decoded without drafts";
    let body = json!({"prompt": prompt, "max_tokens": 16, "temperature": 0});
    let r = client().post(format!("{base}/v1/completions")).json(&body).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let text = r.json::<Value>().unwrap()["choices"][0]["text"].as_str().unwrap().to_string();
    let (want, _) = reference_text(&tok.encode(prompt, true).unwrap(), 16, true);
    assert_eq!(text, want);
    let m = client().get(format!("{base}/metrics")).send().unwrap().text().unwrap();
    let plain = metric(&m, "specauf_cycles_without_drafts_total").unwrap();
    assert!(plain >= 1.0, "no cycle ran without drafts");
    assert_eq!(metric(&m, "specauf_cycles_total"), Some(plain), "every cycle ran without drafts");
    assert_eq!(metric(&m, "specauf_drafted_tokens_total"), Some(0.0), "nothing was drafted");
}

/// Without --block-size the server chooses the block size (and the draft cut) as `generate`
/// does, and says how; with it, nothing is chosen.
#[test]
fn the_server_chooses_the_block_size_unless_it_is_given() {
    let model = model_dir().to_str().unwrap();
    let chosen = serve::load(model, WeightsMode::Q8, Default::default(), Some(drafter_dir()), None, &no_vocab()).unwrap();
    let c = chosen.block_choice.expect("a choice without --block-size");
    let d = chosen.drafter.unwrap();
    assert!((2..=4).contains(&d.block_size()) && d.block_size() == c.block_size, "{}", c.summary(4));
    let fixed = serve::load(model, WeightsMode::Q8, Default::default(), Some(drafter_dir()), Some(3), &RunSettings { draft_p_min: Some(0.2), precision: DrafterPrecision::Int8, ..no_vocab() }).unwrap();
    assert!(fixed.block_choice.is_none());
    let d = fixed.drafter.unwrap();
    assert_eq!(d.block_size(), 3);
    let AnyDrafter::DFlash(d) = d else { panic!("a DFlash fixture") };
    assert_eq!((d.draft_p_min(), d.inference_precision()), (0.2, DrafterPrecision::Int8), "the run settings reach the drafter");
    let bad = serve::load(model, WeightsMode::Q8, Default::default(), Some(drafter_dir()), Some(3), &RunSettings { draft_p_min: Some(1.5), ..no_vocab() });
    assert!(bad.err().unwrap().to_string().contains("--draft-p-min"));
}
