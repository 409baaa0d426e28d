#!/usr/bin/env bash
# A scripts/gpu_bench.sh run longer than one device call (10 minutes at most): started in its own
# process session, so that it outlives the call that started it, then followed by later calls on
# the same warm machine, each bringing back what is done so far.
#
#   bash scripts/gpu_job.sh start RESULTS_DIR PHASE...   # installs the bundle, starts, then follows
#   bash scripts/gpu_job.sh follow RESULTS_DIR           # waits for the end, or until the call's time is up
#
# `start` expects the bundle's parts in /tmp/b (../shared/gpu/README.md). Both verbs wait until
# RESULTS_DIR/DONE or FOLLOW_S seconds (default 560, under a call's limit), packing RESULTS_DIR into
# $OUT/results.tar.xz every PACK_EVERY_S seconds, so a call cut short still brings back what was
# measured, and end with the progress, the runs measured and the servers' last errors.
set -u
verb=${1:?usage: gpu_job.sh start|follow RESULTS_DIR [PHASE ...]}; R=${2:?RESULTS_DIR}; shift 2
FOLLOW_S=${FOLLOW_S:-560}
PACK_EVERY_S=${PACK_EVERY_S:-30}
OUT=${OUT:-/tmp/out}

pack() { mkdir -p "$OUT" && tar -C "$(dirname "$R")" -cJf "$OUT/results.tar.xz.tmp" "$(basename "$R")" 2>/dev/null \
  && mv "$OUT/results.tar.xz.tmp" "$OUT/results.tar.xz"; }

if [ "$verb" = start ]; then
  # the bundle, maybe followed by a second archive (tar -i reads on past the first's end): router/
  # (vllm-router's wheels, unpacked) and model-src/ (the model's config + tokenizer)
  if [ ! -d /tmp/site/vllm ]; then
    mkdir -p /tmp/site && cat /tmp/b/part_* | xz -d -T0 | tar -xi -C /tmp/site || { echo "the bundle did not unpack"; exit 1; }
  fi
  [ -d /tmp/site/router ] && export ROUTER_PATH=/tmp/site/router
  [ -d .gpu/model-src ] || { [ -d /tmp/site/model-src ] && mkdir -p .gpu && cp -r /tmp/site/model-src .gpu/; }
  mkdir -p "$R"
  # its own session: the device tool ends what a call leaves running, except a new session
  setsid nohup bash scripts/gpu_bench.sh "$R" "$@" >"$R/gpu_bench.out" 2>&1 </dev/null &
  echo "started gpu_bench.sh $* (pid $!)"
elif [ "$verb" != follow ]; then
  echo "unknown verb $verb"; exit 2
fi

deadline=$((SECONDS + FOLLOW_S))
while [ ! -e "$R/DONE" ] && [ $SECONDS -lt $deadline ]; do
  pack
  for _ in $(seq "$PACK_EVERY_S"); do [ -e "$R/DONE" ] && break; sleep 1; done
done
pack
cat "$R/progress.log" 2>/dev/null
grep -h -E '\] (prefix|multiturn|random)-' "$R"/*.log 2>/dev/null | cut -c1-400
grep -h -i -E 'error|traceback' "$R"/*/logs/*.log 2>/dev/null | tail -n 8 | cut -c1-300
[ -e "$R/DONE" ] && echo "DONE" || echo "still running"
