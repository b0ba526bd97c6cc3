"""Sizing the KV cache from a memory budget (vLLM's flags), and the start-up report.

The pool gets what is left of the budget after the weights, the sampler's penalty state
(``jaxllm.sample.penalties``: ``max_num_seqs`` x vocabulary, fixed) and the largest step's temporary
memory (read from the compiled step, not guessed); a page costs ``CacheConfig.bytes_per_page``.
A sequence of L tokens needs ``pages_for(L)`` pages in each global layer group and, in each
chunked group, at most the pages one chunk plus one step can span.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxllm.buckets import BucketPolicy
from jaxllm.config import Llama4Config
from jaxllm.kv_cache import LayerGroups
from jaxllm.layout import pages_for
from jaxllm.model.quant import dtype_bits
from jaxllm.runtime.handle import Model
from jaxllm.sample.penalties import state_bytes_per_device
from jaxllm.sharding import padded_vocab_size

GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default share of a GPU
CPU_MEMORY_UTILIZATION = 0.3  # of the machine's RAM (shared by every simulated device)


def pages_for_sequence(policy: BucketPolicy, groups: LayerGroups, length: int) -> int:
    """Pages one sequence of ``length`` tokens can hold at once, over every layer group."""
    full = pages_for(length, policy.page_size)
    total = 0
    for chunk in groups.group_chunk:
        if chunk is None:
            total += full
        else:  # the current chunk and one step past it, and a page of straddle
            window = pages_for(chunk + policy.max_num_batched_tokens, policy.page_size) + 1
            total += min(full, window)
    return total


def longest_fitting_length(policy: BucketPolicy, groups: LayerGroups, num_pages: int) -> int:
    """The largest L with ``pages_for_sequence(L) <= num_pages`` (0 if none)."""
    lo, hi = 0, policy.max_model_len
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if pages_for_sequence(policy, groups, mid) <= num_pages:
            lo = mid
        else:
            hi = mid - 1
    return lo


def device_memory_bytes() -> int:
    """Memory of one local device: the GPU's limit, or a CPU device's share of the RAM."""
    device = jax.local_devices()[0]
    stats = device.memory_stats() if device.platform == "gpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // jax.local_device_count()


def _leaf_bytes(leaf: Any) -> int:
    """Bytes of one device's shard of ``leaf`` (int4 packed two per byte)."""
    shape = leaf.sharding.shard_shape(leaf.shape)
    return -(-math.prod(shape) * dtype_bits(leaf.dtype) // 8)


def weights_bytes_per_device(params: Any) -> int:
    """Bytes of parameters on the first device (its shard of every weight, quantized weights
    and their scales as stored); ``params`` may be arrays or ``ShapeDtypeStruct``s with
    shardings (a deviceless plan)."""
    return sum(_leaf_bytes(leaf) for leaf in jax.tree.leaves(params))


WEIGHT_GROUPS = ("embed", "attention", "router", "routed experts", "shared expert", "dense ffn",
                 "norms", "lm_head", "vision")
_SCHEME_OF_DTYPE = {"float8_e4m3fn": "fp8", "int8": "int8", "int4": "int4"}


def _weight_group(path: tuple[str, ...], ndim: int) -> str:
    """The group of weight ``path`` (a quantized weight's path without ``q`` / ``scale``)."""
    if path[0] in ("embed", "lm_head", "vision"):
        return path[0]
    if "attn" in path:
        return "attention"
    if "router" in path:
        return "router"
    if "shared" in path:
        return "shared expert"
    if "ffn" in path and path[-1] != "weight":
        return "routed experts" if ndim == 3 else "dense ffn"
    return "norms"


def weight_groups(params: Any) -> dict[str, tuple[str, int]]:
    """Per parameter group (``WEIGHT_GROUPS``) of an ``nnx.State`` (arrays or
    ``ShapeDtypeStruct``s): its scheme (``fp8``, ``int8``, ``int4`` or the dtype name) and its
    bytes per device, a quantized weight's scales included."""
    from flax import nnx

    flat = {tuple(str(k) for k in key): leaf.get_value()
            for key, leaf in nnx.to_flat_state(params)}
    schemes: dict[str, set[str]] = {}
    sizes: dict[str, int] = {}
    for path, value in flat.items():
        weight, ndim = path, len(value.shape)
        if path[-1] in ("q", "scale") and path[:-1] + ("q",) in flat:
            weight, ndim = path[:-1], len(flat[path[:-1] + ("q",)].shape)
        group = _weight_group(weight, ndim)
        sizes[group] = sizes.get(group, 0) + _leaf_bytes(value)
        if path[-1] != "scale":
            name = jnp.dtype(value.dtype).name
            schemes.setdefault(group, set()).add(_SCHEME_OF_DTYPE.get(name, name))
    return {g: ("+".join(sorted(schemes[g])), sizes[g]) for g in WEIGHT_GROUPS if g in sizes}


@dataclasses.dataclass(frozen=True)
class KVPlan:
    """How big the KV cache is, and why (the numbers of the start-up report)."""

    num_pages: int
    page_bytes: int
    source: str  # "--num-kv-pages", "--kv-cache-memory-bytes" or "--gpu-memory-utilization"
    device_bytes: int | None = None
    utilization: float | None = None
    weights_bytes: int | None = None
    step_temp_bytes: int | None = None
    penalty_bytes: int | None = None
    # Images: the encoder's temporaries and output at its widest tile bucket, and the step's
    # image features (``image_encoder_bytes``); 0 without a vision tower.
    encoder_bytes: int | None = None

    @property
    def kv_bytes(self) -> int:
        return self.num_pages * self.page_bytes


def plan_kv_cache(
    config: Llama4Config,
    policy: BucketPolicy,
    *,
    mesh: Mesh | None = None,
    num_pages: int | None = None,
    kv_cache_memory_bytes: int | None = None,
    gpu_memory_utilization: float | None = None,
    on_gpu: bool,
    device_bytes: Callable[[], int],
    weights_bytes: Callable[[], int],
    step_temp_bytes: Callable[[], int],
    penalty_bytes: int = 0,
    encoder_bytes: Callable[[], int] | None = None,
    extra_page_bytes: int = 0,
    extra_weights_bytes: int = 0,
) -> KVPlan:
    """Pages for the KV cache: ``num_pages`` if given, else what ``kv_cache_memory_bytes``
    holds, else the device's ``gpu_memory_utilization`` share less the weights, the penalty
    state (``penalty_bytes``), the step's temporary memory (``step_temp_bytes()``,
    measured on the compiled step) and, with a vision tower, the encoder's
    (``encoder_bytes()``, measured on the compiled encoder, and the step's features). An
    EAGLE-3 head adds ``extra_page_bytes`` to every page (its KV slab) and
    ``extra_weights_bytes`` to the weights. Raises
    ValueError, naming both numbers and the longest max_model_len that fits, when one
    sequence of ``max_model_len`` does not fit. Bytes are per device of ``mesh``."""
    groups = policy.cache.groups(config)
    page_bytes = policy.cache.bytes_per_page(config, mesh) + extra_page_bytes
    need = pages_for_sequence(policy, groups, policy.max_model_len)
    if num_pages is not None:
        plan = KVPlan(num_pages, page_bytes, "--num-kv-pages")
    elif kv_cache_memory_bytes is not None:
        plan = KVPlan(kv_cache_memory_bytes // page_bytes, page_bytes, "--kv-cache-memory-bytes")
    else:
        default = GPU_MEMORY_UTILIZATION if on_gpu else CPU_MEMORY_UTILIZATION
        utilization = default if gpu_memory_utilization is None else gpu_memory_utilization
        if not 0 < utilization <= 1:
            raise ValueError(f"gpu_memory_utilization={utilization} must be in (0, 1]")
        device, temp = device_bytes(), step_temp_bytes()
        weights = weights_bytes() + extra_weights_bytes
        encoder = encoder_bytes() if encoder_bytes is not None else 0
        pages = max(0, int(device * utilization) - weights - penalty_bytes - temp
                    - encoder) // page_bytes
        if not on_gpu:  # RAM is shared: never take more than max_num_seqs sequences can use
            pages = min(pages, policy.max_num_seqs * need)
        plan = KVPlan(pages, page_bytes, "--gpu-memory-utilization", device, utilization,
                      weights, temp, penalty_bytes, encoder)
    if plan.device_bytes is not None and plan.kv_bytes == 0:
        raise ValueError(
            f"nothing is left for the KV cache: {plan.utilization} x {plan.device_bytes} "
            f"bytes of device memory less {plan.weights_bytes} bytes of weights, "
            f"{plan.penalty_bytes} bytes of penalty state, {plan.step_temp_bytes} bytes of "
            f"step temporaries and {plan.encoder_bytes or 0} bytes of image encoder per "
            f"device; use more devices (--tensor-parallel-size), a smaller --dtype or "
            f"--max-num-batched-tokens")
    if plan.num_pages < need:
        fits = longest_fitting_length(policy, groups, plan.num_pages)
        raise ValueError(
            f"the KV cache ({plan.source}) holds {plan.num_pages} pages = {plan.kv_bytes} "
            f"bytes; one sequence of max_model_len={policy.max_model_len} needs {need} pages "
            f"= {need * page_bytes} bytes. The longest max_model_len that fits is {fits}: "
            f"lower --max-model-len or give the cache more memory.")
    return plan


def plan_for_model(model: Model, policy: BucketPolicy, step_temp_bytes: Callable[[], int],
                   encoder_bytes: Callable[[], int] | None = None, **flags) -> KVPlan:
    """``plan_kv_cache`` for a loaded model on this machine's devices."""
    return plan_kv_cache(model.config, policy, mesh=model.mesh, encoder_bytes=encoder_bytes,
                         on_gpu=jax.default_backend() == "gpu",
                         device_bytes=device_memory_bytes,
                         weights_bytes=lambda: weights_bytes_per_device(model.params),
                         step_temp_bytes=step_temp_bytes,
                         penalty_bytes=penalty_bytes_per_device(model.config, policy,
                                                                model.mesh), **flags)


def penalty_bytes_per_device(config: Llama4Config, policy: BucketPolicy,
                             mesh: Mesh | None) -> int:
    """The penalty state's bytes per device: a slot per sequence of a step, over the padded
    vocabulary split like the logits."""
    return state_bytes_per_device(policy.max_num_seqs,
                                  padded_vocab_size(config.vocab_size, mesh), mesh)


def _gib(size: int) -> str:
    return f"{size / 2**30:.3f} GiB" if size >= 2**24 else f"{size / 2**20:.3f} MiB"


def startup_report(config: Llama4Config, policy: BucketPolicy, plan: KVPlan,
                   weights_bytes: int, mesh: Mesh | None = None,
                   params: Any = None) -> list[str]:
    """vLLM-style lines: weights and KV per device (with ``params``, per parameter group and
    its scheme), tokens that fit, maximum concurrency."""
    groups = policy.cache.groups(config)
    gib = 2**30
    per_token_layer = policy.cache.bytes_per_token(config, mesh)
    kinds = {"global": sum(c is None for c in groups.group_chunk),
             "chunked": sum(c is not None for c in groups.group_chunk)}
    slabs = groups.num_slabs
    need = pages_for_sequence(policy, groups, policy.max_model_len)
    tokens = plan.num_pages // groups.num_groups * policy.page_size
    kv_dtype = jnp.dtype(policy.cache.dtype).name
    lines = [
        f"weights: {weights_bytes / gib:.3f} GiB per device",
        *([] if params is None else [
            "weights by group: " + ", ".join(
                f"{group} {scheme} {_gib(size)}"
                for group, (scheme, size) in weight_groups(params).items())]),
        f"KV cache: {plan.num_pages} pages of {policy.page_size} tokens, "
        f"{plan.kv_bytes / gib:.3f} GiB per device, {kv_dtype} (sized by {plan.source}); "
        f"{per_token_layer} bytes per token per layer per device; layer groups: "
        + ", ".join(f"{n} {kind} x {slabs} layers" for kind, n in kinds.items() if n)
        + ("" if policy.cache.hybrid else " (hybrid cache off)"),
        f"KV cache holds {tokens} tokens of every layer; one max_model_len="
        f"{policy.max_model_len} sequence takes {need} pages",
        f"Maximum concurrency for {policy.max_model_len} tokens per request: "
        f"{plan.num_pages / need:.2f}x",
    ]
    if plan.device_bytes is not None:
        lines.append(
            f"budget: {plan.utilization:.2f} x {plan.device_bytes / gib:.2f} GiB device memory"
            f" - {plan.weights_bytes / gib:.3f} GiB weights - {(plan.penalty_bytes or 0) / gib:.3f}"
            f" GiB penalty state - {plan.step_temp_bytes / gib:.3f} GiB step temporaries"
            f" (compiled)" + (f" - {plan.encoder_bytes / gib:.3f} GiB image encoder (compiled"
                              f" temporaries and output, step features)"
                              if plan.encoder_bytes else ""))
    return lines
