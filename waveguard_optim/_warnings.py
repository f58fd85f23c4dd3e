"""Library warnings that point at the user's line, not at ours.

A fixed ``stacklevel`` is wrong as soon as a call path changes (a step pre-hook, a lambda, the
fused dispatch, torch's step wrappers), so the level is found by walking out of this package and
torch to the first frame of whoever called them.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

_INSIDE = tuple(
    os.path.dirname(path) + os.sep
    for path in (os.path.abspath(__file__), os.path.abspath(torch.__file__))
)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(f"waveguard_optim: {message}")``, attributed to the first frame outside
    waveguard_optim (its kernels included) and torch."""
    level, frame = 2, sys._getframe(1)
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INSIDE):
        frame, level = frame.f_back, level + 1
    warnings.warn(f"waveguard_optim: {message}", category, stacklevel=level)
