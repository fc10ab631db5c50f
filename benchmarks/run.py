"""Benchmark runner: ops x providers x shapes x modes, side by side in one process.

``python -m benchmarks.run [--ops dice,attention,mba,serving] [--quick] [--out results/bench.jsonl]
[--device cpu|cuda] [--no-compile]``

Providers:

* ``reference``: ``din_fast.reference`` run eagerly (the literal math);
* ``compile``: ``torch.compile`` of that reference (on the CPU Inductor needs a C++ compiler; a
  failed compile is reported as a ``skipped`` row with its reason);
* ``torch``: ``din_fast.functional`` with ``backend="torch"`` (argument checks included, as users
  call it);
* ``triton``: ``backend="triton"``, where CUDA and Triton exist (or under ``TRITON_INTERPRET=1``).

For MBA the providers are ``dense`` (the usual dense gradient, L2 and SGD over the whole table),
``eager_sparse`` (unique, gather, ``index_add``, scatter in plain PyTorch), and our fused step
``din_fast.optim.mba_sgd_fused_`` with ``backend="torch"`` and ``backend="triton"``.

Modes: ``forward`` (under ``torch.no_grad``), ``forward+backward`` (forward, then
``torch.autograd.grad`` of every floating input and parameter), ``inference`` (serving), ``step``
(MBA). Times: ``triton.testing.do_bench`` median with 20/80 % quantiles on CUDA; on the CPU the
median and quantiles of timed loops that visit the providers of a case in turn, round after
round, so that load from elsewhere on a shared machine hits them alike. Peak memory: ``torch.cuda.max_memory_allocated``
above the inputs on CUDA; the peak resident set above its level before the call on the CPU
(Linux ``/proc``; absent elsewhere).

Each row (one op, provider, mode, shape, dtype) is appended to the JSONL file and to a CSV beside
it; a row that cannot run says ``status: skipped`` with the reason, never disappears. A table with
the speed-up of each provider over the eager reference, of triton over compile and, on GPU, the
fraction of the roofline lower bound is printed at the end.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import roofline

OPS = ("dice", "attention", "serving", "mba")
PROVIDERS = ("reference", "compile", "torch", "triton")
MBA_PROVIDERS = ("dense", "eager_sparse", "torch", "triton")
HIDDEN = (80, 40)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
CSV_FIELDS = ("op", "provider", "mode", "shape", "dtype", "activation", "device", "device_name", "status", "reason",
              "median_ms", "p20_ms", "p80_ms", "peak_mem_mb", "max_rel_err", "flops", "bytes", "lower_bound_ms",
              "roofline_fraction", "achieved_tflops", "achieved_gbps", "bound", "torch", "triton", "commit",
              "timestamp")


# ----------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------


def default_grid(op: str, device: str, quick: bool, lengths: str = "full") -> List[Dict[str, int]]:
    """The shapes of ``op``: the full grid on CUDA (``benchmarks/README.md``), a smaller one on the CPU; ``quick``
    keeps the sweeps the plots need (sequence length, embedding size) and little else.
    ``lengths="uniform"`` marks the attention shapes whose valid lengths are drawn uniformly
    from [1, T] instead of all T."""
    gpu = device == "cuda"
    if op == "dice":
        shapes = [(4096, 200), (4096, 80), (409600, 80), (409600, 40)]
        if quick and not gpu:
            shapes = shapes[:2]
        return [dict(N=n, C=c) for n, c in shapes]
    if op == "attention":
        if gpu and not quick:
            shapes = [dict(B=b, T=t, D=d) for b, t, d in itertools.product((1024, 4096), (50, 100, 1000), (36, 64, 128))]
        elif gpu:
            sweep_t = [dict(B=4096, T=t, D=36) for t in (50, 100, 1000)]
            sweep_d = [dict(B=4096, T=100, D=d) for d in (64, 128)]
            shapes = [dict(B=1024, T=100, D=36)] + sweep_t + sweep_d
        elif quick:
            shapes = [dict(B=1024, T=t, D=36) for t in (50, 100)]
        else:
            shapes = [dict(B=1024, T=t, D=36) for t in (50, 100, 1000)] + [dict(B=1024, T=100, D=d) for d in (64, 128)]
        return shapes if lengths == "full" else [dict(shape, lengths=lengths) for shape in shapes]
    if op == "serving":
        return [dict(C=200, T=100, D=36)]
    if op == "mba":
        if gpu:
            return [dict(K=k, D=64, B=4096, L=101) for k in (1_000_000, 10_000_000)]
        return [dict(K=1_000_000, D=64, B=4096 if not quick else 1024, L=101)]
    raise ValueError(f"unknown op {op!r}; choose from {list(OPS)}")


def modes_of(op: str) -> Tuple[str, ...]:
    return {"dice": ("forward", "forward+backward"), "attention": ("forward", "forward+backward"),
            "serving": ("inference",), "mba": ("step",)}[op]


def providers_of(op: str) -> Tuple[str, ...]:
    return MBA_PROVIDERS if op == "mba" else PROVIDERS


def shape_label(shape: Dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


def cpu_time_interleaved(fns: Sequence[Callable[[], object]], budget_s: float = 1.0, min_repeats: int = 5,
                         max_repeats: int = 50) -> List[Tuple[float, float, float]]:
    """``(median, p20, p80)`` in ms of each of ``fns`` (already warmed up) on the CPU, timed in
    rounds that visit every function in turn, so that a burst of load from elsewhere on the
    machine hits all providers alike rather than one. Each visit is a loop of several calls when
    one call is short. Rounds go on until ``budget_s`` per function is spent and at least
    ``min_repeats`` ran."""
    inner = []
    for fn in fns:
        start = time.perf_counter()
        fn()
        inner.append(max(1, int(0.02 / max(time.perf_counter() - start, 1e-9))))
    times: List[List[float]] = [[] for _ in fns]
    deadline = time.perf_counter() + budget_s * len(fns)
    rounds = 0
    while rounds < min_repeats or (time.perf_counter() < deadline and rounds < max_repeats):
        for fn, calls, samples in zip(fns, inner, times):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            samples.append((time.perf_counter() - start) / calls * 1e3)
        rounds += 1
    return [_median_quantiles(samples) for samples in times]


def _median_quantiles(times: Sequence[float]) -> Tuple[float, float, float]:
    ordered = sorted(times)
    if len(ordered) == 1:
        return ordered[0], ordered[0], ordered[0]
    q = statistics.quantiles(ordered, n=10, method="inclusive")
    return statistics.median(ordered), q[1], q[7]


def cuda_time(fn: Callable[[], object]) -> Tuple[float, float, float]:
    """``(median, p20, p80)`` in ms from ``triton.testing.do_bench`` (CUDA events, L2 flushed)."""
    from triton.testing import do_bench
    median, p20, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    return float(median), float(p20), float(p80)


def peak_memory_mb(fn: Callable[[], object], device: str) -> Optional[float]:
    """Peak memory of one call of ``fn`` above what was allocated before it, in MiB, from the
    CUDA caching allocator's statistics; None on the CPU, whose allocator keeps none (the
    process's resident set keeps memory freed by earlier calls, so its peak says little of the
    op's: one Dice case measured 28, 0 and 9 MiB in three identical calls)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------


class Skip(Exception):
    """A provider that cannot run a case; the message is the reason."""


@dataclass
class Case:
    """A ready-to-time closure: ``run()`` returns the tensors compared across providers."""

    run: Callable[[], Sequence[torch.Tensor]]
    flops: int
    nbytes: int
    inputs: Dict[str, torch.Tensor] = field(default_factory=dict)


def _linear_init(out_features: int, in_features: int, dtype, device) -> Tuple[torch.Tensor, torch.Tensor]:
    bound = 1.0 / math.sqrt(in_features)
    w = (torch.rand(out_features, in_features, device=device) * 2 - 1) * bound
    b = (torch.rand(out_features, device=device) * 2 - 1) * bound
    return w.to(dtype), b.to(dtype)


def attention_params(dim: int, hidden: Sequence[int], activation: str, dtype, device):
    """``(weights, biases, act_params)`` of the activation unit, ``nn.Linear`` initialised."""
    sizes = [4 * dim] + list(hidden) + [1]
    weights, biases = [], []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        w, b = _linear_init(fan_out, fan_in, dtype, device)
        weights.append(w)
        biases.append(b)
    act_params = []
    for width in hidden:
        if activation == "prelu":
            act_params.append((torch.full((width,), 0.25, dtype=dtype, device=device),))
        elif activation == "dice":
            act_params.append((torch.rand(width, dtype=dtype, device=device) * 0.5,
                               torch.randn(width, dtype=dtype, device=device) * 0.1,
                               torch.rand(width, dtype=dtype, device=device) + 0.5))
        else:
            act_params.append(())
    return weights, biases, act_params


def _trainable(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    return [t.detach().requires_grad_(True) for t in tensors]


def _op_function(op: str, provider: str, compiled: Dict[str, Callable], device: str):
    """The callable with ``din_fast.reference``'s signature for a provider."""
    from din_fast import functional, reference
    name = {"dice": "dice", "attention": "attention_pooling", "serving": "score_candidates"}[op]
    if provider == "reference":
        return getattr(reference, name)
    if provider == "compile":
        if name not in compiled:
            compiled[name] = torch.compile(getattr(reference, name))
        return compiled[name]
    backend = provider
    from din_fast.backend import resolve_backend
    try:
        resolve_backend(backend, torch.device(device), name)
        if backend == "torch":
            import din_fast.torch_ops  # noqa: F401
    except (RuntimeError, NotImplementedError, ImportError) as err:
        raise Skip(f"not available: {err}") from err
    fn = getattr(functional, name)
    return lambda *args, **kwargs: fn(*args, backend=backend, **kwargs)



def make_attention_case(shape, dtype, device, mode, provider, compiled, activation="sigmoid") -> Case:
    batch, seq_len, dim = shape["B"], shape["T"], shape["D"]
    fn = _op_function("attention", provider, compiled, device)
    query = torch.randn(batch, dim, device=device).to(dtype)
    keys = torch.randn(batch, seq_len, dim, device=device).to(dtype)
    if shape.get("lengths") == "uniform":
        lengths = torch.randint(1, seq_len + 1, (batch,), device=device)
    else:
        lengths = torch.full((batch,), seq_len, dtype=torch.int64, device=device)
    weights, biases, act_params = attention_params(dim, HIDDEN, activation, dtype, device)
    training = activation == "dice" and mode == "forward+backward"
    flops, nbytes = roofline.attention_cost(batch, seq_len, dim, HIDDEN, activation, dtype, mode)
    if mode == "forward":
        def run():
            with torch.no_grad():
                return fn(query, keys, weights, biases, lengths=lengths, activation=activation,
                          act_params=act_params, training=training)[:1]
        return Case(run, flops, nbytes)
    query, keys = _trainable([query, keys])
    weights, biases = _trainable(weights), _trainable(biases)
    act_params = [tuple(_trainable(p[:1])) + tuple(p[1:]) for p in act_params]
    inputs = [query, keys, *weights, *biases] + [p[0] for p in act_params if p]
    grad_pooled = torch.randn(batch, dim, device=device).to(dtype)

    def run():
        pooled, _ = fn(query, keys, weights, biases, lengths=lengths, activation=activation, act_params=act_params,
                       training=training)
        return (pooled,) + torch.autograd.grad(pooled, inputs, grad_pooled)
    return Case(run, flops, nbytes)


def make_serving_case(shape, dtype, device, mode, provider, compiled, activation="sigmoid") -> Case:
    candidates, seq_len, dim = shape["C"], shape["T"], shape["D"]
    fn = _op_function("serving", provider, compiled, device)
    history = torch.randn(seq_len, dim, device=device).to(dtype)
    cands = torch.randn(candidates, dim, device=device).to(dtype)
    weights, biases, act_params = attention_params(dim, HIDDEN, activation, dtype, device)
    flops, nbytes = roofline.serving_cost(candidates, seq_len, dim, HIDDEN, activation, dtype)

    def run():
        with torch.no_grad():
            return fn(history, cands, weights, biases, activation=activation, act_params=act_params)[:1]
    return Case(run, flops, nbytes)


def make_dice_case(shape, dtype, device, mode, provider, compiled, activation=None) -> Case:
    rows, channels = shape["N"], shape["C"]
    fn = _op_function("dice", provider, compiled, device)
    x = torch.randn(rows, channels, device=device).to(dtype)
    alpha = (torch.rand(channels, device=device) * 0.5).to(dtype)
    running_mean = torch.zeros(channels, device=device, dtype=dtype)
    running_var = torch.ones(channels, device=device, dtype=dtype)
    flops, nbytes = roofline.dice_cost(rows, channels, dtype, mode)
    if mode == "forward":
        def run():
            with torch.no_grad():
                return (fn(x, alpha, running_mean, running_var, None, training=True),)
        return Case(run, flops, nbytes)
    x, alpha = _trainable([x, alpha])
    grad_y = torch.randn(rows, channels, device=device).to(dtype)

    def run():
        y = fn(x, alpha, running_mean, running_var, None, training=True)
        return (y,) + torch.autograd.grad(y, [x, alpha], grad_y)
    return Case(run, flops, nbytes)


def zipf_ids(num_rows: int, shape: Tuple[int, ...], exponent: float = 1.1, device="cpu") -> torch.Tensor:
    """Ids with Zipf-distributed frequencies (rank r drawn with probability ~ r^-exponent),
    the ranks scattered over ``[0, num_rows)`` by a fixed bijection so that popular ids are not
    neighbours in memory."""
    u = torch.rand(shape, dtype=torch.float64)
    a = 1.0 - exponent
    ranks = ((num_rows ** a - 1.0) * u + 1.0) ** (1.0 / a)
    ranks = ranks.floor().clamp(1, num_rows).to(torch.int64) - 1
    multiplier = 2_654_435_761  # odd and prime: a bijection modulo any num_rows it does not divide
    while math.gcd(multiplier, num_rows) != 1:
        multiplier += 2
    return ((ranks * multiplier) % num_rows).to(device)


def make_mba_case(shape, dtype, device, mode, provider, compiled, activation=None) -> Case:
    from din_fast import reference
    num_rows, dim, batch, seq = shape["K"], shape["D"], shape["B"], shape["L"]
    lam, lr = 1e-3, 1e-3
    weight = (torch.randn(num_rows, dim, device=device) * 0.01).to(dtype)
    ids = zipf_ids(num_rows, (batch, seq), device=device)
    grad_rows = (torch.randn(batch * seq, dim, device=device) / batch).to(dtype)
    counts = torch.randint(1, 1000, (num_rows,), device=device).to(torch.float32)
    unique = int(torch.unique(ids).numel())
    flops, nbytes = roofline.mba_cost(ids.numel(), unique, dim, dtype)
    flat_ids = ids.reshape(-1)

    if provider == "dense":
        def run():
            grad = torch.zeros_like(weight).index_add_(0, flat_ids, grad_rows)
            weight.copy_(reference.mba_sgd_step(weight, grad, ids, counts, lam=lam, lr=lr))
            return (weight,)
    elif provider == "eager_sparse":
        def run():
            rows, inverse = torch.unique(flat_ids, return_inverse=True)
            grad = torch.zeros(rows.numel(), dim, device=device, dtype=torch.float32)
            grad.index_add_(0, inverse, grad_rows.float())
            w = weight.index_select(0, rows).float()
            scale = (lam / counts.index_select(0, rows))[:, None]
            weight.index_copy_(0, rows, (w - lr * (grad + scale * w)).to(weight.dtype))
            return (weight,)
    elif provider == "compile":
        raise Skip("not applicable: the sparse step has data-dependent shapes (torch.unique)")
    else:
        try:
            from din_fast.optim import mba_sgd_fused_
            from din_fast.backend import resolve_backend
            resolve_backend(provider, weight.device, "mba_penalty")
        except (ImportError, RuntimeError, NotImplementedError) as err:
            raise Skip(f"not available: {err}") from err

        def run():
            return (mba_sgd_fused_(weight, ids, grad_rows, counts, lam=lam, lr=lr, backend=provider),)
    return Case(run, flops, nbytes, inputs=dict(weight=weight, ids=ids, grad_rows=grad_rows, counts=counts))


CASE_BUILDERS = {"attention": make_attention_case, "serving": make_serving_case, "dice": make_dice_case,
                 "mba": make_mba_case}


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------


def environment(device: str) -> Dict[str, str]:
    """Versions, device name and git commit, stamped on every row."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    if device == "cuda":
        device_name = torch.cuda.get_device_name()
    else:
        threads = torch.get_num_threads()
        device_name = f"{platform.machine()} CPU x{os.cpu_count()} ({threads} thread{'s' if threads != 1 else ''})"
    try:
        checkout = Path(__file__).resolve().parent
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
        # Numbers measured on uncommitted changes say so.
        if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=checkout, capture_output=True,
                          text=True, timeout=10).stdout.strip():
            commit += "-dirty"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return dict(device=device, device_name=device_name, torch=torch.__version__, triton=triton_version,
                commit=commit)


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _max_rel_err(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> Optional[float]:
    if expected is None or len(actual) != len(expected):
        return None
    worst = 0.0
    for a, e in zip(actual, expected):
        a64, e64 = a.detach().double(), e.detach().double()
        scale = e64.abs().max().item() if e64.numel() else 0.0
        diff = (a64 - e64).abs().max().item() if e64.numel() else 0.0
        if math.isnan(diff):
            return float("nan")
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


@dataclass
class RunConfig:
    ops: Sequence[str]
    device: str = "cpu"
    quick: bool = False
    dtypes: Sequence[str] = ("float32",)
    providers: Optional[Sequence[str]] = None
    compile: bool = True
    activation: str = "sigmoid"
    lengths: str = "full"
    cpu_budget_s: float = 1.0
    cpu_min_repeats: int = 5
    # Wall-clock seconds after which the remaining cases are reported as skipped.
    time_budget_s: Optional[float] = None
    grids: Dict[str, List[Dict[str, int]]] = field(default_factory=dict)


def run_benchmarks(config: RunConfig, emit: Callable[[dict], None] = lambda row: None) -> List[dict]:
    """Runs every (op, shape, dtype, mode, provider) of ``config``; returns and emits the rows."""
    device = config.device
    env = environment(device)
    if config.compile:
        # Every shape of the grid compiles anew; the default limit would silently fall back to eager.
        for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                     "accumulated_recompile_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 1024)
    compiled: Dict[str, Callable] = {}
    deadline = None if config.time_budget_s is None else time.perf_counter() + config.time_budget_s
    rows = []
    for op in config.ops:
        grid = config.grids.get(op) or default_grid(op, device, config.quick, config.lengths)
        for shape, dtype_name, mode in itertools.product(grid, config.dtypes, modes_of(op)):
            expected = None
            group = []
            for provider in providers_of(op):
                if config.providers and provider not in config.providers and provider not in ("reference", "dense"):
                    continue
                row = dict(op=op, provider=provider, mode=mode, shape=shape_label(shape), shape_dict=shape,
                           dtype=dtype_name, activation=config.activation if op in ("attention", "serving") else None,
                           **env, status="ok", reason="",
                           timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
                if deadline is not None and time.perf_counter() > deadline:
                    row.update(status="skipped", reason=f"time budget of {config.time_budget_s:.0f} s spent")
                    case, outputs = None, None
                else:
                    case, outputs = _prepare(config, op, provider, shape, DTYPES[dtype_name], mode, compiled, row)
                if provider in ("reference", "dense"):
                    expected = outputs
                elif outputs is not None:
                    row["max_rel_err"] = _max_rel_err(outputs, expected)
                del outputs
                group.append((row, case))
            _time_group(config, [(row, case) for row, case in group if case is not None], DTYPES[dtype_name])
            for row, _ in group:
                rows.append(row)
                emit(row)
            del group
            del expected
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def _failure(row: dict, provider: str, err: Exception, device: str) -> None:
    label = "compile failed" if provider == "compile" else "failed"
    if isinstance(err, torch.OutOfMemoryError):
        label = "out of memory"
    message = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
    row.update(status="skipped" if label != "failed" else "error", reason=f"{label}: {type(err).__name__}: {message}")
    if device == "cuda":
        torch.cuda.empty_cache()


def _prepare(config: RunConfig, op, provider, shape, dtype, mode, compiled, row) -> Tuple[Optional[Case], Optional[list]]:
    """Builds a provider's case, runs it once (compiling what needs compiling) and measures its
    peak memory. Returns ``(case, outputs of that first call)``, or ``(None, None)`` with the
    reason written into ``row``."""
    device = config.device
    if provider == "compile" and not config.compile:
        row.update(status="skipped", reason="--no-compile")
        return None, None
    if provider == "compile" and config.quick and shape != (config.grids.get(op) or default_grid(op, device, True, config.lengths))[0]:
        # Each new shape costs a fresh compile (about a minute per op and mode on a small CPU).
        row.update(status="skipped", reason="--quick compiles the first shape of each op only")
        return None, None
    try:
        torch.manual_seed(0)
        case = CASE_BUILDERS[op](shape, dtype, device, mode, provider, compiled, activation=config.activation)
        outputs = case.run()
        _synchronize(device)
        outputs = [o.detach().clone() for o in outputs]
        peak = peak_memory_mb(case.run, device)
    except Skip as reason:
        row.update(status="skipped", reason=str(reason))
        return None, None
    except NotImplementedError as err:
        row.update(status="skipped", reason=f"not implemented: {str(err).strip()[:300]}")
        return None, None
    except Exception as err:  # one failing case must not end the whole run
        _failure(row, provider, err, device)
        return None, None
    row.update(peak_mem_mb=peak, flops=case.flops, bytes=case.nbytes)
    return case, outputs


def _time_group(config: RunConfig, group: Sequence[Tuple[dict, Case]], dtype) -> None:
    """Times the prepared providers of one (op, shape, dtype, mode) and fills their rows."""
    device = config.device
    if device == "cuda":
        timings = []
        for row, case in group:
            try:
                timings.append(cuda_time(case.run))
            except Exception as err:
                _failure(row, row["provider"], err, device)
                timings.append(None)
    else:
        try:
            timings = cpu_time_interleaved([case.run for _, case in group], budget_s=config.cpu_budget_s,
                                           min_repeats=config.cpu_min_repeats)
        except Exception as err:
            for row, _ in group:
                _failure(row, row["provider"], err, device)
            return
    for (row, case), timing in zip(group, timings):
        if timing is None:
            continue
        median, p20, p80 = timing
        row.update(median_ms=median, p20_ms=p20, p80_ms=p80)
        if device == "cuda":
            ceiling = roofline.ceiling_for(row["device_name"])
            row.update(roofline.roofline_fields(case.flops, case.nbytes, median / 1e3, ceiling, dtype))


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


class ResultWriter:
    """Appends rows to ``path`` (JSON lines) and to the CSV beside it."""

    def __init__(self, path: Optional[str]):
        self.path = Path(path) if path else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.csv_path = self.path.with_suffix(".csv")

    def __call__(self, row: dict) -> None:
        if not self.path:
            return
        record = {k: v for k, v in row.items()}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        new = not self.csv_path.exists()
        with self.csv_path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({k: record.get(k, "") for k in CSV_FIELDS})


def _fmt_ms(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


# Above this relative difference from the eager reference in the same dtype, the table flags a
# row: far beyond rounding, so the fast path computed something else.
_SUSPECT_ERR = {"float32": 1e-3, "float64": 1e-8, "bfloat16": 5e-2, "float16": 1e-2}


def format_table(rows: Sequence[dict]) -> str:
    """One line per (op, shape, dtype, mode): each provider's median, its speed-up over the eager
    reference (``x ref``), triton over compile, and the best fast path's roofline fraction. A
    provider whose output differs from the reference's beyond rounding is flagged ``[err ...]``."""
    groups: Dict[tuple, Dict[str, dict]] = {}
    for row in rows:
        groups.setdefault((row["op"], row["shape"], row["dtype"], row["mode"]), {})[row["provider"]] = row
    header = ["op", "shape", "dtype", "mode", "provider ms (x ref)", "triton vs compile", "roofline"]
    lines = [header]
    for (op, shape, dtype, mode), by_provider in groups.items():
        base_name = "dense" if op == "mba" else "reference"
        base = by_provider.get(base_name, {}).get("median_ms")
        cells = []
        for name, row in by_provider.items():
            if row.get("status") != "ok":
                cells.append(f"{name} {row.get('status')}")
                continue
            ratio = f" ({base / row['median_ms']:.2f}x)" if base and name != base_name else ""
            err = row.get("max_rel_err")
            if err is not None and not err <= _SUSPECT_ERR.get(row["dtype"], 1e-3):
                ratio += f" [err {err:.1e}]"
            cells.append(f"{name} {_fmt_ms(row['median_ms'])}{ratio}")
        triton_row, compile_row = by_provider.get("triton", {}), by_provider.get("compile", {})
        if triton_row.get("median_ms") and compile_row.get("median_ms"):
            vs_compile = f"{compile_row['median_ms'] / triton_row['median_ms']:.2f}x"
        else:
            vs_compile = "-"
        # The faster of the fast paths, as the column's heading promises.
        fast = max((by_provider[p] for p in ("triton", "torch") if by_provider.get(p, {}).get("roofline_fraction")),
                   key=lambda row: row["roofline_fraction"], default=None)
        roof = f"{fast['provider']} {100 * fast['roofline_fraction']:.0f}% ({fast['bound']})" if fast else "-"
        lines.append([op, shape, dtype, mode, "; ".join(cells), vs_compile, roof])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    reasons: Dict[tuple, set] = {}
    for r in rows:
        if r.get("status") != "ok":
            reasons.setdefault((r["status"], r["reason"]), set()).add(f"{r['op']}/{r['provider']}")
    if reasons:
        text.append("")
        text += [f"{status} ({', '.join(sorted(where))}): {reason}" for (status, reason), where in reasons.items()]
    return "\n".join(text)


def _progress(row: dict) -> None:
    value = _fmt_ms(row.get("median_ms")) + " ms" if row.get("status") == "ok" else f"{row['status']} ({row['reason']})"
    print(f"  {row['op']:9s} {row['provider']:12s} {row['mode']:16s} {row['shape']:24s} {row['dtype']:8s} {value}",
          flush=True)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run",
                                     description="Benchmark din_fast ops: reference, torch.compile, torch, triton.")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    parser.add_argument("--quick", action="store_true",
                        help="a smaller grid (a few minutes on a 2-core CPU; the default on the CPU)")
    parser.add_argument("--full", action="store_true", help="the full grid on the CPU too (the default on CUDA)")
    parser.add_argument("--out", default="results/bench.jsonl",
                        help="JSON lines appended here, CSV beside it ('' for none)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--dtypes", default="float32", help="comma-separated, e.g. float32,bfloat16")
    parser.add_argument("--providers", default=None,
                        help="comma-separated subset (the eager reference always runs as the baseline)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    parser.add_argument("--activation", default="sigmoid", choices=tuple(roofline.ACTIVATION_FLOPS),
                        help="hidden activation of the attention MLP")
    parser.add_argument("--lengths", choices=("full", "uniform"), default="full",
                        help="attention: every position valid (full), or valid lengths drawn uniformly from "
                             "[1, T] (FLOPs and bytes still count all B x T positions)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 steadies timings on a loaded machine")
    parser.add_argument("--cpu-budget", type=float, default=None,
                        help="seconds of timed loops per CPU measurement (default 1, 0.3 with --quick)")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    ops = [op for op in args.ops.split(",") if op]
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        print(f"unknown op(s) {unknown}; choose from {list(OPS)}", file=sys.stderr)
        return 2
    dtypes = [d for d in args.dtypes.split(",") if d]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        print(f"unknown dtype(s) {bad}; choose from {list(DTYPES)}", file=sys.stderr)
        return 2
    if args.quick and args.full:
        print("--quick and --full exclude each other", file=sys.stderr)
        return 2
    quick = args.quick or (device == "cpu" and not args.full)
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = args.cpu_budget if args.cpu_budget is not None else (0.3 if quick else 1.0)
    config = RunConfig(ops=ops, device=device, quick=quick, dtypes=dtypes, compile=not args.no_compile,
                       providers=args.providers.split(",") if args.providers else None,
                       activation=args.activation, lengths=args.lengths, cpu_budget_s=budget)
    writer = ResultWriter(args.out or None)
    env = environment(device)
    print(f"din_fast benchmarks on {env['device_name']} (torch {env['torch']}, triton {env['triton']}, "
          f"commit {env['commit']})", flush=True)

    def emit(row):
        writer(row)
        _progress(row)

    start = time.perf_counter()
    rows = run_benchmarks(config, emit)
    print()
    print(format_table(rows))
    if args.out:
        print(f"\n{len(rows)} rows appended to {args.out} and {Path(args.out).with_suffix('.csv')} "
              f"in {time.perf_counter() - start:.0f} s")
    return 1 if any(r["status"] == "error" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
