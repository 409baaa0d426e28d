"""The GPU tier, LLMService (beside the engine): the vLLM engine, its engine-client processes and
LoRA adapters; token ids in and out. Imports the shared layer (`services.*`), never
`services.front`."""
