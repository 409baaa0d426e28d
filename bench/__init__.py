"""Benchmarks of the pipeline against vLLM's own OpenAI server (see docs/benchmarks.md), and the
process harness they share with the tests and the device scripts.

servers.py starts, waits for and stops every server the project runs (either tier alone, both
under `bentoml serve`, vLLM's own server; tests/integration and scripts/ use it too); loadgen.py
drives one with `vllm bench serve` (in one or several processes) and keeps the per-request
figures; metrics.py turns those into percentiles and throughputs; report.py compares the two
servers (JSON, markdown, plots).
"""
