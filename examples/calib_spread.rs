//! How steady the start-up block-size choice is: calibrates a drafter again and again in one
//! process and reduces each round's verify timings two ways, the per-size median of five runs
//! (the calibration before 1fc34f1) and `spec::block_size::curve_from_runs` over nine (since),
//! then chooses (B, p_min) from the drafter's held-out cut statistics with the same measured
//! draft and rest-of-cycle times. Prints each round and a tally of the choices.
//!
//! cargo run --release --example calib_spread -- DRAFTER_DIR [--weights native] [--rounds 12]

use std::collections::BTreeMap;
use std::path::PathBuf;

use specauf::drafter::{AnyDrafter, RunSettings};
use specauf::model::{load_model, WeightsMode};
use specauf::spec::block_size::{choose_block_and_cut, curve_from_runs, draft_curve, held_out_cuts, measure_draft_ms, measure_verify_runs, CURVE_REPS};

fn fmt(v: &[f64]) -> String {
    v.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join("/")
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opt = |name: &str, default: &str| -> String {
        args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_string())
    };
    let dir = PathBuf::from(args.first().ok_or_else(|| anyhow::anyhow!("usage: calib_spread DRAFTER_DIR [--weights native] [--rounds 12]"))?);
    let mode: WeightsMode = opt("--weights", "auto").parse().map_err(anyhow::Error::msg)?;
    let rounds: usize = opt("--rounds", "12").parse()?;
    let model = load_model("smollm2", mode)?;
    let target = &model.target;
    let mut drafter = AnyDrafter::load_for(&dir, target)?;
    drafter.apply(&RunSettings::default())?;
    let max_b = drafter.block_size();
    let cuts = held_out_cuts(&dir).ok_or_else(|| anyhow::anyhow!("{} has no held-out cut statistics in its metrics.jsonl", dir.display()))?;
    let (mut old_tally, mut new_tally) = (BTreeMap::new(), BTreeMap::new());
    let (mut old_falls, mut spread_old, mut spread_new) = (0, Vec::new(), Vec::new());
    for round in 0..rounds {
        let runs = measure_verify_runs(target, max_b, drafter.target_layer_ids(), CURVE_REPS)?;
        let old: Vec<f64> = runs
            .iter()
            .map(|r| {
                let mut v = r[..5.min(r.len())].to_vec();
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            })
            .collect();
        let new = curve_from_runs(&runs);
        let at_max = measure_draft_ms(target, &mut *drafter.proposer_on(target.backend()))?;
        let small = drafter.clone().at_block_size(2)?;
        let at_two = measure_draft_ms(target, &mut *small.proposer_on(target.backend()))?;
        let (dv2, dvm) = (new[1.min(max_b - 1)], new[max_b - 1]);
        let rest = at_two.rest_ms(dv2).min(at_max.rest_ms(dvm));
        let draft: Vec<f64> = draft_curve(at_two.draft_ms, at_max.draft_ms, max_b).iter().map(|d| d + rest).collect();
        let pick = |curve: &[f64]| choose_block_and_cut(curve, &draft, &cuts, max_b, None).map(|(b, p, _, rate)| (format!("B{b} p{p}"), rate * curve[0] / 1e3));
        let (o, n) = (pick(&old).unwrap(), pick(&new).unwrap());
        old_falls += old.windows(2).any(|w| w[1] < w[0]) as usize;
        spread_old.push(old[max_b - 1] / old[0]);
        spread_new.push(new[max_b - 1] / new[0]);
        println!("round {round}: old {} -> {} ({:.3}x AR modelled) | new {} -> {} ({:.3}x) | draft {:.2}/{:.2} ms, rest {:.2}/{:.2} ms", fmt(&old), o.0, o.1, fmt(&new), n.0, n.1, at_two.draft_ms, at_max.draft_ms, at_two.rest_ms(dv2), at_max.rest_ms(dvm));
        *old_tally.entry(o.0).or_insert(0) += 1;
        *new_tally.entry(n.0).or_insert(0) += 1;
    }
    let range = |v: &[f64]| format!("{:.3}–{:.3}", v.iter().cloned().fold(f64::INFINITY, f64::min), v.iter().cloned().fold(0.0, f64::max));
    println!("old (per-size median of 5): choices {old_tally:?}; curves that fall somewhere {old_falls}/{rounds}; verify({max_b})/verify(1) {}", range(&spread_old));
    println!("new (round ratios of {CURVE_REPS}, non-decreasing): choices {new_tally:?}; verify({max_b})/verify(1) {}", range(&spread_new));
    Ok(())
}
