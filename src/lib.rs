//! specauf: speculative decoding with masked block drafters (DFlash, Domino) trained with the
//! Accept-Until-Fail objective. The design, the method and the formats are in docs/DESIGN.md
//! (cited as "DESIGN §N" throughout).
//!
//! Modules, in pipeline order; each may import only the ones above it (tests/layering.rs):
//! - [`util`]: atomic files, hashing and seeds, the progress observer.
//! - [`assets`]: the verified fetcher of models and data sets from the package registries.
//! - [`tokenizer`]: tokenizers from tokenizer.json or GGUF, chat templates.
//! - [`nn`]: differentiable ops (custom ops with a backward) shared by the drafters.
//! - [`model`]: the target LLM: loading (HF, GGUF), weights modes, quantised kernels, KV cache.
//! - [`spec`]: speculative decoding: proposer → verifier → driver → metrics; one loop for all.
//! - [`drafter`]: DFlash and Domino drafters, their checkpoints, the block layout, [`drafter::AnyDrafter`].
//! - [`data`]: conversations → regenerated replies → masked token shards → cached features.
//! - [`train`]: config, objectives, chunked LM head, optimiser, checkpoints, the training loop.
//! - [`eval`]: the six benchmarks, the runner (AR vs drafters), the resume journal, reports, plots.
//! - [`serve`]: the OpenAI-compatible server: requests decoded together, metrics, load generator.
//! - [`pipeline`]: typed stages (prepare, train, evaluate) and the jobs built from them: quickstart,
//!   the paper's experiment and its report.
//!
//! The `specauf` binary (src/main.rs, src/cli/) turns arguments into these typed plans and draws
//! progress; no library module imports it.

pub mod util;

pub mod assets;
pub mod nn;
pub mod tokenizer;

pub mod model;
pub mod spec;

pub mod drafter;

pub mod data;
pub mod train;

pub mod eval;
pub mod serve;

pub mod pipeline;

pub fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}
