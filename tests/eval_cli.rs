//! `specauf eval` end to end on SmolLM2 (kept to one short HumanEval request), and its refusal of
//! bad inputs before any generation.

use std::path::Path;

use specauf::drafter::DFlashDrafter;
use specauf::model::{self, TargetConfig};

mod common;
use common::{run_fail, specauf};

fn smollm2_config() -> TargetConfig {
    let loc = model::load::resolve("smollm2").expect("the embedded default model");
    model::open(&loc).expect("smollm2 opens").1
}

fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

#[test]
fn eval_ar_alone_on_one_humaneval_request_writes_every_output() {
    let out = tempfile::tempdir().unwrap();
    let o = out.path().to_str().unwrap();
    let res = specauf()
        .args([
            "eval",
            "--model",
            "smollm2",
            "--drafter",
            "none",
            "--benchmarks",
            "humaneval",
            "--limit",
            "1",
            "--max-new-tokens",
            "8",
            "--out",
            o,
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{stderr}");
    let v = read_json(&out.path().join("results.json"));
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0]["drafter"], "ar");
    let h = &runs[0]["benchmarks"]["humaneval"];
    assert_eq!(h["requests"], 1);
    assert_eq!(h["tau"], 1.0);
    assert!(h["ar_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(v["settings"]["benchmarks"][0]["source"], "HumanEval");
    assert_eq!(v["settings"]["limit"], 1);
    assert!(v["settings"]["command_line"].as_str().unwrap().contains("--drafter none"));
    let lines = std::fs::read_to_string(out.path().join("requests.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 1);
    let rec: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    // The chat-rendered HumanEval prompt (SmolLM2 template with its default system turn).
    assert!(rec["prompt_len"].as_u64().unwrap() > 50, "{rec}");
    assert!(rec["tokens"].as_array().unwrap().len() <= 8);
    let md = std::fs::read_to_string(out.path().join("report.md")).unwrap();
    assert!(md.contains("| humaneval | 1 |"), "{md}");
    assert!(std::fs::read_to_string(out.path().join("plot.svg")).unwrap().starts_with("<svg"));
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(stdout.contains("ar: average τ 1.000"), "{stdout}");
}

#[test]
fn eval_with_untrained_dflash_drafters_matches_ar_token_for_token() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("untrained-b4");
    // One layer at SmolLM2's width, B = 4, MASK = 16 (an unused special id of SmolLM2).
    DFlashDrafter::init_random_for(&smollm2_config(), 1, 4, 16, 7)
        .unwrap()
        .save(&dir)
        .unwrap();
    let out = tmp.path().join("out");
    let d = dir.to_str().unwrap();
    let drafters = format!("{d},{d}");
    let res = specauf()
        .args([
            "eval",
            "--model",
            "smollm2",
            "--drafter",
            &drafters,
            "--label",
            "untrained,untrained-b3",
            "--benchmarks",
            "humaneval",
            "--limit",
            "1",
            "--max-new-tokens",
            "8",
            "--block-size",
            "3",
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "an exact loop must reproduce AR at T = 0: {stderr}");
    let v = read_json(&out.join("results.json"));
    assert_eq!(v["exactness"]["checked"], true);
    assert_eq!(v["exactness"]["mismatches"], 0);
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(
        runs.iter().map(|r| r["drafter"].as_str().unwrap()).collect::<Vec<_>>(),
        ["untrained", "untrained-b3"]
    );
    for r in runs {
        assert_eq!(r["block_size"], 3);
        let h = &r["benchmarks"]["humaneval"];
        assert!(h["tau"].as_f64().unwrap() >= 1.0);
        assert_eq!(h["accept_per_position"].as_array().unwrap().len(), 2, "B = 3 drafts 2 tokens");
        assert!(h["speedup"].as_f64().unwrap() > 0.0);
    }
    let ds = v["settings"]["drafters"].as_array().unwrap();
    assert_eq!(ds[0]["trained_block_size"], 4);
    assert_eq!(ds[0]["block_size"], 3);
    // One shared AR baseline: 1 AR line + 1 per drafter.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("requests.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.iter().filter(|l| l["drafter"] == "ar").count(), 1);
    assert_eq!(lines.len(), 3);
    assert!(lines
        .iter()
        .filter(|l| l["drafter"] != "ar")
        .all(|l| l["exact_match_vs_ar"] == true));
}

#[test]
fn bad_inputs_fail_before_any_generation() {
    let tmp = tempfile::tempdir().unwrap();
    let o = tmp.path().join("out");
    let o = o.to_str().unwrap();
    let base = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["eval", "--model", "smollm2", "--limit", "1", "--max-new-tokens", "4", "--out", o]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    // Every case names its benchmarks (a repeated --benchmarks appends).
    let fail = |extra: &[&str]| {
        let mut args = base(extra);
        if !extra.contains(&"--benchmarks") {
            args.extend(["--benchmarks".to_string(), "humaneval".to_string()]);
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        run_fail(&refs)
    };
    let e = fail(&["--drafter", "none", "--benchmarks", "humaneval,gsm9k"]);
    assert!(e.contains("unknown benchmark `gsm9k`") && e.contains("valid names"), "{e}");
    let e = fail(&["--drafter", "none", "--benchmarks", "mbpp,mbpp"]);
    assert!(e.contains("twice"), "{e}");
    let e = fail(&["--drafter", "none", "--limit", "0"]);
    assert!(e.contains("--limit"), "{e}");
    let e = fail(&["--drafter", "none", "--max-new-tokens", "0"]);
    assert!(e.contains("--max-new-tokens"), "{e}");
    let e = fail(&["--drafter", "/no/such/drafter"]);
    assert!(e.contains("no such directory"), "{e}");
    let e = fail(&["--drafter", "none,/tmp"]);
    assert!(e.contains("none"), "{e}");
    let e = fail(&["--drafter", "/tmp", "--label", "a,b"]);
    assert!(e.contains("--label"), "{e}");
    let e = fail(&["--drafter", "/tmp", "--block-size", "1"]);
    assert!(e.contains("--block-size"), "{e}");
    // A drafter built for another target (the qwen3 fixture: hidden 64) against SmolLM2 (576).
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dflash/tiny-qwen3-b4");
    let e = fail(&["--drafter", fixture.to_str().unwrap()]);
    assert!(e.contains("hidden size") && e.contains("tiny-qwen3-b4"), "{e}");
    // A trained block size can only be lowered.
    let dir = tmp.path().join("b4");
    DFlashDrafter::init_random_for(&smollm2_config(), 1, 4, 16, 1)
        .unwrap()
        .save(&dir)
        .unwrap();
    let e = fail(&["--drafter", dir.to_str().unwrap(), "--block-size", "8"]);
    assert!(e.contains("exceeds") && e.contains("trained block size 4"), "{e}");
    assert!(!Path::new(o).join("results.json").exists(), "nothing was written");
}
