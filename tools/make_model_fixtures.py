#!/usr/bin/env python3
"""Reference fixtures for specauf's target-runtime parity tests.

Writes, for each family in FAMILIES, under tests/fixtures/models/<family>/:
  config.json, model.safetensors, generation_config.json   tiny random HF model (save_pretrained)
  expected.safetensors                                      HF forward (logits + hidden_states) on fixed ids
and for the GGUF families (llama, qwen2) additionally:
  tiny-f32.gguf, tiny-q8_0.gguf, tiny-q4_0.gguf             llama.cpp-convention GGUF files
  expected_q8_0.safetensors, expected_q4_0.safetensors      HF forward with the GGUF's dequantized weights

Everything is seeded; a rerun with the same package versions rewrites byte-identical files.
After writing, the script re-reads every file and checks it (see verify_* below); it exits non-zero on any
mismatch. CI never runs this; Rust tests only read the files. See tools/README.md.

Usage: /tmp/pyref/bin/python tools/make_model_fixtures.py [--out tests/fixtures/models]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import gguf
import numpy as np
import safetensors
import torch
import transformers
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

SEQ_LEN = 13
ATTN_IMPL = "eager"  # the plainest attention path; sdpa gives the same numbers to ~1e-6

# Random-init scales. HF's default (std 0.02, norms = 1, biases = 0) gives logits ~1e-2 where a wrong
# RoPE layout or a missing bias hardly moves the result; these scales give O(1) activations everywhere.
EMBED_STD = 0.25
LINEAR_STD = 0.12
LM_HEAD_STD = 0.3
NORM_JITTER = 0.2  # norm weights ~ 1 + N(0, 0.2^2)
BIAS_STD = 0.2

FAMILIES: dict[str, dict] = {
    "llama": dict(
        seed=1001,
        model_cls=LlamaForCausalLM,
        config=lambda: LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=10000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            max_position_embeddings=512,
        ),
        gguf_arch="llama",
    ),
    "qwen2": dict(
        seed=2002,
        model_cls=Qwen2ForCausalLM,
        config=lambda: Qwen2Config(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=1e6,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            max_position_embeddings=512,
        ),
        gguf_arch="qwen2",
    ),
    "qwen3": dict(
        seed=3003,
        model_cls=Qwen3ForCausalLM,
        config=lambda: Qwen3Config(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,  # != hidden/heads = 16: q_proj is 64 -> 128, o_proj 128 -> 64
            rope_theta=1e6,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            max_position_embeddings=512,
        ),
        gguf_arch=None,
    ),
}

QUANT_TYPES = {
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}

HIDDEN_STATES_NOTE = (
    "hidden_states.<i> for i in 0..=L is HF's output_hidden_states=True tuple: hidden_states.0 = token "
    "embeddings (input of layer 0); hidden_states.<i+1> for i < L-1 = raw residual-stream output of decoder "
    "layer i (no norm); hidden_states.<L> = model.norm(output of layer L-1), i.e. the FINAL NORM IS APPLIED "
    "to the last entry (it equals the lm_head input). The raw output of layer L-1 is stored separately as "
    "last_layer_output_pre_norm."
)


def versions() -> dict[str, str]:
    return {
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "gguf_version": _dist_version("gguf"),
        "safetensors_version": safetensors.__version__,
        "numpy_version": np.__version__,
        "python_version": sys.version.split()[0],
    }


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


# --------------------------------------------------------------------------------------------- HF side


def build_model(family: str) -> torch.nn.Module:
    spec = FAMILIES[family]
    config = spec["config"]()
    config._attn_implementation = ATTN_IMPL
    torch.manual_seed(spec["seed"])
    model = spec["model_cls"](config).to(torch.float32).eval()
    g = torch.Generator().manual_seed(spec["seed"])
    touched = 0
    with torch.no_grad():
        # named_parameters() yields a tied lm_head/embed_tokens weight once (as embed_tokens).
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("norm.weight"):  # input/post_attention/final norm, qwen3 q_norm/k_norm
                p.copy_(1.0 + NORM_JITTER * noise)
            elif name.endswith(".bias"):
                p.copy_(BIAS_STD * noise)
            elif name == "model.embed_tokens.weight":
                p.copy_(EMBED_STD * noise)
            elif name == "lm_head.weight":
                p.copy_(LM_HEAD_STD * noise)
            elif name.endswith(".weight") and p.dim() == 2:
                p.copy_(LINEAR_STD * noise)
            else:
                raise SystemExit(f"{family}: no init rule for parameter {name} {tuple(p.shape)}")
            touched += 1
    if config.tie_word_embeddings and model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise SystemExit(f"{family}: tie_word_embeddings=True but lm_head is not tied to embed_tokens")
    return model


def input_ids_for(family: str, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(FAMILIES[family]["seed"] + 7)
    return torch.randint(0, vocab, (SEQ_LEN,), generator=g, dtype=torch.int64)


def reference_forward(model: torch.nn.Module, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """One full no-cache forward. Returns the tensors that go into expected*.safetensors."""
    n_layers = model.config.num_hidden_layers
    raw: dict[int, torch.Tensor] = {}

    def keep(i):
        def hook(_module, _args, output):
            raw[i] = (output[0] if isinstance(output, tuple) else output).detach().clone()

        return hook

    handles = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids[None, :], output_hidden_states=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()

    hs = out.hidden_states
    if len(hs) != n_layers + 1:
        raise SystemExit(f"expected {n_layers + 1} hidden_states, HF returned {len(hs)}")
    # Pin down the indexing convention documented in HIDDEN_STATES_NOTE; fail loudly if HF changes it.
    for i in range(n_layers - 1):
        if not torch.equal(hs[i + 1][0], raw[i][0]):
            raise SystemExit(f"hidden_states[{i + 1}] is not the raw output of layer {i}")
    normed_last = model.model.norm(raw[n_layers - 1])
    if not torch.allclose(hs[n_layers], normed_last, atol=1e-6, rtol=0):
        raise SystemExit("hidden_states[L] is not model.norm(output of the last layer)")
    if torch.allclose(hs[n_layers], raw[n_layers - 1], atol=1e-3):
        raise SystemExit("final norm is indistinguishable from identity; raise NORM_JITTER")

    tensors = {
        "input_ids": input_ids.clone().contiguous(),
        "logits": out.logits[0].to(torch.float32).contiguous(),
        "last_layer_output_pre_norm": raw[n_layers - 1][0].contiguous(),
    }
    for i, h in enumerate(hs):
        tensors[f"hidden_states.{i}"] = h[0].to(torch.float32).contiguous()
    return tensors


# ------------------------------------------------------------------------------------------- GGUF side

# HF parameter suffix inside model.layers.<i>. -> llama.cpp tensor name inside blk.<i>.
LAYER_NAME_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def rope_interleave(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp interleaved-pair row order, per head.

    w: [n_head * head_dim, in] (or a bias [n_head * head_dim]). Within each head, HF pairs row j with row
    j + head_dim/2; llama.cpp's LLAMA rope pairs rows 2j and 2j+1. Same map as convert_hf_to_gguf's
    LlamaModel.permute (with n_head = n_head_kv for K)."""
    rows = w.shape[0]
    half = rows // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_deinterleave(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of rope_interleave (what a loader that uses HF rotate-half RoPE applies to llama Q/K)."""
    rows = w.shape[0]
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(family: str, model: torch.nn.Module) -> list[tuple[str, str, np.ndarray]]:
    """[(gguf_name, hf_name, f32 array in GGUF row layout)] in llama.cpp order."""
    cfg = model.config
    permute = FAMILIES[family]["gguf_arch"] == "llama"
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    out = [("token_embd.weight", "model.embed_tokens.weight", sd["model.embed_tokens.weight"])]
    for i in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{i}."
        for hf_suffix, gg_suffix in LAYER_NAME_MAP.items():
            hf_name = prefix + hf_suffix
            if hf_name not in sd:
                continue
            w = sd[hf_name]
            if permute and hf_suffix.startswith("self_attn.q_proj"):
                w = rope_interleave(w, cfg.num_attention_heads)
            elif permute and hf_suffix.startswith("self_attn.k_proj"):
                w = rope_interleave(w, cfg.num_key_value_heads)
            out.append((f"blk.{i}.{gg_suffix}", hf_name, np.ascontiguousarray(w)))
    out.append(("output_norm.weight", "model.norm.weight", sd["model.norm.weight"]))
    if not cfg.tie_word_embeddings:
        out.append(("output.weight", "lm_head.weight", sd["lm_head.weight"]))
    expected_hf = {k for k in sd if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    missing = expected_hf - {hf for _, hf, _ in out}
    if missing:
        raise SystemExit(f"{family}: HF tensors with no GGUF mapping: {sorted(missing)}")
    return out


def tensor_qtype(gguf_name: str, arr: np.ndarray, qtype):
    """convert_hf_to_gguf's rule: 1-D tensors, *_norm.weight and biases stay F32; every other 2-D weight
    (token_embd and output included) gets the file's type."""
    if arr.ndim <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return gguf.GGMLQuantizationType.F32
    return qtype


def write_gguf(path: Path, family: str, model: torch.nn.Module, qtype, ftype) -> None:
    cfg = model.config
    arch = FAMILIES[family]["gguf_arch"]
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(f"specauf tiny {family}")
    w.add_description(f"random-weight test fixture written by tools/make_model_fixtures.py; {_versions_line()}")
    # Same keys, order and types as convert_hf_to_gguf's TextModel.set_gguf_parameters.
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_file_type(int(ftype))
    if arch == "llama":  # LlamaModel.set_gguf_parameters adds these two; Qwen2Model does not
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for gguf_name, _hf, arr in gguf_tensors(family, model):
        t = tensor_qtype(gguf_name, arr, qtype)
        data = arr if t == gguf.GGMLQuantizationType.F32 else gguf.quants.quantize(arr, t)
        w.add_tensor(gguf_name, data, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _fsync_rename(tmp, path)


def read_gguf_as_hf(path: Path, family: str, cfg) -> tuple[dict[str, np.ndarray], dict[str, str], gguf.GGUFReader]:
    """Dequantize every tensor of a GGUF, undo the llama Q/K permutation, and return HF-named f32 arrays
    plus {gguf_name: ggml type name}."""
    r = gguf.GGUFReader(str(path))
    name_map = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    for i in range(cfg.num_hidden_layers):
        for hf_suffix, gg_suffix in LAYER_NAME_MAP.items():
            name_map[f"blk.{i}.{gg_suffix}"] = f"model.layers.{i}.{hf_suffix}"
    permute = FAMILIES[family]["gguf_arch"] == "llama"
    out, types = {}, {}
    for t in r.tensors:
        arr = gguf.quants.dequantize(np.array(t.data), t.tensor_type).astype(np.float32)
        # GGUF dims are innermost-first; numpy/HF order is the reverse.
        hf_shape = tuple(int(d) for d in reversed(list(t.shape)))
        arr = arr.reshape(hf_shape)
        if permute and t.name.startswith("blk.") and ".attn_q." in t.name:
            arr = rope_deinterleave(arr, cfg.num_attention_heads)
        if permute and t.name.startswith("blk.") and ".attn_k." in t.name:
            arr = rope_deinterleave(arr, cfg.num_key_value_heads)
        out[name_map[t.name]] = arr
        types[t.name] = t.tensor_type.name
    return out, types, r


def quantize_activations_q8_0(x: np.ndarray) -> np.ndarray:
    """What ggml's / candle's CPU vec_dot does to the input rows of a matmul with a Q8_0 or Q4_0 weight:
    quantize each row to Q8_0 (32-wide blocks, d = amax/127 stored as f16, q = round-half-away(x/d)).
    x: [..., in] -> same shape, the dequantized values (f64)."""
    shape = x.shape
    rows = np.asarray(x, dtype=np.float32).reshape(-1, shape[-1])
    q = gguf.quants.quantize(rows, gguf.GGMLQuantizationType.Q8_0)
    return gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).astype(np.float64).reshape(shape)


def numpy_forward_gguf_semantics(path: Path, family: str, cfg, ids: np.ndarray, act_quant: bool = False) -> np.ndarray:
    """Independent forward straight from the GGUF layout with llama.cpp's RoPE conventions (LLAMA arch:
    interleaved pairs (2j, 2j+1) on the permuted Q/K; QWEN2 arch: NEOX pairs (j, j + d/2)), in f64.
    Agreeing with HF's rotate-half forward proves the permutation direction, not just that it round-trips.
    act_quant: quantize the input of every matmul whose weight is quantized (see quantize_activations_q8_0).
    Returns logits [T, V]."""
    r = gguf.GGUFReader(str(path))
    W = {}
    quantized = {t.name for t in r.tensors if t.tensor_type != gguf.GGMLQuantizationType.F32}

    def maybe_q(x, weight_name):
        return quantize_activations_q8_0(x) if act_quant and weight_name in quantized else x

    for t in r.tensors:
        W[t.name] = gguf.quants.dequantize(np.array(t.data), t.tensor_type).astype(np.float64).reshape(
            tuple(int(d) for d in reversed(list(t.shape)))
        )
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    arch = kv["general.architecture"]
    n_head = kv[f"{arch}.attention.head_count"]
    n_kv = kv[f"{arch}.attention.head_count_kv"]
    eps = kv[f"{arch}.attention.layer_norm_rms_epsilon"]
    base = kv[f"{arch}.rope.freq_base"]
    n_layer = kv[f"{arch}.block_count"]
    hd = kv[f"{arch}.embedding_length"] // n_head
    T = len(ids)
    pos = np.arange(T, dtype=np.float64)
    inv = base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)  # [hd/2]
    ang = pos[:, None] * inv[None, :]  # [T, hd/2]
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(x):  # x [T, heads, hd]
        if arch == "llama":
            a, b = x[..., 0::2], x[..., 1::2]
        else:
            a, b = x[..., : hd // 2], x[..., hd // 2 :]
        c, s = cos[:, None, :], sin[:, None, :]
        ra, rb = a * c - b * s, a * s + b * c
        y = np.empty_like(x)
        if arch == "llama":
            y[..., 0::2], y[..., 1::2] = ra, rb
        else:
            y[..., : hd // 2], y[..., hd // 2 :] = ra, rb
        return y

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    def lin(x, name):
        y = maybe_q(x, name + ".weight") @ W[name + ".weight"].T
        return y + W[name + ".bias"] if name + ".bias" in W else y

    x = W["token_embd.weight"][ids]
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(n_layer):
        p = f"blk.{i}."
        h = rms(x, W[p + "attn_norm.weight"])
        q = rope(lin(h, p + "attn_q").reshape(T, n_head, hd))
        k = rope(lin(h, p + "attn_k").reshape(T, n_kv, hd))
        v = lin(h, p + "attn_v").reshape(T, n_kv, hd)
        rep = n_head // n_kv
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = np.einsum("hts,shd->thd", s, v).reshape(T, n_head * hd)
        x = x + lin(a, p + "attn_output")
        h = rms(x, W[p + "ffn_norm.weight"])
        g = lin(h, p + "ffn_gate")
        x = x + lin(g / (1 + np.exp(-g)) * lin(h, p + "ffn_up"), p + "ffn_down")
    x = rms(x, W["output_norm.weight"])
    head_name = "output.weight" if "output.weight" in W else "token_embd.weight"
    return maybe_q(x, head_name) @ W[head_name].T


# ------------------------------------------------------------------------------------------- plumbing


def _versions_line() -> str:
    v = versions()
    return f"torch {v['torch_version']}, transformers {v['transformers_version']}, gguf {v['gguf_version']}"


def _fsync_rename(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


_ST_DTYPES = {torch.float32: "F32", torch.int64: "I64"}


def save_expected(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """safetensors file with a byte-stable header (sorted keys), so reruns give identical bytes.
    safetensors.torch.save_file orders __metadata__ keys randomly from run to run."""
    header: dict = {"__metadata__": dict(sorted(meta.items()))}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        raw = t.numpy().astype(t.numpy().dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    head += b" " * (-len(head) % 8)  # the format allows trailing spaces; keeps the data 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for raw in blobs:
            f.write(raw)
    _fsync_rename(tmp, path)
    back = load_file(str(path))
    with safetensors.safe_open(str(path), "pt") as f:
        meta_back = f.metadata()
    if set(back) != set(tensors) or meta_back != meta:
        raise SystemExit(f"CHECK FAILED: {path.name} does not read back")
    for name, t in tensors.items():
        if back[name].dtype != t.dtype or not torch.equal(back[name], t):
            raise SystemExit(f"CHECK FAILED: {path.name}: {name} does not read back")


def model_with_weights(family: str, weights: dict[str, np.ndarray]) -> torch.nn.Module:
    """A fresh HF model of the family with the given (HF-named, HF-layout) weights loaded."""
    model = build_model(family)
    sd = model.state_dict()
    new = {}
    for k in sd:
        if k == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        if k not in weights:
            raise SystemExit(f"{family}: GGUF lacks a tensor for {k}")
        new[k] = torch.from_numpy(np.ascontiguousarray(weights[k]))
    model.load_state_dict(new, strict=not model.config.tie_word_embeddings)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    return model


def check_close(what: str, a: np.ndarray, b: np.ndarray, atol: float) -> float:
    err = float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))
    print(f"    {what}: max|diff| = {err:.3g} (tol {atol:g})")
    if not err <= atol:
        raise SystemExit(f"CHECK FAILED: {what}: max|diff| {err} > {atol}")
    return err


def base_meta(family: str, model: torch.nn.Module, kind: str) -> dict[str, str]:
    cfg = model.config
    meta = {
        "family": family,
        "kind": kind,
        "seq_len": str(SEQ_LEN),
        "vocab_size": str(cfg.vocab_size),
        "hidden_size": str(cfg.hidden_size),
        "num_hidden_layers": str(cfg.num_hidden_layers),
        "seed": str(FAMILIES[family]["seed"]),
        "attn_implementation": ATTN_IMPL,
        "forward": "one full forward over all seq_len positions, no KV cache, position_ids 0..seq_len-1, "
        "no attention_mask (causal)",
        "hidden_states_note": HIDDEN_STATES_NOTE,
        "generator": "tools/make_model_fixtures.py",
    }
    meta.update(versions())
    return meta


def make_family(family: str, out_root: Path) -> None:
    print(f"== {family}")
    d = out_root / family
    d.mkdir(parents=True, exist_ok=True)
    model = build_model(family)
    cfg = model.config
    model.save_pretrained(str(d))

    # Reference forward from the files just written, so the checked-in weights are what produced it.
    reloaded = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, attn_implementation=ATTN_IMPL).eval()
    for k, v in model.state_dict().items():
        if not torch.equal(v, reloaded.state_dict()[k]):
            raise SystemExit(f"{family}: {k} changed in save/load")
    ids = input_ids_for(family, cfg.vocab_size)
    ref = reference_forward(reloaded, ids)
    logits = ref["logits"]
    print(f"    input_ids {ids.tolist()}")
    print(f"    logits std {logits.std().item():.3f}, max|.| {logits.abs().max().item():.3f}, "
          f"argmax {logits.argmax(-1).tolist()}")
    save_expected(d / "expected.safetensors", ref, base_meta(family, model, "hf_f32"))

    arch = FAMILIES[family]["gguf_arch"]
    if arch is None:
        return
    hf_np = {k: v.detach().numpy() for k, v in model.state_dict().items()}

    # F32 GGUF: every tensor must come back bit-exact after un-permuting.
    f32_path = d / "tiny-f32.gguf"
    write_gguf(f32_path, family, model, gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32)
    back, types, reader = read_gguf_as_hf(f32_path, family, cfg)
    verify_gguf_metadata(reader, family, cfg, gguf.LlamaFileType.ALL_F32)
    for k, arr in back.items():
        if not np.array_equal(arr, hf_np[k]):
            raise SystemExit(f"CHECK FAILED: {f32_path.name}: {k} differs from the HF weight")
    print(f"    {f32_path.name}: {len(back)} tensors equal HF weights bit-for-bit after un-permute")
    np_logits = numpy_forward_gguf_semantics(f32_path, family, cfg, ids.numpy())
    check_close(f"{f32_path.name} llama.cpp-semantics numpy forward vs HF logits", np_logits, logits.numpy(), 1e-4)

    for tag, (qtype, ftype) in QUANT_TYPES.items():
        qpath = d / f"tiny-{tag}.gguf"
        write_gguf(qpath, family, model, qtype, ftype)
        deq, types, reader = read_gguf_as_hf(qpath, family, cfg)
        verify_gguf_metadata(reader, family, cfg, ftype)
        # Each quantized tensor must equal gguf.quants' own dequant(quant(HF weight)); F32 ones exact.
        for gname, hf_name, _arr in gguf_tensors(family, model):
            want_t = tensor_qtype(gname, hf_np[hf_name], qtype)
            if types[gname] != want_t.name:
                raise SystemExit(f"CHECK FAILED: {qpath.name}: {gname} is {types[gname]}, want {want_t.name}")
            expect = hf_np[hf_name]
            if want_t != gguf.GGMLQuantizationType.F32:
                expect = gguf.quants.dequantize(gguf.quants.quantize(expect, want_t), want_t)
            if not np.array_equal(deq[hf_name], expect):
                raise SystemExit(f"CHECK FAILED: {qpath.name}: {gname} != dequant(quant(HF weight))")
        qmodel = model_with_weights(family, deq)
        qref = reference_forward(qmodel, ids)
        meta = base_meta(family, model, f"hf_forward_with_{tag}_dequantized_weights")
        meta["weights_from"] = qpath.name
        meta["quantized_tensors"] = ",".join(sorted(g for g, t in types.items() if t != "F32"))
        save_expected(d / f"expected_{tag}.safetensors", qref, meta)
        qerr = float((qref["logits"] - logits).abs().max())
        print(f"    {qpath.name}: types {sorted(set(types.values()))}; "
              f"dequantized-weight logits differ from f32 by max {qerr:.3g}")
        if not qerr > 0:
            raise SystemExit(f"CHECK FAILED: {tag} reference is identical to the f32 one")
        np_q = numpy_forward_gguf_semantics(qpath, family, cfg, ids.numpy())
        check_close(f"{qpath.name} numpy forward vs expected_{tag} logits", np_q, qref["logits"].numpy(), 1e-4)

        # What a runtime that multiplies with the quantized blocks directly (candle QMatMul, ggml CPU)
        # should reproduce closely; the dequantized-weight reference above is ~0.1-0.3 away from it.
        actq = numpy_forward_gguf_semantics(qpath, family, cfg, ids.numpy(), act_quant=True).astype(np.float32)
        ameta = base_meta(family, model, f"numpy_forward_with_{tag}_weights_and_q8_0_activations")
        ameta["weights_from"] = qpath.name
        ameta["quantized_tensors"] = meta["quantized_tensors"]
        ameta["forward"] += (
            "; NOT HF: numpy f64 forward (numpy_forward_gguf_semantics) where the input rows of every matmul "
            "with a quantized weight (q/k/v/o/gate/up/down and the output head) are first quantized to Q8_0 "
            "(32-blocks, f16 scale d=amax/127, round half away from zero) as ggml/candle CPU vec_dot does; "
            "embedding lookup, norms, RoPE, attention in f64, output cast to f32"
        )
        del ameta["hidden_states_note"], ameta["attn_implementation"]
        save_expected(
            d / f"expected_{tag}_actq.safetensors",
            {"input_ids": ids.clone(), "logits": torch.from_numpy(np.ascontiguousarray(actq))},
            ameta,
        )
        da = actq - qref["logits"].numpy()
        print(f"    expected_{tag}_actq: activation quantization moves logits by rms "
              f"{np.sqrt((da ** 2).mean()):.3g}, max {np.abs(da).max():.3g} vs expected_{tag}")


def verify_gguf_metadata(r: gguf.GGUFReader, family: str, cfg, ftype) -> None:
    arch = FAMILIES[family]["gguf_arch"]
    kv = {k: f.contents() for k, f in r.fields.items()}
    want = {
        "general.architecture": arch,
        "general.type": "model",
        f"{arch}.block_count": cfg.num_hidden_layers,
        f"{arch}.context_length": cfg.max_position_embeddings,
        f"{arch}.embedding_length": cfg.hidden_size,
        f"{arch}.feed_forward_length": cfg.intermediate_size,
        f"{arch}.attention.head_count": cfg.num_attention_heads,
        f"{arch}.attention.head_count_kv": cfg.num_key_value_heads,
        "general.file_type": int(ftype),
        "general.quantization_version": gguf.GGML_QUANT_VERSION,
    }
    if arch == "llama":
        want[f"{arch}.vocab_size"] = cfg.vocab_size
        want[f"{arch}.rope.dimension_count"] = cfg.hidden_size // cfg.num_attention_heads
    for k, v in want.items():
        if kv.get(k) != v:
            raise SystemExit(f"CHECK FAILED: GGUF key {k} = {kv.get(k)!r}, want {v!r}")
    for k, v in (
        (f"{arch}.rope.freq_base", cfg.rope_parameters["rope_theta"]),
        (f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps),
    ):
        if abs(kv[k] - v) > 1e-6 * abs(v):
            raise SystemExit(f"CHECK FAILED: GGUF key {k} = {kv[k]!r}, want {v!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    repo = Path(__file__).resolve().parent.parent
    ap.add_argument("--out", type=Path, default=repo / "tests" / "fixtures" / "models")
    ap.add_argument("--family", choices=sorted(FAMILIES), action="append", help="default: all")
    args = ap.parse_args()
    torch.set_num_threads(1)  # deterministic reduction order, and the machine is shared
    print(_versions_line())
    for family in args.family or list(FAMILIES):
        make_family(family, args.out)
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"total fixture size {total / 1e6:.2f} MB")
    if total > 5_000_000:
        raise SystemExit("fixtures exceed 5 MB")


if __name__ == "__main__":
    main()
