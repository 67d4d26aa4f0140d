// Host side of the CUDA operator, shared by its two backends: the real one
// (cuda/operator.cpp) and the SIMT emulator's (simt/operator.cpp).
// Validation, the plan, the table of tensors and the kernel arguments are built here once,
// so the emulated backend runs exactly what the real one would launch. Torch, and the CUDA
// runtime API of whichever backend includes it (no device code).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "args.h"
#include "cuda/layout.h"

// Who reports an error: the real CUDA backend, or its SIMT-emulated twin.
#if defined(NEPTUNE_SIMT)
#define NEPTUNE_CUDA_WHO "neptune_step_ (CUDA, emulated)"
#else
#define NEPTUNE_CUDA_WHO "neptune_step_ (CUDA)"
#endif

// A CUDA runtime call or launch that must succeed; `what` names it in the error.
#define NEPTUNE_CUDA_CHECK(expr, what)                                                                \
  do {                                                                                                \
    const cudaError_t err_ = (expr);                                                                  \
    TORCH_CHECK(err_ == cudaSuccess, NEPTUNE_CUDA_WHO ": ", what, " failed: ", cudaGetErrorName(err_), \
                ": ", cudaGetErrorString(err_));                                                      \
  } while (0)

namespace neptune {

struct LrArg {
  double value = 0.0;
  at::Tensor device_tensor;  // float32 or float64 on the params' device, or undefined
};

// lr given as a tensor: read on the host when it is a CPU tensor and the params are not on
// the CPU (check_value is then the value to validate, with no device sync), else left on
// the device for the kernels to read (a device lr is not range-checked: that would sync).
inline LrArg lr_arg_of(const at::Tensor& lr, const at::Device& device_hint, double& check_value) {
  TORCH_CHECK(lr.numel() == 1, "neptune_step_: lr must be a float or a tensor with one element, got ", lr.numel(),
              " elements");
  TORCH_CHECK(!lr.is_complex(), "neptune_step_: lr must be real, got ", lr.scalar_type());
  LrArg l;
  check_value = 0.0;
  if (lr.device().is_cpu() && !device_hint.is_cpu()) {
    l.value = lr.item<double>();
    check_value = l.value;
  } else {
    TORCH_CHECK(lr.device().type() == device_hint.type(), "neptune_step_: lr must be on the CPU or on the params' ",
                c10::DeviceTypeName(device_hint.type()), " device, got ", lr.device());
    // Read by the kernels; other dtypes become float32 first (on the device: no sync).
    l.device_tensor = (lr.scalar_type() == at::kFloat || lr.scalar_type() == at::kDouble) ? lr : lr.to(at::kFloat);
  }
  return l;
}

// Everything the launches of one step need, built on the host.
struct StepLaunch {
  int64_t n = 0;
  at::Device device = at::Device(at::kCPU);
  cuda_plan::Plan plan;
  std::vector<unsigned char> table;  // DevTensor[n], slot_begins[n], long_begins[n]
  StepArgs args;                     // table pointers and partials unset (see bind_*)
  at::Tensor norm_partials, count_partials;
};

inline void check_same_device(const std::optional<at::Tensor>& t, const char* name, const at::Device& device) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device() == device, "neptune_step_: ", name, " must be on the params' device ", device, ", got ",
              t->device());
}

// An error left pending by an earlier, unrelated CUDA call would surface at this step's
// first launch check and be reported as ours: report it as what it is, before anything runs.
inline void check_no_pending_cuda_error() {
  const cudaError_t prior = cudaGetLastError();  // and clear it: it is reported here
  TORCH_CHECK(prior == cudaSuccess, NEPTUNE_CUDA_WHO ": an earlier CUDA call left an error pending: ",
              cudaGetErrorName(prior), ": ", cudaGetErrorString(prior),
              " (raised here before this step launched anything; the step was not taken)");
}

// Validates every argument (nothing is written before) and builds the plan, the host table
// and the kernel arguments. device_type: CUDA, or CPU for the emulated backend.
inline StepLaunch build_step_launch(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                    at::TensorList exp_avg_sqs, at::TensorList steps, const Hyper& h, const LrArg& lr,
                                    const std::optional<at::Tensor>& grad_scale,
                                    const std::optional<at::Tensor>& found_inf, c10::DeviceType device_type) {
  check_hyper(h);
  check_lists(params, grads, exp_avgs, exp_avg_sqs, steps, device_type, /*allow_bf16_state=*/true);
  check_scalar_tensor(grad_scale, "grad_scale", device_type);
  check_scalar_tensor(found_inf, "found_inf", device_type);
  StepLaunch s;
  s.n = (int64_t)params.size();
  if (s.n == 0) return s;
  const int64_t n = s.n;
  s.device = params[0].device();
  for (int64_t i = 1; i < n; ++i)
    TORCH_CHECK(params[i].device() == s.device, "neptune_step_: all params must be on one device; params[0] is on ", s.device,
                " and params[", i, "] on ", params[i].device(), "; call once per device");
  check_same_device(grad_scale, "grad_scale", s.device);
  check_same_device(found_inf, "found_inf", s.device);
  if (lr.device_tensor.defined())
    TORCH_CHECK(lr.device_tensor.device() == s.device, "neptune_step_: lr must be on the CPU or on the params' device ",
                s.device, ", got ", lr.device_tensor.device());

  std::vector<int64_t> numels(n), unit_lens(n);
  for (int64_t i = 0; i < n; ++i) {
    numels[i] = params[i].numel();
    unit_lens[i] = unit_len_of(params[i]);
  }
  s.plan = cuda_plan::make_plan(numels.data(), unit_lens.data(), n);
  TORCH_CHECK(s.plan.main_blocks <= INT32_MAX && s.plan.long_blocks <= INT32_MAX,
              "neptune_step_: too much work for one launch (", s.plan.main_blocks, " blocks)");

  s.table.assign((size_t)table_bytes(n), 0);
  DevTensor* dt = reinterpret_cast<DevTensor*>(s.table.data());
  bool bf16_state = false;
  for (int64_t i = 0; i < n; ++i) {
    DevTensor t;
    std::memset(&t, 0, sizeof(t));  // every byte set: the table cache compares bytes
    const bool empty = numels[i] == 0;
    t.w = empty ? nullptr : params[i].data_ptr();
    t.g = empty ? nullptr : grads[i].data_ptr();
    t.m = empty ? nullptr : exp_avgs[i].data_ptr();
    t.v = empty ? nullptr : exp_avg_sqs[i].data_ptr();
    t.step = steps[i].data_ptr<float>();
    t.plan = s.plan.tensors[i];
    t.dtype = param_dtype_code(params[i].scalar_type());
    t.state_dtype = exp_avgs[i].scalar_type() == at::kBFloat16 ? kBF16 : kF32;  // exp_avg_sqs[i]'s too (checked)
    bf16_state = bf16_state || t.state_dtype == kBF16;
    std::memcpy(&dt[i], &t, sizeof(t));
  }
  std::memcpy(s.table.data() + n * sizeof(DevTensor), s.plan.slot_begins.data(), n * sizeof(int64_t));
  std::memcpy(s.table.data() + n * (sizeof(DevTensor) + sizeof(int64_t)), s.plan.long_begins.data(),
              n * sizeof(int64_t));

  StepArgs& a = s.args;
  std::memset(&a, 0, sizeof(a));
  a.n_tensors = n;
  a.beta1 = h.beta1;
  a.beta2 = h.beta2;
  a.weight_decay = h.weight_decay;
  a.eps = h.eps;
  a.clip = h.clip;
  a.lr = lr.value;
  if (lr.device_tensor.defined()) {
    if (lr.device_tensor.scalar_type() == at::kDouble)
      a.lr_f64 = lr.device_tensor.data_ptr<double>();
    else
      a.lr_f32 = lr.device_tensor.data_ptr<float>();
  }
  a.grad_scale = grad_scale.has_value() ? grad_scale->data_ptr<float>() : nullptr;
  a.found_inf = found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr;
  a.cautious = h.cautious ? 1 : 0;
  a.maximize = h.maximize ? 1 : 0;
  a.bf16_state = bf16_state ? 1 : 0;
  return s;
}

// Points the arguments at the device copy of the table.
inline void bind_table(StepLaunch& s, const at::Tensor& device_table) {
  const unsigned char* table = static_cast<const unsigned char*>(device_table.data_ptr());
  s.args.tensors = reinterpret_cast<const DevTensor*>(table);
  s.args.slot_begins = reinterpret_cast<const int64_t*>(table + s.n * sizeof(DevTensor));
  s.args.long_begins = reinterpret_cast<const int64_t*>(table + s.n * (sizeof(DevTensor) + sizeof(int64_t)));
}

// Partials of chunked units on the params' device (2 per chunk block), kept alive by `s`.
// poison: fill them with NaN / all-ones first (the emulated backend), so that a read
// before the write that should precede it shows.
inline void bind_partials(StepLaunch& s, bool poison) {
  if (s.plan.long_blocks <= 0) return;
  const auto opts = at::TensorOptions().device(s.device);
  s.norm_partials = at::empty({2 * s.plan.long_blocks}, opts.dtype(at::kFloat));
  s.count_partials = at::empty({2 * s.plan.long_blocks}, opts.dtype(at::kLong));
  if (poison) {
    s.norm_partials.fill_(std::numeric_limits<float>::quiet_NaN());
    s.count_partials.fill_(-1);
  }
  s.args.norm_partials = s.norm_partials.data_ptr<float>();
  s.args.count_partials = reinterpret_cast<unsigned long long*>(s.count_partials.data_ptr<int64_t>());
}

}  // namespace neptune
