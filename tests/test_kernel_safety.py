"""Every tensor a fused kernel reaches through a raw pointer is checked before anything is written
(issue 11): dtype, device, element count, layout and aliasing, on each fused path.

Paths: the C kernel and the torch back end of the fused CPU step (always; C where a compiler is
found) and the Triton kernels (under ``TRITON_INTERPRET=1`` only: run this file both ways). A
refused step leaves parameters and every state (moments, step, history, ring position) as they
were; where torch's own optimizer trains on (SGD with a momentum buffer of another dtype), the
fused step trains on too, as the eager WaveSGD (torch's single-tensor SGD) does.

State tensors that a step must not write past are views of the first half of a larger buffer
whose second half holds a sentinel, so that an unchecked write shows as a failed assertion,
not as a crashed test process.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest
import torch

from waveguard_optim import WaveAdam, WaveSGD, base
from waveguard_optim.kernels import cpu_c, cpu_step

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRET:  # the interpreter truncates float32 -> bfloat16; this autouse fixture makes it round as GPUs do
    from test_fused_triton import _round_to_nearest_bf16_in_the_interpreter  # noqa: F401
SIZE = 300
SENTINEL = 7.0
PATHS = [
    pytest.param("c", marks=pytest.mark.skipif(cpu_c.find_compiler() is None, reason="no C compiler")),
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not INTERPRET, reason="Triton on CPU needs TRITON_INTERPRET=1")),
]
CONVERSIONS = [torch.float64, torch.float16, torch.bfloat16]
ADAM_STATE = {"exp_avg": "exp_avgs", "exp_avg_sq": "exp_avg_sqs", "max_exp_avg_sq": "max_exp_avg_sqs"}
# (rtol, atol) of the least precise dtype a step rounds to (as tests/test_fused_cpu.py)
TOLERANCES = {torch.float32: (2e-6, 2e-6), torch.float16: (2**-10, 2**-10 * 0.1), torch.bfloat16: (2**-7, 2**-7 * 0.1)}


@pytest.fixture
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Route the optimizers' fused step to one path."""
    name = request.param
    if name == "triton":
        from waveguard_optim.kernels import triton_step

        monkeypatch.setattr(base, "fused_backend", lambda device: triton_step)
    else:
        monkeypatch.setenv("WAVEGUARD_CPU_BACKEND", name)
        monkeypatch.setattr(base, "fused_backend", lambda device: cpu_step)
    return name


def _grad(step: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(SIZE, generator=torch.Generator().manual_seed(step)).to(dtype)


def _trained(kind: str, **options: Any) -> tuple[torch.nn.Parameter, torch.optim.Optimizer]:
    """A parameter and its optimizer after 3 steps (history of 2 full: the filter runs)."""
    p = torch.nn.Parameter(torch.randn(SIZE, generator=torch.Generator().manual_seed(99)))
    if kind == "adam":
        opt = WaveAdam([p], lr=0.01, amsgrad=True, buffer_size=2, **options)
    else:
        opt = WaveSGD([p], lr=0.1, momentum=0.9, buffer_size=2, **options)
    for step in range(3):
        p.grad = _grad(step)
        opt.step()
    return p, opt


def _planted(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``t``'s values in the first half of a buffer twice its size; returns (view, buffer)."""
    backing = torch.full((2 * t.numel(),), SENTINEL, dtype=t.dtype)
    backing[: t.numel()] = t.reshape(-1)
    return backing[: t.numel()].view(t.shape), backing


def _assert_refused_untouched(opt: torch.optim.Optimizer, p: torch.Tensor, match: str) -> None:
    before = copy.deepcopy(opt.state[p]), p.detach().clone()
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    assert torch.equal(p, before[1])
    assert opt.state[p].keys() == before[0].keys()
    for key, value in before[0].items():
        now = opt.state[p][key]
        if not isinstance(value, torch.Tensor):
            assert now == value, key
        else:  # a meta tensor has no values to compare
            assert (now.dtype, now.device, now.shape) == (value.dtype, value.device, value.shape), key
            assert value.is_meta or torch.equal(now, value), key


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", CONVERSIONS)
@pytest.mark.parametrize("key", list(ADAM_STATE))
def test_adam_state_left_behind_by_a_model_conversion_is_refused_untouched(path: str, dtype: torch.dtype, key: str) -> None:
    """``model.double()`` / ``.half()`` / ``.to(bfloat16)`` after some steps: torch's Adam raises
    ``expected dtype ... but got dtype ...``, and so does the fused step, for each state tensor on
    its own (the others converted along), before writing anything, also past the tensor's end."""
    p, opt = _trained("adam", fused=True)
    p.data = p.data.to(dtype)
    for other in ADAM_STATE:
        if other != key:
            opt.state[p][other] = opt.state[p][other].to(dtype)
    opt.state[p][key], backing = _planted(opt.state[p][key])
    p.grad = _grad(3, dtype)
    _assert_refused_untouched(opt, p, f"expected dtype {dtype} for {ADAM_STATE[key]}\\[0\\]")
    assert (backing[SIZE:] == SENTINEL).all()


@pytest.mark.parametrize("dtype", CONVERSIONS)
def test_torch_adam_refuses_the_same_conversion(dtype: torch.dtype) -> None:
    """The contract above is torch's own (the reference for the refusal)."""
    p = torch.nn.Parameter(torch.randn(SIZE))
    opt = torch.optim.Adam([p], lr=0.01, foreach=False)
    p.grad = _grad(0)
    opt.step()
    p.data = p.data.to(dtype)
    p.grad = _grad(1, dtype)
    with pytest.raises(RuntimeError, match="expected dtype"):
        opt.step()


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", CONVERSIONS)
def test_sgd_momentum_buffer_left_behind_by_a_model_conversion_trains_on_like_torch(path: str, dtype: torch.dtype) -> None:
    """torch's SGD trains on with a float32 momentum buffer after the model is converted (the
    buffer keeps its dtype); the fused step does the same as the eager WaveSGD (torch's own
    single-tensor SGD on the filtered gradient), and writes nothing past the buffer."""
    p, opt = _trained("sgd", fused=True)
    q, eager = _trained("sgd", foreach=False, fused=False)
    for param in (p, q):
        param.data = param.data.to(dtype)
    opt.state[p]["momentum_buffer"], backing = _planted(opt.state[p]["momentum_buffer"])
    rtol, atol = TOLERANCES[torch.float32 if dtype == torch.float64 else dtype]
    for step in range(3, 7):
        p.grad, q.grad = _grad(step, dtype), _grad(step, dtype)
        opt.step()
        eager.step()
        buffer, expected = opt.state[p]["momentum_buffer"], eager.state[q]["momentum_buffer"]
        assert buffer.dtype == expected.dtype == torch.float32
        assert buffer.data_ptr() == backing.data_ptr() and (backing[SIZE:] == SENTINEL).all()
        torch.testing.assert_close(p.detach(), q.detach(), rtol=rtol, atol=atol)
        # the buffer adds the filtered gradient as rounded to the parameter's dtype: an ulp of it either way
        torch.testing.assert_close(buffer, expected, rtol=rtol, atol=atol + rtol * float(q.grad.abs().max()))
        with torch.no_grad():  # each step against torch's from the same start: roundings do not add up
            q.copy_(p)
            expected.copy_(buffer)


def _expanded(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)[:1].expand(t.shape)


# (algorithm, what is done to the state, the error)
BAD_STATES = {
    "expanded exp_avg": ("adam", lambda st: st.update(exp_avg=_expanded(st["exp_avg"])), "exp_avgs\\[0\\] has overlapping elements"),
    "expanded exp_avg_sq": ("adam", lambda st: st.update(exp_avg_sq=_expanded(st["exp_avg_sq"])), "exp_avg_sqs\\[0\\] has overlapping"),
    "expanded max_exp_avg_sq": ("adam", lambda st: st.update(max_exp_avg_sq=_expanded(st["max_exp_avg_sq"])), "max_exp_avg_sqs\\[0\\] has overlapping"),
    "expanded momentum_buffer": ("sgd", lambda st: st.update(momentum_buffer=_expanded(st["momentum_buffer"])), "momentum_buffers\\[0\\] has overlapping"),
    "exp_avg is exp_avg_sq": ("adam", lambda st: st.update(exp_avg_sq=st["exp_avg"]), "shares memory"),
    "max_exp_avg_sq is exp_avg_sq": ("adam", lambda st: st.update(max_exp_avg_sq=st["exp_avg_sq"]), "shares memory"),
    "momentum_buffer in a history slot": ("sgd", lambda st: st.update(momentum_buffer=st["wave_history_0"]), "shares memory"),
    "two history slots in one": ("adam", lambda st: st.update(wave_history_1=st["wave_history_0"]), "shares memory"),
    "expanded history slots": ("sgd", lambda st: st.update(wave_history_0=_expanded(st["wave_history_0"]), wave_history_1=_expanded(st["wave_history_1"])), "newest_history_slots\\[0\\] has overlapping"),
    "exp_avg on meta": ("adam", lambda st: st.update(exp_avg=st["exp_avg"].to("meta")), "meta"),
    "momentum_buffer on meta": ("sgd", lambda st: st.update(momentum_buffer=st["momentum_buffer"].to("meta")), "meta"),
    "history slot on meta": ("adam", lambda st: st.update(wave_history_0=st["wave_history_0"].to("meta")), "meta"),
    "exp_avg too small": ("adam", lambda st: st.update(exp_avg=st["exp_avg"][:-1]), "exp_avg"),
    "max_exp_avg_sq too small": ("adam", lambda st: st.update(max_exp_avg_sq=st["max_exp_avg_sq"][:-1]), "max_exp_avg_sq"),
    "step of two elements": ("adam", lambda st: st.update(step=torch.zeros(2)), "state_steps\\[0\\] must be a one-element tensor"),
}


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("case", list(BAD_STATES))
def test_a_state_the_kernel_cannot_write_safely_is_refused_untouched(path: str, case: str) -> None:
    """Layouts and aliasing a pointer would turn into lost, racing or out-of-bounds writes (a
    foreign checkpoint, a hand edit), and tensors on another device: refused before anything is
    written, with every state (including ``step`` and the ring position) as it was."""
    kind, edit, match = BAD_STATES[case]
    p, opt = _trained(kind, fused=True)
    edit(opt.state[p])
    p.grad = _grad(3)
    _assert_refused_untouched(opt, p, match)


@pytest.mark.skipif(not INTERPRET, reason="Triton on CPU needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("case", ["float8 history", "wrong-shaped exp_avg"])
def test_a_refused_triton_step_leaves_step_unchanged(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Triton step counts ``step`` only after validating every row (issue 11, item 7)."""
    from waveguard_optim.kernels import triton_step

    monkeypatch.setattr(base, "fused_backend", lambda device: triton_step)
    p, opt = _trained("adam", fused=True)
    state = opt.state[p]
    if case == "float8 history":
        for key in ("wave_history_0", "wave_history_1"):
            state[key] = state[key].to(torch.float8_e4m3fn)
    else:
        state["exp_avg"] = state["exp_avg"].reshape(10, 30)
    p.grad = _grad(3)
    _assert_refused_untouched(opt, p, "dtype|shape")
