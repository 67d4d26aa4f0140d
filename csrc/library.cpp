// Operator schemas of neptune_ext (implementations: cpu/operator.cpp, cuda/operator.cpp).
// Shaped like aten::_fused_adamw_: tensor lists, keyword hyperparameters, an overload
// taking lr as a tensor, and GradScaler's grad_scale / found_inf. The op increments
// `steps` itself, so a found_inf step can leave it unchanged without a host sync.
#include <Python.h>
#include <torch/library.h>

#include "args.h"
#include "schema.h"

extern "C" {
// A Python module whose import loads this library and runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(neptune_ext, m) {
  m.def("neptune_step_(" NEPTUNE_STEP_ARGS "float lr, " NEPTUNE_STEP_KWARGS ") -> ()");
  m.def("neptune_step_.tensor_lr(" NEPTUNE_STEP_ARGS "Tensor lr, " NEPTUNE_STEP_KWARGS ") -> ()");
}

namespace {

void neptune_step_without_kernel(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                 at::TensorList exp_avg_sqs, at::TensorList steps, double lr, double beta1,
                                 double beta2, double weight_decay, double eps, double clip, bool cautious,
                                 bool maximize, const std::optional<at::Tensor>& /*grad_scale*/,
                                 const std::optional<at::Tensor>& /*found_inf*/) {
  neptune::check_call_without_kernel(params, grads, exp_avgs, exp_avg_sqs, steps,
                                     neptune::Hyper{lr, beta1, beta2, weight_decay, eps, clip, cautious, maximize});
}

void neptune_step_tensor_lr_without_kernel(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                           at::TensorList exp_avg_sqs, at::TensorList steps, const at::Tensor& lr,
                                           double beta1, double beta2, double weight_decay, double eps, double clip,
                                           bool cautious, bool maximize, const std::optional<at::Tensor>& grad_scale,
                                           const std::optional<at::Tensor>& found_inf) {
  // lr's value is not read here: it may live on a device without a kernel
  neptune_step_without_kernel(params, grads, exp_avgs, exp_avg_sqs, steps, 0.0, beta1, beta2, weight_decay, eps,
                              clip, cautious, maximize, grad_scale, found_inf);
}

}  // namespace

// Calls that no device kernel takes (see check_call_without_kernel).
TORCH_LIBRARY_IMPL(neptune_ext, CompositeExplicitAutograd, m) {
  m.impl("neptune_step_", &neptune_step_without_kernel);
  m.impl("neptune_step_.tensor_lr", &neptune_step_tensor_lr_without_kernel);
}
