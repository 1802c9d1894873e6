//! The parsers of llama.cpp's output (the peer of `bench spec` / `bench fidelity`), on output
//! captured from real runs of the llama.cpp built by tools/llama_cpp/build.sh (vendored in
//! llama-cpp-python 0.3.36) with the SmolLM2-135M Q4_1 target: tests/fixtures/llama_cpp/.
//! CI never runs llama.cpp; these check that what it prints is read right, and that output we
//! cannot read is a clear error.

use std::path::PathBuf;

use specauf::pipeline::llama_cpp::{parse_completion_tokens, parse_llama_bench_json, parse_speculative, LlamaCpp, PeerError};

fn fixture(name: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_cpp").join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn llama_bench_json_gives_one_record_per_test() {
    let records = parse_llama_bench_json(&fixture("llama-bench.json")).unwrap();
    let names: Vec<String> = records.iter().map(|r| r.name()).collect();
    assert_eq!(names, ["pp8", "pp16", "tg64"]);
    for r in &records {
        assert_eq!(r.n_threads, 2);
        assert_eq!(r.n_depth, 64);
        assert_eq!(r.samples_ts.len(), 2, "{}: -r 2 gives two samples", r.name());
        assert!(r.samples_ts.iter().all(|&x| x > 0.0 && x < 10_000.0), "{}: {:?}", r.name(), r.samples_ts);
    }
}

#[test]
fn llama_bench_output_that_is_not_its_json_is_an_error() {
    let text = fixture("llama-bench.json");
    for bad in ["", "error: failed to load model", &text[..text.len() / 2], "[]"] {
        let e = parse_llama_bench_json(bad).unwrap_err();
        assert!(matches!(e, PeerError::Parse { .. }), "{bad:?}: {e}");
    }
    let no_samples = text.replace("\"samples_ts\"", "\"other\"");
    assert!(parse_llama_bench_json(&no_samples).unwrap_err().to_string().contains("samples_ts"));
}

#[test]
fn speculative_simple_summary_is_parsed() {
    let text = fixture("speculative-simple.txt");
    let r = parse_speculative(&text).unwrap();
    assert_eq!(r.n_draft_max, 7);
    // The values the captured run printed (n_predict 65 for -n 64: the loop stops once past it).
    assert_eq!((r.n_predict, r.n_drafted, r.n_accept), (65, 384, 8), "{r:?}");
    assert!((r.decode_s - 91.896).abs() < 1e-9, "{r:?}");
    // 384 drafted at 7 a cycle: 55 cycles (the last one short).
    assert_eq!(r.cycles(), 55);
    // The printed speed is n_predict / decode seconds.
    let printed: f64 = text
        .lines()
        .find(|l| l.contains("decoded ") && l.contains("speed:"))
        .and_then(|l| l.split("speed:").nth(1))
        .and_then(|s| s.trim().split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    assert!((r.tokens_per_s() - printed).abs() / printed < 0.01, "{} vs printed {printed}", r.tokens_per_s());
    // τ = tokens per cycle, between 1 and the block size.
    assert!(r.tau() >= 1.0 && r.tau() <= (r.n_draft_max + 1) as f64, "{}", r.tau());
}

#[test]
fn speculative_simple_output_without_its_summary_is_an_error_naming_the_line() {
    let text = fixture("speculative-simple.txt");
    let without: String = text.lines().filter(|l| !l.contains("n_accept")).collect::<Vec<_>>().join("\n");
    let e = parse_speculative(&without).unwrap_err().to_string();
    assert!(e.contains("n_accept"), "{e}");
    let without: String = text.lines().filter(|l| !l.contains("decoded ")).collect::<Vec<_>>().join("\n");
    assert!(parse_speculative(&without).unwrap_err().to_string().contains("decoded"));
    assert!(parse_speculative("").is_err());
}

#[test]
fn server_completion_tokens_are_parsed() {
    let tokens = parse_completion_tokens(&fixture("completion.json")).unwrap();
    assert_eq!(tokens.len(), 32, "n_predict 32 without an early stop");
    assert!(tokens.iter().all(|&t| t < 49_152), "ids within SmolLM2's vocabulary");
    assert!(parse_completion_tokens("{\"content\": \"hi\"}").unwrap_err().to_string().contains("tokens"));
    assert!(parse_completion_tokens("{\"tokens\": [1, -2]}").is_err());
}

#[test]
fn a_build_without_a_binary_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("specauf-llama-cpp-test-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::write(dir.join("bin/llama-bench"), b"").unwrap();
    let llama = LlamaCpp::new(&dir).unwrap();
    assert_eq!(llama.binary("llama-bench").unwrap(), dir.join("bin/llama-bench"));
    let e = llama.binary("llama-speculative-simple").unwrap_err();
    assert!(matches!(&e, PeerError::MissingBinary { name, .. } if name == "llama-speculative-simple"), "{e}");
    assert!(e.to_string().contains("build.sh"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(matches!(LlamaCpp::new(&dir).unwrap_err(), PeerError::NoDir(_)));
}
