"""The WaveGuard hyperparameters (SPEC section 2): defaults and validation."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

WAVE_DEFAULTS: dict[str, Any] = {
    "buffer_size": 8,
    "decay": 0.0,
    "threshold_scale": 1.0,
    "snr_gate": True,
    "buffer_dtype": None,
}


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# What every path stores and loads (the fused kernels have no float8 loads), by name: param groups
# keep the name, since torch.distributed.checkpoint refuses a torch.dtype there (SPEC section 6).
BUFFER_DTYPES = {name: getattr(torch, name) for name in ("float16", "bfloat16", "float32", "float64")}


def buffer_dtype_name(value: Any) -> Any:
    """The form param groups keep a ``buffer_dtype`` in: a torch.dtype becomes its name
    (``torch.bfloat16`` -> ``"bfloat16"``); anything else is returned as is."""
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value


def resolve_buffer_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """The torch.dtype that a valid ``buffer_dtype`` (None, a name or a dtype) stands for."""
    return None if value is None else BUFFER_DTYPES[buffer_dtype_name(value)]


def _problem(name: str, value: Any) -> str | None:
    """Why ``value`` is not valid for ``name``, or None when it is."""
    if name == "buffer_size":
        ok = isinstance(value, int) and not isinstance(value, bool) and 2 <= value <= 64 and value & (value - 1) == 0
        return None if ok else "must be a power of two between 2 and 64"
    if name == "decay":
        return None if _is_real(value) and 0 <= value <= 1 else "must be a number in [0, 1]"
    if name == "threshold_scale":
        return None if _is_real(value) and value >= 0 else "must be a finite number >= 0"
    if name == "snr_gate":
        return None if isinstance(value, bool) else "must be True or False"
    if name == "buffer_dtype":
        ok = value is None or (isinstance(value, (str, torch.dtype)) and buffer_dtype_name(value) in BUFFER_DTYPES)
        return None if ok else "must be None or one of float16, bfloat16, float32, float64, as a torch.dtype or its name"
    raise KeyError(name)


def check_wave_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Raise ``ValueError`` naming the first invalid WaveGuard option and its value; return the
    options in the form param groups keep them (``buffer_dtype`` by name)."""
    for name, value in options.items():
        problem = _problem(name, value)
        if problem is not None:
            raise ValueError(f"Invalid {name}: {value!r} ({problem})")
    return {name: buffer_dtype_name(value) if name == "buffer_dtype" else value for name, value in options.items()}


def check_param_groups(groups: Sequence[Mapping[str, Any]]) -> None:
    """``check_wave_options`` on every group, at step time (a group's options can be written
    straight into it after construction), before any group's state changes: ``ValueError``
    ``param group <i>: Invalid <name>: <value> (...)``."""
    for index, group in enumerate(groups):
        try:
            check_wave_options({name: group[name] for name in WAVE_DEFAULTS if name in group})
        except ValueError as err:
            raise ValueError(f"param group {index}: {err}") from None


def check_distinct_params(params: Sequence[Any]) -> None:
    """Refuse a param group that holds one Parameter twice (torch only warns; each would claim
    the same history slot twice in one step)."""
    seen: dict[int, int] = {}
    for i, p in enumerate(params):
        j = seen.setdefault(id(p), i)
        if j != i:
            raise ValueError(
                f"Invalid params: the same parameter (shape {tuple(p.shape)}) is at positions {j} and {i} of one "
                "param group; a parameter may appear once (torch: 'optimizer contains a parameter group with duplicate parameters')"
            )


def filter_options(group: Mapping[str, Any]) -> dict[str, Any]:
    """A param group's keyword arguments for the filter (``fold_filter``, ``record_and_filter``,
    the fused kernels)."""
    return dict(decay=group["decay"], threshold_scale=group["threshold_scale"], snr_gate=group["snr_gate"])
