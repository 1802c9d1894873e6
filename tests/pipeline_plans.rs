//! The pipeline's typed plans build exactly the configs that the command-line strings used to
//! (so runs started before the change resume, and give the same numbers), every default has one
//! source, and the objective's default γ follows the drafter actually trained.

use std::path::Path;

use specauf::drafter::{AnyDrafter, DFlashInitConfig, DrafterInit, DrafterKind};
use specauf::pipeline::experiment::PaperConfig;
use specauf::pipeline::quickstart::QuickstartPlan;
use specauf::pipeline::recipe::RecipeName;
use specauf::train::config::TrainConfig;
use specauf::train::trainable::{build_drafter, trainable};
use specauf::train::trainer::objective_for;

mod common;

fn from_sets(sets: &[String]) -> TrainConfig {
    TrainConfig::load(None, sets).unwrap()
}

#[test]
fn a_new_config_holds_the_same_defaults_as_a_parsed_one() {
    let (data, out) = (Path::new("/d"), Path::new("/o"));
    assert_eq!(TrainConfig::new(data, out), from_sets(&["data=/d".into(), "out=/o".into()]));
}

#[test]
fn the_quickstart_trains_the_config_its_set_strings_described() {
    let plan = QuickstartPlan::new(Path::new("/q"), RecipeName::Quick);
    let mut sets: Vec<String> = vec![
        "data=/q/data".into(),
        "out=/q/train".into(),
        format!("steps={}", plan.recipe.steps),
        "objective=auf".into(),
        "drafter.layers=2".into(),
        "drafter.block_size=4".into(),
        "drafter.target_layer_ids=[1, 27]".into(),
        "num_anchors=32".into(),
        "batch_sequences=2".into(),
        "optim.lr=0.002".into(),
        "checkpoint_every=50".into(),
        "eval_every=80".into(),
        "eval_sequences=8".into(),
        "drafter.init_layers_from_target=[28, 29]".into(),
    ];
    // bf16 products where the CPU runs them (the next test)
    if specauf::nn::Precision::Bf16.runs_here() {
        sets.extend(["head.precision=bf16".to_string(), "layer_precision=bf16".to_string()]);
    }
    assert_eq!(plan.train_config(), from_sets(&sets));
}

/// Both recipes train in bf16 where the CPU has AVX512-BF16 and in f32 elsewhere.
#[test]
fn the_recipes_products_are_bf16_only_where_the_cpu_runs_them() {
    use specauf::nn::Precision;
    let want = if Precision::Bf16.runs_here() { Precision::Bf16 } else { Precision::F32 };
    for name in [RecipeName::Quick, RecipeName::Cpu60Min] {
        assert_eq!(name.recipe().products, Precision::Bf16);
        let c = QuickstartPlan::new(Path::new("/q"), name).train_config();
        assert_eq!((c.head.precision, c.layer_precision), (want, want), "{name}");
    }
}

#[test]
fn each_experiment_arm_trains_the_config_its_set_strings_described() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/paper.json");
    let (cfg, _) = PaperConfig::read(&path).unwrap();
    let t = &cfg.train;
    for arm in &cfg.arms {
        let (data, dir) = (Path::new("/data"), Path::new("/arms").join(&arm.name));
        let sets: Vec<String> = vec![
            format!("model={}", cfg.model),
            "data=/data".into(),
            format!("out={}", dir.display()),
            format!("steps={}", t.steps),
            format!("objective={}", arm.objective),
            format!("drafter.kind={}", arm.drafter),
            format!("drafter.layers={}", t.layers),
            format!("drafter.block_size={}", t.block_size),
            format!("drafter.target_layer_ids={:?}", t.target_layer_ids),
            format!("num_anchors={}", t.num_anchors),
            format!("batch_sequences={}", t.batch_sequences),
            format!("optim.lr={}", t.lr),
            format!("seed={}", t.seed),
            "checkpoint_every=50".into(),
            format!("eval_every={}", t.steps),
            "eval_sequences=12".into(),
        ];
        assert_eq!(cfg.arm_config(arm, data, &dir).unwrap(), from_sets(&sets), "arm {}", arm.name);
    }
}

#[test]
fn an_experiment_config_with_an_unknown_arm_kind_is_refused_with_its_name() {
    let tmp = tempfile::tempdir().unwrap();
    let src = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/paper.json")).unwrap();
    let bad = src.replacen("\"drafter\": \"dflash\"", "\"drafter\": \"eagle\"", 1);
    assert_ne!(bad, src, "the fixture changed: no dflash arm to corrupt");
    let p = tmp.path().join("bad.json");
    std::fs::write(&p, bad).unwrap();
    let err = PaperConfig::read(&p).err().expect("an unknown drafter kind must be refused").to_string();
    assert!(err.contains("eagle") && err.contains("dflash"), "{err}");
}

#[test]
fn the_default_decay_gamma_follows_the_trained_drafters_block_size_not_the_configs() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, data) = common::prepared(tmp.path(), 4);
    // A B = 8 drafter to start from, while the config still says B = 16.
    let init = DrafterInit { kind: DrafterKind::DFlash, backbone: DFlashInitConfig::new(1, 8, 0), gru_hidden_dim: None, emb_dim: None };
    let start = tmp.path().join("start");
    AnyDrafter::init_random(m.target.config(), &init, 0).unwrap().save(&start).unwrap();
    let mut cfg = common::tiny_train_config(&data, &tmp.path().join("run"), &["objective=decay", "drafter.block_size=16"]);
    cfg.drafter.init_from = Some(start);
    let drafter = trainable(build_drafter(&cfg, &m.target).unwrap());
    assert_eq!(drafter.block_size(), 8);
    let resolved = objective_for(&cfg, drafter.as_ref()).unwrap();
    assert_eq!(resolved, cfg.objective.resolve(8).unwrap(), "γ must be B = 8's default (4)");
    assert_ne!(resolved, cfg.objective.resolve(16).unwrap(), "γ of the config's B = 16 (7) was the bug");
}

#[test]
fn the_quickstart_reports_tau_at_the_trained_block_size_beside_the_chosen_one() {
    let plan = QuickstartPlan::new(Path::new("/q"), RecipeName::Quick);
    let b = plan.train_config().drafter.block_size;
    let eval = plan.eval_plan(Path::new("/q/untrained"), Path::new("/q/drafter"));
    let fixed: Vec<(&str, Option<usize>)> = eval.drafters.iter().map(|d| (d.label.as_str(), d.block_size)).collect();
    assert_eq!(eval.block_size, None, "the plan-wide block size stays free for the measured choice");
    assert_eq!(fixed, vec![("untrained", Some(b)), (format!("dflash-auf B={b}").as_str(), Some(b)), ("dflash-auf", None)]);
    assert_eq!(eval.drafters[1].dir, eval.drafters[2].dir, "both trained entries are the same drafter");
    eval.validate().unwrap();
}

#[test]
fn every_experiment_arm_is_evaluated_at_the_trained_block_size() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/paper.json");
    let (cfg, _) = PaperConfig::read(&path).unwrap();
    let eval = cfg.eval_plan(Path::new("/x"), "specauf experiment paper").unwrap();
    assert_eq!(eval.block_size, Some(cfg.train.block_size));
    assert_eq!(eval.drafters.len(), cfg.arms.len());
}

#[test]
fn an_evaluation_with_two_drafters_of_one_label_is_refused() {
    use specauf::pipeline::stages::{EvalDrafterSpec, EvalPlan};
    let mut plan = EvalPlan::new("smollm2", Path::new("/tmp/e"));
    plan.drafters = vec![EvalDrafterSpec::new("a", "/d1"), EvalDrafterSpec::new("a", "/d2")];
    let err = plan.validate().unwrap_err().to_string();
    assert!(err.contains("labelled `a`") && err.contains("--label"), "{err}");
    plan.drafters[1] = EvalDrafterSpec::new("b", "/d2").at_block_size(1);
    assert!(plan.validate().unwrap_err().to_string().contains("at least 2"));
}

/// experiments/narrow/run.sh trains its drafters on bench spec's own first 8 prompts (that is
/// the point of a narrow drafter): the checked-in file must hold exactly those, under 3 ids each.
#[test]
fn the_narrow_drafter_prompts_are_bench_specs_first_eight() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/experiments/narrow/prompts.jsonl")).unwrap();
    let mut seen: Vec<String> = Vec::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let p = v["conversations"][0]["value"].as_str().unwrap().to_string();
        if seen.last() != Some(&p) {
            seen.push(p);
        }
    }
    let want: Vec<String> = specauf::pipeline::spec_bench::CHAT_PROMPTS[..8].iter().map(|s| s.to_string()).collect();
    assert_eq!(seen, want);
    assert_eq!(text.lines().count(), 24);
}

#[test]
fn a_topic_setting_without_topics_is_refused_before_anything_loads() {
    use specauf::data::topic::Topic;
    use specauf::pipeline::stages::{prepare, PreparePlan};
    let tmp = tempfile::tempdir().unwrap();
    // a model path that does not exist: the refusal must come before any loading
    let mut plan = PreparePlan::new("/nonexistent/model.gguf", "/nonexistent/data.json", tmp.path());
    plan.topics_after = 400;
    let err = prepare(&plan, Default::default()).unwrap_err().to_string();
    assert!(err.contains("--topics-after only applies with --topics"), "{err}");
    plan.topics = Some(Vec::<Topic>::new());
    let err = prepare(&plan, Default::default()).unwrap_err().to_string();
    assert!(err.contains("--topics needs at least one of chat, code, math"), "{err}");
}
