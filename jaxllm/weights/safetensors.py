"""Reading a (sharded) Hugging Face safetensors checkpoint one tensor at a time, every header
and size checked, with multimodal checkpoints' names mapped to the text model's plain ones."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import safe_open

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
