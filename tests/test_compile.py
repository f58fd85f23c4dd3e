"""torch.compile of a training step that calls opt.step(): it runs and matches eager.

What dynamo does with the optimizer step (torch 2.13, CPU): it graph-breaks at
``loss.backward()`` and ``zero_grad`` as for any optimizer, and in the filter at
``filter_weights`` (a ``tolist()`` of the cached weights); the ring index ``wave_count``
is a Python int, so the step's graph is specialised per ring position: about N + 2
variants, each compiled once. Past ``torch._dynamo.config.recompile_limit`` (8) dynamo
runs that frame eagerly from then on, with a warning: slower, still correct (tested below).

Oracle: the same training in eager mode (WaveAdam, or AdamW wrapped by wave_guard).
Compiled Adam itself differs from eager Adam by float rounding (about 1e-6 here, lr = 0.02), hence
the tolerance; a stale or misplaced ring slot would be off by orders of magnitude more.
"""

from __future__ import annotations

import pytest
import torch

from waveguard_optim import WaveAdam, wave_guard

TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make(kind: str, buffer_size: int):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))
    if kind == "waveadam":
        opt = WaveAdam(model.parameters(), lr=0.02, weight_decay=0.1, buffer_size=buffer_size)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.1)
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
        assert state["wave_count"] == eager_state["wave_count"] == steps
        for i in range(buffer_size):  # the same gradient in the same ring slot
            torch.testing.assert_close(state[f"wave_history_{i}"], eager_state[f"wave_history_{i}"], **TOL)


@pytest.mark.parametrize("kind", ["waveadam", "wrapped_adamw"])
def test_compiled_step_matches_eager(kind):
    """Dynamo traces the optimizer step (backend="eager": the graphs run as captured), two ring turns."""
    compare(kind, buffer_size=4, steps=10, backend="eager")


def test_ring_longer_than_recompile_limit_still_matches_eager():
    """N = 16 ring positions exceed the recompile limit: dynamo falls back to eager, results stay right."""
    compare("waveadam", buffer_size=16, steps=20, backend="eager")


def test_inductor_compiled_step_matches_eager():
    """The default backend (inductor, C++ on CPU) on the smallest ring, past warm-up."""
    compare("waveadam", buffer_size=2, steps=4, backend="inductor")
