//! `specauf prepare`: chat conversations → masked token shards (+ regenerated replies, + a
//! feature cache) for drafter training. See `specauf::train::prepare` for the pipeline.

use std::path::PathBuf;

use anyhow::{bail, Context};
use specauf::assets;
use specauf::model::load::load_info;
use specauf::model::{load_model, WeightsMode, DEFAULT_MODEL};
use specauf::train::data::{FeatureDtype, FeatureSettings, ModelIdentity, PrepareSettings, Split};
use specauf::train::prepare::{prepare, PrepareOptions, DEFAULT_MAX_LEN, DEFAULT_SHARD_TOKENS};
use specauf::train::regenerate::{RegenerateMode, RegenerateSettings, GENERATOR};

/// Sequence length for targets other than the embedded default.
const DEFAULT_MAX_LEN_OTHER: usize = 2048;

#[derive(clap::Args, Debug)]
pub struct PrepareArgs {
    /// Target model: `smollm2` (the embedded default, fetched on first use), an HF directory
    /// (config.json + *.safetensors + tokenizer.json) or a .gguf file.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Conversations: `sharegpt` (ShareGPT V3, fetched on first use) or a ShareGPT-style JSON
    /// array / JSONL file (`conversations` or `messages`, `from/value` or `role/content`).
    #[arg(long, default_value = "sharegpt")]
    pub data: String,
    /// Output directory (shards, manifest.json, regenerated.jsonl).
    #[arg(long)]
    pub out: PathBuf,
    /// Use the first N conversations outside the benchmark hold-out, in file order [default: all].
    #[arg(long)]
    pub max_conversations: Option<usize>,
    /// Tokens per sequence; longer ones are cut [default: 512 for smollm2, 2048 otherwise].
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Exchanges (user + assistant turn) kept per conversation [default: 1 with --regenerate, all without].
    #[arg(long)]
    pub max_turns: Option<usize>,
    /// Fraction of conversations (by id hash) in the eval split.
    #[arg(long, default_value_t = 0.05)]
    pub eval_fraction: f64,
    /// Replace each assistant turn by the target's own reply: `greedy` or `sample`. Cached in
    /// OUT/regenerated.jsonl; a rerun resumes.
    #[arg(long, value_enum)]
    pub regenerate: Option<RegenerateMode>,
    /// Sampling temperature (with --regenerate sample).
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// Nucleus mass (with --regenerate sample); 1 = off.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Cap on the tokens of one regenerated reply (also capped by what fits in --max-len).
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Regeneration threads sharing the target, each with its own KV cache and its own pool of
    /// cores/workers kernel threads. On 2 cores, 2 workers measured the same as 1; more help
    /// where there are more cores than one decode uses.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Weights for regeneration: q8 (fast), f32 (reference), native (GGUF types as stored).
    #[arg(long, value_enum, default_value_t = WeightsMode::Q8)]
    pub weights: WeightsMode,
    /// Cache the target's hidden states after these layers (comma-separated ids, HF convention),
    /// e.g. 1,8,14: training then skips the target forward.
    #[arg(long, value_delimiter = ',')]
    pub features: Option<Vec<usize>>,
    /// Storage type of the feature cache.
    #[arg(long, value_enum, default_value_t = FeatureDtype::F16)]
    pub feature_dtype: FeatureDtype,
    /// Weights for the feature forward (f32 matches the trainer's online features).
    #[arg(long, value_enum, default_value_t = WeightsMode::F32)]
    pub feature_weights: WeightsMode,
    /// Seed of sampled regeneration.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Approximate tokens per shard.
    #[arg(long, default_value_t = DEFAULT_SHARD_TOKENS)]
    pub shard_tokens: usize,
}

pub fn run(a: PrepareArgs) -> anyhow::Result<()> {
    if a.regenerate.is_none() && a.workers != 1 {
        bail!("--workers only applies with --regenerate");
    }
    if a.workers == 0 {
        bail!("--workers must be at least 1");
    }
    let data_path = if a.data == "sharegpt" {
        assets::file(&assets::SHAREGPT, assets::SHAREGPT_JSON).context("fetching the ShareGPT data (`specauf fetch --all`)")?
    } else {
        PathBuf::from(&a.data)
    };
    let max_len = a.max_len.unwrap_or(if a.model == DEFAULT_MODEL { DEFAULT_MAX_LEN } else { DEFAULT_MAX_LEN_OTHER });
    let max_turns = a.max_turns.or(a.regenerate.map(|_| 1));
    let regenerate = a.regenerate.map(|mode| RegenerateSettings {
        mode,
        temperature: if mode == RegenerateMode::Greedy { 0.0 } else { a.temperature },
        top_p: if mode == RegenerateMode::Greedy { 1.0 } else { a.top_p },
        max_new_tokens: a.max_new_tokens,
        seed: a.seed,
        generator: GENERATOR.to_string(),
    });
    let features = a.features.clone().map(|ids| FeatureSettings {
        target_layer_ids: ids,
        dtype: a.feature_dtype,
        weights: a.feature_weights,
    });
    let settings = PrepareSettings {
        data: a.data.clone(),
        max_conversations: a.max_conversations,
        max_len,
        max_turns,
        eval_fraction: a.eval_fraction,
        seed: a.seed,
        regenerate,
        features,
    };

    // The weights are read only when something runs the target.
    let gen_model = match a.regenerate {
        Some(_) => Some(load_model(&a.model, a.weights).with_context(|| format!("loading model {}", a.model))?),
        None => None,
    };
    let feature_model = match (&a.features, &gen_model) {
        (Some(_), Some(m)) if a.feature_weights == a.weights => Some(FeatureTarget::Same(m)),
        (Some(_), _) => Some(FeatureTarget::Own(Box::new(
            load_model(&a.model, a.feature_weights).with_context(|| format!("loading model {} for features", a.model))?,
        ))),
        (None, _) => None,
    };
    let info;
    let (tok, identity) = match (&gen_model, &feature_model) {
        (Some(m), _) => (&m.tokenizer, ModelIdentity::of(m)?),
        (None, Some(FeatureTarget::Own(m))) => (&m.tokenizer, ModelIdentity::of(m)?),
        _ => {
            info = load_info(&a.model).with_context(|| format!("loading the tokenizer of {}", a.model))?;
            (&info.tokenizer, ModelIdentity::from_parts(&info.name, &info.location, &info.config)?)
        }
    };
    let feature_target = feature_model.as_ref().map(|f| match f {
        FeatureTarget::Same(m) => &m.target,
        FeatureTarget::Own(m) => &m.target,
    });

    eprintln!(
        "prepare: model {} ({} layers, hidden {}), data {}, max_len {max_len}, max_turns {}, eval {:.1}%, out {}",
        identity.name,
        identity.num_hidden_layers,
        identity.hidden_size,
        data_path.display(),
        max_turns.map_or("all".to_string(), |t| t.to_string()),
        a.eval_fraction * 100.0,
        a.out.display()
    );
    if let Some(r) = &settings.regenerate {
        eprintln!(
            "prepare: regenerating replies ({:?}, T {}, top-p {}, ≤ {} new tokens, {} worker(s), {:?} weights)",
            r.mode, r.temperature, r.top_p, r.max_new_tokens, a.workers, a.weights
        );
    }
    if let Some(f) = &settings.features {
        let dim = f.target_layer_ids.len() * identity.hidden_size;
        eprintln!(
            "prepare: caching features of layers {:?} ({dim} values a token, {} bytes a token in {:?})",
            f.target_layer_ids,
            dim * 2,
            f.dtype
        );
    }
    let opts = PrepareOptions {
        data_path,
        settings,
        workers: a.workers,
        shard_tokens: a.shard_tokens,
        out: a.out.clone(),
        progress: true,
    };
    let report = prepare(tok, &identity, gen_model.as_ref().map(|m| &m.target), feature_target, &opts)
        .with_context(|| format!("preparing {}", a.out.display()))?;

    let m = &report.manifest;
    let s = &m.source;
    let malformed: usize = s.skipped_records.values().sum();
    println!(
        "loaded {} conversations ({} malformed records skipped{}; {} in the benchmark hold-out), selected {} ({} share banners dropped)",
        s.loaded,
        malformed,
        if s.truncated_tail { ", file cut off mid-record" } else { "" },
        s.heldout_excluded,
        s.selected,
        s.share_banners_dropped,
    );
    if m.settings.regenerate.is_some() {
        let tps = report.generated_tokens as f64 / report.regenerate_seconds.max(1e-9);
        let cps = report.regenerated as f64 / report.regenerate_seconds.max(1e-9);
        println!(
            "regenerated {} conversations ({} reused from regenerated.jsonl): {} new tokens in {:.1} s, {:.2} conv/s, {:.1} tok/s",
            report.regenerated, report.reused, report.generated_tokens, report.regenerate_seconds, cps, tps
        );
    }
    for split in [Split::Train, Split::Eval] {
        if let Some(i) = m.splits.get(&split) {
            println!(
                "{:<5}: {} sequences, {} tokens ({} with loss), {} shard(s)",
                split.as_str(),
                i.sequences,
                i.tokens,
                i.loss_tokens,
                i.shards.len()
            );
        }
    }
    if !m.skipped.is_empty() {
        let list: Vec<String> = m.skipped.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!("selected conversations without a sequence: {}", list.join(", "));
    }
    if m.features.is_some() {
        println!("features cached in {:.1} s", report.feature_seconds);
    }
    println!("wrote {} in {:.1} s (settings hash {})", a.out.join("manifest.json").display(), report.total_seconds, &m.settings_hash[..16]);
    Ok(())
}

enum FeatureTarget<'a> {
    Same(&'a specauf::model::LoadedModel),
    Own(Box<specauf::model::LoadedModel>),
}
