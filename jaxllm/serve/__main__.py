"""``python -m jaxllm.serve``: the OpenAI-compatible server.

    python -m jaxllm.serve --model checkpoints/scout --max-model-len 32768 --port 8000

Across processes (``JAXLLM_COORDINATOR_ADDRESS`` / ``JAXLLM_NUM_PROCESSES`` /
``JAXLLM_PROCESS_ID`` set, e.g. by ``scripts/launch.py``), every process runs the same
command: process 0 serves HTTP and leads; the others follow its steps and exit when it stops.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jaxllm.config import VisionConfig
    from jaxllm.engine import Engine
    from jaxllm.serve.app import ServerState
    from jaxllm.serve.images import ImageInput

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny-llama4"
log = logging.getLogger("jaxllm.serve")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxllm.serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="a jaxllm checkpoint directory (scripts/convert_hf_to_orbax.py)")
    p.add_argument("--served-model-name", default=None, help="name in the API (default: "
                   "the checkpoint directory's name)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="sequences running at once (default: 256 on a GPU and for --dry-run, "
                   "8 on CPU)")
    p.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false",
                   help="schedule each step only after the last one's tokens reach the host "
                   "(by default the next step is dispatched first, hiding the host's work)")
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help="speculative decoding, vLLM's JSON: e.g. '{\"method\": \"ngram\", "
                   "\"num_speculative_tokens\": 3, \"prompt_lookup_max\": 3}', or an EAGLE-3 "
                   "head: '{\"method\": \"eagle3\", \"model\": \"HEAD_DIR\", "
                   "\"num_speculative_tokens\": 3}'")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="rows of one engine step (default: 8192 on a GPU, 512 on CPU; longer "
                   "prompts are prefilled in chunks)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="share of device memory for weights, step temporaries and the KV "
                   "cache (default: 0.9 on a GPU; on CPU 0.3 of the RAM, the cache capped at "
                   "max-num-seqs sequences of max-model-len)")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                   help="KV cache size in bytes per device (overrides the utilization)")
    p.add_argument("--num-kv-pages", type=int, default=None,
                   help="KV cache pages (overrides both memory flags)")
    p.add_argument("--disable-hybrid-kv-cache-manager", action="store_true",
                   help="keep every layer's whole history (chunked-local layers otherwise "
                   "keep only the pages of their current chunk)")
    p.add_argument("--compilation-cache-dir", default=None,
                   help="persistent XLA compilation cache (default: $JAXLLM_CACHE_DIR or "
                   "~/.cache/jaxllm/xla; '' turns it off)")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="devices of the mesh's model axis; across processes, the mesh spans "
                   "every process's devices")
    p.add_argument("--data-parallel-size", type=int, default=1,
                   help="devices of the mesh's data axis, which splits each step's token batch "
                   "(one engine, not vLLM's engine replicas)")
    p.add_argument("--step-timeout", type=float, default=60.0,
                   help="across processes: seconds a step may take before the leader fails "
                   "its requests and exits (a process died or hangs); it must cover the "
                   "slowest compile and stay under JAX's 100 s heartbeat timeout, past which "
                   "JAX aborts every process without answering")
    p.add_argument("--block-size", type=int, default=16, help="KV cache page size in tokens")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quantization", default=None, choices=["fp8", "int8", "int4"],
                   help="quantize the feed-forward weights while loading (a checkpoint "
                        "converted quantized, or from compressed-tensors, needs none)")
    p.add_argument("--quantization-scope", default="experts", choices=["experts", "ffn"],
                   help="experts: routed + shared experts (Meta's scope); ffn: also the "
                        "dense FFN layers")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3"],
                   help="auto: the model dtype; fp8: e4m3 pages with a scale (half of bf16)")
    p.add_argument("--attention-impl", default=None, choices=["pallas", "xla"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None)
    p.add_argument("--max-request-bytes", type=int, default=8 * 2**20,
                   help="largest request body; a larger one gets a 413 unread (default 8 MiB)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--limit-mm-per-prompt", default="image=1",
                   help="images per prompt: image=N or '{\"image\": N}' (default image=1)")
    p.add_argument("--allowed-media-domains", nargs="*", default=[],
                   help="hosts that http(s) image URLs may name (default: none; data: URLs "
                        "always work)")
    p.add_argument("--max-image-bytes", type=int, default=20 * 2**20,
                   help="largest encoded image accepted, in bytes")
    p.add_argument("--max-image-pixels", type=int, default=40_000_000,
                   help="largest image accepted, in pixels (width x height)")
    p.add_argument("--media-fetch-timeout", type=float, default=10.0,
                   help="seconds to fetch one http(s) image")
    p.add_argument("--dry-run", action="store_true",
                   help="plan, do not serve: compile the serving step for --target GPUs that "
                   "need not be here and print the start-up report (DIR may hold only a "
                   "config.json; needs jax >= 0.11 with the CUDA plugin, JAX_PLATFORMS=cpu)")
    p.add_argument("--target", default="h100", help="the GPU of --dry-run")
    p.add_argument("--skip-warmup", action="store_true",
                   help="do not compile every step shape at start-up (first requests wait)")
    return p.parse_args(argv)


def build_engine(args: argparse.Namespace) -> Engine:
    """The engine, built the same way in every process: compilation cache, mesh, weights, memory
    plan."""
    import jax

    import jaxllm
    from jaxllm.engine import Engine
    from jaxllm.engine.spec_decode.config import SpeculativeConfig
    from jaxllm.runtime import compile_cache

    speculative = (None if args.speculative_config is None
                   else SpeculativeConfig.from_json(args.speculative_config))
    cache_dir = (compile_cache.default_cache_dir() if args.compilation_cache_dir is None
                 else args.compilation_cache_dir)
    cache_dir = compile_cache.enable(cache_dir)
    log.info("compilation cache: %s", cache_dir or "off")
    mesh = None
    size = args.data_parallel_size * args.tensor_parallel_size
    if jax.process_count() > 1 and size != jax.device_count():
        raise ValueError(f"--data-parallel-size={args.data_parallel_size} x "
                         f"--tensor-parallel-size={args.tensor_parallel_size} = {size} devices "
                         f"must span every process's: {jax.process_count()} processes hold "
                         f"{jax.device_count()}")
    if size > 1:
        mesh = jaxllm.make_mesh(data=args.data_parallel_size, model=args.tensor_parallel_size,
                                devices=jax.devices()[:size])
    model = jaxllm.load_model(args.model, dtype=args.dtype, max_model_len=args.max_model_len,
                              mesh=mesh, attention_impl=args.attention_impl,
                              page_size=args.block_size, max_num_seqs=args.max_num_seqs,
                              max_num_batched_tokens=args.max_num_batched_tokens,
                              hybrid_kv_cache=not args.disable_hybrid_kv_cache_manager,
                              quantization=args.quantization,
                              quantization_scope=args.quantization_scope,
                              kv_cache_dtype=args.kv_cache_dtype)
    return Engine(model, num_pages=args.num_kv_pages,
                  kv_cache_memory_bytes=args.kv_cache_memory_bytes,
                  gpu_memory_utilization=args.gpu_memory_utilization, seed=args.seed,
                  step_timeout=args.step_timeout, async_scheduling=args.async_scheduling,
                  speculative=speculative)


def build_state(args: argparse.Namespace) -> ServerState:
    """The leader's server state: the engine, warmed up, behind the async front."""
    import time

    from jaxllm.runtime import compile_cache
    from jaxllm.sample.grammar import GrammarCompiler
    from jaxllm.serve.app import ServerState
    from jaxllm.serve.async_engine import AsyncEngine
    from jaxllm.serve.metrics import Metrics
    from jaxllm.serve.tokenizer import TextCodec

    image_input(args, None)  # bad media flags fail before the engine is built
    start = time.perf_counter()
    with compile_cache.CompileCounter() as compiles:
        engine = build_engine(args)
        for line in engine.report():
            log.info("%s", line)
        warm = time.perf_counter()
        programs = 0 if args.skip_warmup else engine.warmup()
    log.info("warm-up: %d step programs in %.1f s; programs compiled: %d, loaded from the "
             "compilation cache: %d; start-up %.1f s", programs, time.perf_counter() - warm,
             compiles.compiled, compiles.cache_hits, time.perf_counter() - start)
    name = args.served_model_name or Path(args.model).resolve().name
    metrics = Metrics(name)
    codec = TextCodec.from_dir(args.model)
    if codec is not None:  # structured outputs and tool calls compile grammars against it
        engine.grammars = GrammarCompiler.for_tokenizer(
            codec.tokenizer, engine.model.eos_token_ids, engine.model.config.vocab_size)
    return ServerState(AsyncEngine(engine, metrics), codec, name, metrics, args.api_key,
                       args.max_request_bytes,
                       image_input(args, engine.model.config.vision, codec))


def image_input(args: argparse.Namespace, vision: VisionConfig | None,
                codec: Any = None) -> ImageInput:
    """What the server accepts as images, from the flags, the model's vision tower (None:
    images are refused) and the tokenizer's image tokens (``codec``, a ``TextCodec``)."""
    from jaxllm.multimodal.media import MediaLimits
    from jaxllm.multimodal.processor import ProcessorConfig
    from jaxllm.serve.images import ImageInput, parse_mm_limit

    for name in ("max_image_bytes", "max_image_pixels", "media_fetch_timeout"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be "
                             f"positive")
    limits = MediaLimits(max_image_bytes=args.max_image_bytes,
                         max_image_pixels=args.max_image_pixels,
                         allowed_domains=frozenset(d.lower() for d in args.allowed_media_domains),
                         fetch_timeout_s=args.media_fetch_timeout)
    processor = None if vision is None else ProcessorConfig.from_dir(
        args.model, tile_size=vision.image_size)
    tokens = None
    if vision is not None and codec is not None:
        from jaxllm.multimodal.prompt import ImageTokens

        try:
            tokens = ImageTokens.from_vocab(codec.tokenizer.token_to_id)
        except ValueError as e:
            log.warning("images are refused: %s", e)
    return ImageInput(processor, limits, parse_mm_limit(args.limit_mm_per_prompt), tokens,
                      0 if vision is None else vision.tokens_per_tile)


def follow(args: argparse.Namespace) -> int:
    """A follower process: builds the same engine and runs the leader's steps until it stops."""
    import os

    import jax

    from jaxllm.runtime import distributed

    # Ctrl-C reaches every process of a terminal's group: the leader's stop ends this one.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        engine = build_engine(args)
        log.info("process %d follows process 0", jax.process_index())
        engine.executor.follow()
    except Exception:
        log.exception("follower process %d failed", jax.process_index())
        os._exit(1)  # a clean exit would wait for the leader at the shutdown barrier
    log.info("process %d: the leader stopped", jax.process_index())
    distributed.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # force: an imported library may already have configured the root logger.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every read at INFO
    if not Path(args.model).is_dir():
        print(f"error: --model {args.model} is not a directory", file=sys.stderr)
        return 2
    if args.dry_run:
        import os

        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        from jaxllm.aot.plan import dry_run

        try:
            print("\n".join(dry_run(args)), flush=True)
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    import uvicorn

    from jaxllm.runtime import distributed
    from jaxllm.serve.app import build_app

    try:
        multi_process = distributed.initialize()
        if multi_process and distributed.is_follower():
            return follow(args)
        state = build_state(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"serving {state.model_name} (max_model_len {state.max_model_len}) on "
          f"http://{args.host}:{args.port}/v1", flush=True)
    # uvicorn re-raises SIGTERM after its graceful shutdown: exit through the finally below,
    # which stops the followers, instead of dying of the signal.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        uvicorn.run(build_app(state), host=args.host, port=args.port, log_level="warning")
    finally:
        state.engine.shutdown()  # and the followers
        if multi_process:
            distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
