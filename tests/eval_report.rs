//! What an evaluation writes: results.json (schema, order, honest sources), requests.jsonl,
//! report.md (the side-by-side table) and plot.svg, from a real run over a tiny fixture target.

mod spec_support;

use spec_support::target;
use specauf::eval::datasets::{BenchRequest, Benchmark, BenchmarkName};
use specauf::eval::report::{self, DrafterSetting, Settings};
use specauf::eval::runner::{self, EvalConfig, EvalDrafter, EvalResults, PromptRenderer, RenderError, Silent};
use specauf::spec::{FixedProposer, OracleErrors, OracleProposer, RandomProposer};

struct ByteRenderer;

impl PromptRenderer for ByteRenderer {
    fn render(&self, user_turns: &[String], answers: &[Vec<u32>]) -> Result<Vec<u32>, RenderError> {
        let mut ids = vec![1u32];
        for (i, user) in user_turns.iter().take(answers.len() + 1).enumerate() {
            ids.push(3);
            ids.extend(user.bytes().map(|b| 10 + u32::from(b) % 200));
            ids.push(4);
            if let Some(a) = answers.get(i) {
                ids.extend_from_slice(a);
                ids.push(5);
            }
        }
        Ok(ids)
    }
}

fn benchmarks() -> Vec<Benchmark> {
    let mk = |name: BenchmarkName, reqs: Vec<(&str, Vec<&str>)>| Benchmark {
        name,
        source: name.source(),
        requests: reqs
            .into_iter()
            .map(|(id, turns)| BenchRequest {
                id: id.into(),
                turns: turns.into_iter().map(String::from).collect(),
            })
            .collect(),
    };
    // Deliberately not in the canonical order: reports keep the order given.
    vec![
        mk(
            BenchmarkName::Mbpp,
            vec![("m1", vec!["sort a list"]), ("m2", vec!["reverse a string"])],
        ),
        mk(BenchmarkName::Gsm8k, vec![("g1", vec!["two plus two"])]),
        mk(BenchmarkName::MtBench, vec![("81", vec!["write a poem", "now shorter"])]),
    ]
}

const MAX_NEW: usize = 16;

/// AR, an oracle that knows AR's greedy output of the first request (so τ > 1 somewhere), and a
/// fixed drafter; written to a temporary folder.
fn evaluate() -> (tempfile::TempDir, Settings, EvalResults) {
    let target = target("qwen3");
    let cfg = EvalConfig::greedy(&target, MAX_NEW);
    let benches = benchmarks();
    let first = ByteRenderer.render(&benches[0].requests[0].turns, &[]).unwrap();
    let ar = specauf::spec::generate(&target, None, &first, &specauf::spec::GenerateConfig::greedy(&target, MAX_NEW)).unwrap();
    let mut drafters = vec![
        EvalDrafter::new(
            "oracle",
            Box::new(OracleProposer::new(5, ar.token_ids.clone(), OracleErrors::At(vec![3, 9]))),
        ),
        EvalDrafter::new("fixed", Box::new(FixedProposer::new(3, 17))),
        EvalDrafter::new("random", Box::new(RandomProposer::uniform(4, 2))),
    ];
    let results = runner::run(&target, &ByteRenderer, &mut drafters, &benches, &cfg, &mut Silent).unwrap();
    let drafter_settings = drafters
        .iter()
        .map(|d| DrafterSetting {
            label: d.label.clone(),
            path: None,
            block_size: d.proposer.block_size(),
            trained_block_size: d.proposer.block_size(),
            block_choice: None,
            draft_vocab: None,
        })
        .collect();
    let settings = Settings::describe(
        "tests/fixtures/models/qwen3",
        "f32",
        drafter_settings,
        Some(2),
        &cfg,
        &results,
        "specauf eval --model qwen3-fixture",
    );
    let dir = tempfile::tempdir().unwrap();
    report::write_all(dir.path(), &settings, &results).unwrap();
    (dir, settings, results)
}

#[test]
fn results_json_has_the_documented_schema_in_evaluation_order() {
    let (dir, _, results) = evaluate();
    let text = std::fs::read_to_string(dir.path().join("results.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let s = &v["settings"];
    assert_eq!(s["model"], "tests/fixtures/models/qwen3");
    assert_eq!(s["limit"], 2);
    assert_eq!(s["max_new_tokens"], MAX_NEW);
    assert_eq!(s["temperature"], 0.0);
    assert_eq!(s["seed"], 0);
    assert_eq!(s["version"], specauf::version());
    assert!(s["date"].as_str().unwrap().ends_with('Z'));
    assert!(!s["machine"]["cpu_model"].as_str().unwrap().is_empty());
    assert!(s["machine"]["threads"].as_u64().unwrap() >= 1);
    assert!(s["timing"].as_str().unwrap().contains("first pass"));
    let b = s["benchmarks"].as_array().unwrap();
    assert_eq!(b.len(), 3);
    assert_eq!(b[0]["name"], "mbpp");
    assert!(b[0]["source"].as_str().unwrap().contains("stand-in for MBPP"), "{}", b[0]["source"]);
    assert_eq!(b[0]["requests"], 2);

    let runs = v["runs"].as_array().unwrap();
    assert_eq!(
        runs.iter().map(|r| r["drafter"].as_str().unwrap()).collect::<Vec<_>>(),
        ["oracle", "fixed", "random"]
    );
    for run in runs {
        let benches = run["benchmarks"].as_object().unwrap();
        for name in ["mbpp", "gsm8k", "mtbench"] {
            let x = &benches[name];
            for key in [
                "tau",
                "tau_pooled",
                "accept_per_position",
                "accept_histogram",
                "requests",
                "ar_tokens_per_s",
                "spec_tokens_per_s",
                "speedup",
            ] {
                assert!(!x[key].is_null(), "{} {name}: no {key}", run["drafter"]);
            }
            assert!(x["tau"].as_f64().unwrap() >= 1.0);
            assert!(x["speedup"].as_f64().unwrap() > 0.0);
            assert!(x["ar_tokens_per_s"].as_f64().unwrap() > 0.0);
        }
        assert_eq!(benches["mtbench"]["requests"], 2, "MT-Bench: each turn is a request");
        assert!(run["average"]["tau"].as_f64().unwrap() >= 1.0);
        assert!(run["average"]["speedup"].as_f64().unwrap() > 0.0);
    }
    // The oracle is right except at two output indices of the first request.
    assert!(runs[0]["benchmarks"]["mbpp"]["tau"].as_f64().unwrap() > 1.2);
    assert_eq!(runs[0]["block_size"], 5);
    assert_eq!(runs[0]["benchmarks"]["mbpp"]["accept_per_position"].as_array().unwrap().len(), 4);
    // Benchmarks keep their evaluation order inside each run's object.
    let first_run = text.find("\"oracle\"").unwrap();
    let (m, g, t) = (
        text[first_run..].find("\"mbpp\"").unwrap(),
        text[first_run..].find("\"gsm8k\"").unwrap(),
        text[first_run..].find("\"mtbench\"").unwrap(),
    );
    assert!(m < g && g < t, "order mbpp, gsm8k, mtbench");
    assert_eq!(v["exactness"]["checked"], true);
    assert_eq!(v["exactness"]["mismatches"], 0);
    assert_eq!(v["exactness"]["mismatches"].as_u64().unwrap() as usize, results.exact_mismatches);
}

#[test]
fn requests_jsonl_has_one_line_per_turn_of_every_run() {
    let (dir, _, results) = evaluate();
    let text = std::fs::read_to_string(dir.path().join("requests.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    // 5 turns (2 mbpp, 1 gsm8k, 2 MT-Bench) × (AR + 3 drafters)
    assert_eq!(lines.len(), 20);
    assert_eq!(lines.len(), results.records.len());
    for l in &lines {
        for key in [
            "benchmark",
            "id",
            "turn",
            "drafter",
            "tau",
            "accept_lengths",
            "tokens",
            "decode_ms",
            "prefill_ms",
            "exact_match_vs_ar",
        ] {
            assert!(l.get(key).is_some(), "no {key}: {l}");
        }
        let tokens = l["tokens"].as_array().unwrap().len();
        assert_eq!(tokens, MAX_NEW);
        if l["drafter"] == "ar" {
            assert!(l["exact_match_vs_ar"].is_null());
        } else {
            assert_eq!(l["exact_match_vs_ar"], true);
        }
    }
    assert_eq!(lines.iter().filter(|l| l["turn"] == 2).count(), 4, "MT-Bench turn 2 for every run");
}

#[test]
fn report_md_puts_the_drafters_side_by_side_and_names_the_stand_ins() {
    let (dir, settings, results) = evaluate();
    let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
    assert!(
        md.contains(
            "| benchmark | requests | AR tok/s | oracle τ | oracle speedup | fixed τ | fixed speedup | random τ | random speedup |"
        ),
        "{md}"
    );
    let row = |name: &str| {
        md.lines()
            .find(|l| l.starts_with(&format!("| {name} |")))
            .unwrap_or_else(|| panic!("no {name} row:\n{md}"))
            .to_string()
    };
    for name in ["mbpp", "gsm8k", "mtbench", "**average**"] {
        // name, requests, AR tok/s, then τ and speedup per drafter: 3 + 6 cells.
        assert_eq!(row(name).matches('|').count(), 10, "{}", row(name));
    }
    let oracle = results.run("oracle").unwrap().benchmark(BenchmarkName::Mbpp).unwrap().tau;
    assert!(row("mbpp").contains(&format!(" {oracle:.2} |")), "{}", row("mbpp"));
    let avg = results.run("fixed").unwrap().average.speedup;
    assert!(row("**average**").contains(&format!("**{avg:.2}×**")), "{}", row("**average**"));
    assert!(md.contains(BenchmarkName::Mbpp.source()) && md.contains(BenchmarkName::Gsm8k.source()));
    assert!(md.contains(&settings.command_line));
    assert!(md.contains("produced exactly AR's tokens"));
    assert!(md.contains("## Acceptance per draft position"));
    assert!(md.contains("plot.svg"));
}

#[test]
fn plot_svg_draws_bars_per_drafter_and_a_line_per_drafter() {
    let (dir, _, results) = evaluate();
    if let Some(keep) = std::env::var_os("KEEP_EVAL_OUT") {
        for f in ["plot.svg", "report.md", "results.json"] {
            std::fs::copy(dir.path().join(f), std::path::Path::new(&keep).join(f)).unwrap();
        }
    }
    let svg = std::fs::read_to_string(dir.path().join("plot.svg")).unwrap();
    assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
    assert!(svg.trim_end().ends_with("</svg>"));
    for label in ["oracle", "fixed", "random", "mbpp", "gsm8k", "mtbench", "average"] {
        assert!(svg.contains(label), "no {label} in the plot");
    }
    // 4 groups × 3 runs bars (plus legend swatches), and three acceptance lines.
    assert!(svg.matches("<rect").count() >= 12 + 3, "{} rects", svg.matches("<rect").count());
    assert!(
        svg.matches("<polyline").count() >= 3,
        "{} polylines",
        svg.matches("<polyline").count()
    );
    assert!(svg.len() > 5_000);
    // The oracle's τ label is printed above its mbpp bar.
    let tau = results.run("oracle").unwrap().benchmarks[0].1.tau;
    assert!(svg.contains(&format!("{tau:.2}")));
}
