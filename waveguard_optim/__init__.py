"""WaveGuard: Adam and SGD that denoise each gradient over time before the update.

See ``SPEC.md`` (version 2) for the math: per element, the last N gradients are
Haar-transformed over time, their details soft-thresholded at a MAD/VisuShrink noise level
scaled by an SNR gate, and the denoised newest gradient is what the optimizer consumes (with
``decay > 0``: a recency-weighted average of the denoised window, version 1's output).
"""

from .adam import WaveAdam
from .sgd import WaveSGD
from .stats import wave_stats
from .wrap import WaveGuardHandle, wave_guard

__all__ = ["WaveAdam", "WaveSGD", "WaveGuardHandle", "wave_guard", "wave_stats"]
__version__ = "0.1.0"
