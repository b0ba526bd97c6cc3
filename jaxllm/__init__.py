"""jaxllm: a JAX/XLA inference and serving engine for Llama 4."""

from jaxllm.buckets import BucketPolicy, ContextLengthError
from jaxllm.config import Llama4Config
from jaxllm.kv_cache import CacheConfig
from jaxllm.runtime.generate import generate, generate_tokens, warmup
from jaxllm.runtime.handle import Model
from jaxllm.sample.sampling import SamplingParams
from jaxllm.sharding import make_mesh
from jaxllm.weights.loading import load_model

__all__ = ["BucketPolicy", "CacheConfig", "ContextLengthError", "Llama4Config", "Model",
           "SamplingParams", "generate", "generate_tokens", "load_model", "make_mesh", "warmup"]
__version__ = "0.1.0"
