"""Calibrated FP8 KV cache scales (compressed-tensors' ``kv_cache_scheme``: per layer
``self_attn.k_scale`` / ``v_scale``) against HF transformers with its keys and values
fake-quantized by the definition: the cache holds e4m3(clip(k / k_scale, +-448)), attention
reads it times k_scale (the same for v)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import jaxllm
from jaxllm.weights.quant_checkpoint import QuantCheckpointError, read_config
from tests.support import hf_models

from ..conftest import run_converter

pytestmark = pytest.mark.heavy  # end to end: compiles engines or models (tests/conftest.py)

KV_SCHEME = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
             "symmetric": True}


def _scales(num_layers: int) -> list[tuple[float, float]]:
    # Not powers of two (a power of two would round like a unit scale), some small enough
    # that |k| / scale saturates at 448.
    # float32 values: what the checkpoint stores.
    return [(float(np.float32(0.0137 * (i + 1))), float(np.float32(0.0091 * (i + 2))))
            for i in range(num_layers)]


def _add_kv_scales(hf_dir, scales) -> None:
    """Writes ``kv_cache_scheme`` and each layer's scales as compressed-tensors stores them
    (float tensors of shape [1] on the attention module)."""
    path = hf_dir / "config.json"
    cfg = json.loads(path.read_text())
    cfg["quantization_config"]["kv_cache_scheme"] = KV_SCHEME
    path.write_text(json.dumps(cfg))
    (file,) = hf_dir.glob("*.safetensors")
    tensors = load_file(file)
    for i, (k, v) in enumerate(scales):
        tensors[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor([k])
        tensors[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor([v])
    save_file(tensors, file, metadata={"format": "pt"})


def _fake_quant(x: torch.Tensor, scale: float) -> torch.Tensor:
    q = (x / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q.to(x.dtype) * scale


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    root = tmp_path_factory.mktemp("kv_scales")
    hf = hf_models.make_text_model(dict(hf_models.SCOUT_LIKE), seed=11, scale=0.2)
    hf_models.save_compressed(hf, root / "hf", "int8")
    hf = hf_models.load_compressed(root / "hf")
    scales = _scales(hf.config.num_hidden_layers)
    _add_kv_scales(root / "hf", scales)
    result = run_converter(root / "hf", root / "jaxllm", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    return hf, scales, root


def test_fp8_kv_cache_uses_the_checkpoint_scales(calibrated, monkeypatch):
    from transformers.models.llama4 import modeling_llama4

    hf, scales, root = calibrated
    manifest = json.loads((root / "jaxllm" / "jaxllm_checkpoint.json").read_text())
    assert manifest["kv_cache_scales"] == [list(s) for s in scales]

    real = modeling_llama4.eager_attention_forward

    def fake_quantized(module, query, key, value, *args, **kwargs):
        k_scale, v_scale = scales[module.layer_idx]
        return real(module, query, _fake_quant(key, k_scale), _fake_quant(value, v_scale),
                    *args, **kwargs)

    monkeypatch.setattr(modeling_llama4, "eager_attention_forward", fake_quantized)
    hf.config._attn_implementation = "eager"
    ids = np.random.default_rng(0).integers(0, 333, (2, 40)).tolist()
    ref = np.asarray(hf_models.hf_logits(hf, ids))
    monkeypatch.setattr(modeling_llama4, "eager_attention_forward", real)
    plain_ref = np.asarray(hf_models.hf_logits(hf, ids))

    model = jaxllm.load_model(root / "jaxllm", kv_cache_dtype="fp8", max_model_len=64,
                              page_size=8, max_num_seqs=4)
    ours = np.asarray(model.logits(ids))
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    # The e4m3 rounding itself moves the logits by far more: the test sees a wrong scale.
    moved = np.abs(plain_ref - ref).max() / np.abs(ref).max()
    assert err < 1e-4 < moved / 10, (err, moved)
    # A model-dtype cache needs no scales and ignores them.
    plain = jaxllm.load_model(root / "jaxllm").logits(ids)
    assert np.abs(np.asarray(plain) - plain_ref).max() / np.abs(plain_ref).max() < 1e-4


@pytest.mark.parametrize("scheme", [
    dict(KV_SCHEME, strategy="channel"), dict(KV_SCHEME, dynamic=True),
    dict(KV_SCHEME, type="int"), dict(KV_SCHEME, symmetric=False)])
def test_unsupported_kv_cache_schemes_are_refused(scheme):
    config = {"quantization_config": {
        "quant_method": "compressed-tensors", "kv_cache_scheme": scheme,
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True}}}}}
    with pytest.raises(QuantCheckpointError, match="kv_cache_scheme"):
        read_config(config)
