"""A two-tier LLM serving pipeline on BentoML and vLLM.

- `prompt_service.PromptService`: the front door on CPU (HTTP API, templates, tokenization,
  limits, incremental detokenization, stop strings).
- `llm_service.LLMService`: the GPU tier, one vLLM engine, token ids in and out.
- `protocol`: the contract between them.
"""
