"""The GPU tier over several replicas (docs/architecture.md, "Routing").

discovery.py finds the replicas (PIPELINE_GPU_TIER_REPLICAS); replica.py is one of them and
replicas.py the set; events.py follows each one's /kv_events into its index.py `BlockIndex`;
policy.py scores the replicas (PIPELINE_ROUTING) and router.py routes a request (one retry before
its first token, LoRA fan-out).
"""
