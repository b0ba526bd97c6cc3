"""Verification: greedy rows against a prefix-match loop written from the definition; sampled
rows by chi-square tests that every emitted position is distributed as the target's p."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxllm.sample.sampling import SamplingArrays, SamplingParams, sample, seed_keys, seed_words
from jaxllm.sample.verify import verify
from jaxllm.sharding import make_mesh

K = 3
V = 8
ROWS = 40_000
# Position j's target logits; -inf entries are filtered out (top-k/top-p/mask) and p is 0 there.
TARGET = np.array([
    [2.0, 1.5, 1.2, 0.6, 0.0, -0.4, -1.0, -3.0],
    [0.3, -np.inf, 1.0, 1.0, -0.5, 2.2, -np.inf, 0.0],
    [-1.0, 0.0, 1.0, 2.0, 3.0, -np.inf, -np.inf, -np.inf],
    [1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.0, -2.0],
], np.float32)
# A non-trivial draft distribution q_j per drafted position, with mass on filtered tokens too.
DRAFT_Q = np.array([
    [0.05, 0.1, 0.4, 0.05, 0.1, 0.1, 0.1, 0.1],
    [0.2, 0.1, 0.1, 0.3, 0.1, 0.1, 0.05, 0.05],
    [0.1, 0.1, 0.1, 0.1, 0.1, 0.2, 0.2, 0.1],
], np.float64)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.where(np.isfinite(x), np.exp(x - x[np.isfinite(x)].max()), 0.0)
    return e / e.sum()


P = np.stack([_softmax(row.astype(np.float64)) for row in TARGET])


def _keys(seeds) -> jax.Array:
    return seed_keys(jnp.asarray(seed_words(seeds)))


def _run(drafts, num_drafts, greedy_rows, draft_probs=None, logits=None, seeds=None,
         first=None):
    rows = drafts.shape[0]
    logits = np.broadcast_to(TARGET, (rows, K + 1, V)) if logits is None else logits
    seeds = np.arange(rows) + 1000 if seeds is None else seeds
    first = (np.arange(rows) % 7) * 13 if first is None else first
    out = jax.jit(verify)(jnp.asarray(logits), jnp.asarray(drafts, jnp.int32),
                          jnp.asarray(num_drafts, jnp.int32), jnp.asarray(greedy_rows),
                          _keys(seeds), jnp.asarray(first, jnp.int32),
                          None if draft_probs is None else jnp.asarray(draft_probs, jnp.float32))
    return np.asarray(out.tokens), np.asarray(out.num_accepted)


def _reference_greedy(logits, drafts, num_drafts):
    """Greedy verification from the definition: walk the drafts while each equals the argmax."""
    tokens = np.full((len(drafts), K + 1), -1)
    accepted = np.zeros(len(drafts), int)
    for b in range(len(drafts)):
        j = 0
        while j < num_drafts[b] and drafts[b, j] == np.argmax(logits[b, j]):
            tokens[b, j] = drafts[b, j]
            j += 1
        tokens[b, j] = np.argmax(logits[b, j])
        accepted[b] = j
    return tokens, accepted


@pytest.mark.parametrize("mixed", [False, True])
def test_greedy_rows_accept_the_longest_matching_prefix(mixed):
    rng = np.random.default_rng(0)
    rows, vocab = 64, 50
    logits = rng.normal(size=(rows, K + 1, vocab)).astype(np.float32)
    best = logits.argmax(-1)
    drafts = np.where(rng.random((rows, K)) < 0.7, best[:, :K], rng.integers(0, vocab, (rows, K)))
    num_drafts = rng.integers(0, K + 1, rows)
    greedy_rows = np.ones(rows, bool)
    if mixed:  # sampled rows in the batch take the other branch; greedy rows are unchanged
        greedy_rows[::3] = False
    tokens, accepted = _run(drafts, num_drafts, greedy_rows, logits=logits)
    want_tokens, want_accepted = _reference_greedy(logits, drafts, num_drafts)
    g = greedy_rows
    np.testing.assert_array_equal(accepted[g], want_accepted[g])
    np.testing.assert_array_equal(tokens[g], want_tokens[g])
    assert set(want_accepted[g]) == {0, 1, 2, 3}  # every run length occurs
    assert (accepted <= num_drafts).all()


def _positions_match_p(tokens, accepted):
    """For each position j, the tokens emitted there (rows whose output reached j) against p_j."""
    pvalues = []
    for j in range(K + 1):
        emitted = tokens[accepted >= j, j]
        counts = np.bincount(emitted, minlength=V)
        assert emitted.size > 1000, (j, emitted.size)
        assert np.all(counts[P[j] == 0] == 0), (j, counts)  # filtered tokens never emitted
        support = P[j] > 0
        pvalues.append(stats.chisquare(counts[support], emitted.size * P[j, support]).pvalue)
    return pvalues


def _draft_from(dist, rng):
    return np.stack([rng.choice(V, ROWS, p=q) for q in dist], axis=1)


@pytest.mark.parametrize("with_q", [False, True], ids=["point_mass", "draft_q"])
def test_each_position_is_distributed_as_the_target(with_q):
    rng = np.random.default_rng(1)
    drafts = _draft_from(DRAFT_Q, rng)
    if not with_q:  # point-mass drafts: often the likely token, sometimes a filtered one
        drafts = np.where(rng.random((ROWS, K)) < 0.8, P[:K].argmax(-1), drafts)
    num_drafts = rng.choice(K + 1, ROWS, p=[0.1, 0.1, 0.2, 0.6])
    q = np.broadcast_to(DRAFT_Q, (ROWS, K, V)) if with_q else None
    tokens, accepted = _run(drafts, num_drafts, np.zeros(ROWS, bool), draft_probs=q)
    assert (accepted <= num_drafts).all()
    np.testing.assert_array_equal(tokens[np.arange(ROWS), accepted] >= 0, True)
    pvalues = _positions_match_p(tokens, accepted)
    assert min(pvalues) > 1e-4, pvalues
    # Acceptance at each drafted position: P = sum_x min(p(x), q(x)) for drafts drawn from q;
    # p(x) for a point mass at x.
    for j in range(K):
        at = (accepted >= j) & (num_drafts > j)
        took = accepted[at] > j
        if with_q:
            rate = np.minimum(P[j], DRAFT_Q[j]).sum()
        else:
            rate = P[j, drafts[at, j]].mean()
        assert stats.binomtest(int(took.sum()), int(at.sum()), rate).pvalue > 1e-4, (j, rate)


def test_chi_square_detects_a_mismatched_q():
    """The same test rejects verification told the wrong q (drafts drawn from DRAFT_Q, q given
    as uniform): the rule is only exact with the draft's real distribution."""
    rng = np.random.default_rng(2)
    drafts = _draft_from(DRAFT_Q, rng)
    wrong_q = np.full((ROWS, K, V), 1.0 / V)
    tokens, accepted = _run(drafts, np.full(ROWS, K), np.zeros(ROWS, bool), draft_probs=wrong_q)
    assert min(_positions_match_p(tokens, accepted)[:K]) < 1e-10


def test_rows_do_not_depend_on_their_batch():
    rng = np.random.default_rng(3)
    rows = 48
    drafts = rng.integers(0, V, (rows, K))
    num_drafts = rng.integers(0, K + 1, rows)
    greedy_rows = rng.random(rows) < 0.3
    seeds, first = rng.integers(0, 2**40, rows), rng.integers(0, 5000, rows)
    whole = _run(drafts, num_drafts, greedy_rows, seeds=seeds, first=first)
    part = rng.permutation(rows)[:17]
    alone = _run(drafts[part], num_drafts[part], greedy_rows[part], seeds=seeds[part],
                 first=first[part])
    np.testing.assert_array_equal(whole[0][part], alone[0])
    np.testing.assert_array_equal(whole[1][part], alone[1])
    moved = _run(drafts, num_drafts, greedy_rows, seeds=seeds, first=first + 1)
    assert (moved[0] != whole[0]).any()  # the token index is part of the key


def test_a_row_without_drafts_picks_what_the_sampler_picks():
    """No drafts and no filters: the bonus draw uses the ordinary sampler's key and noise."""
    rng = np.random.default_rng(4)
    rows, vocab = 32, 64
    raw = rng.normal(size=(rows, vocab)).astype(np.float32)
    temperature = rng.uniform(0.5, 2.0, rows).astype(np.float32)
    seeds, first = rng.integers(0, 2**40, rows), rng.integers(0, 100, rows)
    logits = np.repeat((raw / temperature[:, None])[:, None], K + 1, axis=1)
    tokens, accepted = _run(np.zeros((rows, K)), np.zeros(rows), np.zeros(rows, bool),
                            logits=logits, seeds=seeds, first=first)
    params = [SamplingParams(temperature=float(t)) for t in temperature]
    keys = jax.vmap(jax.random.fold_in)(_keys(seeds), jnp.asarray(first, jnp.int32))
    want = sample(jnp.asarray(raw), SamplingArrays.from_params(params), keys)
    assert (accepted == 0).all()
    np.testing.assert_array_equal(tokens[:, 0], np.asarray(want))
    assert (tokens[:, 1:] == -1).all()


def test_vocab_sharded_mesh_gives_the_same_result():
    mesh = make_mesh(model=8)
    rng = np.random.default_rng(5)
    rows, vocab = 16, 256
    logits = rng.normal(size=(rows, K + 1, vocab)).astype(np.float32)
    logits[..., 250:] = -np.inf  # padded vocabulary
    drafts = np.where(rng.random((rows, K)) < 0.5, logits[:, :K].argmax(-1),
                      rng.integers(0, 250, (rows, K)))
    num_drafts = rng.integers(0, K + 1, rows)
    greedy_rows = rng.random(rows) < 0.5
    q = rng.dirichlet(np.ones(vocab), (rows, K)).astype(np.float32)
    args = (jnp.asarray(drafts, jnp.int32), jnp.asarray(num_drafts, jnp.int32),
            jnp.asarray(greedy_rows), _keys(np.arange(rows)), jnp.zeros(rows, jnp.int32))
    one = jax.jit(verify)(jnp.asarray(logits), *args, jnp.asarray(q))
    spec = jax.sharding.PartitionSpec(None, None, "model")
    sharded = [jax.device_put(x, jax.sharding.NamedSharding(mesh, spec)) for x in (logits, q)]
    run = jax.jit(lambda x, *a: verify(x, *a[:-1], a[-1], mesh))
    many = run(sharded[0], *args, sharded[1])
    np.testing.assert_array_equal(np.asarray(many.tokens), np.asarray(one.tokens))
    np.testing.assert_array_equal(np.asarray(many.num_accepted), np.asarray(one.num_accepted))


@pytest.mark.parametrize("with_q", [False, True], ids=["point_mass", "draft_q"])
def test_vocab_sharded_verification_never_gathers_the_vocabulary(with_q):
    mesh = make_mesh(model=8)
    rows, vocab = 4, 4096
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, None, "model"))
    logits = jax.ShapeDtypeStruct((rows, K + 1, vocab), jnp.float32, sharding=spec)
    q = jax.ShapeDtypeStruct((rows, K, vocab), jnp.float32, sharding=spec) if with_q else None
    run = jax.jit(lambda x, d, n, g, s, f, q: verify(x, d, n, g, s, f, q, mesh))
    hlo = run.lower(logits, jnp.zeros((rows, K), jnp.int32), jnp.zeros(rows, jnp.int32),
                    jnp.zeros(rows, bool), _keys(np.arange(rows)), jnp.zeros(rows, jnp.int32),
                    q).compile().as_text()
    gathers = [line for line in hlo.splitlines() if "all-gather" in line and "=" in line]
    # Only per-shard (value, index) pairs cross devices, never a [.., 512] vocabulary slice.
    assert gathers and all("512" not in g and "4096" not in g for g in gathers), gathers


def test_filtered_distribution_is_the_samplers_definition():
    """Per sampling setting, softmax(filtered_distribution) equals the distribution written
    from SamplingParams' definition (the sampler tests' reference), in vocabulary order."""
    from jaxllm.sample.verify import filtered_distribution
    from tests.jaxllm.sample.test_sampling import CASES, LOGITS, expected

    params = list(CASES.values()) + [SamplingParams(temperature=0.0)]
    perm = np.random.default_rng(6).permutation(len(LOGITS))  # not already in sorted order
    logits = jnp.broadcast_to(jnp.asarray(LOGITS[perm]), (len(params), len(LOGITS)))
    out = np.asarray(filtered_distribution(logits, SamplingArrays.from_params(params)))
    for row, p in zip(out[:-1], params[:-1], strict=True):
        want = expected(p)[perm]
        np.testing.assert_allclose(_softmax(row.astype(np.float64)), want, atol=1e-6)
        assert np.all(np.isneginf(row[want == 0]))
    np.testing.assert_array_equal(out[-1], LOGITS[perm])  # greedy: untouched, only argmaxed
    unfiltered = SamplingArrays.from_params([SamplingParams(temperature=0.5)] * 2)
    np.testing.assert_allclose(np.asarray(filtered_distribution(logits[:2], unfiltered)),
                               np.broadcast_to(LOGITS[perm] / 0.5, (2, len(LOGITS))),
                               rtol=1e-6)


def test_filtered_distribution_breaks_ties_at_the_cut_as_the_sort_does():
    """Logits with ties across the top-k cut keep the k lowest ids among the tied tokens,
    as a stable descending sort (numpy's, here) ranks them, so the kept set is the ordinary
    sampler's and not every token tied with the last one kept."""
    from jaxllm.sample.verify import filtered_distribution

    logits = np.asarray([[1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.0, 2.0]] * 3, np.float32)
    params = [SamplingParams(temperature=1.0, top_k=k) for k in (2, 3, 5)]
    out = np.asarray(filtered_distribution(jnp.asarray(logits),
                                           SamplingArrays.from_params(params)))
    for row, p in zip(out, params, strict=True):
        kept = np.argsort(-logits[0], kind="stable")[: p.top_k]
        assert sorted(np.flatnonzero(np.isfinite(row)).tolist()) == sorted(kept.tolist())
        np.testing.assert_array_equal(row[kept], logits[0][kept])
