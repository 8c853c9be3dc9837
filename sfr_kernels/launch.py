"""How the fused kernels are launched: tile configurations, ``tl.dot`` precision, output buffers.

Every launcher takes its configuration from :func:`launch_configs`, and ``compile_check`` compiles
exactly the same dictionaries for sm_90 (registers, spills, shared memory, and the SASS-based
performance model), so the tiles that are measured are the tiles that run.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import triton

DEBUG_ENV = "SFR_KERNELS_DEBUG"  # "1": fill kernel outputs with NaN first, so an unwritten element shows
# "gpu" | "interpreter": the tiles to launch with, whatever runs the kernels. Unset: the tiles of where
# they run. "gpu" under the interpreter runs the GPU's grids and tiles on the CPU (bench.work counts
# their work; tests check their results).
TILES_ENV = "SFR_KERNELS_TILES"


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def new_buffer(shape, dtype, device) -> torch.Tensor:
    """``torch.empty`` for a buffer a kernel writes, or a NaN-poisoned one in debug mode (catches
    elements a kernel skips)."""
    if os.environ.get(DEBUG_ENV) == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def device_guard(device: torch.device):
    """Launch on the tensors' GPU (Triton uses the current device)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class LaunchConfigs:
    """Per-kernel launch configuration: ``BLOCK_*``/``GROUP_M`` constexprs plus ``num_warps``/``num_stages``.

    Each dict is passed as is to ``kernel[grid](..., **config)``.
    """

    inputs: dict  # flow_inputs_kernel: BLOCK_R, BLOCK_E, BLOCK_F
    layer: dict  # linear_silu_kernel (forward hidden layers): BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M
    layer_backward: dict  # linear_silu_backward_kernel: same keys
    output: dict  # output_loss_kernel: same keys (its epilogue regenerates x0: smaller tiles)
    weight_grad: dict  # weight_grad_kernel: same keys
    scatter: dict  # scatter_rows_kernel: BLOCK_D
    min_rows_per_split: int  # weight gradients: fixed row ranges of at least this many rows


def _gemm(m, n, k, warps, stages, group=8):
    return dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=group, num_warps=warps, num_stages=stages)


def _pow2(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(x), 1))))


def launch_configs(dtype: torch.dtype = torch.bfloat16, target: str | None = None) -> LaunchConfigs:
    """Tiles for a head of parameter ``dtype`` on ``target`` ("gpu" or "interpreter"; default: where
    kernels run now).

    GPU (H100/H200, sm_90): 16-bit heads run wgmma-sized tiles (128 rows x 128-256 columns, 8 warps,
    a 3-4 stage pipeline), chosen with ``python -m sfr_kernels.compile_check --model`` so that no
    variant spills registers under Triton 3.6 and 3.9; the output layer's tile is smaller because its
    epilogue regenerates ``x0`` in registers (Philox is register-hungry). float32 heads (``tl.dot``
    without tensor cores unless TF32 is on) get smaller tiles. Interpreter: large tiles and few
    programs (its cost grows with the number of programs). ``tl.dot`` needs every dimension >= 16.
    """
    if target is None:
        target = os.environ.get(TILES_ENV) or ("interpreter" if interpreting() else "gpu")
    if target == "interpreter":
        gemm = _gemm(64, 64, 64, 4, 1)
        return LaunchConfigs(inputs=dict(BLOCK_R=64, BLOCK_E=128, BLOCK_F=64, num_warps=4),
                             layer=gemm, layer_backward=gemm, output=gemm, weight_grad=gemm,
                             scatter=dict(BLOCK_D=256, num_warps=4), min_rows_per_split=32)
    if target != "gpu":
        raise ValueError(f"target (or ${TILES_ENV}) must be 'gpu' or 'interpreter', got {target!r}")
    inputs = dict(BLOCK_R=32, BLOCK_E=64, BLOCK_F=64, num_warps=8)
    scatter = dict(BLOCK_D=256, num_warps=4)
    if dtype == torch.float32:
        gemm = _gemm(64, 64, 32, 4, 3)
        return LaunchConfigs(inputs=inputs, layer=gemm, layer_backward=gemm, output=_gemm(32, 64, 32, 4, 3),
                             weight_grad=gemm, scatter=scatter, min_rows_per_split=2048)
    gemm = _gemm(128, 128, 64, 8, 3)  # 96 KiB of pipeline: two programs per SM
    # The backward layers' epilogue (silu', the activation, the anchor sums) needs more registers: 64-row
    # tiles keep two programs per SM. The output layer's (x0 regenerated) likewise.
    return LaunchConfigs(inputs=inputs, layer=gemm, layer_backward=_gemm(64, 128, 64, 4, 4),
                         output=_gemm(64, 128, 64, 4, 4), weight_grad=gemm, scatter=scatter, min_rows_per_split=2048)


def weight_grad_splits(rows: int, tiles: int, config: LaunchConfigs, sm_count: int = 132) -> tuple[int, int]:
    """``(splits, rows_per_split)`` of a weight gradient's sum over ``rows`` (``tiles`` output tiles).

    The split count that gives the busiest SM the least work: ``ceil(tiles * splits / sm_count) / splits``
    of one tile's full sum (so the programs fill whole waves), each split summing at least
    ``config.min_rows_per_split`` rows (a multiple of BLOCK_K), at most 32 splits. The float32 partial
    sums are added in a fixed order, so the result does not depend on timing.
    """
    block_k = config.weight_grad["BLOCK_K"]
    most = max(1, min(32, rows // max(config.min_rows_per_split, 1)))
    splits = min(range(1, most + 1), key=lambda s: (triton.cdiv(max(tiles, 1) * s, sm_count) / s, s))
    rows_per_split = block_k * triton.cdiv(triton.cdiv(max(rows, 1), splits), block_k)
    return triton.cdiv(max(rows, 1), rows_per_split), rows_per_split


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (132, an H100 SXM's, where there is no GPU: the tiles and
    grids are the same code either way)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision. 16-bit heads: tensor cores (the setting only matters for float32).
    float32 heads follow torch's own matmul setting, so the kernels round like the cuBLAS GEMMs around
    them: exact products ("ieee") by default, TF32 after ``torch.set_float32_matmul_precision("high")``.
    """
    if dtype != torch.float32:
        return "tf32"
    return "tf32" if fp32_matmul_uses_tf32() else "ieee"


def fp32_matmul_uses_tf32() -> bool:
    """Whether torch's float32 CUDA matmuls use TF32, under either of torch's precision APIs.

    torch >= 2.9 raises on reading ``matmul.allow_tf32`` once the new API
    (``torch.backends.fp32_precision = "tf32"``, which transformers' ``--tf32`` sets) has been used;
    ``matmul.fp32_precision`` reflects both APIs and never raises ("none" = the global setting).
    """
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:  # torch < 2.9: only the legacy flag exists
        return bool(matmul.allow_tf32)
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "ieee")
    return precision == "tf32"
