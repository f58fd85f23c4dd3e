"""The fused Triton step (``waveguard_optim.kernels.triton_step``) against its pure-torch twin.

The twin is ``record_and_filter(..., foreach=True)`` followed by torch's functional foreach
``adam`` / ``sgd`` (maximize already folded into the recorded gradient), on identical copies
of every tensor. Each run lasts long enough for every tensor to go from warm-up to the
full filter, with tensors starting at different steps, so one call mixes warm-up and full
tensors, first and later momentum steps, and tensors of several sizes (and dtypes).

On CPU the kernels run under Triton's interpreter, which must be chosen before triton
builds the kernels, so these tests run only when the environment says so:

    TRITON_INTERPRET=1 pytest tests/test_fused_triton.py

Without it the CPU tests skip (a plain ``pytest`` run stays fast and unaffected). The CUDA
tests run when a GPU is present and TRITON_INTERPRET is unset.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

pytest.importorskip("triton")

from torch.optim.adam import adam as torch_adam  # noqa: E402
from torch.optim.sgd import sgd as torch_sgd  # noqa: E402

from waveguard_optim.denoise import claim_histories, record_and_filter  # noqa: E402
from waveguard_optim.kernels import triton_step  # noqa: E402
from conftest import fused_sgd_filter  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ON_CPU = triton_step.triton_available("cpu")
ON_CUDA = torch.cuda.is_available() and triton_step.triton_available("cuda")

needs_interpreter = pytest.mark.skipif(
    not ON_CPU, reason="CPU runs of the Triton kernels need TRITON_INTERPRET=1 in the environment"
)
needs_cuda = pytest.mark.skipif(not ON_CUDA, reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")

SIZES = (1, 7, 1000, 4099)
STARTS = (0, 1, 2, 3)  # tensor i gets its first gradient at step STARTS[i]


@pytest.fixture(autouse=True)
def _round_to_nearest_bf16_in_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton's interpreter truncates float32 -> bfloat16 where GPUs (and torch) round to
    nearest even; over several steps the truncation drifts bf16 parameters by ulps. Make
    the simulator round like the hardware, so the bf16 tolerances can stay tight."""
    if not INTERPRET:
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_fp_trunc

    def create_fp_trunc(self, src, dst_type):  # type: ignore[no-untyped-def]
        if dst_type.scalar == tl.bfloat16 and src.dtype.scalar == tl.float32:
            x = torch.from_numpy(np.array(src.data, dtype=np.float32))
            return interpreter.TensorHandle(x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return original(self, src, dst_type)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_fp_trunc", create_fp_trunc)


# --- the harness ---------------------------------------------------------------------------


@dataclass
class Case:
    kind: str  # "adam" or "sgd"
    buffer_size: int = 4
    dtypes: tuple[torch.dtype, ...] = (torch.float32,)  # cycled over the tensors
    buffer_dtype: torch.dtype | None = None
    decay: float = 0.0  # the default: the denoised newest gradient (0.85: version 1's average)
    threshold_scale: float = 1.0
    snr_gate: bool = True
    maximize: bool = False
    weight_decay: float = 0.0
    grad_scale: float | None = None
    sizes: tuple[int, ...] = SIZES
    starts: tuple[int, ...] = STARTS
    layout: str = "contiguous"  # or "transposed" (dense, not contiguous), "strided" (not dense), "offset" (odd address)
    steps: int | None = None  # default: until every tensor had a few full steps
    offset: float = 0.0  # gradients: offset + spread * (slow signal + noise)
    spread: float = 1.0
    cpu_steps: bool = False  # Adam steps on the CPU for the kernels too (torch's non-fused default)
    grad_offset: int = 0  # the gradients: views this many elements into a bigger tensor
    options: dict[str, Any] = field(default_factory=dict)  # amsgrad, lr, betas, momentum, ...


def _at_offset(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A contiguous copy of ``t`` that starts ``offset`` elements into a bigger tensor."""
    return torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)[offset:].view(t.shape).copy_(t)


def _make_param(size: int, dtype: torch.dtype, layout: str, gen: torch.Generator, device: str) -> torch.Tensor:
    if layout in ("contiguous", "offset"):
        base = torch.randn(size, generator=gen)
        return base.to(device=device, dtype=dtype)
    rows = 3
    base = torch.randn(rows, size, generator=gen) if layout == "transposed" else torch.randn(size, 2 * rows, generator=gen)
    base = base.to(device=device, dtype=dtype)
    return base.t() if layout == "transposed" else base[:, ::2]  # (size, 3) views


class Side:
    """One copy of the parameters and of the optimizer state, stepped by the fused kernels
    or by the twin."""

    def __init__(self, case: Case, params: list[torch.Tensor], fused: bool, device: str) -> None:
        self.case = case
        self.fused = fused
        self.device = device
        if case.layout == "strided":  # fresh strided views (clone would make them dense)
            self.params = []
            for p in params:
                view = torch.zeros(p.shape[0], 2 * p.shape[1], dtype=p.dtype, device=p.device)[:, ::2]
                self.params.append(view.copy_(p))
        elif case.layout == "offset":  # fresh views one element in: not 16-byte aligned
            self.params = [_at_offset(p, 1) for p in params]
        else:
            self.params = [p.clone() for p in params]  # keeps the strides of dense tensors
        self.states: list[dict[str, Any]] = [{} for _ in params]

    def step(self, active: list[int], grads: list[torch.Tensor], scale: torch.Tensor | None) -> None:
        case, opts = self.case, self.case.options
        params = [self.params[i] for i in active]
        states = [self.states[i] for i in active]
        histories, full = claim_histories(params, states, buffer_size=case.buffer_size, buffer_dtype=case.buffer_dtype)
        wave = dict(decay=case.decay, threshold_scale=case.threshold_scale, snr_gate=case.snr_gate)
        if case.kind == "adam":
            for p, st in zip(params, states):
                if "step" not in st:
                    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                        st[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    # torch's fused Adam keeps the step on the device, foreach Adam on the CPU
                    on_device = self.fused and not case.cpu_steps
                    st["step"] = torch.zeros((), dtype=torch.float32, device=self.device if on_device else "cpu")
            lists = [[st[key] for st in states] for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step")]
            adam = dict(
                amsgrad=opts.get("amsgrad", False),
                beta1=opts.get("beta1", 0.9),
                beta2=opts.get("beta2", 0.999),
                lr=opts.get("lr", 0.05),
                weight_decay=case.weight_decay,
                eps=opts.get("eps", 1e-8),
                decoupled_weight_decay=opts.get("decoupled_weight_decay", False),
            )
            if self.fused:
                triton_step.fused_wave_adam_(
                    params, grads, *lists, histories, full, **wave, **adam, maximize=case.maximize, grad_scale=scale
                )
            else:
                g_hat = record_and_filter(
                    params, grads, histories, full, **wave, maximize=case.maximize, grad_scale=scale, foreach=True
                )
                adam = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in adam.items()}
                torch_adam(params, g_hat, *lists, foreach=True, maximize=False, **adam)
        else:
            buffers = [st.get("momentum_buffer") for st in states]
            sgd = dict(
                weight_decay=case.weight_decay,
                momentum=opts.get("momentum", 0.0),
                lr=opts.get("lr", 0.05),
                dampening=opts.get("dampening", 0.0),
                nesterov=opts.get("nesterov", False),
            )
            if self.fused:
                triton_step.fused_wave_sgd_(
                    params, grads, buffers, histories, full, **wave, **sgd, maximize=case.maximize, grad_scale=scale
                )
            else:
                g_hat = record_and_filter(
                    params, grads, histories, full, **wave, maximize=case.maximize, grad_scale=scale, foreach=True
                )
                sgd = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in sgd.items()}
                torch_sgd(params, g_hat, buffers, foreach=True, maximize=False, **sgd)
            for st, buf in zip(states, buffers):
                if buf is not None:
                    st["momentum_buffer"] = buf


# Tolerances on parameters and moments, (rtol, atol) for values of order 1. float32: the
# same operations in the same order, up to rounding (FMA contraction, torch's vectorised
# lerp). Half precision: torch rounds every intermediate (each foreach op writes bf16/fp16
# state), the kernel once, at the store (observed: ~2 bf16 ulps, ~1 fp16 ulp).
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (2e-6, 2e-6),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (4e-3, 4e-3),
}


def _compare(case: Case, fused: Side, twin: Side, step: int, tolerance_scale: float = 1.0) -> None:
    for i, (a, b) in enumerate(zip(fused.params, twin.params)):
        where = f"step {step}, tensor {i} ({a.dtype}, {tuple(a.shape)})"
        # the slots are bit-exact, so only the parameter's dtype counts
        rtol, atol = (tolerance_scale * t for t in TOLERANCES[a.dtype])
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"param, {where}: {m}")
        sa, sb = fused.states[i], twin.states[i]
        assert sa.keys() == sb.keys(), where
        for key in sa:
            x, y = sa[key], sb[key]
            if key == "wave_count":
                assert x == y, where
            elif key == "step":
                assert x.item() == y.item(), where
            elif key.startswith("wave_history"):
                # the recorded gradients, bit for bit (the same rounding on both sides)
                torch.testing.assert_close(x, y, rtol=0.0, atol=0.0, msg=lambda m: f"{key}, {where}: {m}")
            else:
                scale = max(1.0, y.abs().max().item())
                torch.testing.assert_close(
                    x, y, rtol=rtol, atol=atol * scale, msg=lambda m: f"{key}, {where}: {m}"
                )


def run_case(
    case: Case, device: str = "cpu", seed: int = 0, compare_every: int = 1, tolerance_scale: float = 1.0
) -> tuple[Side, Side]:
    gen = torch.Generator().manual_seed(seed)
    dtypes = [case.dtypes[i % len(case.dtypes)] for i in range(len(case.sizes))]
    params = [_make_param(n, dt, case.layout, gen, device) for n, dt in zip(case.sizes, dtypes)]
    fused, twin = Side(case, params, True, device), Side(case, params, False, device)
    # a slow signal plus noise per element: the filter has something to keep and something to remove
    signal = [torch.randn(p.shape, generator=gen) for p in params]
    scale = None if case.grad_scale is None else torch.tensor(case.grad_scale, device=device)
    steps = case.steps or case.buffer_size + max(case.starts) + 2
    for step in range(steps):
        active = [i for i, start in enumerate(case.starts) if step >= start]
        grads = []
        for i in active:
            g = signal[i] * math.cos(0.3 * step) + torch.randn(params[i].shape, generator=gen)
            g = case.offset + case.spread * g
            if case.grad_scale is not None:
                g = g * case.grad_scale
            grads.append(_at_offset(g.to(device=device, dtype=dtypes[i]), case.grad_offset))
        originals = [g.clone() for g in grads]
        fused.step(active, grads, scale)
        for g, g0 in zip(grads, originals):
            assert torch.equal(g, g0), "the kernels must not write the gradients"
        twin.step(active, grads, scale)
        if step % compare_every == 0 or step == steps - 1:
            _compare(case, fused, twin, step, tolerance_scale)
    return fused, twin


# --- cases ---------------------------------------------------------------------------------

ADAM_CASES = {
    "adam-n2-defaults": Case("adam", buffer_size=2),
    "adam-n4-amsgrad-maximize-l2-gate-off": Case(
        "adam", buffer_size=4, threshold_scale=1.5, snr_gate=False, maximize=True, weight_decay=0.1,
        options=dict(amsgrad=True),
    ),
    "adam-n4-amsgrad-maximize-l2-decay085": Case(
        "adam", buffer_size=4, decay=0.85, threshold_scale=1.5, maximize=True, weight_decay=0.1,
        options=dict(amsgrad=True),
    ),
    "adam-n8-decoupled-decay1": Case(
        "adam", buffer_size=8, decay=1.0, threshold_scale=1.5, weight_decay=0.1,
        options=dict(decoupled_weight_decay=True),
    ),
    "adam-n16-no-threshold-grad-scale": Case("adam", buffer_size=16, threshold_scale=0.0, grad_scale=1024.0),
    "adam-n8-bf16": Case("adam", buffer_size=8, dtypes=(torch.bfloat16,), options=dict(amsgrad=True)),
    # float16 Adam state underflows for small gradients (v = (1 - beta2) g^2 < 6e-8 is 0, and
    # eps = 1e-8 is 0 too): the twin then divides by the rounded state, the kernel (like
    # torch's fused Adam) by its float32 value, and they differ by far more than rounding.
    # Gradients away from 0 keep both well-conditioned.
    "adam-n4-fp16-maximize-l2": Case(
        "adam", buffer_size=4, dtypes=(torch.float16,), maximize=True, weight_decay=0.1, offset=2.0,
        spread=0.2, options=dict(eps=1e-4, beta2=0.99),
    ),
    "adam-n8-bf16-slots": Case("adam", buffer_size=8, buffer_dtype=torch.bfloat16, threshold_scale=1.5),
    "adam-n8-bf16-slots-decay085": Case(
        "adam", buffer_size=8, decay=0.85, buffer_dtype=torch.bfloat16, threshold_scale=1.5
    ),
    "adam-n4-fp64-amsgrad-decoupled": Case(
        "adam", buffer_size=4, dtypes=(torch.float64,), weight_decay=0.1,
        options=dict(amsgrad=True, decoupled_weight_decay=True),
    ),
    "adam-n4-mixed-dtypes-one-call": Case(
        "adam", buffer_size=4, dtypes=(torch.float32, torch.bfloat16, torch.float16), grad_scale=8.0, offset=2.0,
        spread=0.2, options=dict(amsgrad=True, eps=1e-4, beta2=0.99),
    ),
    "adam-n4-zero-grads": Case("adam", buffer_size=4, spread=0.0, options=dict(amsgrad=True)),  # E = 0: gamma = 0
    "adam-n8-beta1-below-half": Case("adam", buffer_size=8, options=dict(beta1=0.3)),  # lerp's other branch
    "adam-n2-tensor-lr-betas": Case(
        "adam", buffer_size=2, options=dict(lr=torch.tensor(0.05), beta1=torch.tensor(0.8), beta2=torch.tensor(0.99))
    ),
}

SGD_CASES = {
    "sgd-n2-plain": Case("sgd", buffer_size=2),
    "sgd-n4-momentum-dampening-l2-maximize": Case(
        "sgd", buffer_size=4, maximize=True, weight_decay=0.01, options=dict(momentum=0.9, dampening=0.1)
    ),
    "sgd-n8-nesterov-gate-off-decay1": Case(
        "sgd", buffer_size=8, decay=1.0, threshold_scale=1.5, snr_gate=False,
        options=dict(momentum=0.9, nesterov=True),
    ),
    "sgd-n16-threshold-grad-scale": Case(
        "sgd", buffer_size=16, threshold_scale=1.5, grad_scale=1024.0, options=dict(momentum=0.9)
    ),
    "sgd-n16-threshold-decay07": Case(
        "sgd", buffer_size=16, decay=0.7, threshold_scale=1.5, options=dict(momentum=0.9)
    ),
    "sgd-n4-bf16-nesterov": Case(
        "sgd", buffer_size=4, dtypes=(torch.bfloat16,), weight_decay=0.01, options=dict(momentum=0.9, nesterov=True)
    ),
    "sgd-n8-fp16-bf16-slots": Case(
        "sgd", buffer_size=8, dtypes=(torch.float16,), buffer_dtype=torch.bfloat16, options=dict(momentum=0.5)
    ),
    "sgd-n4-fp64-bf16-slots": Case(
        "sgd", buffer_size=4, dtypes=(torch.float64,), buffer_dtype=torch.bfloat16, weight_decay=0.01,
        options=dict(momentum=0.9),
    ),
    "sgd-n4-fp64-decay085": Case(
        "sgd", buffer_size=4, dtypes=(torch.float64,), decay=0.85, options=dict(momentum=0.9),
    ),
    "sgd-n4-constant-grads": Case("sgd", buffer_size=4, offset=0.5, spread=0.0, options=dict(momentum=0.9)),
    "sgd-n2-tensor-lr": Case("sgd", buffer_size=2, options=dict(lr=torch.tensor(0.05), momentum=0.9)),
}

LAYOUT_CASES = {
    f"{kind}-{layout}": Case(
        kind, buffer_size=4, sizes=(5, 300), starts=(0, 1), layout=layout,
        options=dict(amsgrad=True) if kind == "adam" else dict(momentum=0.9),
    )
    for kind in ("adam", "sgd")
    for layout in ("transposed", "strided")
}


@needs_interpreter
@pytest.mark.parametrize("name", list(ADAM_CASES))
def test_fused_adam_matches_twin_under_interpreter(name: str) -> None:
    run_case(ADAM_CASES[name])


@needs_interpreter
@pytest.mark.parametrize("name", list(SGD_CASES))
def test_fused_sgd_matches_twin_under_interpreter(name: str) -> None:
    run_case(SGD_CASES[name])


@needs_interpreter
@pytest.mark.parametrize("name", list(LAYOUT_CASES))
def test_non_contiguous_params_are_updated_in_place(name: str) -> None:
    """Dense non-contiguous tensors are walked in storage order, non-dense ones through
    contiguous copies that are written back; either way the views see the update."""
    fused, twin = run_case(LAYOUT_CASES[name])
    for p in fused.params:
        assert not p.is_contiguous()


@needs_interpreter
def test_many_blocks_per_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small blocks: many programs per tensor, ragged last blocks, the (row, chunk) table."""
    monkeypatch.setattr(triton_step, "_launch_config", lambda n, fp64: (128, 4))
    run_case(Case("adam", buffer_size=4, sizes=(1000, 129, 3, 128), options=dict(amsgrad=True)))
    run_case(Case("sgd", buffer_size=2, sizes=(1000, 129, 3, 128), options=dict(momentum=0.9)))


def _chosen_vector_widths(monkeypatch: pytest.MonkeyPatch | Any) -> list[int]:
    """The ``VEC`` of every launch from now on (the host's choice of 128-bit or scalar accesses)."""
    chosen: list[int] = []
    choose = triton_step._vector_width

    def spy(table: Any, constexprs: dict[str, Any]) -> int:
        chosen.append(choose(table, constexprs))
        return chosen[-1]

    monkeypatch.setattr(triton_step, "_vector_width", spy)
    return chosen


def test_vector_width_needs_every_address_and_size_aligned() -> None:
    """VEC > 1 tells the compiler that every elementwise address of the launch is 16-byte
    aligned and every size a multiple of VEC: one misaligned tensor or size in any row gives
    the scalar path. The columns of scalars (Adam's steps, the ring counts; one value read
    each) do not count."""
    import numpy as np
    import triton.language as tl

    f32, bf16 = tl.float32, tl.bfloat16
    adam = dict(P_DT=f32, G_DT=f32, M_DT=f32, V_DT=f32, VMAX_DT=f32, STEP_DT=f32, S_DT=f32, ACC=f32)
    sgd = dict(P_DT=f32, G_DT=f32, BUF_DT=f32, S_DT=f32, ACC=f32)

    def aligned_table(scalars: tuple[int, ...]) -> np.ndarray:
        table = np.zeros((3, 11), dtype=np.int64)
        table[:, 0] = (16, 4, 4096)
        table[:, 1:] = np.left_shift(1, 20 + np.arange(30)).reshape(3, 10)  # distinct, 16-byte aligned
        table[:, list(scalars)] = 0x1004  # views into a stack of steps, or the count buffer
        return table

    for constexprs, scalars, absent in ((adam, (6, 7), 5), (sgd, (4,), 3)):
        table = aligned_table(scalars)
        assert triton_step._vector_width(table, constexprs) == 4
        for column in range(1, 11):
            misaligned = table.copy()
            misaligned[1, column] += 4
            expected = 4 if column in scalars else 1
            assert triton_step._vector_width(misaligned, constexprs) == expected, column
        odd = table.copy()
        odd[2, 0] = 4098
        assert triton_step._vector_width(odd, constexprs) == 1
        table[:, absent] = 0  # an absent tensor (AMSGRAD off, no momentum)
        assert triton_step._vector_width(table, constexprs) == 4
    bf16_slots = dict(adam, S_DT=bf16)
    table = aligned_table((6, 7))
    assert triton_step._vector_width(table, bf16_slots) == 1  # a size of 4: 8 bf16 make 16 bytes
    table[:, 0] = (16, 8, 4096)
    assert triton_step._vector_width(table, bf16_slots) == 8


ALIGNMENT_CASES = {
    "aligned": (Case("adam", sizes=(16, 64, 4096), starts=(0, 1, 2), options=dict(amsgrad=True)), 4),
    "aligned-bf16": (Case("sgd", dtypes=(torch.bfloat16,), sizes=(16, 64, 4096), starts=(0, 1, 2), options=dict(momentum=0.9)), 8),
    "param-at-odd-offset": (Case("adam", sizes=(16, 64, 4096), starts=(0, 1, 2), layout="offset", options=dict(amsgrad=True)), 1),
    "grads-at-odd-offset": (Case("sgd", sizes=(16, 64, 4096), starts=(0, 1, 2), grad_offset=1, options=dict(momentum=0.9)), 1),
    "size-not-a-multiple": (Case("adam", sizes=(16, 64, 4098), starts=(0, 0, 0)), 1),  # one launch per step
}


@needs_interpreter
@pytest.mark.parametrize("name", list(ALIGNMENT_CASES))
def test_full_step_vectorizes_only_aligned_launches(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The full step's launches take the 128-bit path only where every row is aligned, and a
    misaligned parameter or gradient (a view at an odd element offset) still matches the twin."""
    case, expected = ALIGNMENT_CASES[name]
    chosen = _chosen_vector_widths(monkeypatch)
    run_case(case)
    assert chosen and set(chosen) == {expected}


@needs_interpreter
@pytest.mark.parametrize("kind", ["adam", "sgd"])
@pytest.mark.parametrize("misaligned", [None, "param", "grad"])
def test_planned_step_vectorizes_only_aligned_launches(kind: str, misaligned: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same on the planned path (the optimizer's steps after the first): a parameter or
    gradients at an odd element offset give the scalar path, and WaveAdam / WaveSGD
    (fused=True) still match foreach=True."""
    from waveguard_optim import WaveAdam, WaveSGD

    cls, options = (WaveAdam, dict(lr=0.01, amsgrad=True)) if kind == "adam" else (WaveSGD, dict(lr=0.05, momentum=0.9))
    torch.manual_seed(0)
    start = [torch.randn(64, 64), torch.randn(64)]
    runs = []
    for fused in (True, False):
        params = [torch.nn.Parameter(_at_offset(t, 1) if misaligned == "param" else t.clone()) for t in start]
        opt = cls(params, buffer_size=4, **options, **(dict(fused=True) if fused else dict(foreach=True)))
        generator = torch.Generator().manual_seed(1)
        with monkeypatch.context() as patch:
            if fused:
                planned: list[bool] = []
                plan = getattr(triton_step, f"planned_wave_{kind}_")
                patch.setattr(triton_step, f"planned_wave_{kind}_", lambda *a, **k: planned.append(plan(*a, **k)) or planned[-1])
                chosen = _chosen_vector_widths(patch)
            for _ in range(6):
                for p in params:
                    p.grad = _at_offset(torch.randn(p.shape, generator=generator), 1 if misaligned == "grad" else 0)
                opt.step()
        runs.append(params)
    assert len(planned) == 5 and all(planned)  # every step after the first took the plan
    assert chosen and set(chosen) == {4 if misaligned is None else 1}
    for fused, eager in zip(*runs):
        rtol, atol = TOLERANCES[torch.float32]
        torch.testing.assert_close(fused, eager, rtol=rtol, atol=atol)


@needs_interpreter
@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_warm_up_and_full_histories_share_one_launch(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel reads the ring from the counts (issue 18, item 2): a step over full histories
    and one still warming up (a parameter that joined late) is one launch, on the full step and
    the planned ones alike, with no warm-up flag among its constexprs; it matches foreach=True."""
    from waveguard_optim import WaveAdam, WaveSGD

    # SGD without momentum: a late parameter's first momentum step is a variant of its own (FIRST).
    cls, options = (WaveAdam, dict(lr=0.01, amsgrad=True)) if kind == "adam" else (WaveSGD, dict(lr=0.05, weight_decay=0.1))
    launches: list[dict[str, Any]] = []
    launch = triton_step._launch
    torch.manual_seed(0)
    start = [torch.randn(16, 8), torch.randn(8)]
    runs = []
    for fused in (True, False):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = cls(params, buffer_size=4, **options, **(dict(fused=True) if fused else dict(foreach=True)))
        generator = torch.Generator().manual_seed(1)
        with monkeypatch.context() as patch:
            if fused:
                patch.setattr(triton_step, "_launch", lambda *a: launches.append(a[7]) or launch(*a))  # a[7]: constexprs
            for step in range(8):
                for i, p in enumerate(params):
                    p.grad = torch.randn(p.shape, generator=generator) if i == 0 or step >= 5 else None
                opt.step()
        runs.append(params)
    assert len(launches) == 8 and not any("FULL" in constexprs for constexprs in launches)
    assert len({tuple(sorted(map(str, c.items()))) for c in launches}) == 1  # one compiled variant
    for fused, eager in zip(*runs):
        torch.testing.assert_close(fused, eager, rtol=2e-6, atol=2e-6)


@needs_interpreter
@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_grad_scaler_skips_on_the_device(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """GradScaler with fused=True (issue 18, item 3): a planned step hands ``found_inf`` to the
    kernel, which stores nothing where it is set; steps and counts go back on the device. The host
    reads found_inf only for the first (full) step: no sync per step on a GPU. The result equals
    foreach=True stepped on the unscaled gradients without the skipped step."""
    from waveguard_optim import WaveAdam, WaveSGD
    from waveguard_optim import base

    cls, options = (WaveAdam, dict(lr=0.01, amsgrad=True)) if kind == "adam" else (WaveSGD, dict(lr=0.05, momentum=0.9))
    reads: list[bool] = []
    for module in (base, triton_step):
        read = module.step_skipped
        monkeypatch.setattr(module, "step_skipped", lambda found_inf, _r=read: (found_inf is None or reads.append(True)) and _r(found_inf))
    torch.manual_seed(0)
    start = [torch.randn(16, 8), torch.randn(8)]
    fused = [torch.nn.Parameter(t.clone()) for t in start]
    eager = [torch.nn.Parameter(t.clone()) for t in start]
    opt = cls(fused, buffer_size=4, fused=True, **options)
    reference = cls(eager, buffer_size=4, foreach=True, **options)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    generator = torch.Generator().manual_seed(1)
    for step in range(8):
        targets = [torch.randn(t.shape, generator=generator) for t in start]
        if step == 5:
            targets[1][3] = float("inf")
        opt.zero_grad()
        scaler.scale(sum((p * t).sum() for p, t in zip(fused, targets))).backward()
        scaler.step(opt)
        scaler.update()
        if step != 5:
            for p, t in zip(eager, targets):
                p.grad = t
            reference.step()
    assert reads == [True]  # the first step's, before any plan
    for p, q in zip(fused, eager):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=2e-6)
        assert opt.state[p]["wave_count"].item() == 7
        for key, value in reference.state[q].items():
            torch.testing.assert_close(opt.state[p][key], value, rtol=2e-6, atol=2e-6)


@needs_interpreter
def test_decay_one_is_the_plain_mean_whatever_the_threshold() -> None:
    """SPEC section 3: with decay = 1 every u_i (i >= 1) is 0, so g_hat is the buffer's mean.
    With lr = 1 and no momentum, SGD moves the parameter by exactly -g_hat."""
    n = 4
    p = torch.zeros(50)
    state: dict[str, Any] = {}
    gen = torch.Generator().manual_seed(1)
    recorded = []
    for _ in range(n):
        g = torch.randn(50, generator=gen) * 3
        recorded.append(g)
        before = p.clone()
        histories, full = claim_histories([p], [state], buffer_size=n, buffer_dtype=None)
        triton_step.fused_wave_sgd_(
            [p], [g], [None], histories, full, decay=1.0, threshold_scale=5.0, snr_gate=True,
            weight_decay=0.0, momentum=0.0, lr=1.0, dampening=0.0, nesterov=False, maximize=False,
        )  # fmt: skip
    torch.testing.assert_close(before - p, torch.stack(recorded).mean(0), rtol=1e-6, atol=1e-6)



@needs_interpreter
@pytest.mark.parametrize("n", [4, 8])
@pytest.mark.parametrize("decay", [0.0, 1e-300])
def test_weights_of_zero_ignore_non_finite_slots(n: int, decay: float) -> None:
    """SPEC section 3: terms whose weight is exactly 0 are not evaluated (0 * inf is NaN), and
    kappa = 0 skips the threshold, so delta = 0, kappa = 0 gives b_{N-1} bit for bit with inf or
    NaN in older slots (delta = 1e-300: every weight but the two newest underflows to 0)."""
    gen = torch.Generator().manual_seed(n)
    slots = [torch.randn(100, generator=gen) for _ in range(n)]
    slots[0][:3] = torch.tensor([math.inf, -math.inf, math.nan])
    if decay == 0:
        slots[-2][3:6] = torch.tensor([math.nan, math.inf, -math.inf])
    for snr_gate in (True, False):
        assert torch.equal(fused_sgd_filter(triton_step.fused_wave_sgd_, slots, decay=decay, threshold_scale=0.0, snr_gate=snr_gate), slots[-1])


@needs_interpreter
@pytest.mark.parametrize("decay", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("buffer_dtype", [None, torch.bfloat16])
def test_optimizer_fused_matches_reference_with_huge_gradients(decay: float, buffer_dtype: torch.dtype | None) -> None:
    """WaveAdam(fused=True) against the reference for decay 0 (the default), in (0, 1) and 1,
    with gradients of +-1e30 in the window: their squares overflow float32, which made the SNR
    gate inf/inf = NaN (issue 11, item 5); the parameters stay finite."""
    from waveguard_optim import WaveAdam
    from waveguard_optim.reference import ReferenceWave

    torch.manual_seed(0)
    start = [torch.randn(37), torch.randn(5, 3)]
    wave = dict(buffer_size=4, decay=decay, buffer_dtype=buffer_dtype)
    runs = []
    makers = (lambda ps: WaveAdam(ps, lr=0.01, fused=True, **wave), lambda ps: ReferenceWave(ps, torch.optim.Adam, lr=0.01, **wave))
    for make in makers:
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = make(params)
        generator = torch.Generator().manual_seed(1)
        for step in range(10):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator)
                if step in (4, 5):
                    p.grad.view(-1)[3] = 1e30 if step == 4 else -1e30
            opt.step()
        runs.append(params)
    for fused, expected in zip(*runs):
        assert torch.isfinite(fused).all()
        rtol, atol = TOLERANCES[torch.float32]
        torch.testing.assert_close(fused, expected, rtol=rtol, atol=atol)


@needs_interpreter
def test_in_place_writes_bump_autograd_versions() -> None:
    p, g = torch.randn(10), torch.randn(10)
    state: dict[str, Any] = {}
    histories, full = claim_histories([p], [state], buffer_size=2, buffer_dtype=None)
    before = p._version, histories[0][-1]._version
    triton_step.fused_wave_sgd_(
        [p], [g], [None], histories, full, decay=0.85, threshold_scale=1.0, snr_gate=True,
        weight_decay=0.0, momentum=0.0, lr=0.1, dampening=0.0, nesterov=False, maximize=False,
    )  # fmt: skip
    assert p._version > before[0] and histories[0][-1]._version > before[1]
    assert g._version == 0


@needs_interpreter
def test_first_momentum_buffer_replaces_none_in_place() -> None:
    p, g = torch.randn(10), torch.randn(10)
    buffers: list[torch.Tensor | None] = [None]
    state: dict[str, Any] = {}
    histories, full = claim_histories([p], [state], buffer_size=2, buffer_dtype=None)
    triton_step.fused_wave_sgd_(
        [p], [g], buffers, histories, full, decay=0.85, threshold_scale=1.0, snr_gate=True,
        weight_decay=0.0, momentum=0.9, lr=0.1, dampening=0.5, nesterov=False, maximize=False,
    )  # fmt: skip
    assert isinstance(buffers[0], torch.Tensor)
    torch.testing.assert_close(buffers[0], g)  # torch: buf = d_p.clone() on the first step, no dampening


OPTIMIZER_CASES = [
    ("adam", dict(lr=0.01)),
    ("adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1, decoupled_weight_decay=True, maximize=True)),
    ("sgd", dict(lr=0.05)),  # momentum 0: torch's _init_group hands over no buffers at all
    ("sgd", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
]


@needs_interpreter
@pytest.mark.parametrize("kind,options", OPTIMIZER_CASES)
def test_optimizer_fused_matches_foreach_under_interpreter(kind: str, options: dict[str, Any]) -> None:
    """WaveAdam/WaveSGD(fused=True) through the optimizer (the CUDA default) against foreach=True."""
    from waveguard_optim import WaveAdam, WaveSGD

    cls = WaveAdam if kind == "adam" else WaveSGD
    torch.manual_seed(0)
    start = [torch.randn(37), torch.randn(5, 3)]
    runs = []
    for path in (dict(fused=True), dict(foreach=True)):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = cls(params, buffer_size=4, **options, **path)
        generator = torch.Generator().manual_seed(1)
        for _ in range(9):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator)
            opt.step()
        runs.append(params)
    for fused, eager in zip(*runs):
        rtol, atol = TOLERANCES[torch.float32]
        torch.testing.assert_close(fused, eager, rtol=rtol, atol=atol)


@needs_interpreter
def test_refusals() -> None:
    def call(params, grads):
        states = [{} for _ in params]
        histories, full = claim_histories(params, states, buffer_size=2, buffer_dtype=None)
        steps = [torch.zeros((), dtype=torch.float32) for _ in params]
        zeros = [torch.zeros_like(p) for p in params]
        triton_step.fused_wave_adam_(
            params, grads, zeros, [z.clone() for z in zeros], [], steps, histories, full,
            decay=0.85, threshold_scale=1.0, snr_gate=True, amsgrad=False, beta1=0.9, beta2=0.999,
            lr=1e-3, weight_decay=0.0, eps=1e-8, maximize=False, decoupled_weight_decay=False,
        )  # fmt: skip

    z = torch.randn(4, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="complex"):
        call([z], [z.clone()])
    p = torch.randn(4, 4)
    sparse = torch.randn(4, 4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        call([p], [sparse])
    i = torch.zeros(4, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="dtype"):
        call([i], [i.clone()])


def test_triton_available_matches_the_mode() -> None:
    assert triton_step.triton_available("cpu") == INTERPRET
    if not INTERPRET:
        assert triton_step.triton_available("cuda") == torch.cuda.is_available()
    assert not triton_step.triton_available("meta")


def test_kernels_compile_for_cuda_without_a_gpu() -> None:
    """The interpreter runs the kernels as Python, which accepts code the compiler refuses;
    compile the main variants to cubins for sm_90 and sm_80 (triton ships ptxas, no GPU
    needed) with ``bench/triton_sass.py`` in a subprocess without TRITON_INTERPRET, and read
    their SASS: every global load comes before the first global store (one DRAM round trip
    per block, issue 18), and the aligned fp32 N = 8 Adam step loads 128 bits at a time, its
    scalar path does not. Cold cache: ~30 s."""
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("this triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "triton_sass.py")
    result = subprocess.run([sys.executable, script, "--json"], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    variants = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(variants) == 15
    for name, facts in variants.items():
        ops = facts["ops"]
        stores = [k for k, op in enumerate(ops) if op.startswith("STG")]
        assert stores and ops[0].startswith("LDG"), f"{name}: {ops}"
        late = [op for op in ops[stores[0] :] if op.startswith("LDG")]
        assert not late, f"{name}: global loads after the first global store: {late}"
    assert "LDG.E.128" in variants["adam f32 N=8 aligned"]["ops"], variants["adam f32 N=8 aligned"]
    assert "LDG.E.128" not in variants["adam f32 N=8"]["ops"], variants["adam f32 N=8"]


@needs_interpreter
@pytest.mark.parametrize("kind", ["waveadam-fused", "wavesgd-fused"])
def test_compiled_step_on_the_triton_path(kind: str) -> None:
    """torch.compile of a training step on the Triton path (``fused=True`` runs it here): it
    matches eager, the launches are opaque to dynamo (no graph break inside ``opt.step()``, no
    recompile past two) and dynamo warns about nothing of ours."""
    from test_compile import check_step_traces_whole
    from waveguard_optim.kernels import dispatch

    assert dispatch.fused_backend(torch.device("cpu")) is triton_step
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
            check_step_traces_whole(kind)
    finally:
        torch._dynamo.reset()


# --- CUDA ------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("name", list(ADAM_CASES) + list(SGD_CASES) + list(LAYOUT_CASES))
def test_fused_matches_twin_on_cuda(name: str) -> None:
    case = {**ADAM_CASES, **SGD_CASES, **LAYOUT_CASES}[name]
    if isinstance(case.options.get("lr"), torch.Tensor):
        case = Case(**{**case.__dict__, "options": {
            k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in case.options.items()
        }})  # fmt: skip
    run_case(case, device="cuda")


@needs_cuda
@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_long_trajectory_on_cuda(kind: str) -> None:
    """200 steps in float32: the trajectories stay together (no drift from a subtle bias)."""
    options = dict(amsgrad=True) if kind == "adam" else dict(momentum=0.9, nesterov=True)
    case = Case(
        kind, buffer_size=8, sizes=(1, 7, 1000, 4099, 100_003), starts=(0, 1, 2, 3, 4), steps=200,
        weight_decay=0.01, cpu_steps=True, options=dict(options, lr=1e-2),
    )  # fmt: skip
    run_case(case, device="cuda", compare_every=20, tolerance_scale=10.0)


@needs_cuda
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "grad-scaler"])
@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_captured_step_replays_as_eager(kind: str, scaled: bool) -> None:
    """A CUDA graph of ``opt.step()`` (issue 18, item 3): after two eager warm-up steps on a side
    stream (they build the plan), one step captured and replayed on new gradients equals the
    same optimizer stepped eagerly, replay after replay, through warm-up into full histories
    and around the ring. With grad_scale / found_inf as GradScaler hands them, a replay with
    found_inf set records and changes nothing. WaveAdam: fused=True, capturable=True."""
    from waveguard_optim import WaveAdam, WaveSGD

    n = 4
    if kind == "adam":
        cls, options = WaveAdam, dict(lr=0.01, amsgrad=True, capturable=True)
    else:
        cls, options = WaveSGD, dict(lr=0.05, momentum=0.9)
    torch.manual_seed(0)
    start = [torch.randn(64, 33, device="cuda"), torch.randn(4099, device="cuda"), torch.randn(7, device="cuda")]
    captured = [torch.nn.Parameter(t.clone()) for t in start]
    eager = [torch.nn.Parameter(t.clone()) for t in start]
    opt = cls(captured, buffer_size=n, fused=True, **options)
    twin = cls(eager, buffer_size=n, fused=True, **options)
    scale, found = torch.tensor(4.0, device="cuda"), torch.zeros((), device="cuda")
    if scaled:
        opt.grad_scale, opt.found_inf = scale, found  # type: ignore[attr-defined]
    for p in captured:
        p.grad = torch.zeros_like(p)
    generator = torch.Generator(device="cuda").manual_seed(1)

    def step_both(run: Any, skip: bool = False) -> None:
        grads = [torch.randn(t.shape, device="cuda", generator=generator) for t in start]
        found.fill_(float(skip))
        for p, g in zip(captured, grads):
            p.grad.copy_(g * scale if scaled else g)
        run()
        if not skip:
            for q, g in zip(eager, grads):
                q.grad = g
            twin.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step_both(opt.step)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    rtol, atol = TOLERANCES[torch.float32]
    for replay in range(3 * n):
        step_both(graph.replay, skip=scaled and replay == 5)
        for p, q in zip(captured, eager):
            torch.testing.assert_close(p, q, rtol=rtol, atol=atol)
    for p, q in zip(captured, eager):
        assert opt.state[p]["wave_count"].item() == twin.state[q]["wave_count"].item()
        for key, value in twin.state[q].items():
            torch.testing.assert_close(opt.state[p][key], value, rtol=rtol, atol=atol)
