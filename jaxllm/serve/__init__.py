"""The OpenAI-compatible server over the engine (``python -m jaxllm.serve``)."""
