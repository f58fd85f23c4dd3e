"""The WaveGuard filter in its folded form, over lists of tensors (SPEC section 3).

This module owns the fast math: the recency weights ``w`` and their Haar transform ``u``,
the median of the finest detail magnitudes (a pruned sorting network of min/max, so no
sort and no stacking), the SNR gate, and

    g_hat = sum_j w_j b_j - sum_{i>=1} u_i clamp(c_i, -tau, tau),

leaving out every term whose weight is exactly 0. With the default decay 0, w = (0, ..., 0, 1)
and u has one nonzero detail per level, so g_hat = b_{N-1} minus log2(N) clamped details
(only the median and the gate need the whole finest level).

All arithmetic is ``torch._foreach_*`` over lists, one entry per tensor: the multi-tensor
path passes many tensors at once, the single-tensor path one at a time. The fused kernels
reuse :func:`filter_weights`, :func:`median_network` and :func:`threshold_scale_factor` so that
the constants are derived in one place.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from .reference import MAD_TO_SIGMA, gate_scale, haar, recency_weights

TensorList = list[Tensor]
_SQRT_HALF = math.sqrt(0.5)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The filter's arithmetic dtype (SPEC section 3): float64 for float64 (and complex128)
    parameters, float32 for every other parameter dtype."""
    return torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32


@torch.compiler.assume_constant_result  # torch.compile: constants of the trace, not a graph break
def filter_weights(buffer_size: int, decay: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(w, u)`` as Python floats computed in float64: the recency weights and ``u = Haar(w)``
    (computed once per ``(buffer_size, decay)``: steps ask for them every time)."""
    key = (buffer_size, decay)
    if key not in _FILTER_WEIGHTS:
        w = recency_weights(buffer_size, decay)
        _FILTER_WEIGHTS[key] = tuple(w.tolist()), tuple(haar(w).tolist())
    return _FILTER_WEIGHTS[key]


_FILTER_WEIGHTS: dict[tuple[int, float], tuple[tuple[float, ...], tuple[float, ...]]] = {}


def threshold_scale_factor(buffer_size: int, threshold_scale: float) -> float:
    """kappa * sqrt(2 ln N) / 0.6745: turns the median of finest |details| into tau (gate aside)."""
    return threshold_scale * math.sqrt(2.0 * math.log(buffer_size)) / MAD_TO_SIGMA


def _sorting_network(n: int) -> list[tuple[int, int]]:
    """Batcher's odd-even merge sort for a power-of-two ``n``: compare-exchange pairs (lo, hi)."""
    pairs = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return pairs


@torch.compiler.assume_constant_result  # a constant of the trace (dynamo warns when it traces an lru_cache)
def median_network(n: int) -> tuple[tuple[tuple[int, int, bool, bool], ...], tuple[int, ...]]:
    """The part of a sorting network of ``n`` wires that the median needs (built once per ``n``).

    Returns ``(steps, middle)``: each step ``(lo, hi, need_min, need_max)`` writes
    ``min`` to wire ``lo`` and/or ``max`` to wire ``hi``; afterwards the wires in
    ``middle`` (one for odd ``n``, two for even) hold the middle order statistics.
    Comparators whose outputs never reach the middle are dropped.
    """
    if n in _MEDIAN_NETWORKS:
        return _MEDIAN_NETWORKS[n]
    middle = (n // 2,) if n % 2 else (n // 2 - 1, n // 2)
    wanted = set(middle)
    steps = []
    for lo, hi in reversed(_sorting_network(n)):
        need_min, need_max = lo in wanted, hi in wanted
        if need_min or need_max:
            steps.append((lo, hi, need_min, need_max))
            wanted |= {lo, hi}
    network = _MEDIAN_NETWORKS[n] = tuple(reversed(steps)), middle
    return network


_MEDIAN_NETWORKS: dict[int, tuple[tuple[tuple[int, int, bool, bool], ...], tuple[int, ...]]] = {}


def _median(values: list[TensorList]) -> TensorList:
    """Elementwise median of ``len(values)`` tensor lists (the inputs are not modified)."""
    steps, middle = median_network(len(values))
    wires = list(values)
    for lo, hi, need_min, need_max in steps:
        a, b = wires[lo], wires[hi]
        if need_min:
            wires[lo] = torch._foreach_minimum(a, b)
        if need_max:
            wires[hi] = torch._foreach_maximum(a, b)
    if len(middle) == 1:
        return wires[middle[0]]
    out = torch._foreach_add(wires[middle[0]], wires[middle[1]])
    torch._foreach_mul_(out, 0.5)
    return out


def _haar_level(
    x: Sequence[TensorList], *, with_approx: bool = True, wanted: Sequence[bool] | None = None
) -> tuple[list[TensorList], list[TensorList | None]]:
    """One Haar level over time-ordered tensor lists: (approximations, details); the details
    not ``wanted`` (default: all) are not computed and are None."""
    approx, details = [], []
    for k, (even, odd) in enumerate(zip(x[0::2], x[1::2])):
        if wanted is None or wanted[k]:
            d = torch._foreach_sub(even, odd)
            torch._foreach_mul_(d, _SQRT_HALF)
            details.append(d)
        else:
            details.append(None)
        if with_approx:
            a = torch._foreach_add(even, odd)
            torch._foreach_mul_(a, _SQRT_HALF)
            approx.append(a)
    return approx, details


def _haar_levels(
    slots: Sequence[TensorList], u: Sequence[float] | None = None
) -> Iterator[tuple[int, list[TensorList], list[TensorList | None]]]:
    """``(width, approximations, details)`` of every Haar level over time, finest first; the
    ``width`` details of a level pair with ``u[width : 2 * width]``. The coarsest level has no
    approximations (nothing reads them). Given ``u``, the details of the coarser levels whose
    ``u_i`` is 0 are None (not computed); the finest level is always whole (median, gate)."""
    width = len(slots) // 2
    approx, details = _haar_level(slots)
    while True:
        yield width, approx, details
        if width == 1:
            return
        width //= 2
        wanted = None if u is None else [x != 0 for x in u[width : 2 * width]]
        approx, details = _haar_level(approx, with_approx=width > 1, wanted=wanted)


def _sum_of_squares(x: list[TensorList]) -> TensorList:
    total = torch._foreach_mul(x[0], x[0])
    for t in x[1:]:
        torch._foreach_addcmul_(total, t, t)
    return total


def _gate(approx: list[TensorList], details: list[TensorList]) -> TensorList:
    """gamma = E_f / (E_c + E_f) from the first Haar level (coarse energy by Parseval); 0 where both are 0.

    The energies are those of the coefficients times ``gate_scale`` of their largest magnitude:
    exact, and no square overflows (SPEC section 3, step 5), so gamma is finite for finite input.
    """
    coefficients = approx + details
    largest = torch._foreach_abs(coefficients[0])
    for c in coefficients[1:]:
        torch._foreach_maximum_(largest, torch._foreach_abs(c))
    scale = [gate_scale(m) for m in largest]
    scaled = [torch._foreach_mul(c, scale) for c in coefficients]
    e_fine = _sum_of_squares(scaled[len(approx) :])
    total = torch._foreach_add(_sum_of_squares(scaled[: len(approx)]), e_fine)
    # total is 0, NaN or >= (2^-22)^2 (the largest coefficient is scaled to >= 2^-22, 2^-51 in
    # float64): raising an exact 0 to the smallest *normal* number makes 0/0 -> 0 and changes nothing
    # else. Not a subnormal floor: torch.set_flush_denormal(True) would flush it to 0 (0/0 = NaN).
    torch._foreach_clamp_min_(total, torch.finfo(total[0].dtype).smallest_normal)
    torch._foreach_div_(e_fine, total)
    return e_fine


def _tau(approx: list[TensorList], details: list[TensorList], *, scale: float, snr_gate: bool) -> TensorList:
    """tau = kappa * gamma * T from the first Haar level."""
    tau = _median([torch._foreach_abs(d) for d in details])
    torch._foreach_mul_(tau, scale)
    if snr_gate:
        torch._foreach_mul_(tau, _gate(approx, details))
    return tau


def fold_filter(
    slots: Sequence[TensorList], *, decay: float, threshold_scale: float, snr_gate: bool
) -> TensorList:
    """Denoised gradients from ``slots[j]``, the j-th oldest of the last N gradients of each tensor.

    The inputs are read, never written; they must share the compute dtype (float32 or
    float64). Returns new tensors of that dtype. Terms whose weight (w_j or u_i) is exactly 0
    are not evaluated (SPEC section 3): with decay 0 and threshold_scale 0 the result is the
    newest gradient bit for bit, whatever the older slots hold.
    """
    n = len(slots)
    w, u = filter_weights(n, decay)
    terms = [(weight, b) for weight, b in zip(w, slots) if weight != 0]  # w_j ascends: zeros come first
    out = torch._foreach_mul(terms[0][1], terms[0][0])
    for weight, b in terms[1:]:
        torch._foreach_add_(out, b, alpha=weight)
    if threshold_scale == 0 or not any(u[1:]):  # tau = 0, or decay 1 (every u_i = 0): no correction
        return out

    levels = _haar_levels(slots, u)
    width, approx, details = next(levels)
    tau = _tau(approx, details, scale=threshold_scale_factor(n, threshold_scale), snr_gate=snr_gate)
    neg_tau = torch._foreach_neg(tau)
    while True:
        for weight, d in zip(u[width : 2 * width], details):
            if weight == 0:
                continue
            torch._foreach_maximum_(d, neg_tau)
            torch._foreach_minimum_(d, tau)
            torch._foreach_add_(out, d, alpha=-weight)
        if width == 1:
            return out
        width, approx, details = next(levels)
