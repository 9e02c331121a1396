"""Performance model of the margin-loss kernels: predicted, never measured.

For every kernel of one forward (+ backward) of each design this module counts

* FLOPs on the tensor cores (GEMM-shaped work, recomputation included),
* element-wise epilogue work per logit (ALU instructions and MUFU exponentials),
* modelled HBM bytes, with the number of times W and dW are streamed derived from the launch
  order and the L2 size,
* fp32 atomics,
* programs, programs per wave and the wave efficiency on the machine's SMs,

and predicts its time as ``max(compute / wave efficiency, bytes / bandwidth, atomics / atomic
rate) + launch``; the term that wins is the kernel's bound. The ceilings and every assumption are
the constants of :data:`MACHINES` and :data:`ASSUMPTIONS`, printed with the tables.

Designs:

* ``gemm``: the three bare GEMMs of the same shapes (z = x W^T, dX = dz W, dW = dz^T x) through
  cuBLAS, the yardstick every ratio is taken against;
* ``triton`` new: the launches of ``margin_kernels.ops.triton.config.plan`` (the launchers' own
  configuration), costed by each launch's ``role``; where that module is not importable, the
  model's own reading of the four-GEMM design (documented in :func:`reference_new_plan`);
* ``triton`` old: the launch configuration of the pre-rewrite launchers (``_tiles``,
  ``_forward``, ``_backward``) transcribed here: a fused atomic backward or the deterministic
  row/column kernels, a C x D fp32 dW scratch and its zero/norm/cast passes;
* ``cuda`` old: row chunks sized from a 256 MiB budget, W streamed three times per chunk, fp32
  dW temporaries, one 256-thread block per row in the epilogues;
* ``cuda`` new: class chunks from ``margin_kernels.ops.cuda.chunk_plan`` (or the model's reading
  of the class-chunk design where that function is missing).

Run ``python bench/model.py [--machine h100|h200|both] [--markdown PATH] [--csv PATH]``.
Only the cosine-logit families (CosFace, ArcFace, combined, SphereFace, ...) are modelled;
W-Softmax's second gram GEMM is not.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

try:  # the launchers' own configuration (pure Python, importable without Triton)
    from margin_kernels.ops.triton.config import Launch
    from margin_kernels.ops.triton.config import plan as triton_plan

    HAS_TRITON_PLAN = True
except ImportError:  # pre-rewrite tree: the model falls back to its own reading of the design
    HAS_TRITON_PLAN = False
    triton_plan = None

    @dataclass(frozen=True)
    class Launch:  # the contract's fields, so that tests and the fallback plan build the same
        """One kernel launch (same fields as ``margin_kernels.ops.triton.config.Launch``)."""

        phase: str
        kernel: str
        role: str
        grid: tuple[int, ...]
        block_m: int
        block_n: int
        block_k: int
        num_warps: int
        num_stages: int
        row_tiles_per_program: int
        col_tiles_per_program: int
        order: str


try:
    from margin_kernels.ops.cuda import chunk_plan

    HAS_CHUNK_PLAN = True
except ImportError:
    HAS_CHUNK_PLAN = False
    chunk_plan = None

PREDICTED = "predicted"
MiB = 2**20

# Per-thread SASS instructions of the main loop of every sm_90 Triton GEMM build, written by
# ``python tests/triton_aot.py --sass-json bench/triton_sass_sm90.json`` (the same builds the
# ahead-of-time check compiles). The new Triton design's epilogue is costed from these issue
# counts; a build missing from the file falls back to the per-logit ALU assumption.
SASS_FILE = Path(__file__).with_name("triton_sass_sm90.json")


def load_sass_counts(path: Path = SASS_FILE) -> list[dict]:
    """The builds of the SASS file (empty when it is missing)."""
    if not path.exists():
        return []
    return json.loads(path.read_text())["builds"]


SASS_COUNTS = load_sass_counts()


# --------------------------------------------------------------------------------------------
# ceilings and assumptions
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Machine:
    """Ceilings of one GPU. Rates in operations (or bytes) per second."""

    key: str
    name: str
    bf16_peak: float  # dense bf16/fp16 tensor-core FLOP/s (datasheet)
    gemm_rate: float  # what a tuned cuBLAS bf16 GEMM reaches on random data
    tf32_peak: float  # dense TF32 tensor-core FLOP/s
    fp32_fma: float  # plain fp32 FLOP/s (FMA = 2)
    hbm_bw: float  # bytes/s, read + write counted (device copy)
    l2_bytes: int
    num_sms: int
    clock_hz: float  # SM clock under load
    atomic_rate: float  # fp32 red.add element updates per second resolved in L2
    source: str


MACHINES = {
    "h100": Machine(
        key="h100",
        name="H100 SXM",
        bf16_peak=989e12,
        # same SMs and clocks as the H200, whose cuBLAS bf16 GEMM was measured at ~790 TFLOP/s
        gemm_rate=790e12,
        tf32_peak=494e12,
        fp32_fma=67e12,
        hbm_bw=3.35e12,
        l2_bytes=50 * 10**6,
        num_sms=132,
        clock_hz=1.98e9,
        atomic_rate=5e11,
        source="datasheet (bandwidth 3.35 TB/s is the datasheet figure, not a measured copy)",
    ),
    "h200": Machine(
        key="h200",
        name="H200",
        bf16_peak=989e12,
        gemm_rate=790e12,
        tf32_peak=494e12,
        fp32_fma=67e12,
        hbm_bw=4.3e12,
        l2_bytes=60 * 10**6,
        num_sms=132,
        clock_hz=1.98e9,
        atomic_rate=5e11,
        source="measured on one H200: 790 TFLOP/s bf16 GEMM, 4.3 TB/s device copy",
    ),
}


@dataclass(frozen=True)
class Assumptions:
    """Modelling assumptions beyond the ceilings (all stated in docs/performance_model.md)."""

    # Fraction of the dense bf16 peak a Triton GEMM-shaped tile loop reaches, by the smaller and
    # larger of the tile's M x N sides (wgmma wants M >= 64, N >= 128 to stay busy).
    triton_mma_fraction: tuple[tuple[int, int, float], ...] = (
        (128, 256, 0.80),
        (128, 128, 0.75),
        (64, 256, 0.70),
        (64, 128, 0.65),
        (64, 64, 0.45),
        (32, 32, 0.30),
        (0, 0, 0.15),
    )
    # K steps narrower than 64 add per-step overhead (fewer MMAs per barrier)
    narrow_k_factor: float = 0.85
    # New Triton design, one product at a time (``mma_fraction``): the instruction a tile maps
    # to, the shared-memory bandwidth its operands need, and what a tuned loop keeps of the rest.
    # wgmma (M = 64 per warpgroup) can reach the dense peak; Hopper runs the legacy mma.sync
    # (M < 64 per warpgroup) at ~60 % of it (FlashAttention-2 against -3 on H100)
    wgmma_ceiling: float = 1.0
    mma_sync_ceiling: float = 0.6
    # shared memory feeds 128 B/clk per SM (32 banks x 4 B); ldmatrix / wgmma descriptors read
    # each operand fragment from it once per 16-deep K step
    smem_bytes_per_clk: int = 128
    # the second product's A operand P: False when the logits MMA splits N over the
    # warpgroups (each then reads the whole P tile from shared memory, like an A operand)
    p_in_registers: bool = False
    # the best a tuned tile loop keeps (cuBLAS: 790 of 989 TFLOP/s)
    triton_loop_fraction: float = 0.8
    # one stage and one resident program per SM: nothing hides a tile step's loads; the
    # streamed tile (L2 hits, one HBM miss per sharer group) arrives through the SM's L2 port
    l2_latency_s: float = 0.25e-6  # L2 hit under load (~500 cycles, near and far partitions)
    l2_port_bytes_per_clk: int = 64  # per SM
    # aggregate L2 -> SM bandwidth (H100 microbenchmarks: ~5.5-7 TB/s; the low end), both
    # machines (same chip): the tiles every program re-reads from L2 (W by the row-block
    # programs of the forward, x by every dW owner) cannot arrive faster
    l2_bw: float = 5.5e12
    # the epilogue's dependent ALU chains need ~4 warps per scheduler (16 per SM) to issue at
    # full rate; fewer resident warps issue proportionally slower
    warps_to_hide_alu: int = 16
    # register-blocked FMA tiles (fp32 without TF32, fp64): fraction of the FMA rate
    fma_tile_fraction: float = 0.5
    # element-wise work per logit (issue-slot instructions, then MUFU exp2) by role
    alu_per_logit: dict = field(
        default_factory=lambda: {
            "forward": 10,
            "dw": 14,
            "dx": 14,
            "fused_bwd": 16,
            "det_rows": 14,
            "det_cols": 14,
            "epilogue_fwd": 12,
            "epilogue_bwd": 16,
        }
    )
    mufu_per_logit: int = 1
    alu_lanes_per_clk: int = 128  # per SM: 4 schedulers x 32 lanes
    # warp instructions issued per SM per clock (4 schedulers, one each): the ceiling for a
    # loop costed from its SASS; its 16 independent logits per thread give the ILP that two
    # warps per scheduler lack, so no further issue-efficiency factor is applied to it
    issue_per_clk: int = 4
    # what-if switch: fraction of the counted SASS a leaner loop would issue
    issue_scale: float = 1.0
    mufu_lanes_per_clk: int = 16  # per SM
    # Triton (no warp specialisation): the exponentials and epilogue do not overlap the MMAs
    epilogue_overlaps_mma: bool = False
    # what-if switch: tile loads hidden behind the MMAs (>= 2 stages or 2 programs per SM)
    loads_overlap: bool = False
    # L2 share a working set may use and still be re-read from L2 rather than HBM
    l2_usable_fraction: float = 0.5
    launch_s: float = 4e-6  # launch + ramp + tail of one kernel, stream-ordered
    torch_op_s: float = 6e-6  # one small torch op (launch-bound)
    mem_latency_s: float = 0.7e-6  # DRAM load latency under load
    cuda_block_loads_in_flight: int = 2  # 16-byte loads per thread in flight (epilogue loop)
    # a few programs on an otherwise idle chip pull at most this multiple of their fair share
    bandwidth_share_boost: float = 2.0


ASSUMPTIONS = Assumptions()


# --------------------------------------------------------------------------------------------
# shapes
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """One loss evaluation: x (batch, dim), W (num_classes, dim), S sampled classes."""

    name: str
    batch: int
    num_classes: int
    dim: int
    dtype: torch.dtype = torch.bfloat16
    kind: str = "arcface"
    sample_rate: float = 1.0

    @property
    def sampled(self) -> int:
        """S, the classes in the denominator (Partial-FC keeps ceil(rate C))."""
        if self.sample_rate >= 1.0:
            return self.num_classes
        return max(1, math.ceil(self.sample_rate * self.num_classes))

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def acc_size(self) -> int:
        return 8 if self.dtype == torch.float64 else 4


SHAPES = (
    Shape("headline", 1024, 1_000_000, 512),
    Shape("C=1e5", 1024, 100_000, 512),
    Shape("Partial-FC r=0.1", 1024, 1_000_000, 512, sample_rate=0.1),
    Shape("per-GPU B=128", 128, 1_000_000, 512),
    Shape("C=1e7", 1024, 10_000_000, 512),
)


# --------------------------------------------------------------------------------------------
# kernel cost
# --------------------------------------------------------------------------------------------
@dataclass
class KernelCost:
    """Modelled cost of one kernel (or one group of identical launches, ``launches`` > 1)."""

    phase: str
    kernel: str
    role: str
    mma_flops: float = 0.0
    mma_rate: float = 0.0  # FLOP/s this kernel's tiles reach on the whole chip
    logits: float = 0.0  # logit elements produced (element-wise epilogue work)
    alu_per_logit: float = 0.0
    hbm_bytes: float = 0.0
    w_passes: float = 0.0  # times W (the sampled part) is streamed from HBM
    dw_passes: float = 0.0  # times the dW buffer is streamed (read + write count as one)
    atomics: float = 0.0
    programs: int = 1
    programs_per_sm: int = 1
    bandwidth_cap: float = math.inf  # bytes/s the resident programs can keep in flight
    launches: int = 1
    fixed_s: float = 0.0  # launch overhead and other latency terms
    stall_s: float = 0.0  # chip-time of exposed load latency (no pipelining), serial with MMAs
    issue_efficiency: float = 1.0  # epilogue issue rate left by the resident warps
    # warp instructions of the whole launch counted from its SASS (tile steps x loop
    # instructions x warps); when set it replaces logits x alu_per_logit as the issue term
    issue_warp_instructions: float = 0.0
    min_s: float = 0.0  # floor (host-side issue of small torch ops)
    note: str = ""
    # filled by evaluate()
    compute_s: float = 0.0
    memory_s: float = 0.0
    atomic_s: float = 0.0
    l2_bytes: float = 0.0  # L2 -> SM traffic of re-read tiles (new Triton design)
    l2_s: float = 0.0
    time_s: float = 0.0
    bound: str = ""
    wave_efficiency: float = 1.0
    waves: int = 1


def wave_efficiency(programs: int, programs_per_sm: int, num_sms: int) -> tuple[float, int]:
    """(busy fraction of the SM slots over all waves, number of waves)."""
    slots = max(1, programs_per_sm * num_sms)
    programs = max(1, programs)
    waves = math.ceil(programs / slots)
    return programs / (waves * slots), waves


def evaluate(cost: KernelCost, machine: Machine, a: Assumptions = ASSUMPTIONS) -> KernelCost:
    """Fill the time terms: compute = MMA + (non-overlapped) epilogue over the wave efficiency;
    memory = bytes over min(HBM, what the resident programs keep in flight); atomics over the
    L2 atomic rate; time = the largest + fixed latency terms."""
    eff, waves = wave_efficiency(cost.programs, cost.programs_per_sm, machine.num_sms)
    cost.wave_efficiency, cost.waves = eff, waves
    mma_s = cost.mma_flops / cost.mma_rate if cost.mma_flops else 0.0
    if cost.logits:
        per_sm_clk = max(
            (cost.alu_per_logit + a.mufu_per_logit) / a.alu_lanes_per_clk,
            a.mufu_per_logit / a.mufu_lanes_per_clk,
        )
        epi_s = cost.logits * per_sm_clk / (machine.num_sms * machine.clock_hz)
    else:
        epi_s = 0.0
    epi_s /= max(cost.issue_efficiency, 1e-9)
    if cost.issue_warp_instructions:
        issue_s = cost.issue_warp_instructions / (a.issue_per_clk * machine.num_sms
                                                  * machine.clock_hz)  # fmt: skip
        mufu_s = cost.logits * a.mufu_per_logit / (a.mufu_lanes_per_clk * machine.num_sms
                                                   * machine.clock_hz)  # fmt: skip
        epi_s = max(issue_s, mufu_s)
    compute = max(mma_s, epi_s) if a.epilogue_overlaps_mma else mma_s + epi_s
    cost.compute_s = (compute + cost.stall_s) / eff
    active_fraction = min(1.0, cost.programs / machine.num_sms)
    bandwidth = min(
        machine.hbm_bw,
        machine.hbm_bw * active_fraction * a.bandwidth_share_boost,
        cost.bandwidth_cap,
    )
    cost.memory_s = cost.hbm_bytes / bandwidth
    cost.atomic_s = cost.atomics / machine.atomic_rate
    cost.l2_s = cost.l2_bytes / a.l2_bw
    terms = {
        "compute": cost.compute_s,
        "memory": cost.memory_s,
        "atomics": cost.atomic_s,
        "L2": cost.l2_s,
    }
    cost.bound = max(terms, key=terms.get)
    if cost.bound == "memory" and bandwidth < machine.hbm_bw:
        cost.bound = "latency"  # too few bytes in flight to reach HBM bandwidth
    if cost.bound == "compute" and eff < 0.5:
        cost.bound = "compute (waves)"
    cost.time_s = max(max(terms.values()) + cost.fixed_s + cost.launches * a.launch_s, cost.min_s)
    return cost


def triton_mma_fraction(block_m: int, block_n: int, block_k: int, a: Assumptions = ASSUMPTIONS):
    """Fraction of the bf16 peak a Triton tile loop of this shape reaches (assumption; the old
    design's backward kernels; the new design is costed per product by :func:`mma_fraction`)."""
    small, large = sorted((block_m, block_n))
    fraction = a.triton_mma_fraction[-1][2]
    for min_small, min_large, value in a.triton_mma_fraction:
        if small >= min_small and large >= min_large:
            fraction = value
            break
    if 0 < block_k < 64:
        fraction *= a.narrow_k_factor
    return fraction


def mma_fraction(
    m: int,
    n: int,
    k: int,
    num_warps: int,
    a_in_registers: bool,
    machine: Machine,
    a: Assumptions = ASSUMPTIONS,
) -> float:
    """Fraction of the dense 16-bit peak one m x n x k product of a Triton tile reaches
    (assumption, new design).

    M >= 64 maps to wgmma (64 rows per warpgroup; the other warpgroups split N), smaller M to
    mma.sync (warps over M in 16-row steps, the rest over N). Per 16-deep K step each
    instruction reads its B fragment (inst_n x 16) and, unless A comes from registers (the
    softmax weights P of the second product), its A fragment (inst_m x 16) from shared memory;
    when that needs more than 128 B/clk at the instruction's ceiling, the MMAs wait on shared
    memory. The result keeps ``triton_loop_fraction`` of that (the rest: barriers, address
    math, tails) and loses ``narrow_k_factor`` more below 64-deep K."""
    sm_macs_per_clk = machine.bf16_peak / (2 * machine.num_sms * machine.clock_hz)
    warpgroups = max(1, num_warps // 4)
    if m >= 64 and m % 64 == 0:
        wg_m = min(warpgroups, m // 64)
        inst_m, inst_n = 64, max(8, n // max(1, warpgroups // wg_m))
        ceiling = a.wgmma_ceiling
    else:
        warps_m = max(1, min(num_warps, m // 16))
        inst_m, inst_n = max(16, m // warps_m), max(8, n // max(1, num_warps // warps_m))
        ceiling = a.mma_sync_ceiling
    macs = inst_m * inst_n * 16
    operand_bytes = (0 if a_in_registers else inst_m * 16 * 2) + inst_n * 16 * 2
    needed = ceiling * sm_macs_per_clk * operand_bytes / macs  # B/clk at the ceiling
    fraction = ceiling * min(1.0, a.smem_bytes_per_clk / needed) * a.triton_loop_fraction
    return fraction * (a.narrow_k_factor if 0 < k < 64 else 1.0)


def product_rate(
    shape: Shape,
    machine: Machine,
    m: int,
    n: int,
    k: int,
    num_warps: int,
    a_in_registers: bool,
    a: Assumptions = ASSUMPTIONS,
) -> float:
    """FLOP/s of one product of a new-design tile: :func:`mma_fraction` of the 16-bit peak
    (TF32 scaled alike), or the FMA fraction for FMA tiles."""
    if shape.dtype in (torch.bfloat16, torch.float16) or uses_tensor_cores(shape):
        return mma_peak(shape, machine) * mma_fraction(
            m, n, k, num_warps, a_in_registers, machine, a
        )
    return mma_peak(shape, machine) * a.fma_tile_fraction


def uses_tensor_cores(shape: Shape) -> bool:
    """16-bit inputs always, fp32 when torch allows TF32; fp32 "highest" and fp64 run on FMAs."""
    if shape.dtype in (torch.bfloat16, torch.float16):
        return True
    return shape.dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"


def tile_rate(
    shape: Shape, machine: Machine, block_m: int, block_n: int, block_k: int, a=ASSUMPTIONS
) -> float:
    """FLOP/s of a Triton tile loop: the tensor-core fraction of the peak by tile shape, or a
    fixed fraction of the FMA rate for register-blocked FMA tiles."""
    if uses_tensor_cores(shape):
        return mma_peak(shape, machine) * triton_mma_fraction(block_m, block_n, block_k, a)
    return mma_peak(shape, machine) * a.fma_tile_fraction


def mma_peak(shape: Shape, machine: Machine) -> float:
    """Tensor-core (or FMA) peak for the shape's dtype: bf16/fp16 dense, TF32 when allowed,
    else plain fp32 FMA; fp64 at the fp32 FMA rate over 2 (H100 fp64 is ~half of fp32)."""
    if shape.dtype in (torch.bfloat16, torch.float16):
        return machine.bf16_peak
    if shape.dtype == torch.float32:
        if torch.get_float32_matmul_precision() != "highest":
            return machine.tf32_peak
        return machine.fp32_fma
    return machine.fp32_fma / 2


def programs_per_sm(role: str, num_warps: int) -> int:
    """Resident programs per SM (assumption): GEMM-shaped kernels are register-bound near 255
    registers per thread (65,536 per SM); light row-wise kernels are bounded by 64 warps."""
    if role in ("forward", "dw", "dx", "fused_bwd", "det_rows", "det_cols"):
        return max(1, 65536 // (max(1, num_warps) * 32 * 255))
    return max(1, min(16, 64 // max(1, num_warps)))


def triton_bandwidth_cap(launch: Launch, itemsize: int, machine: Machine, a=ASSUMPTIONS):
    """Bytes/s the resident programs keep in flight: stages x (x tile + W tile) per program."""
    tile_bytes = (max(launch.block_m, 1) + max(launch.block_n, 1)) * max(launch.block_k, 1)
    in_flight = max(1, launch.num_stages) * tile_bytes * itemsize
    resident = min(
        math.prod(launch.grid), programs_per_sm(launch.role, launch.num_warps) * machine.num_sms
    )
    return resident * in_flight / a.mem_latency_s


# --------------------------------------------------------------------------------------------
# W re-reads from launch order and L2
# --------------------------------------------------------------------------------------------
def _row_group(order: str) -> int | None:
    """Size of the row-tile group in a grouped launch order ("... groups of 8 ..."), if any."""
    found = re.search(r"group[s]? of (\d+)", order)
    return int(found.group(1)) if found else None


def w_stream_passes(
    launch: Launch, shape: Shape, machine: Machine, sharers: int, a: Assumptions = ASSUMPTIONS
) -> float:
    """Times the sampled W is read from HBM by a launch in which ``sharers`` programs read every
    W tile.

    One pass when nobody shares, when the whole grid fits in one wave (every sharer resident,
    walking W at the same pace), or when the sampled W fits in the usable L2. Otherwise the
    sharers hit L2 only if they run close together: sharers adjacent in launch order (row tiles
    on the fastest grid axis, or the order says row tiles are fastest) run in the same wave and
    walk the same W tiles together (one pass per wave of sharers); a grouped order re-reads once
    per group; any other order puts a whole W's worth of traffic between two sharers, so every
    sharer streams W again."""
    if sharers <= 1:
        return 1.0
    slots = programs_per_sm(launch.role, launch.num_warps) * machine.num_sms
    if math.prod(launch.grid) <= slots:
        return 1.0  # one wave: every sharer is resident and walks W at the same pace
    w_bytes = shape.sampled * shape.dim * shape.itemsize
    if w_bytes <= a.l2_usable_fraction * machine.l2_bytes:
        return 1.0
    order = launch.order.lower()
    rows_fastest = (len(launch.grid) > 1 and launch.grid[0] == sharers) or bool(
        re.search(r"(row|slice)[^,;.]*fastest", order)
    )
    group = _row_group(order)
    if rows_fastest:
        return float(math.ceil(sharers / max(1, min(sharers, slots))))
    if group:
        return float(math.ceil(sharers / group))
    return float(sharers)


# --------------------------------------------------------------------------------------------
# new Triton design: cost by role
# --------------------------------------------------------------------------------------------
GEMM_ROLES = ("forward", "dw", "dx")


def _padded(n: int, block: int) -> int:
    return math.ceil(n / block) * block if block else n


def cost_of_launch(
    launch: Launch, shape: Shape, machine: Machine, needs_dx: bool, a: Assumptions = ASSUMPTIONS
) -> KernelCost:
    """Cost of one launch of the new Triton plan, from its role, tiles, grid and trip counts."""
    B, S, D = shape.batch, shape.sampled, shape.dim
    isz, acc = shape.itemsize, shape.acc_size
    programs = math.prod(launch.grid)
    cost = KernelCost(
        launch.phase,
        launch.kernel,
        launch.role,
        programs=programs,
        programs_per_sm=programs_per_sm(launch.role, launch.num_warps),
        bandwidth_cap=triton_bandwidth_cap(launch, isz, machine),
    )
    if launch.role in GEMM_ROLES:
        bm, bn = max(launch.block_m, 1), max(launch.block_n, 1)
        tile_steps = programs * launch.row_tiles_per_program * launch.col_tiles_per_program
        covered = tile_steps * bm * bn
        needed = _padded(B, bm) * _padded(S, bn)
        if covered < needed:
            cost.note = f"plan covers {covered / needed:.2f} of the logits; costed as full"
            covered = needed
            tile_steps = math.ceil(needed / (bm * bn))
        # D slices: programs that own a slice of D each recompute the full-D logits; the rest of
        # covered / needed is the short last split (its programs stop at the last class tile)
        slices = max(1, round(covered / needed))
        covered = min(covered, slices * needed)
        one_k = launch.block_k >= D
        out_width = max(1, D // slices)
        warps = max(1, launch.num_warps)
        # logits (recomputed wherever the plan recomputes them: redundancy included): a
        # (block_m x block_n) product over K = D, both operands from shared memory
        logit_flops = 2.0 * covered * D
        # (the dW owner orients it classes x rows, so that its M is the class tile)
        m1, n1 = (bn, bm) if launch.role == "dw" else (bm, bn)
        logit_s = logit_flops / product_rate(
            shape, machine, m1, n1, launch.block_k, warps, False, a
        )
        # the second product writes each output element once: P.W (dX numerator: rows x D, K =
        # the class tile) or P^T.X (dW: classes x D, K = the row tile), P from registers
        second = launch.role != "forward" or needs_dx
        second_flops = 2.0 * needed * D if second else 0.0
        if launch.role == "forward":
            m2, k2 = bm, bn
        else:
            m2, k2 = bn, bm
        # P crosses between the warpgroups (split along N for the logits) through shared memory
        second_s = second_flops / product_rate(
            shape, machine, m2, out_width, k2, warps, a.p_in_registers, a
        )
        cost.mma_flops = logit_flops + second_flops
        cost.mma_rate = cost.mma_flops / (logit_s + second_s)
        cost.logits = covered
        cost.alu_per_logit = a.alu_per_logit[launch.role]
        resident_warps = cost.programs_per_sm * warps
        cost.issue_efficiency = min(1.0, resident_warps / a.warps_to_hide_alu)
        sass = sass_row(launch, shape, needs_dx) if one_k else None
        if sass is not None:
            cost.issue_warp_instructions = tile_steps * sass["loop_sass"] * warps * a.issue_scale
        if launch.role == "dw":
            # owners: each W tile is read by the D-slice programs that cover it
            sharers = slices
        else:
            sharers = max(1, math.ceil(B / (bm * max(1, launch.row_tiles_per_program)))) * slices
        cost.w_passes = w_stream_passes(launch, shape, machine, sharers, a)
        w_bytes = S * D * isz * cost.w_passes
        # every tile step brings its streamed tile into the SM (from L2 or HBM)
        streamed_rows = bn if launch.role == "forward" else bm
        cost.l2_bytes = tile_steps * streamed_rows * D * isz
        if launch.num_stages <= 1 and cost.programs_per_sm <= 1 and not a.loads_overlap:
            # no software pipelining and no second program: every tile step waits for its
            # streamed tile (forward: the W tile, sharers hit L2 after the first; dW: the x
            # tile, from L2) before its MMAs, through the SM's L2 port
            streamed = (bn if launch.role == "forward" else bm) * launch.block_k * isz
            hbm_share = cost.w_passes / max(1, sharers) if launch.role == "forward" else 0.0
            latency = a.l2_latency_s + hbm_share * (a.mem_latency_s - a.l2_latency_s)
            transfer = streamed / (a.l2_port_bytes_per_clk * machine.clock_hz)
            steps_per_k = 1 if one_k else math.ceil(D / max(1, launch.block_k))
            cost.stall_s = tile_steps * steps_per_k * (latency + transfer) / machine.num_sms
        x_bytes = B * D * isz  # x re-reads across class tiles hit L2 (1 MB at the headline)
        if launch.role == "forward":
            splits = max(1, programs // max(1, math.ceil(B / bm) * slices))
            # split partials: max, sum (+ the fp32 dX numerator and its row sums)
            out = splits * B * acc * (2 + (D + 2 if needs_dx else 0))
            cost.note = f"{splits} class splits, {slices} D slice(s)"
        elif launch.role == "dw":
            # the owners write the S sampled rows of dW once in W's dtype (Partial-FC: the
            # zero-fill kernel writes the other C - S rows; together one pass over dW)
            out = S * D * isz
            cost.dw_passes = 1.0
            cost.note = f"{slices} D slice(s); x re-read from L2 by every class tile"
        else:
            out = B * D * isz
        cost.hbm_bytes = w_bytes + x_bytes + out + 4 * acc * B
    elif launch.kernel == "torch" or not launch.grid:
        # torch ops between the kernels, O(B D): launch-bound at these sizes
        cost.programs, cost.programs_per_sm, cost.bandwidth_cap = 10**6, 16, math.inf
        if launch.role == "merge":
            splits = max(1, launch.col_tiles_per_program)
            cost.hbm_bytes = B * acc * (2 + (D + 2 if needs_dx else 0)) * (splits + 1)
            ops = 6 + (3 if needs_dx else 0)
        else:
            cost.hbm_bytes = 12.0 * B * D * acc
            ops = 12
        cost.launches = ops
        cost.min_s = ops * a.torch_op_s
        cost.note = f"torch, ~{ops} ops"
    else:
        rows = programs * max(1, launch.block_m)
        if launch.role == "col_norms":
            cost.hbm_bytes = S * D * isz + S * acc
            cost.w_passes = 1.0
        elif launch.role == "row_norms":
            cost.hbm_bytes = B * D * isz + B * acc
        elif launch.role == "target":
            cost.hbm_bytes = 2 * B * D * isz + 8 * B * acc
        elif launch.role == "merge":
            splits = max(1, launch.col_tiles_per_program)
            cost.hbm_bytes = B * acc * (2 + (D if needs_dx else 0)) * (splits + 1)
        elif launch.role == "zero_fill":
            # the sampled-class flags (1 byte per class), zeros into the C - S unsampled rows
            cost.hbm_bytes = shape.num_classes + (shape.num_classes - S) * D * isz
            cost.dw_passes = (shape.num_classes - S) / shape.num_classes
        else:  # "rowwise": read and write `rows` rows of D elements
            cost.hbm_bytes = 2.0 * rows * D * isz
    return cost


_SASS_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                torch.float64: "fp64"}  # fmt: skip


def sass_row(launch: Launch, shape: Shape, needs_dx: bool) -> dict | None:
    """The SASS counts of the build a GEMM launch runs (None when the file lacks it). A launch
    names its K step, not its D slice: the tile matches on rows x classes x K step."""
    from margin_kernels.spec import KINDS

    wanted = dict(kernel=launch.kernel, dtype=_SASS_DTYPES[shape.dtype],
                  family=KINDS[shape.kind].family_id, ids=shape.sample_rate < 1.0,
                  needs_num=needs_dx if launch.role == "forward" else True,
                  warps=launch.num_warps, stages=launch.num_stages)  # fmt: skip
    prefix = f"{launch.block_m}x{launch.block_n}x{launch.block_k}x"
    for row in SASS_COUNTS:
        if (all(row[k] == v for k, v in wanted.items()) and row["blocks"].startswith(prefix)
                and row.get("loop_sass")):  # fmt: skip
            return row
    return None


def reference_new_plan(shape: Shape, needs_dx: bool, needs_dw: bool, num_sms: int = 132):
    """The model's own reading of issue 11's four-GEMM design, used only when
    ``margin_kernels.ops.triton.config.plan`` is not importable: norms of x and of the sampled
    W, the target logits, a forward of 64 x 128 tiles over 64-wide K steps with split-C so that
    ~4 programs per SM run (row tiles fastest, so a W tile is read once per pass), a merge, and a
    dW-owner kernel of 128 classes x all rows per program."""
    B, S, D = shape.batch, shape.sampled, shape.dim
    bm, bn = 64, 128
    row_blocks = math.ceil(B / bm)
    col_tiles = math.ceil(S / bn)
    splits = max(1, min(col_tiles, math.ceil(4 * num_sms / row_blocks)))
    per_split = math.ceil(col_tiles / splits)
    launches = [
        Launch(
            "forward",
            "row_norm_kernel",
            "row_norms",
            (math.ceil(B / 16),),
            16,
            0,
            64,
            4,
            1,
            1,
            0,
            "rows",
        ),
        Launch(
            "forward",
            "row_norm_kernel",
            "col_norms",
            (math.ceil(S / 16),),
            16,
            0,
            64,
            4,
            1,
            1,
            0,
            "rows",
        ),
        Launch(
            "forward",
            "target_kernel",
            "target",
            (math.ceil(B / 16),),
            16,
            0,
            64,
            4,
            1,
            1,
            0,
            "rows",
        ),
        Launch(
            "forward",
            "fwd_kernel",
            "forward",
            (row_blocks, splits),
            bm,
            bn,
            64,
            8,
            3,
            1,
            per_split,
            "row tiles fastest",
        ),
        Launch("forward", "merge_kernel", "merge", (splits,), 64, 0, D, 4, 1, 1, 0, "rows"),
    ]
    if needs_dw:
        launches.append(
            Launch(
                "backward",
                "dw_kernel",
                "dw",
                (math.ceil(S / 128),),
                64,
                128,
                64,
                8,
                3,
                row_blocks,
                1,
                "class tiles; each program walks every row tile",
            ),
        )
    return launches


def use_triton_config(path: Path) -> None:
    """Read the new Triton plan from a ``config.py`` file (pure Python, loaded by path), e.g. a
    branch's copy before it is merged; replaces the imported or fallback plan."""
    global triton_plan, HAS_TRITON_PLAN
    spec = importlib.util.spec_from_file_location("_triton_config_under_model", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot load a Triton config from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    triton_plan, HAS_TRITON_PLAN = module.plan, True


def new_triton_launches(shape: Shape, needs_dx: bool, needs_dw: bool, machine: Machine):
    """(launches, source): the launchers' plan when importable, else the model's reading."""
    if HAS_TRITON_PLAN:
        num_sampled = None if shape.sample_rate >= 1.0 else shape.sampled
        launches = triton_plan(
            shape.batch,
            shape.num_classes,
            shape.dim,
            shape.dtype,
            shape.kind,
            num_sampled=num_sampled,
            needs_dx=needs_dx,
            needs_dw=needs_dw,
            num_sms=machine.num_sms,
        )
        return list(launches), "margin_kernels.ops.triton.config.plan"
    return reference_new_plan(shape, needs_dx, needs_dw, machine.num_sms), "model's reading"


TRITON_WHAT_IFS = ("pipelined", "lean_loop", "overlap")


def new_triton_costs(
    shape: Shape, machine: Machine, backward: bool, what_if: Sequence[str] = ()
) -> list[KernelCost]:
    """Costs of every launch of the new Triton design (forward, + backward when ``backward``);
    Partial-FC's zero fill of the unsampled rows of dW is a launch of the plan.

    ``what_if`` variants (none by default): "pipelined" — each tile step's loads hidden behind
    the previous step's MMAs (two stages without ptxas serialising the wgmma, which the
    two-stage builds trigger today); "lean_loop" — half the SASS per tile step (tile
    loads by TMA instead of per-element int64 addresses and masks, and a leaner epilogue);
    "overlap" — the epilogue's instructions issued while the tensor cores run the other
    warpgroup's MMAs (FlashAttention-3's ping-pong of two consumer warpgroups, warp
    specialisation), compute = max(MMA, epilogue)."""
    unknown = set(what_if) - set(TRITON_WHAT_IFS)
    if unknown:
        raise ValueError(f"unknown Triton what-ifs {sorted(unknown)}; known: {TRITON_WHAT_IFS}")
    launches, _ = new_triton_launches(shape, backward, backward, machine)
    if not backward:
        launches = [launch for launch in launches if launch.phase == "forward"]
    a = replace(
        ASSUMPTIONS,
        epilogue_overlaps_mma="overlap" in what_if,
        loads_overlap="pipelined" in what_if,
        issue_scale=0.5 if "lean_loop" in what_if else 1.0,
    )
    costs = [
        evaluate(cost_of_launch(launch, shape, machine, backward, a), machine, a)
        for launch in launches
    ]
    return costs


# --------------------------------------------------------------------------------------------
# old Triton design (pre-rewrite launchers, transcribed)
# --------------------------------------------------------------------------------------------
OLD_FWD_TILE = (64, 128, 64, 8, 3)  # _tiles(bf16).fwd: BLOCK_B, BLOCK_C, BLOCK_D, warps, stages
OLD_BWD_TILE = (64, 64, 64, 8, 2)  # _tiles(bf16).bwd (fused, atomic)
OLD_DET_TILE = (64, 64, 32, 8, 2, 128)  # _tiles(bf16).det, last: BLOCK_OUT
OLD_ROW_TILE = (16, 64)  # _row_tile(bf16): rows, K slice; num_warps 4


def _old_row_kernel(phase, kernel, rows, bytes_, shape, machine, w_passes=0.0):
    role = "rowwise"
    programs = math.ceil(rows / OLD_ROW_TILE[0])
    cost = KernelCost(phase, kernel, role, hbm_bytes=bytes_, programs=programs, w_passes=w_passes)
    cost.programs_per_sm = programs_per_sm(role, 4)
    return evaluate(cost, machine)


def _torch_pass(phase, name, bytes_, machine, ops=1):
    """A torch element-wise op (or ``ops`` of them) over ``bytes_`` of traffic."""
    cost = KernelCost(phase, name, "torch", hbm_bytes=bytes_, programs=10**6, launches=ops)
    cost.programs_per_sm = 16
    cost.min_s = ops * ASSUMPTIONS.torch_op_s
    return evaluate(cost, machine)


def old_triton_costs(
    shape: Shape, machine: Machine, backward: bool, deterministic: bool
) -> list[KernelCost]:
    """The pre-rewrite Triton launchers: row norms of x and W, target kernel, split-C forward
    with a torch merge; backward: zeroed fp32 scratch (dX, dW of S x D, dWY), the fused atomic
    kernel (column tiles on grid axis 0) or the deterministic row/column kernels, the column-norm
    pass over the fp32 dW, a dense fp32 dW for Partial-FC, and the casts."""
    B, S, C, D = shape.batch, shape.sampled, shape.num_classes, shape.dim
    isz, acc = shape.itemsize, shape.acc_size
    a = ASSUMPTIONS
    costs = [
        _old_row_kernel("forward", "_row_norm_kernel (x)", B, B * D * isz, shape, machine),
        _old_row_kernel("forward", "_row_norm_kernel (W)", S, S * D * isz, shape, machine, 1.0),
        _old_row_kernel("forward", "_target_kernel", B, 2 * B * D * isz, shape, machine),
    ]
    bm, bn, bk, warps, stages = OLD_FWD_TILE
    row_blocks = math.ceil(B / bm)
    col_tiles = max(1, math.ceil(S / bn))
    splits = max(1, min(col_tiles, math.ceil(4 * machine.num_sms / row_blocks)))
    per_split = math.ceil(col_tiles / splits)
    splits = max(1, math.ceil(S / (per_split * bn)))
    fwd_launch = Launch(
        "forward",
        "_fwd_kernel",
        "forward",
        (row_blocks, splits),
        bm,
        bn,
        bk,
        warps,
        stages,
        1,
        per_split,
        "row tiles on axis 0 (fastest)",
    )
    fwd = cost_of_launch(fwd_launch, shape, machine, needs_dx=False)
    fwd.note = "x tile re-read from L2 for every class tile; exp not overlapped with the MMAs"
    costs.append(evaluate(fwd, machine))
    costs.append(
        _torch_pass(
            "forward",
            "split merge (torch: max, exp, sum, log)",
            3 * splits * B * acc,
            machine,
            ops=6,
        )
    )
    if not backward:
        return costs
    # fp32 scratch zeroed by torch: dX, dW (S x D), dWY, row/col scalars
    costs.append(_torch_pass("backward", "zero dW scratch (fp32 S x D)", S * D * acc, machine))
    costs.append(
        _torch_pass(
            "backward", "zero dX, dWY, scalars", (2 * B * D + 3 * B + S) * acc, machine, ops=4
        )
    )
    if deterministic:
        bm, bn, bk, warps, stages, out = OLD_DET_TILE
        slices = math.ceil(D / out)
        row_blocks = math.ceil(B / bm)
        col_tiles = math.ceil(S / bn)
        rows_launch = Launch(
            "backward",
            "_bwd_rows_kernel",
            "det_rows",
            (row_blocks, slices),
            bm,
            bn,
            bk,
            warps,
            stages,
            1,
            col_tiles,
            "row tiles on axis 0, feature slices on axis 1",
        )
        rows = KernelCost("backward", "_bwd_rows_kernel", "det_rows", programs=row_blocks * slices)
        # every feature slice recomputes the full-D logits of all its rows x all classes
        logits = slices * _padded(B, bm) * _padded(S, bn)
        rows.mma_flops = 2.0 * logits * D + 2.0 * _padded(B, bm) * _padded(S, bn) * D
        rows.mma_rate = tile_rate(shape, machine, bm, bn, bk)
        rows.logits = logits
        rows.alu_per_logit = a.alu_per_logit["det_rows"]
        rows.programs_per_sm = programs_per_sm("det_rows", warps)
        # all row x slice programs fit in one wave and walk W together: one pass
        rows.w_passes = w_stream_passes(rows_launch, shape, machine, row_blocks * slices)
        rows.hbm_bytes = S * D * isz * rows.w_passes + B * D * isz + 2 * B * D * acc
        rows.bandwidth_cap = triton_bandwidth_cap(rows_launch, isz, machine)
        rows.note = f"recomputes the logits {slices}x (D/BLOCK_OUT); {rows.programs} programs"
        costs.append(evaluate(rows, machine))
        cols_launch = Launch(
            "backward",
            "_bwd_cols_kernel",
            "det_cols",
            (col_tiles, slices),
            bm,
            bn,
            bk,
            warps,
            stages,
            row_blocks,
            1,
            "column tiles on axis 0 (fastest), feature slices on axis 1",
        )
        cols = KernelCost("backward", "_bwd_cols_kernel", "det_cols", programs=col_tiles * slices)
        cols.mma_flops = rows.mma_flops
        cols.mma_rate = rows.mma_rate
        cols.logits = logits
        cols.alu_per_logit = a.alu_per_logit["det_cols"]
        cols.programs_per_sm = programs_per_sm("det_cols", warps)
        # the D slices of one class tile are col_tiles programs apart: W re-read per slice
        cols.w_passes = w_stream_passes(cols_launch, shape, machine, slices)
        cols.dw_passes = 1.0
        cols.hbm_bytes = S * D * isz * cols.w_passes + S * D * acc + B * D * isz
        cols.bandwidth_cap = triton_bandwidth_cap(cols_launch, isz, machine)
        cols.note = f"recomputes the logits {slices}x; W streamed once per feature slice"
        costs.append(evaluate(cols, machine))
    else:
        bm, bn, bk, warps, stages = OLD_BWD_TILE
        row_blocks = math.ceil(B / bm)
        col_tiles = math.ceil(S / bn)
        launch = Launch(
            "backward",
            "_bwd_fused_kernel",
            "fused_bwd",
            (col_tiles, row_blocks),
            bm,
            bn,
            bk,
            warps,
            stages,
            1,
            1,
            "column tiles on axis 0 (fastest), row tiles on axis 1",
        )
        fused = KernelCost(
            "backward", "_bwd_fused_kernel", "fused_bwd", programs=col_tiles * row_blocks
        )
        logits = _padded(B, bm) * _padded(S, bn)
        fused.mma_flops = 3 * 2.0 * logits * D  # recompute, dX, dW
        fused.mma_rate = tile_rate(shape, machine, bm, bn, bk)
        fused.logits = logits
        fused.alu_per_logit = a.alu_per_logit["fused_bwd"]
        fused.programs_per_sm = programs_per_sm("fused_bwd", warps)
        # the row_blocks programs of one column tile run col_tiles launches apart
        fused.w_passes = w_stream_passes(launch, shape, machine, row_blocks)
        # the fp32 dW lines follow W's fate: evicted between row passes, read + written per pass
        fused.dw_passes = fused.w_passes
        dw_scratch = S * D * acc
        fused.hbm_bytes = (
            S * D * isz * fused.w_passes + 2 * dw_scratch * fused.dw_passes + B * D * isz
        )
        # atomic adds: dX (B x D) per column tile, dW (S x D) per row tile, row/col scalars
        fused.atomics = col_tiles * B * D + row_blocks * S * D + col_tiles * B + row_blocks * S
        fused.bandwidth_cap = triton_bandwidth_cap(launch, isz, machine)
        fused.note = (
            f"W x{fused.w_passes:g}, fp32 dW read+written x{fused.dw_passes:g}, "
            f"{fused.atomics:.2e} fp32 atomics"
        )
        costs.append(evaluate(fused, machine))
    costs.append(
        _old_row_kernel(
            "backward",
            "_add_scaled_rows_kernel (norm pass)",
            S,
            S * D * (2 * acc + isz),
            shape,
            machine,
            1.0,
        )
    )
    costs.append(
        _torch_pass("backward", "row terms (torch, O(B D))", 12 * B * D * acc, machine, ops=14)
    )
    if S != C:
        costs.append(
            _torch_pass(
                "backward",
                "dense fp32 dW for Partial-FC + index_put",
                C * D * acc + 3 * S * D * acc,
                machine,
                ops=2,
            )
        )
    costs.append(_torch_pass("backward", "cast dW fp32 -> W dtype", C * D * (acc + isz), machine))
    return costs


# --------------------------------------------------------------------------------------------
# cuBLAS GEMMs (baseline, and the GEMMs of the CUDA backend)
# --------------------------------------------------------------------------------------------
def gemm_cost(
    phase: str,
    name: str,
    m: int,
    n: int,
    k: int,
    bytes_: float,
    shape: Shape,
    machine: Machine,
    w_passes: float = 1.0,
) -> KernelCost:
    """A cuBLAS GEMM of m x n x k at the tuned GEMM rate (tf32/fp32 scaled from the peaks)."""
    rate = machine.gemm_rate * mma_peak(shape, machine) / machine.bf16_peak
    # cuBLAS tiles of 128 x 256 (or 128 x 128): padding of a short M wastes the rest of the tile
    m_pad = _padded(m, 128) if m < 1024 else m
    cost = KernelCost(phase, name, "gemm", mma_flops=2.0 * m_pad * n * k, mma_rate=rate)
    tiles = max(1, math.ceil(m / 128) * math.ceil(n / 256))
    # too few output tiles for the SMs and a long K: cuBLAS splits K (or streams it) so that the
    # chip fills, at the price of fp32 partials written and reduced
    split = max(1, min(math.ceil(2 * machine.num_sms / tiles), k // 1024))
    cost.hbm_bytes = bytes_ + (2 * split * m * n * 4 if split > 1 else 0)
    # split or stream-K work is spread evenly over the SMs: no wave tail
    cost.programs = (
        tiles if split == 1 else machine.num_sms * math.ceil(tiles * split / machine.num_sms)
    )
    cost.w_passes = w_passes
    if split > 1:
        cost.note = f"split-K x{split}"
    return evaluate(cost, machine)


def gemm_baseline_costs(shape: Shape, machine: Machine, backward: bool) -> list[KernelCost]:
    """z = x W^T, dX = dz W, dW = dz^T x on the (S, D) sampled weight, each input read once and
    each output written once (z and dz are B x S in the inputs' dtype)."""
    B, S, D, isz = shape.batch, shape.sampled, shape.dim, shape.itemsize
    costs = [
        gemm_cost("forward", "z = x W^T", B, S, D, (B * D + S * D + B * S) * isz, shape, machine)
    ]
    if backward:
        costs.append(
            gemm_cost(
                "backward", "dX = dz W", B, D, S, (B * S + S * D + B * D) * isz, shape, machine
            )
        )
        costs.append(
            gemm_cost(
                "backward",
                "dW = dz^T x",
                S,
                D,
                B,
                (B * S + B * D + S * D) * isz,
                shape,
                machine,
                0.0,
            )
        )
    return costs


# --------------------------------------------------------------------------------------------
# CUDA backend
# --------------------------------------------------------------------------------------------
OLD_CUDA_CHUNK_BYTES = 256 * MiB
OLD_CUDA_THREADS = 256


def cuda_block_bandwidth(threads: int, a: Assumptions = ASSUMPTIONS) -> float:
    """Bytes/s one thread block keeps in flight: threads x 16 B x loads in flight / latency."""
    return threads * 16 * a.cuda_block_loads_in_flight / a.mem_latency_s


def _epilogue(phase, name, blocks, threads, logits, bytes_, role, shape, machine) -> KernelCost:
    cost = KernelCost(phase, name, role, logits=logits, hbm_bytes=bytes_, programs=blocks)
    cost.alu_per_logit = ASSUMPTIONS.alu_per_logit[role]
    # one block of >= 256 threads is taken to keep one SM's pipes busy: extra co-resident
    # blocks share that SM, so R blocks on 132 SMs take ceil(R / 132) block-times
    cost.programs_per_sm = 1
    cost.bandwidth_cap = blocks * cuda_block_bandwidth(threads)
    return evaluate(cost, machine)


def _scaled(cost: KernelCost, times: int) -> KernelCost:
    """``times`` identical launches of one kernel, as one row."""
    for name in ("mma_flops", "logits", "hbm_bytes", "atomics", "w_passes", "dw_passes"):
        setattr(cost, name, getattr(cost, name) * times)
    for name in ("compute_s", "memory_s", "atomic_s", "l2_s", "time_s"):
        setattr(cost, name, getattr(cost, name) * times)
    cost.launches *= times
    cost.kernel = f"{cost.kernel} [x{times}]"
    return cost


def old_cuda_costs(shape: Shape, machine: Machine, backward: bool) -> list[KernelCost]:
    """The pre-rewrite CUDA backend: row chunks of R = 256 MiB / (S itemsize) rows; per chunk a
    forward GEMM, then in the backward a recompute GEMM, dX = dz W and dW += dz^T x through a
    16-bit product cast into an fp32 accumulator; the fp32 norm/direction temporaries of the
    whole W; epilogues of one 256-thread block per row."""
    B, S, C, D = shape.batch, shape.sampled, shape.num_classes, shape.dim
    isz, acc = shape.itemsize, shape.acc_size
    rows = max(1, OLD_CUDA_CHUNK_BYTES // max(1, S * isz))
    chunks = math.ceil(B / rows)
    full_chunks, last = divmod(B, rows)
    sizes = [rows] * full_chunks + ([last] if last else [])
    costs = []
    if S != C:
        costs.append(_torch_pass("forward", "index_select W[ids]", 2 * S * D * isz, machine))
    costs.append(
        _torch_pass("forward", "norms of x, W, W_y; c_y", (S * D + 4 * B * D) * isz, machine, ops=8)
    )

    def per_chunk(build):
        merged = None
        for r, count in _group_counts(sizes):
            cost = _scaled(build(r), count)
            if merged is None:
                merged = cost
            else:
                _merge(merged, cost)
        merged.kernel = merged.kernel.split(" [x")[0] + f" [x{chunks}]"
        return merged

    costs.append(
        per_chunk(
            lambda r: gemm_cost(
                "forward",
                "chunk GEMM z = x_r W^T",
                r,
                S,
                D,
                (r * D + S * D + r * S) * isz,
                shape,
                machine,
            )
        )
    )
    costs.append(
        per_chunk(
            lambda r: _epilogue(
                "forward",
                "margin_lse_fwd (1 block/row)",
                r,
                OLD_CUDA_THREADS,
                r * S,
                r * S * isz,
                "epilogue_fwd",
                shape,
                machine,
            )
        )
    )
    costs[-1].note = f"R = {rows} rows per chunk, {chunks} chunks; W streamed once per chunk"
    if not backward:
        return costs
    # _norm_and_direction of x, W (S x D) and W_y in fp32: to, norm, clamp, div, zeros, where
    costs.append(
        _torch_pass(
            "backward",
            "_norm_and_direction(W) fp32 temporaries",
            S * D * (isz + 8 * acc),
            machine,
            ops=6,
        )
    )
    costs.append(_torch_pass("backward", "zero grad_cols (fp32 S x D)", S * D * acc, machine))
    costs.append(
        per_chunk(
            lambda r: gemm_cost(
                "backward",
                "chunk GEMM recompute z",
                r,
                S,
                D,
                (r * D + S * D + r * S) * isz,
                shape,
                machine,
            )
        )
    )
    costs.append(
        per_chunk(
            lambda r: _epilogue(
                "backward",
                "margin_lse_bwd (1 block/row, in place)",
                r,
                OLD_CUDA_THREADS,
                r * S,
                2 * r * S * isz,
                "epilogue_bwd",
                shape,
                machine,
            )
        )
    )
    costs.append(
        per_chunk(
            lambda r: gemm_cost(
                "backward",
                "chunk GEMM dX = dz W",
                r,
                D,
                S,
                (r * S + S * D + r * D) * isz,
                shape,
                machine,
            )
        )
    )
    costs.append(
        per_chunk(
            lambda r: gemm_cost(
                "backward",
                "chunk GEMM dz^T x (16-bit S x D out)",
                S,
                D,
                r,
                (r * S + r * D + S * D) * isz,
                shape,
                machine,
                0.0,
            )
        )
    )
    # .to(fp32) (read 16-bit, write fp32) then grad_cols += (read 2 fp32, write 1)
    costs.append(
        _scaled(
            _torch_pass(
                "backward",
                "cast + add into fp32 grad_cols",
                S * D * (isz + 4 * acc),
                machine,
                ops=2,
            ),
            chunks,
        )
    )
    costs[-1].dw_passes = 2.0 * chunks
    costs[-1].note = "the fp32 dW accumulator is read and written once per chunk"
    costs.append(
        per_chunk(
            lambda r: _torch_pass(
                "backward", "grad_x, grad_wy row terms (torch)", 12 * r * D * acc, machine, ops=12
            )
        )
    )
    # radial term over all of W in fp32: cols.to, mul, sum; radial * col_dir, subtract
    costs.append(
        _torch_pass(
            "backward",
            "radial column-norm term (fp32, whole W)",
            S * D * (isz + 10 * acc),
            machine,
            ops=5,
        )
    )
    if S != C:
        costs.append(
            _torch_pass(
                "backward",
                "dense fp32 dW + index_put",
                C * D * acc + 3 * S * D * acc,
                machine,
                ops=2,
            )
        )
    costs.append(_torch_pass("backward", "cast dW fp32 -> W dtype", C * D * (acc + isz), machine))
    return costs


def _group_counts(sizes: Sequence[int]) -> list[tuple[int, int]]:
    counts: dict[int, int] = {}
    for size in sizes:
        counts[size] = counts.get(size, 0) + 1
    return sorted(counts.items(), reverse=True)


def _merge(into: KernelCost, other: KernelCost) -> None:
    for name in (
        "mma_flops",
        "logits",
        "hbm_bytes",
        "atomics",
        "w_passes",
        "dw_passes",
        "compute_s",
        "memory_s",
        "atomic_s",
        "l2_s",
        "time_s",
    ):
        setattr(into, name, getattr(into, name) + getattr(other, name))
    into.launches += other.launches


@dataclass(frozen=True)
class _ModelChunkPlan:
    """The class-chunk plan as the model reads issue 12 (used when ``chunk_plan`` is missing)."""

    classes_per_chunk: int
    num_chunks: int
    logits_dtype: torch.dtype
    epilogue_grid: tuple[int, int]
    threads_per_block: int
    extra_bytes: int


def reference_chunk_plan(shape: Shape, chunk_bytes: int = 256 * MiB) -> _ModelChunkPlan:
    """S_c = chunk_bytes / per_class, per_class = 4 B (fp32 logits) + 2 B (16-bit dz) + 4 D (fp32
    H_c); the epilogue splits each row's classes until ~8 blocks per SM run."""
    B, S, D = shape.batch, shape.sampled, shape.dim
    per_class = 4 * B + (shape.itemsize * B + 4 * D if shape.itemsize < 4 else 0)
    per_chunk = max(1, min(S, chunk_bytes // per_class))
    chunks = math.ceil(S / per_chunk)
    splits = max(1, min(math.ceil(8 * 132 / max(1, B)), per_chunk // 1024))
    return _ModelChunkPlan(
        per_chunk, chunks, torch.float32, (B, splits), 256, per_chunk * per_class + 40 * B * D
    )


def new_cuda_plan(shape: Shape):
    """(plan, source): ``margin_kernels.ops.cuda.chunk_plan`` when present, else the model's."""
    if HAS_CHUNK_PLAN:
        num_sampled = None if shape.sample_rate >= 1.0 else shape.sampled
        plan = chunk_plan(
            shape.batch,
            shape.num_classes,
            shape.dim,
            shape.dtype,
            shape.kind,
            num_sampled=num_sampled,
        )
        return plan, "margin_kernels.ops.cuda.chunk_plan"
    return reference_chunk_plan(shape), "model's reading"


def new_cuda_costs(shape: Shape, machine: Machine, backward: bool) -> list[KernelCost]:
    """Class chunks as the launcher runs them (the ``chunk_plan`` sizes, the cuBLAS calls and
    ops of ``_ChunkedMarginLSE``). Per chunk of S_c classes and all B rows:

    forward: W_c's raw norms (a pass over W_c, kept in an O(C) buffer for the backward),
    z_c = x W_c^T (cuBLAS, fp32 out), the online-LSE epilogue (reads z_c);
    backward: z_c recomputed (fp32 out), the epilogue reads it and writes dL/dz once in the
    16-bit input dtype (the GEMM operand: no fp32 dz, no cast pass), dX += dz W_c (fp32-output
    GEMM + add into the fp32 accumulator), H_c = dz^T x (fp32 out), then one
    ``margin_column_chain`` pass reads H_c and W_c and writes dW_c once in W's dtype with the
    column-norm term. 16-bit inputs of a kind that normalises W: the 16-bit dz holds
    dL/dz max(||W_j||, eps) (bounded where ||W_j|| < eps), so the dX GEMM reads W_c normalised,
    one more torch pass over W_c (read and write in the input dtype). Partial-FC gathers W_c in
    both passes, zero-fills dW and scatters the chunk's rows."""
    B, S, C, D = shape.batch, shape.sampled, shape.num_classes, shape.dim
    isz, acc = shape.itemsize, shape.acc_size
    plan, _ = new_cuda_plan(shape)
    sc, chunks = plan.classes_per_chunk, plan.num_chunks
    lsz = torch.empty((), dtype=plan.logits_dtype).element_size()
    blocks = math.prod(plan.epilogue_grid)
    threads = plan.threads_per_block
    half = isz < lsz  # 16-bit storage: dz in the storage dtype, fp32 H_c beside dW
    sampled = S != C
    full, last = divmod(S, sc)
    sizes = [sc] * full + ([last] if last else [])
    costs = [_torch_pass("forward", "norms of x, W_y; c_y (O(B D))", 6 * B * D * isz, machine, 6)]

    def per_chunk(build):
        merged = None
        for n, count in _group_counts(sizes):
            cost = _scaled(build(n), count)
            if merged is None:
                merged = cost
            else:
                _merge(merged, cost)
        merged.kernel = merged.kernel.split(" [x")[0] + f" [x{chunks}]"
        return merged

    def w_pass(phase, name, bytes_per_elt, ops=1, passes=0.0):
        cost = per_chunk(lambda n: _torch_pass(phase, name, n * D * bytes_per_elt, machine, ops))
        cost.w_passes = passes
        return cost

    if sampled:
        costs.append(w_pass("forward", "index_select W_c (Partial-FC gather)", 2 * isz, 1, 1.0))
    costs.append(w_pass("forward", "norms of W_c, kept (torch)", isz, 2, 1.0))
    costs.append(
        per_chunk(
            lambda n: gemm_cost(
                "forward", "GEMM z_c = x W_c^T (fp32 out)", B, n, D,
                (B * D + n * D) * isz + B * n * lsz, shape, machine, n / S,
            )
        )
    )  # fmt: skip
    costs.append(
        per_chunk(
            lambda n: _epilogue(
                "forward", "margin_lse_fwd (online LSE)", blocks, threads, B * n, B * n * lsz,
                "epilogue_fwd", shape, machine,
            )
        )
    )  # fmt: skip
    costs[-1].note = f"S_c = {sc} classes, {chunks} chunks, {blocks} blocks of {threads}"
    if not backward:
        return costs
    if sampled:
        costs.append(_torch_pass("backward", "zeros dW (Partial-FC)", C * D * isz, machine))
        costs.append(w_pass("backward", "index_select W_c (Partial-FC gather)", 2 * isz, 1, 1.0))
    costs.append(
        per_chunk(
            lambda n: gemm_cost(
                "backward", "GEMM recompute z_c (fp32 out)", B, n, D,
                (B * D + n * D) * isz + B * n * lsz, shape, machine, n / S,
            )
        )
    )  # fmt: skip
    dz_name = "margin_lse_bwd (dz u in the input dtype)" if half else "margin_lse_bwd (dz in place)"
    costs.append(
        per_chunk(
            lambda n: _epilogue(
                "backward", dz_name, blocks, threads, B * n, B * n * (lsz + min(isz, lsz)),
                "epilogue_bwd", shape, machine,
            )
        )
    )  # fmt: skip
    from margin_kernels.spec import KINDS

    if half and KINDS[shape.kind].normalizes_weight:
        # the dX GEMM's operand W_c / max(||W_j||, eps), written in the input dtype
        costs.append(w_pass("backward", "W_c / max(||W_j||, eps) (dX operand)", 2 * isz, 1, 1.0))
    costs.append(
        per_chunk(
            lambda n: gemm_cost(
                "backward", "GEMM dX += dz W_c (fp32 out + add)", B, D, n,
                (B * n + n * D) * isz + 3 * B * D * acc, shape, machine, n / S,
            )
        )
    )  # fmt: skip
    costs.append(
        per_chunk(
            lambda n: gemm_cost(
                "backward", "GEMM H_c = dz^T x (fp32 out)", n, D, B,
                (B * n + B * D) * isz + n * D * (acc if half else isz), shape, machine, 0.0,
            )
        )
    )  # fmt: skip
    # margin_column_chain: read H_c (fp32 for 16-bit W) and W_c, write dW_c in W's dtype
    h_size = acc if half else isz
    costs.append(
        w_pass("backward", "margin_column_chain (dW_c written once)", h_size + 2 * isz, 1, 1.0)
    )
    costs[-1].dw_passes = 1.0
    if sampled:
        # index_put_(accumulate=True) of the chunk's rows into the zeroed dW (sorted indices)
        costs.append(w_pass("backward", "scatter dW_c rows (Partial-FC)", 3 * isz, 2))
    costs.append(
        _torch_pass("backward", "row terms, dX cast (O(B D))", 12 * B * D * acc, machine, 14)
    )
    return costs


# --------------------------------------------------------------------------------------------
# predictions
# --------------------------------------------------------------------------------------------
PROVIDERS = ("gemm", "triton", "triton-deterministic", "cuda")
DESIGNS = ("old", "new")


def kernel_costs(
    provider: str, design: str, shape: Shape, machine: Machine, backward: bool
) -> list[KernelCost]:
    """Every kernel's cost for one provider and design at one shape."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    if design not in DESIGNS:
        raise ValueError(f"design must be one of {DESIGNS}, got {design!r}")
    if provider == "gemm":
        return gemm_baseline_costs(shape, machine, backward)
    if provider.startswith("triton"):
        if design == "old":
            return old_triton_costs(shape, machine, backward, provider.endswith("deterministic"))
        # the new design is deterministic by construction: one plan for both providers
        return new_triton_costs(shape, machine, backward)
    if design == "old":
        return old_cuda_costs(shape, machine, backward)
    return new_cuda_costs(shape, machine, backward)


def total_ms(costs: Sequence[KernelCost]) -> float:
    return 1e3 * sum(c.time_s for c in costs)


def dominant(costs: Sequence[KernelCost]) -> str:
    """The kernel that takes the most time and its bound, e.g. '_bwd_fused_kernel (atomics)'."""
    top = max(costs, key=lambda c: c.time_s)
    share = top.time_s / max(sum(c.time_s for c in costs), 1e-30)
    return f"{top.kernel} ({top.bound}, {100 * share:.0f}%)"


def _dtype_of(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "bf16": torch.bfloat16,
        "fp16": torch.float16,
        "fp32": torch.float32,
        "fp64": torch.float64,
    }
    key = dtype.replace("torch.", "").replace("bfloat16", "bf16").replace("float16", "fp16")
    key = key.replace("float32", "fp32").replace("float64", "fp64")
    if key not in names:
        raise ValueError(f"dtype must be bf16, fp16, fp32 or fp64, got {dtype!r}")
    return names[key]


def predict(
    provider: str,
    batch: int,
    num_classes: int,
    dim: int,
    dtype: torch.dtype | str = torch.bfloat16,
    kind: str = "arcface",
    sample_rate: float = 1.0,
    mode: str = "fwd+bwd",
    machine: str = "h100",
    design: str = "new",
) -> dict:
    """Predicted (not measured) time of one provider at one shape.

    Args:
        provider: "triton", "triton-deterministic", "cuda" or "gemm" (the three bare GEMMs).
        batch, num_classes, dim: B, C, D.
        dtype: torch dtype or "bf16"/"fp16"/"fp32".
        kind: MarginSpec kind name (cosine families are modelled alike).
        sample_rate: Partial-FC rate (1 = all classes).
        mode: "fwd" or "fwd+bwd".
        machine: "h100" or "h200".
        design: "new" (the launchers' configuration) or "old" (pre-rewrite).

    Returns:
        dict with ``label`` = "predicted", ``predicted_ms``, ``gemm_predicted_ms`` (the bare GEMMs
        of the same mode), ``predicted_vs_gemm``, ``dominant`` and per-kernel ``kernels``.
    """
    if mode not in ("fwd", "fwd+bwd"):
        raise ValueError(f"mode must be 'fwd' or 'fwd+bwd', got {mode!r}")
    if machine not in MACHINES:
        raise ValueError(f"machine must be one of {sorted(MACHINES)}, got {machine!r}")
    if min(batch, num_classes, dim) <= 0:
        raise ValueError(f"batch, num_classes, dim must be positive, got {batch, num_classes, dim}")
    shape = Shape("custom", batch, num_classes, dim, _dtype_of(dtype), kind, sample_rate)
    m = MACHINES[machine]
    backward = mode == "fwd+bwd"
    costs = kernel_costs(provider, design, shape, m, backward)
    gemm = total_ms(gemm_baseline_costs(shape, m, backward))
    ms = total_ms(costs)
    return {
        "label": PREDICTED,
        "provider": provider,
        "design": design,
        "machine": m.name,
        "predicted_ms": ms,
        "gemm_predicted_ms": gemm,
        "predicted_vs_gemm": ms / gemm,
        "dominant": dominant(costs),
        "kernels": [kernel_row(c) for c in costs],
    }


def kernel_row(c: KernelCost) -> dict:
    """One kernel's modelled numbers as a flat dict (times in ms, labelled predicted)."""
    return {
        "phase": c.phase,
        "kernel": c.kernel,
        "role": c.role,
        "tflop": c.mma_flops / 1e12,
        "hbm_gb": c.hbm_bytes / 1e9,
        "w_passes": c.w_passes,
        "dw_passes": c.dw_passes,
        "atomics": c.atomics,
        "programs": c.programs,
        "programs_per_wave": c.programs_per_sm * 132,
        "wave_efficiency": c.wave_efficiency,
        "predicted_compute_ms": 1e3 * c.compute_s,
        "predicted_memory_ms": 1e3 * c.memory_s,
        "predicted_atomic_ms": 1e3 * c.atomic_s,
        "predicted_l2_ms": 1e3 * c.l2_s,
        # the compute term's parts: MMAs at the tiles' rate, exposed tile loads (chip time)
        "predicted_mma_ms": 1e3 * (c.mma_flops / c.mma_rate if c.mma_flops else 0.0),
        "predicted_stall_ms": 1e3 * c.stall_s,
        "mma_tflops": c.mma_rate / 1e12,
        "predicted_ms": 1e3 * c.time_s,
        "bound": c.bound,
        "note": c.note,
    }


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------
ROWS = (
    ("gemm", "new", "3 bare GEMMs (cuBLAS)"),
    ("triton", "old", "triton default, old"),
    ("triton-deterministic", "old", "triton deterministic, old"),
    ("triton", "new", "triton (default = deterministic), new"),
    ("cuda", "old", "cuda, old (row chunks)"),
    ("cuda", "new", "cuda, new (class chunks)"),
)


def summary_rows(machine: Machine, shapes: Sequence[Shape] = SHAPES) -> list[dict]:
    """One row per (shape, design) of fwd+bwd: predicted ms, ratio to the GEMMs, dominant term."""
    out = []
    for shape in shapes:
        gemm = total_ms(gemm_baseline_costs(shape, machine, True))
        for provider, design, label in ROWS:
            costs = kernel_costs(provider, design, shape, machine, True)
            ms = total_ms(costs)
            out.append(
                {
                    "machine": machine.name,
                    "shape": shape.name,
                    "batch": shape.batch,
                    "classes": shape.num_classes,
                    "sampled": shape.sampled,
                    "dim": shape.dim,
                    "design": label,
                    "predicted_ms": ms,
                    "predicted_vs_gemm": ms / gemm,
                    "w_passes": sum(c.w_passes for c in costs),
                    "hbm_gb": sum(c.hbm_bytes for c in costs) / 1e9,
                    "atomics": sum(c.atomics for c in costs),
                    "dominant": dominant(costs),
                }
            )
    return out


def detail_rows(machine: Machine, shape: Shape, provider: str, design: str) -> list[dict]:
    """Per-kernel rows of one design at one shape (fwd+bwd)."""
    return [kernel_row(c) for c in kernel_costs(provider, design, shape, machine, True)]


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_markdown(machine: Machine) -> str:
    rows = summary_rows(machine)
    body = [
        (
            r["shape"],
            r["design"],
            f"{r['predicted_ms']:.2f}",
            f"{r['predicted_vs_gemm']:.2f}x",
            f"{r['w_passes']:.0f}",
            f"{r['hbm_gb']:.1f}",
            f"{r['atomics']:.2g}",
            r["dominant"],
        )
        for r in rows
    ]
    headers = (
        "shape",
        "design",
        "predicted ms",
        "predicted / 3 GEMMs",
        "W passes",
        "HBM GB",
        "atomics",
        "largest kernel (bound, share)",
    )
    return f"### {machine.name}: fwd+bwd, bf16 ArcFace, D=512 (all numbers predicted)\n\n" + (
        _md_table(headers, body)
    )


def detail_markdown(machine: Machine, shape: Shape, provider: str, design: str) -> str:
    rows = detail_rows(machine, shape, provider, design)
    body = [
        (
            r["phase"],
            r["kernel"],
            r["role"],
            f"{r['tflop']:.2f}",
            f"{r['hbm_gb']:.2f}",
            f"{r['w_passes']:g}",
            f"{r['atomics']:.2g}",
            r["programs"],
            f"{r['wave_efficiency']:.2f}",
            f"{r['predicted_compute_ms']:.3f}",
            f"{r['predicted_memory_ms']:.3f}",
            f"{r['predicted_atomic_ms']:.3f}",
            f"{r['predicted_l2_ms']:.3f}",
            f"{r['mma_tflops']:.0f}",
            f"{r['predicted_stall_ms']:.3f}",
            f"{r['predicted_ms']:.3f}",
            r["bound"],
        )
        for r in rows
    ]
    headers = (
        "phase",
        "kernel",
        "role",
        "TFLOP",
        "HBM GB",
        "W passes",
        "atomics",
        "programs",
        "wave eff.",
        "compute ms (pred.)",
        "memory ms (pred.)",
        "atomics ms (pred.)",
        "L2 ms (pred.)",
        "MMA TFLOP/s (pred.)",
        "load stall ms (pred.)",
        "predicted ms",
        "bound",
    )
    total = sum(r["predicted_ms"] for r in rows)
    return (
        f"#### {machine.name}, {shape.name}: {provider} {design} "
        f"(total {total:.2f} ms predicted)\n\n" + _md_table(headers, body)
    )


WHAT_IF_SHAPES = ("headline", "C=1e7")


def what_if_rows(machine: Machine) -> list[dict]:
    """The new designs with the changes the model suggests, one at a time and together."""

    def triton(what_if):
        return lambda sh: new_triton_costs(sh, machine, True, what_if)

    variants = [
        ("triton", "as merged", triton(())),
        ("triton", "loads pipelined (two stages, wgmma not serialised)", triton(("pipelined",))),
        ("triton", "half the SASS per tile step (TMA loads, leaner masks)",
         triton(("lean_loop",))),
        ("triton", "epilogue overlapped with the MMAs (ping-pong warpgroups)",
         triton(("overlap",))),
        ("triton", "pipelined + overlapped", triton(("pipelined", "overlap"))),
        ("triton", "all three", triton(TRITON_WHAT_IFS)),
        ("cuda", "as merged", lambda sh: new_cuda_costs(sh, machine, True)),
    ]  # fmt: skip
    rows = []
    for shape in (s for s in SHAPES if s.name in WHAT_IF_SHAPES):
        gemm = total_ms(gemm_baseline_costs(shape, machine, True))
        for backend, label, build in variants:
            ms = total_ms(build(shape))
            rows.append(
                {
                    "machine": machine.name,
                    "shape": shape.name,
                    "backend": backend,
                    "variant": label,
                    "predicted_ms": ms,
                    "predicted_vs_gemm": ms / gemm,
                }
            )
    return rows


def what_if_markdown(machine: Machine) -> str:
    body = [
        (r["shape"], r["backend"], r["variant"], f"{r['predicted_ms']:.2f}",
         f"{r['predicted_vs_gemm']:.2f}x")
        for r in what_if_rows(machine)
    ]  # fmt: skip
    headers = ("shape", "backend", "variant", "predicted ms", "predicted / 3 GEMMs")
    return f"### {machine.name}: what-if variants of the new designs (predicted)\n\n" + (
        _md_table(headers, body)
    )


def sources() -> str:
    """Where the new designs' configurations came from."""
    triton_src = (
        "margin_kernels.ops.triton.config.plan" if HAS_TRITON_PLAN else "the model's reading"
    )
    cuda_src = "margin_kernels.ops.cuda.chunk_plan" if HAS_CHUNK_PLAN else "the model's reading"
    return f"new triton launches from {triton_src}; new cuda chunks from {cuda_src}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--machine", choices=("h100", "h200", "both"), default="both")
    parser.add_argument("--markdown", type=Path, help="write the tables as Markdown here")
    parser.add_argument("--csv", type=Path, help="write the summary rows as CSV here")
    parser.add_argument("--details", action="store_true", help="print per-kernel tables too")
    parser.add_argument(
        "--triton-config",
        type=Path,
        help="take the new Triton plan from this config.py (default: the installed package's)",
    )
    args = parser.parse_args(argv)
    if args.triton_config:
        use_triton_config(args.triton_config)
    keys = ("h100", "h200") if args.machine == "both" else (args.machine,)
    parts = [f"All times are predicted by bench/model.py, not measured ({sources()}).", ""]
    rows = []
    for key in keys:
        machine = MACHINES[key]
        parts += [summary_markdown(machine), "", what_if_markdown(machine), ""]
        rows += summary_rows(machine)
        if args.details:
            headline = SHAPES[0]
            for provider, design, _ in ROWS:
                parts += [detail_markdown(machine, headline, provider, design), ""]
    text = "\n".join(parts)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.csv:
        with args.csv.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["label", *rows[0]])
            writer.writeheader()
            for row in rows:
                writer.writerow({"label": PREDICTED, **row})
    return 0


if __name__ == "__main__":
    sys.exit(main())
