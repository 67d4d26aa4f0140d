// CUDA implementation of neptune_ext::neptune_step_ (both overloads): the device table of
// tensors and the launches (kernels: cuda/kernels.cu). Validation, the plan, the table
// and the kernel arguments are built by cuda/launch_args.h, shared with the SIMT-emulated
// backend, which runs the same kernels on the CPU.
//
// Metadata reaches the kernels without a host-to-device memcpy: the table of tensors
// (pointers, sizes, plan) is written to device memory by kernels that carry it in their
// arguments, and cached by content (cuda/table_cache.h). A training loop steps the same
// tensors every time, so from the second step on a step is just its launches: main + step
// counters (+1 or 2 for units longer than 16384 elements). Nothing here reads a CUDA tensor
// on the host: found_inf, grad_scale, lr and the step counters are read by the kernels.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/launch_args.h"
#include "cuda/table_cache.h"

extern "C" {
// A Python module whose import loads this library and runs the registrations below.
PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace neptune {
namespace {

// Leaked on purpose: the entries hold CUDA tensors, which a static destructor would free at
// process exit, after the CUDA runtime (and maybe the caching allocator) has shut down.
TableCache& g_tables = *new TableCache(32);

bool stream_is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  NEPTUNE_CUDA_CHECK(cudaStreamIsCapturing(stream, &status), "cudaStreamIsCapturing");
  return status != cudaStreamCaptureStatusNone;
}

void neptune_step_cuda_impl(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, at::TensorList steps, const Hyper& h, const LrArg& lr,
                            const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  StepLaunch s = build_step_launch(params, grads, exp_avgs, exp_avg_sqs, steps, h, lr, grad_scale, found_inf,
                                   c10::DeviceType::CUDA);  // validates everything before writing anything
  if (s.n == 0) return;
  c10::cuda::CUDAGuard guard(s.device);
  check_no_pending_cuda_error();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(s.device.index()).stream();
  const at::Device device = s.device;
  // Held until the launches below are enqueued, whatever another thread evicts meanwhile.
  const at::Tensor table = g_tables.get(s.table, device.index(), stream, stream_is_capturing(stream), [&]() {
    at::Tensor dev = at::empty({(int64_t)s.table.size()}, at::TensorOptions().dtype(at::kByte).device(device));
    int launches = 0;
    NEPTUNE_CUDA_CHECK(neptune_cuda_upload(dev.data_ptr(), s.table.data(), (int64_t)s.table.size(), stream, &launches),
                       "table upload launch");
    return dev;
  });
  bind_table(s, table);
  bind_partials(s, /*poison=*/false);  // freed in stream order after the launches
  NEPTUNE_CUDA_CHECK(neptune_cuda_step(s.args, s.plan.main_blocks, s.plan.long_blocks, stream), "kernel launch");
}

void neptune_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, at::TensorList steps, double lr, double beta1, double beta2,
                       double weight_decay, double eps, double clip, bool cautious, bool maximize,
                       const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  LrArg l;
  l.value = lr;
  neptune_step_cuda_impl(params, grads, exp_avgs, exp_avg_sqs, steps,
                         Hyper{lr, beta1, beta2, weight_decay, eps, clip, cautious, maximize}, l, grad_scale,
                         found_inf);
}

void neptune_step_cuda_tensor_lr(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                 at::TensorList exp_avg_sqs, at::TensorList steps, const at::Tensor& lr,
                                 double beta1, double beta2, double weight_decay, double eps, double clip,
                                 bool cautious, bool maximize, const std::optional<at::Tensor>& grad_scale,
                                 const std::optional<at::Tensor>& found_inf) {
  double check_value = 0.0;  // lr >= 0 is checked on the host only for a host lr (no sync)
  const LrArg l = lr_arg_of(lr, at::Device(at::kCUDA), check_value);
  neptune_step_cuda_impl(params, grads, exp_avgs, exp_avg_sqs, steps,
                         Hyper{check_value, beta1, beta2, weight_decay, eps, clip, cautious, maximize}, l,
                         grad_scale, found_inf);
}

// Tables uploaded so far by this process (a table is uploaded when a list of tensors is
// stepped for the first time on a stream, and at every capture): lets tests check the
// steady-state launches.
int64_t cuda_table_uploads() { return g_tables.uploads(); }

}  // namespace

TORCH_LIBRARY_IMPL(neptune_ext, CUDA, m) {
  m.impl("neptune_step_", &neptune_step_cuda);
  m.impl("neptune_step_.tensor_lr", &neptune_step_cuda_tensor_lr);
}

TORCH_LIBRARY_FRAGMENT(neptune_ext, m) { m.def("_cuda_table_uploads() -> int", &cuda_table_uploads); }

}  // namespace neptune
