//! The draft vocabulary: the drafter proposes only tokens of a subset of the target's vocabulary,
//! scored by the matching rows of the target's LM head (DESIGN §7.13).
//!
//! Why: the draft's LM head is the target's, (V, H), and one pass over it is read per draft. On
//! the embedded default (V = 49 152, H = 576) it is 28 MB of int8 weights, more than half of a
//! draft at every block size (`examples/spec_cycle`). The tokens a target writes are
//! concentrated: a few thousand ids carry almost all of its replies. Scoring only those rows
//! cuts the head's cost by V/K, and costs acceptance only where the target's next token is
//! outside the subset, where a small drafter is rarely right anyway. The same idea is FR-Spec's
//! frequency-ranked draft vocabulary and EAGLE-3's `d2t` map.
//!
//! Exactness does not depend on the subset: drafts are proposals, and the target's verification
//! decides every emitted token (a draft outside the subset is simply never proposed).
//!
//! The subset is, per request: the top K ids of a ranking by how often the target wrote each
//! token in the drafter's training data (`draft_vocab.json`, written by `specauf train` next to
//! the checkpoint), plus every token of the request's own context (prompt and output so far),
//! so the drafter can still copy a rare token it has seen. A drafter without the file drafts
//! over the whole vocabulary.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::DrafterError;
use crate::model::host_ops::argmax_and_sum_exp;
use crate::model::qgemm::QMatrix;
use crate::model::Target;

/// The file in a drafter directory that ranks the target's tokens.
pub const DRAFT_VOCAB_FILE: &str = "draft_vocab.json";
/// How many top-ranked ids a draft scores unless the user sets `--draft-vocab`: the one source
/// of this default (docs/recipe.md § "The draft vocabulary" has the measurement behind it).
pub const DEFAULT_DRAFT_VOCAB: usize = 8192;
const FORMAT: &str = "specauf-draft-vocab";
const VERSION: u32 = 1;

/// A ranking of the target's tokens by how often the target wrote them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DraftVocab {
    format: String,
    version: u32,
    /// The target's vocabulary size.
    pub vocab_size: usize,
    /// Where the counts come from (for people reading the file).
    pub source: String,
    /// Tokens counted.
    pub tokens: u64,
    /// Ids with a nonzero count, most frequent first (ties: lower id first).
    pub ids: Vec<u32>,
    /// The count of each id of `ids`.
    pub counts: Vec<u64>,
}

impl DraftVocab {
    /// The ranking of `counts` (one count per token id).
    pub fn from_counts(counts: &[u64], source: impl Into<String>) -> Self {
        let mut ids: Vec<u32> = (0..counts.len() as u32).filter(|&i| counts[i as usize] > 0).collect();
        ids.sort_by(|&a, &b| counts[b as usize].cmp(&counts[a as usize]).then(a.cmp(&b)));
        let ranked = ids.iter().map(|&i| counts[i as usize]).collect();
        Self {
            format: FORMAT.into(),
            version: VERSION,
            vocab_size: counts.len(),
            source: source.into(),
            tokens: counts.iter().sum(),
            ids,
            counts: ranked,
        }
    }

    /// The `k` ids a draft scores, ascending: the `k` most frequent, and when fewer than `k` ids
    /// were ever counted, the lowest ids not counted (byte-pair vocabularies number their tokens
    /// roughly in order of frequency) up to `k`. All of the vocabulary when `k` ≥ its size.
    pub fn top(&self, k: usize) -> Vec<u32> {
        let k = k.min(self.vocab_size);
        let mut chosen = vec![false; self.vocab_size];
        for &id in self.ids.iter().take(k) {
            chosen[id as usize] = true;
        }
        let mut missing = k.saturating_sub(self.ids.len());
        for c in chosen.iter_mut() {
            if missing == 0 {
                break;
            }
            if !*c {
                *c = true;
                missing -= 1;
            }
        }
        (0..self.vocab_size as u32).filter(|&i| chosen[i as usize]).collect()
    }

    /// The fraction of counted tokens whose id is among the `k` most frequent.
    pub fn coverage(&self, k: usize) -> f64 {
        if self.tokens == 0 {
            return 0.0;
        }
        self.counts.iter().take(k).sum::<u64>() as f64 / self.tokens as f64
    }

    /// Reads `dir/draft_vocab.json`; None when the directory has none. A file that is not a draft
    /// vocabulary, or one for another vocabulary size, is an error.
    pub fn read(dir: &Path, vocab_size: usize) -> Result<Option<Self>, DrafterError> {
        let path = dir.join(DRAFT_VOCAB_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(DrafterError::io(&path, e)),
        };
        let bad = |what: String| DrafterError::InvalidConfig {
            path: path.display().to_string(),
            what: format!("{what}; delete the file to draft over the whole vocabulary, or rewrite it with `specauf draft-vocab`"),
        };
        let v: DraftVocab = serde_json::from_str(&text).map_err(|e| bad(format!("not a draft vocabulary: {e}")))?;
        if v.format != FORMAT || v.version != VERSION {
            return Err(bad(format!("format {:?} version {}, expected {FORMAT:?} version {VERSION}", v.format, v.version)));
        }
        if v.vocab_size != vocab_size {
            return Err(bad(format!("it ranks a vocabulary of {} tokens but the target has {vocab_size}", v.vocab_size)));
        }
        if v.ids.len() != v.counts.len() {
            return Err(bad(format!("{} ids but {} counts", v.ids.len(), v.counts.len())));
        }
        let mut seen = vec![false; vocab_size];
        for &id in &v.ids {
            let slot = seen.get_mut(id as usize).ok_or_else(|| bad(format!("id {id} is outside the vocabulary of {vocab_size}")))?;
            if std::mem::replace(slot, true) {
                return Err(bad(format!("id {id} is ranked twice")));
            }
        }
        Ok(Some(v))
    }

    /// Writes `dir/draft_vocab.json` atomically.
    pub fn write(&self, dir: &Path) -> Result<(), DrafterError> {
        std::fs::create_dir_all(dir).map_err(|e| DrafterError::io(dir, e))?;
        let path = dir.join(DRAFT_VOCAB_FILE);
        let json = serde_json::to_string(self).map_err(|e| DrafterError::Json { path: path.display().to_string(), what: e.to_string() })?;
        crate::util::fs::write_atomic(&path, json.as_bytes()).map_err(|e| DrafterError::io(&path, e))
    }
}

/// One request's draft head: the shared rows of the top-K ids, plus the rows of the request's
/// context tokens outside them (rebuilt when the context brings a new one, a few rows each time).
#[derive(Debug, Clone)]
pub struct DraftHead {
    ids: Arc<[u32]>,
    head: Arc<QMatrix>,
    member: Vec<bool>,
    extra_ids: Vec<u32>,
    extra: Option<QMatrix>,
    stale: bool,
    /// The logits of the last draft, reused: no allocation per cycle.
    logits: Vec<f32>,
}

impl DraftHead {
    /// The head for the ids `ids` (ascending) of `target`'s vocabulary; None when `ids` is empty
    /// or the target's head is not held in `qgemm` blocks (then the whole head drafts, as without
    /// a vocabulary).
    pub fn new(target: &Target, ids: &Arc<[u32]>) -> Result<Option<Self>, DrafterError> {
        if ids.is_empty() {
            return Ok(None);
        }
        let Some(head) = target.head_rows_shared(ids)? else { return Ok(None) };
        let mut member = vec![false; target.config().vocab_size];
        for &id in ids.iter() {
            if let Some(m) = member.get_mut(id as usize) {
                *m = true;
            }
        }
        Ok(Some(Self { ids: ids.clone(), head, member, extra_ids: Vec::new(), extra: None, stale: false, logits: Vec::new() }))
    }

    /// Adds the context tokens `tokens` (prompt or committed output) to this request's set.
    pub fn observe(&mut self, tokens: &[u32]) {
        for &t in tokens {
            if let Some(m) = self.member.get_mut(t as usize) {
                if !*m {
                    *m = true;
                    self.extra_ids.push(t);
                    self.stale = true;
                }
            }
        }
    }

    /// Ids this request's drafts can take.
    pub fn len(&self) -> usize {
        self.ids.len() + self.extra_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The greedy draft of each of the `n` rows of `x` (n, H): the id of the highest logit among
    /// this request's ids (the lowest id on a tie within the top-K rows, as a whole-head argmax).
    pub fn argmax(&mut self, target: &Target, x: &[f32], n: usize) -> Result<Vec<u32>, DrafterError> {
        Ok(self.scored(target, x, n)?.into_iter().map(|(id, _)| id).collect())
    }

    /// [`DraftHead::argmax`] with each draft's probability under the softmax over this request's
    /// ids (the drafter's confidence, which `--draft-p-min` compares).
    pub fn scored(&mut self, target: &Target, x: &[f32], n: usize) -> Result<Vec<(u32, f32)>, DrafterError> {
        if self.stale {
            self.extra = target.head_rows(&self.extra_ids)?;
            self.stale = false;
        }
        let qgemm = |e: crate::model::qgemm::QGemmError| DrafterError::Model(crate::model::ModelError::Corrupt { path: "draft head".into(), what: e.to_string() });
        let (k, e) = (self.ids.len(), self.extra_ids.len());
        self.logits.resize(n * k.max(e), 0.0);
        let y = &mut self.logits[..n * k];
        self.head.matmul(x, n, y).map_err(qgemm)?;
        // Per row: the best id, its logit, and the softmax normalizer Σ e^(l − best logit).
        let mut best: Vec<(u32, f32, f32)> = y
            .chunks_exact(k)
            .map(|row| {
                let (i, max, sum) = argmax_and_sum_exp(row);
                (self.ids.get(i).copied().unwrap_or(0), max, sum)
            })
            .collect();
        if let Some(extra) = &self.extra {
            let ye = &mut self.logits[..n * e];
            extra.matmul(x, n, ye).map_err(qgemm)?;
            for (b, row) in best.iter_mut().zip(ye.chunks_exact(e)) {
                let (main_max, main_sum) = (b.1, b.2);
                let (i, emax, esum) = argmax_and_sum_exp(row);
                if emax > main_max {
                    (b.0, b.1) = (self.extra_ids[i], emax);
                }
                // Both parts' normalizers taken to the new maximum b.1 (at least either part's).
                let exp = crate::model::host_ops::exp;
                b.2 = main_sum * exp(main_max - b.1) + esum * exp(emax - b.1);
            }
        }
        Ok(best.into_iter().map(|(id, _, sum)| (id, 1.0 / sum)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_by_count_then_id_and_fills_the_top_k_with_low_ids() {
        let counts = [0u64, 5, 0, 9, 5, 0, 1];
        let v = DraftVocab::from_counts(&counts, "t");
        assert_eq!(v.ids, vec![3, 1, 4, 6]);
        assert_eq!(v.counts, vec![9, 5, 5, 1]);
        assert_eq!(v.tokens, 20);
        assert_eq!(v.top(2), vec![1, 3]);
        // 4 counted ids, 6 asked: the two lowest uncounted ids (0, 2) fill the rest
        assert_eq!(v.top(6), vec![0, 1, 2, 3, 4, 6]);
        assert_eq!(v.top(100), (0..7).collect::<Vec<u32>>());
        assert!((v.coverage(1) - 0.45).abs() < 1e-12);
        assert_eq!(v.coverage(4), 1.0);
    }

    #[test]
    fn round_trips_and_refuses_a_file_for_another_vocabulary_or_a_broken_one() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(DraftVocab::read(dir.path(), 7).unwrap(), None);
        let v = DraftVocab::from_counts(&[0, 5, 0, 9, 5, 0, 1], "t");
        v.write(dir.path()).unwrap();
        assert_eq!(DraftVocab::read(dir.path(), 7).unwrap(), Some(v.clone()));
        let e = DraftVocab::read(dir.path(), 8).unwrap_err().to_string();
        assert!(e.contains("ranks a vocabulary of 7 tokens but the target has 8"), "{e}");
        let path = dir.path().join(DRAFT_VOCAB_FILE);
        std::fs::write(&path, "{\"format\": 1}").unwrap();
        let e = DraftVocab::read(dir.path(), 7).unwrap_err().to_string();
        assert!(e.contains("not a draft vocabulary") && e.contains("delete the file"), "{e}");
        let mut twice = v;
        twice.ids[1] = 3;
        std::fs::write(&path, serde_json::to_string(&twice).unwrap()).unwrap();
        assert!(DraftVocab::read(dir.path(), 7).unwrap_err().to_string().contains("id 3 is ranked twice"));
    }
}
