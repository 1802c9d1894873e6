//! DFlash checkpoints in the z-lab / SpecForge format, and new drafters.
//!
//! A checkpoint directory holds `config.json` ([`DFlashConfig::to_json`]) and `model.safetensors`
//! with exactly the tensors of [`DFlashConfig::tensor_shapes`] (DESIGN §2 names, no prefix, no
//! embedding, no head). Writes are atomic (`<name>.tmp`, fsync, rename); reads accept f32, bf16
//! and f16 tensors and convert them to f32. Loading validates the drafter against the target it
//! will run with, before any generation.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::dflash::{DFlashConfig, DFlashDrafter, DFlashInitConfig, INIT_STD};
use super::vocab::{DraftVocab, DEFAULT_DRAFT_VOCAB};
use super::DrafterError;
use crate::model::TargetConfig;

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// [`crate::util::fs::write_atomic_with`] with this module's error.
pub(crate) fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> std::io::Result<()>) -> Result<(), DrafterError> {
    crate::util::fs::write_atomic_with(path, write).map_err(|e| DrafterError::io(path, e))
}

impl DFlashDrafter {
    /// A new, untrained drafter for `target` (HF-like init: every Linear ~ N(0, 0.02²), every
    /// RMSNorm weight 1), reproducible from `seed`.
    pub fn init_random(target: &TargetConfig, init: &DFlashInitConfig, seed: u64) -> Result<Self, DrafterError> {
        let config = DFlashConfig::for_target(target, init)?;
        Self::init_random_from_config(config, seed)
    }

    /// Shorthand for [`Self::init_random`] with the target's widths and the default
    /// target_layer_ids.
    pub fn init_random_for(
        target: &TargetConfig,
        layers: usize,
        block_size: usize,
        mask_token_id: u32,
        seed: u64,
    ) -> Result<Self, DrafterError> {
        Self::init_random(target, &DFlashInitConfig::new(layers, block_size, mask_token_id), seed)
    }

    /// A new drafter with the given config.
    pub fn init_random_from_config(config: DFlashConfig, seed: u64) -> Result<Self, DrafterError> {
        config.validate("drafter config")?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut tensors = HashMap::new();
        for (name, shape) in config.tensor_shapes() {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = if shape.len() == 1 {
                vec![1.0; n]
            } else {
                (0..n).map(|_| (standard_normal(&mut rng) * INIT_STD) as f32).collect()
            };
            tensors.insert(name, Tensor::from_vec(values, shape, &Device::Cpu)?);
        }
        Self::from_tensors(config, tensors)
    }

    /// Writes `dir/config.json` and `dir/model.safetensors` (f32), each atomically.
    pub fn save(&self, dir: &Path) -> Result<(), DrafterError> {
        write_checkpoint(dir, &self.named_vars(), &self.config().to_json())?;
        match self.draft_vocab() {
            Some(v) => v.write(dir),
            None => Ok(()),
        }
    }

    /// Reads a checkpoint and checks it against `target`: hidden size, vocabulary, tapped layers
    /// in range, mask token in the vocabulary, and every tensor's name and shape (`fc` input =
    /// n_taps·H).
    pub fn load(dir: &Path, target: &TargetConfig) -> Result<Self, DrafterError> {
        let config = DFlashConfig::read(dir)?;
        config.check_target(target)?;
        let tensors = read_weights(dir, &config.tensor_shapes())?;
        let mut d = Self::from_tensors(config, tensors)?;
        d.set_draft_vocab(DraftVocab::read(dir, target.vocab_size)?.map(std::sync::Arc::new), DEFAULT_DRAFT_VOCAB);
        Ok(d)
    }
}

/// Writes `dir/model.safetensors` (the vars' values, f32) and `dir/config.json`, each atomically.
pub(crate) fn write_checkpoint(dir: &Path, vars: &[(String, candle_core::Var)], config_json: &str) -> Result<(), DrafterError> {
    std::fs::create_dir_all(dir).map_err(|e| DrafterError::io(dir, e))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, var) in vars {
        tensors.insert(name.clone(), var.as_tensor().detach().contiguous()?);
    }
    write_atomically(&dir.join(WEIGHTS_FILE), |tmp| {
        candle_core::safetensors::save(&tensors, tmp).map_err(std::io::Error::other)
    })?;
    write_atomically(&dir.join(CONFIG_FILE), |tmp| {
        let mut f = std::fs::File::create(tmp)?;
        f.write_all(config_json.as_bytes())?;
        f.write_all(b"\n")
    })?;
    Ok(())
}

/// Reads `dir/model.safetensors`, which must hold exactly the `expected` (name, shape) tensors
/// in f32, bf16 or f16; returns them as f32.
///
/// The file is read one tensor at a time at its offset (the header parsed and validated by the
/// `safetensors` crate), so loading never holds the file's bytes and the tensors at once: mapping
/// the whole file, as candle's loader does, kept its 31 MB resident beside the tensors made from
/// it and set the peak memory of a `generate --drafter` process.
pub(crate) fn read_weights(dir: &Path, expected: &[(String, Vec<usize>)]) -> Result<HashMap<String, Tensor>, DrafterError> {
    use std::io::{Read, Seek, SeekFrom};
    let path = dir.join(WEIGHTS_FILE);
    let p = path.display().to_string();
    if !path.is_file() {
        return Err(DrafterError::io(&path, std::io::Error::new(std::io::ErrorKind::NotFound, "no model.safetensors in the drafter directory")));
    }
    let bad = |what: String| DrafterError::Json { path: p.clone(), what: format!("not a readable safetensors file: {what}") };
    let mut file = std::fs::File::open(&path).map_err(|e| DrafterError::io(&path, e))?;
    let mut read_at = |buf: &mut [u8], at: u64| file.seek(SeekFrom::Start(at)).and_then(|_| file.read_exact(buf));
    let file_len = std::fs::metadata(&path).map_err(|e| DrafterError::io(&path, e))?.len();
    let mut len = [0u8; 8];
    read_at(&mut len, 0).map_err(|e| bad(format!("reading the header length: {e}")))?;
    let n = u64::from_le_bytes(len);
    // The format's own limit on the header (100 MB), checked before allocating it.
    if n > 100_000_000 || 8 + n > file_len {
        return Err(bad(format!("a header of {n} bytes in a file of {file_len}")));
    }
    let mut header = vec![0u8; n as usize];
    read_at(&mut header, 8).map_err(|e| bad(format!("reading the header: {e}")))?;
    let meta: safetensors::tensor::Metadata = serde_json::from_slice(&header).map_err(|e| bad(format!("its header: {e}")))?;
    let data_start = 8 + n;
    if data_start + meta.data_len() as u64 != file_len {
        return Err(bad(format!("the header describes {} bytes of data but the file has {}", meta.data_len(), file_len - data_start)));
    }
    let infos = meta.tensors();
    for name in infos.keys() {
        if !expected.iter().any(|(n, _)| n == name) {
            return Err(DrafterError::UnexpectedTensor { path: p.clone(), name: name.clone() });
        }
    }
    let mut tensors = HashMap::new();
    for (name, shape) in expected {
        let info = infos.get(name).ok_or_else(|| DrafterError::MissingTensor { path: p.clone(), name: name.clone() })?;
        let dtype = match info.dtype {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F16 => DType::F16,
            other => return Err(DrafterError::UnsupportedDtype { path: p.clone(), name: name.clone(), dtype: format!("{other:?}") }),
        };
        if info.shape != *shape {
            return Err(DrafterError::ShapeMismatch { path: p.clone(), name: name.clone(), expected: shape.clone(), got: info.shape.clone() });
        }
        let (s, e) = info.data_offsets;
        let mut bytes = vec![0u8; e - s];
        read_at(&mut bytes, data_start + s as u64).map_err(|err| bad(format!("reading tensor {name}: {err}")))?;
        let t = Tensor::from_raw_buffer(&bytes, dtype, shape, &Device::Cpu)?;
        tensors.insert(name.clone(), t.to_dtype(DType::F32)?);
    }
    Ok(tensors)
}

/// One N(0, 1) draw (Box–Muller; rand 0.8 has no normal distribution without rand_distr).
pub(crate) fn standard_normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = 1.0 - rng.gen::<f64>(); // (0, 1]
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}
