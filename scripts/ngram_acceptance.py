"""N-gram draft acceptance on the bundled model's own task (two-digit sums), measured on the host.

    python scripts/ngram_acceptance.py

Greedy verification accepts exactly the drafts that equal the greedy continuation, so the
acceptance of n-gram drafts follows from the greedy outputs alone: generate them without speculation
(``jaxllm.generate``), then replay each request's decode steps, drafting from its prompt and output
so far (``jaxllm.engine.spec_decode.ngram``) and accepting the longest prefix of the draft that
matches what the model emits next. The first token comes from the prefill, which drafts nothing; a
step emits its accepted drafts plus one token, never past the end of the output.

Prompt sets: held-out sums, sums of repeated-digit operands (11 + 22, 33 + 33, ...), and sums
with zero (47 + 0), where the answer repeats the prompt. Columns: decode steps, tokens per
decode step, vLLM's mean acceptance length (1 + accepted / steps that drafted), accepted /
drafted tokens, and the acceptance rate at each draft position.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import jaxllm
from jaxllm.engine.spec_decode import ngram
from jaxllm.serve.tokenizer import TextCodec

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "checkpoints" / "tiny-llama4"
SETTINGS = [(1, 1), (1, 2), (2, 2), (1, 3), (5, 5)]  # (prompt_lookup_min, prompt_lookup_max)
DRAFTS = (1, 3, 5)


@dataclasses.dataclass
class Tally:
    steps: int = 0
    tokens: int = 0  # emitted by decode steps
    drafting_steps: int = 0
    drafted: int = 0
    accepted: int = 0
    at_position: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((2, 16), int))

    def add(self, other: Tally) -> None:
        for f in ("steps", "tokens", "drafting_steps", "drafted", "accepted"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        self.at_position += other.at_position


def replay(prompt: Sequence[int], output: Sequence[int], *, min_n: int, max_n: int, k: int,
           max_model_len: int) -> Tally:
    """One request's decode steps with n-gram drafts under greedy verification."""
    t = Tally()
    tokens = np.asarray(list(prompt) + list(output), np.int64)
    done = len(prompt) + 1  # the prefill emitted output[0]
    while done < len(tokens):
        draft = ngram.propose(tokens[:done], min_n=min_n, max_n=max_n, k=k,
                              max_model_len=max_model_len)
        ahead = tokens[done: done + len(draft)]
        same = draft[: len(ahead)] == ahead
        accepted = int(np.argmin(same)) if not same.all() else len(ahead)
        emitted = min(accepted + 1, len(tokens) - done)
        t.steps += 1
        t.tokens += emitted
        if len(draft):
            t.drafting_steps += 1
            t.drafted += len(draft)
            t.accepted += accepted
            t.at_position[0, : len(draft)] += 1  # position j was drafted ...
            t.at_position[1, :accepted] += 1  # ... and accepted
        done += emitted
    return t


def prompt_sets(train) -> dict[str, np.ndarray]:
    _, held_out = train.make_split(seed=0, held_out=500)
    rep = [a * 11 for a in range(10)]
    return {
        "held-out sums": held_out[:200],
        "repeated digits": np.array([(a, b) for a in rep for b in rep]),
        "x + 0": np.array([(a, 0) for a in range(10, 100, 3)]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("train_tiny", REPO / "scripts" / "train_tiny.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    max_model_len = 64
    model = jaxllm.load_model(BUNDLED, max_model_len=max_model_len)
    codec = TextCodec.from_dir(BUNDLED)

    print(f"{'prompts':<16} {'min..max':>8} {'k':>2} {'steps':>6} {'tok/step':>8} "
          f"{'vLLM AL':>7} {'acc/drafted':>11}  per-position acceptance")
    for name, pairs in prompt_sets(train).items():
        prompts = [codec.encode(codec.render_chat([{"role": "user",
                                                    "content": train.question(a, b)}]),
                                add_special_tokens=False) for a, b in pairs]
        outputs = jaxllm.generate(model, prompts, max_new_tokens=args.max_new_tokens)
        right = sum(codec.decode(o) == str(a + b) for o, (a, b) in zip(outputs, pairs,
                                                                      strict=True))
        print(f"# {name}: {len(pairs)} prompts, {right} answered right, "
              f"{np.mean([len(o) for o in outputs]):.2f} output tokens each (EOS included)")
        for min_n, max_n in SETTINGS:
            for k in DRAFTS:
                total = Tally()
                for p, o in zip(prompts, outputs, strict=True):
                    total.add(replay(p, o, min_n=min_n, max_n=max_n, k=k,
                                     max_model_len=max_model_len))
                al = 1 + total.accepted / max(total.drafting_steps, 1)
                drafted, took = total.at_position[:, :k]
                rates = " ".join(f"{a / d:.2f}" if d else "  - " for a, d in zip(took, drafted,
                                                                                  strict=True))
                print(f"{name:<16} {f'{min_n}..{max_n}':>8} {k:>2} {total.steps:>6} "
                      f"{total.tokens / total.steps:>8.3f} {al:>7.3f} "
                      f"{total.accepted:>5}/{total.drafted:<5}  {rates}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
