"""Validation of the losses' inputs, shared by the functional API, the distributed head and
the CUDA backend's ``lse_parts``.

Structural checks (types, ranks, dtypes, shapes) are written once here: ``float_matrix_problem``
and ``label_vector_problem`` say what is wrong without raising (the distributed head all-gathers
that verdict so that every rank raises alike), the ``check_*`` functions raise ``ValueError``
with the message, and :func:`prepare_inputs` adds the value checks (labels in range, sampled ids
without repeats; ``IndexError`` for labels) and the dtype promotion of the functional API. See
:mod:`margin_kernels.functional` for the ``validate`` modes.
"""

from __future__ import annotations

import functools

import torch

# Backend names: "auto" and one per module of margin_kernels.ops (which re-exports this tuple).
BACKENDS = ("auto", "triton", "cuda", "torch")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")
VALIDATE_MODES = ("async", "sync")


def check_options(reduction: str, ignore_index: int, backend: str, validate: str = "async") -> None:
    """The common keywords of every loss; the modules call it at construction."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if validate not in VALIDATE_MODES:
        raise ValueError(f"validate must be one of {VALIDATE_MODES}, got {validate!r}")


_MATRIX_MESSAGES = {
    "type": "{name} must be a torch.Tensor {layout}, got {type}",
    "dim": "{name} must be 2-D {layout}, got shape {shape}",
    "dtype": "{name} must be float16, bfloat16, float32 or float64, got {dtype}",
}
_LABEL_MESSAGES = {
    "type": "{name} must be a torch.Tensor of int64, got {type}",
    "dtype": "{name} must hold integers (int64), got {dtype}",
    "dim": "{name} must be 1-D, got shape {shape}",
    "length": "{name} has {rows} entries but x has {length} rows",
}


def _raise_problem(messages: dict[str, str], problem: str | None, value: object, **fields) -> None:
    """Raise the ValueError of ``problem`` (nothing when None) describing ``value``."""
    if problem is None:
        return
    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else None
    raise ValueError(
        messages[problem].format(
            type=type(value).__name__,
            shape=shape,
            dtype=getattr(value, "dtype", None),
            rows=shape[0] if shape else None,
            **fields,
        )
    )


def float_matrix_problem(t: object) -> str | None:
    """What keeps ``t`` from being a 2-D float tensor: "type", "dim", "dtype", or None."""
    if not isinstance(t, torch.Tensor):
        return "type"
    if t.dim() != 2:
        return "dim"
    if t.dtype not in FLOAT_DTYPES:
        return "dtype"
    return None


def check_float_matrix(name: str, t: object, layout: str) -> None:
    """``t`` is a 2-D float16/bfloat16/float32/float64 tensor; ``layout`` names its axes."""
    _raise_problem(_MATRIX_MESSAGES, float_matrix_problem(t), t, name=name, layout=layout)


def check_matrices(x: torch.Tensor, weight: torch.Tensor) -> None:
    """x (B, D) and weight (C, D): float matrices with the same D and C >= 1."""
    check_float_matrix("x", x, "(B, D)")
    check_float_matrix("weight", weight, "(C, D)")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"feature dims differ: x is {tuple(x.shape)} (B, D) but weight is "
            f"{tuple(weight.shape)} (C, D)"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one class (C >= 1)")


def label_vector_problem(labels: object, length: int | None) -> str | None:
    """What keeps ``labels`` from being a 1-D integer tensor of ``length`` entries (any length
    when None): "type", "dtype", "dim", "length", or None."""
    if not isinstance(labels, torch.Tensor):
        return "type"
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        return "dtype"
    if labels.dim() != 1:
        return "dim"
    if length is not None and labels.shape[0] != length:
        return "length"
    return None


def check_label_vector(name: str, labels: object, length: int | None) -> None:
    """``labels`` is a 1-D integer tensor with ``length`` entries (any when None)."""
    problem = label_vector_problem(labels, length)
    _raise_problem(_LABEL_MESSAGES, problem, labels, name=name, length=length)


def reads_back(t: torch.Tensor, validate: str) -> bool:
    """Whether a value check may read ``t`` back to the host: always with validate="sync";
    otherwise only for CPU tensors outside torch.compile, where it costs nothing."""
    return validate == "sync" or (t.device.type == "cpu" and not torch.compiler.is_compiling())


def eager_only(fn):
    """``torch.compiler.disable`` applied at the first call rather than at import: decorating at
    import would load torch._dynamo (and with it sympy and numpy) with the package."""
    disabled = None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        nonlocal disabled
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    return wrapper


@eager_only
def _raise_bad_labels(
    name: str, labels: torch.Tensor, in_range: torch.Tensor, num_classes: int, ignore_index
) -> None:
    """The synchronous label check (a graph break under torch.compile, by design)."""
    if labels.numel() and not bool(in_range.all()):
        bad = labels[~in_range][0].item()
        extra = f" or ignore_index={ignore_index}" if ignore_index is not None else ""
        raise IndexError(f"{name} value {bad} is out of range [0, {num_classes}){extra}")


def check_labels(
    name: str,
    labels: object,
    length: int | None,
    num_classes: int,
    ignore_index: int | None,
    validate: str = "async",
) -> torch.Tensor:
    """Validate an integer label/id vector; returns it as int64. Range errors raise IndexError
    (see ``validate`` in the module docstring for CUDA and torch.compile)."""
    check_label_vector(name, labels, length)
    labels = labels.long()
    in_range = (labels >= 0) & (labels < num_classes)
    if ignore_index is not None:
        in_range |= labels == ignore_index
    if reads_back(labels, validate):
        _raise_bad_labels(name, labels, in_range, num_classes, ignore_index)
    else:
        # no host sync on accelerators, and no graph break under torch.compile
        torch._assert_async(in_range.all(), f"{name} out of range [0, {num_classes})")
    return labels


@eager_only
def _raise_repeated_ids(ordered: torch.Tensor, repeated: torch.Tensor) -> None:
    if bool(repeated.any()):
        value = ordered[1:][repeated][0].item()
        raise ValueError(
            f"class_ids lists class {value} more than once: each sampled class must appear "
            "once, or it would count twice in the denominator"
        )


def check_unique_ids(class_ids: torch.Tensor, validate: str) -> None:
    """class_ids must not repeat a class. Checked on the sorted ids (O(S log S), no host sync
    unless the values may be read back, see ``_reads_back``)."""
    if class_ids.shape[0] < 2:
        return
    ordered = class_ids.sort().values
    repeated = ordered[1:] == ordered[:-1]
    if reads_back(class_ids, validate):
        _raise_repeated_ids(ordered, repeated)
    else:
        torch._assert_async(~repeated.any(), "class_ids lists a class more than once")


def prepare_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    reduction: str,
    ignore_index: int,
    backend: str,
    class_ids: torch.Tensor | None = None,
    validate: str = "async",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Shared validation of the margin losses' inputs; returns (x, weight, target, class_ids)
    with matching dtypes and int64 labels. Raises before touching any data."""
    check_matrices(x, weight)
    check_options(reduction, ignore_index, backend, validate)
    tensors = {"x": x, "weight": weight, "target": target}
    if class_ids is not None:
        tensors["class_ids"] = class_ids
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"inputs must be on one device, got {listing}")
    num_classes = weight.shape[0]
    target = check_labels("target", target, x.shape[0], num_classes, ignore_index, validate)
    if class_ids is not None:
        class_ids = check_labels("class_ids", class_ids, None, num_classes, None, validate)
        check_unique_ids(class_ids, validate)
    if torch.is_autocast_enabled(x.device.type):
        amp_dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(amp_dtype), weight.to(amp_dtype)
    elif x.dtype != weight.dtype:
        common = torch.promote_types(x.dtype, weight.dtype)
        x, weight = x.to(common), weight.to(common)
    return x, weight, target, class_ids
