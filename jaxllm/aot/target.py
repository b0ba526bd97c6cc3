"""A compile-only GPU, and what one compile for it shows.

``gpu_mesh`` builds a mesh of compile-only devices from a ``GpuTargetConfig``; ``compile_for``
compiles a function for it (dumping PTX and the launch sequence), and ``inspect_compile``
reads the dump: ``ptxas -v`` per kernel (registers, spills), launch grid and shared memory,
instruction families (``cp.async``, ``wgmma``, scalar 16-bit loads), collectives in the
optimized HLO, and per-device memory.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

TARGETS = {"h100": Path(__file__).with_name("h100_sxm.txtpb")}
ARCH = {"h100": "sm_90a"}

_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_LAUNCH = re.compile(r"(\w+) grid: \[([\d, ]+)\] threads: \[([\d, ]+)\]\s+shared_memory: (\d+)")
_COLLECTIVE = re.compile(
    r"= (.*?) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
    r"(?:-start)?\(")
_SHAPE = re.compile(r"[a-z]+\d*\[([\d,]*)\]")


def gpu_mesh(num_devices: int, axis_names: Sequence[str], axis_sizes: Sequence[int] | None = None,
             *, target: str = "h100") -> Mesh:
    """A mesh of ``num_devices`` compile-only GPUs of ``target`` (no device needs to exist)."""
    from jax.experimental import topologies

    if os.environ.get("JAX_PLATFORMS", jax.config.jax_platforms or "") != "cpu":
        raise RuntimeError("deviceless GPU compilation needs JAX_PLATFORMS=cpu (otherwise the "
                           "CUDA plugin looks for a GPU and the topology is not built)")
    sizes = tuple(axis_sizes) if axis_sizes is not None else (num_devices,)
    topology = topologies.get_topology_desc(
        platform="cuda", target_config=TARGETS[target].read_text(),
        topology=f"1x1x{num_devices}")
    return topologies.make_mesh(topology, sizes, tuple(axis_names))


def abstract(mesh: Mesh, shape: Sequence[int], dtype: Any,
             spec: PartitionSpec | None = None) -> jax.ShapeDtypeStruct:
    """An input of ``shape`` placed on the compile-only mesh (placement is what gives the
    compile its devices)."""
    spec = PartitionSpec() if spec is None else spec
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=NamedSharding(mesh, spec))


@dataclasses.dataclass(frozen=True)
class KernelInfo:
    """One GPU kernel of a compile: ``ptxas -v`` figures and what its PTX uses."""

    name: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    cp_async: int
    wgmma: int
    scalar_b16_loads: int
    grid: tuple[int, ...] | None = None
    threads: int | None = None
    shared_memory: int | None = None


@dataclasses.dataclass(frozen=True)
class CompileInfo:
    """What one compile shows: its kernels, collectives (op and result shapes), memory."""

    kernels: tuple[KernelInfo, ...]
    collectives: tuple[tuple[str, tuple[tuple[int, ...], ...]], ...]
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int

    @property
    def device_bytes(self) -> int:
        """Peak-ish per-device footprint: arguments + outputs + temporaries - donated aliases."""
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes


def compile_for(fn: Callable, mesh: Mesh, *args: Any, dump_dir: str | Path,
                donate_argnums: tuple[int, ...] = ()) -> Any:
    """Compiles ``fn(*args)`` for the mesh's compile-only devices, dumping PTX to ``dump_dir``.

    ``jax.set_mesh`` makes the mesh's abstract GPU the current device for lowering: Pallas
    (jax >= 0.11) asks it for the GPU model, and ``pallas_kernels`` asks it whether to run
    kernels in interpret mode.
    """
    options = {"xla_dump_to": str(dump_dir), "xla_dump_emitter_re": "ptx"}
    jitted = jax.jit(fn, donate_argnums=donate_argnums)
    with jax.set_mesh(mesh):
        return jitted.trace(*args).lower().compile(compiler_options=options)


def ptxas_report(ptx: str, arch: str = "sm_90a") -> dict[str, dict[str, int]]:
    """``ptxas -v`` of one PTX module: per entry, registers, spill stores/loads, stack bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "k.ptx")
        src.write_text(ptx)
        run = subprocess.run(["ptxas", f"-arch={arch}", "-v", str(src), "-o",
                              str(Path(tmp, "k.cubin"))], capture_output=True, text=True)
    text = run.stdout + run.stderr
    if run.returncode:
        raise RuntimeError(f"ptxas failed: {text[-2000:]}")
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            current = out.setdefault(m[1], {})
        elif current is not None and (m := _SPILL.search(line)):
            current.update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        elif current is not None and (m := _REGS.search(line)):
            current["registers"] = int(m[1])
    return out


def _entry_bodies(ptx: str) -> dict[str, str]:
    """PTX text of each ``.entry`` (from its header to the next entry)."""
    starts = [(m.start(), m[1]) for m in re.finditer(r"\.entry\s+(\w+)", ptx)]
    ends = [a for a, _ in starts[1:]] + [len(ptx)] if starts else []
    return {name: ptx[a:b] for (a, name), b in zip(starts, ends, strict=True)}


def collectives(hlo: str) -> tuple[tuple[str, tuple[tuple[int, ...], ...]], ...]:
    """Every collective in optimized HLO text, with the shapes of its result."""
    found = []
    for line in hlo.splitlines():
        if m := _COLLECTIVE.search(line):
            shapes = tuple(tuple(int(d) for d in s.split(",") if d)
                           for s in _SHAPE.findall(m[1]))
            found.append((m[2], shapes))
    return tuple(found)


def inspect_compile(compiled: Any, dump_dir: str | Path, arch: str = "sm_90a") -> CompileInfo:
    """Reads the dump of ``compiled`` (see ``compile_for``) into a ``CompileInfo``."""
    dump = Path(dump_dir)
    launches = {}
    for path in dump.glob("*thunk_sequence.txt"):
        for m in _LAUNCH.finditer(path.read_text()):
            grid = tuple(int(x) for x in m[2].split(","))
            threads = [int(x) for x in m[3].split(",")]
            launches[m[1]] = (grid, threads[0] * threads[1] * threads[2], int(m[4]))
    kernels = []
    for path in sorted(dump.glob("*.ptx")):
        ptx = path.read_text()
        bodies = _entry_bodies(ptx)
        if not bodies:
            continue
        for name, info in ptxas_report(ptx, arch).items():
            body = bodies.get(name, "")
            grid, threads, smem = launches.get(name, (None, None, None))
            kernels.append(KernelInfo(
                name=name, registers=info.get("registers", 0),
                spill_stores=info.get("spill_stores", 0), spill_loads=info.get("spill_loads", 0),
                stack=info.get("stack", 0), cp_async=body.count("cp.async.cg"),
                wgmma=body.count("wgmma.mma_async"),
                scalar_b16_loads=len(re.findall(r"ld\.global(?:\.\w+)*\.b16\s", body)),
                grid=grid, threads=threads, shared_memory=smem))
    memory = compiled.memory_analysis()
    return CompileInfo(
        kernels=tuple(kernels), collectives=collectives(compiled.as_text()),
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes))
