#!/usr/bin/env bash
# The long fuzz of the API (schemathesis, from /docs.json): every route, valid and invalid inputs,
# FUZZ_EXAMPLES (default 300) per route and mode, FUZZ_GENERATION_EXAMPLES (150) of valid inputs
# per generation route (each one runs the engine), about 2,500 requests; writes the counts to
# docs/operator/fuzz.json. It starts the real pipeline: on a shared machine, run it under the
# engine lock (flock "${ENGINE_LOCK:-${TMPDIR:-/tmp}/llm-pipeline-engine.lock}" ./scripts/fuzz_api.sh).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
report=${FUZZ_REPORT:-$root/docs/operator/fuzz.json}
FUZZ_EXAMPLES=${FUZZ_EXAMPLES:-300} FUZZ_GENERATION_EXAMPLES=${FUZZ_GENERATION_EXAMPLES:-150} FUZZ_REPORT=$report \
  exec "$root/.venv/bin/python" -m pytest tests/integration/test_fuzz.py -q -p no:cacheprovider -o timeout=3600 "$@"
