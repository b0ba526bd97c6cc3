"""Llama 4 configuration, read from a Hugging Face ``config.json``: the text model, and the
vision tower of a multimodal (``Llama4ForConditionalGeneration``) checkpoint."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama4_text", "llama4")
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "intermediate_size")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style frequency scaling (``rope_type: llama3``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The vision tower, its pixel-shuffle adapter and the projector into the text model.

    Read from ``vision_config`` (and the image token ids at the config's top level). HF's
    vision LayerNorms ignore ``norm_eps`` (``nn.LayerNorm`` defaults, eps 1e-5), so do we.
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int  # encoder MLP; also the adapter's input width (hidden / ratio**2)
    image_size: int  # the side of one square tile, in pixels
    patch_size: int
    num_channels: int
    pixel_shuffle_ratio: float
    projector_input_dim: int  # the adapter's fc1 output
    projector_output_dim: int  # the adapter's fc2 input and output
    vision_output_dim: int  # the projector's input (equals projector_output_dim)
    rope_theta: float
    text_hidden_size: int
    image_token_id: int  # <|patch|>: the rows that take image features
    layer_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patches of one tile (the class token is one more)."""
        return self.patches_per_side ** 2

    @property
    def tokens_per_tile(self) -> int:
        """``<|patch|>`` tokens (projected features) per tile after the pixel shuffle."""
        return round(self.num_patches * self.pixel_shuffle_ratio ** 2)

    @property
    def shuffled_dim(self) -> int:
        return round(self.hidden_size / self.pixel_shuffle_ratio ** 2)

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any], text_hidden_size: int) -> VisionConfig:
        """From a multimodal config dict (``vision_config`` plus the top-level token ids)."""
        v = raw["vision_config"]
        act = v.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"unsupported vision hidden_act {act!r}: Llama 4 uses 'gelu'")
        rope = v.get("rope_parameters") or {}
        config = cls(
            hidden_size=int(v.get("hidden_size", 768)),
            num_layers=int(v.get("num_hidden_layers", 34)),
            num_heads=int(v.get("num_attention_heads", 16)),
            intermediate_size=int(v.get("intermediate_size", 5632)),
            image_size=_side(v.get("image_size", 448), "image_size"),
            patch_size=_side(v.get("patch_size", 14), "patch_size"),
            num_channels=int(v.get("num_channels", 3)),
            pixel_shuffle_ratio=float(v.get("pixel_shuffle_ratio", 0.5)),
            projector_input_dim=int(v.get("projector_input_dim", 4096)),
            projector_output_dim=int(v.get("projector_output_dim", 4096)),
            vision_output_dim=int(v.get("vision_output_dim", 7680)),
            rope_theta=float(rope.get("rope_theta", v.get("rope_theta", 10000.0))),
            text_hidden_size=text_hidden_size,
            image_token_id=int(raw.get("image_token_index", raw.get("image_token_id", 200092))),
        )
        config.check()
        return config

    def check(self) -> None:
        """Raises ValueError for sizes HF's vision model cannot run either."""
        if self.hidden_size % self.num_heads or self.head_dim % 4:
            raise ValueError(f"vision hidden_size={self.hidden_size} / num_attention_heads="
                             f"{self.num_heads} must be a head_dim divisible by 4 (2-D RoPE)")
        if self.image_size % self.patch_size:
            raise ValueError(f"vision image_size={self.image_size} is not a multiple of "
                             f"patch_size={self.patch_size}")
        side, r = self.patches_per_side, self.pixel_shuffle_ratio
        if not (side * r).is_integer() or not (self.hidden_size / r ** 2).is_integer():
            raise ValueError(f"pixel_shuffle_ratio={r} does not divide {side} patches per side "
                             f"and hidden_size={self.hidden_size} evenly")
        if self.intermediate_size != self.shuffled_dim:
            raise ValueError(f"vision intermediate_size={self.intermediate_size} must equal "
                             f"hidden_size / pixel_shuffle_ratio**2 = {self.shuffled_dim}: HF "
                             f"feeds the pixel-shuffled features to a layer of that width")
        if not self.vision_output_dim == self.projector_output_dim == self.projector_input_dim:
            raise ValueError(f"vision_output_dim={self.vision_output_dim}, projector_input_dim="
                             f"{self.projector_input_dim} and projector_output_dim="
                             f"{self.projector_output_dim} must be equal (HF chains them)")


def _side(value: Any, name: str) -> int:
    """A square size given as an int or as [h, w]."""
    if isinstance(value, list | tuple):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"vision {name}={value!r}: only square sizes are supported")
        value = value[0]
    return int(value)


@dataclasses.dataclass(frozen=True)
class Llama4Config:
    """Everything the text model needs; per-layer facts are methods, not copies."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # routed experts and the shared expert
    intermediate_size_mlp: int  # dense (non-MoE) layers
    num_experts: int
    num_experts_per_tok: int
    moe_layers: tuple[int, ...]
    rope_layers: tuple[bool, ...]  # HF ``no_rope_layers``: 1 means the layer USES RoPE
    chunked_layers: tuple[bool, ...]  # layers with chunked local attention
    attention_chunk_size: int | None
    rope_theta: float
    rope_scaling: RopeScaling | None
    use_qk_norm: bool
    attn_temperature_tuning: bool
    floor_scale: float
    attn_scale: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool
    max_position_embeddings: int
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    vision: VisionConfig | None = None  # None: a text-only model (or --text-only checkpoint)

    def uses_rope(self, layer: int) -> bool:
        return self.rope_layers[layer]

    def is_moe(self, layer: int) -> bool:
        return layer in self.moe_layers

    def uses_qk_norm(self, layer: int) -> bool:
        return self.use_qk_norm and self.uses_rope(layer)

    def uses_temperature_tuning(self, layer: int) -> bool:
        return self.attn_temperature_tuning and not self.uses_rope(layer)

    def chunk_size(self, layer: int) -> int | None:
        """The local-attention chunk of ``layer``, or None for full causal attention."""
        return self.attention_chunk_size if self.chunked_layers[layer] else None

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, source: str | Path | Mapping[str, Any]) -> Llama4Config:
        """Builds the config from a checkpoint directory, a ``config.json`` path or its dict.

        Accepts text-only (``llama4_text``) and multimodal (``llama4``, text under
        ``text_config``, the vision tower under ``vision_config``) configs, and both RoPE
        spellings (``rope_scaling`` + ``rope_theta``, or ``rope_parameters``).
        """
        raw = _read_json(source) if not isinstance(source, Mapping) else dict(source)
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}: jaxllm supports {SUPPORTED_MODEL_TYPES}")
        text = raw
        if model_type == "llama4":
            if not isinstance(raw.get("text_config"), Mapping):
                raise ValueError("multimodal llama4 config has no 'text_config' section")
            text = dict(raw["text_config"])
        missing = [k for k in _REQUIRED if text.get(k) is None]
        if missing:
            raise ValueError(f"config is missing required field(s) {missing}")

        num_layers = int(text["num_hidden_layers"])
        num_heads = int(text["num_attention_heads"])
        num_kv_heads = int(text.get("num_key_value_heads") or num_heads)
        if num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(
                f"num_attention_heads={num_heads} is not a multiple of "
                f"num_key_value_heads={num_kv_heads}")
        head_dim = int(text.get("head_dim") or text["hidden_size"] // num_heads)
        if head_dim % 2:
            raise ValueError(f"head_dim={head_dim} must be even for RoPE")

        rope_layers = _rope_layers(text, num_layers)
        chunk = text.get("attention_chunk_size")
        chunk = int(chunk) if chunk else None
        chunked = _chunked_layers(text, rope_layers, chunk)
        theta, scaling = rope_of(text)
        tie = raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        eos = text.get("eos_token_id", raw.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list | tuple) else (() if eos is None else (eos,))

        act = text.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}: Llama 4 uses 'silu'")
        num_experts = int(text.get("num_local_experts", 16))
        top_k = int(text.get("num_experts_per_tok", 1))
        if not 1 <= top_k <= num_experts:
            raise ValueError(
                f"num_experts_per_tok={top_k} must be in [1, num_local_experts={num_experts}]")
        return cls(
            vocab_size=int(text["vocab_size"]),
            hidden_size=int(text["hidden_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            intermediate_size=int(text["intermediate_size"]),
            intermediate_size_mlp=int(text.get("intermediate_size_mlp")
                                      or 2 * int(text["intermediate_size"])),
            num_experts=num_experts,
            num_experts_per_tok=top_k,
            moe_layers=_moe_layers(text, num_layers),
            rope_layers=rope_layers,
            chunked_layers=chunked,
            attention_chunk_size=chunk,
            rope_theta=theta,
            rope_scaling=scaling,
            use_qk_norm=bool(text.get("use_qk_norm", True)),
            attn_temperature_tuning=bool(text.get("attn_temperature_tuning", True)),
            floor_scale=float(text.get("floor_scale", 8192)),
            attn_scale=float(text.get("attn_scale", 0.1)),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(tie),
            attention_bias=bool(text.get("attention_bias", False)),
            max_position_embeddings=int(text.get("max_position_embeddings", 131072)),
            bos_token_id=text.get("bos_token_id"),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            pad_token_id=text.get("pad_token_id"),
            vision=(VisionConfig.from_hf(raw, int(text["hidden_size"]))
                    if isinstance(raw.get("vision_config"), Mapping) else None),
        )


def _read_json(source: str | Path) -> dict[str, Any]:
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json at {path}")
    with open(path) as f:
        return json.load(f)


def _rope_layers(text: Mapping[str, Any], num_layers: int) -> tuple[bool, ...]:
    flags = text.get("no_rope_layers")
    if not flags:
        interval = int(text.get("no_rope_layer_interval", 4))
        return tuple((i + 1) % interval != 0 for i in range(num_layers))
    if len(flags) != num_layers:
        raise ValueError(
            f"no_rope_layers has {len(flags)} entries for num_hidden_layers={num_layers}")
    return tuple(bool(f) for f in flags)


def _chunked_layers(
    text: Mapping[str, Any], rope_layers: tuple[bool, ...], chunk: int | None
) -> tuple[bool, ...]:
    types = text.get("layer_types")
    if not types:
        return tuple(bool(r and chunk) for r in rope_layers)
    if len(types) != len(rope_layers):
        raise ValueError(f"layer_types has {len(types)} entries for {len(rope_layers)} layers")
    unknown = set(types) - {"chunked_attention", "full_attention"}
    if unknown:
        raise ValueError(f"unsupported layer_types {sorted(unknown)}")
    if chunk is None and "chunked_attention" in types:
        raise ValueError("layer_types has chunked_attention but attention_chunk_size is unset")
    return tuple(t == "chunked_attention" for t in types)


def _moe_layers(text: Mapping[str, Any], num_layers: int) -> tuple[int, ...]:
    layers = text.get("moe_layers")
    if layers is None:
        step = int(text.get("interleave_moe_layer_step", 1))
        if step <= 0:
            raise ValueError(f"interleave_moe_layer_step={step} must be positive")
        return tuple(i for i in range(num_layers) if (i + 1) % step == 0)
    bad = [i for i in layers if not 0 <= int(i) < num_layers]
    if bad:
        raise ValueError(f"moe_layers {bad} outside [0, {num_layers})")
    return tuple(sorted(int(i) for i in layers))


def rope_of(text: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """(rope_theta, its scaling or None) of a config dict in either spelling: ``rope_parameters``
    (theta inside) or ``rope_scaling`` + ``rope_theta``."""
    params = text.get("rope_parameters")
    if params is not None:
        theta = params.get("rope_theta", text.get("rope_theta"))
        scaling: Mapping[str, Any] | None = params
    else:
        theta = text.get("rope_theta")
        scaling = text.get("rope_scaling")
    if theta is None:
        raise ValueError("config has no rope_theta (neither top level nor in rope_parameters)")
    kind = None if scaling is None else scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return float(theta), None
    if kind != "llama3":
        raise ValueError(f"unsupported rope type {kind!r}: expected 'llama3' or none")
    try:
        rs = RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise ValueError(f"llama3 rope scaling is missing {e.args[0]!r}") from None
    return float(theta), rs


def rope_inverse_frequencies(config: Llama4Config) -> list[float]:
    """Per-pair inverse frequencies, with llama3 scaling when configured."""
    dim = config.head_dim
    inv = [1.0 / (config.rope_theta ** (i / dim)) for i in range(0, dim, 2)]
    rs = config.rope_scaling
    if rs is None:
        return inv
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen > low_wavelen:
            out.append(f / rs.factor)
        elif wavelen < high_wavelen:
            out.append(f)
        else:
            smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
                rs.high_freq_factor - rs.low_freq_factor)
            out.append((1 - smooth) * f / rs.factor + smooth * f)
    return out
