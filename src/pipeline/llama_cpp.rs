//! llama.cpp as a peer to measure (never a dependency): runs its binaries from a build
//! directory (`tools/llama_cpp/build.sh` makes one) and parses what they print.
//!
//! - `llama-bench -o json`: prompt processing (ppN) and generation (tgN) tokens/s;
//! - `llama-speculative-simple --spec-type draft-dflash`: tokens/s and the drafted / accepted
//!   counts of one speculative generation;
//! - `llama-server`'s `/completion` with a prompt of token ids: its greedy tokens.
//!
//! A missing binary, a failed run, or output that cannot be parsed is a [`PeerError`] that says
//! which binary and what it printed.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("llama.cpp directory {0} does not exist (build one with tools/llama_cpp/build.sh DIR)")]
    NoDir(PathBuf),
    #[error("llama.cpp directory {dir} has no `{name}` (looked in {dir} and {dir}/bin; tools/llama_cpp/build.sh builds it)")]
    MissingBinary { dir: PathBuf, name: String },
    #[error("running {binary}: {source}")]
    Spawn { binary: PathBuf, source: std::io::Error },
    #[error("{binary} exited with {status}; the last of its output:\n{tail}")]
    Failed { binary: String, status: String, tail: String },
    #[error("cannot parse the output of {binary}: {what}; the last of its output:\n{tail}")]
    Parse { binary: String, what: String, tail: String },
    #[error("llama-server: {0}")]
    Server(String),
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

fn parse_err(binary: &str, what: impl Into<String>, text: &str) -> PeerError {
    PeerError::Parse { binary: binary.into(), what: what.into(), tail: tail(text) }
}

/// A llama.cpp build: a directory holding its binaries (directly or under `bin/`).
#[derive(Debug, Clone)]
pub struct LlamaCpp {
    dir: PathBuf,
}

impl LlamaCpp {
    pub fn new(dir: &Path) -> Result<Self, PeerError> {
        if !dir.is_dir() {
            return Err(PeerError::NoDir(dir.to_path_buf()));
        }
        Ok(Self { dir: dir.to_path_buf() })
    }

    /// The path of binary `name`, or [`PeerError::MissingBinary`].
    pub fn binary(&self, name: &str) -> Result<PathBuf, PeerError> {
        [self.dir.join(name), self.dir.join("bin").join(name)]
            .into_iter()
            .find(|p| p.is_file())
            .ok_or_else(|| PeerError::MissingBinary { dir: self.dir.clone(), name: name.into() })
    }

    /// Runs `name args`, returns stdout and stderr; a non-zero exit is an error.
    fn run(&self, name: &str, args: &[String]) -> Result<(String, String), PeerError> {
        self.run_measured(name, args).map(|(out, err, _)| (out, err))
    }

    /// [`Self::run`], and the process's peak resident memory in MiB.
    fn run_measured(&self, name: &str, args: &[String]) -> Result<(String, String, Option<f64>), PeerError> {
        let binary = self.binary(name)?;
        let (out, peak) = crate::util::measure::run_measuring_rss(Command::new(&binary).args(args).stdin(Stdio::null()))
            .map_err(|source| PeerError::Spawn { binary: binary.clone(), source })?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            return Err(PeerError::Failed { binary: name.into(), status: out.status.to_string(), tail: tail(&format!("{stdout}\n{stderr}")) });
        }
        Ok((stdout, stderr, peak))
    }

    /// `llama-bench` on `model` with `threads` threads: one ppN test per `prompts` entry and one
    /// tg`gen` test, each `reps` times, at context depth `depth`.
    pub fn bench(&self, model: &Path, threads: usize, prompts: &[usize], gen: usize, depth: usize, reps: usize) -> Result<Vec<BenchRecord>, PeerError> {
        let list = |v: &[usize]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",");
        let args: Vec<String> = vec![
            "-m".into(),
            model.display().to_string(),
            "-t".into(),
            threads.to_string(),
            "-p".into(),
            list(prompts),
            "-n".into(),
            gen.to_string(),
            "-d".into(),
            depth.to_string(),
            "-r".into(),
            reps.to_string(),
            "-o".into(),
            "json".into(),
        ];
        let (stdout, _) = self.run("llama-bench", &args)?;
        parse_llama_bench_json(&stdout)
    }

    /// One `llama-speculative-simple --spec-type draft-dflash` generation of `n_predict` tokens
    /// at T = 0 from the prompt text in `prompt_file`, drafting up to `draft_max` tokens a cycle.
    pub fn speculative(&self, req: &SpecRequest) -> Result<SpecRun, PeerError> {
        let t = req.threads.to_string();
        let args: Vec<String> = [
            "-m",
            &req.target.display().to_string(),
            "-md",
            &req.drafter.display().to_string(),
            "--spec-type",
            "draft-dflash",
            "--spec-draft-n-max",
            &req.draft_max.to_string(),
            "-f",
            &req.prompt_file.display().to_string(),
            "-n",
            &req.n_predict.to_string(),
            "--temp",
            "0",
            "--top-k",
            "1",
            "-t",
            &t,
            "-td",
            &t,
            "-c",
            "2048",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (stdout, stderr, peak) = self.run_measured("llama-speculative-simple", &args)?;
        Ok(SpecRun { peak_rss_mib: peak, ..parse_speculative(&format!("{stdout}\n{stderr}"))? })
    }
}

/// What one `llama-speculative-simple` run needs.
#[derive(Debug, Clone)]
pub struct SpecRequest {
    pub target: PathBuf,
    pub drafter: PathBuf,
    pub prompt_file: PathBuf,
    pub n_predict: usize,
    pub draft_max: usize,
    pub threads: usize,
}

/// One llama-bench test.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BenchRecord {
    pub n_prompt: usize,
    pub n_gen: usize,
    pub n_depth: usize,
    pub n_threads: usize,
    /// Tokens/s of each repetition.
    pub samples_ts: Vec<f64>,
}

impl BenchRecord {
    /// "pp8", "tg64".
    pub fn name(&self) -> String {
        if self.n_gen > 0 {
            format!("tg{}", self.n_gen)
        } else {
            format!("pp{}", self.n_prompt)
        }
    }
}

/// Parses `llama-bench -o json` (a JSON array of tests; anything before the `[` is ignored).
pub fn parse_llama_bench_json(text: &str) -> Result<Vec<BenchRecord>, PeerError> {
    const BIN: &str = "llama-bench";
    let start = text.find('[').ok_or_else(|| parse_err(BIN, "no JSON array", text))?;
    let v: serde_json::Value = serde_json::from_str(text[start..].trim()).map_err(|e| parse_err(BIN, format!("invalid JSON: {e}"), text))?;
    let tests = v.as_array().ok_or_else(|| parse_err(BIN, "not a JSON array", text))?;
    if tests.is_empty() {
        return Err(parse_err(BIN, "no tests in the output", text));
    }
    let field = |t: &serde_json::Value, k: &str| -> Result<usize, PeerError> {
        t[k].as_u64().map(|x| x as usize).ok_or_else(|| parse_err(BIN, format!("a test has no integer `{k}`"), text))
    };
    tests
        .iter()
        .map(|t| {
            let samples_ts: Vec<f64> = t["samples_ts"]
                .as_array()
                .ok_or_else(|| parse_err(BIN, "a test has no `samples_ts`", text))?
                .iter()
                .map(|x| x.as_f64().filter(|x| x.is_finite() && *x > 0.0))
                .collect::<Option<_>>()
                .ok_or_else(|| parse_err(BIN, "`samples_ts` holds a value that is not a positive number", text))?;
            if samples_ts.is_empty() {
                return Err(parse_err(BIN, "a test has no samples", text));
            }
            Ok(BenchRecord { n_prompt: field(t, "n_prompt")?, n_gen: field(t, "n_gen")?, n_depth: field(t, "n_depth")?, n_threads: field(t, "n_threads")?, samples_ts })
        })
        .collect()
}

/// What `llama-speculative-simple` reports for one generation.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SpecRun {
    /// Tokens generated after the prompt (`n_predict`).
    pub n_predict: usize,
    /// Seconds of the decode loop (after the prompt), as it prints it.
    pub decode_s: f64,
    /// `n_draft`: the most draft tokens per cycle.
    pub n_draft_max: usize,
    pub n_drafted: usize,
    pub n_accept: usize,
    /// Peak resident memory of the process (target + drafter loaded, decoding), MiB.
    pub peak_rss_mib: Option<f64>,
}

impl SpecRun {
    pub fn tokens_per_s(&self) -> f64 {
        self.n_predict as f64 / self.decode_s
    }

    /// Verify cycles. llama-speculative-simple does not print them; every cycle drafts
    /// `n_draft_max` tokens except where fewer remain before the token limit, so this is
    /// ⌈n_drafted / n_draft_max⌉ (exact when only the last cycle is short).
    pub fn cycles(&self) -> usize {
        self.n_drafted.div_ceil(self.n_draft_max.max(1)).max(1)
    }

    /// Mean tokens committed per cycle, as our τ (accepted drafts + the target's own token).
    pub fn tau(&self) -> f64 {
        self.n_predict as f64 / self.cycles() as f64
    }
}

/// Parses the summary that `llama-speculative-simple` logs at the end of a run.
pub fn parse_speculative(text: &str) -> Result<SpecRun, PeerError> {
    const BIN: &str = "llama-speculative-simple";
    let after = |key: &str| -> Option<&str> {
        text.lines().rev().find_map(|l| {
            let i = l.find(key)?;
            Some(l[i + key.len()..].trim())
        })
    };
    let int = |key: &str| -> Result<usize, PeerError> {
        let rest = after(key).ok_or_else(|| parse_err(BIN, format!("no `{}` line", key.trim_end_matches(['=', ' '])), text))?;
        rest.split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| parse_err(BIN, format!("`{key}` is not followed by an integer"), text))
    };
    // "decoded   64 tokens in    1.234 seconds, speed:   51.860 t/s"
    let decoded = after("decoded ").ok_or_else(|| parse_err(BIN, "no `decoded N tokens in S seconds` line", text))?;
    let words: Vec<&str> = decoded.split_whitespace().collect();
    let decode_s: f64 = match words.as_slice() {
        [_, "tokens", "in", s, "seconds,", ..] => s.parse().ok(),
        _ => None,
    }
    .filter(|s: &f64| s.is_finite() && *s > 0.0)
    .ok_or_else(|| parse_err(BIN, "the `decoded` line has no positive duration", text))?;
    let run = SpecRun { n_predict: int("n_predict =")?, decode_s, n_draft_max: int("n_draft   =")?, n_drafted: int("n_drafted =")?, n_accept: int("n_accept  =")?, peak_rss_mib: None };
    if run.n_predict == 0 {
        return Err(parse_err(BIN, "n_predict is 0", text));
    }
    Ok(run)
}

/// A `llama-server` child on a loopback port, killed when dropped.
pub struct LlamaServer {
    child: Child,
    base_url: String,
    client: reqwest::blocking::Client,
}

impl LlamaServer {
    /// Starts `llama-server -m model` on a free loopback port with `threads` threads and waits
    /// (up to `timeout`) until `/health` answers.
    pub fn start(llama: &LlamaCpp, model: &Path, threads: usize, timeout: Duration) -> Result<Self, PeerError> {
        let binary = llama.binary("llama-server")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| PeerError::Server(format!("no free loopback port: {e}")))?
            .port();
        let child = Command::new(&binary)
            .args(["-m", &model.display().to_string(), "--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["-t", &threads.to_string(), "-tb", &threads.to_string(), "-c", "2048", "-np", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| PeerError::Spawn { binary, source })?;
        let client = reqwest::blocking::Client::builder().no_proxy().timeout(Duration::from_secs(300)).build().map_err(|e| PeerError::Server(e.to_string()))?;
        let mut server = Self { child, base_url: format!("http://127.0.0.1:{port}"), client };
        server.wait_healthy(timeout)?;
        Ok(server)
    }

    fn wait_healthy(&mut self, timeout: Duration) -> Result<(), PeerError> {
        let t = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                return Err(PeerError::Failed { binary: "llama-server".into(), status: status.to_string(), tail: tail(&err) });
            }
            if let Ok(r) = self.client.get(format!("{}/health", self.base_url)).send() {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if t.elapsed() > timeout {
                return Err(PeerError::Server(format!("not healthy after {:.0} s", timeout.as_secs_f64())));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The greedy continuation of the token ids `prompt`, up to `n_predict` tokens (it stops at
    /// an end-of-generation token, which it does not return).
    pub fn greedy_tokens(&self, prompt: &[u32], n_predict: usize) -> Result<Vec<u32>, PeerError> {
        let body = serde_json::json!({
            "prompt": prompt, "n_predict": n_predict, "temperature": 0.0, "top_k": 1,
            "return_tokens": true, "cache_prompt": false, "stream": false,
        });
        let resp = self.client.post(format!("{}/completion", self.base_url)).json(&body).send().map_err(|e| PeerError::Server(format!("/completion: {e}")))?;
        let status = resp.status();
        let text = resp.text().map_err(|e| PeerError::Server(format!("/completion: {e}")))?;
        if !status.is_success() {
            return Err(PeerError::Server(format!("/completion answered {status}: {}", tail(&text))));
        }
        parse_completion_tokens(&text)
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `tokens` of a `/completion` answer made with `return_tokens: true`.
pub fn parse_completion_tokens(text: &str) -> Result<Vec<u32>, PeerError> {
    const BIN: &str = "llama-server /completion";
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| parse_err(BIN, format!("invalid JSON: {e}"), text))?;
    v["tokens"]
        .as_array()
        .ok_or_else(|| parse_err(BIN, "no `tokens` array", text))?
        .iter()
        .map(|t| t.as_u64().and_then(|x| u32::try_from(x).ok()))
        .collect::<Option<Vec<u32>>>()
        .ok_or_else(|| parse_err(BIN, "`tokens` holds a value that is not a token id", text))
}
