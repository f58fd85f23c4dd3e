"""WaveGuard for any ``torch.optim.Optimizer``: :func:`wave_guard` attaches the filter with hooks.

A step pre-hook records each raw gradient into the parameter's history and hands the
wrapped optimizer the denoised gradient ĝ in place of ``p.grad``; a step post-hook puts
the user's gradient back, so ``p.grad`` is unchanged after the step. The history lives in
``optimizer.state[p]`` (keys ``wave_history_i`` and ``wave_count``) and the wave options
in every param group and in ``optimizer.defaults``, so ``state_dict()`` carries both; load
hooks keep the history's dtype and count exact (torch would cast them). The filter, the
history layout and the checkpoint checks are those of WaveAdam (denoise.py, history.py):
``wave_guard(torch.optim.AdamW(...))`` follows ``WaveAdam(..., decoupled_weight_decay=True)``
step for step.

How the wrapped optimizer sees things:

* Weight decay, momentum, learning-rate schedules: its own, applied to ĝ (after the filter).
* ``maximize=True``: the history holds the negated gradient (SPEC section 4); the wrapped
  optimizer negates what it is handed, so it is handed ``-ĝ`` (negation is exact).
* GradScaler: a step it skips (inf/nan) never reaches the optimizer, or, for a fused
  optimizer, arrives with ``found_inf`` set: either way nothing is recorded. For a fused
  optimizer the pre-hook unscales the gradient itself and hides ``grad_scale`` /
  ``found_inf`` from the wrapped step (it restores them afterwards).
* A parameter's first gradient is recorded by the post-hook, after the wrapped step: many
  optimizers create their state when ``len(state) == 0``, so the history must not be there
  before their first step. During warm-up ĝ is the raw gradient anyway.
* If the wrapped step raises, the post-hook does not run (torch calls it only after a
  successful step): ``p.grad`` is then left holding ĝ and the history already holds this
  gradient (except a parameter's first one).
* ``step(closure)`` (Lightning always passes one): the pre-hook runs the closure under
  ``torch.enable_grad()`` first, filters the gradients it computed, and hands the wrapped step
  a closure that returns the same loss without running anything. That is right for optimizers
  that call the closure once; LBFGS, which re-evaluates it along its line search, is refused,
  and any other optimizer that calls it a second time gets a ``RuntimeError``.
* Pickling (``copy.deepcopy``, ``torch.save(optimizer)``) drops torch's hooks: the wrapped
  optimizer pickles so that the copy is wrapped again on unpickling, with its own handle.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from ._compat import default_foreach
from .base import WaveGuardMixin
from .denoise import claim_histories, record_and_filter
from .history import COUNT_KEY, restore_history, restored_on_failure, split_checkpoint
from .options import WAVE_DEFAULTS, check_distinct_params, check_param_groups, check_wave_options, filter_options
from .stats import innermost, wave_stats

__all__ = ["wave_guard", "WaveGuardHandle"]

_HANDLE_ATTR = "_wave_guard_handle"
# Instance attributes that wave_guard sets and remove() deletes.
_ATTACHED = (_HANDLE_ATTR, "wave_stats", "__reduce_ex__", "load_state_dict")


def _use_foreach(group: dict[str, Any], params: list[Tensor]) -> bool:
    """The eager filter path for this group: the group's ``foreach`` if set, else the multi-tensor
    path where torch has foreach kernels (WaveAdam/WaveSGD's rule when they run no fused kernel)."""
    foreach = group.get("foreach")
    return default_foreach(params) if foreach is None else bool(foreach)


@dataclass
class _GroupStep:
    """What the post-hook needs to finish one param group's step."""

    group: dict[str, Any]
    foreach: bool
    raw: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (param, the user's grad)
    first: list[Tensor] = field(default_factory=list)  # params whose first gradient is recorded after the step


class WaveGuardHandle:
    """Returned by :func:`wave_guard`. ``remove()`` detaches the filter; ``wave_stats()`` summarises it.

    Also usable as a context manager: ``with wave_guard(opt): ...`` removes the hooks on exit.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self._hooks: list[RemovableHandle] = []
        self._pending: tuple[list[_GroupStep], dict[str, Any]] | None = None
        self._loading: dict[Tensor, dict[str, Any]] | None = None

    # -- step -------------------------------------------------------------------------------

    @torch.no_grad()
    def _pre_step(self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        closure = args[1] if len(args) > 1 else kwargs.get("closure")  # args[0] is the optimizer
        if closure is None:
            self._record(optimizer)
            return None
        with torch.enable_grad():
            loss = closure()
        self._record(optimizer)
        ran = _RanClosure(loss, type(optimizer).__name__)
        return ((args[0], ran, *args[2:]), kwargs) if len(args) > 1 else (args, {**kwargs, "closure": ran})

    def _record(self, optimizer: torch.optim.Optimizer) -> None:
        """Record the current gradients and put ĝ in ``p.grad`` for the wrapped step."""
        self._pending = None
        found_inf = getattr(optimizer, "found_inf", None)
        if found_inf is not None and bool(found_inf.item()):
            return  # GradScaler skips this step (the fused kernel does nothing): record nothing.
        grad_scale = getattr(optimizer, "grad_scale", None)

        steps = []
        for index, group in enumerate(optimizer.param_groups):
            if any(name not in group for name in WAVE_DEFAULTS):
                raise RuntimeError(f"wave_guard: param group {index} has no WaveGuard options (added by hand?)")
            check_distinct_params(group["params"])
        check_param_groups(optimizer.param_groups)
        for group in optimizer.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("wave_guard does not support sparse gradients")
            if params:
                steps.append((group, params))

        pending: list[_GroupStep] = []
        for group, params in steps:
            step = _GroupStep(group, _use_foreach(group, params))
            pending.append(step)
            seen = [p for p in params if COUNT_KEY in optimizer.state.get(p, ())]
            step.first = [p for p in params if COUNT_KEY not in optimizer.state.get(p, ())]
            maximize = bool(group.get("maximize", False))
            for p in step.first:  # warm-up: ĝ is the raw gradient; recorded by the post-hook
                step.raw.append((p, p.grad))
                if grad_scale is not None:
                    p.grad = p.grad / grad_scale.to(p.grad.device)
            if not seen:
                continue
            histories, full = claim_histories(
                seen,
                [optimizer.state[p] for p in seen],
                buffer_size=group["buffer_size"],
                buffer_dtype=group["buffer_dtype"],
            )
            grads = [p.grad for p in seen]
            g_hat = record_and_filter(
                seen,
                grads,
                histories,
                full,
                **filter_options(group),
                maximize=maximize,
                grad_scale=grad_scale,
                foreach=step.foreach,
            )
            if maximize:  # the history and g_hat are negated; the wrapped optimizer negates back
                g_hat = [-g for g in g_hat]
            for p, g, new in zip(seen, grads, g_hat):
                step.raw.append((p, g))
                p.grad = new

        hidden = {}
        if grad_scale is not None or found_inf is not None:  # fused + GradScaler: we unscaled already
            hidden = {"grad_scale": grad_scale, "found_inf": found_inf}
            optimizer.grad_scale = None  # type: ignore[attr-defined]
            optimizer.found_inf = None  # type: ignore[attr-defined]
        self._pending = (pending, hidden)

    @torch.no_grad()
    def _post_step(self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._pending is None:
            return
        pending, hidden = self._pending
        self._pending = None
        for name, value in hidden.items():
            setattr(optimizer, name, value)
        for step in pending:
            for p, g in step.raw:
                p.grad = g
            if not step.first:
                continue
            group = step.group
            histories, full = claim_histories(
                step.first,
                [optimizer.state[p] for p in step.first],
                buffer_size=group["buffer_size"],
                buffer_dtype=group["buffer_dtype"],
            )
            record_and_filter(  # records only: a first gradient never fills the history (N >= 2)
                step.first,
                [p.grad for p in step.first],
                histories,
                full,
                **filter_options(group),
                maximize=bool(group.get("maximize", False)),
                grad_scale=hidden.get("grad_scale"),
                foreach=step.foreach,
            )

    # -- checkpoints ------------------------------------------------------------------------

    def _pre_load(self, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        torch_part, self._loading = split_checkpoint(optimizer.param_groups, state_dict, WAVE_DEFAULTS)
        return torch_part

    def _post_load(self, optimizer: torch.optim.Optimizer) -> None:
        wave_part, self._loading = self._loading or {}, None
        restore_history(optimizer.state, wave_part)

    # -- public -----------------------------------------------------------------------------

    def wave_stats(self) -> list[dict[str, float]]:
        """Per param group summaries of the last step: see :func:`waveguard_optim.stats.wave_stats`."""
        return wave_stats(self.optimizer)

    @property
    def active(self) -> bool:
        return bool(self._hooks)

    def remove(self) -> None:
        """Remove every hook and ``optimizer.wave_stats``. The history stays in ``optimizer.state``
        and the wave options in the param groups (a plain optimizer ignores them); wrapping
        again continues from that history."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if getattr(self.optimizer, _HANDLE_ATTR, None) is self:
            for name in _ATTACHED:
                self.optimizer.__dict__.pop(name, None)

    def __enter__(self) -> WaveGuardHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def wave_guard(
    optimizer: torch.optim.Optimizer,
    buffer_size: int = 8,
    decay: float = 0.0,
    threshold_scale: float = 1.0,
    snr_gate: bool = True,
    buffer_dtype: torch.dtype | None = None,
) -> WaveGuardHandle:
    """Denoise every gradient ``optimizer`` consumes with the WaveGuard filter (SPEC section 3).

    The options mean what they mean for :class:`waveguard_optim.WaveAdam`; they are written
    into ``optimizer.defaults`` and into every param group (overriding values already
    there; edit a group afterwards for per-group settings; groups added later get the
    defaults). Call it before ``load_state_dict`` so that the history is loaded exactly.

    Returns a :class:`WaveGuardHandle`; ``handle.remove()`` detaches the filter. While
    attached, ``optimizer.wave_stats()`` is ``handle.wave_stats()``.

    ``step(closure)`` runs the closure before filtering (see the module docstring); a copy made
    by ``copy.deepcopy`` or ``torch.save``/``torch.load`` is wrapped too.

    The framework wrappers that :func:`waveguard_optim.wave_stats` looks through are looked through
    here too (Opacus' ``DPOptimizer``, accelerate's ``AcceleratedOptimizer``): the filter attaches to
    the optimizer inside, the one whose step consumes the gradients (for Opacus: clipped and noised;
    filtering them is post-processing, so the privacy guarantee is unchanged), and the handle's
    ``optimizer`` is that inner one.

    Raises ``ValueError`` for an invalid option, an optimizer that already filters
    (a WaveAdam / WaveSGD or one already wrapped), one with ``differentiable=True``, or LBFGS;
    ``TypeError`` for an object torch's step hooks cannot attach to. Nothing is changed then.
    """
    wave = check_wave_options(dict(
        buffer_size=buffer_size, decay=decay, threshold_scale=threshold_scale, snr_gate=snr_gate, buffer_dtype=buffer_dtype
    ))  # fmt: skip
    optimizer = innermost(optimizer)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"wave_guard expects a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(optimizer, WaveGuardMixin):
        raise ValueError(f"{type(optimizer).__name__} already filters its gradients with WaveGuard")
    handle = getattr(optimizer, _HANDLE_ATTR, None)
    if handle is not None and handle.active:
        raise ValueError("this optimizer is already wrapped by wave_guard (remove the first handle)")
    if any(group.get("differentiable", False) for group in optimizer.param_groups):
        raise ValueError("Invalid differentiable: True (the gradient history is not differentiable)")
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError(
            "wave_guard cannot filter LBFGS: its line search re-evaluates the closure at new points, and "
            "the filter would have to record each of those gradients as if it were a step's"
        )

    handle = _attach(optimizer)  # first: it raises, changing nothing, where hooks cannot attach
    optimizer.defaults.update(wave)
    for group in optimizer.param_groups:
        group.update(wave)
    return handle


class _RanClosure:
    """What the wrapped step gets as its closure once the pre-hook has run the user's: the loss."""

    def __init__(self, loss: Any, optimizer_name: str) -> None:
        self.loss, self.optimizer_name, self.calls = loss, optimizer_name, 0

    def __call__(self) -> Any:
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError(
                f"wave_guard: {self.optimizer_name} called the step's closure a second time; wave_guard "
                "runs it once, before the step, and supports only optimizers that call it once"
            )
        return self.loss


def _attach(optimizer: torch.optim.Optimizer) -> WaveGuardHandle:
    """Hook the filter into an optimizer whose param groups hold the wave options."""
    handle = WaveGuardHandle(optimizer)
    hooks = (
        (optimizer.register_step_pre_hook, handle._pre_step),
        (optimizer.register_step_post_hook, handle._post_step),
        (optimizer.register_load_state_dict_pre_hook, handle._pre_load),
        (optimizer.register_load_state_dict_post_hook, handle._post_load),
    )
    try:
        for register, hook in hooks:
            handle._hooks.append(register(hook))
    except AttributeError as error:  # a subclass that never ran Optimizer.__init__ has no hook dicts
        handle.remove()
        raise TypeError(
            f"wave_guard cannot attach its hooks to {type(optimizer).__name__} ({error}): pass the "
            "torch.optim.Optimizer it wraps, or wrap that optimizer before handing it on"
        ) from error
    setattr(optimizer, _HANDLE_ATTR, handle)
    optimizer.wave_stats = types.MethodType(wave_stats, optimizer)  # type: ignore[attr-defined]
    # pickle and copy look __reduce_ex__ up on the instance: the copy is wrapped again.
    optimizer.__reduce_ex__ = types.MethodType(_reduce_wrapped, optimizer)  # type: ignore[method-assign]
    optimizer.load_state_dict = types.MethodType(_load_or_restore, optimizer)  # type: ignore[method-assign]
    return handle


def _load_or_restore(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """The optimizer's own ``load_state_dict`` (which runs the load hooks), undone if torch's part
    raises after installing its new state: a checkpoint loads fully or is refused untouched."""
    with restored_on_failure(optimizer):
        type(optimizer).load_state_dict(optimizer, state_dict)


def _reduce_wrapped(optimizer: torch.optim.Optimizer, protocol: int) -> tuple[Any, ...]:
    return _unpickle_wrapped, (type(optimizer), optimizer.__getstate__())


def _unpickle_wrapped(cls: type[torch.optim.Optimizer], state: dict[str, Any]) -> torch.optim.Optimizer:
    optimizer = cls.__new__(cls)
    optimizer.__setstate__(state)
    _attach(optimizer)
    return optimizer
