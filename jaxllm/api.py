"""``load_model`` and the ``Model`` handle that research code and the engine hold."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxllm import checkpoint
from jaxllm.attention import check_attention_impl
from jaxllm.batch import check_token_ids, full_sequence_batch
from jaxllm.buckets import BucketPolicy
from jaxllm.config import Llama4Config
from jaxllm.generate import generate, generate_tokens, pack_inputs
from jaxllm.model import Llama4, init_kv_cache
from jaxllm.sampling import GREEDY, SamplingParams
from jaxllm.sharding import named_sharding

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class Model:
    """A loaded Llama 4: config, parameters (an ``nnx.State``) and the compiled forward."""

    def __init__(
        self,
        config: Llama4Config,
        graphdef: nnx.GraphDef,
        params: nnx.State,
        *,
        dtype: Any,
        max_model_len: int | None = None,
        mesh: Mesh | None = None,
        attention_impl: str | None = None,
        page_size: int = 16,
        max_num_seqs: int = 8,
        eos_token_ids: tuple[int, ...] | None = None,
        path: Path | None = None,
    ):
        self.config = config
        self.graphdef = graphdef
        self.params = params
        self.dtype = dtype
        self.max_model_len = max_model_len or config.max_position_embeddings
        if self.max_model_len <= 0:
            raise ValueError(f"max_model_len={self.max_model_len} must be positive")
        self.mesh = mesh
        self.attention_impl = check_attention_impl(attention_impl)
        self.page_size = page_size
        self.path = path
        self.eos_token_ids = config.eos_token_ids if eos_token_ids is None else eos_token_ids
        self.bucket_policy = BucketPolicy(
            max_model_len=self.max_model_len, page_size=page_size,
            chunk_size=config.attention_chunk_size, max_num_seqs=max_num_seqs)
        self.param_shardings = param_shardings(params, mesh)
        self._logits_fns: dict[tuple[int, int], Any] = {}
        self._generate_fn = None

    def generate(self, prompts, *, max_new_tokens: int, sampling: SamplingParams | None = None,
                 stop_token_ids=None) -> list[list[int]]:
        """See ``jaxllm.generate``."""
        return generate(self, prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                        stop_token_ids=stop_token_ids)

    def run_generate(self, prompts, max_new_tokens, stops, sampling, seed):
        """One bucketed batch through the compiled generation program (host arrays out)."""
        policy = self.bucket_policy
        batch = policy.batch_bucket(len(prompts))
        length = policy.length_bucket(max(len(p) for p in prompts))
        inputs = pack_inputs(prompts, batch, length, max_new_tokens, stops, sampling, seed)
        out, count = self._generate()(self.params, *inputs)
        return _to_host(out), _to_host(count)

    def _generate(self):
        if self._generate_fn is None:
            fn = functools.partial(
                generate_tokens, self.graphdef,
                max_new_tokens=max(1, self.max_model_len - 1), max_model_len=self.max_model_len,
                page_size=self.page_size, attention_impl=self.attention_impl)
            rep = self.replicated()
            self._generate_fn = jax.jit(fn, in_shardings=(self.param_shardings,) + (rep,) * 6,
                                        out_shardings=rep)
        return self._generate_fn

    def warmup(self, progress: bool = True) -> int:
        """Compiles generation for every (batch, prompt length) bucket; returns how many.

        Afterwards no ``generate()`` call within ``max_num_seqs`` and ``max_model_len``
        compiles anything.
        """
        from tqdm import tqdm

        policy = self.bucket_policy
        shapes = [(b, n) for b in policy.batch_buckets for n in policy.length_buckets]
        for batch, length in tqdm(shapes, desc="warmup", unit="program", disable=not progress):
            # The longest prompt a bucket holds; max_model_len itself leaves no room to generate.
            prompts = [np.zeros(min(length, self.max_model_len - 1), np.int32)] * batch
            self.run_generate(prompts, 1, list(self.eos_token_ids), GREEDY, 0)
        return len(shapes)

    def module(self) -> Llama4:
        return nnx.merge(self.graphdef, self.params)

    def replicated(self) -> jax.sharding.Sharding:
        if self.mesh is None:
            return jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return NamedSharding(self.mesh, PartitionSpec())

    def logits(self, token_ids: Any) -> np.ndarray:
        """Float32 logits ``[B, T, V]`` for token ids ``[B, T]`` at positions ``0..T-1``."""
        ids = check_token_ids(token_ids, self.config.vocab_size)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"token_ids must be [batch, length] with length >= 1, got {ids.shape}")
        batch, length = ids.shape
        self.bucket_policy.check_length(length)
        data = 1 if self.mesh is None else int(self.mesh.shape["data"])
        positions, meta, num_pages = full_sequence_batch(
            [length] * batch, self.page_size, row_multiple=data)
        tokens = np.zeros(len(positions), np.int32)
        tokens[: batch * length] = ids.reshape(-1)
        out = self._logits_fn(len(tokens), num_pages)(self.params, tokens, positions, meta)
        out = _to_host(out)[: batch * length, : self.config.vocab_size]
        return out.reshape(batch, length, -1)

    def _logits_fn(self, num_rows: int, num_pages: int):
        key = (num_rows, num_pages)
        if key not in self._logits_fns:
            self._logits_fns[key] = self._compile_logits(num_rows, num_pages)
        return self._logits_fns[key]

    def _compile_logits(self, num_rows: int, num_pages: int):
        graphdef, impl, page_size, mesh = self.graphdef, self.attention_impl, self.page_size, \
            self.mesh

        def full_logits(params, tokens, positions, meta):
            model = nnx.merge(graphdef, params)
            cache = init_kv_cache(model.config, num_pages, page_size, model.embed.dtype, mesh)
            hidden, _ = model(tokens, positions, cache, meta, attention_impl=impl)
            return model.logits(hidden)

        rep = self.replicated()
        padded_vocab = self.params["embed"].shape[0]
        logits_sharding = named_sharding(("tokens", "vocab"), (num_rows, padded_vocab), mesh)
        return jax.jit(full_logits, in_shardings=(self.param_shardings, rep, rep, rep),
                       out_shardings=logits_sharding)


def _to_host(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def param_shardings(params: nnx.State, mesh: Mesh | None) -> nnx.State:
    """The sharding of every parameter, from its declared logical axes (a prefix tree)."""
    return jax.tree.map(
        lambda v: named_sharding(v.get_metadata()["logical_axes"], v.shape, mesh), params,
        is_leaf=lambda v: isinstance(v, nnx.Variable))


def abstract_model(
    config: Llama4Config, dtype: Any, mesh: Mesh | None = None
) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's structure and parameter shapes, without allocating any weights."""
    abstract = nnx.eval_shape(lambda: Llama4(config, dtype=dtype, rngs=nnx.Rngs(0), mesh=mesh))
    return nnx.split(abstract)


def load_model(
    path: str | Path,
    *,
    dtype: str | Any | None = None,
    max_model_len: int | None = None,
    mesh: Mesh | None = None,
    attention_impl: str | None = None,
    page_size: int = 16,
    max_num_seqs: int = 8,
) -> Model:
    """Loads a checkpoint written by ``scripts/convert_hf_to_orbax.py``.

    ``dtype`` defaults to the checkpoint's own. Each parameter is restored straight into its
    sharding on ``mesh`` (a single device without one): every device reads only its shard.
    """
    path = Path(path)
    manifest = checkpoint.read_manifest(path)
    config = Llama4Config.from_hf(path)
    dtype = _DTYPES[manifest["dtype"]] if dtype is None else _resolve_dtype(dtype)
    graphdef, state = abstract_model(config, dtype, mesh)
    shardings: dict[tuple[str, ...], jax.sharding.Sharding] = {}
    stored_shapes: dict[tuple[str, ...], tuple[int, ...]] = {}
    for key_path, var in nnx.to_flat_state(state):
        key = tuple(str(k) for k in key_path)
        axes = var.get_metadata()["logical_axes"]
        shardings[key] = named_sharding(axes, var.shape, mesh)
        # The vocabulary may be padded for the mesh; the checkpoint holds the real size.
        stored_shapes[key] = tuple(config.vocab_size if a == "vocab" else n
                                   for a, n in zip(axes, var.shape, strict=True))
    restored = checkpoint.restore_params(
        path, nnx.to_pure_dict(state), lambda p, leaf: shardings[p], stored_shapes)
    nnx.replace_by_pure_dict(state, restored)
    return Model(config, graphdef, state, dtype=dtype, max_model_len=max_model_len, mesh=mesh,
                 attention_impl=attention_impl, page_size=page_size, max_num_seqs=max_num_seqs,
                 eos_token_ids=_eos_token_ids(path), path=path)


def _eos_token_ids(path: Path) -> tuple[int, ...] | None:
    """EOS ids from ``generation_config.json`` (int or list), if the checkpoint has one."""
    gen = path / "generation_config.json"
    if not gen.is_file():
        return None
    eos = json.loads(gen.read_text()).get("eos_token_id")
    if eos is None:
        return None
    return tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))


def _resolve_dtype(dtype: Any) -> Any:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r}: expected one of {sorted(_DTYPES)}")
        return _DTYPES[dtype]
    return jnp.dtype(dtype).type
