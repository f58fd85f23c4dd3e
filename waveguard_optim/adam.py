"""WaveAdam: ``torch.optim.Adam`` run on the WaveGuard-denoised gradient."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._compat import _use_grad_for_differentiable, adam_functional, graph_capture_health_check
from .base import WaveGuardMixin


class WaveAdam(WaveGuardMixin, torch.optim.Adam):
    """Adam (or AdamW with ``decoupled_weight_decay=True``) on a denoised gradient.

    Every ``torch.optim.Adam`` argument means what it means there, with the same
    validation, state keys and numbers; weight decay is applied after the filter. The
    WaveGuard options (SPEC section 2) are per param group:

    Args:
        buffer_size: gradients kept per element, a power of two in [2, 64].
        decay: 0 (the default) returns the denoised newest gradient; in (0, 1], a recency-weighted
            average of the denoised window (0.85 was version 1's output; 1 is a plain mean).
        threshold_scale: multiplies the universal threshold; 0 turns thresholding off.
        snr_gate: scale the threshold by the estimated noise share.
        buffer_dtype: storage dtype of the history; None keeps the parameter's.
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
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
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        self._adopt_wave_options(wave)

    @_use_grad_for_differentiable
    def step(self, closure=None):  # type: ignore[override]
        """Perform a single optimization step; ``closure`` re-evaluates the model and returns the loss."""
        graph_capture_health_check(self)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_groups()
        for index, group in self._unplanned_groups():
            self._check_dense(group)
            params: list[Tensor] = []
            grads: list[Tensor] = []
            exp_avgs: list[Tensor] = []
            exp_avg_sqs: list[Tensor] = []
            max_exp_avg_sqs: list[Tensor] = []
            state_steps: list[Tensor] = []
            has_complex = self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
            if not params:
                continue
            foreach, kernels = self._paths(group, params)
            if kernels is not None:
                options = self._fused_options(group)
                self._fused_step(
                    index, group, params, kernels,
                    lambda histories, full: kernels.fused_wave_adam_(
                        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, histories, full, **options
                    ),
                )  # fmt: skip
                continue
            adam_functional(
                params,
                self._denoise(group, params, grads, foreach),
                exp_avgs,
                exp_avg_sqs,
                max_exp_avg_sqs,
                state_steps,
                foreach=foreach,
                fused=False,
                capturable=group["capturable"],
                differentiable=False,
                grad_scale=None,
                found_inf=None,
                has_complex=has_complex,
                maximize=False,  # the history and the denoised gradient are already negated
                **self._update_options(group),
            )
        return loss

    def _update_options(self, group: dict[str, Any]) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        return dict(
            amsgrad=group["amsgrad"],
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
        )

    def _plan_columns(self, group: dict[str, Any]) -> tuple[tuple[str, ...], str | None]:
        return ("exp_avg", "exp_avg_sq", *(("max_exp_avg_sq",) if group["amsgrad"] else ())), "step"

    def _run_plan(self, group: dict[str, Any], kernels: Any, plan: Any) -> bool:
        return kernels.planned_wave_adam_(plan, **self._planned_options(group))
