"""Python branches that only a GPU run selects, run on CPU by selecting them explicitly:

* the CUDA backend's scatter of dW rows on CUDA tensors (``index_add_``): repeated labels and
  Partial-FC rows must accumulate, not overwrite;
* the Triton launcher's GEMM precision: fp32 takes TF32 only when torch's matmul precision
  allows it (never under "highest", torch's default);
* the Triton launcher's ``EVEN_D`` on the GPU's tile table: unmasked D loads only where D is a
  multiple of the tile's D slice (a GPU tile of 64-256 would otherwise read past each row).
"""

from __future__ import annotations

import pytest
import torch

from margin_kernels.ops import cuda as cuda_backend


@pytest.fixture
def matmul_precision():
    """Restores torch's fp32 matmul precision after the test."""
    saved = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(saved)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("device_type", ["cuda", "cpu"])
def test_accumulate_rows_sums_repeated_indices_in_every_branch(device_type, deterministic):
    g = torch.Generator().manual_seed(0)
    out = torch.randn(6, 5, generator=g, dtype=torch.float64)
    index = torch.tensor([4, 1, 4, 0, 4, 1])
    rows = torch.randn(6, 5, generator=g, dtype=torch.float64)
    want = out.clone()
    for k, i in enumerate(index.tolist()):
        want[i] += rows[k]
    cuda_backend._accumulate_rows(out, index, rows, deterministic, device_type=device_type)
    torch.testing.assert_close(out, want, rtol=1e-15, atol=1e-15)


triton_ops = pytest.importorskip("margin_kernels.ops.triton.ops")
if not triton_ops.HAS_TRITON:
    pytest.skip("Triton is not installed", allow_module_level=True)
from margin_kernels.ops.triton import config  # noqa: E402


def test_fp32_gemm_precision_follows_torch(matmul_precision):
    matmul_precision("highest")
    assert triton_ops._precision(torch.float32) == "ieee"
    for allowed in ("high", "medium"):
        matmul_precision(allowed)
        assert triton_ops._precision(torch.float32) == "tf32"
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        for setting in ("highest", "high"):
            matmul_precision(setting)
            assert triton_ops._precision(dtype) == "ieee"


# D multiples of 16 that are not multiples of the GPU tiles' D slice (64, 128, 256, 512), and
# multiples of it
_DIMS = (16, 48, 64, 80, 144, 272, 512, 528, 784, 1024)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
                         ids=str)  # fmt: skip
def test_even_d_on_the_gpu_tile_table(dtype):
    seen = set()
    for family in (config.NT_RAW, config.NT_XNORM, config.NT_SCALED, config.NT_SO, config.NT_W):
        for kernel in ("forward", "dw"):
            for ids in (False, True):
                for aligned in (True, False):
                    for dim in _DIMS:
                        tile = config.gemm_tile(dtype, family, dim, interpret=False,
                                                aligned=aligned, kernel=kernel,
                                                has_ids=ids)  # fmt: skip
                        even = triton_ops._gemm_common(dtype, family, ids, tile, dim)["EVEN_D"]
                        assert even == (dim % tile.block_out == 0), (family, kernel, dim, tile)
                        seen.add(even)
    assert seen == {True, False}
