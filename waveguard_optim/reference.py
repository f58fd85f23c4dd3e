"""The WaveGuard filter and optimizers written the plain way: the test oracle.

Everything here reads like SPEC section 3: an explicit Haar transform, a median, a
gate, a soft threshold, the inverse transform and a weighted sum (with the default
decay 0, just the denoised newest sample). Nothing is folded or fused, and speed does
not matter. Every other code path is tested against it.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Any

import torch
from torch import Tensor

_SQRT2 = math.sqrt(2.0)
MAD_TO_SIGMA = 0.6745


def haar(x: Tensor) -> Tensor:
    """Full-depth orthonormal Haar transform along dim 0 (length a power of two).

    Layout: ``[final approximation, coarsest detail, ..., finest details]``, each
    level's details in time order.
    """
    details = []
    approx = x
    while approx.shape[0] > 1:
        even, odd = approx[0::2], approx[1::2]
        details.append((even - odd) / _SQRT2)
        approx = (even + odd) / _SQRT2
    return torch.cat([approx] + details[::-1])


def inverse_haar(c: Tensor) -> Tensor:
    """Inverse of :func:`haar`."""
    approx = c[:1]
    width = 1
    while width < c.shape[0]:
        detail = c[width : 2 * width]
        x = torch.empty((2 * width, *c.shape[1:]), dtype=c.dtype, device=c.device)
        x[0::2] = (approx + detail) / _SQRT2
        x[1::2] = (approx - detail) / _SQRT2
        approx = x
        width *= 2
    return approx


def recency_weights(buffer_size: int, decay: float) -> Tensor:
    """w_j = decay^(N-1-j) / sum_k decay^(N-1-k), oldest first, in float64; decay 0 gives
    (0, ..., 0, 1) (Python's 0.0 ** 0 is 1)."""
    powers = torch.tensor([decay ** (buffer_size - 1 - j) for j in range(buffer_size)], dtype=torch.float64)
    return powers / powers.sum()


def weighted_sum(w: Tensor, x: Tensor) -> Tensor:
    """sum_j w_j x_j along dim 0, leaving out the terms whose weight is exactly 0 (SPEC section 3:
    a non-finite sample the weights ignore must not turn the sum into NaN, as 0 * inf would)."""
    terms = [weight * x[j] for j, weight in enumerate(w.tolist()) if weight != 0]
    return functools.reduce(operator.add, terms)  # not sum(): 0 + (-0.0) would be +0.0


def gate_scale(m: Tensor) -> Tensor:
    """A power of two 2^k with ``m * 2^k`` in [1, 2) (k clamped so that 2^k is a normal number),
    elementwise, for ``m >= 0`` of dtype float32 or float64 (NaN with a clear sign bit is fine).

    The SNR gate squares coefficients up to ``m`` after scaling them by 2^k, so its energies
    cannot overflow or underflow to 0 (SPEC section 3, step 5), and scaling by a power of two
    is exact: gamma, a ratio of energies, keeps its value wherever nothing overflowed.
    The fused kernels build the same number from the same bits.
    """
    int_dtype, mantissa_bits, bias = {torch.float32: (torch.int32, 23, 127), torch.float64: (torch.int64, 52, 1023)}[m.dtype]
    # Shifts written as // and * (m >= 0): torch 2.13's DTensor (FSDP2 shards) returns >> unshifted.
    exponent = m.view(int_dtype) // 2**mantissa_bits  # the biased exponent field: m is 2^(exponent - bias) * 1.f
    return ((2 * bias - exponent).clamp_min(1) * 2**mantissa_bits).view(m.dtype)


def median(x: Tensor) -> Tensor:
    """Median along dim 0; an even count gives the mean of the two middle values."""
    ordered = x.sort(dim=0).values
    k = x.shape[0]
    if k % 2:
        return ordered[k // 2]
    return (ordered[k // 2 - 1] + ordered[k // 2]) / 2


def reference_filter(
    buffer: Tensor, *, decay: float, threshold_scale: float, snr_gate: bool, dtype: torch.dtype | None = None
) -> Tensor:
    """Denoised gradient from ``buffer`` of shape ``(N, *shape)``, oldest first (SPEC section 3).

    ``dtype`` is the arithmetic's: float64 for float64 parameters, float32 for all others,
    whatever the buffer's storage dtype; None takes it from the buffer.
    """
    if dtype is None:
        dtype = torch.float64 if buffer.dtype == torch.float64 else torch.float32
    b = buffer.to(dtype)
    n = b.shape[0]
    w = recency_weights(n, decay)
    if threshold_scale == 0:  # no threshold: d = c, and Haar^-1(Haar(b)) = b (SPEC section 3, folded form)
        return weighted_sum(w, b)

    c = haar(b)
    finest = c[n // 2 :]
    sigma = median(finest.abs()) / MAD_TO_SIGMA
    universal = sigma * math.sqrt(2.0 * math.log(n))

    if snr_gate:
        scaled = c * gate_scale(c.abs().amax(0))  # exact; the squares cannot overflow
        e_coarse = (scaled[: n // 2] ** 2).sum(0)
        e_fine = (scaled[n // 2 :] ** 2).sum(0)
        total = e_coarse + e_fine
        gate = torch.where(total > 0, e_fine / total, torch.zeros_like(total))
    else:
        gate = torch.ones_like(universal)
    tau = threshold_scale * gate * universal

    # Soft threshold of the details: d_i = sign(c_i) max(|c_i| - tau, 0) = c_i - clamp(c_i, -tau, tau).
    # By linearity Haar^-1(d) = b - Haar^-1(c - d): computed so, a huge gradient in the window
    # does not swamp the others in the inverse transform's sums (they would cancel to rounding noise).
    removed = torch.zeros_like(c)
    removed[1:] = torch.clamp(c[1:], -tau, tau)
    return weighted_sum(w, b - inverse_haar(removed))


class ReferenceWave:
    """A WaveGuard optimizer the plain way: a list of the last N raw gradients per
    parameter, :func:`reference_filter`, and torch's own optimizer run on the result.

    ``optimizer_cls`` is ``torch.optim.Adam`` or ``torch.optim.SGD``; the remaining keyword
    arguments go to it. For the inner optimizer's step, each ``.grad`` is swapped for the
    denoised gradient and put back afterwards.
    """

    def __init__(
        self,
        params: Any,
        optimizer_cls: type[torch.optim.Optimizer],
        *,
        buffer_size: int = 8,
        decay: float = 0.0,
        threshold_scale: float = 1.0,
        snr_gate: bool = True,
        buffer_dtype: torch.dtype | None = None,
        maximize: bool = False,
        **optimizer_kwargs: Any,
    ) -> None:
        self.params = list(params)
        self.buffer_size = buffer_size
        self.filter_options = dict(decay=decay, threshold_scale=threshold_scale, snr_gate=snr_gate)
        self.buffer_dtype = buffer_dtype
        self.maximize = maximize
        self.history: dict[Tensor, list[Tensor]] = {p: [] for p in self.params}
        # The history already holds -grad under maximize, so the inner optimizer must not negate again.
        self.inner = optimizer_cls(self.params, maximize=False, **optimizer_kwargs)

    def denoised(self, p: Tensor) -> Tensor:
        """Record ``p.grad`` and return the gradient the inner optimizer should see."""
        grad = -p.grad if self.maximize else p.grad
        dtype = p.dtype if (p.is_complex() or self.buffer_dtype is None) else self.buffer_dtype
        history = self.history[p]
        history.append(grad.to(dtype, copy=True))
        del history[: -self.buffer_size]
        if len(history) < self.buffer_size:
            return grad.clone()
        buffer = torch.stack(history)
        real_dtype = torch.view_as_real(grad).dtype if p.is_complex() else p.dtype
        arithmetic = torch.float64 if real_dtype == torch.float64 else torch.float32
        if p.is_complex():
            out = reference_filter(torch.view_as_real(buffer), **self.filter_options, dtype=arithmetic)
            return torch.view_as_complex(out.to(real_dtype).contiguous())
        return reference_filter(buffer, **self.filter_options, dtype=arithmetic).to(p.dtype)

    @torch.no_grad()
    def step(self) -> None:
        with_grad = [p for p in self.params if p.grad is not None]
        raw = {p: p.grad for p in with_grad}
        for p in with_grad:
            p.grad = self.denoised(p)
        self.inner.step()
        for p in with_grad:
            p.grad = raw[p]
