"""Which fused kernel runs where. The kernels ship as ``waveguard_optim.kernels``.

The repo's top-level ``kernels/`` folder is that package's source, reached through the link
``waveguard_optim/kernels``. It has no ``__init__.py`` on purpose: a regular package named
``kernels`` at the repo root would shadow the ``kernels`` distribution (which ``transformers``
imports) for anything run from the clone (``python -m pytest``, ``python -c``, a script).

Each backend module offers ``fused_wave_adam_`` and ``fused_wave_sgd_`` with the arguments of
:func:`waveguard_optim.denoise.record_and_filter` plus the update's: one pass records the
gradient, filters it and updates the parameter. :func:`fused_backend` picks the module for a
device: Triton on CUDA (and on CPU tensors under ``TRITON_INTERPRET=1``, which is how CI
tests it), the CPU step (``cpu_step``) on CPU. :func:`fused_by_default` says where the
optimizers take the kernel without being asked.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch


def _triton_backend(device: torch.device) -> ModuleType | None:
    try:
        from . import triton_step
    except ImportError:  # triton is an optional extra
        return None
    return triton_step if triton_step.triton_available(device) else None


def fused_backend(device: torch.device) -> ModuleType | None:
    """The kernel module for tensors on ``device``, or None when none can run there."""
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        backend = _triton_backend(device)
        if backend is not None or device.type == "cuda":
            return backend
    if device.type == "cpu":  # the C kernel where a compiler is found, else blocked torch ops: always available
        from . import cpu_step

        return cpu_step
    return None


def fused_by_default(device: torch.device) -> bool:
    """Whether ``foreach=None, fused=None`` means the fused kernel on ``device``.

    CPU: ``bench/step_time.py`` measured the C kernel 10-50x faster than the eager paths from
    1M to 50M parameters, and the torch back end (no C compiler) faster than both eager paths
    in five of six rows (not SGD at 10M: single-tensor 32x torch's fused step, it 39x), with
    none of their temporaries (up to 76 bytes per parameter). CUDA: by design (one pass over
    memory, as torch's fused Adam); not yet measured on a GPU."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"
