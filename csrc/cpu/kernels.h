// Interface between the CPU operator (torch side, cpu/operator.cpp) and the
// per-instruction-set kernels (cpu/kernel_body.h compiled once per ISA).
// Plain structs only: the ISA files include no torch headers.
#pragma once

#include <stdint.h>

#include "rule.h"

namespace neptune {

// One tensor of the list, as raw memory: a unit is `unit_len` contiguous elements.
struct CpuTensorArgs {
  void* w;          // param, `dtype`
  const void* g;    // grad, `dtype`
  void* m;          // exp_avg, `state_dtype`
  void* v;          // exp_avg_sq, `state_dtype`
  int64_t numel;
  int64_t unit_len;
  int dtype;        // ParamDtype
  int state_dtype;  // kF32, or kBF16 (bf16 state)
  uint32_t sr_step; // the step number, seeding the state's stochastic rounding
  StepConsts c;
};

// Units up to this length are stepped whole by one thread while in cache
// (fp32: 16 B per element, so 512 KiB, half a typical L2); longer ones are split into
// chunks of this size across threads with deterministic per-chunk partials.
constexpr int64_t kCpuChunk = 32768;

struct CpuKernels {
  const char* isa;
  // Whole units [unit_begin, unit_end) of one tensor, each unit_len <= kCpuChunk;
  // `after` (may be null) and `after_unit` name the unit this thread steps next.
  void (*units)(const CpuTensorArgs& t, int64_t unit_begin, int64_t unit_end, const CpuTensorArgs* after,
                int64_t after_unit);
  // Pieces of one long unit, over elements [b, e):
  // With `counts` non-null, also adds the agreement counts for s == 1 to counts[0..1].
  void (*norms)(const CpuTensorArgs& t, int64_t b, int64_t e, float* w_sq, float* g_sq, int64_t* counts);
  void (*counts)(const CpuTensorArgs& t, int64_t b, int64_t e, float s, int64_t* n_agree,
                 int64_t* n_active);
  void (*update)(const CpuTensorArgs& t, int64_t b, int64_t e, float s, float rho);
};

// Defined in cpu/set_{sse2,avx2,avx512,avx512bf16}.cpp.
const CpuKernels& cpu_kernels_sse2();
const CpuKernels& cpu_kernels_avx2();
const CpuKernels& cpu_kernels_avx512();
const CpuKernels& cpu_kernels_avx512bf16();

// What each kernel set needs of the CPU (its file's `#pragma GCC target`). Internal linkage, as
// everything the set files include after their pragma.
#if defined(__x86_64__)
static inline bool cpu_has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
static inline bool cpu_has_avx512bf16() { return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16"); }
static inline bool cpu_has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
         __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
}
#else
static inline bool cpu_has_avx512() { return false; }
static inline bool cpu_has_avx512bf16() { return false; }
static inline bool cpu_has_avx2() { return false; }
#endif

// The kernel set a step runs now: NEPTUNE_CPU_ISA's, else the best (cpu/operator.cpp).
const CpuKernels& selected_cpu_kernels();

// The best kernel set this CPU runs.
static inline const CpuKernels& cpu_kernels_best() {
  if (cpu_has_avx512bf16()) return cpu_kernels_avx512bf16();
  if (cpu_has_avx512()) return cpu_kernels_avx512();
  if (cpu_has_avx2()) return cpu_kernels_avx2();
  return cpu_kernels_sse2();
}

}  // namespace neptune
