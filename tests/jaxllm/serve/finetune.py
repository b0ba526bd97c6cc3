"""Teaches the bundled model a few exact answers (a tool call, say) in seconds, so tests can
see what the server makes of a model-produced answer. The answers are learnt after the very
prompt the server builds for the conversation (chat template, tool instructions and all)."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxllm
from jaxllm.kv_cache import CacheConfig, init_kv_cache
from jaxllm.layout import SeqPiece, build_step, contiguous_num_pages, contiguous_pages, pages_for
from jaxllm.serve.tokenizer import TextCodec
from jaxllm.weights import checkpoint

PAGE = 16


def finetune(base: Path, out: Path, examples: Sequence[tuple[str, str]], *, steps: int = 120,
             lr: float = 3e-3) -> None:
    """Trains ``base`` (a float32 jaxllm checkpoint) to answer each ``(prompt text, answer)``
    with the answer and EOS; writes the result to ``out`` (tokenizer files from ``base``)."""
    codec = TextCodec.from_dir(base)
    model = jaxllm.load_model(base, dtype="float32")
    config = model.config
    rows = []
    for prompt, answer in examples:
        ids = codec.encode(prompt, add_special_tokens=False)
        rows.append((ids + codec.encode(answer, add_special_tokens=False) + [2], len(ids)))
    length = max(len(ids) for ids, _ in rows)
    batch = len(rows)
    tokens = np.zeros((batch, length), np.int32)
    mask = np.zeros((batch, length), np.float32)
    for i, (ids, start) in enumerate(rows):
        tokens[i, : len(ids)] = ids
        mask[i, start: len(ids)] = 1.0  # learn the answer and the EOS after it
    width = pages_for(length, PAGE)
    cache = CacheConfig(page_size=PAGE, dtype=jnp.float32,
                        num_pages=contiguous_num_pages(1, batch, width))
    chunks = [SeqPiece([contiguous_pages(0, b, batch, width)], 0, [0] * length)
              for b in range(batch)]
    meta = jax.tree.map(jnp.asarray, build_step(chunks, cache, width=width,
                                                num_rows=batch * length, num_slots=batch).meta)
    graphdef, params = model.graphdef, model.params
    optimizer = optax.adam(lr)
    opt_state = optimizer.init(params)

    def loss_fn(params):
        module = nnx.merge(graphdef, params)
        hidden, _ = module(jnp.asarray(tokens).reshape(-1), init_kv_cache(config, cache), meta,
                           attention_impl="reference")  # differentiable
        logits = module.logits(hidden).reshape(batch, length, -1)[:, :-1]
        logits = jnp.where(jnp.isfinite(logits), logits, -1e9)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1)[..., 0]
        return jnp.sum(nll * mask[:, 1:]) / jnp.sum(mask[:, 1:])

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state)
    if not float(loss) < 0.05:
        raise RuntimeError(f"the fine-tune did not learn its answers (loss {float(loss):.3f})")
    with checkpoint.atomic_directory(out) as tmp:
        shapes = checkpoint.save_params(tmp, nnx.to_pure_dict(params))
        for name in ("config.json", "generation_config.json", "tokenizer.json",
                     "tokenizer_config.json"):
            shutil.copy2(base / name, tmp / name)
        checkpoint.write_manifest(tmp, "float32", shapes)
