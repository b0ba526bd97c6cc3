"""The bucket policy: bucket shapes and edges, block-table width, sizing, and length errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from jaxllm.buckets import BucketPolicy, ContextLengthError
from jaxllm.kv_cache import CacheConfig


def _policy(**kwargs) -> BucketPolicy:
    kwargs.setdefault("cache", CacheConfig(page_size=16))
    return BucketPolicy(**kwargs)


def test_length_buckets_are_powers_of_two_then_max_model_len():
    policy = _policy(max_model_len=100)
    assert policy.length_buckets == (16, 32, 64, 100)
    assert _policy(max_model_len=64).length_buckets == (16, 32, 64)
    assert _policy(max_model_len=10).length_buckets == (10,)  # below min_length_bucket
    assert _policy(max_model_len=100, min_length_bucket=8).length_buckets == (8, 16, 32, 64, 100)


@pytest.mark.parametrize("length, bucket", [(1, 16), (16, 16), (17, 32), (32, 32), (33, 64),
                                            (64, 64), (65, 100), (99, 100), (100, 100)])
def test_length_bucket_edges_with_max_model_len_not_a_power_of_two(length, bucket):
    assert _policy(max_model_len=100).length_bucket(length) == bucket


def test_batch_and_token_buckets():
    policy = _policy(max_model_len=40, max_num_seqs=6, max_num_batched_tokens=48)
    assert policy.batch_buckets == (1, 2, 4, 6)
    assert [policy.batch_bucket(b) for b in (1, 2, 3, 4, 5, 6)] == [1, 2, 4, 4, 6, 6]
    assert policy.token_buckets == (16, 32, 48)
    assert [policy.token_bucket(t) for t in (1, 16, 17, 32, 33, 48)] == [16, 16, 32, 32, 48, 48]


def test_step_width_default_does_not_grow_with_max_model_len(monkeypatch):
    """512 rows on CPU, 8192 on a GPU (vLLM's H100 default), never more than max_num_seqs
    full sequences, never fewer than max_num_seqs rows."""
    assert _policy(max_model_len=40, max_num_seqs=8).max_num_batched_tokens == 8 * 40
    assert _policy(max_model_len=1_000_000, max_num_seqs=8).max_num_batched_tokens == 512
    assert _policy(max_model_len=1, max_num_seqs=8).max_num_batched_tokens == 8
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert _policy(max_model_len=1_000_000).max_num_batched_tokens == 8192


def test_program_count_is_the_same_at_32k_and_1m():
    """The engine's warm-up programs depend on the step buckets, not on max_model_len."""
    shapes = {n: _policy(max_model_len=n, max_num_seqs=8).step_shapes()
              for n in (32_768, 1_000_000)}
    print(f"\nwarm-up programs: max_model_len 32768 -> {len(shapes[32_768])}, "
          f"1000000 -> {len(shapes[1_000_000])}")
    assert shapes[32_768] == shapes[1_000_000]
    # token buckets 16..512 (6) x batch buckets 1, 2, 4, 8
    assert len(shapes[1_000_000]) == 6 * 4


@pytest.mark.parametrize("method, value, message", [
    ("length_bucket", 101, "prompt length 101 exceeds max_model_len=100"),
    ("batch_bucket", 7, "batch size 7 exceeds max_num_seqs=6"),
    ("token_bucket", 129, "step token count 129 exceeds max_num_batched_tokens=128"),
    ("length_bucket", 0, "prompt length 0 must be >= 1"),
    ("batch_bucket", 0, "batch size 0 must be >= 1"),
])
def test_bucket_errors_name_the_value_and_the_limit(method, value, message):
    policy = _policy(max_model_len=100, max_num_seqs=6, max_num_batched_tokens=128)
    with pytest.raises(ValueError) as e:
        getattr(policy, method)(value)
    assert str(e.value) == message


def test_block_table_width_is_the_ceiling_of_max_model_len_over_page_size():
    assert _policy(max_model_len=96).pages_per_seq == 6
    assert _policy(max_model_len=97).pages_per_seq == 7
    assert _policy(max_model_len=100, cache=CacheConfig(page_size=8)).pages_per_seq == 13
    assert _policy(max_model_len=5).pages_per_seq == 1


@pytest.mark.parametrize("field", ["max_model_len", "max_num_seqs", "min_length_bucket",
                                   "max_num_batched_tokens"])
def test_non_positive_limits_are_refused(field):
    kwargs = {"max_model_len": 64, field: 0}
    with pytest.raises(ValueError, match=f"{field}=0 must be >= 1"):
        _policy(**kwargs)


def test_any_attention_chunk_size_is_accepted():
    for chunk in (32, 24, 20, 1000, 1):
        assert _policy(max_model_len=64, chunk_size=chunk).chunk_size == chunk
    with pytest.raises(ValueError, match="chunk_size=0 must be >= 1"):
        _policy(max_model_len=64, chunk_size=0)


def test_for_engine_sizes_the_cache_and_keeps_everything_else():
    policy = _policy(max_model_len=100, max_num_seqs=3, chunk_size=32,
                     cache=CacheConfig(page_size=16, dtype=jnp.float32))
    sized = policy.for_engine()
    assert sized.cache == CacheConfig(page_size=16, dtype=jnp.float32, num_pages=3 * 7)
    assert policy.cache.num_pages is None  # the model's policy is not changed
    assert (sized.max_model_len, sized.max_num_seqs, sized.chunk_size,
            sized.max_num_batched_tokens) == (100, 3, 32, 3 * 100)
    wider = policy.for_engine(num_pages=7, max_num_batched_tokens=256)
    assert wider.cache.num_pages == 7 and wider.max_num_batched_tokens == 256


def test_for_engine_refuses_a_cache_smaller_than_one_sequence():
    policy = _policy(max_model_len=100)
    with pytest.raises(ValueError) as e:
        policy.for_engine(num_pages=6)
    assert str(e.value) == ("num_pages=6 cannot hold one sequence of max_model_len=100 "
                            "(7 pages of 16 tokens)")


def test_for_engine_refuses_zero_rather_than_taking_the_default():
    policy = _policy(max_model_len=100)
    with pytest.raises(ValueError, match="num_pages=0"):
        policy.for_engine(num_pages=0)
    with pytest.raises(ValueError, match="max_num_batched_tokens=0"):
        policy.for_engine(max_num_batched_tokens=0)


def test_check_length_allows_max_model_len_and_words_the_error_like_the_cuda_engine():
    policy = _policy(max_model_len=100)
    policy.check_length(100)
    with pytest.raises(ContextLengthError) as e:
        policy.check_length(101)
    assert isinstance(e.value, ValueError)
    assert str(e.value) == ("This model's maximum context length is 100 tokens. However, you "
                            "requested 101 tokens. Please reduce the length of the input.")


def test_check_request_counts_prompt_plus_completion():
    policy = _policy(max_model_len=100)
    policy.check_request(60, 40)  # exactly max_model_len
    policy.check_request(1, 99)
    with pytest.raises(ContextLengthError) as e:
        policy.check_request(60, 41)
    assert str(e.value) == (
        "This model's maximum context length is 100 tokens. However, you requested 101 tokens "
        "(60 in the messages, 41 in the completion). Please reduce the length of the messages "
        "or completion.")


@pytest.mark.parametrize("prompt, new, message", [
    (0, 5, "prompt must have at least one token, got 0"),
    (5, 0, "max_new_tokens must be >= 1, got 0"),
])
def test_check_request_refuses_empty_prompts_and_completions(prompt, new, message):
    with pytest.raises(ValueError) as e:
        _policy(max_model_len=100).check_request(prompt, new)
    assert not isinstance(e.value, ContextLengthError)
    assert str(e.value) == message
