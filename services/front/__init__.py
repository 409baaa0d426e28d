"""The front tier, PromptService (CPU machines): the HTTP API, all text work, and the client of
the GPU tier. Imports the shared layer (`services.*`), never `services.gpu` except
prompt_service.py's `bentoml.depends(LLMService)`."""
