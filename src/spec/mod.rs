//! Speculative decoding: one loop for every drafter, and for plain autoregressive decoding.
//!
//! Split by responsibility: [`proposer`] (the drafter behind a trait), [`verifier`] (greedy,
//! sample-and-match, residual rejection), [`driver`] (the loop), [`batch`] (the loop over many
//! requests, their verify forwards batched), [`sampling`] (logits → token,
//! position-keyed randomness), [`metrics`] (τ, histograms, per-position acceptance).
//!
//! # The algorithm (z-lab/dflash `dflash_generate`, DESIGN §1–2)
//!
//! ```text
//! prefill(prompt)            -> first token y0 (from the last prompt logits; it belongs to no cycle)
//! start = len(prompt)        // position of the last committed token, not yet run through the target
//! while committed ≤ max_new_tokens:
//!     d1..dk  = proposer.propose(last, start)            // k ≤ B-1
//!     logits  = target([last, d1..dk] at start..start+k) // one forward, taps of these positions
//!     acc     = longest prefix with d_{i+1} == target_token_i
//!     commit d1..d_acc and the bonus target_token_acc;   record acc+1
//!     crop the target cache to start+acc+1; proposer.commit(features of start..start+acc)
//!     start  += acc+1
//!     stop if an EOS is anywhere in the committed output
//! output = committed[..max_new_tokens], cut after the first EOS (kept)
//! ```
//!
//! Plain AR decoding is the same loop with no proposer (k = 0): each cycle verifies `[last]`
//! and commits its bonus.
//!
//! # Invariant
//!
//! Between cycles the target cache holds exactly the K/V of positions `0..start`, i.e. the
//! prompt and every committed token except the last one; nothing of a rejected draft tail
//! survives (the cache crop is O(1), and rows past the crop are never read again). The proposer
//! has been given the tapped features of exactly the same positions.
//!
//! # Exactness
//!
//! At temperature 0 the output is token-for-token the target's greedy output. At T > 0 every
//! committed token is drawn from the target's (temperature, top-p) distribution given the
//! committed prefix. The uniform number behind output token j is keyed by (seed, j), not by how
//! many numbers were drawn before, so with sample-and-match a speculative run and a plain AR run
//! with the same seed produce the same tokens, whatever the drafter proposes (up to float
//! differences between a block forward and a one-token forward).

pub mod batch;
pub mod block_size;
pub mod driver;
pub mod metrics;
pub mod proposer;
pub mod sampling;
pub mod verifier;

pub use batch::{generate_batch, step_all, BatchRequest};
pub use driver::{generate, generate_streaming, Cycle, FinishReason, GenerateConfig, GenerateOutput, Generation, PendingVerify, Prefill};
pub use metrics::{AcceptStats, MetricsSummary};
pub use proposer::{Draft, FixedProposer, OracleErrors, OracleProposer, Proposer, RandomProposer};
pub use sampling::{AcceptRule, SamplingParams};
pub use verifier::{Verdict, Verifier};

use crate::model::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("invalid generation config: {what}")]
    InvalidConfig { what: String },
    #[error("the prompt has no tokens; a generation needs at least one prompt token")]
    EmptyPrompt,
    #[error(
        "the request needs {needed} positions (prompt {prompt_len} + max_new_tokens {max_new_tokens} + block {block_size} - 1) \
         but the target's context is {max}; shorten the prompt or lower max_new_tokens"
    )]
    ContextOverflow {
        needed: usize,
        prompt_len: usize,
        max_new_tokens: usize,
        block_size: usize,
        max: usize,
    },
    #[error("the proposer's block size is 0; a block holds the last committed token, so it is at least 1")]
    ZeroBlockSize,
    #[error("the proposer taps target layer {layer}, but the target has {layers} layers (0..{layers}); the drafter was trained for another target")]
    TapOutOfRange { layer: usize, layers: usize },
    #[error("the proposer returned {got} draft tokens, but its block size {block_size} allows at most {max}")]
    TooManyDraftTokens { got: usize, block_size: usize, max: usize },
    #[error("draft token {token} at block position {position} is outside the target vocabulary of {vocab}; the drafter does not match the target")]
    DraftTokenOutOfRange { token: u32, position: usize, vocab: usize },
    #[error(
        "the proposer's draft probabilities have shape {got:?}, expected {expected:?} (one row per draft token over the target vocabulary)"
    )]
    DraftProbsShape { got: Vec<usize>, expected: Vec<usize> },
    #[error("the proposer drafted token {token} at block position {position} with probability {prob}; draft probabilities must be the distribution the token was drawn from")]
    DraftProbInconsistent { token: u32, position: usize, prob: f32 },
    #[error("the target produced non-finite logits at output index {index}")]
    NonFiniteLogits { index: usize },
    #[error("the generation has already finished; start a new one")]
    Finished,
    #[error("the generations of one batch use different targets; batch only generations of the same target")]
    MixedTargets,
    #[error("proposer: {0}")]
    Proposer(Box<dyn std::error::Error + Send + Sync>),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl SpecError {
    /// Wraps a drafter's own error type.
    pub fn proposer<E: std::error::Error + Send + Sync + 'static>(e: E) -> Self {
        SpecError::Proposer(Box::new(e))
    }
}
