//! Target features for the drafter: the hidden states after the decoder layers in
//! `target_layer_ids` (HF convention: tap i is the output of layer i, `hidden_states[i+1]`,
//! before the final norm), concatenated in that order: (T, n·H) per sequence.
//!
//! Two ways to get them, with the same numbers up to the storage precision:
//! - online, [`target_features`]: one target forward with taps and no logits;
//! - from the feature cache that `specauf prepare --features ...` writes, [`FeatureCache`]:
//!   `DIR/features-{train,eval}-NNNNN.safetensors`, shard k holding the features of the
//!   sequences of token shard k, as `features` F16/BF16 `(T, n·H)` and `offsets` I64 `(N+1,)`.
//!   Several training runs over the same data then skip the target forward.
//!
//! With `prepare --soft-labels K` each feature shard also holds the target's top-K next-token
//! logits at every position, `soft_ids` U32 `(T, K)` and `soft_logits` F16 `(T, K)` (row t: the
//! distribution of token t+1), from the same forward: the trainer's distillation targets
//! ([`SoftLabels`]).

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::model::{KvCache, Logits, ModelError, Target};
use crate::data::{
    offsets_bytes, open_checked, DataError, FeatureDtype, FeatureInfo, Manifest, ModelIdentity, Sequence, Shard,
    ShardDtype, ShardInfo, ShardWriter, Split,
};

#[derive(Debug, thiserror::Error)]
pub enum FeatureError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("no target layer ids given; pass the drafter's target_layer_ids")]
    NoLayers,
    #[error("{path}: the dataset has no feature cache (prepare it with --features {wanted}), or compute features online")]
    NoCache { path: String, wanted: String },
    #[error("{path}: the feature cache holds target layers {cached:?}, the drafter taps {requested:?}; prepare again with --features {wanted}, or compute features online")]
    LayerMismatch { path: String, cached: Vec<usize>, requested: Vec<usize>, wanted: String },
}

fn layer_list(ids: &[usize]) -> String {
    ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",")
}

/// The most next-token logits a feature cache keeps per position.
pub const MAX_SOFT_LABELS: usize = 256;

/// The target's top-k next-token logits of a sequence: row t holds the k most likely ids for
/// token t+1, most likely first, and their logits.
#[derive(Debug, Clone, PartialEq)]
pub struct SoftLabels {
    pub k: usize,
    /// (T·k) token ids.
    pub ids: Vec<u32>,
    /// (T·k) logits.
    pub logits: Vec<f32>,
}

impl SoftLabels {
    /// The top `k` of each row of `logits` (T, V); ties go to the lower id.
    pub fn top_k(logits: &Tensor, k: usize) -> Result<Self, ModelError> {
        let (t, v) = logits.dims2()?;
        let k = k.min(v);
        let all = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let (mut ids, mut out) = (Vec::with_capacity(t * k), Vec::with_capacity(t * k));
        let mut order: Vec<u32> = Vec::with_capacity(v);
        for row in all.chunks_exact(v) {
            order.clear();
            order.extend(0..v as u32);
            let by = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
            if k < v {
                order.select_nth_unstable_by(k - 1, by);
            }
            let top = &mut order[..k];
            top.sort_unstable_by(by);
            ids.extend_from_slice(top);
            out.extend(top.iter().map(|&i| row[i as usize]));
        }
        Ok(SoftLabels { k, ids, logits: out })
    }

    /// Rows (positions) held.
    pub fn len(&self) -> usize {
        self.ids.len() / self.k.max(1)
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The distribution of row t at `temperature`: softmax over its k logits (renormalised).
    pub fn probs(&self, t: usize, temperature: f32) -> Vec<f32> {
        let row = &self.logits[t * self.k..(t + 1) * self.k];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = row.iter().map(|&l| ((l - max) / temperature).exp()).collect();
        let sum: f32 = e.iter().sum();
        e.into_iter().map(|x| x / sum).collect()
    }

    /// Row t's ids.
    pub fn ids(&self, t: usize) -> &[u32] {
        &self.ids[t * self.k..(t + 1) * self.k]
    }
}

/// Online features of one sequence: (T, n·H) f32, the taps of `target_layer_ids` concatenated
/// in that order. One forward from an empty cache, no LM head.
pub fn target_features(target: &Target, ids: &[u32], target_layer_ids: &[usize]) -> Result<Tensor, FeatureError> {
    Ok(target_features_soft(target, ids, target_layer_ids, None)?.0)
}

/// [`target_features`] and, with `soft_labels = Some(k)`, the top-k next-token logits of the same
/// forward (which then runs the LM head at every position).
pub fn target_features_soft(
    target: &Target,
    ids: &[u32],
    target_layer_ids: &[usize],
    soft_labels: Option<usize>,
) -> Result<(Tensor, Option<SoftLabels>), FeatureError> {
    if target_layer_ids.is_empty() {
        return Err(FeatureError::NoLayers);
    }
    let mut cache: KvCache = target.new_cache();
    let logits = if soft_labels.is_some() { Logits::All } else { Logits::None };
    let out = target.forward(ids, &mut cache, target_layer_ids, logits)?;
    // n × (T, H) -> (T, n·H)
    let t = if out.taps.len() == 1 { out.taps[0].clone() } else { Tensor::cat(&out.taps, 1).map_err(ModelError::from)? };
    let soft = match (soft_labels, &out.logits) {
        (Some(k), Some(l)) => Some(SoftLabels::top_k(l, k)?),
        _ => None,
    };
    Ok((t, soft))
}

/// Features of `t` (T, D) f32 as little-endian bytes of `dtype`.
fn to_bytes(t: &Tensor, dtype: FeatureDtype) -> Result<Vec<u8>, ModelError> {
    let flat = t.flatten_all()?;
    Ok(match dtype {
        FeatureDtype::F16 => flat.to_dtype(DType::F16)?.to_vec1::<half::f16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        FeatureDtype::Bf16 => flat.to_dtype(DType::BF16)?.to_vec1::<half::bf16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
    })
}

pub(crate) fn feature_shard_name(split: Split, k: usize) -> String {
    format!("features-{}-{k:05}.safetensors", split.as_str())
}

/// Writes the feature shard of one token shard's sequences; `on_sequence(tokens)` is called
/// after each sequence (progress).
pub(crate) fn write_feature_shard(
    path: &Path,
    target: &Target,
    seqs: &[&Sequence],
    target_layer_ids: &[usize],
    dtype: FeatureDtype,
    soft_labels: Option<usize>,
    settings_hash: &str,
    on_sequence: &mut dyn FnMut(usize),
) -> Result<ShardInfo, FeatureError> {
    let dim = target_layer_ids.len() * target.config().hidden_size;
    let total: usize = seqs.iter().map(|s| s.len()).sum();
    let mut offsets = vec![0usize];
    for s in seqs {
        offsets.push(offsets.last().copied().unwrap_or(0) + s.len());
    }
    let mut metadata = std::collections::BTreeMap::new();
    metadata.insert("format".to_string(), FEATURE_SHARD_FORMAT.to_string());
    metadata.insert("settings_hash".to_string(), settings_hash.to_string());
    metadata.insert("target_layer_ids".to_string(), layer_list(target_layer_ids));
    let sd = dtype.shard_dtype();
    let mut layout = vec![("features", sd, vec![total, dim]), ("offsets", ShardDtype::I64, vec![seqs.len() + 1])];
    if let Some(k) = soft_labels {
        let k = k.min(target.config().vocab_size);
        layout.push(("soft_ids", ShardDtype::U32, vec![total, k]));
        layout.push(("soft_logits", ShardDtype::F16, vec![total, k]));
    }
    let mut w = ShardWriter::create(path, &layout, &metadata)?;
    // Tensors are written in layout order: the features, then the offsets, then the soft labels
    // (kept in memory until the features are out: k ≪ n·H, so they are small).
    let mut soft = Vec::new();
    for s in seqs {
        let (f, top) = target_features_soft(target, &s.input_ids, target_layer_ids, soft_labels)?;
        w.write(&to_bytes(&f, dtype)?)?;
        soft.extend(top);
        on_sequence(s.len());
    }
    w.write(&offsets_bytes(&offsets))?;
    if soft_labels.is_some() {
        let ids: Vec<u8> = soft.iter().flat_map(|s| s.ids.iter().flat_map(|i| i.to_le_bytes())).collect();
        w.write(&ids)?;
        let logits: Vec<u8> =
            soft.iter().flat_map(|s| s.logits.iter().flat_map(|&l| half::f16::from_f32(l).to_le_bytes())).collect();
        w.write(&logits)?;
    }
    let bytes = w.finish()?;
    Ok(ShardInfo {
        file: path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        sequences: seqs.len(),
        tokens: total,
        bytes,
    })
}

pub(crate) const FEATURE_SHARD_FORMAT: &str = "specauf-features-v1";

/// Reads the cached features of one split.
pub struct FeatureCache {
    info: FeatureInfo,
    /// Per shard: the mapping, its offsets, the global index of its first sequence.
    shards: Vec<(Shard, Vec<usize>, usize)>,
    len: usize,
}

impl std::fmt::Debug for FeatureCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeatureCache").field("info", &self.info).field("len", &self.len).finish()
    }
}

impl FeatureCache {
    /// Opens the feature cache of `split` in `dir`, checking that it was made by `model` with
    /// exactly `target_layer_ids`, and that every shard matches the manifest.
    pub fn open(dir: &Path, split: Split, model: &ModelIdentity, target_layer_ids: &[usize]) -> Result<Self, FeatureError> {
        let manifest = Manifest::read(dir)?;
        manifest.check_model(dir, model)?;
        let path = dir.display().to_string();
        let wanted = layer_list(target_layer_ids);
        let info = manifest.features.clone().ok_or_else(|| FeatureError::NoCache { path: path.clone(), wanted: wanted.clone() })?;
        if info.target_layer_ids != target_layer_ids {
            return Err(FeatureError::LayerMismatch {
                path,
                cached: info.target_layer_ids.clone(),
                requested: target_layer_ids.to_vec(),
                wanted,
            });
        }
        let token_shards = manifest.splits.get(&split).map(|s| s.shards.clone()).unwrap_or_default();
        let feature_shards = info.shards.get(&split).cloned().unwrap_or_default();
        if token_shards.len() != feature_shards.len() {
            return Err(DataError::Stale {
                path: dir.to_path_buf(),
                what: format!("{} token shards but {} feature shards", token_shards.len(), feature_shards.len()),
            }
            .into());
        }
        let sd = info.dtype.shard_dtype();
        let mut shards = Vec::with_capacity(feature_shards.len());
        let mut start = 0usize;
        for (ts, fs) in token_shards.iter().zip(&feature_shards) {
            let p = dir.join(&fs.file);
            let shard = open_checked(&p, fs, &manifest.settings_hash)?;
            let (shape, _) = shard.expect("features", sd, 2)?;
            if shape != [ts.tokens, info.dim] || fs.sequences != ts.sequences {
                return Err(DataError::Stale {
                    path: p,
                    what: format!("features {shape:?}, expected [{}, {}] for its token shard", ts.tokens, info.dim),
                }
                .into());
            }
            let offsets = shard.offsets(ts.tokens)?;
            if offsets.len() != ts.sequences + 1 {
                return Err(DataError::Stale { path: p, what: "sequence count differs from its token shard".into() }.into());
            }
            if let Some(k) = info.soft_labels {
                for (name, dtype) in [("soft_ids", ShardDtype::U32), ("soft_logits", ShardDtype::F16)] {
                    let (shape, _) = shard.expect(name, dtype, 2)?;
                    if shape[0] != ts.tokens || shape[1] == 0 || shape[1] > k {
                        return Err(DataError::Stale { path: p, what: format!("{name} {shape:?}, expected [{}, ≤{k}]", ts.tokens) }.into());
                    }
                }
            }
            shards.push((shard, offsets, start));
            start += ts.sequences;
        }
        Ok(FeatureCache { info, shards, len: start })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// n·H.
    pub fn dim(&self) -> usize {
        self.info.dim
    }

    pub fn info(&self) -> &FeatureInfo {
        &self.info
    }

    /// The shard of sequence `i`, with its token range inside that shard.
    fn locate(&self, i: usize) -> Result<(&Shard, usize, usize), FeatureError> {
        let k = self.shards.partition_point(|(_, _, start)| *start <= i).saturating_sub(1);
        let Some((shard, offsets, start)) = self.shards.get(k).filter(|_| i < self.len) else {
            return Err(DataError::IndexOutOfRange { index: i, len: self.len, split: "features" }.into());
        };
        let j = i - start;
        Ok((shard, offsets[j], offsets[j + 1]))
    }

    /// The stored top-k next-token logits of sequence `i`, when the cache has them.
    pub fn soft_labels(&self, i: usize) -> Result<Option<SoftLabels>, FeatureError> {
        if self.info.soft_labels.is_none() {
            return Ok(None);
        }
        let (shard, a, b) = self.locate(i)?;
        let (shape, ids) = shard.expect("soft_ids", ShardDtype::U32, 2)?;
        let k = shape[1];
        let ids: Vec<u32> = ids[a * k * 4..b * k * 4].chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let (_, logits) = shard.expect("soft_logits", ShardDtype::F16, 2)?;
        let logits = logits[a * k * 2..b * k * 2].chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect();
        Ok(Some(SoftLabels { k, ids, logits }))
    }

    /// Features of sequence `i` of the split (the same index as [`crate::data::Dataset::get`]):
    /// (T_i, n·H) f32.
    pub fn get(&self, i: usize) -> Result<Tensor, FeatureError> {
        let (shard, a, b) = self.locate(i)?;
        let (_, bytes) = shard.expect("features", self.info.dtype.shard_dtype(), 2)?;
        let d = self.info.dim;
        let rows = &bytes[a * d * 2..b * d * 2];
        let values: Vec<f32> = match self.info.dtype {
            FeatureDtype::F16 => rows.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            FeatureDtype::Bf16 => rows.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        };
        Ok(Tensor::from_vec(values, (b - a, d), &Device::Cpu).map_err(ModelError::from)?)
    }
}
