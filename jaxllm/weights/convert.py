"""Hugging Face Llama 4 safetensors -> jaxllm Orbax checkpoint, one layer in memory at a time."""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from jaxllm.config import Llama4Config, VisionConfig
from jaxllm.model import quant as quant_lib
from jaxllm.model.quant import QuantConfig
from jaxllm.weights import checkpoint
from jaxllm.weights import quant_checkpoint as ct
from jaxllm.weights.safetensors import (
    ConversionError,
    SafetensorsSource,
)

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "chat_template.jinja",
              "chat_template.json", "preprocessor_config.json", "processor_config.json")



@dataclasses.dataclass(frozen=True)
class Entry:
    """One HF tensor: its expected shape and how it becomes jaxllm parameters.

    ``outputs`` maps a parameter path (inside its group) to a function of the HF array.
    """

    hf_name: str
    shape: tuple[int, ...]
    outputs: dict[tuple[str, ...], Callable[[np.ndarray], np.ndarray]]


def _t(x: np.ndarray) -> np.ndarray:
    return x.T


def _linear_in(*out_shape: int) -> Callable[[np.ndarray], np.ndarray]:
    """HF Linear weight [out, in] -> [in, *out_shape]."""
    return lambda w: w.T.reshape(w.shape[1], *out_shape)


def conversion_plan(config: Llama4Config) -> list[tuple[str, list[Entry]]]:
    """Every HF tensor the model has (the vision tower too when ``config.vision`` is set),
    grouped as the checkpoint stores them."""
    c = config
    D, H, K, d, V = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size
    plan = [("embed", [Entry("model.embed_tokens.weight", (V, D), {("embed",): lambda x: x})])]
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        entries = [
            Entry(p + "input_layernorm.weight", (D,), {("input_norm", "weight"): lambda x: x}),
            Entry(p + "post_attention_layernorm.weight", (D,),
                  {("post_attn_norm", "weight"): lambda x: x}),
            Entry(a + "q_proj.weight", (H * d, D), {("attn", "wq"): _linear_in(H, d)}),
            Entry(a + "k_proj.weight", (K * d, D), {("attn", "wk"): _linear_in(K, d)}),
            Entry(a + "v_proj.weight", (K * d, D), {("attn", "wv"): _linear_in(K, d)}),
            Entry(a + "o_proj.weight", (D, H * d),
                  {("attn", "wo"): lambda w: w.T.reshape(H, d, D)}),
        ]
        if c.attention_bias:
            entries += [
                Entry(a + "q_proj.bias", (H * d,), {("attn", "bq"): lambda b: b.reshape(H, d)}),
                Entry(a + "k_proj.bias", (K * d,), {("attn", "bk"): lambda b: b.reshape(K, d)}),
                Entry(a + "v_proj.bias", (K * d,), {("attn", "bv"): lambda b: b.reshape(K, d)}),
                Entry(a + "o_proj.bias", (D,), {("attn", "bo"): lambda b: b}),
            ]
        f = p + "feed_forward."
        if c.is_moe(i):
            E, F = c.num_experts, c.intermediate_size
            entries += [
                Entry(f + "router.weight", (E, D), {("ffn", "router"): _t}),
                # Fused [E, D, 2F] with the gate half first.
                Entry(f + "experts.gate_up_proj", (E, D, 2 * F), {
                    ("ffn", "gate"): lambda x, F=F: x[..., :F],
                    ("ffn", "up"): lambda x, F=F: x[..., F:]}),
                Entry(f + "experts.down_proj", (E, F, D), {("ffn", "down"): lambda x: x}),
                *_mlp_entries(f + "shared_expert.", ("ffn", "shared"), D, F),
            ]
        else:
            entries += _mlp_entries(f, ("ffn",), D, c.intermediate_size_mlp)
        plan.append((checkpoint.group_name("layers", i), entries))
    plan.append(("norm", [Entry("model.norm.weight", (D,), {("norm", "weight"): lambda x: x})]))
    if not c.tie_word_embeddings:
        plan.append(("lm_head", [Entry("lm_head.weight", (V, D), {("lm_head",): _t})]))
    return plan + (vision_plan(c.vision) if c.vision is not None else [])


def vision_plan(v: VisionConfig) -> list[tuple[str, list[Entry]]]:
    """The vision tower's tensors: group ``vision`` (embeddings, norms, adapter, projector),
    then one group per encoder layer, like the text layers."""
    D, H, d, F, E = v.hidden_size, v.num_heads, v.head_dim, v.intermediate_size, \
        v.text_hidden_size
    A, m = v.projector_output_dim, "vision_model."

    def same(path):
        return {path: lambda x: x}

    top = [
        Entry(m + "patch_embedding.linear.weight", (D, v.num_channels * v.patch_size ** 2),
              {("vision", "patch_embed"): _t}),
        Entry(m + "class_embedding", (D,), same(("vision", "class_embedding"))),
        Entry(m + "positional_embedding_vlm", (v.num_patches + 1, D),
              same(("vision", "positional_embedding"))),
        *(Entry(f"{m}layernorm_{w}.{k}", (D,), same(("vision", f"norm_{w}", k)))
          for w in ("pre", "post") for k in ("weight", "bias")),
        Entry(m + "vision_adapter.mlp.fc1.weight", (v.projector_input_dim, v.shuffled_dim),
              {("vision", "adapter_fc1"): _t}),
        Entry(m + "vision_adapter.mlp.fc2.weight", (A, v.projector_input_dim),
              {("vision", "adapter_fc2"): _t}),
        Entry("multi_modal_projector.linear_1.weight", (E, v.vision_output_dim),
              {("vision", "projector"): _t}),
    ]
    plan = [("vision", top)]
    for i in range(v.num_layers):
        p, a = f"{m}model.layers.{i}.", f"{m}model.layers.{i}.self_attn."
        entries = [
            *(Entry(a + f"{x}_proj.weight", (H * d, D), {("attn", f"w{x}"): _linear_in(H, d)})
              for x in "qkv"),
            *(Entry(a + f"{x}_proj.bias", (H * d,),
                    {("attn", f"b{x}"): lambda b: b.reshape(H, d)}) for x in "qkv"),
            Entry(a + "o_proj.weight", (D, H * d),
                  {("attn", "wo"): lambda w: w.T.reshape(H, d, D)}),
            Entry(a + "o_proj.bias", (D,), same(("attn", "bo"))),
            Entry(p + "mlp.fc1.weight", (F, D), {("fc1",): _t}),
            Entry(p + "mlp.fc1.bias", (F,), same(("fc1_bias",))),
            Entry(p + "mlp.fc2.weight", (D, F), {("fc2",): _t}),
            Entry(p + "mlp.fc2.bias", (D,), same(("fc2_bias",))),
            *(Entry(f"{p}{hf}.{k}", (D,), same((ours, k)))
              for hf, ours in (("input_layernorm", "input_norm"),
                               ("post_attention_layernorm", "post_attn_norm"))
              for k in ("weight", "bias")),
        ]
        plan.append((checkpoint.group_name("vision_layers", i), entries))
    return plan


def _mlp_entries(prefix: str, path: tuple[str, ...], D: int, F: int) -> list[Entry]:
    return [
        Entry(prefix + "gate_proj.weight", (F, D), {path + ("gate",): _t}),
        Entry(prefix + "up_proj.weight", (F, D), {path + ("up",): _t}),
        Entry(prefix + "down_proj.weight", (D, F), {path + ("down",): _t}),
    ]


def convert(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "bfloat16",
    quantization: str | None = None,
    quantization_scope: str = "experts",
    overwrite: bool = False,
    progress: bool = True,
    text_only: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Converts ``hf_dir`` into a jaxllm checkpoint at ``out_dir`` (see
    ``jaxllm.weights.checkpoint``).

    A compressed-tensors checkpoint keeps its quantized feed-forward weights
    (``jaxllm.weights.quant_checkpoint``); ``quantization`` (``fp8``, ``int8``, ``int4``)
    quantizes an unquantized one over ``quantization_scope`` (``jaxllm.model.quant``), each
    tensor as it is read. Every name, shape and scheme is checked before anything is written,
    and the output is written into a temporary sibling directory renamed into place at the
    end, so a failure or interruption never leaves a complete-looking checkpoint. A
    multimodal checkpoint keeps its vision tower and projector unless ``text_only``.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True / --overwrite)")
    config = Llama4Config.from_hf(hf_dir)
    compressed = ct.read_config(json.loads((hf_dir / "config.json").read_text()))
    if compressed is not None and quantization is not None:
        raise ConversionError(f"{hf_dir} is already quantized (compressed-tensors); drop "
                              f"--quantization {quantization}")
    quant = QuantConfig.from_flags(quantization, quantization_scope)
    if text_only:
        config = dataclasses.replace(config, vision=None)
    source = SafetensorsSource(hf_dir, text_only=text_only)
    plan = conversion_plan(config)
    if compressed is not None:
        plan = _compressed_plan(plan, config, source, compressed)
        linear = [e for _, entries in plan for e in entries if isinstance(e, ct.LinearEntry)]
        ct.check_tensors(linear, source)
        target = ct.target_of(linear)
        if target is not None:
            scheme, group_size, kinds = target
            quant = QuantConfig(scheme, kinds, group_size or quant_lib.DEFAULT_GROUP_SIZE)
            log(f"compressed-tensors checkpoint: {quant.describe()} for {', '.join(kinds)}")
    kv_names = []
    if compressed is not None and compressed.kv_cache:
        kv_names = [n for i in range(config.num_layers) for n in ct.kv_scale_names(i)]
    _check_names(plan, source, config, kv_names)
    if source.skipped:
        log(f"skipping {len(source.skipped)} vision/projector tensors (--text-only)")

    with checkpoint.atomic_directory(out_dir) as tmp:
        with jax.default_device(jax.devices("cpu")[0]):
            shapes = _write_groups(tmp, plan, source, DTYPES[dtype], progress, config, quant)
        for name in SIDE_FILES:
            if (hf_dir / name).is_file():
                shutil.copy2(hf_dir / name, tmp / name)
        _strip_quantization_config(tmp / "config.json")
        kv_scales = ct.read_kv_scales(source, config.num_layers) if kv_names else None
        if kv_scales is not None:
            log(f"compressed-tensors checkpoint: calibrated FP8 KV cache scales for "
                f"{len(kv_scales)} layers (used with --kv-cache-dtype fp8)")
        checkpoint.write_manifest(tmp, dtype, shapes,
                                  None if quant is None else quant.to_json(), kv_scales)
    return out_dir


def _strip_quantization_config(path: Path) -> None:
    """The copied config.json without ``quantization_config`` (the manifest says what is
    quantized now)."""
    if path.is_file():
        data = json.loads(path.read_text())
        if data.pop("quantization_config", None) is not None:
            path.write_text(json.dumps(data, indent=2))


def _compressed_plan(plan: list[tuple[str, list]], config: Llama4Config,
                     source: SafetensorsSource, compressed: ct.CompressedConfig):
    """``plan`` with every Linear the checkpoint stores quantized, and routed experts stored
    one tensor set per expert, read as ``quant_checkpoint.LinearEntry``s."""
    moe = set(config.moe_layers)
    E, D, F = config.num_experts, config.hidden_size, config.intermediate_size

    def scheme(module: str) -> ct.Scheme | None:
        return compressed.scheme_of(ct.original_module(source, module))

    out = []
    for group, entries in plan:
        new: list = []
        for entry in entries:
            name = entry.hf_name
            if name.endswith("experts.gate_up_proj") and name not in source.location:
                prefix = name[: -len("gate_up_proj")]
                for proj, out_in in (("gate", (F, D)), ("up", (F, D))):
                    modules = tuple(f"{prefix}{e}.{proj}_proj" for e in range(E))
                    new.append(ct.LinearEntry(modules, tuple(map(scheme, modules)), out_in,
                                              ("ffn", proj), "routed"))
            elif name.endswith("experts.down_proj") and name not in source.location:
                prefix = name[: -len("down_proj")]
                modules = tuple(f"{prefix}{e}.down_proj" for e in range(E))
                new.append(ct.LinearEntry(modules, tuple(map(scheme, modules)), (D, F),
                                          ("ffn", "down"), "routed"))
            elif name.endswith(ct.LINEAR_SUFFIXES) and scheme(name[: -len(".weight")]):
                module = name[: -len(".weight")]
                [(path, fn)] = entry.outputs.items()
                new.append(ct.LinearEntry((module,), (scheme(module),), entry.shape, path,
                                          ct.kind_of(name, moe),
                                          lambda w, fn=fn: fn(np.ascontiguousarray(w.T))))
            else:
                new.append(entry)
        out.append((group, new))
    return out


def _entry_names(entry) -> list[str]:
    return list(entry.tensors()) if isinstance(entry, ct.LinearEntry) else [entry.hf_name]


def _check_names(plan: list[tuple[str, list[Entry]]], source: SafetensorsSource,
                 config: Llama4Config, extra: list[str] = ()) -> None:
    wanted = {n for _, entries in plan for e in entries for n in _entry_names(e)} | set(extra)
    present = set(source.location)
    if config.tie_word_embeddings:
        present.discard("lm_head.weight")  # tied: HF may or may not also store it
    missing = sorted(wanted - present)
    if missing:
        raise ConversionError(f"checkpoint is missing tensor(s) {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
    unexpected = sorted(present - wanted)
    if unexpected:
        raise ConversionError(f"checkpoint has unexpected tensor(s) {unexpected[:5]}"
                              f"{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)} in all)")


def _write_groups(root: Path, plan: list[tuple[str, list[Entry]]], source: SafetensorsSource,
                  dtype, progress: bool, config: Llama4Config,
                  quant: QuantConfig | None) -> dict[str, dict[str, list[int]]]:
    from tqdm import tqdm

    total = sum(len(entries) for _, entries in plan)
    shapes = {}
    with tqdm(total=total, unit="tensor", disable=not progress, desc="converting") as bar:
        for group, entries in plan:
            tree: dict = {}
            for entry in entries:
                if isinstance(entry, ct.LinearEntry):
                    keep = quant is not None and entry.kind is not None and \
                        quant.covers(entry.kind)
                    value = ct.read_linear(entry, source, keep)
                    if isinstance(value, dict):
                        value["scale"] = value["scale"].astype(
                            quant_lib.scale_dtype(quant.scheme, dtype))
                    else:
                        value = np.ascontiguousarray(value.astype(dtype))
                    _set(tree, entry.path, value)
                    bar.update()
                    continue
                array = source.read(entry.hf_name)
                if tuple(array.shape) != entry.shape:
                    raise ConversionError(f"tensor {entry.hf_name} has shape {tuple(array.shape)},"
                                          f" expected {entry.shape} from config.json")
                for path, fn in entry.outputs.items():
                    _set(tree, path, np.ascontiguousarray(fn(array).astype(dtype)))
                del array
                bar.update()
            _quantize_targets(tree, group, config, quant, dtype)
            checkpoint.save_group(root, group, tree)
            shapes[group] = checkpoint.tree_shapes(tree)
            del tree
            _release_freed_memory()
    return shapes


def _quantize_targets(tree: dict, group: str, config: Llama4Config,
                      quant: QuantConfig | None, dtype) -> None:
    """Quantizes, in place, each weight of ``group`` that ``quant`` covers and that is still a
    plain array (all of them for ``--quantization``)."""
    layer = checkpoint.layer_index(group)
    if quant is None or layer is None:
        return
    if config.is_moe(layer):
        paths = [("ffn", p) for p in ("gate", "up", "down") if quant.covers("routed")]
        paths += [("ffn", "shared", p) for p in ("gate", "up", "down") if quant.covers("shared")]
    else:
        paths = [("ffn", p) for p in ("gate", "up", "down") if quant.covers("dense")]
    for path in paths:
        node = tree
        for key in path[:-1]:
            node = node[key]
        if not isinstance(node[path[-1]], dict):
            q, scale = quant_lib.quantize(node[path[-1]], quant.scheme, quant.group_size)
            scale = np.asarray(scale).astype(quant_lib.scale_dtype(quant.scheme, dtype))
            node[path[-1]] = {"q": np.asarray(q), "scale": scale}


def _release_freed_memory() -> None:
    """Hands a finished layer's buffers back to the OS, so that peak memory stays about one
    layer instead of growing with heap fragmentation."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


def _set(tree: dict, path: Iterable[str], value: np.ndarray) -> None:
    *parents, leaf = path
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value
