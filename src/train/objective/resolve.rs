//! Resolution: an [`Objective`] with its block-size defaults filled in and its parameters checked,
//! reduced to one of two weight formulas.

use super::definition::{default_gamma, FailureRule, Normaliser, Objective};
use super::ObjectiveError;

/// AUF options, resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AufRule {
    pub failure: FailureRule,
    pub invalid_transparent: bool,
}

/// D-PACE options, resolved.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DpaceRule {
    pub alpha: f32,
    /// `dpace-prefix`: weights P_i instead of the suffix sums W_i.
    pub prefix_only: bool,
}

/// The weight formula of a resolved objective.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum WeightRule {
    /// v · [exp(-i/γ)] · [alive]: full, decay, auf, auf+decay.
    Mask {
        decay_gamma: Option<f32>,
        auf: Option<AufRule>,
    },
    /// dpace / dpace-prefix.
    Dpace(DpaceRule),
}

/// An objective with its defaults filled in for one block size; computes weights.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedObjective {
    pub name: &'static str,
    pub rule: WeightRule,
    pub norm: Normaliser,
}

impl Objective {
    /// Validates the parameters and fills in the defaults that depend on the block size.
    pub fn resolve(&self, block_size: usize) -> Result<ResolvedObjective, ObjectiveError> {
        let name = self.name();
        let gamma_for = |gamma: &Option<f32>| resolve_gamma(name, *gamma, block_size);
        let mask = |decay_gamma, auf| WeightRule::Mask { decay_gamma, auf };
        let auf = |failure: &FailureRule, invalid_transparent: &bool| {
            Some(AufRule {
                failure: *failure,
                invalid_transparent: *invalid_transparent,
            })
        };
        let dpace = |alpha: &f32, prefix_only| -> Result<WeightRule, ObjectiveError> {
            Ok(WeightRule::Dpace(DpaceRule {
                alpha: check_alpha(name, *alpha)?,
                prefix_only,
            }))
        };
        let (rule, norm, default_norm) = match self {
            Objective::Full { norm } => (mask(None, None), norm, Normaliser::WeightSum),
            Objective::Decay { gamma, norm } => (
                mask(Some(gamma_for(gamma)?), None),
                norm,
                Normaliser::WeightSum,
            ),
            Objective::Auf {
                failure,
                invalid_transparent,
                norm,
            } => (
                mask(None, auf(failure, invalid_transparent)),
                norm,
                Normaliser::WeightSum,
            ),
            Objective::AufDecay {
                gamma,
                failure,
                invalid_transparent,
                norm,
            } => (
                mask(Some(gamma_for(gamma)?), auf(failure, invalid_transparent)),
                norm,
                Normaliser::WeightSum,
            ),
            Objective::Dpace { alpha, norm } => (dpace(alpha, false)?, norm, Normaliser::Blocks),
            Objective::DpacePrefix { alpha, norm } => {
                (dpace(alpha, true)?, norm, Normaliser::Blocks)
            }
        };
        Ok(ResolvedObjective {
            name,
            rule,
            norm: norm.unwrap_or(default_norm),
        })
    }
}

/// The decay γ of objective `name`: the given one, or the recipe's default for the block size.
fn resolve_gamma(
    name: &'static str,
    gamma: Option<f32>,
    block_size: usize,
) -> Result<f32, ObjectiveError> {
    let g = match gamma {
        Some(g) => g,
        None => default_gamma(block_size).ok_or(ObjectiveError::NoDefaultGamma {
            objective: name,
            block_size,
        })?,
    };
    if !(g.is_finite() && g > 0.0) {
        return Err(ObjectiveError::BadParameter {
            objective: name,
            name: "gamma",
            value: g,
            hint: "gamma must be a positive finite number (7 for B = 16)",
        });
    }
    Ok(g)
}

/// D-PACE's α of objective `name`, checked to lie in [0, 1].
fn check_alpha(name: &'static str, alpha: f32) -> Result<f32, ObjectiveError> {
    if (0.0..=1.0).contains(&alpha) {
        Ok(alpha)
    } else {
        Err(ObjectiveError::BadParameter {
            objective: name,
            name: "alpha",
            value: alpha,
            hint: "alpha must lie in [0, 1] (0.5 by default)",
        })
    }
}

impl ResolvedObjective {
    /// Whether weights depend on the drafter's predictions (then the normaliser is known only after
    /// the forward pass).
    pub fn depends_on_predictions(&self) -> bool {
        match self.rule {
            WeightRule::Mask { auf, .. } => auf.is_some(),
            WeightRule::Dpace(_) => true,
        }
    }

    /// Whether a row's weight is zero once an earlier valid row of its block was predicted wrong
    /// (the AUF mask with the argmax failure rule): the head then needs no logits past a block's
    /// first failure, and scores rows position by position until it finds it. A row's weight
    /// depends only on the rows before it, so the weights found that way are the weights of the
    /// whole block (test: `skipping_rows_after_the_first_failure_gives_the_same_loss_and_gradient`).
    pub fn stops_at_first_failure(&self) -> bool {
        matches!(self.rule, WeightRule::Mask { auf: Some(AufRule { failure: FailureRule::Argmax, .. }), .. })
    }

    /// The same objective with the AUF mask switched off (for Domino's "mask only the final CE").
    pub fn without_auf(&self) -> ResolvedObjective {
        let rule = match self.rule {
            WeightRule::Mask { decay_gamma, .. } => WeightRule::Mask {
                decay_gamma,
                auf: None,
            },
            other => other,
        };
        ResolvedObjective {
            name: self.name,
            rule,
            norm: self.norm,
        }
    }
}
