"""EAGLE-3 speculative decoding in the engine, with tiny heads written in the published
checkpoint layout: greedy outputs equal the engine's without speculation and HF's greedy,
token for token (near max_model_len, across attention chunks, with stops and max_tokens
inside an accepted run, under preemption, sync and async, on an 8-device mesh); sampled
outputs keep the sampler's distribution (chi-square); no compile after warm-up; the host's
draft protocol and the memory plan; the bundled model's trained head gets drafts accepted.

A random head's drafts are almost never accepted, so most tests use a head that always
drafts token 17 (its final norm is zero: every draft logit ties and the argmax is draft id
0, which its vocabulary map sends to 17) against a target biased towards 17: runs of
accepted drafts, whose stops and caps the tests put where they want."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from scipy import stats

import jaxllm
from jaxllm import SamplingParams
from jaxllm.engine import Engine
from jaxllm.engine.spec_decode.config import SpeculativeConfig
from tests.jaxllm.engine.spec_decode.test_spec_decode import (
    BIAS,
    _repeating,
    _same,
    hf_biased_greedy,
)
from tests.jaxllm.engine.test_async_scheduling import _run, hf_greedy
from tests.support import REPO
from tests.support.compiles import count_compilations
from tests.support.hf_models import SCOUT_LIKE

pytestmark = pytest.mark.heavy  # end to end: compiles engines or models (tests/conftest.py)

# Target layers whose input residual stream the heads read (the 4-layer tiny Scout).
AUX = [0, 1, 3]
HEAD = dict(hidden_size=SCOUT_LIKE["hidden_size"], num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=96)
DRAFT_VOCAB = 64
ALWAYS = 17  # what the constant head drafts


def write_head(directory: Path, *, seed: int, vocab_size: int = SCOUT_LIKE["vocab_size"],
               constant: int | None = None) -> Path:
    """A random EAGLE-3 head (NVIDIA / EAGLE layout: ``midlayer.*``, a reduced vocabulary
    with ``d2t``) for a target of ``SCOUT_LIKE``'s width; ``constant``: a head that always
    drafts that token."""
    g = torch.Generator().manual_seed(seed)
    D, H, K, d, F = (HEAD["hidden_size"], HEAD["num_attention_heads"],
                     HEAD["num_key_value_heads"], HEAD["head_dim"], HEAD["intermediate_size"])

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    targets = torch.sort(torch.randperm(vocab_size, generator=g)[:DRAFT_VOCAB]).values
    if constant is not None:  # draft id 0 is the constant token
        rest = targets[targets != constant][: DRAFT_VOCAB - 1]
        targets = torch.cat([torch.tensor([constant]), torch.sort(rest).values])
    w = {
        "fc.weight": r(D, 3 * SCOUT_LIKE["hidden_size"], scale=0.1),
        "midlayer.input_layernorm.weight": 1 + r(D),
        "midlayer.hidden_norm.weight": 1 + r(D),
        "midlayer.self_attn.q_proj.weight": r(H * d, 2 * D),
        "midlayer.self_attn.k_proj.weight": r(K * d, 2 * D),
        "midlayer.self_attn.v_proj.weight": r(K * d, 2 * D),
        "midlayer.self_attn.o_proj.weight": r(D, H * d),
        "midlayer.post_attention_layernorm.weight": 1 + r(D),
        "midlayer.mlp.gate_proj.weight": r(F, D),
        "midlayer.mlp.up_proj.weight": r(F, D),
        "midlayer.mlp.down_proj.weight": r(D, F),
        "norm.weight": torch.zeros(D) if constant is not None else 1 + r(D),
        "lm_head.weight": r(DRAFT_VOCAB, D),
        "d2t": targets - torch.arange(DRAFT_VOCAB),
        "t2d": torch.zeros(vocab_size, dtype=torch.bool).index_fill(0, targets, True),
    }
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in w.items()}, str(directory / "model.safetensors"))
    config = dict(HEAD, architectures=["LlamaForCausalLMEagle3"], model_type="llama",
                  vocab_size=vocab_size, draft_vocab_size=DRAFT_VOCAB,
                  target_hidden_size=SCOUT_LIKE["hidden_size"], num_hidden_layers=1,
                  rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu",
                  eagle_config={"eagle_aux_hidden_state_layer_ids": AUX,
                                "use_aux_hidden_state": True})
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def scout(tiny_model):
    hf, _, path = tiny_model("scout")  # attention_chunk_size 16
    return hf, jaxllm.load_model(path, max_model_len=80, page_size=8, max_num_seqs=8)


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    root = tmp_path_factory.mktemp("eagle3")
    return {"random": write_head(root / "random", seed=0),
            "constant": write_head(root / "constant", seed=1, constant=ALWAYS)}


def eagle(head: Path, k: int = 3) -> SpeculativeConfig:
    return SpeculativeConfig(method="eagle3", model=str(head), num_speculative_tokens=k)


GREEDY = SamplingParams(temperature=0.0, max_tokens=24)
BIASED = SamplingParams(temperature=0.0, max_tokens=24, logit_bias=BIAS)


@pytest.mark.slow  # 45 s on 2 shared cores
def test_greedy_equals_hf_with_accepted_drafts(scout, heads):
    """The suite's quick check: a prompt whose outputs cross the 16-token attention chunks,
    plain and biased towards the constant head's drafts (then most of them are accepted)."""
    hf, model = scout
    prompts = [_repeating(30, 7, 1)]
    requests = [(p, s) for p in prompts for s in (GREEDY, BIASED)]
    engine = Engine(model, speculative=eagle(heads["constant"]))
    spec = _run(engine, requests)
    for i, p in enumerate(prompts):
        assert spec[f"req-{2 * i}"]["tokens"] == hf_greedy(hf, p, 24)
        assert spec[f"req-{2 * i + 1}"]["tokens"] == hf_biased_greedy(hf, p, 24)
    s = engine.speculator.stats
    assert s.num_drafts > 0 and s.num_accepted_tokens > 3


@pytest.mark.slow  # 2 minutes per setting on 2 shared cores
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_greedy_equals_greedy_without_speculation_and_hf(scout, heads, async_scheduling):
    hf, model = scout
    # Lengths around the 16-token attention chunks, so drafts cross chunk boundaries.
    prompts = [_repeating(n, p, seed) for n, p, seed in
               ((13, 5, 0), (30, 7, 1), (6, 3, 2), (47, 4, 3), (20, 20, 4))]
    requests = [(p, s) for p in prompts for s in (GREEDY, BIASED)]
    plain = _run(Engine(model, async_scheduling=async_scheduling), requests)
    for name in ("random", "constant"):
        engine = Engine(model, async_scheduling=async_scheduling,
                        speculative=eagle(heads[name]))
        spec = _run(engine, requests)
        assert _same(spec, plain)
        s = engine.speculator.stats
        assert s.num_drafts > 0
        if name == "constant":
            assert s.num_accepted_tokens > 10
    for i, p in enumerate(prompts):
        assert spec[f"req-{2 * i}"]["tokens"] == hf_greedy(hf, p, 24)
        assert spec[f"req-{2 * i + 1}"]["tokens"] == hf_biased_greedy(hf, p, 24)


def test_head_for_another_vocabulary_is_refused(scout, tmp_path):
    _, model = scout
    head = write_head(tmp_path / "head", seed=2, vocab_size=102)
    with pytest.raises(ValueError, match=r"vocab_size=102, the target model has 333"):
        Engine(model, speculative=eagle(head))


@pytest.mark.slow  # a minute on 2 shared cores
def test_greedy_near_max_model_len(scout, heads):
    hf, model = scout
    # 80-token context: outputs run into the last positions, drafts capped there.
    prompts = [_repeating(n, 6, seed) for n, seed in ((60, 5), (71, 6), (78, 7))]
    requests = [(p, SamplingParams(temperature=0.0, logit_bias=BIAS)) for p in prompts]
    engine = Engine(model, speculative=eagle(heads["constant"]))
    spec = _run(engine, requests)
    for i, p in enumerate(prompts):
        assert spec[f"req-{i}"]["tokens"] == hf_biased_greedy(hf, p, 80 - len(p))
        assert spec[f"req-{i}"]["finish"] == "length"
    assert engine.speculator.stats.num_accepted_tokens > 0


@pytest.mark.slow  # every cut from 1 to 12 tokens, twice: minutes on 2 cores
def test_stop_ids_and_max_tokens_inside_an_accepted_run(scout, heads):
    hf, model = scout
    prompt = [17, 40, 17, 17, 40, 9] * 5
    tokens = hf_biased_greedy(hf, prompt, 30)
    requests = []
    for n in range(1, 13):
        requests.append((prompt, SamplingParams(temperature=0.0, max_tokens=n,
                                                logit_bias=BIAS)))
        requests.append((prompt, SamplingParams(temperature=0.0, max_tokens=30,
                                                stop_token_ids=(tokens[n - 1],),
                                                logit_bias=BIAS)))
    engine = Engine(model, max_num_batched_tokens=64, speculative=eagle(heads["constant"]))
    spec = _run(engine, requests)
    for i in range(0, len(requests), 2):
        n = i // 2 + 1
        assert spec[f"req-{i}"]["tokens"] == tokens[:n]
        assert spec[f"req-{i}"]["finish"] == "length"
        cut = tokens.index(tokens[n - 1]) + 1
        assert spec[f"req-{i + 1}"]["tokens"] == tokens[:cut]
        assert spec[f"req-{i + 1}"]["stop"] == tokens[n - 1]
    assert engine.speculator.stats.num_accepted_tokens > 10


@pytest.mark.slow  # a minute on 2 shared cores
def test_preemption_under_memory_pressure(scout, heads):
    """Preempted requests are recomputed from their tokens, the head's cache with them."""
    hf, model = scout
    prompts = [_repeating(n, p, seed) for n, p, seed in
               ((37, 6, 10), (50, 5, 11), (12, 4, 12), (33, 7, 13), (20, 3, 14))]
    requests = [(p, SamplingParams(temperature=0.0, max_tokens=20, logit_bias=BIAS))
                for p in prompts]
    engine = Engine(model, num_pages=32, max_num_batched_tokens=32,
                    speculative=eagle(heads["constant"]))
    spec = _run(engine, requests)
    assert engine.scheduler.num_preemptions > 0
    assert engine.speculator.stats.num_accepted_tokens > 0
    for i, p in enumerate(prompts):
        assert spec[f"req-{i}"]["tokens"] == hf_biased_greedy(hf, p, 20)


@pytest.mark.slow  # a minute on 2 shared cores
def test_no_compilation_after_warmup(scout, heads):
    _, model = scout
    engine = Engine(model, max_num_batched_tokens=32, speculative=eagle(heads["constant"]))
    # 8 plain programs (token buckets 16, 32 x batch 1, 2, 4, 8) and 8 verifying ones, each
    # with the head's pass.
    assert engine.warmup(progress=False) == 16
    prompts = [_repeating(n, 5, seed) for n, seed in ((5, 0), (20, 1), (37, 2), (12, 3))]
    with count_compilations() as compiles:
        for sampling in (SamplingParams(temperature=0.0, max_tokens=12, logit_bias=BIAS),
                         SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12, seed=1)):
            engine.generate(prompts, sampling)
    assert compiles == []
    assert engine.speculator.stats.num_accepted_tokens > 0


def test_drafts_are_kept_for_the_next_step_only(scout, heads):
    """The host protocol: a prompt's last chunk drafts for the first decode step; a step's
    drafts are used by the request's next step only when its known tokens are still those
    they were made after. The request then ends as HF's greedy, its drafts accepted."""
    hf, model = scout
    prompt = [17, 40, 17, 17, 40, 9] * 3
    engine = Engine(model, speculative=eagle(heads["constant"]))
    rid = engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=10,
                                                    logit_bias=BIAS))
    out = engine.step()  # the prompt
    [request] = engine.scheduler.running
    spec = engine.speculator
    assert spec._proposed(request, 3).tolist() == [ALWAYS] * 3
    assert spec._proposed(request, 2).tolist() == [ALWAYS] * 2
    request.output.append(5)  # other tokens than the drafts were made after
    assert spec._proposed(request, 3).size == 0
    request.output.pop()
    request.epoch += 1  # preempted since
    assert spec._proposed(request, 3).size == 0
    request.epoch -= 1
    tokens = out[0].new_token_ids
    while engine.has_unfinished():
        tokens += [t for o in engine.step() if o.request_id == rid for t in o.new_token_ids]
    assert tokens == hf_biased_greedy(hf, prompt, 10)
    assert spec.stats.num_accepted_tokens > 0


def test_the_plan_and_the_report_count_the_head(scout, heads):
    """The head's KV slab adds to every page and its weights to the budget; the dry run's
    numbers (from the config and tensor names alone) are the loaded head's."""
    import jax.numpy as jnp

    from jaxllm.engine.spec_decode.eagle import abstract_drafter

    _, model = scout
    plain = Engine(model, num_pages=40)
    engine = Engine(model, num_pages=40, speculative=eagle(heads["random"]))
    drafter = engine.runner.drafter
    # 8-token pages of 2 kv heads of 16 float32 values, keys and values.
    assert drafter.bytes_per_page() == 2 * 8 * 2 * 16 * 4
    assert engine.plan.page_bytes == plain.plan.page_bytes + drafter.bytes_per_page()
    planned = abstract_drafter(str(heads["random"]), 4, jnp.float32, jnp.float32, 8, None, 3)
    assert (planned.weights_bytes(), planned.bytes_per_page()) == (
        drafter.weights_bytes(), drafter.bytes_per_page())
    assert planned.aux_layers == drafter.aux_layers
    [line] = [x for x in engine.report() if x.startswith("speculative decoding")]
    assert f"eagle3, 3 draft tokens from the EAGLE-3 head {heads['random']}" in line
    assert "target layers [0, 1, 3]" in line


@pytest.mark.parametrize("method", ["ngram", "eagle3"])
def test_the_plan_counts_the_verifying_steps_temporaries(scout, heads, method):
    """Sized from the memory budget, an engine that speculates reserves the widest
    verifying step's temporaries: at least the k more rows of float32 logits per sequence
    slot than the plain step's, which it scores and samples from."""
    from tests.jaxllm.engine.spec_decode.test_spec_decode import NGRAM

    _, model = scout
    plain = Engine(model)
    engine = Engine(model, speculative=NGRAM if method == "ngram" else eagle(heads["random"]))
    assert engine.plan.source == plain.plan.source == "--gpu-memory-utilization"
    k, slots = 3, engine.policy.batch_buckets[-1]
    more_logits = slots * k * model.padded_vocab * 4
    assert engine.plan.step_temp_bytes >= plain.plan.step_temp_bytes + more_logits, (
        engine.plan.step_temp_bytes, plain.plan.step_temp_bytes, more_logits)


POSITIONS = 3  # output positions whose distributions are compared


@pytest.mark.slow  # 800 seeded runs per setting: minutes on 2 cores
def test_sampled_distribution_equals_the_samplers(scout, heads):
    """Each of the first positions' token frequencies over many seeds, with and without the
    constant head's drafts: a chi-square test of homogeneity (and drafts were accepted)."""
    _, model = scout
    sampling = SamplingParams(temperature=0.7, max_tokens=POSITIONS,
                              logit_bias=((17, 3.0), (40, 2.0)))
    prompt = [17, 40, 17, 40, 5, 17, 40, 17, 40, 9, 17, 17, 40, 40, 17]
    n = 400

    def requests(first_seed):
        return [(prompt, dataclasses.replace(sampling, seed=first_seed + i)) for i in range(n)]

    plain = _run(Engine(model, max_num_batched_tokens=64), requests(1000))
    engine = Engine(model, max_num_batched_tokens=64, speculative=eagle(heads["constant"]))
    spec = _run(engine, requests(5000))
    assert engine.speculator.stats.num_drafts > n // 2
    assert engine.speculator.stats.num_accepted_tokens > 0
    for j in range(POSITIONS):
        a = [r["tokens"][j] for r in plain.values() if len(r["tokens"]) > j]
        b = [r["tokens"][j] for r in spec.values() if len(r["tokens"]) > j]
        ids = sorted(set(a) | set(b))
        table = np.array([[a.count(t) for t in ids], [b.count(t) for t in ids]])
        common = table.sum(0) >= 10
        table = np.concatenate([table[:, common], table[:, ~common].sum(1, keepdims=True)],
                               axis=1)
        table = table[:, table.sum(0) > 0]
        if table.shape[1] < 2:
            continue
        assert stats.chi2_contingency(table).pvalue > 1e-3, (j, table)


BUNDLED = REPO / "checkpoints"


@pytest.mark.slow  # 40 s on 2 shared cores
@pytest.mark.skipif(not (BUNDLED / "tiny-llama4-eagle3" / "config.json").exists(),
                    reason="no trained head (scripts/train_eagle_tiny.py)")
def test_the_trained_head_gets_drafts_accepted_on_the_bundled_model():
    """The bundled model's head (scripts/train_eagle_tiny.py) over chat questions it was not
    trained on: the answers are the target's greedy ones, and most drafts are accepted."""
    from jaxllm.serve.tokenizer import TextCodec

    target = BUNDLED / "tiny-llama4"
    model = jaxllm.load_model(target, max_model_len=64)
    codec = TextCodec.from_dir(target)
    questions = [f"What is {a} + {b}?" for a, b in ((12, 35), (99, 99), (7, 80), (50, 50))]
    prompts = [codec.encode(codec.render_chat([{"role": "user", "content": q}]),
                            add_special_tokens=False) for q in questions]
    sampling = SamplingParams(temperature=0.0, max_tokens=8)
    plain = Engine(model).generate(prompts, sampling)
    engine = Engine(model, speculative=eagle(BUNDLED / "tiny-llama4-eagle3"))
    assert engine.generate(prompts, sampling) == plain
    assert [codec.decode(o) for o in plain] == ["47", "198", "87", "100"]
    assert engine.speculator.stats.acceptance_length > 1.5


@pytest.mark.slow  # a minute on 2 shared cores
def test_greedy_with_the_vocabulary_split_over_8_devices(tiny_model, heads):
    """On a model=8 mesh: the target's vocabulary padded and split, the head's parameters
    and KV slab sharded by their logical axes, its argmax per vocabulary shard."""
    from jaxllm.sharding import make_mesh

    hf, _, path = tiny_model("scout")
    model = jaxllm.load_model(path, max_model_len=80, page_size=8, max_num_seqs=4,
                              mesh=make_mesh(model=8))
    engine = Engine(model, max_num_batched_tokens=32, speculative=eagle(heads["constant"]))
    prompts = [_repeating(n, p, seed) for n, p, seed in ((21, 5, 40), (9, 3, 41))]
    spec = _run(engine, [(p, BIASED) for p in prompts])
    for i, p in enumerate(prompts):
        assert spec[f"req-{i}"]["tokens"] == hf_biased_greedy(hf, p, 24)
    assert engine.speculator.stats.num_accepted_tokens > 0
