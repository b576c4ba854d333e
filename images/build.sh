#!/usr/bin/env bash
# Build peg's images from the repository root; optionally load them into a kind cluster.
#   images/build.sh [cpu|gpu|all] [--kind CLUSTER] [--push]
# Images (TAG defaults to the version in pyproject.toml, REGISTRY to ghcr.io/peg-dev):
#   gpu: $REGISTRY/peg-trainer:$TAG      $REGISTRY/peg-ray:$TAG
#   cpu: $REGISTRY/peg-trainer:$TAG-cpu  $REGISTRY/peg-ray:$TAG-cpu   (with the offline MiniLM model)
# The CPU tags carry "cpu": peg's renderers refuse GPUs for such an image.
set -euo pipefail
cd "$(dirname "$0")/.."

variant=cpu kind_cluster="" push=0
while [ $# -gt 0 ]; do
  case "$1" in
    cpu|gpu|all) variant=$1 ;;
    --kind) kind_cluster=${2:?--kind needs a cluster name}; shift ;;
    --push) push=1 ;;
    *) echo "usage: images/build.sh [cpu|gpu|all] [--kind CLUSTER] [--push]" >&2; exit 2 ;;
  esac
  shift
done

REGISTRY=${REGISTRY:-ghcr.io/peg-dev}
TAG=${TAG:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)}
RAY_VERSION=$(sed -n 's/^ray==//p' constraints.txt)
CPU_BASE=${CPU_BASE:-python:3.12.12-slim-bookworm}
PEG_UID=10001  # = cluster.run_as_user's default (peg/config.py)

built=()
build() {  # build NAME TAG DOCKERFILE BUILD-ARG...
  local image="$REGISTRY/$1:$2" dockerfile=$3
  shift 3
  local args=()
  for a in "$@"; do args+=(--build-arg "$a"); done
  echo "+ docker build -f $dockerfile -t $image ${args[*]} ."
  docker build -f "$dockerfile" -t "$image" --build-arg "PEG_UID=$PEG_UID" "${args[@]}" .
  built+=("$image")
}

if [ "$variant" = gpu ] || [ "$variant" = all ]; then
  build peg-trainer "$TAG" images/trainer/Dockerfile VARIANT=gpu
  build peg-ray "$TAG" images/ray/Dockerfile VARIANT=gpu "RAY_VERSION=$RAY_VERSION" \
    "RAY_IMAGE=rayproject/ray:$RAY_VERSION-py312-gpu"
fi
if [ "$variant" = cpu ] || [ "$variant" = all ]; then
  build peg-trainer "$TAG-cpu" images/trainer/Dockerfile VARIANT=cpu EXTRAS=models "BASE_IMAGE=$CPU_BASE"
  build peg-ray "$TAG-cpu" images/ray/Dockerfile VARIANT=cpu EXTRAS=models "RAY_VERSION=$RAY_VERSION" \
    "RAY_IMAGE=rayproject/ray:$RAY_VERSION-py312-cpu"
fi

for image in "${built[@]}"; do
  if [ -n "$kind_cluster" ]; then
    echo "+ kind load docker-image $image --name $kind_cluster"
    kind load docker-image "$image" --name "$kind_cluster"
  fi
  if [ "$push" = 1 ]; then
    docker push "$image"
  fi
done
printf 'built %s\n' "${built[@]}"
