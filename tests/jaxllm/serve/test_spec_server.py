"""The server with ``--speculative-config`` (n-gram, and an EAGLE-3 head): greedy completions
equal HF's greedy token for token, streamed or not, the speculation metrics count what was
verified, and a head made for another model is refused at start-up."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from jaxllm.serve.__main__ import main
from jaxllm.serve.tokenizer import TextCodec
from tests.jaxllm.engine.spec_decode.test_eagle_decode import ALWAYS, write_head
from tests.jaxllm.engine.spec_decode.test_spec_decode import hf_biased_greedy

MAX_LEN = 96
SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
        "prompt_lookup_max": 3}
BIAS = ((17, 4.0), (40, 4.0))  # the model cycles among a few tokens: drafts get accepted


# --skip-warmup: programs compile as requests first need them (a fraction of the
# warm-up's); warm-up itself is tested by the bundled model's server and test_startup.py.
ARGS = ["--max-model-len", str(MAX_LEN), "--max-num-seqs", "4", "--block-size", "8",
        "--seed", "0", "--skip-warmup"]


@pytest.fixture
def server(word_model, server_pool):
    hf, ckpt = word_model
    served = server_pool.shared(["--model", str(ckpt), *ARGS,
                                 "--speculative-config", json.dumps(SPEC)])
    return hf, ckpt, served.url, served.client()


def _metric(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", text,
                                            re.M))


PROMPTS = ["w17 w40 w5 w17 w40 w9 w17 w40 w17", "w3 w4 w5 w6 w3 w4 w5 w6 w3 w4",
           "w40 w40 w40 w17 w200 w17 w40 w40"]


@pytest.mark.parametrize("stream", [False, True])
def test_greedy_completions_equal_hf_and_the_metrics_count(server, stream):
    hf, ckpt, base, client = server
    codec = TextCodec.from_dir(ckpt)
    before = httpx.get(f"{base}/metrics").text
    for prompt in PROMPTS:
        ids = codec.encode(prompt)
        want = hf_biased_greedy(hf, ids, 40, BIAS)
        want = want[: want.index(2) if 2 in want else len(want)]  # EOS ends it, unseen
        kwargs = dict(model="tiny", prompt=prompt, max_tokens=40, temperature=0,
                      logit_bias={str(t): v for t, v in BIAS})
        if stream:
            text = "".join(c.choices[0].text for c in client.completions.create(
                stream=True, **kwargs))
        else:
            text = client.completions.create(**kwargs).choices[0].text
        assert text == codec.decode(want)
    after = httpx.get(f"{base}/metrics").text
    gained = {name: _metric(after, name) - _metric(before, name) for name in (
        "vllm:spec_decode_num_drafts_total", "vllm:spec_decode_num_draft_tokens_total",
        "vllm:spec_decode_num_accepted_tokens_total",
        "vllm:spec_decode_num_accepted_tokens_per_pos_total")}
    assert gained["vllm:spec_decode_num_drafts_total"] > 0
    assert 0 < gained["vllm:spec_decode_num_accepted_tokens_total"] <= gained[
        "vllm:spec_decode_num_draft_tokens_total"]
    # Per position j: sequence-steps that accepted more than j drafts; they sum to the total.
    assert gained["vllm:spec_decode_num_accepted_tokens_per_pos_total"] == gained[
        "vllm:spec_decode_num_accepted_tokens_total"]


@pytest.mark.slow  # a second server, its programs compiled as requests come: ~1 minute
def test_eagle3_greedy_equals_hf_and_the_metrics_count(server, server_pool, tmp_path):
    """An EAGLE-3 head (one that always drafts token 17, so the biased prompts accept
    drafts) behind the server: greedy completions still equal HF's, and the same metrics
    count its drafts."""
    hf, ckpt, _, _ = server
    head = write_head(tmp_path / "head", seed=3, constant=ALWAYS)
    spec = {"method": "eagle3", "model": str(head), "num_speculative_tokens": 3}
    args = ["--model", str(ckpt), *ARGS, "--speculative-config", json.dumps(spec)]
    codec = TextCodec.from_dir(ckpt)
    served = server_pool.shared(args)
    base, client = served.url, served.client()
    before = httpx.get(f"{base}/metrics").text
    for prompt in PROMPTS:
        ids = codec.encode(prompt)
        want = hf_biased_greedy(hf, ids, 40, BIAS)
        want = want[: want.index(2) if 2 in want else len(want)]
        text = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=40, temperature=0,
            logit_bias={str(t): v for t, v in BIAS}).choices[0].text
        assert text == codec.decode(want)
    after = httpx.get(f"{base}/metrics").text
    gained = {name: _metric(after, name) - _metric(before, name) for name in (
        "vllm:spec_decode_num_drafts_total", "vllm:spec_decode_num_accepted_tokens_total")}
    assert gained["vllm:spec_decode_num_drafts_total"] > 0
    assert gained["vllm:spec_decode_num_accepted_tokens_total"] > 0


def test_a_head_for_another_model_is_refused_at_start_up(tiny_model, tmp_path, capsys):
    _, _, ckpt = tiny_model("scout")
    head = write_head(tmp_path / "head", seed=4, vocab_size=102)
    config = json.dumps({"method": "eagle3", "model": str(head), "num_speculative_tokens": 3})
    assert main(["--model", str(ckpt), "--speculative-config", config]) == 2
    assert "vocab_size=102, the target model has 333" in capsys.readouterr().err
