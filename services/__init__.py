"""A two-tier LLM serving pipeline on BentoML and vLLM (docs/architecture.md).

`front/` is PromptService, the CPU tier (HTTP API, templates, tokenization, detokenization,
routing); `gpu/` is LLMService, the GPU tier (one vLLM engine, token ids in and out). The modules
here are shared by both: the contract (`protocol`), settings, security, errors. Nothing here
imports a tier.
"""
