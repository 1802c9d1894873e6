//! The engine: one thread that owns the target and decodes every request.
//!
//! The forward is CPU-bound, so it runs on a dedicated `std::thread`, never on the async
//! workers. Requests arrive over a bounded channel (its capacity is the queue limit: a full
//! queue is a 503, not unbounded memory); each request's tokens go back over its own channel.
//! Up to `max_concurrency` requests are active at once and the engine runs one decode cycle of
//! each in turn, so every client sees progress. A request whose receiver has been dropped (the
//! client went away, or the HTTP side stopped at a stop string) is cancelled before its next
//! cycle and its slot is free for the next queued request.
//!
//! Each active request is a [`Generation`] with its own KV cache and its own proposer: the
//! output is exactly what `generate` gives for the same prompt and config. A cycle drafts every
//! active request's block, verifies all blocks in one batched forward (the linears read the
//! weights once for every request's rows; attention stays per request, on its own cache), then
//! commits each block with its own verdict; newly admitted requests are prefilled together
//! the same way. Batching is on with q8 weights, whose kernels are
//! row-independent, so a request's logits do not depend on what it was batched with; with f32
//! or native weights the verify forwards run one by one.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::load::DrafterTemplate;
use super::metrics::Metrics;
use crate::model::{ForwardOutput, Target};
use crate::spec::{Cycle, FinishReason, GenerateConfig, Generation, PendingVerify, Prefill};

/// One request for the engine.
pub struct Job {
    pub prompt_ids: Vec<u32>,
    pub cfg: GenerateConfig,
    /// Where the request's events go; dropping the receiver cancels the request.
    pub events: UnboundedSender<Event>,
}

/// What one cycle did, for the request's `usage.speculative`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CycleStats {
    pub drafted: usize,
    pub accepted: usize,
}

/// The engine's messages to one request, in order: one `Tokens` after the prefill (`cycle`:
/// None), one per cycle, then `Done` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// New output tokens (possibly none, when a cycle's tokens lie past EOS or the limit).
    Tokens { tokens: Vec<u32>, cycle: Option<CycleStats> },
    Done { finish_reason: FinishReason },
    Failed { message: String },
    /// The server is shutting down; the request was cut.
    Cancelled,
}

#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Requests decoded at once (at least 1).
    pub max_concurrency: usize,
    /// Requests waiting beyond those (at least 1).
    pub max_queue: usize,
    /// Cycles of at least this many requests run without drafts (0: never).
    pub speculative_disable_by_batch_size: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("the queue is full ({queued} waiting, limit {limit})")]
    Full { queued: usize, limit: usize },
    #[error("the engine has stopped")]
    Stopped,
}

struct Shared {
    queued: AtomicUsize,
    stop: AtomicBool,
    max_queue: usize,
    metrics: Arc<Metrics>,
}

/// The HTTP side's handle on the engine; cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    tx: SyncSender<Job>,
    shared: Arc<Shared>,
}

impl EngineHandle {
    /// Queues a job, or refuses it at once when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        if self.shared.stop.load(Ordering::SeqCst) {
            return Err(SubmitError::Stopped);
        }
        // Count first: the engine may take the job before try_send returns.
        self.shared.queued.fetch_add(1, Ordering::SeqCst);
        self.shared.metrics.queue_depth.inc();
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                let queued = self.shared.queued.fetch_sub(1, Ordering::SeqCst) - 1;
                self.shared.metrics.queue_depth.dec();
                match e {
                    TrySendError::Full(_) => Err(SubmitError::Full { queued, limit: self.shared.max_queue }),
                    TrySendError::Disconnected(_) => Err(SubmitError::Stopped),
                }
            }
        }
    }

    /// Requests waiting for a slot.
    pub fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::SeqCst)
    }

    pub fn max_queue(&self) -> usize {
        self.shared.max_queue
    }

    /// Stops the engine: every active and queued request ends with `Failed` at the next cycle,
    /// and the thread exits.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
    }

    pub fn is_stopped(&self) -> bool {
        self.shared.stop.load(Ordering::SeqCst)
    }
}

/// Starts the engine thread, which owns `target` and the drafter.
pub fn spawn(
    target: Target,
    drafter: Option<DrafterTemplate>,
    cfg: EngineConfig,
    metrics: Arc<Metrics>,
) -> std::io::Result<(EngineHandle, JoinHandle<()>)> {
    let (tx, rx) = sync_channel(cfg.max_queue.max(1));
    let shared = Arc::new(Shared { queued: AtomicUsize::new(0), stop: AtomicBool::new(false), max_queue: cfg.max_queue.max(1), metrics });
    let engine_shared = shared.clone();
    let thread = std::thread::Builder::new()
        .name("specauf-engine".into())
        .spawn(move || run(&target, drafter.as_ref(), &cfg, &engine_shared, rx))?;
    Ok((EngineHandle { tx, shared }, thread))
}

struct Active<'t> {
    generation: Generation<'t>,
    events: UnboundedSender<Event>,
    eos: Vec<u32>,
}

/// How long an idle engine waits for a job before it looks at the stop flag again.
const IDLE_POLL: Duration = Duration::from_millis(50);

fn run(target: &Target, drafter: Option<&DrafterTemplate>, cfg: &EngineConfig, shared: &Shared, rx: Receiver<Job>) {
    let max_concurrency = cfg.max_concurrency.max(1);
    let metrics = &shared.metrics;
    // Batched forwards keep T = 0 exact only with batch-invariant kernels (q8, native).
    let batched = target.is_batch_invariant();
    let mut active: Vec<Active<'_>> = Vec::new();
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            for a in active.drain(..) {
                let _ = a.events.send(Event::Cancelled);
            }
            metrics.active_requests.set(0);
            while let Ok(job) = rx.try_recv() {
                take_from_queue(shared);
                let _ = job.events.send(Event::Cancelled);
            }
            return;
        }
        // 1. Admit queued jobs into free slots (block only when there is nothing to decode),
        //    and prefill them together.
        let mut jobs = Vec::new();
        while active.len() + jobs.len() < max_concurrency {
            let job = if active.is_empty() && jobs.is_empty() {
                match rx.recv_timeout(IDLE_POLL) {
                    Ok(job) => job,
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            } else {
                match rx.try_recv() {
                    Ok(job) => job,
                    Err(_) => break,
                }
            };
            take_from_queue(shared);
            if job.events.is_closed() {
                metrics.cancelled.inc();
                continue;
            }
            jobs.push(job);
        }
        if !jobs.is_empty() {
            active.extend(admit(target, drafter, jobs, metrics, batched));
        }
        metrics.active_requests.set(active.len() as i64);
        // 2. One cycle of each active request, in turn.
        let disable = cfg.speculative_disable_by_batch_size;
        let speculate = disable == 0 || active.len() < disable;
        cycle_all(target, &mut active, metrics, batched, speculate);
        metrics.active_requests.set(active.len() as i64);
    }
}

fn take_from_queue(shared: &Shared) {
    shared.queued.fetch_sub(1, Ordering::SeqCst);
    shared.metrics.queue_depth.dec();
}

/// Rows of one batched prefill forward: bounds its activations (a longer prompt runs alone).
const PREFILL_BATCH_ROWS: usize = 2048;

/// Validates and prefills jobs (batched, in groups of at most [`PREFILL_BATCH_ROWS`] rows) and
/// sends each its first token; a job that fails is told and left out.
fn admit<'t>(target: &'t Target, drafter: Option<&DrafterTemplate>, jobs: Vec<Job>, metrics: &Metrics, batched: bool) -> Vec<Active<'t>> {
    let t0 = Instant::now();
    // 1. Validate.
    let mut ready: Vec<(Job, Prefill<'t>)> = Vec::with_capacity(jobs.len());
    for job in jobs {
        let proposer = drafter.map(|d| d.proposer_on(target.backend()) as Box<dyn crate::spec::Proposer>);
        match catch_unwind(AssertUnwindSafe(|| Generation::prepare(target, proposer, &job.prompt_ids, &job.cfg))) {
            Ok(Ok(p)) => ready.push((job, p)),
            Ok(Err(e)) => {
                let _ = job.events.send(Event::Failed { message: e.to_string() });
            }
            Err(_) => {
                let _ = job.events.send(Event::Failed { message: "internal error while validating (a panic, caught)".into() });
            }
        }
    }
    // 2. Prefill: consecutive prompts in groups of bounded rows, one forward per group; what a
    //    group's forward did not do (or a failed one, which commits nothing) runs alone.
    let mut outs: Vec<Option<ForwardOutput>> = (0..ready.len()).map(|_| None).collect();
    if batched && ready.len() > 1 {
        let mut start = 0;
        while start < ready.len() {
            let mut end = start + 1;
            let mut rows = ready[start].0.prompt_ids.len();
            while end < ready.len() && rows + ready[end].0.prompt_ids.len() <= PREFILL_BATCH_ROWS {
                rows += ready[end].0.prompt_ids.len();
                end += 1;
            }
            if end - start > 1 {
                let mut items: Vec<_> = ready[start..end].iter_mut().map(|(_, p)| p.item()).collect();
                if let Ok(Ok(group)) = catch_unwind(AssertUnwindSafe(|| target.forward_batch(&mut items))) {
                    for (slot, out) in outs[start..end].iter_mut().zip(group) {
                        *slot = Some(out);
                    }
                }
            }
            start = end;
        }
    }
    let mut admitted = Vec::with_capacity(ready.len());
    for ((job, mut prefill), out) in ready.into_iter().zip(outs) {
        let out = match out {
            Some(out) => Ok(out),
            None => {
                let mut item = [prefill.item()];
                match catch_unwind(AssertUnwindSafe(|| target.forward_batch(&mut item))) {
                    Ok(Ok(mut out)) if out.len() == 1 => Ok(out.remove(0)),
                    Ok(Ok(_)) => Err("internal error: the prefill forward returned no output".to_string()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("internal error in the prefill (a panic, caught)".to_string()),
                }
            }
        };
        // 3. First token, proposer started.
        let started = match out {
            Ok(out) => match catch_unwind(AssertUnwindSafe(|| prefill.finish(out))) {
                Ok(Ok(g)) => Ok(g),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("internal error after the prefill (a panic, caught)".to_string()),
            },
            Err(e) => Err(e),
        };
        let mut generation = match started {
            Ok(g) => g,
            Err(message) => {
                let _ = job.events.send(Event::Failed { message });
                continue;
            }
        };
        let tokens = generation.take_new_output();
        metrics.add_tokens(tokens.len());
        if job.events.send(Event::Tokens { tokens, cycle: None }).is_err() {
            metrics.cancelled.inc();
            continue;
        }
        admitted.push(Active { generation, events: job.events, eos: job.cfg.eos_token_ids });
    }
    metrics.prefill_seconds.inc_by(t0.elapsed().as_secs_f64());
    admitted
}

/// One cycle of every active request. With `batched`, the verify forwards of all of them run
/// as one [`Target::forward_batch`] (each block on its own cache); otherwise one by one.
/// One cycle of every active request; `speculate` false: plain decode steps (no drafts).
fn cycle_all<'t>(target: &'t Target, active: &mut Vec<Active<'t>>, metrics: &Metrics, batched: bool, speculate: bool) {
    // Requests whose client is gone, or that are done, leave before any work is spent on them.
    active.retain(|a| {
        if a.events.is_closed() {
            metrics.cancelled.inc();
            false
        } else if a.generation.is_finished() {
            finish(a)
        } else {
            true
        }
    });
    if active.is_empty() {
        return;
    }
    // 1. Draft every block.
    let t_draft = Instant::now();
    let mut blocks: Vec<Option<PendingVerify>> = Vec::with_capacity(active.len());
    for a in active.iter_mut() {
        let proposed = catch_unwind(AssertUnwindSafe(|| if speculate { a.generation.draft_block() } else { a.generation.plain_block() }));
        blocks.push(match proposed {
            Ok(Ok(b)) => Some(b),
            Ok(Err(e)) => {
                let _ = a.events.send(Event::Failed { message: e.to_string() });
                None
            }
            Err(_) => {
                let _ = a.events.send(Event::Failed { message: "internal error while drafting (a panic, caught)".into() });
                None
            }
        });
    }
    metrics.draft_seconds.inc_by(t_draft.elapsed().as_secs_f64());
    if !speculate {
        metrics.cycles_without_drafts.inc_by(blocks.iter().flatten().count() as u64);
    }
    let t_verify = Instant::now();
    // 2. Verify: one forward for all blocks, or one each. A failed batched forward leaves the
    //    caches as they were (positions are committed only at its end): retry one by one.
    let n_blocks = blocks.iter().flatten().count();
    let mut outs: Vec<Option<Result<ForwardOutput, String>>> = Vec::new();
    if batched && n_blocks > 1 {
        let mut items: Vec<_> =
            active.iter_mut().zip(&blocks).filter_map(|(a, b)| b.as_ref().map(|b| a.generation.verify_item(b))).collect();
        if let Ok(Ok(all)) = catch_unwind(AssertUnwindSafe(|| target.forward_batch(&mut items))) {
            metrics.verify_batch_size.observe(n_blocks as f64);
            let mut all = all.into_iter();
            outs = blocks.iter().map(|b| b.as_ref().and_then(|_| all.next()).map(Ok)).collect();
        }
    }
    if outs.is_empty() {
        for _ in 0..n_blocks {
            metrics.verify_batch_size.observe(1.0);
        }
        outs = active
            .iter_mut()
            .zip(&blocks)
            .map(|(a, b)| {
                b.as_ref().map(|b| {
                    let mut item = [a.generation.verify_item(b)];
                    match catch_unwind(AssertUnwindSafe(|| target.forward_batch(&mut item))) {
                        Ok(Ok(mut out)) if out.len() == 1 => Ok(out.remove(0)),
                        Ok(Ok(_)) => Err("internal error: the verify forward returned no output".to_string()),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err("internal error in the verify forward (a panic, caught)".into()),
                    }
                })
            })
            .collect();
    }
    // 3. Commit each block with its own verdict, and tell its client.
    let mut keep = Vec::with_capacity(active.len());
    for ((a, block), out) in active.iter_mut().zip(blocks).zip(outs) {
        let (Some(block), Some(out)) = (block, out) else {
            keep.push(false);
            continue;
        };
        let cycle = match out {
            Ok(out) => match catch_unwind(AssertUnwindSafe(|| a.generation.finish_cycle(block, out, t_verify))) {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    let _ = a.events.send(Event::Failed { message: e.to_string() });
                    keep.push(false);
                    continue;
                }
                Err(_) => {
                    let _ = a.events.send(Event::Failed { message: "internal error in the verdict (a panic, caught)".into() });
                    keep.push(false);
                    continue;
                }
            },
            Err(message) => {
                let _ = a.events.send(Event::Failed { message });
                keep.push(false);
                continue;
            }
        };
        keep.push(deliver(a, &cycle, metrics));
    }
    metrics.verify_seconds.inc_by(t_verify.elapsed().as_secs_f64());
    let mut keep = keep.into_iter();
    active.retain(|_| keep.next().unwrap_or(false));
}

/// Sends a cycle's tokens; false when the request is over (finished or its client gone).
fn deliver(a: &mut Active<'_>, cycle: &Cycle, metrics: &Metrics) -> bool {
    let tokens = a.generation.take_new_output();
    metrics.cycle(cycle.drafted, cycle.accepted, tokens.len());
    let stats = CycleStats { drafted: cycle.drafted, accepted: cycle.accepted };
    if a.events.send(Event::Tokens { tokens, cycle: Some(stats) }).is_err() {
        metrics.cancelled.inc();
        return false;
    }
    if a.generation.is_finished() {
        return finish(a);
    }
    true
}

fn finish(a: &Active<'_>) -> bool {
    let finish_reason = match a.generation.output().last() {
        Some(t) if a.eos.contains(t) => FinishReason::Eos,
        _ => FinishReason::Length,
    };
    let _ = a.events.send(Event::Done { finish_reason });
    false
}
