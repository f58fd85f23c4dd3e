"""Record each gradient into its history and return the denoised gradients (SPEC section 4).

``record_and_filter`` is the functional entry point shared by WaveAdam and WaveSGD (after
``claim_histories`` has advanced the rings); it dispatches to
a single-tensor path (the filter per parameter: the least temporary memory) or a
multi-tensor path (the filter over all tensors of a device and dtype at once: the fewest
kernel launches). Both run :func:`waveguard_optim.filter.fold_filter`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._compat import marked_static_by_dynamo
from .filter import compute_dtype, fold_filter
from .history import COUNT_KEY, advance, check_ring_size, start_history, time_ordered
from .options import resolve_buffer_dtype


def _to_compute(t: Tensor, dtype: torch.dtype) -> Tensor:
    return (torch.view_as_real(t) if t.is_complex() else t).to(dtype)


def _from_compute(x: Tensor, p: Tensor) -> Tensor:
    if p.is_complex():
        return torch.view_as_complex(x.to(torch.view_as_real(p).dtype))
    return x.to(p.dtype)


def _single_tensor_filter(params: list[Tensor], slots: list[list[Tensor]], options: dict[str, Any]) -> list[Tensor]:
    out = []
    for p, history in zip(params, slots):
        dtype = compute_dtype(p.dtype)
        (g_hat,) = fold_filter([[_to_compute(b, dtype)] for b in history], **options)
        out.append(_from_compute(g_hat, p))
    return out


def _multi_tensor_filter(params: list[Tensor], slots: list[list[Tensor]], options: dict[str, Any]) -> list[Tensor]:
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(params):
        buckets.setdefault((p.device, compute_dtype(p.dtype)), []).append(i)
    out: list[Tensor] = [None] * len(params)  # type: ignore[list-item]
    for (_, dtype), members in buckets.items():
        time_major = [[_to_compute(slots[i][j], dtype) for i in members] for j in range(len(slots[members[0]]))]
        for i, g_hat in zip(members, fold_filter(time_major, **options)):
            out[i] = _from_compute(g_hat, params[i])
    return out


@torch.compiler.disable
def claim_histories(
    params: list[Tensor],
    states: list[dict[str, Any]],
    *,
    buffer_size: int,
    buffer_dtype: str | torch.dtype | None,
    counts_on_device: bool = False,
) -> tuple[list[list[Tensor]], list[bool]]:
    """Advance each parameter's ring by one gradient (creating it on the first, its count on the
    parameter's device with ``counts_on_device``).

    Returns, per parameter, its slots oldest first (the last one is where the current
    gradient must be written) and whether the history is full, i.e. the filter applies.
    Never traced by torch.compile: what it returns depends on the counts only through which
    tensors are where and the ``full`` flags, so a compiled step does not specialise on the
    ring position.
    """
    for s in states:
        check_ring_size(s, buffer_size)
    dtype = resolve_buffer_dtype(buffer_dtype)
    for s, p in zip(states, params):
        if COUNT_KEY not in s:
            start_history(s, p, buffer_size, dtype, counts_on_device)
    before = advance(states)
    histories = [time_ordered(s, buffer_size, c + 1) for s, c in zip(states, before)]
    if histories and marked_static_by_dynamo(histories[0][0]):  # under torch.compile: no guard on which slot is where
        histories = [[b.view_as(b) for b in h] for h in histories]
    return histories, [c + 1 >= buffer_size for c in before]


def record_and_filter(
    params: list[Tensor],
    grads: list[Tensor],
    histories: list[list[Tensor]],
    full: list[bool],
    *,
    decay: float,
    threshold_scale: float,
    snr_gate: bool,
    maximize: bool,
    grad_scale: Tensor | None,
    foreach: bool,
) -> list[Tensor]:
    """Write each gradient (negated under ``maximize``, divided by ``grad_scale`` if given)
    into ``histories[i][-1]`` and return the gradient each update should use: the raw one
    during warm-up, the filtered one where ``full[i]``. ``grads`` are never modified.

    This is also the pure-torch twin of the fused kernels, which take the same arguments.
    """
    if grad_scale is not None:
        grads = [g / grad_scale.to(g.device) for g in grads]
    if maximize:
        grads = torch._foreach_neg(grads) if foreach else [-g for g in grads]
    newest = [h[-1] for h in histories]
    # DTensor (FSDP2) has no sharding rule for _foreach_copy_ (torch 2.13); the filter's other foreach ops have one.
    if foreach and all(type(t) is Tensor for t in newest):
        torch._foreach_copy_(newest, grads)
    else:
        for slot, g in zip(newest, grads):
            slot.copy_(g)

    ready = [i for i, f in enumerate(full) if f]
    out = list(grads)
    if ready:
        path = _multi_tensor_filter if foreach else _single_tensor_filter
        options = dict(decay=decay, threshold_scale=threshold_scale, snr_gate=snr_gate)
        for i, g_hat in zip(ready, path([params[i] for i in ready], [histories[i] for i in ready], options)):
            out[i] = g_hat
    return out
