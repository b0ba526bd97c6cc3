"""jaxllm: a JAX/XLA inference and serving engine for Llama 4."""

from jaxllm.api import Model, load_model
from jaxllm.config import Llama4Config

__all__ = ["Llama4Config", "Model", "load_model"]
__version__ = "0.1.0"
