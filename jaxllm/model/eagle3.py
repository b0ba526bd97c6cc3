"""The EAGLE-3 draft head (Li et al. 2025), read from its published checkpoint layout.

A Llama-style single decoder layer that drafts from the target's own features. Per row:

    fused  = fc(concat(aux_0, aux_1, aux_2))        # [3 D_t] -> [D]: target hidden states
    e      = input_norm(embed(token))                # the token after the fused position
    h, res = hidden_norm(fused), fused               # (res = h with norm_before_residual)
    x      = attn(concat(e, h)) + res                # q/k/v read [2 D]; RoPE rotates halves
    pre    = mlp(post_attn_norm(x)) + x              # the head's next hidden state
    logits = lm_head(norm(pre))                      # over the draft vocabulary

The first draft step takes ``fused``; each later step takes the previous step's ``pre`` in its
place (no fc). Draft id i is target id ``i + d2t[i]`` when the head has a reduced vocabulary.
The auxiliary hidden states follow vLLM's numbering: id i is the residual stream entering
target layer i (so id 0 is the embedding output); the default is ``(2, L // 2, L - 3)``.

Checkpoints: the EAGLE / NVIDIA layout (``midlayer.*``, ``fc``, ``norm``, ``lm_head``, ``d2t``,
``t2d``, sometimes ``embed_tokens``; config ``LlamaForCausalLMEagle3`` with ``eagle_config``) and
the speculators layout (``layers.0.*``; config with ``transformer_layer_config`` and
``speculators_config``). A head without ``embed_tokens`` shares the target's embedding.

Glossary: T flat tokens, D draft model, D_t target model, H q heads, K kv heads, d head dim,
F ffn, V target vocab, V_d draft vocab.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxllm.config import RopeScaling, rope_inverse_frequencies, rope_of
from jaxllm.kv_cache import write_kv_pages
from jaxllm.layout import AttentionMetadata
from jaxllm.model.attention import paged_attention
from jaxllm.model.llama4 import MLP, RMSNorm, embed_lookup
from jaxllm.sharding import constrain, padded_vocab_size

NUM_AUX_LAYERS = 3


@dataclasses.dataclass(frozen=True)
class Eagle3Config:
    """The head's shapes and conventions; ``vocab_size`` is the target's vocabulary."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    draft_vocab_size: int
    target_hidden_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    norm_before_residual: bool = False
    attention_bias: bool = False
    aux_layer_ids: tuple[int, ...] | None = None  # None: vLLM's default for the target
    num_speculative_tokens: int | None = None  # the checkpoint's suggestion, if it has one

    def aux_layers(self, target_num_layers: int) -> tuple[int, ...]:
        """The target layers whose input residual stream the head reads, range-checked."""
        ids = self.aux_layer_ids or (2, target_num_layers // 2, target_num_layers - 3)
        bad = [i for i in ids if not 0 <= i < target_num_layers]
        if bad:
            raise ValueError(f"EAGLE-3 auxiliary layer ids {bad} outside [0, "
                             f"{target_num_layers}) for a {target_num_layers}-layer target")
        return tuple(ids)

    @classmethod
    def from_hf(cls, source: str | Path | Mapping[str, Any]) -> Eagle3Config:
        """From a head's directory, its ``config.json`` or that dict (either layout)."""
        if isinstance(source, Mapping):
            raw = dict(source)
        else:
            path = Path(source)
            raw = json.loads((path / "config.json" if path.is_dir() else path).read_text())
        speculators = raw.get("speculators_model_type")
        if speculators is not None:
            if speculators != "eagle3":
                raise ValueError(f"speculators_model_type={speculators!r}: expected 'eagle3'")
            layer = dict(raw.get("transformer_layer_config") or {})
            methods = (raw.get("speculators_config") or {}).get("proposal_methods") or [{}]
            tokens = methods[0].get("speculative_tokens")
        else:
            layer, tokens = raw, raw.get("num_lookahead_tokens")
        missing = [k for k in ("hidden_size", "num_attention_heads", "intermediate_size",
                               "vocab_size") if layer.get(k) is None]
        if missing:
            raise ValueError(f"EAGLE-3 config is missing {missing}")
        layers = int(layer.get("num_hidden_layers", 1))
        if layers != 1:
            raise ValueError(f"EAGLE-3 num_hidden_layers={layers}: jaxllm reads single-layer "
                             "heads")
        act = layer.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"EAGLE-3 hidden_act={act!r}: expected 'silu'")
        heads = int(layer["num_attention_heads"])
        kv_heads = int(layer.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise ValueError(f"EAGLE-3 num_attention_heads={heads} is not a multiple of "
                             f"num_key_value_heads={kv_heads}")
        hidden = int(layer["hidden_size"])
        theta, scaling = rope_of(layer)
        eagle = raw.get("eagle_config") or {}
        aux = raw.get("eagle_aux_hidden_state_layer_ids") or eagle.get(
            "eagle_aux_hidden_state_layer_ids")
        if aux is not None and len(aux) != NUM_AUX_LAYERS:
            raise ValueError(f"EAGLE-3 eagle_aux_hidden_state_layer_ids={list(aux)}: expected "
                             f"{NUM_AUX_LAYERS} layers")
        if eagle.get("use_aux_hidden_state", True) is False:
            raise ValueError("EAGLE-3 eagle_config.use_aux_hidden_state=false (an EAGLE-1 "
                             "style head) is not supported")
        vocab = int(layer["vocab_size"])

        def top(key):  # EAGLE-3 fields live at the top level, or in the layer config
            return raw.get(key, layer.get(key))

        return cls(
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=int(layer.get("head_dim") or hidden // heads),
            intermediate_size=int(layer["intermediate_size"]),
            vocab_size=vocab,
            draft_vocab_size=int(top("draft_vocab_size") or vocab),
            target_hidden_size=int(top("target_hidden_size") or hidden),
            rms_norm_eps=float(layer.get("rms_norm_eps", 1e-5)),
            rope_theta=theta,
            rope_scaling=scaling,
            norm_before_residual=bool(top("norm_before_residual") or False),
            attention_bias=bool(layer.get("attention_bias", False)),
            aux_layer_ids=None if aux is None else tuple(int(i) for i in aux),
            num_speculative_tokens=None if tokens is None else int(tokens),
        )


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype):
    value = 0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value.astype(dtype), logical_axes=axes)


def apply_rope_halves(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Llama's RoPE on ``x [T, H, d]``: pairs (x_i, x_{i + d/2}) rotate, not interleaved ones."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, d/2]
    cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Eagle3Head(nnx.Module):
    """The draft head: ``combine`` the target's features, then ``__call__`` once per draft."""

    def __init__(self, config: Eagle3Config, *, dtype=jnp.bfloat16, rngs: nnx.Rngs,
                 has_embedding: bool = False, has_vocab_map: bool = False,
                 mesh: Mesh | None = None):
        c = config
        D, H, K, d, F = (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                         c.intermediate_size)
        self.config, self.mesh = config, mesh
        self.draft_vocab = padded_vocab_size(c.draft_vocab_size, mesh)
        self.fc = _param(rngs, (NUM_AUX_LAYERS * c.target_hidden_size, D), (None, "embed"),
                         dtype)
        if has_embedding:
            self.embed = _param(rngs, (padded_vocab_size(c.vocab_size, mesh), D),
                                ("vocab", "embed"), dtype)
        self.input_norm = RMSNorm(D, c.rms_norm_eps, dtype)
        self.hidden_norm = RMSNorm(D, c.rms_norm_eps, dtype)
        self.wq = _param(rngs, (2 * D, H, d), ("embed", "heads", "head_dim"), dtype)
        self.wk = _param(rngs, (2 * D, K, d), ("embed", "kv_heads", "head_dim"), dtype)
        self.wv = _param(rngs, (2 * D, K, d), ("embed", "kv_heads", "head_dim"), dtype)
        self.wo = _param(rngs, (H, d, D), ("heads", "head_dim", "embed"), dtype)
        if c.attention_bias:
            self.bq = nnx.Param(jnp.zeros((H, d), dtype), logical_axes=("heads", "head_dim"))
            self.bk = nnx.Param(jnp.zeros((K, d), dtype), logical_axes=("kv_heads", "head_dim"))
            self.bv = nnx.Param(jnp.zeros((K, d), dtype), logical_axes=("kv_heads", "head_dim"))
        self.post_attn_norm = RMSNorm(D, c.rms_norm_eps, dtype)
        self.mlp = MLP(D, F, dtype, rngs)
        self.norm = RMSNorm(D, c.rms_norm_eps, dtype)
        self.lm_head = _param(rngs, (D, self.draft_vocab), ("embed", "vocab"), dtype)
        if has_vocab_map:  # d2t: target id minus draft id, per draft id
            self.d2t = nnx.Variable(jnp.zeros((self.draft_vocab,), jnp.int32),
                                   logical_axes=(None,))

    def combine(self, aux: jax.Array) -> jax.Array:
        """``[T, 3 D_t]`` (the three auxiliary hidden states, concatenated) -> ``[T, D]``."""
        return jnp.einsum("TA,AD->TD", aux, self.fc[...].astype(aux.dtype))

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """The head's own embedding rows (only for heads that ship ``embed_tokens``)."""
        return embed_lookup(self.embed[...], tokens, self.mesh)

    def __call__(
        self,
        embeds: jax.Array,
        hidden: jax.Array,
        cache: tuple[jax.Array, jax.Array],
        meta: AttentionMetadata,
        *,
        attention_impl: str = "xla",
    ) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array]]:
        """One draft pass over flat rows: ``embeds [T, D]`` of the input tokens, ``hidden
        [T, D]`` (``combine``'s output, or the previous pass's ``pre``), the head's own paged
        cache ``(k_pages, v_pages)`` and one group's metadata (full causal attention).
        Returns (normed [T, D] for ``logits``, pre [T, D] for the next pass, cache)."""
        c = self.config
        e = self.input_norm(embeds)
        if c.norm_before_residual:
            h = self.hidden_norm(hidden)
            residual = h
        else:
            h, residual = self.hidden_norm(hidden), hidden
        x = jnp.concatenate([e, h.astype(e.dtype)], axis=-1)  # [T, 2D]
        q = jnp.einsum("TE,EHd->THd", x, self.wq[...])
        k = jnp.einsum("TE,EKd->TKd", x, self.wk[...])
        v = jnp.einsum("TE,EKd->TKd", x, self.wv[...])
        if c.attention_bias:
            q, k, v = q + self.bq[...], k + self.bk[...], v + self.bv[...]
        # rope_inverse_frequencies reads head_dim, rope_theta and rope_scaling, which this
        # config has under the same names.
        inv_freq = jnp.asarray(rope_inverse_frequencies(c), jnp.float32)
        q = apply_rope_halves(q, meta.positions, inv_freq)
        k = apply_rope_halves(k, meta.positions, inv_freq)
        k_pages, v_pages = write_kv_pages(*cache, k, v, meta.slot_mapping)
        out = paged_attention(q, k_pages, v_pages, meta, chunk_size=None, impl=attention_impl,
                              mesh=self.mesh)
        x = residual.astype(out.dtype) + jnp.einsum("THd,HdD->TD", out, self.wo[...])
        x = constrain(x, ("tokens", "embed"), self.mesh)
        pre = x + self.mlp(self.post_attn_norm(x))
        pre = constrain(pre, ("tokens", "embed"), self.mesh)
        return self.norm(pre), pre, (k_pages, v_pages)

    def logits(self, normed: jax.Array) -> jax.Array:
        """Float32 logits over the draft vocabulary ``[T, V_d]``; padding is -inf."""
        logits = jnp.einsum("TD,DV->TV", normed, self.lm_head[...],
                            preferred_element_type=jnp.float32)
        is_real = jnp.arange(logits.shape[-1]) < self.config.draft_vocab_size
        return constrain(jnp.where(is_real, logits, -jnp.inf), (None, "vocab"), self.mesh)

    def to_target(self, draft_ids: jax.Array) -> jax.Array:
        """Target vocabulary ids of draft ids (the identity without a vocabulary map)."""
        if not hasattr(self, "d2t"):
            return draft_ids
        return draft_ids + self.d2t[...][draft_ids]

    def target_logits(self, normed: jax.Array, target_vocab: int) -> jax.Array:
        """Draft logits placed at their target ids ``[T, target_vocab]``, -inf elsewhere: the
        draft's distribution q over the target vocabulary, for verification."""
        logits = self.logits(normed)[:, : self.config.draft_vocab_size]
        ids = self.to_target(jnp.arange(self.config.draft_vocab_size))
        out = jnp.full((logits.shape[0], target_vocab), -jnp.inf, jnp.float32)
        return out.at[:, ids].set(logits)
