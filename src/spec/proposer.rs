//! The drafter behind a trait, and three reference proposers for tests and sanity checks.
//!
//! A proposer sees the request as the driver commits it (DFlash reference semantics, DESIGN §2):
//! - `begin`: the prompt and the tapped target features of every prompt position;
//! - `propose`: the last committed token (not yet run through the target) and its position
//!   `start`; it returns up to B-1 draft tokens for positions start+1..;
//! - `commit`: after the verify pass, the tokens at positions start..=start+acc (the last token
//!   and the accepted drafts) with their features *from that same verify pass*. The bonus token
//!   that follows is passed as `last_token` to the next `propose`.
//!
//! So a drafter's context (e.g. DFlash's context K/V) covers exactly the positions the target
//! cache holds, `0..start`; anything it computes for the block itself must be dropped after
//! `propose` (DFlash crops its cache back to `start`). A drafter that steps over its own tokens
//! (Domino's GRU) does so inside `propose`.

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::SpecError;
use crate::model::Target;

/// One cycle's proposal.
#[derive(Debug, Clone)]
pub struct Draft {
    /// Draft tokens for positions start+1.., at most block_size-1 of them (fewer is allowed).
    pub tokens: Vec<u32>,
    /// Optional (tokens.len(), vocab) f32: row i is the distribution `tokens[i]` was drawn
    /// from, given the tokens before it (a one-hot row for a greedy drafter). Only residual
    /// rejection sampling reads it, and it is exact only if the rows are the true drawing
    /// distributions: a drafter that samples must use randomness of its own, fresh per
    /// request (a drafter reseeded identically for every request is deterministic, so its
    /// rows must be one-hot).
    pub probs: Option<Tensor>,
}

impl Draft {
    pub fn tokens(tokens: Vec<u32>) -> Self {
        Self { tokens, probs: None }
    }
}

/// A drafter, as the decode loop sees it. Object-safe: the driver takes `&mut dyn Proposer`.
pub trait Proposer: Send {
    /// Tokens per verified block, the last committed token included (DFlash: 16). The proposer
    /// drafts at most `block_size() - 1` tokens per cycle.
    fn block_size(&self) -> usize;

    /// Target layers whose outputs (HF indexing: layer i's output, `hidden_states[i+1]`) the
    /// proposer conditions on, in concatenation order. Empty: the driver passes no features.
    fn target_layer_ids(&self) -> &[usize];

    /// Starts a request. `features`: (prompt_ids.len(), n_taps·H), the tapped outputs of the
    /// prompt positions concatenated in `target_layer_ids` order; None when no layers are tapped.
    fn begin(&mut self, target: &Target, prompt_ids: &[u32], features: Option<&Tensor>) -> Result<(), SpecError>;

    /// Drafts the tokens that follow `last_token`, which sits at position `start`.
    fn propose(&mut self, target: &Target, last_token: u32, start: usize) -> Result<Draft, SpecError>;

    /// Records the verify pass's outcome: `tokens` sit at positions start..start+tokens.len()
    /// (the block's last committed token and its accepted drafts); `features` are their
    /// (tokens.len(), n_taps·H) tapped outputs from that pass. Cycles may skip `propose`
    /// ([`crate::spec::Generation::plain_block`]), so several commits can follow each other:
    /// each continues where the one before ended.
    fn commit(&mut self, tokens: &[u32], features: Option<&Tensor>, start: usize) -> Result<(), SpecError>;
}

/// A borrowed proposer is a proposer: [`crate::spec::Generation::start`] takes one by `&mut`,
/// [`crate::spec::Generation::start_owned`] owns a boxed one (a server keeps many requests alive
/// at once, each with its own drafter state).
impl<P: Proposer + ?Sized> Proposer for &mut P {
    fn block_size(&self) -> usize {
        (**self).block_size()
    }
    fn target_layer_ids(&self) -> &[usize] {
        (**self).target_layer_ids()
    }
    fn begin(&mut self, target: &Target, prompt_ids: &[u32], features: Option<&Tensor>) -> Result<(), SpecError> {
        (**self).begin(target, prompt_ids, features)
    }
    fn propose(&mut self, target: &Target, last_token: u32, start: usize) -> Result<Draft, SpecError> {
        (**self).propose(target, last_token, start)
    }
    fn commit(&mut self, tokens: &[u32], features: Option<&Tensor>, start: usize) -> Result<(), SpecError> {
        (**self).commit(tokens, features, start)
    }
}

/// Proposes the same token at every block position. With `report_probs` it reports the
/// one-hot distribution of a greedy drafter.
#[derive(Debug, Clone)]
pub struct FixedProposer {
    pub block_size: usize,
    pub token: u32,
    pub report_probs: bool,
    vocab: usize,
}

impl FixedProposer {
    pub fn new(block_size: usize, token: u32) -> Self {
        Self {
            block_size,
            token,
            report_probs: false,
            vocab: 0,
        }
    }
}

impl Proposer for FixedProposer {
    fn block_size(&self) -> usize {
        self.block_size
    }
    fn target_layer_ids(&self) -> &[usize] {
        &[]
    }
    fn begin(&mut self, target: &Target, _prompt_ids: &[u32], _features: Option<&Tensor>) -> Result<(), SpecError> {
        self.vocab = target.config().vocab_size;
        Ok(())
    }
    fn propose(&mut self, _target: &Target, _last_token: u32, _start: usize) -> Result<Draft, SpecError> {
        let k = self.block_size.saturating_sub(1);
        let tokens = vec![self.token; k];
        let probs = if self.report_probs {
            let mut q = vec![0f32; k * self.vocab];
            for i in 0..k {
                if let Some(x) = q.get_mut(i * self.vocab + self.token as usize) {
                    *x = 1.0;
                }
            }
            Some(Tensor::from_vec(q, (k, self.vocab), &Device::Cpu)?)
        } else {
            None
        };
        Ok(Draft { tokens, probs })
    }
    fn commit(&mut self, _tokens: &[u32], _features: Option<&Tensor>, _start: usize) -> Result<(), SpecError> {
        Ok(())
    }
}

/// Draws every draft token independently from a fixed distribution q over the vocabulary
/// (uniform unless given), reseeded at each `begin`. With `report_probs` it reports q.
#[derive(Debug, Clone)]
pub struct RandomProposer {
    pub block_size: usize,
    pub seed: u64,
    pub report_probs: bool,
    q: Option<Vec<f32>>,
    cdf: Vec<f64>,
    rng: ChaCha8Rng,
}

impl RandomProposer {
    /// Uniform over the target vocabulary.
    pub fn uniform(block_size: usize, seed: u64) -> Self {
        Self {
            block_size,
            seed,
            report_probs: false,
            q: None,
            cdf: Vec::new(),
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// Draws from `q` (vocab weights, normalised here).
    pub fn from_distribution(block_size: usize, seed: u64, q: Vec<f32>) -> Self {
        Self {
            q: Some(q),
            ..Self::uniform(block_size, seed)
        }
    }
}

impl Proposer for RandomProposer {
    fn block_size(&self) -> usize {
        self.block_size
    }
    fn target_layer_ids(&self) -> &[usize] {
        &[]
    }
    fn begin(&mut self, target: &Target, _prompt_ids: &[u32], _features: Option<&Tensor>) -> Result<(), SpecError> {
        let vocab = target.config().vocab_size;
        let q = match &self.q {
            Some(q) if q.len() == vocab => q.clone(),
            Some(q) => {
                return Err(SpecError::DraftProbsShape {
                    got: vec![q.len()],
                    expected: vec![vocab],
                });
            }
            None => vec![1.0; vocab],
        };
        let total: f64 = q.iter().map(|&x| x as f64).sum();
        if !total.is_finite() || total <= 0.0 || q.iter().any(|&x| x.is_nan() || x < 0.0) {
            return Err(SpecError::InvalidConfig {
                what: "a random proposer's q must be non-negative with positive mass".into(),
            });
        }
        let normed: Vec<f32> = q.iter().map(|&x| (x as f64 / total) as f32).collect();
        let mut cum = 0.0;
        self.cdf = q
            .iter()
            .map(|&x| {
                cum += x as f64 / total;
                cum
            })
            .collect();
        self.q = Some(normed);
        self.rng = ChaCha8Rng::seed_from_u64(self.seed);
        Ok(())
    }
    fn propose(&mut self, _target: &Target, _last_token: u32, _start: usize) -> Result<Draft, SpecError> {
        let k = self.block_size.saturating_sub(1);
        let mut tokens = Vec::with_capacity(k);
        for _ in 0..k {
            let u: f64 = self.rng.gen();
            let i = self.cdf.partition_point(|&c| c <= u).min(self.cdf.len().saturating_sub(1));
            // A zero-mass id can only be hit by rounding at the top end; step down to a real one.
            let q = self.q.as_deref().unwrap_or(&[]);
            let i = (0..=i).rev().find(|&j| q.get(j).is_some_and(|&x| x > 0.0)).unwrap_or(i);
            tokens.push(i as u32);
        }
        let probs = match (&self.q, self.report_probs) {
            (Some(q), true) => {
                let rows: Vec<f32> = (0..k).flat_map(|_| q.iter().copied()).collect();
                Some(Tensor::from_vec(rows, (k, q.len()), &Device::Cpu)?)
            }
            _ => None,
        };
        Ok(Draft { tokens, probs })
    }
    fn commit(&mut self, _tokens: &[u32], _features: Option<&Tensor>, _start: usize) -> Result<(), SpecError> {
        Ok(())
    }
}

/// Proposes a known continuation (e.g. the target's own greedy output from a plain AR run),
/// spoiled at chosen output indices: there it proposes `(true + 1) % vocab` instead. The
/// spoiled indices are either listed or drawn with probability `error_rate` from a hash of
/// (seed, output index), so the same index is always right or always wrong.
#[derive(Debug, Clone)]
pub struct OracleProposer {
    pub block_size: usize,
    /// Output tokens: `continuation[j]` sits at position prompt_len + j.
    pub continuation: Vec<u32>,
    pub errors: OracleErrors,
    prompt_len: usize,
    vocab: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub enum OracleErrors {
    /// These output indices are proposed wrong.
    At(Vec<usize>),
    /// Each output index is wrong with this probability (a fixed function of seed and index).
    Rate { rate: f64, seed: u64 },
}

impl OracleProposer {
    pub fn new(block_size: usize, continuation: Vec<u32>, errors: OracleErrors) -> Self {
        Self {
            block_size,
            continuation,
            errors,
            prompt_len: 0,
            vocab: 1,
        }
    }

    /// Whether output index `j` is proposed wrong.
    pub fn is_error(&self, j: usize) -> bool {
        match &self.errors {
            OracleErrors::At(list) => list.contains(&j),
            OracleErrors::Rate { rate, seed } => {
                let mut r = ChaCha8Rng::seed_from_u64(*seed);
                r.set_word_pos(2 * j as u128);
                r.gen::<f64>() < *rate
            }
        }
    }
}

impl Proposer for OracleProposer {
    fn block_size(&self) -> usize {
        self.block_size
    }
    fn target_layer_ids(&self) -> &[usize] {
        &[]
    }
    fn begin(&mut self, target: &Target, prompt_ids: &[u32], _features: Option<&Tensor>) -> Result<(), SpecError> {
        self.prompt_len = prompt_ids.len();
        self.vocab = target.config().vocab_size as u32;
        Ok(())
    }
    fn propose(&mut self, _target: &Target, _last_token: u32, start: usize) -> Result<Draft, SpecError> {
        // The draft for position start+1+i is output index start+1+i-prompt_len; it stops
        // where the known continuation ends.
        let first = (start + 1).saturating_sub(self.prompt_len);
        let tokens = (first..first + self.block_size.saturating_sub(1))
            .map_while(|j| {
                self.continuation
                    .get(j)
                    .map(|&t| if self.is_error(j) { (t + 1) % self.vocab } else { t })
            })
            .collect();
        Ok(Draft::tokens(tokens))
    }
    fn commit(&mut self, _tokens: &[u32], _features: Option<&Tensor>, _start: usize) -> Result<(), SpecError> {
        Ok(())
    }
}
