"""Plausible bugs for the mutation check (``make mutation``, see tests/mutation/run.py).

Each entry: an id, the file, one or more exact ``(original, replacement)`` snippets, what the bug
is, and the test files to run against it (a subset, to keep a run practical; new-test files are
listed first so that a kill is found fast). An original that is not found exactly once is
reported STALE, not run: the Triton and CUDA backends change, so refresh a snippet by copying
the current line(s) into ``original``. Mutations of the CUDA kernels (``csrc/epilogue_kernels.cuh``)
are killed or not by the emulated kernels (tests/test_cuda_emulation.py), which the mutated copy
rebuilds from its own csrc/ (~10 s); the extension ``_C`` is not rebuilt (~90 s), so mutations of
``margin_ops.cpp`` (the CPU twin, the oracle of those tests) are not in the list. The CUDA
backend's Python side is (its column-norm chain term of dW is dropped by skipping the
``margin_column_chain`` pass).
"""

from __future__ import annotations

from dataclasses import dataclass

TRITON_MATH = "margin_kernels/ops/triton/margin_math.py"
TRITON_FWD = "margin_kernels/ops/triton/forward.py"
TRITON_BWD = "margin_kernels/ops/triton/backward.py"
TRITON_OPS = "margin_kernels/ops/triton/ops.py"
CUDA = "margin_kernels/ops/cuda.py"
REFERENCE = "margin_kernels/reference.py"
CUDA_KERNELS = "csrc/epilogue_kernels.cuh"

T_TRITON = "tests/test_triton_backend.py"
T_TRITON_DEFECTS = "tests/test_triton_defects.py"
T_TRITON_DESIGN = "tests/test_triton_design.py"
T_CUDA = "tests/test_cuda_backend.py"
T_REFERENCE = "tests/test_reference.py"
T_API = "tests/test_api.py"
T_DEMO = "tests/test_demo.py"
T_DIST = "tests/test_distributed.py"
T_SWEEP = "tests/test_elementwise_sweep.py"
T_DEGENERATE = "tests/test_degenerate_rows.py"
T_SHARD = "tests/test_shard_targets.py"
T_VALUES = "tests/test_values.py"
T_EMULATION = "tests/test_cuda_emulation.py"
PROBE = "margin_kernels/ops/probe.py"
OPS = "margin_kernels/ops/__init__.py"
DISTRIBUTED = "margin_kernels/distributed.py"
T_PROBE = "tests/test_probe.py"
T_DIST_FAIL = "tests/test_distributed_failures.py"


@dataclass(frozen=True)
class Mutation:
    id: str
    file: str
    edits: tuple[tuple[str, str], ...]
    description: str
    tests: tuple[str, ...]


MUTATIONS = [
    # --- the six that survived the whole suite when the issue was filed ---------------------
    Mutation(
        "triton_psi_m4_third_threshold",
        TRITON_MATH,
        (
            (
                "        for j in tl.static_range(1, PSI_M):\n"
                "            k += (c < tl.load(PARAMS + P_THRESHOLDS - 1 + j)).to(c.dtype)\n",
                "        for j in tl.static_range(1, PSI_M):\n"
                "            if j != 3:\n"
                "                k += (c < tl.load(PARAMS + P_THRESHOLDS - 1 + j)).to(c.dtype)\n",
            ),
        ),
        "Triton psi (m >= 4): the third sign test, c < cos(3 pi / m), dropped (k = 3 never "
        "reached for m = 4)",
        (T_SWEEP, T_TRITON, T_TRITON_DEFECTS),
    ),
    Mutation(
        "triton_norm_clamp",
        TRITON_FWD,
        (
            (
                "tl.store(OUT + rows, tl.maximum(tl.sqrt(sq), EPS_NORM), mask=row_mask)",
                "tl.store(OUT + rows, tl.sqrt(sq), mask=row_mask)",
            ),
            ("ny = tl.maximum(tl.sqrt(sq), EPS_NORM)", "ny = tl.sqrt(sq)"),
        ),
        "Triton kernels: norms without the max(||v||, eps) clamp (row-norm and target kernels)",
        (T_DEGENERATE, T_TRITON),
    ),
    Mutation(
        "reference_norm_clamp",
        REFERENCE,
        (
            (
                "return torch.linalg.vector_norm(v, dim=-1).clamp_min(NORM_EPS)",
                "return torch.linalg.vector_norm(v, dim=-1)",
            ),
        ),
        "reference: norms without the max(||v||, eps) clamp",
        (T_DEGENERATE, T_REFERENCE, T_API),
    ),
    Mutation(
        "cuda_norm_clamp",
        CUDA,
        (
            (
                "(x, dim=-1, dtype=compute).clamp_min(NORM_EPS)",
                "(x, dim=-1, dtype=compute)",
            ),
            (
                "(w_y, dim=-1, dtype=compute).clamp_min(NORM_EPS)",
                "(w_y, dim=-1, dtype=compute)",
            ),
            ("                raw.clamp_min(NORM_EPS),\n", "                raw,\n"),
            ("col_norm = raw.clamp_min(NORM_EPS)", "col_norm = raw"),
            ("    norm = raw.clamp_min(NORM_EPS)\n", "    norm = raw\n"),
        ),
        "CUDA backend (Python side): norms without the max(||v||, eps) clamp (x, W_y, the "
        "chunks' column norms, the backward's directions)",
        (T_DEGENERATE, T_CUDA),
    ),
    Mutation(
        "triton_target_outside_shard",
        TRITON_OPS,
        (
            (
                "y = torch.where((target >= 0) & (target < num_classes), target, -1).contiguous()",
                "y = torch.where(target >= 0, target, -1).contiguous()",
            ),
        ),
        "Triton launcher: a target >= C no longer means 'no target in this shard'",
        (T_SHARD, T_TRITON, T_DIST),
    ),
    Mutation(
        "scores_not_normalised",
        "margin_kernels/nn.py",
        (
            (
                "nn.functional.normalize(embeddings, dim=1) @ nn.functional.normalize(w, dim=1).T",
                "embeddings @ w.T",
            ),
        ),
        "modules' scores() return raw logits for the normalised-weight kinds",
        (T_VALUES, T_API, T_DEMO),
    ),
    Mutation(
        "demo_nearest_other_is_farthest",
        "demo/run.py",
        (
            (
                "others = angles.scatter(1, labels[:, None], math.inf).min(1).values",
                "others = angles.scatter(1, labels[:, None], -math.inf).max(1).values",
            ),
        ),
        "demo: the 'nearest other class' angle is the farthest one",
        (T_VALUES, T_DEMO),
    ),
    # --- other plausible bugs ---------------------------------------------------------------
    Mutation(
        "reference_lse_without_target_mask",
        REFERENCE,
        (
            (
                "neg_lse = torch.logsumexp(f.masked_fill(is_target_col, -math.inf), dim=1)",
                "neg_lse = torch.logsumexp(f, dim=1)",
            ),
        ),
        "reference: the negatives' LSE keeps the target column",
        (T_VALUES, T_REFERENCE),
    ),
    Mutation(
        "mean_divides_by_batch",
        REFERENCE,
        (
            (
                "return total / valid.sum().clamp_min(1).to(total.dtype)",
                "return total / max(valid.numel(), 1)",
            ),
        ),
        "mean reduction divides by B instead of the number of non-ignored rows",
        (T_REFERENCE, T_API),
    ),
    Mutation(
        "ignored_rows_not_zeroed",
        REFERENCE,
        (("rows = torch.where(valid, rows, torch.zeros_like(rows))", "rows = rows + 0"),),
        "rows with ignore_index keep their loss (softplus of their LSE)",
        (T_REFERENCE, T_API),
    ),
    Mutation(
        "triton_arc_fallback_sign",
        TRITON_MATH,
        (("plain = c > -cos_m", "plain = c > cos_m"),),
        "Triton ArcFace: the theta > pi - m fallback threshold with the wrong sign",
        (T_SWEEP, T_TRITON),
    ),
    Mutation(
        "triton_straight_through_ignored",
        TRITON_MATH,
        (
            (
                "deriv = tl.full(c.shape, 1.0, c.dtype)  # straight-through: dT/dc = s",
                "deriv = deriv + 0.0",
            ),
        ),
        "Triton: grad_mode='straight_through' ignored (exact derivative used)",
        (T_SWEEP, T_TRITON),
    ),
    Mutation(
        "triton_chebyshev_t3",
        TRITON_MATH,
        (("cheb = (4.0 * c2 - 3.0) * c", "cheb = (4.0 * c2 - 2.0) * c"),),
        "Triton: Chebyshev T3 with a wrong coefficient (4c^3 - 2c)",
        (T_SWEEP, T_TRITON),
    ),
    Mutation(
        "triton_partial_fc_ids_ignored",
        TRITON_OPS,
        (
            (
                "ids = class_ids.contiguous() if class_ids is not None else None",
                "ids = None",
            ),
        ),
        "Triton: Partial-FC class ids ignored (every class in the denominator)",
        (T_SHARD, T_TRITON),
    ),
    Mutation(
        "triton_dw_column_norm_term",
        TRITON_BWD,
        (("coef = acc_nw / nw", "coef = 0.0 * acc_nw / nw"),),
        "Triton dW-owner kernel: the column-norm chain term of its epilogue dropped",
        (T_SWEEP, T_TRITON),
    ),
    Mutation(
        "triton_bf16_upcast_ignored",
        TRITON_OPS,
        (
            (
                "UPCAST=INTERPRET and dtype == torch.bfloat16,",
                "UPCAST=False,",
            ),
        ),
        "Triton: the interpreter's bf16 upcast switch ignored",
        (T_TRITON,),
    ),
    Mutation(
        "cuda_dw_radial_term",
        CUDA,
        (("if normalizes_weight:", "if False:"),),
        "CUDA backend: the column-norm (radial) term of dW dropped (the margin_column_chain "
        "pass skipped, H_c copied as dW_c)",
        (T_DEGENERATE, T_CUDA),
    ),
    Mutation(
        "distributed_target_logit_max",
        "margin_kernels/distributed.py",
        (
            (
                "target_logit = stats[..., 1].sum(dim=0)",
                "target_logit = stats[..., 1].max(dim=0).values",
            ),
        ),
        "class-parallel loss: target logit as the max over shards, not the owner's value",
        (T_DIST,),
    ),
    # --- bugs specific to the split-LSE Triton forward --------------------------------------
    Mutation(
        "triton_dx_numerator_not_rescaled",
        TRITON_FWD,
        (("acc = acc * rescale[:, None]", "acc = acc * 1.0"),),
        "Triton forward: the dX numerator not rescaled by exp(M_old - M_new) when the "
        "reference point moves",
        (T_TRITON_DESIGN, T_TRITON, T_SWEEP, T_TRITON_DEFECTS),
    ),
    Mutation(
        "triton_partial_fc_rows_not_zero_filled",
        TRITON_OPS,
        (("sampled[ids] = 1", "sampled[:] = 1"),),
        "Triton Partial-FC: the unsampled rows of dW never written (the zero fill skips them; "
        "dW is allocated without a memset)",
        (T_TRITON_DESIGN,),
    ),
    Mutation(
        "triton_norm_term_one_bf16_part",
        TRITON_MATH,
        (("for _ in range(3):", "for _ in range(1):"),),
        "Triton dW epilogue: the column-norm coefficient as one 16-bit part, not three",
        (T_TRITON_DESIGN,),
    ),
    Mutation(
        "triton_split_merge_wrong_max",
        TRITON_OPS,
        (("neg_lse = top + torch.log(total)", "neg_lse = part_m[0] + torch.log(total)"),),
        "Triton split merge: the LSE adds back the first split's max, not the max the "
        "partial sums were weighted by",
        (T_TRITON, T_SHARD, T_SWEEP),
    ),
    Mutation(
        "triton_fp16_scale_not_undone",
        TRITON_MATH,
        (("out = out * (1.0 / scale)[:, None]", "out = out + 0.0"),),
        "Triton fp16 second GEMM: the per-row power-of-two operand scale not undone",
        (T_TRITON_DEFECTS, T_TRITON),
    ),
    # --- issue 21: GPU-only Python branches, the GPU tile table, the fp64 arccos ------------
    Mutation(
        "cuda_dw_rows_index_copy",
        CUDA,
        (("        out.index_add_(0, index, rows)", "        out.index_copy_(0, index, rows)"),),
        "CUDA backend, CUDA tensors: the dW rows of repeated labels / Partial-FC rows overwrite "
        "each other instead of accumulating",
        ("tests/test_gpu_only_branches.py",),
    ),
    Mutation(
        "triton_fp32_always_tf32",
        TRITON_OPS,
        (
            (
                "    if dtype == torch.float32 and torch.get_float32_matmul_precision()"
                ' != "highest":',
                "    if dtype == torch.float32:",
            ),
        ),
        "Triton launcher: fp32 GEMMs in TF32 even under torch's 'highest' matmul precision",
        ("tests/test_gpu_only_branches.py",),
    ),
    Mutation(
        "triton_even_d_multiple_of_16",
        TRITON_OPS,
        (("        EVEN_D=dim % tile.block_out == 0,", "        EVEN_D=dim % 16 == 0,"),),
        "Triton launcher: unmasked D loads whenever D % 16 == 0 (a GPU tile of 64-256 reads "
        "past each row)",
        ("tests/test_gpu_only_branches.py", "tests/test_triton_gpu_tiles.py"),
    ),
    Mutation(
        "partial_fc_v2_sampling_strict",
        "margin_kernels/compat/insightface.py",
        (
            (
                "        if self.num_sample >= positive.numel():",
                "        if self.num_sample > positive.numel():",
            ),
        ),
        "PartialFC_V2: with exactly num_sample positives the torch.rand draw arcface_torch "
        "makes is skipped (the RNG stream diverges from the next step on)",
        ("tests/test_partial_fc_sampling.py",),
    ),
    Mutation(
        "selftest_mean_error",
        "margin_kernels/selftest.py",
        (
            (
                "    return ((got.double() - exact).abs().max() / scale).item()",
                "    return ((got.double() - exact).abs().mean() / scale).item()",
            ),
        ),
        "Self-test: the error metric averages the entries (one wrong entry diluted by "
        "1 / (B D)) instead of taking the largest",
        ("tests/test_selftest.py",),
    ),
    Mutation(
        "triton_fp64_acos_not_refined",
        TRITON_MATH,
        (
            (
                "            asin_r = asin_r - (tl.sin(asin_r) - r) / tl.cos(asin_r)\n",
                "            asin_r = asin_r + 0.0\n",
            ),
        ),
        "Triton combined margin, fp64: the arccos left at the fp32 polynomial's accuracy "
        "(~1e-7 in the angle, ~1e-10 in dX/dW)",
        ("tests/test_fp64_exact.py",),
    ),
    # --- the CUDA kernels' own source, run by the emulated kernels ---------------------------
    Mutation(
        "cuda_warp_sum_from_offset_8",
        CUDA_KERNELS,
        (
            (
                "for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);",
                "for (int off = 8; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);",
            ),
        ),
        "CUDA warp_sum: the butterfly starts at offset 8 (lanes 16-31 never reach lane 0: "
        "block_sum of the backward and the column chain drop half of each warp)",
        (T_EMULATION,),
    ),
    Mutation(
        "cuda_block_lse_from_offset_8",
        CUDA_KERNELS,
        (
            (
                "  for (int off = 16; off > 0; off >>= 1) {\n"
                "    LseState<M> other{__shfl_xor_sync(0xffffffffu, st.max, off),",
                "  for (int off = 8; off > 0; off >>= 1) {\n"
                "    LseState<M> other{__shfl_xor_sync(0xffffffffu, st.max, off),",
            ),
        ),
        "CUDA block_lse: the warp stage of the LSE shuffle starts at offset 8",
        (T_EMULATION,),
    ),
    Mutation(
        "cuda_block_lse_sum_from_wrong_lane",
        CUDA_KERNELS,
        (
            (
                "                      __shfl_xor_sync(0xffffffffu, st.sum, off)};",
                "                      __shfl_xor_sync(0xffffffffu, st.sum, off >> 1)};",
            ),
        ),
        "CUDA block_lse: the partner's sum read with the wrong xor offset (max and sum of "
        "different lanes merged)",
        (T_EMULATION,),
    ),
    Mutation(
        "cuda_visit_row_no_scalar_tail",
        CUDA_KERNELS,
        (
            (
                "  for (int64_t j = head + num_packs * kVec + threadIdx.x; j < n; j += blockDim.x) "
                "scalar(j);\n",
                "",
            ),
        ),
        "CUDA visit_row: the scalar tail after the last whole 16-byte pack dropped",
        (T_EMULATION,),
    ),
    Mutation(
        "cuda_visit_row_pack_stride",
        CUDA_KERNELS,
        (
            (
                "for (int64_t v = threadIdx.x; v < num_packs; v += blockDim.x) {",
                "for (int64_t v = threadIdx.x; v < num_packs; v += 2 * blockDim.x) {",
            ),
        ),
        "CUDA visit_row: the block strides over the packs twice as far (every other round of "
        "packs skipped on rows of more than 256 packs)",
        (T_EMULATION,),
    ),
    Mutation(
        "cuda_merge_drops_last_split",
        CUDA_KERNELS,
        (
            (
                "static_cast<const M*>(a.partial_b) + row * splits, splits);\n"
                "  const RowInputs<M> r",
                "static_cast<const M*>(a.partial_b) + row * splits, splits - 1);\n"
                "  const RowInputs<M> r",
            ),
        ),
        "CUDA finish_forward_row: the merge of the split partials stops before the last split",
        (T_EMULATION,),
    ),
    Mutation(
        "cuda_merge_ignores_running_lse",
        CUDA_KERNELS,
        (
            (
                "running[row] = merge_running_lse(running[row],",
                "running[row] = merge_running_lse(M(-INFINITY),",
            ),
        ),
        "CUDA finish_forward_row: the chunk's LSE replaces the running LSE of the previous "
        "chunks instead of merging into it",
        (T_EMULATION,),
    ),
    Mutation(
        "cuda_backward_merge_wrong_partials",
        CUDA_KERNELS,
        (
            (
                "const M d_cy = sum_partials(static_cast<const M*>(a.partial_b)",
                "const M d_cy = sum_partials(static_cast<const M*>(a.partial_a)",
            ),
        ),
        "CUDA finish_backward_row: dL/dc_y summed from the dL/d||x|| partials",
        (T_EMULATION,),
    ),
    Mutation(
        "cuda_segment_floor_length",
        CUDA_KERNELS,
        (
            (
                "const int64_t seg = segment_length(a.num_cols, a.class_splits);",
                "const int64_t seg = a.num_cols / a.class_splits;",
            ),
        ),
        "CUDA block_segment: the segment length rounded down (the last S mod class_splits "
        "columns of each row in no segment)",
        (T_EMULATION,),
    ),
    Mutation(
        "cuda_column_chain_dot_off_by_one",
        CUDA_KERNELS,
        (
            (
                "for (int64_t d = threadIdx.x; d < a.dim; d += blockDim.x) dot += ",
                "for (int64_t d = threadIdx.x; d < a.dim - 1; d += blockDim.x) dot += ",
            ),
        ),
        "CUDA column_chain_kernel: the dot W_j . H_j stops one element short",
        (T_EMULATION,),
    ),
    Mutation(
        "cuda_bf16_grad_written_as_half",
        CUDA_KERNELS,
        (
            (
                "a.grad_storage == Storage::kBFloat16",
                "a.grad_storage == Storage::kFloat16",
            ),
        ),
        "CUDA backward launcher: a bf16 dL/dz buffer written with the fp16 kernel",
        (T_EMULATION,),
    ),
    Mutation(
        "cuda_block_sum_missing_barrier",
        CUDA_KERNELS,
        (("  v = warp_sum(v);\n  __syncthreads();\n", "  v = warp_sum(v);\n"),),
        "CUDA block_sum: the barrier before the shared scratch is written dropped (a second "
        "block_sum, W-Softmax's dL/dc_y, overwrites partials the first still reads)",
        (T_EMULATION,),
    ),
    Mutation(
        "cuda_16bit_dz_without_column_norm",
        CUDA_KERNELS,
        (("kInPlace ? inv_w_norm : M(1)", "inv_w_norm"),),
        "CUDA backward epilogue: the 16-bit dL/dz buffer takes dL/dz itself, not dL/dz times "
        "max(||W_j||, eps) (a zero weight row overflows fp16; every other column is off by "
        "||W_j|| against the host's unscaling)",
        (T_EMULATION,),
    ),
    Mutation(
        "cuda_16bit_dx_operand_not_normalised",
        CUDA,
        (
            (
                "w_dx = _normalized_rows(w_op, col_norm) if unscale_cols else w_op",
                "w_dx = w_op",
            ),
        ),
        "CUDA backend, 16-bit GPU flow: the dX GEMMs read W_c instead of W_c / max(||W_j||, eps)",
        (T_EMULATION,),
    ),
    Mutation(
        "cuda_16bit_dw_rows_not_unscaled",
        CUDA,
        (
            (
                "h_c, w_c, raw, None if rows is h_c else rows, unscale_cols",
                "h_c, w_c, raw, None if rows is h_c else rows, False",
            ),
        ),
        "CUDA backend, 16-bit GPU flow: H_c = u^T x not divided by max(||W_j||, eps) (dW rows "
        "scaled by the column norm)",
        (T_EMULATION,),
    ),
    Mutation(
        "cuda_16bit_dz_without_row_norm",
        CUDA_KERNELS,
        (("!kInPlace && dz_has_inv_x_norm<F>() ? r.x_norm : M(1)", "M(1)"),),
        "CUDA backward epilogue: the 16-bit dL/dz buffer of the scaled and squared families not "
        "multiplied by max(||x_i||, eps) (a zero feature row overflows fp16; every other row is "
        "off by ||x_i|| against the host's unscaling)",
        (T_EMULATION,),
    ),
    Mutation(
        "cuda_16bit_dx_rows_not_unscaled",
        CUDA,
        (("        if unscale_rows:\n            grad_x /= xn\n", ""),),
        "CUDA backend, 16-bit GPU flow: dX's rows not divided by max(||x_i||, eps) in the scaled "
        "and squared families",
        (T_EMULATION,),
    ),
    Mutation(
        "cuda_column_chain_ignores_h_scaled",
        CUDA_KERNELS,
        (("column_chain_scale(a.h_scaled, raw)", "column_chain_scale(false, raw)"),),
        "CUDA column_chain_kernel: a scaled H_j not divided by max(||W_j||, eps)",
        (T_EMULATION,),
    ),
    # --- first-use probes and no rank left hanging (issue 22) ----------------------------------
    Mutation(
        "probe_tolerance_100x",
        PROBE,
        (
            (
                "out[q] = OWN_FACTOR * (own_err + rms) + REL[dtype][q] * e.abs() + "
                "ABS[dtype][q] * scale",
                "out[q] = 100 * (OWN_FACTOR * (own_err + rms) + REL[dtype][q] * e.abs() + "
                "ABS[dtype][q] * scale)",
            ),
        ),
        "Probe: the element-wise bounds 100x looser (a kernel 1 % off in one entry passes)",
        (T_PROBE,),
    ),
    Mutation(
        "probe_skipped_for_weighted_family",
        PROBE,
        (
            (
                '    current = mode()\n    if current == "off":\n',
                '    current = mode()\n    if current == "off" or spec.kind == "w_softmax":\n',
            ),
        ),
        "Probe: never run for one family (W-Softmax served unchecked)",
        (T_PROBE,),
    ),
    Mutation(
        "probe_failure_not_cached",
        PROBE,
        (
            (
                "        _VERDICTS[key] = result\n        if disk_key is not None:",
                "        if ok:\n            _VERDICTS[key] = result\n"
                "        if disk_key is not None:",
            ),
        ),
        "Probe: a failed verdict not kept (the probe reruns, and warns, on every call)",
        (T_PROBE,),
    ),
    Mutation(
        "double_backward_guard_off",
        OPS,
        (
            (
                "        if torch.is_grad_enabled():  # create_graph",
                "        if False:  # create_graph",
            ),
        ),
        "Dispatch: the double-backward guard never placed (each backend fails its own way)",
        (T_PROBE,),
    ),
    Mutation(
        "distributed_step_not_compared",
        DISTRIBUTED,
        (('            ("step", self.step, int),\n', ""),),
        "ClassParallelMarginLoss: the sampling step counter left out of the compared settings",
        (T_DIST_FAIL,),
    ),
    Mutation(
        "distributed_failure_flags_ignored",
        DISTRIBUTED,
        (
            (
                "        failed = [r for r, flag in enumerate(status.tolist()) if flag]",
                "        failed = []",
            ),
        ),
        "ClassParallelMarginLoss: the ranks' failure flags gathered but not read",
        (T_DIST_FAIL,),
    ),
]
