"""A param group's validated fused step, reused while nothing it points at changed (issue 18).

The full step (``cpu_step.fused_wave_*_``) validates every operand each call: dtypes, devices,
sizes, layout and aliasing (``_checks``), and claims the ring slots with a ``.item()`` per count.
On many small tensors that bookkeeping costs several times the kernel. After a full step has
validated a group's tensors, the optimizer keeps a :class:`StepPlan` of them: their addresses in
storage order (slots ``wave_history_0 ...``, not time order), and the group's ring counts (and
Adam's steps) made views of one buffer (one add advances them all; the ring is read from it
each step, so a count restored in place, as ``torch.distributed.checkpoint`` does, is seen). A later step only
collects the gradients and checks them, and confirms that every cached tensor is the same
object with the same data pointer and byte count: ``resize_``, ``set_`` and ``p.data = ...``
(``model.to``) change the pointer or the byte count, and an edited ``opt.state[p]`` or
``load_state_dict`` puts other objects there. Values written in place need nothing: the kernel
reads the memory. The plan holds every storage it points at, so a freed address cannot come
back as another tensor's while the plan exists: an edit that keeps pointer and byte count (a
``.data =`` of a dtype of the same size, an in-place ``t_()`` or ``as_strided_``) reinterprets
memory the plan holds; the kernel stays inside it, but such an edit is not detected (its numbers
are those of the memory as the plan saw it). Any difference: the caller takes the full step,
which validates from scratch and builds a new plan.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from waveguard_optim.history import COUNT_KEY, slot_key
from waveguard_optim.kernels._checks import check_memory
from waveguard_optim.kernels.native_check import native_check

_NBYTES = operator.attrgetter("nbytes")
_DTYPE, _DEVICE, _IS_SPARSE = operator.attrgetter("dtype"), operator.attrgetter("device"), operator.attrgetter("is_sparse")


def _ints(values: Any, count: int) -> np.ndarray:
    return np.fromiter(values, dtype=np.int64, count=count)


def _list(values: Sequence[Any]) -> list[Any]:
    return values if type(values) is list else list(values)


class StepPlan:
    """The cached operands of one group: ``params`` and, from each one's state dict, the
    ``columns`` the kernel writes (state keys, e.g. ``exp_avg``), its ``step`` (Adam's count,
    written; SGD: None), its slots and ``wave_count``. Build it only from tensors a full step has
    just accepted."""

    def __init__(self, params: Sequence[Tensor], states: Sequence[dict[str, Any]], columns: Sequence[str], step: str | None, buffer_size: int) -> None:
        n = self.buffer_size = buffer_size
        keys = [*columns, *([step] if step else []), *(slot_key(i) for i in range(n)), COUNT_KEY]
        self.fetch = operator.itemgetter(*keys)
        self.params = list(params)
        held = list(map(self.fetch, states))  # per parameter: its columns, step, slots, count
        self.tensors = [*params, *itertools.chain.from_iterable(held)]
        rows = self.rows = len(params)
        # Every cached tensor is written on some step (the slots take turns as the newest one):
        # none may share a byte with another (the full step allows read-read sharing of older slots).
        check_memory("StepPlan", dict(operands=self.tensors), {})
        self.storages = [t.untyped_storage() for t in self.tensors]  # keeps their addresses theirs
        count = len(self.tensors)
        self.ptrs = _ints(map(Tensor.data_ptr, self.tensors), count)
        self.sizes = _ints(map(Tensor.numel, params), rows)
        self.numels = tuple(self.sizes.tolist())
        self.dtype, self.device = params[0].dtype, params[0].device
        self.device_index = params[0].get_device()  # -1 on the CPU; one int per gradient to compare
        c, first_slot = len(columns), len(keys) - n - 1
        per_row = self.ptrs[rows:].reshape(rows, len(keys))
        self.fixed_ptrs = np.column_stack([self.ptrs[:rows], per_row[:, :c]])  # p, then each column
        self.step_ptrs = per_row[:, c] if step else np.zeros(0, dtype=np.int64)  # Adam's steps
        self.slot_ptrs = np.ascontiguousarray(per_row[:, first_slot:-1])
        self.count_ptrs = np.ascontiguousarray(per_row[:, -1])
        self.fixed_written = [*params, *(t for h in held for t in h[:c])]  # p and its state columns
        self.steps = [h[c] for h in held] if step else []
        base = self.steps[0]._base if self.steps else None  # make_plan made them views of one buffer where it could
        shared = base is not None and base.shape == (rows,) and all(s._base is base for s in self.steps)
        self.step_buffer = base if shared else None  # one add advances every step, and nothing else
        self.slots = [t for h in held for t in h[first_slot:-1]]  # row by row, in storage order
        self.first_slots = np.arange(rows) * n  # row i's slot 0 in self.slots
        self.count_buffer = held[0][-1]._base  # make_plan made the counts its views, in order
        # What CPU counts hold now (a view); None for counts on a device, which the host never reads.
        self.count_values = self.count_buffer.numpy() if self.count_buffer.is_cpu else None
        self.slot_dtype = held[0][first_slot].dtype
        self.nbytes = _ints(map(_NBYTES, self.tensors), count)
        spans = np.sort(np.stack([self.ptrs, self.ptrs + self.nbytes], 1), axis=0)
        self.starts, self.ends = (np.ascontiguousarray(spans[:, k]) for k in (0, 1))  # disjoint, so sorting both columns keeps the pairs
        self.grad_ptrs = np.zeros(rows, dtype=np.int64)  # the gradients' addresses, set by confirm
        self.grad_nbytes = self.sizes * params[0].element_size()
        self.keys = tuple(keys)
        # The arrays' addresses, for the native check (the arrays live as long as the plan).
        arrays = (self.ptrs, self.nbytes, self.sizes, self.grad_ptrs, self.starts, self.ends)
        self.ptrs_at, self.nbytes_at, self.sizes_at, self.grad_ptrs_at, self.starts_at, self.ends_at = (a.ctypes.data for a in arrays)
        self.cache: dict[Any, Any] = {}  # derived tables: the back end's (chunks, launch tables) and written lists

    def confirm(self, params: Sequence[Tensor], states: Sequence[dict[str, Any] | None], grads: Sequence[Tensor]) -> bool:
        """Whether this step's ``params`` (those with a gradient) and the tensors in their
        ``states`` are the cached ones, unchanged, and ``grads`` are tensors the kernel can read:
        on the parameters' device, dense, of the parameters' dtype and sizes, sharing no byte
        with a cached tensor. A state dict missing a key (a history deleted) counts as changed.
        The native check (``native_check``) where it is built, else the same checks in Python."""
        if len(params) != self.rows or len(grads) != self.rows:
            return False
        check = native_check()
        if check is None:
            return self._same_state(params, states) and self._grads_ok(grads)
        if not check.same_state(_list(params), _list(states), self.keys, self.tensors, self.ptrs_at, self.nbytes_at):
            return False
        return bool(check.grads(_list(grads), self.params[0], self.sizes_at, self.grad_ptrs_at, self.starts_at, self.ends_at, len(self.starts)))

    def confirm_group(self, params: list[Tensor], state: dict[Tensor, dict[str, Any]]) -> bool:
        """:meth:`confirm` of a whole group in one native call: its ``params`` all have a
        gradient and are the cached ones, their states (in the optimizer's ``state``) unchanged.
        False where it cannot tell (no native check, a parameter without a gradient or of a
        Tensor subclass, whose ``p.grad`` may differ from the C++ one, a torch function mode,
        which ``p.grad`` would consult): then filter the parameters with gradients and
        :meth:`confirm` them."""
        check = native_check()
        if check is None or torch._C._is_torch_function_mode_enabled():
            return False
        ok = check.group(params, state, self.keys, self.tensors, self.ptrs_at, self.nbytes_at, self.sizes_at, self.grad_ptrs_at, self.starts_at, self.ends_at, len(self.starts))
        return bool(ok)

    def _same_state(self, params: Sequence[Tensor], states: Sequence[dict[str, Any] | None]) -> bool:
        if not all(map(operator.is_, params, self.params)):
            return False
        try:
            now = [*params, *itertools.chain.from_iterable(map(self.fetch, states))]
        except (KeyError, TypeError):  # a key deleted, or no state at all (None)
            return False
        count = len(self.tensors)
        if len(now) != count or not all(map(operator.is_, now, self.tensors)):
            return False
        return all(np.array_equal(_ints(map(get, now), count), cached) for get, cached in ((Tensor.data_ptr, self.ptrs), (_NBYTES, self.nbytes)))

    def _grads_ok(self, grads: Sequence[Tensor]) -> bool:
        if set(map(_DEVICE, grads)) != {self.device} or any(map(_IS_SPARSE, grads)):  # not get_device: -1 on meta too
            return False
        if set(map(_DTYPE, grads)) != {self.dtype} or not all(map(Tensor.is_contiguous, grads)):
            return False
        if not np.array_equal(_ints(map(Tensor.numel, grads), self.rows), self.sizes):
            return False
        self.grad_ptrs[:] = _ints(map(Tensor.data_ptr, grads), self.rows)
        return self._grads_apart()

    def _grads_apart(self) -> bool:
        """Whether no gradient (at ``grad_ptrs``) shares a byte with a cached tensor."""
        starts = self.grad_ptrs
        ends = starts + self.grad_nbytes
        before = np.searchsorted(self.starts, ends, side="left") - 1  # the last cached span starting below a gradient's end
        hit = (before >= 0) & (self.ends[np.maximum(before, 0)] > starts) & (ends > starts)
        return not hit.any()

    def ring(self) -> tuple[np.ndarray, np.ndarray]:
        """This step's slot addresses, oldest first (newest last), and whether each history is
        full, from counts on the CPU (a back end that decides the ring on the host)."""
        n = self.buffer_size
        start = (self.count_values + 1) % n  # as history.time_ordered after the count advanced
        order = (start[:, None] + np.arange(n)) % n
        return np.take_along_axis(self.slot_ptrs, order, 1), self.count_values + 1 >= n

    def ring_position(self) -> int | None:
        """The ring position (count mod N) that every CPU count of the group is at, as they are
        unless a count was written apart; else None. Tables and lists that depend on the ring
        only through it are kept per position."""
        counts = self.count_values
        if counts is None or not (counts == counts[0]).all():
            return None
        return int(counts[0]) % self.buffer_size

    def advance(self) -> None:
        """Tell autograd about what the kernel wrote through raw pointers (p, its state, the
        newest slots; every slot where the counts are on a device, not read here), as in-place
        torch ops would, and count the recorded gradient: one add to the group's count buffer
        (through the host's view of it where it is on the CPU)."""
        written = self._written()
        if self.count_values is None:
            self.count_buffer.add_(1)
        else:  # in place through the host's view; the version bump below tells autograd, as add_ would
            self.count_values += 1
        check = native_check()
        if check is None or not check.bump(written):
            torch.autograd.graph.increment_version(written)

    def _written(self) -> list[Tensor]:
        """The tensors this step writes (with CPU counts, the count buffer too); kept per ring
        position where the counts move together (as one group's do)."""
        counts = self.count_values
        if counts is None:
            held = self.cache.get("written")
            if held is None:
                held = self.cache["written"] = [*self.fixed_written, *self.slots]
            return held
        position = self.ring_position()
        held = self.cache.get(("written", position)) if position is not None else None
        if held is None:
            newest = operator.itemgetter(*(self.first_slots + counts % self.buffer_size).tolist())(self.slots)
            held = [*self.fixed_written, *(newest if self.rows > 1 else (newest,)), self.count_buffer]
            if position is not None:
                self.cache[("written", position)] = held
        return held


def step_skipped(found_inf: Tensor | None) -> bool:
    """Whether GradScaler's ``found_inf`` says to skip this step, read on the host (a device sync
    for a GPU tensor: what a kernel that consumes ``found_inf`` itself avoids)."""
    return found_inf is not None and bool(found_inf.item())


def make_plan(params: list[Tensor], states: list[dict[str, Any]], columns: Sequence[str], step: str | None, buffer_size: int) -> StepPlan | None:
    """A :class:`StepPlan` of tensors a full step has just accepted, where a planned step can
    address them all directly in one table: real tensors on one device, contiguous, the state
    of the parameters' dtype, the slots of one dtype; counts as ``history`` keeps them (0-dim
    int64 tensors, all on the CPU or all on the parameters' device). Else None: copies, mixed
    dtypes and layouts stay with the full step."""
    if not params or params[0].is_complex():
        return None
    native_check()  # starts building the native check in the background, for later steps
    counts = [state.get(COUNT_KEY) for state in states]
    where = {params[0].device, torch.device("cpu")}
    if not all(isinstance(c, Tensor) and c.device in where and c.dtype == torch.int64 and c.dim() == 0 for c in counts):
        return None
    if len({c.device for c in counts}) != 1:
        return None
    _share_one_buffer(states, COUNT_KEY)
    if step is not None and all(isinstance(state.get(step), Tensor) for state in states):
        _share_one_buffer(states, step)
    try:
        plan = StepPlan(params, states, columns, step, buffer_size)
    except (KeyError, TypeError):  # a column missing, or None (SGD's momentum_buffer before its first step)
        return None
    except RuntimeError:  # two slots share memory: the full step refuses that when one of them is written
        return None
    pdtype, device = params[0].dtype, params[0].device
    if not all(isinstance(t, Tensor) and t.dtype == pdtype and t.device == device and t.is_contiguous() for t in plan.fixed_written):
        return None
    slots = plan.slots
    if {t.dtype for t in slots} != {plan.slot_dtype} or not all(t.device == device and t.is_contiguous() for t in slots):
        return None
    return plan


def _share_one_buffer(states: list[dict[str, Any]], key: str) -> None:
    """Make the group's ``key`` tensors (``wave_count``, Adam's ``step``) views of one buffer, in
    order (the same values, dtype and device; still 0-dim tensors, in checkpoints too), so that a
    planned step advances them all with one add. Values that already are such views (a plan
    rebuilt) stay as they are; values that cannot share one buffer (mixed dtypes or devices)
    stay separate."""
    values = [state[key] for state in states]
    base = values[0]._base
    if base is not None and base.shape == (len(values),) and base.is_contiguous():
        if all(v._base is base and v.storage_offset() == i for i, v in enumerate(values)):
            return
    if len({(v.dtype, v.device) for v in values}) != 1 or any(v.dim() for v in values):
        return
    for state, view in zip(states, torch.stack(values).unbind()):
        state[key] = view
