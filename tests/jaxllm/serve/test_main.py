"""``python -m jaxllm.serve``: flags, and clean refusals before anything is served."""

from __future__ import annotations

import pytest

from jaxllm.serve.__main__ import DEFAULT_MODEL, main, parse_args
from jaxllm.serve.app import DEFAULT_MAX_REQUEST_BYTES


def test_defaults():
    args = parse_args([])
    assert (args.block_size, args.max_num_seqs, args.tensor_parallel_size) == (16, None, 1)
    assert args.async_scheduling and not parse_args(["--no-async-scheduling"]).async_scheduling
    assert (args.host, args.port) == ("127.0.0.1", 8000)
    assert args.max_model_len is None and args.num_kv_pages is None
    assert args.attention_impl is None and args.dtype is None and not args.skip_warmup
    assert args.max_request_bytes == DEFAULT_MAX_REQUEST_BYTES
    assert parse_args(["--max-request-bytes", "1000"]).max_request_bytes == 1000
    assert (args.data_parallel_size, args.step_timeout) == (1, 60.0)


def test_max_num_seqs_defaults_to_vllms_on_a_gpu_and_to_8_on_cpu():
    from jaxllm.buckets import BucketPolicy, default_max_num_seqs
    from jaxllm.config import Llama4Config

    assert (default_max_num_seqs(on_gpu=True), default_max_num_seqs(on_gpu=False)) == (256, 8)
    config = Llama4Config.from_hf(DEFAULT_MODEL)
    gpu = BucketPolicy.for_model(config, dtype="bfloat16", on_gpu=True)
    assert (gpu.max_num_seqs, gpu.max_num_batched_tokens) == (256, 8192)
    assert BucketPolicy.for_model(config, dtype="bfloat16").max_num_seqs == 8  # this CPU


def test_flags_are_parsed():
    args = parse_args(["--model", "m", "--max-model-len", "4096", "--block-size", "32",
                       "--max-num-batched-tokens", "512", "--num-kv-pages", "100",
                       "--dtype", "bfloat16", "--attention-impl", "xla", "--skip-warmup"])
    assert (args.model, args.max_model_len, args.block_size) == ("m", 4096, 32)
    assert (args.max_num_batched_tokens, args.num_kv_pages) == (512, 100)
    assert (args.dtype, args.attention_impl, args.skip_warmup) == ("bfloat16", "xla", True)


@pytest.mark.parametrize("argv", [["--dtype", "int8"], ["--attention-impl", "cuda"],
                                  ["--port", "http"]])
def test_bad_flags_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2 and "usage:" in capsys.readouterr().err


def test_a_missing_model_directory_is_refused(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nowhere")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_a_directory_that_is_not_a_checkpoint_is_refused(tmp_path, capsys):
    assert main(["--model", str(tmp_path), "--skip-warmup"]) == 2
    assert "not a jaxllm checkpoint" in capsys.readouterr().err
