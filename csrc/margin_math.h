// Per-element margin math shared by the CUDA epilogues and their C++ CPU twin.
//
// Everything here is __host__ __device__ (MK_HD), so the same lines compile with nvcc for the
// kernels and with the host compiler for the CPU ops that CI tests against the torch reference.
// The kind ids and the order of the params vector mirror MarginSpec.kernel_args() in
// margin_kernels/spec.py; the formulas mirror margin_kernels/reference.py (docs/design.md section 2).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MK_HD __host__ __device__ __forceinline__
#else
#define MK_HD inline
#endif

namespace margin_kernels {

// spec.py: NORM_EPS (norms are max(||v||, NORM_EPS)) and SIN2_EPS (sin(theta) in a derivative's
// denominator is sqrt(max(1 - c^2, SIN2_EPS))).
constexpr double kNormEps = 1e-12;
constexpr double kSin2Eps = 1e-6;

// spec.KINDS: kind ids; the comment after each value is the spec's kind name. tests/test_registry.py
// parses this header and compares its enums, param indices and constants with the registry.
enum Kind : int {
  kLSoftmax = 0,    // lsoftmax
  kSphereFace = 1,  // sphereface
  kCosFace = 2,     // cosface
  kArcFace = 3,     // arcface
  kCombined = 4,    // combined
  kSOSoftmax = 5,   // so_softmax
  kWSoftmax = 6,    // w_softmax
  kLMSoftmax = 7,   // lm_softmax
  kSoftMargin = 8,  // soft_margin
};
constexpr int kNumKinds = 9;
// spec.GRAD_MODES and spec.OVERFLOW_POLICIES
enum GradMode : int { kExact = 0, kStraightThrough = 1 };
enum Overflow : int { kFallback = 0, kOverflowNone = 1, kEasy = 2 };
// Length of MarginSpec.kernel_args()[1] (spec.PARAM_LAYOUT): s, m, m1, m2, m3, lam, lambda_p,
// lambda_n, alpha, cos(m), sin(m), grad_mode id, overflow id.
constexpr int kNumParams = 13;

// The non-target logit N depends on the kind only through one of five families (spec.FAMILY_IDS,
// the same numbering as the Triton NT constexpr); the kernels are templated on the family (the
// per-row target transform switches on the kind at run time).
enum Family : int {
  kScaled = 0,       // scaled: N = s c                 (cosface, arcface, combined, lm_softmax)
  kRaw = 1,          // raw: N = ||x|| ||W_j|| c = W_j . x   (lsoftmax, soft_margin)
  kFeatureNorm = 2,  // feature_norm: N = ||x|| c       (sphereface)
  kSquared = 3,      // squared: N = lambda_n (c^2 - m^2)    (so_softmax)
  kWeighted = 4,     // weighted: N = ||x|| (alpha c_y + c) / sqrt(1 + alpha^2 + 2 alpha g)
};
constexpr int kNumFamilies = 5;

MK_HD int family_of(int kind) {
  switch (kind) {
    case kLSoftmax:
    case kSoftMargin:
      return kRaw;
    case kSphereFace:
      return kFeatureNorm;
    case kSOSoftmax:
      return kSquared;
    case kWSoftmax:
      return kWeighted;
    default:
      return kScaled;
  }
}

// Largest integer psi margin (spec.MAX_PSI_M).
constexpr int kMaxPsiM = 16;

template <typename T>
struct MarginParams {
  int kind;
  T s, m, m1, m2, m3, lam, lambda_p, lambda_n, alpha, cos_m, sin_m;
  int grad_mode, overflow;
  // psi kinds: the integer m and the branch thresholds cos(j pi / m), j = 1..m-1 (host-computed)
  int psi_m;
  T psi_cos[kMaxPsiM - 1];
};

// params: the kNumParams values of MarginSpec.kernel_args(), in that order.
template <typename T, typename P>
inline MarginParams<T> make_params(int kind, const P* params) {
  MarginParams<T> p;
  p.kind = kind;
  p.s = static_cast<T>(params[0]);
  p.m = static_cast<T>(params[1]);
  p.m1 = static_cast<T>(params[2]);
  p.m2 = static_cast<T>(params[3]);
  p.m3 = static_cast<T>(params[4]);
  p.lam = static_cast<T>(params[5]);
  p.lambda_p = static_cast<T>(params[6]);
  p.lambda_n = static_cast<T>(params[7]);
  p.alpha = static_cast<T>(params[8]);
  p.cos_m = static_cast<T>(params[9]);
  p.sin_m = static_cast<T>(params[10]);
  p.grad_mode = static_cast<int>(params[11]);
  p.overflow = static_cast<int>(params[12]);
  // k of psi counts the thresholds cos(j pi / m) that c lies below. They are computed here, on
  // the host, as Python's math.cos(j * math.pi / m) computes them (same double expression, same
  // libm), so the branch boundaries match the reference bit for bit (cos(pi/2) is 6.1e-17 there,
  // not 0), and the kernels never call cos for them.
  const bool psi_kind = kind == kLSoftmax || kind == kSphereFace;
  p.psi_m = psi_kind ? static_cast<int>(params[1]) : 1;
  if (p.psi_m < 1) p.psi_m = 1;
  if (p.psi_m > kMaxPsiM) p.psi_m = kMaxPsiM;
  constexpr double kPi = 3.141592653589793;
  for (int j = 1; j < kMaxPsiM; ++j) {
    p.psi_cos[j - 1] =
        j < p.psi_m ? static_cast<T>(std::cos(static_cast<double>(j) * kPi / p.psi_m)) : T(0);
  }
  return p;
}

template <typename T>
MK_HD T clamp_unit(T c) {
  return c < T(-1) ? T(-1) : (c > T(1) ? T(1) : c);
}

// cos(m theta) as the Chebyshev polynomial T_m(c) and its derivative dT_m/dc, m in 1..16: the
// closed forms up to m = 4, then the recurrences T_{k+1} = 2c T_k - T_{k-1} and (differentiated)
// T'_{k+1} = 2 T_k + 2c T'_k - T'_{k-1}, started from T_3, T_4 as the reference does.
template <typename T>
MK_HD T chebyshev(T c, int m, T* d_c) {
  const T c2 = c * c;
  switch (m) {
    case 1:
      *d_c = T(1);
      return c;
    case 2:
      *d_c = T(4) * c;
      return T(2) * c2 - T(1);
    case 3:
      *d_c = T(12) * c2 - T(3);
      return (T(4) * c2 - T(3)) * c;
    default:
      break;
  }
  T prev = (T(4) * c2 - T(3)) * c;
  T d_prev = T(12) * c2 - T(3);
  T cur = (T(8) * c2 - T(8)) * c2 + T(1);
  T d_cur = (T(32) * c2 - T(16)) * c;
  for (int k = 4; k < m; ++k) {
    const T next = T(2) * c * cur - prev;
    const T d_next = T(2) * cur + T(2) * c * d_cur - d_prev;
    prev = cur;
    d_prev = d_cur;
    cur = next;
    d_cur = d_next;
  }
  *d_c = d_cur;
  return cur;
}

// k of psi: how many of the thresholds cos(j pi / m), j = 1..m-1, c lies below (m - 1 sign
// tests, no arccos). A NaN c passes none of them (k = 0) and stays NaN through T_m. The loop
// runs over the fixed table length so that it unrolls with constant indices: a runtime index
// into the by-value kernel parameter would copy the table to the stack.
template <typename T>
MK_HD int psi_branch(const MarginParams<T>& p, T c) {
  int k = 0;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int j = 0; j < kMaxPsiM - 1; ++j) k += int(j < p.psi_m - 1 && c < p.psi_cos[j]);
  return k;
}

// psi_m(theta) = (-1)^k cos(m theta) - 2k; k is piecewise constant, so d psi / dc is
// (-1)^k T_m'(c) (never m sin(m theta) / sin(theta)).
template <typename T>
MK_HD T psi(const MarginParams<T>& p, T c, T* d_c) {
  const int k = psi_branch(p, c);
  const T sign = (k & 1) ? T(-1) : T(1);
  T d_cheb;
  const T cheb = chebyshev(c, p.psi_m, &d_cheb);
  *d_c = sign * d_cheb;
  return sign * cheb - T(2 * k);
}

// ArcFace cos(theta + m) and combined cos(m1 theta + m2) - m3, unscaled, with the grad_mode and
// (arcface) overflow conventions of reference._ArcMargin.
template <typename T>
MK_HD T arc_margin(const MarginParams<T>& p, T c, T* d_c) {
  using std::acos;
  using std::cos;
  using std::sin;
  using std::sqrt;
  const T cc = clamp_unit(c);
  // The derivative's sin(theta) is guarded: finite at |c| -> 1.
  const T sin_guarded = sqrt((T(1) - c * c) > T(kSin2Eps) ? (T(1) - c * c) : T(kSin2Eps));
  T value;
  T deriv;
  if (p.kind == kArcFace) {
    const T one_minus = T(1) - cc * cc;
    const T sin_theta = sqrt(one_minus > T(0) ? one_minus : T(0));
    // cos(theta + m) = c cos m - sin(theta) sin m
    value = cc * p.cos_m - sin_theta * p.sin_m;
    bool plain = true;
    if (p.overflow == kFallback) {
      // theta > pi - m  <=>  c < -cos m: c - m sin m keeps T monotone
      plain = c > -p.cos_m;
      if (!plain) value = c - p.m * p.sin_m;
    } else if (p.overflow == kEasy) {
      plain = c > T(0);
      if (!plain) value = c;
    }
    // d cos(theta + m) / dc = cos m + sin m c / sin(theta)
    deriv = plain ? p.cos_m + p.sin_m * c / sin_guarded : T(1);
  } else {
    const T theta = acos(cc);
    const T angle = p.m1 * theta + p.m2;
    value = cos(angle) - p.m3;
    // d cos(m1 theta + m2) / dc = m1 sin(m1 theta + m2) / sin(theta)
    deriv = p.m1 * sin(angle) / sin_guarded;
  }
  *d_c = p.grad_mode == kStraightThrough ? T(1) : deriv;
  return value;
}

// Target logit T(c, ||x||, ||W_y||) and its partial derivatives (each with the other two held).
template <typename T>
MK_HD T target_logit(const MarginParams<T>& p, T c, T x_norm, T w_norm, T* d_c, T* d_xn, T* d_wn) {
  *d_xn = T(0);
  *d_wn = T(0);
  switch (p.kind) {
    case kLSoftmax:
    case kSphereFace: {
      // blended = (lam c + psi_m(c)) / (1 + lam); L-Softmax scales by ||x|| ||W_y||, SphereFace
      // by ||x||.
      T d_psi;
      const T psi_value = psi(p, c, &d_psi);
      const T inv = T(1) / (T(1) + p.lam);
      const T blended = (p.lam * c + psi_value) * inv;
      const T d_blended = (p.lam + d_psi) * inv;
      if (p.kind == kLSoftmax) {
        *d_c = x_norm * w_norm * d_blended;
        *d_xn = w_norm * blended;
        *d_wn = x_norm * blended;
        return x_norm * w_norm * blended;
      }
      *d_c = x_norm * d_blended;
      *d_xn = blended;
      return x_norm * blended;
    }
    case kCosFace:
      *d_c = p.s;
      return p.s * (c - p.m);
    case kArcFace:
    case kCombined: {
      T d_arc;
      const T value = arc_margin(p, c, &d_arc);
      *d_c = p.s * d_arc;
      return p.s * value;
    }
    case kSOSoftmax:
      // lambda_p (m^2 - (c - 1)^2)
      *d_c = T(-2) * p.lambda_p * (c - T(1));
      return p.lambda_p * (p.m * p.m - (c - T(1)) * (c - T(1)));
    case kWSoftmax:
      *d_c = x_norm;
      *d_xn = c;
      return x_norm * c;
    case kLMSoftmax:
      *d_c = p.s;
      return p.s * c;
    default:
      // soft_margin: the raw logit minus the margin
      *d_c = x_norm * w_norm;
      *d_xn = w_norm * c;
      *d_wn = x_norm * c;
      return x_norm * w_norm * c - p.m;
  }
}

// W-Softmax denominator sqrt(max(1 + alpha^2 + 2 alpha g, NORM_EPS)); *active says whether the
// clamp passes the gradient (torch's clamp_min does where its input >= the bound).
template <typename T>
MK_HD T weighted_denominator(const MarginParams<T>& p, T gram, bool* active) {
  using std::sqrt;
  const T arg = T(1) + p.alpha * p.alpha + T(2) * p.alpha * gram;
  *active = arg >= T(kNormEps);
  return sqrt(*active ? arg : T(kNormEps));
}

// Non-target logit N(c, ||x||, ||W_j||) of family F and dN/dc. W-Softmax also reads c_y (the
// row's target cosine) and gram = w_y . w_j (unit vectors); the other families ignore them.
template <int F, typename T>
MK_HD T nontarget_logit(const MarginParams<T>& p, T c, T x_norm, T w_norm, T c_y, T gram, T* d_c) {
  if (F == kScaled) {
    *d_c = p.s;
    return p.s * c;
  } else if (F == kRaw) {
    *d_c = x_norm * w_norm;
    return x_norm * w_norm * c;
  } else if (F == kFeatureNorm) {
    *d_c = x_norm;
    return x_norm * c;
  } else if (F == kSquared) {
    *d_c = T(2) * p.lambda_n * c;
    return p.lambda_n * (c * c - p.m * p.m);
  } else {
    bool active;
    const T den = weighted_denominator(p, gram, &active);
    *d_c = x_norm / den;
    return x_norm * (p.alpha * c_y + c) / den;
  }
}

// The element-wise margin transform behind the margin_transform op (CUDA kernel and CPU twin):
// the target logit T (target = true) or the non-target logit N of the kind's family, and its
// derivative in c, with the family picked at run time.
template <typename T>
MK_HD T margin_transform_one(const MarginParams<T>& p, bool target, T c, T x_norm, T w_norm, T c_y,
                             T gram, T* d_c) {
  if (target) {
    T unused_xn, unused_wn;
    return target_logit(p, c, x_norm, w_norm, d_c, &unused_xn, &unused_wn);
  }
  switch (family_of(p.kind)) {
    case kRaw:
      return nontarget_logit<kRaw>(p, c, x_norm, w_norm, c_y, gram, d_c);
    case kFeatureNorm:
      return nontarget_logit<kFeatureNorm>(p, c, x_norm, w_norm, c_y, gram, d_c);
    case kSquared:
      return nontarget_logit<kSquared>(p, c, x_norm, w_norm, c_y, gram, d_c);
    case kWeighted:
      return nontarget_logit<kWeighted>(p, c, x_norm, w_norm, c_y, gram, d_c);
    default:
      return nontarget_logit<kScaled>(p, c, x_norm, w_norm, c_y, gram, d_c);
  }
}

// Gradient of one non-target element, given prob_grad = dL/dN. The logit is a function of the
// raw dot z = W_j . x (c = z / (||x|| ||W_j||)), of ||x||, and (W-Softmax) of c_y and of
// g = h / (||W_y|| ||W_j||) with the raw dot h = W_y . W_j. Returned: dL/dz (what the backward
// epilogue writes over the logits), dL/d||x|| with z held (summed over the row), dL/dc_y
// (summed over the row) and dL/dh (written over the W-Softmax gram buffer).
// Families whose dL/dz carries 1/||x|| (the logit a function of the cosine alone): the backward
// writes their 16-bit dL/dz times max(||x||, eps), bounded on a zero feature row.
template <int F>
MK_HD constexpr bool dz_has_inv_x_norm() {
  return F == kScaled || F == kSquared;
}

template <typename T>
struct NontargetGrad {
  T d_z;
  T d_xn;
  T d_cy;
  T d_h;
};

template <int F, typename T>
MK_HD NontargetGrad<T> nontarget_backward(const MarginParams<T>& p, T prob_grad, T c, T x_norm,
                                          T inv_x_norm, T inv_w_norm, T c_y, T gram,
                                          T inv_wy_norm) {
  NontargetGrad<T> g{T(0), T(0), T(0), T(0)};
  if (F == kRaw) {
    // N = z
    g.d_z = prob_grad;
  } else if (F == kFeatureNorm) {
    // N = ||x|| c = z / ||W_j||: no ||x|| term at fixed z
    g.d_z = prob_grad * inv_w_norm;
  } else if (F == kScaled || F == kSquared) {
    // N = N(c): dN/dz = N'(c) / (||x|| ||W_j||), dN/d||x|| = -N'(c) c / ||x||
    const T d_c = F == kScaled ? p.s : T(2) * p.lambda_n * c;
    const T a = prob_grad * d_c;
    g.d_z = a * inv_x_norm * inv_w_norm;
    g.d_xn = -a * c * inv_x_norm;
  } else {
    // N = (alpha ||x|| c_y + z / ||W_j||) / den(g)
    bool active;
    const T den = weighted_denominator(p, gram, &active);
    const T inv_den = T(1) / den;
    g.d_z = prob_grad * inv_w_norm * inv_den;
    g.d_xn = prob_grad * p.alpha * c_y * inv_den;
    g.d_cy = prob_grad * x_norm * p.alpha * inv_den;
    if (active) {
      // dN/dg = -||x|| (alpha c_y + c) alpha / den^3
      const T d_g = -x_norm * (p.alpha * c_y + c) * p.alpha * inv_den * inv_den * inv_den;
      g.d_h = prob_grad * d_g * inv_wy_norm * inv_w_norm;
    }
  }
  return g;
}

// Online log-sum-exp state: max and the sum of exp(v - max). NaN policy: a NaN value makes the
// sum NaN (v > max is false for NaN, so it lands in sum += exp(NaN - max)), and NaN is sticky
// through every later push and merge; lse_value then returns NaN, never -inf or a finite value.
template <typename T>
struct LseState {
  T max;
  T sum;
};

template <typename T>
MK_HD void lse_push(LseState<T>* st, T v) {
  using std::exp;
  if (v > st->max) {
    st->sum = st->sum * exp(st->max - v) + T(1);
    st->max = v;
  } else {
    st->sum += exp(v - st->max);
  }
}

template <typename T>
MK_HD LseState<T> lse_merge(LseState<T> a, LseState<T> b) {
  using std::exp;
  const T hi = a.max > b.max ? a.max : b.max;
  // Both empty (or holding only NaN pushed at max = -inf): the sums are 0 or NaN, keep NaN.
  if (hi == T(-INFINITY)) return LseState<T>{hi, a.sum + b.sum};
  return LseState<T>{hi, a.sum * exp(a.max - hi) + b.sum * exp(b.max - hi)};
}

// The state of one already-reduced LSE value (a running LSE carried across class chunks).
template <typename T>
MK_HD LseState<T> lse_state_of(T value) {
  if (value != value) return LseState<T>{T(-INFINITY), value};
  return value == T(-INFINITY) ? LseState<T>{value, T(0)} : LseState<T>{value, T(1)};
}

// max + log(sum): -inf for an empty state (sum 0), NaN when a NaN was pushed.
template <typename T>
MK_HD T lse_value(LseState<T> st) {
  using std::log;
  if (st.sum > T(0)) return st.max + log(st.sum);
  return st.sum == T(0) ? T(-INFINITY) : st.sum;
}

// Columns of one class segment: segment s of a row of S columns split in `splits` covers
// [s * len, min(S, (s + 1) * len)) with len = ceil(S / splits).
MK_HD int64_t segment_length(int64_t num_cols, int64_t splits) {
  return (num_cols + splits - 1) / splits;
}

// Second pass of the forward epilogue, one row: this chunk's LSE from the row's split partials
// (merged in split order), merged into the running LSE of the previous chunks.
template <typename T>
MK_HD T merge_running_lse(T running, const T* part_max, const T* part_sum, int64_t splits) {
  LseState<T> chunk{part_max[0], part_sum[0]};
  for (int64_t s = 1; s < splits; ++s)
    chunk = lse_merge(chunk, LseState<T>{part_max[s], part_sum[s]});
  return lse_value(lse_merge(lse_state_of(running), chunk));
}

// Sum of a row's split partials, in split order.
template <typename T>
MK_HD T sum_partials(const T* part, int64_t splits) {
  T total = part[0];
  for (int64_t s = 1; s < splits; ++s) total += part[s];
  return total;
}

// Coefficient of W_j in the column-norm chain term: (W_j . H_j) / max(||W_j||, eps)^2 where the
// norm is above eps, 0 where the eps clamp holds it constant (a scale-invariant function of W_j
// has a gradient orthogonal to W_j: dW_j = H_j - coef W_j).
template <typename T>
MK_HD T column_chain_coef(T dot, T raw_norm) {
  if (!(raw_norm >= T(kNormEps))) return raw_norm != raw_norm ? raw_norm : T(0);
  return dot / (raw_norm * raw_norm);
}

// Factor of a chain row whose H_j came scaled by max(||W_j||, eps) (the 16-bit dL/dz of the
// backward): 1 / max(||W_j||, eps); 1 for an unscaled H_j. A NaN norm gives NaN.
template <typename T>
MK_HD T column_chain_scale(bool h_scaled, T raw_norm) {
  if (!h_scaled) return T(1);
  return T(1) / (raw_norm < T(kNormEps) ? T(kNormEps) : raw_norm);
}

}  // namespace margin_kernels
