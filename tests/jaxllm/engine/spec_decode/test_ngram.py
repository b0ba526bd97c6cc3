"""The n-gram proposer against a brute-force search written from the definition (vLLM's
NgramProposer: the longest suffix of min_n..max_n tokens that occurs earlier with a token after
it, its earliest occurrence, the up to k tokens after that)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxllm.engine.spec_decode import ngram
from tests.support import REPO


def brute_force(tokens: list[int], min_n: int, max_n: int, k: int, max_model_len: int):
    total = len(tokens)
    k = min(k, max_model_len - total)
    if k <= 0:
        return []
    for n in range(max_n, min_n - 1, -1):
        if n > total:
            continue
        suffix = tokens[total - n:]
        for start in range(0, total - n):  # start + n <= total - 1: a token follows
            if tokens[start: start + n] == suffix:
                return tokens[start + n: start + n + k]
    return []


@st.composite
def cases(draw):
    alphabet = draw(st.integers(1, 4))  # small alphabets make long repeats likely
    tokens = draw(st.lists(st.integers(0, alphabet), min_size=0, max_size=60))
    min_n = draw(st.integers(1, 6))
    max_n = draw(st.integers(min_n, 8))
    k = draw(st.integers(1, 6))
    max_model_len = len(tokens) + draw(st.integers(-2, 8))
    return tokens, min_n, max_n, k, max_model_len


@settings(max_examples=600, deadline=None)
@given(cases())
def test_matches_brute_force(case):
    tokens, min_n, max_n, k, max_model_len = case
    got = ngram.propose(np.asarray(tokens, np.int32), min_n=min_n, max_n=max_n, k=k,
                        max_model_len=max_model_len)
    assert got.tolist() == brute_force(tokens, min_n, max_n, k, max_model_len)


def test_vllm_docstring_example_and_edges():
    def p(tokens, min_n=2, max_n=3, k=4, max_model_len=100):
        return ngram.propose(np.asarray(tokens), min_n=min_n, max_n=max_n, k=k,
                             max_model_len=max_model_len).tolist()

    assert p([1, 2, 3, 4, 2, 3]) == [4, 2, 3]  # [4, 2, 3] has no match, [2, 3] does
    assert p([1, 2, 3, 4, 5]) == []
    assert p([7, 7, 7, 7], min_n=1, max_n=2, k=3) == [7, 7]  # overlapping, earliest occurrence
    assert p([1, 2, 9, 1, 2, 8, 1, 2], min_n=2, max_n=2, k=1) == [9]  # earliest, not latest
    assert p([1, 2, 3, 1, 2, 3], max_model_len=7) == [1]  # one slot left before max_model_len
    assert p([1, 2, 3, 1, 2, 3], max_model_len=6) == []
    assert p([5], min_n=1, max_n=1) == []
    assert p([], min_n=1, max_n=1) == []


def test_batch_pads_with_minus_one():
    seqs = [np.asarray([1, 2, 1, 2]), np.asarray([3, 4]), np.asarray([5, 5, 5, 5, 5, 5])]
    drafts, counts = ngram.propose_batch(seqs, min_n=1, max_n=2, k=3, max_model_len=64)
    assert counts.tolist() == [2, 0, 3]
    assert drafts.tolist() == [[1, 2, -1], [-1, -1, -1], [5, 5, 5]]


def test_acceptance_replay_on_a_hand_worked_request():
    """scripts/ngram_acceptance.py's replay: prompt [5, 1, 2, 3, 7], greedy output
    [1, 2, 3, 8, 2], 1-grams, k = 3. Step 1 drafts [2, 3, 7] after "1" and accepts [2, 3]
    (the model says 8), emitting 3 tokens; step 2 finds no "8" before and emits the last one."""
    import importlib.util
    import sys

    path = REPO / "scripts" / "ngram_acceptance.py"
    spec = importlib.util.spec_from_file_location("ngram_acceptance", path)
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # its dataclass looks its module up
    spec.loader.exec_module(script)
    t = script.replay([5, 1, 2, 3, 7], [1, 2, 3, 8, 2], min_n=1, max_n=1, k=3,
                      max_model_len=64)
    assert (t.steps, t.tokens, t.drafting_steps, t.drafted, t.accepted) == (2, 4, 1, 3, 2)
    assert t.at_position[:, :3].tolist() == [[1, 1, 1], [1, 1, 0]]
    short = script.replay([5, 1, 2, 3, 7], [1, 2], min_n=1, max_n=1, k=3, max_model_len=64)
    assert (short.steps, short.tokens, short.accepted) == (1, 1, 1)  # the output ends inside
