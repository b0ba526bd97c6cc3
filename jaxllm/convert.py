"""Hugging Face Llama 4 safetensors -> jaxllm Orbax checkpoint, one layer in memory at a time."""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import shutil
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open

from jaxllm import checkpoint
from jaxllm.config import Llama4Config, VisionConfig
from jaxllm.models import quant as quant_lib
from jaxllm.models import quant_checkpoint as ct
from jaxllm.models.quant import QuantConfig

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "chat_template.jinja",
              "chat_template.json", "preprocessor_config.json", "processor_config.json")
# Prefixes that multimodal checkpoints put before the text model's own names.
_TEXT_PREFIXES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                  ("model.language_model.", "model."))
# The vision tower and projector, under their plain names (newer transformers nest them).
_VISION_PREFIXES = (("model.vision_model.", "vision_model."),
                    ("model.multi_modal_projector.", "multi_modal_projector."),
                    ("vision_model.", "vision_model."),
                    ("multi_modal_projector.", "multi_modal_projector."))


_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
              "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I8": np.int8,
              "F8_E4M3": ml_dtypes.float8_e4m3fn}


class ConversionError(ValueError):
    """The source checkpoint is unreadable or does not match its config."""


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


def is_vision(name: str) -> bool:
    return name.startswith(tuple(old for old, _ in _VISION_PREFIXES))


def plain_name(name: str) -> str:
    """A checkpoint tensor's name without the multimodal prefixes: ``model.layers.0...`` for
    the text model, ``vision_model...`` / ``multi_modal_projector...`` for the vision tower."""
    for old, new in _TEXT_PREFIXES + _VISION_PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


class SafetensorsSource:
    """Index of the tensors in a (sharded) safetensors checkpoint; reads one at a time.

    With ``text_only`` the vision tower's tensors are left out (listed in ``skipped``)."""

    def __init__(self, hf_dir: Path, text_only: bool = False):
        self.hf_dir = hf_dir
        files = sorted(hf_dir.glob("*.safetensors"))
        if not files:
            raise ConversionError(f"no *.safetensors files in {hf_dir}")
        index_path = hf_dir / "model.safetensors.index.json"
        listed: set[str] = set()
        if index_path.is_file():
            listed = set(json.loads(index_path.read_text())["weight_map"].values())
            absent = sorted(listed - {f.name for f in files})
            if absent:
                raise ConversionError(f"{index_path} names missing shard file(s) {absent}")
        self.location: dict[str, tuple[Path, str]] = {}
        self.headers: dict[Path, dict] = {}
        self.skipped: list[str] = []
        for file in files:
            if listed and file.name not in listed:
                continue
            self.headers[file] = _read_header(file)
            for name in self.headers[file]["tensors"]:
                text = plain_name(name)
                if text_only and is_vision(name):
                    self.skipped.append(name)
                elif text in self.location:
                    raise ConversionError(f"tensor {name} appears in more than one shard")
                else:
                    self.location[text] = (file, name)

    def read(self, text: str) -> np.ndarray:
        """Reads one tensor straight from its file into a fresh numpy array (one copy)."""
        file, name = self.location[text]
        info = self.headers[file]["tensors"][name]
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ConversionError(f"tensor {name} in {file} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        count = int(np.prod(info["shape"], dtype=np.int64))
        if (end - start) != count * np.dtype(dtype).itemsize:
            raise ConversionError(f"tensor {name} in {file}: {end - start} bytes for shape "
                                  f"{info['shape']} of {info['dtype']}")
        with open(file, "rb") as f:
            f.seek(self.headers[file]["data_start"] + start)
            array = np.fromfile(f, dtype=dtype, count=count)
        if array.size != count:
            raise ConversionError(f"tensor {name} in {file} is cut short (truncated file?)")
        return array.reshape(info["shape"])


def _read_header(file: Path) -> dict:
    """Parses and checks a safetensors header: {"data_start", "tensors": {name: info}}."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError(f"header of {header_len} bytes in a {size}-byte file")
            header = json.loads(f.read(header_len))
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
        if 8 + header_len + end > size:
            raise ValueError(f"file is {size} bytes but its tensors need {8 + header_len + end}"
                             " (truncated?)")
        with safe_open(str(file), framework="numpy"):
            pass  # the safetensors library agrees that the file is well formed
    except Exception as e:
        raise ConversionError(f"{file} is not a readable safetensors file: {e}") from e
    return {"data_start": 8 + header_len, "tensors": tensors}


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
    """Converts ``hf_dir`` into a jaxllm checkpoint at ``out_dir`` (see ``jaxllm.checkpoint``).

    A compressed-tensors checkpoint keeps its quantized feed-forward weights
    (``jaxllm.models.quant_checkpoint``); ``quantization`` (``fp8``, ``int8``, ``int4``)
    quantizes an unquantized one over ``quantization_scope`` (``jaxllm.models.quant``), each
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
