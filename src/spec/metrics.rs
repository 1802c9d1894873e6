//! Acceptance metrics over many requests (DESIGN §1).
//!
//! - τ of one request = mean over its cycles of acc+1; a benchmark's τ = mean over requests.
//! - pooled τ = total emitted (Σ acc+1) / total cycles.
//! - histogram of acc+1 (index = acc+1, 1..=B).
//! - per-position acceptance: draft position i (1-based) was accepted in how many of the
//!   cycles that drafted it (position i is accepted iff acc ≥ i).

use super::driver::GenerateOutput;

/// Accumulates [`GenerateOutput`]s.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct AcceptStats {
    requests: usize,
    tau_sum: f64,
    cycles: usize,
    emitted: usize,
    /// counts[a] = cycles with acc+1 == a.
    histogram: Vec<usize>,
    /// Cycles that drafted / accepted position i+1.
    drafted_at: Vec<usize>,
    accepted_at: Vec<usize>,
    output_tokens: usize,
    prefill_ms: f64,
    decode_ms: f64,
    draft_ms: f64,
    verify_ms: f64,
}

/// What a report prints.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MetricsSummary {
    pub requests: usize,
    pub cycles: usize,
    /// Mean over requests of each request's τ.
    pub tau: f64,
    /// Σ (acc+1) / cycles.
    pub tau_pooled: f64,
    /// histogram[a] = cycles with acc+1 == a (index 0 is always 0).
    pub histogram: Vec<usize>,
    /// Fraction of cycles per acc+1.
    pub histogram_fraction: Vec<f64>,
    /// per_position_acceptance[i] = rate at which draft position i+1 was accepted.
    pub per_position_acceptance: Vec<f64>,
    pub output_tokens: usize,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    pub draft_ms: f64,
    pub verify_ms: f64,
    /// Output tokens per second of decode time (prefill excluded).
    pub decode_tokens_per_s: f64,
}

impl AcceptStats {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, out: &GenerateOutput) {
        self.add_cycles(&out.accept_lengths, &out.draft_lengths);
        self.output_tokens += out.token_ids.len();
        self.prefill_ms += out.prefill_ms;
        self.decode_ms += out.decode_ms;
        self.draft_ms += out.draft_ms;
        self.verify_ms += out.verify_ms;
    }

    /// One request's cycles: acc+1 and the number of drafted tokens of each.
    pub fn add_cycles(&mut self, accept_lengths: &[usize], draft_lengths: &[usize]) {
        if accept_lengths.is_empty() {
            return;
        }
        self.requests += 1;
        self.tau_sum += accept_lengths.iter().sum::<usize>() as f64 / accept_lengths.len() as f64;
        self.cycles += accept_lengths.len();
        for (&a, &k) in accept_lengths.iter().zip(draft_lengths) {
            self.emitted += a;
            if self.histogram.len() <= a {
                self.histogram.resize(a + 1, 0);
            }
            self.histogram[a] += 1;
            if self.drafted_at.len() < k {
                self.drafted_at.resize(k, 0);
                self.accepted_at.resize(k, 0);
            }
            for i in 0..k {
                self.drafted_at[i] += 1;
                if i + 1 < a {
                    self.accepted_at[i] += 1;
                }
            }
        }
    }

    pub fn summary(&self) -> MetricsSummary {
        let div = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        MetricsSummary {
            requests: self.requests,
            cycles: self.cycles,
            tau: div(self.tau_sum, self.requests as f64),
            tau_pooled: div(self.emitted as f64, self.cycles as f64),
            histogram: self.histogram.clone(),
            histogram_fraction: self.histogram.iter().map(|&c| div(c as f64, self.cycles as f64)).collect(),
            per_position_acceptance: self
                .accepted_at
                .iter()
                .zip(&self.drafted_at)
                .map(|(&a, &d)| div(a as f64, d as f64))
                .collect(),
            output_tokens: self.output_tokens,
            prefill_ms: self.prefill_ms,
            decode_ms: self.decode_ms,
            draft_ms: self.draft_ms,
            verify_ms: self.verify_ms,
            decode_tokens_per_s: div(self.output_tokens as f64 * 1e3, self.decode_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tau_is_the_mean_over_requests_and_pooled_tau_the_mean_over_cycles() {
        let mut s = AcceptStats::new();
        // Request 1: acc+1 = 4, 1 (B = 4, 3 drafted each). Request 2: acc+1 = 2.
        s.add_cycles(&[4, 1], &[3, 3]);
        s.add_cycles(&[2], &[3]);
        let m = s.summary();
        assert_eq!(m.requests, 2);
        assert_eq!(m.cycles, 3);
        assert!((m.tau - (2.5 + 2.0) / 2.0).abs() < 1e-12);
        assert!((m.tau_pooled - 7.0 / 3.0).abs() < 1e-12);
        assert_eq!(m.histogram, vec![0, 1, 1, 0, 1]);
        // Position 1 accepted in cycles with acc ≥ 1: the 4 and the 2 → 2/3; position 2: 1/3;
        // position 3: 1/3.
        let want = [2.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0];
        for (got, want) in m.per_position_acceptance.iter().zip(want) {
            assert!((got - want).abs() < 1e-12, "{:?}", m.per_position_acceptance);
        }
    }

    #[test]
    fn positions_that_were_not_drafted_do_not_count_against_acceptance() {
        let mut s = AcceptStats::new();
        // A short draft of 1 token that was accepted, then a 3-token draft fully rejected.
        s.add_cycles(&[2, 1], &[1, 3]);
        let m = s.summary();
        assert_eq!(m.per_position_acceptance, vec![0.5, 0.0, 0.0]);
    }
}
