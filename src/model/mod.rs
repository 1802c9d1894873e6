//! The target LLM runtime: config, weights, the decoder with hidden-state taps, and the
//! rollback-able KV cache.

pub mod attention;
pub mod config;
pub mod embedding;
mod generic;
pub(crate) mod host_ops;
pub mod kv_cache;
pub mod load;
pub mod qgemm;
pub mod target;
pub mod weights;

use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;

pub use config::{Family, TargetConfig};
pub use kv_cache::KvCache;
pub use load::{load_model, load_model_on, stop_token_ids, LoadError, LoadedModel, DEFAULT_MODEL};
pub use target::{BatchItem, ForwardOutput, Logits, Target};
pub use weights::{WeightSource, WeightsMode};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: {what}")]
    MissingFile { path: String, what: String },
    #[error("{path}: tensor {name} is missing (is this a complete checkpoint of a supported family?)")]
    MissingTensor { path: String, name: String },
    #[error("{path}: tensor {name} has shape {got:?}, expected {expected:?} from config.json")]
    ShapeMismatch { path: String, name: String, expected: Vec<usize>, got: Vec<usize> },
    #[error("{path}: unsupported {what}")]
    Unsupported { path: String, what: String },
    #[error("{path}: invalid config: {what}")]
    InvalidConfig { path: String, what: String },
    #[error("{path}: {what}")]
    Corrupt { path: String, what: String },
    #[error("the input has no tokens")]
    EmptyInput,
    #[error("token id {token} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { token: u32, vocab: usize },
    #[error("layer {layer} does not exist: the model has {layers} layers (0..{layers})")]
    LayerOutOfRange { layer: usize, layers: usize },
    #[error("the sequence needs {needed} positions but the model's context is {max}; use a shorter prompt or fewer new tokens")]
    ContextOverflow { needed: usize, max: usize },
    #[error("internal state was poisoned by an earlier panic")]
    Poisoned,
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        ModelError::Io { path: path.display().to_string(), source }
    }
}

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelLocation {
    /// An HF directory: config.json + *.safetensors (+ tokenizer.json).
    HfDir(PathBuf),
    /// A GGUF file.
    Gguf(PathBuf),
}

impl ModelLocation {
    pub fn from_path(path: &Path) -> Result<Self, ModelError> {
        if path.is_dir() {
            if !path.join("config.json").is_file() {
                return Err(ModelError::MissingFile {
                    path: path.display().to_string(),
                    what: "no config.json: expected an HF model directory (config.json + *.safetensors + tokenizer.json) or a .gguf file".into(),
                });
            }
            Ok(ModelLocation::HfDir(path.to_path_buf()))
        } else if path.is_file() {
            Ok(ModelLocation::Gguf(path.to_path_buf()))
        } else {
            Err(ModelError::MissingFile {
                path: path.display().to_string(),
                what: "no such file or directory (pass `smollm2` for the embedded default, an HF model directory, or a .gguf file)".into(),
            })
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            ModelLocation::HfDir(p) | ModelLocation::Gguf(p) => p,
        }
    }
}

/// Opens the weights and reads the config of a model at `loc`. The GGUF metadata is returned
/// too, since the tokenizer is built from it.
pub fn open(loc: &ModelLocation) -> Result<(WeightSource, TargetConfig, Option<gguf_file::Content>), ModelError> {
    match loc {
        ModelLocation::HfDir(dir) => {
            let cfg_path = dir.join("config.json");
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
            let hf: config::HfConfig = serde_json::from_str(&text).map_err(|e| ModelError::InvalidConfig {
                path: cfg_path.display().to_string(),
                what: e.to_string(),
            })?;
            let mut cfg = hf.resolve(&cfg_path.display().to_string())?;
            // Chat models often keep their stop tokens only in generation_config.json.
            let gen_path = dir.join("generation_config.json");
            if let Ok(text) = std::fs::read_to_string(&gen_path) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                    for id in config::token_ids(&v.get("eos_token_id").cloned()) {
                        if !cfg.eos_token_ids.contains(&id) {
                            cfg.eos_token_ids.push(id);
                        }
                    }
                    if cfg.bos_token_id.is_none() {
                        cfg.bos_token_id = config::token_ids(&v.get("bos_token_id").cloned()).first().copied();
                    }
                }
            }
            Ok((WeightSource::hf(dir)?, cfg, None))
        }
        ModelLocation::Gguf(path) => {
            let p = path.display().to_string();
            let mut file = File::open(path).map_err(|e| ModelError::io(path, e))?;
            let content = gguf_file::Content::read(&mut file).map_err(|e| ModelError::Corrupt {
                path: p.clone(),
                what: format!("not a readable GGUF file ({e}); if it is truncated, delete it and fetch it again"),
            })?;
            // Every tensor must lie inside the file: a truncated download fails here, at load.
            let len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
            for (name, info) in &content.tensor_infos {
                let bytes = info.shape.elem_count() / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
                let end = content.tensor_data_offset + info.offset + bytes as u64;
                if end > len {
                    return Err(ModelError::Corrupt {
                        path: p.clone(),
                        what: format!("tensor {name} ends at byte {end} but the file has {len} bytes: the file is truncated; delete it and fetch it again"),
                    });
                }
            }
            let cfg = gguf_config(&content, &p)?;
            let permute_qk = cfg.family == Family::Llama;
            let (heads, kv_heads) = (cfg.num_attention_heads, cfg.num_key_value_heads);
            let src = WeightSource::Gguf { path: path.clone(), content: gguf_clone_meta(&content), file, permute_qk, heads, kv_heads };
            Ok((src, cfg, Some(content)))
        }
    }
}

/// The weight source keeps its own copy of the tensor index; the metadata copy goes to the
/// tokenizer builder.
fn gguf_clone_meta(c: &gguf_file::Content) -> gguf_file::Content {
    gguf_file::Content {
        magic: c.magic,
        metadata: c.metadata.clone(),
        tensor_infos: c
            .tensor_infos
            .iter()
            .map(|(k, v)| (k.clone(), gguf_file::TensorInfo { ggml_dtype: v.ggml_dtype, shape: v.shape.clone(), offset: v.offset }))
            .collect(),
        tensor_data_offset: c.tensor_data_offset,
    }
}

fn gguf_config(c: &gguf_file::Content, path: &str) -> Result<TargetConfig, ModelError> {
    let get = |k: &str| c.metadata.get(k);
    let arch = get("general.architecture").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
    let family = Family::from_model_type(&arch).ok_or_else(|| ModelError::Unsupported {
        path: path.to_string(),
        what: format!("GGUF architecture {arch:?}; supported: llama, qwen2, qwen3"),
    })?;
    let req_u = |k: &str| -> Result<usize, ModelError> {
        let key = format!("{arch}.{k}");
        get(&key)
            .and_then(|v| v.to_u64().ok().or_else(|| v.to_u32().ok().map(|x| x as u64)))
            .map(|x| x as usize)
            .ok_or_else(|| ModelError::InvalidConfig { path: path.to_string(), what: format!("GGUF metadata key {key} is missing") })
    };
    let opt_f = |k: &str| get(&format!("{arch}.{k}")).and_then(|v| v.to_f32().ok());
    let hidden = req_u("embedding_length")?;
    let heads = req_u("attention.head_count")?;
    let kv_heads = req_u("attention.head_count_kv").unwrap_or(heads);
    let head_dim = req_u("attention.key_length").unwrap_or(hidden / heads.max(1));
    let embd = c.tensor_infos.get("token_embd.weight").ok_or_else(|| ModelError::MissingTensor {
        path: path.to_string(),
        name: "token_embd.weight".into(),
    })?;
    let vocab = embd.shape.dims().first().copied().unwrap_or(0);
    let tie = !c.tensor_infos.contains_key("output.weight");
    let eos = get("tokenizer.ggml.eos_token_id").and_then(|v| v.to_u32().ok());
    let bos = get("tokenizer.ggml.bos_token_id").and_then(|v| v.to_u32().ok());
    let cfg = TargetConfig {
        family,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: req_u("feed_forward_length")?,
        num_hidden_layers: req_u("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rope_theta: opt_f("rope.freq_base").unwrap_or(10_000.0) as f64,
        rms_norm_eps: opt_f("attention.layer_norm_rms_epsilon").unwrap_or(1e-6) as f64,
        max_position_embeddings: req_u("context_length").unwrap_or(4096),
        tie_word_embeddings: tie,
        attention_bias: c.tensor_infos.contains_key("blk.0.attn_q.bias"),
        qk_norm: c.tensor_infos.contains_key("blk.0.attn_q_norm.weight"),
        bos_token_id: bos,
        eos_token_ids: eos.into_iter().collect(),
    };
    cfg.validate(path)?;
    Ok(cfg)
}

/// Loads the weights of a model (no tokenizer) for the default backend (the CPU kernels).
pub fn load_target(loc: &ModelLocation, mode: WeightsMode) -> Result<Target, ModelError> {
    load_target_on(loc, mode, &crate::nn::Backend::default())
}

/// Loads the weights of a model (no tokenizer) for `backend`: see [`Target::load_on`].
pub fn load_target_on(loc: &ModelLocation, mode: WeightsMode, backend: &crate::nn::Backend) -> Result<Target, ModelError> {
    let (mut src, cfg, _) = open(loc)?;
    Target::load_on(&mut src, cfg, mode, backend)
}
