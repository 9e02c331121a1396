// The CUDA epilogues of epilogue_kernels.cuh compiled by the host compiler, with the emulated
// execution layer of exec.h (fibers for threads, barriers for __syncthreads and warp shuffles),
// behind a plain C ABI that the CPU suite calls through ctypes with tensor data pointers
// (tests/cuda_emulation.py). No torch headers: the library compiles in seconds.
//
// Each entry point returns 0, or 1 with the reason in mk_emu_last_error() (a deadlock or an
// illegal shuffle the emulation detected, or an error of the launcher). Calls are serialised:
// the emulation keeps one block's state at a time.
//
// The fibers switch stacks with _longjmp, which a fortified build would replace by a checking
// variant that refuses to jump to another stack.
#undef _FORTIFY_SOURCE

#include <cstddef>
#include <mutex>
#include <string>

#include "../epilogue_kernels.cuh"

namespace {

std::mutex& call_mutex() {
  static std::mutex m;
  return m;
}

std::string& last_error() {
  static std::string error;
  return error;
}

template <typename Fn>
int guarded(Fn fn) {
  const std::lock_guard<std::mutex> lock(call_mutex());
  last_error().clear();
  try {
    fn();
    return 0;
  } catch (const std::exception& e) {
    last_error() = e.what();
    return 1;
  }
}

// Kernels that break the execution model, for the tests of the emulation's own checks.
__global__ void shuffle_with_partial_mask(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, out[threadIdx.x], 1);
}

__global__ void shuffle_after_a_lane_returned(float* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, out[threadIdx.x], 1);
}

__global__ void barrier_and_shuffle_mixed(float* out) {
  if (threadIdx.x == 0) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, out[threadIdx.x], 1);
  }
}

}  // namespace

#define MK_OFFSET(type, field) static_cast<int64_t>(offsetof(type, field))
// The library is built with hidden visibility (no PLT calls between the emulation's functions);
// only the C ABI is exported.
#define MK_EXPORT __attribute__((visibility("default")))

extern "C" {

MK_EXPORT const char* mk_emu_last_error() { return last_error().c_str(); }

// Layout of the argument structs (sizeof, then every field's offset in declaration order), so
// that the ctypes mirrors can be checked against the compiler's.
MK_EXPORT int64_t mk_emu_epilogue_args_layout(int64_t* out, int64_t capacity) {
  using margin_kernels::EpilogueArgs;
  const int64_t layout[] = {
      static_cast<int64_t>(sizeof(EpilogueArgs)),
      MK_OFFSET(EpilogueArgs, kind),
      MK_OFFSET(EpilogueArgs, params),
      MK_OFFSET(EpilogueArgs, storage),
      MK_OFFSET(EpilogueArgs, num_rows),
      MK_OFFSET(EpilogueArgs, num_cols),
      MK_OFFSET(EpilogueArgs, col_offset),
      MK_OFFSET(EpilogueArgs, class_splits),
      MK_OFFSET(EpilogueArgs, with_target),
      MK_OFFSET(EpilogueArgs, logits),
      MK_OFFSET(EpilogueArgs, gram),
      MK_OFFSET(EpilogueArgs, x_norm),
      MK_OFFSET(EpilogueArgs, col_norm),
      MK_OFFSET(EpilogueArgs, target),
      MK_OFFSET(EpilogueArgs, col_ids),
      MK_OFFSET(EpilogueArgs, c_target),
      MK_OFFSET(EpilogueArgs, target_norm),
      MK_OFFSET(EpilogueArgs, num_classes),
      MK_OFFSET(EpilogueArgs, running_lse),
      MK_OFFSET(EpilogueArgs, target_logit),
      MK_OFFSET(EpilogueArgs, partial_a),
      MK_OFFSET(EpilogueArgs, partial_b),
      MK_OFFSET(EpilogueArgs, grad_logits),
      MK_OFFSET(EpilogueArgs, grad_gram),
      MK_OFFSET(EpilogueArgs, grad_storage),
      MK_OFFSET(EpilogueArgs, saved_neg_lse),
      MK_OFFSET(EpilogueArgs, grad_neg_lse),
      MK_OFFSET(EpilogueArgs, grad_target),
      MK_OFFSET(EpilogueArgs, row_d_xnorm),
      MK_OFFSET(EpilogueArgs, row_d_ctarget),
      MK_OFFSET(EpilogueArgs, row_d_tnorm),
  };
  const int64_t n = static_cast<int64_t>(sizeof(layout) / sizeof(layout[0]));
  for (int64_t i = 0; i < n && i < capacity; ++i) out[i] = layout[i];
  return n;
}

MK_EXPORT int64_t mk_emu_column_chain_args_layout(int64_t* out, int64_t capacity) {
  using margin_kernels::ColumnChainArgs;
  const int64_t layout[] = {
      static_cast<int64_t>(sizeof(ColumnChainArgs)),
      MK_OFFSET(ColumnChainArgs, storage),
      MK_OFFSET(ColumnChainArgs, rows),
      MK_OFFSET(ColumnChainArgs, dim),
      MK_OFFSET(ColumnChainArgs, h),
      MK_OFFSET(ColumnChainArgs, h_stride),
      MK_OFFSET(ColumnChainArgs, w),
      MK_OFFSET(ColumnChainArgs, w_stride),
      MK_OFFSET(ColumnChainArgs, raw_norm),
      MK_OFFSET(ColumnChainArgs, out),
      MK_OFFSET(ColumnChainArgs, out_stride),
      MK_OFFSET(ColumnChainArgs, h_scaled),
  };
  const int64_t n = static_cast<int64_t>(sizeof(layout) / sizeof(layout[0]));
  for (int64_t i = 0; i < n && i < capacity; ++i) out[i] = layout[i];
  return n;
}

MK_EXPORT int mk_emu_lse_forward(const margin_kernels::EpilogueArgs* args) {
  return guarded([&] { margin_kernels::launch_lse_forward_cuda(*args, nullptr); });
}

MK_EXPORT int mk_emu_lse_backward(const margin_kernels::EpilogueArgs* args) {
  return guarded([&] { margin_kernels::launch_lse_backward_cuda(*args, nullptr); });
}

MK_EXPORT int mk_emu_column_chain(const margin_kernels::ColumnChainArgs* args) {
  return guarded([&] { margin_kernels::launch_column_chain_cuda(*args, nullptr); });
}

MK_EXPORT int mk_emu_margin_transform(int kind, const double* params, int target, int storage,
                                      int64_t n, const void* cos, const void* x_norm,
                                      const void* w_norm, const void* c_target, const void* gram,
                                      void* value, void* deriv) {
  return guarded([&] {
    margin_kernels::launch_margin_transform_cuda(
        kind, params, target != 0, static_cast<margin_kernels::Storage>(storage), n, cos, x_norm,
        w_norm, c_target, gram, value, deriv, nullptr);
  });
}

// Launches one of the kernels above (0: partial mask, 1: a lane returned before a shuffle, 2: a
// barrier and a shuffle that can never both be released; threads = block size) over out.
MK_EXPORT int mk_emu_broken_kernel(int which, unsigned threads, float* out) {
  return guarded([&] {
    if (which == 0) MK_LAUNCH(1, threads, nullptr, (out), shuffle_with_partial_mask);
    if (which == 1) MK_LAUNCH(1, threads, nullptr, (out), shuffle_after_a_lane_returned);
    if (which == 2) MK_LAUNCH(1, threads, nullptr, (out), barrier_and_shuffle_mixed);
  });
}

// Host conversions of the emulated 16-bit types, for the tests: n values, bits in or out.
MK_EXPORT void mk_emu_to_16bit(const float* in, uint16_t* out, int64_t n, int bfloat16) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = bfloat16 ? __float2bfloat16_rn(in[i]).bits : __float2half_rn(in[i]).bits;
  }
}

MK_EXPORT void mk_emu_from_16bit(const uint16_t* in, float* out, int64_t n, int bfloat16) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = bfloat16 ? __bfloat162float(__nv_bfloat16{in[i]}) : __half2float(__half{in[i]});
  }
}

}  // extern "C"
