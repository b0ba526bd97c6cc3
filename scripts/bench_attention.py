"""Attention kernel benchmark: prefill TFLOP/s against cuDNN and decode GB/s against HBM.

Prefill: jaxllm's kernels (``flash_attention``, and ``ragged_paged_attention`` over a paged
cache, the path the engine takes) against ``jax.nn.dot_product_attention`` with cuDNN (and
XLA where it fits), for global causal and chunked-local (Llama 4, C = 8192) attention. FLOP
convention: only query-key pairs the mask lets through count, 4 * d FLOPs each, per query
head; so a kernel that computes masked-out pairs gets no credit for them. cuDNN has no
chunked-local mode: it runs chunked rows with a dense [T, T] mask (what a serving engine
would have to do) and, as its best case, as one virtual batch entry per chunk.

Decode: ``ragged_paged_attention`` with one query per sequence (global attention, the NoPE
layers) over a paged cache; GB/s counts the K/V bytes of every visible key plus q and the
output, against the HBM bandwidth.

Every row is printed as soon as it is measured, and an error in one row is printed in its
note column without losing the rest. Timing: warm-up calls (compilation), then the median of
``--iters`` (>= 20) calls, each ended by ``block_until_ready``.

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
    parser.add_argument("--causal-lens", type=parse_ints, default=[8192, 32768],
                        help="prefill lengths run with global causal attention")
    parser.add_argument("--chunked-lens", type=parse_ints, default=[8192, 131072],
                        help="prefill lengths run with chunked-local attention")
    parser.add_argument("--chunk-size", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--batches", type=parse_ints, default=[1, 64])
    parser.add_argument("--decode-lens", type=parse_ints, default=[8192, 131072])
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
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)
    if args.iters < 20 and not args.smoke:
        parser.error(f"--iters={args.iters}: at least 20 timed calls")
    return args


def smoke_sizes(args: argparse.Namespace) -> None:
    args.causal_lens, args.chunked_lens, args.chunk_size = [64, 100], [64], 32
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


class Table:
    """A table printed row by row, as each row is measured (fixed column widths)."""

    def __init__(self, title: str, columns: list[tuple[str, int]]):
        self.columns = columns
        self.errors = 0
        print(f"\n{title}")
        print("  ".join(name.rjust(width) for name, width in columns), flush=True)

    def error(self, cells: list[str], err: Exception) -> None:
        """A row whose measurement failed: the error goes in the note column."""
        self.errors += 1
        message = str(err).splitlines()[0][:120] if str(err) else ""
        self.row(*cells, *["-"] * (len(self.columns) - len(cells) - 1),
                 f"{type(err).__name__}: {message}")

    def row(self, *cells: str) -> None:
        padded = list(cells) + ["-"] * (len(self.columns) - len(cells))
        print("  ".join(str(c).rjust(w) for c, (_, w) in zip(padded, self.columns, strict=True)),
              flush=True)


def paged_prefill_inputs(q, k, v, page_size: int):
    """One sequence of T tokens as the engine lays it out: K/V in pages, q as flat rows."""
    _, seq_len, kv_heads, dim = k.shape
    pages = -(-seq_len // page_size)
    pad = ((0, 0), (0, pages * page_size - seq_len), (0, 0), (0, 0))
    k_pages = jnp.pad(k, pad).reshape(pages, page_size, kv_heads, dim)
    v_pages = jnp.pad(v, pad).reshape(pages, page_size, kv_heads, dim)
    return (q[0], k_pages, v_pages, jnp.arange(pages, dtype=jnp.int32)[None, :],
            jnp.array([seq_len], jnp.int32), jnp.array([0, seq_len], jnp.int32), jnp.int32(1))


def prefill_impls(args, interpret: bool, on_gpu: bool) -> dict[str, Callable]:
    """name -> fn(q, k, v, chunk) (None when it does not apply to the shape)."""

    def flash(q, k, v, chunk):
        return flash_attention(q, k, v, chunk_size=chunk, block_q=args.block_q,
                               block_k=args.block_k, num_warps=args.num_warps,
                               num_stages=args.num_stages, interpret=interpret)

    def ragged(q, k, v, chunk):
        out = ragged_paged_attention(*paged_prefill_inputs(q, k, v, args.page_size),
                                     chunk_size=chunk, interpret=interpret)
        return out[None]

    def sdpa(implementation, dense_mask=False):
        def run(q, k, v, chunk):
            batch, seq_len, heads, dim = q.shape
            if chunk is None:
                return jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                    implementation=implementation)
            if dense_mask:
                pos = jnp.arange(seq_len)
                mask = (pos[None, :] <= pos[:, None]) & (
                    pos[None, :] // chunk == pos[:, None] // chunk)
                return jax.nn.dot_product_attention(q, k, v, mask=mask[None, None],
                                                    implementation=implementation)
            if seq_len % chunk:
                return None
            q, k, v = (x.reshape(batch * seq_len // chunk, chunk, x.shape[2], dim)
                       for x in (q, k, v))
            out = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                               implementation=implementation)
            return out.reshape(batch, seq_len, heads, dim)
        return run

    impls = {}
    if on_gpu:
        impls["cudnn"] = sdpa("cudnn", dense_mask=True)
    impls["pallas flash"] = flash
    impls["pallas ragged"] = ragged
    if on_gpu:
        impls["cudnn chunks-as-batch"] = sdpa("cudnn")
    impls["xla"] = sdpa("xla", dense_mask=True)
    return impls


def bench_prefill(args, interpret: bool, on_gpu: bool, memory: float) -> int:
    """Prints the prefill table; returns the number of rows that failed."""
    heads, kv_heads, dim = args.heads, args.kv_heads, args.head_dim
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    table = Table(
        f"Prefill, batch 1, {heads} q / {kv_heads} kv heads, head_dim {dim}, {dtype.__name__}"
        " (TFLOP/s over visible pairs, 4*d FLOPs each; x cuDNN: ratio to the cuDNN row)",
        [("T", 7), ("mask", 10), ("impl", 21), ("ms", 9), ("TFLOP/s", 8), ("of peak", 7),
         ("x cuDNN", 7), ("note", 30)])
    runs = [(t, None) for t in args.causal_lens] + [(t, args.chunk_size)
                                                    for t in args.chunked_lens]
    for seq_len, chunk in runs:
        mode = "causal" if chunk is None else f"chunk {chunk}"
        kq, kk, kv = jax.random.split(jax.random.key(seq_len), 3)
        q = jax.random.normal(kq, (1, seq_len, heads, dim), dtype)
        k = jax.random.normal(kk, (1, seq_len, kv_heads, dim), dtype)
        v = jax.random.normal(kv, (1, seq_len, kv_heads, dim), dtype)
        flops = 4 * dim * heads * visible_pairs(seq_len, chunk)
        reference = flash_attention_reference(q, k, v, chunk_size=chunk) if args.smoke else None
        cudnn_tflops = None
        for name, impl in prefill_impls(args, interpret, on_gpu).items():
            cells = [str(seq_len), mode, name]
            # XLA materializes [B, H, T, T] f32 logits; a dense mask is [T, T].
            if name == "xla" and 8 * heads * seq_len * seq_len > 0.6 * memory:
                table.row(*cells, "-", "-", "-", "-", "skipped: no memory")
                continue
            try:
                fn = jax.jit(lambda q, k, v, impl=impl, chunk=chunk: impl(q, k, v, chunk))
                out = fn(q, k, v)
                if out is None:
                    table.row(*cells, "-", "-", "-", "-", "n/a for this length")
                    continue
                seconds = time_call(fn, (q, k, v), args.warmup, args.iters)
                note = ""
                if reference is not None:
                    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - reference)))
                    note = f"max err {err:.1e}"
                    if err > 1e-4:
                        raise AssertionError(f"disagrees with the reference: {err}")
            except Exception as err:  # noqa: BLE001 - one failing row must not lose the table
                table.error(cells, err)
                continue
            tflops = flops / seconds / 1e12
            if name == "cudnn":
                cudnn_tflops = tflops
            table.row(*cells, f"{seconds * 1e3:.2f}", f"{tflops:.4g}",
                      f"{tflops / args.peak_tflops:.1%}",
                      f"{tflops / cudnn_tflops:.2f}" if cudnn_tflops else "-", note)
        del q, k, v
    return table.errors


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


def bench_decode(args, interpret: bool, on_gpu: bool, memory: float) -> int:
    """Prints the decode table; returns the number of rows that failed."""
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    itemsize = jnp.dtype(dtype).itemsize
    table = Table(
        f"Decode (1 query per sequence, global attention), {args.heads} q / {args.kv_heads} kv "
        f"heads, head_dim {args.head_dim}, page {args.page_size}, {dtype.__name__}; HBM "
        f"{args.hbm_bandwidth / 1e12:.2f} TB/s",
        [("batch", 5), ("len", 7), ("us", 9), ("GB moved", 8), ("GB/s", 8), ("of HBM", 6),
         ("note", 30)])
    for batch in args.batches:
        for seq_len in args.decode_lens:
            kv_bytes = 2 * batch * seq_len * args.kv_heads * args.head_dim * itemsize
            if kv_bytes > 0.6 * memory:
                table.row(str(batch), str(seq_len), "-", "-", "-", "-", "skipped: no memory")
                continue
            try:
                inputs = decode_inputs(batch, seq_len, args, dtype, seed=batch * 7 + seq_len)
                fn = jax.jit(lambda *a: ragged_paged_attention(
                    *a, num_kv_splits=args.decode_splits, interpret=interpret))
                seconds = time_call(fn, inputs, args.warmup, args.iters)
                note = ""
                if args.smoke:
                    err = float(jnp.max(jnp.abs(fn(*inputs) - ragged_paged_attention_reference(
                        *inputs))))
                    note = f"max err {err:.1e}"
                    if err > 1e-4:
                        raise AssertionError(f"disagrees with the reference: {err}")
            except Exception as err:  # noqa: BLE001 - one failing row must not lose the table
                table.error([str(batch), str(seq_len)], err)
                continue
            moved = kv_bytes + 2 * batch * args.heads * args.head_dim * itemsize
            rate = moved / seconds
            table.row(str(batch), str(seq_len), f"{seconds * 1e6:.1f}", f"{moved / 1e9:.4g}",
                      f"{rate / 1e9:.4g}", f"{rate / args.hbm_bandwidth:.1%}", note)
            del inputs
    return table.errors


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
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, backend "
          f"{jax.default_backend()}, interpret={interpret}, planning with "
          f"{memory / 1e9:.0f} GB; {args.warmup} warm-up + median of {args.iters} calls",
          flush=True)
    failed = bench_prefill(args, interpret, on_gpu, memory)
    failed += bench_decode(args, interpret, on_gpu, memory)
    print(f"\n{failed} row(s) failed" if failed else "\nevery row measured", flush=True)
    # On a GPU a failed row (say cuDNN out of memory on a dense 128k mask) is a result; in a
    # smoke run every row must work and match its reference.
    return 1 if failed and args.smoke else 0


if __name__ == "__main__":
    sys.exit(main())
