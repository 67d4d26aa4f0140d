// Operator schemas of neptune_ext (implementations: cpu/operator.cpp, cuda/operator.cpp).
// Shaped like aten::_fused_adamw_: tensor lists, keyword hyperparameters, an overload
// taking lr as a tensor, and GradScaler's grad_scale / found_inf. The op increments
// `steps` itself, so a found_inf step can leave it unchanged without a host sync.
#include <Python.h>
#include <torch/library.h>

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
