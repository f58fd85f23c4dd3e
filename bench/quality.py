"""Does WaveGuard help? Training quality of WaveAdam/WaveSGD against Adam/SGD.

WaveGuard is a hypothesis about gradients, not a free win, so this benchmark reports where
it helps, where it does nothing and where it hurts, over fixed seeds shared by every
optimizer. The ablation WaveAdam(thr=0) keeps the recency-weighted average of the last N
gradients and drops the wavelet threshold: comparing WaveAdam with it shows whether the
threshold earns anything beyond smoothing.

Each optimizer picks its learning rate from a small grid by its mean score on separate
tuning seeds (final training loss for XOR and the clean task, excess risk for regression,
validation accuracy for digits), then is reported on the evaluation seeds.

    python bench/quality.py                  # full run, ~9 minutes on 2 CPU cores
    python bench/quality.py --quick          # CI smoke test, under a minute
    python bench/quality.py --tasks xor,clean --seeds 20
"""
import argparse
import json
import math
import multiprocessing
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from quality_tasks import TASKS  # noqa: E402  (bench/ is on sys.path when run as a script)
from waveguard_optim import WaveAdam, WaveSGD  # noqa: E402

MOMENTUM = 0.9
TUNE_SEEDS = tuple(range(1000, 1005))  # disjoint from the evaluation seeds 0, 1, 2, ...


@dataclass(frozen=True)
class Opt:
    name: str
    family: str  # which learning-rate grid of the task it uses
    build: Callable  # build(params, lr) -> optimizer
    compare_to: tuple = ()  # baselines for wins/ties/losses; the first one is "its" baseline
    style: str = "-"


OPTIMIZERS = (
    Opt("Adam", "adam", lambda p, lr: torch.optim.Adam(p, lr=lr)),
    Opt("WaveAdam", "adam", lambda p, lr: WaveAdam(p, lr=lr), ("Adam", "WaveAdam(thr=0)")),
    Opt("WaveAdam(thr=0)", "adam", lambda p, lr: WaveAdam(p, lr=lr, threshold_scale=0.0), ("Adam",), ":"),
    Opt("SGD", "sgd", lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=MOMENTUM), style="--"),
    Opt("WaveSGD", "sgd", lambda p, lr: WaveSGD(p, lr=lr, momentum=MOMENTUM), ("SGD",), "--"),
)
OPT_BY_NAME = {o.name: o for o in OPTIMIZERS}
TASK_BY_NAME = {t.name: t for t in TASKS}


def mean_score(score):
    """Mean lr-selection score; a diverged seed (nan/inf) makes the lr lose."""
    return score.mean().item() if torch.isfinite(score).all() else math.inf


def evaluate(task, noise, opt, seeds, steps, sweep):
    """Run every lr of the grid on tuning + evaluation seeds stacked, keep the best by tuning score."""
    grid = task.lrs[opt.family]
    if not sweep:
        grid = (grid[len(grid) // 2],)
    tune = list(TUNE_SEEDS) if len(grid) > 1 else []
    runs = {lr: task.run(lambda p: opt.build(p, lr), tune + list(seeds), noise, steps) for lr in grid}
    best = min(grid, key=lambda lr: mean_score(runs[lr].score[: len(tune)]))
    run = runs[best]
    curve = run.curve[:, len(tune):]
    q25, med, q75 = torch.nanquantile(curve, torch.tensor([0.25, 0.5, 0.75]), dim=1)
    return {
        "lr": best,
        "per_seed": run.final[len(tune):].tolist(),
        "sweep": {f"{lr:g}": {"tune_score": mean_score(r.score[: len(tune)]) if tune else None,
                              "eval_mean": r.final[len(tune):].mean().item()} for lr, r in runs.items()},
        "curve": {"steps": run.curve_steps, "median": med.tolist(), "q25": q25.tolist(), "q75": q75.tolist()},
    }


def run_job(job):
    """One cell of the table (task, noise level, optimizer), in a worker process. The models
    are tiny, so one torch thread per worker beats intra-op threading."""
    task_name, noise_label, opt_name, n_seeds, quick = job
    torch.set_num_threads(1)
    task = TASK_BY_NAME[task_name]
    t0 = time.perf_counter()
    res = evaluate(task, task.noises[noise_label], OPT_BY_NAME[opt_name], range(n_seeds),
                   task.quick_steps if quick else task.steps, sweep=not quick)
    return job, res, time.perf_counter() - t0


def wins_ties_losses(metric, mine, base):
    """Per seed: a win is better than the baseline by more than the metric's tie tolerance.
    A non-finite value (diverged run) is the worst possible."""
    worst = -math.inf if metric.higher_is_better else math.inf
    wtl = [0, 0, 0]
    for a, b in zip(mine, base):
        a, b = (worst if not math.isfinite(v) else v for v in (a, b))
        if a == b or abs(a - b) <= metric.tie_abs + metric.tie_rel * abs(b):
            wtl[1] += 1
        else:
            wtl[0 if (a > b) == metric.higher_is_better else 2] += 1
    return wtl


def summary(metric, values):
    v = torch.tensor(values, dtype=torch.float64)
    if metric.count:
        return f"{int(v.sum())}/{len(v)}"
    std = v.std().item() if len(v) > 1 else 0.0
    return f"{metric.fmt.format(v.mean().item())} ± {metric.fmt.format(std)}"


def table(records):
    """A Markdown table: readable in a terminal and pastable into the README."""
    head = ["task", "noise", "optimizer", "lr", "final metric (mean ± std)", "W/T/L vs baseline", "W/T/L vs ablation"]
    rows = []
    for rec in records:
        for name, res in rec["results"].items():
            vs = [f"{'/'.join(map(str, wtl))} vs {b}" for b, wtl in res["wtl"].items()] + ["", ""]
            rows.append([rec["task"], rec["noise"], name, f"{res['lr']:g}",
                         f"{rec['metric']}: {res['summary']}", vs[0], vs[1]])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def plot(task, records, path):
    """Loss curves, one panel per noise level: median over seeds, band = interquartile range."""
    fig, axes = plt.subplots(1, len(records), figsize=(4.2 * len(records), 3.6), squeeze=False)
    for ax, rec in zip(axes[0], records):
        for i, opt in enumerate(OPTIMIZERS):
            c = rec["results"][opt.name]["curve"]
            ax.plot(c["steps"], c["median"], opt.style, color=f"C{i}", label=opt.name, lw=1.4)
            ax.fill_between(c["steps"], c["q25"], c["q75"], color=f"C{i}", alpha=0.15, lw=0)
        ax.set_yscale("log")
        ax.set_title(f"{task.name}: {rec['noise']}", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(task.curve_label)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finite_or_str(x):
    """JSON has no inf/nan: write them as strings."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: finite_or_str(v) for k, v in x.items()}
    if isinstance(x, list):
        return [finite_or_str(v) for v in x]
    return x


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="CI smoke test: 3 seeds, ~10x fewer steps, middle lr of each grid, no sweep")
    ap.add_argument("--seeds", type=int, help="number of evaluation seeds (default 10, or 3 with --quick)")
    ap.add_argument("--out", type=Path,
                    help="output folder (default bench/results/quality, or bench/results/quality-quick)")
    ap.add_argument("--workers", type=int, default=2, help="parallel worker processes (default 2)")
    ap.add_argument("--tasks", help="comma-separated subset of: " + ",".join(t.name for t in TASKS))
    args = ap.parse_args()
    seeds = range(args.seeds or (3 if args.quick else 10))
    out = args.out or Path("bench/results/quality" + ("-quick" if args.quick else ""))
    wanted = set(args.tasks.split(",")) if args.tasks else {t.name for t in TASKS}
    if unknown := wanted - {t.name for t in TASKS}:
        ap.error(f"unknown task(s): {', '.join(sorted(unknown))}")
    tasks = [t for t in TASKS if t.name in wanted]
    out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    jobs = [(t.name, noise, o.name, len(seeds), args.quick) for t in tasks for noise in t.noises for o in OPTIMIZERS]
    cells = {}
    with multiprocessing.Pool(args.workers) as pool:
        for job, res, secs in pool.imap_unordered(run_job, jobs):
            cells[job[:3]] = res
            print(f"[{len(cells):3d}/{len(jobs)}] {job[0]} {job[1]} {job[2]}: lr {res['lr']:g}, "
                  f"{secs:.1f}s (total {time.perf_counter() - start:.0f}s)", file=sys.stderr, flush=True)
    records = []
    for task in tasks:
        task_records = []
        for noise in task.noises:
            results = {o.name: cells[task.name, noise, o.name] for o in OPTIMIZERS}
            for opt in OPTIMIZERS:
                res = results[opt.name]
                res["summary"] = summary(task.metric, res["per_seed"])
                res["wtl"] = {b: wins_ties_losses(task.metric, res["per_seed"], results[b]["per_seed"])
                              for b in opt.compare_to}
            task_records.append({"task": task.name, "noise": noise, "metric": task.metric.name,
                                 "higher_is_better": task.metric.higher_is_better, "tie": task.metric.tie_text(),
                                 "steps": task.quick_steps if args.quick else task.steps, "results": results})
        plot(task, task_records, out / f"{task.name}.png")
        records += task_records
    runtime = time.perf_counter() - start

    print(table(records))
    print("\nW/T/L: per evaluation seed, a win beats the baseline by more than the tie tolerance "
          "(" + "; ".join(f"{t.name}: {t.metric.tie_text()}" for t in tasks) + "). "
          f"Seeds {seeds.start}..{seeds.stop - 1}; lr picked on seeds {TUNE_SEEDS[0]}..{TUNE_SEEDS[-1]}"
          f"{' (no sweep in --quick)' if args.quick else ''}. SGD momentum {MOMENTUM}.")
    print(f"Runtime {runtime:.0f}s. Results and plots in {out}/")
    report = {"command": " ".join(["python", "bench/quality.py"] + sys.argv[1:]), "quick": args.quick,
              "seeds": list(seeds), "tune_seeds": list(TUNE_SEEDS), "momentum": MOMENTUM,
              "runtime_s": runtime, "torch": torch.__version__, "records": records}
    (out / "quality.json").write_text(json.dumps(finite_or_str(report), indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
