"""Arms of a lever against seeds: the held-out in-block accept length each run ended with, the
mean of its last three held-out evaluations (steadier than one), and its training minutes, read
from OUT/ARM-sSEED/metrics.jsonl. Prints a markdown table with each arm's mean over the seeds,
and the spread of the baseline arm (the first) for scale.

    python3 tools/levers_seeds.py OUT "cosine linear constant mask" "0 1 2 3"
"""

import json
import statistics
import sys


def run(path):
    secs, evals = 0.0, []
    with open(f"{path}/metrics.jsonl") as f:
        for line in f:
            m = json.loads(line)
            secs += m["tokens"] / m["tokens_per_s"] if m["tokens_per_s"] > 0 else 0.0
            if m.get("eval"):
                evals.append(m["eval"]["accept_len"])
    if not evals:
        raise SystemExit(f"{path}: no held-out evaluation in metrics.jsonl")
    return evals[-1], statistics.mean(evals[-3:]), secs / 60


def main():
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    out, arms, seeds = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
    head = " | ".join(f"seed {s}" for s in seeds)
    print(f"| arm | {head} | mean (final) | mean (last 3 evals) | minutes a run |")
    print("|---" * (len(seeds) + 4) + "|")
    for arm in arms:
        got = [run(f"{out}/{arm}-s{s}") for s in seeds]
        cells = " | ".join(f"{f:.3f} ({l3:.3f})" for f, l3, _ in got)
        finals = [f for f, _, _ in got]
        last3 = [l3 for _, l3, _ in got]
        spread = f", spread {max(finals) - min(finals):.3f}" if arm == arms[0] else ""
        mins = statistics.median(m for _, _, m in got)
        print(f"| {arm} | {cells} | {statistics.mean(finals):.3f}{spread} | {statistics.mean(last3):.3f} | {mins:.1f} |")


main()
