#!/usr/bin/env bash
# Build peg's images from the repository root; optionally load them into a kind cluster.
#   images/build.sh [cpu|gpu|all] [--local] [--only trainer|ray] [--kind CLUSTER] [--push]
# Images (TAG defaults to the version in pyproject.toml, REGISTRY to ghcr.io/peg-dev):
#   gpu: $REGISTRY/peg-trainer:$TAG      $REGISTRY/peg-ray:$TAG
#   cpu: $REGISTRY/peg-trainer:$TAG-cpu  $REGISTRY/peg-ray:$TAG-cpu   (with the offline MiniLM model)
# The CPU tags carry "cpu": peg's renderers refuse GPUs for such an image.
# --local (CPU only) builds where no image registry and no PyTorch index can be reached: both CPU
# images start from a Debian image made here (debootstrap + docker import, built once and kept as
# $LOCAL_BASE), torch is the CPU wheel from $WHEELS (default /opt/wheels), and pip trusts the host's
# CA bundle ($CA_BUNDLE) in the builder stage only. Every build runs with --network host (no bridge).
set -euo pipefail
cd "$(dirname "$0")/.."

variant=cpu kind_cluster="" push=0 local_build=0 only=""
while [ $# -gt 0 ]; do
  case "$1" in
    cpu|gpu|all) variant=$1 ;;
    --local) local_build=1 ;;
    --only) only=${2:?--only needs trainer or ray}; shift
      case "$only" in trainer|ray) ;; *) echo "images/build.sh: --only takes trainer or ray" >&2; exit 2 ;; esac ;;
    --kind) kind_cluster=${2:?--kind needs a cluster name}; shift ;;
    --push) push=1 ;;
    *) echo "usage: images/build.sh [cpu|gpu|all] [--local] [--only trainer|ray] [--kind CLUSTER] [--push]" >&2; exit 2 ;;
  esac
  shift
done
if [ "$local_build" = 1 ] && [ "$variant" != cpu ]; then
  echo "images/build.sh: --local builds the CPU images only (the GPU bases come from their registries)" >&2
  exit 2
fi

REGISTRY=${REGISTRY:-ghcr.io/peg-dev}
TAG=${TAG:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)}
RAY_VERSION=$(sed -n 's/^ray==//p' constraints.txt)
TORCH_VERSION=$(sed -n 's/^torch==//p' constraints.txt)
CPU_BASE=${CPU_BASE:-python:3.12.12-slim-bookworm}
RAY_CPU_IMAGE=rayproject/ray:$RAY_VERSION-py312-cpu
LOCAL_BASE=${LOCAL_BASE:-local/peg-debian-python:bookworm}
PEG_UID=10001  # = cluster.run_as_user's default (peg/config.py)

# The Debian base of --local: bookworm minbase with Debian's Python 3.11 (the host wheel's cp311)
# and its headers (they served DeepSpeed's CPU op, which peg no longer builds), made once, kept by tag.
local_base() {
  if docker image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
    echo "+ $LOCAL_BASE exists: kept"
    return
  fi
  local rootfs mirror
  rootfs=$(mktemp -d /tmp/peg-rootfs.XXXXXX)
  mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
  echo "+ debootstrap --variant=minbase bookworm $rootfs $mirror"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-dev bookworm "$rootfs" "$mirror" >/dev/null
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
  tar -C "$rootfs" -c . | docker import --change 'ENV LANG=C.UTF-8' - "$LOCAL_BASE"
  rm -rf "$rootfs"
}

# images/local/ is what only the builder stage copies: the torch wheel and the CA bundle of --local.
stage_local_files() {
  find images/local -mindepth 1 ! -name README.md ! -name .gitignore -exec rm -rf {} +
  if [ "$local_build" = 1 ]; then
    mkdir -p images/local/wheels images/local/certs
    local wheel
    wheel=$(ls "${WHEELS:-/opt/wheels}"/torch-"$TORCH_VERSION"+cpu-*.whl | head -n 1)
    cp "$wheel" images/local/wheels/
    cp "${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}" images/local/certs/ca.crt
  fi
}

built=()
build() {  # build NAME TAG DOCKERFILE BUILD-ARG...  (skipped when --only names the other image)
  if [ -n "$only" ] && [ "$1" != "peg-$only" ]; then
    return
  fi
  local image="$REGISTRY/$1:$2" dockerfile=$3 start
  shift 3
  local args=()
  for a in "$@"; do args+=(--build-arg "$a"); done
  echo "+ docker build --network host -f $dockerfile -t $image ${args[*]} ."
  start=$SECONDS
  docker build --network host -f "$dockerfile" -t "$image" --build-arg "PEG_UID=$PEG_UID" "${args[@]}" .
  echo "built $image in $((SECONDS - start)) s, $(docker image inspect -f '{{.Size}}' "$image" | numfmt --to=si --format=%.2f)B"
  built+=("$image")
}

stage_local_files
trap 'find images/local -mindepth 1 ! -name README.md ! -name .gitignore -exec rm -rf {} +' EXIT
if [ "$local_build" = 1 ]; then
  local_base
  CPU_BASE=$LOCAL_BASE RAY_CPU_IMAGE=$LOCAL_BASE
fi
if [ "$variant" = gpu ] || [ "$variant" = all ]; then
  build peg-trainer "$TAG" images/trainer/Dockerfile VARIANT=gpu
  build peg-ray "$TAG" images/ray/Dockerfile VARIANT=gpu "RAY_VERSION=$RAY_VERSION" \
    "RAY_IMAGE=rayproject/ray:$RAY_VERSION-py312-gpu"
fi
if [ "$variant" = cpu ] || [ "$variant" = all ]; then
  build peg-trainer "$TAG-cpu" images/trainer/Dockerfile VARIANT=cpu EXTRAS=models "BASE_IMAGE=$CPU_BASE"
  build peg-ray "$TAG-cpu" images/ray/Dockerfile VARIANT=cpu EXTRAS=models "RAY_VERSION=$RAY_VERSION" \
    "RAY_IMAGE=$RAY_CPU_IMAGE"
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
