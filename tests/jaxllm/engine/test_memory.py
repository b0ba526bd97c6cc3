"""The memory plan of quantized deployments at full Llama 4 size, from abstract parameters
sharded over simulated devices (no weights allocated): the plan counts quantized weights and
their scales, names the scheme per parameter group, and the deployments the issue names fit.

The step's temporary memory is what the compiled step needs (``STEP_TEMP``): the widest step
these plans run (8192 rows, 8 sequences) of each deployment, compiled for H100s without one
(``JAX_PLATFORMS=cpu .venv312/bin/python scripts/compile_gpu.py --only "plan step"``, cases
``tests.support.compile_cases.plan_cases``, jax 0.11.2, 2026-12-03; BENCHMARKS.md), read from its
``memory_analysis``. The compile has 4 layers: a step's temporaries do not grow with its
layers (Scout int4: 788 MiB at 4 layers, 789 MiB at 8), so the 48-layer step needs the same;
1 MiB of margin per deployment covers that difference. A real ``--dry-run`` compiles the
step at the deployment's own shapes."""

from __future__ import annotations

import dataclasses

import pytest

from jaxllm.aot.abstract import abstract_params, scout_config
from jaxllm.aot.plan import target_memory_bytes
from jaxllm.buckets import GPU_MAX_NUM_BATCHED_TOKENS, BucketPolicy
from jaxllm.engine.memory import (
    penalty_bytes_per_device,
    plan_kv_cache,
    startup_report,
    weight_groups,
    weights_bytes_per_device,
)
from jaxllm.kv_cache import CacheConfig
from jaxllm.model.quant import QuantConfig
from jaxllm.sharding import make_mesh
from jaxllm.weights.loading import kv_cache_dtype_of

pytestmark = pytest.mark.heavy  # end to end: compiles engines or models (tests/conftest.py)

GIB = 2**30
MIB = 2**20
# Measured temporaries (MiB, per device) of the 8192-row step, plus 1 MiB: see the docstring.
STEP_TEMP = {
    ("scout", "int4", "auto"): 789 * MIB,
    ("scout", "int4", "fp8"): 789 * MIB,
    ("scout", "fp8", "auto"): 1349 * MIB,
    ("maverick", "fp8", "auto"): 5467 * MIB,
}
H100 = target_memory_bytes("h100")  # 84,942,979,072 bytes
H200 = 150_754_820_096  # total memory of an H200 (141 GB HBM3e) as CUDA reports it


def maverick_config():
    scout = scout_config(48)
    return dataclasses.replace(
        scout, num_experts=128, moe_layers=tuple(range(1, 48, 2)), rope_scaling=None,
        use_qk_norm=False)


def _step_temp(config, quant, kv) -> int:
    name = "maverick" if config.num_experts == 128 else "scout"
    if quant is None:  # bf16 Maverick is refused on its weights alone: no temporaries needed
        return 0
    return STEP_TEMP[(name, quant.scheme, kv)]


def _plan(config, devices, quant, max_model_len, kv="auto", device_bytes=H100):
    import jax.numpy as jnp

    mesh = make_mesh(model=devices, data=8 // devices)
    mesh = make_mesh(model=devices, devices=mesh.devices.ravel()[:devices]) if devices < 8 \
        else mesh
    _, params = abstract_params(config, jnp.bfloat16, mesh, quant)
    policy = BucketPolicy(
        max_model_len=max_model_len,
        cache=CacheConfig(page_size=16, dtype=kv_cache_dtype_of(kv, jnp.bfloat16), hybrid=True),
        chunk_size=config.attention_chunk_size, max_num_seqs=8,
        max_num_batched_tokens=GPU_MAX_NUM_BATCHED_TOKENS)
    weights = weights_bytes_per_device(params)
    plan = plan_kv_cache(config, policy, mesh=mesh, on_gpu=True,
                         device_bytes=lambda: device_bytes, weights_bytes=lambda: weights,
                         step_temp_bytes=lambda: _step_temp(config, quant, kv),
                         penalty_bytes=penalty_bytes_per_device(config, policy, mesh))
    report = startup_report(config, policy, plan, weights, mesh, params=params)
    concurrency = float(report[-2].rsplit(": ", 1)[1].rstrip("x"))
    return params, weights, concurrency, report


def test_maverick_fp8_on_8_h100_at_1m_tokens_twice_over():
    config = maverick_config()
    params, weights, concurrency, report = _plan(config, 8, QuantConfig("fp8", ("routed",)),
                                                 1_000_000)
    groups = weight_groups(params)
    assert groups["routed experts"][0] == "fp8" and groups["shared expert"][0] == "bfloat16"
    assert groups["attention"][0] == "bfloat16"
    # 128 experts x 24 MoE layers x 3 x 5120 x 8192 e4m3 weights over 8 devices, + f32
    # scales: gate/up's per ffn column split with them, down's per model column (not split)
    routed, experts = 128 * 24 * 3 * 5120 * 8192, 128 * 24
    scales = experts * 2 * 8192 * 4 // 8 + experts * 5120 * 4
    assert groups["routed experts"][1] == routed // 8 + scales
    assert weights < 50 * GIB
    assert concurrency >= 2.0, report
    print("\n".join(report))


def test_maverick_bf16_on_8_h100_is_refused():
    with pytest.raises(ValueError, match="nothing is left for the KV cache"):
        _plan(maverick_config(), 8, None, 1_000_000)


@pytest.mark.parametrize("kv, sequences", [("auto", 1.0), ("fp8", 2.0)])
def test_scout_int4_on_one_h100_at_128k(kv, sequences):
    params, weights, concurrency, report = _plan(scout_config(48), 1, QuantConfig("int4"),
                                                 131072, kv=kv)
    groups = weight_groups(params)
    assert groups["routed experts"][0] == groups["shared expert"][0] == "int4"
    # int4 packed two per byte, one bf16 scale per 128 weights
    routed = 16 * 48 * 3 * 5120 * 8192
    assert groups["routed experts"][1] == routed // 2 + routed // 128 * 2
    assert concurrency >= sequences, report
    print("\n".join(report))


def test_scout_fp8_on_one_h200_at_128k():
    _, weights, concurrency, report = _plan(scout_config(48), 1, QuantConfig("fp8"), 131072,
                                            device_bytes=H200)
    assert concurrency >= 1.0, report
    print("\n".join(report))
