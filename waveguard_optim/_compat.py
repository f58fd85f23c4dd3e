"""The one place that imports torch's private optimizer helpers (they move between releases)."""

from torch import Tensor
from torch.optim.adam import adam as adam_functional
from torch.optim.optimizer import (
    Optimizer,
    _get_foreach_kernels_supported_devices,
    _use_grad_for_differentiable,
)
from torch.optim.sgd import sgd as sgd_functional


def default_foreach(params: list[Tensor]) -> bool:
    """torch's meaning of ``foreach=None``: the multi-tensor path where torch has foreach kernels."""
    devices = _get_foreach_kernels_supported_devices()
    return all(p.device.type in devices for p in params)


def graph_capture_health_check(optimizer: Optimizer) -> None:
    """torch's check that a capturable optimizer is safe to capture in a CUDA graph: named
    ``_cuda_graph_capture_health_check`` up to torch 2.9, ``_accelerator_...`` since."""
    check = getattr(optimizer, "_accelerator_graph_capture_health_check", None)
    (check or optimizer._cuda_graph_capture_health_check)()


def marked_static_by_dynamo(t: Tensor) -> bool:
    """Whether torch.compile marked ``t`` a static input (it does so to all optimizer state when it
    traces ``_init_group``): dynamo then guards on its identity wherever it is a graph input."""
    return hasattr(t, "_dynamo_static_input_type")


__all__ = [
    "marked_static_by_dynamo",
    "adam_functional",
    "sgd_functional",
    "default_foreach",
    "graph_capture_health_check",
    "_use_grad_for_differentiable",
]
