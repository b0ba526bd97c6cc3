"""The programs the deviceless check compiles, and the rules a compile must pass.

Kernels run at Llama 4 attention shapes (Scout and Maverick share them: 40 q / 8 kv heads,
head_dim 128, 16-token pages, bf16) with their default block settings: flash prefill,
ragged prefill and chunked prefill, decode at batch 1 and 64, contexts 8k to 128k; then the
production attention path and the engine step of a Scout-shaped model (a few layers) on one
device and on a ``model=8`` mesh, and the vision encoder at Scout's vision shapes (bf16, the
tile-count buckets of one image and of several). A compile fails the check on a compile
error, on a spill in
a Pallas kernel, or on an all-gather of the KV cache or of q (a ``pallas_call`` that XLA
cannot partition runs on gathered inputs).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxllm.aot.abstract import (
    BF16,
    CHUNK,
    PAGE,
    SCOUT_VISION,
    D,
    H,
    K,
    abstract_drafter,
    abstract_head,
    abstract_params,
    abstract_step,
    maverick_config,
    scout_config,
)
from jaxllm.aot.target import CompileInfo, abstract, compile_for, gpu_mesh, inspect_compile

KERNELS = ("flash_attention", "ragged_paged_attention", "grouped_matmul")
REPLICATED = PartitionSpec()
Build = Callable[[], tuple[Callable, Any, tuple, tuple[int, ...]]]


@dataclasses.dataclass(frozen=True)
class Case:
    """A program to compile: ``build()`` gives (fn, mesh, abstract args, donated arg numbers).

    ``no_gather`` lists full (unsharded) shapes that no all-gather may produce, in any
    layout of the same number of elements. ``no_buffer`` lists (dtype, shape) pairs that no
    instruction of the optimized HLO may produce (its dims in any order: a dequantized copy
    of a quantized weight); the step's temporaries must stay under ``max_temp_bytes``.
    ``known_gap``: why the case is known to fail its checks (work still open): reported with
    its problems, not counted as a failure. ``gathers_like``: the name of a case this one
    adds work to (the verifying step beside the plain step); every all-gather of this one
    larger than ``SMALL_GATHER`` elements must have a shape that one's gathers have too
    (``new_gathers``).
    """

    name: str
    build: Build
    no_gather: tuple[tuple[int, ...], ...] = ()
    no_buffer: tuple[tuple[str, tuple[int, ...]], ...] = ()
    max_temp_bytes: int | None = None
    known_gap: str | None = None
    gathers_like: str | None = None


@dataclasses.dataclass
class Result:
    case: str
    info: CompileInfo | None
    problems: list[str]


def is_pallas_kernel(name: str) -> bool:
    """Entry names are the ``pallas_call`` names; XLA suffixes repeats (``name__1``)."""
    return name.split("__")[0] in KERNELS


def problems_of(info: CompileInfo, no_gather: tuple[tuple[int, ...], ...]) -> list[str]:
    """Why a compile fails the check: Pallas kernels that spill, forbidden all-gathers."""
    found = [f"{k.name} spills ({k.spill_stores} B stores, {k.spill_loads} B loads)"
             for k in info.kernels
             if is_pallas_kernel(k.name) and (k.spill_stores or k.spill_loads)]
    # By element count: XLA may reshape an array (say pages [P, p, K, d] to [P * p, K, d])
    # before it gathers it.
    sizes = {math.prod(s) for s in no_gather}
    for op, shapes in info.collectives:
        hits = [s for s in shapes if math.prod(s) in sizes]
        if op == "all-gather" and hits:
            found.append(f"all-gather of {hits}")
    return found


# Per-shard (value, index) pairs of a vocabulary sort, 8 shards x 256 rows: small enough
# for a peer's gathers to be compared above it only.
SMALL_GATHER = 8 * 256


def large_gathers(result: Result) -> set[tuple[int, ...]]:
    """The shapes (after the leading dimension, which counts the participants) of a compiled
    program's all-gathers of more than ``SMALL_GATHER`` elements."""
    return {tuple(shape[1:]) for op, shapes in result.info.collectives
            if op == "all-gather" for shape in shapes if math.prod(shape) > SMALL_GATHER}


def new_gathers(result: Result, peer: Result) -> list[str]:
    """Problems of ``result`` against the case it ``gathers_like``: its large all-gathers
    that ``peer`` does not have (none when either failed to compile: that is reported)."""
    if result.info is None or peer.info is None:
        return []
    added = sorted(large_gathers(result) - large_gathers(peer))
    return [f"all-gathers of shapes {added} that {peer.case!r} does not have"] if added else []


def run_case(case: Case) -> Result:
    """Compiles ``case`` and checks it; a compile error is a problem, not an exception."""
    with tempfile.TemporaryDirectory() as dump:
        try:
            fn, mesh, args, donate = case.build()
            compiled = compile_for(fn, mesh, *args, dump_dir=dump, donate_argnums=donate)
            info = inspect_compile(compiled, dump)
            buffers = buffer_problems(compiled.as_text(), info.temp_bytes, case.no_buffer,
                                      case.max_temp_bytes)
        except Exception as err:  # noqa: BLE001 - every compile error is reported, not raised
            lines = traceback.format_exception_only(err)
            return Result(case.name, None, [f"compile error: {''.join(lines).strip()[:2000]}"])
    return Result(case.name, info, problems_of(info, case.no_gather) + buffers)


def buffer_problems(hlo: str, temp_bytes: int,
                    no_buffer: tuple[tuple[str, tuple[int, ...]], ...],
                    max_temp_bytes: int | None) -> list[str]:
    """Instructions of ``hlo`` that produce a ``no_buffer`` array (its dtype, its dims in
    any order), and temporaries of ``max_temp_bytes`` or more."""
    import re

    found = []
    for dtype, shape in no_buffer:
        for dims in re.findall(rf"= {dtype}\[([\d,]+)\]", hlo):
            if sorted(int(d) for d in dims.split(",")) == sorted(shape):
                found.append(f"a {dtype}[{dims}] buffer (a dequantized {list(shape)} weight)")
                break
    if max_temp_bytes is not None and temp_bytes >= max_temp_bytes:
        found.append(f"{temp_bytes} temporary bytes, at or over the case's limit of "
                     f"{max_temp_bytes} (a quantized step: room for a dequantized copy of a "
                     "layer's routed experts)")
    return found


def ragged_args(mesh: Any, rows: int, slots: int, context: int,
                kv_spec: PartitionSpec = REPLICATED,
                q_spec: PartitionSpec = REPLICATED) -> tuple:
    """Abstract ``ragged_paged_attention`` arguments: ``rows`` query rows, ``slots`` sequence
    slots whose block tables reach ``context`` tokens, a cache of ``slots * context`` tokens."""
    width = context // PAGE
    pages = slots * width
    return (abstract(mesh, (rows, H, D), BF16, q_spec),
            abstract(mesh, (pages, PAGE, K, D), BF16, kv_spec),
            abstract(mesh, (pages, PAGE, K, D), BF16, kv_spec),
            abstract(mesh, (slots, width), jnp.int32), abstract(mesh, (slots,), jnp.int32),
            abstract(mesh, (slots + 1,), jnp.int32), abstract(mesh, (), jnp.int32))


def ragged_case(name: str, rows: int, slots: int, context: int, chunk: int | None,
                **options: Any) -> Case:
    """``ragged_paged_attention`` on one device (``options`` override its defaults)."""
    from pallas_kernels import ragged_paged_attention

    def build():
        mesh = gpu_mesh(1, ("x",))
        fn = lambda *a: ragged_paged_attention(*a, chunk_size=chunk, **options)  # noqa: E731
        return fn, mesh, ragged_args(mesh, rows, slots, context), ()

    return Case(name, build)


def flash_case(name: str, tokens: int, chunk: int | None, **options: Any) -> Case:
    """``flash_attention`` prefill of one sequence on one device."""
    from pallas_kernels import flash_attention

    def build():
        mesh = gpu_mesh(1, ("x",))
        q, k = (abstract(mesh, (1, tokens, h, D), BF16) for h in (H, K))
        fn = lambda q, k, v: flash_attention(q, k, v, causal=True, chunk_size=chunk,  # noqa: E731
                                             **options)
        return fn, mesh, (q, k, k), ()

    return Case(name, build)


def sharded_attention_case(name: str, rows: int, slots: int, context: int,
                           chunk: int | None, devices: int = 8) -> Case:
    """The model's ``"pallas"`` attention with heads and the cache split over ``model``."""
    from jaxllm.layout import AttentionMetadata
    from jaxllm.model.attention import paged_attention
    from jaxllm.sharding import MESH_AXES

    width = context // PAGE

    def build():
        mesh = gpu_mesh(devices, MESH_AXES, (1, 1, devices))
        q, kp, vp, bt, sl, qsl, ns = ragged_args(
            mesh, rows, slots, context, PartitionSpec(None, None, "model", None),
            PartitionSpec(None, "model", None))

        def fn(q, kp, vp, bt, sl, qsl, ns):
            meta = AttentionMetadata(jnp.zeros(rows, jnp.int32), jnp.zeros(rows, jnp.int32),
                                     bt, sl, qsl, ns)
            return paged_attention(q, kp, vp, meta, chunk_size=chunk, impl="pallas", mesh=mesh)

        return fn, mesh, (q, kp, vp, bt, sl, qsl, ns), ()

    return Case(name, build, no_gather=((slots * width, PAGE, K, D), (rows, H, D)))


def kernel_cases() -> list[Case]:
    """Every kernel at Scout / Maverick shapes with its default block settings."""
    cases = [
        flash_case("flash prefill 8k causal", 8192, None),
        flash_case("flash prefill 8k chunked", 8192, CHUNK),
        flash_case("flash prefill 32k causal", 32768, None),
        flash_case("flash prefill 128k chunked", 131072, CHUNK),
    ]
    for chunk in (None, CHUNK):
        tag = "chunked" if chunk else "global"
        cases += [
            ragged_case(f"ragged prefill 8k {tag}", 8192, 1, 8192, chunk),
            ragged_case(f"ragged chunked prefill 8k of 128k {tag}", 8192, 64, 131072, chunk),
        ]
    for batch in (1, 64):
        for context in (8192, 32768, 131072):
            cases.append(ragged_case(f"ragged decode b{batch} {context // 1024}k", batch,
                                     batch, context, None))
    cases.append(ragged_case("ragged decode b64 128k chunked", 64, 64, 131072, CHUNK))
    cases += [
        sharded_attention_case("attention model=8 decode b64 128k", 64, 64, 131072, None),
        sharded_attention_case("attention model=8 chunked prefill 8k", 8192, 64, 131072, CHUNK),
    ]
    return cases


def engine_step_case(name: str, devices: int, rows: int, slots: int, max_model_len: int,
                     num_pages: int, num_layers: int = 4, quant: Any = None,
                     kv_dtype: Any = BF16, config: Any = None, num_speculative: int = 0,
                     eagle: bool = False) -> Case:
    """The engine's sampling step (``jaxllm.engine.step.step_function``) of a Scout-shaped
    model in bf16 (its feed-forward weights quantized by ``quant``, a ``QuantConfig``),
    parameters and cache as abstract arrays with their real shardings; ``num_pages`` pages
    of cache (plus the null page) of ``kv_dtype``; with ``num_speculative`` the verifying
    step of that many drafts a sequence (``eagle``: the next step's drafted in it by a
    Maverick-sized EAGLE-3 head, ``maverick_head_config``, reading target layers 1-3). A
    quantized step must produce no bf16 copy of one expert's weight, nor have room for a
    copy of a layer's routed experts."""
    from jaxllm.kv_cache import CacheConfig
    from jaxllm.sharding import MESH_AXES

    config = scout_config(num_layers) if config is None else config
    # The serving default: chunked-local layers in their own groups (hybrid page tables).
    cache = CacheConfig(page_size=PAGE, dtype=kv_dtype, num_pages=num_pages, hybrid=True)
    width = max_model_len // PAGE

    def build():
        mesh = gpu_mesh(devices, MESH_AXES, (1, 1, devices))
        graphdef, params = abstract_params(config, BF16, mesh, quant)
        drafter = (abstract_drafter(mesh, num_speculative, (1, 2, 3)) if eagle else None)
        sample_step, args = abstract_step(graphdef, params, config, cache, mesh, rows, slots,
                                          width, num_speculative=num_speculative,
                                          drafter=drafter)
        return sample_step, mesh, args, (1, 2, 3)

    expert = (config.hidden_size, config.intermediate_size // devices)
    layer = config.num_experts * math.prod(expert) * 2
    return Case(name, build, no_gather=(cache.page_shape(config), (rows, H, D)),
                no_buffer=() if quant is None else (("bf16", expert),),
                max_temp_bytes=None if quant is None else layer)


def engine_cases() -> list[Case]:
    """The engine step of a 4-layer Scout on 1 device and on a model=8 mesh: a decode step
    of 64 sequences and a chunked-prefill step of 2048 tokens, max_model_len 128k."""
    cases = []
    for devices in (1, 8):
        cases += [
            engine_step_case(f"engine step {devices} dev decode b64", devices, 64, 64, 131072,
                             num_pages=32768),
            engine_step_case(f"engine step {devices} dev prefill 2k", devices, 2048, 64,
                             131072, num_pages=32768),
        ]
    return cases + quantized_engine_cases()


def quantized_engine_cases() -> list[Case]:
    """The same step with fp8 (W8A8), int8 and int4 experts, on 1 device and on model=8, an
    int4 prefill, and fp8 with the fp8 KV cache."""
    from jaxllm.model.quant import QuantConfig

    cases = []
    for scheme in ("fp8", "int8", "int4"):
        for devices in (1, 8):
            cases.append(engine_step_case(
                f"engine step {devices} dev decode b64 {scheme}", devices, 64, 64, 131072,
                num_pages=32768, quant=QuantConfig(scheme)))
    # int4 runs pallas_kernels.grouped_matmul: its prefill tiles are 64 rows, decode's 16.
    cases.append(engine_step_case("engine step 1 dev prefill 2k int4", 1, 2048, 64, 131072,
                                  num_pages=32768, quant=QuantConfig("int4")))
    cases.append(engine_step_case("engine step 1 dev prefill 2k fp8 + fp8 KV", 1, 2048, 64,
                                  131072, num_pages=32768, quant=QuantConfig("fp8"),
                                  kv_dtype=jnp.float8_e4m3fn))
    return cases


def plan_cases() -> list[Case]:
    """The step the deployment plans (``tests/jaxllm/engine/test_memory.py``) size: the widest
    token bucket (8192 rows, vLLM's H100 default) and 8 sequences, for Scout int4 (bf16 and
    fp8 KV cache) and fp8 on one device and Maverick fp8 routed experts on model=8, 4 layers;
    Scout int4 also at 8 layers (a step's temporaries do not grow with its layers: XLA reuses
    one layer's buffers in the next). Their temporaries are the plan tests' step memory."""
    from jaxllm.model.quant import QuantConfig

    fp8 = jnp.float8_e4m3fn
    cases = [
        engine_step_case(f"plan step scout int4 1 dev 8k rows {layers} layers", 1, 8192, 8,
                         131072, num_pages=8192, num_layers=layers, quant=QuantConfig("int4"))
        for layers in (4, 8)]
    cases += [
        engine_step_case("plan step scout int4 fp8 KV 1 dev 8k rows 4 layers", 1, 8192, 8,
                         131072, num_pages=8192, quant=QuantConfig("int4"), kv_dtype=fp8),
        engine_step_case("plan step scout fp8 1 dev 8k rows 4 layers", 1, 8192, 8, 131072,
                         num_pages=8192, quant=QuantConfig("fp8")),
        engine_step_case("plan step maverick fp8 8 dev 8k rows 4 layers", 8, 8192, 8,
                         1_000_000, num_pages=8192, quant=QuantConfig("fp8", ("routed",)),
                         config=maverick_config(4)),
    ]
    # At 8192 rows a [rows, hidden] activation has a weight's dims: only temporaries count.
    return [dataclasses.replace(c, no_buffer=(), max_temp_bytes=None) for c in cases]


def verify_case(name: str, devices: int, slots: int, k: int, with_q: bool,
                vocab: int = 202048) -> Case:
    """Speculative verification (``jaxllm.sample.verify``) of ``k`` drafts per sequence at
    Scout's vocabulary, logits (and q) split over the vocabulary as the model leaves them;
    no all-gather may produce a vocabulary-wide array."""
    from jaxllm.sample.sampling import seed_keys
    from jaxllm.sample.verify import verify
    from jaxllm.sharding import MESH_AXES

    def build():
        mesh = gpu_mesh(devices, MESH_AXES, (1, 1, devices))
        spec = PartitionSpec(None, None, "model")
        rep = lambda shape, dtype=jnp.int32: abstract(mesh, shape, dtype)  # noqa: E731

        def fn(logits, drafts, num_drafts, is_greedy, seeds, first, q):
            return verify(logits, drafts, num_drafts, is_greedy, seed_keys(seeds), first, q,
                          mesh)

        q = abstract(mesh, (slots, k, vocab), jnp.float32, spec) if with_q else None
        args = (abstract(mesh, (slots, k + 1, vocab), jnp.float32, spec), rep((slots, k)),
                rep((slots,)), rep((slots,), jnp.bool_), rep((slots, 2), jnp.uint32),
                rep((slots,)), q)
        return fn, mesh, args, ()

    return Case(name, build, no_gather=((slots, k + 1, vocab), (slots, k, vocab),
                                        (slots, vocab), (slots * (k + 1), vocab)))


def spec_cases() -> list[Case]:
    """Verification of 3 drafts for 64 sequences (point mass and with q), the whole
    verifying engine step of a 4-layer Scout around it (64 sequences x 4 rows, max_model_len
    128k; n-gram drafts, and an EAGLE-3 head drafting the next step's in it), and EAGLE-3
    drafting of 3 tokens for them alone, on 1 and 8 devices."""
    verify = [verify_case(f"verify {d} dev s64 k3 {'q' if q else 'point mass'}", d, 64, 3, q)
              for d in (1, 8) for q in (False, True)]
    # On 8 devices the verifying step's temporaries are about 340 MiB a device (BENCHMARKS);
    # a whole-vocabulary copy of its later positions on every device made them 1 GiB.
    verify += [dataclasses.replace(
        engine_step_case(f"engine verify step {d} dev b64 k3{' eagle3' * eagle}", d, 64 * 4,
                         64, 131072, num_pages=32768, num_speculative=3, eagle=eagle),
        gathers_like=f"engine step {d} dev decode b64",
        max_temp_bytes=None if d == 1 else 512 * 2**20) for eagle in (False, True)
        for d in (1, 8)]
    return verify + [eagle_draft_case(f"eagle3 draft {d} dev s64 k3", d, 64, 3, 131072,
                                      num_pages=32768) for d in (1, 8)]


def eagle_draft_case(name: str, devices: int, slots: int, k: int, max_model_len: int,
                     num_pages: int) -> Case:
    """EAGLE-3 drafting (``jaxllm.engine.spec_decode.eagle.draft``, Pallas attention) of ``k``
    tokens for ``slots`` sequences after a verify step of ``k + 1`` rows each, with a
    Maverick-sized head (``maverick_head_config``)."""
    from flax import nnx

    from jaxllm.engine.spec_decode.eagle import draft
    from jaxllm.layout import AttentionMetadata
    from jaxllm.sharding import MESH_AXES

    rows, width = slots * (k + 1), max_model_len // PAGE

    def build():
        mesh = gpu_mesh(devices, MESH_AXES, (1, 1, devices))
        graphdef, params, _ = abstract_head(mesh)
        rep = lambda shape, dtype=jnp.int32: abstract(mesh, shape, dtype)  # noqa: E731
        kv_spec = PartitionSpec(None, None, "model" if devices > 1 else None, None)
        page = abstract(mesh, (num_pages + 1, PAGE, K, D), BF16, kv_spec)
        meta = AttentionMetadata(rep((rows,)), rep((rows,)), rep((slots, width)),
                                 rep((slots,)), rep((slots + 1,)), rep(()))

        def fn(params, cache, meta, tokens, features, valid, last):
            head = nnx.merge(graphdef, params)
            return draft(head, head.embed_tokens, cache, meta, tokens, features, valid, last,
                         k=k, page_size=PAGE, attention_impl="pallas")

        args = (params, (page, page), meta, rep((rows,)), rep((rows, 3 * 5120), BF16),
                rep((rows,), jnp.bool_), rep((slots,)))
        return fn, mesh, args, (1,)

    return Case(name, build, no_gather=((num_pages + 1, PAGE, K, D), (rows, H, D),
                                        (slots, 202048), (rows, 202048)))


def vision_encoder_case(name: str, devices: int, tiles: int) -> Case:
    """``VisionModel`` (the whole tower, adapter and projector) on ``tiles`` tiles, bf16, its
    weights abstract with their real shardings; no weight of it may be all-gathered."""
    from flax import nnx

    from jaxllm.config import VisionConfig
    from jaxllm.model.vision import VisionModel
    from jaxllm.sharding import MESH_AXES, param_shardings

    config = VisionConfig.from_hf({"vision_config": SCOUT_VISION}, text_hidden_size=5120)
    side, heads, head_dim = config.image_size, config.num_heads, config.head_dim

    def build():
        mesh = gpu_mesh(devices, MESH_AXES, (1, 1, devices))
        graphdef, state = nnx.split(nnx.eval_shape(
            lambda: VisionModel(config, BF16, nnx.Rngs(0), mesh)))
        leaves, treedef = jax.tree.flatten(state)
        shardings = jax.tree.leaves(param_shardings(state, mesh))
        params = treedef.unflatten([jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
                                    for a, s in zip(leaves, shardings, strict=True)])

        def encode(params, pixels):
            return nnx.merge(graphdef, params)(pixels)

        return encode, mesh, (params, abstract(mesh, (tiles, 3, side, side), BF16)), ()

    weights = ((config.hidden_size, heads, head_dim), (config.hidden_size, config.shuffled_dim),
               (config.shuffled_dim, config.projector_input_dim),
               (config.vision_output_dim, config.text_hidden_size))
    return Case(name, build, no_gather=weights)


def vision_cases() -> list[Case]:
    """The encoder at the tile buckets of one image (1, and 17 -> 32: 16 tiles + global)."""
    return [vision_encoder_case(f"vision encoder {devices} dev {tiles} tiles", devices, tiles)
            for devices in (1, 8) for tiles in (1, 32)]
