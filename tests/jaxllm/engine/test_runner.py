"""Engine steps over a shared paged cache: chunked prefill and decode equal HF's logits."""

from __future__ import annotations

import numpy as np
import pytest

import jaxllm
from jaxllm.engine.runner import ModelRunner
from jaxllm.layout import SeqPiece
from tests.support import hf_models

pytestmark = pytest.mark.heavy  # end to end: compiles engines or models (tests/conftest.py)

REL_TOL = 1e-4


def test_chunked_prefill_and_decode_over_scattered_pages(tiny_model):
    """Two sequences with interleaved, out-of-order pages; prefill split at odd points so
    chunks straddle the 16-token attention chunks at offset places; then decode steps."""
    hf, _, path = tiny_model("scout")
    model = jaxllm.load_model(path, max_model_len=75, page_size=8, hybrid_kv_cache=False)
    runner = ModelRunner(model, model.bucket_policy.for_engine(num_pages=24))
    rng = np.random.default_rng(0)
    a = rng.integers(3, 333, 70).tolist()
    b = rng.integers(3, 333, 40).tolist()
    pages_a = [20, 3, 11, 24, 7, 15, 22, 5, 9, 1]  # 10 pages: the table is ceil(75 / 8) wide
    pages_b = [4, 18, 2, 13, 21, 8]
    ref_a, ref_b = hf_models.hf_logits(hf, [a])[0], hf_models.hf_logits(hf, [b])[0]

    def check(logits, refs):
        for got, want in zip(logits, refs, strict=True):
            assert np.abs(got - want).max() < REL_TOL * np.abs(want).max()

    # (sequence, tokens already cached, new tokens) per step.
    schedule = [
        [("a", 0, 13), ("b", 0, 30)],  # two prefill chunks
        [("b", 30, 1), ("a", 13, 32)],  # a decode row beside a prefill chunk
        [("a", 45, 1), ("b", 31, 9)],  # b finishes its prompt in the last partial page
        *[[("a", n, 1)] for n in range(46, 70)],  # a decodes into the last partial chunk
    ]
    seqs = {"a": (a, pages_a, ref_a), "b": (b, pages_b, ref_b)}
    for step in schedule:
        chunks = [SeqPiece([seqs[k][1]], done, seqs[k][0][done:done + n])
                  for k, done, n in step]
        check(runner.logits(chunks), [seqs[k][2][done + n - 1] for k, done, n in step])


def test_cache_is_donated(tiny_model):
    model = jaxllm.load_model(tiny_model("maverick")[2], max_model_len=32,
                              hybrid_kv_cache=False)
    runner = ModelRunner(model, model.bucket_policy.for_engine(num_pages=4))
    before = runner.cache[0][0]
    runner.logits([SeqPiece([[1, 2]], 0, [5, 6, 7])])
    assert before.is_deleted()  # updated in place, not copied


def test_a_row_fed_from_the_last_picks_equals_the_same_row_fed_by_the_host(tiny_model):
    """Async scheduling's input: a decode row whose token is the previous step's pick, taken
    on the device (``from_last``), computes what the row given that token by the host does."""
    from jaxllm import SamplingParams
    from jaxllm.engine.batch import InputBatch, inputs_for

    model = jaxllm.load_model(tiny_model("scout")[2], max_model_len=32, page_size=8,
                              hybrid_kv_cache=False, max_num_seqs=2)
    policy = model.bucket_policy.for_engine(num_pages=8)
    greedy = [SamplingParams(temperature=0.0, seed=0)] * 2
    picks = []
    for from_device in (False, True):
        runner = ModelRunner(model, policy)
        batch = InputBatch(policy, runner.groups.group_chunk, runner.mask_words)
        first = inputs_for(batch, [SeqPiece([[1, 2]], 0, [5, 6, 7]),
                                   SeqPiece([[3, 4]], 0, [9, 8])], greedy)
        picked, _ = runner.run(first).result()
        # Both sequences decode their pick; in the device-fed run the host sends 0 instead.
        fed = [0, 0] if from_device else picked.tokens.tolist()
        second = inputs_for(batch, [SeqPiece([[1, 2]], 3, [fed[0]]),
                                    SeqPiece([[3, 4]], 2, [fed[1]])], greedy, steps=[1, 1])
        if from_device:
            second.from_last[:2] = [0, 1]
        picks.append(runner.run(second).result()[0])
    np.testing.assert_array_equal(picks[0].tokens, picks[1].tokens)
    np.testing.assert_allclose(picks[0].logprobs, picks[1].logprobs, rtol=1e-6)
