"""Quantized weights side by side: bf16 / fp8 / int8 / int4.

    python scripts/bench_quant.py [--preset cpu|scout] [--tokens 64] [--repeats 20]

Table 1 (from abstract parameters of the full 48-layer Scout, one device, no weights
allocated): weight bytes in all and the bytes one decode token reads (top-1: every dense
weight, its routed expert in each layer, one embedding row).
Table 2: the time of one MoE layer's feed-forward GEMMs (router, one ragged routed-expert
SwiGLU, the shared expert) on ``--tokens`` rows, median of ``--repeats`` runs after a
warm-up; ``--preset cpu`` shrinks the layer to fit a CPU, ``scout`` is Scout's real layer
(hidden 5120, 16 experts x 8192) for a GPU. Beside it, from the compiled program: its
temporary bytes (``memory_analysis()``; a dequantized bf16 copy of the routed experts would
be 2 x E x D x F x 2 bytes), the largest temporary buffer in the optimized HLO, and the GEMM
calls and fusions that take fp8 operands (none on a CPU, which upcasts).
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.aot.abstract import abstract_params, scout_config
from jaxllm.config import Llama4Config
from jaxllm.engine.memory import weight_groups, weights_bytes_per_device
from jaxllm.model.llama4 import MoE
from jaxllm.model.quant import QuantConfig
from jaxllm.sharding import make_mesh

SCHEMES = ("bf16", "fp8", "int8", "int4")
PRESETS = {"cpu": dict(hidden_size=1024, intermediate_size=2048, num_local_experts=16),
           "scout": dict(hidden_size=5120, intermediate_size=8192, num_local_experts=16)}


def _quant(scheme: str) -> QuantConfig | None:
    return None if scheme == "bf16" else QuantConfig(scheme)


def bytes_table() -> list[str]:
    config = scout_config(48)
    mesh = make_mesh(devices=jax.devices()[:1])
    rows = ["| scheme | weights GiB | decode bytes per token GiB | vs bf16 |", "|---|---|---|---|"]
    base = None
    for scheme in SCHEMES:
        _, params = abstract_params(config, jnp.bfloat16, mesh, _quant(scheme))
        groups = weight_groups(params)
        total = weights_bytes_per_device(params)
        routed = groups["routed experts"][1]
        embed = groups["embed"][1]
        # one routed expert per MoE layer, one embedding row, everything else
        active = total - routed + routed // config.num_experts - embed + embed // config.vocab_size
        base = base or active
        rows.append(f"| {scheme} | {total / 2**30:.2f} | {active / 2**30:.3f} | "
                    f"{active / base:.2f}x |")
    return rows


def layer_time(preset: str, scheme: str, tokens: int, repeats: int) -> float:
    shapes = PRESETS[preset]
    config = Llama4Config.from_hf(dict(
        model_type="llama4_text", vocab_size=1024, num_hidden_layers=1, num_attention_heads=8,
        num_key_value_heads=8, head_dim=128, num_experts_per_tok=1, rope_theta=500000.0,
        intermediate_size_mlp=2 * shapes["intermediate_size"], **shapes))
    moe = MoE(config, jnp.bfloat16, nnx.Rngs(0), quant=_quant(scheme))
    graphdef, state = nnx.split(moe)

    @jax.jit
    def run(state, x):
        return nnx.merge(graphdef, state)(x)

    x = jax.random.normal(jax.random.key(1), (tokens, config.hidden_size), jnp.bfloat16)
    compiled = run.lower(state, x).compile()
    hlo = compiled.as_text()
    temp = compiled.memory_analysis().temp_size_in_bytes
    # cuBLAS(Lt) custom calls and XLA's Triton GEMM fusions that take e4m3 operands
    fp8_gemms = len(re.findall(r"custom-call\([^\n]*f8e4m3fn", hlo)) + len(
        re.findall(r"^%\S*gemm\S* \([^)\n]*f8e4m3fn", hlo, re.MULTILINE))
    run(state, x).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(state, x).block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times), temp, _largest_buffer(hlo), fp8_gemms


def _largest_buffer(hlo: str) -> str:
    """The largest array an instruction of the optimized HLO's entry produces."""
    sizes = {"bf16": 2, "f16": 2, "f32": 4, "s8": 1, "u8": 1, "s4": 0.5, "f8e4m3fn": 1}
    best, name = 0, ""
    for dtype, dims in re.findall(r"= (bf16|f16|f32|s8|u8|s4|f8e4m3fn)\[([\d,]+)\]", hlo):
        n = sizes[dtype] * math.prod(int(d) for d in dims.split(","))
        if n > best:
            best, name = n, f"{dtype}[{dims}]"
    return name


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}")
    print("\n".join(bytes_table()))
    print(f"\nMoE layer GEMMs, preset {args.preset} {PRESETS[args.preset]}, {args.tokens} tokens")
    print("| scheme | ms | vs bf16 | temp MiB | largest buffer | fp8 GEMMs |\n"
          "|---|---|---|---|---|---|")
    base = None
    for scheme in SCHEMES:
        t, temp, largest, fp8 = layer_time(args.preset, scheme, args.tokens, args.repeats)
        base = base or t
        print(f"| {scheme} | {t * 1e3:.3f} | {t / base:.2f}x | {temp / 2**20:.1f} | "
              f"{largest} | {fp8} |", flush=True)


if __name__ == "__main__":
    main()
