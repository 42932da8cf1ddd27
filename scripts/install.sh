#!/usr/bin/env bash
# The one install step shared by the README, CI and the Dockerfile.
#   bash scripts/install.sh                  # development and CI: editable, with the test extra
#   bash scripts/install.sh --runtime [SRC]  # users and the container image: SRC (a wheel or
#                                            # a source folder, default .) with the extras every
#                                            # command needs (onnx export, MONAI bundle), no test tools
#   bash scripts/install.sh --wheel DIR      # build planar3d's wheel into DIR (container builder)
# Versions, pip/setuptools/wheel included, are pinned by constraints.txt so every machine gets the
# same packages. A torch 2.13.0 that is already installed (CPU or CUDA build) is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet -c constraints.txt pip setuptools wheel
case "${1:-}" in
  "")
    python -m pip install -c constraints.txt -e ".[test]" ;;
  --runtime)
    source="${2:-.}"
    python -m pip install --no-cache-dir -c constraints.txt "${source}[onnx,bundle]" ;;
  --wheel)
    python -m pip wheel --no-deps --no-build-isolation -w "${2:?--wheel needs a folder}" . ;;
  *)
    echo "usage: bash scripts/install.sh [--runtime [SRC] | --wheel DIR]" >&2
    exit 2 ;;
esac
