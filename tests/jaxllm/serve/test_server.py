"""The OpenAI-compatible server, driven by the official openai client."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

from jaxllm.serve.tokenizer import TextCodec

KEY = "test-key"
MAX_LEN = 96


# --skip-warmup: programs compile as requests first need them (a fraction of the
# warm-up's); warm-up itself is tested by the bundled model's server and test_startup.py.
ARGS = ["--max-model-len", str(MAX_LEN), "--max-num-seqs", "4", "--block-size", "8",
        "--api-key", KEY, "--seed", "0", "--skip-warmup"]


@pytest.fixture
def server(word_model, server_pool):
    hf, ckpt = word_model
    served = server_pool.shared(["--model", str(ckpt), *ARGS])
    return hf, ckpt, served.url, served.client(KEY)


def hf_continuation(hf, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                          eos_token_id=2, pad_token_id=0)
    return out[0, len(ids):].tolist()


def expected_text(ckpt, ids: list[int], hf, n: int) -> tuple[str, str]:
    codec = TextCodec.from_dir(ckpt)
    new = hf_continuation(hf, ids, n)
    finish = "stop" if new and new[-1] == 2 else "length"
    return codec.decode(new[:-1] if finish == "stop" else new), finish


PROMPT = " ".join(f"w{i}" for i in (40, 41, 200, 17, 99, 230, 18, 7, 150, 151, 152, 300))


def test_models_health_version(server):
    _, _, base, client = server
    [model] = client.models.list().data
    assert model.id == "tiny"
    assert httpx.get(f"{base}/health").status_code == 200
    assert "version" in httpx.get(f"{base}/version").json()


def test_greedy_completion_equals_hf(server):
    hf, ckpt, _, client = server
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16,
                                    temperature=0)
    ids = TextCodec.from_dir(ckpt).encode(PROMPT)
    text, finish = expected_text(ckpt, ids, hf, 16)
    assert len(text.split()) >= 8  # a real continuation to compare
    assert out.choices[0].text == text and out.choices[0].finish_reason == finish
    assert out.usage.prompt_tokens == len(ids)


def test_streaming_completion_matches_and_reports_usage(server):
    _, _, _, client = server
    whole = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16,
                                      temperature=0).choices[0].text
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


def test_chat_completion_equals_hf_on_the_template(server):
    hf, ckpt, _, client = server
    messages = [{"role": "system", "content": "w9 w10"}, {"role": "user", "content": "w33 w34"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12,
                                         temperature=0)
    codec = TextCodec.from_dir(ckpt)
    ids = codec.encode(codec.render_chat(messages), add_special_tokens=False)
    text, finish = expected_text(ckpt, ids, hf, 12)
    assert len(text.split()) >= 6
    assert out.choices[0].message.content == text
    assert out.choices[0].finish_reason == finish
    streamed = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12,
                                              temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text


def test_n_and_seed(server):
    _, _, _, client = server
    kwargs = dict(model="tiny", prompt=PROMPT, max_tokens=10, temperature=1.0, seed=5, n=3)
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1


def test_stop_string_cuts_the_text(server):
    _, _, _, client = server
    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16,
                                     temperature=0, extra_body={"ignore_eos": True}
                                     ).choices[0].text
    words = full.split()
    stop = words[3]
    cut = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16,
                                    temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.index(stop)]


def test_stop_token_ids(server):
    hf, ckpt, _, client = server
    codec = TextCodec.from_dir(ckpt)
    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16,
                                     temperature=0, extra_body={"ignore_eos": True})
    ids = codec.encode(full.choices[0].text, add_special_tokens=False)
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0,
                                    extra_body={"ignore_eos": True,
                                                "stop_token_ids": [ids[4]]}).choices[0]
    first = ids.index(ids[4])
    assert out.finish_reason == "stop" and out.text == codec.decode(ids[:first])


def test_logprobs(server):
    _, _, _, client = server
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5,
                                    temperature=0, logprobs=3).choices[0]
    lp = out.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) >= 1
    for value, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3 and value <= 0
        assert value == pytest.approx(max(top.values()), abs=1e-5)  # greedy took the best


@pytest.mark.parametrize("kwargs,status,needle", [
    (dict(prompt=PROMPT, max_tokens=90), 400,
     "This model's maximum context length is 96 tokens. However, you requested 102 tokens "
     "(12 in the messages, 90 in the completion). Please reduce the length of the messages "
     "or completion."),
    (dict(prompt=[5, 333], max_tokens=2), 400, "Token id 333 is out of vocabulary"),
    (dict(prompt=PROMPT, temperature=-1), 400, "temperature"),
    (dict(prompt=PROMPT, model="other"), 404, "The model `other` does not exist."),
    (dict(prompt=[], max_tokens=2), 400, "prompt"),
    (dict(prompt=PROMPT, presence_penalty=2.5), 400,
     "presence_penalty: Input should be less than or equal to 2 (got 2.5)"),
    (dict(prompt=PROMPT, frequency_penalty=-3), 400,
     "frequency_penalty: Input should be greater than or equal to -2 (got -3)"),
    (dict(prompt=PROMPT, extra_body={"repetition_penalty": 0}), 400,
     "repetition_penalty: Input should be greater than 0 (got 0)"),
    (dict(prompt=PROMPT, echo=True, stream=True), 400, "'echo' is not supported with stream"),
    (dict(prompt=PROMPT, max_tokens=0), 400, "max_tokens=0 generates nothing"),
    (dict(prompt=PROMPT, logit_bias={"5": 101}), 400, "logit_bias[5]=101.0 must be in [-100, 100]"),
    (dict(prompt=PROMPT, logit_bias={"333": 1}), 400, "Token id 333 is out of vocabulary"),
    (dict(prompt=PROMPT, best_of=2), 400, "best_of=2, n=1"),
    (dict(prompt=PROMPT, extra_body={"top_k": 2**31}), 400, "(got 2147483648)"),
    (dict(prompt=PROMPT, max_tokens=2, extra_body={"min_tokens": 4}), 400,
     "min_tokens=4 must be in [0, max_tokens=2]"),
])
def test_bad_requests_get_json_errors_and_the_server_survives(server, kwargs, status, needle):
    _, _, base, client = server
    kwargs = {"model": "tiny", **kwargs}
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(**kwargs)
    assert info.value.status_code == status
    body = info.value.response.json()
    assert body["object"] == "error" and body["code"] == status and needle in body["message"]
    assert httpx.get(f"{base}/health").status_code == 200


def test_api_key_is_required(server):
    _, _, base, _ = server
    r = httpx.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": "w7"})
    assert r.status_code == 401 and r.json()["type"] == "AuthenticationError"


def test_tokenize_detokenize_metrics(server):
    _, _, base, client = server
    tok = httpx.post(f"{base}/tokenize", json={"prompt": "w10 w11"}).json()
    assert tok["tokens"] == [10, 11] and tok["count"] == 2 and tok["max_model_len"] == MAX_LEN
    assert httpx.post(f"{base}/detokenize", json={"tokens": [10, 11]}).json() == {
        "prompt": "w10 w11"}
    bad = httpx.post(f"{base}/detokenize", json={"tokens": [10, 999]})
    assert bad.status_code == 400 and "out of vocabulary" in bad.json()["message"]
    client.completions.create(model="tiny", prompt="w8 w9", max_tokens=2)
    text = httpx.get(f"{base}/metrics").text
    assert "vllm:request_success_total" in text and "vllm:time_to_first_token" in text
    for name in ("vllm:time_per_output_token_seconds_count", "vllm:inter_token_latency_seconds",
                 "vllm:request_queue_time_seconds", "vllm:prefix_cache_queries_total",
                 "vllm:num_preemptions_total", "vllm:kv_cache_usage_perc"):
        assert name in text


def test_malformed_json_is_a_400(server):
    _, _, base, _ = server
    r = httpx.post(f"{base}/v1/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {KEY}",
                            "Content-Type": "application/json"})
    assert r.status_code == 400 and json.loads(r.text)["object"] == "error"


def test_seeds_use_all_64_bits(server):
    _, _, _, client = server
    texts = [client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10,
                                       temperature=1.0, seed=seed).choices[0].text
             for seed in (1, 2**32 + 1, 1)]
    assert texts[0] == texts[2] and texts[0] != texts[1]


def test_max_completion_tokens_and_include_stop_str_on_completions(server):
    _, _, _, client = server
    out = client.completions.create(model="tiny", prompt=PROMPT, temperature=0, extra_body={
        "max_completion_tokens": 3, "ignore_eos": True})
    assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"
    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full.split()[3]
    cut = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0,
                                    stop=[stop], extra_body={
                                        "ignore_eos": True, "include_stop_str_in_output": True})
    assert cut.choices[0].text == full[: full.index(stop) + len(stop)]


def test_image_content_and_legacy_functions_are_refused_by_name(server):
    _, _, _, client = server
    image = {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}
    for kwargs, needle in [
        (dict(messages=[{"role": "user", "content": [image]}]), "this model takes no images"),
        (dict(messages=[{"role": "user", "content": "w1"}],
              functions=[{"name": "f", "parameters": {}}]), "'functions' is not supported"),
    ]:
        with pytest.raises(openai.BadRequestError, match=needle):
            client.chat.completions.create(model="tiny", max_tokens=2, **kwargs)


def test_continuous_usage_stats_counts_every_chunk(server):
    _, _, _, client = server
    chunks = list(client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    counts = [c.usage.completion_tokens for c in chunks if c.choices and c.choices[0].text]
    assert counts == sorted(counts) and counts[0] >= 1 and len(set(counts)) == len(counts)
    assert all(c.usage.prompt_tokens == chunks[-1].usage.prompt_tokens for c in chunks)


def test_echo_scores_the_prompt_like_lm_eval(server):
    """lm-eval's loglikelihood request: echo, logprobs=1, max_tokens=0 over token ids. The
    prompt comes back with each token's log-probability under HF's model (the first has
    none), and vLLM's prompt_logprobs agree."""
    hf, ckpt, _, client = server
    ids = [40, 41, 200, 17, 99, 230, 18, 7, 150, 151, 152, 300, 301, 12]
    out = client.completions.create(model="tiny", prompt=ids, echo=True, logprobs=1,
                                    max_tokens=0, temperature=0,
                                    extra_body={"prompt_logprobs": 2})
    choice = out.choices[0]
    with torch.no_grad():
        want = torch.log_softmax(hf(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    lps = choice.logprobs.token_logprobs
    assert lps[0] is None and len(lps) == len(ids) and out.usage.completion_tokens == 0
    for j in range(1, len(ids)):
        assert abs(lps[j] - float(want[j - 1, ids[j]])) < 1e-4
    assert choice.text == TextCodec.from_dir(ckpt).decode(ids)
    assert choice.logprobs.text_offset[0] == 0
    assert len(choice.logprobs.top_logprobs[1]) == 1
    vllm = choice.model_extra["prompt_logprobs"]
    assert vllm[0] is None and len(vllm) == len(ids)
    assert abs(vllm[3][str(ids[3])]["logprob"] - lps[3]) < 1e-6
    # Echo with a completion: the prompt's scores, then the generated tokens'.
    both = client.completions.create(model="tiny", prompt=ids, echo=True, logprobs=0,
                                     max_tokens=3, temperature=0).choices[0]
    assert len(both.logprobs.tokens) == len(ids) + 3
    assert both.logprobs.token_logprobs[:len(ids)] == pytest.approx(lps, abs=1e-6)


def test_logit_bias_and_min_tokens(server):
    _, _, _, client = server
    forced = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4,
                                       temperature=0, logit_bias={"77": 100})
    assert forced.choices[0].logprobs is None
    ids = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0,
                                    logit_bias={"77": 100}, logprobs=0)
    assert ids.choices[0].logprobs.tokens == ["w77"] * 4
    first = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=1, temperature=0,
                                      logprobs=0).choices[0].logprobs.tokens[0]
    stop_id = int(first.removeprefix("w"))
    # Stopping on the greedy first token ends at once; min_tokens=2 holds it back.
    plain = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0,
                                      extra_body={"stop_token_ids": [stop_id]})
    assert plain.usage.completion_tokens == 1 and plain.choices[0].finish_reason == "stop"
    held = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0,
                                     logprobs=0, extra_body={"stop_token_ids": [stop_id],
                                                             "min_tokens": 2})
    assert held.usage.completion_tokens >= 2
    assert held.choices[0].logprobs.tokens[0] != first



def hf_penalised(hf, ids: list[int], n: int, bias: dict[int, float], presence: float = 0.0,
                 frequency: float = 0.0, repetition: float = 1.0) -> list[int]:
    """HF greedy, token by token, with logit_bias and then vLLM's penalties applied in numpy
    from their definition (repetition on prompt and output tokens, then frequency and
    presence on the output)."""
    output: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = hf(input_ids=torch.tensor([ids + output])).logits[0, -1].double().numpy()
            for t, b in bias.items():
                logits[t] += b
            for t in set(ids) | set(output):
                logits[t] = logits[t] / repetition if logits[t] > 0 else logits[t] * repetition
            for t in set(output):
                logits[t] -= frequency * output.count(t) + presence
            output.append(int(logits.argmax()))
            if output[-1] == 2:
                break
    return output


def test_penalties_change_a_repetitive_continuation_like_the_reference(server):
    """A logit_bias makes greedy repeat w77; frequency_penalty breaks the repetition, and
    the text equals HF's with the bias and the penalty applied by definition."""
    hf, ckpt, _, client = server
    codec = TextCodec.from_dir(ckpt)
    ids = codec.encode(PROMPT)
    bias = {77: 8.0}
    kwargs = dict(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                  logit_bias={"77": 8.0})
    plain = client.completions.create(**kwargs).choices[0].text
    assert plain.split().count("w77") >= 10  # repetitive
    out = client.completions.create(frequency_penalty=2.0, **kwargs).choices[0]
    want = hf_penalised(hf, ids, 12, bias, frequency=2.0)
    assert out.text == codec.decode(want[:-1] if want[-1] == 2 else want)
    assert out.text != plain and out.text.split().count("w77") < 10
    # Chat, with a repetition and a presence penalty (vLLM's extra parameter in extra_body).
    messages = [{"role": "user", "content": "w33 w77 w34"}]
    chat_ids = codec.encode(codec.render_chat(messages), add_special_tokens=False)
    chat = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0, presence_penalty=1.5,
        logit_bias={"77": 8.0}, extra_body={"repetition_penalty": 1.7}).choices[0]
    want = hf_penalised(hf, chat_ids, 10, bias, presence=1.5, repetition=1.7)
    assert chat.message.content == codec.decode(want[:-1] if want[-1] == 2 else want)


@pytest.mark.slow  # a second server: ~85 s; the engine-level on/off tests stay in the suite
def test_async_scheduling_off_gives_the_same_texts_stop_strings_included(server, server_pool):
    """The server's answers with ``--no-async-scheduling`` equal the default (async) ones:
    seeded sampling with a stop string found in its text, streamed and not, n > 1, stop ids
    and logprobs (the engine half of the comparison is ``test_async_scheduling.py``)."""
    _, ckpt, _, client = server
    sampled = dict(model="tiny", prompt=PROMPT, max_tokens=20, temperature=1.0, top_p=0.9,
                   seed=11, extra_body={"ignore_eos": True})
    words = client.completions.create(**sampled).choices[0].text.split()
    stop = words[len(words) // 2]
    cases = [
        dict(sampled, stop=[stop]),
        dict(sampled, stop=[stop, words[1]], n=2, seed=12),
        dict(sampled, seed=13, logprobs=2, extra_body={"ignore_eos": True,
                                                       "stop_token_ids": [5, 9]}),
        dict(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stop=[words[2]]),
    ]

    def answers(c: openai.OpenAI) -> list:
        out = []
        for kwargs in cases:
            whole = c.completions.create(**kwargs)
            out.append([(ch.text, ch.finish_reason, ch.logprobs and ch.logprobs.token_logprobs)
                        for ch in whole.choices])
            if kwargs.get("n", 1) == 1:  # streamed too: the chunks add up to the same text
                chunks = list(c.completions.create(**kwargs, stream=True))
                out.append("".join(ch.choices[0].text for ch in chunks if ch.choices))
        return out

    expected = answers(client)
    assert expected[0][0][1] == "stop" and stop not in expected[0][0][0]
    sync = server_pool.shared(["--model", str(ckpt), *ARGS, "--no-async-scheduling"])
    assert answers(sync.client(KEY)) == expected
