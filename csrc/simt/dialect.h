// The CUDA dialect for the host compiler: what csrc/cuda/kernels.cu uses of CUDA, and
// nothing more, so that the unchanged kernel source compiles with g++/clang (-x c++) and
// runs on the CPU under the SIMT emulator (scheduler.cpp). A kernel that starts using
// another CUDA feature (atomics, __ldg, cooperative groups, ...) fails to compile here
// until the emulator supports it.
//
// Execution model: every CUDA thread is a fiber that runs until __syncthreads, a shuffle
// or its end; the scheduler releases a shuffle when all lanes of its mask wait at the same
// call site and a barrier when all threads of the block wait at the same barrier, and
// reports anything else as a kernel bug (file and line). Blocks run one at a time; static
// __shared__ memory is one section, poisoned (0xFF bytes) before every block.
#pragma once

#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <tuple>
#include <type_traits>
#include <utility>

#include "rule.h"
#include "simt/runtime_api.h"

#pragma GCC diagnostic ignored "-Wunknown-pragmas"  // #pragma unroll is nvcc's

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __grid_constant__
// Static shared memory is declared with NEPTUNE_SHARED(T, name, n) (nvcc: __shared__ T name[n]):
// here each declaration gets n elements of a per-block arena, the same for every thread of
// the block, one per template instance (as a __shared__ variable), poisoned (0xFF bytes)
// before every block. A plain __shared__ declaration cannot be found to be poisoned by the
// host compiler (GCC drops section attributes on template statics), so it is refused.
#define __shared__ _Pragma("GCC error \"declare shared memory with NEPTUNE_SHARED(T, name, n) for the SIMT emulator\"")
#define NEPTUNE_SHARED(T, name, n) \
  static char name##_simt_key_;    \
  T* const name = static_cast<T*>(::simt::shared_array(&name##_simt_key_, sizeof(T) * (size_t)(n), alignof(T)))

namespace simt __attribute__((visibility("hidden"))) {

struct uint3 {
  unsigned int x, y, z;
};

// Built-in variables of the running (emulated) thread.
const uint3& thread_idx();
const uint3& block_idx();
const uint3& block_dim();
const uint3& grid_dim();

// Not inlined: each takes its call site from its own return address, so that two inlined
// copies of one source line count as two sites.
__attribute__((noinline)) void syncthreads(const char* file, int line);
__attribute__((noinline)) uint64_t shfl_xor(unsigned mask, uint64_t bits, int lane_mask, const char* file, int line);

// A 16-byte vector access must be 16-byte aligned (CUDA faults otherwise; x86 would not).
void check_vector_access(const void* p, const char* what, const char* file, int line);

template <class T>
inline T shfl_xor_typed(unsigned mask, T value, int lane_mask, const char* file, int line) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "__shfl_xor_sync: 32- or 64-bit values");
  uint64_t bits = 0;
  memcpy(&bits, &value, sizeof(T));
  bits = shfl_xor(mask, bits, lane_mask, file, line);
  T out;
  memcpy(&out, &bits, sizeof(T));
  return out;
}

// The calling block's shared array for declaration `key`: allocated in the block's arena on
// first use (48 KB in all, as CUDA's static shared memory).
void* shared_array(const void* key, size_t bytes, size_t align);

// Runs run(closure) as `grid` blocks of `block` threads; synchronous. Sets the last error
// (cudaErrorInvalidConfiguration) for a bad configuration, throws std::runtime_error for a
// kernel bug.
void launch(const char* kernel, const char* file, int line, int64_t grid, int64_t block, void (*run)(void*),
            void* closure);

// A kernel launch: the arguments are converted to the kernel's parameter types and copied
// once, at the launch (as CUDA does); every thread then gets its own copy of them.
template <class... P, class... A>
inline void launch_kernel(const char* name, const char* file, int line, int64_t grid, int64_t block,
                          void (*kernel)(P...), A&&... args) {
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  auto run = [&]() { std::apply(kernel, params); };
  launch(name, file, line, grid, block, [](void* c) { (*static_cast<decltype(run)*>(c))(); }, &run);
}

inline uint32_t bits_of(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
inline float float_of(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

}  // namespace simt

#define threadIdx (::simt::thread_idx())
#define blockIdx (::simt::block_idx())
#define blockDim (::simt::block_dim())
#define gridDim (::simt::grid_dim())
#define __syncthreads() ::simt::syncthreads(__FILE__, __LINE__)
#define __shfl_xor_sync(mask, value, lane_mask) ::simt::shfl_xor_typed((mask), (value), (lane_mask), __FILE__, __LINE__)

// kernel<<<grid, block, 0, stream>>>(args...); the stream is ignored (launches are synchronous).
#define NEPTUNE_LAUNCH(kernel, grid, block, stream, ...) \
  ::simt::launch_kernel(#kernel, __FILE__, __LINE__, (int64_t)(grid), (int64_t)(block), &kernel, __VA_ARGS__)

// 16-byte vectors. Copying one from memory (a load) or assigning one to memory (a store)
// checks the alignment; the bytes move by memcpy (no aliasing assumptions).
#define SIMT_VECTOR4(name, T)                                                                      \
  struct alignas(16) name {                                                                        \
    T x, y, z, w;                                                                                  \
    name() = default;                                                                              \
    name(T a, T b, T c, T d) : x(a), y(b), z(c), w(d) {}                                           \
    name(const name& o, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {       \
      ::simt::check_vector_access(&o, "load", file, line);                                         \
      memcpy(static_cast<void*>(this), static_cast<const void*>(&o), 16);                          \
    }                                                                                              \
    name& operator=(const name& o) {                                                               \
      ::simt::check_vector_access(this, "store", nullptr, 0);                                      \
      memcpy(static_cast<void*>(this), static_cast<const void*>(&o), 16);                          \
      return *this;                                                                                \
    }                                                                                              \
  };                                                                                               \
  static inline name make_##name(T a, T b, T c, T d) { return name(a, b, c, d); }
SIMT_VECTOR4(float4, float)
SIMT_VECTOR4(uint4, unsigned int)
#undef SIMT_VECTOR4

static inline float __uint_as_float(unsigned int u) { return simt::float_of(u); }
static inline unsigned int __float_as_uint(float f) { return simt::bits_of(f); }
static inline double __dmul_rn(double a, double b) { return a * b; }  // one rounding, never fused

// bfloat16 and half, bit-exact with the device instructions (cvt.rn.*): rule.h's software
// conversions (round to nearest even, overflow to infinity, half keeps subnormals), with
// NaN to the canonical 0x7FFF as the device gives it.
struct __nv_bfloat16 {
  unsigned short x;
};
struct __half {
  unsigned short x;
};
static inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.x; }
static inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  if (f != f) return __nv_bfloat16{0x7FFFu};
  return __nv_bfloat16{(unsigned short)neptune::f32_to_bf16_rn_non_nan(f)};
}
static inline __half __ushort_as_half(unsigned short x) { return __half{x}; }
static inline unsigned short __half_as_ushort(__half h) { return h.x; }
static inline float __half2float(__half h) { return neptune::f16_bits_to_f32<float>(h.x); }
static inline __half __float2half_rn(float f) {
  if (f != f) return __half{0x7FFFu};
  return __half{(unsigned short)neptune::f32_to_f16_rn(f)};
}
