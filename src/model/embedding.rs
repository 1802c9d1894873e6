//! The target's token embedding table, kept as the checkpoint stores it.
//!
//! A quantized GGUF stores `token_embd.weight` in blocks (SmolLM2's Q4_1 file: 17 MiB); as f32 the
//! table is 113 MiB, a third of the process at decode time. So in the quantized weights modes
//! the table stays in its stored blocks and a lookup dequantizes only the rows it returns. A
//! block dequantizes to the same f32 values whether it is read alone or with the whole table,
//! so the rows are bit-identical to those of the f32 table (tested), and every output with them.

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QTensor};
use candle_core::{Device, Tensor};

/// (vocab, hidden) embedding rows: dense f32, or quantized blocks as stored.
#[derive(Debug, Clone)]
pub enum Embedding {
    Dense(Tensor),
    Quantized {
        /// The table's bytes, row-major: `row_bytes` per row.
        raw: std::sync::Arc<Vec<u8>>,
        dtype: GgmlDType,
        rows: usize,
        hidden: usize,
    },
}

impl Embedding {
    /// Keeps `q` quantized when its type has blocks (and each row is whole blocks); otherwise
    /// dequantizes it to a dense f32 table.
    pub fn from_qtensor(q: &QTensor) -> candle_core::Result<Self> {
        let (rows, hidden) = q.shape().dims2()?;
        Self::from_ggml(&q.data()?, q.dtype(), rows, hidden)
    }

    /// [`Embedding::from_qtensor`] from the table's bytes as a GGUF file stores them.
    pub fn from_ggml(raw: &[u8], dtype: GgmlDType, rows: usize, hidden: usize) -> candle_core::Result<Self> {
        let blocky = !matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        if !blocky || hidden % dtype.block_size() != 0 {
            return Ok(Embedding::Dense(qtensor_from_ggml(dtype, raw, vec![rows, hidden], &Device::Cpu)?.dequantize(&Device::Cpu)?));
        }
        if raw.len() != rows * Self::row_bytes(dtype, hidden) {
            candle_core::bail!("embedding table of {rows}x{hidden} {dtype:?} has {} bytes, expected {}", raw.len(), rows * Self::row_bytes(dtype, hidden));
        }
        Ok(Embedding::Quantized { raw: std::sync::Arc::new(raw.to_vec()), dtype, rows, hidden })
    }

    fn row_bytes(dtype: GgmlDType, hidden: usize) -> usize {
        hidden / dtype.block_size() * dtype.type_size()
    }

    /// ids -> (n, hidden) f32 rows on `device` (quantized tables live on the CPU).
    pub fn rows(&self, ids: &[u32], device: &Device) -> candle_core::Result<Tensor> {
        match self {
            Embedding::Dense(t) => t.index_select(&Tensor::new(ids, t.device())?, 0),
            Embedding::Quantized { raw, dtype, rows, hidden } => {
                let rb = Self::row_bytes(*dtype, *hidden);
                let mut buf = Vec::with_capacity(ids.len() * rb);
                for &id in ids {
                    let r = id as usize;
                    if r >= *rows {
                        candle_core::bail!("token id {id} is outside the embedding table of {rows} rows");
                    }
                    buf.extend_from_slice(&raw[r * rb..(r + 1) * rb]);
                }
                if ids.is_empty() {
                    return Tensor::zeros((0, *hidden), candle_core::DType::F32, device);
                }
                qtensor_from_ggml(*dtype, &buf, vec![ids.len(), *hidden], &Device::Cpu)?.dequantize(&Device::Cpu)?.to_device(device)
            }
        }
    }

    /// The whole table as dense f32 on `device`.
    pub fn dense(&self, device: &Device) -> candle_core::Result<Tensor> {
        match self {
            Embedding::Dense(t) => t.to_device(device),
            Embedding::Quantized { raw, dtype, rows, hidden } => {
                qtensor_from_ggml(*dtype, raw, vec![*rows, *hidden], &Device::Cpu)?.dequantize(&Device::Cpu)?.to_device(device)
            }
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            Embedding::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Embedding::Quantized { raw, .. } => raw.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantized_rows_are_the_rows_of_the_dequantized_table() {
        // A random (40, 64) table quantized to Q4_1 and Q8_0: lookups, in any order and with
        // repeats, equal the rows of the whole table dequantized at once, bit for bit.
        let vals: Vec<f32> = (0..40 * 64).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.3).collect();
        let t = Tensor::from_vec(vals, (40, 64), &Device::Cpu).unwrap();
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q4_0] {
            let q = QTensor::quantize(&t, dtype).unwrap();
            let e = Embedding::from_qtensor(&q).unwrap();
            assert!(matches!(e, Embedding::Quantized { .. }));
            assert!(e.bytes() < 40 * 64 * 4 / 3, "{dtype:?} holds {} bytes", e.bytes());
            let dense = q.dequantize(&Device::Cpu).unwrap();
            let ids = [3u32, 0, 39, 3, 17];
            let want = dense.index_select(&Tensor::new(&ids, &Device::Cpu).unwrap(), 0).unwrap();
            let got = e.rows(&ids, &Device::Cpu).unwrap();
            assert_eq!(got.to_vec2::<f32>().unwrap(), want.to_vec2::<f32>().unwrap(), "{dtype:?}");
            assert_eq!(e.dense(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap(), dense.to_vec2::<f32>().unwrap());
            assert!(e.rows(&[40], &Device::Cpu).is_err(), "an id past the table is an error");
        }
        // f32 tables stay dense.
        let f = QTensor::quantize(&t, GgmlDType::F32).unwrap();
        assert!(matches!(Embedding::from_qtensor(&f).unwrap(), Embedding::Dense(_)));
    }
}
