"""The Triton launch plan (pure Python, no Triton needed): order, roles, tiles and grids at the
shapes the performance model reports."""

from __future__ import annotations

import math

import pytest
import torch

from margin_kernels.ops.triton import config


def _by_role(launches):
    return {launch.role: launch for launch in launches}


@pytest.mark.parametrize("batch", [1024, 128])
def test_headline_shape_holds_d_on_chip_and_fills_132_sms(batch):
    launches = config.plan(batch, 10**6, 512, torch.bfloat16, "arcface")
    assert [launch.role for launch in launches] == [
        "row_norms", "col_norms", "target", "forward", "merge", "dw", "rowwise",
    ]  # fmt: skip
    roles = _by_role(launches)
    fwd, dw = roles["forward"], roles["dw"]
    assert fwd.block_k == 512 and dw.block_k == 512  # one K step: x / the W tile stay on chip
    assert math.prod(fwd.grid) >= 132 and math.prod(dw.grid) >= 132
    # every class tile is covered once by each row block: splits x tiles per split >= tiles
    assert fwd.grid[1] * fwd.col_tiles_per_program * fwd.block_n >= 10**6
    assert fwd.grid[0] == math.ceil(batch / fwd.block_m)
    assert dw.row_tiles_per_program == math.ceil(batch / dw.block_m)
    assert dw.grid == (math.ceil(10**6 / dw.block_n),)


def test_partial_fc_plans_only_the_sampled_classes():
    roles = _by_role(config.plan(1024, 10**6, 512, torch.bfloat16, "cosface", num_sampled=10**5))
    assert roles["dw"].grid == (math.ceil(10**5 / roles["dw"].block_n),)
    assert roles["col_norms"].grid == (math.ceil(10**5 / roles["col_norms"].block_m),)


def test_w_softmax_takes_d_slices_and_inference_skips_the_backward():
    roles = _by_role(config.plan(1024, 10**5, 512, torch.bfloat16, "w_softmax"))
    fwd = roles["forward"]
    slices = 512 // config.gemm_tile(torch.bfloat16, config.NT_W, 512, interpret=False).block_out
    assert slices > 1 and fwd.grid[0] == math.ceil(1024 / fwd.block_m) * slices
    launches = config.plan(1024, 10**5, 512, torch.bfloat16, "cosface", needs_dx=False,
                           needs_dw=False)  # fmt: skip
    assert "dw" not in _by_role(launches)


def test_tiles_above_the_on_chip_limit_slice_d():
    tile = config.gemm_tile(torch.bfloat16, config.NT_SCALED, 2048, interpret=False)
    assert not tile.one_k(2048) and tile.slices(2048) == 2048 // tile.block_out
    generic = config.gemm_tile(torch.bfloat16, config.NT_SCALED, 500, interpret=False,
                               aligned=False)  # fmt: skip
    assert not generic.one_k(500)
