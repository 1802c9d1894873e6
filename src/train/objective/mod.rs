//! Training objectives: which predicted block positions the weighted CE counts, and how much.
//!
//! Every objective is one weighted cross-entropy `L = Σ w·CE / normaliser` over all blocks of a
//! batch, with weights computed without gradient (DESIGN §3):
//!
//! | objective      | w at predicted index i (0-based)                                            | normaliser |
//! |----------------|-----------------------------------------------------------------------------|------------|
//! | `full`         | v_i                                                                         | Σ w        |
//! | `decay`        | v_i · exp(-i/γ)                                                             | Σ w        |
//! | `auf`          | v_i · alive_i, alive_0 = 1, alive_i = Π_{j<i} (c_j ∨ ¬v_j)                  | Σ w        |
//! | `auf+decay`    | auf × decay                                                                 | Σ w        |
//! | `dpace`        | v_i · W_i, W_i = Σ_{j≥i} P_j·v_j, P_i = Π_{j≤i} s_j, s = (1-α)p+α (¬v → 1)   | real blocks|
//! | `dpace-prefix` | v_i · P_i                                                                   | real blocks|
//!
//! v = valid, c = correct (argmax == label), p = detached probability of the gold token.
//!
//! # Row layout and the two label conventions
//! Rows are laid out block-major: row `b·P + i` is predicted index `i` of block `b`, where `P`
//! (= [`BlockLayout::positions_per_block`]) is the number of predicted positions per block. The block
//! position of index `i` is `first_position + i`:
//! - DFlash: positions 1..B-1 predict x_{a+k}, so `P = B-1`, `first_position = 1`
//!   ([`BlockLayout::dflash`]). Decay exp(-(k-1)/γ) is exp(-i/γ).
//! - Domino (`shift_label`): positions 0..B-1 predict x_{a+k+1}, so `P = B`, `first_position = 0`
//!   ([`BlockLayout::domino`]). Decay exp(-k/γ) is again exp(-i/γ).
//!
//! Every weight rule is written in terms of the predicted index `i`, so both conventions share one
//! routine; `first_position` only labels the per-position metrics.
//!
//! # Choices where the paper is silent (DESIGN §3 "uncertain points"), all options with these defaults
//! - AUF failure is `argmax != label` ([`FailureRule::Argmax`]); [`FailureRule::Sample`] instead draws
//!   c ~ Bernoulli(p_gold), which is exactly "a sample from the drafter equals the label".
//! - An invalid position in mid-block is transparent (`invalid_transparent = true`): it neither
//!   counts nor ends the accepted run. With `false` it ends the run like a failure.
//! - Normalisation by Σw for the masked objectives. `dpace` and `dpace-prefix` divide by the number of
//!   real blocks (a block is real when it has at least one valid position). SpecForge divides the
//!   D-PACE loss by its batch size in *sequences*; that is [`Normaliser::Sequences`], which makes the
//!   loss scale with anchors per sequence, so per-block is the default here. Both D-PACE variants
//!   share the normaliser, as in SpecForge.
//! - Default γ: 7 for B = 16, 5 for B = 10, 4 for B = 8 (the DFlash recipe). Other block sizes
//!   require an explicit γ rather than an invented interpolation.

mod definition;
pub mod layout;
mod metrics;
mod resolve;
#[cfg(test)]
mod tests;
mod weights;

pub use definition::{default_gamma, FailureRule, Normaliser, Objective, DEFAULT_DPACE_ALPHA};
pub use layout::BlockLayout;
pub use metrics::{BlockMetrics, MetricCounts};
pub use resolve::{AufRule, DpaceRule, ResolvedObjective, WeightRule};
pub use weights::{BlockRows, RowStats, WeightTotals, Weights};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ObjectiveError {
    #[error(
        "no default decay gamma for block size {block_size}: the DFlash recipe gives 7 for B = 16, \
         5 for B = 10 and 4 for B = 8; set it explicitly, e.g. {{\"type\":\"{objective}\",\"gamma\":6.0}} \
         or --set objective={objective}:6"
    )]
    NoDefaultGamma {
        objective: &'static str,
        block_size: usize,
    },
    #[error(
        "cannot parse objective {input:?}: {reason}; expected full, decay[:gamma], auf, \
         auf+decay[:gamma], dpace[:alpha], dpace-prefix[:alpha], or JSON such as {{\"type\":\"auf\"}}"
    )]
    Parse { input: String, reason: String },
    #[error("objective {objective}: {name} = {value} is out of range; {hint}")]
    BadParameter {
        objective: &'static str,
        name: &'static str,
        value: f32,
        hint: &'static str,
    },
    #[error(
        "row statistics do not match the block layout: {what} has {got} entries but \
         {blocks} blocks × {per_block} positions need {expected}"
    )]
    Shape {
        what: &'static str,
        got: usize,
        expected: usize,
        blocks: usize,
        per_block: usize,
    },
    #[error("block layout has 0 predicted positions per block; use BlockLayout::dflash(B) or ::domino(B)")]
    EmptyLayout,
}
