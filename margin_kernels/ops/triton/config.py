"""Tiles, grids and launch order of every Triton launch, in pure Python (torch, math and the
spec registry only).

The launchers in :mod:`margin_kernels.ops.triton.ops` take every tile, grid, warp and stage
count from this module, and ``bench/model.py`` reads the same numbers through :func:`plan`, so the
performance model describes exactly what runs.

Kernels (forward, then backward):

* ``_row_norm_kernel`` — ``max(||v||, eps)`` of the rows of x, then of the (sampled) rows of W.
  W's norms take one extra O(C D) pass: every forward program needs ``||W_j||`` before the first
  logit of a class tile, and computing it from the tile on chip would cost each of the B/BLOCK_M
  row-block programs C D CUDA-core multiply-adds (1/BLOCK_M of the GEMM on CUDA cores, more than
  the separate bandwidth-bound pass).
* ``_target_kernel`` — per row, the target logit and its chain coefficients (O(B D)).
* ``_fwd_kernel`` — one program per (row block, D slice, class split): online log-sum-exp over
  the split's class tiles, the target column masked; when a gradient is needed, also the dX
  numerator ``sum_j exp(f_ij - M_i) (df/dd)_ij W_j`` and the row sums of the norm chain rule,
  rescaled as flash attention rescales its output whenever the reference point M_i moves (it
  lags the running max by at most RESCALE_SLACK_NATS). Split partials are
  merged in a fixed order by torch (``merge``).
* ``_dw_kernel`` — one program per (class tile, D slice): walks every row tile in order with a
  (BLOCK_N, BLOCK_OUT) fp32 (fp64) accumulator, recomputes the logits from the final LSE, adds
  the column-norm term in its epilogue and writes dW once in W's dtype.
* ``rowwise`` (torch) — the target rows' and the feature-norm terms, O(B D).

A tile whose ``block_k == block_out >= D`` holds all of D on chip ("one K step"): x stays on chip
across the class tiles of the forward, the W tile across the row tiles of the backward, and one
load of the streamed operand feeds both GEMMs. Above that D the accumulator owns a D slice of
``block_out`` columns and the logits are recomputed per slice (``slices`` programs per tile).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ...spec import FAMILY_IDS, KINDS

# Non-target logit families (the ``NT`` constexpr of the kernels), numbered by spec.FAMILY_IDS.
NT_SCALED = FAMILY_IDS["scaled"]  # f = s c          (cosface, arcface, combined, lm_softmax)
NT_RAW = FAMILY_IDS["raw"]  # f = d                  (lsoftmax, soft_margin)
NT_XNORM = FAMILY_IDS["feature_norm"]  # f = ||x|| c = d / nw   (sphereface)
NT_SO = FAMILY_IDS["squared"]  # f = lambda_n (c^2 - m^2)   (so_softmax)
NT_W = FAMILY_IDS[
    "weighted"
]  # f = nx (alpha c_iy + c) / sqrt(1 + alpha^2 + 2 alpha g)   (w_softmax)

# kind name -> family id, from the registry.
NONTARGET_FAMILY = {name: info.family_id for name, info in KINDS.items()}

# Every launch states the full per-thread register budget. Left to itself, ptxas (as Triton
# drives it) caps some kernels at 96-128 registers to raise occupancy and spills instead.
MAX_REGISTERS = 255
# The forward's reference point M_i moves only when a logit passes it by more than this many
# nats (so p = exp(f - M_i) <= e^8 ~ 3e3: finite in fp32 and bf16 for any number of classes);
# rows whose reference stays are rescaled by exactly 1, so their sums take no rescale rounding.
RESCALE_SLACK_NATS = 8.0
# Programs per SM the forward's class splits aim for (whole waves at one resident program).
FORWARD_WAVES = 2


# SM counts of the active gpu_tiles() blocks (innermost last); empty outside them.
_GPU_TILE_SMS: list[int] = []


def interpreting() -> bool:
    """True under Triton's interpreter (TRITON_INTERPRET=1), which takes the small test tiles,
    unless :func:`gpu_tiles` asks for the GPU's."""
    return not _GPU_TILE_SMS and os.environ.get("TRITON_INTERPRET", "0") == "1"


def gpu_tiles_sms() -> int | None:
    """The SM count of the innermost active :func:`gpu_tiles` block (None outside one)."""
    return _GPU_TILE_SMS[-1] if _GPU_TILE_SMS else None


@contextlib.contextmanager
def gpu_tiles(num_sms: int = 132) -> Iterator[None]:
    """Test hook: inside this block the launchers take the tiles an sm_90 GPU with ``num_sms``
    SMs gets (132: an H100 SXM), i.e. those of :func:`plan` and of the generic (unaligned) table:
    blocks, warps, stages, one K step or D slices, EVEN_D and the forward's class splits, even
    when the kernels run under the interpreter on CPU tensors. So the CPU suite runs the tile
    table a GPU runs, with the same kernels. bf16 keeps its interpreter upcast (the
    interpreter's native bf16 dot is wrong); warps and stages reach the launch as options that
    the interpreter accepts and does not model. Not thread-safe (a module-level setting)."""
    if num_sms < 1:
        raise ValueError(f"num_sms must be >= 1, got {num_sms}")
    _GPU_TILE_SMS.append(num_sms)
    try:
        yield
    finally:
        _GPU_TILE_SMS.pop()


@dataclass(frozen=True)
class Tile:
    """One GEMM-shaped kernel's tile: rows x classes, the K step of the logits GEMM, the D slice
    its accumulator owns, warps and software-pipeline stages."""

    block_m: int
    block_n: int
    block_k: int
    block_out: int
    num_warps: int
    num_stages: int

    def one_k(self, dim: int) -> bool:
        """All of D on chip: one K step, one D slice."""
        return self.block_k == self.block_out and dim <= self.block_out

    def slices(self, dim: int) -> int:
        return 1 if self.one_k(dim) else max(1, math.ceil(dim / self.block_out))


@dataclass(frozen=True)
class RowTile:
    """Row-wise kernels (norms, target logits): rows per program, K step, warps."""

    block_r: int
    block_k: int
    num_warps: int = 4


def _pow2(n: int) -> int:
    return 1 << max(4, (max(n, 1) - 1).bit_length())


def full_d_limit(dtype: torch.dtype, family: int, interpret: bool | None = None) -> int:
    """Largest padded D (power of two) held on chip in one K step; above it, D slices."""
    if interpreting() if interpret is None else interpret:
        return 32
    if dtype in (torch.float16, torch.bfloat16):
        # W-Softmax carries W_y and two accumulators: always D slices of 128 on sm_90
        return 0 if family == NT_W else 512
    if dtype == torch.float32 and family != NT_W:
        return 64
    return 32


def gemm_tile(
    dtype: torch.dtype,
    family: int,
    dim: int,
    interpret: bool | None = None,
    aligned: bool = True,
    kernel: str = "forward",
    has_ids: bool = False,
) -> Tile:
    """Tile of ``_fwd_kernel`` (``kernel="forward"``) or ``_dw_kernel`` (``"dw"``): rows x classes.

    16-bit inputs run on tensor cores with fp32 accumulators: 64 x 64 tiles at 8 warps; with all
    of D on chip (D <= 512, W-Softmax D <= 256: it carries a second accumulator) the
    (64, 512) fp32 accumulator is 128 registers per thread. fp32 (FMA, or TF32 when torch allows
    it) and fp64 hold both operand slices in registers, hence narrower tiles. The interpreter
    takes 16-wide tiles so that small test shapes cross several tiles, splits, K steps and D
    slices. tests/triton_aot.py compiles every tile for sm_90 and checks that none spills."""
    interp = interpreting() if interpret is None else interpret
    limit = full_d_limit(dtype, family, interp)
    padded = _pow2(dim)
    if not aligned and not interp:
        # strided or D % 16 != 0 (see ``is_aligned``): per-element addresses and masks cost
        # registers, so D slices of a narrow accumulator (logits recomputed per slice)
        if dtype in (torch.float16, torch.bfloat16):
            # (the class-major dW owner with W-Softmax's second accumulator spills at 64 rows)
            return Tile(32 if kernel == "dw" else 64, 32, 32, 64, 8, 2)
        if dtype == torch.float32 and family != NT_W:
            return Tile(32, 32, 16, 32, 8, 2)
        # (the fp64 W-Softmax forward spills at 16 rows on Triton 3.6)
        return Tile(8 if kernel == "forward" else 16, 32, 16, 16, 4, 1)
    if interp:
        if padded <= limit:
            return Tile(16, 16, padded, padded, 1, 1)
        return Tile(16, 16, 16, 32, 1, 1)
    if dtype in (torch.float16, torch.bfloat16):
        if family == NT_W:  # two accumulators (dX and dW_y numerators)
            if padded <= limit:
                return Tile(64, 32, padded, padded, 8, 2)
            return Tile(64, 32, 64, 128, 8, 2)
        if padded <= limit:
            # 8 warps (two warpgroups), wgmma for both products (the logits split along N
            # between the warpgroups, the second product along D); the (64, 512) fp32
            # accumulator is 128 of the 255 registers. One stage: with two, Triton keeps the
            # second product in flight into the next step, its register A operand (P) shares
            # registers with the next logits' accumulator, and ptxas serialises every wgmma of
            # the kernel (advisory C7515, checked by tests/test_triton_aot.py). Forward 64 rows
            # x 32 classes, dW 64 classes x 32 rows (16 with Partial-FC's gathered ids or
            # SO-Softmax): the widest tiles that Triton 3.6 compiles without spilling.
            if kernel == "dw":
                if has_ids and dtype == torch.float16:
                    # fp16's operand scaling on top of the gathered ids: 32 classes (mma.sync)
                    return Tile(16, 32, padded, padded, 8, 1)
                return Tile(16 if has_ids or family == NT_SO else 32, 64, padded, padded, 8, 1)
            return Tile(64, 32, padded, padded, 8, 1)
        return Tile(64, 64, 64, 256, 8, 2)
    if dtype == torch.float32 and family != NT_W:
        # FMA (or TF32) dots hold both operand tiles in registers: 8 warps share them
        if padded <= limit:
            return Tile(32, 32, padded, padded, 8, 1 if kernel == "dw" else 2)
        return Tile(32, 32, 16, 128, 8, 2)
    # fp64, and fp32 W-Softmax (W_y and two accumulators): the fp64 tiles
    if padded <= limit:
        return Tile(16, 32, padded, padded, 4, 1)
    return Tile(16, 32, 16, 32 if kernel == "dw" else 64, 4, 1)


def is_aligned(dim: int, *tensors: torch.Tensor) -> bool:
    """What Triton's JIT specialises a launch to and the large tiles need: D % 16 == 0, unit
    inner strides, row strides and base addresses multiples of 16 (elements / bytes)."""
    return dim % 16 == 0 and all(
        t.stride(1) == 1 and t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0 for t in tensors
    )


def row_tile(dtype: torch.dtype, interpret: bool | None = None) -> RowTile:
    """Row-wise kernels: spill-free on sm_90 (fp64 takes fewer rows for the arccos polynomial)."""
    if interpreting() if interpret is None else interpret:
        return RowTile(256, 16, 1)
    return RowTile(8, 64) if dtype == torch.float64 else RowTile(16, 64)


def zero_tile(interpret: bool | None = None) -> RowTile:
    """Partial-FC's zero fill of the unsampled rows of dW: 16 rows x 256 elements per step
    (16-byte stores per thread at 4 warps), a pure store stream."""
    if interpreting() if interpret is None else interpret:
        return RowTile(64, 16, 1)
    return RowTile(16, 256, 4)


def forward_splits(batch: int, num_cols: int, tile: Tile, slices: int, num_sms: int) -> int:
    """Class splits of the forward: about FORWARD_WAVES programs per SM over (row blocks x D
    slices x splits); each split owns whole class tiles."""
    row_blocks = max(1, math.ceil(batch / tile.block_m))
    col_tiles = max(1, math.ceil(num_cols / tile.block_n))
    want = max(1, (FORWARD_WAVES * num_sms) // (row_blocks * slices))
    splits = max(1, min(col_tiles, want))
    per_split = math.ceil(col_tiles / splits)
    return max(1, math.ceil(col_tiles / per_split))


def cols_per_split(num_cols: int, splits: int, tile: Tile) -> int:
    col_tiles = max(1, math.ceil(num_cols / tile.block_n))
    return math.ceil(col_tiles / splits) * tile.block_n


@dataclass(frozen=True)
class Launch:
    phase: str  # "forward" or "backward"
    kernel: str  # name of the @triton.jit function launched ("torch" for torch ops)
    role: str  # row_norms, col_norms, target, forward, merge, dw, dx, rowwise
    grid: tuple[int, ...]  # programs per grid axis (axis 0 is launched fastest)
    block_m: int  # rows of x per tile (0 if none)
    block_n: int  # classes per tile (0 if none)
    block_k: int  # D elements per inner step (or the full D when the tile holds all of D)
    num_warps: int
    num_stages: int
    row_tiles_per_program: int
    col_tiles_per_program: int
    order: str  # launch order / grouping in words


def plan(
    batch: int,
    num_classes: int,
    dim: int,
    dtype: torch.dtype,
    kind: str,
    num_sampled: int | None = None,
    needs_dx: bool = True,
    needs_dw: bool = True,
    num_sms: int = 132,
) -> list[Launch]:
    """Every launch of one forward + backward on a GPU (not the interpreter), in launch order."""
    family = NONTARGET_FAMILY[kind]
    cols = num_classes if num_sampled is None else num_sampled
    rt = row_tile(dtype, interpret=False)
    tile = gemm_tile(dtype, family, dim, interpret=False)
    slices = tile.slices(dim)
    row_blocks = max(1, math.ceil(batch / tile.block_m))
    col_tiles = max(1, math.ceil(cols / tile.block_n))
    k_inner = dim if tile.one_k(dim) else tile.block_k
    # W-Softmax's dW needs the forward's dW_y numerator even when x needs no gradient
    needs_num = needs_dx or (family == NT_W and needs_dw)
    fwd_slices = slices if needs_num else 1
    splits = forward_splits(batch, cols, tile, fwd_slices, num_sms)
    per_split = math.ceil(col_tiles / splits)
    out = [
        Launch("forward", "_row_norm_kernel", "row_norms", (math.ceil(batch / rt.block_r),),
               rt.block_r, 0, rt.block_k, rt.num_warps, 1, 1, 0, "row blocks in order"),
        Launch("forward", "_row_norm_kernel", "col_norms", (math.ceil(cols / rt.block_r),),
               rt.block_r, 0, rt.block_k, rt.num_warps, 1, 1, 0, "class rows in order"),
        Launch("forward", "_target_kernel", "target", (math.ceil(batch / rt.block_r),),
               rt.block_r, 0, rt.block_k, rt.num_warps, 1, 1, 0, "row blocks in order"),
        Launch("forward", "_fwd_kernel", "forward", (row_blocks * fwd_slices, splits),
               tile.block_m, tile.block_n, k_inner, tile.num_warps, tile.num_stages, 1,
               per_split,
               "axis 0: row blocks (then D slices) fastest, so the programs of one class split "
               "run together and read each W tile from HBM once; x on chip across class tiles "
               "when one K step"),
        Launch("forward", "torch", "merge", (), 0, 0, 0, 0, 0, 0, splits,
               "log-sum-exp and dX numerator of the splits, summed in split order"),
    ]  # fmt: skip
    if needs_dw and cols:
        tile = gemm_tile(
            dtype, family, dim, interpret=False, kernel="dw", has_ids=num_sampled is not None
        )
        slices = tile.slices(dim)
        row_blocks = max(1, math.ceil(batch / tile.block_m))
        col_tiles = max(1, math.ceil(cols / tile.block_n))
        k_inner = dim if tile.one_k(dim) else tile.block_k
        out.append(
            Launch(
                "backward",
                "_dw_kernel",
                "dw",
                (col_tiles * slices,),
                tile.block_m,
                tile.block_n,
                k_inner,
                tile.num_warps,
                tile.num_stages,
                row_blocks,
                1,
                "axis 0: D slices fastest, then class tiles; each program walks every row "
                "tile in order (x from L2), W tile on chip when one K step",
            )
        )
    if needs_dw and cols and num_sampled is not None:
        zt = zero_tile(interpret=False)
        out.insert(
            len(out) - 1,
            Launch("backward", "_zero_unsampled_kernel", "zero_fill",
                   (math.ceil(num_classes / zt.block_r),), zt.block_r, 0, zt.block_k,
                   zt.num_warps, 1, 1, 0,
                   "class rows in order; writes the unsampled rows only (the owners, launched "
                   "next, write the sampled ones): one pass over dW"),
        )  # fmt: skip
    out.append(
        Launch(
            "backward",
            "torch",
            "rowwise",
            (),
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            "dX = g numerator + norm and target terms; target rows of dW (O(B D))",
        )
    )
    return out
