"""The converter: complete output or none, and errors that name the offending tensor/file."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Llama4ForCausalLM, Llama4TextConfig

import jaxllm
from jaxllm.weights import convert as convert_lib
from tests.jaxllm.conftest import run_converter
from tests.support import REPO, hf_models

pytestmark = pytest.mark.heavy  # end to end: compiles engines or models (tests/conftest.py)


@pytest.fixture
def hf_copy(tiny_model, tmp_path):
    """A private copy of the Scout-like HF checkpoint that a test may damage."""
    _, hf_dir, _ = tiny_model("scout")
    return Path(shutil.copytree(hf_dir, tmp_path / "hf"))


def _shard_with(hf_dir: Path, tensor: str) -> Path:
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    return hf_dir / index["weight_map"][tensor]


def _rewrite(shard: Path, edit) -> None:
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


def _assert_failed_cleanly(result, out: Path, *needles: str) -> None:
    assert result.returncode != 0
    for needle in needles:
        assert needle in result.stderr, result.stderr
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    assert leftovers == []


def test_truncated_shard(hf_copy, tmp_path):
    shard = _shard_with(hf_copy, "model.layers.2.self_attn.q_proj.weight")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    out = tmp_path / "out"
    _assert_failed_cleanly(run_converter(hf_copy, out), out, shard.name, "truncated")


def test_corrupted_header(hf_copy, tmp_path):
    shard = _shard_with(hf_copy, "model.norm.weight")
    data = bytearray(shard.read_bytes())
    data[8:40] = b"\x00garbage-not-json\xff" * 2
    shard.write_bytes(bytes(data))
    out = tmp_path / "out"
    _assert_failed_cleanly(run_converter(hf_copy, out), out, shard.name,
                           "not a readable safetensors file")


def test_missing_tensor(hf_copy, tmp_path):
    name = "model.layers.1.feed_forward.experts.down_proj"
    _rewrite(_shard_with(hf_copy, name), lambda t: t.pop(name))
    out = tmp_path / "out"
    _assert_failed_cleanly(run_converter(hf_copy, out), out, "missing tensor", name)


def test_unexpected_tensor(hf_copy, tmp_path):
    shard = _shard_with(hf_copy, "model.norm.weight")
    _rewrite(shard, lambda t: t.__setitem__("model.layers.9.mystery.weight", torch.zeros(3)))
    out = tmp_path / "out"
    _assert_failed_cleanly(run_converter(hf_copy, out), out, "unexpected tensor",
                           "model.layers.9.mystery.weight")


def test_misshaped_tensor(hf_copy, tmp_path):
    name = "model.layers.3.self_attn.k_proj.weight"

    def shrink(t):
        t[name] = t[name][:-1].clone()

    _rewrite(_shard_with(hf_copy, name), shrink)
    out = tmp_path / "out"
    _assert_failed_cleanly(run_converter(hf_copy, out), out, name, "has shape (31, 64)",
                           "expected (32, 64)")


def test_failure_midway_leaves_no_checkpoint(hf_copy, tmp_path, monkeypatch):
    calls = []
    real = convert_lib.checkpoint.save_group

    def flaky(root, name, tree):
        calls.append(name)
        if len(calls) == 3:
            raise KeyboardInterrupt  # like ^C in the middle of a real conversion
        real(root, name, tree)

    monkeypatch.setattr(convert_lib.checkpoint, "save_group", flaky)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert_lib.convert(hf_copy, out, progress=False)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_existing_output_is_not_touched(tiny_model, tmp_path):
    _, hf_dir, _ = tiny_model("scout")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_converter(hf_dir, out)
    assert result.returncode != 0 and "already exists" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_default_bfloat16_output(tiny_model, tmp_path):
    hf, hf_dir, _ = tiny_model("multimodal")
    out = tmp_path / "bf16"
    result = run_converter(hf_dir, out)
    assert result.returncode == 0, result.stderr
    assert "skipping" not in result.stdout  # the vision tower is kept
    for name in ("config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (hf_dir / name).read_bytes()
    model = jaxllm.load_model(out)
    assert json.loads((out / "jaxllm_checkpoint.json").read_text())["dtype"] == "bfloat16"
    assert model.params["embed"][...].dtype == jax_bf16()
    ids = np.random.default_rng(0).integers(0, hf_models.BASE["vocab_size"], (2, 40)).tolist()
    ref = hf_models.hf_logits(hf, ids)
    # bfloat16 drifts from float32 through the layers; ours may drift no more than HF's own
    # bfloat16 model does on the same weights.
    hf_bf16 = copy.deepcopy(hf.language_model).to(torch.bfloat16)
    with torch.no_grad():
        ref_bf16 = hf_bf16(input_ids=torch.tensor(ids)).logits.float().numpy()
    hf_drift = np.abs(ref_bf16 - ref).max()
    assert np.abs(model.logits(ids) - ref).max() < 1.5 * hf_drift
    as_f32 = jaxllm.load_model(out, dtype="float32")
    assert as_f32.params["embed"][...].dtype == np.float32


def test_preprocessor_config_travels_with_the_checkpoint(tiny_model, tmp_path):
    from jaxllm.multimodal.processor import ProcessorConfig

    _, hf_dir, _ = tiny_model("multimodal")
    hf_copy = tmp_path / "hf"
    shutil.copytree(hf_dir, hf_copy)
    (hf_copy / "preprocessor_config.json").write_text(
        '{"size": {"height": 28, "width": 28}, "max_patches": 4}')
    out = tmp_path / "out"
    assert run_converter(hf_copy, out, "--dtype", "float32").returncode == 0
    assert ProcessorConfig.from_dir(out) == ProcessorConfig(tile_size=28, max_patches=4)


def test_vision_tower_is_kept_unless_text_only(tiny_model, tmp_path):
    hf, hf_dir, full = tiny_model("multimodal")
    groups = json.loads((full / "jaxllm_checkpoint.json").read_text())["groups"]
    num_vision_layers = hf.config.vision_config.num_hidden_layers
    assert {g for g in groups if g.startswith("vision")} == {"vision"} | {
        f"vision_layer_{i:03d}" for i in range(num_vision_layers)}
    assert jaxllm.load_model(full).config.vision is not None

    out = tmp_path / "text"
    result = run_converter(hf_dir, out, "--dtype", "float32", "--text-only")
    assert result.returncode == 0, result.stderr
    num_vision = sum(1 for n in hf.state_dict() if n.startswith(("vision_model.",
                                                                   "multi_modal_projector.")))
    assert f"skipping {num_vision} vision/projector tensors" in result.stdout
    groups = json.loads((out / "jaxllm_checkpoint.json").read_text())["groups"]
    assert not [g for g in groups if g.startswith("vision")]
    model = jaxllm.load_model(out)
    assert model.config.vision is None and "vision" not in model.params
    with pytest.raises(ValueError, match="no vision tower"):
        model.encode_images(np.zeros((1, 3, 28, 28), np.float32))
    ids = np.random.default_rng(1).integers(0, hf_models.BASE["vocab_size"], (1, 20)).tolist()
    ref = hf_models.hf_logits(hf, ids)
    assert np.abs(model.logits(ids) - ref).max() / np.abs(ref).max() < 1e-4


def jax_bf16():
    import jax.numpy as jnp

    return jnp.bfloat16


def test_load_refuses_a_directory_without_manifest(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="not a jaxllm checkpoint"):
        jaxllm.load_model(tmp_path)


_PEAK_RSS = textwrap.dedent("""
    import resource, subprocess, sys
    subprocess.run(sys.argv[1:], check=True, capture_output=True)
    print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
""")


def _peak_rss(hf_dir: Path, out: Path) -> int:
    """Peak RSS in bytes of one converter process, measured by a parent that runs only it."""
    script = REPO / "scripts" / "convert_hf_to_orbax.py"
    cmd = [sys.executable, "-c", _PEAK_RSS, sys.executable, str(script), "--hf-dir",
           str(hf_dir), "--out", str(out), "--dtype", "float32", "--no-progress"]
    return int(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def test_peak_memory_is_about_one_layer(tiny_model, tmp_path):
    """An ~800 MB model converts with a peak far below its size (figures shown with -s).

    The converter holds about one layer at a time; what it adds over the interpreter with jax
    and orbax loaded (measured on the tiny model) is a few layers' worth: the layer being
    built plus Orbax/tensorstore's write buffers for it."""
    big = dict(hf_models.SCOUT_LIKE, hidden_size=384, intermediate_size=512,
               intermediate_size_mlp=1024, num_local_experts=16, num_attention_heads=8,
               num_key_value_heads=2, head_dim=48, vocab_size=4096, num_hidden_layers=20)
    torch.manual_seed(0)
    model = Llama4ForCausalLM(Llama4TextConfig(**big))
    hf_dir = hf_models.save(model, tmp_path / "hf", shard_size="100MB")
    size = sum(f.stat().st_size for f in hf_dir.glob("*.safetensors"))
    del model
    baseline = _peak_rss(tiny_model("scout")[1], tmp_path / "tiny")
    peak = _peak_rss(hf_dir, tmp_path / "big")
    largest_layer = size / big["num_hidden_layers"]
    print(f"\nmodel {size / 2**20:.0f} MiB; converter peak RSS {peak / 2**20:.0f} MiB, "
          f"{baseline / 2**20:.0f} MiB of it the interpreter + libraries (tiny model); "
          f"added {(peak - baseline) / 2**20:.0f} MiB; one layer {largest_layer / 2**20:.0f} MiB")
    assert size > 600 * 2**20
    assert peak - baseline < 6 * largest_layer
    assert peak < size * 0.75
