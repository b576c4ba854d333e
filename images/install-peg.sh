#!/usr/bin/env bash
# Install peg into an image's Python in two layers (called from the Dockerfiles in images/).
#   install-peg.sh deps VARIANT EXTRAS   peg's dependencies, from a stub package (cached layer)
#   install-peg.sh peg                   peg itself, --no-deps (the layer a source edit rebuilds)
# VARIANT is cpu or gpu. Every pip call takes constraints.txt (the torch pin) and, when set,
# $PEG_EXTRA_CONSTRAINT (the Ray image pins its own Ray version with it).
# No DeepSpeed op is compiled here: DS_BUILD_OPS=0, ops build just in time on the node that runs
# them (they use -march=native, so an op built on the build machine could crash elsewhere).
set -euo pipefail
src=$(cd "$(dirname "$0")" && pwd)  # the Dockerfile copies this script into the source folder
cd "$src"
constraints=(-c constraints.txt)
if [ -n "${PEG_EXTRA_CONSTRAINT:-}" ]; then
  echo "$PEG_EXTRA_CONSTRAINT" > /tmp/extra-constraint.txt
  constraints+=(-c /tmp/extra-constraint.txt)
fi
pip() { python -m pip --no-cache-dir --disable-pip-version-check "$@"; }
torch_pin=$(grep -E '^torch==' constraints.txt)

case "$1" in
  deps)
    variant=$2 extras=$3
    mkdir -p peg && touch peg/__init__.py README.md
    if [ "$variant" = cpu ]; then
      # The CPU wheel of the pinned torch first; the rest then leaves torch alone.
      pip install --index-url "${TORCH_CPU_INDEX:?}" "$torch_pin"
    fi
    pip install "${constraints[@]}" ".${extras:+[$extras]}"
    if [ "$variant" = gpu ]; then
      # faiss-gpu takes faiss-cpu's place (both provide the `faiss` module).
      pip uninstall -y faiss-cpu
      pip install "${constraints[@]}" "${FAISS_GPU:?}"
    fi
    pip uninstall -y peg
    ;;
  peg)
    pip install --no-deps "${constraints[@]}" .
    python -c "import peg, torch; print('peg', peg.__file__, 'torch', torch.__version__)"
    ;;
  *)
    echo "usage: install-peg.sh deps VARIANT EXTRAS | install-peg.sh peg" >&2
    exit 2
    ;;
esac
rm -rf "$src/build" "$src"/*.egg-info /tmp/extra-constraint.txt
