"""The cached step plan of the fused steps (``kernels/plan.py``, issue 18): a planned step
gives the eager optimizer's numbers, and a tensor replaced or changed behind the plan's back
leads to a rebuild (the full step validates it) or a refusal, never a write through a stale
pointer; on the C kernel, and on Triton under ``TRITON_INTERPRET=1`` (run this file both ways).
Written tensors are the sentinel-guarded views of ``tests/test_kernel_safety.py``: an
unchecked write past a tensor's end shows as a failed assertion."""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest
import torch

from test_kernel_safety import SENTINEL, _assert_refused_untouched, _planted
from waveguard_optim import WaveAdam, WaveSGD, base
from waveguard_optim.kernels import cpu_c, cpu_step, native_check
from waveguard_optim.kernels import plan as plan_module

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SHAPES = [(30, 10), (30,), (7,)]
N = 4


@pytest.fixture(
    autouse=True,
    params=[
        pytest.param("c", marks=pytest.mark.skipif(cpu_c.find_compiler() is None, reason="the CPU plan runs the C kernel: no C compiler")),
        pytest.param("triton", marks=pytest.mark.skipif(not INTERPRET, reason="Triton on CPU needs TRITON_INTERPRET=1")),
    ],
)
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test on each planned back end: the C kernel, and Triton where it runs (interpreted)."""
    if request.param == "triton":
        from waveguard_optim.kernels import triton_step

        monkeypatch.setattr(base, "fused_backend", lambda device: triton_step)
    else:
        monkeypatch.setenv("WAVEGUARD_CPU_BACKEND", "c")
        monkeypatch.setattr(base, "fused_backend", lambda device: cpu_step)
    return request.param


@pytest.fixture(params=["native", "python"])
def check(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """A planned step's check: the C++ one (``native_check``, where this machine can build it) or
    the Python fallback; each must see every change."""
    if request.param == "python":
        monkeypatch.setattr(plan_module, "native_check", lambda wait=False: None)
    else:
        _require_native_check()
    return request.param


def _require_native_check() -> None:
    """Skip where this machine cannot build the native check; fail where it can but did not."""
    if native_check.missing() is not None:
        pytest.skip(f"the native check cannot be built here: {native_check.missing()}")
    assert native_check.native_check(wait=True) is not None, f"the native check did not build: {native_check.native_check_error()}"


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in SHAPES]


def _make(kind: str, params: list[torch.nn.Parameter], fused: bool) -> torch.optim.Optimizer:
    paths: dict[str, Any] = dict(fused=True) if fused else dict(foreach=False, fused=False)
    if kind == "adam":
        return WaveAdam(params, lr=0.01, amsgrad=True, weight_decay=0.1, buffer_size=N, **paths)
    return WaveSGD(params, lr=0.05, momentum=0.9, weight_decay=0.1, buffer_size=N, **paths)


def _grads(params: list[torch.Tensor], step: int) -> None:
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


class _Pair:
    """A fused optimizer and the eager one (the reference), stepped on the same gradients."""

    def __init__(self, kind: str) -> None:
        self.p, self.q = _params(), _params()
        self.fused, self.eager = _make(kind, self.p, True), _make(kind, self.q, False)
        self.steps = 0

    def step(self, count: int = 1, without: tuple[int, ...] = ()) -> None:
        """``count`` steps of both; the parameters at ``without`` get no gradient (grad None)."""
        for _ in range(count):
            for params in (self.p, self.q):
                _grads(params, self.steps)
                for i in without:
                    params[i].grad = None
            self.fused.step()
            self.eager.step()
            self.steps += 1
            for p, q in zip(self.p, self.q):
                torch.testing.assert_close(p.detach(), q.detach(), rtol=2e-6, atol=2e-6)

    def plan(self) -> Any:
        plans = self.fused._wave_plans()
        return plans[0][-1] if 0 in plans else None


@pytest.fixture
def full_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the full (validating) steps: a planned step does not call ``fused_wave_*_``."""
    calls: list[int] = []
    modules = [cpu_step]
    if INTERPRET:
        from waveguard_optim.kernels import triton_step

        modules.append(triton_step)
    for module in modules:
        for name in ("fused_wave_adam_", "fused_wave_sgd_"):
            original = getattr(module, name)
            monkeypatch.setattr(module, name, lambda *a, _f=original, **k: (calls.append(1), _f(*a, **k))[1])
    return calls


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_planned_steps_match_the_eager_optimizer(kind: str, full_steps: list[int], check: str) -> None:
    """Warm-up and full history, the ring around twice, an lr edit on the way: one full step
    builds the plan, every later one is planned, and all equal the eager optimizer's."""
    pair = _Pair(kind)
    pair.step(N + 2)
    for group in (*pair.fused.param_groups, *pair.eager.param_groups):
        group["lr"] *= 0.5
    pair.step(N + 3)
    assert len(full_steps) == 1 and pair.plan() is not None
    for p, q in zip(pair.p, pair.q):
        assert pair.fused.state_dict()["state"].keys() == pair.eager.state_dict()["state"].keys()
        for key, value in pair.eager.state[q].items():
            torch.testing.assert_close(pair.fused.state[p][key], value, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_a_tensor_lr_edited_in_place_is_read_each_planned_step(kind: str, full_steps: list[int]) -> None:
    """A tensor ``lr`` (what an LR scheduler may hold) changed in place between planned steps:
    each step uses its value then (the Triton plan keeps its hyperparameters on the device and
    copies tensor ones in each step)."""
    pair = _Pair(kind)
    for opt in (pair.fused, pair.eager):
        opt.param_groups[0]["lr"] = torch.tensor(0.02)
    for scale in (1.0, 0.5, 0.25):
        for opt in (pair.fused, pair.eager):
            opt.param_groups[0]["lr"].fill_(0.02 * scale)
        pair.step(2)
    assert len(full_steps) == 1


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_parameters_without_a_gradient_are_skipped_planned_too(kind: str, full_steps: list[int], check: str) -> None:
    """As torch's ``_init_group``, a parameter whose grad is None is skipped: the plan is of those
    with a gradient, and when that set changes one full step rebuilds it."""
    pair = _Pair(kind)
    pair.step(N + 2, without=(1,))
    assert len(full_steps) == 1 and pair.plan().rows == len(SHAPES) - 1
    pair.step(N + 1)  # parameter 1 gets its first gradient
    pair.step(2, without=(0, 2))
    assert len(full_steps) == 3 and pair.plan().rows == 1


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_a_group_switched_to_the_eager_path_leaves_its_plan(kind: str, full_steps: list[int]) -> None:
    """``fused``/``foreach`` edited in a group: the step takes the path they choose, not the plan."""
    pair = _Pair(kind)
    pair.step(N + 1)
    pair.fused.param_groups[0].update(fused=False, foreach=False)
    full_steps.clear()
    pair.step(2)
    assert not full_steps and pair.plan() is None
    pair.fused.param_groups[0]["fused"] = True
    pair.step(2)
    assert len(full_steps) == 1 and pair.plan() is not None


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_counts_written_in_place_are_read_by_the_next_planned_step(kind: str, full_steps: list[int]) -> None:
    """``wave_count`` restored in place (as ``torch.distributed.checkpoint`` loads it): planned
    steps take the ring from the counts as they are now, and equal the eager optimizer's."""
    pair = _Pair(kind)
    pair.step(N + 2)
    for params, opt in ((pair.p, pair.fused), (pair.q, pair.eager)):
        for i, p in enumerate(params):
            opt.state[p]["wave_count"].fill_(i + 1)  # back into warm-up, each at another ring position
    pair.step(N + 1)
    assert len(full_steps) == 1


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_the_device_copy_of_the_counts_follows_them(kind: str, path: str, full_steps: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU the Triton kernel reads the ring from a device copy of the counts, kept in the
    plan, advanced with them, uploaded again when they were written in place. Forced here on
    the CPU (the interpreter reads the copy as it would the counts): planned steps still equal
    the eager optimizer's, before and after counts restored in place."""
    if path != "triton":
        pytest.skip("the device copy of the counts is the Triton path's")
    from waveguard_optim.kernels import triton_step

    monkeypatch.setattr(triton_step, "_reads_counts_in_place", lambda plan: False)
    pair = _Pair(kind)
    pair.step(N + 2)
    plan = pair.plan()
    assert plan.cache["device counts"][1].data_ptr() != plan.count_buffer.data_ptr()
    for params, opt in ((pair.p, pair.fused), (pair.q, pair.eager)):
        for i, p in enumerate(params):
            opt.state[p]["wave_count"].fill_(i + 1)
    pair.step(N + 1)
    assert len(full_steps) == 1 and pair.plan() is plan
    assert plan.cache["device counts"][1].tolist() == plan.count_buffer.tolist()


def test_the_device_copy_of_the_steps_follows_them(path: str, full_steps: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """WaveAdam's steps on the CPU with the kernel on a GPU (the default ``fused=None``): the
    kernel reads a device copy of the plan's step buffer, advanced with it (no copy per step),
    copied again when the steps were written in place. Forced on the CPU as for the counts."""
    if path != "triton":
        pytest.skip("the device copy of the steps is the Triton path's")
    from waveguard_optim.kernels import triton_step

    monkeypatch.setattr(triton_step, "_reads_steps_in_place", lambda plan: False)
    pair = _Pair("adam")
    pair.step(N + 2)
    plan = pair.plan()
    copy = plan.cache["device steps"][1]
    assert copy.data_ptr() != plan.step_buffer.data_ptr()
    pair.step(2)
    assert plan.cache["device steps"][1] is copy  # advanced on the device, not copied again
    for params, opt in ((pair.p, pair.fused), (pair.q, pair.eager)):
        for i, p in enumerate(params):
            opt.state[p]["step"].fill_(3.0 + i)  # restored in place: the bias corrections follow
    pair.step(3)
    assert len(full_steps) == 1 and pair.plan() is plan
    assert plan.cache["device steps"][1].tolist() == plan.step_buffer.tolist()


def _replace_p_data(pair: _Pair) -> Any:
    backing = []
    for params in (pair.p, pair.q):
        view, buffer = _planted(params[0].detach().clone())
        params[0].data = view
        backing.append(buffer)
    return backing[0]


def _replace_state(key: str) -> Any:
    def edit(pair: _Pair) -> Any:
        view, backing = _planted(pair.fused.state[pair.p[0]][key])
        pair.fused.state[pair.p[0]][key] = view
        return backing

    return edit


def _set_state(key: str) -> Any:
    def edit(pair: _Pair) -> Any:
        t = pair.fused.state[pair.p[0]][key]
        view, backing = _planted(t)
        t.set_(view)  # the same tensor object, now on other memory
        return backing

    return edit


def _reloaded(pair: _Pair) -> None:
    saved = pair.eager.state_dict()
    for opt in (pair.fused, pair.eager):
        mine = copy.deepcopy(saved)  # torch's load keeps same-device tensors: no sharing between the two
        for group, own in zip(mine["param_groups"], opt.param_groups):
            group.update(fused=own["fused"], foreach=own["foreach"])  # each keeps its path
        opt.load_state_dict(mine)
    with torch.no_grad():
        for p, q in zip(pair.p, pair.q):
            p.copy_(q)


def _group_added(pair: _Pair) -> None:
    for params, opt in ((pair.p, pair.fused), (pair.q, pair.eager)):
        extra = torch.nn.Parameter(torch.ones(5))
        params.append(extra)
        opt.add_param_group(dict(params=[extra]))


# edits after which the step must rebuild its plan and equal the eager optimizer's
REBUILDS = {
    "p.data = other memory": _replace_p_data,
    "opt.state[p]['wave_history_0'] replaced": _replace_state("wave_history_0"),
    "opt.state[p]['wave_history_3'].set_(other memory)": _set_state("wave_history_3"),
    "load_state_dict": _reloaded,
    "add_param_group": _group_added,
}
ADAM_REBUILDS = {
    "opt.state[p]['exp_avg'] replaced": _replace_state("exp_avg"),
    "opt.state[p]['max_exp_avg_sq'].set_(other memory)": _set_state("max_exp_avg_sq"),
}
SGD_REBUILDS = {"opt.state[p]['momentum_buffer'] replaced": _replace_state("momentum_buffer")}


@pytest.mark.parametrize(("kind", "case"), [(k, c) for k, cases in (("adam", {**REBUILDS, **ADAM_REBUILDS}), ("sgd", {**REBUILDS, **SGD_REBUILDS})) for c in cases])
def test_a_tensor_replaced_behind_the_plan_rebuilds_it(kind: str, case: str, full_steps: list[int], check: str) -> None:
    pair = _Pair(kind)
    pair.step(N + 1)
    before = pair.plan()
    assert before is not None
    backing = {**REBUILDS, **ADAM_REBUILDS, **SGD_REBUILDS}[case](pair)
    full_steps.clear()
    pair.step(N + 1)
    assert len(full_steps) == 1  # one full step, then planned again
    if case == "add_param_group":  # the new group's plan is built; the first group's stays valid
        assert pair.plan() is before and 1 in pair.fused._wave_plans()
    else:
        assert pair.plan() is not before
    if backing is not None:
        assert (backing[backing.numel() // 2 :] == SENTINEL).all()


def _shrunk(key: str, how: str) -> Any:
    def edit(opt: torch.optim.Optimizer, p: torch.Tensor) -> None:
        t = opt.state[p][key]
        if how == "resize_":
            t.resize_(t.numel() - 1)
        elif how == "set_":
            t.set_(torch.zeros(t.numel() - 1, dtype=t.dtype))
        else:
            t.data = t.data.reshape(-1)[:-1]

    return edit


SHRINKS = [("adam", "exp_avg_sq"), ("adam", "wave_history_2"), ("adam", "step"), ("sgd", "momentum_buffer"), ("sgd", "wave_history_1")]


@pytest.mark.parametrize("how", ["resize_", "set_", ".data ="])
@pytest.mark.parametrize(("kind", "key"), SHRINKS)
def test_a_state_tensor_shrunk_in_place_is_refused_untouched(kind: str, key: str, how: str, check: str) -> None:
    """The same tensor object, its memory shrunk (``resize_``, ``set_``, ``.data =``): the plan
    must not write the old size through its cached pointer; the full step refuses the size."""
    if key == "step" and how == "resize_":
        how = "set_"  # a 0-dim step cannot shrink; a larger one is refused as well
    params = _params()
    opt = _make(kind, params, True)
    for step in range(N + 1):
        _grads(params, step)
        opt.step()
    assert opt._wave_plans()
    p = params[0]
    view, backing = _planted(opt.state[p][key])
    opt.state[p][key] = view
    _grads(params, N + 1)
    opt.step()  # rebuilt on the planted view
    target = opt.state[p][key]
    if key == "step":
        target.set_(torch.zeros(2, dtype=target.dtype))
    else:
        _shrunk(key, how)(opt, p)
    _grads(params, N + 2)
    _assert_refused_untouched(opt, p, "size|one-element|elements|shape")
    assert (backing[backing.numel() // 2 :] == SENTINEL).all()


def test_a_model_conversion_is_refused_untouched(check: str) -> None:
    """``model.to(float64)`` after the plan was built: torch's Adam refuses the float32 state, so does this."""
    params = _params()
    opt = _make("adam", params, True)
    for step in range(N + 1):
        _grads(params, step)
        opt.step()
    model = torch.nn.ParameterList(params).to(torch.float64)
    _grads(list(model), N + 1)
    _assert_refused_untouched(opt, params[0], "expected dtype torch.float64")


def test_a_gradient_sharing_memory_with_the_state_is_refused(check: str) -> None:
    """Gradients are checked every step: one that is the slot this step writes is refused, not read while written."""
    params = _params()
    opt = _make("sgd", params, True)
    for step in range(N + 1):
        _grads(params, step)
        opt.step()
    p = params[1]
    p.grad = opt.state[p][f"wave_history_{(N + 1) % N}"]  # the newest: the (N+2)-th gradient goes to slot (N+1) mod N
    _assert_refused_untouched(opt, p, "shares memory")


def _planned_adam() -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer, Any]:
    """A fused WaveAdam with a plan and a full history, and the next step's gradients set."""
    params = _params()
    opt = _make("adam", params, True)
    for step in range(N + 1):
        _grads(params, step)
        opt.step()
    _grads(params, N + 1)
    return params, opt, opt._wave_plans()[0][-1]


def _view_of(t: torch.Tensor) -> torch.Tensor:
    return t.view(t.shape)  # another object on the same memory


# How a step's operands may differ from the plan's, and whether the plan may still be used.
CONFIRM_CASES: dict[str, tuple[Any, bool]] = {
    "unchanged": (lambda ps, ss, gs: None, True),
    "another state dict, the same tensors": (lambda ps, ss, gs: ss.__setitem__(0, dict(ss[0])), True),
    "a parameter's view": (lambda ps, ss, gs: ps.__setitem__(0, _view_of(ps[0])), False),
    "parameters reordered": (lambda ps, ss, gs: ps.reverse(), False),
    "a parameter without state": (lambda ps, ss, gs: ss.__setitem__(1, None), False),
    "a state key deleted": (lambda ps, ss, gs: ss[2].pop("wave_history_1"), False),
    "a state value a view": (lambda ps, ss, gs: ss[0].update(exp_avg=_view_of(ss[0]["exp_avg"])), False),
    "a slot resized in place": (lambda ps, ss, gs: ss[1]["wave_history_3"].resize_(2), False),
    "a count set_ to other memory": (lambda ps, ss, gs: ss[0]["wave_count"].set_(torch.zeros((), dtype=torch.int64)), False),
    "a gradient missing": (lambda ps, ss, gs: gs.pop(), False),
    "a float64 gradient": (lambda ps, ss, gs: gs.__setitem__(0, gs[0].double()), False),
    "a non-contiguous gradient": (lambda ps, ss, gs: gs.__setitem__(0, torch.zeros(10, 30).t()), False),
    "a gradient of another size": (lambda ps, ss, gs: gs.__setitem__(2, torch.zeros(8)), False),
    "a meta gradient": (lambda ps, ss, gs: gs.__setitem__(1, torch.empty(30, device="meta")), False),
    "a sparse gradient": (lambda ps, ss, gs: gs.__setitem__(1, torch.zeros(30).to_sparse()), False),
    "a gradient that is a state tensor": (lambda ps, ss, gs: gs.__setitem__(1, ss[1]["exp_avg_sq"]), False),
    "a gradient inside a parameter": (lambda ps, ss, gs: gs.__setitem__(2, ps[0].detach().view(-1)[5:12]), False),
}


@pytest.mark.parametrize("case", CONFIRM_CASES)
def test_the_plan_check_sees_each_change(case: str, check: str) -> None:
    """``StepPlan.confirm`` on a planned WaveAdam's operands, changed one way each: the native
    check and the Python one both answer what the plan may do."""
    params, opt, plan = _planned_adam()
    ps, ss, gs = list(params), [opt.state[p] for p in params], [p.grad for p in params]
    edit, expected = CONFIRM_CASES[case]
    edit(ps, ss, gs)
    assert plan.confirm(ps, ss, gs) is expected
    if expected:
        assert plan.grad_ptrs.tolist() == [g.data_ptr() for g in gs]


def test_the_native_check_builds_where_a_compiler_and_headers_exist() -> None:
    """Where ``native_check.missing()`` finds nothing lacking, the C++ check must build (a plan
    silently falling back to the Python check would be slower, not wrong)."""
    _require_native_check()


class _Mode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


# How a group may differ from its plan, edited on the optimizer itself, and whether the one-call
# check of the whole group (``StepPlan.confirm_group``) may confirm it.
GROUP_CASES: dict[str, tuple[Any, bool]] = {
    "unchanged": (lambda opt, ps: None, True),
    "another state dict, the same tensors": (lambda opt, ps: opt.state.__setitem__(ps[0], dict(opt.state[ps[0]])), True),
    "a state dict of copies": (lambda opt, ps: opt.state.__setitem__(ps[1], {k: v.clone() for k, v in opt.state[ps[1]].items()}), False),
    "a state dict removed": (lambda opt, ps: opt.state.pop(ps[2]), False),
    "a state key deleted": (lambda opt, ps: opt.state[ps[0]].pop("exp_avg"), False),
    "a parameter replaced": (lambda opt, ps: ps.__setitem__(1, torch.nn.Parameter(ps[1].detach().clone())), False),
    "parameters reordered": (lambda opt, ps: ps.reverse(), False),
    "a parameter without a gradient": (lambda opt, ps: setattr(ps[1], "grad", None), False),
    "a slot resized in place": (lambda opt, ps: opt.state[ps[1]]["wave_history_2"].resize_(3), False),
    "a float64 gradient": (lambda opt, ps: (setattr(ps[0], "grad_dtype", None), setattr(ps[0], "grad", ps[0].grad.double())), False),
    "a non-contiguous gradient": (lambda opt, ps: setattr(ps[0], "grad", torch.zeros(10, 30).t()), False),
    "a gradient that is a state tensor": (lambda opt, ps: setattr(ps[1], "grad", opt.state[ps[1]]["exp_avg"]), False),
    "a gradient inside another parameter": (lambda opt, ps: setattr(ps[2], "grad", ps[0].detach().view(-1)[3:10]), False),
}


@pytest.mark.parametrize("case", GROUP_CASES)
def test_the_one_call_group_check_sees_each_change(case: str) -> None:
    """``StepPlan.confirm_group`` (the native check of a whole group, the planned step's first
    try) on a planned WaveAdam edited one way each: it confirms only what ``confirm`` would,
    and where it does, it has this step's gradient addresses."""
    _require_native_check()
    _, opt, plan = _planned_adam()
    group = opt.param_groups[0]["params"]
    edit, expected = GROUP_CASES[case]
    edit(opt, group)
    assert plan.confirm_group(group, opt.state) is expected
    if expected:
        assert plan.grad_ptrs.tolist() == [p.grad.data_ptr() for p in group]
        with _Mode():  # p.grad would consult the mode: the group check leaves it to the Python path
            assert plan.confirm_group(group, opt.state) is False
