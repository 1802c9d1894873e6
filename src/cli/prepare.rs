//! `specauf prepare`: chat conversations → masked token shards (+ regenerated replies, + a
//! feature cache) for drafter training. See `specauf::data::prepare` for the pipeline.

use std::path::PathBuf;

use specauf::data::prepare::DEFAULT_SHARD_TOKENS;
use specauf::data::regenerate::{RegenerateMode, DEFAULT_BATCH};
use specauf::data::topic::Topic;
use specauf::data::{FeatureDtype, Split};
use specauf::model::{WeightsMode, DEFAULT_MODEL};
use specauf::pipeline::stages::{self, PreparePlan};
use specauf::util::Observer;

use super::progress::Bars;

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
    /// Only conversations whose first user turn asks for these topics (comma-separated: chat,
    /// code, math; a regular-expression rule, see `specauf::data::topic`), e.g. `code,math` to
    /// train a drafter for code and maths.
    #[arg(long, value_delimiter = ',')]
    pub topics: Option<Vec<Topic>>,
    /// With --topics: the first N conversations are taken whatever their topic, --topics applies
    /// to the rest (a mix of the file's own conversations and the topics).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub topics_after: usize,
    /// Tokens per sequence; longer ones are cut [default: 512 for smollm2, 2048 otherwise].
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Exchanges (user + assistant turn) kept per conversation [default: 1 with --regenerate, all without].
    #[arg(long)]
    pub max_turns: Option<usize>,
    /// Fraction of conversations (by id hash) in the eval split.
    #[arg(long, default_value_t = PreparePlan::DEFAULT_EVAL_FRACTION)]
    pub eval_fraction: f64,
    /// Replace each assistant turn by the target's own reply: `greedy` or `sample`. Cached in
    /// OUT/regenerated.jsonl; a rerun resumes.
    #[arg(long)]
    pub regenerate: Option<RegenerateMode>,
    /// Sampling temperature (with --regenerate sample).
    #[arg(long, default_value_t = PreparePlan::DEFAULT_TEMPERATURE)]
    pub temperature: f32,
    /// Nucleus mass (with --regenerate sample); 1 = off.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Cap on the tokens of one regenerated reply (also capped by what fits in --max-len).
    #[arg(long, default_value_t = PreparePlan::DEFAULT_MAX_NEW_TOKENS)]
    pub max_new_tokens: usize,
    /// Regeneration threads sharing the target, each with its own KV cache and its own pool of
    /// cores/workers kernel threads. On 2 cores, 2 workers measured the same as 1; more help
    /// where there are more cores than one decode uses.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Conversations each worker regenerates together: their replies share every target
    /// forward, which costs about one reply's on a memory-bound CPU (q8/native weights; f32
    /// decodes one at a time). Replies are identical whatever the batch.
    #[arg(long, default_value_t = DEFAULT_BATCH)]
    pub batch: usize,
    /// Weights for regeneration: auto (default: native for a GGUF of Q8_0/Q4_1 tensors, q8 otherwise), native (GGUF types as stored), q8 (int8 blocks), f32 (reference).
    #[arg(long, default_value_t = WeightsMode::default())]
    pub weights: WeightsMode,
    /// Cache the target's hidden states after these layers (comma-separated ids, HF convention),
    /// e.g. 1,8,14: training then skips the target forward.
    #[arg(long, value_delimiter = ',')]
    pub features: Option<Vec<usize>>,
    /// Storage type of the feature cache: f16 or bf16.
    #[arg(long, default_value_t = FeatureDtype::F16)]
    pub feature_dtype: FeatureDtype,
    /// Weights for the feature forward (f32 matches the trainer's online features).
    #[arg(long, default_value_t = WeightsMode::F32)]
    pub feature_weights: WeightsMode,
    /// Also store the top K of the target's next-token logits at every position, for training
    /// with distillation targets (`distill.weight` in the train config); needs --features.
    #[arg(long, value_name = "K")]
    pub soft_labels: Option<usize>,
    /// Seed of sampled regeneration.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Approximate tokens per shard.
    #[arg(long, default_value_t = DEFAULT_SHARD_TOKENS)]
    pub shard_tokens: usize,
    /// With --regenerate: start no conversation after this many minutes (those in flight
    /// finish); the rest are left out of the data and counted in the manifest's `skipped`.
    /// A rerun without it answers them, reusing what was answered
    #[arg(long, value_name = "M")]
    pub regenerate_minutes: Option<f64>,
    #[command(flatten)]
    pub device: super::device::DeviceArgs,
}

impl PrepareArgs {
    fn plan(self) -> PreparePlan {
        PreparePlan {
            model: self.model,
            data: self.data,
            out: self.out,
            max_conversations: self.max_conversations,
            topics: self.topics,
            topics_after: self.topics_after,
            max_len: self.max_len,
            max_turns: self.max_turns,
            eval_fraction: self.eval_fraction,
            regenerate: self.regenerate,
            temperature: self.temperature,
            top_p: self.top_p,
            max_new_tokens: self.max_new_tokens,
            workers: self.workers,
            batch: self.batch,
            weights: self.weights,
            features: self.features,
            feature_dtype: self.feature_dtype,
            feature_weights: self.feature_weights,
            soft_labels: self.soft_labels,
            seed: self.seed,
            shard_tokens: self.shard_tokens,
            device: self.device.choice(),
            regenerate_deadline: self.regenerate_minutes.map(|m| std::time::Instant::now() + std::time::Duration::from_secs_f64(m.max(0.0) * 60.0)),
        }
    }
}

pub fn run(a: PrepareArgs) -> anyhow::Result<()> {
    let plan = a.plan();
    let report = stages::prepare(&plan, Observer(std::sync::Arc::new(Bars::new())))?;
    print_report(&report, &plan.out);
    Ok(())
}

/// What a prepare run did, on stdout.
pub fn print_report(report: &specauf::data::prepare::PrepareReport, out: &std::path::Path) {
    let m = &report.manifest;
    let s = &m.source;
    let malformed: usize = s.skipped_records.values().sum();
    println!(
        "loaded {} conversations ({} malformed records skipped{}; {} in the benchmark hold-out{}), selected {} ({} share banners dropped)",
        s.loaded,
        malformed,
        if s.truncated_tail { ", file cut off mid-record" } else { "" },
        s.heldout_excluded,
        match &m.settings.topics {
            Some(t) => format!("; {} passed over, off the topics {}", s.off_topic, t.topics.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(",")),
            None => String::new(),
        },
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
    println!("wrote {} in {:.1} s (settings hash {})", out.join("manifest.json").display(), report.total_seconds, &m.settings_hash[..16]);
}
