"""The sampler draws from the distribution its parameters define (chi-square tests)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import jaxllm
from jaxllm.sample.sampling import (
    SamplingArrays,
    SamplingParams,
    greedy,
    gumbel_sample,
    sample,
    seed_keys,
    seed_words,
)
from jaxllm.sharding import make_mesh
from tests.support import hf_models

LOGITS = np.array([2.0, 1.5, 1.2, 0.6, 0.0, -0.4, -1.0, -3.0], np.float32)
DRAWS = 40_000


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x[np.isfinite(x)].max())
    e[~np.isfinite(x)] = 0
    return e / e.sum()


def expected(params: SamplingParams) -> np.ndarray:
    """The target distribution, written from the definition in SamplingParams' docstring."""
    logits = LOGITS.astype(np.float64) / params.temperature
    order = np.argsort(-logits)
    kept = np.zeros(len(logits), bool)
    if params.top_k > 0:
        kept[order[: params.top_k]] = True
    else:
        kept[:] = True
    probs = _softmax(np.where(kept, logits, -np.inf))
    mass = 0.0
    for i in order:  # top-p: smallest prefix of the sorted tokens whose mass reaches top_p
        if mass >= params.top_p:
            kept[i] = False
        mass += probs[i]
    kept &= probs >= params.min_p * probs.max()
    return _softmax(np.where(kept, logits, -np.inf))


def draw(params: SamplingParams, seed: int = 0) -> np.ndarray:
    arrays = SamplingArrays.from_params([params] * DRAWS)
    logits = jnp.broadcast_to(LOGITS, (DRAWS, len(LOGITS)))
    keys = jax.random.split(jax.random.PRNGKey(seed), DRAWS)
    tokens = jax.jit(sample)(logits, arrays, keys)
    return np.bincount(np.asarray(tokens), minlength=len(LOGITS))


CASES = {
    "temperature 0.7": SamplingParams(temperature=0.7),
    "temperature 1.5": SamplingParams(temperature=1.5),
    "top_k 3": SamplingParams(top_k=3),
    "top_p 0.8": SamplingParams(top_p=0.8),
    "top_k 5 then top_p 0.7": SamplingParams(top_k=5, top_p=0.7, temperature=0.9),
    "min_p 0.2": SamplingParams(min_p=0.2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sampled_frequencies_match_the_definition(case):
    params = CASES[case]
    counts = draw(params)
    p = expected(params)
    assert np.all(counts[p == 0] == 0)  # filtered tokens never appear
    support = p > 0
    result = stats.chisquare(counts[support], DRAWS * p[support] / p[support].sum())
    assert result.pvalue > 1e-4, (counts, DRAWS * p)


def test_chi_square_detects_a_wrong_distribution():
    """The same test rejects a sampler that ignored the temperature."""
    counts = draw(SamplingParams(temperature=0.7))
    wrong = expected(SamplingParams(temperature=1.0))
    assert stats.chisquare(counts, DRAWS * wrong / wrong.sum()).pvalue < 1e-10


def test_greedy_rows_and_top_k_one_take_the_argmax():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(6, 50)), jnp.float32)
    params = [SamplingParams(temperature=0.0), SamplingParams(top_k=1, temperature=2.0)] * 3
    keys = jax.random.split(jax.random.PRNGKey(1), 6)
    out = sample(logits, SamplingArrays.from_params(params), keys)
    np.testing.assert_array_equal(out, np.argmax(logits, -1))


def test_sharded_greedy_matches_argmax_with_ties_and_padding():
    mesh = make_mesh(model=8)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 336)).astype(np.float32)
    logits[:, 333:] = -np.inf  # padded vocabulary
    logits[1, [41, 42, 300]] = 9.0  # a tie across a shard edge: first index wins
    logits[2, 335] = -np.inf
    logits[3] = -5.0
    sharded = jax.device_put(logits, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(None, "model")))
    out = jax.jit(lambda x: greedy(x, mesh))(sharded)
    np.testing.assert_array_equal(out, np.argmax(logits, -1))


def test_sharded_greedy_never_gathers_the_vocabulary():
    mesh = make_mesh(model=8)
    x = jax.ShapeDtypeStruct((4, 4096), jnp.float32, sharding=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(None, "model")))
    hlo = jax.jit(lambda x: greedy(x, mesh)).lower(x).compile().as_text()
    gathers = [line for line in hlo.splitlines() if "all-gather" in line and "=" in line]
    # Only [4, 8]-shaped (value, index) pairs cross devices, never a [4, 512] vocab slice.
    assert gathers and all("512" not in g and "4096" not in g for g in gathers), gathers


def test_sharded_temperature_sampling_draws_the_same_tokens_without_gathering():
    """Plain temperature sampling (no filters) on a vocab-sharded mesh: the same tokens as on
    one device for the same keys, and no vocabulary-wide all-gather in the program."""
    mesh = make_mesh(model=8)
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(6, 512)).astype(np.float32)
    logits[:, 509:] = -np.inf  # padded vocabulary: never drawn
    params = [SamplingParams(temperature=t) for t in (0.5, 1.0, 2.0, 0.0, 1.3, 0.8)]
    arrays = SamplingArrays.from_params(params)
    keys = jax.random.split(jax.random.PRNGKey(5), 6)
    one = np.asarray(jax.jit(sample)(logits, arrays, keys))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "model"))
    run = jax.jit(lambda x, a, k: sample(x, a, k, mesh))
    np.testing.assert_array_equal(np.asarray(run(jax.device_put(logits, sharding), arrays,
                                                 keys)), one)
    assert one[3] == np.argmax(logits[3]) and (one < 509).all()
    x = jax.ShapeDtypeStruct(logits.shape, jnp.float32, sharding=sharding)
    temperature = jnp.ones((6, 1), jnp.float32)
    hlo = jax.jit(lambda x, k: gumbel_sample(x, temperature, k, mesh)).lower(
        x, keys).compile().as_text()
    gathers = [line for line in hlo.splitlines() if "all-gather" in line and "=" in line]
    # Only [6, 8] (value, index) pairs cross devices, never a [6, 64] vocabulary slice.
    assert gathers and all("64" not in g and "512" not in g for g in gathers), gathers


@pytest.mark.parametrize("bad,message", [
    (dict(temperature=-1.0), "temperature=-1.0"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_k=-2), "top_k=-2"),
    (dict(min_p=1.5), "min_p=1.5"),
    (dict(max_tokens=0), "max_tokens=0"),
])
def test_bad_sampling_params(bad, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**bad)


@pytest.mark.heavy
def test_same_seed_same_tokens(tiny_model):
    model = jaxllm.load_model(tiny_model("scout")[2], max_model_len=64)
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]
    hot = SamplingParams(temperature=1.0, seed=123)
    a = jaxllm.generate(model, prompts, max_new_tokens=12, sampling=hot)
    b = jaxllm.generate(model, prompts, max_new_tokens=12, sampling=hot)
    c = jaxllm.generate(model, prompts, max_new_tokens=12,
                        sampling=SamplingParams(temperature=1.0, seed=124))
    assert a == b and a != c
    top1 = SamplingParams(temperature=1.0, top_k=1, seed=5)
    greedy = jaxllm.generate(model, prompts, max_new_tokens=12)
    assert jaxllm.generate(model, prompts, max_new_tokens=12, sampling=top1) == greedy
    assert hf_models.BASE["vocab_size"] > max(max(o) for o in a)


def test_seed_words_keep_all_64_bits():
    words = seed_words([0, 1, 2**32 + 1, 2**63 - 1])
    assert words.dtype == np.uint32 and words.tolist() == [
        [0, 0], [0, 1], [1, 1], [2**31 - 1, 2**32 - 1]]


def test_seed_keys_are_prngkey_below_2_32_and_differ_above():
    keys = seed_keys(seed_words([7, 2**32 - 1, 1, 2**32 + 1]))
    data = np.asarray(jax.random.key_data(keys))
    assert data[0].tolist() == np.asarray(jax.random.PRNGKey(7)).tolist()
    assert data[1].tolist() == np.asarray(jax.random.PRNGKey(2**32 - 1)).tolist()
    logits = jnp.zeros((4, 1000))  # uniform: two keys that differ pick differently
    arrays = SamplingArrays.from_params([SamplingParams(temperature=1.0)] * 4)
    picks = np.asarray(sample(logits, arrays, keys)).tolist()
    assert picks[2] != picks[3]  # seed 1 and 2**32 + 1 are different seeds
    again = np.asarray(sample(logits, arrays, seed_keys(seed_words([7, 2**32 - 1, 1,
                                                                    2**32 + 1])))).tolist()
    assert again == picks


def test_logit_bias_and_min_tokens_adjust_the_logits():
    """Row 0: +5 on id 3, -100 on id 0. Row 1: min_tokens 2 holds back its stop ids 1 and 4
    before its second token (step 0, 1), not after (step 2)."""
    from jaxllm.sample.sampling import adjust_logits

    logits = jnp.arange(12.0).reshape(2, 6) / 10
    params = [SamplingParams(logit_bias=((3, 5.0), (0, -100.0))),
              SamplingParams(min_tokens=2, max_tokens=4)]
    arrays = SamplingArrays.from_params(params, [(), (1, 4)])
    got = np.asarray(adjust_logits(logits, arrays, jnp.asarray([0, 1])))
    want = np.asarray(logits).copy()
    want[0, 3] += 5.0
    want[0, 0] -= 100.0
    want[1, [1, 4]] = -np.inf
    np.testing.assert_allclose(got, want, rtol=1e-6)
    later = np.asarray(adjust_logits(logits, arrays, jnp.asarray([0, 2])))
    np.testing.assert_allclose(later[1], np.asarray(logits)[1])
    with pytest.raises(ValueError, match="logit_bias has 301 entries, at most 300"):
        SamplingParams(logit_bias=tuple((i, 1.0) for i in range(301)))
