"""Held-out in-block accept length against training minutes, one line per run, as an SVG (no
third-party packages). Minutes are the training-step seconds of each run's metrics.jsonl, summed
(evaluation not counted); a run measured under load can instead be charged a fixed seconds-per-step
measured quietly for its shape, with RUN_DIR=SECONDS_PER_STEP. RUN_A+RUN_B+... draws the mean of
runs that evaluate at the same steps (seeds of one arm): accept length and minutes averaged.
With METRIC=pos1 in the environment the y axis is the held-out acceptance at block position 1
instead, which compares drafters of different block sizes (an accept length is capped at B).

    [METRIC=pos1] python3 tools/levers_plot.py OUT.svg "TITLE" LABEL:RUN_DIR[+RUN_DIR...][=SECONDS_PER_STEP] ...
"""

import json
import os
import sys

POS1 = os.environ.get("METRIC", "accept") == "pos1"

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def curve(run, per_step):
    secs, pts = 0.0, [(0.0, 0.0 if POS1 else 1.0)]
    with open(f"{run}/metrics.jsonl") as f:
        for line in f:
            m = json.loads(line)
            if per_step is not None:
                secs = m["step"] * per_step
            elif m["tokens_per_s"] > 0:
                secs += m["tokens"] / m["tokens_per_s"]
            if m.get("eval"):
                e = m["eval"]
                pts.append((secs / 60, e["acc_per_position"][0] if POS1 else e["accept_len"]))
    return pts


def main():
    out, title, specs = sys.argv[1], sys.argv[2], sys.argv[3:]
    lines = []
    for s in specs:
        label, rest = s.split(":", 1)
        runs, _, per = rest.partition("=")
        curves = [curve(run, float(per) if per else None) for run in runs.split("+")]
        n = min(len(c) for c in curves)
        mean = [(sum(c[i][0] for c in curves) / len(curves), sum(c[i][1] for c in curves) / len(curves)) for i in range(n)]
        lines.append((label, mean, bool(per)))
    xmax = max(p[0] for _, c, _ in lines for p in c) * 1.05
    ymin = 0.0 if POS1 else 1.0
    ymax = max(p[1] for _, c, _ in lines for p in c)
    ymax = ymin + (ymax - ymin) * 1.1 + 0.02
    W, H, L, R, T, B = 760, 440, 70, 200, 40, 50
    pw, ph = W - L - R, H - T - B
    X = lambda x: L + pw * x / xmax
    Y = lambda y: T + ph * (1 - (y - ymin) / (ymax - ymin))
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{L}" y="22" font-size="14">{title}</text>']
    for i in range(6):
        y = ymin + (ymax - ymin) * i / 5
        svg.append(f'<line x1="{L}" x2="{L + pw}" y1="{Y(y):.1f}" y2="{Y(y):.1f}" stroke="#ddd"/>')
        svg.append(f'<text x="{L - 6}" y="{Y(y) + 4:.1f}" text-anchor="end">{y:.2f}</text>')
    step = max(1, round(xmax / 6))
    x = 0
    while x <= xmax:
        svg.append(f'<line x1="{X(x):.1f}" x2="{X(x):.1f}" y1="{T}" y2="{T + ph}" stroke="#eee"/>')
        svg.append(f'<text x="{X(x):.1f}" y="{T + ph + 16}" text-anchor="middle">{x}</text>')
        x += step
    svg.append(f'<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
    svg.append(f'<text x="{L + pw / 2}" y="{H - 10}" text-anchor="middle">training minutes (2-core machine, step time only)</text>')
    svg.append(f'<text x="16" y="{T + ph / 2}" transform="rotate(-90 16 {T + ph / 2})" text-anchor="middle">{"held-out acceptance at block position 1" if POS1 else "held-out accept length (in-block, trained B)"}</text>')
    for i, (label, c, fixed) in enumerate(lines):
        col = COLORS[i % len(COLORS)]
        d = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in c)
        svg.append(f'<polyline points="{d}" fill="none" stroke="{col}" stroke-width="2"/>')
        ly = T + 14 + 18 * i
        svg.append(f'<line x1="{L + pw + 12}" x2="{L + pw + 32}" y1="{ly - 4}" y2="{ly - 4}" stroke="{col}" stroke-width="2"/>')
        svg.append(f'<text x="{L + pw + 38}" y="{ly}">{label}{" *" if fixed else ""}</text>')
    if any(f for _, _, f in lines):
        svg.append(f'<text x="{L + pw + 12}" y="{T + ph}" font-size="10">* minutes = steps × a measured step time</text>')
    svg.append("</svg>")
    with open(out, "w") as f:
        f.write("\n".join(svg) + "\n")


if __name__ == "__main__":
    main()
