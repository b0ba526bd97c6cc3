"""Loading helpers: dtype names, EOS ids from generation_config.json, refusals before any
weight is read (a full load is test_model_parity's and test_convert's)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.weights import loading


@pytest.mark.parametrize("given, expected", [
    ("float32", jnp.float32), ("bfloat16", jnp.bfloat16), ("float16", jnp.float16),
    (np.float32, jnp.float32), (jnp.bfloat16, jnp.bfloat16), (np.dtype("float16"), jnp.float16),
])
def test_resolve_dtype(given, expected):
    assert jnp.dtype(loading.resolve_dtype(given)) == jnp.dtype(expected)


def test_unknown_dtype_name_lists_the_choices():
    with pytest.raises(ValueError, match=r"dtype='fp8': expected one of \['bfloat16', "
                                         r"'float16', 'float32'\]"):
        loading.resolve_dtype("fp8")


@pytest.mark.parametrize("content, expected", [
    ({"eos_token_id": 2}, (2,)),
    ({"eos_token_id": [200001, 200007]}, (200001, 200007)),
    ({"eos_token_id": None}, None),
    ({"bos_token_id": 1}, None),
])
def test_eos_ids_from_generation_config(tmp_path, content, expected):
    (tmp_path / "generation_config.json").write_text(json.dumps(content))
    assert loading._eos_token_ids(tmp_path) == expected


def test_no_generation_config_means_the_config_decides(tmp_path):
    assert loading._eos_token_ids(tmp_path) is None


def test_a_directory_without_a_manifest_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a jaxllm checkpoint"):
        loading.load_model(tmp_path)
