"""Compile gate: every Triton kernel configuration compiled ahead of time, with no GPU.

Each ``kernels/<op>.py`` (dice, attention, mba) exposes ``AOT_SPECS``: a list of
``{"name", "fn", "signature", "constexprs", "num_warps"}`` (optionally ``"maxnreg"``, where the
launcher sets a register limit, ``"num_stages"``, where it sets the software-pipelining depth, and
``"group"``, the row of the grouped table it belongs to;
default: its kernel function) covering every configuration its host launchers can choose. This
module compiles each entry for sm_80 and sm_90 with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` and reads the resulting
cubin with the ``cuobjdump`` that ships with Triton:

* registers per thread and the stack frame (``cuobjdump --dump-resource-usage``);
* spill stores / loads: the local-memory store (``STL``) and load (``LDL``) instructions in the
  machine code (``cuobjdump --dump-sass``). Triton kernels hold no local arrays, so any such
  instruction is a register spill;
* shared memory: Triton's dynamic shared-memory size (``metadata.shared``) plus any static,
  against the most one program may use on that compute capability (``SHARED_MEMORY_LIMIT``;
  more fails at launch).

``python -m benchmarks.compile_gate`` prints one row per kernel and compute capability and exits
non-zero on a compile error, any spill or shared memory over the limit. Triton must run natively:
``TRITON_INTERPRET`` is removed from the environment before Triton is imported (under the
interpreter ``@triton.jit`` makes functions that cannot be compiled ahead of time), so run the
gate in its own process.

Options: ``--modules dice,mba`` (default: every kernel file that exists), ``--cc 80,90``,
``--select all|ends`` (``ends``: the first and the last spec of each kernel function; the spec
lists enumerate their configurations as nested loops, so these are the two extreme corners),
``--filter REGEX`` on spec names, ``--specs-file PATH`` (any Python file defining
``AOT_SPECS``), ``--jobs N`` (parallel compiles), ``--markdown PATH``, ``--json PATH``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import importlib
import importlib.util
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

KERNEL_MODULES = ("dice", "attention", "mba")
DEFAULT_CCS = (80, 90)
_KERNELS_DIR = Path(__file__).resolve().parent.parent / "kernels"
# Shared memory one program may use (the opt-in maximum per block, CUDA C++ Programming Guide,
# "Technical Specifications per Compute Capability"): more fails at launch.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
_LOCAL_MEMORY_OP = re.compile(r"\b(STL|LDL)(\.[A-Z0-9]+)*\b")
_RESOURCE_LINE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


@dataclass
class KernelReport:
    """One compiled configuration. ``error`` is None when it compiled."""

    source: str
    name: str
    cc: int
    num_warps: int
    kernel: str = ""
    num_stages: Optional[int] = None
    group: str = ""
    registers: Optional[int] = None
    stack_bytes: Optional[int] = None
    spill_stores: Optional[int] = None
    spill_loads: Optional[int] = None
    shared_bytes: Optional[int] = None
    compile_s: float = 0.0
    error: Optional[str] = None

    @property
    def spills(self) -> bool:
        return bool(self.spill_stores) or bool(self.spill_loads)

    @property
    def over_shared_limit(self) -> bool:
        """More shared memory than ``sm_<cc>`` gives one program: the launch would fail."""
        limit = SHARED_MEMORY_LIMIT.get(self.cc)
        return limit is not None and self.shared_bytes is not None and self.shared_bytes > limit

    @property
    def ok(self) -> bool:
        return self.error is None and not self.spills and not self.over_shared_limit


def available_modules() -> List[str]:
    """The kernel modules whose file exists in the source tree (or installed package)."""
    found = []
    for name in KERNEL_MODULES:
        if (_KERNELS_DIR / f"{name}.py").exists() or importlib.util.find_spec(f"din_fast.kernels.{name}"):
            found.append(name)
    return found


def load_specs(source: str) -> List[dict]:
    """``AOT_SPECS`` of a kernel module name (``"dice"``) or of a Python file path."""
    if source.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(source).stem, source)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(f"din_fast.kernels.{source}")
    specs = getattr(module, "AOT_SPECS", None)
    if specs is None:
        raise AttributeError(f"{source} defines no AOT_SPECS")
    return list(specs)


def select_specs(specs: Sequence[dict], select: str, pattern: Optional[str] = None) -> List[dict]:
    """``all`` specs or, per kernel function, the first and the last (``ends``); then ``pattern``."""
    if pattern:
        regex = re.compile(pattern)
        specs = [s for s in specs if regex.search(s["name"])]
    if select == "all":
        return list(specs)
    if select != "ends":
        raise ValueError(f"select must be 'all' or 'ends', got {select!r}")
    by_fn: Dict[str, List[dict]] = {}
    for spec in specs:
        by_fn.setdefault(_fn_name(spec["fn"]), []).append(spec)
    chosen = []
    for group in by_fn.values():
        chosen.append(group[0])
        if len(group) > 1:
            chosen.append(group[-1])
    return chosen


def _fn_name(fn) -> str:
    return getattr(fn, "__name__", None) or getattr(getattr(fn, "fn", None), "__name__", repr(fn))


def _tool(name: str) -> str:
    import triton
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found at {path} (it ships with Triton's NVIDIA backend)")
    return str(path)


def cubin_resources(cubin: bytes) -> Dict[str, int]:
    """Registers, stack frame, static shared memory and local-memory instructions of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
        handle.write(cubin)
        path = handle.name
    try:
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], check=True,
                               capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", path], check=True, capture_output=True,
                              text=True).stdout
    finally:
        os.unlink(path)
    match = _RESOURCE_LINE.search(usage)
    if match is None:
        raise RuntimeError(f"could not parse cuobjdump's resource usage:\n{usage}")
    registers, stack, shared, _local = (int(v) for v in match.groups())
    stores = loads = 0
    for line in sass.splitlines():
        for op in _LOCAL_MEMORY_OP.finditer(line):
            if op.group(1) == "STL":
                stores += 1
            else:
                loads += 1
    return dict(registers=registers, stack_bytes=stack, static_shared=shared, spill_stores=stores, spill_loads=loads)


def _compile_options(spec: dict) -> dict:
    options = {"num_warps": int(spec["num_warps"])}
    for option in ("maxnreg", "num_stages"):
        if spec.get(option) is not None:
            options[option] = int(spec[option])
    return options


def aligned_pointer_attrs(fn, signature: Dict[str, str]) -> dict:
    """The argument attributes of the variant Triton compiles at run time when every pointer is
    16-byte aligned: ``tt.divisibility`` 16 on each pointer the kernel specializes on alignment
    (``jit_aligned_pointers``; none for ``jit_unspecialized`` kernels)."""
    return {(index,): [["tt.divisibility", 16]] for index, param in enumerate(fn.params)
            if not param.is_constexpr and str(signature.get(param.name, "")).startswith("*")
            and not param.do_not_specialize and not param.do_not_specialize_on_alignment}


def compile_spec(spec: dict, cc: int, source: str = "") -> KernelReport:
    """Compiles one spec for ``sm_<cc>`` and reads its resources; errors land in the report."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the compile gate needs native Triton: run it in a process without TRITON_INTERPRET=1 "
                           "(python -m benchmarks.compile_gate removes it)")
    report = KernelReport(source=source, name=spec["name"], cc=cc, num_warps=int(spec["num_warps"]),
                          kernel=_fn_name(spec["fn"]), group=spec.get("group", ""))
    start = time.perf_counter()
    try:
        compiled = triton.compile(
            ASTSource(fn=spec["fn"], signature=dict(spec["signature"]), constexprs=dict(spec.get("constexprs", {})),
                      attrs=aligned_pointer_attrs(spec["fn"], spec["signature"])),
            target=GPUTarget("cuda", cc, 32), options=_compile_options(spec))
        resources = cubin_resources(compiled.asm["cubin"])
    except Exception as err:  # a failed compile is a result of the gate, not a crash of it
        report.error = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        report.compile_s = time.perf_counter() - start
        return report
    report.compile_s = time.perf_counter() - start
    report.num_stages = compiled.metadata.num_stages
    report.registers = resources["registers"]
    report.stack_bytes = resources["stack_bytes"]
    report.spill_stores = resources["spill_stores"]
    report.spill_loads = resources["spill_loads"]
    report.shared_bytes = int(getattr(compiled.metadata, "shared", 0) or 0) + resources["static_shared"]
    return report


# Worker processes inherit the loaded specs through fork; only (source, index, cc) travel.
_LOADED: Dict[str, List[dict]] = {}


def _compile_job(job) -> KernelReport:
    source, index, cc = job
    if source not in _LOADED:
        _LOADED[source] = load_specs(source)
    return compile_spec(_LOADED[source][index], cc, source=_label(source))


def _label(source: str) -> str:
    return Path(source).stem if source.endswith(".py") else source


def run_gate(sources: Sequence[str], ccs: Sequence[int] = DEFAULT_CCS, *, select: str = "all",
             pattern: Optional[str] = None, jobs: int = 0, progress=None) -> List[KernelReport]:
    """Compiles the selected specs of every source for every cc; returns the reports in order.

    A source whose specs cannot even be loaded yields one error report.
    """
    work = []
    reports: List[KernelReport] = []
    for source in sources:
        try:
            specs = load_specs(source)
        except Exception as err:
            reports.append(KernelReport(source=_label(source), name="<AOT_SPECS>", cc=0, num_warps=0,
                                        error=f"{type(err).__name__}: {err}"))
            continue
        _LOADED[source] = specs
        chosen = {id(s) for s in select_specs(specs, select, pattern)}
        work += [(source, i, cc) for i, s in enumerate(specs) if id(s) in chosen for cc in ccs]
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1 or len(work) <= 1:
        results = []
        for job in work:
            results.append(_compile_job(job))
            if progress:
                progress(results[-1])
    else:
        context = multiprocessing.get_context("fork")
        with futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            results = []
            for result in pool.map(_compile_job, work):
                results.append(result)
                if progress:
                    progress(result)
    return reports + results


_COLUMNS = ("kernel", "sm", "warps", "regs", "stack B", "spill st", "spill ld", "shared B", "compile s", "status")


def _row(r: KernelReport) -> List[str]:
    status = ("ERROR: " + r.error if r.error else "SPILL" if r.spills
              else "SHARED MEMORY OVER LIMIT" if r.over_shared_limit else "ok")
    def show(v):
        return "-" if v is None else str(v)
    return [f"{r.source}/{r.name}", str(r.cc), str(r.num_warps), show(r.registers), show(r.stack_bytes),
            show(r.spill_stores), show(r.spill_loads), show(r.shared_bytes), f"{r.compile_s:.1f}", status]


def format_table(reports: Sequence[KernelReport]) -> str:
    rows = [list(_COLUMNS)] + [_row(r) for r in reports]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(reports: Sequence[KernelReport], command: str) -> str:
    import triton
    header = (f"Generated by `{command}` (Triton {triton.__version__}, no GPU needed). Spill st/ld count the "
              "local-memory store/load instructions in the machine code; shared memory is per program.\n\n")
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(_row(r)) + " |" for r in reports]
    return header + "\n".join(lines) + "\n"


def format_grouped_markdown(reports: Sequence[KernelReport], command: str) -> str:
    """One row per group (a spec's ``group``, else its kernel function) and compute capability:
    how many configurations, their range of registers per thread, the most shared memory and
    stack, and how many spill or fail."""
    import triton
    groups: Dict[tuple, List[KernelReport]] = {}
    for r in reports:
        groups.setdefault((r.source, r.group or r.kernel or r.name, r.cc), []).append(r)
    header = (f"Generated by `{command}` (Triton {triton.__version__}, no GPU needed): every configuration of "
              f"each kernel, grouped.\n\n")
    lines = ["| kernel group | sm | configs | regs min | regs max | stack B max | shared B max | spilling "
             "| over shared limit | errors |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (source, group, cc), members in sorted(groups.items()):
        built = [r for r in members if r.error is None]
        def extreme(fn, attr):
            return str(fn(getattr(r, attr) for r in built)) if built else "-"
        lines.append(f"| {source}/{group} | {cc} | {len(members)} | {extreme(min, 'registers')} | "
                     f"{extreme(max, 'registers')} | {extreme(max, 'stack_bytes')} | {extreme(max, 'shared_bytes')} | "
                     f"{sum(r.spills for r in members)} | {sum(r.over_shared_limit for r in members)} | "
                     f"{sum(r.error is not None for r in members)} |")
    return header + "\n".join(lines) + "\n"


def summary(reports: Sequence[KernelReport]) -> str:
    errors = sum(r.error is not None for r in reports)
    spills = sum(r.spills for r in reports)
    over = sum(r.over_shared_limit for r in reports)
    worst = max((r.registers or 0 for r in reports), default=0)
    return (f"{len(reports)} compiled kernel(s): {errors} error(s), {spills} with spills, {over} over the shared "
            f"memory limit, max {worst} registers per thread")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile_gate", description=__doc__.split("\n")[0])
    parser.add_argument("--modules", default=None,
                        help=f"comma-separated subset of {','.join(KERNEL_MODULES)} (default: those that exist)")
    parser.add_argument("--specs-file", action="append", default=[],
                        help="a Python file defining AOT_SPECS (repeatable); replaces --modules unless both given")
    parser.add_argument("--cc", default=",".join(map(str, DEFAULT_CCS)), help="compute capabilities, e.g. 80,90")
    parser.add_argument("--select", choices=("all", "ends"), default="all")
    parser.add_argument("--filter", default=None, help="regular expression on spec names")
    parser.add_argument("--jobs", type=int, default=0, help="parallel compiles (default: CPU count)")
    parser.add_argument("--markdown", default=None, help="also write the table as Markdown to this path")
    parser.add_argument("--json", default=None, help="also write the reports as JSON to this path")
    parser.add_argument("--grouped-markdown", default=None,
                        help="also write one row per kernel group and compute capability as Markdown")
    parser.add_argument("--quiet", action="store_true", help="print only the summary and the failing rows")
    args = parser.parse_args(argv)
    if "triton" not in sys.modules:
        # Under the interpreter @triton.jit builds functions that cannot be compiled ahead of time.
        os.environ.pop("TRITON_INTERPRET", None)
        # The tests pin it; the gate must compile what they run.
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

    ccs = [int(c) for c in args.cc.split(",") if c]
    if args.modules is not None:
        sources = [m for m in args.modules.split(",") if m]
        unknown = [m for m in sources if m not in KERNEL_MODULES]
        if unknown:
            parser.error(f"unknown module(s) {unknown}; choose from {list(KERNEL_MODULES)}")
    else:
        sources = [] if args.specs_file else available_modules()
    sources += args.specs_file
    if not sources:
        print("no kernel modules found; nothing to compile")
        return 0
    start = time.perf_counter()
    reports = run_gate(sources, ccs, select=args.select, pattern=args.filter, jobs=args.jobs)
    elapsed = time.perf_counter() - start
    shown = [r for r in reports if not r.ok] if args.quiet else reports
    if shown:
        print(format_table(shown))
    print(f"{summary(reports)}; {elapsed:.0f} s")
    if args.markdown:
        command = "python -m benchmarks.compile_gate " + " ".join(argv if argv is not None else sys.argv[1:])
        Path(args.markdown).write_text(format_markdown(reports, command.strip()))
    if args.grouped_markdown:
        command = "python -m benchmarks.compile_gate " + " ".join(argv if argv is not None else sys.argv[1:])
        Path(args.grouped_markdown).write_text(format_grouped_markdown(reports, command.strip()))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in reports], indent=1))
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
