#!/usr/bin/env bash
# Creates (once) a venv with the official `openai` client from PyPI and prints the path of its
# python on the last line of stdout. tests/serve.rs runs this and then check.py; anything that
# fails here makes that test skip with the reason.
#
#   VENV (default $SPECAUF_OPENAI_VENV, else ${XDG_CACHE_HOME:-~/.cache}/specauf/openai-venv)
set -euo pipefail
VENV="${SPECAUF_OPENAI_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/specauf/openai-venv}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import openai" 2>/dev/null; then
    echo "$VENV/bin/python"
    exit 0
fi
command -v python3 >/dev/null || { echo "python3 is not installed" >&2; exit 1; }
rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
python3 -m venv "$VENV" >&2 || { echo "python3 -m venv failed (Debian: apt-get install python3-venv)" >&2; exit 1; }
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "openai>=1.0" >&2 \
    || { echo "pip install openai failed (no network to PyPI?)" >&2; exit 1; }
echo "$VENV/bin/python"
