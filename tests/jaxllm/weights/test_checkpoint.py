"""The checkpoint layout: atomic directories, parameter groups, the manifest, and restoring
groups into target shapes (with a padded vocabulary zero-filled)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from jaxllm.weights import checkpoint


def test_atomic_directory_replaces_the_target_only_on_success(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "old").write_text("old")
    with checkpoint.atomic_directory(out) as tmp:
        assert tmp.parent == tmp_path and tmp != out
        (tmp / "new").write_text("new")
        assert (out / "old").exists()  # untouched until the end
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


@pytest.mark.parametrize("error", [RuntimeError("fail"), KeyboardInterrupt()])
def test_atomic_directory_leaves_nothing_behind_on_failure(tmp_path, error):
    out = tmp_path / "nested" / "ckpt"
    with pytest.raises(type(error)):
        with checkpoint.atomic_directory(out) as tmp:
            (tmp / "half").write_text("x")
            raise error
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_groups_are_one_per_layer_in_numeric_order_with_string_keys():
    params = {"embed": {"weight": 1},
              "layers": {10: {"w": 2}, 2: {"w": 3}, 0: {"attn": {1: 4}}},
              "norm": {"scale": 5}}
    assert list(checkpoint.split_groups(params)) == [
        ("embed", {"embed": {"weight": 1}}),
        ("layer_000", {"attn": {"1": 4}}),
        ("layer_002", {"w": 3}),
        ("layer_010", {"w": 2}),
        ("norm", {"norm": {"scale": 5}}),
    ]
    assert checkpoint.group_name("layers", 7) == "layer_007"
    assert checkpoint.group_name("lm_head") == "lm_head"


def test_tree_shapes_is_a_flat_view():
    tree = {"a": {"b": np.zeros((2, 3)), "c": np.zeros(4)}, "d": np.float32(1)}
    assert checkpoint.tree_shapes(tree) == {"a/b": [2, 3], "a/c": [4], "d": []}


def test_manifest_round_trip_and_refusals(tmp_path):
    with pytest.raises(FileNotFoundError, match="convert_hf_to_orbax.py"):
        checkpoint.read_manifest(tmp_path)
    checkpoint.write_manifest(tmp_path, "float32", {"embed": {"embed/w": [3, 2]}})
    manifest = checkpoint.read_manifest(tmp_path)
    assert manifest == {"format": 1, "dtype": "float32", "groups": {"embed": {"embed/w": [3, 2]}}}
    (tmp_path / checkpoint.MANIFEST).write_text(json.dumps({**manifest, "format": 99}))
    with pytest.raises(ValueError, match="checkpoint format 99, this jaxllm reads format 1"):
        checkpoint.read_manifest(tmp_path)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An embedding of 3 rows and one layer, saved as two groups with their manifest."""
    root = tmp_path_factory.mktemp("ckpt")
    embed = np.arange(6, dtype=np.float32).reshape(3, 2)
    layer = np.full((2,), 7.0, np.float32)
    shapes = {}
    for name, tree in checkpoint.split_groups({"embed": {"w": embed}, "layers": {0: {"b": layer}}}):
        checkpoint.save_group(root, name, tree)
        shapes[name] = checkpoint.tree_shapes(tree)
    checkpoint.write_manifest(root, "float32", shapes)
    return root, embed, layer


def _restore(root, embed_rows: int, stored_rows: int = 3):
    abstract = {"embed": {"w": jax.ShapeDtypeStruct((embed_rows, 2), np.float32)},
                "layers": {0: {"b": jax.ShapeDtypeStruct((2,), np.float32)}}}
    stored = {("embed", "w"): (stored_rows, 2), ("layers", "0", "b"): (2,)}
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return checkpoint.restore_params(root, abstract, lambda path, leaf: device, stored)


def test_restore_puts_every_group_back(saved):
    root, embed, layer = saved
    restored = _restore(root, embed_rows=3)
    assert set(restored) == {"embed", "layers"} and set(restored["layers"]) == {0}
    np.testing.assert_array_equal(restored["embed"]["w"], embed)
    np.testing.assert_array_equal(restored["layers"][0]["b"], layer)


def test_restore_zero_fills_a_padded_vocabulary(saved):
    root, embed, _ = saved
    padded = np.asarray(_restore(root, embed_rows=5)["embed"]["w"])
    np.testing.assert_array_equal(padded[:3], embed)
    np.testing.assert_array_equal(padded[3:], np.zeros((2, 2)))


def test_restore_refuses_a_shape_the_model_does_not_expect(saved):
    root, _, _ = saved
    with pytest.raises(ValueError, match=r"embed/w in group 'embed' has shape \(3, 2\), the "
                                         r"model expects \(4, 2\)"):
        _restore(root, embed_rows=4, stored_rows=4)


def test_restore_refuses_a_missing_group(saved, tmp_path):
    root, _, _ = saved
    manifest = checkpoint.read_manifest(root)
    del manifest["groups"]["layer_000"]
    (tmp_path / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    (tmp_path / "params").symlink_to(root / "params")
    with pytest.raises(ValueError, match="has no parameter group 'layer_000'"):
        _restore(tmp_path, embed_rows=3)
