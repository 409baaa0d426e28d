#!/usr/bin/env bash
# Set up (idempotent) and serve the pipeline with the default model on http://localhost:${PORT:-3000}.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
cd "$root"
exec "$root/.venv/bin/bentoml" serve services.front.prompt_service:PromptService --port "${PORT:-3000}" "$@"
