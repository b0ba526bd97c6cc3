"""The serving tests' shared model: one tiny random Scout-like Llama 4 with a word tokenizer,
converted once per session for every server over it."""

from __future__ import annotations

import pytest

from tests.jaxllm.conftest import run_converter
from tests.support import hf_models


@pytest.fixture(scope="session")
def word_model(tmp_path_factory):
    """(HF model, converted float32 checkpoint) of a Scout-like model whose tokenizer spells
    token i as ``w{i}``."""
    root = tmp_path_factory.mktemp("word_model")
    hf = hf_models.make_text_model(hf_models.SCOUT_LIKE, seed=21)
    hf_dir = hf_models.save(hf, root / "hf")
    hf_models.save_word_tokenizer(hf_dir, hf_models.BASE["vocab_size"])
    ckpt = root / "tiny"
    assert run_converter(hf_dir, ckpt, "--dtype", "float32").returncode == 0
    return hf, ckpt
