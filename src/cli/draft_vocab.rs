//! `specauf draft-vocab`: rank the target's tokens by their count in a prepared dataset's
//! replies and write the ranking (draft_vocab.json) into a drafter folder, so its drafts score
//! only the frequent rows of the target's LM head (DESIGN §7.13). `specauf train` writes the
//! file itself; this is for drafters trained elsewhere or before.

use std::path::PathBuf;

use anyhow::Context;
use specauf::drafter::DEFAULT_DRAFT_VOCAB;
use specauf::pipeline::stages;

#[derive(clap::Args, Debug)]
pub struct DraftVocabArgs {
    /// A dataset folder from `specauf prepare` for the drafter's target (its training split's
    /// replies are counted).
    #[arg(long)]
    pub data: PathBuf,
    /// The DFlash drafter folder to write draft_vocab.json into.
    #[arg(long)]
    pub drafter: PathBuf,
}

pub fn run(a: DraftVocabArgs) -> anyhow::Result<()> {
    let v = stages::write_draft_vocab(&a.data, &a.drafter).with_context(|| format!("writing the draft vocabulary of {}", a.drafter.display()))?;
    println!(
        "{} reply tokens of {} counted: {} distinct ids of {}; draft_vocab.json written to {}",
        v.tokens,
        a.data.display(),
        v.ids.len(),
        v.vocab_size,
        a.drafter.display()
    );
    println!("| top K ids | share of the counted reply tokens |");
    println!("|---|---|");
    for k in [1024, 2048, 4096, DEFAULT_DRAFT_VOCAB, 16384, 32768] {
        let mark = if k == DEFAULT_DRAFT_VOCAB { " (default --draft-vocab)" } else { "" };
        println!("| {k}{mark} | {:.2}% |", 100.0 * v.coverage(k));
    }
    Ok(())
}
