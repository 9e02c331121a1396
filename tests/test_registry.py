"""The per-kind registry (spec.KINDS) and everything derived from it: the C++ header's enums,
parameter indices and eps constants, the Triton family constexprs, the cuda wrapper's family
mapping, and the defaults of the constructors, functional wrappers and modules."""

from __future__ import annotations

import inspect
import math
import pathlib
import re

import pytest

import margin_kernels as mk
from margin_kernels import functional as F
from margin_kernels import nn as mknn
from margin_kernels import spec
from margin_kernels.ops import cuda as cuda_ops
from margin_kernels.ops.triton import config as triton_config

HEADER = (pathlib.Path(__file__).parents[1] / "csrc" / "margin_math.h").read_text()


def _enum(name: str) -> dict[str, int]:
    """``enum name : int { ... }`` of the header -> {enumerator: value}."""
    body = re.search(rf"enum {name} : int \{{(.*?)\}};", HEADER, re.S)[1]
    return {m[0]: int(m[1]) for m in re.findall(r"\b(k\w+) = (\d+)", body)}


def _commented_enum(name: str) -> dict[str, int]:
    """An enum whose values carry the registry's name as their comment -> {registry name: value}."""
    body = re.search(rf"enum {name} : int \{{(.*?)\}};", HEADER, re.S)[1]
    return {m[1]: int(m[0]) for m in re.findall(r"= (\d+),\s*// (\w+)", body)}


def _header_constant(name: str) -> str:
    return re.search(rf"constexpr \w+ {name} = ([^;]+);", HEADER)[1]


def test_header_kind_ids_are_the_registry():
    assert _commented_enum("Kind") == spec.KIND_IDS
    assert int(_header_constant("kNumKinds")) == len(spec.KINDS)


def test_header_families_are_the_registry():
    assert _commented_enum("Family") == spec.FAMILY_IDS
    assert int(_header_constant("kNumFamilies")) == len(spec.FAMILY_IDS)
    # family_of(): every `case kX:` line maps to the next `return kF;`
    body = re.search(r"int family_of\(int kind\) \{(.*?)\n\}", HEADER, re.S)[1]
    kind_enum = {value: name for name, value in _enum("Kind").items()}
    family_enum = _enum("Family")
    mapped, pending = {}, []
    default_family = None
    for token in re.findall(r"case (k\w+):|return (k\w+);|(default):", body):
        case, ret, default = token
        if case:
            pending.append(case)
        elif default:
            pending.append("default")
        else:
            for name in pending:
                if name == "default":
                    default_family = family_enum[ret]
                else:
                    mapped[name] = family_enum[ret]
            pending = []
    for info in spec.KINDS.values():
        got = mapped.get(kind_enum[info.kind_id], default_family)
        assert got == info.family_id, info.name


def test_header_modes_and_eps_are_the_registry():
    assert _enum("GradMode") == {
        "kExact": spec.GRAD_MODES["exact"],
        "kStraightThrough": spec.GRAD_MODES["straight_through"],
    }
    assert _enum("Overflow") == {
        "kFallback": spec.OVERFLOW_POLICIES["fallback"],
        "kOverflowNone": spec.OVERFLOW_POLICIES["none"],
        "kEasy": spec.OVERFLOW_POLICIES["easy"],
    }
    assert float(_header_constant("kNormEps")) == spec.NORM_EPS
    assert float(_header_constant("kSin2Eps")) == spec.SIN2_EPS
    assert int(_header_constant("kMaxPsiM")) == spec.MAX_PSI_M


def test_header_param_indices_are_the_layout():
    """make_params() reads params[i] into the field of PARAM_LAYOUT's i-th name."""
    body = re.search(r"make_params\(int kind, const P\* params\) \{(.*?)\n\}", HEADER, re.S)[1]
    read = {
        m[0]: int(m[1]) for m in re.findall(r"p\.(\w+) = static_cast<\w+>\(params\[(\d+)\]\)", body)
    }
    assert read == spec.PARAM_INDEX
    assert int(_header_constant("kNumParams")) == len(spec.PARAM_LAYOUT)


@pytest.mark.parametrize("kind", sorted(spec.KINDS))
def test_kernel_args_follow_the_layout(kind):
    margin = getattr(mk.MarginSpec, kind)()
    kind_id, params = margin.kernel_args()
    assert kind_id == spec.KINDS[kind].kind_id
    assert len(params) == len(spec.PARAM_LAYOUT)
    for name, value in zip(spec.PARAM_LAYOUT, params, strict=True):
        if name == "cos_m":
            assert value == math.cos(margin.m)
        elif name == "sin_m":
            assert value == math.sin(margin.m)
        elif name == "grad_mode":
            assert value == spec.GRAD_MODES[margin.grad_mode]
        elif name == "overflow":
            assert value == spec.OVERFLOW_POLICIES[margin.overflow]
        else:
            assert value == getattr(margin, name), name


def test_triton_families_come_from_the_registry():
    expected = {k: i.family_id for k, i in spec.KINDS.items()}
    assert expected == triton_config.NONTARGET_FAMILY
    numbering = (triton_config.NT_SCALED, triton_config.NT_RAW, triton_config.NT_XNORM,
                 triton_config.NT_SO, triton_config.NT_W)  # fmt: skip
    assert numbering == tuple(spec.FAMILY_IDS.values())


def test_triton_constexprs_come_from_the_registry():
    margin_math = pytest.importorskip("margin_kernels.ops.triton.margin_math")
    if not margin_math.HAS_TRITON:
        pytest.skip("Triton is not installed")
    assert margin_math.EPS_NORM.value == spec.NORM_EPS
    assert margin_math.EPS_SIN2.value == spec.SIN2_EPS
    for name, info in spec.KINDS.items():
        const = getattr(margin_math, f"K_{name.upper()}", None)
        assert const is None or const.value == info.kind_id, name
    for name, index in spec.PARAM_INDEX.items():
        const = getattr(margin_math, f"P_{name.upper()}", None)
        assert const is None or const.value == index, name
    assert margin_math.P_THRESHOLDS.value == spec.PARAM_INDEX["sin_m"] + 1


def test_cuda_wrapper_reads_the_registry():
    expected = {i.kind_id: i for i in spec.KINDS.values()}
    assert expected == cuda_ops._KIND_INFO


@pytest.mark.parametrize("kind", sorted(spec.KINDS))
def test_spec_properties_are_the_registry(kind):
    margin = getattr(mk.MarginSpec, kind)()
    info = spec.KINDS[kind]
    assert margin.normalizes_features == info.normalizes_features
    assert margin.normalizes_weight == info.normalizes_weight
    assert margin.excludes_target == info.excludes_target
    assert margin.shardable == info.shardable
    for name, value in info.defaults.items():
        assert getattr(margin, name) == value, name


def _defaults(fn) -> dict[str, object]:
    return {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


# every public wrapper and module with per-kind hyper-parameters, and the kind it builds
_WRAPPERS = [
    ("lsoftmax", F.lsoftmax_loss, mknn.LSoftmaxLoss),
    ("sphereface", F.sphereface_loss, mknn.SphereFaceLoss),
    ("cosface", F.cosface_loss, mknn.CosFaceLoss),
    ("arcface", F.arcface_loss, mknn.ArcFaceLoss),
    ("combined", F.combined_margin_loss, mknn.CombinedMarginLoss),
    ("so_softmax", F.so_softmax_loss, mknn.SOSoftmaxLoss),
    ("w_softmax", F.w_softmax_loss, mknn.WSoftmaxLoss),
    ("lm_softmax", F.lm_softmax_loss, mknn.LMSoftmaxLoss),
]


@pytest.mark.parametrize(("kind", "fn", "module"), _WRAPPERS, ids=[w[0] for w in _WRAPPERS])
def test_wrapper_and_module_defaults_are_the_registry(kind, fn, module):
    defaults = spec.KINDS[kind].defaults
    for source in (fn, module.__init__, getattr(mk.MarginSpec, kind)):
        got = _defaults(source)
        shared = {name: got[name] for name in defaults if name in got}
        assert shared == {name: defaults[name] for name in shared}, source.__qualname__
        assert shared, source.__qualname__
    # a module built with no hyper-parameters computes the registry's spec
    assert module(4, 3).margin() == getattr(mk.MarginSpec, kind)()


def test_em_softmax_defaults_are_the_registry():
    defaults = spec.HEAD_DEFAULTS["em_softmax"]
    for source in (F.em_softmax_loss, mknn.EMSoftmaxLoss.__init__):
        got = _defaults(source)
        assert {name: got[name] for name in defaults} == dict(defaults), source.__qualname__
    assert mknn.EMSoftmaxLoss(4, 3).margin() == mk.MarginSpec.soft_margin(defaults["m"])
