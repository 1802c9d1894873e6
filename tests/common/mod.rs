//! Shared by the integration tests: the tiny llama fixture target with a 256-id character
//! tokenizer and a chat template, and small ShareGPT-style data files.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use specauf::data::sharegpt::id_is_heldout;

const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The tiny llama fixture (vocab 256, eos 2) with a character-level tokenizer of exactly 256
/// ids: 0 `<unk>`, 1 `<|im_start|>`, 2 `<|im_end|>`, then single characters.
pub fn tiny_model_dir(root: &Path) -> PathBuf {
    let dir = root.join("tiny-llama");
    std::fs::create_dir_all(&dir).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/llama");
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(f), dir.join(f)).unwrap();
    }
    let mut chars: Vec<char> = vec!['\n', '\t'];
    chars.extend((0x20u32..0x7f).filter_map(char::from_u32));
    chars.extend((0xa1u32..0x100).filter_map(char::from_u32));
    chars.extend((0x391u32..0x3ca).filter_map(char::from_u32).filter(|c| c.is_alphabetic()));
    chars.extend((0x410u32..0x450).filter_map(char::from_u32));
    chars.truncate(253);
    let mut vocab = serde_json::Map::new();
    let specials = ["<unk>", "<|im_start|>", "<|im_end|>"];
    for (i, s) in specials.iter().enumerate() {
        vocab.insert(s.to_string(), i.into());
    }
    for (i, c) in chars.iter().enumerate() {
        vocab.insert(c.to_string(), (i + 3).into());
    }
    assert_eq!(vocab.len(), 256);
    let added: Vec<serde_json::Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| serde_json::json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": {"type": "Fuse"},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "vocab": vocab, "merges": []}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let config = serde_json::json!({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<unk>", "chat_template": CHATML});
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    dir
}

/// `n` conversation ids outside the benchmark hold-out, and one inside it.
pub fn ids(n: usize) -> (Vec<String>, String) {
    let mut out = Vec::new();
    let mut heldout = None;
    for i in 0.. {
        let id = format!("conv{i}");
        if id_is_heldout(&id) {
            heldout.get_or_insert(id);
        } else if out.len() < n {
            out.push(id);
        }
        if out.len() == n && heldout.is_some() {
            break;
        }
    }
    (out, heldout.unwrap())
}

/// A JSONL file of `n` usable two-exchange conversations, one held-out one, and `bad` malformed
/// records of different kinds.
pub fn write_data(root: &Path, n: usize, bad: bool) -> PathBuf {
    let (ids, heldout) = ids(n);
    let mut lines = Vec::new();
    for (k, id) in ids.iter().chain(std::iter::once(&heldout)).enumerate() {
        let rec = serde_json::json!({"id": id, "conversations": [
            {"from": "human", "value": format!("Question number {k}: what is {k} plus {k}?")},
            {"from": "gpt", "value": format!("It is {}. Anything else?", 2 * k)},
            {"from": "human", "value": "Now tell me a short story."},
            {"from": "gpt", "value": "Once upon a time there was a tiny model."},
        ]});
        lines.push(rec.to_string());
        if bad && k == 1 {
            lines.push("{not json".to_string());
            lines.push(r#"{"id": "e1", "conversations": [{"from": "alien", "value": "?"}, {"from": "gpt", "value": "!"}]}"#.into());
            lines.push(r#"{"id": "e2", "conversations": [{"from": "human", "value": "  "}, {"from": "gpt", "value": "!"}]}"#.into());
        }
    }
    let path = root.join("data.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}


/// The tiny llama target with its tokenizer, and `conversations` of [`write_data`] prepared
/// (no regeneration) into `root/prepared`.
pub fn prepared(root: &Path, conversations: usize) -> (specauf::model::LoadedModel, PathBuf) {
    use specauf::data::{ModelIdentity, PrepareSettings};
    use specauf::data::prepare::{prepare, PrepareOptions};
    let model_dir = tiny_model_dir(root);
    let data = write_data(root, conversations, false);
    let m = specauf::model::load::load_model(model_dir.to_str().unwrap(), specauf::model::WeightsMode::F32).unwrap();
    let id = ModelIdentity::of(&m).unwrap();
    let out = root.join("prepared");
    let settings = PrepareSettings {
        data: "data.jsonl".into(),
        max_conversations: Some(conversations),
        max_len: 160,
        max_turns: Some(2),
        eval_fraction: 0.2,
        seed: 1,
        regenerate: None,
        features: None,
        topics: None,
    };
    let opts = PrepareOptions { data_path: data, settings, workers: 1, batch: 1, shard_tokens: 4096, out: out.clone(), progress: Default::default(), regenerate_deadline: None };
    prepare(&m.tokenizer, &id, None, None, &opts).unwrap();
    (m, out)
}

/// A training config for the tiny fixture target (a 1-layer DFlash drafter, B = 4, 2 sequences ×
/// 8 anchors); `extra` are `--set` overrides applied after these.
pub fn tiny_train_config(data: &Path, out: &Path, extra: &[&str]) -> specauf::train::config::TrainConfig {
    let mut sets: Vec<String> = vec![
        format!("data={}", data.display()),
        format!("out={}", out.display()),
        "model=unused".into(),
        "drafter.layers=1".into(),
        "drafter.block_size=4".into(),
        "drafter.mask_token_id=0".into(),
        "num_anchors=8".into(),
        "batch_sequences=2".into(),
        "eval_sequences=4".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    specauf::train::config::TrainConfig::load(None, &sets).unwrap()
}

/// A run's metrics.jsonl, with the wall-clock field zeroed (it is not part of the result).
pub fn read_metrics(run: &Path) -> Vec<specauf::train::trainer::StepMetrics> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut m: specauf::train::trainer::StepMetrics = serde_json::from_str(l).unwrap();
            m.tokens_per_s = 0.0;
            m
        })
        .collect()
}

/// The specauf binary under test (the crate's own binary target).
pub fn specauf() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_specauf"))
}

/// Runs a specauf command that must fail without a panic and returns its error: stderr from the
/// `error: ` line on. Lines before it are progress (in a fresh home the first command that needs
/// an asset downloads it, and tests run in any order).
pub fn run_fail(args: &[&str]) -> String {
    let out = specauf().args(args).output().expect("run specauf");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{args:?} should fail; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    let at = stderr.find("error: ").unwrap_or_else(|| panic!("{args:?}: no `error: ` line in {stderr}"));
    assert!(at == 0 || stderr[..at].ends_with('\n'), "{args:?}: `error: ` does not start a line: {stderr}");
    stderr[at..].to_string()
}
