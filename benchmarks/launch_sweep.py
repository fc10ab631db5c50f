"""The attention kernels' launch options swept on a GPU, to measure what the launch rules cost.

``PYTHONPATH=. python -m benchmarks.launch_sweep --out FILE.jsonl`` takes the benchmark's
headline case (attention pooling, B=4096 T=100 D=36, hidden (80, 40), sigmoid, every position
valid) in float32 and bfloat16 and runs it under other launch options than the shipped rules
(``_forward_config``, ``_backward_launches``) pick:

* forward: tile rows ``BLOCK_T`` in {16, 32, 64, 128}, the sample's fold held (``BD = DP``) or
  built in D chunks, 4 or 8 warps;
* backward (after the shipped forward): tile rows in {16, 32, 64}, 4 or 8 warps, 2 or 8
  programs per multiprocessor; the passes and their chunks as shipped;
* float32 with plain TF32 products instead of 3xTF32, each pass as shipped;
* another design, ``benchmarks/attention_chunked.py`` (the first layer in chunks of its
  channels recomputed from the keys, no scratch memory, partial sums by atomic adds to buffers
  each program owns): its forward on 32 to 128 rows per tile, its backward on 32 or 64 rows,
  chunks of 16 or 32 channels, 4 or 8 warps, 2 or 4 programs per multiprocessor, and register
  limits that trade spills for programs per multiprocessor (18 options a dtype).

Per (dtype, pass) the shipped launch comes first, then the other design, then the launch
options. Each variant's outputs (pooled, and every gradient for the backward) are compared with
the shipped launch's, then timed with CUDA events; one JSON line per variant holds the median,
the speed-up over the shipped launch, the largest relative difference, whether a second run
gave bit-identical results, and the registers and spills of the kernels it compiled. Triton
compiles each variant on first use, one at a time per process, so ``--jobs`` processes compile
them first on a small batch, for at most ``--compile-budget`` seconds (Triton's on-disk cache
then serves the timing process).
``--dry-run`` runs a few variants on tiny shapes under Triton's interpreter (CPU), so that CI
exercises the script.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import itertools
import json
import multiprocessing
import os
import sys
import time
from typing import Dict, Iterator, List, Optional, Sequence

HIDDEN = (80, 40)
FULL_SHAPE = dict(B=4096, T=100, D=36)
# The compiling processes' batch: the kernels are specialized on no argument's value, so any
# batch compiles the variant the full shape launches.
COMPILE_SHAPE = dict(B=8, T=100, D=36)
TINY_SHAPE = dict(B=3, T=9, D=36)


def variants(dry_run: bool) -> List[dict]:
    """Every variant, the shipped launch first per (dtype, pass); a variant names the options it
    changes."""
    dtypes = ("float32",) if dry_run else ("float32", "bfloat16")
    forward = [(16, "chunk", 8), (32, "hold", 4)] if dry_run else itertools.product(
        (16, 32, 64, 128), ("hold", "chunk"), (4, 8))
    backward = [(16, 8, 2), (32, 4, 2)] if dry_run else itertools.product((16, 32, 64), (4, 8), (2, 8))
    # The other design: (rows per tile, channels per chunk, warps[, programs per multiprocessor],
    # register limit); its backward runs after its forward on 64 rows, 16-channel chunks, 4 warps.
    # First the options with the fewest spills under Triton 3.6 (benchmarks/README.md), then
    # register limits that allow 3 or 4 programs of 4 warps per multiprocessor, spilling: is
    # occupancy worth the spills?
    chunked = [(16, 16, 4, None)] if dry_run else [(32, 16, 4, None), (32, 32, 4, None), (32, 16, 8, None),
                                                  (64, 16, 4, None), (64, 16, 8, None), (128, 16, 8, None),
                                                  (32, 16, 4, 128), (64, 16, 4, 168)]
    chunked_backward = [(16, 16, 4, 2, 128)] if dry_run else [
        (b, h, w, p, None) for b, h, w in ((32, 16, 8), (32, 32, 8), (32, 16, 4), (64, 16, 8)) for p in (2, 4)] + [
        (32, 16, 4, 4, 128), (32, 16, 4, 3, 168)]
    forward, backward = list(forward), list(backward)
    found = []
    for dtype in dtypes:
        found.append(dict(dtype=dtype, kind="forward", shipped=True))
        found += [dict(dtype=dtype, kind="forward", design="chunked", block_t=b, h_chunk=h, num_warps=w, maxnreg=r)
                  for b, h, w, r in chunked]
        found += [dict(dtype=dtype, kind="forward", block_t=b, fold=f, num_warps=w) for b, f, w in forward]
        found.append(dict(dtype=dtype, kind="backward", shipped=True))
        found += [dict(dtype=dtype, kind="backward", design="chunked", block_t=b, h_chunk=h, num_warps=w,
                       programs_per_sm=p, maxnreg=r) for b, h, w, p, r in chunked_backward]
        found += [dict(dtype=dtype, kind="backward", block_t=b, num_warps=w, programs_per_sm=p)
                  for b, w, p in backward]
        if dtype == "float32":
            # Plain TF32 products instead of 3xTF32 (about 1e-3 relative error; the launch rules
            # then take their 16-bit choices): what fp32 accuracy costs.
            found += [dict(dtype=dtype, kind=kind, tf32=True) for kind in ("forward", "backward")]
    return found


@contextlib.contextmanager
def launched_as(variant: dict) -> Iterator[None]:
    """The attention launchers use ``variant``'s options for the duration."""
    import torch

    from din_fast.kernels import attention as kernels
    saved = {name: getattr(kernels, name) for name in (
        "_forward_config", "_backward_launches", "_num_backward_programs", "_BACKWARD_BLOCK_T", "_common_constexprs")}
    if "block_t" in variant and variant["kind"] == "forward" and "design" not in variant:
        def forward_config(constexprs, seq_len, dtype, statistics=False):
            shipped = saved["_forward_config"](constexprs, seq_len, dtype, statistics)
            chunk = constexprs["DP"] if variant["fold"] == "hold" else kernels._first_layer_chunk(constexprs["DP"])
            return shipped._replace(block_t=min(variant["block_t"], kernels._padded(seq_len)), chunk=chunk,
                                    num_warps=variant["num_warps"])
        kernels._forward_config = forward_config
    if "block_t" in variant and variant["kind"] == "backward" and "design" not in variant:
        def backward_launches(constexprs, dice_mode):
            return [launch._replace(num_warps=variant["num_warps"])
                    for launch in saved["_backward_launches"](constexprs, dice_mode)]

        def num_backward_programs(batch, device):
            if device.type != "cuda":
                return saved["_num_backward_programs"](batch, device)
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            return min(batch, variant["programs_per_sm"] * sms)
        kernels._backward_launches = backward_launches
        kernels._num_backward_programs = num_backward_programs
        kernels._BACKWARD_BLOCK_T = variant["block_t"]
    if variant.get("tf32"):
        def common_constexprs(*args, **kwargs):
            return dict(saved["_common_constexprs"](*args, **kwargs), IEEE=False)
        kernels._common_constexprs = common_constexprs
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(kernels, name, value)


def make_runner(shape: dict, dtype_name: str, device: str):
    """``run_of(variant)``: the closure that runs ``variant`` on one set of inputs, returning the
    pooled output and, for the backward, every gradient."""
    import torch

    from din_fast import functional

    from . import attention_chunked
    from .run import attention_params
    dtype = getattr(torch, dtype_name)
    generator = torch.Generator(device="cpu").manual_seed(0)
    batch, seq_len, dim = shape["B"], shape["T"], shape["D"]
    query = torch.randn(batch, dim, generator=generator).to(device, dtype)
    keys = torch.randn(batch, seq_len, dim, generator=generator).to(device, dtype)
    grad_pooled = torch.randn(batch, dim, generator=generator).to(device, dtype)
    torch.manual_seed(0)
    weights, biases, _ = attention_params(dim, HIDDEN, "sigmoid", dtype, device)
    leaves = [t.requires_grad_() for t in (query, keys, *weights, *biases)]

    def forward():
        with torch.no_grad():
            return [functional.attention_pooling(query, keys, weights, biases, backend="triton")[0]]

    def forward_backward():
        pooled, _ = functional.attention_pooling(query, keys, weights, biases, backend="triton")
        return [pooled, *torch.autograd.grad(pooled, leaves, grad_pooled)]

    def run_of(variant):
        if variant.get("design") != "chunked":
            return forward if variant["kind"] == "forward" else forward_backward
        tile = dict(block_t=variant["block_t"], h_chunk=variant["h_chunk"], num_warps=variant["num_warps"])

        def chunked_forward():
            with torch.no_grad():
                return [attention_chunked.attention_forward(query, keys, weights, biases, **tile,
                                                            max_registers=variant["maxnreg"])[0]]

        def chunked_forward_backward():
            sms = torch.cuda.get_device_properties(device).multi_processor_count if device == "cuda" else 1
            with torch.no_grad():
                return attention_chunked.attention_forward_backward(
                    query, keys, weights, biases, grad_pooled, backward_block_t=tile["block_t"],
                    backward_h_chunk=tile["h_chunk"], backward_warps=tile["num_warps"],
                    backward_max_registers=variant["maxnreg"], programs=variant["programs_per_sm"] * sms)
        return chunked_forward if variant["kind"] == "forward" else chunked_forward_backward
    return run_of


def _kernels(variant: dict) -> list:
    """The JIT kernels ``variant`` launches (for their registers and spills)."""
    from din_fast.kernels import attention as kernels

    from . import attention_chunked
    if variant.get("design") == "chunked":
        return [attention_chunked._chunked_fwd_kernel] + (
            [attention_chunked._chunked_bwd_kernel] if variant["kind"] == "backward" else [])
    return [kernels._din_attention_fwd_kernel if variant["kind"] == "forward" else kernels._din_attention_bwd_kernel]


def compile_variant(variant: dict, device: str) -> Optional[str]:
    """Runs ``variant`` once on ``COMPILE_SHAPE``, compiling it; an error message or None."""
    run = make_runner(COMPILE_SHAPE, variant["dtype"], device)(variant)
    try:
        with launched_as(variant):
            run()
    except Exception as err:  # reported per variant; the others still run
        return f"{type(err).__name__}: {err}"
    return None


def precompile(todo: Sequence[dict], device: str, jobs: int, budget_s: float) -> Dict[int, str]:
    """Compiles the variants in ``jobs`` processes, in order, for at most ``budget_s`` seconds
    (the timing process compiles any left); returns the errors by variant index."""
    start = time.perf_counter()
    pool = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
    futures = {pool.submit(compile_variant, variant, device): i for i, variant in enumerate(todo)}
    done, _ = concurrent.futures.wait(futures, timeout=budget_s)
    # A variant still compiling is left to finish in the background.
    pool.shutdown(wait=False, cancel_futures=True)
    print(f"compiled {len(done)} of {len(todo)} variants in {time.perf_counter() - start:.0f} s with {jobs} "
          f"processes", flush=True)
    errors = {}
    for future in done:
        error = future.exception()  # a worker that died (a broken pool), not a failed compile
        error = f"{type(error).__name__}: {error}" if error else future.result()
        if error:
            errors[futures[future]] = error
    return errors


def _rel_diff(actual, expected) -> float:
    actual, expected = actual.double(), expected.double()
    if not actual.isfinite().all():
        return float("nan")
    return ((actual - expected).norm() / expected.norm().clamp(min=1e-30)).item()


def sweep(out_path: str, dry_run: bool, jobs: int, compile_budget_s: float, budget_s: float) -> List[dict]:
    import torch

    from .gpu_check import compiled_resources
    from .run import cpu_time_interleaved, cuda_time
    device = "cpu" if dry_run else "cuda"
    shape = TINY_SHAPE if dry_run else FULL_SHAPE
    todo = variants(dry_run)
    compile_errors = precompile(todo, device, jobs, compile_budget_s) if jobs > 1 else {}
    deadline = time.perf_counter() + budget_s
    rows, shipped = [], {}
    runners = {dtype: make_runner(shape, dtype, device) for dtype in {v["dtype"] for v in todo}}
    with open(out_path, "w") as handle:
        for index, variant in enumerate(todo):
            row = dict(variant, shape=shape)
            if time.perf_counter() > deadline:
                # Written, so that the file says which variants the budget left out.
                row["skipped"] = f"timing budget of {budget_s:.0f} s spent"
                rows.append(row)
                handle.write(json.dumps(row) + "\n")
                print(format_row(row), flush=True)
                continue
            run = runners[variant["dtype"]](variant)
            kernels = _kernels(variant)
            compiled_before = [len(compiled_resources(kernel)) for kernel in kernels]
            key = (variant["dtype"], variant["kind"])
            try:
                with launched_as(variant):
                    results = [t.detach().clone() for t in run()]
                    if device == "cuda":
                        row["median_ms"] = cuda_time(run)[0]
                    else:
                        row["median_ms"] = cpu_time_interleaved([run], budget_s=0.0, min_repeats=1)[0][0]
                    row["bitwise_repeatable"] = all(torch.equal(a, b) for a, b in zip(run(), results))
            except Exception as err:  # reported per variant; the others still run
                row["error"] = compile_errors.get(index) or f"{type(err).__name__}: {err}"
            else:
                if variant.get("shipped"):
                    shipped[key] = (results, row["median_ms"])
                if key in shipped:
                    reference, reference_ms = shipped[key]
                    row["max_rel_diff"] = max(_rel_diff(a, e) for a, e in zip(results, reference))
                    row["speedup_over_shipped"] = reference_ms / row["median_ms"]
                    row["compiled"] = [resources for kernel, before in zip(kernels, compiled_before)
                                       for resources in compiled_resources(kernel)[before:]]
                else:
                    row["error"] = "the shipped launch failed: nothing to compare with"
            rows.append(row)
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            print(format_row(row), flush=True)
    return rows


def format_row(row: dict) -> str:
    if row.get("shipped"):
        options = "shipped"
    elif row.get("tf32"):
        options = "TF32 products"
    elif row.get("design") == "chunked":
        options = f"chunked BLOCK_T={row['block_t']} HC={row['h_chunk']} warps={row['num_warps']}"
        if row["kind"] == "backward":
            options += f" programs/SM={row['programs_per_sm']}"
        if row["maxnreg"]:
            options += f" maxnreg={row['maxnreg']}"
    elif row["kind"] == "forward":
        options = f"BLOCK_T={row['block_t']} fold={row['fold']} warps={row['num_warps']}"
    else:
        options = f"BLOCK_T={row['block_t']} warps={row['num_warps']} programs/SM={row['programs_per_sm']}"
    if "skipped" in row:
        return f"{row['dtype']:9s} {row['kind']:9s} {options:40s} skipped: {row['skipped']}"
    if "error" in row:
        return f"{row['dtype']:9s} {row['kind']:9s} {options:40s} error: {row['error'][:200]}"
    spills = max((k.get("spills", 0) for k in row["compiled"]), default=0)
    return (f"{row['dtype']:9s} {row['kind']:9s} {options:40s} {row['median_ms']:8.3f} ms "
            f"({row['speedup_over_shipped']:.2f}x shipped), rel. diff {row['max_rel_diff']:.1e}, "
            f"max spills {spills}{'' if row['bitwise_repeatable'] else ', NOT bitwise repeatable'}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.launch_sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON lines file, one row per variant")
    parser.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1),
                        help="processes that compile the variants first (1: compile while timing)")
    parser.add_argument("--compile-budget", type=float, default=120.0,
                        help="seconds for the compiling processes; the timing process compiles what they left")
    parser.add_argument("--budget", type=float, default=240.0, help="seconds for timing; later variants are skipped")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter")
    args = parser.parse_args(argv)
    if args.dry_run:
        # Must precede the first import of triton.
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        import torch
        if not torch.cuda.is_available():
            print("launch_sweep: no CUDA device (use --dry-run on the CPU)", file=sys.stderr)
            return 2
    rows = sweep(args.out, args.dry_run, 1 if args.dry_run else args.jobs, args.compile_budget, args.budget)
    return 0 if rows and all("error" not in row for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
