// CPU implementation of neptune_ext::neptune_step_: validation, step counters, the work
// plan and the threading. The per-ISA kernels (cpu/kernel_body.h) walk memory.
//
// Plan: units no longer than kCpuChunk are stepped whole by one thread while in cache
// (one pass over DRAM); consecutive units are packed into tasks of similar size and the
// tasks spread over threads. Longer units (large 1-D tensors) are split into fixed
// chunks: per-chunk norm partials and agreement counts, summed in chunk order, then a
// streaming update. Results depend on the inputs alone, not on the thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <vector>

#include "args.h"
#include "cpu/kernels.h"

namespace neptune {

// The best kernel set this CPU runs; NEPTUNE_CPU_ISA=sse2|avx2|avx512|avx512bf16 picks one (for
// tests and benchmarks). Read at every call so a process can compare them.
const CpuKernels& selected_cpu_kernels() {
  const char* want = std::getenv("NEPTUNE_CPU_ISA");
  if (want != nullptr && *want != '\0') {
    if (std::strcmp(want, "sse2") == 0) return cpu_kernels_sse2();
    if (std::strcmp(want, "avx2") == 0) {
      TORCH_CHECK(cpu_has_avx2(), "NEPTUNE_CPU_ISA=avx2 but this CPU lacks AVX2/FMA/F16C/BMI2/POPCNT");
      return cpu_kernels_avx2();
    }
    if (std::strcmp(want, "avx512") == 0) {
      TORCH_CHECK(cpu_has_avx512(), "NEPTUNE_CPU_ISA=avx512 but this CPU lacks AVX-512 F/BW/VL/DQ");
      return cpu_kernels_avx512();
    }
    if (std::strcmp(want, "avx512bf16") == 0) {
      TORCH_CHECK(cpu_has_avx512bf16(), "NEPTUNE_CPU_ISA=avx512bf16 but this CPU lacks AVX-512 F/BW/VL/DQ/BF16");
      return cpu_kernels_avx512bf16();
    }
    TORCH_CHECK_VALUE(false, "NEPTUNE_CPU_ISA must be sse2, avx2, avx512 or avx512bf16 (or unset), got '", want,
                      "'");
  }
  return cpu_kernels_best();
}

namespace {

struct Task {
  int32_t tensor;
  int64_t unit_begin, unit_end;
};

// Units longer than kCpuChunk (large 1-D tensors, very long rows), all of them at once:
// fixed chunks of kCpuChunk elements, per-chunk norm partials and agreement counts
// summed per unit in chunk order (so results do not depend on the thread count), then a
// streaming update. Three parallel phases in all, however many long units there are.
void step_long_units(const CpuKernels& k, const std::vector<CpuTensorArgs>& args,
                     const std::vector<int32_t>& long_tensors) {
  struct Unit {
    const CpuTensorArgs* a;
    int64_t first_chunk, n_chunks;
    float s, rho;
  };
  struct Chunk {
    int64_t unit, b, e;
  };
  std::vector<Unit> units;
  std::vector<Chunk> chunks;
  for (int32_t i : long_tensors) {
    const CpuTensorArgs& a = args[i];
    for (int64_t b = 0; b < a.numel; b += a.unit_len) {
      const int64_t e = b + a.unit_len, n = (a.unit_len + kCpuChunk - 1) / kCpuChunk;
      units.push_back({&a, (int64_t)chunks.size(), n, 1.f, 1.f});
      for (int64_t c = 0; c < n; ++c)
        chunks.push_back({(int64_t)units.size() - 1, b + c * kCpuChunk, std::min(b + (c + 1) * kCpuChunk, e)});
    }
  }
  const int64_t n_chunks = (int64_t)chunks.size();
  const bool clip = units[0].a->c.clip > 0.f, cautious = units[0].a->c.cautious != 0;  // one call, one rule
  // Agreement counts per chunk; with clipping on they are first counted for s == 1 in the
  // norms pass, and a unit that turns out clipped is counted again (as in the kernel).
  std::vector<int64_t> counts(cautious ? 2 * n_chunks : 0, 0);
  std::vector<char> recount(units.size(), cautious ? 1 : 0);
  if (clip) {
    std::vector<float> partial(2 * n_chunks);
    at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c)
        k.norms(*units[chunks[c].unit].a, chunks[c].b, chunks[c].e, &partial[2 * c], &partial[2 * c + 1],
                cautious ? &counts[2 * c] : nullptr);
    });
    for (size_t ui = 0; ui < units.size(); ++ui) {
      Unit& u = units[ui];
      float w_sq = 0.f, g_sq = 0.f;
      for (int64_t c = u.first_chunk; c < u.first_chunk + u.n_chunks; ++c) {
        w_sq += partial[2 * c];
        g_sq += partial[2 * c + 1];
      }
      u.s = clip_factor(w_sq, g_sq, u.a->c.clip);
      recount[ui] = cautious && u.s != 1.f;
    }
  }
  if (cautious) {
    at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const Unit& u = units[chunks[c].unit];
        if (!recount[chunks[c].unit]) continue;
        counts[2 * c] = counts[2 * c + 1] = 0;
        k.counts(*u.a, chunks[c].b, chunks[c].e, u.s, &counts[2 * c], &counts[2 * c + 1]);
      }
    });
    for (Unit& u : units) {
      int64_t n_agree = 0, n_active = 0;
      for (int64_t c = u.first_chunk; c < u.first_chunk + u.n_chunks; ++c) {
        n_agree += counts[2 * c];
        n_active += counts[2 * c + 1];
      }
      u.rho = rho_floor(n_agree, n_active, 1);
    }
  }
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const Unit& u = units[chunks[c].unit];
      k.update(*u.a, chunks[c].b, chunks[c].e, u.s, u.rho);
    }
  });
}

void neptune_step_cpu_impl(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                           at::TensorList exp_avg_sqs, at::TensorList steps, const Hyper& h,
                           const std::optional<at::Tensor>& grad_scale,
                           const std::optional<at::Tensor>& found_inf) {
  check_hyper(h);
  check_lists(params, grads, exp_avgs, exp_avg_sqs, steps, c10::DeviceType::CPU, /*allow_bf16_state=*/true);
  check_scalar_tensor(grad_scale, "grad_scale", c10::DeviceType::CPU);
  check_scalar_tensor(found_inf, "found_inf", c10::DeviceType::CPU);
  const CpuKernels& k = selected_cpu_kernels();  // may throw for a bad NEPTUNE_CPU_ISA: before any write

  // A step with found_inf set changes nothing, `step` included.
  if (found_inf.has_value() && found_inf->item<float>() != 0.f) return;
  const float gmul =
      grad_multiplier(h.maximize, grad_scale.has_value(), grad_scale.has_value() ? grad_scale->item<float>() : 1.f);

  const int64_t n = (int64_t)params.size();
  std::vector<CpuTensorArgs> args(n);
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    float* step = steps[i].data_ptr<float>();
    *step += 1.f;
    const at::Tensor& p = params[i];
    CpuTensorArgs& a = args[i];
    a.w = p.data_ptr();
    a.g = grads[i].data_ptr();
    a.m = exp_avgs[i].data_ptr();
    a.v = exp_avg_sqs[i].data_ptr();
    a.state_dtype = exp_avgs[i].scalar_type() == at::kBFloat16 ? kBF16 : kF32;
    a.sr_step = (uint32_t)*step;
    a.numel = p.numel();
    a.unit_len = unit_len_of(p);
    a.dtype = param_dtype_code(p.scalar_type());
    a.c = step_consts(h.lr, h.beta1, h.beta2, h.weight_decay, h.eps, h.clip, h.cautious ? 1 : 0, (double)*step, gmul);
    total += a.numel;
  }
  if (total == 0) return;

  // Pack whole in-cache units into tasks of about `target` elements, then give each
  // thread a contiguous run of tasks holding an equal share of the elements (splitting
  // by task count would hand one thread the many small tensors and the other the big).
  const int64_t threads = at::get_num_threads();
  const int64_t target = std::max<int64_t>(4096, std::min<int64_t>(1 << 18, total / (threads * 8) + 1));
  std::vector<Task> tasks;
  std::vector<int32_t> long_tensors;
  int64_t short_total = 0;
  for (int64_t i = 0; i < n; ++i) {
    const CpuTensorArgs& a = args[i];
    if (a.numel == 0) continue;
    if (a.unit_len > kCpuChunk) {
      long_tensors.push_back((int32_t)i);
      continue;
    }
    const int64_t n_units = a.numel / a.unit_len;
    const int64_t per_task = std::max<int64_t>(1, target / a.unit_len);
    short_total += a.numel;
    for (int64_t u = 0; u < n_units; u += per_task)
      tasks.push_back({(int32_t)i, u, std::min(u + per_task, n_units)});
  }
  std::vector<int64_t> first_task(threads + 1, (int64_t)tasks.size());
  first_task[0] = 0;
  int64_t done = 0, part = 1;
  for (int64_t t = 0; t < (int64_t)tasks.size() && part < threads; ++t) {
    done += (tasks[t].unit_end - tasks[t].unit_begin) * args[tasks[t].tensor].unit_len;
    while (part < threads && done * threads >= part * short_total) first_task[part++] = t + 1;
  }
  at::parallel_for(0, threads, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t t = first_task[p0]; t < first_task[p1]; ++t) {
      const bool more = t + 1 < first_task[p1];
      k.units(args[tasks[t].tensor], tasks[t].unit_begin, tasks[t].unit_end,
              more ? &args[tasks[t + 1].tensor] : nullptr, more ? tasks[t + 1].unit_begin : 0);
    }
  });
  if (!long_tensors.empty()) step_long_units(k, args, long_tensors);
}

void neptune_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList steps, double lr, double beta1, double beta2,
                      double weight_decay, double eps, double clip, bool cautious, bool maximize,
                      const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  neptune_step_cpu_impl(params, grads, exp_avgs, exp_avg_sqs, steps,
                        Hyper{lr, beta1, beta2, weight_decay, eps, clip, cautious, maximize}, grad_scale, found_inf);
}

void neptune_step_cpu_tensor_lr(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                at::TensorList exp_avg_sqs, at::TensorList steps, const at::Tensor& lr,
                                double beta1, double beta2, double weight_decay, double eps, double clip,
                                bool cautious, bool maximize, const std::optional<at::Tensor>& grad_scale,
                                const std::optional<at::Tensor>& found_inf) {
  TORCH_CHECK(lr.numel() == 1, "neptune_step_: lr must be a float or a tensor with one element, got ", lr.numel(),
              " elements");
  neptune_step_cpu(params, grads, exp_avgs, exp_avg_sqs, steps, lr.item<double>(), beta1, beta2, weight_decay, eps,
                   clip, cautious, maximize, grad_scale, found_inf);
}

}  // namespace

TORCH_LIBRARY_IMPL(neptune_ext, CPU, m) {
  m.impl("neptune_step_", &neptune_step_cpu);
  m.impl("neptune_step_.tensor_lr", &neptune_step_cpu_tensor_lr);
}

}  // namespace neptune
