"""What the WaveGuard filter did at the last step, recomputed on demand from the history.

The history as stored holds the last N gradients of each parameter, the newest included,
so everything the filter computed at a parameter's last step can be recomputed from
``optimizer.state`` when asked, with the same functions (filter.py), and nothing at all
has to be done or kept during steps: there is no ``track_stats`` switch because tracking
would cost something and give the same numbers.

Per param group, :func:`wave_stats` returns plain floats:

``filtered``
    fraction of the group's elements whose history is full (the filter applied); 0 during warm-up.
``gate``, ``threshold``, ``noise``
    means over those elements of the SNR gate γ (1 with ``snr_gate=False``), of the
    threshold τ = κ·γ·σ̂·√(2 ln N) and of the noise estimate σ̂ = median(|finest details|) / 0.6745.
``zeroed``
    fraction of their detail coefficients (N − 1 per element, all levels) that the soft
    threshold sets to zero, i.e. with |c_i| ≤ τ (a detail that is exactly 0 counts).
``relative_change``
    ‖ĝ − g‖ / ‖g‖ over the whole group: g the newest recorded gradient, ĝ what the
    optimizer consumed (ĝ = g during warm-up); 0.0 when both are 0.

The means are NaN when no element is filtered, ``relative_change`` NaN when the group has
recorded no gradient. "The last step" is each parameter's last recorded gradient (a
parameter without ``.grad`` at a step keeps its older history). g is the stored copy: with
a low-precision ``buffer_dtype`` it is the gradient rounded to that dtype (during warm-up
the optimizer got the unrounded one, and ``relative_change`` counts 0 there). The
filter arithmetic is that of the multi-tensor path; a fused kernel's ĝ may differ from
it by rounding. For sharded (DTensor) parameters the numbers describe this rank's shard.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .denoise import _to_compute
from .filter import _gate, _haar_levels, _median, compute_dtype, fold_filter, threshold_scale_factor
from .history import COUNT_KEY, time_ordered
from .options import filter_options
from .reference import MAD_TO_SIGMA

__all__ = ["wave_stats"]


# Accumulated per device as float64: elements, filtered elements, sum gamma, sum tau,
# sum sigma, zeroed details, ||g_hat - g||^2, ||g||^2.
_N_SUMS = 8


def _local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor; any other tensor as is."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _param_sums(state: dict[str, Any], p: Tensor, group: dict[str, Any]) -> Tensor:
    n, count = group["buffer_size"], int(state[COUNT_KEY])
    dtype = compute_dtype(p.dtype)
    slots = [[_to_compute(_local(b), dtype)] for b in time_ordered(state, n, count)]
    (g,) = slots[-1]
    zero = g.new_zeros((), dtype=torch.float64)
    elements = float(g.numel())
    if count < n:  # warm-up: the optimizer used g itself
        return torch.stack([zero + elements, zero, zero, zero, zero, zero, zero, g.double().square().sum()])

    (g_hat,) = fold_filter(slots, **filter_options(group))
    zeroed = zero.clone()
    for width, approx, details in _haar_levels(slots):
        if width == n // 2:  # the finest level sets the threshold, as in filter._tau (same order)
            (median,) = _median([torch._foreach_abs(d) for d in details])
            (gamma,) = _gate(approx, details) if group["snr_gate"] else [torch.ones_like(g)]
            tau = median * threshold_scale_factor(n, group["threshold_scale"]) * gamma
        for (d,) in details:
            zeroed += (d.abs() <= tau).sum(dtype=torch.float64)
    return torch.stack(
        [
            zero + elements,
            zero + elements,
            gamma.sum(dtype=torch.float64),
            tau.sum(dtype=torch.float64),
            median.sum(dtype=torch.float64) / MAD_TO_SIGMA,
            zeroed,
            (g_hat - g).double().square().sum(),
            g.double().square().sum(),
        ]
    )


def _summary(sums: list[float], buffer_size: int) -> dict[str, float]:
    elements, filtered, gamma, tau, sigma, zeroed, diff_sq, g_sq = sums
    nan = math.nan
    if diff_sq == 0:
        relative = 0.0 if elements else nan
    else:
        relative = math.sqrt(diff_sq) / math.sqrt(g_sq) if g_sq else math.inf
    return {
        "filtered": filtered / elements if elements else 0.0,
        "gate": gamma / filtered if filtered else nan,
        "threshold": tau / filtered if filtered else nan,
        "noise": sigma / filtered if filtered else nan,
        "zeroed": zeroed / (filtered * (buffer_size - 1)) if filtered else nan,
        "relative_change": relative,
    }


def innermost(optimizer: Any) -> Any:
    """The optimizer inside framework wrappers, which hold it as ``.optimizer`` (accelerate,
    Lightning, a :class:`WaveGuardHandle`) or ``.original_optimizer`` (Opacus); anything else as is.
    An LR scheduler also holds its optimizer as ``.optimizer`` but is not a wrapper of it: it is
    returned as is, so that passing one by mistake is refused, not quietly accepted."""
    while not isinstance(optimizer, torch.optim.lr_scheduler.LRScheduler):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None:
            inner = getattr(optimizer, "original_optimizer", None)
        if inner is None or inner is optimizer:
            return optimizer
        optimizer = inner
    return optimizer


def _filtering(optimizer: Any) -> torch.optim.Optimizer:
    """The optimizer inside any framework wrappers, refused unless the WaveGuard filter runs in it."""
    from .base import WaveGuardMixin  # imported here: base and wrap import this module
    from .wrap import _HANDLE_ATTR

    outer, optimizer = optimizer, innermost(optimizer)
    handle = getattr(optimizer, _HANDLE_ATTR, None)
    if not isinstance(optimizer, WaveGuardMixin) and not (handle is not None and handle.active):
        what = type(optimizer).__name__ + ("" if optimizer is outer else f" inside {type(outer).__name__}")
        raise ValueError(
            f"wave_stats: {what} is not filtered by WaveGuard (use WaveAdam / WaveSGD, or wave_guard(optimizer); "
            "a removed wave_guard handle filters no more)"
        )
    return optimizer


@torch.no_grad()
def wave_stats(optimizer: torch.optim.Optimizer) -> list[dict[str, float]]:
    """Summaries of the filter's last step, one dict per param group (see the module docstring).

    Works for WaveAdam, WaveSGD and any optimizer wrapped by :func:`waveguard_optim.wave_guard`,
    also behind the wrappers that frameworks hand out (accelerate's ``AcceleratedOptimizer``,
    Lightning's ``LightningOptimizer``, a :class:`WaveGuardHandle`, Opacus' ``DPOptimizer``):
    whatever holds the optimizer as ``.optimizer`` or ``.original_optimizer`` is unwrapped. Any
    other optimizer raises ``ValueError`` (its numbers would describe no filter). Costs one filter
    evaluation per parameter and one device sync per group and device; nothing is computed unless
    this is called.
    """
    optimizer = _filtering(optimizer)
    result = []
    for index, group in enumerate(optimizer.param_groups):
        if "buffer_size" not in group:
            raise ValueError(f"param group {index} has no WaveGuard options (added by hand?)")
        per_device: dict[torch.device, Tensor] = {}
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state or COUNT_KEY not in state:
                continue
            sums = _param_sums(state, p, group)
            per_device[sums.device] = per_device[sums.device] + sums if sums.device in per_device else sums
        total = [0.0] * _N_SUMS
        for sums in per_device.values():
            total = [a + b for a, b in zip(total, sums.tolist())]
        result.append(_summary(total, group["buffer_size"]))
    return result
