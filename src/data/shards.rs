//! Prepared datasets on disk.
//!
//! **Shards.** `DIR/{train,eval}-NNNNN.safetensors`, each holding its sequences concatenated:
//! `input_ids` U32 `(T,)`, `loss_mask` U8 `(T,)`, `offsets` I64 `(N+1,)` (sequence i is
//! `offsets[i]..offsets[i+1]`), and in the header metadata the conversation ids and the hash of
//! the settings that produced it. `DIR/manifest.json` is written last; [`Dataset::open`] checks
//! every shard against it, so a half-written or mixed directory is refused.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::manifest::*;
use super::tokenize::Sequence;
use crate::data::sharegpt::heldout_group;
use crate::util::fnv1a64;

// ---------------------------------------------------------------------------------------------
// Splits

/// Which part of a prepared dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Eval,
}

impl Split {
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Eval => "eval",
        }
    }
}

/// Whether a conversation goes to the evaluation split: FNV-1a of `specauf-eval:` + its hold-out
/// group key (chunks of one ShareGPT conversation stay together), modulo one million, below
/// `fraction`·10⁶. Independent of the benchmark hold-out hash ([`crate::data::sharegpt::is_heldout`]).
pub fn is_eval(id: &str, fraction: f64) -> bool {
    let key = format!("specauf-eval:{}", heldout_group(id));
    let threshold = (fraction.clamp(0.0, 1.0) * 1_000_000.0).round() as u64;
    fnv1a64(key.as_bytes()) % 1_000_000 < threshold
}

// ---------------------------------------------------------------------------------------------
// Errors of the on-disk format

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no manifest.json: this is not a prepared dataset, or `specauf prepare` did not finish; run it (again) with --out {path}")]
    NoManifest { path: PathBuf },
    #[error("{path}: {what}")]
    BadManifest { path: PathBuf, what: String },
    #[error("{path}: {what}; the directory no longer matches its manifest (files from another run?): run `specauf prepare` again into a fresh --out")]
    Stale { path: PathBuf, what: String },
    #[error("{path}: not a readable shard: {what}")]
    BadShard { path: PathBuf, what: String },
    #[error("{path}: the dataset was prepared for {what}; prepare it again for this model or pass the model it was made with")]
    ModelMismatch { path: PathBuf, what: String },
    #[error("sequence {index} does not exist: the {split} split has {len}")]
    IndexOutOfRange { index: usize, len: usize, split: &'static str },
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io { path: path.to_path_buf(), source }
}

/// Writes `bytes` to `<path>.tmp` in the same directory, fsyncs and renames it over `path`.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    crate::util::fs::write_atomic(path, bytes).map_err(io_err(path))
}

// ---------------------------------------------------------------------------------------------
// Streaming safetensors writer / reader

/// Element types the shards use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardDtype {
    U8,
    U32,
    I64,
    F16,
    BF16,
}

impl ShardDtype {
    pub fn size(self) -> usize {
        match self {
            ShardDtype::U8 => 1,
            ShardDtype::F16 | ShardDtype::BF16 => 2,
            ShardDtype::U32 => 4,
            ShardDtype::I64 => 8,
        }
    }

    fn name(self) -> &'static str {
        match self {
            ShardDtype::U8 => "U8",
            ShardDtype::U32 => "U32",
            ShardDtype::I64 => "I64",
            ShardDtype::F16 => "F16",
            ShardDtype::BF16 => "BF16",
        }
    }

    fn of(d: safetensors::Dtype) -> Option<Self> {
        match d {
            safetensors::Dtype::U8 => Some(ShardDtype::U8),
            safetensors::Dtype::U32 => Some(ShardDtype::U32),
            safetensors::Dtype::I64 => Some(ShardDtype::I64),
            safetensors::Dtype::F16 => Some(ShardDtype::F16),
            safetensors::Dtype::BF16 => Some(ShardDtype::BF16),
            _ => None,
        }
    }
}

/// A safetensors file written front to back: every tensor's dtype and shape is declared first,
/// so the header can be written before the data, and a multi-gigabyte feature shard never has
/// to sit in memory. Data goes to `<name>.tmp`; [`ShardWriter::finish`] checks that exactly the
/// declared bytes came, fsyncs and renames.
pub(crate) struct ShardWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<File>,
    expected: u64,
    written: u64,
}

impl ShardWriter {
    /// `tensors`: (name, dtype, shape), in the order their bytes will be written.
    pub(crate) fn create(
        path: &Path,
        tensors: &[(&str, ShardDtype, Vec<usize>)],
        metadata: &BTreeMap<String, String>,
    ) -> Result<Self, DataError> {
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::to_value(metadata).unwrap_or_default());
        let mut offset = 0u64;
        for (name, dtype, shape) in tensors {
            let bytes = shape.iter().product::<usize>() as u64 * dtype.size() as u64;
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": dtype.name(), "shape": shape, "data_offsets": [offset, offset + bytes]}),
            );
            offset += bytes;
        }
        let mut text = serde_json::Value::Object(header).to_string().into_bytes();
        // Pad to 8 bytes with spaces, as the reference writer does, so the data is aligned.
        while !text.len().is_multiple_of(8) {
            text.push(b' ');
        }
        let tmp = crate::util::fs::tmp_sibling(path);
        let f = File::create(&tmp).map_err(io_err(&tmp))?;
        let mut out = BufWriter::with_capacity(1 << 20, f);
        out.write_all(&(text.len() as u64).to_le_bytes()).map_err(io_err(&tmp))?;
        out.write_all(&text).map_err(io_err(&tmp))?;
        Ok(ShardWriter { path: path.to_path_buf(), tmp, out, expected: offset, written: 0 })
    }

    pub(crate) fn write(&mut self, bytes: &[u8]) -> Result<(), DataError> {
        self.written += bytes.len() as u64;
        self.out.write_all(bytes).map_err(io_err(&self.tmp))
    }

    pub(crate) fn finish(self) -> Result<u64, DataError> {
        let ShardWriter { path, tmp, out, expected, written } = self;
        if written != expected {
            return Err(DataError::BadShard {
                path: tmp,
                what: format!("{written} data bytes written, {expected} declared"),
            });
        }
        let f = out.into_inner().map_err(|e| DataError::Io { path: tmp.clone(), source: e.into_error() })?;
        f.sync_all().map_err(io_err(&tmp))?;
        let len = f.metadata().map_err(io_err(&tmp))?.len();
        drop(f);
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        crate::util::fs::sync_parent(&path);
        Ok(len)
    }
}

/// A memory-mapped shard.
pub(crate) struct Shard {
    pub(crate) path: PathBuf,
    mmap: memmap2::Mmap,
    data_start: usize,
    tensors: BTreeMap<String, (ShardDtype, Vec<usize>, Range<usize>)>,
    pub(crate) metadata: BTreeMap<String, String>,
}

impl Shard {
    pub(crate) fn open(path: &Path) -> Result<Self, DataError> {
        let f = File::open(path).map_err(io_err(path))?;
        // SAFETY: the shard is opened read-only; a concurrent writer replaces files by rename,
        // which leaves this mapping on the old inode.
        let mmap = unsafe { memmap2::Mmap::map(&f) }.map_err(io_err(path))?;
        let bad = |what: String| DataError::BadShard { path: path.to_path_buf(), what };
        let (n, meta) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| bad(e.to_string()))?;
        let mut tensors = BTreeMap::new();
        for (name, info) in meta.tensors() {
            let dtype = ShardDtype::of(info.dtype).ok_or_else(|| bad(format!("tensor {name} has type {:?}", info.dtype)))?;
            tensors.insert(name, (dtype, info.shape.clone(), info.data_offsets.0..info.data_offsets.1));
        }
        let metadata = meta.metadata().clone().unwrap_or_default().into_iter().collect();
        Ok(Shard { path: path.to_path_buf(), mmap, data_start: 8 + n, tensors, metadata })
    }

    /// Raw little-endian bytes of tensor `name`, with its dtype and shape.
    pub(crate) fn raw(&self, name: &str) -> Result<(ShardDtype, &[usize], &[u8]), DataError> {
        let (dtype, shape, range) = self.tensors.get(name).ok_or_else(|| DataError::BadShard {
            path: self.path.clone(),
            what: format!("no tensor `{name}`"),
        })?;
        Ok((*dtype, shape, &self.mmap[self.data_start + range.start..self.data_start + range.end]))
    }

    pub(crate) fn expect(&self, name: &str, dtype: ShardDtype, rank: usize) -> Result<(&[usize], &[u8]), DataError> {
        let (d, shape, bytes) = self.raw(name)?;
        if d != dtype || shape.len() != rank {
            return Err(DataError::BadShard {
                path: self.path.clone(),
                what: format!("tensor `{name}` is {d:?} {shape:?}, expected {dtype:?} of rank {rank}"),
            });
        }
        Ok((shape, bytes))
    }

    /// `offsets` as usize, checked to start at 0, never decrease and end at `total`.
    pub(crate) fn offsets(&self, total: usize) -> Result<Vec<usize>, DataError> {
        let (_, bytes) = self.expect("offsets", ShardDtype::I64, 1)?;
        let offs: Vec<i64> = bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect();
        let ok = offs.first() == Some(&0)
            && offs.windows(2).all(|w| w[0] <= w[1])
            && offs.last().is_some_and(|&l| l as usize == total);
        if !ok {
            return Err(DataError::BadShard {
                path: self.path.clone(),
                what: format!("`offsets` must rise from 0 to {total}"),
            });
        }
        Ok(offs.into_iter().map(|o| o as usize).collect())
    }
}

pub(crate) fn offsets_bytes(offsets: &[usize]) -> Vec<u8> {
    offsets.iter().flat_map(|&o| (o as i64).to_le_bytes()).collect()
}

/// Writes one token shard of `seqs`.
pub(crate) fn write_token_shard(
    path: &Path,
    split: Split,
    seqs: &[(&str, &Sequence)],
    settings_hash: &str,
) -> Result<ShardInfo, DataError> {
    let total: usize = seqs.iter().map(|(_, s)| s.len()).sum();
    let mut offsets = Vec::with_capacity(seqs.len() + 1);
    offsets.push(0usize);
    for (_, s) in seqs {
        offsets.push(offsets.last().copied().unwrap_or(0) + s.len());
    }
    let ids: Vec<&str> = seqs.iter().map(|(id, _)| *id).collect();
    let mut metadata = BTreeMap::new();
    metadata.insert("format".to_string(), TOKEN_SHARD_FORMAT.to_string());
    metadata.insert("split".to_string(), split.as_str().to_string());
    metadata.insert("settings_hash".to_string(), settings_hash.to_string());
    metadata.insert("conversation_ids".to_string(), serde_json::to_string(&ids).unwrap_or_default());
    let mut w = ShardWriter::create(
        path,
        &[
            ("input_ids", ShardDtype::U32, vec![total]),
            ("loss_mask", ShardDtype::U8, vec![total]),
            ("offsets", ShardDtype::I64, vec![seqs.len() + 1]),
        ],
        &metadata,
    )?;
    let id_bytes: Vec<u8> = seqs.iter().flat_map(|(_, s)| s.input_ids.iter().flat_map(|t| t.to_le_bytes())).collect();
    w.write(&id_bytes)?;
    let mask: Vec<u8> = seqs.iter().flat_map(|(_, s)| s.loss_mask.iter().copied()).collect();
    w.write(&mask)?;
    w.write(&offsets_bytes(&offsets))?;
    let bytes = w.finish()?;
    Ok(ShardInfo {
        file: path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        sequences: seqs.len(),
        tokens: total,
        bytes,
    })
}

pub(crate) const TOKEN_SHARD_FORMAT: &str = "specauf-tokens-v1";

// ---------------------------------------------------------------------------------------------
// Reading a split

/// One split of a prepared dataset, in memory (token ids and masks are small: 5 bytes a token).
#[derive(Debug)]
pub struct Dataset {
    dir: PathBuf,
    manifest: Manifest,
    split: Split,
    input_ids: Vec<u32>,
    loss_mask: Vec<u8>,
    /// Global offsets, len() + 1 entries.
    offsets: Vec<usize>,
    conversation_ids: Vec<String>,
}

impl Dataset {
    /// Opens `split` of the dataset in `dir`, checking every shard against the manifest (file
    /// sizes, counts, settings hash).
    pub fn open(dir: &Path, split: Split) -> Result<Dataset, DataError> {
        let manifest = Manifest::read(dir)?;
        let info = manifest.splits.get(&split).cloned().unwrap_or_default();
        let mut input_ids = Vec::with_capacity(info.tokens);
        let mut loss_mask = Vec::with_capacity(info.tokens);
        let mut offsets = vec![0usize];
        let mut conversation_ids = Vec::with_capacity(info.sequences);
        for s in &info.shards {
            let path = dir.join(&s.file);
            let shard = open_checked(&path, s, &manifest.settings_hash)?;
            let (shape, ids) = shard.expect("input_ids", ShardDtype::U32, 1)?;
            let n = shape[0];
            let (mshape, mask) = shard.expect("loss_mask", ShardDtype::U8, 1)?;
            if n != s.tokens || mshape[0] != n {
                return Err(DataError::Stale { path, what: format!("{n} tokens, manifest says {}", s.tokens) });
            }
            let offs = shard.offsets(n)?;
            if offs.len() != s.sequences + 1 {
                return Err(DataError::Stale {
                    path,
                    what: format!("{} sequences, manifest says {}", offs.len() - 1, s.sequences),
                });
            }
            let base = input_ids.len();
            input_ids.extend(ids.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])));
            loss_mask.extend_from_slice(mask);
            offsets.extend(offs[1..].iter().map(|o| base + o));
            let ids: Vec<String> = shard
                .metadata
                .get("conversation_ids")
                .and_then(|t| serde_json::from_str(t).ok())
                .unwrap_or_default();
            if ids.len() != s.sequences {
                return Err(DataError::BadShard { path, what: "conversation_ids does not list every sequence".into() });
            }
            conversation_ids.extend(ids);
        }
        if offsets.len() != info.sequences + 1 || input_ids.len() != info.tokens {
            return Err(DataError::Stale {
                path: dir.join(MANIFEST_FILE),
                what: format!(
                    "the {} shards hold {} sequences / {} tokens, the manifest says {} / {}",
                    split.as_str(),
                    offsets.len() - 1,
                    input_ids.len(),
                    info.sequences,
                    info.tokens
                ),
            });
        }
        Ok(Dataset { dir: dir.to_path_buf(), manifest, split, input_ids, loss_mask, offsets, conversation_ids })
    }

    pub fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens of the longest sequence (0 when empty).
    pub fn max_len(&self) -> usize {
        self.offsets.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0)
    }

    pub fn split(&self) -> Split {
        self.split
    }

    /// Sequence `i` (a copy; [`Dataset::input_ids`] and [`Dataset::loss_mask`] are views).
    ///
    /// Panics if `i >= len()`, like slice indexing; [`Dataset::try_get`] does not.
    pub fn get(&self, i: usize) -> Sequence {
        let r = self.offsets[i]..self.offsets[i + 1];
        Sequence { input_ids: self.input_ids[r.clone()].to_vec(), loss_mask: self.loss_mask[r].to_vec() }
    }

    /// Sequence `i`, or [`DataError::IndexOutOfRange`].
    pub fn try_get(&self, i: usize) -> Result<Sequence, DataError> {
        self.range(i)?;
        Ok(self.get(i))
    }

    pub fn input_ids(&self, i: usize) -> Result<&[u32], DataError> {
        let r = self.range(i)?;
        Ok(&self.input_ids[r])
    }

    pub fn loss_mask(&self, i: usize) -> Result<&[u8], DataError> {
        let r = self.range(i)?;
        Ok(&self.loss_mask[r])
    }

    pub fn conversation_id(&self, i: usize) -> Result<&str, DataError> {
        self.range(i)?;
        Ok(&self.conversation_ids[i])
    }

    fn range(&self, i: usize) -> Result<Range<usize>, DataError> {
        if i >= self.len() {
            return Err(DataError::IndexOutOfRange { index: i, len: self.len(), split: self.split.as_str() });
        }
        Ok(self.offsets[i]..self.offsets[i + 1])
    }

    pub fn total_tokens(&self) -> usize {
        self.input_ids.len()
    }

    pub fn loss_tokens(&self) -> usize {
        self.loss_mask.iter().filter(|&&m| m == 1).count()
    }

    /// How many times each token id occurs under the loss mask (the target's replies: what a
    /// drafter learns to propose), over a vocabulary of `vocab_size`; the counts behind a draft
    /// vocabulary ([`crate::drafter::vocab`]). An id outside the vocabulary is an error: the
    /// data was prepared for another model.
    pub fn loss_token_counts(&self, vocab_size: usize) -> Result<Vec<u64>, DataError> {
        let mut counts = vec![0u64; vocab_size];
        for (&id, &m) in self.input_ids.iter().zip(&self.loss_mask) {
            if m != 1 {
                continue;
            }
            match counts.get_mut(id as usize) {
                Some(c) => *c += 1,
                None => {
                    return Err(DataError::ModelMismatch {
                        path: self.dir.clone(),
                        what: format!("a vocabulary with token id {id}, outside this model's {vocab_size}"),
                    })
                }
            }
        }
        Ok(counts)
    }

    /// The ranking of the target's tokens by their count in this split's replies
    /// ([`Dataset::loss_token_counts`] over the manifest's vocabulary), which a drafter trained on
    /// this data drafts from (DESIGN §7.13).
    pub fn draft_vocab(&self) -> Result<crate::drafter::DraftVocab, DataError> {
        let counts = self.loss_token_counts(self.manifest.model.vocab_size)?;
        let source = format!("replies of {} ({} split)", self.dir.display(), self.split.as_str());
        Ok(crate::drafter::DraftVocab::from_counts(&counts, source))
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
}

/// Opens a shard and checks its size and settings hash against the manifest's entry.
pub(crate) fn open_checked(path: &Path, info: &ShardInfo, settings_hash: &str) -> Result<Shard, DataError> {
    let len = std::fs::metadata(path).map_err(io_err(path))?.len();
    if len != info.bytes {
        return Err(DataError::Stale { path: path.to_path_buf(), what: format!("{len} bytes, manifest says {}", info.bytes) });
    }
    let shard = Shard::open(path)?;
    let hash = shard.metadata.get("settings_hash").map(String::as_str).unwrap_or("");
    if hash != settings_hash {
        return Err(DataError::Stale {
            path: path.to_path_buf(),
            what: format!("written with settings {hash}, manifest has {settings_hash}"),
        });
    }
    Ok(shard)
}
