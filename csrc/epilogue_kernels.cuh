// The CUDA epilogues of the class-chunked margin softmax and their launchers, written against
// the execution layer of exec.h: nvcc compiles them into the extension (margin_epilogue.cu), the
// host compiler into the emulated kernels the CPU suite runs (host/emulated_kernels.cpp).
//
// They work on a (B, S) fp32 logits chunk that cuBLAS produced: a (B, class_splits) grid, block
// (i, s) owning row i's class segment s, vectorised 16-byte loads, float math (double for double
// storage). Splitting rows into segments keeps the grid at several blocks per SM when B is small
// (B = 128 on 132 SMs); each block writes its partial row reductions to a (B, class_splits)
// buffer, and a second small kernel merges them in split order, so the result does not depend on
// block scheduling.
//
// Forward: N per element, target column masked, online log-sum-exp; the merge folds the chunk's
// LSE into the running LSE of the previous chunks and writes the target logit.
// Backward: overwrites the logits with dL/dz (and the W-Softmax gram with dL/dh) in place and
// reduces the per-row terms that the host-side GEMMs and O(B D) chain rule need.
//
// Only c10/cuda headers (through exec.h): ATen is kept out so that this file compiles in seconds.
#pragma once

#include <cstdint>
#include <type_traits>

#include "epilogue.h"
#include "exec.h"
#include "margin_math.h"

namespace margin_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename S>
struct MathType {
  using type = float;
};
template <>
struct MathType<double> {
  using type = double;
};

__device__ __forceinline__ float to_math(float v) { return v; }
__device__ __forceinline__ double to_math(double v) { return v; }
__device__ __forceinline__ float to_math(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_math(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename S>
__device__ __forceinline__ S from_math(float v);
template <>
__device__ __forceinline__ float from_math<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_math<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_math<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <typename S>
__device__ __forceinline__ S from_math(double v) {
  return v;
}

template <typename S>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(S);
  S v[kSize];
};

// Calls fn(col, z, h) for every column of one row, threads of the block strided over 16-byte
// packs; a scalar head and tail cover the columns outside the aligned middle. h is the gram
// element (W-Softmax) or 0. When fn writes (kWrite), it sets z (and h) in place and the new
// values are stored back with the same vector width.
template <bool kWrite, bool kGram, typename S, typename Fn>
__device__ __forceinline__ void visit_row(S* z_row, S* h_row, int64_t n, Fn fn) {
  using M = typename MathType<S>::type;
  constexpr int kVec = Pack<S>::kSize;
  const uintptr_t z_addr = reinterpret_cast<uintptr_t>(z_row);
  const bool same_phase = !kGram || ((reinterpret_cast<uintptr_t>(h_row) ^ z_addr) & 15) == 0;
  int64_t head = same_phase ? static_cast<int64_t>(((16 - (z_addr & 15)) & 15) / sizeof(S)) : n;
  if (head > n) head = n;
  auto scalar = [&](int64_t j) {
    M z = to_math(z_row[j]);
    M h = kGram ? to_math(h_row[j]) : M(0);
    fn(j, z, h);
    if (kWrite) {
      z_row[j] = from_math<S>(z);
      if (kGram) h_row[j] = from_math<S>(h);
    }
  };
  for (int64_t j = threadIdx.x; j < head; j += blockDim.x) scalar(j);
  const int64_t num_packs = (n - head) / kVec;
  Pack<S>* z_packs = reinterpret_cast<Pack<S>*>(z_row + head);
  Pack<S>* h_packs = kGram ? reinterpret_cast<Pack<S>*>(h_row + head) : nullptr;
  for (int64_t v = threadIdx.x; v < num_packs; v += blockDim.x) {
    Pack<S> zp = z_packs[v];
    Pack<S> hp;
    if (kGram) hp = h_packs[v];
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      M z = to_math(zp.v[k]);
      M h = kGram ? to_math(hp.v[k]) : M(0);
      fn(head + v * kVec + k, z, h);
      if (kWrite) {
        zp.v[k] = from_math<S>(z);
        if (kGram) hp.v[k] = from_math<S>(h);
      }
    }
    if (kWrite) {
      z_packs[v] = zp;
      if (kGram) h_packs[v] = hp;
    }
  }
  for (int64_t j = head + num_packs * kVec + threadIdx.x; j < n; j += blockDim.x) scalar(j);
}

template <typename M>
__device__ __forceinline__ M warp_sum(M v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sum over the block; every thread gets the total. scratch: kWarps elements of shared memory.
template <typename M>
__device__ __forceinline__ M block_sum(M v, M* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  M total = lane < kWarps ? scratch[lane] : M(0);
  return warp_sum(total);
}

template <typename M>
__device__ __forceinline__ LseState<M> block_lse(LseState<M> st, M* max_scratch, M* sum_scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    LseState<M> other{__shfl_xor_sync(0xffffffffu, st.max, off),
                      __shfl_xor_sync(0xffffffffu, st.sum, off)};
    st = lse_merge(st, other);
  }
  __syncthreads();
  if (lane == 0) {
    max_scratch[warp] = st.max;
    sum_scratch[warp] = st.sum;
  }
  __syncthreads();
  LseState<M> total{M(-INFINITY), M(0)};
  if (lane < kWarps) total = LseState<M>{max_scratch[lane], sum_scratch[lane]};
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    LseState<M> other{__shfl_xor_sync(0xffffffffu, total.max, off),
                      __shfl_xor_sync(0xffffffffu, total.sum, off)};
    total = lse_merge(total, other);
  }
  return total;
}

template <typename M>
struct RowInputs {
  int64_t target;
  bool has_target;
  M x_norm, inv_x_norm, c_y, inv_wy_norm;
};

template <typename M>
__device__ __forceinline__ RowInputs<M> load_row(const EpilogueArgs& a, int64_t row) {
  RowInputs<M> r;
  r.target = a.target[row];
  r.has_target = r.target >= 0 && r.target < a.num_classes;
  r.x_norm = static_cast<const M*>(a.x_norm)[row];
  r.inv_x_norm = M(1) / r.x_norm;
  r.c_y = static_cast<const M*>(a.c_target)[row];
  r.inv_wy_norm = M(1) / static_cast<const M*>(a.target_norm)[row];
  return r;
}

// The column is the row's target (masked out of the negatives' LSE).
__device__ __forceinline__ bool is_target_col(const EpilogueArgs& a, int64_t col, int64_t target) {
  return (a.col_ids ? a.col_ids[col] : a.col_offset + col) == target;
}

// This block's class segment [first, first + count) of its row.
struct Segment {
  int64_t first;
  int64_t count;
};

__device__ __forceinline__ Segment block_segment(const EpilogueArgs& a) {
  const int64_t seg = segment_length(a.num_cols, a.class_splits);
  const int64_t first = static_cast<int64_t>(blockIdx.y) * seg;
  const int64_t last = first + seg < a.num_cols ? first + seg : a.num_cols;
  return Segment{first, last > first ? last - first : 0};
}

// Merge pass of the forward epilogue, one row: the split partials into the running LSE, and the
// target logit.
template <typename M>
__device__ __forceinline__ void finish_forward_row(const EpilogueArgs& a, const MarginParams<M>& p,
                                                   int64_t row) {
  const int64_t splits = a.class_splits;
  M* running = static_cast<M*>(a.running_lse);
  running[row] = merge_running_lse(running[row], static_cast<const M*>(a.partial_a) + row * splits,
                                   static_cast<const M*>(a.partial_b) + row * splits, splits);
  const RowInputs<M> r = load_row<M>(a, row);
  M d_c, d_xn, d_wn;
  const M wy_norm = static_cast<const M*>(a.target_norm)[row];
  const M t = target_logit(p, r.c_y, r.x_norm, wy_norm, &d_c, &d_xn, &d_wn);
  static_cast<M*>(a.target_logit)[row] = r.has_target ? t : M(0);
}

// Merge pass of the backward epilogue, one row: split partials summed in split order, plus the
// target's terms on the one chunk that carries them.
template <typename M>
__device__ __forceinline__ void finish_backward_row(const EpilogueArgs& a, const MarginParams<M>& p,
                                                    int64_t row) {
  const int64_t splits = a.class_splits;
  const RowInputs<M> r = load_row<M>(a, row);
  M t_c, t_xn, t_wn;
  const M wy_norm = static_cast<const M*>(a.target_norm)[row];
  target_logit(p, r.c_y, r.x_norm, wy_norm, &t_c, &t_xn, &t_wn);
  const M grad_t = a.with_target && r.has_target ? static_cast<const M*>(a.grad_target)[row] : M(0);
  const M d_xn = sum_partials(static_cast<const M*>(a.partial_a) + row * splits, splits);
  const M d_cy = sum_partials(static_cast<const M*>(a.partial_b) + row * splits, splits);
  static_cast<M*>(a.row_d_xnorm)[row] = d_xn + grad_t * t_xn;
  static_cast<M*>(a.row_d_ctarget)[row] = d_cy + grad_t * t_c;
  static_cast<M*>(a.row_d_tnorm)[row] = grad_t * t_wn;
}

template <typename S, int F>
__global__ void __launch_bounds__(kThreads)
    lse_forward_kernel(EpilogueArgs a, MarginParams<typename MathType<S>::type> p) {
  using M = typename MathType<S>::type;
  MK_SHARED M max_scratch[kWarps];
  MK_SHARED M sum_scratch[kWarps];
  const int64_t row = blockIdx.x;
  const Segment segment = block_segment(a);
  const RowInputs<M> r = load_row<M>(a, row);
  const M* col_norm = static_cast<const M*>(a.col_norm) + segment.first;
  S* z_row = static_cast<S*>(a.logits) + row * a.num_cols + segment.first;
  S* h_row = F == kWeighted ? static_cast<S*>(a.gram) + row * a.num_cols + segment.first : nullptr;
  LseState<M> st{M(-INFINITY), M(0)};
  visit_row<false, F == kWeighted>(z_row, h_row, segment.count, [&](int64_t j, M& z, M& h) {
    if (is_target_col(a, segment.first + j, r.target)) return;
    const M w_norm = col_norm[j];
    const M inv_w_norm = M(1) / w_norm;
    // c_ij = z_ij / (||x_i|| ||W_j||); W-Softmax: g_ij = h_ij / (||W_y|| ||W_j||)
    const M c = z * r.inv_x_norm * inv_w_norm;
    const M gram = h * r.inv_wy_norm * inv_w_norm;
    M d_c;
    lse_push(&st, nontarget_logit<F>(p, c, r.x_norm, w_norm, r.c_y, gram, &d_c));
  });
  st = block_lse(st, max_scratch, sum_scratch);
  if (threadIdx.x == 0) {
    const int64_t item = row * a.class_splits + blockIdx.y;
    static_cast<M*>(a.partial_a)[item] = st.max;
    static_cast<M*>(a.partial_b)[item] = st.sum;
    // One segment per row: this block is the row's only writer and merges at once.
    if (a.class_splits == 1) finish_forward_row(a, p, row);
  }
}

// O is the dtype dL/dz (dL/dh) is written in: S writes it in place over the logits; a 16-bit O
// writes it to the separate grad_logits (grad_gram) buffers, which the dX and dW GEMMs then read
// on tensor cores, and the fp32 logits are only read. The 16-bit buffers hold dL/dz (dL/dh) times
// max(||W_j||, eps), and dL/dz times max(||x_i||, eps) where it carries 1/||x_i||: dL/dz itself
// reaches 1/eps = 1e12 on a zero weight (feature) row, past fp16's range, and the inf would meet
// the zero row in a GEMM (NaN). The host folds the factors back in fp32: normalised rows of W
// (x) as the dX (dW) GEMM operand, then each row of dW (dX) divided by its norm.
template <typename S, int F, typename O>
__global__ void __launch_bounds__(kThreads)
    lse_backward_kernel(EpilogueArgs a, MarginParams<typename MathType<S>::type> p) {
  using M = typename MathType<S>::type;
  MK_SHARED M scratch[kWarps];
  const int64_t row = blockIdx.x;
  const Segment segment = block_segment(a);
  const RowInputs<M> r = load_row<M>(a, row);
  const M* col_norm = static_cast<const M*>(a.col_norm) + segment.first;
  const M neg_lse = static_cast<const M*>(a.saved_neg_lse)[row];
  // dL/dN_ij = dL/dneg_lse_i * softmax_ij over the unmasked columns; nothing when the row had
  // no unmasked column (neg_lse = -inf) or no incoming gradient.
  const M grad_lse = neg_lse == M(-INFINITY) ? M(0) : static_cast<const M*>(a.grad_neg_lse)[row];
  S* z_row = static_cast<S*>(a.logits) + row * a.num_cols + segment.first;
  S* h_row = F == kWeighted ? static_cast<S*>(a.gram) + row * a.num_cols + segment.first : nullptr;
  M d_xn = M(0);
  M d_cy = M(0);
  constexpr bool kInPlace = std::is_same<S, O>::value;
  const M dz_row_factor = !kInPlace && dz_has_inv_x_norm<F>() ? r.x_norm : M(1);
  O* dz_row =
      kInPlace ? nullptr : static_cast<O*>(a.grad_logits) + row * a.num_cols + segment.first;
  O* dh_row = kInPlace || F != kWeighted
                  ? nullptr
                  : static_cast<O*>(a.grad_gram) + row * a.num_cols + segment.first;
  visit_row<kInPlace, F == kWeighted>(z_row, h_row, segment.count, [&](int64_t j, M& z, M& h) {
    M prob_grad = M(0);
    const M w_norm = col_norm[j];
    const M inv_w_norm = M(1) / w_norm;
    const M c = z * r.inv_x_norm * inv_w_norm;
    const M gram = h * r.inv_wy_norm * inv_w_norm;
    if (grad_lse != M(0) && !is_target_col(a, segment.first + j, r.target)) {
      M d_c;
      const M logit = nontarget_logit<F>(p, c, r.x_norm, w_norm, r.c_y, gram, &d_c);
      prob_grad = grad_lse * exp(logit - neg_lse);
    }
    const NontargetGrad<M> g =
        nontarget_backward<F>(p, prob_grad, c, r.x_norm, r.inv_x_norm,
                              kInPlace ? inv_w_norm : M(1), r.c_y, gram, r.inv_wy_norm);
    if (kInPlace) {
      z = g.d_z;
      h = g.d_h;
    } else {
      // consecutive threads own consecutive 16-byte packs of z: these 2-byte stores coalesce
      dz_row[j] = from_math<O>(g.d_z * dz_row_factor);
      if (F == kWeighted) dh_row[j] = from_math<O>(g.d_h);
    }
    d_xn += g.d_xn;
    d_cy += g.d_cy;
  });
  d_xn = block_sum(d_xn, scratch);
  if (F == kWeighted) d_cy = block_sum(d_cy, scratch);
  if (threadIdx.x == 0) {
    const int64_t item = row * a.class_splits + blockIdx.y;
    static_cast<M*>(a.partial_a)[item] = d_xn;
    static_cast<M*>(a.partial_b)[item] = d_cy;
    if (a.class_splits == 1) finish_backward_row(a, p, row);
  }
}

// Second pass when rows are split: one thread per row merges its partials in split order.
template <typename M, bool kForward>
__global__ void merge_rows_kernel(EpilogueArgs a, MarginParams<M> p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= a.num_rows) return;
  if (kForward) {
    finish_forward_row(a, p, row);
  } else {
    finish_backward_row(a, p, row);
  }
}

template <typename S>
__global__ void margin_transform_kernel(MarginParams<typename MathType<S>::type> p, bool target,
                                        int64_t n, const S* cos, const S* x_norm, const S* w_norm,
                                        const S* c_target, const S* gram, S* value, S* deriv) {
  using M = typename MathType<S>::type;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const M c = to_math(cos[i]);
  const M xn = to_math(x_norm[i]);
  const M wn = to_math(w_norm[i]);
  const M cy = c_target ? to_math(c_target[i]) : M(0);
  const M g = gram ? to_math(gram[i]) : M(0);
  M d;
  const M v = margin_transform_one(p, target, c, xn, wn, cy, g, &d);
  value[i] = from_math<S>(v);
  deriv[i] = from_math<S>(d);
}

template <typename S, template <typename, int> class Launch>
void dispatch_family(const EpilogueArgs& a, cudaStream_t stream) {
  switch (family_of(a.kind)) {
    case kRaw:
      Launch<S, kRaw>::run(a, stream);
      break;
    case kFeatureNorm:
      Launch<S, kFeatureNorm>::run(a, stream);
      break;
    case kSquared:
      Launch<S, kSquared>::run(a, stream);
      break;
    case kWeighted:
      Launch<S, kWeighted>::run(a, stream);
      break;
    default:
      Launch<S, kScaled>::run(a, stream);
  }
}

template <template <typename, int> class Launch>
void dispatch_storage(const EpilogueArgs& a, cudaStream_t stream) {
  switch (a.storage) {
    case Storage::kFloat16:
      dispatch_family<__half, Launch>(a, stream);
      break;
    case Storage::kBFloat16:
      dispatch_family<__nv_bfloat16, Launch>(a, stream);
      break;
    case Storage::kFloat64:
      dispatch_family<double, Launch>(a, stream);
      break;
    default:
      dispatch_family<float, Launch>(a, stream);
  }
}

// Grid of one epilogue: (rows, class_splits), then the merge kernel when rows are split.
template <typename S, bool kForward>
void launch_merge(const EpilogueArgs& a, const MarginParams<typename MathType<S>::type>& p,
                  cudaStream_t stream) {
  if (a.class_splits == 1) return;
  constexpr int kMergeThreads = 128;
  const unsigned blocks = static_cast<unsigned>((a.num_rows + kMergeThreads - 1) / kMergeThreads);
  MK_LAUNCH(blocks, kMergeThreads, stream, (a, p),
            merge_rows_kernel<typename MathType<S>::type, kForward>);
}

dim3 epilogue_grid(const EpilogueArgs& a) {
  return dim3(static_cast<unsigned>(a.num_rows), static_cast<unsigned>(a.class_splits), 1);
}

template <typename S, int F>
struct LaunchForward {
  static void run(const EpilogueArgs& a, cudaStream_t stream) {
    using M = typename MathType<S>::type;
    const MarginParams<M> p = make_params<M>(a.kind, a.params);
    MK_LAUNCH(epilogue_grid(a), kThreads, stream, (a, p), lse_forward_kernel<S, F>);
    launch_merge<S, true>(a, p, stream);
  }
};

template <typename S, int F>
struct LaunchBackward {
  static void run(const EpilogueArgs& a, cudaStream_t stream) {
    using M = typename MathType<S>::type;
    const MarginParams<M> p = make_params<M>(a.kind, a.params);
    // margin_ops.cpp admits a separate grad_logits only as fp16/bf16 next to fp32 logits
    if constexpr (std::is_same<S, float>::value) {
      if (a.grad_logits != nullptr && a.grad_storage == Storage::kBFloat16) {
        MK_LAUNCH(epilogue_grid(a), kThreads, stream, (a, p),
                  lse_backward_kernel<S, F, __nv_bfloat16>);
      } else if (a.grad_logits != nullptr) {
        MK_LAUNCH(epilogue_grid(a), kThreads, stream, (a, p), lse_backward_kernel<S, F, __half>);
      } else {
        MK_LAUNCH(epilogue_grid(a), kThreads, stream, (a, p), lse_backward_kernel<S, F, S>);
      }
    } else {
      MK_LAUNCH(epilogue_grid(a), kThreads, stream, (a, p), lse_backward_kernel<S, F, S>);
    }
    launch_merge<S, false>(a, p, stream);
  }
};

template <typename S>
void launch_transform(int kind, const double* params, bool target, int64_t n, const void* cos,
                      const void* x_norm, const void* w_norm, const void* c_target,
                      const void* gram, void* value, void* deriv, cudaStream_t stream) {
  using M = typename MathType<S>::type;
  constexpr int kBlock = 256;
  const unsigned blocks = static_cast<unsigned>((n + kBlock - 1) / kBlock);
  MK_LAUNCH(blocks, kBlock, stream,
            (make_params<M>(kind, params), target, n, static_cast<const S*>(cos),
             static_cast<const S*>(x_norm), static_cast<const S*>(w_norm),
             static_cast<const S*>(c_target), static_cast<const S*>(gram), static_cast<S*>(value),
             static_cast<S*>(deriv)),
            margin_transform_kernel<S>);
}

// One block per dW row j: the dot W_j . H_j reduced over the block, then every element of the
// row rewritten as (H_j - coef W_j) scale in the storage dtype (one read of H and W, one write of
// dW); scale = 1, or 1 / max(||W_j||, eps) for an H_j scaled by it (16-bit backward).
template <typename M, typename S>
__global__ void __launch_bounds__(kThreads) column_chain_kernel(ColumnChainArgs a) {
  MK_SHARED M scratch[kWarps];
  const int64_t row = blockIdx.x;
  const M* h = static_cast<const M*>(a.h) + row * a.h_stride;
  const S* w = static_cast<const S*>(a.w) + row * a.w_stride;
  S* out = static_cast<S*>(a.out) + row * a.out_stride;
  M dot = M(0);
  for (int64_t d = threadIdx.x; d < a.dim; d += blockDim.x) dot += h[d] * to_math(w[d]);
  dot = block_sum(dot, scratch);
  const M raw = static_cast<const M*>(a.raw_norm)[row];
  const M coef = column_chain_coef(dot, raw);
  const M scale = column_chain_scale(a.h_scaled, raw);
  for (int64_t d = threadIdx.x; d < a.dim; d += blockDim.x) {
    out[d] = from_math<S>((h[d] - coef * to_math(w[d])) * scale);
  }
}

template <typename M, typename S>
void launch_column_chain(const ColumnChainArgs& a, cudaStream_t stream) {
  MK_LAUNCH(static_cast<unsigned>(a.rows), kThreads, stream, (a), column_chain_kernel<M, S>);
}

}  // namespace

void launch_column_chain_cuda(const ColumnChainArgs& args, void* stream) {
  if (args.rows == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  switch (args.storage) {
    case Storage::kFloat16:
      return launch_column_chain<float, __half>(args, s);
    case Storage::kBFloat16:
      return launch_column_chain<float, __nv_bfloat16>(args, s);
    case Storage::kFloat64:
      return launch_column_chain<double, double>(args, s);
    default:
      return launch_column_chain<float, float>(args, s);
  }
}

void launch_lse_forward_cuda(const EpilogueArgs& args, void* stream) {
  if (args.num_rows == 0) return;
  dispatch_storage<LaunchForward>(args, static_cast<cudaStream_t>(stream));
}

void launch_lse_backward_cuda(const EpilogueArgs& args, void* stream) {
  if (args.num_rows == 0) return;
  dispatch_storage<LaunchBackward>(args, static_cast<cudaStream_t>(stream));
}

void launch_margin_transform_cuda(int kind, const double* params, bool target, Storage storage,
                                  int64_t n, const void* cos, const void* x_norm,
                                  const void* w_norm, const void* c_target, const void* gram,
                                  void* value, void* deriv, void* stream) {
  if (n == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  switch (storage) {
    case Storage::kFloat16:
      launch_transform<__half>(kind, params, target, n, cos, x_norm, w_norm, c_target, gram, value,
                               deriv, s);
      break;
    case Storage::kBFloat16:
      launch_transform<__nv_bfloat16>(kind, params, target, n, cos, x_norm, w_norm, c_target, gram,
                                      value, deriv, s);
      break;
    case Storage::kFloat64:
      launch_transform<double>(kind, params, target, n, cos, x_norm, w_norm, c_target, gram, value,
                               deriv, s);
      break;
    default:
      launch_transform<float>(kind, params, target, n, cos, x_norm, w_norm, c_target, gram, value,
                              deriv, s);
  }
}

}  // namespace margin_kernels
