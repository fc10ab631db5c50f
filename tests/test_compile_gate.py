"""Compile gate: kernels compiled ahead of time for sm_80 and sm_90, no spills.

The gate runs in a subprocess with ``TRITON_INTERPRET`` removed from its environment: this
conftest sets it, and under the interpreter ``@triton.jit`` makes functions that cannot be
compiled. The full gate over every configuration (``python -m benchmarks.compile_gate``) takes
far longer than a unit test; here each kernel function is compiled at the first and the last
entry of its ``AOT_SPECS`` (the spec lists enumerate their configurations as nested loops, so
these are opposite corners: first dtype/size/option against last).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.compile_gate import available_modules  # noqa: E402


def _run_gate(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "benchmarks.compile_gate", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def gate_reports(tmp_path_factory):
    """One gate run over every kernel module (one process pool for all of them)."""
    modules = available_modules()
    if not modules:
        pytest.skip("no kernel modules")
    report_path = tmp_path_factory.mktemp("gate") / "gate.json"
    result = _run_gate("--modules", ",".join(modules), "--select", "ends", "--cc", "80,90",
                       "--json", str(report_path))
    print(result.stdout)
    assert report_path.exists(), f"the gate did not finish:\n{result.stdout}\n{result.stderr[-4000:]}"
    return result, json.loads(report_path.read_text())


@pytest.mark.parametrize("module", available_modules())
def test_kernels_compile_for_sm80_and_sm90_without_spills(module, gate_reports):
    result, all_reports = gate_reports
    reports = [r for r in all_reports if r["source"] == module]
    assert reports, f"{module}: AOT_SPECS selected nothing"
    assert {r["cc"] for r in reports} == {80, 90}
    errors = [f"{r['name']} sm_{r['cc']}: {r['error']}" for r in reports if r["error"]]
    spills = [f"{r['name']} sm_{r['cc']}: {r['spill_stores']} spill stores, {r['spill_loads']} spill loads, "
              f"{r['registers']} registers" for r in reports if r["spill_stores"] or r["spill_loads"]]
    assert not errors, "compile errors:\n" + "\n".join(errors)
    assert not spills, "register spills:\n" + "\n".join(spills)
    assert all(r["registers"] and r["registers"] <= 255 for r in reports)
    if all(r["error"] is None and not r["spill_stores"] and not r["spill_loads"] for r in all_reports):
        assert result.returncode == 0, result.stdout + result.stderr[-4000:]


_SPILL_KERNELS = textwrap.dedent('''
    import triton
    import triton.language as tl


    @triton.jit
    def _live_blocks_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
        # Three BLOCK-long vectors stay live across reductions. With one warp each thread holds
        # 3 * BLOCK / 32 floats: 384 for BLOCK = 4096, more than the 255 registers a thread can
        # have, so ptxas must spill; 24 for BLOCK = 256, which fits.
        offs = tl.arange(0, BLOCK)
        a = tl.load(x_ptr + offs)
        b = tl.load(x_ptr + BLOCK + offs)
        c = tl.load(x_ptr + 2 * BLOCK + offs)
        s = tl.sum(a * b, 0) + tl.sum(b * c, 0)
        tl.store(y_ptr + offs, a * s + b * c + tl.sum(a, 0) * c)


    AOT_SPECS = [
        dict(name=f"live_blocks_{block}", fn=_live_blocks_kernel,
             signature={"x_ptr": "*fp32", "y_ptr": "*fp32", "BLOCK": "constexpr"},
             constexprs={"BLOCK": block}, num_warps=1)
        for block in (256, 4096)
    ]
''')


def test_gate_detects_a_spilling_kernel(tmp_path):
    kernel_file = tmp_path / "spilling_kernels.py"
    kernel_file.write_text(_SPILL_KERNELS)
    report_path = tmp_path / "gate.json"
    result = _run_gate("--specs-file", str(kernel_file), "--cc", "80,90", "--json", str(report_path))
    print(result.stdout)
    assert report_path.exists(), result.stdout + result.stderr[-4000:]
    reports = {(r["name"], r["cc"]): r for r in json.loads(report_path.read_text())}
    assert set(reports) == {(f"live_blocks_{b}", cc) for b in (256, 4096) for cc in (80, 90)}
    for cc in (80, 90):
        small, large = reports[("live_blocks_256", cc)], reports[("live_blocks_4096", cc)]
        assert small["error"] is None and large["error"] is None
        assert small["spill_stores"] == 0 and small["spill_loads"] == 0, small
        assert large["spill_stores"] > 0 and large["spill_loads"] > 0, large
        assert large["stack_bytes"] > 0
    assert result.returncode == 1
    assert "SPILL" in result.stdout


def test_gate_compiles_with_the_specs_register_limit(tmp_path):
    # 1024-long vectors on one warp: 96 live floats per thread fit in 255 registers, not in 64.
    kernel_file = tmp_path / "limited_kernels.py"
    kernel_file.write_text(_SPILL_KERNELS + textwrap.dedent('''
        AOT_SPECS = [dict(name=f"live_blocks_1024_maxnreg{limit}", fn=_live_blocks_kernel,
                          signature={"x_ptr": "*fp32", "y_ptr": "*fp32", "BLOCK": "constexpr"},
                          constexprs={"BLOCK": 1024}, num_warps=1, maxnreg=limit)
                     for limit in (None, 64)]
    '''))
    report_path = tmp_path / "gate.json"
    result = _run_gate("--specs-file", str(kernel_file), "--cc", "90", "--json", str(report_path))
    assert report_path.exists(), result.stdout + result.stderr[-4000:]
    reports = {r["name"]: r for r in json.loads(report_path.read_text())}
    unlimited, limited = reports["live_blocks_1024_maxnregNone"], reports["live_blocks_1024_maxnreg64"]
    assert unlimited["error"] is None and limited["error"] is None
    assert unlimited["registers"] > 64 and not unlimited["spill_stores"], unlimited
    assert limited["registers"] <= 64 and limited["spill_stores"] > 0, limited


def test_gate_compiles_with_the_specs_pipelining_depth(tmp_path):
    # A K loop feeding tl.dot, the loop Triton's pipeliner works on.
    kernel_file = tmp_path / "pipelined_kernels.py"
    kernel_file.write_text(textwrap.dedent('''
        import triton
        import triton.language as tl


        @triton.jit
        def _k_loop_kernel(a_ptr, b_ptr, c_ptr, K: tl.constexpr, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
            for k in range(0, K, BLOCK):
                a = tl.load(a_ptr + offs[:, None] * K + k + offs[None, :])
                b = tl.load(b_ptr + (k + offs[:, None]) * BLOCK + offs[None, :])
                acc += tl.dot(a, b)
            tl.store(c_ptr + offs[:, None] * BLOCK + offs[None, :], acc)


        AOT_SPECS = [dict(name=f"k_loop_stages{stages}", fn=_k_loop_kernel,
                          signature={"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "K": "constexpr",
                                     "BLOCK": "constexpr"},
                          constexprs={"K": 1024, "BLOCK": 64}, num_warps=4, num_stages=stages)
                     for stages in (1, 3)]
    '''))
    report_path = tmp_path / "gate.json"
    result = _run_gate("--specs-file", str(kernel_file), "--cc", "80", "--json", str(report_path))
    assert report_path.exists(), result.stdout + result.stderr[-4000:]
    reports = {r["name"]: r for r in json.loads(report_path.read_text())}
    assert {name: (r["error"], r["num_stages"]) for name, r in reports.items()} == {
        "k_loop_stages1": (None, 1), "k_loop_stages3": (None, 3)}


def _run_native(script: str) -> dict:
    """Runs ``script`` in a process with native Triton (no ``TRITON_INTERPRET``); the JSON its
    last line prints."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_spec_kernels_compile_only_the_gated_variant():
    # The gate compiles no scalar specialized on its value, and marks 16-byte aligned exactly the
    # pointers a kernel specializes on alignment (jit_aligned_pointers: the Dice kernels, whose
    # launchers pass only aligned pointers). A kernel that let Triton specialize anything else at
    # run time would run variants the gate never compiled.
    script = textwrap.dedent('''
        import importlib, json
        from benchmarks.compile_gate import aligned_pointer_attrs, available_modules
        value_specialized, mismatched, aligned_kernels = set(), [], set()
        for module in available_modules():
            for spec in importlib.import_module(f"kernels.{module}").AOT_SPECS:
                kernel, signature = spec["fn"], spec["signature"]
                runtime = [p for p in kernel.params if not p.is_constexpr]
                pointers = {p.name for p in runtime if str(signature[p.name]).startswith("*")}
                value_specialized |= {f"{kernel.__name__}.{p.name}" for p in runtime
                                      if p.name not in pointers and not p.do_not_specialize}
                on_alignment = {p.name for p in runtime if not p.do_not_specialize_on_alignment}
                marked = {kernel.params[index].name for (index,) in aligned_pointer_attrs(kernel, signature)}
                if marked != on_alignment or not marked <= pointers:
                    mismatched.append(spec["name"])
                if marked:
                    aligned_kernels.add(f"{module}.{kernel.__name__}")
        print(json.dumps({"value": sorted(value_specialized), "mismatched": mismatched,
                          "aligned": sorted(aligned_kernels)}))
    ''')
    found = _run_native(script)
    assert found["value"] == [] and found["mismatched"] == [], found
    assert found["aligned"] and all(name.startswith("dice.") for name in found["aligned"]), found["aligned"]


def test_dice_vector_width_reaches_the_machine_code():
    # VEC = 4 with the pointers marked aligned, as the gate compiles the Dice specs, must give
    # 16-byte global loads and stores (sm_90); VEC = 1, scalar ones. Without the alignment or the
    # multiple-of-VEC row width the compiler falls back to scalar accesses, silently.
    script = textwrap.dedent('''
        import collections, json, os, re, subprocess, tempfile
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from benchmarks.compile_gate import _compile_options, _tool, aligned_pointer_attrs
        from din_fast.kernels import dice
        found = {}
        for spec in dice.AOT_SPECS:
            if spec["name"] not in ("dice_forward_apply_fp32", "dice_forward_apply_fp32_vec4"):
                continue
            compiled = triton.compile(
                ASTSource(fn=spec["fn"], signature=dict(spec["signature"]), constexprs=dict(spec["constexprs"]),
                          attrs=aligned_pointer_attrs(spec["fn"], spec["signature"])),
                target=GPUTarget("cuda", 90, 32), options=_compile_options(spec))
            with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
                handle.write(compiled.asm["cubin"])
            sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", handle.name], check=True,
                                  capture_output=True, text=True).stdout
            os.unlink(handle.name)
            found[spec["name"]] = collections.Counter(re.findall(r"\\b((?:LDG|STG)\\.E(?:\\.\\d+)?)\\b", sass))
        print(json.dumps(found))
    ''')
    found = _run_native(script)
    scalar, vector = found["dice_forward_apply_fp32"], found["dice_forward_apply_fp32_vec4"]
    assert scalar.get("LDG.E", 0) > 0 and scalar.get("STG.E", 0) > 0 and "LDG.E.128" not in scalar, scalar
    assert vector.get("LDG.E.128", 0) > 0 and vector.get("STG.E.128", 0) > 0, vector
    assert "STG.E" not in vector, vector


def test_shared_memory_over_the_limit_fails_the_gate():
    from benchmarks.compile_gate import SHARED_MEMORY_LIMIT, KernelReport, format_table, summary

    def report(cc, shared):
        return KernelReport(source="m", name=f"k{cc}_{shared}", cc=cc, num_warps=4, registers=64, stack_bytes=0,
                            spill_stores=0, spill_loads=0, shared_bytes=shared)

    # 192 KiB fits sm_90's 227 KiB, not sm_80's 163 KiB; the limit itself fits both.
    between = report(80, 192 * 1024), report(90, 192 * 1024)
    at_limit = report(80, SHARED_MEMORY_LIMIT[80]), report(90, SHARED_MEMORY_LIMIT[90])
    assert [r.over_shared_limit for r in between + at_limit] == [True, False, False, False]
    assert [r.ok for r in between + at_limit] == [False, True, True, True]
    assert "SHARED MEMORY OVER LIMIT" in format_table(between)
    assert "1 over the shared memory limit" in summary(between + at_limit)


def test_grouped_table_summarizes_each_kernel_per_compute_capability():
    pytest.importorskip("triton")
    from benchmarks.compile_gate import KernelReport, format_grouped_markdown

    reports = [KernelReport("attention", "a_fp32", 90, 8, kernel="_fwd", registers=200, stack_bytes=0,
                            spill_stores=0, spill_loads=0, shared_bytes=4096),
               KernelReport("attention", "a_bf16", 90, 8, kernel="_fwd", registers=250, stack_bytes=16,
                            spill_stores=2, spill_loads=2, shared_bytes=8192),
               KernelReport("attention", "a_fp16", 90, 8, kernel="_fwd", error="CompilationError: x"),
               KernelReport("attention", "a_fp32", 80, 8, kernel="_fwd", registers=190, stack_bytes=0,
                            spill_stores=0, spill_loads=0, shared_bytes=1024)]
    rows = [line for line in format_grouped_markdown(reports, "cmd").splitlines() if line.startswith("| attention")]
    assert rows == ["| attention/_fwd | 80 | 1 | 190 | 190 | 0 | 1024 | 0 | 0 | 0 |",
                    "| attention/_fwd | 90 | 3 | 200 | 250 | 16 | 8192 | 1 | 0 | 1 |"]
    # A spec's group splits its kernel function's rows.
    reports[1].group = "_fwd bf16"
    rows = [line for line in format_grouped_markdown(reports, "cmd").splitlines() if line.startswith("| attention")]
    assert rows == ["| attention/_fwd | 80 | 1 | 190 | 190 | 0 | 1024 | 0 | 0 | 0 |",
                    "| attention/_fwd | 90 | 2 | 200 | 200 | 0 | 4096 | 0 | 0 | 1 |",
                    "| attention/_fwd bf16 | 90 | 1 | 250 | 250 | 16 | 8192 | 1 | 0 | 0 |"]
