//! Timings of the chunked LM head on SmolLM2 shapes (H = 576, V = 49152, 32 anchors × 15 rows),
//! beside candle's own matmul and a naive candle autograd head. Prints milliseconds; asserts only
//! that the results are sane, never a time (machines are noisy).

use std::time::Instant;

use candle_core::{Device, Tensor, Var, D};
use specauf::train::head::{ChunkedHead, HeadConfig, HeadInput};
use specauf::train::objective::{BlockLayout, Objective};

fn median_ms(mut f: impl FnMut(), runs: usize) -> f64 {
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(|a, b| a.total_cmp(b));
    t[runs / 2]
}

#[test]
fn smollm2_head_timings_are_printed() {
    let (hdim, vocab, blocks, block_size) = (576usize, 49152usize, 32usize, 16usize);
    let layout = BlockLayout::dflash(block_size);
    let n = blocks * layout.positions_per_block;
    let dev = Device::Cpu;
    let h = Tensor::randn(0f32, 1.0, (n, hdim), &dev).unwrap();
    let w = Tensor::randn(0f32, 0.05, (vocab, hdim), &dev).unwrap();
    // Labels: the argmax at the first 4 positions of a block, arbitrary later, so AUF's support is
    // a realistic prefix (5 of 15 rows).
    let logits = h.matmul(&w.t().unwrap()).unwrap();
    let argmax: Vec<u32> = logits.argmax(D::Minus1).unwrap().to_vec1().unwrap();
    let labels: Vec<u32> = (0..n)
        .map(|r| if r % 15 < 4 { argmax[r] } else { ((r * 7919) % vocab) as u32 })
        .collect();
    let valid = vec![true; n];
    let flops = 2.0 * (n * hdim * vocab) as f64;

    let wt = w.t().unwrap();
    let matmul_ms = median_ms(|| drop(h.matmul(&wt).unwrap()), 3);
    println!(
        "candle h·Wᵀ ({n}×{hdim} · {hdim}×{vocab}): {matmul_ms:.1} ms ({:.0} GFLOP/s)",
        flops / matmul_ms / 1e6
    );

    // Naive: full logits in the autograd graph, candle log_softmax, backward to h.
    let label_t = Tensor::from_vec(labels.clone(), (n, 1), &dev).unwrap();
    let naive_ms = median_ms(
        || {
            let hv = Var::from_tensor(&h).unwrap();
            let logits = hv.as_tensor().matmul(&wt).unwrap();
            let logsm = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
            let loss = logsm.gather(&label_t, 1).unwrap().neg().unwrap().mean_all().unwrap();
            let grads = loss.backward().unwrap();
            assert!(grads.get(hv.as_tensor()).is_some());
        },
        1,
    );
    println!("naive candle autograd head (full): {naive_ms:.1} ms");

    for chunk_rows in [512usize] {
        let mut head = ChunkedHead::new(HeadConfig { chunk_rows });
        for objective in [Objective::full(), Objective::auf()] {
            let obj = objective.resolve(block_size).unwrap();
            let input = HeadInput {
                hidden: &h,
                lm_head: &w,
                labels: &labels,
                valid: &valid,
                layout,
                num_sequences: 1,
                seed: 0,
                delta: None,
            };
            let mut out = None;
            let ms = median_ms(|| out = Some(head.run(&obj, &input).unwrap()), 3);
            let out = out.unwrap();
            let support = out.rows.weights.iter().filter(|&&x| x > 0.0).count();
            println!(
                "chunked head, chunk {chunk_rows:>3}, {:<4}: {ms:6.1} ms  support {support:>3}/{n}  \
                 loss {:.3}  ({:.0} rows/s)",
                objective.name(),
                out.loss,
                n as f64 / ms * 1e3
            );
            assert!(out.loss.is_finite() && out.loss > 0.0);
            assert_eq!(out.grad_hidden.dims(), &[n, hdim]);
        }
    }
}
