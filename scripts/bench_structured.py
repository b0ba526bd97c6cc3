"""What structured outputs cost the engine: the same batch of requests, free and constrained to
a JSON schema, through the engine on the bundled model; then the host-side mask time alone,
for the bundled vocabulary and for a synthetic one of Llama 4's size (202,048 tokens).

    python scripts/bench_structured.py [--requests 16] [--tokens 48]

Prints per configuration the steps, generated tokens, tokens/s and ms per step, the ratio to
the free run, and how long llguidance takes to fill one step's bitmasks (the work the host
does between steps). On this CPU build the model step itself is small, so the ratio is an
upper bound on what a GPU step (longer, the same host work) would see.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from jaxllm.engine import Engine
from jaxllm.sample.grammar import GrammarCompiler, StructuredOutput
from jaxllm.sample.sampling import SamplingParams, mask_words
from jaxllm.weights.loading import load_model

BUNDLED = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny-llama4"
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["x", "y", "z"]}, "maxItems": 4},
    "ok": {"type": "boolean"}}, "required": ["name", "age", "tags", "ok"]}


def run(engine: Engine, prompt: list[int], n: int, sampling: SamplingParams
        ) -> tuple[int, int, float]:
    """(steps, generated tokens, seconds) for ``n`` copies of ``prompt``."""
    for _ in range(n):
        engine.add_request(prompt, sampling)
    steps = tokens = 0
    start = time.perf_counter()
    while engine.has_unfinished():
        tokens += sum(len(o.new_token_ids) for o in engine.step())
        steps += 1
    return steps, tokens, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args()

    model = load_model(BUNDLED)
    engine = Engine(model, num_pages=256)
    tokenizer = Tokenizer.from_file(str(BUNDLED / "tokenizer.json"))
    engine.grammars = GrammarCompiler.for_tokenizer(tokenizer, model.eos_token_ids,
                                                    model.config.vocab_size)
    engine.warmup(progress=False)
    prompt = tokenizer.encode("<s><|user|>Give data<|assistant|>", add_special_tokens=False).ids
    free = SamplingParams(temperature=1.0, seed=0, max_tokens=args.tokens, stop_token_ids=(),
                          min_tokens=args.tokens)  # no early EOS: every request runs its length
    json_schema = SamplingParams(temperature=1.0, seed=0, max_tokens=args.tokens,
                                 structured=StructuredOutput.json_schema(SCHEMA))
    run(engine, prompt, args.requests, json_schema)  # compiles the masked branch once

    rows = []
    for name, sampling in (("free", free), ("json schema", json_schema)):
        steps, tokens, seconds = run(engine, prompt, args.requests, sampling)
        rows.append((name, steps, tokens, tokens / seconds, 1e3 * seconds / steps))
    base = rows[0][3]
    print(f"{args.requests} requests, bundled model, engine on {model.mesh or 'one device'}")
    print(f"{'config':<12} {'steps':>6} {'tokens':>7} {'tok/s':>8} {'ms/step':>8} "
          f"{'vs free':>8}")
    for name, steps, tokens, rate, ms in rows:
        print(f"{name:<12} {steps:>6} {tokens:>7} {rate:>8.0f} {ms:>8.2f} {rate / base:>8.2f}")

    # The host's share: filling one step's bitmasks for every constrained request.
    matchers = [engine.grammars.matcher(StructuredOutput.json_schema(SCHEMA))
                for _ in range(args.requests)]
    words = mask_words(model.config.vocab_size)
    reps = 200
    start = time.perf_counter()
    for _ in range(reps):
        engine.grammars.masks(matchers, words)
    mask_ms = 1e3 * (time.perf_counter() - start) / reps
    print(f"bitmasks for {args.requests} requests: {mask_ms:.3f} ms per step "
          f"({np.float64(mask_ms) / rows[1][4]:.1%} of a constrained step here)")
    print(f"bitmasks for {args.requests} requests, {LLAMA4_VOCAB:,}-token vocabulary: "
          f"{large_vocab_mask_ms(args.requests):.3f} ms per step (inside a JSON string)")
    return 0


LLAMA4_VOCAB = 202_048


def large_vocab_mask_ms(n: int) -> float:
    """Milliseconds to fill ``n`` bitmasks over a synthetic vocabulary of Llama 4's size: the
    256 bytes plus random 2-8 character pieces (llguidance's cost grows with the token trie)."""
    import llguidance

    rng = np.random.default_rng(0)
    alphabet = list('abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789{}[]":,.-_')
    tokens = [bytes([i]) for i in range(256)]
    seen = set(tokens)
    while len(tokens) < LLAMA4_VOCAB:
        piece = "".join(rng.choice(alphabet, int(rng.integers(2, 9)))).encode()
        if piece not in seen:
            seen.add(piece)
            tokens.append(piece)

    class Table:  # llguidance.TokenizerWrapper's input: token bytes and an encoder
        eos_token_id, bos_token_id, special_token_ids = 0, None, [0]

        def __init__(self):
            self.tokens = tokens

        def __call__(self, text):
            return list(text.encode())

    tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Table()))
    grammar = StructuredOutput.json_schema(SCHEMA).grammar_text()
    matchers = [llguidance.LLMatcher(tokenizer, grammar) for _ in range(n)]
    for matcher in matchers:
        for byte in b'{"name": "ab':  # byte tokens: their ids are the bytes
            assert matcher.consume_token(byte)
    compiler = GrammarCompiler(tokenizer, LLAMA4_VOCAB)
    reps = 50
    start = time.perf_counter()
    for _ in range(reps):
        compiler.masks(matchers, mask_words(LLAMA4_VOCAB))
    return 1e3 * (time.perf_counter() - start) / reps


if __name__ == "__main__":
    raise SystemExit(main())
