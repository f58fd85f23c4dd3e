"""The numba half of the fused CPU step: pointer, 16-bit float, FMA and min/max intrinsics,
and a code generator that writes one single-pass kernel per (N, dtypes, amsgrad/momentum).

Only :mod:`waveguard_optim.kernels.cpu_step` imports this module, and only when numba is
installed (the optional extra ``cpu``). A kernel is plain Python source generated from the
*shape* of the constants (N, the median network of
:func:`waveguard_optim.filter.median_network`); their *values* (the recency weights,
``u = Haar(w)``, the threshold factor, every optimizer option) come in as arrays and scalars
at run time, so all ``decay``/``threshold_scale``/``lr``/... share one compiled kernel. The
source is written to a cache folder and imported from there, so that numba's ``cache=True``
can keep the machine code beside it: a later process loads it in a fraction of a second.

``run`` walks a range of chunks (tensor, offset, length); the caller runs one range per
thread (the kernels release the GIL). Each chunk is one loop over its elements that LLVM
vectorizes: per element it reads the gradient, the N-1 older history slots and the
optimizer state once, writes the newest slot, the state and the parameter once, and keeps
everything else in registers. The generated code is in single-assignment form, which keeps
numba's compile time to seconds (its SSA pass is quadratic in reassignments).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

import numba
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from waveguard_optim.filter import median_network

# ---------------------------------------------------------------------------------------
# Intrinsics: a raw address as a typed pointer (for numba.carray), and bf16/fp16 <-> fp32.


def _pointer_intrinsic(element: types.Type, ir_type: ir.Type) -> Callable[..., Any]:
    @intrinsic
    def as_pointer(typingctx, address):  # noqa: ARG001 - numba's intrinsic signature
        if not isinstance(address, types.Integer):
            return None
        sig = types.CPointer(element)(types.int64)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], ir.PointerType(ir_type))

        return sig, codegen

    return as_pointer


ptr_f32 = _pointer_intrinsic(types.float32, ir.FloatType())
ptr_f64 = _pointer_intrinsic(types.float64, ir.DoubleType())
ptr_u16 = _pointer_intrinsic(types.uint16, ir.IntType(16))

_I16, _I32 = ir.IntType(16), ir.IntType(32)


@intrinsic
def bf16_to_f32(typingctx, bits):  # noqa: ARG001
    """bfloat16 bits -> float32 (exact)."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        wide = builder.shl(builder.zext(args[0], _I32), ir.Constant(_I32, 16))
        return builder.bitcast(wide, ir.FloatType())

    return sig, codegen


@intrinsic
def f32_to_bf16(typingctx, value):  # noqa: ARG001
    """float32 -> bfloat16 bits, round to nearest even, NaN -> 0x7FC0 (as c10::BFloat16)."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        (x,) = args
        u = builder.bitcast(x, _I32)
        lsb = builder.and_(builder.lshr(u, ir.Constant(_I32, 16)), ir.Constant(_I32, 1))
        rounded = builder.lshr(builder.add(u, builder.add(lsb, ir.Constant(_I32, 0x7FFF))), ir.Constant(_I32, 16))
        is_nan = builder.fcmp_unordered("uno", x, x)
        return builder.select(is_nan, ir.Constant(_I16, 0x7FC0), builder.trunc(rounded, _I16))

    return sig, codegen


@intrinsic
def f16_to_f32(typingctx, bits):  # noqa: ARG001
    """float16 bits -> float32 (exact)."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def f32_to_f16(typingctx, value):  # noqa: ARG001
    """float32 -> float16 bits, round to nearest even (as c10::Half)."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), _I16)

    return sig, codegen


def _min_max_intrinsic(llvm_name: str) -> Callable[..., Any]:
    @intrinsic
    def min_or_max(typingctx, a, b):  # noqa: ARG001
        if not (isinstance(a, types.Float) and a == b):
            return None
        sig = a(a, b)

        def codegen(context, builder, signature, args):
            ty = args[0].type
            fn = builder.module.declare_intrinsic(llvm_name, [ty], ir.FunctionType(ty, [ty, ty]))
            return builder.call(fn, args)

        return sig, codegen

    return min_or_max


# NaN-propagating, like torch.maximum (and cheap for numba to type): amsgrad's max.
fmax = _min_max_intrinsic("llvm.maximum")


def _select_intrinsic(op: str) -> Callable[..., Any]:
    @intrinsic
    def select(typingctx, a, b):  # noqa: ARG001
        if not (isinstance(a, types.Float) and a == b):
            return None

        def codegen(context, builder, signature, args):
            return builder.select(builder.fcmp_ordered(op, args[0], args[1]), args[0], args[1])

        return a(a, b), codegen

    return select


# ``a < b ? a : b`` and ``a > b ? a : b``: one vminps / vmaxps each (the NaN-propagating
# forms above take three instructions). They return ``b`` when either is NaN; the filter
# puts the operand whose NaN must propagate second and patches the rest (see _filter_lines).
smin = _select_intrinsic("<")
smax = _select_intrinsic(">")


@intrinsic
def ffma(typingctx, a, b, c):  # noqa: ARG001
    """a * b + c with one rounding. torch's CPU kernels compute ``add(x, y, alpha)``, ``lerp``
    and ``addcmul`` this way (``Vectorized::fmadd``); using it at exactly those places makes
    the kernel's float32 arithmetic agree with the twin's bit for bit."""
    if not (isinstance(a, types.Float) and a == b == c):
        return None
    sig = a(a, b, c)

    def codegen(context, builder, signature, args):
        ty = args[0].type
        fn = builder.module.declare_intrinsic("llvm.fma", [ty], ir.FunctionType(ty, [ty, ty, ty]))
        return builder.call(fn, args)

    return sig, codegen


# ---------------------------------------------------------------------------------------
# Storage kinds: how to point at, load, store and round-trip one element.

ITEMSIZE = {"f32": 4, "f64": 8, "bf16": 2, "f16": 2}
_POINTER = {"f32": "ptr_f32", "f64": "ptr_f64", "bf16": "ptr_u16", "f16": "ptr_u16"}


def _ctor(compute: str) -> str:
    return "np.float64" if compute == "f64" else "np.float32"


def _load(kind: str, compute: str, x: str) -> str:
    """Storage value ``x`` of ``kind`` as the compute type (f32 or f64)."""
    if kind in ("bf16", "f16"):
        as_f32 = f"{kind}_to_f32({x})"
        return f"np.float64({as_f32})" if compute == "f64" else as_f32
    if kind == compute:
        return x
    return f"{_ctor(compute)}({x})"


def _store(kind: str, compute: str, x: str) -> str:
    """Compute-type value ``x`` as ``kind`` storage (round to nearest even).

    A float64 goes to a 16-bit type through float32, as c10 does.
    """
    if kind in ("bf16", "f16"):
        as_f32 = f"np.float32({x})" if compute == "f64" else x
        return f"f32_to_{kind}({as_f32})"
    if kind == compute:
        return x
    return f"{_ctor(kind)}({x})"


def _round(kind: str, compute: str, x: str) -> str:
    """``x`` rounded to ``kind`` and back: what a tensor of that dtype would hold."""
    if kind == compute:
        return x
    return _load(kind, compute, _store(kind, compute, x))


def compute_of(kind: str) -> str:
    """Arithmetic type of a parameter kind: float64 for float64, float32 otherwise (SPEC section 3)."""
    return "f64" if kind == "f64" else "f32"


# ---------------------------------------------------------------------------------------
# Code generation.


def _filter_lines(n: int, compute: str, threshold: bool) -> list[str]:
    """Element code: ``h0 .. h{n-1}`` (compute type) -> ``gh``, in the operation order of
    :func:`waveguard_optim.filter.fold_filter`."""
    lines = ["gh = h0 * w0"]
    lines += [f"gh = ffma(h{j}, w{j}, gh)" for j in range(1, n)]  # _foreach_add_(out, b, alpha=w_j)
    if not threshold:
        return lines
    half = n // 2
    for i in range(half):
        lines.append(f"a{i} = (h{2 * i} + h{2 * i + 1}) * SQH")
        lines.append(f"d{i} = (h{2 * i} - h{2 * i + 1}) * SQH")
    for i in range(half):
        lines.append(f"x{i} = abs(d{i})")
    steps, middle = median_network(half)
    wire = [f"x{i}" for i in range(half)]
    for number, (lo, hi, need_min, need_max) in enumerate(steps):
        a, b = wire[lo], wire[hi]
        if need_min:
            wire[lo] = f"mn{number}"
            lines.append(f"{wire[lo]} = smin({a}, {b})")
        if need_max:
            wire[hi] = f"mx{number}"
            lines.append(f"{wire[hi]} = smax({a}, {b})")
    if len(middle) == 1:
        lines.append(f"tau = {wire[middle[0]]} * tscale")
    else:
        lines.append(f"tau = (({wire[middle[0]]} + {wire[middle[1]]}) * HALF) * tscale")
    # The SNR gate (a run-time flag: multiplying by one changes nothing).
    lines.append("ef = d0 * d0")
    lines += [f"ef = ffma(d{i}, d{i}, ef)" for i in range(1, half)]  # _foreach_addcmul_
    lines.append("ec = a0 * a0")
    lines += [f"ec = ffma(a{i}, a{i}, ec)" for i in range(1, half)]
    lines.append("tot = smax(TINY, ec + ef)")  # clamp_min, NaN kept
    lines.append("tau = tau * (ef / tot) if gate else tau")
    # (A NaN detail would make torch's median NaN where this network's need not be; it does
    # not matter: that detail's own clamp below is NaN, and so is g_hat.)
    lines.append("ntau = -tau")
    # Level by level, finest first: details of width `width` sit at u[width : 2 * width].
    width, prefix = half, "d"
    approx = [f"a{i}" for i in range(half)]
    level = 0
    while True:
        for i in range(width):
            # clamp: a NaN detail propagates (second operand); a NaN tau is handled below
            lines.append(f"gh = ffma(smin(tau, smax(ntau, {prefix}{i})), nu{width + i}, gh)")
        if width == 1:
            # A NaN tau (inf details make E_f / E = inf / inf) turns torch's clamps NaN.
            lines.append("gh = gh if tau == tau else tau")
            return lines
        width //= 2
        level += 1
        prefix = f"l{level}d"
        new_approx = []
        for i in range(width):
            lines.append(f"{prefix}{i} = ({approx[2 * i]} - {approx[2 * i + 1]}) * SQH")
            if width > 1:
                lines.append(f"l{level}a{i} = ({approx[2 * i]} + {approx[2 * i + 1]}) * SQH")
                new_approx.append(f"l{level}a{i}")
        approx = new_approx


def _adam_update_lines(pkind: str, amsgrad: bool) -> list[str]:
    """Element code: ``gh`` (the update's gradient, opmath) -> new p, m, v written back.

    The order and the rounding points are those of torch's single-tensor Adam
    (``torch.optim.adam._single_tensor_adam``): for a 16-bit parameter each tensor op rounds
    its result to the parameter's dtype, here by a round trip. Options that are off select
    the untouched value, so that they cost no compiled variant and change no number.
    """
    c = compute_of(pkind)
    R = lambda x: _round(pkind, c, x)  # noqa: E731
    lines = [f"p = {_load(pkind, c, 'P[e]')}"]
    lines.append(f"gh = {R('ffma(p, wd, gh)')} if l2 else gh")
    lines.append(f"p = {R('p * keep')} if decoupled else p")
    lines.append(f"m = {_load(pkind, c, 'M[e]')}")
    # torch's lerp: self + w * (end - self) for w < 0.5, else end + (w - 1) * (end - self).
    lines.append(f"m = {R('ffma(lw, gh - m, m)')} if lerp_small else {R('ffma(lwm1, gh - m, gh)')}")
    lines.append(f"v = {R('ffma(c2 * gh, gh, ' + R(_load(pkind, c, 'V[e]') + ' * beta2') + ')')}")
    lines.append("vd = v")
    if amsgrad:
        lines.append(f"vd = fmax({_load(pkind, c, 'VM[e]')}, v)")
    lines.append(f"den = {R(R(R('math.sqrt(vd)') + ' / bc') + ' + eps')}")
    # addcdiv: self + value * t1 / t2, evaluated left to right as in ATen's kernel
    lines.append(f"pn = {_store(pkind, c, 'p + nss * m / den')}")
    lines.append(f"M[e] = {_store(pkind, c, 'm')}")  # stores last (see generate)
    lines.append(f"V[e] = {_store(pkind, c, 'v')}")
    if amsgrad:
        lines.append(f"VM[e] = {_store(pkind, c, 'vd')}")
    lines.append("P[e] = pn")
    return lines


def _sgd_update_lines(pkind: str, momentum: bool) -> list[str]:
    """Element code for torch's single-tensor SGD (``torch.optim.sgd._single_tensor_sgd``)."""
    c = compute_of(pkind)
    R = lambda x: _round(pkind, c, x)  # noqa: E731
    lines = [f"p = {_load(pkind, c, 'P[e]')}"]
    lines.append(f"gh = {R('ffma(p, wd, gh)')} if l2 else gh")
    if momentum:
        # Loaded unconditionally (a fresh buffer holds garbage that is then not used), so that
        # the select below needs no branch and the loop still vectorizes.
        lines.append(f"old = {_load(pkind, c, 'B[e]')}")
        lines.append(f"buf = gh if is_first else {R('ffma(gh, damp, ' + R('old * mom') + ')')}")
        lines.append(f"B[e] = {_store(pkind, c, 'buf')}")
        lines.append(f"gh = {R('ffma(buf, nmom, gh)')} if nesterov else buf")
    lines.append(f"P[e] = {_store(pkind, c, 'ffma(gh, nlr, p)')}")
    return lines


_NAME = re.compile(r"\b[A-Za-z_]\w*\b")


def _single_assignment(lines: list[str], tag: str) -> list[str]:
    """Rename straight-line ``target = expr`` lines so that every name is assigned once.

    numba's SSA reconstruction is quadratic in reassignments; code that is already in SSA
    form compiles several times faster (seconds instead of tens of seconds at N = 64).
    """
    version: dict[str, str] = {}
    out = []
    for number, line in enumerate(lines):
        target, expr = line.split(" = ", 1)
        expr = _NAME.sub(lambda m: version.get(m.group(0), m.group(0)), expr)
        if _NAME.fullmatch(target):
            version[target] = f"{target}_{tag}{number}"
            target = version[target]
        else:
            target = _NAME.sub(lambda m: version.get(m.group(0), m.group(0)), target)
        out.append(f"{target} = {expr}")
    return out


def generate(algo: str, n: int, pkind: str, skind: str, with_state: bool) -> str:
    """The source of one kernel module: ``chunk`` (the element loops) and ``run`` (a range
    of chunks, called from one thread each).

    ``algo`` is ``"adam"`` (``with_state``: amsgrad, an extra max_exp_avg_sq column) or
    ``"sgd"`` (``with_state``: momentum != 0, a momentum buffer column). Every other option
    is a run-time scalar in ``sc``, so that a test suite or a sweep compiles few variants.
    """
    c = compute_of(pkind)
    if algo == "adam":
        update = _adam_update_lines(pkind, with_state)
        state = ["M", "V"] + (["VM"] if with_state else [])
        scalars = ["lw", "beta2", "c2", "eps", "wd", "keep", "l2", "decoupled", "lerp_small"]
    else:
        update = _sgd_update_lines(pkind, with_state)
        state = ["B"] if with_state else []
        scalars = ["wd", "mom", "damp", "nlr", "l2", "nesterov", "nmom"]
    flags = {"l2", "decoupled", "lerp_small", "nesterov"}

    out: list[str] = []
    emit = out.append
    emit(f"# Generated by waveguard_optim.kernels.cpu_numba: {algo}, N={n}, param {pkind}, history {skind}, {with_state}")
    emit("import math")
    emit("")
    emit("import numpy as np")
    emit("from numba import carray, njit")
    emit("")
    emit("from waveguard_optim.kernels.cpu_numba import (")
    emit("    bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16, ffma, fmax, ptr_f32, ptr_f64, ptr_u16, smax, smin,")
    emit(")")
    emit("")
    emit(f"ct = {_ctor(c)}")
    emit("")
    emit("")
    emit('@njit(nogil=True, cache=True, error_model="numpy", boundscheck=False)')
    emit("def chunk(row, off, ln, is_full, is_first, step_size, bc2_sqrt, wv, nuv, sc):")
    emit("    ginv = ct(sc[0])  # +-1 / grad_scale, a power of two: multiplying is dividing exactly")
    emit("    sgn = ct(sc[1])")
    emit("    tscale = ct(sc[2])")
    emit("    TINY = ct(sc[3])")
    emit("    threshold = sc[4] != 0")
    emit("    gate = sc[5] != 0")
    emit("    SQH = ct(0.7071067811865476)")
    emit("    HALF = ct(0.5)")
    emit("    ONE = ct(1.0)")
    for index, name in enumerate(scalars, start=6):
        emit(f"    {name} = sc[{index}] != 0" if name in flags else f"    {name} = ct(sc[{index}])")
    if algo == "adam":
        emit("    lwm1 = lw - ONE")
        emit("    nss = ct(-step_size)")
        emit("    bc = ct(bc2_sqrt)")
    for j in range(n):
        emit(f"    w{j} = ct(wv[{j}])")
    for i in range(1, n):
        emit(f"    nu{i} = ct(nuv[{i}])")
    psz, ssz = ITEMSIZE[pkind], ITEMSIZE[skind]
    emit(f"    P = carray({_POINTER[pkind]}(row[0] + off * {psz}), ln)")
    emit(f"    G = carray({_POINTER[pkind]}(row[1] + off * {psz}), ln)")
    for col, name in enumerate(state, start=2):
        emit(f"    {name} = carray({_POINTER[pkind]}(row[{col}] + off * {psz}), ln)")
    first_slot = 2 + len(state)
    for j in range(n):
        emit(f"    S{j} = carray({_POINTER[skind]}(row[{first_slot + j}] + off * {ssz}), ln)")

    head = [
        # g = grad / grad_scale in the parameter's dtype, negated under maximize (exact).
        f"g = {_round(pkind, c, _load(pkind, c, 'G[e]') + ' * ginv')}",
        f"s = {_store(skind, c, 'g')}",
    ]
    # Every store after every load: the N + 3 streams of a big tensor often share their
    # address bits below 4 KiB (page-aligned allocations), where a load behind a store to
    # the "same" low address waits for it (4K aliasing).
    record = [f"S{n - 1}[e] = s"]
    history = [f"h{j} = {_load(skind, c, f'S{j}[e]')}" for j in range(n - 1)] + [f"h{n - 1} = {_load(skind, c, 's')}"]
    to_param = [f"gh = {_round(pkind, c, 'gh')}"] if pkind != c else []  # g_hat in the parameter's dtype
    loops = [
        ("threshold and is_full", "t", head + history + _filter_lines(n, c, True) + to_param + update + record),
        ("is_full", "a", head + history + _filter_lines(n, c, False) + to_param + update + record),
        ("True", "w", head + ["gh = g"] + update + record),
    ]
    for number, (condition, tag, body) in enumerate(loops):
        emit(f"    {'if' if number == 0 else 'elif'} {condition}:" if condition != "True" else "    else:")
        emit("        for e in range(ln):")
        out.extend("            " + line for line in _single_assignment(body, tag))
    emit("")
    emit("")
    emit("@njit(nogil=True, cache=True)")
    emit("def run(ptrs, chunk_t, chunk_off, chunk_len, lo, hi, full, first, step_size, bc2_sqrt, wv, nuv, sc):")
    emit("    for k in range(lo, hi):")
    emit("        t = chunk_t[k]")
    emit("        chunk(ptrs[t], chunk_off[k], chunk_len[k], full[t] != 0, first[t] != 0, step_size[t], bc2_sqrt[t], wv, nuv, sc)")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------
# Writing, importing and caching the generated modules.

_LOCK = threading.Lock()
_LOADED: dict[tuple[Any, ...], Callable[..., None]] = {}


def cache_dir() -> Path:
    """Where generated kernels and numba's cache of them live.

    ``WAVEGUARD_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/waveguard_optim`` (``~/.cache``),
    else a folder in the temp dir when the home cache is not writable.
    """
    root = os.environ.get("WAVEGUARD_CACHE_DIR")
    if root:
        base = Path(root)
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "waveguard_optim"
    folder = base / f"numba-{numba.__version__}-py{sys.version_info[0]}{sys.version_info[1]}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError:
        folder = Path(tempfile.gettempdir()) / "waveguard_optim" / folder.name
        folder.mkdir(parents=True, exist_ok=True)
    return folder


def _own_digest() -> str:
    """Changes when this file changes, so a stale cached kernel is never picked up."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def get_kernel(algo: str, n: int, pkind: str, skind: str, with_state: bool) -> Callable[..., None]:
    """The ``run`` dispatcher of this variant, generated and imported on first use."""
    key = (algo, n, pkind, skind, with_state)
    kernel = _LOADED.get(key)
    if kernel is not None:
        return kernel
    with _LOCK:
        kernel = _LOADED.get(key)
        if kernel is None:
            source = generate(algo, n, pkind, skind, with_state)
            digest = hashlib.sha256((_own_digest() + source).encode()).hexdigest()[:16]
            name = f"wg_{algo}_n{n}_{pkind}_{skind}_{digest}"
            path = cache_dir() / f"{name}.py"
            if not path.exists():
                # Write once, atomically: numba's cache index is keyed on the file's mtime.
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(source)
                os.replace(tmp, path)
            module_name = f"_waveguard_cpu_{name}"
            spec = importlib.util.spec_from_file_location(module_name, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module  # numba's cache finds the kernel's globals by module name
            spec.loader.exec_module(module)
            kernel = module.run
            _LOADED[key] = kernel
    return kernel
