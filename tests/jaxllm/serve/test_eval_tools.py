"""Third-party tools against a real server (the `eval` extra; slow): schemathesis fuzzes every
operation of /openapi.json, and lm-eval's ``local-completions`` scores a local multiple-choice
task with the loglikelihoods HF transformers gives on the same weights."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.jaxllm.conftest import run_converter
from tests.support import hf_models

pytestmark = pytest.mark.slow


def test_schemathesis_finds_no_server_error_and_no_answer_off_the_schema(tmp_path,
                                                                        bundled_server):
    pytest.importorskip("schemathesis")
    checks = ("not_a_server_error,response_schema_conformance,status_code_conformance,"
              "content_type_conformance")
    har = tmp_path / "run.har"
    base = bundled_server.url
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{base}/openapi.json",
         "--checks", checks, "--max-examples", "25", "--seed", "1", "--no-color",
         "--report", "har", "--report-har-path", str(har)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path)  # its cache dir there
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    entries = json.loads(har.read_text())["log"]["entries"]
    statuses = collections.Counter(
        (e["request"]["method"], e["request"]["url"].split(base)[1].split("?")[0],
         e["response"]["status"]) for e in entries)
    assert not [k for k in statuses if k[2] >= 500], statuses
    # Successes were checked against the response schemas, not only errors.
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize"):
        assert statuses["POST", path, 200] >= 3, statuses
        assert statuses["POST", path, 400] >= 3, statuses


ITEMS = [  # (context, choices, label): word-tokenizer words
    ("w10 w11 w12", ["w13", "w200", "w7"], 0),
    ("w40 w41", ["w42 w43", "w99", "w300 w301 w302"], 1),
    ("w150", ["w151", "w8"], 0),
    ("w17 w99 w230 w18", ["w7 w150", "w151 w152", "w60"], 2),
    ("w5", ["w6", "w9 w9"], 1),
]


def _write_task(root: Path) -> str:
    data = root / "items.jsonl"
    data.write_text("".join(json.dumps({"context": c, "choices": ch, "label": label}) + "\n"
                            for c, ch, label in ITEMS))
    (root / "tiny_mc.yaml").write_text(
        "task: jaxllm_tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\n"
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n")
    return "jaxllm_tiny_mc"


def _hf_loglikelihood(hf, context: list[int], continuation: list[int]) -> float:
    ids = context + continuation
    logits = torch.tensor(hf_models.hf_logits(hf, [ids])[0], dtype=torch.float64)
    logp = torch.log_softmax(logits, dim=-1)
    return sum(float(logp[len(context) - 1 + i, t]) for i, t in enumerate(continuation))


@pytest.fixture(scope="module")
def scoring_model(tmp_path_factory):
    """(HF model, its directory, the converted checkpoint): logits of about unit scale."""
    root = tmp_path_factory.mktemp("scoring")
    hf = hf_models.make_text_model(hf_models.SCOUT_LIKE, seed=31, scale=0.08)
    hf_dir = hf_models.save(hf, root / "hf")
    hf_models.save_word_tokenizer(hf_dir, hf_models.BASE["vocab_size"])
    ckpt = root / "tiny"
    assert run_converter(hf_dir, ckpt, "--dtype", "float32").returncode == 0
    return hf, hf_dir, ckpt


@pytest.mark.parametrize("tokenized", [True, False])
def test_lm_eval_loglikelihoods_equal_hf(tmp_path, monkeypatch, tokenized, scoring_model,
                                         server_pool):
    evaluator = pytest.importorskip("lm_eval.evaluator")
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf, hf_dir, ckpt = scoring_model
    task = _write_task(tmp_path)
    args = ["--model", str(ckpt), "--max-model-len", "64", "--max-num-seqs", "4",
            "--block-size", "8"]
    base = server_pool.shared(args).url
    results = evaluator.simple_evaluate(
        model="local-completions",
        model_args=f"model=tiny,base_url={base}/v1/completions,tokenizer={hf_dir},"
                   f"tokenizer_backend=huggingface,tokenized_requests={tokenized},"
                   "num_concurrent=2,max_retries=1",
        tasks=[task], task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True)
    samples = results["samples"][task]
    assert len(samples) == len(ITEMS)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    compared = 0
    for sample in samples:
        for (context, continuation), [(loglikelihood, _)] in zip(
                sample["arguments"], sample["resps"], strict=True):
            want = _hf_loglikelihood(hf, tok(context)["input_ids"],
                                     tok(continuation)["input_ids"])
            assert loglikelihood == pytest.approx(want, abs=1e-3), (context, continuation)
            compared += 1
    assert compared == sum(len(ch) for _, ch, _ in ITEMS)
    picked = [int(np.argmax([r[0][0] for r in s["resps"]])) for s in samples]
    acc = np.mean([p == s["target"] for p, s in zip(picked, samples, strict=True)])
    assert results["results"][task]["acc,none"] == pytest.approx(acc)
