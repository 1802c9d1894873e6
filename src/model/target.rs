//! The target decoder: one implementation for the Llama, Qwen2 and Qwen3 families.
//!
//! Batch size is 1. A forward takes a chunk of new tokens, places them after the cached
//! positions, and returns logits for every new position plus the hidden states after any
//! requested decoder layers (HF indexing: tap i is the output of layer i, `hidden_states[i+1]`,
//! before the final norm). The target is frozen, so its fast fused ops (rms_norm, rope,
//! softmax) are fine here; training paths use `crate::nn::ops`.

use candle_core::{DType, Device, Tensor, D};

use super::config::TargetConfig;
use super::attention::causal_attention;
use super::kv_cache::KvCache;
use super::weights::{Linear, WeightSource, WeightsMode};
use super::ModelError;

#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn load(src: &mut WeightSource, name: &str, dim: usize, eps: f64) -> Result<Self, ModelError> {
        Ok(Self { weight: src.tensor(name, &[dim])?, eps: eps as f32 })
    }
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)
    }
}

/// cos/sin tables for rotate-half RoPE, grown on demand.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f64, max_pos: usize) -> candle_core::Result<Self> {
        let inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1.0 / (theta.powf(2.0 * i as f64 / head_dim as f64)) as f32)
            .collect();
        let (cos, sin) = Self::tables(&inv_freq, max_pos)?;
        Ok(Self { inv_freq, cos, sin })
    }

    fn tables(inv_freq: &[f32], n: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let half = inv_freq.len();
        let mut angles = Vec::with_capacity(n * half);
        for p in 0..n {
            for f in inv_freq {
                angles.push(p as f32 * f);
            }
        }
        let a = Tensor::from_vec(angles, (n, half), &Device::Cpu)?;
        Ok((a.cos()?, a.sin()?))
    }

    /// (cos, sin) rows for positions start..start+n, each (n, head_dim/2).
    pub fn at(&mut self, start: usize, n: usize) -> candle_core::Result<(Tensor, Tensor)> {
        if start + n > self.cos.dim(0)? {
            let (cos, sin) = Self::tables(&self.inv_freq, (start + n).next_power_of_two())?;
            self.cos = cos;
            self.sin = sin;
        }
        Ok((self.cos.narrow(0, start, n)?, self.sin.narrow(0, start, n)?))
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

#[derive(Debug, Clone)]
struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

#[derive(Debug, Clone)]
struct Layer {
    input_norm: RmsNorm,
    attn: Attention,
    post_norm: RmsNorm,
    mlp: Mlp,
}

/// Embedding rows kept in f32: the drafter shares them, frozen.
#[derive(Debug, Clone)]
pub struct Target {
    cfg: TargetConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: std::sync::Arc<std::sync::Mutex<Rope>>,
    mode: WeightsMode,
}

/// What a forward returns.
#[derive(Debug)]
pub struct ForwardOutput {
    /// (n, vocab) for `Logits::All`, (1, vocab) for `Logits::Last`, None for `Logits::None`.
    pub logits: Option<Tensor>,
    /// One (n, hidden) tensor per requested tap, in the order asked.
    pub taps: Vec<Tensor>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    All,
    Last,
    None,
}

impl Target {
    pub fn load(src: &mut WeightSource, cfg: TargetConfig, mode: WeightsMode) -> Result<Self, ModelError> {
        let h = cfg.hidden_size;
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let embed = src.tensor("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let bias = cfg.attention_bias;
            let attn = Attention {
                q_proj: src.linear(&format!("{p}.self_attn.q_proj"), (nh * hd, h), bias, mode)?,
                k_proj: src.linear(&format!("{p}.self_attn.k_proj"), (nkv * hd, h), bias, mode)?,
                v_proj: src.linear(&format!("{p}.self_attn.v_proj"), (nkv * hd, h), bias, mode)?,
                o_proj: src.linear(&format!("{p}.self_attn.o_proj"), (h, nh * hd), false, mode)?,
                q_norm: if cfg.qk_norm {
                    Some(RmsNorm::load(src, &format!("{p}.self_attn.q_norm.weight"), hd, cfg.rms_norm_eps)?)
                } else {
                    None
                },
                k_norm: if cfg.qk_norm {
                    Some(RmsNorm::load(src, &format!("{p}.self_attn.k_norm.weight"), hd, cfg.rms_norm_eps)?)
                } else {
                    None
                },
                heads: nh,
                kv_heads: nkv,
                head_dim: hd,
            };
            let mlp = Mlp {
                gate: src.linear(&format!("{p}.mlp.gate_proj"), (cfg.intermediate_size, h), false, mode)?,
                up: src.linear(&format!("{p}.mlp.up_proj"), (cfg.intermediate_size, h), false, mode)?,
                down: src.linear(&format!("{p}.mlp.down_proj"), (h, cfg.intermediate_size), false, mode)?,
            };
            layers.push(Layer {
                input_norm: RmsNorm::load(src, &format!("{p}.input_layernorm.weight"), h, cfg.rms_norm_eps)?,
                attn,
                post_norm: RmsNorm::load(src, &format!("{p}.post_attention_layernorm.weight"), h, cfg.rms_norm_eps)?,
                mlp,
            });
        }
        let norm = RmsNorm::load(src, "model.norm.weight", h, cfg.rms_norm_eps)?;
        let head_name = if !cfg.tie_word_embeddings && src.has("lm_head.weight") {
            "lm_head"
        } else if cfg.tie_word_embeddings || !src.has("lm_head.weight") {
            "model.embed_tokens"
        } else {
            "lm_head"
        };
        let lm_head = src.linear(head_name, (cfg.vocab_size, h), false, mode)?;
        let rope = Rope::new(hd, cfg.rope_theta, 4096.min(cfg.max_position_embeddings.max(1)))?;
        Ok(Self { cfg, embed, layers, norm, lm_head, rope: std::sync::Arc::new(std::sync::Mutex::new(rope)), mode })
    }

    pub fn config(&self) -> &TargetConfig {
        &self.cfg
    }

    pub fn weights_mode(&self) -> WeightsMode {
        self.mode
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.cfg.num_hidden_layers, self.cfg.num_key_value_heads, self.cfg.head_dim)
    }

    /// The final RMSNorm weight (hidden), applied before the LM head.
    pub fn final_norm_weight(&self) -> &Tensor {
        &self.norm.weight
    }

    /// The frozen embedding matrix, (vocab, hidden) f32.
    pub fn embed_weight(&self) -> &Tensor {
        &self.embed
    }

    /// The frozen LM head as f32 (vocab, hidden): for training, where exact gradients matter.
    pub fn lm_head_weight_f32(&self) -> candle_core::Result<Tensor> {
        self.lm_head.weight_f32()
    }

    /// ids -> (n, hidden) embeddings.
    pub fn embed(&self, ids: &[u32]) -> candle_core::Result<Tensor> {
        let ids = Tensor::new(ids, &Device::Cpu)?;
        self.embed.index_select(&ids, 0)
    }

    /// (n, hidden) -> (n, vocab) with the target's LM head (no final norm: callers that hold
    /// residual-stream states apply their own norm first).
    pub fn lm_head(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        self.lm_head.forward(hidden)
    }

    /// Runs `tokens` at positions cache.len().. and appends their K/V to the cache.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, taps: &[usize], logits: Logits) -> Result<ForwardOutput, ModelError> {
        let mut out = self.forward_batch(&mut [BatchSeq { tokens, cache }], taps, logits)?;
        out.pop().ok_or(ModelError::EmptyInput)
    }

    /// Several sequences in one forward, each with its own tokens and its own cache (a server
    /// verifying the blocks of several requests at once). The rows of every sequence go
    /// through the linears together (projections, MLP, LM head: one pass over the weights);
    /// RoPE, the cache and attention are per sequence. Each output is what the sequence's own
    /// [`Target::forward`] returns: with row-independent kernels (q8) bit for bit, so batching
    /// keeps T = 0 speculative decoding exact.
    pub fn forward_batch(&self, seqs: &mut [BatchSeq<'_>], taps: &[usize], logits: Logits) -> Result<Vec<ForwardOutput>, ModelError> {
        if let Some(&bad) = taps.iter().find(|&&l| l >= self.cfg.num_hidden_layers) {
            return Err(ModelError::LayerOutOfRange { layer: bad, layers: self.cfg.num_hidden_layers });
        }
        for s in seqs.iter() {
            let n = s.tokens.len();
            if n == 0 {
                return Err(ModelError::EmptyInput);
            }
            if let Some(&bad) = s.tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
                return Err(ModelError::TokenOutOfRange { token: bad, vocab: self.cfg.vocab_size });
            }
            if s.cache.len() + n > self.cfg.max_position_embeddings {
                return Err(ModelError::ContextOverflow { needed: s.cache.len() + n, max: self.cfg.max_position_embeddings });
            }
        }
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let mut all_tokens = Vec::new();
        let mut segs = Vec::with_capacity(seqs.len());
        for s in seqs.iter_mut() {
            let (start, n) = (s.cache.len(), s.tokens.len());
            let (cos, sin) = {
                let mut rope = self.rope.lock().map_err(|_| ModelError::Poisoned)?;
                rope.at(start, n)?
            };
            s.cache.reserve(n);
            segs.push(Segment { row: all_tokens.len(), n, cache: &mut *s.cache, cos, sin });
            all_tokens.extend_from_slice(s.tokens);
        }
        // 1. (N,) -> (N, H), N = the rows of every sequence
        let mut x = self.embed(&all_tokens)?;
        let mut tapped: Vec<Option<Tensor>> = vec![None; taps.len()];
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, i, &mut segs)?;
            for (slot, &t) in tapped.iter_mut().zip(taps) {
                if t == i {
                    *slot = Some(x.clone());
                }
            }
        }
        for seg in segs.iter_mut() {
            seg.cache.advance(seg.n);
        }
        // 2. logits: (N, vocab) for All; one row per sequence, its last, for Last
        let rows = match logits {
            Logits::None => None,
            Logits::All => Some(self.lm_head.forward(&self.norm.forward(&x)?)?),
            Logits::Last if segs.len() == 1 => Some(self.lm_head.forward(&self.norm.forward(&x.narrow(0, segs[0].n - 1, 1)?)?)?),
            Logits::Last => {
                let last: Vec<u32> = segs.iter().map(|s| (s.row + s.n - 1) as u32).collect();
                let last = Tensor::new(last.as_slice(), &Device::Cpu)?;
                Some(self.lm_head.forward(&self.norm.forward(&x.index_select(&last, 0)?)?)?)
            }
        };
        let taps = tapped.into_iter().map(|t| t.ok_or(ModelError::Poisoned)).collect::<Result<Vec<_>, _>>()?;
        let single = segs.len() == 1;
        let mut out = Vec::with_capacity(segs.len());
        for (j, seg) in segs.iter().enumerate() {
            let logits = match (&rows, logits) {
                (None, _) => None,
                (Some(r), _) if single => Some(r.clone()),
                (Some(r), Logits::Last) => Some(r.narrow(0, j, 1)?),
                (Some(r), _) => Some(r.narrow(0, seg.row, seg.n)?),
            };
            let taps = if single {
                taps.clone()
            } else {
                taps.iter().map(|t| t.narrow(0, seg.row, seg.n)).collect::<candle_core::Result<Vec<_>>>()?
            };
            out.push(ForwardOutput { logits, taps });
        }
        Ok(out)
    }
}

/// One sequence of [`Target::forward_batch`]: its new tokens and its cache.
pub struct BatchSeq<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
}

/// A sequence's rows row..row+n inside a batched forward, its cache and RoPE rows.
struct Segment<'a> {
    row: usize,
    n: usize,
    cache: &'a mut KvCache,
    cos: Tensor,
    sin: Tensor,
}

impl Layer {
    fn forward(&self, x: &Tensor, idx: usize, segs: &mut [Segment<'_>]) -> candle_core::Result<Tensor> {
        let h = self.input_norm.forward(x)?;
        let h = self.attn.forward(&h, idx, segs)?;
        let x = (x + h)?;
        let h = self.post_norm.forward(&x)?;
        let h = self.mlp.forward(&h)?;
        x + h
    }
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let g = candle_nn::ops::silu(&self.gate.forward(x)?)?;
        self.down.forward(&(g * self.up.forward(x)?)?)
    }
}

impl Attention {
    fn forward(&self, x: &Tensor, idx: usize, segs: &mut [Segment<'_>]) -> candle_core::Result<Tensor> {
        let n_all = x.dim(0)?;
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.head_dim);
        // 1. (N, H) -> (N, heads, hd), every sequence's rows at once
        let q = self.q_proj.forward(x)?.reshape((n_all, nh, hd))?;
        let k = self.k_proj.forward(x)?.reshape((n_all, nkv, hd))?;
        let v = self.v_proj.forward(x)?.reshape((n_all, nkv, hd))?;
        // 2. per-head q/k norm (Qwen3) before RoPE
        let q = match &self.q_norm { Some(nm) => nm.forward(&q)?, None => q };
        let k = match &self.k_norm { Some(nm) => nm.forward(&k)?, None => k };
        // 3. rotate: rope wants (1, heads, n, hd); back to (n, heads, hd) row-major
        let rot = |t: Tensor, cos: &Tensor, sin: &Tensor| -> candle_core::Result<Vec<f32>> {
            let r = candle_nn::rotary_emb::rope(&t.transpose(0, 1)?.unsqueeze(0)?.contiguous()?, cos, sin)?;
            r.squeeze(0)?.transpose(0, 1)?.contiguous()?.flatten_all()?.to_vec1::<f32>()
        };
        // 4. per sequence: its positions, its cache, each query over its own causal prefix
        let mut out = Vec::with_capacity(n_all * nh * hd);
        for seg in segs.iter_mut() {
            let q = rot(q.narrow(0, seg.row, seg.n)?, &seg.cos, &seg.sin)?;
            let k = rot(k.narrow(0, seg.row, seg.n)?, &seg.cos, &seg.sin)?;
            let v = v.narrow(0, seg.row, seg.n)?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
            let start = seg.cache.len();
            seg.cache.write(idx, &k, &v, seg.n);
            out.extend(causal_attention(&q, seg.cache.layer(idx), seg.n, start, nh, nkv, hd, seg.cache.capacity()));
        }
        // 5. (N, heads·hd) -> (N, H)
        self.o_proj.forward(&Tensor::from_vec(out, (n_all, nh * hd), &Device::Cpu)?)
    }
}

/// Mean negative log-likelihood of `ids[1..]` given the prefix, from all-position logits.
pub fn mean_nll(logits: &Tensor, ids: &[u32]) -> candle_core::Result<f32> {
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let logp = logp.to_vec2::<f32>()?;
    let n = ids.len();
    let mut total = 0.0;
    for i in 0..n - 1 {
        total -= logp[i][ids[i + 1] as usize];
    }
    Ok(total / (n - 1) as f32)
}
