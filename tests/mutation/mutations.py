"""Plausible bugs for the mutation check (``make mutation``, see tests/mutation/run.py).

Each entry: an id, the file, one or more exact ``(original, replacement)`` snippets, what the bug
is, and the test files to run against it (a subset, to keep a run practical; new-test files are
listed first so that a kill is found fast). An original that is not found exactly once is
reported STALE, not run: the Triton and CUDA backends change, so refresh a snippet by copying
the current line(s) into ``original``. Mutations of csrc/ would need a rebuild of the extension
per mutation (~90 s each) and are not in the list; the CUDA backend's Python side is.
"""

from __future__ import annotations

from dataclasses import dataclass

TRITON = "margin_kernels/ops/triton.py"
CUDA = "margin_kernels/ops/cuda.py"
REFERENCE = "margin_kernels/reference.py"

T_TRITON = "tests/test_triton_backend.py"
T_CUDA = "tests/test_cuda_backend.py"
T_REFERENCE = "tests/test_reference.py"
T_API = "tests/test_api.py"
T_DEMO = "tests/test_demo.py"
T_DIST = "tests/test_distributed.py"
T_SWEEP = "tests/test_elementwise_sweep.py"
T_DEGENERATE = "tests/test_degenerate_rows.py"
T_SHARD = "tests/test_shard_targets.py"
T_VALUES = "tests/test_values.py"


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
        TRITON,
        (
            (
                "k = (c < th1).to(c.dtype) + (c < th2).to(c.dtype) + (c < th3).to(c.dtype)",
                "k = (c < th1).to(c.dtype) + (c < th2).to(c.dtype)",
            ),
        ),
        "Triton psi for m = 4 drops its third threshold (k = 3 branch never taken)",
        (T_SWEEP, T_TRITON),
    ),
    Mutation(
        "triton_norm_clamp",
        TRITON,
        (
            (
                "tl.store(OUT + rows, tl.maximum(tl.sqrt(sq), 1e-12), mask=row_mask)",
                "tl.store(OUT + rows, tl.sqrt(sq), mask=row_mask)",
            ),
            ("ny = tl.maximum(tl.sqrt(sq), 1e-12)", "ny = tl.sqrt(sq)"),
        ),
        "Triton kernels: norms without the max(||v||, eps) clamp",
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
                "(cols, dim=-1, dtype=compute).clamp_min(NORM_EPS)",
                "(cols, dim=-1, dtype=compute)",
            ),
            (
                "(w_y, dim=-1, dtype=compute).clamp_min(NORM_EPS)",
                "(w_y, dim=-1, dtype=compute)",
            ),
            ("norm = raw.clamp_min(NORM_EPS)", "norm = raw"),
        ),
        "CUDA backend (Python side): norms without the max(||v||, eps) clamp",
        (T_DEGENERATE, T_CUDA),
    ),
    Mutation(
        "triton_target_outside_shard",
        TRITON,
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
        "margin_kernels/demo.py",
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
        (T_REFERENCE,),
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
        TRITON,
        (("plain = c > -cos_m", "plain = c > cos_m"),),
        "Triton ArcFace: the theta > pi - m fallback threshold with the wrong sign",
        (T_SWEEP, T_TRITON),
    ),
    Mutation(
        "triton_straight_through_ignored",
        TRITON,
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
        TRITON,
        (("cheb = (4.0 * c2 - 3.0) * c  # T3", "cheb = (4.0 * c2 - 2.0) * c  # T3"),),
        "Triton: Chebyshev T3 with a wrong coefficient (4c^3 - 2c)",
        (T_SWEEP, T_TRITON),
    ),
    Mutation(
        "triton_partial_fc_ids_ignored",
        TRITON,
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
        TRITON,
        (
            (
                "if family != NT_RAW:",
                "if family == -1:",
            ),
        ),
        "Triton backward: the column-norm chain term of dW dropped",
        (T_SWEEP, T_TRITON),
    ),
    Mutation(
        "triton_bf16_upcast_ignored",
        TRITON,
        (("return INTERPRET and dtype == torch.bfloat16", "return False"),),
        "Triton: the interpreter's bf16 upcast switch ignored",
        (T_TRITON,),
    ),
    Mutation(
        "cuda_dw_radial_term",
        CUDA,
        (("grad_cols -= radial * col_dir", "grad_cols -= 0.0 * radial * col_dir"),),
        "CUDA backend: the column-norm (radial) term of dW dropped",
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
]
