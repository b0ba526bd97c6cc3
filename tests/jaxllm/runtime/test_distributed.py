"""Joining a multi-process group: arguments over environment, and the checks before any
collective starts (the real two-process run is test_sharding's)."""

from __future__ import annotations

import jax
import pytest

from jaxllm.runtime import distributed

ENV = (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID)


@pytest.fixture
def joined(monkeypatch):
    """Records what would be passed to ``jax.distributed.initialize`` instead of calling it."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.config, "update", lambda *a: calls.append(a))
    return calls


def test_env_names():
    assert ENV == ("JAXLLM_COORDINATOR_ADDRESS", "JAXLLM_NUM_PROCESSES", "JAXLLM_PROCESS_ID")


@pytest.mark.parametrize("env", [{}, {"JAXLLM_NUM_PROCESSES": "1"},
                                 {"JAXLLM_NUM_PROCESSES": ""},
                                 {"JAXLLM_NUM_PROCESSES": "1", "JAXLLM_PROCESS_ID": "0"}])
def test_a_single_process_joins_nothing(joined, monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert distributed.initialize() is False
    assert joined == []


def test_environment_is_read(joined, monkeypatch):
    monkeypatch.setenv("JAXLLM_COORDINATOR_ADDRESS", "host:1234")
    monkeypatch.setenv("JAXLLM_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAXLLM_PROCESS_ID", "3")
    assert distributed.initialize() is True
    assert joined[-1] == {"coordinator_address": "host:1234", "num_processes": 4,
                          "process_id": 3}


def test_arguments_win_over_the_environment_and_process_zero_counts(joined, monkeypatch):
    monkeypatch.setenv("JAXLLM_COORDINATOR_ADDRESS", "env:1")
    monkeypatch.setenv("JAXLLM_NUM_PROCESSES", "8")
    monkeypatch.setenv("JAXLLM_PROCESS_ID", "5")
    assert distributed.initialize("arg:2", 2, 0) is True
    assert joined[-1] == {"coordinator_address": "arg:2", "num_processes": 2, "process_id": 0}
    assert distributed.initialize(num_processes=1) is False  # one process: env ignored


@pytest.mark.parametrize("kwargs, env, message", [
    ({"num_processes": 2, "process_id": 0}, {}, "needs a coordinator address and a process id"),
    ({"num_processes": 2, "coordinator_address": "h:1"}, {}, "JAXLLM_PROCESS_ID"),
    ({"num_processes": 2, "coordinator_address": "h:1", "process_id": 2}, {},
     r"process_id=2 outside \[0, 2\)"),
    ({"coordinator_address": "h:1", "process_id": -1}, {"JAXLLM_NUM_PROCESSES": "2"},
     r"process_id=-1 outside \[0, 2\)"),
    ({}, {"JAXLLM_NUM_PROCESSES": "two"}, "JAXLLM_NUM_PROCESSES='two' is not an integer"),
    ({"num_processes": 2, "coordinator_address": "h:1"}, {"JAXLLM_PROCESS_ID": "1.0"},
     "JAXLLM_PROCESS_ID='1.0' is not an integer"),
])
def test_bad_settings_are_refused_before_joining(joined, monkeypatch, kwargs, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        distributed.initialize(**kwargs)
    assert joined == []
