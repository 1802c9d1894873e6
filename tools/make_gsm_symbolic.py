#!/usr/bin/env python3
"""Write data/benchmarks/gsm_symbolic.jsonl: the fixed GSM8K stand-in of specauf.

GSM8K itself ships in no package registry. reasoning-gym==0.1.25 (Apache-2.0) carries GSM-Symbolic:
100 templates built from GSM8K test questions, whose numbers and names are re-drawn from a seed. This
script draws a fixed set once (default: 500 questions, seed 0, difficulty 1.0) so that every machine
evaluates the same questions; the Rust loader embeds the file it writes.

Each line: {"id", "question", "answer", "template"}.
- `question`: reasoning-gym appends " Give the result as your final answer. Do not include units." to
  every question; that suffix is removed so the question reads like a GSM8K question, and the benchmark
  prompt adds the DFlash math instruction instead.
- `answer`: the numeric answer as reasoning-gym gives it (a string).
- `template`: the GSM-Symbolic template index (0..99) the question was drawn from.

Usage: python3 tools/make_gsm_symbolic.py [--size 500] [--seed 0] [--out data/benchmarks/gsm_symbolic.jsonl]
Without reasoning_gym importable, it creates a temporary venv, installs reasoning-gym==0.1.25 there
(from the package registry, through pip) and re-runs itself inside it.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

PACKAGE = "reasoning-gym"
VERSION = "0.1.25"
SUFFIX = " Give the result as your final answer. Do not include units."
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def installed_version():
    try:
        from importlib.metadata import version

        import reasoning_gym  # noqa: F401

        return version(PACKAGE)
    except Exception:
        return None


def rerun_in_temporary_venv(argv):
    with tempfile.TemporaryDirectory(prefix="gsm-symbolic-venv-") as venv:
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        py = os.path.join(venv, "bin", "python")
        subprocess.run([py, "-m", "pip", "install", "-q", f"{PACKAGE}=={VERSION}"], check=True)
        return subprocess.run([py, os.path.abspath(__file__), *argv]).returncode


def generate(size, seed):
    import reasoning_gym

    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed)
    rows = []
    for idx in range(size):
        entry = dataset[idx]
        question = entry["question"]
        if not question.endswith(SUFFIX):
            raise SystemExit(f"question {idx} lacks the expected reasoning-gym suffix: {question[-80:]!r}")
        question = question[: -len(SUFFIX)].strip()
        rows.append(
            {
                "id": f"gsm_symbolic/seed{seed}/{idx}",
                "question": question,
                "answer": str(entry["answer"]),
                "template": dataset.task_indices[idx],
            }
        )
    return rows


def write_atomically(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=500, help="number of questions (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="reasoning-gym dataset seed (default 0)")
    parser.add_argument(
        "--out",
        default=os.path.join(REPO_ROOT, "data", "benchmarks", "gsm_symbolic.jsonl"),
        help="output jsonl (default data/benchmarks/gsm_symbolic.jsonl)",
    )
    args = parser.parse_args()

    found = installed_version()
    if found is None:
        sys.exit(rerun_in_temporary_venv(sys.argv[1:]))
    if found != VERSION:
        raise SystemExit(f"{PACKAGE} {found} is installed; this file is defined by {PACKAGE}=={VERSION}")

    rows = generate(args.size, args.seed)
    write_atomically(os.path.abspath(args.out), rows)
    templates = len({r["template"] for r in rows})
    print(f"wrote {len(rows)} questions from {templates} templates to {args.out}")


if __name__ == "__main__":
    main()
