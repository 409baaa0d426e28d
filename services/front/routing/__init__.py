"""The GPU tier over several replicas (docs/architecture.md, "Routing"):

    discovery.py  where the replicas are (PIPELINE_GPU_TIER_REPLICAS)
    replicas.py   the replica set: each replica's client, readiness, model info, load
    events.py     each replica's /kv_events stream into its index
    index.py      which KV blocks a replica holds (engine events, predictions, routing history)
    policy.py     the scorers and policies (PIPELINE_ROUTING)
    router.py     one request's route, retry before its first token, LoRA fan-out
"""
