"""The serving engine: continuous batching over a paged KV cache with prefix caching.

Layers with one job each: ``request`` admits a request and takes its tokens, ``pages`` owns
the KV pages, ``scheduler`` decides what runs in a step, ``batch`` holds the running
sequences' rows of the step's arrays, ``step`` is the compiled step's contract, ``runner``
executes a step, ``executor`` runs it on every process, ``engine`` ties them together.
"""

from jaxllm.engine.engine import Engine, RequestOutput
from jaxllm.engine.faults import RecoveryFailed, StepFailed
from jaxllm.engine.pages import PageAllocator
from jaxllm.engine.request import Request
from jaxllm.engine.scheduler import Scheduler

__all__ = ["Engine", "PageAllocator", "RecoveryFailed", "Request", "RequestOutput",
           "Scheduler", "StepFailed"]
