"""Quantized Llama 4 against references nobody here wrote: tiny random models quantized by the
compressed-tensors library, run by HF transformers (weight-only schemes: its dequantized
run), or, for FP8 W8A8, HF's model with each quantized Linear's input fake-quantized per
token by the definition written below (compressed-tensors' own fake quantization of a 2-D
input reduces over the whole tensor, not per token)."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

import jaxllm
from jaxllm import SamplingParams
from jaxllm.engine import Engine
from jaxllm.model import quant
from jaxllm.sharding import make_mesh
from tests.support import hf_models

from ..conftest import run_converter

pytestmark = pytest.mark.heavy  # end to end: compiles engines or models (tests/conftest.py)

WEIGHT_ONLY_TOL = 1e-4  # max |ours - HF| / max |HF|, float32
W8A8_TOL = 1e-3
LENGTH = 40  # crosses two 16-token attention chunks


def _ids(batch: int = 2, length: int = LENGTH, seed: int = 0) -> list[list[int]]:
    return np.random.default_rng(seed).integers(0, 333, (batch, length)).tolist()


def _rel(ours, ref) -> float:
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


VARIANTS = {
    "scout": dict(hf_models.SCOUT_LIKE),
    "maverick": dict(hf_models.MAVERICK_LIKE),  # dense layers 0 and 2: quantized too
}


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """``compressed(variant, scheme, group_size)`` -> (HF's own load, HF dir, jaxllm dir)."""
    cache: dict = {}

    def get(variant: str, scheme: str, group_size: int = 16, scale: float = 0.2):
        key = (variant, scheme, group_size, scale)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"{variant}_{scheme}_{group_size}")
            hf = hf_models.make_text_model(VARIANTS[variant], seed=11, scale=scale)
            hf_models.save_compressed(hf, root / "hf", scheme, group_size)
            result = run_converter(root / "hf", root / "jaxllm", "--dtype", "float32")
            assert result.returncode == 0, result.stderr
            cache[key] = (hf_models.load_compressed(root / "hf"), root / "hf", root / "jaxllm")
        return cache[key]

    return get


@pytest.mark.parametrize("variant", ["scout", "maverick"])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_weight_only_logits_equal_hf(compressed, variant, scheme):
    hf, _, path = compressed(variant, scheme)
    model = jaxllm.load_model(path)
    manifest = json.loads((path / "jaxllm_checkpoint.json").read_text())
    targets = ["routed", "shared"] + (["dense"] if variant == "maverick" else [])
    group = 16 if scheme == "int4" else quant.DEFAULT_GROUP_SIZE  # int8: per channel, unused
    assert manifest["quantization"] == {"scheme": scheme, "targets": targets,
                                        "group_size": group}
    gate = model.params["layers"][1]["ffn"]["gate"]
    assert gate["q"].dtype == quant.STORAGE[scheme]
    ids = _ids()
    assert _rel(model.logits(ids), hf_models.hf_logits(hf, ids)) < WEIGHT_ONLY_TOL


# int8 on model=8 splits the ffn and its per-channel scales; int4 in groups of 8 on
# expert=4 x model=2 splits the experts, the ffn rows and their groups.
@pytest.mark.parametrize("scheme, group_size, mesh", [
    ("int8", 16, dict(model=8)), ("int4", 8, dict(expert=4, model=2)),
    ("int4", 16, dict(data=2, model=4))])
def test_weight_only_logits_equal_hf_on_8_devices(compressed, scheme, group_size, mesh):
    hf, _, path = compressed("scout", scheme, group_size)
    model = jaxllm.load_model(path, mesh=make_mesh(**mesh))
    ids = _ids()
    assert _rel(model.logits(ids), hf_models.hf_logits(hf, ids)) < WEIGHT_ONLY_TOL


@pytest.mark.parametrize("mesh", [None, dict(data=2, model=4), dict(expert=4, model=2)])
def test_int4_grouped_kernel_logits_equal_hf(compressed, monkeypatch, mesh):
    """The GPU path of int4 experts (``pallas_kernels.grouped_matmul`` for the routed experts
    and the shared expert, under ``shard_map`` on a mesh), run in interpret mode on the CPU."""

    from pallas_kernels import grouped_matmul

    monkeypatch.setattr(quant, "targets_gpu", lambda: True)
    calls = []

    def interpreted(*args, **kwargs):
        calls.append(args[1].shape)
        return grouped_matmul(*args, **kwargs, interpret=True)

    monkeypatch.setattr(quant, "grouped_matmul", interpreted)
    hf, _, path = compressed("scout", "int4", 16)
    model = jaxllm.load_model(path, mesh=None if mesh is None else make_mesh(**mesh))
    ids = _ids()
    assert _rel(model.logits(ids), hf_models.hf_logits(hf, ids)) < WEIGHT_ONLY_TOL
    experts = hf.config.get_text_config().num_local_experts
    assert {shape[0] for shape in calls} == {1, experts // (mesh or {}).get("expert", 1)}


def test_scales_are_split_with_their_channels(compressed):
    _, _, path = compressed("scout", "int4", 8)
    model = jaxllm.load_model(path, mesh=make_mesh(expert=4, model=2))
    ffn = model.params["layers"][0]["ffn"]
    spec = {name: (tuple(ffn[name]["q"].sharding.spec), tuple(ffn[name]["scale"].sharding.spec))
            for name in ("gate", "down")}
    assert spec["gate"] == (("expert", None, "model"), ("expert", None, "model"))
    assert spec["down"] == (("expert", "model", None), ("expert", "model", None))
    # groups of 16 over 48 rows cannot split 2 ways on group boundaries: rows stay whole
    _, _, path16 = compressed("scout", "int4", 16)
    down = jaxllm.load_model(path16, mesh=make_mesh(expert=4, model=2)).params
    assert tuple(down["layers"][0]["ffn"]["down"]["q"].sharding.spec) == ("expert", None, None)


def _fake_quant_fp8_per_token(module, args):
    """The definition: each row over its last axis scaled by amax / 448, rounded to e4m3."""
    (x,) = args
    scale = x.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 448.0
    q = (x / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).to(x.dtype)
    return (q * scale,)


def _w8a8_reference(hf, ids):
    from compressed_tensors.quantization.lifecycle.helpers import disable_quantization

    hf_models.hf_logits(hf, ids[:1])  # the first forward decompresses the weights
    hooks = []
    for module in hf.modules():
        if getattr(module, "quantization_scheme", None) is not None:
            disable_quantization(module)
            hooks.append(module.register_forward_pre_hook(_fake_quant_fp8_per_token))
    try:
        return hf_models.hf_logits(hf, ids)
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("variant", ["scout", "maverick"])
@pytest.mark.parametrize("mesh", [None, dict(expert=2, model=4)])
def test_fp8_w8a8_logits_equal_the_definition(compressed, variant, mesh):
    # Weights of 0.05 keep the tiny model out of the chaotic regime, where one e4m3 rounding
    # flip grows through the layers.
    hf, _, path = compressed(variant, "fp8", scale=0.05)
    model = jaxllm.load_model(path, mesh=None if mesh is None else make_mesh(**mesh))
    assert model.params["layers"][1]["ffn"]["up"]["q"].dtype == jnp.float8_e4m3fn
    ids = _ids()
    ref = _w8a8_reference(hf, ids)
    assert _rel(model.logits(ids), ref) < W8A8_TOL
    # and activation quantization matters at this tolerance
    assert _rel(hf_models.hf_logits(hf, ids), ref) > W8A8_TOL


def _hf_greedy(hf, prompt, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                          eos_token_id=2, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("mesh", [None, dict(model=8)])
def test_generate_and_engine_equal_hf_greedy(compressed, mesh):
    hf, _, path = compressed("scout", "int8")
    model = jaxllm.load_model(path, max_model_len=64, page_size=8, max_num_seqs=4,
                              mesh=None if mesh is None else make_mesh(**mesh))
    prompts = [p[:n] for p, n in zip(_ids(3, 30, seed=4), (7, 19, 30), strict=True)]
    expected = [_hf_greedy(hf, p, 12) for p in prompts]
    assert jaxllm.generate(model, prompts, max_new_tokens=12) == expected
    engine = Engine(model, max_num_batched_tokens=16)
    params = SamplingParams(temperature=0.0, max_tokens=12)
    assert engine.generate(prompts, params) == expected


# ---- Quantizing at load and at conversion -----------------------------------------------


def _definition(w: np.ndarray, scheme: str, group: int) -> np.ndarray:
    """Symmetric round-to-nearest over the in features (axis -2), as numpy writes it."""
    if scheme == "int4":
        rows = w.reshape(*w.shape[:-2], -1, group, w.shape[-1])
        scale = np.abs(rows).max(-2, keepdims=True) / 7
        return (np.clip(np.round(rows / scale), -8, 7) * scale).reshape(w.shape)
    limit = 448.0 if scheme == "fp8" else 127
    scale = np.abs(w).max(-2, keepdims=True) / limit
    q = w / scale
    q = q.astype(ml_dtypes.float8_e4m3fn).astype(np.float32) if scheme == "fp8" else np.round(q)
    return q * scale


@pytest.mark.parametrize("scheme", ["fp8", "int8", "int4"])
def test_quantize_is_the_definition(scheme):
    w = np.random.default_rng(0).normal(0, 0.3, (3, 64, 24)).astype(np.float32)
    q, scale = quant.quantize(jnp.asarray(w), scheme, 16)
    got = quant.dequantize(quant.QArray(q, scale, scheme, 16), jnp.float32)
    np.testing.assert_allclose(np.asarray(got), _definition(w, scheme, 16), rtol=0, atol=1e-6)
    x = np.random.default_rng(1).normal(0, 1, (5, 64)).astype(np.float32)
    ref = x @ _definition(w[0], scheme, 16)
    if scheme == "fp8":  # activations per token, by the definition
        xs = np.abs(x).max(-1, keepdims=True) / 448.0
        ref = ((x / xs).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * xs) @ \
            _definition(w[0], scheme, 16)
    out = quant.matmul(jnp.asarray(x), quant.QArray(q[0], scale[0], scheme, 16))
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", ["fp8", "int8", "int4"])
def test_quantize_at_load_equals_quantize_at_conversion(tiny_model, tmp_path, scheme):
    hf, hf_dir, path = tiny_model("scout")
    scope = "ffn" if scheme == "int4" else "experts"
    result = run_converter(hf_dir, tmp_path / "q", "--dtype", "float32", "--quantization",
                           scheme, "--quantization-scope", scope)
    assert result.returncode == 0, result.stderr
    # int4 groups of the default 128 cover the tiny model's 64 / 48 rows in one short group
    at_load = jaxllm.load_model(path, quantization=scheme, quantization_scope=scope)
    converted = jaxllm.load_model(tmp_path / "q")
    ids = _ids()
    np.testing.assert_array_equal(at_load.logits(ids), converted.logits(ids))
    plain = jaxllm.load_model(path).logits(ids)
    assert _rel(at_load.logits(ids), plain) > 1e-4  # the weights really changed
    with pytest.raises(ValueError, match="is quantized as"):
        jaxllm.load_model(tmp_path / "q", quantization="int8" if scheme != "int8" else "fp8")


# ---- Bad input: refused before anything is written, naming the tensor --------------------


def _broken_copy(src, dst, edit):
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def _rewrite_tensors(directory, change):
    from safetensors.torch import load_file, save_file

    for file in directory.glob("*.safetensors"):
        tensors = load_file(str(file))
        change(tensors)
        save_file(tensors, str(file), metadata={"format": "pt"})


def _refused(hf_dir, out, match):
    result = run_converter(hf_dir, out, "--dtype", "float32")
    assert result.returncode == 1
    assert match in result.stderr, result.stderr
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.partial-*"))


SCALE = "model.layers.2.feed_forward.experts.3.down_proj.weight_scale"


def test_missing_scale_is_refused_naming_it(compressed, tmp_path):
    _, hf_dir, _ = compressed("scout", "int4")
    broken = _broken_copy(hf_dir, tmp_path / "hf",
                          lambda d: _rewrite_tensors(d, lambda t: t.pop(SCALE, None)))
    _refused(broken, tmp_path / "out", f"tensor {SCALE} is missing")


def test_mismatched_shape_is_refused_naming_it(compressed, tmp_path):
    _, hf_dir, _ = compressed("scout", "fp8", scale=0.05)

    def cut(tensors):
        if SCALE in tensors:
            tensors[SCALE] = tensors[SCALE][:-1]

    broken = _broken_copy(hf_dir, tmp_path / "hf", lambda d: _rewrite_tensors(d, cut))
    _refused(broken, tmp_path / "out", f"tensor {SCALE} has shape (63, 1), expected (64, 1)")


def test_unknown_scheme_is_refused_naming_it(compressed, tmp_path):
    _, hf_dir, _ = compressed("scout", "int8")

    def asymmetric(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] = False
        (d / "config.json").write_text(json.dumps(cfg))

    _refused(_broken_copy(hf_dir, tmp_path / "hf", asymmetric), tmp_path / "out",
             "quantization_config.config_groups.group_0")

    def nvfp4(d):
        cfg = json.loads((d / "config.json").read_text())
        weights = cfg["quantization_config"]["config_groups"]["group_0"]["weights"]
        weights.update(type="float", num_bits=4, strategy="tensor_group")
        (d / "config.json").write_text(json.dumps(cfg))

    _refused(_broken_copy(hf_dir, tmp_path / "hf2", nvfp4), tmp_path / "out",
             "unknown scheme")


def test_unpacking_equals_compressed_tensors():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from jaxllm.weights.quant_checkpoint import unpack_int32

    rng = np.random.default_rng(0)
    for bits, cols in ((4, 64), (4, 37), (8, 40)):
        values = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), (6, cols)).astype(np.int8)
        packed = pack_to_int32(torch.from_numpy(values), bits).numpy()
        np.testing.assert_array_equal(unpack_int32(packed, bits, cols), values)


def test_the_model_dtype_stays_for_attention_and_router(compressed):
    _, _, path = compressed("scout", "int4")
    params = jaxllm.load_model(path).params["layers"][0]
    assert params["attn"]["wq"].dtype == jnp.float32
    assert params["ffn"]["router"].dtype == jnp.float32
    assert jax.tree.leaves(params["ffn"]["shared"]["down"])[0].dtype in (jnp.int4, jnp.float32)
