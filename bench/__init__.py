"""Benchmarks of the pipeline against vLLM's own OpenAI server (see docs/benchmarks.md).

servers.py starts and stops either server; loadgen.py drives one with `vllm bench serve` (in one or
several processes) and keeps the per-request figures; metrics.py turns those into percentiles and
throughputs; report.py compares the two servers (JSON, markdown, plots).
"""
