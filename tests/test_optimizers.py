"""WaveAdam and WaveSGD on every path against the reference, and against torch when the filter is off."""

import copy
import itertools

import numpy as np
import pytest
import torch
from conftest import gradient, make_params, train

from waveguard_optim import WaveAdam, WaveSGD
from waveguard_optim.reference import ReferenceWave

PATHS = {"single": dict(foreach=False), "foreach": dict(foreach=True), "default": dict()}
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
}
WAVE_SETTINGS = [
    dict(buffer_size=2, decay=0.85, threshold_scale=1.0, snr_gate=True),
    dict(buffer_size=4, decay=0.5, threshold_scale=2.0, snr_gate=False),
    dict(buffer_size=8, decay=0.85, threshold_scale=1.0, snr_gate=True),
    dict(buffer_size=16, decay=1.0, threshold_scale=1.0, snr_gate=True),
    dict(buffer_size=8, decay=0.9, threshold_scale=0.0, snr_gate=True),
    dict(buffer_size=8, decay=0.0, threshold_scale=1.0, snr_gate=True),
    dict(buffer_size=4, decay=0.0, threshold_scale=2.0, snr_gate=False),
    dict(buffer_size=16, decay=0.0, threshold_scale=1.5, snr_gate=True),
]
IDENTITY = dict(threshold_scale=0.0, decay=0.0)


def wave_id(w):
    return "N{buffer_size}-d{decay}-k{threshold_scale}-g{snr_gate}".format(**w)


def assert_same(got, expected, dtype):
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **TOL[dtype])


def run_pair(make, make_ref, steps, dtype=torch.float32, **train_kwargs):
    params, ref_params = make_params(dtype), make_params(dtype)
    return train(params, make(params), steps, **train_kwargs), train(ref_params, make_ref(ref_params), steps, **train_kwargs)


# The CPU paths, by name: PATHS ("default" is the C kernel where a compiler is found) and the
# torch back end of the fused CPU step.
CPU_PATHS = [*PATHS, "cpu-torch"]


def path_options(name, monkeypatch):
    if name == "cpu-torch":
        monkeypatch.setenv("WAVEGUARD_CPU_BACKEND", "torch")
        return dict(fused=True)
    return PATHS[name]


@pytest.mark.parametrize("path_name", CPU_PATHS)
@pytest.mark.parametrize("wave", WAVE_SETTINGS, ids=wave_id)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["mixed", "noise", "trend"])
def test_wave_adam_matches_reference(path_name, wave, dtype, kind, monkeypatch):
    path = path_options(path_name, monkeypatch)
    got, expected = run_pair(
        lambda ps: WaveAdam(ps, lr=0.01, weight_decay=0.01, **wave, **path),
        lambda ps: ReferenceWave(ps, torch.optim.Adam, lr=0.01, weight_decay=0.01, **wave),
        3 * wave["buffer_size"] + 3,
        dtype,
        kind=kind,
    )
    assert_same(got, expected, dtype)


@pytest.mark.parametrize("path_name", CPU_PATHS)
@pytest.mark.parametrize("wave", WAVE_SETTINGS, ids=wave_id)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_wave_sgd_matches_reference(path_name, wave, dtype, monkeypatch):
    path = path_options(path_name, monkeypatch)
    got, expected = run_pair(
        lambda ps: WaveSGD(ps, lr=0.05, momentum=0.9, nesterov=True, **wave, **path),
        lambda ps: ReferenceWave(ps, torch.optim.SGD, lr=0.05, momentum=0.9, nesterov=True, **wave),
        3 * wave["buffer_size"] + 3,
        dtype,
    )
    assert_same(got, expected, dtype)


@pytest.mark.parametrize("path_name", CPU_PATHS)
@pytest.mark.parametrize("buffer_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("decay", [0.0, 0.85])
def test_a_huge_finite_gradient_keeps_the_parameters_finite(path_name, buffer_dtype, decay, monkeypatch):
    """SPEC section 3, step 5 (issue 11, item 5): gradients of +-1e30 (their squares overflow
    float32, also when stored in bfloat16) made gamma = inf/inf = NaN and the parameters NaN
    once the history was full. They stay finite, and follow the reference."""
    path = path_options(path_name, monkeypatch)

    def run(params, opt):  # element 0 of parameter 0 and element 5 of parameter 1 get +-1e30 at steps 5 and 6
        for step in range(14):
            for i, p in enumerate(params):
                p.grad = gradient(p, step, "mixed", i)
                if step in (5, 6) and i < 2:
                    p.grad.view(-1)[5 * i] = 1e30 if step == 5 else -1e30
            opt.step()
        return [p.detach().clone() for p in params]

    wave = dict(buffer_size=4, decay=decay, buffer_dtype=buffer_dtype)
    params, ref_params = make_params(), make_params()
    got = run(params, WaveAdam(params, lr=0.01, **wave, **path))
    expected = run(ref_params, ReferenceWave(ref_params, torch.optim.Adam, lr=0.01, **wave))
    assert all(torch.isfinite(p).all() for p in got)
    assert_same(got, expected, torch.float32)


@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
@pytest.mark.parametrize("amsgrad,maximize,weight_decay,decoupled", list(itertools.product([False, True], repeat=4)))
def test_wave_adam_options_match_reference(path, amsgrad, maximize, weight_decay, decoupled):
    opts = dict(lr=0.02, amsgrad=amsgrad, weight_decay=0.1 * weight_decay, decoupled_weight_decay=decoupled)
    got, expected = run_pair(
        lambda ps: WaveAdam(ps, maximize=maximize, buffer_size=4, **opts, **path),
        lambda ps: ReferenceWave(ps, torch.optim.Adam, maximize=maximize, buffer_size=4, **opts),
        15,
    )
    assert_same(got, expected, torch.float32)


@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
@pytest.mark.parametrize(
    "param_dtype,buffer_dtype", [(torch.float32, torch.bfloat16), (torch.float32, torch.float64), (torch.float64, torch.bfloat16)]
)
def test_buffer_dtype_matches_reference(path, param_dtype, buffer_dtype):
    """The history's storage dtype rounds what is stored; the arithmetic follows the parameter."""
    got, expected = run_pair(
        lambda ps: WaveAdam(ps, lr=0.01, buffer_dtype=buffer_dtype, **path),
        lambda ps: ReferenceWave(ps, torch.optim.Adam, lr=0.01, buffer_dtype=buffer_dtype),
        20,
        param_dtype,
    )
    assert_same(got, expected, param_dtype)


@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
def test_low_precision_params_match_reference(path):
    got, expected = run_pair(
        lambda ps: WaveAdam(ps, lr=0.01, **path), lambda ps: ReferenceWave(ps, torch.optim.Adam, lr=0.01), 20, torch.bfloat16
    )
    assert_same(got, expected, torch.bfloat16)


@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
def test_complex_params_are_filtered_as_real_views(path):
    def complex_params():
        return [torch.nn.Parameter(torch.view_as_complex(p.detach().reshape(-1, 1).repeat(1, 2).contiguous())) for p in make_params()]

    params, ref_params = complex_params(), complex_params()
    got = train(params, WaveAdam(params, lr=0.01, buffer_size=4, **path), 12)
    expected = train(ref_params, ReferenceWave(ref_params, torch.optim.Adam, lr=0.01, buffer_size=4), 12)
    assert_same([torch.view_as_real(g) for g in got], [torch.view_as_real(e) for e in expected], torch.float32)
    opt = WaveAdam(params, buffer_size=4, buffer_dtype=torch.bfloat16, **path)
    train(params, opt, 1)
    assert opt.state[params[0]]["wave_history_0"].dtype == torch.complex64  # buffer_dtype is for real params


# --- identity with torch: no threshold, all weight on the newest gradient --------------------------------------


ADAM_OPTIONS = [
    dict(amsgrad=a, maximize=m, weight_decay=w, decoupled_weight_decay=d)
    for a, m, w, d in itertools.product([False, True], [False, True], [0.0, 0.1], [False, True])
]
SGD_OPTIONS = [
    dict(momentum=mo, dampening=da, nesterov=ne, weight_decay=w, maximize=m)
    for mo, da, ne, w, m in itertools.product([0.0, 0.9], [0.0, 0.3], [False, True], [0.0, 0.1], [False, True])
    if not ne or (mo > 0 and da == 0)
]
TORCH_PATHS = {**PATHS, "fused": dict(fused=True)}


@pytest.mark.parametrize("path", TORCH_PATHS.values(), ids=TORCH_PATHS.keys())
@pytest.mark.parametrize("options", ADAM_OPTIONS, ids=str)
def test_wave_adam_without_filter_is_torch_adam(path, options):
    if path.get("fused"):  # torch 2.13's CPU fused Adam ignores strides: keep its parameters contiguous
        make = lambda: [torch.nn.Parameter(p.detach().contiguous()) for p in make_params()]  # noqa: E731
    else:
        make = make_params
    params, torch_params = make(), make()
    got = train(params, WaveAdam(params, lr=0.01, buffer_size=4, **IDENTITY, **options, **path), 12)
    expected = train(torch_params, torch.optim.Adam(torch_params, lr=0.01, **options, **path), 12)
    assert_same(got, expected, torch.float32)


@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
@pytest.mark.parametrize("options", SGD_OPTIONS, ids=str)
def test_wave_sgd_without_filter_is_torch_sgd(path, options):
    params, torch_params = make_params(), make_params()
    got = train(params, WaveSGD(params, lr=0.05, buffer_size=4, **IDENTITY, **options, **path), 12)
    expected = train(torch_params, torch.optim.SGD(torch_params, lr=0.05, **options, **path), 12)
    assert_same(got, expected, torch.float32)


def test_tensor_lr_like_torch():
    params, torch_params = make_params(), make_params()
    got = train(params, WaveAdam(params, lr=torch.tensor(0.01), **IDENTITY), 10)
    expected = train(torch_params, torch.optim.Adam(torch_params, lr=torch.tensor(0.01)), 10)
    assert_same(got, expected, torch.float32)


# --- history semantics ---------------------------------------------------------------------------------------


def test_history_is_a_ring_of_raw_gradients():
    (p,) = make_params()[:1]
    opt = WaveAdam([p], buffer_size=4, maximize=True, weight_decay=0.5)
    seen = []
    for step in range(6):
        p.grad = gradient(p, step)
        seen.append(p.grad.clone())
        opt.step()
    state = opt.state[p]
    assert state["wave_count"] == 6
    for k in range(2, 6):  # the k-th gradient sits in slot k mod 4, negated (maximize), before weight decay
        torch.testing.assert_close(state[f"wave_history_{k % 4}"], -seen[k], rtol=0, atol=0)


def test_grad_is_never_modified_and_none_grads_are_skipped():
    params = make_params()
    opt = WaveAdam(params, lr=0.01, buffer_size=4, maximize=True, weight_decay=0.1)
    for step in range(6):
        for i, p in enumerate(params):
            p.grad = None if i == 1 else gradient(p, step)
        before = [None if p.grad is None else p.grad.clone() for p in params]
        opt.step()
        for p, g in zip(params, before):
            if g is not None:
                torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
    assert "wave_count" not in opt.state[params[1]]
    assert opt.state[params[0]]["wave_count"] == 6


def test_parameter_skipped_sometimes_matches_reference():
    skip = lambda step, i: i == 2 and step % 3 == 0  # noqa: E731
    got, expected = run_pair(
        lambda ps: WaveAdam(ps, lr=0.01, buffer_size=4, foreach=True),
        lambda ps: ReferenceWave(ps, torch.optim.Adam, lr=0.01, buffer_size=4),
        20,
        skip=skip,
    )
    assert_same(got, expected, torch.float32)


def test_warm_up_uses_the_full_precision_gradient():
    (p,) = make_params()[:1]
    (q,) = make_params()[:1]
    wave = WaveAdam([p], lr=0.01, buffer_size=8, buffer_dtype=torch.bfloat16)
    adam = torch.optim.Adam([q], lr=0.01)
    for step in range(7):  # fewer than N gradients: plain Adam, unaffected by the bf16 history
        p.grad = q.grad = gradient(p, step, "noise")
        wave.step()
        adam.step()
    torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
@pytest.mark.parametrize("cls, torch_cls", [(WaveAdam, torch.optim.Adam), (WaveSGD, torch.optim.SGD)], ids=["adam", "sgd"])
def test_step_is_an_in_place_update_autograd_sees(path, cls, torch_cls):
    """As with torch's optimizers (whose in-place ops bump version counters), a graph that saved
    a parameter refuses to backward after a step changed it, and the state tensors' versions move."""
    hyper = dict(lr=0.1, momentum=0.9) if cls is WaveSGD else dict(lr=0.1)
    for make in (lambda ps: torch_cls(ps, **hyper), lambda ps: cls(ps, buffer_size=2, **path, **hyper)):
        p = torch.nn.Parameter(torch.randn(5))
        opt = make([p])
        for step in range(3):  # past warm-up: the filter runs
            p.grad = torch.randn(5)
            opt.step()
        saved = (p * p).sum()  # saves p for backward
        before = {k: v._version for k, v in opt.state[p].items() if isinstance(v, torch.Tensor) and k != "step"}
        p.grad = torch.randn(5)
        opt.step()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            saved.backward()
        moved = {k for k, v in opt.state[p].items() if k in before and v._version != before[k]}
        assert moved >= {k for k in before if not k.startswith("wave_history")}, (type(opt).__name__, moved)


def test_sparse_gradients_are_refused():
    for cls in (WaveAdam, WaveSGD):
        p = torch.nn.Parameter(torch.zeros(4))
        p.grad = torch.sparse_coo_tensor([[0]], [1.0], (4,))
        with pytest.raises(RuntimeError, match="sparse"):
            cls([p]).step()


# --- the torch ecosystem ---------------------------------------------------------------------------------------


def test_closure_scheduler_and_hooks():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = WaveAdam(model.parameters(), lr=0.1, buffer_size=2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    x, y = torch.randn(8, 3), torch.randn(8, 1)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        loss = opt.step(closure)
        sched.step()
    assert isinstance(loss, torch.Tensor)
    assert calls == ["pre", "post"] * 3
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


@pytest.mark.parametrize("fused", [False, True])
def test_grad_scaler_skipped_step_records_nothing(fused):
    params = [torch.nn.Parameter(p.detach().contiguous()) for p in make_params()]
    opt = WaveAdam(params, lr=0.01, buffer_size=2, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    for step in range(4):
        targets = [gradient(p, step) for p in params]
        if step == 2:
            targets[0][0, 0] = float("inf")
        opt.zero_grad()
        scaler.scale(sum((p * t).sum() for p, t in zip(params, targets))).backward()
        scaler.step(opt)
        scaler.update()
    # steps 0, 1, 3 were recorded; step 2 was skipped everywhere
    for p in params:
        assert opt.state[p]["wave_count"] == 3
        assert opt.state[p]["step"].item() == 3
    torch.testing.assert_close(opt.state[params[1]]["wave_history_0"], gradient(params[1], 3), rtol=0, atol=0)


def test_deepcopy_and_param_groups_with_their_own_options():
    a, b = make_params()[:2]
    opt = WaveAdam([{"params": [a], "buffer_size": 4}, {"params": [b], "decay": 1.0}], lr=0.01, buffer_size=2)
    assert [g["buffer_size"] for g in opt.param_groups] == [4, 2]
    assert [g["decay"] for g in opt.param_groups] == [0.0, 1.0]
    train([a, b], opt, 5)
    clone = copy.deepcopy(opt)
    assert clone.param_groups[0]["buffer_size"] == 4
    assert clone.state[clone.param_groups[0]["params"][0]]["wave_count"] == 5
    with pytest.raises(ValueError, match="buffer_size"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "buffer_size": 3})
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize("path_name", CPU_PATHS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cls,torch_cls,options", [(WaveAdam, torch.optim.Adam, dict(lr=0.01)), (WaveSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9))])
def test_flush_denormal_gives_no_nan_where_the_window_is_all_zero(path_name, dtype, cls, torch_cls, options, monkeypatch):
    """Issue 17, item 2: under torch.set_flush_denormal(True) a subnormal floor under the gate's
    E_c + E_f flushed to 0, and elements whose last N gradients are all 0 (every 4th one of the
    'mixed' gradients) became 0/0 = NaN. SPEC section 3: gamma = 0 there."""
    path = path_options(path_name, monkeypatch)
    ref_params = make_params(dtype)
    expected = train(ref_params, ReferenceWave(ref_params, torch_cls, buffer_size=4, **options), 10)
    plain_params = make_params(dtype)
    plain = train(plain_params, cls(plain_params, buffer_size=4, **options, **path), 10)
    params = make_params(dtype)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        got = train(params, cls(params, buffer_size=4, **options, **path), 10)
    finally:
        torch.set_flush_denormal(False)
    assert not any(p.isnan().any() for p in got)
    assert all(torch.equal(a, b) for a, b in zip(got, plain))  # no subnormal arises here: flushing changes nothing
    assert_same(got, expected, dtype)


def _interrupt_once(monkeypatch, owner, name, at_call):
    """Make ``owner.name`` raise KeyboardInterrupt on its ``at_call``-th call (from 0), once."""
    real, calls = getattr(owner, name), []

    def interrupted(*args, **kwargs):
        calls.append(None)
        if len(calls) == at_call + 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, interrupted)


@pytest.mark.parametrize("path_name", ["default", "cpu-torch"])
@pytest.mark.parametrize("where", ["compile", "first step", "warm step"])
@pytest.mark.parametrize("cls,options", [(WaveAdam, dict(lr=0.01)), (WaveSGD, dict(lr=0.05, momentum=0.9))])
def test_an_interrupted_fused_step_is_rolled_back(path_name, where, cls, options, tmp_path, monkeypatch):
    """Issue 17, item 3: Ctrl-C (KeyboardInterrupt, not an Exception) during the first step's
    compile or a warm step left the ring advanced with nothing recorded. Interrupted once, then
    repeated, the run equals an uninterrupted one exactly."""
    from waveguard_optim.kernels import cpu_c, cpu_step

    path = path_options(path_name, monkeypatch)
    if where == "compile":
        if path_name != "default" or cpu_c.find_compiler() is None:
            pytest.skip("the compile is the C back end's")
        monkeypatch.setenv("WAVEGUARD_CACHE_DIR", str(tmp_path))  # a cold cache: the first step compiles
        monkeypatch.setattr(cpu_c, "_LOADED", {})
    expected_params = make_params()
    expected = train(expected_params, cls(expected_params, buffer_size=4, **options, **path), 10)
    if where == "compile":
        _interrupt_once(monkeypatch, cpu_c, "_build", 0)
        monkeypatch.setattr(cpu_c, "_LOADED", {})
    else:
        _interrupt_once(monkeypatch, cpu_step, "_resolve_backend", 0 if where == "first step" else 6)
    params = make_params()
    opt = cls(params, buffer_size=4, **options, **path)
    step = 0
    while step < 10:
        for i, p in enumerate(params):
            p.grad = gradient(p, step, seed=i)
        try:
            opt.step()
        except KeyboardInterrupt:
            continue  # the same step again
        step += 1
    assert all(torch.equal(a, b) for a, b in zip(params, expected))
    assert all(opt.state[p]["wave_count"].item() == 10 for p in params)


TENSOR_HYPERS = {
    "betas": dict(lr=0.01, betas=(torch.tensor(0.9), torch.tensor(0.999))),
    "lr": dict(lr=torch.tensor(0.01)),
    "both+decoupled": dict(lr=torch.tensor(0.003), betas=(torch.tensor(0.8), torch.tensor(0.99)), weight_decay=0.1, decoupled_weight_decay=True),
    "lr+l2": dict(lr=torch.tensor(0.02), weight_decay=0.1),
    "small betas": dict(lr=0.01, betas=(torch.tensor(0.3), torch.tensor(0.45))),
}


def _ieee_sqrt(self: torch.Tensor) -> torch.Tensor:
    """A correctly rounded square root (numpy's: the CPU's sqrt instruction)."""
    return torch.from_numpy(np.sqrt(self.detach().numpy()))


@pytest.mark.parametrize("path_name", ["single", "default", "cpu-torch"])  # torch's foreach Adam refuses Tensor lr and betas
@pytest.mark.parametrize("hypers", TENSOR_HYPERS.values(), ids=TENSOR_HYPERS.keys())
def test_tensor_betas_and_lr_are_torch_adams_bit_for_bit(path_name, hypers, monkeypatch):
    """Issue 17, item 4: with Tensor betas or lr torch computes the bias corrections, step size and
    1 - beta in float32 tensor arithmetic; the C kernel did it in double (up to ~22 ulp apart).

    The reference is torch's single-tensor Adam; for the C kernel, with a correctly rounded
    ``sqrt``: a torch built with MKL takes ``Tensor.sqrt`` on CPU from MKL's ``vmsSqrt`` /
    ``vmdSqrt``, which on some CPUs (this project's AMD EPYC machine; README, "Code paths") is
    1 ulp off, while the C kernel's sqrt is IEEE, as torch's own fused CPU Adam's is (there
    ``Adam(fused=True)`` and ``Adam(foreach=False)`` differ too). Where torch's sqrt is IEEE
    the patched reference is torch's Adam unchanged."""
    path = path_options(path_name, monkeypatch)
    make = lambda: [torch.nn.Parameter(p.detach().contiguous()) for p in make_params()]  # noqa: E731
    params, torch_params = make(), make()
    opt = WaveAdam(params, buffer_size=4, **IDENTITY, **hypers, **path)
    reference = torch.optim.Adam(torch_params, **hypers, foreach=False)  # torch's CPU default
    for step in range(8):
        for i, (p, q) in enumerate(zip(params, torch_params)):
            p.grad = q.grad = gradient(p, step, seed=i)
        opt.step()
        with monkeypatch.context() as patch:
            if path_name == "default":
                patch.setattr(torch.Tensor, "sqrt", _ieee_sqrt)
            reference.step()
        assert all(torch.equal(a, b) for a, b in zip(params, torch_params)), step
