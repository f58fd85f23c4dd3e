"""The C half of the fused CPU step: a code generator that writes one single-pass C kernel
per (N, dtypes, switches such as amsgrad or the weight-decay mode), and the machinery that
compiles it with the system's C compiler, caches the shared library on disk and loads it
with :mod:`ctypes`.

Only :mod:`waveguard_optim.kernels.cpu_step` imports this module. A kernel is generated from
the *shape* of the constants (N, the median network of
:func:`waveguard_optim.filter.median_network`) and its switches (``OPTIONS``); the *values*
(the recency weights, ``u = Haar(w)``, the threshold factor, lr, betas, ...) come in as arrays
at run time, so all ``decay``/``threshold_scale``/``lr``/... share one compiled kernel, except
that ``decay = 0`` (the default) has its own variant (switch ``newest``): its weights have
zeros, and a term whose weight is exactly 0 must not be evaluated (SPEC section 3: 0 * inf
would be NaN), so only that variant's nonzero terms are emitted.

Why C: every tensor a kernel touches is a ``restrict`` pointer, so the compiler vectorizes
the element loop without run-time alias checks and keeps the whole filter in registers; the
loop then runs at the memory bandwidth that ``bench/step_time.py`` measures. The compiler
is ``$CC`` if set, else the first of ``cc``, ``gcc``, ``clang`` on the PATH; it builds for
the machine it runs on (``-march=native``) and with FMA contraction off
(``-ffp-contract=off``), so that every rounding is the one the source spells out.

``wg_run`` walks ranges of chunks (tensor, offset, length), one range per OpenMP thread
(see ``OPENMP``; built without OpenMP, the caller runs one range per Python thread, as
:mod:`ctypes` releases the GIL for the call). Per element it reads the gradient,
the N-1 older history slots and the optimizer state once, writes the newest slot, the state
and the parameter once, and keeps everything else in registers.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import math
import os
import platform
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from waveguard_optim._warnings import warn
from waveguard_optim.filter import filter_weights, median_network

T = TypeVar("T")

# ---------------------------------------------------------------------------------------
# Storage kinds: C types, and how to load, store and round-trip one element.

_CTYPE = {"f32": "float", "f64": "double", "bf16": "uint16_t", "f16": "uint16_t"}


def compute_of(kind: str) -> str:
    """Arithmetic type of a parameter kind: float64 for float64, float32 otherwise (SPEC section 3)."""
    return "f64" if kind == "f64" else "f32"


def _load(kind: str, compute: str, x: str) -> str:
    """Storage value ``x`` of ``kind`` as the compute type (f32 or f64)."""
    if kind in ("bf16", "f16"):
        as_f32 = f"{kind}_to_f32({x})"
        return f"(double){as_f32}" if compute == "f64" else as_f32
    return x if kind == compute else f"({_CTYPE[compute]})({x})"


def _store(kind: str, compute: str, x: str) -> str:
    """Compute-type value ``x`` as ``kind`` storage (round to nearest even).

    A float64 goes to a 16-bit type through float32, as c10 does.
    """
    if kind in ("bf16", "f16"):
        as_f32 = f"(float)({x})" if compute == "f64" else x
        return f"f32_to_{kind}({as_f32})"
    return x if kind == compute else f"({_CTYPE[kind]})({x})"


def _round(kind: str, compute: str, x: str) -> str:
    """``x`` rounded to ``kind`` and back: what a tensor of that dtype would hold."""
    return x if kind == compute else _load(kind, compute, _store(kind, compute, x))


# ---------------------------------------------------------------------------------------
# Element code, as (target, expression) statements in the order of the eager twin.

Statements = list[tuple[str, str]]

OPTIONS = {
    "adam": ("amsgrad", "l2", "decoupled", "lerp_small", "gate", "newest"),
    "sgd": ("momentum", "l2", "nesterov", "gate", "newest"),
}
"""The switches compiled into a kernel variant: a run-time flag would make the compiler
evaluate both sides of every select it controls (measured: a third slower)."""

SCALARS = {
    "adam": ("ginv", "tscale", "TINY", "threshold", "lw", "beta2", "c2", "eps", "wd", "keep"),
    "sgd": ("ginv", "tscale", "TINY", "threshold", "wd", "mom", "damp", "nlr", "nmom"),
}
"""The run-time scalars of a kernel, in the order of its ``sc`` array."""


def _filter_statements(n: int, threshold: bool, gate: bool, newest: bool) -> Statements:
    """``h0 .. h{n-1}`` (compute type) -> ``gh``, in the operation order of
    :func:`waveguard_optim.filter.fold_filter`. With ``newest`` only the terms whose weight is
    nonzero at decay 0 are emitted (the compiler drops the values no term reads)."""
    # The other variant evaluates every term: cpu_step gives it only weights that are all nonzero.
    w, u = filter_weights(n, 0.0) if newest else ([1.0] * n, [1.0] * n)
    used = [j for j in range(n) if w[j] != 0]
    out: Statements = [("gh", f"h{used[0]} * w{used[0]}")]
    out += [("gh", f"FMA(h{j}, w{j}, gh)") for j in used[1:]]  # _foreach_add_(out, b, alpha=w_j)
    if not threshold:
        return out
    half = n // 2
    for i in range(half):
        out.append((f"a{i}", f"(h{2 * i} + h{2 * i + 1}) * SQH"))
        out.append((f"d{i}", f"(h{2 * i} - h{2 * i + 1}) * SQH"))
    out += [(f"x{i}", f"ABS(d{i})") for i in range(half)]
    steps, middle = median_network(half)
    wire = [f"x{i}" for i in range(half)]
    for number, (lo, hi, need_min, need_max) in enumerate(steps):
        a, b = wire[lo], wire[hi]
        if need_min:
            wire[lo] = f"mn{number}"
            out.append((wire[lo], f"SMIN({a}, {b})"))
        if need_max:
            wire[hi] = f"mx{number}"
            out.append((wire[hi], f"SMAX({a}, {b})"))
    if len(middle) == 1:
        out.append(("tau", f"{wire[middle[0]]} * tscale"))
    else:
        out.append(("tau", f"(({wire[middle[0]]} + {wire[middle[1]]}) * HALF) * tscale"))
    if gate:
        # The energies of the coefficients times gate_scale(largest |coefficient|) (exact; no
        # square overflows), as filter._gate. A NaN among them makes the energies NaN whatever
        # the largest is taken to be.
        out.append(("big", "ABS(a0)"))
        out += [("big", f"SMAX(big, ABS(a{i}))") for i in range(1, half)]
        out += [("big", f"SMAX(big, x{i})") for i in range(half)]
        out.append(("gs", "GATE_SCALE(big)"))
        out += [(f"sa{i}", f"a{i} * gs") for i in range(half)] + [(f"sd{i}", f"d{i} * gs") for i in range(half)]
        out.append(("ef", "sd0 * sd0"))
        out += [("ef", f"FMA(sd{i}, sd{i}, ef)") for i in range(1, half)]  # _foreach_addcmul_
        out.append(("ec", "sa0 * sa0"))
        out += [("ec", f"FMA(sa{i}, sa{i}, ec)") for i in range(1, half)]
        out.append(("tot", "SMAX(TINY, ec + ef)"))  # clamp_min, NaN kept
        out.append(("tau", "tau * (ef / tot)"))
    # A NaN finest detail makes torch's median (NaN-propagating min/max) NaN, where this
    # network's need not be; their sum is NaN exactly then (the magnitudes are >= 0): checked
    # at the end together with tau, since that detail's own term may have u_i = 0 (decay 0).
    out.append(("xs", " + ".join(f"x{i}" for i in range(half))))
    out.append(("ntau", "-tau"))
    # Level by level, finest first: details of width `width` sit at u[width : 2 * width].
    width, prefix = half, "d"
    approx = [f"a{i}" for i in range(half)]
    level = 0
    while True:
        for i in range(width):
            # clamp: a NaN detail propagates (second operand); a NaN tau is handled below
            if u[width + i] != 0:
                out.append(("gh", f"FMA(SMIN(tau, SMAX(ntau, {prefix}{i})), nu{width + i}, gh)"))
        if width == 1:
            # A NaN tau (inf details make E_f / E = inf / inf; a NaN finest detail torch's
            # median) turns torch's clamps NaN.
            out.append(("chk", "tau + xs"))
            out.append(("gh", "(chk == chk ? gh : chk)"))
            return out
        width //= 2
        level += 1
        prefix = f"l{level}d"
        new_approx = []
        for i in range(width):
            out.append((f"{prefix}{i}", f"({approx[2 * i]} - {approx[2 * i + 1]}) * SQH"))
            if width > 1:
                out.append((f"l{level}a{i}", f"({approx[2 * i]} + {approx[2 * i + 1]}) * SQH"))
                new_approx.append(f"l{level}a{i}")
        approx = new_approx


def _param_and_l2(pkind: str, on: frozenset[str]) -> Statements:
    """How both updates start: load p; L2 weight decay adds ``wd * p`` to the gradient
    (``grad.add(param, alpha=weight_decay)``, rounded as a tensor of the parameter's dtype)."""
    c = compute_of(pkind)
    out: Statements = [("p", _load(pkind, c, "P[e]"))]
    if "l2" in on:
        out.append(("gh", _round(pkind, c, "FMA(p, wd, gh)")))
    return out


def _adam_update_statements(pkind: str, on: frozenset[str]) -> Statements:
    """``gh`` (the update's gradient, opmath) -> new p, m, v written back.

    The order and the rounding points are those of torch's single-tensor Adam
    (``torch.optim.adam._single_tensor_adam``): for a 16-bit parameter each tensor op rounds
    its result to the parameter's dtype, here by a round trip.
    """
    c = compute_of(pkind)
    R = functools.partial(_round, pkind, c)
    out = _param_and_l2(pkind, on)
    if "decoupled" in on:
        out.append(("p", R("p * keep")))
    out.append(("m", _load(pkind, c, "M[e]")))
    # torch's lerp: self + w * (end - self) for w < 0.5, else end + (w - 1) * (end - self).
    out.append(("m", R("FMA(lw, gh - m, m)") if "lerp_small" in on else R("FMA(lw - (ct)1, gh - m, gh)")))
    out.append(("v", R(f"FMA(c2 * gh, gh, {R(_load(pkind, c, 'V[e]') + ' * beta2')})")))
    out.append(("vd", f"FMAX({_load(pkind, c, 'VM[e]')}, v)" if "amsgrad" in on else "v"))
    out.append(("den", R(R(R("SQRT(vd)") + " / bc") + " + eps")))
    # addcdiv: self + value * t1 / t2, evaluated left to right as in ATen's kernel
    out.append(("pn", _store(pkind, c, "p + nss * m / den")))
    out.append(("M[e]", _store(pkind, c, "m")))  # stores last (see generate)
    out.append(("V[e]", _store(pkind, c, "v")))
    if "amsgrad" in on:
        out.append(("VM[e]", _store(pkind, c, "vd")))
    out.append(("P[e]", "pn"))
    return out


def _sgd_update_statements(pkind: str, on: frozenset[str]) -> Statements:
    """The element code of torch's single-tensor SGD (``torch.optim.sgd._single_tensor_sgd``)."""
    c = compute_of(pkind)
    R = functools.partial(_round, pkind, c)
    out = _param_and_l2(pkind, on)
    if "momentum" in on:
        # Loaded unconditionally (a fresh buffer holds garbage that is then not used), so that
        # the select on the tensor's first step needs no branch.
        out.append(("old", _load(pkind, c, "B[e]")))
        decayed = R("old * mom")
        out.append(("buf", f"(is_first ? gh : {R(f'FMA(gh, damp, {decayed})')})"))
        out.append(("B[e]", _store(pkind, c, "buf")))
        out.append(("gh", R("FMA(buf, nmom, gh)") if "nesterov" in on else "buf"))
    out.append(("P[e]", _store(pkind, c, "FMA(gh, nlr, p)")))
    return out


def _emit(statements: Statements, types: dict[str, str], indent: str) -> list[str]:
    """C lines: the first assignment of a name declares it (``ct`` unless ``types`` says otherwise)."""
    declared: set[str] = set()
    lines = []
    for target, expr in statements:
        if target.isidentifier() and target not in declared:
            declared.add(target)
            lines.append(f"{indent}{types.get(target, 'ct')} {target} = {expr};")
        else:
            lines.append(f"{indent}{target} = {expr};")
    return lines


_PRELUDE = """\
#include <math.h>
#include <stdint.h>
#include <string.h>

/* ``a < b ? a : b`` and ``a > b ? a : b``: one vminps / vmaxps each. They return ``b`` when
   either is NaN; the filter puts the operand whose NaN must propagate second. */
#define SMIN(a, b) ((a) < (b) ? (a) : (b))
#define SMAX(a, b) ((a) > (b) ? (a) : (b))
/* NaN-propagating, like torch.maximum: amsgrad's max. */
#define FMAX(a, b) (((a) > (b) || (a) != (a)) ? (a) : (b))

static inline float bf16_to_f32(uint16_t bits) {  /* exact */
    uint32_t u = (uint32_t)bits << 16;
    float x;
    memcpy(&x, &u, 4);
    return x;
}

/* Adam's step counts: increment each (float32 or float64 scalars, as torch's _foreach_add_), then
   step_size = lr / (1 - beta1^step) and bc2_sqrt = (1 - beta2^step)^0.5 with libm's pow, as
   torch's single-tensor Adam computes them in Python (whose float ** is that pow). */
void wg_steps(const int64_t *steps, int64_t count, int f64, double lr, double beta1, double beta2,
              double *step_size, double *bc2_sqrt) {
    for (int64_t t = 0; t < count; t++) {
        double step;
        if (f64) {
            double *s = (double *)steps[t];
            step = *s = *s + 1.0;
        } else {
            float *s = (float *)steps[t];
            step = *s = *s + 1.0f;
        }
        step_size[t] = lr / (1.0 - pow(beta1, step));
        bc2_sqrt[t] = pow(1.0 - pow(beta2, step), 0.5);
    }
}

static inline uint16_t f32_to_bf16(float x) {  /* round to nearest even, NaN -> 0x7FC0 (as c10::BFloat16) */
    uint32_t u;
    memcpy(&u, &x, 4);
    uint16_t rounded = (uint16_t)((u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16);
    return x != x ? (uint16_t)0x7FC0 : rounded;
}
"""

_F16 = """
static inline float f16_to_f32(uint16_t bits) {  /* exact */
    _Float16 h;
    memcpy(&h, &bits, 2);
    return (float)h;
}

static inline uint16_t f32_to_f16(float x) {  /* round to nearest even (as c10::Half) */
    _Float16 h = (_Float16)x;
    uint16_t bits;
    memcpy(&bits, &h, 2);
    return bits;
}
"""


_GATE_SCALE = """
static inline {ct} gate_scale_{kind}({ct} m) {{
    {ut} bits;
    memcpy(&bits, &m, sizeof bits);
    {it} k = {twice_bias} - ({it})(bits >> {mantissa});
    bits = ({ut})(k > 1 ? k : 1) << {mantissa};
    {ct} s;
    memcpy(&s, &bits, sizeof s);
    return s;
}}
"""
_GATE_SCALES = """
/* The SNR gate's power of two for a largest magnitude m >= 0 (waveguard_optim.reference.gate_scale):
   2^k with m * 2^k in [1, 2), k clamped to a normal number; from the exponent bits, so it vectorizes. */""" + "".join(
    _GATE_SCALE.format(kind=kind, ct=ct, ut=f"uint{bits}_t", it=f"int{bits}_t", twice_bias=2 * bias, mantissa=mantissa)
    for kind, ct, bits, bias, mantissa in (("f32", "float", 32, 127, 23), ("f64", "double", 64, 1023, 52))
)

_ENTRY_POINTS = """
/* Chunk ranges [edges[i], edges[i + 1]) for i < nranges, one thread each: OpenMP's threads when
   compiled with it (the process's OpenMP runtime: torch's own pool), else one after another. */
void wg_run(const int64_t *edges, int64_t nranges, const int64_t *ptrs, const int64_t *chunk_t, const int64_t *chunk_off,
            const int64_t *chunk_len, const uint8_t *full, const uint8_t *first, const double *step_size,
            const double *bc2_sqrt, const double *wv, const double *nuv, const double *sc) {
    #pragma omp parallel for num_threads(nranges) schedule(static, 1)
    for (int64_t i = 0; i < nranges; i++)
        run_range(edges[i], edges[i + 1], ptrs, chunk_t, chunk_off, chunk_len, full, first, step_size, bc2_sqrt, wv, nuv, sc);
}

int wg_parallel(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
"""


def generate(algo: str, n: int, pkind: str, skind: str, options: tuple[str, ...]) -> str:
    """The C source of one kernel: ``chunk`` (the element loops), ``run_range`` (a range of
    chunks) and the exported ``wg_run`` (ranges in parallel), ``wg_parallel`` and ``wg_steps``.

    ``algo`` is ``"adam"`` or ``"sgd"``; ``options`` are the names from ``OPTIONS[algo]``
    that are on (``amsgrad`` adds a max_exp_avg_sq column, ``momentum`` a momentum buffer
    column). Every value (lr, betas, the filter's weights, ...) is a run-time scalar.
    """
    on = frozenset(options)
    c = compute_of(pkind)
    if algo == "adam":
        update = _adam_update_statements(pkind, on)
        state = ["M", "V"] + (["VM"] if "amsgrad" in on else [])
    else:
        update = _sgd_update_statements(pkind, on)
        state = ["B"] if "momentum" in on else []
    pt, st = _CTYPE[pkind], _CTYPE[skind]

    out = [f"/* Generated by waveguard_optim.kernels.cpu_c: {algo}, N={n}, param {pkind}, history {skind}, {sorted(on)} */"]
    out.append(_PRELUDE + _GATE_SCALES + (_F16 if "f16" in (pkind, skind) else ""))
    out.append(f"typedef {_CTYPE[c]} ct;")
    suffix = "" if c == "f64" else "f"
    out += [f"#define FMA fma{suffix}", f"#define SQRT sqrt{suffix}", f"#define ABS fabs{suffix}", f"#define GATE_SCALE gate_scale_{c}", ""]

    columns = [("P", pt, True), ("G", pt, False)] + [(name, pt, True) for name in state]
    columns += [(f"S{j}", st, j == n - 1) for j in range(n)]
    pointers = ", ".join(f"{'' if written else 'const '}{ctype} *restrict {name}" for name, ctype, written in columns)
    out.append("static inline void chunk(int64_t ln, int is_full, int is_first, double step_size, double bc2_sqrt,")
    out.append(f"                         const double *wv, const double *nuv, const double *sc, {pointers}) {{")
    # ginv = +-1 / grad_scale, a power of two: multiplying is dividing exactly.
    body: Statements = [(name, f"(ct)sc[{k}]") for k, name in enumerate(SCALARS[algo]) if name != "threshold"]
    body += [("SQH", "(ct)0.7071067811865476"), ("HALF", "(ct)0.5"), ("nss", "(ct)(-step_size)"), ("bc", "(ct)bc2_sqrt")]
    body += [(f"w{j}", f"(ct)wv[{j}]") for j in range(n)]
    body += [(f"nu{i}", f"(ct)nuv[{i}]") for i in range(1, n)]
    out += _emit(body, {name: "const ct" for name, _ in body}, "    ")
    out.append(f"    const int threshold = sc[{SCALARS[algo].index('threshold')}] != 0;")

    head: Statements = [
        # g = grad / grad_scale in the parameter's dtype, negated under maximize (exact).
        ("g", _round(pkind, c, _load(pkind, c, "G[e]") + " * ginv")),
        ("s", _store(skind, c, "g")),
    ]
    # Every store after every load: the N + 3 streams of a big tensor often share their
    # address bits below 4 KiB (page-aligned allocations), where a load behind a store to
    # the "same" low address waits for it (4K aliasing).
    record: Statements = [(f"S{n - 1}[e]", "s")]
    history: Statements = [(f"h{j}", _load(skind, c, f"S{j}[e]")) for j in range(n - 1)]
    history.append((f"h{n - 1}", _load(skind, c, "s")))
    to_param: Statements = [("gh", _round(pkind, c, "gh"))] if pkind != c else []  # g_hat in the parameter's dtype
    loops = [
        ("threshold && is_full", history + _filter_statements(n, True, "gate" in on, "newest" in on) + to_param),
        ("is_full", history + _filter_statements(n, False, False, "newest" in on) + to_param),
        (None, [("gh", "g")]),
    ]
    element_types = {"s": st, "pn": pt}
    for number, (condition, statements) in enumerate(loops):
        opening = "if" if number == 0 else "} else if"
        out.append(f"    {opening} ({condition}) {{" if condition else "    } else {")
        out.append("        for (int64_t e = 0; e < ln; e++) {")
        out += _emit(head + statements + update + record, element_types, "            ")
        out.append("        }")
    out += ["    }", "}", ""]

    args = ", ".join(f"({'' if written else 'const '}{ctype} *)r[{k}] + o" for k, (_, ctype, written) in enumerate(columns))
    out.append("static void run_range(int64_t lo, int64_t hi, const int64_t *ptrs, const int64_t *chunk_t, const int64_t *chunk_off,")
    out.append("                      const int64_t *chunk_len, const uint8_t *full, const uint8_t *first, const double *step_size,")
    out.append("                      const double *bc2_sqrt, const double *wv, const double *nuv, const double *sc) {")
    out.append("    for (int64_t k = lo; k < hi; k++) {")
    out.append("        const int64_t t = chunk_t[k], o = chunk_off[k];")
    out.append(f"        const int64_t *r = ptrs + {len(columns)} * t;")
    out.append(f"        chunk(chunk_len[k], full[t] != 0, first[t] != 0, step_size[t], bc2_sqrt[t], wv, nuv, sc, {args});")
    out.append("    }")
    out.append("}")
    out.append(_ENTRY_POINTS)
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------
# Compiling, caching and loading.

FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared")
"""``-ffp-contract=off``: no FMA the source does not ask for (the twin's roundings).
``-fno-math-errno``: ``sqrt`` is one instruction. ``-fno-trapping-math``: selects may compute
both sides (no FP exception is ever observed)."""

OPENMP = "-fopenmp"
"""Tried first. The library then needs ``libgomp.so.1``, which torch has already loaded: the
kernel's threads are torch's own intra-op pool. (Threads of a second pool would compete with
torch's, whose workers spin for a while after each parallel region: measured a fifth slower
right after a torch op on 2 cores.) A compiler without OpenMP builds a serial ``wg_run``."""

_RUN_ARGS = [ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 11
_STEPS_ARGS = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double, ctypes.c_double, ctypes.c_double]
_STEPS_ARGS += [ctypes.c_void_p] * 2


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A loaded variant: ``run`` is ``wg_run``, ``steps`` is ``wg_steps``; ``parallel`` says
    whether ``run`` runs its ranges on OpenMP threads (else the caller runs one range per thread
    of its own); ``fd`` is the sealed memory file it was loaded from, kept open (see ``_dlopen``), or -1."""

    run: Any
    steps: Any
    parallel: bool
    fd: int


def find_compiler() -> str | None:
    """``$CC`` if set (a command line: ``ccache gcc`` works), else the first of cc, gcc, clang on
    the PATH; None when there is none."""
    return _find_compiler(os.environ.get("CC"), os.environ.get("PATH"))


@functools.lru_cache(maxsize=8)
def _find_compiler(cc: str | None, path: str | None) -> str | None:
    if cc:
        return cc
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name, path=path)
        if found:
            return found
    return None


@functools.lru_cache(maxsize=None)
def _toolchain_id(compiler: str) -> str:
    """What a compiled kernel depends on besides its source: the compiler and the CPU."""
    try:
        version = _run([*shlex.split(compiler), "--version"], min(30.0, _cc_timeout()))[1]
    except (OSError, TimeoutError):
        version = ""
    cpu = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu += "".join(sorted({line for line in f if line.startswith(("model name", "flags"))}))
    except OSError:
        pass
    return "\n".join([compiler, version, cpu, " ".join(FLAGS), OPENMP])


CC_TIMEOUT = 120.0
"""Seconds a compiler run may take (``$WAVEGUARD_CC_TIMEOUT`` overrides): a hung compiler must
not block ``opt.step()`` forever (the build holds the module lock)."""

STALE_BUILD_AGE = 3600.0
"""Seconds after which a leftover build folder is removed even if its pid still runs (reused)."""

_warned_cache: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned_cache:
        _warned_cache.add(message)
        warn(message)


def _cc_timeout() -> float:
    value = os.environ.get("WAVEGUARD_CC_TIMEOUT")
    if not value:
        return CC_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"Invalid WAVEGUARD_CC_TIMEOUT: {value!r} (expected a finite number of seconds > 0)")
    return seconds


# --- Which folders and files the cache trusts -------------------------------------------
# Threat model: another local user must not get code into this process. Whatever they can
# rename, replace or write (a folder of theirs, or one writable by them anywhere on the path,
# a symlink of theirs) is not trusted, and what is loaded is the bytes that were checked.

_POSIX = hasattr(os, "geteuid")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_MAX_SYMLINKS = 40  # as Linux's path lookup


def _private(info: os.stat_result) -> bool:
    """Owned by this process's user and writable by nobody else: what the cache trusts. (Without
    POSIX users, Windows, every file counts as private.)"""
    if not _POSIX:
        return True
    return info.st_uid == os.geteuid() and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _trusted_above(info: os.stat_result) -> bool:
    """A folder on the way to the cache: this user's or root's, and writable by no one else
    unless it is root's and sticky (``/tmp``: others cannot rename or remove what is ours there)."""
    if info.st_uid not in (os.geteuid(), 0):
        return False
    return not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or (info.st_uid == 0 and bool(info.st_mode & stat.S_ISVTX))


def _trusted_path(folder: Path) -> Path | None:
    """``folder`` with its symlinks resolved, when no other user can change what it names; else
    None. Judged as ssh judges a key file's folders: walked from ``/`` with ``lstat``, every folder
    is ``_trusted_above``, every symlink followed is this user's or root's, and the last folder
    is ``_private``. Missing folders are created (0700) on the way, each once its parent passed."""
    if not _POSIX:
        return folder
    text = os.fspath(folder)
    pending = os.path.join(os.getcwd(), text).split("/")[::-1]  # a stack: next component last
    resolved, hops = "/", 0
    if not _trusted_above(os.lstat("/")):
        return None
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            resolved = os.path.dirname(resolved)
            continue
        candidate = os.path.join(resolved, part)
        try:
            info = os.lstat(candidate)
        except FileNotFoundError:  # made here, in a folder already judged: nothing is made elsewhere
            with contextlib.suppress(FileExistsError):  # another process made it first
                os.mkdir(candidate, 0o700)
            info = os.lstat(candidate)
        if stat.S_ISLNK(info.st_mode):
            hops += 1
            if hops > _MAX_SYMLINKS or info.st_uid not in (os.geteuid(), 0):
                return None
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = "/"
            pending += target.split("/")[::-1]
            continue
        if not (stat.S_ISDIR(info.st_mode) and _trusted_above(info)):
            return None
        resolved = candidate
    return Path(resolved) if _private(os.lstat(resolved)) else None


def _private_folder(folder: Path) -> Path | None:
    """Create ``folder`` (mode 0700) if needed; its resolved path when it is a trusted private
    folder we can write (``_trusted_path``), else None."""
    try:
        real = _trusted_path(folder)
        if real is None:
            return None
        probe = real / f".probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError:
        return None
    return real


def cache_dir() -> Path:
    """Where compiled kernels live: a folder private to this user (created 0700), on a path no
    other user can change (``_trusted_path``), since the libraries in it are loaded into the process.

    ``WAVEGUARD_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/waveguard_optim`` (``~/.cache``).
    When that is not usable: a fresh folder of this process (``mkdtemp``: an unpredictable name,
    mode 0700, removed at exit), warned once. A predictable shared name (``/tmp/<name>-<uid>``)
    is never used: another user could make it first.
    """
    root = os.environ.get("WAVEGUARD_CACHE_DIR")
    if root:
        base = Path(root)
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "waveguard_optim"
    wanted = base / f"c-{platform.system().lower()}-{platform.machine()}"
    return _private_folder(wanted) or _fresh_folder(wanted)


@functools.lru_cache(maxsize=None)
def _fresh_folder(wanted: Path) -> Path:
    """One fresh private folder per process, for when the configured cache folder is not usable."""
    folder = Path(tempfile.mkdtemp(prefix="waveguard_optim-"))
    real = _trusted_path(folder)
    if real is None:
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(f"no private folder for the kernel cache: {wanted} is not one, nor is the temp dir {folder.parent} safe from other users")
    owner = os.getpid()
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(real, ignore_errors=True))
    _warn_once(f"kernel cache {wanted} is not a private writable folder on a path only this user can change; using {real} for this process")
    return real


def _run(command: list[str], timeout: float) -> tuple[int, str]:
    """``(exit status, output)`` of a compiler run; on timeout its whole process group is
    killed (a compiler's children would otherwise keep its pipes open) and TimeoutError raised."""
    posix = hasattr(os, "killpg")
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=posix
    ) as proc:
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            if posix:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
            proc.communicate()
            raise TimeoutError(f"the C compiler did not finish within {timeout:g} s (WAVEGUARD_CC_TIMEOUT sets the limit): {command[0]}") from None
    return proc.returncode, output


def _checksum_path(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _digest(data: bytes) -> str:
    return f"{len(data)} {hashlib.sha256(data).hexdigest()}"


def _read_private(path: Path) -> bytes | None:
    """The bytes of ``path`` when it is a regular file private to this user (``_private``), read
    from the one descriptor whose owner and mode were checked, opened without following a
    symlink; None otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not (stat.S_ISREG(info.st_mode) and _private(info)):
            return None
        return f.read()


def _verified_bytes(library: Path) -> bytes | None:
    """The bytes of a cache entry when they are private and have the size and sha256 written next
    to them at build time, else None. Read (not mapped), so a truncated or damaged file costs a
    rebuild, not a SIGBUS or SIGILL inside ``dlopen``."""
    data, expected = _read_private(library), _read_private(_checksum_path(library))
    if data is None or expected is None or _digest(data) != expected.decode(errors="replace").strip():
        return None
    return data


def _dlopen(data: bytes, path: Path, kind: type[ctypes.CDLL] = ctypes.CDLL) -> tuple[ctypes.CDLL, int]:
    """``(library, descriptor)``: the library ``data``, loaded as ``kind`` (``ctypes.PyDLL`` for
    one whose functions use the Python C API: they are called holding the GIL) from a sealed memory file, so that
    what runs is exactly the bytes that were checked (a file on disk could be swapped between
    the check and ``dlopen``). The descriptor must stay open: ``dlopen`` returns a library already
    loaded under the same name, and ``/proc/self/fd/N`` names another file once N is reused.
    Where there are no memory files (not Linux), ``path`` itself is loaded: its folders are
    trusted (``_trusted_path``), so no other user can swap it."""
    if not hasattr(os, "memfd_create"):
        return kind(str(path)), -1
    import fcntl  # POSIX only, as memfd_create

    fd = os.memfd_create(path.name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        with open(fd, "wb", closefd=False) as f:
            f.write(data)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
        return kind(f"/proc/self/fd/{fd}"), fd
    except BaseException:
        os.close(fd)
        raise


def _load_kernel(data: bytes, path: Path) -> Kernel:
    """The kernel in the library bytes ``data``; OSError or AttributeError when they do not load
    or lack its entry points (a compiler that exited 0 but wrote something else)."""
    library, fd = _dlopen(data, path)
    library.wg_run.argtypes, library.wg_run.restype = _RUN_ARGS, None
    library.wg_steps.argtypes, library.wg_steps.restype = _STEPS_ARGS, None
    return Kernel(library.wg_run, library.wg_steps, bool(library.wg_parallel()), fd)


def _load_entry(library: Path) -> Kernel | None:
    """The cached kernel ``library`` when it is intact (``_verified_bytes``) and loads; None
    means: build it (again)."""
    data = _verified_bytes(library)
    if data is None:
        return None
    try:
        return _load_kernel(data, library)
    except (OSError, AttributeError):
        return None


def _remove_stale_builds(folder: Path) -> None:
    """Remove the build folders (``build-<pid>-*``) of builds that died: their pid is gone, or
    they are older than ``STALE_BUILD_AGE``."""
    for entry in folder.glob("build-*-*"):
        try:
            pid = int(entry.name.split("-")[1])
            age = time.time() - entry.stat().st_mtime
        except (ValueError, OSError):
            continue
        if pid != os.getpid() and (age > STALE_BUILD_AGE or not _alive(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, another user's (PermissionError), or no way to tell
        return True
    return True


def _build(source: str, target: Path, compiler: str) -> Kernel:
    """Compile the kernel ``source`` into ``target`` (with OpenMP if the compiler has it): see
    :func:`build_library`. Returns the kernel loaded from the bytes published."""
    commands = [[*shlex.split(compiler), *FLAGS, *extra] for extra in ([OPENMP], [])]
    return build_library(source, target, "kernel.c", commands, _load_kernel, "the C compiler")


def build_library(source: str, target: Path, source_name: str, commands: list[list[str]], load: Callable[[bytes, Path], T], tool: str, libraries: tuple[str, ...] = ()) -> T:
    """Compile ``source`` (written as ``source_name``) into the shared library ``target`` with the
    first of ``commands`` (each is completed with ``<source> -o <library> *libraries``: a linker
    keeps only the libraries named after what uses them) that succeeds and
    whose library ``load(bytes, path)`` accepts (OSError or AttributeError: it does not), and only
    then publish it, atomically: a concurrent process either sees no file or a whole one that
    loads. Its size and sha256 go next to it (``<name>.sha256``, also replaced atomically), for
    ``_verified_bytes``. Returns what ``load`` made of the bytes published; RuntimeError (naming
    ``tool``) when no command builds it in time."""
    _remove_stale_builds(target.parent)
    timeout = _cc_timeout()
    tmp = Path(tempfile.mkdtemp(prefix=f"build-{os.getpid()}-", dir=target.parent))
    output = ""
    try:
        source_file, library = tmp / source_name, tmp / target.name
        source_file.write_text(source)
        for command in commands:
            try:
                status, output = _run([*command, str(source_file), "-o", str(library), *libraries], timeout)
            except TimeoutError as err:
                raise RuntimeError(str(err)) from None
            except OSError as err:
                raise RuntimeError(f"cannot run {tool} {command[0]}: {err.strerror or err}") from None
            if status != 0:
                continue
            data = _read_private(library)
            try:
                if data is None:
                    raise OSError("it wrote no private regular file")
                loaded = load(data, library)
            except (OSError, AttributeError) as err:
                output = f"it exited 0, but its library does not load ({err})"
                continue
            checksum = tmp / "checksum"
            checksum.write_text(_digest(data) + "\n")
            os.replace(library, target)
            os.replace(checksum, _checksum_path(target))
            return loaded
        raise RuntimeError(f"{commands[0][0]} failed to compile {target.stem}: {output.strip()[:2000]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_LOCK = threading.Lock()
_LOADED: dict[tuple[Any, ...], Kernel] = {}


def get_kernel(algo: str, n: int, pkind: str, skind: str, options: tuple[str, ...]) -> Kernel:
    """This variant, compiled on first use and loaded from the disk cache afterwards (after
    checking the cached bytes: see ``_verified_bytes``; a damaged, foreign or unloadable entry is
    rebuilt). Raises ``RuntimeError`` when there is no C compiler or it cannot build the variant
    in time, ``ValueError`` for an invalid ``$WAVEGUARD_CC_TIMEOUT``."""
    key = (algo, n, pkind, skind, options)
    kernel = _LOADED.get(key)
    if kernel is not None:
        return kernel
    with _LOCK:
        kernel = _LOADED.get(key)
        if kernel is None:
            compiler = find_compiler()
            if compiler is None:
                raise RuntimeError("no C compiler found (set CC, or install cc, gcc or clang)")
            _cc_timeout()
            source = generate(algo, n, pkind, skind, options)
            digest = hashlib.sha256((_toolchain_id(compiler) + source).encode()).hexdigest()[:16]
            suffix = ".dll" if sys.platform == "win32" else ".so"
            variant = "-".join(options) or "plain"
            path = cache_dir() / f"wg_{algo}_n{n}_{pkind}_{skind}_{variant}_{digest}{suffix}"
            kernel = _LOADED[key] = _load_entry(path) or _build(source, path, compiler)
    return kernel
