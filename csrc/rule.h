// The Neptune rule (shared/NEPTUNE_SPEC.md) as register-level functions, shared by the
// CPU and CUDA kernels. No torch, no memory traversal: callers own the loops.
// Each function mirrors one line of the spec so that the kernels read like it.
#pragma once

#include <stdint.h>
#if !defined(__CUDACC__)
#include <math.h>
#endif

#if defined(__CUDACC__)
#define NEPTUNE_HD __host__ __device__ __forceinline__
#define NEPTUNE_SQRTF sqrtf
#else
#define NEPTUNE_HD static inline __attribute__((always_inline))
#define NEPTUNE_SQRTF __builtin_sqrtf
#endif

namespace neptune {

// Storage types of params and grads (and of the state: float32, or bfloat16 in the
// memory-lean variant).
enum ParamDtype : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// Floors from the spec.
constexpr float kWNormFloor = 1e-3f;
constexpr float kGNormFloor = 1e-6f;
constexpr float kRhoFloor = 1e-3f;

NEPTUNE_HD float fmax_(float a, float b) { return a > b ? a : b; }

// Everything one tensor's step needs, computed once per tensor per step.
struct StepConsts {
  float beta1, one_minus_beta1;
  float beta2, one_minus_beta2;
  // The Adam direction with the bias corrections folded into two constants, as torch's
  // AdamW does: lr * (M / bc1) / (sqrt(V / bc2) + eps)
  //       == (M * step_size) / (sqrt(V) + eps_hat), step_size = lr * sqrt(bc2) / bc1,
  //                                                  eps_hat = eps * sqrt(bc2).
  // Two multiplies per element fewer; a few ulp from the spec's literal form, well inside
  // its tolerance. Both computed in double by fold_bias_corrections.
  float step_size;
  float eps_hat;
  float decay;           // 1 - lr * weight_decay
  float gmul;            // -1 if maximize, times 1/grad_scale
  float clip;            // 0 turns clipping off
  int cautious;
};

// Gradient as the rule sees it: sign for maximize, unscaled for a GradScaler.
NEPTUNE_HD float grad_in(float g, const StepConsts& c) { return g * c.gmul; }

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

// 2. moments, in place.
NEPTUNE_HD void update_moments(float g, float& m, float& v, const StepConsts& c) {
  m = c.beta1 * m + c.one_minus_beta1 * g;
  v = c.beta2 * v + c.one_minus_beta2 * g * g;
}

// Per-tensor: step_size and eps_hat from lr, eps and the bias corrections 1 - beta^t (in
// double, so host and device agree to the float rounding).
NEPTUNE_HD void fold_bias_corrections(StepConsts& c, double lr, double eps, double bc1, double bc2) {
  const double r = sqrt(bc2);
  c.step_size = (float)(lr * r / bc1);
  const float e = (float)(eps * r);
  c.eps_hat = e > 0.f ? e : 0x1p-149f;  // eps > 0 must keep 0 / (0 + eps_hat) at 0
}

// 3. cautious mask: momentum agrees with this gradient / the element got a gradient.
NEPTUNE_HD int agrees(float m, float g) { return m * g > 0.f; }
NEPTUNE_HD int active(float g) { return g != 0.f; }

// 3. max(rho, floor) from the unit's counts; 1 when the mask is off.
NEPTUNE_HD float rho_floor(int64_t n_agree, int64_t n_active, int cautious) {
  if (!cautious) return 1.f;
  const float rho = (float)n_agree / (float)(n_active > 1 ? n_active : 1);
  return fmax_(rho, kRhoFloor);
}

// 2-4. The unit's step size: lr / rho with the bias corrections folded in (rho is 1 when
// the mask is off). Computed once per unit.
NEPTUNE_HD float unit_step_size(const StepConsts& c, float rho) { return c.step_size / rho; }

// 2. lr / rho times the Adam direction, from the updated moments: one sqrt, one division.
NEPTUNE_HD float adam_delta(float m, float v, float step, const StepConsts& c) {
  return (m * step) / (NEPTUNE_SQRTF(v) + c.eps_hat);
}

// 4. decoupled weight decay, then the (masked, renormalised) step. The mask multiplies,
// as in the spec (U * C), so a NaN / inf direction still reaches a masked-out element.
NEPTUNE_HD float new_weight(float w, float delta, int keep, const StepConsts& c) {
  return w * c.decay - delta * (float)keep;
}

// Whole element, for a unit whose clip factor s and step size (unit_step_size) are known:
// g is the raw gradient value (already converted to float). Updates m, v; returns the new weight.
NEPTUNE_HD float element_step(float w, float graw, float& m, float& v, float s, float step,
                              const StepConsts& c) {
  const float g = grad_in(graw, c) * s;
  update_moments(g, m, v, c);
  const float delta = adam_delta(m, v, step, c);
  const int keep = c.cautious ? agrees(m, g) : 1;
  return new_weight(w, delta, keep, c);
}

// Memory-lean variant: exp_avg / exp_avg_sq stored as bfloat16 with stochastic rounding
// (round-to-nearest would freeze V: 0.999 * v rounds back to v in 8 mantissa bits). The
// random bits are a hash of (element index within its unit, step), so results are
// reproducible, independent of threads and devices, and a row shard rounds as the whole
// tensor does. One 32-bit hash serves both moments: its low half rounds exp_avg, its high
// half exp_avg_sq, so a kernel hashes once per element.
NEPTUNE_HD uint32_t sr_hash(uint64_t index, uint32_t step) {
  uint32_t x = (uint32_t)index ^ ((uint32_t)(index >> 32) * 0x85EBCA6Bu) ^ (step * 0x9E3779B9u);
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// The 16 rounding bits of one moment. stream: 0 for exp_avg, 1 for exp_avg_sq.
NEPTUNE_HD uint32_t sr_bits(uint64_t index, uint32_t step, uint32_t stream) {
  return (sr_hash(index, step) >> (16u * stream)) & 0xFFFFu;
}

NEPTUNE_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  return __builtin_bit_cast(uint32_t, f);
#endif
}

// f rounded to bfloat16 up or down with probability given by the dropped bits; NaN stays NaN.
NEPTUNE_HD uint16_t bf16_round_stochastic(float f, uint32_t bits) {
  if (f != f) return (uint16_t)0x7FC0u;
  return (uint16_t)((float_bits(f) + (bits & 0xFFFFu)) >> 16);
}

}  // namespace neptune
