//! Choosing the verified block size B from measurement (issue 12).
//!
//! A cycle with block B costs `verify(B) + draft(B) + rest(B)` (rest: the verdict and the
//! commits) and commits on average
//! `E(B) = 1 + Σ_{k=1}^{B-1} Π_{i≤k} α_i` tokens, where α_i is the rate at which draft position i
//! is accepted given that positions before it were. B is the value in 2..=max_b that maximises
//! `E(B) / (verify(B) + draft(B) + rest(B))`: [`choose_block_size`], a pure function of the
//! measured verify curve, the time of the rest of a cycle and the acceptance rates.
//!
//! The verify curve is timed on the target at start-up ([`measure_verify_curve`]: rounds of
//! forwards of m = 1..max_b tokens after a short context, reduced to a curve that load drift
//! cannot bend downwards, [`curve_from_runs`]), the draft time as the median propose of a short
//! generation ([`measure_draft_ms`]) at the smallest and the largest block, linear in between
//! ([`draft_curve`]: a draft's rows, and so its projections and head, scale with B), and the rest
//! of a cycle as the median whole cycle of that generation less its draft and verify forward
//! (the smaller of the two blocks' estimates, charged at every B). Acceptance comes from the drafter's held-out training metrics when
//! its run folder has them ([`held_out_acceptance`]: the per-position accuracies, used as the
//! conditional rates, which they bound from below, so the choice errs towards small blocks), else
//! [`DEFAULT_ACCEPTANCE`] at every position.

use std::path::Path;
use std::time::Instant;

use super::driver::{generate, GenerateConfig};
use super::proposer::Proposer;
use super::SpecError;
use crate::model::{Logits, Target};

/// Acceptance rate assumed at every draft position when the drafter brings no measurement: a
/// drafter of unknown quality, for which B stays small unless verifying is nearly free.
pub const DEFAULT_ACCEPTANCE: f64 = 0.5;

/// Context length at which the curve is timed (short: the start-up cost stays small).
const CURVE_CONTEXT: usize = 32;

/// The confidence thresholds (`--draft-p-min`) at which a drafter's held-out evaluation measures
/// its drafts cut short ([`cut_stats`]), and among which the block-size choice picks.
pub const P_MIN_GRID: [f32; 8] = [0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5];

/// Drafts for blocks of `block_size` cut before their first position whose confidence (the
/// drafter's probability of its greedy draft) is below `p_min`, over held-out anchors: what a
/// cycle commits and how many rows it verifies.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CutStat {
    pub block_size: usize,
    pub p_min: f32,
    /// Mean tokens a cycle commits (accepted drafts + 1).
    pub tokens: f64,
    /// rows[m - 1]: the share of cycles that verify m rows (m = 1..=block_size; 1: no draft).
    pub rows: Vec<f64>,
}

/// [`CutStat`]s for every block size 2..=max_b and threshold of [`P_MIN_GRID`], from each
/// anchor's (confidence, the draft was the target's token) at draft positions 1, 2, ... (an
/// anchor may have fewer positions, near a sequence's end). Empty when there are no anchors.
pub fn cut_stats(anchors: &[Vec<(f32, bool)>], max_b: usize) -> Vec<CutStat> {
    if anchors.is_empty() {
        return Vec::new();
    }
    let n = anchors.len() as f64;
    let mut out = Vec::new();
    for b in 2..=max_b {
        for &p_min in &P_MIN_GRID {
            let (mut tokens, mut rows) = (0usize, vec![0usize; b]);
            for a in anchors {
                let kept = a.iter().take(b - 1).take_while(|x| x.0 >= p_min).count();
                tokens += 1 + a[..kept].iter().take_while(|x| x.1).count();
                rows[kept] += 1;
            }
            out.push(CutStat { block_size: b, p_min, tokens: tokens as f64 / n, rows: rows.iter().map(|&r| r as f64 / n).collect() });
        }
    }
    out
}

/// The (B, p_min) of `cuts` maximising measured tokens a cycle ÷ (the cycle's mean verify time +
/// `draft_ms[B - 1]`, what a cycle at B costs beside its verify forward: the draft and the rest),
/// B ≤ max_b, p_min = `fixed_p` when given; ties go to the smaller B, then the
/// lower threshold. Returns (B, p_min, tokens a cycle, modelled tokens/s); None when no cut
/// qualifies.
pub fn choose_block_and_cut(verify_ms: &[f64], draft_ms: &[f64], cuts: &[CutStat], max_b: usize, fixed_p: Option<f32>) -> Option<(usize, f32, f64, f64)> {
    let mut best: Option<(usize, f32, f64, f64)> = None;
    for c in cuts {
        let b = c.block_size;
        if b < 2 || b > max_b || b > verify_ms.len() || b > draft_ms.len() || c.rows.len() != b || fixed_p.is_some_and(|p| p != c.p_min) {
            continue;
        }
        let verify: f64 = c.rows.iter().enumerate().map(|(m, share)| share * verify_ms[m]).sum();
        let rate = c.tokens / (verify + draft_ms[b - 1]) * 1e3;
        if rate.is_finite() && best.is_none_or(|x| rate > x.3 * (1.0 + 1e-9)) {
            best = Some((b, c.p_min, c.tokens, rate));
        }
    }
    best
}

/// The chosen block size and the numbers it was chosen from.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BlockChoice {
    pub block_size: usize,
    /// Expected committed tokens per cycle at the chosen B.
    pub expected_tokens: f64,
    /// Modelled tokens per second at the chosen B.
    pub expected_tokens_per_s: f64,
    /// Modelled tokens per second of plain decoding (1 / verify(1)).
    pub ar_tokens_per_s: f64,
    /// verify_ms[m-1]: one target forward of m tokens.
    pub verify_ms: Vec<f64>,
    /// One `propose` of the drafter at the chosen B.
    pub draft_ms: f64,
    /// draft_ms_by_block[b-1]: one `propose` at block b (b ≥ 2; measured at 2 and max_b).
    pub draft_ms_by_block: Vec<f64>,
    /// The rest of a cycle, neither verify forward nor draft: the verdict and the commits
    /// ([`DraftTiming::rest_ms`], the smaller of its estimates at the smallest and the largest
    /// block), charged to every cycle in the choice.
    pub rest_ms: f64,
    /// α_i for draft positions 1..max_b-1.
    pub acceptance: Vec<f64>,
    /// Where `acceptance` came from.
    pub acceptance_source: String,
    /// Start-up time spent measuring (curve and drafts).
    pub calibration_ms: f64,
    /// Drafts are cut before their first position below this confidence (0: never), chosen
    /// with B from the drafter's held-out cut statistics when it has them.
    pub p_min: f32,
}

impl BlockChoice {
    /// Whether the model expects even the best B to decode slower than plain decoding: the
    /// drafter's acceptance does not pay for a verify and a draft on this machine.
    pub fn slower_than_plain(&self) -> bool {
        self.expected_tokens_per_s < self.ar_tokens_per_s
    }

    /// One line for a report: "B = 4 of 8 (model: 1.9 tokens/cycle, 61 tok/s vs AR 70; acceptance from …)",
    /// and a warning when [`BlockChoice::slower_than_plain`].
    pub fn summary(&self, max_b: usize) -> String {
        let warning = if self.slower_than_plain() {
            "; at no B does the model expect this drafter to beat plain decoding here: it needs a higher acceptance (train it longer or on more data), or decode without it"
        } else {
            ""
        };
        let cut = if self.p_min > 0.0 { format!(", drafts cut below p = {}", self.p_min) } else { String::new() };
        format!(
            "B = {}{cut} of {} chosen from measurement (model: {:.2} tokens/cycle, {:.0} tok/s vs AR {:.0}; verify(1..{}) {} ms, draft {:.1} ms, verdict and commits {:.1} ms, measured in {:.0} ms; acceptance {}{warning})",
            self.block_size,
            max_b,
            self.expected_tokens,
            self.expected_tokens_per_s,
            self.ar_tokens_per_s,
            self.verify_ms.len(),
            self.verify_ms.iter().map(|v| format!("{v:.1}")).collect::<Vec<_>>().join("/"),
            self.draft_ms,
            self.rest_ms,
            self.calibration_ms,
            self.acceptance_source
        )
    }
}

/// E(B) = 1 + Σ_{k=1}^{B-1} Π_{i≤k} α_i; positions past `accept`'s end use its last value (or
/// [`DEFAULT_ACCEPTANCE`] if it is empty). Rates are clamped to [0, 1].
pub fn expected_tokens(accept: &[f64], b: usize) -> f64 {
    let rate = |i: usize| accept.get(i).or(accept.last()).copied().unwrap_or(DEFAULT_ACCEPTANCE).clamp(0.0, 1.0);
    let (mut total, mut survive) = (1.0, 1.0);
    for k in 0..b.saturating_sub(1) {
        survive *= rate(k);
        total += survive;
    }
    total
}

/// draft(b) for b = 1..=max_b from the times measured at b = 2 and b = max_b, linear in between
/// (entry 0, b = 1, repeats b = 2's: a block of one drafts nothing and is never chosen).
pub fn draft_curve(at_two: f64, at_max: f64, max_b: usize) -> Vec<f64> {
    (1..=max_b.max(2))
        .map(|b| if max_b <= 2 || b <= 2 { at_two } else { at_two + (at_max - at_two) * (b - 2) as f64 / (max_b - 2) as f64 })
        .collect()
}

/// The B in 2..=max_b (max_b ≤ verify_ms.len(), draft_ms.len()) maximising E(B) / (verify(B) +
/// draft(B)), draft(B) being what a cycle costs beside its verify forward; ties go to the smaller B. Returns (B, E(B), modelled tokens/s).
pub fn choose_block_size(verify_ms: &[f64], draft_ms: &[f64], accept: &[f64], max_b: usize) -> Result<(usize, f64, f64), SpecError> {
    let bad = |what: String| SpecError::InvalidConfig { what };
    if max_b < 2 {
        return Err(bad(format!("the drafter's block size {max_b} leaves nothing to choose (B ≥ 2)")));
    }
    if verify_ms.len() < max_b || draft_ms.len() < max_b {
        return Err(bad(format!("the verify curve has {} points and the draft curve {}, B goes to {max_b}", verify_ms.len(), draft_ms.len())));
    }
    if verify_ms.iter().chain(draft_ms).any(|v| !(v.is_finite() && *v >= 0.0)) || verify_ms.iter().any(|v| *v <= 0.0) {
        return Err(bad(format!("verify times {verify_ms:?} ms and draft times {draft_ms:?} ms must be finite and positive")));
    }
    let mut best = (2, 0.0, f64::NEG_INFINITY);
    for b in 2..=max_b {
        let e = expected_tokens(accept, b);
        let rate = e / (verify_ms[b - 1] + draft_ms[b - 1]) * 1e3;
        if rate > best.2 * (1.0 + 1e-9) {
            best = (b, e, rate);
        }
    }
    Ok(best)
}

/// Repetitions of the verify curve at start-up ([`measure_verify_curve`]).
pub const CURVE_REPS: usize = 9;

/// Proposes timed by [`measure_draft_ms`] (after the first, which takes in the prompt).
const DRAFT_SAMPLES: usize = 16;

/// verify_ms[m-1] for m = 1..=max_b: one forward of m tokens (with `taps`, all logits) after a
/// context of [`CURVE_CONTEXT`] tokens, `reps` rounds of every size ([`measure_verify_runs`]),
/// reduced by [`curve_from_runs`].
pub fn measure_verify_curve(target: &Target, max_b: usize, taps: &[usize], reps: usize) -> Result<Vec<f64>, SpecError> {
    Ok(curve_from_runs(&measure_verify_runs(target, max_b, taps, reps)?))
}

/// runs[m-1][r]: the time in ms of an m-token forward in round r; each round times m = 1..=max_b
/// once, back to back.
pub fn measure_verify_runs(target: &Target, max_b: usize, taps: &[usize], reps: usize) -> Result<Vec<Vec<f64>>, SpecError> {
    let vocab = target.config().vocab_size as u32;
    let ids: Vec<u32> = (0..CURVE_CONTEXT + max_b).map(|i| (i as u32 * 7919 + 13) % vocab).collect();
    let mut cache = target.new_cache();
    target.forward(&ids[..CURVE_CONTEXT], &mut cache, &[], Logits::None)?;
    let mut runs = vec![Vec::with_capacity(reps.max(1)); max_b];
    for _ in 0..reps.max(1) {
        for m in 1..=max_b {
            let t0 = Instant::now();
            target.forward(&ids[CURVE_CONTEXT..CURVE_CONTEXT + m], &mut cache, taps, Logits::All)?;
            runs[m - 1].push(t0.elapsed().as_secs_f64() * 1e3);
            cache.truncate(CURVE_CONTEXT);
        }
    }
    Ok(runs)
}

/// The verify curve from `runs[m-1][r]`, the time of an m-token forward in round r (each round
/// times every size once, back to back). On a shared machine the load drifts between rounds,
/// and a curve of per-size medians can come out with a longer forward cheaper than a shorter
/// one (a fresh clone's quickstart measured 5.1 / 5.2 / 6.1 / 5.4 ms for m = 1..4, and so ran
/// B = 4 at 0.87× of plain decoding). So:
/// - each size is taken relative to the single-token forward of its own round (the load of a
///   round hits both alike), the median of those ratios over the rounds, times the median
///   single-token time;
/// - the result is made non-decreasing in m ([`non_decreasing_fit`]): a forward of m + 1 tokens
///   does all the work of one of m.
pub fn curve_from_runs(runs: &[Vec<f64>]) -> Vec<f64> {
    use crate::util::measure::median;
    let Some(single) = runs.first() else { return Vec::new() };
    let base = median(&mut single.clone());
    let curve: Vec<f64> = runs
        .iter()
        .enumerate()
        .map(|(m, times)| match m {
            0 => base,
            _ => base * median(&mut times.iter().zip(single).filter(|(_, one)| **one > 0.0).map(|(t, one)| t / one).collect::<Vec<_>>()),
        })
        .collect();
    non_decreasing_fit(&curve)
}

/// The least-squares non-decreasing fit of `v` (pool adjacent violators): runs that go down are
/// replaced by their mean.
pub fn non_decreasing_fit(v: &[f64]) -> Vec<f64> {
    // blocks of (mean, count)
    let mut blocks: Vec<(f64, usize)> = Vec::with_capacity(v.len());
    for &x in v {
        blocks.push((x, 1));
        while blocks.len() > 1 && blocks[blocks.len() - 2].0 > blocks[blocks.len() - 1].0 {
            let (b, nb) = blocks.pop().unwrap();
            let (a, na) = blocks.pop().unwrap();
            blocks.push(((a * na as f64 + b * nb as f64) / (na + nb) as f64, na + nb));
        }
    }
    blocks.into_iter().flat_map(|(mean, n)| std::iter::repeat_n(mean, n)).collect()
}

/// Notes when each `propose` it forwards starts and how long it takes.
struct TimedProposer<'a> {
    inner: &'a mut dyn Proposer,
    starts: Vec<Instant>,
    times_ms: Vec<f64>,
}

impl Proposer for TimedProposer<'_> {
    fn block_size(&self) -> usize {
        self.inner.block_size()
    }
    fn target_layer_ids(&self) -> &[usize] {
        self.inner.target_layer_ids()
    }
    fn begin(&mut self, target: &Target, prompt_ids: &[u32], features: Option<&candle_core::Tensor>) -> Result<(), SpecError> {
        self.inner.begin(target, prompt_ids, features)
    }
    fn propose(&mut self, target: &Target, last_token: u32, start: usize) -> Result<super::proposer::Draft, SpecError> {
        let t0 = Instant::now();
        self.starts.push(t0);
        let draft = self.inner.propose(target, last_token, start);
        self.times_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        draft
    }
    fn commit(&mut self, tokens: &[u32], features: Option<&candle_core::Tensor>, start: usize) -> Result<(), SpecError> {
        self.inner.commit(tokens, features, start)
    }
}

/// What [`measure_draft_ms`] timed: medians over the cycles of a short generation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DraftTiming {
    /// One `propose`.
    pub draft_ms: f64,
    /// One whole cycle, from a `propose` to the next: the draft, the verify forward of the full
    /// block (the generation's drafts are never cut), the verdict, the commits.
    pub cycle_ms: f64,
}

impl DraftTiming {
    /// The part of a cycle that is neither the verify forward nor the draft (the verdict, the
    /// target's and the drafter's commits), given the verify forward's time `verify_ms` of the
    /// block: never below zero (the two medians come from different rounds, and noise can put
    /// the difference there).
    pub fn rest_ms(&self, verify_ms: f64) -> f64 {
        (self.cycle_ms - self.draft_ms - verify_ms).max(0.0)
    }
}

/// Times the proposes and cycles of a short greedy generation, the first propose (which takes
/// in the prompt's context) left out: at least [`DRAFT_SAMPLES`] cycles unless the drafter's
/// drafts are accepted so often that the tokens run out first. Medians, not means: one propose
/// that the machine's load stretches does not move them.
pub fn measure_draft_ms(target: &Target, proposer: &mut dyn Proposer) -> Result<DraftTiming, SpecError> {
    let vocab = target.config().vocab_size as u32;
    let prompt: Vec<u32> = (0..CURVE_CONTEXT).map(|i| (i as u32 * 7919 + 13) % vocab).collect();
    // DRAFT_SAMPLES + 2 tokens: that many cycles when nothing is accepted (this prompt is noise,
    // so drafts mostly fail), at least two whatever the acceptance.
    let cfg = GenerateConfig { eos_token_ids: Vec::new(), ..GenerateConfig::greedy(target, (DRAFT_SAMPLES + 2).max(proposer.block_size() + 1)) };
    let mut timed = TimedProposer { inner: proposer, starts: Vec::new(), times_ms: Vec::new() };
    generate(target, Some(&mut timed), &prompt, &cfg)?;
    use crate::util::measure::median;
    let skip = usize::from(timed.times_ms.len() > 1);
    let draft_ms = if timed.times_ms.is_empty() { 0.0 } else { median(&mut timed.times_ms[skip..]) };
    let mut cycles: Vec<f64> = timed.starts.windows(2).skip(skip).map(|w| (w[1] - w[0]).as_secs_f64() * 1e3).collect();
    let cycle_ms = if cycles.is_empty() { draft_ms } else { median(&mut cycles) };
    Ok(DraftTiming { draft_ms, cycle_ms })
}

/// The cut statistics ([`CutStat`]) of the last held-out evaluation in the drafter's training log
/// that has them (`"eval": {"cuts": [...]}` in `metrics.jsonl` of `dir` or its parent; drafters
/// trained before the log had them have none).
pub fn held_out_cuts(dir: &Path) -> Option<Vec<CutStat>> {
    for file in [dir.join("metrics.jsonl"), dir.parent()?.join("metrics.jsonl")] {
        let Ok(text) = std::fs::read_to_string(&file) else { continue };
        let last = text.lines().rev().find_map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            let cuts: Vec<CutStat> = serde_json::from_value(v.get("eval")?.get("cuts")?.clone()).ok()?;
            (!cuts.is_empty()).then_some(cuts)
        });
        if last.is_some() {
            return last;
        }
    }
    None
}

/// The per-position accuracies of the last held-out evaluation in the drafter's training log
/// (`metrics.jsonl` in `dir` or its parent, lines with `"eval": {"acc_per_position": [...]}`).
pub fn held_out_acceptance(dir: &Path) -> Option<(Vec<f64>, String)> {
    for file in [dir.join("metrics.jsonl"), dir.parent()?.join("metrics.jsonl")] {
        let Ok(text) = std::fs::read_to_string(&file) else { continue };
        let last = text.lines().rev().find_map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            let acc = v.get("eval")?.get("acc_per_position")?.as_array()?;
            let acc: Vec<f64> = acc.iter().map(|x| x.as_f64()).collect::<Option<_>>()?;
            (!acc.is_empty()).then_some(acc)
        });
        if let Some(acc) = last {
            return Some((acc, format!("from the held-out metrics of {}", file.display())));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_tokens_follows_the_survival_product() {
        assert_eq!(expected_tokens(&[1.0, 1.0, 1.0], 4), 4.0);
        assert_eq!(expected_tokens(&[0.0, 1.0], 8), 1.0);
        assert!((expected_tokens(&[0.5, 0.5], 3) - 1.75).abs() < 1e-12);
        // Past the end the last rate repeats; an empty vector means the default.
        assert!((expected_tokens(&[0.5], 4) - 1.875).abs() < 1e-12);
        assert!((expected_tokens(&[], 3) - (1.0 + DEFAULT_ACCEPTANCE + DEFAULT_ACCEPTANCE * DEFAULT_ACCEPTANCE)).abs() < 1e-12);
        assert_eq!(expected_tokens(&[0.9], 1), 1.0);
    }

    #[test]
    fn a_flat_verify_curve_and_a_good_drafter_take_the_whole_block() {
        let curve = [10.0; 8];
        let (b, e, _) = choose_block_size(&curve, &[1.0; 8], &[0.9; 7], 8).unwrap();
        assert_eq!(b, 8);
        assert!((e - expected_tokens(&[0.9; 7], 8)).abs() < 1e-12);
    }

    #[test]
    fn a_steep_curve_or_a_weak_drafter_keeps_the_block_small() {
        // verify(m) = 10 + 5m ms: each extra position costs half a decode step.
        let curve: Vec<f64> = (1..=8).map(|m| 10.0 + 5.0 * m as f64).collect();
        let (weak, _, _) = choose_block_size(&curve, &[2.0; 8], &[0.3, 0.1, 0.05], 8).unwrap();
        assert_eq!(weak, 2);
        let (strong, _, _) = choose_block_size(&curve, &[2.0; 8], &[0.95; 7], 8).unwrap();
        assert!(strong > weak, "a better drafter must not get a smaller block ({strong})");
        // Brute force over B agrees with the choice.
        for accept in [vec![0.3, 0.1, 0.05], vec![0.95; 7], vec![0.7, 0.6, 0.5, 0.4]] {
            let (b, _, rate) = choose_block_size(&curve, &[2.0; 8], &accept, 8).unwrap();
            for other in 2..=8 {
                let r = expected_tokens(&accept, other) / (curve[other - 1] + 2.0) * 1e3;
                assert!(r <= rate + 1e-9, "B = {other} ({r}) beats the chosen {b} ({rate})");
            }
        }
    }

    #[test]
    fn a_draft_that_costs_less_at_small_blocks_tips_the_choice_smaller() {
        let curve: Vec<f64> = (1..=8).map(|m| 7.0 + 0.3 * m as f64).collect();
        assert_eq!(draft_curve(1.0, 4.0, 8), vec![1.0, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]);
        assert_eq!(draft_curve(1.0, 4.0, 2), vec![1.0, 1.0]);
        let accept = [0.45, 0.25, 0.2];
        // charged the B = 8 draft at every B, B = 3 looks best; at its own cost, B = 2 is
        let (flat, _, _) = choose_block_size(&curve, &[4.0; 8], &accept, 8).unwrap();
        let (graded, _, _) = choose_block_size(&curve, &draft_curve(1.0, 4.0, 8), &accept, 8).unwrap();
        assert_eq!((flat, graded), (3, 2));
        assert!(choose_block_size(&curve, &[1.0; 4], &accept, 8).is_err(), "a draft curve shorter than the block range");
    }

    #[test]
    fn the_summary_warns_when_no_block_beats_plain_decoding() {
        let choice = |expected: f64| BlockChoice {
            block_size: 2,
            expected_tokens: 1.2,
            expected_tokens_per_s: expected,
            ar_tokens_per_s: 130.0,
            verify_ms: vec![7.7, 8.4],
            draft_ms: 0.9,
            draft_ms_by_block: vec![0.9, 0.9],
            rest_ms: 0.1,
            acceptance: vec![0.2],
            acceptance_source: "assumed".into(),
            calibration_ms: 500.0,
            p_min: 0.0,
        };
        assert!(choice(120.0).slower_than_plain());
        assert!(choice(120.0).summary(8).contains("beat plain decoding"));
        assert!(!choice(140.0).slower_than_plain());
        assert!(!choice(140.0).summary(8).contains("beat plain decoding"));
    }

    #[test]
    fn the_choice_never_exceeds_the_drafters_block_and_bad_input_is_an_error() {
        let curve = [5.0; 16];
        let (b, _, _) = choose_block_size(&curve, &[0.0; 16], &[1.0; 15], 6).unwrap();
        assert_eq!(b, 6);
        assert!(choose_block_size(&curve, &[0.0; 16], &[1.0], 1).is_err());
        assert!(choose_block_size(&curve[..3], &[0.0; 16], &[1.0], 4).is_err());
        assert!(choose_block_size(&[5.0, f64::NAN], &[0.0; 2], &[1.0], 2).is_err());
        assert!(choose_block_size(&[5.0, 0.0], &[0.0; 2], &[1.0], 2).is_err());
    }

    #[test]
    fn the_non_decreasing_fit_pools_the_runs_that_go_down() {
        assert_eq!(non_decreasing_fit(&[1.0, 2.0, 3.0]), vec![1.0, 2.0, 3.0]);
        // the quickstart's curve: 6.1 then 5.4 pool to their mean
        let fit = non_decreasing_fit(&[5.1, 5.2, 6.1, 5.4]);
        assert_eq!(fit[..2], [5.1, 5.2]);
        assert!((fit[2] - 5.75).abs() < 1e-12 && fit[3] == fit[2]);
        // a violation that reaches back pools further: 3, 1, 1 -> 5/3 each, after 0
        let fit = non_decreasing_fit(&[0.0, 3.0, 1.0, 1.0]);
        assert!(fit[0] == 0.0 && fit[1..].iter().all(|x| (x - 5.0 / 3.0).abs() < 1e-12), "{fit:?}");
        assert!(non_decreasing_fit(&[]).is_empty());
    }

    #[test]
    fn the_curve_follows_each_rounds_single_token_forward_and_never_falls() {
        // rounds on a machine whose load doubles every time in round 2: the ratios stay
        let runs = vec![vec![5.0, 10.0, 5.0], vec![5.5, 11.0, 5.5], vec![7.0, 14.0, 7.0]];
        let curve = curve_from_runs(&runs);
        assert_eq!(curve.len(), 3);
        assert!((curve[0] - 5.0).abs() < 1e-12);
        assert!((curve[1] - 5.5).abs() < 1e-12 && (curve[2] - 7.0).abs() < 1e-12, "{curve:?}");
        // per-size medians would put m = 4 below m = 3 here (runs[m - 1] over three rounds)
        let runs = vec![vec![5.0, 6.0, 5.1], vec![5.25, 6.2, 5.3], vec![5.6, 7.3, 6.8], vec![6.0, 5.9, 6.1]];
        let per_size: Vec<f64> = runs.iter().map(|r| { let mut v = r.clone(); v.sort_by(f64::total_cmp); v[1] }).collect();
        assert!(per_size[3] < per_size[2], "the example must show the fault: {per_size:?}");
        let curve = curve_from_runs(&runs);
        assert!(curve.windows(2).all(|w| w[0] <= w[1]), "{curve:?}");
        assert!(curve[3] > curve[0] * 1.05, "m = 4 costs more than m = 1 in every round: {curve:?}");
        assert!(curve_from_runs(&[]).is_empty());
    }

    #[test]
    fn cut_stats_count_the_kept_drafts_and_the_accepted_prefix() {
        // three anchors: sure and right twice; unsure and wrong; sure, right, then unsure
        let anchors = vec![vec![(0.9, true), (0.8, true), (0.7, false)], vec![(0.1, false), (0.9, true), (0.9, true)], vec![(0.6, true), (0.2, false)]];
        let cuts = cut_stats(&anchors, 4);
        assert_eq!(cuts.len(), 3 * P_MIN_GRID.len());
        let at = |b: usize, p: f32| cuts.iter().find(|c| c.block_size == b && c.p_min == p).unwrap().clone();
        // no threshold at B = 4: rows 4, 4, 3; tokens 1 + 2, 1 + 0, 1 + 1
        let c = at(4, 0.0);
        assert!((c.tokens - 6.0 / 3.0).abs() < 1e-12);
        assert_eq!(c.rows, vec![0.0, 0.0, 1.0 / 3.0, 2.0 / 3.0]);
        // p_min 0.3: anchor 2 drafts nothing, anchor 3 keeps one: rows 4, 1, 2; tokens the same
        let c = at(4, 0.3);
        assert!((c.tokens - 6.0 / 3.0).abs() < 1e-12);
        assert_eq!(c.rows, vec![1.0 / 3.0, 1.0 / 3.0, 0.0, 1.0 / 3.0]);
        // B = 2: one draft at most
        let c = at(2, 0.0);
        assert!((c.tokens - 5.0 / 3.0).abs() < 1e-12);
        assert_eq!(c.rows, vec![0.0, 1.0]);
        assert!(cut_stats(&[], 4).is_empty());
    }

    #[test]
    fn the_cut_choice_weighs_measured_tokens_against_the_rows_verified() {
        // verify(m) = 10 + 2m ms, draft 1 ms: a row costs a fifth of a decode step.
        let curve: Vec<f64> = (1..=4).map(|m| 10.0 + 2.0 * m as f64).collect();
        let draft = [1.0; 4];
        // a drafter that is right when sure and wrong when not: cutting the unsure drafts pays
        let sure_right: Vec<Vec<(f32, bool)>> = (0..100).map(|i| if i % 2 == 0 { vec![(0.9, true), (0.9, true), (0.1, false)] } else { vec![(0.1, false), (0.1, false), (0.1, false)] }).collect();
        let cuts = cut_stats(&sure_right, 4);
        let (b, p, tokens, rate) = choose_block_and_cut(&curve, &draft, &cuts, 4, None).unwrap();
        assert_eq!(b, 3, "the third draft is never right");
        assert!(p > 0.0 && p <= 0.5, "the unsure drafts are cut: p = {p}");
        assert!((tokens - 2.0).abs() < 1e-12);
        // brute force over every (B, p) agrees
        for c in &cuts {
            let v: f64 = c.rows.iter().enumerate().map(|(m, s)| s * curve[m]).sum();
            assert!(c.tokens / (v + draft[c.block_size - 1]) * 1e3 <= rate + 1e-9);
        }
        // a fixed threshold is kept; a block above max_b is never chosen
        let (_, p0, _, _) = choose_block_and_cut(&curve, &draft, &cuts, 4, Some(0.0)).unwrap();
        assert_eq!(p0, 0.0);
        let (b2, _, _, _) = choose_block_and_cut(&curve, &draft, &cuts, 2, None).unwrap();
        assert_eq!(b2, 2);
        assert!(choose_block_and_cut(&curve, &draft, &cuts, 4, Some(0.33)).is_none(), "a threshold off the grid has no measurement");
    }

    #[test]
    fn held_out_cuts_read_the_last_eval_line_that_has_them() {
        let dir = tempfile::tempdir().unwrap();
        let final_dir = dir.path().join("final");
        std::fs::create_dir_all(&final_dir).unwrap();
        assert!(held_out_cuts(&final_dir).is_none());
        let cut = |t: f64| format!("{{\"block_size\":2,\"p_min\":0.0,\"tokens\":{t},\"rows\":[0.0,1.0]}}");
        let log = format!("{{\"eval\":{{\"cuts\":[{}]}}}}\n{{\"eval\":{{\"cuts\":[{}]}}}}\n{{\"eval\":{{\"acc_per_position\":[0.4]}}}}\n", cut(1.2), cut(1.3));
        std::fs::write(dir.path().join("metrics.jsonl"), log).unwrap();
        let cuts = held_out_cuts(&final_dir).unwrap();
        assert_eq!(cuts.len(), 1);
        assert_eq!(cuts[0].tokens, 1.3);
    }

    #[test]
    fn held_out_acceptance_reads_the_last_eval_line_of_the_run_log() {
        let dir = tempfile::tempdir().unwrap();
        let final_dir = dir.path().join("final");
        std::fs::create_dir_all(&final_dir).unwrap();
        assert!(held_out_acceptance(&final_dir).is_none());
        let log = "{\"step\":1,\"eval\":{\"acc_per_position\":[0.1,0.2]}}\n{\"step\":2,\"eval\":{\"acc_per_position\":[0.4,0.3]}}\n{\"step\":3,\"loss\":1.0}\n";
        std::fs::write(dir.path().join("metrics.jsonl"), log).unwrap();
        let (acc, source) = held_out_acceptance(&final_dir).unwrap();
        assert_eq!(acc, vec![0.4, 0.3]);
        assert!(source.contains("metrics.jsonl"), "{source}");
    }
}
