"""Does WaveGuard help? Training quality of WaveAdam/WaveSGD against Adam/SGD and the peers a
user would pick instead.

WaveGuard is a hypothesis about gradients, not a free win, so this benchmark reports where
it helps, where it ties and where it hurts, over fixed seeds shared by every optimizer.
With its default decay=0 (SPEC version 2) WaveAdam with threshold_scale=0 *is* Adam, so the
Adam row is also WaveAdam's ablation: any difference is the wavelet threshold's. Version 1
(decay=0.85, a recency-weighted average of the denoised window) is kept beside it, with its
own ablation (threshold_scale=0: the average alone).

Each optimizer picks its learning rate by its mean score on separate tuning seeds (final
training loss for XOR and the clean task, excess risk for the regressions, validation
accuracy for digits), from a grid that is widened along 1-3-10 steps while the best lr sits
at its edge; then it is reported on the evaluation seeds.

    python bench/quality.py                  # full run: 33 min on a loaded 2-vCPU machine
    python bench/quality.py --quick          # smoke test, under a minute: no sweep, 3 seeds
    python bench/quality.py --tasks xor,clean --seeds 10
    python bench/quality.py --tasks dp --out bench/results/quality-dp   # DP-SGD through Opacus: 18 min

The dp task (private training, Opacus) runs its own set of optimizers (Task.optimizers): the Adam
family, a plain EMA low-pass in front of Adam (the DOPPLER-style peer), WaveAdam, SGD and WaveSGD.
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
import numpy as np  # noqa: E402
import torch  # noqa: E402
from pytorch_optimizer import AdEMAMix, GrokFastAdamW  # noqa: E402

from quality_tasks import TASKS  # noqa: E402  (bench/ is on sys.path when run as a script)
from waveguard_optim import WaveAdam, WaveSGD  # noqa: E402

MOMENTUM = 0.9
TUNE_SEEDS = tuple(range(1000, 1005))  # disjoint from the evaluation seeds 0, 1, 2, ...
MAX_WIDEN = 3  # lattice steps a grid may grow on each side (one step = ×10^½, 1-3-10)
N_BOOT = 4000  # bootstrap resamples for the 95% confidence interval of a mean


@dataclass(frozen=True)
class Opt:
    name: str
    family: str  # which learning-rate grid of the task it uses
    build: Callable  # build(params, lr, steps) -> optimizer
    compare_to: tuple = ()  # baselines for wins/ties/losses; the first one is "its" baseline
    style: str = "-"


def _adam(beta1):
    """fused=True: on CPU it rounds like WaveAdam's default path, so that WaveAdam with
    threshold_scale=0 (and decay 0) follows this Adam bit for bit and the Adam row is exactly
    its ablation (torch's default foreach Adam differs from it by float rounding)."""
    return lambda p, lr, steps: torch.optim.Adam(p, lr=lr, betas=(beta1, 0.999), fused=True)


class LowPassAdam(torch.optim.Adam):
    """The DOPPLER-style peer (a low-pass filter of the privatized gradient in front of Adam, NeurIPS
    2024) in its plainest form: Adam consumes the bias-corrected EMA m_t / (1 − β^t) of the gradient,
    m_t = β m_{t−1} + (1 − β) g_t, so that its second moment sees the filtered gradient too (unlike
    Adam's β1). β = 0.9, fixed a priori, not tuned. The EMA lives outside the state dict (a bench peer)."""

    def __init__(self, params, lr, beta=0.9):
        super().__init__(params, lr=lr, fused=True)
        self.beta, self.ema, self.t = beta, {}, 0

    @torch.no_grad()
    def step(self, closure=None):
        self.t += 1
        raw = [(p, p.grad) for group in self.param_groups for p in group["params"] if p.grad is not None]
        for p, g in raw:
            ema = self.ema.setdefault(p, torch.zeros_like(p))
            ema.mul_(self.beta).add_(g, alpha=1 - self.beta)
            p.grad = ema / (1 - self.beta**self.t)
        super().step()
        for p, g in raw:
            p.grad = g


def _wave_adam(decay, threshold_scale=1.0):
    """decay is always explicit: the benchmark must not depend on the library's default."""
    return lambda p, lr, steps: WaveAdam(p, lr=lr, decay=decay, threshold_scale=threshold_scale)


OPTIMIZERS = (
    Opt("Adam", "adam", _adam(0.9)),
    Opt("Adam β1=0.95", "adam", _adam(0.95), ("Adam",), "--"),
    Opt("Adam β1=0.98", "adam", _adam(0.98), ("Adam",), "--"),
    # AdEMAMix with the warm-up of alpha and beta3 over the whole run that its authors advise.
    Opt("AdEMAMix", "adam", lambda p, lr, steps: AdEMAMix(p, lr=lr, t_alpha_beta3=steps), ("Adam",), "-."),
    # GrokFast's EMA filter (alpha 0.98, lamb 2) in front of Adam's betas, with no lr rescaling
    # (the lr is swept anyway) and no weight decay, so the filter is the only difference.
    Opt("GrokFast", "adam", lambda p, lr, steps: GrokFastAdamW(p, lr=lr, betas=(0.9, 0.999), normalize_lr=False),
        ("Adam",), "-."),
    Opt("WaveAdam", "adam", _wave_adam(0.0), ("Adam",)),  # its ablation, threshold_scale=0, is Adam
    Opt("WaveAdam v1", "adam", _wave_adam(0.85), ("Adam", "WaveAdam v1 κ=0"), ":"),
    Opt("WaveAdam v1 κ=0", "adam", _wave_adam(0.85, 0.0), ("Adam",), ":"),
    Opt("SGD", "sgd", lambda p, lr, steps: torch.optim.SGD(p, lr=lr, momentum=MOMENTUM)),
    Opt("WaveSGD", "sgd", lambda p, lr, steps: WaveSGD(p, lr=lr, momentum=MOMENTUM, decay=0.0), ("SGD",)),
)
# Run only by the tasks that name them (Task.optimizers).
PEERS = (Opt("LowPass Adam", "adam", lambda p, lr, steps: LowPassAdam(p, lr=lr), ("Adam",), "-."),)
OPT_BY_NAME = {o.name: o for o in OPTIMIZERS + PEERS}
TASK_BY_NAME = {t.name: t for t in TASKS}
DROP_IN = ("WaveAdam", "WaveAdam v1", "WaveAdam v1 κ=0")  # compared with Adam at every shared lr


def task_optimizers(task):
    """The optimizers a task runs, in the order of OPTIMIZERS + PEERS (which also fixes their colours)."""
    names = set(task.optimizers) or {o.name for o in OPTIMIZERS}
    return [o for o in OPTIMIZERS + PEERS if o.name in names]


def rec_optimizers(rec):
    """(colour index, optimizer) of every optimizer a record holds results for."""
    return [(i, o) for i, o in enumerate(OPTIMIZERS + PEERS) if o.name in rec["results"]]


def mean_score(score):
    """Mean lr-selection score; a diverged seed (nan/inf) makes the lr lose."""
    return score.mean().item() if torch.isfinite(score).all() else math.inf


def lattice_neighbour(lr, up):
    """The next lr on the 1-3-10 lattice (10^(k/2) to one significant digit) above or below lr."""
    k = round(2 * math.log10(lr)) + (1 if up else -1)
    return float(f"{10 ** (k / 2):.0e}")


def evaluate(task, noise, opt, seeds, steps, sweep):
    """Run the lr grid on tuning + evaluation seeds stacked, widening it while the best lr (by the
    tuning score) is at an edge, up to MAX_WIDEN steps a side; report the best on the evaluation seeds."""
    grid = task.lrs[opt.family]
    if not sweep:
        grid = (grid[len(grid) // 2],)
    tune = list(TUNE_SEEDS) if sweep else []
    runs = {}

    def run(lr):
        runs[lr] = task.run(lambda p: opt.build(p, lr, steps), tune + list(seeds), noise, steps)

    def best_lr():
        return min(sorted(runs), key=lambda lr: mean_score(runs[lr].score[: len(tune)]))

    for lr in grid:
        run(lr)
    widened = {"down": 0, "up": 0}
    while sweep:
        lrs, best = sorted(runs), best_lr()
        side = "down" if best == lrs[0] else "up" if best == lrs[-1] else None
        if side is None or widened[side] == MAX_WIDEN:
            break
        widened[side] += 1
        run(lattice_neighbour(best, up=side == "up"))
    best = best_lr()
    lrs = sorted(runs)
    result = runs[best]
    curve = result.curve[:, len(tune):]
    q25, med, q75 = torch.nanquantile(curve, torch.tensor([0.25, 0.5, 0.75]), dim=1)
    return {
        "lr": best,
        "widened": widened,
        "at_edge": sweep and best in (lrs[0], lrs[-1]),
        "per_seed": result.final[len(tune):].tolist(),
        "sweep": {f"{lr:g}": {"tune_score": mean_score(runs[lr].score[: len(tune)]) if tune else None,
                              "per_seed": runs[lr].final[len(tune):].tolist()} for lr in lrs},
        "curve": {"steps": result.curve_steps, "median": med.tolist(), "q25": q25.tolist(), "q75": q75.tolist()},
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


def _worst_for(metric, values):
    """Per-seed values with a diverged run (nan/inf) replaced by the worst possible value."""
    worst = -math.inf if metric.higher_is_better else math.inf
    return [v if math.isfinite(v) else worst for v in values]


def wins_ties_losses(metric, mine, base):
    """Per seed: a win is better than the baseline by more than the metric's tie tolerance."""
    wtl = [0, 0, 0]
    for a, b in zip(_worst_for(metric, mine), _worst_for(metric, base)):
        if a == b or abs(a - b) <= metric.tie_abs + metric.tie_rel * abs(b):
            wtl[1] += 1
        else:
            wtl[0 if (a > b) == metric.higher_is_better else 2] += 1
    return wtl


def mean_ci(metric, values):
    """Mean over seeds and its 95% percentile-bootstrap confidence interval (fixed resampling)."""
    v = np.array(_worst_for(metric, values), dtype=np.float64)
    idx = np.random.default_rng(0).integers(0, len(v), (N_BOOT, len(v)))
    with np.errstate(invalid="ignore"):
        lo, hi = np.percentile(v[idx].mean(1), [2.5, 97.5])
    return [float(v.mean()), float(lo), float(hi)]


def ci_verdict(metric, mine, base):
    """'better' / 'worse' when the two 95% intervals do not overlap, else 'overlap'."""
    (_, lo, hi), (_, blo, bhi) = mine, base
    if metric.higher_is_better:
        lo, hi, blo, bhi = -hi, -lo, -bhi, -blo
    return "better" if hi < blo else "worse" if lo > bhi else "overlap"


def fmt_mean(metric, mean, n):
    return f"{round(mean * n)}/{n}" if metric.count else metric.fmt.format(mean)


def fmt_mean_ci(metric, ci, n):
    mean, lo, hi = ci
    if metric.count:
        return f"{fmt_mean(metric, mean, n)} [{lo:.2f}, {hi:.2f}]"
    return f"{fmt_mean(metric, mean, n)} [{metric.fmt.format(lo)}, {metric.fmt.format(hi)}]"


def fmt_lr(res):
    """The tuned lr, with how far its grid was widened and whether it still ends at an edge."""
    notes = [f"{'↓' if side == 'down' else '↑'}{k}" for side, k in res["widened"].items() if k]
    if res["at_edge"]:
        notes.append("edge")
    return f"{res['lr']:g}" + (f" ({', '.join(notes)})" if notes else "")


def markdown(head, rows):
    """A Markdown table: readable in a terminal and pastable into the README."""
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def table(records):
    """The main table: one row per (task, noise, optimizer) at its tuned lr."""
    rows = []
    for rec in records:
        for name, res in rec["results"].items():
            vs = [f"{'/'.join(map(str, res['wtl'][b]))} vs {b}" for b in res["wtl"]]
            base = next(iter(res["wtl"]), None)
            rows.append([rec["task"], rec["noise"], name, fmt_lr(res), res["summary"],
                         vs[0] if vs else "", res["ci_vs"][base] if base else "", "; ".join(vs[1:])])
    head = ["task", "noise", "optimizer", "lr", "metric: mean [95% CI]", "W/T/L", "CIs", "W/T/L vs ablation"]
    return markdown(head, rows)


def same_lr_rows(rec, metric):
    """DROP_IN optimizers against Adam at every lr both ran: mean metric, and per-seed W/T/L."""
    adam = rec["results"]["Adam"]["sweep"]
    rows = []
    for lr in sorted(adam, key=float):
        cells = []
        for name in DROP_IN:
            other = rec["results"][name]["sweep"].get(lr) if name in rec["results"] else None
            if other is None:
                cells.append("–")
                continue
            mean = mean_ci(metric, other["per_seed"])[0]
            wtl = "/".join(map(str, wins_ties_losses(metric, other["per_seed"], adam[lr]["per_seed"])))
            cells.append(f"{metric.fmt.format(mean)} ({wtl})")
        rows.append([rec["task"], rec["noise"], lr, metric.fmt.format(mean_ci(metric, adam[lr]["per_seed"])[0])] + cells)
    return rows


def goals(records):
    """Issue 10's goals, computed from the run (WaveAdam = v2, decay 0; its ablation is Adam)."""
    by = {(r["task"], r["noise"]): r for r in records}
    out = {}
    if ("clean", "full batch") in by:
        rec = by["clean", "full batch"]
        w, t, l = rec["results"]["WaveAdam"]["wtl"]["Adam"]
        adam_sweep, wave_sweep = rec["results"]["Adam"]["sweep"], rec["results"]["WaveAdam"]["sweep"]
        ratios = {lr: float(np.mean(wave_sweep[lr]["per_seed"]) / np.mean(adam_sweep[lr]["per_seed"]))
                  for lr in adam_sweep if lr in wave_sweep}
        worst = max(ratios, key=ratios.get)
        out["clean: WaveAdam not worse than Adam (within 5%) on >= 80% of seeds, each at its best lr"] = (
            f"W/T/L {w}/{t}/{l}: {w + t}/{w + t + l} -> {'met' if w + t >= 0.8 * (w + t + l) else 'NOT met'}")
        out["clean: same-lr drop-in never > 10% worse (mean final loss, WaveAdam / Adam, every shared lr)"] = (
            ", ".join(f"lr {lr}: {r:.3f}" for lr, r in sorted(ratios.items(), key=lambda kv: float(kv[0])))
            + f" -> {'met' if ratios[worst] <= 1.10 else 'NOT met'} (worst at lr {worst})")
    noisy = [r for r in records if r["noisy"]]
    verdicts = {f"{r['task']} {r['noise']}": r["results"]["WaveAdam"]["ci_vs"]["Adam"] for r in noisy}
    worse = [k for k, v in verdicts.items() if v == "worse"]
    better = [k for k, v in verdicts.items() if v == "better"]
    out[f"noisy cells ({len(noisy)}): WaveAdam never significantly worse than Adam"] = (
        f"worse in {len(worse)}: {', '.join(worse) or 'none'} -> {'met' if not worse else 'NOT met'}")
    out["noisy cells: WaveAdam significantly better than Adam in >= 2"] = (
        f"better in {len(better)}: {', '.join(better) or 'none'} -> {'met' if len(better) >= 2 else 'NOT met'}")
    thr = [f"{r['task']} {r['noise']}" for r in records if r["results"]["WaveAdam"]["ci_vs"]["Adam"] == "better"]
    v1 = [f"{r['task']} {r['noise']}" for r in records
          if "WaveAdam v1" in r["results"] and r["results"]["WaveAdam v1"]["ci_vs"]["WaveAdam v1 κ=0"] == "better"]
    out["threshold beats its ablation (WaveAdam vs Adam = kappa 0), non-overlapping 95% CIs, >= 1 cell"] = (
        f"{len(thr)}: {', '.join(thr) or 'none'} -> {'met' if thr else 'NOT met'}"
        f" (v1 threshold vs v1 kappa=0: {len(v1)}: {', '.join(v1) or 'none'})")
    return out


def plot_curves(task, records, path):
    """Loss curves at each optimizer's tuned lr, one panel per noise level: median over seeds,
    band = interquartile range."""
    fig, axes = plt.subplots(1, len(records), figsize=(4.6 * len(records), 3.8), squeeze=False)
    for ax, rec in zip(axes[0], records):
        for i, opt in rec_optimizers(rec):
            c = rec["results"][opt.name]["curve"]
            ax.plot(c["steps"], c["median"], opt.style, color=f"C{i}", label=opt.name, lw=1.3)
            ax.fill_between(c["steps"], c["q25"], c["q75"], color=f"C{i}", alpha=0.10, lw=0)
        ax.set_yscale("log")
        ax.set_title(f"{task.name}: {rec['noise']}", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(task.curve_label)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_lr(task, records, path):
    """Final metric (mean over evaluation seeds) against lr, one line per optimizer; the lr each
    optimizer picked on the tuning seeds is circled. Shows which optimizer forgives a wrong lr.
    A loss axis stops at 100x the median of the optimizers' tuned losses: points above it (or
    diverged) sit on the top edge as triangles."""
    metric = task.metric
    fig, axes = plt.subplots(1, len(records), figsize=(4.6 * len(records), 3.8), squeeze=False)
    for ax, rec in zip(axes[0], records):
        top = math.inf if metric.higher_is_better else 100 * np.median([r["mean_ci"][0] for r in rec["results"].values()])
        for i, opt in rec_optimizers(rec):
            res = rec["results"][opt.name]
            lrs = sorted(res["sweep"], key=float)
            x = np.array([float(lr) for lr in lrs])
            y = np.array([mean_ci(metric, res["sweep"][lr]["per_seed"])[0] for lr in lrs])
            off = y > top
            ax.plot(x, np.where(off, top, y), opt.style, marker=".", color=f"C{i}", label=opt.name, lw=1.3)
            ax.plot(x[off], np.full(off.sum(), top), "^", color=f"C{i}", ms=6)
            ax.plot([res["lr"]], [min(res["mean_ci"][0], top)], "o", mfc="none", color=f"C{i}", ms=9)
        ax.set_xscale("log")
        if not metric.higher_is_better:
            ax.set_yscale("log")
        ax.set_title(f"{task.name}: {rec['noise']}", fontsize=10)
        ax.set_xlabel("learning rate")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(metric.name + (" (fraction of seeds)" if metric.count else "") + ", mean over seeds")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def finite_or_str(x):
    """JSON has no inf/nan: write them as strings (read back by `restore_floats`)."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: finite_or_str(v) for k, v in x.items()}
    if isinstance(x, list):
        return [finite_or_str(v) for v in x]
    return x


def restore_floats(x):
    if x in ("inf", "-inf", "nan"):
        return float(x)
    if isinstance(x, dict):
        return {k: restore_floats(v) for k, v in x.items()}
    if isinstance(x, list):
        return [restore_floats(v) for v in x]
    return x


def analyse(records):
    """Add each cell's mean and 95% CI, and its W/T/L and CI verdicts against its baselines."""
    for rec in records:
        metric, results = TASK_BY_NAME[rec["task"]].metric, rec["results"]
        for res in results.values():
            res["mean_ci"] = mean_ci(metric, res["per_seed"])
            res["summary"] = fmt_mean_ci(metric, res["mean_ci"], rec["seeds"])
        for _, opt in rec_optimizers(rec):
            res = results[opt.name]
            res["wtl"] = {b: wins_ties_losses(metric, res["per_seed"], results[b]["per_seed"]) for b in opt.compare_to}
            res["ci_vs"] = {b: ci_verdict(metric, res["mean_ci"], results[b]["mean_ci"]) for b in opt.compare_to}


def report(run, out):
    """Plots, tables and goals of a run (fresh, or read back with --replot); writes quality.json."""
    records, quick = run["records"], run["quick"]
    analyse(records)
    tasks = [t for t in TASKS if any(r["task"] == t.name for r in records)]
    for task in tasks:
        task_records = [r for r in records if r["task"] == task.name]
        plot_curves(task, task_records, out / f"{task.name}.png")
        if not quick:
            plot_lr(task, task_records, out / f"{task.name}-lr.png")
    if quick:
        smoke_report(records)
    else:
        full_report(run, tasks)
    print(f"\nRuntime {run['runtime_s']:.0f}s. Results and plots in {out}/")
    (out / "quality.json").write_text(json.dumps(finite_or_str(run), indent=1, ensure_ascii=False))


def full_report(run, tasks):
    """The main table, the same-lr table and the goals of a full (tuned) run."""
    records = run["records"]
    seeds = {r["task"]: r["seeds"] for r in records}
    print(table(records))
    print("\nW/T/L per seed: against Adam for the Adam family, SGD for WaveSGD, and 'vs ablation' "
          "against the named optimizer; a win beats it by more than the tie tolerance ("
          + "; ".join(f"{t.name}: {t.metric.tie_text()}" for t in tasks) + "). CIs: 'better'/'worse' "
          "when the two 95% bootstrap intervals of the mean do not overlap. lr: tuned on seeds "
          f"{TUNE_SEEDS[0]}..{TUNE_SEEDS[-1]}, (↑k/↓k) = grid widened k steps, 'edge' = still at the edge "
          f"after {MAX_WIDEN}. Evaluation seeds 0..n-1, n = "
          + ", ".join(f"{t.name} {seeds[t.name]}" for t in tasks) + f". SGD momentum {MOMENTUM}.")
    rows = [row for rec in records for row in same_lr_rows(rec, TASK_BY_NAME[rec["task"]].metric)]
    print("\nSame-lr drop-in: mean metric at every lr Adam ran (W/T/L per seed against Adam at that lr)\n")
    print(markdown(["task", "noise", "lr", "Adam"] + list(DROP_IN), rows))
    run["goals"] = goals(records)
    print("\nGoals (issue 10):")
    for goal, verdict in run["goals"].items():
        print(f"- {goal}: {verdict}")


SMOKE_BANNER = ("SMOKE RUN (--quick): it checks that every task and optimizer runs, with no lr tuning (the "
                "middle lr of each grid), 3 seeds and ~10x fewer steps. Its numbers are no evidence for or "
                "against WaveGuard; the verdict is the full run's.")


def smoke_report(records):
    """The quick run's table, without verdict columns (3 untuned seeds cannot carry one) and
    without the cells where every optimizer scored the same on every seed."""
    same = [r for r in records if len({tuple(res["per_seed"]) for res in r["results"].values()}) == 1]
    names = [o.name for o in OPTIMIZERS + PEERS if any(o.name in r["results"] for r in records)]
    rows = [[rec["task"], rec["noise"]] + [fmt_mean(TASK_BY_NAME[rec["task"]].metric, rec["results"][n]["mean_ci"][0], rec["seeds"])
                                           if n in rec["results"] else "–" for n in names] for rec in records if rec not in same]
    print("\n" + SMOKE_BANNER + " Mean of 3 seeds at the middle lr of each grid:\n")
    print(markdown(["task", "noise"] + names, rows))
    if same:
        print("\nLeft out (every optimizer scored the same on every seed): "
              + ", ".join(f"{r['task']} {r['noise']} ({fmt_mean(TASK_BY_NAME[r['task']].metric, next(iter(r['results'].values()))['mean_ci'][0], r['seeds'])})" for r in same))
    print("\nThe full run's verdict is printed above this run's progress; it is the one to read.")


COMMITTED_RUN = Path(__file__).resolve().parent / "results" / "quality" / "quality.json"
VERDICT_PAIRS = (("WaveAdam", "Adam"), ("WaveSGD", "SGD"))


def committed_verdict(path=COMMITTED_RUN):
    """The verdict of the committed full run (lr tuned per optimizer, 10-20 seeds): each
    WaveGuard optimizer against its own baseline, cell by cell, with a one-line count."""
    run = restore_floats(json.loads(path.read_text()))
    records = run["records"]
    analyse(records)
    rows, counts = [], {}
    for rec in records:
        row = [rec["task"], rec["noise"]]
        for mine, base in VERDICT_PAIRS:
            res = rec["results"][mine]
            counts.setdefault(mine, []).append(res["ci_vs"][base])
            row += [res["summary"], rec["results"][base]["summary"],
                    "/".join(map(str, res["wtl"][base])) + ", " + res["ci_vs"][base]]
        rows.append(row)
    head = ["task", "noise"] + [c for mine, base in VERDICT_PAIRS for c in (mine, base, f"W/T/L, CIs vs {base}")]
    summary = "; ".join(f"{mine} vs {base}: better in {counts[mine].count('better')}, worse in "
                        f"{counts[mine].count('worse')}, overlapping in {counts[mine].count('overlap')} of {len(records)} cells"
                        for mine, base in VERDICT_PAIRS)
    seeds = sorted({r["seeds"] for r in records})
    print(f"VERDICT of the committed full run (`{run['command']}`, torch {run['torch']}, lr tuned per optimizer, "
          f"{'-'.join(map(str, (seeds[0], seeds[-1])))} seeds, bench/results/quality/quality.json):\n{summary}.\n")
    print(markdown(head, rows))
    print("\nW/T/L per seed; 'better'/'worse': the two 95% bootstrap intervals of the mean do not overlap.\n")


def run_jobs(run, jobs, workers, start):
    """``{(task, noise, optimizer): result}`` of ``run(job)`` for every job (its first three fields
    are that key), on ``workers`` processes, with a progress line per finished job on stderr.
    ``run`` returns ``(job, result, seconds)``."""
    cells = {}
    with multiprocessing.Pool(workers) as pool:
        for job, res, secs in pool.imap_unordered(run, jobs):
            cells[job[:3]] = res
            print(f"[{len(cells):3d}/{len(jobs)}] {job[0]} {job[1]} {job[2]}: lr {fmt_lr(res)}, "
                  f"{secs:.1f}s (total {time.perf_counter() - start:.0f}s)", file=sys.stderr, flush=True)
    return cells


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 3 seeds, ~10x fewer steps, the middle lr of each grid, no sweep; prints the full-run verdict first")
    ap.add_argument("--seeds", type=int,
                    help="number of evaluation seeds (default: the task's, 20 for xor and 10 elsewhere; 3 with --quick)")
    ap.add_argument("--out", type=Path,
                    help="output folder (default bench/results/quality, or bench/results/quality-quick)")
    ap.add_argument("--workers", type=int, default=2, help="parallel worker processes (default 2)")
    ap.add_argument("--tasks", help="comma-separated subset of: " + ",".join(t.name for t in TASKS))
    ap.add_argument("--replot", action="store_true",
                    help="train nothing: redraw the plots and reprint the tables from --out's quality.json")
    args = ap.parse_args()
    out = args.out or Path("bench/results/quality" + ("-quick" if args.quick else ""))
    if args.replot:
        run = restore_floats(json.loads((out / "quality.json").read_text()))
        if run["quick"]:
            committed_verdict()
        report(run, out)
        return

    def n_seeds(task):
        return args.seeds or (3 if args.quick else task.seeds)

    wanted = set(args.tasks.split(",")) if args.tasks else {t.name for t in TASKS}
    if unknown := wanted - {t.name for t in TASKS}:
        ap.error(f"unknown task(s): {', '.join(sorted(unknown))}")
    tasks = [t for t in TASKS if t.name in wanted]
    out.mkdir(parents=True, exist_ok=True)

    if args.quick:
        committed_verdict()
        print(SMOKE_BANNER + " Running it now (progress on stderr)...\n", flush=True)
    start = time.perf_counter()
    # The costliest tasks (last in TASKS) first, so that the last jobs to finish are short ones.
    jobs = [(t.name, noise, o.name, n_seeds(t), args.quick) for t in reversed(tasks) for noise in t.noises
            for o in task_optimizers(t)]
    cells = run_jobs(run_job, jobs, args.workers, start)
    records = [{"task": t.name, "noise": noise, "noisy": noise not in t.noise_free, "seeds": n_seeds(t),
                "metric": t.metric.name, "higher_is_better": t.metric.higher_is_better, "tie": t.metric.tie_text(),
                "steps": t.quick_steps if args.quick else t.steps,
                "results": {o.name: cells[t.name, noise, o.name] for o in task_optimizers(t)}}
               for t in tasks for noise in t.noises]
    report({"command": " ".join(["python", "bench/quality.py"] + sys.argv[1:]), "quick": args.quick,
            "tune_seeds": list(TUNE_SEEDS), "momentum": MOMENTUM, "torch": torch.__version__,
            "runtime_s": time.perf_counter() - start, "records": records}, out)


if __name__ == "__main__":
    main()
