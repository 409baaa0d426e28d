#!/usr/bin/env bash
# The GPU benchmarks (issue 5) and the tensor-parallel run (issue 6) in one go, on a lent GPU
# machine: the pipeline and vLLM's own OpenAI server, measured one after the other, with the same
# model, engine settings and client (scripts/bench.py). With two GPUs each server gets its own
# (both start together; start-up takes minutes); with one they take turns on it. Then the pipeline
# with tensor_parallel_size=2 over two GPUs (eager mode, see below). Dummy weights of the
# Llama-2-7B and SmolLM2-135M shapes.
#
#   bash scripts/gpu_bench.sh RESULTS_DIR [PHASE ...]
#   (phases: llama7b smol tp2 costs, and clients pinned2 pinned4 features unit, issue 23's
#   startup_smol startup_llama7b ttft1 repeats, and issue 22's routing routing_tight; default the
#   first four)
#
# Expects vLLM 0.26.0 + BentoML on PYTHONPATH (the bundle, ../shared/gpu/README.md), and the model's
# config + tokenizer in .gpu/model-src (`scripts/gpu_tp_check.py prepare`, carried), from which it
# makes the dummy-weights folders in $MODELS (default /tmp/models) when they are missing. Each phase writes
# RESULTS_DIR/<phase>/ (meta.json, runs/*.json, logs/); RESULTS_DIR/progress.log says where it is.
set -u
R=${1:?usage: gpu_bench.sh RESULTS_DIR [PHASE ...]}; shift
phases=${*:-llama7b smol tp2 costs}
MODELS=${MODELS:-/tmp/models}
# With two GPUs the two servers start together, each on its own GPU (bench.py run --devices), and
# are measured one at a time; with one GPU (DEVICES="") each starts, is measured and stops in turn.
gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | wc -l)
DEVICES=${DEVICES-$([ "$gpus" -ge 2 ] && echo "0 1")}
CLIENT_TARGETS=${CLIENT_TARGETS:-pipeline-ec4 vllm-api8 pipeline-ec2}
PINNED2_TARGETS=${PINNED2_TARGETS:-pipeline-ec1 vllm-api1 vllm-api2}
PINNED4_TARGETS=${PINNED4_TARGETS:-pipeline-ec2 vllm-api2 vllm-api4}
LLAMA_TARGETS=${LLAMA_TARGETS:-pipeline vllm}
STARTUP_TARGETS=${STARTUP_TARGETS:-pipeline-ec8 vllm-api8}
STARTUP_PLAN=${STARTUP_PLAN:-cold warm warm}
TTFT_TARGETS=${TTFT_TARGETS:-pipeline-ec8 vllm-api8}
ROUNDS=${ROUNDS:-3}
CACHES=${CACHES:-/tmp/caches}  # compile caches, kept between phases (and calls, on a warm machine)
PINNED_CONCURRENCY=${PINNED_CONCURRENCY:-64 256}
# issue 22: two replicas of each kind on GPU 0 (7B shape: 512 KiB of KV a token, so the 16 prefixes
# of 2,048 tokens take 16 GiB; ROUTING_KV_BYTES is the peer table's size, ROUTING_TIGHT_KV_BYTES one
# under which a replica holds half the prefixes and its share of the work, and round-robin thrashes)
ROUTING_SYSTEMS=${ROUTING_SYSTEMS:-pipeline-kv pipeline-rr pipeline-kv-2fronts router-cache_aware router-round_robin}
ROUTING_WORKLOADS=${ROUTING_WORKLOADS:-prefix:32 prefix:64 multiturn:16 random:64}
ROUTING_TIGHT_SYSTEMS=${ROUTING_TIGHT_SYSTEMS:-pipeline-kv pipeline-rr router-cache_aware router-round_robin}
ROUTING_TIGHT_WORKLOADS=${ROUTING_TIGHT_WORKLOADS:-prefix:32 multiturn:16}
ROUTING_REPLICAS=${ROUTING_REPLICAS:-2}
ROUTING_KV_BYTES=${ROUTING_KV_BYTES:-$((16 << 30))}
ROUTING_TIGHT_KV_BYTES=${ROUTING_TIGHT_KV_BYTES:-$((11 << 30))}
# both kinds' replicas (four 7B-shape engines) up at once where the GPU holds them (an H200), else one
# kind after the other (an H100); ROUTING_SIDE_BY_SIDE= or --side-by-side to choose
gpu_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
ROUTING_SIDE_BY_SIDE=${ROUTING_SIDE_BY_SIDE-$([ "${gpu_mib:-0}" -ge 130000 ] && echo --side-by-side)}
ROUTER_PATH=${ROUTER_PATH:-/tmp/router}  # vllm-router 0.1.17, orjson, setproctitle (../shared/gpu/README.md)
# SHARE_GPU=1: a phase's servers start together on GPU 0, each with a set KV cache (SMOL_KV_BYTES,
# LLAMA_KV_BYTES: no start-up memory profile, which the others' allocations would upset), then are
# measured one at a time as before; one start-up's wait per phase instead of one per server.
# vLLM still checks SHARE_UTIL x the GPU's memory against what is free when each starts.
SHARE_GPU=${SHARE_GPU:-}
SHARE_UTIL=${SHARE_UTIL:-0.12}
SMOL_KV_BYTES=${SMOL_KV_BYTES:-$((12 << 30))}   # c=256 x 768 tokens needs ~4.5 GiB on this shape
LLAMA_KV_BYTES=${LLAMA_KV_BYTES:-$((26 << 30))} # c=64 x ~780 tokens needs ~24.4 GiB (3 servers: ~126 GiB in all)
side_by_side() {  # KV_BYTES TARGET...: the bench.py arguments that start the targets together on GPU 0
  local kv=$1; shift
  [ -n "$SHARE_GPU" ] || return 0
  echo "--devices $(printf '0 %.0s' "$@")--gpu-memory-utilization $SHARE_UTIL --kv-cache-memory-bytes $kv"
}
EXTRA=${BENCH_EXTRA:-}  # appended to every run (a CPU dry run: "--cpu --concurrency 1 --output-len 8 ...")
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$(pwd)${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
# NVLink multicast stays off (the lent machines' rule: it can take a shared host's GPUs down).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# nothing outside the machine can be reached: no hub look-ups, no usage reports
export HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 BENTOML_DO_NOT_TRACK=true
mkdir -p "$R"
[ -d "$MODELS/smol" ] && [ -d "$MODELS/llama7b" ] || python3 scripts/gpu_tp_check.py models --dest "$MODELS" || exit 1
log() { echo "$(date -u +%T) $*" | tee -a "$R/progress.log"; }
# Stopped (a device call's time limit: `timeout` signals this script only): pass it on to the
# phase's bench.py, which stops its servers; a server left running keeps the GPU's memory from the
# next call.
stop() { trap '' TERM INT; log "stopped by a signal"; kill -TERM 0 2>/dev/null; wait; exit 143; }
trap stop TERM INT
nvidia-smi >"$R/nvidia-smi.txt" 2>&1; lscpu >"$R/lscpu.txt" 2>&1
nvidia-smi dmon -s u -d 2 >"$R/gpu-util.txt" 2>&1 &
dmon=$!
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
common=(--load-format dummy --max-model-len 4096 --input-len 512 --output-len 256 --prompt-workers 8 --label "$card")
# py-spy (carried as a wheel) on the GPU host's processes during every level: where their CPU goes
command -v py-spy >/dev/null && common+=(--py-spy)
for phase in $phases; do
  log "phase $phase starts"
  case $phase in
    # The pipeline first (on GPU 0 with two GPUs; run 2 had it on GPU 1: DEVICES="1 0").
    llama7b) python3 scripts/bench.py run --targets $LLAMA_TARGETS ${DEVICES:+--devices $DEVICES} $(side_by_side $LLAMA_KV_BYTES $LLAMA_TARGETS) \
               --model "$MODELS/llama7b" --served-name llama7b "${common[@]}" --concurrency ${LLAMA_CONCURRENCY:-1 4 16 64} --min-prompts 10 \
               --out "$R/llama7b" $EXTRA ;;
    smol)    python3 scripts/bench.py run --targets pipeline vllm ${DEVICES:+--devices $DEVICES} --model "$MODELS/smol" --served-name smol \
               "${common[@]}" --concurrency 1 4 16 64 256 --min-prompts 32 --prompts-per-concurrency 4 --warmup-concurrency 256 --out "$R/smol" $EXTRA ;;
    # (issue 6's check of tensor parallelism itself, per-tier start and GPU shares: scripts/gpu_tp_check.py)
    # eager, and vLLM's symmetric-memory all-reduce off: no compile pass that fuses GEMMs with
    # collectives through symmetric memory, so nothing can reach for multicast
    tp2)     CUDA_VISIBLE_DEVICES=0,1 VLLM_ALLREDUCE_USE_SYMM_MEM=0 python3 scripts/bench.py run --enforce-eager --model "$MODELS/llama7b" --served-name llama7b \
               "${common[@]}" --tensor-parallel-size 2 --targets pipeline --concurrency 1 16 64 --out "$R/tp2" $EXTRA ;;
    # issue 13: LLMService over N engine-client processes against `vllm serve --api-server-count N`
    clients) python3 scripts/bench.py run --targets $CLIENT_TARGETS $(side_by_side $SMOL_KV_BYTES $CLIENT_TARGETS) --model "$MODELS/smol" --served-name smol \
               "${common[@]}" --concurrency 64 256 --min-prompts 32 --prompts-per-concurrency 4 --warmup-concurrency 256 --out "$R/clients" $EXTRA ;;
    # the GPU host held to 2 then 4 CPUs (all of vLLM's server; the pipeline's LLMService and engine),
    # the load generators and PromptService on the others
    pinned2) python3 scripts/bench.py run --targets $PINNED2_TARGETS $(side_by_side $SMOL_KV_BYTES $PINNED2_TARGETS) --pin-gpu-host 0-1 --pin-rest 2-$(($(nproc) - 1)) \
               --model "$MODELS/smol" --served-name smol "${common[@]}" --concurrency $PINNED_CONCURRENCY --min-prompts 32 \
               --prompts-per-concurrency 4 --warmup-concurrency 256 --rounds $ROUNDS --cache-root "$CACHES/smol" --out "$R/pinned2" $EXTRA ;;
    pinned4) python3 scripts/bench.py run --targets $PINNED4_TARGETS $(side_by_side $SMOL_KV_BYTES $PINNED4_TARGETS) --pin-gpu-host 0-3 --pin-rest 4-$(($(nproc) - 1)) \
               --model "$MODELS/smol" --served-name smol "${common[@]}" --concurrency 64 256 --min-prompts 32 \
               --prompts-per-concurrency 4 --warmup-concurrency 256 --out "$R/pinned4" $EXTRA ;;
    # issue 23: a new replica's start, LLMService alone against `vllm serve`, from a cold and a warm
    # compile cache (each server's caches in $CACHES/<shape>/<target>, outside the results)
    startup_smol|startup_llama7b)
             shape=${phase#startup_}
             python3 scripts/startup_bench.py --model "$MODELS/$shape" --served-name $shape --load-format dummy \
               --targets $STARTUP_TARGETS --plan $STARTUP_PLAN --first $([ $shape = smol ] && echo 0 || echo 1) \
               --caches "$CACHES/$shape" --out "$R/$phase" $EXTRA ;;
    # issue 23: the first token at c=1 on the 7B shape, rounds alternating, py-spy on both EngineCores;
    # the servers' caches are the startup phase's (warm if it ran)
    ttft1)   python3 scripts/bench.py run --targets $TTFT_TARGETS $(side_by_side $LLAMA_KV_BYTES $TTFT_TARGETS) \
               --model "$MODELS/llama7b" --served-name llama7b "${common[@]}" --concurrency 1 --min-prompts 10 \
               --rounds $ROUNDS --cache-root "$CACHES/llama7b" --out "$R/ttft1" $EXTRA ;;
    # issue 23: the clients phase (c=64 and c=256) as $ROUNDS alternating rounds per server
    repeats) python3 scripts/bench.py run --targets $CLIENT_TARGETS $(side_by_side $SMOL_KV_BYTES $CLIENT_TARGETS) --model "$MODELS/smol" --served-name smol \
               "${common[@]}" --concurrency 64 256 --min-prompts 32 --prompts-per-concurrency 4 --warmup-concurrency 256 \
               --rounds $ROUNDS --cache-root "$CACHES/smol" --out "$R/repeats" $EXTRA ;;
    # issue 22: the pipeline's routing against vllm-router on the same engines and workloads, on GPU 0
    # (both kinds' replicas at once, or one kind after the other: ROUTING_SIDE_BY_SIDE above)
    routing|routing_tight)
             if [ $phase = routing ]; then kv=$ROUTING_KV_BYTES systems=$ROUTING_SYSTEMS workloads=$ROUTING_WORKLOADS
             else kv=$ROUTING_TIGHT_KV_BYTES systems=$ROUTING_TIGHT_SYSTEMS workloads=$ROUTING_TIGHT_WORKLOADS; fi
             python3 scripts/routing_bench.py run --model "$MODELS/llama7b" --served-name llama7b --load-format dummy \
               --max-model-len 4096 --replicas $ROUTING_REPLICAS $ROUTING_SIDE_BY_SIDE \
               --gpu-memory-utilization $SHARE_UTIL --kv-cache-memory-bytes $kv --systems $systems \
               --workloads $workloads --rounds $ROUNDS --router-path "$ROUTER_PATH" \
               --cache-root "$CACHES/routing" --label "$card" --out "$R/$phase" $EXTRA ;;
    # structured outputs, tool calling and several engine clients on this vLLM, through both tiers
    features) python3 scripts/gpu_feature_check.py --model "$MODELS/smol" --out "$R/features/features.json" ;;
    # the unit tests (vLLM's parsers, structured-output checks and messages) on this vLLM
    unit)    PIPELINE_MODEL="$MODELS/smol" python3 -m pytest -q -p no:cacheprovider --junitxml "$R/unit/junit.xml" \
               tests/unit/test_structured_outputs.py tests/unit/gpu/test_sampling_parity.py tests/unit/front/test_openai_protocol.py \
               tests/unit/gpu/test_engine_clients.py tests/unit/front/test_request_life.py ;;
    # the CPU tier's own costs per core on this (quiet) machine's processor
    costs)   python3 scripts/bench_pipeline_costs.py --model "$MODELS/smol" --out "$R/costs/pipeline-costs.json" ;;
    *) log "unknown phase $phase" ;;
  esac > "$R/$phase.log" 2>&1 &
  wait $!  # in the background, so that a signal reaches stop() at once
  log "phase $phase ends, rc $?: $(grep -c ' ok, ' "$R/$phase.log") load levels measured"
done
kill $dmon 2>/dev/null
log "all done"
touch "$R/DONE"
