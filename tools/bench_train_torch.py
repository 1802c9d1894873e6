"""The PyTorch-eager peer of `specauf bench train`: one DFlash drafter training step at the same
shape, written from the method (docs/DESIGN.md §2–§3), so that the two can be timed side by side.

Shape (the defaults match `specauf bench train`): a SmolLM2-135M-width drafter (H 576, 9 heads,
3 KV heads, head_dim 64, MLP 1536, vocab 49152, RoPE θ 100000), `--layers` decoder layers, two
target taps concatenated (2·H) into `fc` → `hidden_norm`, `--anchors` blocks of `--block-size`
on one `--seq-len`-token sequence, block rows attending to the context before their anchor and to
their own block, final norm, the frozen tied LM head over all predicted rows, the decay objective
(γ = 7 for B = 16), backward, AdamW. Weights and features are random: the step's cost does not
depend on their values for this objective.

It prints one JSON line: median step ms, supervised tokens/s (blocks × (B-1) / step time), and
peak RSS. tools/bench_train_side_by_side.sh runs it next to `specauf bench train`.
"""

import argparse
import json
import resource
import statistics
import time

import torch
import torch.nn.functional as F

H, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB, THETA, EPS = 576, 9, 3, 64, 1536, 49152, 100000.0, 1e-5


def rms_norm(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


def rope(x, pos):
    # x (n, heads, hd), pos (n,): the HF rotate-half convention.
    inv = 1.0 / (THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))
    ang = pos[:, None].float() * inv[None, :]
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None, :], torch.cat([ang.sin()] * 2, -1)[:, None, :]
    x1, x2 = x[..., : HEAD_DIM // 2], x[..., HEAD_DIM // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        lin = lambda i, o: torch.nn.Linear(i, o, bias=False)
        self.q, self.k, self.v, self.o = lin(H, HEADS * HEAD_DIM), lin(H, KV_HEADS * HEAD_DIM), lin(H, KV_HEADS * HEAD_DIM), lin(HEADS * HEAD_DIM, H)
        self.gate, self.up, self.down = lin(H, MLP), lin(H, MLP), lin(MLP, H)
        self.in_norm, self.post_norm = torch.nn.Parameter(torch.ones(H)), torch.nn.Parameter(torch.ones(H))
        self.q_norm, self.k_norm = torch.nn.Parameter(torch.ones(HEAD_DIM)), torch.nn.Parameter(torch.ones(HEAD_DIM))

    def forward(self, x, ctx, ctx_pos, blk_pos, mask):
        # x (nb·B, H) block rows; ctx (T, H) the fused context feature; mask (nb·B, T + nb·B).
        n, t = x.shape[0], ctx.shape[0]
        h = rms_norm(x, self.in_norm)
        q = rms_norm(self.q(h).view(n, HEADS, HEAD_DIM), self.q_norm)
        kv_in = torch.cat([ctx, h], 0)
        k = rms_norm(self.k(kv_in).view(t + n, KV_HEADS, HEAD_DIM), self.k_norm)
        v = self.v(kv_in).view(t + n, KV_HEADS, HEAD_DIM)
        q = rope(q, blk_pos)
        k = rope(k, torch.cat([ctx_pos, blk_pos]))
        rep = HEADS // KV_HEADS
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        a = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask)
        x = x + self.o(a.transpose(0, 1).reshape(n, HEADS * HEAD_DIM))
        h = rms_norm(x, self.post_norm)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Drafter(torch.nn.Module):
    def __init__(self, layers, taps):
        super().__init__()
        self.fc = torch.nn.Linear(taps * H, H, bias=False)
        self.hidden_norm, self.norm = torch.nn.Parameter(torch.ones(H)), torch.nn.Parameter(torch.ones(H))
        self.layers = torch.nn.ModuleList([Layer() for _ in range(layers)])

    def forward(self, feats, block_emb, anchors, block):
        t = feats.shape[0]
        ctx = rms_norm(self.fc(feats), self.hidden_norm)
        nb = anchors.shape[0]
        blk_pos = (anchors[:, None] + torch.arange(block)[None, :]).reshape(-1)
        ctx_pos = torch.arange(t)
        rows = torch.arange(nb * block) // block
        ctx_ok = ctx_pos[None, :] < anchors[rows][:, None]
        blk_ok = rows[:, None] == rows[None, :]
        mask = torch.cat([ctx_ok, blk_ok], 1)
        x = block_emb
        for layer in self.layers:
            x = layer(x, ctx, ctx_pos, blk_pos, mask)
        return rms_norm(x, self.norm)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--anchors", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gamma", type=float, default=7.0)
    ap.add_argument("--head-vocab", type=int, default=0,
                    help="score only the first K rows of the head (labels taken mod K), as `specauf bench "
                         "train --head-vocab draft` does with K = 8192; 0: the whole vocabulary")
    ap.add_argument("--objective", choices=["decay", "auf"], default="decay",
                    help="decay (the default, exp(-k/gamma) on every valid position) or auf (every valid "
                         "position up to and including a block's first argmax failure, normalised by the "
                         "weight sum), computed from full logits as a plain implementation would")
    ap.add_argument("--head-bf16", action="store_true",
                    help="the head's product under CPU autocast to bf16 (logits back to f32 for the CE), the "
                         "peer of `specauf bench train --head-precision bf16`")
    ap.add_argument("--layers-bf16", action="store_true",
                    help="the drafter's forward (its linears and attention products) under CPU autocast to "
                         "bf16, the peer of `specauf bench train --layer-precision bf16`")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    b, t = a.block_size, a.seq_len
    embed = torch.randn(VOCAB, H) * 0.02  # frozen, tied: embedding and LM head
    ids = torch.randint(0, VOCAB, (t,))
    feats = torch.randn(t, 2 * H)
    drafter = Drafter(a.layers, 2)
    opt = torch.optim.AdamW(drafter.parameters(), lr=6e-4, weight_decay=0.0)
    cands = torch.arange(t // 4, t - 1)
    # decay weights of block positions 1..B-1
    w = torch.exp(-torch.arange(b - 1, dtype=torch.float32) / a.gamma)
    times = []
    for run in range(a.runs + 1):
        g = torch.Generator().manual_seed(run)
        anchors = cands[torch.randperm(cands.numel(), generator=g)[: a.anchors]].sort().values
        block_ids = torch.full((anchors.numel(), b), 16)
        block_ids[:, 0] = ids[anchors]
        lab_pos = anchors[:, None] + torch.arange(1, b)[None, :]
        valid = lab_pos < t
        labels = ids[lab_pos.clamp(max=t - 1)]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if a.layers_bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                h = drafter(feats, embed[block_ids.reshape(-1)], anchors, b)
            h = h.float()
        else:
            h = drafter(feats, embed[block_ids.reshape(-1)], anchors, b)
        pred = h.view(anchors.numel(), b, H)[:, 1:, :].reshape(-1, H)
        head = embed[: a.head_vocab] if a.head_vocab > 0 else embed
        if a.head_bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = pred @ head.T
            logits = logits.float()
        else:
            logits = pred @ head.T
        ce = F.cross_entropy(logits, labels.reshape(-1) % head.shape[0], reduction="none")
        if a.objective == "auf":
            with torch.no_grad():
                ok = (logits.argmax(-1) == labels.reshape(-1) % head.shape[0]).view(-1, b - 1)
                # alive before position k: every valid earlier position was right (invalid ones pass)
                passed = (ok | ~valid).to(torch.int32)
                alive = torch.cat([torch.ones_like(passed[:, :1]), passed[:, :-1].cumprod(1)], 1).bool()
                ww = (alive & valid).float().reshape(-1)
        else:
            ww = (w[None, :] * valid).reshape(-1)
        loss = (ww * ce).sum() / ww.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        opt.step()
        if run > 0:  # the first step pays for allocation and warm-up
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    rows = a.anchors * (b - 1)
    print(json.dumps({
        "peer": f"pytorch {torch.__version__} eager" + (", head under bf16 autocast" if a.head_bf16 else "")
                + (", layers under bf16 autocast" if a.layers_bf16 else ""),
        "objective": a.objective,
        "threads": a.threads,
        "step_ms": round(step * 1e3, 1),
        "supervised_tokens_per_s": round(rows / step, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "loss": round(float(loss.detach()), 4),
        "shape": {"layers": a.layers, "block_size": b, "anchors": a.anchors, "seq_len": t, "rows": rows,
                  "head_rows": a.head_vocab or VOCAB},
    }))


if __name__ == "__main__":
    main()
