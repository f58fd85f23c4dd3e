"""torch.compile of a training step that calls opt.step(): it runs, matches eager, and compiles
each frame at most twice whatever the buffer_size.

What dynamo does with the optimizer step (torch 2.13, CPU): it graph-breaks at
``loss.backward()`` and ``zero_grad`` as for any optimizer. The ring bookkeeping
(``claim_histories``: which slot is the newest, whether the history is full) runs outside
the trace (``torch.compiler.disable``), so the traced code depends on the ring only through
the ``full`` flags: one compile during warm-up, one once the history is full. That is
checked with ``recompile_limit = 2`` and ``fail_on_recompile_limit_hit``: a third compile of
any frame raises. WaveAdam(foreach=True) does not compile: torch's foreach Adam fails under
dynamo when called from a subclass's step on CPU ("Expected scalars to be on CPU, got
meta"; STYLE.md), with or without WaveGuard's filter.

Oracle: the same training in eager mode (WaveAdam, or AdamW wrapped by wave_guard).
Compiled Adam itself differs from eager Adam by float rounding (about 1e-6 here, lr = 0.02), hence
the tolerance; a stale or misplaced ring slot would be off by orders of magnitude more.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from waveguard_optim import WaveAdam, WaveSGD, wave_guard

TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        yield
    torch._dynamo.reset()


KINDS = {
    "waveadam-default": dict(),  # the fused CPU step
    "waveadam-fused": dict(fused=True),  # the same; Triton under TRITON_INTERPRET=1 (tests/test_fused_triton.py)
    "wavesgd-fused": dict(fused=True, momentum=0.9),
    "waveadam-single": dict(foreach=False),
    "wrapped-adamw-foreach": dict(foreach=True),
    "wrapped-adamw-single": dict(foreach=False),
}


def make(kind: str, buffer_size: int):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))
    if kind.startswith("waveadam"):
        opt = WaveAdam(model.parameters(), lr=0.02, weight_decay=0.1, buffer_size=buffer_size, **KINDS[kind])
    elif kind.startswith("wavesgd"):
        opt = WaveSGD(model.parameters(), lr=0.02, weight_decay=0.1, buffer_size=buffer_size, **KINDS[kind])
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.1, **KINDS[kind])
        wave_guard(opt, buffer_size=buffer_size)
    return model, opt


def batch(t: int):
    generator = torch.Generator().manual_seed(t)
    return torch.randn(8, 6, generator=generator), torch.randn(8, 3, generator=generator)


def train_step(model, opt, x, y):
    opt.zero_grad()
    loss = (model(x) - y).square().mean()
    loss.backward()
    opt.step()
    return loss.detach()


def compare(kind: str, buffer_size: int, steps: int, backend: str):
    eager_model, eager_opt = make(kind, buffer_size)
    model, opt = make(kind, buffer_size)
    compiled_step = torch.compile(train_step, backend=backend)
    for t in range(steps):
        x, y = batch(t)
        expected = train_step(eager_model, eager_opt, x, y)
        got = compiled_step(model, opt, x, y)
        torch.testing.assert_close(got, expected, **TOL)
        for p, q in zip(model.parameters(), eager_model.parameters()):
            torch.testing.assert_close(p, q, **TOL)
    for p, q in zip(model.parameters(), eager_model.parameters()):
        state, eager_state = opt.state[p], eager_opt.state[q]
        assert int(state["wave_count"]) == int(eager_state["wave_count"]) == steps
        for i in range(buffer_size):  # the same gradient in the same ring slot
            torch.testing.assert_close(state[f"wave_history_{i}"], eager_state[f"wave_history_{i}"], **TOL)


@pytest.mark.parametrize("buffer_size", [4, 16])
@pytest.mark.parametrize("kind", KINDS)
def test_compiled_step_matches_eager_with_at_most_two_compiles(kind, buffer_size):
    """Dynamo traces the optimizer step (backend="eager": the graphs run as captured), two ring turns."""
    compare(kind, buffer_size=buffer_size, steps=2 * buffer_size + 2, backend="eager")


def check_step_traces_whole(kind: str, buffer_size: int = 4) -> None:
    """The compiled step matches eager, ``opt.step()`` breaks no graph (the one break of a
    training step is ``loss.backward()``), and dynamo warns about nothing of ours (it warns
    when it traces an ``lru_cache``-wrapped function)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compare(kind, buffer_size=buffer_size, steps=buffer_size + 2, backend="eager")
        model, opt = make(kind, buffer_size)
        for t in range(buffer_size + 2):
            train_step(model, opt, *batch(t))
        explained = torch._dynamo.explain(train_step)(model, opt, *batch(0))
    reasons = [str(b.reason).split("\n")[0] for b in explained.break_reasons]
    assert reasons == ["Unsupported Tensor.backward() call"], reasons
    assert not [w for w in caught if "lru_cache" in str(w.message)], [str(w.message) for w in caught]


@pytest.mark.parametrize("kind", KINDS)
def test_the_step_breaks_no_graph_and_dynamo_warns_nothing(kind):
    check_step_traces_whole(kind)


def test_inductor_compiled_step_matches_eager():
    """The default backend (inductor, C++ on CPU) past warm-up."""
    compare("waveadam-single", buffer_size=2, steps=4, backend="inductor")
