#!/usr/bin/env bash
# Install peg into the image's virtual environment /opt/venv (called from the Dockerfiles in images/).
#   install-peg.sh deps VARIANT EXTRAS   builder stage: /opt/venv with peg's dependencies, from a
#                                        stub package (cached layer); needs the package index
#   install-peg.sh peg                   final stage: peg itself into the copied /opt/venv, --no-deps,
#                                        offline (the layer a source edit rebuilds)
# /opt/venv sees the base image's packages (--system-site-packages): the pytorch base's torch and
# the Ray base's Ray stay as shipped. VARIANT is cpu or gpu. Every pip call takes constraints.txt
# (the torch and Ray pins) and, when set, $PEG_EXTRA_CONSTRAINT (the Ray image's own Ray version);
# $PEG_EXTRA_PACKAGES (requirements, space-separated) are installed with peg's dependencies.
# /opt/peg-local (images/local/, builder stage only) may hold wheels/torch-*.whl (used instead of
# $TORCH_CPU_INDEX) and certs/ca.crt (pip's CA bundle); the final stage never has it.
# No DeepSpeed op is compiled here: DS_BUILD_OPS=0, ops build just in time on the node that runs
# them (they use -march=native, so an op built on the build machine could crash elsewhere).
set -euo pipefail
src=$(cd "$(dirname "$0")" && pwd)  # the Dockerfile copies this script into the source folder
cd "$src"
venv=/opt/venv local_files=/opt/peg-local
constraints=(-c constraints.txt)
if [ -n "${PEG_EXTRA_CONSTRAINT:-}" ]; then
  echo "$PEG_EXTRA_CONSTRAINT" > /tmp/extra-constraint.txt
  constraints+=(-c /tmp/extra-constraint.txt)
fi
if [ -f "$local_files/certs/ca.crt" ]; then
  export PIP_CERT=$local_files/certs/ca.crt
fi
pip() { "$venv/bin/python" -m pip --no-cache-dir --disable-pip-version-check "$@"; }
torch_pin=$(grep -E '^torch==' constraints.txt)

case "$1" in
  deps)
    variant=$2 extras=$3
    python3 -m venv --system-site-packages "$venv"
    # setuptools: the build backend the offline `install-peg.sh peg` step builds peg with.
    pip install "${constraints[@]}" "setuptools>=68"
    mkdir -p peg && touch peg/__init__.py README.md
    if [ "$variant" = cpu ]; then
      # The CPU wheel of the pinned torch first; the rest then leaves torch alone.
      wheel=$(find "$local_files/wheels" -name "${torch_pin/==/-}+cpu-*.whl" 2>/dev/null | head -n 1)
      if [ -n "$wheel" ]; then
        pip install "${constraints[@]}" "$wheel"
      else
        pip install --index-url "${TORCH_CPU_INDEX:?}" "$torch_pin"
      fi
    fi
    # shellcheck disable=SC2086  # PEG_EXTRA_PACKAGES is a list of requirements
    pip install "${constraints[@]}" ".${extras:+[$extras]}" ${PEG_EXTRA_PACKAGES:-}
    if [ "$variant" = gpu ]; then
      # faiss-gpu takes faiss-cpu's place (both provide the `faiss` module).
      pip uninstall -y faiss-cpu
      pip install "${constraints[@]}" "${FAISS_GPU:?}"
    fi
    pip uninstall -y peg
    ;;
  peg)
    pip install --no-deps --no-index --no-build-isolation "${constraints[@]}" .
    "$venv/bin/python" -c "import peg, torch; print('peg', peg.__file__, 'torch', torch.__version__)"
    ;;
  *)
    echo "usage: install-peg.sh deps VARIANT EXTRAS | install-peg.sh peg" >&2
    exit 2
    ;;
esac
rm -rf "$src/build" "$src"/*.egg-info /tmp/extra-constraint.txt
