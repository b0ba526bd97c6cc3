"""A HF-style EAGLE-3 checkpoint (the speculators layout or EAGLE's own) read into the head's
parameters (``jaxllm.model.eagle3.Eagle3Head``), every tensor's presence and shape checked."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxllm.model.eagle3 import NUM_AUX_LAYERS, Eagle3Config, Eagle3Head
from jaxllm.weights.safetensors import ConversionError, SafetensorsSource


def _linear_in(*out_shape: int):
    """HF Linear weight [out, in] -> [in, *out_shape]."""
    return lambda w: w.T.reshape(w.shape[1], *out_shape)


def _plan(c: Eagle3Config) -> dict[str, tuple[tuple[int, ...], tuple[str, ...], Any]]:
    """HF name (in the speculators spelling) -> (its shape, our parameter path, transform)."""
    D, H, K, d, F = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    ident = np.asarray
    a = "layers.0.self_attn."
    plan = {
        "fc.weight": ((D, NUM_AUX_LAYERS * c.target_hidden_size), ("fc",), np.transpose),
        "layers.0.input_layernorm.weight": ((D,), ("input_norm", "weight"), ident),
        "layers.0.hidden_norm.weight": ((D,), ("hidden_norm", "weight"), ident),
        a + "q_proj.weight": ((H * d, 2 * D), ("wq",), _linear_in(H, d)),
        a + "k_proj.weight": ((K * d, 2 * D), ("wk",), _linear_in(K, d)),
        a + "v_proj.weight": ((K * d, 2 * D), ("wv",), _linear_in(K, d)),
        a + "o_proj.weight": ((D, H * d), ("wo",), lambda w: w.T.reshape(H, d, D)),
        "layers.0.post_attention_layernorm.weight": ((D,), ("post_attn_norm", "weight"), ident),
        "layers.0.mlp.gate_proj.weight": ((F, D), ("mlp", "gate"), np.transpose),
        "layers.0.mlp.up_proj.weight": ((F, D), ("mlp", "up"), np.transpose),
        "layers.0.mlp.down_proj.weight": ((D, F), ("mlp", "down"), np.transpose),
        "norm.weight": ((D,), ("norm", "weight"), ident),
        "lm_head.weight": ((c.draft_vocab_size, D), ("lm_head",), np.transpose),
    }
    if c.attention_bias:
        plan[a + "q_proj.bias"] = ((H * d,), ("bq",), lambda b: b.reshape(H, d))
        plan[a + "k_proj.bias"] = ((K * d,), ("bk",), lambda b: b.reshape(K, d))
        plan[a + "v_proj.bias"] = ((K * d,), ("bv",), lambda b: b.reshape(K, d))
    return plan


def _canonical(name: str) -> str:
    """One spelling for the layouts' names: no ``model.`` prefix, ``midlayer.`` = layer 0."""
    name = name.removeprefix("model.")
    return "layers.0." + name[len("midlayer."):] if name.startswith("midlayer.") else name


def read_eagle3(hf_dir: str | Path) -> tuple[Eagle3Config, dict[tuple[str, ...], np.ndarray]]:
    """Reads a head's ``config.json`` and safetensors into (config, {parameter path: array}),
    checking every tensor's presence and shape. Unused tensors (``t2d``) are ignored."""
    hf_dir = Path(hf_dir)
    config = Eagle3Config.from_hf(hf_dir)
    source = SafetensorsSource(hf_dir)
    names = {}
    for name in source.location:
        canon = _canonical(name)
        if canon in names:
            raise ConversionError(f"{hf_dir}: {names[canon]} and {name} are the same tensor")
        names[canon] = name
    params: dict[tuple[str, ...], np.ndarray] = {}
    extra = {"embed_tokens.weight": ((config.vocab_size, config.hidden_size), ("embed",),
                                     np.asarray)}
    plan = _plan(config)
    missing = sorted(set(plan) - set(names))
    if missing:
        raise ConversionError(f"{hf_dir} has no EAGLE-3 tensor(s) {missing}")
    for canon, (shape, path, fn) in {**plan, **extra}.items():
        if canon not in names:
            continue
        array = source.read(names[canon])
        if tuple(array.shape) != shape:
            raise ConversionError(f"{hf_dir}: {names[canon]} has shape {tuple(array.shape)}, "
                                  f"the config implies {shape}")
        params[path] = fn(array)
    if "d2t" in names:
        d2t = source.read(names["d2t"]).astype(np.int64)
        if d2t.shape != (config.draft_vocab_size,):
            raise ConversionError(f"{hf_dir}: d2t has shape {d2t.shape}, expected "
                                  f"({config.draft_vocab_size},)")
        target = np.arange(config.draft_vocab_size) + d2t
        if target.min() < 0 or target.max() >= config.vocab_size:
            raise ConversionError(f"{hf_dir}: d2t maps draft ids to [{target.min()}, "
                                  f"{target.max()}], outside the vocabulary of "
                                  f"{config.vocab_size}")
        params[("d2t",)] = d2t.astype(np.int32)
    return config, params


def load_eagle3(hf_dir: str | Path, *, dtype=jnp.bfloat16, mesh: Mesh | None = None
                ) -> Eagle3Head:
    """The head of a HF-style EAGLE-3 checkpoint, its vocabularies padded for ``mesh``."""
    config, params = read_eagle3(hf_dir)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Eagle3Head(
        config, dtype=dtype, rngs=nnx.Rngs(0), has_embedding=("embed",) in params,
        has_vocab_map=("d2t",) in params, mesh=mesh)))
    pure = nnx.to_pure_dict(state)
    for path, value in params.items():
        *parents, last = path
        node = functools.reduce(lambda tree, key: tree[key], parents, pure)
        want = node[last]
        pad = [(0, n - m) for n, m in zip(want.shape, value.shape, strict=True)]
        node[last] = jnp.asarray(np.pad(value, pad), dtype=want.dtype)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)
