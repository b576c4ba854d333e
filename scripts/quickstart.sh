#!/usr/bin/env bash
# Set up (if needed) and run the quickstart on SciFact from ../shared/data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/peg eval --model sentence-transformers/all-MiniLM-L6-v2 \
  --data ../shared/data/scifact --split test --output runs/quickstart/eval-base "$@"
