"""Drafting k tokens with an EAGLE-3 head inside the compiled step (top-1 drafts).

After the target has run a step's rows (and verification has decided what each sequence
keeps), the head runs once over the same rows, each row pairing the target's features at its
position with the token emitted after it (vLLM's shift by one): the head's row at position p
predicts the token at p + 2. The last valid row of each sequence gives the first draft; each
of the other k - 1 drafts is one decode row per sequence, fed the previous draft and the
head's own hidden state ``pre``. Drafts are argmaxes, so the proposal is a point mass and
verification takes ``draft_probs=None`` (``jaxllm.sample.verify``).

The head's KV cache is its own slab, addressed by its own block tables with the target's slot
rule (``jaxllm.layout.slot_of``); rows that verification rejected write nothing.

Glossary: T flat rows, S sequence slots, k drafts, W block-table width.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxllm.kv_cache import FP8_KV, KV_CACHE_AXES
from jaxllm.layout import AttentionMetadata, slot_of
from jaxllm.model.eagle3 import Eagle3Config, Eagle3Head
from jaxllm.model.llama4 import embed_lookup
from jaxllm.sample.sampling import greedy
from jaxllm.sharding import named_sharding, param_shardings
from jaxllm.weights.eagle3 import load_eagle3

if TYPE_CHECKING:
    from jaxllm.runtime.handle import Model


def draft(
    head: Eagle3Head,
    embed: Callable[[jax.Array], jax.Array],
    cache: tuple[jax.Array, jax.Array],
    meta: AttentionMetadata,
    tokens: jax.Array,
    features: jax.Array,
    row_valid: jax.Array,
    last_row: jax.Array,
    *,
    k: int,
    page_size: int,
    attention_impl: str = "xla",
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Drafts ``[S, k]`` (target vocabulary ids) and the head's updated cache.

    ``meta``: the rows' metadata in the head's own group (one group: ``slot_mapping [T]``,
    ``block_tables [S, W]``). ``tokens [T]``: for each row, the token at its position + 1
    (the accepted draft or the verified token); ``features [T, 3 D_t]``: the target's
    auxiliary hidden states at each row (``Llama4.forward(aux_layers=...)``);
    ``row_valid [T]``: rows whose token was kept (others write no KV); ``last_row [S]``: each
    sequence's last valid row. ``embed`` maps token ids to the head's input embeddings (the
    target's, unless the head has its own). Sequence slots past ``meta.num_seqs`` draft
    garbage and write nothing.
    """
    meta = meta._replace(slot_mapping=jnp.where(row_valid, meta.slot_mapping, -1))
    normed, pre, cache = head(embed(tokens), head.combine(features), cache, meta,
                              attention_impl=attention_impl)
    first = _pick(head, normed[last_row])
    width = meta.block_tables.shape[-1]
    active = jnp.arange(last_row.shape[0]) < meta.num_seqs

    def step(carry, i):
        token, hidden, cache = carry
        # Clipped into the block table: a sequence at its limit drafts garbage the host drops.
        pos = jnp.clip(meta.positions[last_row] + i, 0, width * page_size - 1)
        slots = slot_of(meta.block_tables, pos[:, None], page_size)[:, 0]
        row_meta = AttentionMetadata(
            positions=pos.astype(jnp.int32),
            slot_mapping=jnp.where(active, slots, -1).astype(jnp.int32),
            block_tables=meta.block_tables,
            seq_lens=(pos + 1).astype(jnp.int32),
            query_start_loc=jnp.arange(last_row.shape[0] + 1, dtype=jnp.int32),
            num_seqs=meta.num_seqs,
        )
        normed, pre, cache = head(embed(token), hidden, cache, row_meta,
                                  attention_impl=attention_impl)
        nxt = _pick(head, normed)
        return (nxt, pre, cache), nxt

    (_, _, cache), rest = jax.lax.scan(step, (first, pre[last_row], cache),
                                       jnp.arange(1, k))
    return jnp.concatenate([first[:, None], rest.T], axis=1).astype(jnp.int32), cache


def _pick(head: Eagle3Head, normed: jax.Array) -> jax.Array:
    """The head's most likely next token, in target vocabulary ids (argmax per vocabulary
    shard on a mesh, as the sampler's greedy pick)."""
    return head.to_target(greedy(head.logits(normed), head.mesh))


def head_rows(meta: AttentionMetadata, tokens: jax.Array, after: jax.Array,
              last_row: jax.Array) -> tuple[jax.Array, jax.Array]:
    """What the head reads at each of a step's rows: the token after it (the next row's
    token, or ``after [S]`` at its slot's last kept row ``last_row [S]``) and whether the row
    is kept (rows past ``last_row``: rejected drafts; and padding rows write no KV)."""
    rows = jnp.arange(tokens.shape[0])
    starts = meta.query_start_loc
    slot = jnp.clip(jnp.searchsorted(starts[1:], rows, side="right"), 0, last_row.shape[0] - 1)
    end = last_row[slot]
    following = jnp.where(rows == end, after[slot], jnp.roll(tokens, -1))
    return following, (rows < starts[meta.num_seqs]) & (rows <= end)


@dataclasses.dataclass(frozen=True, eq=False)
class EagleDrafter:
    """An EAGLE-3 head bound to its target, for the engine's step.

    Its KV cache is one more slab of the target's page pool: page id i of the global layer
    group (group 0) also holds the head's keys and values of the positions it holds, so the
    head's cache grows, is shared through the prefix cache, dropped and recomputed with that
    group's pages, at ``bytes_per_page`` more per page. Its position p pairs the target's
    features at p with the token at p + 1 (``head_rows``): a prefix-cache hit ending at a
    page boundary takes the head's last key from a sequence whose next token may differ,
    which changes drafts (never outputs: verification decides those)."""

    path: str
    config: Eagle3Config
    graphdef: nnx.GraphDef
    params: nnx.State
    param_shardings: Any
    aux_layers: tuple[int, ...]
    k: int
    page_size: int
    cache_dtype: Any
    mesh: Mesh | None
    own_embedding: bool

    @classmethod
    def load(cls, path: str, model: Model, k: int) -> EagleDrafter:
        """The head at ``path`` in the target ``model``'s dtype and mesh, checked against
        the target (vocabulary, feature width, auxiliary layers, a global layer group)."""
        target = model.config
        head = load_eagle3(path, dtype=model.dtype, mesh=model.mesh)
        c = head.config
        if c.vocab_size != target.vocab_size:
            raise ValueError(f"the EAGLE-3 head at {path} has vocab_size={c.vocab_size}, the "
                             f"target model has {target.vocab_size}: the head was trained for "
                             "another model (retrain it for this one)")
        if c.target_hidden_size != target.hidden_size:
            raise ValueError(f"the EAGLE-3 head at {path} reads target features of width "
                             f"{c.target_hidden_size}, the target's hidden size is "
                             f"{target.hidden_size}")
        own_embedding = hasattr(head, "embed")
        if not own_embedding and c.hidden_size != target.hidden_size:
            raise ValueError(f"the EAGLE-3 head at {path} has no embed_tokens and hidden size "
                             f"{c.hidden_size}: it cannot share the target's embedding of "
                             f"width {target.hidden_size}")
        groups = model.bucket_policy.cache.groups(target)
        if groups.group_chunk[0] is not None:
            raise ValueError("EAGLE-3 keeps its KV cache in a global layer group's pages, and "
                             "every layer of this model is chunked-local")
        aux = c.aux_layers(target.num_layers)
        if len(set(aux)) != len(aux):
            raise ValueError(f"the EAGLE-3 head at {path} reads target layers {list(aux)}: "
                             "they must be distinct (set eagle_aux_hidden_state_layer_ids "
                             f"for a {target.num_layers}-layer target)")
        graphdef, params = nnx.split(head)
        shardings = param_shardings(params, model.mesh)
        params = jax.device_put(params, shardings)
        cache = model.bucket_policy.cache
        dtype = model.dtype if jnp.dtype(cache.dtype) == FP8_KV else cache.dtype
        return cls(str(path), c, graphdef, params, shardings,
                   aux, k, cache.page_size, dtype, model.mesh,
                   own_embedding)

    def page_shape(self, num_pages: int) -> tuple[int, int, int, int]:
        """``[P, p, K, d]`` of the head's key (or value) slab: the target's pages and the
        null page."""
        c = self.config
        return (num_pages + 1, self.page_size, c.num_kv_heads, c.head_dim)

    def cache_sharding(self, num_pages: int) -> jax.sharding.Sharding:
        return named_sharding(KV_CACHE_AXES, self.page_shape(num_pages), self.mesh)

    def init_cache(self, num_pages: int) -> tuple[jax.Array, jax.Array]:
        """The head's zeroed slab (keys, values)."""
        shape = self.page_shape(num_pages)
        return (jnp.zeros(shape, self.cache_dtype), jnp.zeros(shape, self.cache_dtype))

    def bytes_per_page(self) -> int:
        """Bytes the head adds to each page id, on one device."""
        return head_page_bytes(self.config, self.page_size, self.cache_dtype, self.mesh)

    def weights_bytes(self) -> int:
        """The head's parameters on one device."""
        return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
                   for a in jax.tree.leaves(self.params))

    def describe(self) -> str:
        c = self.config
        return (f"EAGLE-3 head {self.path} (hidden {c.hidden_size}, {c.num_heads} heads, "
                f"vocabulary {c.draft_vocab_size} of {c.vocab_size}, target layers "
                f"{list(self.aux_layers)}): {self.weights_bytes() / 2**20:.3f} MiB, "
                f"{self.bytes_per_page()} bytes per page for its KV cache")

    def run(self, head_params: nnx.State, module: Any, cache: tuple[jax.Array, jax.Array],
            meta: AttentionMetadata, tokens: jax.Array, features: jax.Array,
            after: jax.Array, last_row: jax.Array, *, attention_impl: str
            ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Inside the step: the head over the step's rows (``tokens`` as the target ran them,
        ``features`` its auxiliary hidden states, ``after`` the token after each slot's last
        kept row ``last_row``), in the global group's pages; returns the drafts ``[S, k]``
        for each slot's next step and the head's cache."""
        head = nnx.merge(self.graphdef, head_params)
        if self.own_embedding:
            embed = head.embed_tokens
        else:
            table = module.embed[...]
            embed = lambda ids: embed_lookup(table, ids, self.mesh)  # noqa: E731
        group = meta.for_group(0)
        following, kept = head_rows(group, tokens, after, last_row)
        return draft(head, embed, cache, group, following, features, kept, last_row,
                     k=self.k, page_size=self.page_size, attention_impl=attention_impl)


def head_page_bytes(config: Eagle3Config, page_size: int, cache_dtype: Any,
                    mesh: Mesh | None) -> int:
    """Bytes an EAGLE-3 head's keys and values add to each page id, on one device of
    ``mesh`` (whose ``model`` axis may split its kv heads)."""
    shape = (1, page_size, config.num_kv_heads, config.head_dim)
    heads = named_sharding(KV_CACHE_AXES, shape, mesh).shard_shape(shape)[2]
    return 2 * page_size * heads * config.head_dim * jnp.dtype(cache_dtype).itemsize


def abstract_drafter(path: str, target_num_layers: int, dtype: Any, cache_dtype: Any,
                     page_size: int, mesh: Mesh | None, k: int) -> EagleDrafter:
    """The ``EagleDrafter`` of the head at ``path`` with its parameters abstract
    (``ShapeDtypeStruct``s with their shardings), from its config and tensor names only:
    nothing is read or allocated (``--dry-run``: the head's weights and pages, and the
    verifying step it drafts in, compiled for a device that is not here)."""
    from jaxllm.weights.safetensors import SafetensorsSource

    config = Eagle3Config.from_hf(path)
    names = {name.removeprefix("model.") for name in SafetensorsSource(Path(path)).location}
    own_embedding = "embed_tokens.weight" in names
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Eagle3Head(
        config, dtype=dtype, rngs=nnx.Rngs(0), has_embedding=own_embedding,
        has_vocab_map="d2t" in names, mesh=mesh)))
    shardings = param_shardings(state, mesh)
    leaves, treedef = jax.tree.flatten(state)
    params = treedef.unflatten([jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
                                for a, sharding in zip(leaves, jax.tree.leaves(shardings),
                                                       strict=True)])
    if jnp.dtype(cache_dtype) == FP8_KV:
        cache_dtype = dtype
    return EagleDrafter(str(path), config, graphdef, params, shardings,
                        config.aux_layers(target_num_layers), k, page_size, cache_dtype, mesh,
                        own_embedding)
