//! Tests of the chunked head against full-logit candle autograd, finite differences and the
//! full (non-support) backward.

use super::*;
use crate::train::objective::{Objective, RowStats};
use candle_core::{Var, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

struct Case {
    h: Tensor,
    w: Tensor,
    labels: Vec<u32>,
    valid: Vec<bool>,
    layout: BlockLayout,
    a: Tensor,
    w2: Tensor,
}

/// Random rows where about 60% of labels are the base argmax, so AUF sees runs of successes;
/// one block is wholly invalid and others have invalid tails or holes.
fn case(
    seed: u64,
    layout: BlockLayout,
    blocks: usize,
    hdim: usize,
    vocab: usize,
    edim: usize,
) -> Case {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = blocks * layout.positions_per_block;
    let mut rand_t = |len: usize, scale: f32, shape: (usize, usize)| {
        let v: Vec<f32> = (0..len).map(|_| rng.gen_range(-scale..scale)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    let h = rand_t(n * hdim, 1.0, (n, hdim));
    let w = rand_t(vocab * hdim, 0.5, (vocab, hdim));
    let a = rand_t(n * edim, 1.0, (n, edim));
    let w2 = rand_t(vocab * edim, 0.3, (vocab, edim));
    let argmax: Vec<u32> = h
        .matmul(&w.t().unwrap())
        .unwrap()
        .argmax(D::Minus1)
        .unwrap()
        .to_vec1()
        .unwrap();
    let p = layout.positions_per_block;
    let labels = (0..n)
        .map(|r| {
            if rng.gen_bool(0.6) {
                argmax[r]
            } else {
                rng.gen_range(0..vocab as u32)
            }
        })
        .collect();
    let valid = (0..n)
        .map(|r| match (r / p) % 4 {
            1 => r % p < p - 2,
            2 => r % p != 2,
            3 if r / p == 3 => false,
            _ => true,
        })
        .collect();
    Case {
        h,
        w,
        labels,
        valid,
        layout,
        a,
        w2,
    }
}

struct Naive {
    loss: f32,
    grad_h: Tensor,
    grad_a: Option<Tensor>,
    grad_w2: Option<Tensor>,
    weights: Vec<f32>,
}

fn ce_and_stats(logits: &Tensor, labels: &Tensor) -> (Tensor, Vec<bool>, Vec<f32>) {
    let logsm = candle_nn::ops::log_softmax(logits, D::Minus1).unwrap();
    let ce = logsm
        .gather(labels, 1)
        .unwrap()
        .squeeze(1)
        .unwrap()
        .neg()
        .unwrap();
    let argmax: Vec<u32> = logits.argmax(D::Minus1).unwrap().to_vec1().unwrap();
    let gold: Vec<u32> = labels.squeeze(1).unwrap().to_vec1().unwrap();
    let correct = argmax.iter().zip(&gold).map(|(a, g)| a == g).collect();
    let p_gold = ce
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|c| (-c).exp())
        .collect();
    (ce, correct, p_gold)
}

/// Full logits, autograd through candle, weights from the same objective code.
fn naive(obj: &ResolvedObjective, c: &Case, delta: Option<(f32, usize, BaseSupport)>) -> Naive {
    let n = c.labels.len();
    let hv = Var::from_tensor(&c.h).unwrap();
    let labels = Tensor::from_vec(c.labels.clone(), (n, 1), &Device::Cpu).unwrap();
    let base_logits = hv.as_tensor().matmul(&c.w.t().unwrap()).unwrap();
    let weigh = |obj: &ResolvedObjective, correct: &[bool], p_gold: &[f32]| {
        obj.weights(
            c.layout,
            RowStats {
                valid: &c.valid,
                correct,
                p_gold,
            },
            1,
            0,
        )
        .unwrap()
    };
    let term = |ce: &Tensor, w: &[f32], norm: f32| {
        let wt = Tensor::from_vec(w.to_vec(), n, &Device::Cpu).unwrap();
        ((ce * wt).unwrap().sum_all().unwrap() / norm as f64).unwrap()
    };
    match delta {
        None => {
            let (ce, correct, p_gold) = ce_and_stats(&base_logits, &labels);
            let w = weigh(obj, &correct, &p_gold);
            let loss = term(&ce, &w.w, w.normaliser);
            let grads = loss.backward().unwrap();
            Naive {
                loss: loss.to_scalar().unwrap(),
                grad_h: grads.get(hv.as_tensor()).unwrap().clone(),
                grad_a: None,
                grad_w2: None,
                weights: w.w,
            }
        }
        Some((lambda, prefix, support)) => {
            let av = Var::from_tensor(&c.a).unwrap();
            let w2v = Var::from_tensor(&c.w2).unwrap();
            let p = c.layout.positions_per_block;
            let mask: Vec<f32> = (0..n)
                .map(|r| if r % p < prefix { 0.0 } else { 1.0 })
                .collect();
            let mask = Tensor::from_vec(mask, (n, 1), &Device::Cpu).unwrap();
            let delta = av
                .as_tensor()
                .broadcast_mul(&mask)
                .unwrap()
                .matmul(&w2v.as_tensor().t().unwrap())
                .unwrap();
            let final_logits = (&base_logits + delta).unwrap();
            let (ce_f, cor_f, p_f) = ce_and_stats(&final_logits, &labels);
            let (ce_b, cor_b, p_b) = ce_and_stats(&base_logits, &labels);
            let wf = weigh(obj, &cor_f, &p_f);
            let wb = match support {
                BaseSupport::SameAsFinal => wf.clone(),
                BaseSupport::OwnArgmax => weigh(obj, &cor_b, &p_b),
                BaseSupport::Unmasked => weigh(&obj.without_auf(), &cor_f, &p_f),
            };
            let loss = ((term(&ce_f, &wf.w, wf.normaliser) * (1.0 - lambda as f64)).unwrap()
                + (term(&ce_b, &wb.w, wb.normaliser) * lambda as f64).unwrap())
            .unwrap();
            let grads = loss.backward().unwrap();
            // candle prunes a branch multiplied by exactly 0 (λ = 0 or 1): its gradient is zero.
            let grad = |v: &Var| {
                grads
                    .get(v.as_tensor())
                    .cloned()
                    .unwrap_or_else(|| v.as_tensor().zeros_like().unwrap())
            };
            Naive {
                loss: loss.to_scalar().unwrap(),
                grad_h: grad(&hv),
                grad_a: Some(grad(&av)),
                grad_w2: Some(grad(&w2v)),
                weights: wf.w,
            }
        }
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn objectives() -> Vec<Objective> {
    vec![
        Objective::full(),
        Objective::decay(),
        Objective::auf(),
        Objective::auf_decay(),
        Objective::dpace(0.5),
        Objective::dpace_prefix(0.5),
    ]
}

fn run_head(
    chunk_rows: usize,
    obj: &ResolvedObjective,
    c: &Case,
    delta: Option<DeltaBranch<'_>>,
) -> HeadOutput {
    run_head_in(Precision::F32, chunk_rows, obj, c, delta)
}

/// The chunked head over `c` with every row scored, so that per-row outputs compare with the
/// references row for row (`skipping_rows_after_the_first_failure_gives_the_same_loss_and_gradient`
/// covers the rest).
fn run_head_in(precision: Precision, chunk_rows: usize, obj: &ResolvedObjective, c: &Case, delta: Option<DeltaBranch<'_>>) -> HeadOutput {
    let mut head = ChunkedHead::new(HeadConfig { chunk_rows, precision, score_every_row: true, ..Default::default() });
    let input = HeadInput { hidden: &c.h, lm_head: &c.w, labels: &c.labels, valid: &c.valid, layout: c.layout, num_sequences: 1, seed: 0, delta, soft: None };
    head.run(obj, &input).unwrap()
}

#[test]
fn loss_and_hidden_gradient_equal_candle_autograd_for_every_objective() {
    let c = case(1, BlockLayout::dflash(8), 6, 24, 301, 0);
    for objective in objectives() {
        let obj = objective.resolve(8).unwrap();
        let want = naive(&obj, &c, None);
        // 16 rows → 2 blocks per chunk, 3 chunks.
        let got = run_head(16, &obj, &c, None);
        assert_eq!(
            got.rows
                .weights
                .iter()
                .map(|&w| w > 0.0)
                .collect::<Vec<_>>(),
            want.weights.iter().map(|&w| w > 0.0).collect::<Vec<_>>(),
            "{}",
            objective.name()
        );
        assert!(
            (got.loss - want.loss).abs() < 1e-5 * want.loss.abs().max(1.0),
            "{}: loss {} vs {}",
            objective.name(),
            got.loss,
            want.loss
        );
        let diff = max_abs_diff(&got.grad_hidden, &want.grad_h);
        println!(
            "{}: loss {} max |Δgrad_h| {diff:e}",
            objective.name(),
            got.loss
        );
        assert!(
            diff < 1e-5,
            "{}: grad_h differs by {diff}",
            objective.name()
        );
    }
}

#[test]
fn chunking_does_not_change_the_result() {
    let c = case(2, BlockLayout::dflash(8), 6, 16, 200, 0);
    let obj = Objective::auf().resolve(8).unwrap();
    let one = run_head(1000, &obj, &c, None);
    let many = run_head(7, &obj, &c, None);
    assert!((one.loss - many.loss).abs() < 1e-6);
    assert!(max_abs_diff(&one.grad_hidden, &many.grad_hidden) < 1e-7);
    assert_eq!(one.rows.metrics, many.rows.metrics);
}

#[test]
fn support_only_backward_equals_the_full_backward() {
    let c = case(3, BlockLayout::dflash(8), 6, 20, 257, 0);
    let obj = Objective::auf().resolve(8).unwrap();
    let got = run_head(14, &obj, &c, None);
    let n = c.labels.len();
    let support = got.rows.weights.iter().filter(|&&w| w > 0.0).count();
    assert!(
        support > 0 && support < n,
        "support {support} of {n} rows: the test needs both kinds"
    );
    // Every row, zero-weighted or not: G = w/norm·(softmax − onehot), grad = G·W.
    let logits = c.h.matmul(&c.w.t().unwrap()).unwrap();
    let softmax = candle_nn::ops::softmax_last_dim(&logits).unwrap();
    let labels = Tensor::from_vec(c.labels.clone(), n, &Device::Cpu).unwrap();
    let onehot = candle_nn::encoding::one_hot(labels, 257, 1f32, 0f32).unwrap();
    let scale: Vec<f32> = got
        .rows
        .weights
        .iter()
        .map(|w| w / got.rows.normaliser)
        .collect();
    let scale = Tensor::from_vec(scale, (n, 1), &Device::Cpu).unwrap();
    let g = (softmax - onehot).unwrap().broadcast_mul(&scale).unwrap();
    let full = g.matmul(&c.w).unwrap();
    let diff = max_abs_diff(&got.grad_hidden, &full);
    assert!(
        diff < 1e-6,
        "support-only backward differs from the full one by {diff}"
    );
    // Rows outside the support get exactly zero gradient.
    let gh: Vec<Vec<f32>> = got.grad_hidden.to_vec2().unwrap();
    for (r, row) in gh.iter().enumerate() {
        if got.rows.weights[r] == 0.0 {
            assert!(row.iter().all(|&x| x == 0.0));
        }
    }
}

#[test]
fn hidden_gradient_matches_finite_differences() {
    let c = case(4, BlockLayout::dflash(8), 6, 12, 97, 0);
    // Objectives whose weights are locally constant in h; D-PACE's weights move with p_gold, and
    // the head (like SpecForge) treats them as detached, so a finite difference would see more.
    for objective in [Objective::auf_decay(), Objective::full()] {
        let obj = objective.resolve(8).unwrap();
        let base = run_head(64, &obj, &c, None);
        let gh: Vec<Vec<f32>> = base.grad_hidden.to_vec2().unwrap();
        let hv: Vec<Vec<f32>> = c.h.to_vec2().unwrap();
        let support: Vec<usize> = (0..c.labels.len())
            .filter(|&r| base.rows.weights[r] > 0.0)
            .collect();
        let eps = 1e-2f32;
        let mut checked = 0;
        for (k, &r) in support.iter().take(10).enumerate() {
            let j = (k * 5) % 12;
            let loss_at = |delta: f32| {
                let mut h2 = hv.clone();
                h2[r][j] += delta;
                let flat: Vec<f32> = h2.concat();
                let c2 = Case {
                    h: Tensor::from_vec(flat, c.h.dims2().unwrap(), &Device::Cpu).unwrap(),
                    ..clone_case(&c)
                };
                let out = run_head(64, &obj, &c2, None);
                (out.loss, out.rows.correct)
            };
            let (lp, cp) = loss_at(eps);
            let (lm, cm) = loss_at(-eps);
            if cp != base.rows.correct || cm != base.rows.correct {
                continue; // an argmax flipped: the loss is not differentiable across it
            }
            let fd = (lp - lm) / (2.0 * eps);
            let g = gh[r][j];
            assert!(
                (fd - g).abs() < 1e-3 + 2e-2 * g.abs(),
                "{} row {r} col {j}: fd {fd} vs {g}",
                objective.name()
            );
            assert!(g != 0.0);
            checked += 1;
        }
        assert!(
            checked >= 3,
            "{}: only {checked} coordinates away from argmax ties",
            objective.name()
        );
    }
}

fn clone_case(c: &Case) -> Case {
    Case {
        h: c.h.clone(),
        w: c.w.clone(),
        labels: c.labels.clone(),
        valid: c.valid.clone(),
        layout: c.layout,
        a: c.a.clone(),
        w2: c.w2.clone(),
    }
}

#[test]
fn domino_loss_and_gradients_equal_candle_autograd() {
    let c = case(5, BlockLayout::domino(8), 5, 16, 211, 6);
    for objective in [
        Objective::auf(),
        Objective::auf_decay(),
        Objective::dpace(0.5),
    ] {
        let obj = objective.resolve(8).unwrap();
        for support in [
            BaseSupport::SameAsFinal,
            BaseSupport::OwnArgmax,
            BaseSupport::Unmasked,
        ] {
            for lambda in [0.0f32, 0.3, 1.0] {
                let want = naive(&obj, &c, Some((lambda, 1, support)));
                let delta = DeltaBranch {
                    input: &c.a,
                    weight: &c.w2,
                    base_ce_weight: lambda,
                    base_only_prefix: 1,
                    base_support: support,
                };
                let got = run_head(16, &obj, &c, Some(delta));
                let tag = format!("{} {support:?} λ={lambda}", objective.name());
                assert!(
                    (got.loss - want.loss).abs() < 1e-5 * want.loss.abs().max(1.0),
                    "{tag}: loss {} vs {}",
                    got.loss,
                    want.loss
                );
                let d = got.delta.as_ref().unwrap();
                let dh = max_abs_diff(&got.grad_hidden, &want.grad_h);
                let da = max_abs_diff(&d.grad_input, want.grad_a.as_ref().unwrap());
                let dw = max_abs_diff(&d.grad_weight, want.grad_w2.as_ref().unwrap());
                assert!(
                    dh < 1e-5 && da < 1e-5 && dw < 1e-5,
                    "{tag}: Δh {dh:e} Δa {da:e} ΔW₂ {dw:e}"
                );
                assert_eq!(
                    got.rows
                        .weights
                        .iter()
                        .map(|&w| w > 0.0)
                        .collect::<Vec<_>>(),
                    want.weights.iter().map(|&w| w > 0.0).collect::<Vec<_>>(),
                    "{tag}"
                );
            }
        }
    }
}

#[test]
fn surrogate_backward_delivers_the_head_gradient_to_upstream_weights() {
    // h = x·Aᵀ with A trainable: dL/dA from the surrogate must equal autograd through the full head.
    let c = case(6, BlockLayout::dflash(8), 3, 10, 64, 0);
    let obj = Objective::auf().resolve(8).unwrap();
    let n = c.labels.len();
    let x = Tensor::randn(0f32, 1.0, (n, 8), &Device::Cpu).unwrap();
    let a = Var::from_tensor(&Tensor::randn(0f32, 0.5, (10, 8), &Device::Cpu).unwrap()).unwrap();
    let h_graph = x.matmul(&a.as_tensor().t().unwrap()).unwrap();
    let c2 = Case {
        h: h_graph.detach(),
        ..clone_case(&c)
    };
    let out = run_head(64, &obj, &c2, None);
    let grads = out.surrogate(&h_graph, None).unwrap().backward().unwrap();
    let via_surrogate = grads.get(a.as_tensor()).unwrap().clone();
    // Autograd all the way, with the head's own weights and normaliser held fixed.
    let logits = h_graph.matmul(&c.w.t().unwrap()).unwrap();
    let labels = Tensor::from_vec(c.labels.clone(), (n, 1), &Device::Cpu).unwrap();
    let (ce, _, _) = ce_and_stats(&logits, &labels);
    let wt = Tensor::from_vec(out.rows.weights.clone(), n, &Device::Cpu).unwrap();
    let loss = ((ce * wt).unwrap().sum_all().unwrap() / out.rows.normaliser as f64).unwrap();
    let direct = loss.backward().unwrap().get(a.as_tensor()).unwrap().clone();
    assert!(max_abs_diff(&via_surrogate, &direct) < 1e-5);
    assert!(
        via_surrogate
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );
}

#[test]
fn bad_inputs_are_reported_with_context() {
    let c = case(7, BlockLayout::dflash(8), 2, 8, 50, 0);
    let obj = Objective::full().resolve(8).unwrap();
    let mut head = ChunkedHead::new(HeadConfig::default());
    let mut labels = c.labels.clone();
    labels[9] = 50;
    let input = HeadInput {
        hidden: &c.h,
        lm_head: &c.w,
        labels: &labels,
        valid: &c.valid,
        layout: c.layout,
        num_sequences: 1,
        seed: 0,
        delta: None,
        soft: None,
    };
    match head.run(&obj, &input) {
        Err(HeadError::LabelOutOfRange {
            label: 50,
            row: 9,
            block: 1,
            position: 3,
            vocab: 50,
        }) => {}
        other => panic!("unexpected {other:?}"),
    }
    let h64 = c.h.to_dtype(DType::F64).unwrap();
    let input = HeadInput {
        hidden: &h64,
        labels: &c.labels,
        ..input
    };
    assert!(matches!(
        head.run(&obj, &input),
        Err(HeadError::NotCpuF32 { what: "hidden", .. })
    ));
    let short = c.h.narrow(0, 0, 13).unwrap();
    let input = HeadInput {
        hidden: &short,
        labels: &c.labels[..13],
        valid: &c.valid[..13],
        ..input
    };
    assert!(matches!(
        head.run(&obj, &input),
        Err(HeadError::Objective(ObjectiveError::Shape { .. }))
    ));
}

/// The batch of case `c` with distillation targets `soft`.
fn soft_input<'a>(c: &'a Case, soft: SoftTargets<'a>) -> HeadInput<'a> {
    HeadInput { hidden: &c.h, lm_head: &c.w, labels: &c.labels, valid: &c.valid, layout: c.layout, num_sequences: 1, seed: 0, delta: None, soft: Some(soft) }
}

/// Random soft targets: k ids per row (the first is the label for about half the rows, as the
/// target's argmax is when the data is its own greedy output) and probabilities summing to 1.
fn soft_case(c: &Case, k: usize, vocab: usize, seed: u64) -> (Vec<u32>, Vec<f32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut ids, mut probs) = (Vec::new(), Vec::new());
    for &label in &c.labels {
        let raw: Vec<f32> = (0..k).map(|_| rng.gen_range(0.05f32..1.0)).collect();
        let total: f32 = raw.iter().sum();
        for (j, p) in raw.iter().enumerate() {
            ids.push(if j == 0 && rng.gen_bool(0.5) { label } else { rng.gen_range(0..vocab as u32) });
            probs.push(p / total);
        }
    }
    (ids, probs)
}

#[test]
fn distillation_targets_give_the_loss_and_gradient_of_candle_autograd() {
    let (vocab, k, alpha) = (199, 4, 0.7f32);
    let c = case(11, BlockLayout::dflash(8), 6, 16, vocab, 0);
    let (ids, probs) = soft_case(&c, k, vocab, 5);
    let n = c.labels.len();
    for objective in [Objective::auf(), Objective::full(), Objective::dpace(0.5)] {
        let obj = objective.resolve(8).unwrap();
        let hard = run_head(16, &obj, &c, None);
        let mut head = ChunkedHead::new(HeadConfig { chunk_rows: 16, score_every_row: true, ..Default::default() });
        let soft = SoftTargets { k, ids: &ids, probs: &probs, weight: alpha };
        let input = soft_input(&c, soft);
        let got = head.run(&obj, &input).unwrap();
        // The objectives weigh by the hard label: same weights, correctness and p_gold.
        assert_eq!(got.rows.weights, hard.rows.weights, "{}", objective.name());
        assert_eq!(got.rows.correct, hard.rows.correct);
        for (a, b) in got.rows.p_gold.iter().zip(&hard.rows.p_gold) {
            assert!((a - b).abs() < 1e-6);
        }
        // Reference: dense target t = (1-α)·onehot + α·p, loss Σ w·(−Σ t·log_softmax) / norm.
        let mut t = vec![0f32; n * vocab];
        for r in 0..n {
            t[r * vocab + c.labels[r] as usize] += 1.0 - alpha;
            for j in 0..k {
                t[r * vocab + ids[r * k + j] as usize] += alpha * probs[r * k + j];
            }
        }
        let t = Tensor::from_vec(t, (n, vocab), &Device::Cpu).unwrap();
        let scale: Vec<f32> = got.rows.weights.iter().map(|w| w / got.rows.normaliser).collect();
        let scale = Tensor::from_vec(scale, (n, 1), &Device::Cpu).unwrap();
        let hv = Var::from_tensor(&c.h).unwrap();
        let logits = hv.as_tensor().matmul(&c.w.t().unwrap()).unwrap();
        let logsm = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
        let ce = (logsm * &t).unwrap().sum(1).unwrap().neg().unwrap().unsqueeze(1).unwrap();
        let loss = (ce * &scale).unwrap().sum_all().unwrap();
        let want_loss = loss.to_scalar::<f32>().unwrap();
        let grads = loss.backward().unwrap();
        let want_grad = grads.get(hv.as_tensor()).unwrap();
        assert!((got.loss - want_loss).abs() < 1e-5 * want_loss.abs().max(1.0), "{}: {} vs {want_loss}", objective.name(), got.loss);
        let diff = max_abs_diff(&got.grad_hidden, want_grad);
        assert!(diff < 1e-5, "{}: grad_h differs by {diff}", objective.name());
        assert!(max_abs_diff(&got.grad_hidden, &hard.grad_hidden) > 1e-4, "the soft targets must change the gradient");
    }
}

/// The generic head's output against the chunked CPU kernel's on the same input: loss within
/// 1e-5 relative, every gradient within 1e-5 absolute (the inputs are O(1); both accumulate in f32
/// in different orders), per-row weights, CE and correctness alike, metrics equal.
fn assert_generic_matches_chunked(tag: &str, obj: &ResolvedObjective, c: &Case, delta: Option<DeltaBranch<'_>>, chunk_rows: usize) {
    let want = run_head(chunk_rows, obj, c, delta);
    let input = HeadInput { hidden: &c.h, lm_head: &c.w, labels: &c.labels, valid: &c.valid, layout: c.layout, num_sequences: 1, seed: 0, delta, soft: None };
    let mut head = Head::for_backend(HeadConfig { chunk_rows, ..Default::default() }, &Backend::new(Device::Cpu, crate::nn::Kernels::Generic));
    assert!(matches!(head, Head::Generic(_)));
    let got = head.run(obj, &input).unwrap();
    assert!((got.loss - want.loss).abs() < 1e-5 * want.loss.abs().max(1.0), "{tag}: loss {} vs {}", got.loss, want.loss);
    let dh = max_abs_diff(&got.grad_hidden, &want.grad_hidden);
    assert!(dh < 1e-5, "{tag}: grad_hidden differs by {dh:e}");
    assert_eq!(got.rows.correct, want.rows.correct, "{tag}: correctness");
    assert_eq!(got.rows.metrics, want.rows.metrics, "{tag}: metrics");
    for (r, (a, b)) in got.rows.weights.iter().zip(&want.rows.weights).enumerate() {
        assert!((a - b).abs() < 1e-5, "{tag}: weight of row {r}: {a} vs {b}");
    }
    for (r, (a, b)) in got.rows.ce.iter().zip(&want.rows.ce).enumerate() {
        assert!((a - b).abs() < 1e-4, "{tag}: CE of row {r}: {a} vs {b}");
    }
    match (&got.delta, &want.delta) {
        (Some(g), Some(w)) => {
            let da = max_abs_diff(&g.grad_input, &w.grad_input);
            let dw = max_abs_diff(&g.grad_weight, &w.grad_weight);
            assert!(da < 1e-5 && dw < 1e-5, "{tag}: Δa {da:e} ΔW₂ {dw:e}");
            assert_eq!(g.base.correct, w.base.correct, "{tag}: base correctness");
            assert!((g.base.loss - w.base.loss).abs() < 1e-5 * w.base.loss.abs().max(1.0), "{tag}: base loss");
        }
        (None, None) => {}
        _ => panic!("{tag}: one head returned a delta branch and the other did not"),
    }
    println!("{tag}: loss {} max |Δgrad_h| {dh:e}", got.loss);
}

#[test]
fn generic_head_equals_the_chunked_kernel_for_every_objective() {
    let c = case(1, BlockLayout::dflash(8), 6, 24, 301, 0);
    for objective in objectives() {
        let obj = objective.resolve(8).unwrap();
        for chunk_rows in [16, 512] {
            assert_generic_matches_chunked(&format!("{} chunk {chunk_rows}", objective.name()), &obj, &c, None, chunk_rows);
        }
    }
}

#[test]
fn generic_head_equals_the_chunked_kernel_for_domino() {
    let c = case(5, BlockLayout::domino(8), 5, 16, 211, 6);
    for objective in [Objective::auf(), Objective::dpace(0.5)] {
        let obj = objective.resolve(8).unwrap();
        for support in [BaseSupport::SameAsFinal, BaseSupport::OwnArgmax, BaseSupport::Unmasked] {
            for lambda in [0.0f32, 0.3, 1.0] {
                let delta = DeltaBranch { input: &c.a, weight: &c.w2, base_ce_weight: lambda, base_only_prefix: 1, base_support: support };
                assert_generic_matches_chunked(&format!("{} {support:?} λ={lambda}", objective.name()), &obj, &c, Some(delta), 16);
            }
        }
    }
}

#[test]
fn distillation_at_weight_zero_or_onto_the_label_is_hard_label_ce() {
    let vocab = 150;
    let c = case(12, BlockLayout::dflash(8), 4, 12, vocab, 0);
    let obj = Objective::auf().resolve(8).unwrap();
    let hard = run_head(16, &obj, &c, None);
    let (ids, probs) = soft_case(&c, 3, vocab, 6);
    let onto_label: Vec<u32> = c.labels.iter().flat_map(|&l| [l, l]).collect();
    let halves = vec![0.5f32; onto_label.len()];
    for (soft, exact) in [
        (SoftTargets { k: 3, ids: &ids, probs: &probs, weight: 0.0 }, true),
        (SoftTargets { k: 2, ids: &onto_label, probs: &halves, weight: 1.0 }, false),
    ] {
        let mut head = ChunkedHead::new(HeadConfig { chunk_rows: 16, score_every_row: true, ..Default::default() });
        let input = soft_input(&c, soft);
        let got = head.run(&obj, &input).unwrap();
        let tol = if exact { 0.0 } else { 1e-6 };
        assert!((got.loss - hard.loss).abs() <= tol * hard.loss.abs().max(1.0), "{} vs {}", got.loss, hard.loss);
        assert!(max_abs_diff(&got.grad_hidden, &hard.grad_hidden) <= tol.max(if exact { 0.0 } else { 1e-6 }));
    }
    // Bad soft targets are errors, not silent nonsense.
    let mut head = ChunkedHead::new(HeadConfig::default());
    let short = [1u32];
    let bad = soft_input(&c, SoftTargets { k: 3, ids: &short, probs: &[1.0], weight: 0.5 });
    assert!(matches!(head.run(&obj, &bad), Err(HeadError::Shape { what: "soft targets", .. })));
    let out_of_vocab = vec![vocab as u32; c.labels.len() * 3];
    let bad = HeadInput { soft: Some(SoftTargets { k: 3, ids: &out_of_vocab, probs: &probs, weight: 0.5 }), ..bad };
    assert!(matches!(head.run(&obj, &bad), Err(HeadError::LabelOutOfRange { .. })));
    let bad = HeadInput { soft: Some(SoftTargets { k: 3, ids: &ids, probs: &probs, weight: 1.5 }), ..bad };
    assert!(matches!(head.run(&obj, &bad), Err(HeadError::BadSoftWeight(_))));
}

#[test]
fn generic_head_in_bf16_stays_close_to_the_f32_kernel() {
    // What a CUDA build computes (bf16 products, f32 statistics), run on the CPU.
    let c = case(2, BlockLayout::dflash(8), 6, 24, 301, 0);
    let obj = Objective::decay().resolve(8).unwrap();
    let want = run_head(16, &obj, &c, None);
    let input = HeadInput { hidden: &c.h, lm_head: &c.w, labels: &c.labels, valid: &c.valid, layout: c.layout, num_sequences: 1, seed: 0, delta: None, soft: None };
    let backend = Backend::new(Device::Cpu, crate::nn::Kernels::Generic).with_compute_dtype(DType::BF16);
    let mut head = Head::for_backend(HeadConfig { chunk_rows: 16, ..Default::default() }, &backend);
    let got = head.run(&obj, &input).unwrap();
    let scale = max_abs_diff(&want.grad_hidden, &(&want.grad_hidden * 0.0).unwrap());
    let dh = max_abs_diff(&got.grad_hidden, &want.grad_hidden);
    println!("bf16 head: loss {} vs {}, max |Δgrad_h| {dh:e} of {scale:e}", got.loss, want.loss);
    assert!(dh > 0.0, "bf16 gave the f32 bits: the dtype did not take effect");
    assert!((got.loss - want.loss).abs() < 0.02 * want.loss.abs(), "loss {} vs {}", got.loss, want.loss);
    assert!(dh < 0.05 * scale, "grad_h differs by {dh} (scale {scale})");
}

#[test]
fn generic_head_equals_the_chunked_kernel_with_distillation_targets() {
    let vocab = 173;
    let c = case(13, BlockLayout::dflash(8), 5, 16, vocab, 0);
    let (ids, probs) = soft_case(&c, 4, vocab, 7);
    for objective in [Objective::auf(), Objective::decay()] {
        let obj = objective.resolve(8).unwrap();
        let input = soft_input(&c, SoftTargets { k: 4, ids: &ids, probs: &probs, weight: 0.6 });
        let want = ChunkedHead::new(HeadConfig { chunk_rows: 16, score_every_row: true, ..Default::default() }).run(&obj, &input).unwrap();
        let mut head = Head::for_backend(HeadConfig { chunk_rows: 16, ..Default::default() }, &Backend::new(Device::Cpu, crate::nn::Kernels::Generic));
        let got = head.run(&obj, &input).unwrap();
        assert!((got.loss - want.loss).abs() < 1e-5 * want.loss.abs().max(1.0), "{}: {} vs {}", objective.name(), got.loss, want.loss);
        let dh = max_abs_diff(&got.grad_hidden, &want.grad_hidden);
        assert!(dh < 1e-5, "{}: grad_h differs by {dh}", objective.name());
        assert_eq!(got.rows.weights, want.rows.weights);
        for (a, b) in got.rows.p_gold.iter().zip(&want.rows.p_gold) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}

#[test]
fn the_precision_resolves_to_what_this_cpu_runs() {
    assert!(!use_bf16(Precision::F32).unwrap());
    match use_bf16(Precision::Bf16) {
        Ok(on) => assert!(on && bf16::available()),
        Err(e) => {
            assert!(!bf16::available());
            assert!(e.to_string().contains("head.precision"), "{e}");
        }
    }
    assert_eq!("bf16".parse::<Precision>().unwrap(), Precision::Bf16);
    assert!("fp16".parse::<Precision>().unwrap_err().contains("bf16"));
    assert_eq!(HeadConfig::default().precision, Precision::F32);
}

/// bf16 products (where the CPU has them): the same weights and support, loss and dL/dh within
/// bf16 rounding of the f32 head, for DFlash under every objective and for Domino; an odd H and a
/// vocabulary that fills no whole panel exercise the padding.
#[test]
fn the_bf16_head_stays_within_rounding_of_the_f32_head() {
    if !bf16::available() {
        assert!(matches!(use_bf16(Precision::Bf16), Err(HeadError::NoBf16)));
        return;
    }
    for (hdim, vocab) in [(24usize, 301usize), (25, 97)] {
        let c = case(21, BlockLayout::dflash(8), 6, hdim, vocab, 0);
        for objective in objectives() {
            let obj = objective.resolve(8).unwrap();
            let want = run_head_in(Precision::F32, 16, &obj, &c, None);
            let got = run_head_in(Precision::Bf16, 16, &obj, &c, None);
            let name = objective.name();
            let scale = max_abs_diff(&want.grad_hidden, &(&want.grad_hidden * 0.0).unwrap());
            let dh = max_abs_diff(&got.grad_hidden, &want.grad_hidden);
            assert!(dh > 0.0, "{name}: bf16 gave the f32 bits: the precision did not take effect");
            assert!(dh < 0.01 * scale, "{name} H {hdim}: grad_h differs by {dh} (scale {scale})");
            assert!((got.loss - want.loss).abs() < 0.01 * want.loss.abs(), "{name}: loss {} vs {}", got.loss, want.loss);
            // Rounding may flip a near-tie argmax, so AUF's support may differ in a row or two.
            let flips = got.rows.correct.iter().zip(&want.rows.correct).filter(|(a, b)| a != b).count();
            assert!(flips <= 2, "{name}: {flips} rows changed correctness");
        }
    }
    let c = case(22, BlockLayout::domino(8), 5, 24, 301, 10);
    let obj = Objective::auf().resolve(8).unwrap();
    let delta = DeltaBranch { input: &c.a, weight: &c.w2, base_ce_weight: 0.3, base_only_prefix: 1, base_support: BaseSupport::SameAsFinal };
    let want = run_head_in(Precision::F32, 16, &obj, &c, Some(delta));
    let got = run_head_in(Precision::Bf16, 16, &obj, &c, Some(delta));
    let scale = max_abs_diff(&want.grad_hidden, &(&want.grad_hidden * 0.0).unwrap());
    let dh = max_abs_diff(&got.grad_hidden, &want.grad_hidden);
    assert!(dh > 0.0 && dh < 0.01 * scale, "domino grad_h differs by {dh} (scale {scale})");
    assert!((got.loss - want.loss).abs() < 0.01 * want.loss.abs(), "domino loss {} vs {}", got.loss, want.loss);
}

/// The packed copy of W belongs to one tensor: a head given another LM head packs that one.
#[test]
fn the_bf16_head_packs_again_for_another_lm_head() {
    let c1 = case(31, BlockLayout::dflash(8), 4, 24, 301, 0);
    let c2 = Case { w: (&c1.w * -0.7).unwrap(), ..case(31, BlockLayout::dflash(8), 4, 24, 301, 0) };
    let obj = Objective::decay().resolve(8).unwrap();
    let precision = if bf16::available() { Precision::Bf16 } else { Precision::F32 };
    let mut head = ChunkedHead::new(HeadConfig { chunk_rows: 16, precision, ..Default::default() });
    fn input(c: &Case) -> HeadInput<'_> {
        HeadInput { hidden: &c.h, lm_head: &c.w, labels: &c.labels, valid: &c.valid, layout: c.layout, num_sequences: 1, seed: 0, delta: None, soft: None }
    }
    let first = head.run(&obj, &input(&c1)).unwrap();
    let second = head.run(&obj, &input(&c2)).unwrap();
    let fresh = run_head_in(precision, 16, &obj, &c2, None);
    assert_eq!(second.grad_hidden.to_vec2::<f32>().unwrap(), fresh.grad_hidden.to_vec2::<f32>().unwrap());
    assert_eq!(second.loss, fresh.loss);
    assert_ne!(first.loss, second.loss);
}

/// Under AUF (argmax failure) the head scores rows only up to each block's first failure. The
/// weights, loss and dL/dh are those of scoring every row; the objectives without that property
/// score every row either way.
#[test]
fn skipping_rows_after_the_first_failure_gives_the_same_loss_and_gradient() {
    use crate::train::objective::FailureRule;
    let c = case(41, BlockLayout::dflash(8), 12, 24, 301, 0);
    let strict = Objective::Auf { failure: FailureRule::Argmax, invalid_transparent: false, norm: None };
    let sample = Objective::Auf { failure: FailureRule::Sample, invalid_transparent: true, norm: None };
    let precisions = if bf16::available() { vec![Precision::F32, Precision::Bf16] } else { vec![Precision::F32] };
    let mut skipped_somewhere = false;
    for precision in precisions {
        for objective in [Objective::auf(), Objective::auf_decay(), strict.clone(), sample.clone(), Objective::decay(), Objective::dpace(0.5)] {
            let obj = objective.resolve(8).unwrap();
            for chunk_rows in [7usize, 16, 48, 512] {
                let mut head = ChunkedHead::new(HeadConfig { chunk_rows, precision, ..Default::default() });
                let input = HeadInput { hidden: &c.h, lm_head: &c.w, labels: &c.labels, valid: &c.valid, layout: c.layout, num_sequences: 1, seed: 3, delta: None, soft: None };
                let got = head.run(&obj, &input).unwrap();
                let all = head.run_with(&obj, &input, true).unwrap();
                let name = format!("{} {precision:?} chunk {chunk_rows}", objective.name());
                // The same rows get the same weights; a row's logits may differ in the last bit
                // (the product runs over fewer rows at a time), so loss and dL/dh to rounding.
                assert_eq!(got.rows.weights, all.rows.weights, "{name}: weights");
                assert!((got.loss - all.loss).abs() <= 1e-6 * all.loss.abs(), "{name}: loss {} vs {}", got.loss, all.loss);
                let scale = max_abs_diff(&all.grad_hidden, &(&all.grad_hidden * 0.0).unwrap());
                let dh = max_abs_diff(&got.grad_hidden, &all.grad_hidden);
                assert!(dh <= 1e-5 * scale, "{name}: dL/dh differs by {dh} (scale {scale})");
                let (m1, m2) = (got.rows.metrics.summary(), all.rows.metrics.summary());
                assert_eq!(m1.accept_len, m2.accept_len, "{name}: accept length");
                assert_eq!(m1.support_size, m2.support_size, "{name}: support");
                if obj.stops_at_first_failure() {
                    // Rows past a failure were not scored: none of them reads as correct.
                    for (r, (&a, &b)) in got.rows.correct.iter().zip(&all.rows.correct).enumerate() {
                        assert!(!a || b, "{name}: row {r} correct only when skipping");
                        if got.rows.weights[r] == 0.0 && b && !a {
                            skipped_somewhere = true;
                        }
                    }
                } else {
                    assert_eq!(got.rows.correct, all.rows.correct, "{name}: every row is scored");
                }
            }
        }
    }
    assert!(skipped_somewhere, "the case has correct rows past a failure, and they were skipped");
}
