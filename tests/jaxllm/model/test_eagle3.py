"""The EAGLE-3 head: a tiny random head written in the published checkpoint layouts, read by
the converter, against a pure-torch forward written from the definition (vLLM's EAGLE-3 math,
HF transformers' Llama RoPE and RMSNorm)."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from jaxllm.layout import contiguous_num_pages, decode_layout, prefill_layout
from jaxllm.model.eagle3 import Eagle3Config
from jaxllm.weights.eagle3 import load_eagle3
from jaxllm.weights.safetensors import ConversionError

D, H, K, HD, F = 64, 4, 2, 16, 96
VOCAB, DRAFT_VOCAB, TARGET_D = 50, 20, 48
ROPE = dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=8)
THETA = 10000.0
EPS = 1e-5


def _layer_config() -> dict:
    return dict(hidden_size=D, num_attention_heads=H, num_key_value_heads=K, head_dim=HD,
                intermediate_size=F, vocab_size=VOCAB, num_hidden_layers=1, rms_norm_eps=EPS,
                rope_theta=THETA, rope_scaling=ROPE, hidden_act="silu",
                max_position_embeddings=256, model_type="llama")


def _weights(seed: int, embedding: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    w = {
        "fc.weight": r(D, 3 * TARGET_D, scale=0.1),
        "layers.0.input_layernorm.weight": 1 + r(D),
        "layers.0.hidden_norm.weight": 1 + r(D),
        "layers.0.self_attn.q_proj.weight": r(H * HD, 2 * D),
        "layers.0.self_attn.k_proj.weight": r(K * HD, 2 * D),
        "layers.0.self_attn.v_proj.weight": r(K * HD, 2 * D),
        "layers.0.self_attn.o_proj.weight": r(D, H * HD),
        "layers.0.post_attention_layernorm.weight": 1 + r(D),
        "layers.0.mlp.gate_proj.weight": r(F, D),
        "layers.0.mlp.up_proj.weight": r(F, D),
        "layers.0.mlp.down_proj.weight": r(D, F),
        "norm.weight": 1 + r(D),
        "lm_head.weight": r(DRAFT_VOCAB, D),
    }
    # A reduced vocabulary: draft id i is target id i + d2t[i] (increasing, as trained heads'
    # frequency-sorted maps are); t2d marks the target ids that have a draft id.
    targets = torch.sort(torch.randperm(VOCAB, generator=g)[:DRAFT_VOCAB]).values
    w["d2t"] = targets - torch.arange(DRAFT_VOCAB)
    w["t2d"] = torch.zeros(VOCAB, dtype=torch.bool).index_fill(0, targets, True)
    if embedding:
        w["embed_tokens.weight"] = r(VOCAB, D, scale=1.0)
    return w


def _write(directory: Path, w: dict[str, torch.Tensor], layout: str, **extra) -> Path:
    """The NVIDIA / EAGLE layout (``midlayer.``, LlamaForCausalLMEagle3) or speculators'."""
    directory.mkdir(parents=True, exist_ok=True)
    if layout == "eagle":
        names = {k.replace("layers.0.", "midlayer."): v for k, v in w.items()}
        config = dict(_layer_config(), architectures=["LlamaForCausalLMEagle3"],
                      draft_vocab_size=DRAFT_VOCAB, target_hidden_size=TARGET_D,
                      eagle_config={"eagle_aux_hidden_state_layer_ids": [1, 3, 6],
                                    "use_aux_hidden_state": True}, **extra)
    else:
        names = dict(w)
        config = {"architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3",
                  "transformer_layer_config": _layer_config(), "draft_vocab_size": DRAFT_VOCAB,
                  "target_hidden_size": TARGET_D,
                  "speculators_config": {"algorithm": "eagle3",
                                         "proposal_methods": [{"speculative_tokens": 3}],
                                         "verifier": {"name_or_path": "x"}}, **extra}
    save_file({k: v.contiguous() for k, v in names.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def _reference(w, embeds, hidden, norm_before_residual: bool):
    """EAGLE-3 over one whole sequence (full causal attention), from the definition."""
    cfg = LlamaConfig(**_layer_config())

    def norm(name, x):
        n = LlamaRMSNorm(D, eps=EPS)
        n.weight.data = w[name].clone()
        return n(x)

    e = norm("layers.0.input_layernorm.weight", embeds)
    h = norm("layers.0.hidden_norm.weight", hidden)
    residual = h if norm_before_residual else hidden
    x = torch.cat([e, h], dim=-1)
    T = x.shape[0]
    q = (x @ w["layers.0.self_attn.q_proj.weight"].T).view(T, H, HD).transpose(0, 1)[None]
    k = (x @ w["layers.0.self_attn.k_proj.weight"].T).view(T, K, HD).transpose(0, 1)[None]
    v = (x @ w["layers.0.self_attn.v_proj.weight"].T).view(T, K, HD).transpose(0, 1)[None]
    cos, sin = LlamaRotaryEmbedding(cfg)(v, torch.arange(T)[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
    scores = (q @ k.transpose(-1, -2)) / HD**0.5
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), -torch.inf)
    attn = (scores.softmax(-1) @ v)[0].transpose(0, 1).reshape(T, H * HD)
    x = residual + attn @ w["layers.0.self_attn.o_proj.weight"].T
    m = norm("layers.0.post_attention_layernorm.weight", x)
    m = (torch.nn.functional.silu(m @ w["layers.0.mlp.gate_proj.weight"].T)
         * (m @ w["layers.0.mlp.up_proj.weight"].T)) @ w["layers.0.mlp.down_proj.weight"].T
    pre = x + m
    normed = norm("norm.weight", pre)
    return normed, pre, normed @ w["lm_head.weight"].T


def _np(x) -> np.ndarray:
    return np.asarray(x, np.float64)


@pytest.mark.heavy
@pytest.mark.parametrize("layout,norm_before_residual,embedding", [
    ("eagle", False, False), ("speculators", True, True)])
def test_forward_matches_the_definition(tmp_path, layout, norm_before_residual, embedding):
    """Two sequences through a prefill pass, then one draft step each on the cache, against
    the whole extended sequences in torch."""
    w = _weights(0, embedding)
    head = load_eagle3(_write(tmp_path / "head", w, layout,
                              norm_before_residual=norm_before_residual), dtype=jnp.float32)
    lengths, page_size, width = [5, 7], 4, 3
    g = torch.Generator().manual_seed(1)
    table = w.get("embed_tokens.weight", torch.randn(VOCAB, D, generator=g))  # else the target's
    seqs = [torch.randint(0, VOCAB, (n + 1,), generator=g) for n in lengths]
    aux = [torch.randn(n, 3 * TARGET_D, generator=g) for n in lengths]

    cache = (jnp.zeros((contiguous_num_pages(1, 2, width), page_size, K, HD), jnp.float32),) * 2
    row, meta = prefill_layout(jnp.asarray(lengths), max(lengths), width, page_size)
    meta = meta.for_group(0)
    rows = 2 * max(lengths)  # the last two rows are padding
    flat_tokens = np.zeros(rows, np.int64)
    flat_aux = np.zeros((rows, 3 * TARGET_D), np.float32)
    for b, n in enumerate(lengths):
        at = np.asarray(row[b, :n])
        flat_tokens[at], flat_aux[at] = seqs[b][:n].numpy(), aux[b].numpy()
    embeds = (head.embed_tokens(jnp.asarray(flat_tokens)) if embedding
              else jnp.asarray(table.numpy()[flat_tokens]))
    fused = head.combine(jnp.asarray(flat_aux))
    normed, pre, cache = head(embeds, fused, cache, meta)

    step = decode_layout(jnp.asarray(lengths), jnp.ones(2, bool), width, page_size)
    step = step.for_group(0)
    last = jnp.asarray([int(row[b, n - 1]) for b, n in enumerate(lengths)])
    new_tokens = np.asarray([int(s[-1]) for s in seqs])
    step_embeds = (head.embed_tokens(jnp.asarray(new_tokens)) if embedding
                   else jnp.asarray(table.numpy()[new_tokens]))
    normed2, pre2, _ = head(step_embeds, pre[last], cache, step)

    with torch.no_grad():
        for b, n in enumerate(lengths):
            at = np.asarray(row[b, :n])
            fused_b = torch.from_numpy(np.array(fused[at]))
            # The draft step fed the prefill's last pre back in place of the fused state.
            hidden = torch.cat([fused_b, torch.from_numpy(np.array(pre[last[b]]))[None]])
            want_normed, want_pre, want_logits = _reference(w, table[seqs[b]], hidden,
                                                            norm_before_residual)
            np.testing.assert_allclose(_np(fused_b), _np(aux[b] @ w["fc.weight"].T), atol=1e-4)
            np.testing.assert_allclose(_np(pre[at]), _np(want_pre[:n]), atol=1e-4)
            np.testing.assert_allclose(_np(head.logits(normed[at])), _np(want_logits[:n]),
                                       atol=1e-4)
            np.testing.assert_allclose(_np(normed2[b]), _np(want_normed[n]), atol=1e-4)
            np.testing.assert_allclose(_np(pre2[b]), _np(want_pre[n]), atol=1e-4)


def test_vocabulary_map_and_target_logits(tmp_path):
    w = _weights(2, embedding=False)
    head = load_eagle3(_write(tmp_path / "head", w, "eagle"), dtype=jnp.float32)
    ids = jnp.arange(DRAFT_VOCAB)
    targets = np.asarray(head.to_target(ids))
    np.testing.assert_array_equal(targets, (torch.arange(DRAFT_VOCAB) + w["d2t"]).numpy())
    assert np.all(w["t2d"].numpy()[targets])  # every draft id lands on a mapped target id
    normed = jnp.asarray(np.random.default_rng(0).normal(size=(3, D)), jnp.float32)
    draft = np.asarray(head.logits(normed))
    full = np.asarray(head.target_logits(normed, VOCAB))
    np.testing.assert_allclose(full[:, targets], draft, atol=1e-6)
    assert np.all(np.isneginf(np.delete(full, targets, axis=1)))


def test_config_layouts_and_auxiliary_layers(tmp_path):
    w = _weights(3, embedding=False)
    eagle = Eagle3Config.from_hf(_write(tmp_path / "a", w, "eagle"))
    spec = Eagle3Config.from_hf(_write(tmp_path / "b", w, "speculators"))
    assert eagle.aux_layers(48) == (1, 3, 6)
    assert spec.aux_layers(48) == (2, 24, 45)  # vLLM's default (2, L // 2, L - 3)
    assert spec.num_speculative_tokens == 3 and eagle.num_speculative_tokens is None
    for c in (eagle, spec):
        assert (c.draft_vocab_size, c.vocab_size, c.target_hidden_size) == (DRAFT_VOCAB, VOCAB,
                                                                            TARGET_D)
        assert c.rope_scaling is not None and c.rope_scaling.factor == 4.0
    with pytest.raises(ValueError, match=r"\[6\] outside \[0, 5\)"):
        eagle.aux_layers(5)


@pytest.mark.parametrize("change,message", [
    (lambda w: w.pop("layers.0.mlp.up_proj.weight"), "layers.0.mlp.up_proj.weight"),
    (lambda w: w.__setitem__("fc.weight", torch.zeros(D, 2 * TARGET_D)), r"fc.weight has shape"),
    (lambda w: w.__setitem__("d2t", w["d2t"] + VOCAB), "outside the vocabulary of 50"),
])
def test_bad_checkpoints_name_the_tensor(tmp_path, change, message):
    w = _weights(4, embedding=False)
    change(w)
    with pytest.raises(ConversionError, match=message):
        load_eagle3(_write(tmp_path / "head", w, "eagle"), dtype=jnp.float32)


@pytest.mark.parametrize("field,value,message", [
    ("num_hidden_layers", 2, "num_hidden_layers=2"),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("eagle_config", {"eagle_aux_hidden_state_layer_ids": [1, 2]}, r"\[1, 2\]: expected 3"),
])
def test_bad_configs_name_the_value(field, value, message):
    raw = dict(_layer_config(), draft_vocab_size=DRAFT_VOCAB, **{field: value})
    with pytest.raises(ValueError, match=message):
        Eagle3Config.from_hf(raw)
