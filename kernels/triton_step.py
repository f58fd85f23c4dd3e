"""The fused WaveAdam / WaveSGD step as Triton kernels (SPEC sections 3-5).

One launch does, per element: record the gradient into the newest history slot, the
folded WaveGuard filter over the N slots (or the raw gradient during warm-up), and
torch's Adam or SGD update on the result. Its pure-torch twin is
:func:`waveguard_optim.denoise.record_and_filter` followed by torch's functional
``adam`` / ``sgd``; ``tests/test_fused_triton.py`` compares the two.

Launch structure. A step touches, per parameter, 4 to 6 state tensors plus N history
slots, and real models have hundreds of small parameters, so there is one launch per
*group* of parameters sharing dtypes and buffer size (normally one per param group), never
one per tensor:

* a ``table`` (int64, one row per tensor) holds ``numel`` and the raw addresses of the
  parameter, gradient, states, ring count and slots; the kernel turns them into typed pointers
  (``int64 -> tl.pointer_type``), as Triton's grouped-GEMM tutorial does. This works
  under ``TRITON_INTERPRET=1`` (which dereferences host addresses) and on CUDA, and it
  needs no packing or copying of the slots, which must stay separate parameter-shaped
  tensors (SPEC section 4).
* a ``blocks`` table (int32 pairs ``(row, chunk)``, one per program, cached per set of
  sizes) maps the 1-D grid onto the tensors, like torch's ``multi_tensor_apply``.
* ``hyper`` (float64): lr, betas, eps, weight decay ... read on the device, so tensor
  hyperparameters need no host sync (no ``.item()``), and the bias corrections are
  computed per program in float64 from the device-side ``step``, as torch computes them
  in Python floats, then rounded once to the compute dtype.
* the ring is read on the device: from a row's ``wave_count`` the kernel finds the newest
  slot and whether the history is full, so warm-up and full histories share one launch and
  one compiled variant, and the host decides nothing per step. A planned step's counts are
  the plan's (a device copy of them on a GPU, kernels/plan.py); the full step points the
  count column at counts that reproduce the ``histories`` / ``full`` it was given.

Small host tensors (tables, hyper) reach the GPU through pinned memory, asynchronously. A
planned step (kernels/plan.py) keeps its table and hyperparameters on the device and copies
them again only when an address or a float value changed; with the steps and counts on the
device (``fused=True`` / ``capturable=True``) and GradScaler's ``found_inf`` read by the
kernel, such a step makes no host-to-device copy and no host sync: it can be captured in a
CUDA graph (``tests/test_fused_triton.py::test_captured_step_replays_as_eager``, GPU only).

Memory access. Each program issues all its global loads first and its stores last (the
compiler must assume the table's tensors may overlap, so a load after a store would wait
for it). Addresses from the table carry no alignment facts, so the loads are scalar unless
the host finds every elementwise address of the launch 16-byte aligned and every size a
multiple of ``VEC`` (:func:`_vector_width`); then ``tl.multiple_of`` hints let the compiler
emit 128-bit accesses. ``tests/test_fused_triton.py`` checks both in the compiled SASS.

The filter constants come from :mod:`waveguard_optim.filter` (``filter_weights``,
``threshold_scale_factor``, ``median_network``) and are baked in at trace time as
``tl.constexpr`` tuples; the Haar levels and the median network are unrolled over
Triton tuples of per-element values.
"""

from __future__ import annotations

import math
import operator
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from waveguard_optim.filter import compute_dtype, filter_weights, median_network, threshold_scale_factor
from waveguard_optim.kernels._checks import check_state_dtypes, check_step_memory, check_steps
from waveguard_optim.kernels.plan import StepPlan, make_plan, step_skipped

try:
    import triton
    import triton.language as tl
except ImportError:  # the package works without triton; these kernels do not
    triton = None
    tl = None

__all__ = ["fused_wave_adam_", "fused_wave_sgd_", "triton_available", "make_plan", "planned_wave_adam_", "planned_wave_sgd_"]

_SQRT_HALF = math.sqrt(0.5)  # the orthonormal Haar normalisation (SPEC section 3, step 2)

# Columns of the pointer table. Adam: numel, param, grad, exp_avg, exp_avg_sq,
# max_exp_avg_sq, step, wave_count, then the N slots in ring order (``wave_history_0`` first;
# the kernel finds the newest from the count). SGD: numel, param, grad, momentum_buffer,
# wave_count, then the slots. The count is always the column before the slots.
_ADAM_FIXED = 8
_SGD_FIXED = 5


if triton is not None:
    # Globals a kernel reads must be constexpr.
    _SQRT_HALF_C = tl.constexpr(_SQRT_HALF)
    _ADAM_FIXED_C = tl.constexpr(_ADAM_FIXED)
    _SGD_FIXED_C = tl.constexpr(_SGD_FIXED)

    # Device code. Few nested @triton.jit calls on purpose: the interpreter pays about a
    # millisecond per nested call, the compiler inlines them anyway. Trace-time constants
    # become scalars with tl.full(..., ACC), which is exact for float64 too.

    @triton.jit
    def _wave_filter(
        b,
        ACC: tl.constexpr,
        W: tl.constexpr,
        U: tl.constexpr,
        STEPS: tl.constexpr,
        MIDDLE: tl.constexpr,
        TSCALE: tl.constexpr,
        SNR_GATE: tl.constexpr,
    ):
        """g_hat = sum_j w_j b_j - sum_{i>=1} u_i clamp(c_i, -tau, tau), the folded filter of
        SPEC section 3, over a tuple ``b`` of N values per element (oldest first), with the
        operations in the order of waveguard_optim.filter.fold_filter. Terms whose weight is
        0 are left out at trace time: ``W`` holds only the nonzero tail of w (its zeros come
        first), and a detail with u_i = 0 is never added (the compiler drops it)."""
        out = b[len(b) - len(W)] * tl.full((), W[0], ACC)
        for j in tl.static_range(1, len(W)):
            out = out + b[len(b) - len(W) + j] * tl.full((), W[j], ACC)
        if TSCALE != 0.0:  # 0: no correction term (kappa = 0, or every u_i = 0)
            s = tl.full((), _SQRT_HALF_C, ACC)
            approx = b
            # Level by level, finest first: details of width k sit at u[k : 2k] (SPEC layout).
            for level in tl.static_range(len(U).bit_length() - 1):
                details = ()
                coarser = ()
                for i in tl.static_range(len(approx) // 2):
                    details = details + ((approx[2 * i] - approx[2 * i + 1]) * s,)
                    coarser = coarser + ((approx[2 * i] + approx[2 * i + 1]) * s,)
                if level == 0:
                    # tau = kappa * gamma * T from the finest details: median |c| through the
                    # pruned compare-exchange network, then the SNR gate.
                    wires = ()
                    for i in tl.static_range(len(details)):
                        wires = wires + (tl.abs(details[i]),)
                    for k in tl.static_range(len(STEPS)):
                        lo_wire = wires[STEPS[k][0]]
                        hi_wire = wires[STEPS[k][1]]
                        rewired = ()
                        for i in tl.static_range(len(wires)):
                            if i == STEPS[k][0] and STEPS[k][2]:
                                rewired = rewired + (tl.minimum(lo_wire, hi_wire, propagate_nan=tl.PropagateNan.ALL),)
                            elif i == STEPS[k][1] and STEPS[k][3]:
                                rewired = rewired + (tl.maximum(lo_wire, hi_wire, propagate_nan=tl.PropagateNan.ALL),)
                            else:
                                rewired = rewired + (wires[i],)
                        wires = rewired
                    if len(MIDDLE) == 1:
                        tau = wires[MIDDLE[0]]
                    else:
                        tau = (wires[MIDDLE[0]] + wires[MIDDLE[1]]) * 0.5
                    tau = tau * tl.full((), TSCALE, ACC)
                    if SNR_GATE:
                        # gamma = E_f / (E_c + E_f), and 0 when both are 0 (no epsilon: safe
                        # under flush-to-zero). The coarse energy is that of the first
                        # approximations (Parseval). Both are taken of the coefficients times
                        # a power of two near the largest magnitude (exact; no square
                        # overflows): reference.gate_scale, from the exponent bits.
                        big = tl.abs(coarser[0])
                        for i in tl.static_range(1, len(coarser)):
                            big = tl.maximum(big, tl.abs(coarser[i]), propagate_nan=tl.PropagateNan.ALL)
                        for i in tl.static_range(len(details)):
                            big = tl.maximum(big, tl.abs(details[i]), propagate_nan=tl.PropagateNan.ALL)
                        if ACC == tl.float32:
                            exponent = big.to(tl.int32, bitcast=True) >> 23
                            scale = (tl.maximum(254 - exponent, 1) << 23).to(tl.float32, bitcast=True)
                        else:
                            exponent = big.to(tl.int64, bitcast=True) >> 52
                            scale = (tl.maximum(2046 - exponent, 1) << 52).to(tl.float64, bitcast=True)
                        e_fine = (details[0] * scale) * (details[0] * scale)
                        e_coarse = (coarser[0] * scale) * (coarser[0] * scale)
                        for i in tl.static_range(1, len(details)):
                            e_fine = e_fine + (details[i] * scale) * (details[i] * scale)
                            e_coarse = e_coarse + (coarser[i] * scale) * (coarser[i] * scale)
                        total = e_coarse + e_fine
                        positive = total > 0
                        safe_total = tl.where(positive, total, 1.0)
                        if ACC == tl.float32:
                            gamma = tl.div_rn(e_fine, safe_total)
                        else:
                            gamma = e_fine / safe_total
                        tau = tau * tl.where(positive, gamma, 0.0)
                    neg_tau = -tau
                for i in tl.static_range(len(details)):
                    if U[len(details) + i] != 0.0:
                        d = tl.maximum(details[i], neg_tau, propagate_nan=tl.PropagateNan.ALL)
                        d = tl.minimum(d, tau, propagate_nan=tl.PropagateNan.ALL)
                        out = out - d * tl.full((), U[len(details) + i], ACC)
                approx = coarser
        return out

    @triton.jit
    def _column(row, k, offs, DT: tl.constexpr, VEC: tl.constexpr):
        """Pointers to the elements ``offs`` of the tensor in column ``k`` of a table row. With
        ``VEC`` > 1 the host has checked that every such address of the launch is 16-byte
        aligned, which lets the compiler use 128-bit accesses."""
        base = tl.load(row + k).to(tl.pointer_type(DT))
        if VEC > 1:
            base = tl.multiple_of(base, 16)
        return base + offs

    @triton.jit
    def _load_gradient(
        row, offs, size, scale_ptr, C: tl.constexpr, FIXED: tl.constexpr, G_DT: tl.constexpr, S_DT: tl.constexpr,
        ACC: tl.constexpr, HAS_SCALE: tl.constexpr, VEC: tl.constexpr,
    ):  # fmt: skip
        """The loads of the record-and-filter half: the gradient, grad_scale (1 without one), the
        older slots oldest first, whether the history is full, and the newest slot's pointers.

        The ring comes from the row's count (the gradients recorded before this one), on the
        device: the newest slot is column ``count mod N`` of the row's slots, the older ones
        follow it cyclically (as ``history.time_ordered``), and they are read only once the
        history is full (``count >= N - 1``; before that they load as 0 and are not used).
        ``size`` is the row's numel (``VEC`` divides it)."""
        N: tl.constexpr = C - FIXED
        count = tl.load(tl.load(row + FIXED - 1).to(tl.pointer_type(tl.int64)))
        full = count >= N - 1
        older_mask = offs < tl.multiple_of(tl.where(full, size, 0), VEC)  # not `mask & full`: the interpreter makes that int32
        g = tl.load(_column(row, 2, offs, G_DT, VEC), mask=offs < size, other=0.0).to(ACC)
        if HAS_SCALE:
            scale = tl.load(scale_ptr).to(ACC)
        else:
            scale = tl.full((), 1.0, ACC)
        older = ()
        for j in tl.static_range(1, N):
            slot = _column(row, FIXED + ((count + j) & (N - 1)), offs, S_DT, VEC)
            older = older + (tl.load(slot, mask=older_mask, other=0.0).to(ACC),)
        return g, scale, older, full, _column(row, FIXED + (count & (N - 1)), offs, S_DT, VEC)

    @triton.jit
    def _store_mask(offs, size, mask, inf_ptr, HAS_INF: tl.constexpr, VEC: tl.constexpr):
        """Where the kernel stores: ``mask``, or nothing at all where GradScaler's ``found_inf``
        (read on the device) is nonzero, so a skipped step records and updates nothing."""
        if HAS_INF:
            return offs < tl.multiple_of(tl.where(tl.load(inf_ptr) != 0, 0, size), VEC)
        return mask

    @triton.jit
    def _denoised_gradient(
        g,
        scale,
        older,
        full,
        G_DT: tl.constexpr,
        S_DT: tl.constexpr,
        ACC: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        MAXIMIZE: tl.constexpr,
        W: tl.constexpr,
        U: tl.constexpr,
        STEPS: tl.constexpr,
        MIDDLE: tl.constexpr,
        TSCALE: tl.constexpr,
        SNR_GATE: tl.constexpr,
    ):
        """From what :func:`_load_gradient` loaded: ``newest``, g = grad (/ grad_scale) (negated
        under maximize) as the newest slot records it, and the filtered gradient over the older
        slots and ``newest`` as stored where the history is ``full`` (g itself during warm-up)."""
        if HAS_SCALE:
            if ACC == tl.float32:
                g = tl.div_rn(g, scale)
            else:
                g = g / scale
        if MAXIMIZE:
            g = -g
        if S_DT == ACC:
            newest = g
        else:  # float64 -> 16 bits through float32, as torch converts
            newest = g.to(tl.float32).to(S_DT)
        filtered = _wave_filter(older + (newest.to(ACC),), ACC, W, U, STEPS, MIDDLE, TSCALE, SNR_GATE)
        if G_DT != ACC:  # g_hat in the gradient's dtype, as the eager path hands it to the update
            filtered = filtered.to(G_DT).to(ACC)
        return newest, tl.where(full, filtered, g)

    # The kernels issue every global load first and store last (module docstring): a load
    # placed after a store, a division or the float64 bias corrections was issued after them
    # (seen in the SASS), so a block waited on DRAM up to three times; this way, once.

    @triton.jit
    def _wave_adam_kernel(
        table,
        blocks,
        hyper,
        scale_ptr,
        inf_ptr,
        C: tl.constexpr,
        P_DT: tl.constexpr,
        G_DT: tl.constexpr,
        M_DT: tl.constexpr,
        V_DT: tl.constexpr,
        VMAX_DT: tl.constexpr,
        STEP_DT: tl.constexpr,
        S_DT: tl.constexpr,
        ACC: tl.constexpr,
        BLOCK: tl.constexpr,
        VEC: tl.constexpr,
        W: tl.constexpr,
        U: tl.constexpr,
        STEPS: tl.constexpr,
        MIDDLE: tl.constexpr,
        TSCALE: tl.constexpr,
        SNR_GATE: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        HAS_INF: tl.constexpr,
        MAXIMIZE: tl.constexpr,
        HAS_WD: tl.constexpr,
        DECOUPLED: tl.constexpr,
        AMSGRAD: tl.constexpr,
    ):
        pid = tl.program_id(0)
        row = table + tl.load(blocks + 2 * pid).to(tl.int64) * C
        chunk = tl.load(blocks + 2 * pid + 1).to(tl.int64)
        offs = chunk * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        size = tl.multiple_of(tl.load(row), VEC)  # VEC divides every size of the launch
        mask = offs < size
        stored = _store_mask(offs, size, mask, inf_ptr, HAS_INF, VEC)

        # Loads. hyper = [lr, beta1, beta2, eps, weight_decay] in float64.
        g, scale, older, full, newest_ptr = _load_gradient(row, offs, size, scale_ptr, C, _ADAM_FIXED_C, G_DT, S_DT, ACC, HAS_SCALE, VEC)
        p_ptr = _column(row, 1, offs, P_DT, VEC)
        m_ptr = _column(row, 3, offs, M_DT, VEC)
        v_ptr = _column(row, 4, offs, V_DT, VEC)
        p = tl.load(p_ptr, mask=mask, other=0.0).to(ACC)
        m = tl.load(m_ptr, mask=mask, other=0.0).to(ACC)
        v = tl.load(v_ptr, mask=mask, other=0.0).to(ACC)
        if AMSGRAD:
            vmax_ptr = _column(row, 5, offs, VMAX_DT, VEC)
            vmax = tl.load(vmax_ptr, mask=mask, other=0.0).to(ACC)
        step = tl.load(tl.load(row + 6).to(tl.pointer_type(STEP_DT))).to(tl.float64)
        lr = tl.load(hyper)
        beta1 = tl.load(hyper + 1)
        beta2 = tl.load(hyper + 2)
        eps = tl.load(hyper + 3).to(ACC)
        weight_decay = tl.load(hyper + 4)

        # The bias corrections are float64 from the device-side step, as torch computes them in
        # Python, then rounded once.
        bias_correction1 = 1.0 - tl.exp2(step * tl.log2(beta1))
        bias_correction2 = 1.0 - tl.exp2(step * tl.log2(beta2))
        neg_step_size = (-(lr / bias_correction1)).to(ACC)
        bias_correction2_sqrt = tl.sqrt(bias_correction2).to(ACC)

        newest, g = _denoised_gradient(g, scale, older, full, G_DT, S_DT, ACC, HAS_SCALE, MAXIMIZE, W, U, STEPS, MIDDLE, TSCALE, SNR_GATE)
        if HAS_WD:
            if DECOUPLED:  # param.mul_(1 - lr * weight_decay)
                p = p * (1.0 - lr * weight_decay).to(ACC)
            else:  # grad.add(param, alpha=weight_decay)
                g = g + weight_decay.to(ACC) * p
        # exp_avg.lerp_(g, 1 - beta1), with torch's two-sided lerp formula
        weight = (1.0 - beta1).to(ACC)
        m = tl.where(weight < 0.5, m + weight * (g - m), g - (g - m) * (1.0 - weight))
        # exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        v = v * beta2.to(ACC) + (1.0 - beta2).to(ACC) * g * g
        if AMSGRAD:
            vmax = tl.maximum(vmax, v, propagate_nan=tl.PropagateNan.ALL)
            v_hat = vmax
        else:
            v_hat = v
        # param.addcdiv_(exp_avg, sqrt(v) / bias_correction2_sqrt + eps, value=-lr / bias_correction1)
        if ACC == tl.float32:  # IEEE division and sqrt (the plain fp32 ones are approximate on CUDA)
            denom = tl.div_rn(tl.sqrt_rn(v_hat), bias_correction2_sqrt) + eps
            p = p + tl.div_rn(neg_step_size * m, denom)
        else:
            denom = tl.sqrt(v_hat) / bias_correction2_sqrt + eps
            p = p + neg_step_size * m / denom

        # Stores.
        tl.store(newest_ptr, newest, mask=stored)
        tl.store(m_ptr, m.to(M_DT), mask=stored)
        tl.store(v_ptr, v.to(V_DT), mask=stored)
        if AMSGRAD:
            tl.store(vmax_ptr, vmax.to(VMAX_DT), mask=stored)
        tl.store(p_ptr, p.to(P_DT), mask=stored)

    @triton.jit
    def _wave_sgd_kernel(
        table,
        blocks,
        hyper,
        scale_ptr,
        inf_ptr,
        C: tl.constexpr,
        P_DT: tl.constexpr,
        G_DT: tl.constexpr,
        BUF_DT: tl.constexpr,
        S_DT: tl.constexpr,
        ACC: tl.constexpr,
        BLOCK: tl.constexpr,
        VEC: tl.constexpr,
        W: tl.constexpr,
        U: tl.constexpr,
        STEPS: tl.constexpr,
        MIDDLE: tl.constexpr,
        TSCALE: tl.constexpr,
        SNR_GATE: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        HAS_INF: tl.constexpr,
        MAXIMIZE: tl.constexpr,
        HAS_WD: tl.constexpr,
        MOMENTUM: tl.constexpr,
        FIRST: tl.constexpr,
        NESTEROV: tl.constexpr,
    ):
        pid = tl.program_id(0)
        row = table + tl.load(blocks + 2 * pid).to(tl.int64) * C
        chunk = tl.load(blocks + 2 * pid + 1).to(tl.int64)
        offs = chunk * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        size = tl.multiple_of(tl.load(row), VEC)  # VEC divides every size of the launch
        mask = offs < size
        stored = _store_mask(offs, size, mask, inf_ptr, HAS_INF, VEC)

        # Loads. hyper = [lr, momentum, dampening, weight_decay] in float64.
        g, scale, older, full, newest_ptr = _load_gradient(row, offs, size, scale_ptr, C, _SGD_FIXED_C, G_DT, S_DT, ACC, HAS_SCALE, VEC)
        p_ptr = _column(row, 1, offs, P_DT, VEC)
        p = tl.load(p_ptr, mask=mask, other=0.0).to(ACC)
        if MOMENTUM:
            buf_ptr = _column(row, 3, offs, BUF_DT, VEC)
            if not FIRST:
                buf = tl.load(buf_ptr, mask=mask, other=0.0).to(ACC)
        lr = tl.load(hyper)
        momentum = tl.load(hyper + 1).to(ACC)
        dampening = tl.load(hyper + 2)
        weight_decay = tl.load(hyper + 3).to(ACC)

        newest, d_p = _denoised_gradient(g, scale, older, full, G_DT, S_DT, ACC, HAS_SCALE, MAXIMIZE, W, U, STEPS, MIDDLE, TSCALE, SNR_GATE)
        if HAS_WD:  # grad.add(param, alpha=weight_decay)
            d_p = d_p + weight_decay * p
        if MOMENTUM:
            if FIRST:  # buf = d_p.clone()
                buf = d_p
            else:  # buf.mul_(momentum).add_(d_p, alpha=1 - dampening)
                buf = buf * momentum + (1.0 - dampening).to(ACC) * d_p
            if NESTEROV:
                d_p = d_p + momentum * buf
            else:
                d_p = buf
        p = p + (-lr).to(ACC) * d_p  # param.add_(d_p, alpha=-lr)

        # Stores.
        tl.store(newest_ptr, newest, mask=stored)
        if MOMENTUM:
            tl.store(buf_ptr, buf.to(BUF_DT), mask=stored)
        tl.store(p_ptr, p.to(P_DT), mask=stored)

    _TL_DTYPES = {
        torch.float32: tl.float32,
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
        torch.float64: tl.float64,
    }

    def _interpreted() -> bool:
        """Whether the kernels were built for the interpreter (decided when triton.jit ran).
        Checked by name: importing ``triton.runtime.interpreter`` needs numpy."""
        return type(_wave_adam_kernel).__name__ == "InterpretedFunction"


def triton_available(device: torch.device | str) -> bool:
    """True when the fused Triton step can run on ``device``: triton imports and the device
    is CUDA (compiled kernels) or, under ``TRITON_INTERPRET=1``, the CPU (interpreter).

    The interpreter dereferences raw host addresses from the pointer table, so under
    ``TRITON_INTERPRET=1`` only CPU tensors are supported, and compiled kernels only CUDA ones.
    """
    if triton is None:
        return False
    device = torch.device(device)
    if os.environ.get("TRITON_INTERPRET") == "1" and _interpreted():
        return device.type == "cpu"
    return device.type == "cuda" and torch.cuda.is_available()


def _launch_config(buffer_size: int, fp64: bool) -> tuple[int, int]:
    """``(BLOCK, num_warps)``. About 2N values are live per element, so bigger buffers (and
    float64) get fewer elements per thread: with every load issued first, ptxas (sm_90) then
    uses 72 / 105 / 154 registers and no spills for fp32 Adam with N = 2 / 8 / 64
    (``bench/triton_sass.py``). The interpreter pays per program
    and per operation, not per element, so it gets big blocks."""
    if _interpreted():
        return 1024, 4
    per_thread = max(1, min(4, 32 // buffer_size) // (2 if fp64 else 1))
    return 128 * per_thread, 4


# --- host side -----------------------------------------------------------------------------


def _dense(t: Tensor) -> bool:
    """Non-overlapping and dense: the elements fill ``[data_ptr, data_ptr + numel)``."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout(t: Tensor, ref: Tensor) -> bool:
    return t.shape == ref.shape and all(
        st == sr for st, sr, sz in zip(t.stride(), ref.stride(), ref.shape) if sz != 1
    )


def _to_device(host: Tensor, device: torch.device) -> Tensor:
    """A small host tensor on ``device`` without a host sync: staged in pinned memory (the
    caching host allocator keeps it alive until the copy ran), copied asynchronously."""
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


_BLOCKS_CACHE: OrderedDict[tuple[Any, ...], Tensor] = OrderedDict()
_BLOCKS_CACHE_SIZE = 64


def _blocks(numels: tuple[int, ...], block: int, device: torch.device) -> Tensor:
    """int32 ``(row, chunk)`` per program, built with vectorised CPU ops and cached per sizes."""
    key = (device, block, numels)
    blocks = _BLOCKS_CACHE.get(key)
    if blocks is not None:
        _BLOCKS_CACHE.move_to_end(key)
        return blocks
    counts = torch.tensor([-(-n // block) for n in numels], dtype=torch.int64)
    rows = torch.repeat_interleave(torch.arange(len(numels)), counts)
    first = torch.cumsum(counts, 0) - counts
    chunks = torch.arange(rows.numel()) - first[rows]
    blocks = _to_device(torch.stack([rows, chunks], 1).to(torch.int32), device)
    _BLOCKS_CACHE[key] = blocks
    if len(_BLOCKS_CACHE) > _BLOCKS_CACHE_SIZE:
        _BLOCKS_CACHE.popitem(last=False)
    return blocks


class _Launch:
    """The pointer table of one launch, plus the copies made for tensors the kernel cannot
    address directly (non-dense, or layouts that differ within a row), written back after."""

    def __init__(self, name: str, device: torch.device) -> None:
        self.name = name
        self.device = device
        self.rows: list[list[int]] = []
        self.numels: list[int] = []
        self.keep: list[Tensor] = []  # temporaries whose addresses are in the table
        self.write_back: list[tuple[Tensor, Tensor]] = []
        self.written: list[Tensor] = []  # written in place by the kernel: bump their autograd versions

    def addresses(self, tensors: Sequence[Tensor | None], written: Sequence[bool], names: Sequence[str], index: int) -> list[int]:
        """Addresses of elementwise-aligned tensors (``tensors[0]`` is the parameter ``index``;
        None -> 0); ``names`` are the lists they come from, the history slots follow them.

        If every tensor shares the parameter's dense layout (contiguous, channels_last, a
        transpose ...) the kernel walks their storage directly; otherwise it works on
        contiguous copies, and those of the tensors it writes are copied back after.
        """
        p = tensors[0]
        present = [t for t in tensors if t is not None]
        for k, t in enumerate(tensors):
            if t is not None and (t.device != p.device or t.shape != p.shape):
                name = names[k] if k < len(names) else f"history slot {k - len(names)} of parameter"
                raise RuntimeError(
                    f"{self.name}: {name}[{index}] must have the parameter's device and shape "
                    f"({p.device}, {tuple(p.shape)}), got {t.device}, {tuple(t.shape)}"
                )
        direct = _dense(p) and all(_same_layout(t, p) for t in present)
        out = []
        for t, is_written in zip(tensors, written):
            if t is None:
                out.append(0)
                continue
            if not direct and not t.is_contiguous():
                copy = t.contiguous()
                self.keep.append(copy)
                if is_written:
                    self.write_back.append((t, copy))  # copy_ bumps the version
                t = copy
            elif is_written:
                self.written.append(t)
            out.append(t.data_ptr())
        return out

    def add_row(self, numel: int, addresses: list[int]) -> None:
        self.rows.append([numel, *addresses])
        self.numels.append(numel)

    def run(self, kernel: Any, hyper: Tensor, scale: Tensor | None, buffer_size: int, **constexprs: Any) -> None:
        rows = lambda: _uploaded(np.array(self.rows, dtype=np.int64), self.device, constexprs)  # noqa: E731 (built only if there is work)
        _launch(kernel, rows, tuple(self.numels), self.device, hyper, scale, buffer_size, constexprs)
        for t, copy in self.write_back:
            t.copy_(copy)
        torch.autograd.graph.increment_version(self.written)  # as in-place torch ops would


# The constexprs naming the dtypes of the tensors the kernels access elementwise.
_ELEMENTWISE_DTYPES = ("P_DT", "G_DT", "M_DT", "V_DT", "VMAX_DT", "BUF_DT", "S_DT")


def _vector_width(table: np.ndarray, constexprs: dict[str, Any]) -> int:
    """The kernel's ``VEC``: the elements of its narrowest dtype in 16 bytes where every
    address the kernel reads elementwise is 16-byte aligned and every size a multiple of
    that; else 1, the scalar path. From the table's real addresses (absent tensors are 0),
    all rows at once; the columns of scalars (Adam's steps, the counts) do not count."""
    itemsize = min(constexprs[k].primitive_bitwidth for k in _ELEMENTWISE_DTYPES if k in constexprs) // 8
    vec = 16 // itemsize
    columns = np.bitwise_or.reduce(table, axis=0)  # a power of two divides every entry iff it divides this
    scalars = [0, _ADAM_FIXED - 2, _ADAM_FIXED - 1] if "STEP_DT" in constexprs else [0, _SGD_FIXED - 1]  # sizes, steps, counts
    addresses = np.delete(columns, scalars)
    aligned = not (np.bitwise_or.reduce(addresses) % 16 or columns[0] % vec)
    return vec if aligned else 1


def _uploaded(host: np.ndarray, device: torch.device, constexprs: dict[str, Any]) -> tuple[np.ndarray, Tensor, int]:
    """A table, its copy on the device (the table itself on the CPU), and its ``VEC``."""
    return host, _to_device(torch.from_numpy(host), device), _vector_width(host, constexprs)


def _launch(
    kernel: Any,
    table: Callable[[], tuple[np.ndarray, Tensor, int]],
    numels: tuple[int, ...],
    device: torch.device,
    hyper: Tensor,
    scale: Tensor | None,
    buffer_size: int,
    constexprs: dict[str, Any],
    found_inf: Tensor | None = None,
) -> None:
    """One launch over the rows of ``table()`` (an int64 array, its copy on the device and its
    ``VEC``: see :func:`_uploaded`; made only if there is work); with ``found_inf`` (on the device) it stores nothing where that is nonzero."""
    block, num_warps = _launch_config(buffer_size, constexprs["ACC"] == tl.float64)
    blocks = _blocks(numels, block, device)
    if blocks.shape[0]:
        _, rows, vec = table()
        kernel[(blocks.shape[0],)](
            rows,
            blocks,
            hyper,
            hyper if scale is None else scale,
            hyper if found_inf is None else found_inf,
            C=rows.shape[1],
            BLOCK=block,
            VEC=vec,
            HAS_SCALE=scale is not None,
            HAS_INF=found_inf is not None,
            num_warps=num_warps,
            **constexprs,
        )


def _filter_constexprs(buffer_size: int, decay: float, threshold_scale: float, snr_gate: bool) -> dict[str, Any]:
    """The filter's trace-time constants, from waveguard_optim.filter. ``W`` is w without its
    leading zeros; ``TSCALE`` is 0 when no correction term has a nonzero weight (kappa = 0,
    or decay = 1). Warm-up and full histories share them: the kernel tells them apart."""
    w, u = filter_weights(buffer_size, float(decay))
    steps, middle = median_network(buffer_size // 2)
    tscale = threshold_scale_factor(buffer_size, float(threshold_scale)) if any(u[1:]) else 0.0
    first = next(j for j, x in enumerate(w) if x != 0)
    return dict(W=w[first:], U=u, STEPS=steps, MIDDLE=middle, TSCALE=tscale, SNR_GATE=bool(snr_gate))


def _tl_dtype(name: str, t: Tensor) -> Any:
    dtype = _TL_DTYPES.get(t.dtype)
    if dtype is None:
        raise RuntimeError(f"{name}: unsupported dtype {t.dtype} (supported: float32, float16, bfloat16, float64)")
    return dtype


def _check(
    name: str,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    histories: Sequence[Sequence[Tensor]],
    full: Sequence[bool],
    state: dict[str, Sequence[Tensor | None]],
    state_steps: Sequence[Tensor] | None = None,
) -> torch.device:
    """Validate the lists and return the device of the launch. With ``state_steps`` (Adam) every
    state tensor must have its parameter's dtype, as in torch's Adam. Devices and shapes are
    checked by :meth:`_Launch.addresses`, dtypes by :func:`_tl_dtype`; all before any write."""
    if triton is None:
        raise RuntimeError(f"{name}: triton is not installed (pip install triton)")
    steps = {} if state_steps is None else dict(state_steps=state_steps)
    for what, values in dict(grads=grads, histories=histories, full=full, **state, **steps).items():
        if len(values) != len(params):
            raise RuntimeError(f"{name}: {len(params)} params but {len(values)} {what}")
    device = params[0].device
    for p, g, slots in zip(params, grads, histories):
        if p.is_complex():
            raise RuntimeError(
                f"{name}: complex parameters are not supported by the fused Triton step "
                "(as torch's fused Adam); use foreach=True or fused=False"
            )
        if g.is_sparse:
            raise RuntimeError(f"{name}: sparse gradients are not supported")
        if p.device != device:
            raise RuntimeError(f"{name}: all parameters of one call must be on one device, got {device} and {p.device}")
        n = len(slots)
        if n < 2 or n & (n - 1) or any(s.dtype != slots[-1].dtype for s in slots):
            raise RuntimeError(f"{name}: each history must be a power-of-two number (>= 2) of slots of one dtype")
    if state_steps is not None:
        check_state_dtypes(name, params, state)
        check_steps(name, state_steps)
    if not triton_available(device):
        mode = "TRITON_INTERPRET=1 (the interpreter runs CPU tensors only)" if _interpreted() else "compiled (CUDA only)"
        raise RuntimeError(f"{name}: the Triton kernels cannot run on {device} in this process: {mode}")
    # Steps on another device are read through a copy; those here are written in place.
    here = [step if step.device == device else None for step in state_steps or ()]
    check_step_memory(name, params, grads, state, here, histories)
    return device


_DTYPE_OF = operator.attrgetter("dtype")


def _hyper(values: Sequence[float | Tensor], device: torch.device) -> Tensor:
    """float64 hyperparameters on the device; tensor ones are copied there on the device
    (no host sync, no ``.item()``)."""
    hyper = _to_device(
        torch.tensor([0.0 if isinstance(v, Tensor) else float(v) for v in values], dtype=torch.float64), device
    )
    return _with_tensor_values(hyper, values)


def _with_tensor_values(hyper: Tensor, values: Sequence[float | Tensor]) -> Tensor:
    """``hyper`` with the tensor ones among ``values`` copied in, on the device."""
    for k, v in enumerate(values):
        if isinstance(v, Tensor):
            hyper[k] = v.detach().to(device=hyper.device, dtype=torch.float64).reshape(())
    return hyper


def _scale(grad_scale: Tensor | None, device: torch.device) -> Tensor | None:
    return None if grad_scale is None else grad_scale.detach().to(device=device).reshape(())


def _nonzero(value: float | Tensor) -> bool:
    """``value != 0`` for the constexpr flags; a tensor counts as nonzero (no host sync)."""
    return True if isinstance(value, Tensor) else value != 0


def _steps_on(state_steps: Sequence[Tensor], device: torch.device) -> list[Tensor]:
    """The (already incremented) steps, readable on ``device``. Steps elsewhere (torch keeps
    them on the CPU unless fused or capturable) go over in one copy per dtype, not one each."""
    steps = list(state_steps)
    elsewhere: dict[torch.dtype, list[int]] = {}
    for i, step in enumerate(steps):
        if step.device != device:
            elsewhere.setdefault(step.dtype, []).append(i)
    for members in elsewhere.values():
        moved = _to_device(torch.stack([steps[i].reshape(()) for i in members]), device)
        for k, i in enumerate(members):
            steps[i] = moved[k]  # a view: the table holds its address, `launch.keep` the view
    return steps


def _ring_order(slots: Sequence[Tensor], full: bool) -> tuple[list[Tensor], list[bool], int]:
    """For a call given ``histories[i]`` (oldest first, the newest last) and ``full[i]``: the
    slots in the order the table holds them, which one the kernel writes, and the count that
    makes the kernel's ring pick them so (newest = slot ``count mod N``, full iff
    ``count >= N - 1``): time order and N - 1 when full; in warm-up the newest first and 0."""
    n = len(slots)
    if full:
        return list(slots), [False] * (n - 1) + [True], n - 1
    return [slots[-1], *slots[:-1]], [True] + [False] * (n - 1), 0


def _point_at_counts(rows: Sequence[list[int]], counts: Sequence[int], column: int, device: torch.device) -> Tensor:
    """Put ``counts`` on the device and their addresses into ``column`` of the table ``rows``;
    the returned tensor holds them and must outlive the launches."""
    held = _to_device(torch.tensor(counts, dtype=torch.int64), device)
    base = held.data_ptr()
    for k, row in enumerate(rows):
        row[column] = base + 8 * k
    return held


@torch.compiler.disable  # torch.compile: a launch through a pointer table is one opaque call, as cpu_step's
@torch.no_grad()
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
    strict: bool = False,
) -> None:
    """WaveAdam's whole step in one launch per group: record, filter, Adam (module docstring).

    ``histories[i]`` are the slots of ``params[i]`` oldest first, the ring already advanced:
    the gradient is written into ``histories[i][-1]``; ``full[i]`` selects the filter over
    the warm-up's raw gradient. ``state_steps`` are incremented here, as in torch's fused Adam.
    ``strict`` (``fused=True``) is accepted for the CPU step's signature: this step never falls back.
    """
    if not params:
        return
    name = "fused_wave_adam_"
    state: dict[str, Sequence[Tensor]] = dict(exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)
    if amsgrad:
        state["max_exp_avg_sqs"] = max_exp_avg_sqs
    device = _check(name, params, grads, histories, full, state, state_steps)
    hyper = _hyper([lr, beta1, beta2, eps, weight_decay], device)
    scale = _scale(grad_scale, device)

    launches: dict[tuple[Any, ...], _Launch] = {}
    rows: list[list[int]] = []  # table rows by parameter: step and count addresses are filled in below
    counts: list[int] = []
    for i, p in enumerate(params):
        slots, slot_written, count = _ring_order(histories[i], full[i])
        max_exp_avg_sq = max_exp_avg_sqs[i] if amsgrad else None
        step = state_steps[i]
        key = (
            len(slots),
            *(
                _tl_dtype(name, t)
                for t in (p, grads[i], exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sq if amsgrad else p, step, slots[-1])
            ),
            tl.float64 if compute_dtype(p.dtype) == torch.float64 else tl.float32,
        )
        launch = launches.get(key)
        if launch is None:
            launch = launches[key] = _Launch(name, device)
        addresses = launch.addresses(
            [p, grads[i], exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sq, *slots],
            [True, False, True, True, True, *slot_written],
            ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"),
            i,
        )
        launch.add_row(p.numel(), [*addresses[:5], 0, 0, *addresses[5:]])
        rows.append(launch.rows[-1])
        counts.append(count)

    # Everything is validated: only now count the step (torch's fused Adam increments it too).
    torch._foreach_add_(state_steps, 1)
    steps = _steps_on(state_steps, device)
    for row, step in zip(rows, steps):
        row[_ADAM_FIXED - 2] = step.data_ptr()
    held = _point_at_counts(rows, counts, _ADAM_FIXED - 1, device)

    for key, launch in launches.items():
        n, p_dt, g_dt, m_dt, v_dt, vmax_dt, step_dt, s_dt, acc = key
        launch.run(
            _wave_adam_kernel,
            hyper,
            scale,
            n,
            P_DT=p_dt,
            G_DT=g_dt,
            M_DT=m_dt,
            V_DT=v_dt,
            VMAX_DT=vmax_dt,
            STEP_DT=step_dt,
            S_DT=s_dt,
            ACC=acc,
            MAXIMIZE=bool(maximize),
            HAS_WD=_nonzero(weight_decay),
            DECOUPLED=bool(decoupled_weight_decay),
            AMSGRAD=bool(amsgrad),
            **_filter_constexprs(n, decay, threshold_scale, snr_gate),
        )
    del held  # the counts' memory is reused only after the launches (stream order)


@torch.compiler.disable  # torch.compile: a launch through a pointer table is one opaque call, as cpu_step's
@torch.no_grad()
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
    strict: bool = False,
) -> None:
    """WaveSGD's whole step in one launch per group: record, filter, SGD.

    Like torch's SGD functional, a ``None`` in ``momentum_buffers`` (first step with
    momentum) is replaced in place by a new buffer holding the step's ``d_p``.
    """
    if not params:
        return
    name = "fused_wave_sgd_"
    has_momentum = _nonzero(momentum)
    # torch's SGD._init_group collects no buffers at all when momentum is 0.
    buffers = dict(momentum_buffers=momentum_buffers) if has_momentum else {}
    device = _check(name, params, grads, histories, full, buffers)
    hyper = _hyper([lr, momentum, dampening, weight_decay], device)
    scale = _scale(grad_scale, device)

    launches: dict[tuple[Any, ...], _Launch] = {}
    created: dict[int, Tensor] = {}  # put into momentum_buffers once every row is validated
    rows: list[list[int]] = []  # table rows by parameter: count addresses are filled in below
    counts: list[int] = []
    for i, p in enumerate(params):
        slots, slot_written, count = _ring_order(histories[i], full[i])
        buf, first = None, False
        if has_momentum:
            buf = momentum_buffers[i]
            if buf is None:
                buf = created[i] = torch.empty_like(p, memory_format=torch.preserve_format)
                first = True
        key = (
            len(slots),
            *(_tl_dtype(name, t) for t in (p, grads[i], p if buf is None else buf, slots[-1])),
            tl.float64 if compute_dtype(p.dtype) == torch.float64 else tl.float32,
            first,
        )
        launch = launches.get(key)
        if launch is None:
            launch = launches[key] = _Launch(name, device)
        addresses = launch.addresses([p, grads[i], buf, *slots], [True, False, True, *slot_written], ("params", "grads", "momentum_buffers"), i)
        launch.add_row(p.numel(), [*addresses[:3], 0, *addresses[3:]])
        rows.append(launch.rows[-1])
        counts.append(count)
    for i, buf in created.items():
        momentum_buffers[i] = buf
    held = _point_at_counts(rows, counts, _SGD_FIXED - 1, device)

    for key, launch in launches.items():
        n, p_dt, g_dt, buf_dt, s_dt, acc, first = key
        launch.run(
            _wave_sgd_kernel,
            hyper,
            scale,
            n,
            P_DT=p_dt,
            G_DT=g_dt,
            BUF_DT=buf_dt,
            S_DT=s_dt,
            ACC=acc,
            MAXIMIZE=bool(maximize),
            HAS_WD=_nonzero(weight_decay),
            MOMENTUM=has_momentum,
            FIRST=first,
            NESTEROV=bool(nesterov),
            **_filter_constexprs(n, decay, threshold_scale, snr_gate),
        )
    del held


# --- planned steps: a param group's operands validated once (kernels/plan.py) ----------------


def _reads_counts_in_place(plan: StepPlan) -> bool:
    """Whether the kernel reads the plan's counts where they are: on its device (``fused=True``
    or ``capturable=True``), or on the CPU under the interpreter. Else (CPU counts, a GPU
    kernel) it reads a device copy of them."""
    return plan.count_buffer.device == plan.device or plan.device.type == "cpu"


def _reads_steps_in_place(plan: StepPlan) -> bool:
    """Whether the kernel reads the plan's Adam steps where they are: on its device (torch's
    fused or capturable Adam keeps them there)."""
    return set(map(Tensor.get_device, plan.steps)) == {plan.device_index}


def _device_copy(plan: StepPlan, name: str, buffer: Tensor) -> np.ndarray:
    """The addresses of a device copy of one of the plan's CPU buffers (counts, Adam's steps),
    kept in the plan under ``name`` and advanced with the buffer (:func:`_advance_copy`): copied
    again only when the buffer's values differ from it (restored in place, as
    ``torch.distributed.checkpoint`` does), not every step."""
    values = buffer.numpy()
    copy = plan.cache.get(name)
    if copy is None or not np.array_equal(copy[0], values):
        held = _to_device(buffer.clone(), plan.device)
        copy = plan.cache[name] = (values.copy(), held, held.data_ptr() + held.element_size() * np.arange(plan.rows, dtype=np.int64))
    return copy[2]


def _advance_copy(plan: StepPlan, name: str, value: float) -> None:
    """Add ``value`` to the device copy ``name`` (one op on the device), as to the buffer it copies."""
    copy = plan.cache.get(name)
    if copy is not None:
        snapshot, held, _ = copy
        snapshot += value
        held.add_(value)


def _kernel_counts(plan: StepPlan) -> np.ndarray:
    """Where the kernel reads the group's ring counts: the counts themselves (on the device, or
    on the CPU for the interpreter), or a device copy of them (:func:`_device_copy`)."""
    if _reads_counts_in_place(plan):
        return plan.count_ptrs
    return _device_copy(plan, "device counts", plan.count_buffer)


def _advance(plan: StepPlan) -> None:
    """Count the recorded gradients: the plan's counts, and their device copy if any."""
    _advance_copy(plan, "device counts", 1)
    plan.advance()


def _planned_hyper(plan: StepPlan, values: Sequence[float | Tensor]) -> Tensor:
    """:func:`_hyper` of a planned step, kept on the device in the plan while its float values
    stay (tensor values are copied in on the device): no host-to-device copy per step."""
    key = tuple(None if isinstance(v, Tensor) else float(v) for v in values)
    held = plan.cache.get("hyper")
    if held is None or held[0] != key:
        held = plan.cache["hyper"] = (key, _hyper(values, plan.device))
        return held[1]
    return _with_tensor_values(held[1], values)


def _planned_table(plan: StepPlan, fixed: list[np.ndarray], constexprs: dict[str, Any]) -> tuple[np.ndarray, Tensor, int]:
    """The table of a planned step (numel, p, the gradients ``confirm`` accepted, ``fixed``
    columns, the counts, the slots), as :func:`_uploaded` gives it, kept in the plan and made
    again only when an address changed (the gradients', or a device copy of the steps)."""
    columns = [plan.sizes, plan.fixed_ptrs[:, 0], plan.grad_ptrs, *fixed, _kernel_counts(plan)]
    host = np.concatenate([np.stack(columns, axis=1), plan.slot_ptrs], axis=1)
    held = plan.cache.get("table")
    if held is None or not np.array_equal(held[0], host):
        held = plan.cache["table"] = _uploaded(host, plan.device, constexprs)
    return held


def _found_inf_on_device(plan: StepPlan, found_inf: Tensor | None, steps_here: bool) -> Tensor | None:
    """GradScaler's ``found_inf`` for the kernel to read, where the whole skip can happen on the
    device: the kernel reads the counts (and Adam's steps: ``steps_here``) in place. None without one."""
    if found_inf is None or not _reads_counts_in_place(plan) or not steps_here:
        return None
    return found_inf.detach().to(device=plan.device).reshape(())


def _planned_launch(
    plan: StepPlan,
    fixed: list[np.ndarray],
    kernel: Any,
    hyper: Tensor,
    scale: Tensor | None,
    found_inf: Tensor | None,
    filter_options: tuple[float, float, bool],
    **constexprs: Any,
) -> None:
    """A planned step's one launch, warm-up and full rows alike, then the counts advance (and go
    back where ``found_inf``, on the device, says the step was skipped)."""
    n = plan.buffer_size
    options = constexprs | _filter_constexprs(n, *filter_options)
    _launch(kernel, lambda: _planned_table(plan, fixed, options), plan.numels, plan.device, hyper, scale, n, options, found_inf)
    _advance(plan)
    if found_inf is not None:
        plan.count_buffer.sub_(found_inf.to(torch.int64))


def _plannable(plan: StepPlan, columns: int) -> bool:
    return triton is not None and plan.fixed_ptrs.shape[1] == 1 + columns and triton_available(plan.device)


def _add_to_steps(plan: StepPlan, value: float | Tensor) -> None:
    """``step += value`` for each of the plan's steps: one add where they are views of one
    buffer (and one to its device copy, if any: a copy left behind is copied again before it
    is read)."""
    if plan.step_buffer is not None:
        plan.step_buffer.add_(value)
        if not isinstance(value, Tensor):
            _advance_copy(plan, "device steps", value)
    elif isinstance(value, Tensor):
        torch._foreach_add_(plan.steps, [value] * plan.rows)
    else:
        torch._foreach_add_(plan.steps, value)


@torch.no_grad()
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
    strict: bool = False,
) -> bool:
    """:func:`fused_wave_adam_` on a confirmed plan (``plan.confirm`` returned True for this step's
    grads); also advances the ring counts. False, with nothing changed, where it does not apply.
    GradScaler's ``found_inf`` skips the step as torch's fused Adam does, on the device (the
    kernel stores nothing, steps and counts go back) where the steps and counts are there
    (``fused=True`` or ``capturable=True``); else it is read on the host."""
    step_dtypes = set(map(_DTYPE_OF, plan.steps))
    if not _plannable(plan, 3 if amsgrad else 2) or len(step_dtypes) != 1 or next(iter(step_dtypes)) not in _TL_DTYPES:
        return False
    device = plan.device
    steps_here = _reads_steps_in_place(plan)
    inf = _found_inf_on_device(plan, found_inf, steps_here)
    if inf is None and step_skipped(found_inf):
        return True
    hyper = _planned_hyper(plan, [lr, beta1, beta2, eps, weight_decay])
    scale = _scale(grad_scale, device)
    _add_to_steps(plan, 1)  # as torch's fused Adam; everything is validated
    if steps_here:
        step_ptrs = plan.step_ptrs
    elif plan.step_buffer is not None and plan.step_buffer.is_cpu:
        step_ptrs = _device_copy(plan, "device steps", plan.step_buffer)
    else:  # copies, alive until the launch is queued (their memory must not be reused before it)
        copies = _steps_on(plan.steps, device)
        step_ptrs = np.fromiter(map(Tensor.data_ptr, copies), dtype=np.int64, count=plan.rows)
    columns = plan.fixed_ptrs[:, 1:]
    vmax = columns[:, 2] if amsgrad else np.zeros(plan.rows, dtype=np.int64)
    dt, acc = _TL_DTYPES[plan.dtype], tl.float64 if compute_dtype(plan.dtype) == torch.float64 else tl.float32
    _planned_launch(
        plan, [columns[:, 0], columns[:, 1], vmax, step_ptrs], _wave_adam_kernel, hyper, scale, inf, (decay, threshold_scale, snr_gate),
        P_DT=dt, G_DT=dt, M_DT=dt, V_DT=dt, VMAX_DT=dt, STEP_DT=_TL_DTYPES[next(iter(step_dtypes))], S_DT=_TL_DTYPES[plan.slot_dtype],
        ACC=acc, MAXIMIZE=bool(maximize), HAS_WD=_nonzero(weight_decay), DECOUPLED=bool(decoupled_weight_decay), AMSGRAD=bool(amsgrad),
    )  # fmt: skip
    if inf is not None:  # as torch's fused Adam: a skipped step is not counted
        _add_to_steps(plan, -inf)
    return True


@torch.no_grad()
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
    strict: bool = False,
) -> bool:
    """:func:`fused_wave_sgd_` on a confirmed plan whose momentum buffers all exist; as
    :func:`planned_wave_adam_`."""
    has_momentum = _nonzero(momentum)
    if not _plannable(plan, 1 if has_momentum else 0):
        return False
    inf = _found_inf_on_device(plan, found_inf, True)
    if inf is None and step_skipped(found_inf):
        return True
    device = plan.device
    hyper = _planned_hyper(plan, [lr, momentum, dampening, weight_decay])
    buffers = plan.fixed_ptrs[:, 1] if has_momentum else np.zeros(plan.rows, dtype=np.int64)
    dt, acc = _TL_DTYPES[plan.dtype], tl.float64 if compute_dtype(plan.dtype) == torch.float64 else tl.float32
    _planned_launch(
        plan, [buffers], _wave_sgd_kernel, hyper, _scale(grad_scale, device), inf, (decay, threshold_scale, snr_gate),
        P_DT=dt, G_DT=dt, BUF_DT=dt, S_DT=_TL_DTYPES[plan.slot_dtype], ACC=acc, MAXIMIZE=bool(maximize),
        HAS_WD=_nonzero(weight_decay), MOMENTUM=has_momentum, FIRST=False, NESTEROV=bool(nesterov),
    )  # fmt: skip
    return True
