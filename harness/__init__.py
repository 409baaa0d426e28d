"""The one process harness: starts, waits for and stops every server the tests, the benchmarks and
the scripts run. process.py: one server's process tree; tiers.py: the pipeline's tiers; engines.py:
vLLM's server and the pipeline on the same engine settings; pinning.py: their processes onto CPUs.

    llm = start_tier("LLMService", log=tmp / "llm.log")
    front = start_tier("PromptService", log=tmp / "prompt.log", depends={"LLMService": llm.url})
    front.stop(); llm.stop()
"""

from harness.engines import EngineSettings, cpu_engine_env, make_server, parse_target, pipeline_command, vllm_command
from harness.pinning import gpu_host_processes, parse_cpus, pin
from harness.process import READY_TIMEOUT_S, ROOT, Server, free_port, poll
from harness.tiers import (
    INTERNAL_TOKEN,
    TIER_DEFAULTS,
    own_bentoml_home,
    serve_command,
    serve_pipeline,
    start_tier,
    tier_command,
    tier_env,
)

__all__ = [
    "INTERNAL_TOKEN", "READY_TIMEOUT_S", "ROOT", "TIER_DEFAULTS", "EngineSettings", "Server", "cpu_engine_env",
    "free_port", "gpu_host_processes", "make_server", "own_bentoml_home", "parse_cpus", "parse_target", "pin",
    "pipeline_command", "poll", "serve_command", "serve_pipeline", "start_tier", "tier_command", "tier_env",
    "vllm_command",
]
