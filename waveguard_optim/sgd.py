"""WaveSGD: ``torch.optim.SGD`` run on the WaveGuard-denoised gradient."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._compat import _use_grad_for_differentiable, sgd_functional
from .base import WaveGuardMixin


class WaveSGD(WaveGuardMixin, torch.optim.SGD):
    """SGD (with optional momentum, dampening, Nesterov) on a denoised gradient.

    Every ``torch.optim.SGD`` argument means what it means there, with the same
    validation, state key (``momentum_buffer``) and numbers; weight decay is applied after
    the filter. The WaveGuard options are those of :class:`waveguard_optim.WaveAdam`.
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        buffer_size: int = 8,
        decay: float = 0.0,
        threshold_scale: float = 1.0,
        snr_gate: bool = True,
        buffer_dtype: torch.dtype | None = None,
    ) -> None:
        wave = self._checked_wave_options(
            differentiable,
            buffer_size=buffer_size, decay=decay, threshold_scale=threshold_scale, snr_gate=snr_gate, buffer_dtype=buffer_dtype,
        )  # fmt: skip
        super().__init__(
            params,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=differentiable,
            fused=fused,
        )
        self._adopt_wave_options(wave)

    @_use_grad_for_differentiable
    def step(self, closure=None):  # type: ignore[override]
        """Perform a single optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_groups()
        for index, group in self._unplanned_groups():
            self._check_dense(group)
            params: list[Tensor] = []
            grads: list[Tensor] = []
            momentum_buffers: list[Tensor | None] = []
            self._init_group(group, params, grads, momentum_buffers)
            if not params:
                continue
            foreach, kernels = self._paths(group, params)
            if kernels is not None:
                options = self._fused_options(group)

                def run(histories: list[list[Tensor]], full: list[bool]) -> None:
                    kernels.fused_wave_sgd_(params, grads, momentum_buffers, histories, full, **options)
                    self._keep_buffers(group, params, momentum_buffers)  # before the plan is made of them

                self._fused_step(index, group, params, kernels, run)
                continue
            sgd_functional(
                params,
                self._denoise(group, params, grads, foreach),
                momentum_buffers,
                has_sparse_grad=False,
                foreach=foreach,
                fused=False,
                grad_scale=None,
                found_inf=None,
                maximize=False,  # the history and the denoised gradient are already negated
                **self._update_options(group),
            )
            self._keep_buffers(group, params, momentum_buffers)
        return loss

    def _keep_buffers(self, group: dict[str, Any], params: list[Tensor], momentum_buffers: list[Tensor | None]) -> None:
        """Store the momentum buffers the step created, as torch's SGD does."""
        if group["momentum"] != 0:
            for p, buffer in zip(params, momentum_buffers):
                self.state[p]["momentum_buffer"] = buffer

    def _update_options(self, group: dict[str, Any]) -> dict[str, Any]:
        return dict(
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            lr=group["lr"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
        )

    def _plan_columns(self, group: dict[str, Any]) -> tuple[tuple[str, ...], str | None]:
        return ("momentum_buffer",) if group["momentum"] != 0 else (), None

    def _run_plan(self, group: dict[str, Any], kernels: Any, plan: Any) -> bool:
        return kernels.planned_wave_sgd_(plan, **self._planned_options(group))
