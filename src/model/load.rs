//! Model loading shared by every command: `smollm2` means the embedded default (fetched on
//! first use); any other value is a path to an HF directory or a GGUF file.

use std::path::{Path, PathBuf};

use super::{open, ModelError, ModelLocation, Target, TargetConfig, WeightsMode};
use crate::assets::{self, AssetError};
use crate::nn::Backend;
use crate::tokenizer::{Tokenizer, TokenizerError};

/// The name that selects the embedded default target.
pub const DEFAULT_MODEL: &str = "smollm2";

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Asset(#[from] AssetError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{path}: tokenizer: {source}")]
    Tokenizer { path: String, source: TokenizerError },
    #[error("{path}: the tokenizer has {tokenizer} tokens but the model's vocabulary has {model}; they do not belong together")]
    VocabMismatch { path: String, tokenizer: usize, model: usize },
}

/// A target with its tokenizer.
pub struct LoadedModel {
    pub target: Target,
    pub tokenizer: Tokenizer,
    /// `smollm2` or the path as given.
    pub name: String,
    pub location: ModelLocation,
}

impl LoadedModel {
    /// The ids that end a generation: see [`stop_token_ids`].
    pub fn eos_token_ids(&self) -> Vec<u32> {
        stop_token_ids(&self.target.config().eos_token_ids, &self.tokenizer)
    }
}

/// The model config's EOS ids, then the tokenizer's that are not among them: a chat model may
/// name its end-of-turn token (`<|im_end|>`) only in its tokenizer config. The one place that
/// merges the two; generation, evaluation and regeneration all stop at these.
pub fn stop_token_ids(config_eos: &[u32], tok: &Tokenizer) -> Vec<u32> {
    let mut eos = config_eos.to_vec();
    for &id in tok.eos_token_ids() {
        if !eos.contains(&id) {
            eos.push(id);
        }
    }
    eos
}

/// Resolves `spec` to a location, fetching the embedded default if needed.
pub fn resolve(spec: &str) -> Result<ModelLocation, LoadError> {
    if spec == DEFAULT_MODEL {
        let path = assets::file(&assets::SMOLLM2, assets::SMOLLM2_GGUF)?;
        return Ok(ModelLocation::Gguf(path));
    }
    Ok(ModelLocation::from_path(Path::new(spec))?)
}

/// Loads `spec` for the default backend (the CPU with its kernels).
pub fn load_model(spec: &str, mode: WeightsMode) -> Result<LoadedModel, LoadError> {
    load_model_on(spec, mode, &Backend::default())
}

/// Loads `spec` (`smollm2` or a path) with its tokenizer for `backend`: the device and kernel
/// path every later stage (drafter, features, training) follows through [`Target::backend`].
pub fn load_model_on(spec: &str, mode: WeightsMode, backend: &Backend) -> Result<LoadedModel, LoadError> {
    let location = resolve(spec)?;
    let path = location.path().display().to_string();
    let (mut src, cfg, gguf) = open(&location)?;
    let tokenizer = match (&gguf, &location) {
        (Some(content), _) => Tokenizer::from_gguf(content),
        (None, ModelLocation::HfDir(dir)) => Tokenizer::from_hf_dir(dir),
        (None, ModelLocation::Gguf(p)) => Tokenizer::from_hf_dir(p.parent().map(PathBuf::from).unwrap_or_default()),
    }
    .map_err(|source| LoadError::Tokenizer { path: path.clone(), source })?;
    // A tokenizer may have fewer tokens than the padded embedding matrix, never more.
    if tokenizer.vocab_size() > cfg.vocab_size {
        return Err(LoadError::VocabMismatch { path, tokenizer: tokenizer.vocab_size(), model: cfg.vocab_size });
    }
    let target = Target::load_on(&mut src, cfg, mode, backend)?;
    Ok(LoadedModel { target, tokenizer, name: spec.to_string(), location })
}

impl LoadedModel {
    /// A quick identity of the model's files: see [`fingerprint`].
    pub fn fingerprint(&self) -> Result<String, ModelError> {
        fingerprint(&self.location)
    }
}

/// A model's tokenizer and config, without its weights: enough to tokenize data for it.
#[derive(Debug)]
pub struct ModelInfo {
    pub tokenizer: Tokenizer,
    pub config: TargetConfig,
    /// `smollm2` or the path as given.
    pub name: String,
    pub location: ModelLocation,
}

/// The tokenizer and config of `spec` (`smollm2` or a path), reading no weights.
pub fn load_info(spec: &str) -> Result<ModelInfo, LoadError> {
    let location = resolve(spec)?;
    let path = location.path().display().to_string();
    let (_, config, gguf) = open(&location)?;
    let tokenizer = match (&gguf, &location) {
        (Some(content), _) => Tokenizer::from_gguf(content),
        (None, ModelLocation::HfDir(dir)) => Tokenizer::from_hf_dir(dir),
        (None, ModelLocation::Gguf(p)) => Tokenizer::from_hf_dir(p.parent().map(PathBuf::from).unwrap_or_default()),
    }
    .map_err(|source| LoadError::Tokenizer { path: path.clone(), source })?;
    Ok(ModelInfo { tokenizer, config, name: spec.to_string(), location })
}

/// A cheap identity of a model: SHA-256 over, for each of its files (the GGUF, or config.json,
/// generation_config.json, tokenizer*.json and every *.safetensors, in name order), its name,
/// length, first and last MiB. It tells two checkpoints apart in practice without reading
/// gigabytes; it is not a content hash.
pub fn fingerprint(location: &ModelLocation) -> Result<String, ModelError> {
    use std::io::{Read, Seek, SeekFrom};

    use sha2::{Digest, Sha256};

    let files: Vec<PathBuf> = match location {
        ModelLocation::Gguf(p) => vec![p.clone()],
        ModelLocation::HfDir(dir) => {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| ModelError::io(dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                    p.extension().is_some_and(|x| x == "safetensors")
                        || ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"].contains(&name.as_str())
                })
                .collect();
            files.sort();
            files
        }
    };
    const EDGE: u64 = 1 << 20;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; EDGE as usize];
    for path in files {
        let mut f = std::fs::File::open(&path).map_err(|e| ModelError::io(&path, e))?;
        let len = f.metadata().map_err(|e| ModelError::io(&path, e))?.len();
        h.update(path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default().as_bytes());
        h.update(len.to_le_bytes());
        let head = len.min(EDGE) as usize;
        f.read_exact(&mut buf[..head]).map_err(|e| ModelError::io(&path, e))?;
        h.update(&buf[..head]);
        if len > EDGE {
            let tail_start = len.saturating_sub(EDGE).max(EDGE);
            let tail = (len - tail_start) as usize;
            f.seek(SeekFrom::Start(tail_start)).map_err(|e| ModelError::io(&path, e))?;
            f.read_exact(&mut buf[..tail]).map_err(|e| ModelError::io(&path, e))?;
            h.update(&buf[..tail]);
        }
    }
    let digest = h.finalize();
    Ok(digest.iter().take(16).map(|b| format!("{b:02x}")).collect())
}
