//! `specauf init-drafter`: write an untrained drafter for a target (tests, and the starting
//! point of training).

use std::path::PathBuf;

use anyhow::Context;
use specauf::drafter::{DrafterKind, DEFAULT_BLOCK_SIZE, DEFAULT_LAYERS};
use specauf::pipeline::stages::{self, InitPlan};

#[derive(clap::Args, Debug)]
pub struct InitDrafterArgs {
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    /// Output directory (config.json + model.safetensors, the DFlash / SpecForge format).
    #[arg(long)]
    pub out: PathBuf,
    /// `dflash` or `domino`.
    #[arg(long, default_value_t = DrafterKind::DFlash)]
    pub kind: DrafterKind,
    #[arg(long, default_value_t = DEFAULT_LAYERS)]
    pub layers: usize,
    #[arg(long, default_value_t = DEFAULT_BLOCK_SIZE)]
    pub block_size: usize,
    /// Default: Qwen3's unused 151669 where the vocabulary has it, else 16 (SmolLM2's
    /// `<empty_output>`).
    #[arg(long)]
    pub mask_token_id: Option<u32>,
    /// Target layers to tap (default per the DFlash reference).
    #[arg(long, value_delimiter = ',')]
    pub target_layer_ids: Option<Vec<usize>>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(a: InitDrafterArgs) -> anyhow::Result<()> {
    let plan = InitPlan {
        model: a.model,
        out: a.out,
        kind: a.kind,
        layers: a.layers,
        block_size: a.block_size,
        mask_token_id: a.mask_token_id,
        target_layer_ids: a.target_layer_ids,
        seed: a.seed,
    };
    let d = stages::init_drafter(&plan).with_context(|| format!("writing {}", plan.out.display()))?;
    let params: usize = d.named_vars().iter().map(|(_, v)| v.as_tensor().elem_count()).sum();
    println!(
        "untrained {} drafter ({} layers, block {}, target layers {:?}, mask token {}, {} parameters) written to {}",
        d.kind(),
        d.num_layers(),
        d.block_size(),
        d.target_layer_ids(),
        d.mask_token_id(),
        params,
        plan.out.display()
    );
    Ok(())
}

