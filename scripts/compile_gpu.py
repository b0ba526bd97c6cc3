"""Deviceless GPU compile check: compiles jaxllm's kernels and engine step for a compile-only
H100 (no GPU needed) and prints, per program, each Pallas kernel's registers, spills, launch
and shared memory, its cp.async / wgmma use, the collectives and the per-device memory.

Exits 1 on any compile error, any spill in a Pallas kernel at its default settings, any
all-gather of the KV cache or of q under tensor parallelism, or (the verifying step) any
large all-gather its plain step does not have. Run from a venv with the CUDA
jax plugin (jax >= 0.11, Python 3.12 here; see ``.ci/run``):

    JAX_PLATFORMS=cpu python scripts/compile_gpu.py              # everything
    JAX_PLATFORMS=cpu python scripts/compile_gpu.py --only ragged --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support: test helpers
from tests.support.compile_cases import (  # noqa: E402
    Result,
    engine_cases,
    is_pallas_kernel,
    kernel_cases,
    new_gathers,
    plan_cases,
    run_case,
    spec_cases,
    vision_cases,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="run only cases whose name contains this")
    parser.add_argument("--skip-engine", action="store_true", help="kernels only")
    parser.add_argument("--json", default=None, help="also write the results here")
    return parser.parse_args(argv)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f}"


def print_result(result: Result, seconds: float, known_gap: str | None = None) -> None:
    status = ("KNOWN GAP" if known_gap else "FAIL") if result.problems else "ok"
    print(f"\n[{status}] {result.case}  ({seconds:.1f} s)", flush=True)
    if result.problems and known_gap:
        print(f"    known gap: {known_gap}")
    for problem in result.problems:
        print(f"    PROBLEM: {problem}")
    info = result.info
    if info is None:
        return
    for k in info.kernels:
        if not is_pallas_kernel(k.name):
            continue
        print(f"    {k.name}: {k.registers} regs, spill {k.spill_stores}/{k.spill_loads} B "
              f"(st/ld), stack {k.stack} B, grid {list(k.grid or [])}, {k.threads} threads, "
              f"smem {k.shared_memory} B, cp.async {k.cp_async}, wgmma {k.wgmma}, "
              f"scalar b16 loads {k.scalar_b16_loads}")
    others = [k for k in info.kernels if not is_pallas_kernel(k.name)]
    if others:
        worst = max(others, key=lambda k: k.registers)
        spilling = sum(1 for k in others if k.spill_stores or k.spill_loads)
        print(f"    XLA kernels: {len(others)} (max {worst.registers} regs in {worst.name}; "
              f"{spilling} spill)")
    ops: dict[str, int] = {}
    for op, _ in info.collectives:
        ops[op] = ops.get(op, 0) + 1
    print(f"    collectives: {ops or 'none'}")
    gathered = sorted({"x".join(map(str, shapes[-1])) for op, shapes in info.collectives
                       if op == "all-gather" and shapes})
    if gathered:
        print(f"    all-gather results: {', '.join(gathered)}")
    print(f"    per device MiB: args {_mib(info.argument_bytes)}, out {_mib(info.output_bytes)}, "
          f"temp {_mib(info.temp_bytes)}, aliased {_mib(info.alias_bytes)}, "
          f"total {_mib(info.device_bytes)}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cases = kernel_cases() + ([] if args.skip_engine
                             else engine_cases() + spec_cases() + vision_cases()
                             + plan_cases())
    cases = [c for c in cases if args.only in c.name]
    # A case compared with a peer runs after it (the peer is compiled even if --only
    # leaves it out).
    names = {c.name for c in cases}
    everything = {c.name: c for c in kernel_cases() + engine_cases() + spec_cases()}
    peers = {c.gathers_like for c in cases if c.gathers_like}
    cases = [everything[n] for n in sorted(peers - names)] + cases
    results, failed, gaps = [], 0, 0
    done: dict[str, Result] = {}
    for case in cases:
        start = time.perf_counter()
        result = run_case(case)
        if case.gathers_like:
            result.problems += new_gathers(result, done[case.gathers_like])
        done[case.name] = result
        print_result(result, time.perf_counter() - start, case.known_gap)
        if result.problems:
            failed += case.known_gap is None
            gaps += case.known_gap is not None
        results.append(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in results], f, indent=1)
    print(f"\n{len(cases) - failed - gaps}/{len(cases)} programs pass"
          + (f", {gaps} fail as known gaps (still open work, listed above)" if gaps else ""),
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
