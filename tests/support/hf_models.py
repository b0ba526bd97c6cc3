"""Tiny random Llama 4 models built with HF transformers, saved like real checkpoints.

Used by the tests, the quickstart and the benchmarks; needs the `test` extra (torch,
transformers). They are imported inside the functions that use them, so importing this
module (or anything in the runtime package) never loads them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BASE: dict[str, Any] = dict(
    vocab_size=333,  # deliberately divisible by none of 2, 4, 8
    hidden_size=64,
    intermediate_size=48,
    intermediate_size_mlp=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=4,
    num_experts_per_tok=1,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    attention_chunk_size=16,
    attn_temperature_tuning=True,
    floor_scale=8,
    attn_scale=0.5,
)

SCOUT_LIKE: dict[str, Any] = dict(
    BASE, interleave_moe_layer_step=1, use_qk_norm=True,
    rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=16.0,
                         low_freq_factor=1.0, high_freq_factor=4.0,
                         original_max_position_embeddings=64),
)
MAVERICK_LIKE: dict[str, Any] = dict(
    BASE, interleave_moe_layer_step=2, use_qk_norm=False,
    rope_parameters=dict(rope_type="default", rope_theta=500000.0),
)


def make_text_model(overrides: dict[str, Any], seed: int = 0, scale: float = 0.2) -> Any:
    """A random HF ``Llama4ForCausalLM`` of config ``overrides``."""
    import torch
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(seed)
    config = Llama4TextConfig(**overrides)
    model = Llama4ForCausalLM(config).eval()
    _randomize(model, scale)
    return model


# A vision tower HF can run: 28-pixel tiles of 4 x 4 patches of 7 pixels, pixel shuffle to
# 4 features per tile; the MLP width is hidden / ratio**2 (HF feeds the shuffled patches to
# a layer of intermediate_size); the adapter and projector widths chain (48 -> 48 -> text).
TINY_VISION: dict[str, Any] = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
    image_size=28, patch_size=7, vision_output_dim=48, projector_input_dim=48,
    projector_output_dim=48, pixel_shuffle_ratio=0.5, rope_parameters=dict(rope_theta=10000.0))


# The image special tokens of tiny multimodal models: ids inside the tiny vocabulary (the
# real ones, 200080-200092, are not).
TINY_IMAGE_TOKENS: dict[str, int] = {
    "<|image_start|>": 320, "<|image_end|>": 321, "<|tile_x_separator|>": 322,
    "<|tile_y_separator|>": 323, "<|image|>": 324, "<|patch|>": 325}


def make_multimodal_model(text: dict[str, Any], seed: int = 0) -> Any:
    """A random HF ``Llama4ForConditionalGeneration`` whose text model has config ``text``."""
    import torch
    from transformers import Llama4Config as HFLlama4Config
    from transformers import Llama4ForConditionalGeneration

    torch.manual_seed(seed)
    config = HFLlama4Config(text_config=text, vision_config=TINY_VISION,
                            image_token_index=TINY_IMAGE_TOKENS["<|patch|>"],
                            boi_token_index=TINY_IMAGE_TOKENS["<|image_start|>"],
                            eoi_token_index=TINY_IMAGE_TOKENS["<|image_end|>"])
    model = Llama4ForConditionalGeneration(config).eval()
    _randomize(model)
    return model


def _randomize(model: Any, scale: float = 0.2) -> None:
    """HF initialises norms to 1 and expert weights to 0; randomise all so each one matters.

    A weight scale of 0.2 gives varied greedy continuations (smaller ones repeat a token)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(scale * torch.randn_like(p))


def save(model: Any, directory: Path, shard_size: str = "40KB") -> Path:
    model.save_pretrained(directory, max_shard_size=shard_size, safe_serialization=True)
    return directory


# compressed-tensors schemes of the published Llama 4 checkpoints (FP8-dynamic, w8a16,
# w4a16), as LLM Compressor writes them: (weights, input_activations, format).
COMPRESSED_SCHEMES: dict[str, tuple[dict, dict | None, str]] = {
    "fp8": (dict(num_bits=8, type="float", strategy="channel", symmetric=True),
            dict(num_bits=8, type="float", strategy="token", dynamic=True, symmetric=True),
            "float-quantized"),
    "int8": (dict(num_bits=8, type="int", strategy="channel", symmetric=True), None,
             "pack-quantized"),
    "int4": (dict(num_bits=4, type="int", strategy="group", symmetric=True), None,
             "pack-quantized"),
}
COMPRESSED_IGNORE = ["re:.*self_attn.*", "re:.*router", "lm_head"]


def save_compressed(model: Any, directory: Path, scheme: str, group_size: int = 16,
                    ignore: list[str] | None = None) -> Path:
    """Quantizes ``model`` (a text ``Llama4ForCausalLM``) with the compressed-tensors library
    and saves it as LLM Compressor would: routed experts as one Linear set per expert (the
    layout HF transformers loads them in), weight scales from each row's (group's) min / max
    (``calculate_qparams``), the scheme of ``COMPRESSED_SCHEMES[scheme]`` on every Linear but
    ``ignore``. The model is changed in place."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers.quantizers.base import SequentialLlama4TextExperts

    F = model.config.intermediate_size
    for layer in model.model.layers:
        fused = getattr(layer.feed_forward, "experts", None)
        if fused is None:
            continue
        experts = SequentialLlama4TextExperts(model.config)
        with torch.no_grad():
            for e, mlp in enumerate(experts):
                mlp.gate_proj.weight.copy_(fused.gate_up_proj[e, :, :F].T)
                mlp.up_proj.weight.copy_(fused.gate_up_proj[e, :, F:].T)
                mlp.down_proj.weight.copy_(fused.down_proj[e].T)
        layer.feed_forward.experts = experts
    weights, acts, fmt = COMPRESSED_SCHEMES[scheme]
    if weights["strategy"] == "group":
        weights = dict(weights, group_size=group_size)
    args = QuantizationArgs(**weights)
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(
            targets=["Linear"], weights=args,
            input_activations=None if acts is None else QuantizationArgs(**acts))},
        ignore=COMPRESSED_IGNORE if ignore is None else ignore)
    apply_quantization_config(model, config, show_progress=False)
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "quantization_scheme", None) is None:
                continue
            w = module.weight
            if args.strategy == "group":
                w = w.reshape(w.shape[0], -1, args.group_size)
                low, high = w.amin(-1), w.amax(-1)
            else:
                low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
            scale, _ = calculate_qparams(low, high, args)
            module.weight_scale.copy_(scale)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(directory, safe_serialization=True)
    compressor.update_config(str(directory))
    return directory


def load_compressed(directory: Path) -> Any:
    """HF transformers' own load of a compressed-tensors checkpoint (float32, dequantized
    weights; FP8 activations quantized per token by compressed-tensors at run time)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def hf_logits(model: Any, ids: list[list[int]]) -> Any:
    """HF's float32 logits. A multimodal model runs its own text model (``language_model``):
    text-only input takes exactly that path, and transformers 5.x's multimodal forward fails
    on outputs without images."""
    import torch
    from transformers import Llama4ForConditionalGeneration

    if isinstance(model, Llama4ForConditionalGeneration):
        model = model.language_model
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), use_cache=False).logits.float().numpy()


def hf_image_inputs_embeds(model: Any, ids: list[list[int]], pixel_values: Any) -> Any:
    """The text model's input embeddings for ``ids`` with images, built by HF's own parts the
    way ``Llama4ForConditionalGeneration.forward`` builds them (embed, vision tower,
    projector, ``get_placeholder_mask`` + ``masked_scatter``). The forward itself fails in
    transformers 5.24 ("'MoeCausalLMOutputWithPast' object has no attribute
    'image_outputs'", also from ``generate``), so references run ``language_model`` on these."""
    import torch

    with torch.no_grad():
        input_ids = torch.tensor(ids)
        embeds = model.get_input_embeddings()(input_ids)
        features = model.vision_model(torch.as_tensor(pixel_values)).last_hidden_state
        projected = model.multi_modal_projector(features.reshape(-1, features.shape[-1]))
        mask = model.get_placeholder_mask(input_ids, inputs_embeds=embeds,
                                          image_features=projected)
        return embeds.masked_scatter(mask, projected.to(embeds.dtype))


def hf_image_logits(model: Any, ids: list[list[int]], pixel_values: Any) -> Any:
    """HF's float32 logits for ``ids`` whose ``<|patch|>`` tokens take ``pixel_values``'s
    features (all prompts' tiles, in prompt order)."""
    import torch

    embeds = hf_image_inputs_embeds(model, ids, pixel_values)
    with torch.no_grad():
        return model.language_model(inputs_embeds=embeds, use_cache=False).logits.float().numpy()


def hf_image_generate(model: Any, ids: list[int], pixel_values: Any, max_new_tokens: int
                      ) -> list[int]:
    """HF's greedy continuation of one prompt with images (new tokens only)."""
    import torch

    embeds = hf_image_inputs_embeds(model, [ids], pixel_values)
    with torch.no_grad():
        out = model.language_model.generate(inputs_embeds=embeds, max_new_tokens=max_new_tokens,
                                            do_sample=False)
    return out[0].tolist()


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} "
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]


def save_word_tokenizer(directory: Path, vocab_size: int, images: bool = False) -> None:
    """A whitespace word-level tokenizer over ``vocab_size`` ids (specials, then words
    ``w7``, ``w8``, ...) with a chat template, saved as HF tokenizer files. ``images``: the
    ids of ``TINY_IMAGE_TOKENS`` are Llama 4's image special tokens instead of words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL), vocab_size)})
    named = TINY_IMAGE_TOKENS if images else {}
    for name, i in named.items():
        del vocab[f"w{i}"]
        vocab[name] = i
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer.add_special_tokens(SPECIAL + list(named))
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
              "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
