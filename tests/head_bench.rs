//! Timings of the chunked LM head on SmolLM2 shapes (H = 576, V = 49152, 32 anchors × 15 rows).
//! Prints milliseconds; asserts only that the results are sane, never a time.

use std::time::Instant;

use candle_core::{Device, Tensor, D};
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
    // Labels: the argmax for the first positions of a block, random later, so AUF's support is a
    // realistic prefix (about 5 of 15 rows).
    let argmax: Vec<u32> = h
        .matmul(&w.t().unwrap())
        .unwrap()
        .argmax(D::Minus1)
        .unwrap()
        .to_vec1()
        .unwrap();
    let labels: Vec<u32> = (0..n)
        .map(|r| {
            if r % 15 < 4 {
                argmax[r]
            } else {
                ((r * 7919) % vocab) as u32
            }
        })
        .collect();
    let valid = vec![true; n];

    let wt = w.t().unwrap();
    let matmul_ms = median_ms(|| drop(h.matmul(&wt).unwrap()), 3);
    println!("candle h·Wᵀ ({n}×{hdim} · {hdim}×{vocab}): {matmul_ms:.1} ms");

    for chunk_rows in [120usize, 240, 480] {
        let mut head = ChunkedHead::new(HeadConfig { chunk_rows });
        for objective in [Objective::full(), Objective::decay(), Objective::auf()] {
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
                "head chunk {chunk_rows:>3} {:<6} {ms:7.1} ms  support {support:>3}/{n}  loss {:.3}  ({:.0} rows/s)",
                objective.name(),
                out.loss,
                n as f64 / ms * 1e3
            );
            assert!(out.loss.is_finite() && out.loss > 0.0);
            assert_eq!(out.grad_hidden.dims(), &[n, hdim]);
        }
    }
}
