"""What WaveAdam and WaveSGD share on top of their torch optimizer: the WaveGuard options
in every param group, checkpoint handling, and the choice of code path."""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from ._compat import default_foreach
from .denoise import claim_histories, record_and_filter
from .history import COUNT_KEY, as_count, counts_on_device, restore_history, restored_on_failure, split_checkpoint, unclaim
from .kernels.dispatch import fused_backend, fused_by_default
from .kernels.plan import step_skipped
from .options import WAVE_DEFAULTS, buffer_dtype_name, check_distinct_params, check_param_groups, check_wave_options, filter_options
from .stats import wave_stats as _wave_stats

# What the kernels take: a sharded parameter (FSDP2's DTensor) is its own tensor subclass.
_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)
_GRAD = operator.attrgetter("grad")


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


_opaque_call = torch.compiler.disable(_call)


def _host(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``; under torch.compile an opaque call (the plan's work is host bookkeeping on
    numpy arrays and raw pointers, which dynamo must not trace). Eager steps skip the wrapper
    (tens of microseconds a call)."""
    return (_opaque_call if torch.compiler.is_compiling() else _call)(fn, *args)


def _path_options(group: dict[str, Any]) -> tuple[Any, ...]:
    """The options of a group that choose its code path and ring: a plan is kept while they stay."""
    return group["foreach"], group["fused"], group["buffer_size"]


def _with_grads(params: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """The parameters that have a gradient, and those gradients (torch's ``_init_group`` choice)."""
    grads = list(map(_GRAD, params))
    if all(map(operator.is_not, grads, itertools.repeat(None))):
        return params, grads
    kept = [(p, g) for p, g in zip(params, grads) if g is not None]
    return [p for p, _ in kept], [g for _, g in kept]


class WaveGuardMixin(torch.optim.Optimizer):
    """Mixed in before a torch optimizer class: ``class WaveAdam(WaveGuardMixin, Adam)``.

    The subclass's ``__init__`` validates its wave options, runs the torch constructor,
    then calls :meth:`_adopt_wave_options`.
    """

    @staticmethod
    def _checked_wave_options(differentiable: bool, **options: Any) -> dict[str, Any]:
        """The wave keywords, validated before torch's constructor creates any state, in stored form."""
        options = check_wave_options(options)
        if differentiable:
            raise ValueError("Invalid differentiable: True (the gradient history is not differentiable)")
        return options

    def _adopt_wave_options(self, options: dict[str, Any]) -> None:
        self.defaults.update(options)
        for group in self.param_groups:
            for name, value in options.items():
                group.setdefault(name, value)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # During torch's constructor the defaults do not hold the wave options yet;
        # _adopt_wave_options fills those groups afterwards.
        for name in WAVE_DEFAULTS:
            if name in self.defaults:
                param_group.setdefault(name, self.defaults[name])
        param_group.update(check_wave_options({k: param_group[k] for k in WAVE_DEFAULTS if k in param_group}))
        if not isinstance(param_group["params"], (Tensor, set)):  # torch's add_param_group: a Tensor, or a list (a set is refused)
            param_group["params"] = list(param_group["params"])
            check_distinct_params(param_group["params"])
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for name, value in WAVE_DEFAULTS.items():
            self.defaults.setdefault(name, value)
        for options in (self.defaults, *self.param_groups):  # older pickles: a torch.dtype, an int count
            for name in WAVE_DEFAULTS:
                options.setdefault(name, self.defaults[name])
            options["buffer_dtype"] = buffer_dtype_name(options["buffer_dtype"])
        for p_state in self.state.values():
            if isinstance(p_state.get(COUNT_KEY), int):
                p_state[COUNT_KEY] = as_count(p_state[COUNT_KEY])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a WaveGuard or a plain torch checkpoint of the same optimizer family.

        The history comes back with its own dtype (torch would cast it to the parameter's);
        a torch checkpoint starts the history empty; a malformed history is refused with a
        ``ValueError`` before anything changes. When torch's own load raises (a ``step`` of
        ``'1'``: torch half-applies then), the optimizer's state and param groups are put back.
        """
        torch_part, wave_part = split_checkpoint(self.param_groups, state_dict, WAVE_DEFAULTS)
        self._wave_plans().clear()  # drop the old tensors now (a plan would not confirm them anyway)
        with restored_on_failure(self):
            super().load_state_dict(torch_part)
            restore_history(self.state, wave_part)

    def wave_stats(self) -> list[dict[str, float]]:
        """Per param group summaries of the filter's last step, as plain floats: ``filtered``,
        ``gate``, ``threshold``, ``noise``, ``zeroed``, ``relative_change`` (see
        :mod:`waveguard_optim.stats`). Recomputed from the history when called; steps track nothing."""
        return _wave_stats(self)

    def _check_groups(self) -> None:
        """At the start of a step, before any state changes: every group's wave options are valid
        (as the constructor checks them; a group can be edited afterwards)."""
        check_param_groups(self.param_groups)

    def _check_dense(self, group: dict[str, Any]) -> None:
        for p in group["params"]:
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")

    def _amp_step_skipped(self) -> bool:
        """True when GradScaler found inf/nan for a fused step: then nothing is recorded."""
        return step_skipped(getattr(self, "found_inf", None))

    def _unplanned_groups(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """Step each param group on its plan where one applies (a Triton plan consumes GradScaler's
        ``found_inf`` on the device: no host sync); yield the others, with their index, for the
        full step, unless ``found_inf`` (read on the host once) says to skip this step."""
        skipped = None
        for index, group in enumerate(self.param_groups):
            if self._planned(index, group):
                continue
            if skipped is None:
                skipped = self._amp_step_skipped()
            if skipped:
                return
            yield index, group

    def _paths(self, group: dict[str, Any], params: list[Tensor]) -> tuple[bool, ModuleType | None]:
        """``(foreach, kernels)`` for this group: the eager path, or the fused kernel module to use.

        ``fused=True`` insists on a kernel; with neither option set, a kernel is used where one
        is measured faster (``kernels.dispatch.fused_by_default``) and otherwise torch's choice of foreach.
        """
        foreach, fused = group["foreach"], group["fused"]
        device = params[0].device
        if fused or (foreach is None and fused is None and fused_by_default(device)):
            # Complex parameters and tensor subclasses (FSDP2's DTensor) take the eager path; torch's
            # _init_group already refuses complex ones for fused=True.
            usable = all(type(p) in _PLAIN_TENSORS and p.device == device and not p.is_complex() for p in params)
            kernels = fused_backend(device) if usable else None
            if kernels is not None or fused:
                if kernels is None:
                    raise RuntimeError(
                        f"{type(self).__name__}(fused=True) has no kernel for these {device.type} tensors: the "
                        "parameters of a group must be real, plain tensors on one device, and CUDA needs triton "
                        "(pip install 'waveguard-optim[triton]')"
                    )
                return False, kernels
        if foreach is None:
            foreach = default_foreach(params)
        return bool(foreach), None

    def _claim(self, group: dict[str, Any], params: list[Tensor], states: list[dict[str, Any]]) -> tuple[list[list[Tensor]], list[bool]]:
        return claim_histories(
            params, states, buffer_size=group["buffer_size"], buffer_dtype=group["buffer_dtype"], counts_on_device=counts_on_device(group)
        )

    def _planned(self, index: int, group: dict[str, Any]) -> bool:
        """Step ``group`` on its cached plan (``kernels/plan.py``), before torch's ``_init_group``,
        whose per-parameter Python costs about as much as the plan's whole check: True when done.
        The plan applies while the group's path options are those it was built under, and
        ``plan.confirm`` accepts the parameters that have a gradient, their state and the gradients."""
        held = self._wave_plans().pop(index, None)  # put back only if it still applies
        if held is None:
            return False
        owner, path, kernels, plan = held
        if owner is not group or path != _path_options(group) or not _host(self._planned_step, group, kernels, plan):
            return False
        self._wave_plans()[index] = held
        return True

    def _planned_step(self, group: dict[str, Any], kernels: ModuleType, plan: Any) -> bool:
        if not plan.confirm_group(group["params"], self.state):
            params, grads = _with_grads(group["params"])
            if not plan.confirm(params, list(map(self.state.get, params)), grads):
                return False
        return self._run_plan(group, kernels, plan)

    def _run_plan(self, group: dict[str, Any], kernels: ModuleType, plan: Any) -> bool:
        """The kernel module's planned step of this optimizer on a confirmed plan, whose gradients
        ``confirm`` accepted (False: it does not apply)."""
        raise NotImplementedError

    def _plan_columns(self, group: dict[str, Any]) -> tuple[tuple[str, ...], str | None]:
        """The state keys of the columns the kernel writes, and of the step count (None: no step)."""
        raise NotImplementedError

    def _update_options(self, group: dict[str, Any]) -> dict[str, Any]:
        """The torch optimizer's own update options of ``group``, as its functional API takes them."""
        raise NotImplementedError

    def _fused_options(self, group: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments of the fused kernels' steps, full and planned."""
        return dict(**self._wave_args(group), **self._update_options(group), strict=bool(group["fused"]))

    def _planned_options(self, group: dict[str, Any]) -> dict[str, Any]:
        """Those of the planned steps, which also take GradScaler's ``found_inf``."""
        return dict(self._fused_options(group), found_inf=getattr(self, "found_inf", None))

    def _fused_step(
        self, index: int, group: dict[str, Any], params: list[Tensor], kernels: ModuleType, run: Callable[[list[list[Tensor]], list[bool]], None]
    ) -> None:
        """The full fused step of ``group`` (the one that validates everything): claim the ring
        slots and ``run(histories, full)`` the kernel, then cache a plan of the tensors it accepted.

        A kernel refuses what it cannot take (a dtype, a missing back end) before it writes
        anything; the claims are then undone, so a failed step leaves the wave state as it was.
        So does an interrupted one (Ctrl-C during the first step's compile): any ``BaseException``
        is rolled back and re-raised."""
        states = [self.state[p] for p in params]
        had_history = [COUNT_KEY in st for st in states]
        histories, full = self._claim(group, params, states)
        try:
            run(histories, full)
        except BaseException:
            unclaim(states, had_history, group["buffer_size"])
            raise
        make = getattr(kernels, "make_plan", None)
        plan = None if make is None else _host(make, params, states, *self._plan_columns(group), group["buffer_size"])
        if plan is not None:
            self._wave_plans()[index] = (group, _path_options(group), kernels, plan)

    def _wave_plans(self) -> dict[int, tuple[dict[str, Any], Any]]:
        """Cached step plans by param group index, with the group they were built for. Never in
        a checkpoint or a pickle (torch's ``__getstate__`` keeps defaults, state, param_groups)."""
        return self.__dict__.setdefault("_wave_step_plans", {})

    def _wave_args(self, group: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments that ``record_and_filter`` and the fused kernels share."""
        return dict(
            **filter_options(group),
            maximize=group["maximize"],
            grad_scale=getattr(self, "grad_scale", None),
        )

    def _denoise(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], foreach: bool) -> list[Tensor]:
        histories, full = self._claim(group, params, [self.state[p] for p in params])
        return record_and_filter(params, grads, histories, full, **self._wave_args(group), foreach=foreach)
