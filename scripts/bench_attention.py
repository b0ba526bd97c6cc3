"""Attention kernel benchmark: prefill TFLOP/s and decode GB/s, printed as tables.

Prefill: ``flash_attention`` against ``jax.nn.dot_product_attention`` (cuDNN and XLA) for
global causal and chunked-local (Llama 4, C = 8192) attention. FLOP convention: only query-key
pairs that the mask lets through count, 4 * d FLOPs each (QK^T and PV, 2 * d apiece), per
query head; softmax is not counted. So a kernel that computes masked-out pairs gets no credit
for them, and the numbers of different kernels compare directly. cuDNN has no chunked-local
mode, so its chunked rows run causal attention over one virtual batch entry per chunk (exact
when T is a multiple of C), which is the best case for it.

Decode: ``ragged_paged_attention`` with one query per sequence (global attention, the NoPE
layers) over a paged cache; GB/s counts the K/V bytes of every visible key plus q and the
output, compared with the HBM bandwidth.

On a CPU, ``--smoke`` runs tiny sizes in interpret mode and checks every kernel against its
reference, so the script is known to import and compute correctly; timings there mean nothing.

    python scripts/bench_attention.py                 # on an H100
    python scripts/bench_attention.py --smoke         # anywhere
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import (
    flash_attention,
    flash_attention_reference,
    ragged_paged_attention,
    ragged_paged_attention_reference,
)


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, interpret mode off-GPU, checked against references")
    parser.add_argument("--seq-lens", type=parse_ints, default=[8192, 32768, 131072])
    parser.add_argument("--chunk-size", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--batches", type=parse_ints, default=[1, 4, 16, 64, 256])
    parser.add_argument("--decode-lens", type=parse_ints,
                        default=[1024, 4096, 16384, 32768, 131072])
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--block-q", type=int, default=128, help="flash_attention block_q")
    parser.add_argument("--block-k", type=int, default=64, help="flash_attention block_k")
    parser.add_argument("--num-warps", type=int, default=8, help="flash_attention num_warps")
    parser.add_argument("--num-stages", type=int, default=3, help="flash_attention num_stages")
    parser.add_argument("--decode-splits", type=int, default=None,
                        help="ragged_paged_attention num_kv_splits (default: the kernel's)")
    parser.add_argument("--hbm-bandwidth", type=float, default=3.35e12,
                        help="device HBM bandwidth in bytes/s (H100 SXM: 3.35e12)")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="dense bf16 peak in TFLOP/s (H100 SXM: 989)")
    parser.add_argument("--memory-gb", type=float, default=None,
                        help="device memory to plan with (default: what the device reports)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    return parser.parse_args(argv)


def smoke_sizes(args: argparse.Namespace) -> None:
    args.seq_lens, args.chunk_size = [64, 100], 32
    args.heads, args.kv_heads, args.head_dim = 4, 2, 32
    args.batches, args.decode_lens, args.page_size = [1, 3], [17, 70], 4
    args.block_q = args.block_k = 16
    args.num_warps, args.num_stages = 4, 2
    args.warmup, args.iters = 1, 1


def time_call(fn: Callable[..., jax.Array], inputs: tuple, warmup: int, iters: int) -> float:
    """Median seconds per ``fn(*inputs)``, after warm-up (compilation) calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*inputs))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*inputs))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def device_memory_bytes(args: argparse.Namespace) -> float:
    if args.memory_gb is not None:
        return args.memory_gb * 1e9
    stats = jax.devices()[0].memory_stats() or {}
    return float(stats.get("bytes_limit", 16e9))


def visible_pairs(seq_len: int, chunk_size: int | None) -> int:
    """Causal query-key pairs, within chunks when chunk_size is set."""
    if chunk_size is None:
        return seq_len * (seq_len + 1) // 2
    full, rest = divmod(seq_len, chunk_size)
    return full * chunk_size * (chunk_size + 1) // 2 + rest * (rest + 1) // 2


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def prefill_impls(args, interpret: bool, on_gpu: bool):
    """name -> (fn(q, k, v, chunk) or None when not applicable, bytes of scratch it needs)."""

    def flash(q, k, v, chunk):
        return flash_attention(q, k, v, chunk_size=chunk, block_q=args.block_q,
                               block_k=args.block_k, num_warps=args.num_warps,
                               num_stages=args.num_stages, interpret=interpret)

    def sdpa(implementation):
        def run(q, k, v, chunk):
            batch, seq_len, heads, dim = q.shape
            if chunk is not None:  # one virtual batch entry per chunk
                if seq_len % chunk:
                    return None
                q, k, v = (x.reshape(batch * seq_len // chunk, chunk, x.shape[2], dim)
                           for x in (q, k, v))
            out = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                               implementation=implementation)
            return out.reshape(batch, seq_len, heads, dim)
        return run

    impls = {"pallas flash": flash, "xla": sdpa("xla")}
    if on_gpu:
        impls["cudnn"] = sdpa("cudnn")
    return impls


def bench_prefill(args, interpret: bool, on_gpu: bool, memory: float) -> None:
    heads, kv_heads, dim = args.heads, args.kv_heads, args.head_dim
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    rows = []
    for seq_len in args.seq_lens:
        key = jax.random.key(seq_len)
        kq, kk, kv = jax.random.split(key, 3)
        q = jax.random.normal(kq, (1, seq_len, heads, dim), dtype)
        k = jax.random.normal(kk, (1, seq_len, kv_heads, dim), dtype)
        v = jax.random.normal(kv, (1, seq_len, kv_heads, dim), dtype)
        for chunk in (None, args.chunk_size):
            mode = "causal" if chunk is None else f"chunk {chunk}"
            flops = 4 * dim * heads * visible_pairs(seq_len, chunk)
            flash_tflops = None
            reference = None
            if args.smoke:
                reference = flash_attention_reference(q, k, v, chunk_size=chunk)
            for name, impl in prefill_impls(args, interpret, on_gpu).items():
                span = seq_len if chunk is None else chunk
                # XLA materializes [B, H, T, S] f32 logits (and probabilities).
                if name == "xla" and 2 * 4 * heads * seq_len * span > 0.6 * memory:
                    rows.append([str(seq_len), mode, name, "-", "-", "-", "-", "no memory"])
                    continue
                fn = jax.jit(lambda q, k, v, impl=impl, chunk=chunk: impl(q, k, v, chunk))
                try:
                    out = fn(q, k, v)
                except Exception as err:  # an implementation that rejects the shape
                    rows.append([str(seq_len), mode, name, "-", "-", "-", "-",
                                 type(err).__name__])
                    continue
                if out is None:
                    rows.append([str(seq_len), mode, name, "-", "-", "-", "-", "n/a"])
                    continue
                seconds = time_call(fn, (q, k, v), args.warmup, args.iters)
                tflops = flops / seconds / 1e12
                if name == "pallas flash":
                    flash_tflops = tflops
                note = ""
                if reference is not None:
                    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - reference)))
                    note = f"max err {err:.1e}"
                    assert err < 1e-4, f"{name} disagrees with the reference: {err}"
                rows.append([str(seq_len), mode, name, f"{seconds * 1e3:.2f}", f"{tflops:.4g}",
                             f"{tflops / args.peak_tflops:.1%}",
                             f"{tflops / flash_tflops:.2f}" if flash_tflops else "-",
                             note])
    print_table(
        f"Prefill, batch 1, {heads} q / {kv_heads} kv heads, head_dim {dim}, {dtype.__name__}"
        " (TFLOP/s over visible pairs, 4*d FLOPs each)",
        ["T", "mask", "impl", "ms", "TFLOP/s", "of peak", "vs flash", "note"], rows)


def decode_inputs(batch: int, seq_len: int, args, dtype, seed: int):
    pages_per_seq = -(-seq_len // args.page_size)
    num_pages = batch * pages_per_seq
    rng = np.random.default_rng(seed)
    tables = rng.permutation(num_pages).reshape(batch, pages_per_seq).astype(np.int32)
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    shape = (num_pages, args.page_size, args.kv_heads, args.head_dim)
    # Jitted so that a cache of tens of GB is generated without full-size temporaries.
    normal = jax.jit(jax.random.normal, static_argnums=(1, 2))
    return (
        normal(kq, (batch, args.heads, args.head_dim), dtype),
        normal(kk, shape, dtype),
        normal(kv, shape, dtype),
        jnp.asarray(tables),
        jnp.full((batch,), seq_len, jnp.int32),
        jnp.arange(batch + 1, dtype=jnp.int32),
        jnp.int32(batch),
    )


def bench_decode(args, interpret: bool, on_gpu: bool, memory: float) -> None:
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    itemsize = jnp.dtype(dtype).itemsize
    rows = []
    for batch in args.batches:
        for seq_len in args.decode_lens:
            kv_bytes = 2 * batch * seq_len * args.kv_heads * args.head_dim * itemsize
            if kv_bytes > 0.6 * memory:
                rows.append([str(batch), str(seq_len), "-", "-", "-", "-", "no memory"])
                continue
            inputs = decode_inputs(batch, seq_len, args, dtype, seed=batch * 7 + seq_len)
            fn = jax.jit(lambda *a: ragged_paged_attention(
                *a, num_kv_splits=args.decode_splits, interpret=interpret))
            seconds = time_call(fn, inputs, args.warmup, args.iters)
            moved = kv_bytes + 2 * batch * args.heads * args.head_dim * itemsize
            rate = moved / seconds
            note = ""
            if args.smoke:
                err = float(jnp.max(jnp.abs(fn(*inputs) - ragged_paged_attention_reference(
                    *inputs))))
                note = f"max err {err:.1e}"
                assert err < 1e-4, f"ragged_paged_attention disagrees: {err}"
            rows.append([str(batch), str(seq_len), f"{seconds * 1e6:.1f}",
                         f"{moved / 1e9:.4g}", f"{rate / 1e9:.4g}",
                         f"{rate / args.hbm_bandwidth:.1%}", note])
    print_table(
        f"Decode (1 query per sequence, global attention), {args.heads} q / {args.kv_heads} kv "
        f"heads, head_dim {args.head_dim}, page {args.page_size}, {dtype.__name__}; HBM "
        f"{args.hbm_bandwidth / 1e12:.2f} TB/s",
        ["batch", "len", "us", "GB moved", "GB/s", "of HBM", "note"], rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    if args.smoke:
        smoke_sizes(args)
    elif not on_gpu:
        print("no GPU: the full benchmark needs one; run with --smoke to check it here",
              file=sys.stderr)
        return 2
    interpret = not on_gpu
    memory = device_memory_bytes(args)
    print(f"device: {jax.devices()[0].device_kind}, backend {jax.default_backend()}, "
          f"interpret={interpret}, planning with {memory / 1e9:.0f} GB")
    bench_prefill(args, interpret, on_gpu, memory)
    bench_decode(args, interpret, on_gpu, memory)
    if args.smoke:
        print("\nsmoke run: every kernel matched its reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
