"""The serving engine: continuous batching over a paged KV cache with prefix caching.

Layers with one job each: ``pages`` owns the KV pages, ``scheduler`` decides what runs in a
step, ``runner`` executes a step, ``engine`` ties requests to them.
"""

from jaxllm.engine.engine import Engine, RequestOutput
from jaxllm.engine.faults import RecoveryFailed, StepFailed
from jaxllm.engine.pages import PageAllocator
from jaxllm.engine.scheduler import Request, Scheduler

__all__ = ["Engine", "PageAllocator", "RecoveryFailed", "Request", "RequestOutput",
           "Scheduler", "StepFailed"]
