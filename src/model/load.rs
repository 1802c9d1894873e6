//! Model loading shared by every command: `smollm2` means the embedded default (fetched on
//! first use); any other value is a path to an HF directory or a GGUF file.

use std::path::{Path, PathBuf};

use super::{open, ModelError, ModelLocation, Target, WeightsMode};
use crate::assets::{self, AssetError};
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

/// Resolves `spec` to a location, fetching the embedded default if needed.
pub fn resolve(spec: &str) -> Result<ModelLocation, LoadError> {
    if spec == DEFAULT_MODEL {
        let path = assets::file(&assets::SMOLLM2, assets::SMOLLM2_GGUF)?;
        return Ok(ModelLocation::Gguf(path));
    }
    Ok(ModelLocation::from_path(Path::new(spec))?)
}

pub fn load_model(spec: &str, mode: WeightsMode) -> Result<LoadedModel, LoadError> {
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
    let target = Target::load(&mut src, cfg, mode)?;
    Ok(LoadedModel { target, tokenizer, name: spec.to_string(), location })
}
