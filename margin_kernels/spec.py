"""``MarginSpec``: the one description of a margin loss that every backend receives.

A spec is a frozen dataclass: ``kind`` plus the hyper-parameters that kind reads. It is validated
on construction, so a backend never sees an invalid one. The kernels receive it flattened by
:meth:`MarginSpec.kernel_args` into ``(kind_id, params)``; the order of ``params`` is the
cross-language contract shared with ``csrc/margin_math.h`` and the Triton kernels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType

# Norms are taken as max(||v||, NORM_EPS) before dividing, in every backend.
NORM_EPS = 1e-12
# The arc margins' derivative divides by sin(theta) = sqrt(1 - c^2); the denominator is
# sqrt(max(1 - c^2, SIN2_EPS)), i.e. sin(theta) >= 1e-3, so gradients stay finite at |c| -> 1.
# The forward value uses the unguarded sqrt(max(1 - c^2, 0)).
SIN2_EPS = 1e-6
# Largest integer margin of the psi kinds (lsoftmax, sphereface). cos(m theta) = T_m(c) is
# evaluated by the Chebyshev recurrence, which is stable on [-1, 1]; the kernels unroll it and
# the m - 1 sign tests, so the bound keeps compile time and code size small.
MAX_PSI_M = 16

# Non-target logit families: every kind's non-target logit f_ij is one of these functions of the
# dot d = x_i . W_j, the norms nx, nw and the cosine c = d / (nx nw). The numbering is the one of
# csrc/margin_math.h ``enum Family`` and of the Triton ``NT`` constexpr (tests/test_registry.py
# parses the header and compares).
FAMILY_IDS = {
    "scaled": 0,  # f = s c                                                (cosface, arcface, ...)
    "raw": 1,  # f = d = nx nw c                                           (lsoftmax, soft_margin)
    "feature_norm": 2,  # f = nx c = d / nw                                (sphereface)
    "squared": 3,  # f = lambda_n (c^2 - m^2)                              (so_softmax)
    "weighted": 4,  # f = nx (alpha c_iy + c) / sqrt(1 + alpha^2 + 2 alpha g_j)   (w_softmax)
}

# The order of MarginSpec.kernel_args()[1]; csrc/margin_math.h make_params() reads the same
# indices, the Triton launcher reads them through PARAM_INDEX.
PARAM_LAYOUT = (
    "s",
    "m",
    "m1",
    "m2",
    "m3",
    "lam",
    "lambda_p",
    "lambda_n",
    "alpha",
    "cos_m",
    "sin_m",
    "grad_mode",
    "overflow",
)
PARAM_INDEX = {name: i for i, name in enumerate(PARAM_LAYOUT)}
GRAD_MODES = {"exact": 0, "straight_through": 1}
OVERFLOW_POLICIES = {"fallback": 0, "none": 1, "easy": 2}


@dataclass(frozen=True)
class KindInfo:
    """Every per-kind fact a backend, a wrapper or a module reads, in one record.

    Attributes:
        name: the ``MarginSpec.kind`` string.
        kind_id: integer id of the compiled kernels (``enum Kind`` in csrc/margin_math.h).
        family: non-target logit family, a key of ``FAMILY_IDS``.
        normalizes_features: logits depend on x only through x/||x|| (fixed scale s).
        normalizes_weight: class weights enter as W_j/||W_j||.
        excludes_target: the target logit is left out of the denominator (LM-Softmax).
        shardable: each non-target logit depends on its own class only, so classes can be split
            across ranks exactly (W-Softmax's read W_y).
        psi: the integer-margin kinds whose target is psi(theta) = (-1)^k cos(m theta) - 2k.
        defaults: the papers' hyper-parameters, used by the ``MarginSpec`` constructors, the
            functional wrappers and the modules.
    """

    name: str
    kind_id: int
    family: str
    normalizes_features: bool
    normalizes_weight: bool
    excludes_target: bool
    shardable: bool
    psi: bool
    defaults: Mapping[str, float | str]

    @property
    def family_id(self) -> int:
        return FAMILY_IDS[self.family]


def _kind(name: str, kind_id: int, family: str, *, features: bool, weight: bool = True,
          excludes_target: bool = False, shardable: bool = True, psi: bool = False,
          **defaults: float | str) -> KindInfo:  # fmt: skip
    return KindInfo(name, kind_id, family, features, weight, excludes_target, shardable, psi,
                    MappingProxyType(defaults))  # fmt: skip


# The registry. Adding a kind: one line here and a constructor below (plus its range checks in
# __post_init__); its target formula in reference.target_transform, in the Triton _target_kernel
# (with a K_<NAME> constexpr in margin_math.py) and in csrc/margin_math.h (enum Kind, kNumKinds,
# the target switch, and family_of when the family is not "scaled"); a spec in the tests' list.
KINDS: Mapping[str, KindInfo] = MappingProxyType({
    k.name: k
    for k in (
        _kind("lsoftmax", 0, "raw", features=False, weight=False, psi=True, m=4, lam=0.0),
        _kind("sphereface", 1, "feature_norm", features=False, psi=True, m=4, lam=0.0),
        _kind("cosface", 2, "scaled", features=True, s=64.0, m=0.35),
        _kind("arcface", 3, "scaled", features=True, s=64.0, m=0.5, grad_mode="exact",
              overflow="fallback"),
        _kind("combined", 4, "scaled", features=True, s=64.0, m1=1.0, m2=0.3, m3=0.2,
              grad_mode="exact"),
        _kind("so_softmax", 5, "squared", features=True, lambda_p=2.0, lambda_n=2.0, m=0.3),
        _kind("w_softmax", 6, "weighted", features=False, shardable=False, alpha=1.5),
        _kind("lm_softmax", 7, "scaled", features=True, excludes_target=True, s=5.0),
        _kind("soft_margin", 8, "raw", features=False, weight=False, m=0.0),
    )
})  # fmt: skip
# kind name -> integer id used by the compiled kernels.
KIND_IDS = {name: info.kind_id for name, info in KINDS.items()}
# Heads built on a kind with defaults of their own paper: EM-Softmax's soft_margin head (m = 0.1).
HEAD_DEFAULTS: Mapping[str, Mapping[str, float]] = MappingProxyType(
    {"em_softmax": MappingProxyType({"m": 0.1})}
)


def default(kind: str, name: str) -> float | str:
    """The registry's default of hyper-parameter ``name`` for ``kind``."""
    return KINDS[kind].defaults[name]


def _check_finite(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")


@dataclass(frozen=True)
class MarginSpec:
    """What a margin loss computes; see docs/design.md section 2 and the README for each formula.

    Build one with the class methods (``MarginSpec.arcface(s=64.0, m=0.5)``), which carry the
    papers' defaults; the plain constructor validates the same way.

    Attributes:
        kind: one of ``KIND_IDS``.
        s: logit scale (cosface, arcface, combined, lm_softmax).
        m: margin. Integer 1..MAX_PSI_M (16) for the psi kinds (lsoftmax, sphereface); an
            angle in radians for arcface; an additive cosine margin for cosface; the
            SO-Softmax margin; the additive logit margin of soft_margin (the EM-Softmax head).
        m1, m2, m3: combined margin ``s (cos(m1 theta + m2) - m3)``.
        lam: psi blending ``(lam c + psi(c)) / (1 + lam)`` for lsoftmax and sphereface.
        lambda_p, lambda_n: SO-Softmax scales of the target and non-target terms.
        alpha: W-Softmax weight of the target direction.
        grad_mode: ``"exact"`` or ``"straight_through"`` (arcface and combined only).
        overflow: policy for theta + m > pi (arcface only): ``"fallback"``, ``"none"``,
            ``"easy"``.
    """

    kind: str
    s: float = 1.0
    m: float = 0.0
    m1: float = 1.0
    m2: float = 0.0
    m3: float = 0.0
    lam: float = 0.0
    lambda_p: float = 2.0
    lambda_n: float = 2.0
    alpha: float = 0.0
    grad_mode: str = "exact"
    overflow: str = "none"

    def __post_init__(self) -> None:
        if self.kind not in KIND_IDS:
            raise ValueError(f"kind must be one of {sorted(KIND_IDS)}, got {self.kind!r}")
        for f in fields(self):
            if f.name not in ("kind", "grad_mode", "overflow"):
                _check_finite(f.name, getattr(self, f.name))
        if self.grad_mode not in GRAD_MODES:
            raise ValueError(
                f"grad_mode must be one of {sorted(GRAD_MODES)}, got {self.grad_mode!r}"
            )
        if self.overflow not in OVERFLOW_POLICIES:
            raise ValueError(
                f"overflow must be one of {sorted(OVERFLOW_POLICIES)}, got {self.overflow!r}"
            )
        if self.grad_mode != "exact" and self.kind not in ("arcface", "combined"):
            raise ValueError(
                f"grad_mode={self.grad_mode!r} applies to arcface and combined only, "
                f"not {self.kind!r}"
            )
        if self.overflow != "none" and self.kind != "arcface":
            raise ValueError(f"overflow={self.overflow!r} applies to arcface only")
        if self.s <= 0:
            raise ValueError(f"s must be > 0, got {self.s}")
        kind = self.kind
        if KINDS[kind].psi:
            if float(self.m) != int(self.m) or not 1 <= self.m <= MAX_PSI_M:
                raise ValueError(f"m must be an integer in 1..{MAX_PSI_M} for {kind}, got {self.m}")
            if self.lam < 0:
                raise ValueError(f"lam must be >= 0, got {self.lam}")
        elif kind == "arcface":
            if not 0 <= self.m < math.pi:
                raise ValueError(f"m must be an angle in [0, pi) for arcface, got {self.m}")
        elif kind in ("cosface", "so_softmax", "soft_margin"):
            if self.m < 0:
                raise ValueError(f"m must be >= 0 for {kind}, got {self.m}")
        elif kind == "combined":
            if self.m1 <= 0:
                raise ValueError(f"m1 must be > 0, got {self.m1}")
        elif kind == "w_softmax" and self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if kind == "so_softmax" and (self.lambda_p <= 0 or self.lambda_n <= 0):
            raise ValueError(
                f"lambda_p and lambda_n must be > 0, got {self.lambda_p}, {self.lambda_n}"
            )

    # --- constructors with the papers' defaults (KINDS[kind].defaults) ----------------------
    @classmethod
    def lsoftmax(
        cls, m: int = default("lsoftmax", "m"), lam: float = default("lsoftmax", "lam")
    ) -> MarginSpec:
        return cls("lsoftmax", m=m, lam=lam)

    @classmethod
    def sphereface(
        cls, m: int = default("sphereface", "m"), lam: float = default("sphereface", "lam")
    ) -> MarginSpec:
        return cls("sphereface", m=m, lam=lam)

    @classmethod
    def cosface(
        cls, s: float = default("cosface", "s"), m: float = default("cosface", "m")
    ) -> MarginSpec:
        return cls("cosface", s=s, m=m)

    @classmethod
    def arcface(
        cls,
        s: float = default("arcface", "s"),
        m: float = default("arcface", "m"),
        grad_mode: str = default("arcface", "grad_mode"),
        overflow: str = default("arcface", "overflow"),
    ) -> MarginSpec:
        return cls("arcface", s=s, m=m, grad_mode=grad_mode, overflow=overflow)

    @classmethod
    def insightface_arcface(
        cls, s: float = default("arcface", "s"), m: float = default("arcface", "m")
    ) -> MarginSpec:
        """ArcFace as insightface's arcface_torch trains it (``CombinedMarginLoss(s, 1.0, m,
        0.0)``): the plain cos(theta + m) with no theta + m > pi policy, and the straight-through
        gradient (dT/dc = s)."""
        return cls.arcface(s, m, grad_mode="straight_through", overflow="none")

    @classmethod
    def combined(
        cls,
        s: float = default("combined", "s"),
        m1: float = default("combined", "m1"),
        m2: float = default("combined", "m2"),
        m3: float = default("combined", "m3"),
        grad_mode: str = default("combined", "grad_mode"),
    ) -> MarginSpec:
        return cls("combined", s=s, m1=m1, m2=m2, m3=m3, grad_mode=grad_mode)

    @classmethod
    def so_softmax(
        cls,
        lambda_p: float = default("so_softmax", "lambda_p"),
        lambda_n: float = default("so_softmax", "lambda_n"),
        m: float = default("so_softmax", "m"),
    ) -> MarginSpec:
        return cls("so_softmax", lambda_p=lambda_p, lambda_n=lambda_n, m=m)

    @classmethod
    def w_softmax(cls, alpha: float = default("w_softmax", "alpha")) -> MarginSpec:
        return cls("w_softmax", alpha=alpha)

    @classmethod
    def lm_softmax(cls, s: float = default("lm_softmax", "s")) -> MarginSpec:
        return cls("lm_softmax", s=s)

    @classmethod
    def soft_margin(cls, m: float = default("soft_margin", "m")) -> MarginSpec:
        return cls("soft_margin", m=m)

    # --- what backends read -----------------------------------------------------------------
    @property
    def normalizes_features(self) -> bool:
        """True when logits depend on x only through x/||x|| (the kind has a fixed scale s)."""
        return KINDS[self.kind].normalizes_features

    @property
    def normalizes_weight(self) -> bool:
        """True when class weights enter as W_j/||W_j|| (false for lsoftmax, soft_margin)."""
        return KINDS[self.kind].normalizes_weight

    @property
    def excludes_target(self) -> bool:
        """LM-Softmax: the target logit is left out of the denominator."""
        return KINDS[self.kind].excludes_target

    @property
    def shardable(self) -> bool:
        """True when each non-target logit depends on its own class only (not on W_y), so the
        classes can be split across ranks exactly. W-Softmax's non-target logits read W_y."""
        return KINDS[self.kind].shardable

    def kernel_args(self) -> tuple[int, tuple[float, ...]]:
        """``(kind_id, params)`` for compiled kernels; ``params`` follows ``PARAM_LAYOUT``: s, m,
        m1, m2, m3, lam, lambda_p, lambda_n, alpha, cos(m), sin(m), grad_mode id, overflow id."""
        derived = {
            "cos_m": math.cos(self.m),
            "sin_m": math.sin(self.m),
            "grad_mode": GRAD_MODES[self.grad_mode],
            "overflow": OVERFLOW_POLICIES[self.overflow],
        }
        return KIND_IDS[self.kind], tuple(
            float(derived[name] if name in derived else getattr(self, name))
            for name in PARAM_LAYOUT
        )
