// The margin_kernels operator library: schemas, the CPU twin of the CUDA epilogues (the same
// per-element math from margin_math.h, looped on the host so that CI proves it against the torch
// reference without a GPU), Meta kernels for fake tensors / torch.compile, and the CUDA
// registrations that hand raw pointers to margin_epilogue.cu.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <Python.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "epilogue.h"
#include "margin_math.h"

// `import margin_kernels._C` loads this library, whose static initialisers register the ops.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace margin_kernels {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

Storage storage_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return Storage::kFloat16;
    case at::kBFloat16:
      return Storage::kBFloat16;
    case at::kDouble:
      return Storage::kFloat64;
    case at::kFloat:
      return Storage::kFloat32;
    default:
      TORCH_CHECK_VALUE(false, "margin_kernels: logits must be float16, bfloat16, float32 or ",
                        "float64, got ", t.scalar_type());
  }
  return Storage::kFloat32;
}

// float64 math for float64 storage, float32 otherwise.
at::ScalarType math_dtype(const Tensor& storage) {
  return storage.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_kind_params(int64_t kind, const std::vector<double>& params) {
  TORCH_CHECK_VALUE(kind >= 0 && kind < kNumKinds, "margin_kernels: kind id must be in [0, ",
                    kNumKinds, "), got ", kind);
  TORCH_CHECK_VALUE(static_cast<int>(params.size()) == kNumParams, "margin_kernels: params ",
                    "must hold ", kNumParams, " values (MarginSpec.kernel_args()), got ",
                    params.size());
}

void check_vector(const char* name, const Tensor& t, int64_t length, at::ScalarType dtype,
                  const Tensor& like) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == length, "margin_kernels: ", name,
                    " must be 1-D of length ", length, ", got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, "margin_kernels: ", name, " must be ", dtype,
                    ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == like.device(), "margin_kernels: ", name, " is on ", t.device(),
                    " but the logits are on ", like.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), "margin_kernels: ", name, " must be contiguous");
}

// Shared argument checks of margin_lse_fwd / margin_lse_bwd; fills the pointer-free part of args.
EpilogueArgs check_epilogue(const Tensor& logits, const OptTensor& gram, const Tensor& x_norm,
                            const Tensor& col_norm, const Tensor& target, const OptTensor& col_ids,
                            int64_t col_offset, const Tensor& c_target, const Tensor& target_norm,
                            int64_t num_classes, int64_t class_splits, int64_t kind,
                            const std::vector<double>& params) {
  check_kind_params(kind, params);
  TORCH_CHECK_VALUE(logits.dim() == 2, "margin_kernels: logits must be 2-D (B, S), got shape ",
                    logits.sizes());
  TORCH_CHECK_VALUE(col_offset >= 0, "margin_kernels: col_offset must be >= 0, got ", col_offset);
  TORCH_CHECK_VALUE(class_splits >= 1 && class_splits <= 65535,
                    "margin_kernels: class_splits must be in [1, 65535], got ", class_splits);
  TORCH_CHECK_VALUE(logits.is_contiguous(), "margin_kernels: logits must be contiguous");
  EpilogueArgs a{};
  a.kind = static_cast<int>(kind);
  a.params = params.data();
  a.storage = storage_of(logits);
  a.num_rows = logits.size(0);
  a.num_cols = logits.size(1);
  a.col_offset = col_offset;
  a.class_splits = class_splits;
  a.num_classes = num_classes;
  const at::ScalarType md = math_dtype(logits);
  check_vector("x_norm", x_norm, a.num_rows, md, logits);
  check_vector("col_norm", col_norm, a.num_cols, md, logits);
  check_vector("target", target, a.num_rows, at::kLong, logits);
  check_vector("c_target", c_target, a.num_rows, md, logits);
  check_vector("target_norm", target_norm, a.num_rows, md, logits);
  if (col_ids.has_value()) check_vector("col_ids", *col_ids, a.num_cols, at::kLong, logits);
  const bool needs_gram = family_of(a.kind) == kWeighted;
  TORCH_CHECK_VALUE(gram.has_value() == needs_gram, "margin_kernels: gram (B, S) is required for",
                    " w_softmax and only for it");
  if (needs_gram) {
    TORCH_CHECK_VALUE(gram->sizes() == logits.sizes() && gram->dtype() == logits.dtype() &&
                          gram->device() == logits.device() && gram->is_contiguous(),
                      "margin_kernels: gram must be a contiguous tensor like logits ",
                      logits.sizes(), ", got ", gram->sizes(), " ", gram->dtype());
  }
  return a;
}

void set_pointers(EpilogueArgs* a, const Tensor& logits, const OptTensor& gram,
                  const Tensor& x_norm, const Tensor& col_norm, const Tensor& target,
                  const OptTensor& col_ids, const Tensor& c_target, const Tensor& target_norm) {
  a->logits = logits.data_ptr();
  a->gram = gram.has_value() ? gram->data_ptr() : nullptr;
  a->x_norm = x_norm.data_ptr();
  a->col_norm = col_norm.data_ptr();
  a->target = target.data_ptr<int64_t>();
  a->col_ids = col_ids.has_value() ? col_ids->data_ptr<int64_t>() : nullptr;
  a->c_target = c_target.data_ptr();
  a->target_norm = target_norm.data_ptr();
}

// ---------------------------------------------------------------------------------------------
// CPU twin: row loops over the same element functions as the CUDA kernels.

// base[idx] = value in a 16-bit storage dtype (the separate dL/dz buffer of the backward).
template <typename M>
void store_as(void* base, Storage storage, int64_t idx, M value) {
  if (storage == Storage::kBFloat16) {
    static_cast<at::BFloat16*>(base)[idx] = static_cast<at::BFloat16>(static_cast<float>(value));
  } else {
    static_cast<at::Half*>(base)[idx] = static_cast<at::Half>(static_cast<float>(value));
  }
}

// Grain of the CPU loops: a task covers at least kElementsPerTask logits (one segment per work
// item), so that small problems run inline instead of waking the thread pool for a few hundred
// elements; the merge pass is O(B) and runs in tasks of kRowsPerMergeTask rows.
constexpr int64_t kElementsPerTask = 16384;
constexpr int64_t kRowsPerMergeTask = 4096;

inline int64_t items_per_task(int64_t segment_columns) {
  return std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, segment_columns));
}

// Class id of column j of the chunk.
inline int64_t class_of(const EpilogueArgs& a, int64_t j) {
  return a.col_ids ? a.col_ids[j] : a.col_offset + j;
}

template <typename S, int F>
void lse_forward_cpu(const EpilogueArgs& a) {
  using M = at::opmath_type<S>;
  const MarginParams<M> p = make_params<M>(a.kind, a.params);
  const S* logits = static_cast<const S*>(a.logits);
  const S* gram = static_cast<const S*>(a.gram);
  const M* x_norm = static_cast<const M*>(a.x_norm);
  const M* col_norm = static_cast<const M*>(a.col_norm);
  const M* c_target = static_cast<const M*>(a.c_target);
  const M* target_norm = static_cast<const M*>(a.target_norm);
  M* part_max = static_cast<M*>(a.partial_a);
  M* part_sum = static_cast<M*>(a.partial_b);
  const int64_t splits = a.class_splits;
  const int64_t seg = segment_length(a.num_cols, splits);
  // First pass: work item (row, split) reduces its class segment to an LSE state.
  at::parallel_for(0, a.num_rows * splits, items_per_task(seg), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item / splits;
      const int64_t first = (item % splits) * seg;
      const int64_t last = std::min(a.num_cols, first + seg);
      const int64_t target = a.target[row];
      const M xn = x_norm[row];
      const M inv_xn = M(1) / xn;
      const M inv_wyn = M(1) / target_norm[row];
      LseState<M> st{M(-INFINITY), M(0)};
      for (int64_t j = first; j < last; ++j) {
        if (class_of(a, j) == target) continue;
        const M wn = col_norm[j];
        const M inv_wn = M(1) / wn;
        // c_ij = z_ij / (||x_i|| ||W_j||); W-Softmax: g_ij = h_ij / (||W_y|| ||W_j||)
        const M c = static_cast<M>(logits[row * a.num_cols + j]) * inv_xn * inv_wn;
        const M g =
            F == kWeighted ? static_cast<M>(gram[row * a.num_cols + j]) * inv_wyn * inv_wn : M(0);
        M d_c;
        lse_push(&st, nontarget_logit<F>(p, c, xn, wn, c_target[row], g, &d_c));
      }
      part_max[item] = st.max;
      part_sum[item] = st.sum;
    }
  });
  // Second pass, per row: merge the partials in split order into the running LSE.
  M* running = static_cast<M*>(a.running_lse);
  M* target_logit_out = static_cast<M*>(a.target_logit);
  at::parallel_for(0, a.num_rows, kRowsPerMergeTask, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      running[row] =
          merge_running_lse(running[row], part_max + row * splits, part_sum + row * splits, splits);
      const int64_t target = a.target[row];
      M d_c, d_xn, d_wn;
      const M t = target_logit(p, c_target[row], x_norm[row], target_norm[row], &d_c, &d_xn, &d_wn);
      target_logit_out[row] = target >= 0 && target < a.num_classes ? t : M(0);
    }
  });
}

template <typename S, int F>
void lse_backward_cpu(const EpilogueArgs& a) {
  using M = at::opmath_type<S>;
  const MarginParams<M> p = make_params<M>(a.kind, a.params);
  S* logits = static_cast<S*>(a.logits);
  S* gram = static_cast<S*>(a.gram);
  const M* x_norm = static_cast<const M*>(a.x_norm);
  const M* col_norm = static_cast<const M*>(a.col_norm);
  const M* c_target = static_cast<const M*>(a.c_target);
  const M* target_norm = static_cast<const M*>(a.target_norm);
  const M* saved_neg_lse = static_cast<const M*>(a.saved_neg_lse);
  const M* grad_neg_lse = static_cast<const M*>(a.grad_neg_lse);
  const M* grad_target = static_cast<const M*>(a.grad_target);
  M* part_xn = static_cast<M*>(a.partial_a);
  M* part_cy = static_cast<M*>(a.partial_b);
  const int64_t splits = a.class_splits;
  const int64_t seg = segment_length(a.num_cols, splits);
  at::parallel_for(0, a.num_rows * splits, items_per_task(seg), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item / splits;
      const int64_t first = (item % splits) * seg;
      const int64_t last = std::min(a.num_cols, first + seg);
      const int64_t target = a.target[row];
      const M xn = x_norm[row];
      const M inv_xn = M(1) / xn;
      const M c_y = c_target[row];
      const M inv_wyn = M(1) / target_norm[row];
      const M neg_lse = saved_neg_lse[row];
      // dL/dN_ij = dL/dneg_lse_i * softmax_ij over the unmasked columns
      const M grad_lse = neg_lse == M(-INFINITY) ? M(0) : grad_neg_lse[row];
      M d_xn = M(0);
      M d_cy = M(0);
      for (int64_t j = first; j < last; ++j) {
        const int64_t idx = row * a.num_cols + j;
        const M wn = col_norm[j];
        const M inv_wn = M(1) / wn;
        const M c = static_cast<M>(logits[idx]) * inv_xn * inv_wn;
        const M g = F == kWeighted ? static_cast<M>(gram[idx]) * inv_wyn * inv_wn : M(0);
        M prob_grad = M(0);
        if (grad_lse != M(0) && class_of(a, j) != target) {
          M d_c;
          prob_grad = grad_lse * std::exp(nontarget_logit<F>(p, c, xn, wn, c_y, g, &d_c) - neg_lse);
        }
        // the separate 16-bit buffers take dL/dz (dL/dh) times max(||W_j||, eps), and times
        // max(||x_i||, eps) where dL/dz carries 1/||x_i|| (see the op)
        const bool separate = a.grad_logits != nullptr;
        const NontargetGrad<M> ng = nontarget_backward<F>(p, prob_grad, c, xn, inv_xn,
                                                          separate ? M(1) : inv_wn, c_y, g, inv_wyn);
        if (!separate) {
          logits[idx] = static_cast<S>(ng.d_z);
          if (F == kWeighted) gram[idx] = static_cast<S>(ng.d_h);
        } else {
          store_as(a.grad_logits, a.grad_storage, idx,
                   dz_has_inv_x_norm<F>() ? ng.d_z * xn : ng.d_z);
          if (F == kWeighted) store_as(a.grad_gram, a.grad_storage, idx, ng.d_h);
        }
        d_xn += ng.d_xn;
        d_cy += ng.d_cy;
      }
      part_xn[item] = d_xn;
      part_cy[item] = d_cy;
    }
  });
  M* row_d_xnorm = static_cast<M*>(a.row_d_xnorm);
  M* row_d_ctarget = static_cast<M*>(a.row_d_ctarget);
  M* row_d_tnorm = static_cast<M*>(a.row_d_tnorm);
  at::parallel_for(0, a.num_rows, kRowsPerMergeTask, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t target = a.target[row];
      M t_c, t_xn, t_wn;
      target_logit(p, c_target[row], x_norm[row], target_norm[row], &t_c, &t_xn, &t_wn);
      const bool has_target = target >= 0 && target < a.num_classes;
      const M g_t = a.with_target && has_target ? grad_target[row] : M(0);
      row_d_xnorm[row] = sum_partials(part_xn + row * splits, splits) + g_t * t_xn;
      row_d_ctarget[row] = sum_partials(part_cy + row * splits, splits) + g_t * t_c;
      row_d_tnorm[row] = g_t * t_wn;
    }
  });
}

template <typename S, template <typename, int> class Run>
void dispatch_family_cpu(const EpilogueArgs& a) {
  switch (family_of(a.kind)) {
    case kRaw:
      return Run<S, kRaw>::run(a);
    case kFeatureNorm:
      return Run<S, kFeatureNorm>::run(a);
    case kSquared:
      return Run<S, kSquared>::run(a);
    case kWeighted:
      return Run<S, kWeighted>::run(a);
    default:
      return Run<S, kScaled>::run(a);
  }
}

template <typename S, int F>
struct ForwardCpu {
  static void run(const EpilogueArgs& a) { lse_forward_cpu<S, F>(a); }
};
template <typename S, int F>
struct BackwardCpu {
  static void run(const EpilogueArgs& a) { lse_backward_cpu<S, F>(a); }
};

Tensor lse_fwd_output(const Tensor& logits) {
  return at::empty({logits.size(0)}, logits.options().dtype(math_dtype(logits)));
}

// (B, class_splits) buffers of the split partials, in the math dtype.
std::tuple<Tensor, Tensor> split_partials(const Tensor& logits, int64_t class_splits) {
  auto opts = logits.options().dtype(math_dtype(logits));
  return {at::empty({logits.size(0), class_splits}, opts),
          at::empty({logits.size(0), class_splits}, opts)};
}

// The body of the forward op on every device: check, allocate the target logit and the split
// partials, point the epilogue at them and run `launch` (the CPU twin or the CUDA kernels).
template <typename Launch>
Tensor lse_fwd(const Tensor& logits, const OptTensor& gram, const Tensor& x_norm,
               const Tensor& col_norm, const Tensor& target, const OptTensor& col_ids,
               int64_t col_offset, const Tensor& c_target, const Tensor& target_norm,
               int64_t num_classes, const Tensor& running_lse, int64_t class_splits, int64_t kind,
               const std::vector<double>& params, Launch launch) {
  EpilogueArgs a = check_epilogue(logits, gram, x_norm, col_norm, target, col_ids, col_offset,
                                  c_target, target_norm, num_classes, class_splits, kind, params);
  check_vector("running_lse", running_lse, a.num_rows, math_dtype(logits), logits);
  set_pointers(&a, logits, gram, x_norm, col_norm, target, col_ids, c_target, target_norm);
  Tensor target_logit = lse_fwd_output(logits);
  auto [part_max, part_sum] = split_partials(logits, class_splits);
  a.running_lse = running_lse.data_ptr();
  a.target_logit = target_logit.data_ptr();
  a.partial_a = part_max.data_ptr();
  a.partial_b = part_sum.data_ptr();
  launch(a);
  return target_logit;
}

Tensor margin_lse_fwd_cpu(const Tensor& logits, const OptTensor& gram, const Tensor& x_norm,
                          const Tensor& col_norm, const Tensor& target, const OptTensor& col_ids,
                          int64_t col_offset, const Tensor& c_target, const Tensor& target_norm,
                          int64_t num_classes, const Tensor& running_lse, int64_t class_splits,
                          int64_t kind, std::vector<double> params) {
  return lse_fwd(logits, gram, x_norm, col_norm, target, col_ids, col_offset, c_target, target_norm,
                 num_classes, running_lse, class_splits, kind, params, [&](const EpilogueArgs& a) {
                   AT_DISPATCH_FLOATING_TYPES_AND2(
                       at::kHalf, at::kBFloat16, logits.scalar_type(), "margin_lse_fwd_cpu",
                       [&] { dispatch_family_cpu<scalar_t, ForwardCpu>(a); });
                 });
}

std::tuple<Tensor, Tensor, Tensor> lse_bwd_outputs(const Tensor& logits) {
  auto opts = logits.options().dtype(math_dtype(logits));
  const int64_t rows = logits.size(0);
  return {at::empty({rows}, opts), at::empty({rows}, opts), at::empty({rows}, opts)};
}

void check_bwd_vectors(const Tensor& logits, const Tensor& neg_lse, const Tensor& grad_neg_lse,
                       const Tensor& grad_target_logit) {
  const at::ScalarType md = math_dtype(logits);
  check_vector("neg_lse", neg_lse, logits.size(0), md, logits);
  check_vector("grad_neg_lse", grad_neg_lse, logits.size(0), md, logits);
  check_vector("grad_target_logit", grad_target_logit, logits.size(0), md, logits);
}

// The separate dL/dz (dL/dh) buffers: both absent, or fp16/bf16 (B, S) next to fp32 logits.
void check_grad_buffers(const Tensor& logits, const OptTensor& gram, const OptTensor& grad_logits,
                        const OptTensor& grad_gram) {
  if (!grad_logits.has_value()) {
    TORCH_CHECK_VALUE(!grad_gram.has_value(), "margin_kernels: grad_gram needs grad_logits");
    return;
  }
  const Tensor& g = *grad_logits;
  TORCH_CHECK_VALUE(logits.scalar_type() == at::kFloat &&
                        (g.scalar_type() == at::kHalf || g.scalar_type() == at::kBFloat16),
                    "margin_kernels: grad_logits must be float16/bfloat16 next to float32 logits, "
                    "got ",
                    g.scalar_type(), " next to ", logits.scalar_type());
  TORCH_CHECK_VALUE(
      g.sizes() == logits.sizes() && g.device() == logits.device() && g.is_contiguous(),
      "margin_kernels: grad_logits must be contiguous ", logits.sizes(), ", got ", g.sizes());
  TORCH_CHECK_VALUE(grad_gram.has_value() == gram.has_value(),
                    "margin_kernels: grad_gram is required with gram and only with it");
  if (grad_gram.has_value()) {
    TORCH_CHECK_VALUE(grad_gram->sizes() == g.sizes() && grad_gram->dtype() == g.dtype() &&
                          grad_gram->device() == g.device() && grad_gram->is_contiguous(),
                      "margin_kernels: grad_gram must be a contiguous tensor like grad_logits");
  }
}

// The body of the backward op on every device (see lse_fwd).
template <typename Launch>
std::tuple<Tensor, Tensor, Tensor> lse_bwd(
    const Tensor& logits, const OptTensor& gram, const Tensor& x_norm, const Tensor& col_norm,
    const Tensor& target, const OptTensor& col_ids, int64_t col_offset, const Tensor& c_target,
    const Tensor& target_norm, int64_t num_classes, const Tensor& neg_lse,
    const Tensor& grad_neg_lse, const Tensor& grad_target_logit, int64_t class_splits,
    bool with_target, const OptTensor& grad_logits, const OptTensor& grad_gram, int64_t kind,
    const std::vector<double>& params, Launch launch) {
  EpilogueArgs a = check_epilogue(logits, gram, x_norm, col_norm, target, col_ids, col_offset,
                                  c_target, target_norm, num_classes, class_splits, kind, params);
  check_bwd_vectors(logits, neg_lse, grad_neg_lse, grad_target_logit);
  check_grad_buffers(logits, gram, grad_logits, grad_gram);
  set_pointers(&a, logits, gram, x_norm, col_norm, target, col_ids, c_target, target_norm);
  a.grad_logits = grad_logits.has_value() ? grad_logits->data_ptr() : nullptr;
  a.grad_gram = grad_gram.has_value() ? grad_gram->data_ptr() : nullptr;
  a.grad_storage = grad_logits.has_value() ? storage_of(*grad_logits) : a.storage;
  auto [d_xnorm, d_ctarget, d_tnorm] = lse_bwd_outputs(logits);
  auto [part_xn, part_cy] = split_partials(logits, class_splits);
  a.with_target = with_target;
  a.saved_neg_lse = neg_lse.data_ptr();
  a.grad_neg_lse = grad_neg_lse.data_ptr();
  a.grad_target = grad_target_logit.data_ptr();
  a.partial_a = part_xn.data_ptr();
  a.partial_b = part_cy.data_ptr();
  a.row_d_xnorm = d_xnorm.data_ptr();
  a.row_d_ctarget = d_ctarget.data_ptr();
  a.row_d_tnorm = d_tnorm.data_ptr();
  launch(a);
  return {d_xnorm, d_ctarget, d_tnorm};
}

std::tuple<Tensor, Tensor, Tensor> margin_lse_bwd_cpu(
    const Tensor& logits, const OptTensor& gram, const Tensor& x_norm, const Tensor& col_norm,
    const Tensor& target, const OptTensor& col_ids, int64_t col_offset, const Tensor& c_target,
    const Tensor& target_norm, int64_t num_classes, const Tensor& neg_lse,
    const Tensor& grad_neg_lse, const Tensor& grad_target_logit, int64_t class_splits,
    bool with_target, const OptTensor& grad_logits, const OptTensor& grad_gram, int64_t kind,
    std::vector<double> params) {
  return lse_bwd(logits, gram, x_norm, col_norm, target, col_ids, col_offset, c_target, target_norm,
                 num_classes, neg_lse, grad_neg_lse, grad_target_logit, class_splits, with_target,
                 grad_logits, grad_gram, kind, params, [&](const EpilogueArgs& a) {
                   AT_DISPATCH_FLOATING_TYPES_AND2(
                       at::kHalf, at::kBFloat16, logits.scalar_type(), "margin_lse_bwd_cpu",
                       [&] { dispatch_family_cpu<scalar_t, BackwardCpu>(a); });
                 });
}

void check_transform(const Tensor& cos, const Tensor& x_norm, const Tensor& w_norm,
                     const OptTensor& c_target, const OptTensor& gram, int64_t kind,
                     const std::vector<double>& params, bool target) {
  check_kind_params(kind, params);
  storage_of(cos);
  auto same = [&](const char* name, const Tensor& t) {
    TORCH_CHECK_VALUE(
        t.sizes() == cos.sizes() && t.dtype() == cos.dtype() && t.device() == cos.device(),
        "margin_kernels: ", name, " must match cos (shape ", cos.sizes(), ", ", cos.dtype(),
        "), got ", t.sizes(), " ", t.dtype());
  };
  same("x_norm", x_norm);
  same("w_norm", w_norm);
  if (c_target.has_value()) same("c_target", *c_target);
  if (gram.has_value()) same("gram", *gram);
  TORCH_CHECK_VALUE(target || family_of(static_cast<int>(kind)) != kWeighted ||
                        (c_target.has_value() && gram.has_value()),
                    "margin_kernels: the w_softmax non-target transform needs c_target and gram");
}

template <typename S>
void transform_cpu(int64_t kind, const std::vector<double>& params, bool target, int64_t n,
                   const S* cos, const S* x_norm, const S* w_norm, const S* c_target, const S* gram,
                   S* value, S* deriv) {
  using M = at::opmath_type<S>;
  const MarginParams<M> p = make_params<M>(static_cast<int>(kind), params.data());
  at::parallel_for(0, n, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const M c = static_cast<M>(cos[i]);
      const M xn = static_cast<M>(x_norm[i]);
      const M wn = static_cast<M>(w_norm[i]);
      const M cy = c_target ? static_cast<M>(c_target[i]) : M(0);
      const M g = gram ? static_cast<M>(gram[i]) : M(0);
      M d;
      const M v = margin_transform_one(p, target, c, xn, wn, cy, g, &d);
      value[i] = static_cast<S>(v);
      deriv[i] = static_cast<S>(d);
    }
  });
}

std::tuple<Tensor, Tensor> margin_transform_cpu(const Tensor& cos, const Tensor& x_norm,
                                                const Tensor& w_norm, const OptTensor& c_target,
                                                const OptTensor& gram, int64_t kind,
                                                std::vector<double> params, bool target) {
  check_transform(cos, x_norm, w_norm, c_target, gram, kind, params, target);
  const Tensor cos_c = cos.contiguous();
  const Tensor xn_c = x_norm.contiguous();
  const Tensor wn_c = w_norm.contiguous();
  // Undefined tensors stand for absent optionals (null pointers below).
  const Tensor cy_c = c_target.has_value() ? c_target->contiguous() : Tensor();
  const Tensor g_c = gram.has_value() ? gram->contiguous() : Tensor();
  Tensor value = at::empty_like(cos_c);
  Tensor deriv = at::empty_like(cos_c);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, cos.scalar_type(), "margin_transform", [&] {
        transform_cpu<scalar_t>(kind, params, target, cos_c.numel(), cos_c.data_ptr<scalar_t>(),
                                xn_c.data_ptr<scalar_t>(), wn_c.data_ptr<scalar_t>(),
                                cy_c.defined() ? cy_c.data_ptr<scalar_t>() : nullptr,
                                g_c.defined() ? g_c.data_ptr<scalar_t>() : nullptr,
                                value.data_ptr<scalar_t>(), deriv.data_ptr<scalar_t>());
      });
  return {value, deriv};
}

// Column-norm chain term of a chunk of dW rows: checks and the argument block, shared by every
// device. h (R, D) in the math dtype of w; w (R, D) and out (R, D) in the storage dtype; raw_norm
// (R,) in the math dtype; unit stride along D. out absent: written over h (fp32/fp64 storage).
void check_column_chain(const Tensor& h, const Tensor& w, const Tensor& raw_norm,
                        const OptTensor& out) {
  TORCH_CHECK_VALUE(w.dim() == 2 && h.sizes() == w.sizes(), "margin_kernels: h and w must be ",
                    "(R, D) of one shape, got ", h.sizes(), " and ", w.sizes());
  storage_of(w);  // w: float16, bfloat16, float32 or float64
  const at::ScalarType md = math_dtype(w);
  TORCH_CHECK_VALUE(h.scalar_type() == md, "margin_kernels: h must be ", md, ", got ",
                    h.scalar_type());
  check_vector("raw_norm", raw_norm, w.size(0), md, w);
  const Tensor& target = out.has_value() ? *out : h;
  TORCH_CHECK_VALUE(target.sizes() == w.sizes() && target.scalar_type() == w.scalar_type(),
                    "margin_kernels: out must be like w (", w.sizes(), ", ", w.scalar_type(),
                    "), got ", target.sizes(), " ", target.scalar_type(),
                    out.has_value() ? "" : " (h is written when out is absent)");
  for (const Tensor* t : {&h, &w, &target}) {
    TORCH_CHECK_VALUE(t->device() == w.device(), "margin_kernels: h, w, out on one device");
    TORCH_CHECK_VALUE(t->size(0) <= 1 || t->size(1) <= 1 || t->stride(1) == 1,
                      "margin_kernels: h, w and out need unit stride along D");
  }
}

// The argument block of a checked call (data pointers: not for fake tensors).
ColumnChainArgs column_chain_args(const Tensor& h, const Tensor& w, const Tensor& raw_norm,
                                  const OptTensor& out, bool h_scaled) {
  check_column_chain(h, w, raw_norm, out);
  const Tensor& target = out.has_value() ? *out : h;
  const Storage storage = storage_of(w);
  ColumnChainArgs a{};
  a.storage = storage;
  a.rows = w.size(0);
  a.dim = w.size(1);
  a.h = h.data_ptr();
  a.h_stride = h.size(0) > 1 ? h.stride(0) : a.dim;
  a.w = w.data_ptr();
  a.w_stride = w.size(0) > 1 ? w.stride(0) : a.dim;
  a.raw_norm = raw_norm.data_ptr();
  a.out = target.data_ptr();
  a.out_stride = target.size(0) > 1 ? target.stride(0) : a.dim;
  a.h_scaled = h_scaled;
  return a;
}

template <typename S>
void column_chain_cpu(const ColumnChainArgs& a) {
  using M = at::opmath_type<S>;
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, a.dim));
  at::parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const M* h = static_cast<const M*>(a.h) + row * a.h_stride;
      const S* w = static_cast<const S*>(a.w) + row * a.w_stride;
      S* out = static_cast<S*>(a.out) + row * a.out_stride;
      M dot = M(0);
      for (int64_t d = 0; d < a.dim; ++d) dot += h[d] * static_cast<M>(w[d]);
      const M raw = static_cast<const M*>(a.raw_norm)[row];
      const M coef = column_chain_coef(dot, raw);
      const M scale = column_chain_scale(a.h_scaled, raw);
      for (int64_t d = 0; d < a.dim; ++d)
        out[d] = static_cast<S>((h[d] - coef * static_cast<M>(w[d])) * scale);
    }
  });
}

void margin_column_chain_cpu(const Tensor& h, const Tensor& w, const Tensor& raw_norm,
                             const OptTensor& out, bool h_scaled) {
  const ColumnChainArgs a = column_chain_args(h, w, raw_norm, out, h_scaled);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "margin_column_chain",
                                  [&] { column_chain_cpu<scalar_t>(a); });
}

void margin_column_chain_meta(const Tensor& h, const Tensor& w, const Tensor& raw_norm,
                              const OptTensor& out, bool /*h_scaled*/) {
  check_column_chain(h, w, raw_norm, out);
}

// ---------------------------------------------------------------------------------------------
// Meta: shapes and dtypes only (fake tensors, torch.compile, opcheck).

std::tuple<Tensor, Tensor> margin_transform_meta(const Tensor& cos, const Tensor& x_norm,
                                                 const Tensor& w_norm, const OptTensor& c_target,
                                                 const OptTensor& gram, int64_t kind,
                                                 std::vector<double> params, bool target) {
  check_transform(cos, x_norm, w_norm, c_target, gram, kind, params, target);
  return {at::empty_like(cos, at::MemoryFormat::Contiguous),
          at::empty_like(cos, at::MemoryFormat::Contiguous)};
}

Tensor margin_lse_fwd_meta(const Tensor& logits, const OptTensor& gram, const Tensor& x_norm,
                           const Tensor& col_norm, const Tensor& target, const OptTensor& col_ids,
                           int64_t col_offset, const Tensor& c_target, const Tensor& target_norm,
                           int64_t num_classes, const Tensor& running_lse, int64_t class_splits,
                           int64_t kind, std::vector<double> params) {
  check_epilogue(logits, gram, x_norm, col_norm, target, col_ids, col_offset, c_target, target_norm,
                 num_classes, class_splits, kind, params);
  check_vector("running_lse", running_lse, logits.size(0), math_dtype(logits), logits);
  return lse_fwd_output(logits);
}

std::tuple<Tensor, Tensor, Tensor> margin_lse_bwd_meta(
    const Tensor& logits, const OptTensor& gram, const Tensor& x_norm, const Tensor& col_norm,
    const Tensor& target, const OptTensor& col_ids, int64_t col_offset, const Tensor& c_target,
    const Tensor& target_norm, int64_t num_classes, const Tensor& neg_lse,
    const Tensor& grad_neg_lse, const Tensor& grad_target_logit, int64_t class_splits,
    bool with_target, const OptTensor& grad_logits, const OptTensor& grad_gram, int64_t kind,
    std::vector<double> params) {
  check_epilogue(logits, gram, x_norm, col_norm, target, col_ids, col_offset, c_target, target_norm,
                 num_classes, class_splits, kind, params);
  check_bwd_vectors(logits, neg_lse, grad_neg_lse, grad_target_logit);
  check_grad_buffers(logits, gram, grad_logits, grad_gram);
  return lse_bwd_outputs(logits);
}

// ---------------------------------------------------------------------------------------------
// CUDA: allocate, check, hand raw pointers and the current stream to margin_epilogue.cu.

void* current_stream(const Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

Tensor margin_lse_fwd_cuda(const Tensor& logits, const OptTensor& gram, const Tensor& x_norm,
                           const Tensor& col_norm, const Tensor& target, const OptTensor& col_ids,
                           int64_t col_offset, const Tensor& c_target, const Tensor& target_norm,
                           int64_t num_classes, const Tensor& running_lse, int64_t class_splits,
                           int64_t kind, std::vector<double> params) {
  const c10::cuda::CUDAGuard guard(logits.device());
  return lse_fwd(logits, gram, x_norm, col_norm, target, col_ids, col_offset, c_target, target_norm,
                 num_classes, running_lse, class_splits, kind, params, [&](const EpilogueArgs& a) {
                   launch_lse_forward_cuda(a, current_stream(logits));
                 });
}

std::tuple<Tensor, Tensor, Tensor> margin_lse_bwd_cuda(
    const Tensor& logits, const OptTensor& gram, const Tensor& x_norm, const Tensor& col_norm,
    const Tensor& target, const OptTensor& col_ids, int64_t col_offset, const Tensor& c_target,
    const Tensor& target_norm, int64_t num_classes, const Tensor& neg_lse,
    const Tensor& grad_neg_lse, const Tensor& grad_target_logit, int64_t class_splits,
    bool with_target, const OptTensor& grad_logits, const OptTensor& grad_gram, int64_t kind,
    std::vector<double> params) {
  const c10::cuda::CUDAGuard guard(logits.device());
  return lse_bwd(logits, gram, x_norm, col_norm, target, col_ids, col_offset, c_target, target_norm,
                 num_classes, neg_lse, grad_neg_lse, grad_target_logit, class_splits, with_target,
                 grad_logits, grad_gram, kind, params, [&](const EpilogueArgs& a) {
                   launch_lse_backward_cuda(a, current_stream(logits));
                 });
}

void margin_column_chain_cuda(const Tensor& h, const Tensor& w, const Tensor& raw_norm,
                              const OptTensor& out, bool h_scaled) {
  const ColumnChainArgs a = column_chain_args(h, w, raw_norm, out, h_scaled);
  const c10::cuda::CUDAGuard guard(w.device());
  launch_column_chain_cuda(a, current_stream(w));
}

std::tuple<Tensor, Tensor> margin_transform_cuda(const Tensor& cos, const Tensor& x_norm,
                                                 const Tensor& w_norm, const OptTensor& c_target,
                                                 const OptTensor& gram, int64_t kind,
                                                 std::vector<double> params, bool target) {
  check_transform(cos, x_norm, w_norm, c_target, gram, kind, params, target);
  const c10::cuda::CUDAGuard guard(cos.device());
  const Tensor cos_c = cos.contiguous();
  const Tensor xn_c = x_norm.contiguous();
  const Tensor wn_c = w_norm.contiguous();
  // Undefined tensors stand for absent optionals (null pointers below).
  const Tensor cy_c = c_target.has_value() ? c_target->contiguous() : Tensor();
  const Tensor g_c = gram.has_value() ? gram->contiguous() : Tensor();
  Tensor value = at::empty_like(cos_c);
  Tensor deriv = at::empty_like(cos_c);
  launch_margin_transform_cuda(static_cast<int>(kind), params.data(), target, storage_of(cos),
                               cos_c.numel(), cos_c.data_ptr(), xn_c.data_ptr(), wn_c.data_ptr(),
                               cy_c.defined() ? cy_c.data_ptr() : nullptr,
                               g_c.defined() ? g_c.data_ptr() : nullptr, value.data_ptr(),
                               deriv.data_ptr(), current_stream(cos));
  return {value, deriv};
}

}  // namespace

TORCH_LIBRARY(margin_kernels, m) {
  // Value and dvalue/dcos of the target (T) or non-target (N) transform, element-wise; all
  // tensors share cos's shape. c_target and gram (unit-vector w_y . w_j) are read by w_softmax.
  m.def(
      "margin_transform(Tensor cos, Tensor x_norm, Tensor w_norm, Tensor? c_target, "
      "Tensor? gram, int kind, float[] params, bool target) -> (Tensor, Tensor)");
  // Forward epilogue over one class chunk (B, S) of raw dots (fp32 for 16-bit inputs): merges
  // each row's LSE of the chunk's unmasked non-target logits into running_lse (in place, split
  // partials merged in split order) and returns the target logit (B,).
  m.def(
      "margin_lse_fwd(Tensor logits, Tensor? gram, Tensor x_norm, Tensor col_norm, "
      "Tensor target, Tensor? col_ids, int col_offset, Tensor c_target, Tensor target_norm, "
      "int num_classes, Tensor(a!) running_lse, int class_splits, int kind, float[] params) "
      "-> Tensor");
  // Backward epilogue: overwrites logits with dL/dz (and gram with dL/dh), or, when grad_logits
  // (grad_gram) are given (fp16/bf16 next to fp32 logits), writes there dL/dz (dL/dh) times
  // max(||W_j||, eps) (kinds with normalised W), and dL/dz also times max(||x_i||, eps) where it
  // carries 1/||x_i|| (scaled, squared): quantities bounded where dL/dz reaches 1/eps (zero weight
  // or feature rows); only reads the logits; returns per row this chunk's dL/d||x|| (raw dots held) and dL/dc_y, plus the
  // target's terms and dL/d||W_y|| when with_target (set on exactly one chunk).
  m.def(
      "margin_lse_bwd(Tensor(a!) logits, Tensor(b!)? gram, Tensor x_norm, Tensor col_norm, "
      "Tensor target, Tensor? col_ids, int col_offset, Tensor c_target, Tensor target_norm, "
      "int num_classes, Tensor neg_lse, Tensor grad_neg_lse, Tensor grad_target_logit, "
      "int class_splits, bool with_target, Tensor(c!)? grad_logits, Tensor(d!)? grad_gram, "
      "int kind, float[] params) -> (Tensor, Tensor, Tensor)");
  // Column-norm chain term of a chunk of dW rows: out_j (or h_j in place when out is absent) =
  // h_j - [||W_j|| >= eps] (W_j . h_j) / ||W_j||^2 W_j, written in w's dtype; divided by
  // max(||W_j||, eps) when h_scaled (h came from the 16-bit dL/dz, which carries that factor).
  m.def(
      "margin_column_chain(Tensor(a!) h, Tensor w, Tensor raw_norm, Tensor(b!)? out, "
      "bool h_scaled=False) -> ()");
}

TORCH_LIBRARY_IMPL(margin_kernels, CPU, m) {
  m.impl("margin_column_chain", &margin_column_chain_cpu);
  m.impl("margin_transform", &margin_transform_cpu);
  m.impl("margin_lse_fwd", &margin_lse_fwd_cpu);
  m.impl("margin_lse_bwd", &margin_lse_bwd_cpu);
}

TORCH_LIBRARY_IMPL(margin_kernels, Meta, m) {
  m.impl("margin_column_chain", &margin_column_chain_meta);
  m.impl("margin_transform", &margin_transform_meta);
  m.impl("margin_lse_fwd", &margin_lse_fwd_meta);
  m.impl("margin_lse_bwd", &margin_lse_bwd_meta);
}

TORCH_LIBRARY_IMPL(margin_kernels, CUDA, m) {
  m.impl("margin_column_chain", &margin_column_chain_cuda);
  m.impl("margin_transform", &margin_transform_cuda);
  m.impl("margin_lse_fwd", &margin_lse_fwd_cuda);
  m.impl("margin_lse_bwd", &margin_lse_bwd_cuda);
}

}  // namespace margin_kernels
