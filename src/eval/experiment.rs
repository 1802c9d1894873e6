//! The paper's comparison, summarised: τ per arm and benchmark with bootstrap confidence
//! intervals over requests, paired differences between arms on the same requests, the
//! shared-mask accuracy and support size of each arm, and the training curves.

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// One arm of the experiment as configured.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Arm {
    pub name: String,
    /// `dflash` or `domino`.
    pub drafter: String,
    /// An objective in the short form of `--set objective=` (auf, decay, auf+decay, full, dpace).
    pub objective: String,
}

/// τ of one request (a turn) of one arm, as read from requests.jsonl.
#[derive(Debug, Clone, Deserialize)]
pub struct RequestTau {
    pub benchmark: String,
    pub id: String,
    pub turn: usize,
    pub drafter: String,
    pub tau: f64,
    #[serde(default = "yes")]
    pub counted: bool,
}

impl From<&crate::eval::runner::RequestRecord> for RequestTau {
    fn from(r: &crate::eval::runner::RequestRecord) -> Self {
        RequestTau { benchmark: r.benchmark.clone(), id: r.id.clone(), turn: r.turn, drafter: r.drafter.clone(), tau: r.tau, counted: r.counted }
    }
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BenchTau {
    pub tau: f64,
    /// 95% percentile bootstrap interval over requests.
    pub tau_ci: [f64; 2],
    pub requests: usize,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ArmSummary {
    pub drafter: String,
    pub objective: String,
    pub benchmarks: BTreeMap<String, BenchTau>,
    /// Mean of the benchmarks' τ.
    pub average_tau: f64,
    pub average_tau_ci: [f64; 2],
    /// Held-out token accuracy on the shared block mask at the end of training.
    pub acc: f64,
    /// Held-out mean support size per block under the arm's own objective.
    pub support_size: f64,
    /// Held-out in-block accept length.
    pub accept_len: f64,
}

/// Paired bootstrap of avg τ(a) − avg τ(b) over the same requests.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PairedDiff {
    pub a: String,
    pub b: String,
    pub diff: f64,
    pub relative: f64,
    pub ci: [f64; 2],
    /// Benchmarks where a's τ exceeds b's.
    pub benchmarks_won: usize,
    pub benchmarks: usize,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        f64::NAN
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

/// Per arm: benchmark → request key → τ (only requests counted for every run).
type Table = BTreeMap<String, BTreeMap<String, BTreeMap<(String, usize), f64>>>;

pub fn table(records: &[RequestTau]) -> Table {
    let mut t: Table = BTreeMap::new();
    for r in records.iter().filter(|r| r.counted) {
        t.entry(r.drafter.clone()).or_default().entry(r.benchmark.clone()).or_default().insert((r.id.clone(), r.turn), r.tau);
    }
    t
}

/// Bootstrap over requests: resample each benchmark's requests with replacement; the average is
/// the mean over benchmarks of the resampled means. Paired: the same draws for every arm.
pub fn bootstrap(t: &Table, arms: &[String], samples: usize, seed: u64) -> BTreeMap<String, (BTreeMap<String, [f64; 2]>, [f64; 2], Vec<f64>)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let benches: Vec<String> = t.values().flat_map(|b| b.keys().cloned()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    // requests keys per benchmark (shared by all arms)
    let keys: BTreeMap<&String, Vec<(String, usize)>> = benches
        .iter()
        .map(|b| {
            let k: Vec<(String, usize)> = t.values().next().and_then(|m| m.get(b)).map(|m| m.keys().cloned().collect()).unwrap_or_default();
            (b, k)
        })
        .collect();
    let mut per_arm_bench: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    let mut per_arm_avg: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for _ in 0..samples {
        let draws: BTreeMap<&String, Vec<usize>> = keys.iter().map(|(b, k)| (*b, (0..k.len()).map(|_| rng.gen_range(0..k.len().max(1))).collect())).collect();
        for arm in arms {
            let mut bench_means = Vec::new();
            for b in &benches {
                let k = &keys[b];
                let Some(m) = t.get(arm).and_then(|x| x.get(b)) else { continue };
                let vals: Vec<f64> = draws[b].iter().filter_map(|&i| k.get(i).and_then(|key| m.get(key)).copied()).collect();
                let mu = mean(&vals);
                if mu.is_finite() {
                    per_arm_bench.entry((arm.clone(), b.clone())).or_default().push(mu);
                    bench_means.push(mu);
                }
            }
            per_arm_avg.entry(arm.clone()).or_default().push(mean(&bench_means));
        }
    }
    let mut out = BTreeMap::new();
    for arm in arms {
        let mut cis = BTreeMap::new();
        for b in &benches {
            if let Some(v) = per_arm_bench.get_mut(&(arm.clone(), b.clone())) {
                v.sort_by(|a, b| a.total_cmp(b));
                cis.insert(b.clone(), [percentile(v, 0.025), percentile(v, 0.975)]);
            }
        }
        let avg = per_arm_avg.get(arm).cloned().unwrap_or_default();
        let mut sorted = avg.clone();
        sorted.sort_by(|a, b| a.total_cmp(b));
        out.insert(arm.clone(), (cis, [percentile(&sorted, 0.025), percentile(&sorted, 0.975)], avg));
    }
    out
}

/// τ per benchmark (mean over requests) and its average over benchmarks.
pub fn point_estimates(t: &Table, arm: &str) -> (BTreeMap<String, (f64, usize)>, f64) {
    let mut per = BTreeMap::new();
    if let Some(m) = t.get(arm) {
        for (b, reqs) in m {
            let v: Vec<f64> = reqs.values().copied().collect();
            per.insert(b.clone(), (mean(&v), v.len()));
        }
    }
    let avg = mean(&per.values().map(|(t, _)| *t).collect::<Vec<_>>());
    (per, avg)
}

/// A paired comparison of two arms from their bootstrap replicates (same draws).
pub fn paired(t: &Table, boots: &BTreeMap<String, (BTreeMap<String, [f64; 2]>, [f64; 2], Vec<f64>)>, a: &str, b: &str) -> Option<PairedDiff> {
    let (pa, avg_a) = point_estimates(t, a);
    let (pb, avg_b) = point_estimates(t, b);
    let ra = &boots.get(a)?.2;
    let rb = &boots.get(b)?.2;
    let mut d: Vec<f64> = ra.iter().zip(rb).map(|(x, y)| x - y).collect();
    d.sort_by(|x, y| x.total_cmp(y));
    let won = pa.iter().filter(|(k, (ta, _))| pb.get(*k).is_some_and(|(tb, _)| ta > tb)).count();
    Some(PairedDiff {
        a: a.into(),
        b: b.into(),
        diff: avg_a - avg_b,
        relative: (avg_a - avg_b) / avg_b,
        ci: [percentile(&d, 0.025), percentile(&d, 0.975)],
        benchmarks_won: won,
        benchmarks: pa.len(),
    })
}

/// How one of the paper's findings fared in this run.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Held,
    /// Same direction as the paper, but not on every benchmark or not outside the noise.
    Partly,
    NotHeld,
    /// The arms compared made the same predictions on every request (or an arm is missing):
    /// the run cannot tell either way.
    NotTestable,
}

impl Verdict {
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Held => "held",
            Verdict::Partly => "partly held",
            Verdict::NotHeld => "did not hold",
            Verdict::NotTestable => "not testable here",
        }
    }
}

/// One claim of the paper, checked against this run's numbers.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Finding {
    pub claim: String,
    pub verdict: Verdict,
    pub evidence: String,
}

fn identical(d: &PairedDiff) -> bool {
    d.diff == 0.0 && d.ci == [0.0, 0.0]
}

/// Checks the paper's three findings (SPEC §3, the list) on a run's summaries and paired
/// differences: AUF > decay on every benchmark and on average (per backbone); decay reaches the
/// higher shared-mask accuracy yet the lower τ (per backbone); AUF+decay ≈ AUF on DFlash
/// (the 95% interval of the difference holds 0, or the difference is under 1% of τ).
pub fn check_findings(arms: &[(String, ArmSummary)], comparisons: &[PairedDiff]) -> Vec<Finding> {
    let arm = |n: &str| arms.iter().find(|(a, _)| a == n).map(|(_, s)| s);
    let cmp = |a: &str, b: &str| comparisons.iter().find(|c| c.a == a && c.b == b);
    let mut out = Vec::new();
    for (backbone, paper) in [("dflash", "+8.7%"), ("domino", "+4.7%")] {
        let (auf, decay) = (format!("{backbone}-auf"), format!("{backbone}-decay"));
        let claim = format!("AUF > decay on {backbone}, on every benchmark and on average (paper: {paper} relative)");
        out.push(match cmp(&auf, &decay) {
            None => Finding { claim, verdict: Verdict::NotTestable, evidence: format!("arms {auf} / {decay} not in this run") },
            Some(d) if identical(d) => Finding {
                claim,
                verdict: Verdict::NotTestable,
                evidence: "both arms produced the same τ on every request".into(),
            },
            Some(d) => {
                let verdict = if d.diff > 0.0 && d.ci[0] > 0.0 && d.benchmarks_won == d.benchmarks {
                    Verdict::Held
                } else if d.diff > 0.0 {
                    Verdict::Partly
                } else {
                    Verdict::NotHeld
                };
                Finding {
                    claim,
                    verdict,
                    evidence: format!(
                        "Δ avg τ {:+.3} ({:+.1}%), 95% CI [{:+.3}, {:+.3}], higher on {}/{} benchmarks",
                        d.diff,
                        100.0 * d.relative,
                        d.ci[0],
                        d.ci[1],
                        d.benchmarks_won,
                        d.benchmarks
                    ),
                }
            }
        });
        let claim = format!("decay reaches higher shared-mask accuracy yet lower τ than AUF on {backbone}");
        out.push(match (arm(&auf), arm(&decay)) {
            (Some(a), Some(d)) => {
                let higher_acc = d.acc > a.acc;
                let lower_tau = d.average_tau < a.average_tau;
                let verdict = match (higher_acc, lower_tau) {
                    (true, true) => Verdict::Held,
                    _ if d.acc == a.acc && d.average_tau == a.average_tau => Verdict::NotTestable,
                    (true, false) | (false, true) => Verdict::Partly,
                    (false, false) => Verdict::NotHeld,
                };
                Finding {
                    claim,
                    verdict,
                    evidence: format!(
                        "held-out acc decay {:.3} vs auf {:.3}; average τ decay {:.3} vs auf {:.3}",
                        d.acc, a.acc, d.average_tau, a.average_tau
                    ),
                }
            }
            _ => Finding { claim, verdict: Verdict::NotTestable, evidence: format!("arms {auf} / {decay} not in this run") },
        });
    }
    let claim = "AUF+decay ≈ AUF on dflash".to_string();
    out.push(match cmp("dflash-auf+decay", "dflash-auf") {
        None => Finding { claim, verdict: Verdict::NotTestable, evidence: "arms dflash-auf+decay / dflash-auf not in this run".into() },
        Some(d) if identical(d) => Finding { claim, verdict: Verdict::NotTestable, evidence: "both arms produced the same τ on every request".into() },
        Some(d) => Finding {
            claim,
            verdict: if (d.ci[0] <= 0.0 && d.ci[1] >= 0.0) || d.relative.abs() < 0.01 { Verdict::Held } else { Verdict::NotHeld },
            evidence: format!("Δ avg τ {:+.3} ({:+.1}%), 95% CI [{:+.3}, {:+.3}]", d.diff, 100.0 * d.relative, d.ci[0], d.ci[1]),
        },
    });
    out
}

/// One training step of an arm, as plotted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CurvePoint {
    pub step: u64,
    pub loss: f64,
    /// Token accuracy on the shared block mask.
    pub acc: f64,
    /// In-block accept length (1 + leading run of correct positions).
    pub accept_len: f64,
}

/// Training curves, three panels side by side: loss, shared-mask accuracy and in-block accept
/// length per arm, each smoothed by a moving average of `window` steps. The last two side by
/// side show the paper's point: an arm can lead on accuracy and trail on accept length.
pub fn write_training_curves(path: &Path, curves: &[(String, Vec<CurvePoint>)], window: usize) -> Result<(), String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1500, 460)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let panels = root.split_evenly((1, 3));
        let colors = [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44), RGBColor(214, 39, 40), RGBColor(148, 103, 189), RGBColor(140, 86, 75), RGBColor(227, 119, 194), RGBColor(127, 127, 127)];
        let max_step = curves.iter().flat_map(|(_, c)| c.iter().map(|p| p.step)).max().unwrap_or(1) as f64;
        let smooth = |v: &[(u64, f64)]| -> Vec<(f64, f64)> {
            v.iter()
                .enumerate()
                .map(|(i, &(s, _))| {
                    let lo = i.saturating_sub(window.saturating_sub(1));
                    let w = &v[lo..=i];
                    (s as f64, w.iter().map(|p| p.1).sum::<f64>() / w.len() as f64)
                })
                .collect()
        };
        let titles = ["training loss", "shared-mask token accuracy", "in-block accept length"];
        for (pick, (panel, title)) in panels.iter().zip(titles).enumerate() {
            let value = |p: &CurvePoint| match pick {
                0 => p.loss,
                1 => p.acc,
                _ => p.accept_len,
            };
            let series: Vec<(String, Vec<(f64, f64)>)> =
                curves.iter().map(|(n, c)| (n.clone(), smooth(&c.iter().map(|p| (p.step, value(p))).collect::<Vec<_>>()))).collect();
            let ymax = series.iter().flat_map(|(_, s)| s.iter().map(|p| p.1)).fold(0.0f64, f64::max).max(1e-3) * 1.05;
            // Accept length starts at 1 by definition: zoom on what is above it.
            let ymin = if pick == 2 { series.iter().flat_map(|(_, s)| s.iter().map(|p| p.1)).fold(f64::INFINITY, f64::min).min(1.0) } else { 0.0 };
            let title = format!("{title} ({window}-step moving average)");
            let mut chart = ChartBuilder::on(panel)
                .caption(title, ("sans-serif", 16))
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(48)
                .build_cartesian_2d(0.0..max_step, ymin..ymax)
                .map_err(|e| e.to_string())?;
            chart.configure_mesh().x_desc("step").draw().map_err(|e| e.to_string())?;
            for (i, (name, s)) in series.iter().enumerate() {
                let c = colors[i % colors.len()];
                chart
                    .draw_series(LineSeries::new(s.iter().copied(), c.stroke_width(2)))
                    .map_err(|e| e.to_string())?
                    .label(name.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2)));
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .position(if pick == 0 { SeriesLabelPosition::UpperRight } else { SeriesLabelPosition::UpperLeft })
                .draw()
                .map_err(|e| e.to_string())?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    super::report::write_atomic(path, svg.as_bytes()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {

    fn summary(acc: f64, tau: f64) -> ArmSummary {
        ArmSummary {
            drafter: "dflash".into(),
            objective: "x".into(),
            benchmarks: BTreeMap::new(),
            average_tau: tau,
            average_tau_ci: [tau, tau],
            acc,
            support_size: 1.0,
            accept_len: 1.0,
        }
    }

    fn diff(a: &str, b: &str, d: f64, ci: [f64; 2], won: usize) -> PairedDiff {
        PairedDiff { a: a.into(), b: b.into(), diff: d, relative: d / 2.0, ci, benchmarks_won: won, benchmarks: 6 }
    }

    #[test]
    fn findings_are_judged_from_the_paired_differences_and_the_held_out_accuracy() {
        let arms = vec![
            ("dflash-decay".to_string(), summary(0.30, 2.0)),
            ("dflash-auf".to_string(), summary(0.25, 2.2)),
            ("domino-decay".to_string(), summary(0.20, 2.0)),
            ("domino-auf".to_string(), summary(0.25, 1.9)),
        ];
        let cmps = vec![
            diff("dflash-auf", "dflash-decay", 0.2, [0.1, 0.3], 6),
            diff("domino-auf", "domino-decay", 0.05, [-0.01, 0.1], 4),
            diff("dflash-auf+decay", "dflash-auf", 0.0, [0.0, 0.0], 0),
        ];
        let f = check_findings(&arms, &cmps);
        let verdicts: Vec<Verdict> = f.iter().map(|x| x.verdict).collect();
        assert_eq!(
            verdicts,
            vec![Verdict::Held, Verdict::Held, Verdict::Partly, Verdict::NotHeld, Verdict::NotTestable],
            "{f:#?}"
        );
        assert!(f[0].evidence.contains("6/6"), "{}", f[0].evidence);
        let negative = vec![diff("dflash-auf", "dflash-decay", -0.1, [-0.2, -0.05], 0)];
        assert_eq!(check_findings(&arms, &negative)[0].verdict, Verdict::NotHeld);
    }
    use super::*;

    fn rec(arm: &str, b: &str, id: usize, tau: f64) -> RequestTau {
        RequestTau { benchmark: b.into(), id: id.to_string(), turn: 1, drafter: arm.into(), tau, counted: true }
    }

    #[test]
    fn bootstrap_interval_contains_the_point_estimate_and_shrinks_with_identical_requests() {
        let mut recs = Vec::new();
        for i in 0..30 {
            recs.push(rec("a", "x", i, 2.0 + (i % 5) as f64 * 0.1));
            recs.push(rec("b", "x", i, 2.0));
        }
        let t = table(&recs);
        let arms = vec!["a".to_string(), "b".to_string()];
        let boots = bootstrap(&t, &arms, 500, 0);
        let (_, avg_a) = point_estimates(&t, "a");
        let ci = boots["a"].1;
        assert!(ci[0] <= avg_a && avg_a <= ci[1], "{ci:?} vs {avg_a}");
        let ci_b = boots["b"].1;
        assert!((ci_b[0] - 2.0).abs() < 1e-12 && (ci_b[1] - 2.0).abs() < 1e-12);
        let d = paired(&t, &boots, "a", "b").unwrap();
        assert!(d.diff > 0.0 && d.ci[0] > 0.0, "{d:?}");
        assert_eq!(d.benchmarks_won, 1);
    }
}
