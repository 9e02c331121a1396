// Arguments of the two epilogues over one class chunk of logits (all B rows, S classes), shared
// by the CPU twin (margin_ops.cpp) and the CUDA kernels (margin_epilogue.cu). Plain C++: no
// torch, no CUDA types, so the .cu file compiles without the heavy ATen headers.
//
// Both epilogues run on a (rows, class_splits) grid: work item (i, s) owns row i's class segment
// s of ceil(S / class_splits) columns and writes its partial row reductions into a (rows,
// class_splits) buffer; a second pass merges each row's partials in split order (and, forward,
// into the running LSE carried across chunks). The order is fixed, so results are run-to-run
// identical, and the CPU twin uses the same segments and the same merge order.
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
  int64_t num_rows;      // B: rows (all rows of the batch)
  int64_t num_cols;      // S: classes of the chunk
  int64_t col_offset;    // class id of column 0 when col_ids is null (the chunk's first class)
  int64_t class_splits;  // segments per row (second grid axis)
  bool with_target;      // backward: add the target logit's terms (once, on one chunk)
  // (B, S) row-major raw dots z_ij = W_j . x_i; the backward overwrites them with dL/dz.
  void* logits;
  // (B, S) raw dots h_ij = W_{y_i} . W_j (W-Softmax only, else null); backward writes dL/dh.
  void* gram;
  const void* x_norm;       // (B,)  max(||x_i||, eps)
  const void* col_norm;     // (S,)  max(||W_j||, eps) of the participating classes
  const int64_t* target;    // (B,)  class id; outside [0, C) means the row has no target
  const int64_t* col_ids;   // (S,)  class id of each column, or null: column j is class
                            //       col_offset + j
  const void* c_target;     // (B,)  cosine of x_i and W_{y_i}
  const void* target_norm;  // (B,)  max(||W_{y_i}||, eps)
  int64_t num_classes;      // C: a target in [0, C) is a real target
  // forward: running_lse (B,) holds the LSE of the unmasked non-target logits of the previous
  // chunks (-inf before the first) and is merged with this chunk's in place
  void* running_lse;
  void* target_logit;  // (B,) T(c_y, ||x||, ||W_y||), 0 for rows without a target
  // (B, class_splits) partials of the row reductions: forward (max, sum) of the LSE state;
  // backward dL/d||x|| and dL/dc_y of each segment
  void* partial_a;
  void* partial_b;
  // backward: where dL/dz (dL/dh) go. Null: in place over logits (gram). Else (B, S) buffers in
  // grad_storage (fp16/bf16 next to fp32 logits), and logits (gram) are only read.
  void* grad_logits;
  void* grad_gram;
  Storage grad_storage;
  // backward inputs
  const void* saved_neg_lse;  // (B,)
  const void* grad_neg_lse;   // (B,)
  const void* grad_target;    // (B,)
  // backward outputs (B,): this chunk's dL/d||x_i|| with the raw dots held and dL/dc_y (plus
  // the target's terms when with_target), dL/d||W_y|| (0 unless with_target)
  void* row_d_xnorm;
  void* row_d_ctarget;
  void* row_d_tnorm;
};

// Column-norm chain term of one chunk of dW rows (see margin_ops.cpp): out_j = H_j -
// [||W_j|| >= eps] (W_j . H_j) / max(||W_j||, eps)^2 W_j, divided by max(||W_j||, eps) when
// h_scaled. H in the math type (fp32/fp64), W and
// out in the storage type; rows of `dim` unit-stride elements, row strides in elements. out may
// be H itself (fp32/fp64 storage): each element is read and then written by the same thread.
struct ColumnChainArgs {
  Storage storage;  // of w and out
  int64_t rows;
  int64_t dim;
  const void* h;
  int64_t h_stride;
  const void* w;
  int64_t w_stride;
  const void* raw_norm;  // (rows,) ||W_j||, math type
  void* out;
  int64_t out_stride;
  bool h_scaled;  // h holds max(||W_j||, eps) H_j: out_j is divided by max(||W_j||, eps)
};

// CUDA launchers (margin_epilogue.cu); stream is a cudaStream_t.
void launch_column_chain_cuda(const ColumnChainArgs& args, void* stream);
void launch_lse_forward_cuda(const EpilogueArgs& args, void* stream);
void launch_lse_backward_cuda(const EpilogueArgs& args, void* stream);
void launch_margin_transform_cuda(int kind, const double* params, bool target, Storage storage,
                                  int64_t n, const void* cos, const void* x_norm,
                                  const void* w_norm, const void* c_target, const void* gram,
                                  void* value, void* deriv, void* stream);

}  // namespace margin_kernels
