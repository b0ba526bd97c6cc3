"""Plan a deployment for a GPU that is not here: ``python -m jaxllm.serve --dry-run``.

From a checkpoint directory (``config.json`` is enough) and the serving flags, this builds the
model's parameters as abstract arrays sharded over a mesh of compile-only GPUs, compiles the
widest serving step for them (the XLA GPU pipeline and ``ptxas``, no device needed), and
sizes the KV cache exactly as a real start would: the target's memory times
``gpu_memory_utilization``, less the weights and the compiled step's temporaries.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

from jaxllm.buckets import BucketPolicy
from jaxllm.config import Llama4Config
from jaxllm.engine.memory import (
    pages_for_sequence,
    penalty_bytes_per_device,
    plan_kv_cache,
    startup_report,
    weights_bytes_per_device,
)


def target_memory_bytes(target: str) -> int:
    """Device memory of ``target`` from its XLA GpuTargetConfig (``device_memory_size``)."""
    from jaxllm.aot.target import TARGETS

    found = re.search(r"device_memory_size:\s*(\d+)", TARGETS[target].read_text())
    if not found:
        raise ValueError(f"the {target} target config gives no device_memory_size")
    return int(found.group(1))


def dry_run(args: argparse.Namespace) -> list[str]:
    """The start-up report of ``python -m jaxllm.serve`` for ``args.target`` GPUs."""
    import jax.numpy as jnp

    from jaxllm.aot.abstract import abstract_params, abstract_step
    from jaxllm.aot.target import TARGETS, abstract, compile_for, gpu_mesh
    from jaxllm.sharding import MESH_AXES
    from jaxllm.weights.loading import resolve_dtype

    if args.target not in TARGETS:
        raise ValueError(f"--target {args.target}: expected one of {sorted(TARGETS)}")
    from jaxllm.model.quant import QuantConfig
    from jaxllm.weights.loading import kv_cache_dtype_of

    config = Llama4Config.from_hf(Path(args.model))
    dtype = resolve_dtype(args.dtype or "bfloat16")
    quant = QuantConfig.from_flags(args.quantization, args.quantization_scope)
    devices = args.tensor_parallel_size
    policy = BucketPolicy.for_model(
        config, dtype=kv_cache_dtype_of(args.kv_cache_dtype, dtype),
        max_model_len=args.max_model_len, page_size=args.block_size,
        hybrid=not args.disable_hybrid_kv_cache_manager, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, on_gpu=True)
    mesh = gpu_mesh(devices, MESH_AXES, (1, 1, devices), target=args.target)
    graphdef, params = abstract_params(config, dtype, mesh, quant)
    weights = weights_bytes_per_device(params)
    vision = config.vision

    # Speculation (``--speculative-config``): the widest verifying step's temporaries, and an
    # EAGLE-3 head's weights and its KV in every page.
    num_speculative, drafter, head_bytes, head_line = 0, None, {}, []
    if args.speculative_config is not None:
        from jaxllm.engine.spec_decode.config import SpeculativeConfig
        from jaxllm.engine.spec_decode.eagle import abstract_drafter

        spec = SpeculativeConfig.from_json(args.speculative_config)
        num_speculative = spec.num_speculative_tokens
        if spec.method == "eagle3":
            drafter = abstract_drafter(spec.model, config.num_layers, dtype, policy.cache.dtype,
                                       policy.page_size, mesh, num_speculative)
            head_weights, page_bytes = drafter.weights_bytes(), drafter.bytes_per_page()
            head_bytes = dict(extra_weights_bytes=head_weights, extra_page_bytes=page_bytes)
            head_line = [f"EAGLE-3 head {spec.model}: {head_weights / 2**20:.3f} MiB per "
                         f"device, {page_bytes} bytes per page for its KV cache (counted "
                         "above, with its drafting in the step's temporaries)"]

    def step_temp_bytes() -> int:
        """The widest step's temporaries (the plain and, when speculating, the verifying
        step's), as ``jaxllm.engine.runner.step_temp_bytes``."""
        groups = policy.cache.groups(config)
        cache = policy.cache.with_pages(pages_for_sequence(policy, groups, policy.max_model_len))
        temps = []
        for k in sorted({0, num_speculative}):
            step, step_args = abstract_step(graphdef, params, config, cache, mesh,
                                            policy.token_buckets[-1], policy.batch_buckets[-1],
                                            policy.pages_per_seq,
                                            image_dtype=dtype if vision is not None else None,
                                            num_speculative=k, drafter=drafter)
            with tempfile.TemporaryDirectory() as dump:
                compiled = compile_for(step, mesh, *step_args, dump_dir=dump,
                                       donate_argnums=(1, 2, 3))
            temps.append(int(compiled.memory_analysis().temp_size_in_bytes))
        return max(temps)

    def encoder_bytes() -> int:
        """The encoder at the tile bucket of one largest image (16 tiles + the global one)
        and the widest step's image features, as ``jaxllm.engine.runner.encoder_bytes``."""
        from flax import nnx

        from jaxllm.multimodal.feeder import MAX_IMAGE_TILES, feature_words

        bucket = 1 << (MAX_IMAGE_TILES - 1).bit_length()

        def encode(params, pixels):
            return nnx.merge(graphdef, params).vision(pixels)

        pixels = abstract(mesh, (bucket, vision.num_channels, vision.image_size,
                                 vision.image_size), jnp.float32)
        with tempfile.TemporaryDirectory() as dump:
            memory = compile_for(encode, mesh, params, pixels, dump_dir=dump).memory_analysis()
        features = policy.token_buckets[-1] * 4 * feature_words(config.hidden_size, dtype)
        return int(memory.temp_size_in_bytes + memory.output_size_in_bytes + features)

    plan = plan_kv_cache(
        config, policy, mesh=mesh, num_pages=args.num_kv_pages,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        gpu_memory_utilization=args.gpu_memory_utilization, on_gpu=True,
        device_bytes=lambda: target_memory_bytes(args.target), weights_bytes=lambda: weights,
        step_temp_bytes=step_temp_bytes,
        penalty_bytes=penalty_bytes_per_device(config, policy, mesh),
        encoder_bytes=encoder_bytes if vision is not None else None, **head_bytes)
    scheme = "" if quant is None else f", {quant.describe()} for {'+'.join(quant.targets)}"
    head = (f"dry run: {config.num_layers} layers, {config.num_experts} experts, vocab "
            f"{config.vocab_size}, {jnp.dtype(dtype).name}{scheme}"
            f", on {devices} x {args.target} "
            f"(compile-only), max_model_len {policy.max_model_len}, "
            f"max_num_batched_tokens {policy.max_num_batched_tokens}, "
            f"max_num_seqs {policy.max_num_seqs}; {len(policy.step_shapes())} step programs")
    return [head, *startup_report(config, policy, plan, weights, mesh, params=params),
            *head_line]
