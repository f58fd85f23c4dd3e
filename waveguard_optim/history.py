"""The per-parameter gradient history (SPEC section 4) and its checkpoint handling.

Each parameter owns ``buffer_size`` parameter-shaped slots, ``wave_history_0`` ...,
written as a ring (the k-th recorded gradient goes to slot ``k mod N``; nothing is
rolled), and ``wave_count``, a 0-dim int64 tensor like torch's ``step``: that is what
``torch.distributed.checkpoint`` restores in place (it does not restore a Python int
there). It lives on the CPU, where reading it needs no device sync, except in a group with
``fused=True`` or ``capturable=True``: there it is on the parameter's device, as torch keeps
``step`` (:func:`counts_on_device`), so that a GPU step, and GradScaler's skip of one, need
no host sync. A step advances the counts of a group with one add. torch's
``load_state_dict`` would cast it to the parameter's dtype (bf16 cannot count past 256), so
the wave keys are split off before torch's load and put back after it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from .kernels._checks import byte_span, check_memory, overlaps_itself
from .options import BUFFER_DTYPES, check_wave_options

COUNT_KEY = "wave_count"
_SLOT_PREFIX = "wave_history_"


_SLOT_KEYS = tuple(f"{_SLOT_PREFIX}{i}" for i in range(64))  # N <= 64 (options.py); built once: steps look them up


def slot_key(i: int) -> str:
    return _SLOT_KEYS[i]


def is_wave_key(key: Any) -> bool:
    return isinstance(key, str) and (key == COUNT_KEY or key.startswith(_SLOT_PREFIX))


def check_ring_size(state: Mapping[str, Any], buffer_size: int) -> None:
    """Refuse, before anything changes, a ``buffer_size`` other than the existing history's
    (a group's option edited, or a wrap re-attached with another size)."""
    if COUNT_KEY not in state:
        return
    last, beyond = slot_key(buffer_size - 1), buffer_size < len(_SLOT_KEYS) and slot_key(buffer_size) in state
    if last in state and not beyond:
        return
    held = sum(1 for key in _SLOT_KEYS if key in state)
    raise ValueError(
        f"Invalid buffer_size: {buffer_size} (a parameter's history holds {held} gradients; to change "
        "buffer_size, delete its wave_history_* and wave_count state first)"
    )


def counts_on_device(group: Mapping[str, Any]) -> bool:
    """Whether a param group keeps its counts on the parameters' device: torch's policy for
    ``step`` (fused or capturable)."""
    return bool(group.get("fused") or group.get("capturable"))


def start_history(state: dict[str, Any], p: Tensor, buffer_size: int, buffer_dtype: torch.dtype | None, count_on_device: bool = False) -> None:
    """All slots (zeros, like ``p``) and a count of 0 (on ``p``'s device with ``count_on_device``),
    for a parameter's first gradient."""
    dtype = p.dtype if p.is_complex() or buffer_dtype is None else buffer_dtype
    for i in range(buffer_size):
        state[slot_key(i)] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
    state[COUNT_KEY] = as_count(0, p.device if count_on_device else None)


def as_count(value: int | Tensor, device: torch.device | None = None) -> Tensor:
    """A new ``wave_count`` tensor holding ``value`` (an int, as older checkpoints hold, or a
    tensor), on the CPU unless ``device`` is given."""
    return torch.tensor(int(value), dtype=torch.int64, device=device)


def advance(states: list[dict[str, Any]]) -> list[int]:
    """Count one more gradient in each state (one foreach add); return the counts before it.

    CPU counts are read with ``item()``, which syncs nothing and costs less per count than
    stacking them for one ``tolist()``; counts on a device with one sync."""
    counts = [state[COUNT_KEY] for state in states]
    if all(c.is_cpu for c in counts):
        before = [count.item() for count in counts]
    else:
        before = torch.stack([c.to(counts[0].device) for c in counts]).tolist()
    if counts:
        torch._foreach_add_(counts, 1)
    return before


def unclaim(states: list[dict[str, Any]], had_history: list[bool], buffer_size: int) -> None:
    """Undo one step's claims (the claimed slots were not written yet): count one gradient less,
    or drop a history that the step created."""
    for state, had in zip(states, had_history):
        if had:
            state[COUNT_KEY].sub_(1)
        else:
            for key in _SLOT_KEYS[:buffer_size]:
                del state[key]
            del state[COUNT_KEY]


def time_ordered(state: Mapping[str, Any], buffer_size: int, count: int) -> list[Tensor]:
    """The last ``buffer_size`` gradients of a history that has recorded ``count``, oldest first
    (references, no copies)."""
    start = count % buffer_size
    keys = _SLOT_KEYS[:buffer_size]
    return [state[k] for k in keys[start:] + keys[:start]]


MAX_COUNT = 2**62
"""A loaded ``wave_count`` is below this: an int64 count near 2**63 - 1 would wrap negative a
step later (no run records 2**62 gradients)."""


def _count(value: Any) -> int | None:
    """A checkpoint's ``wave_count`` as an int, from an int (older checkpoints) or a 0-dim
    integer tensor; None when it is neither, or outside [0, MAX_COUNT)."""
    if isinstance(value, Tensor) and value.dim() == 0 and value.device.type != "meta":
        if not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
            value = int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_COUNT else None


def _slot_dtype_ok(slot: Tensor, p: Tensor) -> bool:
    """A ``buffer_dtype`` the kernels can load (float8 and integers cannot); a complex parameter's
    history is complex, its real part of such a dtype."""
    if slot.is_complex() != p.is_complex():
        return False
    return (slot.dtype.to_real() if slot.is_complex() else slot.dtype) in BUFFER_DTYPES.values()


def _history_problem(wave: Mapping[str, Any], p: Tensor, buffer_size: int) -> str | None:
    if _count(wave.get(COUNT_KEY)) is None:
        return f"{COUNT_KEY} must be an int in [0, 2**62), got {wave.get(COUNT_KEY)!r}"
    expected = {slot_key(i) for i in range(buffer_size)}
    found = set(wave) - {COUNT_KEY}
    if found != expected:
        return f"expected slots {slot_key(0)}..{slot_key(buffer_size - 1)} for buffer_size={buffer_size}, got {sorted(found)}"
    for key in sorted(found):
        slot = wave[key]
        if not isinstance(slot, Tensor) or slot.shape != p.shape:
            shape = tuple(slot.shape) if isinstance(slot, Tensor) else type(slot).__name__
            return f"{key} has shape {shape}, the parameter has {tuple(p.shape)}"
        if not _slot_dtype_ok(slot, p):
            return f"{key} has dtype {slot.dtype}, which cannot hold gradients of a {p.dtype} parameter (buffer_dtype allows float16, bfloat16, float32, float64)"
        if slot.device.type == "meta" or slot.is_sparse:
            return f"{key} is a {'sparse' if slot.is_sparse else 'meta'} tensor, not the values of a history"
    return None


def _placed(wave_state: Mapping[Tensor, Mapping[str, Any]], on_device: set[Tensor]) -> dict[Tensor, dict[str, Any]]:
    """The validated wave state as the optimizer will hold it: counts as tensors of their own (a
    step advances them in place: they must not alias the checkpoint's), on the CPU or, for the
    parameters in ``on_device`` (see :func:`counts_on_device`), on theirs; slots on their
    parameter's device, each in memory of its own (the kernels write slots in place: a slot that
    overlaps itself, e.g. an expanded one, or another slot is copied). Made before anything
    changes, so a failing move (out of memory) leaves the optimizer as it was."""
    out = {
        p: {k: as_count(_count(v), p.device if p in on_device else None) if k == COUNT_KEY else v.to(device=p.device) for k, v in wave.items()}
        for p, wave in wave_state.items()
    }
    slots = [(p, k) for p, wave in out.items() for k in wave if k != COUNT_KEY]
    spans = sorted((byte_span(out[p][k]), n) for n, (p, k) in enumerate(slots) if out[p][k].numel())
    reach = 0
    for (start, end), n in spans:  # by address: a slot starting below an earlier one's end overlaps it
        p, k = slots[n]
        if start < reach or overlaps_itself(out[p][k]):
            out[p][k] = out[p][k].clone(memory_format=torch.contiguous_format)
        reach = max(reach, end)
    return out


def _local(t: Tensor) -> Tensor:
    """The memory a tensor holds here: a DTensor's (FSDP2) local shard, whose ``data_ptr`` is real."""
    return t.to_local() if hasattr(t, "to_local") else t


def _refuse_shared(placed: Mapping[Tensor, Mapping[str, Any]], others: list[Tensor]) -> None:
    """Refuse slots that share memory with another state tensor of the checkpoint (``exp_avg``,
    ...) or a parameter: a step writes both in place (the kernels would refuse every step; the
    eager path would train on the mixed values). Slots among themselves were made distinct by
    ``_placed``."""
    slots = [_local(v) for wave in placed.values() for k, v in wave.items() if k != COUNT_KEY]
    others = [_local(t) for t in others if t.device.type != "meta"]
    try:
        check_memory("checkpoint", dict(wave_history=slots), dict(other_tensors=others))
    except RuntimeError as err:
        message = str(err).split(";")[0]
        raise ValueError(
            f"Refusing checkpoint: a WaveGuard history slot shares memory with another state tensor or a parameter "
            f"({message}). The optimizer was left unchanged."
        ) from None


def split_checkpoint(
    param_groups: list[dict[str, Any]], state_dict: Mapping[str, Any], wave_defaults: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[Tensor, dict[str, Any]]]:
    """Validate a checkpoint's WaveGuard part and take it out of the torch part.

    Returns the state dict torch should load (wave keys removed, missing wave options
    filled from the current groups) and the wave state per parameter, already on the
    parameters' devices (see ``_placed``), to put back after torch's load (whose casts would
    change its dtype). Raises ``ValueError`` naming the parameter before anything is changed. Mismatched group layouts are passed through
    for torch's own ``load_state_dict`` to refuse.
    """
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(param_groups) or any(
        len(g["params"]) != len(s["params"]) for g, s in zip(param_groups, saved_groups)
    ):
        return dict(state_dict), {}
    groups = []
    owner: dict[Any, tuple[Tensor, int, dict[str, Any]]] = {}
    for index, (group, saved) in enumerate(zip(param_groups, saved_groups)):
        saved = {**{k: group.get(k, v) for k, v in wave_defaults.items()}, **saved}
        try:
            saved.update(check_wave_options({k: saved[k] for k in wave_defaults}))  # an older buffer_dtype: a dtype
        except ValueError as err:
            raise ValueError(f"Refusing checkpoint: parameter group {index}: {err}") from None
        groups.append(saved)
        for pid, p in zip(saved["params"], group["params"]):
            owner[pid] = (p, index, saved)

    state: dict[Any, Any] = {}
    wave_state: dict[Tensor, dict[str, Any]] = {}
    on_device: set[Tensor] = set()
    for pid, p_state in state_dict["state"].items():
        wave = {k: v for k, v in p_state.items() if is_wave_key(k)}
        if pid in owner and wave:
            p, index, saved = owner[pid]
            problem = _history_problem(wave, p, saved["buffer_size"])
            if problem is not None:
                raise ValueError(
                    f"Refusing checkpoint: WaveGuard history of parameter {pid} (group {index}, shape "
                    f"{tuple(p.shape)}): {problem}. The optimizer was left unchanged."
                )
            wave_state[p] = wave
            if counts_on_device(saved):  # the loaded group's options, as torch places step
                on_device.add(p)
        state[pid] = {k: v for k, v in p_state.items() if not is_wave_key(k)}
    placed = _placed(wave_state, on_device)
    others = [v for p_state in state.values() for v in p_state.values() if isinstance(v, Tensor)]
    _refuse_shared(placed, others + [p for group in param_groups for p in group["params"]])
    return {**state_dict, "state": state, "param_groups": groups}, placed


def restore_history(state: Mapping[Tensor, dict[str, Any]], wave_state: Mapping[Tensor, Mapping[str, Any]]) -> None:
    """Put the wave state from ``split_checkpoint`` (validated and placed) back after torch's load."""
    for p, wave in wave_state.items():
        state[p].update(wave)


@contextlib.contextmanager
def restored_on_failure(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Put the optimizer's state and param groups back if the block raises. torch's
    ``load_state_dict`` builds a new state and new groups and installs them before its
    ``__setstate__`` can still fail (Adam's, on a ``step`` of ``'1'``): the old ones are not
    modified, so holding on to them is a snapshot."""
    before = {name: optimizer.__dict__[name] for name in ("state", "param_groups")}
    try:
        yield
    except BaseException:
        optimizer.__dict__.update(before)
        raise
