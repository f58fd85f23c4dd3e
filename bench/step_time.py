"""Time one optimizer step: WaveAdam / WaveSGD on each available path against torch's Adam / SGD.

    python bench/step_time.py --sizes 1e6,1e7,5e7 --threads 2 --repeats 15

For every size and layout ("single": one tensor; "model": a transformer-shaped set of 146
tensors, 12 blocks of attention and MLP weights, biases and norms), all contenders step the
same parameters and gradients side by side in one process, round robin in a fresh random
order each round (a contender right after one that frees gigabytes of temporaries runs
slower; no contender should always be that one), so that a busy machine slows them alike.
Each row reports the median of ``--repeats`` timed steps, after ``buffer_size + 2`` untimed
ones (the history is full: the filter runs with the library's default options):

- ms/step and the ratio to torch's fused Adam (SGD rows: torch's fused SGD);
- bytes moved per step: the least traffic the step needs (reads of p, grad, state and the
  N-1 older history slots, writes of p, state and the newest slot), and the GB/s that
  this amounts to at the measured time (a foreach path moves more than that, which is why
  it is slower);
- optimizer-state bytes per parameter;
- peak extra memory of one step (``--memory``): resident-set growth during a step beyond
  what the process held before it (Linux only), i.e. the temporaries a path allocates.

Timing: CUDA events on a GPU (``--device cuda``), ``time.perf_counter`` on the CPU. The JSON
(``--out``) holds the rows and the machine's description. ``--first-step`` also measures the
first step of the fused CPU kernel in fresh processes, with a cold and a warm kernel cache.

Contenders (those that cannot run here are left out):
``torch fused`` / ``torch foreach``: torch.optim.Adam / SGD.
``wave single`` / ``wave foreach``: WaveAdam(foreach=False / True), the eager single- and
multi-tensor filter with torch's single-tensor / foreach update.
``wave fused``: WaveAdam(fused=True), whatever the optimizer dispatches to on this device.
``wave cpu:c`` / ``wave cpu:torch``: ``waveguard_optim.kernels.cpu_step`` called directly
with ``backend=`` c or torch, history claimed as the optimizer does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from waveguard_optim import WaveAdam, WaveSGD
from waveguard_optim.denoise import claim_histories
from waveguard_optim.kernels.native_check import native_check
from waveguard_optim.options import WAVE_DEFAULTS

ROOT = Path(__file__).resolve().parent.parent


# --- parameters ------------------------------------------------------------------------------


def model_shapes(total: int, blocks: int = 12) -> list[tuple[int, ...]]:
    """A transformer-like set of about ``total`` parameters: per block qkv, out, fc1, fc2
    weights and their biases, two norms (weight and bias); a final norm. 12 blocks -> 146 tensors."""
    d = max(4, round(math.sqrt(total / (12 * blocks))))
    shapes: list[tuple[int, ...]] = []
    for _ in range(blocks):
        shapes += [(3 * d, d), (3 * d,), (d, d), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
        shapes += [(d,), (d,), (d,), (d,)]
    return shapes + [(d,), (d,)]


def make_params(total: int, layout: str, device: str, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(total,)] if layout == "single" else model_shapes(total)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen).mul_(0.02).to(device))
        p.grad = torch.randn(shape, generator=gen).to(device)
        params.append(p)
    return params


# --- contenders ------------------------------------------------------------------------------


def kernel_step(algo: str, params: list[torch.Tensor], backend: str, wave: dict[str, Any], hyper: dict[str, Any]) -> Callable[[], None]:
    """A step closure around ``cpu_step.fused_wave_*_`` with its own state, as the optimizer would keep it."""
    from waveguard_optim.kernels import cpu_step

    states: list[dict[str, Any]] = [{} for _ in params]
    grads = [p.grad for p in params]
    buffer = dict(buffer_size=wave["buffer_size"], buffer_dtype=wave["buffer_dtype"])
    filt = dict(decay=wave["decay"], threshold_scale=wave["threshold_scale"], snr_gate=wave["snr_gate"])

    def step() -> None:
        with torch.no_grad():
            histories, full = claim_histories(params, states, **buffer)
            if algo == "adam":
                for p, st in zip(params, states):
                    if "step" not in st:
                        st.update(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p), step=torch.zeros(()))
                cpu_step.fused_wave_adam_(
                    params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
                    [s["step"] for s in states], histories, full, **filt, amsgrad=False, beta1=hyper["betas"][0],
                    beta2=hyper["betas"][1], lr=hyper["lr"], weight_decay=0.0, eps=1e-8, maximize=False,
                    decoupled_weight_decay=False, backend=backend,
                )  # fmt: skip
            else:
                buffers = [s.get("momentum_buffer") for s in states]
                cpu_step.fused_wave_sgd_(
                    params, grads, buffers, histories, full, **filt, weight_decay=0.0, momentum=hyper["momentum"],
                    lr=hyper["lr"], dampening=0.0, nesterov=False, maximize=False, backend=backend,
                )  # fmt: skip
                for s, b in zip(states, buffers):
                    s["momentum_buffer"] = b

    return step


def contenders(algo: str, params: list[torch.Tensor], device: str, wave: dict[str, Any], paths: set[str]) -> dict[str, Callable[[], None]]:
    out: dict[str, Callable[[], None]] = {}
    if algo == "adam":
        hyper: dict[str, Any] = dict(lr=1e-3, betas=(0.9, 0.999))
        torch_cls, wave_cls = torch.optim.Adam, WaveAdam
    else:
        hyper = dict(lr=1e-3, momentum=0.9)
        torch_cls, wave_cls = torch.optim.SGD, WaveSGD

    def add(name: str, make: Callable[[], Callable[[], None]]) -> None:
        if name not in paths:
            return
        try:
            step = make()
            step()  # fails here if the path cannot run on this machine
        except (RuntimeError, ValueError, ImportError) as err:
            print(f"  (skipping {name}: {str(err).splitlines()[0][:120]})", file=sys.stderr)
            return
        out[name] = step

    add("torch fused", lambda: torch_cls(params, fused=True, **hyper).step)
    add("torch foreach", lambda: torch_cls(params, foreach=True, **hyper).step)
    add("wave single", lambda: wave_cls(params, foreach=False, **wave, **hyper).step)
    add("wave foreach", lambda: wave_cls(params, foreach=True, **wave, **hyper).step)
    add("wave fused", lambda: wave_cls(params, fused=True, **wave, **hyper).step)
    if device == "cpu":
        from waveguard_optim.kernels import cpu_step

        if cpu_step.cpu_fused_available():
            add("wave cpu:c", lambda: kernel_step(algo, params, "c", wave, hyper))
        add("wave cpu:torch", lambda: kernel_step(algo, params, "torch", wave, hyper))
    return out


# --- measuring -------------------------------------------------------------------------------


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def peak_extra_bytes(step: Callable[[], None]) -> int | None:
    """Resident memory a step adds at its peak (Linux: reset VmHWM, step, read it back)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    before = _rss_kib("VmRSS")
    step()
    return max(0, _rss_kib("VmHWM") - before) * 1024


def timer(device: str) -> Callable[[Callable[[], None]], float]:
    if device.startswith("cuda"):
        def cuda_time(step: Callable[[], None]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        return cuda_time

    def cpu_time(step: Callable[[], None]) -> float:
        start = time.perf_counter()
        step()
        return time.perf_counter() - start

    return cpu_time


def bytes_per_param(algo: str, name: str, n: int, p_bytes: int, slot_bytes: int) -> tuple[int, int]:
    """(least bytes moved per parameter per step, optimizer-state bytes per parameter)."""
    if algo == "adam":  # read p, g, m, v; write p, m, v
        moved, state = 7 * p_bytes, 2 * p_bytes
    else:  # SGD with momentum: read p, g, buf; write p, buf
        moved, state = 5 * p_bytes, p_bytes
    if name.startswith("wave"):  # read N-1 older slots, write the newest
        moved += n * slot_bytes
        state += n * slot_bytes
    return moved, state


def bench_one(algo: str, total: int, layout: str, args: argparse.Namespace, paths: set[str]) -> list[dict[str, Any]]:
    params = make_params(total, layout, args.device)
    numel = sum(p.numel() for p in params)
    wave = dict(WAVE_DEFAULTS, buffer_size=args.buffer_size, buffer_dtype=args.buffer_dtype)  # the library's filter options
    steps = contenders(algo, params, args.device, wave, paths)
    measure = timer(args.device)
    for step in steps.values():  # warm-up: the history fills, every path reaches its steady state
        for _ in range(args.buffer_size + 1):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    order, shuffle = list(steps), random.Random(0).shuffle
    for _ in range(args.repeats):
        shuffle(order)
        for name in order:
            times[name].append(measure(steps[name]))
    memory = {name: peak_extra_bytes(step) for name, step in steps.items()} if args.memory and args.device == "cpu" else {}

    base_name = "torch fused" if "torch fused" in times else next(iter(times), None)
    base = statistics.median(times[base_name]) if base_name else float("nan")
    p_bytes = params[0].element_size()
    slot_bytes = torch.empty((), dtype=args.buffer_dtype or params[0].dtype).element_size()
    rows = []
    for name, ts in times.items():
        median = statistics.median(ts)
        moved, state = bytes_per_param(algo, name, args.buffer_size, p_bytes, slot_bytes)
        rows.append(
            dict(
                algo=algo, layout=layout, tensors=len(params), params=numel, path=name, ms=median * 1e3,
                ms_min=min(ts) * 1e3, ratio=median / base, bytes_moved=moved * numel, gb_per_s=moved * numel / median / 1e9,
                state_bytes_per_param=state, peak_extra_bytes=memory.get(name), buffer_size=args.buffer_size, decay=wave["decay"],
                buffer_dtype=str(args.buffer_dtype or params[0].dtype).replace("torch.", ""), repeats=args.repeats,
            )
        )  # fmt: skip
    del steps, params
    return rows


def first_step_times(buffer_size: int) -> dict[str, Any]:
    """Seconds to the end of the first fused CPU step in a fresh process: cold kernel cache
    (compiles), then warm (loads the cached shared library)."""
    code = (
        "import time\n"
        "import torch\n"
        "from waveguard_optim.kernels import cpu_step\n"
        "p = torch.randn(1000); g = torch.randn(1000)\n"
        "from waveguard_optim.denoise import claim_histories\n"
        "from waveguard_optim.options import WAVE_DEFAULTS\n"
        "st = {}; h, full = claim_histories([p], [st], buffer_size=%d, buffer_dtype=None)\n" % buffer_size
        + "start = time.perf_counter()\n"
        "cpu_step.fused_wave_adam_([p], [g], [torch.zeros(1000)], [torch.zeros(1000)], [], [torch.zeros(())], h, [True],"
        " decay=WAVE_DEFAULTS['decay'], threshold_scale=1.0, snr_gate=True, amsgrad=False, beta1=0.9, beta2=0.999, lr=1e-3,"
        " weight_decay=0.0, eps=1e-8, maximize=False, decoupled_weight_decay=False, backend='c')\n"
        "print(time.perf_counter() - start)\n"
    )
    out: dict[str, Any] = {"buffer_size": buffer_size}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, WAVEGUARD_CACHE_DIR=cache)
        for label in ("cold", "warm"):
            res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
            if res.returncode != 0:
                out[label] = f"failed: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}"
                continue
            out[label] = dict(first_step_s=round(float(res.stdout), 3))
    return out


# --- output ----------------------------------------------------------------------------------


def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'algo':5} {'layout':6} {'tensors':>7} {'params':>9} {'path':16} {'ms/step':>9} {'min ms':>8} {'ratio':>6} {'MB moved':>9} {'GB/s':>6} {'state B/p':>9} {'peak extra MB':>13}"
    lines = [head, "-" * len(head)]
    for r in rows:
        peak = "" if r["peak_extra_bytes"] is None else f"{r['peak_extra_bytes'] / 2**20:.1f}"
        lines.append(
            f"{r['algo']:5} {r['layout']:6} {r['tensors']:>7} {r['params']:>9.2e} {r['path']:16} {r['ms']:>9.2f} {r['ms_min']:>8.2f} "
            f"{r['ratio']:>6.2f} {r['bytes_moved'] / 1e6:>9.1f} {r['gb_per_s']:>6.1f} {r['state_bytes_per_param']:>9} {peak:>13}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1e6,1e7,5e7", help="parameter counts, comma separated")
    parser.add_argument("--layouts", default="model,single", help="model (146 tensors) and/or single (one tensor)")
    parser.add_argument("--algos", default="adam,sgd")
    parser.add_argument("--paths", default="torch fused,torch foreach,wave single,wave foreach,wave fused,wave cpu:c,wave cpu:torch")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (the CPU kernel uses as many)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--buffer-size", type=int, default=8)
    parser.add_argument("--buffer-dtype", default=None, choices=[None, "float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory probe")
    parser.add_argument("--first-step", action="store_true", help="also time the first fused CPU step, cold and warm cache")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "step_time.json"))
    args = parser.parse_args(argv)
    args.buffer_dtype = getattr(torch, args.buffer_dtype) if args.buffer_dtype else None
    torch.set_num_threads(args.threads)
    paths = {p.strip() for p in args.paths.split(",")}
    native = native_check(wait=True) is not None  # a fused step's plan is checked in C++ where it can be

    rows: list[dict[str, Any]] = []
    for size in (int(float(s)) for s in args.sizes.split(",")):
        for layout in args.layouts.split(","):
            for algo in args.algos.split(","):
                block = bench_one(algo, size, layout, args, paths)
                print(table(block), flush=True)
                print(flush=True)
                rows += block
    result: dict[str, Any] = dict(
        command=" ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        machine=dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count(), threads=args.threads,
                     torch=torch.__version__, device=args.device, native_check=native),
        rows=rows,
    )  # fmt: skip
    if args.first_step and args.device == "cpu":
        result["first_step"] = [first_step_times(n) for n in sorted({8, args.buffer_size, 64})]
        print(json.dumps(result["first_step"], indent=1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
