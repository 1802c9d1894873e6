//! Running a forward on the compute pool's own threads.
//!
//! The CPU kernels split each matmul over rayon's pool. Called from a thread outside the pool,
//! every split is injected into the pool and the caller sleeps until it is done: one wake-up
//! and one sleep per matmul, a few hundred per decode step. Run from a pool worker instead, the
//! worker takes part of each split itself and the other workers steal the rest, and the caller
//! sleeps once per forward. Measured on the 2-core machine (`specauf bench decode --weights q8
//! --context 64 --verify 8`, README "Speed"): q8 decode 11.3–11.8 → 9.9–10.1 ms, an 8-token
//! verify 21–25 → 14–16 ms. A training step on a worker trained 7–11% more tokens/s (candle's
//! matmul splits over the same pool). The arithmetic, and so every bit of the results, is
//! unchanged.

/// Runs `f` on a worker of the global rayon pool (directly when already on one).
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    rayon::scope(|_| f())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_work_runs_on_a_pool_worker_and_returns_its_value() {
        assert!(rayon::current_thread_index().is_none(), "the test harness thread is outside the pool");
        let (idx, v) = on_pool(|| (rayon::current_thread_index(), 41 + 1));
        assert!(idx.is_some());
        assert_eq!(v, 42);
        // nested: runs in place on the same worker
        let same = on_pool(|| {
            let outer = rayon::current_thread_index();
            on_pool(|| rayon::current_thread_index() == outer)
        });
        assert!(same);
    }
}
