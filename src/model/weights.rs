//! Where weights come from (an HF safetensors directory or a GGUF file) and how linears hold
//! them: f32, int8 or Q4_1 blocks for the batch-invariant kernel in `qgemm`, or quantized
//! blocks multiplied directly by candle's `QMatMul`.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use super::qgemm::{QGemmError, QLinearOp, QMatrix};
use crate::nn::Backend;
use super::ModelError;

/// How linear weights are held on CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightsMode {
    /// The default: `native` for a GGUF whose matrices are all Q8_0 or Q4_1 (the types `qgemm`
    /// runs as stored: the model as the file holds it, and the fastest mode), `q8` for everything
    /// else (safetensors, other quantized types, dense GGUF matrices). Resolved when the target
    /// loads ([`WeightsMode::resolve`]); a loaded target reports the concrete mode.
    #[default]
    Auto,
    /// Everything dequantized to f32: the reference path, and the one training reads.
    F32,
    /// Linears as symmetric int8 blocks of 32 (Q8_0 GGUF blocks as stored; other quantized
    /// types and f32/bf16 safetensors quantized at load) run by `qgemm`'s batch-invariant
    /// kernel.
    Q8,
    /// Keep each GGUF tensor in its stored type: Q8_0 and Q4_1 run by `qgemm` (batch-invariant;
    /// Q4_1 reads 41% fewer bytes than Q8_0), other types by candle's `QMatMul`.
    Native,
}

crate::named_enum!(WeightsMode, "weights mode", ["auto", "q8", "f32", "native"]);

impl WeightsMode {
    /// The concrete mode for `src`: `Auto` becomes `Native` for a GGUF whose matrices (every
    /// tensor of two or more dimensions: linears, embedding, head) are all Q8_0 or Q4_1, so that
    /// every product runs in `qgemm`'s batch-invariant kernel as stored, and `Q8` otherwise (a
    /// dense matrix would stay f32 in `native`, which is neither fast nor batch-invariant); the
    /// other modes are returned as they are.
    pub fn resolve(self, src: &WeightSource) -> WeightsMode {
        if self != WeightsMode::Auto {
            return self;
        }
        match src {
            WeightSource::Gguf { content, .. }
                if content
                    .tensor_infos
                    .values()
                    .filter(|t| t.shape.dims().len() >= 2)
                    .all(|t| matches!(t.ggml_dtype, GgmlDType::Q8_0 | GgmlDType::Q4_1)) =>
            {
                WeightsMode::Native
            }
            _ => WeightsMode::Q8,
        }
    }
}

/// A linear layer `y = x Wᵀ + b` with W of HF shape (out, in).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    out_features: usize,
}

#[derive(Debug, Clone)]
enum LinearWeight {
    F32(Tensor),
    Quant(QMatMul),
    Blocks(QLinearOp),
    /// The generic path (DESIGN §7.11): the dequantized weight as a plain tensor on the
    /// backend's device in its compute dtype, multiplied one row at a time (see
    /// [`Linear::to_generic`]).
    Generic(Tensor),
}

impl Linear {
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Whether row r of an m-row `forward` is bit-identical to a one-row call on that row:
    /// true for `qgemm` blocks and candle's `QMatMul` (both quantize and reduce each row on its
    /// own), false for f32 weights (candle's gemm tiles by the row count).
    pub fn is_batch_invariant(&self) -> bool {
        // Generic: one (1, in) × (in, out) product per row, so a row never meets another.
        !matches!(self.weight, LinearWeight::F32(_) | LinearWeight::Quant(QMatMul::Tensor(_) | QMatMul::TensorF16(_)))
    }

    /// x: (n, in) -> (n, out)
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = match &self.weight {
            LinearWeight::F32(w) => x.matmul(&w.t()?)?,
            LinearWeight::Quant(q) => q.forward(x)?,
            LinearWeight::Blocks(op) => x.contiguous()?.apply_op1_no_bwd(op)?,
            LinearWeight::Generic(w) => rowwise_matmul(x, w)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// The weight as the int8/Q4_1 blocks the `qgemm` kernel multiplies by, where it is held so.
    pub fn blocks(&self) -> Option<&QMatrix> {
        match &self.weight {
            LinearWeight::Blocks(op) => Some(&op.0),
            _ => None,
        }
    }

    /// The weight as f32 (out, in), dequantizing if needed.
    pub fn weight_f32(&self) -> candle_core::Result<Tensor> {
        match &self.weight {
            LinearWeight::F32(w) => Ok(w.clone()),
            LinearWeight::Quant(QMatMul::QTensor(q)) => q.dequantize(&Device::Cpu),
            LinearWeight::Quant(QMatMul::Tensor(t)) => Ok(t.clone()),
            LinearWeight::Quant(QMatMul::TensorF16(t)) => t.to_dtype(DType::F32),
            LinearWeight::Blocks(op) => {
                let w = &op.0;
                Tensor::from_vec(w.dequantize(), (w.out_features(), w.in_features()), &Device::Cpu)
            }
            LinearWeight::Generic(w) => w.to_dtype(DType::F32),
        }
    }

    /// This linear on the generic path: its weight dequantized to f32 (the same values the `f32`
    /// mode holds), then cast to `backend`'s compute dtype and moved to its device; the bias stays
    /// f32. Outputs are f32 whatever the compute dtype.
    pub fn to_generic(&self, backend: &Backend) -> candle_core::Result<Linear> {
        let w = self.weight_f32()?.to_dtype(backend.compute_dtype())?.to_device(backend.device())?;
        let bias = match &self.bias {
            Some(b) => Some(b.to_device(backend.device())?),
            None => None,
        };
        Ok(Linear { weight: LinearWeight::Generic(w), bias, out_features: self.out_features })
    }
}

/// `linears` applied to the same x (.., in): one `qgemm` call ([`super::qgemm::matmul_group`]:
/// x quantized once, one dispatch of the thread pool) when all hold `qgemm` blocks of the same
/// input width, otherwise one `forward` each. The outputs are the same bits either way.
pub fn forward_group(linears: &[&Linear], x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
    let Some(grouped) = qgemm_group(linears, x) else {
        return linears.iter().map(|l| l.forward(x)).collect();
    };
    let (outs, lead) = grouped?;
    outs.into_iter()
        .zip(linears)
        .map(|(y, l)| {
            let mut dims = lead.clone();
            dims.push(l.out_features);
            let y = Tensor::from_vec(y, dims, &Device::Cpu)?;
            match &l.bias {
                Some(b) => y.broadcast_add(b),
                None => Ok(y),
            }
        })
        .collect()
}

/// The `qgemm` path of [`forward_group`] before biases: each linear's output as a host vector,
/// and x's leading dimensions. None when that path does not apply (a linear not held as `qgemm`
/// blocks, different input widths, or x not f32 on the CPU).
pub fn qgemm_group(linears: &[&Linear], x: &Tensor) -> Option<candle_core::Result<(Vec<Vec<f32>>, Vec<usize>)>> {
    let mats: Vec<&QMatrix> = linears
        .iter()
        .map(|l| match &l.weight {
            LinearWeight::Blocks(op) => Some(&*op.0),
            _ => None,
        })
        .collect::<Option<_>>()?;
    let inp = x.dims().last().copied().unwrap_or(0);
    if !mats.iter().all(|w| w.in_features() == inp) || x.dtype() != DType::F32 || !x.device().is_cpu() {
        return None;
    }
    let run = || -> candle_core::Result<(Vec<Vec<f32>>, Vec<usize>)> {
        let x = x.contiguous()?;
        let rows = x.elem_count() / inp.max(1);
        let mut outs: Vec<Vec<f32>> = mats.iter().map(|w| vec![0f32; rows * w.out_features()]).collect();
        let mut views: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
        crate::nn::with_host_f32(&x, |xs| super::qgemm::matmul_group(&mats, xs, rows, &mut views, super::qgemm::Exec::default()))
            .ok_or_else(|| candle_core::Error::Msg("qgemm_group: x is not a contiguous CPU tensor".into()))?
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok((outs, x.dims()[..x.rank() - 1].to_vec()))
    };
    Some(run())
}

/// x (n, in) · wᵀ with w (out, in), as n separate one-row products in the weight's dtype, the
/// result in f32. Every row goes through the same (1, in) × (in, out) product whatever n is, so
/// row r of an n-row call is bit-identical to a one-row call on it (batch invariance, DESIGN
/// §7.2), on any device whose matmul is deterministic for a fixed shape. The cost: the weight is
/// read once per row instead of once per call, so a verify of B rows costs about B decode steps
/// of weight traffic where a batched product would cost about one.
fn rowwise_matmul(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let n = x.dim(0)?;
    let x = x.to_dtype(w.dtype())?;
    let wt = w.t()?;
    let rows = (0..n).map(|r| x.narrow(0, r, 1)?.matmul(&wt)).collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::cat(&rows, 0)?.to_dtype(DType::F32)
}

/// A source of named weights with HF names (`model.layers.0.self_attn.q_proj.weight`).
pub enum WeightSource {
    Hf { dir: PathBuf, st: candle_core::safetensors::MmapedSafetensors },
    Gguf { path: PathBuf, content: gguf_file::Content, file: File, permute_qk: bool, heads: usize, kv_heads: usize },
}

impl WeightSource {
    pub fn hf(dir: &Path) -> Result<Self, ModelError> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| ModelError::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(ModelError::MissingFile {
                path: dir.display().to_string(),
                what: "no *.safetensors file in the model directory".into(),
            });
        }
        // SAFETY of mmap: the files are opened read-only; a user truncating them while we run is
        // outside what we can defend against, as in every mmap-based loader.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }.map_err(|e| {
            ModelError::Corrupt { path: dir.display().to_string(), what: format!("reading safetensors: {e}") }
        })?;
        Ok(WeightSource::Hf { dir: dir.to_path_buf(), st })
    }

    pub fn display(&self) -> String {
        match self {
            WeightSource::Hf { dir, .. } => dir.display().to_string(),
            WeightSource::Gguf { path, .. } => path.display().to_string(),
        }
    }

    pub fn has(&self, name: &str) -> bool {
        match self {
            WeightSource::Hf { st, .. } => st.get(name).is_ok(),
            WeightSource::Gguf { content, .. } => {
                gguf_name(name).is_some_and(|g| content.tensor_infos.contains_key(&g))
            }
        }
    }

    fn missing(&self, name: &str) -> ModelError {
        ModelError::MissingTensor { path: self.display(), name: name.to_string() }
    }

    /// Loads `name` as an f32 tensor and checks its shape.
    pub fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let t = match self {
            WeightSource::Hf { st, .. } => {
                let t = st.load(name, &Device::Cpu).map_err(|_| self.missing(name))?;
                t.to_dtype(DType::F32)?
            }
            WeightSource::Gguf { .. } => self.qtensor(name)?.dequantize(&Device::Cpu)?,
        };
        check_shape(&self.display(), name, t.dims(), shape)?;
        Ok(t)
    }

    /// Loads `name` as a quantized tensor (GGUF: as stored, with llama's Q/K rows restored to
    /// HF order; safetensors: quantized to Q8_0 here).
    pub fn qtensor(&mut self, name: &str) -> Result<QTensor, ModelError> {
        match self {
            WeightSource::Hf { .. } => {
                let t = self.tensor(name, &[])?;
                Ok(QTensor::quantize(&t, GgmlDType::Q8_0)?)
            }
            WeightSource::Gguf { .. } => Ok(self.raw(name)?.qtensor()?),
        }
    }

    /// A GGUF tensor's bytes as the file stores them (llama's Q/K rows restored to HF order),
    /// in a buffer of their own ([`RawTensor`]).
    pub fn raw(&mut self, name: &str) -> Result<RawTensor, ModelError> {
        let display = self.display();
        let WeightSource::Gguf { content, file, permute_qk, heads, kv_heads, .. } = self else {
            return Err(ModelError::Unsupported { path: display, what: format!("{name}: raw tensor bytes exist only in GGUF files") });
        };
        let g = gguf_name(name).ok_or_else(|| ModelError::MissingTensor { path: display.clone(), name: name.to_string() })?;
        let Some(info) = content.tensor_infos.get(&g) else {
            return Err(ModelError::MissingTensor { path: display, name: format!("{name} (GGUF {g})") });
        };
        let dtype = info.ggml_dtype;
        let dims = info.shape.dims().to_vec();
        let len = info.shape.elem_count() / dtype.block_size() * dtype.type_size();
        let corrupt = |what: String| ModelError::Corrupt { path: display.clone(), what };
        let mut buf = memmap2::MmapMut::map_anon(len.max(1)).map_err(|e| corrupt(format!("reserving {len} bytes for tensor {g}: {e}")))?;
        {
            use std::io::{Read, Seek, SeekFrom};
            file.seek(SeekFrom::Start(content.tensor_data_offset + info.offset))
                .and_then(|_| file.read_exact(&mut buf[..len]))
                .map_err(|e| corrupt(format!("reading tensor {g}: {e} (is the file truncated? fetch it again)")))?;
        }
        let raw = RawTensor { buf, len, dtype, dims };
        if *permute_qk && (g.ends_with("attn_q.weight") || g.ends_with("attn_k.weight")) {
            let n_head = if g.ends_with("attn_q.weight") { *heads } else { *kv_heads };
            return unpermute_rows(&raw, n_head).map_err(|e| match e {
                ModelError::Unsupported { what, .. } => ModelError::Unsupported { path: display.clone(), what },
                e => e,
            });
        }
        Ok(raw)
    }

    /// Builds a linear layer; `shape` is the HF (out, in) shape.
    pub fn linear(&mut self, prefix: &str, shape: (usize, usize), bias: bool, mode: WeightsMode) -> Result<Linear, ModelError> {
        let wname = format!("{prefix}.weight");
        let weight = self.linear_weight(&wname, shape, mode)?;
        let bias = if bias { Some(self.tensor(&format!("{prefix}.bias"), &[shape.0])?) } else { None };
        Ok(Linear { weight, bias, out_features: shape.0 })
    }

    fn linear_weight(&mut self, name: &str, shape: (usize, usize), mode: WeightsMode) -> Result<LinearWeight, ModelError> {
        let (out, inp) = shape;
        let is_gguf = matches!(self, WeightSource::Gguf { .. });
        if mode == WeightsMode::F32 || (!is_gguf && mode == WeightsMode::Native) {
            return Ok(LinearWeight::F32(self.tensor(name, &[out, inp])?));
        }
        let qgemm = |r: Result<QMatrix, QGemmError>, display: String| match r {
            Ok(m) => Ok(LinearWeight::Blocks(QLinearOp(Arc::new(m)))),
            Err(QGemmError::Candle(e)) => Err(ModelError::Candle(e)),
            Err(e) => Err(ModelError::Corrupt { path: display, what: e.to_string() }),
        };
        if mode == WeightsMode::Q8 && !is_gguf {
            let w = self.tensor(name, &[out, inp])?.flatten_all()?.to_vec1::<f32>()?;
            return qgemm(QMatrix::quantize(name, &w, out, inp), self.display());
        }
        if inp % 32 != 0 {
            // Q8_0 blocks are 32 wide along the input dimension.
            return Ok(LinearWeight::F32(self.tensor(name, &[out, inp])?));
        }
        // Only GGUF sources get here (safetensors returned above), read as stored.
        let raw = self.raw(name)?;
        check_shape(&self.display(), name, &raw.dims, &[out, inp])?;
        match (mode, raw.dtype) {
            (_, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) => Ok(LinearWeight::F32(raw.qtensor()?.dequantize(&Device::Cpu)?)),
            (WeightsMode::Q8, _) | (WeightsMode::Native, GgmlDType::Q8_0) => {
                qgemm(QMatrix::from_ggml(name, raw.bytes(), raw.dtype, out, inp), self.display())
            }
            (WeightsMode::Native, GgmlDType::Q4_1) => qgemm(QMatrix::from_q4_1_bytes(name, raw.bytes(), out, inp), self.display()),
            _ => Ok(LinearWeight::Quant(QMatMul::from_qtensor(raw.qtensor()?)?)),
        }
    }
}

pub(crate) fn check_shape(path: &str, name: &str, got: &[usize], want: &[usize]) -> Result<(), ModelError> {
    if !want.is_empty() && got != want {
        return Err(ModelError::ShapeMismatch {
            path: path.to_string(),
            name: name.to_string(),
            expected: want.to_vec(),
            got: got.to_vec(),
        });
    }
    Ok(())
}

/// HF tensor name -> GGUF tensor name.
pub fn gguf_name(hf: &str) -> Option<String> {
    let fixed: HashMap<&str, &str> = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ]
    .into_iter()
    .collect();
    if let Some(g) = fixed.get(hf) {
        return Some(g.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (idx, rest) = rest.split_once('.')?;
    let leaf = match rest {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.q_norm.weight" => "attn_q_norm.weight",
        "self_attn.k_norm.weight" => "attn_k_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{idx}.{leaf}"))
}

/// llama.cpp stores Q and K rows permuted for interleaved RoPE: within each head of dim d,
/// GGUF row 2i+j holds HF row j·d/2 + i. Rows are whole quantized blocks (blocks run along the
/// input dimension), so the permutation moves raw bytes and loses nothing.
fn unpermute_rows(raw: &RawTensor, n_head: usize) -> Result<RawTensor, ModelError> {
    let (out, inp) = match raw.dims[..] {
        [out, inp] => (out, inp),
        _ => return Err(ModelError::Unsupported { path: String::new(), what: format!("cannot undo the Q/K permutation of a tensor of shape {:?}", raw.dims) }),
    };
    let dtype = raw.dtype;
    let row_bytes = inp / dtype.block_size() * dtype.type_size();
    let data = raw.bytes();
    if n_head == 0 || out % n_head != 0 || (out / n_head) % 2 != 0 || data.len() != out * row_bytes {
        return Err(ModelError::Unsupported {
            path: String::new(),
            what: format!("cannot undo the Q/K permutation of a {out}x{inp} tensor with {n_head} heads"),
        });
    }
    let d = out / n_head;
    let mut dst = memmap2::MmapMut::map_anon(data.len().max(1))
        .map_err(|e| ModelError::Unsupported { path: String::new(), what: format!("reserving {} bytes: {e}", data.len()) })?;
    for h in 0..n_head {
        for i in 0..d / 2 {
            for j in 0..2 {
                let src_row = h * d + 2 * i + j;
                let dst_row = h * d + j * (d / 2) + i;
                dst[dst_row * row_bytes..(dst_row + 1) * row_bytes]
                    .copy_from_slice(&data[src_row * row_bytes..(src_row + 1) * row_bytes]);
            }
        }
    }
    Ok(RawTensor { buf: dst, len: data.len(), dtype, dims: raw.dims.clone() })
}

/// A GGUF tensor's bytes as stored, in an anonymous mapping of their own rather than the malloc
/// heap. The loader reads each tensor, converts it and drops the bytes. As heap blocks, freed
/// between the converted weights that stay, glibc kept them resident (its mmap threshold rises
/// to the size of the first large block freed, so later ones come from the heap): about 30 MiB
/// of SmolLM2's q8 load. A mapping of its own goes back to the system when dropped.
pub struct RawTensor {
    buf: memmap2::MmapMut,
    len: usize,
    pub dtype: GgmlDType,
    /// candle's order: (out, in) for a weight.
    pub dims: Vec<usize>,
}

impl RawTensor {
    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// The same tensor as a candle QTensor (a copy of the bytes).
    pub fn qtensor(&self) -> candle_core::Result<QTensor> {
        candle_core::quantized::ggml_file::qtensor_from_ggml(self.dtype, self.bytes(), self.dims.clone(), &Device::Cpu)
    }
}
