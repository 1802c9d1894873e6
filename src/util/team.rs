//! A team: every thread of the compute pool runs the same code at once, meeting at spin
//! barriers between phases (SPMD), instead of a pool dispatch for each parallel step.
//!
//! Why: a layer of a decode step or a short verify is four matmuls of a few hundred µs and a
//! dozen small steps between them (norms, activation quantization, RoPE, the cache write,
//! attention, the residual adds). Dispatched matmul by matmul, the small steps run on one
//! thread while the other waits for the next split: 11–18% of each worker's time in a native
//! verify(8) (docs/perf.md § "The VNNI peak, measured again"). In a team, every step is shared
//! out (rows, tiles or attention units) and a phase ends at a barrier that costs a few hundred
//! nanoseconds when both threads arrive together.
//!
//! The members are the pool's two workers (the machine this is built for has two cores; other
//! pool sizes take the ordinary path, a one-thread pool runs a team of one). Only one team runs
//! at a time: [`run`] returns `None` while another is running, and the caller then takes its
//! ordinary pool path. A member that waits long at a barrier yields its CPU, so a member that
//! the OS has descheduled gets it back; work inside a phase is claimed in chunks
//! ([`Team::claim`]), so a member that falls behind leaves its chunks to the other.
//!
//! Measured on that machine (docs/perf.md § "A team for the layers"): the waiting fell from
//! 11–18% to 7–9% of each worker's time in a verify(8); a decode step 5–6% and a verify 2–9%
//! faster, batched decoding 18–42%.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Spins of a waiting member before it starts yielding its CPU between checks.
const SPINS_BEFORE_YIELD: u32 = 1 << 14;

static BUSY: AtomicBool = AtomicBool::new(false);

/// What the members share: the barrier's count and generation, the claim counter, and whether
/// a member panicked (the others then panic at their next barrier instead of waiting forever).
struct Shared {
    n: usize,
    arrived: AtomicUsize,
    generation: AtomicUsize,
    tickets: AtomicUsize,
    poisoned: AtomicBool,
}

/// One member's view of its team.
pub struct Team<'a> {
    id: usize,
    shared: &'a Shared,
    /// The claim counter's value at the start of the current phase. Every member computes the
    /// same sequence (see [`Team::claim`]), so none has to be told.
    base: std::cell::Cell<usize>,
}

impl Team<'_> {
    /// This member's index, 0..size().
    pub fn id(&self) -> usize {
        self.id
    }

    pub fn size(&self) -> usize {
        self.shared.n
    }

    /// This member's static share of 0..len (contiguous, sizes differing by at most one).
    pub fn share(&self, len: usize) -> Range<usize> {
        let n = self.shared.n;
        len * self.id / n..len * (self.id + 1) / n
    }

    /// Waits until every member has called `sync` as many times as this one. Everything a
    /// member wrote before its call is visible to every member after it.
    pub fn sync(&self) {
        let s = self.shared;
        if s.n == 1 {
            return;
        }
        let gen = s.generation.load(Ordering::Acquire);
        if s.arrived.fetch_add(1, Ordering::AcqRel) + 1 == s.n {
            s.arrived.store(0, Ordering::Relaxed);
            s.generation.fetch_add(1, Ordering::Release);
            return;
        }
        let mut spins = 0u32;
        while s.generation.load(Ordering::Acquire) == gen {
            if s.poisoned.load(Ordering::Relaxed) {
                panic!("a member of the compute team panicked");
            }
            if spins < SPINS_BEFORE_YIELD {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Shares 0..len out in chunks of `chunk`, first come first served: calls `f` with each
    /// chunk this member claims. Every member must call `claim` in the same phases with the same
    /// arguments (a phase being the code between two [`Team::sync`]s), and a `sync` must
    /// separate two claims. Each member stops at its first claim past the end, so a phase uses
    /// exactly chunks + size() tickets, which is how every member knows the next phase's base.
    pub fn claim(&self, len: usize, chunk: usize, mut f: impl FnMut(Range<usize>)) {
        let chunk = chunk.max(1);
        let chunks = len.div_ceil(chunk);
        let base = self.base.get();
        loop {
            let i = self.shared.tickets.fetch_add(1, Ordering::Relaxed) - base;
            if i >= chunks {
                break;
            }
            f(i * chunk..len.min((i + 1) * chunk));
        }
        self.base.set(base + chunks + self.shared.n);
    }
}

/// A buffer the members of a team write in disjoint parts (rows, a matmul's tiles, attention
/// units) and read whole only after a barrier.
#[derive(Clone, Copy)]
pub(crate) struct SharedBuf(pub(crate) *mut f32);
// SAFETY: within a phase members write disjoint parts, and a barrier separates every write
// from every read of the same part by another member (the callers' contract).
unsafe impl Send for SharedBuf {}
unsafe impl Sync for SharedBuf {}

impl SharedBuf {
    pub(crate) fn of(v: &mut [f32]) -> Self {
        SharedBuf(v.as_mut_ptr())
    }

    /// Elements a..b.
    ///
    /// # Safety
    /// In bounds; no member writes them while this slice lives.
    pub(crate) unsafe fn get<'a>(self, a: usize, b: usize) -> &'a [f32] {
        std::slice::from_raw_parts(self.0.add(a), b - a)
    }

    /// Elements a..b, for writing.
    ///
    /// # Safety
    /// In bounds; no other member reads or writes them while this slice lives.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn get_mut<'a>(self, a: usize, b: usize) -> &'a mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(a), b - a)
    }
}

/// Sets `poisoned` if its member unwinds.
struct PoisonOnPanic<'a>(&'a AtomicBool);

impl Drop for PoisonOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::Relaxed);
        }
    }
}

/// Clears [`BUSY`] when the team is done, panic or not.
struct Release;

impl Drop for Release {
    fn drop(&mut self) {
        BUSY.store(false, Ordering::Release);
    }
}

/// Whether [`run`] can form a team here (whether or not another team is running now): on a
/// worker of a two-thread pool, or anywhere with a one-thread pool.
pub fn possible() -> bool {
    match rayon::current_num_threads() {
        0 | 1 => true,
        2 => rayon::current_thread_index().is_some(),
        _ => false,
    }
}

/// Runs `f` on the calling rayon worker (member 0) and on the pool's other worker (member 1)
/// at once, as one team, and returns member 0's result; `None` (without running `f`) where no
/// team can be formed: another two-member team is running, or the caller is not a worker of a
/// two-thread pool (the machine this is built for has two cores; other pools take the
/// dispatched path). In a one-thread pool `f` runs alone, as a team of one.
///
/// Member 1 is a job spawned into the pool, which the other worker takes; member 0 runs inline
/// and does not enter rayon's scheduler until its part is done, so it cannot pick up other work
/// in the middle of the team. Inside `f`, use no rayon parallelism.
pub fn run<R: Send>(f: impl Fn(&Team) -> R + Sync) -> Option<R> {
    if !possible() {
        return None;
    }
    let n = rayon::current_num_threads().max(1);
    // A team of one shares nothing: it needs no turn (one-thread pools run side by side, as
    // the regeneration workers and the data-parallel ranks in threads do).
    let mut release = None;
    if n > 1 {
        if BUSY.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            return None;
        }
        release = Some(Release);
    }
    let shared = Shared {
        n,
        arrived: AtomicUsize::new(0),
        generation: AtomicUsize::new(0),
        tickets: AtomicUsize::new(0),
        poisoned: AtomicBool::new(false),
    };
    let member = |id: usize| {
        let _guard = PoisonOnPanic(&shared.poisoned);
        f(&Team { id, shared: &shared, base: std::cell::Cell::new(0) })
    };
    if shared.n == 1 {
        return Some(member(0));
    }
    rayon::scope(|s| {
        s.spawn(|_| {
            member(1);
        });
        let r = member(0);
        // Member 0 has passed every barrier, so member 1 is in its last phase at most: the team
        // is free for the next forward, which this worker may pick up while the scope waits.
        release.take();
        Some(r)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Runs `f` as a team in a two-thread pool of its own (the team's shape on the machine it
    /// is built for), retrying while another test holds the team.
    fn run_until_free<R: Send>(f: impl Fn(&Team) -> R + Sync + Send) -> R {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        pool.install(|| {
            for _ in 0..10_000 {
                if let Some(r) = run(&f) {
                    return r;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            panic!("the team stayed busy for 10 s");
        })
    }

    #[test]
    fn phases_see_each_others_writes_and_claims_cover_each_index_once() {
        let n = 2;
        let seen = Mutex::new(Vec::new());
        let counts: Vec<AtomicUsize> = (0..1000).map(|_| AtomicUsize::new(0)).collect();
        let first: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
        let size = run_until_free(|t| {
            for phase in 0..50 {
                // Claims of different lengths and chunks, phase after phase.
                let (len, chunk) = (7 + phase * 13 % 991, 1 + phase % 9);
                t.claim(len, chunk, |r| {
                    for i in r {
                        counts[i].fetch_add(1, Ordering::Relaxed);
                    }
                });
                t.sync();
                if t.id() == 0 {
                    for (i, c) in counts.iter().enumerate() {
                        assert_eq!(c.swap(0, Ordering::Relaxed), usize::from(i < len), "phase {phase}, index {i}");
                    }
                }
                t.sync();
            }
            // Writes before a sync are visible after it.
            first[t.id()].store(t.id() + 1, Ordering::Relaxed);
            t.sync();
            seen.lock().unwrap().push(first.iter().map(|v| v.load(Ordering::Relaxed)).sum::<usize>());
            t.size()
        });
        assert_eq!(size, n);
        let seen = seen.into_inner().unwrap();
        assert_eq!(seen.len(), n, "every member ran");
        assert!(seen.iter().all(|&s| s == n * (n + 1) / 2), "{seen:?}");
    }

    #[test]
    fn shares_split_a_range_without_gaps() {
        run_until_free(|t| {
            let r = t.share(10);
            let n = t.size();
            assert_eq!(r.start, 10 * t.id() / n);
            assert_eq!(r.end, 10 * (t.id() + 1) / n);
        });
    }

    #[test]
    fn no_team_outside_a_two_thread_pool() {
        // The test harness thread is not a pool worker.
        assert!(rayon::current_thread_index().is_none());
        if rayon::current_num_threads() == 2 {
            assert!(run(|_| ()).is_none(), "a team needs the caller to be one of the two workers");
        }
        let four = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap();
        assert!(four.install(|| run(|_| ())).is_none(), "a four-thread pool takes the dispatched path");
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        assert_eq!(one.install(|| run(|t| t.size())), Some(1), "a one-thread pool is a team of one");
    }

    #[test]
    fn a_second_team_is_refused_while_one_runs() {
        let inner = run_until_free(|t| {
            let r = if t.id() == 0 { run(|_| 1).is_none() } else { true };
            t.sync();
            r
        });
        assert!(inner, "a nested team must be refused, not deadlock");
    }
}
