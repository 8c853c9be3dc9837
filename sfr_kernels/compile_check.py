"""Ahead-of-time compilation of every fused kernel for a GPU target, without a GPU.

``python -m sfr_kernels.compile_check`` compiles each kernel, in the launch configuration the
launchers use on a GPU (``launch.launch_configs(target="gpu")``), for float32/bfloat16/float16 heads
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
    """(name, kernel, signature, constexprs, config) for each kernel variant of one head dtype."""
    import torch

    from sfr_kernels.flow_draws import flow_inputs_kernel
    from sfr_kernels.flow_layers import linear_silu_backward_kernel, linear_silu_kernel
    from sfr_kernels.flow_output import output_loss_kernel
    from sfr_kernels.launch import launch_configs
    from sfr_kernels.reference import TIME_MODES
    from sfr_kernels.scatter_rows import scatter_rows_kernel
    from sfr_kernels.weight_grad import weight_grad_kernel

    configs = launch_configs(getattr(torch, dtype), target="gpu")
    w = _PTR[dtype]
    precision = "ieee" if dtype == "float32" else "tf32"
    f32, i32 = "fp32", "i32"

    modes = [("uniform", False), ("logit_normal", False), ("explicit", True), ("zero", False)]
    for time_sampling, explicit in modes[:1] if quick else modes:
        sig = {"key_ptr": "*i64", "noise_ptr": "*fp32", "time_ptr": "*fp32", "target_ptr": w, "freq_ptr": w,
               "x_ptr": w, "R": i32, "M": i32, "E": i32, "F": i32, "stride_target": i32, "stride_x": i32,
               "source_std": f32, "time_mean": f32, "time_std": f32}
        const = {"TIME_MODE": TIME_MODES[time_sampling], "EXPLICIT_NOISE": explicit}
        yield f"time={time_sampling} noise={explicit}", flow_inputs_kernel, sig, const, configs.inputs
        if dtype != "float32" and time_sampling == "uniform":  # a float32 head under autocast: float32 frequencies
            yield (f"time={time_sampling} noise={explicit} autocast", flow_inputs_kernel,
                   dict(sig, freq_ptr="*fp32"), const, configs.inputs)
    for per_anchor in (True, False):
        sig = {"a_ptr": w, "w_ptr": w, "bias_ptr": w, "z_ptr": w, "act_ptr": w, "R": i32, "NOUT": i32, "K": i32,
               "M": i32, "stride_a": i32, "stride_w": i32, "stride_bias": i32}
        yield (f"{'first layer (c per anchor)' if per_anchor else 'hidden layer (bias)'}", linear_silu_kernel, sig,
               {"BIAS_PER_ANCHOR": per_anchor, "DOT_PRECISION": precision}, configs.layer)
    for store_activation, samples in ((False, 0), (True, 4), (True, 0)):
        sig = {"dy_ptr": w, "w_ptr": w, "z_ptr": w, "dz_ptr": w, "act_ptr": w, "anchor_sum_ptr": "*fp32", "R": i32,
               "NZ": i32, "K": i32, "stride_dy": i32, "stride_w": i32}
        yield (f"{'with activation' if store_activation else 'dz only'}{' + anchor sums (M=4)' if samples else ''}",
               linear_silu_backward_kernel, sig,
               {"STORE_ACTIVATION": store_activation, "ANCHOR_SAMPLES": samples, "DOT_PRECISION": precision},
               configs.layer_backward)
    for explicit, weighted in ((False, False),) if quick else ((False, False), (False, True), (True, False)):
        sig = {"a_ptr": w, "w_ptr": w, "bias_ptr": w, "key_ptr": "*i64", "noise_ptr": "*fp32", "target_ptr": w,
               "weight_ptr": "*fp32", "grad_v_ptr": w, "row_sq_ptr": "*fp32", "R": i32, "E": i32, "K": i32, "M": i32,
               "stride_a": i32, "stride_target": i32, "source_std": f32}
        const = {"EXPLICIT_NOISE": explicit, "HAS_WEIGHT": weighted, "WRITE_GRAD": True, "DOT_PRECISION": precision}
        yield f"noise={explicit} weight={weighted}", output_loss_kernel, sig, const, configs.output
    for bias in (True, False):
        sig = {"dz_ptr": w, "a_ptr": w, "partial_ptr": "*fp32", "bias_partial_ptr": "*fp32", "R": i32, "NOUT": i32,
               "NIN": i32, "rows_per_split": i32, "stride_dz": i32, "stride_a": i32}
        yield (f"bias={bias}", weight_grad_kernel, sig, {"BIAS_GRAD": bias, "DOT_PRECISION": precision},
               configs.weight_grad)
    sig = {"src_ptr": w, "sorted_index_ptr": "*i64", "order_ptr": "*i64", "out_ptr": w, "N": i32, "D": i32}
    yield "", scatter_rows_kernel, sig, {}, configs.scatter


def _headline_specialization(kernel, signature: dict) -> dict:
    """The ``tt.divisibility`` hints the JIT gives a launch at the headline shape: torch allocations are
    16-byte aligned, and every size and stride there is a multiple of 16 except M (samples per anchor).
    Without them Triton cannot vectorise loads nor pipeline them with cp.async, and the register and
    shared-memory numbers would describe code that never runs."""
    return {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name, kind in signature.items()
            if kind.startswith("*") or (kind == "i32" and name != "M")}


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
            constexprs = dict(constexprs, **{k: v for k, v in config.items() if k not in options})
            signature = dict(signature, **{name: "constexpr" for name in constexprs})
            source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                               attrs=_headline_specialization(kernel, signature))
            compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
            regs, spills = _ptxas_report(compiled.asm["ptx"], capability)
            results.append(CompileResult(kernel.__name__, f"{dtype} {variant}".strip(), regs, spills,
                                         int(compiled.metadata.shared)))
    return results


_POINTER = {torch_name: f"*{short}" for torch_name, short in
            (("bfloat16", "bf16"), ("float16", "fp16"), ("float32", "fp32"), ("int64", "i64"), ("int32", "i32"))}


def _compile_launch(launch, capability: int):
    """Compile exactly the variant a recorded launch runs, specialised as the JIT would specialise its
    arguments (ints equal to 1 become constants, ints and pointers divisible by 16 get the hint)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = launch.kernel
    options = {k: v for k, v in launch.constexprs.items() if k in ("num_warps", "num_stages")}
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        value = launch.args.get(name)
        if name in launch.constexprs or value is None or (isinstance(value, int) and value == 1):
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, tuple):  # (shape, dtype, storage id)
            signature[name] = _POINTER[str(value[1]).replace("torch.", "")]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 256-byte aligned
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)


def model(capability: int = 90) -> str:
    """The static performance model at the headline shape (``sfr_kernels.perf_model``): a Markdown report."""
    from sfr_kernels import perf_model

    plan = perf_model.headline_plan()
    compiled, estimates = {}, []
    for launch in plan.launches:
        key = (launch.name, tuple(sorted((k, str(v)) for k, v in launch.constexprs.items())),
               tuple(sorted((k, str(v)) for k, v in launch.args.items() if not isinstance(v, tuple))))
        if key not in compiled:
            kernel = _compile_launch(launch, capability)
            regs, spills = _ptxas_report(kernel.asm["ptx"], capability)
            compiled[key] = (perf_model.disassemble(kernel.asm["cubin"]), regs, spills, int(kernel.metadata.shared))
        estimates.append(perf_model.estimate_launch(launch, *compiled[key]))
    return perf_model.render_estimate(estimates, plan)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Compile every fused SFR kernel for a CUDA target (no GPU needed) "
                                                 "and report registers, spills and shared memory.")
    parser.add_argument("--capability", type=int, default=90, help="compute capability, e.g. 90 (H100/H200)")
    parser.add_argument("--quick", action="store_true", help="one time-sampling variant per kernel only")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"], choices=list(_PTR))
    parser.add_argument("--model", action="store_true",
                        help="instead: the static performance model (an ESTIMATE from the SASS) of one forward + "
                             "backward at the headline shape (N=16384, M=4, D=3584, E=768, width 1024, depth 2, bf16)")
    args = parser.parse_args(argv)
    if args.model:
        print(model(args.capability))
        return 0
    results = compile_all(tuple(args.dtypes), args.capability, args.quick)
    print(f"{'kernel':32s} {'variant':40s} {'regs':>5s} {'spill B':>8s} {'smem B':>8s}")
    for r in results:
        print(f"{r.kernel:32s} {r.variant:40s} {r.registers:5d} {r.spill_bytes:8d} {r.shared_bytes:8d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
