"""The one place that imports torch's private optimizer helpers (they move between releases)."""

from torch.optim.adam import adam as adam_functional
from torch.optim.optimizer import (
    _get_foreach_kernels_supported_devices,
    _use_grad_for_differentiable,
)
from torch.optim.sgd import sgd as sgd_functional

__all__ = [
    "adam_functional",
    "sgd_functional",
    "_get_foreach_kernels_supported_devices",
    "_use_grad_for_differentiable",
]
