//! The objective as configured: its options, defaults, and the command-line short forms.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

use super::ObjectiveError;

/// D-PACE's smoothing α when none is given.
pub const DEFAULT_DPACE_ALPHA: f32 = 0.5;

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
