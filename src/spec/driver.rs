//! The decode loop: prefill → (draft → verify → commit)* for any proposer, or none (plain AR).
//!
//! [`Generation`] holds one request's state and runs one cycle per [`Generation::step`];
//! [`generate`] and [`generate_streaming`] drive it to the end. A cycle is three phases
//! (draft the block, verify it in a target forward, consume the verify output), so that
//! [`super::batch`] can put the verify forwards of many generations into one batched forward;
//! `step` is the batch of one. See the module docs of
//! [`crate::spec`] for the algorithm and its invariant.
//!
//! Stopping follows the DFlash reference exactly, so that τ is comparable:
//! - cycles run while the committed output has at most `max_new_tokens` tokens (so a request
//!   whose output reaches exactly the limit still runs one more cycle), and stop after a cycle
//!   once an EOS is anywhere in the committed output (also when the first token, from the
//!   prefill, is an EOS: one cycle still runs);
//! - the output is cut to `max_new_tokens`, then after its first EOS (kept);
//! - every cycle's acc+1 is recorded, also the last one's when part of it lies past the limit
//!   or after the EOS.

use std::time::Instant;

use candle_core::Tensor;

use super::proposer::Proposer;
use super::sampling::{AcceptRule, SamplingParams};
use super::verifier::Verifier;
use super::SpecError;
use crate::model::{BatchItem, ForwardOutput, KvCache, Logits, Target};

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GenerateConfig {
    /// At least 1.
    pub max_new_tokens: usize,
    /// 0 = greedy (exact target greedy output).
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 = off.
    pub top_p: f32,
    /// Keys the uniform number behind every sampled output token.
    pub seed: u64,
    /// Generation stops at the first of these (kept in the output). Usually the target's
    /// `eos_token_ids`; see [`GenerateConfig::greedy`].
    pub eos_token_ids: Vec<u32>,
    /// How draft tokens are accepted at T > 0 (default: sample-and-match).
    pub accept_rule: AcceptRule,
}

impl GenerateConfig {
    /// Greedy decoding of up to `max_new_tokens`, stopping at the target's EOS ids.
    pub fn greedy(target: &Target, max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            eos_token_ids: target.config().eos_token_ids.clone(),
            accept_rule: AcceptRule::SampleMatch,
        }
    }

    pub fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// The output ends with an EOS token.
    Eos,
    /// The output reached `max_new_tokens`.
    Length,
}

/// One request's result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerateOutput {
    /// Generated tokens (prompt excluded), at most max_new_tokens, ending at the first EOS.
    pub token_ids: Vec<u32>,
    pub prompt_len: usize,
    pub finish_reason: FinishReason,
    /// The verified block size (1 = plain AR).
    pub block_size: usize,
    /// acc + 1 of every cycle, in order (the DFlash reference's `acceptance_lengths`).
    pub accept_lengths: Vec<usize>,
    /// Draft tokens proposed in every cycle (≤ block_size - 1).
    pub draft_lengths: Vec<usize>,
    pub cycles: usize,
    /// Mean of `accept_lengths`: this request's average emitted length.
    pub tau: f64,
    /// Target prefill + first token + the proposer's `begin`.
    pub prefill_ms: f64,
    /// Every cycle, from the end of the prefill to the end of the last cycle.
    pub decode_ms: f64,
    /// Time in `propose`, all cycles.
    pub draft_ms: f64,
    /// Time in the first `propose` (where a drafter processes the prompt context; the DFlash
    /// reference starts its decode clock after it).
    pub first_draft_ms: f64,
    /// Time in the verify forward, the verdict and `commit`, all cycles.
    pub verify_ms: f64,
}

/// What one cycle did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cycle {
    /// Position of the block's first token (the last committed token before the cycle).
    pub start: usize,
    /// Draft tokens proposed (k).
    pub drafted: usize,
    /// Draft tokens accepted (acc).
    pub accepted: usize,
    /// The acc + 1 tokens committed (accepted drafts, then the bonus), before any cut at
    /// EOS or at the token limit.
    pub committed: Vec<u32>,
}

/// A drafted block waiting for its verify forward (between phases 1 and 3 of a cycle).
pub struct PendingVerify {
    /// Position of block[0], the last committed token.
    start: usize,
    /// [last, d1..dk]
    block: Vec<u32>,
    /// The drafter's (k, V) probabilities, if it reports them.
    probs: Option<Tensor>,
    /// When the cycle began (before `propose`).
    t0: Instant,
    draft_ms: f64,
}

impl PendingVerify {
    /// Position of the block's first token (the last committed one).
    pub fn start(&self) -> usize {
        self.start
    }

    /// The block to verify: the last committed token, then the drafts.
    pub fn block(&self) -> &[u32] {
        &self.block
    }
}

/// A validated request waiting for its prefill forward (see [`Generation::prepare`]): run
/// the forward on [`Prefill::inputs`] (alone, or batched with other requests' prompts by
/// [`Target::forward_batch`]), then [`Prefill::finish`].
pub struct Prefill<'a> {
    target: &'a Target,
    proposer: Option<Box<dyn Proposer + 'a>>,
    cfg: GenerateConfig,
    verifier: Verifier,
    cache: KvCache,
    taps: Vec<usize>,
    block_size: usize,
    prompt: Vec<u32>,
    t0: Instant,
}

impl<'a> Prefill<'a> {
    /// The prefill forward's request: the prompt on this request's (empty) cache, its taps,
    /// logits of the last position.
    pub fn item(&mut self) -> BatchItem<'_> {
        BatchItem { tokens: &self.prompt, cache: &mut self.cache, taps: &self.taps, logits: Logits::Last }
    }

    /// Takes the first token from `out` (the forward of [`Prefill::item`]) and hands the prompt
    /// features to the proposer.
    pub fn finish(self, out: ForwardOutput) -> Result<Generation<'a>, SpecError> {
        let Prefill { target, mut proposer, cfg, mut verifier, cache, taps, block_size, prompt, t0 } = self;
        if cache.len() != prompt.len() {
            return Err(SpecError::InvalidConfig {
                what: format!("the prefill forward left the cache at {} positions; the prompt has {}", cache.len(), prompt.len()),
            });
        }
        let logits = out.logits.ok_or(SpecError::InvalidConfig {
            what: "the target returned no prefill logits".into(),
        })?;
        let first = verifier.next_token(&logits, 0)?;
        if let Some(p) = proposer.as_deref_mut() {
            // (n_prompt, n_taps·H)
            let features = concat_taps(&out.taps)?;
            p.begin(target, &prompt, features.as_ref())?;
        }
        let prefill_ms = ms_since(t0);
        Ok(Generation {
            target,
            proposer,
            eos_seen: cfg.eos_token_ids.contains(&first),
            cfg,
            verifier,
            cache,
            taps,
            block_size,
            prompt_len: prompt.len(),
            committed: vec![first],
            streamed: 0,
            finished: false,
            accept_lengths: Vec::new(),
            draft_lengths: Vec::new(),
            prefill_ms,
            decode_ms: 0.0,
            draft_ms: 0.0,
            first_draft_ms: 0.0,
            verify_ms: 0.0,
        })
    }
}

/// One request in flight.
pub struct Generation<'a> {
    target: &'a Target,
    /// Owned, so that a caller with many requests in flight gives each its own drafter state; a
    /// borrowed proposer is boxed as `&mut P` (which is a `Proposer` too).
    proposer: Option<Box<dyn Proposer + 'a>>,
    cfg: GenerateConfig,
    verifier: Verifier,
    cache: KvCache,
    taps: Vec<usize>,
    block_size: usize,
    prompt_len: usize,
    /// Every generated token so far; may run past the limit or an EOS within the last cycle.
    committed: Vec<u32>,
    /// How many tokens of the visible output `take_new_output` has handed out.
    streamed: usize,
    /// An EOS is somewhere in `committed`.
    eos_seen: bool,
    finished: bool,
    accept_lengths: Vec<usize>,
    draft_lengths: Vec<usize>,
    prefill_ms: f64,
    decode_ms: f64,
    draft_ms: f64,
    first_draft_ms: f64,
    verify_ms: f64,
}

impl<'a> Generation<'a> {
    /// Validates the request against the target and the proposer, prefills the prompt, takes
    /// the first token and hands the prompt features to the proposer.
    pub fn start(
        target: &'a Target,
        proposer: Option<&'a mut dyn Proposer>,
        prompt_ids: &[u32],
        cfg: &GenerateConfig,
    ) -> Result<Self, SpecError> {
        Self::start_owned(target, proposer.map(|p| Box::new(p) as Box<dyn Proposer + 'a>), prompt_ids, cfg)
    }

    /// [`Generation::start`] owning its proposer.
    pub fn start_owned(
        target: &'a Target,
        proposer: Option<Box<dyn Proposer + 'a>>,
        prompt_ids: &[u32],
        cfg: &GenerateConfig,
    ) -> Result<Self, SpecError> {
        let mut prefill = Self::prepare(target, proposer, prompt_ids, cfg)?;
        let mut outs = target.forward_batch(&mut [prefill.item()])?;
        let out = outs.pop().ok_or(SpecError::InvalidConfig { what: "the target returned no prefill output".into() })?;
        prefill.finish(out)
    }

    /// The first half of [`Generation::start_owned`]: validates the request against the target
    /// and the proposer, and returns what its prefill forward needs.
    pub fn prepare(
        target: &'a Target,
        proposer: Option<Box<dyn Proposer + 'a>>,
        prompt_ids: &[u32],
        cfg: &GenerateConfig,
    ) -> Result<Prefill<'a>, SpecError> {
        let tc = target.config();
        if prompt_ids.is_empty() {
            return Err(SpecError::EmptyPrompt);
        }
        if cfg.max_new_tokens == 0 {
            return Err(SpecError::InvalidConfig {
                what: "max_new_tokens must be at least 1".into(),
            });
        }
        cfg.sampling().validate()?;
        let (block_size, taps) = match proposer.as_deref() {
            Some(p) => (p.block_size(), p.target_layer_ids().to_vec()),
            None => (1, Vec::new()),
        };
        if block_size == 0 {
            return Err(SpecError::ZeroBlockSize);
        }
        if let Some(&layer) = taps.iter().find(|&&l| l >= tc.num_hidden_layers) {
            return Err(SpecError::TapOutOfRange {
                layer,
                layers: tc.num_hidden_layers,
            });
        }
        // The last cycle may start at position prompt_len + max_new_tokens - 1 and verify B
        // positions from there.
        let needed = prompt_ids.len() + cfg.max_new_tokens + block_size - 1;
        if needed > tc.max_position_embeddings {
            return Err(SpecError::ContextOverflow {
                needed,
                prompt_len: prompt_ids.len(),
                max_new_tokens: cfg.max_new_tokens,
                block_size,
                max: tc.max_position_embeddings,
            });
        }
        Ok(Prefill {
            target,
            proposer,
            cfg: cfg.clone(),
            verifier: Verifier::new(cfg.sampling(), cfg.accept_rule, cfg.seed),
            cache: target.new_cache(),
            taps,
            block_size,
            prompt: prompt_ids.to_vec(),
            t0: Instant::now(),
        })
    }

    /// Runs one draft → verify → commit cycle: the batch-of-one case of
    /// [`super::batch::step_all`], so a lone request and a batched one run the same code.
    pub fn step(&mut self) -> Result<Cycle, SpecError> {
        let mut results = super::batch::step_all(&mut [self])?;
        results.pop().ok_or(SpecError::Finished)?
    }

    /// The target this generation decodes with.
    pub fn target(&self) -> &'a Target {
        self.target
    }

    /// Phase 1 of a cycle: draft k ≤ B-1 tokens for positions start+1..=start+k and check
    /// them; returns the block [last, d1..dk] the target must verify at start..=start+k.
    pub fn draft_block(&mut self) -> Result<PendingVerify, SpecError> {
        self.block(true)
    }

    /// Phase 1 without drafting: the block is `[last]` alone, so the cycle is a plain decode
    /// step (a server does this when a batch is large enough that drafts no longer pay). The
    /// proposer is not asked; it still gets the step's committed token and features at
    /// `finish_cycle`, and catches up at its next `propose` ([`Proposer::commit`]).
    pub fn plain_block(&mut self) -> Result<PendingVerify, SpecError> {
        self.block(false)
    }

    fn block(&mut self, speculate: bool) -> Result<PendingVerify, SpecError> {
        if self.finished {
            return Err(SpecError::Finished);
        }
        let vocab = self.target.config().vocab_size;
        let last = *self.committed.last().ok_or(SpecError::Finished)?;
        let start = self.prompt_len + self.committed.len() - 1;
        let t0 = Instant::now();
        let draft = match self.proposer.as_deref_mut() {
            Some(p) if speculate => Some(p.propose(self.target, last, start)?),
            _ => None,
        };
        let draft_ms = ms_since(t0);
        let (drafts, probs) = match draft {
            Some(d) => (d.tokens, d.probs),
            None => (Vec::new(), None),
        };
        if drafts.len() + 1 > self.block_size {
            return Err(SpecError::TooManyDraftTokens {
                got: drafts.len(),
                block_size: self.block_size,
                max: self.block_size - 1,
            });
        }
        if let Some((i, &token)) = drafts.iter().enumerate().find(|(_, &t)| t as usize >= vocab) {
            return Err(SpecError::DraftTokenOutOfRange {
                token,
                position: i + 1,
                vocab,
            });
        }
        let mut block = Vec::with_capacity(drafts.len() + 1);
        block.push(last);
        block.extend_from_slice(&drafts);
        Ok(PendingVerify { start, block, probs, t0, draft_ms })
    }

    /// Phase 2: the verify forward's request for `pending`: its block, this generation's
    /// cache and taps, logits at every block position: (k+1, V), taps k+1 × (k+1, H).
    pub fn verify_item<'s>(&'s mut self, pending: &'s PendingVerify) -> BatchItem<'s> {
        BatchItem { tokens: &pending.block, cache: &mut self.cache, taps: &self.taps, logits: Logits::All }
    }

    /// Phase 3: consumes the verify forward's output for `pending` (`t1`: when that forward
    /// began): accept, commit, crop the cache, feed the proposer, record, decide to stop.
    pub fn finish_cycle(&mut self, pending: PendingVerify, out: ForwardOutput, t1: Instant) -> Result<Cycle, SpecError> {
        let PendingVerify { start, block, probs, t0, draft_ms } = pending;
        let drafts = &block[1..];
        let logits = out.logits.ok_or(SpecError::InvalidConfig {
            what: "the target returned no verify logits".into(),
        })?;
        let verdict = match self.verifier.verify(drafts, probs.as_ref(), &logits, self.committed.len()) {
            Ok(v) => v,
            Err(e) => {
                // Keep the invariant for a caller that inspects the cache after the error.
                self.cache.truncate(start);
                return Err(e);
            }
        };
        let acc = verdict.accepted;

        // commit d1..d_acc and the bonus; the cache keeps positions 0..start+acc+1, i.e.
        // everything but the bonus, which the next block starts with.
        let mut new_tokens = drafts[..acc].to_vec();
        new_tokens.push(verdict.bonus);
        self.committed.extend_from_slice(&new_tokens);
        self.cache.truncate(start + acc + 1);
        if let Some(p) = self.proposer.as_deref_mut() {
            // Features of the acc+1 committed block positions, from this verify pass:
            // (acc+1, n_taps·H)
            let features = match concat_taps(&out.taps)? {
                Some(f) => Some(f.narrow(0, 0, acc + 1)?.contiguous()?),
                None => None,
            };
            if let Err(e) = p.commit(&block[..acc + 1], features.as_ref(), start) {
                // The proposer's state no longer matches the target's: no further cycles.
                self.finished = true;
                return Err(e);
            }
        }
        let verify_ms = ms_since(t1);

        if self.accept_lengths.is_empty() {
            self.first_draft_ms = draft_ms;
        }
        self.draft_ms += draft_ms;
        self.verify_ms += verify_ms;
        self.decode_ms += ms_since(t0);
        self.accept_lengths.push(acc + 1);
        self.draft_lengths.push(drafts.len());

        // stop after this cycle on an EOS anywhere in the output, or past the limit.
        self.eos_seen |= new_tokens.iter().any(|t| self.cfg.eos_token_ids.contains(t));
        self.finished = self.eos_seen || self.committed.len() > self.cfg.max_new_tokens;
        Ok(Cycle {
            start,
            drafted: drafts.len(),
            accepted: acc,
            committed: new_tokens,
        })
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The output as it stands: committed tokens cut to the limit and after the first EOS.
    pub fn output(&self) -> &[u32] {
        let mut n = self.committed.len().min(self.cfg.max_new_tokens);
        if let Some(i) = self.committed[..n].iter().position(|t| self.cfg.eos_token_ids.contains(t)) {
            n = i + 1;
        }
        &self.committed[..n]
    }

    /// Output tokens not handed out by an earlier call (for streaming).
    pub fn take_new_output(&mut self) -> Vec<u32> {
        let out = self.output();
        let new = out.get(self.streamed..).unwrap_or(&[]).to_vec();
        self.streamed = out.len();
        new
    }

    /// Every generated token so far, without the cuts of [`Generation::output`].
    pub fn committed(&self) -> &[u32] {
        &self.committed
    }

    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The target cache: between cycles it holds positions 0..prompt_len + committed - 1.
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    pub fn finish(self) -> GenerateOutput {
        let token_ids = self.output().to_vec();
        let finish_reason = match token_ids.last() {
            Some(t) if self.cfg.eos_token_ids.contains(t) => FinishReason::Eos,
            _ => FinishReason::Length,
        };
        let cycles = self.accept_lengths.len();
        let tau = if cycles == 0 {
            0.0
        } else {
            self.accept_lengths.iter().sum::<usize>() as f64 / cycles as f64
        };
        GenerateOutput {
            token_ids,
            prompt_len: self.prompt_len,
            finish_reason,
            block_size: self.block_size,
            accept_lengths: self.accept_lengths,
            draft_lengths: self.draft_lengths,
            cycles,
            tau,
            prefill_ms: self.prefill_ms,
            decode_ms: self.decode_ms,
            draft_ms: self.draft_ms,
            first_draft_ms: self.first_draft_ms,
            verify_ms: self.verify_ms,
        }
    }
}

/// Generates a completion of `prompt_ids`. With `proposer: None` this is plain AR decoding.
pub fn generate<'a>(
    target: &'a Target,
    proposer: Option<&'a mut dyn Proposer>,
    prompt_ids: &[u32],
    cfg: &GenerateConfig,
) -> Result<GenerateOutput, SpecError> {
    generate_streaming(target, proposer, prompt_ids, cfg, &mut |_| {})
}

/// Like [`generate`], calling `on_tokens` with each newly committed chunk of the output (the
/// first token after the prefill, then each cycle's tokens, cut at EOS and at the limit). The
/// chunks concatenate to `token_ids`.
pub fn generate_streaming<'a>(
    target: &'a Target,
    proposer: Option<&'a mut dyn Proposer>,
    prompt_ids: &[u32],
    cfg: &GenerateConfig,
    on_tokens: &mut dyn FnMut(&[u32]),
) -> Result<GenerateOutput, SpecError> {
    let mut generation = Generation::start(target, proposer, prompt_ids, cfg)?;
    let chunk = generation.take_new_output();
    on_tokens(&chunk);
    while !generation.is_finished() {
        generation.step()?;
        let chunk = generation.take_new_output();
        if !chunk.is_empty() {
            on_tokens(&chunk);
        }
    }
    Ok(generation.finish())
}

/// n_taps × (n, H) -> (n, n_taps·H), None when nothing is tapped.
fn concat_taps(taps: &[Tensor]) -> Result<Option<Tensor>, SpecError> {
    match taps.len() {
        0 => Ok(None),
        1 => Ok(Some(taps[0].clone())),
        _ => Ok(Some(Tensor::cat(taps, 1)?)),
    }
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}
