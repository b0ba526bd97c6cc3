"""Llama4Config.from_hf against HF's own config class and hand-written configs."""

from __future__ import annotations

import copy
import dataclasses
import re

import pytest
from transformers import Llama4TextConfig

from jaxllm.config import Llama4Config, RopeScaling, rope_inverse_frequencies
from tests.support import hf_models


def _text_dict(**overrides) -> dict:
    return Llama4TextConfig(**dict(hf_models.SCOUT_LIKE, **overrides)).to_dict()


@pytest.mark.parametrize("layers,step,interval", [(4, 1, 4), (8, 2, 4), (6, 3, 2), (5, 1, 3)])
def test_per_layer_facts_match_hf(layers, step, interval):
    hf = Llama4TextConfig(**dict(hf_models.SCOUT_LIKE, num_hidden_layers=layers,
                                 interleave_moe_layer_step=step, no_rope_layer_interval=interval))
    ours = Llama4Config.from_hf(hf.to_dict())
    for i in range(layers):
        assert ours.is_moe(i) == (i in hf.moe_layers)
        assert ours.uses_rope(i) == bool(hf.no_rope_layers[i])
        assert (ours.chunk_size(i) is not None) == (hf.layer_types[i] == "chunked_attention")


def test_derived_defaults_without_explicit_lists():
    raw = _text_dict(num_hidden_layers=8, interleave_moe_layer_step=2)
    for key in ("no_rope_layers", "moe_layers", "layer_types"):
        raw.pop(key)
    c = Llama4Config.from_hf(raw)
    assert c.moe_layers == (1, 3, 5, 7)
    assert c.rope_layers == (True, True, True, False) * 2  # every 4th layer is NoPE
    assert [c.chunk_size(i) for i in range(4)] == [16, 16, 16, None]


def test_multimodal_config_reads_text_config():
    text = _text_dict()
    mm = {"model_type": "llama4", "text_config": text, "vision_config": hf_models.TINY_VISION}
    ours = Llama4Config.from_hf(mm)
    assert dataclasses.replace(ours, vision=None) == Llama4Config.from_hf(text)
    assert Llama4Config.from_hf(text).vision is None


# The vision_config of the released Scout checkpoint (its config.json), and the ids of its
# image tokens.
SCOUT_VISION = dict(hidden_size=1408, num_hidden_layers=34, num_attention_heads=16,
                    intermediate_size=5632, image_size=336, patch_size=14,
                    pixel_shuffle_ratio=0.5, projector_input_dim=4096, projector_output_dim=4096,
                    vision_output_dim=4096, rope_theta=10000, hidden_act="gelu", num_channels=3)


def test_scout_vision_config():
    mm = {"model_type": "llama4", "text_config": _text_dict(hidden_size=5120),
          "vision_config": SCOUT_VISION, "image_token_index": 200092}
    v = Llama4Config.from_hf(mm).vision
    assert (v.head_dim, v.patches_per_side, v.num_patches, v.tokens_per_tile) == (88, 24, 576, 144)
    assert (v.shuffled_dim, v.text_hidden_size, v.rope_theta) == (5632, 5120, 10000.0)
    assert v.image_token_id == 200092


@pytest.mark.parametrize("change,message", [
    (dict(intermediate_size=4096), "intermediate_size=4096 must equal"),
    (dict(vision_output_dim=7680), "vision_output_dim=7680"),
    (dict(image_size=330), "image_size=330 is not a multiple of patch_size=14"),
    (dict(num_attention_heads=15), "num_attention_heads=15"),
    (dict(num_attention_heads=64), "num_attention_heads=64"),  # head_dim 22: not 4k
    (dict(hidden_act="silu"), "unsupported vision hidden_act 'silu'"),
    (dict(image_size=[336, 448]), "only square sizes"),
])
def test_vision_configs_hf_cannot_run_are_refused(change, message):
    mm = {"model_type": "llama4", "text_config": _text_dict(),
          "vision_config": dict(SCOUT_VISION, **change)}
    with pytest.raises(ValueError, match=re.escape(message)):
        Llama4Config.from_hf(mm)


def test_both_rope_spellings_agree():
    new = _text_dict()
    old = copy.deepcopy(new)
    params = old.pop("rope_parameters")
    old["rope_theta"] = params.pop("rope_theta")
    old["rope_scaling"] = params
    a, b = Llama4Config.from_hf(new), Llama4Config.from_hf(old)
    assert a == b
    assert a.rope_scaling == RopeScaling(16.0, 1.0, 4.0, 64)


def test_rope_frequencies_match_hf():
    import torch
    from transformers.models.llama4.modeling_llama4 import Llama4TextRotaryEmbedding

    for spec in (hf_models.SCOUT_LIKE, hf_models.MAVERICK_LIKE):
        hf = Llama4TextRotaryEmbedding(Llama4TextConfig(**spec)).inv_freq
        ours = torch.tensor(rope_inverse_frequencies(Llama4Config.from_hf(
            Llama4TextConfig(**spec).to_dict())), dtype=torch.float32)
        torch.testing.assert_close(ours, hf, rtol=1e-6, atol=0)


def test_no_rope_scaling_when_null():
    raw = _text_dict()
    raw.pop("rope_parameters")
    raw.update(rope_theta=10000.0, rope_scaling=None)
    c = Llama4Config.from_hf(raw)
    assert c.rope_scaling is None and c.rope_theta == 10000.0


@pytest.mark.parametrize("change,message", [
    (dict(model_type="llama"), "unsupported model_type 'llama'"),
    (dict(hidden_size=None), "missing required field(s) ['hidden_size']"),
    (dict(num_attention_heads=6, num_key_value_heads=4), "num_attention_heads=6 is not a multiple"),
    (dict(no_rope_layers=[1, 1]), "no_rope_layers has 2 entries"),
    (dict(rope_parameters=dict(rope_type="yarn", rope_theta=1.0, factor=2.0)),
     "unsupported rope type 'yarn'"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok=9"),
])
def test_bad_configs_are_refused_clearly(change, message):
    raw = _text_dict()
    raw.update(change)
    with pytest.raises(ValueError) as info:
        Llama4Config.from_hf(raw)
    assert message in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Llama4Config.from_hf(tmp_path)
