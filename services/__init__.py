"""A two-tier LLM serving pipeline on BentoML and vLLM.

- `front/`: PromptService, the front door on CPU (HTTP API, templates, tokenization, limits,
  incremental detokenization, stop strings) and all it alone runs.
- `gpu/`: LLMService, the GPU tier: one vLLM engine, token ids in and out, its engine-client
  processes and LoRA adapters.
- here, shared by both tiers: `protocol` (the contract between them), `config`, `security`,
  `connection`, `errors`, `model_store`, `lora_modules`. Nothing here imports a tier.
"""
