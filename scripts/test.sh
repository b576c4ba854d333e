#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
# DeepSpeed's JIT-built ops cached per checkout: clones sharing ~/.cache/torch_extensions rebuild each other's
# build (and a build killed midway leaves a lock every later build waits on)
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch-extensions}"
exec .venv/bin/python -m pytest "$@"
