//! `specauf init-drafter`: write an untrained DFlash drafter for a target (tests, and the
//! starting point of training).

use std::path::PathBuf;

use anyhow::Context;
use specauf::drafter::dflash::{DFlashDrafter, DFlashInitConfig};
use specauf::model::{load_model, WeightsMode};
use specauf::train::trainer::{default_mask_token, init_final_norm_from_target};

#[derive(clap::Args, Debug)]
pub struct InitDrafterArgs {
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    /// Output directory (config.json + model.safetensors, the DFlash format).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
    #[arg(long, default_value_t = 8)]
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
    let m = load_model(&a.model, WeightsMode::Q8).with_context(|| format!("loading {}", a.model))?;
    let mut init = DFlashInitConfig::new(a.layers, a.block_size, a.mask_token_id.unwrap_or_else(|| default_mask_token(&m.target)));
    init.target_layer_ids = a.target_layer_ids.clone();
    let drafter = DFlashDrafter::init_random(m.target.config(), &init, a.seed)?;
    init_final_norm_from_target(&drafter.named_vars(), &m.target, drafter.mask_token_id())?;
    drafter.save(&a.out).with_context(|| format!("writing {}", a.out.display()))?;
    let c = drafter.config();
    println!(
        "untrained DFlash drafter ({} layers, block {}, target layers {:?}, mask token {}, {} parameters) written to {}",
        c.num_hidden_layers,
        c.block_size,
        drafter.target_layer_ids(),
        drafter.mask_token_id(),
        c.num_parameters(),
        a.out.display()
    );
    Ok(())
}
