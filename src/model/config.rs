//! Target model configuration, with HF `config.json` field names.
//!
//! One decoder serves three families; they differ only in a few switches:
//! | family | qkv bias | q/k norm | head_dim          |
//! |--------|----------|----------|-------------------|
//! | llama  | optional (`attention_bias`) | no | hidden / heads unless given |
//! | qwen2  | yes      | no       | hidden / heads    |
//! | qwen3  | optional (`attention_bias`) | yes | explicit `head_dim` |

use serde::Deserialize;

use super::ModelError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Llama,
    Qwen2,
    Qwen3,
}

impl Family {
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "llama" | "smollm" | "mistral" => Some(Family::Llama),
            "qwen2" => Some(Family::Qwen2),
            "qwen3" => Some(Family::Qwen3),
            _ => None,
        }
    }
}

/// The resolved configuration the runtime uses (all derived fields filled in).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TargetConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub qk_norm: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// `config.json` as HF writes it. Unknown keys are ignored here (HF configs carry many
/// irrelevant keys); the keys that change the computation are validated in `resolve`.
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    pub model_type: Option<String>,
    pub architectures: Option<Vec<String>>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    /// Top-level in most checkpoints; transformers 5 writes it inside `rope_parameters`.
    pub rope_theta: Option<f64>,
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub attention_bias: Option<bool>,
    pub hidden_act: Option<String>,
    pub rope_scaling: Option<serde_json::Value>,
    pub bos_token_id: Option<serde_json::Value>,
    pub eos_token_id: Option<serde_json::Value>,
    pub use_sliding_window: Option<bool>,
}

fn default_rms_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    4096
}

/// Reads one or a list of token ids, as HF configs write `eos_token_id`.
pub fn token_ids(v: &Option<serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
        _ => Vec::new(),
    }
}

impl HfConfig {
    pub fn resolve(&self, path: &str) -> Result<TargetConfig, ModelError> {
        let model_type = self
            .model_type
            .clone()
            .or_else(|| {
                self.architectures.as_ref().and_then(|a| a.first()).map(|a| {
                    a.trim_end_matches("ForCausalLM").to_ascii_lowercase()
                })
            })
            .unwrap_or_default();
        let family = Family::from_model_type(&model_type).ok_or_else(|| ModelError::Unsupported {
            path: path.to_string(),
            what: format!(
                "model_type {model_type:?}; supported families are llama, qwen2 and qwen3"
            ),
        })?;
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(ModelError::Unsupported {
                    path: path.to_string(),
                    what: format!("hidden_act {act:?} (only silu is implemented)"),
                });
            }
        }
        let rope_theta = self
            .rope_theta
            .or_else(|| self.rope_parameters.as_ref().and_then(|p| p.get("rope_theta")).and_then(|v| v.as_f64()))
            .unwrap_or(10_000.0);
        for rs in [&self.rope_scaling, &self.rope_parameters].into_iter().flatten() {
            let kind = rs
                .get("rope_type")
                .or_else(|| rs.get("type"))
                .and_then(|v| v.as_str())
                .unwrap_or("default");
            if !rs.is_null() && kind != "default" {
                return Err(ModelError::Unsupported {
                    path: path.to_string(),
                    what: format!("rope_scaling type {kind:?} (only plain RoPE is implemented)"),
                });
            }
        }
        if self.use_sliding_window == Some(true) {
            return Err(ModelError::Unsupported {
                path: path.to_string(),
                what: "use_sliding_window = true".into(),
            });
        }
        let heads = self.num_attention_heads;
        let kv_heads = self.num_key_value_heads.unwrap_or(heads);
        let head_dim = self.head_dim.unwrap_or(self.hidden_size / heads.max(1));
        let cfg = TargetConfig {
            family,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rope_theta,
            rms_norm_eps: self.rms_norm_eps,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            attention_bias: match family {
                Family::Qwen2 => true,
                _ => self.attention_bias.unwrap_or(false),
            },
            qk_norm: family == Family::Qwen3,
            bos_token_id: token_ids(&self.bos_token_id).first().copied(),
            eos_token_ids: token_ids(&self.eos_token_id),
        };
        cfg.validate(path)?;
        Ok(cfg)
    }
}

impl TargetConfig {
    pub fn validate(&self, path: &str) -> Result<(), ModelError> {
        let bad = |what: String| ModelError::InvalidConfig { path: path.to_string(), what };
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 {
            return Err(bad("num_attention_heads and num_key_value_heads must be > 0".into()));
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(bad(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            )));
        }
        if self.head_dim == 0 || self.head_dim % 2 != 0 {
            return Err(bad(format!("head_dim {} must be even and > 0", self.head_dim)));
        }
        if self.hidden_size == 0 || self.vocab_size == 0 || self.num_hidden_layers == 0 {
            return Err(bad("hidden_size, vocab_size and num_hidden_layers must be > 0".into()));
        }
        Ok(())
    }

    /// Number of groups of query heads that share one KV head.
    pub fn kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}
