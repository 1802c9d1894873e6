//! `prepare` end to end on small inputs: regeneration with the tiny llama fixture target and a
//! 256-id character tokenizer written here (so that generated ids decode and re-encode
//! exactly), resumption, shards, the feature cache, and the checks that refuse stale data.

use std::path::Path;

use specauf::model::load::{load_info, load_model};
use specauf::model::WeightsMode;
use specauf::data::{
    tokenize_chat, ChatExample, DataError, Dataset, FeatureDtype, FeatureSettings, Manifest, ModelIdentity, PrepareSettings,
    Split,
};
use specauf::data::features::{target_features, FeatureCache, FeatureError};
use specauf::data::prepare::{prepare, prepare_with, PrepareError, PrepareOptions, PrepareReport};
use specauf::data::regenerate::{RegenerateError, RegenerateSettings, Reply, ReplyError, ReplyRequest, REGENERATED_FILE};
use specauf::data::sharegpt::{id_is_heldout, ShareGptError};
use specauf::data::topic::{Topic, TopicFilter};

mod common;
use common::{ids, tiny_model_dir, write_data};

fn settings(max_conversations: usize, regenerate: Option<RegenerateSettings>) -> PrepareSettings {
    PrepareSettings {
        data: "data.jsonl".into(),
        max_conversations: Some(max_conversations),
        max_len: 160,
        max_turns: Some(2),
        eval_fraction: 0.25,
        seed: 7,
        regenerate,
        features: None,
        topics: None,
    }
}

fn options(data: &Path, out: &Path, settings: PrepareSettings) -> PrepareOptions {
    PrepareOptions {
        data_path: data.to_path_buf(),
        settings,
        workers: 1,
        batch: 1,
        shard_tokens: 300,
        out: out.to_path_buf(),
        progress: Default::default(),
        regenerate_deadline: None,
    }
}

fn sample(max_new_tokens: usize) -> RegenerateSettings {
    let mut s = RegenerateSettings::greedy(max_new_tokens);
    s.mode = specauf::data::regenerate::RegenerateMode::Sample;
    s.temperature = 0.8;
    s.top_p = 0.95;
    s
}

fn run_tiny(model_dir: &Path, data: &Path, out: &Path, settings: PrepareSettings, workers: usize) -> Result<PrepareReport, PrepareError> {
    let m = load_model(model_dir.to_str().unwrap(), WeightsMode::F32).unwrap();
    let id = ModelIdentity::of(&m).unwrap();
    let mut opts = options(data, out, settings);
    opts.workers = workers;
    prepare(&m.tokenizer, &id, Some(&m.target), Some(&m.target), &opts)
}

/// Every file of a prepared directory, by name.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    v.sort();
    v
}

#[test]
fn regeneration_resumed_after_a_limit_writes_the_same_files_as_one_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(tmp.path());
    let data = write_data(tmp.path(), 8, false);
    let (whole, resumed) = (tmp.path().join("whole"), tmp.path().join("resumed"));

    let r = run_tiny(&model, &data, &whole, settings(8, Some(sample(12))), 1).unwrap();
    assert_eq!((r.regenerated, r.reused), (8, 0));
    assert!(r.generated_tokens > 0);

    let first = run_tiny(&model, &data, &resumed, settings(3, Some(sample(12))), 1).unwrap();
    assert_eq!((first.regenerated, first.reused), (3, 0));
    let rest = run_tiny(&model, &data, &resumed, settings(8, Some(sample(12))), 1).unwrap();
    assert_eq!((rest.regenerated, rest.reused), (5, 3));
    assert_eq!(files(&whole), files(&resumed));

    // A third run regenerates nothing.
    let again = run_tiny(&model, &data, &resumed, settings(8, Some(sample(12))), 1).unwrap();
    assert_eq!((again.regenerated, again.reused, again.generated_tokens), (0, 8, 0));
    assert_eq!(files(&whole), files(&resumed));
}

#[test]
fn a_killed_run_leaves_a_partial_line_that_the_rerun_cuts_and_redoes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(tmp.path());
    let data = write_data(tmp.path(), 5, false);
    let (whole, killed) = (tmp.path().join("whole"), tmp.path().join("killed"));
    run_tiny(&model, &data, &whole, settings(5, Some(RegenerateSettings::greedy(10))), 1).unwrap();

    run_tiny(&model, &data, &killed, settings(2, Some(RegenerateSettings::greedy(10))), 1).unwrap();
    let cache = killed.join(REGENERATED_FILE);
    let mut text = std::fs::read_to_string(&cache).unwrap();
    text.push_str(r#"{"id": "conv9", "source_hash": 1, "messa"#);
    std::fs::write(&cache, text).unwrap();
    std::fs::remove_file(killed.join("manifest.json")).unwrap();
    let r = run_tiny(&model, &data, &killed, settings(5, Some(RegenerateSettings::greedy(10))), 1).unwrap();
    assert_eq!((r.regenerated, r.reused), (3, 2));
    assert_eq!(files(&whole), files(&killed));
}

#[test]
fn worker_threads_produce_the_same_dataset_as_one_thread() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(tmp.path());
    let data = write_data(tmp.path(), 6, false);
    let (one, three) = (tmp.path().join("one"), tmp.path().join("three"));
    run_tiny(&model, &data, &one, settings(6, Some(sample(10))), 1).unwrap();
    run_tiny(&model, &data, &three, settings(6, Some(sample(10))), 3).unwrap();
    let sorted_lines = |d: &Path| {
        let mut l: Vec<String> = std::fs::read_to_string(d.join(REGENERATED_FILE)).unwrap().lines().map(String::from).collect();
        l.sort();
        l
    };
    assert_eq!(sorted_lines(&one), sorted_lines(&three));
    let shards = |d: &Path| files(d).into_iter().filter(|(n, _)| n.ends_with(".safetensors") || n == "manifest.json").collect::<Vec<_>>();
    assert_eq!(shards(&one), shards(&three));
}

/// The dataset files that do not depend on the order conversations finished in: shards,
/// manifest, and the regenerated lines sorted.
fn dataset(d: &Path) -> (Vec<(String, Vec<u8>)>, Vec<String>) {
    let mut lines: Vec<String> = std::fs::read_to_string(d.join(REGENERATED_FILE)).unwrap().lines().map(String::from).collect();
    lines.sort();
    let shards = files(d).into_iter().filter(|(n, _)| n.ends_with(".safetensors") || n == "manifest.json").collect();
    (shards, lines)
}

#[test]
fn batched_regeneration_writes_the_same_dataset_as_single_stream_regeneration() {
    // q8: the target's batched forward is batch-invariant, so prepare decodes in batches; the
    // reference is today's single-stream path (a closure over `reply_with_target`, one reply
    // at a time, through prepare_with).
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(tmp.path());
    let data = write_data(tmp.path(), 7, false);
    let m = load_model(model.to_str().unwrap(), WeightsMode::Q8).unwrap();
    assert!(m.target.is_batch_invariant());
    let id = ModelIdentity::of(&m).unwrap();
    let eos = specauf::model::stop_token_ids(&m.target.config().eos_token_ids, &m.tokenizer);
    let single = |p: &[u32], r: &ReplyRequest| -> Result<Reply, ReplyError> {
        specauf::data::regenerate::reply_with_target(&m.target, &eos, p, r).map_err(ReplyError::from)
    };
    for (name, rs) in [("greedy", RegenerateSettings::greedy(12)), ("sample", sample(12))] {
        let reference = tmp.path().join(format!("{name}-single"));
        prepare_with(&m.tokenizer, &id, Some(&single), None, &options(&data, &reference, settings(7, Some(rs.clone())))).unwrap();
        let want = dataset(&reference);
        assert_eq!(want.1.len(), 7);
        for (workers, batch) in [(1, 1), (1, 3), (1, 16), (2, 2)] {
            let out = tmp.path().join(format!("{name}-{workers}x{batch}"));
            let mut opts = options(&data, &out, settings(7, Some(rs.clone())));
            (opts.workers, opts.batch) = (workers, batch);
            let r = prepare(&m.tokenizer, &id, Some(&m.target), None, &opts).unwrap();
            assert_eq!(r.regenerated, 7);
            assert!(dataset(&out) == want, "{name}: {workers} worker(s) × batch {batch} differ from single-stream regeneration");
        }
        // The cache made in batches is the single-stream one: a single-stream rerun reuses it.
        let out = tmp.path().join(format!("{name}-1x16"));
        let mut opts = options(&data, &out, settings(7, Some(rs)));
        (opts.workers, opts.batch) = (1, 1);
        let r = prepare(&m.tokenizer, &id, Some(&m.target), None, &opts).unwrap();
        assert_eq!((r.regenerated, r.reused), (0, 7));
    }
}

#[test]
fn a_rerun_with_other_regeneration_settings_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(tmp.path());
    let data = write_data(tmp.path(), 2, false);
    let out = tmp.path().join("out");
    run_tiny(&model, &data, &out, settings(2, Some(RegenerateSettings::greedy(6))), 1).unwrap();
    let err = run_tiny(&model, &data, &out, settings(2, Some(RegenerateSettings::greedy(9))), 1).unwrap_err();
    let PrepareError::Regenerate(RegenerateError::SettingsChanged { what, .. }) = &err else { panic!("{err}") };
    assert!(what.contains("max_new_tokens"), "{what}");
    // The same settings with the target in another weights mode: its greedy replies are another
    // model's, so the f32 cache is not reused.
    let m = load_model(model.to_str().unwrap(), WeightsMode::Q8).unwrap();
    let id = ModelIdentity::of(&m).unwrap();
    let opts = options(&data, &out, settings(2, Some(RegenerateSettings::greedy(6))));
    let err = prepare(&m.tokenizer, &id, Some(&m.target), None, &opts).unwrap_err();
    let PrepareError::Regenerate(RegenerateError::SettingsChanged { what, .. }) = &err else { panic!("{err}") };
    assert!(what.contains("weights") && what.contains("f32") && what.contains("q8"), "{what}");
}

#[test]
fn regenerated_replies_are_the_targets_and_their_masks_cover_them() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tiny_model_dir(tmp.path());
    let data = write_data(tmp.path(), 3, false);
    let out = tmp.path().join("out");
    let mut s = settings(3, Some(RegenerateSettings::greedy(6)));
    s.eval_fraction = 0.0;
    run_tiny(&model_dir, &data, &out, s, 1).unwrap();
    let m = load_model(model_dir.to_str().unwrap(), WeightsMode::F32).unwrap();
    let ds = Dataset::open(&out, Split::Train).unwrap();
    assert_eq!(ds.len(), 3);
    for line in std::fs::read_to_string(out.join(REGENERATED_FILE)).unwrap().lines() {
        let rec: specauf::data::regenerate::RegeneratedRecord = serde_json::from_str(line).unwrap();
        // The user turns are the source's; each reply is the target's greedy continuation.
        assert!(rec.messages[0].content.starts_with("Question number"));
        let prompt = m.tokenizer.encode_chat(&rec.messages[..1], true).unwrap();
        let req = ReplyRequest { max_new_tokens: 6, temperature: 0.0, top_p: 1.0, seed: 0 };
        let reply = specauf::data::regenerate::reply_with_target(&m.target, &[2], &prompt, &req).unwrap();
        assert_eq!(m.tokenizer.encode(&rec.messages[1].content, false).unwrap(), reply.token_ids);
        assert_eq!(rec.closed[0], reply.stopped);
        let i = (0..ds.len()).find(|&i| ds.conversation_id(i).unwrap() == rec.id).unwrap();
        let seq = ds.get(i);
        assert_eq!(seq, tokenize_chat(&m.tokenizer, &rec.example(), 160).unwrap());
        let first_reply: Vec<u32> = seq
            .input_ids
            .iter()
            .zip(&seq.loss_mask)
            .skip(prompt.len())
            .take_while(|(_, &mk)| mk == 1)
            .map(|(&t, _)| t)
            .collect();
        let mut want = reply.token_ids.clone();
        if reply.stopped {
            want.push(2);
        }
        assert_eq!(first_reply, want);
    }
}

/// The SmolLM2 tokenizer without its weights: enough for tokenization-only runs.
fn smollm2() -> (specauf::tokenizer::Tokenizer, ModelIdentity) {
    let info = load_info("smollm2").expect("fetching SmolLM2");
    let id = ModelIdentity::from_parts(&info.name, &info.location, &info.config).unwrap();
    (info.tokenizer, id)
}

#[test]
fn shards_round_trip_to_the_tokenized_conversations_and_held_out_ones_never_appear() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(tmp.path(), 12, true);
    let out = tmp.path().join("out");
    let (tok, id) = smollm2();
    let mut s = settings(100, None);
    s.max_turns = None;
    s.eval_fraction = 0.3;
    let r = prepare_with(&tok, &id, None, None, &options(&data, &out, s)).unwrap();
    let m = &r.manifest;
    assert_eq!(m.source.heldout_excluded, 1);
    assert_eq!(m.source.selected, 12);
    // Malformed records are counted by reason, never fatal.
    assert_eq!(m.source.skipped_records.get("bad_json"), Some(&1));
    assert_eq!(m.source.skipped_records.get("unknown_role"), Some(&1));
    assert_eq!(m.source.skipped_records.get("empty_content"), Some(&1));
    assert!(m.skipped.is_empty(), "every selected conversation fits: {:?}", m.skipped);

    let loaded = specauf::data::sharegpt::load(&data).unwrap();
    let (train, eval) = (Dataset::open(&out, Split::Train).unwrap(), Dataset::open(&out, Split::Eval).unwrap());
    assert_eq!(train.len() + eval.len(), 12);
    assert!(!train.is_empty() && !eval.is_empty(), "a 0.3 eval fraction over 12 ids should fill both splits");
    assert!(m.splits[&Split::Train].shards.len() > 1, "300-token shards should split the train part");
    for ds in [&train, &eval] {
        assert_eq!(ds.total_tokens(), m.splits[&ds.split()].tokens);
        for i in 0..ds.len() {
            let cid = ds.conversation_id(i).unwrap();
            assert!(!id_is_heldout(cid));
            assert_eq!(specauf::data::is_eval(cid, 0.3), ds.split() == Split::Eval);
            let conv = loaded.conversations.iter().find(|c| c.id == cid).unwrap();
            let (ex, _) = ChatExample::from_conversation(conv, None);
            assert_eq!(ds.get(i), tokenize_chat(&tok, &ex, 160).unwrap());
        }
        assert!(matches!(ds.try_get(ds.len()), Err(DataError::IndexOutOfRange { .. })));
    }
}

#[test]
fn a_file_with_no_usable_conversation_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (tok, id) = smollm2();
    let path = tmp.path().join("bad.jsonl");
    std::fs::write(&path, "{not json\n{\"id\": \"a\", \"conversations\": [{\"from\": \"gpt\", \"value\": \"x\"}]}\n").unwrap();
    let err = prepare_with(&tok, &id, None, None, &options(&path, &tmp.path().join("o"), settings(5, None))).unwrap_err();
    assert!(matches!(err, PrepareError::Source(ShareGptError::NoUsableConversation { .. })), "{err}");

    // Only held-out conversations: usable for evaluation, never for training.
    let (_, heldout) = ids(0);
    std::fs::write(&path, format!("{{\"id\": \"{heldout}\", \"conversations\": [{{\"from\": \"human\", \"value\": \"q\"}}, {{\"from\": \"gpt\", \"value\": \"a\"}}]}}\n")).unwrap();
    let err = prepare_with(&tok, &id, None, None, &options(&path, &tmp.path().join("o"), settings(5, None))).unwrap_err();
    assert!(matches!(err, PrepareError::NothingSelected { .. }), "{err}");
    assert!(err.to_string().contains("hold-out"), "{err}");
}

fn max_rel_err(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a.len(), b.len());
    a.iter().zip(&b).map(|(x, y)| (x - y).abs() / y.abs().max(1.0)).fold(0.0, f32::max)
}

#[test]
fn the_feature_cache_equals_online_features_within_storage_precision() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tiny_model_dir(tmp.path());
    let data = write_data(tmp.path(), 5, false);
    let m = load_model(model_dir.to_str().unwrap(), WeightsMode::F32).unwrap();
    let id = ModelIdentity::of(&m).unwrap();
    for (dtype, tol) in [(FeatureDtype::F16, 1e-3), (FeatureDtype::Bf16, 8e-3)] {
        let out = tmp.path().join(format!("{dtype:?}"));
        let mut s = settings(5, None);
        s.eval_fraction = 0.3;
        s.features = Some(FeatureSettings { target_layer_ids: vec![2, 0], dtype, weights: WeightsMode::F32, soft_labels: None });
        prepare(&m.tokenizer, &id, None, Some(&m.target), &options(&data, &out, s)).unwrap();
        for split in [Split::Train, Split::Eval] {
            let ds = Dataset::open(&out, split).unwrap();
            let cache = FeatureCache::open(&out, split, &id, &[2, 0]).unwrap();
            assert_eq!(cache.len(), ds.len());
            assert_eq!(cache.dim(), 2 * m.target.config().hidden_size);
            for i in 0..ds.len() {
                let cached = cache.get(i).unwrap();
                let online = target_features(&m.target, ds.input_ids(i).unwrap(), &[2, 0]).unwrap();
                assert_eq!(cached.dims(), online.dims());
                let err = max_rel_err(&cached, &online);
                assert!(err <= tol, "{dtype:?} sequence {i}: error {err} > {tol}");
                assert!(err > 0.0 || dtype == FeatureDtype::F16, "bf16 storage should not be exact");
            }
        }
        // Other layers, or another model, are refused.
        let err = FeatureCache::open(&out, Split::Train, &id, &[0, 2]).unwrap_err();
        assert!(matches!(err, FeatureError::LayerMismatch { .. }), "{err}");
        let mut other = id.clone();
        other.fingerprint = "0123".into();
        let err = FeatureCache::open(&out, Split::Train, &other, &[2, 0]).unwrap_err();
        assert!(matches!(err, FeatureError::Data(DataError::ModelMismatch { .. })), "{err}");
    }
}

#[test]
fn a_stale_or_tampered_dataset_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(tmp.path(), 6, false);
    let (tok, id) = smollm2();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    prepare_with(&tok, &id, None, None, &options(&data, &a, settings(6, None))).unwrap();
    let mut other = settings(6, None);
    other.max_len = 150;
    prepare_with(&tok, &id, None, None, &options(&data, &b, other)).unwrap();
    assert!(Dataset::open(&a, Split::Train).is_ok());

    // A manifest edited by hand no longer matches its own hash.
    let manifest_path = a.join("manifest.json");
    let original = std::fs::read_to_string(&manifest_path).unwrap();
    let mut edited: serde_json::Value = serde_json::from_str(&original).unwrap();
    edited["settings"]["max_len"] = 4096.into();
    std::fs::write(&manifest_path, edited.to_string()).unwrap();
    assert!(matches!(Dataset::open(&a, Split::Train), Err(DataError::Stale { .. })));
    std::fs::write(&manifest_path, &original).unwrap();

    // A shard from another run (other settings) is refused even where its size matches.
    let shard = Manifest::read(&a).unwrap().splits[&Split::Train].shards[0].file.clone();
    let saved = std::fs::read(a.join(&shard)).unwrap();
    std::fs::copy(b.join(&shard), a.join(&shard)).unwrap();
    let err = Dataset::open(&a, Split::Train).unwrap_err();
    assert!(matches!(err, DataError::Stale { .. }), "{err}");
    let mut patched = saved.clone();
    let at = patched.windows(8).position(|w| w == b"settings").unwrap();
    let hash_at = at + patched[at..].iter().position(|&c| c.is_ascii_hexdigit()).unwrap();
    patched[hash_at] = if patched[hash_at] == b'0' { b'1' } else { b'0' };
    std::fs::write(a.join(&shard), &patched).unwrap();
    let err = Dataset::open(&a, Split::Train).unwrap_err();
    assert!(matches!(err, DataError::Stale { .. }), "{err}");
    std::fs::write(a.join(&shard), &saved).unwrap();
    assert!(Dataset::open(&a, Split::Train).is_ok());

    // The trainer's model check.
    let m = Manifest::read(&a).unwrap();
    assert!(m.check_model(&a, &id).is_ok());
    let mut other_model = id.clone();
    other_model.hidden_size += 1;
    assert!(matches!(m.check_model(&a, &other_model), Err(DataError::ModelMismatch { .. })));

    // No manifest: an unfinished run.
    std::fs::remove_file(&manifest_path).unwrap();
    assert!(matches!(Dataset::open(&a, Split::Train), Err(DataError::NoManifest { .. })));
}

#[test]
fn the_eval_split_is_a_stable_function_of_the_conversation_id() {
    use specauf::data::is_eval;
    let ids: Vec<String> = (0..2000).map(|i| format!("id{i}")).collect();
    let n = ids.iter().filter(|id| is_eval(id, 0.05)).count();
    assert!((60..=140).contains(&n), "{n} of 2000 in a 5% split");
    assert!(ids.iter().all(|id| !is_eval(id, 0.0)));
    assert!(ids.iter().all(|id| is_eval(id, 1.0)));
    // Chunks of one ShareGPT conversation fall on the same side.
    for base in ["AbC1234", "Zz9Yy8X", "q1w2e3r"] {
        let sides: Vec<bool> = (0..5).map(|k| is_eval(&format!("{base}_{k}"), 0.5)).collect();
        assert!(sides.iter().all(|&s| s == sides[0]), "{base}: {sides:?}");
    }
}

#[test]
fn a_reply_generator_closure_drives_regeneration_without_a_model() {
    // The regeneration code only needs prompt ids -> reply ids: a fake generator that echoes
    // the prompt's last tokens shows the per-turn seeds and limits it is called with.
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(tmp.path(), 3, false);
    let (tok, id) = smollm2();
    let calls = std::sync::Mutex::new(Vec::new());
    let fake = |prompt: &[u32], req: &ReplyRequest| -> Result<Reply, ReplyError> {
        calls.lock().unwrap().push((prompt.len(), req.max_new_tokens, req.seed));
        let hello = tok.encode("Hello there, friend.", false).unwrap();
        Ok(Reply { token_ids: hello, stopped: true })
    };
    let out = tmp.path().join("out");
    let mut s = settings(3, Some(RegenerateSettings::greedy(50)));
    s.eval_fraction = 0.0;
    let r = prepare_with(&tok, &id, Some(&fake), None, &options(&data, &out, s)).unwrap();
    assert_eq!(r.regenerated, 3);
    let calls = calls.into_inner().unwrap();
    assert_eq!(calls.len(), 6, "two exchanges per conversation");
    assert!(calls.iter().all(|&(_, max_new, _)| max_new == 50));
    let seeds: std::collections::HashSet<u64> = calls.iter().map(|c| c.2).collect();
    assert_eq!(seeds.len(), 6, "every turn has its own seed");
    let ds = Dataset::open(&out, Split::Train).unwrap();
    for i in 0..ds.len() {
        let seq = ds.get(i);
        let masked: Vec<u32> = seq.input_ids.iter().zip(&seq.loss_mask).filter(|(_, &m)| m == 1).map(|(&t, _)| t).collect();
        assert_eq!(tok.decode(&masked, false).unwrap(), "Hello there, friend.<|im_end|>".repeat(2));
    }
}

#[test]
fn a_conversation_whose_first_prompt_fills_the_window_is_skipped_before_generation() {
    let tmp = tempfile::tempdir().unwrap();
    let (ids, _) = ids(2);
    let long = "many words ".repeat(200);
    let lines = [
        serde_json::json!({"id": ids[0], "conversations": [{"from": "human", "value": long}, {"from": "gpt", "value": "x"}]}),
        serde_json::json!({"id": ids[1], "conversations": [{"from": "human", "value": "Hi!"}, {"from": "gpt", "value": "Hello."}]}),
    ];
    let data = tmp.path().join("data.jsonl");
    std::fs::write(&data, lines.iter().map(|l| l.to_string() + "\n").collect::<String>()).unwrap();
    let (tok, id) = smollm2();
    let prompts = std::sync::Mutex::new(Vec::new());
    let fake = |prompt: &[u32], req: &ReplyRequest| -> Result<Reply, ReplyError> {
        prompts.lock().unwrap().push((prompt.len(), req.max_new_tokens));
        Ok(Reply { token_ids: tok.encode("Hello to you too.", false).unwrap(), stopped: true })
    };
    let mut s = settings(2, Some(RegenerateSettings::greedy(500)));
    s.eval_fraction = 0.0;
    let r = prepare_with(&tok, &id, Some(&fake), None, &options(&data, &tmp.path().join("out"), s)).unwrap();
    assert_eq!(r.manifest.skipped.get("prompt_exceeds_max_len"), Some(&1));
    assert_eq!(r.manifest.splits[&Split::Train].sequences, 1);
    let prompts = prompts.into_inner().unwrap();
    assert_eq!(prompts.len(), 1, "the long prompt is never generated for");
    // The reply budget is what still fits in max_len (160), not the 500 asked.
    assert_eq!(prompts[0].0 + prompts[0].1, 160);
}

#[test]
fn soft_labels_in_the_cache_are_the_targets_top_k_logits() {
    use specauf::data::features::{target_features_soft, SoftLabels};
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tiny_model_dir(tmp.path());
    let data = write_data(tmp.path(), 4, false);
    let m = load_model(model_dir.to_str().unwrap(), WeightsMode::F32).unwrap();
    let id = ModelIdentity::of(&m).unwrap();
    let out = tmp.path().join("soft");
    let mut s = settings(4, None);
    s.features = Some(FeatureSettings { target_layer_ids: vec![1], dtype: FeatureDtype::F16, weights: WeightsMode::F32, soft_labels: Some(5) });
    prepare(&m.tokenizer, &id, None, Some(&m.target), &options(&data, &out, s)).unwrap();
    let ds = Dataset::open(&out, Split::Train).unwrap();
    let cache = FeatureCache::open(&out, Split::Train, &id, &[1]).unwrap();
    assert_eq!(cache.info().soft_labels, Some(5));
    for i in 0..ds.len() {
        let ids = ds.input_ids(i).unwrap();
        let got = cache.soft_labels(i).unwrap().expect("soft labels");
        let (_, want) = target_features_soft(&m.target, ids, &[1], Some(5)).unwrap();
        let want = want.unwrap();
        assert_eq!((got.k, got.len()), (5, ids.len()));
        assert_eq!(got.ids, want.ids, "sequence {i}: the same top-5 ids in the same order");
        for (a, b) in got.logits.iter().zip(&want.logits) {
            assert!((a - b).abs() <= 2e-3 * b.abs().max(1.0), "f16 storage: {a} vs {b}");
        }
        // Row t's first id is the target's greedy next token; logits descend.
        for t in 0..got.len() {
            let row = &got.logits[t * 5..(t + 1) * 5];
            assert!(row.windows(2).all(|w| w[0] >= w[1]), "{row:?}");
        }
        let p = got.probs(0, 1.0);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5 && p[0] >= p[4]);
    }
    // Top-k by hand on a small matrix: ties go to the lower id.
    let l = candle_core::Tensor::new(&[[0.5f32, 2.0, 2.0, -1.0], [3.0, 1.0, 0.0, 4.0]], &candle_core::Device::Cpu).unwrap();
    let top = SoftLabels::top_k(&l, 2).unwrap();
    assert_eq!(top.ids, vec![1, 2, 3, 0]);
    assert_eq!(top.logits, vec![2.0, 2.0, 4.0, 3.0]);
    // A cache without soft labels answers None; --soft-labels 0 is refused.
    let plain = tmp.path().join("plain");
    let mut s = settings(4, None);
    s.features = Some(FeatureSettings { target_layer_ids: vec![1], dtype: FeatureDtype::F16, weights: WeightsMode::F32, soft_labels: None });
    prepare(&m.tokenizer, &id, None, Some(&m.target), &options(&data, &plain, s)).unwrap();
    assert!(FeatureCache::open(&plain, Split::Train, &id, &[1]).unwrap().soft_labels(0).unwrap().is_none());
    let mut s = settings(4, None);
    s.features = Some(FeatureSettings { target_layer_ids: vec![1], dtype: FeatureDtype::F16, weights: WeightsMode::F32, soft_labels: Some(0) });
    let err = prepare(&m.tokenizer, &id, None, Some(&m.target), &options(&data, &tmp.path().join("zero"), s)).unwrap_err();
    assert!(err.to_string().contains("--soft-labels"), "{err}");
}

#[test]
fn topics_keep_the_first_conversations_then_only_the_chosen_topics() {
    let tmp = tempfile::tempdir().unwrap();
    let (tok, id) = smollm2();
    // even conversations ask for code, odd ones for a story
    let (ids, _) = ids(8);
    let path = tmp.path().join("mixed.jsonl");
    let lines: Vec<String> = ids
        .iter()
        .enumerate()
        .map(|(k, cid)| {
            let ask = if k % 2 == 0 { format!("Write a Python function number {k}.") } else { format!("Tell me story number {k}.") };
            serde_json::json!({"id": cid, "conversations": [{"from": "human", "value": ask}, {"from": "gpt", "value": "Sure."}]})
                .to_string()
        })
        .collect();
    std::fs::write(&path, lines.join("\n")).unwrap();
    let mut s = settings(4, None);
    s.eval_fraction = 0.0;
    s.topics = Some(TopicFilter { topics: vec![Topic::Code], after: 2 });
    let out = tmp.path().join("out");
    let r = prepare_with(&tok, &id, None, None, &options(&path, &out, s.clone())).unwrap();
    // conversations 0 and 1 whatever their topic, then the code ones: 2 and 4; 3 passed over
    assert_eq!(r.manifest.source.selected, 4);
    assert_eq!(r.manifest.source.off_topic, 1);
    let train = Dataset::open(&out, Split::Train).unwrap();
    let got: Vec<&str> = (0..train.len()).map(|i| train.conversation_id(i).unwrap()).collect();
    assert_eq!(got, [&ids[0], &ids[1], &ids[2], &ids[4]].map(|s| s.as_str()));
    assert_eq!(r.manifest.settings.topics, s.topics, "the manifest records the filter");

    // a filter that no conversation passes leaves nothing: a clear error that counts them
    s.topics = Some(TopicFilter { topics: vec![Topic::Math], after: 0 });
    let err = prepare_with(&tok, &id, None, None, &options(&path, &tmp.path().join("none"), s)).unwrap_err();
    assert!(matches!(err, PrepareError::NothingSelected { .. }), "{err}");
    assert!(err.to_string().contains("8 off the chosen topics"), "{err}");
}

#[test]
fn a_regeneration_deadline_leaves_the_rest_out_and_a_rerun_without_one_completes_it() {
    // a generator that takes 60 ms a reply, a deadline 150 ms in: some conversations are
    // answered, the rest never started and are counted, not silently dropped
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(tmp.path(), 8, false);
    let (tok, id) = smollm2();
    let slow = |_: &[u32], _: &ReplyRequest| -> Result<Reply, ReplyError> {
        std::thread::sleep(std::time::Duration::from_millis(60));
        Ok(Reply { token_ids: tok.encode("Sure.", false).unwrap(), stopped: true })
    };
    let out = tmp.path().join("out");
    let mut s = settings(8, Some(RegenerateSettings::greedy(20)));
    s.eval_fraction = 0.0;
    s.max_turns = Some(1);
    let mut opts = options(&data, &out, s.clone());
    opts.regenerate_deadline = Some(std::time::Instant::now() + std::time::Duration::from_millis(150));
    let cut = prepare_with(&tok, &id, Some(&slow), None, &opts).unwrap();
    let left = cut.manifest.skipped.get(specauf::data::prepare::NOT_REACHED).copied().unwrap_or(0);
    assert!(cut.regenerated >= 1 && left >= 1, "regenerated {}, left out {left}", cut.regenerated);
    assert_eq!(cut.regenerated + left, 8);
    assert_eq!(Dataset::open(&out, Split::Train).unwrap().len(), cut.regenerated);
    // a deadline already past answers nothing: a clear error, not an empty dataset
    let none = tmp.path().join("none");
    let mut past = options(&data, &none, s.clone());
    past.regenerate_deadline = Some(std::time::Instant::now());
    let err = prepare_with(&tok, &id, Some(&slow), None, &past).unwrap_err();
    assert!(err.to_string().contains(specauf::data::prepare::NOT_REACHED), "{err}");
    // the same folder without a deadline reuses what was answered and answers the rest
    std::fs::remove_file(out.join("manifest.json")).unwrap();
    let full = prepare_with(&tok, &id, Some(&slow), None, &options(&data, &out, s)).unwrap();
    assert_eq!((full.reused, full.regenerated), (cut.regenerated, 8 - cut.regenerated));
    assert!(!full.manifest.skipped.contains_key(specauf::data::prepare::NOT_REACHED));
}
