"""The penalty state and its application, against numpy references written from vLLM's
definitions: on one device and with the vocabulary split over a simulated 8-device mesh."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxllm.engine.batch import SlotPlan, StepPlan, penalty_rows
from jaxllm.layout import SeqPiece
from jaxllm.sample.penalties import (
    init_state,
    no_rows,
    penalize,
    penalize_drafts,
    record_accepted,
    state_bytes_per_device,
    state_sharding,
)
from jaxllm.sample.sampling import SamplingParams
from jaxllm.sharding import make_mesh

VOCAB, PADDED, SLOTS = 21, 24, 4  # the padded entries are -inf, as the model's logits


def build_rows(pieces, penalties, num_rows, num_seqs):
    """``penalty_rows`` of pieces laid out back to back; ``penalties`` per piece:
    (penalty slot, prompt length), or None."""
    plans = [SlotPlan(piece, -1 if p is None else p[0], 0, p is not None,
                      0 if p is None else p[1]) for piece, p in zip(pieces, penalties, strict=True)]
    starts = np.zeros(num_seqs + 1, np.int64)
    starts[1: len(pieces) + 1] = np.cumsum([len(c.tokens) for c in pieces])
    starts[len(pieces) + 1:] = starts[len(pieces)]
    positions = np.zeros(num_rows, np.int64)
    positions[: starts[-1]] = np.concatenate(
        [c.num_cached + np.arange(len(c.tokens)) for c in pieces])
    return penalty_rows(StepPlan.of(plans), positions, starts, num_rows, num_seqs, SLOTS)


def reference(logits, prompt, output, presence, frequency, repetition):
    """vLLM's penalties from the definition: repetition on every token of prompt or output
    (positive logits divided, others multiplied), then frequency and presence on the output."""
    out = np.array(logits, np.float64)
    counts = np.zeros(out.shape[-1])
    for t in output:
        counts[t] += 1
    seen = set(prompt) | set(output)
    for t in seen:
        out[t] = out[t] / repetition if out[t] > 0 else out[t] * repetition
    for t in range(out.shape[-1]):
        out[t] -= frequency * counts[t] + presence * (counts[t] > 0)
    return out


class Seq:
    """A request's tokens (prompt, then output), its penalties and its slot (None: none)."""

    def __init__(self, rng, num_prompt, num_output, slot, penalties):
        self.tokens = rng.integers(0, VOCAB, num_prompt + num_output).tolist()
        self.num_prompt, self.slot, self.penalties = num_prompt, slot, penalties


def run_steps(steps, mesh, seed=0):
    """Runs ``steps`` (each a list of (Seq, first position, rows)) through ``penalize`` and
    compares each sequence's penalised logits with the reference over its tokens so far."""
    rng = np.random.default_rng(seed)
    vocab_sharding = None
    if mesh is not None:
        vocab_sharding = NamedSharding(mesh, PartitionSpec(None, "model"))
    state = jax.device_put(init_state(SLOTS, PADDED), state_sharding(SLOTS, PADDED, mesh))
    step_fn = jax.jit(lambda *a: penalize(*a, mesh=mesh), donate_argnums=(1,))
    for step in steps:
        num_seqs = 4  # a batch bucket: padding slots included
        chunks = [SeqPiece([[1]], start, seq.tokens[start : start + n])
                  for seq, start, n in step]
        num_rows = 16
        rows = build_rows(chunks, [None if seq.slot is None else (seq.slot, seq.num_prompt)
                                   for seq, _, _ in step], num_rows, num_seqs)
        tokens = np.zeros(num_rows, np.int32)
        flat = [t for c in chunks for t in c.tokens]
        tokens[: len(flat)] = flat
        logits = rng.normal(0, 3, (num_seqs, PADDED)).astype(np.float32)
        logits[:, VOCAB:] = -np.inf
        params = [seq.penalties for seq, _, _ in step]
        params += [SamplingParams()] * (num_seqs - len(params))
        values = [np.asarray([getattr(p, name) for p in params], np.float32)
                  for name in ("presence_penalty", "frequency_penalty", "repetition_penalty")]
        device_logits = logits if mesh is None else jax.device_put(logits, vocab_sharding)
        out, state = step_fn(device_logits, state, rows, tokens, *values)
        out = np.asarray(out)
        for b, (seq, start, n) in enumerate(step):
            seen = seq.tokens[: start + n]
            expected = logits[b].astype(np.float64)
            if seq.slot is not None:
                expected = reference(logits[b], seen[: seq.num_prompt], seen[seq.num_prompt:],
                                     seq.penalties.presence_penalty,
                                     seq.penalties.frequency_penalty,
                                     seq.penalties.repetition_penalty)
            np.testing.assert_allclose(out[b], expected, rtol=1e-6, atol=1e-6)
            assert np.all(np.isneginf(out[b, VOCAB:]))
    return state


def scenario(seed=0):
    """Chunked prefills, decodes, a recompute from position 0 with outputs re-fed, a slot
    reused by a new request (reset), and unpenalised sequences beside them."""
    rng = np.random.default_rng(seed)
    p = SamplingParams(presence_penalty=0.7, frequency_penalty=-0.4, repetition_penalty=1.6)
    q = SamplingParams(presence_penalty=-1.5, frequency_penalty=1.1, repetition_penalty=0.5)
    a = Seq(rng, 7, 4, 2, p)
    b = Seq(rng, 5, 4, None, SamplingParams())
    c = Seq(rng, 4, 5, 0, q)
    d = Seq(rng, 3, 2, 2, q)  # takes a's slot once a is gone
    return [
        [(a, 0, 5), (b, 0, 5), (c, 0, 4)],  # first chunks (reset)
        [(a, 5, 2), (b, 5, 1), (c, 4, 1)],  # a's last prompt rows, c feeds its first output
        [(a, 7, 1), (c, 5, 1), (b, 6, 1)],  # decodes
        [(c, 0, 7)],  # c recomputed after a preemption: prompt and outputs re-fed
        [(a, 8, 1), (c, 7, 1)],
        [(d, 0, 3), (c, 8, 1)],  # slot 2 reset for d: nothing of a remains
        [(d, 3, 1), (b, 7, 1)],
    ]


def test_penalties_equal_the_reference_on_one_device():
    run_steps(scenario(), None)


def test_penalties_equal_the_reference_with_the_vocabulary_split_over_8_devices():
    assert len(jax.devices()) == 8
    mesh = make_mesh(model=8)
    state = run_steps(scenario(seed=1), mesh, seed=1)
    spec = state.counts.sharding.spec
    assert tuple(spec) == (None, "model")  # each device holds its slice of the vocabulary
    assert state_bytes_per_device(SLOTS, PADDED, mesh) == SLOTS * PADDED // 8 * 5


def test_a_batch_without_penalties_leaves_the_state_alone():
    state = init_state(SLOTS, PADDED)
    state = state._replace(counts=state.counts.at[1, 3].set(5))
    logits = np.ones((2, PADDED), np.float32)
    rows = no_rows(8, 2)
    values = [np.zeros(2, np.float32)] * 2 + [np.full(2, 2.0, np.float32)]
    out, new = penalize(logits, state, rows, np.arange(8, dtype=np.int32), *values)
    np.testing.assert_array_equal(out, logits)
    assert int(new.counts[1, 3]) == 5 and int(new.counts.sum()) == 5


def test_rows_name_prompt_and_output_positions_and_check_slots():
    chunks = [SeqPiece([[1]], 3, [5, 6, 7, 8]), SeqPiece([[1]], 0, [9, 9])]
    rows = build_rows(chunks, [(1, 5), None], 8, 4)
    assert rows.seq_slot.tolist() == [1, -1, -1, -1]
    assert rows.seq_reset.tolist() == [0, 0, 0, 0]
    assert rows.row_slot.tolist() == [1, 1, 1, 1, -1, -1, -1, -1]
    assert rows.row_output.tolist() == [0, 0, 1, 1, 0, 0, 0, 0]  # positions 5, 6 are output
    assert build_rows(chunks[1:], [(0, 2)], 8, 4).seq_reset[0] == 1
    with pytest.raises(ValueError, match="penalty slot 4 is outside"):
        build_rows(chunks[1:], [(4, 2)], 8, 4)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(presence_penalty=2.1), r"presence_penalty=2.1 must be in \[-2, 2\]"),
    (dict(frequency_penalty=-3), r"frequency_penalty=-3 must be in \[-2, 2\]"),
    (dict(repetition_penalty=0.0), "repetition_penalty=0.0 must be > 0"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty=inf must be > 0"),
])
def test_sampling_params_check_the_penalties(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        SamplingParams(**kwargs)
    assert not SamplingParams(repetition_penalty=1.0, presence_penalty=0).has_penalties
    assert SamplingParams(repetition_penalty=3.5).has_penalties  # (0, inf), as vLLM


def test_the_state_stays_split_over_the_vocabulary_in_the_compiled_step():
    """No all-gather (CPU partitioner): each device reads and writes only its slice, and the
    updated state leaves split as it came in. The GPU partitioner did gather it before the
    pins in ``penalize``; ``tests/jaxllm/aot/test_aot.py`` checks the compiled H100 step."""
    mesh = make_mesh(model=8)
    slots, vocab, rows = 4, 64, 16
    state = jax.device_put(init_state(slots, vocab), state_sharding(slots, vocab, mesh))
    logits = jax.device_put(np.zeros((slots, vocab), np.float32),
                            NamedSharding(mesh, PartitionSpec(None, "model")))
    values = [np.zeros(slots, np.float32)] * 3
    step = jax.jit(lambda *a: penalize(*a, mesh=mesh), donate_argnums=(1,))
    args = (logits, state, no_rows(rows, slots), np.zeros(rows, np.int32), *values)
    compiled = step.lower(*args).compile()
    assert "all-gather" not in compiled.as_text()
    _, new = step(*args)
    assert all(a.sharding.spec == PartitionSpec(None, "model") for a in new)


def _draft_case(mesh, seed):
    """Three penalised sequences with histories in the state (one with its slot reset by a
    recompute, one beside an unpenalised slot) and drafts, some padded with -1: the
    verifying step's positions past the first, then the accepted drafts recorded."""
    rng = np.random.default_rng(seed)
    k, seqs = 3, 4
    p = SamplingParams(presence_penalty=0.7, frequency_penalty=-0.4, repetition_penalty=1.6)
    q = SamplingParams(presence_penalty=-1.5, frequency_penalty=1.1, repetition_penalty=0.5)
    a, c, d = Seq(rng, 5, 3, 2, p), Seq(rng, 4, 2, 0, q), Seq(rng, 3, 4, 3, p)
    b = Seq(rng, 4, 2, None, SamplingParams())
    state = run_steps([[(a, 0, 8), (b, 0, 6)], [(c, 0, 6), (d, 0, 7)]], mesh, seed=seed)
    # Drafts repeat tokens already generated and each other, so counts above 1 occur.
    drafts = np.array([[a.tokens[6], a.tokens[6], 7], [c.tokens[5], 3, -1], [1, 2, 3],
                       [d.tokens[0], -1, -1]], np.int32)
    num_drafts = np.array([3, 2, 3, 1], np.int32)
    slot = np.array([2, 0, -1, 3], np.int32)
    params = [a.penalties, c.penalties, b.penalties, d.penalties]
    values = [np.asarray([getattr(x, name) for x in params], np.float32)
              for name in ("presence_penalty", "frequency_penalty", "repetition_penalty")]
    logits = rng.normal(0, 3, (seqs, k, PADDED)).astype(np.float32)
    logits[..., VOCAB:] = -np.inf
    if mesh is not None:
        logits = jax.device_put(logits, NamedSharding(mesh, PartitionSpec(None, None, "model")))
    out = np.asarray(jax.jit(lambda *x: penalize_drafts(*x, mesh=mesh))(
        logits, state, slot, drafts, num_drafts, *values))
    logits = np.asarray(logits)
    for s, seq in enumerate([a, c, b, d]):
        for j in range(k):
            expected = logits[s, j].astype(np.float64)
            if seq.slot is not None:
                drafted = drafts[s, : min(j + 1, num_drafts[s])].tolist()
                expected = reference(logits[s, j], seq.tokens[: seq.num_prompt],
                                     seq.tokens[seq.num_prompt:] + drafted,
                                     *(v[s] for v in values))
            np.testing.assert_allclose(out[s, j], expected, rtol=1e-6, atol=1e-6,
                                       err_msg=f"sequence {s}, position {j + 1}")
    accepted = np.array([2, 0, 3, 1], np.int32)
    new = jax.jit(lambda *x: record_accepted(*x, mesh=mesh))(state, slot, drafts, accepted)
    counts = np.array(state.counts)
    for s in (0, 1, 3):
        for t in drafts[s, : accepted[s]]:
            counts[slot[s], t] += 1
    np.testing.assert_array_equal(np.asarray(new.counts), counts)  # slot-less b: nothing
    np.testing.assert_array_equal(np.asarray(new.prompt_seen), np.asarray(state.prompt_seen))
    return new


def test_draft_positions_count_the_drafts_before_them_on_one_device():
    _draft_case(None, 3)


def test_draft_positions_with_the_vocabulary_split_over_8_devices():
    new = _draft_case(make_mesh(model=8), 4)
    assert all(a.sharding.spec == PartitionSpec(None, "model") for a in new)


def test_draft_rows_are_not_recorded_before_the_pick():
    """A penalised piece ending in two drafts records its fed token, not the drafts."""
    plan = SlotPlan(SeqPiece([[1]], 6, [5, 30, 31]), 1, 0, True, 4, num_drafts=2)
    other = SlotPlan(SeqPiece([[1]], 2, [7, 8]), 2, 0, True, 3)
    starts = np.array([0, 3, 5, 5, 5])
    positions = np.array([6, 7, 8, 2, 3, 0, 0, 0])
    rows = penalty_rows(StepPlan.of([plan, other]), positions, starts, 8, 4, SLOTS)
    assert rows.row_slot.tolist() == [1, -1, -1, 2, 2, -1, -1, -1]
    assert rows.row_output.tolist() == [1, 0, 0, 0, 1, 0, 0, 0]
