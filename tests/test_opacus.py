"""WaveGuard as the optimizer inside Opacus' DP-SGD (``PrivacyEngine.make_private``).

Installed by the ``frameworks`` extra; skipped without opacus. A tiny model on 40 samples,
Poisson sampling, seeded data and noise generators, CPU, 20 steps (seconds). Oracles: the
privatized gradients Opacus hands the optimizer, replayed into WaveAdam / WaveSGD outside
Opacus (the filter consumed exactly those, once per step); torch's Adam in the same run (the
accountant's ε, which must not depend on the optimizer); the uninterrupted run (a checkpoint of
model, optimizer and accountant resumed bit for bit).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from waveguard_optim import WaveAdam, WaveSGD, wave_guard, wave_stats

opacus = pytest.importorskip("opacus", reason="opacus is installed by the frameworks extra")

SAMPLES, BATCH = 40, 8  # Poisson sampling at rate 1/5: 5 steps an epoch
EPOCHS, BUFFER = 4, 4  # 20 steps: the filter runs from step 4 on
DP = dict(noise_multiplier=1.1, max_grad_norm=1.0)
DELTA = 1e-5
ADAM = dict(lr=0.05, weight_decay=0.1, foreach=True)
SGD = dict(lr=0.1, momentum=0.9, weight_decay=0.1, foreach=True)


def _wrapped_adamw(params):
    opt = torch.optim.AdamW(params, **ADAM)
    wave_guard(opt, buffer_size=BUFFER)
    return opt


# name -> (the optimizer handed to make_private, wave_guard the DPOptimizer afterwards, the replay oracle)
CASES = {
    "WaveAdam": (lambda p: WaveAdam(p, buffer_size=BUFFER, **ADAM), False,
                 lambda p: WaveAdam(p, buffer_size=BUFFER, **ADAM)),
    "WaveSGD": (lambda p: WaveSGD(p, buffer_size=BUFFER, **SGD), False,
                lambda p: WaveSGD(p, buffer_size=BUFFER, **SGD)),
    "wave_guard(AdamW)": (_wrapped_adamw, False,
                          lambda p: WaveAdam(p, decoupled_weight_decay=True, buffer_size=BUFFER, **ADAM)),
    "wave_guard(DPOptimizer)": (lambda p: torch.optim.AdamW(p, **ADAM), True,
                                lambda p: WaveAdam(p, decoupled_weight_decay=True, buffer_size=BUFFER, **ADAM)),
}  # fmt: skip


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _data() -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(3)
    return torch.utils.data.TensorDataset(torch.randn(SAMPLES, 5, generator=generator),
                                          torch.randint(0, 3, (SAMPLES,), generator=generator))  # fmt: skip


class _Run:
    """One DP training run: the PrivacyEngine (rdp accountant), the private model, optimizer and
    loader, and the two generators (batch sampling, noise) whose states a resume must restore."""

    def __init__(self, build, wrap_after, record=None):
        self.engine = opacus.PrivacyEngine(accountant="rdp")
        self.data_rng, self.noise_rng = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
        model = _model()
        opt = build(model.parameters())
        loader = torch.utils.data.DataLoader(_data(), batch_size=BATCH, generator=self.data_rng)
        self.model, self.opt, self.loader = self.engine.make_private(
            module=model, optimizer=opt, data_loader=loader, noise_generator=self.noise_rng, **DP
        )
        if wrap_after:
            wave_guard(self.opt, buffer_size=BUFFER)
        if record is not None:  # Opacus' step hook (the accountant's) runs once p.grad is privatized
            accountant = self.opt.step_hook

            def hook(dp_opt):
                record.append([p.grad.clone() for p in self.model.parameters()])
                accountant(dp_opt)

            self.opt.attach_step_hook(hook)

    def epochs(self, n):
        for _ in range(n):
            for x, y in self.loader:
                self.opt.zero_grad()
                F.cross_entropy(self.model(x), y).backward()
                self.opt.step()
        return [p.detach().clone() for p in self.model.parameters()]

    def save(self, path):
        rng = {"data": self.data_rng.get_state(), "noise": self.noise_rng.get_state()}
        self.engine.save_checkpoint(path=path, module=self.model, optimizer=self.opt, checkpoint_dict={"rng": rng})

    def load(self, path):
        rng = self.engine.load_checkpoint(path=path, module=self.model, optimizer=self.opt)["rng"]
        self.data_rng.set_state(rng["data"])
        self.noise_rng.set_state(rng["noise"])


def _assert_same(got, expected):
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_the_filter_consumes_the_privatized_gradients(case):
    """Replayed outside Opacus, the gradients handed to the optimizer give the same parameters: the
    filter saw the clipped, noised gradients (never the raw ones), once per step."""
    build, wrap_after, oracle = case
    handed = []
    run = _Run(build, wrap_after, record=handed)
    got = run.epochs(EPOCHS)
    params = [p.detach().clone().requires_grad_() for p in _model().parameters()]
    ref = oracle(params)
    for grads in handed:
        for p, g in zip(params, grads):
            p.grad = g
        ref.step()
    _assert_same(got, [p.detach() for p in params])
    inner = run.opt.original_optimizer
    assert len(handed) > 2 * BUFFER and all(int(inner.state[p]["wave_count"]) == len(handed) for p in run.model.parameters())
    assert wave_stats(run.opt)[0]["filtered"] == 1.0  # the DPOptimizer is looked through


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_epsilon_is_that_of_torch_adam(case):
    """The accountant's ε (and its history) is that of the same run with torch's Adam: the
    optimizer is post-processing, and the filter neither skips nor repeats a step."""
    build, wrap_after, _ = case
    ours, adam = _Run(build, wrap_after), _Run(lambda p: torch.optim.Adam(p, lr=ADAM["lr"]), False)
    changed = [not torch.equal(a, b) for a, b in zip(ours.epochs(EPOCHS), adam.epochs(EPOCHS))]
    assert all(changed)
    assert ours.engine.accountant.history == adam.engine.accountant.history
    assert ours.engine.get_epsilon(DELTA) == adam.engine.get_epsilon(DELTA) > 0


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_checkpoint_resumes_bit_for_bit(case, tmp_path):
    """PrivacyEngine.save_checkpoint / load_checkpoint (model, optimizer with the history, accountant)
    after 2 epochs, resumed in fresh objects: the uninterrupted run, bit for bit, and the same ε."""
    build, wrap_after, _ = case
    straight = _Run(build, wrap_after)
    expected = straight.epochs(EPOCHS)

    first = _Run(build, wrap_after)
    first.epochs(EPOCHS // 2)
    first.save(tmp_path / "dp.pt")
    resumed = _Run(build, wrap_after)
    resumed.load(tmp_path / "dp.pt")
    inner = resumed.opt.original_optimizer
    assert all(int(inner.state[p]["wave_count"]) > BUFFER for p in resumed.model.parameters())  # history came back
    _assert_same(resumed.epochs(EPOCHS - EPOCHS // 2), expected)
    assert resumed.engine.accountant.history == straight.engine.accountant.history
    assert resumed.engine.get_epsilon(DELTA) == straight.engine.get_epsilon(DELTA)
