"""Structured outputs: the token mask in the compiled sampler, llguidance grammars against the
model's tokenizer, and the engine keeping each constrained request inside its grammar."""

from __future__ import annotations

import json
import re

import jax
import jsonschema
import numpy as np
import pytest
from tokenizers import Tokenizer

from jaxllm.sample.grammar import GrammarCompiler, StructuredOutput
from jaxllm.sample.sampling import SamplingParams, apply_token_mask, mask_words
from jaxllm.sharding import make_mesh
from tests.support import REPO

pytestmark = pytest.mark.heavy  # end to end: compiles engines or models (tests/conftest.py)

BUNDLED = REPO / "checkpoints" / "tiny-llama4"


def reference_mask(logits: np.ndarray, words: np.ndarray) -> np.ndarray:
    """The mask from its definition: token t is allowed when bit t % 32 of word t // 32 is set."""
    out = logits.copy()
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            if not (int(words[b, t // 32]) >> (t % 32)) & 1:
                out[b, t] = -np.inf
    return out


def random_words(rng, rows: int, vocab: int) -> np.ndarray:
    words = rng.integers(-2**31, 2**31, size=(rows, mask_words(vocab)), dtype=np.int64)
    words = words.astype(np.int32)
    words[0] = -1  # an unconstrained row
    words[1] = 0
    words[1, 2] = -2**31  # only token 95 (the sign bit)
    return words


def test_token_mask_matches_the_definition():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 100)).astype(np.float32)
    words = random_words(rng, 4, 100)
    out = np.asarray(jax.jit(apply_token_mask)(logits, words))
    np.testing.assert_array_equal(out, reference_mask(logits, words))
    assert np.isfinite(out[0]).all() and np.flatnonzero(np.isfinite(out[1])).tolist() == [95]


def test_token_mask_on_a_vocab_sharded_mesh():
    mesh = make_mesh(model=8)
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 336)).astype(np.float32)
    words = random_words(rng, 3, 336)
    sharded = jax.device_put(logits, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(None, "model")))
    out = jax.jit(lambda x, w: apply_token_mask(x, w, mesh))(sharded, words)
    np.testing.assert_array_equal(np.asarray(out), reference_mask(logits, words))


def test_unconstrained_batches_are_untouched():
    logits = np.random.default_rng(2).normal(size=(2, 64)).astype(np.float32)
    out = jax.jit(apply_token_mask)(logits, np.full((2, 2), -1, np.int32))
    np.testing.assert_array_equal(np.asarray(out), logits)


@pytest.fixture(scope="module")
def compiler():
    tokenizer = Tokenizer.from_file(str(BUNDLED / "tokenizer.json"))
    vocab = json.loads((BUNDLED / "config.json").read_text())["text_config"]["vocab_size"]
    return GrammarCompiler.for_tokenizer(tokenizer, [2], vocab)


def allowed(masks: np.ndarray, row: int, vocab: int) -> list[int]:
    return [t for t in range(vocab) if (int(masks[row, t // 32]) >> (t % 32)) & 1]


def test_masks_allow_exactly_the_grammar(compiler):
    tok = Tokenizer.from_file(str(BUNDLED / "tokenizer.json"))
    choice = compiler.matcher(StructuredOutput.choice(["yes", "no"]))
    digits = compiler.matcher(StructuredOutput("regex", "[0-9]+"))
    masks = compiler.masks([choice, digits], mask_words(128))
    assert masks.shape == (2, 4)
    assert sorted(tok.id_to_token(t) for t in allowed(masks, 0, 128)) == ["n", "y"]
    assert sorted(tok.id_to_token(t) for t in allowed(masks, 1, 128)) == list("0123456789")
    assert choice.consume_token(tok.token_to_id("y"))
    masks = compiler.masks([choice], mask_words(128))
    assert [tok.id_to_token(t) for t in allowed(masks, 0, 128)] == ["e"]


def test_draft_masks_are_the_grammars_after_each_draft_and_leave_the_matcher_alone(compiler):
    """The masks of a verifying step's positions past the first: a fresh matcher fed each
    prefix of the drafts is the reference; the drafting matcher ends where it began."""
    tok = Tokenizer.from_file(str(BUNDLED / "tokenizer.json"))
    regex = StructuredOutput("regex", "[0-9]{2}-[a-z]+")
    ids = [tok.token_to_id(c) for c in "47-ab"]
    words = mask_words(128)
    drafting = compiler.matcher(regex)
    assert drafting.consume_token(ids[0])
    before = compiler.masks([drafting], words)
    # 3 drafts after "4"; a choice ending on its last draft: nothing is allowed after it.
    done = compiler.matcher(StructuredOutput.choice(["no"]))
    got = compiler.draft_masks([(drafting, ids[1:4]), (done, [tok.token_to_id("n"),
                                                             tok.token_to_id("o")])], words)
    for j in range(3):
        fresh = compiler.matcher(regex)
        assert fresh.consume_tokens(ids[: j + 2])
        np.testing.assert_array_equal(got[0][j], compiler.masks([fresh], words)[0], err_msg=j)
    assert allowed(got[1], 0, 128) == [tok.token_to_id("o")]
    assert np.all(got[1][1] == -1)  # after the grammar's end: never taken, left open
    np.testing.assert_array_equal(compiler.masks([drafting], words), before)
    assert drafting.validate_tokens(ids[1:]) == 4 and drafting.validate_tokens([ids[3]]) == 0


@pytest.mark.parametrize("structured,message", [
    (StructuredOutput("regex", "(("), "invalid regex constraint"),
    (StructuredOutput.json_schema({"type": "nonsense"}), "invalid json constraint"),
    (StructuredOutput("grammar", "start: undefined_rule"), "invalid grammar constraint"),
])
def test_bad_grammars_name_the_problem(compiler, structured, message):
    with pytest.raises(ValueError, match=message):
        compiler.matcher(structured)


def test_choice_needs_an_option():
    with pytest.raises(ValueError, match="at least one option"):
        StructuredOutput.choice([])


@pytest.fixture(scope="module")
def engine():
    from jaxllm.engine import Engine
    from jaxllm.weights.loading import load_model

    model = load_model(BUNDLED)
    engine = Engine(model, num_pages=64)
    tokenizer = Tokenizer.from_file(str(BUNDLED / "tokenizer.json"))
    engine.grammars = GrammarCompiler.for_tokenizer(tokenizer, model.eos_token_ids,
                                                    model.config.vocab_size)
    return engine


PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
    "required": ["name", "age", "tags"], "additionalProperties": False}


def prompt_ids(text: str) -> list[int]:
    return Tokenizer.from_file(str(BUNDLED / "tokenizer.json")).encode(text).ids


def decode(ids) -> str:
    return Tokenizer.from_file(str(BUNDLED / "tokenizer.json")).decode(ids)


def test_engine_outputs_follow_their_grammars(engine):
    prompt = prompt_ids("<|user|>What is 12 + 34?<|assistant|>")
    cases = [
        (StructuredOutput.json_schema(PERSON),
         lambda text: jsonschema.validate(json.loads(text), PERSON)),
        (StructuredOutput("regex", r"[0-9]{3}-[a-z]{2,4}"),
         lambda text: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", text) or pytest.fail(text)),
        (StructuredOutput.choice(["alpha", "beta", "gamma"]),
         lambda text: text in {"alpha", "beta", "gamma"} or pytest.fail(text)),
        (StructuredOutput("grammar", 'start: "sum=" NUM\nNUM: /[0-9]{1,3}/'),
         lambda text: re.fullmatch(r"sum=[0-9]{1,3}", text) or pytest.fail(text)),
    ]
    for temperature in (0.0, 1.0):
        ids = [engine.add_request(prompt, SamplingParams(
            temperature=temperature, seed=7, max_tokens=120, structured=s)) for s, _ in cases]
        produced = {i: [] for i in ids}
        finish = {}
        while engine.has_unfinished():
            for out in engine.step():
                produced[out.request_id] += out.new_token_ids
                if out.finished:
                    finish[out.request_id] = out.finish_reason
        for i, (_, check) in zip(ids, cases, strict=True):
            assert finish[i] == "stop", (decode(produced[i]), finish[i])
            check(decode(produced[i]))


def test_unconstrained_neighbours_are_unchanged(engine):
    """A constrained request in the batch changes nothing for the others (batch invariance)."""
    prompt = prompt_ids("<|user|>What is 58 + 67?<|assistant|>")
    alone = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8))[0]
    constrained = SamplingParams(temperature=0.0, max_tokens=8,
                                 structured=StructuredOutput("regex", "[a-z]+"))
    ids = [engine.add_request(prompt, constrained),
           engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=8))]
    produced = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            produced[out.request_id] += out.new_token_ids
    assert produced[ids[1]] == alone
    assert re.fullmatch("[a-z]+", decode(produced[ids[0]]))
    assert decode(alone).strip() == "125"  # the bundled model's own answer, unconstrained


def test_constrained_requests_draft_and_answer_as_without_speculation(engine):
    """n-gram drafts for requests with a grammar, cut where the grammar refuses one, each
    later position masked by the grammar after the drafts before it: greedy outputs equal
    the engine's without speculation, sampled ones still follow their grammars."""
    from jaxllm.engine import Engine
    from jaxllm.engine.spec_decode.config import SpeculativeConfig
    from tests.jaxllm.engine.test_engine_penalties import _run

    prompt = prompt_ids("<|user|>What is 12 + 34?<|assistant|>")
    schemas = [StructuredOutput.json_schema(PERSON),
               StructuredOutput("regex", r"([0-9]{2}-){3}[a-z]{2,4}"),
               StructuredOutput("grammar", 'start: ("sum=" NUM ";")~3\nNUM: /[0-9]{1,3}/')]
    requests = [(prompt, SamplingParams(temperature=t, seed=3, max_tokens=60, structured=s))
                for t in (0.0, 1.0) for s in schemas]

    spec = Engine(engine.model, num_pages=64, speculative=SpeculativeConfig(
        method="ngram", num_speculative_tokens=3, prompt_lookup_min=1, prompt_lookup_max=3))
    spec.grammars = engine.grammars
    drafted, plain = _run(spec, requests), _run(engine, requests)
    assert drafted[:3] == plain[:3]  # greedy
    jsonschema.validate(json.loads(decode(drafted[3])), PERSON)
    assert re.fullmatch(r"([0-9]{2}-){3}[a-z]{2,4}", decode(drafted[4])), decode(drafted[4])
    assert re.fullmatch(r"(sum=[0-9]{1,3};){3}", decode(drafted[5])), decode(drafted[5])
    stats = spec.speculator.stats
    assert stats.num_drafts > 5 and stats.num_accepted_tokens > 5, stats


def test_engine_without_a_tokenizer_refuses_structured_requests(engine):
    grammars, engine.grammars = engine.grammars, None
    try:
        with pytest.raises(ValueError, match="need the model's tokenizer"):
            engine.prepare([1, 2], SamplingParams(structured=StructuredOutput.choice(["a"])))
    finally:
        engine.grammars = grammars


def byte_level_bpe() -> Tokenizer:
    """A small byte-level BPE tokenizer (Llama 4's kind), trained here on a few sentences."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|eot|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ['{"name": "hello world", "help": true}', "hello help helpful world wide web",
            "résumé naïve café 東京"] * 50
    tokenizer.train_from_iterator(text, trainer)
    return tokenizer


def test_byte_level_tokenizers_mask_by_bytes():
    """Multi-byte characters split over byte tokens: the masks follow the bytes."""
    tokenizer = byte_level_bpe()
    eot = tokenizer.token_to_id("<|eot|>")
    vocab = tokenizer.get_vocab_size()
    compiler = GrammarCompiler.for_tokenizer(tokenizer, [eot], vocab)
    options = ["hello world", "help", "café 東京"]
    for option in options:
        matcher = compiler.matcher(StructuredOutput.choice(options))
        text = b""
        for token in tokenizer.encode(option, add_special_tokens=False).ids:
            ok = allowed(compiler.masks([matcher], mask_words(vocab)), 0, vocab)
            assert token in ok
            # Every allowed token keeps the bytes a prefix of some option (the definition).
            for t in ok:
                piece = _token_bytes(tokenizer, t)
                assert any(o.encode().startswith(text + piece) for o in options), (text, piece)
            assert matcher.consume_token(token)
            text += _token_bytes(tokenizer, token)
        assert text == option.encode() and matcher.is_stopped()


def _token_bytes(tokenizer: Tokenizer, token: int) -> bytes:
    """A byte-level token's bytes (its characters map to bytes by GPT-2's table)."""
    from tokenizers import pre_tokenizers

    table = {c: i for i, c in enumerate(_gpt2_byte_chars())}
    assert len(pre_tokenizers.ByteLevel.alphabet()) == 256
    return bytes(table[c] for c in tokenizer.id_to_token(token))


def _gpt2_byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table (byte-level BPE), from its definition."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars
