#!/usr/bin/env bash
# The one install step shared by the README, CI and the Dockerfile.
#   bash scripts/install.sh            # editable install with test extras (development, CI)
#   bash scripts/install.sh --system   # regular install (container image)
# Versions are pinned by constraints.txt so every machine gets the same packages.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --upgrade --quiet pip
if [ "${1:-}" = "--system" ]; then
  python -m pip install --no-cache-dir -c constraints.txt ".[test]"
else
  python -m pip install -c constraints.txt -e ".[test]"
fi
