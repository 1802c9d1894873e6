"""Held-out in-block accept length against training wall-clock, from run directories'
metrics.jsonl (the training-step seconds are tokens / tokens_per_s, summed; evaluation time is
not counted). Prints a markdown table per run.

    python3 tools/levers_table.py RUN_DIR [RUN_DIR ...]
"""

import json
import sys


def rows(run):
    secs = 0.0
    out = []
    with open(f"{run}/metrics.jsonl") as f:
        for line in f:
            m = json.loads(line)
            secs += m["tokens"] / m["tokens_per_s"] if m["tokens_per_s"] > 0 else 0.0
            if m.get("eval"):
                e = m["eval"]
                out.append((m["step"], secs / 60, e["accept_len"], e["acc"], e["loss"]))
    return out


for run in sys.argv[1:]:
    print(f"\n{run}\n\n| step | train minutes | held-out accept len | held-out acc | held-out loss |\n|---|---|---|---|---|")
    for step, mins, al, acc, loss in rows(run):
        print(f"| {step} | {mins:.1f} | {al:.3f} | {acc:.3f} | {loss:.3f} |")
