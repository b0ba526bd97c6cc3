"""Quickstart: build a tiny random Llama 4 with HF transformers, convert it, run it, compare.

    python scripts/quickstart.py

Saves the HF model in shards, converts it with scripts/convert_hf_to_orbax.py, loads it with
``jaxllm.load_model`` and prints jaxllm's next-token predictions beside HF's.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support: test helpers

import jaxllm  # noqa: E402
from tests.support import hf_models  # noqa: E402


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hf = hf_models.make_text_model(hf_models.SCOUT_LIKE)
        hf_models.save(hf, tmp / "hf")
        converter = Path(__file__).with_name("convert_hf_to_orbax.py")
        subprocess.run([sys.executable, str(converter), "--hf-dir", str(tmp / "hf"),
                        "--out", str(tmp / "jaxllm"), "--dtype", "float32", "--no-progress"],
                       check=True)
        model = jaxllm.load_model(tmp / "jaxllm")
        ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 48)).tolist()
        ours, ref = model.logits(ids), hf_models.hf_logits(hf, ids)
        c = model.config
        print(f"tiny Llama 4: {c.num_layers} layers, {c.num_experts} experts, chunk "
              f"{c.attention_chunk_size}, vocab {c.vocab_size}; logits {ours.shape}")
        print("next token (jaxllm):", ours[:, -1].argmax(-1).tolist())
        print("next token (HF):    ", ref[:, -1].argmax(-1).tolist())
        err = float(np.abs(ours - ref).max() / np.abs(ref).max())
        print(f"max |jaxllm - HF| / max |HF| = {err:.2e}")
        return 0 if err < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
