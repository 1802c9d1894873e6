//! The weight rules against naive per-position formulas, metrics against direct counts, and the
//! config and command-line forms.

use super::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Random blocks that cover: no failure, failure at the first predicted position, invalid tails
/// and invalid positions in mid-block.
fn random_batch(rng: &mut ChaCha8Rng, blocks: usize, p: usize) -> (Vec<bool>, Vec<bool>, Vec<f32>) {
    let mut valid = Vec::new();
    let mut correct = Vec::new();
    let mut p_gold = Vec::new();
    for b in 0..blocks {
        let tail = match b % 4 {
            0 => p,
            _ => rng.gen_range(1..=p),
        };
        for i in 0..p {
            let v = match b % 5 {
                0 => true,
                1 => i < tail,
                2 => i < tail && rng.gen_bool(0.8),
                3 => false,
                _ => rng.gen_bool(0.7),
            };
            let c = match b % 3 {
                0 => true,
                1 => i != 0,
                _ => rng.gen_bool(0.6),
            };
            valid.push(v);
            correct.push(c);
            p_gold.push(rng.gen_range(0.0..1.0));
        }
    }
    (valid, correct, p_gold)
}

/// The DESIGN §3 formulas, written per position with explicit products and sums.
fn naive_weights(obj: &Objective, gamma: f32, v: &[bool], c: &[bool], p: &[f32]) -> Vec<f32> {
    let n = v.len();
    let vf = |i: usize| if v[i] { 1.0f32 } else { 0.0 };
    let alive = |i: usize, transparent: bool| -> f32 {
        let ok = (0..i).all(|j| if v[j] { c[j] } else { transparent });
        if ok {
            1.0
        } else {
            0.0
        }
    };
    let s = |l: usize, alpha: f32| {
        if v[l] {
            (1.0 - alpha) * p[l] + alpha
        } else {
            1.0
        }
    };
    let prefix = |j: usize, alpha: f32| (0..=j).map(|l| s(l, alpha)).product::<f32>();
    (0..n)
        .map(|i| match obj {
            Objective::Full { .. } => vf(i),
            Objective::Decay { .. } => vf(i) * (-(i as f32) / gamma).exp(),
            Objective::Auf {
                invalid_transparent,
                ..
            } => vf(i) * alive(i, *invalid_transparent),
            Objective::AufDecay {
                invalid_transparent,
                ..
            } => vf(i) * alive(i, *invalid_transparent) * (-(i as f32) / gamma).exp(),
            Objective::Dpace { alpha, .. } => {
                vf(i) * (i..n).map(|j| prefix(j, *alpha) * vf(j)).sum::<f32>()
            }
            Objective::DpacePrefix { alpha, .. } => vf(i) * prefix(i, *alpha),
        })
        .collect()
}

fn all_objectives() -> Vec<Objective> {
    vec![
        Objective::full(),
        Objective::decay(),
        Objective::auf(),
        Objective::Auf {
            failure: FailureRule::Argmax,
            invalid_transparent: false,
            norm: None,
        },
        Objective::auf_decay(),
        Objective::dpace(0.5),
        Objective::dpace(0.2),
        Objective::dpace_prefix(0.5),
    ]
}

#[test]
fn every_objective_matches_the_naive_per_position_formulas() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for layout in [BlockLayout::dflash(16), BlockLayout::domino(16)] {
        let p = layout.positions_per_block;
        let blocks = 40;
        let (valid, correct, p_gold) = random_batch(&mut rng, blocks, p);
        for obj in all_objectives() {
            let resolved = obj.resolve(16).unwrap();
            let got = resolved
                .weights(
                    layout,
                    RowStats {
                        valid: &valid,
                        correct: &correct,
                        p_gold: &p_gold,
                    },
                    3,
                    0,
                )
                .unwrap();
            let mut sum = 0.0f64;
            let mut real = 0usize;
            for b in 0..blocks {
                let r = b * p..(b + 1) * p;
                let want = naive_weights(
                    &obj,
                    7.0,
                    &valid[r.clone()],
                    &correct[r.clone()],
                    &p_gold[r.clone()],
                );
                for (i, (&g, &w)) in got.w[r.clone()].iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                        "{} block {b} index {i}: got {g}, want {w}",
                        obj.name()
                    );
                }
                sum += want.iter().map(|&w| w as f64).sum::<f64>();
                real += usize::from(valid[r].iter().any(|&v| v));
            }
            let want_norm = match obj {
                Objective::Dpace { .. } | Objective::DpacePrefix { .. } => real as f32,
                _ => sum as f32,
            };
            assert!(
                (got.normaliser - want_norm).abs() <= 1e-4 * want_norm.max(1.0),
                "{}",
                obj.name()
            );
        }
    }
}

fn auf_weights(valid: &[bool], correct: &[bool], transparent: bool) -> Vec<f32> {
    let obj = Objective::Auf {
        failure: FailureRule::Argmax,
        invalid_transparent: transparent,
        norm: None,
    };
    let layout = BlockLayout {
        positions_per_block: valid.len(),
        first_position: 1,
    };
    let p_gold = vec![0.5; valid.len()];
    obj.resolve(16)
        .unwrap()
        .weights(
            layout,
            RowStats {
                valid,
                correct,
                p_gold: &p_gold,
            },
            1,
            0,
        )
        .unwrap()
        .w
}

#[test]
fn auf_support_includes_the_first_failure_and_nothing_after_it() {
    let t = true;
    let f = false;
    assert_eq!(
        auf_weights(&[t; 5], &[t, t, f, t, t], true),
        vec![1.0, 1.0, 1.0, 0.0, 0.0]
    );
    // Failure at the first predicted position keeps only that position.
    assert_eq!(
        auf_weights(&[t; 4], &[f, t, t, t], true),
        vec![1.0, 0.0, 0.0, 0.0]
    );
    // No failure keeps every valid position.
    assert_eq!(auf_weights(&[t; 4], &[t; 4], true), vec![1.0; 4]);
    // Invalid tail drops out.
    assert_eq!(
        auf_weights(&[t, t, t, f, f], &[t; 5], true),
        vec![1.0, 1.0, 1.0, 0.0, 0.0]
    );
}

#[test]
fn an_invalid_mid_block_position_is_transparent_unless_configured_otherwise() {
    let (t, f) = (true, false);
    let valid = [t, f, t, t];
    let correct = [t, f, f, t];
    assert_eq!(
        auf_weights(&valid, &correct, true),
        vec![1.0, 0.0, 1.0, 0.0]
    );
    assert_eq!(
        auf_weights(&valid, &correct, false),
        vec![1.0, 0.0, 0.0, 0.0]
    );
}

#[test]
fn sampled_failure_follows_the_gold_probability() {
    let obj = Objective::Auf {
        failure: FailureRule::Sample,
        invalid_transparent: true,
        norm: None,
    }
    .resolve(16)
    .unwrap();
    let layout = BlockLayout {
        positions_per_block: 2,
        first_position: 1,
    };
    let blocks = 4000;
    let valid = vec![true; 2 * blocks];
    let correct = vec![false; 2 * blocks];
    let mut survived = 0;
    for (p, expect) in [(1.0f32, 1.0f32), (0.0, 0.0), (0.3, 0.3)] {
        let p_gold = vec![p; 2 * blocks];
        let w = obj
            .weights(
                layout,
                RowStats {
                    valid: &valid,
                    correct: &correct,
                    p_gold: &p_gold,
                },
                1,
                42,
            )
            .unwrap();
        let kept = (0..blocks).filter(|b| w.w[2 * b + 1] > 0.0).count();
        let frac = kept as f32 / blocks as f32;
        assert!((frac - expect).abs() < 0.03, "p = {p}: survival {frac}");
        survived += kept;
        // Argmax correctness plays no role under sampling, and the first position is always kept.
        assert!((0..blocks).all(|b| w.w[2 * b] == 1.0));
    }
    assert!(survived > 0);
    // Same seed, same draws; another seed, other draws.
    let p_gold = vec![0.5; 2 * blocks];
    let stats = RowStats {
        valid: &valid,
        correct: &correct,
        p_gold: &p_gold,
    };
    let a = obj.weights(layout, stats, 1, 1).unwrap();
    let b = obj.weights(layout, stats, 1, 1).unwrap();
    let c = obj.weights(layout, stats, 1, 2).unwrap();
    assert_eq!(a, b);
    assert_ne!(a.w, c.w);
}

#[test]
fn metrics_match_a_direct_count() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let layout = BlockLayout::dflash(8);
    let p = layout.positions_per_block;
    let blocks = 30;
    let (valid, correct, p_gold) = random_batch(&mut rng, blocks, p);
    let obj = Objective::auf().resolve(8).unwrap();
    let w = obj
        .weights(
            layout,
            RowStats {
                valid: &valid,
                correct: &correct,
                p_gold: &p_gold,
            },
            1,
            0,
        )
        .unwrap();
    let m = MetricCounts::from_batch(layout, &valid, &correct, &w.w)
        .unwrap()
        .summary();

    let n_valid = valid.iter().filter(|&&v| v).count();
    let n_correct = valid.iter().zip(&correct).filter(|(&v, &c)| v && c).count();
    let sup: Vec<usize> = (0..valid.len()).filter(|&r| w.w[r] > 0.0).collect();
    let sup_correct = sup.iter().filter(|&&r| correct[r]).count();
    let real: Vec<usize> = (0..blocks)
        .filter(|b| valid[b * p..(b + 1) * p].iter().any(|&v| v))
        .collect();
    let accept: usize = real
        .iter()
        .map(|b| {
            1 + (0..p)
                .take_while(|&i| valid[b * p + i] && correct[b * p + i])
                .count()
        })
        .sum();
    assert!((m.acc - n_correct as f32 / n_valid as f32).abs() < 1e-6);
    assert!((m.support_acc - sup_correct as f32 / sup.len() as f32).abs() < 1e-6);
    assert!((m.support_size - sup.len() as f32 / real.len() as f32).abs() < 1e-6);
    assert!((m.accept_len - accept as f32 / real.len() as f32).abs() < 1e-6);
    assert_eq!(m.acc_per_position.len(), p);
    for i in 0..p {
        let v = (0..blocks).filter(|b| valid[b * p + i]).count();
        let c = (0..blocks)
            .filter(|b| valid[b * p + i] && correct[b * p + i])
            .count();
        let want = if v == 0 { 0.0 } else { c as f32 / v as f32 };
        assert!((m.acc_per_position[i] - want).abs() < 1e-6);
    }
    // AUF's support holds at most one failure per block: the last supported position.
    let counts = MetricCounts::from_batch(layout, &valid, &correct, &w.w).unwrap();
    assert!(counts.support_correct + counts.blocks >= counts.support);
}

#[test]
fn an_invalid_position_ends_the_accepted_run() {
    let layout = BlockLayout {
        positions_per_block: 4,
        first_position: 1,
    };
    let mut counts = MetricCounts::new(layout);
    counts.add_block(
        &[true, false, true, true],
        &[true, true, true, true],
        &[1.0; 4],
    );
    counts.add_block(
        &[true, true, true, true],
        &[true, true, true, true],
        &[1.0; 4],
    );
    counts.add_block(&[false; 4], &[true; 4], &[0.0; 4]);
    let m = counts.summary();
    assert_eq!(counts.blocks, 2);
    assert_eq!(m.accept_len, (2.0 + 5.0) / 2.0);
    let mut merged = MetricCounts::new(layout);
    merged.merge(&counts);
    merged.merge(&counts);
    assert_eq!(merged.summary().accept_len, m.accept_len);
    assert_eq!(merged.valid, 2 * counts.valid);
}

#[test]
fn config_json_round_trips_and_rejects_unknown_fields() {
    let cases = [
        (r#"{"type":"full"}"#, Objective::full()),
        (
            r#"{"type":"decay","gamma":7.0}"#,
            Objective::Decay {
                gamma: Some(7.0),
                norm: None,
            },
        ),
        (r#"{"type":"auf"}"#, Objective::auf()),
        (
            r#"{"type":"auf+decay","gamma":7.0}"#,
            Objective::AufDecay {
                gamma: Some(7.0),
                failure: FailureRule::Argmax,
                invalid_transparent: true,
                norm: None,
            },
        ),
        (r#"{"type":"dpace","alpha":0.5}"#, Objective::dpace(0.5)),
        (
            r#"{"type":"dpace-prefix","alpha":0.25}"#,
            Objective::dpace_prefix(0.25),
        ),
        (
            r#"{"type":"auf","failure":"sample","invalid_transparent":false,"norm":"valid-count"}"#,
            Objective::Auf {
                failure: FailureRule::Sample,
                invalid_transparent: false,
                norm: Some(Normaliser::ValidCount),
            },
        ),
    ];
    for (json, want) in cases {
        let got: Objective = serde_json::from_str(json).unwrap();
        assert_eq!(got, want, "{json}");
        let again: Objective = got.to_string().parse().unwrap();
        assert_eq!(again, want);
    }
    assert!(serde_json::from_str::<Objective>(r#"{"type":"auf","gama":7}"#).is_err());
    assert!(serde_json::from_str::<Objective>(r#"{"type":"full","gamma":7}"#).is_err());
    assert!(serde_json::from_str::<Objective>(r#"{"type":"aff"}"#).is_err());
}

#[test]
fn short_forms_parse_for_the_command_line() {
    assert_eq!("auf".parse::<Objective>().unwrap(), Objective::auf());
    assert_eq!("decay".parse::<Objective>().unwrap(), Objective::decay());
    assert_eq!(
        "decay:7".parse::<Objective>().unwrap(),
        Objective::Decay {
            gamma: Some(7.0),
            norm: None
        }
    );
    assert_eq!(
        "auf+decay:5"
            .parse::<Objective>()
            .unwrap()
            .resolve(10)
            .unwrap()
            .rule,
        WeightRule::Mask {
            decay_gamma: Some(5.0),
            auf: Some(AufRule {
                failure: FailureRule::Argmax,
                invalid_transparent: true
            })
        }
    );
    assert_eq!(
        "dpace:0.5".parse::<Objective>().unwrap(),
        Objective::dpace(0.5)
    );
    assert_eq!(
        "dpace-prefix".parse::<Objective>().unwrap(),
        Objective::dpace_prefix(0.5)
    );
    assert_eq!(
        r#"{"type":"full"}"#.parse::<Objective>().unwrap(),
        Objective::full()
    );
    for bad in ["auff", "auf:3", "decay:x", "full:1", ""] {
        assert!(
            matches!(bad.parse::<Objective>(), Err(ObjectiveError::Parse { .. })),
            "{bad:?}"
        );
    }
}

#[test]
fn decay_gamma_defaults_follow_the_block_size_and_other_sizes_must_set_it() {
    let gamma = |b: usize| match Objective::decay().resolve(b).unwrap().rule {
        WeightRule::Mask { decay_gamma, .. } => decay_gamma,
        _ => None,
    };
    assert_eq!(gamma(16), Some(7.0));
    assert_eq!(gamma(10), Some(5.0));
    assert_eq!(gamma(8), Some(4.0));
    assert!(matches!(
        Objective::auf_decay().resolve(12),
        Err(ObjectiveError::NoDefaultGamma { block_size: 12, .. })
    ));
    assert!(Objective::Decay {
        gamma: Some(3.0),
        norm: None
    }
    .resolve(12)
    .is_ok());
    assert!(Objective::Decay {
        gamma: Some(-1.0),
        norm: None
    }
    .resolve(16)
    .is_err());
    assert!(Objective::dpace(1.5).resolve(16).is_err());
}

#[test]
fn rows_that_do_not_fill_whole_blocks_are_rejected() {
    let obj = Objective::full().resolve(16).unwrap();
    let v = vec![true; 20];
    let err = obj
        .weights(
            BlockLayout::dflash(16),
            RowStats {
                valid: &v,
                correct: &v,
                p_gold: &[0.5; 20],
            },
            1,
            0,
        )
        .unwrap_err();
    assert!(matches!(
        err,
        ObjectiveError::Shape {
            got: 20,
            per_block: 15,
            ..
        }
    ));
}
