// CUDA implementation of neptune_ext::neptune_step_ (both overloads): validation, the
// device table of tensors, the work plan, and the launches (kernels: neptune_step_cuda.cu).
//
// Metadata reaches the kernels without a host-to-device memcpy: the table of tensors
// (pointers, sizes, plan) is written to device memory by kernels that carry it in their
// arguments, and cached by content (device, stream and every byte). A training loop
// steps the same tensors every time, so from the second step on a step is just its
// launches: main + step counters (+1 or 2 for units longer than 16384 elements). Tables
// used while a CUDA graph is captured are never freed (the graph keeps reading them), and
// tables filled during a capture are only valid inside that graph, so eager calls never
// reuse them. Nothing here reads a CUDA tensor on the host: found_inf, grad_scale, lr and
// the step counters are read by the kernels.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <mutex>
#include <vector>

#include "neptune_checks.h"
#include "neptune_cuda_launch.h"

extern "C" {
// A Python module whose import loads this library and runs the registrations below.
PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace neptune {
namespace {

#define NEPTUNE_CUDA_CHECK(expr, what)                                                              \
  do {                                                                                              \
    const cudaError_t err_ = (expr);                                                                \
    TORCH_CHECK(err_ == cudaSuccess, "neptune_step_ (CUDA): ", what, " failed: ", cudaGetErrorName(err_), \
                ": ", cudaGetErrorString(err_));                                                    \
  } while (0)

struct TableEntry {
  c10::DeviceIndex device;
  cudaStream_t stream;
  bool filled_in_capture;  // valid only inside the graph that filled it
  bool keep;               // read by a captured graph: never freed
  uint64_t last_use;
  std::vector<unsigned char> host;
  at::Tensor dev;
};

constexpr size_t kMaxTables = 32;
std::mutex g_tables_mu;
// Leaked on purpose: the entries hold CUDA tensors, which a static destructor would free at
// process exit, after the CUDA runtime (and maybe the caching allocator) has shut down.
std::vector<TableEntry>& g_tables = *new std::vector<TableEntry>();
uint64_t g_clock = 0;
int64_t g_uploads = 0;  // upload launches so far (for tests and benchmarks)

bool stream_is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  NEPTUNE_CUDA_CHECK(cudaStreamIsCapturing(stream, &status), "cudaStreamIsCapturing");
  return status != cudaStreamCaptureStatusNone;
}

// Device copy of `host`, valid on `stream` in stream order.
const unsigned char* device_table(const std::vector<unsigned char>& host, const at::Device& device,
                                  cudaStream_t stream) {
  const bool capturing = stream_is_capturing(stream);
  std::lock_guard<std::mutex> lock(g_tables_mu);
  for (TableEntry& e : g_tables) {
    if (e.filled_in_capture || e.device != device.index() || e.stream != stream || e.host.size() != host.size())
      continue;
    if (std::memcmp(e.host.data(), host.data(), host.size()) != 0) continue;
    e.last_use = ++g_clock;
    e.keep = e.keep || capturing;
    return static_cast<const unsigned char*>(e.dev.data_ptr());
  }
  if (g_tables.size() >= kMaxTables) {  // drop the least recently used table no graph reads
    size_t victim = g_tables.size();
    for (size_t k = 0; k < g_tables.size(); ++k)
      if (!g_tables[k].keep && (victim == g_tables.size() || g_tables[k].last_use < g_tables[victim].last_use))
        victim = k;
    // Freed in stream order by the caching allocator: pending kernels on its stream finish first.
    if (victim < g_tables.size()) g_tables.erase(g_tables.begin() + (std::ptrdiff_t)victim);
  }
  at::Tensor dev = at::empty({(int64_t)host.size()}, at::TensorOptions().dtype(at::kByte).device(device));
  int launches = 0;
  NEPTUNE_CUDA_CHECK(neptune_cuda_upload(dev.data_ptr(), host.data(), (int64_t)host.size(), stream, &launches),
                     "table upload launch");
  g_uploads += launches;
  g_tables.push_back(TableEntry{device.index(), stream, capturing, capturing, ++g_clock, host, dev});
  return static_cast<const unsigned char*>(dev.data_ptr());
}

void check_same_device(const std::optional<at::Tensor>& t, const char* name, const at::Device& device) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device() == device, "neptune_step_: ", name, " must be on the params' device ", device, ", got ",
              t->device());
}

struct LrArg {
  double value = 0.0;
  at::Tensor device_tensor;  // float32 or float64 on the params' device, or undefined
};

void neptune_step_cuda_impl(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, at::TensorList steps, const Hyper& h, const LrArg& lr,
                            const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  // Validate everything before writing anything.
  check_hyper(h);
  check_lists(params, grads, exp_avgs, exp_avg_sqs, steps, c10::DeviceType::CUDA, /*allow_bf16_state=*/true);
  check_scalar_tensor(grad_scale, "grad_scale", c10::DeviceType::CUDA);
  check_scalar_tensor(found_inf, "found_inf", c10::DeviceType::CUDA);
  const int64_t n = (int64_t)params.size();
  if (n == 0) return;
  const at::Device device = params[0].device();
  for (int64_t i = 1; i < n; ++i)
    TORCH_CHECK(params[i].device() == device, "neptune_step_: all params must be on one device, got ", device,
                " and ", params[i].device(), " (params[", i, "]); call once per device");
  check_same_device(grad_scale, "grad_scale", device);
  check_same_device(found_inf, "found_inf", device);
  if (lr.device_tensor.defined())
    TORCH_CHECK(lr.device_tensor.device() == device, "neptune_step_: lr must be on the CPU or on the params' device ",
                device, ", got ", lr.device_tensor.device());

  c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();

  std::vector<int64_t> numels(n), unit_lens(n);
  for (int64_t i = 0; i < n; ++i) {
    numels[i] = params[i].numel();
    unit_lens[i] = unit_len_of(params[i]);
  }
  const cuda_plan::Plan plan = cuda_plan::make_plan(numels.data(), unit_lens.data(), n);
  TORCH_CHECK(plan.main_blocks <= INT32_MAX && plan.long_blocks <= INT32_MAX,
              "neptune_step_: too much work for one launch (", plan.main_blocks, " blocks)");

  // The table: DevTensor[n], then slot_begins[n], then long_begins[n].
  std::vector<unsigned char> host((size_t)table_bytes(n));
  DevTensor* dt = reinterpret_cast<DevTensor*>(host.data());
  bool lean = false;
  for (int64_t i = 0; i < n; ++i) {
    DevTensor t;
    std::memset(&t, 0, sizeof(t));
    const bool empty = numels[i] == 0;
    t.w = empty ? nullptr : params[i].data_ptr();
    t.g = empty ? nullptr : grads[i].data_ptr();
    t.m = empty ? nullptr : exp_avgs[i].data_ptr();
    t.v = empty ? nullptr : exp_avg_sqs[i].data_ptr();
    t.step = steps[i].data_ptr<float>();
    t.plan = plan.tensors[i];
    t.dtype = param_dtype_code(params[i].scalar_type());
    t.state_dtype = exp_avgs[i].scalar_type() == at::kBFloat16 ? kBF16 : kF32;  // exp_avg_sqs[i]'s too (checked)
    lean = lean || t.state_dtype == kBF16;
    std::memcpy(&dt[i], &t, sizeof(t));
  }
  std::memcpy(host.data() + n * sizeof(DevTensor), plan.slot_begins.data(), n * sizeof(int64_t));
  std::memcpy(host.data() + n * (sizeof(DevTensor) + sizeof(int64_t)), plan.long_begins.data(), n * sizeof(int64_t));

  const unsigned char* table = device_table(host, device, stream);

  StepArgs a;
  std::memset(&a, 0, sizeof(a));
  a.tensors = reinterpret_cast<const DevTensor*>(table);
  a.slot_begins = reinterpret_cast<const int64_t*>(table + n * sizeof(DevTensor));
  a.long_begins = reinterpret_cast<const int64_t*>(table + n * (sizeof(DevTensor) + sizeof(int64_t)));
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
  a.lean = lean ? 1 : 0;

  // Partials of chunked units; freed in stream order after the launches below.
  at::Tensor norm_partials, count_partials;
  if (plan.long_blocks > 0) {
    const auto opts = at::TensorOptions().device(device);
    norm_partials = at::empty({2 * plan.long_blocks}, opts.dtype(at::kFloat));
    count_partials = at::empty({2 * plan.long_blocks}, opts.dtype(at::kLong));
    a.norm_partials = norm_partials.data_ptr<float>();
    a.count_partials = reinterpret_cast<unsigned long long*>(count_partials.data_ptr<int64_t>());
  }
  NEPTUNE_CUDA_CHECK(neptune_cuda_step(a, plan.main_blocks, plan.long_blocks, stream), "kernel launch");
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
  TORCH_CHECK(lr.numel() == 1, "neptune_step_: lr must be a float or a tensor with one element, got ", lr.numel(),
              " elements");
  TORCH_CHECK(!lr.is_complex(), "neptune_step_: lr must be real, got ", lr.scalar_type());
  LrArg l;
  double check_value = 0.0;  // lr >= 0 is checked on the host only for a host lr (no sync)
  if (lr.device().is_cpu()) {
    l.value = lr.item<double>();
    check_value = l.value;
  } else {
    TORCH_CHECK(lr.device().is_cuda(), "neptune_step_: lr must be on the CPU or on the params' CUDA device, got ",
                lr.device());
    // Read on the device; other dtypes become float32 there (an async cast, no sync).
    l.device_tensor = (lr.scalar_type() == at::kFloat || lr.scalar_type() == at::kDouble) ? lr : lr.to(at::kFloat);
  }
  neptune_step_cuda_impl(params, grads, exp_avgs, exp_avg_sqs, steps,
                         Hyper{check_value, beta1, beta2, weight_decay, eps, clip, cautious, maximize}, l,
                         grad_scale, found_inf);
}

// Upload launches made so far by this process (a table is uploaded when a list of tensors
// is stepped for the first time on a stream): lets tests check the steady-state launches.
int64_t cuda_table_uploads() {
  std::lock_guard<std::mutex> lock(g_tables_mu);
  return g_uploads;
}

}  // namespace

TORCH_LIBRARY_IMPL(neptune_ext, CUDA, m) {
  m.impl("neptune_step_", &neptune_step_cuda);
  m.impl("neptune_step_.tensor_lr", &neptune_step_cuda_tensor_lr);
}

TORCH_LIBRARY_FRAGMENT(neptune_ext, m) { m.def("_cuda_table_uploads() -> int", &cuda_table_uploads); }

}  // namespace neptune
