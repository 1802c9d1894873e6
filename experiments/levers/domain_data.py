#!/usr/bin/env python3
"""Writes the ShareGPT conversations whose first user turn asks for code or mathematics, in file
order, as a ShareGPT JSON list (the data-domain lever of docs/recipe.md).

The classifier is a pair of regular expressions over the first user turn, nothing smarter: a
conversation is `code` when it shows code or names a programming language, `math` when it asks to
solve or calculate or shows arithmetic. Held-out conversations are not removed here; `specauf
prepare` drops them as it drops them from any ShareGPT file.

    python3 experiments/levers/domain_data.py SHAREGPT.json OUT.json [--kinds code,math] [--limit N]
        [--general M]

With --general M the output starts with the file's first M conversations of any kind, then the
selected kinds that are not among them (a mix of the default data and the domain).
"""
import argparse
import json
import re
import sys

CODE = re.compile(
    r"```|\bdef \w+\(|#include|public static|console\.log|\bimport \w+|SELECT .+ FROM|=>|\bfunction\b"
    r"|\bclass \w+|python|javascript|\bjava\b|c\+\+|\bcode\b|\bsql\b",
    re.I,
)
MATH = re.compile(
    r"\b(solve|calculate|equation|integral|derivative|probability|how many|sum of|prove|percent|math"
    r"|algebra)\b|\d+\s*[-+*/^]\s*\d+",
    re.I,
)


def conversations(path):
    """Streams the records of a ShareGPT JSON list, stopping at the first incomplete one (the
    registry's file is cut off mid-record)."""
    raw = open(path, encoding="utf-8").read()
    dec = json.JSONDecoder()
    i = raw.index("[") + 1
    while True:
        while i < len(raw) and raw[i] in " \n\r\t,":
            i += 1
        try:
            obj, i = dec.raw_decode(raw, i)
        except json.JSONDecodeError:
            return
        yield obj


def kind(conv):
    first = next((t.get("value", "") for t in conv.get("conversations") or [] if t.get("from") == "human"), "")
    if CODE.search(first):
        return "code"
    if MATH.search(first):
        return "math"
    return "chat"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sharegpt")
    ap.add_argument("out")
    ap.add_argument("--kinds", default="code,math")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--general", type=int, default=0)
    args = ap.parse_args()
    kinds = set(args.kinds.split(","))
    kept, counts = [], {}
    general, picked = [], []
    for conv in conversations(args.sharegpt):
        k = kind(conv)
        counts[k] = counts.get(k, 0) + 1
        if len(general) < args.general:
            general.append(conv)
        elif k in kinds and (args.limit is None or len(picked) < args.limit):
            picked.append(conv)
    kept = general + picked
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(kept, f, ensure_ascii=False)
    import os

    os.replace(tmp, args.out)
    print(f"{len(kept)} conversations written to {args.out}; in the file: {counts}", file=sys.stderr)


if __name__ == "__main__":
    main()
