"""Invalid arguments raise ValueError naming the argument and the value, before any state exists."""

import copy
import re

import pytest
import torch

from waveguard_optim import WaveAdam, WaveSGD

INVALID_WAVE = [
    ("buffer_size", 1),
    ("buffer_size", 6),
    ("buffer_size", 128),
    ("buffer_size", 8.0),
    ("buffer_size", True),
    ("decay", -0.1),
    ("decay", 1.01),
    ("decay", float("nan")),
    ("decay", "0.9"),
    ("threshold_scale", -0.1),
    ("threshold_scale", float("inf")),
    ("snr_gate", 1),
    ("snr_gate", "yes"),
    ("buffer_dtype", torch.int8),
    ("buffer_dtype", torch.complex64),
    ("buffer_dtype", "bf16"),
    ("buffer_dtype", "int8"),
    ("buffer_dtype", torch.float8_e4m3fn),  # no path stores float8
]


@pytest.mark.parametrize("cls", [WaveAdam, WaveSGD])
@pytest.mark.parametrize("name,value", INVALID_WAVE, ids=lambda x: repr(x))
def test_invalid_wave_option(cls, name, value):
    with pytest.raises(ValueError, match=f"Invalid {name}: {value!r}".replace("(", r"\(").replace(")", r"\)")):
        cls([torch.nn.Parameter(torch.zeros(2))], **{name: value})


@pytest.mark.parametrize("name,value", INVALID_WAVE[:3], ids=lambda x: repr(x))
def test_invalid_wave_option_in_a_param_group(name, value):
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        WaveAdam([{"params": [torch.nn.Parameter(torch.zeros(2))], name: value}])


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(lr=-1.0), "learning rate"),
        (dict(eps=-1.0), "epsilon"),
        (dict(betas=(1.0, 0.999)), "beta parameter at index 0"),
        (dict(betas=(0.9, -0.1)), "beta parameter at index 1"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(differentiable=True), "differentiable"),
    ],
)
def test_invalid_adam_option_like_torch(kwargs, name):
    with pytest.raises(ValueError, match=name):
        WaveAdam([torch.nn.Parameter(torch.zeros(2))], **kwargs)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(lr=-1.0), "learning rate"),
        (dict(momentum=-0.5), "momentum"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(nesterov=True), "Nesterov"),
        (dict(nesterov=True, momentum=0.9, dampening=0.1), "Nesterov"),
    ],
)
def test_invalid_sgd_option_like_torch(kwargs, name):
    with pytest.raises(ValueError, match=name):
        WaveSGD([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_defaults_carry_every_option():
    opt = WaveAdam([torch.nn.Parameter(torch.zeros(2))])
    torch_opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))])
    assert set(opt.defaults) == set(torch_opt.defaults) | {"buffer_size", "decay", "threshold_scale", "snr_gate", "buffer_dtype"}
    assert set(opt.param_groups[0]) == set(opt.defaults) | {"params"}


@pytest.mark.parametrize("new_size", [2, 8])
@pytest.mark.parametrize("path", [dict(foreach=False), dict(foreach=True), dict(fused=True)])
def test_buffer_size_edited_after_history_exists_is_refused_untouched(new_size, path):
    p = torch.nn.Parameter(torch.randn(5))
    opt = WaveAdam([p], buffer_size=4, **path)
    for _ in range(3):
        p.grad = torch.randn(5)
        opt.step()
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()}
    opt.param_groups[0]["buffer_size"] = new_size
    with pytest.raises(ValueError, match="buffer_size"):
        opt.step()
    assert opt.state[p].keys() == before.keys()
    for key, value in before.items():
        assert opt.state[p][key] == value if key == "wave_count" else torch.equal(opt.state[p][key], value), key


def test_failed_fused_step_leaves_the_wave_state_untouched(monkeypatch):
    p = torch.nn.Parameter(torch.randn(5))
    opt = WaveSGD([p], lr=0.1, buffer_size=2, fused=True)
    p.grad = torch.randn(5)
    opt.step()
    history = opt.state[p]["wave_history_0"].clone()
    monkeypatch.setenv("WAVEGUARD_CPU_BACKEND", "no-such-backend")  # the CPU kernel refuses it
    with pytest.raises(ValueError, match="no-such-backend"):
        opt.step()
    assert opt.state[p]["wave_count"] == 1 and torch.equal(opt.state[p]["wave_history_0"], history)
    assert "wave_history_1" in opt.state[p] and not opt.state[p]["wave_history_1"].any()


@pytest.mark.parametrize("given", [torch.bfloat16, "bfloat16"])
def test_buffer_dtype_is_kept_by_name(given):
    """Param groups hold the name: DCP refuses a torch.dtype there (SPEC section 6); both forms work."""
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    opt = WaveAdam([p], buffer_dtype=given)
    opt.add_param_group({"params": [q], "buffer_dtype": torch.float64})
    assert opt.defaults["buffer_dtype"] == opt.param_groups[0]["buffer_dtype"] == "bfloat16"
    assert opt.param_groups[1]["buffer_dtype"] == "float64"
    p.grad, q.grad = torch.ones(2), torch.ones(3)
    opt.step()
    assert opt.state[p]["wave_history_0"].dtype == torch.bfloat16
    assert opt.state[q]["wave_history_0"].dtype == torch.float64


@pytest.mark.parametrize("wrapped", [False, True], ids=["WaveAdam", "wave_guard"])
@pytest.mark.parametrize("path", [dict(foreach=False), dict(foreach=True), dict()], ids=["single", "foreach", "default"])
@pytest.mark.parametrize("name,value", INVALID_WAVE, ids=lambda x: repr(x))
def test_an_invalid_option_written_into_a_group_is_refused_at_step_time_untouched(name, value, path, wrapped):
    """Issue 17, item 7: ``group['threshold_scale'] = nan`` (or ``buffer_size = 3``) after
    construction gave NaN parameters, then a checkpoint the loader refuses. The step refuses it
    with the constructor's message, before any group (here the second) changes."""
    from waveguard_optim import wave_guard

    params = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3))]
    if wrapped:
        opt = torch.optim.Adam([{"params": [params[0]]}, {"params": [params[1]]}], **path)
        wave_guard(opt, buffer_size=4)
    else:
        opt = WaveAdam([{"params": [params[0]]}, {"params": [params[1]]}], buffer_size=4, **path)
    for _ in range(5):
        for p in params:
            p.grad = torch.randn(p.shape)
        opt.step()
    before = copy.deepcopy(opt.state_dict())
    values = [p.detach().clone() for p in params]
    opt.param_groups[1][name] = value
    with pytest.raises(ValueError, match=re.escape(f"param group 1: Invalid {name}: {value!r}")):
        opt.step()
    opt.param_groups[1][name] = before["param_groups"][1][name]
    after = opt.state_dict()
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    assert after["param_groups"] == before["param_groups"]
    for pid, state in before["state"].items():
        assert all(torch.equal(torch.as_tensor(after["state"][pid][k]), torch.as_tensor(v)) for k, v in state.items())


@pytest.mark.parametrize("count", [2**63 - 1, 2**62, 2**64])
def test_a_wave_count_that_would_wrap_is_refused(count):
    """Issue 17, item 7: wave_count = 2**63 - 1 loaded, then wrapped negative at the next step."""
    p = torch.nn.Parameter(torch.randn(4))
    opt = WaveAdam([p], buffer_size=2)
    for _ in range(3):
        p.grad = torch.randn(4)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][0]["wave_count"] = count if count >= 2**63 else torch.tensor(count)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=re.escape("wave_count must be an int in [0, 2**62)")):
        opt.load_state_dict(saved)
    assert opt.state[p]["wave_count"] == before["state"][0]["wave_count"]


@pytest.mark.parametrize("wrapped", [False, True], ids=["WaveAdam", "wave_guard"])
def test_the_same_parameter_twice_in_a_group_is_a_clear_error(wrapped):
    """Issue 17, item 7: it failed with a misleading KeyError; torch only warns."""
    import warnings

    from waveguard_optim import wave_guard

    p = torch.nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match="same parameter .* at positions 0 and 1"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own duplicate warning
        if wrapped:
            opt = torch.optim.Adam([p, p])
            wave_guard(opt)
            p.grad = torch.randn(4)
            opt.step()
        else:
            WaveAdam([p, p])
