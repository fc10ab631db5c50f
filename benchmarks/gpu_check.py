"""One command for a GPU machine: native kernel tests, full-size checks against float64, benchmarks.

``PYTHONPATH=. python -m benchmarks.gpu_check --out OUT_DIR`` runs from the source tree with no
network, in six stages, and writes everything flat under ``--out`` (10 files):

1. ``pytest.log``, ``junit.xml``: ``tests/test_triton_*.py`` and ``tests/test_mba.py`` run
   natively (``TRITON_INTERPRET`` removed), float32 / bfloat16 / float16 as the tests choose, in
   one process per CPU core (up to 16) where pytest-xdist is installed, all on one seed.
2. ``checks.jsonl``: the triton backend against the reference run in float64 on canonical full
   sizes (attention pooling B=1024 T=100 D=36 with ragged lengths, Dice 409600x40 and serving
   C=200 T=100 D=36 in float32, bfloat16 and float16; the fused MBA step K=1M D=64 on 4096x101
   Zipf ids in float32): output and every gradient, as the relative error ``||out - ref|| / ||ref||`` against
   a per-dtype bound; NaN never passes.
3. ``bench.jsonl``, ``bench.csv``: the benchmark grid of ``benchmarks.run`` (reference,
   torch.compile, torch, triton; forward and forward+backward; float32 and one bfloat16 shape),
   stopped after ``--bench-budget`` seconds (default 330, sized so that the stages' budgets
   add up to about 6 minutes; the first calls' compile time counts in it).
4. ``deepctr.jsonl``: DeepCTR-Torch's DIN training throughput before and after
   ``din_fast.integrations.deepctr_torch.patch`` (``benchmarks.deepctr``), when deepctr-torch
   imports (put it on ``PYTHONPATH``: the GPU machine has no network); skipped otherwise.
5. ``specialization.jsonl``: the kernels as shipped (the variant the compile gate compiles: no
   argument specialized, Dice's pointers aligned) against Triton's default specialization
   (16-byte-aligned pointers, scalars divisible by 16 or equal to 1), side by side: attention
   forward+backward at B=4096 T=100 D=36 and Dice forward+backward at 409600x40 in float32 and
   bfloat16, the MBA step at K=1M in float32; with the registers and spills of every compiled variant: whether alignment
   is worth gating a second variant for.
6. ``profile.jsonl``: where the time goes (``torch.profiler``): per iteration of attention
   forward+backward at B=4096 T=100 D=36 (float32, bfloat16), its forward at B=1024, serving
   and the MBA step, the triton backend beside eager (the MBA step: beside the torch backend),
   the wall, host and device-busy times and each kernel's launches and microseconds.

``summary.txt`` holds the tables printed last; ``environment.json`` the versions and the device.
The exit status is non-zero when a test or a check failed.

``--dry-run`` runs all of it on the CPU with tiny shapes and Triton's interpreter, so that CI
exercises the script: the test stage only collects the tests (running them under the
interpreter is the ordinary test suite's job), the checks and benchmarks run for real on tiny
shapes, and the compile provider is skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

_ROOT = Path(__file__).resolve().parent.parent

# Smooth activations only: with PReLU or ReLU a pre-activation within rounding of 0 can land on
# the other side of the kink in the fast path, which flips one derivative and moves a gradient
# row by far more than rounding (seen on the CPU between the fold and the concat form).
# Relative error bounds against float64, per dtype. Our kernels' fp32 products run as 3xTF32
# (about fp32 accuracy, far under 1e-4); 16-bit inputs and outputs carry their own rounding
# (2^-8, 2^-11).
REL_ERR_BOUND = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}


# ----------------------------------------------------------------------------------------------
# Stage 1: the kernel tests, natively
# ----------------------------------------------------------------------------------------------


def kernel_test_files() -> List[str]:
    files = sorted(str(p.relative_to(_ROOT)) for p in (_ROOT / "tests").glob("test_triton_*.py"))
    if (_ROOT / "tests" / "test_mba.py").exists():
        files.append("tests/test_mba.py")
    return files


# Most worker processes for the kernel tests. Triton compiles each kernel variant on first use,
# one at a time per process, and the tests launch 455 variants of 1 to 4 s each (far past the
# stage's budget in one process), so with pytest-xdist they spread over the CPU cores.
MAX_TEST_WORKERS = 16


def kernel_test_workers(dry_run: bool) -> int:
    """Processes for the native kernel tests: one per CPU core up to ``MAX_TEST_WORKERS`` where
    pytest-xdist is installed, else 1; 1 in a dry run, which only collects."""
    if dry_run or importlib.util.find_spec("xdist") is None:
        return 1
    return max(1, min(MAX_TEST_WORKERS, os.cpu_count() or 1))


_PYTEST_RESULT = re.compile(r"\d+ (passed|failed|errors?|skipped|deselected)\b.* in [\d.]+s")


def run_kernel_tests(out: Path, dry_run: bool, timeout_s: float) -> Dict[str, object]:
    files = kernel_test_files()
    if not files:
        return dict(stage="tests", ok=True, summary="no kernel test files")
    env = dict(os.environ)
    if not dry_run:
        env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = str(_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    # One seed for every worker (each would draw its own).
    env.setdefault("DIN_FAST_TEST_SEED", str(random.randrange(2**31)))
    # pytest-benchmark is off: these files time nothing, and under xdist it warns once per worker.
    command = [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider", "-p", "no:benchmark",
               f"--junitxml={out / 'junit.xml'}"]
    workers = kernel_test_workers(dry_run)
    if workers > 1:
        command += ["-n", str(workers)]
    if dry_run:
        command.append("--collect-only")
    start = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        log, returncode = result.stdout + result.stderr, result.returncode
    except subprocess.TimeoutExpired as err:
        log = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        log += f"\n*** pytest stopped after {timeout_s:.0f} s ***\n"
        returncode = -1
    # pytest -q under xdist prints no report header, so the seed goes in front of the command.
    replay = f"DIN_FAST_TEST_SEED={env['DIN_FAST_TEST_SEED']} " + " ".join(command)
    (out / "pytest.log").write_text(replay + "\n\n" + log)
    lines = [line for line in log.strip().splitlines() if line.strip()]
    # pytest's result line ("3 failed, 450 passed in 80s"), else whatever came last.
    last = [line for line in lines if _PYTEST_RESULT.search(line)][-1:] or lines[-1:] or ["(no output)"]
    return dict(stage="tests", ok=returncode == 0, summary=f"{' '.join(files)}: {last[0]} "
                f"({time.perf_counter() - start:.0f} s)")


# ----------------------------------------------------------------------------------------------
# Stage 2: full-size checks against float64
# ----------------------------------------------------------------------------------------------


def rel_err(actual, expected) -> float:
    import torch
    a, e = actual.detach().to(torch.float64).cpu(), expected.detach().to(torch.float64).cpu()
    if torch.isnan(a).any() or torch.isinf(a).any():
        return float("nan")
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff / denom if denom > 0 else diff


def _compare(record_base: dict, names: Sequence[str], actual, expected, bound: float,
             cancelling: Dict[str, float], dtype) -> List[dict]:
    """One record per tensor: its relative error against ``bound``; a tensor named in
    ``cancelling`` (a sum whose terms can cancel) by the tests' rule instead, its largest
    absolute error against ``din_fast.testing``'s bound with the terms' size given with it
    (``score_terms``)."""
    import torch
    from din_fast.testing import normwise_bound
    records = []
    for name, a, e in zip(names, actual, expected):
        if name in cancelling:
            a, e = a.detach().to(torch.float64).cpu(), e.detach().to(torch.float64).cpu()
            err = (a - e).abs().max().item()
            abs_bound = normwise_bound(e, dtype, terms=cancelling[name])
            records.append(dict(record_base, tensor=name, rel_err=None, abs_err=err, abs_bound=abs_bound,
                                bound=bound, ok=bool(err <= abs_bound)))
            continue
        err = rel_err(a, e)
        records.append(dict(record_base, tensor=name, rel_err=err, bound=bound, ok=bool(err <= bound)))
    return records


def _attention_check(shape, dtype, device, activation, normalization, training):
    import torch
    from din_fast import functional, reference
    from din_fast.testing import score_terms
    from .run import HIDDEN, attention_params

    batch, seq_len, dim = shape["B"], shape["T"], shape["D"]
    query = torch.randn(batch, dim, device=device, dtype=torch.float64).to(dtype)
    keys = torch.randn(batch, seq_len, dim, device=device, dtype=torch.float64).to(dtype)
    lengths = torch.randint(0, seq_len + 1, (batch,), device=device)
    lengths[0], lengths[-1] = 0, seq_len
    weights, biases, act_params = attention_params(dim, HIDDEN, activation, dtype, device)
    grad_pooled = torch.randn(batch, dim, device=device, dtype=torch.float64).to(dtype)

    def run(fn, cast):
        q, k = (cast(t).detach().requires_grad_() for t in (query, keys))
        ws = [cast(w).detach().requires_grad_() for w in weights]
        bs = [cast(b).detach().requires_grad_() for b in biases]
        # Dice's running statistics are buffers: the float64 copy must start from the same values.
        aps = [tuple([cast(p[0]).detach().requires_grad_()] + [cast(x).clone() for x in p[1:]]) if p else ()
               for p in act_params]
        pooled, attn = fn(q, k, ws, bs, lengths=lengths, activation=activation, act_params=aps,
                          normalization=normalization, training=training)
        leaves = [q, k, *ws, *bs] + [p[0] for p in aps if p]
        grads = torch.autograd.grad(pooled, leaves, cast(grad_pooled))
        return [pooled, attn, *grads]

    names = ["pooled", "weights", "grad_query", "grad_keys"] + [f"grad_W{i + 1}" for i in range(len(weights))] + \
        [f"grad_b{i + 1}" for i in range(len(biases))] + [f"grad_act{i + 1}" for i, p in enumerate(act_params) if p]
    fast = run(lambda *a, **k: functional.attention_pooling(*a, backend="triton", **k), lambda t: t)
    ref = run(reference.attention_pooling, lambda t: t.to(torch.float64))
    # The score layer's bias gradient is one sum over every valid position, exactly 0 under
    # softmax (which ignores a shift of every score): a relative error means nothing there.
    counted = torch.arange(seq_len, device=device)[None, :] < lengths[:, None]
    cancelling = {f"grad_b{len(biases)}": score_terms(counted, grad_pooled, keys, weights=ref[1],
                                                      normalization=normalization)}
    return names, fast, ref, cancelling


def _dice_check(shape, dtype, device):
    import torch
    from din_fast import functional, reference
    rows, channels = shape["N"], shape["C"]
    x = (torch.randn(rows, channels, device=device, dtype=torch.float64) * 1.7 + 0.3).to(dtype)
    alpha = torch.rand(channels, device=device) * 1.5 - 0.25
    grad = torch.randn(rows, channels, device=device, dtype=torch.float64).to(dtype)

    def run(fn, cast):
        xx = cast(x).detach().requires_grad_()
        aa = (alpha.double() if cast(x).dtype == torch.float64 else alpha).detach().requires_grad_()
        running_mean = torch.zeros(channels, device=device, dtype=aa.dtype)
        running_var = torch.ones(channels, device=device, dtype=aa.dtype)
        y = fn(xx, aa, running_mean, running_var, None, training=True)
        return [y, *torch.autograd.grad(y, [xx, aa], cast(grad)), running_mean, running_var]

    fast = run(lambda *a, **k: functional.dice(*a, backend="triton", **k), lambda t: t)
    ref = run(reference.dice, lambda t: t.to(torch.float64))
    return ["y", "grad_x", "grad_alpha", "running_mean", "running_var"], fast, ref, {}


def _serving_check(shape, dtype, device):
    import torch
    from din_fast import functional, reference
    from .run import HIDDEN, attention_params
    history = torch.randn(shape["T"], shape["D"], device=device, dtype=torch.float64).to(dtype)
    cands = torch.randn(shape["C"], shape["D"], device=device, dtype=torch.float64).to(dtype)
    weights, biases, act_params = attention_params(shape["D"], HIDDEN, "sigmoid", dtype, device)
    with torch.no_grad():
        fast = functional.score_candidates(history, cands, weights, biases, activation="sigmoid",
                                           act_params=act_params, backend="triton")
        to64 = lambda ts: [t.to(torch.float64) for t in ts]  # noqa: E731
        ref = reference.score_candidates(history.double(), cands.double(), to64(weights), to64(biases),
                                         activation="sigmoid", act_params=[tuple(to64(p)) for p in act_params])
    return ["pooled", "weights"], list(fast), list(ref), {}


def _mba_check(shape, dtype, device):
    import torch
    from din_fast import reference
    from din_fast.optim import mba_sgd_fused_
    from .run import zipf_ids
    num_rows, dim = shape["K"], shape["D"]
    lam, lr = 0.5, 0.1
    weight = torch.randn(num_rows, dim, device=device, dtype=torch.float64).to(dtype)
    ids = zipf_ids(num_rows, (shape["B"], shape["L"]), device=device)
    grad_rows = torch.randn(ids.numel(), dim, device=device, dtype=torch.float64).to(dtype)
    counts = torch.randint(1, 1000, (num_rows,), device=device).to(torch.float32)
    before = weight.clone()
    mba_sgd_fused_(weight, ids, grad_rows, counts, lam=lam, lr=lr, backend="triton")
    dense_grad = torch.zeros(num_rows, dim, device=device, dtype=torch.float64).index_add_(
        0, ids.reshape(-1), grad_rows.double())
    expected = reference.mba_sgd_step(before.double(), dense_grad, ids, counts, lam=lam, lr=lr)
    untouched = ~reference.batch_indicator(ids, num_rows)
    unchanged = torch.equal(weight[untouched], before[untouched])
    # The step's change, not the table, is what the kernel computes; the table's own rounding
    # would hide an error in it.
    delta, delta_ref = (weight.double() - before.double()), (expected - before.double())
    rows_changed = torch.zeros(1) if unchanged else torch.ones(1)
    return ["step_delta", "rows_outside_batch_changed"], [delta, rows_changed], [delta_ref, torch.zeros(1)], {}


def full_size_checks(device: str, dtypes: Sequence[str], tiny: bool) -> List[dict]:
    """Runs every check in every dtype; a check that raises is one failed record with the error."""
    import torch
    attention_shape = dict(B=3, T=7, D=36) if tiny else dict(B=1024, T=100, D=36)
    dice_shape = dict(N=37, C=6) if tiny else dict(N=409600, C=40)
    serving_shape = dict(C=5, T=7, D=36) if tiny else dict(C=200, T=100, D=36)
    mba_shape = dict(K=1000, D=64, B=8, L=11) if tiny else dict(K=1_000_000, D=64, B=4096, L=101)
    plan: List[tuple] = []
    for dtype_name in dtypes:
        plan += [
            ("attention sigmoid", attention_shape, dtype_name,
             lambda s, d: _attention_check(s, d, device, "sigmoid", "none", False)),
            ("attention dice+softmax", attention_shape, dtype_name,
             lambda s, d: _attention_check(s, d, device, "dice", "softmax", False)),
            ("attention dice training", attention_shape, dtype_name,
             lambda s, d: _attention_check(s, d, device, "dice", "none", True)),
            ("dice train", dice_shape, dtype_name, lambda s, d: _dice_check(s, d, device)),
            ("serving sigmoid", serving_shape, dtype_name, lambda s, d: _serving_check(s, d, device)),
        ]
        if dtype_name == "float32":
            plan.append(("mba fused step", mba_shape, dtype_name, lambda s, d: _mba_check(s, d, device)))
    records = []
    for name, shape, dtype_name, check in plan:
        base = dict(check=name, shape=" ".join(f"{k}={v}" for k, v in shape.items()), dtype=dtype_name)
        bound = REL_ERR_BOUND[dtype_name]
        try:
            torch.manual_seed(len(records))
            dtype = getattr(torch, dtype_name)
            names, fast, ref, cancelling = check(shape, dtype)
            records += _compare(base, names, fast, ref, bound, cancelling, dtype)
        except NotImplementedError as err:
            records.append(dict(base, tensor="-", rel_err=None, bound=bound, ok=True,
                                not_implemented=str(err).strip()[:300]))
        except Exception as err:  # report and go on: one broken op must not hide the others
            records.append(dict(base, tensor="-", rel_err=None, bound=bound, ok=False,
                                error=f"{type(err).__name__}: {str(err).strip()[:300]}"))
        if device == "cuda":
            torch.cuda.empty_cache()
    return records


def format_checks(records: Sequence[dict]) -> str:
    lines = []
    groups: Dict[tuple, List[dict]] = {}
    for r in records:
        groups.setdefault((r["check"], r["shape"], r["dtype"]), []).append(r)
    for (check, shape, dtype), rs in groups.items():
        missing = [r for r in rs if r.get("not_implemented")]
        if missing:
            lines.append(f"n/a   {check:30s} {dtype:9s} {shape:22s} {missing[0]['not_implemented']}")
            continue
        errors = [r for r in rs if r.get("error")]
        if errors:
            lines.append(f"FAIL  {check:30s} {dtype:9s} {shape:22s} {errors[0]['error']}")
            continue
        relative = [r for r in rs if r["rel_err"] is not None]
        worst = max(relative, key=lambda r: float("inf") if r["rel_err"] != r["rel_err"] else r["rel_err"])
        failing = [r["tensor"] for r in rs if not r["ok"]]
        lines.append(f"{'FAIL' if failing else 'ok  '}  {check:30s} {dtype:9s} {shape:22s} worst {worst['tensor']} "
                     f"rel err {worst['rel_err']:.2e} (bound {worst['bound']:.0e})"
                     + (f"; failing: {', '.join(failing)}" if failing else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Stage 3: benchmarks
# ----------------------------------------------------------------------------------------------


def bench_config(device: str, dry_run: bool, budget_s: float):
    from .run import RunConfig, default_grid
    if dry_run:
        grids = {"dice": [dict(N=64, C=8)], "attention": [dict(B=4, T=t, D=36) for t in (5, 9)],
                 "serving": [dict(C=3, T=5, D=36)], "mba": [dict(K=1000, D=16, B=4, L=11)]}
        return RunConfig(ops=("dice", "attention", "serving", "mba"), device=device, dtypes=("float32",),
                         compile=False, grids=grids, cpu_budget_s=0.0, cpu_min_repeats=2, time_budget_s=budget_s)
    grids = {op: default_grid(op, device, quick=True) for op in ("dice", "attention", "serving", "mba")}
    return RunConfig(ops=("attention", "serving", "dice", "mba"), device=device, dtypes=("float32",),
                     compile=True, grids=grids, time_budget_s=budget_s)


def run_bench(out: Path, device: str, dry_run: bool, budget_s: float) -> List[dict]:
    from .run import ResultWriter, RunConfig, _progress, run_benchmarks
    writer = ResultWriter(str(out / "bench.jsonl"))

    def emit(row):
        writer(row)
        _progress(row)

    start = time.perf_counter()
    config = bench_config(device, dry_run, budget_s)
    rows = run_benchmarks(config, emit)
    if not dry_run:
        remaining = budget_s - (time.perf_counter() - start)
        if remaining > 30:
            bf16 = RunConfig(ops=("attention",), device=device, dtypes=("bfloat16",), compile=True,
                             grids={"attention": [dict(B=4096, T=100, D=36)]}, time_budget_s=remaining)
            rows += run_benchmarks(bf16, emit)
    return rows


def run_deepctr(out: Path, device: str, dry_run: bool) -> Optional[List[dict]]:
    """DeepCTR-Torch's DIN before and after ``patch``; None when deepctr-torch does not import."""
    try:
        import deepctr_torch  # noqa: F401
    except ImportError:
        return None
    from .deepctr import run_case
    sizes = dict(batch=64, rounds=1, steps=1) if dry_run else dict(batch=4096, rounds=5, steps=3)
    rows = []
    with (out / "deepctr.jsonl").open("w") as handle:
        for variant in ("dice", "sigmoid"):
            row = run_case(variant, 10 if dry_run else 100, device=device, warmup=1, backend="auto", **sizes)
            handle.write(json.dumps(row) + "\n")
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# Stage 5: the shipped kernels against Triton's default specialization
# ----------------------------------------------------------------------------------------------


def compiled_resources(kernel) -> List[dict]:
    """Registers and spills of every variant ``kernel`` (a ``JITFunction``) compiled so far;
    empty under the interpreter. Triton's cache layout varies between versions, so this reads
    it defensively."""
    found = []
    for cache in getattr(kernel, "device_caches", {}).values():
        cache = cache[0] if isinstance(cache, tuple) else cache
        for compiled in getattr(cache, "values", lambda: [])():
            try:
                compiled._init_handles()
                found.append(dict(registers=compiled.n_regs, spills=compiled.n_spills,
                                  num_warps=compiled.metadata.num_warps, num_stages=compiled.metadata.num_stages))
            except Exception as err:  # a report, not a check: keep the timings
                found.append(dict(error=f"{type(err).__name__}: {err}"))
    return found


# One case per op family: (op, module under din_fast.kernels, mode, GPU shape, dry-run shape).
_SPECIALIZATION_CASES = (
    ("attention", "attention", "forward+backward", dict(B=4096, T=100, D=36), dict(B=4, T=9, D=36)),
    ("dice", "dice", "forward+backward", dict(N=409600, C=40), dict(N=64, C=8)),
    ("mba", "mba", "step", dict(K=1_000_000, D=64, B=4096, L=101), dict(K=1000, D=16, B=4, L=11)),
)


def compare_specialization(out: Path, device: str, dry_run: bool) -> List[dict]:
    """Each op family timed with its launched kernels as shipped and re-jitted with Triton's
    default specialization, alternating, on the same inputs; their outputs compared."""
    import importlib

    import torch
    import triton
    from .run import CASE_BUILDERS, cpu_time_interleaved, cuda_time

    rows, resources = [], {}
    for op, module_name, mode, shape, tiny_shape in _SPECIALIZATION_CASES:
        module = importlib.import_module(f"din_fast.kernels.{module_name}")
        # The launched kernels are exactly the compile gate's spec functions.
        shipped = {spec["fn"].__name__: spec["fn"] for spec in module.AOT_SPECS}
        specialized = {name: triton.jit(kernel.fn) for name, kernel in shipped.items()}

        def use(variant):
            for name, kernel in variant.items():
                setattr(module, name, kernel)

        dtypes = (torch.float32,) if dry_run or op == "mba" else (torch.float32, torch.bfloat16)
        try:
            for dtype in dtypes:
                case = CASE_BUILDERS[op](tiny_shape if dry_run else shape, dtype, device, mode, "triton", {})
                # The MBA step updates its table in place: each variant's compared run starts
                # from the same inputs.
                initial = {name: tensor.clone() for name, tensor in case.inputs.items()}
                times, results = {}, {}
                for label, variant in (("shipped", shipped), ("specialized", specialized)) * (1 if dry_run else 2):
                    use(variant)
                    for name, tensor in case.inputs.items():
                        tensor.copy_(initial[name])
                    results[label] = [t.clone() for t in case.run()]
                    if device == "cuda":
                        torch.cuda.synchronize()
                        median = cuda_time(case.run)[0]
                    else:
                        median = cpu_time_interleaved([case.run], budget_s=0.0, min_repeats=1)[0][0]
                    times.setdefault(label, []).append(median)
                row = dict(op=op, shape=tiny_shape if dry_run else shape, dtype=str(dtype).split(".")[-1], mode=mode,
                           shipped_ms=min(times["shipped"]), specialized_ms=min(times["specialized"]))
                row["speedup_of_specialized"] = row["shipped_ms"] / row["specialized_ms"]
                # Same kernels on the same inputs: only the compiled code differs, so the
                # results should agree to rounding.
                row["max_rel_err"] = max(rel_err(a, b) for a, b in zip(results["specialized"], results["shipped"]))
                rows.append(row)
        finally:
            use(shipped)
        resources[op] = {label: {name: compiled_resources(kernel) for name, kernel in variant.items()}
                         for label, variant in (("shipped", shipped), ("specialized", specialized))}
    with (out / "specialization.jsonl").open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
        handle.write(json.dumps(dict(resources=resources)) + "\n")
    return rows


def format_specialization(rows: Sequence[dict]) -> str:
    return "\n".join(
        f"{r['op']:9s} {' '.join(f'{k}={v}' for k, v in r['shape'].items()):26s} {r['dtype']:9s} {r['mode']:16s} "
        f"shipped {r['shipped_ms']:.3f} ms, specialized {r['specialized_ms']:.3f} ms "
        f"({r['speedup_of_specialized']:.2f}x), max rel. difference {r['max_rel_err']:.1e}" for r in rows)


# ----------------------------------------------------------------------------------------------
# Stage 6: where the time goes, kernel by kernel
# ----------------------------------------------------------------------------------------------

# (op, mode, GPU shape, dry-run shape, dtypes, providers): the cases whose triton timings missed
# their targets, with the eager reference beside them.
_PROFILE_CASES = (
    ("attention", "forward+backward", dict(B=4096, T=100, D=36), dict(B=4, T=9, D=36), ("float32", "bfloat16"),
     ("triton", "reference")),
    ("attention", "forward", dict(B=1024, T=100, D=36), dict(B=4, T=9, D=36), ("float32",), ("triton", "reference")),
    ("serving", "inference", dict(C=200, T=100, D=36), dict(C=4, T=9, D=36), ("float32",), ("triton", "reference")),
    ("mba", "step", dict(K=1_000_000, D=64, B=4096, L=101), dict(K=1000, D=16, B=4, L=11), ("float32",),
     ("triton", "torch")),
)
_PROFILED_ITERATIONS = 5


def profile_kernels(out: Path, device: str, dry_run: bool) -> List[dict]:
    """Each case run ``_PROFILED_ITERATIONS`` times under ``torch.profiler`` after a warm-up:
    per iteration, its wall time (host clock, synchronized), the time the device was busy and
    the time of each kernel (by name: launches per iteration and microseconds), and the host
    time until the last launch returned (the profiler's own bookkeeping adds to it). Wall time
    well above busy time means the device waits for the host. Under ``--dry-run`` (CPU) the rows
    hold the leaf operators instead of kernels."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from .run import CASE_BUILDERS, _synchronize

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    rows = []
    for op, mode, shape, tiny_shape, dtypes, providers in _PROFILE_CASES:
        for dtype_name, provider in itertools.product(dtypes, providers):
            case_shape = tiny_shape if dry_run else shape
            row = dict(op=op, mode=mode, shape=case_shape, dtype=dtype_name, provider=provider)
            try:
                case = CASE_BUILDERS[op](case_shape, getattr(torch, dtype_name), device, mode, provider, {})
                for _ in range(3):
                    case.run()
                _synchronize(device)
                with profile(activities=activities) as prof:
                    start = time.perf_counter()
                    for _ in range(_PROFILED_ITERATIONS):
                        case.run()
                    launched = time.perf_counter()
                    _synchronize(device)
                    finished = time.perf_counter()
                kernels: Dict[str, List[float]] = {}
                for event in prof.events():
                    if device == "cuda":
                        if event.device_type != DeviceType.CUDA:
                            continue
                    elif not event.name.startswith("aten::") or any(c.name.startswith("aten::")
                                                                       for c in event.cpu_children):
                        continue
                    kernels.setdefault(event.name, []).append(event.time_range.elapsed_us())
            except Exception as err:  # a report: the other cases still run
                rows.append(dict(row, error=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"))
                continue
            per_iteration = sorted(((name, len(times) / _PROFILED_ITERATIONS, sum(times) / _PROFILED_ITERATIONS)
                                    for name, times in kernels.items()), key=lambda item: -item[2])
            rows.append(dict(row, wall_us=(finished - start) * 1e6 / _PROFILED_ITERATIONS,
                             host_us=(launched - start) * 1e6 / _PROFILED_ITERATIONS,
                             busy_us=sum(us for _, _, us in per_iteration),
                             kernels=[dict(name=name, launches=n, us=us) for name, n, us in per_iteration]))
    with (out / "profile.jsonl").open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return rows


def format_profile(rows: Sequence[dict], top: int = 6) -> str:
    """Per case: wall, host and busy time per iteration, then its ``top`` kernels."""
    lines = []
    for r in rows:
        head = (f"{r['op']:9s} {' '.join(f'{k}={v}' for k, v in r['shape'].items()):26s} {r['dtype']:9s} "
                f"{r['mode']:16s} {r['provider']:9s}")
        if "error" in r:
            lines.append(f"{head} error: {r['error']}")
            continue
        launches = sum(k["launches"] for k in r["kernels"])
        lines.append(f"{head} wall {r['wall_us']:.0f} us, host {r['host_us']:.0f} us, busy {r['busy_us']:.0f} us "
                     f"in {launches:.0f} launches")
        lines += [f"    {k['us']:9.1f} us  {k['launches']:4.1f}x  {k['name'][:90]}" for k in r["kernels"][:top]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for the result files (flat)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter")
    parser.add_argument("--skip", default="",
                        help="comma-separated stages to skip: tests,checks,bench,deepctr,specialization,profile")
    parser.add_argument("--tests-timeout", type=float, default=240.0, help="seconds for the pytest stage")
    parser.add_argument("--bench-budget", type=float, default=330.0, help="seconds for the benchmark stage")
    args = parser.parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    if args.dry_run:
        # Must precede the first import of triton.
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run for the CPU rehearsal", file=sys.stderr)
        return 2
    from .run import environment, format_table
    env = environment(device)
    (out / "environment.json").write_text(json.dumps(dict(env, argv=argv if argv is not None else sys.argv[1:]),
                                                     indent=1))
    print(f"gpu_check on {env['device_name']}: torch {env['torch']}, triton {env['triton']}, commit {env['commit']}",
          flush=True)
    failed = False
    sections = []

    if "tests" not in skip:
        print("== stage 1: kernel tests", flush=True)
        tests = run_kernel_tests(out, args.dry_run, args.tests_timeout)
        failed |= not tests["ok"]
        sections.append(f"kernel tests: {'ok' if tests['ok'] else 'FAILED'}: {tests['summary']}")
        print(sections[-1], flush=True)

    if "checks" not in skip:
        print("== stage 2: full-size checks against float64", flush=True)
        dtypes = ("float32",) if args.dry_run else ("float32", "bfloat16", "float16")
        records = full_size_checks(device, dtypes, tiny=args.dry_run)
        with (out / "checks.jsonl").open("w") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
        failed |= not all(r["ok"] for r in records)
        sections.append("checks (relative error against float64):\n" + format_checks(records))
        print(sections[-1], flush=True)

    if "bench" not in skip:
        print("== stage 3: benchmarks", flush=True)
        rows = run_bench(out, device, args.dry_run, args.bench_budget)
        failed |= any(r["status"] == "error" for r in rows)
        sections.append("benchmarks (median ms; x = speed-up over the eager reference):\n" + format_table(rows))

    if "deepctr" not in skip:
        print("== stage 4: DeepCTR-Torch DIN before and after patch", flush=True)
        from .deepctr import format_table as format_deepctr
        deepctr_rows = run_deepctr(out, device, args.dry_run)
        sections.append("DeepCTR-Torch DIN training throughput:\n" + format_deepctr(deepctr_rows) if deepctr_rows
                        else "DeepCTR-Torch DIN: skipped (deepctr-torch does not import)")
        print(sections[-1], flush=True)

    if "specialization" not in skip:
        print("== stage 5: kernels as shipped against Triton's default specialization", flush=True)
        sections.append("shipped against specialized kernels, median ms:\n"
                        + format_specialization(compare_specialization(out, device, args.dry_run)))
        print(sections[-1], flush=True)

    if "profile" not in skip:
        print("== stage 6: kernel times per iteration (torch.profiler)", flush=True)
        sections.append("per iteration: wall (synchronized), host (until the last launch returned), device busy; "
                        "the largest kernels:\n" + format_profile(profile_kernels(out, device, args.dry_run)))
        print(sections[-1], flush=True)

    summary = "\n\n".join(sections)
    (out / "summary.txt").write_text(summary + "\n")
    print("\n" + "=" * 100 + "\n" + summary + f"\n\ngpu_check: {'FAILED' if failed else 'all passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
