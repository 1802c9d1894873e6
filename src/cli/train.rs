//! `specauf train --config FILE [--set key=value ...] [--resume]`: train a drafter.

use std::path::PathBuf;

use specauf::model::WeightsMode;
use specauf::nn::DeviceSpec;
use specauf::pipeline::{launch, stages};
use specauf::train::parallel::World;
use specauf::train::config::TrainConfig;

use super::progress::Bars;

#[derive(clap::Args, Debug)]
#[command(after_help = "Config keys (JSON; every key optional except data and out):\n  \
model (smollm2), data, out, steps (300), batch_sequences (2), grad_accum (1), num_anchors (32), seed (0),\n  \
checkpoint_every (50), eval_every (100), eval_sequences (32), feature_cache_mib (4096),\n  \
objective ({\"type\":\"auf\"}; also full, decay[:gamma], auf+decay[:gamma], dpace[:alpha], dpace-prefix[:alpha]),\n  \
drafter.{kind (dflash | domino), layers (2), block_size (8), target_layer_ids, mask_token_id, init_from,\n    init_layers_from_target (e.g. [28,29]: drafter layer l starts as target layer ids[l]),\n    mask_embedding (false: a trainable MASK input vector; other engines cannot load such a drafter),\n    gru_hidden_dim, emb_dim (Domino's GRU and embed_proj widths)},\n  \
optim.{lr (6e-4), warmup_ratio (0.04), schedule (cosine | linear | constant: the decay after the warmup), weight_decay (0), clip (1.0), beta1 (0.9), beta2 (0.999), eps (1e-8),\n    freeze ([]: tensors whose name contains an entry keep their values, e.g. [\"mlp.\"])},\n  \
head.{chunk_rows (512), vocab (full | draft: the softmax over the draft vocabulary only; DESIGN §7.13),\n    precision (f32 | bf16: the products with the LM head on AVX512-BF16; DESIGN §7.14), score_every_row (false)},\n  \
layer_precision (f32 | bf16: the drafter layers' linears and their gradients on AVX512-BF16; DESIGN §7.14),\n  \
activation_checkpointing (false: recompute each drafter layer in the backward instead of keeping its activations; DFlash),\n  \
base_support (same-as-final | own-argmax | unmasked: the rows Domino's base-branch CE weighs; DESIGN §4),\n  \
distill.{weight (mix the target's top-k distribution into each CE target; needs prepare --soft-labels K), temperature (1.0)}\n\
`specauf train --print-config --set data=D --set out=O` prints the resolved config with every default, except that\n\
distill, activation_checkpointing, layer_precision, optim.schedule, drafter.mask_embedding and head.{vocab, precision, score_every_row} appear only when set\n\
(they came after the first runs; leaving them out at their defaults keeps those runs' configs, and so --resume, unchanged).")]
pub struct TrainArgs {
    /// A JSON training config (see below); `--set` alone works too.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a config key: `--set steps=100 --set objective=decay:7 --set optim.lr=3e-4`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Continue the run in the config's `out` from its latest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Target weights for the feature forward (default auto, as served).
    #[arg(long, default_value_t = WeightsMode::default())]
    pub weights: WeightsMode,
    /// Print the resolved config (every default filled in but the later keys the help names) and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Data-parallel training on N GPUs: one process per GPU (rank i on cuda:i), gradients
    /// averaged over NCCL. Needs a `--features cuda` build, which has never been compiled or run
    /// by this project. Processes started by another launcher read RANK, WORLD_SIZE, LOCAL_RANK.
    #[arg(long, default_value_t = 1)]
    pub gpus: usize,
    /// Data-parallel training on the CPU: N processes, the cores shared out among them, each
    /// training batch_sequences sequences per step; gradients averaged over local TCP. Equal to
    /// one process with N × batch_sequences up to float rounding. On 2 cores, `--ranks 2` with
    /// batch_sequences 1 ran the recipe's steps 5–8% faster than one process with 2 (README).
    /// A run resumed with another N keeps its sequences per step.
    #[arg(long, default_value_t = 1)]
    pub ranks: usize,
    /// Finish within about this many minutes: the steps are timed, and where `steps` would run
    /// past the limit the run stops earlier, its learning rate decaying over the steps that fit
    /// (the cut is saved, so `--resume` keeps it). Without it every step runs.
    #[arg(long, value_name = "MINUTES")]
    pub max_minutes: Option<f64>,
    #[command(flatten)]
    pub device: super::device::DeviceArgs,
}

pub fn run(a: TrainArgs) -> anyhow::Result<()> {
    let cfg = TrainConfig::load(a.config.as_deref(), &a.set)?;
    if a.print_config {
        println!("{}", serde_json::to_string_pretty(&cfg)?);
        return Ok(());
    }
    if a.gpus == 0 || a.ranks == 0 {
        anyhow::bail!("--gpus and --ranks must be at least 1");
    }
    if a.ranks > 1 {
        if a.gpus > 1 {
            anyhow::bail!("--ranks (processes on the CPU) and --gpus (a process per GPU) cannot be combined; choose one");
        }
        // Rank 0 prints where the drafter went.
        launch::launch_cpu_ranks(&std::env::current_exe()?, &rank_args(), a.ranks)?;
        return Ok(());
    }
    if a.gpus > 1 {
        let exe = std::env::current_exe()?;
        launch::launch_ranks(&exe, &rank_args(), a.gpus, &cfg.out)?;
        return Ok(());
    }
    // A rank started by `--gpus` or another launcher: its GPU is cuda:LOCAL_RANK.
    let world = World::from_vars(|k| std::env::var(k).ok())?;
    let mut device = a.device.choice();
    if world.size > 1 {
        if let DeviceSpec::Cuda(_) = device.device {
            device.device = DeviceSpec::Cuda(world.local_rank);
        }
    }
    // Rank 0 draws; the others train quietly.
    let bars = Bars::new();
    let quiet = specauf::util::progress::Silent;
    let progress: &dyn specauf::util::progress::Progress = if world.is_primary() { &bars } else { &quiet };
    let deadline = match a.max_minutes {
        Some(m) if m.is_finite() && m > 0.0 => Some(std::time::Instant::now() + std::time::Duration::from_secs_f64(m * 60.0)),
        Some(m) => anyhow::bail!("--max-minutes {m}: give a positive number of minutes"),
        None => None,
    };
    let summary = stages::train(&cfg, a.weights, device, world, a.resume, deadline, progress)?;
    if let (Some(b), Some(after)) = (&summary.eval_before, &summary.eval_after) {
        eprintln!(
            "held-out: in-block accept length {:.3} -> {:.3}, acc {:.3} -> {:.3} ({} blocks)",
            b.accept_len, after.accept_len, b.acc, after.acc, after.blocks
        );
    }
    if let Some(dir) = summary.final_dir.filter(|_| world.is_primary()) {
        println!("drafter written to {}", dir.display());
    }
    Ok(())
}

/// This command's arguments without `--gpus`, `--ranks` and `--device` (each rank gets its own
/// device).
fn rank_args() -> Vec<String> {
    let mut out = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--gpus" || a == "--ranks" || a == "--device" {
            args.next();
        } else if !(a.starts_with("--gpus=") || a.starts_with("--ranks=") || a.starts_with("--device=")) {
            out.push(a);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::TrainArgs;
    use clap::Args;
    use specauf::train::config::TrainConfig;

    /// Every key of the training config, with each key that is omitted at its default set, so
    /// that serialization shows them all: (path, leaf name) for every object member.
    fn config_keys() -> Vec<(String, String)> {
        let set: Vec<String> = [
            "data=/d",
            "out=/o",
            "distill.weight=0.5",
            "activation_checkpointing=true",
            "layer_precision=bf16",
            "optim.schedule=linear",
            "drafter.mask_embedding=true",
            "head.vocab=draft",
            "head.precision=bf16",
            "head.score_every_row=true",
        ]
        .map(String::from)
        .to_vec();
        let cfg = TrainConfig::load(None, &set).unwrap();
        let tree = serde_json::to_value(&cfg).unwrap();
        let mut keys = Vec::new();
        fn walk(prefix: &str, v: &serde_json::Value, keys: &mut Vec<(String, String)>) {
            if let serde_json::Value::Object(map) = v {
                for (k, child) in map {
                    let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    keys.push((path.clone(), k.clone()));
                    // The objective is a tagged value, documented by its shorthands.
                    if k != "objective" {
                        walk(&path, child, keys);
                    }
                }
            }
        }
        walk("", &tree, &mut keys);
        keys
    }

    /// `train --help` names every key the config accepts, so that a key added to the config
    /// cannot stay out of the help (four did, until the eleventh session).
    #[test]
    fn the_help_names_every_config_key() {
        let cmd = TrainArgs::augment_args(clap::Command::new("train"));
        let help = cmd.get_after_help().expect("train has an after_help").to_string();
        let words: std::collections::HashSet<&str> = help.split(|c: char| !(c.is_alphanumeric() || c == '_')).collect();
        let keys = config_keys();
        assert!(keys.len() > 25, "the walk found only {} keys", keys.len());
        let missing: Vec<String> = keys.into_iter().filter(|(_, leaf)| !words.contains(leaf.as_str())).map(|(path, _)| path).collect();
        assert!(missing.is_empty(), "train --help does not name the config keys {missing:?}");
    }
}
