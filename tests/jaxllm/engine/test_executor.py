"""The executor in one process, its step inputs, and the watchdog that bounds a step.

Several processes in lockstep are tested end to end in tests/jaxllm/serve/test_multiprocess.py.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import jax
import numpy as np
import pytest

import jaxllm
from jaxllm import SamplingParams
from jaxllm.engine import Engine
from jaxllm.engine.batch import inputs_for
from jaxllm.engine.executor import Watchdog, agree_on_minimum, pack, unpack
from jaxllm.layout import SeqPiece


@pytest.fixture(scope="module")
def engine(tiny_model):
    model = jaxllm.load_model(tiny_model("scout")[2], max_model_len=64, page_size=8,
                              max_num_seqs=2)
    return Engine(model, num_pages=32, max_num_batched_tokens=16)


def test_empty_inputs_have_the_shapes_and_dtypes_of_a_prepared_step(engine):
    groups = engine.groups.num_groups
    pieces = [SeqPiece([[1, 2]] * groups, 3, [5, 6]), SeqPiece([[3]] * groups, 0, [7])]
    greedy = [SamplingParams(temperature=0.0, seed=s) for s in (1, 2)]
    prepared = inputs_for(engine.batch, pieces, greedy)
    empty = engine.runner.empty_inputs(16, 2)
    shapes = jax.tree.map(lambda a: (np.shape(a), np.asarray(a).dtype), prepared)
    assert jax.tree.map(lambda a: (np.shape(a), np.asarray(a).dtype), empty) == shapes
    # The abstract spec (memory plan, AOT cases) is the same tree of the same shapes.
    spec = engine.runner.spec(16, 2)
    assert jax.tree.map(lambda a: (a.shape, np.dtype(a.dtype)), spec) == shapes
    # The same inputs run twice over the same cache give the same picks.
    once, _ = engine.executor.run(prepared).result()
    again, _ = engine.executor.run(prepared).result()
    np.testing.assert_array_equal(once.tokens, again.tokens)


def test_one_process_needs_no_group(engine):
    assert not engine.executor.distributed
    assert agree_on_minimum(7) == 7
    engine.executor.stop()  # nothing to stop
    with pytest.raises(RuntimeError, match="process 0 leads"):
        engine.executor.follow()


def test_watchdog_fires_only_when_a_guarded_block_outlives_the_timeout():
    fired: list[str] = []
    done = threading.Event()
    dog = Watchdog(0.3, lambda reason: (fired.append(reason), done.set()))
    for _ in range(3):
        with dog.guard("a quick step"):
            time.sleep(0.05)
    time.sleep(0.5)
    assert fired == []
    with dog.guard("a slow step"):
        assert done.wait(5)
    assert "a slow step did not finish within the step timeout of 0.3 s" in fired[0]


def test_watchdog_refuses_a_timeout_that_is_not_positive():
    with pytest.raises(ValueError, match="step timeout 0 must be > 0"):
        Watchdog(0, lambda reason: None)


def test_pack_and_unpack_keep_every_bit(engine):
    groups = engine.groups.num_groups
    chunks = [SeqPiece([[1, 2]] * groups, 3, [5, 6]), SeqPiece([[3]] * groups, 0, [7])]
    sampling = [SamplingParams(temperature=0.7, top_p=0.9, min_p=1e-7),
                SamplingParams(temperature=0.0)]
    sampling = [dataclasses.replace(p, seed=s)
                for p, s in zip(sampling, (2**32 - 1, 5), strict=True)]
    inputs = inputs_for(engine.batch, chunks, sampling, steps=[4, 0])
    message = pack(inputs)
    assert message.dtype == np.int32 and message.ndim == 1
    back = unpack(message, engine.runner.empty_inputs(16, 2))
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(inputs), strict=True):
        assert got.dtype == np.asarray(want).dtype
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="a message of"):
        unpack(message[:-1], inputs)


def test_a_scoring_steps_message_round_trips(engine):
    groups = engine.groups.num_groups
    pieces = [SeqPiece([[1, 2]] * groups, 0, [5, 6, 9])]
    inputs = inputs_for(engine.batch, pieces, [SamplingParams(temperature=0.0, seed=3)],
                        targets=[[6, 9, -1]])
    assert inputs.scores and inputs.targets.tolist() == [6, 9] + [-1] * 14
    back = unpack(pack(inputs), engine.runner.empty_inputs(16, 1))
    np.testing.assert_array_equal(back.targets, inputs.targets)
    np.testing.assert_array_equal(back.meta.slot_mapping, inputs.meta.slot_mapping)
