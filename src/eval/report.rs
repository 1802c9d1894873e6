//! Writing an evaluation out: `results.json` (settings + figures), `requests.jsonl` (every turn of
//! every run), `report.md` (the side-by-side table) and `plot.svg` ([`super::plot`]). Every file is
//! written atomically (`<name>.tmp` in the same folder, fsync, rename).
//!
//! `results.json`:
//! ```text
//! {"settings": {model, weights, drafters: [{label, path, block_size, trained_block_size}],
//!               benchmarks: [{name, source, requests, skipped_requests}], limit, seed,
//!               max_new_tokens, temperature, top_p, accept_rule, machine: {cpu_model, threads, os,
//!               arch}, version, date, command_line, timing},
//!  "runs": [{"drafter", "block_size",
//!            "benchmarks": {NAME: {tau, tau_pooled, accept_per_position, accept_histogram, requests,
//!                                  ar_tokens_per_s, spec_tokens_per_s, speedup, ...}},
//!            "average": {tau, speedup, tau_pooled, accept_per_position, requests}}],
//!  "exactness": {checked, mismatches, mismatched: [{benchmark, id, turn, drafter}]},
//!  "skipped": [{benchmark, id, turn, reason}]}
//! ```
//! Benchmarks appear in the order they were evaluated.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

use super::datasets::BenchmarkName;
use super::plot;
use super::runner::{BenchmarkResult, EvalConfig, EvalResults, RunResult, AR_LABEL};
use crate::spec::sampling::AcceptRule;

pub const RESULTS_JSON: &str = "results.json";
pub const REQUESTS_JSONL: &str = "requests.jsonl";
pub const REPORT_MD: &str = "report.md";
pub const PLOT_SVG: &str = "plot.svg";

/// How time is charged; written into every report.
pub const TIMING_NOTE: &str = "decode time runs from the end of the prefill to the end of the last cycle and includes \
the drafter's first pass over the prompt context (the DFlash reference leaves it off its clock; we charge it); \
speedup = sum of AR decode time / sum of drafter decode time over the same requests; \
speedup_with_prefill also charges the prefill and the drafter's begin; \
tokens/s counts the tokens produced by decode cycles (the first comes from the prefill)";

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot create the output folder {path}: {source}")]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot serialise {what}: {source}")]
    Json { what: &'static str, source: serde_json::Error },
    #[error(transparent)]
    Plot(#[from] plot::PlotError),
}

/// The machine the timings come from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Machine {
    /// `model name` of /proc/cpuinfo, or "unknown".
    pub cpu_model: String,
    /// Threads of candle's CPU kernels.
    pub threads: usize,
    pub os: String,
    pub arch: String,
}

impl Machine {
    pub fn detect() -> Self {
        let cpu_model = fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        Self {
            cpu_model,
            threads: candle_core::utils::get_num_threads(),
            os: std::env::consts::OS.into(),
            arch: std::env::consts::ARCH.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DrafterSetting {
    pub label: String,
    /// The checkpoint folder, if loaded from one.
    pub path: Option<String>,
    /// The verified block size at inference.
    pub block_size: usize,
    /// The drafter's own block size (greater when overridden with --block-size or chosen lower).
    pub trained_block_size: usize,
    /// How B was chosen from measurement; None when fixed with --block-size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_choice: Option<crate::spec::block_size::BlockChoice>,
    /// Top-ranked ids its drafts score (plus each request's own tokens); None: the whole
    /// vocabulary (DESIGN §7.13).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub draft_vocab: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchmarkSetting {
    pub name: String,
    /// What the requests really are (the stand-in named honestly).
    pub source: String,
    /// Conversations evaluated.
    pub requests: usize,
    /// Conversations left out because they do not fit the context.
    pub skipped_requests: usize,
}

/// What produced the figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Settings {
    pub model: String,
    pub weights: String,
    pub drafters: Vec<DrafterSetting>,
    pub benchmarks: Vec<BenchmarkSetting>,
    /// None: whole benchmarks.
    pub limit: Option<usize>,
    pub seed: u64,
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub accept_rule: AcceptRule,
    pub machine: Machine,
    pub version: String,
    /// UTC, RFC 3339.
    pub date: String,
    pub command_line: String,
    pub timing: String,
}

impl Settings {
    /// Settings of an evaluation that produced `results`; machine, version and date are filled in
    /// here.
    pub fn describe(
        model: &str,
        weights: &str,
        drafters: Vec<DrafterSetting>,
        limit: Option<usize>,
        cfg: &EvalConfig,
        results: &EvalResults,
        command_line: &str,
    ) -> Self {
        let benchmarks = results
            .evaluated
            .iter()
            .map(|&(name, requests)| BenchmarkSetting {
                name: name.to_string(),
                source: name.source().to_string(),
                requests,
                skipped_requests: results.skipped_requests(name),
            })
            .collect();
        Self {
            model: model.to_string(),
            weights: weights.to_string(),
            drafters,
            benchmarks,
            limit,
            seed: cfg.seed,
            max_new_tokens: cfg.max_new_tokens,
            temperature: cfg.temperature,
            top_p: cfg.top_p,
            accept_rule: cfg.accept_rule,
            machine: Machine::detect(),
            version: crate::version().to_string(),
            date: utc_now_rfc3339(),
            command_line: command_line.to_string(),
            timing: TIMING_NOTE.to_string(),
        }
    }
}

/// Benchmarks as a JSON object in evaluation order.
struct OrderedBenchmarks<'a>(&'a [(BenchmarkName, BenchmarkResult)]);

impl Serialize for OrderedBenchmarks<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (name, r) in self.0 {
            m.serialize_entry(name.as_str(), r)?;
        }
        m.end()
    }
}

#[derive(Serialize)]
struct RunJson<'a> {
    drafter: &'a str,
    block_size: usize,
    benchmarks: OrderedBenchmarks<'a>,
    average: &'a super::runner::AverageResult,
}

#[derive(Serialize)]
struct Mismatch<'a> {
    benchmark: &'a str,
    id: &'a str,
    turn: usize,
    drafter: &'a str,
}

#[derive(Serialize)]
struct Exactness<'a> {
    /// Whether the check applied (T = 0).
    checked: bool,
    mismatches: usize,
    mismatched: Vec<Mismatch<'a>>,
}

#[derive(Serialize)]
struct ResultsJson<'a> {
    settings: &'a Settings,
    runs: Vec<RunJson<'a>>,
    exactness: Exactness<'a>,
    skipped: &'a [super::runner::Skipped],
}

/// `results.json` as text.
pub fn results_json(settings: &Settings, results: &EvalResults) -> Result<String, ReportError> {
    let runs = results
        .runs
        .iter()
        .map(|r| RunJson {
            drafter: &r.drafter,
            block_size: r.block_size,
            benchmarks: OrderedBenchmarks(&r.benchmarks),
            average: &r.average,
        })
        .collect();
    let mismatched = if results.exactness_checked {
        results
            .mismatched_records()
            .filter(|r| r.counted)
            .map(|r| Mismatch {
                benchmark: &r.benchmark,
                id: &r.id,
                turn: r.turn,
                drafter: &r.drafter,
            })
            .collect()
    } else {
        Vec::new()
    };
    let doc = ResultsJson {
        settings,
        runs,
        exactness: Exactness {
            checked: results.exactness_checked,
            mismatches: results.exact_mismatches,
            mismatched,
        },
        skipped: &results.skipped,
    };
    let mut text = serde_json::to_string_pretty(&doc).map_err(|source| ReportError::Json {
        what: "results.json",
        source,
    })?;
    text.push('\n');
    Ok(text)
}

/// `requests.jsonl`: one JSON object per turn of every run.
pub fn requests_jsonl(results: &EvalResults) -> Result<String, ReportError> {
    let mut out = String::new();
    for r in &results.records {
        let line = serde_json::to_string(r).map_err(|source| ReportError::Json {
            what: "requests.jsonl",
            source,
        })?;
        out.push_str(&line);
        out.push('\n');
    }
    Ok(out)
}

fn fmt_limit(limit: Option<usize>) -> String {
    limit.map(|l| l.to_string()).unwrap_or_else(|| "all".into())
}

/// `report.md`: the side-by-side table and everything needed to read it honestly.
pub fn render_markdown(settings: &Settings, results: &EvalResults) -> String {
    let mut s = String::new();
    // 1. Title, machine, command line, decode settings.
    md_header(&mut s, settings);
    // 2. The table: rows = benchmarks + average; per run τ and speedup.
    md_tau_table(&mut s, settings, results);
    // 3. Whether the drafters reproduced AR (T = 0 only).
    md_exactness(&mut s, settings, results);
    // 4. What the benchmarks really are.
    md_benchmarks(&mut s, settings);
    // 5. Per-position acceptance, pooled (absent when no run drafted).
    md_acceptance(&mut s, &results.runs);
    // 6. What was left out, and why.
    md_skipped(&mut s, results);
    let _ = writeln!(s, "![τ per benchmark and acceptance per draft position]({PLOT_SVG})");
    s
}

fn md_header(s: &mut String, settings: &Settings) {
    let _ = writeln!(s, "# specauf eval: {}\n", settings.model);
    let _ = writeln!(
        s,
        "{} · specauf {} · {} ({} threads, {}/{}) · weights {}\n",
        settings.date,
        settings.version,
        settings.machine.cpu_model,
        settings.machine.threads,
        settings.machine.os,
        settings.machine.arch,
        settings.weights
    );
    let _ = writeln!(s, "```sh\n{}\n```\n", settings.command_line);
    let blocks: Vec<String> = settings
        .drafters
        .iter()
        .map(|d| {
            let block = match &d.block_choice {
                Some(c) => format!("`{}` {}", d.label, c.summary(d.trained_block_size)),
                None if d.block_size == d.trained_block_size => format!("`{}` B = {}", d.label, d.block_size),
                None => format!("`{}` B = {} (trained {})", d.label, d.block_size, d.trained_block_size),
            };
            match d.draft_vocab {
                Some(k) => format!("{block}, drafts over the top {k} ids of its draft vocabulary and each request's tokens"),
                None => block,
            }
        })
        .collect();
    let _ = writeln!(
        s,
        "max_new_tokens {} per turn · temperature {} · top_p {} · seed {} · limit {} · {}\n",
        settings.max_new_tokens,
        settings.temperature,
        settings.top_p,
        settings.seed,
        fmt_limit(settings.limit),
        if blocks.is_empty() {
            "AR only".to_string()
        } else {
            blocks.join(", ")
        }
    );
}

/// Requests and AR tok/s come from the first run (every run covers the same requests).
fn md_tau_table(s: &mut String, settings: &Settings, results: &EvalResults) {
    let runs = &results.runs;
    let _ = writeln!(s, "## τ and speedup\n");
    let mut head = String::from("| benchmark | requests | AR tok/s |");
    let mut rule = String::from("|---|--:|--:|");
    for r in runs {
        let _ = write!(head, " {} τ | {} speedup |", r.drafter, r.drafter);
        rule.push_str("--:|--:|");
    }
    let _ = writeln!(s, "{head}\n{rule}");
    let first = runs.first();
    let order: Vec<BenchmarkName> = results.evaluated.iter().map(|(n, _)| *n).collect();
    for &name in &order {
        let fb = first.and_then(|r| r.benchmark(name));
        let _ = write!(
            s,
            "| {} | {} | {:.1} |",
            name,
            fb.map(|b| b.requests).unwrap_or(0),
            fb.map(|b| b.ar_tokens_per_s).unwrap_or(0.0)
        );
        for r in runs {
            match r.benchmark(name) {
                Some(b) if b.requests > 0 => {
                    let _ = write!(s, " {:.2} | {:.2}× |", b.tau, b.speedup);
                }
                _ => s.push_str(" – | – |"),
            }
        }
        s.push('\n');
    }
    let _ = write!(s, "| **average** | {} | |", first.map(|r| r.average.requests).unwrap_or(0));
    for r in runs {
        let _ = write!(s, " **{:.2}** | **{:.2}×** |", r.average.tau, r.average.speedup);
    }
    s.push_str("\n\n");
    let _ = writeln!(
        s,
        "τ = mean over requests of the tokens emitted per cycle (accepted drafts + 1); MT-Bench counts each turn as one \
         request, the second conditioned on the run's own first answer. The average row is the mean over benchmarks. \
         Timing: {}.\n",
        settings.timing
    );
}

fn md_exactness(s: &mut String, settings: &Settings, results: &EvalResults) {
    let runs = &results.runs;
    let _ = writeln!(s, "## Exactness\n");
    let drafter_turns = results.records.iter().filter(|r| r.counted && r.drafter != AR_LABEL).count();
    if !results.exactness_checked {
        let _ = writeln!(
            s,
            "Not checked: at T = {} outputs are samples; a speculative run reproduces AR only up to float differences.\n",
            settings.temperature
        );
    } else if runs.iter().all(|r| r.drafter == AR_LABEL) {
        let _ = writeln!(s, "AR only: nothing to compare.\n");
    } else if results.exact_mismatches == 0 {
        let _ = writeln!(s, "At T = 0 all {drafter_turns} drafter requests produced exactly AR's tokens.\n");
    } else {
        let _ = writeln!(
            s,
            "**WARNING: {} of {drafter_turns} drafter requests differ from AR at T = 0. Speculative decoding must \
             reproduce the target's greedy output token for token; these figures are not trustworthy.** \
             (With `--weights f32`, chunked and one-token forwards differ by ~1e-5, which can flip a near-tie.)\n",
            results.exact_mismatches
        );
        for r in results.mismatched_records().filter(|r| r.counted) {
            let _ = writeln!(s, "- {} `{}` turn {} ({})", r.benchmark, r.id, r.turn, r.drafter);
        }
        s.push('\n');
    }
}

fn md_benchmarks(s: &mut String, settings: &Settings) {
    let _ = writeln!(
        s,
        "## Benchmarks\n\n| benchmark | source | conversations | skipped (context) |\n|---|---|--:|--:|"
    );
    for b in &settings.benchmarks {
        let _ = writeln!(s, "| {} | {} | {} | {} |", b.name, b.source, b.requests, b.skipped_requests);
    }
    s.push('\n');
}

/// Rows = draft positions up to the longest run's, then the pooled τ; a run with fewer
/// positions shows – there.
fn md_acceptance(s: &mut String, runs: &[RunResult]) {
    let positions = runs.iter().map(|r| r.average.accept_per_position.len()).max().unwrap_or(0);
    if positions > 0 {
        let _ = writeln!(s, "## Acceptance per draft position (all benchmarks pooled)\n");
        let mut head = String::from("| position |");
        let mut rule = String::from("|--:|");
        for r in runs {
            let _ = write!(head, " {} |", r.drafter);
            rule.push_str("--:|");
        }
        let _ = writeln!(s, "{head}\n{rule}");
        for i in 0..positions {
            let _ = write!(s, "| {} |", i + 1);
            for r in runs {
                match r.average.accept_per_position.get(i) {
                    Some(a) => {
                        let _ = write!(s, " {a:.3} |");
                    }
                    None => s.push_str(" – |"),
                }
            }
            s.push('\n');
        }
        let _ = write!(s, "| pooled τ |");
        for r in runs {
            let _ = write!(s, " {:.3} |", r.average.tau_pooled);
        }
        s.push_str("\n\n");
    }
}

fn md_skipped(s: &mut String, results: &EvalResults) {
    if !results.skipped.is_empty() {
        let _ = writeln!(s, "## Skipped\n");
        for k in &results.skipped {
            match k.turn {
                None => {
                    let _ = writeln!(s, "- {} `{}`: {}", k.benchmark, k.id, k.reason);
                }
                Some(t) => {
                    let _ = writeln!(s, "- {} `{}` turn {t} (left out of every run): {}", k.benchmark, k.id, k.reason);
                }
            }
        }
        s.push('\n');
    }
}

/// The paths [`write_all`] wrote.
#[derive(Debug, Clone)]
pub struct Written {
    pub results_json: PathBuf,
    pub requests_jsonl: PathBuf,
    pub report_md: PathBuf,
    pub plot_svg: PathBuf,
}

/// Writes results.json, requests.jsonl, report.md and plot.svg into `dir` (created if needed).
pub fn write_all(dir: &Path, settings: &Settings, results: &EvalResults) -> Result<Written, ReportError> {
    fs::create_dir_all(dir).map_err(|source| ReportError::CreateDir { path: dir.into(), source })?;
    let w = Written {
        results_json: dir.join(RESULTS_JSON),
        requests_jsonl: dir.join(REQUESTS_JSONL),
        report_md: dir.join(REPORT_MD),
        plot_svg: dir.join(PLOT_SVG),
    };
    let put =
        |path: &Path, text: &str| write_atomic(path, text.as_bytes()).map_err(|source| ReportError::Write { path: path.into(), source });
    put(&w.requests_jsonl, &requests_jsonl(results)?)?;
    plot::write_svg(&w.plot_svg, &results.runs, &plot_title(settings))?;
    put(&w.report_md, &render_markdown(settings, results))?;
    // Last: its presence says the rest is complete.
    put(&w.results_json, &results_json(settings, results)?)?;
    Ok(w)
}

fn plot_title(settings: &Settings) -> String {
    format!(
        "{}: max_new_tokens {}, T = {}",
        settings.model, settings.max_new_tokens, settings.temperature
    )
}

pub use crate::util::fs::write_atomic;

/// The current time, UTC, as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    rfc3339(secs)
}

/// Seconds since the Unix epoch → `YYYY-MM-DDTHH:MM:SSZ` (proleptic Gregorian calendar).
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates_match_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        // 2000-02-29 12:34:56 UTC (a leap day in a century leap year).
        assert_eq!(rfc3339(951_827_696), "2000-02-29T12:34:56Z");
        // 2024-12-31 23:59:59 UTC.
        assert_eq!(rfc3339(1_735_689_599), "2024-12-31T23:59:59Z");
    }

    #[test]
    fn atomic_write_replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read_to_string(&p).unwrap(), "two");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }
}
