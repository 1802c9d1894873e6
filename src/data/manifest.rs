//! `manifest.json`: what a prepared dataset was made from and with (model, tokenizer, settings,
//! splits, shards, features), written last, so that a dataset without one is unfinished.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::shards::*;
use crate::tokenizer::Tokenizer;


pub const MANIFEST_FILE: &str = "manifest.json";
pub const MANIFEST_VERSION: u32 = 1;

/// What a prepared dataset was made from and with: written last into the output directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub created_by: String,
    pub model: ModelIdentity,
    pub tokenizer: TokenizerInfo,
    pub settings: PrepareSettings,
    /// SHA-256 (hex) of the canonical JSON of `{model, tokenizer, settings}`: the same data made
    /// the same way has the same hash; the trainer compares it to detect a stale dataset.
    pub settings_hash: String,
    pub source: SourceReport,
    /// Selected conversations that yielded no sequence, by reason ([`SequenceError::reason`],
    /// `prompt_exceeds_max_len` from regeneration). Malformed records of the file are counted in
    /// `source.skipped_records`.
    pub skipped: BTreeMap<String, usize>,
    pub splits: BTreeMap<Split, SplitInfo>,
    pub features: Option<FeatureInfo>,
}

/// The model a dataset belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelIdentity {
    /// `smollm2` or the checkpoint's file/directory name.
    pub name: String,
    pub location: String,
    /// See [`crate::model::load::fingerprint`].
    pub fingerprint: String,
    pub family: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizerInfo {
    pub vocab_size: usize,
    pub eos_token_ids: Vec<u32>,
}

/// Everything that decides the content of a prepared dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrepareSettings {
    /// `sharegpt` or the data file's path.
    pub data: String,
    pub max_conversations: Option<usize>,
    pub max_len: usize,
    /// Exchanges kept per conversation (None: all).
    pub max_turns: Option<usize>,
    pub eval_fraction: f64,
    pub seed: u64,
    pub regenerate: Option<crate::data::regenerate::RegenerateSettings>,
    pub features: Option<FeatureSettings>,
    /// Conversations chosen by topic (`prepare --topics`); None: every topic, in file order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topics: Option<crate::data::topic::TopicFilter>,
}

/// Which target taps the feature cache stores.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureSettings {
    pub target_layer_ids: Vec<usize>,
    pub dtype: FeatureDtype,
    /// The weights the target ran with (features from Q8 and f32 weights differ slightly).
    pub weights: crate::model::WeightsMode,
    /// Also store the top-k of the target's next-token logits at every position (distillation
    /// targets); None: features only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft_labels: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeatureDtype {
    F16,
    Bf16,
}

crate::named_enum!(FeatureDtype, "feature dtype", ["f16", "bf16"]);

impl FeatureDtype {
    pub(crate) fn shard_dtype(self) -> ShardDtype {
        match self {
            FeatureDtype::F16 => ShardDtype::F16,
            FeatureDtype::Bf16 => ShardDtype::BF16,
        }
    }
}

/// Where the conversations came from and what the loader and selection dropped.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SourceReport {
    pub path: String,
    /// Usable conversations in the file.
    pub loaded: usize,
    /// Records of the whole file the loader skipped, by reason (`sharegpt::SkipReason`).
    pub skipped_records: BTreeMap<String, usize>,
    pub truncated_tail: bool,
    /// Conversations of the benchmark hold-out (`sharegpt::is_heldout`), never used.
    pub heldout_excluded: usize,
    /// Conversations passed over for their topic (`prepare --topics`).
    #[serde(default)]
    pub off_topic: usize,
    pub selected: usize,
    pub share_banners_dropped: usize,
    pub regenerated_new_tokens: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SplitInfo {
    pub sequences: usize,
    pub tokens: usize,
    pub loss_tokens: usize,
    pub shards: Vec<ShardInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    pub file: String,
    pub sequences: usize,
    pub tokens: usize,
    pub bytes: u64,
}

/// The feature cache: shard `k` of a split holds the features of the sequences of token shard `k`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureInfo {
    pub target_layer_ids: Vec<usize>,
    pub dtype: FeatureDtype,
    pub weights: crate::model::WeightsMode,
    /// n_layers · hidden_size.
    pub dim: usize,
    /// k of the stored top-k next-token logits (`soft_ids`, `soft_logits`); None: not stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft_labels: Option<usize>,
    pub shards: BTreeMap<Split, Vec<ShardInfo>>,
}

impl ModelIdentity {
    pub fn of(model: &crate::model::load::LoadedModel) -> Result<Self, crate::model::ModelError> {
        Self::from_parts(&model.name, &model.location, model.target.config())
    }

    pub fn from_parts(
        name: &str,
        location: &crate::model::ModelLocation,
        cfg: &crate::model::TargetConfig,
    ) -> Result<Self, crate::model::ModelError> {
        Ok(ModelIdentity {
            name: name.to_string(),
            location: location.path().display().to_string(),
            fingerprint: crate::model::load::fingerprint(location)?,
            family: format!("{:?}", cfg.family).to_lowercase(),
            vocab_size: cfg.vocab_size,
            hidden_size: cfg.hidden_size,
            num_hidden_layers: cfg.num_hidden_layers,
        })
    }
}

impl TokenizerInfo {
    pub fn of(tok: &Tokenizer) -> Self {
        TokenizerInfo { vocab_size: tok.vocab_size(), eos_token_ids: tok.eos_token_ids().to_vec() }
    }
}

/// SHA-256 (hex) of the canonical JSON of what decides a dataset's content.
pub fn settings_hash(model: &ModelIdentity, tokenizer: &TokenizerInfo, settings: &PrepareSettings) -> String {
    // The location is left out: the same checkpoint moved elsewhere makes the same data.
    let mut model = serde_json::to_value(model).unwrap_or_default();
    if let Some(m) = model.as_object_mut() {
        m.remove("location");
    }
    let value = serde_json::json!({"model": model, "tokenizer": tokenizer, "settings": settings});
    // serde_json's maps are sorted (no preserve_order feature here), so this text is canonical.
    let digest = Sha256::digest(value.to_string().as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

impl Manifest {
    pub fn read(dir: &Path) -> Result<Manifest, DataError> {
        let path = dir.join(MANIFEST_FILE);
        if !path.is_file() {
            return Err(DataError::NoManifest { path: dir.to_path_buf() });
        }
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        let m: Manifest =
            serde_json::from_str(&text).map_err(|e| DataError::BadManifest { path: path.clone(), what: e.to_string() })?;
        if m.format != MANIFEST_FORMAT || m.version != MANIFEST_VERSION {
            return Err(DataError::BadManifest {
                path,
                what: format!(
                    "format {} v{}; this build reads {MANIFEST_FORMAT} v{MANIFEST_VERSION}: prepare the data again",
                    m.format, m.version
                ),
            });
        }
        let computed = settings_hash(&m.model, &m.tokenizer, &m.settings);
        if computed != m.settings_hash {
            return Err(DataError::Stale {
                path,
                what: format!("settings_hash {} does not match its settings ({computed})", m.settings_hash),
            });
        }
        Ok(m)
    }

    pub fn write(&self, dir: &Path) -> Result<(), DataError> {
        let text = serde_json::to_string_pretty(self).map_err(|e| DataError::BadManifest {
            path: dir.join(MANIFEST_FILE),
            what: e.to_string(),
        })?;
        write_atomic(&dir.join(MANIFEST_FILE), text.as_bytes())
    }

    /// Checks that the dataset was prepared for `model` (same weights and shapes).
    pub fn check_model(&self, dir: &Path, model: &ModelIdentity) -> Result<(), DataError> {
        let m = &self.model;
        let mut diffs = Vec::new();
        if m.fingerprint != model.fingerprint {
            diffs.push(format!("weights fingerprint {} (given {})", m.fingerprint, model.fingerprint));
        }
        if (m.vocab_size, m.hidden_size, m.num_hidden_layers) != (model.vocab_size, model.hidden_size, model.num_hidden_layers) {
            diffs.push(format!(
                "vocab {} / hidden {} / {} layers (given {} / {} / {})",
                m.vocab_size, m.hidden_size, m.num_hidden_layers, model.vocab_size, model.hidden_size, model.num_hidden_layers
            ));
        }
        if diffs.is_empty() {
            Ok(())
        } else {
            Err(DataError::ModelMismatch {
                path: dir.to_path_buf(),
                what: format!("model `{}` with {}", m.name, diffs.join(", ")),
            })
        }
    }
}

pub const MANIFEST_FORMAT: &str = "specauf-dataset";

