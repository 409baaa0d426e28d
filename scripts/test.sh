#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: unit tests, then the real pipeline.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh" --dev
cd "$root"
exec "$root/.venv/bin/python" -m pytest tests "$@"
