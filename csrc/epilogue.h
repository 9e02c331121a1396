// Arguments of the two per-row epilogues over a chunk of logits, shared by the CPU twin
// (margin_ops.cpp) and the CUDA kernels (margin_epilogue.cu). Plain C++: no torch, no CUDA types,
// so the .cu file compiles without the heavy ATen headers.
#pragma once

#include <cstdint>

namespace margin_kernels {

// Storage dtype of the logits / gram buffers. Math runs in double for kFloat64, else in float;
// every per-row vector (norms, cosines, outputs) is in that math type.
enum class Storage : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

struct EpilogueArgs {
  int kind;
  const double* params;  // host memory, kNumParams values (MarginSpec.kernel_args order)
  Storage storage;
  int64_t num_rows;  // R: rows of the chunk
  int64_t num_cols;  // S: participating classes
  // (R, S) row-major raw dots z_ij = W_j . x_i; the backward overwrites them with dL/dz.
  void* logits;
  // (R, S) raw dots h_ij = W_{y_i} . W_j (W-Softmax only, else null); backward writes dL/dh.
  void* gram;
  const void* x_norm;       // (R,)  max(||x_i||, eps)
  const void* col_norm;     // (S,)  max(||W_j||, eps) of the participating classes
  const int64_t* target;    // (R,)  class id; outside [0, C) means the row has no target
  const int64_t* col_ids;   // (S,)  class id of each column, or null for column j = class j
  const void* c_target;     // (R,)  cosine of x_i and W_{y_i}
  const void* target_norm;  // (R,)  max(||W_{y_i}||, eps)
  int64_t num_classes;      // C: a target in [0, C) is a real target
  // forward outputs
  void* neg_lse;       // (R,) LSE over the unmasked non-target logits (-inf when none)
  void* target_logit;  // (R,) T(c_y, ||x||, ||W_y||), 0 for rows without a target
  // backward inputs
  const void* saved_neg_lse;  // (R,)
  const void* grad_neg_lse;   // (R,)
  const void* grad_target;    // (R,)
  // backward outputs (R,): dL/d||x_i|| with the raw dots held, dL/dc_y, dL/d||W_y||
  void* row_d_xnorm;
  void* row_d_ctarget;
  void* row_d_tnorm;
};

// CUDA launchers (margin_epilogue.cu); stream is a cudaStream_t.
void launch_lse_forward_cuda(const EpilogueArgs& args, void* stream);
void launch_lse_backward_cuda(const EpilogueArgs& args, void* stream);
void launch_margin_transform_cuda(int kind, const double* params, bool target, Storage storage,
                                  int64_t n, const void* cos, const void* x_norm,
                                  const void* w_norm, const void* c_target, const void* gram,
                                  void* value, void* deriv, void* stream);

}  // namespace margin_kernels
