//! The flags that say how a loaded drafter runs, shared by `generate`, `eval`, `serve` and
//! `bench spec|serve` (one source for their text and defaults).

use specauf::drafter::{DrafterPrecision, RunSettings, DEFAULT_DRAFT_VOCAB};

#[derive(clap::Args, Debug, Clone)]
pub struct DrafterRunArgs {
    /// Drafts score only the K most frequent tokens of the drafter's training replies (its
    /// draft_vocab.json, written by `specauf train`) plus the request's own tokens, so the
    /// draft's LM head costs K/V of the whole one; 0: the whole vocabulary. No effect on a
    /// drafter folder without the file.
    #[arg(long, default_value_t = DEFAULT_DRAFT_VOCAB)]
    pub draft_vocab: usize,
    /// Cut each draft before its first position whose probability under the drafter is below
    /// P (llama.cpp's --draft-p-min): fewer verify rows where the drafter is unsure; 0: never.
    /// Default: chosen with the block size from the drafter's held-out measurements where the
    /// block size is chosen (no --block-size; drafters trained since these are logged), else 0.
    /// DFlash drafters.
    #[arg(long, value_name = "P")]
    pub draft_p_min: Option<f32>,
    /// How a DFlash drafter's projections run: q4 (Q4_1 blocks, the default: about 0.5% of τ for
    /// a fifth less draft time), int8, or f32 (the trained values).
    #[arg(long, default_value_t = DrafterPrecision::default())]
    pub drafter_precision: DrafterPrecision,
}

impl DrafterRunArgs {
    pub fn settings(&self) -> RunSettings {
        RunSettings { draft_vocab: self.draft_vocab, draft_p_min: self.draft_p_min, precision: self.drafter_precision }
    }
}
