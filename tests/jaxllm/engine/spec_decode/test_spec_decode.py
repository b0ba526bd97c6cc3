"""n-gram speculative decoding in the engine: greedy outputs equal the engine's without
speculation and HF's greedy, token for token (near max_model_len, across attention chunks,
with stops and max_tokens inside an accepted run, under preemption); sampled outputs keep
the sampler's distribution (chi-square against the non-speculative engine); no compile
after warm-up."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import stats

import jaxllm
from jaxllm import SamplingParams
from jaxllm.engine import Engine
from jaxllm.engine.spec_decode.config import SpeculativeConfig
from jaxllm.sharding import make_mesh
from tests.jaxllm.engine.test_async_scheduling import _run, hf_greedy
from tests.support.compiles import count_compilations

pytestmark = pytest.mark.heavy  # end to end: compiles engines or models (tests/conftest.py)

NGRAM = SpeculativeConfig(method="ngram", num_speculative_tokens=3, prompt_lookup_min=1,
                          prompt_lookup_max=3)


@pytest.fixture(scope="module")
def scout(tiny_model):
    hf, _, path = tiny_model("scout")  # attention_chunk_size 16
    return hf, jaxllm.load_model(path, max_model_len=80, page_size=8, max_num_seqs=8)


def _repeating(n, period, seed):
    """A prompt of ``n`` tokens repeating a random pattern: n-gram drafts find matches."""
    rng = np.random.default_rng(seed)
    pattern = rng.integers(3, 333, period).tolist()
    return (pattern * (n // period + 1))[:n]


# A greedy continuation the n-gram drafts often predict: the bias makes the tiny random
# model cycle among a few tokens (its unbiased outputs rarely repeat, so drafts are rejected).
BIAS = ((17, 4.0), (40, 4.0))


def hf_biased_greedy(hf, prompt, n, bias=BIAS):
    """HF greedy decoding with ``bias`` added to the logits at every position."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class AddBias(LogitsProcessor):
        def __call__(self, input_ids, scores):
            for token, value in bias:
                scores[:, token] += value
            return scores

    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                          eos_token_id=2, pad_token_id=0,
                          logits_processor=LogitsProcessorList([AddBias()]))
    return out[0, len(prompt):].tolist()


def _same(spec, plain):
    """Equal outputs: tokens, finish reasons and stop ids exactly; log-probabilities to
    float32 rounding (the verifying program scores positions in other shapes)."""
    assert spec.keys() == plain.keys()
    for rid in spec:
        a, b = spec[rid], plain[rid]
        assert (a["tokens"], a["finish"], a["stop"]) == (b["tokens"], b["finish"], b["stop"]), rid
        assert [t for t, _ in a["logprobs"]] == [t for t, _ in b["logprobs"]], rid
        np.testing.assert_allclose([v for _, v in a["logprobs"]],
                                   [v for _, v in b["logprobs"]], atol=1e-4, err_msg=rid)
    return True


def _spec_run(model, requests, **engine_args):
    engine = Engine(model, speculative=NGRAM, **engine_args)
    got = _run(engine, requests)
    return got, engine


GREEDY = SamplingParams(temperature=0.0, max_tokens=24)
BIASED = SamplingParams(temperature=0.0, max_tokens=24, logit_bias=BIAS)


# Synchronous is slow (48 s on 2 cores); the default, async, stays in the suite.
@pytest.mark.parametrize("async_scheduling", [pytest.param(False, marks=pytest.mark.slow), True])
def test_greedy_equals_greedy_without_speculation_and_hf(scout, async_scheduling):
    hf, model = scout
    # Lengths around the 16-token attention chunks, so drafts cross chunk boundaries.
    prompts = [_repeating(n, p, seed) for n, p, seed in
               ((13, 5, 0), (30, 7, 1), (6, 3, 2), (47, 4, 3), (20, 20, 4))]
    requests = [(p, s) for p in prompts for s in (GREEDY, BIASED)]
    plain = _run(Engine(model, async_scheduling=async_scheduling), requests)
    spec, engine = _spec_run(model, requests, async_scheduling=async_scheduling)
    assert _same(spec, plain)
    for i, p in enumerate(prompts):
        assert spec[f"req-{2 * i}"]["tokens"] == hf_greedy(hf, p, 24)
        assert spec[f"req-{2 * i + 1}"]["tokens"] == hf_biased_greedy(hf, p, 24)
    s = engine.speculator.stats
    assert s.num_drafts > 0 and s.num_accepted_tokens > 10  # it did speculate, and accept


def hf_penalised_biased_greedy(hf, prompt, n, sampling):
    """HF's greedy continuation, one full forward per token, with logit_bias then the
    penalties applied in numpy from vLLM's definitions (in vLLM's order)."""
    import torch

    from tests.jaxllm.engine.test_engine_penalties import penalised

    output: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = hf(input_ids=torch.tensor([prompt + output])).logits[0, -1].double().numpy()
            for token, value in sampling.logit_bias:
                logits[token] += value
            token = int(np.argmax(penalised(
                logits, prompt, output, sampling.presence_penalty, sampling.frequency_penalty,
                sampling.repetition_penalty)))
            output.append(token)
            if token == 2:
                break
    return output


@pytest.mark.parametrize("devices", [1, pytest.param(8, marks=pytest.mark.slow)])
def test_penalised_requests_draft_and_answer_like_hf(scout, tiny_model, devices):
    """Penalties at every drafted position: each position counts the drafts before it as
    generated, and accepted drafts count from then on. A negative frequency penalty makes
    the model repeat itself, so n-gram drafts are accepted; the other penalties push back.
    On 8 devices each holds its slice of the vocabulary and of the penalty state."""
    hf, model = scout
    if devices > 1:
        model = jaxllm.load_model(tiny_model("scout")[2], max_model_len=80, page_size=8,
                                  max_num_seqs=8, mesh=make_mesh(model=devices))
    cycle = [17, 40, 17, 40, 5, 17, 40, 17, 40, 9, 17, 17, 40, 40, 17]
    prompts = [_repeating(n, p, seed) for n, p, seed in ((13, 5, 10), (30, 7, 11), (21, 4, 12))]
    prompts += [cycle, cycle]
    settings = [
        SamplingParams(temperature=0.0, max_tokens=20, logit_bias=BIAS, frequency_penalty=-1.0),
        SamplingParams(temperature=0.0, max_tokens=20, logit_bias=BIAS, frequency_penalty=-0.8,
                       presence_penalty=0.6, repetition_penalty=1.2),
        SamplingParams(temperature=0.0, max_tokens=20, frequency_penalty=-1.5,
                       repetition_penalty=0.8),
        SamplingParams(temperature=0.0, max_tokens=20, logit_bias=BIAS, frequency_penalty=0.7),
        # Runs of 17 broken by 190 once the presence penalty outweighs the frequency
        # penalty's pull: a position that missed the drafts before it takes 17 again.
        SamplingParams(temperature=0.0, max_tokens=20, logit_bias=BIAS, presence_penalty=1.0,
                       frequency_penalty=-0.5),
    ]
    requests = list(zip(prompts, settings, strict=True))
    spec, engine = _spec_run(model, requests)
    for i, (p, sampling) in enumerate(requests):
        assert spec[f"req-{i}"]["tokens"] == hf_penalised_biased_greedy(hf, p, 20, sampling), i
    s = engine.speculator.stats
    assert s.num_drafts > 0 and s.num_accepted_tokens > 10  # it did speculate, and accept


def test_greedy_near_max_model_len(scout):
    hf, model = scout
    # 80-token context: outputs run into the last positions, drafts capped there.
    prompts = [_repeating(n, 6, seed) for n, seed in ((60, 5), (71, 6), (78, 7))]
    # To max_model_len.
    requests = [(p, SamplingParams(temperature=0.0, logit_bias=BIAS)) for p in prompts]
    plain = _run(Engine(model), requests)
    spec, engine = _spec_run(model, requests)
    assert _same(spec, plain)
    for i, p in enumerate(prompts):
        assert spec[f"req-{i}"]["tokens"] == hf_biased_greedy(hf, p, 80 - len(p))
        assert spec[f"req-{i}"]["finish"] == "length"
    assert engine.speculator.stats.num_accepted_tokens > 0


@pytest.mark.slow  # every cut from 1 to 19 tokens, twice: minutes on 2 cores
def test_stop_ids_and_max_tokens_inside_an_accepted_run(scout):
    hf, model = scout
    prompt = [17, 40, 17, 17, 40, 9] * 5  # drafts of the biased tokens from the start
    tokens = hf_biased_greedy(hf, prompt, 30)
    # Every cut: max_tokens n, and a stop id at the n-th token (its first occurrence).
    requests = []
    for n in range(1, 20):
        requests.append((prompt, SamplingParams(temperature=0.0, max_tokens=n,
                                                logit_bias=BIAS)))
        requests.append((prompt, SamplingParams(temperature=0.0, max_tokens=30,
                                                stop_token_ids=(tokens[n - 1],),
                                                logit_bias=BIAS)))
    plain = _run(Engine(model, max_num_batched_tokens=64), requests)
    spec, engine = _spec_run(model, requests, max_num_batched_tokens=64)
    assert _same(spec, plain)
    for i in range(0, len(requests), 2):
        n = i // 2 + 1
        assert spec[f"req-{i}"]["tokens"] == tokens[:n]
        assert spec[f"req-{i}"]["finish"] == "length"
        cut = tokens.index(tokens[n - 1]) + 1
        assert spec[f"req-{i + 1}"]["tokens"] == tokens[:cut]
        assert spec[f"req-{i + 1}"]["stop"] == tokens[n - 1]
    assert engine.speculator.stats.num_accepted_tokens > 10


@pytest.mark.slow  # 30 s on 2 cores; the plain engine's preemption tests stay in the suite
def test_preemption_under_memory_pressure(scout):
    hf, model = scout
    prompts = [_repeating(n, p, seed) for n, p, seed in
               ((37, 6, 10), (50, 5, 11), (12, 4, 12), (33, 7, 13), (20, 3, 14))]
    requests = [(p, SamplingParams(temperature=0.0, max_tokens=20, logit_bias=BIAS))
                for p in prompts]
    spec, engine = _spec_run(model, requests, num_pages=32, max_num_batched_tokens=32)
    assert engine.scheduler.num_preemptions > 0
    assert engine.speculator.stats.num_accepted_tokens > 0
    for i, p in enumerate(prompts):
        assert spec[f"req-{i}"]["tokens"] == hf_biased_greedy(hf, p, 20)


@pytest.mark.slow  # 46 s on CI's cores: the plain engine's no-compile test stays in the suite
def test_no_compilation_after_warmup(scout):
    _, model = scout
    engine = Engine(model, max_num_batched_tokens=32, speculative=NGRAM)
    # 8 plain programs (token buckets 16, 32 x batch 1, 2, 4, 8) and 8 verifying ones.
    assert engine.warmup(progress=False) == 16
    prompts = [_repeating(n, 5, seed) for n, seed in ((5, 0), (20, 1), (37, 2), (12, 3))]
    with count_compilations() as compiles:
        for sampling in (SamplingParams(temperature=0.0, max_tokens=12),
                         SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12, seed=1)):
            engine.generate(prompts, sampling)
    assert compiles == []
    assert engine.speculator.stats.num_drafts > 0


POSITIONS = 3  # output positions whose distributions are compared


@pytest.mark.slow  # 800 seeded runs per setting: minutes on 2 cores
@pytest.mark.parametrize("sampling", [
    SamplingParams(temperature=1.0, top_p=0.8, max_tokens=POSITIONS, logit_bias=BIAS),
    SamplingParams(temperature=0.7, max_tokens=POSITIONS, logit_bias=((17, 3.0), (40, 2.0))),
    SamplingParams(temperature=1.0, max_tokens=POSITIONS, logit_bias=BIAS,
                   frequency_penalty=-0.7, presence_penalty=0.4, repetition_penalty=1.2),
], ids=["top_p", "logit_bias", "penalties"])
def test_sampled_distribution_equals_the_samplers(scout, sampling):
    """Each of the first positions' token frequencies over many seeds, with and without
    speculation: a chi-square test of homogeneity (and the drafts were verified)."""
    _, model = scout
    # The prompt repeats the biased tokens: drafts (17s and 40s) from the first output on,
    # likely enough under the bias to be accepted often.
    prompt = [17, 40, 17, 40, 5, 17, 40, 17, 40, 9, 17, 17, 40, 40, 17]
    n = 400

    def requests(first_seed):  # independent seeds for the two samples
        return [(prompt, dataclasses.replace(sampling, seed=first_seed + i)) for i in range(n)]

    plain = list(_run(Engine(model, max_num_batched_tokens=64), requests(1000)).values())
    spec, engine = _spec_run(model, requests(5000), max_num_batched_tokens=64)
    spec = list(spec.values())
    assert engine.speculator.stats.num_drafts > n // 2
    assert engine.speculator.stats.num_accepted_tokens > 0
    for j in range(POSITIONS):
        a = [r["tokens"][j] for r in plain if len(r["tokens"]) > j]
        b = [r["tokens"][j] for r in spec if len(r["tokens"]) > j]
        ids = sorted(set(a) | set(b))
        table = np.array([[a.count(t) for t in ids], [b.count(t) for t in ids]])
        # Pool the rare tokens so every expected count is large enough for the test.
        common = table.sum(0) >= 10
        table = np.concatenate([table[:, common], table[:, ~common].sum(1, keepdims=True)],
                               axis=1)
        table = table[:, table.sum(0) > 0]
        if table.shape[1] < 2:
            continue
        p = stats.chi2_contingency(table).pvalue
        assert p > 1e-3, (j, p, table)
