//! The target decoder: one implementation for the Llama, Qwen2 and Qwen3 families.
//!
//! A forward takes a chunk of new tokens of one sequence ([`Target::forward`]) or of several
//! sequences, each with its own cache ([`Target::forward_batch`]), places them after the cached
//! positions, and returns logits for every new position plus the hidden states after any
//! requested decoder layers (HF indexing: tap i is the output of layer i, `hidden_states[i+1]`,
//! before the final norm). The target is frozen, so its fast fused ops (rms_norm, rope,
//! softmax) are fine here; training paths use `crate::nn::ops`.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::nn::{Backend, KernelPath};

use super::config::TargetConfig;
use super::attention::causal_attention;
use super::kv_cache::KvCache;
use super::embedding::Embedding;
use super::host_ops;
use super::weights::{forward_group, qgemm_group, Linear, WeightSource, WeightsMode};
use super::ModelError;

mod team;

#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    /// The weight on the host, for the host layer forward (empty on the generic path).
    host: Vec<f32>,
    eps: f32,
}

impl RmsNorm {
    fn load(src: &mut WeightSource, name: &str, dim: usize, eps: f64) -> Result<Self, ModelError> {
        let weight = src.tensor(name, &[dim])?;
        let host = weight.to_vec1::<f32>()?;
        Ok(Self { weight, host, eps: eps as f32 })
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
    pub fn new(head_dim: usize, theta: f64, max_pos: usize, device: &Device) -> candle_core::Result<Self> {
        let inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1.0 / (theta.powf(2.0 * i as f64 / head_dim as f64)) as f32)
            .collect();
        let (cos, sin) = Self::tables(&inv_freq, max_pos, device)?;
        Ok(Self { inv_freq, cos, sin })
    }

    fn tables(inv_freq: &[f32], n: usize, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
        let half = inv_freq.len();
        let mut angles = Vec::with_capacity(n * half);
        for p in 0..n {
            for f in inv_freq {
                angles.push(p as f32 * f);
            }
        }
        let a = Tensor::from_vec(angles, (n, half), device)?;
        Ok((a.cos()?, a.sin()?))
    }

    /// (cos, sin) rows for positions start..start+n, each (n, head_dim/2).
    pub fn at(&mut self, start: usize, n: usize) -> candle_core::Result<(Tensor, Tensor)> {
        if start + n > self.cos.dim(0)? {
            let (cos, sin) = Self::tables(&self.inv_freq, (start + n).next_power_of_two(), self.cos.device())?;
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
    path: KernelPath,
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

/// The embedding (as stored in quantized modes, see [`Embedding`]) is shared with the drafter,
/// frozen.
#[derive(Debug, Clone)]
pub struct Target {
    cfg: TargetConfig,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: std::sync::Arc<std::sync::Mutex<Rope>>,
    mode: WeightsMode,
    backend: Backend,
    /// [`Target::head_rows_shared`]'s matrices, by id list (a few at most: one per draft
    /// vocabulary in use).
    head_subsets: HeadSubsets,
    /// Every layer's linears are `qgemm` blocks on the CPU kernel path, so a forward runs its
    /// layers on host buffers (`Layer::forward_host`) instead of candle tensors.
    host_layers: bool,
    /// Whether host layers run by a team of the pool's threads (`layers_team`), where the
    /// layers allow it, or with one pool dispatch per matmul (`Layer::forward_host`). Same bits.
    team_layers: TeamLayers,
}

/// How a forward's host layers use the pool (see [`Target::layers_team`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TeamLayers {
    /// One pool dispatch per matmul.
    Off,
    /// A team, or the dispatched path while another forward holds the team.
    Try,
    /// A team, waiting for it while another forward holds it (tests: the team path for sure).
    Wait,
}

type HeadSubsets = std::sync::Arc<std::sync::Mutex<Vec<(std::sync::Arc<[u32]>, std::sync::Arc<crate::model::qgemm::QMatrix>)>>>;

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
    /// Loads the target for the default backend (the CPU with its kernels).
    pub fn load(src: &mut WeightSource, cfg: TargetConfig, mode: WeightsMode) -> Result<Self, ModelError> {
        Self::load_on(src, cfg, mode, &Backend::default())
    }

    /// Loads the target for `backend`. On the CPU kernel path the linears are held as `mode`
    /// says. On the generic path (DESIGN §7.11) every linear is the dequantized f32 weight (what
    /// the `f32` mode holds) in the backend's compute dtype on its device, whatever `mode` says:
    /// the q8 mode's int8 activations are a property of the CPU kernel, not of the weights.
    pub fn load_on(src: &mut WeightSource, cfg: TargetConfig, mode: WeightsMode, backend: &Backend) -> Result<Self, ModelError> {
        let mode = mode.resolve(src);
        if backend.cpu_kernels() {
            return Self::load_host(src, cfg, mode, backend.path());
        }
        let host = Self::load_host(src, cfg, WeightsMode::F32, backend.path())?;
        Ok(host.to_generic(backend)?)
    }

    /// Reads the weights into host memory (where the files are read and dequantized).
    fn load_host(src: &mut WeightSource, cfg: TargetConfig, mode: WeightsMode, path: KernelPath) -> Result<Self, ModelError> {
        let h = cfg.hidden_size;
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        // Quantized modes keep a GGUF's quantized table as stored (rows dequantized on lookup, the
        // same values); the f32 reference mode and safetensors sources hold it dense.
        let embed = match src {
            WeightSource::Gguf { .. } if mode != WeightsMode::F32 => {
                let raw = src.raw("model.embed_tokens.weight")?;
                crate::model::weights::check_shape(&src.display(), "model.embed_tokens.weight", &raw.dims, &[cfg.vocab_size, h])?;
                Embedding::from_ggml(raw.bytes(), raw.dtype, cfg.vocab_size, h)?
            }
            _ => Embedding::Dense(src.tensor("model.embed_tokens.weight", &[cfg.vocab_size, h])?),
        };
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
                path,
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
        let rope = Rope::new(hd, cfg.rope_theta, 4096.min(cfg.max_position_embeddings.max(1)), &Device::Cpu)?;
        let rope = std::sync::Arc::new(std::sync::Mutex::new(rope));
        let host_layers = path == KernelPath::Cpu && layers.iter().all(Layer::host_ready);
        Ok(Self { cfg, embed, layers, norm, lm_head, rope, mode, backend: Backend::cpu(), head_subsets: HeadSubsets::default(), host_layers, team_layers: TeamLayers::Try })
    }

    /// The host-loaded target moved to the generic path of `backend`: linears via
    /// [`Linear::to_generic`], embedding, norms and RoPE tables to the device (f32).
    fn to_generic(self, backend: &Backend) -> candle_core::Result<Self> {
        let dev = backend.device();
        let norm = |n: &RmsNorm| -> candle_core::Result<RmsNorm> { Ok(RmsNorm { weight: n.weight.to_device(dev)?, host: Vec::new(), eps: n.eps }) };
        let opt_norm = |n: &Option<RmsNorm>| n.as_ref().map(norm).transpose();
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let a = &l.attn;
            layers.push(Layer {
                input_norm: norm(&l.input_norm)?,
                attn: Attention {
                    q_proj: a.q_proj.to_generic(backend)?,
                    k_proj: a.k_proj.to_generic(backend)?,
                    v_proj: a.v_proj.to_generic(backend)?,
                    o_proj: a.o_proj.to_generic(backend)?,
                    q_norm: opt_norm(&a.q_norm)?,
                    k_norm: opt_norm(&a.k_norm)?,
                    heads: a.heads,
                    kv_heads: a.kv_heads,
                    head_dim: a.head_dim,
                    path: KernelPath::Generic,
                },
                post_norm: norm(&l.post_norm)?,
                mlp: Mlp { gate: l.mlp.gate.to_generic(backend)?, up: l.mlp.up.to_generic(backend)?, down: l.mlp.down.to_generic(backend)? },
            });
        }
        let cfg = self.cfg;
        let max = 4096.min(cfg.max_position_embeddings.max(1));
        let rope = Rope::new(cfg.head_dim, cfg.rope_theta, max, dev)?;
        Ok(Self {
            embed: Embedding::Dense(self.embed.dense(dev)?),
            layers,
            norm: norm(&self.norm)?,
            lm_head: self.lm_head.to_generic(backend)?,
            rope: std::sync::Arc::new(std::sync::Mutex::new(rope)),
            mode: self.mode,
            backend: backend.clone(),
            head_subsets: HeadSubsets::default(),
            host_layers: false,
            team_layers: TeamLayers::Off,
            cfg,
        })
    }

    /// Whether forwards run the layers on host buffers (every linear held as `qgemm` blocks on
    /// the CPU kernel path) rather than as candle tensor ops; the bits are the same.
    pub fn host_layers(&self) -> bool {
        self.host_layers
    }

    /// This target with its layers run as candle tensor ops even where the host forward
    /// applies: the reference the host forward is tested against (tests/target_parity.rs).
    #[doc(hidden)]
    pub fn with_tensor_layers(mut self) -> Self {
        self.host_layers = false;
        self
    }

    /// This target with its host layers dispatched matmul by matmul over the pool instead of
    /// run by a team (`util::team`): the path the team forward is tested and measured against.
    #[doc(hidden)]
    pub fn with_pool_layers(mut self) -> Self {
        self.team_layers = TeamLayers::Off;
        self
    }

    /// This target waiting for the team when another forward holds it, instead of taking the
    /// dispatched path meanwhile: so a test knows which path ran.
    #[doc(hidden)]
    pub fn waiting_for_team(mut self) -> Self {
        if self.team_layers != TeamLayers::Off {
            self.team_layers = TeamLayers::Wait;
        }
        self
    }

    /// Whether forwards run their layers in a team of the pool's threads (`util::team`): host
    /// layers, unless [`Target::with_pool_layers`] turned it off. (A forward still takes the
    /// dispatched path while another holds the team, or outside a two-thread pool.)
    pub fn team_layers(&self) -> bool {
        self.team_layers != TeamLayers::Off && self.host_layers
    }

    /// The device and kernel path this target computes with; drafters and training follow it.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// Where this target's tensors live.
    pub fn device(&self) -> &Device {
        self.backend.device()
    }

    pub fn config(&self) -> &TargetConfig {
        &self.cfg
    }

    pub fn weights_mode(&self) -> WeightsMode {
        self.mode
    }

    pub fn new_cache(&self) -> KvCache {
        let (l, kv, hd) = (self.cfg.num_hidden_layers, self.cfg.num_key_value_heads, self.cfg.head_dim);
        match self.backend.path() {
            KernelPath::Cpu => KvCache::new(l, kv, hd),
            KernelPath::Generic => KvCache::on_device(l, kv, hd, self.backend.device()),
        }
    }

    /// Whether [`Target::forward_batch`] gives every item exactly its lone forward's bits: every
    /// linear is batch-invariant (q8, and native on quantized GGUF tensors; not f32).
    pub fn is_batch_invariant(&self) -> bool {
        self.lm_head.is_batch_invariant()
            && self.layers.iter().all(|l| {
                let a = &l.attn;
                [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &l.mlp.gate, &l.mlp.up, &l.mlp.down].iter().all(|w| w.is_batch_invariant())
            })
    }

    /// The final RMSNorm weight (hidden), applied before the LM head.
    pub fn final_norm_weight(&self) -> &Tensor {
        &self.norm.weight
    }

    /// The frozen LM head as f32 (vocab, hidden): for training, where exact gradients matter.
    pub fn lm_head_weight_f32(&self) -> candle_core::Result<Tensor> {
        self.lm_head.weight_f32()
    }

    /// ids -> (n, hidden) embeddings.
    pub fn embed(&self, ids: &[u32]) -> candle_core::Result<Tensor> {
        self.embed.rows(ids, self.backend.device())
    }

    /// (n, hidden) -> (n, vocab) with the target's LM head (no final norm: callers that hold
    /// residual-stream states apply their own norm first).
    pub fn lm_head(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        self.lm_head.forward(hidden)
    }

    /// The LM head's rows `ids`, in that order, as their own matrix: its outputs are
    /// bit-identical to those rows of [`Target::lm_head`]'s. None when the head is not held in
    /// the `qgemm` kernel's blocks (the f32 mode, a GGUF type without a block kernel, the generic
    /// path): a draft vocabulary then falls back to the whole head.
    pub fn head_rows(&self, ids: &[u32]) -> Result<Option<crate::model::qgemm::QMatrix>, ModelError> {
        let Some(w) = self.lm_head.blocks() else { return Ok(None) };
        w.select_rows(ids).map(Some).map_err(|e| ModelError::Corrupt { path: "lm_head".into(), what: e.to_string() })
    }

    /// [`Target::head_rows`] built once per id list and shared by every caller that asks for the
    /// same list (every request of a drafter with a draft vocabulary).
    pub fn head_rows_shared(&self, ids: &std::sync::Arc<[u32]>) -> Result<Option<std::sync::Arc<crate::model::qgemm::QMatrix>>, ModelError> {
        let mut cache = self.head_subsets.lock().map_err(|_| ModelError::Poisoned)?;
        if let Some((_, m)) = cache.iter().find(|(k, _)| std::sync::Arc::ptr_eq(k, ids) || k[..] == ids[..]) {
            return Ok(Some(m.clone()));
        }
        let Some(m) = self.head_rows(ids)? else { return Ok(None) };
        let m = std::sync::Arc::new(m);
        if cache.len() >= 4 {
            cache.remove(0);
        }
        cache.push((ids.clone(), m.clone()));
        Ok(Some(m))
    }

    /// Runs `tokens` at positions cache.len().. and appends their K/V to the cache: the
    /// one-item case of [`Target::forward_batch`] (same code, same bits).
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, taps: &[usize], logits: Logits) -> Result<ForwardOutput, ModelError> {
        let mut items = [BatchItem { tokens, cache, taps, logits }];
        self.forward_batch(&mut items)?.pop().ok_or(ModelError::EmptyInput)
    }

    /// One forward over several sequences, each with its own cache: item i's `tokens` run at
    /// positions `cache.len()..` of its own cache, and item i gets its own [`ForwardOutput`].
    ///
    /// The embedding, the norms, every linear (q/k/v/o, MLP, LM head) and the elementwise ops
    /// run once over the concatenated rows of all items (Σ nᵢ rows), which costs about what one
    /// item costs when decode is memory-bound (every weight is read once per call). RoPE uses
    /// each row's own position, and attention runs per item over its own cache.
    ///
    /// Batch invariance: in the `q8` and `native` modes (linears in `qgemm`, or candle's
    /// `QMatMul`, both of which quantize and reduce each row on its own) every item's output is
    /// bit-identical to [`Target::forward`] on that item alone (tests/target_batch.rs). The `f32`
    /// mode is not: its matmuls go through candle's gemm, whose tiling and reduction order
    /// depend on the number of rows; measured on the tiny fixtures (tests/target_batch.rs), items
    /// of a 5-sequence batch differ from their lone forward by 5e-6 to 7e-6 in logits and taps:
    /// close, not bit-identical, so T = 0 outputs may differ where two logits nearly tie.
    ///
    /// Every item is checked before any cache is touched, so an error leaves all caches as
    /// they were.
    pub fn forward_batch(&self, items: &mut [BatchItem<'_>]) -> Result<Vec<ForwardOutput>, ModelError> {
        // On a pool worker, so that the matmuls' splits do not each wake and put to sleep the
        // calling thread (util::pool).
        crate::util::pool::on_pool(|| self.forward_batch_here(items))
    }

    fn forward_batch_here(&self, items: &mut [BatchItem<'_>]) -> Result<Vec<ForwardOutput>, ModelError> {
        let spans = self.plan_rows(items)?;
        let Some(total) = spans.last().map(|s| s.row + s.n) else {
            return Ok(Vec::new());
        };
        // (Σn, hd/2) each: the rows of every item at its own positions.
        let (cos, sin) = {
            let mut rope = self.rope.lock().map_err(|_| ModelError::Poisoned)?;
            let mut cos = Vec::with_capacity(spans.len());
            let mut sin = Vec::with_capacity(spans.len());
            for s in &spans {
                let (c, si) = rope.at(s.start, s.n)?;
                cos.push(c);
                sin.push(si);
            }
            (Tensor::cat(&cos, 0)?, Tensor::cat(&sin, 0)?)
        };
        for item in items.iter_mut() {
            item.cache.reserve(item.tokens.len());
        }
        // 1. (Σn,) -> (Σn, H)
        let ids: Vec<u32> = items.iter().flat_map(|it| it.tokens.iter().copied()).collect();
        let mut x = self.embed(&ids)?;
        // The residual stream after every layer some item taps: (Σn, H).
        let mut tapped: Vec<Option<Tensor>> = vec![None; self.layers.len()];
        if self.host_layers {
            let h = self.cfg.hidden_size;
            let (cos, sin) = (cos.flatten_all()?.to_vec1::<f32>()?, sin.flatten_all()?.to_vec1::<f32>()?);
            let mut xs = x.flatten_all()?.to_vec1::<f32>()?;
            let mut buf = HostBuffers::new(&self.cfg, total);
            let mut teamed = None;
            if self.team_layers() {
                teamed = self.layers_team(&mut xs, &mut buf, items, &spans, &cos, &sin);
                while teamed.is_none() && self.team_layers == TeamLayers::Wait && crate::util::team::possible() {
                    // Run pending pool work meanwhile: it may be the holder's member 1.
                    if rayon::yield_now() != Some(rayon::Yield::Executed) {
                        std::thread::sleep(std::time::Duration::from_micros(200));
                    }
                    teamed = self.layers_team(&mut xs, &mut buf, items, &spans, &cos, &sin);
                }
            }
            match teamed {
                Some(taps) => {
                    for (i, t) in taps.into_iter().enumerate() {
                        if let Some(t) = t {
                            tapped[i] = Some(Tensor::from_vec(t, (total, h), &Device::Cpu)?);
                        }
                    }
                }
                None => {
                    for (i, layer) in self.layers.iter().enumerate() {
                        layer.forward_host(&mut xs, &mut buf, i, items, &spans, &cos, &sin)?;
                        if items.iter().any(|it| it.taps.contains(&i)) {
                            tapped[i] = Some(Tensor::from_slice(&xs, (total, h), &Device::Cpu)?);
                        }
                    }
                }
            }
            x = Tensor::from_vec(xs, (total, h), &Device::Cpu)?;
        } else {
            for (i, layer) in self.layers.iter().enumerate() {
                x = layer.forward(&x, i, items, &spans, &cos, &sin)?;
                if items.iter().any(|it| it.taps.contains(&i)) {
                    tapped[i] = Some(x.clone());
                }
            }
        }
        for item in items.iter_mut() {
            item.cache.advance(item.tokens.len());
        }
        debug_assert_eq!(x.dim(0)?, total);
        let logits = self.batch_logits(&x, items, &spans)?;
        let mut outs = Vec::with_capacity(items.len());
        for ((item, s), logits) in items.iter().zip(&spans).zip(logits) {
            let taps = item
                .taps
                .iter()
                .map(|&l| match &tapped[l] {
                    Some(t) => Ok(t.narrow(0, s.row, s.n)?),
                    None => Err(ModelError::Poisoned),
                })
                .collect::<Result<Vec<_>, ModelError>>()?;
            outs.push(ForwardOutput { logits, taps });
        }
        Ok(outs)
    }

    /// Checks every item and lays out its rows in the concatenated batch.
    fn plan_rows(&self, items: &[BatchItem<'_>]) -> Result<Vec<Span>, ModelError> {
        let mut spans = Vec::with_capacity(items.len());
        let mut row = 0;
        for item in items {
            let n = item.tokens.len();
            if n == 0 {
                return Err(ModelError::EmptyInput);
            }
            if let Some(&bad) = item.tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
                return Err(ModelError::TokenOutOfRange { token: bad, vocab: self.cfg.vocab_size });
            }
            if let Some(&bad) = item.taps.iter().find(|&&l| l >= self.cfg.num_hidden_layers) {
                return Err(ModelError::LayerOutOfRange { layer: bad, layers: self.cfg.num_hidden_layers });
            }
            let start = item.cache.len();
            if start + n > self.cfg.max_position_embeddings {
                return Err(ModelError::ContextOverflow { needed: start + n, max: self.cfg.max_position_embeddings });
            }
            spans.push(Span { row, n, start });
            row += n;
        }
        Ok(spans)
    }

    /// Final norm and LM head over exactly the rows the items ask for, in one call; returns
    /// each item's (m_i, vocab) logits.
    fn batch_logits(&self, x: &Tensor, items: &[BatchItem<'_>], spans: &[Span]) -> Result<Vec<Option<Tensor>>, ModelError> {
        let mut rows: Vec<u32> = Vec::new();
        let mut ranges = Vec::with_capacity(items.len());
        for (item, s) in items.iter().zip(spans) {
            let (first, m) = match item.logits {
                Logits::None => (s.row, 0),
                Logits::All => (s.row, s.n),
                Logits::Last => (s.row + s.n - 1, 1),
            };
            ranges.push((rows.len(), m));
            rows.extend((first..first + m).map(|r| r as u32));
        }
        if rows.is_empty() {
            return Ok(vec![None; items.len()]);
        }
        // (Σm, H) -> (Σm, vocab)
        let picked = x.index_select(&Tensor::new(rows.as_slice(), x.device())?, 0)?;
        let all = self.lm_head.forward(&self.norm.forward(&picked)?)?;
        ranges
            .into_iter()
            .map(|(off, m)| if m == 0 { Ok(None) } else { Ok(Some(all.narrow(0, off, m)?)) })
            .collect()
    }
}

/// Layer `idx` of every item: its rows' K/V (q, k, v: the batch's rows, (Σn, heads or
/// kv_heads, hd)) appended to its cache, then each query attending over its causal prefix in
/// that cache; returns (Σn, heads·hd). Items are independent and each is computed the same way
/// on any thread, so running several items in parallel changes no bit; it pays when the batch
/// holds many sequences (decode attention of one item is too small to split, and
/// `causal_attention` keeps it on one thread).
fn cache_and_attend(items: &mut [BatchItem<'_>], spans: &[Span], idx: usize, q: &[f32], k: &[f32], v: &[f32], (nh, nkv, hd): (usize, usize, usize)) -> Vec<f32> {
    for (item, s) in items.iter_mut().zip(spans) {
        let (kva, kvb) = (s.row * nkv * hd, (s.row + s.n) * nkv * hd);
        item.cache.write(idx, &k[kva..kvb], &v[kva..kvb], s.n);
    }
    let attend = |(item, s): (&BatchItem<'_>, &Span)| {
        let qa = s.row * nh * hd;
        let cache = &*item.cache;
        causal_attention(&q[qa..qa + s.n * nh * hd], cache.layer(idx), s.n, s.start, nh, nkv, hd, cache.capacity())
    };
    let work: usize = spans.iter().map(|s| s.n * nh * (s.start + s.n) * hd).sum();
    let mut parts: Vec<Vec<f32>> = if items.len() > 1 && work >= PARALLEL_ITEMS_MIN_WORK {
        items.par_iter().zip(spans.par_iter()).map(attend).collect()
    } else {
        items.iter().zip(spans).map(attend).collect()
    };
    if parts.len() == 1 {
        return parts.pop().unwrap_or_default();
    }
    parts.concat()
}

/// One sequence's part of [`Target::forward_batch`].
pub struct BatchItem<'a> {
    /// New tokens, placed at positions `cache.len()..`.
    pub tokens: &'a [u32],
    /// This sequence's cache; the tokens' K/V are appended to it.
    pub cache: &'a mut KvCache,
    /// Layers whose outputs to return for this item's rows.
    pub taps: &'a [usize],
    pub logits: Logits,
}

/// Below this many attention multiply-adds (all items of a layer together) the items of a
/// batch are attended one after the other on the calling thread.
const PARALLEL_ITEMS_MIN_WORK: usize = 1 << 20;

/// Where an item's rows sit in the batch: rows row..row+n, positions start..start+n.
#[derive(Debug, Clone, Copy)]
pub(super) struct Span {
    pub(super) row: usize,
    pub(super) n: usize,
    pub(super) start: usize,
}

/// The host layer forward's buffers for `rows` rows, sized once per forward and reused by
/// every layer.
struct HostBuffers {
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    o: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
}

impl HostBuffers {
    fn new(cfg: &TargetConfig, rows: usize) -> Self {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        HostBuffers {
            h: vec![0.0; rows * h],
            q: vec![0.0; rows * cfg.num_attention_heads * hd],
            k: vec![0.0; rows * cfg.num_key_value_heads * hd],
            v: vec![0.0; rows * cfg.num_key_value_heads * hd],
            o: vec![0.0; rows * h],
            gate: vec![0.0; rows * cfg.intermediate_size],
            up: vec![0.0; rows * cfg.intermediate_size],
        }
    }
}

fn qgemm_err(e: super::qgemm::QGemmError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// `linear`'s bias added to y's rows, where it has one (Qwen2's q/k/v).
fn host_bias(linear: &Linear, y: &mut [f32]) -> candle_core::Result<()> {
    if let Some(b) = linear.bias() {
        host_ops::add_bias(y, &b.to_vec1::<f32>()?);
    }
    Ok(())
}

impl Layer {
    /// Whether [`Layer::forward_host`] can run this layer: every linear is held as `qgemm`
    /// blocks, and the norms have host weights.
    fn host_ready(&self) -> bool {
        let a = &self.attn;
        let linears = [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &self.mlp.gate, &self.mlp.up, &self.mlp.down];
        linears.iter().all(|l| l.blocks().is_some()) && self.mlp.gate.bias().is_none() && self.mlp.up.bias().is_none()
            && self.mlp.down.bias().is_none() && a.o_proj.bias().is_none()
    }

    /// [`Layer::forward`] on host buffers: x (rows, H) is updated in place. Every step is the
    /// tensor path's arithmetic (the same `qgemm` calls, candle's RMSNorm and RoPE expressions
    /// in `host_ops`, the same attention), so the bits are the same (tested against it in
    /// tests/target_parity.rs); what goes is a tensor and often a pool dispatch per op.
    #[allow(clippy::too_many_arguments)]
    fn forward_host(&self, x: &mut [f32], buf: &mut HostBuffers, idx: usize, items: &mut [BatchItem<'_>], spans: &[Span], cos: &[f32], sin: &[f32]) -> candle_core::Result<()> {
        use super::qgemm::{matmul_group, Exec};
        let a = &self.attn;
        let (nh, nkv, hd) = (a.heads, a.kv_heads, a.head_dim);
        fn blocks(l: &Linear) -> candle_core::Result<&super::qgemm::QMatrix> {
            l.blocks().ok_or_else(|| candle_core::Error::Msg("host layer forward: a linear is not held as qgemm blocks".into()))
        }
        let n = x.len() / self.input_norm.host.len().max(1);
        // 1. norm, q/k/v in one call, their biases, per-head norms, RoPE
        host_ops::rms_norm(x, &self.input_norm.host, self.input_norm.eps, &mut buf.h);
        let mats = [blocks(&a.q_proj)?, blocks(&a.k_proj)?, blocks(&a.v_proj)?];
        matmul_group(&mats, &buf.h, n, &mut [&mut buf.q, &mut buf.k, &mut buf.v], Exec::default()).map_err(qgemm_err)?;
        host_bias(&a.q_proj, &mut buf.q)?;
        host_bias(&a.k_proj, &mut buf.k)?;
        host_bias(&a.v_proj, &mut buf.v)?;
        if let Some(nm) = &a.q_norm {
            host_ops::rms_norm_in_place(&mut buf.q, &nm.host, nm.eps);
        }
        if let Some(nm) = &a.k_norm {
            host_ops::rms_norm_in_place(&mut buf.k, &nm.host, nm.eps);
        }
        host_ops::rope_in_place(&mut buf.q, nh, hd, cos, sin);
        host_ops::rope_in_place(&mut buf.k, nkv, hd, cos, sin);
        // 2. each item's K/V into its cache, then attention over each query's causal prefix
        let att = cache_and_attend(items, spans, idx, &buf.q, &buf.k, &buf.v, (nh, nkv, hd));
        // 3. output projection and residual
        matmul_group(&[blocks(&a.o_proj)?], &att, n, &mut [&mut buf.o], Exec::default()).map_err(qgemm_err)?;
        host_ops::add_in_place(x, &buf.o);
        // 4. MLP: norm, gate/up in one call, SiLU · up, down, residual
        host_ops::rms_norm(x, &self.post_norm.host, self.post_norm.eps, &mut buf.h);
        let m = &self.mlp;
        matmul_group(&[blocks(&m.gate)?, blocks(&m.up)?], &buf.h, n, &mut [&mut buf.gate, &mut buf.up], Exec::default()).map_err(qgemm_err)?;
        host_ops::silu_mul(&mut buf.gate, &buf.up);
        matmul_group(&[blocks(&m.down)?], &buf.gate, n, &mut [&mut buf.o], Exec::default()).map_err(qgemm_err)?;
        host_ops::add_in_place(x, &buf.o);
        Ok(())
    }

    fn forward(&self, x: &Tensor, idx: usize, items: &mut [BatchItem<'_>], spans: &[Span], cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.input_norm.forward(x)?;
        let h = self.attn.forward(&h, idx, items, spans, cos, sin)?;
        let x = (x + h)?;
        let h = self.post_norm.forward(&x)?;
        let h = self.mlp.forward(&h)?;
        x + h
    }
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (gate, up) = (&self.gate, &self.up);
        if gate.bias().is_none() && up.bias().is_none() {
            if let Some(grouped) = qgemm_group(&[gate, up], x) {
                let (mut outs, mut dims) = grouped?;
                if let (Some(u), Some(mut g)) = (outs.pop(), outs.pop()) {
                    host_ops::silu_mul(&mut g, &u);
                    dims.push(gate.out_features());
                    return self.down.forward(&Tensor::from_vec(g, dims, &Device::Cpu)?);
                }
            }
        }
        let [g, u]: [Tensor; 2] = forward_group(&[gate, up], x)?.try_into().map_err(|_| candle_core::Error::Msg("gate/up: two outputs expected".into()))?;
        self.down.forward(&(candle_nn::ops::silu(&g)? * u)?)
    }
}

impl Attention {
    /// x: (Σn, H) rows of every item; cos/sin: (Σn, hd/2) at each row's own position.
    fn forward(&self, x: &Tensor, idx: usize, items: &mut [BatchItem<'_>], spans: &[Span], cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
        let n = x.dim(0)?;
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.head_dim);
        // 1. (Σn, H) -> (Σn, heads, hd)
        let [q, k, v]: [Tensor; 3] =
            forward_group(&[&self.q_proj, &self.k_proj, &self.v_proj], x)?.try_into().map_err(|_| candle_core::Error::Msg("q/k/v: three outputs expected".into()))?;
        let q = q.reshape((n, nh, hd))?;
        let k = k.reshape((n, nkv, hd))?;
        let v = v.reshape((n, nkv, hd))?;
        // 2. per-head q/k norm (Qwen3) before RoPE
        let q = match &self.q_norm { Some(nm) => nm.forward(&q)?, None => q };
        let k = match &self.k_norm { Some(nm) => nm.forward(&k)?, None => k };
        if self.path == KernelPath::Generic {
            let rot = |t: Tensor| -> candle_core::Result<Tensor> {
                let r = candle_nn::rotary_emb::rope(&t.transpose(0, 1)?.unsqueeze(0)?.contiguous()?, cos, sin)?;
                r.squeeze(0)?.transpose(0, 1)?.contiguous()
            };
            let out = super::generic::attention(&rot(q)?, &rot(k)?, &v.contiguous()?, idx, items, spans, (nh, nkv, hd))?;
            return self.o_proj.forward(&out);
        }
        // 3. rotate: rope wants (1, heads, Σn, hd); back to (Σn, heads, hd) row-major. Each row
        //    is rotated by its own cos/sin row, independently of the others.
        let rot = |t: Tensor| -> candle_core::Result<Vec<f32>> {
            let r = candle_nn::rotary_emb::rope(&t.transpose(0, 1)?.unsqueeze(0)?.contiguous()?, cos, sin)?;
            r.squeeze(0)?.transpose(0, 1)?.contiguous()?.flatten_all()?.to_vec1::<f32>()
        };
        let q = rot(q)?;
        let k = rot(k)?;
        let v = v.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        // 4. per item: append its rows to its cache, then attend over each query's causal
        //    prefix in that item's cache
        let out = cache_and_attend(items, spans, idx, &q, &k, &v, (nh, nkv, hd));
        // 5. (Σn, heads·hd) -> (Σn, H)
        // The CPU kernel path: host buffers by design.
        self.o_proj.forward(&Tensor::from_vec(out, (n, nh * hd), &Device::Cpu)?)
    }
}

impl Target {
    /// Decoder layer `i`'s weights as f32, named as in an HF checkpoint relative to the layer
    /// (`self_attn.q_proj.weight`, `mlp.down_proj.weight`, `input_layernorm.weight`, ...; Q/K
    /// rows in the rotate-half layout). What a drafter layer initialised from the target copies.
    pub fn layer_tensors_f32(&self, i: usize) -> candle_core::Result<Vec<(String, Tensor)>> {
        let l = self.layers.get(i).ok_or_else(|| {
            candle_core::Error::Msg(format!("target layer {i} does not exist: the target has {} layers", self.layers.len()))
        })?;
        let a = &l.attn;
        let mut out = vec![
            ("self_attn.q_proj.weight".to_string(), a.q_proj.weight_f32()?),
            ("self_attn.k_proj.weight".to_string(), a.k_proj.weight_f32()?),
            ("self_attn.v_proj.weight".to_string(), a.v_proj.weight_f32()?),
            ("self_attn.o_proj.weight".to_string(), a.o_proj.weight_f32()?),
            ("mlp.gate_proj.weight".to_string(), l.mlp.gate.weight_f32()?),
            ("mlp.up_proj.weight".to_string(), l.mlp.up.weight_f32()?),
            ("mlp.down_proj.weight".to_string(), l.mlp.down.weight_f32()?),
            ("input_layernorm.weight".to_string(), l.input_norm.weight.clone()),
            ("post_attention_layernorm.weight".to_string(), l.post_norm.weight.clone()),
        ];
        if let Some(n) = &a.q_norm {
            out.push(("self_attn.q_norm.weight".to_string(), n.weight.clone()));
        }
        if let Some(n) = &a.k_norm {
            out.push(("self_attn.k_norm.weight".to_string(), n.weight.clone()));
        }
        Ok(out)
    }
}
