"""Plausible bugs for the mutation check (``make mutation``, see tests/mutation/run.py).

Each entry: an id, the file, one or more exact ``(original, replacement)`` snippets, what the bug
is, and the test files to run against it (a subset, to keep a run practical; new-test files are
listed first so that a kill is found fast). An original that is not found exactly once is
reported STALE, not run: the Triton and CUDA backends change, so refresh a snippet by copying
the current line(s) into ``original``. Mutations of csrc/ would need a rebuild of the extension
per mutation (~90 s each) and are not in the list; the CUDA backend's Python side is (its
column-norm chain term of dW is dropped by skipping the ``margin_column_chain`` pass).
"""

from __future__ import annotations

from dataclasses import dataclass

TRITON_MATH = "margin_kernels/ops/triton/margin_math.py"
TRITON_FWD = "margin_kernels/ops/triton/forward.py"
TRITON_BWD = "margin_kernels/ops/triton/backward.py"
TRITON_OPS = "margin_kernels/ops/triton/ops.py"
CUDA = "margin_kernels/ops/cuda.py"
REFERENCE = "margin_kernels/reference.py"

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
