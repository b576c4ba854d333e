#!/usr/bin/env bash
# Set up (if needed) and run the full pipeline on SciFact (examples/quickstart.yaml, data.beir: beir:scifact):
# mine -> train (progressive InfoNCE, GradCache, 2 processes) -> eval -> export -> report.
# SciFact comes from a local copy when there is one: $PEG_DATA_DIR/scifact, else ../shared/data/scifact
# (as on CI); otherwise it is downloaded once from BEIR's archive into ~/.cache/peg/datasets.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PEG_DATA_DIR:-}" ] && [ -d ../shared/data/scifact ]; then
  PEG_DATA_DIR="$(cd ../shared/data && pwd)"
  export PEG_DATA_DIR
fi
if [ -n "${PEG_DATA_DIR:-}" ] && [ -d "$PEG_DATA_DIR/scifact" ]; then
  echo "SciFact: local copy $PEG_DATA_DIR/scifact" >&2
fi
bash scripts/setup.sh
export DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
# DeepSpeed's JIT-built ops cached per checkout: clones sharing ~/.cache/torch_extensions rebuild each other's
# build (and a build killed midway leaves a lock every later build waits on)
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch-extensions}"
exec .venv/bin/peg pipeline run examples/quickstart.yaml "$@"
