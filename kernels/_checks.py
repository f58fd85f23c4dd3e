"""Checks shared by the fused kernels (C and Triton) on the tensors they reach through raw
pointers, run before anything is written: a kernel trusts its pointer table completely, so a
wrong dtype, an expanded tensor or two operands sharing memory would otherwise be an
out-of-bounds or racing write (issue 11)."""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence

import numpy as np
from torch import Tensor

_DTYPE, _NBYTES = operator.attrgetter("dtype"), operator.attrgetter("nbytes")


def overlaps_itself(t: Tensor) -> bool:
    """Whether two indices of ``t`` may address one element (a stride 0: ``expand``, some
    ``as_strided`` views). Writing through such a tensor loses or races updates. Conservative:
    the dims sorted by stride must each step past everything the smaller ones span."""
    if t.numel() == 0:
        return False
    extent = 0
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride <= extent:
            return True
        extent += stride * (size - 1)
    return False


def byte_span(t: Tensor) -> tuple[int, int]:
    """``[first byte, last byte + 1)`` of the memory ``t`` addresses."""
    start = t.data_ptr()
    if t.is_contiguous():
        return start, start + t.numel() * t.element_size()
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return start, start + (last + 1) * t.element_size()


def check_memory(name: str, written: Mapping[str, Sequence[Tensor | None]], read: Mapping[str, Sequence[Tensor | None]]) -> None:
    """Refuse (``RuntimeError`` naming the tensors) a ``written`` tensor that overlaps itself or
    whose memory overlaps that of any other operand, written or read. Two read tensors may share
    memory. ``None`` and empty tensors are skipped. The usual case (nothing shared) costs a few
    C-level passes over the list and one sort."""
    columns = [*written.items(), *read.items()]
    tensors = [t for values in written.values() for t in values if t is not None]
    is_written = np.zeros(len(tensors) + sum(map(len, read.values())), dtype=bool)
    is_written[: len(tensors)] = True
    tensors += [t for values in read.values() for t in values if t is not None]
    count = len(tensors)
    is_written = is_written[:count]
    starts = np.fromiter(map(Tensor.data_ptr, tensors), dtype=np.int64, count=count)
    ends = starts + np.fromiter(map(_NBYTES, tensors), dtype=np.int64, count=count)  # exact where contiguous
    strided = np.flatnonzero(~np.fromiter(map(Tensor.is_contiguous, tensors), dtype=bool, count=count))
    for k in strided.tolist():
        if is_written[k] and overlaps_itself(tensors[k]):
            column, i = _label(columns, k)
            t = tensors[k]
            raise RuntimeError(
                f"{name}: {column}[{i}] has overlapping elements (shape {tuple(t.shape)}, strides {t.stride()}, "
                "e.g. an expanded tensor); the kernel writes it in place, so it needs memory of its own (.clone() it)"
            )
        starts[k], ends[k] = byte_span(tensors[k])
    present = np.flatnonzero(ends > starts)
    order = present[np.argsort(starts[present], kind="stable")]
    if len(order) < 2 or not (starts[order[1:]] < np.maximum.accumulate(ends[order])[:-1]).any():
        return  # no two operands share a byte
    for w in np.flatnonzero(is_written & (ends > starts)).tolist():
        hits = (starts < ends[w]) & (starts[w] < ends) & (ends > starts)
        hits[w] = False
        if hits.any():
            (column, i), (other, j) = _label(columns, w), _label(columns, int(np.flatnonzero(hits)[0]))
            raise RuntimeError(
                f"{name}: {column}[{i}] shares memory with {other}[{j}]; the kernel writes {column}[{i}] "
                "in place, so it needs memory of its own (.clone() it)"
            )


def check_step_memory(
    name: str,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: Mapping[str, Sequence[Tensor | None]],
    steps: Sequence[Tensor | None],
    histories: Sequence[Sequence[Tensor]],
) -> None:
    """:func:`check_memory` on the operands of one fused step: it writes the parameters, their
    state, the step counts given (None: not written in place) and the newest history slot, and
    reads the gradients and the older slots."""
    newest = [h[-1] for h in histories]
    older = [s for h in histories for s in h[:-1]]
    written = dict(params=params, **state, state_steps=steps, newest_history_slots=newest)
    check_memory(name, written, dict(grads=grads, older_history_slots=older))


def _label(columns: list[tuple[str, Sequence[Tensor | None]]], k: int) -> tuple[str, int]:
    """(column, index) of the k-th non-None tensor of ``columns`` (for error messages)."""
    for column, values in columns:
        for i, t in enumerate(values):
            if t is not None:
                if k == 0:
                    return column, i
                k -= 1
    raise IndexError(k)


def check_state_dtypes(name: str, params: Sequence[Tensor], state: Mapping[str, Sequence[Tensor]]) -> None:
    """Every Adam state tensor has its parameter's dtype, as torch's Adam requires: after
    ``model.double()`` on an optimizer with state, torch raises ``expected dtype float for `end`
    but got dtype double``; so does this, before anything changes."""
    pdtypes = list(map(_DTYPE, params))
    for column, tensors in state.items():
        if list(map(_DTYPE, tensors)) == pdtypes:
            continue
        i, t = next((i, t) for i, t in enumerate(tensors) if t.dtype != pdtypes[i])
        raise RuntimeError(
            f"{name}: expected dtype {pdtypes[i]} for {column}[{i}] (its parameter's dtype, as torch.optim.Adam "
            f"requires) but got dtype {t.dtype}; after converting a model (model.double(), .half(), ...) convert "
            "the optimizer's state too, or create the optimizer again"
        )


def check_steps(name: str, state_steps: Sequence[Tensor]) -> None:
    """Every step count is a one-element tensor (the kernels read and write one value)."""
    if not all(t.numel() == 1 for t in state_steps):
        i = next(i for i, t in enumerate(state_steps) if t.numel() != 1)
        raise RuntimeError(f"{name}: state_steps[{i}] must be a one-element tensor, got shape {tuple(state_steps[i].shape)}")
