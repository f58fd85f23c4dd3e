"""wave_guard(optimizer): the WaveGuard filter attached to any torch optimizer by hooks.

Oracles: WaveAdam / WaveSGD (the wrapper must reproduce them bit for bit), the plain
reference (ReferenceWave) and torch's own optimizers (warm-up, identity settings, removal).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from waveguard_optim import WaveAdam, WaveSGD, wave_guard
from waveguard_optim.reference import ReferenceWave

STEPS = 24


def make_params(dtype=torch.float32, complex_too=False, strided=True):
    torch.manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(6, 5, dtype=dtype)),
        torch.nn.Parameter(torch.randn(7, dtype=dtype)),
    ]
    if strided:  # non-contiguous (torch's CPU fused Adam/SGD mishandle these: see STYLE.md)
        params.append(torch.nn.Parameter(torch.randn(4, 3, dtype=dtype).t()))
    if complex_too:
        params.append(torch.nn.Parameter(torch.randn(4, dtype=torch.complex64)))
    return params


def gradient(p, t, generator):
    """A trend plus noise; the second parameter gets no gradient every third step."""
    shape = p.shape
    noise = torch.randn(shape, generator=generator, dtype=torch.float64)
    trend = torch.linspace(-1, 1, p.numel(), dtype=torch.float64).reshape(shape) * (1 + 0.1 * t)
    g = (trend + 0.5 * noise).to(p.real.dtype if p.is_complex() else p.dtype)
    if p.is_complex():
        g = torch.complex(g, (0.3 * torch.randn(shape, generator=generator, dtype=torch.float64)).to(g.dtype))
    return g


def set_grads(params, t, generator):
    for i, p in enumerate(params):
        p.grad = None if (i == 1 and t % 3 == 2) else gradient(p, t, generator)


def lockstep(opt, ref, params, ref_params, *, steps, seed, rtol, atol):
    """Step ``opt`` and ``ref`` on the same gradients, comparing the parameters after every step."""
    generator = torch.Generator().manual_seed(seed)
    for t in range(steps):
        set_grads(params, t, generator)
        for p, q in zip(params, ref_params):
            q.grad = None if p.grad is None else p.grad.clone()
        opt.step()
        ref.step()
        for p, q in zip(params, ref_params):
            torch.testing.assert_close(p, q, rtol=rtol, atol=atol)


def train(params, opt, steps=STEPS, start=0, check_grads=True):
    """Run ``steps`` steps; check that every step leaves ``p.grad`` as it was (same tensor, same values)."""
    generator = torch.Generator().manual_seed(1234 + start)
    for t in range(start, start + steps):
        set_grads(params, t, generator)
        before = [(p.grad, None if p.grad is None else p.grad.clone()) for p in params]
        opt.step()
        if check_grads:
            for p, (obj, values) in zip(params, before):
                assert p.grad is obj
                if values is not None:
                    assert torch.equal(p.grad, values)
    return [p.detach().clone() for p in params]


def wrapped(optimizer_cls, params, wave=None, **kwargs):
    opt = optimizer_cls(params, **kwargs)
    wave_guard(opt, **(wave or {}))
    return opt


def assert_same(a, b):
    for x, y in zip(a, b):
        assert x.dtype == y.dtype
        assert torch.equal(x, y), (x - y).abs().max()


def eager(kwargs):
    """``kwargs`` with torch's default path made explicit for WaveAdam/WaveSGD: without
    foreach/fused, torch picks its single-tensor path on CPU, WaveGuard its own kernel
    (the C kernel where a compiler is found), which may round a sqrt differently by an ulp."""
    return {**kwargs, "foreach": False} if kwargs.get("foreach") is None else kwargs


ADAM_CASES = [
    dict(foreach=None),
    dict(foreach=False),
    dict(foreach=True),
    dict(foreach=False, maximize=True),
    dict(foreach=True, maximize=True, amsgrad=True),
    dict(foreach=True, weight_decay=0.0),
]
WAVE_CASES = [
    dict(),
    dict(buffer_size=4, decay=0.7, threshold_scale=2.0, snr_gate=False),
    dict(buffer_size=2, decay=1.0),
    dict(buffer_size=16, buffer_dtype=torch.bfloat16),
]


@pytest.mark.parametrize("adam", ADAM_CASES)
@pytest.mark.parametrize("wave", WAVE_CASES)
def test_adamw_wrap_is_waveadam_decoupled(adam, wave):
    """Issue: wrapping torch.optim.AdamW gives exactly WaveAdam(decoupled_weight_decay=True)'s trajectory."""
    kwargs = {"lr": 0.05, "weight_decay": 0.1, **adam}
    ref_params, params = make_params(), make_params()
    expected = train(ref_params, WaveAdam(ref_params, decoupled_weight_decay=True, **eager(kwargs), **wave))
    opt = wrapped(torch.optim.AdamW, params, wave, **kwargs)
    assert_same(train(params, opt), expected)
    assert [opt.state[p]["wave_count"] for p in params] == [STEPS, STEPS - STEPS // 3, STEPS]


@pytest.mark.parametrize("adam", [dict(), dict(maximize=True, amsgrad=True)])
@pytest.mark.parametrize("wave", WAVE_CASES[:2])
def test_fused_adamw_wrap_follows_waveadam(adam, wave):
    """torch's fused AdamW kernel wrapped: the same trajectory as WaveAdam's unfused path, to
    float rounding (torch's fused and single-tensor Adam round differently; WaveAdam(fused=True)
    runs WaveGuard's own kernel instead)."""
    kwargs = {"lr": 0.05, "weight_decay": 0.1, **adam}
    ref_params, params = make_params(strided=False), make_params(strided=False)
    expected = train(ref_params, WaveAdam(ref_params, decoupled_weight_decay=True, foreach=False, **kwargs, **wave))
    got = train(params, wrapped(torch.optim.AdamW, params, wave, fused=True, **kwargs))
    for x, y in zip(got, expected):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "adam", [dict(foreach=False), dict(foreach=True), dict(foreach=False, maximize=True, amsgrad=True)]
)
def test_adam_l2_wrap_is_waveadam(adam):
    """L2 weight decay stays in the wrapped optimizer, after the filter, as in WaveAdam."""
    kwargs = {"lr": 0.05, "weight_decay": 0.1, **adam}
    ref_params, params = make_params(), make_params()
    ref = WaveAdam(ref_params, **kwargs)
    expected = train(ref_params, ref)
    opt = wrapped(torch.optim.Adam, params, **kwargs)
    assert_same(train(params, opt), expected)
    # Same state, key for key, bit for bit (Adam's moments and the history).
    for p, q in zip(params, ref_params):
        assert opt.state[p].keys() == ref.state[q].keys()
        for key, value in ref.state[q].items():
            other = opt.state[p][key]
            assert other == value if key == "wave_count" else torch.equal(other, value), key


SGD_CASES = [
    dict(),
    dict(momentum=0.9, foreach=False),
    dict(momentum=0.9, nesterov=True, weight_decay=0.01, foreach=True),
    dict(momentum=0.5, dampening=0.3, maximize=True),
    dict(maximize=True, weight_decay=0.1, foreach=False),
]


@pytest.mark.parametrize("sgd", SGD_CASES)
def test_sgd_wrap_is_wavesgd(sgd):
    kwargs = dict(lr=0.05, **sgd)
    ref_params, params = make_params(), make_params()
    expected = train(ref_params, WaveSGD(ref_params, **eager(kwargs)))
    assert_same(train(params, wrapped(torch.optim.SGD, params, **kwargs)), expected)


@pytest.mark.parametrize("optimizer_cls", [torch.optim.AdamW, torch.optim.SGD])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("buffer_dtype", [None, torch.bfloat16])
def test_wrap_follows_reference(optimizer_cls, maximize, buffer_dtype):
    """Against the plain oracle: explicit Haar transform, sort-based median, inverse transform."""
    wave = dict(buffer_size=8, decay=0.8, threshold_scale=1.5, snr_gate=True, buffer_dtype=buffer_dtype)
    kwargs = dict(lr=0.01, weight_decay=0.05)
    if optimizer_cls is torch.optim.SGD:
        kwargs["momentum"] = 0.9
    # float64 parameters when the history is exact; a bf16 history with float32 parameters (the
    # reference filters a bf16 buffer in float32, which SPEC requires for float32 parameters only).
    dtype = torch.float64 if buffer_dtype is None else torch.float32
    tol = dict(rtol=1e-10, atol=1e-12) if buffer_dtype is None else dict(rtol=1e-5, atol=1e-6)
    params = make_params(dtype)
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    opt = wrapped(optimizer_cls, params, wave, maximize=maximize, **kwargs)
    ref = ReferenceWave(ref_params, optimizer_cls, maximize=maximize, **wave, **kwargs)
    lockstep(opt, ref, params, ref_params, steps=30, seed=7, **tol)


def test_history_holds_negated_gradient_under_maximize():
    """SPEC 4: the recorded value is the raw gradient, negated when maximize=True."""
    params = make_params()
    opt = wrapped(torch.optim.SGD, params, dict(buffer_size=4), lr=0.1, maximize=True)
    generator = torch.Generator().manual_seed(3)
    for t in range(6):
        set_grads(params, t, generator)
        opt.step()
        p = params[0]
        count = opt.state[p]["wave_count"]
        assert count == t + 1
        assert torch.equal(opt.state[p][f"wave_history_{(count - 1) % 4}"], -p.grad)


def test_warm_up_is_torch_adamw():
    """Fewer than N gradients recorded: the wrapped optimizer sees the raw gradient."""
    ref_params, params = make_params(), make_params()
    kwargs = dict(lr=0.05, weight_decay=0.1, maximize=True)
    # Parameter 0 gets a gradient every step: its first 7 steps are warm-up for N = 8.
    expected = train(ref_params, torch.optim.AdamW(ref_params, **kwargs), steps=7)
    got = train(params, wrapped(torch.optim.AdamW, params, dict(buffer_size=8), **kwargs), steps=7)
    assert torch.equal(got[0], expected[0])


@pytest.mark.parametrize("optimizer_cls,kwargs", [
    (torch.optim.Adam, dict(lr=0.05, amsgrad=True, weight_decay=0.1)),
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True)),
])
def test_identity_settings_follow_torch(optimizer_cls, kwargs):
    """SPEC 5: kappa = 0 and delta = 0 return the newest gradient: torch's own optimizer, step for step."""
    ref_params, params = make_params(), make_params()
    ref = optimizer_cls(ref_params, **kwargs)
    opt = wrapped(optimizer_cls, params, dict(buffer_size=4, decay=0.0, threshold_scale=0.0), **kwargs)
    lockstep(opt, ref, params, ref_params, steps=20, seed=5, rtol=1e-6, atol=1e-7)


def test_complex_parameters_match_waveadam():
    ref_params, params = make_params(complex_too=True), make_params(complex_too=True)
    kwargs = dict(lr=0.05, weight_decay=0.1, foreach=False)
    expected = train(ref_params, WaveAdam(ref_params, decoupled_weight_decay=True, **kwargs))
    assert_same(train(params, wrapped(torch.optim.AdamW, params, **kwargs)), expected)


def _model_and_batches(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    generator = torch.Generator().manual_seed(7)
    return model, [(torch.randn(6, 5, generator=generator), torch.randn(6, 2, generator=generator)) for _ in range(10)]


@pytest.mark.parametrize("how", ["positional", "keyword"])
def test_closure_gradients_are_the_ones_filtered(how):
    """step(closure): the closure runs first and the filter consumes the gradients it computed,
    as WaveAdam does with loss.backward() called by hand before step()."""
    model, batches = _model_and_batches()
    opt = wrapped(torch.optim.AdamW, model.parameters(), dict(buffer_size=4), lr=0.05, weight_decay=0.1, foreach=True)
    ref_model, _ = _model_and_batches()
    ref = WaveAdam(ref_model.parameters(), lr=0.05, weight_decay=0.1, decoupled_weight_decay=True, buffer_size=4, foreach=True)
    for x, y in batches:
        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure) if how == "positional" else opt.step(closure=closure)
        ref.zero_grad()
        ref_loss = torch.nn.functional.mse_loss(ref_model(x), y)
        ref_loss.backward()
        ref.step()
        assert torch.equal(loss, ref_loss.detach())
        for p, q in zip(model.parameters(), ref_model.parameters()):
            assert torch.equal(p.grad, q.grad)  # the closure's gradient is left in p.grad
    assert_same([p.detach() for p in model.parameters()], [q.detach() for q in ref_model.parameters()])
    assert all(int(opt.state[p]["wave_count"]) == len(batches) for p in model.parameters())


class _CallsClosureTwice(torch.optim.SGD):
    @torch.no_grad()
    def step(self, closure=None):
        with torch.enable_grad():
            closure()
            closure()
        return super().step()


def test_optimizer_that_reruns_the_closure_is_refused():
    model, [(x, y), *_] = _model_and_batches()
    with pytest.raises(ValueError, match="LBFGS"):
        wave_guard(torch.optim.LBFGS(model.parameters()))
    opt = wrapped(_CallsClosureTwice, model.parameters(), lr=0.1)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="closure a second time"):
        opt.step(closure)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_copies_of_a_wrapped_optimizer_keep_filtering(how, tmp_path):
    """torch drops hooks when pickling: the copy must still filter, exactly as the original."""
    params = make_params()
    opt = wrapped(torch.optim.AdamW, params, dict(buffer_size=4, buffer_dtype=torch.float64), lr=0.05)
    train(params, opt, steps=6)
    if how == "deepcopy":
        clone = copy.deepcopy(opt)
    else:
        torch.save(opt, tmp_path / "opt.pt")
        clone = torch.load(tmp_path / "opt.pt", weights_only=False)
    clone_params = clone.param_groups[0]["params"]
    assert clone_params[0] is not params[0] and clone.wave_stats() == opt.wave_stats()
    assert_same(train(clone_params, clone, steps=8, start=6), train(params, opt, steps=8, start=6))
    clone._wave_guard_handle.remove()  # the copy has a handle of its own
    assert opt._wave_guard_handle.active


def test_sparse_gradient_is_refused():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = wrapped(torch.optim.SGD, emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert len(opt.state) == 0


def test_options_live_in_groups_and_defaults():
    params = make_params()
    opt = torch.optim.AdamW(params[:1], lr=0.1)
    handle = wave_guard(opt, buffer_size=4, decay=0.5, threshold_scale=2.0, snr_gate=False, buffer_dtype=torch.float64)
    wave = dict(buffer_size=4, decay=0.5, threshold_scale=2.0, snr_gate=False, buffer_dtype="float64")  # a dtype is kept by name
    assert all(opt.defaults[k] == v for k, v in wave.items())
    opt.add_param_group({"params": params[1:]})
    for group in opt.state_dict()["param_groups"]:
        assert all(group[k] == v for k, v in wave.items())
    assert handle.optimizer is opt


@pytest.mark.parametrize("name,value", [
    ("buffer_size", 6), ("buffer_size", 128), ("decay", -0.1), ("decay", 1.5),
    ("threshold_scale", -1.0), ("snr_gate", 1), ("buffer_dtype", torch.int32),
])
def test_invalid_options_raise(name, value):
    opt = torch.optim.AdamW(make_params(), lr=0.1)
    with pytest.raises(ValueError, match=name):
        wave_guard(opt, **{name: value})
    assert name not in opt.defaults


def test_invalid_group_option_set_later_raises_at_step():
    params = make_params()
    opt = wrapped(torch.optim.AdamW, params, lr=0.1)
    opt.param_groups[0]["buffer_size"] = 3
    set_grads(params, 0, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="buffer_size"):
        opt.step()


def test_refuses_double_filtering():
    params = make_params()
    with pytest.raises(ValueError, match="already"):
        wave_guard(WaveAdam(params))
    opt = torch.optim.AdamW(params)
    handle = wave_guard(opt)
    with pytest.raises(ValueError, match="already"):
        wave_guard(opt)
    handle.remove()
    wave_guard(opt)  # allowed again once removed
    with pytest.raises(ValueError, match="differentiable"):
        wave_guard(torch.optim.Adam(make_params(), differentiable=True))


class _Forwarding(torch.optim.Optimizer):
    """A wrapper shaped like Opacus' DPOptimizer and accelerate's AcceleratedOptimizer: a
    torch.optim.Optimizer subclass that never runs Optimizer.__init__ (so torch's hook dicts are
    missing) and forwards param_groups, state and defaults to the optimizer it holds as ``attr``
    (None: it holds none, and owns its own groups)."""

    def __init__(self, inner, attr):
        if attr is not None:
            setattr(self, attr, inner)
        self._inner = inner

    param_groups = property(lambda self: self._inner.param_groups)
    state = property(lambda self: self._inner.state)
    defaults = property(lambda self: self._inner.defaults)

    def step(self, closure=None):
        return self._inner.step(closure)


@pytest.mark.parametrize("attr", ["original_optimizer", "optimizer"])
def test_a_wrapper_is_looked_through_to_the_optimizer_it_holds(attr):
    """wave_guard(DPOptimizer(AdamW)) filters inside: it follows WaveAdam, the wrapper's step untouched."""
    params, ref_params = make_params(), make_params()
    kwargs = dict(lr=0.05, weight_decay=0.1, foreach=True)
    inner = torch.optim.AdamW(params, **kwargs)
    outer = _Forwarding(inner, attr)
    handle = wave_guard(outer, buffer_size=4)
    assert handle.optimizer is inner and inner.wave_stats
    ref = WaveAdam(ref_params, decoupled_weight_decay=True, buffer_size=4, **kwargs)
    assert_same(train(params, outer, steps=10), train(ref_params, ref, steps=10))


def _groups(opt):
    return copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]), dict(opt.defaults)


@pytest.mark.parametrize("case", ["no hooks", "already filters", "differentiable", "lr scheduler"])
def test_a_refused_wrapper_is_left_untouched(case):
    """A refusal changes nothing: no wave options in the groups or defaults, no hooks, no attributes."""
    params = make_params()
    if case == "no hooks":  # holds nothing: torch's hooks cannot attach to it
        inner = torch.optim.AdamW(params)
        opt, error, match = _Forwarding(inner, None), TypeError, "cannot attach its hooks to _Forwarding.*pass the"
    elif case == "already filters":
        inner = WaveAdam(params)
        opt, error, match = _Forwarding(inner, "original_optimizer"), ValueError, "already filters"
    elif case == "differentiable":
        inner = torch.optim.Adam(params, differentiable=True)
        opt, error, match = _Forwarding(inner, "original_optimizer"), ValueError, "differentiable"
    else:  # a scheduler holds its optimizer as .optimizer too, but stepping it steps no optimizer
        inner = torch.optim.AdamW(params)
        opt, error, match = torch.optim.lr_scheduler.StepLR(inner, 1), TypeError, "expects a torch.optim.Optimizer, got StepLR"
    before = _groups(inner)
    with pytest.raises(error, match=match):
        wave_guard(opt, buffer_size=4)
    assert _groups(inner) == before
    assert not {"wave_stats", "_wave_guard_handle", "load_state_dict"} & set(vars(inner))
    assert not inner._optimizer_step_pre_hooks and not inner._optimizer_load_state_dict_pre_hooks


def test_remove_detaches_and_keeps_state():
    """After remove(): plain AdamW steps (same numbers as torch's AdamW from the same state),
    the history stays in the state, and wrapping again continues from it like WaveAdam."""
    kwargs = dict(lr=0.05, weight_decay=0.1, foreach=False)
    params = make_params()
    opt = torch.optim.AdamW(params, **kwargs)
    handle = wave_guard(opt, buffer_size=4)
    assert hasattr(opt, "wave_stats")
    train(params, opt, steps=6)
    handle.remove()
    assert not hasattr(opt, "wave_stats")
    assert opt.state[params[0]]["wave_count"] == 6

    plain_params = [p.detach().clone().requires_grad_() for p in params]
    plain = torch.optim.AdamW(plain_params, **kwargs)
    plain.load_state_dict(copy.deepcopy(opt.state_dict()))  # state_dict() shares tensors with opt
    assert_same(train(params, opt, steps=3, start=6), train(plain_params, plain, steps=3, start=6))
    assert opt.state[params[0]]["wave_count"] == 6  # nothing recorded while detached

    # Wrap again: the same as a WaveAdam that skipped recording those three steps.
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    ref = WaveAdam(ref_params, decoupled_weight_decay=True, buffer_size=4, **kwargs)
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))
    wave_guard(opt, buffer_size=4)
    assert_same(train(params, opt, steps=8, start=9), train(ref_params, ref, steps=8, start=9))


# -- checkpoints -----------------------------------------------------------------------------


def test_checkpoint_round_trip_resumes_bit_for_bit():
    kwargs = dict(lr=0.05, weight_decay=0.1, foreach=True)
    wave = dict(buffer_size=4)
    params = make_params()
    opt = wrapped(torch.optim.AdamW, params, wave, **kwargs)
    train(params, opt, steps=10)
    saved = copy.deepcopy(opt.state_dict())
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    expected = train(params, opt, steps=10, start=10)

    resumed = wrapped(torch.optim.AdamW, resumed_params, wave, **kwargs)
    resumed.load_state_dict(saved)
    assert_same(train(resumed_params, resumed, steps=10, start=10), expected)


def test_bf16_parameter_keeps_float32_history_and_big_count_through_load():
    """torch's load casts state tensors to the parameter's dtype; the load hooks put the history
    back as saved. 260 > 256 gradients: a bf16 counter could not even represent the count."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3, 4).bfloat16())
    opt = wrapped(torch.optim.AdamW, [p], dict(buffer_size=4, buffer_dtype=torch.float32), lr=1e-3)
    for t in range(260):
        p.grad = torch.randn(3, 4).bfloat16() + 0.01 * t
        opt.step()
    saved = copy.deepcopy(opt.state_dict())

    q = torch.nn.Parameter(p.detach().clone())
    fresh = wrapped(torch.optim.AdamW, [q], dict(buffer_size=4, buffer_dtype=torch.float32), lr=1e-3)
    fresh.load_state_dict(saved)
    state = fresh.state[q]
    count = state["wave_count"]  # a 0-dim int64 CPU tensor, not cast to bf16 (which cannot hold 260)
    assert (count.dtype, count.shape, count.device.type, count.item()) == (torch.int64, (), "cpu", 260)
    for i in range(4):
        assert state[f"wave_history_{i}"].dtype == torch.float32
        assert torch.equal(state[f"wave_history_{i}"], saved["state"][0][f"wave_history_{i}"])
    # Adam's own state was loaded by torch as usual.
    assert torch.equal(state["exp_avg"], saved["state"][0]["exp_avg"])
    # What torch alone does with the same checkpoint (the reason for the hooks):
    plain = torch.optim.AdamW([torch.nn.Parameter(q.detach().clone())], lr=1e-3)
    plain.load_state_dict(saved)
    assert next(iter(plain.state.values()))["wave_history_0"].dtype == torch.bfloat16


@pytest.mark.parametrize("damage", ["missing_slot", "wrong_shape", "extra_slot", "bad_count", "bad_option"])
def test_malformed_history_refused_before_any_change(damage):
    params = make_params()
    opt = wrapped(torch.optim.AdamW, params, dict(buffer_size=4), lr=0.05)
    train(params, opt, steps=5)
    checkpoint = copy.deepcopy(opt.state_dict())
    if damage == "missing_slot":
        del checkpoint["state"][0]["wave_history_3"]
    elif damage == "wrong_shape":
        checkpoint["state"][0]["wave_history_1"] = torch.zeros(2, 2)
    elif damage == "extra_slot":
        checkpoint["state"][0]["wave_history_4"] = torch.zeros(6, 5)
    elif damage == "bad_count":
        checkpoint["state"][0]["wave_count"] = -1
    else:
        checkpoint["param_groups"][0]["buffer_size"] = 3

    target_params = make_params()
    target = wrapped(torch.optim.AdamW, target_params, dict(buffer_size=4), lr=0.05)
    train(target_params, target, steps=2)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match="Refusing checkpoint"):
        target.load_state_dict(checkpoint)
    after = target.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for pid, state in before["state"].items():
        for key, value in state.items():
            other = after["state"][pid][key]
            assert other == value if key == "wave_count" else torch.equal(other, value)


def test_checkpoints_move_between_wrapper_waveadam_and_adamw():
    kwargs = dict(lr=0.05, weight_decay=0.1, foreach=False)
    params = make_params()
    opt = wrapped(torch.optim.AdamW, params, **kwargs)
    train(params, opt, steps=12)
    saved = copy.deepcopy(opt.state_dict())
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    expected = train(params, opt, steps=6, start=12)

    # wrapped AdamW -> WaveAdam(decoupled): continues identically.
    ref = WaveAdam(ref_params, decoupled_weight_decay=True, **kwargs)
    ref.load_state_dict(saved)
    assert_same(train(ref_params, ref, steps=6, start=12), expected)

    # plain AdamW checkpoint -> wrapped: moments carry over, the history starts empty.
    plain_params = make_params()
    plain = torch.optim.AdamW(plain_params, **kwargs)
    train(plain_params, plain, steps=3)
    target = wrapped(torch.optim.AdamW, make_params(), **kwargs)
    target.load_state_dict(plain.state_dict())
    assert all("wave_count" not in s for s in target.state.values())
    assert all(g["buffer_size"] == 8 for g in target.param_groups)


# -- GradScaler ------------------------------------------------------------------------------


def run_with_scaler(make_opt, inf_steps=(9, 14), steps=25):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = make_opt([p])
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    generator = torch.Generator().manual_seed(1)
    counts = []
    for t in range(steps):
        opt.zero_grad()
        loss = (p * torch.randn(4, 3, generator=generator)).sum()
        if t in inf_steps:
            loss = loss * math.inf
        scaler.scale(loss).backward()
        grad = p.grad.clone()
        scaler.step(opt)
        scaler.update()
        if getattr(opt, "_step_supports_amp_scaling", False):  # the unfused path unscales .grad in place
            assert torch.equal(p.grad, grad)
        counts.append(opt.state[p].get("wave_count", 0))
    return p.detach().clone(), counts


@pytest.mark.parametrize("fused", [False, True])
def test_grad_scaler_skipped_steps_record_nothing(fused):
    """Against WaveAdam (unfused) under the same GradScaler. Wrapped unfused Adam: the scaler
    unscales .grad and skips step() on inf. Wrapped fused Adam: the scaler hands grad_scale and
    found_inf to step(); the hooks unscale once and record nothing on inf. Either way the steps
    with inf record nothing."""
    got, counts = run_with_scaler(lambda ps: wrapped(torch.optim.Adam, ps, lr=0.01, fused=fused))
    expected, ref_counts = run_with_scaler(lambda ps: WaveAdam(ps, lr=0.01, foreach=False))
    if fused:  # torch's fused Adam rounds differently from its single-tensor path
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(got, expected)
    assert counts == ref_counts
    assert counts[9] == counts[8] and counts[14] == counts[13] and counts[-1] == 23
