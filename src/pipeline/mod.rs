//! Jobs built from the typed stages: the quickstart and the paper's experiment. The stages take
//! typed plans (no strings to parse back) and report through observers; the CLI builds the plans
//! from arguments and draws.
//!
//! - [`stages`]: prepare, train and evaluate as functions of typed plans.
//! - [`recipe`]: named budgets of the whole pipeline (`quick`, `cpu-60min`).
//! - [`quickstart`]: the whole pipeline on the embedded default, as one recipe.
//! - [`experiment`]: the paper's comparison: config, arms, parallel training.
//! - [`report`]: the experiment's statistics (bootstrap, paired comparisons, findings), plots
//!   and results.md.
//! - [`bench`], [`spec_bench`], [`fidelity`]: speed and fidelity figures; [`llama_cpp`]: llama.cpp
//!   as the peer they are measured against (runs its binaries, parses their output).

pub mod bench;
pub mod experiment;
pub mod fidelity;
pub mod launch;
pub mod llama_cpp;
pub mod quickstart;
pub mod recipe;
pub mod report;
pub mod spec_bench;
pub mod stages;
