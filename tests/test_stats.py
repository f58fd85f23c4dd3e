"""wave_stats(): per param group summaries of the filter's last step, recomputed from the history.

Oracle: SPEC section 3 written out with the plain reference (explicit Haar transform,
sort-based median, reference_filter) over the stored history.
"""

from __future__ import annotations

import math

import pytest
import torch

from waveguard_optim import WaveAdam, WaveSGD, wave_guard, wave_stats
from waveguard_optim.reference import MAD_TO_SIGMA, haar, median, reference_filter

KEYS = {"filtered", "gate", "threshold", "noise", "zeroed", "relative_change"}


def oracle(opt):
    """The summaries by the book, in float64, from each parameter's stored history."""
    out = []
    for group in opt.param_groups:
        n, kappa = group["buffer_size"], group["threshold_scale"]
        options = dict(decay=group["decay"], threshold_scale=kappa, snr_gate=group["snr_gate"])
        elements = filtered = zeroed = 0
        gates, taus, sigmas = [], [], []
        diff_sq = g_sq = 0.0
        for p in group["params"]:
            state = opt.state.get(p, {})
            if "wave_count" not in state:
                continue
            count = state["wave_count"]
            slots = [state[f"wave_history_{(count + j) % n}"] for j in range(n)]  # oldest first
            buffer = torch.stack([torch.view_as_real(s) if s.is_complex() else s for s in slots]).double()
            buffer = buffer.reshape(n, -1)
            g = buffer[-1]
            elements += g.numel()
            g_sq += float(g.square().sum())
            if count < n:
                continue
            c = haar(buffer)
            sigma = median(c[n // 2 :].abs()) / MAD_TO_SIGMA
            if group["snr_gate"]:
                e_coarse, e_fine = c[: n // 2].square().sum(0), c[n // 2 :].square().sum(0)
                total = e_coarse + e_fine
                gate = torch.where(total > 0, e_fine / total, torch.zeros_like(total))
            else:
                gate = torch.ones_like(sigma)
            tau = kappa * gate * sigma * math.sqrt(2 * math.log(n))
            g_hat = reference_filter(buffer, **options)
            filtered += g.numel()
            zeroed += int((c[1:].abs() <= tau).sum())
            gates.append(gate)
            taus.append(tau)
            sigmas.append(sigma)
            diff_sq += float((g_hat - g).square().sum())
        mean = (lambda xs: float(torch.cat(xs).mean())) if filtered else (lambda xs: math.nan)
        out.append(
            {
                "filtered": filtered / elements if elements else 0.0,
                "gate": mean(gates),
                "threshold": mean(taus),
                "noise": mean(sigmas),
                "zeroed": zeroed / (filtered * (n - 1)) if filtered else math.nan,
                "relative_change": (math.sqrt(diff_sq / g_sq) if g_sq else 0.0) if elements else math.nan,
            }
        )
    return out


def assert_stats_close(got, expected, rtol=1e-9, atol=1e-12):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert set(g) == KEYS
        for key in KEYS:
            assert isinstance(g[key], float), key
            if math.isnan(e[key]):
                assert math.isnan(g[key]), (key, g[key])
            else:
                assert g[key] == pytest.approx(e[key], rel=rtol, abs=atol), (key, g[key], e[key])


def noisy_params(dtype=torch.float64):
    torch.manual_seed(0)
    return [
        torch.nn.Parameter(torch.randn(5, 6, dtype=dtype)),
        torch.nn.Parameter(torch.randn(9, dtype=dtype)),
        torch.nn.Parameter(torch.randn(4, dtype=dtype)),
    ]


def step_noisy(opt, params, steps, seed=0, skip_last_param_every=None):
    generator = torch.Generator().manual_seed(seed)
    for t in range(steps):
        for i, p in enumerate(params):
            if skip_last_param_every and i == len(params) - 1 and t % skip_last_param_every:
                p.grad = None
                continue
            signal = torch.linspace(-1, 1, p.numel(), dtype=torch.float64).reshape(p.shape)
            # Some elements much noisier than others, some exactly constant (all details 0).
            scale = torch.linspace(0, 2, p.numel(), dtype=torch.float64).reshape(p.shape)
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float64) * scale
            p.grad = (signal + noise).to(p.dtype)
        opt.step()


def grouped(params):
    return [
        {"params": params[:1]},
        {"params": params[1:2], "buffer_size": 4, "decay": 0.6, "threshold_scale": 2.5, "snr_gate": False},
        {"params": params[2:], "buffer_size": 2, "threshold_scale": 0.0},
    ]


@pytest.mark.parametrize("make", ["adam", "sgd", "wrapped_adamw"])
def test_stats_match_the_book(make):
    params = noisy_params()
    if make == "adam":
        opt = WaveAdam(grouped(params), lr=1e-3, maximize=True)
    elif make == "sgd":
        opt = WaveSGD(grouped(params), lr=1e-3, momentum=0.9)
    else:
        opt = torch.optim.AdamW(grouped(params), lr=1e-3)
        wave_guard(opt)
        for group, spec in zip(opt.param_groups, grouped(params)):
            group.update({k: v for k, v in spec.items() if k != "params"})
    step_noisy(opt, params, steps=11, skip_last_param_every=2)
    got = opt.wave_stats()
    assert_stats_close(got, oracle(opt))
    assert got == wave_stats(opt)
    assert all(s["filtered"] == 1.0 for s in got)
    assert got[1]["gate"] == 1.0  # snr_gate=False
    assert got[2]["threshold"] == 0.0  # threshold_scale=0
    assert 0 < got[0]["zeroed"] < 1 and 0 < got[0]["relative_change"]


def test_spec_example_by_hand():
    """SPEC's N = 4 example b = [4, 6, 10, 2]: c = [11, -1, -sqrt2, 4 sqrt2]."""
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = WaveSGD([p], lr=0.0, buffer_size=4, decay=0.5, threshold_scale=1.0)
    for value in (4.0, 6.0, 10.0, 2.0):
        p.grad = torch.tensor([value], dtype=torch.float64)
        opt.step()
    (stats,) = opt.wave_stats()
    sigma = (math.sqrt(2) + 4 * math.sqrt(2)) / 2 / 0.6745
    gate = (2 + 32) / (121 + 1 + 2 + 32)
    tau = gate * sigma * math.sqrt(2 * math.log(4))
    assert 1.4143 < tau < 5.656  # so -1 and -sqrt2 are zeroed, 4 sqrt2 is not
    g_hat = float(reference_filter(torch.tensor([[4.0], [6.0], [10.0], [2.0]], dtype=torch.float64),
                                   decay=0.5, threshold_scale=1.0, snr_gate=True))
    assert stats["noise"] == pytest.approx(sigma, rel=1e-12)
    assert stats["gate"] == pytest.approx(gate, rel=1e-12)
    assert stats["threshold"] == pytest.approx(tau, rel=1e-12)
    assert stats["zeroed"] == pytest.approx(2 / 3)
    assert stats["relative_change"] == pytest.approx(abs(g_hat - 2.0) / 2.0, rel=1e-12)
    assert stats["filtered"] == 1.0


def test_warm_up_and_empty():
    params = noisy_params()
    opt = WaveAdam(params, lr=1e-3, buffer_size=8)
    (before,) = opt.wave_stats()
    assert before["filtered"] == 0.0 and math.isnan(before["relative_change"]) and math.isnan(before["gate"])
    step_noisy(opt, params, steps=7)
    (warm,) = opt.wave_stats()
    assert warm["filtered"] == 0.0 and warm["relative_change"] == 0.0
    assert all(math.isnan(warm[k]) for k in ("gate", "threshold", "noise", "zeroed"))
    step_noisy(opt, params, steps=1, seed=1)
    assert_stats_close(opt.wave_stats(), oracle(opt))


def test_partly_filtered_group():
    """A parameter still in warm-up counts in ``filtered`` and in ||g||, not in the means."""
    params = noisy_params()
    opt = WaveAdam(params, lr=1e-3, buffer_size=4)
    step_noisy(opt, params, steps=5, skip_last_param_every=3)  # the last parameter has 2 gradients
    (stats,) = opt.wave_stats()
    assert stats["filtered"] == pytest.approx((30 + 9) / (30 + 9 + 4))
    assert_stats_close([stats], oracle(opt))


def test_identity_settings_change_nothing():
    params = noisy_params()
    opt = WaveAdam(params, lr=1e-3, buffer_size=4, decay=0.0, threshold_scale=0.0)
    step_noisy(opt, params, steps=6)
    (stats,) = opt.wave_stats()
    assert stats["threshold"] == 0.0
    assert stats["relative_change"] == 0.0  # g_hat is the newest gradient itself


@pytest.mark.parametrize("buffer_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_history_uses_the_stored_copy(buffer_dtype):
    params = noisy_params(torch.float32)
    opt = WaveAdam(params, lr=1e-3, buffer_size=4, buffer_dtype=buffer_dtype)
    step_noisy(opt, params, steps=6)
    # The oracle reads the same stored (rounded) history; float32 filter arithmetic.
    assert_stats_close(opt.wave_stats(), oracle(opt), rtol=1e-5, atol=1e-6)


def test_a_huge_gradient_keeps_the_gate_finite():
    """SPEC section 3, step 5 (issue 11, item 5): a float32 gradient of 1e30 in the window made
    the gate's energies overflow (gamma = inf/inf = NaN); the float64 oracle does not overflow."""
    params = noisy_params(torch.float32)
    opt = WaveAdam(params, lr=1e-3, buffer_size=4)
    step_noisy(opt, params, steps=5)
    for p in params:
        p.grad = torch.randn(p.shape)
    params[0].grad[0, 0], params[1].grad[2] = 1e30, -3e35
    opt.step()
    stats = opt.wave_stats()
    assert all(math.isfinite(v) for v in stats[0].values())
    assert_stats_close(stats, oracle(opt), rtol=1e-5, atol=1e-6)


def test_complex_parameter_counts_real_and_imaginary_parts():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.complex128))
    opt = WaveAdam([p], lr=1e-3, buffer_size=2)
    for _ in range(3):
        p.grad = torch.randn(3, dtype=torch.complex128)
        opt.step()
    assert_stats_close(opt.wave_stats(), oracle(opt))


def test_stats_are_not_stored_during_steps():
    """Nothing is tracked: the state holds Adam's keys and the history, and stats reads it only."""
    params = noisy_params()
    opt = WaveAdam(params, lr=1e-3, buffer_size=4)
    step_noisy(opt, params, steps=5)
    expected_keys = {"step", "exp_avg", "exp_avg_sq", "wave_count"} | {f"wave_history_{i}" for i in range(4)}
    assert all(set(s) == expected_keys for s in opt.state.values())
    snapshot = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[params[0]].items()}
    opt.wave_stats()
    assert all(
        torch.equal(opt.state[params[0]][k], v) if torch.is_tensor(v) else opt.state[params[0]][k] == v
        for k, v in snapshot.items()
    )


def test_wrapped_handle_and_method_agree_with_waveadam():
    ref_params, params = noisy_params(torch.float32), noisy_params(torch.float32)
    ref = WaveAdam(ref_params, lr=1e-2, decoupled_weight_decay=True, weight_decay=0.1)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    handle = wave_guard(opt)
    step_noisy(ref, ref_params, steps=12)
    step_noisy(opt, params, steps=12)
    assert handle.wave_stats() == opt.wave_stats() == ref.wave_stats()


def test_plain_optimizer_is_refused():
    with pytest.raises(ValueError, match="AdamW is not filtered by WaveGuard"):
        wave_stats(torch.optim.AdamW(noisy_params()))


def test_wave_options_without_a_filter_are_refused_not_reported():
    """Options in the groups are not a filter: after remove(), or written by hand (as a failed
    wave_guard once left them), stats would read filtered=0.0 and NaN: refused instead."""
    params = noisy_params(torch.float32)
    opt = torch.optim.AdamW(params, lr=1e-2)
    handle = wave_guard(opt, buffer_size=4)
    step_noisy(opt, params, steps=6)
    assert wave_stats(opt)[0]["filtered"] == 1.0
    handle.remove()
    with pytest.raises(ValueError, match="AdamW is not filtered by WaveGuard.*removed"):
        wave_stats(opt)
    by_hand = torch.optim.AdamW(noisy_params(torch.float32))
    by_hand.param_groups[0].update(buffer_size=8, decay=0.0, threshold_scale=1.0, snr_gate=True, buffer_dtype=None)
    with pytest.raises(ValueError, match="not filtered"):
        wave_stats(by_hand)


def test_wrappers_holding_the_optimizer_are_unwrapped():
    """accelerate's AcceleratedOptimizer, Lightning's LightningOptimizer and the handle hold it as
    ``.optimizer`` (tests/test_frameworks.py uses the real ones)."""

    class Holder:
        def __init__(self, optimizer):
            self.optimizer = optimizer

    class Private:  # Opacus' DPOptimizer holds it as .original_optimizer (tests/test_opacus.py: the real one)
        def __init__(self, optimizer):
            self.original_optimizer = optimizer

    params = noisy_params(torch.float32)
    opt = WaveAdam(params, lr=1e-2)
    step_noisy(opt, params, steps=12)
    assert wave_stats(Holder(Holder(opt))) == wave_stats(Private(opt)) == wave_stats(Holder(Private(opt))) == wave_stats(opt)
    with pytest.raises(ValueError, match="AdamW inside Private is not filtered"):
        wave_stats(Private(torch.optim.AdamW(noisy_params())))
