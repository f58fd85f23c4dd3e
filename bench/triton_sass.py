"""The Triton step's main variants compiled for CUDA without a GPU, and what their SASS shows.

    python bench/triton_sass.py          # a markdown table: registers, spills, memory order
    python bench/triton_sass.py --json   # per variant: its global memory instructions in order, regs, spills

Triton ships ptxas, nvdisasm and cuobjdump, so the kernels compile to cubins for sm_90 / sm_80
on any machine. Per variant this lists the global loads and stores (``LDG`` / ``STG``, from
``nvdisasm``) in program order, and the registers and spills that the driver would report as
``CompiledKernel.n_regs`` / ``n_spills`` (from ``cuobjdump -res-usage``: REG, and LOCAL / 4
as Triton's driver counts spills). ``tests/test_fused_triton.py`` runs it with ``--json`` and
asserts that no global load follows the first global store and that the aligned fp32 N = 8
Adam step loads 128 bits at a time (issue 18, item 4). Needs triton with its NVIDIA backend;
run it without ``TRITON_INTERPRET``. A cold Triton cache takes ~30 s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from typing import Any

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from waveguard_optim.kernels import triton_step as ts

F32, BF16, F64 = tl.float32, tl.bfloat16, tl.float64
ADAM = dict(HAS_SCALE=True, HAS_INF=True, MAXIMIZE=True, HAS_WD=True, DECOUPLED=False, AMSGRAD=True)
SGD = dict(HAS_SCALE=True, HAS_INF=True, MAXIMIZE=False, HAS_WD=True, MOMENTUM=True, FIRST=False, NESTEROV=True)
SGD_F32 = dict(P_DT=F32, G_DT=F32, BUF_DT=F32, S_DT=F32)


def adam_dtypes(p: Any, s: Any) -> dict[str, Any]:
    return dict(P_DT=p, G_DT=p, M_DT=p, V_DT=p, VMAX_DT=p, STEP_DT=F32, S_DT=s)


# name -> (kernel, dtypes, N, compute dtype, sm, flags); "decay" is the filter's. One variant
# serves warm-up and full histories (the kernel reads the ring from the count).
VARIANTS: dict[str, tuple[Any, ...]] = {
    **{f"adam f32 N={n}": (ts._wave_adam_kernel, adam_dtypes(F32, F32), n, F32, 90, ADAM) for n in (2, 8, 64)},
    "adam bf16 N=8": (ts._wave_adam_kernel, adam_dtypes(BF16, BF16), 8, F32, 90, ADAM),
    "adam f32 N=8 decay 0.85": (ts._wave_adam_kernel, adam_dtypes(F32, F32), 8, F32, 90, dict(ADAM, decay=0.85)),
    "adam f32/bf16 slots N=16 decoupled sm80": (
        ts._wave_adam_kernel, adam_dtypes(F32, BF16), 16, F32, 80, dict(ADAM, DECOUPLED=True),
    ),
    "adam f64/bf16 slots N=4": (ts._wave_adam_kernel, adam_dtypes(F64, BF16), 4, F64, 90, ADAM),
    "adam f64 N=8 decay 0.85": (ts._wave_adam_kernel, adam_dtypes(F64, F64), 8, F64, 90, dict(ADAM, decay=0.85)),
    "sgd f32 N=32": (ts._wave_sgd_kernel, SGD_F32, 32, F32, 90, SGD),
    "sgd f32 N=8 decay 1": (ts._wave_sgd_kernel, SGD_F32, 8, F32, 90, dict(SGD, decay=1.0)),
    "sgd bf16 N=4 first sm80": (
        ts._wave_sgd_kernel, dict(P_DT=BF16, G_DT=BF16, BUF_DT=BF16, S_DT=BF16), 4, F32, 80,
        dict(SGD, FIRST=True, NESTEROV=False),
    ),
}
# Variants also compiled aligned, with the VEC the host picks for them (16 bytes of the narrowest dtype).
ALIGNED = {"adam f32 N=8": 4, "adam bf16 N=8": 8, "adam f64 N=8 decay 0.85": 2, "sgd f32 N=8 decay 1": 4}


def inspect(kernel: Any, dtypes: dict[str, Any], n: int, acc: Any, arch: int, flags: dict[str, Any], vec: int = 1) -> dict[str, Any]:
    """Compile one variant; its global memory instructions in program order, registers, spills."""
    flags = dict(flags)
    decay = flags.pop("decay", 0.0)
    const = dict(
        dtypes, C=(ts._ADAM_FIXED if kernel is ts._wave_adam_kernel else ts._SGD_FIXED) + n, ACC=acc, BLOCK=ts._launch_config(n, acc == F64)[0],
        VEC=vec, **flags, **ts._filter_constexprs(n, decay, 1.0, True),
    )  # fmt: skip
    signature = dict(table="*i64", blocks="*i32", hyper="*fp64", scale_ptr="*fp32", inf_ptr="*fp32", **{k: "constexpr" for k in const})
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=const), target=GPUTarget("cuda", arch, 32))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        listing = subprocess.run([triton.knobs.nvidia.nvdisasm.path, "-c", path], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    regs, local = (int(re.search(rf"\b{key}:(\d+)", usage).group(1)) for key in ("REG", "LOCAL"))  # type: ignore[union-attr]
    return dict(ops=re.findall(r"\b(?:LDG|STG)\.[A-Z0-9.]+", listing), regs=regs, spills=local // 4)


def inspect_all() -> dict[str, dict[str, Any]]:
    out = {}
    for name, variant in VARIANTS.items():
        out[name] = inspect(*variant)
        if name in ALIGNED:
            out[f"{name} aligned"] = inspect(*variant, vec=ALIGNED[name])
    return out


def late_loads(ops: list[str]) -> list[str]:
    """The global loads after the first global store (each waits for the stores before it)."""
    first = next((k for k, op in enumerate(ops) if op.startswith("STG")), len(ops))
    return [op for op in ops[first:] if op.startswith("LDG")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the per-variant facts as one JSON line")
    args = parser.parse_args()
    results = inspect_all()
    if args.json:
        print(json.dumps(results))
        return
    print("| variant | registers | spills | loads after the first store | 128-bit loads |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['regs']} | {r['spills']} | {len(late_loads(r['ops']))} | {r['ops'].count('LDG.E.128')} |")


if __name__ == "__main__":
    main()
