"""Test setup: eight simulated CPU devices, the `slow` / `gpu` markers, and the session's real
servers (the `server_pool` fixture; starting one any other way fails the test)."""

import functools
import os

# Must be set before jax is imported anywhere (the servers the tests start inherit them).
# LLVM's optimisation level 0 for XLA:CPU: programs compile in about 3/4 of the time and the
# tiny test models barely notice the slower code; what the tests check (tokens, logits
# within tolerances, compile counts, buffer sizes) does not depend on it.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import subprocess  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

from tests.support import REPO  # noqa: E402
from tests.support.servers import Server, ServerPool, guard_popen  # noqa: E402


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_configure(config: pytest.Config) -> None:
    subprocess.Popen.__init__ = guard_popen(subprocess.Popen.__init__)
    # The persistent compilation cache, as the servers use it: the many engines the tests
    # build over the same tiny models run the same step programs, compiled once. Programs
    # faster to compile than to store are left out. Tests that count compilations still see
    # every program requested (jax reports a cache hit as a compilation too).
    if os.environ.get("JAXLLM_TEST_COMPILE_CACHE", "1") != "0":
        from jaxllm.runtime import compile_cache

        compile_cache.enable(compile_cache.default_cache_dir())
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


@pytest.fixture(scope="session")
def server_pool(tmp_path_factory) -> ServerPool:
    """Real ``python -m jaxllm.serve`` processes: shared by every test of the session
    (``server_pool.shared(flags)``), or a test's own (``server_pool.private(flags,
    reason=...)``)."""
    pool = ServerPool(tmp_path_factory.mktemp("servers"))
    yield pool
    pool.close()


@pytest.fixture
def bundled_server(server_pool) -> Server:
    """``python -m jaxllm.serve`` with no arguments, the README's command: the bundled model,
    warmed up, shared by every test that asks."""
    return server_pool.shared([], cwd=REPO)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """pytest-xdist's work units: a module runs on one worker (its module fixtures built once),
    and every module that uses a real server runs on the same worker, so that the session's
    servers are shared, not started again by each worker."""
    from xdist.scheduler import LoadScopeScheduling

    class ModulesAndServers(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "servers" if _uses_servers(module) else module

    return ModulesAndServers(config, log)


@functools.cache
def _uses_servers(module: str) -> bool:
    """Whether a test module asks for a real server (the pool or the bundled server)."""
    path = REPO / module
    return path.is_file() and any(name in path.read_text()
                                  for name in ("server_pool", "bundled_server"))


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    pool = ServerPool.last
    if pool is not None and pool.starts:
        terminalreporter.write_line(
            f"real servers: {pool.starts} started for {len(pool.flag_sets)} flag sets "
            f"({pool.restarts} restarts after eviction)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    on_gpu = jax.default_backend() == "gpu"
    run_slow = config.getoption("--runslow")
    for item in items:
        # The tiers: `server` (a real server process), `heavy` (many compiled programs or model
        # runs; marked by hand), and `inner`, the rest: the inner loop, `pytest -m inner`.
        if "server_pool" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.server)
        if "server" not in item.keywords and "heavy" not in item.keywords:
            item.add_marker(pytest.mark.inner)
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: run with --runslow"))
        if "gpu" in item.keywords and not on_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
