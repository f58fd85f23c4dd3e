"""The fused CPU step of WaveAdam and WaveSGD: record, filter and update in one pass.

``fused_wave_adam_`` and ``fused_wave_sgd_`` take what ``record_and_filter`` and torch's
functional ``adam`` / ``sgd`` take together, and do both: write the current gradient into the
newest history slot, compute the folded filter of SPEC section 3 where the history is full,
and apply torch's update to the result. Their pure-torch twin is
``waveguard_optim.denoise.record_and_filter`` followed by ``torch.optim.adam.adam`` (or
``torch.optim.sgd.sgd``) with ``maximize=False``.

Two back ends, the same numbers (to float rounding):

``"c"`` (needs a C compiler: ``cc``, ``gcc`` or ``clang``, or ``$CC``)
    One generated, vectorized C kernel per (N, parameter and history dtypes, switches such as
    amsgrad or the weight-decay mode) that reads and writes every element once (see
    :mod:`waveguard_optim.kernels.cpu_c`); the chunks of all tensors are split between
    ``torch.get_num_threads()`` of torch's own OpenMP threads. It allocates nothing the size
    of a parameter. The
    shared library is cached on disk (first use of a variant: well under a second to compile
    at N = 8; later processes: a few milliseconds to load).
``"torch"``
    The same math as ``torch._foreach_*`` calls, one cache-sized block of elements at a time
    (flat slices of the tensors), so that the filter's temporaries take one block of memory.
    No dependency beyond torch; used when there is no C compiler (slower: many small ops).

Numbers: the torch back end performs the twin's operations; the C kernel performs them in
the same order with the same roundings (FMA where torch's CPU kernels use one, 16-bit values
rounded where torch's tensor ops round them), so float32 results differ from the twin's only
where torch's own CPU ``sqrt`` is not correctly rounded (by an ulp), and non-finite gradients
give the twin's non-finite results. A ``grad_scale`` that is not a power of two (GradScaler's
always are) is handled by the torch back end.

``backend=None`` takes ``$WAVEGUARD_CPU_BACKEND`` if set, else C when a compiler is found,
else torch. :func:`cpu_fused_available` says whether the C kernel can be used. A C kernel that
cannot be built (the compiler fails or hangs) falls back to torch with a warning, or raises
when the C back end was named or ``strict`` (``fused=True``) asks for it.

Every tensor is checked before anything is written (``_check_operands``): the C kernel reaches
them through raw pointers typed by the parameter's dtype.

Non-contiguous tensors are processed through a contiguous copy that is written back (one
tensor's worth of temporary memory each), complex tensors as their real view.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from waveguard_optim._warnings import warn
from waveguard_optim.filter import compute_dtype, filter_weights, fold_filter, threshold_scale_factor
from waveguard_optim.kernels import cpu_c
from waveguard_optim.kernels._checks import check_state_dtypes, check_step_memory, check_steps
from waveguard_optim.kernels.plan import StepPlan, make_plan, step_skipped

__all__ = ["fused_wave_adam_", "fused_wave_sgd_", "cpu_fused_available", "make_plan", "planned_wave_adam_", "planned_wave_sgd_"]

C_CHUNK = 1 << 15
"""Elements per work item of the C kernel."""
MIN_ELEMENTS_PER_THREAD = 1 << 15
"""Below this many elements per thread, fewer threads (a thread hand-off costs ~10-50 us)."""
TORCH_BLOCK = 1 << 17
"""Elements per block of the torch back end: its ~20 block-sized temporaries stay in L2/L3."""

_KINDS = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}
_BACKENDS = ("c", "torch")

_broken_variants: set[tuple[Any, ...]] = set()
_warned_no_compiler: list[bool] = []


def cpu_fused_available() -> bool:
    """Whether the single-pass C kernel can run (a C compiler is found and it is not disabled)."""
    if os.environ.get("WAVEGUARD_CPU_BACKEND", "").lower() == "torch":
        return False
    return cpu_c.find_compiler() is not None


def _resolve_backend(backend: str | None) -> str:
    choice = (backend or os.environ.get("WAVEGUARD_CPU_BACKEND") or "").lower()
    if not choice:
        if cpu_c.find_compiler() is not None:
            return "c"
        if not _warned_no_compiler:
            _warned_no_compiler.append(True)
            warn(
                "no C compiler found (cc, gcc, clang or $CC), so the fused CPU step runs as "
                "torch ops, 9-35x slower (README, Requirements); install one, or set WAVEGUARD_CPU_BACKEND=torch to choose this"
            )
        return "torch"
    if choice not in _BACKENDS:
        raise ValueError(f"Invalid backend or WAVEGUARD_CPU_BACKEND: {choice!r} (expected one of {_BACKENDS})")
    if choice == "c" and cpu_c.find_compiler() is None:
        raise RuntimeError("The C back end of the fused CPU step needs a C compiler: install cc, gcc or clang, or set CC")
    return choice


def _to_float(x: float | Tensor) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


class _Operands:
    """Real, contiguous stand-ins of tensors; written ones are copied back by :meth:`finish`."""

    def __init__(self) -> None:
        self._write_back: list[tuple[Tensor, Tensor]] = []

    def take(self, t: Tensor, *, written: bool, dtype: torch.dtype | None = None) -> Tensor:
        t = _real(t)
        if t.is_contiguous() and (dtype is None or t.dtype == dtype):
            return t
        tmp = t.to(dtype=dtype or t.dtype, memory_format=torch.contiguous_format, copy=True)
        if written:
            self._write_back.append((t, tmp))
        return tmp

    def rows(self, params: list[Tensor], grads: list[Tensor], state: list[list[Tensor]], slots: list[list[Tensor]], dtype: torch.dtype) -> list[Tensor]:
        """The kernel's operands, row after row: per parameter p, grad, its state, its slots
        (the last slot is written); gradients in ``dtype``, the parameter's real dtype."""
        flat = [t for i, p in enumerate(params) for t in (p, grads[i], *(s[i] for s in state), *slots[i])]
        if all(map(Tensor.is_contiguous, flat)) and all(g.dtype == dtype for g in grads) and params[0].dtype == dtype:
            return flat  # the common case (one dtype per call: complex parameters come on their own)
        out = []
        last = 1 + len(state) + len(slots[0])
        for k, t in enumerate(flat):
            column = k % (last + 1)
            written = column != 1 and (column < 2 + len(state) or column == last)
            out.append(self.take(t, written=written, dtype=dtype if column == 1 else None))
        return out

    def finish(self) -> None:
        for t, tmp in self._write_back:
            t.copy_(tmp)
        self._write_back.clear()


@functools.lru_cache(maxsize=64)
def _filter_constants(n: int, decay: float, threshold_scale: float) -> tuple[tuple[float, ...], tuple[float, ...], float, bool, bool]:
    """``(w, -u, tau factor, thresholding, compiled)`` for N. With kappa = 0, or delta = 1 (every
    u_i = 0), the folded correction vanishes exactly and is skipped.

    ``compiled``: a C kernel variant evaluates exactly the nonzero terms of these weights, as
    SPEC section 3 requires (0 * inf is NaN): the ``newest`` variant those of decay 0, the other
    one every term, so it needs every w_j (and, when thresholding, every u_i) nonzero. A decay
    so small that some w_j underflow to 0 takes the torch back end."""
    w, u = filter_weights(n, decay)
    threshold = threshold_scale != 0 and any(x != 0 for x in u[1:])
    compiled = decay == 0 or (all(w) and (all(u[1:]) or not threshold))
    return w, tuple(-x for x in u), threshold_scale_factor(n, threshold_scale), threshold, compiled


def _as_alpha(dtype: torch.dtype, value: float) -> float:
    """A scalar as torch's CPU ``add`` uses it on a ``dtype`` tensor: ``alpha`` and added
    scalars are first rounded to a 16-bit dtype (``mul``, ``div``, ``lerp``, ``addcmul`` and
    ``addcdiv`` take theirs in float32)."""
    if dtype in (torch.bfloat16, torch.float16):
        return float(torch.tensor(value, dtype=torch.float64).to(dtype))
    return value


def _exact_reciprocal(scale: float | None) -> bool:
    """Whether dividing by ``scale`` is multiplying by ``1 / scale`` exactly: a power of two
    (GradScaler's scales always are). Other scales take the torch back end."""
    return scale is None or (scale > 0 and math.isfinite(scale) and math.frexp(scale)[0] == 0.5)


def _common_scalars(scale: float | None, maximize: bool, constants: tuple[Any, ...], pdtype: torch.dtype) -> dict[str, float]:
    """The run-time scalars every kernel takes (see ``cpu_c.SCALARS``)."""
    sign = -1.0 if maximize else 1.0
    return dict(
        ginv=sign if scale is None else sign / scale,  # exact: the kernel is used for powers of two only
        tscale=constants[2],  # kappa * sqrt(2 ln N) / 0.6745
        TINY=torch.finfo(compute_dtype(pdtype)).smallest_normal,  # the gate's floor under E_c + E_f, as in filter._gate
        threshold=float(constants[3]),  # thresholding on
    )


def _adam_scalars(beta1: float | Tensor, beta2: float | Tensor, lr: float | Tensor, weight_decay: float, pdtype: torch.dtype) -> dict[str, float]:
    """``lw = 1 - beta1`` (the lerp weight), ``c2 = 1 - beta2`` (addcmul's value) and ``keep = 1 -
    lr * weight_decay`` (decoupled decay), computed as torch's single-tensor Adam does: a Tensor
    lr or beta makes them tensor arithmetic in its dtype (float32), ``beta1`` cast to the
    parameter's dtype first; floats stay Python (double) arithmetic."""
    device_beta1 = beta1.to(pdtype.to_real()) if isinstance(beta1, Tensor) else beta1  # a complex parameter: its real view
    return dict(lw=_to_float(1 - device_beta1), c2=_to_float(1 - beta2), keep=_to_float(1 - lr * weight_decay))


_DTYPE, _IS_CPU, _IS_SPARSE = (operator.attrgetter(name) for name in ("dtype", "is_cpu", "is_sparse"))


def _uniform_group(params: Sequence[Tensor], grads: Sequence[Tensor], histories: Sequence[Sequence[Tensor]]) -> tuple[Any, ...] | None:
    """The group key when every tensor passes ``_groups``' checks and all share it (the usual
    case, checked a list at a time), else None."""
    pdtypes, sdtypes = set(map(_DTYPE, params)), set(map(_DTYPE, itertools.chain.from_iterable(histories)))
    lengths = set(map(len, histories))
    if len(pdtypes) == len(sdtypes) == len(lengths) == 1 and pdtypes <= _KINDS.keys() and sdtypes <= _KINDS.keys():
        if all(map(_IS_CPU, params)) and all(map(_IS_CPU, grads)) and not any(map(_IS_SPARSE, grads)) and 0 not in lengths:
            return (*pdtypes, *sdtypes, *lengths, False)
    return None


def _groups(params: Sequence[Tensor], grads: Sequence[Tensor], histories: Sequence[Sequence[Tensor]]) -> dict[tuple[Any, ...], list[int]]:
    """Indices by (real param dtype, history dtype, N, complex), after checking what every back end needs.
    The history dtype is None where a parameter's slots disagree (those go to the torch back end)."""
    key = _uniform_group(params, grads, histories)
    if key is not None:
        return {key: list(range(len(params)))}
    out: dict[tuple[Any, ...], list[int]] = {}
    for i, (p, g, h) in enumerate(zip(params, grads, histories)):
        if not (p.is_cpu and g.is_cpu):
            raise RuntimeError(f"The fused CPU step needs CPU tensors, got a parameter on {p.device}")
        if g.is_sparse:
            raise RuntimeError("The fused CPU step does not support sparse gradients")
        if not h:
            raise RuntimeError("Every parameter needs its history slots (oldest first)")
        real = p.dtype.to_real() if p.is_complex() else p.dtype
        if real not in _KINDS:
            raise RuntimeError(f"The fused CPU step supports float32, float64, bfloat16 and float16 parameters, got {p.dtype}")
        first = h[0].dtype
        slot = first.to_real() if first.is_complex else first
        if slot not in _KINDS or any(s.dtype != first for s in h):
            slot = None
        out.setdefault((real, slot, len(h), p.is_complex()), []).append(i)
    return out


def _check_operands(
    name: str,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: dict[str, Sequence[Tensor | None]],
    histories: Sequence[Sequence[Tensor]],
    steps: Sequence[Tensor] = (),
) -> None:
    """What the C kernel (and the torch back end's flat views) rely on, refused before anything
    changes: every gradient, state and history tensor is a CPU tensor holding as many elements
    as its parameter (the kernel walks them all by the parameter's count), and no tensor the
    step writes overlaps itself or another operand. ``None`` states (SGD's first momentum
    buffers) are skipped."""
    sizes = list(map(Tensor.numel, params))
    slots = [s for h in histories for s in h]
    slot_sizes = [sizes[i] for i, h in enumerate(histories) for _ in h]
    for column, tensors, expected in [*((c, ts, sizes) for c, ts in dict(grads=grads, **state).items()), ("wave_history", slots, slot_sizes)]:
        tensors = [t if t is not None else params[i] for i, t in enumerate(tensors)] if column == "momentum_buffers" else tensors
        if all(map(_IS_CPU, tensors)) and list(map(Tensor.numel, tensors)) == expected:
            continue
        owners = [i for i, h in enumerate(histories) for _ in h] if column == "wave_history" else range(len(params))
        k = next(k for k, t in enumerate(tensors) if not t.is_cpu or t.numel() != expected[k])
        if not tensors[k].is_cpu:
            raise RuntimeError(f"The fused CPU step needs CPU tensors, got a {column} tensor of parameter {owners[k]} on {tensors[k].device}")
        raise RuntimeError(
            f"The fused CPU step needs {column} tensors of their parameter's size: parameter {owners[k]} "
            f"has {expected[k]} elements, its {column} tensor {tensors[k].numel()} elements"
        )
    check_step_memory(name, params, grads, state, steps, histories)


def _to_torch_back_end(groups: dict[tuple[Any, ...], list[int]], members: set[int]) -> dict[tuple[Any, ...], list[int]]:
    """``groups`` with ``members`` moved to keys whose history dtype is None: the torch back end,
    whose tensor ops mix dtypes as torch's optimizers do (the C kernel types every column)."""
    if not members:
        return groups
    out: dict[tuple[Any, ...], list[int]] = {}
    for key, indices in groups.items():
        for i in indices:
            out.setdefault((key[0], None, *key[2:]) if i in members else key, []).append(i)
    return out


def _picker(members: list[int], total: int) -> Any:
    """``xs -> [xs[i] for i in members]``; the identity when the members are everything."""
    if len(members) == total:
        return lambda xs: xs
    return lambda xs: [xs[i] for i in members]


# ---------------------------------------------------------------------------------------
# The C back end.


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"


def _chunks(sizes: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    counts = (sizes + chunk - 1) // chunk
    owner = np.repeat(np.arange(len(sizes), dtype=np.int64), counts)
    first_chunk = np.cumsum(counts) - counts
    offset = (np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(first_chunk, counts)) * chunk
    length = np.minimum(chunk, sizes[owner] - offset)
    return owner, offset, length


_pool_lock = threading.Lock()
_pool: dict[int, ThreadPoolExecutor] = {}


def _workers(threads: int) -> ThreadPoolExecutor:
    with _pool_lock:
        pool = _pool.get(threads)
        if pool is None:
            pool = _pool[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="waveguard-cpu")
    return pool


def _c_required(backend: str | None, strict: bool) -> bool:
    """Whether a C kernel that cannot be built (a broken, missing or hanging compiler) raises
    instead of falling back to torch: the C back end was named (``backend`` or
    ``$WAVEGUARD_CPU_BACKEND``), or the caller insists on the fused step (``fused=True``)."""
    return strict or (backend or os.environ.get("WAVEGUARD_CPU_BACKEND") or "").lower() == "c"


def _c_kernel(algo: str, options: dict[str, bool], pkind: str, skind: str, n: int, required: bool) -> cpu_c.Kernel | None:
    """The C kernel variant for these switches (by name: ``cpu_c.OPTIONS``), or None if it
    cannot be built here (the caller then uses the torch back end; warned once per variant),
    unless ``required``: then the failure raises."""
    switches = tuple(name for name in cpu_c.OPTIONS[algo] if options[name])
    key = (algo, n, pkind, skind, switches)
    if key in _broken_variants and not required:
        return None
    try:
        return cpu_c.get_kernel(algo, n, pkind, skind, switches)
    except ValueError:  # a bad setting ($WAVEGUARD_CC_TIMEOUT, an unparsable $CC): the user's to fix
        raise
    except Exception as err:  # noqa: BLE001 - any other failure to build a kernel means: use torch
        if required:
            raise RuntimeError(f"The fused CPU kernel {key} cannot be built ({_short(err)}); fix $CC, or set WAVEGUARD_CPU_BACKEND=torch") from err
        _broken_variants.add(key)
        warn(f"fused CPU kernel {key} unavailable ({_short(err)}); using the torch back end")
        return None


def _plans(
    algo: str,
    switches: dict[str, bool],
    groups: dict[tuple[Any, ...], list[int]],
    use_c: bool,
    required: bool,
    decay: float,
    threshold_scale: float,
) -> list[tuple[tuple[Any, ...], list[int], cpu_c.Kernel | None]]:
    """``(group key, members, C kernel or None for the torch back end)`` per group, every kernel
    loaded before anything is written. A history dtype of None (slots of mixed dtypes, see
    ``_to_torch_back_end``) and weights no variant evaluates exactly (``_filter_constants``) take torch."""
    return [
        (
            key,
            members,
            _c_kernel(algo, switches, _KINDS[key[0]], _KINDS[key[1]], key[2], required)
            if use_c and key[1] and _filter_constants(key[2], decay, threshold_scale)[4]
            else None,
        )
        for key, members in groups.items()
    ]


def _c_steps(state_steps: list[Tensor]) -> tuple[np.ndarray, bool] | None:
    """The steps' addresses and whether they are float64, where the C kernel can count them:
    CPU scalars of one float dtype (float32 or float64); else None."""
    dtypes = set(map(_DTYPE, state_steps))
    if len(dtypes) != 1 or not dtypes <= {torch.float32, torch.float64}:
        return None
    if not all(map(_IS_CPU, state_steps)) or not all(t.numel() == 1 for t in state_steps):
        return None
    return np.fromiter(map(Tensor.data_ptr, state_steps), dtype=np.int64, count=len(state_steps)), torch.float64 in dtypes


def _adam_steps(
    state_steps: list[Tensor], lr: float | Tensor, beta1: float | Tensor, beta2: float | Tensor, kernel: cpu_c.Kernel | None,
    c_steps: tuple[np.ndarray, bool] | None,
) -> tuple[Sequence[float], Sequence[float]]:
    """Increment the step counts; return torch Adam's ``step_size`` and ``sqrt(bias_correction2)``
    per tensor. In C (one call, the same libm ``pow`` as Python's ``**``) when a kernel is given,
    the hyperparameters are floats and :func:`_c_steps` accepted the steps (``c_steps``: its
    answer, a plan keeps it), else as torch's single-tensor Adam does it (in a Tensor lr's or
    beta's dtype: float32 arithmetic)."""
    scalars = not any(isinstance(x, Tensor) for x in (lr, beta1, beta2))
    if kernel is not None and scalars and c_steps is not None:
        pointers, f64 = c_steps
        count = len(state_steps)
        step_size, bc2_sqrt = np.empty(count), np.empty(count)
        kernel.steps(pointers.ctypes.data, count, f64, lr, beta1, beta2, step_size.ctypes.data, bc2_sqrt.ctypes.data)
        torch.autograd.graph.increment_version(state_steps)
        return step_size, bc2_sqrt
    torch._foreach_add_(state_steps, 1)
    steps = torch.stack(state_steps).tolist() if len(state_steps) > 1 else [state_steps[0].item()]
    return [_to_float(lr / (1 - beta1**step)) for step in steps], [_to_float((1 - beta2**step) ** 0.5) for step in steps]


def _run_c(
    kernel: cpu_c.Kernel,
    algo: str,
    n: int,
    operands: list[Tensor],
    full: Sequence[bool],
    first: Sequence[bool],
    step_size: Sequence[float],
    bc2_sqrt: Sequence[float],
    filter_constants: tuple[Any, ...],
    scalars: dict[str, float],
) -> None:
    """Run ``kernel`` over tensors whose ``operands`` (real and contiguous, a row per tensor in
    the kernel's column order: see ``_Operands.rows``) on ``torch.get_num_threads()`` threads.
    ``scalars`` are by name (``cpu_c.SCALARS``)."""
    width = len(operands) // len(full)
    sizes = np.array([p.numel() for p in operands[::width]], dtype=np.int64)
    ptrs = np.array(list(map(Tensor.data_ptr, operands)), dtype=np.int64)
    _launch_c(kernel, algo, ptrs, sizes, full, first, step_size, bc2_sqrt, filter_constants, scalars, {})
    # Written through raw pointers: tell autograd, as torch's in-place ops do (a graph that saved
    # a parameter then refuses to backward through the stale value).
    written = [0, *range(2, width - n), width - 1]  # p, the state columns, the newest slot
    torch.autograd.graph.increment_version([t for k in written for t in operands[k::width]])


def _launch_c(
    kernel: cpu_c.Kernel,
    algo: str,
    ptrs: np.ndarray,
    sizes: np.ndarray,
    full: Any,
    first: Any,
    step_size: Sequence[float],
    bc2_sqrt: Sequence[float],
    filter_constants: tuple[Any, ...],
    scalars: dict[str, float],
    cache: dict[Any, Any],
) -> None:
    """One call of ``kernel`` on the address table ``ptrs`` (a row per tensor, int64) and its
    per-row and scalar arguments, as arrays made now (see :func:`_run_table`)."""
    w, neg_u = filter_constants[:2]
    arrays = (
        np.ascontiguousarray(ptrs, dtype=np.int64),
        np.asarray(full, dtype=np.uint8),
        np.asarray(first, dtype=np.uint8),
        np.asarray(step_size, dtype=np.float64),
        np.asarray(bc2_sqrt, dtype=np.float64),
        np.array(w, dtype=np.float64),
        np.array(neg_u, dtype=np.float64),
        np.array([scalars[name] for name in cpu_c.SCALARS[algo]], dtype=np.float64),
    )
    _run_table(kernel, sizes, cache, *(a.ctypes.data for a in arrays))


def _run_table(kernel: cpu_c.Kernel, sizes: np.ndarray, cache: dict[Any, Any], ptrs: int, *arguments: int) -> None:
    """``kernel`` on the address table at ``ptrs`` and the arrays at ``arguments`` (full, first,
    step_size, bc2_sqrt, the filter weights w and -u, the scalars), on ``torch.get_num_threads()``
    threads: the chunks and the thread ranges depend on ``sizes`` only, and are kept in ``cache``
    (a plan's), with their addresses."""
    chunks = cache.get("chunks")
    if chunks is None:
        arrays = _chunks(sizes, C_CHUNK)
        chunks = cache["chunks"] = (arrays, [a.ctypes.data for a in arrays])
    (owner, _, length), chunk_addresses = chunks
    threads_wanted = torch.get_num_threads()
    edges = cache.get(("edges", threads_wanted))
    if edges is None:
        total = int(length.sum())
        threads = max(1, min(threads_wanted, len(owner), total // MIN_ELEMENTS_PER_THREAD))
        # Contiguous ranges of chunks with about equal element counts, one per thread.
        bounds = np.searchsorted(np.cumsum(length), [total * k // threads for k in range(1, threads)], side="right")
        ranges = np.array([0, *bounds.tolist(), len(owner)], dtype=np.int64)
        edges = cache[("edges", threads_wanted)] = (ranges, ranges.ctypes.data)
    ranges, at = edges
    threads = len(ranges) - 1
    pointers = (ptrs, *chunk_addresses, *arguments)
    if kernel.parallel or threads == 1:
        kernel.run(at, threads, *pointers)
    else:  # no OpenMP: a range per Python thread (ctypes releases the GIL during the call)
        starts = [at + k * ranges.itemsize for k in range(threads)]
        futures = [_workers(threads - 1).submit(kernel.run, start, 1, *pointers) for start in starts[1:]]
        kernel.run(starts[0], 1, *pointers)
        for future in futures:
            future.result()


# ---------------------------------------------------------------------------------------
# The torch back end: the same math as foreach calls over cache-sized blocks.


def _flat(t: Tensor, ops: _Operands, *, written: bool) -> Tensor:
    return ops.take(t, written=written).view(-1)


def _blocks(sizes: Sequence[int], block: int) -> list[list[tuple[int, int, int]]]:
    """Pieces ``(tensor, start, end)`` grouped into blocks of about ``block`` elements."""
    out: list[list[tuple[int, int, int]]] = []
    current: list[tuple[int, int, int]] = []
    room = block
    for i, size in enumerate(sizes):
        start = 0
        while start < size:
            end = min(size, start + room)
            current.append((i, start, end))
            room -= end - start
            start = end
            if room == 0:
                out.append(current)
                current, room = [], block
    if current:
        out.append(current)
    return out


def _mul_(tensors: list[Tensor], scalar: float) -> None:
    """``t.mul_(scalar)`` for each: torch 2.13's ``_foreach_mul_`` rounds the scalar to a
    16-bit tensor's dtype first, ``mul_`` (what torch's single-tensor Adam/SGD use) does not."""
    for t in tensors:
        t.mul_(scalar)


def _torch_gradients(
    block: list[tuple[int, int, int]],
    flat_grads: list[Tensor],
    flat_slots: list[list[Tensor]],
    params: list[Tensor],
    full: Sequence[bool],
    *,
    grad_scale: float | None,
    maximize: bool,
    filter_options: dict[str, Any],
) -> list[Tensor]:
    """Record the block's gradients into the newest slots and return what the update uses."""
    g = [flat_grads[i][s:e] for i, s, e in block]
    if grad_scale is not None:
        g = torch._foreach_div(g, grad_scale)
    if maximize:
        g = torch._foreach_neg(g)
    torch._foreach_copy_([flat_slots[i][-1][s:e] for i, s, e in block], g)
    ready = [k for k, (i, _, _) in enumerate(block) if full[i]]
    if not ready:
        return g
    out = list(g)
    dtype = compute_dtype(params[block[ready[0]][0]].dtype)
    n = len(flat_slots[block[ready[0]][0]])
    time_major = [[flat_slots[block[k][0]][j][block[k][1] : block[k][2]].to(dtype) for k in ready] for j in range(n)]
    for k, g_hat in zip(ready, fold_filter(time_major, **filter_options)):
        out[k] = g_hat.to(params[block[k][0]].dtype)
    return out


def _torch_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    histories: list[list[Tensor]],
    full: list[bool],
    step_size: list[float],
    bc2_sqrt: list[float],
    *,
    amsgrad: bool,
    lw: float,
    beta2: float,
    c2: float,
    keep: float,
    weight_decay: float,
    eps: float,
    decoupled: bool,
    maximize: bool,
    grad_scale: float | None,
    filter_options: dict[str, Any],
) -> None:
    """``lw``, ``c2``, ``keep``: see ``_adam_scalars``."""
    ops = _Operands()
    fp = [_flat(t, ops, written=True) for t in params]
    fg = [_flat(t, ops, written=False) for t in grads]
    fm = [_flat(t, ops, written=True) for t in exp_avgs]
    fv = [_flat(t, ops, written=True) for t in exp_avg_sqs]
    fvm = [_flat(t, ops, written=True) for t in max_exp_avg_sqs] if amsgrad else []
    fs = [[_flat(s, ops, written=j == len(h) - 1) for j, s in enumerate(h)] for h in histories]
    real = [_real(p) for p in params]
    for block in _blocks([t.numel() for t in fp], TORCH_BLOCK):
        piece = lambda flat: [flat[i][s:e] for i, s, e in block]  # noqa: E731
        gh = _torch_gradients(block, fg, fs, real, full, grad_scale=grad_scale, maximize=maximize, filter_options=filter_options)
        P, M, V = piece(fp), piece(fm), piece(fv)
        if weight_decay != 0:
            if decoupled:
                _mul_(P, keep)
            else:
                gh = torch._foreach_add(gh, P, alpha=weight_decay)
        torch._foreach_lerp_(M, gh, lw)
        _mul_(V, beta2)
        torch._foreach_addcmul_(V, gh, gh, value=c2)
        if amsgrad:
            VM = piece(fvm)
            torch._foreach_maximum_(VM, V)
            V = VM
        denom = torch._foreach_sqrt(V)
        torch._foreach_div_(denom, [bc2_sqrt[i] for i, _, _ in block])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(P, M, denom, [-step_size[i] for i, _, _ in block])
    ops.finish()


def _torch_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    buffers: list[Tensor],
    first: list[bool],
    histories: list[list[Tensor]],
    full: list[bool],
    *,
    weight_decay: float,
    momentum: float,
    lr: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    grad_scale: float | None,
    filter_options: dict[str, Any],
) -> None:
    ops = _Operands()
    fp = [_flat(t, ops, written=True) for t in params]
    fg = [_flat(t, ops, written=False) for t in grads]
    fb = [_flat(t, ops, written=True) for t in buffers] if momentum != 0 else []
    fs = [[_flat(s, ops, written=j == len(h) - 1) for j, s in enumerate(h)] for h in histories]
    real = [_real(p) for p in params]
    for block in _blocks([t.numel() for t in fp], TORCH_BLOCK):
        gh = _torch_gradients(block, fg, fs, real, full, grad_scale=grad_scale, maximize=maximize, filter_options=filter_options)
        P = [fp[i][s:e] for i, s, e in block]
        if weight_decay != 0:
            gh = torch._foreach_add(gh, P, alpha=weight_decay)
        if momentum != 0:
            B = [fb[i][s:e] for i, s, e in block]
            new = [k for k, (i, _, _) in enumerate(block) if first[i]]
            old = [k for k, (i, _, _) in enumerate(block) if not first[i]]
            if new:
                torch._foreach_copy_([B[k] for k in new], [gh[k] for k in new])
            if old:
                _mul_([B[k] for k in old], momentum)
                torch._foreach_add_([B[k] for k in old], [gh[k] for k in old], alpha=1 - dampening)
            gh = torch._foreach_add(gh, B, alpha=momentum) if nesterov else B
        torch._foreach_add_(P, gh, alpha=-lr)
    ops.finish()


def _adam_options(
    beta1: float | Tensor, beta2: float | Tensor, lr: float | Tensor, weight_decay: float | Tensor, decoupled: bool,
    amsgrad: bool, snr_gate: bool, decay: float, pdtype: torch.dtype,
) -> tuple[dict[str, bool], dict[str, float], float, float]:
    """``(switches, hyper, beta2, weight_decay)`` of an Adam step: the C variant's switches (by
    name: ``cpu_c.OPTIONS``) and the scalars of ``_adam_scalars``."""
    b2, wd = _to_float(beta2), _to_float(weight_decay)
    hyper = _adam_scalars(beta1, beta2, lr, wd, pdtype)
    switches = dict(
        amsgrad=amsgrad,
        l2=wd != 0 and not decoupled,
        decoupled=wd != 0 and decoupled,
        lerp_small=abs(hyper["lw"]) < 0.5,  # which of torch's two lerp formulas
        gate=snr_gate,
        newest=decay == 0,
    )
    return switches, hyper, b2, wd


def _adam_c_scalars(
    scale: float | None, maximize: bool, constants: tuple[Any, ...], pdtype: torch.dtype, hyper: dict[str, float], b2: float, eps: float, wd: float
) -> dict[str, float]:
    alpha = functools.partial(_as_alpha, pdtype)
    return _common_scalars(scale, maximize, constants, pdtype) | hyper | dict(
        beta2=b2,
        eps=alpha(eps),  # add_(eps)
        wd=alpha(wd),  # grad.add(param, alpha=weight_decay)
    )


def _sgd_switches(mom: float, wd: float, nesterov: bool, snr_gate: bool, decay: float) -> dict[str, bool]:
    return dict(momentum=mom != 0, l2=wd != 0, nesterov=nesterov, gate=snr_gate, newest=decay == 0)


def _sgd_c_scalars(scale: float | None, maximize: bool, constants: tuple[Any, ...], pdtype: torch.dtype, lr: float, wd: float, mom: float, damp: float) -> dict[str, float]:
    alpha = functools.partial(_as_alpha, pdtype)
    return _common_scalars(scale, maximize, constants, pdtype) | dict(
        wd=alpha(wd),  # grad.add(param, alpha=weight_decay)
        mom=mom,  # buf.mul_(momentum)
        damp=alpha(1 - damp),  # buf.add_(grad, alpha=1 - dampening)
        nlr=alpha(-lr),  # param.add_(grad, alpha=-lr)
        nmom=alpha(mom),  # grad.add(buf, alpha=momentum)
    )


# ---------------------------------------------------------------------------------------
# Public entry points.


# torch.compile: dynamo must not trace a kernel launch (ctypes calls on numpy pointer tables;
# traced, the step came out NaN in tests/test_compile.py); it runs as one opaque call.
@torch.compiler.disable
def fused_wave_adam_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    histories: list[list[Tensor]],
    full: list[bool],
    *,
    decay: float,
    threshold_scale: float,
    snr_gate: bool,
    amsgrad: bool,
    beta1: float | Tensor,
    beta2: float | Tensor,
    lr: float | Tensor,
    weight_decay: float,
    eps: float,
    maximize: bool,
    decoupled_weight_decay: bool,
    grad_scale: Tensor | None = None,
    backend: str | None = None,
    strict: bool = False,
) -> None:
    """Record each gradient into ``histories[i][-1]``, filter where ``full[i]``, and take one
    torch Adam step on the result (incrementing ``state_steps``). ``grads`` are not modified.
    ``strict`` (the optimizer's ``fused=True``): a C kernel that cannot be built raises."""
    if not params:
        return
    groups = _groups(params, grads, histories)
    state = dict(exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs) | (dict(max_exp_avg_sqs=max_exp_avg_sqs) if amsgrad else {})
    check_state_dtypes("fused_wave_adam_", params, state)
    check_steps("fused_wave_adam_", state_steps)
    _check_operands("fused_wave_adam_", params, grads, state, histories, state_steps)
    use = _resolve_backend(backend)
    scale = None if grad_scale is None else _to_float(grad_scale)
    switches, hyper, b2, wd = _adam_options(beta1, beta2, lr, weight_decay, decoupled_weight_decay, amsgrad, snr_gate, decay, params[0].dtype)
    plans = _plans(
        "adam", switches, groups, use == "c" and _exact_reciprocal(scale), _c_required(backend, strict), decay, threshold_scale
    )
    kernels = [kernel for *_, kernel in plans]
    step_size, bc2_sqrt = _adam_steps(state_steps, lr, beta1, beta2, kernels[0] if all(kernels) else None, _c_steps(state_steps))

    for (pdtype, _, n, _), members, kernel in plans:
        constants = _filter_constants(n, decay, threshold_scale)
        pick = _picker(members, len(params))
        if kernel is None:
            _torch_adam(
                pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs), pick(max_exp_avg_sqs) if amsgrad else [],
                pick(histories), pick(full), pick(step_size), pick(bc2_sqrt),
                amsgrad=amsgrad, **hyper, beta2=b2, weight_decay=wd, eps=eps, decoupled=decoupled_weight_decay,
                maximize=maximize, grad_scale=scale,
                filter_options=dict(decay=decay, threshold_scale=threshold_scale, snr_gate=snr_gate),
            )  # fmt: skip
            continue
        ops = _Operands()
        operands = ops.rows(pick(params), pick(grads), [pick(c) for c in state.values()], pick(histories), pdtype)
        scalars = _adam_c_scalars(scale, maximize, constants, pdtype, hyper, b2, eps, wd)
        _run_c(kernel, "adam", n, operands, pick(full), [False] * len(members), pick(step_size), pick(bc2_sqrt), constants, scalars)
        ops.finish()


@torch.compiler.disable
def fused_wave_sgd_(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    histories: list[list[Tensor]],
    full: list[bool],
    *,
    decay: float,
    threshold_scale: float,
    snr_gate: bool,
    weight_decay: float | Tensor,
    momentum: float,
    lr: float | Tensor,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    grad_scale: Tensor | None = None,
    backend: str | None = None,
    strict: bool = False,
) -> None:
    """Record each gradient into ``histories[i][-1]``, filter where ``full[i]``, and take one
    torch SGD step on the result. A ``None`` momentum buffer is created (as torch does: the
    first update's gradient) and put into ``momentum_buffers`` in place. ``strict``: as for
    :func:`fused_wave_adam_`."""
    if not params:
        return
    groups = _groups(params, grads, histories)
    state = dict(momentum_buffers=momentum_buffers) if momentum != 0 else {}
    _check_operands("fused_wave_sgd_", params, grads, state, histories)
    # A buffer of another dtype than its parameter's (model.half() after some steps): torch's SGD
    # trains on, mixing dtypes in its tensor ops; so does the torch back end.
    mixed = {i for i, b in enumerate(state.get("momentum_buffers", ())) if b is not None and b.dtype != params[i].dtype}
    groups = _to_torch_back_end(groups, mixed)
    use = _resolve_backend(backend)
    lr_, wd, mom, damp = _to_float(lr), _to_float(weight_decay), float(momentum), float(dampening)
    scale = None if grad_scale is None else _to_float(grad_scale)
    switches = _sgd_switches(mom, wd, nesterov, snr_gate, decay)
    first = [False] * len(params)
    if mom != 0:
        for i, buf in enumerate(momentum_buffers):
            if buf is None:
                momentum_buffers[i] = torch.empty_like(grads[i], memory_format=torch.preserve_format)
                first[i] = True
    buffers: list[Tensor] = momentum_buffers  # type: ignore[assignment]

    plans = _plans(
        "sgd", switches, groups, use == "c" and _exact_reciprocal(scale), _c_required(backend, strict), decay, threshold_scale
    )
    for (pdtype, _, n, _), members, kernel in plans:
        constants = _filter_constants(n, decay, threshold_scale)
        pick = _picker(members, len(params))
        if kernel is None:
            _torch_sgd(
                pick(params), pick(grads), pick(buffers) if mom != 0 else [], pick(first), pick(histories), pick(full),
                weight_decay=wd, momentum=mom, lr=lr_, dampening=damp, nesterov=nesterov, maximize=maximize,
                grad_scale=scale, filter_options=dict(decay=decay, threshold_scale=threshold_scale, snr_gate=snr_gate),
            )  # fmt: skip
            continue
        ops = _Operands()
        operands = ops.rows(pick(params), pick(grads), [pick(buffers)] if mom != 0 else [], pick(histories), pdtype)
        scalars = _sgd_c_scalars(scale, maximize, constants, pdtype, lr_, wd, mom, damp)
        zeros = [0.0] * len(members)
        _run_c(kernel, "sgd", n, operands, pick(full), pick(first), zeros, zeros, constants, scalars)
        ops.finish()


# ---------------------------------------------------------------------------------------
# Planned steps: a param group's operands validated once (see kernels/plan.py).


def _planned_kernel(plan: StepPlan, algo: str, switches: dict[str, bool], scale: float | None, decay: float, threshold_scale: float, backend: str | None, strict: bool) -> cpu_c.Kernel | None:
    """The C variant for a planned step, or None where the full step must run (the torch back
    end: no compiler, a grad scale that is not a power of two, weights no variant evaluates exactly).
    Kept in the plan while the arguments (and ``$WAVEGUARD_CPU_BACKEND``) stay."""
    key = (algo, *switches.values(), scale, decay, threshold_scale, backend, strict, os.environ.get("WAVEGUARD_CPU_BACKEND"))
    held = plan.cache.get("kernel")
    if held is None or held[0] != key:
        held = plan.cache["kernel"] = (key, _choose_planned_kernel(plan, algo, switches, scale, decay, threshold_scale, backend, strict))
    return held[1]


def _choose_planned_kernel(plan: StepPlan, algo: str, switches: dict[str, bool], scale: float | None, decay: float, threshold_scale: float, backend: str | None, strict: bool) -> cpu_c.Kernel | None:
    """:func:`_planned_kernel`, chosen now."""
    if _resolve_backend(backend) != "c" or not _exact_reciprocal(scale) or not _filter_constants(plan.buffer_size, decay, threshold_scale)[4]:
        return None
    if plan.dtype not in _KINDS or plan.slot_dtype not in _KINDS:
        return None
    return _c_kernel(algo, switches, _KINDS[plan.dtype], _KINDS[plan.slot_dtype], plan.buffer_size, _c_required(backend, strict))


def _planned_table(plan: StepPlan) -> tuple[np.ndarray, np.ndarray, int, int]:
    """This step's table (p, the gradients ``confirm`` accepted, state columns, slots oldest
    first) and ``full``, and their addresses (the caller holds the arrays through the launch).
    Where a group's counts move together (as they do), the table of each ring position is kept
    in the plan, its gradient column rewritten each step."""
    position = plan.ring_position()
    key = ("table", position, bool(plan.count_values[0] + 1 >= plan.buffer_size))
    held = plan.cache.get(key) if position is not None else None
    if held is None:
        slots, full = plan.ring()
        fixed = plan.fixed_ptrs
        table = np.concatenate([fixed[:, :1], plan.grad_ptrs[:, None], fixed[:, 1:], slots], axis=1)
        full = np.asarray(full, dtype=np.uint8)
        held = (table, full, table.ctypes.data, full.ctypes.data)
        if position is not None:
            plan.cache[key] = held
    else:
        held[0][:, 1] = plan.grad_ptrs
    return held


def _planned_arguments(plan: StepPlan, algo: str, constants: tuple[Any, ...], scalars: dict[str, float]) -> tuple[int, int, int, int, int]:
    """The addresses of a planned launch's other arrays: ``first`` (no row is a first step), zeros
    (SGD's step_size and bc2_sqrt), the filter weights w and -u, the scalars. Kept in the plan
    while their values stay."""
    key = (constants, tuple(scalars[name] for name in cpu_c.SCALARS[algo]))
    held = plan.cache.get("arguments")
    if held is None or held[0] != key:
        arrays = (np.zeros(plan.rows, np.uint8), np.zeros(plan.rows), *(np.array(x, dtype=np.float64) for x in (constants[0], constants[1], key[1])))
        held = plan.cache["arguments"] = (key, arrays, tuple(a.ctypes.data for a in arrays))
    return held[2]


def planned_wave_adam_(
    plan: StepPlan,
    *,
    decay: float,
    threshold_scale: float,
    snr_gate: bool,
    amsgrad: bool,
    beta1: float | Tensor,
    beta2: float | Tensor,
    lr: float | Tensor,
    weight_decay: float,
    eps: float,
    maximize: bool,
    decoupled_weight_decay: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    backend: str | None = None,
    strict: bool = False,
) -> bool:
    """:func:`fused_wave_adam_` on a confirmed plan (``plan.confirm`` returned True for this step's
    grads): records, filters, updates and advances the ring counts. False, with nothing changed,
    where the planned step does not apply (then take the full step); True with nothing changed
    where GradScaler's ``found_inf`` skips the step."""
    scale = None if grad_scale is None else _to_float(grad_scale)
    if plan.fixed_ptrs.shape[1] != (4 if amsgrad else 3):
        return False
    switches, hyper, b2, wd = _adam_options(beta1, beta2, lr, weight_decay, decoupled_weight_decay, amsgrad, snr_gate, decay, plan.dtype)
    kernel = _planned_kernel(plan, "adam", switches, scale, decay, threshold_scale, backend, strict)
    if kernel is None:
        return False
    if step_skipped(found_inf):
        return True
    table, full, table_at, full_at = _planned_table(plan)  # the arrays stay alive through the launch
    constants = _filter_constants(plan.buffer_size, decay, threshold_scale)
    scalars = _adam_c_scalars(scale, maximize, constants, plan.dtype, hyper, b2, eps, wd)
    first, _, w, neg_u, values = _planned_arguments(plan, "adam", constants, scalars)
    if "steps" not in plan.cache:  # the plan's steps: the same tensors every planned step (None: not countable in C)
        plan.cache["steps"] = _c_steps(plan.steps)
    steps = [np.asarray(x, dtype=np.float64) for x in _adam_steps(plan.steps, lr, beta1, beta2, kernel, plan.cache["steps"])]
    _run_table(kernel, plan.sizes, plan.cache, table_at, full_at, first, *(x.ctypes.data for x in steps), w, neg_u, values)
    plan.advance()
    return True


def planned_wave_sgd_(
    plan: StepPlan,
    *,
    decay: float,
    threshold_scale: float,
    snr_gate: bool,
    weight_decay: float | Tensor,
    momentum: float,
    lr: float | Tensor,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    backend: str | None = None,
    strict: bool = False,
) -> bool:
    """:func:`fused_wave_sgd_` on a confirmed plan whose momentum buffers all exist; as
    :func:`planned_wave_adam_`."""
    lr_, wd, mom, damp = _to_float(lr), _to_float(weight_decay), float(momentum), float(dampening)
    scale = None if grad_scale is None else _to_float(grad_scale)
    if plan.fixed_ptrs.shape[1] != (2 if mom != 0 else 1):
        return False
    switches = _sgd_switches(mom, wd, nesterov, snr_gate, decay)
    kernel = _planned_kernel(plan, "sgd", switches, scale, decay, threshold_scale, backend, strict)
    if kernel is None:
        return False
    if step_skipped(found_inf):
        return True
    table, full, table_at, full_at = _planned_table(plan)  # the arrays stay alive through the launch
    constants = _filter_constants(plan.buffer_size, decay, threshold_scale)
    scalars = _sgd_c_scalars(scale, maximize, constants, plan.dtype, lr_, wd, mom, damp)
    first, zeros, w, neg_u, values = _planned_arguments(plan, "sgd", constants, scalars)
    _run_table(kernel, plan.sizes, plan.cache, table_at, full_at, first, zeros, zeros, w, neg_u, values)
    plan.advance()
    return True
