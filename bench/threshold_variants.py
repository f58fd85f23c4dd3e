"""Two refinements of WaveAdam's threshold, tried as issue 10 allows, against Adam and WaveAdam v2.

SPEC v2's threshold is tau = kappa * gamma * T (T the universal threshold from the finest Haar
level, gamma the SNR gate). The two variants change only how the gate scales T:

- "quiet" (gamma^2): tau = kappa * gamma^2 * T. Where the signal is clean gamma is small and
  gamma^2 smaller still, so the filter is quieter where version 2 still costs 1.23x Adam's loss
  (`clean`); under strong noise (gamma near 1) it is version 2.
- "full" (min(1, 2 gamma)): tau = kappa * min(1, 2 gamma) * T, the issue's example: the full
  universal threshold as soon as the noise share reaches one half, for the noisy tasks.

Both are patched into the foreach filter (`waveguard_optim.filter._tau`) inside this script
(no library change), and every WaveAdam here runs the eager path (`foreach=True`) so that the
patched filter is the one that runs; WaveAdam v2 runs the same path unpatched. Before training,
`check_patch` makes sure the patch is used: a huge tau must turn WaveAdam into the window mean.

Tasks, seeds and the lr tuning are bench/quality.py's (its `evaluate`: tuning seeds 1000-1004,
4-point grids widened while the best lr is at an edge); results go to
bench/results/quality/threshold_variants.json.

    python bench/threshold_variants.py             # clean, regression, jumps; 10 seeds: 5 min (2 workers, loaded 2-vCPU)
    python bench/threshold_variants.py --tasks regression --seeds 3 --steps-scale 0.2   # smoke test
"""
import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from unittest import mock

import torch

import quality  # bench/ is on sys.path when run as a script
from quality import Opt, ci_verdict, finite_or_str, fmt_lr, fmt_mean_ci, markdown, mean_ci, wins_ties_losses
from quality_tasks import TASKS
from waveguard_optim import WaveAdam, filter as wave_filter

TASK_NAMES = ("clean", "regression", "jumps")
GATES = {  # name -> gamma (a tensor list) -> the factor that replaces gamma in tau = kappa * gamma * T
    "quiet γ²": lambda g: torch._foreach_mul(g, g),
    "full min(1,2γ)": lambda g: torch._foreach_clamp_max(torch._foreach_mul(g, 2.0), 1.0),
    "huge τ (patch check)": lambda g: [torch.full_like(x, 1e6) for x in g],
}
VARIANTS = ("quiet γ²", "full min(1,2γ)")


def eager_wave_adam(p, lr, steps=None, decay=0.0):
    """WaveAdam on the eager foreach path, the one that runs the (patched) filter."""
    return WaveAdam(p, lr=lr, decay=decay, foreach=True)


OPTIMIZERS = (
    Opt("Adam", "adam", quality._adam(0.9)),  # fused, as in bench/quality.py
    Opt("WaveAdam v2", "adam", eager_wave_adam, ("Adam",)),
) + tuple(Opt(v, "adam", eager_wave_adam, ("Adam", "WaveAdam v2")) for v in VARIANTS)
OPT_BY_NAME = {o.name: o for o in OPTIMIZERS}
TASK_BY_NAME = {t.name: t for t in TASKS}


@contextlib.contextmanager
def gate_variant(name):
    """Within the block, the foreach filter's tau uses GATES[name](gamma) in place of gamma;
    any other name (Adam, WaveAdam v2) leaves the filter as it is."""
    if name not in GATES:
        yield
        return

    def tau(approx, details, *, scale, snr_gate):
        t = wave_filter._median([torch._foreach_abs(d) for d in details])
        torch._foreach_mul_(t, scale)
        if snr_gate:
            torch._foreach_mul_(t, GATES[name](wave_filter._gate(approx, details)))
        return t

    with mock.patch.object(wave_filter, "_tau", tau):
        yield


def check_patch():
    """The patch must reach WaveAdam(foreach=True): with a huge tau the filter returns the window
    mean (SPEC section 3), i.e. WaveAdam(decay=1); unpatched, and with each variant, it does not."""
    task = TASK_BY_NAME["regression"]

    def final(build, name=None):
        with gate_variant(name):
            return task.run(build, range(3), task.noises["gaussian"], 60).final

    v2 = final(lambda p: eager_wave_adam(p, 0.01))
    huge = final(lambda p: eager_wave_adam(p, 0.01), "huge τ (patch check)")
    mean = final(lambda p: eager_wave_adam(p, 0.01, decay=1.0))
    assert torch.allclose(huge, mean, rtol=1e-4) and not torch.allclose(huge, v2, rtol=1e-3), (v2, huge, mean)
    for v in VARIANTS:
        assert not torch.equal(final(lambda p: eager_wave_adam(p, 0.01), v), v2), v


def run_job(job):
    task_name, noise, opt_name, seeds, steps = job
    torch.set_num_threads(1)
    task = TASK_BY_NAME[task_name]
    t0 = time.perf_counter()
    with gate_variant(opt_name):
        res = quality.evaluate(task, task.noises[noise], OPT_BY_NAME[opt_name], range(seeds), steps, sweep=True)
    del res["curve"]
    return job, res, time.perf_counter() - t0


def analyse(records):
    rows = []
    for rec in records:
        metric, results = TASK_BY_NAME[rec["task"]].metric, rec["results"]
        for res in results.values():
            res["mean_ci"] = mean_ci(metric, res["per_seed"])
        for opt in OPTIMIZERS:
            res = results[opt.name]
            res["wtl"] = {b: wins_ties_losses(metric, res["per_seed"], results[b]["per_seed"]) for b in opt.compare_to}
            res["ci_vs"] = {b: ci_verdict(metric, res["mean_ci"], results[b]["mean_ci"]) for b in opt.compare_to}
            res["ratio"] = {b: res["mean_ci"][0] / results[b]["mean_ci"][0] for b in opt.compare_to}
            rows.append([rec["task"], rec["noise"], opt.name, fmt_lr(res), fmt_mean_ci(metric, res["mean_ci"], rec["seeds"])]
                        + [f"{'/'.join(map(str, res['wtl'][b]))}, {res['ratio'][b]:.2f}x, {res['ci_vs'][b]}"
                           if b in res["wtl"] else "" for b in ("Adam", "WaveAdam v2")])
    return markdown(["task", "noise", "optimizer", "lr", "metric: mean [95% CI]",
                     "vs Adam: W/T/L, mean ratio, CIs", "vs WaveAdam v2: W/T/L, mean ratio, CIs"], rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default=",".join(TASK_NAMES), help="comma-separated subset of " + ",".join(TASK_NAMES))
    ap.add_argument("--seeds", type=int, default=10, help="evaluation seeds (default 10)")
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply each task's steps (default 1)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench/results/quality/threshold_variants.json"))
    args = ap.parse_args()
    tasks = [TASK_BY_NAME[n] for n in args.tasks.split(",")]
    start = time.perf_counter()
    check_patch()
    print(f"patch check passed ({time.perf_counter() - start:.0f}s)", file=sys.stderr, flush=True)
    steps = {t.name: max(1, round(t.steps * args.steps_scale)) for t in tasks}
    jobs = [(t.name, noise, o.name, args.seeds, steps[t.name]) for t in tasks for noise in t.noises for o in OPTIMIZERS]
    jobs.sort(key=lambda j: j[0] != "clean")  # the slowest task first
    cells = quality.run_jobs(run_job, jobs, args.workers, start)
    records = [{"task": t.name, "noise": noise, "seeds": args.seeds, "steps": steps[t.name], "metric": t.metric.name,
                "tie": t.metric.tie_text(), "results": {o.name: cells[t.name, noise, o.name] for o in OPTIMIZERS}}
               for t in tasks for noise in t.noises]
    print(analyse(records))
    runtime = time.perf_counter() - start
    print(f"\nW/T/L per seed (tie: within 5% relative); mean ratio = variant mean / baseline mean; CIs 'better'/"
          f"'worse' when the 95% bootstrap intervals do not overlap. lr tuned per optimizer as in bench/quality.py. "
          f"Runtime {runtime:.0f}s.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(finite_or_str({
        "command": " ".join(["python", "bench/threshold_variants.py"] + sys.argv[1:]), "torch": torch.__version__,
        "variants": {"quiet γ²": "tau = kappa * gamma^2 * T", "full min(1,2γ)": "tau = kappa * min(1, 2 gamma) * T",
                     "WaveAdam v2": "tau = kappa * gamma * T (SPEC v2), foreach=True"},
        "runtime_s": runtime, "records": records}), indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
