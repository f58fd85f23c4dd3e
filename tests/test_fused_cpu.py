"""The fused CPU step (``waveguard_optim.kernels.cpu_step``) against its pure-torch twin.

The twin is ``record_and_filter(..., foreach=False)`` followed by torch's functional
``adam`` / ``sgd`` on torch's CPU default path (single tensor), with maximize folded into the
recorded gradient, on identical copies of every tensor. Each run lasts until every tensor
has gone from warm-up to a few full-filter steps, tensors starting at different steps, so
that one call mixes warm-up and full tensors, first and later momentum steps, and tensors of
several sizes.

Both back ends are checked: ``c`` (skipped where no C compiler is found) and ``torch`` (the
fallback, always). The first C run of a variant compiles it (a fraction of a second) and
caches it on disk; the cases share variants where they can.
"""

from __future__ import annotations

import copy
import inspect
import math
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

from waveguard_optim import WaveAdam, WaveSGD
from waveguard_optim._compat import adam_functional, sgd_functional
from waveguard_optim.denoise import claim_histories, record_and_filter
from waveguard_optim.kernels import cpu_step
from conftest import fused_sgd_filter

from waveguard_optim.kernels import cpu_c

HAVE_CC = cpu_c.find_compiler() is not None
needs_cc = pytest.mark.skipif(not HAVE_CC, reason="no C compiler (cc, gcc, clang or $CC)")
BACKENDS = [pytest.param("c", marks=needs_cc), "torch"]

SIZES = (1, 7, 1000, 70_001)  # odd sizes; the largest is split across threads and chunks
# 16-bit cases use whole multiples of 64 elements. torch 2.13 rounds ``a.add(b, alpha=s)``
# differently in the scalar remainder of its CPU kernels (s*b is rounded to bf16/fp16 first)
# than in their vectorized body (one rounding in float32), so the twin disagrees with itself
# by an ulp on the last elements of odd-sized tensors; the kernel rounds as the body does.
SIZES16 = (64, 192, 1024, 70_016)
STARTS = (0, 2, 1, 3)  # tensor i gets its first gradient at step STARTS[i]

# (rtol, atol) per parameter dtype, on values of order one. float64 / float32: the same
# operations in the same order, up to rounding (torch's vectorized kernels contract some of
# them into FMAs, the kernel does not). 16-bit: both round at the same points, but a last-bit
# difference of a float32 intermediate can round the other way: one ulp of the value (2^-7
# relative for bfloat16, 2^-10 for float16), and for a parameter near 0 one ulp of the
# update (lr = 0.05 times that).
LR = 0.05
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (2e-6, 2e-6),
    torch.bfloat16: (2**-7, 2**-7 * LR),
    torch.float16: (2**-10, 2**-10 * LR),
    torch.complex64: (2e-6, 2e-6),
}


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
    layout: str = "contiguous"  # "transposed" (dense, not contiguous) or "strided" (not dense)
    offset: float = 0.0  # gradients: offset + spread * (slow signal + noise)
    spread: float = 1.0
    extra_steps: int = 3  # full-filter steps of the last tensor to start
    options: dict[str, Any] = field(default_factory=dict)  # amsgrad, lr, betas, momentum, ...


def _param(size: int, dtype: torch.dtype, layout: str, gen: torch.Generator) -> torch.Tensor:
    real = dtype.to_real() if dtype.is_complex else dtype
    if layout == "contiguous":
        p = torch.randn(size, 2, generator=gen).to(real) if dtype.is_complex else torch.randn(size, generator=gen).to(dtype)
        return torch.view_as_complex(p) if dtype.is_complex else p
    if layout == "transposed":
        return torch.randn(3, size, generator=gen).to(dtype).t()
    return torch.randn(size, 6, generator=gen).to(dtype)[:, ::2]


class Side:
    """One copy of the parameters and optimizer state, stepped by the kernel or by the twin."""

    def __init__(self, case: Case, params: list[torch.Tensor], fused: bool, backend: str | None = None) -> None:
        self.case, self.fused, self.backend = case, fused, backend
        if case.layout == "strided":
            self.params = [torch.zeros(p.shape[0], 6, dtype=p.dtype)[:, ::2].copy_(p) for p in params]
        else:
            self.params = [p.clone() for p in params]  # clone keeps the strides of dense tensors
        self.states: list[dict[str, Any]] = [{} for _ in params]

    def step(self, active: list[int], grads: list[torch.Tensor], scale: torch.Tensor | None) -> None:
        case, opts = self.case, self.case.options
        params = [self.params[i] for i in active]
        states = [self.states[i] for i in active]
        histories, full = claim_histories(params, states, buffer_size=case.buffer_size, buffer_dtype=case.buffer_dtype)
        wave = dict(decay=case.decay, threshold_scale=case.threshold_scale, snr_gate=case.snr_gate)
        if not self.fused:
            g_hat = record_and_filter(params, grads, histories, full, **wave, maximize=case.maximize, grad_scale=scale, foreach=False)
        if case.kind == "adam":
            for p, st in zip(params, states):
                if "step" not in st:
                    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                        st[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["step"] = torch.zeros((), dtype=torch.float32)
            lists = [[st[key] for st in states] for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step")]
            adam = dict(
                amsgrad=opts.get("amsgrad", False),
                beta1=opts.get("beta1", 0.9),
                beta2=opts.get("beta2", 0.999),
                lr=opts.get("lr", LR),
                weight_decay=case.weight_decay,
                eps=opts.get("eps", 1e-8),
                decoupled_weight_decay=opts.get("decoupled_weight_decay", False),
            )
            if not self.fused:
                adam = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in adam.items()}
                has_complex = any(p.is_complex() for p in params)
                adam_functional(params, g_hat, *lists, foreach=False, maximize=False, has_complex=has_complex, **adam)
            else:
                cpu_step.fused_wave_adam_(
                    params, grads, *lists, histories, full, **wave, **adam, maximize=case.maximize, grad_scale=scale,
                    backend=self.backend,
                )  # fmt: skip
        else:
            buffers = [st.get("momentum_buffer") for st in states]
            sgd = dict(
                weight_decay=case.weight_decay,
                momentum=opts.get("momentum", 0.0),
                lr=opts.get("lr", LR),
                dampening=opts.get("dampening", 0.0),
                nesterov=opts.get("nesterov", False),
            )
            if not self.fused:
                sgd = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in sgd.items()}
                sgd_functional(params, g_hat, buffers, foreach=False, maximize=False, **sgd)
            else:
                cpu_step.fused_wave_sgd_(
                    params, grads, buffers, histories, full, **wave, **sgd, maximize=case.maximize, grad_scale=scale,
                    backend=self.backend,
                )  # fmt: skip
            for st, buf in zip(states, buffers):
                if buf is not None:
                    st["momentum_buffer"] = buf


def _compare(fused: Side, twin: Side, step: int) -> None:
    for i, (a, b) in enumerate(zip(fused.params, twin.params)):
        where = f"step {step}, tensor {i} ({a.dtype}, {tuple(a.shape)})"
        rtol, atol = TOLERANCES[a.dtype]
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"param, {where}: {m}")
        sa, sb = fused.states[i], twin.states[i]
        assert sa.keys() == sb.keys(), where
        for key in sa:
            x, y = sa[key], sb[key]
            if key == "wave_count":
                assert x == y, where
            elif key == "step":
                assert x.item() == y.item(), where
            elif key.startswith("wave_history"):  # the recorded gradients are exact
                assert x.dtype == y.dtype and torch.equal(x, y), f"{key}, {where}"
            else:
                scale = max(1.0, y.abs().max().item()) if y.numel() else 1.0
                torch.testing.assert_close(x, y, rtol=rtol, atol=atol * scale, msg=lambda m: f"{key}, {where}: {m}")


def run_case(case: Case, backend: str | None, seed: int = 0) -> tuple[Side, Side]:
    """Step the kernel (``backend``; None: the default choice) and the twin side by side."""
    gen = torch.Generator().manual_seed(seed)
    dtypes = [case.dtypes[i % len(case.dtypes)] for i in range(len(case.sizes))]
    params = [_param(n, dt, case.layout, gen) for n, dt in zip(case.sizes, dtypes)]
    fused, twin = Side(case, params, True, backend), Side(case, params, False)
    signal = [torch.randn(p.shape, generator=gen, dtype=p.dtype if p.is_complex() else torch.float32) for p in params]
    scale = None if case.grad_scale is None else torch.tensor(case.grad_scale)
    steps = case.buffer_size + max(case.starts) + case.extra_steps
    for step in range(steps):
        active = [i for i, start in enumerate(case.starts) if step >= start]
        grads = []
        for i in active:
            noise = torch.randn(params[i].shape, generator=gen, dtype=signal[i].dtype)
            g = case.offset + case.spread * (signal[i] * math.cos(0.3 * step) + noise)
            if case.grad_scale is not None:
                g = g * case.grad_scale
            grads.append(g.to(dtypes[i]))
        originals = [g.clone() for g in grads]
        fused.step(active, grads, scale)
        for g, g0 in zip(grads, originals):
            assert torch.equal(g, g0), "the step must not write the gradients"
        twin.step(active, grads, scale)
        _compare(fused, twin, step)
    return fused, twin


# --- cases: chosen to cover every option while sharing compiled C variants
# (a variant is: algorithm, N, parameter and history dtypes, amsgrad / momentum on) --------

ADAM_CASES = {
    "n2-defaults": Case("adam", buffer_size=2),
    "n4-amsgrad-maximize-l2-gate-off-decay085": Case(
        "adam", decay=0.85, threshold_scale=1.5, snr_gate=False, maximize=True, weight_decay=0.1, options=dict(amsgrad=True)
    ),
    "n4-amsgrad-maximize-l2-gate-off": Case(
        "adam", threshold_scale=1.5, snr_gate=False, maximize=True, weight_decay=0.1, options=dict(amsgrad=True)
    ),
    "n8-decoupled-decay1": Case(
        "adam", buffer_size=8, decay=1.0, threshold_scale=1.5, weight_decay=0.1, options=dict(decoupled_weight_decay=True)
    ),
    "n16-no-threshold-grad-scale": Case("adam", buffer_size=16, threshold_scale=0.0, grad_scale=1024.0),
    "n64-threshold": Case("adam", buffer_size=64, threshold_scale=1.5, sizes=(3, 1000), starts=(0, 1), extra_steps=2),
    "n64-threshold-decay05": Case(
        "adam", buffer_size=64, decay=0.5, threshold_scale=1.5, sizes=(3, 1000), starts=(0, 1), extra_steps=2
    ),
    "n4-bf16-amsgrad-l2": Case("adam", dtypes=(torch.bfloat16,), sizes=SIZES16, weight_decay=0.1, options=dict(amsgrad=True)),
    "n8-bf16-slots": Case("adam", buffer_size=8, buffer_dtype=torch.bfloat16, sizes=SIZES16, threshold_scale=1.5),
    "n8-bf16-slots-decay085": Case(
        "adam", buffer_size=8, decay=0.85, buffer_dtype=torch.bfloat16, sizes=SIZES16, threshold_scale=1.5
    ),
    "n4-fp64-amsgrad-decoupled": Case(
        "adam", dtypes=(torch.float64,), weight_decay=0.1, options=dict(amsgrad=True, decoupled_weight_decay=True)
    ),
    # float16 Adam state underflows for small gradients (0.001 g^2 below 6e-8 is 0): keep
    # the gradients away from 0, where the twin's rounded state is well-conditioned.
    "n4-fp16-maximize-l2": Case(
        "adam", dtypes=(torch.float16,), maximize=True, sizes=SIZES16, weight_decay=0.1, offset=2.0, spread=0.2,
        options=dict(amsgrad=True, eps=1e-4, beta2=0.99),
    ),  # fmt: skip
    "n4-mixed-dtypes-one-call": Case(
        "adam", dtypes=(torch.float32, torch.bfloat16, torch.float64), sizes=SIZES16, grad_scale=8.0, options=dict(amsgrad=True)
    ),
    "n4-mixed-dtypes-one-call-decay085": Case(
        "adam", dtypes=(torch.float32, torch.bfloat16, torch.float64), decay=0.85, sizes=SIZES16, options=dict(amsgrad=True)
    ),
    # beta1 = 0.3: lerp weight 0.7, torch's other lerp formula; lr and betas as tensors
    "n4-tensor-hyperparameters": Case(
        "adam", options=dict(amsgrad=True, lr=torch.tensor(0.05), beta1=torch.tensor(0.3), beta2=torch.tensor(0.99))
    ),
    # a scale that is not a power of two (GradScaler's always are) takes the torch back end
    "n4-grad-scale-not-power-of-two": Case("adam", grad_scale=3.0, maximize=True, options=dict(amsgrad=True)),
    "n4-complex": Case("adam", dtypes=(torch.complex64,), sizes=(5, 300), starts=(0, 1), options=dict(amsgrad=True)),
}

SGD_CASES = {
    "n2-plain": Case("sgd", buffer_size=2),
    "n4-momentum-dampening-l2-maximize": Case(
        "sgd", maximize=True, weight_decay=0.01, options=dict(momentum=0.9, dampening=0.1)
    ),
    "n4-momentum-dampening-l2-maximize-decay085": Case(
        "sgd", decay=0.85, maximize=True, weight_decay=0.01, options=dict(momentum=0.9, dampening=0.1)
    ),
    "n8-nesterov-gate-off-decay1": Case(
        "sgd", buffer_size=8, decay=1.0, threshold_scale=1.5, snr_gate=False, options=dict(momentum=0.9, nesterov=True)
    ),
    "n8-threshold-grad-scale": Case("sgd", buffer_size=8, threshold_scale=1.5, grad_scale=1024.0, options=dict(momentum=0.9)),
    "n8-threshold-grad-scale-decay07": Case(
        "sgd", buffer_size=8, decay=0.7, threshold_scale=1.5, grad_scale=1024.0, options=dict(momentum=0.9)
    ),
    "n4-bf16-nesterov-l2": Case(
        "sgd", dtypes=(torch.bfloat16,), weight_decay=0.01, sizes=SIZES16, options=dict(momentum=0.9, nesterov=True)
    ),
    "n8-fp16-bf16-slots": Case(
        "sgd", buffer_size=8, dtypes=(torch.float16,), buffer_dtype=torch.bfloat16, sizes=SIZES16, options=dict(momentum=0.5)
    ),
    "n4-fp64": Case("sgd", dtypes=(torch.float64,), weight_decay=0.01, options=dict(momentum=0.9)),
    "n4-fp64-decay085": Case("sgd", dtypes=(torch.float64,), decay=0.85, threshold_scale=1.5, options=dict(momentum=0.9)),
    "n4-tensor-lr": Case("sgd", options=dict(lr=torch.tensor(0.05), momentum=0.9)),
}

LAYOUT_CASES = {
    f"{kind}-{layout}": Case(
        kind, sizes=(5, 300), starts=(0, 1), layout=layout,
        options=dict(amsgrad=True) if kind == "adam" else dict(momentum=0.9),
    )  # fmt: skip
    for kind in ("adam", "sgd")
    for layout in ("transposed", "strided")
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(ADAM_CASES))
def test_fused_adam_matches_twin(name: str, backend: str) -> None:
    run_case(ADAM_CASES[name], backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(SGD_CASES))
def test_fused_sgd_matches_twin(name: str, backend: str) -> None:
    run_case(SGD_CASES[name], backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(LAYOUT_CASES))
def test_non_contiguous_params_are_updated_in_place(name: str, backend: str) -> None:
    """Non-contiguous tensors go through contiguous copies that are written back: the views see the update."""
    fused, _ = run_case(LAYOUT_CASES[name], backend)
    assert all(not p.is_contiguous() for p in fused.params)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_chunks_and_threads(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small chunks and blocks: many work items per tensor, ragged last ones, pieces of
    several tensors in one torch block, the chunk ranges of two threads."""
    monkeypatch.setattr(cpu_step, "C_CHUNK", 96)
    monkeypatch.setattr(cpu_step, "MIN_ELEMENTS_PER_THREAD", 64)
    monkeypatch.setattr(cpu_step, "TORCH_BLOCK", 100)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_case(Case("adam", sizes=(1000, 129, 3, 96), options=dict(amsgrad=True)), backend)
        run_case(Case("sgd", sizes=(1000, 129, 3, 96), options=dict(momentum=0.9)), backend)
    finally:
        torch.set_num_threads(threads)


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_step_counts_and_bias_corrections_in_c_equal_torchs(dtype: torch.dtype) -> None:
    """The C kernel increments Adam's step counts and computes lr / (1 - beta1^t) and
    (1 - beta2^t)^0.5 itself: bit for bit what torch does (a _foreach_add_, then Python floats)."""
    kernel = cpu_c.get_kernel("adam", 2, "f32", "f32", ())
    counts = [0.0, 1.0, 7.0, 255.0, 4096.0, 123456.0, 16777215.0]
    for lr, b1, b2 in [(1e-3, 0.9, 0.999), (0.05, 0.3, 0.99), (1.0, 0.0, 0.5)]:
        in_c = [torch.tensor(c, dtype=dtype) for c in counts]
        in_torch = [t.clone() for t in in_c]
        got = cpu_step._adam_steps(in_c, lr, b1, b2, kernel, cpu_step._c_steps(in_c))
        expected = cpu_step._adam_steps(in_torch, lr, b1, b2, None, None)
        assert isinstance(got[0], np.ndarray) and isinstance(expected[0], list)  # the two ways were taken
        assert [list(x) for x in got] == [list(x) for x in expected]
        assert [t.item() for t in in_c] == [t.item() for t in in_torch]


@needs_cc
def test_kernel_built_without_openmp_runs_on_python_threads(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiler without OpenMP gives a serial library; the step then splits the chunk ranges
    over Python threads itself, with the same numbers."""
    monkeypatch.setenv("WAVEGUARD_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_c, "OPENMP", "-fno-openmp")
    monkeypatch.setattr(cpu_c, "_LOADED", {})
    monkeypatch.setattr(cpu_step, "C_CHUNK", 96)
    monkeypatch.setattr(cpu_step, "MIN_ELEMENTS_PER_THREAD", 64)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_case(Case("adam", sizes=(1000, 129, 3, 96), options=dict(amsgrad=True)), "c")
    finally:
        torch.set_num_threads(threads)
    assert [k.parallel for k in cpu_c._LOADED.values()] == [False]


@needs_cc
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_kernel_threads_are_torchs_openmp_pool() -> None:
    """The kernel links the OpenMP runtime torch has already loaded, not a second one whose
    threads would compete with torch's for the cores."""
    run_case(Case("adam", sizes=(70_001,), starts=(0,)), "c")
    assert all(k.parallel for k in cpu_c._LOADED.values())
    with open("/proc/self/maps") as f:
        runtimes = {line.split()[-1] for line in f if "libgomp" in line or "libomp" in line or "libiomp" in line}
    assert len(runtimes) == 1, runtimes


@pytest.mark.parametrize("backend", BACKENDS)
def test_decay_one_is_the_plain_mean_whatever_the_threshold(backend: str) -> None:
    """SPEC section 3: with decay = 1 every u_i (i >= 1) is 0, so g_hat is the buffer's mean.
    With lr = 1 and no momentum, SGD moves the parameter by exactly -g_hat."""
    n, p, state = 4, torch.zeros(50), {}
    gen = torch.Generator().manual_seed(1)
    recorded = []
    for _ in range(n):
        g = torch.randn(50, generator=gen) * 3
        recorded.append(g)
        before = p.clone()
        histories, full = claim_histories([p], [state], buffer_size=n, buffer_dtype=None)
        cpu_step.fused_wave_sgd_(
            [p], [g], [None], histories, full, decay=1.0, threshold_scale=5.0, snr_gate=True, weight_decay=0.0,
            momentum=0.0, lr=1.0, dampening=0.0, nesterov=False, maximize=False, backend=backend,
        )  # fmt: skip
    torch.testing.assert_close(before - p, torch.stack(recorded).mean(0), rtol=1e-6, atol=1e-6)



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [4, 8, 64])
@pytest.mark.parametrize("decay", [0.0, 1e-300])
def test_weights_of_zero_ignore_non_finite_slots(backend: str, n: int, decay: float) -> None:
    """SPEC section 3: terms whose weight is exactly 0 are not evaluated (0 * inf is NaN), and
    kappa = 0 skips the threshold, so delta = 0, kappa = 0 gives b_{N-1} bit for bit with inf or
    NaN in older slots. With delta = 1e-300 the weights of all but the two newest slots underflow
    to 0 (and that of the second newest is 0 in float32): no C variant matches that pattern, so
    the torch back end runs it."""
    gen = torch.Generator().manual_seed(n)
    slots = [torch.randn(100, generator=gen) for _ in range(n)]
    slots[0][:3] = torch.tensor([math.inf, -math.inf, math.nan])
    if decay == 0:
        slots[-2][3:6] = torch.tensor([math.nan, math.inf, -math.inf])
    for snr_gate in (True, False):
        got = fused_sgd_filter(cpu_step.fused_wave_sgd_, slots, decay=decay, threshold_scale=0.0, snr_gate=snr_gate, backend=backend)
        assert torch.equal(got, slots[-1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_momentum_buffer_replaces_none_in_place(backend: str) -> None:
    p, g = torch.randn(10), torch.randn(10)
    buffers: list[torch.Tensor | None] = [None]
    histories, full = claim_histories([p], [{}], buffer_size=2, buffer_dtype=None)
    cpu_step.fused_wave_sgd_(
        [p], [g], buffers, histories, full, decay=0.85, threshold_scale=1.0, snr_gate=True, weight_decay=0.0,
        momentum=0.9, lr=0.1, dampening=0.5, nesterov=False, maximize=False, backend=backend,
    )  # fmt: skip
    assert isinstance(buffers[0], torch.Tensor)
    torch.testing.assert_close(buffers[0], g, rtol=0, atol=0)  # torch: buf = d_p.clone(), no dampening


def _adam_call(params: list[torch.Tensor], grads: list[torch.Tensor], backend: str | None = None) -> None:
    histories, full = claim_histories(params, [{} for _ in params], buffer_size=2, buffer_dtype=None)
    zeros = [torch.zeros_like(p) for p in params]
    cpu_step.fused_wave_adam_(
        params, grads, zeros, [z.clone() for z in zeros], [], [torch.zeros(()) for _ in params], histories, full,
        decay=0.85, threshold_scale=1.0, snr_gate=True, amsgrad=False, beta1=0.9, beta2=0.999, lr=1e-3,
        weight_decay=0.0, eps=1e-8, maximize=False, decoupled_weight_decay=False, backend=backend,
    )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_refusals(backend: str) -> None:
    p = torch.randn(4, 4)
    with pytest.raises(RuntimeError, match="sparse"):
        _adam_call([p], [torch.randn(4, 4).to_sparse()], backend)
    i = torch.zeros(4, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="float32, float64, bfloat16 and float16"):
        _adam_call([i], [i.clone()], backend)
    with pytest.raises(ValueError, match="backend"):
        _adam_call([p], [p.clone()], "cuda")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("key", ["exp_avg", "momentum_buffer", "wave_history_1"])
def test_a_state_tensor_of_the_wrong_size_is_refused_before_anything_changes(key: str, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel walks every tensor by its parameter's element count: a state or history tensor
    of another size (a foreign checkpoint, a hand edit) is refused with a RuntimeError naming it,
    and the step leaves every state as it was (ring position, step count, values)."""
    monkeypatch.setenv("WAVEGUARD_CPU_BACKEND", backend)
    p = torch.nn.Parameter(torch.randn(300))
    opt = WaveSGD([p], lr=0.1, momentum=0.9, buffer_size=2) if key == "momentum_buffer" else WaveAdam([p], lr=0.1, buffer_size=2)
    for _ in range(3):
        p.grad = torch.randn(300)
        opt.step()
    opt.state[p][key] = torch.zeros(299)
    before = copy.deepcopy(opt.state[p]), p.detach().clone()
    p.grad = torch.randn(300)
    column = {"exp_avg": "exp_avgs", "momentum_buffer": "momentum_buffers", "wave_history_1": "wave_history"}[key]
    with pytest.raises(RuntimeError, match=f"parameter 0 has 300 elements, its {column} tensor 299 elements"):
        opt.step()
    assert opt.state[p].keys() == before[0].keys() and torch.equal(p, before[1])
    for name, value in before[0].items():
        assert torch.equal(opt.state[p][name], value) if isinstance(value, torch.Tensor) else opt.state[p][name] == value, name


def test_without_a_compiler_the_torch_back_end_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback: no C compiler -> not available, the default back end is torch (with one
    warning), and asking for the C back end explicitly says what is missing."""
    monkeypatch.setattr(cpu_c, "find_compiler", lambda: None)
    monkeypatch.setattr(cpu_step, "_warned_no_compiler", [])
    assert not cpu_step.cpu_fused_available()
    with pytest.warns(UserWarning, match="no C compiler found"):  # once: a 9-35x slower path is no secret
        assert cpu_step._resolve_backend(None) == "torch"
    with pytest.raises(RuntimeError, match="C compiler"):
        _adam_call([torch.randn(3)], [torch.randn(3)], "c")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_case(Case("adam", sizes=(7, 300), starts=(0, 1), options=dict(amsgrad=True)), None)


def test_library_warnings_name_the_callers_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """A warning raised deep inside the step (here: no compiler) is attributed to the user's
    ``opt.step()`` line, not to a line of waveguard_optim or torch.optim."""
    monkeypatch.setattr(cpu_c, "find_compiler", lambda: None)
    monkeypatch.setattr(cpu_step, "_warned_no_compiler", [])
    p = torch.nn.Parameter(torch.randn(5))
    p.grad = torch.randn(5)
    opt = WaveAdam([p])
    with pytest.warns(UserWarning, match="no C compiler found") as caught:
        opt.step(); line = inspect.currentframe().f_lineno  # noqa: E702 - the warning must name this line
    assert (caught[0].filename, caught[0].lineno) == (__file__, line)


def test_environment_variable_picks_the_back_end(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WAVEGUARD_CPU_BACKEND", "torch")
    assert not cpu_step.cpu_fused_available()
    assert cpu_step._resolve_backend(None) == "torch"
    monkeypatch.setenv("WAVEGUARD_CPU_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="nonsense"):
        cpu_step._resolve_backend(None)


@needs_cc
def test_a_kernel_that_cannot_be_built_falls_back_to_torch(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A variant that the compiler fails to build warns once and the step still happens, on
    the torch back end, with the twin's numbers (by default: the C back end named, or
    fused=True, raises instead: tests/test_kernel_cache.py)."""
    monkeypatch.setenv("WAVEGUARD_CACHE_DIR", str(tmp_path))  # nothing cached: it must compile
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.delenv("WAVEGUARD_CPU_BACKEND", raising=False)
    monkeypatch.setattr(cpu_c, "_LOADED", {})
    monkeypatch.setattr(cpu_step, "_broken_variants", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_case(Case("sgd", sizes=(7, 300), starts=(0, 1), options=dict(momentum=0.9)), None)
    messages = [str(w.message) for w in caught if "waveguard_optim" in str(w.message)]
    assert len(messages) == 1 and "failed to compile" in messages[0]


@needs_cc
def test_compiled_kernel_is_cached_on_disk(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared library lands in WAVEGUARD_CACHE_DIR, named by its source and toolchain; a
    later process (here: an emptied in-memory table) loads it without compiling."""
    monkeypatch.setenv("WAVEGUARD_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_c, "_LOADED", {})
    cpu_c.get_kernel("adam", 4, "f32", "f32", ("amsgrad", "lerp_small", "gate", "newest"))  # what the case below runs
    (library,) = cpu_c.cache_dir().glob("*.so")
    assert cpu_c.cache_dir().parent == tmp_path and library.name.startswith("wg_adam_n4_f32_f32_amsgrad-lerp_small-gate-newest_")

    def no_compiling(*args: Any) -> None:
        raise AssertionError("compiled again")

    monkeypatch.setattr(cpu_c, "_LOADED", {})
    monkeypatch.setattr(cpu_c, "_build", no_compiling)
    run_case(Case("adam", options=dict(amsgrad=True)), "c")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("decay", [0.0, 0.85])
@pytest.mark.parametrize("gate", [True, False])
@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_non_finite_gradients_give_the_twins_non_finite_values(kind: str, gate: bool, decay: float, backend: str) -> None:
    """inf and NaN gradients (alone, in pairs of the same or opposite sign, next to finite
    ones) come out where and as the twin's do: the kernel's one-instruction min/max keep
    torch.minimum/maximum's NaN propagation."""
    n, steps, size = 4, 6, 256
    values = [math.inf, -math.inf, math.nan]
    grads = [torch.randn(size, generator=torch.Generator().manual_seed(step)) for step in range(steps)]
    k = 0  # element k gets two non-finite values, at every pair of steps and of values
    for s1 in range(steps):
        for s2 in range(s1 + 1, steps):
            for v1 in values:
                for v2 in values:
                    grads[s1][k], grads[s2][k] = v1, v2
                    k += 1
    assert k <= size
    options = dict(momentum=0.9) if kind == "sgd" else {}
    case = Case(kind, buffer_size=n, decay=decay, threshold_scale=1.5, snr_gate=gate, options=options)
    p0 = [torch.randn(size, generator=torch.Generator().manual_seed(99))]
    fused, twin = Side(case, p0, True, backend), Side(case, p0, False)
    for g in grads:
        fused.step([0], [g], None)
        twin.step([0], [g], None)
        torch.testing.assert_close(fused.params[0], twin.params[0], rtol=2e-6, atol=2e-6, equal_nan=True)
