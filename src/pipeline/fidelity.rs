//! `bench fidelity`: how closely each weights mode serves the model the f32 reference serves.
//! On the chat prompts of [`CHAT_PROMPTS`], greedy outputs of each mode (and, given a build,
//! of llama.cpp's `llama-server` on the same GGUF and the same prompt token ids) are compared
//! with the f32 mode's over the first N tokens, and the logits at the prompt's last position
//! with f32's.

use std::path::PathBuf;
use std::time::Duration;

use super::llama_cpp::{LlamaCpp, LlamaServer};
use super::spec_bench::{chat_prompt_texts, CHAT_PROMPTS};
use super::stages::StageError;
use crate::model::load::resolve;
use crate::model::{load_model, Logits, ModelLocation, WeightsMode};
use crate::spec::{generate, GenerateConfig};
use crate::util::progress::{Progress, Unit};

#[derive(Debug, Clone)]
pub struct FidelityPlan {
    pub model: String,
    /// Modes compared with f32 (f32 itself is the reference and always runs).
    pub weights: Vec<WeightsMode>,
    /// The first N of [`CHAT_PROMPTS`].
    pub prompts: usize,
    /// Agreement is measured over the first N tokens for each of these.
    pub lengths: Vec<usize>,
    /// A llama.cpp build with llama-server: its greedy output joins the table.
    pub llama: Option<PathBuf>,
    pub threads: usize,
}

/// Agreement with the reference over the first `tokens` tokens.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Agreement {
    pub tokens: usize,
    /// Prompts whose output equals the reference's over these tokens.
    pub full_match: usize,
    /// Per prompt: the first position where the outputs differ (None: they agree).
    pub first_divergence: Vec<Option<usize>>,
}

impl Agreement {
    /// Mean first divergence over the prompts that diverge (None when none does).
    pub fn mean_divergence(&self) -> Option<f64> {
        let d: Vec<usize> = self.first_divergence.iter().flatten().copied().collect();
        (!d.is_empty()).then(|| d.iter().sum::<usize>() as f64 / d.len() as f64)
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct FidelityRow {
    /// "specauf q8", "llama.cpp".
    pub engine: String,
    pub agreement: Vec<Agreement>,
    /// Mean over prompts of mean |logit − f32 logit| over the vocabulary at the prompt's last
    /// position (ours only: llama-server does not return logits).
    pub mean_abs_dlogit: Option<f64>,
    /// Largest |logit − f32 logit| seen.
    pub max_abs_dlogit: Option<f64>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct FidelityReport {
    pub model: String,
    pub prompts: usize,
    pub rows: Vec<FidelityRow>,
}

/// The first `n` tokens of `seq`, cut before its first stop token (llama.cpp does not return
/// the stop token; we keep it).
fn head<'a>(seq: &'a [u32], n: usize, eos: &[u32]) -> &'a [u32] {
    let s = &seq[..seq.len().min(n)];
    match s.iter().position(|t| eos.contains(t)) {
        Some(i) => &s[..i],
        None => s,
    }
}

/// First position where `a` and `b` differ (a shorter sequence differs where it ends), None if equal.
pub fn first_divergence(a: &[u32], b: &[u32]) -> Option<usize> {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => Some(i),
        None if a.len() == b.len() => None,
        None => Some(a.len().min(b.len())),
    }
}

fn agreement(reference: &[Vec<u32>], other: &[Vec<u32>], lengths: &[usize], eos: &[u32]) -> Vec<Agreement> {
    lengths
        .iter()
        .map(|&n| {
            let first_divergence: Vec<Option<usize>> = reference.iter().zip(other).map(|(r, o)| first_divergence(head(r, n, eos), head(o, n, eos))).collect();
            Agreement { tokens: n, full_match: first_divergence.iter().filter(|d| d.is_none()).count(), first_divergence }
        })
        .collect()
}

/// Greedy outputs and last-position logits of one mode on the prompts.
fn run_mode(plan: &FidelityPlan, mode: WeightsMode, progress: &dyn Progress) -> Result<(Vec<Vec<u32>>, Vec<Vec<f32>>, Vec<Vec<u32>>, Vec<u32>), StageError> {
    let m = load_model(&plan.model, mode).map_err(|source| StageError::Model { name: plan.model.clone(), source })?;
    let texts = chat_prompt_texts(&m, plan.prompts)?;
    let prompts: Vec<Vec<u32>> = texts.iter().map(|t| m.tokenizer.encode(t, false).map_err(|e| StageError::Invalid(format!("tokenizing a prompt: {e}")))).collect::<Result<_, _>>()?;
    let mut cfg = GenerateConfig::greedy(&m.target, plan.lengths.iter().copied().max().unwrap_or(1));
    cfg.eos_token_ids = m.eos_token_ids();
    let err = |e: String| StageError::Invalid(format!("{mode} weights: {e}"));
    progress.phase(&format!("bench fidelity: specauf {mode}"), Some(prompts.len() as u64), 0, Unit::Items);
    let (mut outs, mut logits) = (Vec::new(), Vec::new());
    for (i, p) in prompts.iter().enumerate() {
        let mut cache = m.target.new_cache();
        let out = m.target.forward(p, &mut cache, &[], Logits::Last).map_err(|e| err(e.to_string()))?;
        let l = out.logits.ok_or_else(|| err("no logits".into()))?;
        logits.push(l.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(|e| err(e.to_string()))?);
        outs.push(generate(&m.target, None, p, &cfg).map_err(|e| err(e.to_string()))?.token_ids);
        progress.update(i as u64 + 1, "");
    }
    progress.finish(false);
    Ok((outs, logits, prompts, cfg.eos_token_ids))
}

fn dlogits(reference: &[Vec<f32>], other: &[Vec<f32>]) -> (f64, f64) {
    let (mut mean, mut max) = (0.0, 0.0f64);
    for (r, o) in reference.iter().zip(other) {
        let s: f64 = r.iter().zip(o).map(|(a, b)| ((a - b) as f64).abs()).inspect(|d| max = max.max(*d)).sum();
        mean += s / r.len().max(1) as f64;
    }
    (mean / reference.len().max(1) as f64, max)
}

pub fn fidelity(plan: &FidelityPlan, progress: &dyn Progress) -> Result<FidelityReport, StageError> {
    if plan.prompts == 0 || plan.prompts > CHAT_PROMPTS.len() || plan.lengths.is_empty() || plan.lengths.contains(&0) || plan.threads == 0 {
        return Err(StageError::Invalid(format!("--prompts must be in 1..={}, --tokens at least 1 each, --threads at least 1", CHAT_PROMPTS.len())));
    }
    let llama_target = match &plan.llama {
        Some(dir) => {
            let llama = LlamaCpp::new(dir).map_err(|e| StageError::Invalid(format!("llama.cpp: {e}")))?;
            llama.binary("llama-server").map_err(|e| StageError::Invalid(format!("llama.cpp: {e}")))?;
            match resolve(&plan.model).map_err(|source| StageError::Model { name: plan.model.clone(), source })? {
                ModelLocation::Gguf(p) => Some((llama, p)),
                ModelLocation::HfDir(d) => return Err(StageError::Invalid(format!("llama.cpp runs GGUF files; {} is an HF directory", d.display()))),
            }
        }
        None => None,
    };
    let (reference, ref_logits, prompts, eos) = run_mode(plan, WeightsMode::F32, progress)?;
    let mut rows = vec![FidelityRow {
        engine: "specauf f32 (reference)".into(),
        agreement: agreement(&reference, &reference, &plan.lengths, &eos),
        mean_abs_dlogit: Some(0.0),
        max_abs_dlogit: Some(0.0),
    }];
    for &mode in plan.weights.iter().filter(|&&m| m != WeightsMode::F32) {
        let (outs, logits, _, _) = run_mode(plan, mode, progress)?;
        let (mean, max) = dlogits(&ref_logits, &logits);
        rows.push(FidelityRow { engine: format!("specauf {mode}"), agreement: agreement(&reference, &outs, &plan.lengths, &eos), mean_abs_dlogit: Some(mean), max_abs_dlogit: Some(max) });
    }
    if let Some((llama, gguf)) = llama_target {
        progress.note("bench fidelity: starting llama-server");
        let server = LlamaServer::start(&llama, &gguf, plan.threads, Duration::from_secs(120)).map_err(|e| StageError::Invalid(format!("llama.cpp: {e}")))?;
        progress.phase("bench fidelity: llama.cpp", Some(prompts.len() as u64), 0, Unit::Items);
        let n = plan.lengths.iter().copied().max().unwrap_or(1);
        let mut outs = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            outs.push(server.greedy_tokens(p, n).map_err(|e| StageError::Invalid(format!("llama.cpp: {e}")))?);
            progress.update(i as u64 + 1, "");
        }
        progress.finish(false);
        rows.push(FidelityRow { engine: "llama.cpp".into(), agreement: agreement(&reference, &outs, &plan.lengths, &eos), mean_abs_dlogit: None, max_abs_dlogit: None });
    }
    Ok(FidelityReport { model: plan.model.clone(), prompts: plan.prompts, rows })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn divergence_is_the_first_differing_position_or_the_shorter_end() {
        assert_eq!(first_divergence(&[1, 2, 3], &[1, 2, 3]), None);
        assert_eq!(first_divergence(&[1, 2, 3], &[1, 5, 3]), Some(1));
        assert_eq!(first_divergence(&[1, 2], &[1, 2, 3]), Some(2));
        assert_eq!(first_divergence(&[], &[]), None);
    }

    #[test]
    fn agreement_cuts_at_the_length_and_before_a_stop_token() {
        let eos = [0u32];
        // The reference stops with its EOS (kept); llama.cpp's output omits it: they agree.
        let reference = vec![vec![5, 6, 0], vec![1, 2, 3, 4]];
        let other = vec![vec![5, 6], vec![1, 2, 9, 4]];
        let a = agreement(&reference, &other, &[2, 4], &eos);
        assert_eq!(a[0].full_match, 2, "the first two tokens agree on both prompts");
        assert_eq!(a[1].full_match, 1);
        assert_eq!(a[1].first_divergence, vec![None, Some(2)]);
        assert_eq!(a[1].mean_divergence(), Some(2.0));
    }
}
