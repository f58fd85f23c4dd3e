"""The training tasks of bench/quality.py.

Each task trains all of its seeds at once: every parameter carries a leading seed axis and
the loss is the *sum* of the per-seed losses, so a seed's gradient depends on that seed's
data only. Adam, SGD and the WaveGuard filter all act element by element, so one stacked
run is exactly S independent runs, for about the price of one.

All randomness (init, data, gradient noise, batch order, label noise) is drawn up front
from a numpy generator keyed by (task, seed): a seed sees the same numbers under every
optimizer and learning rate, and asking for more seeds leaves the existing ones unchanged.
"""
import math
import zlib
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

CURVE_POINTS = 50


@dataclass(frozen=True)
class Metric:
    """The reported per-seed number, and when two of them count as a tie."""

    name: str
    higher_is_better: bool
    fmt: str  # format of one value, e.g. "{:.3f}"
    tie_abs: float = 0.0
    tie_rel: float = 0.0
    count: bool = False  # a 0/1 outcome, shown as "k/n" instead of mean ± std

    def tie_text(self) -> str:
        if self.tie_rel:
            return f"within {self.tie_rel:.0%} (relative)"
        return f"within {self.tie_abs:g}" if self.tie_abs else "equal"


@dataclass
class RunResult:
    final: torch.Tensor  # (S,) the reported metric
    score: torch.Tensor  # (S,) what the learning-rate sweep minimises
    curve_steps: list
    curve: torch.Tensor  # (points, S) the loss curve


@dataclass(frozen=True)
class Task:
    name: str
    metric: Metric
    curve_label: str
    noises: dict  # label shown in the table -> noise parameter handed to run
    lrs: dict  # optimizer family ("adam", "sgd") -> learning-rate grid
    steps: int
    quick_steps: int
    run: Callable  # run(make_opt, seeds, noise, steps) -> RunResult
    noise_free: tuple = ()  # labels of `noises` whose gradient has no noise at all
    seeds: int = 10  # evaluation seeds of a full run
    optimizers: tuple = ()  # names of the optimizers it runs (bench/quality.py); () = the default set


def _rngs(task, seeds):
    return [np.random.default_rng([zlib.crc32(task.encode()), s]) for s in seeds]


def _stack(rngs, draw, dtype=torch.float32):
    return torch.from_numpy(np.stack([draw(r) for r in rngs])).to(dtype)


class _StackedMLP:
    """One MLP per seed (torch.nn.Linear's default init, uniform ±1/sqrt(fan_in)). All weights
    of a seed sit in one row of a single (S, P) parameter: the optimizers are elementwise, so
    this changes no number, but the optimizer handles one tensor instead of one per layer."""

    def __init__(self, rngs, sizes, act):
        self.layers, self.act = list(zip(sizes, sizes[1:])), act
        bounds = [1 / math.sqrt(fan_in) for fan_in, _ in self.layers]
        self.param = _stack(rngs, lambda r: np.concatenate(
            [r.uniform(-bd, bd, n) for bd, (i, o) in zip(bounds, self.layers) for n in (i * o, o)])).requires_grad_()

    def __call__(self, x):
        """x: (S, B, in) -> (S, B, out)."""
        offset = 0
        for k, (i, o) in enumerate(self.layers):
            w = self.param[:, offset:offset + i * o].view(-1, i, o)
            b = self.param[:, offset + i * o:offset + i * o + o].view(-1, 1, o)
            offset += i * o + o
            x = torch.baddbmm(b, x, w)
            if k + 1 < len(self.layers):
                x = self.act(x)
        return x


def _train(params, make_opt, steps, loss_at, curve_at, after_backward=None):
    """The shared loop; records curve_at(t) (a (S,) tensor, before step t) at about CURVE_POINTS steps."""
    opt = make_opt(params)
    every = max(1, steps // CURVE_POINTS)
    curve_steps, curve = [], []

    def record(t):
        with torch.no_grad():
            curve_steps.append(t)
            curve.append(curve_at(t))

    for t in range(steps):
        if t % every == 0:
            record(t)
        opt.zero_grad()
        loss_at(t).backward()
        if after_backward is not None:
            after_backward(t)
        opt.step()
    record(steps)
    return curve_steps, torch.stack(curve)


# --- 1. Noisy XOR ----------------------------------------------------------------------------
_XOR_X = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
_XOR_Y = torch.tensor([0.0, 1.0, 1.0, 0.0])


def run_xor(make_opt, seeds, sigma, steps, act):
    """2-4-1 net (hidden activation `act`, sigmoid output, mean BCE) on the four XOR points;
    N(0, sigma²) is added to every gradient element after backward, as in the published
    WaveGuard experiment. Metric: 1 if all four points are classified correctly."""
    rngs = _rngs("xor", seeds)
    net = _StackedMLP(rngs, (2, 4, 1), act)
    noise = _stack(rngs, lambda r: r.standard_normal((steps, net.param.shape[1])))
    x, y = _XOR_X.expand(len(seeds), 4, 2), _XOR_Y.expand(len(seeds), 4)

    def seed_losses():
        return F.binary_cross_entropy_with_logits(net(x).squeeze(-1), y, reduction="none").mean(1)

    def add_noise(t):
        net.param.grad.add_(noise[:, t], alpha=sigma)

    curve_steps, curve = _train([net.param], make_opt, steps, lambda t: seed_losses().sum(),
                                lambda t: seed_losses(), add_noise if sigma else None)
    with torch.no_grad():
        solved = ((net(x).squeeze(-1) > 0) == (y > 0.5)).all(1).float()
    return RunResult(solved, curve[-1], curve_steps, curve)


# --- 2. Streaming linear regression (a noisy quadratic) -------------------------------------
_REG_DIM, _REG_BATCH = 32, 8
JUMP_EVERY = 200  # steps between two jumps of w* in the `jumps` task (quick runs see one jump)
_REG_EIGS = torch.logspace(0, -2, _REG_DIM)  # feature variances: condition number 100


def _label_noise(rng, df, shape):
    """Unit-variance noise: Gaussian for df=inf, else Student-t(df) rescaled to variance 1,
    so the two noise kinds differ only in their tails."""
    if math.isinf(df):
        return rng.standard_normal(shape)
    return rng.standard_t(df, shape) * math.sqrt((df - 2) / df)


def run_regression(make_opt, seeds, df, steps, jump_every=None):
    """Least squares on fresh minibatches of 8 (x ~ N(0, diag(eigs)), y = x·w* + noise).
    Without jumps, metric: the exact excess risk ½(w − w*)ᵀΣ(w − w*) of the final iterate.
    With `jump_every` = K, w* is redrawn from N(0, I) every K steps (an abrupt change in the
    gradient's mean on top of its noise) and the metric is the excess risk against the current
    w*, averaged over every step of the run: the price of tracking each jump plus the noise
    left between jumps."""
    rngs = _rngs("regression" if jump_every is None else "jumps", seeds)
    segments = 1 if jump_every is None else math.ceil(steps / jump_every)
    w_star = _stack(rngs, lambda r: r.standard_normal((segments, _REG_DIM)))  # (S, segments, D)
    target = (torch.arange(steps) // (jump_every or steps)).clamp_max(segments - 1)  # segment of step t
    x = _stack(rngs, lambda r: r.standard_normal((steps, _REG_BATCH, _REG_DIM))) * _REG_EIGS.sqrt()
    y = torch.einsum("stbd,std->stb", x, w_star[:, target]) + _stack(
        rngs, lambda r: _label_noise(r, df, (steps, _REG_BATCH)))
    w = torch.zeros(len(seeds), _REG_DIM, requires_grad=True)
    risk_sum = torch.zeros(len(seeds))

    def excess_risk(t):
        return 0.5 * ((w - w_star[:, target[min(t, steps - 1)]]).square() * _REG_EIGS).sum(1)

    def loss_at(t):
        with torch.no_grad():
            risk_sum.add_(excess_risk(t))  # of the iterate that step t starts from
        pred = torch.einsum("sbd,sd->sb", x[:, t], w)
        return 0.5 * (pred - y[:, t]).square().mean(1).sum()

    curve_steps, curve = _train([w], make_opt, steps, loss_at, excess_risk)
    metric = curve[-1] if jump_every is None else risk_sum / steps
    return RunResult(metric, metric, curve_steps, curve)


# --- 3 and 4. sklearn's bundled digits ------------------------------------------------------
_DIGITS_HIDDEN = 64


@lru_cache(maxsize=1)
def _digits():
    """A fixed split of load_digits (ships inside scikit-learn): 360 test, 360 validation
    (for the lr sweep), 1077 train; pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(y))
    X = torch.from_numpy(X[perm] / 16.0).float()
    y = torch.from_numpy(y[perm]).long()
    return {"test": (X[:360], y[:360]), "val": (X[360:720], y[360:720]), "train": (X[720:], y[720:])}


def _corrupt(rng, labels, frac):
    """Give a fraction `frac` of the labels a uniformly drawn *different* class."""
    labels = labels.copy()
    idx = rng.choice(len(labels), size=round(frac * len(labels)), replace=False)
    labels[idx] = (labels[idx] + rng.integers(1, 10, size=len(idx))) % 10
    return labels


def _batch_order(rng, n, steps, batch):
    epochs = math.ceil(steps * batch / n)
    return np.concatenate([rng.permutation(n) for _ in range(epochs)])[: steps * batch].reshape(steps, batch)


def _cross_entropy(net, X, y):
    """Per-seed mean cross-entropy of (S, B, 64) inputs against (S, B) labels, and the logits."""
    logits = net(X)
    return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1), logits


def _on_split(net, split):
    X, y = _digits()[split]
    S = net.param.shape[0]
    return _cross_entropy(net, X.expand(S, *X.shape), y.expand(S, -1))


def run_digits(make_opt, seeds, label_noise, steps, batch=8):
    """64-64-10 ReLU MLP, minibatches of 8, a fraction of train labels flipped per seed;
    metric: test accuracy. The lr sweep looks at validation accuracy only."""
    rngs = _rngs("digits", seeds)
    net = _StackedMLP(rngs, (64, _DIGITS_HIDDEN, 10), torch.relu)
    Xtr, ytr = _digits()["train"]
    labels = _stack(rngs, lambda r: _corrupt(r, ytr.numpy(), label_noise), torch.long)
    order = _stack(rngs, lambda r: _batch_order(r, len(ytr), steps, batch), torch.long)

    def loss_at(t):
        idx = order[:, t]
        return _cross_entropy(net, Xtr[idx], labels.gather(1, idx))[0].sum()

    def accuracy(split):
        return (_on_split(net, split)[1].argmax(-1) == _digits()[split][1]).float().mean(1)

    curve_steps, curve = _train([net.param], make_opt, steps, loss_at, lambda t: _on_split(net, "test")[0])
    with torch.no_grad():
        return RunResult(accuracy("test"), -accuracy("val"), curve_steps, curve)


def run_clean(make_opt, seeds, _noise, steps):
    """The same MLP trained full-batch on the clean train set: the gradient has no noise at
    all, so any gap to the baseline is the cost of the filter. Metric: final train loss."""
    net = _StackedMLP(_rngs("clean", seeds), (64, _DIGITS_HIDDEN, 10), torch.relu)

    def train_loss():
        return _on_split(net, "train")[0]

    curve_steps, curve = _train([net.param], make_opt, steps, lambda t: train_loss().sum(), lambda t: train_loss())
    return RunResult(curve[-1], curve[-1], curve_steps, curve)


# --- 5. DP-SGD through Opacus on digits -----------------------------------------------------
DP_BATCH, DP_CLIP, DP_DELTA = 128, 1.0, 1e-5  # expected batch (Poisson sampling), clipping norm C, δ


def _dp_sample_rate():
    return 1 / math.ceil(len(_digits()["train"][1]) / DP_BATCH)  # what make_private derives from the loader


@lru_cache(maxsize=None)
def dp_noise_multiplier(epsilon, steps):
    """σ that spends exactly (ε, δ) over `steps` steps (Opacus' RDP accountant): the same for every
    optimizer, since what an optimizer does with the privatized gradient is post-processing."""
    from opacus.accountants.utils import get_noise_multiplier

    return get_noise_multiplier(target_epsilon=epsilon, target_delta=DP_DELTA, sample_rate=_dp_sample_rate(),
                                steps=steps, accountant="rdp")


def _dp_seed(rng, make_opt, epsilon, steps, every):
    """One seed of run_dp: (test accuracy, validation accuracy, test cross-entropy at every `every` steps)."""
    from opacus import PrivacyEngine

    sizes = (64, _DIGITS_HIDDEN, 10)
    layers = [torch.nn.Linear(i, o) for i, o in zip(sizes, sizes[1:])]
    with torch.no_grad():  # torch.nn.Linear's init, drawn from the seed's generator
        for layer in layers:
            bound = 1 / math.sqrt(layer.in_features)
            for w in (layer.weight, layer.bias):
                w.copy_(torch.from_numpy(rng.uniform(-bound, bound, tuple(w.shape))))
    model = torch.nn.Sequential(layers[0], torch.nn.ReLU(), layers[1])
    data_rng, noise_rng = (torch.Generator().manual_seed(int(rng.integers(2**62))) for _ in range(2))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_digits()["train"]), batch_size=DP_BATCH,
                                         generator=data_rng)
    engine = PrivacyEngine(accountant="rdp")
    model, opt, loader = engine.make_private(module=model, optimizer=make_opt(list(model.parameters())),
                                             data_loader=loader, noise_multiplier=dp_noise_multiplier(epsilon, steps),
                                             max_grad_norm=DP_CLIP, noise_generator=noise_rng)

    def on(split):
        X, y = _digits()[split]
        with torch.no_grad():
            logits = model(X)
        return F.cross_entropy(logits, y).item(), (logits.argmax(-1) == y).float().mean().item()

    curve, t = [], 0
    while t < steps:
        for x, y in loader:
            if t % every == 0:
                curve.append(on("test")[0])
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            t += 1
            if t == steps:
                break
    curve.append(on("test")[0])
    spent = engine.get_epsilon(DP_DELTA)
    assert spent <= epsilon * 1.02, f"spent ε = {spent} > {epsilon}"  # get_noise_multiplier's tolerance is 0.01
    return on("test")[1], on("val")[1], curve


def run_dp(make_opt, seeds, epsilon, steps):
    """DP-SGD (Opacus: per-sample clipping at C = 1, Gaussian noise for (ε, δ = 1e-5) over the run,
    Poisson sampling of expected batch 128) training the digits MLP on the clean train set; the
    optimizer consumes the privatized gradient. Each seed runs on its own (Opacus needs a module
    per model); its init, batch sampling and noise come from the seed's generator, so they are the
    same for every optimizer and lr. Metric: test accuracy; the lr sweep looks at validation accuracy."""
    every = max(1, steps // CURVE_POINTS)
    runs = [_dp_seed(rng, make_opt, epsilon, steps, every) for rng in _rngs("dp", seeds)]
    test, val, curves = (list(x) for x in zip(*runs))
    return RunResult(torch.tensor(test), -torch.tensor(val), list(range(0, steps, every)) + [steps],
                     torch.tensor(curves).T)


# Starting grids, on the 1-3-10 lattice; bench/quality.py widens a grid along the lattice while an
# optimizer's best lr sits at its edge. The XOR grid holds the published lr 0.01.
_REG_NOISES = {"gaussian": math.inf, "student-t(2.5)": 2.5}


TASKS = (
    # The published WaveGuard experiment; its fixed lr 0.01 is one point of the sweep.
    Task("xor", Metric("solved", True, "{:.2f}", count=True), "train BCE (clean)",
         {"σ=0": 0.0, "σ=0.05": 0.05, "σ=0.1": 0.1, "σ=0.2": 0.2},
         {"adam": (1e-2, 3e-2, 1e-1, 3e-1), "sgd": (0.03, 0.1, 0.3, 1.0)}, steps=2000, quick_steps=100,
         run=partial(run_xor, act=torch.sigmoid), noise_free=("σ=0",), seeds=20),  # 0/1 outcomes: 10 is too coarse
    Task("regression", Metric("excess risk", False, "{:.2e}", tie_rel=0.05), "excess risk",
         _REG_NOISES, {"adam": (1e-3, 3e-3, 1e-2, 3e-2), "sgd": (1e-3, 3e-3, 1e-2, 3e-2)}, steps=1500, quick_steps=200,
         run=run_regression),
    Task("jumps", Metric("mean excess risk", False, "{:.3f}", tie_rel=0.05), "excess risk",
         _REG_NOISES, {"adam": (3e-3, 1e-2, 3e-2, 1e-1), "sgd": (3e-3, 1e-2, 3e-2, 1e-1)}, steps=1000, quick_steps=400,
         run=partial(run_regression, jump_every=JUMP_EVERY)),
    Task("digits", Metric("test acc", True, "{:.3f}", tie_abs=0.005), "test cross-entropy",
         {"clean labels": 0.0, "20% label noise": 0.2},
         {"adam": (3e-4, 1e-3, 3e-3, 1e-2), "sgd": (3e-3, 1e-2, 3e-2, 1e-1)}, steps=1500, quick_steps=100,
         run=run_digits),
    Task("clean", Metric("train loss", False, "{:.2e}", tie_rel=0.05), "train cross-entropy",
         {"full batch": 0.0},
         {"adam": (3e-3, 1e-2, 3e-2, 1e-1), "sgd": (0.03, 0.1, 0.3, 1.0)}, steps=300, quick_steps=40, run=run_clean,
         noise_free=("full batch",)),
    # Private training: ε = 1 and 8 at δ = 1e-5 (the noise multiplier follows from ε and the steps).
    Task("dp", Metric("test acc", True, "{:.3f}", tie_abs=0.005), "test cross-entropy",
         {"ε=1": 1.0, "ε=8": 8.0},
         {"adam": (1e-3, 3e-3, 1e-2, 3e-2), "sgd": (0.1, 0.3, 1.0, 3.0)}, steps=400, quick_steps=40, run=run_dp,
         optimizers=("Adam", "Adam β1=0.95", "Adam β1=0.98", "LowPass Adam", "WaveAdam", "SGD", "WaveSGD")),
)
