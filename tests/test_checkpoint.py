"""Checkpoints (SPEC section 6): exact round trips, torch interop both ways, malformed ones refused untouched."""

import copy
import io

import pytest
import torch
from conftest import make_params, train

from waveguard_optim import WaveAdam, WaveSGD


def save_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


OPTIMIZERS = {
    "adam-single": lambda ps: WaveAdam(ps, lr=0.01, amsgrad=True, buffer_size=4, foreach=False),
    "adam-foreach": lambda ps: WaveAdam(ps, lr=0.01, buffer_size=8, foreach=True, buffer_dtype=torch.bfloat16),
    "adam-fused": lambda ps: WaveAdam(ps, lr=0.01, buffer_size=4, fused=True),
    "sgd-foreach": lambda ps: WaveSGD(ps, lr=0.05, momentum=0.9, buffer_size=4, foreach=True),
    "sgd-single": lambda ps: WaveSGD(ps, lr=0.05, momentum=0.9, nesterov=True, buffer_size=2, foreach=False),
}


def contiguous_params(dtype=torch.float32):
    return [torch.nn.Parameter(p.detach().contiguous()) for p in make_params(dtype)]


@pytest.mark.parametrize("make", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_resume_is_bit_identical_to_never_stopping(make):
    params = contiguous_params()
    straight = train(params, make(params), 25)

    first = contiguous_params()
    opt = make(first)
    train(first, opt, 11)
    saved_params, saved_opt = save_load([p.detach() for p in first]), save_load(opt.state_dict())

    resumed = [torch.nn.Parameter(p.clone()) for p in saved_params]
    opt2 = make(resumed)
    opt2.load_state_dict(saved_opt)
    # train() restarts its gradient stream at step 0: feed steps 11..24 by hand instead
    from conftest import gradient

    for step in range(11, 25):
        for i, p in enumerate(resumed):
            p.grad = gradient(p, step, seed=i)
        opt2.step()
    for a, b in zip(resumed, straight):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=0)


@pytest.mark.parametrize("cls,kwargs", [(WaveAdam, dict(lr=0.01)), (WaveSGD, dict(lr=0.05, momentum=0.9))], ids=["adam", "sgd"])
def test_version_1_checkpoint_resumes_version_1(cls, kwargs):
    """SPEC section 6: a checkpoint of version 1, whose param groups carry decay 0.85 (then the
    default), loaded into an optimizer built with version 2's default (decay 0) keeps 0.85, as
    torch keeps every saved group option, and continues the uninterrupted 0.85 run bit for bit."""
    from conftest import gradient

    def feed(params, opt, steps):
        for step in steps:
            for i, p in enumerate(params):
                p.grad = gradient(p, step, seed=i)
            opt.step()

    params = contiguous_params()
    straight = cls(params, buffer_size=4, decay=0.85, **kwargs)
    feed(params, straight, range(20))

    first = contiguous_params()
    v1 = cls(first, buffer_size=4, decay=0.85, **kwargs)
    feed(first, v1, range(9))
    saved_params, saved_opt = save_load([p.detach() for p in first]), save_load(v1.state_dict())

    resumed = [torch.nn.Parameter(p.clone()) for p in saved_params]
    fresh = cls(resumed, buffer_size=4, **kwargs)
    assert fresh.param_groups[0]["decay"] == 0.0
    fresh.load_state_dict(saved_opt)
    assert fresh.param_groups[0]["decay"] == 0.85
    feed(resumed, fresh, range(9, 20))
    for a, b in zip(resumed, params):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0)

    # the test can tell: version 2's default continues elsewhere
    other = [torch.nn.Parameter(p.clone()) for p in saved_params]
    v2 = cls(other, buffer_size=4, **kwargs)
    v2.load_state_dict({**saved_opt, "param_groups": [{**g, "decay": 0.0} for g in saved_opt["param_groups"]]})
    feed(other, v2, range(9, 20))
    assert not torch.equal(other[0].detach(), params[0].detach())


def test_history_dtype_and_large_count_survive_loading_into_bf16_params():
    params = make_params(torch.bfloat16)
    opt = WaveAdam(params, lr=0.01, buffer_size=4, buffer_dtype=torch.float32)
    train(params, opt, 300)
    saved = save_load(opt.state_dict())
    fresh = WaveAdam(make_params(torch.bfloat16), lr=0.01, buffer_size=4, buffer_dtype=torch.float32)
    fresh.load_state_dict(saved)
    for p_old, p_new in zip(opt.param_groups[0]["params"], fresh.param_groups[0]["params"]):
        old, new = opt.state[p_old], fresh.state[p_new]
        count = new["wave_count"]  # a 0-dim int64 CPU tensor, not cast to bf16 (which cannot hold 300)
        assert (count.dtype, count.shape, count.device.type, count.item()) == (torch.int64, (), "cpu", 300)
        for i in range(4):
            assert new[f"wave_history_{i}"].dtype == torch.float32
            torch.testing.assert_close(new[f"wave_history_{i}"], old[f"wave_history_{i}"], rtol=0, atol=0)
        assert new["exp_avg"].dtype == torch.bfloat16  # torch's own keys follow torch's rules


@pytest.mark.parametrize(
    "torch_cls,wave_cls,kwargs",
    [(torch.optim.Adam, WaveAdam, dict(lr=0.01, amsgrad=True)), (torch.optim.SGD, WaveSGD, dict(lr=0.05, momentum=0.9))],
)
def test_torch_checkpoint_loads_into_wave_optimizer(torch_cls, wave_cls, kwargs):
    params = make_params()
    torch_opt = torch_cls(params, **kwargs)
    train(params, torch_opt, 5)
    saved = save_load(torch_opt.state_dict())

    wave = wave_cls(make_params(), buffer_size=4, decay=0.7, **kwargs)
    wave.load_state_dict(saved)
    group = wave.param_groups[0]
    assert (group["buffer_size"], group["decay"], group["threshold_scale"], group["snr_gate"]) == (4, 0.7, 1.0, True)
    for p_old, p_new in zip(params, group["params"]):
        for key, value in torch_opt.state[p_old].items():
            torch.testing.assert_close(wave.state[p_new][key], value, rtol=0, atol=0)
        assert "wave_count" not in wave.state[p_new]
    train(group["params"], wave, 6)  # trains on: warm-up first, then the filter
    assert all(wave.state[p]["wave_count"] == 6 for p in group["params"])


@pytest.mark.parametrize(
    "torch_cls,wave_cls,kwargs",
    [(torch.optim.Adam, WaveAdam, dict(lr=0.01)), (torch.optim.SGD, WaveSGD, dict(lr=0.05, momentum=0.9))],
)
def test_wave_checkpoint_loads_into_torch_optimizer(torch_cls, wave_cls, kwargs):
    params = make_params()
    wave = wave_cls(params, buffer_size=4, **kwargs)
    train(params, wave, 9)
    saved = save_load(wave.state_dict())

    back = [torch.nn.Parameter(p.detach().clone()) for p in params]
    torch_opt = torch_cls(back, **kwargs)
    torch_opt.load_state_dict(saved)
    key = "exp_avg" if torch_cls is torch.optim.Adam else "momentum_buffer"
    for p_wave, p_torch in zip(params, back):
        torch.testing.assert_close(torch_opt.state[p_torch][key], wave.state[p_wave][key], rtol=0, atol=0)
    # torch trains on from the loaded moments exactly as a torch optimizer holding them would
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = torch_cls(twin_params, **kwargs)
    plain = save_load(wave.state_dict())  # a separate copy: torch's load keeps references to the given tensors
    twin.load_state_dict({**plain, "state": {i: {k: v for k, v in s.items() if not k.startswith("wave_")} for i, s in plain["state"].items()}})
    train(back, torch_opt, 3)
    train(twin_params, twin, 3)
    for a, b in zip(back, twin_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _corrupt(sd, how):
    state = sd["state"][1]
    if how == "missing-slot":
        del state["wave_history_3"]
    elif how == "extra-slot":
        state["wave_history_4"] = state["wave_history_0"].clone()
    elif how == "wrong-shape":
        state["wave_history_2"] = torch.zeros(3)
    elif how == "missing-count":
        del state["wave_count"]
    elif how == "negative-count":
        state["wave_count"] = -1
    elif how == "buffer-size-mismatch":
        sd["param_groups"][0]["buffer_size"] = 8
    elif how == "invalid-option":
        sd["param_groups"][0]["decay"] = 1.5
    elif how == "meta-slot":  # passed validation, then failed after torch's part was loaded
        state["wave_history_1"] = state["wave_history_1"].to("meta")
    elif how == "float8-slot":  # buffer_dtype allows float16, bfloat16, float32, float64 only
        state["wave_history_1"] = state["wave_history_1"].to(torch.float8_e4m3fn)
    elif how == "int-slot":
        state["wave_history_1"] = state["wave_history_1"].to(torch.int32)
    return sd


MALFORMED = ["missing-slot", "extra-slot", "wrong-shape", "missing-count", "negative-count", "buffer-size-mismatch", "invalid-option"]


@pytest.mark.parametrize("how", [*MALFORMED, "meta-slot", "float8-slot", "int-slot"])
def test_malformed_checkpoint_is_refused_before_any_change(how):
    params = make_params()
    opt = WaveAdam(params, lr=0.01, buffer_size=4)
    train(params, opt, 6)
    bad = _corrupt(save_load(opt.state_dict()), how)

    target_params = make_params()
    target = WaveAdam(target_params, lr=0.02, buffer_size=4)
    train(target_params, target, 2)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match="parameter 1|group 0") as err:
        target.load_state_dict(bad)
    assert "decay" in str(err.value) if how == "invalid-option" else "WaveGuard history" in str(err.value)
    after = target.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for pid, st in before["state"].items():
        assert after["state"][pid].keys() == st.keys()
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(after["state"][pid][k]), torch.as_tensor(v))


def test_older_checkpoint_with_int_count_and_dtype_option_resumes_bit_for_bit():
    """Checkpoints written before wave_count was a tensor and buffer_dtype a name (SPEC section 6)."""
    make = lambda ps: WaveAdam(ps, lr=0.01, buffer_size=4, buffer_dtype=torch.float64)  # noqa: E731
    params = contiguous_params()
    opt = make(params)
    train(params, opt, 6)
    old = copy.deepcopy(opt.state_dict())
    old["param_groups"][0]["buffer_dtype"] = torch.float64
    for st in old["state"].values():
        st["wave_count"] = int(st["wave_count"])
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = make(resumed)
    opt2.load_state_dict(save_load(old))
    assert opt2.param_groups[0]["buffer_dtype"] == "float64"
    assert all(opt2.state[p]["wave_count"].dtype == torch.int64 for p in resumed)
    from conftest import gradient

    for step in range(6, 11):
        for i, (p, q) in enumerate(zip(params, resumed)):
            p.grad, q.grad = gradient(p, step, seed=i), gradient(q, step, seed=i)
        opt.step()
        opt2.step()
    for a, b in zip(resumed, params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_loaded_count_is_not_shared_with_the_checkpoint():
    """Steps advance wave_count in place: two optimizers loaded from one dict must not share it."""
    params = make_params()
    opt = WaveAdam(params, lr=0.01, buffer_size=4)
    train(params, opt, 3)
    sd = save_load(opt.state_dict())
    a, b = WaveAdam(make_params(), lr=0.01, buffer_size=4), WaveAdam(make_params(), lr=0.01, buffer_size=4)
    a.load_state_dict(sd)
    b.load_state_dict(sd)
    train(a.param_groups[0]["params"], a, 2)
    assert [int(b.state[p]["wave_count"]) for p in b.param_groups[0]["params"]] == [3] * 4
    assert [int(s["wave_count"]) for s in sd["state"].values()] == [3] * 4


def test_load_does_not_mutate_the_given_state_dict():
    params = make_params()
    opt = WaveAdam(params, lr=0.01, buffer_size=4)
    train(params, opt, 6)
    sd = save_load(opt.state_dict())
    keys = {pid: set(s) for pid, s in sd["state"].items()}
    WaveAdam(make_params(), lr=0.01, buffer_size=4).load_state_dict(sd)
    assert {pid: set(s) for pid, s in sd["state"].items()} == keys


def _assert_state_dict_equal(after, before):
    assert after["param_groups"] == before["param_groups"]
    assert after["state"].keys() == before["state"].keys()
    for pid, st in before["state"].items():
        assert after["state"][pid].keys() == st.keys()
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(after["state"][pid][k]), torch.as_tensor(v)), (pid, k)


@pytest.mark.parametrize("how", ["meta-slot", "float8-slot", "wrong-shape"])
def test_wave_guard_refuses_a_malformed_checkpoint_before_any_change(how):
    """The load hooks of wave_guard validate (and place) the history before torch's load runs."""
    from waveguard_optim import wave_guard

    params = make_params()
    opt = torch.optim.Adam(params, lr=0.01)
    wave_guard(opt, buffer_size=4)
    train(params, opt, 6)
    bad = _corrupt(save_load(opt.state_dict()), how)
    target_params = make_params()
    target = torch.optim.Adam(target_params, lr=0.02)
    wave_guard(target, buffer_size=4)
    train(target_params, target, 2)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match="parameter 1"):
        target.load_state_dict(bad)
    _assert_state_dict_equal(target.state_dict(), before)


def test_a_failure_while_placing_the_history_leaves_the_optimizer_as_it_was(monkeypatch):
    """The history is moved to the parameters' devices before torch's part is loaded, so that
    an error there (a device out of memory, simulated on the third slot) changes nothing."""
    from waveguard_optim import history

    params = make_params()
    opt = WaveAdam(params, lr=0.01, buffer_size=4)
    train(params, opt, 6)
    saved = save_load(opt.state_dict())
    target_params = make_params()
    target = WaveAdam(target_params, lr=0.02, buffer_size=4)
    train(target_params, target, 2)
    before = copy.deepcopy(target.state_dict())
    calls = []
    real = history.overlaps_itself

    def out_of_memory(t):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("simulated: out of memory while moving the history")
        return real(t)

    monkeypatch.setattr(history, "overlaps_itself", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        target.load_state_dict(saved)
    _assert_state_dict_equal(target.state_dict(), before)


@pytest.mark.parametrize("share", ["expanded", "one tensor for two slots"])
def test_a_history_slot_without_memory_of_its_own_is_loaded_as_a_copy(share):
    """A stride-0 (expanded) slot, or two slots that are one tensor, would make every fused step
    refuse (the kernels write slots in place): they are loaded as dense copies of their values,
    and training goes on exactly as from a checkpoint holding those values densely."""
    params = contiguous_params()
    opt = WaveAdam(params, lr=0.01, buffer_size=4, fused=True)
    train(params, opt, 6)
    saved = save_load(opt.state_dict())
    state = saved["state"][1]
    if share == "expanded":
        state["wave_history_2"] = torch.full((1,), 0.25).expand(state["wave_history_2"].shape)
    else:
        state["wave_history_2"] = state["wave_history_0"]
    dense = {**saved, "state": {**saved["state"], 1: {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}}}

    runs = []
    stored = save_load(saved)["state"][1]  # torch.save keeps the stride 0, and the sharing
    if share == "expanded":
        assert stored["wave_history_2"].stride() == (0,)
    else:
        assert stored["wave_history_2"].data_ptr() == stored["wave_history_0"].data_ptr()
    for checkpoint in (saved, dense):
        resumed = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt2 = WaveAdam(resumed, lr=0.01, buffer_size=4, fused=True)
        opt2.load_state_dict(save_load(checkpoint))  # torch's load keeps references: a copy per run
        slots = [opt2.state[resumed[1]][f"wave_history_{i}"] for i in range(4)]
        assert all(s.is_contiguous() for s in slots) and len({s.data_ptr() for s in slots}) == 4
        runs.append(train(resumed, opt2, 5, seed=3))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _trained_pair(wrapped):
    """(a checkpoint of a trained optimizer, a target optimizer with history of its own)."""
    from waveguard_optim import wave_guard

    def make(lr):
        params = make_params()
        if wrapped:
            opt = torch.optim.Adam(params, lr=lr)
            wave_guard(opt, buffer_size=4)
        else:
            opt = WaveAdam(params, lr=lr, buffer_size=4)
        return params, opt

    params, opt = make(0.01)
    train(params, opt, 6)
    target_params, target = make(0.02)
    train(target_params, target, 5)
    return save_load(opt.state_dict()), target


@pytest.mark.parametrize("wrapped", [False, True], ids=["WaveAdam", "wave_guard"])
@pytest.mark.parametrize("other", ["exp_avg", "exp_avg_sq", "a view of exp_avg", "the parameter"])
def test_a_history_slot_sharing_memory_with_other_state_is_refused_untouched(wrapped, other):
    """Issue 17, item 5: the load checked slots only against each other; a slot sharing exp_avg's
    memory made the default path refuse every step, and the eager path train on mixed values."""
    saved, target = _trained_pair(wrapped)
    state = saved["state"][1]
    if other == "exp_avg":
        state["wave_history_2"] = state["exp_avg"]
    elif other == "exp_avg_sq":
        state["wave_history_2"] = state["exp_avg_sq"]
    elif other == "a view of exp_avg":
        state["exp_avg"] = torch.cat([state["exp_avg"], state["exp_avg"]])[: state["exp_avg"].numel()]
        state["wave_history_1"] = state["exp_avg"][:]
    else:
        state["wave_history_0"] = target.param_groups[0]["params"][1]
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match="shares memory"):
        target.load_state_dict(saved)
    _assert_state_dict_equal(target.state_dict(), before)


BAD_TORCH_VALUES = {
    "step '1'": lambda state: state.__setitem__("step", "1"),
    "step None": lambda state: state.__setitem__("step", None),
    "step a list": lambda state: state.__setitem__("step", [1]),
}


@pytest.mark.parametrize("wrapped", [False, True], ids=["WaveAdam", "wave_guard"])
@pytest.mark.parametrize("bad", BAD_TORCH_VALUES.values(), ids=BAD_TORCH_VALUES.keys())
def test_a_bad_torch_value_is_refused_untouched_and_the_history_survives(bad, wrapped):
    """Issue 17, item 6: torch's own load raised after installing the new state (torch
    half-applies), and the history was lost."""
    saved, target = _trained_pair(wrapped)
    bad(saved["state"][1])
    before = copy.deepcopy(target.state_dict())
    with pytest.raises((ValueError, TypeError, RuntimeError)):
        target.load_state_dict(saved)
    _assert_state_dict_equal(target.state_dict(), before)
    assert "wave_history_0" in target.state[target.param_groups[0]["params"][1]]
