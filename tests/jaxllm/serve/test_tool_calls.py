"""Tool calls through the server and the official openai client, on the bundled model taught
(``finetune``) to answer "What is 2 + 3?" with a call when it is given tools: ``auto`` reads
the model's own call back; ``required`` and a named function are constrained to the
functions' parameter schemas (checked with jsonschema).

The taught model's chat template has a tool section of its own (the tools' names, to keep
prompts short on this character-level model), so the server hands it the tools; a template
without one gets them in the system message (``test_tools.py``)."""

from __future__ import annotations

import json
import shutil

import jsonschema
import pytest

from jaxllm.serve.tokenizer import TextCodec
from jaxllm.serve.tools import prompt_messages
from tests.jaxllm.serve.finetune import finetune
from tests.support import REPO

BUNDLED = REPO / "checkpoints" / "tiny-llama4"
ADD = {"type": "function", "function": {"name": "add", "description": "Adds a and b.",
       "parameters": {"type": "object", "properties": {
           "a": {"type": "integer", "minimum": 0, "maximum": 99},
           "b": {"type": "integer", "minimum": 0, "maximum": 99}},
           "required": ["a", "b"]}}}
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                     "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"]}}}
TOOLS = [ADD, WEATHER]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
SUM = [{"role": "user", "content": "What is 2 + 3?"}]
HI = [{"role": "user", "content": "Say hi"}]
CALL = '{"name": "add", "parameters": {"a": 2, "b": 3}}'


TEMPLATE = (  # the bundled model's, with a tool section
    "{{ bos_token }}{% if tools %}<|system|>tools:{% for t in tools %} "
    "{{ t['function']['name'] }}{% endfor %}{% endif %}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}{% for c in "
    "m.get('tool_calls', []) %}{{ c['function'] | tojson }}{% endfor %}{{ eos_token }}"
    "{% else %}<|{{ m['role'] }}|>{{ m['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def taught_args(tmp_path_factory):
    """The flags of a server over a copy of the bundled model fine-tuned to call a tool."""
    root = tmp_path_factory.mktemp("tools")
    base = root / "base"
    shutil.copytree(BUNDLED, base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps({**config,
                                                            "chat_template": TEMPLATE}))
    codec = TextCodec.from_dir(base)
    assert codec.template_has_tools

    def prompt(messages):  # what the server renders for these messages and tools
        return codec.render_chat(prompt_messages(messages, TOOLS, True), tools=TOOLS)

    taught = root / "taught"
    finetune(base, taught, [(prompt(SUM), CALL), (prompt(HI), "hi")])
    args = ["--model", str(taught), "--served-model-name", "taught", "--max-model-len", "256",
            "--max-num-seqs", "4", "--skip-warmup", "--seed", "0"]
    return args


@pytest.fixture
def client(taught_args, server_pool):
    return server_pool.shared(taught_args).client()


def ask(client, messages, **kw):
    return client.chat.completions.create(model="taught", messages=messages, tools=TOOLS,
                                          max_tokens=120, temperature=0, **kw).choices[0]


def arguments(call) -> dict:
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, PARAMETERS[call.function.name])
    return args


def test_auto_reads_the_models_own_call(client):
    answer = ask(client, SUM)
    assert answer.finish_reason == "tool_calls" and answer.message.content is None
    [call] = answer.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "add" and arguments(call) == {"a": 2, "b": 3}


def test_auto_passes_plain_answers_as_content(client):
    answer = ask(client, HI)
    assert answer.finish_reason == "stop" and answer.message.content == "hi"
    assert not answer.message.tool_calls


def test_named_choice_is_a_schema_valid_call(client):
    for temperature in (0.0, 1.0):
        answer = client.chat.completions.create(
            model="taught", messages=SUM, tools=TOOLS, max_tokens=120, seed=5,
            temperature=temperature,
            tool_choice={"type": "function", "function": {"name": "weather"}}).choices[0]
        assert answer.finish_reason == "stop"  # OpenAI's reason for a named function
        [call] = answer.message.tool_calls
        assert call.function.name == "weather"
        assert set(arguments(call)) == {"city", "unit"}


@pytest.mark.parametrize("parallel", [False, True])
def test_required_choice_calls_a_tool(client, parallel):
    answer = ask(client, SUM, tool_choice="required", parallel_tool_calls=parallel)
    assert answer.finish_reason == "tool_calls" and answer.message.content is None
    assert answer.message.tool_calls
    for call in answer.message.tool_calls:
        arguments(call)


def test_streamed_call_deltas(client):
    chunks = list(client.chat.completions.create(
        model="taught", messages=SUM, tools=TOOLS, max_tokens=120, temperature=0,
        stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    calls = [d.tool_calls[0] for d in deltas if d.tool_calls]
    assert calls[0].index == 0 and calls[0].id.startswith("call_")
    assert calls[0].type == "function" and calls[0].function.name == "add"
    text = "".join(c.function.arguments or "" for c in calls)
    assert json.loads(text) == {"a": 2, "b": 3}
    assert not "".join(d.content or "" for d in deltas)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    plain = list(client.chat.completions.create(
        model="taught", messages=HI, tools=TOOLS, max_tokens=20, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in plain if c.choices) == "hi"


def test_none_leaves_the_tools_out(client):
    with_tools = client.chat.completions.create(model="taught", messages=SUM, tools=TOOLS,
                                                max_tokens=8, temperature=0)
    without = client.chat.completions.create(model="taught", messages=SUM, tools=TOOLS,
                                             tool_choice="none", max_tokens=8, temperature=0)
    assert not without.choices[0].message.tool_calls
    assert without.usage.prompt_tokens < with_tools.usage.prompt_tokens


def test_a_conversation_with_a_call_and_its_result(client):
    history = SUM + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    answer = ask(client, history)
    assert answer.finish_reason in ("stop", "length", "tool_calls")
