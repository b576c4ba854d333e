#!/usr/bin/env bash
# Regenerate the rendered objects from run.yaml (tests/test_k8s_manifests.py checks they are current).
set -euo pipefail
cd "$(dirname "$0")"
PEG=${PEG:-peg}
rm -rf rendered pytorchjob
$PEG render run.yaml -o rendered
$PEG render run.yaml --stage train --set cluster.trainer_api=pytorchjob -o pytorchjob
$PEG operator manifest run.yaml -o embeddingpipeline.yaml
