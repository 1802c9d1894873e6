//! The paper's comparison, summarised: τ per arm and benchmark with bootstrap confidence
//! intervals over requests, paired differences between arms on the same requests, the
//! shared-mask accuracy and support size of each arm, and the training curves.

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::experiment::PaperConfig;
use super::stages::StageError;
use crate::train::trainer::StepMetrics;

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

/// Checks the paper's three findings (DESIGN §3, the list) on a run's summaries and paired
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
    crate::util::fs::write_atomic(path, svg.as_bytes()).map_err(|e| e.to_string())
}


/// What the experiment's summary is made from.
#[derive(Clone, Copy)]
pub struct Summary<'a> {
    pub cfg: &'a PaperConfig,
    pub config_path: &'a Path,
    pub config_json: &'a serde_json::Value,
    /// The working folder (arms/NAME/metrics.jsonl).
    pub out: &'a Path,
    pub eval_dir: &'a Path,
    pub docs: &'a Path,
    pub command: &'a str,
}

impl Summary<'_> {
    /// Reads the arms' metrics and the evaluation's records, writes results.json, the plots and
    /// results.md into `docs`, and returns results.md.
    pub fn write(&self) -> Result<String, StageError> {
    let Summary { cfg, config_path, config_json, out, eval_dir, docs, command } = *self;
    let io = |path: &Path| { let path = path.to_path_buf(); move |source| StageError::Io { path, source } };
    let invalid = |what: &str| { let what = what.to_string(); move |e: serde_json::Error| StageError::Invalid(format!("{what}: {e}")) };
    let requests = eval_dir.join("requests.jsonl");
    let text = std::fs::read_to_string(&requests).map_err(io(&requests))?;
    let full: Vec<crate::eval::runner::RequestRecord> =
        text.lines().filter(|l| !l.trim().is_empty()).map(serde_json::from_str).collect::<Result<_, _>>().map_err(invalid("reading requests.jsonl"))?;
    let records: Vec<RequestTau> = full.iter().map(RequestTau::from).collect();
    let t = table(&records);
    let names: Vec<String> = cfg.arms.iter().map(|a| a.name.clone()).collect();
    let boots = bootstrap(&t, &names, cfg.eval.bootstrap_samples, 0);
    let mut arms_json = serde_json::Map::new();
    let mut summaries: Vec<(String, ArmSummary)> = Vec::new();
    let mut curves = Vec::new();
    for arm in &cfg.arms {
        let run = out.join("arms").join(&arm.name);
        let lines = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default();
        let metrics: Vec<StepMetrics> = lines.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        let held_out = metrics.iter().rev().find_map(|m| m.eval.clone());
        curves.push((
            arm.name.clone(),
            metrics
                .iter()
                .map(|m| CurvePoint { step: m.step, loss: m.loss as f64, acc: m.acc as f64, accept_len: m.accept_len as f64 })
                .collect::<Vec<_>>(),
        ));
        let (per, avg) = point_estimates(&t, &arm.name);
        let (cis, avg_ci, _) = boots.get(&arm.name).cloned().unwrap_or_default();
        let benchmarks: BTreeMap<String, BenchTau> = per
            .iter()
            .map(|(b, (tau, n))| (b.clone(), BenchTau { tau: *tau, tau_ci: cis.get(b).copied().unwrap_or([f64::NAN; 2]), requests: *n }))
            .collect();
        let s = ArmSummary {
            drafter: arm.drafter.clone(),
            objective: arm.objective.clone(),
            benchmarks,
            average_tau: avg,
            average_tau_ci: avg_ci,
            acc: held_out.as_ref().map(|e| e.acc as f64).unwrap_or(f64::NAN),
            support_size: held_out.as_ref().map(|e| e.support_size as f64).unwrap_or(f64::NAN),
            accept_len: held_out.as_ref().map(|e| e.accept_len as f64).unwrap_or(f64::NAN),
        };
        arms_json.insert(arm.name.clone(), serde_json::to_value(&s).map_err(invalid("arm summary"))?);
        summaries.push((arm.name.clone(), s));
    }
    let comparisons: Vec<_> = [
        ("dflash-auf", "dflash-decay"),
        ("dflash-auf+decay", "dflash-decay"),
        ("dflash-auf+decay", "dflash-auf"),
        ("dflash-auf", "dflash-full"),
        ("dflash-auf", "dflash-dpace"),
        ("domino-auf", "domino-decay"),
    ]
        .iter()
        .filter_map(|(x, y)| paired(&t, &boots, x, y))
        .collect();
    let findings = check_findings(&summaries, &comparisons);
    std::fs::create_dir_all(docs).map_err(io(docs))?;
    let machine = crate::eval::report::Machine::detect();
    let json = serde_json::json!({
        "arms": arms_json,
        "comparisons": comparisons,
        "findings": findings,
        "command": command,
        "machine": machine,
        "date": crate::eval::report::utc_now_rfc3339(),
        "config": config_json,
    });
    let results_json = docs.join("results.json");
    crate::util::fs::write_atomic(&results_json, serde_json::to_string_pretty(&json).map_err(invalid("results.json"))?.as_bytes()).map_err(io(&results_json))?;
    write_training_curves(&docs.join("training_curves.svg"), &curves, 50).map_err(|e| StageError::Invalid(format!("training curves: {e}")))?;
    // τ per benchmark and acceptance per position of every arm, redrawn from the evaluation's
    // records (so a summary rerun picks up plot changes without re-evaluating).
    let order: Vec<crate::eval::datasets::BenchmarkName> = cfg.eval.benchmarks.iter().filter_map(|b| b.parse().ok()).collect();
    let runs: Vec<_> = cfg
        .arms
        .iter()
        .map(|arm| crate::eval::runner::summarize(&full, &arm.name, cfg.train.block_size, &order))
        .collect();
    crate::eval::plot::write_svg(
        &docs.join("results_eval.svg"),
        &runs,
        &format!("{}: {} prompts per benchmark, max_new_tokens {}, T = 0", cfg.model, cfg.eval.limit, cfg.eval.max_new_tokens),
    )
    .map_err(|e| StageError::Invalid(format!("plotting the evaluation: {e}")))?;

    let md = render_markdown(cfg, config_path, docs, command, &machine, &summaries, &findings, &comparisons);
    let results_md = docs.join("results.md");
    crate::util::fs::write_atomic(&results_md, md.as_bytes()).map_err(io(&results_md))?;
    Ok(md)
    }
}

/// results.md in the paper's layout: rows = arms, columns = benchmarks + average; then the
/// budget, the findings and the paired comparisons.
#[allow(clippy::too_many_arguments)]
fn render_markdown(
    cfg: &PaperConfig,
    config_path: &Path,
    docs: &Path,
    command: &str,
    machine: &crate::eval::report::Machine,
    summaries: &[(String, ArmSummary)],
    findings: &[Finding],
    comparisons: &[PairedDiff],
) -> String {
    let benches: Vec<String> = cfg.eval.benchmarks.clone();
    let mut md = String::new();
    md.push_str("# The paper's comparison at small scale (SmolLM2-135M target, CPU)\n\n");
    md.push_str(&format!(
        "Command: `{command}` (training and evaluation are cached in the working folder: a rerun only redoes what is missing, then this summary)\n\nMachine: {} ({} threads); summary written {}.\n\n",
        machine.cpu_model,
        machine.threads,
        crate::eval::report::utc_now_rfc3339()
    ));
    md.push_str("τ = mean accepted drafts + 1 per cycle (T = 0, block size from the config); each cell is the mean over requests with a 95% bootstrap interval over requests. Stand-ins: gsm8k = GSM-Symbolic, math500 = CHAMP, mbpp = CodeI/O prompts, alpaca = held-out ShareGPT first turns.\n\n");
    md.push_str(&format!("| arm | {} | average | acc (shared mask) | support/block | held-out accept len |\n|---|{}---|---|---|---|\n", benches.join(" | "), "---|".repeat(benches.len())));
    for (name, s) in summaries {
        let cells: Vec<String> = benches
            .iter()
            .map(|b| s.benchmarks.get(b).map(|x| format!("{:.2} [{:.2}, {:.2}]", x.tau, x.tau_ci[0], x.tau_ci[1])).unwrap_or_else(|| "–".into()))
            .collect();
        md.push_str(&format!(
            "| {name} | {} | **{:.3}** [{:.3}, {:.3}] | {:.3} | {:.2} | {:.3} |\n",
            cells.join(" | "),
            s.average_tau,
            s.average_tau_ci[0],
            s.average_tau_ci[1],
            s.acc,
            s.support_size,
            s.accept_len
        ));
    }
    let t = &cfg.train;
    md.push_str(&format!(
        "\nBudget ({config}): the target's greedy answers to {conv} ShareGPT prompts (≤ {new_tok} new tokens, prompts ≤ {max_len} tokens), \
         {layers}-layer drafters of the target's width tapping target layers {taps:?}, B = {b}, {steps} steps × {seqs} sequence(s) × {anchors} anchors, \
         lr {lr} (cosine, 4% warmup), seed {seed}; evaluation on {limit} prompts per benchmark (MT-Bench: both turns), {eval_tok} new tokens, T = 0. \
         acc, support and accept length are measured on the held-out split at the end of training.\n",
        config = config_path.display(),
        conv = cfg.data.conversations,
        new_tok = cfg.data.max_new_tokens,
        max_len = cfg.data.max_len,
        layers = t.layers,
        taps = t.target_layer_ids,
        b = t.block_size,
        steps = t.steps,
        seqs = t.batch_sequences,
        anchors = t.num_anchors,
        lr = t.lr,
        seed = t.seed,
        limit = cfg.eval.limit,
        eval_tok = cfg.eval.max_new_tokens,
    ));
    md.push_str("\n## The paper's findings, checked on this run\n\n| finding | verdict | evidence |\n|---|---|---|\n");
    for f in findings {
        md.push_str(&format!("| {} | **{}** | {} |\n", f.claim, f.verdict.label(), f.evidence));
    }
    if docs.join("investigation.md").is_file() {
        md.push_str("\nInvestigation notes (what we checked when a run disagreed with the paper): [investigation.md](investigation.md).\n");
    }
    md.push_str("\n## Paired comparisons (same requests, paired bootstrap of the average τ)\n\n| a vs b | Δ avg τ | relative | 95% CI of Δ | benchmarks where a > b |\n|---|---|---|---|---|\n");
    for c in comparisons {
        md.push_str(&format!("| {} vs {} | {:+.3} | {:+.1}% | [{:+.3}, {:+.3}] | {}/{} |\n", c.a, c.b, c.diff, 100.0 * c.relative, c.ci[0], c.ci[1], c.benchmarks_won, c.benchmarks));
    }
    md.push_str("\n![training curves](training_curves.svg)\n\n![τ per benchmark and acceptance per position](results_eval.svg)\n");
    md
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
