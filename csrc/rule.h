// The Neptune rule (docs/rule.md, "One step"), written once: every backend calls these
// functions, so "bitwise the same on every backend" holds by construction. No torch, no
// memory traversal: callers own the loops.
//
// The per-element functions are templates over the value type V: float (the CUDA kernel,
// the CPU tails), or a CPU vector of floats (cpu/vec.h). What differs between value types
// (bit casts, select, square root, comparisons into masks) is in Lanes<V>: Lanes<float>
// here, the vectors' in cpu/vec.h. (Lanes is a class template so that specializations
// declared after this header are found when the kernels instantiate the rule.)
// The kernels must be built without FMA contraction (-ffp-contract=off, nvcc --fmad=false):
// each expression rounds as written, in the order written.
#pragma once

#include <stdint.h>
#if !defined(__CUDACC__)
#include <math.h>
#endif

// NEPTUNE_HD: a function of the rule, inlined into its caller on either side (host code has
// internal linkage: the CPU kernel sets must never share a copy built for another set).
// NEPTUNE_HD_MEMBER: the same for static member functions.
#if defined(__CUDACC__)
#define NEPTUNE_HD __host__ __device__ __forceinline__
#define NEPTUNE_HD_MEMBER __host__ __device__ __forceinline__
#define NEPTUNE_SQRTF sqrtf
#else
#define NEPTUNE_HD static inline __attribute__((always_inline))
#define NEPTUNE_HD_MEMBER inline __attribute__((always_inline))
#define NEPTUNE_SQRTF __builtin_sqrtf
#endif

namespace neptune {

// Storage types of params and grads, and of the state (float32, or bfloat16: bf16 state).
enum ParamDtype : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// Floors (docs/rule.md, "One step").
constexpr float kWNormFloor = 1e-3f;
constexpr float kGNormFloor = 1e-6f;
constexpr float kRhoFloor = 1e-3f;

// ---------------------------------------------------------------------------------------
// Value-type primitives.
template <class V> struct Lanes;

template <> struct Lanes<float> {
  using U = uint32_t;  // the bits of a value
  using Mask = bool;   // a comparison's result
  static NEPTUNE_HD_MEMBER U bits(float f) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(f);
#else
    return __builtin_bit_cast(uint32_t, f);
#endif
  }
  static NEPTUNE_HD_MEMBER float value(U u) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(u);
#else
    return __builtin_bit_cast(float, u);
#endif
  }
  static NEPTUNE_HD_MEMBER U select(bool m, U a, U b) { return m ? a : b; }
  static NEPTUNE_HD_MEMBER float sqrt(float x) { return NEPTUNE_SQRTF(x); }
  // x > 0 (ordered: NaN is not) and x != 0 (unordered: NaN is).
  static NEPTUNE_HD_MEMBER bool gt0(float x) { return x > 0.f; }
  static NEPTUNE_HD_MEMBER bool ne0(float x) { return x != 0.f; }
  static NEPTUNE_HD_MEMBER float one_if(bool m) { return m ? 1.f : 0.f; }
};

template <class V> using BitsOf = typename Lanes<V>::U;

// ---------------------------------------------------------------------------------------
// Per-tensor constants: everything one tensor's step needs, computed once per tensor per
// step, on the host (CPU operator) or on the device (CUDA kernels) by the same function.
struct StepConsts {
  float beta1, one_minus_beta1;
  float beta2, one_minus_beta2;
  // The Adam direction with the bias corrections folded into two constants, as torch's
  // AdamW does: lr * (M / bc1) / (sqrt(V / bc2) + eps)
  //       == (M * step_size) / (sqrt(V) + eps_hat), step_size = lr * sqrt(bc2) / bc1,
  //                                                  eps_hat = eps * sqrt(bc2).
  // Two multiplies per element fewer; a few ulp from the literal form, well inside the
  // tolerance (docs/rule.md, "Numerics and tolerances"). Both computed in double.
  float step_size;
  float eps_hat;
  float decay;  // 1 - lr * weight_decay
  float gmul;   // -1 if maximize, times 1/grad_scale
  float clip;   // 0 turns clipping off
  int cautious;
};

// The gradient multiplier: sign for maximize, unscaling for a GradScaler.
NEPTUNE_HD float grad_multiplier(int maximize, bool has_grad_scale, float grad_scale) {
  float gmul = maximize ? -1.f : 1.f;
  if (has_grad_scale) gmul /= grad_scale;
  return gmul;
}

NEPTUNE_HD double dmul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);  // never fused into the subtraction: the host's rounding
#else
  return a * b;
#endif
}

// t is the step number of this step (the incremented counter), in double.
NEPTUNE_HD StepConsts step_consts(double lr, double beta1, double beta2, double weight_decay, double eps,
                                  double clip, int cautious, double t, float gmul) {
  StepConsts c;
  c.beta1 = (float)beta1;
  c.one_minus_beta1 = (float)(1.0 - beta1);
  c.beta2 = (float)beta2;
  c.one_minus_beta2 = (float)(1.0 - beta2);
  const double bc1 = 1.0 - pow(beta1, t), bc2 = 1.0 - pow(beta2, t);
  const double r = sqrt(bc2);
  c.step_size = (float)(lr * r / bc1);
  const float e = (float)(eps * r);
  c.eps_hat = e > 0.f ? e : 0x1p-149f;  // eps > 0 must keep 0 / (0 + eps_hat) at 0
  c.decay = (float)(1.0 - dmul_rn(lr, weight_decay));
  c.gmul = gmul;
  c.clip = (float)clip;
  c.cautious = cautious;
  return c;
}

// ---------------------------------------------------------------------------------------
// One step, per element (V: float or a CPU vector) and per unit (float).

// The gradient as the rule sees it: sign for maximize, unscaled for a GradScaler.
template <class V> NEPTUNE_HD V grad_in(V g, const StepConsts& c) { return g * c.gmul; }
// ... and clipped with the unit's factor s.
template <class V> NEPTUNE_HD V unit_grad(V graw, float s, const StepConsts& c) { return grad_in(graw, c) * s; }

// 1. unit-wise adaptive gradient clipping factor from the unit's squared norms. A NaN
// norm (a NaN gradient in the unit) gives a NaN factor, as torch's clamp in the reference
// does, so the unit turns NaN as it would under AdamW; the comparisons are written so
// that NaN falls through them.
NEPTUNE_HD float clip_factor(float w_sq, float g_sq, float clip) {
  if (!(clip > 0.f)) return 1.f;
  float w_norm = NEPTUNE_SQRTF(w_sq), g_norm = NEPTUNE_SQRTF(g_sq);
  w_norm = w_norm < kWNormFloor ? kWNormFloor : w_norm;
  g_norm = g_norm < kGNormFloor ? kGNormFloor : g_norm;
  const float s = clip * w_norm / g_norm;
  return s > 1.f ? 1.f : s;
}

// 2. moments.
template <class V> NEPTUNE_HD V exp_avg_next(V m, V g, const StepConsts& c) {
  return c.beta1 * m + c.one_minus_beta1 * g;
}
template <class V> NEPTUNE_HD V exp_avg_sq_next(V v, V g, const StepConsts& c) {
  return c.beta2 * v + c.one_minus_beta2 * g * g;
}

// 3. cautious mask: momentum agrees with this gradient / the element got a gradient.
template <class V> NEPTUNE_HD typename Lanes<V>::Mask agrees(V m, V g) { return Lanes<V>::gt0(m * g); }
template <class V> NEPTUNE_HD typename Lanes<V>::Mask active(V g) { return Lanes<V>::ne0(g); }

// 3. max(rho, floor) from the unit's counts; 1 when the mask is off.
NEPTUNE_HD float rho_floor(int64_t n_agree, int64_t n_active, int cautious) {
  if (!cautious) return 1.f;
  const float rho = (float)n_agree / (float)(n_active > 1 ? n_active : 1);
  return rho > kRhoFloor ? rho : kRhoFloor;
}

// 2-4. The unit's step size: lr / rho with the bias corrections folded in (rho is 1 when
// the mask is off). Computed once per unit.
NEPTUNE_HD float unit_step_size(const StepConsts& c, float rho) { return c.step_size / rho; }

// 2. lr / rho times the Adam direction, from the updated moments: one sqrt, one division.
template <class V> NEPTUNE_HD V adam_delta(V m, V v, float step, const StepConsts& c) {
  return (m * step) / (Lanes<V>::sqrt(v) + c.eps_hat);
}

// 4. decoupled weight decay, then the (masked, renormalised) step. The mask multiplies
// (keep is 1 or 0), so a NaN / inf direction still reaches a masked-out element.
template <class V> NEPTUNE_HD V new_weight(V w, V delta, V keep, const StepConsts& c) {
  return w * c.decay - delta * keep;
}

// 2-4 for one element (or one vector of them) of a unit whose rule gradient g
// (unit_grad) and step size (unit_step_size) are known. Updates m, v; returns the new weight.
template <class V> NEPTUNE_HD V element_step(V w, V g, V& m, V& v, float step, const StepConsts& c) {
  m = exp_avg_next(m, g, c);
  v = exp_avg_sq_next(v, g, c);
  const V delta = adam_delta(m, v, step, c);
  const V keep = c.cautious ? Lanes<V>::one_if(agrees(m, g)) : V{} + 1.f;  // keep 1: the mask is off
  return new_weight(w, delta, keep, c);
}

// ---------------------------------------------------------------------------------------
// bf16 state (docs/rule.md, "bf16 state"): exp_avg / exp_avg_sq stored as bfloat16 with
// stochastic rounding (round-to-nearest would freeze V: 0.999 * v rounds back to v in 8
// mantissa bits). The random bits are a hash of (element index within its unit, step),
// so results are reproducible, independent of threads and devices, and a row shard rounds
// as the whole tensor does (docs/rule.md, property 5). One 32-bit hash serves both
// moments: its low half rounds exp_avg, its high half exp_avg_sq.

// The hash's key from the index's 32-bit halves (lo, hi) and the step. U: uint32_t or a
// CPU vector of them; hi may be a scalar shared by every lane (then one vector XOR).
template <class U, class H> NEPTUNE_HD U sr_key(U lo, H hi, uint32_t step) {
  return lo ^ ((hi * 0x85EBCA6Bu) ^ (step * 0x9E3779B9u));
}
// The key's mix (a 32-bit integer hash).
template <class U> NEPTUNE_HD U sr_mix(U x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}
NEPTUNE_HD uint32_t sr_hash(uint64_t index, uint32_t step) {
  return sr_mix(sr_key((uint32_t)index, (uint32_t)(index >> 32), step));
}
// The 16 rounding bits of one moment. stream: 0 for exp_avg, 1 for exp_avg_sq.
NEPTUNE_HD uint32_t sr_bits(uint64_t index, uint32_t step, uint32_t stream) {
  return (sr_hash(index, step) >> (16u * stream)) & 0xFFFFu;
}

// f rounded stochastically to bfloat16 by 16 random bits, in the upper half of the
// result (NaN not handled: bf16_round_stochastic does).
template <class V> NEPTUNE_HD BitsOf<V> bf16_stochastic_upper(V f, BitsOf<V> bits16) {
  return Lanes<V>::bits(f) + bits16;
}
// f rounded to bfloat16 up or down with probability given by the dropped bits (the low
// 16 of `bits`); NaN becomes the canonical 0x7FC0.
template <class V> NEPTUNE_HD BitsOf<V> bf16_round_stochastic(V f, BitsOf<V> bits) {
  using U = BitsOf<V>;
  return Lanes<V>::select(f != f, U{} + 0x7FC0u, bf16_stochastic_upper(f, bits & 0xFFFFu) >> 16);
}

// ---------------------------------------------------------------------------------------
// 16-bit storage, in software (hardware conversions are fast paths that must give these
// bits: tests/conversions_exhaustive.cpp). Results and arguments are 16-bit values in
// 32-bit lanes (BitsOf<V>).

// bfloat16: the upper half of a float.
template <class V> NEPTUNE_HD V bf16_bits_to_f32(BitsOf<V> b) { return Lanes<V>::value(b << 16); }

// Round to nearest even, without NaN handling (callers pick their NaN).
template <class V> NEPTUNE_HD BitsOf<V> f32_to_bf16_rn_non_nan(V f) {
  const BitsOf<V> u = Lanes<V>::bits(f);
  return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}
// Round to nearest even; NaN becomes the canonical 0x7FC0.
template <class V> NEPTUNE_HD BitsOf<V> f32_to_bf16_rn(V f) {
  using U = BitsOf<V>;
  return Lanes<V>::select(f != f, U{} + 0x7FC0u, f32_to_bf16_rn_non_nan(f));
}

// IEEE half, branch-free so loops vectorize (the FP16 library's algorithm, as in c10).
// Exact; NaN keeps its payload.
template <class V> NEPTUNE_HD V f16_bits_to_f32(BitsOf<V> h) {
  using L = Lanes<V>;
  using U = BitsOf<V>;
  const U w = h << 16;
  const U sign = w & 0x80000000u;
  const U two_w = w + w;
  const V normalized = L::value((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const V denormalized = L::value((two_w >> 17) | (126u << 23)) - 0.5f;
  const U r = L::select(two_w < (1u << 27), L::bits(denormalized), L::bits(normalized));
  return L::value(sign | r);
}
// Round to nearest even, overflow to infinity, subnormals kept; NaN becomes sign | 0x7E00.
template <class V> NEPTUNE_HD BitsOf<V> f32_to_f16_rn(V f) {
  using L = Lanes<V>;
  using U = BitsOf<V>;
  const U w = L::bits(f);
  V base = (L::value(w & 0x7FFFFFFFu) * 0x1.0p+112f) * 0x1.0p-110f;
  const U shl1_w = w + w;
  const U sign = w & 0x80000000u;
  U bias = shl1_w & 0xFF000000u;
  bias = L::select(bias < 0x71000000u, U{} + 0x71000000u, bias);
  base = L::value((bias >> 1) + 0x07800000u) + base;
  const U bits = L::bits(base);
  const U nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return (sign >> 16) | L::select(shl1_w > 0xFF000000u, U{} + 0x7E00u, nonsign);
}

}  // namespace neptune
