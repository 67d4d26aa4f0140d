// Interface between the CUDA operator's registration (cuda/operator.cpp, torch
// side) and its kernels (cuda/kernels.cu, torch-free so that it compiles in seconds):
// raw pointers, plain structs and a cudaStream_t.
#pragma once

#if defined(NEPTUNE_SIMT)
#include "simt/runtime_api.h"
#else
#include <cuda_runtime_api.h>
#endif
#include <stdint.h>

#include "cuda/plan.h"

namespace neptune {

// One tensor of the list as the kernels see it; an array of these lives in device memory
// (the "table"), followed by the slot_begins and long_begins arrays (int64 each).
struct DevTensor {
  void* w;           // param, `dtype`
  const void* g;     // grad, `dtype`
  void* m;           // exp_avg, `state_dtype`
  void* v;           // exp_avg_sq, `state_dtype`
  float* step;       // 0-dim float32 step counter, incremented by the last launch
  cuda_plan::TensorPlan plan;
  int32_t dtype;        // ParamDtype of param and grad
  int32_t state_dtype;  // kF32, or kBF16 (bf16 state: stochastic rounding)
};

// Built by the host compiler (register.cpp), read by the device compiler (kernels): keep the
// layout free of implicit padding, so that the bytes compared by the table cache are all set.
static_assert(sizeof(cuda_plan::TensorPlan) == 9 * 8 + 2 * 4, "TensorPlan layout changed");
static_assert(sizeof(DevTensor) == 5 * 8 + sizeof(cuda_plan::TensorPlan) + 2 * 4, "DevTensor layout changed");
static_assert(sizeof(DevTensor) % 8 == 0, "the int64 arrays after DevTensor[n] must stay 8-byte aligned");

// Layout of the device table for n tensors, in bytes.
inline int64_t table_bytes(int64_t n) { return n * (int64_t)(sizeof(DevTensor) + 2 * sizeof(int64_t)); }

// Kernel arguments shared by every launch of one step (passed by value: no host-to-device
// copy, so a step can be captured in a CUDA graph).
struct StepArgs {
  const DevTensor* tensors;
  const int64_t* slot_begins;
  const int64_t* long_begins;
  int64_t n_tensors;
  double beta1, beta2, weight_decay, eps, clip;
  double lr;               // used when lr_f32 and lr_f64 are null
  const float* lr_f32;     // lr on the device (float32), or null
  const double* lr_f64;    // lr on the device (float64), or null
  const float* grad_scale; // or null
  const float* found_inf;  // or null: nonzero skips the whole step, counters included
  float* norm_partials;    // 2 per chunk block (w_sq, g_sq), when chunked units need clipping
  unsigned long long* count_partials;  // 2 per chunk block (agree, active), when cautious
  int32_t cautious, maximize;
  // Some tensor has bf16 state: launch the kernels built for it. The fp32-state-only
  // kernels are separate instances, so the bf16 paths cost them no registers.
  int32_t bf16_state;
};

// Copy `bytes` host bytes to device memory `dst` through kernel arguments, in stream order
// (capturable in a CUDA graph, unlike a copy from pageable memory). Returns the first error.
cudaError_t neptune_cuda_upload(void* dst, const void* src, int64_t bytes, cudaStream_t stream, int* launches);

// All launches of one step (cuda_plan::launch_sequence). Returns the first launch error.
cudaError_t neptune_cuda_step(const StepArgs& args, int64_t main_blocks, int64_t long_blocks, cudaStream_t stream);

}  // namespace neptune
