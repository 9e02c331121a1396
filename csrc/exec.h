// Execution layer of the CUDA kernels (epilogue_kernels.cuh): the thread and block indices,
// block barriers, warp shuffles, shared memory and kernel launches the kernel bodies use.
//
// Under nvcc every name is the CUDA built-in (this header adds nothing to the device code). For
// the host compiler it is an emulation that runs the same kernel source on the CPU, so that the
// test suite executes the kernels' own lines (docs/design.md, "The execution layer"):
//
// - every thread of a block is a fiber with its own small stack (entered through ucontext, then
//   switched with _setjmp/_longjmp); blocks run one after another, in grid order, on the calling
//   thread;
// - __syncthreads() parks the fiber until every live thread of the block has arrived (threads
//   that returned count as arrived, as on the GPU);
// - __shfl_xor_sync(0xffffffff, v, lane_mask) is a warp barrier: each lane deposits v, and once
//   all 32 lanes of the warp have arrived every lane gets its partner's value;
// - MK_SHARED storage is a static local of the kernel instantiation (blocks never overlap);
// - __half and __nv_bfloat16 are 16-bit host types with round-to-nearest-even conversions.
//
// A barrier that can never be released (threads of a block waiting at different barriers, a
// shuffle with a lane that returned), a partial shuffle mask or a warp shuffle in a block that
// is not a whole number of warps ends the launch with an error instead of hanging.
#pragma once

#if defined(__CUDACC__)

#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define MK_SHARED __shared__
// MK_LAUNCH(grid, block, stream, (args...), kernel<...>): the kernel last, so that the commas of
// its template arguments need no parentheses.
#define MK_LAUNCH(grid, block, stream, args, ...) \
  do {                                            \
    __VA_ARGS__<<<grid, block, 0, stream>>> args; \
    C10_CUDA_KERNEL_LAUNCH_CHECK();               \
  } while (0)

#else  // host emulation

#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define MK_SHARED static

using cudaStream_t = void*;

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// 16-bit floating-point storage types, converted with round-to-nearest-even like cuda_fp16.h and
// cuda_bf16.h (NaN stays NaN, overflow goes to inf).
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float mk_bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint32_t mk_float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exponent = (h.bits >> 10) & 0x1fu;
  const uint32_t mantissa = h.bits & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return mk_bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  return mk_bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline __half __float2half_rn(float f) {
  const uint32_t bits = mk_float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7fffffffu;
  uint32_t h;
  if (magnitude > 0x7f800000u) {
    h = 0x7e00u;  // NaN
  } else if (magnitude >= 0x477ff000u) {
    h = 0x7c00u;  // at or above 65520 (half of the last step past 65504): inf
  } else if (magnitude < 0x38800000u) {
    // below 2^-14: subnormal steps of 2^-24; the scaling is exact, nearbyint rounds to even
    h = static_cast<uint32_t>(std::nearbyint(mk_bits_to_float(magnitude) * 16777216.0f));
  } else {
    const uint32_t rest = magnitude & 0x1fffu;
    h = ((((magnitude >> 23) - 112u) << 10) | ((magnitude >> 13) & 0x3ffu));
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry steps the exponent
  }
  return __half{static_cast<uint16_t>(sign | h)};
}

inline float __bfloat162float(__nv_bfloat16 b) {
  return mk_bits_to_float(static_cast<uint32_t>(b.bits) << 16);
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t bits = mk_float_to_bits(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    return __nv_bfloat16{static_cast<uint16_t>((bits >> 16) | 0x40u)};
  }
  const uint32_t rounded = bits + 0x7fffu + ((bits >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(rounded >> 16)};
}

namespace mk_exec {

// Why a launch stopped (a kernel bug the GPU would hang on or leave undefined).
struct LaunchError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class Wait { kReady, kBlockBarrier, kShuffle, kDone, kFault };

struct Fiber {
  ucontext_t context;  // its entry, for the first switch into it
  jmp_buf jump;        // where it parked
  bool started = false;
  dim3 thread_idx;
  Wait wait = Wait::kReady;
  uint64_t shuffle_value = 0;   // what this lane offers (the bytes of a float or double)
  unsigned shuffle_source = 0;  // the lane it reads
  uint64_t shuffle_result = 0;
};

struct Block {
  dim3 grid_dim, block_dim, block_idx;
  std::vector<Fiber> fibers;
  std::unique_ptr<char[]> stacks;
  size_t stacks_allocated = 0;
  jmp_buf scheduler;
  size_t current = 0;
  const std::function<void()>* body = nullptr;
  std::string fault;
};

// Fiber stacks: the kernels keep a few hundred bytes per frame; the margin leaves room for an
// unoptimised coverage build.
constexpr size_t kStackBytes = 64 * 1024;

inline Block& block() {
  static Block b;
  return b;
}

inline Fiber& this_fiber() { return block().fibers[block().current]; }

// Switches between the scheduler and the fibers: ucontext only to enter a fiber the first time
// (swapcontext costs a signal-mask system call), _setjmp/_longjmp afterwards.
[[gnu::noinline]] inline void park(Wait wait) {
  Block& b = block();
  Fiber& f = b.fibers[b.current];
  f.wait = wait;
  if (_setjmp(f.jump) == 0) _longjmp(b.scheduler, 1);
}

[[gnu::noinline]] inline void resume(Block& b, size_t t) {
  b.current = t;
  Fiber& f = b.fibers[t];
  if (_setjmp(b.scheduler) != 0) return;
  if (f.started) _longjmp(f.jump, 1);
  f.started = true;
  setcontext(&f.context);
}

inline void fault(const std::string& why) {
  block().fault = why;
  park(Wait::kFault);
}

// A fiber runs the kernel once per block of the launch, parking as returned in between.
inline void fiber_main() {
  for (;;) {
    (*block().body)();
    park(Wait::kDone);
  }
}

// Releases warp w when its 32 lanes all wait at a shuffle: each lane gets its source lane's
// value. Returns whether it did.
inline bool release_warp(Block& b, size_t w) {
  const size_t first = 32 * w;
  if (first + 32 > b.fibers.size()) return false;
  for (size_t lane = 0; lane < 32; ++lane) {
    if (b.fibers[first + lane].wait != Wait::kShuffle) return false;
  }
  for (size_t lane = 0; lane < 32; ++lane) {
    Fiber& f = b.fibers[first + lane];
    f.shuffle_result = b.fibers[first + f.shuffle_source].shuffle_value;
  }
  for (size_t lane = 0; lane < 32; ++lane) b.fibers[first + lane].wait = Wait::kReady;
  return true;
}

// Releases the block barrier when every live thread waits at it. Returns whether it did.
inline bool release_barrier(Block& b) {
  size_t at_barrier = 0, done = 0;
  for (const Fiber& f : b.fibers) {
    at_barrier += f.wait == Wait::kBlockBarrier;
    done += f.wait == Wait::kDone;
  }
  if (at_barrier == 0 || at_barrier + done != b.fibers.size()) return false;
  for (Fiber& f : b.fibers) {
    if (f.wait == Wait::kBlockBarrier) f.wait = Wait::kReady;
  }
  return true;
}

inline std::string describe_deadlock(const Block& b) {
  size_t counts[5] = {0, 0, 0, 0, 0};
  for (const Fiber& f : b.fibers) ++counts[static_cast<int>(f.wait)];
  return "deadlock in block (" + std::to_string(b.block_idx.x) + ", " +
         std::to_string(b.block_idx.y) + "): " + std::to_string(counts[1]) +
         " threads at __syncthreads, " + std::to_string(counts[2]) + " at a warp shuffle, " +
         std::to_string(counts[3]) + " returned";
}

// The schedule: the last warp first, each warp run as far as it can go (its shuffles released
// as soon as its 32 lanes arrive) before the next lower one starts, lanes in descending order.
// A warp thus runs ahead of the lower warps up to the next __syncthreads, so a read of shared
// memory that a missing barrier leaves unordered sees the other warps' later writes.
inline void run_block(Block& b) {
  for (Fiber& f : b.fibers) f.wait = Wait::kReady;
  const size_t n = b.fibers.size();
  const size_t warps = (n + 31) / 32;
  for (;;) {
    bool ran = false;
    for (size_t w = warps; w-- > 0;) {
      do {
        for (size_t t = std::min(n, 32 * w + 32); t-- > 32 * w;) {
          if (b.fibers[t].wait != Wait::kReady) continue;
          resume(b, t);
          if (b.fibers[t].wait == Wait::kFault) throw LaunchError(b.fault);
          ran = true;
        }
      } while (release_warp(b, w));
    }
    bool finished = true;
    for (const Fiber& f : b.fibers) finished = finished && f.wait == Wait::kDone;
    if (finished) return;
    if (!release_barrier(b) && !ran) throw LaunchError(describe_deadlock(b));
  }
}

// Runs body (one kernel call) as every thread of every block of the grid. Each launch starts
// fresh fibers, so that one stopped by a LaunchError leaves nothing behind.
inline void launch(dim3 grid, dim3 threads, const std::function<void()>& body) {
  Block& b = block();
  const size_t n = static_cast<size_t>(threads.x) * threads.y * threads.z;
  if (n == 0 || n > 1024) throw LaunchError("block of " + std::to_string(n) + " threads");
  if (n > b.stacks_allocated) {
    b.stacks.reset(new char[n * kStackBytes]);
    b.stacks_allocated = n;
  }
  b.fibers.assign(n, Fiber{});
  for (size_t t = 0; t < n; ++t) {
    Fiber& f = b.fibers[t];
    f.thread_idx =
        dim3(static_cast<unsigned>(t % threads.x), static_cast<unsigned>(t / threads.x % threads.y),
             static_cast<unsigned>(t / (static_cast<size_t>(threads.x) * threads.y)));
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = b.stacks.get() + t * kStackBytes;
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;  // fiber_main never returns
    makecontext(&f.context, fiber_main, 0);
  }
  b.grid_dim = grid;
  b.block_dim = threads;
  b.body = &body;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        b.block_idx = dim3(x, y, z);
        run_block(b);
      }
    }
  }
}

}  // namespace mk_exec

#define threadIdx (::mk_exec::this_fiber().thread_idx)
#define blockIdx (::mk_exec::block().block_idx)
#define blockDim (::mk_exec::block().block_dim)
#define gridDim (::mk_exec::block().grid_dim)

inline void __syncthreads() { ::mk_exec::park(::mk_exec::Wait::kBlockBarrier); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffled values are at most 8 bytes");
  ::mk_exec::Block& b = ::mk_exec::block();
  if (mask != 0xffffffffu) ::mk_exec::fault("__shfl_xor_sync with a partial mask");
  if (b.block_dim.x * b.block_dim.y * b.block_dim.z % 32 != 0) {
    ::mk_exec::fault("warp shuffle in a block that is not a whole number of warps");
  }
  ::mk_exec::Fiber& f = ::mk_exec::this_fiber();
  const unsigned lane = static_cast<unsigned>(b.current % 32);
  f.shuffle_value = 0;
  std::memcpy(&f.shuffle_value, &value, sizeof(T));
  f.shuffle_source = (lane ^ static_cast<unsigned>(lane_mask)) & 31u;
  ::mk_exec::park(::mk_exec::Wait::kShuffle);
  T out;
  std::memcpy(&out, &::mk_exec::this_fiber().shuffle_result, sizeof(T));
  return out;
}

// MK_LAUNCH(grid, block, stream, (args...), kernel<...>): the kernel called once per emulated
// thread; a LaunchError propagates to the caller.
#define MK_LAUNCH(grid, block, stream, args, ...)              \
  do {                                                         \
    (void)(stream);                                            \
    ::mk_exec::launch(grid, block, [&] { __VA_ARGS__ args; }); \
  } while (0)

#endif  // __CUDACC__
