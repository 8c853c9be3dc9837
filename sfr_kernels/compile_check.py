"""Ahead-of-time compilation of every fused kernel for a GPU target, without a GPU.

``python -m sfr_kernels.compile_check`` compiles each kernel, in the launch configuration the
launchers use (``fused_loss.launch_configs`` with the interpreter off), for float32/bfloat16/float16 heads
and every constexpr variant that changes code (time sampling, explicit noise, x/e features), down to
a cubin for ``sm_90a`` (H100/H200) with Triton's bundled ``ptxas``, and prints registers, spills and
shared memory per variant. It catches what the CPU interpreter cannot: type errors in the compiled
dialect, unsupported constructs, and register spills of the chosen tile sizes.

It needs ``TRITON_INTERPRET`` unset (the kernels must be real ``JITFunction``s), so run it in its
own process. Compiling is slow (seconds per variant); the CI test compiles a subset.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

_PTR = {"float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16"}


@dataclass
class CompileResult:
    kernel: str
    variant: str
    registers: int
    spill_bytes: int
    shared_bytes: int


def _variants(dtype: str, quick: bool):
    """(name, kernel, signature, constexprs, options) for each kernel variant of one head dtype."""
    import torch

    from sfr_kernels import fused_loss
    from sfr_kernels.flow_input import flow_input_forward_kernel, flow_input_weight_grad_kernel
    from sfr_kernels.flow_output import flow_output_loss_kernel
    from sfr_kernels.scatter_rows import scatter_rows_kernel

    configs = fused_loss.launch_configs(width=1024, embed=384, features=64, hidden_size=4096,
                                       dtype=getattr(torch, dtype))
    w = _PTR[dtype]
    precision = "ieee" if dtype == "float32" else "tf32"
    scalars = {"source_std": "fp32", "time_mean": "fp32", "time_std": "fp32"}

    modes = [(1, False), (2, False), (0, True), (3, False)]  # (TIME_MODE, EXPLICIT_NOISE)
    if quick:
        modes = modes[:1]
    for time_mode, explicit in modes:
        sig = {"seed_ptr": "*i64", "noise_ptr": "*fp32", "time_ptr": "*fp32", "target_ptr": "*fp32",
               "cond_ptr": w, "wx_ptr": w, "wt_ptr": w, "freq_ptr": w, "z_ptr": w,
               "R": "i32", "M": "i32", "E": "i32", "F": "i32", "HD": "i32", "stride_target": "i32", **scalars}
        const = {"TIME_MODE": time_mode, "EXPLICIT_NOISE": explicit, "DOT_PRECISION": precision}
        yield (f"time_mode={time_mode} noise={explicit}", flow_input_forward_kernel, sig, const,
               configs.input_forward)
        if dtype != "float32" and time_mode == 1:  # a float32 head under autocast: float32 frequencies
            yield (f"time_mode={time_mode} noise={explicit} autocast", flow_input_forward_kernel,
                   dict(sig, freq_ptr="*fp32"), const, configs.input_forward)
        for features in (False, True):
            sig = {"seed_ptr": "*i64", "noise_ptr": "*fp32", "time_ptr": "*fp32", "target_ptr": "*fp32",
                   "freq_ptr": w, "dz_ptr": w, "partial_ptr": "*fp32", "R": "i32", "M": "i32", "E": "i32",
                   "F": "i32", "HD": "i32", "rows_per_split": "i32", "stride_target": "i32", **scalars}
            const = {"TIME_FEATURES": features, "TIME_MODE": time_mode, "EXPLICIT_NOISE": explicit,
                     "DOT_PRECISION": precision}
            yield (f"{'e_s' if features else 'x_s'} time_mode={time_mode} noise={explicit}",
                   flow_input_weight_grad_kernel, sig, const,
                   configs.weight_grad_t if features else configs.weight_grad_x)
    for explicit in (False,) if quick else (False, True):
        sig = {"seed_ptr": "*i64", "noise_ptr": "*fp32", "target_ptr": "*fp32", "z_ptr": w, "wo_ptr": w,
               "bo_ptr": w, "coef_ptr": "*fp32", "grad_v_ptr": _PTR[str(fused_loss._gradient_dtype(getattr(torch, dtype)))[6:]], "row_sq_ptr": "*fp32", "R": "i32", "M": "i32",
               "E": "i32", "HD": "i32", "stride_target": "i32", "source_std": "fp32"}
        const = {"EXPLICIT_NOISE": explicit, "WRITE_GRAD": True, "DOT_PRECISION": precision}
        yield f"noise={explicit}", flow_output_loss_kernel, sig, const, configs.output_loss
    sig = {"src_ptr": w, "sorted_index_ptr": "*i64", "order_ptr": "*i64", "out_ptr": w, "scale_ptr": "*fp32",
           "N": "i32", "D": "i32"}
    yield "", scatter_rows_kernel, sig, {}, configs.scatter


def _ptxas_candidates(capability: int) -> list[str]:
    """The ptxas that Triton itself uses for ``capability`` first (its register counts are the real
    ones: Triton 3.6 and 3.9 pick different bundled ptxas versions for sm_90), then the bundled others."""
    import triton

    candidates = []
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        candidates.append(get_ptxas(capability).path)
    except Exception:  # an older or newer Triton without it: fall back to the bundled binaries
        pass
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return candidates + [os.path.join(bin_dir, name) for name in ("ptxas", "ptxas-blackwell")]


def _ptxas_report(ptx: str, capability: int) -> tuple[int, int]:
    """(registers, spill bytes) from ``ptxas -v`` for ``sm_{capability}a``."""
    arch = f"sm_{capability}a"
    candidates = _ptxas_candidates(capability)
    for ptxas in candidates:
        if not os.path.exists(ptxas):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "kernel.ptx")
            with open(path, "w") as f:
                f.write(ptx)
            proc = subprocess.run([ptxas, f"-arch={arch}", "-v", path, "-o", os.path.join(tmp, "k.cubin")],
                                  capture_output=True, text=True)
        if proc.returncode != 0:
            continue
        regs = re.search(r"Used (\d+) registers", proc.stderr)
        spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", proc.stderr)]
        return (int(regs.group(1)) if regs else -1), sum(spills)
    return -1, -1


def compile_all(dtypes=("float32", "bfloat16", "float16"), capability: int = 90, quick: bool = False):
    """Compile every variant to a cubin; returns a CompileResult per variant (raises on a compile error)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (run it in its own process)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = []
    for dtype in dtypes:
        for variant, kernel, signature, constexprs, config in _variants(dtype, quick):
            options = {k: v for k, v in config.items() if k in ("num_warps", "num_stages")}
            constexprs = dict(constexprs, **{k: v for k, v in config.items() if k.startswith("BLOCK_")})
            signature = dict(signature, **{name: "constexpr" for name in constexprs})
            source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
            compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
            regs, spills = _ptxas_report(compiled.asm["ptx"], capability)
            results.append(CompileResult(kernel.__name__, f"{dtype} {variant}".strip(), regs, spills,
                                         int(compiled.metadata.shared)))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Compile every fused SFR kernel for a CUDA target (no GPU needed) "
                                                 "and report registers, spills and shared memory.")
    parser.add_argument("--capability", type=int, default=90, help="compute capability, e.g. 90 (H100/H200)")
    parser.add_argument("--quick", action="store_true", help="one time-sampling variant per kernel only")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"], choices=list(_PTR))
    args = parser.parse_args(argv)
    results = compile_all(tuple(args.dtypes), args.capability, args.quick)
    print(f"{'kernel':32s} {'variant':40s} {'regs':>5s} {'spill B':>8s} {'smem B':>8s}")
    for r in results:
        print(f"{r.kernel:32s} {r.variant:40s} {r.registers:5d} {r.spill_bytes:8d} {r.shared_bytes:8d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
