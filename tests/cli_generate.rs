//! `specauf generate` end to end: JSON output, and a clear error with a non-zero exit code for
//! every bad input (never a panic).

mod common;
use common::{run_fail, specauf};

#[test]
fn generate_json_reports_ids_text_and_speed() {
    let out = specauf()
        .args(["generate", "--model", "smollm2", "--chat", "--prompt", "What is the capital of France?", "--max-new-tokens", "12", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last = stdout.lines().last().unwrap();
    let v: serde_json::Value = serde_json::from_str(last).unwrap();
    for key in ["prompt_ids", "token_ids", "text", "tokens_per_s", "prefill_ms"] {
        assert!(v.get(key).is_some(), "missing {key} in {last}");
    }
    // HF renders SmolLM2's default system turn: 37 prompt ids ending with the assistant header.
    let ids = v["prompt_ids"].as_array().unwrap();
    assert_eq!(ids.len(), 37);
    assert!(!v["text"].as_str().unwrap().is_empty(), "{last}");
    assert!(v["token_ids"].as_array().unwrap().len() <= 12);
}

#[test]
fn bad_inputs_fail_with_a_clear_message() {
    let e = run_fail(&["generate", "--prompt", ""]);
    assert!(e.contains("empty"), "{e}");
    let e = run_fail(&["generate", "--model", "/no/such/model", "--prompt", "hi"]);
    assert!(e.contains("no such file"), "{e}");
    let long = "word ".repeat(9000);
    let e = run_fail(&["generate", "--prompt", &long, "--max-new-tokens", "4"]);
    assert!(e.contains("context"), "{e}");
    let e = run_fail(&["generate", "--prompt", "hi", "--max-new-tokens", "0"]);
    assert!(e.contains("max-new-tokens"), "{e}");

    let tmp = tempfile::tempdir().unwrap();
    // a truncated GGUF
    let gguf = std::fs::read(specauf::assets::file(&specauf::assets::SMOLLM2, specauf::assets::SMOLLM2_GGUF).unwrap()).unwrap();
    let cut = tmp.path().join("cut.gguf");
    std::fs::write(&cut, &gguf[..gguf.len() / 3]).unwrap();
    let e = run_fail(&["generate", "--model", cut.to_str().unwrap(), "--prompt", "hi"]);
    assert!(e.contains("truncated"), "{e}");
    // an HF dir with an unsupported architecture
    let dir = tmp.path().join("neox");
    std::fs::create_dir(&dir).unwrap();
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/qwen3");
    let cfg = std::fs::read_to_string(fixture.join("config.json")).unwrap().replace("\"qwen3\"", "\"gpt_neox\"");
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    std::fs::copy(fixture.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    let e = run_fail(&["generate", "--model", dir.to_str().unwrap(), "--prompt", "hi"]);
    assert!(e.contains("unsupported"), "{e}");
}

#[test]
fn every_computing_command_takes_device_and_refuses_cuda_without_the_feature_clearly() {
    // Parsing: an unknown device is refused by name, for each command that computes.
    for cmd in [
        vec!["generate", "--prompt", "x"],
        vec!["prepare", "--data", "d.json", "--out", "/nonexistent/o"],
        vec!["train", "--set", "data=/nonexistent", "--set", "out=/nonexistent/o"],
        vec!["eval", "--out", "/nonexistent/o"],
        vec!["serve"],
        vec!["bench", "decode"],
        vec!["bench", "train"],
        vec!["quickstart"],
    ] {
        let mut args = cmd.clone();
        args.extend(["--device", "tpu"]);
        let e = run_fail(&args);
        assert!(e.contains("tpu") && e.contains("cuda:N"), "{cmd:?}: {e}");
    }
    // Opening: cuda in a build without the feature says how to rebuild (never a panic).
    if cfg!(not(feature = "cuda")) {
        let e = run_fail(&["generate", "--prompt", "x", "--device", "cuda:1"]);
        assert!(e.contains("--features cuda") && e.contains("cuda:1"), "{e}");
    }
}

#[test]
fn generate_with_generic_kernels_gives_the_f32_kernels_tokens() {
    let ids = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["generate", "--model", "smollm2", "--chat", "--prompt", "What is the capital of France?", "--max-new-tokens", "16", "--json", "--weights", "f32"];
        args.extend(extra);
        let out = specauf().args(&args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8(out.stdout).unwrap();
        serde_json::from_str::<serde_json::Value>(stdout.lines().last().unwrap()).unwrap()["token_ids"].clone()
    };
    assert_eq!(ids(&["--kernels", "generic"]), ids(&[]));
}

#[test]
fn train_on_several_gpus_is_refused_clearly_without_the_cuda_build() {
    if cfg!(feature = "cuda") {
        return;
    }
    let e = run_fail(&["train", "--gpus", "2", "--set", "data=/nonexistent", "--set", "out=/tmp/specauf-gpus-test"]);
    assert!(e.contains("--features cuda") && e.contains("--gpus 2"), "{e}");
    // A process started by another launcher with half the rank variables.
    let out = specauf().args(["train", "--set", "data=/nonexistent", "--set", "out=/tmp/specauf-rank-test"]).env("RANK", "1").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("WORLD_SIZE") && !stderr.contains("panicked"), "{stderr}");
}
