use candle_core::{Tensor, Device, Module, quantized::{QTensor, QMatMul, GgmlDType}};
use std::time::Instant;
fn main() -> anyhow::Result<()> {
    for (n, k) in [(1536usize, 576usize), (576, 1536), (49152, 576)] {
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
        for dt in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4K, GgmlDType::F32] {
            if dt == GgmlDType::Q4K && k % 256 != 0 { continue; }
            let q = QMatMul::from_qtensor(QTensor::quantize(&w, dt)?)?;
            for m in [1usize, 16] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
                let _ = q.forward(&x)?;
                let t = Instant::now();
                for _ in 0..10 { let _ = q.forward(&x)?; }
                println!("{n}x{k} {dt:?} m={m}: {:.3} ms", t.elapsed().as_secs_f64()*100.0);
            }
        }
    }
    Ok(())
}
