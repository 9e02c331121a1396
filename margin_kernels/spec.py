"""``MarginSpec``: the one description of a margin loss that every backend receives.

A spec is a frozen dataclass: ``kind`` plus the hyper-parameters that kind reads. It is validated
on construction, so a backend never sees an invalid one. The kernels receive it flattened by
:meth:`MarginSpec.kernel_args` into ``(kind_id, params)``; the order of ``params`` is the
cross-language contract shared with ``csrc/margin_math.h`` and the Triton kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

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

# kind name -> integer id used by the compiled kernels (csrc/margin_math.h mirrors this table).
KIND_IDS = {
    "lsoftmax": 0,
    "sphereface": 1,
    "cosface": 2,
    "arcface": 3,
    "combined": 4,
    "so_softmax": 5,
    "w_softmax": 6,
    "lm_softmax": 7,
    "soft_margin": 8,
}
GRAD_MODES = {"exact": 0, "straight_through": 1}
OVERFLOW_POLICIES = {"fallback": 0, "none": 1, "easy": 2}

# Kinds whose logits are functions of the cosine only, scaled by s (features normalised).
_NORMALISED_FEATURE_KINDS = frozenset(
    {"cosface", "arcface", "combined", "so_softmax", "lm_softmax"}
)
# Kinds that use raw W rows (no weight normalisation).
_RAW_WEIGHT_KINDS = frozenset({"lsoftmax", "soft_margin"})


def _check_finite(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")


@dataclass(frozen=True)
class MarginSpec:
    """What a margin loss computes; see DESIGN.md section 2 and the README for each formula.

    Build one with the class methods (``MarginSpec.arcface(s=64.0, m=0.5)``), which carry the
    papers' defaults; the plain constructor validates the same way.

    Attributes:
        kind: one of ``KIND_IDS``.
        s: logit scale (cosface, arcface, combined, lm_softmax).
        m: margin. Integer 1..MAX_PSI_M (16) for the psi kinds (lsoftmax, sphereface); an angle
            in radians for arcface; an additive cosine margin for cosface; the SO-Softmax margin;
            the additive logit margin of soft_margin (the EM-Softmax head).
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
        if kind in ("lsoftmax", "sphereface"):
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

    # --- constructors with the papers' defaults -------------------------------------------
    @classmethod
    def lsoftmax(cls, m: int = 4, lam: float = 0.0) -> MarginSpec:
        return cls("lsoftmax", m=m, lam=lam)

    @classmethod
    def sphereface(cls, m: int = 4, lam: float = 0.0) -> MarginSpec:
        return cls("sphereface", m=m, lam=lam)

    @classmethod
    def cosface(cls, s: float = 64.0, m: float = 0.35) -> MarginSpec:
        return cls("cosface", s=s, m=m)

    @classmethod
    def arcface(
        cls,
        s: float = 64.0,
        m: float = 0.5,
        grad_mode: str = "exact",
        overflow: str = "fallback",
    ) -> MarginSpec:
        return cls("arcface", s=s, m=m, grad_mode=grad_mode, overflow=overflow)

    @classmethod
    def combined(
        cls,
        s: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.3,
        m3: float = 0.2,
        grad_mode: str = "exact",
    ) -> MarginSpec:
        return cls("combined", s=s, m1=m1, m2=m2, m3=m3, grad_mode=grad_mode)

    @classmethod
    def so_softmax(cls, lambda_p: float = 2.0, lambda_n: float = 2.0, m: float = 0.3) -> MarginSpec:
        return cls("so_softmax", lambda_p=lambda_p, lambda_n=lambda_n, m=m)

    @classmethod
    def w_softmax(cls, alpha: float = 1.5) -> MarginSpec:
        return cls("w_softmax", alpha=alpha)

    @classmethod
    def lm_softmax(cls, s: float = 5.0) -> MarginSpec:
        return cls("lm_softmax", s=s)

    @classmethod
    def soft_margin(cls, m: float = 0.0) -> MarginSpec:
        return cls("soft_margin", m=m)

    # --- what backends read -----------------------------------------------------------------
    @property
    def normalizes_features(self) -> bool:
        """True when logits depend on x only through x/||x|| (the kind has a fixed scale s)."""
        return self.kind in _NORMALISED_FEATURE_KINDS

    @property
    def normalizes_weight(self) -> bool:
        """True when class weights enter as W_j/||W_j|| (false for lsoftmax, soft_margin)."""
        return self.kind not in _RAW_WEIGHT_KINDS

    @property
    def excludes_target(self) -> bool:
        """LM-Softmax: the target logit is left out of the denominator."""
        return self.kind == "lm_softmax"

    @property
    def shardable(self) -> bool:
        """True when each non-target logit depends on its own class only (not on W_y), so the
        classes can be split across ranks exactly. W-Softmax's non-target logits read W_y."""
        return self.kind != "w_softmax"

    def kernel_args(self) -> tuple[int, tuple[float, ...]]:
        """``(kind_id, params)`` for compiled kernels. ``params`` order (fixed, see
        csrc/margin_math.h): s, m, m1, m2, m3, lam, lambda_p, lambda_n, alpha,
        cos(m), sin(m), grad_mode id, overflow id."""
        return KIND_IDS[self.kind], (
            float(self.s),
            float(self.m),
            float(self.m1),
            float(self.m2),
            float(self.m3),
            float(self.lam),
            float(self.lambda_p),
            float(self.lambda_n),
            float(self.alpha),
            math.cos(self.m),
            math.sin(self.m),
            float(GRAD_MODES[self.grad_mode]),
            float(OVERFLOW_POLICIES[self.overflow]),
        )
