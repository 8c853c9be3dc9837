"""The static performance model's pieces on known inputs: the cheapest path through a SASS listing, the
occupancy rule, and the launch plan the fused op records on the meta device (no GPU, no compiler)."""
import torch

from sfr_kernels import perf_model
from sfr_kernels.perf_model import Device, Instruction, cheapest_path, programs_per_sm

# entry (3) -> loop of 4 with an HGMMA (back edge at 0x60) -> a cheap way and a slow way to EXIT; an
# out-of-line slow path after EXIT returns with a branch backwards (not a loop: its target does not dominate it)
LISTING = [
    (0x00, "MOV R1, c[0x0][0x28]"), (0x10, "S2R R0, SR_CTAID.X"), (0x20, "ISETP.GE.AND P0, PT, R0, 0x4, PT"),
    (0x30, "LDGSTS [R2], desc[UR4][R4.64]"), (0x40, "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24"),
    (0x50, "IADD3 R3, R3, 0x1, RZ"), (0x60, "@P0 BRA 0x30"),
    (0x70, "@P1 BRA 0xc0"), (0x80, "FADD R5, R5, R6"), (0x90, "STG.E [R8.64], R5"), (0xa0, "EXIT"),
    (0xb0, "BRA 0xb0"),  # padding after the last EXIT (a self-loop: never reached)
    (0xc0, "MUFU.RCP R7, R5"), (0xd0, "FFMA R7, R7, R5, R6"), (0xe0, "BRA 0x80"),
]


def test_cheapest_path_weights_loops_by_their_trips_and_skips_slow_paths():
    instructions = [Instruction(addr, text) for addr, text in LISTING]
    path = cheapest_path(instructions, [("HGMMA", 10)])
    # 3 entry + 10 x 4 loop + (@P1 BRA, FADD, STG, EXIT): the out-of-line path (3 more) is never cheaper
    assert path.instructions == 3 + 10 * 4 + 4
    assert path.tensor == 10 and path.looped == 40
    once = cheapest_path(instructions, [])  # an unmatched loop runs once
    assert once.instructions == 3 + 4 + 4


def test_programs_per_sm_follows_registers_shared_memory_and_warps():
    h100 = Device()
    assert programs_per_sm(h100, warps=8, registers=128, shared=96 * 1024) == 2  # 32K registers each
    assert programs_per_sm(h100, warps=8, registers=129, shared=0) == 1  # 129 -> 136 per thread: over half
    assert programs_per_sm(h100, warps=4, registers=64, shared=0) == 8  # registers: 8 x 8K
    assert programs_per_sm(h100, warps=8, registers=32, shared=0) == 8  # warps: 64 / 8
    assert programs_per_sm(h100, warps=4, registers=32, shared=100 * 1024) == 2  # shared memory


def test_the_plan_is_the_fused_ops_own_launch_sequence():
    plan = perf_model.headline_plan(n=256, m=4, d=96, e=48, width=64, depth=2, features=16)
    assert [launch.name for launch in plan.launches] == [
        "flow_inputs_kernel", "linear_silu_kernel", "linear_silu_kernel", "output_loss_kernel", "weight_grad_kernel",
        "linear_silu_backward_kernel", "linear_silu_backward_kernel", "weight_grad_kernel", "weight_grad_kernel"]
    # cuBLAS: c = h W_c^T forward, dW_c and dh backward: 2 N D Hd FLOPs each
    assert [flops for _, flops in plan.gemm_flops] == [2.0 * 256 * 96 * 64] * 3
    first = plan.launches[1]
    assert first.args["K"] == 48 + 16 and first.args["R"] == 256 * 4  # X = [x_s | e_s] through [W_x | W_t]
    assert torch.Size(first.args["a_ptr"][0]) == (256 * 4, 64)
