"""generate(): HF-equal greedy tokens, edges of max_model_len and buckets, no recompiles."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import jaxllm
from jaxllm import ContextLengthError, SamplingParams
from tests.support import hf_models
from tests.support.compiles import count_compilations

pytestmark = pytest.mark.heavy  # end to end: compiles engines or models (tests/conftest.py)

V = hf_models.BASE["vocab_size"]


def _prompts(lengths, seed=0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, V, n).tolist() for n in lengths]


def hf_greedy(hf, prompt: list[int], max_new_tokens: int, eos: int | None = 2) -> list[int]:
    hf.generation_config.eos_token_id = eos
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens,
                          do_sample=False, pad_token_id=0, eos_token_id=eos)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", ["scout", "maverick"])
def test_greedy_equals_hf_across_chunk_boundaries(tiny_model, name):
    """Prompts of 5, 20 and 37 tokens (chunk 16) batched together, 30 new tokens each."""
    hf, _, path = tiny_model(name)
    model = jaxllm.load_model(path, max_model_len=100)
    prompts = _prompts([5, 20, 37], seed=1)
    ours = jaxllm.generate(model, prompts, max_new_tokens=30)
    for prompt, got in zip(prompts, ours, strict=True):
        want = hf_greedy(hf, prompt, 30)
        assert got == want
        assert len(set(got)) > 5  # a real continuation, not one repeated token


@pytest.fixture(scope="module")
def edge_model(tiny_model):
    """max_model_len 75 = 4 * 16 + 11: not a multiple of the chunk size, last chunk partial;
    block table exactly ceil(75 / 16) = 5 pages wide. EOS disabled so lengths are exact."""
    hf, _, path = tiny_model("scout")
    model = jaxllm.load_model(path, max_model_len=75, max_num_seqs=4)
    model.eos_token_ids = ()
    assert model.bucket_policy.pages_per_seq == 5
    assert model.bucket_policy.length_buckets == (16, 32, 64, 75)
    return hf, model


def test_prompt_plus_completion_equal_to_max_model_len(edge_model):
    hf, model = edge_model
    prompt = _prompts([50], seed=2)[0]
    out = jaxllm.generate(model, [prompt], max_new_tokens=25)[0]
    assert len(out) == 25
    assert out == hf_greedy(hf, prompt, 25, eos=None)


def test_one_token_over_max_model_len_is_refused(edge_model):
    _, model = edge_model
    with pytest.raises(ContextLengthError) as info:
        jaxllm.generate(model, _prompts([50])[0:1], max_new_tokens=26)
    assert isinstance(info.value, ValueError)
    assert str(info.value) == (
        "This model's maximum context length is 75 tokens. However, you requested 76 tokens "
        "(50 in the messages, 26 in the completion). Please reduce the length of the messages "
        "or completion.")


def test_prompt_of_exactly_max_model_len_is_refused(edge_model):
    _, model = edge_model
    with pytest.raises(ContextLengthError, match="75 in the messages, 1 in the completion"):
        jaxllm.generate(model, _prompts([75]), max_new_tokens=1)


@pytest.mark.parametrize("length", [15, 16, 17, 31, 32, 33, 63, 64, 65, 74])
def test_lengths_around_every_bucket_edge(edge_model, length):
    hf, model = edge_model
    prompt = _prompts([length], seed=length)[0]
    new = min(6, 75 - length)
    out = jaxllm.generate(model, [prompt], max_new_tokens=new)[0]
    assert out == hf_greedy(hf, prompt, new, eos=None)


def test_batch_sizes_around_every_batch_bucket(edge_model):
    """Batch buckets are 1, 2, 4 (max_num_seqs 4): sizes 1..5, the last split in two calls."""
    hf, model = edge_model
    assert model.bucket_policy.batch_buckets == (1, 2, 4)
    prompts = _prompts([7, 30, 19, 44, 12], seed=8)
    want = [hf_greedy(hf, p, 5, eos=None) for p in prompts]
    for size in range(1, 6):
        assert jaxllm.generate(model, prompts[:size], max_new_tokens=5) == want[:size]


def test_batch_of_prompts_in_the_last_partial_chunk(edge_model):
    """Several sequences whose chunk boundaries are offset, all ending in positions 64..74."""
    hf, model = edge_model
    prompts = _prompts([60, 66, 70, 62], seed=5)
    outs = jaxllm.generate(model, prompts, max_new_tokens=5)
    assert outs == [hf_greedy(hf, p, 5, eos=None) for p in prompts]


def test_stops_at_eos_and_stop_ids(tiny_model):
    hf, _, path = tiny_model("scout")
    model = jaxllm.load_model(path, max_model_len=100)
    prompt = _prompts([9], seed=3)[0]
    free = jaxllm.generate(model, [prompt], max_new_tokens=20, stop_token_ids=[])[0]
    stop_at = free[6]
    first = free.index(stop_at)
    out = jaxllm.generate(model, [prompt], max_new_tokens=20, stop_token_ids=[stop_at])[0]
    assert out == free[: first + 1]
    model.eos_token_ids = (stop_at,)  # as if generation_config.json named it EOS
    assert jaxllm.generate(model, [prompt], max_new_tokens=20)[0] == free[: first + 1]


def test_out_of_vocabulary_prompt_is_refused(tiny_model):
    model = jaxllm.load_model(tiny_model("scout")[2], max_model_len=100)
    with pytest.raises(ValueError, match=f"Token id {V} is out of vocabulary"):
        jaxllm.generate(model, [[1, 2, 3], [4, V]], max_new_tokens=2)


def test_no_compilation_after_warmup(tiny_model):
    model = jaxllm.load_model(tiny_model("maverick")[2], max_model_len=40, max_num_seqs=4)
    assert jaxllm.warmup(model, progress=False) == 3 * 3  # batch buckets 1,2,4 x lengths 16,32,40

    with count_compilations() as compiles:
        rng = np.random.default_rng(0)
        for call in range(30):
            batch = int(rng.integers(1, 7))  # past max_num_seqs: split into two batches
            lengths = rng.integers(1, 30, batch)
            new = int(rng.integers(1, 40 - lengths.max()))
            outs = jaxllm.generate(model, _prompts(lengths, seed=call), max_new_tokens=new,
                                  sampling=SamplingParams(temperature=0.8, seed=call)
                                  if call % 2 else None)
            assert len(outs) == batch and all(1 <= len(o) <= new for o in outs)
    assert compiles == []


def test_generate_tokens_is_pure_and_jittable(tiny_model):
    """Research code calls the core directly under its own jax.jit."""
    from jaxllm.runtime.generate import MAX_STOP_IDS
    from jaxllm.sample.sampling import GREEDY, SamplingArrays

    model = jaxllm.load_model(tiny_model("scout")[2], max_model_len=48)
    model.eos_token_ids = ()
    fn = jax.jit(jaxllm.generate_tokens, static_argnums=0, static_argnames=(
        "max_new_tokens", "max_model_len", "cache", "attention_impl"))
    tokens = np.array([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]], np.int32)
    out, count = fn(model.graphdef, model.params, tokens, np.array([3, 5], np.int32),
                    np.zeros((2, 2), np.uint32), np.array([6, 4], np.int32),
                    np.full((2, MAX_STOP_IDS), -1, np.int32),
                    SamplingArrays.from_params([GREEDY] * 2),
                    max_new_tokens=8, max_model_len=48, cache=model.bucket_policy.cache,
                    attention_impl="xla")
    assert np.asarray(count).tolist() == [6, 4]
    assert np.all(np.asarray(out)[0, 6:] == -1) and np.all(np.asarray(out)[1, 4:] == -1)
    want = (jaxllm.generate(model, [[5, 6, 7]], max_new_tokens=6)
            + jaxllm.generate(model, [[8, 9, 10, 11, 12]], max_new_tokens=4))
    assert [np.asarray(out)[0, :6].tolist(), np.asarray(out)[1, :4].tolist()] == want


def test_greedy_through_pallas_kernels_equals_hf(tiny_model):
    """Prefill and decode through the ragged paged kernel (interpret mode off GPU)."""
    hf, _, path = tiny_model("maverick")
    model = jaxllm.load_model(path, max_model_len=48, attention_impl="pallas")
    prompts = _prompts([13, 30], seed=6)
    outs = jaxllm.generate(model, prompts, max_new_tokens=12)
    assert outs == [hf_greedy(hf, p, 12) for p in prompts]
