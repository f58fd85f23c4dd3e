"""The one place that imports torch's private optimizer helpers (they move between releases)."""

from torch import Tensor
from torch.optim.adam import adam as adam_functional
from torch.optim.optimizer import (
    _get_foreach_kernels_supported_devices,
    _use_grad_for_differentiable,
)
from torch.optim.sgd import sgd as sgd_functional


def default_foreach(params: list[Tensor]) -> bool:
    """torch's meaning of ``foreach=None``: the multi-tensor path where torch has foreach kernels."""
    devices = _get_foreach_kernels_supported_devices()
    return all(p.device.type in devices for p in params)


def marked_static_by_dynamo(t: Tensor) -> bool:
    """Whether torch.compile marked ``t`` a static input (it does so to all optimizer state when it
    traces ``_init_group``): dynamo then guards on its identity wherever it is a graph input."""
    return hasattr(t, "_dynamo_static_input_type")


__all__ = [
    "marked_static_by_dynamo",
    "adam_functional",
    "sgd_functional",
    "default_foreach",
    "_use_grad_for_differentiable",
]
