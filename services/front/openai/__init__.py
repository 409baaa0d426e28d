"""PromptService's OpenAI-compatible API, after vLLM's server: api_router.py (the routes),
serving.py, serving_chat.py and serving_completion.py (the handlers), protocol.py (the models),
parsing.py (tool calls and reasoning) and logprobs.py (docs/architecture.md, "The OpenAI API").
"""
