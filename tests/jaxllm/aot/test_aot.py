"""The deviceless H100 compile check (``jaxllm.aot``): it passes the default kernels and the
production tensor-parallel attention, and it catches each kind of failure (a spill, a compile
error, an all-gather of the KV cache). Compiles need the CUDA jax plugin, ``ptxas`` and
``JAX_PLATFORMS=cpu``: the Python 3.12 venv that ``.ci/run`` builds."""

from __future__ import annotations

import os
import shutil

import pytest

from jaxllm.aot.target import CompileInfo, KernelInfo, collectives
from tests.support.compile_cases import (
    Case,
    K,
    Result,
    engine_cases,
    flash_case,
    new_gathers,
    problems_of,
    ragged_args,
    ragged_case,
    run_case,
    sharded_attention_case,
    spec_cases,
)


def _can_compile_for_gpu() -> bool:
    try:
        import jax_plugins.xla_cuda13  # noqa: F401
    except ImportError:
        return False
    return os.environ.get("JAX_PLATFORMS") == "cpu" and shutil.which("ptxas") is not None


needs_gpu_compiler = pytest.mark.skipif(
    not _can_compile_for_gpu(),
    reason="needs the CUDA jax plugin, ptxas and JAX_PLATFORMS=cpu (the venv of .ci/run)")

HLO = """
  %ag = bf16[65536,8,128]{2,1,0} all-gather(bf16[65536,1,128]{2,1,0} %p), dimensions={1}
  %ags = (bf16[64,5,128]{2,1,0}, bf16[64,40,128]{2,1,0}) all-gather-start(bf16[64,5,128] %q)
  %ar = f32[64,5120]{1,0} all-reduce(f32[64,5120]{1,0} %x), to_apply=%add
"""


def test_collectives_are_read_from_hlo_with_their_shapes():
    assert collectives(HLO) == (
        ("all-gather", ((65536, 8, 128),)),
        ("all-gather", ((64, 5, 128), (64, 40, 128))),
        ("all-reduce", ((64, 5120),)),
    )


def test_problems_name_spilling_kernels_and_forbidden_gathers():
    def kernel(name, spill):
        return KernelInfo(name, 255, spill, spill, 0, 0, 0, 0)

    info = CompileInfo(
        kernels=(kernel("ragged_paged_attention", 104), kernel("loop_fusion", 8),
                 kernel("flash_attention", 0)),
        collectives=collectives(HLO), argument_bytes=0, output_bytes=0, temp_bytes=0,
        alias_bytes=0)
    # The pages [4096, 16, 8, 128] gathered as [65536, 8, 128] are caught by element count.
    problems = problems_of(info, no_gather=((4096, 16, 8, 128), (64, 40, 128)))
    assert problems == ["ragged_paged_attention spills (104 B stores, 104 B loads)",
                        "all-gather of [(65536, 8, 128)]", "all-gather of [(64, 40, 128)]"]
    assert problems_of(info, no_gather=()) == problems[:1]


@needs_gpu_compiler
def test_default_ragged_kernel_compiles_without_spills_and_with_vector_loads():
    result = run_case(ragged_case("decode b1 8k", 1, 1, 8192, 8192))
    assert result.problems == []
    [kernel] = [k for k in result.info.kernels if k.name == "ragged_paged_attention"]
    assert kernel.spill_stores == kernel.spill_loads == 0
    assert kernel.cp_async > 0 and kernel.scalar_b16_loads == 0
    assert kernel.registers <= 255 and kernel.threads == 128


@needs_gpu_compiler
def test_a_spilling_config_is_caught():
    # A 256 x 128 float32 accumulator over 4 warps alone needs 256 registers per thread.
    result = run_case(flash_case("spills", 2048, None, block_q=256, block_k=64, num_warps=4,
                                 num_stages=2))
    assert result.info is not None
    assert any("flash_attention spills" in p for p in result.problems), result.problems


@needs_gpu_compiler
def test_a_compile_error_is_caught():
    # 256 x 128 blocks, 3 pipeline stages: 256 KiB of shared memory; an H100 block has 227.
    result = run_case(flash_case("too big", 2048, None, block_q=256, block_k=128,
                                 num_warps=4))
    assert result.info is None
    assert len(result.problems) == 1, result.problems
    assert result.problems[0].startswith("compile error")
    assert "Shared memory size limit exceeded" in result.problems[0]


@needs_gpu_compiler
def test_tensor_parallel_attention_runs_per_shard_and_an_unsharded_call_is_caught():
    from jax.sharding import PartitionSpec as P

    from jaxllm.aot.target import gpu_mesh
    from jaxllm.sharding import MESH_AXES
    from pallas_kernels import ragged_paged_attention

    rows, slots, context = 64, 64, 8192
    sharded = run_case(sharded_attention_case("per shard", rows, slots, context, 8192))
    assert sharded.problems == []
    assert not [op for op, _ in sharded.info.collectives if op == "all-gather"]
    [kernel] = [k for k in sharded.info.kernels if k.name == "ragged_paged_attention"]
    assert kernel.grid[1] == 40 // 8  # each device runs its own 5 q heads

    def build():
        mesh = gpu_mesh(8, MESH_AXES, (1, 1, 8))
        args = ragged_args(mesh, rows, slots, context, P(None, None, "model", None),
                           P(None, "model", None))
        return (lambda *a: ragged_paged_attention(*a, interpret=False)), mesh, args, ()

    kv_shape = (slots * context // 16, 16, K, 128)
    gathered = run_case(Case("no shard_map", build, no_gather=(kv_shape,)))
    assert any(p.startswith("all-gather of") for p in gathered.problems), gathered.problems


@needs_gpu_compiler
@pytest.mark.parametrize("hybrid", [True, False])
def test_dry_run_plans_a_deployment_from_a_config_alone(tmp_path, hybrid):
    """``python -m jaxllm.serve --dry-run``: a 4-layer Scout (3 chunked layers, 1 global) on
    8 compile-only H100s. The report's numbers agree with each other and with the
    definition: per device one kv head (8 heads over 8 devices), 16-token pages over every
    slab, and one 131072-token sequence's pages."""
    import json
    import re
    import subprocess
    import sys

    from jaxllm.aot.abstract import scout_config

    config = scout_config(4)
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama4_text", "vocab_size": config.vocab_size, "hidden_size": 5120,
        "num_hidden_layers": 4, "num_attention_heads": 40, "num_key_value_heads": 8,
        "head_dim": 128, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
        "num_local_experts": 16, "num_experts_per_tok": 1, "attention_chunk_size": 8192,
        "rope_theta": 500000.0, "use_qk_norm": True, "max_position_embeddings": 131072}))
    cmd = [sys.executable, "-m", "jaxllm.serve", "--model", str(tmp_path), "--dry-run",
           "--target", "h100", "--tensor-parallel-size", "8", "--max-num-batched-tokens",
           "1024"] + ([] if hybrid else ["--disable-hybrid-kv-cache-manager"])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = out.stdout
    per_token = 2 * 1 * 128 * 2  # K and V, one kv head per device, bf16
    assert f"{per_token} bytes per token per layer per device" in report
    pages = int(re.search(r"KV cache: (\d+) pages of 16 tokens", report).group(1))
    need = int(re.search(r"sequence takes (\d+) pages", report).group(1))
    width = 131072 // 16
    # Hybrid: the global group keeps every page; three chunked groups keep a chunk and a
    # step's worth (ceil((8192 + 1024) / 16) + 1 = 577). Otherwise one group of all layers.
    assert need == (width + 3 * 577 if hybrid else width)
    concurrency = float(re.search(r"Maximum concurrency for 131072 tokens per request: "
                                  r"([\d.]+)x", report).group(1))
    assert concurrency == pytest.approx(pages / need, abs=0.005)
    budget = re.search(r"budget: 0.90 x ([\d.]+) GiB device memory - ([\d.]+) GiB weights - "
                       r"([\d.]+) GiB penalty state - ([\d.]+) GiB step temporaries", report)
    device, weights, penalty, temp = (float(x) for x in budget.groups())
    slabs = 1 if hybrid else 4
    kv = pages * 16 * slabs * per_token / 2**30
    assert device == pytest.approx(84942979072 / 2**30, abs=0.01)  # the H100 target's memory
    # The penalty state: max_num_seqs (256 by default on a GPU) slots of int32 counts and
    # bool flags over this device's eighth of the vocabulary.
    assert "max_num_seqs 256" in report
    assert penalty == pytest.approx(256 * 202048 // 8 * 5 / 2**30, abs=0.001)
    assert 0.9 * device - weights - penalty - temp - kv == pytest.approx(0, abs=0.01)


@needs_gpu_compiler
def test_the_penalty_state_is_never_gathered_in_the_sharded_engine_step():
    """The engine step on 8 compile-only H100s keeps the penalty state (int32 counts, bool
    prompt flags, [64, 202048]) split over the vocabulary: without the sharding pins in
    ``jaxllm.sample.penalties.penalize`` the partitioner gathered both every step."""
    import re
    import tempfile

    from jaxllm.aot.target import compile_for

    [case] = [c for c in engine_cases() if c.name == "engine step 8 dev decode b64"]
    fn, mesh, args, donate = case.build()
    with tempfile.TemporaryDirectory() as dump:
        hlo = compile_for(fn, mesh, *args, dump_dir=dump, donate_argnums=donate).as_text()
    assert not re.findall(r"(?:s32|pred)\[64,202048\]\{[^}]*\} all-gather", hlo)


@needs_gpu_compiler
@pytest.mark.parametrize("case", [c for c in spec_cases() if "engine" not in c.name],
                         ids=lambda c: c.name)
def test_speculative_programs_compile_and_keep_the_vocabulary_split(case):
    """Verifying 3 drafts for 64 sequences at Scout's vocabulary, and drafting them with a
    Maverick-sized EAGLE-3 head: no spill, and on 8 devices only per-shard (value, index)
    pairs are gathered, never a vocabulary-wide array or the head's KV cache."""
    result = run_case(case)
    assert not result.problems, result.problems
    gathered = [shape for op, shapes in result.info.collectives if op == "all-gather"
                for shape in shapes]
    # Operands [rows, 1] and results [rows, 8]: rows = 64 x 4 positions at most.
    assert all(shape[-1] <= 8 and shape[0] <= 256 for shape in gathered), gathered


def test_a_verifying_step_may_gather_only_what_its_plain_step_gathers():
    """The check ``scripts/compile_gpu.py`` runs on each verifying engine step (n-gram drafts,
    and a Maverick-sized EAGLE-3 head drafting in it; 1 and 8 compile-only H100s, in
    ``.ci/run``): every all-gather above per-shard (value, index) pairs is one the plain
    decode step at 4 rows a sequence has too (the filtering rows' vocabulary sort, the
    router's top-k), so verification scatters nothing back across the vocabulary and the head
    gathers no weight."""

    def result(name, *gathered):
        info = CompileInfo(kernels=(), collectives=tuple(("all-gather", (g,)) for g in gathered),
                           argument_bytes=0, output_bytes=0, temp_bytes=0, alias_bytes=0)
        return Result(name, info, [])

    plain = result("plain", (8, 256, 64), (8, 16, 2))
    assert new_gathers(result("same", (8, 256, 64), (8, 4, 4)), plain) == []  # small: ignored
    assert new_gathers(result("wider", (8, 256, 64), (8, 64, 202048 // 8)), plain) == [
        "all-gathers of shapes [(64, 25256)] that 'plain' does not have"]
    assert new_gathers(Result("broken", None, ["compile error: x"]), plain) == []
    cases = {c.name: c for c in engine_cases() + spec_cases()}
    verifying = [c for c in cases.values() if c.name.startswith("engine verify step")]
    assert len(verifying) == 4
    for case in verifying:
        devices = case.name.split(" dev")[0].split()[-1]
        assert case.gathers_like == f"engine step {devices} dev decode b64", case.name
        assert case.gathers_like in cases


@needs_gpu_compiler
def test_the_vision_encoder_compiles_at_scout_shapes_without_gathering_weights():
    """Scout's vision tower on 1 and 8 H100s at 1 and 32 tiles; on 8 devices its weights
    stay split (tensor-parallel heads and MLP widths: reductions, never a weight gather)."""
    from tests.support.compile_cases import vision_cases

    for case in vision_cases():
        result = run_case(case)
        assert result.problems == [], (case.name, result.problems)
        if "8 dev" in case.name:
            assert any(op.startswith("all-reduce") for op, _ in result.info.collectives)


@needs_gpu_compiler
def test_dry_run_of_a_multimodal_scout_counts_the_vision_tower(tmp_path):
    """A 4-layer Scout with the released vision_config on 8 compile-only H100s: the report
    has the vision weights as a group (about 0.8 B bf16 parameters over 8 devices) and
    subtracts the image encoder's compiled memory from the budget."""
    import json
    import re
    import subprocess
    import sys

    from jaxllm.aot.abstract import SCOUT_VISION, scout_config

    config = scout_config(4)
    text = {"model_type": "llama4_text", "vocab_size": config.vocab_size, "hidden_size": 5120,
            "num_hidden_layers": 4, "num_attention_heads": 40, "num_key_value_heads": 8,
            "head_dim": 128, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
            "num_local_experts": 16, "num_experts_per_tok": 1, "attention_chunk_size": 8192,
            "rope_theta": 500000.0, "use_qk_norm": True, "max_position_embeddings": 131072}
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama4", "text_config": text, "image_token_index": 200092,
        "vision_config": dict(SCOUT_VISION, model_type="llama4_vision_model",
                              num_channels=3)}))
    cmd = [sys.executable, "-m", "jaxllm.serve", "--model", str(tmp_path), "--dry-run",
           "--target", "h100", "--tensor-parallel-size", "8", "--max-num-batched-tokens",
           "1024"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    vision = float(re.search(r"vision bfloat16 ([\d.]+) GiB", out.stdout).group(1))
    # Patch embedding, 34 layers of attention and MLP, adapter and projector, from the config.
    v = SCOUT_VISION
    d, f = v["hidden_size"], v["intermediate_size"]
    layer = 4 * d * d + 2 * d * f
    params = 34 * layer + 588 * d + f * 4096 + 4096 * 4096 + 4096 * 5120
    assert vision == pytest.approx(params * 2 / 8 / 2**30, rel=0.05)
    budget = re.search(r"- ([\d.]+) GiB step temporaries \(compiled\) - ([\d.]+) GiB image "
                       r"encoder", out.stdout)
    assert budget is not None and float(budget.group(2)) > 0, out.stdout
