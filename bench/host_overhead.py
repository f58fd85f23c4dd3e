"""Host time per optimizer step on many tiny tensors: what the fused step costs besides its math.

    python bench/host_overhead.py                 # 146 / 1,000 / 10,000 tensors, ~10 min on 2 cores
    python bench/host_overhead.py --quick         # a smoke run: 146 and 1,000 tensors, few repeats
    python bench/host_overhead.py --python-check  # plans checked in Python (no C++ compiler or headers)

On a GPU the fused step of a model with hundreds of small tensors is bound by its Python, not
by memory. This measures that Python on the CPU, where it can be measured without a GPU:

- ``wave fused (cpu)``: the optimizer's default step on CPU tensors (the fused CPU step);
- ``wave triton (stub)``: the optimizer's Triton path on CPU tensors with the kernel launch
  replaced by a no-op (``_wave_*_kernel[grid](...)`` does nothing), i.e. every host-side
  check, table and bookkeeping of the CUDA path without the kernel;
- ``torch fused`` / ``torch foreach``: torch.optim.Adam / SGD (momentum 0.9) on the same shapes.

Tensors are transformer-shaped (``step_time.model_shapes`` with width 8: 12 per block, up to
256 elements each), so the math is negligible and a step's time is its host overhead. All
contenders of a size step side by side in one process, round robin in a fresh random order
each round, after ``buffer_size + 2`` untimed steps (the history is full); each row is the
median of the timed steps, with its ratio to torch's fused step of the same optimizer. The
native step-plan check is built (or loaded from its cache) before anything is timed; the JSON
says whether it was (``native_check``), since without it the plan is confirmed in Python;
``--python-check`` times that fallback on purpose.
``--threads`` (default 1) is ``torch.set_num_threads``. JSON: ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from waveguard_optim import WaveAdam, WaveSGD
from waveguard_optim.kernels import plan as plan_module
from waveguard_optim.kernels.native_check import native_check, native_check_error

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import model_shapes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WIDTH = 8
HYPER = dict(adam=dict(lr=1e-3, betas=(0.9, 0.999)), sgd=dict(lr=1e-3, momentum=0.9))
TORCH_CLS = dict(adam=torch.optim.Adam, sgd=torch.optim.SGD)
WAVE_CLS = dict(adam=WaveAdam, sgd=WaveSGD)


def shapes(count: int) -> list[tuple[int, ...]]:
    """``count`` transformer-shaped tensors of width ``WIDTH`` (146 is exactly 12 blocks)."""
    blocks = max(1, math.ceil((count - 2) / 12))
    return model_shapes(12 * blocks * WIDTH * WIDTH, blocks)[:count]


def make_params(count: int, seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes(count):
        p = torch.nn.Parameter(torch.randn(shape, generator=gen).mul_(0.02))
        p.grad = torch.randn(shape, generator=gen)
        params.append(p)
    return params


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` does nothing."""

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def triton_stubbed() -> Iterator[None]:
    """The optimizer's Triton path on CPU tensors with its launches replaced by no-ops."""
    from waveguard_optim import base
    from waveguard_optim.kernels import triton_step

    saved = [(base, "fused_backend", base.fused_backend)]
    saved += [(triton_step, name, getattr(triton_step, name)) for name in ("triton_available", "_wave_adam_kernel", "_wave_sgd_kernel")]
    base.fused_backend = lambda device: triton_step
    triton_step.triton_available = lambda device: True
    triton_step._wave_adam_kernel = triton_step._wave_sgd_kernel = _NoLaunch()
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def contenders(algo: str, count: int, triton: bool) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """name -> (step, context it runs in); each contender has its own parameters (same values)."""
    hyper = HYPER[algo]
    out: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
        "torch fused": (TORCH_CLS[algo](make_params(count, 0), fused=True, **hyper).step, contextlib.nullcontext),
        "torch foreach": (TORCH_CLS[algo](make_params(count, 0), foreach=True, **hyper).step, contextlib.nullcontext),
        "wave fused (cpu)": (WAVE_CLS[algo](make_params(count, 0), **hyper).step, contextlib.nullcontext),
    }
    if triton:
        out["wave triton (stub)"] = (WAVE_CLS[algo](make_params(count, 0), fused=True, **hyper).step, triton_stubbed)
    return out


def measure(algo: str, count: int, repeats: int, triton: bool, seed: int) -> dict[str, float]:
    """Median seconds per step of each contender, interleaved in a random order per round."""
    steps = contenders(algo, count, triton)
    for step, context in steps.values():
        with context():
            for _ in range(10):  # buffer_size 8 + 2: the history is full
                step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    rng = random.Random(seed)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            step, context = steps[name]
            with context():
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def triton_importable() -> bool:
    try:
        from waveguard_optim.kernels import triton_step
    except ImportError:
        return False
    return triton_step.triton is not None


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="146,1000,10000", help="tensor counts, comma-separated")
    parser.add_argument("--repeats", default="31,15,7", help="timed steps per contender, one per count (or one for all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="smoke run: 146 and 1,000 tensors, 5 repeats")
    parser.add_argument("--python-check", action="store_true", help="confirm plans in Python, as where the native check cannot be built")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "host_overhead.json"))
    args = parser.parse_args()
    counts = [146, 1000] if args.quick else [int(float(c)) for c in args.counts.split(",")]
    repeats = [5] if args.quick else [int(r) for r in args.repeats.split(",")]
    repeats = repeats * len(counts) if len(repeats) == 1 else repeats
    torch.set_num_threads(args.threads)
    triton = triton_importable()
    native = native_check(wait=True) is not None and not args.python_check
    if args.python_check:
        plan_module.native_check = lambda wait=False: None
    elif not native:
        print(f"(no native step-plan check: {native_check_error()}; the plan is confirmed in Python)", file=sys.stderr)
    if not triton:
        print("(triton is not installed: no 'wave triton (stub)' rows)", file=sys.stderr)

    rows = []
    print(f"{'tensors':>8} {'algo':>5} {'contender':>20} {'ms/step':>10} {'x torch fused':>14}")
    for count, reps in zip(counts, repeats):
        for algo in ("adam", "sgd"):
            medians = measure(algo, count, reps, triton, seed=count)
            for name, seconds in medians.items():
                ratio = seconds / medians["torch fused"]
                rows.append(dict(tensors=count, algo=algo, contender=name, ms=seconds * 1e3, ratio=ratio, repeats=reps))
                print(f"{count:>8} {algo:>5} {name:>20} {seconds * 1e3:>10.3f} {ratio:>14.2f}", flush=True)
    result = dict(
        command=" ".join(["python", "bench/host_overhead.py", *sys.argv[1:]]),
        commit=git_commit(),
        torch=torch.__version__,
        python=platform.python_version(),
        machine=platform.machine(),
        threads=args.threads,
        width=WIDTH,
        native_check=native,
        rows=rows,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
