//! Step 1 of [`ChunkedHead::run`](super::ChunkedHead::run): the input checks, and the validated
//! batch and branch mixing that every chunk reads.

use candle_core::Tensor;

use super::gemm::{dims2, Mat};
use super::{BaseSupport, DeltaBranch, HeadError, HeadInput, SoftTargets};
use crate::train::objective::{BlockLayout, ResolvedObjective};

/// The checked shapes of the batch, (N, H, V); the labels of valid rows lie inside the vocabulary.
pub(super) fn check_rows(input: &HeadInput<'_>) -> Result<(usize, usize, usize), HeadError> {
    let (n, hdim) = dims2(input.hidden, "hidden", "(N, H)")?;
    let (vocab, hdim_w) = dims2(input.lm_head, "lm_head", "(V, H)")?;
    if hdim_w != hdim {
        return Err(HeadError::Shape {
            what: "lm_head",
            got: vec![vocab, hdim_w],
            expected: format!("(V, {hdim}) to match hidden"),
        });
    }
    for (what, len) in [("labels", input.labels.len()), ("valid", input.valid.len())] {
        if len != n {
            return Err(HeadError::Shape {
                what,
                got: vec![len],
                expected: format!("({n}) rows"),
            });
        }
    }
    let layout = input.layout;
    let p = layout.positions_per_block;
    crate::train::objective::layout::blocks_in(layout, n, "hidden rows")?;
    for (row, (&label, &v)) in input.labels.iter().zip(input.valid).enumerate() {
        if v && label as usize >= vocab {
            return Err(HeadError::LabelOutOfRange {
                label,
                row,
                block: row / p,
                position: layout.first_position + row % p,
                vocab,
            });
        }
    }
    Ok((n, hdim, vocab))
}

/// Domino's branch, checked against the batch of N rows and V tokens: the input a (N, E) made
/// contiguous, E, and the branch itself. None for DFlash.
pub(super) fn check_delta<'a>(
    input: &HeadInput<'a>,
    n: usize,
    vocab: usize,
) -> Result<Option<(Tensor, usize, DeltaBranch<'a>)>, HeadError> {
    let Some(d) = &input.delta else {
        return Ok(None);
    };
    if !(0.0..=1.0).contains(&d.base_ce_weight) {
        return Err(HeadError::BadLambda(d.base_ce_weight));
    }
    let (na, edim) = dims2(d.input, "delta input", "(N, E)")?;
    let (vw, ew) = dims2(d.weight, "delta weight", "(V, E)")?;
    if na != n || vw != vocab || ew != edim {
        return Err(HeadError::Shape {
            what: "delta branch",
            got: vec![na, edim, vw, ew],
            expected: format!("input ({n}, E) and weight ({vocab}, E)"),
        });
    }
    Ok(Some((d.input.contiguous()?, edim, *d)))
}

/// The distillation targets, checked against N rows and V tokens; None when absent or weighted 0.
pub(super) fn check_soft<'a>(input: &HeadInput<'a>, n: usize, vocab: usize) -> Result<Option<SoftTargets<'a>>, HeadError> {
    let Some(s) = input.soft else {
        return Ok(None);
    };
    if !(0.0..=1.0).contains(&s.weight) {
        return Err(HeadError::BadSoftWeight(s.weight));
    }
    if s.k == 0 || s.ids.len() != n * s.k || s.probs.len() != n * s.k {
        return Err(HeadError::Shape {
            what: "soft targets",
            got: vec![s.k, s.ids.len(), s.probs.len()],
            expected: format!("k > 0 and ({n} rows × k) ids and probabilities"),
        });
    }
    if let Some((j, &id)) = s.ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
        let row = j / s.k;
        return Err(HeadError::LabelOutOfRange {
            label: id,
            row,
            block: row / input.layout.positions_per_block,
            position: input.layout.first_position + row % input.layout.positions_per_block,
            vocab,
        });
    }
    Ok((s.weight > 0.0).then_some(s))
}

/// Domino's branch as plain slices.
#[derive(Clone, Copy)]
pub(super) struct DeltaRows<'a> {
    /// (N, E) the input a of the branch's last Linear.
    pub a: &'a [f32],
    /// (V, E) that Linear's weight W₂.
    pub w2: &'a [f32],
    pub edim: usize,
    /// Predicted indices i < this use base logits only.
    pub base_only_prefix: usize,
}

/// The checked batch as plain slices: what every chunk reads.
pub(super) struct Batch<'a> {
    /// (N, H) hidden rows.
    pub h: &'a [f32],
    /// (V, H) the LM head.
    pub w: &'a [f32],
    /// The same, packed for the bf16 products; None: the products run in f32.
    pub w16: Option<&'a super::PackedHead>,
    /// (N) gold tokens and validity.
    pub labels: &'a [u32],
    pub valid: &'a [bool],
    pub layout: BlockLayout,
    pub seed: u64,
    pub hdim: usize,
    pub vocab: usize,
    pub delta: Option<DeltaRows<'a>>,
    /// Distillation targets (weight > 0), rows indexed like `labels`.
    pub soft: Option<SoftTargets<'a>>,
}

impl<'a> Batch<'a> {
    /// Σ_j target_j·row_j of the CE target of batch row `r`: the label's logit, mixed with the
    /// soft targets' expectation when there are any.
    pub fn target_dot(&self, r: usize, row: &[f32]) -> f32 {
        let hard = row[self.labels[r] as usize];
        match &self.soft {
            None => hard,
            Some(s) => {
                let (ids, probs) = s.row(r);
                let soft: f32 = ids.iter().zip(probs).map(|(&i, &p)| p * row[i as usize]).sum();
                (1.0 - s.weight) * hard + s.weight * soft
            }
        }
    }

    /// Subtracts `scale` × the CE target of batch row `r` from the gradient row `out`.
    pub fn sub_target(&self, r: usize, scale: f32, out: &mut [f32]) {
        match &self.soft {
            None => out[self.labels[r] as usize] -= scale,
            Some(s) => {
                out[self.labels[r] as usize] -= scale * (1.0 - s.weight);
                let (ids, probs) = s.row(r);
                for (&i, &p) in ids.iter().zip(probs) {
                    out[i as usize] -= scale * s.weight * p;
                }
            }
        }
    }

    /// The LM head as Wᵀ (H × V), the forward operand.
    pub fn w_t(&self) -> Mat<'a> {
        Mat::new(self.w, 1, self.hdim)
    }

    /// The LM head as W (V × H), the backward operand.
    pub fn w_m(&self) -> Mat<'a> {
        Mat::new(self.w, self.hdim, 1)
    }

    /// E, or 0 without a delta branch.
    pub fn edim(&self) -> usize {
        self.delta.map_or(0, |d| d.edim)
    }
}

/// How the final and base CE terms combine: loss = coef_final·CE_final + coef_base·CE_base.
pub(super) struct Mix {
    /// (1-λ, λ) for Domino; (1, 0) for DFlash.
    pub coef_final: f32,
    pub coef_base: f32,
    pub base_support: Option<BaseSupport>,
    /// The base CE shares the final support and normaliser, and both terms are live: one combined
    /// gradient product serves both.
    pub mixed: bool,
    /// The objective that weighs the base CE (AUF switched off for [`BaseSupport::Unmasked`]).
    pub base_objective: ResolvedObjective,
}

impl Mix {
    pub fn new(objective: &ResolvedObjective, delta: Option<DeltaBranch<'_>>) -> Self {
        let (coef_final, coef_base) = match &delta {
            Some(d) => (1.0 - d.base_ce_weight, d.base_ce_weight),
            None => (1.0, 0.0),
        };
        let base_support = delta.map(|d| d.base_support);
        let mixed =
            base_support == Some(BaseSupport::SameAsFinal) && coef_final > 0.0 && coef_base > 0.0;
        let base_objective = match base_support {
            Some(BaseSupport::Unmasked) => objective.without_auf(),
            _ => objective.clone(),
        };
        Mix {
            coef_final,
            coef_base,
            base_support,
            mixed,
            base_objective,
        }
    }
}
