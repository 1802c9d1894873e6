//! Per-matmul timings of the int8 kernel (src/model/qgemm.rs) beside candle's QMatMul over the
//! same Q8_0 weights, on SmolLM2-135M shapes, interleaved in one run so machine load hits both.
//!
//! cargo run --release --example bench_qgemm [-- reps]
//! Prints medians in µs, and the weight-read rate (GB/s) of the int8 kernel.

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use specauf::model::qgemm::{Exec, Kernel, QMatrix};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let reps: usize = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(15);
    println!("rayon threads {}, load {}", rayon::current_num_threads(), std::fs::read_to_string("/proc/loadavg")?.trim());
    println!("{:>12} {:>3} {:>10} {:>10} {:>10} {:>10} {:>8}", "shape", "m", "candle µs", "int8 µs", "int8 1t µs", "portable", "GB/s");
    for (out, inp) in [(576usize, 576usize), (1536, 576), (576, 1536), (49152, 576)] {
        let w = Tensor::randn(0f32, 0.05, (out, inp), &Device::Cpu)?;
        let qt = QTensor::quantize(&w, GgmlDType::Q8_0)?;
        let ours = QMatrix::from_qtensor("w", &qt)?;
        let theirs = QMatMul::from_qtensor(qt)?;
        for m in [1usize, 4, 16] {
            let xv: Vec<f32> = (0..m * inp).map(|i| (i * 7919 % 1000) as f32 / 500.0 - 1.0).collect();
            let x = Tensor::from_vec(xv.clone(), (m, inp), &Device::Cpu)?;
            let mut y = vec![0f32; m * out];
            let (mut tc, mut to, mut t1, mut tp) = (vec![], vec![], vec![], vec![]);
            let portable_reps = if out * inp * m > 4_000_000 { 1 } else { 3 };
            for rep in 0..reps {
                let t = Instant::now();
                std::hint::black_box(theirs.forward(&x)?);
                tc.push(t.elapsed().as_secs_f64());
                let t = Instant::now();
                ours.matmul(&xv, m, &mut y)?;
                to.push(t.elapsed().as_secs_f64());
                let t = Instant::now();
                ours.matmul_with(&xv, m, &mut y, Exec { kernel: Kernel::Auto, threads: 1 })?;
                t1.push(t.elapsed().as_secs_f64());
                if rep < portable_reps {
                    let t = Instant::now();
                    ours.matmul_with(&xv, m, &mut y, Exec { kernel: Kernel::Avx2, threads: 0 })?;
                    tp.push(t.elapsed().as_secs_f64());
                }
            }
            let (c, o, o1, p) = (median(tc), median(to), median(t1), median(tp));
            println!(
                "{:>12} {:>3} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>8.1}",
                format!("{inp}->{out}"),
                m,
                c * 1e6,
                o * 1e6,
                o1 * 1e6,
                p * 1e6,
                ours.bytes() as f64 / o / 1e9
            );
        }
    }
    Ok(())
}
