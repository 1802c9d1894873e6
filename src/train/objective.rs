//! Training objectives: which predicted block positions the weighted CE counts, and how much.
//!
//! Every objective is one weighted cross-entropy `L = Σ w·CE / normaliser` over all blocks of a
//! batch, with weights computed without gradient (SPEC §3):
//!
//! | objective      | w at predicted index i (0-based)                                            | normaliser |
//! |----------------|-----------------------------------------------------------------------------|------------|
//! | `full`         | v_i                                                                         | Σ w        |
//! | `decay`        | v_i · exp(-i/γ)                                                             | Σ w        |
//! | `auf`          | v_i · alive_i, alive_0 = 1, alive_i = Π_{j<i} (c_j ∨ ¬v_j)                  | Σ w        |
//! | `auf+decay`    | auf × decay                                                                 | Σ w        |
//! | `dpace`        | v_i · W_i, W_i = Σ_{j≥i} P_j·v_j, P_i = Π_{j≤i} s_j, s = (1-α)p+α (¬v → 1)   | real blocks|
//! | `dpace-prefix` | v_i · P_i                                                                   | real blocks|
//!
//! v = valid, c = correct (argmax == label), p = detached probability of the gold token.
//!
//! # Row layout and the two label conventions
//! Rows are laid out block-major: row `b·P + i` is predicted index `i` of block `b`, where `P`
//! (= [`BlockLayout::positions_per_block`]) is the number of predicted positions per block. The block
//! position of index `i` is `first_position + i`:
//! - DFlash: positions 1..B-1 predict x_{a+k}, so `P = B-1`, `first_position = 1`
//!   ([`BlockLayout::dflash`]). Decay exp(-(k-1)/γ) is exp(-i/γ).
//! - Domino (`shift_label`): positions 0..B-1 predict x_{a+k+1}, so `P = B`, `first_position = 0`
//!   ([`BlockLayout::domino`]). Decay exp(-k/γ) is again exp(-i/γ).
//!
//! Every weight rule is written in terms of the predicted index `i`, so both conventions share one
//! routine; `first_position` only labels the per-position metrics.
//!
//! # Choices where the paper is silent (SPEC §3 "uncertain points"), all options with these defaults
//! - AUF failure is `argmax != label` ([`FailureRule::Argmax`]); [`FailureRule::Sample`] instead draws
//!   c ~ Bernoulli(p_gold), which is exactly "a sample from the drafter equals the label".
//! - An invalid position in mid-block is transparent (`invalid_transparent = true`): it neither
//!   counts nor ends the accepted run. With `false` it ends the run like a failure.
//! - Normalisation by Σw for the masked objectives. `dpace` and `dpace-prefix` divide by the number of
//!   real blocks (a block is real when it has at least one valid position). SpecForge divides the
//!   D-PACE loss by its batch size in *sequences*; that is [`Normaliser::Sequences`], which makes the
//!   loss scale with anchors per sequence, so per-block is the default here. Both D-PACE variants
//!   share the normaliser, as in SpecForge.
//! - Default γ: 7 for B = 16, 5 for B = 10, 4 for B = 8 (the DFlash recipe). Other block sizes
//!   require an explicit γ rather than an invented interpolation.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// D-PACE's smoothing α when none is given.
pub const DEFAULT_DPACE_ALPHA: f32 = 0.5;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ObjectiveError {
    #[error(
        "no default decay gamma for block size {block_size}: the DFlash recipe gives 7 for B = 16, \
         5 for B = 10 and 4 for B = 8; set it explicitly, e.g. {{\"type\":\"{objective}\",\"gamma\":6.0}} \
         or --set objective={objective}:6"
    )]
    NoDefaultGamma {
        objective: &'static str,
        block_size: usize,
    },
    #[error(
        "cannot parse objective {input:?}: {reason}; expected full, decay[:gamma], auf, \
         auf+decay[:gamma], dpace[:alpha], dpace-prefix[:alpha], or JSON such as {{\"type\":\"auf\"}}"
    )]
    Parse { input: String, reason: String },
    #[error("objective {objective}: {name} = {value} is out of range; {hint}")]
    BadParameter {
        objective: &'static str,
        name: &'static str,
        value: f32,
        hint: &'static str,
    },
    #[error(
        "row statistics do not match the block layout: {what} has {got} entries but \
         {blocks} blocks × {per_block} positions need {expected}"
    )]
    Shape {
        what: &'static str,
        got: usize,
        expected: usize,
        blocks: usize,
        per_block: usize,
    },
    #[error("block layout has 0 predicted positions per block; use BlockLayout::dflash(B) or ::domino(B)")]
    EmptyLayout,
}

/// How AUF decides that the drafter failed at a position.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureRule {
    /// Failure when argmax(logits) != label (the paper's default).
    #[default]
    Argmax,
    /// Failure when a sample from the drafter's distribution differs from the label: c ~ Bernoulli(p_gold),
    /// drawn from a counter-based generator keyed by (seed, global row), so chunking does not change it.
    Sample,
}

/// What the weighted CE sum is divided by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Normaliser {
    /// Σ w over the batch.
    WeightSum,
    /// Number of valid positions in the batch (the `full` objective's Σw).
    ValidCount,
    /// Number of real blocks (at least one valid position).
    Blocks,
    /// Number of sequences in the batch (SpecForge's D-PACE normaliser).
    Sequences,
}

/// Objective configuration, as written in a training config or given with `--set objective=...`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum Objective {
    #[serde(rename = "full")]
    Full {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        norm: Option<Normaliser>,
    },
    /// DFlash's default: exponentially decaying weights along the block.
    #[serde(rename = "decay")]
    Decay {
        /// None: the default for the block size (see [`default_gamma`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gamma: Option<f32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        norm: Option<Normaliser>,
    },
    /// Accept-Until-Fail: every valid position up to and including the first failure.
    #[serde(rename = "auf")]
    Auf {
        #[serde(default)]
        failure: FailureRule,
        #[serde(default = "default_true")]
        invalid_transparent: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        norm: Option<Normaliser>,
    },
    #[serde(rename = "auf+decay")]
    AufDecay {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gamma: Option<f32>,
        #[serde(default)]
        failure: FailureRule,
        #[serde(default = "default_true")]
        invalid_transparent: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        norm: Option<Normaliser>,
    },
    /// D-PACE (comparison): suffix sums of smoothed cumulative gold-token confidence.
    #[serde(rename = "dpace")]
    Dpace {
        #[serde(default = "default_alpha")]
        alpha: f32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        norm: Option<Normaliser>,
    },
    /// D-PACE's prefix weights P_i alone (SpecForge's "cumulative-confidence-only").
    #[serde(rename = "dpace-prefix")]
    DpacePrefix {
        #[serde(default = "default_alpha")]
        alpha: f32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        norm: Option<Normaliser>,
    },
}

fn default_true() -> bool {
    true
}

fn default_alpha() -> f32 {
    DEFAULT_DPACE_ALPHA
}

/// The DFlash recipe's decay γ for a block size, where it gives one.
pub fn default_gamma(block_size: usize) -> Option<f32> {
    match block_size {
        16 => Some(7.0),
        10 => Some(5.0),
        8 => Some(4.0),
        _ => None,
    }
}

impl Default for Objective {
    /// `decay`, the DFlash default the paper compares against.
    fn default() -> Self {
        Objective::decay()
    }
}

impl Objective {
    pub fn full() -> Self {
        Objective::Full { norm: None }
    }

    pub fn decay() -> Self {
        Objective::Decay {
            gamma: None,
            norm: None,
        }
    }

    pub fn auf() -> Self {
        Objective::Auf {
            failure: FailureRule::Argmax,
            invalid_transparent: true,
            norm: None,
        }
    }

    pub fn auf_decay() -> Self {
        Objective::AufDecay {
            gamma: None,
            failure: FailureRule::Argmax,
            invalid_transparent: true,
            norm: None,
        }
    }

    pub fn dpace(alpha: f32) -> Self {
        Objective::Dpace { alpha, norm: None }
    }

    pub fn dpace_prefix(alpha: f32) -> Self {
        Objective::DpacePrefix { alpha, norm: None }
    }

    /// The config tag: `full`, `decay`, `auf`, `auf+decay`, `dpace`, `dpace-prefix`.
    pub fn name(&self) -> &'static str {
        match self {
            Objective::Full { .. } => "full",
            Objective::Decay { .. } => "decay",
            Objective::Auf { .. } => "auf",
            Objective::AufDecay { .. } => "auf+decay",
            Objective::Dpace { .. } => "dpace",
            Objective::DpacePrefix { .. } => "dpace-prefix",
        }
    }

    /// Validates the parameters and fills in the defaults that depend on the block size.
    pub fn resolve(&self, block_size: usize) -> Result<ResolvedObjective, ObjectiveError> {
        let name = self.name();
        let gamma_for = |gamma: &Option<f32>| -> Result<f32, ObjectiveError> {
            let g = match gamma {
                Some(g) => *g,
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
        };
        let alpha_ok = |alpha: f32| -> Result<f32, ObjectiveError> {
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
        };
        let (rule, norm, default_norm) = match self {
            Objective::Full { norm } => (
                WeightRule::Mask {
                    decay_gamma: None,
                    auf: None,
                },
                norm,
                Normaliser::WeightSum,
            ),
            Objective::Decay { gamma, norm } => (
                WeightRule::Mask {
                    decay_gamma: Some(gamma_for(gamma)?),
                    auf: None,
                },
                norm,
                Normaliser::WeightSum,
            ),
            Objective::Auf {
                failure,
                invalid_transparent,
                norm,
            } => (
                WeightRule::Mask {
                    decay_gamma: None,
                    auf: Some(AufRule {
                        failure: *failure,
                        invalid_transparent: *invalid_transparent,
                    }),
                },
                norm,
                Normaliser::WeightSum,
            ),
            Objective::AufDecay {
                gamma,
                failure,
                invalid_transparent,
                norm,
            } => (
                WeightRule::Mask {
                    decay_gamma: Some(gamma_for(gamma)?),
                    auf: Some(AufRule {
                        failure: *failure,
                        invalid_transparent: *invalid_transparent,
                    }),
                },
                norm,
                Normaliser::WeightSum,
            ),
            Objective::Dpace { alpha, norm } => (
                WeightRule::Dpace(DpaceRule {
                    alpha: alpha_ok(*alpha)?,
                    prefix_only: false,
                }),
                norm,
                Normaliser::Blocks,
            ),
            Objective::DpacePrefix { alpha, norm } => (
                WeightRule::Dpace(DpaceRule {
                    alpha: alpha_ok(*alpha)?,
                    prefix_only: true,
                }),
                norm,
                Normaliser::Blocks,
            ),
        };
        Ok(ResolvedObjective {
            name,
            rule,
            norm: norm.unwrap_or(default_norm),
        })
    }
}

impl FromStr for Objective {
    type Err = ObjectiveError;

    /// Short forms for `--set objective=...`: `full`, `decay`, `decay:7`, `auf`, `auf+decay`,
    /// `auf+decay:7`, `dpace`, `dpace:0.5`, `dpace-prefix`, `dpace-prefix:0.5`; or a JSON object.
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let s = input.trim();
        let parse_err = |reason: String| ObjectiveError::Parse {
            input: input.to_string(),
            reason,
        };
        if s.starts_with('{') {
            return serde_json::from_str(s).map_err(|e| parse_err(e.to_string()));
        }
        let (name, param) = match s.split_once(':') {
            Some((n, p)) => (n.trim(), Some(p.trim())),
            None => (s, None),
        };
        let number = |what: &str| -> Result<Option<f32>, ObjectiveError> {
            match param {
                None => Ok(None),
                Some(p) => p
                    .parse::<f32>()
                    .map(Some)
                    .map_err(|e| parse_err(format!("{what} {p:?} is not a number ({e})"))),
            }
        };
        let no_param = |objective: &str| -> Result<(), ObjectiveError> {
            match param {
                None => Ok(()),
                Some(p) => Err(parse_err(format!(
                    "{objective} takes no parameter, got {p:?}"
                ))),
            }
        };
        match name {
            "full" => {
                no_param("full")?;
                Ok(Objective::full())
            }
            "decay" => Ok(Objective::Decay {
                gamma: number("gamma")?,
                norm: None,
            }),
            "auf" => {
                no_param("auf")?;
                Ok(Objective::auf())
            }
            "auf+decay" => Ok(Objective::AufDecay {
                gamma: number("gamma")?,
                failure: FailureRule::Argmax,
                invalid_transparent: true,
                norm: None,
            }),
            "dpace" => Ok(Objective::dpace(
                number("alpha")?.unwrap_or(DEFAULT_DPACE_ALPHA),
            )),
            "dpace-prefix" => Ok(Objective::dpace_prefix(
                number("alpha")?.unwrap_or(DEFAULT_DPACE_ALPHA),
            )),
            other => Err(parse_err(format!("unknown objective name {other:?}"))),
        }
    }
}

impl fmt::Display for Objective {
    /// The JSON form, which round-trips through [`FromStr`] with every option.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match serde_json::to_string(self) {
            Ok(s) => f.write_str(&s),
            Err(_) => f.write_str(self.name()),
        }
    }
}

/// Layout of the rows of a batch: `positions_per_block` consecutive rows per block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockLayout {
    /// Predicted positions (rows) per block: B-1 for DFlash, B for Domino.
    pub positions_per_block: usize,
    /// Block position of predicted index 0: 1 for DFlash (position 0 is the anchor), 0 for Domino.
    pub first_position: usize,
}

impl BlockLayout {
    /// DFlash: positions 1..B-1 of a block of size B are predicted.
    pub fn dflash(block_size: usize) -> Self {
        BlockLayout {
            positions_per_block: block_size.saturating_sub(1),
            first_position: 1,
        }
    }

    /// Domino (`shift_label`): positions 0..B-1 are predicted (position k predicts x_{a+k+1}).
    pub fn domino(block_size: usize) -> Self {
        BlockLayout {
            positions_per_block: block_size,
            first_position: 0,
        }
    }

    /// Number of blocks in `rows` rows, or a shape error when rows is not a multiple of the block.
    pub fn blocks(&self, rows: usize, what: &'static str) -> Result<usize, ObjectiveError> {
        let per_block = self.positions_per_block;
        if per_block == 0 {
            return Err(ObjectiveError::EmptyLayout);
        }
        if !rows.is_multiple_of(per_block) {
            let blocks = rows / per_block + 1;
            return Err(ObjectiveError::Shape {
                what,
                got: rows,
                expected: blocks * per_block,
                blocks,
                per_block,
            });
        }
        Ok(rows / per_block)
    }
}

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

/// One block's per-position statistics (slices of length P, the predicted positions).
#[derive(Clone, Copy, Debug)]
pub struct BlockRows<'a> {
    pub valid: &'a [bool],
    /// argmax == label.
    pub correct: &'a [bool],
    /// Detached probability of the label.
    pub p_gold: &'a [f32],
    /// Global row index of the block's predicted index 0; keys [`FailureRule::Sample`]'s draws.
    pub first_row: usize,
}

/// A batch's per-row statistics, rows laid out as in [`BlockLayout`].
#[derive(Clone, Copy, Debug)]
pub struct RowStats<'a> {
    pub valid: &'a [bool],
    pub correct: &'a [bool],
    pub p_gold: &'a [f32],
}

/// Sums over blocks that the normaliser needs; add blocks chunk by chunk, then call
/// [`ResolvedObjective::normaliser`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct WeightTotals {
    pub weight_sum: f64,
    pub valid: usize,
    pub real_blocks: usize,
}

impl WeightTotals {
    pub fn add_block(&mut self, valid: &[bool], weights: &[f32]) {
        let n_valid = valid.iter().filter(|&&v| v).count();
        self.valid += n_valid;
        self.real_blocks += usize::from(n_valid > 0);
        self.weight_sum += weights.iter().map(|&w| f64::from(w)).sum::<f64>();
    }
}

/// Per-row weights of a batch and the value the weighted CE sum is divided by.
#[derive(Clone, Debug, PartialEq)]
pub struct Weights {
    pub w: Vec<f32>,
    pub totals: WeightTotals,
    /// 0 when the batch has nothing to learn from (then the loss and its gradient are 0).
    pub normaliser: f32,
}

/// Uniform in [0, 1) from (seed, row) with splitmix64: reproducible and independent of chunking.
fn uniform(seed: u64, row: usize) -> f32 {
    let mut z = seed ^ (row as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    // 24 high bits give every f32 in [0, 1) on a 2^-24 grid.
    (z >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
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

    /// Weights of one block's predicted positions into `out` (length P). `seed` keys the draws of
    /// [`FailureRule::Sample`] and is unused otherwise.
    pub fn block_weights(&self, rows: BlockRows<'_>, seed: u64, out: &mut [f32]) {
        let n = out
            .len()
            .min(rows.valid.len())
            .min(rows.correct.len())
            .min(rows.p_gold.len());
        match self.rule {
            WeightRule::Mask { decay_gamma, auf } => {
                let mut alive = true;
                for (i, w_out) in out.iter_mut().enumerate().take(n) {
                    let v = rows.valid[i];
                    let mut w = if v && alive { 1.0 } else { 0.0 };
                    if let Some(gamma) = decay_gamma {
                        w *= (-(i as f32) / gamma).exp();
                    }
                    *w_out = w;
                    if let Some(rule) = auf {
                        let survives = if v {
                            match rule.failure {
                                FailureRule::Argmax => rows.correct[i],
                                FailureRule::Sample => {
                                    uniform(seed, rows.first_row + i) < rows.p_gold[i]
                                }
                            }
                        } else {
                            rule.invalid_transparent
                        };
                        alive &= survives;
                    }
                }
            }
            WeightRule::Dpace(DpaceRule { alpha, prefix_only }) => {
                // out[i] <- P_i = Π_{j≤i} s_j, invalid s = 1.
                let mut prefix = 1.0f32;
                for ((o, &v), &p) in out.iter_mut().zip(rows.valid).zip(rows.p_gold).take(n) {
                    if v {
                        prefix *= (1.0 - alpha) * p + alpha;
                    }
                    *o = prefix;
                }
                if prefix_only {
                    for (o, &v) in out.iter_mut().zip(rows.valid).take(n) {
                        if !v {
                            *o = 0.0;
                        }
                    }
                } else {
                    // W_i = Σ_{j≥i} P_j v_j, from the end.
                    let mut suffix = 0.0f32;
                    for i in (0..n).rev() {
                        if rows.valid[i] {
                            suffix += out[i];
                            out[i] = suffix;
                        } else {
                            out[i] = 0.0;
                        }
                    }
                }
            }
        }
        for w in out.iter_mut().skip(n) {
            *w = 0.0;
        }
    }

    /// The normaliser for accumulated totals; 0 when there is nothing to divide (empty batch).
    pub fn normaliser(&self, totals: &WeightTotals, num_sequences: usize) -> f32 {
        match self.norm {
            Normaliser::WeightSum => totals.weight_sum as f32,
            Normaliser::ValidCount => totals.valid as f32,
            Normaliser::Blocks => totals.real_blocks as f32,
            Normaliser::Sequences => num_sequences as f32,
        }
    }

    /// Weights for a whole batch (rows block-major as in [`BlockLayout`]).
    pub fn weights(
        &self,
        layout: BlockLayout,
        stats: RowStats<'_>,
        num_sequences: usize,
        seed: u64,
    ) -> Result<Weights, ObjectiveError> {
        let rows = stats.valid.len();
        let blocks = layout.blocks(rows, "valid")?;
        check_len(layout, blocks, "correct", stats.correct.len())?;
        check_len(layout, blocks, "p_gold", stats.p_gold.len())?;
        let per_block = layout.positions_per_block;
        let mut w = vec![0.0f32; rows];
        let mut totals = WeightTotals::default();
        for b in 0..blocks {
            let r = b * per_block..(b + 1) * per_block;
            let block = BlockRows {
                valid: &stats.valid[r.clone()],
                correct: &stats.correct[r.clone()],
                p_gold: &stats.p_gold[r.clone()],
                first_row: r.start,
            };
            self.block_weights(block, seed, &mut w[r.clone()]);
            totals.add_block(block.valid, &w[r]);
        }
        let normaliser = self.normaliser(&totals, num_sequences);
        Ok(Weights {
            w,
            totals,
            normaliser,
        })
    }
}

fn check_len(
    layout: BlockLayout,
    blocks: usize,
    what: &'static str,
    got: usize,
) -> Result<(), ObjectiveError> {
    let expected = blocks * layout.positions_per_block;
    if got != expected {
        return Err(ObjectiveError::Shape {
            what,
            got,
            expected,
            blocks,
            per_block: layout.positions_per_block,
        });
    }
    Ok(())
}

/// Counts behind the training metrics; merge across chunks, micro-batches or steps, then
/// [`MetricCounts::summary`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricCounts {
    /// Block position of predicted index 0 (labels `acc_per_position`).
    pub first_position: usize,
    /// Real blocks (at least one valid position).
    pub blocks: usize,
    pub valid: usize,
    pub correct: usize,
    /// Valid positions with w > 0.
    pub support: usize,
    pub support_correct: usize,
    /// Σ over real blocks of (1 + leading run of correct valid positions).
    pub accept_len_sum: usize,
    pub valid_per_position: Vec<usize>,
    pub correct_per_position: Vec<usize>,
}

/// Per-batch training metrics (SPEC §3 "Metrics to log").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BlockMetrics {
    /// argmax == label over all valid positions (DFlash's `acc`).
    pub acc: f32,
    /// Accuracy over positions with w > 0.
    pub support_acc: f32,
    /// Mean number of positions with w > 0 per real block.
    pub support_size: f32,
    /// Mean over real blocks of 1 + the leading run of correct positions (an invalid position ends it).
    pub accept_len: f32,
    /// Accuracy at predicted index i (block position `first_position + i`); 0 where nothing was valid.
    pub acc_per_position: Vec<f32>,
    pub first_position: usize,
}

fn ratio(num: usize, den: usize) -> f32 {
    if den == 0 {
        0.0
    } else {
        num as f32 / den as f32
    }
}

impl MetricCounts {
    pub fn new(layout: BlockLayout) -> Self {
        MetricCounts {
            first_position: layout.first_position,
            valid_per_position: vec![0; layout.positions_per_block],
            correct_per_position: vec![0; layout.positions_per_block],
            ..Default::default()
        }
    }

    /// Adds one block (slices of length P).
    pub fn add_block(&mut self, valid: &[bool], correct: &[bool], weights: &[f32]) {
        let n = valid.len().min(correct.len()).min(weights.len());
        if self.valid_per_position.len() < n {
            self.valid_per_position.resize(n, 0);
            self.correct_per_position.resize(n, 0);
        }
        let mut any_valid = false;
        let mut run_open = true;
        let mut run = 0usize;
        for i in 0..n {
            let (v, c) = (valid[i], correct[i]);
            if v {
                any_valid = true;
                self.valid += 1;
                self.valid_per_position[i] += 1;
                if c {
                    self.correct += 1;
                    self.correct_per_position[i] += 1;
                }
                if weights[i] > 0.0 {
                    self.support += 1;
                    self.support_correct += usize::from(c);
                }
            }
            if run_open && v && c {
                run += 1;
            } else {
                run_open = false;
            }
        }
        if any_valid {
            self.blocks += 1;
            self.accept_len_sum += 1 + run;
        }
    }

    /// Counts of a whole batch.
    pub fn from_batch(
        layout: BlockLayout,
        valid: &[bool],
        correct: &[bool],
        weights: &[f32],
    ) -> Result<Self, ObjectiveError> {
        let blocks = layout.blocks(valid.len(), "valid")?;
        check_len(layout, blocks, "correct", correct.len())?;
        check_len(layout, blocks, "weights", weights.len())?;
        let p = layout.positions_per_block;
        let mut counts = MetricCounts::new(layout);
        for b in 0..blocks {
            let r = b * p..(b + 1) * p;
            counts.add_block(&valid[r.clone()], &correct[r.clone()], &weights[r]);
        }
        Ok(counts)
    }

    pub fn merge(&mut self, other: &MetricCounts) {
        self.blocks += other.blocks;
        self.valid += other.valid;
        self.correct += other.correct;
        self.support += other.support;
        self.support_correct += other.support_correct;
        self.accept_len_sum += other.accept_len_sum;
        let n = other.valid_per_position.len();
        if self.valid_per_position.len() < n {
            self.valid_per_position.resize(n, 0);
            self.correct_per_position.resize(n, 0);
        }
        for i in 0..n {
            self.valid_per_position[i] += other.valid_per_position[i];
            self.correct_per_position[i] += other.correct_per_position.get(i).copied().unwrap_or(0);
        }
    }

    pub fn summary(&self) -> BlockMetrics {
        BlockMetrics {
            acc: ratio(self.correct, self.valid),
            support_acc: ratio(self.support_correct, self.support),
            support_size: ratio(self.support, self.blocks),
            accept_len: ratio(self.accept_len_sum, self.blocks),
            acc_per_position: self
                .valid_per_position
                .iter()
                .zip(&self.correct_per_position)
                .map(|(&v, &c)| ratio(c, v))
                .collect(),
            first_position: self.first_position,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Random blocks that cover: no failure, failure at the first predicted position, invalid tails
    /// and invalid positions in mid-block.
    fn random_batch(
        rng: &mut ChaCha8Rng,
        blocks: usize,
        p: usize,
    ) -> (Vec<bool>, Vec<bool>, Vec<f32>) {
        let mut valid = Vec::new();
        let mut correct = Vec::new();
        let mut p_gold = Vec::new();
        for b in 0..blocks {
            let tail = match b % 4 {
                0 => p,
                _ => rng.gen_range(1..=p),
            };
            for i in 0..p {
                let v = match b % 5 {
                    0 => true,
                    1 => i < tail,
                    2 => i < tail && rng.gen_bool(0.8),
                    3 => false,
                    _ => rng.gen_bool(0.7),
                };
                let c = match b % 3 {
                    0 => true,
                    1 => i != 0,
                    _ => rng.gen_bool(0.6),
                };
                valid.push(v);
                correct.push(c);
                p_gold.push(rng.gen_range(0.0..1.0));
            }
        }
        (valid, correct, p_gold)
    }

    /// The SPEC §3 formulas, written per position with explicit products and sums.
    fn naive_weights(obj: &Objective, gamma: f32, v: &[bool], c: &[bool], p: &[f32]) -> Vec<f32> {
        let n = v.len();
        let vf = |i: usize| if v[i] { 1.0f32 } else { 0.0 };
        let alive = |i: usize, transparent: bool| -> f32 {
            let ok = (0..i).all(|j| if v[j] { c[j] } else { transparent });
            if ok {
                1.0
            } else {
                0.0
            }
        };
        let s = |l: usize, alpha: f32| {
            if v[l] {
                (1.0 - alpha) * p[l] + alpha
            } else {
                1.0
            }
        };
        let prefix = |j: usize, alpha: f32| (0..=j).map(|l| s(l, alpha)).product::<f32>();
        (0..n)
            .map(|i| match obj {
                Objective::Full { .. } => vf(i),
                Objective::Decay { .. } => vf(i) * (-(i as f32) / gamma).exp(),
                Objective::Auf {
                    invalid_transparent,
                    ..
                } => vf(i) * alive(i, *invalid_transparent),
                Objective::AufDecay {
                    invalid_transparent,
                    ..
                } => vf(i) * alive(i, *invalid_transparent) * (-(i as f32) / gamma).exp(),
                Objective::Dpace { alpha, .. } => {
                    vf(i) * (i..n).map(|j| prefix(j, *alpha) * vf(j)).sum::<f32>()
                }
                Objective::DpacePrefix { alpha, .. } => vf(i) * prefix(i, *alpha),
            })
            .collect()
    }

    fn all_objectives() -> Vec<Objective> {
        vec![
            Objective::full(),
            Objective::decay(),
            Objective::auf(),
            Objective::Auf {
                failure: FailureRule::Argmax,
                invalid_transparent: false,
                norm: None,
            },
            Objective::auf_decay(),
            Objective::dpace(0.5),
            Objective::dpace(0.2),
            Objective::dpace_prefix(0.5),
        ]
    }

    #[test]
    fn every_objective_matches_the_naive_per_position_formulas() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for layout in [BlockLayout::dflash(16), BlockLayout::domino(16)] {
            let p = layout.positions_per_block;
            let blocks = 40;
            let (valid, correct, p_gold) = random_batch(&mut rng, blocks, p);
            for obj in all_objectives() {
                let resolved = obj.resolve(16).unwrap();
                let got = resolved
                    .weights(
                        layout,
                        RowStats {
                            valid: &valid,
                            correct: &correct,
                            p_gold: &p_gold,
                        },
                        3,
                        0,
                    )
                    .unwrap();
                let mut sum = 0.0f64;
                let mut real = 0usize;
                for b in 0..blocks {
                    let r = b * p..(b + 1) * p;
                    let want = naive_weights(
                        &obj,
                        7.0,
                        &valid[r.clone()],
                        &correct[r.clone()],
                        &p_gold[r.clone()],
                    );
                    for (i, (&g, &w)) in got.w[r.clone()].iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                            "{} block {b} index {i}: got {g}, want {w}",
                            obj.name()
                        );
                    }
                    sum += want.iter().map(|&w| w as f64).sum::<f64>();
                    real += usize::from(valid[r].iter().any(|&v| v));
                }
                let want_norm = match obj {
                    Objective::Dpace { .. } | Objective::DpacePrefix { .. } => real as f32,
                    _ => sum as f32,
                };
                assert!(
                    (got.normaliser - want_norm).abs() <= 1e-4 * want_norm.max(1.0),
                    "{}",
                    obj.name()
                );
            }
        }
    }

    fn auf_weights(valid: &[bool], correct: &[bool], transparent: bool) -> Vec<f32> {
        let obj = Objective::Auf {
            failure: FailureRule::Argmax,
            invalid_transparent: transparent,
            norm: None,
        };
        let layout = BlockLayout {
            positions_per_block: valid.len(),
            first_position: 1,
        };
        let p_gold = vec![0.5; valid.len()];
        obj.resolve(16)
            .unwrap()
            .weights(
                layout,
                RowStats {
                    valid,
                    correct,
                    p_gold: &p_gold,
                },
                1,
                0,
            )
            .unwrap()
            .w
    }

    #[test]
    fn auf_support_includes_the_first_failure_and_nothing_after_it() {
        let t = true;
        let f = false;
        assert_eq!(
            auf_weights(&[t; 5], &[t, t, f, t, t], true),
            vec![1.0, 1.0, 1.0, 0.0, 0.0]
        );
        // Failure at the first predicted position keeps only that position.
        assert_eq!(
            auf_weights(&[t; 4], &[f, t, t, t], true),
            vec![1.0, 0.0, 0.0, 0.0]
        );
        // No failure keeps every valid position.
        assert_eq!(auf_weights(&[t; 4], &[t; 4], true), vec![1.0; 4]);
        // Invalid tail drops out.
        assert_eq!(
            auf_weights(&[t, t, t, f, f], &[t; 5], true),
            vec![1.0, 1.0, 1.0, 0.0, 0.0]
        );
    }

    #[test]
    fn an_invalid_mid_block_position_is_transparent_unless_configured_otherwise() {
        let (t, f) = (true, false);
        let valid = [t, f, t, t];
        let correct = [t, f, f, t];
        assert_eq!(
            auf_weights(&valid, &correct, true),
            vec![1.0, 0.0, 1.0, 0.0]
        );
        assert_eq!(
            auf_weights(&valid, &correct, false),
            vec![1.0, 0.0, 0.0, 0.0]
        );
    }

    #[test]
    fn sampled_failure_follows_the_gold_probability() {
        let obj = Objective::Auf {
            failure: FailureRule::Sample,
            invalid_transparent: true,
            norm: None,
        }
        .resolve(16)
        .unwrap();
        let layout = BlockLayout {
            positions_per_block: 2,
            first_position: 1,
        };
        let blocks = 4000;
        let valid = vec![true; 2 * blocks];
        let correct = vec![false; 2 * blocks];
        let mut survived = 0;
        for (p, expect) in [(1.0f32, 1.0f32), (0.0, 0.0), (0.3, 0.3)] {
            let p_gold = vec![p; 2 * blocks];
            let w = obj
                .weights(
                    layout,
                    RowStats {
                        valid: &valid,
                        correct: &correct,
                        p_gold: &p_gold,
                    },
                    1,
                    42,
                )
                .unwrap();
            let kept = (0..blocks).filter(|b| w.w[2 * b + 1] > 0.0).count();
            let frac = kept as f32 / blocks as f32;
            assert!((frac - expect).abs() < 0.03, "p = {p}: survival {frac}");
            survived += kept;
            // Argmax correctness plays no role under sampling, and the first position is always kept.
            assert!((0..blocks).all(|b| w.w[2 * b] == 1.0));
        }
        assert!(survived > 0);
        // Same seed, same draws; another seed, other draws.
        let p_gold = vec![0.5; 2 * blocks];
        let stats = RowStats {
            valid: &valid,
            correct: &correct,
            p_gold: &p_gold,
        };
        let a = obj.weights(layout, stats, 1, 1).unwrap();
        let b = obj.weights(layout, stats, 1, 1).unwrap();
        let c = obj.weights(layout, stats, 1, 2).unwrap();
        assert_eq!(a, b);
        assert_ne!(a.w, c.w);
    }

    #[test]
    fn metrics_match_a_direct_count() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let layout = BlockLayout::dflash(8);
        let p = layout.positions_per_block;
        let blocks = 30;
        let (valid, correct, p_gold) = random_batch(&mut rng, blocks, p);
        let obj = Objective::auf().resolve(8).unwrap();
        let w = obj
            .weights(
                layout,
                RowStats {
                    valid: &valid,
                    correct: &correct,
                    p_gold: &p_gold,
                },
                1,
                0,
            )
            .unwrap();
        let m = MetricCounts::from_batch(layout, &valid, &correct, &w.w)
            .unwrap()
            .summary();

        let n_valid = valid.iter().filter(|&&v| v).count();
        let n_correct = valid.iter().zip(&correct).filter(|(&v, &c)| v && c).count();
        let sup: Vec<usize> = (0..valid.len()).filter(|&r| w.w[r] > 0.0).collect();
        let sup_correct = sup.iter().filter(|&&r| correct[r]).count();
        let real: Vec<usize> = (0..blocks)
            .filter(|b| valid[b * p..(b + 1) * p].iter().any(|&v| v))
            .collect();
        let accept: usize = real
            .iter()
            .map(|b| {
                1 + (0..p)
                    .take_while(|&i| valid[b * p + i] && correct[b * p + i])
                    .count()
            })
            .sum();
        assert!((m.acc - n_correct as f32 / n_valid as f32).abs() < 1e-6);
        assert!((m.support_acc - sup_correct as f32 / sup.len() as f32).abs() < 1e-6);
        assert!((m.support_size - sup.len() as f32 / real.len() as f32).abs() < 1e-6);
        assert!((m.accept_len - accept as f32 / real.len() as f32).abs() < 1e-6);
        assert_eq!(m.acc_per_position.len(), p);
        for i in 0..p {
            let v = (0..blocks).filter(|b| valid[b * p + i]).count();
            let c = (0..blocks)
                .filter(|b| valid[b * p + i] && correct[b * p + i])
                .count();
            let want = if v == 0 { 0.0 } else { c as f32 / v as f32 };
            assert!((m.acc_per_position[i] - want).abs() < 1e-6);
        }
        // AUF's support holds at most one failure per block: the last supported position.
        let counts = MetricCounts::from_batch(layout, &valid, &correct, &w.w).unwrap();
        assert!(counts.support_correct + counts.blocks >= counts.support);
    }

    #[test]
    fn an_invalid_position_ends_the_accepted_run() {
        let layout = BlockLayout {
            positions_per_block: 4,
            first_position: 1,
        };
        let mut counts = MetricCounts::new(layout);
        counts.add_block(
            &[true, false, true, true],
            &[true, true, true, true],
            &[1.0; 4],
        );
        counts.add_block(
            &[true, true, true, true],
            &[true, true, true, true],
            &[1.0; 4],
        );
        counts.add_block(&[false; 4], &[true; 4], &[0.0; 4]);
        let m = counts.summary();
        assert_eq!(counts.blocks, 2);
        assert_eq!(m.accept_len, (2.0 + 5.0) / 2.0);
        let mut merged = MetricCounts::new(layout);
        merged.merge(&counts);
        merged.merge(&counts);
        assert_eq!(merged.summary().accept_len, m.accept_len);
        assert_eq!(merged.valid, 2 * counts.valid);
    }

    #[test]
    fn config_json_round_trips_and_rejects_unknown_fields() {
        let cases = [
            (r#"{"type":"full"}"#, Objective::full()),
            (
                r#"{"type":"decay","gamma":7.0}"#,
                Objective::Decay {
                    gamma: Some(7.0),
                    norm: None,
                },
            ),
            (r#"{"type":"auf"}"#, Objective::auf()),
            (
                r#"{"type":"auf+decay","gamma":7.0}"#,
                Objective::AufDecay {
                    gamma: Some(7.0),
                    failure: FailureRule::Argmax,
                    invalid_transparent: true,
                    norm: None,
                },
            ),
            (r#"{"type":"dpace","alpha":0.5}"#, Objective::dpace(0.5)),
            (
                r#"{"type":"dpace-prefix","alpha":0.25}"#,
                Objective::dpace_prefix(0.25),
            ),
            (
                r#"{"type":"auf","failure":"sample","invalid_transparent":false,"norm":"valid-count"}"#,
                Objective::Auf {
                    failure: FailureRule::Sample,
                    invalid_transparent: false,
                    norm: Some(Normaliser::ValidCount),
                },
            ),
        ];
        for (json, want) in cases {
            let got: Objective = serde_json::from_str(json).unwrap();
            assert_eq!(got, want, "{json}");
            let again: Objective = got.to_string().parse().unwrap();
            assert_eq!(again, want);
        }
        assert!(serde_json::from_str::<Objective>(r#"{"type":"auf","gama":7}"#).is_err());
        assert!(serde_json::from_str::<Objective>(r#"{"type":"full","gamma":7}"#).is_err());
        assert!(serde_json::from_str::<Objective>(r#"{"type":"aff"}"#).is_err());
    }

    #[test]
    fn short_forms_parse_for_the_command_line() {
        assert_eq!("auf".parse::<Objective>().unwrap(), Objective::auf());
        assert_eq!("decay".parse::<Objective>().unwrap(), Objective::decay());
        assert_eq!(
            "decay:7".parse::<Objective>().unwrap(),
            Objective::Decay {
                gamma: Some(7.0),
                norm: None
            }
        );
        assert_eq!(
            "auf+decay:5"
                .parse::<Objective>()
                .unwrap()
                .resolve(10)
                .unwrap()
                .rule,
            WeightRule::Mask {
                decay_gamma: Some(5.0),
                auf: Some(AufRule {
                    failure: FailureRule::Argmax,
                    invalid_transparent: true
                })
            }
        );
        assert_eq!(
            "dpace:0.5".parse::<Objective>().unwrap(),
            Objective::dpace(0.5)
        );
        assert_eq!(
            "dpace-prefix".parse::<Objective>().unwrap(),
            Objective::dpace_prefix(0.5)
        );
        assert_eq!(
            r#"{"type":"full"}"#.parse::<Objective>().unwrap(),
            Objective::full()
        );
        for bad in ["auff", "auf:3", "decay:x", "full:1", ""] {
            assert!(
                matches!(bad.parse::<Objective>(), Err(ObjectiveError::Parse { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn decay_gamma_defaults_follow_the_block_size_and_other_sizes_must_set_it() {
        let gamma = |b: usize| match Objective::decay().resolve(b).unwrap().rule {
            WeightRule::Mask { decay_gamma, .. } => decay_gamma,
            _ => None,
        };
        assert_eq!(gamma(16), Some(7.0));
        assert_eq!(gamma(10), Some(5.0));
        assert_eq!(gamma(8), Some(4.0));
        assert!(matches!(
            Objective::auf_decay().resolve(12),
            Err(ObjectiveError::NoDefaultGamma { block_size: 12, .. })
        ));
        assert!(Objective::Decay {
            gamma: Some(3.0),
            norm: None
        }
        .resolve(12)
        .is_ok());
        assert!(Objective::Decay {
            gamma: Some(-1.0),
            norm: None
        }
        .resolve(16)
        .is_err());
        assert!(Objective::dpace(1.5).resolve(16).is_err());
    }

    #[test]
    fn rows_that_do_not_fill_whole_blocks_are_rejected() {
        let obj = Objective::full().resolve(16).unwrap();
        let v = vec![true; 20];
        let err = obj
            .weights(
                BlockLayout::dflash(16),
                RowStats {
                    valid: &v,
                    correct: &v,
                    p_gold: &[0.5; 20],
                },
                1,
                0,
            )
            .unwrap_err();
        assert!(matches!(
            err,
            ObjectiveError::Shape {
                got: 20,
                per_block: 15,
                ..
            }
        ));
    }
}
