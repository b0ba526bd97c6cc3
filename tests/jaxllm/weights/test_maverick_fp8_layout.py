"""A tiny checkpoint in the layout of Meta's ``meta-llama/Llama-4-Maverick-17B-128E-Instruct-FP8``
converts and runs, against the definition (HF transformers on the dequantized weights, each
routed-expert GEMM input fake-quantized to e4m3 per token).

The layout, from public sources (the checkpoint itself could not be read here):
- ``quantization_config``: compressed-tensors, one group targeting ``Linear``: weights FP8
  (float, 8 bits) symmetric per ``channel``, static (minmax observer); input activations FP8
  symmetric per ``token``, dynamic; ``format`` ``float-quantized``. vLLM prints exactly these
  args for this checkpoint (https://github.com/vllm-project/vllm/issues/16474).
- Only the routed experts are quantized, stored one Linear set per expert:
  ``language_model.model.layers.{i}.feed_forward.experts.{e}.{gate,up,down}_proj.weight``
  (e4m3, ``[out, in]``) and ``.weight_scale`` (``[out, 1]``); attention, router, shared expert,
  dense FFN layers, lm_head and the vision tower stay bf16 (tpu-inference's Llama 4 loader
  maps ``weight_scale`` only for those per-expert tensors and stacks them, with the bf16
  names for the rest: tpu_inference/models/jax/llama4.py, ``EXPERT_MAPPINGS_UNFUSED``; Intel
  auto-round's recipe for the same model keeps router, shared_expert, the dense
  feed_forward and q/k/v/o in bf16: intel/auto-round run_llama4_quant.sh).
- The scale dtype is not confirmed by those sources: bf16 here (compressed-tensors stores
  the model dtype); the reader takes F32, BF16 and F16. The exact ``ignore`` list is not
  confirmed either: written here as patterns over the multimodal names.
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import jaxllm
from tests.support import hf_models

from ..conftest import run_converter

pytestmark = pytest.mark.heavy  # end to end: compiles engines or models (tests/conftest.py)

QUANTIZATION_CONFIG = {
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "quantization_status": "compressed",
    "kv_cache_scheme": None,
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel",
                    "dynamic": False, "observer": "minmax", "group_size": None},
        "input_activations": {"num_bits": 8, "type": "float", "symmetric": True,
                              "strategy": "token", "dynamic": True, "observer": None},
        "output_activations": None}},
    "ignore": ["re:.*self_attn.*", "re:.*router.*", "re:.*shared_expert.*",
               "re:.*feed_forward\\.(gate|up|down)_proj$", "re:vision_model.*",
               "re:multi_modal_projector.*", "language_model.lm_head"],
}


def _to_fp8_per_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``w [out, in]`` as e4m3 with one bf16 scale per out channel, and its dequantization."""
    scale = (np.abs(w).max(axis=1, keepdims=True) / 448.0).astype(ml_dtypes.bfloat16)
    q = np.clip(w / scale.astype(np.float32), -448, 448).astype(ml_dtypes.float8_e4m3fn)
    # C order: safetensors writes the array's memory as it is (w may be a transposed view).
    return np.ascontiguousarray(q), np.ascontiguousarray(scale)


def _write_meta_fp8_layout(hf_dir, config) -> dict[str, np.ndarray]:
    """Rewrites a saved multimodal checkpoint's fused routed experts as Meta's FP8 layout;
    returns the dequantized ``[E, D, 2F]`` / ``[E, F, D]`` tensors by their fused names."""
    text = config["text_config"]
    F = text["intermediate_size"]
    dequantized = {}
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    for file in sorted(hf_dir.glob("*.safetensors")):
        tensors = load_file(file)
        for name in [n for n in tensors if n.endswith(("experts.gate_up_proj",
                                                       "experts.down_proj"))]:
            fused = tensors.pop(name).astype(np.float32)
            del index["weight_map"][name]
            prefix = name.rsplit(".", 1)[0]
            parts = []
            for e in range(fused.shape[0]):
                if name.endswith("gate_up_proj"):
                    pieces = {"gate_proj": fused[e, :, :F].T, "up_proj": fused[e, :, F:].T}
                else:
                    pieces = {"down_proj": fused[e].T}
                deq = {}
                for proj, w in pieces.items():
                    q, scale = _to_fp8_per_channel(w)
                    base = f"{prefix}.{e}.{proj}"
                    tensors[base + ".weight"], tensors[base + ".weight_scale"] = q, scale
                    index["weight_map"][base + ".weight"] = file.name
                    index["weight_map"][base + ".weight_scale"] = file.name
                    deq[proj] = (q.astype(np.float32) * scale.astype(np.float32)).T
                parts.append(np.concatenate([deq["gate_proj"], deq["up_proj"]], axis=1)
                             if "gate_proj" in deq else deq["down_proj"])
            dequantized[name] = np.stack(parts)
        save_file(tensors, file, metadata={"format": "pt"})
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    config["quantization_config"] = QUANTIZATION_CONFIG
    (hf_dir / "config.json").write_text(json.dumps(config))
    return dequantized


def _fake_quant_rows(x: torch.Tensor) -> torch.Tensor:
    scale = x.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 448.0
    return (x / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).to(x.dtype) * scale


def _definition_forward(self, hidden_states):
    """HF's Llama4TextExperts.forward with each GEMM's input rows fake-quantized (W8A8)."""
    hidden_states = hidden_states.view(self.gate_up_proj.shape[0], -1, self.hidden_size)
    gate, up = torch.bmm(_fake_quant_rows(hidden_states), self.gate_up_proj).chunk(2, dim=-1)
    h = _fake_quant_rows(up * self.act_fn(gate))
    return torch.bmm(h, self.down_proj).view(-1, self.hidden_size)


@pytest.fixture(scope="module")
def meta_fp8(tmp_path_factory):
    root = tmp_path_factory.mktemp("maverick_fp8")
    hf = hf_models.make_multimodal_model(hf_models.MAVERICK_LIKE, seed=4)
    with torch.no_grad():  # small weights: out of the regime where one rounding flip grows
        for name, p in hf.named_parameters():
            if "norm" not in name:
                p.mul_(0.25)
    hf_models.save(hf, root / "hf", shard_size="200KB")
    config = json.loads((root / "hf" / "config.json").read_text())
    dequantized = _write_meta_fp8_layout(root / "hf", config)
    # HF's module names differ from the saved ones by the prefix (model.language_model.layers
    # vs language_model.model.layers): match from "layers." on.
    by_layer = {name[name.index("layers."):]: w for name, w in dequantized.items()}
    copied = 0
    with torch.no_grad():
        for name, p in hf.named_parameters():
            key = name[name.find("layers."):]
            if "layers." in name and key in by_layer:
                p.copy_(torch.from_numpy(by_layer[key]))
                copied += 1
    assert copied == len(dequantized) > 0
    result = run_converter(root / "hf", root / "jaxllm", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    return hf.float(), root


def test_meta_fp8_layout_converts_and_equals_the_definition(meta_fp8, monkeypatch):
    from transformers.models.llama4 import modeling_llama4

    hf, root = meta_fp8
    manifest = json.loads((root / "jaxllm" / "jaxllm_checkpoint.json").read_text())
    assert manifest["quantization"]["scheme"] == "fp8"
    assert manifest["quantization"]["targets"] == ["routed"]
    model = jaxllm.load_model(root / "jaxllm")
    ffn = model.params["layers"][1]["ffn"]
    assert ffn["gate"]["q"].dtype == np.dtype(ml_dtypes.float8_e4m3fn)
    assert model.params["layers"][0]["ffn"]["gate"].dtype == np.float32  # dense layer: bf16
    ids = np.random.default_rng(0).integers(0, 333, (2, 40)).tolist()
    plain = np.asarray(hf_models.hf_logits(hf, ids))
    monkeypatch.setattr(modeling_llama4.Llama4TextExperts, "forward", _definition_forward)
    ref = np.asarray(hf_models.hf_logits(hf, ids))
    ours = np.asarray(model.logits(ids))
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert rel < 1e-3, rel
    assert np.abs(plain - ref).max() / np.abs(ref).max() > 1e-3  # activation rounding shows


