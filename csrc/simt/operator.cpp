// neptune_ext::_neptune_step_simt_: the CUDA operator's whole path on CPU tensors, for
// tests. The same validation, plan, argument table and table cache as the CUDA backend
// (cuda/launch_args.h, cuda/table_cache.h), then the unchanged kernels of
// cuda/kernels.cu run by the SIMT emulator (simt/kernels.cpp), in the order of
// blocks and threads that `schedule` picks. Its test hooks are in debug_ops.cpp.
#define NEPTUNE_SIMT 1

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "cuda/launch_args.h"
#include "schema.h"
#include "cuda/table_cache.h"

namespace neptune {
namespace {

TableCache& g_simt_tables = *new TableCache(32);  // leaked like the CUDA backend's

void step_simt_impl(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList steps, const Hyper& h, const LrArg& lr,
                    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                    int64_t schedule) {
  TORCH_CHECK_VALUE(schedule >= 0 && schedule <= INT32_MAX,
                    "_neptune_step_simt_: schedule must be >= 0 (0: blocks and threads in ascending order, 1: "
                    "descending, k >= 2: random orders seeded by k), got ",
                    schedule);
  StepLaunch s = build_step_launch(params, grads, exp_avgs, exp_avg_sqs, steps, h, lr, grad_scale, found_inf,
                                   c10::DeviceType::CPU);
  if (s.n == 0) return;
  check_no_pending_cuda_error();
  simt::ScheduleScope order((int)schedule);
  const at::Tensor table = g_simt_tables.get(s.table, -1, nullptr, /*capturing=*/false, [&]() {
    const int64_t bytes = (int64_t)s.table.size();
    at::Tensor dev = at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
    std::memset(dev.data_ptr(), 0xFF, (size_t)bytes);  // the upload kernel must write every byte
    int launches = 0;
    NEPTUNE_CUDA_CHECK(neptune_cuda_upload(dev.data_ptr(), s.table.data(), bytes, nullptr, &launches),
                       "table upload launch");
    return dev;
  });
  bind_table(s, table);
  bind_partials(s, /*poison=*/true);
  NEPTUNE_CUDA_CHECK(neptune_cuda_step(s.args, s.plan.main_blocks, s.plan.long_blocks, nullptr), "kernel launch");
}

void step_simt(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               at::TensorList steps, double lr, double beta1, double beta2, double weight_decay, double eps,
               double clip, bool cautious, bool maximize, const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf, int64_t schedule) {
  LrArg l;
  l.value = lr;
  step_simt_impl(params, grads, exp_avgs, exp_avg_sqs, steps,
                 Hyper{lr, beta1, beta2, weight_decay, eps, clip, cautious, maximize}, l, grad_scale, found_inf,
                 schedule);
}

void step_simt_tensor_lr(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList steps, const at::Tensor& lr, double beta1,
                         double beta2, double weight_decay, double eps, double clip, bool cautious, bool maximize,
                         const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                         int64_t schedule) {
  double check_value = 0.0;
  // The params' "device" is the CPU here: a CPU lr is read by the kernels, as a CUDA lr is.
  const LrArg l = lr_arg_of(lr, at::Device(at::kCPU), check_value);
  step_simt_impl(params, grads, exp_avgs, exp_avg_sqs, steps,
                 Hyper{check_value, beta1, beta2, weight_decay, eps, clip, cautious, maximize}, l, grad_scale,
                 found_inf, schedule);
}

void step_simt_without_kernel(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                              at::TensorList exp_avg_sqs, at::TensorList steps, double lr, double beta1, double beta2,
                              double weight_decay, double eps, double clip, bool cautious, bool maximize,
                              const std::optional<at::Tensor>& /*grad_scale*/,
                              const std::optional<at::Tensor>& /*found_inf*/, int64_t /*schedule*/) {
  check_call_without_kernel(params, grads, exp_avgs, exp_avg_sqs, steps,
                            Hyper{lr, beta1, beta2, weight_decay, eps, clip, cautious, maximize});
}

void step_simt_tensor_lr_without_kernel(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                        at::TensorList exp_avg_sqs, at::TensorList steps, const at::Tensor& /*lr*/,
                                        double beta1, double beta2, double weight_decay, double eps, double clip,
                                        bool cautious, bool maximize, const std::optional<at::Tensor>& grad_scale,
                                        const std::optional<at::Tensor>& found_inf, int64_t schedule) {
  step_simt_without_kernel(params, grads, exp_avgs, exp_avg_sqs, steps, 0.0, beta1, beta2, weight_decay, eps, clip,
                           cautious, maximize, grad_scale, found_inf, schedule);
}

}  // namespace

// Tables uploaded so far by the emulated backend (debug_ops.cpp reports it).
int64_t simt_table_uploads() { return g_simt_tables.uploads(); }

TORCH_LIBRARY_FRAGMENT(neptune_ext, m) {
  m.def("_neptune_step_simt_(" NEPTUNE_STEP_ARGS "float lr, " NEPTUNE_STEP_KWARGS ", int schedule=0) -> ()");
  m.def("_neptune_step_simt_.tensor_lr(" NEPTUNE_STEP_ARGS "Tensor lr, " NEPTUNE_STEP_KWARGS
        ", int schedule=0) -> ()");
}

// Calls with no tensors (see check_call_without_kernel).
TORCH_LIBRARY_IMPL(neptune_ext, CompositeExplicitAutograd, m) {
  m.impl("_neptune_step_simt_", &step_simt_without_kernel);
  m.impl("_neptune_step_simt_.tensor_lr", &step_simt_tensor_lr_without_kernel);
}

TORCH_LIBRARY_IMPL(neptune_ext, CPU, m) {
  m.impl("_neptune_step_simt_", &step_simt);
  m.impl("_neptune_step_simt_.tensor_lr", &step_simt_tensor_lr);
}

}  // namespace neptune
