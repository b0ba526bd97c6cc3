"""jaxllm's checkpoint layout: Orbax checkpoints of parameter groups plus the HF side files.

    <dir>/jaxllm_checkpoint.json   manifest: format, dtype, every group's tensor shapes
    <dir>/params/<group>/          one Orbax checkpoint per group: embed, norm, lm_head,
                                   layer_000, layer_001, ...; a vision tower adds vision
                                   (all but its layers), vision_layer_000, ...
    <dir>/config.json, generation_config.json, tokenizer files (copied from the HF model)

Groups are written and restored one at a time, so converting or loading a model never needs
more than about one layer in host memory, and a restore can place each array straight into
its target sharding. The manifest is written last, inside a temporary directory that is
renamed into place, so a directory that has it is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

MANIFEST = "jaxllm_checkpoint.json"
FORMAT_VERSION = 1
_LAYER_GROUP = re.compile(r"^(vision_)?layer_(\d+)$")

Tree = dict[str, Any]


@contextlib.contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """Yields a temporary sibling of ``out`` to fill; on success it replaces ``out`` in one
    rename, on any failure (^C included) it is deleted, so ``out`` is never half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def group_name(top_key: str, layer: int | None = None) -> str:
    if top_key == "layers":
        return f"layer_{layer:03d}"
    return f"vision_layer_{layer:03d}" if top_key == "vision_layers" else top_key


def split_groups(params: Mapping[Any, Any]) -> Iterator[tuple[str, Tree]]:
    """Splits a pure params dict into (group name, subtree), one group per layer (of the
    text model and of the vision tower, whose other parameters are one group)."""
    for key, sub in params.items():
        if key == "layers":
            for i in sorted(sub, key=int):
                yield group_name("layers", int(i)), _str_keys(sub[i])
        elif key == "vision":
            yield "vision", {key: _str_keys({k: v for k, v in sub.items() if k != "layers"})}
            for i in sorted(sub.get("layers", {}), key=int):
                yield group_name("vision_layers", int(i)), _str_keys(sub["layers"][i])
        else:
            yield group_name(key), {key: _str_keys(sub)}


def _str_keys(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return tree


def save_group(root: Path, name: str, tree: Tree) -> None:
    """Writes one group as its own Orbax checkpoint under ``root/params/name``."""
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save((root / "params" / name).absolute(), tree)
        ckpt.wait_until_finished()


def save_params(directory: Path, params: Mapping[str, Any]) -> dict[str, Any]:
    """Writes a model's parameters (a pure dict, ``nnx.to_pure_dict``) into ``directory``
    group by group; returns their shapes, for ``write_manifest``."""
    shapes = {}
    for name, tree in split_groups(params):
        tree = jax.tree.map(np.asarray, tree)
        save_group(directory, name, tree)
        shapes[name] = tree_shapes(tree)
    return shapes


def write_manifest(root: Path, dtype: str, shapes: Mapping[str, Mapping[str, list[int]]],
                   quantization: Mapping[str, Any] | None = None,
                   kv_scales: list[tuple[float, float]] | None = None) -> None:
    """``quantization`` (``QuantConfig.to_json``) says which weights are stored quantized;
    ``kv_scales`` are the per-layer (k_scale, v_scale) of an fp8 KV cache, if calibrated."""
    manifest: dict[str, Any] = {"format": FORMAT_VERSION, "dtype": dtype, "groups": shapes}
    if quantization is not None:
        manifest["quantization"] = dict(quantization)
    if kv_scales is not None:
        manifest["kv_cache_scales"] = [[float(k), float(v)] for k, v in kv_scales]
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def kv_cache_scales(manifest: Mapping[str, Any]) -> tuple[tuple[float, float], ...] | None:
    """The manifest's per-layer fp8 KV cache (k_scale, v_scale), None if not calibrated."""
    scales = manifest.get("kv_cache_scales")
    return None if scales is None else tuple((float(k), float(v)) for k, v in scales)


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{root} is not a jaxllm checkpoint (no {MANIFEST}); convert a Hugging Face model "
            f"with scripts/convert_hf_to_orbax.py")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {manifest.get('format')!r}, "
                         f"this jaxllm reads format {FORMAT_VERSION}")
    return manifest


def restore_params(
    root: Path,
    abstract: Mapping[Any, Any],
    shardings: Callable[[tuple[str, ...], jax.ShapeDtypeStruct], jax.sharding.Sharding],
    stored_shapes: Mapping[tuple[str, ...], tuple[int, ...]],
    transform: Callable[[tuple[str, ...], Tree], Tree] | None = None,
) -> dict[Any, Any]:
    """Restores every group into arrays of ``abstract``'s shapes/dtypes, each directly into
    the sharding that ``shardings(path, leaf)`` names (path is the key path in ``abstract``).

    ``stored_shapes[path]`` is the shape the checkpoint must hold; a target that is larger
    (a vocabulary padded for the mesh) is zero-filled past it. Any other mismatch is an error.
    ``transform(prefix, tree)``, if given, replaces each group (whose parameters' paths start
    with ``prefix``) as soon as it is restored (to
    quantize it while loading: one group of the stored dtype in memory at a time).
    """
    manifest = read_manifest(root)
    restored: dict[Any, Any] = {}
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckpt:
        for name, sub in split_groups(abstract):
            if name not in manifest["groups"]:
                raise ValueError(f"checkpoint {root} has no parameter group {name!r}")
            prefix = _group_prefix(name)
            saved = manifest["groups"][name]

            def target(path, leaf, prefix=prefix, saved=saved, name=name):
                full = prefix + path
                have = tuple(saved.get("/".join(path), ()))
                if have != stored_shapes[full]:
                    raise ValueError(f"checkpoint {root}: {'/'.join(full)} in group {name!r} "
                                     f"has shape {have}, the model expects {stored_shapes[full]}")
                return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=shardings(full, leaf))

            tree = _map_with_path(target, sub)
            # strict=False only lets a padded vocabulary be zero-filled: shapes were checked.
            tree = ckpt.restore((root / "params" / name).absolute(),
                                args=ocp.args.StandardRestore(tree, strict=False))
            if transform is not None:
                tree = transform(prefix, tree)
            _insert_group(restored, name, tree)
    return restored


def layer_index(name: str) -> int | None:
    """The text layer of group ``name`` (``layer_007`` -> 7), None for the other groups (the
    vision tower's layers included)."""
    m = _LAYER_GROUP.match(name)
    return int(m.group(2)) if m and not m.group(1) else None


def _group_prefix(name: str) -> tuple[str, ...]:
    m = _LAYER_GROUP.match(name)
    if not m:
        return ()
    return ("vision",) * bool(m.group(1)) + ("layers", str(int(m.group(2))))


def _insert_group(out: dict[Any, Any], name: str, tree: Tree) -> None:
    m = _LAYER_GROUP.match(name)
    if m:
        parent = out.setdefault("vision", {}) if m.group(1) else out
        parent.setdefault("layers", {})[int(m.group(2))] = tree
    else:
        for key, sub in tree.items():
            if key == "vision":  # its layers may be in place already
                out.setdefault(key, {}).update(sub)
            else:
                out[key] = sub


def _map_with_path(fn: Callable[[tuple[str, ...], Any], Any], tree: Any, path=()) -> Any:
    if isinstance(tree, Mapping):
        return {k: _map_with_path(fn, v, path + (str(k),)) for k, v in tree.items()}
    return fn(path, tree)


def tree_shapes(tree: Tree) -> dict[str, list[int]]:
    """Flat ``{"a/b": shape}`` view of a group, for the manifest."""
    flat: dict[str, list[int]] = {}
    _map_with_path(lambda p, x: flat.__setitem__("/".join(p), list(np.shape(x))), tree)
    return flat
