#!/usr/bin/env bash
# Set up (if needed) and run the full pipeline on SciFact from ../shared/data:
# mine -> train (progressive InfoNCE, GradCache, 2 processes) -> eval -> export -> report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/peg pipeline run examples/quickstart.yaml "$@"
