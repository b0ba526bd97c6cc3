"""Llama 4 at its released sizes without a weight in memory: Scout's and Maverick's text
configs, a Maverick-sized EAGLE-3 head, Scout's vision config, and the model's parameters and
the engine's step as abstract arrays with their real shardings. The dry run (``--dry-run``)
plans memory with them; the deviceless GPU compile check (``tests/support/compile_cases.py``)
compiles them."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxllm.aot.target import abstract

H, K, D, PAGE, CHUNK = 40, 8, 128, 16, 8192  # Scout and Maverick attention
BF16 = jnp.bfloat16


def scout_config(num_layers: int = 4) -> Any:
    """Llama 4 Scout's text config with ``num_layers`` layers (RoPE/chunked and NoPE ones)."""
    from jaxllm.config import Llama4Config

    return Llama4Config.from_hf({
        "model_type": "llama4_text", "vocab_size": 202048, "hidden_size": 5120,
        "num_hidden_layers": num_layers, "num_attention_heads": H, "num_key_value_heads": K,
        "head_dim": D, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
        "num_local_experts": 16, "num_experts_per_tok": 1, "interleave_moe_layer_step": 1,
        "attention_chunk_size": CHUNK, "rope_theta": 500000.0, "use_qk_norm": True,
        "rope_scaling": {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 1.0, "original_max_position_embeddings": 8192},
        "max_position_embeddings": 10485760, "rms_norm_eps": 1e-5,
    })


def abstract_params(config: Any, dtype: Any, mesh: Any, quant: Any = None) -> tuple[Any, Any]:
    """(graphdef, parameters as ``ShapeDtypeStruct``s with their shardings on ``mesh``):
    the model's structure (quantized by ``quant``, a ``QuantConfig``) without allocating a
    weight."""
    from flax import nnx

    from jaxllm.model.llama4 import Llama4
    from jaxllm.sharding import param_shardings

    graphdef, state = nnx.split(nnx.eval_shape(
        lambda: Llama4(config, dtype=dtype, rngs=nnx.Rngs(0), mesh=mesh, quant=quant)))
    # One array per parameter Variable, in the same order as its sharding.
    leaves, treedef = jax.tree.flatten(state)
    shardings = jax.tree.leaves(param_shardings(state, mesh))
    return graphdef, treedef.unflatten([jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
                                        for a, s in zip(leaves, shardings, strict=True)])


def abstract_step(graphdef: Any, params: Any, config: Any, cache: Any, mesh: Any, rows: int,
                  slots: int, width: int, attention_impl: str = "pallas",
                  image_dtype: Any = None, num_speculative: int = 0,
                  drafter: Any = None) -> tuple[Any, tuple]:
    """The engine's step (``jaxllm.engine.step.step_function``, Pallas attention unless
    ``attention_impl`` says otherwise) and abstract arguments for a step of ``rows`` rows and
    ``slots`` sequences (``image_dtype``: the variant that brings image features of that
    dtype, for a model with a vision tower; ``num_speculative``: the verifying step of that
    many drafts a sequence; ``drafter``: an ``EagleDrafter`` drafting them in the step, its
    slab after the target's and its parameters the last argument)."""
    from jaxllm.engine.step import step_function, step_spec
    from jaxllm.kv_cache import kv_cache_sharding
    from jaxllm.sample.penalties import PenaltyState, state_sharding
    from jaxllm.sample.sampling import mask_words
    from jaxllm.sharding import padded_vocab_size

    groups = cache.groups(config)
    page = jax.ShapeDtypeStruct(cache.page_shape(config), cache.dtype,
                                sharding=kv_cache_sharding(config, cache, mesh))
    vocab = padded_vocab_size(config.vocab_size, mesh)
    words = 0
    if image_dtype is not None:
        from jaxllm.multimodal.feeder import feature_words

        words = feature_words(config.hidden_size, image_dtype)
    spec = step_spec(rows, slots, groups.num_groups, width, mask_words(vocab),
                     num_speculative=num_speculative, feature_words=words,
                     images=image_dtype is not None)
    inputs = jax.tree.map(lambda a: abstract(mesh, a.shape, a.dtype), spec)
    # The penalty state: a slot per sequence of the widest step, split over the vocabulary.
    shape = (slots, vocab)
    penalties = PenaltyState(*(jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
                               for dtype, sharding in zip((jnp.int32, jnp.bool_),
                                                          state_sharding(*shape, mesh),
                                                          strict=True)))
    step = step_function(graphdef, attention_impl, mesh, groups,
                         speculative=num_speculative > 0, drafter=drafter)
    slabs = [(page, page)] * groups.num_slabs
    head = ()
    if drafter is not None:
        head_page = jax.ShapeDtypeStruct(drafter.page_shape(cache.num_pages), drafter.cache_dtype,
                                         sharding=drafter.cache_sharding(cache.num_pages))
        slabs, head = [*slabs, (head_page, head_page)], (drafter.params,)
    return step, (params, slabs, penalties, abstract(mesh, (slots,), jnp.int32), inputs,
                  *head)


def maverick_config(num_layers: int = 4) -> Any:
    """Llama 4 Maverick's text config with ``num_layers`` layers (dense and MoE alternating)."""
    scout = scout_config(num_layers)
    return dataclasses.replace(
        scout, num_experts=128, moe_layers=tuple(range(1, num_layers, 2)), rope_scaling=None,
        use_qk_norm=False)


def maverick_head_config() -> Any:
    """A Maverick-sized EAGLE-3 head: hidden 5120, 40 q / 8 kv heads, ffn 16384, the full
    202,048-token vocabulary (it has its own embedding)."""
    from jaxllm.model.eagle3 import Eagle3Config

    return Eagle3Config(hidden_size=5120, num_heads=H, num_kv_heads=K, head_dim=D,
                        intermediate_size=16384, vocab_size=202048, draft_vocab_size=202048,
                        target_hidden_size=5120, rms_norm_eps=1e-5, rope_theta=500000.0,
                        rope_scaling=None)


def abstract_head(mesh: Any) -> tuple[Any, Any, Any]:
    """(graphdef, parameters as ``ShapeDtypeStruct``s with their shardings, the shardings)
    of ``maverick_head_config()``'s head in bf16 on ``mesh``."""
    from flax import nnx

    from jaxllm.model.eagle3 import Eagle3Head
    from jaxllm.sharding import param_shardings

    graphdef, state = nnx.split(nnx.eval_shape(lambda: Eagle3Head(
        maverick_head_config(), dtype=BF16, rngs=nnx.Rngs(0), has_embedding=True, mesh=mesh)))
    leaves, treedef = jax.tree.flatten(state)
    shardings = param_shardings(state, mesh)
    params = treedef.unflatten([jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
                                for a, s in zip(leaves, jax.tree.leaves(shardings),
                                                strict=True)])
    return graphdef, params, shardings


def abstract_drafter(mesh: Any, k: int, aux_layers: tuple[int, ...]) -> Any:
    """An ``EagleDrafter`` of the abstract Maverick-sized head (nothing allocated)."""
    from jaxllm.engine.spec_decode.eagle import EagleDrafter

    graphdef, params, shardings = abstract_head(mesh)
    return EagleDrafter("abstract", maverick_head_config(), graphdef, params, shardings,
                        aux_layers, k, PAGE, BF16, mesh, True)


# The released Scout / Maverick vision_config (336-pixel tiles of 24 x 24 patches, 144
# features per tile after the pixel shuffle, projected into the 5120-wide text model).
SCOUT_VISION = dict(hidden_size=1408, num_hidden_layers=34, num_attention_heads=16,
                    intermediate_size=5632, image_size=336, patch_size=14,
                    pixel_shuffle_ratio=0.5, projector_input_dim=4096,
                    projector_output_dim=4096, vision_output_dim=4096, rope_theta=10000.0)


