// The operators' hyperparameters and the argument validation shared by the CPU and CUDA
// operators (the emulated one included).
// Everything is checked before anything is written, so a bad call changes nothing.
#pragma once

#include <ATen/core/Tensor.h>
#include <optional>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <string>
#include <vector>

#include "rule.h"

namespace neptune {

struct Hyper {
  double lr, beta1, beta2, weight_decay, eps, clip;
  bool cautious, maximize;
};

inline void check_hyper(const Hyper& h) {
  TORCH_CHECK_VALUE(h.lr >= 0.0, "neptune_step_: lr must be >= 0, got ", h.lr);
  TORCH_CHECK_VALUE(h.beta1 >= 0.0 && h.beta1 < 1.0, "neptune_step_: beta1 must be in [0, 1), got ", h.beta1);
  TORCH_CHECK_VALUE(h.beta2 >= 0.0 && h.beta2 < 1.0, "neptune_step_: beta2 must be in [0, 1), got ", h.beta2);
  TORCH_CHECK_VALUE(h.eps > 0.0, "neptune_step_: eps must be > 0, got ", h.eps);
  TORCH_CHECK_VALUE(h.weight_decay >= 0.0, "neptune_step_: weight_decay must be >= 0, got ", h.weight_decay);
  TORCH_CHECK_VALUE(h.clip >= 0.0, "neptune_step_: clip must be >= 0, got ", h.clip);
}

inline int param_dtype_code(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default: return -1;
  }
}

// A unit is p[i] for ndim >= 2, the whole tensor otherwise.
inline int64_t unit_len_of(const at::Tensor& p) {
  if (p.dim() >= 2) return p.size(0) == 0 ? 0 : p.numel() / p.size(0);
  return p.numel();
}

// Units must be contiguous spans: dense memory with dim 0 outermost. This admits
// channels_last conv weights, whose units are contiguous but permuted inside (the rule
// is elementwise plus per-unit sums, so order inside a unit does not matter).
inline bool units_are_spans(const at::Tensor& p) {
  if (p.numel() == 0) return true;
  if (!p.is_non_overlapping_and_dense()) return false;
  if (p.dim() >= 2 && p.size(0) > 1) return p.stride(0) == p.numel() / p.size(0);
  return true;
}

// Whether two tensors of the same sizes address the same element offsets: their strides
// agree wherever a size exceeds 1 (the stride of a size-1 dim is never used, and autograd
// and torch.empty_like may set it differently, e.g. (5, 1) and (1, 1) for shape (1, 5)).
inline bool same_strides(const at::Tensor& a, const at::Tensor& p) {
  if (a.dim() != p.dim()) return false;
  for (int64_t d = 0; d < p.dim(); ++d)
    if (p.size(d) > 1 && a.stride(d) != p.stride(d)) return false;
  return true;
}

// The step writes params, exp_avgs, exp_avg_sqs and steps while it reads all five lists:
// memory shared by a written tensor and any other argument would be read after being
// written (or written twice: a counter shared by two params would be counted twice by the
// CPU operator and once, racily, by the CUDA one). Grads may share memory with each other.
// Refused before anything is written. Called once the tensors are known to be dense, so
// each one occupies exactly [data_ptr, data_ptr + numel * itemsize).
inline void check_no_shared_memory(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                   at::TensorList exp_avg_sqs, at::TensorList steps) {
  struct Span {
    uintptr_t begin, end;
    int list;  // 0 params, 1 grads, 2 exp_avgs, 3 exp_avg_sqs, 4 steps
    size_t index;
  };
  static const char* const kNames[] = {"params", "grads", "exp_avgs", "exp_avg_sqs", "steps"};
  const at::TensorList lists[] = {params, grads, exp_avgs, exp_avg_sqs, steps};
  std::vector<Span> spans;
  spans.reserve(5 * params.size());
  for (int l = 0; l < 5; ++l)
    for (size_t i = 0; i < lists[l].size(); ++i) {
      const at::Tensor& t = lists[l][i];
      if (t.numel() == 0) continue;
      const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
      spans.push_back({begin, begin + (uintptr_t)(t.numel() * (int64_t)t.element_size()), l, i});
    }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
  // Sweep: a span overlaps an earlier one iff it begins before the furthest end so far, and
  // then it overlaps the span with that end. If a written span overlaps any other, some pair
  // with a written member is caught here (the earlier of them was checked against it).
  const Span* furthest = nullptr;
  for (const Span& s : spans) {
    if (furthest != nullptr && s.begin < furthest->end && (s.list != 1 || furthest->list != 1)) {
      const Span& a = *furthest;
      TORCH_CHECK_VALUE(!(a.list == 4 && s.list == 4), "neptune_step_: steps[", std::min(a.index, s.index),
                        "] and steps[", std::max(a.index, s.index),
                        "] are the same counter; every param needs its own step tensor");
      TORCH_CHECK_VALUE(false, "neptune_step_: ", kNames[a.list], "[", a.index, "] and ", kNames[s.list], "[",
                        s.index, "] share memory; the step writes params, exp_avgs, exp_avg_sqs and steps, which "
                        "must not share memory with each other or with any grad");
    }
    if (furthest == nullptr || s.end > furthest->end) furthest = &s;
  }
}

// allow_bf16_state: exp_avg / exp_avg_sq may be bfloat16 (bf16 state).
inline void check_lists(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, at::TensorList steps,
                        c10::DeviceType device_type, bool allow_bf16_state = false) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && steps.size() == n,
              "neptune_step_: params, grads, exp_avgs, exp_avg_sqs and steps must have the same length, got ",
              n, ", ", grads.size(), ", ", exp_avgs.size(), ", ", exp_avg_sqs.size(), ", ", steps.size());
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    const at::Tensor& m = exp_avgs[i];
    const at::Tensor& v = exp_avg_sqs[i];
    const at::Tensor& s = steps[i];
    TORCH_CHECK(!p.is_complex(), "neptune_step_: params[", i, "] is complex; Neptune supports real float32, bfloat16 and float16 params");
    TORCH_CHECK(param_dtype_code(p.scalar_type()) >= 0, "neptune_step_: params[", i, "] has dtype ", p.scalar_type(),
                "; supported: float32, bfloat16, float16");
    TORCH_CHECK(g.layout() == at::kStrided, "neptune_step_: grads[", i, "] is sparse; Neptune does not support sparse gradients");
    TORCH_CHECK(p.device().type() == device_type && g.device() == p.device() && m.device() == p.device() &&
                    v.device() == p.device() && s.device() == p.device(),
                "neptune_step_: params[", i, "], its grad, exp_avg, exp_avg_sq and step must all be on one ",
                c10::DeviceTypeName(device_type), " device; got ", p.device(), ", ", g.device(), ", ", m.device(),
                ", ", v.device(), ", ", s.device());
    TORCH_CHECK(g.scalar_type() == p.scalar_type(), "neptune_step_: grads[", i, "] has dtype ", g.scalar_type(),
                " but must have its param's dtype ", p.scalar_type());
    const bool state_ok = m.scalar_type() == v.scalar_type() &&
                          (m.scalar_type() == at::kFloat || (allow_bf16_state && m.scalar_type() == at::kBFloat16));
    TORCH_CHECK(state_ok, "neptune_step_: exp_avgs[", i, "] and exp_avg_sqs[", i, "] must both be float32",
                allow_bf16_state ? " or both bfloat16 (bf16 state)" : "",
                " on this device; got ", m.scalar_type(), " and ", v.scalar_type());
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.numel() == 1, "neptune_step_: steps[", i, "] must be a float32 scalar tensor");
    TORCH_CHECK(g.sizes() == p.sizes() && m.sizes() == p.sizes() && v.sizes() == p.sizes(),
                "neptune_step_: params[", i, "] has shape ", p.sizes(), " but grad ", g.sizes(), ", exp_avg ",
                m.sizes(), ", exp_avg_sq ", v.sizes(), "; they must all have the param's shape");
    if (p.numel() == 0) continue;
    TORCH_CHECK(units_are_spans(p), "neptune_step_: params[", i, "] with shape ", p.sizes(), " and strides ",
                p.strides(), " is not dense with dim 0 outermost; it must be (each unit p[i] one contiguous span, "
                "e.g. contiguous or channels_last)");
    TORCH_CHECK(same_strides(g, p) && same_strides(m, p) && same_strides(v, p),
                "neptune_step_: params[", i, "] has strides ", p.strides(), " but grad ", g.strides(), ", exp_avg ",
                m.strides(), ", exp_avg_sq ", v.strides(), "; they must match (where a size exceeds 1)");
  }
  check_no_shared_memory(params, grads, exp_avgs, exp_avg_sqs, steps);
}

inline void check_scalar_tensor(const std::optional<at::Tensor>& t, const char* name, c10::DeviceType device_type) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat,
              "neptune_step_: ", name, " must be a float32 tensor with one element, got ", t->scalar_type(), " with ",
              t->numel(), " elements");
  TORCH_CHECK(t->device().type() == device_type, "neptune_step_: ", name, " must be on the ",
              c10::DeviceTypeName(device_type), " device like the params, got ", t->device());
}

// A call with no tensors at all (five empty lists and a float lr) has no device to dispatch
// on, so no device kernel takes it: it steps nothing, and still refuses bad hyperparameters.
// Calls with a tensor no kernel takes (sparse, or on a device without a Neptune kernel)
// land here too and are refused naming it (the CPU and CUDA kernels, and the fake one for
// meta tensors, take their own).
inline void check_call_without_kernel(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                      at::TensorList exp_avg_sqs, at::TensorList steps, const Hyper& h) {
  check_hyper(h);
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && steps.size() == n,
              "neptune_step_: params, grads, exp_avgs, exp_avg_sqs and steps must have the same length, got ", n,
              ", ", grads.size(), ", ", exp_avgs.size(), ", ", exp_avg_sqs.size(), ", ", steps.size());
  static const char* const kNames[] = {"params", "grads", "exp_avgs", "exp_avg_sqs", "steps"};
  const at::TensorList lists[] = {params, grads, exp_avgs, exp_avg_sqs, steps};
  for (size_t i = 0; i < n; ++i)
    for (int l = 0; l < 5; ++l)
      TORCH_CHECK(lists[l][i].layout() == at::kStrided, "neptune_step_: ", kNames[l], "[", i, "] has layout ",
                  lists[l][i].layout(), "; Neptune supports only dense (strided) tensors",
                  l == 1 ? " (no sparse gradients)" : "");
  TORCH_CHECK(n == 0, "neptune_step_: no Neptune kernel for params on ", params[0].device(),
              "; supported devices: CPU, and CUDA where the CUDA extension is built");
}

}  // namespace neptune
