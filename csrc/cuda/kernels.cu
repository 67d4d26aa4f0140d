// CUDA kernels of neptune_ext::neptune_step_. Torch-free on purpose (cuda_runtime and the
// bf16/fp16 headers only), so each architecture compiles in seconds; the operator's
// validation and registration live in cuda/operator.cpp.
//
// Design (the plan is cuda/plan.h, tested on the CPU):
//  - One unit = one LayerNorm-like row. A warp (unit_len <= 2048) or a block (<= 16384)
//    walks the unit three times: W,G -> squared norms -> clip factor; G,M -> agreement /
//    active counts -> rho; W,G,M,V -> new W,M,V. Only the first touch of each array comes
//    from DRAM: the re-reads hit L1/L2, so DRAM traffic is AdamW's (read W,G,M,V; write W,M,V).
//  - Longer units are chunked: per-chunk partials (norms, then counts) are written by one
//    launch and summed in chunk order by every block of the unit in the next one.
//  - All sums are fixed-order (per-thread in index order, then xor-butterfly and shared
//    memory in warp order): no floating-point atomics, bitwise reproducible.
//  - Step counters are read (t = step + 1) by every launch and incremented by the last,
//    small launch; found_inf is read on the device and skips every launch.
#if defined(NEPTUNE_SIMT)
#include "simt/dialect.h"  // the host compiler's CUDA: this file then runs on the CPU, emulated
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
// The kernel-parameter table upload below passes 32,000 bytes of arguments: CUDA 12.1+.
#if defined(__CUDACC_VER_MAJOR__) && (__CUDACC_VER_MAJOR__ < 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ < 1))
#error "neptune_ext's CUDA kernels need CUDA 12.1 or newer (32 KB kernel parameters); set CUDA_HOME to a newer toolkit"
#endif
// Every launch and every static shared array go through these macros, so that the SIMT
// emulator can supply its own.
#define NEPTUNE_LAUNCH(kernel, grid, block, stream, ...) kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#define NEPTUNE_SHARED(T, name, n) __shared__ T name[n]
#endif
#include <limits.h>
#include <string.h>

#include "cuda/layout.h"
#include "rule.h"

namespace neptune {
namespace {

using namespace cuda_plan;

template <int D> struct Elem;
template <> struct Elem<kF32> {
  using T = float;
  static __device__ __forceinline__ float load(T x) { return x; }
  static __device__ __forceinline__ T store(float f) { return f; }
};
template <> struct Elem<kBF16> {
  using T = uint16_t;
  static __device__ __forceinline__ float load(T x) { return bf16_bits_to_f32<float>(x); }
  static __device__ __forceinline__ T store(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
};
template <> struct Elem<kF16> {
  using T = uint16_t;
  static __device__ __forceinline__ float load(T x) { return __half2float(__ushort_as_half(x)); }
  static __device__ __forceinline__ T store(float f) { return __half_as_ushort(__float2half_rn(f)); }
};

// 16-byte vectors of VEC elements: 4 while every array is fp32, else 8 (bf16/fp16 params or
// bf16 state); an array of fp32 takes VEC/4 16-byte accesses, one of 16-bit elements VEC/8.
template <int D, int S> struct Vec {
  static constexpr int N = (sizeof(typename Elem<D>::T) == 4 && sizeof(typename Elem<S>::T) == 4) ? 4 : 8;
};

template <int D, int N>
__device__ __forceinline__ void load_vec(const typename Elem<D>::T* p, float* out) {
  if constexpr (D == kF32) {
#pragma unroll
    for (int k = 0; k < N / 4; ++k) {
      const float4 q = reinterpret_cast<const float4*>(p)[k];
      out[4 * k] = q.x; out[4 * k + 1] = q.y; out[4 * k + 2] = q.z; out[4 * k + 3] = q.w;
    }
  } else {
#pragma unroll
    for (int k = 0; k < N / 8; ++k) {
      const uint4 q = reinterpret_cast<const uint4*>(p)[k];
      const uint32_t words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {  // little endian: element 2j in the low half
        out[8 * k + 2 * j] = Elem<D>::load((uint16_t)(words[j] & 0xFFFFu));
        out[8 * k + 2 * j + 1] = Elem<D>::load((uint16_t)(words[j] >> 16));
      }
    }
  }
}

// Round to nearest (params, fp32 state).
template <int D, int N>
__device__ __forceinline__ void store_vec(typename Elem<D>::T* p, const float* in) {
  if constexpr (D == kF32) {
#pragma unroll
    for (int k = 0; k < N / 4; ++k)
      reinterpret_cast<float4*>(p)[k] = make_float4(in[4 * k], in[4 * k + 1], in[4 * k + 2], in[4 * k + 3]);
  } else {
#pragma unroll
    for (int k = 0; k < N / 8; ++k) {
      uint32_t words[4];
#pragma unroll
      for (int j = 0; j < 4; ++j)
        words[j] = (uint32_t)Elem<D>::store(in[8 * k + 2 * j]) | ((uint32_t)Elem<D>::store(in[8 * k + 2 * j + 1]) << 16);
      reinterpret_cast<uint4*>(p)[k] = make_uint4(words[0], words[1], words[2], words[3]);
    }
  }
}

// exp_avg / exp_avg_sq store of N elements (1: scalar, else a vector) whose first one is
// element `index` of its unit: fp32 as is, bf16 stochastically rounded exactly as the CPU
// operator and the reference do (bits from sr_bits(index within the unit, step t, stream)).
template <int S, int N>
__device__ __forceinline__ void store_state(typename Elem<S>::T* p, const float* in, int64_t index, uint32_t step,
                                            uint32_t stream) {
  if constexpr (S == kF32) {
    if constexpr (N == 1)
      *p = in[0];
    else
      store_vec<kF32, N>(p, in);
  } else {
    static_assert(S == kBF16, "state is float32 or bfloat16");
    auto sr = [&](int j) -> uint32_t {
      return (uint32_t)bf16_round_stochastic(in[j], sr_bits((uint64_t)(index + j), step, stream));
    };
    if constexpr (N == 1) {
      *p = (uint16_t)sr(0);
    } else {
#pragma unroll
      for (int k = 0; k < N / 8; ++k) {
        uint32_t words[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) words[j] = sr(8 * k + 2 * j) | (sr(8 * k + 2 * j + 1) << 16);
        reinterpret_cast<uint4*>(p)[k] = make_uint4(words[0], words[1], words[2], words[3]);
      }
    }
  }
}

// The step number t = step + 1 of this step (the counter is incremented by the last launch):
// the bias corrections' t, and as uint32 the stochastic rounding's step, as on the CPU.
__device__ __forceinline__ float next_step(const DevTensor& t) { return *t.step + 1.f; }

// Which arrays a pass reads and writes.
enum : int { kLdW = 1, kLdG = 2, kLdM = 4, kLdV = 8, kStW = 16, kStMV = 32 };

// Elements [b, b + n) of one tensor (within one unit), strided over `nthr` threads: a scalar
// head up to the 16-byte boundary of the array with the narrowest elements (the strictest
// alignment in elements), VEC-element vectors while all four arrays are 16-byte aligned at
// the same element, a scalar tail (all scalar when the arrays' alignments differ). fn(w, g,
// m, v) gets float arrays of 1 or VEC elements, in place. D: param / grad type, S: state
// type. The split depends on addresses only: deterministic.
template <int D, int S, int F, class Fn>
__device__ __forceinline__ void traverse(const DevTensor& t, int64_t b, int64_t n, int64_t uoff, int tid, int nthr,
                                         Fn&& fn) {
  using T = typename Elem<D>::T;
  using ST = typename Elem<S>::T;
  constexpr int VEC = Vec<D, S>::N;
  T* w = static_cast<T*>(t.w) + b;
  const T* g = static_cast<const T*>(t.g) + b;
  ST* m = static_cast<ST*>(t.m) + b;
  ST* v = static_cast<ST*>(t.v) + b;
  const uintptr_t lead = sizeof(ST) < sizeof(T) ? (uintptr_t)m : (uintptr_t)w;
  constexpr uint32_t lead_size = sizeof(ST) < sizeof(T) ? (uint32_t)sizeof(ST) : (uint32_t)sizeof(T);
  int64_t h = (int64_t)(((16u - ((uint32_t)lead & 15u)) & 15u) / lead_size);
  if (h > n) h = n;
  // The lead array is aligned at element h by construction; each other one must be too.
  if ((((uintptr_t)(w + h) | (uintptr_t)(g + h) | (uintptr_t)(m + h) | (uintptr_t)(v + h)) & 15u) != 0) h = n;
  const int64_t nv = (n - h) / VEC;
  const int64_t tail = h + nv * VEC;
  // bf16 state stores: element b + i is element uoff + i of its unit (units are spans).
  uint32_t sr_step = 0;
  if constexpr (S == kBF16 && (F & kStMV) != 0) sr_step = (uint32_t)next_step(t);

  auto scalar = [&](int64_t i) {
    float wf[1], gf[1], mf[1], vf[1];
    if (F & kLdW) wf[0] = Elem<D>::load(w[i]);
    if (F & kLdG) gf[0] = Elem<D>::load(g[i]);
    if (F & kLdM) mf[0] = Elem<S>::load(m[i]);
    if (F & kLdV) vf[0] = Elem<S>::load(v[i]);
    fn(wf, gf, mf, vf);
    if (F & kStW) w[i] = Elem<D>::store(wf[0]);
    if (F & kStMV) {
      store_state<S, 1>(m + i, mf, uoff + i, sr_step, 0);
      store_state<S, 1>(v + i, vf, uoff + i, sr_step, 1);
    }
  };
  for (int64_t i = tid; i < h; i += nthr) scalar(i);
  // Unrolled twice only for 4-element vectors (all fp32): 8-element ones (16-bit params or
  // state) hold twice the data, and unrolled they spill under the 80-register bound of
  // __launch_bounds__(256, 3), as do the bf16 state's rounding hashes.
#pragma unroll((S == kBF16 || VEC == 8) ? 1 : 2)
  for (int64_t k = tid; k < nv; k += nthr) {
    const int64_t i = h + k * VEC;
    float wf[VEC], gf[VEC], mf[VEC], vf[VEC];
    if (F & kLdW) load_vec<D, VEC>(w + i, wf);
    if (F & kLdG) load_vec<D, VEC>(g + i, gf);
    if (F & kLdM) load_vec<S, VEC>(m + i, mf);
    if (F & kLdV) load_vec<S, VEC>(v + i, vf);
    fn(wf, gf, mf, vf);
    if (F & kStW) store_vec<D, VEC>(w + i, wf);
    if (F & kStMV) {
      store_state<S, VEC>(m + i, mf, uoff + i, sr_step, 0);
      store_state<S, VEC>(v + i, vf, uoff + i, sr_step, 1);
    }
  }
  for (int64_t i = tail + tid; i < n; i += nthr) scalar(i);
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;  // the butterfly leaves the same value in every lane (addition commutes)
}
__device__ __forceinline__ unsigned long long warp_sum(unsigned long long x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Sum of a pair over the group (a warp, or the whole block), same value in every thread.
template <bool BLOCK, class V>
__device__ __forceinline__ void group_sum2(V& a, V& b) {
  a = warp_sum(a);
  b = warp_sum(b);
  if constexpr (BLOCK) {
    NEPTUNE_SHARED(V, sa, kWarpsPerBlock);
    NEPTUNE_SHARED(V, sb, kWarpsPerBlock);
    const int warp = threadIdx.x / kWarpSize;
    if ((threadIdx.x % kWarpSize) == 0) {
      sa[warp] = a;
      sb[warp] = b;
    }
    __syncthreads();
    a = sa[0];
    b = sb[0];
#pragma unroll
    for (int k = 1; k < kWarpsPerBlock; ++k) {  // every thread, same order
      a += sa[k];
      b += sb[k];
    }
    __syncthreads();  // before the next reduction reuses the buffers
  }
}

// rule.h's step_consts from the kernel arguments (lr, grad_scale and the counter on the device).
// Called before the tensor's DevTensor is loaded: its two pow() calls are real calls, and a
// DevTensor live across them would not fit the registers beside them (spills).
__device__ __forceinline__ StepConsts tensor_consts(const StepArgs& a, const float* step) {
  const float tf = *step + 1.f;  // t = step + 1, as next_step; the CPU op increments the float counter, then widens
  const double lr = a.lr_f32 != nullptr ? (double)*a.lr_f32 : (a.lr_f64 != nullptr ? *a.lr_f64 : a.lr);
  const float gmul = grad_multiplier(a.maximize, a.grad_scale != nullptr, a.grad_scale != nullptr ? *a.grad_scale : 1.f);
  return step_consts(lr, a.beta1, a.beta2, a.weight_decay, a.eps, a.clip, a.cautious, (double)tf, gmul);
}


// Number of float elements of an array passed by reference (1 or VEC): a constant.
#define NEPTUNE_LEN(arr) ((int)(sizeof(arr) / sizeof(float)))

// 1. squared norms of W and of the rule's gradient over [b, b + n), summed over the group.
template <int D, int S, bool BLOCK>
__device__ __forceinline__ void group_norms(const DevTensor& t, const StepConsts& c, int64_t b, int64_t n, int tid,
                                            float& w_sq, float& g_sq) {
  constexpr int NTHR = BLOCK ? kThreads : kWarpSize;
  float ws = 0.f, gs = 0.f;
  traverse<D, S, kLdW | kLdG>(t, b, n, 0, tid, NTHR, [&](auto& wf, auto& gf, auto&, auto&) {
#pragma unroll
    for (int j = 0; j < NEPTUNE_LEN(wf); ++j) {
      const float x = wf[j];
      const float y = grad_in(gf[j], c);
      ws += x * x;
      gs += y * y;
    }
  });
  group_sum2<BLOCK>(ws, gs);
  w_sq = ws;
  g_sq = gs;
}

// 3. agreement / activity counts over [b, b + n) for clip factor s, without writing: the
// moment is computed exactly as the update pass computes it.
template <int D, int S, bool BLOCK>
__device__ __forceinline__ void group_counts(const DevTensor& t, const StepConsts& c, float s, int64_t b, int64_t n,
                                             int tid, unsigned long long& n_agree, unsigned long long& n_active) {
  constexpr int NTHR = BLOCK ? kThreads : kWarpSize;
  uint32_t ca = 0, cb = 0;  // per thread: at most a chunk / kThreads elements
  traverse<D, S, kLdG | kLdM>(t, b, n, 0, tid, NTHR, [&](auto&, auto& gf, auto& mf, auto&) {
#pragma unroll
    for (int j = 0; j < NEPTUNE_LEN(gf); ++j) {
      const float g = unit_grad(gf[j], s, c);
      const float m = exp_avg_next(mf[j], g, c);
      ca += (uint32_t)agrees(m, g);
      cb += (uint32_t)active(g);
    }
  });
  unsigned long long a = ca, bb = cb;
  group_sum2<BLOCK>(a, bb);
  n_agree = a;
  n_active = bb;
}

// 2-4. moments, direction, mask, decay and step: the one pass that writes. Element b is
// element uoff of its unit (the stochastic rounding of bf16 state follows the unit index).
template <int D, int S, bool BLOCK>
__device__ __forceinline__ void group_update(const DevTensor& t, const StepConsts& c, float s, float rho, int64_t b,
                                             int64_t n, int64_t uoff, int tid) {
  constexpr int NTHR = BLOCK ? kThreads : kWarpSize;
  const float step = unit_step_size(c, rho);
  traverse<D, S, kLdW | kLdG | kLdM | kLdV | kStW | kStMV>(t, b, n, uoff, tid, NTHR,
                                                            [&](auto& wf, auto& gf, auto& mf, auto& vf) {
#pragma unroll
    for (int j = 0; j < NEPTUNE_LEN(wf); ++j) wf[j] = element_step(wf[j], unit_grad(gf[j], s, c), mf[j], vf[j], step, c);
  });
}

// A whole unit [b, b + n) by one warp (BLOCK = false, tid = lane) or one block.
template <int D, int S, bool BLOCK>
__device__ __forceinline__ void unit_step(const DevTensor& t, const StepConsts& c, int64_t b, int64_t n, int tid) {
  float s = 1.f;
  if (c.clip > 0.f) {
    float w_sq, g_sq;
    group_norms<D, S, BLOCK>(t, c, b, n, tid, w_sq, g_sq);
    s = clip_factor(w_sq, g_sq, c.clip);
  }
  float rho = 1.f;
  if (c.cautious) {
    unsigned long long n_agree, n_active;
    group_counts<D, S, BLOCK>(t, c, s, b, n, tid, n_agree, n_active);
    rho = rho_floor((int64_t)n_agree, (int64_t)n_active, 1);
  }
  group_update<D, S, BLOCK>(t, c, s, rho, b, n, 0, tid);  // b starts the unit
}

// One chunk of a long unit in the given role. Partials of the unit's chunks are summed in
// chunk order (per thread, then the fixed block sum): every chunk block gets the same s, rho.
template <int D, int S>
__device__ __forceinline__ void chunk_step(const StepArgs& a, const DevTensor& t, const StepConsts& c, const Work& w,
                                           int role) {
  const int tid = threadIdx.x;
  const int64_t b = w.elem_begin, n = w.elem_end - w.elem_begin;
  if (role == kRoleNorm) {
    float w_sq, g_sq;
    group_norms<D, S, true>(t, c, b, n, tid, w_sq, g_sq);
    if (tid == 0) {
      a.norm_partials[2 * w.long_index] = w_sq;
      a.norm_partials[2 * w.long_index + 1] = g_sq;
    }
    return;
  }
  float s = 1.f;
  if (c.clip > 0.f) {
    float w_sq = 0.f, g_sq = 0.f;
    for (int64_t k = tid; k < w.chunks; k += kThreads) {
      w_sq += a.norm_partials[2 * (w.unit_long_begin + k)];
      g_sq += a.norm_partials[2 * (w.unit_long_begin + k) + 1];
    }
    group_sum2<true>(w_sq, g_sq);
    s = clip_factor(w_sq, g_sq, c.clip);
  }
  if (role == kRoleCount) {
    unsigned long long n_agree, n_active;
    group_counts<D, S, true>(t, c, s, b, n, tid, n_agree, n_active);
    if (tid == 0) {
      a.count_partials[2 * w.long_index] = n_agree;
      a.count_partials[2 * w.long_index + 1] = n_active;
    }
    return;
  }
  float rho = 1.f;
  if (c.cautious) {
    unsigned long long n_agree = 0, n_active = 0;
    for (int64_t k = tid; k < w.chunks; k += kThreads) {
      n_agree += a.count_partials[2 * (w.unit_long_begin + k)];
      n_active += a.count_partials[2 * (w.unit_long_begin + k) + 1];
    }
    group_sum2<true>(n_agree, n_active);
    rho = rho_floor((int64_t)n_agree, (int64_t)n_active, 1);
  }
  group_update<D, S, true>(t, c, s, rho, b, n, b - w.unit * t.plan.unit_len, tid);
}

// Runs the statement (which names template arguments D and S) for the tensor's param dtype
// D and state dtype S: 3 x 2 instantiations, one branch per tensor (uniform in the group).
#define NEPTUNE_DISPATCH_D(t, ...)                         \
  switch ((t).dtype) {                                     \
    case kBF16: { constexpr int D = kBF16; __VA_ARGS__; } break; \
    case kF16: { constexpr int D = kF16; __VA_ARGS__; } break;   \
    default: { constexpr int D = kF32; __VA_ARGS__; } break;     \
  }
// In kernels with BF16_STATE false (no tensor has bf16 state) the bf16-state paths are not
// instantiated at all, so they cannot raise the kernel's register use.
#define NEPTUNE_DISPATCH(t, ...)                           \
  do {                                                     \
    bool bf16_state_ = false;                              \
    if constexpr (BF16_STATE) bf16_state_ = (t).state_dtype == kBF16; \
    if (bf16_state_) {                                     \
      if constexpr (BF16_STATE) {                          \
        constexpr int S = kBF16;                           \
        NEPTUNE_DISPATCH_D(t, __VA_ARGS__)                 \
      }                                                    \
    } else {                                               \
      constexpr int S = kF32;                              \
      NEPTUNE_DISPATCH_D(t, __VA_ARGS__)                   \
    }                                                      \
  } while (0)

__device__ __forceinline__ bool skip_step(const StepArgs& a) { return a.found_inf != nullptr && *a.found_inf != 0.f; }

// The main launch: warp units (several per block, of any tensors), block units, and the
// first role of every chunk.
template <bool BF16_STATE>
__global__ void __launch_bounds__(kThreads, 3) neptune_main_kernel(const StepArgs a, int32_t chunk_role) {
  if (skip_step(a)) return;
  const int64_t s0 = (int64_t)blockIdx.x * kWarpsPerBlock;
  const int64_t i0 = find_owner(a.slot_begins, a.n_tensors, s0);
  const Work w0 = slot_work(a.tensors[i0].plan, s0);
  if (w0.valid && w0.kind != kWarpUnit) {  // the whole block: uniform branch
    const StepConsts c = tensor_consts(a, a.tensors[i0].step);
    const DevTensor t = a.tensors[i0];
    const int64_t n = w0.elem_end - w0.elem_begin;
    if (w0.kind == kBlockUnit) {
      NEPTUNE_DISPATCH(t, unit_step<D, S, true>(t, c, w0.elem_begin, n, threadIdx.x));
    } else {
      NEPTUNE_DISPATCH(t, chunk_step<D, S>(a, t, c, w0, chunk_role));
    }
    return;
  }
  // Warp units: each warp on its own (no block-wide synchronisation below).
  const int64_t slot = s0 + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t i = find_owner(a.slot_begins, a.n_tensors, slot);
  const Work w = slot_work(a.tensors[i].plan, slot);
  if (!w.valid || w.kind != kWarpUnit) return;
  const StepConsts c = tensor_consts(a, a.tensors[i].step);
  const DevTensor t = a.tensors[i];
  const int64_t n = w.elem_end - w.elem_begin;
  NEPTUNE_DISPATCH(t, unit_step<D, S, false>(t, c, w.elem_begin, n, lane));
}

// A later role of every chunk: one block per chunk, over long space.
template <bool BF16_STATE>
__global__ void __launch_bounds__(kThreads, 4) neptune_long_kernel(const StepArgs a, int32_t role) {
  if (skip_step(a)) return;
  const int64_t lb = blockIdx.x;
  const int64_t i = find_owner(a.long_begins, a.n_tensors, lb);
  const Work w = long_work(a.tensors[i].plan, lb);
  if (!w.valid) return;
  const StepConsts c = tensor_consts(a, a.tensors[i].step);
  const DevTensor t = a.tensors[i];
  NEPTUNE_DISPATCH(t, chunk_step<D, S>(a, t, c, w, role));
}

// Last: every tensor's step counter (zero-size tensors included), unless found_inf.
__global__ void __launch_bounds__(kStepsThreads) neptune_steps_kernel(const StepArgs a) {
  if (skip_step(a)) return;
  const int64_t i = (int64_t)blockIdx.x * kStepsThreads + threadIdx.x;
  if (i < a.n_tensors) *a.tensors[i].step += 1.f;
}

// Table upload through kernel arguments (CUDA 12.1+ allows 32764 bytes of them on sm_70+).
constexpr int kUploadBytes = 32000;
struct UploadArgs {
  unsigned char* dst;
  int32_t n;
  unsigned char bytes[kUploadBytes];
};

__global__ void __launch_bounds__(256) neptune_upload_kernel(const __grid_constant__ UploadArgs u) {
  for (int32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < u.n; i += gridDim.x * blockDim.x) u.dst[i] = u.bytes[i];
}

}  // namespace

cudaError_t neptune_cuda_upload(void* dst, const void* src, int64_t bytes, cudaStream_t stream, int* launches) {
  static UploadArgs u;  // 32 KB: not on the caller's stack; callers hold a lock
  int count = 0;
  for (int64_t off = 0; off < bytes; off += kUploadBytes) {
    const int64_t nb = bytes - off < kUploadBytes ? bytes - off : kUploadBytes;
    u.dst = static_cast<unsigned char*>(dst) + off;
    u.n = (int32_t)nb;
    memcpy(u.bytes, static_cast<const unsigned char*>(src) + off, (size_t)nb);
    NEPTUNE_LAUNCH(neptune_upload_kernel, (unsigned)((nb + 255) / 256), 256, stream, u);
    ++count;
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) {
      if (launches) *launches = count;
      return err;
    }
  }
  if (launches) *launches = count;
  return cudaSuccess;
}

cudaError_t neptune_cuda_step(const StepArgs& args, int64_t main_blocks, int64_t long_blocks, cudaStream_t stream) {
  Launch seq[4];
  const int nl = launch_sequence(main_blocks, long_blocks, args.n_tensors, (float)args.clip > 0.f ? 1 : 0,
                                 args.cautious ? 1 : 0, seq);
  for (int k = 0; k < nl; ++k) {
    if (seq[k].blocks > INT_MAX) return cudaErrorInvalidConfiguration;
    const unsigned grid = (unsigned)seq[k].blocks;
    switch (seq[k].kind) {
      case kLaunchMain:
        if (args.bf16_state)
          NEPTUNE_LAUNCH(neptune_main_kernel<true>, grid, kThreads, stream, args, seq[k].role);
        else
          NEPTUNE_LAUNCH(neptune_main_kernel<false>, grid, kThreads, stream, args, seq[k].role);
        break;
      case kLaunchLong:
        if (args.bf16_state)
          NEPTUNE_LAUNCH(neptune_long_kernel<true>, grid, kThreads, stream, args, seq[k].role);
        else
          NEPTUNE_LAUNCH(neptune_long_kernel<false>, grid, kThreads, stream, args, seq[k].role);
        break;
      default: NEPTUNE_LAUNCH(neptune_steps_kernel, grid, kStepsThreads, stream, args); break;
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace neptune
