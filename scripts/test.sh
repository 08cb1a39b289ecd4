#!/usr/bin/env bash
# Install what the tests need (Xvfb and GL libraries included) and run them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
exec "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider "$@"
